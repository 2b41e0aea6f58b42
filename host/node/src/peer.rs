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

use quiver_core::coordinator::FailureDetector;
use quiver_sdk::wire::{self, FRAME_HEADER_BYTES, NODE_SERVER_NAME};

use crate::certs::NodeIdentity;

/// ALPN of version 1 of the peer protocol.
pub const ALPN_PEER_V1: &[u8] = b"quiver-peer/1";
/// Largest peer reply accepted, in bytes.
const PEER_FRAME_BYTES_MAX: usize = quiver_core::limits::PEER_FRAME_BYTES_MAX;
/// Slowest link between nodes a bulk transfer's deadline allows for, in bytes per second.
pub const TRANSFER_BYTES_PER_SEC_MIN: u64 = 4 * 1024 * 1024;
/// Longest wait for a probe's answer (or the peer timeout, if shorter). A ping is one
/// handshake and one round trip; a probe that outlives this is retried after the backoff
/// on a fresh connection rather than waited for.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The `(engine data key, object digest)` list of one anti-entropy leaf, sorted by key.
pub use quiver_node_core::exchange::LeafKeys;
/// The peer protocol (node-core's, spoken by the simulator too).
pub use quiver_node_core::protocol::{PeerRequest, PeerResponse};

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
    /// Notified when a peer believed down answers again (hints for it can go at once).
    came_up: tokio::sync::Notify,
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
            came_up: tokio::sync::Notify::new(),
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

    /// Notified when a peer believed down answers again.
    pub fn came_up(&self) -> &tokio::sync::Notify {
        &self.came_up
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
            self.came_up.notify_one();
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
            tokio::spawn(async move { peers.probe(&node).await });
        }
    }

    /// One probe of a peer believed down: a `Ping` on a connection dialled for it, within
    /// [`PROBE_TIMEOUT`]. Success marks the peer up and hands the connection to requests;
    /// failure pushes the backoff.
    ///
    /// Not `call`: a probe on the request connection waited behind a dial or a stream
    /// stuck in QUIC's retransmission backoff, and for the whole peer timeout, so a peer
    /// that healed just after a probe went out stayed down here for up to that timeout
    /// plus the longest backoff (a fault-suite finding: 2–4 s per heal).
    async fn probe(&self, node: &str) {
        let Some(slot) = self.slot(node) else {
            return;
        };
        let started = Instant::now();
        let attempt = async {
            let conn = self.dial(node, slot.addr).await?;
            let answer = Self::exchange_on(&conn, node, &PeerRequest::Ping).await;
            Ok::<_, PeerError>((conn, answer))
        };
        match tokio::time::timeout(self.timeout.min(PROBE_TIMEOUT), attempt).await {
            // A refusal is an answer too: the peer is up.
            Ok(Ok((conn, Ok(_)))) => {
                self.mark_up(node);
                // The probe's connection replaces whatever the requests held: that one saw
                // the peer fail. (If a request is dialling right now, it keeps its own.)
                match slot.conn.try_lock() {
                    Ok(mut current) => *current = Some(conn),
                    Err(_) => conn.close(0u32.into(), b"probe done"),
                }
            }
            Ok(Ok((conn, Err(_)))) => {
                conn.close(0u32.into(), b"probe failed");
                self.mark_down(node, started);
            }
            Ok(Err(_)) | Err(_) => self.mark_down(node, started),
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
