//! Cluster membership as replicated state: who the members are (address, weight, zone,
//! status), the committed ring, and the pure functions behind Riak-style staged changes
//! (`join`/`leave` stage, `plan` shows, `commit` applies).
//!
//! Both parts live in the cluster metadata (`crate::meta::MetaState`), which nodes spread by
//! gossip, so they must merge the same way on every node whatever the order:
//! - a member entry is a register ordered by `(version, stamp, entry)`: a change is written
//!   with the version it replaced plus one, so a later step of the same member's life (join,
//!   commit, leave, left) wins even against a writer with a clock running behind, and
//!   concurrent writes of the same version fall back to the stamp;
//! - the ring is a register ordered by `(ring version, stamp, ring)`: a commit rebalances
//!   the ring it saw, so its version is one higher, and two commits racing from the same
//!   base keep the later stamp. Either result is a valid ring; handoff follows whichever
//!   ring a node holds, so no data depends on the race's outcome.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ring::{Member, Ring, RingError};
use crate::stamp::Stamp;

/// Where a member is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MemberState {
    /// Staged to join: known and gossiped to, but owns nothing until a commit.
    Joining,
    /// Part of the ring.
    Valid,
    /// Staged to leave; after a commit it owns nothing and hands its data off.
    Leaving,
    /// Gone: its data was handed off and it stopped. Kept so that gossip from a node that
    /// has not heard of the departure cannot bring it back.
    Left,
}

impl MemberState {
    /// Lower-case name for output.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Valid => "valid",
            MemberState::Leaving => "leaving",
            MemberState::Left => "left",
        }
    }
}

/// What the cluster knows about one member.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberEntry {
    /// Bumped by every change of this entry (see the module docs).
    pub version: u64,
    /// Who made the change, when.
    pub stamp: Stamp,
    /// Address other nodes reach it at (`IP:port`).
    pub addr: String,
    /// Relative capacity (partitions claimed in proportion).
    pub weight: u32,
    /// Failure domain, if labelled.
    pub zone: Option<String>,
    /// Its status.
    pub state: MemberState,
}

impl MemberEntry {
    /// The ring member this entry describes.
    pub fn ring_member(&self, id: &str) -> Member {
        Member {
            id: id.to_string(),
            weight: self.weight,
            zone: self.zone.clone(),
        }
    }

    /// The same entry in `state`, as a change made at `stamp`.
    pub fn with_state(&self, state: MemberState, stamp: Stamp) -> MemberEntry {
        MemberEntry {
            version: self.version.saturating_add(1),
            stamp,
            state,
            ..self.clone()
        }
    }
}

/// The committed ring and who committed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingEntry {
    /// The ring.
    pub ring: Ring,
    /// The commit that made it (the zero stamp for a ring every node derived at start).
    pub stamp: Stamp,
}

impl RingEntry {
    /// True when `other` should replace `self` (see the module docs).
    pub fn superseded_by(&self, other: &RingEntry) -> bool {
        let key = |e: &RingEntry| (e.ring.version(), e.stamp.clone());
        match key(other).cmp(&key(self)) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            // Same version and stamp but other contents only arise from two nodes deriving
            // a first ring from different member lists; the encodings order them so every
            // node keeps the same one.
            std::cmp::Ordering::Equal => {
                other.ring != self.ring && other.ring.encode().ok() > self.ring.encode().ok()
            }
        }
    }
}

/// Why a staged change cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// No member of that name.
    #[error("no member named {0:?}")]
    UnknownMember(String),
    /// The change does not fit the member's status.
    #[error("member {node:?} is {state}: {why}")]
    BadState {
        /// The member.
        node: String,
        /// Its status.
        state: &'static str,
        /// What the operator should know.
        why: String,
    },
    /// No staged change: the plan would not move anything.
    #[error("nothing staged: join or leave a node first (quiver cluster join / leave)")]
    NothingStaged,
    /// Leaving would leave no member in the ring.
    #[error("cannot leave: {0:?} is the last member of the ring")]
    LastMember(String),
    /// The new ring cannot be built.
    #[error("the staged ring is invalid: {0}")]
    Ring(#[from] RingError),
}

/// The ring the staged changes lead to: every `Joining` or `Valid` member, rebalanced from
/// `current` with minimal movement. `None` when it would have the same members, weights and
/// zones as `current` (nothing staged).
pub fn staged_ring(
    current: &Ring,
    members: &BTreeMap<String, MemberEntry>,
) -> Result<Option<Ring>, MembershipError> {
    let target: Vec<Member> = members
        .iter()
        .filter(|(_, e)| matches!(e.state, MemberState::Joining | MemberState::Valid))
        .map(|(id, e)| e.ring_member(id))
        .collect();
    if target.is_empty() {
        let last = current
            .members()
            .first()
            .map(|m| m.id.clone())
            .unwrap_or_default();
        return Err(MembershipError::LastMember(last));
    }
    // Both lists are sorted by id (BTreeMap order; the ring keeps its members sorted).
    if target.as_slice() == current.members() {
        return Ok(None);
    }
    Ok(Some(current.rebalance(target)?))
}

/// How the replicas of one partition change between two rings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMove {
    /// The partition.
    pub partition: u32,
    /// Nodes that become replicas and must receive its data.
    pub gained: Vec<String>,
    /// Nodes that stop being replicas and hand their copy off.
    pub lost: Vec<String>,
}

/// The partitions whose replica set (first `n` distinct owners) differs between `old` and
/// `new`: the copies a plan creates and removes. With `n` replicas per key this, not the
/// owner changes alone, is the data that moves.
pub fn replica_moves(old: &Ring, new: &Ring, n: usize) -> Result<Vec<ReplicaMove>, RingError> {
    if old.partitions() != new.partitions() {
        return Err(RingError::PartitionCountMismatch {
            from: old.partitions(),
            to: new.partitions(),
        });
    }
    let mut out = Vec::new();
    for p in 0..old.partitions() {
        let set = |ring: &Ring| -> Result<BTreeSet<String>, RingError> {
            Ok(ring
                .preference_list(p, n)?
                .primaries
                .iter()
                .map(|m| m.id.clone())
                .collect())
        };
        let (before, after) = (set(old)?, set(new)?);
        if before != after {
            out.push(ReplicaMove {
                partition: p,
                gained: after.difference(&before).cloned().collect(),
                lost: before.difference(&after).cloned().collect(),
            });
        }
    }
    Ok(out)
}

/// Merges `other`'s member entries into `mine`; returns the ids whose entry changed.
pub fn merge_members(
    mine: &mut BTreeMap<String, MemberEntry>,
    other: &BTreeMap<String, MemberEntry>,
) -> Vec<String> {
    let mut changed = Vec::new();
    for (id, theirs) in other {
        let replace = mine.get(id).is_none_or(|m| theirs > m);
        if replace {
            mine.insert(id.clone(), theirs.clone());
            changed.push(id.clone());
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::ClaimParams;

    fn stamp(t: u64, node: &str) -> Stamp {
        Stamp::at(t, node)
    }

    fn entry(state: MemberState, version: u64, t: u64) -> MemberEntry {
        MemberEntry {
            version,
            stamp: stamp(t, "x"),
            addr: "127.0.0.1:1".into(),
            weight: 1,
            zone: None,
            state,
        }
    }

    fn ring(ids: &[&str]) -> Ring {
        Ring::new(
            ids.iter().map(|i| Member::new(*i)).collect(),
            ClaimParams::default(),
        )
        .expect("ring")
    }

    #[test]
    fn a_later_version_wins_even_with_an_older_clock() {
        let mut mine = BTreeMap::from([("n4".to_string(), entry(MemberState::Joining, 1, 500))]);
        let theirs = BTreeMap::from([("n4".to_string(), entry(MemberState::Valid, 2, 100))]);
        assert_eq!(merge_members(&mut mine, &theirs), vec!["n4".to_string()]);
        assert_eq!(mine["n4"].state, MemberState::Valid);
        // Merging the older entry back changes nothing: the merge is idempotent and ordered.
        let older = BTreeMap::from([("n4".to_string(), entry(MemberState::Joining, 1, 500))]);
        assert!(merge_members(&mut mine, &older).is_empty());
        assert_eq!(mine["n4"].state, MemberState::Valid);
    }

    #[test]
    fn members_merge_commutes() {
        let a = BTreeMap::from([
            ("n1".to_string(), entry(MemberState::Valid, 1, 10)),
            ("n2".to_string(), entry(MemberState::Leaving, 3, 5)),
        ]);
        let b = BTreeMap::from([
            ("n1".to_string(), entry(MemberState::Leaving, 1, 11)),
            ("n2".to_string(), entry(MemberState::Valid, 2, 50)),
        ]);
        let (mut ab, mut ba) = (a.clone(), b.clone());
        merge_members(&mut ab, &b);
        merge_members(&mut ba, &a);
        assert_eq!(ab, ba);
        assert_eq!(ab["n1"].state, MemberState::Leaving);
        assert_eq!(ab["n2"].state, MemberState::Leaving);
    }

    #[test]
    fn a_newer_ring_supersedes_and_ties_break_the_same_everywhere() {
        let r1 = RingEntry {
            ring: ring(&["n1", "n2", "n3"]),
            stamp: stamp(0, ""),
        };
        let next = r1
            .ring
            .rebalance(vec![
                Member::new("n1"),
                Member::new("n2"),
                Member::new("n3"),
                Member::new("n4"),
            ])
            .expect("rebalance");
        let r2 = RingEntry {
            ring: next,
            stamp: stamp(5, "n1"),
        };
        assert!(r1.superseded_by(&r2));
        assert!(!r2.superseded_by(&r1));
        assert!(!r2.superseded_by(&r2.clone()));
        let other = RingEntry {
            ring: ring(&["n1", "n2"]),
            stamp: stamp(0, ""),
        };
        // Exactly one of two different same-version rings replaces the other.
        assert_ne!(r1.superseded_by(&other), other.superseded_by(&r1));
    }

    #[test]
    fn staging_a_join_moves_a_quarter_of_the_replicas() {
        let current = ring(&["n1", "n2", "n3"]);
        let mut members: BTreeMap<String, MemberEntry> = ["n1", "n2", "n3"]
            .iter()
            .map(|id| (id.to_string(), entry(MemberState::Valid, 0, 0)))
            .collect();
        assert_eq!(staged_ring(&current, &members), Ok(None));
        members.insert("n4".into(), entry(MemberState::Joining, 1, 1));
        let next = staged_ring(&current, &members)
            .expect("valid")
            .expect("a change");
        assert_eq!(next.version(), 2);
        let moves = replica_moves(&current, &next, 3).expect("same size");
        let gained: usize = moves.iter().map(|m| m.gained.len()).sum();
        let lost: usize = moves.iter().map(|m| m.lost.len()).sum();
        // 3 nodes with n=3 hold everything; the 4th takes 3/4 of the partitions' replica
        // slots from them, which is 1/4 of all copies, and nothing else moves.
        assert_eq!(gained, lost);
        assert!(moves.iter().all(|m| m.gained == vec!["n4".to_string()]));
        let fraction = gained as f64 / f64::from(3 * current.partitions());
        assert!(
            (0.24..=0.275).contains(&fraction),
            "moved {fraction} of the copies"
        );
    }

    #[test]
    fn staging_a_leave_and_the_last_member() {
        let current = ring(&["n1", "n2"]);
        let mut members: BTreeMap<String, MemberEntry> = ["n1", "n2"]
            .iter()
            .map(|id| (id.to_string(), entry(MemberState::Valid, 0, 0)))
            .collect();
        members.insert("n2".into(), entry(MemberState::Leaving, 1, 1));
        let next = staged_ring(&current, &members)
            .expect("ok")
            .expect("change");
        assert_eq!(next.members().len(), 1);
        assert_eq!(next.partitions_of("n1").len() as u32, next.partitions());
        members.insert("n1".into(), entry(MemberState::Leaving, 1, 1));
        assert!(matches!(
            staged_ring(&current, &members),
            Err(MembershipError::LastMember(_))
        ));
    }
}
