//! The `quiver` binary: parses the command line, sets up logging, runs the command, and
//! turns any error into one clear line on stderr and a non-zero exit status.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
mod args;
mod bench;
mod cli;
mod cluster;
mod data;
mod dev;
mod keys;
mod plugins;
mod status;

use crate::cli::{Cli, Command};
use quiver_node::config::FileConfig;
use quiver_node::server::Node;

/// mimalloc instead of glibc malloc: the request path allocates small buffers on every
/// request from both runtime threads, and glibc's arena locking showed up at ~15% of server
/// CPU in profiles of `quiver bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(matches!(cli.command, Command::Server(_) | Command::Dev(_)));
    let threads = match &cli.command {
        Command::Server(args) => args.worker_threads.map(usize::from),
        // Zero is refused by the bench itself, with a message.
        Command::Bench(args) => Some(args.threads.max(1)),
        _ => None,
    }
    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // One thread: the current-thread scheduler. It runs woken tasks in order, so replies and
    // peer requests that several tasks write in one turn leave in shared packets; the
    // multi-thread scheduler's LIFO slot runs the QUIC connection driver right after each
    // write instead, one packet per message. Measured with `quiver dev --nodes 3` (one
    // thread per node on two cores): 25-45 % more 50/50 operations at 30-40 % less CPU per
    // operation (docs/decisions/replication.md, "Runtime threads").
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all();
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Servers log at info by default; client commands only warn, so their stdout stays clean.
fn init_logging(server: bool) {
    let default = if server { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUIVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Server(args) => {
            let file = match &args.config {
                Some(path) => FileConfig::load(path)?,
                None => FileConfig::default(),
            };
            let config = file.overlay(args.to_file_config()?).resolve()?;
            let ca_path = config.data_dir.join("ca.pem");
            let node = Node::open(config.clone())
                .await
                .with_context(|| format!("cannot start node {}", config.node_id))?;
            let addr = node.local_addr().context("cannot read the bound address")?;
            tracing::info!(node = %config.node_id, %addr, ca = %ca_path.display(), "listening");
            // Machine-readable readiness line for scripts and tests.
            let key = node
                .admin_key_file()
                .map(|k| format!(", admin key {}", k.display()))
                .unwrap_or_default();
            println!(
                "quiver node {} listening on {addr} (ca {}{key})",
                config.node_id,
                ca_path.display()
            );
            node.serve(shutdown_signal()).await?;
            Ok(())
        }
        Command::Get(args) => data::get(args).await,
        Command::Put(args) => data::put(args).await,
        Command::Delete(args) => data::delete(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Cluster(cli::ClusterCommand::Status { client }) => {
            status::cluster_status(client).await
        }
        Command::Cluster(cli::ClusterCommand::Membership(c)) => cluster::run(c).await,
        Command::Cluster(cli::ClusterCommand::Ring { partitions, client }) => {
            status::cluster_ring(client, partitions).await
        }
        Command::Update(args) => plugins::update(args).await,
        Command::Plugin(c) => plugins::plugin(c).await,
        Command::Bucket(c) => plugins::bucket(c).await,
        Command::Key(c) => keys::run(c).await,
        Command::Dev(args) => dev::run(args, shutdown_signal()).await,
        Command::Ca(cli::CaCommand::Init { dir }) => {
            let created = quiver_node::certs::ensure_ca(&dir)?;
            let state = if created { "created" } else { "already exists" };
            println!("cluster CA {state}: {}", dir.join("ca.pem").display());
            Ok(())
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
