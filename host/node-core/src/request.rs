//! A client request at its coordinator, in the order every driver follows: route, write
//! locally (one batch), make the local copy durable when nothing else can vouch for it,
//! fan out, count acknowledgements, answer, keep going until every replica answered (late
//! failures still go to a fallback with a hint), then read repair.
//!
//! The quorum arithmetic is the core's ([`PutFanout`], [`ReadFanout`], [`Forwarding`]);
//! this module is the glue around it that the server and the simulator used to write
//! twice: what goes out when, what a failure message says, what a replica does with a
//! `Store` and when it must sync before answering.
//!
//! The local write itself stays with the driver (the server may call a reconciler plugin in
//! the middle of it, see [`crate::replica::Replica::update_begin`]); [`Put`] starts from
//! its [`WriteOutcome`].

use quiver_core::causality::{Dot, Object};
use quiver_core::coordinator::{
    Forwarding, PutFanout, ReadFanout, ReadSpread, WriteRoute, route_write,
};
use quiver_core::quorum::{Status, Target};
use serde::{Deserialize, Serialize};

use crate::broken::{Broken, Variant};
use crate::record::render_key;
use crate::replica::{KvError, Replica, WriteOutcome};

/// Node-to-node requests of the data path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataRequest {
    /// Read the replica's object of a key.
    Fetch {
        /// Bucket.
        bucket: String,
        /// Key.
        key: Vec<u8>,
    },
    /// Merge an object into the replica's record (replication, read repair).
    Store(StoreRequest),
}

/// Answers to [`DataRequest`]s.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataResponse {
    /// The replica's object (empty when it holds none).
    Fetched(Object),
    /// The object was merged (and is durable if `sync` was asked).
    Stored,
}

/// Merge `object` into the receiver's record of `bucket`/`key`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StoreRequest {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: Vec<u8>,
    /// State to merge.
    pub object: Object,
    /// Keep a hint for this unreachable primary.
    pub hint_for: Option<String>,
    /// Acknowledge only once durable.
    pub sync: bool,
}

/// Whether the receiver of a `Store` must make its applied writes durable before it
/// answers: always when the sender asked for `sync`, even if the merge changed nothing —
/// an equal state may have come from a buffered write that is not durable yet, and the
/// sender counts this answer towards a durable quorum.
pub fn store_needs_sync(sync: bool, changed: bool, broken: Broken) -> bool {
    sync && (changed || !broken.is(Variant::UnsyncedUnchangedMerges))
}

/// A replica takes a `Store`: merges it (record, hint marker and anti-entropy entry in one
/// batch). Returns whether the driver must make applied writes durable before it answers
/// [`DataResponse::Stored`].
pub fn apply_store(
    replica: &Replica,
    store: &StoreRequest,
    broken: Broken,
) -> Result<bool, KvError> {
    let changed = replica.merge_remote(
        &store.bucket,
        &store.key,
        &store.object,
        store.hint_for.as_deref(),
    )?;
    Ok(store_needs_sync(store.sync, changed, broken))
}

/// What a node does with a client write.
#[derive(Debug)]
pub enum WritePlan {
    /// Hand it to a replica, trying each in turn.
    Forward(Forwarding),
    /// Coordinate it here.
    Coordinate {
        /// This node's target (with the hint it keeps when it stands in for a primary).
        me: Target,
        /// Make the local copy durable before fanning out (nothing else vouches for it).
        sync_first: bool,
        /// Make the local copy durable alongside the stores; it counts towards W once it is.
        sync_alongside: bool,
    },
}

/// Routes a client write: coordinate it here as a replica, or forward it.
/// `forwarded` is `Some(hint_for)` when another node forwarded it here.
pub fn plan_write(
    me: &str,
    targets: &[Target],
    forwarded: Option<Option<String>>,
    w: usize,
    n: usize,
    sync: bool,
) -> WritePlan {
    let route = route_write(me, targets, forwarded);
    match &route {
        WriteRoute::Forward => WritePlan::Forward(Forwarding::new(targets, w, n)),
        WriteRoute::Coordinate { me, .. } => {
            let sync_first = route.sync_before_fanout(sync);
            WritePlan::Coordinate {
                me: me.clone(),
                sync_first,
                sync_alongside: sync && !sync_first,
            }
        }
    }
}

/// The client's answer when no replica could coordinate a forwarded write.
pub fn forward_failed(forwarding: &Forwarding) -> String {
    format!(
        "no replica could coordinate the write: {}",
        forwarding.failure()
    )
}

/// A write being coordinated, after its local write.
#[derive(Debug)]
pub struct Put {
    bucket: String,
    key: Vec<u8>,
    w: usize,
    fanout: PutFanout,
    object: Object,
    sync: bool,
    outcome_dot: Dot,
    answered: bool,
    broken: Broken,
}

/// Where a put goes, given by the driver.
#[derive(Debug, Clone)]
pub struct PutArgs<'a> {
    /// Bucket.
    pub bucket: &'a str,
    /// Key.
    pub key: &'a [u8],
    /// This node's target, from [`WritePlan::Coordinate`].
    pub me: &'a Target,
    /// The targets of the key.
    pub targets: &'a [Target],
    /// The key's fallbacks, in preference order.
    pub fallbacks: &'a [String],
    /// Acknowledgements needed.
    pub w: usize,
    /// Replication factor.
    pub n: usize,
    /// Sloppy quorum: failed stores go to fallbacks with a hint.
    pub sloppy: bool,
    /// The client asked for durable acknowledgements.
    pub sync: bool,
    /// The local copy counts only once the driver reports its fsync
    /// ([`WritePlan::Coordinate::sync_alongside`]).
    pub sync_alongside: bool,
}

impl Put {
    /// Starts the fan-out of a write applied locally with `outcome`. Returns the machine and
    /// the stores to send now.
    pub fn start(
        args: PutArgs<'_>,
        outcome: &WriteOutcome,
        broken: Broken,
    ) -> (Put, Vec<(Target, StoreRequest)>) {
        let (fanout, sends) = PutFanout::start(
            args.me,
            args.targets,
            args.fallbacks,
            args.w,
            args.n,
            args.sloppy,
            args.sync_alongside,
        );
        let put = Put {
            bucket: args.bucket.to_string(),
            key: args.key.to_vec(),
            w: args.w,
            fanout,
            object: outcome.object.clone(),
            sync: args.sync,
            outcome_dot: outcome.dot.clone(),
            answered: false,
            broken,
        };
        let sends = sends.into_iter().map(|t| put.store_to(t)).collect();
        (put, sends)
    }

    fn store_to(&self, target: Target) -> (Target, StoreRequest) {
        let request = StoreRequest {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            object: self.object.clone(),
            hint_for: target.hint_for.clone(),
            sync: self.sync,
        };
        (target, request)
    }

    /// The dot this write issued.
    pub fn dot(&self) -> &Dot {
        &self.outcome_dot
    }

    /// A store answered (or failed, or timed out). Returns the store to send next: a
    /// fallback standing in for a failed target.
    pub fn on_store_result(
        &mut self,
        target: &Target,
        result: Result<(), String>,
        is_up: impl Fn(&str) -> bool,
    ) -> Option<(Target, StoreRequest)> {
        let next = self.fanout.on_store_result(target, result, is_up)?;
        Some(self.store_to(next))
    }

    /// The coordinator's own fsync finished (only with `sync_alongside`).
    pub fn on_local_synced(
        &mut self,
        result: Result<(), String>,
        is_up: impl Fn(&str) -> bool,
    ) -> Option<(Target, StoreRequest)> {
        let next = self.fanout.on_local_synced(result, is_up)?;
        Some(self.store_to(next))
    }

    /// The client's answer, given exactly once: `Ok` once W copies hold the write (durably
    /// for `sync`), `Err` with the failure once W can no longer be reached.
    pub fn decision(&mut self) -> Option<Result<(), String>> {
        if self.answered {
            return None;
        }
        if self.broken.is(Variant::AckBeforeQuorum) {
            self.answered = true;
            return Some(Ok(()));
        }
        let decided = match self.fanout.decision()? {
            Status::Reached(()) => Ok(()),
            Status::Failed(f) => Err(format!(
                "put {:?} {}: write quorum w={} not reached: {f}",
                self.bucket,
                render_key(&self.key),
                self.w
            )),
            Status::Pending => return None,
        };
        self.answered = true;
        Some(decided)
    }

    /// Every store and the local fsync answered: the put is over.
    pub fn is_finished(&self) -> bool {
        self.fanout.is_finished()
    }
}

/// A get being coordinated.
#[derive(Debug)]
pub struct Get {
    bucket: String,
    key: Vec<u8>,
    r: usize,
    read: ReadFanout,
    speculate_every_ms: Option<u64>,
    speculate_at_ms: Option<u64>,
    answered: bool,
}

/// What a get reads, given by the driver.
#[derive(Debug, Clone)]
pub struct GetArgs<'a> {
    /// This node.
    pub me: &'a str,
    /// Bucket.
    pub bucket: &'a str,
    /// Key.
    pub key: &'a [u8],
    /// The targets of the key.
    pub targets: &'a [Target],
    /// Replies needed.
    pub r: usize,
    /// Replication factor.
    pub n: usize,
    /// Which replicas to ask.
    pub spread: ReadSpread,
    /// A number that differs between reads (spreads which replicas a quorum read asks).
    pub index: u64,
    /// Now, on the driver's monotonic clock.
    pub now_ms: u64,
    /// Ask a spare replica after this long short of R replies; `None` never.
    pub speculate_ms: Option<u64>,
}

impl Get {
    /// Starts a get. When this node is one of the replicas asked, `local` reads its copy
    /// inline. Returns the machine and the replicas to fetch from.
    pub fn start(
        args: GetArgs<'_>,
        local: impl FnOnce() -> Result<Object, String>,
    ) -> (Get, Vec<Target>) {
        let (mut read, mut remote) = ReadFanout::start(
            args.me,
            args.targets,
            args.r,
            args.n,
            args.spread,
            args.index,
        );
        if remote.len() < args.targets.len() {
            remote.extend(read.on_reply(args.me, local()));
        }
        let get = Get {
            bucket: args.bucket.to_string(),
            key: args.key.to_vec(),
            r: args.r,
            read,
            speculate_every_ms: args.speculate_ms,
            speculate_at_ms: args.speculate_ms.map(|d| args.now_ms.saturating_add(d)),
            answered: false,
        };
        (get, remote)
    }

    /// The request a fetch from a replica sends.
    pub fn fetch_request(&self) -> DataRequest {
        DataRequest::Fetch {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
        }
    }

    /// A replica answered (or failed). Returns a spare replica to fetch from instead of a
    /// failed one.
    pub fn on_reply(&mut self, node: &str, result: Result<Object, String>) -> Option<Target> {
        self.read.on_reply(node, result)
    }

    /// When the driver should call [`Get::on_deadline`]: while undecided and a spare
    /// replica is left to ask.
    pub fn deadline(&self) -> Option<u64> {
        if self.answered || !self.read.has_spares() {
            return None;
        }
        self.speculate_at_ms
    }

    /// The speculation deadline passed: returns a spare replica to fetch from, if any.
    pub fn on_deadline(&mut self, now_ms: u64) -> Option<Target> {
        let at = self.speculate_at_ms?;
        if self.answered || at > now_ms {
            return None;
        }
        self.speculate_at_ms = self.speculate_every_ms.map(|d| now_ms.saturating_add(d));
        self.read.speculate()
    }

    /// The client's answer, given exactly once: the merge of R replies, or the failure.
    pub fn decision(&mut self) -> Option<Result<Object, String>> {
        if self.answered {
            return None;
        }
        let decided = match self.read.decision()? {
            Status::Reached(merged) => Ok(merged),
            Status::Failed(f) => Err(format!(
                "get {:?} {}: read quorum r={} not reached: {f}",
                self.bucket,
                render_key(&self.key),
                self.r
            )),
            Status::Pending => return None,
        };
        self.answered = true;
        Some(decided)
    }

    /// Every replica asked has answered: nothing more will come.
    pub fn is_finished(&self) -> bool {
        self.read.is_finished()
    }

    /// True when some replica that answered needs the merge (without building the stores).
    pub fn needs_repair(&self) -> bool {
        !self.read.repairs().is_empty()
    }

    /// Once finished: the stores that bring stale replicas up to date (read repair, at
    /// buffered durability). Nothing after a failed read.
    pub fn repairs(&self) -> Vec<(Target, StoreRequest)> {
        self.read
            .repairs()
            .into_iter()
            .map(|repair| {
                let request = StoreRequest {
                    bucket: self.bucket.clone(),
                    key: self.key.clone(),
                    object: self.read.merged().clone(),
                    hint_for: repair.target.hint_for.clone(),
                    sync: false,
                };
                (repair.target, request)
            })
            .collect()
    }
}

/// The siblings of `object` as a client reads them.
pub fn wire_siblings(object: &Object) -> Vec<quiver_sdk::wire::WireSibling> {
    object
        .siblings()
        .iter()
        .map(|s| quiver_sdk::wire::WireSibling {
            value: s.value.clone(),
            value_bytes: s.value.len() as u64,
            tombstone: s.meta.tombstone,
            timestamp_ms: s.meta.timestamp_ms,
            actor: s.dot.actor.to_string(),
        })
        .collect()
}

/// What a read answers with `object` as it stands (no reconciler): its siblings and
/// context, without values when the client asked for `head`; an error when the siblings
/// together pass the node's response budget of `budget` bytes (each counted with an
/// allowance for its metadata), which names the way out (`--head`, then a write with the
/// context resolves them).
pub fn read_answer(
    me: &str,
    bucket: &str,
    key: &[u8],
    object: &Object,
    head: bool,
    budget: u64,
) -> quiver_sdk::wire::Response {
    use quiver_sdk::wire::{ErrorCode, ErrorReply, Response};
    let mut siblings = wire_siblings(object);
    if head {
        siblings.iter_mut().for_each(|s| s.value.clear());
    }
    let bytes: u64 = siblings
        .iter()
        .map(|s| s.value.len() as u64 + 128 + s.actor.len() as u64)
        .sum();
    if bytes > budget {
        return Response::Error(ErrorReply {
            code: ErrorCode::ResponseTooLarge,
            message: format!(
                "node {me}: bucket {bucket:?} key {}: {} siblings of {bytes} bytes pass this \
                 node's {budget}-byte response budget; read with --head for the context and \
                 write with it to resolve them",
                render_key(key),
                siblings.len()
            ),
        });
    }
    Response::Get {
        siblings,
        context: quiver_core::causality::encode_context(object.context()),
    }
}
