//! The QUIC server: opens storage, bootstraps certificates and the epoch allocator, accepts
//! client connections and answers one request per bidirectional stream.
//!
//! Shutdown is graceful: when the shutdown future resolves the node stops accepting
//! connections and streams, lets requests in flight finish (bounded by
//! [`SHUTDOWN_DRAIN_MAX`]), flushes storage so buffered writes reach disk, then closes every
//! connection with a "shutting down" code.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quiver_core::limits::{FRAME_OVERHEAD_BYTES, PLUGIN_BYTES_MAX, request_frame_bytes_max};
use quiver_core::ring::{ClaimParams, Ring};
use quiver_sdk::wire::{
    self, ALPN_CLIENT_V1, ErrorCode, ErrorReply, FRAME_HEADER_BYTES, Request, Response,
};
use tokio::sync::Notify;

use crate::certs::{self, CertError, NodeIdentity};
use crate::cluster::{Cluster, ReplicationConfig};
use crate::config::NodeConfig;
use crate::epochs::{BootEpochs, EpochError};
use crate::kv::KvService;
use crate::meta::MetaStore;
use crate::peer::{ALPN_PEER_V1, PeerRequest, PeerResponse, Peers, peer_client_config};
use crate::plugins::{PluginEngine, Plugins};
use crate::storage::{self, EngineKind, Store};

/// Longest a graceful shutdown waits for requests in flight.
pub const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(30);
/// QUIC application error code sent when the node closes connections on shutdown.
pub const CLOSE_SHUTTING_DOWN: u32 = 1;
/// QUIC application error code closing a peer connection that presented no certificate.
const CLOSE_PEER_UNAUTHENTICATED: u32 = 3;
/// How often down peers are considered for a probe (each has its own backoff).
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How often hints are offered to their owners.
const HINT_DELIVERY_INTERVAL: Duration = Duration::from_millis(500);
/// Deadline of a plugin upload (validation compiles the component and runs the law checks).
const PLUGIN_UPLOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// QUIC application error code for a stream whose frame was refused unread.
const STOP_FRAME_REFUSED: u32 = 2;

/// Errors of starting or running a node.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Certificates could not be created or loaded.
    #[error(transparent)]
    Certs(#[from] CertError),
    /// Storage could not be opened or its metadata is unusable.
    #[error("node storage in {dir}: {message}")]
    Storage {
        /// Data directory.
        dir: String,
        /// What failed.
        message: String,
    },
    /// The epoch allocator could not start.
    #[error(transparent)]
    Epochs(#[from] EpochError),
    /// TLS configuration was refused.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The ring could not be built from the member list.
    #[error("ring: {0}")]
    Ring(String),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// I/O error.
        source: std::io::Error,
    },
}

/// The plugin engine of a node, caching compiled plugins in `DATA_DIR/plugin-cache`. A node
/// whose engine cannot start still serves data (buckets without reconcilers); uploads are
/// then refused with the reason logged.
fn plugin_engine(config: &NodeConfig) -> Option<Arc<dyn PluginEngine>> {
    // wasmtime's cache wants an absolute path; a relative --data-dir is relative to the
    // working directory the node started in.
    let cache = std::path::absolute(config.data_dir.join("plugin-cache"))
        .unwrap_or_else(|_| config.data_dir.join("plugin-cache"));
    match crate::plugin_engine::WasmPlugins::new(&cache) {
        Ok(engine) => Some(Arc::new(engine)),
        Err(e) => {
            tracing::error!(error = %e, "plugin engine unavailable; plugins are disabled");
            None
        }
    }
}

/// A node that is open and bound, ready to [`Node::serve`].
pub struct Node {
    endpoint: quinn::Endpoint,
    cluster: Arc<Cluster>,
    config: NodeConfig,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Opens storage, certificates and the epoch allocator, and binds the QUIC endpoint.
    pub async fn open(config: NodeConfig) -> Result<Node, ServerError> {
        let dir = config.data_dir.clone();
        let storage_err = |message: String| ServerError::Storage {
            dir: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(&dir).map_err(|e| storage_err(e.to_string()))?;
        let identity = certs::bootstrap(
            &dir,
            &config.node_id,
            config.listen.ip(),
            config.ca_dir.as_deref(),
        )?;
        let engine = storage::open_engine(config.engine, &dir.join(engine_dir(config.engine)))
            .map_err(|e| storage_err(e.to_string()))?;
        let store = Store::with_window(engine, config.durability, config.group_commit_window);
        let epochs = BootEpochs::start(&store, rand::random::<u64>()).await?;
        tracing::info!(
            node = %config.node_id,
            boot = epochs.boot(),
            incarnation = format_args!("{:016x}", epochs.incarnation()),
            engine = %config.engine,
            durability = %config.durability,
            "storage open"
        );
        let mut kv = KvService::new(
            config.node_id.clone(),
            store,
            epochs,
            config.value_bytes_max,
        );
        let hints = kv
            .init_hints(config.hints_max)
            .map_err(|e| storage_err(e.to_string()))?;
        if hints > 0 {
            tracing::info!(hints, "hints waiting for delivery");
        }
        let kv = Arc::new(kv);
        let server_config = server_config(&identity, config.streams_per_connection_max)?;
        let endpoint = quinn::Endpoint::server(server_config, config.listen).map_err(|source| {
            ServerError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let meta = MetaStore::open(kv.store().clone()).map_err(|e| storage_err(e.to_string()))?;
        let my_addr = match config.advertise {
            Some(a) => a,
            None => endpoint.local_addr().map_err(|e| ServerError::Bind {
                addr: config.listen,
                source: e,
            })?,
        };
        let ring = initial_ring(&config, &meta, my_addr)
            .await
            .map_err(ServerError::Ring)?;
        let mut peers = Peers::new(
            config.node_id.clone(),
            config.peers.clone().into_iter().collect(),
            endpoint.clone(),
            peer_client_config(&identity).map_err(ServerError::Tls)?,
            config.peer_timeout,
        );
        peers.set_advertise(config.advertise);
        let cluster = Arc::new(Cluster::new(
            kv,
            Arc::new(peers),
            ring,
            ReplicationConfig {
                quorum: config.quorum,
                sloppy: config.sloppy_quorum,
                forward_timeout: Duration::from_millis(u64::from(config.request_timeout_ms)),
                buckets: config.buckets.clone(),
                read_repair: config.read_repair,
                full_reads_per_mille: config.full_reads_per_mille,
                read_speculate: config.read_speculate,
                ae: crate::cluster::AeConfig {
                    interval: config.ae_interval,
                    max_keys: config.ae_max_keys,
                    tombstone_grace: config.tombstone_grace,
                },
                membership: crate::cluster::MembershipConfig {
                    gossip_interval: config.gossip_interval,
                    handoff_interval: config.handoff_interval,
                    weight: config.weight,
                    zone: config.zone.clone(),
                },
            },
            meta,
            Plugins::new(plugin_engine(&config)),
        ));
        let indexed = cluster
            .kv()
            .ae()
            .open(cluster.kv().store())
            .map_err(|e| storage_err(e.to_string()))?;
        tracing::info!(keys = indexed, "anti-entropy trees loaded");
        Ok(Node {
            endpoint,
            cluster,
            config,
        })
    }

    /// The address the endpoint is bound to (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, std::io::Error> {
        self.endpoint.local_addr()
    }

    /// The replication layer (for in-process tests).
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let inflight = Arc::new(Inflight::default());
        let limits = Arc::new(Limits {
            frame_bytes_max: request_frame_bytes_max(self.config.value_bytes_max),
            default_timeout: Duration::from_millis(u64::from(self.config.request_timeout_ms)),
        });
        let background = tokio::spawn(
            Arc::clone(&self.cluster).run_background(PROBE_INTERVAL, HINT_DELIVERY_INTERVAL),
        );
        let mut departed = false;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let cluster = Arc::clone(&self.cluster);
                    let inflight = Arc::clone(&inflight);
                    let limits = Arc::clone(&limits);
                    tokio::spawn(async move {
                        let remote = incoming.remote_address();
                        match incoming.await {
                            Ok(conn) => serve_connection(conn, cluster, inflight, limits).await,
                            Err(e) => tracing::debug!(%remote, error = %e, "handshake failed"),
                        }
                    });
                }
                () = &mut shutdown => break,
                () = self.cluster.departed().notified() => {
                    departed = true;
                    break;
                }
            }
        }
        if departed {
            tracing::info!(node = %self.config.node_id, "left the cluster: stopping");
        }
        background.abort();
        tracing::info!(node = %self.config.node_id, "shutting down: draining requests in flight");
        self.endpoint.set_server_config(None);
        if tokio::time::timeout(SHUTDOWN_DRAIN_MAX, inflight.drained())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = inflight.count.load(Ordering::Relaxed),
                "requests still in flight after the drain limit"
            );
        }
        if let Err(e) = self.cluster.kv().store().flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
        self.endpoint
            .close(CLOSE_SHUTTING_DOWN.into(), b"node shutting down");
        self.endpoint.wait_idle().await;
        tracing::info!(node = %self.config.node_id, "stopped");
        Ok(())
    }
}

/// The ring this node starts with: the one its metadata holds (committed or learned
/// earlier), or, on a first start, the ring every node of the `--peer` list derives alike,
/// stored with the members so that gossip starts from equal states. Also records a change
/// of this node's own address.
async fn initial_ring(
    config: &NodeConfig,
    meta: &MetaStore,
    my_addr: SocketAddr,
) -> Result<Ring, String> {
    use quiver_core::meta::{MetaState, Stamp};
    let state = meta.state();
    let ring = match state.ring {
        Some(entry) => {
            if entry.ring.partitions() != config.partitions {
                return Err(format!(
                    "the data directory holds a ring of {} partitions but the configuration \
                     says {}; the partition count is fixed when a cluster is created",
                    entry.ring.partitions(),
                    config.partitions
                ));
            }
            let listed: Vec<&String> = config
                .peers
                .keys()
                .filter(|id| !state.members.contains_key(*id))
                .collect();
            if !listed.is_empty() {
                tracing::warn!(
                    ?listed,
                    "--peer names nodes that are not members; membership comes from the \
                     stored ring now (use `quiver cluster join` to add nodes)"
                );
            }
            entry.ring
        }
        None => {
            let mut addrs = config.peers.clone();
            addrs.insert(config.node_id.clone(), my_addr);
            let params = ClaimParams {
                partitions: config.partitions,
                n_val: u32::try_from(config.quorum.n).unwrap_or(u32::MAX),
            };
            let (first, ring) =
                crate::cluster::first_membership(&addrs, params).map_err(|e| e.to_string())?;
            meta.merge(&first, &[]).await.map_err(|e| e.to_string())?;
            ring
        }
    };
    let state = meta.state();
    if let Some(mine) = state.members.get(&config.node_id)
        && mine.addr != my_addr.to_string()
        && mine.state != quiver_core::membership::MemberState::Left
    {
        let stamp = Stamp::at(crate::cluster::now_ms(), config.node_id.clone());
        let mut moved = mine.with_state(mine.state, stamp);
        moved.addr = my_addr.to_string();
        let change = MetaState {
            members: std::collections::BTreeMap::from([(config.node_id.clone(), moved)]),
            ..MetaState::default()
        };
        meta.merge(&change, &[]).await.map_err(|e| e.to_string())?;
    }
    Ok(ring)
}

/// Sub-directory of the data directory that holds an engine's files.
fn engine_dir(kind: EngineKind) -> &'static str {
    match kind {
        EngineKind::Fjall => "fjall",
        EngineKind::Memory => "memory",
    }
}

fn server_config(
    identity: &NodeIdentity,
    streams_per_connection_max: u32,
) -> Result<quinn::ServerConfig, ServerError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in quiver_sdk::tls::parse_certs(&identity.ca_pem, "cluster CA")
        .map_err(|e| ServerError::Tls(e.to_string()))?
    {
        roots
            .add(cert)
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    }
    // Client certificates are optional at the TLS layer (clients have none) but, when
    // presented, must chain to the cluster CA; peer connections without one are closed
    // right after the handshake (see `serve_incoming`).
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        quiver_sdk::tls::crypto_provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(quiver_sdk::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN_CLIENT_V1.to_vec(), ALPN_PEER_V1.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(quiver_sdk::tls::transport_config(Some(
        streams_per_connection_max,
    ))));
    Ok(config)
}

#[derive(Debug)]
struct Limits {
    frame_bytes_max: usize,
    default_timeout: Duration,
}

/// Counts requests in flight so shutdown can wait for them.
#[derive(Debug, Default)]
struct Inflight {
    count: AtomicUsize,
    idle: Notify,
}

impl Inflight {
    fn enter(self: &Arc<Self>) -> InflightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InflightGuard(Arc::clone(self))
    }

    async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct InflightGuard(Arc<Inflight>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

async fn serve_connection(
    conn: quinn::Connection,
    cluster: Arc<Cluster>,
    inflight: Arc<Inflight>,
    limits: Arc<Limits>,
) {
    let remote = conn.remote_address();
    if negotiated_alpn(&conn).as_deref() == Some(ALPN_PEER_V1) {
        if conn.peer_identity().is_none() {
            tracing::warn!(%remote, "peer connection without a certificate refused");
            conn.close(
                CLOSE_PEER_UNAUTHENTICATED.into(),
                b"peer certificate required",
            );
            return;
        }
        serve_peer_connection(conn, cluster, inflight, limits).await;
        return;
    }
    tracing::debug!(%remote, "client connected");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(%remote, reason = %e, "client connection ended");
                return;
            }
        };
        let guard = inflight.enter();
        let cluster = Arc::clone(&cluster);
        let limits = Arc::clone(&limits);
        tokio::spawn(async move {
            serve_stream(send, recv, &cluster, &limits).await;
            drop(guard);
        });
    }
}

async fn serve_peer_connection(
    conn: quinn::Connection,
    cluster: Arc<Cluster>,
    inflight: Arc<Inflight>,
    limits: Arc<Limits>,
) {
    let remote = conn.remote_address();
    tracing::debug!(%remote, "peer connected");
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(%remote, reason = %e, "peer connection ended");
                return;
            }
        };
        let guard = inflight.enter();
        let cluster = Arc::clone(&cluster);
        let limits = Arc::clone(&limits);
        tokio::spawn(async move {
            let response = match read_frame::<PeerRequest>(&mut recv, limits.frame_bytes_max).await
            {
                Ok(request) => cluster.handle_peer(request).await,
                Err(Response::Error(e)) => PeerResponse::Error(e),
                Err(_) => PeerResponse::Error(ErrorReply {
                    code: ErrorCode::Internal,
                    message: "unreadable peer frame".into(),
                }),
            };
            if let Ok(frame) = wire::encode_frame(&response)
                && send.write_all(&frame).await.is_ok()
            {
                let _ = send.finish();
            }
            drop(guard);
        });
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    cluster: &Arc<Cluster>,
    limits: &Limits,
) {
    let response = match read_frame::<Request>(&mut recv, limits.frame_bytes_max).await {
        Ok(request) => {
            let timeout = request_timeout(&request).unwrap_or(limits.default_timeout);
            match tokio::time::timeout(timeout, cluster.handle_client(request, None)).await {
                Ok(r) => r,
                Err(_) => error(
                    ErrorCode::Timeout,
                    format!(
                        "node {}: no answer within {} ms",
                        cluster.kv().node(),
                        timeout.as_millis()
                    ),
                ),
            }
        }
        Err(reply) => reply,
    };
    let frame = match wire::encode_frame(&response) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a response");
            return;
        }
    };
    if let Err(e) = send.write_all(&frame).await {
        tracing::debug!(error = %e, "client went away before the reply");
        return;
    }
    let _ = send.finish();
}

fn error(code: ErrorCode, message: String) -> Response {
    Response::Error(ErrorReply { code, message })
}

/// The first body byte of a plugin upload frame: postcard writes the enum variant index
/// first, so an upload can be told apart before its (large) body is read.
fn plugin_upload_tag() -> Option<u8> {
    let probe = Request::PluginUpload {
        name: String::new(),
        component: Vec::new(),
        force: false,
    };
    wire::encode_frame(&probe)
        .ok()
        .and_then(|f| f.get(FRAME_HEADER_BYTES).copied())
}

/// Reads one request frame; a frame that cannot become a request yields the error reply.
/// Frames over `max` are refused unread, except plugin uploads up to their own limit.
async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<T, Response> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    recv.read_exact(&mut header).await.map_err(|e| {
        error(
            ErrorCode::MalformedRequest,
            format!("frame header could not be read: {e}"),
        )
    })?;
    let len = wire::frame_len(header);
    let mut first = [0u8; 1];
    let upload_max = PLUGIN_BYTES_MAX + FRAME_OVERHEAD_BYTES;
    if len > max && len <= upload_max && len > 0 {
        recv.read_exact(&mut first).await.map_err(|e| {
            error(
                ErrorCode::MalformedRequest,
                format!("frame declares {len} bytes but the body could not be read: {e}"),
            )
        })?;
        if Some(first[0]) == plugin_upload_tag() {
            let mut body = vec![0u8; len];
            body[0] = first[0];
            recv.read_exact(&mut body[1..]).await.map_err(|e| {
                error(
                    ErrorCode::MalformedRequest,
                    format!("frame declares {len} bytes but the body could not be read: {e}"),
                )
            })?;
            return wire::decode_body(&body)
                .map_err(|e| error(ErrorCode::MalformedRequest, e.to_string()));
        }
    }
    if len > max {
        // Refuse without reading (or buffering) the body.
        let _ = recv.stop(STOP_FRAME_REFUSED.into());
        return Err(error(
            ErrorCode::FrameTooLarge,
            format!("request frame of {len} bytes exceeds this node's {max}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| {
        error(
            ErrorCode::MalformedRequest,
            format!("frame declares {len} bytes but the body could not be read: {e}"),
        )
    })?;
    wire::decode_body(&body).map_err(|e| error(ErrorCode::MalformedRequest, e.to_string()))
}

fn request_timeout(request: &Request) -> Option<Duration> {
    let ms = match request {
        Request::Ping
        | Request::Status
        | Request::Ring
        | Request::PluginList
        | Request::PluginShow { .. }
        | Request::BucketSet { .. }
        | Request::BucketShow { .. }
        | Request::ClusterJoin { .. }
        | Request::ClusterLeave { .. }
        | Request::ClusterPlan
        | Request::ClusterCommit => None,
        // Compiling and law-checking a large (e.g. Python) component takes seconds.
        Request::PluginUpload { .. } => return Some(PLUGIN_UPLOAD_TIMEOUT),
        Request::Get { options, .. } => options.timeout_ms,
        Request::Put { options, .. }
        | Request::Delete { options, .. }
        | Request::Update { options, .. } => options.timeout_ms,
    }?;
    Some(Duration::from_millis(u64::from(
        ms.clamp(1, crate::config::REQUEST_TIMEOUT_MS_MAX),
    )))
}
