//! A node's simulated disk: what survives which crash.
//!
//! Mirrors the production storage contract (`host/node/src/storage`): writes are applied
//! at once (readers see them) but become durable only when synced; `sync` makes every
//! write applied so far durable (group commit), and the OS writes buffered data back on its
//! own from time to time. A process kill keeps everything applied (the OS holds it); a power
//! loss keeps the durable part plus a prefix of the unsynced writes (whatever writeback got
//! to), like a journal torn at some point.

use std::collections::{BTreeMap, BTreeSet};

use quiver_core::causality::LocalRecord;

use crate::rng::Rng;

/// One write to the simulated disk, in application order.
#[derive(Debug, Clone)]
enum Op {
    PutRecord(String, LocalRecord),
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
}

impl Tables {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::PutRecord(k, r) => {
                self.records.insert(k.clone(), r.clone());
            }
            Op::DeleteRecord(k) => {
                self.records.remove(k);
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

/// What a node's disk holds between two lives of the node.
#[derive(Debug, Clone)]
pub struct Disk {
    /// Durable tables.
    pub durable: Tables,
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
    unsynced: Vec<Op>,
}

impl Store {
    /// Opens a disk after a (re)start: readers see exactly what is durable.
    pub fn open(disk: Disk) -> Self {
        Store {
            current: disk.durable.clone(),
            disk,
            unsynced: Vec::new(),
        }
    }

    /// The tables as readers see them.
    pub fn tables(&self) -> &Tables {
        &self.current
    }

    /// Boot counter and incarnation of the disk.
    pub fn disk_identity(&self) -> (u64, u64) {
        (self.disk.boot, self.disk.incarnation)
    }

    fn push(&mut self, op: Op) {
        self.current.apply(&op);
        self.unsynced.push(op);
    }

    /// Applies a record write (visible at once, durable after [`Store::sync`]).
    pub fn put_record(&mut self, key: &str, record: LocalRecord) {
        self.push(Op::PutRecord(key.to_string(), record));
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
        for op in self.unsynced.drain(..) {
            self.disk.durable.apply(&op);
        }
    }

    /// Number of writes not yet durable.
    pub fn unsynced_len(&self) -> usize {
        self.unsynced.len()
    }

    /// The node goes down: returns what its disk keeps, per the kind of crash.
    pub fn crash(mut self, kind: CrashKind, rng: &mut Rng, new_incarnation: u64) -> Disk {
        match kind {
            CrashKind::Kill => self.sync(),
            CrashKind::PowerLoss => {
                let kept = rng.index(self.unsynced.len() + 1);
                for op in &self.unsynced[..kept] {
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
