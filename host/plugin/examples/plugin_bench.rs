//! Per-call cost of the shipped reconcilers through the sandbox, against the same merge in
//! native Rust, and the cost of getting an instance: compile (cold), load from the disk
//! cache (a restart), instantiate (every call).
//!
//! `cargo run --release -p quiver-plugin --example plugin_bench`

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use quiver_plugin::conformance::sibling;
use quiver_plugin::{Limits, Merged, PluginRuntime, Sibling};
use serde_json::Value;

/// Calls measured per plugin (after warm-up).
const CALLS: usize = 5_000;
const WARMUP_CALLS: usize = 200;
/// Runtimes created to time compile and cached loads.
const LOADS: usize = 10;

/// The same merge as a plugin's, in native Rust.
type NativeMerge = fn(&[Sibling]) -> Merged;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let limits = Limits::default();
    let mut plugins: Vec<(&str, &Path, Vec<Sibling>, NativeMerge)> = vec![
        ("cart", quiver_guests::cart(), cart_siblings(), native_cart),
        ("lww", quiver_guests::lww(), lww_siblings(), native_lww),
        (
            "counter",
            quiver_guests::counter(),
            counter_siblings(),
            native_counter,
        ),
    ];
    // The Python twin of the cart, when the build could make it (PyPI reachable).
    if let Some(path) = quiver_guests::python_cart() {
        plugins.push(("cart-py", path, cart_siblings(), native_cart));
    }
    println!(
        "merge of 3 siblings, {CALLS} calls each (fresh instance per call, fuel and memory limits on)"
    );
    println!(
        "{:<8} {:>11} {:>11} {:>11} {:>11} {:>9} {:>8}",
        "plugin", "wasm p50", "wasm p99", "native p50", "native p99", "fuel", "size"
    );
    for (name, path, siblings, native) in &plugins {
        let bytes = std::fs::read(path)?;
        let dir = tempfile::tempdir()?;
        let runtime = PluginRuntime::new(dir.path())?;
        let plugin = runtime.load_reconciler(name, &bytes)?;
        let expected = native(siblings);
        let got = plugin.merge_metered(siblings, &limits)?;
        assert_eq!(
            got.value, expected,
            "{name}: native and wasm merges must agree"
        );
        let wasm = sample(|| {
            black_box(plugin.merge(black_box(siblings), &limits).ok());
        });
        let native_times = sample(|| {
            black_box(native(black_box(siblings)));
        });
        println!(
            "{name:<8} {:>11} {:>11} {:>11} {:>11} {:>9} {:>7}K",
            show(percentile(&wasm, 50)),
            show(percentile(&wasm, 99)),
            show(percentile(&native_times, 50)),
            show(percentile(&native_times, 99)),
            got.fuel_used,
            bytes.len() / 1024
        );
    }

    println!("\ngetting an instance (cart)");
    let cart = std::fs::read(quiver_guests::cart())?;
    let mut cold = Vec::new();
    let mut cached = Vec::new();
    for _ in 0..LOADS {
        let dir = tempfile::tempdir()?;
        let start = Instant::now();
        PluginRuntime::new(dir.path())?.load_reconciler("cart", &cart)?;
        cold.push(start.elapsed());
        // A restart: a new runtime on the same cache directory.
        let start = Instant::now();
        let runtime = PluginRuntime::new(dir.path())?;
        runtime.load_reconciler("cart", &cart)?;
        cached.push(start.elapsed());
        assert_eq!(runtime.compile_count(), 0);
    }
    // Per-call instantiation: an `examples` call is little more than instantiate + return.
    let dir = tempfile::tempdir()?;
    let runtime = PluginRuntime::new(dir.path())?;
    let plugin = runtime.load_reconciler("lww", &std::fs::read(quiver_guests::lww())?)?;
    let instantiate = sample(|| {
        black_box(plugin.examples(&limits).ok());
    });
    cold.sort();
    cached.sort();
    println!(
        "compile (new runtime, empty cache):     p50 {}",
        show(percentile(&cold, 50))
    );
    println!(
        "load from disk cache (new runtime):     p50 {}",
        show(percentile(&cached, 50))
    );
    println!(
        "instantiate + trivial call (lww examples): p50 {}  p99 {}",
        show(percentile(&instantiate, 50)),
        show(percentile(&instantiate, 99))
    );
    Ok(())
}

fn sample(mut f: impl FnMut()) -> Vec<Duration> {
    for _ in 0..WARMUP_CALLS {
        f();
    }
    let mut times: Vec<Duration> = (0..CALLS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted
        .get((sorted.len().saturating_sub(1)) * p / 100)
        .copied()
        .unwrap_or_default()
}

fn show(d: Duration) -> String {
    let micros = d.as_secs_f64() * 1e6;
    if micros >= 1000.0 {
        format!("{:.2} ms", micros / 1000.0)
    } else {
        format!("{micros:.1} µs")
    }
}

fn cart_siblings() -> Vec<Sibling> {
    vec![
        sibling(
            br#"{"adds":{"apple":["n1:1"],"pear":["n1:2"]},"removed":{}}"#,
            10,
            "n1",
            2,
        ),
        sibling(
            br#"{"adds":{"pear":["n1:2"]},"removed":{"apple":["n1:1"]}}"#,
            11,
            "n2",
            1,
        ),
        sibling(
            br#"{"adds":{"apple":["n1:1","n3:1"],"plum":["n3:2"]},"removed":{}}"#,
            12,
            "n3",
            2,
        ),
    ]
}

fn lww_siblings() -> Vec<Sibling> {
    vec![
        sibling(b"first value", 10, "n1", 1),
        sibling(b"second value", 12, "n2", 1),
        sibling(b"third value", 12, "n1", 2),
    ]
}

fn counter_siblings() -> Vec<Sibling> {
    vec![
        sibling(br#"{"p":{"n1":5},"n":{}}"#, 10, "n1", 1),
        sibling(br#"{"p":{"n1":3,"n2":2},"n":{"n2":1}}"#, 11, "n2", 1),
        sibling(br#"{"p":{"n3":7},"n":{"n1":4}}"#, 12, "n3", 1),
    ]
}

// The native merges mirror the guests' logic (parse, combine, canonical JSON out), so the
// difference is the sandbox: copying in and out, instantiation, fuel metering.

fn native_lww(siblings: &[Sibling]) -> Merged {
    let winner = siblings.iter().max_by(|a, b| {
        (a.timestamp_ms, &a.actor, a.counter, a.tombstone, &a.value).cmp(&(
            b.timestamp_ms,
            &b.actor,
            b.counter,
            b.tombstone,
            &b.value,
        ))
    });
    match winner {
        Some(w) if !w.tombstone => Merged::Value(w.value.clone()),
        _ => Merged::Tombstone,
    }
}

type Tags = BTreeMap<String, BTreeSet<String>>;

/// Field order as the guests write it.
#[derive(serde::Serialize)]
struct CartOut<'a> {
    adds: &'a Tags,
    removed: &'a Tags,
}

#[derive(serde::Serialize)]
struct CounterOut<'a> {
    p: &'a BTreeMap<String, u64>,
    n: &'a BTreeMap<String, u64>,
}

fn tags(v: &Value, field: &str, into: &mut Tags) {
    if let Some(items) = v.get(field).and_then(Value::as_object) {
        for (item, list) in items {
            let entry = into.entry(item.clone()).or_default();
            for tag in list
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                entry.insert(tag.to_owned());
            }
        }
    }
}

fn native_cart(siblings: &[Sibling]) -> Merged {
    let (mut adds, mut removed) = (Tags::new(), Tags::new());
    for s in siblings.iter().filter(|s| !s.tombstone) {
        let Ok(v) = serde_json::from_slice::<Value>(&s.value) else {
            return Merged::Tombstone;
        };
        tags(&v, "adds", &mut adds);
        tags(&v, "removed", &mut removed);
    }
    for (item, gone) in &removed {
        if let Some(live) = adds.get_mut(item) {
            live.retain(|t| !gone.contains(t));
        }
    }
    adds.retain(|_, t| !t.is_empty());
    removed.retain(|_, t| !t.is_empty());
    let out = CartOut {
        adds: &adds,
        removed: &removed,
    };
    Merged::Value(serde_json::to_vec(&out).unwrap_or_default())
}

fn native_counter(siblings: &[Sibling]) -> Merged {
    let (mut p, mut n) = (
        BTreeMap::<String, u64>::new(),
        BTreeMap::<String, u64>::new(),
    );
    for s in siblings.iter().filter(|s| !s.tombstone) {
        let Ok(v) = serde_json::from_slice::<Value>(&s.value) else {
            return Merged::Tombstone;
        };
        for (field, into) in [("p", &mut p), ("n", &mut n)] {
            for (actor, total) in v
                .get(field)
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let e = into.entry(actor.clone()).or_insert(0);
                *e = (*e).max(total.as_u64().unwrap_or(0));
            }
        }
    }
    p.retain(|_, v| *v != 0);
    n.retain(|_, v| *v != 0);
    Merged::Value(serde_json::to_vec(&CounterOut { p: &p, n: &n }).unwrap_or_default())
}
