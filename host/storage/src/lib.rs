//! Storage engines and group commit.
//!
//! Every engine implements [`quiver_core::storage::StorageEngine`], an ordered byte map with
//! atomic batches and a separate `sync` step:
//! - [`FjallEngine`] is the durable default: one fjall 3 database holding one keyspace.
//! - [`MemoryEngine`] is a `BTreeMap`, for tests, simulations and throw-away dev clusters.
//!
//! The node never calls an engine's `sync` directly. It goes through [`Store`], which applies
//! each writer's batch at once and lets a single syncer thread issue one `sync` for every
//! writer queued at that moment (group commit), so a thousand concurrent durable writes cost
//! a handful of fsyncs rather than a thousand.
//!
//! [`conformance`] holds the suite every engine (including future Wasm storage adapters)
//! must pass; it is compiled into the library so that adapter crates and integration tests
//! can run it.

pub mod conformance;
pub mod fjall_engine;
pub mod group_commit;
pub mod memory;

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use quiver_core::storage::{StorageEngine, StorageError};
use serde::{Deserialize, Serialize};

pub use fjall_engine::{FjallEngine, FjallOptions};
pub use group_commit::{Store, StoreStats};
pub use memory::MemoryEngine;

pub use quiver_core::storage::KvPairs;

/// When a write counts as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The write is acknowledged only after an fsync that started after it was applied has
    /// succeeded: it survives power loss. Concurrent writers share fsyncs (group commit).
    #[default]
    Sync,
    /// The write is acknowledged once applied: it survives a crash of the process (the
    /// engine hands it to the OS) but may be lost on power loss or an OS crash until the next
    /// sync. Replication across nodes is then the main protection.
    Buffered,
}

impl Durability {
    /// The lowercase name used in config files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Sync => "sync",
            Durability::Buffered => "buffered",
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Durability {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Case-insensitive so that `--durability SYNC` is not a pointless error.
        match s.to_ascii_lowercase().as_str() {
            "sync" => Ok(Durability::Sync),
            "buffered" => Ok(Durability::Buffered),
            _ => Err(ParseNameError {
                what: "durability",
                value: s.to_owned(),
                expected: "\"sync\" or \"buffered\"",
            }),
        }
    }
}

/// Which storage engine a node (or a bucket) uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// fjall 3 (LSM tree) on disk: the durable default.
    #[default]
    Fjall,
    /// In-memory `BTreeMap`: nothing survives a restart.
    Memory,
}

impl EngineKind {
    /// The lowercase name used in config files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Fjall => "fjall",
            EngineKind::Memory => "memory",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EngineKind {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "fjall" => Ok(EngineKind::Fjall),
            "memory" => Ok(EngineKind::Memory),
            _ => Err(ParseNameError {
                what: "storage engine",
                value: s.to_owned(),
                expected: "\"fjall\" or \"memory\"",
            }),
        }
    }
}

/// A [`Durability`] or [`EngineKind`] name that is not one of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}; expected {expected}")]
pub struct ParseNameError {
    /// What was being parsed.
    pub what: &'static str,
    /// The rejected input.
    pub value: String,
    /// The accepted spellings.
    pub expected: &'static str,
}

/// Opens the engine of the given kind.
///
/// For [`EngineKind::Fjall`], `dir` is the database directory itself (created if missing) and
/// the engine assumes it owns everything in it, so pass a dedicated directory such as
/// `<data-dir>/fjall`. [`EngineKind::Memory`] ignores `dir`.
pub fn open_engine(kind: EngineKind, dir: &Path) -> Result<Arc<dyn StorageEngine>, StorageError> {
    Ok(match kind {
        EngineKind::Fjall => Arc::new(FjallEngine::open(dir)?),
        EngineKind::Memory => Arc::new(MemoryEngine::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_display_fromstr_and_serde() {
        for d in [Durability::Sync, Durability::Buffered] {
            assert_eq!(d.to_string().parse::<Durability>(), Ok(d));
            let json = serde_json::to_string(&d).expect("serialize durability");
            assert_eq!(json, format!("\"{d}\""));
        }
        for k in [EngineKind::Fjall, EngineKind::Memory] {
            assert_eq!(k.to_string().parse::<EngineKind>(), Ok(k));
            let json = serde_json::to_string(&k).expect("serialize engine kind");
            assert_eq!(json, format!("\"{k}\""));
        }
        assert_eq!("Buffered".parse::<Durability>(), Ok(Durability::Buffered));
        let err = "fsync".parse::<Durability>().expect_err("not a durability");
        assert!(err.to_string().contains("\"fsync\""), "{err}");
        assert_eq!(Durability::default(), Durability::Sync);
        assert_eq!(EngineKind::default(), EngineKind::Fjall);
    }
}
