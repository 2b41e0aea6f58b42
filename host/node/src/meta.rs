//! This node's copy of the cluster metadata (`quiver_core::meta`): runtime bucket
//! properties, uploaded plugins, members and the committed ring, persisted in the node's
//! store so they survive restarts.
//!
//! Layout: the whole `MetaState` (small: names, hashes, properties, one ring) under the
//! metadata key `cluster-meta`, and each plugin's bytes under `plugin/<hash>`. Every change
//! is synced before it is acknowledged or passed on. Spreading it is `cluster.rs`'s job: a
//! change is pushed to every peer at once, and every node gossips with a random peer every
//! interval (digest first, the state only when digests differ), so a node that was down
//! catches up.

use std::sync::Mutex;

use quiver_core::meta::{MetaChanges, MetaState};
use quiver_core::storage::{StorageError, WriteBatch, keys};

use quiver_storage::Store;

/// Format tag of the stored state before membership was part of it (buckets and plugins).
const META_FORMAT_V1: u8 = 1;
/// Format tag of the stored state with members and ring.
const META_FORMAT_V2: u8 = 2;
/// Format tag of the stored state with access keys.
const META_FORMAT_V3: u8 = 3;

/// The state as format 1 stored it; read on upgrade, never written.
#[derive(serde::Deserialize)]
struct MetaStateV1 {
    buckets: std::collections::BTreeMap<String, quiver_core::meta::BucketEntry>,
    plugins:
        std::collections::BTreeMap<quiver_core::meta::PluginRef, quiver_core::meta::PluginInfo>,
}

/// The state as format 2 stored it (no access keys); read on upgrade, never written.
#[derive(serde::Deserialize)]
struct MetaStateV2 {
    buckets: std::collections::BTreeMap<String, quiver_core::meta::BucketEntry>,
    plugins:
        std::collections::BTreeMap<quiver_core::meta::PluginRef, quiver_core::meta::PluginInfo>,
    members: std::collections::BTreeMap<String, quiver_core::membership::MemberEntry>,
    ring: Option<quiver_core::membership::RingEntry>,
}
const STATE_KEY: &str = "cluster-meta";

fn blob_key(hash: &str) -> Vec<u8> {
    keys::meta_key(&format!("plugin/{hash}"))
}

/// Why metadata could not be read or stored.
#[derive(Debug, thiserror::Error)]
pub enum MetaStoreError {
    /// The store failed.
    #[error("cluster metadata: {0}")]
    Storage(#[from] StorageError),
    /// The stored state does not decode.
    #[error("cluster metadata is corrupt: {0}")]
    Corrupt(String),
    /// Plugin bytes do not match the hash they were sent under.
    #[error("plugin bytes for {hash} hash to {actual}")]
    HashMismatch {
        /// The announced hash.
        hash: String,
        /// What the bytes hash to.
        actual: String,
    },
}

/// The node's metadata, in memory and on disk.
#[derive(Debug)]
pub struct MetaStore {
    store: Store,
    state: Mutex<MetaState>,
}

impl MetaStore {
    /// Loads the state saved in `store` (empty if none).
    pub fn open(store: Store) -> Result<Self, MetaStoreError> {
        let state = match store.get(&keys::meta_key(STATE_KEY))? {
            None => MetaState::default(),
            Some(bytes) => match bytes.split_first() {
                Some((&META_FORMAT_V3, body)) => postcard::from_bytes(body)
                    .map_err(|e| MetaStoreError::Corrupt(e.to_string()))?,
                Some((&META_FORMAT_V2, body)) => {
                    let old: MetaStateV2 = postcard::from_bytes(body)
                        .map_err(|e| MetaStoreError::Corrupt(e.to_string()))?;
                    MetaState {
                        buckets: old.buckets,
                        plugins: old.plugins,
                        members: old.members,
                        ring: old.ring,
                        ..MetaState::default()
                    }
                }
                Some((&META_FORMAT_V1, body)) => {
                    let old: MetaStateV1 = postcard::from_bytes(body)
                        .map_err(|e| MetaStoreError::Corrupt(e.to_string()))?;
                    MetaState {
                        buckets: old.buckets,
                        plugins: old.plugins,
                        ..MetaState::default()
                    }
                }
                _ => return Err(MetaStoreError::Corrupt("unknown format tag".into())),
            },
        };
        Ok(MetaStore {
            store,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MetaState> {
        // The state is replaced whole under the lock; a panic elsewhere cannot tear it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the current state.
    pub fn state(&self) -> MetaState {
        self.lock().clone()
    }

    /// The digest of the current state.
    pub fn digest(&self) -> [u8; 32] {
        self.lock().digest()
    }

    /// Merges `incoming` (and stores `blobs`, each checked against its hash) durably.
    /// Returns what changed.
    pub async fn merge(
        &self,
        incoming: &MetaState,
        blobs: &[(String, Vec<u8>)],
    ) -> Result<MetaChanges, MetaStoreError> {
        let mut batch = WriteBatch::new();
        let deleted = |hash: &str| {
            self.lock()
                .plugins_deleted
                .keys()
                .chain(incoming.plugins_deleted.keys())
                .any(|p| p.hash == hash)
        };
        for (hash, bytes) in blobs {
            if deleted(hash) {
                continue;
            }
            let actual = quiver_core::meta::content_hash(bytes);
            if &actual != hash {
                return Err(MetaStoreError::HashMismatch {
                    hash: hash.clone(),
                    actual,
                });
            }
            if !self.has_blob(hash) {
                batch.put(blob_key(hash), bytes.clone());
            }
        }
        let changes = {
            let mut state = self.lock();
            let mut next = state.clone();
            let changes = next.merge(incoming);
            if !changes.is_empty() {
                batch.put(keys::meta_key(STATE_KEY), encode(&next));
            }
            // A deleted version's bytes go with it, unless the same bytes are also
            // listed under another name.
            for plugin in &changes.plugins_deleted {
                if !next.plugins.keys().any(|p| p.hash == plugin.hash) {
                    batch.delete(blob_key(&plugin.hash));
                }
            }
            if !batch.is_empty() {
                self.store.apply(&batch)?;
                *state = next;
            }
            changes
        };
        if !batch.is_empty() {
            self.store.sync_applied().await?;
        }
        Ok(changes)
    }

    /// Replaces the membership part of the state (members and ring) with `incoming`'s and
    /// merges the rest, durably. Only for a node joining a cluster: it gives up the
    /// single-node ring it started with for the cluster's, which a merge would not do when
    /// both are first rings of the same version.
    pub async fn adopt_membership(&self, incoming: &MetaState) -> Result<(), MetaStoreError> {
        let mut batch = WriteBatch::new();
        {
            let mut state = self.lock();
            let mut next = state.clone();
            next.members = incoming.members.clone();
            next.ring = incoming.ring.clone();
            next.merge(incoming);
            batch.put(keys::meta_key(STATE_KEY), encode(&next));
            self.store.apply(&batch)?;
            *state = next;
        }
        self.store.sync_applied().await?;
        Ok(())
    }

    /// Whether this node holds the bytes of plugin `hash`.
    pub fn has_blob(&self, hash: &str) -> bool {
        matches!(self.store.get(&blob_key(hash)), Ok(Some(_)))
    }

    /// The bytes of plugin `hash`, if held.
    pub fn blob(&self, hash: &str) -> Result<Option<Vec<u8>>, MetaStoreError> {
        Ok(self.store.get(&blob_key(hash))?)
    }

    /// Listed plugin versions whose bytes this node lacks.
    pub fn missing_blobs(&self) -> Vec<String> {
        let state = self.state();
        state
            .plugins
            .keys()
            .filter(|p| !self.has_blob(&p.hash))
            .map(|p| p.hash.clone())
            .collect()
    }
}

fn encode(state: &MetaState) -> Vec<u8> {
    let mut out = vec![META_FORMAT_V3];
    // Serializing plain maps, strings and a checked ring to a Vec cannot fail.
    out.extend(postcard::to_allocvec(state).unwrap_or_default());
    out
}
