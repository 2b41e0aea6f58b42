//! Storage engines as sandboxed WebAssembly components.
//!
//! A storage adapter is a component of the `storage-adapter` world of `wit/quiver-plugin.wit`
//! (an ordered byte map with atomic batches). [`WasmEngine`] runs one with wasmtime and
//! presents it as a [`quiver_core::storage::StorageEngine`], so the node, its group commit
//! and the conformance suite treat it like fjall.
//!
//! Layout:
//! - this file — [`WasmEngine`] (open, the four calls, poisoning) and [`AdapterLimits`];
//! - `runtime.rs` — the wasmtime side: one [`wasmtime::Engine`] per cache directory, each
//!   component compiled once per content hash (and cached on disk by wasmtime's cache), the
//!   WASI context that is the guest's whole world, and the import allow-list;
//! - `build.rs` — builds the bundled `logstore` guest (`plugins/logstore`), whose path is
//!   [`logstore_component`].
//!
//! # The sandbox
//!
//! The guest sees exactly one directory, preopened as `/data`: the data directory given to
//! [`WasmEngine::open`] (paths cannot escape it: `..` and symlinks out of it are refused by
//! wasmtime-wasi's capability-based filesystem). It gets no environment variables, no
//! arguments, an empty stdin, a stdout that discards what is written, and a stderr that goes
//! line by line to the `tracing` log (target `quiver_wasm_storage::guest`, at most 4 KiB a
//! line). Errors come back as `result` strings. No network: a component that imports
//! `wasi:sockets`, `wasi:http` or anything but the WASI CLI, clock, filesystem, I/O and
//! random interfaces is refused at open, and the context denies every socket operation
//! besides. It does see the real wall and monotonic clocks and a real random source: a
//! storage engine's output is its stored data, which does not depend on either (Rust's
//! standard library draws random hash seeds, and a timestamp in a file name harms nothing),
//! and unlike a reconciler it has no replicated-determinism law to break.
//!
//! # Limits
//!
//! Each call runs with a fuel budget ([`AdapterLimits::call_fuel_max`], the open with
//! [`AdapterLimits::open_fuel_max`]) so a guest that loops forever fails its call instead of
//! hanging the node, and the guest's memory is capped ([`AdapterLimits::memory_bytes_max`]).
//! Fuel, not epochs: it needs no timer thread and a budget runs out at the same point on
//! every run, which keeps tests deterministic.
//!
//! # Failures
//!
//! - The guest returns an error: the call fails with [`StorageError::Io`] carrying the
//!   guest's message; the engine stays usable (the guest decides what its own state allows).
//! - The guest traps (a panic, running out of fuel or memory): a trapped instance cannot be
//!   entered again, so the engine is poisoned and every later call fails with
//!   [`StorageError::Poisoned`] naming the trap. Reopen to recover (the guest replays its
//!   log). Nothing the guest does can panic the host.
//! - `sync` fails: the engine is poisoned as the engine contract requires (the kernel may
//!   have dropped the pages it failed to write).

mod runtime;
mod stderr;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use quiver_core::storage::{BatchOp, KvPairs, StorageEngine, StorageError, WriteBatch};

use crate::runtime::{Instance, LoadedComponent};

/// Path of the bundled `logstore` component, built from `plugins/logstore` by this crate's
/// build script.
pub fn logstore_component() -> &'static Path {
    Path::new(env!("QUIVER_LOGSTORE_WASM"))
}

/// Resource limits of one adapter instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterLimits {
    /// Largest linear memory (and sum of tables) the guest may grow to, in bytes.
    pub memory_bytes_max: usize,
    /// Fuel (roughly: Wasm instructions) for one `get`, `apply`, `sync` or `scan`. An
    /// `apply` may compact the guest's log, so this bounds the data a compaction can
    /// rewrite too.
    pub call_fuel_max: u64,
    /// Fuel for opening the store, which replays the guest's log.
    pub open_fuel_max: u64,
}

impl AdapterLimits {
    /// Default memory cap: 1 GiB, a quarter of what wasm32 can address.
    pub const DEFAULT_MEMORY_BYTES_MAX: usize = 1024 * 1024 * 1024;
    /// Default fuel per call: 20 billion units, several seconds of guest CPU. Fuel is the
    /// guard against a guest that never returns, not a latency target: an ordinary `get`
    /// takes a few thousand units, a compaction about 10 per byte of live data.
    pub const DEFAULT_CALL_FUEL_MAX: u64 = 20_000_000_000;
    /// Default fuel for open: 100 billion units, a replay of roughly 10 GB of log.
    pub const DEFAULT_OPEN_FUEL_MAX: u64 = 100_000_000_000;
}

impl Default for AdapterLimits {
    fn default() -> Self {
        Self {
            memory_bytes_max: Self::DEFAULT_MEMORY_BYTES_MAX,
            call_fuel_max: Self::DEFAULT_CALL_FUEL_MAX,
            open_fuel_max: Self::DEFAULT_OPEN_FUEL_MAX,
        }
    }
}

/// A storage adapter component run as a [`StorageEngine`]. See the [crate docs](crate).
pub struct WasmEngine {
    name: String,
    data_dir: PathBuf,
    state: Mutex<State>,
}

enum State {
    Ready(Box<Instance>),
    /// The first fatal failure, rendered.
    Poisoned(String),
}

impl fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasmEngine")
            .field("name", &self.name)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// The engine name for a component file: `wasm:` and its file stem (`wasm:logstore`).
fn engine_name(component: &Path) -> String {
    let stem = component
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".to_owned());
    format!("wasm:{stem}")
}

impl WasmEngine {
    /// Opens the adapter `component` on `data_dir` (created if missing; the guest's `/data`).
    ///
    /// The component is compiled once per content hash per process, and the compiled code
    /// is cached on disk in `wasm-cache/` next to the component (see
    /// [`WasmEngine::open_with_cache_dir`] to put it elsewhere).
    pub fn open(
        component: &Path,
        data_dir: &Path,
        limits: &AdapterLimits,
    ) -> Result<Self, StorageError> {
        let cache_dir = component
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("wasm-cache");
        Self::open_with_cache_dir(component, data_dir, limits, &cache_dir)
    }

    /// Like [`WasmEngine::open`], with the compiled-code cache in `cache_dir`.
    pub fn open_with_cache_dir(
        component: &Path,
        data_dir: &Path,
        limits: &AdapterLimits,
        cache_dir: &Path,
    ) -> Result<Self, StorageError> {
        let name = engine_name(component);
        let io = |op: &'static str| {
            let name = name.clone();
            move |message: String| StorageError::Io {
                engine: name,
                op,
                message,
            }
        };
        std::fs::create_dir_all(data_dir).map_err(|e| {
            io("open")(format!("create data directory {}: {e}", data_dir.display()))
        })?;
        let loaded = LoadedComponent::load(component, cache_dir).map_err(io("open"))?;
        let instance = Instance::open(&loaded, &name, data_dir, limits).map_err(|e| match e {
            runtime::CallError::Guest(message) => io("open")(message),
            runtime::CallError::Trap(message) => {
                io("open")(format!("the adapter trapped: {message}"))
            }
        })?;
        Ok(Self {
            name,
            data_dir: data_dir.to_path_buf(),
            state: Mutex::new(State::Ready(Box::new(instance))),
        })
    }

    /// The component's imports (`wasi:filesystem/types@0.2.x`, ...), for inspection: the
    /// sandbox refuses any outside [`ALLOWED_IMPORT_PREFIXES`].
    pub fn component_imports(component: &Path) -> Result<Vec<String>, StorageError> {
        runtime::component_imports(component).map_err(|message| StorageError::Io {
            engine: engine_name(component),
            op: "inspect",
            message,
        })
    }

    /// The data directory the guest sees as `/data`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StorageError> {
        // A panic while the lock was held can only come from the host side (the guest traps
        // instead); the state it left is still a valid `State`, so carry on.
        Ok(self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Runs one call on the instance, poisoning the engine if the guest traps.
    fn call<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Instance) -> Result<T, runtime::CallError>,
    ) -> Result<T, StorageError> {
        let mut state = self.lock()?;
        let instance = match &mut *state {
            State::Ready(instance) => instance,
            State::Poisoned(cause) => {
                return Err(StorageError::Poisoned {
                    engine: self.name.clone(),
                    cause: cause.clone(),
                });
            }
        };
        match f(instance) {
            Ok(v) => Ok(v),
            Err(runtime::CallError::Guest(message)) => {
                if op == "sync" {
                    *state = State::Poisoned(format!("sync failed: {message}"));
                }
                Err(StorageError::Io {
                    engine: self.name.clone(),
                    op,
                    message,
                })
            }
            Err(runtime::CallError::Trap(message)) => {
                let cause = format!("the adapter trapped during {op}: {message}");
                tracing::error!(engine = %self.name, %cause, "storage adapter poisoned");
                *state = State::Poisoned(cause.clone());
                Err(StorageError::Poisoned {
                    engine: self.name.clone(),
                    cause,
                })
            }
        }
    }
}

/// Interface-name prefixes a storage adapter may import. Everything else (sockets, HTTP,
/// anything unknown) is refused at open.
pub const ALLOWED_IMPORT_PREFIXES: &[&str] = runtime::ALLOWED_IMPORT_PREFIXES;

impl StorageEngine for WasmEngine {
    fn name(&self) -> &str {
        &self.name
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.call("get", |i| i.get(key))
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        let ops: Vec<runtime::WitBatchOp> = batch
            .ops
            .iter()
            .map(|op| match op {
                BatchOp::Put { key, value } => {
                    runtime::WitBatchOp::Put((key.clone(), value.clone()))
                }
                BatchOp::Delete { key } => runtime::WitBatchOp::Delete(key.clone()),
            })
            .collect();
        self.call("apply", |i| i.apply(&ops))
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.call("sync", |i| i.sync())
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<KvPairs, StorageError> {
        // The WIT limit is a u32: ask for at most that much; no node scan comes close.
        let wit_limit = u32::try_from(limit).unwrap_or(u32::MAX);
        let pairs = self.call("scan", |i| i.scan(start, end, wit_limit))?;
        if pairs.len() > limit {
            return Err(StorageError::Io {
                engine: self.name.clone(),
                op: "scan",
                message: format!(
                    "the adapter returned {} pairs for a limit of {limit}",
                    pairs.len()
                ),
            });
        }
        // The adapter is untrusted code: an unordered or out-of-range answer would corrupt
        // whatever the node derives from a scan, so check the contract (linear, cheap).
        let in_range = |k: &[u8]| k >= start && end.is_none_or(|e| k < e);
        let ordered = pairs.windows(2).all(|w| w[0].0 < w[1].0);
        if !ordered || !pairs.iter().all(|(k, _)| in_range(k)) {
            return Err(StorageError::Io {
                engine: self.name.clone(),
                op: "scan",
                message: "the adapter returned pairs out of key order or outside the range"
                    .to_owned(),
            });
        }
        Ok(pairs)
    }
}
