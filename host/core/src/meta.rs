//! Cluster metadata: runtime bucket properties and uploaded plugins, replicated to every
//! node (Riak's "cluster metadata"; DESIGN.md, "bucket properties (replicated cluster
//! metadata)").
//!
//! Every entry is a last-writer-wins register stamped with the writer's wall clock and name,
//! so any two nodes' states merge into the same state whatever the order (the merge is a
//! join: commutative, associative, idempotent). Admin changes are rare and explicit; a
//! concurrent `bucket set` on two nodes keeps the later one, which is what an operator
//! expects. Plugin bytes are content-addressed (SHA-256), so they never conflict: the state
//! lists them and nodes fetch the bytes they lack.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::access::KeyEntry;
use crate::membership::{MemberEntry, RingEntry, merge_members};
pub use crate::stamp::Stamp;

/// A plugin version: a name and the SHA-256 (hex) of its component bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PluginRef {
    /// Plugin name.
    pub name: String,
    /// Hex SHA-256 of the component.
    pub hash: String,
}

impl std::fmt::Display for PluginRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, short_hash(&self.hash))
    }
}

/// The first 12 hex digits of a hash, for messages.
pub fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Hex SHA-256 of plugin bytes (the plugin's identity).
pub fn content_hash(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Properties of a bucket set at runtime. `None` fields fall back to the node's
/// configuration for that bucket, then to the node defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSpec {
    /// Replicas per key.
    pub n: Option<u8>,
    /// Default read quorum.
    pub r: Option<u8>,
    /// Default write quorum.
    pub w: Option<u8>,
    /// Sloppy quorum (false = primaries only).
    pub sloppy_quorum: Option<bool>,
    /// The reconciler merging this bucket's siblings; none returns siblings to clients.
    pub reconciler: Option<PluginRef>,
    /// A write leaving more siblings than this is merged by the reconciler at once.
    pub sibling_threshold: Option<u32>,
    /// Fuel per plugin call.
    pub plugin_fuel: Option<u64>,
    /// Linear-memory cap per plugin call, in bytes.
    pub plugin_memory_bytes: Option<u64>,
    /// Largest value a plugin call may return, in bytes.
    pub plugin_output_bytes: Option<u64>,
}

impl BucketSpec {
    /// `self` with every field `changes` sets replaced.
    pub fn updated(&self, changes: &BucketSpec) -> BucketSpec {
        BucketSpec {
            n: changes.n.or(self.n),
            r: changes.r.or(self.r),
            w: changes.w.or(self.w),
            sloppy_quorum: changes.sloppy_quorum.or(self.sloppy_quorum),
            reconciler: changes.reconciler.clone().or(self.reconciler.clone()),
            sibling_threshold: changes.sibling_threshold.or(self.sibling_threshold),
            plugin_fuel: changes.plugin_fuel.or(self.plugin_fuel),
            plugin_memory_bytes: changes.plugin_memory_bytes.or(self.plugin_memory_bytes),
            plugin_output_bytes: changes.plugin_output_bytes.or(self.plugin_output_bytes),
        }
    }
}

/// What is known about one uploaded plugin version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    /// Name and hash.
    pub plugin: PluginRef,
    /// Component size in bytes.
    pub size: u64,
    /// Who uploaded it, when.
    pub uploaded: Stamp,
    /// True if it was uploaded although `validate` found law violations.
    pub forced: bool,
}

/// One bucket's entry: its properties and who set them last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketEntry {
    /// The properties.
    pub spec: BucketSpec,
    /// The write that set them.
    pub stamp: Stamp,
}

/// The cluster metadata one node holds. Plugin bytes are stored separately, by hash.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Buckets with runtime properties.
    pub buckets: BTreeMap<String, BucketEntry>,
    /// Uploaded plugin versions, by (name, hash).
    pub plugins: BTreeMap<PluginRef, PluginInfo>,
    /// Cluster members by node name (`crate::membership`).
    pub members: BTreeMap<String, MemberEntry>,
    /// The committed ring; `None` until the node derived or learned one.
    pub ring: Option<RingEntry>,
    /// Access keys by name (`crate::access`), deleted ones as markers.
    pub keys: BTreeMap<String, KeyEntry>,
    /// Deleted plugin versions and who deleted them. A deletion is final for that content
    /// hash: the version leaves `plugins` on every node and is never listed again.
    pub plugins_deleted: BTreeMap<PluginRef, Stamp>,
}

/// What a merge changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaChanges {
    /// Buckets whose entry was replaced.
    pub buckets: Vec<String>,
    /// Plugin versions newly listed.
    pub plugins: Vec<PluginRef>,
    /// Members whose entry was replaced.
    pub members: Vec<String>,
    /// The ring was replaced.
    pub ring: bool,
    /// Access keys whose entry was replaced.
    pub keys: Vec<String>,
    /// Plugin versions newly deleted.
    pub plugins_deleted: Vec<PluginRef>,
}

impl MetaChanges {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
            && self.plugins.is_empty()
            && self.members.is_empty()
            && !self.ring
            && self.keys.is_empty()
            && self.plugins_deleted.is_empty()
    }
}

impl MetaState {
    /// Joins `other` into `self`: per bucket the later stamp wins; plugin lists unite (for
    /// the same version, the earlier upload's info is kept, so every node keeps the same).
    pub fn merge(&mut self, other: &MetaState) -> MetaChanges {
        let mut changes = MetaChanges::default();
        for (name, theirs) in &other.buckets {
            let replace = self
                .buckets
                .get(name)
                .is_none_or(|mine| theirs.stamp > mine.stamp);
            if replace {
                self.buckets.insert(name.clone(), theirs.clone());
                changes.buckets.push(name.clone());
            }
        }
        // Deletions first: the listed versions are the uploads minus the deletions, a
        // function of two unions, so the merge stays a join.
        for (key, stamp) in &other.plugins_deleted {
            match self.plugins_deleted.get_mut(key) {
                None => {
                    self.plugins_deleted.insert(key.clone(), stamp.clone());
                    changes.plugins_deleted.push(key.clone());
                }
                Some(mine) => {
                    if stamp > mine {
                        *mine = stamp.clone();
                    }
                }
            }
        }
        for key in &changes.plugins_deleted {
            self.plugins.remove(key);
        }
        for (key, theirs) in &other.plugins {
            if self.plugins_deleted.contains_key(key) {
                continue;
            }
            match self.plugins.get_mut(key) {
                None => {
                    self.plugins.insert(key.clone(), theirs.clone());
                    changes.plugins.push(key.clone());
                }
                Some(mine) => {
                    if theirs.uploaded < mine.uploaded {
                        *mine = theirs.clone();
                    }
                }
            }
        }
        for (name, theirs) in &other.keys {
            // The later stamp wins; equal stamps (two nodes adding the same bootstrap key at
            // stamp zero) pick by content, so every node keeps the same entry.
            let replace = self.keys.get(name).is_none_or(|mine| {
                (&theirs.stamp, theirs.deleted, &theirs.salt, &theirs.hash)
                    > (&mine.stamp, mine.deleted, &mine.salt, &mine.hash)
            });
            if replace {
                self.keys.insert(name.clone(), theirs.clone());
                changes.keys.push(name.clone());
            }
        }
        changes.members = merge_members(&mut self.members, &other.members);
        if let Some(theirs) = &other.ring
            && self
                .ring
                .as_ref()
                .is_none_or(|mine| mine.superseded_by(theirs))
        {
            self.ring = Some(theirs.clone());
            changes.ring = true;
        }
        changes
    }

    /// Sets a bucket's properties as of `stamp` (ignored if an entry with a later stamp is
    /// already held). Returns the entry now held.
    pub fn set_bucket(&mut self, name: &str, spec: BucketSpec, stamp: Stamp) -> &BucketEntry {
        let incoming = MetaState {
            buckets: BTreeMap::from([(name.to_string(), BucketEntry { spec, stamp })]),
            ..MetaState::default()
        };
        self.merge(&incoming);
        // The entry exists: merge inserted it or kept a later one.
        &self.buckets[name]
    }

    /// Every version of a plugin, oldest upload first.
    pub fn versions(&self, name: &str) -> Vec<&PluginInfo> {
        let mut v: Vec<&PluginInfo> = self
            .plugins
            .values()
            .filter(|p| p.plugin.name == name)
            .collect();
        v.sort_by(|a, b| a.uploaded.cmp(&b.uploaded));
        v
    }

    /// Resolves `NAME` (the latest upload) or `NAME@HASH` (a full hash or a unique prefix
    /// of at least 6 hex digits) to a listed plugin version.
    pub fn resolve(&self, spec: &str) -> Result<PluginRef, MetaError> {
        let (name, hash) = match spec.split_once('@') {
            Some((n, h)) => (n, Some(h)),
            None => (spec, None),
        };
        let versions = self.versions(name);
        if versions.is_empty() {
            return Err(MetaError::UnknownPlugin(name.to_string()));
        }
        match hash {
            None => versions
                .last()
                .map(|p| p.plugin.clone())
                .ok_or_else(|| MetaError::UnknownPlugin(name.to_string())),
            Some(h) if h.len() < 6 => Err(MetaError::AmbiguousVersion {
                spec: spec.to_string(),
                why: "give at least 6 hex digits of the hash".into(),
            }),
            Some(h) => {
                let found: Vec<&&PluginInfo> = versions
                    .iter()
                    .filter(|p| p.plugin.hash.starts_with(h))
                    .collect();
                match found.as_slice() {
                    [one] => Ok(one.plugin.clone()),
                    [] => Err(MetaError::UnknownVersion(spec.to_string())),
                    _ => Err(MetaError::AmbiguousVersion {
                        spec: spec.to_string(),
                        why: format!("{} versions match", found.len()),
                    }),
                }
            }
        }
    }

    /// A digest of the whole state: two nodes with equal digests hold the same metadata.
    pub fn digest(&self) -> [u8; 32] {
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        Sha256::digest(&bytes).into()
    }
}

/// Why a metadata request cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// No plugin of that name was uploaded.
    #[error("no plugin named {0:?} (upload it first: quiver plugin upload NAME FILE)")]
    UnknownPlugin(String),
    /// The plugin exists but not in that version.
    #[error("no plugin version {0:?}")]
    UnknownVersion(String),
    /// A hash prefix matches several versions, or is too short.
    #[error("plugin version {spec:?} is ambiguous: {why}")]
    AmbiguousVersion {
        /// What was asked.
        spec: String,
        /// Why it is ambiguous.
        why: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(t: u64, node: &str) -> Stamp {
        Stamp {
            timestamp_ms: t,
            node: node.into(),
        }
    }

    fn plugin(name: &str, bytes: &[u8], t: u64) -> PluginInfo {
        PluginInfo {
            plugin: PluginRef {
                name: name.into(),
                hash: content_hash(bytes),
            },
            size: bytes.len() as u64,
            uploaded: stamp(t, "n1"),
            forced: false,
        }
    }

    fn state(buckets: &[(&str, u8, Stamp)], plugins: &[PluginInfo]) -> MetaState {
        MetaState {
            buckets: buckets
                .iter()
                .map(|(b, n, s)| {
                    (
                        b.to_string(),
                        BucketEntry {
                            spec: BucketSpec {
                                n: Some(*n),
                                ..BucketSpec::default()
                            },
                            stamp: s.clone(),
                        },
                    )
                })
                .collect(),
            plugins: plugins
                .iter()
                .map(|p| (p.plugin.clone(), p.clone()))
                .collect(),
            ..MetaState::default()
        }
    }

    #[test]
    fn a_deleted_plugin_version_leaves_every_merge_for_good() {
        let v1 = plugin("cart", b"v1", 1);
        let v2 = plugin("cart", b"v2", 2);
        let listed = state(&[], &[v1.clone(), v2.clone()]);
        let deleted = MetaState {
            plugins_deleted: [(v1.plugin.clone(), stamp(5, "n2"))].into_iter().collect(),
            ..MetaState::default()
        };
        let join = |parts: &[&MetaState]| {
            let mut s = MetaState::default();
            for p in parts {
                s.merge(p);
            }
            s
        };
        let one = join(&[&listed, &deleted]);
        assert_eq!(one, join(&[&deleted, &listed]));
        assert_eq!(one, join(&[&listed, &deleted, &listed]));
        assert_eq!(one.plugins.keys().collect::<Vec<_>>(), vec![&v2.plugin]);
        assert!(one.resolve(&format!("cart@{}", v1.plugin.hash)).is_err());
        assert_eq!(one.resolve("cart"), Ok(v2.plugin.clone()));
        // A node that still lists it (a late gossip) cannot bring it back.
        let mut late = one.clone();
        let changes = late.merge(&listed);
        assert!(changes.plugins.is_empty() && late == one);
    }

    #[test]
    fn merge_is_a_join() {
        let a = state(&[("x", 3, stamp(5, "n1"))], &[plugin("cart", b"v1", 1)]);
        let b = state(
            &[("x", 2, stamp(5, "n2")), ("y", 1, stamp(1, "n1"))],
            &[plugin("cart", b"v2", 2)],
        );
        let c = state(&[("y", 3, stamp(9, "n3"))], &[plugin("lww", b"l", 3)]);
        let join = |parts: &[&MetaState]| {
            let mut s = MetaState::default();
            for p in parts {
                s.merge(p);
            }
            s
        };
        let abc = join(&[&a, &b, &c]);
        assert_eq!(abc, join(&[&c, &b, &a]));
        assert_eq!(abc, join(&[&b, &a, &c, &a]));
        assert_eq!(abc.digest(), join(&[&c, &a, &b]).digest());
        // Same time: the node name breaks the tie, on every node alike.
        assert_eq!(abc.buckets["x"].spec.n, Some(2));
        assert_eq!(abc.buckets["y"].spec.n, Some(3));
        assert_eq!(abc.plugins.len(), 3);
        let mut again = abc.clone();
        assert!(again.merge(&abc).is_empty());
    }

    #[test]
    fn versions_resolve_by_name_or_hash_prefix() {
        let v1 = plugin("cart", b"v1", 1);
        let v2 = plugin("cart", b"v2", 2);
        let s = state(&[], &[v2.clone(), v1.clone()]);
        assert_eq!(s.resolve("cart"), Ok(v2.plugin.clone()));
        let prefix = format!("cart@{}", &v1.plugin.hash[..8]);
        assert_eq!(s.resolve(&prefix), Ok(v1.plugin.clone()));
        assert!(matches!(
            s.resolve("cart@ab"),
            Err(MetaError::AmbiguousVersion { .. })
        ));
        assert!(matches!(
            s.resolve("cart@000000"),
            Err(MetaError::UnknownVersion(_))
        ));
        assert!(matches!(
            s.resolve("nope"),
            Err(MetaError::UnknownPlugin(_))
        ));
    }

    #[test]
    fn bucket_updates_keep_unchanged_fields() {
        let base = BucketSpec {
            n: Some(3),
            w: Some(2),
            ..BucketSpec::default()
        };
        let changed = base.updated(&BucketSpec {
            w: Some(3),
            sibling_threshold: Some(10),
            ..BucketSpec::default()
        });
        assert_eq!(changed.n, Some(3));
        assert_eq!(changed.w, Some(3));
        assert_eq!(changed.sibling_threshold, Some(10));
    }
}
