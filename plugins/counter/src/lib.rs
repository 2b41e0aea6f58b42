//! PN-counter: per-actor totals of increments (`p`) and decrements (`n`). The counter's value
//! is `sum(p) - sum(n)`. Merge takes each actor's maximum, which is exact because each actor
//! only ever grows its own entries.
//!
//! State: `{"p":{"actor":n},"n":{"actor":n}}` (u64 totals). Operation: `{"add": i64}`.

use std::collections::BTreeMap;

use quiver_guest::{Guest, Merged, PluginError, Sibling};
use serde::{Deserialize, Serialize};

/// Sorted maps, so equal states are equal bytes on every node.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PnCounter {
    #[serde(default)]
    p: BTreeMap<String, u64>,
    #[serde(default)]
    n: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Op {
    add: i64,
}

fn max_into(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (actor, total) in from {
        let entry = into.entry(actor).or_insert(0);
        *entry = (*entry).max(total);
    }
}

impl PnCounter {
    fn parse(bytes: &[u8]) -> Result<PnCounter, PluginError> {
        serde_json::from_slice(bytes)
            .map_err(|e| PluginError::InvalidValue(format!("counter state is invalid: {e}")))
    }

    fn to_bytes(&mut self) -> Result<Vec<u8>, PluginError> {
        // A zero total carries no information (max with an absent entry is the same), and
        // dropping it makes equal counters equal bytes.
        self.p.retain(|_, v| *v != 0);
        self.n.retain(|_, v| *v != 0);
        serde_json::to_vec(self)
            .map_err(|e| PluginError::InvalidValue(format!("cannot encode counter: {e}")))
    }
}

struct Counter;

impl Guest for Counter {
    fn merge(siblings: Vec<Sibling>) -> Result<Merged, PluginError> {
        let Some(live) = quiver_guest::live(&siblings) else {
            return Ok(Merged::Tombstone);
        };
        let mut merged = PnCounter::default();
        for sibling in live {
            let state = PnCounter::parse(&sibling.value)?;
            max_into(&mut merged.p, state.p);
            max_into(&mut merged.n, state.n);
        }
        Ok(Merged::Value(merged.to_bytes()?))
    }

    fn update(
        current: Option<Vec<u8>>,
        op: Vec<u8>,
        actor: String,
    ) -> Result<Vec<u8>, PluginError> {
        let mut state = match current {
            Some(bytes) => PnCounter::parse(&bytes)?,
            None => PnCounter::default(),
        };
        let op: Op = serde_json::from_slice(&op)
            .map_err(|e| PluginError::InvalidOp(format!("expected {{\"add\": integer}}: {e}")))?;
        let side = if op.add >= 0 {
            &mut state.p
        } else {
            &mut state.n
        };
        let total = side.entry(actor.clone()).or_insert(0);
        *total = total.checked_add(op.add.unsigned_abs()).ok_or_else(|| {
            PluginError::InvalidOp(format!("the total of {actor:?} would overflow u64"))
        })?;
        state.to_bytes()
    }

    fn examples() -> Vec<Vec<u8>> {
        [
            r#"{"p":{},"n":{}}"#,
            r#"{"p":{"n1":3},"n":{}}"#,
            r#"{"p":{"n1":1,"n2":5},"n":{"n2":2}}"#,
            r#"{"p":{"n3":10},"n":{"n1":4}}"#,
            r#"{"p":{"n1":7,"n2":5,"n3":1},"n":{"n1":4,"n2":9}}"#,
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect()
    }
}

quiver_guest::export!(Counter);
