//! The peer protocol: every request one node sends another and every answer, as they
//! travel on the wire (postcard in the client protocol's frames, one request per stream).
//!
//! The server and the simulator speak exactly these types. The machines of this crate have
//! protocols of their own (`exchange`, `reap`, `handoff`, `request`), which predate this
//! module's place here; the conversions below map them onto the wire variants both ways.

use quiver_core::causality::Object;
use quiver_core::membership::MemberEntry;
use quiver_core::merkle::Hash;
use quiver_core::meta::MetaState;
use quiver_sdk::wire::{ErrorCode, ErrorReply, Request, Response};
use serde::{Deserialize, Serialize};

use crate::exchange::{AeRequest, AeResponse, LeafKeys};
use crate::handoff::{Ask, HandoffRequest, HandoffResponse};
use crate::reap::{ReapRequest, ReapResponse};
use crate::request::{DataRequest, StoreRequest};

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

/// The data path's requests travel as `Fetch` and `Store`.
impl From<DataRequest> for PeerRequest {
    fn from(request: DataRequest) -> Self {
        match request {
            DataRequest::Fetch { bucket, key } => PeerRequest::Fetch { bucket, key },
            DataRequest::Store(StoreRequest {
                bucket,
                key,
                object,
                hint_for,
                sync,
            }) => PeerRequest::Store {
                bucket,
                key,
                object,
                hint_for,
                sync,
            },
        }
    }
}

impl PeerRequest {
    /// The data-path request this is, if it is one.
    pub fn into_data(self) -> Option<DataRequest> {
        Some(match self {
            PeerRequest::Fetch { bucket, key } => DataRequest::Fetch { bucket, key },
            PeerRequest::Store {
                bucket,
                key,
                object,
                hint_for,
                sync,
            } => DataRequest::Store(StoreRequest {
                bucket,
                key,
                object,
                hint_for,
                sync,
            }),
            _ => return None,
        })
    }
}

/// What an incoming peer request asks of the receiving node: the dispatch rules every
/// driver follows, so a request is routed to the same machine by the server and the
/// simulator.
#[derive(Debug)]
pub enum Inbound {
    /// Liveness probe: answer `Pong`.
    Ping,
    /// A replica's `Fetch` or `Store`.
    Data(DataRequest),
    /// A client request handed to this node to coordinate.
    Forward {
        /// The client's request.
        request: Request,
        /// The primary this node stands in for, if it was picked as a fallback.
        hint_for: Option<String>,
    },
    /// Metadata gossip: the sender's digest.
    MetaDigest([u8; 32]),
    /// Metadata push: merge `state`, keep `blobs`.
    MetaPush {
        /// The sender's metadata.
        state: MetaState,
        /// Plugin bytes the receiver may lack.
        blobs: Vec<(String, Vec<u8>)>,
    },
    /// The bytes of these plugin versions.
    MetaBlobs(Vec<String>),
    /// A node asks to join.
    Join {
        /// The joining node's name.
        node: String,
        /// Its member entry.
        entry: MemberEntry,
        /// Its partition count.
        partitions: u32,
        /// Its default `(n, r, w)`.
        quorum: (u8, u8, u8),
    },
    /// An anti-entropy step.
    Ae(AeRequest),
    /// A reaping step (its ring is checked by [`crate::reap::answer`]).
    Reap(ReapRequest),
    /// A handoff step (its ring is checked by [`crate::handoff::answer`]).
    Handoff(HandoffRequest),
    /// Refused before any machine sees it.
    Refuse(ErrorReply),
}

impl PeerRequest {
    /// Routes this request at node `me`, whose ring's id `own` gives. `own` is called only
    /// for the steps that need it (`Ring::id` hashes the whole ring, too much for every
    /// `Fetch` and `Store`).
    ///
    /// - Reaping and handoff steps inside an `OnRing` go to their machines, which compare
    ///   rings themselves; bare ones (what nodes sent before `OnRing`) count as sent on
    ///   `own`.
    /// - Any other step inside an `OnRing` is answered only on the same ring, and an
    ///   `OnRing` inside an `OnRing` is refused (decoding refuses it already; this covers
    ///   values built in memory).
    pub fn inbound(self, me: &str, own: &dyn Fn() -> quiver_core::ring::RingId) -> Inbound {
        match self {
            PeerRequest::Ping => Inbound::Ping,
            PeerRequest::Fetch { bucket, key } => Inbound::Data(DataRequest::Fetch { bucket, key }),
            PeerRequest::Store {
                bucket,
                key,
                object,
                hint_for,
                sync,
            } => Inbound::Data(DataRequest::Store(StoreRequest {
                bucket,
                key,
                object,
                hint_for,
                sync,
            })),
            PeerRequest::Forward { request, hint_for } => Inbound::Forward { request, hint_for },
            PeerRequest::MetaDigest(digest) => Inbound::MetaDigest(digest),
            PeerRequest::MetaPush { state, blobs } => Inbound::MetaPush { state, blobs },
            PeerRequest::MetaBlobs(hashes) => Inbound::MetaBlobs(hashes),
            PeerRequest::Join {
                node,
                entry,
                partitions,
                quorum,
            } => Inbound::Join {
                node,
                entry,
                partitions,
                quorum,
            },
            PeerRequest::HandoffPush(objects) => Inbound::Handoff(HandoffRequest {
                ring: own(),
                ask: Ask::Push(objects),
            }),
            PeerRequest::ReapCheck(keys) => Inbound::Reap(ReapRequest::Check { ring: own(), keys }),
            PeerRequest::Reap(keys) => Inbound::Reap(ReapRequest::Reap { ring: own(), keys }),
            PeerRequest::AeDigest {
                from,
                trees,
                digest,
            } => Inbound::Ae(AeRequest::Digest {
                from,
                trees,
                digest,
            }),
            PeerRequest::AeDone { from } => Inbound::Ae(AeRequest::Done { from }),
            PeerRequest::AeRoots(r) => Inbound::Ae(AeRequest::Roots(r)),
            PeerRequest::AeLeaves(a) => Inbound::Ae(AeRequest::Leaves(a)),
            PeerRequest::AeKeys(a) => Inbound::Ae(AeRequest::Keys(a)),
            PeerRequest::AeFetch(k) => Inbound::Ae(AeRequest::Fetch(k)),
            PeerRequest::AePush(o) => Inbound::Ae(AeRequest::Push(o)),
            PeerRequest::OnRing { ring, request } => {
                let handoff = |ask| Inbound::Handoff(HandoffRequest { ring, ask });
                match *request {
                    PeerRequest::ReapCheck(keys) => {
                        Inbound::Reap(ReapRequest::Check { ring, keys })
                    }
                    PeerRequest::Reap(keys) => Inbound::Reap(ReapRequest::Reap { ring, keys }),
                    PeerRequest::AeLeaves(a) => handoff(Ask::Leaves(a)),
                    PeerRequest::AeKeys(a) => handoff(Ask::Keys(a)),
                    PeerRequest::HandoffPush(o) => handoff(Ask::Push(o)),
                    PeerRequest::OnRing { .. } => Inbound::Refuse(ErrorReply {
                        code: ErrorCode::MalformedRequest,
                        message: "nested OnRing".into(),
                    }),
                    step => {
                        let own = own();
                        if ring != own {
                            return Inbound::Refuse(ErrorReply {
                                code: ErrorCode::Membership,
                                message: format!(
                                    "node {me} holds ring version {}, the sender version {} \
                                     (or another ring of that version); retry once gossip has \
                                     spread it",
                                    own.version, ring.version
                                ),
                            });
                        }
                        step.inbound(me, &|| own)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_core::ring::RingId;

    const OWN: RingId = RingId {
        version: 7,
        hash: [1; 16],
    };
    const OTHER: RingId = RingId {
        version: 7,
        hash: [2; 16],
    };

    fn on(ring: RingId, request: PeerRequest) -> PeerRequest {
        PeerRequest::OnRing {
            ring,
            request: Box::new(request),
        }
    }

    fn refused(inbound: Inbound) -> ErrorCode {
        match inbound {
            Inbound::Refuse(reply) => reply.code,
            other => panic!("routed, not refused: {other:?}"),
        }
    }

    #[test]
    fn a_step_on_another_ring_is_refused_and_on_the_same_ring_routed() {
        let code = refused(on(OTHER, PeerRequest::Ping).inbound("n1", &|| OWN));
        assert_eq!(code, ErrorCode::Membership);
        assert!(matches!(
            on(OWN, PeerRequest::Ping).inbound("n1", &|| OWN),
            Inbound::Ping
        ));
        let nested = on(OWN, on(OWN, PeerRequest::Ping));
        assert_eq!(
            refused(nested.inbound("n1", &|| OWN)),
            ErrorCode::MalformedRequest
        );
    }

    #[test]
    fn reaping_and_handoff_steps_keep_the_senders_ring_for_their_machines() {
        // The machines compare rings themselves (and answer in their own terms).
        match on(OTHER, PeerRequest::ReapCheck(Vec::new())).inbound("n1", &|| OWN) {
            Inbound::Reap(ReapRequest::Check { ring, .. }) => assert_eq!(ring, OTHER),
            other => panic!("{other:?}"),
        }
        match PeerRequest::Reap(Vec::new()).inbound("n1", &|| OWN) {
            Inbound::Reap(ReapRequest::Reap { ring, .. }) => assert_eq!(ring, OWN),
            other => panic!("{other:?}"),
        }
        match on(OTHER, PeerRequest::AeLeaves(Vec::new())).inbound("n1", &|| OWN) {
            Inbound::Handoff(HandoffRequest {
                ring,
                ask: Ask::Leaves(_),
            }) => assert_eq!(ring, OTHER),
            other => panic!("{other:?}"),
        }
        match PeerRequest::HandoffPush(Vec::new()).inbound("n1", &|| OWN) {
            Inbound::Handoff(HandoffRequest {
                ring,
                ask: Ask::Push(_),
            }) => assert_eq!(ring, OWN),
            other => panic!("{other:?}"),
        }
        // Bare, the same step is anti-entropy's.
        assert!(matches!(
            PeerRequest::AeLeaves(Vec::new()).inbound("n1", &|| OWN),
            Inbound::Ae(AeRequest::Leaves(_))
        ));
    }
}
