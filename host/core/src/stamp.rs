//! Stamps order replicated metadata entries (buckets, members, keys) the same way on
//! every node.

use serde::{Deserialize, Serialize};

/// Who wrote a metadata entry, and when: ordered by time, then by node name, so every node
/// picks the same winner.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Writer's wall clock, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Writer's node name.
    pub node: String,
}

impl Stamp {
    /// A stamp of `node` at `timestamp_ms`.
    pub fn at(timestamp_ms: u64, node: impl Into<String>) -> Stamp {
        Stamp {
            timestamp_ms,
            node: node.into(),
        }
    }

    /// The stamp of state every node derives alike (a first ring from a `--peer` list):
    /// earlier than any real write, equal everywhere.
    pub fn zero() -> Stamp {
        Stamp::at(0, "")
    }
}
