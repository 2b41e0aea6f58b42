//! Fault injection against real `quiver server` processes on loopback (issue 12, point 5).
//!
//! - [`cluster`]: nodes on `127.0.<subnet>.1..=n:7470` sharing a CA, each process owned by
//!   a guard that kills it by PID when dropped;
//! - [`nft`]: an nftables table of our own on the INPUT hook (partitions both ways and one
//!   way, random loss), deleted when dropped and when found stale;
//! - [`nemesis`]: a schedule of faults drawn from a seed, applied and healed one window at
//!   a time: partitions, one-way partitions, loss, SIGSTOP, kill -9 with restart, clock
//!   skew (a restart under libfaketime with the monotonic clock untouched);
//! - [`workload`]: set adds (read, union the siblings, add a unique element, write back
//!   with the context) through the routing client;
//! - [`checker`]: lost and unexpected elements, availability inside and outside windows;
//! - [`run`]: one whole run, with convergence measured after the final heal.
//!
//! Needs root (nft) and `scripts/faults-deps.sh` (nftables, faketime).

pub mod checker;
pub mod cluster;
pub mod nemesis;
pub mod nft;
pub mod run;
pub mod workload;
