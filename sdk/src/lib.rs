//! Async Rust client for Quiver.
//!
//! Connects to any node of a cluster over QUIC, verifying the node against the cluster's CA
//! certificate (the `ca.pem` a node writes into its data directory on first start).
//!
//! ```no_run
//! use quiver_sdk::{Client, ClientConfig};
//!
//! # async fn demo() -> Result<(), quiver_sdk::Error> {
//! let ca_pem = std::fs::read("data/ca.pem").map_err(|e| quiver_sdk::Error::Config(e.to_string()))?;
//! let client = Client::connect("127.0.0.1:7470", ClientConfig::new(ca_pem)).await?;
//!
//! // Two writes without a context are concurrent: both survive as siblings.
//! client.put("carts", "alice", b"apple".to_vec(), None).await?;
//! client.put("carts", "alice", b"pear".to_vec(), None).await?;
//! let read = client.get("carts", "alice").await?;
//! assert_eq!(read.siblings.len(), 2);
//!
//! // A write with the context of that read replaces both.
//! client.put("carts", "alice", b"apple,pear".to_vec(), Some(&read.context)).await?;
//! let read = client.get("carts", "alice").await?;
//! assert_eq!(read.values(), vec![&b"apple,pear"[..]]);
//!
//! // Delete with the context too; a later get finds nothing.
//! client.delete("carts", "alice", Some(&read.context)).await?;
//! assert!(!client.get("carts", "alice").await?.found());
//! # Ok(())
//! # }
//! ```
//!
//! Layout: [`wire`] holds the protocol shared with nodes, [`tls`] the QUIC/TLS client setup,
//! [`Client`] talks to one node, and [`ClusterClient`] learns the ring and sends each request
//! straight to a replica of its key (Dynamo §6.4 client-driven coordination), falling back to
//! the other members.
#![deny(clippy::unwrap_used)]

pub mod tls;
pub mod wire;

mod client;
mod routing;

pub use client::{
    Client, ClientConfig, Context, Error, GetResult, NodeInfo, ReplicaAttempt, Sibling,
};
pub use quiver_core::access::KeyToken;
pub use routing::ClusterClient;
pub use wire::{ErrorCode, ReadOptions, WireDurability as Durability, WriteOptions};
