//! Membership in the simulated node, as the driver of node-core's rules
//! (`quiver_node_core::membership`, `quiver_node_core::handoff`): the production gossip,
//! ownership handoff and departure, each step a message with other events in between.
//!
//! **Gossip.** A node's metadata (production's `MetaState`: members and the committed ring)
//! is on its disk. A commit (the driver calls [`Node::commit`] on one node) is pushed to
//! every peer at once (`MetaPush`); every gossip tick the node asks one peer that is up (two
//! in clusters of more than five), in turn, for its state if their digests differ
//! (`MetaDigest`), and merges it. Gossip calls do not feed the failure detector (production:
//! metadata uses the background connections).
//!
//! **Handoff** is node-core's [`HandoffPass`]: every pass offers each tree this node holds
//! keys in but no longer replicates to the partition's primaries and drops what all of them
//! hold. A tree's listing runs at once, or after a delay as on the server's blocking pool
//! (`NodeConfig::handoff_listing_ms`); each step goes out as its `OnRing` request and its
//! answer (or timeout) comes back as a later event, with client writes, crashes and other
//! messages in between. The
//! primary answers with node-core's [`handoff::answer`] and syncs a merged push before it
//! replies.
//!
//! **Departure.** A node told to leave, which its ring no longer has and which holds no
//! keys and no hints, marks itself `Left` and pushes that to every peer; node-core's
//! [`Departure`] says when enough took the news, and if it still holds nothing it reports
//! [`Observation::Departed`] and the driver removes it.
//!
//! Where production's first rules fell short under the simulator, [`super::MembershipFixes`]
//! names the rule added; each maps to a broken variant of node-core's rules and can be
//! turned off to reproduce the first version.

use std::collections::BTreeMap;
use std::sync::Arc;

use quiver_core::membership::{MemberEntry, MemberState, RingEntry};
use quiver_core::meta::{MetaState, Stamp};
use quiver_core::ring::Ring;

use super::ae::AE_MAX_KEYS;
use super::calls::{CallError, Purpose, call_answer};
use super::sync::AfterSync;
use super::{Effect, Message, Node, NodeDisk, NodeId, Observation};
use crate::handoff::{
    self, Answer, Env, HandoffPass, HandoffRequest, HandoffResponse, Listing, Step,
};
use crate::membership::{self as rules, DepartStep, Departure};
use crate::protocol::{PeerRequest, PeerResponse};
use crate::rng::Rng;

/// One handoff pass in flight: node-core's machine, and the id its calls carry.
#[derive(Debug)]
pub(super) struct Handoff {
    id: u64,
    pass: HandoffPass,
    /// A listing the pass asked for, and when it runs (with a listing delay).
    listing: Option<(u64, Listing)>,
}

impl Handoff {
    /// When the listing the pass waits for runs, if it waits for one.
    pub(super) fn listing_due(&self) -> Option<u64> {
        self.listing.as_ref().map(|(due, _)| *due)
    }
}

/// What resumes a handoff pass.
enum Resume {
    /// The pass starts.
    Start,
    /// A pending listing runs now.
    List(Listing),
    /// The answer to the pass's last call.
    Answer(Result<HandoffResponse, String>),
}

/// A departure announcement in flight: node-core's tally, and the id its calls carry.
#[derive(Debug)]
pub(super) struct Leaving {
    id: u64,
    departure: Departure,
}

impl<D: NodeDisk> Node<D> {
    /// Makes the ring and peer list follow the metadata (production: `apply_membership`).
    pub(super) fn apply_membership(&mut self) {
        if let Some(ring) = rules::ring_to_apply(&self.meta, &self.ring) {
            self.ring = Arc::new(ring.clone());
        }
        self.peers = rules::peers(&self.meta, &self.me.node)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        // A bucket whose n changed files its keys in other trees from now on.
        if self.replica.ae().set_placement(self.placement()) {
            self.ae_refile_pending = true;
        }
    }

    /// Merges `incoming` into this node's metadata, durable before it takes effect
    /// (production: `take_meta`); true when anything changed.
    fn take_meta(&mut self, incoming: &MetaState) -> bool {
        let mut meta = self.meta.clone();
        if meta.merge(incoming).is_empty() {
            return false;
        }
        self.disk.store_meta(meta.clone());
        self.meta = meta;
        self.meta_generation += 1;
        self.apply_membership();
        true
    }

    /// A change of the cluster metadata made on this node (a bucket's properties, a
    /// plugin, an access key, a membership change an operator staged): merged, durable,
    /// in effect, and pushed to every peer at once (gossip carries it on from there).
    /// Nothing goes out when it changes nothing here.
    pub fn change_meta(&mut self, now_ms: u64, incoming: &MetaState) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.set_clock(now_ms);
        if self.take_meta(incoming) {
            self.push_meta(now_ms, Purpose::Gossip, &mut fx);
        }
        fx
    }

    /// Counts the changes of this node's metadata (from gossip, pushes, commits and
    /// [`Node::change_meta`]): a driver that keeps views of it (buckets, plugins, keys)
    /// refreshes them when this moves.
    pub fn meta_generation(&self) -> u64 {
        self.meta_generation
    }

    /// A stamp of this node now, by its (possibly skewed) wall clock.
    fn stamp(&self) -> Stamp {
        Stamp::at(self.wall_ms(), self.me.node.clone())
    }

    /// An operator committed a membership change here (production: `quiver cluster leave`
    /// or `join`, then `commit`, on this node): `ring` becomes the committed ring, `states`
    /// the new states of those members; the change is pushed to every peer at once.
    pub fn commit(
        &mut self,
        now_ms: u64,
        ring: Arc<Ring>,
        states: &BTreeMap<NodeId, MemberState>,
        addr_of: &dyn Fn(&str) -> String,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.set_clock(now_ms);
        let stamp = self.stamp();
        let members = states
            .iter()
            .filter_map(|(id, &state)| {
                let entry = match self.meta.members.get(id) {
                    Some(e) if e.state == state => return None,
                    Some(e) => e.with_state(state, stamp.clone()),
                    None => MemberEntry {
                        version: 0,
                        stamp: stamp.clone(),
                        addr: addr_of(id),
                        weight: 1,
                        zone: None,
                        state,
                    },
                };
                Some((id.clone(), entry))
            })
            .collect();
        let incoming = MetaState {
            members,
            ring: Some(RingEntry {
                ring: (*ring).clone(),
                stamp,
            }),
            ..MetaState::default()
        };
        if self.take_meta(&incoming) {
            self.push_meta(now_ms, Purpose::Gossip, &mut fx);
        }
        fx
    }

    /// Pushes this node's metadata to every peer (production: `push_meta`); returns how
    /// many were asked.
    fn push_meta(&mut self, now_ms: u64, purpose: Purpose, fx: &mut Vec<Effect>) -> usize {
        let peers = self.peers.clone();
        for peer in &peers {
            let body = PeerRequest::MetaPush {
                state: self.meta.clone(),
                blobs: Vec::new(),
            };
            let timeout = self.cfg.peer_timeout_ms;
            self.call_untracked(now_ms, peer, body, timeout, purpose.clone(), fx);
        }
        peers.len()
    }

    /// One gossip round (production: `sync_meta`): ask one or two peers that are up, in
    /// turn, whether their metadata differs.
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
        // Partners drawn at random, as production's: a fixed rotation with two partners a
        // round skipped some peers for dozens of rounds, and a change only its committer
        // held never spread (membership-stress seed 5000202).
        let mut draw = Rng::new(self.gossip_seed ^ self.gossip_next_peer as u64);
        self.gossip_next_peer = self.gossip_next_peer.wrapping_add(1);
        let targets = rules::gossip_targets(&up, |n| draw.index(n));
        for peer in targets {
            let body = rules::digest_request(&self.meta);
            let timeout = self.cfg.peer_timeout_ms;
            self.call_untracked(now_ms, &peer, body, timeout, Purpose::Gossip, fx);
        }
    }

    /// The answer to a gossip round's question (production: `handle_meta_peer`).
    pub(super) fn on_meta_digest(&self, digest: [u8; 32]) -> PeerResponse {
        rules::answer_digest(&self.meta, digest)
    }

    /// A pushed change (production: `handle_meta_peer`): merged, durable, acknowledged.
    pub(super) fn on_meta_push(&mut self, state: &MetaState) -> PeerResponse {
        self.take_meta(state);
        PeerResponse::Stored
    }

    /// The answer to a gossip round this node started, or to a pushed change: a pulled
    /// state is merged, and this node's pushed back if the peer lacks part of it.
    pub(super) fn gossip_result(
        &mut self,
        now_ms: u64,
        peer: &str,
        result: Result<PeerResponse, CallError>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(state) = call_answer(result).ok().and_then(rules::pulled_state) else {
            return;
        };
        self.take_meta(&state);
        if rules::push_back(&self.meta, &state) {
            let body = PeerRequest::MetaPush {
                state: self.meta.clone(),
                blobs: Vec::new(),
            };
            let timeout = self.cfg.peer_timeout_ms;
            self.call_untracked(now_ms, peer, body, timeout, Purpose::Gossip, fx);
        }
    }

    /// Hint markers for members that left can never be delivered (production:
    /// `forget_hints_for_departed`, node-core's `departed_hints`): the markers go, the
    /// copies stay and reach the key's primaries by handoff.
    pub(super) fn forget_hints_for_left(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        let hinted = match rules::departed_hints(
            &self.replica,
            &self.meta,
            &self.me.node,
            self.cfg.broken,
        ) {
            Ok(hinted) => hinted,
            Err(e) => {
                tracing::error!(node = %self.me.node, error = %e, "cannot list hints for members that left");
                return;
            }
        };
        for (owner, h) in hinted {
            self.hint_delivered(now_ms, fx, &owner, &h, true);
        }
    }

    /// Starts a handoff pass when one is due (production: `handoff_tick` on its interval;
    /// the next pass starts an interval after the last one ended).
    pub(super) fn handoff_tick(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        if let Some(h) = self.handoff.as_mut()
            && h.listing.as_ref().is_some_and(|(due, _)| *due <= now_ms)
            && let Some((_, listing)) = h.listing.take()
        {
            self.handoff_drive(now_ms, Resume::List(listing), fx);
            return;
        }
        if self.handoff.is_some() || now_ms < self.next_handoff_ms {
            return;
        }
        let id = self.next_bg_id();
        let broken = self.cfg.broken;
        let pass = HandoffPass::start(
            &self.replica,
            &self.me.node,
            &self.ring,
            AE_MAX_KEYS,
            broken,
        );
        self.handoff = Some(Handoff {
            id,
            pass,
            listing: None,
        });
        self.handoff_drive(now_ms, Resume::Start, fx);
    }

    /// Feeds node-core's pass until it waits for an answer or ends. A listing runs at once,
    /// or, with a listing delay (`NodeConfig::handoff_listing_ms`), at the first tick after
    /// it, as the server's waits on its blocking pool: writes landing between the choice
    /// of a tree's leaves and their listing are what the "hashes as listed" rule is for.
    /// Each call's answer arrives as a later event, with anything in between.
    fn handoff_drive(&mut self, now_ms: u64, resume: Resume, fx: &mut Vec<Effect>) {
        let Some(Handoff { id, mut pass, .. }) = self.handoff.take() else {
            return;
        };
        let mut step = match resume {
            Resume::Start => self.with_handoff_env(|env| pass.next(env)),
            Resume::List(listing) => {
                let listed = listing.run(&self.replica).map_err(|e| e.to_string());
                self.with_handoff_env(|env| pass.on_listed(env, listed))
            }
            Resume::Answer(a) => self.with_handoff_env(|env| pass.on_response(env, a)),
        };
        loop {
            step = match step {
                Step::List(listing) if self.cfg.handoff_listing_ms > 0 => {
                    let due = now_ms + self.cfg.handoff_listing_ms;
                    self.handoff = Some(Handoff {
                        id,
                        pass,
                        listing: Some((due, listing)),
                    });
                    return;
                }
                Step::List(listing) => {
                    let listed = listing.run(&self.replica).map_err(|e| e.to_string());
                    self.with_handoff_env(|env| pass.on_listed(env, listed))
                }
                Step::Call { peer, request } => {
                    let timeout = self.cfg.peer_timeout_ms;
                    let purpose = Purpose::Handoff { pass: id };
                    let body = PeerRequest::from(request);
                    self.call_untracked(now_ms, &peer, body, timeout, purpose, fx);
                    self.handoff = Some(Handoff {
                        id,
                        pass,
                        listing: None,
                    });
                    return;
                }
                Step::Post { peer, request } => {
                    let timeout = self.cfg.peer_timeout_ms;
                    let purpose = Purpose::HandoffUnawaited;
                    let body = PeerRequest::from(request);
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
        let ring = || self.ring.id();
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
        let answer = call_answer(result).and_then(PeerResponse::into_handoff);
        self.handoff_drive(now_ms, Resume::Answer(answer), fx);
    }

    /// The primary's side of a handoff step (production: `handle_handoff`): node-core
    /// answers; a merged push is made durable before the answer goes out.
    pub(super) fn on_handoff(
        &mut self,
        now_ms: u64,
        from: &str,
        id: u64,
        request: HandoffRequest,
        fx: &mut Vec<Effect>,
    ) {
        let broken = self.cfg.broken;
        let body = match handoff::answer(&self.replica, &self.me.node, &self.ring, broken, request)
        {
            Answer::Reply(response) => PeerResponse::from(response),
            Answer::SyncThenStored(changed) => {
                let then = AfterSync::Respond {
                    to: from.to_string(),
                    id,
                    body: Box::new(PeerResponse::HandoffStored(changed)),
                };
                return self.sync_then(now_ms, then, fx);
            }
        };
        fx.push(Effect::Send {
            to: from.to_string(),
            msg: Message::Response { id, body },
        });
    }

    /// True when this node is done leaving: told to leave, out of its ring, nothing held.
    fn done_leaving(&self) -> bool {
        let holds_nothing = self.replica.ae().keys() == 0 && self.hint_count() == 0;
        rules::done_leaving(&self.meta, &self.ring, &self.me.node, holds_nothing)
    }

    /// A leaving node that owns and holds nothing marks itself left and tells its peers
    /// (production: `depart_if_done`); it stops once node-core's [`Departure`] says enough
    /// of them took the news, and it still holds nothing.
    fn depart_if_done(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        if self.departing.is_some() || !self.done_leaving() {
            return;
        }
        if let Some(change) = rules::left_change(&self.meta, &self.me.node, self.stamp()) {
            self.take_meta(&change);
        }
        let id = self.next_bg_id();
        let asked = self.push_meta(now_ms, Purpose::Depart { id }, fx);
        let departure = Departure::new(asked, self.cfg.broken);
        let step = departure.step();
        self.departing = Some(Leaving { id, departure });
        self.depart_step(step, fx);
    }

    /// The answer of a peer told that this node left (announcement `id`).
    pub(super) fn depart_result(
        &mut self,
        id: u64,
        result: Result<PeerResponse, CallError>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(leaving) = self.departing.as_mut().filter(|l| l.id == id) else {
            return;
        };
        let told = matches!(result, Ok(PeerResponse::Stored));
        let step = leaving.departure.on_answer(told);
        self.depart_step(step, fx);
    }

    fn depart_step(&mut self, step: DepartStep, fx: &mut Vec<Effect>) {
        match step {
            DepartStep::Wait => {}
            DepartStep::Stop { recheck } => {
                self.departing = None;
                // A store from a coordinator on an older ring may have landed since the
                // news went out: then this node stays and hands it off first.
                if !recheck || self.done_leaving() {
                    // The driver removes the node on this observation: no later reply
                    // reaches it.
                    fx.push(Effect::Observe(Observation::Departed));
                }
            }
            // The next handoff pass tries again.
            DepartStep::Retry => self.departing = None,
        }
    }
}
