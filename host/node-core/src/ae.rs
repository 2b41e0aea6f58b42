//! The anti-entropy index of one node: the hash trees of its partition replicas
//! (`quiver_core::merkle`), kept in step with storage.
//!
//! The leaf level lives on disk: every data record has an entry under
//! `keys::ae_key(partition, leaf, data key)` holding the key's replication factor and object
//! digest, written in the same batch as the record. So the trees cannot drift from the data
//! (a crash loses both or neither), a leaf's keys are one range scan away for an exchange,
//! and the in-memory trees are rebuilt from the entries at start. When the entries are
//! absent (a data directory from before anti-entropy) or unreadable, they are rebuilt from
//! the data records first.
//!
//! Trees are per `(n, partition)`: keys of buckets with different replication factors have
//! different replica sets, so they are compared with different peers. The entry records the
//! `n` it was filed under, so a bucket whose `n` changes is refiled (`refile`) without
//! guessing.
//!
//! Beside the entries sits the tombstone index (`keys::reap_key`): one entry per key whose
//! siblings are all tombstones, holding the time, by this node's own clock, at which it
//! stored exactly that state, kept in the same batches. The reaper ([`crate::reap`])
//! walks it instead of the data.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use quiver_core::causality::Object;
use quiver_core::merkle::{self, HASH_BYTES, Hash, Tree};
use quiver_core::ring;
use quiver_core::storage::{StorageError, WriteBatch, keys};

use quiver_core::storage::StorageEngine;

use crate::WallClock;

/// Metadata key marking that every data record has its anti-entropy entry.
const INDEX_MARKER: &str = "ae-index-v1";
/// Bytes of an entry's value: the replication factor, flags, then the object digest.
const ENTRY_BYTES: usize = 2 + HASH_BYTES;
/// Entry flag: every sibling of the object is a tombstone.
const FLAG_TOMBSTONE: u8 = 1;
/// Records per batch when (re)building entries.
const BUILD_BATCH: usize = 1024;

/// A tree's identity: replication factor and partition.
pub type TreeId = (u8, u32);

/// Where keys go: the ring's partition count and each bucket's replication factor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Ring partitions.
    pub partitions: u32,
    /// Replication factor of buckets without their own.
    pub default_n: u8,
    /// Buckets with their own replication factor.
    pub buckets: BTreeMap<String, u8>,
}

impl Placement {
    /// The replication factor of `bucket`.
    pub fn n(&self, bucket: &[u8]) -> u8 {
        std::str::from_utf8(bucket)
            .ok()
            .and_then(|b| self.buckets.get(b))
            .copied()
            .unwrap_or(self.default_n)
    }

    /// Every replication factor in use.
    pub fn ns(&self) -> Vec<u8> {
        let mut ns: Vec<u8> = std::iter::once(self.default_n)
            .chain(self.buckets.values().copied())
            .collect();
        ns.sort_unstable();
        ns.dedup();
        ns
    }
}

/// Where one data key sits in the trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Partition.
    pub partition: u32,
    /// Leaf.
    pub leaf: u8,
    /// Engine key of the entry.
    pub entry_key: Vec<u8>,
}

/// An entry as stored: the tree it is filed in and the object digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Replication factor it is filed under.
    pub n: u8,
    /// Digest of the object.
    pub digest: Hash,
    /// Every sibling is a tombstone (the key is in the tombstone index).
    pub tombstone: bool,
}

/// True for a state that is nothing but deletions: the reaper's candidates.
pub fn is_tombstone(object: &Object) -> bool {
    !object.siblings().is_empty() && object.siblings().iter().all(|s| s.meta.tombstone)
}

impl Entry {
    fn of(n: u8, object: &Object) -> Entry {
        Entry {
            n,
            digest: merkle::object_digest(object),
            tombstone: is_tombstone(object),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENTRY_BYTES);
        out.push(self.n);
        out.push(if self.tombstone { FLAG_TOMBSTONE } else { 0 });
        out.extend_from_slice(&self.digest);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Entry> {
        if bytes.len() != ENTRY_BYTES || bytes[0] == 0 || bytes[1] & !FLAG_TOMBSTONE != 0 {
            return None;
        }
        let mut digest = [0u8; HASH_BYTES];
        digest.copy_from_slice(&bytes[2..]);
        Some(Entry {
            n: bytes[0],
            digest,
            tombstone: bytes[1] & FLAG_TOMBSTONE != 0,
        })
    }
}

/// How the tombstone index stores a time: this node's wall clock, ms since the Unix epoch.
///
/// The index records when *this node* stored a tombstone state, not the coordinator's
/// timestamp in the siblings: hold times are then measured on one clock each, so clock skew
/// between nodes cannot make a fresh tombstone look old (the simulator found resurrections
/// with skew beyond the grace when sibling timestamps were used).
fn encode_stamp(now_ms: u64) -> Vec<u8> {
    now_ms.to_be_bytes().to_vec()
}

fn decode_stamp(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// A change to the trees staged in a batch; applied with [`AeIndex::commit`] once the batch
/// is on the engine.
#[derive(Debug, Clone)]
pub struct Staged {
    partition: u32,
    leaf: u8,
    data_key: Vec<u8>,
    old: Option<Entry>,
    new: Option<Entry>,
}

/// Anti-entropy counters, as `quiver cluster status` shows them.
#[derive(Debug, Default)]
pub struct AeMetrics {
    /// Exchanges this node completed as the initiator.
    pub exchanges: AtomicU64,
    /// Keys whose state changed here or at a peer because of an exchange.
    pub keys_repaired: AtomicU64,
    /// Bytes of anti-entropy messages this node sent (requests and answers).
    pub bytes_sent: AtomicU64,
    /// Tombstones this node removed because every replica held them.
    pub tombstones_reaped: AtomicU64,
}

/// The trees of one node.
#[derive(Debug)]
pub struct AeIndex {
    /// This node's wall clock, for the tombstone index's hold times.
    clock: Arc<dyn WallClock>,
    placement: RwLock<Placement>,
    trees: Mutex<HashMap<TreeId, Tree>>,
    metrics: AeMetrics,
    /// Keys in the tombstone index.
    tombstones: AtomicU64,
    /// Where the reaper's next walk of the tombstone index starts.
    reap_cursor: Mutex<Vec<u8>>,
    /// True while every entry is filed under its bucket's current replication factor: a
    /// write may then derive the key's old entry from the record it already read instead
    /// of reading the entry (one point read less per write).
    exact: std::sync::atomic::AtomicBool,
    /// Bumped on every placement change, so a refile pass knows whether it caught up.
    generation: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Trees are only changed by whole XOR steps; a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AeIndex {
    /// An empty index whose tombstone hold times follow `clock`.
    pub fn with_clock(clock: Arc<dyn WallClock>) -> Self {
        AeIndex {
            clock,
            placement: RwLock::default(),
            trees: Mutex::default(),
            metrics: AeMetrics::default(),
            tombstones: AtomicU64::default(),
            reap_cursor: Mutex::default(),
            exact: std::sync::atomic::AtomicBool::default(),
            generation: AtomicU64::default(),
        }
    }

    /// The current placement.
    pub fn placement(&self) -> Placement {
        self.placement
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets the placement; true when a bucket's replication factor changed (its entries
    /// must then be refiled).
    pub fn set_placement(&self, placement: Placement) -> bool {
        let mut current = self.placement.write().unwrap_or_else(|p| p.into_inner());
        let changed = *current != placement && current.partitions != 0;
        if changed {
            self.exact.store(false, Ordering::SeqCst);
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        *current = placement;
        changed
    }

    /// The placement generation (see [`AeIndex::refiled`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A refile pass that started at `generation` found nothing misfiled: unless the
    /// placement changed since, every entry is filed right again.
    pub fn refiled(&self, generation: u64) {
        if self.generation() == generation {
            self.exact.store(true, Ordering::SeqCst);
        }
    }

    fn n_of(&self, bucket: &[u8]) -> (u8, u32) {
        let p = self.placement.read().unwrap_or_else(|p| p.into_inner());
        (p.n(bucket), p.partitions.max(1))
    }

    /// The counters.
    pub fn metrics(&self) -> &AeMetrics {
        &self.metrics
    }

    /// Where `data_key` (of `bucket`, `key`) sits.
    pub fn slot(&self, bucket: &[u8], key: &[u8], data_key: &[u8]) -> Slot {
        let (_, partitions) = self.n_of(bucket);
        let position = ring::key_position(bucket, key);
        let partition = ring::partition_of_position(&position, partitions).unwrap_or(0);
        let leaf = merkle::leaf_of(&position);
        Slot {
            partition,
            leaf,
            entry_key: keys::ae_key(partition, leaf, data_key),
        }
    }

    /// Stages the entry change for a data record written (`Some`) or deleted (`None`):
    /// adds the new entry (or its deletion) to `batch`. `prior` is the record's state before
    /// this write when the caller read it (`Some(None)`: no record); the old entry is then
    /// derived from it, else read from disk. Call under the key's lock, and
    /// [`AeIndex::commit`] the result after the batch is applied.
    #[allow(clippy::too_many_arguments)]
    pub fn stage(
        &self,
        store: &dyn StorageEngine,
        batch: &mut WriteBatch,
        bucket: &[u8],
        key: &[u8],
        data_key: &[u8],
        prior: Option<Option<&Object>>,
        object: Option<&Object>,
    ) -> Result<Staged, StorageError> {
        let slot = self.slot(bucket, key, data_key);
        let (n, _) = self.n_of(bucket);
        let old = match prior {
            Some(prior) if self.exact.load(Ordering::SeqCst) => prior.map(|o| Entry::of(n, o)),
            _ => store.get(&slot.entry_key)?.and_then(|b| Entry::decode(&b)),
        };
        let new = object.map(|o| Entry::of(n, o));
        match &new {
            Some(e) => batch.put(slot.entry_key.clone(), e.encode()),
            None => batch.delete(slot.entry_key.clone()),
        };
        match (object, old.is_some_and(|e| e.tombstone)) {
            // The hold time restarts only when the state changes.
            (Some(o), _) if is_tombstone(o) && old != new => {
                batch.put(keys::reap_key(data_key), encode_stamp(self.clock.now_ms()));
            }
            (Some(o), _) if is_tombstone(o) => {}
            (_, true) => {
                batch.delete(keys::reap_key(data_key));
            }
            _ => {}
        }
        Ok(Staged {
            partition: slot.partition,
            leaf: slot.leaf,
            data_key: data_key.to_vec(),
            old,
            new,
        })
    }

    /// Applies a staged change to the in-memory trees.
    pub fn commit(&self, staged: Staged) {
        if staged.old == staged.new {
            return;
        }
        let was = staged.old.is_some_and(|e| e.tombstone);
        let is = staged.new.is_some_and(|e| e.tombstone);
        if is && !was {
            self.tombstones.fetch_add(1, Ordering::Relaxed);
        } else if was && !is {
            let _ = self
                .tombstones
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                    Some(t.saturating_sub(1))
                });
        }
        let mut trees = lock(&self.trees);
        if let Some(old) = staged.old {
            let entry = merkle::entry_hash(&staged.data_key, &old.digest);
            trees
                .entry((old.n, staged.partition))
                .or_default()
                .remove(staged.leaf, &entry);
        }
        if let Some(new) = staged.new {
            let entry = merkle::entry_hash(&staged.data_key, &new.digest);
            trees
                .entry((new.n, staged.partition))
                .or_default()
                .insert(staged.leaf, &entry);
        }
    }

    /// Loads the trees at start, first (re)building the on-disk entries from the data
    /// records when they are absent, unreadable, or filed for another partition count.
    /// Returns the number of keys indexed.
    pub fn open(&self, store: &dyn StorageEngine) -> Result<u64, StorageError> {
        let marker = keys::meta_key(INDEX_MARKER);
        // The marker holds the partition count the entries were filed under.
        let filed_for = self.placement().partitions.to_be_bytes().to_vec();
        if store.get(&marker)?.as_ref() != Some(&filed_for) || !self.load(store)? {
            let built = self.rebuild(store)?;
            let mut batch = WriteBatch::new();
            batch.put(marker, filed_for);
            store.apply(&batch)?;
            tracing::info!(
                keys = built,
                "anti-entropy index rebuilt from the data records"
            );
            if !self.load(store)? {
                return Err(StorageError::Corrupt {
                    engine: store.name().to_string(),
                    key_hex: String::new(),
                    message: "anti-entropy entries unreadable right after a rebuild".into(),
                });
            }
        }
        Ok(lock(&self.trees).values().map(Tree::keys).sum())
    }

    /// Reads every entry into fresh trees; false if an entry is unreadable.
    /// Entries filed under a replication factor their bucket no longer has (it changed while
    /// the node was down) are refiled on the way, before the node serves.
    fn load(&self, store: &dyn StorageEngine) -> Result<bool, StorageError> {
        let placement = self.placement();
        let mut trees: HashMap<TreeId, Tree> = HashMap::new();
        let mut ok = true;
        let mut tombstones = 0u64;
        let mut refile = WriteBatch::new();
        scan_prefix(store, &[keys::AE_PREFIX], |k, v| {
            match (keys::split_ae_key(k), Entry::decode(v)) {
                (Some((partition, leaf, dkey)), Some(mut entry)) => {
                    tombstones += u64::from(entry.tombstone);
                    let h = merkle::entry_hash(dkey, &entry.digest);
                    if let Some((bucket, _)) = keys::split_data_key(dkey)
                        && placement.n(bucket) != entry.n
                    {
                        entry.n = placement.n(bucket);
                        refile.put(k.to_vec(), entry.encode());
                    }
                    trees
                        .entry((entry.n, partition))
                        .or_default()
                        .insert(leaf, &h);
                    true
                }
                _ => {
                    tracing::warn!(key = %crate::record::render_key(k), "unreadable anti-entropy entry");
                    ok = false;
                    false
                }
            }
        })?;
        if ok {
            if !refile.is_empty() {
                tracing::info!(
                    entries = refile.ops.len(),
                    "anti-entropy entries refiled after a replication-factor change"
                );
                store.apply(&refile)?;
            }
            *lock(&self.trees) = trees;
            self.tombstones.store(tombstones, Ordering::Relaxed);
            self.exact.store(true, Ordering::SeqCst);
        }
        Ok(ok)
    }

    /// Drops every entry and writes one per data record.
    fn rebuild(&self, store: &dyn StorageEngine) -> Result<u64, StorageError> {
        let mut stale = Vec::new();
        for prefix in [keys::AE_PREFIX, keys::REAP_PREFIX] {
            scan_prefix(store, &[prefix], |k, _| {
                stale.push(k.to_vec());
                true
            })?;
        }
        for chunk in stale.chunks(BUILD_BATCH) {
            let mut batch = WriteBatch::new();
            for k in chunk {
                batch.delete(k.clone());
            }
            store.apply(&batch)?;
        }
        let placement = self.placement();
        let mut batch = WriteBatch::new();
        let mut built = 0u64;
        let mut failed = None;
        scan_prefix(store, &[keys::DATA_PREFIX], |k, v| {
            let Some((bucket, key)) = keys::split_data_key(k) else {
                return true;
            };
            let object = match crate::record::decode_record(v) {
                Ok(r) => r.object,
                Err(e) => {
                    // The record is unreadable for every path; leave it out of the trees
                    // rather than refuse to start (a replica will repair the key).
                    tracing::error!(key = %crate::record::render_key(k), error = %e, "unreadable record");
                    return true;
                }
            };
            let position = ring::key_position(bucket, key);
            let partition =
                ring::partition_of_position(&position, placement.partitions.max(1)).unwrap_or(0);
            let entry = Entry::of(placement.n(bucket), &object);
            if entry.tombstone {
                batch.put(keys::reap_key(k), encode_stamp(self.clock.now_ms()));
            }
            batch.put(
                keys::ae_key(partition, merkle::leaf_of(&position), k),
                entry.encode(),
            );
            built += 1;
            if batch.ops.len() >= BUILD_BATCH
                && let Err(e) = store.apply(&std::mem::take(&mut batch))
            {
                failed = Some(e);
                return false;
            }
            true
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        if !batch.is_empty() {
            store.apply(&batch)?;
        }
        Ok(built)
    }

    /// The root of tree `id` (the empty tree's root when this node holds no key there).
    pub fn root(&self, id: TreeId) -> Hash {
        lock(&self.trees).entry(id).or_default().root()
    }

    /// The group hashes of tree `id`.
    pub fn groups(&self, id: TreeId) -> Vec<Hash> {
        lock(&self.trees).entry(id).or_default().groups()
    }

    /// The leaf hashes of one group of tree `id`.
    pub fn leaves(&self, id: TreeId, group: u8) -> Vec<Hash> {
        lock(&self.trees).entry(id).or_default().leaves(group)
    }

    /// Keys whose siblings are all tombstones.
    pub fn tombstones(&self) -> u64 {
        self.tombstones.load(Ordering::Relaxed)
    }

    /// Up to `limit` keys of the tombstone index whose state this node has held since
    /// before `before_ms` (by its own clock), walking on from where the previous call stopped (and wrapping), so old
    /// tombstones behind many young ones are reached too.
    pub fn reap_candidates(
        &self,
        store: &dyn StorageEngine,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StorageError> {
        let start = std::mem::take(&mut *lock(&self.reap_cursor));
        let mut out = Vec::new();
        let mut seen = 0usize;
        let mut last = None;
        let mut visit = |k: &[u8], v: &[u8]| {
            seen += 1;
            if decode_stamp(v) < before_ms {
                out.push(k[1..].to_vec());
            }
            last = Some(k.to_vec());
            out.len() < limit && seen < limit * 16
        };
        let from = if start.is_empty() {
            vec![keys::REAP_PREFIX]
        } else {
            start
        };
        scan_range(store, &from, Some(&[keys::REAP_PREFIX + 1]), &mut visit)?;
        // Resume after the last key visited next time; an exhausted walk starts over.
        let exhausted = out.len() < limit && seen < limit * 16;
        *lock(&self.reap_cursor) = match (exhausted, last) {
            (false, Some(mut k)) => {
                k.push(0);
                k
            }
            _ => Vec::new(),
        };
        Ok(out)
    }

    /// When this node stored its current tombstone state of `data_key` (its own clock, ms),
    /// if the key is a tombstone here.
    pub fn held_since(
        &self,
        store: &dyn StorageEngine,
        data_key: &[u8],
    ) -> Result<Option<u64>, StorageError> {
        Ok(store
            .get(&keys::reap_key(data_key))?
            .map(|v| decode_stamp(&v)))
    }

    /// Keys held in every tree.
    pub fn keys(&self) -> u64 {
        lock(&self.trees).values().map(Tree::keys).sum()
    }

    /// The trees that hold at least one key, in order.
    pub fn tree_ids(&self) -> Vec<TreeId> {
        let mut ids: Vec<TreeId> = lock(&self.trees)
            .iter()
            .filter(|(_, t)| t.keys() > 0)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Keys held in tree `id`.
    pub fn tree_keys(&self, id: TreeId) -> u64 {
        lock(&self.trees).get(&id).map_or(0, Tree::keys)
    }

    /// The `(data key, digest)` list of one leaf of tree `id`, sorted by key, at most
    /// `limit` long.
    pub fn leaf_keys(
        &self,
        store: &dyn StorageEngine,
        (n, partition): TreeId,
        leaf: u8,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Hash)>, StorageError> {
        let prefix = keys::ae_leaf_prefix(partition, leaf);
        let mut out = Vec::new();
        scan_prefix(store, &prefix, |k, v| {
            if let (Some((_, _, dkey)), Some(entry)) = (keys::split_ae_key(k), Entry::decode(v))
                && entry.n == n
            {
                out.push((dkey.to_vec(), entry.digest));
            }
            out.len() < limit
        })?;
        Ok(out)
    }

    /// Data keys whose entries are filed under a replication factor their bucket no longer
    /// has (after `quiver bucket set --n`), at most `limit`.
    pub fn misfiled(
        &self,
        store: &dyn StorageEngine,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StorageError> {
        let placement = self.placement();
        let mut out = Vec::new();
        scan_prefix(store, &[keys::AE_PREFIX], |k, v| {
            if let (Some((_, _, dkey)), Some(entry)) = (keys::split_ae_key(k), Entry::decode(v))
                && let Some((bucket, _)) = keys::split_data_key(dkey)
                && placement.n(bucket) != entry.n
            {
                out.push(dkey.to_vec());
            }
            out.len() < limit
        })?;
        Ok(out)
    }
}

/// Calls `f` on every pair whose key starts with `prefix`, in key order, until it returns
/// false.
fn scan_prefix(
    store: &dyn StorageEngine,
    prefix: &[u8],
    f: impl FnMut(&[u8], &[u8]) -> bool,
) -> Result<(), StorageError> {
    scan_range(store, prefix, keys::prefix_end(prefix).as_deref(), f)
}

/// Calls `f` on every pair with `start <= key < end` (unbounded without `end`), in key
/// order, until it returns false.
fn scan_range(
    store: &dyn StorageEngine,
    start: &[u8],
    end: Option<&[u8]>,
    mut f: impl FnMut(&[u8], &[u8]) -> bool,
) -> Result<(), StorageError> {
    const PAGE: usize = 1024;
    let mut from = start.to_vec();
    loop {
        let page = store.scan(&from, end, PAGE)?;
        for (k, v) in &page {
            if !f(k, v) {
                return Ok(());
            }
        }
        match page.last() {
            Some((k, _)) if page.len() == PAGE => {
                from = k.clone();
                from.push(0);
            }
            _ => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_reject_garbage() {
        let e = Entry {
            n: 3,
            digest: [7; HASH_BYTES],
            tombstone: true,
        };
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert_eq!(Entry::decode(&[3, 1, 2]), None);
        let mut bad_flags = e.encode();
        bad_flags[1] = 0x80;
        assert_eq!(Entry::decode(&bad_flags), None);
        let mut zero_n = e.encode();
        zero_n[0] = 0;
        assert_eq!(Entry::decode(&zero_n), None);
    }

    #[test]
    fn placement_names_every_replication_factor() {
        let mut p = Placement {
            partitions: 64,
            default_n: 3,
            buckets: BTreeMap::new(),
        };
        p.buckets.insert("a".into(), 2);
        p.buckets.insert("b".into(), 3);
        assert_eq!(p.ns(), vec![2, 3]);
        assert_eq!(p.n(b"a"), 2);
        assert_eq!(p.n(b"zzz"), 3);
    }
}
