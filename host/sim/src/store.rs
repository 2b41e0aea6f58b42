//! A node's disk between two lives, and what the checkers read of it.
//!
//! The data lives on a [`SimDisk`], the production `StorageEngine` contract simulated: the
//! node's `quiver-node-core` replica writes its records, hint markers, anti-entropy entries,
//! tombstone index and boot counter there exactly as in production; writes are applied at
//! once (readers see them) and durable only once synced; a process kill keeps everything
//! applied, a power loss the durable part plus a prefix of the unsynced write batches
//! (never part of one), a wipe nothing.
//!
//! Cluster metadata (the ring and the member states) is durable as soon as it is written:
//! production's `MetaStore` fsyncs a change before applying or acknowledging it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use quiver_core::causality::LocalRecord;
use quiver_core::membership::{MemberEntry, MemberState};
use quiver_core::meta::{MetaState, Stamp};
use quiver_core::ring::{ClaimParams, RingError};
use quiver_core::storage::{StorageEngine, StorageError, keys};
use quiver_node_core::membership::first_membership;
use quiver_node_core::node::NodeDisk;
use quiver_node_core::record::decode_record;

use crate::disk::SimDisk;
use crate::node::BUCKET;
use crate::rng::Rng;

/// What a node holds, decoded from its engine: records, hint markers and the tombstone
/// index, keyed by simulation key. For the checkers, which read whole nodes at the end;
/// the node itself reads single keys through its replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    /// Key -> the node's record of it (`d | bucket | key`).
    pub records: BTreeMap<String, LocalRecord>,
    /// (owner, key): a hint marker (`h | owner | data key`).
    pub hints: BTreeSet<(String, String)>,
    /// The tombstone index (`keys::reap_key`, in the record's batch): for each key whose
    /// siblings are all tombstones, the node's own wall-clock ms at which it stored exactly
    /// that state.
    pub tombstones: BTreeMap<String, u64>,
}

/// The simulation key of an engine data key (only keys of [`BUCKET`]).
fn sim_key(data_key: &[u8]) -> Option<String> {
    let (bucket, key) = keys::split_data_key(data_key)?;
    if bucket != BUCKET.as_bytes() {
        return None;
    }
    String::from_utf8(key.to_vec()).ok()
}

impl Tables {
    /// Reads every record, hint marker and tombstone-index entry of `engine`. An
    /// unreadable record is an error: production refuses to serve it.
    pub fn read(engine: &dyn StorageEngine) -> Result<Tables, StorageError> {
        let mut tables = Tables::default();
        let scan = |prefix: u8| engine.scan(&[prefix], Some(&[prefix + 1]), usize::MAX);
        for (k, v) in scan(keys::DATA_PREFIX)? {
            let Some(key) = sim_key(&k) else { continue };
            let record = decode_record(&v).map_err(|message| StorageError::Corrupt {
                engine: engine.name().to_string(),
                key_hex: key.clone(),
                message,
            })?;
            tables.records.insert(key, record);
        }
        for (k, _) in scan(keys::HINT_PREFIX)? {
            if let Some((owner, dkey)) = keys::split_hint_key(&k)
                && let Some(key) = sim_key(dkey)
            {
                tables.hints.insert((owner.to_string(), key));
            }
        }
        for (k, v) in scan(keys::REAP_PREFIX)? {
            if let Some(key) = sim_key(&k[1..]) {
                let since = v.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0);
                tables.tombstones.insert(key, since);
            }
        }
        Ok(tables)
    }
}

/// The address a simulated member is listed under (the simulated network routes by name).
pub fn sim_addr(id: &str) -> String {
    format!("sim:{id}")
}

/// The metadata every node of a simulated cluster starts from (production:
/// `first_membership` over the `--peer` list): `members` valid and in the first ring, and
/// `spares` known as joining, all with the zero stamp.
pub fn initial_meta(
    members: &[String],
    spares: &[String],
    params: ClaimParams,
) -> Result<MetaState, RingError> {
    let listed = members.iter().map(|id| (id.clone(), sim_addr(id)));
    let (mut meta, _) = first_membership(listed, params)?;
    for id in spares {
        let entry = MemberEntry {
            version: 0,
            stamp: Stamp::zero(),
            addr: sim_addr(id),
            weight: 1,
            zone: None,
            state: MemberState::Joining,
        };
        meta.members.insert(id.clone(), entry);
    }
    Ok(meta)
}

/// What a node's disk holds between two lives of the node.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The data: the production engine contract, simulated.
    pub engine: SimDisk,
    /// Cluster metadata, if this disk ever stored any (a fresh or wiped disk has none and
    /// the node starts from the ring every node derives from the initial member list).
    pub meta: Option<MetaState>,
    /// The incarnation a first boot on this disk records (production draws it at random
    /// when `m/incarnation` is absent); a wiped disk gets a new one.
    pub fresh_incarnation: u64,
    /// Syncs take time: the node asks with `Effect::Sync` and the world answers later
    /// (`sim::Config::sync_delay_ms`); otherwise the disk syncs inline.
    pub defer_syncs: bool,
}

impl Disk {
    /// An empty disk whose first boot records `incarnation`.
    pub fn new(incarnation: u64) -> Self {
        Disk {
            engine: SimDisk::new(),
            meta: None,
            fresh_incarnation: incarnation,
            defer_syncs: false,
        }
    }

    /// What survives on this disk, decoded (for checks after a crash).
    pub fn tables(&self) -> Result<Tables, StorageError> {
        Tables::read(&self.engine)
    }
}

impl NodeDisk for Disk {
    fn engine(&self) -> Arc<dyn StorageEngine> {
        self.engine.engine()
    }

    fn fresh_incarnation(&self) -> u64 {
        self.fresh_incarnation
    }

    fn meta(&self) -> Option<&MetaState> {
        self.meta.as_ref()
    }

    fn store_meta(&mut self, meta: MetaState) {
        self.meta = Some(meta);
    }

    fn sync_inline(&self) -> Option<Result<(), String>> {
        // Inline, everything applied before the sync point is durable before the node
        // goes on, and no crash falls inside one input.
        match self.defer_syncs {
            true => None,
            false => Some(self.engine.sync().map_err(|e| e.to_string())),
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

impl Disk {
    /// The node on this disk goes down: returns what the disk keeps, per the kind of crash.
    /// The node's engine handle is stale from then on (every call on it fails).
    pub fn crash(self, kind: CrashKind, rng: &mut Rng, new_incarnation: u64) -> Disk {
        let survived = match kind {
            CrashKind::Kill => self.engine.kill(),
            CrashKind::PowerLoss => self.engine.power_loss(rng),
            CrashKind::Wipe => {
                return Disk {
                    defer_syncs: self.defer_syncs,
                    ..Disk::new(new_incarnation)
                };
            }
        };
        // Only a stale handle refuses a crash, and the node holds the live one.
        let engine = survived.expect("a node crashes through its disk's live handle");
        Disk { engine, ..self }
    }
}
