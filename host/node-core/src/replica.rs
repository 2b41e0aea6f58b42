//! A node's records: validation, the coordinator's write rule from the core, replica
//! merges, hint markers, reaping and handoff drops.
//!
//! Every change of a key is one read-modify-write under the key's lock stripe that applies
//! one batch (the record, its hint marker and its anti-entropy entry together, so a crash
//! keeps all or none of them) and returns. Nothing here waits for durability: a caller that
//! acknowledges a durable write first makes what was applied durable (production: the
//! store's group commit, after the lock is released, so writers of one hot key share
//! fsyncs; simulator: its disk's `sync`).

use std::sync::{Arc, Mutex, MutexGuard};

use quiver_core::causality::{
    self, ChosenEpoch, Coordinator, Dot, LocalRecord, Object, VersionVector, WriteOp,
    coordinate_write,
};
use quiver_core::limits::{BUCKET_BYTES_MAX, KEY_BYTES_MAX, SIBLINGS_MAX_DEFAULT};
use quiver_core::merkle::{self, Hash};
use quiver_core::replica::{self, HandoffCleanup};
use quiver_core::storage::{StorageEngine, StorageError, WriteBatch, keys};
use quiver_sdk::wire::ErrorCode;

use crate::WallClock;
use crate::ae::AeIndex;
use crate::epochs::BootEpochs;
use crate::record::{decode_record, encode_record, render_key};

/// Number of lock stripes serialising read-modify-write of records; a power of two so the
/// stripe is a mask of the key hash.
pub const KEY_LOCK_STRIPES: usize = 1024;

/// Errors of key-value operations, each mapping to a wire [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// Bad input.
    #[error("{message}")]
    Invalid {
        /// Wire code.
        code: ErrorCode,
        /// Explanation with context.
        message: String,
    },
    /// The key holds too many siblings.
    #[error(
        "bucket {bucket:?} key {key}: {count} siblings would exceed the limit of {max}; \
         read the key and write with its context to resolve them"
    )]
    TooManySiblings {
        /// Bucket.
        bucket: String,
        /// Key, rendered.
        key: String,
        /// Sibling count after the write.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// Storage failed; nothing was acknowledged.
    #[error("node {node}: bucket {bucket:?} key {key}: {source}")]
    Storage {
        /// Node name.
        node: String,
        /// Bucket.
        bucket: String,
        /// Key, rendered.
        key: String,
        /// Engine error (boxed: it is large and errors are the rare path).
        source: Box<StorageError>,
    },
    /// The node holds as many hints as allowed and cannot stand in for another node.
    #[error(
        "node {node}: hint store full ({max} hints); cannot stand in for an unreachable replica"
    )]
    HintsFull {
        /// Node name.
        node: String,
        /// Limit.
        max: u64,
    },
    /// The bucket's reconciler failed; nothing was written.
    #[error("{message}")]
    Plugin {
        /// What failed, naming the plugin, bucket and key.
        message: String,
    },
    /// The node's epoch space for this boot ran out; a restart starts a new one.
    #[error("node {node}: actor epochs of this boot are exhausted; restart the node")]
    EpochsExhausted {
        /// Node name.
        node: String,
    },
}

impl KvError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            KvError::Invalid { code, .. } => *code,
            KvError::TooManySiblings { .. } => ErrorCode::TooManySiblings,
            KvError::Plugin { .. } => ErrorCode::PluginFailed,
            KvError::Storage { .. }
            | KvError::EpochsExhausted { .. }
            | KvError::HintsFull { .. } => ErrorCode::Storage,
        }
    }
}

/// What a coordinated write produced.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    /// Context for the client: its own context plus the new dot.
    pub context: VersionVector,
    /// The key's full state after the write, to replicate.
    pub object: Object,
    /// The dot this write issued.
    pub dot: Dot,
}

/// Largest number of hint markers a node keeps by default; beyond it the node refuses to
/// stand in for unreachable primaries (the write then counts as a failed replica).
pub const HINTS_MAX_DEFAULT: u64 = 1_000_000;

/// A hinted key due for delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct HintedKey {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: Vec<u8>,
    /// The fallback's current state of the key.
    pub object: Object,
}

/// A write coordinated here.
#[derive(Debug)]
pub struct LocalWrite<'a> {
    /// Bucket.
    pub bucket: &'a str,
    /// Key.
    pub key: &'a [u8],
    /// The client's context, decoded and checked by [`Replica::check_write`].
    pub context: &'a VersionVector,
    /// Value or tombstone.
    pub op: WriteOp,
    /// Coordinator wall clock, ms since the Unix epoch.
    pub now_ms: u64,
    /// Set when this node coordinates as a fallback for an unreachable primary.
    pub hint_for: Option<&'a str>,
}

/// What a server-side update or the sibling guard saw of a key before its plugin ran: the
/// record as read, and the epoch its write will use.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The record the plugin call works on (`None`: no record).
    pub record: Option<LocalRecord>,
    /// The actor epoch the write after the call uses.
    pub epoch: u64,
}

/// A node's records over a storage engine.
#[derive(Debug)]
pub struct Replica {
    me: Coordinator,
    store: Arc<dyn StorageEngine>,
    epochs: Mutex<BootEpochs>,
    locks: Box<[Mutex<()>]>,
    value_bytes_max: usize,
    hints: std::sync::atomic::AtomicU64,
    hints_max: u64,
    ae: AeIndex,
}

impl Replica {
    /// A replica over `store`, whose boot has started (`epochs`' batch is durable), with
    /// `clock` as this node's wall clock.
    pub fn new(
        node: String,
        store: Arc<dyn StorageEngine>,
        epochs: BootEpochs,
        value_bytes_max: usize,
        clock: Arc<dyn WallClock>,
    ) -> Self {
        let me = Coordinator {
            node,
            incarnation: epochs.incarnation(),
        };
        let locks = (0..KEY_LOCK_STRIPES).map(|_| Mutex::new(())).collect();
        Replica {
            me,
            store,
            epochs: Mutex::new(epochs),
            locks,
            value_bytes_max,
            hints: std::sync::atomic::AtomicU64::new(0),
            hints_max: HINTS_MAX_DEFAULT,
            ae: AeIndex::with_clock(clock),
        }
    }

    /// The anti-entropy index over this node's records.
    pub fn ae(&self) -> &AeIndex {
        &self.ae
    }

    /// Counts the hint markers on disk (at start) and sets the limit.
    pub fn init_hints(&mut self, hints_max: u64) -> Result<u64, StorageError> {
        const PAGE: usize = 4096;
        let end = [keys::HINT_PREFIX + 1];
        let mut count = 0u64;
        let mut from = vec![keys::HINT_PREFIX];
        loop {
            let page = self.store.scan(&from, Some(&end), PAGE)?;
            count += page.len() as u64;
            match page.last() {
                Some((k, _)) if page.len() == PAGE => {
                    from = k.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        *self.hints.get_mut() = count;
        self.hints_max = hints_max;
        Ok(count)
    }

    /// Hint markers currently held.
    pub fn hint_count(&self) -> u64 {
        self.hints.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Node name.
    pub fn node(&self) -> &str {
        &self.me.node
    }

    /// The underlying storage engine.
    pub fn store(&self) -> &dyn StorageEngine {
        &*self.store
    }

    /// The underlying storage engine, shared.
    pub fn engine(&self) -> Arc<dyn StorageEngine> {
        Arc::clone(&self.store)
    }

    /// Reads a key's replicated state (empty object when never written).
    pub fn get(&self, bucket: &str, key: &[u8]) -> Result<Object, KvError> {
        let dkey = self.validate(bucket, key)?;
        Ok(self
            .read_record(bucket, key, &dkey)?
            .map(|r| r.object)
            .unwrap_or_default())
    }

    /// Checks a write's bucket, key, value size and context before anything is read.
    /// Returns the engine key and the decoded client context.
    pub fn check_write(
        &self,
        bucket: &str,
        key: &[u8],
        op: &WriteOp,
        context: &[u8],
    ) -> Result<(Vec<u8>, VersionVector), KvError> {
        let dkey = self.validate(bucket, key)?;
        if let WriteOp::Put(v) = op
            && v.len() > self.value_bytes_max
        {
            return Err(KvError::Invalid {
                code: ErrorCode::ValueTooLarge,
                message: format!(
                    "bucket {bucket:?} key {}: value of {} bytes exceeds the {}-byte limit",
                    render_key(key),
                    v.len(),
                    self.value_bytes_max
                ),
            });
        }
        let client_context = causality::decode_context(context).map_err(|e| KvError::Invalid {
            code: ErrorCode::InvalidContext,
            message: format!("bucket {bucket:?} key {}: {e}", render_key(key)),
        })?;
        Ok((dkey, client_context))
    }

    /// Coordinates a put or delete checked by [`Replica::check_write`]: issues the dot and
    /// applies the new record. Returns the context of the new version: the client's context
    /// plus the new dot, so that a follow-up write replaces exactly what this client has
    /// seen and not siblings written concurrently by others. Not yet durable.
    pub fn write(&self, dkey: &[u8], mut w: LocalWrite<'_>) -> Result<WriteOutcome, KvError> {
        let mut reply = w.context.clone();
        // Read-modify-write of one record must not interleave with another on the same key.
        let _guard = lock(&self.locks[stripe(dkey)]);
        let local = self.read_record(w.bucket, w.key, dkey)?;
        // The record before this write, for the anti-entropy index; the write consumes
        // `local`.
        let prior = local.as_ref().map(|r| r.object.clone());
        let (record, dot) = {
            let mut epochs = lock(&self.epochs);
            // A context naming dots of this node's own actor that it never issued is
            // forged: refused (issue 11, point 4).
            causality::check_client_context(local.as_ref(), &self.me, &*epochs, w.context)
                .map_err(|e| KvError::Invalid {
                    code: ErrorCode::InvalidContext,
                    message: format!("bucket {:?} key {}: {e}", w.bucket, render_key(w.key)),
                })?;
            self.epoch_capacity(local.as_ref(), &epochs)?;
            // Taken, not cloned: a value may be a mebibyte.
            let op = std::mem::replace(&mut w.op, WriteOp::Delete);
            coordinate_write(local, &self.me, &mut *epochs, w.context, op, w.now_ms)
        };
        self.store_record(w.bucket, w.key, w.hint_for, dkey, prior.as_ref(), &record)?;
        reply.add(&dot);
        Ok(WriteOutcome {
            context: reply,
            object: record.object,
            dot,
        })
    }

    /// First step of a server-side update: the key's record as it is now and the epoch the
    /// update's write will use (continued, or fresh for this boot). The plugin then runs
    /// with no lock held; [`Replica::update_commit`] writes its result.
    pub fn update_begin(&self, bucket: &str, key: &[u8], dkey: &[u8]) -> Result<Snapshot, KvError> {
        let _guard = lock(&self.locks[stripe(dkey)]);
        let record = self.read_record(bucket, key, dkey)?;
        let mut epochs = lock(&self.epochs);
        self.epoch_capacity(record.as_ref(), &epochs)?;
        let epoch = causality::next_epoch(record.as_ref(), &self.me, &mut *epochs);
        Ok(Snapshot { record, epoch })
    }

    /// The actor name of `epoch` on this node, as a plugin's `update` sees it.
    pub fn actor_of(&self, epoch: u64) -> String {
        self.me.actor(epoch).to_string()
    }

    /// Second step of a server-side update: writes `value` (the plugin's result on
    /// `snapshot`) with a context covering everything the snapshot held, if the record is
    /// still exactly the snapshot. `None` when it changed meanwhile (read again). Not yet
    /// durable.
    pub fn update_commit(
        &self,
        bucket: &str,
        key: &[u8],
        dkey: &[u8],
        snapshot: &Snapshot,
        value: Vec<u8>,
        now_ms: u64,
    ) -> Result<Option<WriteOutcome>, KvError> {
        let _guard = lock(&self.locks[stripe(dkey)]);
        let local = self.read_record(bucket, key, dkey)?;
        if local != snapshot.record {
            return Ok(None);
        }
        let mut context = local
            .as_ref()
            .map(|r| r.object.context().clone())
            .unwrap_or_default();
        let (record, dot) = coordinate_write(
            local,
            &self.me,
            &mut ChosenEpoch(snapshot.epoch),
            &context,
            WriteOp::Put(value),
            now_ms,
        );
        // The record as it was (absent stays absent for the AE index).
        let prior = snapshot.record.as_ref().map(|r| &r.object);
        self.store_record(bucket, key, None, dkey, prior, &record)?;
        context.add(&dot);
        Ok(Some(WriteOutcome {
            context,
            object: record.object,
            dot,
        }))
    }

    /// The sibling guard's write: `merged` (the reconciler's merge of `object`, a state
    /// past the bucket's sibling threshold) replaces `object` with a context covering it,
    /// if the key still holds exactly `object`. Returns the new object, the context the
    /// merge covered and its dot; `None` when the key changed meanwhile. Not yet durable.
    pub fn guard_commit(
        &self,
        bucket: &str,
        key: &[u8],
        dkey: &[u8],
        object: &Object,
        merged: WriteOp,
        now_ms: u64,
    ) -> Result<Option<(Object, VersionVector, Dot)>, KvError> {
        let _guard = lock(&self.locks[stripe(dkey)]);
        let local: Option<LocalRecord> = self.read_record(bucket, key, dkey)?;
        let Some(local) = local.filter(|r| r.object == *object) else {
            return Ok(None);
        };
        let seen = object.context().clone();
        let mut epochs = lock(&self.epochs);
        self.epoch_capacity(Some(&local), &epochs)?;
        let (record, dot) =
            coordinate_write(Some(local), &self.me, &mut *epochs, &seen, merged, now_ms);
        drop(epochs);
        self.store_record(bucket, key, None, dkey, Some(object), &record)?;
        Ok(Some((record.object, seen, dot)))
    }

    /// Refuses a write that needs a fresh epoch when this boot has none left.
    fn epoch_capacity(
        &self,
        local: Option<&LocalRecord>,
        epochs: &BootEpochs,
    ) -> Result<(), KvError> {
        let continued = causality::continued_epoch(local, &self.me, epochs).is_some();
        if !continued && !epochs.has_capacity() {
            return Err(KvError::EpochsExhausted {
                node: self.me.node.clone(),
            });
        }
        Ok(())
    }

    /// Stores `record` (which replaces `prior`) with its hint marker and anti-entropy
    /// entry in one batch, under the key's lock stripe held by the caller. Refuses what a
    /// read would refuse and more siblings than the limit; nothing is stored then.
    fn store_record(
        &self,
        bucket: &str,
        key: &[u8],
        hint_for: Option<&str>,
        dkey: &[u8],
        prior: Option<&Object>,
        record: &LocalRecord,
    ) -> Result<(), KvError> {
        // Never store what a read would refuse (`decode_record` validates).
        record.object.validate().map_err(|e| KvError::Invalid {
            code: ErrorCode::Internal,
            message: format!(
                "node {}: bucket {:?} key {}: the write would store an invalid record, \
                 nothing was written: {e}",
                self.me.node,
                bucket,
                render_key(key)
            ),
        })?;
        let count = record.object.siblings().len();
        if count > SIBLINGS_MAX_DEFAULT {
            return Err(KvError::TooManySiblings {
                bucket: bucket.to_string(),
                key: render_key(key),
                count,
                max: SIBLINGS_MAX_DEFAULT,
            });
        }
        let mut batch = WriteBatch::new();
        batch.put(dkey.to_vec(), encode_record(record));
        let new_hint = self.add_hint(&mut batch, bucket, key, dkey, hint_for)?;
        let staged = self.stage_ae(
            &mut batch,
            bucket,
            key,
            dkey,
            Some(prior),
            Some(&record.object),
        )?;
        self.store
            .apply(&batch)
            .map_err(|e| self.storage_err(bucket, key, e))?;
        self.ae.commit(staged);
        if new_hint {
            self.hints
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether this node holds a hint marker for `owner` on the key.
    fn hint_held(
        &self,
        owner: &str,
        bucket: &str,
        key: &[u8],
        dkey: &[u8],
    ) -> Result<bool, KvError> {
        let Some(hkey) = keys::hint_key(owner, dkey) else {
            return Ok(false);
        };
        Ok(self
            .store
            .get(&hkey)
            .map_err(|e| self.storage_err(bucket, key, e))?
            .is_some())
    }

    /// Adds a hint marker for `owner` to `batch` unless one exists; true if it is new.
    fn add_hint(
        &self,
        batch: &mut WriteBatch,
        bucket: &str,
        key: &[u8],
        dkey: &[u8],
        owner: Option<&str>,
    ) -> Result<bool, KvError> {
        let Some(owner) = owner else { return Ok(false) };
        let hkey = keys::hint_key(owner, dkey).ok_or_else(|| KvError::Invalid {
            code: ErrorCode::Internal,
            message: format!("node name {owner:?} is too long for a hint"),
        })?;
        if self
            .store
            .get(&hkey)
            .map_err(|e| self.storage_err(bucket, key, e))?
            .is_some()
        {
            return Ok(false);
        }
        if self.hint_count() >= self.hints_max {
            return Err(KvError::HintsFull {
                node: self.me.node.clone(),
                max: self.hints_max,
            });
        }
        batch.put(hkey, Vec::new());
        Ok(true)
    }

    /// Merges another replica's state of a key into the local record (replication, read
    /// repair, hint delivery, anti-entropy). With `hint_for`, also records a hint for that
    /// node. Returns true when the local record changed. Not yet durable: a caller that
    /// acknowledges a durable copy syncs afterwards even when nothing changed, since the
    /// record may have arrived earlier by a buffered path (read repair, or a repair that
    /// overtook this store) and not be on disk yet (found by the simulator).
    pub fn merge_remote(
        &self,
        bucket: &str,
        key: &[u8],
        incoming: &Object,
        hint_for: Option<&str>,
    ) -> Result<bool, KvError> {
        let dkey = self.validate(bucket, key)?;
        incoming.validate().map_err(|e| KvError::Invalid {
            code: ErrorCode::MalformedRequest,
            message: format!("bucket {bucket:?} key {}: {e}", render_key(key)),
        })?;
        let changed;
        {
            let _guard = lock(&self.locks[stripe(&dkey)]);
            let local = self.read_record(bucket, key, &dkey)?;
            let hint_held = match hint_for {
                Some(owner) => self.hint_held(owner, bucket, key, &dkey)?,
                None => false,
            };
            let plan = replica::merge_incoming(local.as_ref(), incoming, hint_for, hint_held);
            let mut batch = WriteBatch::new();
            let mut staged = None;
            if let Some(record) = &plan.record {
                // Both sides are valid, so their merge is; checked anyway, since a read
                // refuses an invalid record and nothing should be stored that reads fail on.
                record.object.validate().map_err(|e| KvError::Invalid {
                    code: ErrorCode::Internal,
                    message: format!(
                        "node {}: bucket {bucket:?} key {}: the merge would store an invalid \
                         record, nothing was written: {e}",
                        self.me.node,
                        render_key(key)
                    ),
                })?;
                batch.put(dkey.clone(), encode_record(record));
                staged = Some(self.stage_ae(
                    &mut batch,
                    bucket,
                    key,
                    &dkey,
                    Some(local.as_ref().map(|r| &r.object)),
                    Some(&record.object),
                )?);
            }
            changed = plan.record.is_some();
            let new_hint =
                plan.add_hint && self.add_hint(&mut batch, bucket, key, &dkey, hint_for)?;
            if !batch.is_empty() {
                self.store
                    .apply(&batch)
                    .map_err(|e| self.storage_err(bucket, key, e))?;
                if let Some(staged) = staged {
                    self.ae.commit(staged);
                }
                if new_hint {
                    self.hints
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        Ok(changed)
    }

    /// Files the anti-entropy entry of an engine data key under its bucket's current
    /// replication factor (after `quiver bucket set --n`).
    pub fn ae_refile(&self, data_key: &[u8]) -> Result<(), KvError> {
        let Some((bucket, key)) = keys::split_data_key(data_key) else {
            return Ok(());
        };
        let bucket = String::from_utf8_lossy(bucket).into_owned();
        let _guard = lock(&self.locks[stripe(data_key)]);
        let record = self.read_record(&bucket, key, data_key)?;
        let mut batch = WriteBatch::new();
        let staged = self.stage_ae(
            &mut batch,
            &bucket,
            key,
            data_key,
            None,
            record.as_ref().map(|r| &r.object),
        )?;
        self.store
            .apply(&batch)
            .map_err(|e| self.storage_err(&bucket, key, e))?;
        self.ae.commit(staged);
        Ok(())
    }

    /// What this replica says to a reaper about a tombstone: for how long (ms, by its own
    /// clock `now_ms`) it has held exactly the tombstone state with `digest` (`None` if it
    /// does not hold it), and whether it holds a hint for the key for any of `owners` (then
    /// a copy is still on its way somewhere and the tombstone must stay). Call after making
    /// applied writes durable, so a confirmed tombstone cannot be lost to a power failure.
    pub fn reap_status(
        &self,
        data_key: &[u8],
        digest: &Hash,
        owners: &[String],
        now_ms: u64,
    ) -> Result<(Option<u64>, bool), KvError> {
        let Some((bucket, key)) = keys::split_data_key(data_key) else {
            return Ok((None, false));
        };
        let bucket = String::from_utf8_lossy(bucket).into_owned();
        let held = {
            let _guard = lock(&self.locks[stripe(data_key)]);
            let same = self
                .read_record(&bucket, key, data_key)?
                .is_some_and(|r| merkle::object_digest(&r.object) == *digest);
            let since = self
                .ae
                .held_since(&*self.store, data_key)
                .map_err(|e| self.storage_err(&bucket, key, e))?;
            match (same, since) {
                (true, Some(since)) => Some(now_ms.saturating_sub(since)),
                _ => None,
            }
        };
        let hinted = self.hinted_for_any(&bucket, key, data_key, owners)?;
        Ok((held, hinted))
    }

    fn hinted_for_any(
        &self,
        bucket: &str,
        key: &[u8],
        data_key: &[u8],
        owners: &[String],
    ) -> Result<bool, KvError> {
        for owner in owners {
            if self.hint_held(owner, bucket, key, data_key)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Removes a tombstone every replica holds: deletes the record if it is still exactly
    /// the tombstone state with `digest` and no hint for the key is held here. Returns true
    /// when it was removed.
    pub fn reap(&self, data_key: &[u8], digest: &Hash, owners: &[String]) -> Result<bool, KvError> {
        self.drop_copy(data_key, digest, owners, true)
    }

    /// Deletes this node's copy of a key if it is still exactly the state with `digest`
    /// (and a tombstone, if `tombstone_only`) and no hint for the key is held here for any of
    /// `owners`. For reaping, and for handoff once the new owners hold the state. Returns
    /// true when it was removed.
    pub fn drop_copy(
        &self,
        data_key: &[u8],
        digest: &Hash,
        owners: &[String],
        tombstone_only: bool,
    ) -> Result<bool, KvError> {
        let Some((bucket, key)) = keys::split_data_key(data_key) else {
            return Ok(false);
        };
        let bucket = String::from_utf8_lossy(bucket).into_owned();
        let _guard = lock(&self.locks[stripe(data_key)]);
        let Some(record) = self.read_record(&bucket, key, data_key)? else {
            return Ok(false);
        };
        if (tombstone_only && !crate::ae::is_tombstone(&record.object))
            || merkle::object_digest(&record.object) != *digest
            || self.hinted_for_any(&bucket, key, data_key, owners)?
        {
            return Ok(false);
        }
        let mut batch = WriteBatch::new();
        batch.delete(data_key.to_vec());
        let staged = self.stage_ae(
            &mut batch,
            &bucket,
            key,
            data_key,
            Some(Some(&record.object)),
            None,
        )?;
        self.store
            .apply(&batch)
            .map_err(|e| self.storage_err(&bucket, key, e))?;
        self.ae.commit(staged);
        Ok(true)
    }

    /// The local state of each engine data key (an empty object for one not held); keys
    /// that are not data keys are skipped.
    pub fn objects(&self, data_keys: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Object)>, KvError> {
        let mut out = Vec::with_capacity(data_keys.len());
        for dkey in data_keys {
            let Some((bucket, key)) = keys::split_data_key(dkey) else {
                continue;
            };
            let bucket = String::from_utf8_lossy(bucket);
            let object = self
                .read_record(&bucket, key, dkey)?
                .map(|r| r.object)
                .unwrap_or_default();
            out.push((dkey.clone(), object));
        }
        Ok(out)
    }

    /// True when this node holds a hint for `owner` on the key.
    pub fn has_hint(&self, owner: &str, bucket: &str, key: &[u8]) -> bool {
        keys::data_key(bucket.as_bytes(), key)
            .and_then(|d| keys::hint_key(owner, &d))
            .is_some_and(|h| matches!(self.store.get(&h), Ok(Some(_))))
    }

    /// Up to `limit` keys this node holds hints for on behalf of `owner`.
    pub fn hinted_keys(&self, owner: &str, limit: usize) -> Result<Vec<HintedKey>, StorageError> {
        let Some(prefix) = keys::hint_prefix(owner) else {
            return Ok(Vec::new());
        };
        let end = keys::prefix_end(&prefix);
        let mut out = Vec::new();
        for (hkey, _) in self.store.scan(&prefix, end.as_deref(), limit)? {
            let Some((_, dkey)) = keys::split_hint_key(&hkey) else {
                continue;
            };
            let Some((bucket, key)) = keys::split_data_key(dkey) else {
                continue;
            };
            let Ok(bucket) = std::str::from_utf8(bucket) else {
                continue;
            };
            let object = match self.store.get(dkey)? {
                Some(bytes) => decode_record(&bytes).map(|r| r.object).map_err(|message| {
                    StorageError::Corrupt {
                        engine: self.store.name().to_string(),
                        key_hex: render_key(dkey),
                        message,
                    }
                })?,
                None => Object::new(),
            };
            out.push(HintedKey {
                bucket: bucket.to_string(),
                key: key.to_vec(),
                object,
            });
        }
        Ok(out)
    }

    /// The owner acknowledged `delivered`: drop the hint marker and, when `keep_copy` is
    /// false (this node is not a replica of the key and no other hint needs it), the local
    /// copy too — but only if the copy did not change since it was sent: a newer write stays
    /// until it is delivered again. Returns true when it applied a change, which the caller
    /// makes durable before it counts the hint as delivered.
    pub fn hint_delivered(
        &self,
        owner: &str,
        bucket: &str,
        key: &[u8],
        delivered: &Object,
        keep_copy: bool,
    ) -> Result<bool, KvError> {
        let dkey = self.validate(bucket, key)?;
        let Some(hkey) = keys::hint_key(owner, &dkey) else {
            return Ok(false);
        };
        {
            let _guard = lock(&self.locks[stripe(&dkey)]);
            let held = self
                .store
                .get(&hkey)
                .map_err(|e| self.storage_err(bucket, key, e))?
                .is_some();
            let current = self
                .read_record(bucket, key, &dkey)?
                .map(|r| r.object)
                .unwrap_or_default();
            let mut batch = WriteBatch::new();
            let mut staged = None;
            match replica::handoff_cleanup(held, &current, delivered, keep_copy) {
                HandoffCleanup::Nothing => return Ok(false),
                HandoffCleanup::DropMarker => {
                    batch.delete(hkey);
                }
                HandoffCleanup::DropMarkerAndCopy => {
                    batch.delete(hkey);
                    batch.delete(dkey.clone());
                    staged = Some({
                        // No record reads as the empty object here.
                        let prior = (current != Object::default()).then_some(&current);
                        self.stage_ae(&mut batch, bucket, key, &dkey, Some(prior), None)?
                    });
                }
            }
            self.store
                .apply(&batch)
                .map_err(|e| self.storage_err(bucket, key, e))?;
            if let Some(staged) = staged {
                self.ae.commit(staged);
            }
            self.hints
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Stages the anti-entropy entry change of a record write (`new` = `Some`) or delete in
    /// `batch`; see [`AeIndex::stage`]. Call under the key's lock.
    fn stage_ae(
        &self,
        batch: &mut WriteBatch,
        bucket: &str,
        key: &[u8],
        dkey: &[u8],
        prior: Option<Option<&Object>>,
        new: Option<&Object>,
    ) -> Result<crate::ae::Staged, KvError> {
        self.ae
            .stage(
                &*self.store,
                batch,
                bucket.as_bytes(),
                key,
                dkey,
                prior,
                new,
            )
            .map_err(|e| self.storage_err(bucket, key, e))
    }

    /// Checks a bucket name and key; returns the engine key.
    pub fn validate(&self, bucket: &str, key: &[u8]) -> Result<Vec<u8>, KvError> {
        if bucket.is_empty()
            || bucket.len() > BUCKET_BYTES_MAX
            || bucket.chars().any(char::is_control)
        {
            return Err(KvError::Invalid {
                code: ErrorCode::InvalidBucket,
                message: format!(
                    "bucket name {bucket:?} is invalid: use 1 to {BUCKET_BYTES_MAX} bytes of \
                     UTF-8 without control characters"
                ),
            });
        }
        if key.is_empty() {
            return Err(KvError::Invalid {
                code: ErrorCode::EmptyKey,
                message: format!("bucket {bucket:?}: the key is empty"),
            });
        }
        if key.len() > KEY_BYTES_MAX {
            return Err(KvError::Invalid {
                code: ErrorCode::KeyTooLarge,
                message: format!(
                    "bucket {bucket:?}: key of {} bytes exceeds the {KEY_BYTES_MAX}-byte limit",
                    key.len()
                ),
            });
        }
        keys::data_key(bucket.as_bytes(), key).ok_or_else(|| KvError::Invalid {
            code: ErrorCode::InvalidBucket,
            message: format!("bucket name {bucket:?} is too long"),
        })
    }

    fn read_record(
        &self,
        bucket: &str,
        key: &[u8],
        dkey: &[u8],
    ) -> Result<Option<LocalRecord>, KvError> {
        let Some(bytes) = self
            .store
            .get(dkey)
            .map_err(|e| self.storage_err(bucket, key, e))?
        else {
            return Ok(None);
        };
        decode_record(&bytes).map(Some).map_err(|message| {
            self.storage_err(
                bucket,
                key,
                StorageError::Corrupt {
                    engine: self.store.name().to_string(),
                    key_hex: render_key(dkey),
                    message,
                },
            )
        })
    }

    /// A storage error of `bucket`/`key` on this node.
    pub fn storage_err(&self, bucket: &str, key: &[u8], source: StorageError) -> KvError {
        KvError::Storage {
            node: self.me.node.clone(),
            bucket: bucket.to_string(),
            key: render_key(key),
            source: Box::new(source),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the guarded data half-updated (the
    // stripes guard `()`, the allocator only moves forward), so poisoning is safe to ignore.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The lock stripe of an engine data key, `0..KEY_LOCK_STRIPES`.
pub fn stripe(dkey: &[u8]) -> usize {
    // FNV-1a: cheap, and good enough to spread keys over stripes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in dkey {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h as usize) & (KEY_LOCK_STRIPES - 1)
}
