//! Membership rules of one node: every node derives the same first membership, gossip
//! sends a state only when digests differ, hint markers for members that left are
//! dropped, and a leaving node stops only once every peer took the news.

use std::collections::BTreeMap;
use std::sync::Arc;

mod support;

use quiver_core::membership::MemberState;
use quiver_core::meta::{MetaState, Stamp};
use quiver_core::ring::ClaimParams;
use quiver_core::storage::StorageEngine;
use quiver_node_core::SystemClock;
use quiver_node_core::broken::Broken;
#[cfg(feature = "broken-variants")]
use quiver_node_core::broken::Variant;
use quiver_node_core::membership::{
    DepartStep, Departure, answer_digest, departed_hints, digest_request, done_leaving,
    first_membership, gossip_targets, left_change, peers, pulled_state, push_back,
};
use quiver_node_core::protocol::{PeerRequest, PeerResponse};
use quiver_node_core::replica::Replica;
use quiver_storage::MemoryEngine;
use support::{boot, object};

const PARAMS: ClaimParams = ClaimParams {
    partitions: 16,
    n_val: 3,
};

fn names(n: usize) -> Vec<(String, String)> {
    (1..=n)
        .map(|i| (format!("n{i}"), format!("127.0.0.{i}:7470")))
        .collect()
}

fn cluster(n: usize) -> MetaState {
    first_membership(names(n), PARAMS).expect("first ring").0
}

#[test]
fn every_node_derives_the_same_first_membership() {
    let mut reversed = names(4);
    reversed.reverse();
    let (a, ring) = first_membership(names(4), PARAMS).expect("ring");
    let (b, _) = first_membership(reversed, PARAMS).expect("ring");
    assert_eq!(a.digest(), b.digest());
    assert_eq!(ring.members().len(), 4);
    let mine: Vec<String> = peers(&a, "n2").into_iter().map(|(id, _)| id).collect();
    assert_eq!(mine, ["n1", "n3", "n4"]);
}

#[test]
fn gossip_sends_a_state_only_when_digests_differ() {
    let a = cluster(3);
    let PeerRequest::MetaDigest(digest) = digest_request(&a) else {
        panic!("a gossip question is a digest");
    };
    assert_eq!(answer_digest(&a, digest), PeerResponse::MetaSame);
    assert_eq!(pulled_state(PeerResponse::MetaSame), None);

    // n3 was told to leave on b: a's question brings b's state, and merging it makes the
    // digests equal.
    let mut b = a.clone();
    let leaving = b.members["n3"].with_state(MemberState::Leaving, Stamp::at(5, "n1"));
    b.members.insert("n3".into(), leaving);
    let answer = answer_digest(&b, digest);
    let Some(state) = pulled_state(answer) else {
        panic!("different digests bring the state");
    };
    let mut merged = a.clone();
    assert!(!merged.merge(&state).is_empty());
    assert_eq!(merged.digest(), b.digest());
    assert!(!push_back(&merged, &state), "b holds everything a has");

    // The other way round: b asks a, merges a's state and still holds what a lacks, so it
    // pushes its own back (a pull alone would leave a without the change).
    let mut b_after = b.clone();
    b_after.merge(&a);
    assert!(push_back(&b_after, &a));
    let mine: Vec<String> = peers(&merged, "n1").into_iter().map(|(id, _)| id).collect();
    assert_eq!(mine, ["n2", "n3"], "a leaving member is still a peer");
}

#[test]
fn gossip_asks_one_peer_or_two_in_larger_clusters() {
    let up = |n: usize| -> Vec<String> { (1..=n).map(|i| format!("n{i}")).collect() };
    assert!(gossip_targets(&[], |_| 0).is_empty());
    assert_eq!(gossip_targets(&up(5), |n| n - 1), ["n5"]);
    let two = gossip_targets(&up(6), |_| 0);
    assert_eq!(two.len(), 2);
    assert_ne!(two[0], two[1], "two distinct peers");
    // A draw out of range is clamped, never a panic.
    assert_eq!(gossip_targets(&up(3), |_| 99), ["n3"]);
}

#[test]
fn hints_for_members_that_left_are_listed_once_they_left() {
    let store: Arc<dyn StorageEngine> = Arc::new(MemoryEngine::new());
    let epochs = boot(&*store).expect("boot");
    let mut kv = Replica::new("n1".into(), store, epochs, 1 << 20, Arc::new(SystemClock));
    kv.init_hints(10).expect("count hints");
    kv.merge_remote("b", b"k", &object("v"), Some("n3"))
        .expect("stand in for n3");
    let mut state = cluster(3);
    assert!(
        departed_hints(&kv, &state, "n1", Broken::NONE)
            .expect("read")
            .is_empty(),
        "n3 is still a member"
    );
    let left = state.members["n3"].with_state(MemberState::Left, Stamp::at(9, "n3"));
    state.members.insert("n3".into(), left);
    let hinted = departed_hints(&kv, &state, "n1", Broken::NONE).expect("read");
    assert_eq!(hinted.len(), 1);
    assert_eq!(hinted[0].0, "n3");
    assert_eq!(hinted[0].1.key, b"k");
    #[cfg(feature = "broken-variants")]
    {
        let keep = Broken::NONE.set(Variant::KeepHintsForLeft, true);
        assert!(
            departed_hints(&kv, &state, "n1", keep)
                .expect("read")
                .is_empty()
        );
    }
}

#[test]
fn a_leaving_node_marks_itself_left_once_it_owns_and_holds_nothing() {
    let full = first_membership(names(4), PARAMS).expect("ring");
    let (mut state, _) = full;
    let (_, smaller) = first_membership(names(3), PARAMS).expect("ring");
    assert!(
        left_change(&state, "n4", Stamp::at(1, "n4")).is_none(),
        "not leaving"
    );
    let leaving = state.members["n4"].with_state(MemberState::Leaving, Stamp::at(1, "n1"));
    state.members.insert("n4".into(), leaving.clone());
    assert!(done_leaving(&state, &smaller, "n4", true));
    assert!(
        !done_leaving(&state, &smaller, "n4", false),
        "still holds keys"
    );
    let first_ring = state.ring.as_ref().map(|e| e.ring.clone()).expect("ring");
    assert!(
        !done_leaving(&state, &first_ring, "n4", true),
        "still in the ring"
    );

    let change = left_change(&state, "n4", Stamp::at(2, "n4")).expect("a change");
    let entry = &change.members["n4"];
    assert_eq!(entry.state, MemberState::Left);
    assert_eq!(
        entry.version,
        leaving.version + 1,
        "supersedes the leaving entry"
    );
    assert_eq!(change.members.len(), 1);
}

#[test]
fn a_departing_node_stops_only_once_every_peer_took_the_news() {
    let mut d = Departure::new(3, Broken::NONE);
    assert_eq!(d.on_answer(true), DepartStep::Wait);
    assert_eq!(d.on_answer(false), DepartStep::Wait);
    assert_eq!(d.on_answer(true), DepartStep::Retry, "one peer missed it");

    let mut d = Departure::new(2, Broken::NONE);
    assert_eq!(d.on_answer(true), DepartStep::Wait);
    assert_eq!(d.on_answer(true), DepartStep::Stop { recheck: true });

    assert_eq!(
        Departure::new(0, Broken::NONE).step(),
        DepartStep::Stop { recheck: true },
        "nobody to tell"
    );

    // The first versions, which the simulator caught: stop once one peer knows, and
    // without checking again (settable only with the simulator's feature).
    #[cfg(feature = "broken-variants")]
    {
        let broken = Broken::NONE
            .set(Variant::DepartWhenOneTold, true)
            .set(Variant::DepartNoRecheck, true);
        let mut d = Departure::new(3, broken);
        assert_eq!(d.on_answer(true), DepartStep::Stop { recheck: false });
    }
}

#[test]
fn metadata_merge_of_member_entries_is_by_version_then_stamp() {
    // What a departure relies on: its `Left` entry wins over every older one everywhere.
    let mut a = cluster(2);
    let mut b = a.clone();
    let left = a.members["n2"].with_state(MemberState::Left, Stamp::at(3, "n2"));
    let change = MetaState {
        members: BTreeMap::from([("n2".to_string(), left)]),
        ..MetaState::default()
    };
    a.merge(&change);
    b.merge(&a);
    assert_eq!(b.members["n2"].state, MemberState::Left);
    assert!(
        a.merge(&cluster(2)).is_empty(),
        "an older state changes nothing"
    );
}
