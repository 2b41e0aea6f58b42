//! Active anti-entropy between real `quiver server` processes over QUIC on loopback
//! (127.0.X.1..=3, one subnet per test), Dynamo §4.7. Read repair is off and sloppy quorum
//! is off (so no hints exist): whatever a replica regains, it regains by hash-tree exchange.
//!
//! Convergence is awaited by polling node status for the state it must reach, with a
//! deadline; no test sleeps for a guessed duration.

mod support;

use std::time::Duration;

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
    let restored = status_of(&c, 2).await.expect("n3 answers");
    assert_eq!(restored.ae_keys, 0, "the wiped node starts empty");
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
// default record size. `QUIVER_AE_KEYS` scales the data set (default 100 000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_over_100k_keys_with_100_differing_moves_under_1_percent() {
    const DIFFERING: usize = 100;
    const VALUE: usize = 1024;
    let keys: usize = std::env::var("QUIVER_AE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut c = ClusterProc::start(23, 3, FLAGS);
    let clients = vec![c.client(0).await, c.client(1).await, c.client(2).await];
    let data_bytes = load(&clients, "b", 0..keys, VALUE, 3).await;
    for cl in clients {
        cl.close().await;
    }
    c.stop(2);
    let n1 = c.client(0).await;
    load(
        std::slice::from_ref(&n1),
        "b",
        keys..keys + DIFFERING,
        VALUE,
        2,
    )
    .await;
    let before = ae_bytes(&c, &[0, 1]).await;
    c.restart(2);
    let want = (keys + DIFFERING) as u64;
    eventually_within(
        "n3 regains the keys it missed",
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
    for i in keys..keys + DIFFERING {
        let got = n3.get_with("b", format!("k{i}"), &r1()).await.expect("get");
        assert_eq!(got.values(), vec![&value(i, VALUE)[..]], "k{i} on n3");
    }
}
