//! The Quiver node: everything that touches the outside world.
//!
//! Layout:
//! - [`server`]: the QUIC endpoint, one request per stream, graceful shutdown.
//! - [`cluster`]: replication: coordinating puts and gets over the preference list,
//!   forwarding, read repair, hinted handoff.
//! - [`peer`]: node-to-node protocol, mutual TLS, connections, local failure detection.
//! - [`kv`]: the key-value service: validation, the core's write rule, record storage, hints.
//! - [`epochs`]: the durable actor-epoch allocator behind per-key actors.
//! - [`certs`]: cluster CA and node certificates, created on first start.
//! - [`config`]: TOML config file and flag overlay.
//! - [`driver`]: the node machine (`quiver_node_core::node::Node`) under tokio, not yet
//!   wired into the server.
//!
//! Storage engines and group commit are the `quiver-storage` crate; the command line, its
//! load generator and the local loopback cluster are private to the `quiver` binary
//! (`src/bin/quiver/`).
#![deny(clippy::unwrap_used)]

pub mod certs;
pub mod cluster;
pub mod config;
pub mod driver;
pub mod kv;
pub mod meta;
pub mod peer;
pub mod plugin_engine;
pub mod plugins;
pub mod server;
