//! Cluster metadata: the stored `cluster-meta` value (`MetaStore::open`: format tag 1, 2 or
//! 3, then postcard) and the bare postcard `MetaState` that gossip carries.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use quiver_core::meta::MetaState;
use quiver_core::storage::{WriteBatch, keys};
use quiver_node::meta::MetaStore;
use quiver_storage::{Durability, MemoryEngine, Store};

/// One store for the whole run (a store starts a syncer thread); each input overwrites
/// the state key.
fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| Store::new(Arc::new(MemoryEngine::new()), Durability::Buffered))
}

fuzz_target!(|bytes: &[u8]| {
    let store = store();
    let mut batch = WriteBatch::new();
    batch.put(keys::meta_key("cluster-meta"), bytes.to_vec());
    store.apply(&batch).expect("memory store");
    if let Ok(meta) = MetaStore::open(store.clone()) {
        let state = meta.state();
        quiver_fuzz::check_meta(&state);
        assert_eq!(meta.digest(), state.digest());
    }
    // Gossip carries the state without the tag.
    if let Some((_, body)) = bytes.split_first()
        && let Ok(state) = postcard::from_bytes::<MetaState>(body)
    {
        quiver_fuzz::check_meta(&state);
    }
});
