//! The node's plugin engine: `quiver-plugin`'s sandboxed wasmtime runtime behind the
//! [`PluginEngine`] seam of `plugins.rs`.

use std::path::Path;
use std::sync::Arc;

use quiver_core::meta::PluginRef;
use quiver_plugin::{Limits, Merged, PluginRuntime, Reconciler, Sibling};

use crate::plugins::{CallLimits, Loaded, PluginEngine, PluginMerged, PluginSibling, Reconcile};

/// Sibling sets the law check generates at upload (deterministic: a fixed seed).
pub const UPLOAD_LAW_CASES: u32 = 200;
/// Seed of the upload law check, fixed so every node and every run checks the same sets.
pub const UPLOAD_LAW_SEED: u64 = 0x5157_4956_4552;
/// Fuel per call unless a bucket sets its own: about 100 ms of guest work, far above what
/// the shipped plugins need (Rust ~15 k, Python ~200 k units per merge of 3 siblings), low
/// enough that a looping plugin costs a request little.
pub const NODE_DEFAULT_FUEL: u64 = 100_000_000;

/// wasmtime-backed plugins, compiled once per content hash (cached on disk).
#[derive(Debug)]
pub struct WasmPlugins {
    runtime: PluginRuntime,
}

impl WasmPlugins {
    /// The engine, caching compiled plugins in `cache_dir`.
    pub fn new(cache_dir: &Path) -> Result<Self, quiver_plugin::PluginError> {
        Ok(WasmPlugins {
            runtime: PluginRuntime::new(cache_dir)?,
        })
    }
}

/// The law check of an upload, as messages (empty when lawful). A sandbox failure during
/// the check (loop, memory, trap, output size) counts as a violation too.
pub fn law_violations(r: &Reconciler, seed: u64, cases: u32) -> Vec<String> {
    match quiver_plugin::check_laws(r, seed, cases, &Limits::default()) {
        Ok(report) if report.is_lawful() => Vec::new(),
        Ok(report) => {
            let mut out: Vec<String> = report
                .violations
                .iter()
                .map(|v| format!("{}: {}", v.law, v.detail))
                .collect();
            let shown = out.len() as u64;
            if report.violation_count > shown {
                out.push(format!(
                    "... {} more violations",
                    report.violation_count - shown
                ));
            }
            out
        }
        Err(e) => vec![format!("the law check failed: {e}")],
    }
}

impl PluginEngine for WasmPlugins {
    fn load(&self, plugin: &PluginRef, bytes: &[u8], check_laws: bool) -> Result<Loaded, String> {
        let reconciler = self
            .runtime
            .load_reconciler(&plugin.name, bytes)
            .map_err(|e| e.to_string())?;
        let violations = if check_laws {
            law_violations(&reconciler, UPLOAD_LAW_SEED, UPLOAD_LAW_CASES)
        } else {
            Vec::new()
        };
        Ok(Loaded {
            reconciler: Arc::new(WasmReconciler(reconciler)),
            violations,
        })
    }
}

#[derive(Debug)]
struct WasmReconciler(Arc<Reconciler>);

fn limits(l: &CallLimits) -> Limits {
    let d = Limits::default();
    Limits {
        fuel: l.fuel.unwrap_or(NODE_DEFAULT_FUEL),
        memory_bytes: l
            .memory_bytes
            .map_or(d.memory_bytes, |b| usize::try_from(b).unwrap_or(usize::MAX)),
        output_bytes: l
            .output_bytes
            .map_or(d.output_bytes, |b| usize::try_from(b).unwrap_or(usize::MAX)),
    }
}

impl Reconcile for WasmReconciler {
    fn merge(&self, siblings: &[PluginSibling], l: &CallLimits) -> Result<PluginMerged, String> {
        let siblings: Vec<Sibling> = siblings
            .iter()
            .map(|s| Sibling {
                value: s.value.clone(),
                timestamp_ms: s.timestamp_ms,
                actor: s.actor.clone(),
                counter: s.counter,
                tombstone: s.tombstone,
            })
            .collect();
        match self.0.merge(&siblings, &limits(l)) {
            Ok(Merged::Value(v)) => Ok(PluginMerged::Value(v)),
            Ok(Merged::Tombstone) => Ok(PluginMerged::Tombstone),
            Err(e) => Err(e.to_string()),
        }
    }

    fn update(
        &self,
        current: Option<&[u8]>,
        op: &[u8],
        actor: &str,
        l: &CallLimits,
    ) -> Result<Vec<u8>, String> {
        self.0
            .update(current, op, actor, &limits(l))
            .map_err(|e| e.to_string())
    }
}
