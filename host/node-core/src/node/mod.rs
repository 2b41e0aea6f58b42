//! One node as a single sans-IO state machine: the glue around node-core's machines that
//! both drivers need — which call each reply belongs to, peer-call deadlines, probes,
//! forwarding retries, the tick schedule of hint delivery, anti-entropy, reaping, gossip
//! and handoff.
//!
//! # Driver contract
//!
//! A [`Node`] never reads a clock, never draws randomness from the OS and never does I/O
//! except through its [`NodeDisk`] (a [`StorageEngine`] plus the node's cluster metadata)
//! and the [`WallClock`] it is given. The driver feeds it inputs, each with the current
//! monotonic time in ms, and carries out the [`Effect`]s it returns (raft-rs `RawNode` /
//! quinn-proto `Connection` style):
//!
//! - [`Node::on_client`]: a client request arrived;
//! - [`Node::on_message`]: a peer message arrived (a request, or the response to a call
//!   this node made);
//! - [`Node::on_tick`]: time passed: peer-call deadlines expire, down peers are probed,
//!   hints are handed off, anti-entropy and reaping run, membership is gossiped, ownership
//!   is handed off;
//! - [`Node::commit`]: an operator committed a membership change on this node;
//! - [`Node::on_synced`]: a sync the node asked for is done (or failed);
//! - [`Node::on_plugin_done`]: a reconciler call the node asked for is done;
//! - [`Node::on_call_failed`]: the driver could not carry a call to a peer.
//!
//! Each node routes by the ring of its own [`MetaState`], which gossip brings up to date
//! (`node/membership.rs`), so nodes disagree while a change spreads.
//!
//! Every decision is one of node-core's machines — [`crate::request`] (`plan_write`, `Put`,
//! `Get`, `apply_store`), [`crate::hints::HintPass`], [`crate::exchange`],
//! [`crate::reap`], [`crate::handoff`] and [`crate::membership`] — over the production
//! [`Replica`]. Nodes speak the production peer protocol ([`crate::protocol`]) and clients
//! the SDK's `Request`/`Response`. Where an async driver would await, this machine keeps
//! an explicit pending operation (`PutOp`, `GetOp`, `ForwardOp`, the passes in flight) and
//! the answer comes back as a later input, with others in between.
//!
//! # Today's drivers
//!
//! The simulator (`quiver-sim`) drives this machine for every seed. The QUIC server still
//! runs its own async glue (`host/node/src/cluster*.rs`) around the same inner machines;
//! making it a driver of this one is the next step of issue 12 (see
//! `docs/decisions/simulation.md`). The machine serves every bucket with its replication
//! properties (configuration overlaid by the bucket's spec in the metadata) and asks its
//! driver to run reconciler plugins ([`Effect::Plugin`], `node/plugin.rs`).
//!
//! # Durability
//!
//! Writes are applied inside the machine (one batch each, through the replica); making them
//! durable is the driver's. Where the node owes durability before it goes on, it emits
//! [`Effect::Sync`] and parks the rest until [`Node::on_synced`] (raft-rs's `Ready` rule:
//! these messages go out only after this sync), unless its disk syncs inline
//! ([`NodeDisk::sync_inline`], the simulator's). A failed sync becomes an error answer.
//!
//! [`StorageEngine`]: quiver_core::storage::StorageEngine

mod ae;
mod calls;
mod client;
mod io;
mod membership;
mod peer;
mod plugin;
mod sync;

use std::collections::BTreeMap;
use std::sync::Arc;

use quiver_core::causality::Coordinator;
use quiver_core::coordinator::FailureDetector;
use quiver_core::meta::MetaState;
use quiver_core::quorum::Quorum;
use quiver_core::ring::Ring;
use quiver_core::storage::{StorageEngine, StorageError};
use quiver_sdk::wire::Request;

use crate::WallClock;
use crate::broken::Broken;
use crate::buckets::BucketProps;
use crate::epochs::BootEpochs;
use crate::exchange::AeLease;
use crate::hints::HintPass;
use crate::protocol::{PeerRequest, PeerResponse};
use crate::replica::{HINTS_MAX_DEFAULT, Replica};

pub use ae::{AE_MAX_KEYS, TreeId, is_tombstone};
pub use io::{Effect, Message, Observation};
pub use plugin::{PluginError, PluginOutput, PluginWork, UPDATE_ATTEMPTS_MAX};

use calls::{Call, CallError, Origin, Purpose};
use client::{ForwardOp, GetOp, PutOp};
use sync::AfterSync;

/// Bits of a call id that count calls within one life of a node; the rest is the life, so
/// a response to a call of a previous life can never complete a call of this one.
const CALL_ID_BITS_PER_LIFE: u32 = 40;

/// A node's name, as in the ring.
pub type NodeId = String;
/// Identifies one client request for the driver.
pub type Ticket = u64;

/// Durability of client writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Durability {
    /// Acknowledge after fsync.
    Sync,
    /// Acknowledge once applied (process-crash safe, not power-loss safe).
    Buffered,
}

/// What a node keeps on its disk: the storage engine its replica writes to, and its
/// cluster metadata (members and the committed ring), which must be durable as soon as it
/// is stored (production's `MetaStore` fsyncs a change before applying it).
pub trait NodeDisk: std::fmt::Debug + Send + Sync {
    /// The engine the node's replica reads and writes.
    fn engine(&self) -> Arc<dyn StorageEngine>;
    /// The incarnation a first boot on this disk records (a fresh identity after amnesia).
    fn fresh_incarnation(&self) -> u64;
    /// The cluster metadata this disk stored last, if any.
    fn meta(&self) -> Option<&MetaState>;
    /// Stores `meta` durably.
    fn store_meta(&mut self, meta: MetaState);
    /// Makes everything applied so far durable at once and says how that went, if this
    /// disk syncs inline (the simulator's); `None` has the node ask for the sync with
    /// [`Effect::Sync`] and go on when [`Node::on_synced`] reports it (the server's group
    /// commit).
    fn sync_inline(&self) -> Option<Result<(), String>>;
}

/// Why a node cannot boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The disk failed.
    #[error("cannot boot: {0}")]
    Storage(#[from] StorageError),
    /// The boot counter or the incarnation cannot be read or recorded.
    #[error("cannot boot: {0}")]
    Epochs(#[from] crate::epochs::EpochError),
    /// Neither the disk nor the initial metadata holds a ring.
    #[error("cannot boot: no ring in the node's metadata")]
    NoRing,
}

/// Settings of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Default n/r/w.
    pub quorum: Quorum,
    /// Sloppy quorum with hinted handoff.
    pub sloppy: bool,
    /// Buckets the configuration gives their own properties (a bucket's spec in the
    /// metadata overlays them).
    pub buckets: BTreeMap<String, BucketProps>,
    /// Durability of client writes that do not ask for one.
    pub durability: Durability,
    /// Largest value a client may write, in bytes.
    pub value_bytes_max: usize,
    /// Largest answer to a read, in bytes (values plus an allowance per sibling).
    pub response_bytes_max: u64,
    /// Deadline of one peer call, in ms (production: `peer_timeout_ms`).
    pub peer_timeout_ms: u64,
    /// Deadline of a forwarded write, in ms (production: `request_timeout_ms`).
    pub forward_timeout_ms: u64,
    /// Interval between hint-delivery passes, in ms (production: 500).
    pub hints_every_ms: u64,
    /// Read repair after reads (production: `--read-repair`, on by default).
    pub read_repair: bool,
    /// Gets per thousand that ask every replica when read repair is on; the others ask R
    /// (production: `--read-repair-chance`, default 100).
    pub full_reads_per_mille: u32,
    /// Delay after which a get short of R replies asks a replica it left out, in ms;
    /// `None` off (production: `--read-speculate-ms`, default 20).
    pub read_speculate_ms: Option<u64>,
    /// Interval of anti-entropy ticks (one exchange, one reaping pass), in ms; `None` off.
    pub ae_every_ms: Option<u64>,
    /// Tombstone grace period: how long every replica must have held a tombstone state,
    /// each measured on its own clock, before it is reaped; `None` never reaps.
    pub tombstone_grace_ms: Option<u64>,
    /// Interval of membership gossip rounds, in ms (production: `--gossip-interval-ms`).
    pub gossip_every_ms: u64,
    /// Interval between ownership handoff passes, in ms (production:
    /// `--handoff-interval-ms`).
    pub handoff_every_ms: u64,
    /// How long a handoff listing takes, in ms (production: a scan on the blocking pool,
    /// after an await); 0 lists at once.
    pub handoff_listing_ms: u64,
    /// Rules turned off or done the old way (only with the `broken-variants` feature; see
    /// [`crate::broken`]).
    pub broken: Broken,
}

/// One node's state machine. See the module docs for the driver contract.
#[derive(Debug)]
pub struct Node<D: NodeDisk> {
    cfg: NodeConfig,
    me: Coordinator,
    /// The cluster metadata this node knows: members and the committed ring (also on its
    /// disk).
    meta: MetaState,
    /// The ring this node routes and hands off by: `meta`'s (production: `Cluster::ring`).
    ring: Arc<Ring>,
    /// Members that have not left, this node excluded (production: `Peers::names`).
    peers: Vec<NodeId>,
    life: u64,
    /// The node's disk: the engine its replica writes to, and the cluster metadata.
    disk: D,
    /// The production replica: records, hint markers, the anti-entropy index and the
    /// tombstone index, over the disk's engine.
    replica: Replica,
    /// The wall clock the replica and the stamps read (the driver's).
    clock: Arc<dyn WallClock>,
    health: FailureDetector,
    next_call: u64,
    calls: BTreeMap<u64, Call>,
    next_op: u64,
    puts: BTreeMap<u64, PutOp>,
    /// Puts whose coordinator copy waits for the next tick's fsync.
    local_syncs: Vec<u64>,
    gets: BTreeMap<u64, GetOp>,
    forwards: BTreeMap<u64, ForwardOp>,
    hint_pass: Option<HintPass>,
    next_hint_pass_ms: u64,
    /// A peer came back up: deliver hints at the next tick, not at the next interval.
    hints_wanted: bool,
    exchange: Option<ae::Exchange>,
    /// This node's anti-entropy reservation (production: `Cluster::ae_lease`).
    ae_lease: AeLease,
    reap_pass: Option<ae::ReapPass>,
    next_ae_ms: u64,
    ae_next_peer: usize,
    next_bg: u64,
    reaping_paused: bool,
    next_gossip_ms: u64,
    gossip_next_peer: usize,
    /// Seeds this life's draws of gossip partners (from the name and the life: runs stay
    /// deterministic).
    gossip_seed: u64,
    handoff: Option<membership::Handoff>,
    next_handoff_ms: u64,
    /// The departure announcement in flight, if any.
    departing: Option<membership::Leaving>,
    /// Monotonic time of the input being handled.
    clock_ms: u64,
    /// What waits for each sync asked for with [`Effect::Sync`].
    syncs: BTreeMap<u64, AfterSync>,
    next_sync: u64,
    /// The anti-entropy placement changed (a bucket's n): keys are refiled a batch per
    /// tick.
    ae_refile_pending: bool,
    /// Counts changes of `meta` ([`Node::meta_generation`]).
    meta_generation: u64,
    /// Reconciler calls out with the driver, and what each is for.
    plugin_calls: BTreeMap<u64, plugin::Waiting>,
    next_plugin_call: u64,
    /// Keys (engine data keys) with an update in flight, and the updates queued behind it.
    updates: BTreeMap<Vec<u8>, plugin::UpdateQueue>,
}

impl<D: NodeDisk> Node<D> {
    /// Boots a node over `disk`: bumps the durable boot counter, so epochs of earlier boots
    /// are never continued. `life` must differ for every start of this node in a run (it
    /// keeps call ids unique). `initial` is the membership every node derives from its
    /// start-up flags (production: the `--peer` list); a disk that stored newer metadata
    /// keeps it. `clock` is the node's wall clock, which the driver keeps current.
    ///
    /// # Errors
    ///
    /// When the disk fails or the metadata holds no ring: a node that cannot record its
    /// boot must not serve.
    pub fn boot(
        name: &str,
        initial: &MetaState,
        cfg: NodeConfig,
        disk: D,
        clock: Arc<dyn WallClock>,
        life: u64,
        now_ms: u64,
    ) -> Result<Node<D>, BootError> {
        let mut disk = disk;
        let engine = disk.engine();
        // As the server: the boot counter (and a first incarnation) durable before any
        // epoch of this boot is handed out.
        let (epochs, boot) = BootEpochs::start(&*engine, disk.fresh_incarnation())?;
        engine.apply(&boot).and_then(|()| engine.sync())?;
        #[cfg(feature = "broken-variants")]
        let epochs = {
            let mut epochs = epochs;
            if cfg.broken.is(crate::broken::Variant::TrustAllEpochs) {
                epochs.trust_all_epochs();
            }
            epochs
        };
        let incarnation = epochs.incarnation();
        let meta = match disk.meta() {
            Some(m) => m.clone(),
            None => {
                // Production stores the first ring with the members at the first start.
                disk.store_meta(initial.clone());
                initial.clone()
            }
        };
        let ring = meta
            .ring
            .as_ref()
            .map(|entry| Arc::new(entry.ring.clone()))
            .ok_or(BootError::NoRing)?;
        let mut replica = Replica::new(
            name.to_string(),
            engine,
            epochs,
            cfg.value_bytes_max,
            Arc::clone(&clock),
        );
        replica.init_hints(HINTS_MAX_DEFAULT)?;
        let mut node = Node {
            me: Coordinator {
                node: name.to_string(),
                incarnation,
            },
            peers: Vec::new(),
            meta,
            ring,
            life,
            disk,
            replica,
            clock,
            health: FailureDetector::new(),
            next_call: 0,
            calls: BTreeMap::new(),
            next_op: 0,
            puts: BTreeMap::new(),
            local_syncs: Vec::new(),
            gets: BTreeMap::new(),
            forwards: BTreeMap::new(),
            hint_pass: None,
            next_hint_pass_ms: now_ms + cfg.hints_every_ms,
            hints_wanted: false,
            exchange: None,
            ae_lease: AeLease::default(),
            reap_pass: None,
            next_ae_ms: now_ms + cfg.ae_every_ms.unwrap_or(0),
            ae_next_peer: 0,
            next_bg: 0,
            reaping_paused: false,
            next_gossip_ms: now_ms + cfg.gossip_every_ms,
            gossip_next_peer: 0,
            gossip_seed: name
                .bytes()
                .fold(life.wrapping_mul(0x9e37_79b9_7f4a_7c15), |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
                }),
            handoff: None,
            next_handoff_ms: now_ms + cfg.handoff_every_ms,
            departing: None,
            clock_ms: now_ms,
            syncs: BTreeMap::new(),
            next_sync: 0,
            ae_refile_pending: false,
            meta_generation: 0,
            plugin_calls: BTreeMap::new(),
            next_plugin_call: 0,
            updates: BTreeMap::new(),
            // Last: the fields above read it.
            cfg,
        };
        node.apply_membership();
        node.rebuild_ae()?;
        Ok(node)
    }

    /// The ring this node routes and hands off by.
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// What this node knows about the membership.
    pub fn meta(&self) -> &MetaState {
        &self.meta
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.me.node
    }

    /// The node's disk (for the driver's checkers and its own disk model).
    pub fn disk(&self) -> &D {
        &self.disk
    }

    /// The node's replica (for checkers).
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// Hint markers held.
    pub fn hint_count(&self) -> usize {
        usize::try_from(self.replica.hint_count()).unwrap_or(usize::MAX)
    }

    /// Operations still waiting for replies (puts, gets incl. read repair, forwards).
    pub fn pending_ops(&self) -> usize {
        self.puts.len() + self.gets.len() + self.forwards.len()
    }

    /// Peers this node currently believes down.
    pub fn down_peers(&self) -> Vec<NodeId> {
        self.health.down()
    }

    /// The node stops: in-memory state is lost, the disk is the driver's again.
    pub fn into_disk(self) -> D {
        self.disk
    }

    /// A client request arrived.
    pub fn on_client(&mut self, now_ms: u64, ticket: Ticket, request: Request) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.set_clock(now_ms);
        self.handle_client(now_ms, Origin::Client(ticket), request, None, &mut fx);
        fx
    }

    /// A peer message arrived.
    pub fn on_message(&mut self, now_ms: u64, from: &str, msg: Message) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.set_clock(now_ms);
        match msg {
            Message::Request { id, body } => {
                // Production: `Peers::heard_from` on every stream a peer opens.
                self.health.on_heard_from(from, now_ms);
                self.handle_peer(now_ms, from, id, body, &mut fx)
            }
            Message::Response { id, body } => {
                // Unknown ids are late or duplicated responses: the call is already over.
                if self.calls.get(&id).is_some_and(|c| c.peer == from)
                    && let Some(call) = self.calls.remove(&id)
                {
                    if call.tracked {
                        self.mark_up(from, now_ms);
                    }
                    let peer = call.peer.clone();
                    let result = match body {
                        PeerResponse::Error(e) => Err(CallError::Refused(e)),
                        other => Ok(other),
                    };
                    self.dispatch(now_ms, &peer, call.purpose, result, &mut fx);
                }
            }
        }
        fx
    }

    /// The earliest time at which [`Node::on_tick`] has something to do (a call's
    /// deadline, a probe, a pass that falls due, a sync of the coordinator's copies, a
    /// read's speculation): a driver may sleep until then, or until its next input,
    /// instead of ticking on a fixed interval. `None` when nothing is scheduled.
    pub fn next_deadline(&self) -> Option<u64> {
        let now = self.clock_ms;
        let hints_wanted = self.hints_wanted && self.hint_pass.is_none();
        let soon =
            (!self.local_syncs.is_empty() || hints_wanted || self.ae_refile_pending).then_some(now);
        let calls = self.calls.values().map(|c| c.deadline_ms).min();
        let hints = self.hint_pass.is_none().then_some(self.next_hint_pass_ms);
        let reads = self.gets.values().filter_map(|g| g.get.deadline()).min();
        let ae = self.cfg.ae_every_ms.map(|_| self.next_ae_ms);
        let handoff = match &self.handoff {
            Some(h) => h.listing_due(),
            None => Some(self.next_handoff_ms),
        };
        [
            soon,
            calls,
            self.health.next_probe_ms(),
            hints,
            reads,
            ae,
            Some(self.next_gossip_ms),
            handoff,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The driver could not carry call `id` to `peer` (connection refused, reset or
    /// closed): the call fails now, as at its deadline, instead of waiting for it. Unknown
    /// ids (a call already answered or expired) are ignored.
    pub fn on_call_failed(
        &mut self,
        now_ms: u64,
        peer: &str,
        id: u64,
        reason: String,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.set_clock(now_ms);
        if self.calls.get(&id).is_some_and(|c| c.peer == peer) {
            self.fail_call(now_ms, id, CallError::Unreachable(reason), &mut fx);
        }
        fx
    }

    /// Call `id` got no answer: the failure detector hears of it when the call is
    /// tracked, then whatever waited for it.
    fn fail_call(&mut self, now_ms: u64, id: u64, error: CallError, fx: &mut Vec<Effect>) {
        let Some(call) = self.calls.remove(&id) else {
            return;
        };
        if call.tracked {
            self.mark_down(&call.peer, call.started_ms, now_ms);
            fx.push(Effect::Observe(Observation::PeerTimeout));
        }
        let peer = call.peer.clone();
        self.dispatch(now_ms, &peer, call.purpose, Err(error), fx);
    }

    /// Time passed: expire calls, probe down peers, hand off hints, run the background
    /// passes.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.set_clock(now_ms);
        if !self.local_syncs.is_empty() {
            // The coordinators' own fsyncs (group-committed): their copies count once done.
            let ops = std::mem::take(&mut self.local_syncs);
            self.sync_then(now_ms, AfterSync::LocalCopies(ops), &mut fx);
        }
        let expired: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.deadline_ms <= now_ms)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.fail_call(now_ms, id, CallError::Timeout, &mut fx);
        }
        for peer in self.health.due_probes(now_ms) {
            let purpose = Purpose::Probe;
            self.call(
                now_ms,
                &peer,
                PeerRequest::Ping,
                self.cfg.peer_timeout_ms,
                purpose,
                &mut fx,
            );
        }
        if self.hint_pass.is_none() && (now_ms >= self.next_hint_pass_ms || self.hints_wanted) {
            self.hints_wanted = false;
            self.forget_hints_for_left(now_ms, &mut fx);
            if self.hint_count() == 0 {
                self.next_hint_pass_ms = now_ms + self.cfg.hints_every_ms;
            } else {
                self.hint_pass = Some(HintPass::new(self.peers.iter().cloned()));
                self.hint_step(now_ms, &mut fx);
            }
        }
        self.speculate_reads(now_ms, &mut fx);
        self.ae_refile_batch();
        self.ae_tick(now_ms, &mut fx);
        self.gossip_tick(now_ms, &mut fx);
        self.handoff_tick(now_ms, &mut fx);
        fx
    }
}
