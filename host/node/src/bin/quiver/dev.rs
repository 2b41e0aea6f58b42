//! `quiver dev`: a local cluster on loopback for newcomers and demos.
//!
//! One `quiver server` process per node (real processes, real QUIC between them), all on
//! 127.0.0.1 with consecutive ports, sharing one CA created in `DIR/ca`. The command prints
//! the environment a client needs (addresses, CA, an admin access key), then waits; Ctrl-C or SIGTERM stops every node gracefully.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context as _, bail};
use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use quiver_node::certs;
use quiver_storage::{Durability, EngineKind};

/// Largest local cluster `quiver dev` starts.
const DEV_NODES_MAX: usize = 16;

/// `quiver dev` options.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Directory for the CA and every node's data, reused across runs so data survives a
    /// restart. Use a fresh directory when changing --nodes: each node keeps the ring it
    /// stored on its first start; grow or shrink a running cluster with `quiver cluster join`
    /// and `quiver cluster leave` instead.
    #[arg(long, value_name = "DIR", default_value = "quiver-dev")]
    pub dir: PathBuf,
    /// UDP port of the first node; the others take the following ports.
    #[arg(long, default_value_t = 7470)]
    pub base_port: u16,
    /// Durability of every node.
    #[arg(long, value_name = "MODE")]
    pub durability: Option<Durability>,
    /// Storage engine of every node.
    #[arg(long, value_name = "ENGINE")]
    pub engine: Option<EngineKind>,
}

/// Runs the cluster until `shutdown` resolves.
pub async fn run(
    args: DevArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > DEV_NODES_MAX {
        bail!("--nodes must be between 1 and {DEV_NODES_MAX}");
    }
    if usize::from(args.base_port) + args.nodes > usize::from(u16::MAX) {
        bail!(
            "--base-port {} leaves no room for {} nodes",
            args.base_port,
            args.nodes
        );
    }
    let ca_dir = args.dir.join("ca");
    certs::ensure_ca(&ca_dir)
        .with_context(|| format!("cannot create the CA in {}", ca_dir.display()))?;
    // One admin key for the whole dev cluster, accepted by every node from its first start.
    let key_file = args.dir.join("admin.key");
    let token = if key_file.exists() {
        quiver_node::cluster::keys::read_key_file(&key_file).map_err(anyhow::Error::msg)?
    } else {
        let token = quiver_node::cluster::keys::generate_token("admin")?;
        quiver_node::cluster::keys::write_key_file(&key_file, &token)
            .with_context(|| format!("cannot write {}", key_file.display()))?;
        token
    };
    let exe = std::env::current_exe().context("cannot find the quiver executable")?;
    let addrs: Vec<String> = (0..args.nodes)
        .map(|i| format!("127.0.0.1:{}", usize::from(args.base_port) + i))
        .collect();
    let peers: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("n{}={a}", i + 1))
        .collect();

    // Nodes of one machine share its cores: a node with more runtime threads than its share
    // spends its time waking threads and sends each message in its own packet (measured:
    // 3 nodes on 2 cores do 32% more operations with one thread each).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.nodes).max(1).to_string();
    let mut children: Vec<(String, Child)> = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = format!("n{}", i + 1);
        let mut cmd = Command::new(&exe);
        cmd.arg("server")
            .arg("--data-dir")
            .arg(args.dir.join(&id))
            .args([
                "--listen",
                addr,
                "--node-id",
                &id,
                "--worker-threads",
                &threads,
            ])
            .arg("--ca-dir")
            .arg(&ca_dir)
            .arg("--admin-key-file")
            .arg(&key_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for p in &peers {
            cmd.args(["--peer", p]);
        }
        if let Some(d) = args.durability {
            cmd.args(["--durability", d.as_str()]);
        }
        if let Some(e) = args.engine {
            cmd.args(["--engine", e.as_str()]);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start node {id}"))?;
        let stdout = child.stdout.take().context("node stdout is not piped")?;
        let mut lines = BufReader::new(stdout).lines();
        match lines.next_line().await {
            Ok(Some(line)) if line.contains("listening") => eprintln!("{line}"),
            _ => {
                let status = child.wait().await;
                bail!("node {id} did not start ({status:?}); its log is above");
            }
        }
        children.push((id, child));
    }
    println!("export QUIVER_CLUSTER={}", addrs.join(","));
    println!("export QUIVER_CA={}", ca_dir.join("ca.pem").display());
    // The dev cluster's admin key (also in DIR/admin.key): a local playground, so it is
    // printed for pasting; `quiver key create` makes narrower keys.
    println!("export QUIVER_KEY={}", token.reveal());
    eprintln!("{} nodes running; Ctrl-C stops them", children.len());

    tokio::pin!(shutdown);
    while !children.is_empty() {
        // Resolves when any node exits on its own.
        let waits = children
            .iter_mut()
            .enumerate()
            .map(|(i, (_, c))| Box::pin(async move { (i, c.wait().await) }));
        let exited = futures_select_all(waits.collect());
        tokio::select! {
            () = &mut shutdown => {
                eprintln!("stopping the cluster");
                break;
            }
            (i, status) = exited => {
                let (id, _) = children.remove(i);
                // A node that left the cluster (`quiver cluster leave`) exits with success
                // once its data is handed off; the others keep running.
                if matches!(&status, Ok(s) if s.success()) {
                    eprintln!("node {id} exited (it left the cluster); the others keep running");
                    continue;
                }
                eprintln!("node {id} exited ({status:?}); stopping the cluster");
                break;
            }
        }
    }
    for (id, child) in &mut children {
        if let Some(pid) = child.id() {
            // SIGTERM for a graceful stop (flushes storage); kill_on_drop is the fallback.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match child.wait().await {
            Ok(status) => eprintln!("node {id} stopped ({status})"),
            Err(e) => eprintln!("node {id}: {e}"),
        }
    }
    Ok(())
}

/// Waits for the first of several futures (a tiny stand-in for `futures::select_all`).
async fn futures_select_all<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> F::Output {
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if let std::task::Poll::Ready(out) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(out);
            }
        }
        std::task::Poll::Pending
    })
    .await
}
