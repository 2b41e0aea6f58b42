//! The durable default engine: a fjall 3 database (LSM tree) with one keyspace.
//!
//! Configuration, and why:
//! - Batches are committed with [`PersistMode::Buffer`]: the journal record is handed to the
//!   OS (so it survives a crash of the process, e.g. `kill -9`) but never fsynced by the
//!   commit itself. fjall 3 has no background fsync timer either, so the only fsyncs of the
//!   journal are ours: [`StorageEngine::sync`], issued by the group-commit syncer, plus the
//!   ones fjall does when it rotates a journal or writes a table (rare, and they only make
//!   more data durable).
//! - `sync` is `persist(PersistMode::SyncData)`, i.e. `fdatasync` of the active journal;
//!   older journals were already fully synced when fjall rotated away from them.
//! - The block cache defaults to [`FjallOptions::DEFAULT_CACHE_BYTES`] (fjall's own default
//!   is 32 MiB, small for a server).
//! - Once a sync (or a journal write) fails, the engine is poisoned: the kernel may have
//!   dropped dirty pages it could not write, so we can no longer tell which acknowledged
//!   batches are on disk (see "Can applications recover from fsync failures?", ATC '20).
//!   Every later `apply` and `sync` fails with [`StorageError::Poisoned`] naming the first
//!   failure, until the node restarts and fjall recovers from its journal.

use std::collections::HashMap;
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use quiver_core::storage::{BatchOp, StorageEngine, StorageError, WriteBatch};

const NAME: &str = "fjall";
/// The single keyspace holding every record; the node's key layout (data, metadata) is
/// prefix-based, so one keyspace keeps cross-prefix batches in one journal record.
const KEYSPACE: &str = "data";

/// Tunables for [`FjallEngine::open_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FjallOptions {
    /// Block cache capacity in bytes.
    pub cache_bytes: u64,
}

impl FjallOptions {
    /// Default block cache: 256 MiB, a reasonable share of a small server's memory.
    pub const DEFAULT_CACHE_BYTES: u64 = 256 * 1024 * 1024;
}

impl Default for FjallOptions {
    fn default() -> Self {
        Self {
            cache_bytes: Self::DEFAULT_CACHE_BYTES,
        }
    }
}

/// A fjall 3 database used as a [`StorageEngine`]. See the [module docs](self).
pub struct FjallEngine {
    db: Database,
    data: Keyspace,
    dir: PathBuf,
    /// The first fatal failure, rendered; set once, never cleared.
    poisoned: OnceLock<String>,
}

impl fmt::Debug for FjallEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallEngine")
            .field("dir", &self.dir)
            .field("poisoned", &self.poisoned.get())
            .finish_non_exhaustive()
    }
}

impl FjallEngine {
    /// Opens (creating or recovering) the database in `dir` with default options.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        Self::open_with(dir, &FjallOptions::default())
    }

    /// Opens (creating or recovering) the database in `dir`.
    pub fn open_with(dir: &Path, options: &FjallOptions) -> Result<Self, StorageError> {
        let open_err = |e: fjall::Error| io_error("open", format!("{}: {e}", dir.display()));
        let db = Database::builder(dir)
            .cache_size(options.cache_bytes)
            // `false` = commits flush the journal to the OS (not to disk): buffered writes
            // then survive a process crash. Explicit because we rely on it.
            .manual_journal_persist(false)
            .open()
            .map_err(open_err)?;
        let data = db
            .keyspace(KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(open_err)?;
        Ok(Self {
            db,
            data,
            dir: dir.to_owned(),
            poisoned: OnceLock::new(),
        })
    }

    /// The database directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_poisoned(&self) -> Result<(), StorageError> {
        match self.poisoned.get() {
            Some(_) => Err(self.poisoned_error()),
            None => Ok(()),
        }
    }

    fn poisoned_error(&self) -> StorageError {
        StorageError::Poisoned {
            engine: NAME.to_owned(),
            cause: self.poisoned.get().cloned().unwrap_or_default(),
        }
    }

    /// Maps a failed write-path call (`apply` or `sync`) and poisons the engine.
    ///
    /// fjall poisons its database on a failed journal write or persist and from then on only
    /// says "Poisoned"; remembering the first real cause keeps the error actionable. The call
    /// that failed first returns the underlying I/O error, later ones the poisoned error.
    fn fatal(&self, op: &'static str, e: fjall::Error) -> StorageError {
        // `OnceLock::set` fails if an earlier failure is already recorded: the first cause
        // is the one worth reporting, so losing that race is fine.
        match e {
            fjall::Error::Poisoned => {
                let _ = self
                    .poisoned
                    .set(format!("fjall reported the database poisoned during {op}"));
                self.poisoned_error()
            }
            other => {
                let message = other.to_string();
                let _ = self.poisoned.set(format!("{op} failed: {message}"));
                io_error(op, message)
            }
        }
    }
}

fn io_error(op: &'static str, message: String) -> StorageError {
    StorageError::Io {
        engine: NAME.to_owned(),
        op,
        message,
    }
}

/// Indexes of the operations that decide the batch's outcome: the last one per key.
///
/// Every record of a fjall batch gets the same sequence number, so two operations on the same
/// key inside one batch tie. fjall 3.1 resolves the tie by insertion order (its memtable
/// replaces equal keys, and journal replay re-inserts in order), but that is an
/// implementation detail, not a documented promise. Applying only the last operation per key
/// gives the contract's in-order semantics without relying on it, for the price of one small
/// hash map per batch.
fn effective_ops(batch: &WriteBatch) -> Vec<&BatchOp> {
    fn key_of(op: &BatchOp) -> &[u8] {
        match op {
            BatchOp::Put { key, .. } | BatchOp::Delete { key } => key,
        }
    }

    let mut last: HashMap<&[u8], usize> = HashMap::with_capacity(batch.ops.len());
    for (i, op) in batch.ops.iter().enumerate() {
        last.insert(key_of(op), i);
    }
    if last.len() == batch.ops.len() {
        // Common case: no key repeats, keep the batch as is.
        return batch.ops.iter().collect();
    }
    batch
        .ops
        .iter()
        .enumerate()
        .filter(|(i, op)| last.get(key_of(op)) == Some(i))
        .map(|(_, op)| op)
        .collect()
}

impl StorageEngine for FjallEngine {
    fn name(&self) -> &str {
        NAME
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.data
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| io_error("get", e.to_string()))
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        self.check_poisoned()?;
        if batch.is_empty() {
            return Ok(());
        }
        // Explicit Buffer durability: hand the record to the OS, never fsync here (the
        // group-commit syncer does that for many batches at once).
        let mut fjall_batch = self.db.batch().durability(Some(PersistMode::Buffer));
        for op in effective_ops(batch) {
            match op {
                BatchOp::Put { key, value } => {
                    fjall_batch.insert(&self.data, key.as_slice(), value.as_slice())
                }
                BatchOp::Delete { key } => fjall_batch.remove(&self.data, key.as_slice()),
            }
        }
        fjall_batch.commit().map_err(|e| self.fatal("apply", e))
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.check_poisoned()?;
        self.db
            .persist(PersistMode::SyncData)
            .map_err(|e| self.fatal("sync", e))
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        // Inverted ranges are empty by contract; don't hand them to the tree.
        if limit == 0 || end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        // The iterator reads from one snapshot, so a scan never shows part of a batch.
        let iter = self.data.range::<&[u8], _>((Bound::Included(start), upper));
        let mut out = Vec::with_capacity(limit.min(1024));
        for guard in iter.take(limit) {
            let (k, v) = guard
                .into_inner()
                .map_err(|e| io_error("scan", e.to_string()))?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}
