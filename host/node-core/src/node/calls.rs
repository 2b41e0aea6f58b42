//! A node's calls to its peers: each has a deadline and a purpose; its answer (or its
//! timeout) goes to the failure detector when tracked, then to whatever waits for it.

use quiver_core::quorum::{Quorum, Target, select_targets};
use quiver_sdk::wire::{ErrorCode, ErrorReply, Response, WireSibling};

use super::sync::AfterSync;
use super::{CALL_ID_BITS_PER_LIFE, Effect, Message, Node, NodeDisk, NodeId, Observation, Ticket};
use crate::buckets::{self, BucketProps};
use crate::hints::StoreReply;
use crate::protocol::{PeerRequest, PeerResponse};

/// Who waits for the outcome of a client operation.
#[derive(Debug, Clone)]
pub(super) enum Origin {
    Client(Ticket),
    Peer {
        from: NodeId,
        id: u64,
    },
    /// A read's reconciled merge being written back: its reader gets the merge once the
    /// write answers.
    WriteBack {
        origin: Box<Origin>,
        sibling: Box<WireSibling>,
        /// The context of the siblings merged (the answer's if the write-back fails).
        context: Vec<u8>,
    },
}

/// Why a call failed (production: `PeerError`).
#[derive(Debug, Clone)]
pub(super) enum CallError {
    /// The peer answered with an error: it is up.
    Refused(ErrorReply),
    /// No answer in time: the peer is marked down.
    Timeout,
    /// The driver could not carry the call (the reason): the peer is marked down.
    Unreachable(String),
}

/// What a call's outcome is for.
#[derive(Debug, Clone)]
pub(super) enum Purpose {
    Probe,
    Store {
        op: u64,
        target: Target,
    },
    Fetch {
        op: u64,
        node: NodeId,
    },
    Forward {
        op: u64,
    },
    Repair,
    /// The `Store` of the hint-delivery pass in flight.
    Hint,
    Ae {
        exchange: u64,
    },
    Reap {
        pass: u64,
    },
    Gossip,
    Handoff {
        pass: u64,
    },
    /// A handoff push whose answer nobody waits for (the broken variant).
    HandoffUnawaited,
    Depart {
        id: u64,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Call {
    pub(super) peer: NodeId,
    pub(super) deadline_ms: u64,
    pub(super) started_ms: u64,
    pub(super) purpose: Purpose,
    /// Feeds the failure detector (background anti-entropy calls do not).
    pub(super) tracked: bool,
}

impl<D: NodeDisk> Node<D> {
    // ----- failure detection (production: peer.rs) -----

    pub(super) fn is_up(&self, node: &str) -> bool {
        node == self.me.node || self.health.is_up(node)
    }

    pub(super) fn mark_up(&mut self, node: &str, now_ms: u64) {
        // A peer back up gets its hints at the next tick (production: `Peers::came_up`
        // wakes hint delivery), after the pass in flight if there is one.
        if self.health.on_success(node, now_ms) {
            self.hints_wanted = true;
        }
    }

    pub(super) fn mark_down(&mut self, node: &str, started_ms: u64, now_ms: u64) {
        self.health.on_failure(node, started_ms, now_ms);
    }

    pub(super) fn call(
        &mut self,
        now_ms: u64,
        peer: &str,
        body: PeerRequest,
        timeout_ms: u64,
        purpose: Purpose,
        fx: &mut Vec<Effect>,
    ) {
        self.call_with(now_ms, peer, body, timeout_ms, purpose, true, fx);
    }

    /// A call whose outcome does not reach the failure detector (production:
    /// `Peers::call_untracked`, used by anti-entropy and reaping).
    pub(super) fn call_untracked(
        &mut self,
        now_ms: u64,
        peer: &str,
        body: PeerRequest,
        timeout_ms: u64,
        purpose: Purpose,
        fx: &mut Vec<Effect>,
    ) {
        self.call_with(now_ms, peer, body, timeout_ms, purpose, false, fx);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn call_with(
        &mut self,
        now_ms: u64,
        peer: &str,
        body: PeerRequest,
        timeout_ms: u64,
        purpose: Purpose,
        tracked: bool,
        fx: &mut Vec<Effect>,
    ) {
        self.next_call += 1;
        let id = (self.life << CALL_ID_BITS_PER_LIFE) | self.next_call;
        self.calls.insert(
            id,
            Call {
                peer: peer.to_string(),
                deadline_ms: now_ms + timeout_ms,
                started_ms: now_ms,
                purpose,
                tracked,
            },
        );
        fx.push(Effect::Send {
            to: peer.to_string(),
            msg: Message::Request { id, body },
        });
    }

    pub(super) fn dispatch(
        &mut self,
        now_ms: u64,
        peer: &str,
        purpose: Purpose,
        result: Result<PeerResponse, CallError>,
        fx: &mut Vec<Effect>,
    ) {
        match purpose {
            // The outcome already reached the failure detector (`on_message` / `on_tick`).
            Purpose::Probe => {}
            Purpose::Repair => {}
            Purpose::Ae { exchange } => self.ae_result(now_ms, exchange, result, fx),
            Purpose::Reap { pass } => self.reap_result(now_ms, pass, peer, result, fx),
            Purpose::Gossip => self.gossip_result(now_ms, peer, result, fx),
            Purpose::Handoff { pass } => self.handoff_result(now_ms, pass, result, fx),
            Purpose::HandoffUnawaited => {}
            Purpose::Depart { id } => self.depart_result(id, result, fx),
            Purpose::Store { op, target } => {
                let result = match result {
                    Ok(PeerResponse::Stored) => Ok(()),
                    Ok(other) => Err(format!("unexpected reply {other:?}")),
                    Err(CallError::Refused(e)) => Err(e.message),
                    Err(CallError::Timeout) => Err("timeout".to_string()),
                    Err(CallError::Unreachable(reason)) => Err(reason),
                };
                self.store_result(now_ms, op, Some(target), result, fx);
            }
            Purpose::Fetch { op, node } => {
                if let Some(g) = self.gets.get_mut(&op) {
                    let reply = match result {
                        Ok(PeerResponse::Fetched(o)) => Ok(o),
                        Ok(other) => Err(format!("unexpected {other:?}")),
                        Err(e) => Err(format!("{e:?}")),
                    };
                    if let Some(spare) = g.get.on_reply(&node, reply) {
                        self.send_fetch(now_ms, op, &spare.node, fx);
                    }
                    self.get_progress(now_ms, op, fx);
                }
            }
            Purpose::Forward { op } => {
                if let Some(mut fwd) = self.forwards.remove(&op) {
                    match result {
                        Ok(PeerResponse::Forwarded(r)) => {
                            self.reply(fwd.origin, r, fx);
                        }
                        other => {
                            let current = fwd.current.clone();
                            fwd.forwarding.on_failure(&current, format!("{other:?}"));
                            self.forward_next(now_ms, op, fwd, fx);
                        }
                    }
                }
            }
            Purpose::Hint => {
                let reply = match result {
                    Ok(PeerResponse::Stored) => StoreReply::Stored,
                    Ok(_) | Err(CallError::Refused(_)) => StoreReply::Refused,
                    // The owner went away again: stop for now, it is marked down.
                    Err(CallError::Timeout | CallError::Unreachable(_)) => StoreReply::Unreachable,
                };
                if let Some(mut pass) = self.hint_pass.take() {
                    let members: Vec<String> = self.meta.members.keys().cloned().collect();
                    let is_primary = |bucket: &str, key: &[u8]| {
                        let n = self.props(bucket).quorum.n;
                        let (primaries, _) = self.preference(bucket, key, n);
                        primaries.contains(&self.me.node)
                    };
                    let changed = match pass.on_reply(&self.replica, reply, &is_primary, &members) {
                        Ok(changed) => changed,
                        Err(e) => {
                            // The marker stays; a later pass delivers it again.
                            tracing::error!(node = %self.me.node, error = %e, "cannot clean up a delivered hint");
                            false
                        }
                    };
                    self.hint_pass = Some(pass);
                    if changed {
                        self.sync_then(now_ms, AfterSync::Nothing, fx);
                        fx.push(Effect::Observe(Observation::HintHandedOff));
                    }
                }
                self.hint_step(now_ms, fx);
            }
        }
    }

    pub(super) fn reply(&mut self, origin: Origin, result: Response, fx: &mut Vec<Effect>) {
        match origin {
            Origin::Client(ticket) => fx.push(Effect::Reply { ticket, result }),
            Origin::Peer { from, id } => fx.push(Effect::Send {
                to: from,
                msg: Message::Response {
                    id,
                    body: PeerResponse::Forwarded(result),
                },
            }),
            Origin::WriteBack {
                origin,
                sibling,
                context,
            } => {
                let answer = super::plugin::write_back_answer(result, *sibling, context);
                self.reply(*origin, answer, fx);
            }
        }
    }

    // ----- placement (production: Cluster::preference / targets / quorum) -----

    pub(super) fn preference(
        &self,
        bucket: &str,
        key: &[u8],
        n: usize,
    ) -> (Vec<NodeId>, Vec<NodeId>) {
        let list = self.ring.preference_list_for_key(bucket.as_bytes(), key, n);
        (
            list.primaries.iter().map(|m| m.id.clone()).collect(),
            list.fallbacks.iter().map(|m| m.id.clone()).collect(),
        )
    }

    pub(super) fn targets(&self, bucket: &str, key: &[u8], n: usize) -> (Vec<Target>, usize) {
        let (primaries, fallbacks) = self.preference(bucket, key, n);
        let p: Vec<&str> = primaries.iter().map(String::as_str).collect();
        let f: Vec<&str> = fallbacks.iter().map(String::as_str).collect();
        let sloppy = self.props(bucket).sloppy;
        let targets = select_targets(&p, &f, |node| self.is_up(node), sloppy);
        (targets, primaries.len())
    }

    /// `bucket`'s replication properties: the configuration's, overlaid by the bucket's
    /// spec in the cluster metadata. A spec that does not fit is ignored (the server logs
    /// it where it takes the metadata).
    pub(super) fn props(&self, bucket: &str) -> BucketProps {
        let base = self
            .cfg
            .buckets
            .get(bucket)
            .copied()
            .unwrap_or(BucketProps {
                quorum: self.cfg.quorum,
                sloppy: self.cfg.sloppy,
            });
        match self.meta.buckets.get(bucket) {
            Some(entry) => buckets::effective(base, &entry.spec).unwrap_or(base),
            None => base,
        }
    }

    /// The quorum of a request on `bucket`, with the client's r or w if it gave one.
    pub(super) fn quorum(
        &self,
        bucket: &str,
        r: Option<usize>,
        w: Option<usize>,
    ) -> Result<Quorum, String> {
        let d = self.props(bucket).quorum;
        Quorum::new(d.n, r.unwrap_or(d.r), w.unwrap_or(d.w)).map_err(|e| e.to_string())
    }

    /// The node's wall clock now (the driver keeps it current for each input).
    pub(super) fn wall_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The input being handled happens at `now_ms` (monotonic).
    pub(super) fn set_clock(&mut self, now_ms: u64) {
        self.clock_ms = now_ms;
    }
}

/// A client's error answer (production: `cluster::error`).
pub(super) fn client_error(code: ErrorCode, message: String) -> Response {
    Response::Error(ErrorReply { code, message })
}

/// A call's outcome as production's drivers see it (`Peers::call_untracked` turns a
/// peer's error answer into a refusal): the answer, or why there is none.
pub(super) fn call_answer(result: Result<PeerResponse, CallError>) -> Result<PeerResponse, String> {
    match result {
        Ok(response) => Ok(response),
        Err(CallError::Refused(e)) => Err(e.message),
        Err(CallError::Timeout) => Err("no answer in time".to_string()),
        Err(CallError::Unreachable(reason)) => Err(reason),
    }
}

/// A peer request this node does not answer.
pub(super) fn refusal(message: &str) -> PeerResponse {
    PeerResponse::Error(ErrorReply {
        code: ErrorCode::Internal,
        message: message.to_string(),
    })
}
