//! Active anti-entropy and tombstone reaping in the simulated node, as drivers of the
//! production machines: the index (`quiver_node_core::ae::AeIndex`, on the simulated disk
//! in the record's batch), the exchange (`quiver_node_core::exchange`, production's driver
//! is `host/node/src/cluster/ae.rs`) and the reaping pass with its member side
//! (`quiver_node_core::reap`, production's driver is `host/node/src/cluster/reap.rs`).
//!
//! Each step of an exchange or a reaping pass is a call with the peer timeout; a failed or
//! timed-out step is reported to the machine as such; replies to an abandoned exchange or
//! pass carry its id and are ignored. Exchanges and reaping checks do not feed the failure
//! detector (production: `call_untracked`).

use quiver_core::causality::Object;
use quiver_core::storage::{StorageError, keys};

use super::calls::{CallError, Purpose, call_answer};
use super::sync::AfterSync;
use super::{Effect, Message, Node, NodeDisk, NodeId, Observation};
use crate::ae::Placement;
use crate::buckets;
use crate::exchange::{self, AeRequest, Answering, Step};
use crate::protocol::{PeerRequest, PeerResponse};
use crate::reap::{self, ReapAnswering, ReapRequest, ReapResponse, ReapStart, ReapStep};

/// Keys repaired per exchange at most (production: `--ae-max-keys`).
pub const AE_MAX_KEYS: usize = 10_000;

/// A tree's identity: replication factor and partition.
pub type TreeId = crate::ae::TreeId;

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
    pub(super) id: u64,
    /// The production pass (`quiver_node_core::reap::ReapPass`).
    pub(super) machine: reap::ReapPass,
}

impl<D: NodeDisk> Node<D> {
    /// Where this node files its keys: the ring's partitions, the configured replication
    /// factor, and the buckets whose own differs (from the configuration or their spec).
    pub fn placement(&self) -> Placement {
        let own = self
            .cfg
            .buckets
            .keys()
            .chain(self.meta.buckets.keys())
            .map(|b| (b.clone(), self.props(b).quorum.n));
        buckets::placement(self.ring.partitions(), self.cfg.quorum.n, own)
    }

    /// Refiles one batch of keys the anti-entropy index holds under an old placement
    /// (production: `Cluster::ae_refile`); the index is exact again after the last.
    pub(super) fn ae_refile_batch(&mut self) {
        const REFILE_BATCH: usize = 4096;
        if !self.ae_refile_pending {
            return;
        }
        let ae = self.replica.ae();
        let generation = ae.generation();
        let misfiled = match ae.misfiled(&*self.disk.engine(), REFILE_BATCH) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(node = %self.me.node, error = %e, "cannot scan anti-entropy entries");
                return;
            }
        };
        for dkey in &misfiled {
            if let Err(e) = self.replica.ae_refile(dkey) {
                tracing::error!(node = %self.me.node, error = %e, "cannot refile an anti-entropy entry");
                return;
            }
        }
        if misfiled.len() < REFILE_BATCH {
            self.replica.ae().refiled(generation);
            self.ae_refile_pending = false;
        }
    }

    /// Loads the anti-entropy index from the disk, or rebuilds it from the records when its
    /// entries are absent (at boot; production: `AeIndex::open`).
    pub(super) fn rebuild_ae(&mut self) -> Result<(), StorageError> {
        self.replica.ae().set_placement(self.placement());
        self.replica.ae().open(&*self.disk.engine())?;
        Ok(())
    }

    /// Stops starting new reaping passes (the driver's final phase).
    pub fn pause_reaping(&mut self) {
        self.reaping_paused = true;
    }

    /// The trees this node and `peer` both replicate (production: `shared_trees`).
    fn shared_trees(&self, peer: &str) -> Vec<TreeId> {
        exchange::shared_trees(&self.ring, &self.placement(), &self.me.node, peer)
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
            PeerRequest::from(body),
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
        let response = call_answer(result).and_then(|r| {
            r.into_ae()
                .ok_or_else(|| "not an anti-entropy answer".to_string())
        });
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

    /// The replica side of an exchange (production: `handle_ae_peer`).
    pub(super) fn answer_ae(&mut self, from: &str, request: AeRequest) -> PeerResponse {
        // The production answering side, lease included.
        let placement = self.placement();
        let at = Answering {
            me: &self.me.node,
            ring: &self.ring,
            placement: &placement,
            sender_is_member: self.peers.iter().any(|p| p == from),
        };
        let now = self.clock_ms;
        PeerResponse::from(exchange::answer(
            &self.replica,
            &at,
            &mut self.ae_lease,
            now,
            request,
        ))
    }

    /// Starts a reaping pass (production: `Cluster::reap_tombstones`), the machine of
    /// `quiver_node_core::reap`.
    fn start_reap(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        let Some(grace) = self.cfg.tombstone_grace_ms else {
            return;
        };
        let members = self.peers.clone();
        let is_up = |m: &str| self.is_up(m);
        let primaries =
            |bucket: &str, key: &[u8]| self.preference(bucket, key, self.props(bucket).quorum.n).0;
        let start = ReapStart {
            me: &self.me.node,
            ring: self.ring.id(),
            members: &members,
            is_up: &is_up,
            primaries: &primaries,
            grace_ms: grace,
            now_ms: self.wall_ms(),
            broken: self.cfg.broken,
        };
        let Some((machine, step)) = reap::ReapPass::start(&self.replica, &start) else {
            return;
        };
        let id = self.next_bg_id();
        self.reap_drive(now_ms, ReapPass { id, machine }, step, fx);
    }

    /// Carries out `step` of `pass`: a sync (the pass waits for it), the requests as calls
    /// with the peer timeout, the keys reaped as observations.
    pub(super) fn reap_drive(
        &mut self,
        now_ms: u64,
        pass: ReapPass,
        step: ReapStep,
        fx: &mut Vec<Effect>,
    ) {
        match step {
            ReapStep::Sync => {
                let id = pass.id;
                self.reap_pass = Some(pass);
                self.sync_then(now_ms, AfterSync::Reap(id), fx);
            }
            ReapStep::Send(requests) => {
                let id = pass.id;
                self.reap_pass = Some(pass);
                for (member, request) in requests {
                    let timeout = self.cfg.peer_timeout_ms;
                    let body = PeerRequest::from(request);
                    let purpose = Purpose::Reap { pass: id };
                    self.call_untracked(now_ms, &member, body, timeout, purpose, fx);
                }
            }
            ReapStep::Wait => self.reap_pass = Some(pass),
            ReapStep::Done(report) => {
                for (dkey, object) in report.reaped {
                    let Some((bucket, key)) = keys::split_data_key(&dkey) else {
                        continue;
                    };
                    fx.push(Effect::Observe(Observation::Reaped {
                        node: self.me.node.clone(),
                        bucket: String::from_utf8_lossy(bucket).into_owned(),
                        key: key.to_vec(),
                        object,
                    }));
                }
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
        if pass.id != id {
            self.reap_pass = Some(pass);
            return;
        }
        let answer = call_answer(result).and_then(|r| {
            r.into_reap()
                .ok_or_else(|| "not a reaping answer".to_string())
        });
        let ring = self.ring.id();
        let step = pass.machine.on_response(&self.replica, peer, answer, ring);
        self.reap_drive(now_ms, pass, step, fx);
    }

    /// The member side of reaping (production: `handle_reap_peer`): the answer to `from`'s
    /// call `id`, after a sync when the check asks for one.
    pub(super) fn answer_reap(
        &mut self,
        now_ms: u64,
        from: &str,
        id: u64,
        request: ReapRequest,
        fx: &mut Vec<Effect>,
    ) {
        let answer =
            self.with_reap_answering(|node, at, now| reap::answer(&node.replica, at, request, now));
        match answer {
            reap::Answer::Reply(response) => fx.push(Effect::Send {
                to: from.to_string(),
                msg: Message::Response {
                    id,
                    body: PeerResponse::from(response),
                },
            }),
            reap::Answer::SyncFirst(pending) => {
                let then = AfterSync::ReapAnswer {
                    to: from.to_string(),
                    id,
                    pending,
                };
                self.sync_then(now_ms, then, fx);
            }
        }
    }

    /// A reaping check's answer once this node's applied writes are durable.
    pub(super) fn reap_answer_synced(&self, pending: reap::PendingCheck) -> ReapResponse {
        self.with_reap_answering(|node, at, now| pending.answer(&node.replica, at, now))
    }

    /// Runs `f` with what a member knows when it answers a reaper, and its wall clock.
    fn with_reap_answering<R>(&self, f: impl FnOnce(&Self, &ReapAnswering<'_>, u64) -> R) -> R {
        let members = self.peers.clone();
        let me = self.me.node.clone();
        let is_primary = |bucket: &str, key: &[u8]| {
            let n = self.props(bucket).quorum.n;
            self.preference(bucket, key, n).0.contains(&me)
        };
        let at = ReapAnswering {
            ring: self.ring.id(),
            members: &members,
            is_primary: &is_primary,
            broken: self.cfg.broken,
        };
        f(self, &at, self.wall_ms())
    }
}
