//! Replication: the coordinator side of client requests and the replica side of peer
//! requests (Dynamo §4.5-4.6).
//!
//! A put is coordinated by a node of the key's preference list: it issues the dot against
//! its own record (so per-key actor epochs keep working), then sends the new state to the
//! other targets and answers after `w` acknowledgements. A node outside the preference list
//! forwards the put to one inside it. A get asks `r` targets (all of them on one get in
//! `--read-repair-chance`, and a spare per failure or after `--read-speculate-ms`), answers
//! after `r` replies with their merge, and repairs stale replicas in the background.
//! Every decision — who coordinates, which targets and fallbacks, when a quorum is
//! decided, what to repair, who is down — is made by the core's state machines
//! (`quiver_core::coordinator`, `quiver_core::quorum`), the same ones the simulator runs;
//! this module drives them: it sends what they ask for and feeds the results back.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quiver_core::causality::{self, Object, WriteOp};
use quiver_core::coordinator::{Forwarding, ReadSpread};
use quiver_core::quorum::{Quorum, Target, select_targets};
use quiver_core::ring::Ring;
use quiver_node_core::broken::Broken;
use quiver_node_core::hints::{HintPass, HintStep, StoreReply};
use quiver_node_core::protocol::Inbound;
use quiver_node_core::request::{
    DataRequest, Get, GetArgs, Put, PutArgs, StoreRequest, WritePlan, forward_failed, plan_write,
};
use quiver_sdk::wire::{
    ErrorCode, ErrorReply, MemberStatus, NodeStatus, PROTOCOL_VERSION, ReadOptions, Request,
    Response, WireDurability, WireSibling, WriteOptions,
};
use tokio::sync::mpsc;

use crate::kv::{KvError, KvService, WriteArgs};
use crate::meta::MetaStore;
use crate::plugins::{PluginMerged, Plugins};

mod admin;
mod ae;
pub mod keys;
mod membership;
mod reap;
pub use crate::config::BucketProps;
use crate::peer::{PeerError, PeerRequest, PeerResponse, Peers};
pub use admin::BucketView;
pub use ae::AeConfig;
pub use membership::{HandoffMetrics, MembershipConfig, first_membership};
pub use quiver_node_core::exchange::AeReport;
use quiver_storage::Durability;

/// Replication settings of a node.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// Default n/r/w.
    pub quorum: Quorum,
    /// Replace unreachable primaries with fallbacks that keep hints.
    pub sloppy: bool,
    /// How long a node waits for a write it forwarded to be coordinated elsewhere.
    pub forward_timeout: Duration,
    /// Buckets with their own n/r/w or sloppy-quorum setting.
    pub buckets: std::collections::BTreeMap<String, BucketProps>,
    /// Repair stale replicas found by reads.
    pub read_repair: bool,
    /// Gets per thousand that ask every replica when read repair is on; the others ask R.
    pub full_reads_per_mille: u32,
    /// Delay after which a get short of R replies asks a replica it left out.
    pub read_speculate: Option<Duration>,
    /// Active anti-entropy.
    pub ae: AeConfig,
    /// Gossip, handoff, and how this node joins.
    pub membership: MembershipConfig,
    /// The node-wide caps of bucket plugin limits (and the other client limits).
    pub client_limits: crate::config::ClientLimits,
}

/// The replication layer of one node.
#[derive(Debug)]
pub struct Cluster {
    kv: Arc<KvService>,
    peers: Arc<Peers>,
    /// The committed ring as this node knows it; replaced whole when gossip brings a newer
    /// one, so a request works on one consistent ring.
    ring: std::sync::RwLock<Arc<Ring>>,
    config: ReplicationConfig,
    meta: MetaStore,
    plugins: Plugins,
    views: std::sync::RwLock<admin::BucketViews>,
    /// Set when a bucket's replication factor changed: its anti-entropy entries move trees.
    ae_refile_pending: std::sync::atomic::AtomicBool,
    /// Round-robin position over peers for anti-entropy exchanges.
    ae_next_peer: std::sync::atomic::AtomicUsize,
    /// The exchange this node takes part in (initiator or replica) and until when, so that
    /// several peers do not repair the same keys here at once.
    ae_lease: std::sync::Mutex<quiver_node_core::exchange::AeLease>,
    /// When this node started: the anti-entropy lease's monotonic clock counts from here.
    started: std::time::Instant,
    handoff_metrics: HandoffMetrics,
    /// Gets coordinated so far: picks which ones ask every replica, and rotates which
    /// replicas the others ask.
    reads: std::sync::atomic::AtomicU64,
    /// Gets that asked a spare because the asked replicas were slow.
    reads_speculated: std::sync::atomic::AtomicU64,
    /// Notified when this node has handed everything off after leaving.
    departed: tokio::sync::Notify,
    /// The live access keys, rebuilt on every metadata change.
    keys: std::sync::RwLock<Arc<keys::KeyTable>>,
    /// Client requests refused for want of a valid key or grant.
    auth_refused: std::sync::atomic::AtomicU64,
    /// Connections refused at the handshake by a connection limit.
    connections_refused: std::sync::atomic::AtomicU64,
}

/// A client write as the coordinator handles it.
#[derive(Debug, Clone)]
enum ClientWrite {
    Put(Vec<u8>),
    Delete,
    /// A server-side operation for the bucket reconciler's `update`.
    Update(Vec<u8>),
}

fn error(code: ErrorCode, message: String) -> Response {
    Response::Error(ErrorReply { code, message })
}

fn kv_error(e: &KvError) -> Response {
    if e.code() == ErrorCode::Storage {
        tracing::error!(error = %e, "storage failure");
    }
    error(e.code(), e.to_string())
}

/// Wall clock, ms since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Cluster {
    /// Wires the layer together.
    pub fn new(
        kv: Arc<KvService>,
        peers: Arc<Peers>,
        ring: Ring,
        config: ReplicationConfig,
        meta: MetaStore,
        plugins: Plugins,
    ) -> Self {
        let cluster = Cluster {
            kv,
            peers,
            ring: std::sync::RwLock::new(Arc::new(ring)),
            config,
            meta,
            plugins,
            views: Default::default(),
            ae_refile_pending: Default::default(),
            ae_next_peer: Default::default(),
            ae_lease: Default::default(),
            started: std::time::Instant::now(),
            handoff_metrics: Default::default(),
            reads: Default::default(),
            reads_speculated: Default::default(),
            departed: Default::default(),
            keys: Default::default(),
            auth_refused: Default::default(),
            connections_refused: Default::default(),
        };
        cluster.apply_membership();
        cluster.refresh_views();
        cluster
    }

    /// The key-value service underneath.
    pub fn kv(&self) -> &Arc<KvService> {
        &self.kv
    }

    /// The peers.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// The ring as this node currently holds it.
    pub fn ring(&self) -> Arc<Ring> {
        Arc::clone(&self.ring.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The node's monotonic clock: ms since it started (timers of the sans-IO machines).
    fn mono_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn me(&self) -> &str {
        self.peers.me()
    }

    /// Preference list of a key: (primaries, fallbacks) for replication factor `n`.
    pub fn preference(&self, bucket: &str, key: &[u8], n: usize) -> (Vec<String>, Vec<String>) {
        let ring = self.ring();
        let list = ring.preference_list_for_key(bucket.as_bytes(), key, n);
        (
            list.primaries.iter().map(|m| m.id.clone()).collect(),
            list.fallbacks.iter().map(|m| m.id.clone()).collect(),
        )
    }

    fn targets(&self, bucket: &str, key: &[u8], n: usize) -> (Vec<Target>, usize) {
        let (primaries, fallbacks) = self.preference(bucket, key, n);
        let p: Vec<&str> = primaries.iter().map(String::as_str).collect();
        let f: Vec<&str> = fallbacks.iter().map(String::as_str).collect();
        let sloppy = self.props(bucket).sloppy;
        let targets = select_targets(&p, &f, |node| self.peers.is_up(node), sloppy);
        (targets, primaries.len())
    }

    /// The bucket's replication properties: runtime properties (`quiver bucket set`) over
    /// the node configuration over the node defaults.
    pub fn props(&self, bucket: &str) -> BucketProps {
        match self.view(bucket) {
            Some(view) => view.props,
            None => self.config_props(bucket),
        }
    }

    /// The bucket's replication properties from the node configuration alone.
    fn config_props(&self, bucket: &str) -> BucketProps {
        self.config
            .buckets
            .get(bucket)
            .copied()
            .unwrap_or(BucketProps {
                quorum: self.config.quorum,
                sloppy: self.config.sloppy,
            })
    }

    fn quorum(&self, bucket: &str, r: Option<u8>, w: Option<u8>) -> Result<Quorum, Response> {
        let d = self.props(bucket).quorum;
        Quorum::new(d.n, r.map_or(d.r, usize::from), w.map_or(d.w, usize::from))
            .map_err(|e| error(ErrorCode::InvalidQuorum, format!("bucket {bucket:?}: {e}")))
    }

    fn durability(&self, wire: Option<WireDurability>) -> Durability {
        match wire {
            Some(WireDurability::Sync) => Durability::Sync,
            Some(WireDurability::Buffered) => Durability::Buffered,
            None => self.kv.store().default_durability(),
        }
    }

    /// Answers a client request. `hint_for` is set when another node forwarded a write to
    /// this one as a fallback for that primary.
    pub async fn handle_client(
        self: &Arc<Self>,
        request: Request,
        forwarded: Option<Option<String>>,
    ) -> Response {
        match request {
            Request::Ping => Response::Pong {
                node: self.me().to_string(),
                protocol: PROTOCOL_VERSION,
            },
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Ring => match self.ring().encode() {
                Ok(ring) => Response::Ring {
                    ring,
                    members: std::iter::once(self.me().to_string())
                        .chain(self.peers.names())
                        .map(|node| {
                            let addr = self.peers.addr(&node).unwrap_or(self.peers.local_addr());
                            (node, addr.to_string())
                        })
                        .collect(),
                    n: self.config.quorum.n as u8,
                },
                Err(e) => error(ErrorCode::Internal, format!("cannot encode the ring: {e}")),
            },
            Request::Get {
                bucket,
                key,
                options,
            } => self.get(&bucket, &key, &options).await,
            Request::Put {
                bucket,
                key,
                context,
                value,
                options,
            } => {
                self.put(
                    bucket,
                    key,
                    context,
                    ClientWrite::Put(value),
                    options,
                    forwarded,
                )
                .await
            }
            Request::Delete {
                bucket,
                key,
                context,
                options,
            } => {
                self.put(
                    bucket,
                    key,
                    context,
                    ClientWrite::Delete,
                    options,
                    forwarded,
                )
                .await
            }
            Request::Update {
                bucket,
                key,
                op,
                options,
            } => {
                self.put(
                    bucket,
                    key,
                    Vec::new(),
                    ClientWrite::Update(op),
                    options,
                    forwarded,
                )
                .await
            }
            Request::PluginUpload {
                name,
                component,
                force,
            } => self.plugin_upload(name, component, force).await,
            Request::PluginList => self.plugin_list(None),
            Request::PluginShow { name } => self.plugin_list(Some(&name)),
            Request::BucketSet {
                bucket,
                changes,
                reconciler,
                detach_reconciler,
            } => {
                self.bucket_set(bucket, changes, reconciler, detach_reconciler)
                    .await
            }
            Request::BucketShow { bucket } => self.bucket_show(&bucket),
            Request::ClusterJoin { seed } => self.cluster_join(&seed).await,
            Request::ClusterLeave { node } => self.cluster_leave(node).await,
            Request::ClusterPlan => self.plan_response(false),
            Request::ClusterCommit => self.cluster_commit().await,
            Request::KeyCreate {
                name,
                admin,
                grants,
            } => self.key_create(name, admin, grants).await,
            Request::KeyList => self.key_list(None),
            Request::KeyShow { name } => self.key_list(Some(&name)),
            Request::KeyDelete { name } => self.key_delete(name).await,
            Request::PluginDelete { plugin } => self.plugin_delete(&plugin).await,
            // The server answers it per connection; it never reaches the cluster.
            Request::Authenticate { .. } => error(
                ErrorCode::Internal,
                "authentication is per connection, not forwarded".into(),
            ),
        }
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> NodeStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let ring = self.ring();
        let members: Vec<MemberStatus> = self
            .meta
            .state()
            .members
            .into_iter()
            .filter(|(_, e)| e.state != quiver_core::membership::MemberState::Left)
            .map(|(node, e)| MemberStatus {
                addr: if node == self.me() {
                    String::new()
                } else {
                    e.addr
                },
                up: self.peers.is_up(&node),
                partitions: ring.partitions_of(&node).len() as u32,
                state: e.state.as_str().to_string(),
                node,
            })
            .collect();
        let handoffs = self.handoff_trees(&ring);
        let handoff_keys = handoffs
            .iter()
            .map(|(tree, _)| self.kv.ae().tree_keys(*tree))
            .sum();
        let q = self.config.quorum;
        NodeStatus {
            node: self.me().to_string(),
            members,
            hints: self.kv.hint_count(),
            plugin_failures: self.plugins.failures(),
            ae_keys: self.kv.ae().keys(),
            ae_exchanges: self.kv.ae().metrics().exchanges.load(Relaxed),
            ae_keys_repaired: self.kv.ae().metrics().keys_repaired.load(Relaxed),
            ae_bytes_sent: self.kv.ae().metrics().bytes_sent.load(Relaxed),
            tombstones: self.kv.ae().tombstones(),
            tombstones_reaped: self.kv.ae().metrics().tombstones_reaped.load(Relaxed),
            partitions: ring.partitions(),
            ring_version: ring.version(),
            handoff_partitions: handoffs.len() as u64,
            handoff_keys,
            handoff_keys_sent: self.handoff_metrics.keys_sent.load(Relaxed),
            handoff_keys_dropped: self.handoff_metrics.keys_dropped.load(Relaxed),
            reads_speculated: self.reads_speculated.load(Relaxed),
            auth_refused: self.auth_refused(),
            connections_refused: self.connections_refused.load(Relaxed),
            n: q.n as u8,
            r: q.r as u8,
            w: q.w as u8,
        }
    }

    async fn get(self: &Arc<Self>, bucket: &str, key: &[u8], options: &ReadOptions) -> Response {
        let quorum = match self.quorum(bucket, options.r, None) {
            Ok(q) => q,
            Err(e) => return e,
        };
        // Validation errors are the same on every replica: answer them here, once.
        if let Err(e) = self.kv.validate(bucket, key) {
            return kv_error(&e);
        }
        let (targets, n) = self.targets(bucket, key, quorum.n);
        // A key whose only replica is this node (a one-node cluster, or n=1 on a replica):
        // nothing to count, merge or repair.
        if n == 1 && targets.len() == 1 && targets[0].node == self.me() {
            return match self.kv.get(bucket, key) {
                Ok(object) => self.answer_get(bucket, key, object, options).await,
                Err(e) => kv_error(&e),
            };
        }
        let index = self
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let spread = match self.config.read_repair {
            true => ReadSpread::for_read(index, self.config.full_reads_per_mille),
            false => ReadSpread::Quorum,
        };
        // The local replica answers inline: no task, no channel (with R=1 on a replica, the
        // read never leaves this function).
        let (mut read, remote) = Get::start(
            GetArgs {
                me: self.me(),
                bucket,
                key,
                targets: &targets,
                r: quorum.r,
                n,
                spread,
                index,
                now_ms: self.mono_ms(),
                speculate_ms: self
                    .config
                    .read_speculate
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            },
            || self.kv.get(bucket, key).map_err(|e| e.to_string()),
        );
        let (tx, mut rx) = mpsc::channel(targets.len().max(1));
        let fetch = read.fetch_request();
        let fetch_from = |target: Target| {
            let (this, tx, request) = (Arc::clone(self), tx.clone(), fetch.clone());
            tokio::spawn(async move {
                let result = this.fetch(&target.node, request).await;
                let _ = tx.send((target.node, result)).await;
            });
        };
        for target in remote {
            fetch_from(target);
        }
        loop {
            match read.decision() {
                Some(Ok(merged)) => {
                    if !read.is_finished() || read.needs_repair() {
                        // Late replies and read repair continue in the background.
                        let this = Arc::clone(self);
                        drop(tx);
                        tokio::spawn(async move {
                            while !read.is_finished() {
                                let Some((node, result)) = rx.recv().await else {
                                    return;
                                };
                                // Decided: a failure here needs no stand-in.
                                let _ = read.on_reply(&node, result);
                            }
                            this.read_repair(&read).await;
                        });
                    }
                    return self.answer_get(bucket, key, merged, options).await;
                }
                Some(Err(message)) => return error(ErrorCode::QuorumFailed, message),
                None => {
                    let reply = match read.deadline() {
                        Some(at) => {
                            let at = self.started + Duration::from_millis(at);
                            tokio::select! {
                                reply = rx.recv() => reply,
                                () = tokio::time::sleep_until(at.into()) => {
                                    if let Some(spare) = read.on_deadline(self.mono_ms()) {
                                        tracing::debug!(bucket, node = spare.node, "speculative read");
                                        self.reads_speculated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                        fetch_from(spare);
                                    }
                                    continue;
                                }
                            }
                        }
                        None => rx.recv().await,
                    };
                    match reply {
                        Some((node, result)) => {
                            if let Some(spare) = read.on_reply(&node, result) {
                                fetch_from(spare);
                            }
                        }
                        None => {
                            return error(
                                ErrorCode::Internal,
                                "read replies ended undecided".into(),
                            );
                        }
                    }
                }
            }
        }
    }

    /// The answer to a get of `merged`: its siblings, or, when the bucket has a reconciler
    /// and several siblings, their merge, written back so that it replaces them (the reply
    /// context covers the write-back, so the client's next write supersedes it).
    async fn answer_get(
        self: &Arc<Self>,
        bucket: &str,
        key: &[u8],
        merged: Object,
        options: &ReadOptions,
    ) -> Response {
        let plain = |o: &Object| {
            quiver_node_core::request::read_answer(
                self.me(),
                bucket,
                key,
                o,
                options.head,
                self.config.client_limits.response_bytes_max,
            )
        };
        if options.raw || options.head || merged.siblings().len() < 2 {
            return plain(&merged);
        }
        let Some(attached) = self.view(bucket).and_then(|v| v.reconciler.clone()) else {
            return plain(&merged);
        };
        // A plugin call burns up to its fuel limit of CPU; it runs on the plugin pool so the
        // async workers keep serving other requests meanwhile.
        let outcome = attached.merge_pooled(merged.clone()).await;
        let resolved = match outcome {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(bucket, key = %quiver_node_core::record::render_key(key), error = %e, "reconciler failed");
                return error(
                    ErrorCode::PluginFailed,
                    format!(
                        "node {}: bucket {bucket:?} key {}: {e}; the siblings are untouched (read with --raw to see them)",
                        self.me(),
                        quiver_node_core::record::render_key(key)
                    ),
                );
            }
        };
        let value = match &resolved {
            PluginMerged::Value(v) => v.clone(),
            PluginMerged::Tombstone => Vec::new(),
        };
        let sibling = WireSibling {
            value_bytes: value.len() as u64,
            value,
            tombstone: resolved == PluginMerged::Tombstone,
            timestamp_ms: now_ms(),
            actor: format!("reconciled by {}", attached.plugin),
        };
        let write = match resolved {
            PluginMerged::Value(v) => ClientWrite::Put(v),
            PluginMerged::Tombstone => ClientWrite::Delete,
        };
        let context = causality::encode_context(merged.context());
        let written = Box::pin(self.put(
            bucket.to_string(),
            key.to_vec(),
            context.clone(),
            write,
            WriteOptions::default(),
            None,
        ))
        .await;
        match written {
            Response::Written { context } => Response::Get {
                siblings: vec![sibling],
                context,
            },
            other => {
                // The merge is still the right answer; the siblings stay until a later
                // read or write merges them again.
                tracing::warn!(bucket, reply = ?other, "reconciled value not written back");
                Response::Get {
                    siblings: vec![sibling],
                    context,
                }
            }
        }
    }

    async fn fetch(&self, node: &str, request: DataRequest) -> Result<Object, String> {
        if node == self.me() {
            let DataRequest::Fetch { bucket, key } = request else {
                return Err("not a fetch".into());
            };
            return self.kv.get(&bucket, &key).map_err(|e| e.to_string());
        }
        match self.peers.call(node, &PeerRequest::from(request)).await {
            Ok(PeerResponse::Fetched(o)) => Ok(o),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn read_repair(&self, read: &Get) {
        if !self.config.read_repair {
            return;
        }
        for (target, store) in read.repairs() {
            let bucket = store.bucket.clone();
            match self.store_on(&target.node, store).await {
                Ok(()) => tracing::debug!(node = target.node, bucket, "read repair"),
                Err(e) => {
                    tracing::debug!(node = target.node, bucket, error = %e, "read repair failed")
                }
            }
        }
    }

    /// This node takes a `Store` as a replica: merges it, durable before it returns when the
    /// sender asked for `sync`.
    async fn store_here(&self, store: &StoreRequest) -> Result<(), KvError> {
        let durability = if store.sync {
            Durability::Sync
        } else {
            Durability::Buffered
        };
        self.kv
            .merge_remote(
                &store.bucket,
                &store.key,
                &store.object,
                durability,
                store.hint_for.as_deref(),
            )
            .await
            .map(|_| ())
    }

    async fn store_on(&self, node: &str, store: StoreRequest) -> Result<(), String> {
        if node == self.me() {
            return self.store_here(&store).await.map_err(|e| e.to_string());
        }
        let req = PeerRequest::from(DataRequest::Store(store));
        match self.peers.call(node, &req).await {
            Ok(PeerResponse::Stored) => Ok(()),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn put(
        self: &Arc<Self>,
        bucket: String,
        key: Vec<u8>,
        context: Vec<u8>,
        write: ClientWrite,
        options: WriteOptions,
        forwarded: Option<Option<String>>,
    ) -> Response {
        let quorum = match self.quorum(&bucket, None, options.w) {
            Ok(q) => q,
            Err(e) => return e,
        };
        let (targets, n) = self.targets(&bucket, &key, quorum.n);
        let durability = self.durability(options.durability);
        let sync = durability == Durability::Sync;
        let (my_target, sync_first, sync_alongside) =
            match plan_write(self.me(), &targets, forwarded, quorum.w, n, sync) {
                WritePlan::Coordinate {
                    me,
                    sync_first,
                    sync_alongside,
                } => (me, sync_first, sync_alongside),
                WritePlan::Forward(forwarding) => {
                    let request = match write {
                        ClientWrite::Put(value) => Request::Put {
                            bucket,
                            key,
                            context,
                            value,
                            options,
                        },
                        ClientWrite::Delete => Request::Delete {
                            bucket,
                            key,
                            context,
                            options,
                        },
                        ClientWrite::Update(op) => Request::Update {
                            bucket,
                            key,
                            op,
                            options,
                        },
                    };
                    return self.forward(request, forwarding).await;
                }
            };
        let local_durability = if sync_first {
            durability
        } else {
            Durability::Buffered
        };
        let view = self.view(&bucket);
        let reconciling = view.as_ref().and_then(|v| v.reconciler.clone());
        let sibling_threshold = view.as_ref().map_or(u32::MAX, |v| v.sibling_threshold);
        let (op, update_op) = match &write {
            ClientWrite::Put(value) => (WriteOp::Put(value.clone()), None),
            ClientWrite::Delete => (WriteOp::Delete, None),
            ClientWrite::Update(op) => {
                if reconciling.is_none() {
                    return error(
                        ErrorCode::NoReconciler,
                        format!(
                            "node {}: bucket {bucket:?} has no reconciler loaded here; attach one with `quiver bucket set {bucket} --reconciler NAME`",
                            self.me()
                        ),
                    );
                }
                (WriteOp::Put(Vec::new()), Some(op.as_slice()))
            }
        };
        let outcome = match self
            .kv
            .write(WriteArgs {
                bucket: &bucket,
                key: &key,
                context: &context,
                op,
                durability: local_durability,
                now_ms: now_ms(),
                hint_for: my_target.hint_for.as_deref(),
                reconciling,
                update_op,
                sibling_threshold,
            })
            .await
        {
            Ok(o) => o,
            Err(e) => return kv_error(&e),
        };
        let (_, fallbacks) = self.preference(&bucket, &key, quorum.n);
        let (put, sends) = Put::start(
            PutArgs {
                bucket: &bucket,
                key: &key,
                me: &my_target,
                targets: &targets,
                fallbacks: &fallbacks,
                w: quorum.w,
                n,
                sloppy: self.props(&bucket).sloppy,
                sync,
                sync_alongside,
            },
            &outcome,
            Broken::NONE,
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stores = Stores {
            cluster: Arc::clone(self),
            tx,
            rx,
            put,
        };
        if sync_alongside {
            let (kv, tx) = (Arc::clone(&self.kv), stores.tx.clone());
            tokio::spawn(async move {
                let result = kv.store().sync_applied().await.map_err(|e| e.to_string());
                let _ = tx.send((my_target, result));
            });
        }
        for (target, store) in sends {
            stores.spawn(target, store);
        }
        let decided = stores.until_decided().await;
        // Late acks and failures (with their fallbacks) are handled in the background.
        if !stores.put.is_finished() {
            tokio::spawn(stores.drain());
        }
        match decided {
            Some(Ok(())) => Response::Written {
                context: causality::encode_context(&outcome.context),
            },
            Some(Err(message)) => error(ErrorCode::QuorumFailed, message),
            None => error(ErrorCode::Internal, "write replies ended undecided".into()),
        }
    }

    /// Hands a client write to a node of the preference list, trying each target in turn.
    async fn forward(&self, request: Request, mut forwarding: Forwarding) -> Response {
        while let Some(target) = forwarding.next_target() {
            let req = PeerRequest::Forward {
                request: request.clone(),
                hint_for: target.hint_for.clone(),
            };
            match self
                .peers
                .call_within(&target.node, &req, self.config.forward_timeout)
                .await
            {
                Ok(PeerResponse::Forwarded(response)) => return response,
                Ok(other) => {
                    forwarding.on_failure(&target.node, format!("unexpected reply {other:?}"))
                }
                Err(e) => forwarding.on_failure(&target.node, e.to_string()),
            }
        }
        error(ErrorCode::QuorumFailed, forward_failed(&forwarding))
    }

    /// Answers a request from another node.
    pub async fn handle_peer(self: &Arc<Self>, request: PeerRequest) -> PeerResponse {
        match request.inbound(self.me(), &|| self.ring().id()) {
            Inbound::Ping => PeerResponse::Pong(self.me().to_string()),
            Inbound::Data(DataRequest::Fetch { bucket, key }) => match self.kv.get(&bucket, &key) {
                Ok(o) => PeerResponse::Fetched(o),
                Err(e) => PeerResponse::Error(ErrorReply {
                    code: e.code(),
                    message: e.to_string(),
                }),
            },
            Inbound::Data(DataRequest::Store(store)) => match self.store_here(&store).await {
                Ok(()) => PeerResponse::Stored,
                Err(e) => PeerResponse::Error(ErrorReply {
                    code: e.code(),
                    message: e.to_string(),
                }),
            },
            Inbound::Forward { request, hint_for } => {
                PeerResponse::Forwarded(self.handle_client(request, Some(hint_for)).await)
            }
            Inbound::MetaDigest(digest) => {
                quiver_node_core::membership::answer_digest(&self.meta.state(), digest)
            }
            Inbound::MetaPush { state, blobs } => self.handle_meta_push(&state, &blobs).await,
            Inbound::MetaBlobs(hashes) => self.handle_meta_blobs(hashes),
            Inbound::Ae(request) => self.handle_ae_peer(request),
            Inbound::Reap(request) => self.handle_reap_peer(request).await,
            Inbound::Join {
                node,
                entry,
                partitions,
                quorum,
            } => self.handle_join(node, entry, partitions, quorum).await,
            Inbound::Handoff(request) => self.handle_handoff(request).await,
            Inbound::Refuse(reply) => PeerResponse::Error(reply),
        }
    }

    /// One pass of hinted handoff: for every reachable member this node holds hints for,
    /// send the hinted keys and drop the hints the owner acknowledged. Returns how many keys
    /// were handed over.
    pub async fn deliver_hints(&self) -> usize {
        if self.kv.hint_count() == 0 {
            return 0;
        }
        let members = self.peers.names();
        let mut pass = HintPass::new(members.clone());
        let is_up = |p: &str| self.peers.is_up(p);
        let is_primary = |bucket: &str, key: &[u8]| {
            let (primaries, _) = self.preference(bucket, key, self.props(bucket).quorum.n);
            primaries.iter().any(|p| p == self.me())
        };
        let delivered = loop {
            let (owner, hinted) = match pass.next(&self.kv, &is_up) {
                HintStep::Done { delivered } => break delivered,
                HintStep::Store { owner, hinted } => (owner, hinted),
            };
            let req = PeerRequest::Store {
                bucket: hinted.bucket.clone(),
                key: hinted.key.clone(),
                object: hinted.object,
                hint_for: None,
                sync: true,
            };
            let reply = match self.peers.call(&owner, &req).await {
                Ok(PeerResponse::Stored) => StoreReply::Stored,
                Ok(_) | Err(PeerError::Refused { .. }) => StoreReply::Refused,
                Err(_) => StoreReply::Unreachable,
            };
            match pass.on_reply(&self.kv, reply, &is_primary, &members) {
                Ok(true) => {
                    if let Err(e) = self.kv.store().sync_applied().await {
                        tracing::error!(owner, error = %e, "cannot make a delivered hint's cleanup durable");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::error!(owner, error = %e, "cannot drop a delivered hint"),
            }
        };
        if delivered > 0 {
            tracing::info!(delivered, "hinted handoff");
        }
        usize::try_from(delivered).unwrap_or(usize::MAX)
    }

    /// Background duties until the process ends: probing down peers and delivering hints.
    pub async fn run_background(self: Arc<Self>, probe_every: Duration, hints_every: Duration) {
        let mut hints = tokio::time::interval(hints_every);
        let mut meta = tokio::time::interval(self.config.membership.gossip_interval);
        hints.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        meta.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Probes tick on their own: in the loop below, a gossip or hint call sent into a cut
        // that has just healed held them up for its whole peer timeout, and the healed peer
        // stayed down here that much longer (a fault-suite finding: 3.1 s after a one-way
        // cut). The simulator's tick never waited.
        let probes = async {
            let mut probe = tokio::time::interval(probe_every);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                probe.tick().await;
                self.peers.probe_down_peers();
            }
        };
        let duties = async {
            loop {
                tokio::select! {
                    _ = hints.tick() => { self.deliver_hints().await; }
                    // A peer back after a fault gets its hints now, not at the next tick:
                    // reads that need every replica miss what it was handed until then.
                    () = self.peers.came_up().notified() => { self.deliver_hints().await; }
                    _ = meta.tick() => {
                        self.sync_meta().await;
                        self.ae_refile_if_pending().await;
                    }
                }
            }
        };
        // Anti-entropy runs beside the other duties, not between them: an exchange that
        // restores a wiped replica may take a while and must not hold up probes or hints.
        let anti_entropy = async {
            let Some(every) = self.config.ae.interval else {
                return;
            };
            let mut ae = tokio::time::interval(every);
            ae.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick of an interval is immediate; let the cluster settle first.
            ae.tick().await;
            loop {
                ae.tick().await;
                self.ae_tick(self.config.ae.max_keys).await;
            }
        };
        // Handoff too: a transfer of a large partition must not hold up probes or gossip.
        let handoff = async {
            let mut every = tokio::time::interval(self.config.membership.handoff_interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                self.handoff_tick(self.config.ae.max_keys).await;
            }
        };
        tokio::join!(probes, duties, anti_entropy, handoff);
    }
}

/// The driver of one [`Put`]: runs the stores it asks for as tasks and feeds their results
/// back, before and after the client's answer.
struct Stores {
    cluster: Arc<Cluster>,
    tx: mpsc::UnboundedSender<(Target, Result<(), String>)>,
    rx: mpsc::UnboundedReceiver<(Target, Result<(), String>)>,
    put: Put,
}

impl Stores {
    fn spawn(&self, target: Target, store: StoreRequest) {
        let (cluster, tx) = (Arc::clone(&self.cluster), self.tx.clone());
        tokio::spawn(async move {
            let result = cluster.store_on(&target.node, store).await;
            let _ = tx.send((target, result));
        });
    }

    /// Feeds one result (of a store, or of the local fsync) to the put and sends the
    /// replacement store it asks for.
    fn on_result(&mut self, target: Target, result: Result<(), String>) {
        let peers = &self.cluster.peers;
        if let Some((next, store)) = self
            .put
            .on_store_result(&target, result, |n| peers.is_up(n))
        {
            self.spawn(next, store);
        }
    }

    /// Waits until the quorum is decided (`None` only if replies stopped, a bug).
    async fn until_decided(&mut self) -> Option<Result<(), String>> {
        loop {
            if let Some(decided) = self.put.decision() {
                return Some(decided);
            }
            let (target, result) = self.rx.recv().await?;
            self.on_result(target, result);
        }
    }

    /// Handles every remaining result, so late failures still reach a fallback.
    async fn drain(mut self) {
        while !self.put.is_finished() {
            let Some((target, result)) = self.rx.recv().await else {
                return;
            };
            self.on_result(target, result);
        }
    }
}
