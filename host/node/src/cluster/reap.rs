//! Tombstone reaping: a deletion's tombstone is removed only once every replica of the key
//! holds exactly that tombstone and no node holds a hint for the key, so no copy of the
//! deleted value is left anywhere to come back (the resurrection Riak and Cassandra suffer
//! when a replica that missed the delete returns after the tombstones were purged).
//!
//! The key's first primary reaps. For tombstones it has held for the grace period (which
//! outlasts any repair or store still in flight) it asks every member — not only the
//! replicas, since a fallback may hold a hint — for how long it has held the same state and
//! whether it holds a hint. Hold times are measured by each node on its own clock, so clock
//! skew between nodes cannot shorten the grace; every node makes its applied writes durable
//! before it answers, so a counted tombstone cannot be lost to a power failure. Only when
//! every member answers, every replica has held it for the grace and nobody holds a hint
//! does it tell the other replicas to reap, and then reaps itself. A replica reaps only if its state is
//! still that exact tombstone, so a write that arrived meanwhile survives. A member that is
//! down blocks reaping of every key until it is back (or removed from the cluster): the
//! price of never resurrecting data.

use std::sync::atomic::Ordering;

use quiver_core::merkle::{self, Hash};
use quiver_core::storage::keys;

use super::Cluster;
use crate::peer::{PeerRequest, PeerResponse};

/// Tombstones considered per reaping pass.
const REAP_BATCH: usize = 512;

impl Cluster {
    /// One reaping pass; returns the number of tombstones this node removed.
    pub async fn reap_tombstones(&self, now_ms: u64) -> u64 {
        let grace = u64::try_from(self.config.ae.tombstone_grace.as_millis()).unwrap_or(u64::MAX);
        let Some(before) = now_ms.checked_sub(grace) else {
            return 0;
        };
        let ae = self.kv.ae();
        if ae.tombstones() == 0 {
            return 0;
        }
        let members: Vec<String> = self.peers.names();
        if members.iter().any(|m| !self.peers.is_up(m)) {
            return 0;
        }
        // Every step runs on this ring: members holding another one refuse (a member on an
        // older ring may still count itself a replica without holding the tombstone), and a
        // ring change here during the pass reaps nothing.
        let ring_id = self.ring().id();
        let on_ring = |request: PeerRequest| PeerRequest::OnRing {
            ring: ring_id,
            request: Box::new(request),
        };
        let candidates = match ae.reap_candidates(self.kv.store(), before, REAP_BATCH) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the tombstone index");
                return 0;
            }
        };
        // (data key, digest, the other primaries) of the keys this node reaps.
        let mut mine: Vec<(Vec<u8>, Hash, Vec<String>)> = Vec::new();
        let objects = match self.kv.objects(&candidates) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "cannot read tombstones");
                return 0;
            }
        };
        for (dkey, object) in objects {
            let Some((bucket, key)) = keys::split_data_key(&dkey) else {
                continue;
            };
            let bucket = String::from_utf8_lossy(bucket).into_owned();
            if !quiver_node_core::ae::is_tombstone(&object) {
                continue;
            }
            let (primaries, _) = self.preference(&bucket, key, self.props(&bucket).quorum.n);
            if primaries.first().map(String::as_str) != Some(self.me()) {
                continue;
            }
            let others = primaries.into_iter().filter(|p| p != self.me()).collect();
            mine.push((dkey, merkle::object_digest(&object), others));
        }
        if mine.is_empty() {
            return 0;
        }
        if let Err(e) = self.kv.store().sync_applied().await {
            tracing::error!(error = %e, "cannot make tombstones durable before reaping");
            return 0;
        }
        let asked: Vec<(Vec<u8>, Hash)> = mine.iter().map(|(k, d, _)| (k.clone(), *d)).collect();
        let mut confirmed = vec![true; mine.len()];
        let long_enough = |held: Option<u64>| held.is_some_and(|ms| ms >= grace);
        for (i, (dkey, digest, _)) in mine.iter().enumerate() {
            match self.kv.reap_status(dkey, digest, &members, now_ms) {
                Ok((held, false)) if long_enough(held) => {}
                _ => confirmed[i] = false,
            }
        }
        for member in &members {
            let reply = self
                .peers
                .call_untracked(member, &on_ring(PeerRequest::ReapCheck(asked.clone())))
                .await;
            let Ok(PeerResponse::ReapStatus(answers)) = reply else {
                // An unanswered check proves nothing: reap nothing this pass.
                return 0;
            };
            if answers.len() != mine.len() {
                return 0;
            }
            for (i, (held, hinted)) in answers.into_iter().enumerate() {
                let replica = mine[i].2.iter().any(|p| p == member);
                if hinted || (replica && !long_enough(held)) {
                    confirmed[i] = false;
                }
            }
        }
        let reap: Vec<&(Vec<u8>, Hash, Vec<String>)> = mine
            .iter()
            .zip(&confirmed)
            .filter_map(|(m, &ok)| ok.then_some(m))
            .collect();
        if self.ring().id() != ring_id {
            return 0;
        }
        // The other replicas first: if this node stops half-way, its own tombstone remains
        // and anti-entropy spreads it again, to be reaped on a later pass.
        for member in &members {
            let theirs: Vec<(Vec<u8>, Hash)> = reap
                .iter()
                .filter(|(_, _, others)| others.contains(member))
                .map(|(k, d, _)| (k.clone(), *d))
                .collect();
            if theirs.is_empty() {
                continue;
            }
            if let Err(e) = self
                .peers
                .call_untracked(member, &on_ring(PeerRequest::Reap(theirs)))
                .await
            {
                tracing::debug!(peer = member, error = %e, "reap request failed");
            }
        }
        let mut reaped = 0;
        for (dkey, digest, _) in reap {
            match self.kv.reap(dkey, digest, &members) {
                Ok(true) => reaped += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot reap a tombstone"),
            }
        }
        if reaped > 0 {
            ae.metrics()
                .tombstones_reaped
                .fetch_add(reaped, Ordering::Relaxed);
            tracing::info!(reaped, "tombstones reaped");
        }
        reaped
    }

    /// True when this node holds a copy of the key (engine data key) but is not one of its
    /// primaries under its ring (an old owner that has not handed it off yet). Errs on the
    /// side of "holds": an unreadable record counts.
    fn holds_orphan_copy(&self, data_key: &[u8]) -> bool {
        let Some((bucket, key)) = keys::split_data_key(data_key) else {
            return false;
        };
        let bucket = String::from_utf8_lossy(bucket);
        let (primaries, _) = self.preference(&bucket, key, self.props(&bucket).quorum.n);
        if primaries.iter().any(|p| p == self.me()) {
            return false;
        }
        match self.kv.objects(&[data_key.to_vec()]) {
            Ok(objects) => objects
                .iter()
                .any(|(_, o)| !o.siblings().is_empty() || !o.context().is_empty()),
            Err(_) => true,
        }
    }

    /// The replica side of reaping.
    pub(crate) async fn handle_reap_peer(&self, request: PeerRequest) -> PeerResponse {
        let members: Vec<String> = self.peers.names();
        match request {
            PeerRequest::ReapCheck(asked) => {
                if let Err(e) = self.kv.store().sync_applied().await {
                    return PeerResponse::Error(quiver_sdk::wire::ErrorReply {
                        code: quiver_sdk::wire::ErrorCode::Storage,
                        message: format!("node {}: {e}", self.me()),
                    });
                }
                let now = super::now_ms();
                PeerResponse::ReapStatus(
                    asked
                        .iter()
                        .map(|(dkey, digest)| {
                            // A copy here that this node no longer replicates is waiting
                            // for handoff, and may be older than the tombstone: like a hint,
                            // it keeps the tombstone until it has reached the replicas.
                            if self.holds_orphan_copy(dkey) {
                                return (None, true);
                            }
                            // A failed read answers "not held, hinted": the tombstone stays.
                            self.kv
                                .reap_status(dkey, digest, &members, now)
                                .unwrap_or((None, true))
                        })
                        .collect(),
                )
            }
            PeerRequest::Reap(keys) => {
                let mut reaped = 0;
                for (dkey, digest) in &keys {
                    match self.kv.reap(dkey, digest, &members) {
                        Ok(true) => reaped += 1,
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot reap a tombstone"),
                    }
                }
                self.kv
                    .ae()
                    .metrics()
                    .tombstones_reaped
                    .fetch_add(reaped, Ordering::Relaxed);
                PeerResponse::Reaped(reaped)
            }
            other => PeerResponse::Error(quiver_sdk::wire::ErrorReply {
                code: quiver_sdk::wire::ErrorCode::MalformedRequest,
                message: format!("not a reaping request: {other:?}"),
            }),
        }
    }
}
