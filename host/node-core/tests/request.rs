//! A client request at its coordinator: what goes out when, when the client is answered,
//! what a replica's `Store` must sync, and which replicas a read repairs.

use std::sync::Arc;

mod support;

use quiver_core::causality::{Object, VersionVector};
use quiver_core::coordinator::ReadSpread;
use quiver_core::quorum::Target;
use quiver_core::storage::StorageEngine;
use quiver_node_core::SystemClock;
use quiver_node_core::broken::Broken;
use quiver_node_core::replica::{Replica, WriteOutcome};
use quiver_node_core::request::{
    DataRequest, Get, GetArgs, Put, PutArgs, StoreRequest, WritePlan, apply_store, plan_write,
    store_needs_sync,
};
use quiver_storage::MemoryEngine;
use support::{boot, object};

fn target(node: &str) -> Target {
    Target {
        node: node.into(),
        hint_for: None,
    }
}

fn outcome(value: &str) -> WriteOutcome {
    let object = object(value);
    let dot = object.siblings()[0].dot.clone();
    WriteOutcome {
        context: VersionVector::new(),
        object,
        dot,
    }
}

fn up(_: &str) -> bool {
    true
}

#[test]
fn a_put_answers_after_w_and_a_failed_store_goes_to_a_fallback_with_a_hint() {
    let targets = [target("a"), target("b"), target("c")];
    let plan = plan_write("a", &targets, None, 2, 3, false);
    let WritePlan::Coordinate {
        me,
        sync_first,
        sync_alongside,
    } = plan
    else {
        panic!("a replica coordinates");
    };
    assert!(
        !sync_first && !sync_alongside,
        "a buffered write syncs nothing"
    );
    let fallbacks = ["d".to_string()];
    let args = PutArgs {
        bucket: "b",
        key: b"k",
        me: &me,
        targets: &targets,
        fallbacks: &fallbacks,
        w: 3,
        n: 3,
        sloppy: true,
        sync: false,
        sync_alongside,
    };
    let (mut put, sends) = Put::start(args, &outcome("v"), Broken::NONE);
    let sent: Vec<&str> = sends.iter().map(|(t, _)| t.node.as_str()).collect();
    assert_eq!(sent, ["b", "c"]);
    assert!(sends.iter().all(|(_, s)| s.key == b"k" && !s.sync));
    assert_eq!(put.decision(), None);
    assert_eq!(put.on_store_result(&target("b"), Ok(()), up), None);
    assert_eq!(put.decision(), None, "two of three");
    let (fallback, store) = put
        .on_store_result(&target("c"), Err("timeout".into()), up)
        .expect("a fallback stands in");
    assert_eq!(fallback.node, "d");
    assert_eq!(store.hint_for.as_deref(), Some("c"));
    assert_eq!(put.decision(), None);
    assert_eq!(put.on_store_result(&fallback, Ok(()), up), None);
    assert_eq!(put.decision(), Some(Ok(())));
    assert_eq!(put.decision(), None, "answered once");
    assert!(put.is_finished());
}

#[test]
fn a_sync_put_counts_its_own_copy_only_once_durable() {
    let targets = [target("a"), target("b")];
    let WritePlan::Coordinate {
        me,
        sync_first,
        sync_alongside,
    } = plan_write("a", &targets, None, 2, 2, true)
    else {
        panic!("a replica coordinates");
    };
    assert!(!sync_first && sync_alongside);
    let args = PutArgs {
        bucket: "b",
        key: b"k",
        me: &me,
        targets: &targets,
        fallbacks: &[],
        w: 2,
        n: 2,
        sloppy: false,
        sync: true,
        sync_alongside,
    };
    let (mut put, sends) = Put::start(args, &outcome("v"), Broken::NONE);
    assert!(sends.iter().all(|(_, s)| s.sync));
    put.on_store_result(&target("b"), Ok(()), up);
    assert_eq!(put.decision(), None, "the local fsync has not finished");
    put.on_local_synced(Ok(()), up);
    assert_eq!(put.decision(), Some(Ok(())));

    // Alone, the coordinator syncs before anything else.
    let alone = [target("a")];
    let plan = plan_write("a", &alone, None, 1, 1, true);
    assert!(matches!(
        plan,
        WritePlan::Coordinate {
            sync_first: true,
            sync_alongside: false,
            ..
        }
    ));
}

#[test]
fn a_put_that_cannot_reach_w_fails_with_the_key_and_the_quorum() {
    let targets = [target("a"), target("b")];
    let args = PutArgs {
        bucket: "cart",
        key: b"k",
        me: &targets[0],
        targets: &targets,
        fallbacks: &[],
        w: 2,
        n: 2,
        sloppy: false,
        sync: false,
        sync_alongside: false,
    };
    let (mut put, _) = Put::start(args, &outcome("v"), Broken::NONE);
    assert_eq!(
        put.on_store_result(&targets[1], Err("down".into()), up),
        None
    );
    let failed = put.decision().expect("decided").expect_err("failed");
    assert!(
        failed.contains("\"cart\"") && failed.contains("w=2"),
        "{failed}"
    );
}

#[test]
fn a_node_outside_the_preference_list_forwards() {
    let targets = [target("a"), target("b")];
    assert!(matches!(
        plan_write("z", &targets, None, 1, 2, false),
        WritePlan::Forward(_)
    ));
}

#[test]
fn a_get_speculates_only_while_undecided_and_repairs_stale_replicas() {
    let targets = [target("a"), target("b"), target("c")];
    let args = GetArgs {
        me: "a",
        bucket: "b",
        key: b"k",
        targets: &targets,
        r: 2,
        n: 3,
        spread: ReadSpread::Quorum,
        index: 0,
        now_ms: 100,
        speculate_ms: Some(20),
    };
    let mine = object("v");
    let (mut get, fetches) = Get::start(args, || Ok(mine.clone()));
    assert_eq!(fetches.len(), 1, "R=2: the local copy and one other");
    assert!(matches!(get.fetch_request(), DataRequest::Fetch { .. }));
    assert_eq!(get.deadline(), Some(120));
    assert_eq!(get.on_deadline(110), None, "not yet");
    let spare = get.on_deadline(120).expect("a spare is asked");
    assert_eq!(get.deadline(), None, "no spare left");
    // The first fetched replica holds nothing: the merge has what the local copy had.
    get.on_reply(&fetches[0].node, Ok(Object::default()));
    let merged = get.decision().expect("decided").expect("reached");
    assert_eq!(merged, mine);
    get.on_reply(&spare.node, Ok(mine.clone()));
    assert!(get.is_finished());
    let repairs = get.repairs();
    assert_eq!(repairs.len(), 1);
    assert_eq!(repairs[0].0.node, fetches[0].node);
    assert!(!repairs[0].1.sync, "read repair is buffered");
}

#[test]
fn a_sync_store_syncs_even_when_nothing_changed() {
    assert!(store_needs_sync(true, false, Broken::NONE));
    assert!(!store_needs_sync(false, true, Broken::NONE));

    let store: Arc<dyn StorageEngine> = Arc::new(MemoryEngine::new());
    let epochs = boot(&*store).expect("boot");
    let replica = Replica::new("n1".into(), store, epochs, 1 << 20, Arc::new(SystemClock));
    let request = StoreRequest {
        bucket: "b".into(),
        key: b"k".to_vec(),
        object: object("v"),
        hint_for: None,
        sync: true,
    };
    assert!(apply_store(&replica, &request, Broken::NONE).expect("applied"));
    assert!(
        apply_store(&replica, &request, Broken::NONE).expect("applied again"),
        "an equal state may have arrived buffered: the sync is still owed"
    );
    assert_eq!(replica.get("b", b"k").expect("get"), object("v"));
}
