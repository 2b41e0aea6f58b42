//! Client-driven coordination (Dynamo §6.4): a client that knows the ring sends each request
//! straight to a node of the key's preference list, saving the coordinator's forwarding hop.

use std::collections::HashMap;
use std::sync::Arc;

use quiver_core::ring::Ring;
use tokio::sync::{Mutex, RwLock};

use crate::client::{Client, ClientConfig, Context, Error, GetResult, ReplicaAttempt};
use crate::wire::{ErrorCode, NodeStatus, ReadOptions, WriteOptions};

/// What the client knows of the cluster layout.
#[derive(Debug)]
struct Layout {
    ring: Ring,
    /// Node name → client address.
    addrs: HashMap<String, String>,
    n: usize,
}

/// A client for a whole cluster: routes every request to a replica of its key, falling back
/// to the next replica when a node cannot be reached or cannot gather its quorum (see
/// [`ClusterClient::route`] for the order). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    layout: RwLock<Layout>,
    /// One connection per node address, opened on first use.
    conns: Mutex<HashMap<String, Client>>,
    /// Node address → until when it is tried last, after a transport failure or a
    /// `QuorumFailed` answer.
    suspects: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// When the ring is next fetched again (Dynamo §6.4: clients poll for membership).
    next_refresh: std::sync::Mutex<std::time::Instant>,
}

/// How long a node that failed at the transport level, or could not gather a quorum, is
/// tried after the others.
const SUSPECT_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a client fetches the ring again, so it follows joins and leaves.
const RING_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

impl ClusterClient {
    /// Connects to the first of `seeds` that answers and learns the ring from it.
    pub async fn connect<S: AsRef<str>>(seeds: &[S], config: ClientConfig) -> Result<Self, Error> {
        let mut last = None;
        for seed in seeds {
            match Client::connect(seed.as_ref(), config.clone()).await {
                Ok(client) => match client.ring().await {
                    Ok((ring, members, n)) => {
                        let mut conns = HashMap::new();
                        conns.insert(client.addr().to_string(), client);
                        let layout = Layout {
                            ring,
                            addrs: members.into_iter().collect(),
                            n,
                        };
                        return Ok(ClusterClient {
                            inner: Arc::new(Inner {
                                config,
                                layout: RwLock::new(layout),
                                conns: Mutex::new(conns),
                                suspects: std::sync::Mutex::new(HashMap::new()),
                                next_refresh: std::sync::Mutex::new(
                                    std::time::Instant::now() + RING_REFRESH,
                                ),
                            }),
                        });
                    }
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Config("no seed address given".into())))
    }

    /// Addresses to try for a key, best first: its primaries in preference order, then every
    /// other member.
    pub async fn route(&self, bucket: &str, key: &[u8]) -> Vec<String> {
        self.route_named(bucket, key)
            .await
            .into_iter()
            .map(|(_, addr)| addr)
            .collect()
    }

    /// [`ClusterClient::route`] with each address's node name, for error reports.
    async fn route_named(&self, bucket: &str, key: &[u8]) -> Vec<(String, String)> {
        let layout = self.inner.layout.read().await;
        let list = layout
            .ring
            .preference_list_for_key(bucket.as_bytes(), key, layout.n);
        list.nodes()
            .filter_map(|m| layout.addrs.get(&m.id).map(|a| (m.id.clone(), a.clone())))
            .collect()
    }

    /// The open connection to `addr`, dialling one if there is none. The connection table
    /// is not locked while dialling: a dial to a paused or dead node waits for the whole
    /// request timeout, and holding the lock meanwhile stalled every other request of this
    /// client, to any node (measured with quiver-faults: 4 operations in 9 s while a node
    /// was down).
    async fn client_for(&self, addr: &str) -> Result<Client, Error> {
        if let Some(c) = self.inner.conns.lock().await.get(addr)
            && c.connection().close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let c = Client::connect(addr, self.inner.config.clone()).await?;
        let mut conns = self.inner.conns.lock().await;
        // Another request may have dialled meanwhile: share its connection, drop ours.
        if let Some(existing) = conns.get(addr)
            && existing.connection().close_reason().is_none()
        {
            return Ok(existing.clone());
        }
        conns.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    async fn forget(&self, addr: &str) {
        self.inner.conns.lock().await.remove(addr);
    }

    /// Notes that `addr` just failed at the transport level (cannot connect, connection
    /// broken, no reply in time) or could not gather a quorum: for [`SUSPECT_FOR`] it is
    /// tried after the other nodes.
    fn suspect(&self, addr: &str) {
        self.inner
            .suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_string(), std::time::Instant::now() + SUSPECT_FOR);
    }

    /// Notes that `addr` answered.
    fn trust(&self, addr: &str) {
        let mut suspects = self
            .inner
            .suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !suspects.is_empty() {
            suspects.remove(addr);
        }
    }

    /// `route` with the nodes suspected down moved to the end, in their order: every node
    /// is still tried, but a request no longer waits out a timeout on a node that failed
    /// moments ago when another replica can serve it.
    fn order(&self, route: Vec<(String, String)>) -> Vec<(String, String)> {
        let now = std::time::Instant::now();
        let suspects = self
            .inner
            .suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if suspects.is_empty() {
            return route;
        }
        let (mut ok, down): (Vec<_>, Vec<_>) = route
            .into_iter()
            .partition(|(_, addr)| suspects.get(addr).is_none_or(|until| *until <= now));
        ok.extend(down);
        ok
    }

    /// Runs `call` against the key's best reachable node, moving on to the next node of the
    /// preference list (primaries first, then the other members) after:
    ///
    /// - failures that prove the request never reached a node (cannot connect, connection
    ///   already broken), for every kind of request;
    /// - `QuorumFailed`, for gets, puts and deletes: the coordinator could not reach enough
    ///   replicas, but another replica may (a partition that cut the coordinator off; issue
    ///   12). Repeating a put or delete is safe with dotted version vectors: a write the
    ///   first coordinator applied locally and the retry both carry the client's context, so
    ///   at worst the key gains a duplicate sibling of the same value, which the next write
    ///   with a read context folds away. Not for `update`: the plugin's operation (a counter
    ///   increment) runs at the coordinator and its result is not idempotent, so a retry
    ///   after a partial apply could count it twice;
    /// - for gets only, a client-side timeout or the node's own deadline. A timed-out write
    ///   may have been applied, and repeating it elsewhere would create a needless sibling.
    ///
    /// Nodes that failed at the transport level or answered `QuorumFailed` in the last few
    /// seconds are tried last. When every node tried failed, the error ([`Error::Replicas`]) names each with its
    /// answer.
    async fn routed(&self, bucket: &str, key: &[u8], call: Call<'_>) -> Result<Outcome, Error> {
        if self.refresh_due() {
            // Best effort: a client that cannot fetch the ring keeps routing with the old one.
            let _ = self.refresh().await;
        }
        match self.routed_once(bucket, key, &call).await {
            // Every node the ring named failed before the request reached one: the cluster
            // may have changed under us (a node left); learn the ring again and retry once.
            Err(Error::Replicas { attempts })
                if attempts.iter().all(|a| {
                    matches!(a.error, Error::Connect { .. } | Error::Connection { .. })
                }) =>
            {
                match self.refresh().await {
                    Ok(true) => self.routed_once(bucket, key, &call).await,
                    _ => Err(Error::Replicas { attempts }),
                }
            }
            other => other,
        }
    }

    /// True (once per period) when the ring should be fetched again.
    fn refresh_due(&self) -> bool {
        let now = std::time::Instant::now();
        let mut next = self
            .inner
            .next_refresh
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if now < *next {
            return false;
        }
        *next = now + RING_REFRESH;
        true
    }

    /// Version of the ring this client routes with.
    pub async fn ring_version(&self) -> u64 {
        self.inner.layout.read().await.ring.version()
    }

    /// Fetches the ring and member addresses again from any member; returns true when they
    /// changed. Requests route with the new ring from then on.
    pub async fn refresh(&self) -> Result<bool, Error> {
        let client = self.any().await?;
        let (ring, members, n) = client.ring().await?;
        let addrs: HashMap<String, String> = members.into_iter().collect();
        let mut layout = self.inner.layout.write().await;
        // Never step back to an older ring a lagging node still serves.
        if ring.version() < layout.ring.version() {
            return Ok(false);
        }
        let changed = ring != layout.ring || addrs != layout.addrs || n != layout.n;
        *layout = Layout { ring, addrs, n };
        Ok(changed)
    }

    async fn routed_once(
        &self,
        bucket: &str,
        key: &[u8],
        call: &Call<'_>,
    ) -> Result<Outcome, Error> {
        let mut attempts: Vec<ReplicaAttempt> = Vec::new();
        let route = self.order(self.route_named(bucket, key).await);
        for (node, addr) in route {
            let client = match self.client_for(&addr).await {
                Ok(c) => c,
                Err(error) => {
                    self.suspect(&addr);
                    attempts.push(ReplicaAttempt { node, addr, error });
                    continue;
                }
            };
            let result = match call {
                Call::Get(options) => client
                    .get_with(bucket, key, options)
                    .await
                    .map(Outcome::Got),
                Call::Put {
                    value,
                    context,
                    options,
                } => client
                    .put_with(bucket, key, value.to_vec(), *context, options)
                    .await
                    .map(Outcome::Written),
                Call::Delete { context, options } => client
                    .delete_with(bucket, key, *context, options)
                    .await
                    .map(Outcome::Written),
                Call::Update { op, options } => client
                    .update(bucket, key, op.to_vec(), options)
                    .await
                    .map(Outcome::Written),
            };
            let error = match result {
                Ok(outcome) => {
                    self.trust(&addr);
                    return Ok(outcome);
                }
                Err(e) => e,
            };
            let retry = match &error {
                Error::Connect { .. } | Error::Connection { .. } => {
                    self.forget(&addr).await;
                    self.suspect(&addr);
                    true
                }
                // A silent node: its connection may be dead without knowing it, so the next
                // request dials afresh. Reads are safe to repeat elsewhere; writes are not.
                Error::Timeout { .. } => {
                    self.forget(&addr).await;
                    self.suspect(&addr);
                    call.is_get()
                }
                // Tried last for a while too: a coordinator cut off from its peers still
                // applies each write to its own copy before its quorum fails, so every
                // retried write would leave one more unacknowledged sibling there (under a
                // one-way partition quiver-faults saw keys pass the 100-sibling limit).
                Error::Server {
                    code: ErrorCode::QuorumFailed,
                    ..
                } => {
                    self.suspect(&addr);
                    !call.is_update()
                }
                Error::Server {
                    code: ErrorCode::Timeout,
                    ..
                } => call.is_get(),
                _ => false,
            };
            if !retry && attempts.is_empty() {
                // The first node's definite answer: the same error as a single-node client.
                return Err(error);
            }
            attempts.push(ReplicaAttempt { node, addr, error });
            if !retry {
                return Err(Error::Replicas { attempts });
            }
        }
        if attempts.is_empty() {
            return Err(Error::Config("the ring names no reachable member".into()));
        }
        Err(Error::Replicas { attempts })
    }

    /// Reads a key from a replica.
    pub async fn get_with(
        &self,
        bucket: &str,
        key: impl AsRef<[u8]>,
        options: &ReadOptions,
    ) -> Result<GetResult, Error> {
        match self
            .routed(bucket, key.as_ref(), Call::Get(options))
            .await?
        {
            Outcome::Got(r) => Ok(r),
            Outcome::Written(_) => Err(Error::Config("internal: a get produced a write".into())),
        }
    }

    /// Reads a key with default options.
    pub async fn get(&self, bucket: &str, key: impl AsRef<[u8]>) -> Result<GetResult, Error> {
        self.get_with(bucket, key, &ReadOptions::default()).await
    }

    /// Writes a value through a replica of the key.
    pub async fn put_with(
        &self,
        bucket: &str,
        key: impl AsRef<[u8]>,
        value: Vec<u8>,
        context: Option<&Context>,
        options: &WriteOptions,
    ) -> Result<Context, Error> {
        let call = Call::Put {
            value: &value,
            context,
            options,
        };
        written(self.routed(bucket, key.as_ref(), call).await?)
    }

    /// Writes a value with default options.
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

    /// Deletes a key through a replica of the key.
    pub async fn delete_with(
        &self,
        bucket: &str,
        key: impl AsRef<[u8]>,
        context: Option<&Context>,
        options: &WriteOptions,
    ) -> Result<Context, Error> {
        written(
            self.routed(bucket, key.as_ref(), Call::Delete { context, options })
                .await?,
        )
    }

    /// Deletes a key with default options.
    pub async fn delete(
        &self,
        bucket: &str,
        key: impl AsRef<[u8]>,
        context: Option<&Context>,
    ) -> Result<Context, Error> {
        self.delete_with(bucket, key, context, &WriteOptions::default())
            .await
    }

    /// Applies `op` with the bucket reconciler's `update` at a replica of the key.
    ///
    /// Unlike gets, puts and deletes, an update that fails with `QuorumFailed` is not
    /// retried on another replica: the coordinator may have applied the operation to its own
    /// copy (and to some replicas) before the quorum failed, and the operation is not
    /// idempotent (a counter increment applied at two coordinators counts twice). Only
    /// failures that prove the request reached no node move it on.
    pub async fn update(
        &self,
        bucket: &str,
        key: impl AsRef<[u8]>,
        op: Vec<u8>,
        options: &WriteOptions,
    ) -> Result<Context, Error> {
        let call = Call::Update { op: &op, options };
        written(self.routed(bucket, key.as_ref(), call).await?)
    }

    /// A connection to the first member that answers, for cluster-wide requests (plugins,
    /// bucket properties): any node serves them and spreads the change.
    pub async fn any(&self) -> Result<Client, Error> {
        let addrs: Vec<String> = {
            let layout = self.inner.layout.read().await;
            let mut v: Vec<String> = layout.addrs.values().cloned().collect();
            v.sort();
            v
        };
        let mut last = None;
        for addr in addrs {
            match self.client_for(&addr).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Config("the ring names no reachable member".into())))
    }

    /// The status of every member that answers, keyed by node name.
    pub async fn status(&self) -> Vec<(String, Result<NodeStatus, Error>)> {
        let addrs: Vec<(String, String)> = {
            let layout = self.inner.layout.read().await;
            let mut v: Vec<_> = layout
                .addrs
                .iter()
                .map(|(n, a)| (n.clone(), a.clone()))
                .collect();
            v.sort();
            v
        };
        let mut out = Vec::with_capacity(addrs.len());
        for (node, addr) in addrs {
            let result = match self.client_for(&addr).await {
                Ok(c) => c.status().await,
                Err(e) => Err(e),
            };
            out.push((node, result));
        }
        out
    }

    /// Closes every connection.
    pub async fn close(self) {
        let conns: Vec<Client> = self
            .inner
            .conns
            .lock()
            .await
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in conns {
            c.close().await;
        }
    }
}

/// A request [`ClusterClient::routed`] can send to any node.
enum Call<'a> {
    Get(&'a ReadOptions),
    Put {
        value: &'a [u8],
        context: Option<&'a Context>,
        options: &'a WriteOptions,
    },
    Delete {
        context: Option<&'a Context>,
        options: &'a WriteOptions,
    },
    Update {
        op: &'a [u8],
        options: &'a WriteOptions,
    },
}

impl Call<'_> {
    fn is_get(&self) -> bool {
        matches!(self, Call::Get(_))
    }
    fn is_update(&self) -> bool {
        matches!(self, Call::Update { .. })
    }
}

/// What a routed request produced.
enum Outcome {
    Got(GetResult),
    Written(Context),
}

fn written(o: Outcome) -> Result<Context, Error> {
    match o {
        Outcome::Written(c) => Ok(c),
        Outcome::Got(_) => Err(Error::Config("internal: a write produced a read".into())),
    }
}
