//! `quiver key ...`: access keys (create, list, show, delete) and `key init`, which writes
//! a cluster's bootstrap admin key before any node runs.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use crate::args::{ClientArgs, Output};
use quiver_sdk::wire::KeyInfo;

/// `quiver key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an access key and print its secret (once: the cluster keeps only a salted
    /// hash). Needs an admin key. Give the secret to the client as `QUIVER_KEY`.
    Create {
        /// Key name (1 to 64 ASCII letters, digits, '-', '_').
        name: String,
        /// An admin key: plugins, bucket properties, membership, keys, and every bucket.
        #[arg(long)]
        admin: bool,
        /// A bucket grant, BUCKET:ACCESS or PREFIX*:ACCESS with ACCESS one of read, write,
        /// readwrite (e.g. `carts:readwrite`, `logs-*:read`, `*:read`); repeat for more.
        #[arg(long = "allow", value_name = "BUCKET:ACCESS")]
        allow: Vec<String>,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// Every access key: name, admin, grants, creation (never secrets). Needs an admin key.
    List {
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// One access key. Needs an admin key.
    Show {
        /// Key name.
        name: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// Delete an access key: it stops working on every node as the deletion spreads (pushed
    /// to every node at once; a node that was unreachable learns it by gossip). Needs an
    /// admin key.
    Delete {
        /// Key name.
        name: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// Write a new admin key to FILE (mode 0600) without any node: start every node of a
    /// new cluster with `--admin-key-file FILE` and they all accept it from the start.
    Init {
        /// Where to write the key; refused if it exists.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// The key's name.
        #[arg(long, default_value = "admin")]
        name: String,
    },
}

fn key_json(key: &KeyInfo) -> serde_json::Value {
    json!({
        "name": key.name,
        "admin": key.admin,
        "grants": key.grants,
        "created_ms": key.created.timestamp_ms,
        "created_by": key.created.node,
    })
}

fn print_key(key: &KeyInfo) {
    let role = if key.admin { "admin" } else { "grants" };
    let grants = if key.grants.is_empty() {
        "-".to_string()
    } else {
        key.grants.join(" ")
    };
    println!("{:<24} {role:<6} {grants}", key.name);
}

/// Runs a `quiver key` command.
pub async fn run(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Init { file, name } => {
            let token = quiver_node::cluster::keys::generate_token(&name)?;
            quiver_node::cluster::keys::write_key_file(&file, &token)
                .with_context(|| format!("cannot write the key file {}", file.display()))?;
            println!("admin key {name:?} written to {}", file.display());
            Ok(())
        }
        KeyCommand::Create {
            name,
            admin,
            allow,
            client,
        } => {
            let node = client.connect().await?.any().await?;
            let (key, token) = node
                .key_create(&name, admin, &allow)
                .await
                .with_context(|| format!("create key {name:?}"))?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "name": key.name, "secret": token.reveal(), "key": key_json(&key) })
                ),
                Output::Human => {
                    print_key(&key);
                    println!("secret (shown once; the cluster keeps only a salted hash):");
                    println!("export QUIVER_KEY={}", token.reveal());
                }
            }
            Ok(())
        }
        KeyCommand::List { client } => {
            let node = client.connect().await?.any().await?;
            let keys = node.key_list().await.context("list keys")?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "keys": keys.iter().map(key_json).collect::<Vec<_>>() })
                ),
                Output::Human => keys.iter().for_each(print_key),
            }
            Ok(())
        }
        KeyCommand::Show { name, client } => {
            let node = client.connect().await?.any().await?;
            let key = node
                .key_show(&name)
                .await
                .with_context(|| format!("show key {name:?}"))?;
            match client.output {
                Output::Json => println!("{}", key_json(&key)),
                Output::Human => print_key(&key),
            }
            Ok(())
        }
        KeyCommand::Delete { name, client } => {
            let node = client.connect().await?.any().await?;
            node.key_delete(&name)
                .await
                .with_context(|| format!("delete key {name:?}"))?;
            match client.output {
                Output::Json => println!("{}", json!({ "deleted": name })),
                Output::Human => println!("deleted key {name:?}"),
            }
            Ok(())
        }
    }
}
