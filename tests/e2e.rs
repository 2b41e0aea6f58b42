//! End-to-end tests over real QUIC on loopback against real `quiver server` processes.
//!
//! Each test names the Dynamo section (DeCandia et al., SOSP 2007) or issue point it checks.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use quiver_core::causality::{Dot, decode_context, encode_context};
use quiver_core::limits::DOT_COUNTER_MAX;
use quiver_sdk::wire::{self, ErrorCode, Request, Response};
use quiver_sdk::{Client, ClientConfig, Context, Error, ReadOptions, WriteOptions};
use support::{ClusterProc, NodeProc, eventually};
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

fn reads(r: u8) -> ReadOptions {
    ReadOptions {
        r: Some(r),
        ..Default::default()
    }
}

/// `ctx` with the counter of `node`'s actor (its latest epoch in the context) raised to
/// `counter`: what a client can do to the opaque bytes.
fn forge(ctx: &Context, node: &str, counter: u64) -> Context {
    let mut vv = decode_context(ctx.as_bytes()).expect("a context a node returned");
    let actor = vv
        .iter()
        .map(|(a, _)| a)
        .filter(|a| a.node == node)
        .max_by_key(|a| a.epoch)
        .unwrap_or_else(|| panic!("the context names no actor of {node}: {vv:?}"))
        .clone();
    vv.add(&Dot { actor, counter });
    Context::from_bytes(encode_context(&vv))
}

/// Puts with a forged context: refused with `InvalidContext`, or accepted (true).
async fn forged_put(c: &Client, key: &str, value: &str, ctx: &Context) -> bool {
    match c.put("b", key, value.into(), Some(ctx)).await {
        Ok(_) => true,
        Err(e) => {
            assert_eq!(e.code(), Some(ErrorCode::InvalidContext), "{e}");
            false
        }
    }
}

fn sorted(values: &[&str]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = values.iter().map(|s| s.as_bytes().to_vec()).collect();
    v.sort();
    v
}

/// A write every replica acknowledges durably (sync, W=3): each one's fsync then covers
/// everything it applied before, so SIGKILL loses none of it.
async fn barrier(c: &Client) {
    let all = WriteOptions {
        w: Some(3),
        ..Default::default()
    };
    c.put_with("b", "barrier", b"x".to_vec(), None, &all)
        .await
        .expect("a W=3 put");
}

/// Every node reads `key` with exactly `expected` from its own copy (R=1 is answered by the
/// local replica first), and an R=3 read through every node succeeds, which needs every
/// replica's record to decode.
async fn readable_everywhere(c: &ClusterProc, key: &str, expected: &[&str]) {
    let want = sorted(expected);
    for i in 0..c.addrs.len() {
        let client = c.client(i).await;
        eventually(&format!("n{} holds {key} = {expected:?}", i + 1), || {
            let (client, want) = (client.clone(), want.clone());
            async move {
                let got = match client.get_with("b", key, &reads(1)).await {
                    Ok(got) => got,
                    Err(e) => panic!("n{} cannot read {key}: {e}", i + 1),
                };
                let mut values: Vec<Vec<u8>> =
                    got.values().into_iter().map(<[u8]>::to_vec).collect();
                values.sort();
                values == want
            }
        })
        .await;
        let all = client
            .get_with("b", key, &reads(3))
            .await
            .unwrap_or_else(|e| panic!("R=3 read of {key} through n{}: {e}", i + 1));
        let mut values: Vec<Vec<u8>> = all.values().into_iter().map(<[u8]>::to_vec).collect();
        values.sort();
        assert_eq!(values, want, "R=3 read of {key} through n{}", i + 1);
    }
}

// Issue 11, point 4 ("contexts cannot corrupt"): a client that sets a counter in a get's
// context to 2^64-1 (the coordinator's own actor) or just past the counter limit (another
// node's actor), or exactly to the limit, is refused or harmless: the key stays readable on
// every node with every acknowledged value, also after a restart. Before the fix the
// coordinator's next write wrapped its counter to zero and every read of the key failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_context_counters_cannot_make_a_key_unreadable() {
    let mut c = ClusterProc::start(30, 3, &["--peer-timeout-ms", "2000"]);
    let n = [c.client(0).await, c.client(1).await, c.client(2).await];

    // The coordinator's own actor: every node is a replica, so n1 coordinates its puts.
    let key = "own";
    n[0].put("b", key, b"v1".to_vec(), None).await.expect("put");
    let read = n[0].get_with("b", key, &reads(3)).await.expect("get");
    assert!(read.siblings[0].actor.starts_with("n1/"), "{read:?}");
    let mut own = vec!["v1"];
    for (value, counter) in [("forged-max", u64::MAX), ("forged-limit", DOT_COUNTER_MAX)] {
        if forged_put(&n[0], key, value, &forge(&read.context, "n1", counter)).await {
            // Its context covers every value of the key so far (all n1's).
            own = vec![value];
        }
    }
    readable_everywhere(&c, key, &own).await;
    // The coordinator keeps writing, and so do the others, also with the context a put
    // returned. (Chains start at an actor's first write of the key: a returned context
    // names the new dot's counter, which also covers the actor's earlier dots.)
    n[0].put("b", key, b"b1".to_vec(), None).await.expect("put");
    for (i, value) in [(1, "b2"), (2, "b3")] {
        let ctx = n[i].put("b", key, value.into(), None).await.expect("put");
        n[i].put("b", key, format!("{value}+").into(), Some(&ctx))
            .await
            .expect("put with the returned context");
    }
    own.extend(["b1", "b2+", "b3+"]);
    readable_everywhere(&c, key, &own).await;

    // Another node's actor: n1 cannot check it; the entry reaches n2 with the object.
    let key = "other";
    n[1].put("b", key, b"w1".to_vec(), None).await.expect("put");
    let read = n[0].get_with("b", key, &reads(3)).await.expect("get");
    let mut other = vec!["w1"];
    let over = forge(&read.context, "n2", DOT_COUNTER_MAX + 1);
    assert!(
        !forged_put(&n[0], key, "over", &over).await,
        "a counter above the limit is refused"
    );
    if forged_put(
        &n[0],
        key,
        "at-limit",
        &forge(&read.context, "n2", DOT_COUNTER_MAX),
    )
    .await
    {
        other = vec!["at-limit"];
    }
    // n2 holds the forged entry before it writes again.
    readable_everywhere(&c, key, &other).await;
    // The context of a get is accepted by a put, also with n2's counter at the limit.
    let read = n[1].get_with("b", key, &reads(3)).await.expect("get");
    n[1].put("b", key, b"w2".to_vec(), Some(&read.context))
        .await
        .expect("put with a get's context");
    let ctx = n[2].put("b", key, b"w3".to_vec(), None).await.expect("put");
    n[2].put("b", key, b"w3+".to_vec(), Some(&ctx))
        .await
        .expect("put with the returned context");
    n[0].put("b", key, b"w4".to_vec(), None).await.expect("put");
    n[1].put("b", key, b"w5".to_vec(), None).await.expect("put");
    other = vec!["w2", "w3+", "w4", "w5"];
    readable_everywhere(&c, key, &other).await;

    // After a crash and restart of every node (new boots: fresh epochs), nothing changed
    // and writes go on.
    barrier(&n[0]).await;
    drop(n);
    for i in 0..3 {
        c.kill9(i);
    }
    for i in 0..3 {
        c.restart(i);
    }
    readable_everywhere(&c, "own", &own).await;
    readable_everywhere(&c, "other", &other).await;
    let n2 = c.client(1).await;
    for (key, values) in [("own", &mut own), ("other", &mut other)] {
        n2.put("b", key, b"after".to_vec(), None)
            .await
            .expect("put after restart");
        values.push("after");
        readable_everywhere(&c, key, values).await;
    }
    barrier(&n2).await;
    drop(n2);

    // Each node alone: its own stored record, nothing merged from the others.
    for i in 0..3 {
        let others: Vec<usize> = (0..3).filter(|&j| j != i).collect();
        for &j in &others {
            c.kill9(j);
        }
        let client = c.client(i).await;
        for (key, values) in [("own", &own), ("other", &other)] {
            let got = client
                .get_with("b", key, &reads(1))
                .await
                .unwrap_or_else(|e| panic!("n{} alone cannot read {key}: {e}", i + 1));
            let mut held: Vec<Vec<u8>> = got.values().into_iter().map(<[u8]>::to_vec).collect();
            held.sort();
            assert_eq!(held, sorted(values), "n{} alone, key {key}", i + 1);
        }
        drop(client);
        for &j in &others {
            c.restart(j);
        }
    }
}
