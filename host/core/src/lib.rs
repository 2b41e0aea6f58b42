//! Quiver's sans-IO core.
//!
//! Everything here is pure logic: no sockets, no files, no threads, no clock reads and no
//! randomness. Callers inject wall-clock timestamps and fresh actor epochs, which is what
//! lets the same code run in production and in a deterministic simulation.
//!
//! Layout:
//! - [`access`]: access keys (salted hashes, admin flag, bucket grants) and the
//!   authorization rule every request passes.
//! - [`causality`]: dotted version vectors, sibling sets, the coordinator's write rule and
//!   the replica merge, per-key actor epochs that prevent dot reuse after data loss.
//! - [`coordinator`]: the coordinator's state machines (write routing and forwarding, put
//!   fan-out with fallbacks, read fan-out with repair, the failure detector), driven by the
//!   node runtime and by the simulator alike.
//! - [`limits`]: named defaults for every size bound the node enforces.
//! - [`merkle`]: anti-entropy hash trees (XOR leaves updated in O(1) per write, lazily
//!   hashed inner levels) and the comparisons of an exchange.
//! - [`meta`]: cluster metadata (runtime bucket properties, uploaded plugin versions) as a
//!   last-writer-wins state that every node merges alike.
//! - [`quorum`]: target selection (sloppy quorum) and the read/write quorum state machines.
//! - [`replica`]: what a replica writes when it merges an incoming object, and what hinted
//!   handoff may delete once the owner has the data.
//! - [`ring`]: Q equal partitions claimed in proportion to weight, spread by node and zone;
//!   key placement, preference lists, minimal-movement rebalancing and ring diffs.
//! - [`storage`]: the byte-level contract every storage engine implements (fjall, memory,
//!   and later Wasm adapters), plus the key layout the node uses on top of it.
#![deny(clippy::unwrap_used)]

pub mod access;
pub mod causality;
pub mod coordinator;
pub mod limits;
pub mod membership;
pub mod merkle;
pub mod meta;
pub mod quorum;
pub mod replica;
pub mod ring;
pub mod stamp;
pub mod storage;
