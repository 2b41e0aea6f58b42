//! Helpers shared by the node-core tests.
#![allow(dead_code)] // each test binary uses a different subset

use quiver_core::causality::{
    Coordinator, EpochSource, Object, VersionVector, WriteOp, coordinate_write,
};
use quiver_core::storage::StorageEngine;
use quiver_node_core::epochs::BootEpochs;

/// An epoch source that trusts nothing and counts up: each call writes a fresh version.
pub struct Counter(pub u64);

impl EpochSource for Counter {
    fn is_trusted(&self, _: u64) -> bool {
        false
    }
    fn fresh(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// A one-sibling state holding `value`, written by some other node.
pub fn object(value: &str) -> Object {
    let me = Coordinator {
        node: "writer".into(),
        incarnation: 1,
    };
    let op = WriteOp::Put(value.as_bytes().to_vec());
    coordinate_write(None, &me, &mut Counter(0), &VersionVector::new(), op, 1)
        .0
        .object
}

/// Starts a boot on `store` and makes its batch durable, as a driver does.
pub fn boot(store: &dyn StorageEngine) -> Result<BootEpochs, Box<dyn std::error::Error>> {
    let (epochs, batch) = BootEpochs::start(store, 7)?;
    store.apply(&batch)?;
    store.sync()?;
    Ok(epochs)
}
