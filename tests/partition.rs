//! Always writeable under partitions (issue 12, point 6): a node cut off from its peers by
//! nftables answers `QuorumFailed` for the keys it coordinates, and the routing client gets
//! those gets, puts and deletes through the other replicas, which still form a quorum. The
//! client (127.0.0.1) still reaches every node: only node-to-node packets are dropped.
//!
//! Needs root and nft (`scripts/faults-deps.sh`).

mod support;

use std::net::Ipv4Addr;

use quiver_faults::nft::Firewall;
use quiver_sdk::{ClusterClient, Error, ErrorCode};
use support::ClusterProc;

const SUBNET: u8 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_requests_get_through_when_their_first_replica_is_cut_off() {
    let c = ClusterProc::start(SUBNET, 3, &["--peer-timeout-ms", "1000"]);
    let client = ClusterClient::connect(&c.addrs, c.client_config())
        .await
        .expect("routing client");
    // Keys whose first primary, hence first coordinator tried, is n1.
    let keys: Vec<String> = {
        let mut keys = Vec::new();
        for i in 0.. {
            let key = format!("k{i}");
            if client.route("b", key.as_bytes()).await.first() == Some(&c.addrs[0]) {
                keys.push(key);
            }
            if keys.len() == 8 {
                break;
            }
        }
        keys
    };
    for key in &keys {
        client
            .put("b", key, b"before".to_vec(), None)
            .await
            .expect("put before the partition");
    }

    // n1 hears nothing from n2 and n3 and they hear nothing from it.
    let fw = Firewall::new("quiver_test_partition_50").expect("nft (run scripts/faults-deps.sh)");
    let ip = |i: u8| Ipv4Addr::new(127, 0, SUBNET, i);
    fw.partition(&[ip(1)], &[ip(2), ip(3)]).expect("partition");

    // The fault is real: n1 on its own cannot gather a write quorum.
    let n1 = c.client(0).await;
    match n1.put("b", &keys[0], b"alone".to_vec(), None).await {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::QuorumFailed), "{e}"),
        Ok(_) => panic!("n1 wrote with w=2 while cut off from both peers"),
    }

    for key in &keys {
        let got = client
            .get("b", key)
            .await
            .unwrap_or_else(|e| panic!("get {key} during the partition: {e}"));
        assert!(got.values().contains(&&b"before"[..]), "{key}: {got:?}");
        let ctx = client
            .put("b", key, b"during".to_vec(), Some(&got.context))
            .await
            .unwrap_or_else(|e| panic!("put {key} during the partition: {e}"));
        let got = client
            .get("b", key)
            .await
            .unwrap_or_else(|e| panic!("get {key} after the put: {e}"));
        assert!(got.values().contains(&&b"during"[..]), "{key}: {got:?}");
        assert!(!got.values().contains(&&b"before"[..]), "{key}: {got:?}");
        let _ = ctx;
    }
    // A delete goes through the same way.
    let got = client.get("b", &keys[1]).await.expect("get");
    client
        .delete("b", &keys[1], Some(&got.context))
        .await
        .expect("delete during the partition");
    assert!(!client.get("b", &keys[1]).await.expect("get").found());

    // With every replica unreachable the error names each replica tried and its answer.
    fw.partition(&[ip(2)], &[ip(3)])
        .expect("isolate every node");
    let err = client
        .put("b", &keys[0], b"nowhere".to_vec(), None)
        .await
        .expect_err("no node can gather w=2");
    match &err {
        Error::Replicas { attempts } => {
            // Each node once (n1, which failed moments ago, is tried last now).
            let mut tried: Vec<&str> = attempts.iter().map(|a| a.node.as_str()).collect();
            tried.sort();
            assert_eq!(tried, ["n1", "n2", "n3"], "{err}");
            for a in attempts {
                assert_eq!(a.error.code(), Some(ErrorCode::QuorumFailed), "{err}");
            }
            let text = err.to_string();
            for addr in &c.addrs {
                assert!(text.contains(addr.as_str()), "{text}");
            }
        }
        other => panic!("expected the replicas tried, got {other}"),
    }
    drop(fw);
}
