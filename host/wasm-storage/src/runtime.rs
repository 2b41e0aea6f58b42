//! The wasmtime side of a storage adapter: engines, compiled components, the WASI context,
//! and calls into the guest.
//!
//! Calls are made through wasmtime's async API and driven to completion on the calling
//! thread by [`block_on`]. Why not the sync API: wasmtime-wasi's synchronous bindings enter
//! a tokio runtime for every WASI call, which panics when the caller is itself a tokio
//! worker, and the node calls `apply` from async tasks. With the async API the guest runs on
//! a fiber; file operations run inline (`allow_blocking_current_thread`), as fjall's do.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceAny, ResourceTable};
use wasmtime::{Cache, CacheConfig, Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use quiver_core::storage::KvPairs;

use crate::AdapterLimits;
use crate::stderr::TracingStderr;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "storage-adapter",
        exports: { default: async },
    });
}

pub(crate) use bindings::exports::quiver::plugin::engine::BatchOp as WitBatchOp;

/// See [`crate::ALLOWED_IMPORT_PREFIXES`].
pub(crate) const ALLOWED_IMPORT_PREFIXES: &[&str] = &[
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:io/",
    "wasi:random/",
];

/// How a call into the guest failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The guest returned an error; the instance is still usable.
    Guest(String),
    /// The guest trapped (or wasmtime failed the call); the instance is unusable.
    Trap(String),
}

/// What a store's host side holds: the guest's whole world.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// One wasmtime engine per compiled-code cache directory: the cache is engine
/// configuration. Every engine meters fuel, so every compiled artifact has fuel checks.
fn engine_for(cache_dir: &Path) -> Result<Engine, String> {
    static ENGINES: OnceLock<Mutex<HashMap<PathBuf, Engine>>> = OnceLock::new();
    let engines = ENGINES.get_or_init(Default::default);
    let mut engines = engines
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(engine) = engines.get(cache_dir) {
        return Ok(engine.clone());
    }
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| format!("create compiled-code cache {}: {e}", cache_dir.display()))?;
    let mut cache_config = CacheConfig::new();
    cache_config.with_directory(cache_dir);
    let cache = Cache::new(cache_config)
        .map_err(|e| format!("compiled-code cache in {}: {e:#}", cache_dir.display()))?;
    let mut config = Config::new();
    config.consume_fuel(true).cache(Some(cache));
    let engine = Engine::new(&config).map_err(|e| format!("create wasmtime engine: {e:#}"))?;
    engines.insert(cache_dir.to_path_buf(), engine.clone());
    Ok(engine)
}

/// A component compiled and linked, ready to instantiate.
pub(crate) struct LoadedComponent {
    engine: Engine,
    pre: bindings::StorageAdapterPre<HostState>,
}

impl LoadedComponent {
    /// Loads `path`, compiling it only if this process has not compiled the same bytes for
    /// this cache yet (and then only if wasmtime's on-disk cache misses).
    pub(crate) fn load(path: &Path, cache_dir: &Path) -> Result<Arc<Self>, String> {
        type Key = (PathBuf, [u8; 32]);
        static LOADED: OnceLock<Mutex<HashMap<Key, Arc<LoadedComponent>>>> = OnceLock::new();

        let bytes =
            std::fs::read(path).map_err(|e| format!("read component {}: {e}", path.display()))?;
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        let key = (cache_dir.to_path_buf(), hash);
        let loaded = LOADED.get_or_init(Default::default);
        // Held across the compile on purpose: two threads opening the same component wait
        // for one compilation instead of doing two.
        let mut loaded = loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(hit) = loaded.get(&key) {
            return Ok(Arc::clone(hit));
        }
        let engine = engine_for(cache_dir)?;
        let component = Component::new(&engine, &bytes)
            .map_err(|e| format!("compile component {}: {e:#}", path.display()))?;
        check_imports(&engine, &component)
            .map_err(|e| format!("component {}: {e}", path.display()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| format!("link WASI: {e:#}"))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| format!("link component {}: {e:#}", path.display()))?;
        let pre = bindings::StorageAdapterPre::new(pre).map_err(|e| {
            format!(
                "component {} does not implement the storage-adapter world: {e:#}",
                path.display()
            )
        })?;
        let this = Arc::new(Self { engine, pre });
        loaded.insert(key, Arc::clone(&this));
        Ok(this)
    }
}

fn import_names(engine: &Engine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// Refuses a component that imports anything a storage adapter must not have.
fn check_imports(engine: &Engine, component: &Component) -> Result<(), String> {
    let refused: Vec<String> = import_names(engine, component)
        .into_iter()
        .filter(|name| !ALLOWED_IMPORT_PREFIXES.iter().any(|p| name.starts_with(p)))
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "imports {} which a storage adapter may not use (allowed: {})",
            refused.join(", "),
            ALLOWED_IMPORT_PREFIXES.join(", ")
        ))
    }
}

/// The import names of the component at `path`.
pub(crate) fn component_imports(path: &Path) -> Result<Vec<String>, String> {
    // Parsing needs an engine but no compiled code: a throw-away default engine will do.
    let engine = Engine::default();
    let bytes =
        std::fs::read(path).map_err(|e| format!("read component {}: {e}", path.display()))?;
    let component = Component::new(&engine, &bytes)
        .map_err(|e| format!("compile component {}: {e:#}", path.display()))?;
    Ok(import_names(&engine, &component))
}

/// A live instance with its open store resource.
pub(crate) struct Instance {
    store: Store<HostState>,
    bindings: bindings::StorageAdapter,
    handle: ResourceAny,
    call_fuel: u64,
}

impl Instance {
    /// Instantiates the component with `data_dir` as its only directory and opens its store.
    pub(crate) fn open(
        loaded: &LoadedComponent,
        name: &str,
        data_dir: &Path,
        limits: &AdapterLimits,
    ) -> Result<Self, CallError> {
        let mut wasi = WasiCtx::builder();
        // Must precede the preopen: the directory captures the setting.
        wasi.allow_blocking_current_thread(true)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .stderr(TracingStderr::new(name));
        wasi.preopened_dir(data_dir, "/data", FsPerms::ReadWrite)
            .map_err(|e| {
                CallError::Guest(format!(
                    "preopen data directory {}: {e:#}",
                    data_dir.display()
                ))
            })?;
        let host = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes_max)
                .table_elements(limits.memory_bytes_max / 8)
                .instances(16)
                .memories(4)
                .tables(16)
                .build(),
        };
        let mut store = Store::new(&loaded.engine, host);
        store.limiter(|host| &mut host.limits);
        set_fuel(&mut store, limits.open_fuel_max)?;
        let bindings = run(loaded.pre.instantiate_async(&mut store))?;
        let handle = run(bindings
            .quiver_plugin_engine()
            .store()
            .call_open(&mut store))?
        .map_err(CallError::Guest)?;
        Ok(Self {
            store,
            bindings,
            handle,
            call_fuel: limits.call_fuel_max,
        })
    }

    fn prepare(&mut self) -> Result<(), CallError> {
        // Fuel is a budget per call, not per instance: refill rather than add.
        set_fuel(&mut self.store, self.call_fuel)
    }

    pub(crate) fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, CallError> {
        self.prepare()?;
        let store = self.bindings.quiver_plugin_engine().store();
        run(store.call_get(&mut self.store, self.handle, key))?.map_err(CallError::Guest)
    }

    pub(crate) fn apply(&mut self, ops: &[WitBatchOp]) -> Result<(), CallError> {
        self.prepare()?;
        let store = self.bindings.quiver_plugin_engine().store();
        run(store.call_apply(&mut self.store, self.handle, ops))?.map_err(CallError::Guest)
    }

    pub(crate) fn sync(&mut self) -> Result<(), CallError> {
        self.prepare()?;
        let store = self.bindings.quiver_plugin_engine().store();
        run(store.call_sync(&mut self.store, self.handle))?.map_err(CallError::Guest)
    }

    pub(crate) fn scan(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: u32,
    ) -> Result<KvPairs, CallError> {
        self.prepare()?;
        let store = self.bindings.quiver_plugin_engine().store();
        run(store.call_scan(&mut self.store, self.handle, start, end, limit))?
            .map_err(CallError::Guest)
    }
}

fn set_fuel(store: &mut Store<HostState>, fuel: u64) -> Result<(), CallError> {
    store
        .set_fuel(fuel)
        .map_err(|e| CallError::Trap(format!("set fuel: {e:#}")))
}

/// Drives a wasmtime call to completion and turns a trap into [`CallError::Trap`].
fn run<T>(call: impl Future<Output = wasmtime::Result<T>>) -> Result<T, CallError> {
    block_on(call).map_err(|e| {
        let why = match e.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => "it ran out of fuel (raise AdapterLimits::call_fuel_max \
                                      if the call is legitimately long)"
                .to_owned(),
            Some(trap) => format!("{trap}"),
            None => "call failed".to_owned(),
        };
        CallError::Trap(format!("{why}: {e:#}"))
    })
}

/// Wakes the thread that polls the future.
struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `future` on this thread until it completes, parking while it waits.
///
/// With file operations inline the guest's futures are ready at once; a WASI operation that
/// does go to tokio's blocking pool (wasmtime-wasi enters an ambient runtime for it, the
/// caller's or its own) wakes this thread when done.
fn block_on<F: Future>(future: F) -> F::Output {
    wasmtime_wasi::runtime::with_ambient_tokio_runtime(|| {
        let mut future = pin!(future);
        let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            match future.as_mut().poll(&mut cx) {
                Poll::Ready(output) => return output,
                // A spurious unpark only costs another poll.
                Poll::Pending => thread::park(),
            }
        }
    })
}
