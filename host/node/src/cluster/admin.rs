//! Runtime bucket properties and reconciler plugins: the admin requests, the per-bucket
//! view every request reads, and the spreading of cluster metadata between nodes.

use std::collections::HashMap;
use std::sync::Arc;

use quiver_core::limits::{PLUGIN_BYTES_MAX, SIBLING_THRESHOLD_DEFAULT};
use quiver_core::meta::{
    BucketEntry, BucketSpec, MetaState, PluginInfo, PluginRef, Stamp, content_hash,
};
use quiver_sdk::wire::{BucketInfo, ErrorCode, Response};

use super::{BucketProps, Cluster, error, now_ms};
use crate::peer::{PeerRequest, PeerResponse};
use crate::plugins::{Attached, CallLimits};

/// Longest plugin name.
const PLUGIN_NAME_CHARS_MAX: usize = 64;

/// What a request needs to know about its bucket, resolved once per metadata change.
#[derive(Debug, Clone)]
pub struct BucketView {
    /// Replication properties in force.
    pub props: BucketProps,
    /// The attached reconciler, when the bucket has one and this node has loaded it.
    pub reconciler: Option<Attached>,
    /// The reconciler guard's sibling threshold.
    pub sibling_threshold: u32,
    /// The runtime entry, if `quiver bucket set` touched the bucket.
    pub entry: Option<BucketEntry>,
}

/// Buckets with runtime properties.
pub(crate) type BucketViews = HashMap<String, Arc<BucketView>>;

fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= PLUGIN_NAME_CHARS_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Most buckets with runtime properties a cluster holds.
pub const BUCKETS_MAX: usize = 10_000;
/// Most plugin versions a cluster holds.
pub const PLUGIN_VERSIONS_MAX: usize = 1_000;

impl Cluster {
    /// A bucket's plugin limits within this node's caps: a bucket set on a node with higher
    /// caps runs within this node's here.
    fn capped(&self, limits: CallLimits) -> CallLimits {
        let caps = &self.config.client_limits;
        CallLimits {
            fuel: Some(
                limits
                    .fuel
                    .map_or(caps.plugin_fuel_max, |f| f.min(caps.plugin_fuel_max)),
            ),
            memory_bytes: Some(
                limits
                    .memory_bytes
                    .map_or(caps.plugin_memory_bytes_max, |m| {
                        m.min(caps.plugin_memory_bytes_max)
                    }),
            ),
            output_bytes: Some(
                limits
                    .output_bytes
                    .map_or(caps.plugin_output_bytes_max, |o| {
                        o.min(caps.plugin_output_bytes_max)
                    }),
            ),
        }
    }

    /// The refusal of bucket plugin limits above this node's caps.
    fn over_plugin_caps(&self, bucket: &str, spec: &BucketSpec) -> Option<Response> {
        let caps = &self.config.client_limits;
        let checks = [
            (
                "plugin fuel",
                spec.plugin_fuel,
                caps.plugin_fuel_max,
                "--plugin-fuel-max",
            ),
            (
                "plugin memory",
                spec.plugin_memory_bytes,
                caps.plugin_memory_bytes_max,
                "--plugin-memory-bytes-max",
            ),
            (
                "plugin output",
                spec.plugin_output_bytes,
                caps.plugin_output_bytes_max,
                "--plugin-output-bytes-max",
            ),
        ];
        checks.into_iter().find_map(|(what, asked, cap, flag)| {
            asked.filter(|&a| a > cap).map(|a| {
                error(
                    ErrorCode::LimitExceeded,
                    format!(
                        "bucket {bucket:?}: {what} {a} is above node {}'s cap of {cap} ({flag})",
                        self.me()
                    ),
                )
            })
        })
    }

    pub(super) fn stamp(&self) -> Stamp {
        Stamp {
            timestamp_ms: now_ms(),
            node: self.me().to_string(),
        }
    }

    /// The runtime view of `bucket`, if it has runtime properties.
    pub(crate) fn view(&self, bucket: &str) -> Option<Arc<BucketView>> {
        let views = self.views.read().unwrap_or_else(|p| p.into_inner());
        views.get(bucket).cloned()
    }

    /// Effective properties of a bucket from its runtime spec over the configuration.
    fn effective(&self, bucket: &str, spec: &BucketSpec) -> Result<BucketProps, String> {
        quiver_node_core::buckets::effective(self.config_props(bucket), spec)
    }

    /// Rebuilds every bucket view from the metadata (after a change, and at start),
    /// loading reconcilers whose bytes are here.
    pub(crate) fn refresh_views(&self) {
        let state = self.meta.state();
        self.refresh_keys(&state);
        let mut views = BucketViews::new();
        for (bucket, entry) in &state.buckets {
            let props = match self.effective(bucket, &entry.spec) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(bucket, error = %e, "invalid bucket properties ignored");
                    self.config_props(bucket)
                }
            };
            let reconciler = entry.spec.reconciler.as_ref().and_then(|plugin| {
                let loaded = self
                    .plugins
                    .get_or_load(plugin, || self.meta.blob(&plugin.hash).ok().flatten());
                match loaded {
                    Ok(Some(reconciler)) => Some(Attached {
                        plugin: plugin.clone(),
                        reconciler,
                        limits: self.capped(CallLimits {
                            fuel: entry.spec.plugin_fuel,
                            memory_bytes: entry.spec.plugin_memory_bytes,
                            output_bytes: entry.spec.plugin_output_bytes,
                        }),
                        failures: self.plugins.failure_counter(),
                        pool: self.plugins.pool(),
                    }),
                    Ok(None) => {
                        tracing::warn!(bucket, %plugin, "reconciler bytes not here yet");
                        None
                    }
                    Err(e) => {
                        tracing::error!(bucket, %plugin, error = %e, "cannot load reconciler");
                        None
                    }
                }
            });
            views.insert(
                bucket.clone(),
                Arc::new(BucketView {
                    props,
                    reconciler,
                    sibling_threshold: entry
                        .spec
                        .sibling_threshold
                        .unwrap_or(SIBLING_THRESHOLD_DEFAULT),
                    entry: Some(entry.clone()),
                }),
            );
        }
        let own = self
            .config
            .buckets
            .iter()
            .map(|(b, props)| (b.clone(), props.quorum.n))
            .chain(views.iter().map(|(b, v)| (b.clone(), v.props.quorum.n)));
        let placement = quiver_node_core::buckets::placement(
            self.ring().partitions(),
            self.config.quorum.n,
            own,
        );
        *self.views.write().unwrap_or_else(|p| p.into_inner()) = views;
        if self.kv.ae().set_placement(placement) {
            self.ae_refile_pending
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Merges metadata from elsewhere, stores it and refreshes the views if it changed.
    pub(super) async fn take_meta(
        &self,
        state: &MetaState,
        blobs: &[(String, Vec<u8>)],
    ) -> Result<(), String> {
        let changes = self
            .meta
            .merge(state, blobs)
            .await
            .map_err(|e| e.to_string())?;
        if !changes.members.is_empty() || changes.ring {
            self.apply_membership();
        }
        if !changes.is_empty() || !blobs.is_empty() {
            if !changes.is_empty() {
                tracing::info!(
                    buckets = ?changes.buckets,
                    plugins = changes.plugins.len(),
                    "cluster metadata updated"
                );
            }
            self.refresh_views();
        }
        Ok(())
    }

    /// Sends this node's metadata (and `blobs`) to every peer at once. Returns the peers
    /// that took it and those that did not (they catch up by the periodic pull).
    pub(super) async fn push_meta(
        self: &Arc<Self>,
        blobs: Vec<(String, Vec<u8>)>,
    ) -> (Vec<String>, Vec<String>) {
        let blob_bytes: u64 = blobs.iter().map(|(_, b)| b.len() as u64).sum();
        let deadline = self.peers.transfer_deadline(blob_bytes);
        let req = Arc::new(PeerRequest::MetaPush {
            state: self.meta.state(),
            blobs,
        });
        let mut calls = tokio::task::JoinSet::new();
        for peer in self.peers.names() {
            let (this, req) = (Arc::clone(self), Arc::clone(&req));
            calls.spawn(async move {
                let result = this.peers.call_within(&peer, &req, deadline).await;
                (peer, result)
            });
        }
        let mut done = vec![self.me().to_string()];
        let mut pending = Vec::new();
        while let Some(joined) = calls.join_next().await {
            let Ok((peer, result)) = joined else { continue };
            match result {
                Ok(PeerResponse::Stored) => done.push(peer),
                Ok(other) => {
                    tracing::warn!(peer, reply = ?other, "metadata push refused");
                    pending.push(peer);
                }
                Err(e) => {
                    tracing::warn!(peer, error = %e, "metadata push failed");
                    pending.push(peer);
                }
            }
        }
        done.sort();
        pending.sort();
        (done, pending)
    }

    /// One gossip round: asks a random peer that is up (two in clusters of more than five)
    /// whether its metadata differs, merges what differs and fetches plugin bytes this node
    /// lacks.
    pub async fn sync_meta(&self) {
        for peer in self.gossip_targets() {
            let question = quiver_node_core::membership::digest_request(&self.meta.state());
            let state = match self.peers.call_untracked(&peer, &question).await {
                Ok(PeerResponse::MetaSame) => None,
                Ok(PeerResponse::Meta(state)) => Some(state),
                Ok(other) => {
                    tracing::debug!(peer, reply = ?other, "unexpected metadata reply");
                    continue;
                }
                Err(_) => continue,
            };
            if let Some(state) = state {
                if let Err(e) = self.take_meta(&state, &[]).await {
                    tracing::error!(peer, error = %e, "cannot store cluster metadata");
                    continue;
                }
                // The peer lacks part of this node's state: push it back (pulls alone never
                // spread a change held only by a node nobody pulls from).
                let mine = self.meta.state();
                if quiver_node_core::membership::push_back(&mine, &state) {
                    let push = PeerRequest::MetaPush {
                        state: mine,
                        blobs: Vec::new(),
                    };
                    if let Err(e) = self.peers.call_untracked(&peer, &push).await {
                        tracing::debug!(peer, error = %e, "metadata push-back failed");
                    }
                }
            }
            // One plugin per request, with a deadline that fits its size: several large
            // (interpreter-carrying) plugins in one reply could outgrow any frame limit.
            let state = self.meta.state();
            for hash in self.meta.missing_blobs() {
                let size = state
                    .plugins
                    .values()
                    .find(|p| p.plugin.hash == hash)
                    .map_or(quiver_core::limits::PLUGIN_BYTES_MAX as u64, |p| p.size);
                let reply = self
                    .peers
                    .call_untracked_within(
                        &peer,
                        &PeerRequest::MetaBlobs(vec![hash]),
                        self.peers.transfer_deadline(size),
                    )
                    .await;
                if let Ok(PeerResponse::Blobs(blobs)) = reply
                    && !blobs.is_empty()
                    && let Err(e) = self.take_meta(&MetaState::default(), &blobs).await
                {
                    tracing::error!(peer, error = %e, "cannot store plugin bytes");
                }
            }
        }
    }

    /// A peer pushed its metadata (and plugin bytes): merge them here.
    pub(super) async fn handle_meta_push(
        &self,
        state: &MetaState,
        blobs: &[(String, Vec<u8>)],
    ) -> PeerResponse {
        match self.take_meta(state, blobs).await {
            Ok(()) => PeerResponse::Stored,
            Err(e) => PeerResponse::Error(quiver_sdk::wire::ErrorReply {
                code: ErrorCode::Storage,
                message: format!("node {}: {e}", self.me()),
            }),
        }
    }

    /// The bytes of the plugin versions a peer asked for that this node holds.
    pub(super) fn handle_meta_blobs(&self, hashes: Vec<String>) -> PeerResponse {
        PeerResponse::Blobs(
            hashes
                .into_iter()
                .filter_map(|h| match self.meta.blob(&h) {
                    Ok(Some(bytes)) => Some((h, bytes)),
                    _ => None,
                })
                .collect(),
        )
    }

    /// `quiver plugin upload`.
    pub(super) async fn plugin_upload(
        self: &Arc<Self>,
        name: String,
        component: Vec<u8>,
        force: bool,
    ) -> Response {
        if !valid_plugin_name(&name) {
            return error(
                ErrorCode::PluginRejected,
                format!(
                    "plugin name {name:?} is invalid: use 1 to {PLUGIN_NAME_CHARS_MAX} letters, digits, '-' or '_'"
                ),
            );
        }
        if component.len() > PLUGIN_BYTES_MAX {
            return error(
                ErrorCode::PluginRejected,
                format!(
                    "plugin {name}: {} bytes exceed the {PLUGIN_BYTES_MAX}-byte limit",
                    component.len()
                ),
            );
        }
        let Some(engine) = self.plugins.engine().cloned() else {
            return error(
                ErrorCode::PluginRejected,
                format!("node {}: plugins are disabled on this node", self.me()),
            );
        };
        let state = self.meta.state();
        if state
            .plugins_deleted
            .keys()
            .any(|p| p.name == name && p.hash == content_hash(&component))
        {
            return error(
                ErrorCode::PluginRejected,
                format!(
                    "plugin {name}: this version was deleted, which is final; upload it under \
                     another name or change the component"
                ),
            );
        }
        let listed = state.plugins.len();
        if listed >= PLUGIN_VERSIONS_MAX {
            return error(
                ErrorCode::LimitExceeded,
                format!("plugin {name}: the cluster holds {listed} plugin versions, the limit"),
            );
        }
        let plugin = PluginRef {
            name: name.clone(),
            hash: content_hash(&component),
        };
        // Compiling and checking laws takes milliseconds to seconds: off the async threads.
        let (engine_plugin, bytes) = (plugin.clone(), component.clone());
        let loaded =
            tokio::task::spawn_blocking(move || engine.load(&engine_plugin, &bytes, true)).await;
        let loaded = match loaded {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                return error(ErrorCode::PluginRejected, format!("plugin {plugin}: {e}"));
            }
            Err(e) => return error(ErrorCode::Internal, format!("plugin {plugin}: {e}")),
        };
        if !loaded.violations.is_empty() && !force {
            return error(
                ErrorCode::PluginRejected,
                format!(
                    "plugin {plugin} breaks the merge laws (upload with --force to store it anyway): {}",
                    loaded.violations.join("; ")
                ),
            );
        }
        self.plugins.insert(&plugin, Arc::clone(&loaded.reconciler));
        let info = PluginInfo {
            plugin: plugin.clone(),
            size: component.len() as u64,
            uploaded: self.stamp(),
            forced: !loaded.violations.is_empty(),
        };
        let incoming = MetaState {
            plugins: [(plugin.clone(), info)].into_iter().collect(),
            ..MetaState::default()
        };
        let blobs = vec![(plugin.hash.clone(), component)];
        if let Err(e) = self.take_meta(&incoming, &blobs).await {
            return error(ErrorCode::Storage, format!("plugin {plugin}: {e}"));
        }
        let info = self.meta.state().plugins.get(&plugin).cloned();
        let (replicated_to, pending) = self.push_meta(blobs).await;
        match info {
            Some(plugin) => Response::PluginUploaded {
                plugin: Box::new(plugin),
                violations: loaded.violations,
                replicated_to,
                pending,
            },
            None => error(ErrorCode::Internal, format!("plugin {plugin} vanished")),
        }
    }

    /// `quiver plugin delete NAME@HASH`.
    pub(super) async fn plugin_delete(self: &Arc<Self>, spec: &str) -> Response {
        if !spec.contains('@') {
            return error(
                ErrorCode::UnknownPlugin,
                format!("plugin delete needs NAME@HASH (a version), not {spec:?}"),
            );
        }
        let state = self.meta.state();
        let plugin = match state.resolve(spec) {
            Ok(p) => p,
            Err(e) => return error(ErrorCode::UnknownPlugin, e.to_string()),
        };
        let users: Vec<&String> = state
            .buckets
            .iter()
            .filter(|(_, e)| e.spec.reconciler.as_ref() == Some(&plugin))
            .map(|(b, _)| b)
            .collect();
        if !users.is_empty() {
            return error(
                ErrorCode::PluginInUse,
                format!(
                    "plugin {plugin} is attached to bucket(s) {users:?}; attach another version \
                     or detach it (`quiver bucket set BUCKET --detach-reconciler`) first"
                ),
            );
        }
        let info = state.plugins.get(&plugin).cloned();
        let incoming = MetaState {
            plugins_deleted: [(plugin.clone(), self.stamp())].into_iter().collect(),
            ..MetaState::default()
        };
        if let Err(e) = self.take_meta(&incoming, &[]).await {
            return error(ErrorCode::Storage, format!("plugin {plugin}: {e}"));
        }
        let (_, pending) = self.push_meta(Vec::new()).await;
        if !pending.is_empty() {
            tracing::info!(%plugin, ?pending, "plugin deletion spreads to these by gossip");
        }
        tracing::info!(%plugin, "plugin version deleted");
        Response::Plugins {
            versions: info.into_iter().collect(),
            buckets: Vec::new(),
        }
    }

    /// `quiver plugin list` (no name) and `quiver plugin show NAME`.
    pub(super) fn plugin_list(&self, name: Option<&str>) -> Response {
        let state = self.meta.state();
        let mut versions: Vec<PluginInfo> = state
            .plugins
            .values()
            .filter(|p| name.is_none_or(|n| p.plugin.name == n))
            .cloned()
            .collect();
        versions.sort_by(|a, b| (&a.plugin.name, &a.uploaded).cmp(&(&b.plugin.name, &b.uploaded)));
        if let Some(n) = name
            && versions.is_empty()
        {
            return error(ErrorCode::UnknownPlugin, format!("no plugin named {n:?}"));
        }
        let buckets = state
            .buckets
            .iter()
            .filter_map(|(b, e)| e.spec.reconciler.clone().map(|r| (b.clone(), r)))
            .filter(|(_, r)| name.is_none_or(|n| r.name == n))
            .collect();
        Response::Plugins { versions, buckets }
    }

    /// `quiver bucket set`.
    pub(super) async fn bucket_set(
        self: &Arc<Self>,
        bucket: String,
        changes: BucketSpec,
        reconciler: Option<String>,
        detach: bool,
    ) -> Response {
        if let Err(e) = self.kv.validate(&bucket, b"-") {
            return super::kv_error(&e);
        }
        let state = self.meta.state();
        let current = state
            .buckets
            .get(&bucket)
            .map(|e| e.spec.clone())
            .unwrap_or_default();
        let mut next = current.updated(&BucketSpec {
            reconciler: None,
            ..changes
        });
        match (reconciler, detach) {
            (Some(_), true) => {
                return error(
                    ErrorCode::MalformedRequest,
                    "give either a reconciler or detach it, not both".into(),
                );
            }
            (Some(spec), false) => match state.resolve(&spec) {
                Ok(plugin) => next.reconciler = Some(plugin),
                Err(e) => return error(ErrorCode::UnknownPlugin, e.to_string()),
            },
            (None, true) => next.reconciler = None,
            (None, false) => {}
        }
        if let Err(e) = self.effective(&bucket, &next) {
            return error(ErrorCode::InvalidQuorum, format!("bucket {bucket:?}: {e}"));
        }
        if let Some(refusal) = self.over_plugin_caps(&bucket, &next) {
            return refusal;
        }
        if !state.buckets.contains_key(&bucket) && state.buckets.len() >= BUCKETS_MAX {
            return error(
                ErrorCode::LimitExceeded,
                format!(
                    "bucket {bucket:?}: the cluster holds {} buckets with properties, the limit",
                    state.buckets.len()
                ),
            );
        }
        if next.sibling_threshold == Some(0) {
            return error(
                ErrorCode::MalformedRequest,
                format!("bucket {bucket:?}: sibling threshold must be at least 1"),
            );
        }
        let mut incoming = MetaState::default();
        incoming.set_bucket(&bucket, next, self.stamp());
        if let Err(e) = self.take_meta(&incoming, &[]).await {
            return error(ErrorCode::Storage, format!("bucket {bucket:?}: {e}"));
        }
        let (_, pending) = self.push_meta(Vec::new()).await;
        if !pending.is_empty() {
            tracing::warn!(bucket, ?pending, "bucket change not yet on every node");
        }
        self.bucket_show(&bucket)
    }

    /// `quiver bucket show`.
    pub(super) fn bucket_show(&self, bucket: &str) -> Response {
        if let Err(e) = self.kv.validate(bucket, b"-") {
            return super::kv_error(&e);
        }
        let view = self.view(bucket);
        let props = self.props(bucket);
        let entry = view.as_ref().and_then(|v| v.entry.clone());
        Response::Bucket(Box::new(BucketInfo {
            bucket: bucket.to_string(),
            spec: entry.as_ref().map(|e| e.spec.clone()).unwrap_or_default(),
            set_by: entry.map(|e| e.stamp),
            n: props.quorum.n as u8,
            r: props.quorum.r as u8,
            w: props.quorum.w as u8,
            sloppy_quorum: props.sloppy,
            sibling_threshold: view
                .as_ref()
                .map_or(SIBLING_THRESHOLD_DEFAULT, |v| v.sibling_threshold),
            reconciler_loaded: view.is_some_and(|v| v.reconciler.is_some()),
        }))
    }
}
