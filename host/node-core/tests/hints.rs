//! Hint bookkeeping of a fallback (Dynamo §4.6): bounded, durable markers that are dropped
//! together with the stand-in copy once the owner has the data.

use std::sync::Arc;

mod support;

use quiver_core::storage::StorageEngine;
use quiver_node_core::SystemClock;
use quiver_node_core::hints::{HintPass, HintStep, StoreReply};
use quiver_node_core::replica::{KvError, Replica};
use quiver_storage::MemoryEngine;
use support::{boot, object};

#[test]
fn a_full_hint_store_refuses_to_stand_in_and_delivery_frees_it() {
    let store: Arc<dyn StorageEngine> = Arc::new(MemoryEngine::new());
    let epochs = boot(&*store).expect("boot");
    let mut kv = Replica::new("n1".into(), store, epochs, 1 << 20, Arc::new(SystemClock));
    assert_eq!(kv.init_hints(1).expect("count hints"), 0);
    let a = object("a");

    kv.merge_remote("b", b"k1", &a, Some("n2")).expect("hint 1");
    kv.merge_remote("b", b"k1", &a, Some("n2"))
        .expect("same hint");
    assert_eq!(kv.hint_count(), 1);
    assert!(kv.has_hint("n2", "b", b"k1"));

    match kv.merge_remote("b", b"k2", &a, Some("n2")) {
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
    kv.merge_remote("b", b"k1", &object("newer"), None)
        .expect("merge");
    kv.hint_delivered("n2", "b", b"k1", &a, false)
        .expect("stale ack");
    assert_eq!(kv.hint_count(), 1);
    // The current copy acknowledged: marker and stand-in copy go.
    let current = kv.get("b", b"k1").expect("get");
    kv.hint_delivered("n2", "b", b"k1", &current, false)
        .expect("ack");
    assert_eq!(kv.hint_count(), 0);
    assert!(!kv.get("b", b"k1").expect("get").is_found());
    kv.merge_remote("b", b"k2", &a, Some("n2"))
        .expect("room again");

    // The count survives a restart of the service (markers are on disk).
    let store = kv.engine();
    let epochs = boot(&*store).expect("boot 2");
    let mut again = Replica::new("n1".into(), store, epochs, 1 << 20, Arc::new(SystemClock));
    assert_eq!(again.init_hints(10).expect("count"), 1);
}

/// A delivery pass skips owners that are down, sends one `Store` at a time, keeps a key
/// hinted when its owner refuses it, stops an owner that stops answering, and on an
/// acknowledgement drops the marker, and the copy when this node is not a replica.
#[test]
fn a_delivery_pass_hands_each_hint_back_once_acknowledged() {
    let store: Arc<dyn StorageEngine> = Arc::new(MemoryEngine::new());
    let epochs = boot(&*store).expect("boot");
    let mut kv = Replica::new("n1".into(), store, epochs, 1 << 20, Arc::new(SystemClock));
    kv.init_hints(100).expect("count hints");
    for (owner, key) in [("n2", "a"), ("n2", "b"), ("n3", "c"), ("n4", "d")] {
        kv.merge_remote("b", key.as_bytes(), &object(key), Some(owner))
            .expect("stand in");
    }
    assert_eq!(kv.hint_count(), 4);
    let members: Vec<String> = ["n2", "n3", "n4"].map(String::from).to_vec();
    let not_primary = |_: &str, _: &[u8]| false;
    let mut pass = HintPass::new(members.clone());
    let up = |n: &str| n != "n3";
    let mut sent = Vec::new();
    loop {
        match pass.next(&kv, &up) {
            HintStep::Done { delivered } => {
                assert_eq!(delivered, 1, "only n4's hint was acknowledged");
                break;
            }
            HintStep::Store { owner, hinted } => {
                assert!(pass.in_flight());
                let key = String::from_utf8(hinted.key.clone()).expect("utf-8");
                assert_eq!(hinted.object, object(&key), "the copy's state goes out");
                sent.push((owner.clone(), key.clone()));
                let reply = match (owner.as_str(), key.as_str()) {
                    ("n2", "a") => StoreReply::Refused,
                    ("n2", _) => StoreReply::Unreachable,
                    _ => StoreReply::Stored,
                };
                let changed = pass
                    .on_reply(&kv, reply, &not_primary, &members)
                    .expect("cleanup");
                assert_eq!(changed, reply == StoreReply::Stored);
            }
        }
    }
    let expected: Vec<(String, String)> = [("n2", "a"), ("n2", "b"), ("n4", "d")]
        .map(|(o, k)| (o.to_string(), k.to_string()))
        .to_vec();
    assert_eq!(
        sent, expected,
        "n3 is down; n2 refused a, then stopped answering"
    );
    assert!(kv.has_hint("n2", "b", b"a") && kv.has_hint("n2", "b", b"b"));
    assert!(kv.has_hint("n3", "b", b"c"));
    assert!(!kv.has_hint("n4", "b", b"d"), "delivered");
    assert!(
        !kv.get("b", b"d").expect("get").is_found(),
        "not a replica here: the stand-in copy goes with the hint"
    );
    assert_eq!(kv.hint_count(), 3);
}
