//! Reconciler calls as effects: the node asks the driver to run a bucket's plugin
//! ([`Effect::Plugin`]: a merge of siblings, or an update op) and goes on when the answer
//! comes back through [`Node::on_plugin_done`]. A call may burn its whole fuel, so it never
//! runs inside the machine: the server runs it on its plugin pool, other inputs in between.
//!
//! Three things call a reconciler, as in the server:
//! - a read whose siblings the bucket's reconciler merges: the merge is written back with
//!   a context covering them, and the reader gets the merge;
//! - a server-side update: the op applied to what this replica holds, written with a
//!   context covering all of it, if the record is still the one the plugin saw (else it
//!   reads again, up to [`UPDATE_ATTEMPTS_MAX`] times); one update of a key at a time;
//! - the sibling guard: a write that leaves more siblings than the bucket's threshold is
//!   merged at once, if the key still holds exactly that state.

use std::collections::VecDeque;

use quiver_core::causality::{self, Object};
use quiver_core::limits::SIBLING_THRESHOLD_DEFAULT;
use quiver_core::meta::PluginRef;
use quiver_sdk::wire::{ErrorCode, Request, Response, WireSibling, WriteOptions};

use super::calls::{Origin, client_error};
use super::client::{FanOut, Route};
use super::{Effect, Node, NodeDisk, Observation};
use crate::record::render_key;
use crate::replica::Snapshot;
use crate::request::read_answer;

/// Times an update reads the key again because a write landed while its plugin ran.
pub const UPDATE_ATTEMPTS_MAX: usize = 8;

/// What a reconciler call is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginWork {
    /// Merge the siblings of this state into one value (or a deletion).
    Merge(Object),
    /// Apply `op` to `seen` (everything this replica holds of the key) as actor `actor`.
    Update {
        /// The state the op applies to.
        seen: Object,
        /// The op, in the plugin's format.
        op: Vec<u8>,
        /// The actor name the plugin may use (for CRDT dots of its own).
        actor: String,
    },
}

/// What a reconciler gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginOutput {
    /// A merge: one value that replaces every sibling.
    Value(Vec<u8>),
    /// A merge: the key is deleted.
    Tombstone,
    /// An update's new value.
    Updated(Vec<u8>),
}

/// Why a reconciler call gave nothing back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginError {
    /// The plugin's bytes are not on this node yet: the bucket acts as if it had none.
    NotLoaded,
    /// The call failed (trap, fuel, memory, output size, the plugin's own error); the
    /// message names the plugin and what happened.
    Failed(String),
}

/// A bucket's reconciler as its spec names it.
#[derive(Debug, Clone)]
pub(super) struct Reconciler {
    pub(super) plugin: PluginRef,
    pub(super) sibling_threshold: u32,
}

/// What a reconciler call is for.
#[derive(Debug)]
pub(super) enum Waiting {
    /// A read's merge.
    Read {
        origin: Origin,
        bucket: String,
        key: Vec<u8>,
        merged: Object,
        plugin: PluginRef,
    },
    /// A server-side update.
    Update(Box<UpdateOp>),
    /// The sibling guard of a write.
    Guard { fan_out: Box<FanOut>, dkey: Vec<u8> },
}

/// A server-side update in flight.
#[derive(Debug)]
pub(super) struct UpdateOp {
    route: Route,
    dkey: Vec<u8>,
    op: Vec<u8>,
    snapshot: Snapshot,
    attempts: usize,
}

/// Updates waiting for the one of their key in flight.
pub(super) type UpdateQueue = VecDeque<(Route, Vec<u8>)>;

impl<D: NodeDisk> Node<D> {
    /// The reconciler `bucket`'s spec names, if any.
    pub(super) fn reconciler(&self, bucket: &str) -> Option<Reconciler> {
        let spec = &self.meta.buckets.get(bucket)?.spec;
        Some(Reconciler {
            plugin: spec.reconciler.clone()?,
            sibling_threshold: spec.sibling_threshold.unwrap_or(SIBLING_THRESHOLD_DEFAULT),
        })
    }

    fn call_plugin(
        &mut self,
        bucket: &str,
        plugin: PluginRef,
        work: PluginWork,
        waiting: Waiting,
        fx: &mut Vec<Effect>,
    ) {
        self.next_plugin_call += 1;
        let call = self.next_plugin_call;
        self.plugin_calls.insert(call, waiting);
        fx.push(Effect::Plugin {
            call,
            bucket: bucket.to_string(),
            plugin,
            work,
        });
    }

    /// The driver ran reconciler call `call`.
    pub fn on_plugin_done(
        &mut self,
        now_ms: u64,
        call: u64,
        result: Result<PluginOutput, PluginError>,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.set_clock(now_ms);
        match self.plugin_calls.remove(&call) {
            Some(Waiting::Read {
                origin,
                bucket,
                key,
                merged,
                plugin,
            }) => self.read_merged(now_ms, origin, bucket, key, merged, plugin, result, &mut fx),
            Some(Waiting::Update(update)) => self.updated(now_ms, *update, result, &mut fx),
            Some(Waiting::Guard { fan_out, dkey }) => {
                self.guarded(now_ms, *fan_out, &dkey, result, &mut fx)
            }
            None => {}
        }
        fx
    }

    /// A read's answer when the bucket has a reconciler and the read found several
    /// siblings: the merge, written back; otherwise the siblings.
    pub(super) fn answer_read(
        &mut self,
        origin: Origin,
        bucket: String,
        key: Vec<u8>,
        merged: Object,
        plain: bool,
        fx: &mut Vec<Effect>,
    ) {
        if !plain
            && merged.siblings().len() >= 2
            && let Some(reconciler) = self.reconciler(&bucket)
        {
            let work = PluginWork::Merge(merged.clone());
            let plugin = reconciler.plugin.clone();
            let waiting = Waiting::Read {
                origin,
                bucket: bucket.clone(),
                key,
                merged,
                plugin: reconciler.plugin,
            };
            return self.call_plugin(&bucket, plugin, work, waiting, fx);
        }
        let answer = read_answer(
            &self.me.node,
            &bucket,
            &key,
            &merged,
            false,
            self.cfg.response_bytes_max,
        );
        self.reply(origin, answer, fx);
    }

    #[allow(clippy::too_many_arguments)]
    fn read_merged(
        &mut self,
        now_ms: u64,
        origin: Origin,
        bucket: String,
        key: Vec<u8>,
        merged: Object,
        plugin: PluginRef,
        result: Result<PluginOutput, PluginError>,
        fx: &mut Vec<Effect>,
    ) {
        let (value, tombstone) = match result {
            Ok(PluginOutput::Value(v)) => (v, false),
            Ok(PluginOutput::Tombstone) => (Vec::new(), true),
            Ok(PluginOutput::Updated(_)) | Err(PluginError::NotLoaded) => {
                let budget = self.cfg.response_bytes_max;
                let answer = read_answer(&self.me.node, &bucket, &key, &merged, false, budget);
                return self.reply(origin, answer, fx);
            }
            Err(PluginError::Failed(e)) => {
                let message = format!(
                    "node {}: bucket {bucket:?} key {}: {e}; the siblings are untouched (read \
                     with --raw to see them)",
                    self.me.node,
                    render_key(&key)
                );
                return self.reply(origin, client_error(ErrorCode::PluginFailed, message), fx);
            }
        };
        let sibling = WireSibling {
            value_bytes: value.len() as u64,
            value: value.clone(),
            tombstone,
            timestamp_ms: self.wall_ms(),
            actor: format!("reconciled by {plugin}"),
        };
        let context = causality::encode_context(merged.context());
        let write = match tombstone {
            false => Request::Put {
                bucket,
                key,
                context: context.clone(),
                value,
                options: WriteOptions::default(),
            },
            true => Request::Delete {
                bucket,
                key,
                context: context.clone(),
                options: WriteOptions::default(),
            },
        };
        // The reader gets the merge whatever the write-back's fate: the siblings stay until
        // a later read or write merges them again.
        let origin = Origin::WriteBack {
            origin: Box::new(origin),
            sibling: Box::new(sibling),
            context,
        };
        self.start_put(now_ms, origin, write, None, fx);
    }

    /// A server-side update coordinated here: one of a key at a time.
    pub(super) fn start_update(
        &mut self,
        now_ms: u64,
        route: Route,
        dkey: Vec<u8>,
        op: Vec<u8>,
        fx: &mut Vec<Effect>,
    ) {
        if self.reconciler(&route.bucket).is_none() {
            let message = format!(
                "node {}: bucket {:?} has no reconciler; attach one with `quiver bucket set {} \
                 --reconciler NAME`",
                self.me.node, route.bucket, route.bucket
            );
            return self.reply(
                route.origin,
                client_error(ErrorCode::NoReconciler, message),
                fx,
            );
        }
        if let Some(queue) = self.updates.get_mut(&dkey) {
            queue.push_back((route, op));
            return;
        }
        self.updates.insert(dkey.clone(), UpdateQueue::new());
        self.update_attempt(now_ms, route, dkey, op, 0, fx);
    }

    fn update_attempt(
        &mut self,
        now_ms: u64,
        route: Route,
        dkey: Vec<u8>,
        op: Vec<u8>,
        attempts: usize,
        fx: &mut Vec<Effect>,
    ) {
        let (Some(reconciler), Ok(snapshot)) = (
            self.reconciler(&route.bucket),
            self.replica.update_begin(&route.bucket, &route.key, &dkey),
        ) else {
            let message = format!(
                "node {}: bucket {:?} key {}: cannot start the update (no reconciler, or the \
                 record is unreadable)",
                self.me.node,
                route.bucket,
                render_key(&route.key)
            );
            self.reply(route.origin, client_error(ErrorCode::Storage, message), fx);
            return self.next_update(now_ms, &dkey, fx);
        };
        let seen = snapshot
            .record
            .as_ref()
            .map(|r| r.object.clone())
            .unwrap_or_default();
        let actor = self.replica.actor_of(snapshot.epoch);
        let work = PluginWork::Update {
            seen,
            op: op.clone(),
            actor,
        };
        let bucket = route.bucket.clone();
        let update = UpdateOp {
            route,
            dkey,
            op,
            snapshot,
            attempts,
        };
        self.call_plugin(
            &bucket,
            reconciler.plugin,
            work,
            Waiting::Update(Box::new(update)),
            fx,
        );
    }

    fn updated(
        &mut self,
        now_ms: u64,
        u: UpdateOp,
        result: Result<PluginOutput, PluginError>,
        fx: &mut Vec<Effect>,
    ) {
        let where_ = format!(
            "node {}: bucket {:?} key {}",
            self.me.node,
            u.route.bucket,
            render_key(&u.route.key)
        );
        let value = match result {
            Ok(PluginOutput::Updated(v) | PluginOutput::Value(v)) => v,
            Ok(PluginOutput::Tombstone) => Vec::new(),
            Err(PluginError::NotLoaded) => {
                let message = format!("{where_}: the bucket's reconciler is not loaded here");
                self.reply(
                    u.route.origin,
                    client_error(ErrorCode::NoReconciler, message),
                    fx,
                );
                return self.next_update(now_ms, &u.dkey, fx);
            }
            Err(PluginError::Failed(e)) => {
                let message = format!("{where_}: {e}");
                self.reply(
                    u.route.origin,
                    client_error(ErrorCode::PluginFailed, message),
                    fx,
                );
                return self.next_update(now_ms, &u.dkey, fx);
            }
        };
        let committed = self.replica.update_commit(
            &u.route.bucket,
            &u.route.key,
            &u.dkey,
            &u.snapshot,
            value.clone(),
            self.wall_ms(),
        );
        match committed {
            Ok(Some(outcome)) => {
                fx.push(Effect::Observe(Observation::DotIssued {
                    node: self.me.node.clone(),
                    bucket: u.route.bucket.clone(),
                    key: u.route.key.clone(),
                    dot: outcome.dot.clone(),
                    context: u
                        .snapshot
                        .record
                        .as_ref()
                        .map(|r| r.object.context().clone())
                        .unwrap_or_default(),
                    value,
                }));
                let dkey = u.dkey;
                self.after_local_write(
                    now_ms,
                    FanOut {
                        route: u.route,
                        outcome,
                    },
                    fx,
                );
                self.next_update(now_ms, &dkey, fx);
            }
            // A write landed while the plugin ran: read again.
            Ok(None) if u.attempts + 1 < UPDATE_ATTEMPTS_MAX => {
                self.update_attempt(now_ms, u.route, u.dkey, u.op, u.attempts + 1, fx)
            }
            Ok(None) => {
                let message = format!(
                    "{where_}: the key changed {UPDATE_ATTEMPTS_MAX} times while its update \
                     ran; nothing was written, retry"
                );
                self.reply(
                    u.route.origin,
                    client_error(ErrorCode::Timeout, message),
                    fx,
                );
                self.next_update(now_ms, &u.dkey, fx);
            }
            Err(e) => {
                self.reply(u.route.origin, client_error(e.code(), e.to_string()), fx);
                self.next_update(now_ms, &u.dkey, fx);
            }
        }
    }

    /// The update of `dkey` in flight is over: the next one queued for it starts.
    fn next_update(&mut self, now_ms: u64, dkey: &[u8], fx: &mut Vec<Effect>) {
        let next = self.updates.get_mut(dkey).and_then(VecDeque::pop_front);
        match next {
            Some((route, op)) => self.update_attempt(now_ms, route, dkey.to_vec(), op, 0, fx),
            None => {
                self.updates.remove(dkey);
            }
        }
    }

    /// The sibling guard: merges the siblings the write just left with the reconciler.
    pub(super) fn start_guard(
        &mut self,
        reconciler: Reconciler,
        dkey: Vec<u8>,
        fan_out: FanOut,
        fx: &mut Vec<Effect>,
    ) {
        let work = PluginWork::Merge(fan_out.outcome.object.clone());
        let bucket = fan_out.route.bucket.clone();
        let waiting = Waiting::Guard {
            fan_out: Box::new(fan_out),
            dkey,
        };
        self.call_plugin(&bucket, reconciler.plugin, work, waiting, fx);
    }

    /// The guard's merge is back: written if the key still holds exactly the state merged
    /// (else, or if the merge failed, the write stands as is and the next one guards
    /// again); then the write goes on.
    fn guarded(
        &mut self,
        now_ms: u64,
        mut f: FanOut,
        dkey: &[u8],
        result: Result<PluginOutput, PluginError>,
        fx: &mut Vec<Effect>,
    ) {
        let op = match result {
            Ok(PluginOutput::Value(v) | PluginOutput::Updated(v)) => {
                Some(causality::WriteOp::Put(v))
            }
            Ok(PluginOutput::Tombstone) => Some(causality::WriteOp::Delete),
            Err(e) => {
                tracing::warn!(node = %self.me.node, bucket = f.route.bucket, key = %render_key(&f.route.key), error = ?e, "sibling guard: merge failed, siblings kept");
                None
            }
        };
        if let Some(op) = op {
            let value = match &op {
                causality::WriteOp::Put(v) => v.clone(),
                causality::WriteOp::Delete => Vec::new(),
            };
            let committed = self.replica.guard_commit(
                &f.route.bucket,
                &f.route.key,
                dkey,
                &f.outcome.object,
                op,
                self.wall_ms(),
            );
            match committed {
                Ok(Some((merged, seen, dot))) => {
                    fx.push(Effect::Observe(Observation::DotIssued {
                        node: self.me.node.clone(),
                        bucket: f.route.bucket.clone(),
                        key: f.route.key.clone(),
                        dot: dot.clone(),
                        context: seen.clone(),
                        value,
                    }));
                    f.outcome.object = merged;
                    f.outcome.context.join(&seen);
                    f.outcome.context.add(&dot);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(node = %self.me.node, bucket = f.route.bucket, error = %e, "sibling guard: merge not written");
                }
            }
        }
        self.after_local_write(now_ms, f, fx);
    }
}

/// A read's answer after its merge was written back (or not): the merge, with the write's
/// context when it went through, else the siblings' (a later write still supersedes them).
pub(super) fn write_back_answer(
    result: Response,
    sibling: WireSibling,
    context: Vec<u8>,
) -> Response {
    let context = match result {
        Response::Written { context } => context,
        _ => context,
    };
    Response::Get {
        siblings: vec![sibling],
        context,
    }
}
