//! Property tests of the causality laws in `quiver_core::causality`.
//!
//! Most properties run over *realistic histories*: a few replicas of one key, clients that
//! write through any coordinator with a context read from some replicas (or with none, or
//! with an old one they kept), deletes, one-way and two-way state exchanges (read repair,
//! anti-entropy, handoff), and — where a property is about amnesia — nodes that restart,
//! lose their record, roll back to an older record or get their disk wiped. A model tracks
//! every write ever issued and checks, after every step, that no replica state contradicts
//! it (Dynamo §4.4 "Data Versioning", Riak's riak_kv#679 for dot reuse).

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{TestError, TestRng, TestRunner};
use quiver_core::causality::{
    ActorId, CausalityError, Coordinator, Dot, EpochSource, LocalRecord, Object, Sibling,
    SiblingMeta, VersionVector, WriteOp, check_client_context, coordinate_write, decode_context,
    encode_context,
};
use quiver_core::limits::{CONTEXT_ACTORS_MAX, CONTEXT_BYTES_MAX, DOT_COUNTER_MAX};
use quiver_core::replica;
use serde::Serialize;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Epoch sources
// ---------------------------------------------------------------------------------------

/// How a simulated node hands out and trusts actor epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// What a node must do: a durable monotonic counter, and a trust floor per boot.
    Durable,
    /// Broken: trusts any epoch found in a local record, even one a crash rolled back.
    AlwaysTrust,
    /// Broken: keeps the counter next to the data, so amnesia resets it.
    ResetOnAmnesia,
}

/// The test's [`EpochSource`], shaped like a node's: `next` is the durable allocator (never
/// goes back, except under the broken [`Policy::ResetOnAmnesia`]); `floor` is the first
/// epoch allocated in the current boot. An epoch is trusted iff it was issued in this boot.
#[derive(Debug, Clone)]
struct NodeEpochs {
    policy: Policy,
    next: u64,
    floor: u64,
}

impl NodeEpochs {
    fn new(policy: Policy) -> Self {
        Self {
            policy,
            next: 1,
            floor: 1,
        }
    }

    /// A process restart: nothing allocated before it is trusted any more.
    fn reboot(&mut self) {
        if self.policy == Policy::ResetOnAmnesia {
            self.next = 1;
        }
        self.floor = self.next;
    }

    /// The node lost (part of) its data for the key.
    fn forget(&mut self) {
        if self.policy == Policy::ResetOnAmnesia {
            self.next = 1;
            self.floor = 1;
        }
    }
}

impl EpochSource for NodeEpochs {
    fn is_trusted(&self, epoch: u64) -> bool {
        match self.policy {
            Policy::AlwaysTrust => true,
            Policy::Durable | Policy::ResetOnAmnesia => epoch >= self.floor && epoch < self.next,
        }
    }

    fn fresh(&mut self) -> u64 {
        let epoch = self.next;
        self.next += 1;
        epoch
    }
}

// ---------------------------------------------------------------------------------------
// Histories
// ---------------------------------------------------------------------------------------

/// Where a client's write context comes from.
#[derive(Debug, Clone, Copy)]
enum CtxFrom {
    /// No context: a blind write.
    Blind,
    /// A get that merged the replicas whose bits are set (bit i = node i).
    Read(u8),
    /// A context the client read earlier and kept (possibly stale).
    Remembered(Index),
}

/// One step of a history. Node numbers are taken modulo the number of nodes.
#[derive(Debug, Clone)]
enum Op {
    /// A client writes through coordinator `node`, which then replicates its new state to
    /// the nodes whose bits are set in `replicate_to`.
    Write {
        node: u8,
        ctx: CtxFrom,
        delete: bool,
        replicate_to: u8,
    },
    /// `to` merges `from`'s state (read repair, hinted handoff, one side of anti-entropy).
    Sync { from: u8, to: u8 },
    /// Both sides merge each other's state (a full anti-entropy exchange).
    Exchange { a: u8, b: u8 },
    /// The node's process restarts; its data is intact.
    Restart { node: u8 },
    /// The node drops its record for the key (handoff completed, or a wipe of that key).
    LoseRecord { node: u8, keeper: u8 },
    /// The node crashes, losing its latest `back` record versions (unsynced buffers), and
    /// restarts.
    Rollback { node: u8, back: u8, keeper: u8 },
    /// The node's whole data directory is wiped: new incarnation, new allocator.
    WipeDisk { node: u8, keeper: u8 },
}

/// A history to interpret: the number of replicas and the steps.
#[derive(Debug, Clone)]
struct History {
    nodes: usize,
    ops: Vec<Op>,
}

impl History {
    /// The same history with every write made blind.
    fn blind(mut self) -> Self {
        for op in &mut self.ops {
            if let Op::Write { ctx, .. } = op {
                *ctx = CtxFrom::Blind;
            }
        }
        self
    }
}

fn node_ix() -> impl Strategy<Value = u8> {
    0u8..4
}

fn ctx_from() -> impl Strategy<Value = CtxFrom> {
    prop_oneof![
        2 => Just(CtxFrom::Blind),
        5 => any::<u8>().prop_map(CtxFrom::Read),
        2 => any::<Index>().prop_map(CtxFrom::Remembered),
    ]
}

fn write_op() -> impl Strategy<Value = Op> {
    (
        node_ix(),
        ctx_from(),
        prop::bool::weighted(0.2),
        any::<u8>(),
    )
        .prop_map(|(node, ctx, delete, replicate_to)| Op::Write {
            node,
            ctx,
            delete,
            replicate_to,
        })
}

fn replication_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (node_ix(), node_ix()).prop_map(|(from, to)| Op::Sync { from, to }),
        1 => (node_ix(), node_ix()).prop_map(|(a, b)| Op::Exchange { a, b }),
    ]
}

fn amnesia_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (node_ix()).prop_map(|node| Op::Restart { node }),
        (node_ix(), node_ix()).prop_map(|(node, keeper)| Op::LoseRecord { node, keeper }),
        (node_ix(), 0u8..4, node_ix()).prop_map(|(node, back, keeper)| Op::Rollback {
            node,
            back,
            keeper
        }),
        (node_ix(), node_ix()).prop_map(|(node, keeper)| Op::WipeDisk { node, keeper }),
    ]
}

/// Histories of 2 to 4 replicas and up to 40 steps; with `amnesia`, nodes also restart,
/// lose records, roll back and get wiped.
fn history(amnesia: bool) -> BoxedStrategy<History> {
    let op = if amnesia {
        prop_oneof![6 => write_op(), 4 => replication_op(), 3 => amnesia_op()].boxed()
    } else {
        prop_oneof![6 => write_op(), 4 => replication_op()].boxed()
    };
    (2usize..=4, prop::collection::vec(op, 1..40))
        .prop_map(|(nodes, ops)| History { nodes, ops })
        .boxed()
}

// ---------------------------------------------------------------------------------------
// The interpreter and its model
// ---------------------------------------------------------------------------------------

/// Which state a violation was seen in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// A replica's state after a step.
    Replica(usize),
    /// The join of all replicas at the end.
    FullMerge,
}

/// Something a replica state or the coordinator did that the model forbids.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Violation {
    /// A dot was issued twice.
    DuplicateDot(Dot),
    /// An actor's dots were not issued as 1, 2, 3, ...
    CounterNotNext(Dot),
    /// A state broke `Object::validate`.
    Invalid(At, CausalityError),
    /// A state holds a sibling no write issued (dot unknown, or content not the write's).
    InventedSibling(At, Dot),
    /// A state's context covers a dot nobody issued.
    CoversUnissued(At, ActorId, u64),
    /// A state has seen a write (its context covers the dot) but holds neither the write
    /// nor any write that superseded it.
    LostWrite(At, Dot),
    /// The join of all replicas has never seen an issued write (the model lost it).
    Forgotten(Dot),
}

/// One issued write, as the model remembers it.
#[derive(Debug, Clone)]
struct Issued {
    dot: Dot,
    /// The client context the write carried.
    context: VersionVector,
    value: Vec<u8>,
    tombstone: bool,
    timestamp_ms: u64,
}

impl Issued {
    fn is(&self, s: &Sibling) -> bool {
        s.dot == self.dot
            && s.value == self.value
            && s.meta.tombstone == self.tombstone
            && s.meta.timestamp_ms == self.timestamp_ms
    }
}

struct Node {
    name: String,
    incarnation: u64,
    epochs: NodeEpochs,
    record: Option<LocalRecord>,
    /// Every version of the record that reached disk, oldest first (for rollbacks).
    durable: Vec<Option<LocalRecord>>,
    /// The record changed since the model last checked it.
    dirty: bool,
}

struct World {
    policy: Policy,
    nodes: Vec<Node>,
    writes: Vec<Issued>,
    by_dot: HashMap<Dot, Vec<usize>>,
    /// `superseded_by[i]`: writes whose client context covered write `i`'s dot.
    superseded_by: Vec<Vec<usize>>,
    max_counter: HashMap<ActorId, u64>,
    /// Contexts clients have read (for stale-context writes).
    remembered: Vec<VersionVector>,
    /// Every state any replica had, in order (for the merge laws).
    states: Vec<Object>,
    next_incarnation: u64,
    violations: Vec<Violation>,
}

impl World {
    fn new(nodes: usize, policy: Policy) -> Self {
        let nodes = (0..nodes)
            .map(|i| Node {
                name: format!("n{i}"),
                incarnation: 100 + i as u64,
                epochs: NodeEpochs::new(policy),
                record: None,
                durable: vec![None],
                dirty: false,
            })
            .collect();
        World {
            policy,
            nodes,
            writes: Vec::new(),
            by_dot: HashMap::new(),
            superseded_by: Vec::new(),
            max_counter: HashMap::new(),
            remembered: Vec::new(),
            states: vec![Object::new()],
            next_incarnation: 1000,
            violations: Vec::new(),
        }
    }

    /// Interprets `history` under `policy`, checking every replica after every step and
    /// the full merge at the end.
    fn run(policy: Policy, history: &History) -> World {
        let mut world = World::new(history.nodes, policy);
        for op in &history.ops {
            world.apply(op);
            world.check_replicas();
        }
        world.check_full_merge();
        world
    }

    fn ix(&self, n: u8) -> usize {
        usize::from(n) % self.nodes.len()
    }

    fn object(&self, node: usize) -> Option<&Object> {
        self.nodes[node].record.as_ref().map(|r| &r.object)
    }

    /// A get that merges the replicas in `mask`.
    fn read(&self, mask: u8) -> Object {
        (0..self.nodes.len())
            .filter(|i| mask & (1 << i) != 0)
            .filter_map(|i| self.object(i))
            .fold(Object::new(), |acc, o| acc.merge(o))
    }

    /// The join of every replica's state.
    fn full_merge(&self) -> Object {
        self.read(u8::MAX)
    }

    fn persist(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.durable.push(n.record.clone());
        n.dirty = true;
        if let Some(r) = &n.record {
            self.states.push(r.object.clone());
        }
    }

    /// `to` merges `from`'s state.
    fn deliver(&mut self, from: usize, to: usize) {
        if from == to {
            return;
        }
        let Some(obj) = self.object(from).cloned() else {
            return;
        };
        self.nodes[to]
            .record
            .get_or_insert_with(LocalRecord::default)
            .merge_remote(&obj);
        self.persist(to);
    }

    /// Before a node forgets anything, its writes have reached another replica (W >= 2):
    /// modelled by merging its state into `keeper`. This keeps the join of all replicas
    /// monotone, so any write missing from it was dropped by a merge, not by the amnesia.
    fn hand_over(&mut self, node: usize, keeper: u8) {
        let mut keeper = self.ix(keeper);
        if keeper == node {
            keeper = (node + 1) % self.nodes.len();
        }
        self.deliver(node, keeper);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write {
                node,
                ctx,
                delete,
                replicate_to,
            } => {
                let node = self.ix(node);
                let context = match ctx {
                    CtxFrom::Blind => VersionVector::new(),
                    CtxFrom::Read(mask) => {
                        let c = self.read(mask).context().clone();
                        self.remembered.push(c.clone());
                        c
                    }
                    CtxFrom::Remembered(i) if !self.remembered.is_empty() => {
                        self.remembered[i.index(self.remembered.len())].clone()
                    }
                    CtxFrom::Remembered(_) => VersionVector::new(),
                };
                self.write(node, context, delete);
                for to in 0..self.nodes.len() {
                    if replicate_to & (1 << to) != 0 {
                        self.deliver(node, to);
                    }
                }
            }
            Op::Sync { from, to } => {
                let (from, to) = (self.ix(from), self.ix(to));
                self.deliver(from, to);
            }
            Op::Exchange { a, b } => {
                let (a, b) = (self.ix(a), self.ix(b));
                self.deliver(a, b);
                self.deliver(b, a);
            }
            Op::Restart { node } => {
                let node = self.ix(node);
                self.nodes[node].epochs.reboot();
            }
            Op::LoseRecord { node, keeper } => {
                let node = self.ix(node);
                self.hand_over(node, keeper);
                let n = &mut self.nodes[node];
                n.record = None;
                n.durable.push(None);
                n.epochs.forget();
            }
            Op::Rollback { node, back, keeper } => {
                let node = self.ix(node);
                self.hand_over(node, keeper);
                let n = &mut self.nodes[node];
                let keep = n.durable.len() - usize::from(back) % n.durable.len();
                n.durable.truncate(keep);
                n.record = n.durable.last().cloned().flatten();
                n.dirty = true;
                n.epochs.forget();
                n.epochs.reboot();
            }
            Op::WipeDisk { node, keeper } => {
                let node = self.ix(node);
                self.hand_over(node, keeper);
                let incarnation = self.next_incarnation;
                self.next_incarnation += 1;
                let n = &mut self.nodes[node];
                n.incarnation = incarnation;
                n.epochs = NodeEpochs::new(self.policy);
                n.record = None;
                n.durable = vec![None];
            }
        }
    }

    /// Coordinates one write at `node` and records it in the model.
    fn write(&mut self, node: usize, context: VersionVector, delete: bool) -> Dot {
        let timestamp_ms = self.writes.len() as u64 + 1;
        let (op, value) = if delete {
            (WriteOp::Delete, Vec::new())
        } else {
            let v = format!("v{timestamp_ms}").into_bytes();
            (WriteOp::Put(v.clone()), v)
        };
        let n = &mut self.nodes[node];
        let me = Coordinator {
            node: n.name.clone(),
            incarnation: n.incarnation,
        };
        let (record, dot) = coordinate_write(
            n.record.take(),
            &me,
            &mut n.epochs,
            &context,
            op,
            timestamp_ms,
        );
        n.record = Some(record);
        self.persist(node);
        self.issue(Issued {
            dot: dot.clone(),
            context,
            value,
            tombstone: delete,
            timestamp_ms,
        });
        dot
    }

    fn issue(&mut self, w: Issued) {
        let idx = self.writes.len();
        if self.by_dot.contains_key(&w.dot) {
            self.violations.push(Violation::DuplicateDot(w.dot.clone()));
        } else {
            let prev = self.max_counter.get(&w.dot.actor).copied().unwrap_or(0);
            if w.dot.counter != prev + 1 {
                self.violations
                    .push(Violation::CounterNotNext(w.dot.clone()));
            }
        }
        let max = self.max_counter.entry(w.dot.actor.clone()).or_insert(0);
        *max = (*max).max(w.dot.counter);
        for (i, earlier) in self.writes.iter().enumerate() {
            if w.context.covers(&earlier.dot) {
                self.superseded_by[i].push(idx);
            }
        }
        self.by_dot.entry(w.dot.clone()).or_default().push(idx);
        self.superseded_by.push(Vec::new());
        self.writes.push(w);
    }

    fn holds(obj: &Object, w: &Issued) -> bool {
        match obj.siblings().binary_search_by(|s| s.dot.cmp(&w.dot)) {
            Ok(k) => w.is(&obj.siblings()[k]),
            Err(_) => false,
        }
    }

    /// The model's verdict on one state: valid; every sibling is an issued write, intact;
    /// the context covers only issued dots; and every issued write the context covers is
    /// either held or superseded by a write the state has also seen.
    fn check_state(&self, at: At, obj: &Object) -> Vec<Violation> {
        let mut out = Vec::new();
        if let Err(e) = obj.validate() {
            out.push(Violation::Invalid(at, e));
        }
        for s in obj.siblings() {
            let known = self
                .by_dot
                .get(&s.dot)
                .is_some_and(|ws| ws.iter().any(|&i| self.writes[i].is(s)));
            if !known {
                out.push(Violation::InventedSibling(at, s.dot.clone()));
            }
        }
        for (actor, n) in obj.context().iter() {
            if self.max_counter.get(actor).copied().unwrap_or(0) < n {
                out.push(Violation::CoversUnissued(at, actor.clone(), n));
            }
        }
        let ctx = obj.context();
        for (i, w) in self.writes.iter().enumerate() {
            if ctx.covers(&w.dot)
                && !Self::holds(obj, w)
                && !self.superseded_by[i]
                    .iter()
                    .any(|&j| ctx.covers(&self.writes[j].dot))
            {
                out.push(Violation::LostWrite(at, w.dot.clone()));
            }
        }
        out
    }

    /// Checks the replicas whose state changed. The verdict on an unchanged state cannot
    /// get worse when writes are issued elsewhere (their dots are fresh, and superseders
    /// only accumulate), so this is as strong as checking every replica after every step.
    fn check_replicas(&mut self) {
        for i in 0..self.nodes.len() {
            if !std::mem::take(&mut self.nodes[i].dirty) {
                continue;
            }
            if let Some(obj) = self.object(i) {
                let v = self.check_state(At::Replica(i), obj);
                self.violations.extend(v);
            }
        }
    }

    /// Dynamo's final guarantee: the join of all replicas has seen every issued write and
    /// holds each one unless a later write's client context covered it.
    fn check_full_merge(&mut self) {
        let full = self.full_merge();
        let mut v = self.check_state(At::FullMerge, &full);
        for w in &self.writes {
            if !full.context().covers(&w.dot) {
                v.push(Violation::Forgotten(w.dot.clone()));
            }
        }
        self.violations.extend(v);
    }

    fn any(&self, f: impl Fn(&Violation) -> bool) -> bool {
        self.violations.iter().any(f)
    }
}

// ---------------------------------------------------------------------------------------
// Arbitrary (not necessarily realistic) valid objects
// ---------------------------------------------------------------------------------------

/// A small actor universe, so that arbitrary objects share dots.
fn small_actor() -> impl Strategy<Value = ActorId> {
    (prop::sample::select(vec!["a", "b"]), 0u64..2, 0u64..2).prop_map(
        |(node, incarnation, epoch)| ActorId {
            node: node.into(),
            incarnation,
            epoch,
        },
    )
}

fn small_dot() -> impl Strategy<Value = Dot> {
    (small_actor(), 1u64..5).prop_map(|(actor, counter)| Dot { actor, counter })
}

fn small_vv() -> impl Strategy<Value = VersionVector> {
    prop::collection::vec((small_actor(), 0u64..5), 0..4).prop_map(|entries| {
        let mut vv = VersionVector::new();
        for (actor, counter) in entries {
            vv.add(&Dot { actor, counter });
        }
        vv
    })
}

/// Objects built by the public API from arbitrary writes, including reused dots and
/// contexts that name writes the object never saw: always valid, rarely realistic.
fn api_object() -> impl Strategy<Value = Object> {
    prop::collection::vec((small_vv(), small_dot(), 0u8..3, 0u64..3), 0..6).prop_map(|steps| {
        let mut obj = Object::new();
        for (ctx, dot, v, ts) in steps {
            let op = if v == 0 {
                WriteOp::Delete
            } else {
                WriteOp::Put(vec![v])
            };
            obj.apply_write(&ctx, dot, op, ts);
        }
        obj
    })
}

/// `Object`'s serialized shape, to build objects as they arrive from disk or the network.
#[derive(Serialize)]
struct VersionVectorWire {
    entries: BTreeMap<ActorId, u64>,
}

#[derive(Serialize)]
struct ObjectWire {
    context: VersionVectorWire,
    siblings: Vec<Sibling>,
}

/// Objects decoded from bytes: sorted distinct dots, covered by the context, and contexts
/// that sometimes carry zero entries (which no operation here produces).
fn wire_object() -> impl Strategy<Value = Object> {
    (
        prop::collection::btree_map(small_actor(), 0u64..5, 0..4),
        prop::collection::vec((small_dot(), 0u8..3, 0u64..3), 0..4),
    )
        .prop_map(|(mut entries, sibs)| {
            let mut siblings: Vec<Sibling> = sibs
                .into_iter()
                .map(|(dot, v, ts)| Sibling {
                    dot,
                    value: if v == 0 { Vec::new() } else { vec![v] },
                    meta: SiblingMeta {
                        timestamp_ms: ts,
                        tombstone: v == 0,
                    },
                })
                .collect();
            siblings.sort_by(|x, y| x.dot.cmp(&y.dot));
            siblings.dedup_by(|x, y| x.dot == y.dot);
            for s in &siblings {
                let e = entries.entry(s.dot.actor.clone()).or_insert(0);
                *e = (*e).max(s.dot.counter);
            }
            let wire = ObjectWire {
                context: VersionVectorWire { entries },
                siblings,
            };
            let bytes = postcard::to_allocvec(&wire).expect("serializing plain data");
            postcard::from_bytes::<Object>(&bytes).expect("the wire shape is Object's")
        })
}

// ---------------------------------------------------------------------------------------
// Merge laws (Dynamo §4.4: reconciliation of divergent versions)
// ---------------------------------------------------------------------------------------

/// The dotted-causal-container join, written as a specification: a dot survives iff some
/// side holds it and every side either holds it or has not seen it.
fn merge_spec_keeps(a: &Object, b: &Object, dot: &Dot) -> bool {
    let held = |o: &Object| o.siblings().iter().any(|s| &s.dot == dot);
    (held(a) || held(b)) && [a, b].iter().all(|o| held(o) || !o.context().covers(dot))
}

fn check_merge_laws(a: &Object, b: &Object, c: &Object) -> Result<(), TestCaseError> {
    let ab = a.merge(b);
    prop_assert_eq!(&ab, &b.merge(a), "commutativity");
    prop_assert_eq!(ab.merge(c), a.merge(&b.merge(c)), "associativity");
    prop_assert_eq!(&a.merge(a), a, "idempotence");
    prop_assert_eq!(
        &a.merge(&Object::new()),
        a,
        "the empty object is the identity"
    );
    prop_assert_eq!(&ab.merge(a), &ab, "the merge absorbs its inputs");
    check_merge_is_sound(a, b)
}

/// The merge is valid, invents nothing, joins the contexts, and keeps exactly the dots the
/// specification keeps.
fn check_merge_is_sound(a: &Object, b: &Object) -> Result<(), TestCaseError> {
    let ab = a.merge(b);
    prop_assert_eq!(ab.validate(), Ok(()));
    for s in ab.siblings() {
        prop_assert!(
            a.siblings().contains(s) || b.siblings().contains(s),
            "merge invented sibling {:?}",
            s
        );
    }
    let mut ctx = a.context().clone();
    ctx.join(b.context());
    prop_assert_eq!(ab.context(), &ctx);
    for s in a.siblings().iter().chain(b.siblings()) {
        let kept = ab.siblings().iter().any(|t| t.dot == s.dot);
        prop_assert_eq!(kept, merge_spec_keeps(a, b, &s.dot), "dot {:?}", &s.dot);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(2000))]

    /// Dynamo §4.4: replicas reconcile by merging, in any order and any number of times.
    #[test]
    fn merge_is_commutative_associative_idempotent_on_realistic_histories(
        h in history(true),
        picks in prop::array::uniform3(any::<Index>()),
    ) {
        let w = World::run(Policy::Durable, &h);
        let [a, b, c] = picks.map(|i| &w.states[i.index(w.states.len())]);
        check_merge_laws(a, b, c)?;
    }

    #[test]
    fn merge_is_commutative_associative_idempotent_on_arbitrary_valid_objects(
        a in api_object(), b in api_object(), c in api_object(),
    ) {
        check_merge_laws(&a, &b, &c)?;
    }

    /// Objects from disk or the network: whatever `validate` accepts obeys the laws.
    #[test]
    fn merge_laws_hold_for_every_decoded_object_validate_accepts(
        a in wire_object(), b in wire_object(), c in wire_object(),
    ) {
        if [&a, &b, &c].iter().all(|o| o.validate().is_ok()) {
            check_merge_laws(&a, &b, &c)?;
        }
        for o in [&a, &b, &c] {
            // The generator's only invalid objects are those with a zero context entry.
            let zero = o.context().iter().any(|(_, n)| n == 0);
            prop_assert_eq!(o.validate().is_ok(), !zero);
        }
    }

    /// Merging never breaks the invariants and never invents a sibling; it keeps exactly
    /// the siblings the other side has not seen superseded.
    #[test]
    fn merge_preserves_invariants_and_never_invents_siblings(
        h in history(true),
        picks in prop::collection::vec(any::<Index>(), 2..6),
    ) {
        let w = World::run(Policy::Durable, &h);
        let mut acc = Object::new();
        for i in picks {
            let next = &w.states[i.index(w.states.len())];
            check_merge_is_sound(&acc, next)?;
            acc = acc.merge(next);
        }
    }
}

// ---------------------------------------------------------------------------------------
// No acknowledged write is dropped, and dots are never reused
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(2000))]

    /// Dynamo §4.4 / §6.3: a merge drops a write only when a later write's client context
    /// covered it. Checked on every replica after every step and on the full merge.
    #[test]
    fn no_acknowledged_write_is_dropped_by_merges(h in history(false)) {
        let w = World::run(Policy::Durable, &h);
        prop_assert!(w.violations.is_empty(), "{:?}", w.violations);
    }

    /// riak_kv#679: restarts, lost records, rollbacks and wiped disks never make a
    /// coordinator issue a dot twice, and no write is then lost by merges.
    #[test]
    fn dots_are_never_reused_after_amnesia_and_no_write_is_lost(h in history(true)) {
        let w = World::run(Policy::Durable, &h);
        prop_assert!(w.violations.is_empty(), "{:?}", w.violations);
        let mut dots: Vec<&Dot> = w.writes.iter().map(|x| &x.dot).collect();
        dots.sort();
        let n = dots.len();
        dots.dedup();
        prop_assert_eq!(dots.len(), n, "all issued dots are pairwise distinct");
    }
}

/// The riak_kv#679 scenario in miniature: n0 writes, replicates to n1, forgets the key,
/// and writes again blind.
fn forgotten_record_scenario() -> History {
    History {
        nodes: 2,
        ops: vec![
            Op::Write {
                node: 0,
                ctx: CtxFrom::Blind,
                delete: false,
                replicate_to: 0b10,
            },
            Op::LoseRecord { node: 0, keeper: 1 },
            Op::Write {
                node: 0,
                ctx: CtxFrom::Blind,
                delete: false,
                replicate_to: 0,
            },
            Op::Exchange { a: 0, b: 1 },
        ],
    }
}

/// n0 writes x, then y replacing x, replicates to n1, then crashes losing y's record
/// version, restarts, and writes z blind: z and y are concurrent and both must survive.
fn rolled_back_record_scenario() -> History {
    History {
        nodes: 2,
        ops: vec![
            Op::Write {
                node: 0,
                ctx: CtxFrom::Blind,
                delete: false,
                replicate_to: 0,
            },
            Op::Write {
                node: 0,
                ctx: CtxFrom::Read(0b01),
                delete: false,
                replicate_to: 0b10,
            },
            Op::Rollback {
                node: 0,
                back: 1,
                keeper: 1,
            },
            Op::Write {
                node: 0,
                ctx: CtxFrom::Blind,
                delete: false,
                replicate_to: 0,
            },
            Op::Exchange { a: 0, b: 1 },
        ],
    }
}

fn is_duplicate(v: &Violation) -> bool {
    matches!(v, Violation::DuplicateDot(_))
}

fn is_lost(v: &Violation) -> bool {
    matches!(v, Violation::LostWrite(..))
}

/// The fixed scenarios pass with a durable epoch source and fail with broken ones: the
/// checker can see riak_kv#679.
#[test]
fn broken_epoch_sources_reuse_dots_and_lose_writes_in_fixed_scenarios() {
    for (scenario, broken) in [
        (forgotten_record_scenario(), Policy::ResetOnAmnesia),
        (rolled_back_record_scenario(), Policy::AlwaysTrust),
        (rolled_back_record_scenario(), Policy::ResetOnAmnesia),
    ] {
        let good = World::run(Policy::Durable, &scenario);
        assert!(good.violations.is_empty(), "{:?}", good.violations);
        let full = good.full_merge();
        let last = good.writes.last().expect("the scenario writes");
        assert!(World::holds(&full, last), "the last blind write survives");
        assert_eq!(
            full.siblings().len(),
            2,
            "two concurrent writes, two siblings"
        );

        let bad = World::run(broken, &scenario);
        assert!(bad.any(is_duplicate), "{broken:?}: expected a reused dot");
        assert!(
            bad.any(is_lost),
            "{broken:?}: expected a lost write: {:?}",
            bad.violations
        );
        assert_eq!(
            bad.full_merge().siblings().len(),
            1,
            "{broken:?}: one write vanished"
        );
    }
}

/// The generated histories find dot reuse and lost writes on their own when the epoch
/// source is broken (a deterministic search, so this test cannot flake).
#[test]
fn broken_epoch_sources_are_caught_by_the_generated_histories() {
    for broken in [Policy::AlwaysTrust, Policy::ResetOnAmnesia] {
        for (what, bad) in [
            ("a reused dot", is_duplicate as fn(&Violation) -> bool),
            ("a lost write", is_lost),
        ] {
            let cfg = ProptestConfig {
                cases: 2000,
                failure_persistence: None,
                max_shrink_iters: 200,
                ..ProptestConfig::default()
            };
            let mut runner =
                TestRunner::new_with_rng(cfg, TestRng::deterministic_rng(Default::default()));
            let result = runner.run(&history(true), |h| {
                let w = World::run(broken, &h);
                prop_assert!(!w.any(bad), "{:?}", w.violations);
                Ok(())
            });
            match result {
                Err(TestError::Fail(_, h)) => {
                    let w = World::run(broken, &h);
                    assert!(w.any(bad), "{broken:?}: the minimal case shows {what}");
                    let good = World::run(Policy::Durable, &h);
                    assert!(good.violations.is_empty(), "{:?}", good.violations);
                }
                other => panic!("{broken:?}: no generated history showed {what}: {other:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writes with a context (Dynamo §4.4: the client's context names what it supersedes)
// ---------------------------------------------------------------------------------------

/// The direct model of a write: drop the siblings the client context covers, keep the
/// rest, add the new one; the context becomes old ⊔ client ⊔ dot.
fn model_write(obj: &Object, ctx: &VersionVector, new: Sibling) -> (Vec<Sibling>, VersionVector) {
    let mut sibs: Vec<Sibling> = obj
        .siblings()
        .iter()
        .filter(|s| !ctx.covers(&s.dot))
        .cloned()
        .collect();
    let mut vv = obj.context().clone();
    vv.join(ctx);
    vv.add(&new.dot);
    sibs.push(new);
    sibs.sort_by(|x, y| x.dot.cmp(&y.dot));
    (sibs, vv)
}

/// A client context: optionally one a replica really had, joined with arbitrary counters
/// (possibly beyond anything issued) for actors the history used.
fn client_context(w: &World, real: Option<Index>, extra: &[(Index, u64)]) -> VersionVector {
    let mut ctx = real
        .map(|i| w.states[i.index(w.states.len())].context().clone())
        .unwrap_or_default();
    let mut actors: Vec<&ActorId> = w.max_counter.keys().collect();
    actors.sort(); // HashMap order differs between runs; keep cases reproducible.
    if !actors.is_empty() {
        for (i, counter) in extra {
            ctx.add(&Dot {
                actor: actors[i.index(actors.len())].clone(),
                counter: *counter,
            });
        }
    }
    ctx
}

proptest! {
    #![proptest_config(config(2000))]

    /// Dynamo §4.4: the context a client sends names exactly the versions it replaces.
    #[test]
    fn put_with_context_drops_exactly_the_covered_siblings_and_keeps_the_rest(
        h in history(true),
        obj_ix in any::<Index>(),
        real in prop::option::of(any::<Index>()),
        extra in prop::collection::vec((any::<Index>(), 0u64..6), 0..4),
        delete in any::<bool>(),
    ) {
        let w = World::run(Policy::Durable, &h);
        let obj = w.states[obj_ix.index(w.states.len())].clone();
        let ctx = client_context(&w, real, &extra);
        let (op, value) = if delete {
            (WriteOp::Delete, Vec::new())
        } else {
            (WriteOp::Put(b"new".to_vec()), b"new".to_vec())
        };

        // Object::apply_write with a dot fresh for this object.
        let actor = ActorId { node: "fresh".into(), incarnation: 1, epoch: 1 };
        let dot = Dot { counter: obj.context().get(&actor) + 1, actor };
        let new = Sibling {
            dot: dot.clone(),
            value: value.clone(),
            meta: SiblingMeta { timestamp_ms: 9, tombstone: delete },
        };
        let (sibs, vv) = model_write(&obj, &ctx, new);
        let mut after = obj.clone();
        after.apply_write(&ctx, dot, op.clone(), 9);
        prop_assert_eq!(after.siblings(), &sibs[..]);
        prop_assert_eq!(after.context(), &vv);
        prop_assert_eq!(after.validate(), Ok(()));

        // coordinate_write on a record whose epoch is trusted continues that epoch.
        let me = Coordinator { node: "probe".into(), incarnation: 7 };
        let mut epochs = NodeEpochs::new(Policy::Durable);
        let epoch = epochs.fresh();
        let record = LocalRecord { object: obj.clone(), own_epoch: Some(epoch) };
        let (record, dot) = coordinate_write(Some(record), &me, &mut epochs, &ctx, op, 9);
        let actor = ActorId { node: "probe".into(), incarnation: 7, epoch };
        prop_assert_eq!(&dot, &Dot { counter: obj.context().get(&actor) + 1, actor });
        prop_assert_eq!(record.own_epoch, Some(epoch));
        let new = Sibling { dot, value, meta: SiblingMeta { timestamp_ms: 9, tombstone: delete } };
        let (sibs, vv) = model_write(&obj, &ctx, new);
        prop_assert_eq!(record.object.siblings(), &sibs[..]);
        prop_assert_eq!(record.object.context(), &vv);
    }

    /// A coordinator never continues an epoch its source does not trust.
    #[test]
    fn untrusted_or_missing_epochs_are_replaced_by_fresh_ones(
        h in history(true),
        obj_ix in any::<Index>(),
        own_epoch in prop::option::of(0u64..4),
        floor in 1u64..4,
    ) {
        let w = World::run(Policy::Durable, &h);
        let obj = w.states[obj_ix.index(w.states.len())].clone();
        let mut epochs = NodeEpochs { policy: Policy::Durable, next: 4, floor };
        let trusted = own_epoch.is_some_and(|e| epochs.is_trusted(e));
        let me = Coordinator { node: "probe".into(), incarnation: 7 };
        let record = LocalRecord { object: obj, own_epoch };
        let (record, dot) =
            coordinate_write(Some(record), &me, &mut epochs, &VersionVector::new(), WriteOp::Delete, 1);
        if trusted {
            prop_assert_eq!(Some(dot.actor.epoch), own_epoch);
        } else {
            prop_assert_eq!(dot.actor.epoch, 4, "a fresh epoch");
            prop_assert_eq!(dot.counter, 1);
        }
        prop_assert_eq!(record.own_epoch, Some(dot.actor.epoch));
    }
}

// ---------------------------------------------------------------------------------------
// Siblings (Dynamo §4.4: concurrent versions are kept until a client reconciles them)
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(2000))]

    /// Blind writes are concurrent with everything: each survives in the full merge and in
    /// every replica that has seen it, whatever the amnesia.
    #[test]
    fn concurrent_blind_writes_all_survive(h in history(true)) {
        let w = World::run(Policy::Durable, &h.blind());
        prop_assert!(w.violations.is_empty(), "{:?}", w.violations);
        let full = w.full_merge();
        prop_assert_eq!(full.siblings().len(), w.writes.len());
        for x in &w.writes {
            prop_assert!(World::holds(&full, x), "{:?} missing", x.dot);
            for i in 0..w.nodes.len() {
                if let Some(o) = w.object(i) {
                    prop_assert_eq!(o.context().covers(&x.dot), World::holds(o, x));
                }
            }
        }
    }

    /// A write whose context came from a get that saw every replica replaces every sibling:
    /// one sibling is left, at the coordinator and in the full merge.
    #[test]
    fn a_write_with_the_context_of_a_complete_read_leaves_one_sibling(
        h in history(true),
        coordinator in node_ix(),
        delete in any::<bool>(),
    ) {
        let mut w = World::run(Policy::Durable, &h);
        w.apply(&Op::Write { node: coordinator, ctx: CtxFrom::Read(u8::MAX), delete, replicate_to: 0 });
        w.check_replicas();
        w.check_full_merge();
        prop_assert!(w.violations.is_empty(), "{:?}", w.violations);
        let last = w.writes.last().expect("just written").clone();
        let c = w.ix(coordinator);
        let at_coordinator = w.object(c).expect("the coordinator stored it");
        prop_assert_eq!(at_coordinator.siblings().len(), 1);
        prop_assert!(World::holds(at_coordinator, &last));
        let full = w.full_merge();
        prop_assert_eq!(full.siblings().len(), 1);
        prop_assert!(World::holds(&full, &last));
        prop_assert_eq!(full.is_found(), !delete);
    }

    /// A write whose context came from a partial get keeps the siblings that get missed.
    #[test]
    fn a_write_with_a_partial_context_keeps_the_siblings_it_did_not_see(
        h in history(true),
        coordinator in node_ix(),
        mask in any::<u8>(),
    ) {
        let mut w = World::run(Policy::Durable, &h);
        let before = w.full_merge();
        let seen = w.read(mask).context().clone();
        w.apply(&Op::Write { node: coordinator, ctx: CtxFrom::Read(mask), delete: false, replicate_to: 0 });
        let last = w.writes.last().expect("just written").clone();
        let after = w.full_merge();
        for s in before.siblings() {
            let kept = after.siblings().contains(s);
            prop_assert_eq!(kept, !seen.covers(&s.dot), "{:?}", &s.dot);
        }
        prop_assert!(World::holds(&after, &last));
    }
}

// ---------------------------------------------------------------------------------------
// Opaque contexts
// ---------------------------------------------------------------------------------------

fn any_actor() -> impl Strategy<Value = ActorId> {
    ("\\PC{0,16}", any::<u64>(), any::<u64>()).prop_map(|(node, incarnation, epoch)| ActorId {
        node,
        incarnation,
        epoch,
    })
}

fn any_vv() -> impl Strategy<Value = VersionVector> {
    vv_of_up_to(24)
}

fn vv_of_up_to(actors: usize) -> impl Strategy<Value = VersionVector> {
    prop::collection::vec((any_actor(), 0..=DOT_COUNTER_MAX), 0..=actors).prop_map(|entries| {
        let mut vv = VersionVector::new();
        for (actor, counter) in entries {
            vv.add(&Dot { actor, counter });
        }
        vv
    })
}

/// What any successful decode must return: no zero entries, within the actor limit, and
/// in canonical form (it re-encodes to bytes that decode to itself).
fn check_decoded(vv: &VersionVector) -> Result<(), TestCaseError> {
    prop_assert!(vv.iter().all(|(_, n)| n > 0), "zero entry in {:?}", vv);
    prop_assert!(
        vv.iter().all(|(_, n)| n <= DOT_COUNTER_MAX),
        "entry above the counter limit in {:?}",
        vv
    );
    prop_assert!(vv.len() <= CONTEXT_ACTORS_MAX);
    prop_assert_eq!(
        &decode_context(&encode_context(vv)).expect("re-encoded"),
        vv
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(4000))]

    #[test]
    fn contexts_round_trip(vv in any_vv()) {
        let bytes = encode_context(&vv);
        prop_assert!(bytes.len() <= CONTEXT_BYTES_MAX);
        prop_assert_eq!(decode_context(&bytes).expect("our own encoding"), vv);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(vv) = decode_context(&bytes) {
            check_decoded(&vv)?;
        }
    }

    /// Bytes that start with the format tag reach the body decoder.
    #[test]
    fn decoding_arbitrary_tagged_bytes_never_panics(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = encode_context(&VersionVector::new());
        bytes.truncate(1);
        bytes.extend_from_slice(&body);
        if let Ok(vv) = decode_context(&bytes) {
            check_decoded(&vv)?;
        }
    }

    /// A well-formed body that names actors with a zero counter (which our encoder never
    /// writes) decodes to the canonical context without them.
    #[test]
    fn zero_entries_in_a_well_formed_encoding_are_dropped(
        entries in prop::collection::btree_map(any_actor(), 0u64..3, 0..6),
    ) {
        let expected: Vec<(ActorId, u64)> =
            entries.iter().filter(|(_, n)| **n > 0).map(|(a, n)| (a.clone(), *n)).collect();
        let mut bytes = encode_context(&VersionVector::new());
        bytes.truncate(1);
        let body = postcard::to_allocvec(&VersionVectorWire { entries }).expect("plain data");
        bytes.extend_from_slice(&body);
        let vv = decode_context(&bytes).expect("well formed");
        check_decoded(&vv)?;
        let got: Vec<(ActorId, u64)> = vv.iter().map(|(a, n)| (a.clone(), n)).collect();
        prop_assert_eq!(got, expected);
    }

    /// Truncated, extended and corrupted encodings are rejected or decode to a valid
    /// context; they never panic. Extending a valid encoding is always rejected.
    #[test]
    fn damaged_encodings_are_rejected_or_decode_to_valid_contexts(
        vv in vv_of_up_to(4),
        tail in prop::collection::vec(any::<u8>(), 1..8),
        flip in any::<Index>(),
        mask in 1u8..=255,
    ) {
        let bytes = encode_context(&vv);
        for cut in 0..bytes.len() {
            if let Ok(d) = decode_context(&bytes[..cut]) {
                check_decoded(&d)?;
            }
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(&tail);
        prop_assert!(decode_context(&longer).is_err(), "trailing bytes accepted");
        let mut flipped = bytes.clone();
        let i = flip.index(flipped.len());
        flipped[i] ^= mask;
        if let Ok(d) = decode_context(&flipped) {
            check_decoded(&d)?;
        }
    }
}

proptest! {
    #![proptest_config(config(2000))]

    /// Contexts replicas really hand out round trip too.
    #[test]
    fn contexts_from_histories_round_trip(h in history(true)) {
        let w = World::run(Policy::Durable, &h);
        for s in &w.states {
            let bytes = encode_context(s.context());
            prop_assert_eq!(&decode_context(&bytes).expect("our own encoding"), s.context());
        }
    }
}

/// The limits are enforced at their exact boundaries.
#[test]
fn context_limits_are_enforced_at_the_boundary() {
    let mut vv = VersionVector::new();
    for i in 0..CONTEXT_ACTORS_MAX as u64 {
        let actor = ActorId {
            node: "n".into(),
            incarnation: 1,
            epoch: i,
        };
        vv.add(&Dot { actor, counter: 1 });
    }
    let bytes = encode_context(&vv);
    assert_eq!(decode_context(&bytes).expect("at the actor limit"), vv);
    vv.add(&Dot {
        actor: ActorId {
            node: "n".into(),
            incarnation: 1,
            epoch: u64::MAX,
        },
        counter: 1,
    });
    assert!(
        decode_context(&encode_context(&vv)).is_err(),
        "one actor over the limit"
    );

    let actor = ActorId {
        node: "n".into(),
        incarnation: 1,
        epoch: 1,
    };
    for (counter, ok) in [
        (DOT_COUNTER_MAX, true),
        (DOT_COUNTER_MAX + 1, false),
        (u64::MAX, false),
    ] {
        let mut vv = VersionVector::new();
        vv.add(&Dot {
            actor: actor.clone(),
            counter,
        });
        let decoded = decode_context(&encode_context(&vv));
        assert_eq!(decoded.is_ok(), ok, "counter {counter}: {decoded:?}");
    }

    let mut big = encode_context(&VersionVector::new());
    big.resize(CONTEXT_BYTES_MAX + 1, 0);
    assert!(
        decode_context(&big).is_err(),
        "one byte over the size limit"
    );
}

// ---------------------------------------------------------------------------------------
// Forged contexts (issue 11, point 4: contexts cannot corrupt)
// ---------------------------------------------------------------------------------------

/// Counters a forger would try: the edges of the limit and of `u64`.
const EDGE_COUNTERS: [u64; 9] = [
    0,
    1,
    2,
    3,
    DOT_COUNTER_MAX - 1,
    DOT_COUNTER_MAX,
    DOT_COUNTER_MAX + 1,
    u64::MAX - 1,
    u64::MAX,
];

/// The two replicas' identities.
fn replica_coordinator(node: usize) -> Coordinator {
    Coordinator {
        node: format!("n{}", node + 1),
        incarnation: 7 + node as u64,
    }
}

/// A small actor pool a forger picks from: each replica's own actor at the epochs its
/// allocator hands out first (trusted until a restart, untrusted after), an epoch it never
/// issues (0), another incarnation of it, and an unrelated actor.
fn forged_actor() -> impl Strategy<Value = ActorId> {
    prop_oneof![
        (0usize..2, 0u64..5).prop_map(|(node, epoch)| {
            let me = replica_coordinator(node);
            ActorId {
                node: me.node,
                incarnation: me.incarnation,
                epoch,
            }
        }),
        (0usize..2).prop_map(|node| ActorId {
            node: format!("n{}", node + 1),
            incarnation: 99,
            epoch: 1,
        }),
        Just(ActorId {
            node: "x".into(),
            incarnation: 1,
            epoch: 1,
        }),
    ]
}

fn forged_entry() -> impl Strategy<Value = (ActorId, u64)> {
    (
        forged_actor(),
        prop_oneof![
            prop::sample::select(EDGE_COUNTERS.to_vec()),
            0u64..8,
            any::<u64>(),
        ],
    )
}

/// Where the bytes of a forged write's context come from.
#[derive(Debug, Clone)]
enum ForgedCtx {
    /// None: a blind write.
    Blind,
    /// Arbitrary bytes, with the format tag prepended when `tagged`.
    Raw { tagged: bool, bytes: Vec<u8> },
    /// A real read from the replicas whose bits are set in `read`, with some entries
    /// overwritten (counters may be zero or above the limit: encoded raw).
    Edited { read: u8, set: Vec<(ActorId, u64)> },
}

fn forged_ctx() -> impl Strategy<Value = ForgedCtx> {
    prop_oneof![
        1 => Just(ForgedCtx::Blind),
        1 => (any::<bool>(), prop::collection::vec(any::<u8>(), 0..48))
            .prop_map(|(tagged, bytes)| ForgedCtx::Raw { tagged, bytes }),
        6 => (0u8..4, prop::collection::vec(forged_entry(), 0..4))
            .prop_map(|(read, set)| ForgedCtx::Edited { read, set }),
    ]
}

#[derive(Debug, Clone)]
enum ForgeOp {
    /// A client writes through replica `node` with a (possibly forged) context.
    Write {
        node: usize,
        ctx: ForgedCtx,
        delete: bool,
    },
    /// Replica `to` merges replica `from`'s object (replication, repair, anti-entropy).
    Sync { from: usize, to: usize },
    /// Replica `node` restarts: the epochs it issued so far are no longer trusted.
    Restart { node: usize },
}

fn forge_op() -> impl Strategy<Value = ForgeOp> {
    prop_oneof![
        6 => (0usize..2, forged_ctx(), any::<bool>())
            .prop_map(|(node, ctx, delete)| ForgeOp::Write { node, ctx, delete }),
        3 => (0usize..2).prop_map(|from| ForgeOp::Sync { from, to: 1 - from }),
        1 => (0usize..2).prop_map(|node| ForgeOp::Restart { node }),
    ]
}

/// Two replicas of one key under forged contexts, each step checked.
struct Forged {
    records: [Option<LocalRecord>; 2],
    epochs: [NodeEpochs; 2],
    issued: Vec<Dot>,
}

/// Stores and reads back a record as the node does (`record::encode_record` /
/// `record::decode_record`: a format tag, postcard, then `validate`).
fn store_and_read_back(record: &LocalRecord) -> Result<LocalRecord, TestCaseError> {
    let mut bytes = vec![1u8];
    bytes.extend(postcard::to_allocvec(record).expect("plain data"));
    let back: LocalRecord = postcard::from_bytes(&bytes[1..]).expect("our own encoding");
    prop_assert_eq!(back.object.validate(), Ok(()), "stored {:?}", record);
    prop_assert_eq!(&back, record);
    Ok(back)
}

impl Forged {
    fn new() -> Self {
        Forged {
            records: [None, None],
            epochs: [
                NodeEpochs::new(Policy::Durable),
                NodeEpochs::new(Policy::Durable),
            ],
            issued: Vec::new(),
        }
    }

    fn read(&self, mask: u8) -> Object {
        let mut acc = Object::new();
        for (i, r) in self.records.iter().enumerate() {
            if mask & (1 << i) != 0
                && let Some(r) = r
            {
                acc = acc.merge(&r.object);
            }
        }
        acc
    }

    fn bytes(&self, ctx: &ForgedCtx) -> Vec<u8> {
        match ctx {
            ForgedCtx::Blind => Vec::new(),
            ForgedCtx::Raw { tagged, bytes } => {
                let mut out = if *tagged {
                    encode_context(&VersionVector::new())
                } else {
                    Vec::new()
                };
                out.extend_from_slice(bytes);
                out
            }
            ForgedCtx::Edited { read, set } => {
                let mut entries: BTreeMap<ActorId, u64> = self
                    .read(*read)
                    .context()
                    .iter()
                    .map(|(a, n)| (a.clone(), n))
                    .collect();
                for (actor, n) in set {
                    entries.insert(actor.clone(), *n);
                }
                let mut out = encode_context(&VersionVector::new());
                out.truncate(1);
                out.extend(postcard::to_allocvec(&VersionVectorWire { entries }).expect("plain"));
                out
            }
        }
    }

    /// A write as `KvService::write` does it: decode, check against the record, coordinate,
    /// validate. Returns the reply context when the write was accepted.
    fn write(
        &mut self,
        node: usize,
        bytes: &[u8],
        delete: bool,
    ) -> Result<Option<VersionVector>, TestCaseError> {
        let me = replica_coordinator(node);
        let Ok(ctx) = decode_context(bytes) else {
            return Ok(None);
        };
        let local = self.records[node].clone();
        if let Err(e) = check_client_context(local.as_ref(), &me, &self.epochs[node], &ctx) {
            prop_assert!(matches!(e, CausalityError::InvalidContext(_)));
            return Ok(None);
        }
        let op = if delete {
            WriteOp::Delete
        } else {
            WriteOp::Put(vec![self.issued.len() as u8])
        };
        let before = local.as_ref().map(|r| r.object.clone()).unwrap_or_default();
        let (record, dot) = coordinate_write(local, &me, &mut self.epochs[node], &ctx, op, 1);
        prop_assert!(
            (1..=DOT_COUNTER_MAX).contains(&dot.counter),
            "dot {:?} outside 1..=DOT_COUNTER_MAX",
            dot
        );
        prop_assert!(!self.issued.contains(&dot), "dot {:?} issued twice", dot);
        prop_assert!(!before.context().covers(&dot), "dot {:?} not fresh", dot);
        self.issued.push(dot.clone());
        let record = store_and_read_back(&record)?;
        // No sibling the client's context did not cover disappears; the new one is there.
        for s in before.siblings() {
            if !ctx.covers(&s.dot) {
                prop_assert!(
                    record.object.siblings().contains(s),
                    "write dropped {:?} its context did not cover",
                    s
                );
            }
        }
        prop_assert!(record.object.siblings().iter().any(|s| s.dot == dot));
        // The contexts a get and this put return are accepted by the next put here.
        let mut reply = ctx;
        reply.add(&dot);
        for back in [reply.clone(), record.object.context().clone()] {
            let decoded = decode_context(&encode_context(&back));
            prop_assert_eq!(decoded.as_ref(), Ok(&back));
            prop_assert_eq!(
                check_client_context(Some(&record), &me, &self.epochs[node], &back),
                Ok(())
            );
        }
        self.records[node] = Some(record);
        Ok(Some(reply))
    }

    /// `KvService::merge_remote`: validate the incoming object, merge, store.
    fn sync(&mut self, from: usize, to: usize) -> Result<(), TestCaseError> {
        let Some(incoming) = self.records[from].as_ref().map(|r| r.object.clone()) else {
            return Ok(());
        };
        prop_assert_eq!(incoming.validate(), Ok(()));
        let local = self.records[to].clone();
        let plan = replica::merge_incoming(local.as_ref(), &incoming, None, false);
        if let Some(record) = plan.record {
            let record = store_and_read_back(&record)?;
            let before = local.map(|r| r.object).unwrap_or_default();
            // The merge law: a sibling goes only when the other side saw it replaced.
            for s in before.siblings() {
                if !record.object.siblings().contains(s) {
                    prop_assert!(incoming.context().covers(&s.dot));
                }
            }
            for s in incoming.siblings() {
                if !record.object.siblings().contains(s) {
                    prop_assert!(before.context().covers(&s.dot));
                }
            }
            self.records[to] = Some(record);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(config(1500))]

    /// Whatever context bytes clients send, every record either replica stores stays valid
    /// and reads back, no write drops a sibling its context did not cover, dots stay within
    /// the limit and unique, and forged entries that reach the other replica through the
    /// object context do not break its writes either.
    #[test]
    fn forged_contexts_never_corrupt_a_record(
        ops in prop::collection::vec(forge_op(), 1..24),
    ) {
        let mut w = Forged::new();
        for op in &ops {
            match op {
                ForgeOp::Write { node, ctx, delete } => {
                    let bytes = w.bytes(ctx);
                    w.write(*node, &bytes, *delete)?;
                }
                ForgeOp::Sync { from, to } => w.sync(*from, *to)?,
                ForgeOp::Restart { node } => w.epochs[*node].reboot(),
            }
        }
        // Both replicas exchange and keep accepting writes: blind ones, and ones with the
        // context of a full read, which replace everything.
        w.sync(0, 1)?;
        w.sync(1, 0)?;
        for node in 0..2 {
            let accepted = w.write(node, &[], false)?;
            prop_assert!(accepted.is_some(), "a blind write was refused");
            // Both replicas hold everything here, so the check has nothing to refuse.
            let ctx = encode_context(w.read(0b11).context());
            let accepted = w.write(node, &ctx, false)?;
            prop_assert!(accepted.is_some(), "the context of a full read was refused");
            prop_assert_eq!(w.records[node].as_ref().map(|r| r.object.siblings().len()), Some(1));
            w.sync(node, 1 - node)?;
        }
    }
}
