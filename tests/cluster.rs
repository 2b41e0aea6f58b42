//! Replication over real QUIC between real `quiver server` processes on loopback
//! (127.0.X.1..=5, one subnet per test). Dynamo §4.5 (quorums), §4.6 (sloppy quorum and
//! hinted handoff), §5 (read repair).
//!
//! Background work (hint delivery, read repair) is awaited by polling for the state it
//! must produce, with a generous deadline; no test sleeps for a guessed duration.

mod support;

use std::time::Duration;

use quiver_core::ring::{ClaimParams, Member, Ring};
use quiver_sdk::{Client, Error, ErrorCode, ReadOptions, WriteOptions};
use support::{ClusterProc, eventually};

fn w(n: u8) -> WriteOptions {
    WriteOptions {
        w: Some(n),
        ..Default::default()
    }
}

fn r(n: u8) -> ReadOptions {
    ReadOptions {
        r: Some(n),
        ..Default::default()
    }
}

/// The ring every node of a `ClusterProc` of `nodes` members derives (the default Q).
fn ring_of(nodes: usize, n_val: u32) -> Ring {
    let members = (1..=nodes).map(|i| Member::new(format!("n{i}"))).collect();
    Ring::new(
        members,
        ClaimParams {
            partitions: quiver_core::ring::DEFAULT_PARTITIONS,
            n_val,
        },
    )
    .expect("ring")
}

fn quorum_message(e: &Error) -> String {
    assert_eq!(
        e.code(),
        Some(ErrorCode::QuorumFailed),
        "expected a quorum failure, got {e}"
    );
    e.to_string()
}

// Dynamo §4.5: N=3, W=2, R=2 keeps working with one replica killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_killed_quorums_still_succeed() {
    let mut c = ClusterProc::start(11, 3, &[]);
    let n1 = c.client(0).await;
    for i in 0..20 {
        n1.put_with("b", format!("k{i}"), b"v1".to_vec(), None, &w(2))
            .await
            .expect("put");
    }
    // Every node coordinates reads of every key.
    for node in 0..3 {
        let client = c.client(node).await;
        for i in 0..20 {
            let got = client
                .get_with("b", format!("k{i}"), &r(2))
                .await
                .expect("get");
            assert_eq!(got.values(), vec![&b"v1"[..]], "node {node} key k{i}");
        }
    }
    let status = n1.status().await.expect("status");
    assert_eq!((status.n, status.r, status.w), (3, 2, 2));
    assert_eq!(status.members.len(), 3);
    assert_eq!(
        status.members.iter().map(|m| m.partitions).sum::<u32>(),
        status.partitions
    );

    c.kill9(2);
    let n2 = c.client(1).await;
    for i in 0..20 {
        let key = format!("k{i}");
        let read = n2
            .get_with("b", &key, &r(2))
            .await
            .expect("R=2 get with one node down");
        n2.put_with("b", &key, b"v2".to_vec(), Some(&read.context), &w(2))
            .await
            .expect("W=2 put with one node down");
        let got = n1.get_with("b", &key, &r(2)).await.expect("get");
        assert_eq!(got.values(), vec![&b"v2"[..]]);
    }
}

// Dynamo §4.5: with two of three replicas gone, W=2 cannot be met and the error says how
// many replicas answered and which failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_killed_w2_fails_with_counts() {
    let mut c = ClusterProc::start(12, 3, &["--peer-timeout-ms", "2000"]);
    c.kill9(1);
    c.kill9(2);
    let n1 = c.client(0).await;
    let err = n1
        .put_with("b", "k", b"v".to_vec(), None, &w(2))
        .await
        .expect_err("W=2 must fail");
    let msg = quorum_message(&err);
    assert!(msg.contains("1 of 2 needed replicas answered"), "{msg}");
    // Once the failures are known the nodes are skipped up front: still a clear count.
    let err = n1
        .put_with("b", "k", b"v".to_vec(), None, &w(2))
        .await
        .expect_err("W=2 must fail");
    let msg = quorum_message(&err);
    assert!(
        msg.contains("1 of 2 needed") && msg.contains("unavailable"),
        "{msg}"
    );
    // W=1 is still accepted, and R=1 reads it back.
    n1.put_with("b", "k", b"v".to_vec(), None, &w(1))
        .await
        .expect("W=1 put");
    assert!(n1.get_with("b", "k", &r(1)).await.expect("R=1 get").found());
    let err = n1
        .get_with("b", "k", &r(2))
        .await
        .expect_err("R=2 must fail");
    quorum_message(&err);
    // An impossible quorum is a clear error too.
    let err = n1
        .put_with("b", "k", b"v".to_vec(), None, &w(4))
        .await
        .expect_err("W=4 > N");
    assert_eq!(err.code(), Some(ErrorCode::InvalidQuorum));
}

// Dynamo §4.6: with sloppy quorum, fallbacks accept writes for unreachable primaries and
// hand them over when the primaries return; the returning node then serves every write it
// missed from its own storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sloppy_quorum_and_hinted_handoff_on_five_nodes() {
    const KEYS: usize = 60;
    let mut c = ClusterProc::start(
        13,
        5,
        &[
            "--n",
            "3",
            "--peer-timeout-ms",
            "2000",
            "--bucket",
            "strict:sloppy_quorum=false",
            "--bucket",
            "single:n=1",
        ],
    );
    c.kill9(3);
    c.kill9(4);
    let n1 = c.client(0).await;
    for i in 0..KEYS {
        // With two of five nodes down some keys lose two primaries; W=3 still succeeds
        // because fallbacks stand in.
        n1.put_with(
            "b",
            format!("k{i}"),
            format!("v{i}").into_bytes(),
            None,
            &w(3),
        )
        .await
        .unwrap_or_else(|e| panic!("W=3 put k{i} with two nodes down: {e}"));
    }
    // A bucket that requires primaries refuses writes whose primaries are down, and says so.
    let mut refused = 0;
    for i in 0..KEYS {
        if let Err(e) = n1
            .put_with("strict", format!("k{i}"), b"v".to_vec(), None, &w(3))
            .await
        {
            quorum_message(&e);
            refused += 1;
        }
    }
    assert!(refused > 0, "some strict-bucket keys have a dead primary");
    // Per-bucket n: W=2 is impossible with n=1.
    let err = n1
        .put_with("single", "k", b"v".to_vec(), None, &w(2))
        .await
        .expect_err("w > n");
    assert_eq!(err.code(), Some(ErrorCode::InvalidQuorum));
    let held: u64 = {
        let mut total = 0;
        for i in 0..3 {
            total += c.client(i).await.status().await.expect("status").hints;
        }
        total
    };
    assert!(held > 0, "fallbacks hold hints for the dead nodes");

    c.restart(3);
    c.restart(4);
    // Hints drain: every node ends up holding none.
    for i in 0..5 {
        let client = c.client(i).await;
        eventually("hints delivered", || {
            let client = client.clone();
            async move { client.status().await.map(|s| s.hints == 0).unwrap_or(false) }
        })
        .await;
    }
    // Now only the restarted nodes run: reads with R=1 can only be served from their own
    // storage, and every write they were primaries for must be there.
    c.kill9(0);
    c.kill9(1);
    c.kill9(2);
    // The same ring every node derives from the member list.
    let ring = ring_of(5, 3);
    let mut checked = [0usize; 2];
    for (slot, node) in [(0, "n4"), (1, "n5")] {
        let client = c.client(if node == "n4" { 3 } else { 4 }).await;
        assert_eq!(client.status().await.expect("status").hints, 0);
        for i in 0..KEYS {
            let key = format!("k{i}");
            let list = ring.preference_list_for_key(b"b", key.as_bytes(), 3);
            if !list.primaries.iter().any(|m| m.id == node) {
                continue;
            }
            let got = client
                .get_with("b", &key, &r(1))
                .await
                .unwrap_or_else(|e| panic!("{node} R=1 get {key}: {e}"));
            assert_eq!(
                got.values(),
                vec![format!("v{i}").as_bytes()],
                "{node} serves {key} from its own storage"
            );
            checked[slot] += 1;
        }
    }
    assert!(
        checked[0] > 0 && checked[1] > 0,
        "both restarted nodes were primaries of some keys: {checked:?}"
    );
}

// Dynamo §5: a read that sees a stale replica repairs it. Every get here asks all three
// replicas (`--read-repair-chance 1`), although R=2 would let it ask only two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_repair_brings_a_stale_replica_up_to_date() {
    let mut c = ClusterProc::start(
        14,
        3,
        &["--peer-timeout-ms", "2000", "--read-repair-chance", "1"],
    );
    c.kill9(2);
    let n1 = c.client(0).await;
    for i in 0..10 {
        n1.put_with("b", format!("k{i}"), b"fresh".to_vec(), None, &w(2))
            .await
            .expect("put");
    }
    c.restart(2);
    // n3 missed every write. Reads see the gap and repair it in the background.
    let n3 = c.client(2).await;
    eventually("n3 reachable again", || {
        let n1 = n1.clone();
        async move { n1.get_with("b", "k0", &r(3)).await.is_ok() }
    })
    .await;
    for i in 0..10 {
        // Retried: under CI load a peer request can time out and briefly mark n3 down.
        eventually("an R=2 get", || {
            let n1 = n1.clone();
            async move { n1.get_with("b", format!("k{i}"), &r(2)).await.is_ok() }
        })
        .await;
    }
    c.kill9(0);
    c.kill9(1);
    for i in 0..10 {
        let key = format!("k{i}");
        eventually("read repair reached n3", || {
            let (n3, key) = (n3.clone(), key.clone());
            async move {
                n3.get_with("b", &key, &r(1))
                    .await
                    .is_ok_and(|g| g.values() == vec![&b"fresh"[..]])
            }
        })
        .await;
    }
}

// A get asks only R replicas (the coordinator's own copy and one more here). When the one it
// asked is paused — alive to the transport, silent to requests — the get asks the replica it
// left out after --read-speculate-ms instead of waiting out the peer timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_speculates_past_a_paused_replica() {
    // A peer timeout far above any bound asserted below: only speculation can answer in time.
    let c = ClusterProc::start(
        25,
        3,
        &["--peer-timeout-ms", "20000", "--read-repair-chance", "0"],
    );
    let n1 = c.client(0).await;
    for i in 0..10 {
        n1.put_with("b", format!("k{i}"), b"v".to_vec(), None, &w(3))
            .await
            .expect("put");
    }
    c.pause(2);
    // n1 rotates the replica it asks, so about half of these ask the paused n3 first.
    for i in 0..10 {
        let started = std::time::Instant::now();
        let got = n1
            .get_with("b", format!("k{i}"), &r(2))
            .await
            .expect("R=2 get with one replica paused");
        assert_eq!(got.values(), vec![&b"v"[..]]);
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "get k{i} took {took:?}: it waited for the paused replica"
        );
    }
    let status = n1.status().await.expect("status");
    assert!(
        status.reads_speculated >= 4,
        "reads that asked the paused n3 speculated: {}",
        status.reads_speculated
    );
    c.resume(2);
}

// A node whose certificate comes from another CA cannot join the conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_foreign_certificate_is_refused() {
    let c = ClusterProc::start(15, 1, &[]);
    let rogue_dir = tempfile::tempdir().expect("temp dir");
    let rogue = support::NodeProc::start_as(
        rogue_dir.path(),
        "rogue",
        "127.0.15.9:7470",
        &[
            "--peer",
            &format!("n1={}", c.addrs[0]),
            "--n",
            "2",
            "--w",
            "2",
            "--r",
            "2",
            "--peer-timeout-ms",
            "1000",
        ],
    );
    let client = Client::connect(&rogue.addr.to_string(), rogue.client_config())
        .await
        .expect("connect to rogue");
    let err = client
        .put("b", "k", b"v".to_vec(), None)
        .await
        .expect_err("n1 must refuse the rogue");
    let msg = err.to_string();
    assert!(
        msg.contains("n1"),
        "the failure names the refusing node: {msg}"
    );
    // n1 is unharmed and holds nothing from the rogue.
    let n1 = c.client(0).await;
    assert!(!n1.get("b", "k").await.expect("get").found());
}

// Dynamo §6.4: the SDK learns the ring and sends each request straight to a replica of
// its key, moving on to the next member when one is unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_routes_requests_to_replicas_and_around_dead_nodes() {
    let mut c = ClusterProc::start(16, 4, &["--n", "2", "--peer-timeout-ms", "2000"]);
    let mut config = c.client_config();
    config.request_timeout = Duration::from_secs(2);
    let client = quiver_sdk::ClusterClient::connect(&[c.addrs[3].as_str()], config)
        .await
        .expect("cluster client");
    let ring = ring_of(4, 2);
    for i in 0..20 {
        let key = format!("k{i}");
        let route = client.route("b", key.as_bytes()).await;
        let list = ring.preference_list_for_key(b"b", key.as_bytes(), 2);
        let want: Vec<String> = list
            .nodes()
            .map(|m| c.addrs[m.id[1..].parse::<usize>().expect("nI") - 1].clone())
            .collect();
        assert_eq!(
            route, want,
            "route of {key}: primaries first, then the rest"
        );
        client
            .put_with("b", &key, b"v".to_vec(), None, &w(2))
            .await
            .expect("routed put");
    }
    // Kill the first primary of k0: requests for it go to the next member and still work
    // (W=1, since its second replica alone remains among the primaries).
    let first = ring.preference_list_for_key(b"b", b"k0", 2).primaries[0]
        .id
        .clone();
    let idx = first[1..].parse::<usize>().expect("nI") - 1;
    c.kill9(idx);
    let got = client
        .get_with("b", "k0", &r(1))
        .await
        .expect("routed get around a dead node");
    assert_eq!(got.values(), vec![&b"v"[..]]);
    client
        .put_with("b", "k0", b"v2".to_vec(), Some(&got.context), &w(1))
        .await
        .expect("put");
    let statuses = client.status().await;
    assert_eq!(statuses.len(), 4);
    let dead = statuses
        .iter()
        .find(|(n, _)| n == &first)
        .expect("dead node listed");
    assert!(dead.1.is_err(), "the killed node does not answer");
}

// Dynamo §4.6: a replica that fails after the write quorum was reached still gets its copy,
// through a fallback that keeps a hint (with W=1 the client is answered before the store to
// the dead replica even times out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_failing_after_the_quorum_still_gets_a_hint() {
    let mut c = ClusterProc::start(17, 4, &["--n", "2", "--peer-timeout-ms", "2000"]);
    let ring = ring_of(4, 2);
    let key = (0..10_000)
        .map(|i| format!("k{i}"))
        .find(|k| {
            let ids: Vec<&str> = ring
                .preference_list_for_key(b"b", k.as_bytes(), 2)
                .primaries
                .iter()
                .map(|m| m.id.as_str())
                .collect();
            ids.contains(&"n1") && ids.contains(&"n4")
        })
        .expect("some key has primaries n1 and n4");
    c.kill9(3);
    let n1 = c.client(0).await;
    n1.put_with("b", &key, b"v".to_vec(), None, &w(1))
        .await
        .expect("W=1 put on n1");
    let clients = [c.client(0).await, c.client(1).await, c.client(2).await];
    eventually("a fallback holds a hint for n4", || {
        let clients = clients.clone();
        async move {
            let mut hints = 0;
            for client in &clients {
                hints += client.status().await.map(|s| s.hints).unwrap_or(0);
            }
            hints > 0
        }
    })
    .await;
}

// Runtime bucket properties are cluster metadata: set on one node, they reach every node at
// once (push) or when a node comes back (periodic pull), survive restarts, and apply to
// requests everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_properties_reach_every_node_and_survive_restarts() {
    use quiver_core::meta::BucketSpec;
    let mut c = ClusterProc::start(18, 3, &["--peer-timeout-ms", "2000"]);
    c.kill9(2);
    let n1 = c.client(0).await;
    let changes = BucketSpec {
        w: Some(3),
        sibling_threshold: Some(5),
        ..BucketSpec::default()
    };
    let info = n1
        .bucket_set("strict3", changes, None, false)
        .await
        .expect("bucket set with a node down");
    assert_eq!((info.n, info.r, info.w), (3, 2, 3));
    assert_eq!(info.sibling_threshold, 5);
    // Bad combinations and unknown plugins are clear errors; nothing changes.
    let too_many = BucketSpec {
        w: Some(4),
        ..BucketSpec::default()
    };
    let err = n1
        .bucket_set("strict3", too_many, None, false)
        .await
        .expect_err("w=4 > n=3");
    assert_eq!(err.code(), Some(ErrorCode::InvalidQuorum));
    let err = n1
        .bucket_set("strict3", BucketSpec::default(), Some("nope"), false)
        .await
        .expect_err("no such plugin");
    assert_eq!(err.code(), Some(ErrorCode::UnknownPlugin));
    // The bucket's w=3 now applies: with one node down, a default put fails its quorum.
    let err = n1
        .put("strict3", "k", b"v".to_vec(), None)
        .await
        .expect_err("w=3 with a node down");
    assert_eq!(err.code(), Some(ErrorCode::QuorumFailed));
    // The second node got the change pushed.
    let n2 = c.client(1).await;
    assert_eq!(n2.bucket_show("strict3").await.expect("show").w, 3);
    // The node that was down catches up by pulling.
    c.restart(2);
    let n3 = c.client(2).await;
    eventually("the restarted node to learn the bucket", || async {
        n3.bucket_show("strict3").await.is_ok_and(|b| b.w == 3)
    })
    .await;
    // A restart keeps it.
    c.kill9(0);
    c.restart(0);
    let n1 = c.client(0).await;
    let info = n1.bucket_show("strict3").await.expect("show after restart");
    assert_eq!((info.w, info.sibling_threshold), (3, 5));
    assert!(info.set_by.is_some());
}

// A node killed and restarted on its data directory answers packets of its previous life's
// connections with stateless resets its peers accept (the reset key derives from its
// identity), so the peer redials at once and resends: the first write after the restart
// succeeds instead of waiting out the (here 30 s) peer timeout on a dead connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_redialled_at_once() {
    let mut c = ClusterProc::start(
        26,
        2,
        &[
            "--n",
            "2",
            "--peer-timeout-ms",
            "30000",
            "--request-timeout-ms",
            "60000",
            "--sloppy-quorum",
            "false",
        ],
    );
    let n1 = c.client(0).await;
    // Opens n1's connection to n2.
    eventually("a w=2 put through n1", || {
        let n1 = n1.clone();
        async move {
            n1.put_with("b", "k0", b"v".to_vec(), None, &w(2))
                .await
                .is_ok()
        }
    })
    .await;
    c.kill9(1);
    c.restart(1);
    let n2 = c.client(1).await;
    n2.ping().await.expect("n2 serves again");
    let started = std::time::Instant::now();
    n1.put_with("b", "k1", b"v".to_vec(), None, &w(2))
        .await
        .expect("the write reaches the restarted n2");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "took {took:?}: the old connection was waited out, not reset"
    );
    let got = n2.get_with("b", "k1", &r(1)).await.expect("get on n2");
    assert_eq!(got.values(), vec![&b"v"[..]]);
}
