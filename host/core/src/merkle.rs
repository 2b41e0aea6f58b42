//! Anti-entropy hash trees (Dynamo §4.7): one tree per partition replica, compared between
//! replicas to find the keys whose states differ without sending the keys themselves.
//!
//! Shape: a fixed two-level tree over [`LEAVES`] leaves. A key lives in the leaf named by the
//! last byte of its ring position (independent of the partition bits, which come from the
//! first bytes). A leaf is the XOR of its keys' entry hashes, so a write updates it in O(1)
//! from the entry it replaces — the hot path never rehashes a subtree. Inner hashes (one per
//! group of [`FANOUT`] leaves, then the root) are SHA-256 over their children and recomputed
//! lazily, only for groups marked dirty since the last comparison.
//!
//! Why XOR leaves are sound here: entries of one leaf are for distinct keys, so no entry can
//! cancel another, and an entry hash binds the key to its object digest. Hashes are SHA-256
//! truncated to [`HASH_BYTES`] bytes, which keeps the exchange small while a false "equal"
//! stays a 2^-128 event per comparison.
//!
//! The exchange descends level by level: roots of every shared partition, then the groups of
//! the partitions whose roots differ, then the leaves of the differing groups, then the key
//! lists of the differing leaves. [`differing`] and [`diff_keys`] are the comparisons; the
//! node runtime and the simulator drive the messages.

use sha2::{Digest, Sha256};

use crate::causality::Object;

/// Bytes of every hash in a tree and on the wire.
pub const HASH_BYTES: usize = 16;
/// Children per inner node.
pub const FANOUT: usize = 16;
/// Leaves per tree.
pub const LEAVES: usize = FANOUT * FANOUT;

/// A truncated SHA-256.
pub type Hash = [u8; HASH_BYTES];

fn truncate(full: &[u8]) -> Hash {
    let mut out = [0u8; HASH_BYTES];
    out.copy_from_slice(&full[..HASH_BYTES]);
    out
}

/// The leaf of a key, from its ring position (`ring::key_position`).
pub fn leaf_of(position: &[u8; 32]) -> u8 {
    position[31]
}

/// The digest of a replica's state of a key. Two replicas holding the same causal state
/// (context, and siblings with their dots, values and metadata) get the same digest; the
/// node-local actor epoch is not part of it.
pub fn object_digest(object: &Object) -> Hash {
    let mut h = Sha256::new();
    let ctx = object.context();
    h.update((ctx.len() as u64).to_le_bytes());
    for (actor, n) in ctx.iter() {
        h.update((actor.node.len() as u64).to_le_bytes());
        h.update(actor.node.as_bytes());
        h.update(actor.incarnation.to_le_bytes());
        h.update(actor.epoch.to_le_bytes());
        h.update(n.to_le_bytes());
    }
    h.update((object.siblings().len() as u64).to_le_bytes());
    for s in object.siblings() {
        h.update((s.dot.actor.node.len() as u64).to_le_bytes());
        h.update(s.dot.actor.node.as_bytes());
        h.update(s.dot.actor.incarnation.to_le_bytes());
        h.update(s.dot.actor.epoch.to_le_bytes());
        h.update(s.dot.counter.to_le_bytes());
        h.update(s.meta.timestamp_ms.to_le_bytes());
        h.update([u8::from(s.meta.tombstone)]);
        h.update((s.value.len() as u64).to_le_bytes());
        h.update(&s.value);
    }
    truncate(&h.finalize())
}

/// A key's contribution to its leaf: binds the engine data key to the object digest.
pub fn entry_hash(data_key: &[u8], digest: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update((data_key.len() as u64).to_le_bytes());
    h.update(data_key);
    h.update(digest);
    truncate(&h.finalize())
}

fn hash_children(children: &[Hash]) -> Hash {
    let mut h = Sha256::new();
    for c in children {
        h.update(c);
    }
    truncate(&h.finalize())
}

/// The hash tree of one partition replica.
#[derive(Debug, Clone)]
pub struct Tree {
    leaves: Box<[Hash; LEAVES]>,
    groups: [Hash; FANOUT],
    root: Hash,
    /// Bit `g` set: group `g` (and so the root) must be recomputed before it is read.
    dirty: u32,
    keys: u64,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    /// The tree of a replica that holds no key.
    pub fn new() -> Self {
        let mut t = Tree {
            leaves: Box::new([[0u8; HASH_BYTES]; LEAVES]),
            groups: [[0u8; HASH_BYTES]; FANOUT],
            root: [0u8; HASH_BYTES],
            dirty: (1u32 << FANOUT) - 1,
            keys: 0,
        };
        t.refresh();
        t
    }

    /// Adds a key's entry to its leaf.
    pub fn insert(&mut self, leaf: u8, entry: &Hash) {
        self.toggle(leaf, entry);
        self.keys += 1;
    }

    /// Removes a key's entry (one that was inserted before) from its leaf.
    pub fn remove(&mut self, leaf: u8, entry: &Hash) {
        self.toggle(leaf, entry);
        self.keys = self.keys.saturating_sub(1);
    }

    fn toggle(&mut self, leaf: u8, entry: &Hash) {
        let slot = &mut self.leaves[usize::from(leaf)];
        for (a, b) in slot.iter_mut().zip(entry) {
            *a ^= b;
        }
        self.dirty |= 1 << (usize::from(leaf) / FANOUT);
    }

    /// Keys the tree holds.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    fn refresh(&mut self) {
        if self.dirty == 0 {
            return;
        }
        for g in 0..FANOUT {
            if self.dirty & (1 << g) != 0 {
                self.groups[g] = hash_children(&self.leaves[g * FANOUT..(g + 1) * FANOUT]);
            }
        }
        self.root = hash_children(&self.groups);
        self.dirty = 0;
    }

    /// The root hash.
    pub fn root(&mut self) -> Hash {
        self.refresh();
        self.root
    }

    /// The [`FANOUT`] group hashes under the root.
    pub fn groups(&mut self) -> Vec<Hash> {
        self.refresh();
        self.groups.to_vec()
    }

    /// The [`FANOUT`] leaf hashes of group `group` (empty for a group out of range).
    pub fn leaves(&self, group: u8) -> Vec<Hash> {
        let g = usize::from(group);
        if g >= FANOUT {
            return Vec::new();
        }
        self.leaves[g * FANOUT..(g + 1) * FANOUT].to_vec()
    }
}

/// One hash over a list of tree roots `(n, partition, root)`, in order: what two replicas
/// compare first, so that replicas in sync exchange a few dozen bytes.
pub fn roots_digest(roots: &[(u8, u32, Hash)]) -> Hash {
    let mut h = Sha256::new();
    for (n, p, root) in roots {
        h.update([*n]);
        h.update(p.to_be_bytes());
        h.update(root);
    }
    truncate(&h.finalize())
}

/// Positions where two hash lists of one level differ (a missing side counts as differing).
pub fn differing(local: &[Hash], remote: &[Hash]) -> Vec<u8> {
    let len = local.len().max(remote.len()).min(usize::from(u8::MAX) + 1);
    (0..len)
        .filter(|&i| local.get(i) != remote.get(i))
        .filter_map(|i| u8::try_from(i).ok())
        .collect()
}

/// What one side must do for the keys of a differing leaf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyDiff {
    /// Keys to fetch from the other side and merge here: it holds them and this side does
    /// not, or both hold different states.
    pub pull: Vec<Vec<u8>>,
    /// Keys to send to the other side after the pulls are merged: this side holds them and
    /// the other does not, or both hold different states.
    pub push: Vec<Vec<u8>>,
}

/// Compares the `(data key, object digest)` lists of one leaf on both sides; both lists
/// sorted by key. Keys in both with different digests are pulled and then pushed, so both
/// sides end with the merge of both states.
pub fn diff_keys(local: &[(Vec<u8>, Hash)], remote: &[(Vec<u8>, Hash)]) -> KeyDiff {
    let mut out = KeyDiff::default();
    let (mut i, mut j) = (0, 0);
    loop {
        match (local.get(i), remote.get(j)) {
            (Some((lk, ld)), Some((rk, rd))) if lk == rk => {
                if ld != rd {
                    out.pull.push(lk.clone());
                    out.push.push(lk.clone());
                }
                i += 1;
                j += 1;
            }
            (Some((lk, _)), Some((rk, _))) if lk < rk => {
                out.push.push(lk.clone());
                i += 1;
            }
            (Some((lk, _)), None) => {
                out.push.push(lk.clone());
                i += 1;
            }
            (_, Some((rk, _))) => {
                out.pull.push(rk.clone());
                j += 1;
            }
            (None, None) => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causality::{ActorId, Dot, VersionVector, WriteOp};

    fn object(value: &[u8]) -> Object {
        let mut o = Object::new();
        let dot = Dot {
            actor: ActorId {
                node: "n1".into(),
                incarnation: 7,
                epoch: 1,
            },
            counter: 1,
        };
        o.apply_write(&VersionVector::new(), dot, WriteOp::Put(value.to_vec()), 1);
        o
    }

    fn key(i: u32) -> (u8, Vec<u8>, Hash) {
        let dkey = format!("key-{i}").into_bytes();
        let leaf = (i % 256) as u8;
        (
            leaf,
            dkey.clone(),
            entry_hash(&dkey, &object_digest(&object(b"v"))),
        )
    }

    #[test]
    fn equal_contents_give_equal_roots_in_any_order() {
        let mut a = Tree::new();
        let mut b = Tree::new();
        let entries: Vec<_> = (0..500).map(key).collect();
        for (leaf, _, e) in &entries {
            a.insert(*leaf, e);
        }
        for (leaf, _, e) in entries.iter().rev() {
            b.insert(*leaf, e);
        }
        assert_eq!(a.root(), b.root());
        assert_eq!(a.keys(), 500);
        assert_ne!(
            a.root(),
            Tree::new().root(),
            "a non-empty tree differs from empty"
        );
    }

    #[test]
    fn a_changed_key_is_found_by_descending() {
        let mut a = Tree::new();
        let mut b = Tree::new();
        for (leaf, _, e) in (0..1000).map(key) {
            a.insert(leaf, &e);
            b.insert(leaf, &e);
        }
        let (leaf, dkey, old) = key(77);
        let new = entry_hash(&dkey, &object_digest(&object(b"other")));
        b.remove(leaf, &old);
        b.insert(leaf, &new);
        assert_ne!(a.root(), b.root());
        let groups = differing(&a.groups(), &b.groups());
        assert_eq!(groups, vec![leaf / FANOUT as u8]);
        let leaves = differing(&a.leaves(groups[0]), &b.leaves(groups[0]));
        assert_eq!(leaves, vec![leaf % FANOUT as u8]);
        // Undoing the change restores equality: removal is exact.
        b.remove(leaf, &new);
        b.insert(leaf, &old);
        assert_eq!(a.root(), b.root());
    }

    #[test]
    fn digests_ignore_nothing_that_replicas_compare() {
        let a = object(b"x");
        assert_eq!(object_digest(&a), object_digest(&a.clone()));
        assert_ne!(object_digest(&a), object_digest(&object(b"y")));
        assert_ne!(object_digest(&a), object_digest(&Object::new()));
    }

    #[test]
    fn key_diffs_pull_and_push_the_right_keys() {
        let h = |b: u8| [b; HASH_BYTES];
        let local = vec![
            (b"a".to_vec(), h(1)),
            (b"b".to_vec(), h(2)),
            (b"d".to_vec(), h(4)),
        ];
        let remote = vec![
            (b"b".to_vec(), h(9)),
            (b"c".to_vec(), h(3)),
            (b"d".to_vec(), h(4)),
        ];
        let d = diff_keys(&local, &remote);
        assert_eq!(d.pull, vec![b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(d.push, vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(diff_keys(&local, &local), KeyDiff::default());
        assert_eq!(differing(&[h(1), h(2)], &[h(1)]), vec![1]);
    }
}
