//! A bucket's replication properties: the node's configuration, overlaid by the runtime
//! spec stored in the cluster metadata (`quiver bucket set`). Written once for the server
//! and the node machine.

use quiver_core::meta::BucketSpec;
use quiver_core::quorum::Quorum;

use crate::ae::Placement;

/// Replication properties of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketProps {
    /// n/r/w of the bucket.
    pub quorum: Quorum,
    /// False requires primaries only (Riak's pw/pr): no fallbacks, no hints.
    pub sloppy: bool,
}

/// The properties of a bucket whose runtime spec is `spec`, over `base` (the node's
/// configuration for it). A spec that changes `n` and leaves an inherited `r` or `w` that
/// no longer fits gets the new majority; an explicit quorum that does not fit is an error.
pub fn effective(base: BucketProps, spec: &BucketSpec) -> Result<BucketProps, String> {
    let n = spec.n.map_or(base.quorum.n, usize::from);
    let majority = n / 2 + 1;
    let fallback = |set: Option<u8>, base_value: usize| match set {
        Some(v) => usize::from(v),
        None if base_value > n => majority,
        None => base_value,
    };
    let quorum = Quorum::new(
        n,
        fallback(spec.r, base.quorum.r),
        fallback(spec.w, base.quorum.w),
    )
    .map_err(|e| e.to_string())?;
    Ok(BucketProps {
        quorum,
        sloppy: spec.sloppy_quorum.unwrap_or(base.sloppy),
    })
}

/// Where a node files its keys in the anti-entropy index: `partitions` of the ring,
/// `default_n` for buckets without their own, and the buckets of `own` whose replication
/// factor differs from it (a later entry for a bucket wins over an earlier one).
pub fn placement(
    partitions: u32,
    default_n: usize,
    own: impl IntoIterator<Item = (String, usize)>,
) -> Placement {
    let default_n = u8::try_from(default_n).unwrap_or(u8::MAX);
    let mut placement = Placement {
        partitions,
        default_n,
        buckets: Default::default(),
    };
    for (bucket, n) in own {
        let n = u8::try_from(n).unwrap_or(u8::MAX);
        if n == default_n {
            placement.buckets.remove(&bucket);
        } else {
            placement.buckets.insert(bucket, n);
        }
    }
    placement
}
