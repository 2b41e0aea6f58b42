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

/// A node machine's disk for tests: a memory engine and the metadata; syncs inline, or
/// left to the test as `Effect::Sync` when `deferred` (the server's shape).
#[derive(Debug)]
pub struct TestDisk {
    pub engine: std::sync::Arc<quiver_storage::MemoryEngine>,
    pub meta: Option<quiver_core::meta::MetaState>,
    pub deferred: bool,
}

impl TestDisk {
    /// An empty disk.
    pub fn new(deferred: bool) -> Self {
        TestDisk {
            engine: std::sync::Arc::new(quiver_storage::MemoryEngine::new()),
            meta: None,
            deferred,
        }
    }
}

impl quiver_node_core::node::NodeDisk for TestDisk {
    fn engine(&self) -> std::sync::Arc<dyn StorageEngine> {
        std::sync::Arc::clone(&self.engine) as std::sync::Arc<dyn StorageEngine>
    }
    fn fresh_incarnation(&self) -> u64 {
        7
    }
    fn meta(&self) -> Option<&quiver_core::meta::MetaState> {
        self.meta.as_ref()
    }
    fn store_meta(&mut self, meta: quiver_core::meta::MetaState) {
        self.meta = Some(meta);
    }
    fn sync_inline(&self) -> Option<Result<(), String>> {
        (!self.deferred).then(|| self.engine.sync().map_err(|e| e.to_string()))
    }
}

/// Node machine settings for tests: n/r/w as given, sync durability, no background
/// passes but gossip and handoff every second.
pub fn node_config(n: usize, r: usize, w: usize) -> quiver_node_core::node::NodeConfig {
    quiver_node_core::node::NodeConfig {
        quorum: quiver_core::quorum::Quorum::new(n, r, w).expect("valid quorum"),
        sloppy: true,
        buckets: Default::default(),
        durability: quiver_node_core::node::Durability::Sync,
        value_bytes_max: 1 << 20,
        response_bytes_max: 64 << 20,
        peer_timeout_ms: 300,
        forward_timeout_ms: 1_000,
        hints_every_ms: 500,
        read_repair: true,
        full_reads_per_mille: 1000,
        read_speculate_ms: None,
        ae_every_ms: None,
        tombstone_grace_ms: None,
        gossip_every_ms: 1_000,
        handoff_every_ms: 1_000,
        handoff_listing_ms: 0,
        broken: quiver_node_core::broken::Broken::NONE,
    }
}
