//! A client request at its coordinator: route, write locally, fan out, answer, read
//! repair (node-core's `request` machines), or forward it to a replica.

use quiver_core::causality::{self, Object, VersionVector, WriteOp};
use quiver_core::coordinator::{Forwarding, ReadSpread};
use quiver_core::quorum::{Quorum, Target};
use quiver_sdk::wire::{ErrorCode, ReadOptions, Request, Response, WireDurability};

use super::calls::{Origin, Purpose, client_error};
use super::sync::AfterSync;
use super::{Durability, Effect, Node, NodeDisk, NodeId, Observation};
use crate::protocol::PeerRequest;
use crate::record::render_key;
use crate::replica::{KvError, LocalWrite, WriteOutcome};
use crate::request::{
    self, DataRequest, Get, GetArgs, Put, PutArgs, StoreRequest, WritePlan, forward_failed,
    plan_write, read_answer,
};

#[derive(Debug)]
pub(super) struct PutOp {
    /// `None` once the client has its answer.
    pub(super) origin: Option<Origin>,
    /// The coordinator (`crate::request::Put`).
    pub(super) put: Put,
    /// The client's answer: its context plus the write's dot.
    pub(super) reply: VersionVector,
}

#[derive(Debug)]
pub(super) struct GetOp {
    /// `None` once the client has its answer; the op then lives on for read repair.
    pub(super) origin: Option<Origin>,
    /// The coordinator (`crate::request::Get`).
    pub(super) get: Get,
    /// The bucket and key read.
    pub(super) bucket: String,
    pub(super) key: Vec<u8>,
    /// Answer without values (`ReadOptions::head`).
    pub(super) head: bool,
    /// Answer the siblings as stored, without the bucket's reconciler.
    pub(super) raw: bool,
}

#[derive(Debug)]
pub(super) struct ForwardOp {
    pub(super) origin: Origin,
    pub(super) request: Request,
    pub(super) forwarding: Forwarding,
    /// The target the forward is waiting for.
    pub(super) current: NodeId,
}

/// Where a write coordinated here goes: decided before the local write.
#[derive(Debug)]
pub(super) struct Route {
    pub(super) origin: Origin,
    pub(super) bucket: String,
    pub(super) key: Vec<u8>,
    pub(super) my_target: Target,
    pub(super) targets: Vec<Target>,
    pub(super) fallbacks: Vec<NodeId>,
    pub(super) quorum: Quorum,
    pub(super) n: usize,
    pub(super) sync: bool,
    /// Make the local copy durable before the fan-out (nothing else vouches for it).
    pub(super) sync_first: bool,
    pub(super) sync_alongside: bool,
}

/// A write between the coordinator's local write and its fan-out (which may wait for the
/// local copy to be durable, or for the sibling guard's merge).
#[derive(Debug)]
pub(super) struct FanOut {
    pub(super) route: Route,
    pub(super) outcome: WriteOutcome,
}

impl<D: NodeDisk> Node<D> {
    pub(super) fn handle_client(
        &mut self,
        now_ms: u64,
        origin: Origin,
        request: Request,
        forwarded: Option<Option<NodeId>>,
        fx: &mut Vec<Effect>,
    ) {
        // Bucket and key are checked before anything is routed on them.
        let named = match &request {
            Request::Get { bucket, key, .. }
            | Request::Put { bucket, key, .. }
            | Request::Delete { bucket, key, .. }
            | Request::Update { bucket, key, .. } => Some((bucket, key)),
            _ => None,
        };
        if let Some((bucket, key)) = named
            && let Err(e) = self.replica.validate(bucket, key)
        {
            return self.reply(origin, client_error(e.code(), e.to_string()), fx);
        }
        match request {
            Request::Get {
                bucket,
                key,
                options,
            } => self.start_get(now_ms, origin, bucket, key, &options, fx),
            write @ (Request::Put { .. } | Request::Delete { .. } | Request::Update { .. }) => {
                self.start_put(now_ms, origin, write, forwarded, fx)
            }
            // Not echoed back: an admin request may carry a key secret or plugin bytes.
            _ => {
                let message = "the node machine answers gets, puts, deletes and updates only";
                let message = message.to_string();
                self.reply(
                    origin,
                    client_error(ErrorCode::MalformedRequest, message),
                    fx,
                )
            }
        }
    }

    pub(super) fn start_get(
        &mut self,
        now_ms: u64,
        origin: Origin,
        bucket: String,
        key: Vec<u8>,
        options: &ReadOptions,
        fx: &mut Vec<Effect>,
    ) {
        let quorum = match self.quorum(&bucket, options.r.map(usize::from), None) {
            Ok(q) => q,
            Err(e) => return self.reply(origin, client_error(ErrorCode::InvalidQuorum, e), fx),
        };
        let (targets, n) = self.targets(&bucket, &key, quorum.n);
        let me = self.me.node.clone();
        let op = self.next_op;
        self.next_op += 1;
        let spread = match self.cfg.read_repair {
            true => ReadSpread::for_read(op, self.cfg.full_reads_per_mille),
            false => ReadSpread::Quorum,
        };
        let (get, fetches) = Get::start(
            GetArgs {
                me: &me,
                bucket: &bucket,
                key: &key,
                targets: &targets,
                r: quorum.r,
                n,
                spread,
                index: op,
                now_ms,
                speculate_ms: self.cfg.read_speculate_ms,
            },
            || self.replica.get(&bucket, &key).map_err(|e| e.to_string()),
        );
        let origin = Some(origin);
        let (head, raw) = (options.head, options.raw);
        self.gets.insert(
            op,
            GetOp {
                origin,
                get,
                bucket,
                key,
                head,
                raw,
            },
        );
        for t in fetches {
            self.send_fetch(now_ms, op, &t.node, fx);
        }
        self.get_progress(now_ms, op, fx);
    }

    /// Asks `node` for its copy of get `op`'s key.
    pub(super) fn send_fetch(&mut self, now_ms: u64, op: u64, node: &str, fx: &mut Vec<Effect>) {
        let Some(op_state) = self.gets.get(&op) else {
            return;
        };
        let body = PeerRequest::from(op_state.get.fetch_request());
        let purpose = Purpose::Fetch {
            op,
            node: node.to_string(),
        };
        self.call(now_ms, node, body, self.cfg.peer_timeout_ms, purpose, fx);
    }

    /// Gets past their speculation deadline ask a spare each (production: the
    /// speculation timer in `Cluster::get`).
    pub(super) fn speculate_reads(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        let mut due = Vec::new();
        for (&op, g) in &mut self.gets {
            if g.get.deadline().is_some_and(|at| at <= now_ms)
                && let Some(spare) = g.get.on_deadline(now_ms)
            {
                due.push((op, spare.node));
            }
        }
        for (op, node) in due {
            fx.push(Effect::Observe(Observation::SpeculativeRead));
            self.send_fetch(now_ms, op, &node, fx);
        }
    }

    pub(super) fn get_progress(&mut self, now_ms: u64, op: u64, fx: &mut Vec<Effect>) {
        let Some(g) = self.gets.get_mut(&op) else {
            return;
        };
        if let Some(decided) = g.get.decision()
            && let Some(origin) = g.origin.take()
        {
            let (bucket, key, head, raw) = (g.bucket.clone(), g.key.clone(), g.head, g.raw);
            match decided {
                Ok(merged) if head => {
                    let budget = self.cfg.response_bytes_max;
                    let answer = read_answer(&self.me.node, &bucket, &key, &merged, true, budget);
                    self.reply(origin, answer, fx);
                }
                Ok(merged) => self.answer_read(origin, bucket, key, merged, raw, fx),
                Err(e) => self.reply(origin, client_error(ErrorCode::QuorumFailed, e), fx),
            }
        }
        // Every target answered (or the read failed): read repair.
        if !self.gets.get(&op).is_some_and(|g| g.get.is_finished()) {
            return;
        }
        let Some(g) = self.gets.remove(&op) else {
            return;
        };
        if !self.cfg.read_repair {
            return;
        }
        for (target, store) in g.get.repairs() {
            fx.push(Effect::Observe(Observation::ReadRepair));
            if target.node == self.me.node {
                let applied = request::apply_store(&self.replica, &store, self.cfg.broken);
                if let Ok(true) = applied {
                    self.sync_then(now_ms, AfterSync::Nothing, fx);
                }
            } else {
                let body = PeerRequest::from(DataRequest::Store(store));
                let timeout = self.cfg.peer_timeout_ms;
                self.call(now_ms, &target.node, body, timeout, Purpose::Repair, fx);
            }
        }
    }

    /// This node's state of `bucket`/`key` (empty when it holds none).
    pub fn local_object(&self, bucket: &str, key: &[u8]) -> Result<Object, KvError> {
        self.replica.get(bucket, key)
    }

    pub(super) fn start_put(
        &mut self,
        now_ms: u64,
        origin: Origin,
        request: Request,
        forwarded: Option<Option<NodeId>>,
        fx: &mut Vec<Effect>,
    ) {
        // An update's op is the plugin's; until then it is checked as a put of nothing.
        let (bucket, key, context, op, options, update) = match &request {
            Request::Put {
                bucket,
                key,
                context,
                value,
                options,
            } => (
                bucket,
                key,
                context.clone(),
                WriteOp::Put(value.clone()),
                options,
                None,
            ),
            Request::Delete {
                bucket,
                key,
                context,
                options,
            } => (bucket, key, context.clone(), WriteOp::Delete, options, None),
            Request::Update {
                bucket,
                key,
                op,
                options,
            } => (
                bucket,
                key,
                Vec::new(),
                WriteOp::Put(Vec::new()),
                options,
                Some(op.clone()),
            ),
            other => {
                let message = format!("not a write: {other:?}");
                return self.reply(
                    origin,
                    client_error(ErrorCode::MalformedRequest, message),
                    fx,
                );
            }
        };
        let (bucket, key) = (bucket.clone(), key.clone());
        let quorum = match self.quorum(&bucket, None, options.w.map(usize::from)) {
            Ok(q) => q,
            Err(e) => return self.reply(origin, client_error(ErrorCode::InvalidQuorum, e), fx),
        };
        let (targets, n) = self.targets(&bucket, &key, quorum.n);
        let me = self.me.node.clone();
        let durability = match options.durability {
            Some(WireDurability::Sync) => Durability::Sync,
            Some(WireDurability::Buffered) => Durability::Buffered,
            None => self.cfg.durability,
        };
        let sync = durability == Durability::Sync;
        let (my_target, sync_first, sync_alongside) =
            match plan_write(&me, &targets, forwarded, quorum.w, n, sync) {
                WritePlan::Coordinate {
                    me,
                    sync_first,
                    sync_alongside,
                } => (me, sync_first, sync_alongside),
                WritePlan::Forward(forwarding) => {
                    let op = self.next_op;
                    self.next_op += 1;
                    let fwd = ForwardOp {
                        origin,
                        request,
                        forwarding,
                        current: NodeId::new(),
                    };
                    return self.forward_next(now_ms, op, fwd, fx);
                }
            };
        let (_, fallbacks) = self.preference(&bucket, &key, quorum.n);
        let route = Route {
            origin,
            bucket,
            key,
            my_target,
            targets,
            fallbacks,
            quorum,
            n,
            sync,
            sync_first,
            sync_alongside,
        };
        // The production replica's checks: the bucket and key, the client context, the
        // value's size.
        let (dkey, client_context) =
            match self
                .replica
                .check_write(&route.bucket, &route.key, &op, &context)
            {
                Ok(checked) => checked,
                Err(e) => {
                    return self.reply(route.origin, client_error(e.code(), e.to_string()), fx);
                }
            };
        if let Some(update) = update {
            return self.start_update(now_ms, route, dkey, update, fx);
        }
        let value = match &op {
            WriteOp::Put(v) => v.clone(),
            _ => Vec::new(),
        };
        // Read the record, issue the dot, check the sibling limit, apply record + hint
        // marker + anti-entropy entry in one batch. The fsync is the driver's, below.
        let written = self.replica.write(
            &dkey,
            LocalWrite {
                bucket: &route.bucket,
                key: &route.key,
                context: &client_context,
                op,
                now_ms: self.wall_ms(),
                hint_for: route.my_target.hint_for.as_deref(),
            },
        );
        let outcome = match written {
            Ok(outcome) => outcome,
            Err(e) => {
                return self.reply(route.origin, client_error(e.code(), e.to_string()), fx);
            }
        };
        // The dot is issued with the local write, whether or not the write is acknowledged:
        // a crash before its sync can leave it on disk (a kill keeps applied writes).
        fx.push(Effect::Observe(Observation::DotIssued {
            node: self.me.node.clone(),
            bucket: route.bucket.clone(),
            key: route.key.clone(),
            dot: outcome.dot.clone(),
            context: client_context,
            value,
        }));
        let fan_out = FanOut { route, outcome };
        // Sibling-explosion guard: past the bucket's threshold, the reconciler merges the
        // siblings into one version before the write goes out.
        if let Some(reconciler) = self.reconciler(&fan_out.route.bucket)
            && fan_out.outcome.object.siblings().len() > reconciler.sibling_threshold as usize
        {
            return self.start_guard(reconciler, dkey, fan_out, fx);
        }
        self.after_local_write(now_ms, fan_out, fx);
    }

    /// The local write is applied: with other replicas the coordinator's own fsync runs
    /// alongside theirs (at the next tick, so a crash can fall in between) and its copy
    /// counts towards W only once durable; alone, it syncs before the fan-out and its
    /// answer.
    pub(super) fn after_local_write(&mut self, now_ms: u64, fan_out: FanOut, fx: &mut Vec<Effect>) {
        if fan_out.route.sync_first {
            self.sync_then(now_ms, AfterSync::FanOut(Box::new(fan_out)), fx);
        } else {
            self.fan_out(now_ms, fan_out, Ok(()), fx);
        }
    }

    /// The rest of a put once the coordinator's write is applied (and durable, when it
    /// had to be first): replication to the other targets, or the error of the sync.
    pub(super) fn fan_out(
        &mut self,
        now_ms: u64,
        f: FanOut,
        synced: Result<(), String>,
        fx: &mut Vec<Effect>,
    ) {
        if let Err(e) = synced {
            let message = format!(
                "node {}: bucket {:?}, key {}: the coordinator's copy is not durable: {e}",
                self.me.node,
                f.route.bucket,
                render_key(&f.route.key)
            );
            return self.reply(
                f.route.origin,
                client_error(ErrorCode::Storage, message),
                fx,
            );
        }
        let (put, sends) = Put::start(
            PutArgs {
                bucket: &f.route.bucket,
                key: &f.route.key,
                me: &f.route.my_target,
                targets: &f.route.targets,
                fallbacks: &f.route.fallbacks,
                w: f.route.quorum.w,
                n: f.route.n,
                sloppy: self.props(&f.route.bucket).sloppy,
                sync: f.route.sync,
                sync_alongside: f.route.sync_alongside,
            },
            &f.outcome,
            self.cfg.broken,
        );
        let op = self.next_op;
        self.next_op += 1;
        if f.route.sync_alongside {
            self.local_syncs.push(op);
        }
        for (target, store) in sends {
            self.send_store(now_ms, op, target, store, fx);
        }
        let origin = Some(f.route.origin);
        let reply = f.outcome.context;
        self.puts.insert(op, PutOp { origin, put, reply });
        self.put_progress(op, fx);
    }

    pub(super) fn send_store(
        &mut self,
        now_ms: u64,
        op: u64,
        target: Target,
        store: StoreRequest,
        fx: &mut Vec<Effect>,
    ) {
        let node = target.node.clone();
        let body = PeerRequest::from(DataRequest::Store(store));
        let purpose = Purpose::Store { op, target };
        self.call(now_ms, &node, body, self.cfg.peer_timeout_ms, purpose, fx);
    }

    pub(super) fn store_result(
        &mut self,
        now_ms: u64,
        op: u64,
        target: Option<Target>,
        result: Result<(), String>,
        fx: &mut Vec<Effect>,
    ) {
        // A put stays until every store has answered, as in production: failures after the
        // client's answer still go to a fallback with a hint.
        let Some(p) = self.puts.get_mut(&op) else {
            return;
        };
        let (me, health) = (&self.me.node, &self.health);
        let is_up = |n: &str| n == me || health.is_up(n);
        let next = match target {
            Some(target) => p.put.on_store_result(&target, result, is_up),
            None => p.put.on_local_synced(result, is_up),
        };
        if let Some((target, store)) = next {
            self.send_store(now_ms, op, target, store, fx);
        }
        self.put_progress(op, fx);
    }

    pub(super) fn put_progress(&mut self, op: u64, fx: &mut Vec<Effect>) {
        let Some(p) = self.puts.get_mut(&op) else {
            return;
        };
        let result = p.put.decision().map(|d| match d {
            Ok(()) => Response::Written {
                context: causality::encode_context(&p.reply),
            },
            Err(e) => client_error(ErrorCode::QuorumFailed, e),
        });
        let origin = if result.is_some() {
            p.origin.take()
        } else {
            None
        };
        if p.put.is_finished() {
            self.puts.remove(&op);
        }
        if let (Some(origin), Some(result)) = (origin, result) {
            self.reply(origin, result, fx);
        }
    }

    pub(super) fn forward_next(
        &mut self,
        now_ms: u64,
        op: u64,
        mut fwd: ForwardOp,
        fx: &mut Vec<Effect>,
    ) {
        let Some(target) = fwd.forwarding.next_target() else {
            let msg = forward_failed(&fwd.forwarding);
            return self.reply(fwd.origin, client_error(ErrorCode::QuorumFailed, msg), fx);
        };
        let body = PeerRequest::Forward {
            request: fwd.request.clone(),
            hint_for: target.hint_for.clone(),
        };
        self.call(
            now_ms,
            &target.node,
            body,
            self.cfg.forward_timeout_ms,
            Purpose::Forward { op },
            fx,
        );
        fwd.current = target.node;
        self.forwards.insert(op, fwd);
    }
}
