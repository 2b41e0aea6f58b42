//! Tombstone reaping between replicas in memory: the first primary reaps a tombstone only
//! when every member answered, every replica held it for the grace and nobody holds a hint
//! or an orphan copy; a write that lands meanwhile survives, and a member on another ring
//! takes no part.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

mod support;

use quiver_core::causality::{Coordinator, Object, VersionVector, WriteOp, coordinate_write};
use quiver_core::merkle;
use quiver_core::ring::{ClaimParams, Member, Ring, RingId};
use quiver_core::storage::{StorageEngine, keys};
use quiver_node_core::WallClock;
use quiver_node_core::ae::{Placement, is_tombstone};
use quiver_node_core::broken::Broken;
use quiver_node_core::reap::{
    self, Answer, ReapAnswering, ReapPass, ReapRequest, ReapResponse, ReapStart, ReapStep,
};
use quiver_node_core::replica::Replica;
use quiver_storage::MemoryEngine;
use support::{Counter, boot, object};

const BUCKET: &str = "bkt";
const GRACE: u64 = 1_000;

#[derive(Debug, Default)]
struct Clock(AtomicU64);

impl WallClock for Clock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

struct Node {
    name: String,
    clock: Arc<Clock>,
    replica: Replica,
    ring: Ring,
}

/// `names` on one ring with replication factor `n`; every node's clock at 0.
struct Cluster {
    nodes: Vec<Node>,
    n: usize,
    /// Members whose answers never arrive.
    silent: Vec<String>,
}

fn ring_of(names: &[&str], n: u32) -> Ring {
    Ring::new(
        names.iter().map(|m| Member::new(*m)).collect(),
        ClaimParams {
            partitions: 16,
            n_val: n,
        },
    )
    .expect("ring")
}

impl Cluster {
    fn new(names: &[&str], n: usize) -> Cluster {
        let ring = ring_of(names, u32::try_from(n).expect("small n"));
        let placement = Placement {
            partitions: 16,
            default_n: u8::try_from(n).expect("small n"),
            buckets: BTreeMap::new(),
        };
        let nodes = names
            .iter()
            .map(|name| {
                let store: Arc<dyn StorageEngine> = Arc::new(MemoryEngine::new());
                let epochs = boot(&*store).expect("boot");
                let clock = Arc::new(Clock::default());
                let replica = Replica::new(
                    (*name).into(),
                    store,
                    epochs,
                    1 << 20,
                    Arc::clone(&clock) as Arc<dyn WallClock>,
                );
                replica.ae().set_placement(placement.clone());
                replica.ae().open(replica.store()).expect("open index");
                Node {
                    name: (*name).into(),
                    clock,
                    replica,
                    ring: ring.clone(),
                }
            })
            .collect();
        Cluster {
            nodes,
            n,
            silent: Vec::new(),
        }
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).expect("a node")
    }

    fn set_clocks(&self, ms: u64) {
        for n in &self.nodes {
            n.clock.0.store(ms, Ordering::Relaxed);
        }
    }

    fn others(&self, me: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.name != me)
            .map(|n| n.name.clone())
            .collect()
    }

    fn primaries(&self, node: &str, key: &[u8]) -> Vec<String> {
        self.node(node)
            .ring
            .preference_list_for_key(BUCKET.as_bytes(), key, self.n)
            .primaries
            .iter()
            .map(|m| m.id.clone())
            .collect()
    }

    /// A key whose first primary is `first`.
    fn key_led_by(&self, first: &str) -> Vec<u8> {
        (0..1000)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| self.primaries(first, k).first().map(String::as_str) == Some(first))
            .expect("some key")
    }

    fn merge(&self, node: &str, key: &[u8], object: &Object, hint_for: Option<&str>) {
        self.node(node)
            .replica
            .merge_remote(BUCKET, key, object, hint_for)
            .expect("merge");
    }

    fn holds(&self, node: &str, key: &[u8]) -> Object {
        let dkey = keys::data_key(BUCKET.as_bytes(), key).expect("data key");
        let objects = self.node(node).replica.objects(&[dkey]).expect("read");
        objects
            .into_iter()
            .next()
            .map(|(_, o)| o)
            .unwrap_or_default()
    }

    /// `member`'s answer to `request`, as its driver gives it (syncing when told to).
    fn answer(&self, member: &str, request: ReapRequest) -> Result<ReapResponse, String> {
        if self.silent.iter().any(|s| s == member) {
            return Err("no answer in time".into());
        }
        let node = self.node(member);
        let members = self.others(member);
        let is_primary =
            |_: &str, key: &[u8]| self.primaries(member, key).iter().any(|p| p == member);
        let at = ReapAnswering {
            ring: node.ring.id(),
            members: &members,
            is_primary: &is_primary,
            broken: Broken::NONE,
        };
        let now = node.clock.now_ms();
        Ok(match reap::answer(&node.replica, &at, request, now) {
            Answer::Reply(r) => r,
            Answer::SyncFirst(pending) => {
                node.replica.store().sync().map_err(|e| e.to_string())?;
                pending.answer(&node.replica, &at, now)
            }
        })
    }

    fn start(&self, reaper: &str, is_up: &dyn Fn(&str) -> bool) -> Option<(ReapPass, ReapStep)> {
        let node = self.node(reaper);
        let members = self.others(reaper);
        let primaries = |_: &str, key: &[u8]| self.primaries(reaper, key);
        let start = ReapStart {
            me: reaper,
            ring: node.ring.id(),
            members: &members,
            is_up,
            primaries: &primaries,
            grace_ms: GRACE,
            now_ms: node.clock.now_ms(),
            broken: Broken::NONE,
        };
        ReapPass::start(&node.replica, &start)
    }

    /// Runs a pass at `reaper` to its end, each request answered at once; `between` runs
    /// after the checks are answered, before the first `Reap` is delivered.
    fn reap(&self, reaper: &str, between: &mut dyn FnMut(&Cluster)) -> Vec<(Vec<u8>, Object)> {
        let Some((mut pass, mut step)) = self.start(reaper, &|_| true) else {
            return Vec::new();
        };
        let node = self.node(reaper);
        let mut checked = false;
        for _ in 0..100 {
            step = match step {
                ReapStep::Done(report) => return report.reaped,
                ReapStep::Sync => {
                    node.replica.store().sync().expect("sync");
                    pass.synced(&node.replica)
                }
                ReapStep::Send(requests) => {
                    if requests
                        .iter()
                        .any(|(_, r)| matches!(r, ReapRequest::Reap { .. }))
                        && !checked
                    {
                        checked = true;
                        between(self);
                    }
                    let mut next = ReapStep::Wait;
                    for (member, request) in requests {
                        let answer = self.answer(&member, request);
                        next = pass.on_response(&node.replica, &member, answer, node.ring.id());
                        if next != ReapStep::Wait {
                            break;
                        }
                    }
                    next
                }
                ReapStep::Wait => panic!("every request was answered"),
            };
        }
        panic!("the pass ends");
    }
}

fn tombstone() -> Object {
    let me = Coordinator {
        node: "writer".into(),
        incarnation: 1,
    };
    coordinate_write(
        None,
        &me,
        &mut Counter(10),
        &VersionVector::new(),
        WriteOp::Delete,
        1,
    )
    .0
    .object
}

/// Three nodes, n = 3, a tombstone on every one of them stored at 0, clocks at `now`.
fn three_with_tombstone(now: u64) -> (Cluster, Vec<u8>) {
    let c = Cluster::new(&["a", "b", "c"], 3);
    let key = c.key_led_by("a");
    for n in ["a", "b", "c"] {
        c.merge(n, &key, &tombstone(), None);
    }
    c.set_clocks(now);
    (c, key)
}

#[test]
fn every_replica_reaps_a_tombstone_held_for_the_grace() {
    let (c, key) = three_with_tombstone(GRACE + 1);
    let reaped = c.reap("a", &mut |_| {});
    let dkey = keys::data_key(BUCKET.as_bytes(), &key).expect("data key");
    assert_eq!(reaped, vec![(dkey, tombstone())]);
    for n in ["a", "b", "c"] {
        assert_eq!(c.holds(n, &key), Object::default(), "{n} reaped");
        assert_eq!(c.node(n).replica.ae().tombstones(), 0);
    }
    // Only the first primary reaps: another node's pass finds nothing of its own.
    let (c, _) = three_with_tombstone(GRACE + 1);
    assert!(c.reap("b", &mut |_| {}).is_empty());
}

#[test]
fn a_member_down_reaps_nothing() {
    let (c, key) = three_with_tombstone(GRACE + 1);
    assert!(c.start("a", &|m| m != "c").is_none());
    assert!(c.start("a", &|_| true).is_some());
    for n in ["a", "b", "c"] {
        assert_eq!(c.holds(n, &key), tombstone());
    }
}

#[test]
fn an_unanswered_check_reaps_nothing() {
    let (mut c, key) = three_with_tombstone(GRACE + 1);
    c.silent.push("c".into());
    assert!(c.reap("a", &mut |_| {}).is_empty());
    for n in ["a", "b", "c"] {
        assert_eq!(c.holds(n, &key), tombstone(), "{n} keeps it");
    }
    // A refusal counts as no answer too, and the pass ignores answers it did not ask for.
    let (c, _) = three_with_tombstone(GRACE + 1);
    let (mut pass, step) = c.start("a", &|_| true).expect("a pass");
    assert_eq!(step, ReapStep::Sync);
    let a = &c.node("a").replica;
    assert!(matches!(pass.synced(a), ReapStep::Send(r) if r.len() == 2));
    let ring = c.node("a").ring.id();
    assert_eq!(
        pass.on_response(a, "x", Ok(ReapResponse::Reaped(0)), ring),
        ReapStep::Wait
    );
    let refused = Ok(ReapResponse::Refused("disk".into()));
    assert_eq!(
        pass.on_response(a, "b", refused, ring),
        ReapStep::Done(Default::default())
    );
    assert!(pass.is_over());
}

#[test]
fn a_hold_time_short_of_the_grace_blocks() {
    // The reaper itself: not a candidate yet.
    let (c, _) = three_with_tombstone(GRACE - 1);
    assert!(c.start("a", &|_| true).is_none());
    // Another replica stored the same tombstone later, by its own clock.
    let c = Cluster::new(&["a", "b", "c"], 3);
    let key = c.key_led_by("a");
    c.merge("a", &key, &tombstone(), None);
    c.merge("b", &key, &tombstone(), None);
    c.node("c").clock.0.store(500, Ordering::Relaxed);
    c.merge("c", &key, &tombstone(), None);
    c.set_clocks(GRACE + 1);
    assert!(c.reap("a", &mut |_| {}).is_empty());
    assert_eq!(c.holds("c", &key), tombstone());
    assert_eq!(c.holds("a", &key), tombstone());
    c.set_clocks(GRACE + 500);
    assert_eq!(
        c.reap("a", &mut |_| {}).len(),
        1,
        "reaped once c held it long enough"
    );
    // A replica that holds another state (it missed the delete) blocks as well.
    let c = Cluster::new(&["a", "b", "c"], 3);
    let key = c.key_led_by("a");
    c.merge("a", &key, &tombstone(), None);
    c.merge("b", &key, &tombstone(), None);
    c.merge("c", &key, &object("old"), None);
    c.set_clocks(GRACE + 1);
    assert!(c.reap("a", &mut |_| {}).is_empty());
}

#[test]
fn a_hint_anywhere_blocks() {
    // Four nodes, n = 2: the two nodes outside the key's preference list are asked too.
    let c = Cluster::new(&["a", "b", "c", "d"], 2);
    let key = c.key_led_by("a");
    let replicas = c.primaries("a", &key);
    let outsiders: Vec<&str> = ["b", "c", "d"]
        .into_iter()
        .filter(|n| !replicas.iter().any(|r| r == n))
        .collect();
    let (second, outsider) = (replicas[1].as_str(), outsiders[0]);
    let tomb = tombstone();
    let digest = merkle::object_digest(&tomb);
    let dkey = keys::data_key(BUCKET.as_bytes(), &key).expect("data key");
    // The second primary holds the tombstone and a hint for the key (for an outsider).
    c.merge("a", &key, &tomb, None);
    c.merge(second, &key, &tomb, Some(outsider));
    c.set_clocks(GRACE + 1);
    assert!(
        c.reap("a", &mut |_| {}).is_empty(),
        "a replica's hint blocks"
    );
    c.node(second)
        .replica
        .hint_delivered(outsider, BUCKET, &key, &tomb, true)
        .expect("delivered");
    assert!(!c.node(second).replica.has_hint(outsider, BUCKET, &key));

    // An outsider (a fallback) holds a copy with a hint for the second primary.
    c.set_clocks(0);
    c.merge(outsider, &key, &tomb, Some(second));
    c.set_clocks(GRACE + 1);
    assert!(
        c.reap("a", &mut |_| {}).is_empty(),
        "a fallback's hint blocks"
    );
    // Delivered, the hint goes but the copy stays until handoff: an orphan copy (the
    // outsider replicates nothing of the key) blocks just like the hint did.
    let at_outsider = &c.node(outsider).replica;
    at_outsider
        .hint_delivered(second, BUCKET, &key, &tomb, true)
        .expect("delivered");
    assert!(c.reap("a", &mut |_| {}).is_empty(), "an orphan copy blocks");
    at_outsider
        .drop_copy(&dkey, &digest, &[], false)
        .expect("handed off");
    assert_eq!(c.reap("a", &mut |_| {}).len(), 1);
    for r in &replicas {
        assert_eq!(c.holds(r, &key), Object::default());
    }
}

#[test]
fn a_write_between_check_and_reap_survives() {
    let (c, key) = three_with_tombstone(GRACE + 1);
    let reaped = c.reap("a", &mut |c| {
        c.merge("b", &key, &object("new"), None);
        c.merge("a", &key, &object("new"), None);
    });
    assert!(reaped.is_empty(), "the reaper's state changed too");
    for n in ["a", "b"] {
        let held = c.holds(n, &key);
        assert!(
            !is_tombstone(&held) && held != Object::default(),
            "{n} keeps the write"
        );
    }
    assert_eq!(
        c.holds("c", &key),
        Object::default(),
        "c still held the tombstone"
    );
}

#[test]
fn another_ring_refuses() {
    let (mut c, key) = three_with_tombstone(GRACE + 1);
    // c holds another ring (say, one it has not replaced yet): it answers nothing.
    c.nodes[2].ring = ring_of(&["a", "b", "c", "d"], 3);
    assert!(c.reap("a", &mut |_| {}).is_empty());
    for n in ["a", "b", "c"] {
        assert_eq!(c.holds(n, &key), tombstone());
    }
    let other = RingId {
        version: 99,
        hash: [0; 16],
    };
    let dkey = keys::data_key(BUCKET.as_bytes(), &key).expect("data key");
    let digest = merkle::object_digest(&tombstone());
    let reap = ReapRequest::Reap {
        ring: other,
        keys: vec![(dkey, digest)],
    };
    assert_eq!(c.answer("b", reap), Ok(ReapResponse::OtherRing));
    assert_eq!(c.holds("b", &key), tombstone());

    // The reaper's own ring changed while the checks were out: nothing is reaped.
    let (c, key) = three_with_tombstone(GRACE + 1);
    let a = &c.node("a").replica;
    let (mut pass, _) = c.start("a", &|_| true).expect("a pass");
    let ReapStep::Send(checks) = pass.synced(a) else {
        panic!("checks")
    };
    let mut step = ReapStep::Wait;
    for (member, request) in checks {
        step = pass.on_response(a, &member, c.answer(&member, request), other);
    }
    assert_eq!(step, ReapStep::Done(Default::default()));
    assert_eq!(c.holds("a", &key), tombstone());
}
