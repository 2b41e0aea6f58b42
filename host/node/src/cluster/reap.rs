//! Tombstone reaping, the server's driver of `quiver_node_core::reap` (the rules and why
//! they hold are there): each step of a pass is an awaited peer call (`call_untracked`:
//! reaping does not feed the failure detector), each sync a group-commit round.

use quiver_node_core::broken::Broken;
use quiver_node_core::reap::{self, Answer, ReapAnswering, ReapPass, ReapStart, ReapStep};
use quiver_sdk::wire::{ErrorCode, ErrorReply};

use super::Cluster;
use crate::peer::{PeerRequest, PeerResponse};

impl Cluster {
    /// One reaping pass; returns the number of tombstones this node removed.
    pub async fn reap_tombstones(&self, now_ms: u64) -> u64 {
        let grace = u64::try_from(self.config.ae.tombstone_grace.as_millis()).unwrap_or(u64::MAX);
        let members = self.peers.names();
        // Built and dropped before the first await: the closures are not `Sync`.
        let started = {
            let is_up = |m: &str| self.peers.is_up(m);
            let primaries = |bucket: &str, key: &[u8]| {
                self.preference(bucket, key, self.props(bucket).quorum.n).0
            };
            let start = ReapStart {
                me: self.me(),
                ring: self.ring().id(),
                members: &members,
                is_up: &is_up,
                primaries: &primaries,
                grace_ms: grace,
                now_ms,
                broken: Broken::NONE,
            };
            ReapPass::start(&self.kv, &start)
        };
        let Some((mut pass, mut step)) = started else {
            return 0;
        };
        let report = loop {
            step = match step {
                ReapStep::Done(report) => break report,
                ReapStep::Sync => match self.kv.store().sync_applied().await {
                    Ok(()) => pass.synced(&self.kv),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot make tombstones durable before reaping");
                        return 0;
                    }
                },
                ReapStep::Send(requests) => {
                    let mut next = ReapStep::Wait;
                    // One at a time: a refused check ends the pass before the rest are asked.
                    for (member, request) in requests {
                        let answer = match self
                            .peers
                            .call_untracked(&member, &PeerRequest::from(request))
                            .await
                        {
                            Ok(response) => response
                                .into_reap()
                                .ok_or_else(|| "not a reaping answer".to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                        next = pass.on_response(&self.kv, &member, answer, self.ring().id());
                        if next != ReapStep::Wait {
                            break;
                        }
                    }
                    next
                }
                // Every request was sent and answered: the machine never waits then.
                ReapStep::Wait => return 0,
            };
        };
        let reaped = u64::try_from(report.reaped.len()).unwrap_or(u64::MAX);
        if reaped > 0 {
            tracing::info!(reaped, "tombstones reaped");
        }
        reaped
    }

    /// The member side of reaping: a `ReapCheck` or `Reap` (routed by
    /// `PeerRequest::inbound`).
    pub(crate) async fn handle_reap_peer(&self, request: reap::ReapRequest) -> PeerResponse {
        let ring = self.ring();
        let theirs = match &request {
            reap::ReapRequest::Check { ring, .. } | reap::ReapRequest::Reap { ring, .. } => *ring,
        };
        let first = self.with_reap_answering(&ring, |at| {
            reap::answer(&self.kv, at, request, super::now_ms())
        });
        let response = match first {
            Answer::Reply(response) => response,
            Answer::SyncFirst(pending) => {
                if let Err(e) = self.kv.store().sync_applied().await {
                    return PeerResponse::Error(ErrorReply {
                        code: ErrorCode::Storage,
                        message: format!("node {}: {e}", self.me()),
                    });
                }
                self.with_reap_answering(&self.ring(), |at| {
                    pending.answer(&self.kv, at, super::now_ms())
                })
            }
        };
        if response == reap::ReapResponse::OtherRing {
            return PeerResponse::Error(ErrorReply {
                code: ErrorCode::Membership,
                message: format!(
                    "node {} holds ring version {}, the sender version {} (or another ring of \
                     that version); retry once gossip has spread it",
                    self.me(),
                    ring.version(),
                    theirs.version
                ),
            });
        }
        PeerResponse::from(response)
    }

    /// Runs `f` with what this node answers a reaper with on `ring` (the closures inside
    /// are not `Sync`, so they live no longer than this call, never across an await).
    fn with_reap_answering<T>(
        &self,
        ring: &quiver_core::ring::Ring,
        f: impl FnOnce(&ReapAnswering<'_>) -> T,
    ) -> T {
        let members = self.peers.names();
        let is_primary = |bucket: &str, key: &[u8]| {
            let (primaries, _) = self.preference(bucket, key, self.props(bucket).quorum.n);
            primaries.iter().any(|p| p == self.me())
        };
        f(&ReapAnswering {
            ring: ring.id(),
            members: &members,
            is_primary: &is_primary,
            broken: Broken::NONE,
        })
    }
}
