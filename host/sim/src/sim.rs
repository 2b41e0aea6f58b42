//! The simulated world: network, clock, faults, clients, and the run that ends in checks.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use quiver_core::causality::{self, Object};
use quiver_core::membership::MemberState;
use quiver_core::quorum::Quorum;
use quiver_core::ring::{ClaimParams, Member, Ring};

use crate::check::{self, AckedWrite, Issued};
use crate::node::{
    BUCKET, Durability, Effect, MembershipFixes, Message, NodeConfig, NodeId, Observation,
    RESPONSE_BYTES_MAX, SimNode, SimNodeConfig, VALUE_BYTES_MAX,
};
use crate::rng::Rng;
use crate::store::{CrashKind, Disk};
use quiver_core::causality::{Dot, VersionVector};
use quiver_core::meta::MetaState;
use quiver_node_core::broken::{Broken, Variant};
use quiver_node_core::node::PluginError;
use quiver_sdk::wire::{ReadOptions, Request, Response, WireDurability, WriteOptions};

/// Partitions of the simulated ring: small, so that keys share partitions and nodes.
const RING_PARTITIONS: u32 = 16;
/// Interval of node ticks, in ms: the resolution of every node timer.
const TICK_MS: u64 = 10;
/// Quiesce rounds (an R=N read of every key, then a wait) before giving up on convergence.
const QUIESCE_ROUNDS_MAX: usize = 8;
/// Wait after each quiesce round, in ms: longer than a peer timeout plus a hint pass.
const QUIESCE_ROUND_MS: u64 = 3_000;
/// With reaping: how long the whole, quiet cluster runs after every tombstone is past its
/// grace period, before reaping is paused for the checks.
const REAP_SETTLE_MS: u64 = 3_000;
/// Of that time, how long every holder of a tombstone must have held it past the grace
/// period (each by its own clock) for it to count as one reaping had to remove: ten AE
/// ticks of 200 ms.
const REAP_DEADLINE_SLACK_MS: u64 = 2_000;

/// Everything a run depends on besides the seed. [`Config::random`] derives one per seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Cluster size: the members of the first ring.
    pub nodes: usize,
    /// Nodes started outside the ring (staged joins: alive and gossiped to, owning nothing
    /// until the schedule commits their join).
    pub spares: usize,
    /// Membership changes the schedule commits during the workload (a spare joins, or a
    /// ring member leaves), each once every node that is up holds the previous one.
    pub membership_changes: usize,
    /// Replicas per key.
    pub n: usize,
    /// Read quorum.
    pub r: usize,
    /// Write quorum.
    pub w: usize,
    /// Size of the key space.
    pub keys: usize,
    /// Concurrent clients, each with one request outstanding at a time.
    pub clients: usize,
    /// Length of the faulty workload phase, in simulated ms.
    pub workload_ms: u64,
    /// Fault-free time after healing before the quiesce reads, in ms (probes back off up to
    /// 5 s, so this must exceed that).
    pub settle_ms: u64,
    /// Default durability of client writes.
    pub durability: Durability,
    /// Share of writes that ask for `buffered` durability explicitly. With power losses
    /// such writes may be lost legitimately, so the lost-write checkers skip them; they
    /// still exercise the epoch rule (a power loss rolls their coordinator's record back).
    pub buffered_share: f64,
    /// Sloppy quorum with hinted handoff.
    pub sloppy: bool,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Normal one-way delay range, in ms.
    pub delay_ms: (u64, u64),
    /// Probability of a delay spike (which reorders messages).
    pub spike: f64,
    /// Largest extra delay of a spike, in ms.
    pub spike_ms: u64,
    /// Node crashes (kill -9) with restart.
    pub crashes: bool,
    /// Crashes may be power losses (only when the default durability is `sync`:
    /// `buffered` promises nothing across a power loss).
    pub power_loss: bool,
    /// Disk replacements; at most `w - 1` per run, so every acknowledged write keeps a copy.
    pub wipes: bool,
    /// Partitions between two random groups.
    pub partitions: bool,
    /// Partitions may be one-way.
    pub one_way: bool,
    /// Swizzle-clogging: cut random links one by one, restore them in random order.
    pub swizzle: bool,
    /// Largest absolute clock skew of a node, in ms.
    pub clock_skew_ms: u64,
    /// Time between fault starts, in ms.
    pub fault_every_ms: (u64, u64),
    /// Client-side deadline of a request, in ms.
    pub client_timeout_ms: u64,
    /// Interval of the OS writing buffered data back on every node, in ms: the window in
    /// which a power loss loses unsynced writes.
    pub writeback_ms: u64,
    /// Node-side deadline of a peer call, in ms.
    pub peer_timeout_ms: u64,
    /// Tick each node only at its next deadline (`Node::next_deadline`, as a server's one
    /// timer would) instead of every 10 ms.
    pub deadline_ticks: bool,
    /// How long a sync the node asks for takes, in ms (drawn per sync): the node goes on
    /// with other inputs meanwhile, as under the server's group commit. `None`: the disk
    /// syncs inline, within the input that asked.
    pub sync_delay_ms: Option<(u64, u64)>,
    /// BROKEN VARIANT: acknowledge writes before W replicas have them.
    pub ack_before_quorum: bool,
    /// BROKEN VARIANT: continue epochs a crash may have rolled back.
    pub trust_all_epochs: bool,
    /// BROKEN VARIANT: with deferred syncs, answer before the sync is done.
    pub ack_before_sync: bool,
    /// Fsync `sync` Stores that change nothing (the fix for the finding in the crate docs;
    /// `false` reproduces production).
    pub sync_unchanged_merges: bool,
    /// Share of client operations that are deletes, in percent (35 % are reads, the rest
    /// puts).
    pub delete_pct: u64,
    /// Deletes are read-then-delete (a get, then a delete with its context), as an
    /// application removing what it saw would; more of them leave tombstone-only states.
    pub read_before_delete: bool,
    /// Read repair after reads (off to prove convergence by anti-entropy alone).
    pub read_repair: bool,
    /// Gets per thousand that ask every replica while read repair is on; the others ask R
    /// and a spare per failure ([`quiver_core::coordinator::ReadSpread`]).
    pub full_reads_per_mille: u32,
    /// Delay after which a get short of R replies asks a spare, in ms; `None` off.
    pub read_speculate_ms: Option<u64>,
    /// Interval of anti-entropy ticks on every node, in ms; `None` turns anti-entropy (and
    /// reaping) off.
    pub ae_every_ms: Option<u64>,
    /// Tombstone grace period, in ms: how long every replica must have held a tombstone
    /// state by its own clock; `None` never reaps. Reaping runs on the AE tick.
    pub tombstone_grace_ms: Option<u64>,
    /// BROKEN VARIANT: the first primary reaps without asking the other members.
    pub reap_without_checks: bool,
    /// BROKEN VARIANT: reaping checks count states that are not yet durable.
    pub reap_check_without_sync: bool,
    /// Interval of membership gossip rounds on every node, in ms.
    pub gossip_every_ms: u64,
    /// Interval of ownership handoff passes on every node, in ms.
    pub handoff_every_ms: u64,
    /// BROKEN VARIANT: a handoff push counts as held once sent, not once durably
    /// acknowledged, and the old holder drops its copy.
    pub handoff_drop_before_ack: bool,
    /// BROKEN VARIANT: the old holder compares a primary's leaf hashes with its leaf
    /// hashes read when the tree's leaves were chosen (before the listing), not with the
    /// hashes of the keys it listed.
    pub leaf_hashes_as_now: bool,
    /// How long a handoff listing takes, in ms (0: at once; production lists on its
    /// blocking pool, after an await).
    pub handoff_listing_ms: u64,
    /// Membership rules the simulator found (production has them too); all on unless a test
    /// shows what one prevents.
    pub fixes: MembershipFixes,
    /// The constructor this configuration came from (`random`, `ae-only`, `reaping`,
    /// `membership`, `membership-stress`; `custom` otherwise), for the replay command.
    pub scenario: &'static str,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nodes: 5,
            spares: 0,
            membership_changes: 0,
            n: 3,
            r: 2,
            w: 2,
            keys: 4,
            clients: 4,
            workload_ms: 8_000,
            settle_ms: 7_000,
            durability: Durability::Sync,
            buffered_share: 0.2,
            sloppy: true,
            loss: 0.02,
            duplicate: 0.01,
            delay_ms: (1, 10),
            spike: 0.02,
            spike_ms: 300,
            crashes: true,
            power_loss: true,
            wipes: true,
            partitions: true,
            one_way: true,
            swizzle: true,
            clock_skew_ms: 60_000,
            fault_every_ms: (200, 1_200),
            client_timeout_ms: 2_500,
            writeback_ms: 1_000,
            peer_timeout_ms: 300,
            sync_delay_ms: None,
            deadline_ticks: false,
            ack_before_quorum: false,
            trust_all_epochs: false,
            ack_before_sync: false,
            sync_unchanged_merges: true,
            delete_pct: 15,
            read_before_delete: false,
            read_repair: true,
            // Every read asks every replica, as before quorum reads existed: the fault
            // matrix and the broken variants keep the runs their seeds were chosen on.
            full_reads_per_mille: 1000,
            read_speculate_ms: None,
            ae_every_ms: None,
            tombstone_grace_ms: None,
            reap_without_checks: false,
            reap_check_without_sync: false,
            gossip_every_ms: 1_000,
            handoff_every_ms: 1_000,
            handoff_drop_before_ack: false,
            leaf_hashes_as_now: false,
            handoff_listing_ms: 0,
            fixes: MembershipFixes::ALL,
            scenario: "custom",
        }
    }
}

impl Config {
    /// The broken variants of node-core's rules this configuration turns on.
    pub fn broken(&self) -> Broken {
        [
            (self.ack_before_quorum, Variant::AckBeforeQuorum),
            (self.trust_all_epochs, Variant::TrustAllEpochs),
            (self.ack_before_sync, Variant::AckBeforeSync),
            (self.reap_without_checks, Variant::ReapWithoutChecks),
            (self.reap_check_without_sync, Variant::ReapCheckWithoutSync),
            (self.handoff_drop_before_ack, Variant::HandoffDropBeforeAck),
            (self.leaf_hashes_as_now, Variant::LeafHashesAsNow),
            (
                !self.sync_unchanged_merges,
                Variant::UnsyncedUnchangedMerges,
            ),
        ]
        .into_iter()
        .fold(self.fixes.broken(), |b, (on, v)| b.set(v, on))
    }

    /// A configuration drawn from `seed` (a stream separate from the run's own).
    pub fn random(seed: u64) -> Config {
        let mut rng = Rng::new(seed ^ 0x5eed_c0f1_9000_0000);
        let nodes = rng.range(3, 6) as usize;
        let n = if rng.chance(0.7) {
            3
        } else {
            rng.range(1, 3) as usize
        }
        .min(nodes);
        let durability = if rng.chance(0.7) {
            Durability::Sync
        } else {
            Durability::Buffered
        };
        let w = rng.range(1, n as u64) as usize;
        Config {
            nodes,
            n,
            r: rng.range(1, n as u64) as usize,
            w,
            keys: rng.range(1, 6) as usize,
            clients: rng.range(2, 8) as usize,
            durability,
            buffered_share: [0.0, 0.1, 0.5][rng.index(3)],
            sloppy: rng.chance(0.85),
            loss: [0.0, 0.01, 0.05, 0.15][rng.index(4)],
            duplicate: [0.0, 0.02, 0.1][rng.index(3)],
            delay_ms: (1, rng.range(2, 30)),
            spike: [0.0, 0.02, 0.1][rng.index(3)],
            crashes: rng.chance(0.7),
            power_loss: rng.chance(0.6),
            wipes: rng.chance(0.3),
            partitions: rng.chance(0.6),
            one_way: rng.chance(0.5),
            swizzle: rng.chance(0.4),
            clock_skew_ms: [0, 50, 60_000, 3_600_000][rng.index(4)],
            // Drawn last, so every earlier draw of a seed is what it was before.
            full_reads_per_mille: [1000, 100, 0][rng.index(3)],
            read_speculate_ms: [None, Some(20), Some(100)][rng.index(3)],
            scenario: "random",
            ..Config::default()
        }
    }

    /// The anti-entropy-only scenario for `seed`: [`Config::random`] with read repair and
    /// hinted handoff (sloppy quorum) off and anti-entropy every 200 ms, so replicas that
    /// missed writes converge by exchanges alone.
    pub fn ae_only(seed: u64) -> Config {
        Config {
            sloppy: false,
            read_repair: false,
            ae_every_ms: Some(200),
            scenario: "ae-only",
            ..Config::random(seed)
        }
    }

    /// The reaping scenario for `seed`: [`Config::random`] (clock skews included: every
    /// node measures the grace period on its own clock, as hold time) with anti-entropy
    /// every 200 ms and tombstone reaping after a 2 s grace.
    pub fn reaping(seed: u64) -> Config {
        let base = Config::random(seed);
        Config {
            ae_every_ms: Some(200),
            tombstone_grace_ms: Some(2_000),
            delete_pct: 45,
            read_before_delete: true,
            clients: base.clients.min(4),
            // Full reads, as when the pinned seeds of the reaping tests were chosen.
            full_reads_per_mille: 1000,
            read_speculate_ms: None,
            scenario: "reaping",
            ..base
        }
    }

    /// The membership scenario for `seed`: [`Config::random`] plus one spare node, one to
    /// three joins and leaves committed at random times of the faulty workload, gossip and
    /// handoff every 500 ms; half the seeds run anti-entropy, half of those reap tombstones
    /// (as [`Config::reaping`]).
    pub fn membership(seed: u64) -> Config {
        let base = Config::random(seed);
        let mut rng = Rng::new(seed ^ 0x6d65_6d62_0000_0000);
        let ae = rng.chance(0.5);
        let reaping = ae && rng.chance(0.5);
        Config {
            spares: 1,
            membership_changes: rng.range(1, 3) as usize,
            gossip_every_ms: 500,
            handoff_every_ms: 500,
            ae_every_ms: ae.then_some(200),
            tombstone_grace_ms: reaping.then_some(2_000),
            delete_pct: if reaping { 45 } else { base.delete_pct },
            read_before_delete: reaping,
            clients: if reaping {
                base.clients.min(4)
            } else {
                base.clients
            },
            // Full reads, as when the pinned seeds of `membership_fixes_are_load_bearing` were
            // chosen; quorum reads are covered by the random and anti-entropy scenarios.
            full_reads_per_mille: 1000,
            read_speculate_ms: None,
            scenario: "membership",
            ..base
        }
    }

    /// The membership stress scenario for `seed`: [`Config::membership`] with one replica
    /// per key (no second copy hides a dropped one), 20 % message loss, gossip only every
    /// 3 s (so rings disagree for seconds), handoff every 100 ms, three changes and eight
    /// keys. Every rule of [`MembershipFixes`] is load-bearing here.
    pub fn membership_stress(seed: u64) -> Config {
        Config {
            n: 1,
            r: 1,
            w: 1,
            loss: 0.2,
            gossip_every_ms: 3_000,
            handoff_every_ms: 100,
            membership_changes: 3,
            keys: 8,
            scenario: "membership-stress",
            ..Config::membership(seed)
        }
    }

    /// The handoff race scenario for `seed`: [`Config::membership_stress`] with handoff
    /// listings that take 200 ms (a large tree scanned on a busy disk), so writes from
    /// coordinators still on an older ring land between the choice of a tree's leaves and
    /// their listing.
    pub fn handoff_race(seed: u64) -> Config {
        Config {
            handoff_listing_ms: 200,
            scenario: "handoff-race",
            ..Config::membership_stress(seed)
        }
    }

    /// The configuration of `scenario` (a [`Config::scenario`] name) for `seed`; `None`
    /// for an unknown name.
    pub fn of_scenario(scenario: &str, seed: u64) -> Option<Config> {
        Some(match scenario {
            "random" => Config::random(seed),
            "ae-only" => Config::ae_only(seed),
            "reaping" => Config::reaping(seed),
            "membership" => Config::membership(seed),
            "membership-stress" => Config::membership_stress(seed),
            "handoff-race" => Config::handoff_race(seed),
            _ => return None,
        })
    }

    /// One line describing the run's setting, for failure messages and summaries.
    pub fn describe(&self) -> String {
        let mut faults = Vec::new();
        for (on, name) in [
            (self.crashes, "crash"),
            (self.crashes && self.power_loss, "power-loss"),
            (self.wipes, "wipe"),
            (self.partitions, "partition"),
            (self.partitions && self.one_way, "one-way"),
            (self.swizzle, "swizzle"),
            (self.ack_before_quorum, "BROKEN:ack-before-quorum"),
            (self.trust_all_epochs, "BROKEN:trust-all-epochs"),
            (
                !self.sync_unchanged_merges,
                "production-unsynced-noop-merge",
            ),
            (!self.read_repair, "no-read-repair"),
            (self.sync_delay_ms.is_some(), "deferred-syncs"),
            (self.deadline_ticks, "deadline-ticks"),
            (self.ack_before_sync, "BROKEN:ack-before-sync"),
            (self.reap_without_checks, "BROKEN:reap-without-checks"),
            (
                self.handoff_drop_before_ack,
                "BROKEN:handoff-drop-before-ack",
            ),
            (self.leaf_hashes_as_now, "BROKEN:leaf-hashes-as-now"),
            (
                !self.fixes.forget_hints_for_left,
                "production-keeps-hints-for-left",
            ),
            (
                !self.fixes.pass_ring_version,
                "production-ring-version-per-tree",
            ),
            (!self.fixes.handoff_same_ring, "production-handoff-any-ring"),
            (
                !self.fixes.reap_check_same_ring,
                "production-reap-check-any-ring",
            ),
            (!self.fixes.depart_recheck, "production-depart-no-recheck"),
            (
                !self.fixes.depart_when_all_told,
                "production-depart-one-told",
            ),
        ] {
            if on {
                faults.push(name);
            }
        }
        format!(
            "{} nodes={} spares={} changes={} n={} r={} w={} keys={} clients={} {:?} sloppy={} \
             loss={} dup={} delay={:?} spike={} skew={}ms buffered_share={} ae={:?} grace={:?} \
             full_reads={}‰ speculate={:?} faults=[{}]",
            self.scenario,
            self.nodes,
            self.spares,
            self.membership_changes,
            self.n,
            self.r,
            self.w,
            self.keys,
            self.clients,
            self.durability,
            self.sloppy,
            self.loss,
            self.duplicate,
            self.delay_ms,
            self.spike,
            self.clock_skew_ms,
            self.buffered_share,
            self.ae_every_ms,
            self.tombstone_grace_ms,
            self.full_reads_per_mille,
            self.read_speculate_ms,
            faults.join(",")
        )
    }
}

/// Which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checker {
    /// The configuration or ring could not be built.
    Setup,
    /// An acknowledged write is missing from the full read.
    LostWrite,
    /// Replicas do not all hold every acknowledged write after heal.
    Convergence,
    /// Hint markers remain after heal.
    HintsDrain,
    /// A dot was issued twice.
    DuplicateDot,
    /// A node's anti-entropy trees do not match its records.
    AeIndex,
    /// A value an acknowledged delete overwrote is readable again.
    Resurrection,
    /// An old tombstone every replica holds was not reaped.
    TombstonesReaped,
    /// Nodes do not agree on the final ring, or a node removed from it did not depart.
    Membership,
    /// A node holds a key it is not a primary of under the final ring, or a node departed
    /// holding data.
    Orphans,
}

impl fmt::Display for Checker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Checker::Setup => "setup",
            Checker::LostWrite => "no-acknowledged-write-lost",
            Checker::Convergence => "convergence",
            Checker::HintsDrain => "hints-drain",
            Checker::DuplicateDot => "unique-dots",
            Checker::AeIndex => "ae-index-follows-records",
            Checker::Resurrection => "no-resurrection",
            Checker::TombstonesReaped => "tombstones-reaped",
            Checker::Membership => "membership-settles",
            Checker::Orphans => "no-orphan-copies",
        })
    }
}

/// A failed run: the seed, the checker, what it found, and how to replay it.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "quiver-sim seed {seed}: checker {checker} failed: {message}\n  config: {config}\n  \
     replay: {replay}"
)]
pub struct Failure {
    /// The seed of the run.
    pub seed: u64,
    /// Which checker failed.
    pub checker: Checker,
    /// What it found (key, dot, value).
    pub message: String,
    /// The run's configuration, described.
    pub config: String,
    /// The command that replays the run.
    pub replay: String,
}

/// The replay command for a seed run with [`Config::random`].
pub fn replay_command(seed: u64) -> String {
    format!("QUIVER_SIM_SEED={seed} cargo test -p quiver-sim --test sim replay -- --nocapture")
}

/// The replay command for a seed run with the configuration of `scenario` (see
/// [`Config::of_scenario`]); a custom configuration replays only with its test.
pub fn replay_command_for(seed: u64, scenario: &str) -> String {
    match scenario {
        "random" => replay_command(seed),
        "custom" => format!(
            "{} (with the test's own configuration)",
            replay_command(seed)
        ),
        other => format!("QUIVER_SIM_SCENARIO={other} {}", replay_command(seed)),
    }
}

/// What a successful run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Client operations issued.
    pub operations: u64,
    /// Writes (puts and deletes) acknowledged.
    pub acked_writes: u64,
    /// Reads answered.
    pub reads: u64,
    /// Operations that failed or timed out.
    pub failed_operations: u64,
    /// Faults injected (crashes, partitions, clogged links).
    pub faults: u64,
    /// Messages sent.
    pub messages: u64,
    /// Messages dropped (loss, cut links, dead receivers).
    pub dropped: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Dots issued.
    pub dots: u64,
    /// Read repairs sent.
    pub read_repairs: u64,
    /// Spare replicas asked by reads short of R at their speculation time.
    pub speculative_reads: u64,
    /// Hints handed off and dropped.
    pub hints_handed_off: u64,
    /// Anti-entropy exchanges completed.
    pub ae_exchanges: u64,
    /// Keys repaired by anti-entropy (changed at either end).
    pub ae_repaired: u64,
    /// Tombstones removed (per replica).
    pub tombstones_reaped: u64,
    /// Membership changes committed.
    pub ring_changes: u64,
    /// Nodes that left the cluster.
    pub departures: u64,
    /// Keys handed off that changed their new owner.
    pub handoff_sent: u64,
    /// Copies old owners dropped after every new owner held them.
    pub handoff_dropped: u64,
    /// Syncs a node asked for and went on without (`Config::sync_delay_ms`).
    pub syncs_deferred: u64,
    /// Simulated time at the end, in ms.
    pub simulated_ms: u64,
    /// Hash of every event processed, in order: equal for two runs of one seed.
    pub trace_hash: u64,
}

impl Report {
    /// Adds another run's counts (for suite summaries; seed and hash are not summed).
    pub fn accumulate(&mut self, other: &Report) {
        self.operations += other.operations;
        self.acked_writes += other.acked_writes;
        self.reads += other.reads;
        self.failed_operations += other.failed_operations;
        self.faults += other.faults;
        self.messages += other.messages;
        self.dropped += other.dropped;
        self.duplicated += other.duplicated;
        self.dots += other.dots;
        self.read_repairs += other.read_repairs;
        self.speculative_reads += other.speculative_reads;
        self.hints_handed_off += other.hints_handed_off;
        self.ae_exchanges += other.ae_exchanges;
        self.ae_repaired += other.ae_repaired;
        self.tombstones_reaped += other.tombstones_reaped;
        self.ring_changes += other.ring_changes;
        self.departures += other.departures;
        self.handoff_sent += other.handoff_sent;
        self.handoff_dropped += other.handoff_dropped;
        self.syncs_deferred += other.syncs_deferred;
        self.simulated_ms += other.simulated_ms;
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ops={} acked_writes={} reads={} failed_ops={} faults={} messages={} dropped={} \
             duplicated={} dots={} read_repairs={} speculative_reads={} hints_handed_off={} ae_exchanges={} \
             ae_repaired={} reaped={} ring_changes={} departures={} handoff_sent={} \
             handoff_dropped={} syncs_deferred={} simulated={:.1}s",
            self.operations,
            self.acked_writes,
            self.reads,
            self.failed_operations,
            self.faults,
            self.messages,
            self.dropped,
            self.duplicated,
            self.dots,
            self.read_repairs,
            self.speculative_reads,
            self.hints_handed_off,
            self.ae_exchanges,
            self.ae_repaired,
            self.tombstones_reaped,
            self.ring_changes,
            self.departures,
            self.handoff_sent,
            self.handoff_dropped,
            self.syncs_deferred,
            self.simulated_ms as f64 / 1000.0
        )
    }
}

/// FNV-1a: a hasher whose output is fixed forever, for the determinism trace.
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[derive(Debug, Clone, Hash)]
enum Event {
    Deliver {
        from: usize,
        to: usize,
        msg: Box<Message>,
    },
    Tick,
    ClientNext(usize),
    ClientTimeout {
        client: usize,
        ticket: u64,
    },
    Fault,
    Restart(usize),
    /// Node `node`'s next deadline in its life `life` (with `Config::deadline_ticks`).
    NodeTick {
        node: usize,
        life: u64,
    },
    /// The sync `token` a node asked for in its life `life` is done.
    Synced {
        node: usize,
        life: u64,
        token: u64,
    },
    Cut(Vec<(usize, usize)>),
    Restore(Vec<(usize, usize)>),
    Membership,
}

struct Scheduled {
    at_ms: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_ms, self.seq) == (other.at_ms, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // Reversed: BinaryHeap is a max-heap and the earliest event must come first; `seq`
    // breaks ties in scheduling order, which keeps the run deterministic.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at_ms, other.seq).cmp(&(self.at_ms, self.seq))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Pending,
    Written(quiver_core::causality::Dot),
    Read,
    Failed,
    TimedOut,
}

#[derive(Debug, Clone)]
struct OpRecord {
    client: Option<usize>,
    /// A write acknowledged with `buffered` durability in a run with power losses: it may
    /// be lost legitimately, so the lost-write checkers skip it.
    exempt: bool,
    key: String,
    value: Vec<u8>,
    /// The context the request carried (empty for none).
    sent_context: Vec<u8>,
    outcome: Outcome,
    end_ms: u64,
}

/// What a simulated client does next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Get,
    Put(Vec<u8>),
    Delete,
}

impl Op {
    /// The request, as production's client protocol carries it.
    fn request(self, key: String, context: Vec<u8>, durability: Option<Durability>) -> Request {
        let (bucket, key) = (BUCKET.to_string(), key.into_bytes());
        let options = WriteOptions {
            durability: durability.map(|d| match d {
                Durability::Sync => WireDurability::Sync,
                Durability::Buffered => WireDurability::Buffered,
            }),
            ..WriteOptions::default()
        };
        match self {
            Op::Get => Request::Get {
                bucket,
                key,
                options: ReadOptions::default(),
            },
            Op::Put(value) => Request::Put {
                bucket,
                key,
                context,
                value,
                options,
            },
            Op::Delete => Request::Delete {
                bucket,
                key,
                context,
                options,
            },
        }
    }
}

/// The dot a write acknowledged with `reply` issued: the one entry the reply's context
/// holds beyond the context the client sent (production replies carry only the context).
fn written_dot(sent: &[u8], reply: &[u8]) -> Option<Dot> {
    let sent = if sent.is_empty() {
        VersionVector::new()
    } else {
        causality::decode_context(sent).ok()?
    };
    let reply = causality::decode_context(reply).ok()?;
    let mut grown = reply.iter().filter(|(actor, n)| *n > sent.get(actor));
    let (actor, counter) = grown.next()?;
    let dot = Dot {
        actor: actor.clone(),
        counter,
    };
    grown.next().is_none().then_some(dot)
}

#[derive(Debug, Default)]
struct ClientState {
    waiting: Option<u64>,
    contexts: BTreeMap<String, Vec<u8>>,
    seq: u64,
    /// A read-then-delete read this key: delete it next.
    delete_next: Option<String>,
}

struct World {
    cfg: Config,
    seed: u64,
    rng: Rng,
    now_ms: u64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    names: Vec<NodeId>,
    index: BTreeMap<NodeId, usize>,
    /// What a node with a fresh disk starts from (production: the `--peer` list).
    initial: MetaState,
    /// The last committed ring: the one every node must end up with.
    committed: Arc<Ring>,
    /// Member states as the committer made them.
    states: BTreeMap<NodeId, MemberState>,
    changes_left: usize,
    /// Nodes that left the cluster for good.
    departed: Vec<bool>,
    /// Departures that broke the rules (a node leaving with data, or uninvited).
    bad_departures: Vec<String>,
    node_cfgs: Vec<SimNodeConfig>,
    nodes: Vec<Option<SimNode>>,
    disks: Vec<Option<Disk>>,
    lives: Vec<u64>,
    /// The earliest `Event::NodeTick` scheduled for each node (deadline ticks only).
    armed: Vec<Option<u64>>,
    cuts: BTreeMap<(usize, usize), u32>,
    faulty: bool,
    wipes_left: usize,
    clients: Vec<ClientState>,
    history: Vec<OpRecord>,
    issued: Vec<Issued>,
    /// Tombstone states removed by reaping, per key.
    reaped: Vec<(String, Object)>,
    /// Simulated time at which reaping was paused for the final checks.
    reaping_paused_ms: Option<u64>,
    report: Report,
    trace: Fnv,
}

/// Runs one simulation: a pure function of `(seed, config)`.
pub fn run(seed: u64, config: &Config) -> Result<Report, Failure> {
    let fail = |checker, message: String| Failure {
        seed,
        checker,
        message,
        config: config.describe(),
        replay: match config.sync_delay_ms {
            Some((lo, hi)) => format!(
                "QUIVER_SIM_SYNC_DELAY={lo}-{hi} {}",
                replay_command_for(seed, config.scenario)
            ),
            None => replay_command_for(seed, config.scenario),
        },
    };
    let mut world = World::new(seed, config).map_err(|m| fail(Checker::Setup, m))?;
    world.workload();
    world.heal();
    world.quiesce();
    world.reap_settle();
    world.check().map_err(|(c, m)| fail(c, m))?;
    world.report.seed = seed;
    world.report.simulated_ms = world.now_ms;
    world.report.trace_hash = world.trace.finish();
    Ok(world.report)
}

impl World {
    fn new(seed: u64, cfg: &Config) -> Result<World, String> {
        let quorum = Quorum::new(cfg.n, cfg.r, cfg.w).map_err(|e| e.to_string())?;
        if cfg.n > cfg.nodes {
            return Err(format!("n={} exceeds the {} nodes", cfg.n, cfg.nodes));
        }
        let total = cfg.nodes + cfg.spares;
        let names: Vec<NodeId> = (0..total).map(|i| format!("n{i}")).collect();
        let members = names[..cfg.nodes].iter().map(Member::new).collect();
        let params = ClaimParams {
            partitions: RING_PARTITIONS,
            n_val: cfg.n as u32,
        };
        let ring = Arc::new(Ring::new(members, params).map_err(|e| e.to_string())?);
        let initial = crate::store::initial_meta(&names[..cfg.nodes], &names[cfg.nodes..], params)
            .map_err(|e| e.to_string())?;
        let mut rng = Rng::new(seed);
        let skew = cfg.clock_skew_ms as i64;
        let node_cfgs: Vec<SimNodeConfig> = names
            .iter()
            .map(|_| SimNodeConfig {
                node: NodeConfig {
                    quorum,
                    sloppy: cfg.sloppy,
                    buckets: BTreeMap::new(),
                    durability: cfg.durability,
                    value_bytes_max: VALUE_BYTES_MAX,
                    response_bytes_max: RESPONSE_BYTES_MAX,
                    peer_timeout_ms: cfg.peer_timeout_ms,
                    forward_timeout_ms: cfg
                        .client_timeout_ms
                        .saturating_sub(500)
                        .max(cfg.peer_timeout_ms),
                    hints_every_ms: 500,
                    read_repair: cfg.read_repair,
                    full_reads_per_mille: cfg.full_reads_per_mille,
                    read_speculate_ms: cfg.read_speculate_ms,
                    ae_every_ms: cfg.ae_every_ms,
                    tombstone_grace_ms: cfg.ae_every_ms.and(cfg.tombstone_grace_ms),
                    gossip_every_ms: cfg.gossip_every_ms,
                    handoff_every_ms: cfg.handoff_every_ms,
                    handoff_listing_ms: cfg.handoff_listing_ms,
                    broken: cfg.broken(),
                },
                writeback_every_ms: cfg.writeback_ms,
                clock_skew_ms: rng.range(0, 2 * skew as u64) as i64 - skew,
            })
            .collect();
        let nodes = names
            .iter()
            .zip(&node_cfgs)
            .map(|(name, nc)| {
                let mut disk = Disk::new(rng.next_u64());
                disk.defer_syncs = cfg.sync_delay_ms.is_some();
                Some(SimNode::boot(name, &initial, nc.clone(), disk, 0, 0))
            })
            .collect();
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Ok(World {
            seed,
            rng,
            now_ms: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            index,
            states: initial
                .members
                .iter()
                .map(|(id, e)| (id.clone(), e.state))
                .collect(),
            initial,
            committed: ring,
            changes_left: cfg.membership_changes,
            departed: vec![false; total],
            bad_departures: Vec::new(),
            node_cfgs,
            nodes,
            disks: (0..total).map(|_| None).collect(),
            lives: vec![0; total],
            armed: vec![None; total],
            cuts: BTreeMap::new(),
            faulty: true,
            wipes_left: if cfg.wipes {
                cfg.w.saturating_sub(1)
            } else {
                0
            },
            clients: (0..cfg.clients).map(|_| ClientState::default()).collect(),
            history: Vec::new(),
            issued: Vec::new(),
            reaped: Vec::new(),
            reaping_paused_ms: None,
            report: Report::default(),
            trace: Fnv(0xcbf2_9ce4_8422_2325),
            names,
            cfg: cfg.clone(),
        })
    }

    fn schedule(&mut self, at_ms: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at_ms,
            seq: self.seq,
            event,
        });
    }

    fn run_until(&mut self, end_ms: u64) {
        while self.queue.peek().is_some_and(|s| s.at_ms <= end_ms) {
            let Some(s) = self.queue.pop() else { break };
            self.now_ms = s.at_ms;
            s.at_ms.hash(&mut self.trace);
            s.event.hash(&mut self.trace);
            self.handle(s.event);
        }
        self.now_ms = end_ms;
    }

    fn key(&self, i: usize) -> String {
        format!("k{i}")
    }

    fn any_fault_enabled(&self) -> bool {
        self.cfg.crashes || self.cfg.partitions || self.cfg.swizzle
    }

    fn workload(&mut self) {
        if self.cfg.deadline_ticks {
            for i in 0..self.nodes.len() {
                self.arm_tick(i);
            }
        } else {
            self.schedule(TICK_MS, Event::Tick);
        }
        for c in 0..self.cfg.clients {
            let at = self.rng.range(0, 50);
            self.schedule(at, Event::ClientNext(c));
        }
        if self.any_fault_enabled() {
            let at = self
                .rng
                .range(self.cfg.fault_every_ms.0, self.cfg.fault_every_ms.1);
            self.schedule(at, Event::Fault);
        }
        if self.changes_left > 0 {
            let at = self.rng.range(300, self.cfg.workload_ms / 3);
            self.schedule(at, Event::Membership);
        }
        self.run_until(self.cfg.workload_ms);
    }

    /// Ends every fault: links restored, nodes restarted, the network reliable.
    fn heal(&mut self) {
        self.faulty = false;
        self.cuts.clear();
        for i in 0..self.nodes.len() {
            self.restart(i);
        }
        self.run_until(self.now_ms + self.cfg.settle_ms);
    }

    /// Anti-entropy-free quiescence: R=N reads of every key repair stale replicas; repeat
    /// until hints are drained and primaries agree, or the round budget is spent.
    fn quiesce(&mut self) {
        for _ in 0..QUIESCE_ROUNDS_MAX {
            for k in 0..self.cfg.keys {
                let key = self.key(k);
                let primary = self.primaries(&key).first().copied().unwrap_or(0);
                let request = Request::Get {
                    bucket: BUCKET.to_string(),
                    key: key.clone().into_bytes(),
                    options: ReadOptions {
                        r: u8::try_from(self.cfg.n).ok(),
                        ..ReadOptions::default()
                    },
                };
                let ticket = self.history.len() as u64;
                self.history.push(OpRecord {
                    client: None,
                    exempt: false,
                    key,
                    value: Vec::new(),
                    sent_context: Vec::new(),
                    outcome: Outcome::Pending,
                    end_ms: 0,
                });
                let now = self.now_ms;
                if let Some(node) = self.nodes[primary].as_mut() {
                    let fx = node.on_client(now, ticket, request);
                    self.effects(primary, fx);
                }
            }
            self.run_until(self.now_ms + QUIESCE_ROUND_MS);
            if self.quiet() {
                break;
            }
        }
    }

    /// With reaping on: every tombstone of the workload is past its grace period; let the
    /// whole, quiet cluster reap, then stop new reaping passes and quiesce again, so the
    /// checks never look at a pass half done (a half-finished reap is repaired by AE).
    fn reap_settle(&mut self) {
        let Some(grace) = self.reaping_grace() else {
            return;
        };
        self.run_until(self.now_ms + grace + REAP_SETTLE_MS);
        for node in self.nodes.iter_mut().flatten() {
            node.pause_reaping();
        }
        self.reaping_paused_ms = Some(self.now_ms);
        self.quiesce();
    }

    fn reaping_grace(&self) -> Option<u64> {
        self.cfg.ae_every_ms.and(self.cfg.tombstone_grace_ms)
    }

    fn quiet(&self) -> bool {
        if self.check_membership().is_err() || self.check_orphans().is_err() {
            return false;
        }
        let hints = self
            .nodes
            .iter()
            .flatten()
            .map(|n| n.hint_count())
            .sum::<usize>();
        hints == 0
            && (0..self.cfg.keys).all(|k| {
                let key = self.key(k);
                let copies: Vec<Object> = self
                    .primaries(&key)
                    .iter()
                    .map(|&i| self.object_on(i, &key))
                    .collect();
                copies.windows(2).all(|w| w[0] == w[1])
            })
    }

    fn primaries(&self, key: &str) -> Vec<usize> {
        self.committed
            .preference_list_for_key(BUCKET.as_bytes(), key.as_bytes(), self.cfg.n)
            .primaries
            .iter()
            .filter_map(|m| self.index.get(&m.id).copied())
            .collect()
    }

    fn object_on(&self, node: usize, key: &str) -> Object {
        self.nodes[node]
            .as_ref()
            .map(|n| n.object(key))
            .unwrap_or_default()
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { from, to, msg } => {
                if self.link_cut(from, to) {
                    self.report.dropped += 1;
                    return;
                }
                let now = self.now_ms;
                let from_name = self.names[from].clone();
                match self.nodes[to].as_mut() {
                    Some(node) => {
                        let fx = node.on_message(now, &from_name, *msg);
                        self.effects(to, fx);
                    }
                    None => self.report.dropped += 1,
                }
            }
            Event::Tick => {
                let now = self.now_ms;
                for i in 0..self.nodes.len() {
                    if let Some(node) = self.nodes[i].as_mut() {
                        let fx = node.on_tick(now);
                        self.effects(i, fx);
                    }
                }
                self.schedule(now + TICK_MS, Event::Tick);
            }
            Event::ClientNext(c) => self.client_next(c),
            Event::ClientTimeout { client, ticket } => {
                if let Some(op) = self.history.get_mut(ticket as usize)
                    && op.outcome == Outcome::Pending
                {
                    op.outcome = Outcome::TimedOut;
                    op.end_ms = self.now_ms;
                    self.report.failed_operations += 1;
                    self.client_done(client, ticket);
                }
            }
            Event::Fault => self.fault(),
            Event::Restart(i) => self.restart(i),
            Event::NodeTick { node, life } => {
                if self.lives[node] != life {
                    return;
                }
                if self.armed[node] == Some(self.now_ms) {
                    self.armed[node] = None;
                }
                let now = self.now_ms;
                if let Some(n) = self.nodes[node].as_mut() {
                    let fx = n.on_tick(now);
                    self.effects(node, fx);
                }
            }
            Event::Synced { node, life, token } => {
                // A sync of an earlier life died with it: its writes were never promised.
                if self.lives[node] != life {
                    return;
                }
                let now = self.now_ms;
                if let Some(n) = self.nodes[node].as_mut() {
                    let fx = n.on_synced(now, token);
                    self.effects(node, fx);
                }
            }
            Event::Membership => self.membership_change(),
            Event::Cut(links) => {
                if self.faulty {
                    for l in links {
                        *self.cuts.entry(l).or_insert(0) += 1;
                    }
                }
            }
            Event::Restore(links) => {
                for l in links {
                    if let Some(c) = self.cuts.get_mut(&l) {
                        *c -= 1;
                        if *c == 0 {
                            self.cuts.remove(&l);
                        }
                    }
                }
            }
        }
    }

    fn link_cut(&self, from: usize, to: usize) -> bool {
        self.cuts.contains_key(&(from, to))
    }

    /// With `Config::deadline_ticks`, makes sure node `i` is ticked by its next deadline
    /// (at least a millisecond on, so a tick that leaves work due cannot spin).
    fn arm_tick(&mut self, i: usize) {
        if !self.cfg.deadline_ticks {
            return;
        }
        let Some(node) = self.nodes[i].as_ref() else {
            return;
        };
        let at = node.next_deadline().max(self.now_ms + 1);
        if self.armed[i].is_some_and(|armed| armed <= at) {
            return;
        }
        self.armed[i] = Some(at);
        let life = self.lives[i];
        self.schedule(at, Event::NodeTick { node: i, life });
    }

    fn effects(&mut self, from: usize, fx: Vec<Effect>) {
        self.effects_of(from, fx);
        self.arm_tick(from);
    }

    fn effects_of(&mut self, from: usize, fx: Vec<Effect>) {
        for effect in fx {
            match effect {
                Effect::Send { to, msg } => self.send(from, &to, msg),
                Effect::Reply { ticket, result } => self.client_reply(ticket, result),
                // The simulation attaches no reconciler, so no node asks for one; were one
                // asked for, it is not loaded here.
                Effect::Plugin { call, .. } => {
                    let now = self.now_ms;
                    if let Some(node) = self.nodes[from].as_mut() {
                        let fx = node.on_plugin_done(now, call, Err(PluginError::NotLoaded));
                        self.effects_of(from, fx);
                    }
                }
                Effect::Sync { token } => {
                    // Only disks that defer syncs ask (`Config::sync_delay_ms`).
                    let (lo, hi) = self.cfg.sync_delay_ms.unwrap_or((0, 0));
                    let at = self.now_ms + self.rng.range(lo, hi);
                    let life = self.lives[from];
                    self.report.syncs_deferred += 1;
                    self.schedule(
                        at,
                        Event::Synced {
                            node: from,
                            life,
                            token,
                        },
                    );
                }
                Effect::Observe(o) => match o {
                    Observation::DotIssued {
                        node,
                        key,
                        bucket: _,
                        dot,
                        context,
                        value,
                    } => {
                        self.report.dots += 1;
                        self.issued.push(Issued {
                            node,
                            key: sim_key(&key),
                            dot,
                            context,
                            value,
                            at_ms: self.now_ms,
                        });
                    }
                    Observation::ReadRepair => self.report.read_repairs += 1,
                    Observation::SpeculativeRead => self.report.speculative_reads += 1,
                    Observation::HintHandedOff => self.report.hints_handed_off += 1,
                    Observation::PeerTimeout => {}
                    Observation::AeExchange { repaired } => {
                        self.report.ae_exchanges += 1;
                        self.report.ae_repaired += repaired;
                    }
                    Observation::Reaped { key, object, .. } => {
                        self.report.tombstones_reaped += 1;
                        self.reaped.push((sim_key(&key), object));
                    }
                    Observation::Handoff { sent, dropped } => {
                        self.report.handoff_sent += sent;
                        self.report.handoff_dropped += dropped;
                    }
                    Observation::Departed => self.depart(from),
                },
            }
        }
    }

    fn send(&mut self, from: usize, to: &str, msg: Message) {
        self.report.messages += 1;
        let Some(&to) = self.index.get(to) else {
            self.report.dropped += 1;
            return;
        };
        let (loss, dup, spike) = if self.faulty {
            (self.cfg.loss, self.cfg.duplicate, self.cfg.spike)
        } else {
            (0.0, 0.0, 0.0)
        };
        if self.link_cut(from, to) || self.rng.chance(loss) {
            self.report.dropped += 1;
            return;
        }
        let copies = if self.rng.chance(dup) { 2 } else { 1 };
        if copies == 2 {
            self.report.duplicated += 1;
        }
        for _ in 0..copies {
            let mut delay = self.rng.range(self.cfg.delay_ms.0, self.cfg.delay_ms.1);
            if self.rng.chance(spike) {
                delay += self.rng.range(0, self.cfg.spike_ms);
            }
            let at = self.now_ms + delay.max(1);
            self.schedule(
                at,
                Event::Deliver {
                    from,
                    to,
                    msg: Box::new(msg.clone()),
                },
            );
        }
    }

    // ----- clients -----

    fn client_next(&mut self, c: usize) {
        if self.now_ms >= self.cfg.workload_ms {
            return;
        }
        // The second half of a read-then-delete: delete with what the read returned.
        let forced = self.clients[c].delete_next.take();
        let (key, roll) = match forced.clone() {
            Some(key) => (key, 99),
            None => {
                let k = self.rng.index(self.cfg.keys);
                (self.key(k), self.rng.below(100))
            }
        };
        let read_first = forced.is_none() && self.cfg.read_before_delete;
        let client = &mut self.clients[c];
        client.seq += 1;
        let (op, value) = if roll < 35 {
            (Op::Get, Vec::new())
        } else if roll < 100 - self.cfg.delete_pct.min(65) {
            let v = format!("c{c}-{}", client.seq).into_bytes();
            (Op::Put(v.clone()), v)
        } else if read_first {
            client.delete_next = Some(key.clone());
            (Op::Get, Vec::new())
        } else {
            (Op::Delete, Vec::new())
        };
        let durability = if op != Op::Get && self.rng.chance(self.cfg.buffered_share) {
            Some(Durability::Buffered)
        } else {
            None
        };
        let effective = durability.unwrap_or(self.cfg.durability);
        let exempt = effective == Durability::Buffered && self.power_losses_possible();
        let context = if op != Op::Get && (forced.is_some() || self.rng.chance(0.8)) {
            self.clients[c]
                .contexts
                .get(&key)
                .cloned()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        // Clients know which nodes left (production: they are told or configured).
        let reachable: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !self.departed[i])
            .collect();
        let coordinator = reachable
            .get(self.rng.index(reachable.len()))
            .copied()
            .unwrap_or(0);
        let ticket = self.history.len() as u64;
        self.report.operations += 1;
        self.history.push(OpRecord {
            client: Some(c),
            exempt,
            key: key.clone(),
            value,
            sent_context: context.clone(),
            outcome: Outcome::Pending,
            end_ms: 0,
        });
        let request = op.request(key, context, durability);
        let now = self.now_ms;
        match self.nodes[coordinator].as_mut() {
            None => {
                // Connection refused: the client knows the request never ran.
                self.history[ticket as usize].outcome = Outcome::Failed;
                self.report.failed_operations += 1;
                let at = now + self.rng.range(1, 50);
                self.schedule(at, Event::ClientNext(c));
            }
            Some(node) => {
                self.clients[c].waiting = Some(ticket);
                let fx = node.on_client(now, ticket, request);
                self.schedule(
                    now + self.cfg.client_timeout_ms,
                    Event::ClientTimeout { client: c, ticket },
                );
                self.effects(coordinator, fx);
            }
        }
    }

    fn client_reply(&mut self, ticket: u64, result: Response) {
        let now = self.now_ms;
        let Some(op) = self.history.get_mut(ticket as usize) else {
            return;
        };
        // A reply after the client gave up is not an acknowledgement the client saw.
        if op.outcome != Outcome::Pending {
            return;
        }
        op.end_ms = now;
        let context = match result {
            Response::Get { context, .. } => {
                op.outcome = Outcome::Read;
                self.report.reads += 1;
                Some(context)
            }
            Response::Written { context } => {
                let dot = written_dot(&op.sent_context, &context)
                    .expect("a write's reply context is the client's plus one new dot");
                op.outcome = Outcome::Written(dot);
                self.report.acked_writes += 1;
                Some(context)
            }
            _ => {
                op.outcome = Outcome::Failed;
                self.report.failed_operations += 1;
                None
            }
        };
        let (client, key) = (op.client, op.key.clone());
        if let Some(c) = client {
            if let Some(ctx) = context {
                // A context must decode: the client would send it back verbatim.
                if causality::decode_context(&ctx).is_ok() {
                    self.clients[c].contexts.insert(key, ctx);
                }
            }
            self.client_done(c, ticket);
        }
    }

    fn client_done(&mut self, c: usize, ticket: u64) {
        if self.clients[c].waiting == Some(ticket) {
            self.clients[c].waiting = None;
            let at = self.now_ms + self.rng.range(0, 40);
            self.schedule(at, Event::ClientNext(c));
        }
    }

    // ----- faults -----

    fn fault(&mut self) {
        if !self.faulty || self.now_ms >= self.cfg.workload_ms {
            return;
        }
        let mut kinds = Vec::new();
        if self.cfg.crashes {
            kinds.push(0);
        }
        if self.cfg.partitions {
            kinds.push(1);
        }
        if self.cfg.swizzle {
            kinds.push(2);
        }
        match kinds.get(self.rng.index(kinds.len())) {
            Some(0) => self.crash(),
            Some(1) => self.partition(),
            Some(2) => self.swizzle(),
            _ => {}
        }
        let at = self.now_ms
            + self
                .rng
                .range(self.cfg.fault_every_ms.0, self.cfg.fault_every_ms.1);
        self.schedule(at, Event::Fault);
    }

    fn power_losses_possible(&self) -> bool {
        self.cfg.crashes && self.cfg.power_loss && self.cfg.durability == Durability::Sync
    }

    fn crash(&mut self) {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect();
        if live.is_empty() {
            return;
        }
        let i = live[self.rng.index(live.len())];
        let kind = if self.wipes_left > 0 && self.rng.chance(0.25) {
            self.wipes_left -= 1;
            CrashKind::Wipe
        } else if self.power_losses_possible() && self.rng.chance(0.6) {
            CrashKind::PowerLoss
        } else {
            CrashKind::Kill
        };
        let incarnation = self.rng.next_u64();
        if let Some(node) = self.nodes[i].take() {
            self.report.faults += 1;
            self.disks[i] = Some(node.crash(kind, &mut self.rng, incarnation));
            let at = self.now_ms + self.rng.range(50, 3_000);
            self.schedule(at, Event::Restart(i));
        }
    }

    fn restart(&mut self, i: usize) {
        if self.nodes[i].is_some() {
            return;
        }
        if let Some(disk) = self.disks[i].take() {
            self.lives[i] += 1;
            self.nodes[i] = Some(SimNode::boot(
                &self.names[i],
                &self.initial,
                self.node_cfgs[i].clone(),
                disk,
                self.lives[i],
                self.now_ms,
            ));
            // The earlier life's ticks are stale.
            self.armed[i] = None;
            self.arm_tick(i);
        }
    }

    fn shuffled(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.rng.index(i + 1);
            v.swap(i, j);
        }
        v
    }

    fn partition(&mut self) {
        let order = self.shuffled(self.nodes.len());
        let split = self.rng.range(1, order.len() as u64 - 1) as usize;
        let (a, b) = order.split_at(split);
        let one_way = self.cfg.one_way && self.rng.chance(0.5);
        let mut links = Vec::new();
        for &x in a {
            for &y in b {
                links.push((x, y));
                if !one_way {
                    links.push((y, x));
                }
            }
        }
        self.report.faults += 1;
        let now = self.now_ms;
        self.handle(Event::Cut(links.clone()));
        let at = now + self.rng.range(200, 4_000);
        self.schedule(at, Event::Restore(links));
    }

    fn swizzle(&mut self) {
        let n = self.nodes.len();
        let mut links: Vec<(usize, usize)> = Vec::new();
        for x in 0..n {
            for y in 0..n {
                if x != y && self.rng.chance(0.3) {
                    links.push((x, y));
                }
            }
        }
        self.report.faults += 1;
        let mut at = self.now_ms;
        for &l in &links {
            at += self.rng.range(20, 200);
            self.schedule(at, Event::Cut(vec![l]));
        }
        let order = self.shuffled(links.len());
        for k in order {
            at += self.rng.range(20, 400);
            self.schedule(at, Event::Restore(vec![links[k]]));
        }
    }

    // ----- membership -----

    /// Commits the next join or leave on a random live node, once every node that is up
    /// holds the previous ring (one change spreading at a time; handoff of earlier changes
    /// may still run, and always follows each node's current ring).
    fn membership_change(&mut self) {
        let version = self.committed.version();
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect();
        if live.is_empty() {
            let at = self.now_ms + 250;
            self.schedule(at, Event::Membership);
            return;
        }
        // A commit is stored on the committer's disk and pushed from there (production
        // answers once it is stored locally). If that disk was replaced before any push
        // got through, the commit is gone: the operator (`quiver cluster status` shows the
        // ring version) commits it again.
        let held = (0..self.nodes.len()).any(|i| {
            let on_node = self.nodes[i].as_ref().map(|n| n.ring().version());
            let on_disk = self.disks[i]
                .as_ref()
                .and_then(|d| d.meta.as_ref())
                .and_then(|m| m.ring.as_ref())
                .map(|e| e.ring.version());
            on_node.or(on_disk) == Some(version)
        });
        if !held {
            let committer = live[self.rng.index(live.len())];
            let states = self.states.clone();
            let ring = Arc::clone(&self.committed);
            let now = self.now_ms;
            if let Some(node) = self.nodes[committer].as_mut() {
                let fx = node.commit(now, ring, &states);
                self.effects(committer, fx);
            }
        }
        let behind = live
            .iter()
            .any(|&i| self.nodes[i].as_ref().map(|n| n.ring().version()) != Some(version));
        if behind {
            let at = self.now_ms + 250;
            self.schedule(at, Event::Membership);
            return;
        }
        if self.changes_left == 0 || self.now_ms >= self.cfg.workload_ms {
            return;
        }
        let in_ring: Vec<NodeId> = self
            .committed
            .members()
            .iter()
            .map(|m| m.id.clone())
            .collect();
        let joiners: Vec<NodeId> = self
            .states
            .iter()
            .filter(|(_, s)| **s == MemberState::Joining)
            .map(|(id, _)| id.clone())
            .collect();
        // A leave keeps at least n members, so every key keeps n distinct primaries.
        let leavers: Vec<NodeId> = if in_ring.len() > self.cfg.n {
            in_ring.clone()
        } else {
            Vec::new()
        };
        let join = match (joiners.is_empty(), leavers.is_empty()) {
            (true, true) => {
                self.changes_left = 0;
                return;
            }
            (false, true) => true,
            (true, false) => false,
            (false, false) => self.rng.chance(0.5),
        };
        let (id, state, members) = if join {
            let id = joiners[self.rng.index(joiners.len())].clone();
            let mut members = in_ring;
            members.push(id.clone());
            (id, MemberState::Valid, members)
        } else {
            let id = leavers[self.rng.index(leavers.len())].clone();
            let members = in_ring.into_iter().filter(|m| *m != id).collect();
            (id, MemberState::Leaving, members)
        };
        let next = match self
            .committed
            .rebalance(members.iter().map(Member::new).collect())
        {
            Ok(ring) => Arc::new(ring),
            Err(_) => {
                // The core refuses this ring (it never should for these sizes): skip it.
                self.changes_left -= 1;
                return;
            }
        };
        let committer = live[self.rng.index(live.len())];
        self.states.insert(id.clone(), state);
        self.committed = Arc::clone(&next);
        self.changes_left -= 1;
        self.report.ring_changes += 1;
        let now = self.now_ms;
        if let Some(node) = self.nodes[committer].as_mut() {
            let fx = node.commit(now, next, &BTreeMap::from([(id, state)]));
            self.effects(committer, fx);
        }
        // The next change waits at least a while, and until this one has spread.
        let at = now + self.rng.range(1_000, 3_000);
        self.schedule(at, Event::Membership);
    }

    /// Node `i` left the cluster: it stops for good, its disk goes with it.
    fn depart(&mut self, i: usize) {
        let Some(node) = self.nodes[i].take() else {
            return;
        };
        let name = self.names[i].clone();
        let tables = node.tables();
        if !tables.records.is_empty() || !tables.hints.is_empty() {
            self.bad_departures.push(format!(
                "node {name} departed holding {} record(s) {:?} and {} hint(s)",
                tables.records.len(),
                tables.records.keys().collect::<Vec<_>>(),
                tables.hints.len()
            ));
        }
        if self.states.get(&name) != Some(&MemberState::Leaving) {
            self.bad_departures.push(format!(
                "node {name} departed although it was {:?}",
                self.states.get(&name)
            ));
        }
        self.states.insert(name, MemberState::Left);
        self.departed[i] = true;
        self.disks[i] = None;
        self.report.departures += 1;
    }

    /// (node, ring version, nodes it knows left) of every node that is up.
    fn views(&self) -> Vec<(String, u64, Vec<String>)> {
        self.nodes
            .iter()
            .flatten()
            .map(|n| {
                let left = n
                    .meta()
                    .members
                    .iter()
                    .filter(|(_, e)| e.state == MemberState::Left)
                    .map(|(id, _)| id.clone())
                    .collect();
                (n.name().to_string(), n.ring().version(), left)
            })
            .collect()
    }

    fn check_membership(&self) -> Result<(), String> {
        let must_depart: Vec<String> = self
            .states
            .iter()
            .filter(|(_, s)| **s == MemberState::Leaving)
            .map(|(id, _)| id.clone())
            .collect();
        let departed: Vec<String> = (0..self.names.len())
            .filter(|&i| self.departed[i])
            .map(|i| self.names[i].clone())
            .collect();
        check::membership_settled(
            &self.views(),
            self.committed.version(),
            &must_depart,
            &departed,
        )
    }

    fn check_orphans(&self) -> Result<(), String> {
        let holdings: Vec<(String, String)> = self
            .nodes
            .iter()
            .flatten()
            .flat_map(|n| {
                n.tables()
                    .records
                    .into_keys()
                    .map(|k| (n.name().to_string(), k))
            })
            .collect();
        let primaries: BTreeMap<String, Vec<String>> = holdings
            .iter()
            .map(|(_, k)| {
                let list = self
                    .committed
                    .preference_list_for_key(BUCKET.as_bytes(), k.as_bytes(), self.cfg.n)
                    .primaries
                    .iter()
                    .map(|m| m.id.clone())
                    .collect();
                (k.clone(), list)
            })
            .collect();
        check::no_orphan_copies(&holdings, &primaries, &self.bad_departures)
    }

    // ----- checks -----

    fn check(&self) -> Result<(), (Checker, String)> {
        let acked: Vec<AckedWrite> = self
            .history
            .iter()
            .filter(|op| !op.exempt)
            .filter_map(|op| match (&op.outcome, op.client) {
                (Outcome::Written(dot), Some(client)) => Some(AckedWrite {
                    client,
                    key: op.key.clone(),
                    dot: dot.clone(),
                    value: op.value.clone(),
                    acked_ms: op.end_ms,
                }),
                _ => None,
            })
            .collect();
        check::unique_dots(&self.issued).map_err(|m| (Checker::DuplicateDot, m))?;
        let mut full: BTreeMap<String, Object> = BTreeMap::new();
        let mut replicas: BTreeMap<String, Vec<(String, Object)>> = BTreeMap::new();
        for k in 0..self.cfg.keys {
            let key = self.key(k);
            let mut merged = Object::new();
            for i in 0..self.nodes.len() {
                merged = merged.merge(&self.object_on(i, &key));
            }
            full.insert(key.clone(), merged);
            let copies = self
                .primaries(&key)
                .into_iter()
                .map(|i| (self.names[i].clone(), self.object_on(i, &key)))
                .collect();
            replicas.insert(key, copies);
        }
        for node in self.nodes.iter().flatten() {
            node.check_ae_index().map_err(|m| (Checker::AeIndex, m))?;
        }
        check::no_lost_writes(&full, &acked, &self.issued, &self.reaped)
            .map_err(|m| (Checker::LostWrite, m))?;
        check::no_resurrection(&full, &acked, &self.issued)
            .map_err(|m| (Checker::Resurrection, m))?;
        let hints: Vec<(String, String, String)> = self
            .nodes
            .iter()
            .flatten()
            .flat_map(|n| {
                n.tables()
                    .hints
                    .into_iter()
                    .map(|(o, k)| (n.name().to_string(), o, k))
            })
            .collect();
        check::hints_drained(&hints).map_err(|m| (Checker::HintsDrain, m))?;
        self.check_membership()
            .map_err(|m| (Checker::Membership, m))?;
        check::convergence(&replicas, &acked, &self.issued, &self.reaped)
            .map_err(|m| (Checker::Convergence, m))?;
        self.check_orphans().map_err(|m| (Checker::Orphans, m))?;
        if let (Some(grace), Some(paused)) = (self.reaping_grace(), self.reaping_paused_ms) {
            // (node, key, simulated ms at which the node stored its tombstone state): hold
            // times are each node's own, so skew does not enter the deadline.
            let held: Vec<(String, String, u64)> = self
                .nodes
                .iter()
                .flatten()
                .flat_map(|n| {
                    n.tombstones_held_since()
                        .into_iter()
                        .map(|(k, t)| (n.name().to_string(), k, t))
                })
                .collect();
            let deadline = paused.saturating_sub(REAP_DEADLINE_SLACK_MS + grace);
            check::tombstones_reaped(&held, deadline)
                .map_err(|m| (Checker::TombstonesReaped, m))?;
        }
        let _ = self.seed;
        Ok(())
    }
}

/// The simulation's key name of a key the node reports (its clients write UTF-8 names to
/// one bucket).
fn sim_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}
