//! Storage engines and group commit: conformance, fjall recovery, sync sharing and poisoning.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_core::storage::{StorageEngine, StorageError, WriteBatch};
use quiver_storage::{
    Durability, EngineKind, FjallEngine, MemoryEngine, Store, StoreStats, conformance, open_engine,
};
use tempfile::TempDir;

fn batch_put(key: &[u8], value: &[u8]) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch.put(key, value);
    batch
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("build tokio runtime")
}

/// Polls `cond` until it holds; panics after a generous deadline instead of hanging. This
/// waits for a state the test has caused, it does not guess how long something takes.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------------------
// Conformance

#[test]
fn memory_engine_conforms() {
    conformance::run_all(&mut || Arc::new(MemoryEngine::new()));
}

#[test]
fn fjall_engine_conforms() {
    // The directories must outlive the engines: keep them until the suite is done.
    let mut dirs = Vec::new();
    conformance::run_all(&mut || {
        let dir = tempfile::tempdir().expect("create temp dir");
        let engine = FjallEngine::open(dir.path()).expect("open fjall");
        dirs.push(dir);
        Arc::new(engine)
    });
}

#[test]
fn open_engine_opens_each_kind() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let fjall = open_engine(EngineKind::Fjall, &dir.path().join("fjall")).expect("open fjall");
    assert_eq!(fjall.name(), "fjall");
    let memory = open_engine(EngineKind::Memory, dir.path()).expect("open memory");
    assert_eq!(memory.name(), "memory");
}

// ---------------------------------------------------------------------------------------
// fjall recovery

fn round_key(round: u32, i: u32) -> Vec<u8> {
    format!("r{round:03}/k{i:04}").into_bytes()
}

/// Like fjall's own `*_recover` tests: write, sync, drop, reopen, verify, several rounds,
/// with overwrites and deletes of earlier rounds' keys so recovery must order them right.
#[test]
fn fjall_recovers_synced_data_across_reopens() {
    let dir = tempfile::tempdir().expect("create temp dir");
    const ROUNDS: u32 = 5;
    const PER_ROUND: u32 = 200;
    for round in 0..ROUNDS {
        {
            let engine = FjallEngine::open(dir.path()).expect("open fjall");
            // Everything from earlier rounds is back.
            for earlier in 0..round {
                verify_round(&engine, earlier, round);
            }
            let mut batch = WriteBatch::new();
            for i in 0..PER_ROUND {
                batch.put(round_key(round, i), format!("v{round}/{i}").into_bytes());
            }
            if round > 0 {
                // Overwrite and delete some keys of the previous round.
                batch.put(round_key(round - 1, 0), b"overwritten".to_vec());
                batch.delete(round_key(round - 1, 1));
            }
            // In-batch order must survive journal replay too.
            batch.put(format!("ptd{round}").into_bytes(), b"x".to_vec());
            batch.delete(format!("ptd{round}").into_bytes());
            batch.delete(format!("dtp{round}").into_bytes());
            batch.put(format!("dtp{round}").into_bytes(), b"y".to_vec());
            engine.apply(&batch).expect("apply round batch");
            // A large value too, to cross the journal's compression threshold.
            engine
                .apply(&batch_put(
                    format!("big{round}").as_bytes(),
                    &vec![round as u8; 256 * 1024],
                ))
                .expect("apply big value");
            engine.sync().expect("sync round");
        }
        // Dropped: the next iteration reopens the same directory.
    }
    let engine = FjallEngine::open(dir.path()).expect("final reopen");
    for round in 0..ROUNDS {
        verify_round(&engine, round, ROUNDS);
        assert_eq!(
            engine
                .get(format!("big{round}").as_bytes())
                .expect("get big"),
            Some(vec![round as u8; 256 * 1024]),
            "large value of round {round} after reopen"
        );
    }
    let all = engine
        .scan(b"r", Some(b"s"), usize::MAX)
        .expect("scan all rounds");
    assert_eq!(
        all.len(),
        (ROUNDS * PER_ROUND - (ROUNDS - 1)) as usize,
        "one deleted key per later round"
    );
}

/// Checks round `round`'s keys as they should look once rounds `..now` have run.
fn verify_round(engine: &FjallEngine, round: u32, now: u32) {
    let touched_later = round + 1 < now;
    for i in 0..200 {
        let got = engine.get(&round_key(round, i)).expect("get after reopen");
        let expected = match i {
            0 if touched_later => Some(b"overwritten".to_vec()),
            1 if touched_later => None,
            _ => Some(format!("v{round}/{i}").into_bytes()),
        };
        assert_eq!(
            got, expected,
            "round {round} key {i} after reopen (now at round {now})"
        );
    }
}

/// Data written through a `Store` with `Sync` durability is on disk once the write returns,
/// and dropping the last `Store` releases the engine so the directory can be reopened.
#[test]
fn store_sync_writes_survive_reopen() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let rt = runtime();
    {
        let engine: Arc<dyn StorageEngine> =
            Arc::new(FjallEngine::open(dir.path()).expect("open fjall"));
        let store = Store::new(Arc::clone(&engine), Durability::Sync);
        rt.block_on(async {
            for i in 0..20u8 {
                store
                    .write_default(batch_put(&[b'k', i], &[i]))
                    .await
                    .expect("sync write");
            }
            store
                .write(batch_put(b"buffered", b"b"), Durability::Buffered)
                .await
                .expect("buffered write");
            store.flush().await.expect("flush");
        });
        drop(store);
        assert_eq!(
            Arc::strong_count(&engine),
            1,
            "dropping the last Store must release the engine (syncer exited)"
        );
    }
    let engine = FjallEngine::open(dir.path()).expect("reopen fjall");
    for i in 0..20u8 {
        assert_eq!(
            engine.get(&[b'k', i]).expect("get"),
            Some(vec![i]),
            "synced write {i} after reopen"
        );
    }
    assert_eq!(
        engine.get(b"buffered").expect("get"),
        Some(b"b".to_vec()),
        "flushed buffered write after reopen"
    );
}

// ---------------------------------------------------------------------------------------
// Test engines

/// Delegates to a [`MemoryEngine`], counting syncs; the first sync can be held until the
/// test releases it, and syncs can be made to fail.
#[derive(Debug)]
struct TestEngine {
    inner: MemoryEngine,
    syncs: AtomicUsize,
    /// When set, the first sync reports on `entered` and waits on `release`.
    hold_first_sync: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
    fail_syncs: bool,
}

impl TestEngine {
    fn new() -> Self {
        Self {
            inner: MemoryEngine::new(),
            syncs: AtomicUsize::new(0),
            hold_first_sync: Mutex::new(None),
            fail_syncs: false,
        }
    }

    fn failing() -> Self {
        Self {
            fail_syncs: true,
            ..Self::new()
        }
    }

    /// Returns (receiver told when the first sync has started, sender that releases it).
    fn holding_first_sync() -> (Self, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let engine = Self {
            hold_first_sync: Mutex::new(Some((entered_tx, release_rx))),
            ..Self::new()
        };
        (engine, entered_rx, release_tx)
    }

    fn syncs(&self) -> usize {
        self.syncs.load(Ordering::SeqCst)
    }
}

impl StorageEngine for TestEngine {
    fn name(&self) -> &str {
        "test"
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(key)
    }
    fn apply(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        self.inner.apply(batch)
    }
    fn sync(&self) -> Result<(), StorageError> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        let hold = self.hold_first_sync.lock().expect("hold lock").take();
        if let Some((entered, release)) = hold {
            entered.send(()).expect("test waits for the first sync");
            release.recv().expect("test releases the first sync");
        }
        if self.fail_syncs {
            return Err(StorageError::Io {
                engine: "test".into(),
                op: "sync",
                message: "injected EIO".into(),
            });
        }
        self.inner.sync()
    }
    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        self.inner.scan(start, end, limit)
    }
}

// ---------------------------------------------------------------------------------------
// Group commit

/// 64 concurrent Sync writers share fsyncs. Deterministic: the first sync is held until the
/// other 63 writers are all queued, then released, so exactly two syncs answer all 64.
#[test]
fn concurrent_sync_writes_share_syncs() {
    const WRITERS: usize = 64;
    let (engine, entered, release) = TestEngine::holding_first_sync();
    let engine = Arc::new(engine);
    let store = Store::new(
        Arc::clone(&engine) as Arc<dyn StorageEngine>,
        Durability::Sync,
    );
    let rt = runtime();

    let first = rt.spawn({
        let store = store.clone();
        async move {
            store
                .write(batch_put(b"first", b"0"), Durability::Sync)
                .await
        }
    });
    entered
        .recv_timeout(Duration::from_secs(30))
        .expect("the first sync starts");

    let others: Vec<_> = (1..WRITERS)
        .map(|i| {
            let store = store.clone();
            rt.spawn(async move {
                let key = format!("w{i:02}");
                store
                    .write(batch_put(key.as_bytes(), b"v"), Durability::Sync)
                    .await
            })
        })
        .collect();
    // While the first sync is held, every other writer applies and queues up.
    wait_until("63 writers queued behind the held sync", || {
        store.stats().waiting == (WRITERS - 1) as u64
    });
    release.send(()).expect("release the first sync");

    rt.block_on(async {
        first
            .await
            .expect("join first writer")
            .expect("first write succeeds");
        for handle in others {
            handle.await.expect("join writer").expect("write succeeds");
        }
    });
    let stats = store.stats();
    assert_eq!(
        stats.synced_writes, WRITERS as u64,
        "every write was synced: {stats:?}"
    );
    assert!(
        stats.syncs <= 2,
        "64 writers must share syncs (one held + one for the queue): {stats:?}"
    );
    assert!(stats.syncs < WRITERS as u64, "{stats:?}");
    assert_eq!(
        engine.syncs() as u64,
        stats.syncs,
        "stats count engine syncs"
    );
    assert_eq!(stats.waiting, 0);
    assert!(stats.writes_per_sync() >= 32.0, "{stats:?}");
    for i in 1..WRITERS {
        assert!(
            engine
                .get(format!("w{i:02}").as_bytes())
                .expect("get")
                .is_some(),
            "write {i} applied"
        );
    }
}

/// Many writers without a held sync: all succeed and no write is left waiting, whatever the
/// interleaving (the sharing itself is proven deterministically above).
#[test]
fn concurrent_sync_writes_all_complete() {
    let engine = Arc::new(TestEngine::new());
    let store = Store::new(
        Arc::clone(&engine) as Arc<dyn StorageEngine>,
        Durability::Sync,
    );
    let rt = runtime();
    rt.block_on(async {
        let handles: Vec<_> = (0..256u32)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write(batch_put(&i.to_be_bytes(), b"v"), Durability::Sync)
                        .await
                })
            })
            .collect();
        for h in handles {
            h.await.expect("join").expect("write");
        }
    });
    let stats = store.stats();
    assert_eq!(stats.synced_writes, 256, "{stats:?}");
    assert!(stats.syncs >= 1 && stats.syncs <= 256, "{stats:?}");
}

/// A failed sync fails its writers, then poisons the store: the next write fails with
/// Poisoned without being applied, for either durability, and so does flush.
#[test]
fn failed_sync_poisons_the_store() {
    let engine = Arc::new(TestEngine::failing());
    let store = Store::new(
        Arc::clone(&engine) as Arc<dyn StorageEngine>,
        Durability::Sync,
    );
    let rt = runtime();
    rt.block_on(async {
        let err = store.write(batch_put(b"a", b"1"), Durability::Sync).await.expect_err("sync fails");
        assert!(matches!(&err, StorageError::Io { op: "sync", message, .. } if message.contains("injected EIO")), "{err:?}");

        let err = store.write(batch_put(b"b", b"2"), Durability::Sync).await.expect_err("store is poisoned");
        match &err {
            StorageError::Poisoned { engine, cause } => {
                assert_eq!(engine, "test");
                assert!(cause.contains("injected EIO"), "the cause names the first failure: {cause}");
            }
            other => panic!("expected Poisoned, got {other:?}"),
        }
        assert_eq!(engine.get(b"b").expect("get"), None, "a write refused by a poisoned store must not be applied");

        let err = store.write(batch_put(b"c", b"3"), Durability::Buffered).await.expect_err("buffered too");
        assert!(matches!(err, StorageError::Poisoned { .. }), "{err:?}");
        assert_eq!(engine.get(b"c").expect("get"), None, "buffered write on a poisoned store must not be applied");

        let err = store.flush().await.expect_err("flush on a poisoned store");
        assert!(matches!(err, StorageError::Poisoned { .. }), "{err:?}");
    });
    assert_eq!(engine.syncs(), 1, "no sync after poisoning");
    // Reads keep working.
    assert_eq!(store.get(b"a").expect("get"), Some(b"1".to_vec()));
    assert_eq!(
        store.stats(),
        StoreStats {
            syncs: 1,
            synced_writes: 0,
            waiting: 0
        }
    );
}

/// Every writer of a failed round gets the sync's error; writers that queued while it ran
/// get Poisoned, and no further sync is attempted for them.
#[test]
fn writers_queued_behind_a_failed_sync_get_poisoned() {
    let (engine, entered, release) = TestEngine::holding_first_sync();
    let engine = Arc::new(TestEngine {
        fail_syncs: true,
        ..engine
    });
    let store = Store::new(
        Arc::clone(&engine) as Arc<dyn StorageEngine>,
        Durability::Sync,
    );
    let rt = runtime();
    let first = rt.spawn({
        let store = store.clone();
        async move { store.write(batch_put(b"w0", b"v"), Durability::Sync).await }
    });
    entered
        .recv_timeout(Duration::from_secs(30))
        .expect("first sync starts");
    let others: Vec<_> = (1..=8u8)
        .map(|i| {
            let store = store.clone();
            rt.spawn(async move {
                store
                    .write(batch_put(&[b'w', i], b"v"), Durability::Sync)
                    .await
            })
        })
        .collect();
    wait_until("8 writers queued behind the held sync", || {
        store.stats().waiting == 8
    });
    release.send(()).expect("release the first sync");
    rt.block_on(async {
        let err = first
            .await
            .expect("join")
            .expect_err("the failed round's writer fails");
        assert!(
            matches!(err, StorageError::Io { op: "sync", .. }),
            "{err:?}"
        );
        for h in others {
            let err = h.await.expect("join").expect_err("queued writers fail");
            assert!(matches!(err, StorageError::Poisoned { .. }), "{err:?}");
        }
    });
    assert_eq!(engine.syncs(), 1, "no sync is attempted once poisoned");
    assert_eq!(store.stats().waiting, 0, "nobody left waiting");
}

/// Buffered writes never call sync; flush does, once.
#[test]
fn buffered_writes_do_not_sync() {
    let engine = Arc::new(TestEngine::new());
    let store = Store::new(
        Arc::clone(&engine) as Arc<dyn StorageEngine>,
        Durability::Buffered,
    );
    assert_eq!(store.default_durability(), Durability::Buffered);
    assert_eq!(store.engine_name(), "test");
    let rt = runtime();
    rt.block_on(async {
        for i in 0..100u8 {
            store
                .write(batch_put(&[i], &[i]), Durability::Buffered)
                .await
                .expect("buffered write");
        }
        store
            .write_default(batch_put(b"default", b"d"))
            .await
            .expect("default (buffered) write");
    });
    assert_eq!(engine.syncs(), 0, "buffered writes must not sync");
    assert_eq!(
        store.stats(),
        StoreStats {
            syncs: 0,
            synced_writes: 0,
            waiting: 0
        }
    );
    assert_eq!(
        store
            .scan(&[0], Some(&[100]), usize::MAX)
            .expect("scan")
            .len(),
        100,
        "buffered writes are applied"
    );
    assert_eq!(store.get(b"default").expect("get"), Some(b"d".to_vec()));

    rt.block_on(store.flush()).expect("flush");
    assert_eq!(engine.syncs(), 1, "flush syncs once");
    assert_eq!(
        store.stats(),
        StoreStats {
            syncs: 1,
            synced_writes: 0,
            waiting: 0
        },
        "a flush is not a write"
    );
}

/// The syncer thread exits when the last clone is dropped, even while idle.
#[test]
fn dropping_the_last_store_stops_the_syncer() {
    let engine: Arc<dyn StorageEngine> = Arc::new(MemoryEngine::new());
    let store = Store::new(Arc::clone(&engine), Durability::Sync);
    let clone = store.clone();
    let rt = runtime();
    rt.block_on(clone.write(batch_put(b"k", b"v"), Durability::Sync))
        .expect("write");
    drop(store);
    assert!(
        Arc::strong_count(&engine) > 1,
        "a clone is still alive, so is the syncer"
    );
    drop(clone);
    assert_eq!(
        Arc::strong_count(&engine),
        1,
        "the syncer released the engine: it has exited"
    );
}

/// Fjall engines can be dropped while their directory is still around and reopened at once
/// (no leaked lock); keep the TempDir alive until the end.
#[test]
fn fjall_reopen_after_store_drop_is_immediate() {
    let dir: TempDir = tempfile::tempdir().expect("create temp dir");
    let rt = runtime();
    for round in 0..3u8 {
        let engine: Arc<dyn StorageEngine> =
            Arc::new(FjallEngine::open(dir.path()).expect("open fjall"));
        let store = Store::new(engine, Durability::Sync);
        rt.block_on(store.write(batch_put(&[round], &[round]), Durability::Sync))
            .expect("write");
        for earlier in 0..=round {
            assert_eq!(
                store.get(&[earlier]).expect("get"),
                Some(vec![earlier]),
                "round {round} sees {earlier}"
            );
        }
    }
}

/// The split API (apply under a caller's lock, then sync outside it) gives the same
/// guarantees as `write`: counted as a synced write, refused once poisoned.
#[test]
fn apply_then_sync_applied() {
    let engine = Arc::new(TestEngine::new());
    let store = Store::new(
        Arc::clone(&engine) as Arc<dyn StorageEngine>,
        Durability::Sync,
    );
    let rt = runtime();
    store.apply(&batch_put(b"k", b"v")).expect("apply");
    assert_eq!(engine.syncs(), 0, "apply alone does not sync");
    rt.block_on(store.sync_applied()).expect("sync_applied");
    assert_eq!(
        store.stats(),
        StoreStats {
            syncs: 1,
            synced_writes: 1,
            waiting: 0
        }
    );

    let failing = Arc::new(TestEngine::failing());
    let store = Store::new(
        Arc::clone(&failing) as Arc<dyn StorageEngine>,
        Durability::Sync,
    );
    store.apply(&batch_put(b"a", b"1")).expect("apply");
    rt.block_on(store.sync_applied()).expect_err("sync fails");
    let err = store.apply(&batch_put(b"b", b"2")).expect_err("poisoned");
    assert!(matches!(err, StorageError::Poisoned { .. }), "{err:?}");
    assert_eq!(
        failing.get(b"b").expect("get"),
        None,
        "refused apply must not reach the engine"
    );
}

/// The group-commit window holds a round open until as many writers as in the previous round
/// have queued again. Deterministic: the window is far longer than the test, so a round can
/// only start early if the window logic is broken.
#[test]
fn sync_round_waits_for_the_previous_rounds_writers() {
    let (engine, entered, release) = TestEngine::holding_first_sync();
    let engine = Arc::new(engine);
    let store = Store::with_window(
        Arc::clone(&engine) as Arc<dyn StorageEngine>,
        Durability::Sync,
        Duration::from_secs(600),
    );
    let rt = runtime();
    let write = |key: &'static str| {
        let store = store.clone();
        rt.spawn(async move {
            store
                .write(batch_put(key.as_bytes(), b"v"), Durability::Sync)
                .await
        })
    };

    // Round 1 = {a}, held; b..e queue behind it and form round 2 (4 writers).
    let a = write("a");
    entered
        .recv_timeout(Duration::from_secs(30))
        .expect("the first sync starts");
    let second: Vec<_> = ["b", "c", "d", "e"].into_iter().map(write).collect();
    wait_until("4 writers queued", || store.stats().waiting == 4);
    release.send(()).expect("release the first sync");
    rt.block_on(async {
        a.await.expect("join").expect("write a");
        for h in second {
            h.await.expect("join").expect("write");
        }
    });
    assert_eq!(engine.syncs(), 2);

    // One writer alone is held until three more arrive: they share one sync.
    let f = write("f");
    wait_until("f queued", || store.stats().waiting == 1);
    assert_eq!(
        engine.syncs(),
        2,
        "the round must stay open for the previous round's writers"
    );
    let rest: Vec<_> = ["g", "h", "i"].into_iter().map(write).collect();
    rt.block_on(async {
        f.await.expect("join").expect("write f");
        for h in rest {
            h.await.expect("join").expect("write");
        }
    });
    assert_eq!(engine.syncs(), 3, "f, g, h and i shared one sync");
}

/// A lone writer is never delayed by the window: with a previous round of one, it syncs at
/// once (the window here would otherwise stall the test for ten minutes).
#[test]
fn a_lone_writer_is_not_held_by_the_window() {
    let engine = Arc::new(TestEngine::new());
    let store = Store::with_window(
        Arc::clone(&engine) as Arc<dyn StorageEngine>,
        Durability::Sync,
        Duration::from_secs(600),
    );
    let rt = runtime();
    rt.block_on(async {
        for i in 0..10u8 {
            store
                .write(batch_put(&[i], b"v"), Durability::Sync)
                .await
                .expect("write");
        }
    });
    assert_eq!(engine.syncs(), 10);
}
