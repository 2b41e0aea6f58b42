//! Reconciler plugins as the node uses them: the engine that validates, compiles and runs
//! components (`PluginEngine`, implemented over wasmtime by `quiver-plugin`), the loaded
//! versions by content hash, and the conversion between stored objects and what a plugin
//! sees.
//!
//! A bucket's reconciler is resolved once per metadata change (see `cluster.rs`), and every
//! request takes an `Arc` of the version attached when it started: attaching a new version
//! swaps it live, and requests in flight finish on the version they began with.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quiver_core::causality::{Object, WriteOp};
use quiver_core::meta::PluginRef;

/// Per-call limits; `None` means the engine's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallLimits {
    /// Fuel (deterministic instruction budget).
    pub fuel: Option<u64>,
    /// Linear-memory cap, in bytes.
    pub memory_bytes: Option<u64>,
    /// Largest value the call may return, in bytes.
    pub output_bytes: Option<u64>,
}

/// One sibling as a reconciler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSibling {
    /// Value bytes (empty for a tombstone).
    pub value: Vec<u8>,
    /// Coordinator wall clock at write time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The writing actor, rendered.
    pub actor: String,
    /// The actor's counter of this version.
    pub counter: u64,
    /// True for a delete.
    pub tombstone: bool,
}

/// What a merge produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginMerged {
    /// One value replacing every sibling.
    Value(Vec<u8>),
    /// The key is deleted.
    Tombstone,
}

impl PluginMerged {
    /// The write that stores this result.
    pub fn into_op(self) -> WriteOp {
        match self {
            PluginMerged::Value(v) => WriteOp::Put(v),
            PluginMerged::Tombstone => WriteOp::Delete,
        }
    }
}

/// A loaded reconciler. Errors are messages that already name the plugin and say what
/// happened (trap, out of fuel, memory, output size, or the plugin's own error).
pub trait Reconcile: Send + Sync + fmt::Debug {
    /// Reconciles siblings into one value.
    fn merge(
        &self,
        siblings: &[PluginSibling],
        limits: &CallLimits,
    ) -> Result<PluginMerged, String>;
    /// Applies a server-side operation to the current value.
    fn update(
        &self,
        current: Option<&[u8]>,
        op: &[u8],
        actor: &str,
        limits: &CallLimits,
    ) -> Result<Vec<u8>, String>;
}

/// A plugin accepted by the engine.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The callable plugin.
    pub reconciler: Arc<dyn Reconcile>,
    /// Merge-law violations found (empty when lawful or when not checked).
    pub violations: Vec<String>,
}

/// Validates, compiles (once per content hash) and instantiates reconciler components.
pub trait PluginEngine: Send + Sync + fmt::Debug {
    /// Loads `bytes` as the reconciler `plugin`; with `check_laws`, also runs the merge-law
    /// checks through the component boundary. An `Err` means the bytes are not a valid
    /// reconciler component (the message says why).
    fn load(&self, plugin: &PluginRef, bytes: &[u8], check_laws: bool) -> Result<Loaded, String>;
}

/// Where plugin calls run: blocking threads, at most `workers` at once, so a call that
/// burns its whole fuel never occupies an async worker (which serves every other request)
/// and a burst of them cannot take every core.
#[derive(Debug, Clone)]
pub struct PluginPool {
    permits: Arc<tokio::sync::Semaphore>,
}

impl PluginPool {
    /// A pool running at most `workers` calls at once (at least one).
    pub fn new(workers: usize) -> Self {
        PluginPool {
            permits: Arc::new(tokio::sync::Semaphore::new(workers.max(1))),
        }
    }

    /// Runs `call` on the pool once a worker is free.
    pub async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| "the plugin pool is shut down".to_string())?;
        tokio::task::spawn_blocking(move || {
            let out = call();
            drop(permit);
            out
        })
        .await
        .unwrap_or_else(|e| Err(format!("the plugin call did not finish: {e}")))
    }
}

/// The node's loaded plugin versions, by content hash.
#[derive(Debug)]
pub struct Plugins {
    engine: Option<Arc<dyn PluginEngine>>,
    loaded: Mutex<HashMap<String, Arc<dyn Reconcile>>>,
    failures: Arc<AtomicU64>,
    pool: PluginPool,
}

impl Plugins {
    /// Plugins run by `engine` on `workers` threads at most; `None` disables plugins
    /// (uploads are refused).
    pub fn new(engine: Option<Arc<dyn PluginEngine>>, workers: usize) -> Self {
        Plugins {
            engine,
            loaded: Mutex::new(HashMap::new()),
            failures: Arc::default(),
            pool: PluginPool::new(workers),
        }
    }

    /// The pool every plugin call of this node runs on.
    pub fn pool(&self) -> PluginPool {
        self.pool.clone()
    }

    /// Plugin calls that failed on this node since it started (trap, fuel, memory, output
    /// size, or the plugin's own error).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The counter every attachment of this node reports failures to.
    pub fn failure_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.failures)
    }

    /// The engine, if plugins are enabled.
    pub fn engine(&self) -> Option<&Arc<dyn PluginEngine>> {
        self.engine.as_ref()
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<dyn Reconcile>>> {
        // Entries are inserted whole; a panic elsewhere cannot leave the map inconsistent.
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The loaded version `plugin`, loading it from `bytes` (when given) on first use.
    pub fn get_or_load(
        &self,
        plugin: &PluginRef,
        bytes: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Result<Option<Arc<dyn Reconcile>>, String> {
        if let Some(r) = self.loaded().get(&plugin.hash) {
            return Ok(Some(Arc::clone(r)));
        }
        let Some(engine) = &self.engine else {
            return Err("plugins are disabled on this node".into());
        };
        let Some(bytes) = bytes() else {
            return Ok(None);
        };
        let loaded = engine.load(plugin, &bytes, false)?;
        self.loaded()
            .insert(plugin.hash.clone(), Arc::clone(&loaded.reconciler));
        Ok(Some(loaded.reconciler))
    }

    /// Keeps an already loaded version (after an upload validated it).
    pub fn insert(&self, plugin: &PluginRef, reconciler: Arc<dyn Reconcile>) {
        self.loaded().insert(plugin.hash.clone(), reconciler);
    }
}

/// A bucket's reconciler, attached to a specific version.
#[derive(Debug, Clone)]
pub struct Attached {
    /// Name and hash.
    pub plugin: PluginRef,
    /// The loaded version.
    pub reconciler: Arc<dyn Reconcile>,
    /// Limits of this bucket's calls.
    pub limits: CallLimits,
    /// Where failed calls are counted (the node's `plugin_failures`).
    pub failures: Arc<AtomicU64>,
    /// Where its calls run.
    pub pool: PluginPool,
}

impl Attached {
    /// Merges an object's siblings; errors name the plugin.
    pub fn merge(&self, object: &Object) -> Result<PluginMerged, String> {
        self.reconciler
            .merge(&plugin_siblings(object), &self.limits)
            .map_err(|e| self.failed(e))
    }

    /// The value `update` starts from: none for an absent or deleted key, the value of a
    /// single sibling, or the merge of several.
    pub fn current(&self, object: &Object) -> Result<Option<Vec<u8>>, String> {
        let merged = match object.siblings() {
            [] => return Ok(None),
            [one] => {
                if one.meta.tombstone {
                    PluginMerged::Tombstone
                } else {
                    PluginMerged::Value(one.value.clone())
                }
            }
            _ => self.merge(object)?,
        };
        Ok(match merged {
            PluginMerged::Value(v) => Some(v),
            PluginMerged::Tombstone => None,
        })
    }

    /// Runs the plugin's `update`.
    pub fn update(
        &self,
        current: Option<&[u8]>,
        op: &[u8],
        actor: &str,
    ) -> Result<Vec<u8>, String> {
        self.reconciler
            .update(current, op, actor, &self.limits)
            .map_err(|e| self.failed(e))
    }

    /// [`Attached::merge`] on the plugin pool.
    pub async fn merge_pooled(&self, object: Object) -> Result<PluginMerged, String> {
        let this = self.clone();
        self.pool.run(move || this.merge(&object)).await
    }

    /// [`Attached::current`] then [`Attached::update`] on the plugin pool, as one call.
    pub async fn update_pooled(
        &self,
        object: Object,
        op: Vec<u8>,
        actor: String,
    ) -> Result<Vec<u8>, String> {
        let this = self.clone();
        self.pool
            .run(move || {
                let current = this.current(&object)?;
                this.update(current.as_deref(), &op, &actor)
            })
            .await
    }

    /// Counts a failed call; the engine's message already names the plugin version.
    fn failed(&self, message: String) -> String {
        self.failures.fetch_add(1, Ordering::Relaxed);
        message
    }
}

/// An object's siblings as a plugin sees them.
pub fn plugin_siblings(object: &Object) -> Vec<PluginSibling> {
    object
        .siblings()
        .iter()
        .map(|s| PluginSibling {
            value: s.value.clone(),
            timestamp_ms: s.meta.timestamp_ms,
            actor: s.dot.actor.to_string(),
            counter: s.dot.counter,
            tombstone: s.meta.tombstone,
        })
        .collect()
}
