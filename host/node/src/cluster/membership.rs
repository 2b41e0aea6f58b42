//! Membership changes (Dynamo §4.8-4.9, Riak's staged `cluster join/leave/plan/commit`):
//! the admin requests, the join handshake with a seed, applying a ring that gossip brought,
//! and ownership handoff.
//!
//! Members and the committed ring are part of the cluster metadata (`quiver_core::meta`,
//! `quiver_core::membership`), so they spread like bucket properties: pushed to every peer
//! on a change and pulled by gossip. A node applies whatever ring its metadata holds.
//!
//! Handoff is driven by the old holder of a replica: every pass offers each tree this node
//! holds but no longer replicates to the partition's current primaries and drops what all
//! of them hold. The rules are `quiver_node_core::handoff` (shared with the simulator);
//! this module drives a pass (awaits each call, lists trees on the blocking pool) and makes
//! a received push durable before answering. All state is on disk (the orphaned records
//! themselves), so a crash of either side just resumes; the pass size is bounded by
//! `--ae-max-keys`.
//!
//! A node that was told to leave exits once the committed ring no longer has it, it holds
//! no keys and no hints, and every peer took the news that it left (checked once more just
//! before it stops).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use quiver_core::membership::{
    MemberEntry, MemberState, MembershipError, RingEntry, replica_moves, staged_ring,
};
use quiver_core::meta::MetaState;
use quiver_core::ring::{ClaimParams, Ring};
use quiver_sdk::wire::{ErrorCode, ErrorReply, PlanMember, PlanView, Response};

use super::{Cluster, error};
use crate::peer::{PeerRequest, PeerResponse};
use quiver_node_core::ae::TreeId;
use quiver_node_core::broken::Broken;
use quiver_node_core::handoff::{self, Answer, HandoffPass, HandoffRequest, Step};
use quiver_node_core::membership::{self as node_membership, DepartStep};

/// Membership settings of a node.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// Time between gossip rounds (metadata pulls from random peers).
    pub gossip_interval: std::time::Duration,
    /// Time between handoff passes.
    pub handoff_interval: std::time::Duration,
    /// This node's weight when it joins a cluster.
    pub weight: u32,
    /// This node's zone when it joins a cluster.
    pub zone: Option<String>,
}

/// Handoff counters since the node started.
#[derive(Debug, Default)]
pub struct HandoffMetrics {
    /// Keys pushed that changed their new owner.
    pub keys_sent: std::sync::atomic::AtomicU64,
    /// Keys dropped here after every new owner held them.
    pub keys_dropped: std::sync::atomic::AtomicU64,
}

fn refused(message: String) -> Response {
    error(ErrorCode::Membership, message)
}

fn peer_refused(message: String) -> PeerResponse {
    PeerResponse::Error(ErrorReply {
        code: ErrorCode::Membership,
        message,
    })
}

/// The membership every node of a cluster started from the same `--peer` list derives alike
/// (node-core's `first_membership` over these addresses).
pub fn first_membership(
    addrs: &BTreeMap<String, SocketAddr>,
    params: ClaimParams,
) -> Result<(MetaState, Ring), quiver_core::ring::RingError> {
    node_membership::first_membership(
        addrs
            .iter()
            .map(|(id, addr)| (id.clone(), addr.to_string())),
        params,
    )
}

impl Cluster {
    /// Makes the ring and peer list follow the metadata (after a merge changed members or
    /// the ring).
    pub(crate) fn apply_membership(&self) {
        let state = self.meta.state();
        let current = self.ring();
        if let Some(entry) = &state.ring
            && entry.ring.partitions() != current.partitions()
        {
            tracing::error!(
                theirs = entry.ring.partitions(),
                ours = current.partitions(),
                "ignoring a ring with another partition count"
            );
        }
        if let Some(ring) = node_membership::ring_to_apply(&state, &current) {
            tracing::info!(
                from = current.version(),
                to = ring.version(),
                "ring changed"
            );
            *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring.clone());
        }
        let addrs: HashMap<String, SocketAddr> = node_membership::peers(&state, self.me())
            .into_iter()
            .filter_map(|(id, addr)| match addr.parse() {
                Ok(parsed) => Some((id, parsed)),
                Err(_) => {
                    tracing::warn!(member = id, addr, "member address unreadable");
                    None
                }
            })
            .collect();
        self.peers.set_members(addrs);
    }

    /// Stores `incoming` (member entries, a ring) as a local change and pushes it to every
    /// peer.
    async fn change_membership(self: &Arc<Self>, incoming: MetaState) -> Result<(), String> {
        self.take_meta(&incoming, &[]).await?;
        let (_, pending) = self.push_meta(Vec::new()).await;
        if !pending.is_empty() {
            tracing::info!(
                ?pending,
                "membership change not pushed everywhere; gossip will"
            );
        }
        Ok(())
    }

    /// `quiver cluster join SEED`, answered by the joining node.
    pub(super) async fn cluster_join(self: &Arc<Self>, seed: &str) -> Response {
        let Ok(seed_addr) = seed.parse::<SocketAddr>() else {
            return error(
                ErrorCode::MalformedRequest,
                format!("seed {seed:?} is not an IP:port address"),
            );
        };
        let state = self.meta.state();
        let others: Vec<&String> = state
            .members
            .iter()
            .filter(|(id, e)| id.as_str() != self.me() && e.state != MemberState::Left)
            .map(|(id, _)| id)
            .collect();
        if !others.is_empty() {
            return refused(format!(
                "node {} is already in a cluster with {others:?}; only a node started without \
                 --peer can join another",
                self.me()
            ));
        }
        let keys = self.kv.ae().keys();
        if keys > 0 {
            return refused(format!(
                "node {} holds {keys} keys; only an empty node can join a cluster (start it \
                 on a new data directory)",
                self.me()
            ));
        }
        let Some(mine) = state.members.get(self.me()) else {
            return error(
                ErrorCode::Internal,
                format!("node {} has no member entry of its own", self.me()),
            );
        };
        let entry = MemberEntry {
            weight: self.config.membership.weight,
            zone: self.config.membership.zone.clone(),
            addr: self.peers.local_addr().to_string(),
            ..mine.with_state(MemberState::Joining, self.stamp())
        };
        let request = PeerRequest::Join {
            node: self.me().to_string(),
            entry,
            partitions: self.ring().partitions(),
            quorum: self.quorum_defaults(),
        };
        let cluster_state = match self.peers.call_addr(seed_addr, &request).await {
            Ok(PeerResponse::Joined(state)) => *state,
            Ok(other) => {
                return error(
                    ErrorCode::Internal,
                    format!("seed {seed}: unexpected reply {other:?}"),
                );
            }
            Err(e) => return refused(format!("seed {seed}: {e}")),
        };
        if let Err(e) = self.meta.adopt_membership(&cluster_state).await {
            return error(ErrorCode::Storage, format!("node {}: {e}", self.me()));
        }
        self.apply_membership();
        self.refresh_views();
        tracing::info!(
            seed,
            "joined; the join takes effect with `quiver cluster commit`"
        );
        self.plan_response(false)
    }

    /// The seed's side of a join.
    pub(super) async fn handle_join(
        self: &Arc<Self>,
        node: String,
        mut entry: MemberEntry,
        partitions: u32,
        quorum: (u8, u8, u8),
    ) -> PeerResponse {
        let (n, r, w) = self.quorum_defaults();
        if quorum != (n, r, w) {
            let (jn, jr, jw) = quorum;
            return peer_refused(format!(
                "the cluster uses n={n} r={r} w={w} but {node} uses n={jn} r={jr} w={jw}: \
                 start {node} with --n {n} --r {r} --w {w} (a node started alone defaults \
                 to n=1)"
            ));
        }
        let ours = self.ring().partitions();
        if partitions != ours {
            return peer_refused(format!(
                "node {} has {ours} partitions, {node} has {partitions}: start it with \
                 --partitions {ours}",
                self.me()
            ));
        }
        if entry.addr.parse::<SocketAddr>().is_err() || entry.weight == 0 || node.is_empty() {
            return peer_refused(format!(
                "join of {node:?}: bad address {:?} or weight {}",
                entry.addr, entry.weight
            ));
        }
        let state = self.meta.state();
        let mut version = entry.version;
        if let Some(existing) = state.members.get(&node) {
            let active = matches!(existing.state, MemberState::Valid | MemberState::Leaving);
            if active && existing.addr != entry.addr {
                return peer_refused(format!(
                    "a member named {node} already exists at {}; pick another --node-id",
                    existing.addr
                ));
            }
            if active {
                // A member asking again (it lost its answer): it gets the state as it is.
                return PeerResponse::Joined(Box::new(state));
            }
            version = version.max(existing.version);
        }
        entry.version = version.saturating_add(1);
        entry.stamp = self.stamp();
        entry.state = MemberState::Joining;
        let incoming = MetaState {
            members: BTreeMap::from([(node.clone(), entry)]),
            ..MetaState::default()
        };
        if let Err(e) = self.change_membership(incoming).await {
            return PeerResponse::Error(ErrorReply {
                code: ErrorCode::Storage,
                message: format!("node {}: {e}", self.me()),
            });
        }
        tracing::info!(node, "join staged");
        PeerResponse::Joined(Box::new(self.meta.state()))
    }

    /// `quiver cluster leave [NODE]`.
    pub(super) async fn cluster_leave(self: &Arc<Self>, node: Option<String>) -> Response {
        let node = node.unwrap_or_else(|| self.me().to_string());
        let state = self.meta.state();
        let Some(existing) = state.members.get(&node) else {
            return refused(MembershipError::UnknownMember(node).to_string());
        };
        let next_state = match existing.state {
            // Leaving before the join was committed just cancels the join.
            MemberState::Joining => MemberState::Left,
            MemberState::Valid | MemberState::Leaving => MemberState::Leaving,
            MemberState::Left => {
                return refused(format!("member {node:?} has already left"));
            }
        };
        let mut members = state.members.clone();
        let entry = existing.with_state(next_state, self.stamp());
        members.insert(node.clone(), entry.clone());
        if let Err(e) = staged_ring(&self.ring(), &members) {
            return refused(e.to_string());
        }
        let incoming = MetaState {
            members: BTreeMap::from([(node.clone(), entry)]),
            ..MetaState::default()
        };
        if let Err(e) = self.change_membership(incoming).await {
            return error(ErrorCode::Storage, format!("node {}: {e}", self.me()));
        }
        self.plan_response(false)
    }

    /// `quiver cluster commit`: rebalance the ring for the staged members.
    pub(super) async fn cluster_commit(self: &Arc<Self>) -> Response {
        let state = self.meta.state();
        let current = self.ring();
        let next = match staged_ring(&current, &state.members) {
            Ok(Some(next)) => next,
            Ok(None) => return refused(MembershipError::NothingStaged.to_string()),
            Err(e) => return refused(e.to_string()),
        };
        let stamp = self.stamp();
        let members: BTreeMap<String, MemberEntry> = state
            .members
            .iter()
            .filter(|(_, e)| e.state == MemberState::Joining)
            .map(|(id, e)| (id.clone(), e.with_state(MemberState::Valid, stamp.clone())))
            .collect();
        let incoming = MetaState {
            members,
            ring: Some(RingEntry {
                ring: next.clone(),
                stamp,
            }),
            ..MetaState::default()
        };
        if let Err(e) = self.change_membership(incoming).await {
            return error(ErrorCode::Storage, format!("node {}: {e}", self.me()));
        }
        tracing::info!(version = next.version(), "ring committed");
        match self.plan_view(&current, Some(&next), true) {
            Ok(view) => Response::Plan(Box::new(view)),
            Err(e) => error(ErrorCode::Internal, e),
        }
    }

    /// This node's default `(n, r, w)`.
    fn quorum_defaults(&self) -> (u8, u8, u8) {
        let q = self.config.quorum;
        let byte = |v: usize| u8::try_from(v).unwrap_or(u8::MAX);
        (byte(q.n), byte(q.r), byte(q.w))
    }

    /// The staged plan as a response.
    pub(super) fn plan_response(&self, committed: bool) -> Response {
        let current = self.ring();
        let next = match staged_ring(&current, &self.meta.state().members) {
            Ok(next) => next,
            Err(e) => return refused(e.to_string()),
        };
        match self.plan_view(&current, next.as_ref(), committed) {
            Ok(view) => Response::Plan(Box::new(view)),
            Err(e) => error(ErrorCode::Internal, e),
        }
    }

    /// What moving from `current` to `next` does, with key counts estimated from this
    /// node's trees of the default replication factor.
    fn plan_view(
        &self,
        current: &Ring,
        next: Option<&Ring>,
        committed: bool,
    ) -> Result<PlanView, String> {
        let n = self.config.quorum.n;
        let default_n = u8::try_from(n).unwrap_or(u8::MAX);
        let ae = self.kv.ae();
        // Exact for the partitions this node replicates (even when empty), the mean of those
        // for the others.
        let known: Vec<Option<u64>> = (0..current.partitions())
            .map(|p| {
                let replica = current
                    .preference_list(p, n)
                    .is_ok_and(|l| l.primaries.iter().any(|m| m.id == self.me()));
                replica.then(|| ae.tree_keys((default_n, p)))
            })
            .collect();
        let held: Vec<u64> = known.iter().flatten().copied().collect();
        let mean = if held.is_empty() {
            0
        } else {
            held.iter().sum::<u64>() / held.len() as u64
        };
        let estimate = |p: u32| known.get(p as usize).copied().flatten().unwrap_or(mean);
        let keys_estimated: u64 = (0..current.partitions()).map(estimate).sum();
        let state = self.meta.state();
        let mut members: BTreeMap<String, PlanMember> = state
            .members
            .iter()
            .filter(|(_, e)| e.state != MemberState::Left)
            .map(|(id, e)| {
                let owned_now = current.partitions_of(id).len() as u32;
                let owned_next = next.map_or(owned_now, |r| r.partitions_of(id).len() as u32);
                (
                    id.clone(),
                    PlanMember {
                        node: id.clone(),
                        addr: e.addr.clone(),
                        state: e.state.as_str().to_string(),
                        owned_now,
                        owned_next,
                        replicas_gained: 0,
                        replicas_lost: 0,
                        keys_in: 0,
                        keys_out: 0,
                    },
                )
            })
            .collect();
        let mut transfers = Vec::new();
        let mut copies_moved = 0;
        if let Some(next) = next {
            let diff = current.diff(next).map_err(|e| e.to_string())?;
            transfers = diff
                .flows()
                .into_iter()
                .map(|((from, to), count)| (from.to_string(), to.to_string(), count))
                .collect();
            for m in replica_moves(current, next, n).map_err(|e| e.to_string())? {
                let keys = estimate(m.partition);
                for id in &m.gained {
                    copies_moved += keys;
                    if let Some(pm) = members.get_mut(id) {
                        pm.replicas_gained += 1;
                        pm.keys_in += keys;
                    }
                }
                for id in &m.lost {
                    if let Some(pm) = members.get_mut(id) {
                        pm.replicas_lost += 1;
                        pm.keys_out += keys;
                    }
                }
            }
        }
        Ok(PlanView {
            node: self.me().to_string(),
            ring_version: current.version(),
            next_version: next.map(Ring::version),
            committed,
            members: members.into_values().collect(),
            transfers,
            keys_estimated,
            copies_moved,
            copies_total: keys_estimated * n as u64,
        })
    }

    /// Trees this node holds keys in but does not replicate under `ring`, with the
    /// partition's primaries there.
    pub(crate) fn handoff_trees(&self, ring: &Ring) -> Vec<(TreeId, Vec<String>)> {
        handoff::orphaned_trees(&self.kv, ring, self.me())
    }

    /// One handoff pass: node-core's [`HandoffPass`] offers every orphaned tree to its
    /// primaries, up to `max_keys` pushed keys; this drives it (lists trees on the blocking
    /// pool, awaits each call). Then, on a leaving node with nothing left, departs.
    pub async fn handoff_tick(self: &Arc<Self>, max_keys: usize) {
        self.forget_hints_for_departed().await;
        // The whole pass works on one ring: its primaries, and the check before any drop.
        let ring = self.ring();
        let mut pass = HandoffPass::start(&self.kv, self.me(), &ring, max_keys, Broken::NONE);
        let current_ring = || self.ring().id();
        let is_up = |p: &str| self.peers.is_up(p);
        let owners = || self.peers.names();
        let env = handoff::Env {
            replica: &self.kv,
            ring: &current_ring,
            is_up: &is_up,
            owners: &owners,
        };
        let mut step = pass.next(&env);
        loop {
            step = match step {
                Step::List(listing) => {
                    // Listing a tree's keys scans storage.
                    let kv = Arc::clone(&self.kv);
                    let listed = tokio::task::spawn_blocking(move || listing.run(&kv))
                        .await
                        .map_err(|e| format!("listing leaves did not finish: {e}"))
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    pass.on_listed(&env, listed)
                }
                Step::Call { peer, request } => {
                    let answer = self
                        .peers
                        .call_untracked(&peer, &PeerRequest::from(request))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(PeerResponse::into_handoff);
                    pass.on_response(&env, answer)
                }
                Step::Post { peer, request } => {
                    // Only a broken variant posts, and the server runs none.
                    let _ = self
                        .peers
                        .call_untracked(&peer, &PeerRequest::from(request))
                        .await;
                    pass.next(&env)
                }
                Step::Tree(report) => {
                    let (n, partition) = report.tree;
                    let (sent, dropped) = (report.sent, report.dropped);
                    let metrics = &self.handoff_metrics;
                    metrics.keys_sent.fetch_add(sent, Ordering::Relaxed);
                    metrics.keys_dropped.fetch_add(dropped, Ordering::Relaxed);
                    match report.error {
                        Some(e) => tracing::debug!(n, partition, error = %e, "handoff failed"),
                        None if sent + dropped > 0 => {
                            tracing::info!(n, partition, sent, dropped, "handoff")
                        }
                        None => {}
                    }
                    pass.next(&env)
                }
                Step::Done => break,
            };
        }
        self.depart_if_done().await;
    }

    /// The receiving side of a handoff step: node-core answers it (same ring only); a
    /// merged push is made durable here before the answer goes out.
    pub(super) async fn handle_handoff(&self, request: HandoffRequest) -> PeerResponse {
        let ring = self.ring();
        match handoff::answer(&self.kv, self.me(), &ring, Broken::NONE, request) {
            Answer::Reply(response) => PeerResponse::from(response),
            Answer::SyncThenStored(changed) => match self.kv.store().sync_applied().await {
                Ok(()) => PeerResponse::HandoffStored(changed),
                Err(e) => PeerResponse::Error(ErrorReply {
                    code: ErrorCode::Storage,
                    message: format!("node {}: {e}", self.me()),
                }),
            },
        }
    }

    /// A leaving node that owns nothing and holds nothing marks itself left and tells every
    /// peer; once all took the news, and it still holds nothing, the server stops.
    ///
    /// Every peer must know (not just one): a peer that took the news alone could leave too
    /// before gossiping it, and the rest would wait for this node forever. And the check is
    /// made again after telling them: a coordinator still on an older ring may have stored a
    /// key here meanwhile, which must be handed off first (the next passes do).
    async fn depart_if_done(self: &Arc<Self>) {
        let holds_nothing = || self.kv.ae().keys() == 0 && self.kv.hint_count() == 0;
        let done = || {
            node_membership::done_leaving(
                &self.meta.state(),
                &self.ring(),
                self.me(),
                holds_nothing(),
            )
        };
        if !done() {
            return;
        }
        if let Some(change) =
            node_membership::left_change(&self.meta.state(), self.me(), self.stamp())
            && let Err(e) = self.take_meta(&change, &[]).await
        {
            tracing::error!(error = %e, "cannot record leaving");
            return;
        }
        let (told, untold) = self.push_meta(Vec::new()).await;
        // `told` lists this node too.
        let told_peers = told.len().saturating_sub(1);
        let mut departure =
            node_membership::Departure::new(told_peers + untold.len(), Broken::NONE);
        let answers =
            std::iter::repeat_n(true, told_peers).chain(std::iter::repeat_n(false, untold.len()));
        let step = answers.fold(departure.step(), |_, told| departure.on_answer(told));
        match step {
            DepartStep::Stop { recheck } if recheck && !done() => {
                tracing::info!("a write landed while leaving; handing it off first");
            }
            DepartStep::Stop { .. } => {
                tracing::info!(
                    told = told_peers,
                    "handoff complete; this node left the cluster"
                );
                self.departed.notify_one();
            }
            DepartStep::Wait | DepartStep::Retry => {
                tracing::warn!(
                    ?untold,
                    "left, but not every peer took the news yet; retrying"
                );
            }
        }
    }

    /// Hints held for members that left can never be delivered: the markers go, the copies
    /// stay and reach the key's replicas by handoff (they are orphaned here unless this node
    /// is a replica).
    async fn forget_hints_for_departed(&self) {
        let hinted = match node_membership::departed_hints(
            &self.kv,
            &self.meta.state(),
            self.me(),
            Broken::NONE,
        ) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot read hints");
                return;
            }
        };
        for (owner, h) in hinted {
            if let Err(e) = self
                .kv
                .hint_delivered(&owner, &h.bucket, &h.key, &h.object, true)
                .await
            {
                tracing::error!(owner, error = %e, "cannot drop a hint for a departed node");
            }
        }
    }

    /// Notified once this node has left the cluster (the server then stops).
    pub fn departed(&self) -> &tokio::sync::Notify {
        &self.departed
    }

    /// Gossip partners of one round: a random peer that is up (two in clusters of more than
    /// five), so every change reaches all nodes in O(log n) rounds.
    pub(crate) fn gossip_targets(&self) -> Vec<String> {
        use rand::Rng;
        let mut rng = rand::rng();
        node_membership::gossip_targets(&self.peers.up_names(), |n| rng.random_range(0..n))
    }
}
