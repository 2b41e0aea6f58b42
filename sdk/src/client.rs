//! The QUIC client.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use quiver_core::access::KeyToken;
use quiver_core::meta::{BucketSpec, PluginInfo, PluginRef};

use crate::tls;
use crate::wire::{
    self, ALPN_CLIENT_V1, BucketInfo, ErrorCode, FRAME_HEADER_BYTES, KeyInfo, NODE_SERVER_NAME,
    ReadOptions, Request, Response, WriteOptions,
};

/// TLS alert "no_application_protocol" (RFC 7301) as a QUIC crypto error code.
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;
/// Largest reply the client accepts, in bytes: 100 siblings of 1 MiB plus headroom.
const RESPONSE_BYTES_MAX_DEFAULT: usize =
    quiver_core::limits::response_frame_bytes_max(quiver_core::limits::VALUE_BYTES_MAX_DEFAULT);

/// Errors of client calls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad client configuration (CA file, address, ...).
    #[error("client configuration: {0}")]
    Config(String),
    /// The node could not be reached or the handshake failed.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// Node address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The node speaks no protocol version this client offers.
    #[error(
        "node {addr} does not speak protocol {}: upgrade the client or the node",
        String::from_utf8_lossy(ALPN_CLIENT_V1)
    )]
    UnsupportedProtocol {
        /// Node address.
        addr: String,
    },
    /// The connection broke during a request.
    #[error("connection to {addr} failed: {message}")]
    Connection {
        /// Node address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// No reply before the client-side deadline.
    #[error("request to {addr} timed out after {after_ms} ms")]
    Timeout {
        /// Node address.
        addr: String,
        /// Deadline.
        after_ms: u64,
    },
    /// The node answered with a typed error.
    #[error("node {addr} refused the request ({code:?}): {message}")]
    Server {
        /// Node address.
        addr: String,
        /// Error code.
        code: ErrorCode,
        /// The node's explanation.
        message: String,
    },
    /// The node's reply did not follow the protocol.
    #[error("protocol error from {addr}: {message}")]
    Protocol {
        /// Node address.
        addr: String,
        /// What was wrong.
        message: String,
    },
    /// A context string given by the user is not one this client produced.
    #[error("invalid context: {0}")]
    InvalidContext(String),
    /// A routed request ([`crate::ClusterClient`]) failed on every replica it tried; lists
    /// each replica in the order tried with what it answered.
    #[error("{}", ReplicaAttempt::describe(.attempts))]
    Replicas {
        /// One entry per replica tried, in order; never empty.
        attempts: Vec<ReplicaAttempt>,
    },
}

/// One replica a routed request was sent to, and how it failed.
#[derive(Debug)]
pub struct ReplicaAttempt {
    /// The node's name in the ring.
    pub node: String,
    /// The node's client address.
    pub addr: String,
    /// What it answered (or why it could not be reached).
    pub error: Error,
}

impl ReplicaAttempt {
    fn describe(attempts: &[ReplicaAttempt]) -> String {
        let mut s = format!("the request failed on {} replica(s):", attempts.len());
        for a in attempts {
            s.push_str(&format!(" [{} at {}: {}]", a.node, a.addr, a.error));
        }
        s
    }
}

impl Error {
    /// The node's error code, when the node answered with a typed error; for a routed
    /// request that failed on several replicas, the code of the last one (the answer the
    /// caller would have seen without the retries).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            Error::Replicas { attempts } => attempts.last().and_then(|a| a.error.code()),
            _ => None,
        }
    }
}

/// An opaque causal context, returned by reads and writes and passed back on writes.
///
/// Its text form (Display / FromStr) is URL-safe base64, for command lines and JSON.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Context(Vec<u8>);

impl Context {
    /// Wraps raw context bytes (as produced by a node).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// True for the empty context ("I have read nothing").
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(&self.0))
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Context({self})")
    }
}

impl FromStr for Context {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        URL_SAFE_NO_PAD
            .decode(s.trim())
            .map(Context)
            .map_err(|e| Error::InvalidContext(format!("not URL-safe base64: {e}")))
    }
}

/// One version of a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling {
    /// Value bytes (empty for a tombstone, and in a head read).
    pub value: Vec<u8>,
    /// Length of the stored value in bytes (also in a head read).
    pub value_bytes: u64,
    /// True for a delete marker.
    pub tombstone: bool,
    /// Coordinator wall clock at write time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The writing actor.
    pub actor: String,
}

/// The result of a get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetResult {
    /// Every concurrent version, tombstones included.
    pub siblings: Vec<Sibling>,
    /// Context to pass to a write that replaces all of them.
    pub context: Context,
}

impl GetResult {
    /// True when some sibling is a value rather than a tombstone.
    pub fn found(&self) -> bool {
        self.siblings.iter().any(|s| !s.tombstone)
    }
    /// The values of the non-tombstone siblings.
    pub fn values(&self) -> Vec<&[u8]> {
        self.siblings
            .iter()
            .filter(|s| !s.tombstone)
            .map(|s| s.value.as_slice())
            .collect()
    }
}

/// The outcome of [`Client::plugin_upload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginUpload {
    /// What was stored (name, content hash, size, who uploaded it when).
    pub plugin: PluginInfo,
    /// Merge-law violations (empty unless forced).
    pub violations: Vec<String>,
    /// Nodes that hold it now.
    pub replicated_to: Vec<String>,
    /// Nodes not reached yet; metadata sync brings it to them.
    pub pending: Vec<String>,
}

/// Plugin versions and the buckets using them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginListing {
    /// Versions, oldest upload first.
    pub versions: Vec<PluginInfo>,
    /// Buckets and the version each uses.
    pub buckets: Vec<(String, PluginRef)>,
}

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name.
    pub node: String,
    /// Protocol version.
    pub protocol: u32,
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// PEM of the cluster CA certificate.
    pub ca_pem: Vec<u8>,
    /// Client-side deadline per request.
    pub request_timeout: Duration,
    /// ALPN to offer; tests override it to exercise version negotiation.
    pub alpn: Vec<u8>,
    /// The access key every connection authenticates with (`quiver key create` prints
    /// one; `KeyToken::parse` reads its text form). Without one, nodes answer only pings.
    pub key: Option<KeyToken>,
}

impl ClientConfig {
    /// Defaults: 10 s per request, the current protocol version.
    pub fn new(ca_pem: Vec<u8>) -> Self {
        Self {
            ca_pem,
            request_timeout: Duration::from_secs(10),
            alpn: ALPN_CLIENT_V1.to_vec(),
            key: None,
        }
    }

    /// The same settings with `key` as the access key.
    pub fn with_key(mut self, key: KeyToken) -> Self {
        self.key = Some(key);
        self
    }
}

/// A connection to one node. Cheap to clone; clones share the connection, and requests
/// on it run concurrently (one QUIC stream each).
#[derive(Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    addr: String,
    timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the node at `addr` (`host:port`).
    pub async fn connect(addr: &str, config: ClientConfig) -> Result<Client, Error> {
        let sock: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| Error::Config(format!("cannot resolve {addr}: {e}")))?
            .next()
            .ok_or_else(|| Error::Config(format!("{addr} resolves to no address")))?;
        let quic = tls::client_config(&config.ca_pem, &[&config.alpn])
            .map_err(|e| Error::Config(e.to_string()))?;
        let bind: SocketAddr = if sock.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| Error::Connect {
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
        let connecting = endpoint
            .connect_with(quic, sock, NODE_SERVER_NAME)
            .map_err(|e| Error::Connect {
                addr: addr.to_string(),
                message: e.to_string(),
            })?;
        let conn = match tokio::time::timeout(config.request_timeout, connecting).await {
            Err(_) => {
                return Err(Error::Timeout {
                    addr: addr.to_string(),
                    after_ms: config.request_timeout.as_millis() as u64,
                });
            }
            Ok(Err(e)) => return Err(connect_error(addr, e)),
            Ok(Ok(c)) => c,
        };
        let client = Client {
            endpoint,
            conn,
            addr: addr.to_string(),
            timeout: config.request_timeout,
        };
        if let Some(key) = &config.key {
            // First on the connection: the node acts on every later stream as this key.
            let req = Request::Authenticate {
                key: key.name().to_string(),
                secret: key.secret().to_vec(),
            };
            match client.call(&req).await? {
                Response::Authenticated { .. } => {}
                other => return Err(client.unexpected(&other)),
            }
        }
        Ok(client)
    }

    /// The node address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The underlying QUIC connection, for tools that speak the wire protocol directly.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Asks the node who it is.
    pub async fn ping(&self) -> Result<NodeInfo, Error> {
        match self.call(&Request::Ping).await? {
            Response::Pong { node, protocol } => Ok(NodeInfo { node, protocol }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// The node's view of the cluster.
    pub async fn status(&self) -> Result<crate::wire::NodeStatus, Error> {
        match self.call(&Request::Status).await? {
            Response::Status(s) => Ok(*s),
            other => Err(self.unexpected(&other)),
        }
    }

    /// The ring, every member's address, and the default replication factor.
    pub async fn ring(
        &self,
    ) -> Result<(quiver_core::ring::Ring, Vec<(String, String)>, usize), Error> {
        match self.call(&Request::Ring).await? {
            Response::Ring { ring, members, n } => {
                let ring = quiver_core::ring::Ring::decode(&ring).map_err(|e| Error::Protocol {
                    addr: self.addr.clone(),
                    message: format!("undecodable ring: {e}"),
                })?;
                Ok((ring, members, usize::from(n)))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    /// Reads a key with default options.
    pub async fn get(&self, bucket: &str, key: impl AsRef<[u8]>) -> Result<GetResult, Error> {
        self.get_with(bucket, key, &ReadOptions::default()).await
    }

    /// Reads a key.
    pub async fn get_with(
        &self,
        bucket: &str,
        key: impl AsRef<[u8]>,
        options: &ReadOptions,
    ) -> Result<GetResult, Error> {
        let req = Request::Get {
            bucket: bucket.to_string(),
            key: key.as_ref().to_vec(),
            options: options.clone(),
        };
        match self.call(&req).await? {
            Response::Get { siblings, context } => Ok(GetResult {
                siblings: siblings
                    .into_iter()
                    .map(|s| Sibling {
                        value: s.value,
                        value_bytes: s.value_bytes,
                        tombstone: s.tombstone,
                        timestamp_ms: s.timestamp_ms,
                        actor: s.actor,
                    })
                    .collect(),
                context: Context(context),
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Writes a value with default options; `context` from an earlier get replaces the
    /// siblings that get saw. Returns the context of the new version.
    pub async fn put(
        &self,
        bucket: &str,
        key: impl AsRef<[u8]>,
        value: Vec<u8>,
        context: Option<&Context>,
    ) -> Result<Context, Error> {
        self.put_with(bucket, key, value, context, &WriteOptions::default())
            .await
    }

    /// Writes a value.
    pub async fn put_with(
        &self,
        bucket: &str,
        key: impl AsRef<[u8]>,
        value: Vec<u8>,
        context: Option<&Context>,
        options: &WriteOptions,
    ) -> Result<Context, Error> {
        let req = Request::Put {
            bucket: bucket.to_string(),
            key: key.as_ref().to_vec(),
            context: context.map(|c| c.0.clone()).unwrap_or_default(),
            value,
            options: options.clone(),
        };
        self.written(&req).await
    }

    /// Deletes a key (writes a tombstone) with default options.
    pub async fn delete(
        &self,
        bucket: &str,
        key: impl AsRef<[u8]>,
        context: Option<&Context>,
    ) -> Result<Context, Error> {
        self.delete_with(bucket, key, context, &WriteOptions::default())
            .await
    }

    /// Deletes a key.
    pub async fn delete_with(
        &self,
        bucket: &str,
        key: impl AsRef<[u8]>,
        context: Option<&Context>,
        options: &WriteOptions,
    ) -> Result<Context, Error> {
        let req = Request::Delete {
            bucket: bucket.to_string(),
            key: key.as_ref().to_vec(),
            context: context.map(|c| c.0.clone()).unwrap_or_default(),
            options: options.clone(),
        };
        self.written(&req).await
    }

    /// Applies `op` with the bucket reconciler's `update` at a replica (e.g. a counter
    /// increment), with no read-modify-write here. Returns the context of the new version.
    pub async fn update(
        &self,
        bucket: &str,
        key: impl AsRef<[u8]>,
        op: Vec<u8>,
        options: &WriteOptions,
    ) -> Result<Context, Error> {
        let req = Request::Update {
            bucket: bucket.to_string(),
            key: key.as_ref().to_vec(),
            op,
            options: options.clone(),
        };
        self.written(&req).await
    }

    /// Uploads a reconciler plugin (a Wasm component) to the cluster. With `force`, a
    /// plugin whose merge breaks the laws is stored anyway (the violations are returned).
    pub async fn plugin_upload(
        &self,
        name: &str,
        component: Vec<u8>,
        force: bool,
    ) -> Result<PluginUpload, Error> {
        let req = Request::PluginUpload {
            name: name.to_string(),
            component,
            force,
        };
        match self.call(&req).await? {
            Response::PluginUploaded {
                plugin,
                violations,
                replicated_to,
                pending,
            } => Ok(PluginUpload {
                plugin: *plugin,
                violations,
                replicated_to,
                pending,
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Every uploaded plugin version, and which bucket uses which.
    pub async fn plugin_list(&self) -> Result<PluginListing, Error> {
        self.plugins(&Request::PluginList).await
    }

    /// One plugin's versions, and which bucket uses which.
    pub async fn plugin_show(&self, name: &str) -> Result<PluginListing, Error> {
        self.plugins(&Request::PluginShow {
            name: name.to_string(),
        })
        .await
    }

    /// Deletes a plugin version, `NAME@HASH` (needs an admin key); refused with
    /// `PluginInUse` while a bucket uses it. Returns the deleted version's listing.
    pub async fn plugin_delete(&self, plugin: &str) -> Result<PluginListing, Error> {
        self.plugins(&Request::PluginDelete {
            plugin: plugin.to_string(),
        })
        .await
    }

    async fn plugins(&self, req: &Request) -> Result<PluginListing, Error> {
        match self.call(req).await? {
            Response::Plugins { versions, buckets } => Ok(PluginListing { versions, buckets }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Changes a bucket's properties cluster-wide: fields of `changes` left `None` keep
    /// their value; `reconciler` attaches `NAME` or `NAME@HASH`; `detach_reconciler`
    /// removes it.
    pub async fn bucket_set(
        &self,
        bucket: &str,
        changes: BucketSpec,
        reconciler: Option<&str>,
        detach_reconciler: bool,
    ) -> Result<BucketInfo, Error> {
        let req = Request::BucketSet {
            bucket: bucket.to_string(),
            changes,
            reconciler: reconciler.map(str::to_string),
            detach_reconciler,
        };
        self.bucket(&req).await
    }

    /// A bucket's properties as the node applies them.
    pub async fn bucket_show(&self, bucket: &str) -> Result<BucketInfo, Error> {
        self.bucket(&Request::BucketShow {
            bucket: bucket.to_string(),
        })
        .await
    }

    /// Creates an access key (needs an admin key). Returns what was created and its secret
    /// token `NAME.SECRET`, which the cluster never shows again.
    pub async fn key_create(
        &self,
        name: &str,
        admin: bool,
        grants: &[String],
    ) -> Result<(KeyInfo, KeyToken), Error> {
        let req = Request::KeyCreate {
            name: name.to_string(),
            admin,
            grants: grants.to_vec(),
        };
        match self.call(&req).await? {
            Response::KeyCreated { key, token } => {
                let token = KeyToken::parse(&token).map_err(|e| Error::Protocol {
                    addr: self.addr.clone(),
                    message: format!("the node sent an unusable key: {e}"),
                })?;
                Ok((key, token))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    /// Every access key (needs an admin key); never their secrets.
    pub async fn key_list(&self) -> Result<Vec<KeyInfo>, Error> {
        self.keys(&Request::KeyList).await
    }

    /// One access key (needs an admin key).
    pub async fn key_show(&self, name: &str) -> Result<KeyInfo, Error> {
        let mut keys = self
            .keys(&Request::KeyShow {
                name: name.to_string(),
            })
            .await?;
        keys.pop().ok_or_else(|| Error::Protocol {
            addr: self.addr.clone(),
            message: format!("no key in the answer for {name:?}"),
        })
    }

    /// Deletes an access key (needs an admin key); it stops working on every node as the
    /// deletion spreads (pushed at once, gossiped to nodes that were unreachable).
    pub async fn key_delete(&self, name: &str) -> Result<(), Error> {
        self.keys(&Request::KeyDelete {
            name: name.to_string(),
        })
        .await
        .map(drop)
    }

    async fn keys(&self, req: &Request) -> Result<Vec<KeyInfo>, Error> {
        match self.call(req).await? {
            Response::Keys(keys) => Ok(keys),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Sends a cluster admin request (join, leave, plan, commit) and returns the plan the
    /// node answers with.
    pub async fn cluster_admin(&self, req: &Request) -> Result<crate::wire::PlanView, Error> {
        match self.call(req).await? {
            Response::Plan(plan) => Ok(*plan),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn bucket(&self, req: &Request) -> Result<BucketInfo, Error> {
        match self.call(req).await? {
            Response::Bucket(info) => Ok(*info),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Closes the connection politely and waits for the endpoint to finish.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }

    async fn written(&self, req: &Request) -> Result<Context, Error> {
        match self.call(req).await? {
            Response::Written { context } => Ok(Context(context)),
            other => Err(self.unexpected(&other)),
        }
    }

    fn unexpected(&self, resp: &Response) -> Error {
        match resp {
            Response::Error(e) => Error::Server {
                addr: self.addr.clone(),
                code: e.code,
                message: e.message.clone(),
            },
            other => Error::Protocol {
                addr: self.addr.clone(),
                message: format!("unexpected reply {}", reply_name(other)),
            },
        }
    }

    /// Sends one request on a fresh stream and reads its reply, within the deadline.
    async fn call(&self, req: &Request) -> Result<Response, Error> {
        let frame = wire::encode_frame(req).map_err(|e| Error::Protocol {
            addr: self.addr.clone(),
            message: e.to_string(),
        })?;
        match tokio::time::timeout(self.timeout, self.exchange(&frame)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                addr: self.addr.clone(),
                after_ms: self.timeout.as_millis() as u64,
            }),
        }
    }

    /// Writes a raw frame on a new stream and returns the decoded reply. Public for tools
    /// and tests that need to send frames the typed API would never produce.
    pub async fn exchange(&self, frame: &[u8]) -> Result<Response, Error> {
        let conn_err = |message: String| Error::Connection {
            addr: self.addr.clone(),
            message,
        };
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        // A node that refuses an oversized frame stops reading and answers early; its reply
        // is still worth reading, so a failed write is only reported if no reply comes.
        let write_result = match send.write_all(frame).await {
            Ok(()) => send.finish().map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let reply = recv
            .read_to_end(FRAME_HEADER_BYTES + RESPONSE_BYTES_MAX_DEFAULT)
            .await;
        match (reply, write_result) {
            (Ok(bytes), _) => wire::decode_frame(&bytes, RESPONSE_BYTES_MAX_DEFAULT).map_err(|e| {
                Error::Protocol {
                    addr: self.addr.clone(),
                    message: e.to_string(),
                }
            }),
            (Err(e), Ok(())) => Err(conn_err(e.to_string())),
            (Err(e), Err(w)) => Err(conn_err(format!("{w}; then {e}"))),
        }
    }
}

fn reply_name(resp: &Response) -> &'static str {
    match resp {
        Response::Pong { .. } => "Pong",
        Response::Status(_) => "Status",
        Response::Ring { .. } => "Ring",
        Response::Get { .. } => "Get",
        Response::Written { .. } => "Written",
        Response::PluginUploaded { .. } => "PluginUploaded",
        Response::Plugins { .. } => "Plugins",
        Response::Bucket(_) => "Bucket",
        Response::Plan(_) => "Plan",
        Response::Authenticated { .. } => "Authenticated",
        Response::KeyCreated { .. } => "KeyCreated",
        Response::Keys(_) => "Keys",
        Response::Error(_) => "Error",
    }
}

fn connect_error(addr: &str, e: quinn::ConnectionError) -> Error {
    if let quinn::ConnectionError::ConnectionClosed(close) = &e
        && close.error_code == quinn::TransportErrorCode::crypto(ALERT_NO_APPLICATION_PROTOCOL)
    {
        return Error::UnsupportedProtocol {
            addr: addr.to_string(),
        };
    }
    Error::Connect {
        addr: addr.to_string(),
        message: e.to_string(),
    }
}
