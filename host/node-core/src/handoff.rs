//! Ownership handoff (Dynamo §4.9): after a ring change the *old* holder of a replica offers
//! every tree `(n, partition)` it holds keys in but no longer replicates to the partition's
//! current primaries, and drops its copies once every primary holds them.
//!
//! A [`HandoffPass`] is a sans-IO state machine over all orphaned trees, with a budget of
//! keys pushed per pass. Per tree: the non-empty leaves are listed (keys and digests, and the
//! hash of each leaf *as listed*); per primary, in turn: its leaf hashes, the key lists of
//! the leaves that differ, then the keys it lacks or holds differently go out in pushes of at
//! most [`HANDOFF_PUSH_BYTES`], which the primary merges and makes durable before it answers.
//! A key counts as held by a primary on an equal leaf hash, an equal digest or an
//! acknowledged push. Once every primary was offered the tree, and only if the node's ring is
//! still the pass's ring, each listed key every primary holds is dropped with
//! [`Replica::drop_copy`], which drops nothing whose state changed since it was listed or
//! that a hint still needs.
//!
//! The leaf hashes compared are those of the keys as listed, neither the tree's hashes read
//! when its leaves were chosen (the listing runs after an await in the server, so a write
//! landing in between is listed but would not be in them) nor the tree as it is when the
//! primary's answer arrives: only the listed keys are counted and dropped, so only their
//! hash may vouch for them.
//!
//! Every step goes wrapped with the sender's [`RingId`], and [`answer`] refuses a step from
//! a node on another ring: nodes on different rings disagree on who replicates a key, and
//! acting together they could each count the other as the replica and both drop it.
//!
//! All the state is the orphaned records themselves, so a crash of either side just
//! resumes with a later pass. The server awaits each step (and lists a tree on its blocking
//! pool); the simulator runs each listing and delivers each answer as a later event, with
//! writes, crashes and other messages in between — the same steps, in the same order.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use quiver_core::causality::Object;
use quiver_core::merkle::{self, FANOUT, Hash, LEAVES};
use quiver_core::ring::{Ring, RingId};

use crate::ae::TreeId;
use crate::broken::{Broken, Variant};
use crate::exchange::{self, AeLease, AeRequest, AeResponse, Answering, LeafKeys};
use quiver_core::storage::StorageError;

use crate::replica::Replica;

/// Value bytes per handoff push (one larger state still goes alone).
pub const HANDOFF_PUSH_BYTES: usize = 512 * 1024;
/// Leaves asked for per key-list message.
pub const HANDOFF_LEAF_ASKS: usize = 64;
/// Keys listed per leaf at most.
pub const HANDOFF_LEAF_KEYS_MAX: usize = 65_536;

/// One handoff step, old holder to primary.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ask {
    /// The leaf hashes of these `(n, partition, group)`.
    Leaves(Vec<(u8, u32, u8)>),
    /// The `(data key, digest)` lists of these `(n, partition, leaf)`.
    Keys(Vec<(u8, u32, u8)>),
    /// Merge these `(data key, state)` pairs and make them durable before answering.
    Push(Vec<(Vec<u8>, Object)>),
}

/// A handoff step with the ring its sender works on; only a node holding that very ring
/// answers it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HandoffRequest {
    /// The sender's pass's ring ([`Ring::id`]).
    pub ring: RingId,
    /// The step.
    pub ask: Ask,
}

/// A primary's answer to a [`HandoffRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HandoffResponse {
    /// To `Leaves`: `(n, partition, group, leaf hashes)`.
    LeafHashes(Vec<(u8, u32, u8, Vec<Hash>)>),
    /// To `Keys`: `(n, partition, leaf, key list)`.
    KeyLists(Vec<(u8, u32, u8, LeafKeys)>),
    /// To `Push`, once durable: how many keys changed here.
    Stored(u64),
    /// The receiver holds another ring.
    WrongRing(String),
    /// The request was refused (out of range, or storage failed).
    Refused(String),
}

/// What the receiving side does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send this answer.
    Reply(HandoffResponse),
    /// A push was merged (`changed` keys changed): make the applied writes durable, then
    /// answer [`HandoffResponse::Stored`] (or a refusal if that fails). The sender drops its
    /// copies on that answer, so it must not go out before the sync.
    SyncThenStored(u64),
}

/// The receiving side: answers one handoff step. `ring` is the ring this node holds.
pub fn answer(
    replica: &Replica,
    me: &str,
    ring: &Ring,
    broken: Broken,
    request: HandoffRequest,
) -> Answer {
    let mine = ring.id();
    if request.ring != mine && !broken.is(Variant::HandoffAnyRing) {
        return Answer::Reply(HandoffResponse::WrongRing(format!(
            "node {me} holds ring version {}, the sender version {} (or another ring of that \
             version); retry once gossip has spread it",
            mine.version, request.ring.version
        )));
    }
    let ae_request = match request.ask {
        Ask::Push(objects) => {
            return Answer::SyncThenStored(exchange::merge_all(replica, &objects));
        }
        Ask::Leaves(asks) => AeRequest::Leaves(asks),
        Ask::Keys(asks) => AeRequest::Keys(asks),
    };
    // The anti-entropy answers, which take no lease below the digest.
    let placement = replica.ae().placement();
    let at = Answering {
        me,
        ring,
        placement: &placement,
        sender_is_member: true,
    };
    Answer::Reply(
        match exchange::answer(replica, &at, &mut AeLease::default(), 0, ae_request) {
            AeResponse::LeafHashes(l) => HandoffResponse::LeafHashes(l),
            AeResponse::KeyLists(k) => HandoffResponse::KeyLists(k),
            AeResponse::Refused(e) => HandoffResponse::Refused(e),
            other => HandoffResponse::Refused(format!("unexpected answer {other:?}")),
        },
    )
}

/// Trees this node (`me`) holds keys in but does not replicate under `ring`, with the
/// partition's primaries there.
pub fn orphaned_trees(replica: &Replica, ring: &Ring, me: &str) -> Vec<(TreeId, Vec<String>)> {
    replica
        .ae()
        .tree_ids()
        .into_iter()
        .filter_map(|(n, p)| {
            let list = ring.preference_list(p, usize::from(n)).ok()?;
            if list.primaries.iter().any(|m| m.id == me) {
                return None;
            }
            let primaries = list.primaries.iter().map(|m| m.id.clone()).collect();
            Some(((n, p), primaries))
        })
        .collect()
}

/// The leaves of a tree to list (a storage scan, which the server runs on its blocking
/// pool): run it with [`Listing::run`] and report the result with [`HandoffPass::on_listed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The tree.
    pub tree: TreeId,
    /// Its leaves that held keys when the tree was started.
    pub leaves: Vec<u8>,
}

/// A tree's keys as listed, and each leaf's hash recomputed from them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listed {
    keys: BTreeMap<u8, LeafKeys>,
    hashes: BTreeMap<u8, Hash>,
}

impl Listing {
    /// Lists the keys and digests of the leaves.
    pub fn run(&self, replica: &Replica) -> Result<Listed, StorageError> {
        let mut listed = Listed::default();
        for &leaf in &self.leaves {
            let keys =
                replica
                    .ae()
                    .leaf_keys(replica.store(), self.tree, leaf, HANDOFF_LEAF_KEYS_MAX)?;
            let mut hash = Hash::default();
            for (dkey, digest) in &keys {
                for (h, e) in hash.iter_mut().zip(merkle::entry_hash(dkey, digest)) {
                    *h ^= e;
                }
            }
            listed.hashes.insert(leaf, hash);
            listed.keys.insert(leaf, keys);
        }
        Ok(listed)
    }
}

/// What the node around the pass is like now; read afresh at every step (`Sync`, so a
/// server task may hold it across its awaits).
pub struct Env<'a> {
    /// The node's replica.
    pub replica: &'a Replica,
    /// The ring the node holds now.
    pub ring: &'a (dyn Fn() -> RingId + Sync),
    /// Whether a peer is believed up.
    pub is_up: &'a (dyn Fn(&str) -> bool + Sync),
    /// The members a hint for a key could be held for (a held hint keeps the copy).
    pub owners: &'a (dyn Fn() -> Vec<String> + Sync),
}

/// What one tree's transfer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeReport {
    /// The tree.
    pub tree: TreeId,
    /// Keys pushed that changed a primary.
    pub sent: u64,
    /// Keys dropped here because every primary held them.
    pub dropped: u64,
    /// Why the transfer stopped early (nothing of the tree was dropped then).
    pub error: Option<String>,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// List a tree's leaves, then report with [`HandoffPass::on_listed`].
    List(Listing),
    /// Send `request` to `peer` and report its answer (or failure) with
    /// [`HandoffPass::on_response`].
    Call {
        /// The primary.
        peer: String,
        /// The step.
        request: HandoffRequest,
    },
    /// Send `request` to `peer` without waiting for its answer, then call
    /// [`HandoffPass::next`] (only the broken variant `HandoffDropBeforeAck` does this).
    Post {
        /// The primary.
        peer: String,
        /// The step.
        request: HandoffRequest,
    },
    /// A tree is done; call [`HandoffPass::next`].
    Tree(TreeReport),
    /// The pass is over.
    Done,
}

/// Where a tree's transfer is.
#[derive(Debug)]
enum Phase {
    /// Waiting for the listing.
    Listing,
    /// Waiting for the current primary's leaf hashes.
    Leaves,
    /// Waiting for key lists (more queued in `asks`).
    Keys,
    /// Waiting for a push's acknowledgement (more queued in `batches`).
    Push,
}

/// The transfer of one tree.
#[derive(Debug)]
struct Transfer {
    tree: TreeId,
    primaries: Vec<String>,
    /// The ring the steps go out under and that must still hold for the drop.
    ring: RingId,
    phase: Phase,
    listed: Listed,
    /// BROKEN VARIANT `LeafHashesAsNow`: the tree's leaf hashes read when its leaves were
    /// chosen (empty otherwise).
    chosen: Vec<Hash>,
    /// The primary being offered the tree (index into `primaries`).
    primary: usize,
    /// Key-list requests still to send to the current primary.
    asks: VecDeque<Vec<(u8, u32, u8)>>,
    /// Keys the current primary lacks or holds differently.
    push: Vec<Vec<u8>>,
    /// Pushes still to send to the current primary.
    batches: VecDeque<Vec<(Vec<u8>, Object)>>,
    /// Keys of the push awaiting its acknowledgement.
    pushed: Vec<Vec<u8>>,
    /// A push went out unawaited (`Step::Post`): `next` goes on with this tree.
    posted: bool,
    /// How many primaries hold each key as listed.
    covered: HashMap<Vec<u8>, usize>,
    sent: u64,
}

/// One handoff pass over every orphaned tree.
#[derive(Debug)]
pub struct HandoffPass {
    broken: Broken,
    /// The ring the trees and their primaries came from.
    ring: RingId,
    trees: VecDeque<(TreeId, Vec<String>)>,
    /// Keys the pass may still push.
    budget: usize,
    tree: Option<Transfer>,
}

impl HandoffPass {
    /// A pass of node `me` under `ring` (the ring it holds), pushing at most `max_keys`
    /// keys.
    pub fn start(
        replica: &Replica,
        me: &str,
        ring: &Ring,
        max_keys: usize,
        broken: Broken,
    ) -> HandoffPass {
        HandoffPass {
            broken,
            ring: ring.id(),
            trees: orphaned_trees(replica, ring, me).into(),
            budget: max_keys,
            tree: None,
        }
    }

    /// The pass's ring.
    pub fn ring(&self) -> RingId {
        self.ring
    }

    /// The next step: starts the next tree whose primaries are all up, or ends the pass.
    /// Call it first, and after [`Step::Post`] and [`Step::Tree`].
    pub fn next(&mut self, env: &Env<'_>) -> Step {
        if let Some(t) = self.tree.as_mut()
            && std::mem::take(&mut t.posted)
        {
            // Resuming after a `Post`: the next push, or the next primary.
            return self.push_or_next_primary(env);
        }
        // Another tree's transfer still in progress is abandoned (a driver that lost its
        // answer); nothing of it is dropped.
        self.tree = None;
        loop {
            if self.budget == 0 {
                return Step::Done;
            }
            let Some((tree, primaries)) = self.trees.pop_front() else {
                return Step::Done;
            };
            // Every primary must take the keys before any copy here is dropped; while one is
            // down the tree waits (hinted handoff covers writes made meanwhile).
            if !primaries.iter().all(|p| (env.is_up)(p)) {
                continue;
            }
            let empty = Hash::default();
            let hashes: Vec<Hash> = (0..FANOUT as u8)
                .flat_map(|g| env.replica.ae().leaves(tree, g))
                .collect();
            let leaves: Vec<u8> = hashes
                .iter()
                .enumerate()
                .filter(|(_, h)| **h != empty)
                .filter_map(|(i, _)| u8::try_from(i).ok())
                .collect();
            // BROKEN VARIANT `LeafHashesAsNow`: keeps the hashes read here, before the
            // listing, to compare in place of the listed keys' hashes.
            let chosen = if self.broken.is(Variant::LeafHashesAsNow) {
                hashes
            } else {
                Vec::new()
            };
            let ring = if self.broken.is(Variant::TreeRingVersion) {
                (env.ring)()
            } else {
                self.ring
            };
            self.tree = Some(Transfer {
                tree,
                primaries,
                ring,
                phase: Phase::Listing,
                listed: Listed::default(),
                chosen,
                primary: 0,
                asks: VecDeque::new(),
                push: Vec::new(),
                batches: VecDeque::new(),
                pushed: Vec::new(),
                posted: false,
                covered: HashMap::new(),
                sent: 0,
            });
            return Step::List(Listing { tree, leaves });
        }
    }

    /// The listing [`Step::List`] asked for.
    pub fn on_listed(&mut self, env: &Env<'_>, listed: Result<Listed, String>) -> Step {
        let Some(t) = self.tree.as_mut() else {
            return self.next(env);
        };
        match listed {
            Ok(listed) => {
                t.listed = listed;
                self.ask_leaves()
            }
            Err(e) => self.fail(format!("listing leaves: {e}")),
        }
    }

    /// The answer to the last [`Step::Call`] (`Err`: no answer in time, or the call
    /// failed).
    pub fn on_response(
        &mut self,
        env: &Env<'_>,
        response: Result<HandoffResponse, String>,
    ) -> Step {
        let Some(t) = self.tree.as_mut() else {
            return self.next(env);
        };
        let peer = t.primaries.get(t.primary).cloned().unwrap_or_default();
        match (&t.phase, response) {
            (_, Err(e)) => self.fail(format!("{peer}: {e}")),
            (_, Ok(HandoffResponse::WrongRing(e) | HandoffResponse::Refused(e))) => {
                self.fail(format!("{peer}: {e}"))
            }
            (Phase::Leaves, Ok(HandoffResponse::LeafHashes(lists))) => {
                let broken = self.broken;
                self.compare_leaves(broken, lists);
                self.ask_keys_or_push(env)
            }
            (Phase::Keys, Ok(HandoffResponse::KeyLists(lists))) => {
                for (_, _, leaf, theirs) in lists {
                    let Some(my_keys) = t.listed.keys.get(&leaf) else {
                        continue;
                    };
                    let diff = merkle::diff_keys(my_keys, &theirs);
                    let pushing: HashSet<&Vec<u8>> = diff.push.iter().collect();
                    for (dkey, _) in my_keys {
                        if !pushing.contains(dkey) {
                            *t.covered.entry(dkey.clone()).or_default() += 1;
                        }
                    }
                    t.push.extend(diff.push);
                }
                self.ask_keys_or_push(env)
            }
            (Phase::Push, Ok(HandoffResponse::Stored(changed))) => {
                for dkey in std::mem::take(&mut t.pushed) {
                    *t.covered.entry(dkey).or_default() += 1;
                }
                t.sent += changed;
                self.push_or_next_primary(env)
            }
            (phase, Ok(other)) => {
                let e = format!("{peer}: unexpected reply {other:?} while in {phase:?}");
                self.fail(e)
            }
        }
    }

    /// Asks the current primary for every leaf hash of the tree.
    fn ask_leaves(&mut self) -> Step {
        let Some(t) = self.tree.as_mut() else {
            return Step::Done;
        };
        let (n, p) = t.tree;
        t.phase = Phase::Leaves;
        let asks = (0..FANOUT as u8).map(|g| (n, p, g)).collect();
        let peer = t.primaries.get(t.primary).cloned().unwrap_or_default();
        let request = HandoffRequest {
            ring: t.ring,
            ask: Ask::Leaves(asks),
        };
        Step::Call { peer, request }
    }

    /// Counts the keys of every listed leaf whose hash the primary shares, and queues key
    /// lists for the others.
    fn compare_leaves(&mut self, broken: Broken, lists: Vec<(u8, u32, u8, Vec<Hash>)>) {
        let Some(t) = self.tree.as_mut() else {
            return;
        };
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
        for (&leaf, keys) in &t.listed.keys {
            let mine = if broken.is(Variant::LeafHashesAsNow) {
                // BROKEN VARIANT: the hashes read before the listing.
                t.chosen.get(usize::from(leaf))
            } else {
                t.listed.hashes.get(&leaf)
            };
            if mine.is_some() && mine == theirs.get(usize::from(leaf)) {
                for (dkey, _) in keys {
                    *t.covered.entry(dkey.clone()).or_default() += 1;
                }
            } else {
                differing.push(leaf);
            }
        }
        let (n, p) = t.tree;
        t.asks = differing
            .chunks(HANDOFF_LEAF_ASKS)
            .map(|c| c.iter().map(|&l| (n, p, l)).collect())
            .collect();
    }

    /// The next key-list request; once all are answered, the pushes.
    fn ask_keys_or_push(&mut self, env: &Env<'_>) -> Step {
        let Some(t) = self.tree.as_mut() else {
            return Step::Done;
        };
        if let Some(asks) = t.asks.pop_front() {
            t.phase = Phase::Keys;
            let peer = t.primaries.get(t.primary).cloned().unwrap_or_default();
            let request = HandoffRequest {
                ring: t.ring,
                ask: Ask::Keys(asks),
            };
            return Step::Call { peer, request };
        }
        let mut push = std::mem::take(&mut t.push);
        push.truncate(self.budget);
        self.budget -= push.len();
        // A key gone meanwhile goes as an empty state, which the primary skips; the drop
        // then finds nothing.
        match env.replica.objects(&push) {
            Ok(objects) => t.batches = push_batches(objects),
            Err(e) => return self.fail(format!("reading keys to push: {e}")),
        }
        t.phase = Phase::Push;
        self.push_or_next_primary(env)
    }

    /// The next push to the current primary; once all are acknowledged, the next primary,
    /// and after the last one the drop.
    fn push_or_next_primary(&mut self, env: &Env<'_>) -> Step {
        let unawaited = self.broken.is(Variant::HandoffDropBeforeAck);
        let Some(t) = self.tree.as_mut() else {
            return Step::Done;
        };
        if let Some(batch) = t.batches.pop_front() {
            let peer = t.primaries.get(t.primary).cloned().unwrap_or_default();
            let keys = batch.iter().map(|(k, _)| k.clone());
            let request = HandoffRequest {
                ring: t.ring,
                ask: Ask::Push(batch.clone()),
            };
            if unawaited {
                // BROKEN VARIANT: the push counts as held the moment it is sent.
                for dkey in keys {
                    *t.covered.entry(dkey).or_default() += 1;
                }
                t.posted = true;
                return Step::Post { peer, request };
            }
            t.pushed = keys.collect();
            return Step::Call { peer, request };
        }
        t.primary += 1;
        if t.primary < t.primaries.len() {
            return self.ask_leaves();
        }
        self.finish(env)
    }

    /// Every primary was offered the tree: drops what every one of them holds, unless the
    /// ring changed since the pass started (it may have made this node a replica again, or
    /// other nodes the primaries).
    fn finish(&mut self, env: &Env<'_>) -> Step {
        let Some(t) = self.tree.take() else {
            return Step::Done;
        };
        let mut report = TreeReport {
            tree: t.tree,
            sent: t.sent,
            dropped: 0,
            error: None,
        };
        if (env.ring)() != t.ring {
            return Step::Tree(report);
        }
        let owners = (env.owners)();
        for (dkey, digest) in t.listed.keys.into_values().flatten() {
            if t.covered.get(&dkey).copied().unwrap_or(0) < t.primaries.len() {
                continue;
            }
            match env.replica.drop_copy(&dkey, &digest, &owners, false) {
                Ok(true) => report.dropped += 1,
                Ok(false) => {}
                Err(e) => {
                    report.error = Some(e.to_string());
                    break;
                }
            }
        }
        Step::Tree(report)
    }

    /// The tree's transfer stops; nothing of it is dropped (the next pass tries again).
    fn fail(&mut self, error: String) -> Step {
        let Some(t) = self.tree.take() else {
            return Step::Done;
        };
        Step::Tree(TreeReport {
            tree: t.tree,
            sent: t.sent,
            dropped: 0,
            error: Some(error),
        })
    }
}

/// Pushes of at most [`HANDOFF_PUSH_BYTES`] of values each (a larger state goes alone).
fn push_batches(objects: Vec<(Vec<u8>, Object)>) -> VecDeque<Vec<(Vec<u8>, Object)>> {
    let mut out = VecDeque::new();
    let mut batch: Vec<(Vec<u8>, Object)> = Vec::new();
    let mut batch_bytes = 0usize;
    for (dkey, object) in objects {
        let size: usize = object.siblings().iter().map(|s| s.value.len()).sum();
        if !batch.is_empty() && batch_bytes + size > HANDOFF_PUSH_BYTES {
            out.push_back(std::mem::take(&mut batch));
            batch_bytes = 0;
        }
        batch_bytes += size;
        batch.push((dkey, object));
    }
    if !batch.is_empty() {
        out.push_back(batch);
    }
    out
}
