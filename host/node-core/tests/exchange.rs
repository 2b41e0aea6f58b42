//! The anti-entropy protocol between two replicas in memory: an exchange repairs both
//! ways, tells the peer when it is done, and the lease keeps a repaired node to one peer.

use std::collections::BTreeMap;
use std::sync::Arc;

mod support;

use quiver_core::ring::{ClaimParams, Member, Ring};
use quiver_core::storage::StorageEngine;
use quiver_node_core::SystemClock;
use quiver_node_core::ae::Placement;
use quiver_node_core::exchange::{self, AeLease, AeRequest, AeResponse, Answering, Exchange, Step};
use quiver_node_core::replica::Replica;
use quiver_storage::MemoryEngine;
use support::{boot, object};

fn replica(name: &str, placement: &Placement) -> Replica {
    let store: Arc<dyn StorageEngine> = Arc::new(MemoryEngine::new());
    let epochs = boot(&*store).expect("boot");
    let r = Replica::new(name.into(), store, epochs, 1 << 20, Arc::new(SystemClock));
    r.ae().set_placement(placement.clone());
    r.ae().open(r.store()).expect("open index");
    r
}

#[test]
fn an_exchange_repairs_both_ways_and_releases_the_peer() {
    // Two members, n = 2: both replicate every partition.
    let ring = Ring::new(
        ["a", "b"].iter().map(|m| Member::new(*m)).collect(),
        ClaimParams {
            partitions: 16,
            n_val: 2,
        },
    )
    .expect("ring");
    let placement = Placement {
        partitions: 16,
        default_n: 2,
        buckets: BTreeMap::new(),
    };
    let (a, b) = (replica("a", &placement), replica("b", &placement));
    for i in 0..50 {
        let key = format!("k{i}");
        let holder = if i % 2 == 0 { &a } else { &b };
        holder
            .merge_remote("bkt", key.as_bytes(), &object(&key), None)
            .expect("write");
    }
    a.merge_remote("bkt", b"both", &object("both"), None)
        .expect("write");
    b.merge_remote("bkt", b"both", &object("both"), None)
        .expect("write");

    let mut lease_b = AeLease::default();
    let at_b = Answering {
        me: "b",
        ring: &ring,
        placement: &placement,
        sender_is_member: true,
    };
    let trees = exchange::shared_trees(&ring, &placement, "a", "b");
    assert_eq!(trees.len(), 16, "both replicate every partition");
    let (mut ex, first) = Exchange::start(&a, "a", "b", trees.clone(), 10_000);
    let mut request = first;
    let mut steps = 0;
    let report = loop {
        steps += 1;
        assert!(steps < 100, "the exchange ends");
        let answer = exchange::answer(&b, &at_b, &mut lease_b, 0, request);
        match ex.on_response(&a, Ok(answer)) {
            Step::Send(next) => request = next,
            Step::Finished(result) => break result.expect("exchange"),
        }
    };
    assert!(ex.descended());
    assert_eq!((report.pulled, report.pushed), (25, 25), "{report:?}");

    // While b's lease is a's, b answers another peer's differing digest `Busy` and starts
    // nothing of its own; a, the initiator, holds no lease.
    assert!(lease_b.held_by_another("b", 1));
    let c_digest = AeRequest::Digest {
        from: "c".into(),
        trees: 1,
        digest: [0; 16],
    };
    assert_eq!(
        exchange::answer(&b, &at_b, &mut lease_b, 1, c_digest.clone()),
        AeResponse::Busy
    );
    let done = AeRequest::Done { from: "a".into() };
    assert_eq!(
        exchange::answer(&b, &at_b, &mut lease_b, 2, done),
        AeResponse::Released
    );
    assert!(!lease_b.held_by_another("b", 3));

    // In sync now: the next exchange stops at the digest.
    for i in 0..50 {
        let key = format!("k{i}");
        assert!(a.get("bkt", key.as_bytes()).expect("get").is_found());
        assert!(b.get("bkt", key.as_bytes()).expect("get").is_found());
    }
    let (mut again, digest) = Exchange::start(&a, "a", "b", trees, 10_000);
    let answer = exchange::answer(&b, &at_b, &mut lease_b, 4, digest);
    assert_eq!(answer, AeResponse::Match(true));
    match again.on_response(&a, Ok(answer)) {
        Step::Finished(Ok(r)) => assert!(!r.descended && r.pulled + r.pushed == 0),
        other => panic!("expected a finished exchange, got {other:?}"),
    }
    assert!(!again.descended());
}
