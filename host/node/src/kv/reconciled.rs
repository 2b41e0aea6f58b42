//! Writes that call the bucket's reconciler: server-side updates and the sibling guard.
//!
//! A plugin call may burn its whole fuel (up to a second of CPU), so it never runs under
//! the key's lock stripe (which other keys share) or the epochs mutex (which every write
//! takes), nor on an async worker: the replica reads the record under the lock
//! ([`Replica::update_begin`]), the plugin runs on the plugin pool with no lock held, and
//! the replica writes the result only if the record is still the one the plugin saw
//! ([`Replica::update_commit`], [`Replica::guard_commit`]). Otherwise an update reads
//! again; the guard gives up (the next write past the threshold guards again).
//!
//! [`Replica::update_begin`]: quiver_node_core::replica::Replica::update_begin
//! [`Replica::update_commit`]: quiver_node_core::replica::Replica::update_commit
//! [`Replica::guard_commit`]: quiver_node_core::replica::Replica::guard_commit

use quiver_core::causality::{Dot, Object, VersionVector};
use quiver_node_core::record::render_key;
use quiver_storage::Durability;

use super::{KvError, KvService, WriteArgs, WriteOutcome, stripe};
use crate::plugins::Attached;

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
            let snapshot = self.update_begin(args.bucket, args.key, dkey)?;
            let seen: Object = snapshot
                .record
                .as_ref()
                .map(|r| r.object.clone())
                .unwrap_or_default();
            let actor = self.actor_of(snapshot.epoch);
            let value = attached
                .update_pooled(seen, op.to_vec(), actor)
                .await
                .map_err(plugin_err)?;
            let Some(outcome) =
                self.update_commit(args.bucket, args.key, dkey, &snapshot, value, args.now_ms)?
            else {
                continue;
            };
            if args.durability == Durability::Sync {
                self.sync(args.bucket, args.key).await?;
            }
            return Ok(outcome);
        }
        Err(KvError::Invalid {
            code: quiver_sdk::wire::ErrorCode::Timeout,
            message: format!(
                "node {}: bucket {:?} key {}: the key changed {UPDATE_ATTEMPTS_MAX} times \
                 while its update ran; nothing was written, retry",
                self.node(),
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
        self.guard_commit(
            args.bucket,
            args.key,
            dkey,
            &object,
            merged.into_op(),
            args.now_ms,
        )
    }
}
