//! One simulated node: a driver of the production node's machines (`quiver-node-core`) as a
//! pure state machine, over the production replica on a simulated disk.
//!
//! # Shape
//!
//! A [`Node`] never reads a clock, never draws randomness and never does I/O. The driver
//! feeds it inputs, each with the current time in ms, and carries out the [`Effect`]s it
//! returns (raft-rs `RawNode` / quinn-proto `Connection` style):
//!
//! - [`Node::on_client`]: a client request arrived (production: `Cluster::handle_client`);
//! - [`Node::on_message`]: a peer message arrived (`Cluster::handle_peer` for requests, the
//!   completion of a `Peers::call` for responses);
//! - [`Node::on_tick`]: time passed: peer-call deadlines expire (production: the
//!   `tokio::time::timeout` in `Peers::call_within`), down peers are probed
//!   (`Peers::probe_down_peers`), hints are handed off (`Cluster::deliver_hints`),
//!   membership is gossiped, ownership is handed off (`Cluster::handoff_tick`), and the OS
//!   writes buffered data back;
//! - [`Node::commit`]: an operator committed a membership change on this node (production:
//!   `quiver cluster commit`).
//!
//! Each node routes by the ring of its own [`MetaState`] (on its disk), which gossip brings
//! up to date (`node::membership`), so nodes disagree while a change spreads, as in
//! production.
//!
//! Every decision is production code: the core's placement, quorum and failure-detector
//! rules, and node-core's machines — `request` (`plan_write`, `Put`, `Get`,
//! `apply_store`), `hints::HintPass`, `exchange`, `reap`, `handoff` and `membership` —
//! over the production `Replica` (records, hint markers, the anti-entropy and tombstone
//! indexes, `BootEpochs`). Nodes speak the production peer protocol
//! (`quiver_node_core::protocol`) and clients the SDK's `Request`/`Response`.
//!
//! What this module adds is what `cluster.rs` adds with tokio tasks: it carries messages
//! and remembers which call each reply belongs to. Where the production async code awaits,
//! this machine keeps an explicit pending operation (`PutOp`, `GetOp`, `ForwardOp`, the
//! passes in flight) and the answer comes back as a later event, with others in between.
//! That bookkeeping — pending calls, timeouts, probes, forwarding retries, the tick
//! schedule — is the part still written twice (issue 12).

mod ae;
mod membership;

use std::collections::BTreeMap;
use std::sync::Arc;

use quiver_core::causality::{self, Coordinator, Dot, Object, VersionVector, WriteOp};
use quiver_core::coordinator::{FailureDetector, Forwarding, ReadSpread};
use quiver_core::merkle::Hash;
use quiver_core::meta::MetaState;
use quiver_core::quorum::{Quorum, Target, select_targets};
use quiver_core::ring::Ring;
use quiver_core::storage::StorageEngine;

use quiver_node_core::WallClock;
use quiver_node_core::broken::{Broken, Variant};
use quiver_node_core::epochs::BootEpochs;
use quiver_node_core::exchange::AeLease;
use quiver_node_core::hints::{HintPass, HintStep, StoreReply};
use quiver_node_core::protocol::Inbound;
pub use quiver_node_core::protocol::{PeerRequest, PeerResponse};
use quiver_node_core::replica::{HINTS_MAX_DEFAULT, LocalWrite, Replica};
use quiver_node_core::request::{
    self, DataRequest, Get, GetArgs, Put, PutArgs, StoreRequest, WritePlan, forward_failed,
    plan_write, wire_siblings,
};
use quiver_sdk::wire::{ErrorCode, ErrorReply, Request, Response, WireDurability};

use crate::rng::Rng;
use crate::store::{CrashKind, Disk, Tables};

pub use ae::{AE_MAX_KEYS, TreeId, data_key, is_tombstone};

/// The single bucket the simulation writes to (placement hashes bucket and key).
pub const BUCKET: &str = "sim";
/// Wall-clock ms at simulated time 0, so sibling timestamps look like real ones.
pub const WALL_CLOCK_BASE_MS: i64 = 1_800_000_000_000;
/// Bits of a call id that count calls within one life of a node; the rest is the life, so
/// a response to a call of a previous life can never complete a call of this one.
const CALL_ID_BITS_PER_LIFE: u32 = 40;

/// A leaf's keys as an exchange lists them: `(data key, object digest)`, sorted.
pub type KeyList = Vec<(Vec<u8>, Hash)>;

/// A node's name, as in the ring.
pub type NodeId = String;
/// Identifies one client request for the driver.
pub type Ticket = u64;

/// A message on the simulated network: a frame of the production peer protocol
/// ([`PeerRequest`], [`PeerResponse`]) with the id that pairs a response with its request
/// (production: the QUIC stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A request; `id` is unique per sender across its lives.
    Request {
        /// Call id.
        id: u64,
        /// Body.
        body: PeerRequest,
    },
    /// The response to the request with this id.
    Response {
        /// Call id.
        id: u64,
        /// Body.
        body: PeerResponse,
    },
}

impl Message {
    /// The message as it goes on the wire (postcard, as the production frames carry it).
    pub fn encode(&self) -> Vec<u8> {
        // Postcard encodes plain enums, maps and byte strings of these types into a Vec
        // without failing.
        let body = match self {
            Message::Request { body, .. } => postcard::to_allocvec(body),
            Message::Response { body, .. } => postcard::to_allocvec(body),
        };
        body.unwrap_or_default()
    }
}

impl std::hash::Hash for Message {
    // The determinism trace hashes what goes on the wire: the production types carry maps
    // and rings that do not derive `Hash`.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (kind, id) = match self {
            Message::Request { id, .. } => (0u8, id),
            Message::Response { id, .. } => (1u8, id),
        };
        (kind, id).hash(state);
        self.encode().hash(state);
    }
}

/// Something a node reports for checkers and metrics (production: a log line).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Observation {
    /// `coordinate_write` issued a dot.
    DotIssued {
        /// Coordinator.
        node: NodeId,
        /// Key.
        key: String,
        /// The new dot.
        dot: Dot,
        /// The client context the write was applied with (what it replaced).
        context: VersionVector,
        /// Value written (empty for a tombstone).
        value: Vec<u8>,
    },
    /// A read sent its merge to a stale replica.
    ReadRepair,
    /// A read short of R replies at its speculation time asked a spare replica.
    SpeculativeRead,
    /// A fallback's hint was acknowledged by its owner and dropped.
    HintHandedOff,
    /// A peer call timed out and marked the peer down.
    PeerTimeout,
    /// An anti-entropy exchange completed (as initiator).
    AeExchange {
        /// Keys whose state changed here or at the peer.
        repaired: u64,
    },
    /// A tombstone was removed.
    Reaped {
        /// The node.
        node: NodeId,
        /// Key.
        key: String,
        /// The state removed.
        object: Object,
    },
    /// One tree of a handoff pass was offered to its primaries.
    Handoff {
        /// Keys pushed that changed a primary.
        sent: u64,
        /// Keys dropped here because every primary held them.
        dropped: u64,
    },
    /// This node left the cluster: it holds no keys and no hints, a peer took the news,
    /// and it stops (production: the server exits). The driver removes it for good.
    Departed,
}

/// What the driver must do for a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send a message to a peer.
    Send {
        /// Receiver.
        to: NodeId,
        /// Message.
        msg: Message,
    },
    /// Answer a client request that arrived through [`Node::on_client`].
    Reply {
        /// The request.
        ticket: Ticket,
        /// The answer, as production's client protocol gives it.
        result: Response,
    },
    /// Report an observation.
    Observe(Observation),
}

/// Durability of client writes (production: `storage::Durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Durability {
    /// Acknowledge after fsync.
    Sync,
    /// Acknowledge once applied (process-crash safe, not power-loss safe).
    Buffered,
}

/// Settings of a node, including the deliberately broken variants used to prove that the
/// checkers can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeConfig {
    /// Default n/r/w.
    pub quorum: Quorum,
    /// Sloppy quorum with hinted handoff.
    pub sloppy: bool,
    /// Durability of client writes.
    pub durability: Durability,
    /// Deadline of one peer call, in ms (production: `peer_timeout_ms`).
    pub peer_timeout_ms: u64,
    /// Deadline of a forwarded write, in ms (production: `request_timeout_ms`).
    pub forward_timeout_ms: u64,
    /// Interval between hint-delivery passes, in ms (production: 500).
    pub hints_every_ms: u64,
    /// Interval of the OS writing buffered data back, in ms.
    pub writeback_every_ms: u64,
    /// Offset of this node's wall clock from true time, in ms (only sibling timestamps
    /// see it; causality must not).
    pub clock_skew_ms: i64,
    /// BROKEN VARIANT: acknowledge a write after the coordinator's local write only.
    pub ack_before_quorum: bool,
    /// BROKEN VARIANT: trust every epoch found in a local record, even after a crash.
    pub trust_all_epochs: bool,
    /// Fsync a `sync` Store even when the merge changed nothing, as production's
    /// `KvService::merge_remote` does since the simulator's finding; `false` is the old,
    /// broken behaviour, which acknowledges data that may be buffered only (see the crate
    /// docs, "Findings").
    pub sync_unchanged_merges: bool,
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
    /// BROKEN VARIANT: reap without asking the other members (no "all members up", no
    /// digest, hold-time and hint check).
    pub reap_without_checks: bool,
    /// BROKEN VARIANT: answer `ReapCheck` (and check locally before reaping) without first
    /// making the applied writes durable.
    pub reap_check_without_sync: bool,
    /// Interval of membership gossip rounds (one peer each), in ms (production:
    /// `--gossip-interval-ms`).
    pub gossip_every_ms: u64,
    /// Interval between ownership handoff passes, in ms (production:
    /// `--handoff-interval-ms`).
    pub handoff_every_ms: u64,
    /// BROKEN VARIANT: count a handoff push as held by the primary as soon as it is sent,
    /// without waiting for the primary's durable acknowledgement, and drop the local copy.
    pub handoff_drop_before_ack: bool,
    /// BROKEN VARIANT: compare a primary's leaf hashes with this node's leaf hashes read
    /// when the tree's leaves were chosen (before the listing), not with the hashes of the
    /// keys as listed.
    pub leaf_hashes_as_now: bool,
    /// How long a handoff listing takes, in ms (production: a scan on the blocking pool,
    /// after an await); 0 lists at once.
    pub handoff_listing_ms: u64,
    /// Membership rules the simulator found missing at first (see [`MembershipFixes`]).
    pub fixes: MembershipFixes,
}

impl NodeConfig {
    /// The broken variants this configuration turns on, as the production state machines
    /// in `quiver-node-core` take them.
    pub fn broken(&self) -> Broken {
        let f = &self.fixes;
        [
            (self.ack_before_quorum, Variant::AckBeforeQuorum),
            (self.trust_all_epochs, Variant::TrustAllEpochs),
            (self.reap_without_checks, Variant::ReapWithoutChecks),
            (self.reap_check_without_sync, Variant::ReapCheckWithoutSync),
            (self.handoff_drop_before_ack, Variant::HandoffDropBeforeAck),
            (self.leaf_hashes_as_now, Variant::LeafHashesAsNow),
            (
                !self.sync_unchanged_merges,
                Variant::UnsyncedUnchangedMerges,
            ),
            (!f.forget_hints_for_left, Variant::KeepHintsForLeft),
            (!f.pass_ring_version, Variant::TreeRingVersion),
            (!f.handoff_same_ring, Variant::HandoffAnyRing),
            (!f.reap_check_same_ring, Variant::ReapCheckAnyRing),
            (!f.depart_recheck, Variant::DepartNoRecheck),
            (!f.depart_when_all_told, Variant::DepartWhenOneTold),
        ]
        .into_iter()
        .fold(Broken::NONE, |b, (on, v)| b.set(v, on))
    }
}

/// Rules the simulator found missing from the first version of production's membership
/// handling (`host/node/src/cluster/membership.rs`, `reap.rs`); production has all of them
/// now. Each is on in every scenario; turning one off reproduces the first version, which a
/// test shows losing data or never settling on a fixed seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipFixes {
    /// Drop hint markers for members known to have left; the copy stays and, if this node
    /// is not a primary of the key, goes out by ownership handoff (production:
    /// `forget_hints_for_departed`). Without it hints never drain, and a leaving node
    /// holding one never departs.
    pub forget_hints_for_left: bool,
    /// A handoff pass checks for a ring change against the ring its trees' primaries came
    /// from (the pass start; production: `handoff_tick` passes its ring to
    /// `hand_off_tree`). Taking the ring version at the start of each tree instead hands a
    /// tree to the old ring's primaries and still drops it.
    pub pass_ring_version: bool,
    /// A primary answers a handoff step only when the sender holds the same ring
    /// (production: `PeerRequest::OnRing`). Otherwise two nodes on different rings can each
    /// count the other as the key's primary and both drop it.
    pub handoff_same_ring: bool,
    /// A member whose ring differs from the reaper's does not confirm a reaping check
    /// (production: `OnRing` around `ReapCheck` and `Reap`). Otherwise a member on an older
    /// ring, which still counts itself a replica of the key, confirms without holding the
    /// tombstone.
    pub reap_check_same_ring: bool,
    /// A leaving node checks again that it holds no keys and no hints when the news that
    /// it left was taken, just before it stops. Checking only before sending it lets a
    /// store from a coordinator on an older ring that lands meanwhile leave with it.
    pub depart_recheck: bool,
    /// A leaving node stops only once every peer took the news that it left. Stopping once
    /// one did fails when that peer leaves too (or its disk is replaced) before it gossips:
    /// nobody knows the node left and the rest wait for it forever (it stays a member that
    /// is down, so reaping stays blocked).
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
}

/// A node's wall clock as its replica reads it (the tombstone index's hold times): the
/// simulated time of the input being handled, with the node's skew. The node sets it before
/// every input.
#[derive(Debug, Default)]
struct SimClock(std::sync::atomic::AtomicU64);

impl SimClock {
    fn set(&self, wall_ms: u64) {
        self.0.store(wall_ms, std::sync::atomic::Ordering::Relaxed);
    }
}

impl WallClock for SimClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Largest value the simulated clients write (production default: 1 MiB).
const VALUE_BYTES_MAX: usize = 1 << 20;

/// Who waits for the outcome of a client operation.
#[derive(Debug, Clone)]
enum Origin {
    Client(Ticket),
    Peer { from: NodeId, id: u64 },
}

/// Why a call failed (production: `PeerError`).
#[derive(Debug, Clone)]
enum CallError {
    /// The peer answered with an error: it is up.
    Refused(ErrorReply),
    /// No answer in time: the peer is marked down.
    Timeout,
}

/// What a call's outcome is for.
#[derive(Debug, Clone)]
enum Purpose {
    Probe,
    Store {
        op: u64,
        target: Target,
    },
    Fetch {
        op: u64,
        node: NodeId,
    },
    Forward {
        op: u64,
    },
    Repair,
    /// The `Store` of the hint-delivery pass in flight.
    Hint,
    Ae {
        exchange: u64,
    },
    Reap {
        pass: u64,
    },
    Gossip,
    Handoff {
        pass: u64,
    },
    /// A handoff push whose answer nobody waits for (the broken variant).
    HandoffUnawaited,
    Depart {
        id: u64,
    },
}

#[derive(Debug, Clone)]
struct Call {
    peer: NodeId,
    deadline_ms: u64,
    started_ms: u64,
    purpose: Purpose,
    /// Feeds the failure detector (background anti-entropy calls do not).
    tracked: bool,
}

#[derive(Debug)]
struct PutOp {
    /// `None` once the client has its answer.
    origin: Option<Origin>,
    /// The production coordinator (`quiver_node_core::request::Put`).
    put: Put,
    /// The client's answer: its context plus the write's dot.
    reply: VersionVector,
}

#[derive(Debug)]
struct GetOp {
    /// `None` once the client has its answer; the op then lives on for read repair.
    origin: Option<Origin>,
    /// The production coordinator (`quiver_node_core::request::Get`).
    get: Get,
}

#[derive(Debug)]
struct ForwardOp {
    origin: Origin,
    request: Request,
    forwarding: Forwarding,
    /// The target the forward is waiting for.
    current: NodeId,
}

/// One node's state machine. See the module docs for the driver contract.
#[derive(Debug)]
pub struct Node {
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
    disk: Disk,
    /// The production replica (`quiver-node-core`): records, hint markers, the
    /// anti-entropy index and the tombstone index, over the simulated disk.
    replica: Replica,
    /// The wall clock the replica reads.
    clock: Arc<SimClock>,
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
    next_writeback_ms: u64,
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
    /// Simulated time of the input being handled (the node's clock for store times).
    clock_ms: u64,
}

impl Node {
    /// Boots a node over `disk`: bumps the durable boot counter, so epochs of earlier boots
    /// are never continued. `life` must differ for every start of this node in a run (it
    /// keeps call ids unique). `initial` is the membership every node derives from its
    /// start-up flags (production: the `--peer` list); a disk that stored newer metadata
    /// keeps it.
    pub fn boot(
        name: &str,
        initial: &MetaState,
        cfg: NodeConfig,
        disk: Disk,
        life: u64,
        now_ms: u64,
    ) -> Node {
        let mut disk = disk;
        let engine = disk.engine.engine();
        // As the server: the boot counter (and a first incarnation) durable before any
        // epoch of this boot is handed out.
        let (mut epochs, boot) = BootEpochs::start(&*engine, disk.fresh_incarnation)
            .expect("a booting node's disk is live and its counters readable");
        engine
            .apply(&boot)
            .and_then(|()| engine.sync())
            .expect("a booting node's disk accepts its boot record");
        if cfg.trust_all_epochs {
            epochs.trust_all_epochs();
        }
        let incarnation = epochs.incarnation();
        let meta = match &disk.meta {
            Some(m) => m.clone(),
            None => {
                // Production stores the first ring with the members at the first start.
                disk.meta = Some(initial.clone());
                initial.clone()
            }
        };
        let ring = meta
            .ring
            .as_ref()
            .map(|entry| Arc::new(entry.ring.clone()))
            .expect("the simulator's initial metadata holds the first ring");
        let clock = Arc::new(SimClock::default());
        clock.set(wall_ms(cfg.clock_skew_ms, now_ms));
        let mut replica = Replica::new(
            name.to_string(),
            engine,
            epochs,
            VALUE_BYTES_MAX,
            Arc::clone(&clock) as Arc<dyn WallClock>,
        );
        replica
            .init_hints(HINTS_MAX_DEFAULT)
            .expect("a booting node's disk is live");
        let mut node = Node {
            cfg,
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
            next_writeback_ms: now_ms + cfg.writeback_every_ms,
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
        };
        node.apply_membership();
        node.rebuild_ae();
        node
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

    /// The node's records, hint markers and tombstone index as readers see them, decoded
    /// from its disk (for the checkers: it reads the whole disk).
    pub fn tables(&self) -> Tables {
        Tables::read(&self.disk.engine).expect("a live node's disk is readable")
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

    /// The node goes down: in-memory state is lost, the disk keeps what `kind` allows.
    pub fn crash(self, kind: CrashKind, rng: &mut Rng, new_incarnation: u64) -> Disk {
        self.disk.crash(kind, rng, new_incarnation)
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

    /// Time passed: expire calls, probe down peers, hand off hints, write back buffers.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.set_clock(now_ms);
        if !self.local_syncs.is_empty() {
            // The coordinators' own fsyncs (group-committed): their copies now count.
            self.sync();
            for op in std::mem::take(&mut self.local_syncs) {
                self.store_result(now_ms, op, None, Ok(()), &mut fx);
            }
        }
        let expired: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.deadline_ms <= now_ms)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(call) = self.calls.remove(&id) {
                if call.tracked {
                    self.mark_down(&call.peer, call.started_ms, now_ms);
                    fx.push(Effect::Observe(Observation::PeerTimeout));
                }
                let peer = call.peer.clone();
                self.dispatch(
                    now_ms,
                    &peer,
                    call.purpose,
                    Err(CallError::Timeout),
                    &mut fx,
                );
            }
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
            self.forget_hints_for_left();
            if self.hint_count() == 0 {
                self.next_hint_pass_ms = now_ms + self.cfg.hints_every_ms;
            } else {
                self.hint_pass = Some(HintPass::new(self.peers.iter().cloned()));
                self.hint_step(now_ms, &mut fx);
            }
        }
        self.speculate_reads(now_ms, &mut fx);
        self.ae_tick(now_ms, &mut fx);
        self.gossip_tick(now_ms, &mut fx);
        self.handoff_tick(now_ms, &mut fx);
        if now_ms >= self.next_writeback_ms {
            self.sync();
            self.next_writeback_ms = now_ms + self.cfg.writeback_every_ms;
        }
        fx
    }

    // ----- failure detection (production: peer.rs) -----

    fn is_up(&self, node: &str) -> bool {
        node == self.me.node || self.health.is_up(node)
    }

    fn mark_up(&mut self, node: &str, now_ms: u64) {
        // A peer back up gets its hints at the next tick (production: `Peers::came_up`
        // wakes hint delivery), after the pass in flight if there is one.
        if self.health.on_success(node, now_ms) {
            self.hints_wanted = true;
        }
    }

    fn mark_down(&mut self, node: &str, started_ms: u64, now_ms: u64) {
        self.health.on_failure(node, started_ms, now_ms);
    }

    fn call(
        &mut self,
        now_ms: u64,
        peer: &str,
        body: PeerRequest,
        timeout_ms: u64,
        purpose: Purpose,
        fx: &mut Vec<Effect>,
    ) {
        self.call_with(now_ms, peer, body, timeout_ms, purpose, true, fx);
    }

    /// A call whose outcome does not reach the failure detector (production:
    /// `Peers::call_untracked`, used by anti-entropy and reaping).
    fn call_untracked(
        &mut self,
        now_ms: u64,
        peer: &str,
        body: PeerRequest,
        timeout_ms: u64,
        purpose: Purpose,
        fx: &mut Vec<Effect>,
    ) {
        self.call_with(now_ms, peer, body, timeout_ms, purpose, false, fx);
    }

    #[allow(clippy::too_many_arguments)]
    fn call_with(
        &mut self,
        now_ms: u64,
        peer: &str,
        body: PeerRequest,
        timeout_ms: u64,
        purpose: Purpose,
        tracked: bool,
        fx: &mut Vec<Effect>,
    ) {
        self.next_call += 1;
        let id = (self.life << CALL_ID_BITS_PER_LIFE) | self.next_call;
        self.calls.insert(
            id,
            Call {
                peer: peer.to_string(),
                deadline_ms: now_ms + timeout_ms,
                started_ms: now_ms,
                purpose,
                tracked,
            },
        );
        fx.push(Effect::Send {
            to: peer.to_string(),
            msg: Message::Request { id, body },
        });
    }

    fn dispatch(
        &mut self,
        now_ms: u64,
        peer: &str,
        purpose: Purpose,
        result: Result<PeerResponse, CallError>,
        fx: &mut Vec<Effect>,
    ) {
        match purpose {
            // The outcome already reached the failure detector (`on_message` / `on_tick`).
            Purpose::Probe => {}
            Purpose::Repair => {}
            Purpose::Ae { exchange } => self.ae_result(now_ms, exchange, result, fx),
            Purpose::Reap { pass } => self.reap_result(now_ms, pass, peer, result, fx),
            Purpose::Gossip => self.gossip_result(now_ms, peer, result, fx),
            Purpose::Handoff { pass } => self.handoff_result(now_ms, pass, result, fx),
            Purpose::HandoffUnawaited => {}
            Purpose::Depart { id } => self.depart_result(id, result, fx),
            Purpose::Store { op, target } => {
                let result = match result {
                    Ok(PeerResponse::Stored) => Ok(()),
                    Ok(other) => Err(format!("unexpected reply {other:?}")),
                    Err(CallError::Refused(e)) => Err(e.message),
                    Err(CallError::Timeout) => Err("timeout".to_string()),
                };
                self.store_result(now_ms, op, Some(target), result, fx);
            }
            Purpose::Fetch { op, node } => {
                if let Some(g) = self.gets.get_mut(&op) {
                    let reply = match result {
                        Ok(PeerResponse::Fetched(o)) => Ok(o),
                        Ok(other) => Err(format!("unexpected {other:?}")),
                        Err(e) => Err(format!("{e:?}")),
                    };
                    if let Some(spare) = g.get.on_reply(&node, reply) {
                        self.send_fetch(now_ms, op, &spare.node, fx);
                    }
                    self.get_progress(now_ms, op, fx);
                }
            }
            Purpose::Forward { op } => {
                if let Some(mut fwd) = self.forwards.remove(&op) {
                    match result {
                        Ok(PeerResponse::Forwarded(r)) => {
                            self.reply(fwd.origin, r, fx);
                        }
                        other => {
                            let current = fwd.current.clone();
                            fwd.forwarding.on_failure(&current, format!("{other:?}"));
                            self.forward_next(now_ms, op, fwd, fx);
                        }
                    }
                }
            }
            Purpose::Hint => {
                let reply = match result {
                    Ok(PeerResponse::Stored) => StoreReply::Stored,
                    Ok(_) | Err(CallError::Refused(_)) => StoreReply::Refused,
                    // The owner went away again: stop for now, it is marked down.
                    Err(CallError::Timeout) => StoreReply::Unreachable,
                };
                if let Some(mut pass) = self.hint_pass.take() {
                    let members: Vec<String> = self.meta.members.keys().cloned().collect();
                    let n = self.cfg.quorum.n;
                    let is_primary = |_: &str, key: &[u8]| {
                        let (primaries, _) = self.preference(&String::from_utf8_lossy(key), n);
                        primaries.contains(&self.me.node)
                    };
                    let changed = pass
                        .on_reply(&self.replica, reply, &is_primary, &members)
                        .expect("a live node's records are readable");
                    self.hint_pass = Some(pass);
                    if changed {
                        self.sync();
                        fx.push(Effect::Observe(Observation::HintHandedOff));
                    }
                }
                self.hint_step(now_ms, fx);
            }
        }
    }

    fn reply(&mut self, origin: Origin, result: Response, fx: &mut Vec<Effect>) {
        match origin {
            Origin::Client(ticket) => fx.push(Effect::Reply { ticket, result }),
            Origin::Peer { from, id } => fx.push(Effect::Send {
                to: from,
                msg: Message::Response {
                    id,
                    body: PeerResponse::Forwarded(result),
                },
            }),
        }
    }

    // ----- placement (production: Cluster::preference / targets / quorum) -----

    fn preference(&self, key: &str, n: usize) -> (Vec<NodeId>, Vec<NodeId>) {
        let list = self
            .ring
            .preference_list_for_key(BUCKET.as_bytes(), key.as_bytes(), n);
        (
            list.primaries.iter().map(|m| m.id.clone()).collect(),
            list.fallbacks.iter().map(|m| m.id.clone()).collect(),
        )
    }

    fn targets(&self, key: &str, n: usize) -> (Vec<Target>, usize) {
        let (primaries, fallbacks) = self.preference(key, n);
        let p: Vec<&str> = primaries.iter().map(String::as_str).collect();
        let f: Vec<&str> = fallbacks.iter().map(String::as_str).collect();
        let targets = select_targets(&p, &f, |node| self.is_up(node), self.cfg.sloppy);
        (targets, primaries.len())
    }

    fn quorum(&self, r: Option<usize>, w: Option<usize>) -> Result<Quorum, String> {
        let d = self.cfg.quorum;
        Quorum::new(d.n, r.unwrap_or(d.r), w.unwrap_or(d.w)).map_err(|e| e.to_string())
    }

    fn wall_ms(&self, now_ms: u64) -> u64 {
        wall_ms(self.cfg.clock_skew_ms, now_ms)
    }

    /// The input being handled happens at `now_ms`: the node's clock (and its replica's).
    fn set_clock(&mut self, now_ms: u64) {
        self.clock_ms = now_ms;
        self.clock.set(self.wall_ms(now_ms));
    }

    /// Makes every applied write durable (production: a group-commit round).
    fn sync(&self) {
        self.disk
            .engine
            .sync()
            .expect("the simulated disk fails no sync unless told to");
    }

    // ----- client side (production: Cluster::handle_client, get, put, forward) -----

    fn handle_client(
        &mut self,
        now_ms: u64,
        origin: Origin,
        request: Request,
        forwarded: Option<Option<NodeId>>,
        fx: &mut Vec<Effect>,
    ) {
        let bucket = match &request {
            Request::Get { bucket, .. }
            | Request::Put { bucket, .. }
            | Request::Delete { bucket, .. } => bucket,
            other => {
                let message = format!("the simulated node answers gets and writes, not {other:?}");
                return self.reply(
                    origin,
                    client_error(ErrorCode::MalformedRequest, message),
                    fx,
                );
            }
        };
        if bucket != BUCKET {
            let message = format!("bucket {bucket:?}: the simulation has only {BUCKET:?}");
            return self.reply(
                origin,
                client_error(ErrorCode::MalformedRequest, message),
                fx,
            );
        }
        match request {
            Request::Get { key, options, .. } => {
                self.start_get(now_ms, origin, &key, options.r, fx)
            }
            write => self.start_put(now_ms, origin, write, forwarded, fx),
        }
    }

    fn start_get(
        &mut self,
        now_ms: u64,
        origin: Origin,
        key: &[u8],
        r: Option<u8>,
        fx: &mut Vec<Effect>,
    ) {
        let quorum = match self.quorum(r.map(usize::from), None) {
            Ok(q) => q,
            Err(e) => return self.reply(origin, client_error(ErrorCode::InvalidQuorum, e), fx),
        };
        let key = String::from_utf8_lossy(key).into_owned();
        let (targets, n) = self.targets(&key, quorum.n);
        let me = self.me.node.clone();
        let op = self.next_op;
        self.next_op += 1;
        let spread = match self.cfg.read_repair {
            true => ReadSpread::for_read(op, self.cfg.full_reads_per_mille),
            false => ReadSpread::Quorum,
        };
        let (get, fetches) = Get::start(
            GetArgs {
                me: &me,
                bucket: BUCKET,
                key: key.as_bytes(),
                targets: &targets,
                r: quorum.r,
                n,
                spread,
                index: op,
                now_ms,
                speculate_ms: self.cfg.read_speculate_ms,
            },
            // The simulated local read cannot fail.
            || Ok(self.local_object(&key)),
        );
        let origin = Some(origin);
        self.gets.insert(op, GetOp { origin, get });
        for t in fetches {
            self.send_fetch(now_ms, op, &t.node, fx);
        }
        self.get_progress(now_ms, op, fx);
    }

    /// Asks `node` for its copy of get `op`'s key.
    fn send_fetch(&mut self, now_ms: u64, op: u64, node: &str, fx: &mut Vec<Effect>) {
        let Some(op_state) = self.gets.get(&op) else {
            return;
        };
        let body = PeerRequest::from(op_state.get.fetch_request());
        let purpose = Purpose::Fetch {
            op,
            node: node.to_string(),
        };
        self.call(now_ms, node, body, self.cfg.peer_timeout_ms, purpose, fx);
    }

    /// Gets past their speculation deadline ask a spare each (production: the
    /// speculation timer in `Cluster::get`).
    fn speculate_reads(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        let mut due = Vec::new();
        for (&op, g) in &mut self.gets {
            if g.get.deadline().is_some_and(|at| at <= now_ms)
                && let Some(spare) = g.get.on_deadline(now_ms)
            {
                due.push((op, spare.node));
            }
        }
        for (op, node) in due {
            fx.push(Effect::Observe(Observation::SpeculativeRead));
            self.send_fetch(now_ms, op, &node, fx);
        }
    }

    fn get_progress(&mut self, now_ms: u64, op: u64, fx: &mut Vec<Effect>) {
        let Some(g) = self.gets.get_mut(&op) else {
            return;
        };
        let decided = g.get.decision().map(|d| match d {
            Ok(merged) => Response::Get {
                siblings: wire_siblings(&merged),
                context: causality::encode_context(merged.context()),
            },
            Err(e) => client_error(ErrorCode::QuorumFailed, e),
        });
        if let Some(result) = decided
            && let Some(origin) = g.origin.take()
        {
            self.reply(origin, result, fx);
        }
        // Every target answered (or the read failed): read repair.
        if !self.gets.get(&op).is_some_and(|g| g.get.is_finished()) {
            return;
        }
        let Some(g) = self.gets.remove(&op) else {
            return;
        };
        if !self.cfg.read_repair {
            return;
        }
        for (target, store) in g.get.repairs() {
            fx.push(Effect::Observe(Observation::ReadRepair));
            if target.node == self.me.node {
                let _ = self.apply_store(&store);
            } else {
                let body = PeerRequest::from(DataRequest::Store(store));
                let timeout = self.cfg.peer_timeout_ms;
                self.call(now_ms, &target.node, body, timeout, Purpose::Repair, fx);
            }
        }
    }

    /// This node's state of `key` (empty when it holds none).
    pub fn local_object(&self, key: &str) -> Object {
        self.replica
            .get(BUCKET, key.as_bytes())
            .expect("a live node's records are readable")
    }

    fn start_put(
        &mut self,
        now_ms: u64,
        origin: Origin,
        request: Request,
        forwarded: Option<Option<NodeId>>,
        fx: &mut Vec<Effect>,
    ) {
        let (key, context, op, options) = match &request {
            Request::Put {
                key,
                context,
                value,
                options,
                ..
            } => (key, context, WriteOp::Put(value.clone()), options),
            Request::Delete {
                key,
                context,
                options,
                ..
            } => (key, context, WriteOp::Delete, options),
            other => {
                let message = format!("not a write: {other:?}");
                return self.reply(
                    origin,
                    client_error(ErrorCode::MalformedRequest, message),
                    fx,
                );
            }
        };
        let (key, context) = (String::from_utf8_lossy(key).into_owned(), context.clone());
        let quorum = match self.quorum(None, options.w.map(usize::from)) {
            Ok(q) => q,
            Err(e) => return self.reply(origin, client_error(ErrorCode::InvalidQuorum, e), fx),
        };
        let (targets, n) = self.targets(&key, quorum.n);
        let me = self.me.node.clone();
        let durability = match options.durability {
            Some(WireDurability::Sync) => Durability::Sync,
            Some(WireDurability::Buffered) => Durability::Buffered,
            None => self.cfg.durability,
        };
        let sync = durability == Durability::Sync;
        let (my_target, sync_first, sync_alongside) =
            match plan_write(&me, &targets, forwarded, quorum.w, n, sync) {
                WritePlan::Coordinate {
                    me,
                    sync_first,
                    sync_alongside,
                } => (me, sync_first, sync_alongside),
                WritePlan::Forward(forwarding) => {
                    let op = self.next_op;
                    self.next_op += 1;
                    let fwd = ForwardOp {
                        origin,
                        request,
                        forwarding,
                        current: NodeId::new(),
                    };
                    return self.forward_next(now_ms, op, fwd, fx);
                }
            };
        let value = match &op {
            WriteOp::Put(v) => v.clone(),
            _ => Vec::new(),
        };
        // The production replica's write: check the context, read the record, issue the
        // dot, check the sibling limit, apply record + hint marker + anti-entropy entry in
        // one batch. The fsync for `sync` durability is the driver's, below.
        let written = self
            .replica
            .check_write(BUCKET, key.as_bytes(), &op, &context)
            .and_then(|(dkey, client_context)| {
                let outcome = self.replica.write(
                    &dkey,
                    LocalWrite {
                        bucket: BUCKET,
                        key: key.as_bytes(),
                        context: &client_context,
                        op,
                        now_ms: self.wall_ms(now_ms),
                        hint_for: my_target.hint_for.as_deref(),
                    },
                )?;
                Ok((client_context, outcome))
            });
        let (client_context, outcome) = match written {
            Ok(w) => w,
            Err(e) => return self.reply(origin, client_error(e.code(), e.to_string()), fx),
        };
        // With other replicas the coordinator's own fsync runs alongside theirs (here: at
        // the next tick, so a crash can fall in between) and its copy counts towards W only
        // once durable; alone, it syncs before answering.
        if sync_first {
            self.sync();
        }
        fx.push(Effect::Observe(Observation::DotIssued {
            node: me.clone(),
            key: key.to_string(),
            dot: outcome.dot.clone(),
            context: client_context,
            value,
        }));
        let (_, fallbacks) = self.preference(&key, quorum.n);
        let (put, sends) = Put::start(
            PutArgs {
                bucket: BUCKET,
                key: key.as_bytes(),
                me: &my_target,
                targets: &targets,
                fallbacks: &fallbacks,
                w: quorum.w,
                n,
                sloppy: self.cfg.sloppy,
                sync,
                sync_alongside,
            },
            &outcome,
            self.cfg.broken(),
        );
        let op = self.next_op;
        self.next_op += 1;
        if sync_alongside {
            self.local_syncs.push(op);
        }
        for (target, store) in sends {
            self.send_store(now_ms, op, target, store, fx);
        }
        let origin = Some(origin);
        let reply = outcome.context;
        self.puts.insert(op, PutOp { origin, put, reply });
        self.put_progress(op, fx);
    }

    fn send_store(
        &mut self,
        now_ms: u64,
        op: u64,
        target: Target,
        store: StoreRequest,
        fx: &mut Vec<Effect>,
    ) {
        let node = target.node.clone();
        let body = PeerRequest::from(DataRequest::Store(store));
        let purpose = Purpose::Store { op, target };
        self.call(now_ms, &node, body, self.cfg.peer_timeout_ms, purpose, fx);
    }

    fn store_result(
        &mut self,
        now_ms: u64,
        op: u64,
        target: Option<Target>,
        result: Result<(), String>,
        fx: &mut Vec<Effect>,
    ) {
        // A put stays until every store has answered, as in production: failures after the
        // client's answer still go to a fallback with a hint.
        let Some(p) = self.puts.get_mut(&op) else {
            return;
        };
        let (me, health) = (&self.me.node, &self.health);
        let is_up = |n: &str| n == me || health.is_up(n);
        let next = match target {
            Some(target) => p.put.on_store_result(&target, result, is_up),
            None => p.put.on_local_synced(result, is_up),
        };
        if let Some((target, store)) = next {
            self.send_store(now_ms, op, target, store, fx);
        }
        self.put_progress(op, fx);
    }

    fn put_progress(&mut self, op: u64, fx: &mut Vec<Effect>) {
        let Some(p) = self.puts.get_mut(&op) else {
            return;
        };
        let result = p.put.decision().map(|d| match d {
            Ok(()) => Response::Written {
                context: causality::encode_context(&p.reply),
            },
            Err(e) => client_error(ErrorCode::QuorumFailed, e),
        });
        let origin = if result.is_some() {
            p.origin.take()
        } else {
            None
        };
        if p.put.is_finished() {
            self.puts.remove(&op);
        }
        if let (Some(origin), Some(result)) = (origin, result) {
            self.reply(origin, result, fx);
        }
    }

    fn forward_next(&mut self, now_ms: u64, op: u64, mut fwd: ForwardOp, fx: &mut Vec<Effect>) {
        let Some(target) = fwd.forwarding.next_target() else {
            let msg = forward_failed(&fwd.forwarding);
            return self.reply(fwd.origin, client_error(ErrorCode::QuorumFailed, msg), fx);
        };
        let body = PeerRequest::Forward {
            request: fwd.request.clone(),
            hint_for: target.hint_for.clone(),
        };
        self.call(
            now_ms,
            &target.node,
            body,
            self.cfg.forward_timeout_ms,
            Purpose::Forward { op },
            fx,
        );
        fwd.current = target.node;
        self.forwards.insert(op, fwd);
    }

    // ----- replica side (production: Cluster::handle_peer, KvService) -----

    fn handle_peer(
        &mut self,
        now_ms: u64,
        from: &str,
        id: u64,
        body: PeerRequest,
        fx: &mut Vec<Effect>,
    ) {
        let respond = |body: PeerResponse| Effect::Send {
            to: from.to_string(),
            msg: Message::Response { id, body },
        };
        let refused = |code, message| PeerResponse::Error(ErrorReply { code, message });
        let body = match body.inbound(&self.me.node, &|| self.ring.id()) {
            Inbound::Ping => PeerResponse::Pong(self.me.node.clone()),
            Inbound::Data(DataRequest::Fetch { bucket, key }) => {
                match self.replica.get(&bucket, &key) {
                    Ok(object) => PeerResponse::Fetched(object),
                    Err(e) => refused(e.code(), e.to_string()),
                }
            }
            Inbound::Data(DataRequest::Store(store)) => match self.apply_store(&store) {
                Ok(()) => PeerResponse::Stored,
                Err(e) => refused(ErrorCode::Storage, e),
            },
            Inbound::Forward { request, hint_for } => {
                let origin = Origin::Peer {
                    from: from.to_string(),
                    id,
                };
                return self.handle_client(now_ms, origin, request, Some(hint_for), fx);
            }
            Inbound::MetaDigest(digest) => self.on_meta_digest(digest),
            Inbound::MetaPush { state, .. } => self.on_meta_push(&state),
            Inbound::Handoff(request) => self.on_handoff(request),
            Inbound::Reap(request) => PeerResponse::from(self.answer_reap(request)),
            Inbound::Ae(request) => self.answer_ae(from, request),
            // Plugins and joins are not simulated.
            Inbound::MetaBlobs(_) | Inbound::Join { .. } => {
                refusal("not a request the simulated node answers")
            }
            Inbound::Refuse(reply) => PeerResponse::Error(reply),
        };
        fx.push(respond(body));
    }

    /// A replica takes a `Store` (the production `request::apply_store`), then the
    /// driver's fsync when it says so.
    fn apply_store(&mut self, store: &StoreRequest) -> Result<(), String> {
        let sync_first = request::apply_store(&self.replica, store, self.cfg.broken())
            .map_err(|e| e.to_string())?;
        if sync_first {
            self.sync();
        }
        Ok(())
    }

    /// The owner acknowledged a delivered hint (the production `Replica::hint_delivered`:
    /// drop the marker, and the copy unless `keep`, only if the copy did not change since it
    /// was sent), then the driver's fsync. True when the marker was dropped.
    fn hint_delivered(&mut self, owner: &str, key: &str, delivered: &Object, keep: bool) -> bool {
        let dropped = self
            .replica
            .hint_delivered(owner, BUCKET, key.as_bytes(), delivered, keep)
            .expect("a live node's records are readable");
        if dropped {
            self.sync();
        }
        dropped
    }

    /// One step of a hint-delivery pass: the production `HintPass` says which `Store` goes
    /// out next (the server awaits each in turn; here the next one goes out when the
    /// previous one's answer arrives, with other events in between).
    fn hint_step(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        let Some(pass) = self.hint_pass.as_mut() else {
            return;
        };
        if pass.in_flight() {
            return;
        }
        let (me, health) = (&self.me.node, &self.health);
        let is_up = |n: &str| n == me || health.is_up(n);
        match pass.next(&self.replica, &is_up) {
            HintStep::Done { .. } => {
                self.hint_pass = None;
                self.next_hint_pass_ms = now_ms + self.cfg.hints_every_ms;
            }
            HintStep::Store { owner, hinted } => {
                let body = PeerRequest::from(DataRequest::Store(StoreRequest {
                    bucket: BUCKET.to_string(),
                    key: hinted.key,
                    object: hinted.object,
                    hint_for: None,
                    sync: true,
                }));
                self.call(
                    now_ms,
                    &owner,
                    body,
                    self.cfg.peer_timeout_ms,
                    Purpose::Hint,
                    fx,
                );
            }
        }
    }
}

/// A node's wall clock at simulated time `now_ms`: the run's base time plus the node's skew.
fn wall_ms(skew_ms: i64, now_ms: u64) -> u64 {
    let t = WALL_CLOCK_BASE_MS + now_ms as i64 + skew_ms;
    u64::try_from(t).unwrap_or(0)
}

/// A client's error answer (production: `cluster::error`).
fn client_error(code: ErrorCode, message: String) -> Response {
    Response::Error(ErrorReply { code, message })
}

/// A call's outcome as production's drivers see it (`Peers::call_untracked` turns a
/// peer's error answer into a refusal): the answer, or why there is none.
fn call_answer(result: Result<PeerResponse, CallError>) -> Result<PeerResponse, String> {
    match result {
        Ok(response) => Ok(response),
        Err(CallError::Refused(e)) => Err(e.message),
        Err(CallError::Timeout) => Err("no answer in time".to_string()),
    }
}

/// A peer request this node does not answer.
fn refusal(message: &str) -> PeerResponse {
    PeerResponse::Error(ErrorReply {
        code: ErrorCode::Internal,
        message: message.to_string(),
    })
}
