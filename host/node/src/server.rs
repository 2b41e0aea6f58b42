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

use quiver_core::limits::{
    FRAME_OVERHEAD_BYTES, PLUGIN_BYTES_MAX, peer_frame_bytes_max, request_frame_bytes_max,
};
use quiver_core::ring::{ClaimParams, Ring};
use quiver_sdk::wire::{
    self, ALPN_CLIENT_V1, ErrorCode, ErrorReply, FRAME_HEADER_BYTES, Request, Response,
};
use tokio::sync::Notify;

use crate::certs::{self, CertError, NodeIdentity};
use crate::cluster::keys::Principal;
use crate::cluster::{Cluster, ReplicationConfig};
use crate::config::NodeConfig;
use crate::kv::KvService;
use crate::meta::MetaStore;
use crate::peer::{ALPN_PEER_V1, PeerRequest, PeerResponse, Peers, peer_client_config};
use crate::plugins::{PluginEngine, Plugins};
use quiver_node_core::epochs::{BootEpochs, EpochError};
use quiver_storage::{EngineKind, Store};

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
/// Largest buffer reserved ahead of the bytes of a frame body.
const BODY_CHUNK_BYTES: usize = 64 * 1024;
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
    /// The bootstrap admin key could not be read, written or stored.
    #[error("bootstrap admin key: {0}")]
    AdminKey(String),
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
    admin_key_file: Option<std::path::PathBuf>,
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
        let engine =
            quiver_storage::open_engine(config.engine, &dir.join(engine_dir(config.engine)))
                .map_err(|e| storage_err(e.to_string()))?;
        let store = Store::with_window(engine, config.durability, config.group_commit_window);
        let (epochs, boot) = BootEpochs::start(&store, rand::random::<u64>())?;
        // Durable before any epoch of this boot is handed out.
        store
            .write(boot, quiver_storage::Durability::Sync)
            .await
            .map_err(|e| storage_err(format!("cannot record the boot: {e}")))?;
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
        let bind = |source| ServerError::Bind {
            addr: config.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(bind)?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config(&identity),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind)?;
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
                client_limits: config.client_limits.clone(),
            },
            meta,
            Plugins::new(
                plugin_engine(&config),
                config.client_limits.plugin_workers as usize,
            ),
        ));
        let indexed = cluster
            .kv()
            .ae()
            .open(cluster.kv().store())
            .map_err(|e| storage_err(e.to_string()))?;
        tracing::info!(keys = indexed, "anti-entropy trees loaded");
        let admin_key_file = bootstrap_admin_key(&config, &cluster).await?;
        Ok(Node {
            endpoint,
            cluster,
            config,
            admin_key_file,
        })
    }

    /// The file holding the admin key this node started with (its own `DATA_DIR/admin.key`
    /// or the cluster's `--admin-key-file`), if there is one.
    pub fn admin_key_file(&self) -> Option<&std::path::Path> {
        self.admin_key_file.as_deref()
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
            peer_frame_bytes_max: peer_frame_bytes_max(self.config.value_bytes_max),
            client_reading: Reading {
                deadline: Duration::from_millis(u64::from(self.config.request_timeout_ms)),
                uploads: Some(Arc::new(tokio::sync::Semaphore::new(
                    self.config.client_limits.plugin_uploads_max as usize,
                ))),
                uploads_max: self.config.client_limits.plugin_uploads_max,
            },
            // Peers send large batches and plugins, over links that may be slow.
            peer_reading: Reading {
                deadline: PLUGIN_UPLOAD_TIMEOUT,
                uploads: None,
                uploads_max: 0,
            },
            default_timeout: Duration::from_millis(u64::from(self.config.request_timeout_ms)),
        });
        let connections = Arc::new(Connections::new(
            self.config.client_limits.connections_max,
            self.config.client_limits.connections_per_address_max,
        ));
        let background = tokio::spawn(
            Arc::clone(&self.cluster).run_background(PROBE_INTERVAL, HINT_DELIVERY_INTERVAL),
        );
        let mut departed = false;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let remote = incoming.remote_address();
                    let Some(slot) = connections.admit(remote.ip()) else {
                        tracing::debug!(%remote, "connection refused: connection limit");
                        self.cluster.count_refused_connection();
                        incoming.refuse();
                        continue;
                    };
                    let cluster = Arc::clone(&self.cluster);
                    let inflight = Arc::clone(&inflight);
                    let limits = Arc::clone(&limits);
                    tokio::spawn(async move {
                        match incoming.await {
                            Ok(conn) => serve_connection(conn, cluster, inflight, limits).await,
                            Err(e) => tracing::debug!(%remote, error = %e, "handshake failed"),
                        }
                        drop(slot);
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

/// Name of the admin key file a node writes into its data directory.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// Makes sure an operator is never locked out: the cluster's `--admin-key-file` key, or
/// else this node's own admin key in `DATA_DIR/admin.key`, created on the first start.
/// A key of that name already in the metadata (live or deleted) is left as it is, so a
/// deleted bootstrap key stays deleted. Returns the key file, unless the node's own key
/// was deleted and its file removed.
async fn bootstrap_admin_key(
    config: &NodeConfig,
    cluster: &Cluster,
) -> Result<Option<std::path::PathBuf>, ServerError> {
    use crate::cluster::keys;
    use quiver_core::meta::Stamp;
    if let Some(path) = &config.admin_key_file {
        let token = keys::read_key_file(path).map_err(ServerError::AdminKey)?;
        // Stamp zero: every node adds the same key alike, and any deletion is later.
        cluster
            .ensure_bootstrap_key(&token, Stamp::zero())
            .await
            .map_err(ServerError::AdminKey)?;
        return Ok(Some(path.clone()));
    }
    let path = config.data_dir.join(ADMIN_KEY_FILE);
    let name: String = format!("admin-{}", config.node_id.replace('.', "_"))
        .chars()
        .take(quiver_core::access::KEY_NAME_CHARS_MAX)
        .collect();
    let token = if path.exists() {
        keys::read_key_file(&path).map_err(ServerError::AdminKey)?
    } else if cluster.has_key_entry(&name) {
        return Ok(None);
    } else {
        let token =
            keys::generate_token(&name).map_err(|e| ServerError::AdminKey(e.to_string()))?;
        keys::write_key_file(&path, &token)
            .map_err(|e| ServerError::AdminKey(format!("{}: {e}", path.display())))?;
        tracing::info!(key = %name, file = %path.display(), "bootstrap admin key written");
        token
    };
    let stamp = Stamp::at(crate::cluster::now_ms(), config.node_id.clone());
    cluster
        .ensure_bootstrap_key(&token, stamp)
        .await
        .map_err(ServerError::AdminKey)?;
    Ok(Some(path))
}

/// Sub-directory of the data directory that holds an engine's files.
fn engine_dir(kind: EngineKind) -> &'static str {
    match kind {
        EngineKind::Fjall => "fjall",
        EngineKind::Memory => "memory",
    }
}

/// The endpoint's stateless-reset key and connection-ID key, both derived from the node's
/// private key (each with a label of its own, so neither is another use of that key). A
/// node restarted on the same data directory then recognises the connection IDs of its
/// previous life as its own and answers their packets with resets its peers and clients
/// accept: they redial at once instead of waiting out a timeout on a connection nobody
/// holds any more. quinn's defaults (random keys per start) drop those packets silently.
fn endpoint_config(identity: &NodeIdentity) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| {
        let mut seed = ring::digest::Context::new(&ring::digest::SHA256);
        seed.update(label);
        seed.update(identity.key.secret_der());
        seed.finish()
    };
    let reset = derive(b"quiver stateless reset key v1");
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref());
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    let cid = derive(b"quiver connection id key v1");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
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
    /// Peers (authenticated nodes) send whole objects, batches and plugins.
    peer_frame_bytes_max: usize,
    client_reading: Reading,
    peer_reading: Reading,
    default_timeout: Duration,
}

/// Open connections, in all and per source address, bounded by `--connections-max` and
/// `--connections-per-address-max`: one client cannot take every slot of a node.
#[derive(Debug)]
struct Connections {
    max: u32,
    per_address_max: u32,
    open: std::sync::Mutex<(u32, std::collections::HashMap<std::net::IpAddr, u32>)>,
}

impl Connections {
    fn new(max: u32, per_address_max: u32) -> Self {
        Connections {
            max,
            per_address_max,
            open: Default::default(),
        }
    }

    /// A slot for a new connection from `ip`, or `None` when a limit is reached.
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<ConnectionSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by_ip) = &mut *open;
        let from_ip = by_ip.get(&ip).copied().unwrap_or(0);
        if *total >= self.max || from_ip >= self.per_address_max {
            return None;
        }
        *total += 1;
        by_ip.insert(ip, from_ip + 1);
        Some(ConnectionSlot(Arc::clone(self), ip))
    }
}

/// One admitted connection; dropping it frees the slot.
struct ConnectionSlot(Arc<Connections>, std::net::IpAddr);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by_ip) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(n) = by_ip.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_ip.remove(&self.1);
            }
        }
    }
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
        let Some(peer_id) = peer_node_id(&conn) else {
            tracing::warn!(%remote, "peer connection without a node certificate refused");
            conn.close(
                CLOSE_PEER_UNAUTHENTICATED.into(),
                b"peer certificate required",
            );
            return;
        };
        serve_peer_connection(conn, peer_id, cluster, inflight, limits).await;
        return;
    }
    tracing::debug!(%remote, "client connected");
    // The access key this connection authenticated with; every request is checked
    // against the key table as it is when the request arrives, so a deleted key stops
    // working on open connections too. An `Arc`, so a request takes it without copying.
    let principal: Arc<std::sync::Mutex<Option<Arc<Principal>>>> = Arc::default();
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
        let principal = Arc::clone(&principal);
        tokio::spawn(async move {
            serve_stream(send, recv, &cluster, &limits, &principal).await;
            drop(guard);
        });
    }
}

/// The node id the peer's certificate (verified against the cluster CA by rustls) names.
fn peer_node_id(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    crate::certs::node_id_of(certs.first()?.as_ref())
}

async fn serve_peer_connection(
    conn: quinn::Connection,
    peer_id: String,
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
        cluster.peers().heard_from(&peer_id);
        let guard = inflight.enter();
        let cluster = Arc::clone(&cluster);
        let limits = Arc::clone(&limits);
        let peer_id = peer_id.clone();
        tokio::spawn(async move {
            let read = read_frame::<PeerRequest>(
                &mut recv,
                limits.peer_frame_bytes_max,
                &limits.peer_reading,
                &|| None,
            )
            .await;
            let response = match read {
                Ok((request, _)) => match request.claimed_sender() {
                    Some(claimed) if claimed != peer_id => {
                        tracing::warn!(%remote, peer = %peer_id, claimed, "peer claims another node's id");
                        PeerResponse::Error(ErrorReply {
                            code: ErrorCode::Forbidden,
                            message: format!(
                                "node {}: the peer's certificate is for node {peer_id:?} \
                                     but the request claims {claimed:?}",
                                cluster.kv().node()
                            ),
                        })
                    }
                    _ => cluster.handle_peer(request).await,
                },
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
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    cluster: &Arc<Cluster>,
    limits: &Limits,
    principal: &std::sync::Mutex<Option<Arc<Principal>>>,
) {
    let who = principal.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // An upload's body is large: its key is checked before a byte of it is read or an
    // upload slot is taken.
    let upload_refusal = || {
        let probe = Request::PluginUpload {
            name: String::new(),
            component: Vec::new(),
            force: false,
        };
        cluster.authorize(who.as_deref(), &probe)
    };
    let read = read_frame::<Request>(
        &mut recv,
        limits.frame_bytes_max,
        &limits.client_reading,
        &upload_refusal,
    )
    .await;
    // An upload's permit is held until its answer is sent.
    let (read, _upload) = match read {
        Ok((request, permit)) => (Ok(request), permit),
        Err(e) => (Err(e), None),
    };
    let response = match read {
        Ok(Request::Authenticate { key, secret }) => match cluster.authenticate(&key, &secret) {
            Ok(p) => {
                let admin = cluster.is_admin(&p);
                *principal.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(p));
                Response::Authenticated { key, admin }
            }
            Err(refusal) => refusal,
        },
        Ok(request) => {
            // Again: an authentication on another stream may have landed meanwhile.
            let who = principal.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(refusal) = cluster.authorize(who.as_deref(), &request) {
                respond(send, &refusal).await;
                return;
            }
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
    respond(send, &response).await;
}

async fn respond(mut send: quinn::SendStream, response: &Response) {
    let frame = match wire::encode_frame(response) {
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
    reading: &Reading,
    upload_refusal: &(dyn Fn() -> Option<Response> + Sync),
) -> Result<(T, Option<tokio::sync::OwnedSemaphorePermit>), Response> {
    let late = |what: &str, deadline: Duration| {
        error(
            ErrorCode::Timeout,
            format!(
                "{what} did not arrive within {} ms of the stream opening",
                deadline.as_millis()
            ),
        )
    };
    let mut header = [0u8; FRAME_HEADER_BYTES];
    match tokio::time::timeout(reading.deadline, recv.read_exact(&mut header)).await {
        Err(_) => return Err(late("the request", reading.deadline)),
        Ok(Err(e)) => {
            return Err(error(
                ErrorCode::MalformedRequest,
                format!("frame header could not be read: {e}"),
            ));
        }
        Ok(Ok(())) => {}
    }
    let len = wire::frame_len(header);
    let mut first = [0u8; 1];
    let upload_max = PLUGIN_BYTES_MAX + FRAME_OVERHEAD_BYTES;
    if let Some(uploads) = &reading.uploads
        && len > max
        && len <= upload_max
        && len > 0
    {
        match tokio::time::timeout(reading.deadline, recv.read_exact(&mut first)).await {
            Err(_) => return Err(late("the request", reading.deadline)),
            Ok(Err(e)) => {
                return Err(error(
                    ErrorCode::MalformedRequest,
                    format!("frame declares {len} bytes but the body could not be read: {e}"),
                ));
            }
            Ok(Ok(())) => {}
        }
        if Some(first[0]) == plugin_upload_tag() {
            if let Some(refusal) = upload_refusal() {
                let _ = recv.stop(STOP_FRAME_REFUSED.into());
                return Err(refusal);
            }
            // Each upload holds its bytes while they are checked: bound how many at once,
            // before reading any of them.
            let Ok(permit) = Arc::clone(uploads).try_acquire_owned() else {
                let _ = recv.stop(STOP_FRAME_REFUSED.into());
                return Err(error(
                    ErrorCode::LimitExceeded,
                    format!(
                        "{} plugin uploads are in progress on this node, its limit \
                         (--plugin-uploads-max); try again when one is done",
                        reading.uploads_max
                    ),
                ));
            };
            let body =
                tokio::time::timeout(PLUGIN_UPLOAD_TIMEOUT, read_body(recv, len, vec![first[0]]))
                    .await
                    .map_err(|_| late("the plugin upload", PLUGIN_UPLOAD_TIMEOUT))??;
            let request = wire::decode_body(&body)
                .map_err(|e| error(ErrorCode::MalformedRequest, e.to_string()))?;
            return Ok((request, Some(permit)));
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
    let body = tokio::time::timeout(reading.deadline, read_body(recv, len, Vec::new()))
        .await
        .map_err(|_| late("the request", reading.deadline))??;
    let request =
        wire::decode_body(&body).map_err(|e| error(ErrorCode::MalformedRequest, e.to_string()))?;
    Ok((request, None))
}

/// How a connection's requests are read: the deadline for a whole request frame, and the
/// plugin uploads allowed at once (client connections only: peers send no uploads).
#[derive(Debug, Clone)]
struct Reading {
    deadline: Duration,
    uploads: Option<Arc<tokio::sync::Semaphore>>,
    uploads_max: u32,
}

/// Reads `len` body bytes after `start`, growing the buffer as bytes arrive rather than
/// allocating the declared length up front: a client that declares a large frame and sends
/// nothing holds no memory for it.
async fn read_body(
    recv: &mut quinn::RecvStream,
    len: usize,
    mut body: Vec<u8>,
) -> Result<Vec<u8>, Response> {
    use tokio::io::AsyncReadExt;
    let want = len.saturating_sub(body.len());
    body.reserve(want.min(BODY_CHUNK_BYTES));
    let read = (&mut *recv).take(want as u64).read_to_end(&mut body).await;
    match read {
        Ok(_) if body.len() == len => Ok(body),
        Ok(_) => Err(error(
            ErrorCode::MalformedRequest,
            format!(
                "frame declares {len} bytes but the stream ended after {}",
                body.len()
            ),
        )),
        Err(e) => Err(error(
            ErrorCode::MalformedRequest,
            format!("frame declares {len} bytes but the body could not be read: {e}"),
        )),
    }
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
        | Request::ClusterCommit
        | Request::Authenticate { .. }
        | Request::KeyCreate { .. }
        | Request::KeyList
        | Request::KeyShow { .. }
        | Request::KeyDelete { .. }
        | Request::PluginDelete { .. } => None,
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
