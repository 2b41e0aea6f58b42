//! `logstore`: a log-structured storage engine as a WebAssembly component.
//!
//! It implements the `storage-adapter` world of `wit/quiver-plugin.wit` (the node's
//! `StorageEngine` contract) on the one directory the host preopens as `/data`:
//!
//! - `log.rs` — the on-disk format: a header, then one checksummed record per `apply`, so a
//!   batch is atomic on disk: recovery keeps a record whole or drops it whole.
//! - `store.rs` — the engine: an ordered in-memory index (`BTreeMap` from key to the value's
//!   place in the log) rebuilt by replaying the log on open, recovery that truncates a torn
//!   or corrupt tail, `sync` = `fdatasync` of the log, and compaction (live data rewritten
//!   to a new file that atomically replaces the log) once the log is mostly garbage.
//!
//! Every failure is an `Err(String)` that says what was being done; nothing a file can hold
//! makes the component trap.

mod log;
mod store;

// The generated glue is `unsafe` (raw canonical-ABI exports); our own code is not.
#[allow(unsafe_code, missing_docs)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "storage-adapter",
    });

    use super::Component;
    export!(Component);
}

use std::cell::RefCell;

use bindings::exports::quiver::plugin::engine::{self, BatchOp};

/// The component: its only export is the `store` resource.
struct Component;

impl engine::Guest for Component {
    type Store = Store;
}

/// The exported resource. The canonical ABI hands methods `&self`, and the component is
/// single-threaded, so the engine lives in a `RefCell`.
pub struct Store {
    inner: RefCell<store::LogStore>,
}

impl Store {
    fn with<T>(
        &self,
        f: impl FnOnce(&mut store::LogStore) -> Result<T, String>,
    ) -> Result<T, String> {
        // The host never re-enters a resource while one of its calls runs, so a borrow
        // failure means a host bug: report it instead of trapping.
        let mut inner = self
            .inner
            .try_borrow_mut()
            .map_err(|_| "logstore: re-entrant call into the store".to_owned())?;
        f(&mut inner)
    }
}

impl engine::GuestStore for Store {
    fn open() -> Result<engine::Store, String> {
        let inner = store::LogStore::open(store::DATA_DIR)?;
        Ok(engine::Store::new(Store {
            inner: RefCell::new(inner),
        }))
    }

    fn get(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        self.with(|s| s.get(&key))
    }

    fn apply(&self, batch: Vec<BatchOp>) -> Result<(), String> {
        let ops = batch
            .into_iter()
            .map(|op| match op {
                BatchOp::Put((key, value)) => log::Op::Put { key, value },
                BatchOp::Delete(key) => log::Op::Delete { key },
            })
            .collect::<Vec<_>>();
        self.with(|s| s.apply(ops))
    }

    fn sync(&self) -> Result<(), String> {
        self.with(|s| s.sync())
    }

    fn scan(
        &self,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: u32,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
        self.with(|s| s.scan(&start, end.as_deref(), limit))
    }
}
