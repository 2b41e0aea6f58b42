//! Hinted handoff, the delivery side: one pass hands the keys a fallback holds for each
//! owner back to that owner, one `Store` at a time, and cleans up after each acknowledged
//! one (the hint marker, and the copy too when this node is not a replica of the key and no
//! other hint needs it).
//!
//! A [`HintPass`] is a sans-IO state machine: [`HintPass::next`] says which `Store` to send
//! (or that the pass is over), the driver sends it and reports the owner's answer to
//! [`HintPass::on_reply`], which applies the cleanup through the [`Replica`]. The server
//! awaits each call; the simulator delivers the reply as a later event, with anything else
//! interleaved in between — the same steps, in the same order.

use std::collections::VecDeque;

use quiver_core::replica;

use crate::replica::{HintedKey, KvError, Replica};

/// Keys handed over per owner and pass at most.
pub const HINT_BATCH_KEYS: usize = 256;

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum HintStep {
    /// Send `hinted`'s state to `owner` as a durable `Store` (no hint of its own), then
    /// report the answer with [`HintPass::on_reply`].
    Store {
        /// The node the key was hinted for.
        owner: String,
        /// The key and this node's current state of it.
        hinted: HintedKey,
    },
    /// The pass is over.
    Done {
        /// Hints whose owner acknowledged them in this pass.
        delivered: u64,
    },
}

/// The owner's answer to a hinted `Store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreReply {
    /// Stored (durably): the hint is delivered.
    Stored,
    /// Refused or answered otherwise: this key stays hinted, the pass goes on.
    Refused,
    /// No answer: the owner went away again (the failure detector marks it down); its
    /// other keys wait for a later pass.
    Unreachable,
}

/// One hint-delivery pass over every owner.
#[derive(Debug, Default)]
pub struct HintPass {
    owners: VecDeque<String>,
    owner: String,
    batch: VecDeque<HintedKey>,
    in_flight: Option<HintedKey>,
    delivered: u64,
}

impl HintPass {
    /// A pass over `owners` (the other members), in order.
    pub fn new(owners: impl IntoIterator<Item = String>) -> HintPass {
        HintPass {
            owners: owners.into_iter().collect(),
            ..HintPass::default()
        }
    }

    /// True while a `Store` is out and its answer not yet reported.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The next `Store` to send, or [`HintStep::Done`]. Owners that are not up (`is_up`)
    /// are skipped; an owner whose hints cannot be read is skipped too (and logged).
    /// Call again only after reporting the previous `Store`'s answer.
    pub fn next(&mut self, replica: &Replica, is_up: &dyn Fn(&str) -> bool) -> HintStep {
        loop {
            if let Some(hinted) = self.in_flight.clone() {
                // The previous answer was not reported: send it again rather than skip it.
                return HintStep::Store {
                    owner: self.owner.clone(),
                    hinted,
                };
            }
            if let Some(hinted) = self.batch.pop_front() {
                self.in_flight = Some(hinted.clone());
                return HintStep::Store {
                    owner: self.owner.clone(),
                    hinted,
                };
            }
            let Some(owner) = self.owners.pop_front() else {
                return HintStep::Done {
                    delivered: self.delivered,
                };
            };
            if !is_up(&owner) {
                continue;
            }
            match replica.hinted_keys(&owner, HINT_BATCH_KEYS) {
                Ok(batch) => self.batch = batch.into(),
                Err(e) => tracing::error!(owner, error = %e, "cannot read hints"),
            }
            self.owner = owner;
        }
    }

    /// The owner's answer to the `Store` [`HintPass::next`] gave. On `Stored`, drops the
    /// hint marker, and the copy when `is_primary(bucket, key)` is false and no member of
    /// `members` other than the owner has a hint for the key here. Returns true when that
    /// changed the disk: the driver makes it durable before the next step.
    pub fn on_reply(
        &mut self,
        replica: &Replica,
        reply: StoreReply,
        is_primary: &dyn Fn(&str, &[u8]) -> bool,
        members: &[String],
    ) -> Result<bool, KvError> {
        let Some(hinted) = self.in_flight.take() else {
            return Ok(false);
        };
        match reply {
            StoreReply::Stored => {}
            StoreReply::Refused => return Ok(false),
            StoreReply::Unreachable => {
                self.batch.clear();
                return Ok(false);
            }
        }
        let owner = &self.owner;
        let keep = replica::keep_copy_after_handoff(
            is_primary(&hinted.bucket, &hinted.key),
            members
                .iter()
                .any(|o| o != owner && replica.has_hint(o, &hinted.bucket, &hinted.key)),
        );
        let changed =
            replica.hint_delivered(owner, &hinted.bucket, &hinted.key, &hinted.object, keep)?;
        self.delivered += 1;
        Ok(changed)
    }
}
