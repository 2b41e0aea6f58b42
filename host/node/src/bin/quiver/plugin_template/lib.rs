//! {{name}}: a Quiver reconciler plugin.
//!
//! It keeps the greatest value (byte-wise) among the siblings: a simple rule that obeys the
//! merge laws. Replace `merge` with your own rule, keeping it:
//! - commutative: never depend on the order of `siblings`;
//! - associative: merging a merge result with more siblings must equal merging them all;
//! - idempotent: merging a value with itself gives the same value;
//! - deterministic: no clocks, randomness or hash-map iteration order (a reconciler imports
//!   nothing, so clocks and randomness are not even reachable).

wit_bindgen::generate!({ world: "reconciler-plugin", path: "wit" });

use exports::quiver::plugin::reconciler::Guest;
use quiver::plugin::types::{Merged, PluginError, Sibling};

struct Plugin;

impl Guest for Plugin {
    /// Called with every concurrent version of a key (at least one).
    fn merge(siblings: Vec<Sibling>) -> Result<Merged, PluginError> {
        // Deletes lose to values here; delete only when every sibling is a delete.
        let greatest = siblings
            .iter()
            .filter(|s| !s.tombstone)
            .map(|s| &s.value)
            .max()
            .cloned();
        // A value your plugin cannot read should be refused with `invalid-value`, never by
        // panicking: the node then reports a clear error and keeps the siblings.
        Ok(match greatest {
            Some(value) => Merged::Value(value),
            None => Merged::Tombstone,
        })
    }

    /// Server-side operations (e.g. "increment by 3"). Return `unsupported` if you have none.
    fn update(
        _current: Option<Vec<u8>>,
        _op: Vec<u8>,
        _actor: String,
    ) -> Result<Vec<u8>, PluginError> {
        Err(PluginError::Unsupported("{{name}} has no operations".into()))
    }

    /// A few valid values, varied enough for `quiver plugin validate` to exercise `merge`.
    fn examples() -> Vec<Vec<u8>> {
        vec![b"".to_vec(), b"a".to_vec(), b"b".to_vec(), b"ab".to_vec()]
    }
}

export!(Plugin);
