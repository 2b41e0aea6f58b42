//! The sans-IO core of a Quiver node: the rules by which one node stores what it holds,
//! written once and driven by both the QUIC server (`quiver-node`) and the seeded simulator
//! (`quiver-sim`).
//!
//! Nothing here does I/O except through the [`StorageEngine`] trait it is given, reads a
//! clock except the [`WallClock`] it is given, draws randomness, spawns or awaits. Making
//! applied writes durable is the caller's job: every write applies its one batch and
//! returns; the driver then runs its group commit (production) or its simulated disk's
//! `sync` (simulator) before it acknowledges a durable write.
//!
//! - [`replica`]: a node's records: validation, the coordinator's write rule, replica
//!   merges, hint markers, reaping and handoff drops, each as one atomic batch of record +
//!   hint marker + anti-entropy entry.
//! - [`ae`]: the anti-entropy index (Merkle trees per `(n, partition)`, the tombstone index).
//! - [`epochs`]: the durable per-boot actor-epoch allocator.
//! - [`hints`]: a hint-delivery pass as a state machine (which `Store` next, what an
//!   acknowledgement cleans up).
//! - [`reap`]: tombstone reaping as a state machine (the first primary's pass: checks
//!   of every member, then the reaps) and the members' answers.
//! - [`handoff`]: ownership handoff after a ring change as a state machine (offer each
//!   orphaned tree to its primaries, drop what all of them hold) and its answering side.
//! - [`membership`]: the first membership, gossip (digest first), hint markers for members
//!   that left, and departure.
//! - [`request`]: a client request at its coordinator (route, local write, fan-out, answer,
//!   read repair) and a replica's `Fetch`/`Store`.
//! - [`protocol`]: the peer protocol on the wire (`PeerRequest`, `PeerResponse`), with
//!   conversions from and to the machines' own messages.
//! - [`record`]: the stored record format.
//! - [`node`]: one node as a single state machine around all of the above: pending calls,
//!   deadlines, probes, forwarding, the tick schedule (driven by the simulator today).
//! - [`rng`]: a seeded SplitMix64, for draws that must replay (gossip partners).
//! - [`buckets`]: a bucket's replication properties (configuration overlaid by its spec).
//! - [`broken`]: deliberately broken variants of these rules, for the simulator only.
//!
//! [`StorageEngine`]: quiver_core::storage::StorageEngine
#![deny(clippy::unwrap_used)]

pub mod ae;
pub mod broken;
pub mod buckets;
pub mod epochs;
pub mod exchange;
pub mod handoff;
pub mod hints;
pub mod membership;
pub mod node;
pub mod protocol;
pub mod reap;
pub mod record;
pub mod replica;
pub mod request;
pub mod rng;

/// The node's wall clock, in ms since the Unix epoch. Production reads the system clock;
/// the simulator gives each node its own, skewed, simulated clock.
pub trait WallClock: Send + Sync + std::fmt::Debug {
    /// Now, in ms since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}
