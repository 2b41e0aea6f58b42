//! Wasm storage adapter (`wasm:logstore`) against fjall, same machine, same workload.
//!
//! `cargo run --release -p quiver-wasm-storage --example storage_bench [-- --keys N]`
//!
//! Workloads, each on a fresh engine loaded with `N` keys (16-byte keys, 100-byte values,
//! written in batches of 100 before timing starts):
//! - `put`: one-put batches (`apply`), not synced;
//! - `get`: point reads of existing keys in a scrambled order;
//! - `scan`: 100 pairs from a scrambled start key;
//! - `apply+sync`: one-put batch then `sync` (one fdatasync per write; the node's group
//!   commit shares syncs between writers, this measures the floor).
//!
//! Single-threaded, closed loop; latency of each call (p50/p99, printed in µs), throughput = calls / wall time.

use std::path::Path;
use std::time::Instant;

use hdrhistogram::Histogram;
use quiver_core::storage::{StorageEngine, WriteBatch};
use quiver_storage::FjallEngine;
use quiver_wasm_storage::{AdapterLimits, WasmEngine, logstore_component};

const VALUE_BYTES: usize = 100;
const SCAN_PAIRS: usize = 100;

fn key(i: u64) -> Vec<u8> {
    format!("bench/{i:010}").into_bytes()
}

/// A fixed permutation of `0..n` (multiplication by a prime that does not divide `n`), so
/// runs are comparable and the access order is not sequential.
fn scrambled(i: u64, n: u64) -> u64 {
    (i * 7919) % n
}

struct Measured {
    engine: String,
    workload: &'static str,
    ops: u64,
    secs: f64,
    hist: Histogram<u64>,
}

fn measure(
    engine: &dyn StorageEngine,
    workload: &'static str,
    ops: u64,
    mut op: impl FnMut(u64),
) -> Measured {
    // Nanoseconds: a fjall get takes about a microsecond.
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds");
    let start = Instant::now();
    for i in 0..ops {
        let t = Instant::now();
        op(i);
        let ns = u64::try_from(t.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        hist.saturating_record(ns);
    }
    Measured {
        engine: engine.name().to_owned(),
        workload,
        ops,
        secs: start.elapsed().as_secs_f64(),
        hist,
    }
}

fn load(engine: &dyn StorageEngine, keys: u64) {
    let value = vec![b'v'; VALUE_BYTES];
    for chunk in (0..keys).collect::<Vec<_>>().chunks(100) {
        let mut batch = WriteBatch::new();
        for &i in chunk {
            batch.put(key(i), value.clone());
        }
        engine.apply(&batch).expect("load");
    }
    engine.sync().expect("sync after load");
}

fn run_all(make: &mut dyn FnMut(&Path) -> Box<dyn StorageEngine>, keys: u64) -> Vec<Measured> {
    let mut out = Vec::new();
    let value = vec![b'w'; VALUE_BYTES];

    let dir = tempfile::tempdir().expect("temp dir");
    let e = make(dir.path());
    out.push(measure(e.as_ref(), "put", keys, |i| {
        let mut batch = WriteBatch::new();
        batch.put(key(scrambled(i, keys)), value.clone());
        e.apply(&batch).expect("put");
    }));
    drop(e);

    let dir = tempfile::tempdir().expect("temp dir");
    let e = make(dir.path());
    load(e.as_ref(), keys);
    out.push(measure(e.as_ref(), "get", keys, |i| {
        let got = e.get(&key(scrambled(i, keys))).expect("get");
        assert!(got.is_some(), "loaded key must be present");
    }));
    let scans = (keys / 10).max(1);
    out.push(measure(e.as_ref(), "scan 100", scans, |i| {
        let start = key(scrambled(i, keys.saturating_sub(SCAN_PAIRS as u64).max(1)));
        let got = e.scan(&start, None, SCAN_PAIRS).expect("scan");
        assert!(!got.is_empty(), "scan from a loaded key finds it");
    }));
    drop(e);

    let dir = tempfile::tempdir().expect("temp dir");
    let e = make(dir.path());
    let syncs = (keys / 20).max(1);
    out.push(measure(e.as_ref(), "apply+sync", syncs, |i| {
        let mut batch = WriteBatch::new();
        batch.put(key(i), value.clone());
        e.apply(&batch).expect("apply");
        e.sync().expect("sync");
    }));
    out
}

fn main() {
    let mut keys: u64 = 20_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--keys" => {
                keys = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--keys takes a number");
            }
            other => panic!("unknown argument {other:?} (usage: bench [--keys N])"),
        }
    }

    // Compile (or load from the on-disk cache) before timing anything.
    let warm = tempfile::tempdir().expect("temp dir");
    let t = Instant::now();
    drop(
        WasmEngine::open(logstore_component(), warm.path(), &AdapterLimits::default())
            .expect("open the logstore adapter"),
    );
    println!(
        "component {} ready in {:.1} ms (compile or cache load + instantiate + open)",
        logstore_component().display(),
        t.elapsed().as_secs_f64() * 1e3
    );

    let mut results = run_all(
        &mut |dir| {
            Box::new(
                WasmEngine::open(logstore_component(), dir, &AdapterLimits::default())
                    .expect("open the logstore adapter"),
            )
        },
        keys,
    );
    results.extend(run_all(
        &mut |dir| Box::new(FjallEngine::open(dir).expect("open fjall")),
        keys,
    ));

    println!();
    println!("{keys} keys, {VALUE_BYTES}-byte values, one thread");
    println!(
        "| {:<13} | {:<10} | {:>8} | {:>10} | {:>8} | {:>8} |",
        "engine", "workload", "ops", "ops/s", "p50 µs", "p99 µs"
    );
    println!(
        "|{:-<15}|{:-<12}|{:->10}|{:->12}|{:->10}|{:->10}|",
        "", "", "", "", "", ""
    );
    for r in &results {
        println!(
            "| {:<13} | {:<10} | {:>8} | {:>10.0} | {:>8.1} | {:>8.1} |",
            r.engine,
            r.workload,
            r.ops,
            r.ops as f64 / r.secs,
            r.hist.value_at_quantile(0.50) as f64 / 1e3,
            r.hist.value_at_quantile(0.99) as f64 / 1e3,
        );
    }
}
