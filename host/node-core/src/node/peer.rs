//! A node answering its peers: the replica side of the data path (`Fetch`, `Store`),
//! forwarded writes, and the routing of every other peer request to its machine; and the
//! hint-delivery pass.

use quiver_sdk::wire::{ErrorCode, ErrorReply};

use super::calls::{Origin, Purpose, refusal};
use super::sync::AfterSync;
use super::{Effect, Message, Node, NodeDisk};
use crate::hints::HintStep;
use crate::protocol::{Inbound, PeerRequest, PeerResponse};
use crate::replica::HintedKey;
use crate::request::{self, DataRequest, StoreRequest};

impl<D: NodeDisk> Node<D> {
    pub(super) fn handle_peer(
        &mut self,
        now_ms: u64,
        from: &str,
        id: u64,
        body: PeerRequest,
        fx: &mut Vec<Effect>,
    ) {
        let respond = |body: PeerResponse| Effect::Send {
            to: from.to_string(),
            msg: Message::Response { id, body },
        };
        let refused = |code, message| PeerResponse::Error(ErrorReply { code, message });
        let body = match body.inbound(&self.me.node, &|| self.ring.id()) {
            Inbound::Ping => PeerResponse::Pong(self.me.node.clone()),
            Inbound::Data(DataRequest::Fetch { bucket, key }) => {
                match self.replica.get(&bucket, &key) {
                    Ok(object) => PeerResponse::Fetched(object),
                    Err(e) => refused(e.code(), e.to_string()),
                }
            }
            Inbound::Data(DataRequest::Store(store)) => {
                match request::apply_store(&self.replica, &store, self.cfg.broken) {
                    Ok(true) => {
                        let then = AfterSync::Respond {
                            to: from.to_string(),
                            id,
                            body: Box::new(PeerResponse::Stored),
                        };
                        return self.sync_then(now_ms, then, fx);
                    }
                    Ok(false) => PeerResponse::Stored,
                    Err(e) => refused(ErrorCode::Storage, e.to_string()),
                }
            }
            Inbound::Forward { request, hint_for } => {
                let origin = Origin::Peer {
                    from: from.to_string(),
                    id,
                };
                return self.handle_client(now_ms, origin, request, Some(hint_for), fx);
            }
            Inbound::MetaDigest(digest) => self.on_meta_digest(digest),
            Inbound::MetaPush { state, .. } => self.on_meta_push(&state),
            Inbound::Handoff(request) => return self.on_handoff(now_ms, from, id, request, fx),
            Inbound::Reap(request) => return self.answer_reap(now_ms, from, id, request, fx),
            Inbound::Ae(request) => self.answer_ae(from, request),
            // Plugins and joins are not simulated.
            Inbound::MetaBlobs(_) | Inbound::Join { .. } => {
                refusal("not a request the simulated node answers")
            }
            Inbound::Refuse(reply) => PeerResponse::Error(reply),
        };
        fx.push(respond(body));
    }

    /// The owner acknowledged a delivered hint (the production `Replica::hint_delivered`:
    /// drop the marker, and the copy unless `keep`, only if the copy did not change since it
    /// was sent), then the driver's fsync. True when the marker was dropped.
    pub(super) fn hint_delivered(
        &mut self,
        now_ms: u64,
        fx: &mut Vec<Effect>,
        owner: &str,
        delivered: &HintedKey,
        keep: bool,
    ) -> bool {
        let HintedKey {
            bucket,
            key,
            object,
        } = delivered;
        let dropped = match self
            .replica
            .hint_delivered(owner, bucket, key, object, keep)
        {
            Ok(dropped) => dropped,
            Err(e) => {
                // The marker stays; a later pass tries again.
                tracing::error!(node = %self.me.node, owner, bucket, error = %e, "cannot drop a delivered hint");
                false
            }
        };
        if dropped {
            self.sync_then(now_ms, AfterSync::Nothing, fx);
        }
        dropped
    }

    /// One step of a hint-delivery pass: the production `HintPass` says which `Store` goes
    /// out next (the server awaits each in turn; here the next one goes out when the
    /// previous one's answer arrives, with other events in between).
    pub(super) fn hint_step(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        let Some(pass) = self.hint_pass.as_mut() else {
            return;
        };
        if pass.in_flight() {
            return;
        }
        let (me, health) = (&self.me.node, &self.health);
        let is_up = |n: &str| n == me || health.is_up(n);
        match pass.next(&self.replica, &is_up) {
            HintStep::Done { .. } => {
                self.hint_pass = None;
                self.next_hint_pass_ms = now_ms + self.cfg.hints_every_ms;
            }
            HintStep::Store { owner, hinted } => {
                let body = PeerRequest::from(DataRequest::Store(StoreRequest {
                    bucket: hinted.bucket,
                    key: hinted.key,
                    object: hinted.object,
                    hint_for: None,
                    sync: true,
                }));
                self.call(
                    now_ms,
                    &owner,
                    body,
                    self.cfg.peer_timeout_ms,
                    Purpose::Hint,
                    fx,
                );
            }
        }
    }
}
