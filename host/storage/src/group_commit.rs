//! Group commit: many writers, few fsyncs.
//!
//! [`Store::write`] applies the writer's batch right away (on the caller's task: an apply is
//! an in-memory insert plus a buffered journal write, microseconds) and, for
//! [`Durability::Sync`], queues a oneshot sender and awaits it. One dedicated thread,
//! `quiver-syncer`, loops: it takes *every* queued waiter, calls the engine's `sync` once and
//! answers all of them with the result. While that fsync runs, new writers queue up and are
//! served together by the next one, so the number of fsyncs adapts to the load by itself:
//! one per write when idle, one per hundreds of writes under pressure, with no timer.
//!
//! Correctness: a waiter is queued only after its batch was applied, and the syncer takes
//! waiters before calling `sync`, so the fsync that answers a writer always started after
//! that writer's apply completed, which is what makes the acknowledgement honest.
//!
//! Failure: if a sync fails, every waiter of that round gets the error and the store is
//! poisoned: the kernel may have dropped the dirty pages it failed to write, so nothing
//! applied since the last good sync can be called durable any more. Later writes (of either
//! durability) and flushes fail at once with [`StorageError::Poisoned`] and are not applied.
//! The node must restart; the engine then recovers from what is really on disk.
//!
//! fsyncs never run on the tokio runtime: only the syncer thread calls `sync`.

use std::mem;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use quiver_core::storage::{StorageEngine, StorageError, WriteBatch};
use tokio::sync::oneshot;

use super::{Durability, KvPairs};

/// Default group-commit window. Measured with `quiver bench --workload write --clients 32` on
/// 2 cores (sync puts/s): window 0 → 15.2 k, 500 µs → 18.7 k, 1 ms → 19.9-22.9 k, 2 ms → 18.2 k;
/// a single client's p50 stayed ~270 µs throughout, because the window only delays a round
/// while fewer writers than last time have queued.
pub const GROUP_COMMIT_WINDOW_DEFAULT: Duration = Duration::from_millis(1);

/// What a waiter is told once its sync round is over.
type SyncResult = Result<(), StorageError>;

/// A storage engine behind group commit. Cheap to clone; all clones share one engine and one
/// syncer thread, which exits when the last clone is dropped. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Counters for benchmarks and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Engine `sync` calls made by the syncer (successful or not).
    pub syncs: u64,
    /// [`Durability::Sync`] writes acknowledged after a successful sync.
    pub synced_writes: u64,
    /// Writers and flushes queued right now for a sync that has not started yet.
    pub waiting: u64,
}

impl StoreStats {
    /// Synced writes per sync: the group-commit ratio (0 before the first sync).
    pub fn writes_per_sync(&self) -> f64 {
        if self.syncs == 0 {
            0.0
        } else {
            // Precision loss only past 2^53 writes; irrelevant for a ratio.
            #[allow(clippy::cast_precision_loss)]
            let ratio = self.synced_writes as f64 / self.syncs as f64;
            ratio
        }
    }
}

/// Owned by the [`Store`] clones; dropping it stops and joins the syncer.
#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    default_durability: Durability,
    syncer: Option<JoinHandle<()>>,
}

/// What the [`Store`] and its syncer thread share. The syncer holds only this, not
/// [`Inner`], so that dropping the last `Store` is what tells it to stop.
#[derive(Debug)]
struct Shared {
    engine: Arc<dyn StorageEngine>,
    state: Mutex<State>,
    /// Signalled when a waiter is queued or shutdown is requested.
    wake: Condvar,
    syncs: AtomicU64,
    synced_writes: AtomicU64,
    /// Longest the syncer holds a round open for writers of the previous round to return.
    window: Duration,
}

#[derive(Debug, Default)]
struct State {
    waiters: Vec<Waiter>,
    /// Set once a sync failed (or the syncer could not start); never cleared.
    poisoned: Option<String>,
    shutdown: bool,
}

#[derive(Debug)]
struct Waiter {
    reply: oneshot::Sender<SyncResult>,
    /// False for [`Store::flush`], which waits for a sync but wrote nothing.
    is_write: bool,
}

impl Shared {
    /// Locks the state. Nothing panics while holding this lock (only `Vec` pushes/takes and
    /// flag updates), and the state stays consistent even if something did, so a poisoned
    /// lock is recovered rather than turned into an error.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn poisoned_error(&self, cause: &str) -> StorageError {
        StorageError::Poisoned {
            engine: self.engine.name().to_owned(),
            cause: cause.to_owned(),
        }
    }

    /// Fails if the store is poisoned.
    fn check(&self) -> Result<(), StorageError> {
        match &self.lock().poisoned {
            Some(cause) => Err(self.poisoned_error(cause)),
            None => Ok(()),
        }
    }

    /// Queues a waiter for the next sync round, unless the store is poisoned. Checking under
    /// the same lock the syncer poisons under means no waiter is queued after the failure
    /// and left unanswered.
    fn enqueue(&self, is_write: bool) -> Result<oneshot::Receiver<SyncResult>, StorageError> {
        let (reply, rx) = oneshot::channel();
        {
            let mut state = self.lock();
            if let Some(cause) = &state.poisoned {
                return Err(self.poisoned_error(cause));
            }
            state.waiters.push(Waiter { reply, is_write });
        }
        self.wake.notify_one();
        Ok(rx)
    }

    /// The syncer thread's loop.
    fn run_syncer(&self) {
        // Size of the previous round: under a steady load the same writers come back after
        // their acknowledgement's round trip, so the syncer holds the next round open until
        // as many have queued again (or the window closes). Without this, a sync starts the
        // moment the first straggler returns and rounds shrink to a writer or two. A lone
        // writer (previous round of 1) never waits.
        let mut previous_round = 0usize;
        loop {
            let round = {
                let mut state = self.lock();
                while state.waiters.is_empty() && !state.shutdown {
                    state = self
                        .wake
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if !self.window.is_zero() && state.waiters.len() < previous_round {
                    let deadline = Instant::now() + self.window;
                    while state.waiters.len() < previous_round && !state.shutdown {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        state = self
                            .wake
                            .wait_timeout(state, deadline - now)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                }
                previous_round = state.waiters.len();
                if state.waiters.is_empty() {
                    // Shutdown with nobody waiting. (Waiters borrow a `Store`, so at
                    // shutdown there are none; the check keeps the loop obviously safe.)
                    return;
                }
                let round = mem::take(&mut state.waiters);
                if let Some(cause) = &state.poisoned {
                    // Queued while the failing sync ran: another sync could not make their
                    // batches trustworthy, so don't issue one.
                    let cause = cause.clone();
                    drop(state);
                    for waiter in round {
                        let _ = waiter.reply.send(Err(self.poisoned_error(&cause)));
                    }
                    continue;
                }
                round
            };
            self.sync_round(round);
        }
    }

    /// One `sync` for every waiter of the round.
    fn sync_round(&self, round: Vec<Waiter>) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        // A panicking engine must not kill the syncer: queued writers would then wait
        // forever. Treat a panic as a failed sync.
        let result =
            catch_unwind(AssertUnwindSafe(|| self.engine.sync())).unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Err(StorageError::Io {
                    engine: self.engine.name().to_owned(),
                    op: "sync",
                    message: format!("engine panicked: {what}"),
                })
            });
        match result {
            Ok(()) => {
                let writes = round.iter().filter(|w| w.is_write).count();
                self.synced_writes
                    .fetch_add(writes as u64, Ordering::Relaxed);
                for waiter in round {
                    // The writer may have given up (its future was dropped); nothing to do.
                    let _ = waiter.reply.send(Ok(()));
                }
            }
            Err(e) => {
                let cause = e.to_string();
                tracing::error!(
                    engine = self.engine.name(),
                    error = %cause,
                    waiters = round.len(),
                    "storage sync failed; the store is poisoned and refuses writes until restart"
                );
                {
                    let mut state = self.lock();
                    if state.poisoned.is_none() {
                        state.poisoned = Some(cause);
                    }
                }
                for waiter in round {
                    let _ = waiter.reply.send(Err(copy_error(&e)));
                }
            }
        }
    }
}

/// [`StorageError`] is not `Clone` (it is `#[non_exhaustive]` and owned by the core crate),
/// but every waiter of a failed round deserves the full error.
fn copy_error(e: &StorageError) -> StorageError {
    match e {
        StorageError::Io {
            engine,
            op,
            message,
        } => StorageError::Io {
            engine: engine.clone(),
            op,
            message: message.clone(),
        },
        StorageError::Poisoned { engine, cause } => StorageError::Poisoned {
            engine: engine.clone(),
            cause: cause.clone(),
        },
        StorageError::Corrupt {
            engine,
            key_hex,
            message,
        } => StorageError::Corrupt {
            engine: engine.clone(),
            key_hex: key_hex.clone(),
            message: message.clone(),
        },
        StorageError::Closed { engine } => StorageError::Closed {
            engine: engine.clone(),
        },
        // A variant added later: keep its text.
        other => StorageError::Io {
            engine: String::new(),
            op: "sync",
            message: other.to_string(),
        },
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_one();
        if let Some(handle) = self.syncer.take() {
            // Joining waits for at most the sync in progress. It makes shutdown
            // deterministic: once the last `Store` is gone, the syncer no longer holds the
            // engine, so e.g. a fjall directory can be reopened at once.
            if handle.join().is_err() {
                tracing::error!("the storage syncer thread panicked");
            }
        }
    }
}

impl Store {
    /// Wraps `engine` and starts its syncer thread. `default_durability` is what
    /// [`Store::write_default`] uses (the node's configured durability).
    ///
    /// If the thread cannot be started (the OS refused), the store is returned poisoned:
    /// every write fails with an error saying why, rather than hanging or panicking.
    pub fn new(engine: Arc<dyn StorageEngine>, default_durability: Durability) -> Store {
        Self::with_window(engine, default_durability, GROUP_COMMIT_WINDOW_DEFAULT)
    }

    /// Like [`Store::new`] with an explicit group-commit window: the longest a sync round is
    /// held open for the writers of the previous round to queue again (zero: never wait).
    pub fn with_window(
        engine: Arc<dyn StorageEngine>,
        default_durability: Durability,
        window: Duration,
    ) -> Store {
        let shared = Arc::new(Shared {
            window,
            engine,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            syncs: AtomicU64::new(0),
            synced_writes: AtomicU64::new(0),
        });
        let for_thread = Arc::clone(&shared);
        let syncer = match std::thread::Builder::new()
            .name("quiver-syncer".to_owned())
            .spawn(move || for_thread.run_syncer())
        {
            Ok(handle) => Some(handle),
            Err(e) => {
                let cause = format!("could not start the syncer thread: {e}");
                tracing::error!(engine = shared.engine.name(), error = %cause, "storage store unusable");
                shared.lock().poisoned = Some(cause);
                None
            }
        };
        Store {
            inner: Arc::new(Inner {
                shared,
                default_durability,
                syncer,
            }),
        }
    }

    /// The engine's short name ("fjall", "memory", ...).
    pub fn engine_name(&self) -> &str {
        self.inner.shared.engine.name()
    }

    /// The node's default durability, given at construction.
    pub fn default_durability(&self) -> Durability {
        self.inner.default_durability
    }

    /// Reads one key. Reads stay allowed on a poisoned store: what the engine serves was
    /// applied, and refusing reads would only make the node less available.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.shared.engine.get(key)
    }

    /// Pairs with `start <= key < end` in ascending order, at most `limit` of them.
    pub fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<KvPairs, StorageError> {
        self.inner.shared.engine.scan(start, end, limit)
    }

    /// Applies `batch` atomically. With [`Durability::Sync`], returns only once an engine
    /// sync that started after the apply has succeeded; with [`Durability::Buffered`], as
    /// soon as the batch is applied.
    ///
    /// On a poisoned store, fails with [`StorageError::Poisoned`] without applying anything.
    /// If the future is dropped while waiting, the batch stays applied but unacknowledged.
    pub async fn write(
        &self,
        batch: WriteBatch,
        durability: Durability,
    ) -> Result<(), StorageError> {
        let shared = &self.inner.shared;
        shared.check()?;
        shared.engine.apply(&batch)?;
        match durability {
            Durability::Buffered => Ok(()),
            Durability::Sync => self.wait_for_sync(true).await,
        }
    }

    /// First half of [`Store::write`]: applies `batch` atomically without waiting for
    /// durability. Callers that must serialise a read-modify-write under a lock apply under
    /// the lock and then call [`Store::sync_applied`] outside it, so concurrent writers of
    /// the same key still share fsyncs.
    pub fn apply(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        let shared = &self.inner.shared;
        shared.check()?;
        shared.engine.apply(batch)
    }

    /// Second half of [`Store::write`] with [`Durability::Sync`]: returns once an engine sync
    /// that started after this call has succeeded, so every batch applied before the call is
    /// durable.
    pub async fn sync_applied(&self) -> Result<(), StorageError> {
        self.wait_for_sync(true).await
    }

    /// [`Store::write`] with the node's default durability.
    pub async fn write_default(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.write(batch, self.inner.default_durability).await
    }

    /// Makes everything applied so far durable (e.g. buffered writes at graceful shutdown).
    /// Shares the sync round with concurrent writers.
    pub async fn flush(&self) -> Result<(), StorageError> {
        self.wait_for_sync(false).await
    }

    /// Counters since the store was created.
    pub fn stats(&self) -> StoreStats {
        let shared = &self.inner.shared;
        let waiting = shared.lock().waiters.len() as u64;
        StoreStats {
            syncs: shared.syncs.load(Ordering::Relaxed),
            synced_writes: shared.synced_writes.load(Ordering::Relaxed),
            waiting,
        }
    }

    async fn wait_for_sync(&self, is_write: bool) -> Result<(), StorageError> {
        let shared = &self.inner.shared;
        let rx = shared.enqueue(is_write)?;
        match rx.await {
            Ok(result) => result,
            // The syncer answers every waiter it takes and only exits once no `Store` (hence
            // no waiter) is left, so this is unreachable short of a bug; fail, don't hang.
            Err(_) => Err(StorageError::Closed {
                engine: shared.engine.name().to_owned(),
            }),
        }
    }
}

/// A `Store` is itself an engine, so code written against [`StorageEngine`] alone (the
/// node's sans-IO core) runs over it in production and over a simulated disk in the
/// simulator. Reads and applies go through the store's poison check; callers that need
/// durability ask the store's group commit ([`Store::sync_applied`]) rather than calling
/// [`StorageEngine::sync`], which is a direct fsync kept for completeness and, like a
/// group-commit round, poisons the store when it fails.
impl StorageEngine for Store {
    fn name(&self) -> &str {
        self.engine_name()
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Store::get(self, key)
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        Store::apply(self, batch)
    }

    fn sync(&self) -> Result<(), StorageError> {
        let shared = &self.inner.shared;
        shared.check()?;
        shared.engine.sync().inspect_err(|e| {
            shared.lock().poisoned = Some(format!("sync failed: {e}"));
        })
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<KvPairs, StorageError> {
        Store::scan(self, start, end, limit)
    }
}
