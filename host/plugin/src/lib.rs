//! The node's runtime for reconciler plugins: Wasm components, sandboxed by wasmtime.
//!
//! Layout:
//! - [`runtime`]: [`PluginRuntime`] (one per node: engine, compile cache) and [`Reconciler`]
//!   (a loaded plugin; every call runs in a fresh instance with fuel and memory limits).
//! - [`error`]: [`PluginError`], one variant per way a plugin can fail, each naming the plugin.
//! - [`laws`]: [`check_laws`], which checks the merge laws of `wit/quiver-plugin.wit`
//!   through the component boundary.
//! - [`conformance`]: the suite every shipped reconciler passes (laws plus the semantics of
//!   cart, lww and counter), in the library so tests and `quiver plugin validate` share it.
//!
//! Architecture invariants: a reconciler gets no imports at all (an empty linker, no WASI),
//! so it cannot reach clocks, randomness, files or the network; nothing a plugin does can
//! change the caller's data (inputs are copied into the guest, outputs copied out and
//! size-checked); no instance outlives a call.

pub mod conformance;
pub mod error;
pub mod laws;
pub mod runtime;

pub use error::PluginError;
pub use laws::{Law, LawReport, LawViolation, check_laws};
pub use runtime::{
    DEFAULT_FUEL, DEFAULT_MEMORY_BYTES, DEFAULT_OUTPUT_BYTES, Limits, Merged, Metered,
    PluginRuntime, Reconciler, Sibling, content_hash,
};

/// Generated bindings of the `reconciler-plugin` world.
mod bindings {
    wasmtime::component::bindgen!({
        world: "reconciler-plugin",
        path: "../../wit",
    });
}
