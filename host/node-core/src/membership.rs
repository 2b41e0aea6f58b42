//! Membership at one node: the first membership every node derives from its start-up list,
//! the peers a metadata state implies, gossip (digest first), the hint markers that can
//! never be delivered, and departure.
//!
//! Members and the committed ring are part of the cluster metadata (`quiver_core::meta`),
//! so they spread like bucket properties: a change is pushed to every peer at once
//! ([`PeerRequest::MetaPush`]), and every gossip round a node asks one or two random peers
//! that are up whether their metadata differs ([`PeerRequest::MetaDigest`]); only a peer
//! whose digest differs sends its state, and if the asker's merged state still differs it
//! pushes it back ([`push_back`]). A node that missed a push (lost message, partition,
//! down) catches up on a later round.
//!
//! A node told to leave stops once the committed ring no longer has it, it holds no keys
//! and no hints, and every peer took the news that it left ([`Departure`]), checked once
//! more just before it stops.
//!
//! The server (`host/node/src/cluster/{admin,membership}.rs`) and the simulator drive these
//! rules; storing a merged state durably before it takes effect is theirs.

use std::collections::BTreeMap;

use quiver_core::membership::{MemberEntry, MemberState, RingEntry};
use quiver_core::meta::{MetaState, Stamp};
use quiver_core::ring::{ClaimParams, Member, Ring, RingError};
use quiver_core::storage::StorageError;

use crate::broken::{Broken, Variant};
use crate::protocol::{PeerRequest, PeerResponse};
use crate::replica::{HintedKey, Replica};

/// Hint markers dropped per departed owner per pass (the rest go in later passes).
pub const DEPARTED_HINTS_PER_PASS: usize = 256;

/// The membership every node of a cluster started from the same member list derives alike
/// (every node listed, this one included, by name and address): members of version 0,
/// weight 1 and no zone, and the first ring over them, all with the zero stamp.
pub fn first_membership(
    addrs: impl IntoIterator<Item = (String, String)>,
    params: ClaimParams,
) -> Result<(MetaState, Ring), RingError> {
    let members: BTreeMap<String, MemberEntry> = addrs
        .into_iter()
        .map(|(id, addr)| {
            let entry = MemberEntry {
                version: 0,
                stamp: Stamp::zero(),
                addr,
                weight: 1,
                zone: None,
                state: MemberState::Valid,
            };
            (id, entry)
        })
        .collect();
    let ring = Ring::new(members.keys().map(Member::new).collect(), params)?;
    let state = MetaState {
        members,
        ring: Some(RingEntry {
            ring: ring.clone(),
            stamp: Stamp::zero(),
        }),
        ..MetaState::default()
    };
    Ok((state, ring))
}

/// The members `state` makes this node's peers: every member that has not left, `me`
/// excluded, with its address.
pub fn peers(state: &MetaState, me: &str) -> Vec<(String, String)> {
    state
        .members
        .iter()
        .filter(|(id, e)| e.state != MemberState::Left && id.as_str() != me)
        .map(|(id, e)| (id.clone(), e.addr.clone()))
        .collect()
}

/// The ring a node must route by after a merge brought `state`: its committed ring, unless
/// it has another partition count than `current` (a ring of another cluster, never applied).
pub fn ring_to_apply<'a>(state: &'a MetaState, current: &Ring) -> Option<&'a Ring> {
    let entry = state.ring.as_ref()?;
    (entry.ring.partitions() == current.partitions() && entry.ring != *current)
        .then_some(&entry.ring)
}

/// The peers of one gossip round among those that are `up`: one, or two in clusters of
/// more than five, drawn with `draw(n)` (an index below `n`).
pub fn gossip_targets(up: &[String], mut draw: impl FnMut(usize) -> usize) -> Vec<String> {
    let want = if up.len() > 5 { 2 } else { 1 };
    let mut pool: Vec<&String> = up.iter().collect();
    let mut out = Vec::with_capacity(want);
    while out.len() < want && !pool.is_empty() {
        let i = draw(pool.len()).min(pool.len() - 1);
        out.push(pool.swap_remove(i).clone());
    }
    out
}

/// A gossip round's question: this node's digest.
pub fn digest_request(state: &MetaState) -> PeerRequest {
    PeerRequest::MetaDigest(state.digest())
}

/// The answer to a gossip round's question: `MetaSame`, or this node's state when the
/// digests differ.
pub fn answer_digest(state: &MetaState, digest: [u8; 32]) -> PeerResponse {
    if state.digest() == digest {
        PeerResponse::MetaSame
    } else {
        PeerResponse::Meta(state.clone())
    }
}

/// After merging a peer's pulled `theirs`, whether this node's state (`mine`, merged) still
/// differs, so the peer lacks something: then the driver pushes `mine` back to it
/// (`MetaPush`). Pulls alone never spread a change that only a node nobody pulls from
/// holds — a member others count as left, or one they hold down — once the first push of
/// it was lost (the simulator's finding, membership-stress seeds 5000057 and 5000202).
pub fn push_back(mine: &MetaState, theirs: &MetaState) -> bool {
    mine.digest() != theirs.digest()
}

/// What a gossip round's answer brings to merge (`None`: nothing differs, or not an
/// answer to the question).
pub fn pulled_state(response: PeerResponse) -> Option<MetaState> {
    match response {
        PeerResponse::Meta(state) => Some(state),
        _ => None,
    }
}

/// Hint markers for members that left, which can never be delivered: up to
/// [`DEPARTED_HINTS_PER_PASS`] per departed owner. The driver drops each marker with
/// `hint_delivered(owner, .., keep_copy: true)`: the copy stays and, if this node is not a
/// replica of the key, reaches the replicas by ownership handoff. (Kept forever, they would
/// never drain, and a leaving node holding one would never depart.)
pub fn departed_hints(
    replica: &Replica,
    state: &MetaState,
    me: &str,
    broken: Broken,
) -> Result<Vec<(String, HintedKey)>, StorageError> {
    if broken.is(Variant::KeepHintsForLeft) || replica.hint_count() == 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let departed = state
        .members
        .iter()
        .filter(|(id, e)| e.state == MemberState::Left && id.as_str() != me);
    for (owner, _) in departed {
        for h in replica.hinted_keys(owner, DEPARTED_HINTS_PER_PASS)? {
            out.push((owner.clone(), h));
        }
    }
    Ok(out)
}

/// True when this node is done leaving: it was told to leave, the ring no longer has it,
/// and `holds_nothing` (no keys, no hints).
pub fn done_leaving(state: &MetaState, ring: &Ring, me: &str, holds_nothing: bool) -> bool {
    state
        .members
        .get(me)
        .is_some_and(|e| matches!(e.state, MemberState::Leaving | MemberState::Left))
        && ring.member(me).is_none()
        && holds_nothing
}

/// The change that records this node as left, to merge and push to every peer; `None`
/// when it is not leaving (already left: only the push remains).
pub fn left_change(state: &MetaState, me: &str, stamp: Stamp) -> Option<MetaState> {
    let mine = state.members.get(me)?;
    (mine.state == MemberState::Leaving).then(|| MetaState {
        members: BTreeMap::from([(me.to_string(), mine.with_state(MemberState::Left, stamp))]),
        ..MetaState::default()
    })
}

/// A departure announcement in flight: the push that says this node left went to `asked`
/// peers; each answer is fed in as it comes.
#[derive(Debug, Clone)]
pub struct Departure {
    asked: usize,
    answered: usize,
    told: usize,
    broken: Broken,
}

/// What a departing node does after an answer to its announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepartStep {
    /// Wait for more answers.
    Wait,
    /// Enough peers took the news: stop now if [`DepartStep::Stop::recheck`] says this node
    /// still holds nothing (a coordinator on an older ring may have stored a key here
    /// meanwhile, which must be handed off first).
    Stop {
        /// Check `done_leaving` once more before stopping.
        recheck: bool,
    },
    /// Every peer answered and too few took the news: the next handoff pass tries again.
    Retry,
}

impl Departure {
    /// An announcement pushed to `asked` peers.
    pub fn new(asked: usize, broken: Broken) -> Self {
        Departure {
            asked,
            answered: 0,
            told: 0,
            broken,
        }
    }

    /// A peer answered; `told` when it stored the news. Returns what to do now.
    ///
    /// Every peer must know, not just one: a peer that took the news alone could leave too
    /// (or lose its disk) before gossiping it, and the rest would wait for this node
    /// forever.
    pub fn on_answer(&mut self, told: bool) -> DepartStep {
        self.answered += 1;
        self.told += usize::from(told);
        self.step()
    }

    /// What to do given the answers so far (with no peer asked, stop).
    pub fn step(&self) -> DepartStep {
        let enough = if self.broken.is(Variant::DepartWhenOneTold) {
            self.told > 0 || self.asked == 0
        } else {
            self.told == self.asked
        };
        if enough {
            DepartStep::Stop {
                recheck: !self.broken.is(Variant::DepartNoRecheck),
            }
        } else if self.answered >= self.asked {
            DepartStep::Retry
        } else {
            DepartStep::Wait
        }
    }
}
