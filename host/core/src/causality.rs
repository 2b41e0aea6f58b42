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
//!
//! # Contexts cannot corrupt
//!
//! Contexts are opaque to clients but not authenticated: a client may send back any
//! version vector, and whatever it names joins the object's context, which replicates to
//! every replica of the key. Two rules keep a forged context from breaking a key:
//!
//! - **Counters are bounded.** No counter above [`DOT_COUNTER_MAX`] is accepted from a
//!   client ([`decode_context`]) or a peer or disk ([`Object::validate`]), and a coordinator
//!   never continues an epoch whose counter reached the limit: it takes a fresh epoch
//!   instead ([`coordinate_write`]). So `counter + 1` never overflows, every dot is within
//!   the limit, every object a node stores is one it reads back, and every context a get
//!   returns is one a put accepts (up to the size limits of contexts).
//! - **A coordinator's own dots are checked.** A context naming a dot of the coordinator's
//!   own trusted actor that the coordinator never issued is provably forged and is refused
//!   ([`check_client_context`]), so a client cannot push that actor's counter to the limit.
//!   Entries of other actors cannot be checked locally; they are harmless to the key's
//!   integrity thanks to the bound (their owner skips to a fresh epoch if its counter
//!   reaches it), though, as in Riak, a forged context can still make a write supersede
//!   versions its client never read, and one that names another actor's dots beyond what
//!   this replica has seen can supersede that actor's writes still on their way here.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::{CONTEXT_ACTORS_MAX, CONTEXT_BYTES_MAX, DOT_COUNTER_MAX};

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

/// One write's unique identity: the `counter`-th dot issued by `actor` (1 to
/// [`DOT_COUNTER_MAX`]).
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
        // Implied by the coverage check and the context bound below, but stated: no
        // coordinator issues a dot above the limit.
        if self
            .siblings
            .iter()
            .any(|s| s.dot.counter > DOT_COUNTER_MAX)
        {
            return Err(CausalityError::InvalidObject(
                "sibling counter above the dot counter limit",
            ));
        }
        // A zero entry covers nothing but makes equal contexts compare unequal, so merges of
        // such objects would not be commutative and replicas would never compare equal.
        if self.context.iter().any(|(_, n)| n == 0) {
            return Err(CausalityError::InvalidObject("context with a zero entry"));
        }
        // Every context a get returns must be one a put accepts ([`decode_context`]), and a
        // coordinator continuing an actor needs room for one more dot.
        if self.context.iter().any(|(_, n)| n > DOT_COUNTER_MAX) {
            return Err(CausalityError::InvalidObject(
                "context entry above the dot counter limit",
            ));
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

impl Coordinator {
    /// This coordinator's actor for `epoch`.
    pub fn actor(&self, epoch: u64) -> ActorId {
        ActorId {
            node: self.node.clone(),
            incarnation: self.incarnation,
            epoch,
        }
    }
}

/// The epoch of `local` that the coordinator continues: the record's own epoch when the
/// epoch source trusts it and its counter is below [`DOT_COUNTER_MAX`]. `None` means the
/// next write takes a fresh epoch (callers that must refuse writes when no fresh epoch is
/// left check their capacity on `None`).
pub fn continued_epoch(
    local: Option<&LocalRecord>,
    me: &Coordinator,
    epochs: &dyn EpochSource,
) -> Option<u64> {
    let record = local?;
    let epoch = record.own_epoch.filter(|&e| epochs.is_trusted(e))?;
    (record.object.context.get(&me.actor(epoch)) < DOT_COUNTER_MAX).then_some(epoch)
}

/// Checks a client's context against the coordinator's local record before a write.
///
/// The record of a trusted own epoch holds that actor's highest dot (see the module docs),
/// so a context naming a higher counter of this coordinator's own actor at that epoch names
/// dots this replica never issued: it is forged, and it is refused. Accepted, it would not
/// make a dot reused (the write joins it into the record, so the actor's next dot is above
/// it), but it would let a client move the actor's counter anywhere up to
/// [`DOT_COUNTER_MAX`], forcing fresh epochs (one more context entry per forged write), and
/// keep a forged entry in the key's context on every replica.
///
/// Entries of other actors, and of this node's untrusted or other epochs (which it never
/// continues for this key), cannot be checked here and are allowed: [`DOT_COUNTER_MAX`]
/// keeps them from overflowing anything, and an actor whose counter reaches the limit
/// takes a fresh epoch.
pub fn check_client_context(
    local: Option<&LocalRecord>,
    me: &Coordinator,
    epochs: &dyn EpochSource,
    ctx: &VersionVector,
) -> Result<(), CausalityError> {
    let Some(record) = local else {
        return Ok(());
    };
    let Some(epoch) = record.own_epoch.filter(|&e| epochs.is_trusted(e)) else {
        return Ok(());
    };
    let actor = me.actor(epoch);
    let issued = record.object.context.get(&actor);
    let named = ctx.get(&actor);
    if named > issued {
        return Err(CausalityError::InvalidContext(format!(
            "names dot {named} of this node's actor {actor}, which this replica never issued \
             (highest {issued})"
        )));
    }
    Ok(())
}

/// A fresh epoch whose counter in `object`'s context is below [`DOT_COUNTER_MAX`].
///
/// A fresh epoch was never issued, but a forged context may already name it at the limit
/// (epochs are guessable, and a peer's object carries entries no local check saw); no dot
/// can be issued under it then, so the next one is taken. Each skipped epoch is a distinct
/// entry of the context, so a source that hands out distinct epochs succeeds within
/// `len + 1` draws; the loop is bounded for one that does not.
fn fresh_epoch(object: &Object, me: &Coordinator, epochs: &mut dyn EpochSource) -> u64 {
    let mut epoch = epochs.fresh();
    for _ in 0..object.context.len() {
        if object.context.get(&me.actor(epoch)) < DOT_COUNTER_MAX {
            break;
        }
        epoch = epochs.fresh();
    }
    epoch
}

/// The epoch under which [`coordinate_write`] issues the next dot of `local`: the record's
/// own epoch where it may be continued ([`continued_epoch`]), a fresh one otherwise.
///
/// A caller that must know the writing actor before the write (a server-side update runs
/// the plugin with it, outside the key lock) draws it here, then writes with a
/// [`ChosenEpoch`] source after checking that the record did not change meanwhile, so the
/// dot's actor is the one the plugin saw.
pub fn next_epoch(
    local: Option<&LocalRecord>,
    me: &Coordinator,
    epochs: &mut dyn EpochSource,
) -> u64 {
    match continued_epoch(local, me, &*epochs) {
        Some(e) => e,
        None => match local {
            Some(record) => fresh_epoch(&record.object, me, epochs),
            None => fresh_epoch(&Object::default(), me, epochs),
        },
    }
}

/// An epoch source that trusts and hands out one epoch drawn earlier by [`next_epoch`]
/// on the same record: with it, [`coordinate_write`] issues the dot under exactly that
/// epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChosenEpoch(pub u64);

impl EpochSource for ChosenEpoch {
    fn is_trusted(&self, epoch: u64) -> bool {
        epoch == self.0
    }
    fn fresh(&mut self) -> u64 {
        self.0
    }
}

/// The coordinator's write rule: issue a fresh dot for `op` against the local record
/// (absent when the node holds nothing for the key) and return the new record to store.
///
/// The dot's actor keeps the record's epoch when the epoch source trusts it (and its counter
/// is below [`DOT_COUNTER_MAX`], see [`continued_epoch`]), and takes a fresh epoch otherwise,
/// so a dot is never issued twice even after the node lost its copy, and no counter
/// overflows whatever contexts the object has joined.
///
/// The caller checks the client's context first ([`decode_context`],
/// [`check_client_context`]). With an object that [`Object::validate`] accepts and an epoch
/// source that hands out distinct epochs, the new record is valid; otherwise (a counter at
/// `u64::MAX`, a source that repeats an epoch named at the limit) the dot saturates and the
/// record fails validation, so a caller that validates before storing stores nothing.
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
    let epoch = next_epoch(Some(&record), me, epochs);
    let actor = me.actor(epoch);
    let op = compute(&record.object, &actor)?;
    // Below the limit unless the epoch source repeated an epoch or the object was never
    // validated; saturating then keeps this from wrapping to a zero counter.
    let counter = record.object.context.get(&actor).saturating_add(1);
    let dot = Dot { counter, actor };
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
    // No coordinator issues a dot above the limit, so such an entry is forged; accepted,
    // it would make the actor's next counter overflow.
    if let Some((actor, n)) = vv.iter().find(|(_, n)| *n > DOT_COUNTER_MAX) {
        return Err(CausalityError::InvalidContext(format!(
            "names counter {n} of actor {actor}, above the limit of {DOT_COUNTER_MAX}"
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

    /// Stores and reads back a record the way the node does: postcard, then `validate`.
    fn round_trip(r: &LocalRecord) -> LocalRecord {
        let bytes = postcard::to_allocvec(r).expect("plain data");
        let back: LocalRecord = postcard::from_bytes(&bytes).expect("decodes");
        back.object.validate().expect("a stored record reads back");
        back
    }

    fn with_counter(ctx: &VersionVector, actor: &ActorId, counter: u64) -> Vec<u8> {
        let mut forged = ctx.clone();
        forged.entries.insert(actor.clone(), counter);
        encode_context(&forged)
    }

    // Issue 11, point 4: a client sets the coordinator's counter in a get's context to
    // 2^64-1 and puts with it. Before the fix the put was accepted and the next write by
    // that actor wrapped to a zero counter, which made every later read of the key fail.
    #[test]
    fn a_context_with_the_coordinators_counter_at_u64_max_cannot_corrupt_the_key() {
        let mut e = Counter {
            next: 1,
            trusted_from: 1,
        };
        let (r, dot) = coordinate_write(
            None,
            &me(),
            &mut e,
            &VersionVector::new(),
            WriteOp::Put(b"a".to_vec()),
            1,
        );
        let forged = with_counter(r.object.context(), &dot.actor, u64::MAX);
        // The node decodes the client's bytes first: refused.
        let err = decode_context(&forged).expect_err("counter above the limit");
        assert!(matches!(err, CausalityError::InvalidContext(_)), "{err}");
        // Just within the limit it decodes, and the check against the record refuses it:
        // this replica never issued that dot.
        let at_limit = decode_context(&with_counter(
            r.object.context(),
            &dot.actor,
            DOT_COUNTER_MAX,
        ))
        .expect("within the limit");
        let err = check_client_context(Some(&r), &me(), &e, &at_limit).expect_err("refused");
        let CausalityError::InvalidContext(msg) = &err else {
            panic!("{err}")
        };
        assert!(
            msg.contains("never issued") && msg.contains("highest 1"),
            "{msg}"
        );
        // The context the get returned is still accepted, and the key keeps working.
        check_client_context(Some(&r), &me(), &e, r.object.context()).expect("genuine");
        let r = put(Some(round_trip(&r)), &mut e, &VersionVector::new(), "b");
        let r = put(Some(round_trip(&r)), &mut e, &VersionVector::new(), "c");
        assert_eq!(values(&round_trip(&r).object), vec![&b"a"[..], b"b", b"c"]);

        // Even a caller that skipped both checks gets no zero counter and no panic: a
        // record carrying the forged entry is refused by `validate`, and the coordinator
        // saturates instead of wrapping.
        let mut forged_record = r.clone();
        forged_record
            .object
            .context
            .entries
            .insert(dot.actor.clone(), u64::MAX);
        assert!(forged_record.object.validate().is_err());
        let (after, d) = coordinate_write(
            Some(forged_record),
            &me(),
            &mut e,
            &VersionVector::new(),
            WriteOp::Put(b"d".to_vec()),
            2,
        );
        assert_ne!(d.counter, 0);
        assert!(after.object.validate().is_err());
    }

    // A forged entry for another node's actor is accepted (n1 cannot check it), reaches
    // that node by replication, and its next write takes a fresh epoch instead of
    // continuing past the limit.
    #[test]
    fn a_forged_entry_at_the_limit_for_another_nodes_actor_makes_it_take_a_fresh_epoch() {
        let n2 = Coordinator {
            node: "n2".into(),
            incarnation: 9,
        };
        let mut e1 = Counter {
            next: 1,
            trusted_from: 1,
        };
        let mut e2 = Counter {
            next: 100,
            trusted_from: 100,
        };
        let (at_n2, d2) = coordinate_write(
            None,
            &n2,
            &mut e2,
            &VersionVector::new(),
            WriteOp::Put(b"x".to_vec()),
            1,
        );
        let mut at_n1 = LocalRecord::default();
        at_n1.merge_remote(&at_n2.object);
        let ctx = decode_context(&with_counter(
            at_n1.object.context(),
            &d2.actor,
            DOT_COUNTER_MAX,
        ))
        .expect("within the limit");
        check_client_context(Some(&at_n1), &me(), &e1, &ctx).expect("not n1's actor");
        // The forged context also names n2's next epoch at the limit.
        let mut ctx = ctx;
        ctx.add(&Dot {
            actor: n2.actor(e2.next),
            counter: DOT_COUNTER_MAX,
        });
        let (at_n1, _) = coordinate_write(
            Some(at_n1),
            &me(),
            &mut e1,
            &ctx,
            WriteOp::Put(b"y".into()),
            2,
        );
        let at_n1 = round_trip(&at_n1);
        let mut at_n2 = at_n2;
        at_n2.merge_remote(&at_n1.object);
        let at_n2 = round_trip(&at_n2);
        assert_eq!(continued_epoch(Some(&at_n2), &n2, &e2), None);
        let (at_n2, d) = coordinate_write(
            Some(at_n2),
            &n2,
            &mut e2,
            &VersionVector::new(),
            WriteOp::Put(b"z".to_vec()),
            3,
        );
        assert_eq!(
            d.actor.epoch, 102,
            "epoch 100 is at the limit, 101 named at it"
        );
        assert_eq!(d.counter, 1);
        let at_n2 = round_trip(&at_n2);
        assert_eq!(values(&at_n2.object), vec![&b"y"[..], b"z"]);
        // Every context a get returns is one a put accepts again.
        let ctx = decode_context(&encode_context(at_n2.object.context())).expect("accepted");
        check_client_context(Some(&at_n2), &n2, &e2, &ctx).expect("accepted");
    }
}
