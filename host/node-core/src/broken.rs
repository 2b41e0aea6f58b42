//! Deliberately broken variants of the node's rules, so the simulator can show that each
//! rule is load-bearing: with a variant on, some seed loses an acknowledged write,
//! resurrects a deletion or never settles, and a checker says so.
//!
//! Production code asks [`Broken::is`] at the one place each rule is applied. Without the
//! cargo feature `broken-variants` (which only `quiver-sim` enables) a [`Broken`] cannot be
//! given any variant and `is` is the constant `false`, so the server carries no switch.

/// One broken variant: a rule of the node turned off, or done the way an earlier version
/// did it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Variant {
    /// Acknowledge a write after the coordinator's local write only.
    AckBeforeQuorum,
    /// Trust every epoch found in a local record, even after a crash.
    TrustAllEpochs,
    /// Reap without asking the other members (no "all members up", no digest, hold-time
    /// and hint check).
    ReapWithoutChecks,
    /// Answer `ReapCheck` (and check locally before reaping) without first making the
    /// applied writes durable.
    ReapCheckWithoutSync,
    /// Count a handoff push as held by the primary as soon as it is sent, without waiting
    /// for the primary's durable acknowledgement, and drop the local copy.
    HandoffDropBeforeAck,
    /// Compare a primary's leaf hashes with this node's leaf hashes read when the tree's
    /// leaves were chosen (before the listing, which the server runs after an await), not
    /// with the hashes of the keys as listed: a write landing between that read and the
    /// listing is listed, and dropped, though an equal leaf vouched only for the state
    /// before it, which is all the primary may hold.
    LeafHashesAsNow,
    /// Do not fsync a `sync` store whose merge changed nothing (acknowledges data that
    /// may be buffered only).
    UnsyncedUnchangedMerges,
    /// Keep hint markers for members known to have left (hints never drain; a leaving
    /// node holding one never departs).
    KeepHintsForLeft,
    /// A handoff pass checks for a ring change against the ring of each tree's start
    /// rather than the pass's.
    TreeRingVersion,
    /// A primary answers a handoff step whatever ring the sender holds.
    HandoffAnyRing,
    /// A member on another ring than the reaper's still confirms a reaping check (and
    /// reaps when told to).
    ReapCheckAnyRing,
    /// A leaving node does not check again that it holds nothing once its departure was
    /// taken.
    DepartNoRecheck,
    /// A leaving node stops once one peer (not every peer) took the news that it left.
    DepartWhenOneTold,
    /// The node machine goes on at once after asking for a sync (`Effect::Sync`): answers
    /// that vouch for durable data go out before the data is durable.
    AckBeforeSync,
}

/// The broken variants a node runs with: none, always, in production.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Broken {
    #[cfg(feature = "broken-variants")]
    bits: u32,
}

impl Broken {
    /// No variant: the production rules.
    pub const NONE: Broken = Broken {
        #[cfg(feature = "broken-variants")]
        bits: 0,
    };

    /// True when `variant` is on (never, without the `broken-variants` feature).
    #[inline]
    pub fn is(&self, variant: Variant) -> bool {
        #[cfg(feature = "broken-variants")]
        {
            self.bits & (1 << variant as u32) != 0
        }
        #[cfg(not(feature = "broken-variants"))]
        {
            let _ = variant;
            false
        }
    }

    /// These variants plus `variant`.
    #[cfg(feature = "broken-variants")]
    #[must_use]
    pub fn with(self, variant: Variant) -> Broken {
        Broken {
            bits: self.bits | (1 << variant as u32),
        }
    }

    /// These variants, with `variant` set to `on`.
    #[cfg(feature = "broken-variants")]
    #[must_use]
    pub fn set(self, variant: Variant, on: bool) -> Broken {
        let bit = 1 << variant as u32;
        Broken {
            bits: if on {
                self.bits | bit
            } else {
                self.bits & !bit
            },
        }
    }
}

#[cfg(all(test, feature = "broken-variants"))]
mod tests {
    use super::*;

    #[test]
    fn variants_are_independent() {
        let b = Broken::NONE.with(Variant::LeafHashesAsNow);
        assert!(b.is(Variant::LeafHashesAsNow));
        assert!(!b.is(Variant::AckBeforeQuorum));
        assert!(
            !b.set(Variant::LeafHashesAsNow, false)
                .is(Variant::LeafHashesAsNow)
        );
    }
}
