//! Active anti-entropy (Dynamo §4.7) as a sans-IO protocol: replicas of a partition compare
//! hash trees and repair the keys that differ by merging versions both ways.
//!
//! One exchange is driven by the initiator ([`Exchange`]) against one peer, descending only
//! where hashes differ: a digest of the roots of every tree both hold (equal replicas stop
//! there), then roots, group hashes, leaf hashes, and the key lists of differing leaves
//! (`quiver_core::merkle`). Keys the peer holds differently are fetched and merged here;
//! then this node's merged states are pushed there. A merge never drops a concurrent
//! sibling, so repair cannot lose a write. Each exchange repairs at most `max_keys` keys.
//!
//! The answering side ([`answer`]) takes part in one descending exchange at a time
//! ([`AeLease`]), so a replica that lost data is not sent the same keys by every peer at
//! once; the lease ends with the initiator's [`AeRequest::Done`], or by itself. A node
//! whose lease another holds starts no exchange of its own (it is being repaired already),
//! but an exchange it started never needs its own lease: when every node held its lease
//! for its own exchange, nodes whose timers fired together answered each other `Busy`
//! forever (found by the simulator once it ran this protocol).
//!
//! The server awaits each step; the simulator delivers each answer as a later event, with
//! writes, crashes and other exchanges in between — the same steps, in the same order.

use std::collections::VecDeque;

use quiver_core::causality::Object;
use quiver_core::merkle::{self, FANOUT, Hash};
use quiver_core::ring::Ring;
use quiver_core::storage::keys;

use crate::ae::{Placement, TreeId};
use crate::replica::Replica;

/// Trees per roots message, asks per descent message.
pub const AE_ASKS_PER_MESSAGE: usize = 1024;
/// Data keys per fetch message.
pub const AE_FETCH_KEYS: usize = 256;
/// Value bytes per push message (one larger object still goes alone).
pub const AE_PUSH_BYTES: usize = 512 * 1024;
/// Keys listed per leaf at most; a leaf this full is repaired over several exchanges.
pub const AE_LEAF_KEYS_MAX: usize = 65_536;
/// Longest a node stays reserved for one exchange whose end it was not told of, in ms.
pub const AE_LEASE_MS: u64 = 10_000;

/// A `(data key, digest)` list of one leaf, sorted by key.
pub type LeafKeys = Vec<(Vec<u8>, Hash)>;

/// A step of an exchange, initiator to peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AeRequest {
    /// The digest of the roots of the `trees` trees both nodes hold.
    Digest {
        /// The initiator.
        from: String,
        /// How many trees the initiator compares.
        trees: u32,
        /// `merkle::roots_digest` of their roots.
        digest: Hash,
    },
    /// The initiator is done: its lease on the peer ends.
    Done {
        /// The initiator.
        from: String,
    },
    /// `(n, partition, root)` of trees to compare.
    Roots(Vec<(u8, u32, Hash)>),
    /// `(n, partition, group)` whose leaf hashes are wanted.
    Leaves(Vec<(u8, u32, u8)>),
    /// `(n, partition, leaf)` whose key lists are wanted.
    Keys(Vec<(u8, u32, u8)>),
    /// Data keys whose states are wanted.
    Fetch(Vec<Vec<u8>>),
    /// States to merge.
    Push(Vec<(Vec<u8>, Object)>),
}

/// A peer's answer to an [`AeRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AeResponse {
    /// To `Digest`: true when the digests match.
    Match(bool),
    /// To `Digest`: the digests differ but the peer is in another exchange.
    Busy,
    /// To `Done`.
    Released,
    /// To `Roots`: `(n, partition, group hashes)` of the trees whose roots differ.
    Groups(Vec<(u8, u32, Vec<Hash>)>),
    /// To `Leaves`: `(n, partition, group, leaf hashes)`.
    LeafHashes(Vec<(u8, u32, u8, Vec<Hash>)>),
    /// To `Keys`: `(n, partition, leaf, key list)`.
    KeyLists(Vec<(u8, u32, u8, LeafKeys)>),
    /// To `Fetch`: `(data key, state)`, an empty state for a key not held.
    Objects(Vec<(Vec<u8>, Object)>),
    /// To `Push`: how many keys changed at the peer.
    Pushed(u64),
    /// The request was refused (out of range, or storage failed).
    Refused(String),
}

/// What one exchange found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AeReport {
    /// The peer.
    pub peer: String,
    /// Trees compared.
    pub trees: usize,
    /// Trees whose roots differed.
    pub trees_differing: usize,
    /// Keys fetched from the peer that changed the local state.
    pub pulled: u64,
    /// Keys sent to the peer that changed its state.
    pub pushed: u64,
    /// The digests differed and the exchange went on past the first message.
    pub descended: bool,
    /// Bytes of the requests this node sent (counted by the driver, which encodes them).
    pub bytes_sent: u64,
}

/// The trees `me` and `peer` both replicate: `(n, partition)` where both are among the
/// partition's first `n` owners, for every replication factor in use.
pub fn shared_trees(ring: &Ring, placement: &Placement, me: &str, peer: &str) -> Vec<TreeId> {
    let mut out = Vec::new();
    for n in placement.ns() {
        for p in 0..ring.partitions() {
            let Ok(list) = ring.preference_list(p, usize::from(n)) else {
                continue;
            };
            let has = |id: &str| list.primaries.iter().any(|m| m.id == id);
            if has(me) && has(peer) {
                out.push((n, p));
            }
        }
    }
    out
}

fn roots(replica: &Replica, trees: &[TreeId]) -> Vec<(u8, u32, Hash)> {
    let ae = replica.ae();
    trees
        .iter()
        .map(|&(n, p)| (n, p, ae.root((n, p))))
        .collect()
}

/// Merges states received by anti-entropy (buffered, no hint); returns how many changed
/// the local state. Keys outside any bucket and empty states are skipped; a merge that
/// fails is logged and skipped (the next exchange tries again).
pub fn merge_all(replica: &Replica, objects: &[(Vec<u8>, Object)]) -> u64 {
    let mut changed = 0;
    for (dkey, object) in objects {
        let Some((bucket, key)) = keys::split_data_key(dkey) else {
            continue;
        };
        let Ok(bucket) = std::str::from_utf8(bucket) else {
            continue;
        };
        if object.siblings().is_empty() && object.context().is_empty() {
            continue;
        }
        match replica.merge_remote(bucket, key, object, None) {
            Ok(true) => changed += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!(bucket, error = %e, "anti-entropy merge failed"),
        }
    }
    changed
}

/// The reservation of a node for the one peer's exchange that descended here.
#[derive(Debug, Default)]
pub struct AeLease {
    holder: Option<(String, u64)>,
}

impl AeLease {
    /// Reserves the node for `holder` until `now_ms + AE_LEASE_MS`; false while another
    /// holder's reservation lasts. `now_ms` is a monotonic clock.
    pub fn take(&mut self, holder: &str, now_ms: u64) -> bool {
        match &self.holder {
            Some((who, until)) if who != holder && *until > now_ms => false,
            _ => {
                self.holder = Some((holder.to_string(), now_ms.saturating_add(AE_LEASE_MS)));
                true
            }
        }
    }

    /// True while a node other than `me` holds the reservation: `me` is being repaired and
    /// starts no exchange of its own.
    pub fn held_by_another(&self, me: &str, now_ms: u64) -> bool {
        self.holder
            .as_ref()
            .is_some_and(|(who, until)| who != me && *until > now_ms)
    }

    /// Ends `holder`'s reservation, if it holds it.
    pub fn release(&mut self, holder: &str) {
        if self.holder.as_ref().is_some_and(|(who, _)| who == holder) {
            self.holder = None;
        }
    }
}

/// What the answering side needs to know besides its replica.
#[derive(Debug)]
pub struct Answering<'a> {
    /// This node's name.
    pub me: &'a str,
    /// The ring this node serves.
    pub ring: &'a Ring,
    /// Where this node files keys.
    pub placement: &'a Placement,
    /// Whether the sender is a member this node knows (a stranger never matches).
    pub sender_is_member: bool,
}

/// The answering side of an exchange: answers one request from a peer. `lease` is this
/// node's reservation, taken by a descending `Digest`, released by `Done`.
pub fn answer(
    replica: &Replica,
    at: &Answering<'_>,
    lease: &mut AeLease,
    now_ms: u64,
    request: AeRequest,
) -> AeResponse {
    let ae = replica.ae();
    let partitions = at.ring.partitions();
    let bad_tree = |n: u8, p: u32| n == 0 || p >= partitions;
    match request {
        AeRequest::Digest {
            from,
            trees,
            digest,
        } => {
            // A sender that is not a member, or sees another placement, never matches and
            // goes on to compare roots, which says precisely what differs.
            let shared = shared_trees(at.ring, at.placement, at.me, &from);
            let same = at.sender_is_member
                && u32::try_from(shared.len()).ok() == Some(trees)
                && merkle::roots_digest(&roots(replica, &shared)) == digest;
            if same {
                AeResponse::Match(true)
            } else if lease.take(&from, now_ms) {
                AeResponse::Match(false)
            } else {
                AeResponse::Busy
            }
        }
        AeRequest::Done { from } => {
            lease.release(&from);
            AeResponse::Released
        }
        AeRequest::Roots(roots) => {
            if roots.iter().any(|&(n, p, _)| bad_tree(n, p)) {
                return AeResponse::Refused(format!(
                    "Roots names a tree outside 1..n, 0..{partitions}"
                ));
            }
            AeResponse::Groups(
                roots
                    .into_iter()
                    .filter(|&(n, p, root)| ae.root((n, p)) != root)
                    .map(|(n, p, _)| (n, p, ae.groups((n, p))))
                    .collect(),
            )
        }
        AeRequest::Leaves(asks) => {
            if asks
                .iter()
                .any(|&(n, p, g)| bad_tree(n, p) || usize::from(g) >= FANOUT)
            {
                return AeResponse::Refused("Leaves names a tree or group out of range".into());
            }
            AeResponse::LeafHashes(
                asks.into_iter()
                    .map(|(n, p, g)| (n, p, g, ae.leaves((n, p), g)))
                    .collect(),
            )
        }
        AeRequest::Keys(asks) => {
            if asks.iter().any(|&(n, p, _)| bad_tree(n, p)) {
                return AeResponse::Refused("Keys names a tree out of range".into());
            }
            let mut lists = Vec::with_capacity(asks.len());
            for (n, p, leaf) in asks {
                match ae.leaf_keys(replica.store(), (n, p), leaf, AE_LEAF_KEYS_MAX) {
                    Ok(keys) => lists.push((n, p, leaf, keys)),
                    Err(e) => return AeResponse::Refused(format!("node {}: {e}", at.me)),
                }
            }
            AeResponse::KeyLists(lists)
        }
        AeRequest::Fetch(dkeys) => match replica.objects(&dkeys) {
            Ok(objects) => AeResponse::Objects(objects),
            Err(e) => AeResponse::Refused(e.to_string()),
        },
        AeRequest::Push(objects) => AeResponse::Pushed(merge_all(replica, &objects)),
    }
}

/// Where an exchange is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Digest,
    Roots,
    Leaves,
    Keys,
    Fetch,
    Push,
}

/// What the initiator does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Send this request to the peer and report its answer with [`Exchange::on_response`].
    Send(AeRequest),
    /// The exchange is over: if it descended, the initiator tells the peer
    /// ([`AeRequest::Done`], best effort), whose lease it holds.
    Finished(Result<AeReport, String>),
}

/// The initiating side of one exchange.
#[derive(Debug)]
pub struct Exchange {
    peer: String,
    max_keys: usize,
    trees: Vec<TreeId>,
    phase: Phase,
    /// Requests of the current phase still to send, in order.
    queue: VecDeque<AeRequest>,
    group_asks: Vec<(u8, u32, u8)>,
    leaf_asks: Vec<(u8, u32, u8)>,
    pull: Vec<Vec<u8>>,
    push: Vec<Vec<u8>>,
    /// Kept apart from the report, which is handed out when the exchange finishes.
    descended: bool,
    report: AeReport,
}

impl Exchange {
    /// Starts an exchange of `me` with `peer` over `trees` (see [`shared_trees`]),
    /// repairing at most `max_keys` keys each way. The caller checked that no peer's lease
    /// holds it ([`AeLease::held_by_another`]).
    pub fn start(
        replica: &Replica,
        me: &str,
        peer: &str,
        trees: Vec<TreeId>,
        max_keys: usize,
    ) -> (Exchange, AeRequest) {
        let digest = AeRequest::Digest {
            from: me.to_string(),
            trees: u32::try_from(trees.len()).unwrap_or(u32::MAX),
            digest: merkle::roots_digest(&roots(replica, &trees)),
        };
        let report = AeReport {
            peer: peer.to_string(),
            trees: trees.len(),
            ..AeReport::default()
        };
        let exchange = Exchange {
            peer: peer.to_string(),
            max_keys,
            trees,
            phase: Phase::Digest,
            queue: VecDeque::new(),
            group_asks: Vec::new(),
            leaf_asks: Vec::new(),
            pull: Vec::new(),
            push: Vec::new(),
            descended: false,
            report,
        };
        (exchange, digest)
    }

    /// The peer.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// True once the exchange went past the digest: the peer holds a lease for it.
    pub fn descended(&self) -> bool {
        self.descended
    }

    /// The peer's answer to the last request sent (`Err`: no answer or a refusal). Reads
    /// the local trees and merges fetched states through `replica` as it goes.
    pub fn on_response(&mut self, replica: &Replica, response: Result<AeResponse, String>) -> Step {
        let response = match response {
            Ok(AeResponse::Refused(e)) | Err(e) => return self.fail(e),
            Ok(r) => r,
        };
        let ae = replica.ae();
        match (self.phase, response) {
            (Phase::Digest, AeResponse::Match(true)) => return self.finish(),
            (Phase::Digest, AeResponse::Match(false)) => {
                self.report.descended = true;
                self.descended = true;
                self.phase = Phase::Roots;
                self.queue = self
                    .trees
                    .chunks(AE_ASKS_PER_MESSAGE)
                    .map(|chunk| AeRequest::Roots(roots(replica, chunk)))
                    .collect();
            }
            (Phase::Digest, AeResponse::Busy) => {
                return self.fail(format!("{} is in another exchange", self.peer));
            }
            (Phase::Roots, AeResponse::Groups(groups)) => {
                self.report.trees_differing += groups.len();
                for (n, p, theirs) in groups {
                    for g in merkle::differing(&ae.groups((n, p)), &theirs) {
                        self.group_asks.push((n, p, g));
                    }
                }
            }
            (Phase::Leaves, AeResponse::LeafHashes(lists)) => {
                for (n, p, g, theirs) in lists {
                    for i in merkle::differing(&ae.leaves((n, p), g), &theirs) {
                        let leaf = usize::from(g) * FANOUT + usize::from(i);
                        if let Ok(leaf) = u8::try_from(leaf) {
                            self.leaf_asks.push((n, p, leaf));
                        }
                    }
                }
            }
            (Phase::Keys, AeResponse::KeyLists(lists)) => {
                for (n, p, leaf, theirs) in lists {
                    let mine = match ae.leaf_keys(replica.store(), (n, p), leaf, AE_LEAF_KEYS_MAX) {
                        Ok(mine) => mine,
                        Err(e) => return self.fail(e.to_string()),
                    };
                    let diff = merkle::diff_keys(&mine, &theirs);
                    self.pull.extend(diff.pull);
                    self.push.extend(diff.push);
                    if self.pull.len().max(self.push.len()) >= self.max_keys {
                        // Enough for one exchange: the rest waits for the next.
                        self.queue.clear();
                        break;
                    }
                }
            }
            (Phase::Fetch, AeResponse::Objects(objects)) => {
                self.report.pulled += merge_all(replica, &objects);
            }
            (Phase::Push, AeResponse::Pushed(changed)) => self.report.pushed += changed,
            (phase, other) => {
                return self.fail(format!("unexpected answer in phase {phase:?}: {other:?}"));
            }
        }
        self.next(replica)
    }

    /// The next request of this phase, or of the next phase that has one.
    fn next(&mut self, replica: &Replica) -> Step {
        loop {
            if let Some(request) = self.queue.pop_front() {
                return Step::Send(request);
            }
            match self.phase {
                Phase::Digest => return self.fail("no answer to the digest yet".into()),
                Phase::Roots => {
                    self.phase = Phase::Leaves;
                    self.queue = std::mem::take(&mut self.group_asks)
                        .chunks(AE_ASKS_PER_MESSAGE)
                        .map(|c| AeRequest::Leaves(c.to_vec()))
                        .collect();
                }
                Phase::Leaves => {
                    self.phase = Phase::Keys;
                    self.queue = std::mem::take(&mut self.leaf_asks)
                        .chunks(AE_ASKS_PER_MESSAGE)
                        .map(|c| AeRequest::Keys(c.to_vec()))
                        .collect();
                }
                Phase::Keys => {
                    self.pull.truncate(self.max_keys);
                    self.push.truncate(self.max_keys);
                    self.phase = Phase::Fetch;
                    self.queue = std::mem::take(&mut self.pull)
                        .chunks(AE_FETCH_KEYS)
                        .map(|c| AeRequest::Fetch(c.to_vec()))
                        .collect();
                }
                Phase::Fetch => {
                    // The merged states, read after the pull so they carry what it brought.
                    self.phase = Phase::Push;
                    let objects = match replica.objects(&std::mem::take(&mut self.push)) {
                        Ok(o) => o,
                        Err(e) => return self.fail(e.to_string()),
                    };
                    self.queue = push_batches(objects);
                }
                Phase::Push => return self.finish(),
            }
        }
    }

    fn finish(&mut self) -> Step {
        Step::Finished(Ok(std::mem::take(&mut self.report)))
    }

    fn fail(&mut self, error: String) -> Step {
        Step::Finished(Err(error))
    }
}

/// Push messages of at most `AE_PUSH_BYTES` of values each (a larger state goes alone);
/// empty states are not pushed.
fn push_batches(objects: Vec<(Vec<u8>, Object)>) -> VecDeque<AeRequest> {
    let mut out = VecDeque::new();
    let mut batch: Vec<(Vec<u8>, Object)> = Vec::new();
    let mut batch_bytes = 0usize;
    for (dkey, object) in objects {
        if object.siblings().is_empty() && object.context().is_empty() {
            continue;
        }
        let size: usize = object.siblings().iter().map(|s| s.value.len()).sum();
        if !batch.is_empty() && batch_bytes + size > AE_PUSH_BYTES {
            out.push_back(AeRequest::Push(std::mem::take(&mut batch)));
            batch_bytes = 0;
        }
        batch_bytes += size;
        batch.push((dkey, object));
    }
    if !batch.is_empty() {
        out.push_back(AeRequest::Push(batch));
    }
    out
}
