//! What flows between a [`super::Node`] and its driver: peer messages, effects, and
//! observations for checkers and metrics.

use quiver_core::causality::{Dot, Object, VersionVector};
use quiver_sdk::wire::Response;

use quiver_core::meta::PluginRef;

use super::plugin::PluginWork;
use super::{NodeId, Ticket};
use crate::protocol::{PeerRequest, PeerResponse};

/// A message between nodes: a frame of the peer protocol
/// ([`PeerRequest`], [`PeerResponse`]) with the id that pairs a response with its request
/// (the QUIC stream carries the pairing in production).
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

/// Something a node reports for checkers and metrics (a log line in the server).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Observation {
    /// `coordinate_write` issued a dot.
    DotIssued {
        /// Coordinator.
        node: NodeId,
        /// Bucket.
        bucket: String,
        /// Key.
        key: Vec<u8>,
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
    /// A peer call timed out (or could not be carried) and marked the peer down.
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
        /// Bucket.
        bucket: String,
        /// Key.
        key: Vec<u8>,
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
    /// Answer a client request that arrived through [`super::Node::on_client`].
    Reply {
        /// The request.
        ticket: Ticket,
        /// The answer, as production's client protocol gives it.
        result: Response,
    },
    /// Make everything applied so far durable, then report it with
    /// [`super::Node::on_synced`] and this token (the server's group commit; sends and
    /// replies that vouch for durable data wait for it).
    Sync {
        /// Names the sync in `on_synced`.
        token: u64,
    },
    /// Run the reconciler `plugin` of `bucket` (on the driver's plugin pool, with the
    /// bucket's limits), then report with [`super::Node::on_plugin_done`] and this call id.
    Plugin {
        /// Names the call in `on_plugin_done`.
        call: u64,
        /// The bucket whose reconciler it is (its limits apply).
        bucket: String,
        /// The plugin version.
        plugin: PluginRef,
        /// What to ask it.
        work: PluginWork,
    },
    /// Report an observation.
    Observe(Observation),
}
