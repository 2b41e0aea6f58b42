//! Last-write-wins: the sibling with the highest `timestamp-ms` wins; ties go to the highest
//! (`actor`, `counter`), so every node picks the same winner. Values are opaque bytes.
//!
//! Clocks of different nodes disagree, so a write can lose to an older one stamped by a node
//! whose clock runs ahead: use this only where that is acceptable.

use quiver_guest::{Guest, Merged, PluginError, Sibling};

struct Lww;

fn order_key(s: &Sibling) -> (u64, &str, u64, bool, &[u8]) {
    (s.timestamp_ms, &s.actor, s.counter, s.tombstone, &s.value)
}

impl Guest for Lww {
    fn merge(siblings: Vec<Sibling>) -> Result<Merged, PluginError> {
        let winner = siblings
            .iter()
            // Two versions never share a dot (actor, counter); comparing the rest as well keeps
            // the result independent of sibling order even for input that breaks that rule.
            .max_by(|a, b| order_key(a).cmp(&order_key(b)))
            .ok_or_else(|| PluginError::InvalidValue("merge needs at least one sibling".into()))?;
        if winner.tombstone {
            Ok(Merged::Tombstone)
        } else {
            Ok(Merged::Value(winner.value.clone()))
        }
    }

    fn update(
        _current: Option<Vec<u8>>,
        _op: Vec<u8>,
        _actor: String,
    ) -> Result<Vec<u8>, PluginError> {
        Err(PluginError::Unsupported(
            "lww has no server-side operations: write the new value instead".into(),
        ))
    }

    fn examples() -> Vec<Vec<u8>> {
        vec![
            Vec::new(),
            b"hello".to_vec(),
            b"{\"json\": true}".to_vec(),
            vec![0, 255, 1, 254],
            vec![b'x'; 300],
        ]
    }
}

quiver_guest::export!(Lww);
