//! Active anti-entropy (Dynamo §4.7): replicas of a partition compare hash trees in the
//! background and repair the keys that differ by merging versions both ways, so a replica
//! that lost data (a wiped disk, a missed write with hints off) converges without a read.
//!
//! One exchange is driven by the initiator against one peer, descending only where hashes
//! differ: roots of every tree both hold, then group hashes, leaf hashes, and the key lists
//! of differing leaves (`quiver_core::merkle`). Keys the peer holds differently are fetched
//! and merged here; then this node's merged states are pushed there. A merge never drops a
//! concurrent sibling, so repair cannot lose a write. Each exchange repairs at most
//! `max_keys` keys (the rest waits for the next), and exchanges run one peer at a time,
//! every `interval`.

use std::sync::atomic::Ordering;

use quiver_core::causality::Object;
use quiver_core::merkle::{self, FANOUT, Hash};
use quiver_core::storage::keys;
use quiver_sdk::wire::{ErrorCode, ErrorReply};
use serde::Serialize;

use super::Cluster;
use crate::peer::{PeerRequest, PeerResponse};
use quiver_node_core::ae::TreeId;
use quiver_storage::Durability;

/// Trees per roots message, asks per descent message.
const AE_ASKS_PER_MESSAGE: usize = 1024;
/// Data keys per fetch message.
const AE_FETCH_KEYS: usize = 256;
/// Value bytes per push message (one larger object still goes alone).
const AE_PUSH_BYTES: usize = 512 * 1024;
/// Keys listed per leaf at most; a leaf this full is repaired over several exchanges.
const AE_LEAF_KEYS_MAX: usize = 65_536;
/// Longest a node stays reserved for one exchange whose end it was not told of.
const AE_LEASE: std::time::Duration = std::time::Duration::from_secs(10);

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

/// What one exchange found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AeReport {
    /// The peer.
    pub peer: String,
    /// Trees compared.
    pub trees: usize,
    /// Trees whose roots differed.
    pub trees_differing: usize,
    /// Keys fetched from the peer that changed the local state.
    pub pulled: u64,
    /// Keys sent to the peer that changed its state.
    pub pushed: u64,
    /// Bytes of the requests this node sent.
    pub bytes_sent: u64,
    /// The digests differed and the exchange went on past the first message.
    pub descended: bool,
}

fn encoded_len<T: Serialize>(value: &T) -> u64 {
    // Sizes are for the metrics only; a second encoding is cheap next to the exchange.
    postcard::to_allocvec(value).map_or(0, |v| v.len() as u64)
}

fn refuse(message: String) -> PeerResponse {
    PeerResponse::Error(ErrorReply {
        code: ErrorCode::MalformedRequest,
        message,
    })
}

impl Cluster {
    /// The trees this node and `peer` both replicate: `(n, partition)` where both are among
    /// the partition's first `n` owners.
    fn shared_trees(&self, peer: &str) -> Vec<TreeId> {
        let placement = self.kv.ae().placement();
        let mut out = Vec::new();
        let ring = self.ring();
        for n in placement.ns() {
            for p in 0..ring.partitions() {
                let Ok(list) = ring.preference_list(p, usize::from(n)) else {
                    continue;
                };
                let has = |id: &str| list.primaries.iter().any(|m| m.id == id);
                if has(self.me()) && has(peer) {
                    out.push((n, p));
                }
            }
        }
        out
    }

    /// The digest of the roots of `trees`, in order.
    fn roots_digest(&self, trees: &[TreeId]) -> Hash {
        let ae = self.kv.ae();
        let roots: Vec<(u8, u32, Hash)> = trees
            .iter()
            .map(|&(n, p)| (n, p, ae.root((n, p))))
            .collect();
        merkle::roots_digest(&roots)
    }

    async fn ae_call(
        &self,
        peer: &str,
        req: &PeerRequest,
        report: &mut AeReport,
    ) -> Result<PeerResponse, String> {
        let bytes = encoded_len(req);
        report.bytes_sent += bytes;
        self.kv
            .ae()
            .metrics()
            .bytes_sent
            .fetch_add(bytes, Ordering::Relaxed);
        self.peers
            .call_untracked(peer, req)
            .await
            .map_err(|e| e.to_string())
    }

    /// Reserves this node for the exchange of `holder` (itself or an initiating peer); false
    /// while another exchange holds it. A node takes part in one repairing exchange at a
    /// time, so a replica that lost data is not sent the same keys by every peer at once.
    fn ae_lease(&self, holder: &str) -> bool {
        let mut lease = self.ae_lease.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match &*lease {
            Some((who, until)) if who != holder && *until > now => false,
            _ => {
                *lease = Some((holder.to_string(), now + AE_LEASE));
                true
            }
        }
    }

    fn ae_release(&self, holder: &str) {
        let mut lease = self.ae_lease.lock().unwrap_or_else(|p| p.into_inner());
        if lease.as_ref().is_some_and(|(who, _)| who == holder) {
            *lease = None;
        }
    }

    /// One exchange with `peer`: compares every shared tree and repairs up to `max_keys`
    /// differing keys in both directions.
    pub async fn ae_exchange(&self, peer: &str, max_keys: usize) -> Result<AeReport, String> {
        let me = self.me().to_string();
        if !self.ae_lease(&me) {
            return Err("this node is in another exchange".into());
        }
        let mut report = AeReport {
            peer: peer.to_string(),
            ..AeReport::default()
        };
        let result = self.ae_exchange_leased(peer, max_keys, &mut report).await;
        self.ae_release(&me);
        if report.descended {
            // Best effort: the peer's reservation also ends by itself.
            let _ = self
                .ae_call(peer, &PeerRequest::AeDone { from: me }, &mut report)
                .await;
        }
        result.map(|()| report)
    }

    async fn ae_exchange_leased(
        &self,
        peer: &str,
        max_keys: usize,
        report: &mut AeReport,
    ) -> Result<(), String> {
        let ae = self.kv.ae();
        let trees = self.shared_trees(peer);
        report.trees = trees.len();
        let summary = PeerRequest::AeDigest {
            from: self.me().to_string(),
            trees: u32::try_from(trees.len()).unwrap_or(u32::MAX),
            digest: self.roots_digest(&trees),
        };
        match self.ae_call(peer, &summary, report).await? {
            PeerResponse::AeMatch(true) => {
                ae.metrics().exchanges.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            PeerResponse::AeMatch(false) => report.descended = true,
            PeerResponse::AeBusy => return Err(format!("{peer} is in another exchange")),
            other => return Err(format!("unexpected reply to AeDigest: {other:?}")),
        }
        // Roots → the peer's groups of the trees whose roots differ.
        let mut group_asks = Vec::new();
        for chunk in trees.chunks(AE_ASKS_PER_MESSAGE) {
            let roots: Vec<(u8, u32, Hash)> = chunk
                .iter()
                .map(|&(n, p)| (n, p, ae.root((n, p))))
                .collect();
            let reply = self
                .ae_call(peer, &PeerRequest::AeRoots(roots), report)
                .await?;
            let PeerResponse::AeGroups(groups) = reply else {
                return Err(format!("unexpected reply to AeRoots: {reply:?}"));
            };
            report.trees_differing += groups.len();
            for (n, p, theirs) in groups {
                for g in merkle::differing(&ae.groups((n, p)), &theirs) {
                    group_asks.push((n, p, g));
                }
            }
        }
        // Groups → leaves.
        let mut leaf_asks = Vec::new();
        for chunk in group_asks.chunks(AE_ASKS_PER_MESSAGE) {
            let reply = self
                .ae_call(peer, &PeerRequest::AeLeaves(chunk.to_vec()), report)
                .await?;
            let PeerResponse::AeLeafHashes(lists) = reply else {
                return Err(format!("unexpected reply to AeLeaves: {reply:?}"));
            };
            for (n, p, g, theirs) in lists {
                for i in merkle::differing(&ae.leaves((n, p), g), &theirs) {
                    let leaf = usize::from(g) * FANOUT + usize::from(i);
                    if let Ok(leaf) = u8::try_from(leaf) {
                        leaf_asks.push((n, p, leaf));
                    }
                }
            }
        }
        // Leaves → keys to pull and push.
        let mut pull = Vec::new();
        let mut push = Vec::new();
        'leaves: for chunk in leaf_asks.chunks(AE_ASKS_PER_MESSAGE) {
            let reply = self
                .ae_call(peer, &PeerRequest::AeKeys(chunk.to_vec()), report)
                .await?;
            let PeerResponse::AeKeyLists(lists) = reply else {
                return Err(format!("unexpected reply to AeKeys: {reply:?}"));
            };
            for (n, p, leaf, theirs) in lists {
                let mine = ae
                    .leaf_keys(self.kv.store(), (n, p), leaf, AE_LEAF_KEYS_MAX)
                    .map_err(|e| e.to_string())?;
                let diff = merkle::diff_keys(&mine, &theirs);
                pull.extend(diff.pull);
                push.extend(diff.push);
                if pull.len().max(push.len()) >= max_keys {
                    break 'leaves;
                }
            }
        }
        pull.truncate(max_keys);
        push.truncate(max_keys);
        // Pull, then push the merged states.
        for chunk in pull.chunks(AE_FETCH_KEYS) {
            let reply = self
                .ae_call(peer, &PeerRequest::AeFetch(chunk.to_vec()), report)
                .await?;
            let PeerResponse::AeObjects(objects) = reply else {
                return Err(format!("unexpected reply to AeFetch: {reply:?}"));
            };
            report.pulled += self.ae_merge(&objects).await;
        }
        let mut batch: Vec<(Vec<u8>, Object)> = Vec::new();
        let mut batch_bytes = 0usize;
        let objects = self.kv.objects(&push).map_err(|e| e.to_string())?;
        for (dkey, object) in objects {
            if object.siblings().is_empty() && object.context().is_empty() {
                continue;
            }
            let size: usize = object.siblings().iter().map(|s| s.value.len()).sum();
            if !batch.is_empty() && batch_bytes + size > AE_PUSH_BYTES {
                report.pushed += self
                    .ae_push(peer, std::mem::take(&mut batch), report)
                    .await?;
                batch_bytes = 0;
            }
            batch_bytes += size;
            batch.push((dkey, object));
        }
        if !batch.is_empty() {
            report.pushed += self.ae_push(peer, batch, report).await?;
        }
        let metrics = ae.metrics();
        metrics.exchanges.fetch_add(1, Ordering::Relaxed);
        metrics
            .keys_repaired
            .fetch_add(report.pulled + report.pushed, Ordering::Relaxed);
        Ok(())
    }

    async fn ae_push(
        &self,
        peer: &str,
        objects: Vec<(Vec<u8>, Object)>,
        report: &mut AeReport,
    ) -> Result<u64, String> {
        match self
            .ae_call(peer, &PeerRequest::AePush(objects), report)
            .await?
        {
            PeerResponse::AePushed(changed) => Ok(changed),
            other => Err(format!("unexpected reply to AePush: {other:?}")),
        }
    }

    /// Merges objects received by anti-entropy; returns how many changed the local state.
    pub(super) async fn ae_merge(&self, objects: &[(Vec<u8>, Object)]) -> u64 {
        let mut changed = 0;
        for (dkey, object) in objects {
            let Some((bucket, key)) = keys::split_data_key(dkey) else {
                continue;
            };
            let Ok(bucket) = std::str::from_utf8(bucket) else {
                continue;
            };
            if object.siblings().is_empty() && object.context().is_empty() {
                continue;
            }
            match self
                .kv
                .merge_remote(bucket, key, object, Durability::Buffered, None)
                .await
            {
                Ok(true) => changed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(bucket, error = %e, "anti-entropy merge failed"),
            }
        }
        changed
    }

    /// The replica side of an exchange.
    pub(crate) async fn handle_ae_peer(&self, request: PeerRequest) -> PeerResponse {
        let ae = self.kv.ae();
        let partitions = self.ring().partitions();
        let bad_tree = |n: u8, p: u32| n == 0 || p >= partitions;
        let response = match request {
            PeerRequest::AeDigest {
                from,
                trees,
                digest,
            } => {
                // A sender that is not a member, or sees another placement, never matches and
                // goes on to compare roots, which says precisely what differs.
                let shared = self.shared_trees(&from);
                let same = self.peers.addr(&from).is_some()
                    && u32::try_from(shared.len()).ok() == Some(trees)
                    && self.roots_digest(&shared) == digest;
                if same {
                    PeerResponse::AeMatch(true)
                } else if self.ae_lease(&from) {
                    PeerResponse::AeMatch(false)
                } else {
                    PeerResponse::AeBusy
                }
            }
            PeerRequest::AeDone { from } => {
                self.ae_release(&from);
                PeerResponse::AeReleased
            }
            PeerRequest::AeRoots(roots) => {
                if roots.iter().any(|&(n, p, _)| bad_tree(n, p)) {
                    return refuse(format!(
                        "AeRoots names a tree outside 1..n, 0..{partitions}"
                    ));
                }
                PeerResponse::AeGroups(
                    roots
                        .into_iter()
                        .filter(|&(n, p, root)| ae.root((n, p)) != root)
                        .map(|(n, p, _)| (n, p, ae.groups((n, p))))
                        .collect(),
                )
            }
            PeerRequest::AeLeaves(asks) => {
                if asks
                    .iter()
                    .any(|&(n, p, g)| bad_tree(n, p) || usize::from(g) >= FANOUT)
                {
                    return refuse("AeLeaves names a tree or group out of range".into());
                }
                PeerResponse::AeLeafHashes(
                    asks.into_iter()
                        .map(|(n, p, g)| (n, p, g, ae.leaves((n, p), g)))
                        .collect(),
                )
            }
            PeerRequest::AeKeys(asks) => {
                if asks.iter().any(|&(n, p, _)| bad_tree(n, p)) {
                    return refuse("AeKeys names a tree out of range".into());
                }
                let mut lists = Vec::with_capacity(asks.len());
                for (n, p, leaf) in asks {
                    match ae.leaf_keys(self.kv.store(), (n, p), leaf, AE_LEAF_KEYS_MAX) {
                        Ok(keys) => lists.push((n, p, leaf, keys)),
                        Err(e) => return refuse(format!("node {}: {e}", self.me())),
                    }
                }
                PeerResponse::AeKeyLists(lists)
            }
            PeerRequest::AeFetch(dkeys) => match self.kv.objects(&dkeys) {
                Ok(objects) => PeerResponse::AeObjects(objects),
                Err(e) => refuse(e.to_string()),
            },
            PeerRequest::AePush(objects) => PeerResponse::AePushed(self.ae_merge(&objects).await),
            other => refuse(format!("not an anti-entropy request: {other:?}")),
        };
        ae.metrics()
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
