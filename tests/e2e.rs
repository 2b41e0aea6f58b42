//! End-to-end tests over real QUIC on loopback against real `quiver server` processes.
//!
//! Each test names the Dynamo section (DeCandia et al., SOSP 2007) or issue point it checks.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use quiver_sdk::wire::{self, ErrorCode, Request, Response};
use quiver_sdk::{Client, ClientConfig, Context, Error, WriteOptions};
use support::NodeProc;
use tokio::sync::Mutex;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create a temp dir")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_then_get_round_trips() {
    let dir = tempdir();
    let node = NodeProc::start(dir.path(), &[]);
    let c = node.client().await;
    assert_eq!(c.ping().await.expect("ping").node, "n1");
    let missing = c.get("b", "k").await.expect("get missing");
    assert!(!missing.found());
    assert!(missing.siblings.is_empty());

    c.put("b", "k", b"v1".to_vec(), None).await.expect("put");
    let got = c.get("b", "k").await.expect("get");
    assert_eq!(got.values(), vec![&b"v1"[..]]);
    assert!(got.siblings[0].actor.starts_with("n1/"));
    assert!(got.siblings[0].timestamp_ms > 0);
    // Binary keys and values, and an empty value, are fine.
    c.put("b", [0u8, 255, 1], vec![0u8; 3], None)
        .await
        .expect("binary put");
    assert_eq!(
        c.get("b", [0u8, 255, 1]).await.expect("get").values(),
        vec![&[0u8; 3][..]]
    );
    c.put("b", "empty", Vec::new(), None)
        .await
        .expect("empty value");
    assert!(c.get("b", "empty").await.expect("get").found());
}

// Dynamo §4.4: writes without a context are concurrent; both versions are kept, and a write
// with the context of a read that saw both reconciles them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_become_siblings_and_a_contextual_put_resolves_them() {
    let dir = tempdir();
    let node = NodeProc::start(dir.path(), &[]);
    let c = node.client().await;
    c.put("carts", "alice", b"apple".to_vec(), None)
        .await
        .expect("put 1");
    c.put("carts", "alice", b"pear".to_vec(), None)
        .await
        .expect("put 2");
    let read = c.get("carts", "alice").await.expect("get");
    let mut values = read.values();
    values.sort();
    assert_eq!(values, vec![&b"apple"[..], b"pear"]);

    // A write concurrent with the read's context survives the resolving write.
    c.put("carts", "alice", b"plum".to_vec(), None)
        .await
        .expect("put 3");
    c.put(
        "carts",
        "alice",
        b"apple+pear".to_vec(),
        Some(&read.context),
    )
    .await
    .expect("resolve");
    let after = c.get("carts", "alice").await.expect("get");
    let mut values = after.values();
    values.sort();
    assert_eq!(values, vec![&b"apple+pear"[..], b"plum"]);

    // The context a put returns covers only what that client saw plus its own write.
    let ctx = c
        .put("carts", "bob", b"x".to_vec(), None)
        .await
        .expect("put");
    c.put("carts", "bob", b"y".to_vec(), None)
        .await
        .expect("concurrent put");
    c.put("carts", "bob", b"x2".to_vec(), Some(&ctx))
        .await
        .expect("put with own ctx");
    let bob = c.get("carts", "bob").await.expect("get");
    let mut values = bob.values();
    values.sort();
    assert_eq!(values, vec![&b"x2"[..], b"y"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_then_get_is_not_found() {
    let dir = tempdir();
    let node = NodeProc::start(dir.path(), &[]);
    let c = node.client().await;
    c.put("b", "k", b"v".to_vec(), None).await.expect("put");
    let read = c.get("b", "k").await.expect("get");
    c.delete("b", "k", Some(&read.context))
        .await
        .expect("delete");
    let gone = c.get("b", "k").await.expect("get");
    assert!(!gone.found());
    assert!(gone.siblings.iter().all(|s| s.tombstone));
    // A blind put after the delete brings the key back as a new value.
    c.put("b", "k", b"again".to_vec(), Some(&gone.context))
        .await
        .expect("put again");
    assert_eq!(
        c.get("b", "k").await.expect("get").values(),
        vec![&b"again"[..]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_data_in_both_durability_modes() {
    for mode in ["sync", "buffered"] {
        let dir = tempdir();
        let mut node = NodeProc::start(dir.path(), &["--durability", mode]);
        let c = node.client().await;
        for i in 0..50 {
            c.put("b", format!("k{i}"), format!("v{i}").into_bytes(), None)
                .await
                .expect("put");
        }
        c.delete("b", "k0", None).await.expect("delete");
        c.clone().close().await;
        assert!(
            node.terminate(),
            "graceful shutdown ({mode}) exits with success"
        );

        let node = NodeProc::start(dir.path(), &["--durability", mode]);
        let c = node.client().await;
        for i in 1..50 {
            let got = c.get("b", format!("k{i}")).await.expect("get");
            assert_eq!(
                got.values(),
                vec![format!("v{i}").as_bytes()],
                "{mode}: key k{i}"
            );
        }
        let k0 = c.get("b", "k0").await.expect("get k0");
        // The blind delete is concurrent with the put: both survive as siblings.
        assert_eq!(k0.siblings.len(), 2, "{mode}");
        // Writes after a restart use a fresh epoch: the next blind write is a new sibling.
        c.put("b", "k1", b"after".to_vec(), None)
            .await
            .expect("put after restart");
        assert_eq!(
            c.get("b", "k1").await.expect("get").siblings.len(),
            2,
            "{mode}"
        );
    }
}

// Issue: "SIGKILL loses no acknowledged write in sync mode".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_write_in_sync_mode() {
    const WRITERS: usize = 16;
    const ACKS_BEFORE_KILL: usize = 2_000;
    let dir = tempdir();
    let mut node = NodeProc::start(dir.path(), &["--durability", "sync"]);
    let client = node.client().await;
    let acked = Arc::new(Mutex::new(Vec::<(String, Vec<u8>)>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let reached = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (client, acked, count, reached) = (
            client.clone(),
            acked.clone(),
            count.clone(),
            reached.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("w{w}-{i}");
                let value = format!("value-{w}-{i}").into_bytes();
                match client.put("crash", &key, value.clone(), None).await {
                    Ok(_) => {
                        acked.lock().await.push((key, value));
                        if count.fetch_add(1, Ordering::SeqCst) + 1 == ACKS_BEFORE_KILL {
                            reached.notify_one();
                        }
                    }
                    // The node was killed under us: stop writing.
                    Err(_) => return,
                }
            }
        }));
    }
    reached.notified().await;
    node.kill9();
    for t in tasks {
        t.await.expect("writer task");
    }
    let acked = acked.lock().await.clone();
    assert!(acked.len() >= ACKS_BEFORE_KILL);

    let node = NodeProc::start(dir.path(), &["--durability", "sync"]);
    let c = node.client().await;
    let mut missing = Vec::new();
    for (key, value) in &acked {
        let got = c.get("crash", key).await.expect("get after restart");
        if got.values() != vec![value.as_slice()] {
            missing.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
}

fn code_of(r: Result<impl std::fmt::Debug, Error>) -> ErrorCode {
    match r {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("expected a typed server error, got {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

async fn raw(c: &Client, frame: &[u8]) -> Response {
    c.exchange(frame).await.expect("the node answers")
}

// Issue point 4: every bad input gets its typed error, nothing stored is harmed, and the node
// (and other connections) keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_typed_errors_and_the_node_keeps_serving() {
    let dir = tempdir();
    let node = NodeProc::start(dir.path(), &["--value-bytes-max", "1024"]);
    let c = node.client().await;
    let bystander = node.client().await;
    c.put("b", "k", b"precious".to_vec(), None)
        .await
        .expect("put");

    assert_eq!(
        code_of(c.put("b", "", b"v".to_vec(), None).await),
        ErrorCode::EmptyKey
    );
    assert_eq!(code_of(c.get("b", "").await), ErrorCode::EmptyKey);
    let big_key = vec![b'k'; quiver_core::limits::KEY_BYTES_MAX + 1];
    assert_eq!(
        code_of(c.put("b", &big_key, b"v".to_vec(), None).await),
        ErrorCode::KeyTooLarge
    );
    assert_eq!(
        code_of(c.put("b", "k", vec![0; 1025], None).await),
        ErrorCode::ValueTooLarge
    );
    assert_eq!(
        code_of(c.put("", "k", b"v".to_vec(), None).await),
        ErrorCode::InvalidBucket
    );
    assert_eq!(
        code_of(c.put(&"x".repeat(256), "k", b"v".to_vec(), None).await),
        ErrorCode::InvalidBucket
    );
    for garbage in [
        vec![7u8, 1, 2, 3],
        vec![1, 0xff, 0xff, 0xff, 0xff],
        vec![1; 70_000],
    ] {
        let ctx = Context::from_bytes(garbage);
        assert_eq!(
            code_of(c.put("b", "k", b"v".to_vec(), Some(&ctx)).await),
            ErrorCode::InvalidContext
        );
        assert_eq!(
            code_of(c.delete("b", "k", Some(&ctx)).await),
            ErrorCode::InvalidContext
        );
    }
    // A frame whose body is not a request.
    let garbage = [0u8, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0x99];
    assert!(
        matches!(raw(&c, &garbage).await, Response::Error(e) if e.code == ErrorCode::MalformedRequest)
    );
    // A truncated frame: the header promises more than arrives.
    assert!(
        matches!(raw(&c, &[0, 0, 0, 9, 1]).await, Response::Error(e) if e.code == ErrorCode::MalformedRequest)
    );
    // Less than a header.
    assert!(
        matches!(raw(&c, &[0, 1]).await, Response::Error(e) if e.code == ErrorCode::MalformedRequest)
    );
    // A frame that declares more than the limit is refused unread.
    let mut huge = vec![0xff, 0xff, 0xff, 0xf0];
    huge.extend_from_slice(&[0u8; 64]);
    assert!(
        matches!(raw(&c, &huge).await, Response::Error(e) if e.code == ErrorCode::FrameTooLarge)
    );
    // A valid request with trailing junk in the body.
    let mut frame = wire::encode_frame(&Request::Ping).expect("encode");
    frame.push(0);
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    assert!(
        matches!(raw(&c, &frame).await, Response::Error(e) if e.code == ErrorCode::MalformedRequest)
    );

    // A client speaking an unknown protocol version is refused at the handshake, typed.
    let mut future = ClientConfig::new(node.ca_pem());
    future.alpn = b"quiver-client/99".to_vec();
    match Client::connect(&node.addr.to_string(), future).await {
        Err(Error::UnsupportedProtocol { .. }) => {}
        other => panic!("expected UnsupportedProtocol, got {other:?}"),
    }
    // A client that trusts another CA refuses the node.
    let other_dir = tempdir();
    quiver_node::certs::ensure_ca(other_dir.path()).expect("other CA");
    let other_ca = std::fs::read(other_dir.path().join("ca.pem")).expect("read other CA");
    assert!(matches!(
        Client::connect(&node.addr.to_string(), ClientConfig::new(other_ca)).await,
        Err(Error::Connect { .. })
    ));

    // After all that, the stored value is intact and both connections still work.
    assert_eq!(
        c.get("b", "k").await.expect("get").values(),
        vec![&b"precious"[..]]
    );
    assert_eq!(
        bystander.get("b", "k").await.expect("get").values(),
        vec![&b"precious"[..]]
    );
    let opts = WriteOptions {
        timeout_ms: Some(5_000),
        durability: Some(quiver_sdk::Durability::Buffered),
        w: None,
    };
    bystander
        .put_with("b", "k2", b"ok".to_vec(), None, &opts)
        .await
        .expect("put still works");
}

// Garbage that is not even QUIC must not disturb the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_garbage_is_ignored() {
    let dir = tempdir();
    let node = NodeProc::start(dir.path(), &[]);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    for i in 0..100u8 {
        sock.send_to(&[i; 1200], node.addr).expect("send garbage");
    }
    let c = node.client().await;
    c.put("b", "k", b"v".to_vec(), None)
        .await
        .expect("put after garbage");
}
