//! A node's simulated disk: what survives which crash.
//!
//! Mirrors the production storage contract (`host/node/src/storage`): writes are applied
//! at once (readers see them) but become durable only when synced; `sync` makes every
//! write applied so far durable (group commit), and the OS writes buffered data back on its
//! own from time to time. A process kill keeps everything applied (the OS holds it); a power
//! loss keeps the durable part plus a prefix of the unsynced write batches (whatever
//! writeback got to), like a journal torn at some point. A batch (production: one
//! `WriteBatch`, e.g. a record with its hint marker) is never torn.
//!
//! Cluster metadata (the ring and the member states) is durable as soon as it is written:
//! production's `MetaStore` fsyncs a change before applying or acknowledging it.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use quiver_core::causality::LocalRecord;
use quiver_core::membership::MemberState;
use quiver_core::ring::Ring;

use crate::rng::Rng;

/// One write to the simulated disk, in application order.
#[derive(Debug, Clone)]
enum Op {
    /// A record and its tombstone-index entry (`Some(local ms)` when tombstone-only),
    /// written in one batch as production writes `d|…` and `keys::reap_key`.
    PutRecord(String, LocalRecord, Option<u64>),
    DeleteRecord(String),
    PutHint(String, String),
    DeleteHint(String, String),
}

/// The part of a node's state that lives on disk: records and hint markers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    /// Key -> the node's record of it (`d | bucket | key` in production).
    pub records: BTreeMap<String, LocalRecord>,
    /// (owner, key): a hint marker (`h | owner | data key` in production).
    pub hints: BTreeSet<(String, String)>,
    /// The tombstone index (production: `keys::reap_key`, in the record's batch): for each
    /// key whose siblings are all tombstones, the node's own wall-clock ms at which it
    /// stored exactly that state.
    pub tombstones: BTreeMap<String, u64>,
}

impl Tables {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::PutRecord(k, r, held) => {
                self.records.insert(k.clone(), r.clone());
                match held {
                    Some(t) => self.tombstones.insert(k.clone(), *t),
                    None => self.tombstones.remove(k),
                };
            }
            Op::DeleteRecord(k) => {
                self.records.remove(k);
                self.tombstones.remove(k);
            }
            Op::PutHint(o, k) => {
                self.hints.insert((o.clone(), k.clone()));
            }
            Op::DeleteHint(o, k) => {
                self.hints.remove(&(o.clone(), k.clone()));
            }
        }
    }
}

/// A node's view of the membership (production: the `members` and `ring` of
/// `quiver_core::meta::MetaState`), spread by gossip.
///
/// Production orders a member entry by `(version, stamp)` and the ring by
/// `(ring version, stamp)`. In the simulator one committer makes every change and a member
/// only moves forward through its life (`Joining < Valid < Leaving < Left`), so the newest
/// ring version and the later member state are what those orders pick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The ring this node routes and hands off by.
    pub ring: Arc<Ring>,
    /// Every node's state, as far as this node knows.
    pub members: BTreeMap<String, MemberState>,
}

impl Meta {
    /// Every member of `ring` valid, nobody else known.
    pub fn of_ring(ring: Arc<Ring>) -> Meta {
        let members = ring
            .members()
            .iter()
            .map(|m| (m.id.clone(), MemberState::Valid))
            .collect();
        Meta { ring, members }
    }

    /// Merges what another node knows (production: `MetaState::merge`); true when
    /// anything changed here.
    pub fn merge(&mut self, other: &Meta) -> bool {
        let mut changed = false;
        if other.ring.partitions() == self.ring.partitions()
            && other.ring.version() > self.ring.version()
        {
            self.ring = Arc::clone(&other.ring);
            changed = true;
        }
        for (id, &state) in &other.members {
            match self.members.get_mut(id) {
                Some(mine) if state > *mine => {
                    *mine = state;
                    changed = true;
                }
                Some(_) => {}
                None => {
                    self.members.insert(id.clone(), state);
                    changed = true;
                }
            }
        }
        changed
    }

    /// The state of `id` (`None`: never heard of).
    pub fn state(&self, id: &str) -> Option<MemberState> {
        self.members.get(id).copied()
    }
}

impl Hash for Meta {
    // The ring's version identifies it within a run (one committer); hashing the whole
    // ring on every traced gossip message would cost more than the run.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.ring.version().hash(state);
        self.members.hash(state);
    }
}

/// What a node's disk holds between two lives of the node.
#[derive(Debug, Clone)]
pub struct Disk {
    /// Durable tables.
    pub durable: Tables,
    /// Cluster metadata, if this disk ever stored any (a fresh or wiped disk has none and
    /// the node starts from the ring every node derives from the initial member list).
    pub meta: Option<Meta>,
    /// Boot counter (production: `m/boot`, fsynced before serving).
    pub boot: u64,
    /// Data-directory identity (production: `m/incarnation`); a wiped disk gets a new one.
    pub incarnation: u64,
}

impl Disk {
    /// An empty disk with the given incarnation.
    pub fn new(incarnation: u64) -> Self {
        Disk {
            durable: Tables::default(),
            meta: None,
            boot: 0,
            incarnation,
        }
    }
}

/// How a node went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrashKind {
    /// `kill -9`: applied writes survive in the OS page cache.
    Kill,
    /// Power loss: unsynced writes survive only as far as writeback got.
    PowerLoss,
    /// The disk is replaced: nothing survives, the node comes back as a new incarnation.
    Wipe,
}

/// A live node's store: the tables readers see, over the disk and its unsynced log.
#[derive(Debug, Clone)]
pub struct Store {
    disk: Disk,
    current: Tables,
    /// Unsynced write batches, in application order.
    unsynced: Vec<Vec<Op>>,
    /// Writes join the last batch (between [`Store::begin_batch`] and [`Store::end_batch`]).
    in_batch: bool,
}

impl Store {
    /// Opens a disk after a (re)start: readers see exactly what is durable.
    pub fn open(disk: Disk) -> Self {
        Store {
            current: disk.durable.clone(),
            disk,
            unsynced: Vec::new(),
            in_batch: false,
        }
    }

    /// The tables as readers see them.
    pub fn tables(&self) -> &Tables {
        &self.current
    }

    /// The cluster metadata on disk, if any.
    pub fn meta(&self) -> Option<&Meta> {
        self.disk.meta.as_ref()
    }

    /// Stores cluster metadata, durable at once (production: `MetaStore` syncs a change
    /// before it takes effect).
    pub fn set_meta(&mut self, meta: Meta) {
        self.disk.meta = Some(meta);
    }

    /// Boot counter and incarnation of the disk.
    pub fn disk_identity(&self) -> (u64, u64) {
        (self.disk.boot, self.disk.incarnation)
    }

    fn push(&mut self, op: Op) {
        self.current.apply(&op);
        match self.unsynced.last_mut() {
            Some(batch) if self.in_batch => batch.push(op),
            _ => self.unsynced.push(vec![op]),
        }
    }

    /// The writes until [`Store::end_batch`] form one batch: a power loss keeps all or none.
    pub fn begin_batch(&mut self) {
        self.unsynced.push(Vec::new());
        self.in_batch = true;
    }

    /// Ends the batch [`Store::begin_batch`] opened.
    pub fn end_batch(&mut self) {
        self.in_batch = false;
        if self.unsynced.last().is_some_and(Vec::is_empty) {
            self.unsynced.pop();
        }
    }

    /// Applies a record write with its tombstone-index entry (`held_since`: the local
    /// wall-clock ms the tombstone-only state was first stored; `None` for any other
    /// state). Visible at once, durable after [`Store::sync`].
    pub fn put_record(&mut self, key: &str, record: LocalRecord, held_since: Option<u64>) {
        self.push(Op::PutRecord(key.to_string(), record, held_since));
    }

    /// Applies a record deletion.
    pub fn delete_record(&mut self, key: &str) {
        self.push(Op::DeleteRecord(key.to_string()));
    }

    /// Applies a hint marker.
    pub fn put_hint(&mut self, owner: &str, key: &str) {
        self.push(Op::PutHint(owner.to_string(), key.to_string()));
    }

    /// Applies a hint marker deletion.
    pub fn delete_hint(&mut self, owner: &str, key: &str) {
        self.push(Op::DeleteHint(owner.to_string(), key.to_string()));
    }

    /// Makes every applied write durable (the group-commit fsync; instantaneous here).
    pub fn sync(&mut self) {
        for op in self.unsynced.drain(..).flatten() {
            self.disk.durable.apply(&op);
        }
    }

    /// Number of writes not yet durable.
    pub fn unsynced_len(&self) -> usize {
        self.unsynced.iter().map(Vec::len).sum()
    }

    /// The node goes down: returns what its disk keeps, per the kind of crash.
    pub fn crash(mut self, kind: CrashKind, rng: &mut Rng, new_incarnation: u64) -> Disk {
        match kind {
            CrashKind::Kill => self.sync(),
            CrashKind::PowerLoss => {
                let kept = rng.index(self.unsynced.len() + 1);
                for op in self.unsynced[..kept].iter().flatten() {
                    self.disk.durable.apply(op);
                }
            }
            CrashKind::Wipe => return Disk::new(new_incarnation),
        }
        self.disk
    }

    /// Starts a new boot: bumps the durable boot counter (production fsyncs it before
    /// serving) and returns the new boot number.
    pub fn begin_boot(&mut self) -> u64 {
        self.disk.boot += 1;
        self.disk.boot
    }
}
