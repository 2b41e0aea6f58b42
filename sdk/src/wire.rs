//! The client wire protocol, shared by the SDK and the node.
//!
//! One request per bidirectional QUIC stream: the client writes one frame and finishes its
//! send side; the node answers with one frame and finishes. A frame is a 4-byte big-endian
//! length followed by that many bytes of postcard-encoded [`Request`] or [`Response`].
//! The protocol version lives in the ALPN ([`ALPN_CLIENT_V1`]); a node refuses the handshake
//! of a client that offers no version it speaks, so a frame is never misread by a node of
//! another version.

use quiver_core::meta::{BucketSpec, PluginInfo, PluginRef, Stamp};
use serde::{Deserialize, Serialize};

/// ALPN of version 1 of the client protocol.
pub const ALPN_CLIENT_V1: &[u8] = b"quiver-client/1";
/// Protocol version number carried by [`ALPN_CLIENT_V1`].
pub const PROTOCOL_VERSION: u32 = 1;
/// TLS server name every node certificate carries; clients verify it against the cluster
/// CA, so any node of the cluster is acceptable at any address.
pub const NODE_SERVER_NAME: &str = "quiver-node";
/// Bytes of the frame length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// How durable a write must be before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireDurability {
    /// fsync (group-committed) before acknowledging.
    Sync,
    /// Acknowledge once the write is in the engine's memory; a crash may lose it.
    Buffered,
}

/// Per-request options of a read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOptions {
    /// Server-side deadline in milliseconds; the node's default when `None`.
    pub timeout_ms: Option<u32>,
    /// Replies needed (1..=n); the cluster default when `None`.
    pub r: Option<u8>,
    /// Return the siblings as stored, without running the bucket's reconciler.
    pub raw: bool,
    /// Return the siblings without their values (sizes, metadata and the context only):
    /// how a key whose siblings together pass the node's response budget is resolved.
    pub head: bool,
}

/// Per-request options of a write (put or delete).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOptions {
    /// Server-side deadline in milliseconds; the node's default when `None`.
    pub timeout_ms: Option<u32>,
    /// Durability for this write; the node's configured default when `None`.
    pub durability: Option<WireDurability>,
    /// Acknowledgements needed (1..=n); the cluster default when `None`.
    pub w: Option<u8>,
}

/// A client request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness and identity check.
    Ping,
    /// The node's view of the cluster: members, their health, hints held, quorum defaults.
    Status,
    /// The ring and member addresses, for clients that route requests to replicas.
    Ring,
    /// Read every sibling of a key.
    Get {
        /// Bucket name (1 to 255 bytes of UTF-8).
        bucket: String,
        /// Key bytes (1 byte to 64 KiB).
        key: Vec<u8>,
        /// Options.
        options: ReadOptions,
    },
    /// Write a value.
    Put {
        /// Bucket name.
        bucket: String,
        /// Key bytes.
        key: Vec<u8>,
        /// Opaque context from an earlier get (empty for none).
        context: Vec<u8>,
        /// Value bytes.
        value: Vec<u8>,
        /// Options.
        options: WriteOptions,
    },
    /// Write a tombstone.
    Delete {
        /// Bucket name.
        bucket: String,
        /// Key bytes.
        key: Vec<u8>,
        /// Opaque context from an earlier get (empty for none).
        context: Vec<u8>,
        /// Options.
        options: WriteOptions,
    },
    /// Apply an operation with the bucket reconciler's `update` at the coordinator (no
    /// client read-modify-write): e.g. increment a counter, add an item to a cart.
    Update {
        /// Bucket name (must have a reconciler).
        bucket: String,
        /// Key bytes.
        key: Vec<u8>,
        /// The operation, in the plugin's format.
        op: Vec<u8>,
        /// Options.
        options: WriteOptions,
    },
    /// Upload a reconciler plugin (a Wasm component). The node validates it, checks the
    /// merge laws (unless `force`), stores it and replicates it to every node.
    PluginUpload {
        /// Plugin name (1 to 64 characters: letters, digits, `-`, `_`).
        name: String,
        /// The component bytes.
        component: Vec<u8>,
        /// Store it even if the merge laws are violated.
        force: bool,
    },
    /// Every uploaded plugin version.
    PluginList,
    /// One plugin's versions and the buckets using them.
    PluginShow {
        /// Plugin name.
        name: String,
    },
    /// Change a bucket's runtime properties; fields left `None` keep their value.
    BucketSet {
        /// Bucket name.
        bucket: String,
        /// The changes (`reconciler` is ignored: see the next fields).
        changes: BucketSpec,
        /// Attach a reconciler: `NAME` (latest version) or `NAME@HASH` (a hash prefix).
        reconciler: Option<String>,
        /// Detach the bucket's reconciler (siblings go back to clients).
        detach_reconciler: bool,
    },
    /// A bucket's properties.
    BucketShow {
        /// Bucket name.
        bucket: String,
    },
    /// Stage the answering node's join to the cluster of the node at `seed` (`IP:port`).
    /// The answering node must hold no data; it takes the cluster's ring and members and
    /// owns nothing until a commit.
    ClusterJoin {
        /// Address of any member of the cluster to join.
        seed: String,
    },
    /// Stage a member's departure (the answering node's if `node` is `None`). After the
    /// commit it hands its data to the new owners, then stops.
    ClusterLeave {
        /// The member to remove.
        node: Option<String>,
    },
    /// The staged changes and the data they would move.
    ClusterPlan,
    /// Apply the staged changes: rebalance the ring and start the handoffs.
    ClusterCommit,
    /// Authenticates the connection with an access key; every later request on it acts as
    /// that key. The SDK sends it first on every connection it opens.
    Authenticate {
        /// The key's name.
        key: String,
        /// The key's secret.
        secret: Vec<u8>,
    },
    /// Create an access key (admin). The answer carries the secret, once.
    KeyCreate {
        /// Key name (1 to 64 ASCII letters, digits, `-`, `_`).
        name: String,
        /// An admin key may do everything.
        admin: bool,
        /// Bucket grants, `BUCKET:ACCESS` or `PREFIX*:ACCESS` (access: read, write or
        /// readwrite).
        grants: Vec<String>,
    },
    /// Every access key (admin); secrets are never shown.
    KeyList,
    /// One access key (admin).
    KeyShow {
        /// Key name.
        name: String,
    },
    /// Delete an access key (admin); it stops working on every node as the deletion spreads.
    KeyDelete {
        /// Key name.
        name: String,
    },
    /// Delete a plugin version (admin): `NAME@HASH` (a unique hash prefix of at least 6
    /// digits). Refused while a bucket uses it. Final: the same bytes cannot be uploaded
    /// again under that name.
    PluginDelete {
        /// `NAME@HASH`.
        plugin: String,
    },
}

/// An access key as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Key name.
    pub name: String,
    /// Whether it is an admin key.
    pub admin: bool,
    /// Its bucket grants, as `BUCKET:ACCESS` / `PREFIX*:ACCESS`.
    pub grants: Vec<String>,
    /// Who created it, when.
    pub created: Stamp,
}

/// One member in a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanMember {
    /// Node name.
    pub node: String,
    /// Its address.
    pub addr: String,
    /// joining, valid, leaving or left.
    pub state: String,
    /// Partitions it owns in the committed ring.
    pub owned_now: u32,
    /// Partitions it would own after the staged changes.
    pub owned_next: u32,
    /// Partitions whose replica it would receive.
    pub replicas_gained: u32,
    /// Partitions whose replica it would hand off.
    pub replicas_lost: u32,
    /// Estimated keys it would receive.
    pub keys_in: u64,
    /// Estimated keys it would hand off.
    pub keys_out: u64,
}

/// Staged membership changes as a node sees them (answer to the cluster admin requests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanView {
    /// The answering node.
    pub node: String,
    /// Version of the committed ring.
    pub ring_version: u64,
    /// Version of the ring a commit would make; `None` when nothing is staged.
    pub next_version: Option<u64>,
    /// True when this answer is to a commit that was applied.
    pub committed: bool,
    /// Every member that has not left.
    pub members: Vec<PlanMember>,
    /// Partition ownership moves: (from, to, partitions).
    pub transfers: Vec<(String, String, u32)>,
    /// Estimated keys in the cluster (from the answering node's trees).
    pub keys_estimated: u64,
    /// Estimated key copies that move (received by new replicas).
    pub copies_moved: u64,
    /// Key copies held in the cluster before the change (keys × n).
    pub copies_total: u64,
}

/// One sibling as sent to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSibling {
    /// Value bytes (empty for a tombstone, and for every sibling of a head read).
    pub value: Vec<u8>,
    /// Length of the stored value in bytes (also in a head read).
    pub value_bytes: u64,
    /// True for a delete marker.
    pub tombstone: bool,
    /// Coordinator wall clock at write time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The writing actor, rendered.
    pub actor: String,
}

/// One member as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Node name.
    pub node: String,
    /// Its address (empty for the answering node itself).
    pub addr: String,
    /// False when the answering node currently believes it down.
    pub up: bool,
    /// Ring partitions it owns.
    pub partitions: u32,
    /// joining, valid, leaving (`crate`'s membership states; left members are not listed).
    pub state: String,
}

/// A node's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The answering node.
    pub node: String,
    /// Every member, this node included.
    pub members: Vec<MemberStatus>,
    /// Hints this node holds for unreachable members.
    pub hints: u64,
    /// Ring partitions.
    pub partitions: u32,
    /// Default replicas per key.
    pub n: u8,
    /// Default read quorum.
    pub r: u8,
    /// Default write quorum.
    pub w: u8,
    /// Reconciler plugin calls that failed on this node since it started.
    pub plugin_failures: u64,
    /// Keys in this node's anti-entropy trees.
    pub ae_keys: u64,
    /// Anti-entropy exchanges this node initiated since it started.
    pub ae_exchanges: u64,
    /// Keys repaired by those exchanges (here or at the peer).
    pub ae_keys_repaired: u64,
    /// Bytes of anti-entropy messages this node sent since it started.
    pub ae_bytes_sent: u64,
    /// Keys on this node whose siblings are all tombstones (not reaped yet).
    pub tombstones: u64,
    /// Tombstones this node removed since it started, once every replica held them.
    pub tombstones_reaped: u64,
    /// Version of the ring this node holds.
    pub ring_version: u64,
    /// Replicas (trees) this node holds but no longer owns: handoffs still to do.
    pub handoff_partitions: u64,
    /// Keys in those replicas.
    pub handoff_keys: u64,
    /// Keys this node handed off that changed their new owner, since it started.
    pub handoff_keys_sent: u64,
    /// Keys this node dropped after handing them off, since it started.
    pub handoff_keys_dropped: u64,
    /// Gets coordinated here that asked a left-out replica because the asked ones were
    /// slow to answer (`--read-speculate-ms`).
    pub reads_speculated: u64,
    /// Client requests this node refused since it started because they carried no valid
    /// access key (`Unauthenticated`) or their key lacked the grant (`Forbidden`).
    pub auth_refused: u64,
    /// Connections refused at the handshake since start by `--connections-max` or
    /// `--connections-per-address-max`.
    pub connections_refused: u64,
}

/// A bucket's properties as a node applies them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketInfo {
    /// Bucket name.
    pub bucket: String,
    /// Properties set at runtime (`quiver bucket set`), as replicated.
    pub spec: BucketSpec,
    /// Who set them last, if anyone did.
    pub set_by: Option<Stamp>,
    /// Effective replicas per key.
    pub n: u8,
    /// Effective default read quorum.
    pub r: u8,
    /// Effective default write quorum.
    pub w: u8,
    /// Effective sloppy-quorum setting.
    pub sloppy_quorum: bool,
    /// Effective sibling threshold of the reconciler guard.
    pub sibling_threshold: u32,
    /// Whether this node has the reconciler loaded (false while its bytes are still on the
    /// way from another node, or if it failed to load here).
    pub reconciler_loaded: bool,
}

/// Typed error codes a node may answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame did not decode as a request.
    MalformedRequest,
    /// The frame's declared length exceeds the node's frame limit.
    FrameTooLarge,
    /// The key is empty.
    EmptyKey,
    /// The key exceeds the key limit.
    KeyTooLarge,
    /// The value exceeds the value limit.
    ValueTooLarge,
    /// The bucket name is empty, too long or not valid.
    InvalidBucket,
    /// The context bytes are not a context this cluster produced.
    InvalidContext,
    /// The key holds too many siblings; read it and write with its context to resolve them.
    TooManySiblings,
    /// The storage engine failed; the write was not acknowledged.
    Storage,
    /// The request's deadline passed.
    Timeout,
    /// The node is shutting down.
    ShuttingDown,
    /// Too few replicas answered; the message names how many and which failed.
    QuorumFailed,
    /// The requested r/w is not valid for the replication factor.
    InvalidQuorum,
    /// A plugin was refused at upload: not a valid reconciler component, or its merge
    /// breaks the laws (the message lists the violations).
    PluginRejected,
    /// No plugin (or version) of that name exists.
    UnknownPlugin,
    /// The bucket's plugin failed this call (trap, fuel, memory, output size, or its own
    /// error); the stored data is untouched. The message names the plugin.
    PluginFailed,
    /// The operation needs a reconciler and the bucket has none.
    NoReconciler,
    /// A bug in the node; the message says more.
    Internal,
    /// A membership change was refused (unknown member, nothing staged, not an empty node,
    /// another cluster's seed).
    Membership,
    /// The connection carries no valid access key (none given, unknown, wrong secret, or
    /// deleted since).
    Unauthenticated,
    /// The access key is valid but lacks the grant for this operation; the message names
    /// the operation and the bucket.
    Forbidden,
    /// An access-key request was refused (bad name or grant, name taken, unknown key).
    InvalidKey,
    /// The reply would pass the node's response budget (many large siblings); read with
    /// `head` for the context and resolve the siblings with a write.
    ResponseTooLarge,
    /// The plugin version is attached to a bucket; detach it (or attach another) first.
    PluginInUse,
    /// The request asks for more than a node limit allows (a plugin limit above the node's
    /// cap, too many buckets or plugin versions, too many uploads at once); the message
    /// names the limit.
    LimitExceeded,
}

/// A typed error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable detail with context (node, bucket, key).
    pub message: String,
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong {
        /// The answering node's name.
        node: String,
        /// Its protocol version.
        protocol: u32,
    },
    /// Answer to [`Request::Status`].
    Status(Box<NodeStatus>),
    /// Answer to [`Request::Ring`].
    Ring {
        /// The ring, as `quiver_core::ring::Ring::encode` bytes.
        ring: Vec<u8>,
        /// Every member's name and client address.
        members: Vec<(String, String)>,
        /// Default replicas per key.
        n: u8,
    },
    /// Answer to [`Request::Get`]; no siblings means the key was never written.
    Get {
        /// All siblings, tombstones included.
        siblings: Vec<WireSibling>,
        /// Opaque context covering every sibling.
        context: Vec<u8>,
    },
    /// Answer to [`Request::Put`] and [`Request::Delete`].
    Written {
        /// Opaque context covering the client's context and this write.
        context: Vec<u8>,
    },
    /// Answer to [`Request::PluginUpload`].
    PluginUploaded {
        /// What was stored.
        plugin: Box<PluginInfo>,
        /// Merge-law violations found (empty unless uploaded with `force`).
        violations: Vec<String>,
        /// Nodes that hold it now (the receiving node included).
        replicated_to: Vec<String>,
        /// Nodes that could not be reached; they get it by metadata sync when back.
        pending: Vec<String>,
    },
    /// Answer to [`Request::PluginList`] and [`Request::PluginShow`].
    Plugins {
        /// Plugin versions, oldest upload first.
        versions: Vec<PluginInfo>,
        /// Buckets and the version each uses.
        buckets: Vec<(String, PluginRef)>,
    },
    /// Answer to [`Request::BucketSet`] and [`Request::BucketShow`].
    Bucket(Box<BucketInfo>),
    /// Answer to the cluster admin requests (join, leave, plan, commit).
    Plan(Box<PlanView>),
    /// Answer to [`Request::Authenticate`].
    Authenticated {
        /// The key's name.
        key: String,
        /// Whether it is an admin key.
        admin: bool,
    },
    /// Answer to [`Request::KeyCreate`]: the key's text form `NAME.SECRET`, shown once.
    KeyCreated {
        /// What was created.
        key: KeyInfo,
        /// The secret token; the cluster keeps only a salted hash of it.
        token: String,
    },
    /// Answer to [`Request::KeyList`], [`Request::KeyShow`] and [`Request::KeyDelete`] (the
    /// deleted key).
    Keys(Vec<KeyInfo>),
    /// The request failed.
    Error(ErrorReply),
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame is shorter than its header or its declared length.
    #[error("frame truncated: {0}")]
    Truncated(String),
    /// The declared length exceeds the limit.
    #[error("frame of {declared} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Declared length.
        declared: usize,
        /// Limit.
        max: usize,
    },
    /// The body is not valid postcard for the expected type.
    #[error("frame body does not decode: {0}")]
    Decode(String),
}

/// Encodes `msg` as one frame (length prefix + postcard body).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    // Serialize after a zeroed header, then fill the header in: one allocation, no copy.
    let mut out = postcard::to_extend(msg, vec![0u8; FRAME_HEADER_BYTES])
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    let body_len = out.len() - FRAME_HEADER_BYTES;
    let len = u32::try_from(body_len).map_err(|_| FrameError::TooLarge {
        declared: body_len,
        max: u32::MAX as usize,
    })?;
    out[..FRAME_HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Reads the declared body length from a frame header.
pub fn frame_len(header: [u8; FRAME_HEADER_BYTES]) -> usize {
    u32::from_be_bytes(header) as usize
}

/// Decodes a frame body (without its header).
pub fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Decode(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

/// Decodes a whole frame (header and body), checking the declared length.
pub fn decode_frame<'a, T: Deserialize<'a>>(frame: &'a [u8], max: usize) -> Result<T, FrameError> {
    let Some((header, body)) = frame.split_first_chunk::<FRAME_HEADER_BYTES>() else {
        return Err(FrameError::Truncated(format!(
            "{} bytes, no header",
            frame.len()
        )));
    };
    let declared = frame_len(*header);
    if declared > max {
        return Err(FrameError::TooLarge { declared, max });
    }
    if body.len() != declared {
        return Err(FrameError::Truncated(format!(
            "header declares {declared} bytes, {} arrived",
            body.len()
        )));
    }
    decode_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let req = Request::Put {
            bucket: "b".into(),
            key: b"k".to_vec(),
            context: vec![],
            value: vec![1, 2, 3],
            options: WriteOptions {
                timeout_ms: Some(5),
                durability: Some(WireDurability::Sync),
                w: Some(2),
            },
        };
        let frame = encode_frame(&req).expect("encodes");
        assert_eq!(
            decode_frame::<Request>(&frame, 1 << 20).expect("decodes"),
            req
        );
        assert!(matches!(
            decode_frame::<Request>(&frame, 2),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(decode_frame::<Request>(&frame[..frame.len() - 1], 1 << 20).is_err());
        assert!(decode_frame::<Request>(&[0, 0, 0, 2, 0xff, 0xff], 1 << 20).is_err());
    }
}
