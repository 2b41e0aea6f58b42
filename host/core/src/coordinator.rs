//! The coordinator's side of replicated requests, as sans-IO state machines shared by the
//! node runtime (`quiver-node`'s `cluster.rs`) and the simulator (`quiver-sim`).
//!
//! A driver owns the I/O: it sends what a machine asks for, feeds every reply, failure and
//! timeout back in, and answers the client when the machine reports a decision. Everything
//! that decides — who coordinates a write, which replica stands in for a failed one, when a
//! quorum is reached or lost, which replicas a read repairs, when a peer counts as down and
//! when to probe it — is decided here, so the simulator exercises exactly the production
//! rules under faults.
//!
//! - [`route_write`]: coordinate a write here, or forward it to a replica ([`Forwarding`]).
//! - [`PutFanout`]: a put after the coordinator applied it locally: stores to the other
//!   targets, fallbacks with hints for failed ones (also after the answer), the W decision.
//! - [`ReadFanout`]: a get: fetches, the R decision with the merge, then read repair.
//! - [`FailureDetector`]: the local failure detector with exponential probe backoff.

use std::collections::{BTreeMap, VecDeque};

use crate::causality::Object;
use crate::quorum::{QuorumFailure, ReadQuorum, Status, Target, WriteQuorum};

/// Shortest wait before probing a peer that just went down, in ms.
pub const PROBE_BACKOFF_MIN_MS: u64 = 200;
/// Longest wait between two probes of a peer that stays down, in ms. It bounds how long a
/// healed peer can stay down here (the fault suite measured heals of up to 6 s with 5 s);
/// a probe is one small request, so a dead peer costs one a second.
pub const PROBE_BACKOFF_MAX_MS: u64 = 1_000;
/// How long a probe may stay out without an outcome before the peer is due again, in ms.
pub const PROBE_OUTSTANDING_MAX_MS: u64 = 5_000;

/// What a node does with a client write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteRoute {
    /// Coordinate the write here, as this target (a replica, or a fallback chosen by the
    /// node that forwarded the write). `others` says whether any other target exists.
    Coordinate {
        /// This node's target, with the hint it keeps when it stands in for a primary.
        me: Target,
        /// Whether the write goes to other replicas too.
        others: bool,
    },
    /// This node holds no replica of the key: hand the write to one that does.
    Forward,
}

impl WriteRoute {
    /// Whether the coordinator's own copy must be durable before it is applied. With other
    /// replicas its fsync runs alongside theirs instead (the copy counts towards W once
    /// durable, see [`PutFanout::start`]); alone it syncs first. A crash between applying and
    /// syncing cannot reissue the dot: the next boot never continues an earlier boot's epoch.
    pub fn sync_before_fanout(&self, sync: bool) -> bool {
        matches!(self, WriteRoute::Coordinate { others: false, .. }) && sync
    }
}

/// Decides who coordinates a client write. The coordinator must be a replica, so that the
/// per-key actor-epoch rule of [`crate::causality`] holds for every write (Riak forwards
/// the same way). `forwarded` is `Some(hint_for)` when another node forwarded the write
/// here, naming the primary this node stands in for as a fallback.
pub fn route_write(me: &str, targets: &[Target], forwarded: Option<Option<String>>) -> WriteRoute {
    let others = targets.iter().any(|t| t.node != me);
    match (forwarded, targets.iter().find(|t| t.node == me)) {
        (_, Some(t)) => WriteRoute::Coordinate {
            me: t.clone(),
            others,
        },
        // Forwarded here as a fallback: the forwarder saw primaries down that this node may
        // still believe up. Coordinate as it decided.
        (Some(hint_for), None) => WriteRoute::Coordinate {
            me: Target {
                node: me.to_string(),
                hint_for,
            },
            others,
        },
        (None, None) => WriteRoute::Forward,
    }
}

/// A write handed from a non-replica to the targets of its key, one at a time, until one
/// coordinates it.
#[derive(Debug, Clone)]
pub struct Forwarding {
    targets: VecDeque<Target>,
    failed: Vec<(String, String)>,
    w: usize,
    n: usize,
}

impl Forwarding {
    /// Starts forwarding to `targets` (in preference order) a write needing `w` of `n`.
    pub fn new(targets: &[Target], w: usize, n: usize) -> Self {
        Forwarding {
            targets: targets.iter().cloned().collect(),
            failed: Vec::new(),
            w,
            n,
        }
    }

    /// The next target to try, or `None` once every target failed (then answer with
    /// [`Forwarding::failure`]).
    pub fn next_target(&mut self) -> Option<Target> {
        self.targets.pop_front()
    }

    /// The last target returned by [`Forwarding::next_target`] failed.
    pub fn on_failure(&mut self, node: &str, reason: impl Into<String>) {
        self.failed.push((node.to_string(), reason.into()));
    }

    /// Why no replica coordinated the write.
    pub fn failure(&self) -> QuorumFailure {
        QuorumFailure {
            needed: self.w,
            succeeded: Vec::new(),
            failed: self.failed.clone(),
            pending: Vec::new(),
            unavailable: self
                .n
                .saturating_sub(self.failed.len() + self.targets.len()),
        }
    }
}

/// One put after the coordinator applied it locally: the stores to the other targets, the
/// fallbacks that replace failed ones, and the W decision.
///
/// Fallbacks not yet used replace a target that fails, holding a hint for the replica they
/// stand in for (Dynamo §4.6). This goes on after the decision, so a replica that fails late
/// still gets its copy through a hint instead of waiting for a read to repair it; a driver
/// keeps feeding results until [`PutFanout::is_finished`].
#[derive(Debug, Clone)]
pub struct PutFanout {
    me: Target,
    write: WriteQuorum,
    spare: VecDeque<String>,
    sloppy: bool,
    decided: bool,
}

impl PutFanout {
    /// Starts the fan-out of a write coordinated by `me` to `targets` (which may include
    /// `me`), needing `w` acks out of a preference list of `n` with these `fallbacks`.
    /// With `local_sync_pending` the local copy counts only after
    /// [`PutFanout::on_local_synced`]; otherwise it counts at once. Returns the machine and
    /// the stores to send now.
    pub fn start(
        me: &Target,
        targets: &[Target],
        fallbacks: &[String],
        w: usize,
        n: usize,
        sloppy: bool,
        local_sync_pending: bool,
    ) -> (PutFanout, Vec<Target>) {
        let mut all = vec![me.clone()];
        all.extend(targets.iter().filter(|t| t.node != me.node).cloned());
        let mut write = WriteQuorum::new(&all, w, n);
        if !local_sync_pending {
            write.on_ack(&me.node);
        }
        let spare = fallbacks
            .iter()
            .filter(|f| !all.iter().any(|t| &t.node == *f))
            .cloned()
            .collect();
        let stores = all.split_off(1);
        let fanout = PutFanout {
            me: me.clone(),
            write,
            spare,
            sloppy,
            decided: false,
        };
        (fanout, stores)
    }

    /// The coordinator's own fsync finished. A failed one is treated like a failed store:
    /// the returned fallback (if any) takes a copy with a hint for this node.
    pub fn on_local_synced(
        &mut self,
        result: Result<(), String>,
        is_up: impl Fn(&str) -> bool,
    ) -> Option<Target> {
        let me = self.me.clone();
        self.on_store_result(&me, result, is_up)
    }

    /// A store to `target` answered. On a failure with sloppy quorum, returns the store to
    /// send next: the first unused fallback that `is_up`, holding a hint for the replica the
    /// failed target stood for (fallbacks found down are used up, as they would fail too).
    pub fn on_store_result(
        &mut self,
        target: &Target,
        result: Result<(), String>,
        is_up: impl Fn(&str) -> bool,
    ) -> Option<Target> {
        match result {
            Ok(()) => {
                self.write.on_ack(&target.node);
                None
            }
            Err(e) => {
                let mut replacement = None;
                if self.sloppy {
                    while let Some(fallback) = self.spare.pop_front() {
                        if is_up(&fallback) {
                            self.write.add_target(&fallback);
                            replacement = Some(Target {
                                node: fallback,
                                hint_for: target.hint_for.clone().or(Some(target.node.clone())),
                            });
                            break;
                        }
                    }
                }
                self.write.on_failure(&target.node, e);
                replacement
            }
        }
    }

    /// The decision, reported exactly once: `Reached` after W acks, `Failed` (with counts
    /// and failed nodes) once W can no longer be reached.
    pub fn decision(&mut self) -> Option<Status<()>> {
        if self.decided {
            return None;
        }
        match self.write.status() {
            Status::Pending => None,
            decided => {
                self.decided = true;
                Some(decided)
            }
        }
    }

    /// Every store (and the local fsync) has answered: nothing more will be sent.
    pub fn is_finished(&self) -> bool {
        self.write.pending().is_empty()
    }
}

/// One stale replica to bring up to date after a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// Who receives the merged object, with the hint it keeps if it is a fallback.
    pub target: Target,
}

/// Which replicas a get asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSpread {
    /// Every target (Riak's and Dynamo's read): read repair sees every replica.
    All,
    /// Only R targets, the coordinator's own copy first; a spare replaces each one that
    /// fails (Cassandra's read). A quorum read still overlaps every write quorum (R + W > N);
    /// the replicas not asked are kept in step by hinted handoff, anti-entropy and the share
    /// of reads that ask all.
    Quorum,
}

impl ReadSpread {
    /// The spread of the `index`-th read of a node that asks every replica on
    /// `full_per_mille` of every thousand reads (values above 1000 count as 1000): exactly
    /// `floor((index + 1) * full_per_mille / 1000)` of the first `index + 1` reads are full
    /// ones, spaced evenly. Counting instead of drawing keeps the simulator deterministic
    /// and the share exact under any load.
    pub fn for_read(index: u64, full_per_mille: u32) -> ReadSpread {
        let per_mille = u128::from(full_per_mille.min(1000));
        let before = u128::from(index) * per_mille / 1000;
        let after = (u128::from(index) + 1) * per_mille / 1000;
        if after > before {
            ReadSpread::All
        } else {
            ReadSpread::Quorum
        }
    }
}

/// One get: fetches from the targets, the R decision with the merge of the replies, then
/// read repair once every asked target answered (Dynamo §4.5).
#[derive(Debug, Clone)]
pub struct ReadFanout {
    read: ReadQuorum,
    targets: Vec<Target>,
    /// Targets not asked yet, in the order they stand in for failed ones.
    spares: VecDeque<Target>,
    decided: bool,
    failed: bool,
}

impl ReadFanout {
    /// Starts a read of `targets` needing `r` replies out of a preference list of `n`.
    /// Returns the machine and the remote targets to fetch from; when `me` is a target, the
    /// driver reads locally and feeds that reply first.
    ///
    /// With [`ReadSpread::Quorum`] only R targets are asked: `me` if it is one, then other
    /// primaries before fallbacks; `rotate` (any counter) rotates which primaries come first,
    /// so that the reads of a hot key spread over its replicas. The others are spares: each
    /// failed reply hands one out ([`ReadFanout::on_reply`]).
    pub fn start(
        me: &str,
        targets: &[Target],
        r: usize,
        n: usize,
        spread: ReadSpread,
        rotate: u64,
    ) -> (ReadFanout, Vec<Target>) {
        let mut others: Vec<Target> = targets.iter().filter(|t| t.node != me).cloned().collect();
        let mut spares = VecDeque::new();
        if spread == ReadSpread::Quorum {
            // Fallbacks go behind the primaries: they hold only what was written while a
            // primary was down. The sort is stable, so each group keeps the list's order.
            others.sort_by_key(|t| t.hint_for.is_some());
            let primaries = others.iter().filter(|t| t.hint_for.is_none()).count();
            if primaries > 1 {
                let by = usize::try_from(rotate % primaries as u64).unwrap_or(0);
                others[..primaries].rotate_left(by);
            }
            let local = usize::from(others.len() < targets.len());
            let asked = r.saturating_sub(local).min(others.len());
            spares = others.split_off(asked).into();
        }
        let fanout = ReadFanout {
            read: ReadQuorum::new(targets, r, n),
            targets: targets.to_vec(),
            spares,
            decided: false,
            failed: false,
        };
        (fanout, others)
    }

    /// A replica answered with its object, or failed. After a failure of an asked target,
    /// returns the spare to fetch from in its place, if one is left.
    #[must_use = "a returned spare must be fetched, or the read may wait for it forever"]
    pub fn on_reply(&mut self, node: &str, result: Result<Object, String>) -> Option<Target> {
        if self.spares.iter().any(|t| t.node == node) {
            // Not asked (a stray or duplicated message): it must not count.
            return None;
        }
        match result {
            Ok(o) => {
                self.read.on_reply(node, o);
                None
            }
            Err(e) => {
                let asked = self.read.pending().iter().any(|p| p == node);
                self.read.on_failure(node, e);
                // Once decided, a failure needs no stand-in.
                if asked && self.undecided() {
                    self.spares.pop_front()
                } else {
                    None
                }
            }
        }
    }

    /// The read is still short of R replies after the driver's speculation delay: the next
    /// spare to ask as well, if one is left (Cassandra's speculative retry). It spares a
    /// read the full peer timeout when an asked replica is alive but slow or paused.
    #[must_use = "a returned spare must be fetched, or the read may wait for it forever"]
    pub fn speculate(&mut self) -> Option<Target> {
        if !self.undecided() {
            return None;
        }
        self.spares.pop_front()
    }

    /// Neither reported nor reached: a spare may still be needed.
    fn undecided(&self) -> bool {
        !self.decided && matches!(self.read.status(), Status::Pending)
    }

    /// Whether a spare is left to ask.
    pub fn has_spares(&self) -> bool {
        !self.spares.is_empty()
    }

    /// The decision, reported exactly once: the merge of R replies, or why R was missed.
    pub fn decision(&mut self) -> Option<Status<Object>> {
        if self.decided {
            return None;
        }
        match self.read.status() {
            Status::Pending => None,
            Status::Reached(merged) => {
                self.decided = true;
                Some(Status::Reached(merged.clone()))
            }
            Status::Failed(f) => {
                self.decided = true;
                self.failed = true;
                Some(Status::Failed(f))
            }
        }
    }

    /// Nothing more to wait for: every asked target answered, or the read failed (a failed
    /// read repairs nothing: it has no trustworthy merge to spread).
    pub fn is_finished(&self) -> bool {
        self.failed || self.read.pending().len() == self.spares.len()
    }

    /// The merge of every reply so far.
    pub fn merged(&self) -> &Object {
        self.read.merged()
    }

    /// Once finished: the replicas whose reply lacked something the merge has. Each gets the
    /// merged object (merging it in can never drop anything the replica holds).
    pub fn repairs(&self) -> Vec<Repair> {
        if !self.is_finished() || self.failed {
            return Vec::new();
        }
        self.read
            .stale_replicas()
            .into_iter()
            .filter_map(|node| self.targets.iter().find(|t| t.node == node))
            .map(|t| Repair { target: t.clone() })
            .collect()
    }
}

#[derive(Debug, Clone)]
struct Health {
    down: bool,
    /// A probe is out and its outcome not fed back yet.
    probing: bool,
    /// When the probe that is out was sent.
    probe_sent_ms: u64,
    /// The peer sent this node a request after the probe that is out was sent.
    heard_while_probing: bool,
    next_probe_ms: u64,
    backoff_ms: u64,
    last_success_ms: Option<u64>,
}

/// The local failure detector: a peer whose request fails (transport error, timeout) is down
/// for routing until a probe answers; probes back off exponentially from
/// [`PROBE_BACKOFF_MIN_MS`] to [`PROBE_BACKOFF_MAX_MS`]. A typed refusal proves a peer up.
/// Times are milliseconds on any monotonic clock the driver chooses.
#[derive(Debug, Clone, Default)]
pub struct FailureDetector {
    peers: BTreeMap<String, Health>,
}

impl FailureDetector {
    /// A detector that believes every peer up.
    pub fn new() -> Self {
        FailureDetector::default()
    }

    /// Whether requests should go to `node` (unknown nodes are up).
    pub fn is_up(&self, node: &str) -> bool {
        self.peers.get(node).is_none_or(|h| !h.down)
    }

    /// Peers currently believed down, in name order.
    pub fn down(&self) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(_, h)| h.down)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// `node` answered (with a reply or a typed error) at `now_ms`. True if it was down.
    pub fn on_success(&mut self, node: &str, now_ms: u64) -> bool {
        let h = self.entry(node);
        h.last_success_ms = Some(now_ms);
        h.probing = false;
        std::mem::replace(&mut h.down, false)
    }

    /// A request to `node` started at `started_ms` failed at `now_ms`. A success after the
    /// request started proves the peer up (a request that timed out while the peer
    /// restarted must not undo the probe that found it back), so such a failure is ignored.
    /// True if this marked the peer down.
    pub fn on_failure(&mut self, node: &str, started_ms: u64, now_ms: u64) -> bool {
        let h = self.entry(node);
        if h.last_success_ms.is_some_and(|t| t > started_ms) {
            return false;
        }
        let heard = h.probing && std::mem::take(&mut h.heard_while_probing);
        h.probing = false;
        let newly = !h.down;
        if newly {
            h.down = true;
            h.backoff_ms = PROBE_BACKOFF_MIN_MS;
        } else if heard {
            // It was heard from after the probe went out, so the probe may have been lost
            // to a cut that has healed since: the next one goes at once.
            h.backoff_ms = PROBE_BACKOFF_MIN_MS;
            h.next_probe_ms = now_ms;
            return false;
        } else {
            h.backoff_ms = (h.backoff_ms.saturating_mul(2)).min(PROBE_BACKOFF_MAX_MS);
        }
        h.next_probe_ms = now_ms.saturating_add(h.backoff_ms);
        newly
    }

    /// `node` sent this node a request at `now_ms`: it is alive, though requests the other
    /// way may still fail (a one-way cut), so it is not marked up; its next probe is brought
    /// forward to now instead, which checks this direction. Without it a healed peer stayed
    /// down here until its backed-off probe came round, up to [`PROBE_BACKOFF_MAX_MS`]
    /// after the heal (a fault-suite finding). While a probe is out, a request heard after
    /// it was sent makes its failure send the next probe at once rather than after the
    /// backoff (the probe may have been lost just before a heal). True when a probe was
    /// brought forward.
    pub fn on_heard_from(&mut self, node: &str, now_ms: u64) -> bool {
        let Some(h) = self.peers.get_mut(node) else {
            return false;
        };
        if h.down && h.probing && now_ms > h.probe_sent_ms {
            h.heard_while_probing = true;
        }
        if !h.down || h.probing || h.next_probe_ms <= now_ms {
            return false;
        }
        h.next_probe_ms = now_ms;
        h.backoff_ms = PROBE_BACKOFF_MIN_MS;
        true
    }

    /// When the next probe falls due (the earliest of the down peers'), if any is down.
    pub fn next_probe_ms(&self) -> Option<u64> {
        self.peers
            .values()
            .filter(|h| h.down)
            .map(|h| h.next_probe_ms)
            .min()
    }

    /// Down peers whose probe is due at `now_ms`. Each is not due again until its probe's
    /// outcome is fed back (a failure pushes the backoff, a success marks it up) or, if the
    /// probe is lost without an outcome, until [`PROBE_OUTSTANDING_MAX_MS`] passed.
    pub fn due_probes(&mut self, now_ms: u64) -> Vec<String> {
        let mut due = Vec::new();
        for (node, h) in &mut self.peers {
            if h.down && h.next_probe_ms <= now_ms {
                h.next_probe_ms = now_ms.saturating_add(PROBE_OUTSTANDING_MAX_MS);
                h.probing = true;
                h.probe_sent_ms = now_ms;
                h.heard_while_probing = false;
                due.push(node.clone());
            }
        }
        due
    }

    fn entry(&mut self, node: &str) -> &mut Health {
        self.peers.entry(node.to_string()).or_insert(Health {
            down: false,
            probing: false,
            probe_sent_ms: 0,
            heard_while_probing: false,
            next_probe_ms: 0,
            backoff_ms: PROBE_BACKOFF_MIN_MS,
            last_success_ms: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causality::{Coordinator, EpochSource, VersionVector, WriteOp, coordinate_write};

    fn t(node: &str) -> Target {
        Target {
            node: node.to_string(),
            hint_for: None,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_replica_coordinates_and_a_non_replica_forwards() {
        let targets = vec![t("a"), t("b"), t("c")];
        assert_eq!(
            route_write("b", &targets, None),
            WriteRoute::Coordinate {
                me: t("b"),
                others: true
            }
        );
        assert_eq!(route_write("d", &targets, None), WriteRoute::Forward);
        let as_fallback = route_write("d", &targets, Some(Some("a".into())));
        assert_eq!(
            as_fallback,
            WriteRoute::Coordinate {
                me: Target {
                    node: "d".into(),
                    hint_for: Some("a".into())
                },
                others: true
            }
        );
        let alone = route_write("a", &[t("a")], None);
        assert!(alone.sync_before_fanout(true));
        assert!(!alone.sync_before_fanout(false));
        assert!(!route_write("a", &targets, None).sync_before_fanout(true));
    }

    #[test]
    fn forwarding_tries_each_target_then_reports_every_failure() {
        let mut f = Forwarding::new(&[t("a"), t("b")], 2, 3);
        assert_eq!(f.next_target().map(|t| t.node), Some("a".into()));
        f.on_failure("a", "timeout");
        assert_eq!(f.next_target().map(|t| t.node), Some("b".into()));
        f.on_failure("b", "refused");
        assert_eq!(f.next_target(), None);
        let failure = f.failure();
        assert_eq!(failure.failed.len(), 2);
        assert_eq!(failure.unavailable, 1);
        assert_eq!(failure.needed, 2);
    }

    #[test]
    fn a_put_is_decided_after_w_acks_and_finishes_after_every_store() {
        let (mut put, stores) =
            PutFanout::start(&t("a"), &[t("a"), t("b"), t("c")], &[], 2, 3, true, false);
        assert_eq!(stores, vec![t("b"), t("c")]);
        assert_eq!(put.decision(), None);
        assert_eq!(put.on_store_result(&t("b"), Ok(()), |_| true), None);
        assert_eq!(put.decision(), Some(Status::Reached(())));
        assert_eq!(put.decision(), None, "reported once");
        assert!(!put.is_finished());
        put.on_store_result(&t("c"), Ok(()), |_| true);
        assert!(put.is_finished());
    }

    #[test]
    fn the_local_copy_counts_only_once_synced() {
        let (mut put, _) = PutFanout::start(&t("a"), &[t("a"), t("b")], &[], 2, 2, true, true);
        put.on_store_result(&t("b"), Ok(()), |_| true);
        assert_eq!(put.decision(), None);
        assert_eq!(put.on_local_synced(Ok(()), |_| true), None);
        assert_eq!(put.decision(), Some(Status::Reached(())));
        let (mut put, _) =
            PutFanout::start(&t("a"), &[t("a"), t("b")], &names(&["c"]), 2, 2, true, true);
        let stand_in = put.on_local_synced(Err("disk".into()), |_| true);
        assert_eq!(
            stand_in,
            Some(Target {
                node: "c".into(),
                hint_for: Some("a".into())
            })
        );
    }

    #[test]
    fn a_failed_store_moves_to_the_next_fallback_that_is_up_with_a_hint() {
        let fallbacks = names(&["d", "e", "f"]);
        let (mut put, _) = PutFanout::start(
            &t("a"),
            &[t("a"), t("b"), t("c")],
            &fallbacks,
            3,
            3,
            true,
            false,
        );
        // d is down: skipped and used up; e stands in for b.
        let next = put.on_store_result(&t("b"), Err("timeout".into()), |n| n != "d");
        let e = Target {
            node: "e".into(),
            hint_for: Some("b".into()),
        };
        assert_eq!(next, Some(e.clone()));
        // e fails too: f takes over, still holding the hint for b (not for e).
        let next = put.on_store_result(&e, Err("timeout".into()), |_| true);
        let f = Target {
            node: "f".into(),
            hint_for: Some("b".into()),
        };
        assert_eq!(next, Some(f.clone()));
        put.on_store_result(&t("c"), Ok(()), |_| true);
        assert_eq!(put.decision(), None);
        put.on_store_result(&f, Ok(()), |_| true);
        assert_eq!(put.decision(), Some(Status::Reached(())));
        assert!(put.is_finished());
    }

    #[test]
    fn without_sloppy_quorum_a_failed_store_is_not_replaced() {
        let (mut put, _) = PutFanout::start(
            &t("a"),
            &[t("a"), t("b"), t("c")],
            &names(&["d"]),
            3,
            3,
            false,
            false,
        );
        assert_eq!(
            put.on_store_result(&t("b"), Err("down".into()), |_| true),
            None
        );
        match put.decision() {
            Some(Status::Failed(f)) => {
                assert_eq!(f.needed, 3);
                assert_eq!(f.failed[0].0, "b");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    struct Fresh(u64);
    impl EpochSource for Fresh {
        fn is_trusted(&self, _epoch: u64) -> bool {
            true
        }
        fn fresh(&mut self) -> u64 {
            self.0 += 1;
            self.0
        }
    }

    fn written(value: &[u8]) -> Object {
        let me = Coordinator {
            node: "x".into(),
            incarnation: 1,
        };
        let (record, _) = coordinate_write(
            None,
            &me,
            &mut Fresh(0),
            &VersionVector::default(),
            WriteOp::Put(value.to_vec()),
            1,
        );
        record.object
    }

    #[test]
    fn a_read_decides_after_r_then_repairs_stale_replicas_once_all_answered() {
        let b_is_fallback = Target {
            node: "d".into(),
            hint_for: Some("b".into()),
        };
        let targets = vec![t("a"), b_is_fallback.clone(), t("c")];
        let (mut read, remote) = ReadFanout::start("a", &targets, 2, 3, ReadSpread::All, 0);
        assert_eq!(remote, vec![b_is_fallback.clone(), t("c")]);
        let v = written(b"v");
        assert_eq!(read.on_reply("a", Ok(v.clone())), None);
        assert_eq!(read.decision(), None);
        assert_eq!(read.on_reply("c", Ok(v.clone())), None);
        assert_eq!(read.decision(), Some(Status::Reached(v.clone())));
        assert!(!read.is_finished());
        assert!(read.repairs().is_empty(), "no repair before every reply");
        assert_eq!(read.on_reply("d", Ok(Object::new())), None);
        assert!(read.is_finished());
        assert_eq!(
            read.repairs(),
            vec![Repair {
                target: b_is_fallback
            }]
        );
        assert_eq!(read.merged(), &v);
    }

    #[test]
    fn a_failed_read_repairs_nothing() {
        let targets = [t("a"), t("b"), t("c")];
        let (mut read, _) = ReadFanout::start("a", &targets, 3, 3, ReadSpread::All, 0);
        assert_eq!(read.on_reply("a", Ok(written(b"v"))), None);
        assert_eq!(read.on_reply("b", Err("timeout".into())), None);
        assert!(matches!(read.decision(), Some(Status::Failed(_))));
        assert!(read.is_finished());
        assert!(read.repairs().is_empty());
    }

    #[test]
    fn a_quorum_read_asks_r_replicas_and_replaces_each_failed_one_by_a_spare() {
        let fallback = Target {
            node: "e".into(),
            hint_for: Some("d".into()),
        };
        let targets = [t("a"), fallback.clone(), t("b"), t("c")];
        // The coordinator's copy plus one other primary; rotation picks which.
        let (_, remote) = ReadFanout::start("a", &targets, 2, 4, ReadSpread::Quorum, 0);
        assert_eq!(remote, vec![t("b")]);
        let (mut read, remote) = ReadFanout::start("a", &targets, 2, 4, ReadSpread::Quorum, 1);
        assert_eq!(remote, vec![t("c")]);
        let v = written(b"v");
        assert_eq!(read.on_reply("a", Ok(v.clone())), None);
        assert!(read.has_spares());
        // c fails: b stands in, then the fallback behind every primary.
        assert_eq!(read.on_reply("c", Err("timeout".into())), Some(t("b")));
        assert_eq!(read.decision(), None);
        assert_eq!(read.on_reply("b", Err("refused".into())), Some(fallback));
        assert_eq!(read.decision(), None);
        // A reply from a replica never asked does not count.
        assert_eq!(read.on_reply("b", Ok(v.clone())), None);
        assert_eq!(read.on_reply("e", Ok(Object::new())), None);
        assert_eq!(read.decision(), Some(Status::Reached(v.clone())));
        assert!(read.is_finished(), "every asked replica answered");
        assert_eq!(
            read.repairs(),
            vec![Repair {
                target: Target {
                    node: "e".into(),
                    hint_for: Some("d".into())
                }
            }]
        );
    }

    #[test]
    fn a_quorum_read_fails_only_once_the_spares_are_spent() {
        let targets = [t("a"), t("b"), t("c")];
        // Not a replica: R=2 of the three, no local reply.
        let (mut read, remote) = ReadFanout::start("x", &targets, 2, 3, ReadSpread::Quorum, 0);
        assert_eq!(remote, vec![t("a"), t("b")]);
        assert_eq!(read.on_reply("a", Err("down".into())), Some(t("c")));
        assert_eq!(read.on_reply("c", Err("down".into())), None);
        match read.decision() {
            Some(Status::Failed(f)) => {
                assert_eq!(f.failed.len(), 2);
                assert_eq!(f.needed, 2);
            }
            other => panic!("expected a failed read, got {other:?}"),
        }
        assert!(read.is_finished());
        assert_eq!(
            read.speculate(),
            None,
            "nothing to speculate after the decision"
        );
    }

    #[test]
    fn a_slow_quorum_read_speculates_on_a_spare_until_decided() {
        let targets = [t("a"), t("b"), t("c")];
        let (mut read, remote) = ReadFanout::start("a", &targets, 2, 3, ReadSpread::Quorum, 0);
        assert_eq!(remote, vec![t("b")]);
        let v = written(b"v");
        assert_eq!(read.on_reply("a", Ok(v.clone())), None);
        assert_eq!(read.speculate(), Some(t("c")));
        assert_eq!(read.speculate(), None, "no spare left");
        assert_eq!(read.on_reply("c", Ok(v.clone())), None);
        assert_eq!(read.decision(), Some(Status::Reached(v.clone())));
        assert!(
            !read.is_finished(),
            "b was asked: its reply is still awaited"
        );
        assert_eq!(read.on_reply("b", Ok(v)), None);
        assert!(read.is_finished());
        assert!(read.repairs().is_empty());
    }

    #[test]
    fn r_equal_to_the_targets_or_a_full_spread_asks_everyone() {
        let targets = [t("a"), t("b"), t("c")];
        for (r, spread) in [(3, ReadSpread::Quorum), (1, ReadSpread::All)] {
            let (read, remote) = ReadFanout::start("a", &targets, r, 3, spread, 7);
            assert_eq!(remote.len(), 2, "r={r} {spread:?}");
            assert!(!read.has_spares());
        }
        let (read, remote) = ReadFanout::start("a", &targets, 1, 3, ReadSpread::Quorum, 7);
        assert!(
            remote.is_empty(),
            "R=1 on a replica reads only its own copy"
        );
        assert!(read.has_spares());
    }

    #[test]
    fn full_reads_come_at_exactly_their_share_evenly_spaced() {
        for (per_mille, every) in [(100, 10u64), (250, 4), (500, 2), (1000, 1), (5000, 1)] {
            let full: Vec<u64> = (0..100)
                .filter(|&i| ReadSpread::for_read(i, per_mille) == ReadSpread::All)
                .collect();
            assert_eq!(full.len() as u64, 100 / every, "{per_mille} per mille");
            assert!(full.windows(2).all(|w| w[1] - w[0] == every));
        }
        assert!((0..1000).all(|i| ReadSpread::for_read(i, 0) == ReadSpread::Quorum));
        assert_eq!(ReadSpread::for_read(u64::MAX, 1000), ReadSpread::All);
    }

    #[test]
    fn failure_detector_backs_off_and_trusts_newer_successes() {
        let mut fd = FailureDetector::new();
        assert!(fd.is_up("b"));
        fd.on_failure("b", 0, 10);
        assert!(!fd.is_up("b"));
        assert_eq!(fd.down(), names(&["b"]));
        assert!(fd.due_probes(10 + PROBE_BACKOFF_MIN_MS - 1).is_empty());
        assert_eq!(fd.due_probes(10 + PROBE_BACKOFF_MIN_MS), names(&["b"]));
        assert!(
            fd.due_probes(10 + PROBE_BACKOFF_MIN_MS).is_empty(),
            "not due again while its probe is out"
        );
        // The probe fails: the backoff doubles.
        fd.on_failure("b", 210, 300);
        assert!(fd.due_probes(300 + 2 * PROBE_BACKOFF_MIN_MS - 1).is_empty());
        assert_eq!(fd.due_probes(300 + 2 * PROBE_BACKOFF_MIN_MS), names(&["b"]));
        // Many failures: capped.
        for i in 0..20 {
            fd.on_failure("b", 1_000 + i, 1_000 + i);
        }
        assert!(fd.due_probes(1_019 + PROBE_BACKOFF_MAX_MS - 1).is_empty());
        fd.on_success("b", 2_000);
        assert!(fd.is_up("b"));
        // A request started before the success fails late: the peer stays up.
        fd.on_failure("b", 1_500, 2_500);
        assert!(fd.is_up("b"));
        fd.on_failure("b", 2_600, 2_700);
        assert!(!fd.is_up("b"));
    }

    #[test]
    fn a_request_from_a_down_peer_brings_its_probe_forward() {
        let mut fd = FailureDetector::new();
        assert!(!fd.on_heard_from("b", 0), "an up peer needs no probe");
        for i in 0..20 {
            fd.on_failure("b", i, i);
        }
        assert!(fd.due_probes(100).is_empty(), "backed off");
        assert!(fd.on_heard_from("b", 100));
        assert!(
            !fd.is_up("b"),
            "heard from is not reached: a cut may be one-way"
        );
        assert_eq!(fd.due_probes(100), names(&["b"]));
        assert!(
            !fd.on_heard_from("b", 100),
            "its probe is out: no second one"
        );
        // The probe failed (a one-way cut): the backoff grows again from the shortest.
        fd.on_failure("b", 100, 150);
        assert!(fd.due_probes(150 + 2 * PROBE_BACKOFF_MIN_MS - 1).is_empty());
        assert_eq!(fd.due_probes(150 + 2 * PROBE_BACKOFF_MIN_MS), names(&["b"]));
    }

    #[test]
    fn a_probe_lost_before_a_heal_is_followed_at_once() {
        let mut fd = FailureDetector::new();
        for i in 0..20 {
            fd.on_failure("b", i, i);
        }
        assert_eq!(fd.due_probes(2_000), names(&["b"]));
        // Heard from while the probe is out (sent into the cut, which then healed).
        assert!(!fd.on_heard_from("b", 2_100));
        fd.on_failure("b", 2_000, 2_500);
        assert!(!fd.is_up("b"));
        assert_eq!(fd.due_probes(2_500), names(&["b"]), "no backoff");
        // Not heard from during this one: its failure backs off as usual.
        fd.on_failure("b", 2_500, 3_000);
        assert!(
            fd.due_probes(3_000 + 2 * PROBE_BACKOFF_MIN_MS - 1)
                .is_empty()
        );
    }
}
