//! Everything the client limits allow replicates (issue 11, point 5): objects whose
//! siblings together exceed one request frame, and plugins of interpreter size, on a real
//! 3-node cluster over QUIC (127.0.41.x).

mod support;

use std::time::Duration;

use quiver_sdk::{Client, ReadOptions, WriteOptions};
use support::ClusterProc;

const SUBNET: u8 = 41;

/// `component` with a custom section of `bytes` zero bytes appended: the same plugin, as
/// large as a component that carries an interpreter.
fn padded(component: &[u8], bytes: usize) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"quiver-test-padding";
    let mut section = Vec::with_capacity(bytes + 32);
    leb128(name.len(), &mut section);
    section.extend_from_slice(name);
    section.resize(section.len() + bytes, 0);
    let mut out = component.to_vec();
    out.push(0); // custom section id
    leb128(section.len(), &mut out);
    out.extend_from_slice(&section);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_siblings_and_large_plugins_reach_every_node() {
    let cluster = ClusterProc::start(SUBNET, 3, &["--peer-timeout-ms", "5000"]);
    let client = cluster.client(0).await;
    let w3 = WriteOptions {
        w: Some(3),
        ..WriteOptions::default()
    };
    // Two blind writes of 700 KB: concurrent siblings, 1.4 MB together, more than one
    // request frame may carry; every replica must take the whole object.
    let a = vec![b'a'; 700 * 1024];
    let b = vec![b'b'; 700 * 1024];
    client
        .put_with("big", "k", a.clone(), None, &w3)
        .await
        .expect("first 700 KB sibling");
    client
        .put_with("big", "k", b.clone(), None, &w3)
        .await
        .expect("second 700 KB sibling replicates with w=3");
    for i in 0..3 {
        let node = cluster.client(i).await;
        let got = node
            .get_with(
                "big",
                "k",
                &ReadOptions {
                    r: Some(3),
                    ..ReadOptions::default()
                },
            )
            .await
            .expect("get both siblings");
        let mut values = got.values();
        values.sort();
        assert_eq!(values, vec![a.as_slice(), b.as_slice()], "node {i}");
    }

    // An 18 MB plugin reaches every node in the upload itself, not later by gossip.
    let lww = std::fs::read(quiver_guests::lww()).expect("lww component");
    let big = padded(&lww, 18 * 1024 * 1024);
    let mut config = cluster.client_config();
    config.request_timeout = Duration::from_secs(120);
    let uploader = Client::connect(&cluster.addrs[1], config)
        .await
        .expect("connect");
    let up = uploader
        .plugin_upload("big-lww", big.clone(), false)
        .await
        .expect("upload 18 MB");
    assert_eq!(up.plugin.size, big.len() as u64);
    assert_eq!(up.replicated_to, vec!["n1", "n2", "n3"], "{up:?}");
    assert!(up.pending.is_empty(), "{up:?}");
}

/// A reply past the node's response budget is refused with a clear error, and a head read
/// (sizes and context, no values) still lets the client resolve the siblings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_past_the_response_budget_is_refused_and_head_reads_resolve_it() {
    use quiver_sdk::{Error, ErrorCode};
    let dir = tempfile::tempdir().expect("temp dir");
    let node = support::NodeProc::start(
        dir.path(),
        &[
            "--engine",
            "memory",
            "--value-bytes-max",
            "1000",
            "--response-bytes-max",
            "70000",
        ],
    );
    let client = node.client().await;
    for i in 0..80u8 {
        client
            .put("b", "k", vec![i; 1000], None)
            .await
            .expect("blind write");
    }
    match client.get("b", "k").await {
        Err(Error::Server { code, message, .. }) => {
            assert_eq!(code, ErrorCode::ResponseTooLarge);
            assert!(message.contains("--head"), "{message}");
        }
        other => panic!("expected ResponseTooLarge, got {other:?}"),
    }
    let head = client
        .get_with(
            "b",
            "k",
            &ReadOptions {
                head: true,
                ..ReadOptions::default()
            },
        )
        .await
        .expect("head read");
    assert_eq!(head.siblings.len(), 80);
    assert!(
        head.siblings
            .iter()
            .all(|s| s.value.is_empty() && s.value_bytes == 1000)
    );
    client
        .put("b", "k", b"resolved".to_vec(), Some(&head.context))
        .await
        .expect("resolve with the head's context");
    assert_eq!(
        client.get("b", "k").await.expect("get").values(),
        vec![b"resolved".as_slice()]
    );
}
