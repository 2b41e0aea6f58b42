//! Membership changes with real processes over QUIC on loopback: a fourth node joins a
//! loaded three-node cluster and takes its share while a client keeps writing; then a node
//! leaves, hands everything off and exits. Every acknowledged write must still be there,
//! and every node must end up holding exactly the keys the final ring gives it.
//!
//! Anti-entropy and read repair stay off, so the data moves by handoff alone.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use quiver_sdk::wire::{NodeStatus, PlanView};
use quiver_sdk::{Client, ClientConfig, WriteOptions};
use support::{ClusterProc, NodeProc, eventually_within, quiver_bin};

const SUBNET: u8 = 26;
const KEYS: usize = 10_000;
const BUCKET: &str = "members";
/// Fast gossip and handoff so the test takes seconds, not minutes.
const FAST: [&str; 6] = [
    "--gossip-interval-ms",
    "200",
    "--handoff-interval-ms",
    "200",
    "--read-repair",
    "false",
];

fn value(key: &str) -> Vec<u8> {
    format!("value of {key}").into_bytes()
}

/// Runs `quiver cluster ARGS --output json` against `node` and parses the plan it prints.
/// Runs `quiver cluster ARGS --cluster NODE` with the CA.
fn quiver_cluster(ca: &Path, node: &str, args: &[&str]) -> std::process::Output {
    Command::new(quiver_bin())
        .arg("cluster")
        .args(args)
        .args(["--cluster", node])
        .env("QUIVER_CA", ca)
        .env("QUIVER_KEY", support::admin_key_beside(ca))
        .output()
        .expect("run quiver cluster")
}

fn admin(ca: &Path, node: &str, args: &[&str]) -> PlanView {
    let out = quiver_cluster(ca, node, &[args, &["--output", "json"]].concat());
    assert!(
        out.status.success(),
        "quiver cluster {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json plan");
    PlanView {
        node: json["node"].as_str().unwrap_or_default().to_string(),
        ring_version: json["ring_version"].as_u64().unwrap_or_default(),
        next_version: json["next_version"].as_u64(),
        committed: json["committed"].as_bool().unwrap_or_default(),
        members: Vec::new(),
        transfers: Vec::new(),
        keys_estimated: json["keys_estimated"].as_u64().unwrap_or_default(),
        copies_moved: json["copies_moved"].as_u64().unwrap_or_default(),
        copies_total: json["copies_total"].as_u64().unwrap_or_default(),
    }
}

async fn status(addr: &str, config: &ClientConfig) -> Option<NodeStatus> {
    let client = Client::connect(addr, config.clone()).await.ok()?;
    let s = client.status().await.ok();
    client.close().await;
    s
}

/// Writes keys `PREFIX-0, PREFIX-1, ...` through `client` until `stop`, returning the keys whose
/// write was acknowledged (W=2). Failed writes are allowed (none are expected) but not
/// counted: only acknowledged writes must survive.
async fn keep_writing(
    client: Client,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> (Vec<String>, usize) {
    let mut acked = Vec::new();
    let mut failed = 0;
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("{prefix}-{i}");
        i += 1;
        match client
            .put_with(BUCKET, &key, value(&key), None, &WriteOptions::default())
            .await
        {
            Ok(_) => acked.push(key),
            Err(_) => failed += 1,
        }
    }
    (acked, failed)
}

/// A fourth node `n4` for `cluster`: started alone on its own directory with the cluster's
/// CA and the cluster's n (alone it would default to n=1, which a join refuses),
/// anti-entropy off, fast gossip and handoff, and `extra` flags.
struct Joiner {
    dir: std::path::PathBuf,
    addr: String,
    args: Vec<String>,
}

impl Joiner {
    fn new(cluster: &ClusterProc, addr: &str, extra: &[&str]) -> Joiner {
        let ca_dir = cluster.ca_dir().display().to_string();
        let key_file = cluster.admin_key_file().display().to_string();
        let args: Vec<String> = [
            "--ca-dir",
            &ca_dir,
            "--admin-key-file",
            &key_file,
            "--ae-interval-ms",
            "0",
            "--n",
            "3",
        ]
        .iter()
        .chain(&FAST)
        .chain(extra)
        .map(|a| a.to_string())
        .collect();
        Joiner {
            dir: cluster.dir.path().join("n4"),
            addr: addr.to_string(),
            args,
        }
    }

    /// Starts (or restarts) the node on its directory.
    fn start(&self) -> NodeProc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        NodeProc::start_as(&self.dir, "n4", &self.addr, &args)
    }
}

/// Writes `count` keys `PREFIX0..` through node 0 and waits until every node holds every
/// copy (clusters of up to three nodes with n=3); returns the keys.
async fn load(
    cluster: &ClusterProc,
    ca_pem: &ClientConfig,
    prefix: &str,
    count: usize,
) -> Vec<String> {
    let client = cluster.client(0).await;
    let keys: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    for key in &keys {
        client
            .put_with(BUCKET, key, value(key), None, &WriteOptions::default())
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }
    for addr in &cluster.addrs {
        eventually_within("every copy stored", Duration::from_secs(60), || async {
            status(addr, ca_pem)
                .await
                .is_some_and(|s| s.ae_keys == count as u64)
        })
        .await;
    }
    keys
}

/// Keys each member should hold under the ring `node` serves, for `keys`.
async fn expected_holdings(client: &Client, keys: &[String]) -> BTreeMap<String, u64> {
    let (ring, _, n) = client.ring().await.expect("ring");
    let mut out = BTreeMap::new();
    for key in keys {
        for m in ring
            .preference_list_for_key(BUCKET.as_bytes(), key.as_bytes(), n)
            .primaries
        {
            *out.entry(m.id.clone()).or_insert(0) += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_joins_under_load_and_another_leaves_without_losing_a_write() {
    let mut cluster = ClusterProc::start(SUBNET, 3, &FAST);
    let ca_pem = cluster.client_config();
    let ca_file = cluster.ca_dir().join("ca.pem");

    // Load 10 k keys (n=3: every node holds every key).
    let clients = [
        cluster.client(0).await,
        cluster.client(1).await,
        cluster.client(2).await,
    ];
    let mut set = tokio::task::JoinSet::new();
    for t in 0..32 {
        let client = clients[t % 3].clone();
        set.spawn(async move {
            for i in (0..KEYS).filter(|i| i % 32 == t) {
                let key = format!("k{i}");
                client
                    .put_with(BUCKET, &key, value(&key), None, &WriteOptions::default())
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.expect("loader");
    }
    for addr in &cluster.addrs {
        eventually_within("every copy stored", Duration::from_secs(60), || async {
            status(addr, &ca_pem)
                .await
                .is_some_and(|s| s.ae_keys == KEYS as u64)
        })
        .await;
    }
    let copies_before = 3 * KEYS as u64;

    // A fourth node, started on its own with the cluster's CA, joins through n1.
    let n4_addr = format!("127.0.{SUBNET}.4:7470");
    let n4 = Joiner::new(&cluster, &n4_addr, &[]).start();
    let staged = admin(&ca_file, &n4_addr, &["join", &cluster.addrs[0]]);
    assert_eq!(
        staged.next_version,
        Some(2),
        "the join is staged: {staged:?}"
    );
    // Any member shows the same plan once gossip brought the join there.
    let plan = admin(&ca_file, &cluster.addrs[2], &["plan"]);
    assert_eq!(
        plan.next_version,
        Some(2),
        "n3 sees the staged join: {plan:?}"
    );
    let planned = plan.copies_moved as f64 / plan.copies_total.max(1) as f64;
    println!(
        "plan: ~{} of ~{} key copies move ({:.1}%)",
        plan.copies_moved,
        plan.copies_total,
        planned * 100.0
    );
    assert!(
        planned <= 1.1 / 4.0,
        "the plan moves {planned} of the copies"
    );

    // A client keeps writing through n1 while the ring changes.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(keep_writing(
        cluster.client(0).await,
        "join",
        Arc::clone(&stop),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed = admin(&ca_file, &cluster.addrs[1], &["commit"]);
    assert!(committed.committed && committed.next_version == Some(2));

    let all = [cluster.addrs.clone(), vec![n4_addr.clone()]].concat();
    for addr in &all {
        eventually_within(
            "ring version 2 everywhere, no handoff left",
            Duration::from_secs(120),
            || async {
                status(addr, &ca_pem)
                    .await
                    .is_some_and(|s| s.ring_version == 2 && s.handoff_keys == 0)
            },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let (live, failed) = writer.await.expect("writer");
    assert!(!live.is_empty(), "the writer made progress during the join");
    println!(
        "{} writes acknowledged during the join, {failed} failed",
        live.len()
    );

    let mut sent = 0;
    for addr in &all {
        let s = status(addr, &ca_pem).await.expect("status");
        sent += s.handoff_keys_sent;
    }
    let moved = sent as f64 / copies_before as f64;
    println!(
        "join: {sent} key copies handed off of {copies_before} held = {:.1}% (bound {:.1}%)",
        moved * 100.0,
        110.0 / 4.0
    );
    assert!(moved <= 1.1 / 4.0, "handoff moved {moved} of the copies");
    assert!(moved >= 0.2, "n4 received its share by handoff ({moved})");

    // Every node holds exactly what the new ring gives it, and every write is readable.
    let keys: Vec<String> = (0..KEYS).map(|i| format!("k{i}")).chain(live).collect();
    let n4_client = n4.client().await;
    let expected = expected_holdings(&n4_client, &keys).await;
    assert_eq!(
        expected.len(),
        4,
        "all four nodes hold replicas: {expected:?}"
    );
    for (i, addr) in all.iter().enumerate() {
        let node = format!("n{}", i + 1);
        let want = expected[&node];
        eventually_within(
            "holdings match the ring",
            Duration::from_secs(60),
            || async {
                status(addr, &ca_pem)
                    .await
                    .is_some_and(|s| s.ae_keys == want)
            },
        )
        .await;
    }
    for key in &keys {
        let got = n4_client.get(BUCKET, key).await.expect("get");
        assert_eq!(got.values(), vec![value(key).as_slice()], "key {key}");
    }

    // A routing client that learned the 4-node ring, to see that it follows the leave.
    let routing = quiver_sdk::ClusterClient::connect(&[cluster.addrs[1].as_str()], ca_pem.clone())
        .await
        .expect("routing client");
    // n2 leaves (asked through n1): after the commit it hands off and exits by itself.
    let staged = admin(&ca_file, &cluster.addrs[0], &["leave", "n2"]);
    assert_eq!(staged.next_version, Some(3));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(keep_writing(n4.client().await, "leave", Arc::clone(&stop)));
    let committed = admin(&ca_file, &cluster.addrs[2], &["commit"]);
    assert!(committed.committed);
    let n2 = cluster.nodes[1].as_mut().expect("n2 runs");
    eventually_within(
        "n2 exits after handing off",
        Duration::from_secs(120),
        || {
            let exited = n2.exited();
            async move { exited.is_some() }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (live2, _) = writer.await.expect("writer");
    cluster.nodes[1] = None;

    let remaining = [
        cluster.addrs[0].clone(),
        cluster.addrs[2].clone(),
        n4_addr.clone(),
    ];
    let total = (keys.len() + live2.len()) as u64;
    eventually_within(
        "three nodes with n=3 hold every key",
        Duration::from_secs(60),
        || async {
            let mut ok = true;
            let mut line = String::new();
            for addr in &remaining {
                match status(addr, &ca_pem).await {
                    Some(s) => {
                        line += &format!(
                            " {addr}: {} keys, ring {}, {} to hand off;",
                            s.ae_keys, s.ring_version, s.handoff_keys
                        );
                        ok &= s.ae_keys == total
                            && s.ring_version == 3
                            && s.handoff_keys == 0
                            && s.members.iter().all(|m| m.node != "n2");
                    }
                    None => ok = false,
                }
            }
            if !ok {
                eprintln!("waiting for {total} keys everywhere:{line}");
            }
            ok
        },
    )
    .await;
    for key in keys.iter().chain(&live2) {
        let got = n4_client.get(BUCKET, key).await.expect("get");
        assert_eq!(got.values(), vec![value(key).as_slice()], "key {key}");
    }
    // The routing client still names n2 (its seed, even) for a quarter of the keys; the
    // first request that cannot reach it makes it fetch the ring again.
    let started = std::time::Instant::now();
    for key in keys.iter().take(200) {
        let got = routing
            .get(BUCKET, key)
            .await
            .expect("routed get after the leave");
        assert_eq!(got.values(), vec![value(key).as_slice()], "key {key}");
    }
    println!(
        "200 routed reads after the leave took {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(
        routing.ring_version().await,
        3,
        "the client follows the ring"
    );
}

/// Handoff survives a crash of either side: the new owner and an old owner are SIGKILLed
/// in the middle of the transfer and restarted; the transfer resumes from what is on disk,
/// and in the end every node holds exactly what the ring gives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handoff_resumes_after_either_side_crashes() {
    const SUBNET: u8 = 27;
    const KEYS: usize = 3_000;
    // Twenty keys per pass and old owner, so the transfer takes seconds and the crashes
    // land in its middle.
    let slow = ["--ae-max-keys", "20"];
    let mut cluster = ClusterProc::start(SUBNET, 3, &[&FAST[..], &slow[..]].concat());
    let ca_pem = cluster.client_config();
    let ca_file = cluster.ca_dir().join("ca.pem");
    let keys = load(&cluster, &ca_pem, "c", KEYS).await;

    let n4_addr = format!("127.0.{SUBNET}.4:7470");
    let joiner = Joiner::new(&cluster, &n4_addr, &slow);
    let mut n4 = Some(joiner.start());
    admin(&ca_file, &n4_addr, &["join", &cluster.addrs[1]]);
    let committed = admin(&ca_file, &cluster.addrs[0], &["commit"]);
    assert!(committed.committed);

    // Kill the new owner as soon as it holds some of its share.
    let share = 3 * KEYS as u64 / 4;
    eventually_within("n4 receives keys", Duration::from_secs(60), || async {
        status(&n4_addr, &ca_pem)
            .await
            .is_some_and(|s| s.ae_keys >= 50)
    })
    .await;
    let held = status(&n4_addr, &ca_pem).await.expect("n4").ae_keys;
    assert!(held < share / 2, "the transfer is still under way ({held})");
    if let Some(mut n) = n4.take() {
        n.kill9();
    }
    // Then an old owner, while the others keep going without n4.
    cluster.kill9(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n4 = joiner.start();
    cluster.restart(0);

    let all = [cluster.addrs.clone(), vec![n4_addr.clone()]].concat();
    let n4_client = n4.client().await;
    let expected = expected_holdings(&n4_client, &keys).await;
    assert_eq!(expected["n4"], {
        let (ring, _, n) = n4_client.ring().await.expect("ring");
        keys.iter()
            .filter(|k| {
                ring.preference_list_for_key(BUCKET.as_bytes(), k.as_bytes(), n)
                    .primaries
                    .iter()
                    .any(|m| m.id == "n4")
            })
            .count() as u64
    });
    for (i, addr) in all.iter().enumerate() {
        let want = expected[&format!("n{}", i + 1)];
        eventually_within(
            "holdings match the ring after the crashes",
            Duration::from_secs(120),
            || async {
                status(addr, &ca_pem)
                    .await
                    .is_some_and(|s| s.ae_keys == want && s.handoff_keys == 0)
            },
        )
        .await;
    }
    for key in &keys {
        let got = n4_client.get(BUCKET, key).await.expect("get");
        assert_eq!(got.values(), vec![value(key).as_slice()], "key {key}");
    }
}

/// Runs `quiver cluster ARGS` against `node` expecting failure; returns its stderr.
fn admin_fails(ca: &Path, node: &str, args: &[&str]) -> String {
    let out = quiver_cluster(ca, node, args);
    assert!(
        !out.status.success(),
        "quiver cluster {args:?} should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Bad membership requests get clear errors and change nothing; `cluster status` shows a
/// staged join as `joining` with no partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_requests_are_checked() {
    const SUBNET: u8 = 28;
    let cluster = ClusterProc::start(SUBNET, 2, &FAST);
    let ca_file = cluster.ca_dir().join("ca.pem");
    let ca_dir = cluster.ca_dir().display().to_string();
    let key_file = cluster.admin_key_file().display().to_string();
    let seed = cluster.addrs[0].clone();

    let nothing = admin(&ca_file, &seed, &["plan"]);
    assert_eq!(nothing.next_version, None, "nothing staged yet");
    let err = admin_fails(&ca_file, &seed, &["commit"]);
    assert!(err.contains("nothing staged"), "{err}");
    let err = admin_fails(&ca_file, &seed, &["leave", "n9"]);
    assert!(err.contains("no member named \"n9\""), "{err}");
    let err = admin_fails(&ca_file, &seed, &["join", "not-an-address"]);
    assert!(err.contains("not an IP:port"), "{err}");
    let err = admin_fails(&ca_file, &seed, &["join", &cluster.addrs[1]]);
    assert!(err.contains("already in a cluster"), "{err}");

    // A node started alone defaults to n=1; the seed says which flags make it fit.
    let n3_addr = format!("127.0.{SUBNET}.3:7470");
    let lone = NodeProc::start_as(
        &cluster.dir.path().join("n3"),
        "n3",
        &n3_addr,
        &[
            "--ca-dir",
            &ca_dir,
            "--admin-key-file",
            &key_file,
            "--ae-interval-ms",
            "0",
        ],
    );
    let err = admin_fails(&ca_file, &n3_addr, &["join", &seed]);
    assert!(err.contains("--n 2 --r 2 --w 2"), "{err}");
    // A node that holds data cannot join.
    let client = lone.client().await;
    client
        .put(BUCKET, "k", b"v".to_vec(), None)
        .await
        .expect("put on the lone node");
    let err = admin_fails(&ca_file, &n3_addr, &["join", &seed]);
    assert!(err.contains("holds 1 keys"), "{err}");
    drop(lone);

    let n4_addr = format!("127.0.{SUBNET}.4:7470");
    let n4 = NodeProc::start_as(
        &cluster.dir.path().join("n4"),
        "n4",
        &n4_addr,
        &[
            "--ca-dir",
            &ca_dir,
            "--admin-key-file",
            &key_file,
            "--ae-interval-ms",
            "0",
            "--n",
            "2",
        ],
    );
    let staged = admin(&ca_file, &n4_addr, &["join", &seed]);
    assert_eq!(staged.next_version, Some(2));
    // `quiver cluster status` shows the staged member as joining, owning nothing.
    let status = quiver_cluster(&ca_file, &seed, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("n4 ") && l.contains("joining") && l.contains(" 0 (0.0%)")),
        "{text}"
    );
    let ca_pem = cluster.client_config();
    let seen = status_of_member(&seed, &ca_pem, "n4").await;
    assert_eq!(seen, Some(("joining".to_string(), 0)), "{text}");
    // Leaving a joining node cancels the join: nothing is staged any more.
    let cancelled = admin(&ca_file, &seed, &["leave", "n4"]);
    assert_eq!(cancelled.next_version, None);
    drop(n4);
}

/// The state and owned partitions of `member` as the node at `addr` reports them.
async fn status_of_member(addr: &str, ca: &ClientConfig, member: &str) -> Option<(String, u32)> {
    let s = status(addr, ca).await?;
    s.members
        .iter()
        .find(|m| m.node == member)
        .map(|m| (m.state.clone(), m.partitions))
}

/// A node that was down when the ring changed learns it by gossip when it returns (the
/// commit's push could not reach it), and the handoffs that waited for it complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_the_commit_learns_the_ring_by_gossip() {
    const SUBNET: u8 = 29;
    const KEYS: usize = 200;
    let mut cluster = ClusterProc::start(SUBNET, 3, &FAST);
    let ca_pem = cluster.client_config();
    let ca_file = cluster.ca_dir().join("ca.pem");
    let keys = load(&cluster, &ca_pem, "g", KEYS).await;
    let n4_addr = format!("127.0.{SUBNET}.4:7470");
    let n4 = Joiner::new(&cluster, &n4_addr, &[]).start();
    admin(&ca_file, &n4_addr, &["join", &cluster.addrs[0]]);
    cluster.stop(2);
    assert!(admin(&ca_file, &cluster.addrs[0], &["commit"]).committed);
    // While n3 is away, nothing it is a new or remaining primary of can be dropped.
    eventually_within("n1 and n2 on ring 2", Duration::from_secs(30), || async {
        let mut all = true;
        for addr in &cluster.addrs[..2] {
            all &= status(addr, &ca_pem)
                .await
                .is_some_and(|s| s.ring_version == 2);
        }
        all
    })
    .await;
    cluster.restart(2);
    eventually_within(
        "n3 learns ring 2 by gossip",
        Duration::from_secs(30),
        || async {
            status(&cluster.addrs[2], &ca_pem)
                .await
                .is_some_and(|s| s.ring_version == 2)
        },
    )
    .await;
    // `quiver cluster wait` returns once every node reports the same ring and nothing left
    // to hand off.
    let waited = quiver_cluster(
        &ca_file,
        &cluster.addrs[0],
        &["wait", "--timeout-s", "60", "--output", "json"],
    );
    assert!(
        waited.status.success(),
        "cluster wait: {}",
        String::from_utf8_lossy(&waited.stderr)
    );
    assert!(String::from_utf8_lossy(&waited.stdout).contains("\"handoff\":\"done\""));
    let n4_client = n4.client().await;
    let expected = expected_holdings(&n4_client, &keys).await;
    let all = [cluster.addrs.clone(), vec![n4_addr.clone()]].concat();
    for (i, addr) in all.iter().enumerate() {
        let want = expected[&format!("n{}", i + 1)];
        eventually_within("holdings match ring 2", Duration::from_secs(60), || async {
            status(addr, &ca_pem)
                .await
                .is_some_and(|s| s.ae_keys == want && s.handoff_keys == 0)
        })
        .await;
    }
}
