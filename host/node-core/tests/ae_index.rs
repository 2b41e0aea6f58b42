//! The anti-entropy index follows every write path exactly: trees updated incrementally
//! equal trees loaded from the on-disk entries and trees rebuilt from the records alone.

use std::collections::BTreeMap;
use std::sync::Arc;

mod support;

use quiver_core::causality::{Coordinator, Object, WriteOp, coordinate_write};
use quiver_core::merkle;
use quiver_core::storage::StorageEngine;
use quiver_core::storage::{WriteBatch, keys};
use quiver_node_core::SystemClock;
use quiver_node_core::ae::{AeIndex, Placement};
use quiver_node_core::replica::Replica;
use quiver_storage::MemoryEngine;
use support::{Counter, boot};

fn write(node: &str, op: WriteOp, after: Option<&Object>) -> Object {
    let me = Coordinator {
        node: node.into(),
        incarnation: 1,
    };
    let context = after.map(|o| o.context().clone()).unwrap_or_default();
    coordinate_write(None, &me, &mut Counter(0), &context, op, 5)
        .0
        .object
}

fn placement(two: u8) -> Placement {
    Placement {
        partitions: 64,
        default_n: 3,
        buckets: BTreeMap::from([("two".to_string(), two)]),
    }
}

/// Roots of every non-empty tree.
fn roots(ae: &AeIndex) -> Vec<((u8, u32), merkle::Hash)> {
    ae.tree_ids()
        .into_iter()
        .map(|id| (id, ae.root(id)))
        .collect()
}

fn reopened(store: &dyn StorageEngine, p: Placement) -> AeIndex {
    let ae = AeIndex::with_clock(Arc::new(SystemClock));
    ae.set_placement(p);
    ae.open(store).expect("open index");
    ae
}

#[test]
fn incremental_trees_equal_loaded_and_rebuilt_trees() {
    let store: Arc<dyn StorageEngine> = Arc::new(MemoryEngine::new());
    let epochs = boot(&*store).expect("boot");
    let kv = Replica::new(
        "n1".into(),
        Arc::clone(&store),
        epochs,
        1 << 20,
        Arc::new(SystemClock),
    );
    kv.ae().set_placement(placement(2));
    assert_eq!(kv.ae().open(&*store).expect("open"), 0);

    let mut live = Vec::new();
    for i in 0..300u32 {
        let bucket = if i % 3 == 0 { "two" } else { "b" };
        let key = format!("k{i}");
        let v1 = write("n2", WriteOp::Put(key.clone().into_bytes()), None);
        kv.merge_remote(bucket, key.as_bytes(), &v1, None)
            .expect("merge");
        match i % 5 {
            // Overwritten by a later version.
            0 => {
                let v2 = write("n3", WriteOp::Put(b"newer".to_vec()), Some(&v1));
                kv.merge_remote(bucket, key.as_bytes(), &v2, None)
                    .expect("merge newer");
            }
            // Deleted: a tombstone.
            1 => {
                let t = write("n3", WriteOp::Delete, Some(&v1));
                kv.merge_remote(bucket, key.as_bytes(), &t, None)
                    .expect("merge tombstone");
            }
            // A stand-in copy handed off and dropped.
            2 => {
                let k2 = format!("h{i}");
                kv.merge_remote(bucket, k2.as_bytes(), &v1, Some("n4"))
                    .expect("hinted");
                kv.hint_delivered("n4", bucket, k2.as_bytes(), &v1, false)
                    .expect("delivered");
            }
            _ => live.push(key),
        }
    }
    assert_eq!(kv.ae().tombstones(), 60, "one key in five is a tombstone");
    // Reap half the tombstones.
    let mut reaped = 0;
    for i in (1..300u32).step_by(10) {
        let bucket = if i % 3 == 0 { "two" } else { "b" };
        let dkey = keys::data_key(bucket.as_bytes(), format!("k{i}").as_bytes()).expect("key");
        let object = kv.objects(std::slice::from_ref(&dkey)).expect("read")[0]
            .1
            .clone();
        assert!(
            kv.reap(&dkey, &merkle::object_digest(&object), &["n2".to_string()])
                .expect("reap")
        );
        reaped += 1;
    }
    assert_eq!(kv.ae().tombstones(), 60 - reaped);
    assert_eq!(
        kv.ae().keys(),
        300 - reaped,
        "dropped stand-ins and reaped keys are gone"
    );

    let incremental = roots(kv.ae());
    assert!(incremental.iter().any(|((n, _), _)| *n == 2));
    assert!(incremental.iter().any(|((n, _), _)| *n == 3));
    let loaded = reopened(&*store, placement(2));
    assert_eq!(roots(&loaded), incremental, "loaded from the entries");
    assert_eq!(loaded.tombstones(), 60 - reaped);

    // Without the marker the entries are rebuilt from the records.
    let mut batch = WriteBatch::new();
    batch.delete(keys::meta_key("ae-index-v1"));
    store.apply(&batch).expect("drop marker");
    let rebuilt = reopened(&*store, placement(2));
    assert_eq!(roots(&rebuilt), incremental, "rebuilt from the records");

    // A bucket whose n changes is refiled, to the trees a rebuild would give.
    assert!(kv.ae().set_placement(placement(3)));
    let misfiled = kv.ae().misfiled(&*store, usize::MAX).expect("scan");
    // Bucket "two" holds every third key (100) less the 10 of them reaped.
    assert_eq!(misfiled.len(), 90, "the keys of bucket two");
    for dkey in &misfiled {
        kv.ae_refile(dkey).expect("refile");
    }
    assert!(
        kv.ae()
            .misfiled(&*store, usize::MAX)
            .expect("scan")
            .is_empty()
    );
    let mut batch = WriteBatch::new();
    batch.delete(keys::meta_key("ae-index-v1"));
    store.apply(&batch).expect("drop marker");
    assert_eq!(roots(&reopened(&*store, placement(3))), roots(kv.ae()));
    assert!(live.len() > 100);
}
