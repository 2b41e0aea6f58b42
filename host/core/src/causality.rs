//! Causality: dotted version vectors for one key.
//!
//! A key's replicated state is an [`Object`]: a set of concurrent [`Sibling`]s, each tagged
//! with the unique [`Dot`] of the write that created it, plus a causal context (a
//! [`VersionVector`]) summarising every write the state has seen. This is the "dotted causal
//! container" of Almeida et al. and the object model of Riak 2.x:
//!
//! - A write carries the context its client read. It drops exactly the siblings whose dots
//!   the context covers (the client saw them and chose to replace them) and keeps the rest as
//!   concurrent siblings ([`Object::apply_write`]).
//! - Two replica states merge by keeping every sibling the other side has not seen
//!   ([`Object::merge`]). The merge is commutative, associative and idempotent, and it drops a
//!   sibling only when the other side's context proves a write that covered it exists.
//!
//! # Dots are never reused
//!
//! If a coordinator forgot the writes it issued for a key (wiped disk, handed-off data, a
//! crash that lost buffered writes) and restarted its counter, its next dot could equal one
//! still alive on another replica, and the merge would treat the new write as already seen
//! and drop it: Riak lost data exactly this way (riak_kv#679). Quiver makes a coordinator's
//! actor per key: [`ActorId`] holds an `epoch` that the node draws fresh from a durable,
//! monotonic allocator whenever it has no *trusted* local record of its own epoch for the key
//! ([`LocalRecord::own_epoch`]). The local record is the only place the counter of that
//! actor advances, and it is written before the write is acknowledged or replicated, so a
//! trusted record always holds the actor's highest dot. Whether an epoch is trusted is the
//! caller's policy ([`EpochSource`]); the node trusts only epochs allocated in its current
//! boot, so anything a crash may have rolled back is never continued.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::{CONTEXT_ACTORS_MAX, CONTEXT_BYTES_MAX};

/// Identity of a writer of dots: a node incarnation and a per-key epoch on it.
///
/// `incarnation` is chosen once when a node's data directory is created, so a node whose disk
/// was wiped never collides with its former self; `epoch` comes from that incarnation's
/// durable allocator.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ActorId {
    /// Operator-visible node name.
    pub node: String,
    /// Random identity of the node's data directory.
    pub incarnation: u64,
    /// Per-key epoch drawn from the incarnation's allocator.
    pub epoch: u64,
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:016x}.{}", self.node, self.incarnation, self.epoch)
    }
}

/// One write's unique identity: the `counter`-th dot issued by `actor`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// Who issued the dot.
    pub actor: ActorId,
    /// Position in the actor's sequence, starting at 1.
    pub counter: u64,
}

/// A set of dots closed under "earlier dots of the same actor": `actor -> n` stands for the
/// dots `(actor, 1..=n)`. Entries are never zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector {
    entries: BTreeMap<ActorId, u64>,
}

impl VersionVector {
    /// The empty vector (covers nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest counter seen for `actor`, or 0.
    pub fn get(&self, actor: &ActorId) -> u64 {
        self.entries.get(actor).copied().unwrap_or(0)
    }

    /// True when the vector covers `dot`.
    pub fn covers(&self, dot: &Dot) -> bool {
        self.get(&dot.actor) >= dot.counter
    }

    /// Adds `dot` (and, by closure, every earlier dot of its actor).
    pub fn add(&mut self, dot: &Dot) {
        if dot.counter == 0 {
            return;
        }
        let entry = self.entries.entry(dot.actor.clone()).or_insert(0);
        *entry = (*entry).max(dot.counter);
    }

    /// Least upper bound with `other`.
    pub fn join(&mut self, other: &VersionVector) {
        for (actor, &n) in &other.entries {
            if n == 0 {
                continue;
            }
            let entry = self.entries.entry(actor.clone()).or_insert(0);
            *entry = (*entry).max(n);
        }
    }

    /// True when `self` covers every dot `other` covers.
    pub fn descends(&self, other: &VersionVector) -> bool {
        other.entries.iter().all(|(a, &n)| self.get(a) >= n)
    }

    /// Number of actors named.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the vector covers nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Iterates `(actor, highest counter)` in actor order.
    pub fn iter(&self) -> impl Iterator<Item = (&ActorId, u64)> {
        self.entries.iter().map(|(a, &n)| (a, n))
    }

    /// Drops zero entries so that equal sets compare equal (decoded input may carry them).
    fn normalize(&mut self) {
        self.entries.retain(|_, n| *n > 0);
    }
}

/// Metadata a reconciler needs about a sibling, besides its actor (in its dot).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SiblingMeta {
    /// Coordinator wall clock when the write was accepted, in ms since the Unix epoch.
    /// Injected by the caller; informative only (causality never depends on it).
    pub timestamp_ms: u64,
    /// True for a delete marker; its value is empty.
    pub tombstone: bool,
}

/// One concurrent version of a key's value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sibling {
    /// The write that created this version.
    pub dot: Dot,
    /// The value bytes (empty for a tombstone).
    pub value: Vec<u8>,
    /// Timestamp and tombstone flag.
    pub meta: SiblingMeta,
}

/// What a client asked to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Store a value.
    Put(Vec<u8>),
    /// Store a tombstone.
    Delete,
}

/// The replicated state of one key: concurrent siblings and the causal context that
/// summarises every write this state has seen.
///
/// Invariants (kept by every constructor and operation here): siblings are sorted by dot,
/// dots are distinct, the context covers every sibling's dot, and the context has no zero
/// entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Object {
    context: VersionVector,
    siblings: Vec<Sibling>,
}

impl Object {
    /// The state of a key nobody has written.
    pub fn new() -> Self {
        Self::default()
    }

    /// The causal context: what a client must send back to replace every current sibling.
    pub fn context(&self) -> &VersionVector {
        &self.context
    }

    /// Current siblings in dot order (tombstones included).
    pub fn siblings(&self) -> &[Sibling] {
        &self.siblings
    }

    /// Siblings that are not tombstones.
    pub fn live_siblings(&self) -> impl Iterator<Item = &Sibling> {
        self.siblings.iter().filter(|s| !s.meta.tombstone)
    }

    /// True when at least one sibling is a value (not a tombstone): the key "exists".
    pub fn is_found(&self) -> bool {
        self.live_siblings().next().is_some()
    }

    /// Applies a write with dot `dot`, issued for a client that had read `client_context`.
    ///
    /// Drops exactly the siblings whose dots `client_context` covers, adds the new sibling and
    /// joins both the client's context and the dot into the object's context. The caller
    /// guarantees `dot` is fresh (see [`coordinate_write`]).
    pub fn apply_write(
        &mut self,
        client_context: &VersionVector,
        dot: Dot,
        op: WriteOp,
        timestamp_ms: u64,
    ) {
        self.siblings.retain(|s| !client_context.covers(&s.dot));
        self.context.join(client_context);
        self.context.add(&dot);
        let (value, tombstone) = match op {
            WriteOp::Put(v) => (v, false),
            WriteOp::Delete => (Vec::new(), true),
        };
        let sibling = Sibling {
            dot,
            value,
            meta: SiblingMeta {
                timestamp_ms,
                tombstone,
            },
        };
        match self.siblings.binary_search_by(|s| s.dot.cmp(&sibling.dot)) {
            // Same dot twice means the caller broke the freshness rule; keep the result
            // deterministic rather than duplicating the dot.
            Ok(i) => self.siblings[i] = pick(&self.siblings[i], &sibling).clone(),
            Err(i) => self.siblings.insert(i, sibling),
        }
    }

    /// Merges another replica's state of the same key into a new state.
    ///
    /// A sibling survives if the other side holds it too or has not seen its dot; a sibling
    /// is dropped only when the other side's context covers its dot and the other side no
    /// longer holds it, which means a write that replaced it exists there.
    pub fn merge(&self, other: &Object) -> Object {
        let mut siblings = Vec::with_capacity(self.siblings.len() + other.siblings.len());
        let (mut i, mut j) = (0, 0);
        while i < self.siblings.len() || j < other.siblings.len() {
            let a = self.siblings.get(i);
            let b = other.siblings.get(j);
            match (a, b) {
                (Some(x), Some(y)) if x.dot == y.dot => {
                    siblings.push(pick(x, y).clone());
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x.dot < y.dot => {
                    if !other.context.covers(&x.dot) {
                        siblings.push(x.clone());
                    }
                    i += 1;
                }
                (Some(x), None) => {
                    if !other.context.covers(&x.dot) {
                        siblings.push(x.clone());
                    }
                    i += 1;
                }
                (_, Some(y)) => {
                    if !self.context.covers(&y.dot) {
                        siblings.push(y.clone());
                    }
                    j += 1;
                }
                (None, None) => break,
            }
        }
        let mut context = self.context.clone();
        context.join(&other.context);
        Object { context, siblings }
    }

    /// Checks the invariants on state that came from outside (disk, network).
    pub fn validate(&self) -> Result<(), CausalityError> {
        for pair in self.siblings.windows(2) {
            if pair[0].dot >= pair[1].dot {
                return Err(CausalityError::InvalidObject(
                    "siblings not sorted by distinct dots",
                ));
            }
        }
        if let Some(s) = self.siblings.iter().find(|s| !self.context.covers(&s.dot)) {
            let _ = s;
            return Err(CausalityError::InvalidObject(
                "context does not cover a sibling's dot",
            ));
        }
        if self.siblings.iter().any(|s| s.dot.counter == 0) {
            return Err(CausalityError::InvalidObject("sibling with a zero counter"));
        }
        // A zero entry covers nothing but makes equal contexts compare unequal, so merges of
        // such objects would not be commutative and replicas would never compare equal.
        if self.context.iter().any(|(_, n)| n == 0) {
            return Err(CausalityError::InvalidObject("context with a zero entry"));
        }
        Ok(())
    }
}

/// Deterministic choice between two siblings that claim the same dot. Only reachable if a
/// dot was reused, which this module prevents; keeping the choice order-independent keeps
/// the merge commutative even then.
fn pick<'a>(x: &'a Sibling, y: &'a Sibling) -> &'a Sibling {
    let kx = (x.meta.timestamp_ms, x.meta.tombstone, &x.value);
    let ky = (y.meta.timestamp_ms, y.meta.tombstone, &y.value);
    if kx >= ky { x } else { y }
}

/// A key's state as one node stores it: the replicated object plus the node's own actor
/// epoch for the key, which is local knowledge and never travels with the object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRecord {
    /// The replicated state.
    pub object: Object,
    /// The epoch this node last coordinated a write of this key under, if any.
    pub own_epoch: Option<u64>,
}

impl LocalRecord {
    /// Merges a remote replica's object into this record, keeping the local epoch.
    pub fn merge_remote(&mut self, remote: &Object) {
        self.object = self.object.merge(remote);
    }
}

/// Where a coordinator gets actor epochs from. Implemented by the node over a durable
/// allocator, and by tests and the simulator over plain counters.
pub trait EpochSource {
    /// True when `epoch`, found in a local record, may be continued: the record is known
    /// to hold that epoch's highest dot. Must be false for anything a crash could have
    /// rolled back.
    fn is_trusted(&self, epoch: u64) -> bool;
    /// A never-before-issued epoch for this node incarnation.
    fn fresh(&mut self) -> u64;
}

/// Who is coordinating: the node's name and data-directory incarnation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordinator {
    /// Node name.
    pub node: String,
    /// Incarnation of the node's data directory.
    pub incarnation: u64,
}

/// The coordinator's write rule: issue a fresh dot for `op` against the local record
/// (absent when the node holds nothing for the key) and return the new record to store.
///
/// The dot's actor keeps the record's epoch when the epoch source trusts it, and takes a
/// fresh epoch otherwise, so a dot is never issued twice even after the node lost its copy.
pub fn coordinate_write(
    local: Option<LocalRecord>,
    me: &Coordinator,
    epochs: &mut dyn EpochSource,
    client_context: &VersionVector,
    op: WriteOp,
    timestamp_ms: u64,
) -> (LocalRecord, Dot) {
    let computed = coordinate_with(
        local,
        me,
        epochs,
        client_context,
        |_, _| Ok::<_, std::convert::Infallible>(op),
        timestamp_ms,
    );
    match computed {
        Ok(done) => done,
        Err(never) => match never {},
    }
}

/// [`coordinate_write`] for a write whose value depends on the key's current state and on
/// the writing actor (a server-side update such as a per-actor counter increment): `compute`
/// gets the local object before the write and the actor of the new dot, and returns the
/// operation to write, or an error that aborts the write (an epoch may then be spent; that
/// is harmless, epochs are plentiful).
pub fn coordinate_with<E>(
    local: Option<LocalRecord>,
    me: &Coordinator,
    epochs: &mut dyn EpochSource,
    client_context: &VersionVector,
    compute: impl FnOnce(&Object, &ActorId) -> Result<WriteOp, E>,
    timestamp_ms: u64,
) -> Result<(LocalRecord, Dot), E> {
    let mut record = local.unwrap_or_default();
    let epoch = match record.own_epoch {
        Some(e) if epochs.is_trusted(e) => e,
        _ => epochs.fresh(),
    };
    let actor = ActorId {
        node: me.node.clone(),
        incarnation: me.incarnation,
        epoch,
    };
    let op = compute(&record.object, &actor)?;
    let dot = Dot {
        counter: record.object.context.get(&actor) + 1,
        actor,
    };
    record
        .object
        .apply_write(client_context, dot.clone(), op, timestamp_ms);
    record.own_epoch = Some(epoch);
    Ok((record, dot))
}

/// Errors of causal data that came from outside.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CausalityError {
    /// The opaque context bytes are not a context this version produced.
    #[error("invalid context: {0}")]
    InvalidContext(String),
    /// A stored or received object breaks an invariant.
    #[error("invalid object: {0}")]
    InvalidObject(&'static str),
}

/// Version tag of the context encoding, the first byte of every encoded context.
const CONTEXT_FORMAT_V1: u8 = 1;

/// Encodes a context as the opaque bytes handed to clients.
pub fn encode_context(context: &VersionVector) -> Vec<u8> {
    let mut out = vec![CONTEXT_FORMAT_V1];
    // Serializing a BTreeMap of plain data into a Vec cannot fail.
    if let Ok(body) = postcard::to_allocvec(context) {
        out.extend_from_slice(&body);
    }
    out
}

/// Decodes opaque context bytes from a client. Empty bytes mean "no context".
pub fn decode_context(bytes: &[u8]) -> Result<VersionVector, CausalityError> {
    let Some((&format, body)) = bytes.split_first() else {
        return Ok(VersionVector::new());
    };
    if bytes.len() > CONTEXT_BYTES_MAX {
        return Err(CausalityError::InvalidContext(format!(
            "{} bytes, more than the {CONTEXT_BYTES_MAX}-byte limit",
            bytes.len()
        )));
    }
    if format != CONTEXT_FORMAT_V1 {
        return Err(CausalityError::InvalidContext(format!(
            "unknown format tag {format}"
        )));
    }
    let (mut vv, rest): (VersionVector, &[u8]) = postcard::take_from_bytes(body)
        .map_err(|e| CausalityError::InvalidContext(format!("undecodable: {e}")))?;
    if !rest.is_empty() {
        return Err(CausalityError::InvalidContext(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    if vv.len() > CONTEXT_ACTORS_MAX {
        return Err(CausalityError::InvalidContext(format!(
            "names {} actors, more than the limit of {CONTEXT_ACTORS_MAX}",
            vv.len()
        )));
    }
    vv.normalize();
    Ok(vv)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter {
        next: u64,
        trusted_from: u64,
    }
    impl EpochSource for Counter {
        fn is_trusted(&self, epoch: u64) -> bool {
            epoch >= self.trusted_from && epoch < self.next
        }
        fn fresh(&mut self) -> u64 {
            self.next += 1;
            self.next - 1
        }
    }

    fn me() -> Coordinator {
        Coordinator {
            node: "n1".into(),
            incarnation: 7,
        }
    }

    fn put(rec: Option<LocalRecord>, e: &mut Counter, ctx: &VersionVector, v: &str) -> LocalRecord {
        coordinate_write(rec, &me(), e, ctx, WriteOp::Put(v.into()), 1).0
    }

    fn values(o: &Object) -> Vec<&[u8]> {
        o.siblings().iter().map(|s| s.value.as_slice()).collect()
    }

    // Dynamo §4.4: writes without a context are concurrent and both survive.
    #[test]
    fn blind_writes_become_siblings_and_a_covering_write_replaces_them() {
        let mut e = Counter {
            next: 1,
            trusted_from: 1,
        };
        let empty = VersionVector::new();
        let r = put(None, &mut e, &empty, "a");
        let r = put(Some(r), &mut e, &empty, "b");
        assert_eq!(values(&r.object), vec![&b"a"[..], b"b"]);
        let ctx = r.object.context().clone();
        let r = put(Some(r), &mut e, &ctx, "c");
        assert_eq!(values(&r.object), vec![&b"c"[..]]);
    }

    #[test]
    fn delete_leaves_a_tombstone_and_not_found() {
        let mut e = Counter {
            next: 1,
            trusted_from: 1,
        };
        let r = put(None, &mut e, &VersionVector::new(), "a");
        let ctx = r.object.context().clone();
        let (r, _) = coordinate_write(Some(r), &me(), &mut e, &ctx, WriteOp::Delete, 2);
        assert!(!r.object.is_found());
        assert_eq!(r.object.siblings().len(), 1);
        assert!(r.object.siblings()[0].meta.tombstone);
    }

    // riak_kv#679: a node that lost its copy must not reissue a dot.
    #[test]
    fn amnesia_takes_a_fresh_epoch() {
        let mut e = Counter {
            next: 1,
            trusted_from: 1,
        };
        let empty = VersionVector::new();
        let (r1, d1) =
            coordinate_write(None, &me(), &mut e, &empty, WriteOp::Put(b"x".to_vec()), 1);
        // The copy is lost; the next write on the same node starts from nothing.
        let (_, d2) = coordinate_write(None, &me(), &mut e, &empty, WriteOp::Put(b"y".to_vec()), 2);
        assert_ne!(d1, d2);
        // A merge of both keeps both writes.
        let mut other = LocalRecord::default();
        other.merge_remote(&r1.object);
        assert_eq!(other.object.siblings().len(), 1);
        // An untrusted (rolled-back) epoch is not continued either.
        e.trusted_from = e.next;
        let (_, d3) = coordinate_write(Some(r1), &me(), &mut e, &empty, WriteOp::Delete, 3);
        assert_ne!(d3.actor.epoch, d1.actor.epoch);
    }

    #[test]
    fn contexts_round_trip_and_garbage_is_rejected() {
        let mut e = Counter {
            next: 1,
            trusted_from: 1,
        };
        let r = put(None, &mut e, &VersionVector::new(), "a");
        let bytes = encode_context(r.object.context());
        assert_eq!(&decode_context(&bytes).expect("valid"), r.object.context());
        assert_eq!(decode_context(&[]).expect("empty"), VersionVector::new());
        assert!(decode_context(&[9, 1, 2]).is_err());
        assert!(decode_context(&[1, 0xff, 0xff, 0xff]).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_context(&trailing).is_err());
    }
}
