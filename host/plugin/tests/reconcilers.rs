//! The shipped reconcilers pass the conformance suite; hostile plugins are refused at load or
//! contained at call time, after which the runtime still serves a good plugin; compiled
//! plugins are reused from the disk cache across runtimes.

use std::path::Path;
use std::sync::Arc;

use quiver_plugin::conformance::{self, CART, COMMON, COUNTER, LWW, sibling, tombstone};
use quiver_plugin::{Law, Limits, Merged, PluginError, PluginRuntime, Reconciler, check_laws};

fn runtime() -> (tempfile::TempDir, PluginRuntime) {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => panic!("temp dir: {e}"),
    };
    let runtime = match PluginRuntime::new(dir.path()) {
        Ok(r) => r,
        Err(e) => panic!("runtime: {e}"),
    };
    (dir, runtime)
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn load(runtime: &PluginRuntime, name: &str, path: &Path) -> Arc<Reconciler> {
    runtime
        .load_reconciler(name, &bytes(path))
        .unwrap_or_else(|e| panic!("load {name}: {e}"))
}

/// A small, lawful merge the runtime must still serve after a hostile plugin failed.
fn assert_still_serving(runtime: &PluginRuntime) {
    let counter = load(runtime, "counter", quiver_guests::counter());
    let merged = counter.merge(
        &[
            sibling(br#"{"p":{"n1":2}}"#, 1, "n1", 1),
            sibling(br#"{"p":{"n2":3}}"#, 2, "n2", 1),
        ],
        &Limits::default(),
    );
    assert_eq!(
        merged.ok(),
        Some(Merged::Value(br#"{"p":{"n1":2,"n2":3},"n":{}}"#.to_vec())),
        "the runtime must keep serving good plugins"
    );
}

fn two_siblings() -> Vec<quiver_plugin::Sibling> {
    vec![sibling(b"a", 1, "n1", 1), sibling(b"b", 2, "n2", 1)]
}

// ---- conformance of the shipped reconcilers ----

#[test]
fn cart_conforms() {
    let (_dir, rt) = runtime();
    conformance::run(&load(&rt, "cart", quiver_guests::cart()), &[COMMON, CART]);
}

#[test]
fn lww_conforms() {
    let (_dir, rt) = runtime();
    conformance::run(&load(&rt, "lww", quiver_guests::lww()), &[COMMON, LWW]);
}

#[test]
fn counter_conforms() {
    let (_dir, rt) = runtime();
    conformance::run(
        &load(&rt, "counter", quiver_guests::counter()),
        &[COMMON, COUNTER],
    );
}

#[test]
fn template_obeys_the_laws() {
    let (_dir, rt) = runtime();
    conformance::run(&load(&rt, "template", quiver_guests::template()), &[COMMON]);
}

// ---- refused at load ----

#[test]
fn a_reconciler_importing_wasi_is_refused() {
    let (_dir, rt) = runtime();
    match rt.load_reconciler("fs", &bytes(quiver_guests::fixture_fs())) {
        Err(PluginError::ForbiddenImports { plugin, imports }) => {
            assert!(
                plugin.starts_with("fs@"),
                "error names the plugin: {plugin}"
            );
            assert!(
                imports.iter().any(|i| i.starts_with("wasi:filesystem")),
                "imports: {imports:?}"
            );
        }
        other => panic!("expected ForbiddenImports, got {other:?}"),
    }
    assert_still_serving(&rt);
}

#[test]
fn a_core_module_is_refused() {
    let (_dir, rt) = runtime();
    let err = rt
        .load_reconciler("core", &bytes(quiver_guests::fixture_not_a_component()))
        .err();
    assert!(
        matches!(err, Some(PluginError::NotAComponent { .. })),
        "got {err:?}"
    );
    let err = rt.load_reconciler("text", b"function merge() {}").err();
    assert!(
        matches!(err, Some(PluginError::NotAComponent { .. })),
        "got {err:?}"
    );
    assert_still_serving(&rt);
}

#[test]
fn a_corrupt_component_is_refused() {
    let (_dir, rt) = runtime();
    let mut component = bytes(quiver_guests::cart());
    component.truncate(component.len() / 2);
    let err = rt.load_reconciler("half", &component).err();
    assert!(
        matches!(err, Some(PluginError::Compile { .. })),
        "got {err:?}"
    );
}

// ---- contained at call time ----

/// Fuel decides; the wall clock is only a backstop: a loop with fuel to spare is still
/// ended once it runs past the runtime's wall-clock limit, and the runtime serves on.
#[test]
fn a_loop_with_fuel_to_spare_hits_the_wall_clock_backstop() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let rt = PluginRuntime::with_wall_limit(dir.path(), std::time::Duration::from_millis(50))
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let plugin = load(&rt, "loop", quiver_guests::fixture_loop());
    let limits = Limits {
        fuel: u64::MAX,
        ..Limits::default()
    };
    let started = std::time::Instant::now();
    match plugin.merge(&two_siblings(), &limits) {
        Err(PluginError::WallClock { call, ms, .. }) => assert_eq!((call, ms), ("merge", 50)),
        other => panic!("expected WallClock, got {other:?}"),
    }
    // Generous: the point is that it ends, not how close to 50 ms a loaded machine gets.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert_still_serving(&rt);
}

#[test]
fn a_loop_runs_out_of_fuel() {
    let (_dir, rt) = runtime();
    let plugin = load(&rt, "loop", quiver_guests::fixture_loop());
    let limits = Limits {
        fuel: 5_000_000,
        ..Limits::default()
    };
    match plugin.merge(&two_siblings(), &limits) {
        Err(PluginError::OutOfFuel { plugin, call, fuel }) => {
            assert!(plugin.starts_with("loop@"));
            assert_eq!((call, fuel), ("merge", 5_000_000));
        }
        other => panic!("expected OutOfFuel, got {other:?}"),
    }
    // The default limits stop it too (deterministically: fuel, not time).
    let err = plugin.merge(&two_siblings(), &Limits::default()).err();
    assert!(
        matches!(err, Some(PluginError::OutOfFuel { .. })),
        "got {err:?}"
    );
    assert_still_serving(&rt);
}

#[test]
fn a_1_gib_allocation_hits_the_memory_limit() {
    let (_dir, rt) = runtime();
    let plugin = load(&rt, "alloc", quiver_guests::fixture_alloc());
    match plugin.merge(&two_siblings(), &Limits::default()) {
        Err(PluginError::MemoryLimit {
            plugin,
            call,
            memory_bytes,
        }) => {
            assert!(plugin.starts_with("alloc@"));
            assert_eq!(
                (call, memory_bytes),
                ("merge", quiver_plugin::DEFAULT_MEMORY_BYTES)
            );
        }
        other => panic!("expected MemoryLimit, got {other:?}"),
    }
    assert_still_serving(&rt);
}

#[test]
fn a_panic_is_a_trap_and_the_next_call_gets_a_fresh_instance() {
    let (_dir, rt) = runtime();
    let plugin = load(&rt, "trap", quiver_guests::fixture_trap());
    for _ in 0..2 {
        match plugin.merge(&two_siblings(), &Limits::default()) {
            Err(PluginError::Trap {
                plugin,
                call,
                detail,
            }) => {
                assert!(plugin.starts_with("trap@"));
                assert_eq!(call, "merge");
                // A poisoned instance would say "cannot enter component instance" instead.
                assert!(!detail.contains("cannot enter"), "{detail}");
            }
            other => panic!("expected Trap, got {other:?}"),
        }
    }
    assert_still_serving(&rt);
}

#[test]
fn a_huge_output_is_refused() {
    let (_dir, rt) = runtime();
    let plugin = load(&rt, "huge", quiver_guests::fixture_huge());
    match plugin.merge(&two_siblings(), &Limits::default()) {
        Err(PluginError::OutputTooLarge {
            plugin,
            call,
            bytes,
            limit,
        }) => {
            assert!(plugin.starts_with("huge@"));
            assert_eq!(
                (call, bytes, limit),
                ("merge", 64 << 20, quiver_plugin::DEFAULT_OUTPUT_BYTES)
            );
        }
        other => panic!("expected OutputTooLarge, got {other:?}"),
    }
    // With less memory than the value needs, the memory limit stops it first.
    let small = Limits {
        memory_bytes: 16 << 20,
        ..Limits::default()
    };
    let err = plugin.merge(&two_siblings(), &small).err();
    assert!(
        matches!(err, Some(PluginError::MemoryLimit { .. })),
        "got {err:?}"
    );
    assert_still_serving(&rt);
}

#[test]
fn a_lawless_merge_is_reported_with_its_input() {
    let (_dir, rt) = runtime();
    let plugin = load(&rt, "garbage", quiver_guests::fixture_garbage());
    let report = check_laws(&plugin, 7, 50, &Limits::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!report.is_lawful(), "{report}");
    let commutative = report.violations.iter().find(|v| v.law == Law::Commutative);
    let violation = commutative.unwrap_or_else(|| panic!("no commutativity violation: {report}"));
    assert!(
        violation.input.len() >= 2,
        "the offending input is reported: {violation:?}"
    );
    // Same seed, same report.
    let again = check_laws(&plugin, 7, 50, &Limits::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.violation_count, again.violation_count);
    assert_still_serving(&rt);
}

#[test]
fn hostile_plugins_fail_law_checks_with_their_sandbox_error() {
    let (_dir, rt) = runtime();
    let plugin = load(&rt, "loop", quiver_guests::fixture_loop());
    let limits = Limits {
        fuel: 1_000_000,
        ..Limits::default()
    };
    let err = check_laws(&plugin, 1, 10, &limits).err();
    assert!(
        matches!(err, Some(PluginError::OutOfFuel { .. })),
        "got {err:?}"
    );
}

#[test]
fn the_callers_siblings_are_untouched_by_a_failed_merge() {
    let (_dir, rt) = runtime();
    let plugin = load(&rt, "trap", quiver_guests::fixture_trap());
    let siblings = vec![sibling(b"keep me", 1, "n1", 1), tombstone(2, "n2", 1)];
    let before = siblings.clone();
    assert!(plugin.merge(&siblings, &Limits::default()).is_err());
    assert_eq!(format!("{siblings:?}"), format!("{before:?}"));
}

// ---- loading and caching ----

#[test]
fn precompiled_plugins_are_reused_across_runtimes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cart = bytes(quiver_guests::cart());
    {
        let first = PluginRuntime::new(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        load(&first, "cart", quiver_guests::cart());
        assert_eq!((first.compile_count(), first.disk_cache_hits()), (1, 0));
        // Same bytes again in the same runtime: neither compiled nor read from disk.
        let again = first
            .load_reconciler("cart-again", &cart)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((first.compile_count(), first.disk_cache_hits()), (1, 0));
        assert_eq!(again.name(), "cart-again");
    }
    let second = PluginRuntime::new(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let plugin = second
        .load_reconciler("cart", &cart)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        second.compile_count(),
        0,
        "a restarted runtime must not compile again"
    );
    assert_eq!(second.disk_cache_hits(), 1);
    assert_eq!(plugin.hash(), quiver_plugin::content_hash(&cart));
    conformance::run(&plugin, &[CART]);
}

#[test]
fn content_hash_is_hex_sha256() {
    assert_eq!(
        quiver_plugin::content_hash(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn merge_is_metered_deterministically() {
    let (_dir, rt) = runtime();
    let plugin = load(&rt, "lww", quiver_guests::lww());
    let a = plugin
        .merge_metered(&two_siblings(), &Limits::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let b = plugin
        .merge_metered(&two_siblings(), &Limits::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a, b, "same input, same result and same fuel");
    assert!(a.fuel_used > 0);
}

// ---- the Python twin ----

#[test]
fn python_cart_conforms() {
    let Some(path) = quiver_guests::python_cart() else {
        eprintln!("the Python cart was not built (no PyPI at build time): skipped");
        return;
    };
    let (_dir, rt) = runtime();
    conformance::run(&load(&rt, "py-cart", path), &[COMMON, CART]);
}
