//! Writes that call the bucket's reconciler: server-side updates and the sibling guard.
//!
//! A plugin call may burn its whole fuel (up to a second of CPU), so it never runs under
//! the key's lock stripe (which other keys share) or the epochs mutex (which every write
//! takes), nor on an async worker: the record is read under the lock, the plugin runs on
//! the plugin pool with no lock held, and the result is written under the lock only if the
//! record is still the one the plugin saw. Otherwise an update reads again; the guard gives
//! up (the next write past the threshold guards again).

use quiver_core::causality::{
    self, ChosenEpoch, Dot, LocalRecord, Object, VersionVector, WriteOp, coordinate_write,
};

use super::{KvError, KvService, WriteArgs, WriteOutcome, lock, stripe};
use crate::plugins::Attached;
use crate::record::render_key;
use quiver_storage::Durability;

/// Times an update reads the key again because a write landed while its plugin ran. Updates
/// of one key are serialised, so only puts, deletes and replica merges of that key race
/// with it.
const UPDATE_ATTEMPTS_MAX: usize = 8;

impl KvService {
    /// A server-side update: the plugin's `update` applied to everything this replica
    /// holds for the key, merged, written with a context covering all of it.
    pub(super) async fn write_update(
        &self,
        args: &WriteArgs<'_>,
        dkey: &[u8],
        attached: &Attached,
        op: &[u8],
    ) -> Result<WriteOutcome, KvError> {
        let plugin_err = |message: String| KvError::Plugin {
            message: format!(
                "bucket {:?} key {}: {message}",
                args.bucket,
                render_key(args.key)
            ),
        };
        // One update of a key at a time: a hot counter's updates queue here instead of
        // invalidating each other's plugin calls. Other keys' updates share the stripe
        // only by hash collision; gets and puts never take it.
        let _serial = self.update_locks[stripe(dkey)].lock().await;
        for _ in 0..UPDATE_ATTEMPTS_MAX {
            let (snapshot, epoch) = {
                let _guard = lock(&self.locks[stripe(dkey)]);
                let local = self.read_record(args.bucket, args.key, dkey)?;
                let mut epochs = lock(&self.epochs);
                self.epoch_capacity(local.as_ref(), &epochs)?;
                let epoch = causality::next_epoch(local.as_ref(), &self.me, &mut *epochs);
                (local, epoch)
            };
            let seen: Object = snapshot
                .as_ref()
                .map(|r| r.object.clone())
                .unwrap_or_default();
            let actor = self.me.actor(epoch).to_string();
            let value = attached
                .update_pooled(seen.clone(), op.to_vec(), actor)
                .await
                .map_err(plugin_err)?;
            let written = {
                let _guard = lock(&self.locks[stripe(dkey)]);
                let local = self.read_record(args.bucket, args.key, dkey)?;
                if local != snapshot {
                    None
                } else {
                    let context = seen.context().clone();
                    let (record, dot) = coordinate_write(
                        local,
                        &self.me,
                        &mut ChosenEpoch(epoch),
                        &context,
                        WriteOp::Put(value),
                        args.now_ms,
                    );
                    // The record as it was (absent stays absent for the AE index).
                    let prior = snapshot.as_ref().map(|r| &r.object);
                    self.store_record(args, dkey, prior, &record)?;
                    Some((record, dot, context))
                }
            };
            let Some((record, dot, mut context)) = written else {
                continue;
            };
            context.add(&dot);
            if args.durability == Durability::Sync {
                self.store
                    .sync_applied()
                    .await
                    .map_err(|e| self.storage_err(args.bucket, args.key, e))?;
            }
            return Ok(WriteOutcome {
                context,
                object: record.object,
            });
        }
        Err(KvError::Invalid {
            code: quiver_sdk::wire::ErrorCode::Timeout,
            message: format!(
                "node {}: bucket {:?} key {}: the key changed {UPDATE_ATTEMPTS_MAX} times \
                 while its update ran; nothing was written, retry",
                self.me.node,
                args.bucket,
                render_key(args.key)
            ),
        })
    }

    /// The sibling guard: merges `object` (just written, past the bucket's threshold) with
    /// the plugin and writes the merge with a context covering it, if the key still holds
    /// exactly `object`. Returns the new object, the context the merge covered and its dot.
    pub(super) async fn guard(
        &self,
        args: &WriteArgs<'_>,
        dkey: &[u8],
        attached: &Attached,
        object: Object,
    ) -> Result<Option<(Object, VersionVector, Dot)>, KvError> {
        let merged = match attached.merge_pooled(object.clone()).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(
                    bucket = args.bucket,
                    key = %render_key(args.key),
                    error = %e,
                    "sibling guard: merge failed, siblings kept"
                );
                return Ok(None);
            }
        };
        let _guard = lock(&self.locks[stripe(dkey)]);
        let local: Option<LocalRecord> = self.read_record(args.bucket, args.key, dkey)?;
        let Some(local) = local.filter(|r| r.object == object) else {
            return Ok(None);
        };
        let seen = object.context().clone();
        let mut epochs = lock(&self.epochs);
        self.epoch_capacity(Some(&local), &epochs)?;
        let (record, dot) = coordinate_write(
            Some(local),
            &self.me,
            &mut *epochs,
            &seen,
            merged.into_op(),
            args.now_ms,
        );
        drop(epochs);
        self.store_record(args, dkey, Some(&object), &record)?;
        Ok(Some((record.object, seen, dot)))
    }
}
