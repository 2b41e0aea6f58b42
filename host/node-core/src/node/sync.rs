//! Durability as an effect (raft-rs `Ready`: these messages go out only after this sync).
//!
//! Wherever a node owes durability before it goes on — a replica's `Stored` for a `sync`
//! store, the coordinator's own copy counting towards W, a reaping pass or check, a handoff
//! push — it calls [`Node::sync_then`] with what comes after. A disk that syncs inline
//! (the simulator's) does it at once and the node goes on in the same input; otherwise the
//! node emits [`Effect::Sync`] and parks the rest until the driver reports the sync with
//! [`Node::on_synced`] (the server's group commit). Either way the rest runs only once
//! everything applied before the request is durable, and a failed sync becomes an error
//! answer, never an acknowledgement.

use quiver_sdk::wire::{ErrorCode, ErrorReply};

use super::client::FanOut;
use super::{Effect, Message, Node, NodeDisk, NodeId};
use crate::broken::Variant;
use crate::protocol::PeerResponse;
use crate::reap;

/// What waits for a sync.
#[derive(Debug)]
pub(super) enum AfterSync {
    /// Durability only (dropped hint markers, a local read repair): nobody waits.
    Nothing,
    /// Answer a peer: the answer vouches for durable data.
    Respond {
        /// The peer.
        to: NodeId,
        /// Its call id.
        id: u64,
        /// The answer.
        body: Box<PeerResponse>,
    },
    /// A member's answer to a reaping check, computed once its writes are durable.
    ReapAnswer {
        /// The reaper.
        to: NodeId,
        /// Its call id.
        id: u64,
        /// The check.
        pending: reap::PendingCheck,
    },
    /// The coordinators' own copies of these puts are durable: they count towards W.
    LocalCopies(Vec<u64>),
    /// A put whose coordinator was alone: its copy is durable, the fan-out goes on.
    FanOut(Box<FanOut>),
    /// The reaping pass with this id asked for a sync before its checks.
    Reap(u64),
}

impl<D: NodeDisk> Node<D> {
    /// Runs `then` once everything applied so far is durable: at once when the disk syncs
    /// inline, else after the driver's [`Effect::Sync`] comes back through
    /// [`Node::on_synced`].
    pub(super) fn sync_then(&mut self, now_ms: u64, then: AfterSync, fx: &mut Vec<Effect>) {
        match self.disk.sync_inline() {
            Some(result) => self.after_sync(now_ms, then, result, fx),
            None if self.cfg.broken.is(Variant::AckBeforeSync) => {
                self.next_sync += 1;
                fx.push(Effect::Sync {
                    token: self.next_sync,
                });
                self.after_sync(now_ms, then, Ok(()), fx);
            }
            None => {
                self.next_sync += 1;
                let token = self.next_sync;
                self.syncs.insert(token, then);
                fx.push(Effect::Sync { token });
            }
        }
    }

    /// The driver made everything applied before [`Effect::Sync`] `token` durable (or
    /// failed to, with `result` saying why).
    pub fn on_synced(
        &mut self,
        now_ms: u64,
        token: u64,
        result: Result<(), String>,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.set_clock(now_ms);
        if let Some(then) = self.syncs.remove(&token) {
            self.after_sync(now_ms, then, result, &mut fx);
        }
        fx
    }

    fn after_sync(
        &mut self,
        now_ms: u64,
        then: AfterSync,
        result: Result<(), String>,
        fx: &mut Vec<Effect>,
    ) {
        let failed = |message: &str| {
            PeerResponse::Error(ErrorReply {
                code: ErrorCode::Storage,
                message: format!("sync failed: {message}"),
            })
        };
        match then {
            AfterSync::Nothing => {}
            AfterSync::Respond { to, id, body } => {
                let body = match &result {
                    Ok(()) => *body,
                    Err(e) => failed(e),
                };
                fx.push(Effect::Send {
                    to,
                    msg: Message::Response { id, body },
                });
            }
            AfterSync::ReapAnswer { to, id, pending } => {
                let body = match &result {
                    Ok(()) => PeerResponse::from(self.reap_answer_synced(pending)),
                    Err(e) => failed(e),
                };
                fx.push(Effect::Send {
                    to,
                    msg: Message::Response { id, body },
                });
            }
            AfterSync::LocalCopies(ops) => {
                for op in ops {
                    self.store_result(now_ms, op, None, result.clone(), fx);
                }
            }
            AfterSync::FanOut(fan_out) => self.fan_out(now_ms, *fan_out, result, fx),
            AfterSync::Reap(id) => {
                let Some(mut pass) = self.reap_pass.take() else {
                    return;
                };
                if pass.id != id {
                    self.reap_pass = Some(pass);
                } else if result.is_ok() {
                    let step = pass.machine.synced(&self.replica);
                    self.reap_drive(now_ms, pass, step, fx);
                }
                // A pass that cannot make its state durable stops; a later tick starts
                // another.
            }
        }
    }
}
