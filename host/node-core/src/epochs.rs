//! The node's durable actor-epoch allocator (see `quiver_core::causality` for why epochs
//! exist).
//!
//! Each start of a node is a *boot*. The boot number is stored under `m/boot` and bumped
//! with an fsync before the node serves anything; boot `b` owns the epochs
//! `[b << 32, (b + 1) << 32)`, handed out from an in-memory counter. An epoch found in a
//! local record is trusted only if it belongs to the current boot and was handed out by
//! it: a crash may have rolled records of an earlier boot back (buffered writes), so those
//! epochs are never continued. The data directory's `incarnation` (random, created once,
//! under `m/incarnation`) separates a wiped node from its former self.

use quiver_core::causality::EpochSource;
use quiver_core::storage::{StorageError, WriteBatch, keys};

use quiver_core::storage::StorageEngine;

/// Bits of an epoch that count within one boot.
const EPOCH_BITS_PER_BOOT: u32 = 32;

/// Errors of the allocator.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A metadata entry is not 8 bytes.
    #[error("node metadata {name} is corrupt ({len} bytes, expected 8)")]
    Corrupt {
        /// Entry name.
        name: &'static str,
        /// Its length.
        len: usize,
    },
    /// Boot numbers ran out (2^32 restarts).
    #[error("boot counter exhausted")]
    BootsExhausted,
}

/// The allocator for one boot.
#[derive(Debug)]
pub struct BootEpochs {
    incarnation: u64,
    boot: u64,
    next: u64,
    end: u64,
    /// BROKEN VARIANT (simulator only): trust every epoch found in a local record, even
    /// one of an earlier boot whose records a crash may have rolled back.
    #[cfg(feature = "broken-variants")]
    trust_all: bool,
}

fn read_u64(store: &dyn StorageEngine, name: &'static str) -> Result<Option<u64>, EpochError> {
    match store.get(&keys::meta_key(name))? {
        None => Ok(None),
        Some(bytes) => {
            let arr: [u8; 8] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| EpochError::Corrupt {
                    name,
                    len: bytes.len(),
                })?;
            Ok(Some(u64::from_be_bytes(arr)))
        }
    }
}

impl BootEpochs {
    /// Starts a new boot: creates the incarnation on first start and bumps the boot number.
    /// Returns the allocator and the batch that records both: the caller must apply it and
    /// make it durable before the allocator hands out any epoch (or a crash could let the
    /// next boot reuse this one's epochs).
    pub fn start(
        store: &dyn StorageEngine,
        fresh_incarnation: u64,
    ) -> Result<(BootEpochs, WriteBatch), EpochError> {
        let incarnation = read_u64(store, "incarnation")?;
        let previous = read_u64(store, "boot")?.unwrap_or(0);
        let boot = previous.checked_add(1).ok_or(EpochError::BootsExhausted)?;
        if boot >= 1 << (64 - EPOCH_BITS_PER_BOOT) {
            return Err(EpochError::BootsExhausted);
        }
        let mut batch = WriteBatch::new();
        let incarnation = match incarnation {
            Some(i) => i,
            None => {
                batch.put(
                    keys::meta_key("incarnation"),
                    fresh_incarnation.to_be_bytes().to_vec(),
                );
                fresh_incarnation
            }
        };
        batch.put(keys::meta_key("boot"), boot.to_be_bytes().to_vec());
        let next = boot << EPOCH_BITS_PER_BOOT;
        let epochs = BootEpochs {
            incarnation,
            boot,
            next,
            end: next + (1 << EPOCH_BITS_PER_BOOT),
            #[cfg(feature = "broken-variants")]
            trust_all: false,
        };
        Ok((epochs, batch))
    }

    /// The data directory's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// This boot's number.
    pub fn boot(&self) -> u64 {
        self.boot
    }

    /// BROKEN VARIANT (simulator only): trust every epoch, so a dot may be issued twice
    /// after a crash; the simulator shows its checkers catch it.
    #[cfg(feature = "broken-variants")]
    pub fn trust_all_epochs(&mut self) {
        self.trust_all = true;
    }

    /// True when another fresh epoch can be handed out in this boot.
    pub fn has_capacity(&self) -> bool {
        self.next < self.end
    }
}

impl EpochSource for BootEpochs {
    fn is_trusted(&self, epoch: u64) -> bool {
        #[cfg(feature = "broken-variants")]
        if self.trust_all {
            return true;
        }
        epoch >> EPOCH_BITS_PER_BOOT == self.boot && epoch < self.next
    }

    fn fresh(&mut self) -> u64 {
        // Callers check `has_capacity` first; saturate rather than wrap into the next boot.
        let e = self.next.min(self.end - 1);
        self.next = self.next.saturating_add(1).min(self.end);
        e
    }
}
