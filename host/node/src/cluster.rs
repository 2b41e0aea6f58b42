//! Replication: the coordinator side of client requests and the replica side of peer
//! requests (Dynamo §4.5-4.6).
//!
//! A put is coordinated by a node of the key's preference list: it issues the dot against
//! its own record (so per-key actor epochs keep working), then sends the new state to the
//! other targets and answers after `w` acknowledgements. A node outside the preference list
//! forwards the put to one inside it. A get asks every target, answers after `r` replies
//! with their merge, and repairs stale replicas in the background once all have answered.
//! Which targets, and when a quorum is decided, are the core's pure logic
//! (`quiver_core::quorum`); this module only moves messages.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quiver_core::causality::{self, Object, WriteOp};
use quiver_core::quorum::{Quorum, ReadQuorum, Status, Target, WriteQuorum, select_targets};
use quiver_core::ring::Ring;
use quiver_sdk::wire::{
    ErrorCode, ErrorReply, MemberStatus, NodeStatus, PROTOCOL_VERSION, ReadOptions, Request,
    Response, WireDurability, WireSibling, WriteOptions,
};
use tokio::sync::mpsc;

use crate::kv::{KvError, KvService, WriteArgs};
use crate::peer::{PeerError, PeerRequest, PeerResponse, Peers};
use crate::storage::Durability;

/// Keys handed over per hint-delivery pass and owner.
const HINT_BATCH_KEYS: usize = 256;

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
}

/// Replication properties of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketProps {
    /// n/r/w of the bucket.
    pub quorum: Quorum,
    /// False requires primaries only (Riak's pw/pr): no fallbacks, no hints.
    pub sloppy: bool,
}

/// The replication layer of one node.
#[derive(Debug)]
pub struct Cluster {
    kv: Arc<KvService>,
    peers: Arc<Peers>,
    ring: Ring,
    config: ReplicationConfig,
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn wire_siblings(object: &Object) -> Vec<WireSibling> {
    object
        .siblings()
        .iter()
        .map(|s| WireSibling {
            value: s.value.clone(),
            tombstone: s.meta.tombstone,
            timestamp_ms: s.meta.timestamp_ms,
            actor: s.dot.actor.to_string(),
        })
        .collect()
}

impl Cluster {
    /// Wires the layer together.
    pub fn new(
        kv: Arc<KvService>,
        peers: Arc<Peers>,
        ring: Ring,
        config: ReplicationConfig,
    ) -> Self {
        Cluster {
            kv,
            peers,
            ring,
            config,
        }
    }

    /// The key-value service underneath.
    pub fn kv(&self) -> &Arc<KvService> {
        &self.kv
    }

    /// The peers.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// The ring.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    fn me(&self) -> &str {
        self.peers.me()
    }

    /// Preference list of a key: (primaries, fallbacks) for replication factor `n`.
    pub fn preference(&self, bucket: &str, key: &[u8], n: usize) -> (Vec<String>, Vec<String>) {
        let list = self.ring.preference_list_for_key(bucket.as_bytes(), key, n);
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

    /// The bucket's replication properties (the node defaults unless configured).
    pub fn props(&self, bucket: &str) -> BucketProps {
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
            Request::Status => Response::Status(self.status()),
            Request::Ring => match self.ring.encode() {
                Ok(ring) => Response::Ring {
                    ring,
                    members: std::iter::once(self.me().to_string())
                        .chain(self.peers.names().map(str::to_string))
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
                    WriteOp::Put(value),
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
                self.put(bucket, key, context, WriteOp::Delete, options, forwarded)
                    .await
            }
        }
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> NodeStatus {
        let mut members: Vec<MemberStatus> = std::iter::once(self.me().to_string())
            .chain(self.peers.names().map(str::to_string))
            .map(|node| MemberStatus {
                addr: self
                    .peers
                    .addr(&node)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                up: self.peers.is_up(&node),
                partitions: self.ring.partitions_of(&node).len() as u32,
                node,
            })
            .collect();
        members.sort_by(|a, b| a.node.cmp(&b.node));
        let q = self.config.quorum;
        NodeStatus {
            node: self.me().to_string(),
            members,
            hints: self.kv.hint_count(),
            partitions: self.ring.partitions(),
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
                Ok(object) => Response::Get {
                    context: causality::encode_context(object.context()),
                    siblings: wire_siblings(&object),
                },
                Err(e) => kv_error(&e),
            };
        }
        let mut read = ReadQuorum::new(&targets, quorum.r, n);
        // The local replica answers inline: no task, no channel (on a single node, or with
        // R=1 on a replica, the read never leaves this function).
        let me = self.me();
        if targets.iter().any(|t| t.node == me) {
            let local = self.kv.get(bucket, key).map_err(|e| e.to_string());
            feed_read(&mut read, me, local);
        }
        let remote: Vec<&Target> = targets.iter().filter(|t| t.node != me).collect();
        let (tx, mut rx) = mpsc::channel(remote.len().max(1));
        for target in &remote {
            let (this, tx, bucket, key, node) = (
                Arc::clone(self),
                tx.clone(),
                bucket.to_string(),
                key.to_vec(),
                target.node.clone(),
            );
            tokio::spawn(async move {
                let result = this.fetch(&node, &bucket, &key).await;
                let _ = tx.send((node, result)).await;
            });
        }
        drop(tx);
        loop {
            match read.status() {
                Status::Reached(merged) => {
                    let reply = Response::Get {
                        siblings: wire_siblings(merged),
                        context: causality::encode_context(merged.context()),
                    };
                    if remote.is_empty() {
                        return reply;
                    }
                    // Late replies and read repair continue in the background.
                    let this = Arc::clone(self);
                    let (bucket, key) = (bucket.to_string(), key.to_vec());
                    tokio::spawn(async move {
                        while let Some((node, result)) = rx.recv().await {
                            feed_read(&mut read, &node, result);
                        }
                        this.read_repair(&bucket, &key, &read, &targets).await;
                    });
                    return reply;
                }
                Status::Failed(f) => {
                    return error(
                        ErrorCode::QuorumFailed,
                        format!(
                            "get {bucket:?} {}: read quorum r={} not reached: {f}",
                            crate::kv::render_key(key),
                            quorum.r
                        ),
                    );
                }
                Status::Pending => match rx.recv().await {
                    Some((node, result)) => feed_read(&mut read, &node, result),
                    None => {
                        return error(ErrorCode::Internal, "read replies ended undecided".into());
                    }
                },
            }
        }
    }

    async fn fetch(&self, node: &str, bucket: &str, key: &[u8]) -> Result<Object, String> {
        if node == self.me() {
            return self.kv.get(bucket, key).map_err(|e| e.to_string());
        }
        let req = PeerRequest::Fetch {
            bucket: bucket.to_string(),
            key: key.to_vec(),
        };
        match self.peers.call(node, &req).await {
            Ok(PeerResponse::Fetched(o)) => Ok(o),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn read_repair(&self, bucket: &str, key: &[u8], read: &ReadQuorum, targets: &[Target]) {
        for node in read.stale_replicas() {
            let hint_for = targets
                .iter()
                .find(|t| t.node == node)
                .and_then(|t| t.hint_for.clone());
            let result = self
                .store_on(
                    node,
                    bucket,
                    key,
                    read.merged(),
                    hint_for,
                    Durability::Buffered,
                )
                .await;
            match result {
                Ok(()) => tracing::debug!(node, bucket, "read repair"),
                Err(e) => tracing::debug!(node, bucket, error = %e, "read repair failed"),
            }
        }
    }

    async fn store_on(
        &self,
        node: &str,
        bucket: &str,
        key: &[u8],
        object: &Object,
        hint_for: Option<String>,
        durability: Durability,
    ) -> Result<(), String> {
        if node == self.me() {
            return self
                .kv
                .merge_remote(bucket, key, object, durability, hint_for.as_deref())
                .await
                .map_err(|e| e.to_string());
        }
        let req = PeerRequest::Store {
            bucket: bucket.to_string(),
            key: key.to_vec(),
            object: object.clone(),
            hint_for,
            sync: durability == Durability::Sync,
        };
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
        op: WriteOp,
        options: WriteOptions,
        forwarded: Option<Option<String>>,
    ) -> Response {
        let quorum = match self.quorum(&bucket, None, options.w) {
            Ok(q) => q,
            Err(e) => return e,
        };
        let (targets, n) = self.targets(&bucket, &key, quorum.n);
        let me = self.me().to_string();
        let my_target = match (&forwarded, targets.iter().find(|t| t.node == me)) {
            (_, Some(t)) => t.clone(),
            // Forwarded here as a fallback (the forwarder saw primaries down that this node
            // may still believe up): coordinate as the forwarder decided.
            (Some(hint_for), None) => Target {
                node: me.clone(),
                hint_for: hint_for.clone(),
            },
            (None, None) => {
                let request = match op {
                    WriteOp::Put(value) => Request::Put {
                        bucket,
                        key,
                        context,
                        value,
                        options,
                    },
                    WriteOp::Delete => Request::Delete {
                        bucket,
                        key,
                        context,
                        options,
                    },
                };
                return self.forward(request, &targets, quorum, n).await;
            }
        };
        let durability = self.durability(options.durability);
        let others = targets.iter().any(|t| t.node != me);
        // With other replicas, the local fsync runs alongside theirs instead of before them:
        // the new version is applied here, sent out at once, and the local copy counts
        // towards W only once it is durable. (If this node crashes before its fsync, its next
        // boot takes a fresh epoch, so the dot sent out is never issued again.)
        let local_durability = if others {
            Durability::Buffered
        } else {
            durability
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
            })
            .await
        {
            Ok(o) => o,
            Err(e) => return kv_error(&e),
        };
        // The only replica (a one-node cluster, or n=1): the local write is the quorum.
        if n == 1 && !others && quorum.w == 1 {
            return Response::Written {
                context: causality::encode_context(&outcome.context),
            };
        }
        let mut all: Vec<Target> = vec![my_target.clone()];
        all.extend(targets.into_iter().filter(|t| t.node != me));
        let mut write = WriteQuorum::new(&all, quorum.w, n);
        let local_sync_pending = others && durability == Durability::Sync;
        if !local_sync_pending {
            write.on_ack(&me);
        }
        // Fallbacks not yet used: a target that fails is replaced by the next one that is up
        // (Dynamo §4.6), holding a hint for the replica it stands in for. This goes on after
        // the client has its answer, so a replica that fails late still gets its copy handed
        // over through a hint instead of waiting for a read to repair it.
        let (_, fallbacks) = self.preference(&bucket, &key, quorum.n);
        let spare: std::collections::VecDeque<String> = fallbacks
            .into_iter()
            .filter(|f| !all.iter().any(|t| &t.node == f))
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stores = Stores {
            cluster: Arc::clone(self),
            bucket: bucket.clone(),
            key: key.clone(),
            object: Arc::new(outcome.object),
            durability,
            sloppy: self.props(&bucket).sloppy,
            spare,
            tx,
            rx,
            write,
        };
        if local_sync_pending {
            let (kv, tx) = (Arc::clone(&self.kv), stores.tx.clone());
            tokio::spawn(async move {
                let result = kv.store().sync_applied().await.map_err(|e| e.to_string());
                let _ = tx.send((my_target, result));
            });
        }
        for target in all.into_iter().skip(1) {
            stores.spawn(target);
        }
        let decided = stores.until_decided().await;
        // Late acks and failures (with their fallbacks) are handled in the background.
        if !stores.write.pending().is_empty() {
            tokio::spawn(stores.drain());
        }
        match decided {
            Some(Status::Reached(())) => Response::Written {
                context: causality::encode_context(&outcome.context),
            },
            Some(Status::Failed(f)) => error(
                ErrorCode::QuorumFailed,
                format!(
                    "put {bucket:?} {}: write quorum w={} not reached: {f}",
                    crate::kv::render_key(&key),
                    quorum.w
                ),
            ),
            _ => error(ErrorCode::Internal, "write replies ended undecided".into()),
        }
    }

    /// Hands a client write to a node of the preference list, trying each target in turn.
    async fn forward(
        &self,
        request: Request,
        targets: &[Target],
        quorum: Quorum,
        n: usize,
    ) -> Response {
        let mut failures = Vec::new();
        for target in targets {
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
                    failures.push((target.node.clone(), format!("unexpected reply {other:?}")))
                }
                Err(e) => failures.push((target.node.clone(), e.to_string())),
            }
        }
        let failure = quiver_core::quorum::QuorumFailure {
            needed: quorum.w,
            succeeded: Vec::new(),
            failed: failures,
            unavailable: n.saturating_sub(targets.len()),
        };
        error(
            ErrorCode::QuorumFailed,
            format!("no replica could coordinate the write: {failure}"),
        )
    }

    /// Answers a request from another node.
    pub async fn handle_peer(self: &Arc<Self>, request: PeerRequest) -> PeerResponse {
        match request {
            PeerRequest::Ping => PeerResponse::Pong(self.me().to_string()),
            PeerRequest::Fetch { bucket, key } => match self.kv.get(&bucket, &key) {
                Ok(o) => PeerResponse::Fetched(o),
                Err(e) => PeerResponse::Error(ErrorReply {
                    code: e.code(),
                    message: e.to_string(),
                }),
            },
            PeerRequest::Store {
                bucket,
                key,
                object,
                hint_for,
                sync,
            } => {
                let durability = if sync {
                    Durability::Sync
                } else {
                    Durability::Buffered
                };
                match self
                    .kv
                    .merge_remote(&bucket, &key, &object, durability, hint_for.as_deref())
                    .await
                {
                    Ok(()) => PeerResponse::Stored,
                    Err(e) => PeerResponse::Error(ErrorReply {
                        code: e.code(),
                        message: e.to_string(),
                    }),
                }
            }
            PeerRequest::Forward { request, hint_for } => {
                PeerResponse::Forwarded(self.handle_client(request, Some(hint_for)).await)
            }
        }
    }

    /// One pass of hinted handoff: for every reachable member this node holds hints for,
    /// send the hinted keys and drop the hints the owner acknowledged. Returns how many keys
    /// were handed over.
    pub async fn deliver_hints(&self) -> usize {
        if self.kv.hint_count() == 0 {
            return 0;
        }
        let mut delivered = 0;
        let owners: Vec<String> = self.peers.names().map(str::to_string).collect();
        for owner in owners {
            if !self.peers.is_up(&owner) {
                continue;
            }
            let batch = match self.kv.hinted_keys(&owner, HINT_BATCH_KEYS) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(owner, error = %e, "cannot read hints");
                    continue;
                }
            };
            for hinted in batch {
                let req = PeerRequest::Store {
                    bucket: hinted.bucket.clone(),
                    key: hinted.key.clone(),
                    object: hinted.object.clone(),
                    hint_for: None,
                    sync: true,
                };
                match self.peers.call(&owner, &req).await {
                    Ok(PeerResponse::Stored) => {}
                    Ok(_) | Err(PeerError::Refused { .. }) => continue,
                    // The owner went away again: stop for now, it is marked down.
                    Err(_) => break,
                }
                let (primaries, _) = self.preference(
                    &hinted.bucket,
                    &hinted.key,
                    self.props(&hinted.bucket).quorum.n,
                );
                let keep = primaries.iter().any(|p| p == self.me())
                    || self.peers.names().any(|other| {
                        other != owner && self.kv.has_hint(other, &hinted.bucket, &hinted.key)
                    });
                match self
                    .kv
                    .hint_delivered(&owner, &hinted.bucket, &hinted.key, &hinted.object, keep)
                    .await
                {
                    Ok(()) => delivered += 1,
                    Err(e) => tracing::error!(owner, error = %e, "cannot drop a delivered hint"),
                }
            }
        }
        if delivered > 0 {
            tracing::info!(delivered, "hinted handoff");
        }
        delivered
    }

    /// Background duties until the process ends: probing down peers and delivering hints.
    pub async fn run_background(self: Arc<Self>, probe_every: Duration, hints_every: Duration) {
        let mut probe = tokio::time::interval(probe_every);
        let mut hints = tokio::time::interval(hints_every);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        hints.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = probe.tick() => self.peers.probe_down_peers().await,
                _ = hints.tick() => { self.deliver_hints().await; }
            }
        }
    }
}

/// The replica stores of one put: sends them, replaces failed targets by fallbacks with
/// hints, and tracks the write quorum, before and after the client's answer.
struct Stores {
    cluster: Arc<Cluster>,
    bucket: String,
    key: Vec<u8>,
    object: Arc<Object>,
    durability: Durability,
    sloppy: bool,
    spare: std::collections::VecDeque<String>,
    tx: mpsc::UnboundedSender<(Target, Result<(), String>)>,
    rx: mpsc::UnboundedReceiver<(Target, Result<(), String>)>,
    write: WriteQuorum,
}

impl Stores {
    fn spawn(&self, target: Target) {
        let (cluster, tx, bucket, key, object, durability) = (
            Arc::clone(&self.cluster),
            self.tx.clone(),
            self.bucket.clone(),
            self.key.clone(),
            Arc::clone(&self.object),
            self.durability,
        );
        tokio::spawn(async move {
            let result = cluster
                .store_on(
                    &target.node,
                    &bucket,
                    &key,
                    &object,
                    target.hint_for.clone(),
                    durability,
                )
                .await;
            let _ = tx.send((target, result));
        });
    }

    /// Takes one store result into account; a failure sends the write to the next fallback
    /// that is up, with a hint for the replica it replaces.
    fn on_result(&mut self, target: Target, result: Result<(), String>) {
        match result {
            Ok(()) => self.write.on_ack(&target.node),
            Err(e) => {
                if self.sloppy {
                    while let Some(fallback) = self.spare.pop_front() {
                        if self.cluster.peers.is_up(&fallback) {
                            let hint_for = target.hint_for.clone().or(Some(target.node.clone()));
                            self.write.add_target(&fallback);
                            self.spawn(Target {
                                node: fallback,
                                hint_for,
                            });
                            break;
                        }
                    }
                }
                self.write.on_failure(&target.node, e);
            }
        }
    }

    /// Waits until the quorum is decided (`None` only if replies stopped, a bug).
    async fn until_decided(&mut self) -> Option<Status<()>> {
        loop {
            match self.write.status() {
                Status::Pending => {}
                decided => return Some(decided),
            }
            let (target, result) = self.rx.recv().await?;
            self.on_result(target, result);
        }
    }

    /// Handles every remaining result, so late failures still reach a fallback.
    async fn drain(mut self) {
        while !self.write.pending().is_empty() {
            let Some((target, result)) = self.rx.recv().await else {
                return;
            };
            self.on_result(target, result);
        }
    }
}

fn feed_read(read: &mut ReadQuorum, node: &str, result: Result<Object, String>) {
    match result {
        Ok(o) => read.on_reply(node, o),
        Err(e) => read.on_failure(node, e),
    }
}
