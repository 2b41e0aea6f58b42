//! Quorum bookkeeping of one replicated request (Dynamo §4.5), as pure state machines.
//!
//! The runtime sends a request to the targets chosen by [`select_targets`], feeds every
//! reply or failure into a [`WriteQuorum`] or [`ReadQuorum`], and answers the client as soon
//! as [`WriteQuorum::status`] / [`ReadQuorum::status`] is decided. Late replies are still fed
//! in: a read keeps merging them so read repair sees every stale replica.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::causality::Object;

/// Replication parameters of one request, after bucket defaults and per-request overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quorum {
    /// Replicas per key.
    pub n: usize,
    /// Replies a read needs.
    pub r: usize,
    /// Acknowledgements a write needs.
    pub w: usize,
}

/// Largest replication factor accepted.
pub const N_MAX: usize = 16;

/// Why a quorum setting is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuorumError {
    /// A parameter is out of range.
    #[error("invalid quorum n={n} r={r} w={w}: {why}")]
    Invalid {
        /// Replicas.
        n: usize,
        /// Read quorum.
        r: usize,
        /// Write quorum.
        w: usize,
        /// Which rule is broken.
        why: &'static str,
    },
}

impl Quorum {
    /// Checks `1 <= r, w <= n <= N_MAX`.
    pub fn new(n: usize, r: usize, w: usize) -> Result<Quorum, QuorumError> {
        let err = |why| Err(QuorumError::Invalid { n, r, w, why });
        if n == 0 || n > N_MAX {
            return err("n must be between 1 and 16");
        }
        if r == 0 || r > n {
            return err("r must be between 1 and n");
        }
        if w == 0 || w > n {
            return err("w must be between 1 and n");
        }
        Ok(Quorum { n, r, w })
    }
}

/// One replica a request goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Node that receives the request.
    pub node: String,
    /// For a fallback standing in for an unreachable primary: that primary. The fallback
    /// keeps the data under a hint and hands it over when the primary is back.
    pub hint_for: Option<String>,
}

/// Picks the replicas of a request from a preference list (Dynamo §4.6, sloppy quorum).
///
/// Every reachable primary is a target. With `sloppy`, each unreachable primary is replaced
/// by the next reachable fallback, which holds a hint for it; without, unreachable primaries
/// are simply missing and the quorum may fail. The result has at most `primaries.len()`
/// targets and never repeats a node.
pub fn select_targets(
    primaries: &[&str],
    fallbacks: &[&str],
    is_up: impl Fn(&str) -> bool,
    sloppy: bool,
) -> Vec<Target> {
    let mut targets: Vec<Target> = Vec::with_capacity(primaries.len());
    let mut spare = fallbacks.iter().copied().filter(|f| is_up(f));
    for &p in primaries {
        if is_up(p) {
            targets.push(Target {
                node: p.to_string(),
                hint_for: None,
            });
        } else if sloppy && let Some(f) = spare.next() {
            targets.push(Target {
                node: f.to_string(),
                hint_for: Some(p.to_string()),
            });
        }
    }
    targets
}

/// Where a quorum stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status<T> {
    /// Not decided: more replies may come.
    Pending,
    /// Enough replies.
    Reached(T),
    /// Too many failures: the quorum can no longer be reached.
    Failed(QuorumFailure),
}

/// What a failed quorum reports: how many replicas answered and which failed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumFailure {
    /// Successful replies needed.
    pub needed: usize,
    /// Successful replies received.
    pub succeeded: Vec<String>,
    /// Replicas that failed, with the reason.
    pub failed: Vec<(String, String)>,
    /// Replicas asked that had not answered when the quorum became unreachable.
    #[serde(default)]
    pub pending: Vec<String>,
    /// Replicas of the preference list that were not even tried (known down, no fallback).
    pub unavailable: usize,
}

impl std::fmt::Display for QuorumFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} needed replicas answered",
            self.succeeded.len(),
            self.needed
        )?;
        if !self.succeeded.is_empty() {
            write!(f, " ({})", self.succeeded.join(", "))?;
        }
        for (node, why) in &self.failed {
            write!(f, "; {node} failed: {why}")?;
        }
        if !self.pending.is_empty() {
            write!(f, "; no answer yet from {}", self.pending.join(", "))?;
        }
        if self.unavailable > 0 {
            write!(f, "; {} replica(s) unavailable", self.unavailable)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Tally {
    needed: usize,
    pending: Vec<String>,
    succeeded: Vec<String>,
    failed: Vec<(String, String)>,
    unavailable: usize,
}

impl Tally {
    fn new(targets: &[Target], needed: usize, preference_size: usize) -> Self {
        Tally {
            needed,
            pending: targets.iter().map(|t| t.node.clone()).collect(),
            succeeded: Vec::new(),
            failed: Vec::new(),
            unavailable: preference_size.saturating_sub(targets.len()),
        }
    }

    /// Removes `node` from the pending set; false if it was not pending (duplicate or
    /// unknown reply, which must not count twice).
    fn take_pending(&mut self, node: &str) -> bool {
        match self.pending.iter().position(|p| p == node) {
            Some(i) => {
                self.pending.swap_remove(i);
                true
            }
            None => false,
        }
    }

    fn decided(&self) -> Option<Result<(), QuorumFailure>> {
        if self.succeeded.len() >= self.needed {
            return Some(Ok(()));
        }
        if self.succeeded.len() + self.pending.len() < self.needed {
            return Some(Err(QuorumFailure {
                needed: self.needed,
                succeeded: self.succeeded.clone(),
                failed: self.failed.clone(),
                pending: self.pending.clone(),
                unavailable: self.unavailable,
            }));
        }
        None
    }
}

/// A write's progress towards `w` acknowledgements.
#[derive(Debug, Clone)]
pub struct WriteQuorum {
    tally: Tally,
}

impl WriteQuorum {
    /// Starts tracking a write sent to `targets`, out of a preference list of `n` replicas.
    pub fn new(targets: &[Target], w: usize, n: usize) -> Self {
        WriteQuorum {
            tally: Tally::new(targets, w, n),
        }
    }

    /// A replacement target joined the write (a fallback standing in for a target that
    /// failed, Dynamo §4.6). A node already asked is not added twice.
    pub fn add_target(&mut self, node: &str) {
        let t = &mut self.tally;
        let known = t.pending.iter().chain(&t.succeeded).any(|n| n == node)
            || t.failed.iter().any(|(n, _)| n == node);
        if !known {
            t.pending.push(node.to_string());
        }
    }

    /// A replica acknowledged (durably, per its durability setting).
    pub fn on_ack(&mut self, node: &str) {
        if self.tally.take_pending(node) {
            self.tally.succeeded.push(node.to_string());
        }
    }

    /// A replica failed or timed out.
    pub fn on_failure(&mut self, node: &str, reason: impl Into<String>) {
        if self.tally.take_pending(node) {
            self.tally.failed.push((node.to_string(), reason.into()));
        }
    }

    /// Decided once `w` acks arrived, or once too few replicas are left to reach `w`.
    pub fn status(&self) -> Status<()> {
        match self.tally.decided() {
            None => Status::Pending,
            Some(Ok(())) => Status::Reached(()),
            Some(Err(f)) => Status::Failed(f),
        }
    }

    /// Replicas that have not answered yet.
    pub fn pending(&self) -> &[String] {
        &self.tally.pending
    }
}

/// A read's progress towards `r` replies, merging every reply it sees.
#[derive(Debug, Clone)]
pub struct ReadQuorum {
    tally: Tally,
    replies: BTreeMap<String, Object>,
    merged: Object,
}

impl ReadQuorum {
    /// Starts tracking a read sent to `targets`, out of a preference list of `n` replicas.
    pub fn new(targets: &[Target], r: usize, n: usize) -> Self {
        ReadQuorum {
            tally: Tally::new(targets, r, n),
            replies: BTreeMap::new(),
            merged: Object::new(),
        }
    }

    /// A replica answered with its state of the key (empty object if it holds nothing).
    pub fn on_reply(&mut self, node: &str, object: Object) {
        if self.tally.take_pending(node) {
            self.tally.succeeded.push(node.to_string());
            self.merged = self.merged.merge(&object);
            self.replies.insert(node.to_string(), object);
        }
    }

    /// A replica failed or timed out.
    pub fn on_failure(&mut self, node: &str, reason: impl Into<String>) {
        if self.tally.take_pending(node) {
            self.tally.failed.push((node.to_string(), reason.into()));
        }
    }

    /// Decided once `r` replies arrived (with their merge), or once too few are left.
    pub fn status(&self) -> Status<&Object> {
        match self.tally.decided() {
            None => Status::Pending,
            Some(Ok(())) => Status::Reached(&self.merged),
            Some(Err(f)) => Status::Failed(f),
        }
    }

    /// The merge of every reply so far.
    pub fn merged(&self) -> &Object {
        &self.merged
    }

    /// Replicas that have not answered yet.
    pub fn pending(&self) -> &[String] {
        &self.tally.pending
    }

    /// Read repair (Dynamo §4.5): replicas whose reply lacks something the merge has. Each
    /// should receive the merged object; merging it in brings it up to date and can never
    /// drop anything it holds that the merge lacks.
    pub fn stale_replicas(&self) -> Vec<&str> {
        self.replies
            .iter()
            .filter(|(_, o)| *o != &self.merged)
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causality::{Coordinator, EpochSource, VersionVector, WriteOp, coordinate_write};

    fn t(nodes: &[&str]) -> Vec<Target> {
        nodes
            .iter()
            .map(|n| Target {
                node: n.to_string(),
                hint_for: None,
            })
            .collect()
    }

    // Found by the fault suite: "1 of 3 needed replicas answered (n3); 1 replica(s)
    // unavailable" left the third replica unaccounted for. It had not answered yet.
    #[test]
    fn a_failed_quorum_accounts_for_every_replica() {
        let mut q = WriteQuorum::new(&t(&["a", "b", "c"]), 3, 4);
        q.on_ack("a");
        q.on_failure("b", "timeout");
        let Status::Failed(f) = q.status() else {
            panic!("3 of 3 can no longer be reached");
        };
        assert_eq!(f.pending, vec!["c".to_string()]);
        assert_eq!(
            f.to_string(),
            "1 of 3 needed replicas answered (a); b failed: timeout; no answer yet from c; \
             1 replica(s) unavailable"
        );
    }

    #[test]
    fn quorum_parameters_are_validated() {
        for (n, r, w, ok) in [
            (3, 2, 2, true),
            (1, 1, 1, true),
            (3, 3, 1, true),
            (0, 1, 1, false),
            (3, 4, 2, false),
            (3, 2, 0, false),
            (17, 1, 1, false),
        ] {
            assert_eq!(Quorum::new(n, r, w).is_ok(), ok, "n={n} r={r} w={w}");
        }
    }

    // Dynamo §4.6: a sloppy quorum replaces each unreachable primary by the next reachable
    // fallback, which holds a hint naming the primary.
    #[test]
    fn targets_table() {
        let down = |d: &'static [&'static str]| move |n: &str| !d.contains(&n);
        type Case = (
            &'static [&'static str],
            bool,
            Vec<(&'static str, Option<&'static str>)>,
        );
        let cases: Vec<Case> = vec![
            (&[], true, vec![("a", None), ("b", None), ("c", None)]),
            (
                &["b"],
                true,
                vec![("a", None), ("d", Some("b")), ("c", None)],
            ),
            (&["b"], false, vec![("a", None), ("c", None)]),
            (
                &["a", "b"],
                true,
                vec![("d", Some("a")), ("e", Some("b")), ("c", None)],
            ),
            (
                &["a", "d"],
                true,
                vec![("e", Some("a")), ("b", None), ("c", None)],
            ),
            (&["a", "b", "c", "d", "e"], true, vec![]),
        ];
        for (downed, sloppy, want) in cases {
            let got = select_targets(&["a", "b", "c"], &["d", "e"], down(downed), sloppy);
            let got: Vec<_> = got
                .iter()
                .map(|t| (t.node.as_str(), t.hint_for.as_deref()))
                .collect();
            assert_eq!(got, want, "down {downed:?} sloppy {sloppy}");
        }
    }

    #[test]
    fn write_quorum_succeeds_at_w_and_fails_when_unreachable() {
        let mut q = WriteQuorum::new(&t(&["a", "b", "c"]), 2, 3);
        assert_eq!(q.status(), Status::Pending);
        q.on_ack("a");
        q.on_ack("a"); // duplicates do not count twice
        assert_eq!(q.status(), Status::Pending);
        q.on_ack("c");
        assert_eq!(q.status(), Status::Reached(()));

        let mut q = WriteQuorum::new(&t(&["a", "b", "c"]), 2, 3);
        q.on_failure("a", "timeout");
        assert_eq!(q.status(), Status::Pending);
        q.on_failure("b", "refused");
        match q.status() {
            Status::Failed(f) => {
                assert_eq!((f.needed, f.succeeded.len(), f.failed.len()), (2, 0, 2));
                assert!(f.to_string().contains("0 of 2 needed replicas answered"));
            }
            other => panic!("{other:?}"),
        }
        // Only one target reachable out of three: W=2 fails at once, naming the gap.
        let q = WriteQuorum::new(&t(&["a"]), 2, 3);
        match q.status() {
            Status::Failed(f) => assert_eq!(f.unavailable, 2),
            other => panic!("{other:?}"),
        }
        // A fallback replacing a failed target can still complete the quorum.
        let mut q = WriteQuorum::new(&t(&["a", "b"]), 2, 2);
        q.on_ack("a");
        q.on_failure("b", "timeout");
        assert!(matches!(q.status(), Status::Failed(_)));
        let mut q = WriteQuorum::new(&t(&["a", "b"]), 2, 2);
        q.on_ack("a");
        q.add_target("c");
        q.on_failure("b", "timeout");
        assert_eq!(q.status(), Status::Pending);
        q.add_target("a"); // already asked: ignored
        q.on_ack("c");
        assert_eq!(q.status(), Status::Reached(()));
        // Replies from nodes that were never asked are ignored.
        let mut q = WriteQuorum::new(&t(&["a"]), 1, 1);
        q.on_ack("z");
        assert_eq!(q.status(), Status::Pending);
    }

    struct Epochs(u64);
    impl EpochSource for Epochs {
        fn is_trusted(&self, e: u64) -> bool {
            e < self.0
        }
        fn fresh(&mut self) -> u64 {
            self.0 += 1;
            self.0 - 1
        }
    }

    #[test]
    fn read_quorum_merges_replies_and_names_stale_replicas() {
        let me = Coordinator {
            node: "a".into(),
            incarnation: 1,
        };
        let mut e = Epochs(1);
        let v1 = coordinate_write(
            None,
            &me,
            &mut e,
            &VersionVector::new(),
            WriteOp::Put(b"1".to_vec()),
            1,
        )
        .0;
        let ctx = v1.object.context().clone();
        let v2 = coordinate_write(
            Some(v1.clone()),
            &me,
            &mut e,
            &ctx,
            WriteOp::Put(b"2".to_vec()),
            2,
        )
        .0;

        let mut q = ReadQuorum::new(&t(&["a", "b", "c"]), 2, 3);
        q.on_reply("b", v1.object.clone());
        assert_eq!(q.status(), Status::Pending);
        q.on_reply("a", v2.object.clone());
        match q.status() {
            Status::Reached(o) => assert_eq!(o, &v2.object),
            other => panic!("{other:?}"),
        }
        // A late empty reply is merged too and counts as stale.
        q.on_reply("c", Object::new());
        let mut stale = q.stale_replicas();
        stale.sort();
        assert_eq!(stale, vec!["b", "c"]);
    }
}
