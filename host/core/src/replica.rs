//! The replica's side of replication as pure decisions over a key's stored state: what a
//! merge of an incoming object writes, when a hint marker is added, and what hinted handoff
//! may delete once the owner acknowledged. The node runtime (`kv.rs`) and the simulator
//! apply these decisions to their own stores, so both follow one set of rules.

use crate::causality::{LocalRecord, Object};

/// What a replica writes for one key, in one atomic batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaWrite {
    /// The new record, when it differs from the stored one.
    pub record: Option<LocalRecord>,
    /// Add the hint marker for the owner this replica stands in for.
    pub add_hint: bool,
}

impl ReplicaWrite {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.record.is_none() && !self.add_hint
    }
}

/// A replica receives `incoming` (from a coordinator, read repair or handoff) for a key it
/// stores as `local`. With `hint_for` it stands in for that owner; `hint_held` says whether
/// it already holds that hint's marker. Merging never drops a sibling it holds that
/// `incoming` has not seen (see [`LocalRecord::merge_remote`]).
pub fn merge_incoming(
    local: Option<&LocalRecord>,
    incoming: &Object,
    hint_for: Option<&str>,
    hint_held: bool,
) -> ReplicaWrite {
    let mut record = local.cloned().unwrap_or_default();
    record.merge_remote(incoming);
    ReplicaWrite {
        record: (local != Some(&record)).then_some(record),
        add_hint: hint_for.is_some() && !hint_held,
    }
}

/// Whether a fallback keeps its copy of a key after handing it to `owner`: it does when it
/// is itself a primary of the key, or still holds the key for another owner.
pub fn keep_copy_after_handoff(is_primary: bool, hinted_for_others: bool) -> bool {
    is_primary || hinted_for_others
}

/// What hinted handoff deletes once the owner acknowledged the copy that was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffCleanup {
    /// Nothing: the marker is gone, or the key changed since it was sent (a later write
    /// must be handed over too, so the marker stays for the next pass).
    Nothing,
    /// Drop the marker, keep the copy.
    DropMarker,
    /// Drop the marker and the copy.
    DropMarkerAndCopy,
}

/// Decides the cleanup after `owner` acknowledged `delivered`, given whether the marker is
/// still held and what the key holds now (`current`, empty if nothing).
pub fn handoff_cleanup(
    hint_held: bool,
    current: &Object,
    delivered: &Object,
    keep_copy: bool,
) -> HandoffCleanup {
    if !hint_held || current != delivered {
        HandoffCleanup::Nothing
    } else if keep_copy {
        HandoffCleanup::DropMarker
    } else {
        HandoffCleanup::DropMarkerAndCopy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causality::{Coordinator, EpochSource, VersionVector, WriteOp, coordinate_write};

    struct Fresh(u64);
    impl EpochSource for Fresh {
        fn is_trusted(&self, _epoch: u64) -> bool {
            true
        }
        fn fresh(&mut self) -> u64 {
            self.0 += 1;
            self.0
        }
    }

    fn record(node: &str, value: &[u8]) -> LocalRecord {
        let me = Coordinator {
            node: node.into(),
            incarnation: 1,
        };
        coordinate_write(
            None,
            &me,
            &mut Fresh(0),
            &VersionVector::default(),
            WriteOp::Put(value.to_vec()),
            1,
        )
        .0
    }

    #[test]
    fn merging_what_is_held_writes_nothing() {
        let r = record("a", b"v");
        let w = merge_incoming(Some(&r), &r.object, None, false);
        assert!(w.is_empty());
    }

    #[test]
    fn merging_something_new_writes_the_merge_and_the_hint_once() {
        let incoming = record("a", b"v").object;
        let w = merge_incoming(None, &incoming, Some("b"), false);
        let stored = w.record.clone().map(|r| r.object);
        assert_eq!(stored, Some(incoming.clone()));
        assert!(w.add_hint);
        let held = w.record.unwrap_or_default();
        let again = merge_incoming(Some(&held), &incoming, Some("b"), true);
        assert!(again.is_empty());
    }

    #[test]
    fn concurrent_versions_are_both_kept() {
        let mine = record("a", b"x");
        let theirs = record("b", b"y").object;
        let w = merge_incoming(Some(&mine), &theirs, None, false);
        let merged = w.record.map(|r| r.object).unwrap_or_default();
        assert_eq!(merged.siblings().len(), 2);
    }

    #[test]
    fn handoff_cleans_up_only_what_was_delivered_unchanged() {
        let sent = record("a", b"v").object;
        let later = record("c", b"w").object.merge(&sent);
        use HandoffCleanup::*;
        assert_eq!(
            handoff_cleanup(true, &sent, &sent, false),
            DropMarkerAndCopy
        );
        assert_eq!(handoff_cleanup(true, &sent, &sent, true), DropMarker);
        assert_eq!(handoff_cleanup(true, &later, &sent, false), Nothing);
        assert_eq!(handoff_cleanup(false, &sent, &sent, false), Nothing);
        assert!(keep_copy_after_handoff(true, false));
        assert!(keep_copy_after_handoff(false, true));
        assert!(!keep_copy_after_handoff(false, false));
    }
}
