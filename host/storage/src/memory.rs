//! An in-memory engine: a `BTreeMap` under a lock.
//!
//! Nothing survives a restart, so `sync` has nothing to do. Used by tests, the deterministic
//! simulation and throw-away dev clusters, and as the reference the conformance suite was
//! written against.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use quiver_core::storage::{BatchOp, StorageEngine, StorageError, WriteBatch};

const NAME: &str = "memory";

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// An ordered byte map held in memory. See the [module docs](self).
#[derive(Debug, Default)]
pub struct MemoryEngine {
    map: RwLock<Map>,
}

impl MemoryEngine {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, Map>, StorageError> {
        self.map.read().map_err(poisoned)
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, Map>, StorageError> {
        self.map.write().map_err(poisoned)
    }
}

/// A poisoned lock means a thread panicked while holding it, possibly halfway through a
/// batch, so the map may hold part of a batch: refuse to serve rather than expose it.
fn poisoned<T>(_: PoisonError<T>) -> StorageError {
    StorageError::Poisoned {
        engine: NAME.to_owned(),
        cause: "a thread panicked while holding the engine lock".to_owned(),
    }
}

impl StorageEngine for MemoryEngine {
    fn name(&self) -> &str {
        NAME
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.read()?.get(key).cloned())
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        // One write lock for the whole batch: readers see all of it or none of it.
        let mut map = self.write()?;
        for op in &batch.ops {
            match op {
                BatchOp::Put { key, value } => {
                    map.insert(key.clone(), value.clone());
                }
                BatchOp::Delete { key } => {
                    map.remove(key.as_slice());
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        // Still check the lock so a poisoned engine fails `sync` too, as the contract asks.
        self.read().map(drop)
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        // `BTreeMap::range` panics when start > end; an inverted range is simply empty.
        if limit == 0 || end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        let map = self.read()?;
        Ok(map
            .range::<[u8], _>((Bound::Included(start), upper))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}
