//! The storage-engine contract.
//!
//! An engine is an ordered byte map with atomic batches. It knows nothing of buckets,
//! versions or replication: the node layers those on top (see [`keys`]). Durability is split
//! in two steps on purpose: [`StorageEngine::apply`] makes a batch visible to readers, and
//! [`StorageEngine::sync`] makes everything applied so far durable. The node's group commit
//! applies many writers' batches and then issues one `sync` for all of them.
//!
//! Engine contract (checked by the conformance suite every engine must pass):
//! - `apply` is atomic: after it returns, every operation of the batch is visible, and a
//!   crash never exposes part of a batch.
//! - After `sync` returns `Ok`, every batch applied before the call survives a crash.
//! - After `sync` fails once, the engine may have lost data it claimed to hold, so every later
//!   `apply` and `sync` must fail with [`StorageError::Poisoned`] until reopened.
//! - `scan` returns pairs in ascending key order within `[start, end)`.

use std::fmt;

/// One operation of a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    /// Insert or overwrite `key` with `value`.
    Put {
        /// Engine key.
        key: Vec<u8>,
        /// Engine value.
        value: Vec<u8>,
    },
    /// Remove `key` (a no-op if absent).
    Delete {
        /// Engine key.
        key: Vec<u8>,
    },
}

/// An ordered list of operations applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// Operations, applied in order.
    pub ops: Vec<BatchOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a put.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(BatchOp::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }
    /// Adds a delete.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(BatchOp::Delete { key: key.into() });
        self
    }
    /// True when the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The engine failed an I/O operation.
    #[error("storage engine {engine}: I/O error during {op}: {message}")]
    Io {
        /// Engine name.
        engine: String,
        /// What was being done.
        op: &'static str,
        /// The underlying error, rendered.
        message: String,
    },
    /// A previous sync failed; the engine refuses writes until it is reopened, because it can
    /// no longer tell which acknowledged data is on disk.
    #[error(
        "storage engine {engine} is poisoned after a failed sync ({cause}); restart the node to recover"
    )]
    Poisoned {
        /// Engine name.
        engine: String,
        /// The failure that poisoned it.
        cause: String,
    },
    /// Stored bytes could not be decoded.
    #[error("storage engine {engine}: corrupt record at key {key_hex}: {message}")]
    Corrupt {
        /// Engine name.
        engine: String,
        /// The key, hex encoded (possibly truncated).
        key_hex: String,
        /// What was wrong.
        message: String,
    },
    /// The engine was shut down.
    #[error("storage engine {engine} is closed")]
    Closed {
        /// Engine name.
        engine: String,
    },
}

/// Key-value pairs as returned by a scan, in ascending key order.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered, batch-atomic byte map. See the module docs for the contract.
pub trait StorageEngine: Send + Sync + fmt::Debug + 'static {
    /// Short engine name for errors and metrics ("fjall", "memory", ...).
    fn name(&self) -> &str;
    /// Reads one key.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Applies a batch atomically; not necessarily durable until [`StorageEngine::sync`].
    fn apply(&self, batch: &WriteBatch) -> Result<(), StorageError>;
    /// Makes every batch applied so far durable (fsync or equivalent).
    fn sync(&self) -> Result<(), StorageError>;
    /// Pairs with `start <= key < end` (no upper bound when `end` is `None`) in ascending
    /// key order, at most `limit` of them.
    fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize)
    -> Result<KvPairs, StorageError>;
}

/// The key layout the node uses on top of an engine.
///
/// Data keys are `b'd'`, the bucket length as one byte, the bucket, then the key, so that
/// all keys of a bucket are contiguous and no bucket's range contains another's.
/// Node metadata lives under `b'm'`.
pub mod keys {
    use crate::limits::BUCKET_BYTES_MAX;

    /// Prefix of data records.
    pub const DATA_PREFIX: u8 = b'd';
    /// Prefix of node metadata.
    pub const META_PREFIX: u8 = b'm';

    /// Engine key of a data record. Returns `None` if the bucket name is longer than
    /// [`BUCKET_BYTES_MAX`] (callers validate first; this keeps the layout unambiguous).
    pub fn data_key(bucket: &[u8], key: &[u8]) -> Option<Vec<u8>> {
        if bucket.len() > BUCKET_BYTES_MAX {
            return None;
        }
        let mut out = Vec::with_capacity(2 + bucket.len() + key.len());
        out.push(DATA_PREFIX);
        out.push(u8::try_from(bucket.len()).ok()?);
        out.extend_from_slice(bucket);
        out.extend_from_slice(key);
        Some(out)
    }

    /// Splits an engine data key back into `(bucket, key)`.
    pub fn split_data_key(engine_key: &[u8]) -> Option<(&[u8], &[u8])> {
        let (&prefix, rest) = engine_key.split_first()?;
        if prefix != DATA_PREFIX {
            return None;
        }
        let (&len, rest) = rest.split_first()?;
        let len = usize::from(len);
        if rest.len() < len {
            return None;
        }
        Some(rest.split_at(len))
    }

    /// Prefix of hint markers: a fallback's note that it holds a key for another node.
    pub const HINT_PREFIX: u8 = b'h';

    /// Engine key of a hint marker: `h`, the owner's name length, the owner, then the data
    /// key it refers to. All hints for one owner are contiguous, for delivery scans.
    /// Returns `None` for an owner name over 255 bytes.
    pub fn hint_key(owner: &str, data_key: &[u8]) -> Option<Vec<u8>> {
        let mut out = hint_prefix(owner)?;
        out.extend_from_slice(data_key);
        Some(out)
    }

    /// The prefix shared by every hint marker for `owner`.
    pub fn hint_prefix(owner: &str) -> Option<Vec<u8>> {
        let len = u8::try_from(owner.len()).ok()?;
        let mut out = Vec::with_capacity(2 + owner.len());
        out.push(HINT_PREFIX);
        out.push(len);
        out.extend_from_slice(owner.as_bytes());
        Some(out)
    }

    /// Splits a hint marker key into `(owner, data key)`.
    pub fn split_hint_key(engine_key: &[u8]) -> Option<(&str, &[u8])> {
        let (&prefix, rest) = engine_key.split_first()?;
        if prefix != HINT_PREFIX {
            return None;
        }
        let (&len, rest) = rest.split_first()?;
        let len = usize::from(len);
        if rest.len() < len {
            return None;
        }
        let (owner, dkey) = rest.split_at(len);
        Some((std::str::from_utf8(owner).ok()?, dkey))
    }

    /// The smallest key greater than every key starting with `prefix` (for scan bounds),
    /// or `None` when no such key exists (all bytes 0xff).
    pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
        let mut end = prefix.to_vec();
        while let Some(last) = end.pop() {
            if last < u8::MAX {
                end.push(last + 1);
                return Some(end);
            }
        }
        None
    }

    /// Prefix of anti-entropy entries: the leaf level of the hash trees, kept on disk in the
    /// same batch as the data record it describes, so the trees can never drift from the data.
    pub const AE_PREFIX: u8 = b'a';

    /// Bytes of an anti-entropy entry's key before the data key: prefix, partition, leaf.
    const AE_HEAD: usize = 6;

    /// Engine key of the anti-entropy entry of `data_key`: `a`, the partition (big-endian),
    /// the leaf, then the data key, so that the keys of one leaf are contiguous.
    pub fn ae_key(partition: u32, leaf: u8, data_key: &[u8]) -> Vec<u8> {
        let mut out = ae_leaf_prefix(partition, leaf);
        out.extend_from_slice(data_key);
        out
    }

    /// The prefix shared by every anti-entropy entry of one leaf.
    pub fn ae_leaf_prefix(partition: u32, leaf: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(AE_HEAD + 32);
        out.push(AE_PREFIX);
        out.extend_from_slice(&partition.to_be_bytes());
        out.push(leaf);
        out
    }

    /// Splits an anti-entropy entry key into `(partition, leaf, data key)`.
    pub fn split_ae_key(engine_key: &[u8]) -> Option<(u32, u8, &[u8])> {
        if engine_key.len() < AE_HEAD || engine_key[0] != AE_PREFIX {
            return None;
        }
        let mut p = [0u8; 4];
        p.copy_from_slice(&engine_key[1..5]);
        Some((u32::from_be_bytes(p), engine_key[5], &engine_key[AE_HEAD..]))
    }

    /// Prefix of the tombstone index: one entry per key whose every sibling is a
    /// tombstone, so the reaper never scans live data.
    pub const REAP_PREFIX: u8 = b't';

    /// Engine key of the tombstone-index entry of `data_key`.
    pub fn reap_key(data_key: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + data_key.len());
        out.push(REAP_PREFIX);
        out.extend_from_slice(data_key);
        out
    }

    /// Engine key of a node metadata entry.
    pub fn meta_key(name: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + name.len());
        out.push(META_PREFIX);
        out.extend_from_slice(name.as_bytes());
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn data_keys_round_trip_and_buckets_do_not_overlap() {
            let k = data_key(b"ab", b"c").expect("short bucket");
            assert_eq!(split_data_key(&k), Some((&b"ab"[..], &b"c"[..])));
            // Bucket "a" with key "bc" must not collide with bucket "ab" key "c".
            let other = data_key(b"a", b"bc").expect("short bucket");
            assert_ne!(k, other);
            assert!(data_key(&[0u8; 256], b"k").is_none());
        }

        #[test]
        fn ae_keys_round_trip_and_group_by_leaf() {
            let d = data_key(b"b", b"k").expect("short bucket");
            let a = ae_key(300, 7, &d);
            assert_eq!(split_ae_key(&a), Some((300, 7, d.as_slice())));
            assert!(a.starts_with(&ae_leaf_prefix(300, 7)));
            assert!(!a.starts_with(&ae_leaf_prefix(300, 8)));
            assert_eq!(split_ae_key(b"a12"), None);
        }

        #[test]
        fn hint_keys_round_trip_and_group_by_owner() {
            let d = data_key(b"b", b"k").expect("short bucket");
            let h = hint_key("n2", &d).expect("short owner");
            assert_eq!(split_hint_key(&h), Some(("n2", d.as_slice())));
            let p = hint_prefix("n2").expect("short owner");
            assert!(h.starts_with(&p));
            assert!(!hint_key("n22", &d).expect("short").starts_with(&p));
            assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
            assert_eq!(prefix_end(&[0xff]), None);
        }
    }
}
