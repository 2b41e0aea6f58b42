//! The ring: which node owns which part of the key space, and who replicates a key.
//!
//! # Model (Dynamo §4.2, §4.3 and §6.2 "strategy 3")
//!
//! The key space — the 256-bit SHA-256 of a bucket and a key — is cut into `Q` equal
//! partitions, `Q` a power of two fixed when the cluster is created. A key's partition is the
//! top `log2 Q` bits of its hash ([`partition_for_key`]). Partitions, not tokens, are the
//! unit of ownership and of data movement: every partition has exactly one owner, and
//! partitions are claimed by nodes in proportion to their weight. Dynamo's strategy 3 is
//! what makes a ring cheap to reason about: membership changes move whole partitions, the
//! partition boundaries never move, and a partition is also the unit of anti-entropy.
//!
//! # Quotas
//!
//! Each member's number of partitions is fixed by its weight, before any placement: the
//! largest-remainder apportionment of `Q` by weight ([`quotas`]). A fresh claim breaks equal
//! remainders by ascending node id; a rebalance gives them to the members that already hold
//! the most partitions, so rounding never moves data. Quotas are therefore exact (every node
//! owns its share rounded down or up), and the claim is deterministic from its inputs, which
//! is what a gossiped ring needs; a decoded ring is checked to respect the shares. A member whose quota rounds to zero (a tiny weight next to
//! big ones) owns nothing and appears in no preference list.
//!
//! # Spacing
//!
//! A key is replicated on the owner of its partition and the owners that follow it on the
//! ring (§4.3). If one node owned two partitions within `N` consecutive positions (`N` the
//! target `n_val` of the claim), preference lists through that stretch would have to skip
//! it and reach further, and the load on the nodes around it would be uneven. So the claim
//! spreads every node's partitions at least `N` apart; and where members carry zone labels,
//! it also spreads zones so that `N` consecutive owners sit in distinct zones when at least
//! `N` zones own partitions (with `Z < N` zones, so that `Z` consecutive owners do). Both are *best effort*: quotas can make them impossible (three
//! equal nodes on 256 partitions: 256 is not a multiple of 3; a node owning more than `Q/N`
//! partitions; one zone holding more than `1/N` of the weight). The remaining violations are
//! measured by [`Ring::spacing`]. An unlabeled member counts as a zone of its own, so a ring
//! without labels is spread by node only.
//!
//! # Claim
//!
//! A fresh ring ([`Ring::new`]) is laid out position by position. Each node has an ideal
//! schedule: its `k`-th partition is due at `(k + phase) * Q / quota`, with phases staggered
//! by node so that nodes interleave and the schedule wraps around the ring consistently.
//! At each position the claim takes, among nodes with quota left, the one whose placement
//! creates the fewest spacing violations with the positions already filled (including the
//! wrap-around to the start), then the earliest due. With equal weights this yields zero
//! violations whenever `S > N` (the tests check every `S` from 4 to 64 at `Q = 256`).
//! A bounded local search then swaps pairs of positions while a swap lowers the violation
//! count, which mends what the linear sweep leaves at the end of the ring.
//!
//! # Rebalance
//!
//! [`Ring::rebalance`] keeps every assignment it can: only partitions of departed members
//! and a node's partitions beyond its new quota move, so the number of moved partitions is
//! exactly `sum(max(0, owned_before - new_quota))`, the least any assignment meeting the new
//! quotas can move. With equal weights a joiner therefore takes exactly its quota,
//! `floor(Q/(S+1))` unless `Q/(S+1)` is whole, and a leaver's partitions are the only ones
//! that move. Which partitions move, and to whom, is chosen greedily: a move that
//! creates no spacing violation (or removes one) first, then the most under-quota receiver,
//! then the most over-quota donor (a departed member's partitions go first), then the
//! position farthest from the receiver's other partitions. A final swap search, limited to
//! swaps that do not increase the number of moved partitions, mends spacing.
//!
//! Minimal movement sometimes forces violations a fresh claim would avoid, mostly on leaves:
//! in a well-spread ring every freed partition sits within `N - 1` positions of the
//! leaver's ring neighbours, which must still take their share of the freed partitions
//! (four nodes down to three is the extreme: every freed partition lands next to its new
//! owner). [`Ring::spacing`] reports them; preference lists stay correct (distinct nodes,
//! distinct zones) and only reach a little further along the ring. An operator who prefers
//! spacing to movement can claim a fresh ring and diff it.

//! # Preference lists
//!
//! [`Ring::preference_list`] walks the ring clockwise from the partition and lists each
//! owning node once, in order of first appearance. The primaries are the first `n` of them,
//! except that a node whose zone is already among the primaries is passed over while zones
//! not yet used remain (so with `Z >= n` zones the primaries span `n` zones, and with fewer
//! zones they span all of them); passed-over nodes come back in walk order when zones run
//! out. Every other owning node follows as a fallback, in walk order: the sloppy-quorum
//! substitutes of §4.6. No node appears twice. When `n` exceeds the number of owning nodes,
//! the primaries are all of them and there are no fallbacks.
//!
//! # Versions and encoding
//!
//! A ring carries a version: 1 for a fresh ring, incremented by every rebalance. Gossip keeps
//! the ring with the highest version; the cluster plan/commit that produces rings is expected
//! to be serialized by one claimant, so two different rings of one version do not arise. A
//! ring is serde-serializable (the member list, sorted by id, and the owner of each
//! partition as an index into it) and deserialization re-validates every invariant, so a
//! ring received from the network is as trustworthy as one built locally. [`Ring::encode`]
//! prefixes a format tag for the wire.
//!
//! # Cost
//!
//! A claim is `O(Q * S * N)` (Q = 65536, S = 500: ~0.4 s in release). A rebalance keeps
//! its candidates in one heap per (receiver, donor) pair, so it costs about
//! `O((receivers * candidates + moved * receivers * N) * log)` (Q = 65536, S = 4 -> 5: ~30 ms).
//! Both end with a swap search bounded by a fixed budget of candidates looked at, so the
//! result stays deterministic. Preference lists are `O(Q)` at worst and typically `O(S)`:
//! the walk stops once every owning node was seen. Callers that route many requests should
//! cache the lists per partition for a given ring version.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// Partition count of a cluster created without one. 1024, not Riak's 256: whole partitions
/// make the largest of S equal owners hold ceil(Q/S), which at Q=256 is up to 1.23 x the mean
/// (S=63: 5 partitions against 4.06) and above 1.10 x for 15 cluster sizes from S=36 on; at
/// 1024 it stays within 1.055 x for every S up to 64. Per partition a node keeps a 4 KiB
/// anti-entropy tree per replication factor it stores, about 12 MiB at this size.
pub const DEFAULT_PARTITIONS: u32 = 1024;
/// Smallest partition count accepted.
pub const MIN_PARTITIONS: u32 = 8;
/// Largest partition count accepted: a ring of this size encodes to 64-128 KiB (one to
/// three bytes per partition), about the most we want to gossip.
pub const MAX_PARTITIONS: u32 = 65_536;
/// Target replication factor the claim spreads nodes for, unless told otherwise (Dynamo's
/// typical `N = 3`).
pub const DEFAULT_N_VAL: u32 = 3;
/// Largest target `n_val` of a claim; spacing costs grow with it, and replication factors
/// beyond a handful buy nothing.
pub const MAX_N_VAL: u32 = 64;

/// Version tag of [`Ring::encode`], the first byte of every encoded ring.
const RING_FORMAT_V1: u8 = 1;

/// Marks a partition without owner while a rebalance reassigns it.
const FREE: u32 = u32::MAX;

/// Violation cost of one node owning two partitions closer than the node window; higher
/// than a zone violation because a repeated node also repeats its zone.
const NODE_PAIR_COST: u64 = 3;
/// Violation cost of two nodes of one zone owning partitions closer than the zone window.
const ZONE_PAIR_COST: u64 = 1;

/// How many candidate swaps the spacing repair may evaluate. A fixed budget (rather than a
/// deadline) keeps the result deterministic; it is generous for `Q <= 4096` and only bites
/// in large rings where the quotas make violations unavoidable anyway.
const REPAIR_BUDGET: u64 = 4_000_000;

/// A node taking part in the ring.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Unique, non-empty node id (the operator-visible node name).
    pub id: String,
    /// Relative capacity, at least 1: a node of weight 2 owns twice the partitions of a node
    /// of weight 1 (up to the rounding of [`quotas`]).
    pub weight: u32,
    /// Failure domain (rack, availability zone). `None` makes the node a zone of its own.
    pub zone: Option<String>,
}

impl Member {
    /// A member of weight 1 without zone label.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            weight: 1,
            zone: None,
        }
    }

    /// The same member with another weight.
    #[must_use]
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The same member in the given zone.
    #[must_use]
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }
}

/// Parameters fixed when a cluster's ring is first claimed; rebalances keep them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimParams {
    /// Partition count `Q`: a power of two in `MIN_PARTITIONS..=MAX_PARTITIONS`. It cannot
    /// change later, since it fixes which partition every stored key belongs to.
    pub partitions: u32,
    /// Target replication factor the claim spaces nodes and zones for, in
    /// `1..=min(MAX_N_VAL, partitions / 2)`. Buckets may use other `n` values; their
    /// preference lists are still distinct nodes, only less evenly spread.
    pub n_val: u32,
}

impl Default for ClaimParams {
    fn default() -> Self {
        Self {
            partitions: DEFAULT_PARTITIONS,
            n_val: DEFAULT_N_VAL,
        }
    }
}

/// Why a ring could not be built, decoded or compared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A ring needs at least one member.
    #[error("a ring needs at least one member")]
    EmptyMembers,
    /// A member id is the empty string.
    #[error("a member id is empty")]
    EmptyMemberId,
    /// Two members share an id.
    #[error("member {0:?} is listed twice")]
    DuplicateMember(String),
    /// A member has weight 0 (leaving the ring is done by removing it).
    #[error("member {0:?} has weight 0; weights start at 1")]
    ZeroWeight(String),
    /// More members than partitions: some would own nothing even with equal weights.
    #[error("{members} members but only {partitions} partitions")]
    TooManyMembers {
        /// Members given.
        members: usize,
        /// Partitions of the ring.
        partitions: u32,
    },
    /// The partition count is not a power of two in the accepted range.
    #[error(
        "invalid partition count {0}: must be a power of two in {MIN_PARTITIONS}..={MAX_PARTITIONS}"
    )]
    InvalidPartitionCount(u32),
    /// The target `n_val` is 0 or too large for the ring.
    #[error("invalid target n_val {n_val} for {partitions} partitions")]
    InvalidNVal {
        /// The rejected value.
        n_val: u32,
        /// Partitions of the ring.
        partitions: u32,
    },
    /// A partition number is not below the partition count.
    #[error("partition {partition} out of range (the ring has {partitions})")]
    PartitionOutOfRange {
        /// The rejected partition.
        partition: u32,
        /// Partitions of the ring.
        partitions: u32,
    },
    /// Two rings with different partition counts cannot be compared.
    #[error("rings of {from} and {to} partitions cannot be compared")]
    PartitionCountMismatch {
        /// Partitions of the first ring.
        from: u32,
        /// Partitions of the second ring.
        to: u32,
    },
    /// The version counter would wrap.
    #[error("ring version overflow")]
    VersionOverflow,
    /// Encoded bytes are not a ring this version produced, or the ring they hold breaks an
    /// invariant.
    #[error("invalid ring encoding: {0}")]
    Decode(String),
}

/// The 32-byte position of a key on the ring: SHA-256 over the bucket's length (8 bytes,
/// big endian), the bucket and the key. The length prefix keeps `("ab", "c")` and
/// `("a", "bc")` apart.
pub fn key_position(bucket: &[u8], key: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    // usize is at most 64 bits on every target Rust supports, so the cast is lossless.
    hasher.update((bucket.len() as u64).to_be_bytes());
    hasher.update(bucket);
    hasher.update(key);
    hasher.finalize().into()
}

/// The partition holding a ring position: its top `log2 partitions` bits.
pub fn partition_of_position(position: &[u8; 32], partitions: u32) -> Result<u32, RingError> {
    check_partitions(partitions)?;
    Ok(partition_of(position, partitions))
}

/// The partition of `key` in `bucket` on a ring of `partitions` partitions.
pub fn partition_for_key(partitions: u32, bucket: &[u8], key: &[u8]) -> Result<u32, RingError> {
    partition_of_position(&key_position(bucket, key), partitions)
}

/// Partition of a position for a partition count already checked to be a valid power of two.
fn partition_of(position: &[u8; 32], partitions: u32) -> u32 {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&position[..8]);
    let bits = partitions.trailing_zeros();
    // bits is in 3..=16, so the shift is in 48..=61 and the result fits in u32.
    (u64::from_be_bytes(prefix) >> (64 - bits)) as u32
}

/// Exact partition quotas of `members` (in the order given) on a ring of `partitions`:
/// the largest-remainder apportionment of `partitions` by weight, remainders tied broken by
/// ascending member id. The quotas sum to `partitions`.
pub fn quotas(members: &[Member], partitions: u32) -> Result<Vec<u32>, RingError> {
    check_partitions(partitions)?;
    let sorted = canonical_members(members.to_vec(), partitions)?;
    let by_id = apportion(&sorted, partitions);
    Ok(members
        .iter()
        .map(|m| {
            sorted
                .binary_search_by(|x| x.id.cmp(&m.id))
                .ok()
                .and_then(|i| by_id.get(i).copied())
                .unwrap_or(0)
        })
        .collect())
}

/// Replicas of one partition, as references to the ring's members.
///
/// Members rather than ids or indices: the caller gets the id to route by and the zone to
/// report, borrowed from the ring it asked, so a list can never outlive or mix up rings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceList<'a> {
    /// The partition the list is for.
    pub partition: u32,
    /// The `n` nodes that hold the partition's replicas, in ring walk order; the first is
    /// the partition's owner.
    pub primaries: Vec<&'a Member>,
    /// Every other owning node, in ring walk order: where a sloppy quorum sends a write
    /// whose primary is unreachable (Dynamo §4.6).
    pub fallbacks: Vec<&'a Member>,
}

impl<'a> PreferenceList<'a> {
    /// Primaries, then fallbacks.
    pub fn nodes(&self) -> impl Iterator<Item = &'a Member> + '_ {
        self.primaries.iter().chain(&self.fallbacks).copied()
    }
}

/// A ring's identity ([`Ring::id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RingId {
    /// The ring's version.
    pub version: u64,
    /// The first 16 bytes of the SHA-256 of its encoding.
    pub hash: [u8; 16],
}

/// One partition changing owner between two rings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The partition that moves.
    pub partition: u32,
    /// Its owner in the older ring.
    pub from: String,
    /// Its owner in the newer ring.
    pub to: String,
}

/// Every partition whose owner differs between two rings: the data a cluster plan moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingDiff {
    /// Version of the ring moved from.
    pub from_version: u64,
    /// Version of the ring moved to.
    pub to_version: u64,
    /// The moves, by ascending partition.
    pub transfers: Vec<Transfer>,
}

impl RingDiff {
    /// Partitions moved per (from, to) pair of nodes.
    pub fn flows(&self) -> BTreeMap<(&str, &str), u32> {
        let mut out = BTreeMap::new();
        for t in &self.transfers {
            *out.entry((t.from.as_str(), t.to.as_str())).or_insert(0) += 1;
        }
        out
    }
}

/// How far a ring is from perfect spacing (see the module docs).
///
/// Violations are counted as pairs of partitions `(p, p + d)` (cyclically, `1 <= d` and `d`
/// below the window) with the same owner, or with different owners in the same zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpacingReport {
    /// The claim's target `n_val`.
    pub n_val: u32,
    /// Nodes owning at least one partition.
    pub owning_nodes: u32,
    /// Distinct zones among them (an unlabeled node is a zone of its own).
    pub zones: u32,
    /// `min(n_val, owning_nodes)`: how many consecutive owners should be distinct nodes.
    pub node_window: u32,
    /// `min(n_val, zones)`: how many consecutive owners should be in distinct zones.
    pub zone_window: u32,
    /// Pairs closer than `node_window` owned by one node.
    pub node_violations: u32,
    /// Pairs closer than `zone_window` owned by two nodes of one zone.
    pub zone_violations: u32,
}

impl SpacingReport {
    /// No violation of either kind.
    pub fn is_clean(&self) -> bool {
        self.node_violations == 0 && self.zone_violations == 0
    }
}

/// The partition ring of a cluster: `Q` partitions, each owned by one member.
///
/// Invariants (checked on construction and on deserialization): `Q` is valid, the members
/// are non-empty, unique, sorted by id and of weight >= 1, and every member owns exactly its
/// [`quotas`] share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    version: u64,
    partitions: u32,
    n_val: u32,
    /// Sorted by id; indices into it are what `owners` holds.
    members: Vec<Member>,
    /// Owner of each partition, as an index into `members`.
    owners: Vec<u32>,
    /// Derived: zone number of each member (an unlabeled member gets a number of its own).
    zones: Vec<u32>,
    /// Derived: members owning at least one partition.
    owning: u32,
    /// Derived: distinct zones among owning members.
    zone_count: u32,
}

impl Ring {
    /// Claims a fresh ring (version 1) for `members`, in any order.
    pub fn new(members: Vec<Member>, params: ClaimParams) -> Result<Self, RingError> {
        check_partitions(params.partitions)?;
        check_n_val(params.n_val, params.partitions)?;
        let members = canonical_members(members, params.partitions)?;
        let layout = Layout::new(&members, params.partitions, params.n_val);
        let mut owners = claim(&layout.quotas, &layout.spacing());
        repair(&mut owners, &layout.spacing(), None, REPAIR_BUDGET);
        Self::assemble(1, params.partitions, params.n_val, members, owners)
    }

    /// The ring after a membership change: `new_members` is the complete new member list
    /// (joins, leaves and weight or zone changes at once). Keeps every assignment the new
    /// quotas allow and moves exactly the partitions they require (see the module docs);
    /// the version is incremented.
    pub fn rebalance(&self, new_members: Vec<Member>) -> Result<Self, RingError> {
        let version = self
            .version
            .checked_add(1)
            .ok_or(RingError::VersionOverflow)?;
        let members = canonical_members(new_members, self.partitions)?;
        // Old member index -> new member index, FREE for members that left.
        let renumber: Vec<u32> = self
            .members
            .iter()
            .map(|m| {
                members
                    .binary_search_by(|x| x.id.cmp(&m.id))
                    .map_or(FREE, |i| i as u32)
            })
            .collect();
        let start: Vec<u32> = self
            .owners
            .iter()
            .map(|&o| renumber.get(o as usize).copied().unwrap_or(FREE))
            .collect();
        let mut held = vec![0u32; members.len()];
        for &o in &start {
            if let Some(h) = held.get_mut(o as usize) {
                *h += 1;
            }
        }
        let layout = Layout::favouring(&members, self.partitions, self.n_val, &held);
        let owners = reassign(start, &layout.quotas, &layout.spacing());
        Self::assemble(version, self.partitions, self.n_val, members, owners)
    }

    /// Which partitions change owner from `self` to `next`.
    pub fn diff(&self, next: &Ring) -> Result<RingDiff, RingError> {
        if self.partitions != next.partitions {
            return Err(RingError::PartitionCountMismatch {
                from: self.partitions,
                to: next.partitions,
            });
        }
        let transfers = (0..self.partitions)
            .zip(self.owners().zip(next.owners()))
            .filter(|(_, (a, b))| a.id != b.id)
            .map(|(partition, (a, b))| Transfer {
                partition,
                from: a.id.clone(),
                to: b.id.clone(),
            })
            .collect();
        Ok(RingDiff {
            from_version: self.version,
            to_version: next.version,
            transfers,
        })
    }

    /// The ring's version: 1 when claimed, +1 per rebalance.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The partition count `Q`.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The target `n_val` the ring is spaced for.
    pub fn n_val(&self) -> u32 {
        self.n_val
    }

    /// The members, sorted by id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member with this id.
    pub fn member(&self, id: &str) -> Option<&Member> {
        self.index_of(id).and_then(|i| self.members.get(i))
    }

    /// The owner of `partition`, if it is in range.
    pub fn owner(&self, partition: u32) -> Option<&Member> {
        let o = *self.owners.get(partition as usize)?;
        self.members.get(o as usize)
    }

    /// The owner of every partition, by ascending partition.
    pub fn owners(&self) -> impl Iterator<Item = &Member> + '_ {
        // Every index is a valid member index (a checked invariant); the filter_map only
        // avoids a panic path, it never drops an element.
        self.owners
            .iter()
            .filter_map(|&o| self.members.get(o as usize))
    }

    /// The partitions owned by `id`, ascending (empty for an unknown id).
    pub fn partitions_of(&self, id: &str) -> Vec<u32> {
        let Some(index) = self.index_of(id) else {
            return Vec::new();
        };
        (0..self.partitions)
            .zip(&self.owners)
            .filter(|&(_, &o)| o as usize == index)
            .map(|(p, _)| p)
            .collect()
    }

    /// How many partitions each member owns, in member order (by id). Equals its quota.
    pub fn owned_counts(&self) -> Vec<(&Member, u32)> {
        let mut counts = vec![0u32; self.members.len()];
        for &o in &self.owners {
            if let Some(c) = counts.get_mut(o as usize) {
                *c += 1;
            }
        }
        self.members.iter().zip(counts).collect()
    }

    /// The partition of `key` in `bucket`.
    pub fn partition_for_key(&self, bucket: &[u8], key: &[u8]) -> u32 {
        partition_of(&key_position(bucket, key), self.partitions)
    }

    /// The preference list of `partition` for replication factor `n` (see the module docs).
    pub fn preference_list(
        &self,
        partition: u32,
        n: usize,
    ) -> Result<PreferenceList<'_>, RingError> {
        if partition >= self.partitions {
            return Err(RingError::PartitionOutOfRange {
                partition,
                partitions: self.partitions,
            });
        }
        Ok(self.preference_list_unchecked(partition, n))
    }

    /// The preference list of the partition holding `key` in `bucket`.
    pub fn preference_list_for_key(
        &self,
        bucket: &[u8],
        key: &[u8],
        n: usize,
    ) -> PreferenceList<'_> {
        self.preference_list_unchecked(self.partition_for_key(bucket, key), n)
    }

    /// Spacing violations of this ring (see [`SpacingReport`]).
    pub fn spacing(&self) -> SpacingReport {
        let spacing = self.spacing_rules();
        let (node_violations, zone_violations) = spacing.count(&self.owners);
        SpacingReport {
            n_val: self.n_val,
            owning_nodes: self.owning,
            zones: self.zone_count,
            node_window: spacing.node_window as u32,
            zone_window: spacing.zone_window as u32,
            node_violations,
            zone_violations,
        }
    }

    /// Identifies this exact ring: its version and a hash of its encoding. Two nodes act
    /// together on ownership (handoff, reaping) only when their ids are equal; versions alone
    /// could match for two rings committed concurrently from one base.
    pub fn id(&self) -> RingId {
        let hash = Sha256::digest(self.encode().unwrap_or_default());
        let mut short = [0u8; 16];
        short.copy_from_slice(&hash[..16]);
        RingId {
            version: self.version,
            hash: short,
        }
    }

    /// The ring as bytes for the wire: a format tag, then postcard.
    pub fn encode(&self) -> Result<Vec<u8>, RingError> {
        let mut out = vec![RING_FORMAT_V1];
        let body = postcard::to_allocvec(self).map_err(|e| RingError::Decode(e.to_string()))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// A ring from [`Ring::encode`]d bytes, with every invariant re-checked.
    pub fn decode(bytes: &[u8]) -> Result<Self, RingError> {
        let Some((&format, body)) = bytes.split_first() else {
            return Err(RingError::Decode("empty input".into()));
        };
        if format != RING_FORMAT_V1 {
            return Err(RingError::Decode(format!("unknown format tag {format}")));
        }
        let (ring, rest): (Ring, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| RingError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(RingError::Decode(format!("{} trailing bytes", rest.len())));
        }
        Ok(ring)
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.members
            .binary_search_by(|m| m.id.as_str().cmp(id))
            .ok()
    }

    fn spacing_rules(&self) -> Spacing<'_> {
        Spacing::new(&self.zones, self.n_val, self.owning, self.zone_count)
    }

    fn preference_list_unchecked(&self, partition: u32, n: usize) -> PreferenceList<'_> {
        let q = self.owners.len();
        let start = partition as usize;
        let owning = self.owning as usize;
        // Distinct owners in walk order; stop once every owning node was seen.
        let mut seen = vec![false; self.members.len()];
        let mut walk: Vec<u32> = Vec::with_capacity(owning);
        for step in 0..q {
            if walk.len() >= owning {
                break;
            }
            let o = self.owners[(start + step) % q];
            if let Some(s) = seen.get_mut(o as usize)
                && !*s
            {
                *s = true;
                walk.push(o);
            }
        }
        // First pass: one node per zone, while unused zones remain. Second pass: fill up
        // with the passed-over nodes in walk order.
        let mut primary = vec![false; walk.len()];
        let mut used_zones: Vec<u32> = Vec::with_capacity(n.min(walk.len()));
        let mut taken = 0;
        for (k, &o) in walk.iter().enumerate() {
            if taken >= n {
                break;
            }
            let zone = self.zones.get(o as usize).copied().unwrap_or(FREE);
            if !used_zones.contains(&zone) {
                used_zones.push(zone);
                primary[k] = true;
                taken += 1;
            }
        }
        for flag in primary.iter_mut() {
            if taken >= n {
                break;
            }
            if !*flag {
                *flag = true;
                taken += 1;
            }
        }
        let mut primaries = Vec::with_capacity(taken);
        let mut fallbacks = Vec::with_capacity(walk.len() - taken);
        for (&o, &is_primary) in walk.iter().zip(&primary) {
            if let Some(m) = self.members.get(o as usize) {
                if is_primary {
                    primaries.push(m);
                } else {
                    fallbacks.push(m);
                }
            }
        }
        PreferenceList {
            partition,
            primaries,
            fallbacks,
        }
    }

    /// Builds a ring from its parts, checking every invariant.
    fn assemble(
        version: u64,
        partitions: u32,
        n_val: u32,
        members: Vec<Member>,
        owners: Vec<u32>,
    ) -> Result<Self, RingError> {
        check_partitions(partitions)?;
        check_n_val(n_val, partitions)?;
        let corrupt = |what: String| Err(RingError::Decode(what));
        if members.is_empty() {
            return Err(RingError::EmptyMembers);
        }
        for pair in members.windows(2) {
            if let [a, b] = pair
                && a.id >= b.id
            {
                return corrupt(format!("members not sorted by id at {:?}", b.id));
            }
        }
        let members = canonical_members(members, partitions)?;
        if owners.len() != partitions as usize {
            return corrupt(format!(
                "{} owners for {partitions} partitions",
                owners.len()
            ));
        }
        let layout = Layout::new(&members, partitions, n_val);
        let mut counts = vec![0u32; members.len()];
        for &o in &owners {
            match counts.get_mut(o as usize) {
                Some(c) => *c += 1,
                None => return corrupt(format!("owner index {o} out of range")),
            }
        }
        // Any largest-remainder rounding is a valid claim (a rebalance breaks ties in favour
        // of incumbents, a fresh claim by id): each count must be the floor of its exact
        // share, or one more where the share is not whole.
        let total: u128 = members
            .iter()
            .map(|m| u128::from(m.weight))
            .sum::<u128>()
            .max(1);
        for (m, &c) in members.iter().zip(&counts) {
            let share = u128::from(partitions) * u128::from(m.weight);
            let floor = share / total;
            let ceil = floor + u128::from(share % total != 0);
            if u128::from(c) < floor || u128::from(c) > ceil {
                return corrupt(format!(
                    "{} owns {c} partitions, outside its share [{floor}, {ceil}]",
                    m.id
                ));
            }
        }
        // Who owns what is derived from the owners themselves, not from a fresh claim's
        // quotas: a rebalance may round a small share up for an incumbent that a fresh claim
        // would round down (found by the rebalance property test).
        let mut owning_zones: Vec<u32> = layout
            .zones
            .iter()
            .zip(&counts)
            .filter(|&(_, &c)| c > 0)
            .map(|(&z, _)| z)
            .collect();
        let owning = owning_zones.len() as u32;
        owning_zones.sort_unstable();
        owning_zones.dedup();
        Ok(Self {
            version,
            partitions,
            n_val,
            zones: layout.zones,
            owning,
            zone_count: owning_zones.len() as u32,
            members,
            owners,
        })
    }
}

/// The serialized form of a ring: everything that is not derived.
#[derive(Serialize)]
#[serde(rename = "Ring")]
struct RingWireRef<'a> {
    version: u64,
    partitions: u32,
    n_val: u32,
    members: &'a [Member],
    owners: &'a [u32],
}

/// The deserialized form of a ring, validated by [`Ring::assemble`] before use.
#[derive(Deserialize)]
#[serde(rename = "Ring")]
struct RingWire {
    version: u64,
    partitions: u32,
    n_val: u32,
    members: Vec<Member>,
    owners: Vec<u32>,
}

impl Serialize for Ring {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        RingWireRef {
            version: self.version,
            partitions: self.partitions,
            n_val: self.n_val,
            members: &self.members,
            owners: &self.owners,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Ring {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let w = RingWire::deserialize(deserializer)?;
        Ring::assemble(w.version, w.partitions, w.n_val, w.members, w.owners)
            .map_err(serde::de::Error::custom)
    }
}

fn check_partitions(partitions: u32) -> Result<(), RingError> {
    if partitions.is_power_of_two() && (MIN_PARTITIONS..=MAX_PARTITIONS).contains(&partitions) {
        Ok(())
    } else {
        Err(RingError::InvalidPartitionCount(partitions))
    }
}

fn check_n_val(n_val: u32, partitions: u32) -> Result<(), RingError> {
    // n_val <= Q/2 keeps every pair within a window counted once on the cycle.
    if (1..=MAX_N_VAL).contains(&n_val) && n_val <= partitions / 2 {
        Ok(())
    } else {
        Err(RingError::InvalidNVal { n_val, partitions })
    }
}

/// Validates members and sorts them by id (the canonical order indices refer to).
fn canonical_members(mut members: Vec<Member>, partitions: u32) -> Result<Vec<Member>, RingError> {
    if members.is_empty() {
        return Err(RingError::EmptyMembers);
    }
    if members.len() > partitions as usize {
        return Err(RingError::TooManyMembers {
            members: members.len(),
            partitions,
        });
    }
    members.sort_by(|a, b| a.id.cmp(&b.id));
    for m in &members {
        if m.id.is_empty() {
            return Err(RingError::EmptyMemberId);
        }
        if m.weight == 0 {
            return Err(RingError::ZeroWeight(m.id.clone()));
        }
    }
    for pair in members.windows(2) {
        if let [a, b] = pair
            && a.id == b.id
        {
            return Err(RingError::DuplicateMember(a.id.clone()));
        }
    }
    Ok(members)
}

/// Largest-remainder apportionment for members sorted by id (so index order is id order).
fn apportion(members: &[Member], partitions: u32) -> Vec<u32> {
    apportion_favouring(members, partitions, &[])
}

/// [`apportion`] where equal remainders go first to the members that already hold the most
/// partitions (`held[i]`, missing entries count as 0), then by ascending id. On a rebalance
/// this keeps the rounding seat with an incumbent instead of handing it to a joiner whose id
/// sorts first, so a join moves at most floor-or-exact Q/(S+1) partitions rather than the
/// ceiling.
fn apportion_favouring(members: &[Member], partitions: u32, held: &[u32]) -> Vec<u32> {
    let total: u128 = members.iter().map(|m| u128::from(m.weight)).sum();
    let q = u128::from(partitions);
    let mut quotas = Vec::with_capacity(members.len());
    let mut remainders = Vec::with_capacity(members.len());
    for m in members {
        let share = q * u128::from(m.weight);
        // share / total <= q, which fits in u32.
        quotas.push((share / total.max(1)) as u32);
        remainders.push(share % total.max(1));
    }
    let assigned: u32 = quotas.iter().sum();
    let left = partitions.saturating_sub(assigned) as usize;
    let mut order: Vec<usize> = (0..members.len()).collect();
    // Largest remainder first; equal remainders to the larger incumbent, then by ascending
    // id (= ascending index).
    let held_of = |i: usize| held.get(i).copied().unwrap_or(0);
    order.sort_by(|&a, &b| {
        remainders[b]
            .cmp(&remainders[a])
            .then(held_of(b).cmp(&held_of(a)))
            .then(a.cmp(&b))
    });
    for &i in order.iter().take(left) {
        quotas[i] += 1;
    }
    quotas
}

/// Everything the claim needs to know about a member list, derived deterministically.
struct Layout {
    quotas: Vec<u32>,
    zones: Vec<u32>,
    owning: usize,
    zone_count: usize,
    n_val: u32,
}

impl Layout {
    fn new(members: &[Member], partitions: u32, n_val: u32) -> Self {
        Self::favouring(members, partitions, n_val, &[])
    }

    /// A layout whose quotas break remainder ties in favour of current holdings.
    fn favouring(members: &[Member], partitions: u32, n_val: u32, held: &[u32]) -> Self {
        let quotas = apportion_favouring(members, partitions, held);
        // Labeled zones are numbered in label order, unlabeled members after them.
        let mut labels: BTreeMap<&str, u32> = BTreeMap::new();
        for m in members {
            if let Some(z) = &m.zone {
                labels.insert(z.as_str(), 0);
            }
        }
        for (n, v) in labels.values_mut().enumerate() {
            *v = n as u32;
        }
        let label_count = labels.len() as u32;
        let zones: Vec<u32> = members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.zone
                    .as_deref()
                    .and_then(|z| labels.get(z).copied())
                    .unwrap_or(label_count + i as u32)
            })
            .collect();
        let mut owning_zones: Vec<u32> = zones
            .iter()
            .zip(&quotas)
            .filter(|&(_, &q)| q > 0)
            .map(|(&z, _)| z)
            .collect();
        let owning = owning_zones.len();
        owning_zones.sort_unstable();
        owning_zones.dedup();
        Self {
            quotas,
            zones,
            owning,
            zone_count: owning_zones.len(),
            n_val,
        }
    }

    fn spacing(&self) -> Spacing<'_> {
        Spacing::new(
            &self.zones,
            self.n_val,
            self.owning as u32,
            self.zone_count as u32,
        )
    }
}

/// The spacing rules of one ring: which pairs of positions count as violations.
struct Spacing<'a> {
    zones: &'a [u32],
    /// One node should not own two positions closer than this.
    node_window: usize,
    /// Two nodes of one zone should not own positions closer than this (<= node_window).
    zone_window: usize,
}

impl<'a> Spacing<'a> {
    fn new(zones: &'a [u32], n_val: u32, owning: u32, zone_count: u32) -> Self {
        Self {
            zones,
            node_window: n_val.min(owning).max(1) as usize,
            zone_window: n_val.min(zone_count).max(1) as usize,
        }
    }

    /// Cost of nodes `a` and `b` owning positions `d` apart.
    fn pair(&self, a: u32, b: u32, d: usize) -> u64 {
        if a == FREE || b == FREE {
            return 0;
        }
        if a == b {
            return if d < self.node_window {
                NODE_PAIR_COST
            } else {
                0
            };
        }
        match (self.zones.get(a as usize), self.zones.get(b as usize)) {
            (Some(za), Some(zb)) if za == zb && d < self.zone_window => ZONE_PAIR_COST,
            _ => 0,
        }
    }

    /// Cost of every pair between position `p`, taken as owned by `node`, and the positions
    /// around it (whatever `p` currently holds is ignored).
    fn around(&self, owners: &[u32], p: usize, node: u32) -> u64 {
        let q = owners.len();
        (1..self.node_window)
            .map(|d| {
                self.pair(node, owners[(p + d) % q], d)
                    + self.pair(node, owners[(p + q - d) % q], d)
            })
            .sum()
    }

    /// Cost of the pairs that involve position `a` or `b`, each pair counted once.
    fn local(&self, owners: &[u32], a: usize, b: usize) -> u64 {
        let q = owners.len();
        let mut cost = self.around(owners, a, owners[a]) + self.around(owners, b, owners[b]);
        let d = a.abs_diff(b);
        let d = d.min(q - d);
        if d < self.node_window {
            cost -= self.pair(owners[a], owners[b], d);
        }
        cost
    }

    /// (node violations, zone violations) of a full assignment.
    fn count(&self, owners: &[u32]) -> (u32, u32) {
        let q = owners.len();
        let (mut nodes, mut zones) = (0, 0);
        for p in 0..q {
            for d in 1..self.node_window {
                let (a, b) = (owners[p], owners[(p + d) % q]);
                match self.pair(a, b, d) {
                    0 => {}
                    _ if a == b => nodes += 1,
                    _ => zones += 1,
                }
            }
        }
        (nodes, zones)
    }
}

/// The initial claim: lays the ring out position by position (see the module docs).
fn claim(quotas: &[u32], spacing: &Spacing<'_>) -> Vec<u32> {
    let q: usize = quotas.iter().map(|&c| c as usize).sum();
    let s = quotas.len() as u128;
    let mut owners = vec![FREE; q];
    let mut placed = vec![0u32; quotas.len()];
    for p in 0..q {
        // (cost, due-time numerator, denominator, node)
        let mut best: Option<(u64, u128, u128, usize)> = None;
        for (i, (&quota, &done)) in quotas.iter().zip(&placed).enumerate() {
            if done >= quota {
                continue;
            }
            let cost = spacing.around(&owners, p, i as u32);
            // Node i's next partition is due at (done + (2i + 1) / 2S) / quota of the ring:
            // the staggered phase (2i + 1) / 2S interleaves nodes of equal quota.
            let num = 2 * s * u128::from(done) + 2 * i as u128 + 1;
            let den = 2 * s * u128::from(quota);
            let better = match best {
                None => true,
                Some((bc, bn, bd, _)) => {
                    cost < bc || (cost == bc && (num * bd).cmp(&(bn * den)) == Ordering::Less)
                }
            };
            if better {
                best = Some((cost, num, den, i));
            }
        }
        if let Some((_, _, _, i)) = best {
            owners[p] = i as u32;
            placed[i] += 1;
        }
    }
    owners
}

/// Lowers spacing violations by swapping the owners of two positions while a swap helps.
///
/// With `old` (a rebalance), only swaps that do not increase the number of positions whose
/// owner differs from `old` are allowed, so the movement stays minimal; the partner of a
/// swap is then drawn from the positions that moved, since a swap of two unmoved positions
/// always adds two moves. Every candidate looked at costs one unit of `budget`.
fn repair(owners: &mut [u32], spacing: &Spacing<'_>, old: Option<&[u32]>, mut budget: u64) {
    let q = owners.len();
    loop {
        let pool: Vec<usize> = match old {
            None => (0..q).collect(),
            Some(old) => (0..q).filter(|&p| owners[p] != old[p]).collect(),
        };
        let mut improved = false;
        for a in 0..q {
            if budget == 0 {
                return;
            }
            budget -= 1;
            let oa = owners[a];
            if spacing.around(owners, a, oa) == 0 {
                continue;
            }
            let mut best: Option<(i64, usize)> = None;
            for &b in &pool {
                if budget == 0 {
                    return;
                }
                budget -= 1;
                let ob = owners[b];
                if ob == oa {
                    continue;
                }
                if let Some(old) = old {
                    let moved_before = usize::from(oa != old[a]) + usize::from(ob != old[b]);
                    let moved_after = usize::from(ob != old[a]) + usize::from(oa != old[b]);
                    if moved_after > moved_before {
                        continue;
                    }
                }
                let before = spacing.local(owners, a, b);
                owners.swap(a, b);
                let after = spacing.local(owners, a, b);
                owners.swap(a, b);
                let delta = after as i64 - before as i64;
                if delta < best.map_or(0, |(d, _)| d) {
                    best = Some((delta, b));
                }
            }
            if let Some((_, b)) = best {
                owners.swap(a, b);
                improved = true;
            }
        }
        if !improved {
            return;
        }
    }
}

/// Distance from `p` to the nearest of the sorted positions `held` on a ring of `q`.
fn nearest(held: &[u32], p: usize, q: usize) -> u32 {
    let (Some(&first), Some(&last)) = (held.first(), held.last()) else {
        return u32::MAX;
    };
    let i = held.partition_point(|&x| (x as usize) < p);
    let next = held.get(i).map_or(first as usize + q, |&x| x as usize);
    let prev = match i.checked_sub(1).and_then(|j| held.get(j)) {
        Some(&x) => x as i64,
        None => last as i64 - q as i64,
    };
    let up = next - p;
    let down = (p as i64 - prev) as usize;
    up.min(down) as u32
}

/// Within one (receiver, donor) group, how good taking a position is: net violation cost
/// (lower first), distance to the receiver's nearest partition capped at its ideal gap
/// (larger first), position (lower first).
type GroupKey = (i64, Reverse<u32>, u32);

/// Minimal-movement reassignment for new quotas (see the module docs). `owners` holds the
/// previous owners in the new member numbering, `FREE` where the owner left.
///
/// The greedy picks, at each step, the best (position, receiver) by the key
/// (net violation cost, most under-quota receiver, most over-quota donor, spread, position,
/// receiver). Candidates are kept in one min-heap per (receiver, donor) group, where the
/// receiver's deficit and the donor's excess are constant, so a step only compares group
/// heads. Heads are validated lazily: a position's spread only shrinks as its receiver
/// gains partitions (a stale entry is optimistic and gets re-queued when it surfaces), and
/// whenever a position changes owner its neighbours' net costs are re-queued at once.
fn reassign(mut owners: Vec<u32>, quotas: &[u32], spacing: &Spacing<'_>) -> Vec<u32> {
    let q = owners.len();
    let old = owners.clone();
    let mut counts = vec![0u32; quotas.len()];
    for &o in &owners {
        if let Some(c) = counts.get_mut(o as usize) {
            *c += 1;
        }
    }
    let mut excess: Vec<u32> = counts
        .iter()
        .zip(quotas)
        .map(|(c, quota)| c.saturating_sub(*quota))
        .collect();
    let mut deficit: Vec<u32> = quotas
        .iter()
        .zip(&counts)
        .map(|(quota, c)| quota.saturating_sub(*c))
        .collect();
    let receivers: Vec<usize> = (0..quotas.len()).filter(|&j| deficit[j] > 0).collect();
    // Donor slot 0 is "no owner" (a departed member's partitions), then each over-quota
    // member. Only their positions are candidates.
    let mut slot_of = vec![usize::MAX; quotas.len()];
    let mut donors: Vec<u32> = vec![FREE];
    for (i, &e) in excess.iter().enumerate() {
        if e > 0 {
            slot_of[i] = donors.len();
            donors.push(i as u32);
        }
    }
    let slot = |owner: u32| -> Option<usize> {
        if owner == FREE {
            Some(0)
        } else {
            slot_of
                .get(owner as usize)
                .copied()
                .filter(|&s| s != usize::MAX)
        }
    };
    // Positions each receiver holds, sorted, to prefer spreading its new partitions.
    let mut held: Vec<Vec<u32>> = vec![Vec::new(); quotas.len()];
    for (p, &o) in owners.iter().enumerate() {
        if let Some(h) = held.get_mut(o as usize)
            && deficit.get(o as usize).is_some_and(|&d| d > 0)
        {
            h.push(p as u32);
        }
    }
    let ideal_gap: Vec<u32> = quotas.iter().map(|&c| (q as u32) / c.max(1)).collect();
    let group_key = |owners: &[u32], held: &[Vec<u32>], p: usize, j: usize| -> GroupKey {
        let current = owners[p];
        let relief = if current == FREE {
            0
        } else {
            spacing.around(owners, p, current) as i64
        };
        let net = spacing.around(owners, p, j as u32) as i64 - relief;
        let spread = nearest(&held[j], p, q).min(ideal_gap[j]);
        (net, Reverse(spread), p as u32)
    };
    let groups = donors.len();
    let mut heaps: Vec<BinaryHeap<Reverse<GroupKey>>> =
        vec![BinaryHeap::new(); receivers.len() * groups];
    for p in 0..q {
        if let Some(k) = slot(owners[p]) {
            for (r, &j) in receivers.iter().enumerate() {
                heaps[r * groups + k].push(Reverse(group_key(&owners, &held, p, j)));
            }
        }
    }
    // Sum of deficits = freed partitions + sum of excesses, so while a receiver has room a
    // candidate exists, and the loop ends with every quota met.
    type Choice = (i64, Reverse<u32>, Reverse<u32>, Reverse<u32>, u32, usize);
    loop {
        let mut best: Option<Choice> = None;
        for (r, &j) in receivers.iter().enumerate() {
            if deficit[j] == 0 {
                continue;
            }
            for (k, &d) in donors.iter().enumerate() {
                let donor_excess = if d == FREE {
                    u32::MAX
                } else {
                    excess[d as usize]
                };
                if donor_excess == 0 {
                    continue;
                }
                let heap = &mut heaps[r * groups + k];
                let head = loop {
                    let Some(&Reverse(stored)) = heap.peek() else {
                        break None;
                    };
                    let p = stored.2 as usize;
                    if owners[p] != d {
                        heap.pop();
                        continue;
                    }
                    let fresh = group_key(&owners, &held, p, j);
                    if fresh == stored {
                        break Some(stored);
                    }
                    heap.pop();
                    heap.push(Reverse(fresh));
                };
                let Some((net, spread, p)) = head else {
                    continue;
                };
                let choice = (
                    net,
                    Reverse(deficit[j]),
                    Reverse(donor_excess),
                    spread,
                    p,
                    j,
                );
                if best.is_none_or(|b| choice < b) {
                    best = Some(choice);
                }
            }
        }
        let Some((.., p, j)) = best else {
            break;
        };
        let p = p as usize;
        if let Some(e) = excess.get_mut(owners[p] as usize) {
            *e = e.saturating_sub(1);
        }
        owners[p] = j as u32;
        deficit[j] -= 1;
        let at = held[j].partition_point(|&x| (x as usize) < p);
        held[j].insert(at, p as u32);
        // The neighbours' costs changed, possibly for the better: re-queue them.
        for dist in 1..spacing.node_window {
            for n in [(p + dist) % q, (p + q - dist) % q] {
                let Some(k) = slot(owners[n]) else {
                    continue;
                };
                for (r, &j2) in receivers.iter().enumerate() {
                    if deficit[j2] > 0 {
                        heaps[r * groups + k].push(Reverse(group_key(&owners, &held, n, j2)));
                    }
                }
            }
        }
    }
    repair(&mut owners, spacing, Some(&old), REPAIR_BUDGET);
    owners
}
