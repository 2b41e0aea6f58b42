//! Node-to-node transport: the peer protocol, mutual TLS, connections, and local failure
//! detection.
//!
//! Peers use the same QUIC endpoint (and UDP port) as clients; the ALPN tells them apart.
//! A peer connection must present a certificate signed by the cluster CA: rustls verifies
//! any client certificate against the CA during the handshake, and the server closes a
//! `quiver-peer/1` connection that presented none. Frames are the client protocol's
//! (length + postcard), one request per bidirectional stream.
//!
//! Failure detection is local and only steers routing (DESIGN.md): a peer whose request
//! fails is marked down, skipped in preference lists, and probed with exponential backoff
//! until it answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_core::causality::Object;
use quiver_core::coordinator::FailureDetector;
use quiver_core::membership::MemberEntry;
use quiver_core::merkle::Hash;
use quiver_core::meta::MetaState;
use quiver_sdk::wire::{
    self, ErrorCode, ErrorReply, FRAME_HEADER_BYTES, NODE_SERVER_NAME, Request, Response,
};
use serde::{Deserialize, Serialize};

use crate::certs::NodeIdentity;
use quiver_node_core::exchange::{AeRequest, AeResponse};
use quiver_node_core::handoff::{Ask, HandoffRequest, HandoffResponse};
use quiver_node_core::reap::{ReapRequest, ReapResponse};
use quiver_storage::Durability;

/// ALPN of version 1 of the peer protocol.
pub const ALPN_PEER_V1: &[u8] = b"quiver-peer/1";
/// Largest peer reply accepted, in bytes.
const PEER_FRAME_BYTES_MAX: usize = quiver_core::limits::PEER_FRAME_BYTES_MAX;
/// Slowest link between nodes a bulk transfer's deadline allows for, in bytes per second.
pub const TRANSFER_BYTES_PER_SEC_MIN: u64 = 4 * 1024 * 1024;

/// The `(engine data key, object digest)` list of one anti-entropy leaf, sorted by key.
pub use quiver_node_core::exchange::LeafKeys;

/// A request from one node to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Liveness probe.
    Ping,
    /// Merge `object` into the replica's record of the key. With `hint_for`, the receiver is
    /// a fallback standing in for that node: it also records a hint to hand the key over.
    Store {
        /// Bucket.
        bucket: String,
        /// Key.
        key: Vec<u8>,
        /// The coordinator's state of the key after the write.
        object: Object,
        /// The unreachable primary this copy is held for.
        hint_for: Option<String>,
        /// How durable the store must be before the ack.
        sync: bool,
    },
    /// Return the replica's state of the key.
    Fetch {
        /// Bucket.
        bucket: String,
        /// Key.
        key: Vec<u8>,
    },
    /// A client write handed to a node of the key's preference list, which coordinates it.
    Forward {
        /// The client's request.
        request: Request,
        /// When the receiver was picked as a fallback: the primary it stands in for.
        hint_for: Option<String>,
    },
    /// Metadata sync: the sender's digest; the receiver answers with its state if it
    /// differs.
    MetaDigest([u8; 32]),
    /// Metadata push after an admin change: merge `state`, keep `blobs` (hash, bytes).
    MetaPush {
        /// The sender's whole metadata state.
        state: MetaState,
        /// Plugin bytes the receiver may lack.
        blobs: Vec<(String, Vec<u8>)>,
    },
    /// The bytes of these plugin versions.
    MetaBlobs(Vec<String>),
    /// Anti-entropy: a digest of the roots of every tree both replicate (in order); the
    /// receiver answers whether its own digest matches, so equal replicas exchange a few
    /// dozen bytes.
    AeDigest {
        /// The sender's node name (the trees are those the two share).
        from: String,
        /// Trees covered.
        trees: u32,
        /// Digest of their `(n, partition, root)` list.
        digest: Hash,
    },
    /// Anti-entropy: the sender's exchange is over; the receiver may take part in another.
    AeDone {
        /// The sender's node name.
        from: String,
    },
    /// Anti-entropy: the sender's roots of trees `(n, partition)` both replicate; the
    /// receiver answers with the group hashes of each tree whose root differs here.
    AeRoots(Vec<(u8, u32, Hash)>),
    /// Anti-entropy: the leaf hashes of these `(n, partition, group)`.
    AeLeaves(Vec<(u8, u32, u8)>),
    /// Anti-entropy: the `(data key, digest)` lists of these `(n, partition, leaf)`.
    AeKeys(Vec<(u8, u32, u8)>),
    /// Anti-entropy: the receiver's state of these engine data keys.
    AeFetch(Vec<Vec<u8>>),
    /// Anti-entropy: merge these `(engine data key, state)` pairs.
    AePush(Vec<(Vec<u8>, Object)>),
    /// Reaping: for each `(engine data key, digest)`, for how long has the receiver held
    /// exactly that state (made durable first), and does it hold a hint for the key?
    ReapCheck(Vec<(Vec<u8>, Hash)>),
    /// Reaping: delete these tombstones if still exactly that state and no hint is held.
    Reap(Vec<(Vec<u8>, Hash)>),
    /// Membership: the sender asks to join the receiver's cluster as `node`.
    Join {
        /// The joining node's name.
        node: String,
        /// Its address, weight and zone (`state` is `Joining`).
        entry: MemberEntry,
        /// Its partition count, which must be the cluster's.
        partitions: u32,
        /// Its default `(n, r, w)`, which must be the cluster's.
        quorum: (u8, u8, u8),
    },
    /// Handoff: merge these `(engine data key, state)` pairs and make them durable before
    /// answering (the sender drops its copy after the answer).
    HandoffPush(Vec<(Vec<u8>, Object)>),
    /// `request` (a handoff or reaping step) is answered only by a node holding exactly the
    /// ring `ring`: nodes on different rings disagree on who replicates a key, and acting
    /// together they could each count the other as the replica and both drop it.
    OnRing {
        /// The sender's ring.
        ring: quiver_core::ring::RingId,
        /// The step (never itself an `OnRing`: refused while decoding).
        #[serde(deserialize_with = "one_level")]
        request: Box<PeerRequest>,
    },
}

thread_local! {
    /// `OnRing` levels being decoded on this thread.
    static ON_RING_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Decodes the request inside an `OnRing`, refusing another `OnRing` there before decoding
/// it: the type nests, and a frame of thousands of nested levels (a few bytes each) would
/// otherwise overflow the decoding thread's stack and abort the node (found by the
/// `peer_request` fuzz target). Decoding is synchronous, so a per-thread depth suffices.
fn one_level<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Box<PeerRequest>, D::Error> {
    struct Level;
    impl Drop for Level {
        fn drop(&mut self) {
            ON_RING_DEPTH.with(|c| c.set(c.get().saturating_sub(1)));
        }
    }
    let depth = ON_RING_DEPTH.with(|c| {
        let depth = c.get().saturating_add(1);
        c.set(depth);
        depth
    });
    let _level = Level;
    if depth > 1 {
        return Err(serde::de::Error::custom(
            "an OnRing request inside an OnRing request",
        ));
    }
    PeerRequest::deserialize(d).map(Box::new)
}

/// A node's answer to a [`PeerRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerResponse {
    /// Answer to Ping, with the node's name.
    Pong(String),
    /// The store is done (durable as asked).
    Stored,
    /// The replica's state of the key (empty if it holds nothing).
    Fetched(Object),
    /// The coordinator's answer to a forwarded client request.
    Forwarded(Response),
    /// Answer to `MetaDigest`: same digest here.
    MetaSame,
    /// Answer to `MetaDigest`: this node's (different) state.
    Meta(MetaState),
    /// Answer to `MetaBlobs`: the requested bytes this node holds.
    Blobs(Vec<(String, Vec<u8>)>),
    /// Answer to `AeDigest`: true when the digests match.
    AeMatch(bool),
    /// Answer to `AeDigest`: the digests differ but the receiver is in another exchange;
    /// try again later.
    AeBusy,
    /// Answer to `AeDone`.
    AeReleased,
    /// Answer to `AeRoots`: `(n, partition, group hashes)` of the trees that differ.
    AeGroups(Vec<(u8, u32, Vec<Hash>)>),
    /// Answer to `AeLeaves`: `(n, partition, group, leaf hashes)`.
    AeLeafHashes(Vec<(u8, u32, u8, Vec<Hash>)>),
    /// Answer to `AeKeys`: `(n, partition, leaf, sorted (data key, digest) list)`.
    AeKeyLists(Vec<(u8, u32, u8, LeafKeys)>),
    /// Answer to `AeFetch`: `(data key, state)`, an empty state for a key not held.
    AeObjects(Vec<(Vec<u8>, Object)>),
    /// Answer to `AePush`: how many keys changed here.
    AePushed(u64),
    /// Answer to `ReapCheck`: `(ms it has held the same state, by its own clock, or None;
    /// holds a hint)` per key, in order.
    ReapStatus(Vec<(Option<u64>, bool)>),
    /// Answer to `Reap`: how many tombstones were removed.
    Reaped(u64),
    /// Answer to `Join`: the cluster's metadata, members and ring to adopt.
    Joined(Box<MetaState>),
    /// Answer to `HandoffPush`: how many keys changed here (all are durable).
    HandoffStored(u64),
    /// The request failed.
    Error(ErrorReply),
}

impl PeerRequest {
    /// The node id the request says its sender is, if it says one; it must be the id
    /// the sender's certificate names.
    pub fn claimed_sender(&self) -> Option<&str> {
        match self {
            PeerRequest::AeDigest { from, .. } | PeerRequest::AeDone { from } => Some(from),
            PeerRequest::Join { node, .. } => Some(node),
            PeerRequest::OnRing { request, .. } => request.claimed_sender(),
            _ => None,
        }
    }

    /// Durability flag for a store.
    pub fn sync_flag(d: Durability) -> bool {
        d == Durability::Sync
    }
}

/// Anti-entropy steps travel as their own `PeerRequest` variants (the wire format predates
/// the shared protocol of `quiver_node_core::exchange`); these convert both ways.
impl From<AeRequest> for PeerRequest {
    fn from(request: AeRequest) -> Self {
        match request {
            AeRequest::Digest {
                from,
                trees,
                digest,
            } => PeerRequest::AeDigest {
                from,
                trees,
                digest,
            },
            AeRequest::Done { from } => PeerRequest::AeDone { from },
            AeRequest::Roots(r) => PeerRequest::AeRoots(r),
            AeRequest::Leaves(a) => PeerRequest::AeLeaves(a),
            AeRequest::Keys(a) => PeerRequest::AeKeys(a),
            AeRequest::Fetch(k) => PeerRequest::AeFetch(k),
            AeRequest::Push(o) => PeerRequest::AePush(o),
        }
    }
}

impl PeerRequest {
    /// The anti-entropy step this request is, if it is one.
    pub fn into_ae(self) -> Option<AeRequest> {
        Some(match self {
            PeerRequest::AeDigest {
                from,
                trees,
                digest,
            } => AeRequest::Digest {
                from,
                trees,
                digest,
            },
            PeerRequest::AeDone { from } => AeRequest::Done { from },
            PeerRequest::AeRoots(r) => AeRequest::Roots(r),
            PeerRequest::AeLeaves(a) => AeRequest::Leaves(a),
            PeerRequest::AeKeys(a) => AeRequest::Keys(a),
            PeerRequest::AeFetch(k) => AeRequest::Fetch(k),
            PeerRequest::AePush(o) => AeRequest::Push(o),
            _ => return None,
        })
    }
}

impl From<AeResponse> for PeerResponse {
    fn from(response: AeResponse) -> Self {
        match response {
            AeResponse::Match(m) => PeerResponse::AeMatch(m),
            AeResponse::Busy => PeerResponse::AeBusy,
            AeResponse::Released => PeerResponse::AeReleased,
            AeResponse::Groups(g) => PeerResponse::AeGroups(g),
            AeResponse::LeafHashes(l) => PeerResponse::AeLeafHashes(l),
            AeResponse::KeyLists(k) => PeerResponse::AeKeyLists(k),
            AeResponse::Objects(o) => PeerResponse::AeObjects(o),
            AeResponse::Pushed(n) => PeerResponse::AePushed(n),
            AeResponse::Refused(message) => PeerResponse::Error(ErrorReply {
                code: ErrorCode::MalformedRequest,
                message,
            }),
        }
    }
}

impl PeerResponse {
    /// The anti-entropy answer this response is, if it is one (an error is a refusal).
    pub fn into_ae(self) -> Option<AeResponse> {
        Some(match self {
            PeerResponse::AeMatch(m) => AeResponse::Match(m),
            PeerResponse::AeBusy => AeResponse::Busy,
            PeerResponse::AeReleased => AeResponse::Released,
            PeerResponse::AeGroups(g) => AeResponse::Groups(g),
            PeerResponse::AeLeafHashes(l) => AeResponse::LeafHashes(l),
            PeerResponse::AeKeyLists(k) => AeResponse::KeyLists(k),
            PeerResponse::AeObjects(o) => AeResponse::Objects(o),
            PeerResponse::AePushed(n) => AeResponse::Pushed(n),
            PeerResponse::Error(e) => AeResponse::Refused(e.message),
            _ => return None,
        })
    }
}

/// Reaping steps travel as `OnRing { ring, ReapCheck | Reap }` (the wire format predates
/// the shared protocol of `quiver_node_core::reap`); these convert both ways.
impl From<ReapRequest> for PeerRequest {
    fn from(request: ReapRequest) -> Self {
        let (ring, step) = match request {
            ReapRequest::Check { ring, keys } => (ring, PeerRequest::ReapCheck(keys)),
            ReapRequest::Reap { ring, keys } => (ring, PeerRequest::Reap(keys)),
        };
        PeerRequest::OnRing {
            ring,
            request: Box::new(step),
        }
    }
}

impl PeerRequest {
    /// True for a reaping step (`ReapCheck` or `Reap`), bare or inside an `OnRing`.
    pub fn is_reap(&self) -> bool {
        match self {
            PeerRequest::ReapCheck(_) | PeerRequest::Reap(_) => true,
            PeerRequest::OnRing { request, .. } => {
                matches!(**request, PeerRequest::ReapCheck(_) | PeerRequest::Reap(_))
            }
            _ => false,
        }
    }

    /// The reaping step this request is, if it is one. A bare `ReapCheck` or `Reap` (what
    /// nodes sent before `OnRing`) counts as sent on `own`, the receiver's ring, as it was
    /// answered then.
    pub fn into_reap(self, own: quiver_core::ring::RingId) -> Option<ReapRequest> {
        let (ring, step) = match self {
            PeerRequest::OnRing { ring, request } => (ring, *request),
            step => (own, step),
        };
        match step {
            PeerRequest::ReapCheck(keys) => Some(ReapRequest::Check { ring, keys }),
            PeerRequest::Reap(keys) => Some(ReapRequest::Reap { ring, keys }),
            _ => None,
        }
    }
}

impl From<ReapResponse> for PeerResponse {
    fn from(response: ReapResponse) -> Self {
        match response {
            ReapResponse::Status(s) => PeerResponse::ReapStatus(s),
            ReapResponse::Reaped(n) => PeerResponse::Reaped(n),
            ReapResponse::OtherRing => PeerResponse::Error(ErrorReply {
                code: ErrorCode::Membership,
                message: "the receiver holds another ring than the sender; retry once gossip \
                          has spread it"
                    .into(),
            }),
            ReapResponse::Refused(message) => PeerResponse::Error(ErrorReply {
                code: ErrorCode::Storage,
                message,
            }),
        }
    }
}

impl PeerResponse {
    /// The reaping answer this response is, if it is one: a `Membership` error is a refusal
    /// on ring grounds (the answer to an `OnRing` step), any other error a failure there.
    pub fn into_reap(self) -> Option<ReapResponse> {
        Some(match self {
            PeerResponse::ReapStatus(s) => ReapResponse::Status(s),
            PeerResponse::Reaped(n) => ReapResponse::Reaped(n),
            PeerResponse::Error(e) if e.code == ErrorCode::Membership => ReapResponse::OtherRing,
            PeerResponse::Error(e) => ReapResponse::Refused(e.message),
            _ => return None,
        })
    }
}

/// Handoff steps travel as `OnRing` around the anti-entropy leaf and key requests and
/// `HandoffPush` (the wire format predates `quiver_node_core::handoff`); these convert both
/// ways.
impl From<HandoffRequest> for PeerRequest {
    fn from(request: HandoffRequest) -> Self {
        let step = match request.ask {
            Ask::Leaves(a) => PeerRequest::AeLeaves(a),
            Ask::Keys(a) => PeerRequest::AeKeys(a),
            Ask::Push(o) => PeerRequest::HandoffPush(o),
        };
        PeerRequest::OnRing {
            ring: request.ring,
            request: Box::new(step),
        }
    }
}

impl PeerRequest {
    /// True for an `OnRing` around a handoff step.
    pub fn is_handoff(&self) -> bool {
        matches!(self, PeerRequest::OnRing { request, .. } if matches!(
            **request,
            PeerRequest::AeLeaves(_) | PeerRequest::AeKeys(_) | PeerRequest::HandoffPush(_)
        ))
    }

    /// The handoff step this request is, if it is one (see [`PeerRequest::is_handoff`]).
    pub fn into_handoff(self) -> Option<HandoffRequest> {
        let PeerRequest::OnRing { ring, request } = self else {
            return None;
        };
        let ask = match *request {
            PeerRequest::AeLeaves(a) => Ask::Leaves(a),
            PeerRequest::AeKeys(a) => Ask::Keys(a),
            PeerRequest::HandoffPush(o) => Ask::Push(o),
            _ => return None,
        };
        Some(HandoffRequest { ring, ask })
    }
}

impl From<HandoffResponse> for PeerResponse {
    fn from(response: HandoffResponse) -> Self {
        match response {
            HandoffResponse::LeafHashes(l) => PeerResponse::AeLeafHashes(l),
            HandoffResponse::KeyLists(k) => PeerResponse::AeKeyLists(k),
            HandoffResponse::Stored(n) => PeerResponse::HandoffStored(n),
            HandoffResponse::WrongRing(message) => PeerResponse::Error(ErrorReply {
                code: ErrorCode::Membership,
                message,
            }),
            HandoffResponse::Refused(message) => PeerResponse::Error(ErrorReply {
                code: ErrorCode::MalformedRequest,
                message,
            }),
        }
    }
}

impl PeerResponse {
    /// The answer to a handoff step (an error is a refusal); `Err` for any other reply.
    pub fn into_handoff(self) -> Result<HandoffResponse, String> {
        Ok(match self {
            PeerResponse::AeLeafHashes(l) => HandoffResponse::LeafHashes(l),
            PeerResponse::AeKeyLists(k) => HandoffResponse::KeyLists(k),
            PeerResponse::HandoffStored(n) => HandoffResponse::Stored(n),
            PeerResponse::Error(e) => HandoffResponse::Refused(e.message),
            other => return Err(format!("unexpected reply {other:?}")),
        })
    }
}

/// Why a peer request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The peer is not in the member list.
    #[error("unknown peer {0}")]
    Unknown(String),
    /// Connecting or talking to the peer failed.
    #[error("peer {node} ({addr}): {message}")]
    Transport {
        /// Peer name.
        node: String,
        /// Peer address.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// No answer in time.
    #[error("peer {node}: no answer within {ms} ms")]
    Timeout {
        /// Peer name.
        node: String,
        /// Deadline.
        ms: u128,
    },
    /// The peer answered with an error.
    #[error("peer {node} refused: {message}")]
    Refused {
        /// Peer name.
        node: String,
        /// Its message.
        message: String,
    },
}

/// TLS for outgoing peer connections: trust the cluster CA, present the node certificate.
pub fn peer_client_config(identity: &NodeIdentity) -> Result<quinn::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        quiver_sdk::tls::parse_certs(&identity.ca_pem, "cluster CA").map_err(|e| e.to_string())?
    {
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(quiver_sdk::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![ALPN_PEER_V1.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(quiver_sdk::tls::transport_config(None)));
    Ok(config)
}

type ConnSlot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

/// One peer: where it is and the connections to it.
#[derive(Debug)]
struct PeerSlot {
    addr: SocketAddr,
    /// Its own lock, so dialling an unreachable peer never holds up requests to the others.
    conn: ConnSlot,
    /// A separate connection for background transfers (metadata, anti-entropy, handoff), so
    /// that dialling a peer that is still starting, or a bulk transfer, never holds up
    /// requests.
    background: ConnSlot,
}

/// Connections to the other members and what this node believes about their health.
#[derive(Debug)]
pub struct Peers {
    me: String,
    /// The members other than this node. Replaced whole when membership changes; callers
    /// clone a slot out, so no lock is held across a network call.
    slots: std::sync::RwLock<HashMap<String, Arc<PeerSlot>>>,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    /// The core's failure detector, on milliseconds since `clock_base`.
    health: Mutex<FailureDetector>,
    clock_base: Instant,
    timeout: Duration,
    advertise: Option<SocketAddr>,
}

impl Peers {
    /// Peers reached through `endpoint` (the node's own, so replies come from its port).
    pub fn new(
        me: String,
        addrs: HashMap<String, SocketAddr>,
        endpoint: quinn::Endpoint,
        config: quinn::ClientConfig,
        timeout: Duration,
    ) -> Peers {
        let peers = Peers {
            me,
            slots: Default::default(),
            endpoint,
            config,
            health: Mutex::new(FailureDetector::new()),
            clock_base: Instant::now(),
            timeout,
            advertise: None,
        };
        peers.set_members(addrs);
        peers
    }

    fn slots(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<PeerSlot>>> {
        // Slots are replaced whole; a panic elsewhere cannot leave the map half-written.
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, node: &str) -> Option<Arc<PeerSlot>> {
        self.slots().get(node).cloned()
    }

    /// Sets the other members and their addresses (after a membership change). Peers whose
    /// address is unchanged keep their connections; this node's own name is ignored.
    pub fn set_members(&self, addrs: HashMap<String, SocketAddr>) {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let next: HashMap<String, Arc<PeerSlot>> = addrs
            .into_iter()
            .filter(|(node, _)| *node != self.me)
            .map(|(node, addr)| {
                let slot = match slots.get(&node) {
                    Some(s) if s.addr == addr => Arc::clone(s),
                    _ => Arc::new(PeerSlot {
                        addr,
                        conn: Arc::default(),
                        background: Arc::default(),
                    }),
                };
                (node, slot)
            })
            .collect();
        *slots = next;
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// This node's address for clients: its entry in the member list, else as bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.advertise.unwrap_or_else(|| {
            self.endpoint
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
        })
    }

    /// Sets the address clients are told to use for this node (see [`Peers::local_addr`]).
    pub fn set_advertise(&mut self, addr: Option<SocketAddr>) {
        self.advertise = addr;
    }

    /// Address of a member (None for this node or an unknown name).
    pub fn addr(&self, node: &str) -> Option<SocketAddr> {
        self.slots().get(node).map(|s| s.addr)
    }

    /// Names of the other members, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.slots().keys().cloned().collect();
        names.sort();
        names
    }

    /// Names of the other members not currently believed down, sorted.
    pub fn up_names(&self) -> Vec<String> {
        let mut names = self.names();
        names.retain(|n| self.is_up(n));
        names
    }

    /// True when `node` is one of the other members.
    pub fn is_peer(&self, node: &str) -> bool {
        self.slots().contains_key(node)
    }

    fn health(&self) -> std::sync::MutexGuard<'_, FailureDetector> {
        // The detector is updated in single calls that cannot panic halfway; a panic
        // elsewhere cannot leave it half-written, so a poisoned lock is still consistent.
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True unless `node` is a peer currently believed down. This node is always up.
    pub fn is_up(&self, node: &str) -> bool {
        node == self.me || self.health().is_up(node)
    }

    /// Peers currently believed down.
    pub fn down(&self) -> Vec<String> {
        self.health().down()
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.clock_base).as_millis()).unwrap_or(u64::MAX)
    }

    /// Records a failure of a request that started at `started` (see
    /// [`FailureDetector::on_failure`]).
    fn mark_down(&self, node: &str, started: Instant) {
        let (started_ms, now_ms) = (self.ms(started), self.ms(Instant::now()));
        if self.health().on_failure(node, started_ms, now_ms) {
            tracing::warn!(peer = node, "peer marked down");
        }
    }

    fn mark_up(&self, node: &str) {
        let now_ms = self.ms(Instant::now());
        if self.health().on_success(node, now_ms) {
            tracing::info!(peer = node, "peer is back up");
        }
    }

    /// `node` sent this node a request: if it is down here, probe it at the next probe tick
    /// instead of when its backoff ends (see [`FailureDetector::on_heard_from`]).
    pub fn heard_from(&self, node: &str) {
        let now_ms = self.ms(Instant::now());
        self.health().on_heard_from(node, now_ms);
    }

    /// Probes every down peer whose backoff has expired; called periodically. Each probe
    /// runs on its own: a peer that is cut off takes the whole peer timeout to fail, which
    /// must not hold up the probe of one that is back (the detector sends no second probe to
    /// a peer while one is out).
    pub fn probe_down_peers(self: &Arc<Self>) {
        let now_ms = self.ms(Instant::now());
        let due = self.health().due_probes(now_ms);
        for node in due {
            let peers = Arc::clone(self);
            // `call` marks the peer up on success and pushes the backoff on failure.
            tokio::spawn(async move {
                let _ = peers.call(&node, &PeerRequest::Ping).await;
            });
        }
    }

    async fn connection(
        &self,
        node: &str,
        background: bool,
    ) -> Result<quinn::Connection, PeerError> {
        let peer = self
            .slot(node)
            .ok_or_else(|| PeerError::Unknown(node.to_string()))?;
        let mut slot = if background {
            peer.background.lock().await
        } else {
            peer.conn.lock().await
        };
        if let Some(c) = slot.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let conn = self.dial(node, peer.addr).await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn dial(&self, node: &str, addr: SocketAddr) -> Result<quinn::Connection, PeerError> {
        let transport = |message: String| PeerError::Transport {
            node: node.to_string(),
            addr,
            message,
        };
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, NODE_SERVER_NAME)
            .map_err(|e| transport(e.to_string()))?;
        tokio::time::timeout(self.timeout, connecting)
            .await
            .map_err(|_| PeerError::Timeout {
                node: node.to_string(),
                ms: self.timeout.as_millis(),
            })?
            .map_err(|e| transport(e.to_string()))
    }

    /// One request to a node known only by address (a seed, when joining a cluster), on a
    /// connection of its own that is closed afterwards.
    pub async fn call_addr(
        &self,
        addr: SocketAddr,
        req: &PeerRequest,
    ) -> Result<PeerResponse, PeerError> {
        let name = addr.to_string();
        let exchange = async {
            let conn = self.dial(&name, addr).await?;
            let result = Self::exchange_on(&conn, &name, req).await;
            conn.close(0u32.into(), b"done");
            result
        };
        let result = tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(PeerError::Timeout {
                    node: name.clone(),
                    ms: self.timeout.as_millis(),
                })
            });
        match result {
            Ok(PeerResponse::Error(e)) => Err(PeerError::Refused {
                node: name,
                message: e.message,
            }),
            other => other,
        }
    }

    /// The deadline of a request carrying `bytes` of payload: the peer timeout plus the
    /// time to move them at [`TRANSFER_BYTES_PER_SEC_MIN`], so an 18 MB plugin is not cut
    /// off by a deadline made for small messages.
    pub fn transfer_deadline(&self, bytes: u64) -> Duration {
        self.timeout
            + Duration::from_millis(bytes.saturating_mul(1000) / TRANSFER_BYTES_PER_SEC_MIN)
    }

    /// Sends one request and waits for its answer (within the peer timeout). Failures mark
    /// the peer down; success marks it up.
    pub async fn call(&self, node: &str, req: &PeerRequest) -> Result<PeerResponse, PeerError> {
        self.call_within(node, req, self.timeout).await
    }

    /// [`Peers::call`] with its own deadline: a forwarded write waits for the whole
    /// coordination on the other side, not just one peer round trip.
    pub async fn call_within(
        &self,
        node: &str,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, self.exchange(node, req, false))
            .await
            .unwrap_or_else(|_| {
                Err(PeerError::Timeout {
                    node: node.to_string(),
                    ms: timeout.as_millis(),
                })
            });
        match &result {
            Ok(PeerResponse::Error(e)) => {
                // It answered, so it is up; the request itself was refused.
                self.mark_up(node);
                return Err(PeerError::Refused {
                    node: node.to_string(),
                    message: e.message.clone(),
                });
            }
            Ok(_) => self.mark_up(node),
            Err(PeerError::Refused { .. }) | Err(PeerError::Unknown(_)) => {}
            Err(_) => {
                self.mark_down(node, started);
                // Drop a broken connection so the next call dials afresh.
                if let Some(slot) = self.slot(node) {
                    *slot.conn.lock().await = None;
                }
            }
        }
        result
    }

    /// A background request (metadata sync) that does not feed the failure detector: a peer
    /// that is still starting, or slow to answer a bulk transfer, must not be marked down
    /// for routing because of it.
    pub async fn call_untracked(
        &self,
        node: &str,
        req: &PeerRequest,
    ) -> Result<PeerResponse, PeerError> {
        self.call_untracked_within(node, req, self.timeout).await
    }

    /// [`Peers::call_untracked`] with its own deadline, for transfers whose size is known
    /// (plugin bytes): see [`Peers::transfer_deadline`].
    pub async fn call_untracked_within(
        &self,
        node: &str,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let result = tokio::time::timeout(timeout, self.exchange(node, req, true))
            .await
            .unwrap_or_else(|_| {
                Err(PeerError::Timeout {
                    node: node.to_string(),
                    ms: timeout.as_millis(),
                })
            });
        if let Err(PeerError::Transport { .. } | PeerError::Timeout { .. }) = &result
            && let Some(slot) = self.slot(node)
        {
            *slot.background.lock().await = None;
        }
        match result {
            Ok(PeerResponse::Error(e)) => Err(PeerError::Refused {
                node: node.to_string(),
                message: e.message,
            }),
            other => other,
        }
    }

    async fn exchange(
        &self,
        node: &str,
        req: &PeerRequest,
        background: bool,
    ) -> Result<PeerResponse, PeerError> {
        let conn = self.connection(node, background).await?;
        let result = Self::exchange_on(&conn, node, req).await;
        // A stateless reset means the peer restarted and holds no state of this
        // connection, so it never saw the request: redial once and send it again.
        if result.is_err() && matches!(conn.close_reason(), Some(quinn::ConnectionError::Reset)) {
            tracing::debug!(
                peer = node,
                "connection reset by a restarted peer; redialling"
            );
            let conn = self.connection(node, background).await?;
            return Self::exchange_on(&conn, node, req).await;
        }
        result
    }

    async fn exchange_on(
        conn: &quinn::Connection,
        node: &str,
        req: &PeerRequest,
    ) -> Result<PeerResponse, PeerError> {
        let addr = conn.remote_address();
        let transport = |message: String| PeerError::Transport {
            node: node.to_string(),
            addr,
            message,
        };
        let frame = wire::encode_frame(req).map_err(|e| transport(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| transport(e.to_string()))?;
        send.write_all(&frame)
            .await
            .map_err(|e| transport(e.to_string()))?;
        send.finish().map_err(|e| transport(e.to_string()))?;
        let bytes = recv
            .read_to_end(FRAME_HEADER_BYTES + PEER_FRAME_BYTES_MAX)
            .await
            .map_err(|e| transport(e.to_string()))?;
        wire::decode_frame(&bytes, PEER_FRAME_BYTES_MAX).map_err(|e| transport(e.to_string()))
    }
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    // Found by the `peer_request` fuzz target: nested `OnRing`s overflowed the stack.
    #[test]
    fn nested_on_ring_is_refused_while_decoding() {
        let one = PeerRequest::OnRing {
            ring: quiver_core::ring::RingId {
                version: 0,
                hash: [0xaa; 16],
            },
            request: Box::new(PeerRequest::Ping),
        };
        let bytes = postcard::to_allocvec(&one).expect("encodes");
        // The innermost Ping is the last byte; repeat the OnRing prefix around it.
        let level = &bytes[..bytes.len() - 1];
        let mut deep = level.repeat(100_000);
        deep.push(0);
        let refused = std::thread::Builder::new()
            .stack_size(2 << 20) // a tokio worker's stack
            .spawn(move || wire::decode_body::<PeerRequest>(&deep).is_err())
            .expect("spawn")
            .join()
            .expect("no stack overflow");
        assert!(refused);
        let two = level.repeat(2).into_iter().chain([0]).collect::<Vec<u8>>();
        assert!(wire::decode_body::<PeerRequest>(&two).is_err());
        assert_eq!(
            wire::decode_body::<PeerRequest>(&bytes).expect("one level decodes"),
            one
        );
        // The depth is released after a refusal: the next frame decodes.
        assert!(wire::decode_body::<PeerRequest>(&bytes).is_ok());
    }
}
