//! The Quiver node: everything that touches the outside world.
//!
//! Layout:
//! - [`server`]: the QUIC endpoint, one request per stream, graceful shutdown.
//! - [`kv`]: the key-value service: validation, the core's write rule, record storage.
//! - [`epochs`]: the durable actor-epoch allocator behind per-key actors.
//! - [`storage`]: storage engines (fjall, memory), group commit, the conformance suite.
//! - [`certs`]: cluster CA and node certificates, created on first start.
//! - [`config`]: TOML config file and flag overlay.
//! - [`cli`], [`bench`]: the `quiver` command line and its load generator.
#![deny(clippy::unwrap_used)]

pub mod bench;
pub mod certs;
pub mod cli;
pub mod config;
pub mod epochs;
pub mod kv;
pub mod server;
pub mod storage;
