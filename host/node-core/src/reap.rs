//! Tombstone reaping: a deletion's tombstone is removed only once every replica of the key
//! holds exactly that tombstone and no node holds a hint for the key, so no copy of the
//! deleted value is left anywhere to come back (the resurrection Riak and Cassandra suffer
//! when a replica that missed the delete returns after the tombstones were purged).
//!
//! The key's first primary reaps ([`ReapPass`]). For tombstones it has held for the grace
//! period (which outlasts any repair or store still in flight) it asks every member — not
//! only the replicas, since a fallback may hold a hint — for how long it has held the same
//! state and whether it holds a hint. Hold times are measured by each node on its own
//! clock, so clock skew between nodes cannot shorten the grace; every node makes its
//! applied writes durable before it counts a tombstone (the reaper too), so a counted
//! tombstone cannot be lost to a power failure. Only when every member answers, every
//! replica has held it for the grace and nobody holds a hint does it tell the other
//! replicas to reap, and then reaps itself. A replica reaps only if its state is still that
//! exact tombstone, so a write that arrived meanwhile survives. A member that is down
//! blocks reaping of every key until it is back (or removed from the cluster): the price of
//! never resurrecting data.
//!
//! Every step runs on the reaper's ring ([`RingId`]): a member holding another ring refuses
//! ([`ReapResponse::OtherRing`]; on an older ring it may still count itself a replica
//! without holding the tombstone), and a ring change at the reaper during the checks reaps
//! nothing.
//!
//! The machine never syncs, sends or waits: it returns [`ReapStep`]s (make applied writes
//! durable, send these requests) and takes the answers. The server awaits each call; the
//! simulator delivers each answer as a later event, with anything else interleaved.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use quiver_core::causality::Object;
use quiver_core::merkle::{self, Hash};
use quiver_core::ring::RingId;
use quiver_core::storage::keys;

use crate::ae::is_tombstone;
use crate::broken::{Broken, Variant};
use crate::replica::Replica;

/// Tombstones considered per reaping pass.
pub const REAP_BATCH: usize = 512;

/// `(engine data key, digest of the tombstone state)` pairs, in the reaper's order.
pub type ReapKeys = Vec<(Vec<u8>, Hash)>;

/// A reaping step, reaper to member. Each carries the reaper's ring: a member holding
/// another one answers [`ReapResponse::OtherRing`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReapRequest {
    /// For how long has the receiver held exactly each state (made durable first), and
    /// does it hold a hint for the key?
    Check {
        /// The reaper's ring.
        ring: RingId,
        /// The states asked about.
        keys: ReapKeys,
    },
    /// Delete these tombstones if still exactly these states and no hint is held.
    Reap {
        /// The reaper's ring.
        ring: RingId,
        /// The tombstones to delete.
        keys: ReapKeys,
    },
}

/// A member's answer to a [`ReapRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReapResponse {
    /// To `Check`, per key in order: for how long (ms, by the member's own clock) it has
    /// held exactly that state (`None`: it does not), and whether the tombstone must stay
    /// for the member's sake (it holds a hint for the key, or a copy it no longer
    /// replicates, or its answer could not be read).
    Status(Vec<(Option<u64>, bool)>),
    /// To `Reap`: how many tombstones were removed.
    Reaped(u64),
    /// The member holds another ring than the reaper: it answers nothing.
    OtherRing,
    /// The request failed at the member (storage).
    Refused(String),
}

/// What the reaper's driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum ReapStep {
    /// Make every applied write durable, then call [`ReapPass::synced`] (on failure, drop
    /// the pass: nothing was counted yet).
    Sync,
    /// Send each request to its member and report each answer (or failure) with
    /// [`ReapPass::on_response`]. The driver may send them one by one, stopping when a
    /// report returns anything but [`ReapStep::Wait`], or all at once.
    Send(Vec<(String, ReapRequest)>),
    /// Answers to requests already sent are still due.
    Wait,
    /// The pass is over.
    Done(ReapReport),
}

/// What a pass reaped here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// `(engine data key, the tombstone state removed)` of each key this node reaped.
    pub reaped: Vec<(Vec<u8>, Object)>,
}

/// What the reaper knows of the cluster when a pass starts.
pub struct ReapStart<'a> {
    /// This node.
    pub me: &'a str,
    /// This node's ring: every step runs on it.
    pub ring: RingId,
    /// The other members: each is asked (a fallback may hold a hint), and they are the
    /// owners a hint held here could be for.
    pub members: &'a [String],
    /// Whether a member is up; one that is down blocks the pass.
    pub is_up: &'a dyn Fn(&str) -> bool,
    /// The primaries of `(bucket, key)` under `ring`, first primary first.
    pub primaries: &'a dyn Fn(&str, &[u8]) -> Vec<String>,
    /// How long every replica must have held a tombstone, in ms.
    pub grace_ms: u64,
    /// Now, by this node's wall clock (the clock its tombstone index is stamped with).
    pub now_ms: u64,
    /// Broken variants (none in production).
    pub broken: Broken,
}

/// One tombstone this node may reap.
#[derive(Debug)]
struct Candidate {
    data_key: Vec<u8>,
    digest: Hash,
    object: Object,
    /// The key's other primaries.
    others: Vec<String>,
    confirmed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Syncing,
    Checking,
    Reaping,
    Over,
}

/// One reaping pass at a key's first primary.
#[derive(Debug)]
pub struct ReapPass {
    ring: RingId,
    members: Vec<String>,
    grace_ms: u64,
    now_ms: u64,
    broken: Broken,
    mine: Vec<Candidate>,
    waiting: BTreeSet<String>,
    phase: Phase,
}

impl ReapPass {
    /// Starts a pass: the tombstones this node has held for the grace (a walk of the
    /// tombstone index, [`REAP_BATCH`] at most) whose first primary it is. `None` when
    /// there is nothing to do: none held long enough, a member is down, or the index cannot
    /// be read.
    pub fn start(replica: &Replica, at: &ReapStart<'_>) -> Option<(ReapPass, ReapStep)> {
        let before = at.now_ms.checked_sub(at.grace_ms)?;
        let ae = replica.ae();
        if ae.tombstones() == 0 {
            return None;
        }
        let unchecked = at.broken.is(Variant::ReapWithoutChecks);
        if !unchecked && at.members.iter().any(|m| !(at.is_up)(m)) {
            return None;
        }
        let candidates = ae
            .reap_candidates(replica.store(), before, REAP_BATCH)
            .map_err(|e| tracing::error!(error = %e, "cannot read the tombstone index"))
            .ok()?;
        let objects = replica
            .objects(&candidates)
            .map_err(|e| tracing::error!(error = %e, "cannot read tombstones"))
            .ok()?;
        let mut mine = Vec::new();
        for (data_key, object) in objects {
            // The walk reads the index; the record says what the state is now.
            if !is_tombstone(&object) {
                continue;
            }
            let Some((bucket, key)) = keys::split_data_key(&data_key) else {
                continue;
            };
            let primaries = (at.primaries)(&String::from_utf8_lossy(bucket), key);
            if primaries.first().map(String::as_str) != Some(at.me) {
                continue;
            }
            mine.push(Candidate {
                digest: merkle::object_digest(&object),
                others: primaries.into_iter().filter(|p| p != at.me).collect(),
                data_key,
                object,
                confirmed: true,
            });
        }
        if mine.is_empty() {
            return None;
        }
        let mut pass = ReapPass {
            ring: at.ring,
            members: at.members.to_vec(),
            grace_ms: at.grace_ms,
            now_ms: at.now_ms,
            broken: at.broken,
            mine,
            waiting: BTreeSet::new(),
            phase: Phase::Syncing,
        };
        let step = if unchecked {
            // BROKEN VARIANT: nobody is asked, not even this node; straight to reaping.
            pass.reap_phase(replica)
        } else if at.broken.is(Variant::ReapCheckWithoutSync) {
            pass.synced(replica)
        } else {
            ReapStep::Sync
        };
        Some((pass, step))
    }

    /// The applied writes are durable ([`ReapStep::Sync`]): checks the tombstones here,
    /// then asks every member.
    pub fn synced(&mut self, replica: &Replica) -> ReapStep {
        if self.phase != Phase::Syncing {
            return ReapStep::Wait;
        }
        for c in &mut self.mine {
            let status = replica.reap_status(&c.data_key, &c.digest, &self.members, self.now_ms);
            if !matches!(status, Ok((held, false)) if long_enough(held, self.grace_ms)) {
                c.confirmed = false;
            }
        }
        if self.members.is_empty() {
            return self.reap_phase(replica);
        }
        self.phase = Phase::Checking;
        let keys: ReapKeys = self
            .mine
            .iter()
            .map(|c| (c.data_key.clone(), c.digest))
            .collect();
        self.waiting = self.members.iter().cloned().collect();
        ReapStep::Send(
            self.members
                .iter()
                .map(|m| {
                    let check = ReapRequest::Check {
                        ring: self.ring,
                        keys: keys.clone(),
                    };
                    (m.clone(), check)
                })
                .collect(),
        )
    }

    /// `member`'s answer to the request this pass sent it, or why there is none (the call
    /// failed or timed out). `ring` is this node's ring now: if it changed during the
    /// checks, the pass reaps nothing. An answer this pass does not wait for is ignored.
    pub fn on_response(
        &mut self,
        replica: &Replica,
        member: &str,
        answer: Result<ReapResponse, String>,
        ring: RingId,
    ) -> ReapStep {
        if !self.waiting.remove(member) {
            return ReapStep::Wait;
        }
        match self.phase {
            Phase::Checking => {
                let n = self.mine.len();
                let statuses = match answer {
                    Ok(ReapResponse::Status(s)) if s.len() == n => s,
                    other => {
                        // An unanswered check proves nothing: reap nothing this pass.
                        tracing::debug!(peer = member, answer = ?other, "reaping check unanswered");
                        return self.over(ReapReport::default());
                    }
                };
                for (c, (held, hinted)) in self.mine.iter_mut().zip(statuses) {
                    let replica = c.others.iter().any(|p| p == member);
                    if hinted || (replica && !long_enough(held, self.grace_ms)) {
                        c.confirmed = false;
                    }
                }
                if !self.waiting.is_empty() {
                    return ReapStep::Wait;
                }
                if ring != self.ring {
                    return self.over(ReapReport::default());
                }
                self.reap_phase(replica)
            }
            Phase::Reaping => {
                // A replica that did not reap keeps its tombstone; anti-entropy spreads it
                // back and a later pass reaps it.
                if !matches!(answer, Ok(ReapResponse::Reaped(_))) {
                    tracing::debug!(peer = member, answer = ?answer, "reap request failed");
                }
                if self.waiting.is_empty() {
                    self.finish(replica)
                } else {
                    ReapStep::Wait
                }
            }
            Phase::Syncing | Phase::Over => ReapStep::Wait,
        }
    }

    /// Tells the other replicas of each confirmed key to reap it. They go first: if this
    /// node stops half-way, its own tombstone remains and anti-entropy spreads it again, to
    /// be reaped on a later pass.
    fn reap_phase(&mut self, replica: &Replica) -> ReapStep {
        self.phase = Phase::Reaping;
        let mut sends = Vec::new();
        for member in &self.members {
            let keys: ReapKeys = self
                .mine
                .iter()
                .filter(|c| c.confirmed && c.others.contains(member))
                .map(|c| (c.data_key.clone(), c.digest))
                .collect();
            if !keys.is_empty() {
                let reap = ReapRequest::Reap {
                    ring: self.ring,
                    keys,
                };
                sends.push((member.clone(), reap));
            }
        }
        if sends.is_empty() {
            return self.finish(replica);
        }
        self.waiting = sends.iter().map(|(m, _)| m.clone()).collect();
        ReapStep::Send(sends)
    }

    /// Reaps the confirmed keys here.
    fn finish(&mut self, replica: &Replica) -> ReapStep {
        // BROKEN VARIANT (reap without checks): the local hint check goes too.
        let owners: &[String] = if self.broken.is(Variant::ReapWithoutChecks) {
            &[]
        } else {
            &self.members
        };
        let mut report = ReapReport::default();
        for c in self.mine.iter().filter(|c| c.confirmed) {
            match replica.reap(&c.data_key, &c.digest, owners) {
                Ok(true) => report.reaped.push((c.data_key.clone(), c.object.clone())),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot reap a tombstone"),
            }
        }
        let reaped = u64::try_from(report.reaped.len()).unwrap_or(u64::MAX);
        replica
            .ae()
            .metrics()
            .tombstones_reaped
            .fetch_add(reaped, Ordering::Relaxed);
        self.over(report)
    }

    fn over(&mut self, report: ReapReport) -> ReapStep {
        self.phase = Phase::Over;
        self.waiting.clear();
        ReapStep::Done(report)
    }

    /// True once the pass has returned [`ReapStep::Done`].
    pub fn is_over(&self) -> bool {
        self.phase == Phase::Over
    }
}

fn long_enough(held: Option<u64>, grace_ms: u64) -> bool {
    held.is_some_and(|ms| ms >= grace_ms)
}

/// What a member knows when it answers a reaper.
pub struct ReapAnswering<'a> {
    /// This node's ring.
    pub ring: RingId,
    /// The other members: the owners a hint held here could be for.
    pub members: &'a [String],
    /// Whether this node is a primary of `(bucket, key)` under `ring`.
    pub is_primary: &'a dyn Fn(&str, &[u8]) -> bool,
    /// Broken variants (none in production).
    pub broken: Broken,
}

/// What a member does with a [`ReapRequest`].
#[derive(Debug)]
pub enum Answer {
    /// Make every applied write durable first, then answer with [`PendingCheck::answer`]
    /// (on failure, refuse: a tombstone counted must survive a power failure).
    SyncFirst(PendingCheck),
    /// The answer.
    Reply(ReapResponse),
}

/// A `Check` waiting for this node's applied writes to become durable.
#[derive(Debug)]
pub struct PendingCheck {
    keys: ReapKeys,
}

/// The member side of reaping: refuses a reaper on another ring, answers a `Check` (after
/// the sync it requires) and reaps on `Reap`. `now_ms` is this node's wall clock.
pub fn answer(
    replica: &Replica,
    at: &ReapAnswering<'_>,
    request: ReapRequest,
    now_ms: u64,
) -> Answer {
    let (ring, keys, check) = match request {
        ReapRequest::Check { ring, keys } => (ring, keys, true),
        ReapRequest::Reap { ring, keys } => (ring, keys, false),
    };
    // A member on another ring may count as a replica what the reaper does not (or the
    // reverse): it takes part in nothing until the rings agree.
    if ring != at.ring && !at.broken.is(Variant::ReapCheckAnyRing) {
        return Answer::Reply(ReapResponse::OtherRing);
    }
    if !check {
        return Answer::Reply(reap_here(replica, at, &keys));
    }
    let pending = PendingCheck { keys };
    if at.broken.is(Variant::ReapCheckWithoutSync) {
        return Answer::Reply(pending.answer(replica, at, now_ms));
    }
    Answer::SyncFirst(pending)
}

impl PendingCheck {
    /// The answer, once this node's applied writes are durable. `now_ms` is this node's
    /// wall clock.
    pub fn answer(self, replica: &Replica, at: &ReapAnswering<'_>, now_ms: u64) -> ReapResponse {
        ReapResponse::Status(
            self.keys
                .iter()
                .map(|(dkey, digest)| {
                    // A copy here that this node no longer replicates is waiting for
                    // handoff, and may be older than the tombstone: like a hint, it keeps
                    // the tombstone until it has reached the replicas.
                    if holds_orphan_copy(replica, at, dkey) {
                        return (None, true);
                    }
                    // A failed read answers "not held, hinted": the tombstone stays.
                    replica
                        .reap_status(dkey, digest, at.members, now_ms)
                        .unwrap_or((None, true))
                })
                .collect(),
        )
    }
}

fn reap_here(replica: &Replica, at: &ReapAnswering<'_>, keys: &ReapKeys) -> ReapResponse {
    let mut reaped = 0;
    for (dkey, digest) in keys {
        match replica.reap(dkey, digest, at.members) {
            Ok(true) => reaped += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot reap a tombstone"),
        }
    }
    replica
        .ae()
        .metrics()
        .tombstones_reaped
        .fetch_add(reaped, Ordering::Relaxed);
    ReapResponse::Reaped(reaped)
}

/// True when this node holds a copy of the key (engine data key) but is not one of its
/// primaries under its ring (an old owner that has not handed it off yet). Errs on the
/// side of "holds": an unreadable record counts.
fn holds_orphan_copy(replica: &Replica, at: &ReapAnswering<'_>, data_key: &[u8]) -> bool {
    let Some((bucket, key)) = keys::split_data_key(data_key) else {
        return false;
    };
    if (at.is_primary)(&String::from_utf8_lossy(bucket), key) {
        return false;
    }
    match replica.objects(&[data_key.to_vec()]) {
        Ok(objects) => objects
            .iter()
            .any(|(_, o)| !o.siblings().is_empty() || !o.context().is_empty()),
        Err(_) => true,
    }
}
