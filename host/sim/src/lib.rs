//! Quiver's deterministic whole-cluster simulator.
//!
//! A run is a pure function of `(seed, Config)`: [`sim::run`] boots several nodes whose
//! replication logic is the production logic (the same `quiver-core` calls, in the same
//! order, as `host/node/src/cluster.rs` and `host/node/src/kv.rs`), connects them by a
//! simulated network and clock, injects faults while random clients read and write, then
//! heals everything, lets hints drain and read-repairs every key, and runs the checkers.
//! A failure prints its seed and a one-line replay command
//! (`QUIVER_SIM_SEED=<seed> cargo test -p quiver-sim --test sim replay -- --nocapture`).
//!
//! # Layout
//!
//! - [`node`]: one node as a pure state machine (`on_client`, `on_message`, `on_tick`
//!   return [`node::Effect`]s). It mirrors `cluster.rs` (coordination of puts and gets,
//!   forwarding by non-replicas, sloppy quorum with fallback retry on failure, read repair
//!   after all replies, hinted handoff passes) and `kv.rs` (`write` with
//!   `coordinate_write`, the sibling limit and hint markers, `merge_remote`,
//!   `hint_delivered`), plus the local failure detector of `peer.rs` (timeouts mark a
//!   peer down, probes with backoff from 200 ms to 5 s) and the per-boot epoch allocator
//!   of `epochs.rs`. **This is the shape the production runtime should adopt next**: move
//!   `node::Node` into the core, and make the tokio/quinn code a driver that delivers
//!   messages, client requests and ticks and carries out effects, so the code the
//!   simulator runs *is* the code production runs, not a mirror of it.
//! - [`store`]: a node's disk: applied vs durable writes, `sync` (group commit), OS
//!   writeback, and what a kill, a power loss or a disk replacement leaves.
//! - [`sim`]: the world: event queue in simulated ms, network (delay, reordering by delay
//!   spikes, loss, duplication, directed link cuts), faults (crash + restart as a new boot,
//!   power loss, disk wipe as a new incarnation, partitions incl. one-way, FoundationDB
//!   "swizzle-clogging"), per-node clock skew on sibling timestamps, clients, and the
//!   heal/quiesce phase. [`sim::Config::random`] derives a configuration from a seed.
//! - [`check`]: the checkers, pure functions over the recorded history: (1) no
//!   acknowledged write lost, (2) convergence (every primary holds every acknowledged
//!   write, and primaries agree), (3) hints drain, (4) no dot issued twice, (5) no
//!   resurrection, (6) tombstones reaped; plus each node's AE trees match its records.
//! - [`rng`]: SplitMix64, the only source of randomness.
//!
//! # What is modelled
//!
//! Static membership and the ring (`Ring::new`, 16 partitions), per-run N/R/W, sloppy or
//! strict quorums, `sync` and `buffered` durability (per request), sibling timestamps
//! from skewed clocks (the lost-write checker would catch a timestamp-based merge, since
//! skews reach an hour), client contexts from gets and puts, blind writes, deletes.
//! A kill keeps applied writes (they are in the OS); a power loss keeps the durable part
//! plus a random prefix of unsynced write batches (a batch, e.g. a record with its hint
//! marker, is kept whole or not at all); a wipe (at most `w - 1` per run) keeps nothing.
//! Writes acknowledged with `buffered` durability in runs with power losses are exempt
//! from the lost-write checkers (they promise nothing across a power loss) but still
//! count for dot uniqueness.
//!
//! # What is not modelled
//!
//! Membership changes and handoff of partitions, Wasm reconcilers, the hint-store limit,
//! fsync latency and failures (a poisoned store), QUIC connection state (a lost message is
//! a timeout; a "connection refused" fast failure is not modelled), the `--ae-max-keys`
//! paging of large exchanges and refiling after a change of `n` (one bucket, one `n`).
//! Anti-entropy and tombstone reaping are modelled (`node::ae`, off by default; see
//! [`sim::Config::ae_only`] and [`sim::Config::reaping`]), as are the checkers (5) no
//! resurrection and (6) old tombstones reaped once the cluster is whole.
//!
//! # Findings
//!
//! The simulator found that `KvService::merge_remote` fsynced a `sync` Store only when the
//! merge changed the record or added a hint marker. If the same data had arrived earlier
//! through a `buffered` path (read repair, or a replica's earlier buffered Store), the
//! record was unchanged but only buffered, and the replica still answered `Stored`: the
//! coordinator counted it toward W (and `deliver_hints` dropped the fallback's copy) on the
//! strength of data a power loss could still roll back. Production now syncs when asked,
//! changed or not; [`node::NodeConfig::sync_unchanged_merges`] `= false` keeps the old
//! behaviour as a broken variant.
#![deny(clippy::unwrap_used)]

pub mod check;
pub mod node;
pub mod rng;
pub mod sim;
pub mod store;
