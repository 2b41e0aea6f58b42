//! Quiver's deterministic whole-cluster simulator.
//!
//! A run is a pure function of `(seed, Config)`: [`sim::run`] boots several nodes, each the
//! production node machine (`quiver_node_core::node::Node`: request handling, peer calls
//! and their deadlines, probes, forwarding, hint delivery, anti-entropy, reaping, gossip,
//! handoff and departure, over the production `Replica`) on a [`disk::SimDisk`]; it
//! connects them by a simulated network and clock, injects faults while random clients
//! read and write, then heals everything, lets hints drain and read-repairs every key, and
//! runs the checkers.
//! A failure prints its seed and a one-line replay command
//! (`QUIVER_SIM_SEED=<seed> cargo test -p quiver-sim --test sim replay -- --nocapture`).
//!
//! # Layout
//!
//! - [`node`]: the machine around one node machine ([`node::SimNode`]): its disk, the OS
//!   writing buffered data back, its skewed wall clock, and the checkers' views of it. It
//!   holds no request handling and no protocol types (issue 12); the QUIC server does not
//!   drive the node machine yet (its tokio glue in `host/node/src/cluster*.rs` runs the
//!   same inner machines), which is the step after.
//! - [`store`]: a node's disk between lives ([`store::Disk`]: its `SimDisk` and the
//!   cluster metadata), what a kill, a power loss or a disk replacement leaves, and
//!   [`store::Tables`], the decoded view the checkers read.
//! - [`disk`]: a simulated disk that implements the production `StorageEngine` (applied vs
//!   durable batches, `sync`, OS writeback, kill, power loss, wipe, failing syncs), so the
//!   production node can run on it; a crash hands out a new handle and makes the old ones
//!   refuse every call.
//! - [`sim`]: the world: event queue in simulated ms, network (delay, reordering by delay
//!   spikes, loss, duplication, directed link cuts), faults (crash + restart as a new boot,
//!   power loss, disk wipe as a new incarnation, partitions incl. one-way, FoundationDB
//!   "swizzle-clogging"), per-node clock skew on sibling timestamps, clients, membership
//!   changes (a single committer: joins of spare nodes and leaves, committed on a random
//!   node), and the heal/quiesce phase. [`sim::Config::random`] derives a configuration
//!   from a seed; [`sim::Config::membership`] adds joins and leaves.
//! - [`check`]: the checkers, pure functions over the recorded history: (1) no
//!   acknowledged write lost, (2) convergence (every primary holds every acknowledged
//!   write, and primaries agree), (3) hints drain, (4) no dot issued twice, (5) no
//!   resurrection, (6) tombstones reaped, (7) membership settles (every node on the last
//!   committed ring, leavers departed and known to have left), (8) no orphan copies (a
//!   node holds only keys it is a final-ring primary of; nobody departs holding data);
//!   plus each node's AE trees match its records.
//! - [`rng`]: SplitMix64 (node-core's), the only source of randomness.
//!
//! # What is modelled
//!
//! The ring (`Ring::new`, 16 partitions; `Ring::rebalance` for joins and leaves, each node
//! on its own ring until gossip brings the new one), ownership handoff and departure,
//! per-run N/R/W, sloppy or strict quorums, `sync` and `buffered` durability (per
//! request), sibling timestamps from skewed clocks (the lost-write checker would catch a timestamp-based merge, since
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
//! Staged (uncommitted) joins and leaves, weights and zones, racing commits (one committer
//! makes ring versions unique), rejoining after leaving, the join handshake (a spare is a
//! member from the start), Wasm reconcilers, the hint-store limit, fsync latency and
//! failures (a poisoned store), QUIC connection state (a lost message is a timeout; a
//! "connection refused" fast failure is not modelled), the `--ae-max-keys` paging of large
//! exchanges (handoff pushes are production's, bounded by bytes; the simulated values make
//! one push per primary and tree), and refiling after a
//! change of `n` (one bucket, one `n`).
//! Anti-entropy and tombstone reaping are modelled (off by default; see
//! [`sim::Config::ae_only`] and [`sim::Config::reaping`]), as are the checkers (5) no
//! resurrection and (6) old tombstones reaped once the cluster is whole.
//!
//! # Findings
//!
//! The simulator found that `KvService::merge_remote` (then in `quiver-node`) fsynced a `sync` Store only when the
//! merge changed the record or added a hint marker. If the same data had arrived earlier
//! through a `buffered` path (read repair, or a replica's earlier buffered Store), the
//! record was unchanged but only buffered, and the replica still answered `Stored`: the
//! coordinator counted it toward W (and `deliver_hints` dropped the fallback's copy) on the
//! strength of data a power loss could still roll back. Production now syncs when asked,
//! changed or not; [`sim::Config::sync_unchanged_merges`] `= false` keeps the old
//! behaviour as a broken variant.
//!
//! With joins and leaves, production's membership handling lost acknowledged writes,
//! resurrected a deleted value or never settled in six ways; each rule of
//! [`node::MembershipFixes`] closes one, is on in every scenario, and turned off alone fails
//! a fixed seed (`membership_fixes_are_load_bearing`): hint markers for a member that left
//! are never delivered (hints never drain; fix: forget them once it is known to have left,
//! the copy goes out by handoff); a handoff pass takes the ring version per tree but the
//! primaries per pass (a change in between hands a tree to the old primaries and still
//! drops it); handoff and reaping checks are answered by nodes on another ring (two nodes
//! each count the other as the primary and both drop the key; a member on an older ring
//! confirms a reap while it holds an older value); a leaving node does not check again
//! before it stops (a store from a coordinator on an older ring leaves with it); and it
//! stops once one peer took the news (if that peer leaves before it gossips, nobody knows).
#![deny(clippy::unwrap_used)]

pub mod check;
pub mod disk;
pub mod node;
pub mod sim;
pub mod store;

/// The seeded generator behind every draw of a run (shared with the node machine).
pub use quiver_node_core::rng;
