//! The key-value service of one node: the sans-IO [`Replica`] of `quiver-node-core` (record
//! rules, hints, the anti-entropy index) with what needs the async runtime around it: the
//! group-commit wait for durable writes, and the reconciler calls of server-side updates
//! and the sibling guard (`reconciled.rs`), which run on the plugin pool with no lock held.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use quiver_core::causality::{Object, WriteOp};
use quiver_node_core::SystemClock;
use quiver_node_core::epochs::BootEpochs;
use quiver_node_core::replica::{KEY_LOCK_STRIPES, LocalWrite, Replica, stripe};
use quiver_storage::{Durability, Store};

use crate::plugins::Attached;

pub use quiver_node_core::replica::{HINTS_MAX_DEFAULT, HintedKey, KvError, WriteOutcome};

mod reconciled;

/// Number of stripes serialising server-side updates of one key: one per record lock
/// stripe.
const UPDATE_LOCK_STRIPES: usize = KEY_LOCK_STRIPES;

/// A validated write.
#[derive(Debug)]
pub struct WriteArgs<'a> {
    /// Bucket.
    pub bucket: &'a str,
    /// Key.
    pub key: &'a [u8],
    /// Opaque client context (empty for none).
    pub context: &'a [u8],
    /// Value or tombstone.
    pub op: WriteOp,
    /// Durability for this write.
    pub durability: Durability,
    /// Coordinator wall clock, ms since the Unix epoch.
    pub now_ms: u64,
    /// Set when this node coordinates as a fallback for an unreachable primary.
    pub hint_for: Option<&'a str>,
    /// The bucket's reconciler, if any: it computes `update_op` writes and merges the
    /// siblings once more than `sibling_threshold` accumulate.
    pub reconciling: Option<Attached>,
    /// A server-side operation for the reconciler's `update` (then `op` is ignored).
    pub update_op: Option<&'a [u8]>,
    /// The sibling-explosion guard's threshold.
    pub sibling_threshold: u32,
}

/// The service: a [`Replica`] (every synchronous operation is the replica's, reached
/// through `Deref`) over the node's group-commit [`Store`].
#[derive(Debug)]
pub struct KvService {
    replica: Replica,
    store: Store,
    /// Server-side updates of one key run one at a time (see `reconciled.rs`); an async
    /// stripe, held across the plugin call, which gets and puts never take.
    update_locks: Box<[tokio::sync::Mutex<()>]>,
}

impl Deref for KvService {
    type Target = Replica;

    fn deref(&self) -> &Replica {
        &self.replica
    }
}

impl DerefMut for KvService {
    fn deref_mut(&mut self) -> &mut Replica {
        &mut self.replica
    }
}

impl KvService {
    /// Builds the service over a store whose boot has started (the epochs' batch durable).
    pub fn new(node: String, store: Store, epochs: BootEpochs, value_bytes_max: usize) -> Self {
        let engine = Arc::new(store.clone());
        let replica = Replica::new(node, engine, epochs, value_bytes_max, Arc::new(SystemClock));
        let update_locks = (0..UPDATE_LOCK_STRIPES)
            .map(|_| tokio::sync::Mutex::new(()))
            .collect();
        KvService {
            replica,
            store,
            update_locks,
        }
    }

    /// The group-commit store (for shutdown flushes and stats).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Coordinates a put, delete or server-side update. Returns the context of the new
    /// version: the client's context plus the new dot, so that a follow-up write replaces
    /// exactly what this client has seen and not siblings written concurrently by others.
    pub async fn write(&self, mut args: WriteArgs<'_>) -> Result<WriteOutcome, KvError> {
        let (dkey, client_context) =
            self.replica
                .check_write(args.bucket, args.key, &args.op, args.context)?;
        if let (Some(attached), Some(op)) = (&args.reconciling, args.update_op) {
            return self.write_update(&args, &dkey, attached, op).await;
        }
        // Taken, not cloned: a value may be a mebibyte.
        let op = std::mem::replace(&mut args.op, WriteOp::Delete);
        let mut outcome = self.replica.write(
            &dkey,
            LocalWrite {
                bucket: args.bucket,
                key: args.key,
                context: &client_context,
                op,
                now_ms: args.now_ms,
                hint_for: args.hint_for,
            },
        )?;
        // Sibling-explosion guard: past the bucket's threshold, the reconciler merges the
        // siblings into one version (off the key lock; see `reconciled.rs`). If it fails or
        // the key changed meanwhile, the write stands as is and the next one guards again.
        if let Some(attached) = &args.reconciling
            && outcome.object.siblings().len() > args.sibling_threshold as usize
            && let Some((merged, seen, merged_dot)) = self
                .guard(&args, &dkey, attached, outcome.object.clone())
                .await?
        {
            outcome.object = merged;
            outcome.context.join(&seen);
            outcome.context.add(&merged_dot);
        }
        if args.durability == Durability::Sync {
            self.sync(args.bucket, args.key).await?;
        }
        Ok(outcome)
    }

    /// Merges another replica's state of a key in ([`Replica::merge_remote`]); with
    /// `Durability::Sync`, returns once it is durable (also when nothing changed: the record
    /// may have arrived earlier by a buffered path and not be on disk yet).
    pub async fn merge_remote(
        &self,
        bucket: &str,
        key: &[u8],
        incoming: &Object,
        durability: Durability,
        hint_for: Option<&str>,
    ) -> Result<bool, KvError> {
        let changed = self.replica.merge_remote(bucket, key, incoming, hint_for)?;
        if durability == Durability::Sync {
            self.sync(bucket, key).await?;
        }
        Ok(changed)
    }

    /// The owner acknowledged a delivered hint ([`Replica::hint_delivered`]); returns once
    /// the cleanup is durable.
    pub async fn hint_delivered(
        &self,
        owner: &str,
        bucket: &str,
        key: &[u8],
        delivered: &Object,
        keep_copy: bool,
    ) -> Result<(), KvError> {
        if self
            .replica
            .hint_delivered(owner, bucket, key, delivered, keep_copy)?
        {
            self.sync(bucket, key).await?;
        }
        Ok(())
    }

    /// Waits for a group-commit sync that makes every write applied so far durable.
    async fn sync(&self, bucket: &str, key: &[u8]) -> Result<(), KvError> {
        self.store
            .sync_applied()
            .await
            .map_err(|e| self.replica.storage_err(bucket, key, e))
    }
}
