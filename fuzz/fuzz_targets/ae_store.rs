//! What a node reads back from its own store at start: anti-entropy entries (`AeIndex::open`
//! loads them, or rebuilds them from the data records when unreadable) and the key layout.
//!
//! The input is a list of engine `(key, value)` pairs (`quiver_fuzz::decode_pairs`).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use quiver_core::storage::{WriteBatch, keys};
use quiver_node_core::ae::{AeIndex, Placement};
use quiver_storage::{Durability, MemoryEngine, Store};

fuzz_target!(|bytes: &[u8]| {
    let pairs = quiver_fuzz::decode_pairs(bytes);
    for (k, _) in &pairs {
        let _ = keys::split_ae_key(k);
        let _ = keys::split_hint_key(k);
        quiver_fuzz::check_data_key(k);
    }
    let store = Store::new(Arc::new(MemoryEngine::new()), Durability::Buffered);
    let mut batch = WriteBatch::new();
    for (k, v) in pairs {
        batch.put(k, v);
    }
    // The marker `AeIndex::open` reads (ae.rs `INDEX_MARKER`) with the partition count the
    // entries claim to be filed for (64), so it loads them first instead of rebuilding.
    batch.put(keys::meta_key("ae-index-v1"), 64u32.to_be_bytes().to_vec());
    store.apply(&batch).expect("memory store");
    let index = AeIndex::with_clock(std::sync::Arc::new(quiver_node_core::SystemClock));
    index.set_placement(Placement {
        partitions: 64,
        default_n: 3,
        buckets: [("b3".to_string(), 2u8)].into_iter().collect(),
    });
    let keys = index.open(&store).expect("memory store");
    assert_eq!(keys, index.keys());
    for id in index.tree_ids().into_iter().take(4) {
        let _ = index.root(id);
        let _ = index.groups(id);
        let _ = index.leaf_keys(&store, id, 0, 16).expect("memory store");
    }
    let _ = index.misfiled(&store, 16).expect("memory store");
    let _ = index
        .reap_candidates(&store, u64::MAX, 4)
        .expect("memory store");
});
