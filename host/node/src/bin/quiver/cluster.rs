//! `quiver cluster join | leave | plan | commit | wait`: staged membership changes, as in
//! Riak (`riak-admin cluster join/leave/plan/commit`). Changes are staged first, `plan`
//! shows what a commit would move, and `commit` applies them; `--wait` (or `cluster wait`)
//! follows the handoffs with a progress bar.

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use quiver_sdk::Client;
use quiver_sdk::wire::{PlanView, Request};
use serde_json::json;

use crate::args::{ClientArgs, Output};

/// Membership subcommands of `quiver cluster`.
#[derive(Debug, Subcommand)]
pub enum MembershipCommand {
    /// Stage the join of the node at --cluster (started without --peer, on an empty data
    /// directory, with the cluster's CA) to the cluster of SEED. It owns nothing until
    /// `quiver cluster commit`.
    Join {
        /// Address (IP:port) of any member of the cluster to join.
        seed: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// Stage a member's departure: NODE, or the node at --cluster. After the commit it hands
    /// every replica to the new owners, then stops by itself.
    Leave {
        /// Name of the member to remove [default: the node at --cluster].
        node: Option<String>,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// Show the staged changes: members, partitions that change owner, and the key copies
    /// each node would receive and hand off (estimated from the answering node's trees).
    Plan {
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// Apply the staged changes: rebalance the ring and start the handoffs.
    Commit {
        /// Then wait until every handoff is done, with a progress bar.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// Wait until every reachable node holds the same ring, no node has replicas left to
    /// hand off and no leaving node is still a member; shows a progress bar.
    Wait {
        /// Give up after this many seconds (exit status 1).
        #[arg(long, value_name = "S", default_value_t = 3600)]
        timeout_s: u64,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
}

/// Connects to the first address of `--cluster` that answers (join and leave act on that
/// node, not on any member).
async fn first_node(args: &ClientArgs) -> anyhow::Result<Client> {
    let config = args.client_config()?;
    let mut last = None;
    for addr in args.seeds()? {
        match Client::connect(addr, config.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(anyhow::Error::from(e).context(format!("connect to {addr}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("--cluster names no address")))
}

/// Runs a membership subcommand.
pub async fn run(command: MembershipCommand) -> anyhow::Result<()> {
    let (request, client_args, wait) = match command {
        MembershipCommand::Join { seed, client } => (Request::ClusterJoin { seed }, client, false),
        MembershipCommand::Leave { node, client } => {
            (Request::ClusterLeave { node }, client, false)
        }
        MembershipCommand::Plan { client } => (Request::ClusterPlan, client, false),
        MembershipCommand::Commit { wait, client } => (Request::ClusterCommit, client, wait),
        MembershipCommand::Wait { timeout_s, client } => {
            return wait_for_handoffs(&client, Duration::from_secs(timeout_s)).await;
        }
    };
    let node = first_node(&client_args).await?;
    let plan = node
        .cluster_admin(&request)
        .await
        .with_context(|| format!("node {}", node.addr()))?;
    node.close().await;
    print_plan(&plan, client_args.output);
    if wait {
        wait_for_handoffs(&client_args, Duration::from_secs(3600)).await?;
    }
    Ok(())
}

fn print_plan(plan: &PlanView, output: Output) {
    if output == Output::Json {
        println!(
            "{}",
            json!({
                "node": plan.node,
                "ring_version": plan.ring_version,
                "next_version": plan.next_version,
                "committed": plan.committed,
                "keys_estimated": plan.keys_estimated,
                "copies_moved": plan.copies_moved,
                "copies_total": plan.copies_total,
                "transfers": plan.transfers.iter().map(|(from, to, partitions)| json!({
                    "from": from, "to": to, "partitions": partitions,
                })).collect::<Vec<_>>(),
                "members": plan.members.iter().map(|m| json!({
                    "node": m.node, "addr": m.addr, "state": m.state,
                    "owned_now": m.owned_now, "owned_next": m.owned_next,
                    "replicas_gained": m.replicas_gained, "replicas_lost": m.replicas_lost,
                    "keys_in": m.keys_in, "keys_out": m.keys_out,
                })).collect::<Vec<_>>(),
            })
        );
        return;
    }
    match (plan.committed, plan.next_version) {
        (true, Some(v)) => println!(
            "committed ring version {v} (was {}); handoffs run in the background \
             (`quiver cluster wait` follows them)",
            plan.ring_version
        ),
        (_, Some(v)) => println!(
            "staged: ring version {} -> {v} (apply with `quiver cluster commit`)",
            plan.ring_version
        ),
        (_, None) => println!(
            "ring version {}: nothing staged (stage with `quiver cluster join` or `leave`)",
            plan.ring_version
        ),
    }
    println!(
        "{:<12} {:<22} {:<8} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10}",
        "node", "addr", "state", "owned", "after", "+replicas", "-replicas", "keys-in", "keys-out"
    );
    for m in &plan.members {
        println!(
            "{:<12} {:<22} {:<8} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10}",
            m.node,
            m.addr,
            m.state,
            m.owned_now,
            m.owned_next,
            m.replicas_gained,
            m.replicas_lost,
            m.keys_in,
            m.keys_out
        );
    }
    if !plan.transfers.is_empty() {
        println!("partition ownership moves:");
        for (from, to, partitions) in &plan.transfers {
            println!("  {from} -> {to}: {partitions} partitions");
        }
        let pct = if plan.copies_total == 0 {
            0.0
        } else {
            plan.copies_moved as f64 * 100.0 / plan.copies_total as f64
        };
        println!(
            "data moved: ~{} of ~{} key copies ({pct:.1}%), estimated from {}'s trees \
             (~{} keys)",
            plan.copies_moved, plan.copies_total, plan.node, plan.keys_estimated
        );
    }
}

/// What the reachable nodes report about handoffs.
struct Progress {
    remaining: u64,
    versions: Vec<u64>,
    leaving: Vec<String>,
    unreachable: usize,
}

async fn progress(args: &ClientArgs) -> anyhow::Result<Progress> {
    let cluster = args.connect().await?;
    let statuses = cluster.status().await;
    cluster.close().await;
    let mut p = Progress {
        remaining: 0,
        versions: Vec::new(),
        leaving: Vec::new(),
        unreachable: 0,
    };
    for (_, status) in statuses {
        match status {
            Ok(s) => {
                p.remaining += s.handoff_keys;
                p.versions.push(s.ring_version);
                for m in s.members.iter().filter(|m| m.state == "leaving") {
                    if !p.leaving.contains(&m.node) {
                        p.leaving.push(m.node.clone());
                    }
                }
            }
            Err(_) => p.unreachable += 1,
        }
    }
    Ok(p)
}

async fn wait_for_handoffs(args: &ClientArgs, limit: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "handoff [{bar:40}] {pos}/{len} keys handed off {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut most = 0u64;
    loop {
        let p = progress(args).await?;
        most = most.max(p.remaining);
        bar.set_length(most);
        bar.set_position(most - p.remaining);
        let same_ring = p.versions.windows(2).all(|w| w[0] == w[1]);
        let msg = if p.leaving.is_empty() {
            String::new()
        } else {
            format!("(leaving: {})", p.leaving.join(","))
        };
        bar.set_message(msg);
        if p.remaining == 0 && same_ring && p.leaving.is_empty() {
            bar.finish_with_message("done");
            if args.output == Output::Json {
                println!(
                    "{}",
                    json!({ "handoff": "done", "unreachable": p.unreachable })
                );
            }
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bar.abandon_with_message("timed out");
            anyhow::bail!(
                "handoffs not finished after {} s: {} keys left, leaving: {:?}",
                limit.as_secs(),
                p.remaining,
                p.leaving
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
