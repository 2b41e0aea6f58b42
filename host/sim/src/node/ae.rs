//! Active anti-entropy and tombstone reaping in the simulated node: the index of
//! `host/node/src/ae.rs`, the exchange of `host/node/src/cluster/ae.rs` and the reaper of
//! `host/node/src/cluster/reap.rs` with `KvService::{reap, reap_status}`, as steps of the
//! node's state machine.
//!
//! The trees are the core's ([`merkle::Tree`], one per `(n, partition)`, leaf
//! [`merkle::leaf_of`] of the key's ring position, entry [`merkle::entry_hash`] of the engine
//! data key and [`merkle::object_digest`]); every comparison is [`merkle::differing`] or
//! [`merkle::diff_keys`]. Production keeps the leaf level on disk in the record's batch;
//! here the index lives in memory, follows every record write and delete of the node
//! (`Node::put_record`, `Node::delete_record`), and is rebuilt from the records the disk
//! kept when the node boots, which gives the same guarantee: the trees never drift from
//! the data.
//!
//! An exchange is one message sequence with one peer (digest of roots, roots, groups,
//! leaves, key lists, fetch, push), each step a call with the peer timeout. A failed or
//! timed-out step abandons the exchange; replies to an abandoned exchange carry its id and
//! are ignored. Exchanges and reaping checks do not feed the failure detector (production:
//! `call_untracked`).

use std::collections::BTreeSet;
use std::sync::Arc;

use quiver_core::causality::Object;
use quiver_core::merkle::{self, Hash};
use quiver_core::storage::{StorageEngine, keys};
use quiver_node_core::WallClock;
use quiver_node_core::ae::{AeIndex, Placement};
use quiver_node_core::exchange::{self, AeRequest, AeResponse, Answering, Step};

use super::{
    BUCKET, CallError, Effect, Node, NodeId, Observation, PeerRequest, PeerResponse, Purpose,
};
use crate::disk::SimDisk;

/// Keys repaired per exchange at most (production: `--ae-max-keys`).
pub const AE_MAX_KEYS: usize = 10_000;

/// A tree's identity: replication factor and partition.
pub type TreeId = quiver_node_core::ae::TreeId;

/// Tombstones a reaping pass considers at most (production: `REAP_BATCH`).
const REAP_BATCH: usize = 512;

/// Engine data key of a simulation key (production: `keys::data_key(bucket, key)`).
pub fn data_key(key: &str) -> Vec<u8> {
    keys::data_key(BUCKET.as_bytes(), key.as_bytes()).unwrap_or_default()
}

pub(super) fn key_of(data_key: &[u8]) -> Option<String> {
    let (bucket, key) = keys::split_data_key(data_key)?;
    if bucket != BUCKET.as_bytes() {
        return None;
    }
    String::from_utf8(key.to_vec()).ok()
}

/// True for a state that is nothing but deletions (production: `ae::is_tombstone`).
pub fn is_tombstone(object: &Object) -> bool {
    !object.siblings().is_empty() && object.siblings().iter().all(|s| s.meta.tombstone)
}

/// One exchange in flight, driven by the initiator.
#[derive(Debug)]
pub(super) struct Exchange {
    id: u64,
    /// The production initiator (`quiver_node_core::exchange::Exchange`).
    machine: exchange::Exchange,
}

/// One reaping pass in flight.
#[derive(Debug)]
pub(super) struct ReapPass {
    id: u64,
    members: Vec<NodeId>,
    /// (key, data key, digest, the other primaries).
    mine: Vec<(String, Vec<u8>, Hash, Vec<NodeId>)>,
    confirmed: Vec<bool>,
    waiting: BTreeSet<NodeId>,
    reaping: bool,
}

impl Node {
    fn tree_n(&self) -> u8 {
        u8::try_from(self.cfg.quorum.n).unwrap_or(u8::MAX)
    }

    /// Where this node files its keys: the ring's partitions and the run's replication
    /// factor (production: `Cluster::refresh_views` sets it from the ring and the buckets).
    fn placement(&self) -> Placement {
        Placement {
            partitions: self.meta.ring.partitions(),
            default_n: self.tree_n(),
            buckets: Default::default(),
        }
    }

    /// Loads the anti-entropy index from the disk, or rebuilds it from the records when its
    /// entries are absent (at boot; production: `AeIndex::open`).
    pub(super) fn rebuild_ae(&mut self) {
        self.replica.ae().set_placement(self.placement());
        self.replica
            .ae()
            .open(&self.disk.engine)
            .expect("a booting node's disk is live");
    }

    /// Tombstone-only states this node holds: (key, simulated ms at which it stored the
    /// state), for the liveness check of reaping.
    pub fn tombstones_held_since(&self) -> Vec<(String, u64)> {
        let offset = super::WALL_CLOCK_BASE_MS + self.cfg.clock_skew_ms;
        self.tables()
            .tombstones
            .iter()
            .map(|(k, &t)| (k.clone(), u64::try_from(t as i64 - offset).unwrap_or(0)))
            .collect()
    }

    /// Checks that the trees match the records the node holds (the index never drifts):
    /// an index rebuilt from the records alone, on a fresh disk, has the same roots.
    pub fn check_ae_index(&self) -> Result<(), String> {
        let fresh_disk = SimDisk::new();
        let data = self
            .disk
            .engine
            .scan(
                &[keys::DATA_PREFIX],
                Some(&[keys::DATA_PREFIX + 1]),
                usize::MAX,
            )
            .map_err(|e| e.to_string())?;
        let mut batch = quiver_core::storage::WriteBatch::new();
        for (k, v) in data {
            batch.put(k, v);
        }
        fresh_disk.apply(&batch).map_err(|e| e.to_string())?;
        // On the node's simulated clock: the simulator reads no real clock.
        let fresh = AeIndex::with_clock(Arc::clone(&self.clock) as Arc<dyn WallClock>);
        fresh.set_placement(self.placement());
        fresh.open(&fresh_disk).map_err(|e| e.to_string())?;
        let live = self.replica.ae();
        let ids: BTreeSet<TreeId> = live
            .tree_ids()
            .into_iter()
            .chain(fresh.tree_ids())
            .collect();
        for id in ids {
            if live.root(id) != fresh.root(id) {
                return Err(format!(
                    "node {}: anti-entropy index: tree {id:?} has a root the records do not give",
                    self.me.node
                ));
            }
        }
        if live.keys() != fresh.keys() {
            return Err(format!(
                "node {}: anti-entropy index: {} keys filed, the records give {}",
                self.me.node,
                live.keys(),
                fresh.keys()
            ));
        }
        Ok(())
    }

    /// Stops starting new reaping passes (the driver's final phase).
    pub fn pause_reaping(&mut self) {
        self.reaping_paused = true;
    }

    /// The trees this node and `peer` both replicate (production: `shared_trees`).
    fn shared_trees(&self, peer: &str) -> Vec<TreeId> {
        exchange::shared_trees(&self.meta.ring, &self.placement(), &self.me.node, peer)
    }

    /// The AE tick (production: `Cluster::ae_tick`): one exchange with the next up peer in
    /// turn, then a reaping pass.
    pub(super) fn ae_tick(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        let Some(every) = self.cfg.ae_every_ms else {
            return;
        };
        if now_ms < self.next_ae_ms {
            return;
        }
        self.next_ae_ms = now_ms + every;
        if self.exchange.is_none() {
            let up: Vec<NodeId> = self
                .peers
                .iter()
                .filter(|p| self.is_up(p))
                .cloned()
                .collect();
            if !up.is_empty() {
                let peer = up[self.ae_next_peer % up.len()].clone();
                self.ae_next_peer = self.ae_next_peer.wrapping_add(1);
                self.start_exchange(now_ms, peer, fx);
            }
        }
        if self.reap_pass.is_none() && !self.reaping_paused {
            self.start_reap(now_ms, fx);
        }
    }

    pub(super) fn next_bg_id(&mut self) -> u64 {
        self.next_bg += 1;
        (self.life << super::CALL_ID_BITS_PER_LIFE) | self.next_bg
    }

    /// Starts an exchange with `peer` (production: `Cluster::ae_exchange`) unless a peer's
    /// exchange is repairing this node: the production initiator's digest.
    fn start_exchange(&mut self, now_ms: u64, peer: NodeId, fx: &mut Vec<Effect>) {
        let trees = self.shared_trees(&peer);
        if trees.is_empty() || self.ae_lease.held_by_another(&self.me.node, now_ms) {
            return;
        }
        let id = self.next_bg_id();
        let (machine, first) =
            exchange::Exchange::start(&self.replica, &self.me.node, &peer, trees, AE_MAX_KEYS);
        self.exchange = Some(Exchange { id, machine });
        self.ae_call(now_ms, &peer, first, id, fx);
    }

    fn ae_call(&mut self, now_ms: u64, peer: &str, body: AeRequest, id: u64, fx: &mut Vec<Effect>) {
        let timeout = self.cfg.peer_timeout_ms;
        self.call_untracked(
            now_ms,
            peer,
            PeerRequest::Ae(body),
            timeout,
            Purpose::Ae { exchange: id },
            fx,
        );
    }

    /// A reply (or failure) of a step of exchange `id`: the production initiator says what
    /// comes next. A finished exchange that descended tells the peer (best effort; its
    /// lease also ends by itself).
    pub(super) fn ae_result(
        &mut self,
        now_ms: u64,
        id: u64,
        result: Result<PeerResponse, CallError>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(mut ex) = self.exchange.take() else {
            return;
        };
        if ex.id != id {
            self.exchange = Some(ex);
            return;
        }
        let response = match result {
            Ok(PeerResponse::Ae(r)) => Ok(r),
            Ok(other) => Err(format!("not an anti-entropy answer: {other:?}")),
            Err(CallError::Refused(e)) => Err(e),
            Err(CallError::Timeout) => Err("no answer in time".to_string()),
        };
        let peer = ex.machine.peer().to_string();
        match ex.machine.on_response(&self.replica, response) {
            Step::Send(next) => {
                self.exchange = Some(ex);
                self.ae_call(now_ms, &peer, next, id, fx);
            }
            Step::Finished(result) => {
                if ex.machine.descended() {
                    let done = AeRequest::Done {
                        from: self.me.node.clone(),
                    };
                    self.ae_call(now_ms, &peer, done, id, fx);
                }
                if let Ok(report) = result {
                    fx.push(Effect::Observe(Observation::AeExchange {
                        repaired: report.pulled + report.pushed,
                    }));
                }
            }
        }
    }

    /// The replica side of an exchange and of reaping (production: `handle_ae_peer`,
    /// `handle_reap_peer`). `None` for a request that is not one of theirs.
    pub(super) fn handle_background(
        &mut self,
        from: &str,
        body: PeerRequest,
    ) -> Option<PeerResponse> {
        Some(match body {
            PeerRequest::Ae(request) => {
                // The production answering side, lease included.
                let placement = self.placement();
                let at = Answering {
                    me: &self.me.node,
                    ring: &self.meta.ring,
                    placement: &placement,
                    sender_is_member: self.peers.iter().any(|p| p == from),
                };
                let now = self.clock_ms;
                match exchange::answer(&self.replica, &at, &mut self.ae_lease, now, request) {
                    AeResponse::Refused(e) => PeerResponse::Error(e),
                    answer => PeerResponse::Ae(answer),
                }
            }
            PeerRequest::ReapCheck { ring_version, keys } => {
                // Durable before confirming: a state counted towards a reap must survive a
                // power loss (production: `KvService::reap_status` syncs first).
                if !self.cfg.reap_check_without_sync {
                    self.sync();
                }
                // A member on another ring may count as a replica what the reaper does not
                // (or the reverse): it confirms nothing until the rings agree.
                let other_ring =
                    self.cfg.fixes.reap_check_same_ring && ring_version != self.meta.ring.version();
                PeerResponse::ReapStatus(
                    keys.iter()
                        .map(|(dkey, digest)| {
                            // A copy this node no longer replicates waits for handoff and
                            // may be older than the tombstone: like a hint, it blocks
                            // (production: `holds_orphan_copy`).
                            if other_ring || self.holds_orphan_copy(dkey) {
                                return (false, true, 0);
                            }
                            self.reap_status(dkey, digest)
                        })
                        .collect(),
                )
            }
            PeerRequest::Reap(list) => {
                let mut reaped = 0;
                for (dkey, digest) in &list {
                    if self.reap_local(dkey, digest, true, &mut Vec::new()) {
                        reaped += 1;
                    }
                }
                PeerResponse::Reaped(reaped)
            }
            _ => return None,
        })
    }

    /// Every member this node knows: the owners a hint for a key could be for.
    fn known_members(&self) -> Vec<String> {
        self.meta.members.keys().cloned().collect()
    }

    /// The production `Replica::reap_status`: (holds exactly this state, holds a hint for
    /// the key, how long it has held exactly this state by its own clock, 0 if not).
    fn reap_status(&self, dkey: &[u8], digest: &Hash) -> (bool, bool, u64) {
        let now = self.wall_ms(self.clock_ms);
        match self
            .replica
            .reap_status(dkey, digest, &self.known_members(), now)
        {
            Ok((held, hinted)) => (held.is_some(), hinted, held.unwrap_or(0)),
            Err(_) => (false, true, 0),
        }
    }

    /// The production `Replica::reap`: deletes the record if it is still exactly that
    /// tombstone and no hint for the key is held (for any owner; none with the broken
    /// variant that skips checks). True when it was removed.
    fn reap_local(
        &mut self,
        dkey: &[u8],
        digest: &Hash,
        check_hints: bool,
        fx: &mut Vec<Effect>,
    ) -> bool {
        let Some(key) = key_of(dkey) else {
            return false;
        };
        let object = self.local_object(&key);
        let owners = if check_hints {
            self.known_members()
        } else {
            Vec::new()
        };
        if !matches!(self.replica.reap(dkey, digest, &owners), Ok(true)) {
            return false;
        }
        fx.push(Effect::Observe(Observation::Reaped {
            node: self.me.node.clone(),
            key,
            object,
        }));
        true
    }

    /// Starts a reaping pass (production: `Cluster::reap_tombstones`).
    fn start_reap(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        let Some(grace) = self.cfg.tombstone_grace_ms else {
            return;
        };
        let members = self.peers.clone();
        let broken = self.cfg.reap_without_checks;
        if !broken && members.iter().any(|m| !self.is_up(m)) {
            return;
        }
        let n = self.cfg.quorum.n;
        let now_wall = self.wall_ms(now_ms);
        let mut mine = Vec::new();
        // Hold time is local: the reaper itself must have held this exact state for the
        // grace period by its own clock (production: the tombstone index's stamp, walked
        // with a cursor by `reap_candidates`).
        let candidates = self
            .replica
            .ae()
            .reap_candidates(
                &self.disk.engine,
                now_wall.saturating_sub(grace),
                REAP_BATCH,
            )
            .expect("a live node's disk is readable");
        for dkey in candidates {
            let Some(key) = key_of(&dkey) else { continue };
            // The candidate walk reads the index; the record says what the state is now.
            let object = self.local_object(&key);
            if !is_tombstone(&object) {
                continue;
            }
            let (primaries, _) = self.preference(&key, n);
            if primaries.first() != Some(&self.me.node) {
                continue;
            }
            let others: Vec<NodeId> = primaries
                .into_iter()
                .filter(|p| *p != self.me.node)
                .collect();
            let digest = merkle::object_digest(&object);
            mine.push((key, dkey, digest, others));
        }
        if mine.is_empty() {
            return;
        }
        // Durable before confirming: the reaper's own copy too.
        if !broken && !self.cfg.reap_check_without_sync {
            self.sync();
        }
        let confirmed: Vec<bool> = mine
            .iter()
            .map(|(_, d, digest, _)| {
                let (same, hinted, held) = self.reap_status(d, digest);
                broken || (same && !hinted && held >= grace)
            })
            .collect();
        let id = self.next_bg_id();
        let mut pass = ReapPass {
            id,
            members: members.clone(),
            mine,
            confirmed,
            waiting: BTreeSet::new(),
            reaping: false,
        };
        if broken {
            // BROKEN VARIANT: no member is asked; straight to reaping.
            return self.reap_phase(now_ms, pass, fx);
        }
        let asked: Vec<(Vec<u8>, Hash)> = pass
            .mine
            .iter()
            .map(|(_, d, h, _)| (d.clone(), *h))
            .collect();
        pass.waiting = members.iter().cloned().collect();
        self.reap_pass = Some(pass);
        let ring_version = self.meta.ring.version();
        for m in &members {
            let body = PeerRequest::ReapCheck {
                ring_version,
                keys: asked.clone(),
            };
            let timeout = self.cfg.peer_timeout_ms;
            self.call_untracked(now_ms, m, body, timeout, Purpose::Reap { pass: id }, fx);
        }
    }

    fn reap_phase(&mut self, now_ms: u64, mut pass: ReapPass, fx: &mut Vec<Effect>) {
        pass.reaping = true;
        pass.waiting.clear();
        let mut sends = Vec::new();
        for member in &pass.members {
            let theirs: Vec<(Vec<u8>, Hash)> = pass
                .mine
                .iter()
                .zip(&pass.confirmed)
                .filter(|((_, _, _, others), ok)| **ok && others.contains(member))
                .map(|((_, d, h, _), _)| (d.clone(), *h))
                .collect();
            if !theirs.is_empty() {
                sends.push((member.clone(), theirs));
            }
        }
        if sends.is_empty() {
            return self.reap_finish(pass, fx);
        }
        let id = pass.id;
        pass.waiting = sends.iter().map(|(m, _)| m.clone()).collect();
        self.reap_pass = Some(pass);
        for (m, theirs) in sends {
            let timeout = self.cfg.peer_timeout_ms;
            let body = PeerRequest::Reap(theirs);
            self.call_untracked(now_ms, &m, body, timeout, Purpose::Reap { pass: id }, fx);
        }
    }

    /// The other replicas were asked (answered or not): reap the confirmed keys here.
    fn reap_finish(&mut self, pass: ReapPass, fx: &mut Vec<Effect>) {
        let check_hints = !self.cfg.reap_without_checks;
        for ((_, dkey, digest, _), ok) in pass.mine.iter().zip(&pass.confirmed) {
            if *ok {
                self.reap_local(dkey, digest, check_hints, fx);
            }
        }
    }

    /// A reply (or failure) of a call of reaping pass `id` from `peer`.
    pub(super) fn reap_result(
        &mut self,
        now_ms: u64,
        id: u64,
        peer: &str,
        result: Result<PeerResponse, CallError>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(mut pass) = self.reap_pass.take() else {
            return;
        };
        if pass.id != id || !pass.waiting.remove(peer) {
            self.reap_pass = Some(pass);
            return;
        }
        if pass.reaping {
            // Production awaits each Reap call and ignores its failure.
            if pass.waiting.is_empty() {
                self.reap_finish(pass, fx);
            } else {
                self.reap_pass = Some(pass);
            }
            return;
        }
        match result {
            Ok(PeerResponse::ReapStatus(answers)) if answers.len() == pass.mine.len() => {
                // Every other replica must have held exactly this state for the grace period
                // by its own clock; no member may hold a hint for the key.
                let grace = self.cfg.tombstone_grace_ms.unwrap_or(u64::MAX);
                for (i, (same, hinted, held)) in answers.into_iter().enumerate() {
                    let replica = pass.mine[i].3.iter().any(|p| p == peer);
                    if hinted || (replica && !(same && held >= grace)) {
                        pass.confirmed[i] = false;
                    }
                }
            }
            // An unanswered check proves nothing: this pass reaps nothing.
            _ => return,
        }
        if pass.waiting.is_empty() {
            self.reap_phase(now_ms, pass, fx);
        } else {
            self.reap_pass = Some(pass);
        }
    }
}
