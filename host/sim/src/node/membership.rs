//! Membership changes in the simulated node: gossip of the ring and member states, and the
//! ownership handoff and departure of `host/node/src/cluster/membership.rs`
//! (`handoff_tick`, `hand_off_tree`, `handle_handoff_push`, `depart_if_done`) with
//! `KvService::drop_copy`, as steps of the node's state machine.
//!
//! **Gossip.** A node's ring and member states ([`Meta`]) are on its disk. A commit (the
//! driver calls [`Node::commit`] on one node) is pushed to every peer at once; every gossip
//! tick the node also exchanges its view with the next up peer in turn. Both sides merge
//! (newest ring version, later member state), so a node that missed the push (lost message,
//! partition, down) catches up on a later round. Gossip calls do not feed the failure
//! detector (production: metadata uses the background connections).
//!
//! **Handoff** is driven by the old holder. Every pass offers each tree `(n, partition)`
//! this node holds keys in but is not a primary of under its own ring to the partition's
//! current primaries, once all of them are up: leaf hashes first, key lists of the leaves
//! that differ ([`merkle::diff_keys`]), then the keys a primary lacks or holds differently
//! go out in one `HandoffPush`, which the primary merges and makes durable before it
//! answers. A key is dropped here only once every primary held it (equal leaf, equal
//! digest, or an acknowledged push), only if it is still the state that was checked and no
//! hint for it is held, and only if the ring did not change since the primaries were
//! worked out. A failed, refused or timed-out step abandons the tree (the next pass retries
//! it). Each step carries the sender's ring version, and a primary on another ring refuses
//! it ([`super::MembershipFixes::handoff_same_ring`]).
//!
//! **Departure.** A node whose state is `Leaving` (or `Left`), which its ring no longer has
//! and which holds no keys and no hints, marks itself `Left` and tells every peer; once
//! every peer took the news, and it still holds nothing, it reports
//! [`Observation::Departed`] and the driver removes it.
//!
//! Where production's first rules fell short under the simulator, [`super::MembershipFixes`]
//! names the rule added (here and in production); each can be turned off to reproduce the
//! first version.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use quiver_core::causality::Object;
use quiver_core::membership::MemberState;
use quiver_core::merkle::{self, FANOUT, Hash, LEAVES};
use quiver_core::ring::Ring;
use quiver_node_core::exchange::{AeRequest, AeResponse};

use super::ae::{AE_MAX_KEYS, TreeId, key_of};
use super::{
    CallError, Effect, KeyList, Meta, Node, NodeId, Observation, PeerRequest, PeerResponse, Purpose,
};

/// One handoff pass in flight.
#[derive(Debug)]
pub(in crate::node) struct HandoffPass {
    id: u64,
    /// The version of the ring the trees' primaries were computed from.
    ring_version: u64,
    /// Trees still to offer, with their primaries.
    trees: VecDeque<(TreeId, Vec<NodeId>)>,
    /// Keys the pass may still push (production: `--ae-max-keys`).
    budget: usize,
    tree: Option<TreeTransfer>,
}

/// The transfer of one tree (production: one `hand_off_tree` call).
#[derive(Debug)]
struct TreeTransfer {
    tree: TreeId,
    primaries: Vec<NodeId>,
    /// The ring version the transfer started under: a change drops nothing.
    ring_version: u64,
    /// Every leaf hash of the tree here.
    my_leaves: Vec<Hash>,
    /// Keys of the non-empty leaves as they were when the transfer started.
    mine: BTreeMap<u8, KeyList>,
    /// How many primaries hold each key as listed in `mine`.
    covered: BTreeMap<Vec<u8>, usize>,
    /// The primary being offered the tree (index into `primaries`).
    primary: usize,
    /// Keys of the push awaiting its acknowledgement.
    pushed: Vec<Vec<u8>>,
    /// Keys pushed that changed a primary.
    sent: u64,
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

    /// Trees this node holds keys in but does not replicate under its ring, with the
    /// partition's current primaries (production: `handoff_trees`).
    fn handoff_trees(&self) -> Vec<(TreeId, Vec<NodeId>)> {
        self.replica
            .ae()
            .tree_ids()
            .into_iter()
            .filter_map(|(n, p)| {
                let list = self.meta.ring.preference_list(p, usize::from(n)).ok()?;
                if list.primaries.iter().any(|m| m.id == self.me.node) {
                    return None;
                }
                Some((
                    (n, p),
                    list.primaries.iter().map(|m| m.id.clone()).collect(),
                ))
            })
            .collect()
    }

    /// Starts a handoff pass when one is due (production: `handoff_tick` on its interval;
    /// the next pass starts an interval after the last one ended).
    pub(super) fn handoff_tick(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        if self.handoff.is_some() || now_ms < self.next_handoff_ms {
            return;
        }
        let trees = self.handoff_trees();
        let id = self.next_bg_id();
        self.handoff = Some(HandoffPass {
            id,
            ring_version: self.meta.ring.version(),
            trees: trees.into(),
            budget: AE_MAX_KEYS,
            tree: None,
        });
        self.handoff_next_tree(now_ms, fx);
    }

    /// Moves the pass to its next tree whose primaries are all up, or ends it.
    fn handoff_next_tree(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        loop {
            let Some(pass) = self.handoff.as_mut() else {
                return;
            };
            let pass_ring = pass.ring_version;
            // The trees and their primaries came from the ring at the pass start: after a
            // change the pass ends and the next one works them out again.
            let stale = self.cfg.fixes.pass_ring_version && self.meta.ring.version() != pass_ring;
            let next = if pass.budget == 0 || stale {
                None
            } else {
                pass.trees.pop_front()
            };
            let Some((tree, primaries)) = next else {
                self.handoff = None;
                self.next_handoff_ms = now_ms + self.cfg.handoff_every_ms;
                self.depart_if_done(now_ms, fx);
                return;
            };
            // Every primary must take the keys before any copy here is dropped; while one
            // is down the tree waits (hinted handoff covers writes made meanwhile).
            if !primaries.iter().all(|p| self.is_up(p)) {
                continue;
            }
            let my_leaves: Vec<Hash> = (0..FANOUT as u8)
                .flat_map(|g| self.replica.ae().leaves(tree, g))
                .collect();
            let empty = Hash::default();
            let mine: BTreeMap<u8, KeyList> = my_leaves
                .iter()
                .enumerate()
                .filter(|(_, h)| **h != empty)
                .filter_map(|(i, _)| u8::try_from(i).ok())
                .map(|leaf| (leaf, self.leaf_keys(tree, leaf)))
                .collect();
            let transfer = TreeTransfer {
                tree,
                primaries,
                // The ring the primaries came from; production reads the ring again here.
                ring_version: if self.cfg.fixes.pass_ring_version {
                    pass_ring
                } else {
                    self.meta.ring.version()
                },
                my_leaves,
                mine,
                covered: BTreeMap::new(),
                primary: 0,
                pushed: Vec::new(),
                sent: 0,
            };
            self.handoff_ask_leaves(now_ms, transfer, fx);
            return;
        }
    }

    /// Sends one step of the tree's transfer to the primary being offered it.
    fn handoff_call(
        &mut self,
        now_ms: u64,
        t: &TreeTransfer,
        step: PeerRequest,
        fx: &mut Vec<Effect>,
    ) {
        let Some(pass) = self.handoff.as_ref() else {
            return;
        };
        let Some(peer) = t.primaries.get(t.primary).cloned() else {
            return;
        };
        let purpose = Purpose::Handoff { pass: pass.id };
        let body = PeerRequest::Handoff {
            ring_version: t.ring_version,
            step: Box::new(step),
        };
        let timeout = self.cfg.peer_timeout_ms;
        self.call_untracked(now_ms, &peer, body, timeout, purpose, fx);
    }

    fn handoff_ask_leaves(&mut self, now_ms: u64, t: TreeTransfer, fx: &mut Vec<Effect>) {
        let (n, p) = t.tree;
        let asks = (0..FANOUT as u8).map(|g| (n, p, g)).collect();
        self.handoff_call(now_ms, &t, PeerRequest::Ae(AeRequest::Leaves(asks)), fx);
        if let Some(pass) = self.handoff.as_mut() {
            pass.tree = Some(t);
        }
    }

    /// A reply (or failure) of a step of handoff pass `id`.
    pub(super) fn handoff_result(
        &mut self,
        now_ms: u64,
        id: u64,
        result: Result<PeerResponse, CallError>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(pass) = self.handoff.as_mut() else {
            return;
        };
        if pass.id != id {
            return;
        }
        let Some(mut t) = pass.tree.take() else {
            return;
        };
        match result {
            Ok(PeerResponse::Ae(AeResponse::LeafHashes(lists))) => {
                let empty = Hash::default();
                let mut theirs = vec![empty; LEAVES];
                for (_, _, g, hashes) in lists {
                    for (i, h) in hashes.into_iter().enumerate() {
                        if let Some(slot) = theirs.get_mut(usize::from(g) * FANOUT + i) {
                            *slot = h;
                        }
                    }
                }
                let mut differing = Vec::new();
                for (&leaf, keys) in &t.mine {
                    let i = usize::from(leaf);
                    if t.my_leaves.get(i) == theirs.get(i) {
                        for (dkey, _) in keys {
                            *t.covered.entry(dkey.clone()).or_default() += 1;
                        }
                    } else {
                        differing.push(leaf);
                    }
                }
                if differing.is_empty() {
                    return self.handoff_next_primary(now_ms, t, fx);
                }
                let (n, p) = t.tree;
                let asks = differing.into_iter().map(|l| (n, p, l)).collect();
                self.handoff_call(now_ms, &t, PeerRequest::Ae(AeRequest::Keys(asks)), fx);
                self.handoff_keep(t);
            }
            Ok(PeerResponse::Ae(AeResponse::KeyLists(lists))) => {
                let mut push = Vec::new();
                for (_, _, leaf, theirs) in lists {
                    let Some(my_keys) = t.mine.get(&leaf) else {
                        continue;
                    };
                    let diff = merkle::diff_keys(my_keys, &theirs);
                    let pushing: BTreeSet<&Vec<u8>> = diff.push.iter().collect();
                    for (dkey, _) in my_keys {
                        if !pushing.contains(dkey) {
                            *t.covered.entry(dkey.clone()).or_default() += 1;
                        }
                    }
                    push.extend(diff.push);
                }
                let budget = self.handoff.as_ref().map_or(0, |p| p.budget);
                push.truncate(budget);
                if let Some(pass) = self.handoff.as_mut() {
                    pass.budget -= push.len();
                }
                if push.is_empty() {
                    return self.handoff_next_primary(now_ms, t, fx);
                }
                // Production (`KvService::objects`) sends an empty object for a key that
                // is gone meanwhile; the receiver skips it and the drop finds nothing.
                let objects: Vec<(Vec<u8>, Object)> = push
                    .iter()
                    .map(|d| {
                        let object = key_of(d).map(|k| self.local_object(&k)).unwrap_or_default();
                        (d.clone(), object)
                    })
                    .collect();
                if self.cfg.handoff_drop_before_ack {
                    // BROKEN VARIANT: the push counts as held the moment it is sent.
                    let peer = t.primaries.get(t.primary).cloned().unwrap_or_default();
                    let body = PeerRequest::HandoffPush(objects);
                    let timeout = self.cfg.peer_timeout_ms;
                    self.call_untracked(
                        now_ms,
                        &peer,
                        body,
                        timeout,
                        Purpose::HandoffUnawaited,
                        fx,
                    );
                    for dkey in push {
                        *t.covered.entry(dkey).or_default() += 1;
                    }
                    return self.handoff_next_primary(now_ms, t, fx);
                }
                t.pushed = push;
                self.handoff_call(now_ms, &t, PeerRequest::HandoffPush(objects), fx);
                self.handoff_keep(t);
            }
            Ok(PeerResponse::HandoffStored(changed)) => {
                for dkey in std::mem::take(&mut t.pushed) {
                    *t.covered.entry(dkey).or_default() += 1;
                }
                t.sent += changed;
                self.handoff_next_primary(now_ms, t, fx);
            }
            // Production: `hand_off_tree` returns the error and the pass goes on with the
            // next tree; nothing of this one is dropped.
            _ => self.handoff_next_tree(now_ms, fx),
        }
    }

    fn handoff_keep(&mut self, t: TreeTransfer) {
        if let Some(pass) = self.handoff.as_mut() {
            pass.tree = Some(t);
        }
    }

    /// The current primary is done: offer the tree to the next one, or finish the tree.
    fn handoff_next_primary(&mut self, now_ms: u64, mut t: TreeTransfer, fx: &mut Vec<Effect>) {
        t.primary += 1;
        if t.primary < t.primaries.len() {
            return self.handoff_ask_leaves(now_ms, t, fx);
        }
        let mut dropped = 0;
        // A ring that changed during the transfer may have made this node a replica again.
        if self.meta.ring.version() == t.ring_version {
            for (dkey, digest) in t.mine.values().flatten() {
                if t.covered.get(dkey).copied().unwrap_or(0) < t.primaries.len() {
                    continue;
                }
                if let Some(key) = key_of(dkey)
                    && self.drop_copy(&key, digest)
                {
                    dropped += 1;
                }
            }
        }
        if t.sent + dropped > 0 {
            fx.push(Effect::Observe(Observation::Handoff {
                sent: t.sent,
                dropped,
            }));
        }
        self.handoff_next_tree(now_ms, fx);
    }

    /// `KvService::drop_copy`: deletes this node's copy if it is still exactly the state
    /// `digest` and no hint for the key is held (buffered, like production: a copy a power
    /// loss brings back is handed off again). True when it was removed.
    fn drop_copy(&mut self, key: &str, digest: &Hash) -> bool {
        let owners: Vec<String> = self.meta.members.keys().cloned().collect();
        matches!(
            self.replica
                .drop_copy(&super::ae::data_key(key), digest, &owners, false),
            Ok(true)
        )
    }

    /// The primary's side of a handoff step (production answers `AeLeaves`, `AeKeys` and
    /// `HandoffPush` whatever ring the sender holds).
    pub(super) fn on_handoff_step(
        &mut self,
        from: &str,
        ring_version: u64,
        step: PeerRequest,
    ) -> PeerResponse {
        if self.cfg.fixes.handoff_same_ring && ring_version != self.meta.ring.version() {
            return PeerResponse::Error(format!(
                "handoff under ring {ring_version}, this node holds ring {}",
                self.meta.ring.version()
            ));
        }
        match step {
            PeerRequest::HandoffPush(objects) => self.on_handoff_push(&objects),
            step @ PeerRequest::Ae(AeRequest::Leaves(_) | AeRequest::Keys(_)) => self
                .handle_background(from, step)
                .unwrap_or_else(|| PeerResponse::Error("handoff step not answered".into())),
            other => PeerResponse::Error(format!("not a handoff step: {other:?}")),
        }
    }

    /// The receiving side of a handoff push: merge (nothing newer here is overwritten), then
    /// make it durable before answering (production: `handle_handoff_push`).
    pub(super) fn on_handoff_push(&mut self, objects: &[(Vec<u8>, Object)]) -> PeerResponse {
        let changed = self.ae_merge(objects);
        self.sync();
        PeerResponse::HandoffStored(changed)
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
