//! Active anti-entropy (Dynamo §4.7), the server's driver of the sans-IO protocol in
//! `quiver_node_core::exchange`: one exchange at a time, with the next reachable peer in
//! turn, every `interval`; each step is one peer call, awaited. The protocol, the lease and
//! the merges are node-core's, shared with the simulator.

use std::sync::atomic::Ordering;

use quiver_node_core::exchange::{self, AeLease, AeReport, Answering, Exchange, Step};
use quiver_sdk::wire::{ErrorCode, ErrorReply};
use serde::Serialize;

use super::Cluster;
use crate::peer::{PeerRequest, PeerResponse};
use quiver_node_core::ae::TreeId;

/// Anti-entropy settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AeConfig {
    /// Time between exchanges; `None` turns anti-entropy off.
    pub interval: Option<std::time::Duration>,
    /// Keys repaired per exchange at most.
    pub max_keys: usize,
    /// How long every replica must have held a tombstone before it may be reaped.
    pub tombstone_grace: std::time::Duration,
}

fn encoded_len<T: Serialize>(value: &T) -> u64 {
    // Sizes are for the metrics only; a second encoding is cheap next to the exchange.
    postcard::to_allocvec(value).map_or(0, |v| v.len() as u64)
}

impl Cluster {
    /// The trees this node and `peer` both replicate.
    fn shared_trees(&self, peer: &str) -> Vec<TreeId> {
        exchange::shared_trees(&self.ring(), &self.kv.ae().placement(), self.me(), peer)
    }

    /// The lease's monotonic clock: ms since this node started.
    fn lease_now_ms(&self) -> u64 {
        self.mono_ms()
    }

    fn ae_lease(&self) -> std::sync::MutexGuard<'_, AeLease> {
        self.ae_lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn ae_call(
        &self,
        peer: &str,
        req: PeerRequest,
        report: &mut AeReport,
    ) -> Result<PeerResponse, String> {
        let bytes = encoded_len(&req);
        report.bytes_sent += bytes;
        self.kv
            .ae()
            .metrics()
            .bytes_sent
            .fetch_add(bytes, Ordering::Relaxed);
        self.peers
            .call_untracked(peer, &req)
            .await
            .map_err(|e| e.to_string())
    }

    /// One exchange with `peer`: compares every shared tree and repairs up to `max_keys`
    /// differing keys in both directions.
    pub async fn ae_exchange(&self, peer: &str, max_keys: usize) -> Result<AeReport, String> {
        let me = self.me().to_string();
        if self.ae_lease().held_by_another(&me, self.lease_now_ms()) {
            return Err("a peer's exchange is repairing this node".into());
        }
        let (mut exchange, first) =
            Exchange::start(&self.kv, &me, peer, self.shared_trees(peer), max_keys);
        let mut bytes_sent = 0;
        let mut request = first;
        let result = loop {
            let mut counted = AeReport::default();
            let reply = self
                .ae_call(peer, PeerRequest::from(request), &mut counted)
                .await
                .and_then(|r| {
                    r.into_ae()
                        .ok_or_else(|| "not an anti-entropy answer".to_string())
                });
            bytes_sent += counted.bytes_sent;
            match exchange.on_response(&self.kv, reply) {
                Step::Send(next) => request = next,
                Step::Finished(result) => break result,
            }
        };
        if exchange.descended() {
            // Best effort: the peer's reservation also ends by itself.
            let mut counted = AeReport::default();
            let done = exchange::AeRequest::Done { from: me };
            let _ = self
                .ae_call(peer, PeerRequest::from(done), &mut counted)
                .await;
        }
        let mut report = result?;
        report.bytes_sent = bytes_sent;
        let metrics = self.kv.ae().metrics();
        metrics.exchanges.fetch_add(1, Ordering::Relaxed);
        metrics
            .keys_repaired
            .fetch_add(report.pulled + report.pushed, Ordering::Relaxed);
        Ok(report)
    }

    /// The answering side of an exchange.
    pub(crate) fn handle_ae_peer(&self, request: exchange::AeRequest) -> PeerResponse {
        let ring = self.ring();
        let placement = self.kv.ae().placement();
        let sender_is_member = match &request {
            exchange::AeRequest::Digest { from, .. } => self.peers.addr(from).is_some(),
            _ => true,
        };
        let at = Answering {
            me: self.me(),
            ring: &ring,
            placement: &placement,
            sender_is_member,
        };
        let now = self.lease_now_ms();
        // Only a digest and a done touch the lease; the other steps (a push merges up to
        // half a mebibyte) must not hold its mutex.
        let answer = if matches!(
            request,
            exchange::AeRequest::Digest { .. } | exchange::AeRequest::Done { .. }
        ) {
            exchange::answer(&self.kv, &at, &mut self.ae_lease(), now, request)
        } else {
            exchange::answer(&self.kv, &at, &mut AeLease::default(), now, request)
        };
        let response = match answer {
            exchange::AeResponse::Refused(message) => PeerResponse::Error(ErrorReply {
                code: ErrorCode::MalformedRequest,
                message,
            }),
            other => PeerResponse::from(other),
        };
        self.kv
            .ae()
            .metrics()
            .bytes_sent
            .fetch_add(encoded_len(&response), Ordering::Relaxed);
        response
    }

    /// One background anti-entropy step: one exchange with the next reachable peer in turn,
    /// then a reaping pass.
    pub async fn ae_tick(&self, max_keys: usize) {
        let peers = self.peers.up_names();
        if peers.is_empty() {
            return;
        }
        let i = self.ae_next_peer.fetch_add(1, Ordering::Relaxed) % peers.len();
        let peer = &peers[i];
        match self.ae_exchange(peer, max_keys).await {
            Ok(r) if r.pulled + r.pushed > 0 => tracing::info!(
                peer = %r.peer,
                trees_differing = r.trees_differing,
                pulled = r.pulled,
                pushed = r.pushed,
                bytes_sent = r.bytes_sent,
                "anti-entropy repaired keys"
            ),
            Ok(_) => {}
            Err(e) => tracing::debug!(peer, error = %e, "anti-entropy exchange failed"),
        }
        self.reap_tombstones(super::now_ms()).await;
    }

    /// Refiles entries after a replication-factor change, if one happened (runs on the
    /// metadata tick, so also with anti-entropy off: writes stay on the slow path of reading
    /// each key's entry until it is done).
    pub async fn ae_refile_if_pending(&self) {
        if self.ae_refile_pending.swap(false, Ordering::Relaxed) {
            self.ae_refile().await;
        }
    }

    async fn ae_refile(&self) {
        const REFILE_BATCH: usize = 4096;
        let generation = self.kv.ae().generation();
        loop {
            let misfiled = match self.kv.ae().misfiled(self.kv.store(), REFILE_BATCH) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(error = %e, "cannot scan anti-entropy entries");
                    return;
                }
            };
            for dkey in &misfiled {
                if let Err(e) = self.kv.ae_refile(dkey) {
                    tracing::error!(error = %e, "cannot refile an anti-entropy entry");
                    return;
                }
            }
            if misfiled.len() < REFILE_BATCH {
                self.kv.ae().refiled(generation);
                return;
            }
            tokio::task::yield_now().await;
        }
    }
}
