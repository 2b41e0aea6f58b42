//! Hint bookkeeping of a fallback (Dynamo §4.6): bounded, durable markers that are dropped
//! together with the stand-in copy once the owner has the data.

use std::sync::Arc;

use quiver_core::causality::{Coordinator, EpochSource, VersionVector, WriteOp, coordinate_write};
use quiver_node::epochs::BootEpochs;
use quiver_node::kv::{KvError, KvService};
use quiver_storage::{Durability, MemoryEngine, Store};

struct Counter(u64);
impl EpochSource for Counter {
    fn is_trusted(&self, _: u64) -> bool {
        false
    }
    fn fresh(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

fn object(value: &str) -> quiver_core::causality::Object {
    let me = Coordinator {
        node: "n9".into(),
        incarnation: 1,
    };
    let op = WriteOp::Put(value.as_bytes().to_vec());
    coordinate_write(None, &me, &mut Counter(0), &VersionVector::new(), op, 1)
        .0
        .object
}

#[tokio::test]
async fn a_full_hint_store_refuses_to_stand_in_and_delivery_frees_it() {
    let store = Store::new(Arc::new(MemoryEngine::new()), Durability::Buffered);
    let epochs = BootEpochs::start(&store, 7).await.expect("boot");
    let mut kv = KvService::new("n1".into(), store, epochs, 1 << 20);
    assert_eq!(kv.init_hints(1).expect("count hints"), 0);
    let a = object("a");

    kv.merge_remote("b", b"k1", &a, Durability::Buffered, Some("n2"))
        .await
        .expect("hint 1");
    kv.merge_remote("b", b"k1", &a, Durability::Buffered, Some("n2"))
        .await
        .expect("same hint");
    assert_eq!(kv.hint_count(), 1);
    assert!(kv.has_hint("n2", "b", b"k1"));

    match kv
        .merge_remote("b", b"k2", &a, Durability::Buffered, Some("n2"))
        .await
    {
        Err(e @ KvError::HintsFull { .. }) => assert!(e.to_string().contains("hint store full")),
        other => panic!("expected HintsFull, got {other:?}"),
    }
    assert!(
        !kv.get("b", b"k2").expect("get").is_found(),
        "a refused stand-in stores nothing"
    );

    let hinted = kv.hinted_keys("n2", 10).expect("hinted keys");
    assert_eq!(hinted.len(), 1);
    assert_eq!(hinted[0].object, a);
    // A copy that changed since it was sent is kept, with its hint, for the next delivery.
    kv.merge_remote("b", b"k1", &object("newer"), Durability::Buffered, None)
        .await
        .expect("merge");
    kv.hint_delivered("n2", "b", b"k1", &a, false)
        .await
        .expect("stale ack");
    assert_eq!(kv.hint_count(), 1);
    // The current copy acknowledged: marker and stand-in copy go.
    let current = kv.get("b", b"k1").expect("get");
    kv.hint_delivered("n2", "b", b"k1", &current, false)
        .await
        .expect("ack");
    assert_eq!(kv.hint_count(), 0);
    assert!(!kv.get("b", b"k1").expect("get").is_found());
    kv.merge_remote("b", b"k2", &a, Durability::Buffered, Some("n2"))
        .await
        .expect("room again");

    // The count survives a restart of the service (markers are on disk).
    let store = kv.store().clone();
    let epochs = BootEpochs::start(&store, 7).await.expect("boot 2");
    let mut again = KvService::new("n1".into(), store, epochs, 1 << 20);
    assert_eq!(again.init_hints(10).expect("count"), 1);
}
