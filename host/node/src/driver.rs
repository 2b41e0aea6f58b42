//! The node machine (`quiver_node_core::node::Node`) under tokio: the first half of the
//! server as its driver (issue 12; the plan is in `docs/decisions/simulation.md`).
//!
//! One task owns the machine. Inputs come through a [`DriverHandle`] (client requests and
//! peer requests, each with a oneshot for its answer); effects go out as tasks: a peer
//! call through the [`Transport`] with no timeout of its own (the machine keeps the
//! deadlines; a transport error fails the call at once), a sync to the store's group
//! commit, a reply to its oneshot. One timer: the task sleeps until the machine's
//! `next_deadline` or its next input.
//!
//! Not wired into the QUIC server yet: the transport is a trait so this can be shown with
//! nodes in one process (`host/node/tests/driver.rs`); reconciler calls are answered "not
//! loaded" until the plugin pool is attached, and the node's metadata lives in memory until
//! the `MetaStore` is.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use quiver_core::causality::Object;
use quiver_core::meta::MetaState;
use quiver_core::storage::StorageEngine;
use quiver_node_core::node::{Effect, Message, Node, NodeDisk, PluginError};
use quiver_node_core::protocol::{PeerRequest, PeerResponse};
use quiver_sdk::wire::{ErrorCode, ErrorReply, Request, Response};
use quiver_storage::Store;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// Carries a peer call to another node and brings its answer back.
pub trait Transport: Send + Sync + 'static {
    /// Sends `body` to `peer`; an error is a call that could not be carried.
    fn call(
        &self,
        peer: String,
        body: PeerRequest,
    ) -> Pin<Box<dyn Future<Output = Result<PeerResponse, String>> + Send>>;
}

/// A node's disk under the driver: the group-commit store (syncs are the driver's, as
/// effects) and the cluster metadata (in memory for now).
#[derive(Debug)]
pub struct StoreDisk {
    store: Store,
    meta: Option<MetaState>,
    fresh_incarnation: u64,
}

impl StoreDisk {
    /// A disk over `store`; a first boot on it records `fresh_incarnation`.
    pub fn new(store: Store, fresh_incarnation: u64) -> Self {
        StoreDisk {
            store,
            meta: None,
            fresh_incarnation,
        }
    }
}

impl NodeDisk for StoreDisk {
    fn engine(&self) -> Arc<dyn StorageEngine> {
        Arc::new(self.store.clone())
    }

    fn fresh_incarnation(&self) -> u64 {
        self.fresh_incarnation
    }

    fn meta(&self) -> Option<&MetaState> {
        self.meta.as_ref()
    }

    fn store_meta(&mut self, meta: MetaState) {
        self.meta = Some(meta);
    }

    fn sync_inline(&self) -> Option<Result<(), String>> {
        None
    }
}

enum Input {
    Client {
        request: Request,
        reply: oneshot::Sender<Response>,
    },
    Peer {
        from: String,
        body: PeerRequest,
        reply: oneshot::Sender<PeerResponse>,
    },
    Local {
        bucket: String,
        key: Vec<u8>,
        reply: oneshot::Sender<Result<Object, String>>,
    },
}

/// Something an effect's task brought back.
enum Done {
    Call {
        peer: String,
        id: u64,
        result: Box<Result<PeerResponse, String>>,
    },
    Synced {
        token: u64,
        result: Result<(), String>,
    },
}

/// Hands requests to a running driver. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DriverHandle {
    tx: mpsc::Sender<Input>,
}

fn stopped() -> ErrorReply {
    ErrorReply {
        code: ErrorCode::ShuttingDown,
        message: "the node is stopping".into(),
    }
}

impl DriverHandle {
    /// A client request; its answer.
    pub async fn client(&self, request: Request) -> Response {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Input::Client { request, reply })
            .await
            .is_err()
        {
            return Response::Error(stopped());
        }
        rx.await.unwrap_or_else(|_| Response::Error(stopped()))
    }

    /// This node's own copy of `bucket`/`key` (empty when it holds none), read by the
    /// machine between two inputs.
    pub async fn local(&self, bucket: &str, key: &[u8]) -> Result<Object, String> {
        let (reply, rx) = oneshot::channel();
        let input = Input::Local {
            bucket: bucket.to_string(),
            key: key.to_vec(),
            reply,
        };
        self.tx.send(input).await.map_err(|_| stopped().message)?;
        rx.await.map_err(|_| stopped().message)?
    }

    /// A peer's request; the answer to send back.
    pub async fn peer(&self, from: &str, body: PeerRequest) -> PeerResponse {
        let (reply, rx) = oneshot::channel();
        let input = Input::Peer {
            from: from.to_string(),
            body,
            reply,
        };
        if self.tx.send(input).await.is_err() {
            return PeerResponse::Error(stopped());
        }
        rx.await.unwrap_or_else(|_| PeerResponse::Error(stopped()))
    }
}

/// Runs `node` on a task of its own until every handle is dropped.
pub fn spawn(node: Node<StoreDisk>, store: Store, transport: Arc<dyn Transport>) -> DriverHandle {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(run(node, store, transport, rx));
    DriverHandle { tx }
}

struct Driver {
    node: Node<StoreDisk>,
    store: Store,
    transport: Arc<dyn Transport>,
    started: Instant,
    tasks: JoinSet<Done>,
    next_ticket: u64,
    clients: HashMap<u64, oneshot::Sender<Response>>,
    next_peer_id: u64,
    peers: HashMap<(String, u64), oneshot::Sender<PeerResponse>>,
}

impl Driver {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn input(&mut self, input: Input) -> Vec<Effect> {
        let now = self.now_ms();
        match input {
            Input::Client { request, reply } => {
                self.next_ticket += 1;
                self.clients.insert(self.next_ticket, reply);
                self.node.on_client(now, self.next_ticket, request)
            }
            Input::Peer { from, body, reply } => {
                self.next_peer_id += 1;
                let id = self.next_peer_id;
                self.peers.insert((from.clone(), id), reply);
                self.node
                    .on_message(now, &from, Message::Request { id, body })
            }
            Input::Local { bucket, key, reply } => {
                let object = self.node.local_object(&bucket, &key);
                let _ = reply.send(object.map_err(|e| e.to_string()));
                Vec::new()
            }
        }
    }

    fn done(&mut self, done: Done) -> Vec<Effect> {
        let now = self.now_ms();
        match done {
            Done::Call { peer, id, result } => match *result {
                Ok(body) => self
                    .node
                    .on_message(now, &peer, Message::Response { id, body }),
                Err(reason) => self.node.on_call_failed(now, &peer, id, reason),
            },
            Done::Synced { token, result } => self.node.on_synced(now, token, result),
        }
    }

    fn effects(&mut self, mut fx: Vec<Effect>) {
        while !fx.is_empty() {
            let mut more = Vec::new();
            for effect in fx {
                match effect {
                    Effect::Send {
                        to,
                        msg: Message::Request { id, body },
                    } => {
                        let call = self.transport.call(to.clone(), body);
                        self.tasks.spawn(async move {
                            Done::Call {
                                peer: to,
                                id,
                                result: Box::new(call.await),
                            }
                        });
                    }
                    Effect::Send {
                        to,
                        msg: Message::Response { id, body },
                    } => {
                        if let Some(reply) = self.peers.remove(&(to, id)) {
                            let _ = reply.send(body);
                        }
                    }
                    Effect::Reply { ticket, result } => {
                        if let Some(reply) = self.clients.remove(&ticket) {
                            let _ = reply.send(result);
                        }
                    }
                    Effect::Sync { token } => {
                        let store = self.store.clone();
                        self.tasks.spawn(async move {
                            let result = store.sync_applied().await.map_err(|e| e.to_string());
                            Done::Synced { token, result }
                        });
                    }
                    Effect::Plugin { call, .. } => {
                        let now = self.now_ms();
                        more.extend(self.node.on_plugin_done(
                            now,
                            call,
                            Err(PluginError::NotLoaded),
                        ));
                    }
                    Effect::Observe(observation) => {
                        tracing::trace!(?observation, "node machine");
                    }
                }
            }
            fx = more;
        }
    }
}

async fn run(
    node: Node<StoreDisk>,
    store: Store,
    transport: Arc<dyn Transport>,
    mut rx: mpsc::Receiver<Input>,
) {
    let mut d = Driver {
        node,
        store,
        transport,
        started: Instant::now(),
        tasks: JoinSet::new(),
        next_ticket: 0,
        clients: HashMap::new(),
        next_peer_id: 0,
        peers: HashMap::new(),
    };
    loop {
        let deadline = d.node.next_deadline().map(|ms| {
            let at = d.started + std::time::Duration::from_millis(ms);
            tokio::time::Instant::from_std(at)
        });
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let fx = tokio::select! {
            input = rx.recv() => match input {
                Some(input) => d.input(input),
                None => return,
            },
            Some(done) = d.tasks.join_next() => match done {
                Ok(done) => d.done(done),
                Err(e) => {
                    tracing::error!(error = %e, "a node machine effect task failed");
                    Vec::new()
                }
            },
            () = sleep => {
                let now = d.now_ms();
                d.node.on_tick(now)
            }
        };
        d.effects(fx);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::time::Duration;

    use quiver_core::quorum::Quorum;
    use quiver_core::ring::ClaimParams;
    use quiver_node_core::SystemClock;
    use quiver_node_core::broken::Broken;
    use quiver_node_core::membership::first_membership;
    use quiver_node_core::node::{Durability, NodeConfig};
    use quiver_sdk::wire::{ReadOptions, WireDurability, WriteOptions};
    use quiver_storage::MemoryEngine;

    use super::*;

    /// Nodes in one process: a call goes straight to the peer's handle, unless the peer
    /// is "down", when it fails at once as a refused connection would.
    #[derive(Default)]
    struct Mesh {
        nodes: Mutex<HashMap<String, DriverHandle>>,
        down: Mutex<HashSet<String>>,
    }

    struct Link {
        me: String,
        mesh: Arc<Mesh>,
    }

    impl Transport for Link {
        fn call(
            &self,
            peer: String,
            body: PeerRequest,
        ) -> Pin<Box<dyn Future<Output = Result<PeerResponse, String>> + Send>> {
            let down = self.mesh.down.lock().map_or(true, |d| d.contains(&peer));
            let handle = self
                .mesh
                .nodes
                .lock()
                .ok()
                .and_then(|n| n.get(&peer).cloned());
            let me = self.me.clone();
            Box::pin(async move {
                match handle {
                    Some(h) if !down => Ok(h.peer(&me, body).await),
                    _ => Err(format!("connection to {peer} refused")),
                }
            })
        }
    }

    fn config() -> NodeConfig {
        NodeConfig {
            quorum: Quorum::new(3, 2, 2).expect("quorum"),
            sloppy: true,
            buckets: Default::default(),
            durability: Durability::Sync,
            value_bytes_max: 1 << 20,
            response_bytes_max: 64 << 20,
            peer_timeout_ms: 2_000,
            forward_timeout_ms: 4_000,
            hints_every_ms: 200,
            // Only hinted handoff may bring a node back what it missed.
            read_repair: false,
            full_reads_per_mille: 0,
            read_speculate_ms: None,
            ae_every_ms: None,
            tombstone_grace_ms: None,
            gossip_every_ms: 1_000,
            handoff_every_ms: 1_000,
            handoff_listing_ms: 0,
            broken: Broken::NONE,
        }
    }

    fn first(names: &[&str]) -> (MetaState, quiver_core::ring::Ring) {
        let params = ClaimParams {
            partitions: 16,
            n_val: 3,
        };
        let addrs = names.iter().map(|n| (n.to_string(), format!("{n}:1")));
        first_membership(addrs, params).expect("membership")
    }

    fn ring(names: &[&str]) -> quiver_core::ring::Ring {
        first(names).1
    }

    fn cluster(names: &[&str]) -> Arc<Mesh> {
        let mesh = Arc::new(Mesh::default());
        let (initial, _) = first(names);
        for (i, name) in names.iter().enumerate() {
            let store = Store::new(
                Arc::new(MemoryEngine::new()),
                quiver_storage::Durability::Sync,
            );
            let disk = StoreDisk::new(store.clone(), i as u64 + 1);
            let node = Node::boot(name, &initial, config(), disk, Arc::new(SystemClock), 0, 0)
                .expect("boots");
            let link = Arc::new(Link {
                me: name.to_string(),
                mesh: Arc::clone(&mesh),
            });
            let handle = spawn(node, store, link);
            mesh.nodes
                .lock()
                .expect("mesh")
                .insert(name.to_string(), handle);
        }
        mesh
    }

    fn handle(mesh: &Mesh, name: &str) -> DriverHandle {
        mesh.nodes.lock().expect("mesh")[name].clone()
    }

    fn put(key: &str, value: &str) -> Request {
        Request::Put {
            bucket: "b".into(),
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            context: Vec::new(),
            options: WriteOptions {
                durability: Some(WireDurability::Sync),
                ..WriteOptions::default()
            },
        }
    }

    fn get(key: &str, r: u8) -> Request {
        Request::Get {
            bucket: "b".into(),
            key: key.as_bytes().to_vec(),
            options: ReadOptions {
                r: Some(r),
                ..ReadOptions::default()
            },
        }
    }

    fn values(response: &Response) -> Vec<Vec<u8>> {
        match response {
            Response::Get { siblings, .. } => siblings.iter().map(|s| s.value.clone()).collect(),
            _ => Vec::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_node_machine_replicates_under_tokio_with_group_commit() {
        let mesh = cluster(&["a", "b", "c", "d"]);
        let written = handle(&mesh, "a").client(put("k", "v")).await;
        assert!(matches!(written, Response::Written { .. }), "{written:?}");
        let read = handle(&mesh, "b").client(get("k", 2)).await;
        assert_eq!(values(&read), vec![b"v".to_vec()], "{read:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_go_around_a_refused_node_and_its_hints_reach_it_when_it_is_back() {
        let mesh = cluster(&["a", "b", "c", "d"]);
        mesh.down.lock().expect("mesh").insert("c".into());
        let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
        for key in &keys {
            // Refused at once, not after the 2 s peer timeout: sloppy quorum stands in.
            let written = handle(&mesh, "a").client(put(key, key)).await;
            assert!(
                matches!(written, Response::Written { .. }),
                "{key}: {written:?}"
            );
        }
        mesh.down.lock().expect("mesh").clear();
        // Every key c is a primary of must reach c by hinted handoff (read repair is off),
        // within a bound far beyond the probe backoff and the hint interval.
        let ring = ring(&["a", "b", "c", "d"]);
        let of_c: Vec<&String> = keys
            .iter()
            .filter(|k| {
                ring.preference_list_for_key(b"b", k.as_bytes(), 3)
                    .primaries
                    .iter()
                    .any(|m| m.id == "c")
            })
            .collect();
        assert!(!of_c.is_empty(), "no key of c among {keys:?}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let c = handle(&mesh, "c");
        for key in of_c {
            loop {
                let local = c.local("b", key.as_bytes()).await.expect("readable");
                let held: Vec<&[u8]> = local
                    .siblings()
                    .iter()
                    .map(|s| s.value.as_slice())
                    .collect();
                if held == vec![key.as_bytes()] {
                    break;
                }
                assert!(Instant::now() < deadline, "{key} never reached c");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
