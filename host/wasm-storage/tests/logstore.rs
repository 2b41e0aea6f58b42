//! The bundled `logstore` adapter run through `WasmEngine`: the storage conformance suite,
//! recovery across reopens, torn tails, compaction, limits that poison, and the sandbox.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use quiver_core::storage::{StorageEngine, StorageError, WriteBatch};
use quiver_storage::conformance;
use quiver_wasm_storage::{AdapterLimits, WasmEngine, logstore_component};

/// The log file the guest keeps in its data directory.
const LOG_FILE: &str = "quiver.log";

fn open(dir: &Path) -> WasmEngine {
    WasmEngine::open(logstore_component(), dir, &AdapterLimits::default())
        .expect("open the logstore adapter")
}

fn put(e: &dyn StorageEngine, key: &[u8], value: &[u8]) {
    let mut batch = WriteBatch::new();
    batch.put(key, value);
    e.apply(&batch).expect("apply");
}

fn log_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(LOG_FILE))
        .expect("stat the log")
        .len()
}

fn append_to_log(dir: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.join(LOG_FILE))
        .expect("open the log for appending");
    f.write_all(bytes).expect("append to the log");
    f.sync_all().expect("sync the log");
}

#[test]
fn logstore_passes_the_storage_conformance_suite() {
    let mut dirs = Vec::new();
    conformance::run_all(&mut || {
        let dir = tempfile::tempdir().expect("create temp dir");
        let engine = open(dir.path());
        dirs.push(dir);
        Arc::new(engine)
    });
}

#[test]
fn name_says_wasm_and_the_adapter() {
    let dir = tempfile::tempdir().expect("create temp dir");
    assert_eq!(open(dir.path()).name(), "wasm:logstore");
}

fn round_key(round: u32, i: u32) -> Vec<u8> {
    format!("r{round:03}/k{i:04}").into_bytes()
}

/// Write, sync, drop, reopen, verify; several rounds, with overwrites and deletes of earlier
/// rounds' keys so the replay must apply records in order.
#[test]
fn synced_data_survives_reopen() {
    let dir = tempfile::tempdir().expect("create temp dir");
    const ROUNDS: u32 = 4;
    const PER_ROUND: u32 = 100;
    for round in 0..ROUNDS {
        let engine = open(dir.path());
        // Everything earlier rounds left must be there, as they left it.
        for earlier in 0..round {
            for i in 0..PER_ROUND {
                let got = engine.get(&round_key(earlier, i)).expect("get");
                let expected = if i % 10 == 0 && earlier + 1 < round {
                    None // deleted by the round after it
                } else if i % 2 == 0 && earlier + 1 < round {
                    Some(format!("over{}", earlier + 1).into_bytes())
                } else {
                    Some(format!("v{earlier}-{i}").into_bytes())
                };
                assert_eq!(got, expected, "round {round}: key {earlier}/{i}");
            }
        }
        let mut batch = WriteBatch::new();
        for i in 0..PER_ROUND {
            batch.put(round_key(round, i), format!("v{round}-{i}").into_bytes());
        }
        engine.apply(&batch).expect("apply the round's batch");
        if round > 0 {
            let mut batch = WriteBatch::new();
            for i in (0..PER_ROUND).filter(|i| i % 2 == 0) {
                batch.put(round_key(round - 1, i), format!("over{round}").into_bytes());
            }
            for i in (0..PER_ROUND).filter(|i| i % 10 == 0) {
                batch.delete(round_key(round - 1, i));
            }
            engine.apply(&batch).expect("apply overwrites and deletes");
        }
        engine.sync().expect("sync");
    }
    let engine = open(dir.path());
    let all = engine.scan(b"r", None, usize::MAX).expect("scan");
    // Every round's keys, minus the deleted tenth of all but the last round.
    let expected = ROUNDS * PER_ROUND - (ROUNDS - 1) * PER_ROUND / 10;
    assert_eq!(all.len(), expected as usize);
}

/// Garbage appended after the last record (a torn append) is cut off on reopen; every
/// synced batch is intact and new writes land after them and survive another reopen.
#[test]
fn torn_tail_is_truncated_and_synced_batches_survive() {
    let dir = tempfile::tempdir().expect("create temp dir");
    {
        let engine = open(dir.path());
        for b in 0..20u32 {
            let mut batch = WriteBatch::new();
            batch
                .put(format!("a{b:02}"), b.to_le_bytes())
                .put(format!("b{b:02}"), vec![b as u8; 1000]);
            engine.apply(&batch).expect("apply");
        }
        engine.sync().expect("sync");
    }
    let synced_len = log_len(dir.path());

    // Each kind of tear: too short for a header, a header promising more than is there, a
    // whole record with a wrong checksum.
    let tears: [&[u8]; 3] = [
        &[0xde, 0xad, 0xbe],
        &[200, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9, 9, 9],
        &[4, 0, 0, 0, 0x11, 0x22, 0x33, 0x44, 0, 0, 0, 0],
    ];
    for (n, tear) in tears.iter().enumerate() {
        append_to_log(dir.path(), tear);
        assert_eq!(log_len(dir.path()), synced_len + tear.len() as u64);
        let engine = open(dir.path());
        assert_eq!(
            log_len(dir.path()),
            synced_len,
            "tear {n}: the tail must be truncated to the last whole record"
        );
        for b in 0..20u32 {
            assert_eq!(
                engine.get(format!("a{b:02}").as_bytes()).expect("get"),
                Some(b.to_le_bytes().to_vec()),
                "tear {n}: batch {b}"
            );
            assert_eq!(
                engine.get(format!("b{b:02}").as_bytes()).expect("get"),
                Some(vec![b as u8; 1000]),
                "tear {n}: batch {b}"
            );
        }
    }

    // Appends after a truncation are replayed too.
    {
        let engine = open(dir.path());
        put(&engine, b"after", b"tear");
        engine.sync().expect("sync");
    }
    let engine = open(dir.path());
    assert_eq!(engine.get(b"after").expect("get"), Some(b"tear".to_vec()));
    assert_eq!(engine.scan(b"", None, usize::MAX).expect("scan").len(), 41);
}

/// A batch whose record is cut anywhere inside is dropped whole: recovery never exposes
/// part of a batch.
#[test]
fn a_torn_batch_is_dropped_whole() {
    let dir = tempfile::tempdir().expect("create temp dir");
    {
        let engine = open(dir.path());
        put(&engine, b"before", b"1");
        engine.sync().expect("sync");
    }
    let before_len = log_len(dir.path());
    {
        let engine = open(dir.path());
        let mut batch = WriteBatch::new();
        batch
            .put(&b"x1"[..], &b"one"[..])
            .delete(&b"before"[..])
            .put(&b"x2"[..], &b"two"[..]);
        engine.apply(&batch).expect("apply");
        engine.sync().expect("sync");
    }
    let full_len = log_len(dir.path());
    let record = std::fs::read(dir.path().join(LOG_FILE)).expect("read the log");
    // Every cut strictly inside the record: each must recover exactly the state before it.
    for cut in before_len + 1..full_len {
        std::fs::write(
            dir.path().join(LOG_FILE),
            &record[..usize::try_from(cut).expect("small")],
        )
        .expect("write a torn log");
        let engine = open(dir.path());
        assert_eq!(
            engine.scan(b"", None, usize::MAX).expect("scan"),
            vec![(b"before".to_vec(), b"1".to_vec())],
            "log cut at {cut} of {full_len}: none of the torn batch may show"
        );
        assert_eq!(log_len(dir.path()), before_len, "cut at {cut}");
    }
}

/// A log that is not a logstore log is refused with an error, never "recovered" into an
/// empty store, and the guest does not trap.
#[test]
fn a_foreign_file_is_refused_not_erased() {
    let dir = tempfile::tempdir().expect("create temp dir");
    std::fs::write(dir.path().join(LOG_FILE), b"this is not a log at all").expect("write");
    let err = WasmEngine::open(logstore_component(), dir.path(), &AdapterLimits::default())
        .expect_err("a foreign file must not open");
    match &err {
        StorageError::Io {
            engine,
            op,
            message,
        } => {
            assert_eq!(engine, "wasm:logstore");
            assert_eq!(*op, "open");
            assert!(message.contains("logstore header"), "{message}");
        }
        other => panic!("expected an open error, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(dir.path().join(LOG_FILE)).expect("read"),
        b"this is not a log at all",
        "the file must be left untouched"
    );
}

/// Overwriting one key until the log is mostly garbage compacts it: the file shrinks, the
/// data is intact before and after a reopen, and no temporary file is left.
#[test]
fn compaction_rewrites_a_mostly_garbage_log() {
    let dir = tempfile::tempdir().expect("create temp dir");
    const VALUE_BYTES: usize = 64 * 1024;
    const OVERWRITES: usize = 400; // 25 MiB of log for 64 KiB of live data
    let value = |i: usize| vec![(i % 251) as u8; VALUE_BYTES];
    {
        let engine = open(dir.path());
        put(&engine, b"stable", b"kept");
        for i in 0..OVERWRITES {
            put(&engine, b"hot", &value(i));
        }
        engine.sync().expect("sync");
        assert!(
            log_len(dir.path()) < (OVERWRITES * VALUE_BYTES / 2) as u64,
            "the log must have been compacted: {} bytes",
            log_len(dir.path())
        );
        assert_eq!(
            engine.get(b"hot").expect("get"),
            Some(value(OVERWRITES - 1))
        );
        assert_eq!(engine.get(b"stable").expect("get"), Some(b"kept".to_vec()));
    }
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list the data dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, vec![LOG_FILE.to_owned()], "no compaction leftovers");
    let engine = open(dir.path());
    assert_eq!(
        engine.get(b"hot").expect("get"),
        Some(value(OVERWRITES - 1))
    );
    assert_eq!(engine.get(b"stable").expect("get"), Some(b"kept".to_vec()));
    assert_eq!(engine.scan(b"", None, usize::MAX).expect("scan").len(), 2);
}

fn assert_poisoned(err: &StorageError, what: &str) {
    match err {
        StorageError::Poisoned { engine, cause } => {
            assert_eq!(engine, "wasm:logstore");
            assert!(
                cause.contains(what),
                "cause should mention {what:?}: {cause}"
            );
        }
        other => panic!("expected Poisoned, got {other:?}"),
    }
}

/// A call that runs out of fuel traps; the engine is poisoned (every later call says so,
/// without panicking), and a reopen with sane limits recovers the synced data.
#[test]
fn running_out_of_fuel_poisons_the_engine() {
    let dir = tempfile::tempdir().expect("create temp dir");
    {
        let engine = open(dir.path());
        put(&engine, b"k", b"v");
        engine.sync().expect("sync");
    }
    let starved = AdapterLimits {
        call_fuel_max: 100,
        ..AdapterLimits::default()
    };
    let engine = WasmEngine::open(logstore_component(), dir.path(), &starved).expect("open");
    let err = engine
        .get(b"k")
        .expect_err("100 units of fuel cannot serve a get");
    assert_poisoned(&err, "fuel");
    assert_poisoned(&engine.get(b"k").expect_err("poisoned"), "fuel");
    let mut batch = WriteBatch::new();
    batch.put(&b"k2"[..], &b"v2"[..]);
    assert_poisoned(&engine.apply(&batch).expect_err("poisoned"), "fuel");
    assert_poisoned(&engine.sync().expect_err("poisoned"), "fuel");
    drop(engine);
    let engine = open(dir.path());
    assert_eq!(engine.get(b"k").expect("get"), Some(b"v".to_vec()));
    assert_eq!(engine.get(b"k2").expect("get"), None);
}

/// A batch that needs more memory than the limit allows traps the guest (allocation
/// failure) and poisons the engine; nothing of it reaches the log.
#[test]
fn exceeding_the_memory_limit_poisons_the_engine() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let small = AdapterLimits {
        memory_bytes_max: 4 * 1024 * 1024,
        ..AdapterLimits::default()
    };
    let engine = WasmEngine::open(logstore_component(), dir.path(), &small).expect("open");
    put(&engine, b"small", b"fits");
    engine.sync().expect("sync");
    let mut batch = WriteBatch::new();
    batch.put(&b"big"[..], vec![7u8; 8 * 1024 * 1024]);
    let err = engine.apply(&batch).expect_err("8 MiB cannot fit in 4 MiB");
    assert!(matches!(err, StorageError::Poisoned { .. }), "{err:?}");
    assert!(matches!(
        engine.get(b"small").expect_err("poisoned"),
        StorageError::Poisoned { .. }
    ));
    drop(engine);
    let engine = open(dir.path());
    assert_eq!(engine.get(b"small").expect("get"), Some(b"fits".to_vec()));
    assert_eq!(engine.get(b"big").expect("get"), None);
}

/// The guest can reach no network: its imports are WASI CLI, clocks, filesystem, I/O and
/// random only (the host refuses any other at open).
#[test]
fn the_component_imports_no_network() {
    let imports = WasmEngine::component_imports(logstore_component()).expect("imports");
    assert!(!imports.is_empty(), "a wasip2 component imports WASI");
    for name in &imports {
        assert!(
            !name.starts_with("wasi:sockets") && !name.starts_with("wasi:http"),
            "network import {name}"
        );
        assert!(
            quiver_wasm_storage::ALLOWED_IMPORT_PREFIXES
                .iter()
                .any(|p| name.starts_with(p)),
            "import {name} is outside the allow-list"
        );
    }
}

/// The guest's files land in its data directory and nowhere else: a sibling directory and
/// the parent are untouched by a full open / write / compact / sync cycle.
#[test]
fn the_guest_writes_only_inside_its_directory() {
    let root = tempfile::tempdir().expect("create temp dir");
    let data = root.path().join("data");
    let sibling = root.path().join("sibling");
    std::fs::create_dir(&sibling).expect("mkdir");
    std::fs::write(sibling.join("secret"), b"not for the guest").expect("write");
    {
        let engine = open(&data);
        for i in 0..50u32 {
            put(&engine, &i.to_be_bytes(), b"value");
        }
        engine.sync().expect("sync");
    }
    let mut top: Vec<String> = std::fs::read_dir(root.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, vec!["data".to_owned(), "sibling".to_owned()]);
    let sibling_files: Vec<_> = std::fs::read_dir(&sibling)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(sibling_files, vec!["secret"]);
    assert_eq!(
        std::fs::read(sibling.join("secret")).expect("read"),
        b"not for the guest"
    );
}

/// Engines are shared across threads (the node's group commit syncs from its own thread).
#[test]
fn concurrent_callers_are_serialised() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let engine = Arc::new(open(dir.path()));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let engine = Arc::clone(&engine);
            std::thread::spawn(move || {
                for i in 0..100u8 {
                    put(engine.as_ref(), &[t, i], &[i]);
                    if i % 10 == 0 {
                        engine.sync().expect("sync");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("join");
    }
    assert_eq!(engine.scan(b"", None, usize::MAX).expect("scan").len(), 400);
}

fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .expect("list")
        .map(|e| {
            let path = e.expect("entry").path();
            if path.is_dir() { files_under(&path) } else { 1 }
        })
        .sum()
}

/// Compiled code lands in the cache directory given at open, so the next process loads it
/// instead of compiling again.
#[test]
fn compiled_code_is_cached_on_disk() {
    let cache = tempfile::tempdir().expect("create temp dir");
    let data = tempfile::tempdir().expect("create temp dir");
    assert_eq!(files_under(cache.path()), 0);
    let engine = WasmEngine::open_with_cache_dir(
        logstore_component(),
        data.path(),
        &AdapterLimits::default(),
        cache.path(),
    )
    .expect("open");
    put(&engine, b"k", b"v");
    assert!(
        files_under(cache.path()) > 0,
        "the compiled component must be written to the cache"
    );
}

/// The node applies batches from tokio tasks and syncs from the group-commit thread: the
/// adapter must work from inside a tokio worker (wasmtime-wasi's synchronous bindings would
/// panic there) and survive a reopen after the group commit acknowledged the writes.
#[test]
fn works_under_the_nodes_group_commit_in_tokio() {
    use quiver_storage::{Durability, Store};

    let dir = tempfile::tempdir().expect("create temp dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build tokio runtime");
    {
        let engine: Arc<dyn StorageEngine> = Arc::new(open(dir.path()));
        let store = Store::new(engine, Durability::Sync);
        rt.block_on(async {
            let writers: Vec<_> = (0..32u8)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let mut batch = WriteBatch::new();
                        batch.put(vec![b'w', i], vec![i; 10]);
                        store.write(batch, Durability::Sync).await
                    })
                })
                .collect();
            for w in writers {
                w.await.expect("join").expect("synced write");
            }
        });
    }
    let engine = open(dir.path());
    for i in 0..32u8 {
        assert_eq!(engine.get(&[b'w', i]).expect("get"), Some(vec![i; 10]));
    }
}
