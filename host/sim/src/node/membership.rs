//! Membership changes in the simulated node: gossip of the ring and member states, the
//! driver of ownership handoff (`quiver_node_core::handoff`, the production machine) and
//! departure (`depart_if_done` of `host/node/src/cluster/membership.rs`), as steps of the
//! node's state machine.
//!
//! **Gossip.** A node's ring and member states ([`Meta`]) are on its disk. A commit (the
//! driver calls [`Node::commit`] on one node) is pushed to every peer at once; every gossip
//! tick the node also exchanges its view with the next up peer in turn. Both sides merge
//! (newest ring version, later member state), so a node that missed the push (lost message,
//! partition, down) catches up on a later round. Gossip calls do not feed the failure
//! detector (production: metadata uses the background connections).
//!
//! **Handoff** is node-core's [`HandoffPass`]: every pass offers each tree this node holds
//! keys in but no longer replicates to the partition's primaries and drops what all of them
//! hold. This module feeds it: a tree's listing runs at once (production: on the blocking
//! pool), each step goes out as [`PeerRequest::Handoff`] and its answer (or timeout) comes
//! back as a later event, with client writes, crashes and other messages in between. The
//! primary answers with node-core's [`handoff::answer`] and syncs a merged push before it
//! replies.
//!
//! **Departure.** A node whose state is `Leaving` (or `Left`), which its ring no longer has
//! and which holds no keys and no hints, marks itself `Left` and tells every peer; once
//! every peer took the news, and it still holds nothing, it reports
//! [`Observation::Departed`] and the driver removes it.
//!
//! Where production's first rules fell short under the simulator, [`super::MembershipFixes`]
//! names the rule added (here and in production); each can be turned off to reproduce the
//! first version.

use std::collections::BTreeMap;
use std::sync::Arc;

use quiver_core::membership::MemberState;
use quiver_core::ring::Ring;
use quiver_node_core::handoff::{
    self, Answer, Env, HandoffPass, HandoffRequest, HandoffResponse, Step,
};

use super::ae::AE_MAX_KEYS;
use super::{
    CallError, Effect, Meta, Node, NodeId, Observation, PeerRequest, PeerResponse, Purpose,
};

/// One handoff pass in flight: node-core's machine, and the id its calls carry.
#[derive(Debug)]
pub(in crate::node) struct Handoff {
    id: u64,
    pass: HandoffPass,
}

impl Node {
    /// Recomputes the peer list from the member states (production: `apply_membership`):
    /// every member that has not left.
    pub(super) fn apply_membership(&mut self) {
        self.peers = self
            .meta
            .members
            .iter()
            .filter(|(id, state)| **state != MemberState::Left && **id != self.me.node)
            .map(|(id, _)| id.clone())
            .collect();
    }

    /// Merges `incoming` into this node's metadata, durable before it takes effect; true
    /// when anything changed.
    fn take_meta(&mut self, incoming: &Meta) -> bool {
        let mut meta = self.meta.clone();
        if !meta.merge(incoming) {
            return false;
        }
        self.disk.meta = Some(meta.clone());
        self.meta = meta;
        self.apply_membership();
        true
    }

    /// An operator committed a membership change here (production: `quiver cluster commit`
    /// on this node): `ring` becomes this node's ring, `states` the new member states; the
    /// change is pushed to every peer at once.
    pub fn commit(
        &mut self,
        now_ms: u64,
        ring: Arc<Ring>,
        states: &BTreeMap<NodeId, MemberState>,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.clock_ms = now_ms;
        let incoming = Meta {
            ring,
            members: states.clone(),
        };
        if self.take_meta(&incoming) {
            self.push_meta(now_ms, Purpose::Gossip, &mut fx);
        }
        fx
    }

    /// Sends this node's metadata to every peer; returns how many were asked.
    fn push_meta(&mut self, now_ms: u64, purpose: Purpose, fx: &mut Vec<Effect>) -> usize {
        let peers = self.peers.clone();
        for peer in &peers {
            let body = PeerRequest::Gossip(self.meta.clone());
            let timeout = self.cfg.peer_timeout_ms;
            self.call_untracked(now_ms, peer, body, timeout, purpose.clone(), fx);
        }
        peers.len()
    }

    /// One gossip round: exchange views with the next up peer in turn.
    pub(super) fn gossip_tick(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        if now_ms < self.next_gossip_ms {
            return;
        }
        self.next_gossip_ms = now_ms + self.cfg.gossip_every_ms;
        let up: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|p| self.is_up(p))
            .cloned()
            .collect();
        if up.is_empty() {
            return;
        }
        let peer = up[self.gossip_next_peer % up.len()].clone();
        self.gossip_next_peer = self.gossip_next_peer.wrapping_add(1);
        let body = PeerRequest::Gossip(self.meta.clone());
        let timeout = self.cfg.peer_timeout_ms;
        self.call_untracked(now_ms, &peer, body, timeout, Purpose::Gossip, fx);
    }

    /// The receiving side of a gossip round.
    pub(super) fn on_gossip(&mut self, incoming: &Meta) -> PeerResponse {
        self.take_meta(incoming);
        PeerResponse::Gossip(self.meta.clone())
    }

    /// The answer to a gossip round this node started (or to a pushed change).
    pub(super) fn gossip_result(&mut self, result: Result<PeerResponse, CallError>) {
        if let Ok(PeerResponse::Gossip(meta)) = result {
            self.take_meta(&meta);
        }
    }

    /// Hint markers for members that left can never be delivered (production keeps them
    /// forever, and a leaving node holding one never departs). The copy stays: if this node
    /// is not a primary of the key, ownership handoff takes it to the key's primaries.
    pub(super) fn forget_hints_for_left(&mut self) {
        if self.hint_count() == 0 {
            return;
        }
        let left: Vec<String> = self
            .meta
            .members
            .iter()
            .filter(|(id, state)| **state == MemberState::Left && **id != self.me.node)
            .map(|(id, _)| id.clone())
            .collect();
        // As production's `forget_hints_for_departed`: a pass drops up to 256 markers per
        // departed owner, keeping the copies.
        for owner in left {
            let hinted = self
                .replica
                .hinted_keys(&owner, 256)
                .expect("a live node's hints are readable");
            for h in hinted {
                let Ok(key) = String::from_utf8(h.key) else {
                    continue;
                };
                self.hint_delivered(&owner, &key, &h.object, true);
            }
        }
    }

    /// Starts a handoff pass when one is due (production: `handoff_tick` on its interval;
    /// the next pass starts an interval after the last one ended).
    pub(super) fn handoff_tick(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        if self.handoff.is_some() || now_ms < self.next_handoff_ms {
            return;
        }
        let id = self.next_bg_id();
        let broken = self.cfg.broken();
        let pass = HandoffPass::start(
            &self.replica,
            &self.me.node,
            &self.meta.ring,
            AE_MAX_KEYS,
            broken,
        );
        self.handoff = Some(Handoff { id, pass });
        self.handoff_drive(now_ms, None, fx);
    }

    /// Feeds node-core's pass until it waits for an answer or ends: with `answer`, the
    /// answer to its last call first. Listing runs at once (production: on the blocking
    /// pool); each call's answer arrives as a later event, with anything in between.
    fn handoff_drive(
        &mut self,
        now_ms: u64,
        answer: Option<Result<HandoffResponse, String>>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(Handoff { id, mut pass }) = self.handoff.take() else {
            return;
        };
        let mut step = self.with_handoff_env(|env| match answer {
            Some(a) => pass.on_response(env, a),
            None => pass.next(env),
        });
        loop {
            step = match step {
                Step::List(listing) => {
                    let listed = listing.run(&self.replica).map_err(|e| e.to_string());
                    self.with_handoff_env(|env| pass.on_listed(env, listed))
                }
                Step::Call { peer, request } => {
                    let timeout = self.cfg.peer_timeout_ms;
                    let purpose = Purpose::Handoff { pass: id };
                    let body = PeerRequest::Handoff(request);
                    self.call_untracked(now_ms, &peer, body, timeout, purpose, fx);
                    self.handoff = Some(Handoff { id, pass });
                    return;
                }
                Step::Post { peer, request } => {
                    let timeout = self.cfg.peer_timeout_ms;
                    let purpose = Purpose::HandoffUnawaited;
                    let body = PeerRequest::Handoff(request);
                    self.call_untracked(now_ms, &peer, body, timeout, purpose, fx);
                    self.with_handoff_env(|env| pass.next(env))
                }
                Step::Tree(report) => {
                    if report.error.is_none() && report.sent + report.dropped > 0 {
                        fx.push(Effect::Observe(Observation::Handoff {
                            sent: report.sent,
                            dropped: report.dropped,
                        }));
                    }
                    self.with_handoff_env(|env| pass.next(env))
                }
                Step::Done => {
                    self.next_handoff_ms = now_ms + self.cfg.handoff_every_ms;
                    self.depart_if_done(now_ms, fx);
                    return;
                }
            };
        }
    }

    /// Runs `f` with what the pass reads of this node as it goes (production: the
    /// server's `Peers::names` as the owners a hint could be held for).
    fn with_handoff_env<R>(&self, f: impl FnOnce(&Env<'_>) -> R) -> R {
        let ring = || self.meta.ring.id();
        let is_up = |p: &str| self.is_up(p);
        let owners = || self.peers.clone();
        f(&Env {
            replica: &self.replica,
            ring: &ring,
            is_up: &is_up,
            owners: &owners,
        })
    }

    /// A reply (or failure) of a step of handoff pass `id`.
    pub(super) fn handoff_result(
        &mut self,
        now_ms: u64,
        id: u64,
        result: Result<PeerResponse, CallError>,
        fx: &mut Vec<Effect>,
    ) {
        if self.handoff.as_ref().is_none_or(|h| h.id != id) {
            return;
        }
        let answer = match result {
            Ok(PeerResponse::Handoff(r)) => Ok(r),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(CallError::Refused(e)) => Ok(HandoffResponse::Refused(e)),
            Err(CallError::Timeout) => Err("no answer in time".to_string()),
        };
        self.handoff_drive(now_ms, Some(answer), fx);
    }

    /// The primary's side of a handoff step (production: `handle_handoff`): node-core
    /// answers; a merged push is made durable before the answer goes out.
    pub(super) fn on_handoff(&mut self, request: HandoffRequest) -> PeerResponse {
        let broken = self.cfg.broken();
        match handoff::answer(
            &self.replica,
            &self.me.node,
            &self.meta.ring,
            broken,
            request,
        ) {
            Answer::Reply(HandoffResponse::WrongRing(e) | HandoffResponse::Refused(e)) => {
                PeerResponse::Error(e)
            }
            Answer::Reply(response) => PeerResponse::Handoff(response),
            Answer::SyncThenStored(changed) => {
                self.sync();
                PeerResponse::Handoff(HandoffResponse::Stored(changed))
            }
        }
    }

    /// True when this node is done leaving: told to leave, out of its ring, nothing held.
    fn done_leaving(&self) -> bool {
        matches!(
            self.meta.state(&self.me.node),
            Some(MemberState::Leaving | MemberState::Left)
        ) && self.meta.ring.member(&self.me.node).is_none()
            && self.replica.ae().keys() == 0
            && self.hint_count() == 0
    }

    /// A leaving node that owns and holds nothing marks itself left and tells its peers
    /// (production: `depart_if_done`); it stops once one of them (or, with
    /// [`super::MembershipFixes::depart_when_all_told`], every one) took the news.
    fn depart_if_done(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        if self.departing.is_some() || !self.done_leaving() {
            return;
        }
        let me = self.me.node.clone();
        let left = Meta {
            ring: Arc::clone(&self.meta.ring),
            members: BTreeMap::from([(me, MemberState::Left)]),
        };
        self.take_meta(&left);
        let asked = self.push_meta(now_ms, Purpose::Depart, fx);
        self.departing = Some(Departure {
            asked,
            answered: 0,
            told: 0,
        });
    }

    /// The answer of a peer told that this node left.
    pub(super) fn depart_result(
        &mut self,
        result: Result<PeerResponse, CallError>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(mut d) = self.departing.take() else {
            return;
        };
        d.answered += 1;
        if let Ok(PeerResponse::Gossip(meta)) = result {
            d.told += 1;
            self.take_meta(&meta);
        }
        let enough = if self.cfg.fixes.depart_when_all_told {
            d.told == d.asked
        } else {
            d.told > 0
        };
        // A store from a coordinator on an older ring may have landed since the news went
        // out: then this node stays and hands it off first.
        if enough && (!self.cfg.fixes.depart_recheck || self.done_leaving()) {
            // The driver removes the node on this observation: no later reply reaches it.
            fx.push(Effect::Observe(Observation::Departed));
            return;
        }
        if d.answered < d.asked {
            self.departing = Some(d);
        }
        // Otherwise the next handoff pass tries again.
    }
}

/// A departure announcement in flight.
#[derive(Debug)]
pub(in crate::node) struct Departure {
    asked: usize,
    answered: usize,
    told: usize,
}
