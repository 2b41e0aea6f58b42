//! Loading reconciler components and calling them inside the sandbox.
//!
//! Compilation is the expensive step (tens of ms for a Rust guest, seconds for Python), so a
//! [`PluginRuntime`] compiles each distinct component once: in memory it keeps one
//! `InstancePre` per content hash, and on disk wasmtime's compile cache keeps the machine
//! code (keyed by SHA-256 of the component bytes and the engine's settings), so a restarted
//! node loads a plugin by decompressing and mapping it instead of compiling it again.
//!
//! Every call instantiates afresh from the `InstancePre`, in a new `Store` with its own fuel
//! and memory limit, and drops the instance afterwards: no state leaks between calls or
//! buckets, and a trapped (poisoned) instance is never entered again.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Cache, CacheConfig, Config, Engine, ResourceLimiter, Store, Trap};

use crate::bindings::ReconcilerPluginPre;
use crate::bindings::quiver::plugin::types as wit;
use crate::error::PluginError;

/// One concurrent version of a key, as a reconciler sees it (the WIT record `sibling`).
pub use crate::bindings::quiver::plugin::types::Sibling;

/// Default fuel per call. A Rust merge of three small JSON values costs ~15 k units and a
/// Python one ~200 k; this leaves room for megabyte values while stopping a loop in about a
/// second.
pub const DEFAULT_FUEL: u64 = 1_000_000_000;

/// Default cap of a call's linear memory. It must hold the siblings (up to the node's
/// sibling limit times its value limit), the plugin's parsed form of them, and its output.
pub const DEFAULT_MEMORY_BYTES: usize = 128 * 1024 * 1024;

/// Default cap of one returned value: the node's default value size limit
/// (`quiver_core::limits::VALUE_BYTES_MAX_DEFAULT`), since a merge result is stored as a value.
pub const DEFAULT_OUTPUT_BYTES: usize = 1024 * 1024;

/// Default wall-clock backstop of one call: far above what the default fuel allows (about a
/// second), so it only ends calls that fuel cannot stop in time (a host stalled under load,
/// a pathological instantiation).
pub const DEFAULT_CALL_WALL: std::time::Duration = std::time::Duration::from_secs(10);

/// How often the engine's epoch advances; the wall-clock backstop counts in these ticks.
const EPOCH_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// Most examples a plugin may return: the law check merges combinations of them.
const EXAMPLES_MAX: usize = 64;

/// Most table elements (function references) an instance may have; Rust guests need a few
/// hundred at most.
const TABLE_ELEMENTS_MAX: usize = 100_000;

/// Hex characters of the content hash shown in error messages.
const SHORT_HASH_CHARS: usize = 12;

/// What one call may consume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Wasm fuel (about one unit per instruction). Deterministic: the same call runs out at
    /// the same point on every node.
    pub fuel: u64,
    /// Cap of each linear memory of the instance, in bytes.
    pub memory_bytes: usize,
    /// Cap of any one returned value, in bytes (for `examples`, of each example).
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: DEFAULT_FUEL,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            output_bytes: DEFAULT_OUTPUT_BYTES,
        }
    }
}

/// What a merge produces.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Merged {
    /// One value that replaces every sibling.
    Value(Vec<u8>),
    /// The key is deleted.
    Tombstone,
}

/// A call's result with the fuel it consumed (for benchmarks and capacity planning).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metered<T> {
    /// The call's result.
    pub value: T,
    /// Fuel units consumed, instantiation included.
    pub fuel_used: u64,
}

/// The SHA-256 of `bytes`, in lowercase hex: a plugin version's identity.
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(digest.len() * 2);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// One per node: the Wasm engine (fuel metering on) and the compile caches.
pub struct PluginRuntime {
    engine: Engine,
    /// Empty: a reconciler gets no host functions, so no ambient authority.
    linker: Linker<CallState>,
    /// Shares wasmtime's disk-cache hit/miss counters.
    cache: Cache,
    /// Compiled plugins by content hash.
    loaded: Mutex<HashMap<String, Arc<Compiled>>>,
    /// The wall-clock backstop of a call, in epoch ticks.
    wall_ticks: u64,
}

struct Compiled {
    engine: Engine,
    pre: ReconcilerPluginPre<CallState>,
    wall_ticks: u64,
}

impl fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginRuntime")
            .field("cache_dir", self.cache.directory())
            .finish_non_exhaustive()
    }
}

impl PluginRuntime {
    /// Creates the runtime, with its compile cache in `cache_dir` (created if missing;
    /// reused across restarts).
    pub fn new(cache_dir: &Path) -> Result<Self, PluginError> {
        Self::with_wall_limit(cache_dir, DEFAULT_CALL_WALL)
    }

    /// [`PluginRuntime::new`] with `wall` as the wall-clock backstop of every call.
    pub fn with_wall_limit(
        cache_dir: &Path,
        wall: std::time::Duration,
    ) -> Result<Self, PluginError> {
        std::fs::create_dir_all(cache_dir).map_err(|source| PluginError::CacheDir {
            path: cache_dir.to_path_buf(),
            source,
        })?;
        let mut cache_config = CacheConfig::new();
        cache_config.with_directory(cache_dir);
        let cache = Cache::new(cache_config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let mut config = Config::new();
        // Fuel rather than epochs: it stops a call at the same instruction on every node, so
        // whether a merge "took too long" is as deterministic as its result.
        config.consume_fuel(true);
        // Epochs besides fuel, as a wall-clock backstop only: fuel decides whether a call
        // fails on every node alike; the epoch deadline ends a call fuel did not stop in
        // time (the host stalled), so no call holds a worker for ever.
        config.epoch_interruption(true);
        config.cache(Some(cache.clone()));
        let engine = Engine::new(&config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        spawn_epoch_ticker(&engine)?;
        let linker = Linker::new(&engine);
        let ticks = wall.as_millis() / EPOCH_TICK.as_millis();
        Ok(PluginRuntime {
            engine,
            linker,
            cache,
            loaded: Mutex::new(HashMap::new()),
            wall_ticks: u64::try_from(ticks).unwrap_or(u64::MAX).max(1),
        })
    }

    /// Compilations this runtime did and stored in the on-disk cache (components it did not
    /// find there).
    pub fn compile_count(&self) -> usize {
        self.cache.cache_misses()
    }

    /// Loads served from the on-disk cache of a previous compile.
    pub fn disk_cache_hits(&self) -> usize {
        self.cache.cache_hits()
    }

    /// Validates `bytes` (a component, exporting the `reconciler` interface of
    /// `quiver:plugin@0.1.0`, importing nothing but type definitions), compiles it once per content hash and
    /// returns the loaded plugin. `name` is only used to label errors and logs.
    pub fn load_reconciler(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<Arc<Reconciler>, PluginError> {
        let hash = content_hash(bytes);
        let label = format!("{name}@{}", &hash[..SHORT_HASH_CHARS]);
        let known = self
            .loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hash)
            .cloned();
        let compiled = match known {
            Some(compiled) => compiled,
            None => {
                // Compiled outside the lock: a slow compile must not block loads of other
                // plugins. Two racing loads of one new plugin both compile; the disk cache
                // and the map keep one.
                let compiled = Arc::new(self.compile(&label, bytes)?);
                let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
                loaded.entry(hash.clone()).or_insert(compiled).clone()
            }
        };
        Ok(Arc::new(Reconciler {
            name: name.to_owned(),
            hash,
            label,
            compiled,
        }))
    }

    fn compile(&self, label: &str, bytes: &[u8]) -> Result<Compiled, PluginError> {
        check_component_header(label, bytes)?;
        let component = Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
            plugin: label.to_owned(),
            detail: format!("{e:#}"),
        })?;
        let component_type = component.component_type();
        let imports: Vec<String> = component_type
            .imports(&self.engine)
            .filter(|(_, import)| !grants_nothing(&self.engine, &import.ty))
            .map(|(name, _)| name.to_owned())
            .collect();
        if !imports.is_empty() {
            return Err(PluginError::ForbiddenImports {
                plugin: label.to_owned(),
                imports,
            });
        }
        let wrong_world = |e: wasmtime::Error| PluginError::WrongWorld {
            plugin: label.to_owned(),
            detail: format!("{e:#}"),
        };
        let pre: InstancePre<CallState> = self
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = ReconcilerPluginPre::new(pre).map_err(wrong_world)?;
        Ok(Compiled {
            engine: self.engine.clone(),
            pre,
            wall_ticks: self.wall_ticks,
        })
    }
}

/// Advances `engine`'s epoch every [`EPOCH_TICK`] until the engine is dropped (the thread
/// holds only a weak reference).
fn spawn_epoch_ticker(engine: &Engine) -> Result<(), PluginError> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("plugin-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .map(drop)
        .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))
}

/// True for an import that only names types (records, variants...), with no function or
/// resource: it gives the plugin no way to call out. Componentizing a guest whose exported
/// interface `use`s types from `quiver:plugin/types` produces exactly such an import, and an
/// empty linker satisfies it.
fn grants_nothing(engine: &Engine, item: &ComponentItem) -> bool {
    match item {
        ComponentItem::Type(_) => true,
        ComponentItem::ComponentInstance(instance) => instance
            .exports(engine)
            .all(|(_, export)| grants_nothing(engine, &export.ty)),
        _ => false,
    }
}

/// Tells a core module (or non-Wasm bytes) from a component before compiling, for a clear
/// error. Both start with `\0asm`; then a core module has version 1 and layer 0, a component
/// layer 1.
fn check_component_header(label: &str, bytes: &[u8]) -> Result<(), PluginError> {
    let not_a_component = |detail: &str| {
        Err(PluginError::NotAComponent {
            plugin: label.to_owned(),
            detail: detail.to_owned(),
        })
    };
    match bytes {
        [0, b'a', b's', b'm', _, _, 1, 0, ..] => Ok(()),
        [0, b'a', b's', b'm', _, _, 0, 0, ..] => not_a_component(
            "it is a core Wasm module; componentize it against the reconciler-plugin world",
        ),
        [0, b'a', b's', b'm', ..] => not_a_component("unknown Wasm layer or truncated header"),
        _ => not_a_component("no Wasm magic number"),
    }
}

/// The store data of one call: the memory limiter, which remembers that it refused a grow
/// so that the resulting trap is reported as a memory limit rather than a generic trap.
struct CallState {
    memory_bytes: usize,
    refused_grow: bool,
}

impl ResourceLimiter for CallState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.refused_grow = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS_MAX)
    }
}

/// A loaded reconciler plugin. Cheap to share: every call creates its own instance.
pub struct Reconciler {
    name: String,
    hash: String,
    /// `name@shorthash`, for errors.
    label: String,
    compiled: Arc<Compiled>,
}

impl fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconciler")
            .field("name", &self.name)
            .field("hash", &self.hash)
            .finish()
    }
}

/// A typed call's outcome before the output check: the WIT `result` inside a wasmtime result.
type Raw<T> = wasmtime::Result<T>;

impl Reconciler {
    /// The name it was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The content hash (hex SHA-256) of its component.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// `name@shorthash`, as errors name it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Reconciles concurrent versions into one (at least one sibling).
    pub fn merge(&self, siblings: &[Sibling], limits: &Limits) -> Result<Merged, PluginError> {
        self.merge_metered(siblings, limits).map(|m| m.value)
    }

    /// [`Reconciler::merge`], also reporting the fuel it used.
    pub fn merge_metered(
        &self,
        siblings: &[Sibling],
        limits: &Limits,
    ) -> Result<Metered<Merged>, PluginError> {
        if siblings.is_empty() {
            return Err(PluginError::NoSiblings {
                plugin: self.label.clone(),
            });
        }
        let call = "merge";
        let metered = self.call(call, limits, |plugin, store| {
            plugin
                .quiver_plugin_reconciler()
                .call_merge(store, siblings)
        })?;
        let value = match self.refused(call, metered.value)? {
            wit::Merged::Value(bytes) => {
                self.check_output(call, bytes.len(), limits)?;
                Merged::Value(bytes)
            }
            wit::Merged::Tombstone => Merged::Tombstone,
        };
        Ok(Metered {
            value,
            fuel_used: metered.fuel_used,
        })
    }

    /// Applies a server-side operation to `current` (none: the key is absent or deleted) on
    /// behalf of `actor`, returning the new value.
    pub fn update(
        &self,
        current: Option<&[u8]>,
        op: &[u8],
        actor: &str,
        limits: &Limits,
    ) -> Result<Vec<u8>, PluginError> {
        let call = "update";
        let current = current.map(<[u8]>::to_vec);
        let metered = self.call(call, limits, |plugin, store| {
            plugin
                .quiver_plugin_reconciler()
                .call_update(store, current.as_deref(), op, actor)
        })?;
        let value = self.refused(call, metered.value)?;
        self.check_output(call, value.len(), limits)?;
        Ok(value)
    }

    /// The plugin's example values, for law checks.
    pub fn examples(&self, limits: &Limits) -> Result<Vec<Vec<u8>>, PluginError> {
        let call = "examples";
        let examples = self
            .call(call, limits, |plugin, store| {
                plugin.quiver_plugin_reconciler().call_examples(store)
            })?
            .value;
        if examples.len() > EXAMPLES_MAX {
            return Err(PluginError::OutputTooLarge {
                plugin: self.label.clone(),
                call,
                bytes: examples.iter().map(Vec::len).sum(),
                limit: limits.output_bytes,
            });
        }
        for example in &examples {
            self.check_output(call, example.len(), limits)?;
        }
        Ok(examples)
    }

    /// Runs `f` in a fresh instance with `limits`, mapping sandbox failures to errors.
    fn call<T>(
        &self,
        call: &'static str,
        limits: &Limits,
        f: impl FnOnce(&crate::bindings::ReconcilerPlugin, &mut Store<CallState>) -> Raw<T>,
    ) -> Result<Metered<T>, PluginError> {
        let mut store = Store::new(
            &self.compiled.engine,
            CallState {
                memory_bytes: limits.memory_bytes,
                refused_grow: false,
            },
        );
        store.limiter(|state| state as &mut dyn ResourceLimiter);
        store
            .set_fuel(limits.fuel)
            .map_err(|e| self.trap(call, e))?;
        store.set_epoch_deadline(self.compiled.wall_ticks);
        store.epoch_deadline_trap();
        let result = self
            .compiled
            .pre
            .instantiate(&mut store)
            .and_then(|plugin| f(&plugin, &mut store));
        // The instance (and its store) is dropped on return, trapped or not.
        match result {
            Ok(value) => {
                let fuel_left = store.get_fuel().unwrap_or(0);
                Ok(Metered {
                    value,
                    fuel_used: limits.fuel.saturating_sub(fuel_left),
                })
            }
            Err(e) => Err(self.classify(call, limits, store.data().refused_grow, e)),
        }
    }

    fn classify(
        &self,
        call: &'static str,
        limits: &Limits,
        refused_grow: bool,
        e: wasmtime::Error,
    ) -> PluginError {
        let plugin = self.label.clone();
        if refused_grow {
            return PluginError::MemoryLimit {
                plugin,
                call,
                memory_bytes: limits.memory_bytes,
            };
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
            return PluginError::OutOfFuel {
                plugin,
                call,
                fuel: limits.fuel,
            };
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            let ms = self
                .compiled
                .wall_ticks
                .saturating_mul(EPOCH_TICK.as_millis() as u64);
            return PluginError::WallClock { plugin, call, ms };
        }
        self.trap(call, e)
    }

    fn trap(&self, call: &'static str, e: wasmtime::Error) -> PluginError {
        PluginError::Trap {
            plugin: self.label.clone(),
            call,
            detail: format!("{e:#}"),
        }
    }

    fn refused<T>(
        &self,
        call: &'static str,
        result: Result<T, wit::PluginError>,
    ) -> Result<T, PluginError> {
        let plugin = self.label.clone();
        result.map_err(|e| match e {
            wit::PluginError::InvalidValue(message) => PluginError::InvalidValue {
                plugin,
                call,
                message,
            },
            wit::PluginError::InvalidOp(message) => PluginError::InvalidOp {
                plugin,
                call,
                message,
            },
            wit::PluginError::Unsupported(message) => PluginError::Unsupported {
                plugin,
                call,
                message,
            },
        })
    }

    fn check_output(
        &self,
        call: &'static str,
        bytes: usize,
        limits: &Limits,
    ) -> Result<(), PluginError> {
        if bytes > limits.output_bytes {
            return Err(PluginError::OutputTooLarge {
                plugin: self.label.clone(),
                call,
                bytes,
                limit: limits.output_bytes,
            });
        }
        Ok(())
    }
}
