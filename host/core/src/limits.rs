//! Named size limits and their defaults. Units are last in every name.

/// Largest key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 64 * 1024;
/// Largest bucket name accepted, in bytes.
pub const BUCKET_BYTES_MAX: usize = 255;
/// Default largest value accepted, in bytes (configurable per node).
pub const VALUE_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// Largest encoded causal context accepted from a client, in bytes.
pub const CONTEXT_BYTES_MAX: usize = 64 * 1024;
/// Largest number of actors a decoded context may name.
pub const CONTEXT_ACTORS_MAX: usize = 1024;
/// Largest dot counter: no sibling's counter and no context entry may exceed it.
///
/// Contexts come from clients and are not authenticated, so a client can name any counter;
/// a coordinator continues its actor from the highest counter its record's context names,
/// and a counter near `u64::MAX` would overflow on the next write. With this limit a client
/// context above it is refused, a coordinator whose actor reached it takes a fresh epoch
/// instead of continuing, and there is always room for `+ 1`. No honest actor gets near it:
/// 2^62 writes of one key by one actor epoch, at a million writes a second, take 146,000
/// years.
pub const DOT_COUNTER_MAX: u64 = 1 << 62;
/// Headroom for framing and request fields beyond key, value and context, in bytes.
pub const FRAME_OVERHEAD_BYTES: usize = 4 * 1024;
/// Default number of concurrent bidirectional streams a client connection may open.
pub const STREAMS_PER_CONNECTION_MAX_DEFAULT: u32 = 256;
/// Largest number of siblings a key may hold before writes are refused with a clear error.
/// (A bucket's reconciler merges them earlier, past its `sibling_threshold`.)
pub const SIBLINGS_MAX_DEFAULT: usize = 100;

/// Largest plugin component accepted at upload, in bytes (a Python or JavaScript component
/// carries its interpreter: 12-18 MB).
pub const PLUGIN_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Default sibling count above which a write is merged at once by the bucket's reconciler
/// (sibling-explosion guard).
pub const SIBLING_THRESHOLD_DEFAULT: u32 = 16;

/// Largest request frame for a given value limit: key + value + context + overhead.
pub const fn request_frame_bytes_max(value_bytes_max: usize) -> usize {
    KEY_BYTES_MAX + BUCKET_BYTES_MAX + value_bytes_max + CONTEXT_BYTES_MAX + FRAME_OVERHEAD_BYTES
}

/// Largest node-to-node frame, in bytes: a whole object whose every sibling carries a full
/// value (about 100 MiB at the default value limit) fits, with room for the byte-bounded
/// batches of anti-entropy and handoff (one object past their threshold) and for one
/// plugin of [`PLUGIN_BYTES_MAX`] with the metadata around it.
pub const PEER_FRAME_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Largest peer frame for a given value limit: [`PEER_FRAME_BYTES_MAX`], or two whole
/// objects when values are configured larger than the default.
pub const fn peer_frame_bytes_max(value_bytes_max: usize) -> usize {
    let two_objects = 2 * response_frame_bytes_max(value_bytes_max);
    if two_objects > PEER_FRAME_BYTES_MAX {
        two_objects
    } else {
        PEER_FRAME_BYTES_MAX
    }
}

/// Largest response frame: every sibling may carry a full value.
pub const fn response_frame_bytes_max(value_bytes_max: usize) -> usize {
    SIBLINGS_MAX_DEFAULT * (value_bytes_max + 256) + CONTEXT_BYTES_MAX + FRAME_OVERHEAD_BYTES
}
