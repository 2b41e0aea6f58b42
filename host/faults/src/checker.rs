//! The checker (Jepsen's set checker, plus availability): compares the history of adds with
//! the final read of every key.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use crate::workload::{Op, Outcome};

/// A fault window as it happened: from the fault's start to the end of its heal.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedWindow {
    /// The fault kind (see [`crate::nemesis::KINDS`]).
    pub kind: String,
    /// The fault, in words.
    pub fault: String,
    /// Start, seconds since the workload started.
    pub start_s: f64,
    /// Heal done, seconds since the workload started.
    pub end_s: f64,
    /// Time from the heal until every node, coordinating a read with r = n, returned every
    /// add acknowledged before the heal; `None` if not before the next fault (or, after the
    /// final heal, within the convergence timeout).
    pub converged_ms: Option<u64>,
}

/// Operations that succeeded out of those started.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Availability {
    /// Operations started.
    pub ops: u64,
    /// Of them, acknowledged.
    pub ok: u64,
    /// ok / ops (1 when there were none).
    pub fraction: f64,
}

impl Availability {
    fn count(&mut self, ok: bool) {
        self.ops += 1;
        self.ok += ok as u64;
        self.fraction = self.ok as f64 / self.ops as f64;
    }
    fn new() -> Self {
        Availability {
            fraction: 1.0,
            ..Availability::default()
        }
    }
}

/// What the checker found.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Adds whose write was sent (acknowledged or not).
    pub attempted: u64,
    /// Acknowledged adds.
    pub acked: u64,
    /// Acknowledged adds absent from the final read (must be 0).
    pub lost: Vec<u64>,
    /// Elements in the final read that no operation attempted (must be 0).
    pub unexpected: Vec<u64>,
    /// Adds not acknowledged yet present in the final read (allowed: indeterminate).
    pub recovered: u64,
    /// Operations started inside fault windows.
    pub inside: Availability,
    /// Operations started outside fault windows.
    pub outside: Availability,
    /// Per window (same order as the schedule).
    pub per_window: Vec<Availability>,
    /// Failed operations by error kind.
    pub errors: BTreeMap<String, u64>,
}

impl Verdict {
    /// True when no acknowledged add was lost and nothing unexpected appeared.
    pub fn valid(&self) -> bool {
        self.lost.is_empty() && self.unexpected.is_empty()
    }
}

/// Checks a history against the final sets (key index → elements).
pub fn check(
    history: &[Op],
    final_sets: &BTreeMap<usize, BTreeSet<u64>>,
    windows: &[AppliedWindow],
) -> Verdict {
    let mut attempted: BTreeMap<u64, usize> = BTreeMap::new();
    let mut acked: BTreeMap<u64, usize> = BTreeMap::new();
    let mut inside = Availability::new();
    let mut outside = Availability::new();
    let mut per_window = vec![Availability::new(); windows.len()];
    let mut errors = BTreeMap::new();
    for op in history {
        let ok = op.outcome == Outcome::Acked;
        match &op.outcome {
            Outcome::Acked => {
                attempted.insert(op.element, op.key);
                acked.insert(op.element, op.key);
            }
            Outcome::WriteFailed(e) => {
                attempted.insert(op.element, op.key);
                *errors.entry(format!("write: {e}")).or_insert(0) += 1;
            }
            Outcome::ReadFailed(e) => {
                *errors.entry(format!("read: {e}")).or_insert(0) += 1;
            }
        }
        let t = op.start.as_secs_f64();
        match windows.iter().position(|w| w.start_s <= t && t < w.end_s) {
            Some(i) => {
                inside.count(ok);
                per_window[i].count(ok);
            }
            None => outside.count(ok),
        }
    }
    let empty = BTreeSet::new();
    let lost = acked
        .iter()
        .filter(|(e, k)| !final_sets.get(k).unwrap_or(&empty).contains(e))
        .map(|(e, _)| *e)
        .collect();
    let mut unexpected = Vec::new();
    let mut recovered = 0;
    for (k, set) in final_sets {
        for e in set {
            match attempted.get(e) {
                Some(key) if key == k => {
                    if !acked.contains_key(e) {
                        recovered += 1;
                    }
                }
                // Never attempted, or attempted on another key.
                _ => unexpected.push(*e),
            }
        }
    }
    Verdict {
        attempted: attempted.len() as u64,
        acked: acked.len() as u64,
        lost,
        unexpected,
        recovered,
        inside,
        outside,
        per_window,
        errors,
    }
}

/// Seconds of a duration, for reports.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: usize, element: u64, start_ms: u64, outcome: Outcome) -> Op {
        Op {
            worker: 0,
            key,
            element,
            start: Duration::from_millis(start_ms),
            end: Duration::from_millis(start_ms + 1),
            outcome,
        }
    }

    #[test]
    fn finds_lost_unexpected_and_recovered_adds() {
        let history = vec![
            op(0, 1, 0, Outcome::Acked),
            op(0, 2, 10, Outcome::Acked),
            op(1, 3, 20, Outcome::WriteFailed("Timeout".into())),
            op(1, 4, 30, Outcome::ReadFailed("Timeout".into())),
        ];
        let mut finals = BTreeMap::new();
        // 2 lost, 3 recovered (indeterminate write that landed), 4 never written, 9 never
        // attempted, 1 on the wrong key.
        finals.insert(0, BTreeSet::from([1]));
        finals.insert(1, BTreeSet::from([1, 3, 4, 9]));
        let v = check(&history, &finals, &[]);
        assert_eq!(v.acked, 2);
        assert_eq!(v.attempted, 3);
        assert_eq!(v.lost, vec![2]);
        assert_eq!(v.unexpected, vec![1, 4, 9]);
        assert_eq!(v.recovered, 1);
        assert!(!v.valid());
    }

    #[test]
    fn splits_availability_by_fault_window() {
        let history = vec![
            op(0, 1, 500, Outcome::Acked),
            op(0, 2, 1500, Outcome::WriteFailed("QuorumFailed".into())),
            op(0, 3, 1600, Outcome::Acked),
            op(0, 4, 2500, Outcome::Acked),
        ];
        let windows = vec![AppliedWindow {
            kind: "pause".into(),
            fault: "pause n1".into(),
            start_s: 1.0,
            end_s: 2.0,
            converged_ms: None,
        }];
        let finals = BTreeMap::from([(0, BTreeSet::from([1, 3, 4]))]);
        let v = check(&history, &finals, &windows);
        assert!(v.valid());
        assert_eq!((v.inside.ok, v.inside.ops), (1, 2));
        assert_eq!((v.outside.ok, v.outside.ops), (2, 2));
        assert_eq!(v.per_window[0].ops, 2);
        assert_eq!(v.errors.get("write: QuorumFailed"), Some(&1));
    }
}
