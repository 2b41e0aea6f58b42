//! Active anti-entropy between real `quiver server` processes over QUIC on loopback
//! (127.0.X.1..=3, one subnet per test), Dynamo §4.7. Read repair is off and sloppy quorum
//! is off (so no hints exist): whatever a replica regains, it regains by hash-tree exchange.
//!
//! Convergence is awaited by polling node status for the state it must reach, with a
//! deadline; no test sleeps for a guessed duration.

mod support;

use std::time::Duration;

use quiver_core::storage::{WriteBatch, keys};
use quiver_sdk::{Client, ReadOptions, WriteOptions};
use support::{ClusterProc, eventually_within};

/// Server flags of every test here: anti-entropy every 300 ms, nothing else repairs.
const FLAGS: &[&str] = &[
    "--peer-timeout-ms",
    "2000",
    "--read-repair",
    "false",
    "--sloppy-quorum",
    "false",
    "--ae-interval-ms",
    "300",
];

fn w(n: u8) -> WriteOptions {
    WriteOptions {
        w: Some(n),
        ..Default::default()
    }
}

fn r1() -> ReadOptions {
    ReadOptions {
        r: Some(1),
        ..Default::default()
    }
}

fn value(i: usize, len: usize) -> Vec<u8> {
    let seed = format!("value-{i}-");
    seed.bytes().cycle().take(len.max(seed.len())).collect()
}

/// Writes keys `k{i}` for `range` with `value(i, len)` from `tasks` concurrent writers
/// spread over `clients`; returns the key and value bytes written.
async fn load(
    clients: &[Client],
    bucket: &str,
    range: std::ops::Range<usize>,
    len: usize,
    quorum: u8,
) -> u64 {
    const TASKS: usize = 32;
    let mut set = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let client = clients[t % clients.len()].clone();
        let (bucket, range) = (bucket.to_string(), range.clone());
        set.spawn(async move {
            let mut bytes = 0u64;
            for i in range.filter(|i| i % TASKS == t) {
                let key = format!("k{i}");
                let v = value(i, len);
                bytes += (key.len() + v.len()) as u64;
                client
                    .put_with(&bucket, &key, v, None, &w(quorum))
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
            }
            bytes
        });
    }
    let mut total = 0;
    while let Some(done) = set.join_next().await {
        total += done.expect("writer task");
    }
    total
}

async fn status_of(c: &ClusterProc, i: usize) -> Option<quiver_sdk::wire::NodeStatus> {
    let client = c.client(i).await;
    let s = client.status().await.ok();
    client.close().await;
    s
}

// A replica whose data directory is wiped gets every key back — values and deletions —
// from its peers' hash trees alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_is_restored_by_anti_entropy_alone() {
    const KEYS: usize = 2_000;
    const DELETED: usize = 100;
    let mut c = ClusterProc::start(22, 3, FLAGS);
    let clients = vec![c.client(0).await, c.client(1).await, c.client(2).await];
    load(&clients, "b", 0..KEYS, 64, 3).await;
    for i in 0..DELETED {
        let key = format!("k{i}");
        let got = clients[0].get("b", &key).await.expect("get");
        clients[0]
            .delete_with("b", &key, Some(&got.context), &w(3))
            .await
            .expect("delete");
    }
    eventually_within("n3 indexes every key", Duration::from_secs(60), || async {
        status_of(&c, 2)
            .await
            .is_some_and(|s| s.ae_keys == KEYS as u64)
    })
    .await;

    c.stop(2);
    c.wipe(2);
    c.restart(2);
    // (No check that n3 starts empty: its peers may already be pushing by the time a
    // status request reaches it. The data directory is gone, so everything it serves below
    // came back through anti-entropy.)
    eventually_within(
        "anti-entropy restores every key on n3",
        Duration::from_secs(120),
        || async {
            status_of(&c, 2)
                .await
                .is_some_and(|s| s.ae_keys == KEYS as u64)
        },
    )
    .await;

    // Every key answers from n3's own storage: R=1 coordinated by n3 is decided by its
    // local replica.
    let n3 = c.client(2).await;
    for i in 0..KEYS {
        let key = format!("k{i}");
        let got = n3.get_with("b", &key, &r1()).await.expect("get from n3");
        if i < DELETED {
            assert!(
                got.values().is_empty(),
                "{key} was deleted and stays deleted"
            );
        } else {
            assert_eq!(got.values(), vec![&value(i, 64)[..]], "{key} on n3");
        }
    }
    let mut repaired = 0;
    for i in 0..3 {
        repaired += status_of(&c, i).await.map_or(0, |s| s.ae_keys_repaired);
    }
    assert!(
        repaired >= KEYS as u64,
        "status counts the repairs: {repaired}"
    );
}

/// Sum of the anti-entropy bytes the running nodes sent.
async fn ae_bytes(c: &ClusterProc, nodes: &[usize]) -> u64 {
    let mut total = 0;
    for &i in nodes {
        total += status_of(c, i).await.map_or(0, |s| s.ae_bytes_sent);
    }
    total
}

// The exchange descends only into differing ranges: with 100 k keys of which 100 differ,
// repairing them costs well under 1% of the data's bytes. Values are 1 KiB, the YCSB
// default record size. `QUIVER_AE_KEYS` and `QUIVER_AE_VALUE_BYTES` change the data set
// (defaults 100 000 and 1024).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_over_100k_keys_with_100_differing_moves_under_1_percent() {
    const DIFFERING: usize = 100;
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let keys = env("QUIVER_AE_KEYS", 100_000);
    let value_len = env("QUIVER_AE_VALUE_BYTES", 1024);
    let mut c = ClusterProc::start(23, 3, FLAGS);
    let clients = vec![c.client(0).await, c.client(1).await, c.client(2).await];
    let data_bytes = load(&clients, "b", 0..keys, value_len, 3).await;
    for cl in clients {
        cl.close().await;
    }
    // n3 loses 100 keys. Stopping it and writing while it is down would race with stores
    // still in flight to it (they reach it if it is back before they time out), so the keys
    // are taken out of its storage directly, as a damaged disk would, and its index marker
    // with them so that it rebuilds its trees from the records at start.
    c.stop(2);
    {
        let engine = quiver_storage::open_engine(
            quiver_storage::EngineKind::Fjall,
            &c.dir.path().join("n3").join("fjall"),
        )
        .expect("open n3's storage");
        let mut batch = WriteBatch::new();
        for i in 0..DIFFERING {
            batch.delete(keys::data_key(b"b", format!("k{i}").as_bytes()).expect("key"));
        }
        batch.delete(keys::meta_key("ae-index-v1"));
        engine.apply(&batch).expect("drop keys");
        engine.sync().expect("sync");
    }
    let before = ae_bytes(&c, &[0, 1]).await;
    c.restart(2);
    let want = keys as u64;
    eventually_within(
        "n3 regains the keys it lost",
        Duration::from_secs(120),
        || async { status_of(&c, 2).await.is_some_and(|s| s.ae_keys == want) },
    )
    .await;
    let moved = ae_bytes(&c, &[0, 1, 2]).await - before;
    let share = moved as f64 / data_bytes as f64 * 100.0;
    println!(
        "anti-entropy: {keys} keys ({data_bytes} bytes of keys and values), {DIFFERING} \
         differing: {moved} bytes exchanged until repaired = {share:.3}% of the data"
    );
    assert!(
        moved * 100 <= data_bytes,
        "{moved} bytes exchanged is over 1% of {data_bytes}"
    );
    let n3 = c.client(2).await;
    for i in 0..DIFFERING {
        let got = n3.get_with("b", format!("k{i}"), &r1()).await.expect("get");
        assert_eq!(got.values(), vec![&value(i, value_len)[..]], "k{i} on n3");
    }
}

/// Waits until every listed node has initiated `more` anti-entropy exchanges (and so run as
/// many reaping passes) beyond what it had when called: a count of rounds, not a guess of
/// time.
async fn ae_rounds(c: &ClusterProc, nodes: &[usize], more: u64) {
    let mut base = Vec::new();
    for &i in nodes {
        base.push(status_of(c, i).await.map_or(0, |s| s.ae_exchanges));
    }
    for (&i, start) in nodes.iter().zip(base) {
        eventually_within("anti-entropy rounds", Duration::from_secs(60), || async {
            status_of(c, i)
                .await
                .is_some_and(|s| s.ae_exchanges >= start + more)
        })
        .await;
    }
}

/// Deletes `k{i}` for `range` through `client` with write quorum `quorum`.
async fn delete_all(client: &Client, range: std::ops::Range<usize>, quorum: u8) {
    for i in range {
        let key = format!("k{i}");
        let got = client.get("b", &key).await.expect("get before delete");
        client
            .delete_with("b", &key, Some(&got.context), &w(quorum))
            .await
            .unwrap_or_else(|e| panic!("delete {key}: {e}"));
    }
}

/// Asserts that no node in `nodes` holds anything for the keys, and that reads find none.
async fn assert_gone(c: &ClusterProc, nodes: &[usize], keys: std::ops::Range<usize>) {
    for &n in nodes {
        let s = status_of(c, n).await.expect("status");
        assert_eq!(
            (s.ae_keys, s.tombstones),
            (0, 0),
            "node {} holds nothing",
            n + 1
        );
        let client = c.client(n).await;
        for i in keys.clone() {
            let got = client
                .get_with("b", format!("k{i}"), &r1())
                .await
                .expect("get");
            assert!(got.siblings.is_empty(), "k{i} on node {}: {got:?}", n + 1);
        }
        client.close().await;
    }
}

// Cassandra's resurrection: a replica misses a delete while down. Its peers must not purge
// the tombstones while it is away, however long that is; once it is back, anti-entropy
// brings it the tombstones, every replica reaps, and the deleted values never return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_a_delete_cannot_resurrect_the_value() {
    const KEYS: usize = 50;
    let mut flags = FLAGS.to_vec();
    flags.extend(["--tombstone-grace-ms", "200"]);
    let mut c = ClusterProc::start(24, 3, &flags);
    let n1 = c.client(0).await;
    load(std::slice::from_ref(&n1), "b", 0..KEYS, 32, 3).await;
    c.kill9(2);
    delete_all(&n1, 0..KEYS, 2).await;
    // Several reaping passes, each past the grace period, while n3 is down.
    ae_rounds(&c, &[0, 1], 5).await;
    for i in [0, 1] {
        let s = status_of(&c, i).await.expect("status");
        assert_eq!(
            (s.tombstones, s.tombstones_reaped),
            (KEYS as u64, 0),
            "node {} keeps every tombstone while a replica is down",
            i + 1
        );
    }
    c.restart(2);
    eventually_within(
        "every replica reaps the tombstones",
        Duration::from_secs(60),
        || async {
            let mut empty = true;
            for i in 0..3 {
                empty &= status_of(&c, i).await.is_some_and(|s| s.ae_keys == 0);
            }
            empty
        },
    )
    .await;
    // More rounds: nothing comes back.
    ae_rounds(&c, &[0, 1, 2], 3).await;
    assert_gone(&c, &[0, 1, 2], 0..KEYS).await;
}

// Riak's resurrection, with everything on (sloppy quorum, hinted handoff, read repair): a
// primary is down during the delete, so fallbacks take the tombstones with hints. No
// tombstone may be reaped while a hint for it is pending or its owner is away; after the
// owner returns and every copy is the tombstone, all are reaped, and a second crash and
// return of that replica brings nothing back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_through_fallbacks_are_reaped_only_after_the_hints_are_delivered() {
    const KEYS: usize = 40;
    let mut c = ClusterProc::start(
        25,
        5,
        &[
            "--peer-timeout-ms",
            "2000",
            "--ae-interval-ms",
            "300",
            "--tombstone-grace-ms",
            "200",
        ],
    );
    let n1 = c.client(0).await;
    load(std::slice::from_ref(&n1), "b", 0..KEYS, 32, 3).await;
    c.kill9(2);
    delete_all(&n1, 0..KEYS, 3).await;
    ae_rounds(&c, &[0, 1, 3, 4], 5).await;
    let mut held = 0;
    for i in [0, 1, 3, 4] {
        let s = status_of(&c, i).await.expect("status");
        assert_eq!(
            s.tombstones_reaped,
            0,
            "node {} reaped while n3 was down",
            i + 1
        );
        held += s.hints;
    }
    assert!(held > 0, "fallbacks hold hints for n3");
    c.restart(2);
    eventually_within(
        "hints delivered and every tombstone reaped",
        Duration::from_secs(60),
        || async {
            let mut done = true;
            for i in 0..5 {
                done &= status_of(&c, i)
                    .await
                    .is_some_and(|s| s.ae_keys == 0 && s.hints == 0);
            }
            done
        },
    )
    .await;
    c.kill9(2);
    c.restart(2);
    ae_rounds(&c, &[0, 1, 2, 3, 4], 3).await;
    assert_gone(&c, &[0, 1, 2, 3, 4], 0..KEYS).await;
}
