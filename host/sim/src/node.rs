//! One simulated node: the production node machine (`quiver_node_core::node::Node`) on a
//! simulated disk and a simulated, skewed wall clock.
//!
//! This module holds no request handling and no protocol types: every decision and every
//! message is the machine's. What it adds is what a real machine adds around a process —
//! the disk and what it keeps after a crash ([`crate::store`]), the OS writing buffered
//! data back on its own schedule, and a wall clock that may be off — plus the checkers'
//! views of a node (its tables, its tombstone hold times, a rebuild of its anti-entropy
//! index).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quiver_core::causality::Object;
use quiver_core::membership::MemberState;
use quiver_core::meta::MetaState;
use quiver_core::ring::Ring;
use quiver_core::storage::{StorageEngine, WriteBatch, keys};
use quiver_node_core::WallClock;
use quiver_node_core::ae::{AeIndex, TreeId};
use quiver_node_core::broken::{Broken, Variant};
pub use quiver_node_core::node::{
    AE_MAX_KEYS, Durability, Effect, Message, Node, NodeConfig, NodeId, Observation, PluginError,
    PluginOutput, Ticket, is_tombstone,
};
pub use quiver_node_core::protocol::{PeerRequest, PeerResponse};
use quiver_sdk::wire::Request;

use crate::disk::SimDisk;
use crate::rng::Rng;
use crate::store::{CrashKind, Disk, Tables};

/// The single bucket the simulation writes to (placement hashes bucket and key).
pub const BUCKET: &str = "sim";

/// Wall-clock ms at simulated time 0, so sibling timestamps look like real ones.
pub const WALL_CLOCK_BASE_MS: i64 = 1_800_000_000_000;

/// Largest value the simulated clients write (production default: 1 MiB).
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// Largest answer to a read (production default: 64 MiB).
pub const RESPONSE_BYTES_MAX: u64 = 64 << 20;

/// What the simulator sets for one node: the machine's settings plus the machine around
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimNodeConfig {
    /// The node machine's settings.
    pub node: NodeConfig,
    /// Interval of the OS writing buffered data back, in ms.
    pub writeback_every_ms: u64,
    /// Offset of this node's wall clock from true time, in ms (only sibling timestamps
    /// and hold times see it; causality must not).
    pub clock_skew_ms: i64,
}

/// Rules the simulator found missing from the first version of production's membership
/// handling; production has all of them now. Each is on in every scenario; turning one off
/// (it maps to a [`Variant`] of node-core's rules) reproduces the first version, which a
/// test shows losing data or never settling on a fixed seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipFixes {
    /// Drop hint markers for members known to have left; the copy stays and, if this node
    /// is not a primary of the key, goes out by ownership handoff. Without it hints never
    /// drain, and a leaving node holding one never departs.
    pub forget_hints_for_left: bool,
    /// A handoff pass checks for a ring change against the ring its trees' primaries came
    /// from (the pass start). Taking the ring version at the start of each tree instead
    /// hands a tree to the old ring's primaries and still drops it.
    pub pass_ring_version: bool,
    /// A primary answers a handoff step only when the sender holds the same ring.
    /// Otherwise two nodes on different rings can each count the other as the key's
    /// primary and both drop it.
    pub handoff_same_ring: bool,
    /// A member whose ring differs from the reaper's does not confirm a reaping check.
    /// Otherwise a member on an older ring, which still counts itself a replica of the
    /// key, confirms without holding the tombstone.
    pub reap_check_same_ring: bool,
    /// A leaving node checks again that it holds no keys and no hints when the news that
    /// it left was taken, just before it stops. Checking only before sending it lets a
    /// store from a coordinator on an older ring that lands meanwhile leave with it.
    pub depart_recheck: bool,
    /// A leaving node stops only once every peer took the news that it left. Stopping once
    /// one did fails when that peer leaves too (or its disk is replaced) before it gossips:
    /// nobody knows the node left and the rest wait for it forever.
    pub depart_when_all_told: bool,
}

impl MembershipFixes {
    /// Every fix on (the simulator's default).
    pub const ALL: MembershipFixes = MembershipFixes {
        forget_hints_for_left: true,
        pass_ring_version: true,
        handoff_same_ring: true,
        reap_check_same_ring: true,
        depart_recheck: true,
        depart_when_all_told: true,
    };

    /// The first version of production's rules: every fix off.
    pub const NONE: MembershipFixes = MembershipFixes {
        forget_hints_for_left: false,
        pass_ring_version: false,
        handoff_same_ring: false,
        reap_check_same_ring: false,
        depart_recheck: false,
        depart_when_all_told: false,
    };

    /// The broken variants of node-core's rules that the fixes turned off stand for.
    pub fn broken(&self) -> Broken {
        [
            (!self.forget_hints_for_left, Variant::KeepHintsForLeft),
            (!self.pass_ring_version, Variant::TreeRingVersion),
            (!self.handoff_same_ring, Variant::HandoffAnyRing),
            (!self.reap_check_same_ring, Variant::ReapCheckAnyRing),
            (!self.depart_recheck, Variant::DepartNoRecheck),
            (!self.depart_when_all_told, Variant::DepartWhenOneTold),
        ]
        .into_iter()
        .fold(Broken::NONE, |b, (on, v)| b.set(v, on))
    }
}

/// A node's wall clock: simulated time plus the node's skew, set before every input.
#[derive(Debug, Default)]
struct SimClock(AtomicU64);

impl WallClock for SimClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A node's wall clock at simulated time `now_ms`: the run's base time plus the skew.
fn wall_ms(skew_ms: i64, now_ms: u64) -> u64 {
    let t = WALL_CLOCK_BASE_MS + now_ms as i64 + skew_ms;
    u64::try_from(t).unwrap_or(0)
}

/// The production node machine on a simulated disk and clock. Reads go to the machine
/// (through `Deref`); inputs go through here, which sets the clock first.
#[derive(Debug)]
pub struct SimNode {
    node: Node<Disk>,
    clock: Arc<SimClock>,
    cfg: SimNodeConfig,
    next_writeback_ms: u64,
}

impl Deref for SimNode {
    type Target = Node<Disk>;

    fn deref(&self) -> &Node<Disk> {
        &self.node
    }
}

impl DerefMut for SimNode {
    fn deref_mut(&mut self) -> &mut Node<Disk> {
        &mut self.node
    }
}

impl SimNode {
    /// Boots the node machine over `disk` (see `Node::boot`).
    pub fn boot(
        name: &str,
        initial: &MetaState,
        cfg: SimNodeConfig,
        disk: Disk,
        life: u64,
        now_ms: u64,
    ) -> SimNode {
        let clock = Arc::new(SimClock::default());
        clock
            .0
            .store(wall_ms(cfg.clock_skew_ms, now_ms), Ordering::Relaxed);
        // The simulated disk fails nothing at boot, and the initial metadata holds a ring.
        let node = Node::boot(
            name,
            initial,
            cfg.node.clone(),
            disk,
            Arc::clone(&clock) as Arc<dyn WallClock>,
            life,
            now_ms,
        )
        .expect("a simulated node boots");
        SimNode {
            node,
            clock,
            next_writeback_ms: now_ms + cfg.writeback_every_ms,
            cfg,
        }
    }

    fn set_clock(&self, now_ms: u64) {
        let wall = wall_ms(self.cfg.clock_skew_ms, now_ms);
        self.clock.0.store(wall, Ordering::Relaxed);
    }

    /// A client request arrived.
    pub fn on_client(&mut self, now_ms: u64, ticket: Ticket, request: Request) -> Vec<Effect> {
        self.set_clock(now_ms);
        self.node.on_client(now_ms, ticket, request)
    }

    /// A peer message arrived.
    pub fn on_message(&mut self, now_ms: u64, from: &str, msg: Message) -> Vec<Effect> {
        self.set_clock(now_ms);
        self.node.on_message(now_ms, from, msg)
    }

    /// Time passed: the machine's tick, then the OS writes buffered data back when due.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<Effect> {
        self.set_clock(now_ms);
        let fx = self.node.on_tick(now_ms);
        if now_ms >= self.next_writeback_ms {
            self.node
                .disk()
                .engine
                .sync()
                .expect("the simulated disk fails no sync unless told to");
            self.next_writeback_ms = now_ms + self.cfg.writeback_every_ms;
        }
        fx
    }

    /// When the node next has something to do on a tick: the machine's next deadline, or
    /// the OS writing buffered data back.
    pub fn next_deadline(&self) -> u64 {
        self.node
            .next_deadline()
            .map_or(self.next_writeback_ms, |d| d.min(self.next_writeback_ms))
    }

    /// The driver ran reconciler call `call` (the simulation attaches none).
    pub fn on_plugin_done(
        &mut self,
        now_ms: u64,
        call: u64,
        result: Result<PluginOutput, PluginError>,
    ) -> Vec<Effect> {
        self.set_clock(now_ms);
        self.node.on_plugin_done(now_ms, call, result)
    }

    /// An operator committed a membership change on this node.
    pub fn commit(
        &mut self,
        now_ms: u64,
        ring: Arc<Ring>,
        states: &BTreeMap<NodeId, MemberState>,
    ) -> Vec<Effect> {
        self.set_clock(now_ms);
        self.node
            .commit(now_ms, ring, states, &crate::store::sim_addr)
    }

    /// A sync the node asked for with `Effect::Sync` is done: the disk makes everything
    /// applied so far durable (at least what was applied when the node asked), and the
    /// node goes on.
    pub fn on_synced(&mut self, now_ms: u64, token: u64) -> Vec<Effect> {
        self.set_clock(now_ms);
        let result = self.node.disk().engine.sync().map_err(|e| e.to_string());
        self.node.on_synced(now_ms, token, result)
    }

    /// The node goes down: in-memory state is lost, the disk keeps what `kind` allows.
    pub fn crash(self, kind: CrashKind, rng: &mut Rng, new_incarnation: u64) -> Disk {
        self.node.into_disk().crash(kind, rng, new_incarnation)
    }

    /// This node's state of the simulation's `key` (empty when it holds none).
    pub fn object(&self, key: &str) -> Object {
        self.node
            .local_object(BUCKET, key.as_bytes())
            .expect("a live node's records are readable")
    }

    /// The node's records, hint markers and tombstone index as readers see them, decoded
    /// from its disk (for the checkers: it reads the whole disk).
    pub fn tables(&self) -> Tables {
        Tables::read(&self.node.disk().engine).expect("a live node's disk is readable")
    }

    /// Tombstone-only states this node holds: (key, simulated ms at which it stored the
    /// state), for the liveness check of reaping.
    pub fn tombstones_held_since(&self) -> Vec<(String, u64)> {
        let offset = WALL_CLOCK_BASE_MS + self.cfg.clock_skew_ms;
        self.tables()
            .tombstones
            .iter()
            .map(|(k, &t)| (k.clone(), u64::try_from(t as i64 - offset).unwrap_or(0)))
            .collect()
    }

    /// Checks that the trees match the records the node holds (the index never drifts):
    /// an index rebuilt from the records alone, on a fresh disk, has the same roots.
    pub fn check_ae_index(&self) -> Result<(), String> {
        let fresh_disk = SimDisk::new();
        let data = self
            .node
            .disk()
            .engine
            .scan(
                &[keys::DATA_PREFIX],
                Some(&[keys::DATA_PREFIX + 1]),
                usize::MAX,
            )
            .map_err(|e| e.to_string())?;
        let mut batch = WriteBatch::new();
        for (k, v) in data {
            batch.put(k, v);
        }
        fresh_disk.apply(&batch).map_err(|e| e.to_string())?;
        // On the node's simulated clock: the simulator reads no real clock.
        let fresh = AeIndex::with_clock(Arc::clone(&self.clock) as Arc<dyn WallClock>);
        fresh.set_placement(self.node.placement());
        fresh.open(&fresh_disk).map_err(|e| e.to_string())?;
        let live = self.node.replica().ae();
        let ids: BTreeSet<TreeId> = live
            .tree_ids()
            .into_iter()
            .chain(fresh.tree_ids())
            .collect();
        let name = self.node.name();
        for id in ids {
            if live.root(id) != fresh.root(id) {
                return Err(format!(
                    "node {name}: anti-entropy index: tree {id:?} has a root the records do not give"
                ));
            }
        }
        if live.keys() != fresh.keys() {
            return Err(format!(
                "node {name}: anti-entropy index: {} keys filed, the records give {}",
                live.keys(),
                fresh.keys()
            ));
        }
        Ok(())
    }
}
