//! A simulated disk that implements the production [`StorageEngine`] contract.
//!
//! [`SimDisk`] is what a simulated node gets instead of fjall: an ordered byte map with
//! atomic batches, whose crash behaviour the simulator controls. It models the same
//! durability as [`crate::store`] (and as production's fjall engine, which hands each batch
//! to the OS and fsyncs only on `sync`), but at the byte-map level, so the production node
//! can run on it unchanged:
//!
//! - [`StorageEngine::apply`] changes the *visible* map at once (readers see it) and queues
//!   the batch as *unsynced*.
//! - [`StorageEngine::sync`] makes every batch applied so far *durable* (the group-commit
//!   fsync; instantaneous here).
//! - [`SimDisk::writeback_prefix`] and [`SimDisk::writeback`] make the oldest unsynced
//!   batches durable without a sync: the OS writing dirty pages back on its own. Durable
//!   data is therefore always the state after some prefix of the applied batches, which is
//!   what makes a power loss keep "a prefix, never part of a batch".
//!
//! # Crashes
//!
//! Each crash ends the current *mount* and returns a fresh handle for the restarted node,
//! which sees exactly what survived:
//!
//! | crash                      | what the restarted node sees                                |
//! |----------------------------|-------------------------------------------------------------|
//! | [`SimDisk::kill`]          | every applied batch (the OS page cache holds them)          |
//! | [`SimDisk::power_loss`]    | the durable part plus a random prefix of unsynced batches   |
//! | [`SimDisk::wipe`]          | nothing: a new, empty disk                                  |
//!
//! # Handles and mounts
//!
//! A `SimDisk` is a cheap [`Clone`]able handle (an `Arc<Mutex<..>>` plus the mount
//! generation it was made for). The simulator keeps one handle per node's disk and gives the
//! node another ([`SimDisk::engine`]) as its `Arc<dyn StorageEngine>`. A crash bumps the
//! disk's generation and returns a handle of the new generation; **every handle of an older
//! generation then fails every call** with [`StorageError::Closed`], so a dead node (or a
//! task of it that is still queued in the simulation) can neither read the restarted node's
//! data nor write into it by accident. This is why crashes take `&self` and return a new
//! handle instead of resetting the disk under existing handles: whoever keeps an old handle
//! is told, not silently served. The simulator must replace its own handle with the one a
//! crash returns; the harness methods below also refuse stale handles, for the same reason.
//!
//! # Faults
//!
//! [`SimDisk::fail_next_sync`] and [`SimDisk::fail_syncs`] make `sync` fail. As in production
//! (`fjall_engine.rs`, "Can applications recover from fsync failures?", ATC '20), the first
//! failure returns [`StorageError::Io`] and poisons the mount: every later `apply` and `sync`
//! fails with [`StorageError::Poisoned`] until the next crash (a restart reopens the disk),
//! while reads keep working. A failed sync makes nothing durable; a later power loss may
//! still keep some of those batches (writeback), a kill keeps all of them. Injected faults
//! belong to the disk, so they outlive a kill or a power loss; a wipe is a new disk and
//! clears them.
//!
//! # Determinism
//!
//! No clock, no thread, no real randomness: the only random choices take the simulator's
//! seeded [`Rng`], and maps are `BTreeMap`s, so the same seed and the same calls give the
//! same disk. Use is meant to be single-threaded; the mutex only makes the handle `Send +
//! Sync` as [`StorageEngine`] requires.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use quiver_core::storage::{BatchOp, KvPairs, StorageEngine, StorageError, WriteBatch};

use crate::rng::Rng;

/// Engine name reported by [`StorageEngine::name`] and in errors.
pub const NAME: &str = "sim-disk";

/// The contents of a disk: keys to values, in key order.
pub type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// Counters of one disk, from [`SimDisk::stats`].
///
/// They count over the disk's whole life across kills and power losses; a wipe (a new disk)
/// starts them again, except `generation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SimDiskStats {
    /// The current mount generation: 0 for a new disk, +1 per crash (wipes included).
    pub generation: u64,
    /// `apply` calls accepted (empty batches included).
    pub applied_batches: u64,
    /// Successful `sync` calls.
    pub syncs: u64,
    /// `sync` calls that failed by injection (not counting later `Poisoned` refusals).
    pub failed_syncs: u64,
    /// Batches made durable by writeback rather than by a sync.
    pub written_back_batches: u64,
    /// Batches lost by power losses (unsynced and not written back in time).
    pub lost_batches: u64,
    /// Batches applied but not yet durable (the ones a power loss may lose).
    pub unsynced_batches: usize,
}

/// The shared state behind every handle of one disk.
#[derive(Default)]
struct State {
    /// Only handles of this generation may use the disk.
    generation: u64,
    /// What readers see: `durable` plus every unsynced batch.
    visible: Map,
    /// What survives a power loss for sure.
    durable: Map,
    /// Non-empty batches applied but not yet durable, oldest first.
    unsynced: VecDeque<WriteBatch>,
    /// Why this mount refuses writes, after a failed sync.
    poisoned: Option<String>,
    /// Injected failures still to hit `sync`.
    fail_next_syncs: u64,
    /// Every `sync` fails while set.
    fail_all_syncs: bool,
    stats: SimDiskStats,
}

impl State {
    /// Moves the `count` oldest unsynced batches (at most all of them) to the durable map.
    fn make_durable(&mut self, count: usize) -> usize {
        let count = count.min(self.unsynced.len());
        for batch in self.unsynced.drain(..count) {
            apply_ops(&mut self.durable, &batch);
        }
        count
    }

    /// Ends the current mount: what is durable is all that is left, and handles of the old
    /// generation go stale.
    fn remount(&mut self) {
        self.stats.lost_batches += self.unsynced.len() as u64;
        self.unsynced.clear();
        self.visible = self.durable.clone();
        self.poisoned = None;
        self.generation += 1;
    }
}

fn apply_ops(map: &mut Map, batch: &WriteBatch) {
    for op in &batch.ops {
        match op {
            BatchOp::Put { key, value } => {
                map.insert(key.clone(), value.clone());
            }
            BatchOp::Delete { key } => {
                map.remove(key.as_slice());
            }
        }
    }
}

/// A handle on a simulated disk; see the [module docs](self).
///
/// Clones share the disk and the mount generation they were made for.
#[derive(Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
    /// The mount this handle belongs to; it is stale once the disk's generation moved on.
    generation: u64,
}

impl fmt::Debug for SimDisk {
    // Not the maps: a disk can hold megabytes, and `Debug` output ends up in panics.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimDisk")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Default for SimDisk {
    fn default() -> Self {
        Self::new()
    }
}

/// A panic while the lock was held may have left part of a batch applied: refuse to serve
/// rather than expose it (as `MemoryEngine` does).
fn lock_poisoned<T>(_: PoisonError<T>) -> StorageError {
    StorageError::Poisoned {
        engine: NAME.to_owned(),
        cause: "a thread panicked while holding the disk lock".to_owned(),
    }
}

fn closed() -> StorageError {
    StorageError::Closed {
        engine: NAME.to_owned(),
    }
}

impl SimDisk {
    /// A new, empty disk, mounted (generation 0).
    pub fn new() -> Self {
        SimDisk {
            state: Arc::new(Mutex::new(State::default())),
            generation: 0,
        }
    }

    /// This handle as the engine a node is given. The engine shares this handle's mount and
    /// goes stale with it.
    pub fn engine(&self) -> Arc<dyn StorageEngine> {
        Arc::new(self.clone())
    }

    /// The mount generation this handle was made for.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True while this handle's mount is the disk's current one (no crash since).
    pub fn is_live(&self) -> bool {
        // A panicked lock still tells the generation; only the maps are suspect.
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.generation == self.generation
    }

    /// Locks the disk for this handle, or fails with [`StorageError::Closed`] when the
    /// handle is stale.
    fn live(&self) -> Result<MutexGuard<'_, State>, StorageError> {
        let state = self.state.lock().map_err(lock_poisoned)?;
        if state.generation != self.generation {
            return Err(closed());
        }
        Ok(state)
    }

    /// A handle of the disk's current generation (after a crash bumped it).
    fn remounted(&self, generation: u64) -> SimDisk {
        SimDisk {
            state: Arc::clone(&self.state),
            generation,
        }
    }

    /// The OS writes back the `count` oldest unsynced batches (all of them if fewer) on its
    /// own, making them durable without a sync. Returns how many it wrote. Works on a
    /// poisoned mount too: writeback is the kernel's business, not the process's.
    pub fn writeback_prefix(&self, count: usize) -> Result<usize, StorageError> {
        let mut state = self.live()?;
        let written = state.make_durable(count);
        state.stats.written_back_batches += written as u64;
        Ok(written)
    }

    /// The OS writes back a random prefix of the unsynced batches (uniformly from none to
    /// all). Returns how many it wrote. Draws one number from `rng` even when nothing is
    /// unsynced, so the simulator's random stream does not depend on the disk's state.
    pub fn writeback(&self, rng: &mut Rng) -> Result<usize, StorageError> {
        let pending = self.live()?.unsynced.len();
        self.writeback_prefix(rng.index(pending + 1))
    }

    /// The process is killed (`kill -9`): every applied batch survives, since the OS holds
    /// it. Returns the handle for the restarted node; this handle and its clones go stale.
    pub fn kill(&self) -> Result<SimDisk, StorageError> {
        let mut state = self.live()?;
        // Whatever was applied is in the page cache, and the page cache outlives a process.
        let pending = state.unsynced.len();
        state.make_durable(pending);
        state.remount();
        Ok(self.remounted(state.generation))
    }

    /// Power is lost: the durable part survives, plus a random prefix (uniformly from none
    /// to all) of the unsynced batches, whatever writeback had got to. A batch is kept whole
    /// or not at all. Returns the handle for the restarted node; this handle and its clones
    /// go stale. Draws exactly one number from `rng`, as [`crate::store::Disk::crash`] does.
    pub fn power_loss(&self, rng: &mut Rng) -> Result<SimDisk, StorageError> {
        let pending = self.live()?.unsynced.len();
        self.power_loss_keeping(rng.index(pending + 1))
    }

    /// [`SimDisk::power_loss`] keeping exactly the `kept` oldest unsynced batches (all of
    /// them if fewer), for tests and scripted scenarios.
    pub fn power_loss_keeping(&self, kept: usize) -> Result<SimDisk, StorageError> {
        let mut state = self.live()?;
        state.make_durable(kept);
        state.remount();
        Ok(self.remounted(state.generation))
    }

    /// The disk is replaced: nothing survives, counters and injected faults included (a new
    /// disk). Returns the handle for the restarted node; this handle and its clones go stale.
    pub fn wipe(&self) -> Result<SimDisk, StorageError> {
        let mut state = self.live()?;
        // Keep counting generations across the wipe: a handle from before it must stay
        // stale, even one whose generation a fresh counter would reach again.
        let generation = state.generation + 1;
        *state = State {
            generation,
            stats: SimDiskStats {
                generation,
                ..SimDiskStats::default()
            },
            ..State::default()
        };
        Ok(self.remounted(generation))
    }

    /// The next `sync` that reaches the disk fails (and poisons the mount). Calls add up:
    /// two calls fail two syncs (the second one on a later mount, since the first poisons
    /// this one and a poisoned mount refuses syncs before they reach the disk).
    pub fn fail_next_sync(&self) -> Result<(), StorageError> {
        self.live()?.fail_next_syncs += 1;
        Ok(())
    }

    /// While `fail` is set, every `sync` that reaches the disk fails (a dying disk).
    pub fn fail_syncs(&self, fail: bool) -> Result<(), StorageError> {
        self.live()?.fail_all_syncs = fail;
        Ok(())
    }

    /// The counters of this disk.
    pub fn stats(&self) -> Result<SimDiskStats, StorageError> {
        let state = self.live()?;
        Ok(SimDiskStats {
            generation: state.generation,
            unsynced_batches: state.unsynced.len(),
            ..state.stats
        })
    }

    /// Why this mount refuses writes, if a sync failed on it.
    pub fn poisoned(&self) -> Result<Option<String>, StorageError> {
        Ok(self.live()?.poisoned.clone())
    }

    /// A copy of what readers see now.
    pub fn visible_snapshot(&self) -> Result<Map, StorageError> {
        Ok(self.live()?.visible.clone())
    }

    /// A copy of what is durable now (what a power loss that keeps no unsynced batch would
    /// leave).
    pub fn durable_snapshot(&self) -> Result<Map, StorageError> {
        Ok(self.live()?.durable.clone())
    }

    /// Copies of the batches applied but not yet durable, oldest first.
    pub fn unsynced_batches(&self) -> Result<Vec<WriteBatch>, StorageError> {
        Ok(self.live()?.unsynced.iter().cloned().collect())
    }
}

impl StorageEngine for SimDisk {
    fn name(&self) -> &str {
        NAME
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.live()?.visible.get(key).cloned())
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        let mut state = self.live()?;
        if let Some(cause) = &state.poisoned {
            return Err(StorageError::Poisoned {
                engine: NAME.to_owned(),
                cause: cause.clone(),
            });
        }
        state.stats.applied_batches += 1;
        // An empty batch changes nothing; queueing it would only dilute the power-loss and
        // writeback prefix choices.
        if batch.is_empty() {
            return Ok(());
        }
        // Under one lock: readers see the whole batch or none of it.
        apply_ops(&mut state.visible, batch);
        state.unsynced.push_back(batch.clone());
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        let mut state = self.live()?;
        if let Some(cause) = &state.poisoned {
            return Err(StorageError::Poisoned {
                engine: NAME.to_owned(),
                cause: cause.clone(),
            });
        }
        if state.fail_all_syncs || state.fail_next_syncs > 0 {
            state.fail_next_syncs = state.fail_next_syncs.saturating_sub(1);
            state.stats.failed_syncs += 1;
            // Nothing becomes durable: the kernel may have dropped the dirty pages it failed
            // to write, so the process can no longer tell what is on disk. The mount refuses
            // writes from now on, as production's engines do.
            let message = "injected fsync failure".to_owned();
            state.poisoned = Some(format!("sync failed: {message}"));
            return Err(StorageError::Io {
                engine: NAME.to_owned(),
                op: "sync",
                message,
            });
        }
        let pending = state.unsynced.len();
        state.make_durable(pending);
        state.stats.syncs += 1;
        Ok(())
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<KvPairs, StorageError> {
        // Check the handle first: a stale handle fails even on an empty range.
        let state = self.live()?;
        // `BTreeMap::range` panics when start > end; an inverted range is simply empty.
        if limit == 0 || end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(state
            .visible
            .range::<[u8], _>((Bound::Included(start), upper))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}
