//! The simulated disk (`quiver_sim::disk::SimDisk`): the storage-engine conformance suite
//! every engine passes, and its crash semantics as property tests against a model.
//!
//! The model is deliberately independent of the implementation: a base map (what the mount
//! started with), the batches applied since, and how many of them are durable. Durable data
//! is always a prefix of the applied batches (sync and writeback both make the oldest ones
//! durable), so every crash has a single right answer, except a power loss, which may keep
//! any prefix at least as long as the durable one. Each batch writes a marker key of its own
//! that no other operation touches, so the markers left after a power loss say exactly which
//! prefix survived, and the whole state must then equal that prefix: part of a batch, or a
//! batch without its predecessors, can't pass.

use std::sync::Arc;

use proptest::prelude::*;
use quiver_core::storage::{BatchOp, StorageEngine, StorageError, WriteBatch};
use quiver_sim::disk::{Map, SimDisk, SimDiskStats};
use quiver_sim::rng::Rng;
use quiver_storage::conformance;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Data keys: few, so that batches overwrite and delete each other's keys.
const DATA_KEYS: u8 = 6;

fn data_key(i: u8) -> Vec<u8> {
    vec![b'k', i % DATA_KEYS]
}

fn marker_key(n: u64) -> Vec<u8> {
    let mut k = b"m".to_vec();
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// An operation on a data key, as generated.
#[derive(Debug, Clone)]
enum Op {
    Put(u8, u8),
    Delete(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<u8>(), any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        1 => any::<u8>().prop_map(Op::Delete),
    ]
}

/// A batch of `ops` plus the put of marker `n` (first, so that a torn batch that kept only
/// its tail would be visible too).
fn batch(n: u64, ops: &[Op]) -> WriteBatch {
    let mut b = WriteBatch::new();
    b.put(marker_key(n), n.to_le_bytes());
    for op in ops {
        match *op {
            Op::Put(k, v) => b.put(data_key(k), [v]),
            Op::Delete(k) => b.delete(data_key(k)),
        };
    }
    b
}

/// The model's own fold, independent of the disk's code.
fn fold(base: &Map, batches: &[WriteBatch]) -> Map {
    let mut map = base.clone();
    for b in batches {
        for op in &b.ops {
            match op {
                BatchOp::Put { key, value } => {
                    map.insert(key.clone(), value.clone());
                }
                BatchOp::Delete { key } => {
                    map.remove(key);
                }
            }
        }
    }
    map
}

/// Reads `engine` through the `StorageEngine` trait only (what a node sees) and checks it
/// holds exactly `expected`: one full scan, a windowed scan, and a get of every data key.
fn assert_reads(engine: &dyn StorageEngine, expected: &Map) {
    let all = engine.scan(b"", None, usize::MAX).expect("scan");
    let want: Vec<(Vec<u8>, Vec<u8>)> = expected
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(all, want, "full scan");
    let data = engine
        .scan(&data_key(0), Some(b"l"), usize::MAX)
        .expect("scan");
    let want_data: Vec<(Vec<u8>, Vec<u8>)> =
        want.iter().filter(|(k, _)| k[0] == b'k').cloned().collect();
    assert_eq!(data, want_data, "scan of the data keys");
    for i in 0..DATA_KEYS {
        let k = data_key(i);
        assert_eq!(
            engine.get(&k).expect("get"),
            expected.get(&k).cloned(),
            "get"
        );
    }
}

fn is_closed<T: std::fmt::Debug>(r: Result<T, StorageError>) -> bool {
    matches!(r, Err(StorageError::Closed { .. }))
}

/// A handle of an ended mount, and the engine the dead node held, refuse every call.
fn assert_stale(old: &SimDisk, node: &Arc<dyn StorageEngine>) {
    assert!(!old.is_live());
    let mut b = WriteBatch::new();
    b.put(&b"k\x00"[..], &b"late"[..]);
    assert!(is_closed(node.get(b"k\x00")), "stale get");
    assert!(is_closed(node.apply(&b)), "stale apply");
    assert!(
        is_closed(node.apply(&WriteBatch::new())),
        "stale empty apply"
    );
    assert!(is_closed(node.sync()), "stale sync");
    assert!(is_closed(node.scan(b"", None, usize::MAX)), "stale scan");
    assert!(
        is_closed(node.scan(b"b", Some(b"a"), 0)),
        "stale empty scan"
    );
    assert!(is_closed(old.stats()), "stale stats");
    assert!(is_closed(old.writeback_prefix(1)), "stale writeback");
    assert!(is_closed(old.fail_next_sync()), "stale fault knob");
    assert!(is_closed(old.visible_snapshot()), "stale snapshot");
    assert!(is_closed(old.kill()), "stale kill");
    assert!(is_closed(old.power_loss_keeping(0)), "stale power loss");
    assert!(is_closed(old.wipe()), "stale wipe");
}

// ---------------------------------------------------------------------------------------
// Conformance
// ---------------------------------------------------------------------------------------

#[test]
fn passes_the_conformance_suite() {
    conformance::run_all(&mut || SimDisk::new().engine());
}

#[test]
fn a_remounted_disk_passes_the_conformance_suite() {
    // The handles a crash returns are full engines too, not only a new disk's.
    conformance::run_all(&mut || SimDisk::new().kill().expect("live").engine());
    let mut rng = Rng::new(1);
    conformance::run_all(&mut || SimDisk::new().power_loss(&mut rng).expect("live").engine());
    conformance::run_all(&mut || {
        let disk = SimDisk::new();
        let mut b = WriteBatch::new();
        b.put(&b"before the wipe"[..], &b"x"[..]);
        disk.apply(&b).expect("apply");
        disk.sync().expect("sync");
        disk.wipe().expect("live").engine()
    });
}

// ---------------------------------------------------------------------------------------
// Crash semantics, one property at a time
// ---------------------------------------------------------------------------------------

/// Applies `batches` (marker `i` for the i-th), syncing after those whose flag is set and
/// writing back `wb` batches after each.
fn apply_all(disk: &SimDisk, batches: &[WriteBatch], syncs: &[bool], wb: &[usize]) {
    for (i, b) in batches.iter().enumerate() {
        disk.apply(b).expect("apply");
        if syncs.get(i).copied().unwrap_or(false) {
            disk.sync().expect("sync");
        }
        disk.writeback_prefix(wb.get(i).copied().unwrap_or(0))
            .expect("writeback");
    }
}

fn batches_of(ops: &[Vec<Op>]) -> Vec<WriteBatch> {
    ops.iter()
        .enumerate()
        .map(|(i, ops)| batch(i as u64, ops))
        .collect()
}

prop_compose! {
    fn history()(
        ops in prop::collection::vec(prop::collection::vec(op(), 0..5), 0..12),
        syncs in prop::collection::vec(prop::bool::weighted(0.2), 12),
        wb in prop::collection::vec(prop_oneof![3 => Just(0usize), 1 => 0usize..3], 12),
    ) -> (Vec<WriteBatch>, Vec<bool>, Vec<usize>) {
        (batches_of(&ops), syncs, wb)
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Reads see every applied batch at once; after a kill, every applied batch is still
    /// there, synced or not.
    #[test]
    fn kill_keeps_every_applied_batch((batches, syncs, wb) in history()) {
        let disk = SimDisk::new();
        let node = disk.engine();
        apply_all(&disk, &batches, &syncs, &wb);
        let all = fold(&Map::new(), &batches);
        assert_reads(node.as_ref(), &all);
        let restarted = disk.kill().expect("live");
        assert_stale(&disk, &node);
        assert_reads(&restarted, &all);
        prop_assert_eq!(restarted.durable_snapshot().expect("live"), all);
        prop_assert_eq!(restarted.stats().expect("live").unsynced_batches, 0);
    }

    /// After a power loss the state is the durable part plus exactly some prefix of the
    /// unsynced batches, never part of a batch; and the counters say how many were lost.
    #[test]
    fn power_loss_keeps_the_durable_part_plus_a_prefix(
        (batches, syncs, wb) in history(),
        seed in any::<u64>(),
    ) {
        let disk = SimDisk::new();
        let node = disk.engine();
        apply_all(&disk, &batches, &syncs, &wb);
        let unsynced = disk.stats().expect("live").unsynced_batches;
        let durable = batches.len() - unsynced;
        prop_assert_eq!(
            disk.durable_snapshot().expect("live"),
            fold(&Map::new(), &batches[..durable])
        );
        let restarted = disk.power_loss(&mut Rng::new(seed)).expect("live");
        assert_stale(&disk, &node);
        let after = restarted.visible_snapshot().expect("live");
        // Markers tell which batches survived: they must be a prefix, at least the durable one.
        let kept = batches
            .iter()
            .enumerate()
            .take_while(|(i, _)| after.contains_key(&marker_key(*i as u64)))
            .count();
        for i in kept..batches.len() {
            prop_assert!(!after.contains_key(&marker_key(i as u64)), "batch {} kept after a lost one", i);
        }
        prop_assert!(kept >= durable, "lost a durable batch: kept {} of {} durable", kept, durable);
        let expected = fold(&Map::new(), &batches[..kept]);
        prop_assert_eq!(&after, &expected);
        assert_reads(&restarted, &expected);
        let stats = restarted.stats().expect("live");
        prop_assert_eq!(stats.lost_batches, (batches.len() - kept) as u64);
        prop_assert_eq!(stats.unsynced_batches, 0);
        // And the new mount starts durable: a second power loss changes nothing.
        let again = restarted.power_loss(&mut Rng::new(seed ^ 1)).expect("live");
        prop_assert_eq!(again.visible_snapshot().expect("live"), expected);
    }

    /// Everything applied before a successful sync survives a power loss, whatever was
    /// applied after it.
    #[test]
    fn sync_then_power_loss_keeps_every_synced_batch(
        (batches, syncs, wb) in history(),
        later in prop::collection::vec(prop::collection::vec(op(), 0..5), 0..4),
        seed in any::<u64>(),
    ) {
        let disk = SimDisk::new();
        apply_all(&disk, &batches, &syncs, &wb);
        disk.sync().expect("sync");
        let synced = fold(&Map::new(), &batches);
        prop_assert_eq!(disk.durable_snapshot().expect("live"), synced.clone());
        prop_assert_eq!(disk.stats().expect("live").unsynced_batches, 0);
        // Batches after the sync may or may not survive; the synced ones must.
        for (j, ops) in later.iter().enumerate() {
            disk.apply(&batch((batches.len() + j) as u64, ops)).expect("apply");
        }
        let restarted = disk.power_loss(&mut Rng::new(seed)).expect("live");
        let after = restarted.visible_snapshot().expect("live");
        if later.is_empty() {
            prop_assert_eq!(after, synced);
        } else {
            for i in 0..batches.len() {
                prop_assert!(after.contains_key(&marker_key(i as u64)), "synced batch {} lost", i);
            }
        }
    }

    /// A wipe leaves nothing, durable or not, and the new disk works.
    #[test]
    fn wipe_leaves_nothing((batches, syncs, wb) in history()) {
        let disk = SimDisk::new();
        let node = disk.engine();
        apply_all(&disk, &batches, &syncs, &wb);
        disk.fail_syncs(true).expect("live");
        let fresh = disk.wipe().expect("live");
        assert_stale(&disk, &node);
        assert_reads(&fresh, &Map::new());
        prop_assert_eq!(fresh.durable_snapshot().expect("live"), Map::new());
        let stats = fresh.stats().expect("live");
        prop_assert_eq!(stats, SimDiskStats { generation: 1, ..SimDiskStats::default() });
        // A new disk: the dying-disk knob went with the old one.
        let mut b = WriteBatch::new();
        b.put(&b"new"[..], &b"disk"[..]);
        fresh.apply(&b).expect("apply");
        fresh.sync().expect("a new disk syncs");
        let again = fresh.power_loss_keeping(0).expect("live");
        prop_assert_eq!(again.get(b"new").expect("get"), Some(b"disk".to_vec()));
    }
}

// ---------------------------------------------------------------------------------------
// The whole life of a disk against the model
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    Apply(Vec<Op>),
    ApplyEmpty,
    Sync,
    Writeback(usize),
    WritebackRandom,
    Kill,
    PowerLoss,
    Wipe,
    FailNextSync,
    FailSyncs(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => prop::collection::vec(op(), 0..5).prop_map(Step::Apply),
        1 => Just(Step::ApplyEmpty),
        3 => Just(Step::Sync),
        2 => (0usize..4).prop_map(Step::Writeback),
        2 => Just(Step::WritebackRandom),
        1 => Just(Step::Kill),
        2 => Just(Step::PowerLoss),
        1 => Just(Step::Wipe),
        1 => Just(Step::FailNextSync),
        1 => any::<bool>().prop_map(Step::FailSyncs),
    ]
}

/// What the disk must hold, kept without looking at the disk's code.
#[derive(Debug, Default)]
struct Model {
    /// State at this mount.
    base: Map,
    /// Batches applied in this mount, with their marker numbers.
    batches: Vec<(u64, WriteBatch)>,
    /// How many of `batches` are durable.
    durable: usize,
    poisoned: bool,
    fail_next: u64,
    fail_all: bool,
    next_marker: u64,
    stats: SimDiskStats,
}

impl Model {
    fn batches(&self) -> Vec<WriteBatch> {
        self.batches.iter().map(|(_, b)| b.clone()).collect()
    }

    fn visible(&self) -> Map {
        fold(&self.base, &self.batches())
    }

    fn durable(&self) -> Map {
        fold(&self.base, &self.batches()[..self.durable])
    }

    /// A crash kept the first `kept` batches of this mount.
    fn remount(&mut self, kept: usize) {
        self.base = fold(&self.base, &self.batches()[..kept]);
        self.stats.lost_batches += (self.batches.len() - kept) as u64;
        self.batches.clear();
        self.durable = 0;
        self.poisoned = false;
        self.stats.generation += 1;
    }
}

/// Runs `steps` on a new disk, checking every step against the model. Returns the final
/// disk's visible map and counters.
fn run_against_model(steps: &[Step], seed: u64) -> (Map, SimDiskStats) {
    let mut rng = Rng::new(seed);
    let mut disk = SimDisk::new();
    let mut node = disk.engine();
    let mut m = Model::default();
    for step in steps {
        match step {
            Step::Apply(ops) => {
                let b = batch(m.next_marker, ops);
                let r = node.apply(&b);
                if m.poisoned {
                    assert!(matches!(r, Err(StorageError::Poisoned { .. })), "{r:?}");
                } else {
                    r.expect("apply");
                    m.batches.push((m.next_marker, b));
                    m.next_marker += 1;
                    m.stats.applied_batches += 1;
                }
            }
            Step::ApplyEmpty => {
                let r = node.apply(&WriteBatch::new());
                if m.poisoned {
                    assert!(matches!(r, Err(StorageError::Poisoned { .. })), "{r:?}");
                } else {
                    r.expect("apply");
                    m.stats.applied_batches += 1;
                }
            }
            Step::Sync => {
                let r = node.sync();
                if m.poisoned {
                    assert!(matches!(r, Err(StorageError::Poisoned { .. })), "{r:?}");
                } else if m.fail_all || m.fail_next > 0 {
                    assert!(matches!(r, Err(StorageError::Io { .. })), "{r:?}");
                    m.fail_next = m.fail_next.saturating_sub(1);
                    m.poisoned = true;
                    m.stats.failed_syncs += 1;
                } else {
                    r.expect("sync");
                    m.durable = m.batches.len();
                    m.stats.syncs += 1;
                }
            }
            Step::Writeback(n) => {
                let written = disk.writeback_prefix(*n).expect("live");
                let expect = (*n).min(m.batches.len() - m.durable);
                assert_eq!(written, expect);
                m.durable += written;
                m.stats.written_back_batches += written as u64;
            }
            Step::WritebackRandom => {
                let written = disk.writeback(&mut rng).expect("live");
                assert!(m.durable + written <= m.batches.len());
                m.durable += written;
                m.stats.written_back_batches += written as u64;
            }
            Step::Kill => {
                let restarted = disk.kill().expect("live");
                assert_stale(&disk, &node);
                m.remount(m.batches.len());
                disk = restarted;
                node = disk.engine();
            }
            Step::PowerLoss => {
                let restarted = disk.power_loss(&mut rng).expect("live");
                assert_stale(&disk, &node);
                let after = restarted.visible_snapshot().expect("live");
                let kept = m
                    .batches
                    .iter()
                    .take_while(|(n, _)| after.contains_key(&marker_key(*n)))
                    .count();
                for (n, _) in &m.batches[kept..] {
                    assert!(
                        !after.contains_key(&marker_key(*n)),
                        "a batch after a lost one survived"
                    );
                }
                assert!(kept >= m.durable, "a durable batch was lost");
                m.remount(kept);
                disk = restarted;
                node = disk.engine();
            }
            Step::Wipe => {
                let fresh = disk.wipe().expect("live");
                assert_stale(&disk, &node);
                m = Model {
                    next_marker: m.next_marker,
                    stats: SimDiskStats {
                        generation: m.stats.generation + 1,
                        ..SimDiskStats::default()
                    },
                    ..Model::default()
                };
                disk = fresh;
                node = disk.engine();
            }
            Step::FailNextSync => {
                disk.fail_next_sync().expect("live");
                m.fail_next += 1;
            }
            Step::FailSyncs(on) => {
                disk.fail_syncs(*on).expect("live");
                m.fail_all = *on;
            }
        }
        // After every step: reads, the durable part, the counters and the poison agree.
        let visible = m.visible();
        assert_reads(node.as_ref(), &visible);
        assert_eq!(disk.visible_snapshot().expect("live"), visible);
        assert_eq!(disk.durable_snapshot().expect("live"), m.durable());
        assert_eq!(
            disk.unsynced_batches().expect("live"),
            m.batches()[m.durable..].to_vec()
        );
        let expected_stats = SimDiskStats {
            unsynced_batches: m.batches.len() - m.durable,
            ..m.stats
        };
        assert_eq!(disk.stats().expect("live"), expected_stats);
        assert_eq!(disk.poisoned().expect("live").is_some(), m.poisoned);
        assert!(disk.is_live());
        assert_eq!(disk.generation(), m.stats.generation);
    }
    (
        disk.visible_snapshot().expect("live"),
        disk.stats().expect("live"),
    )
}

proptest! {
    #![proptest_config(config(512))]

    /// Any sequence of writes, syncs, writebacks, injected sync failures and crashes keeps
    /// the disk equal to the model at every step.
    #[test]
    fn a_disk_follows_the_model(
        steps in prop::collection::vec(step(), 0..60),
        seed in any::<u64>(),
    ) {
        run_against_model(&steps, seed);
    }

    /// Same seed, same calls: same disk.
    #[test]
    fn same_seed_same_disk(
        steps in prop::collection::vec(step(), 0..40),
        seed in any::<u64>(),
    ) {
        prop_assert_eq!(run_against_model(&steps, seed), run_against_model(&steps, seed));
    }
}

// ---------------------------------------------------------------------------------------
// Examples
// ---------------------------------------------------------------------------------------

fn put(disk: &dyn StorageEngine, key: &[u8], value: &[u8]) {
    let mut b = WriteBatch::new();
    b.put(key, value);
    disk.apply(&b).expect("apply");
}

#[test]
fn power_loss_explores_every_prefix() {
    // Over seeds, a power loss with three unsynced batches keeps each of 0..=3 of them, so
    // the simulator explores every outcome rather than always the same one.
    let mut seen = [false; 4];
    for seed in 0..200 {
        let disk = SimDisk::new();
        for i in 0..3u8 {
            put(&disk, &[b'k', i], b"v");
        }
        let after = disk.power_loss(&mut Rng::new(seed)).expect("live");
        seen[after.scan(b"", None, usize::MAX).expect("scan").len()] = true;
    }
    assert_eq!(seen, [true; 4]);
}

#[test]
fn writeback_makes_the_oldest_batches_durable() {
    let disk = SimDisk::new();
    for i in 0..4u8 {
        put(&disk, &[b'k', i], b"v");
    }
    assert_eq!(disk.writeback_prefix(2).expect("live"), 2);
    assert_eq!(
        disk.writeback_prefix(5).expect("live"),
        2,
        "only two were left"
    );
    assert_eq!(disk.writeback_prefix(1).expect("live"), 0);
    put(&disk, b"k\x09", b"late");
    let after = disk.power_loss_keeping(0).expect("live");
    let keys: Vec<Vec<u8>> = after
        .scan(b"", None, usize::MAX)
        .expect("scan")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, (0..4u8).map(|i| vec![b'k', i]).collect::<Vec<_>>());
    let stats = after.stats().expect("live");
    assert_eq!(
        (stats.written_back_batches, stats.lost_batches, stats.syncs),
        (4, 1, 0)
    );
}

#[test]
fn a_failed_sync_poisons_the_mount_until_a_restart() {
    let disk = SimDisk::new();
    put(&disk, b"synced", b"1");
    disk.sync().expect("sync");
    put(&disk, b"unsynced", b"2");
    disk.fail_next_sync().expect("live");
    assert!(matches!(
        disk.sync(),
        Err(StorageError::Io { op: "sync", .. })
    ));
    // Later writes and syncs are refused, naming the first failure; reads still work.
    let mut b = WriteBatch::new();
    b.put(&b"after"[..], &b"3"[..]);
    match disk.apply(&b) {
        Err(StorageError::Poisoned { cause, .. }) => assert!(cause.contains("sync failed")),
        other => panic!("apply on a poisoned mount: {other:?}"),
    }
    assert!(matches!(disk.sync(), Err(StorageError::Poisoned { .. })));
    assert_eq!(disk.get(b"unsynced").expect("get"), Some(b"2".to_vec()));
    assert_eq!(disk.get(b"after").expect("get"), None);
    // The failed sync made nothing durable: a power loss that keeps no unsynced batch
    // loses the write it covered, and the restart clears the poison.
    let after = disk.power_loss_keeping(0).expect("live");
    assert_eq!(after.get(b"synced").expect("get"), Some(b"1".to_vec()));
    assert_eq!(after.get(b"unsynced").expect("get"), None);
    assert_eq!(after.poisoned().expect("live"), None);
    put(&after, b"again", b"4");
    after.sync().expect("the injected failure was used up");
    let stats = after.stats().expect("live");
    assert_eq!((stats.syncs, stats.failed_syncs), (2, 1));
}

#[test]
fn a_kill_after_a_failed_sync_keeps_what_was_applied() {
    let disk = SimDisk::new();
    put(&disk, b"k", b"v");
    disk.fail_next_sync().expect("live");
    assert!(disk.sync().is_err());
    let after = disk.kill().expect("live");
    assert_eq!(after.get(b"k").expect("get"), Some(b"v".to_vec()));
}

#[test]
fn a_dying_disk_fails_syncs_across_restarts_until_healed() {
    let disk = SimDisk::new();
    disk.fail_syncs(true).expect("live");
    assert!(matches!(disk.sync(), Err(StorageError::Io { .. })));
    let disk = disk.kill().expect("live");
    assert!(
        matches!(disk.sync(), Err(StorageError::Io { .. })),
        "the fault belongs to the disk, not the mount"
    );
    let disk = disk.kill().expect("live");
    disk.fail_syncs(false).expect("live");
    disk.sync().expect("healed");
}

#[test]
fn every_older_handle_stays_stale() {
    let first = SimDisk::new();
    let node = first.engine();
    let clone = first.clone();
    let second = first.kill().expect("live");
    let third = second.wipe().expect("live");
    let fourth = third.power_loss(&mut Rng::new(3)).expect("live");
    assert_stale(&first, &node);
    assert_stale(&clone, &clone.engine());
    assert_stale(&second, &second.engine());
    assert_stale(&third, &third.engine());
    assert!(fourth.is_live());
    assert_eq!(fourth.generation(), 3);
    // The dead nodes' late writes went nowhere.
    assert_reads(&fourth, &Map::new());
}
