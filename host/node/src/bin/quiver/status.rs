//! `quiver cluster ring` and `quiver cluster status`: what each node reports.

use anyhow::Context as _;
use serde_json::json;

use crate::args::{ClientArgs, Output};

/// Runs `quiver cluster ring`.
pub async fn cluster_ring(client_args: ClientArgs, list_partitions: bool) -> anyhow::Result<()> {
    let cluster = client_args.connect().await?;
    let client = cluster.any().await.context("no node answered")?;
    let (ring, addrs, n) = client.ring().await.context("fetch the ring")?;
    let q = ring.partitions();
    let mut replicas: std::collections::BTreeMap<&str, u32> = Default::default();
    let mut lists = Vec::with_capacity(q as usize);
    for p in 0..q {
        let list = ring
            .preference_list(p, n)
            .with_context(|| format!("partition {p}"))?;
        let primaries: Vec<&str> = list.primaries.iter().map(|m| m.id.as_str()).collect();
        for id in &primaries {
            *replicas.entry(id).or_default() += 1;
        }
        lists.push((p, primaries));
    }
    let addr_of = |id: &str| {
        addrs
            .iter()
            .find(|(m, _)| m == id)
            .map_or("", |(_, a)| a.as_str())
            .to_string()
    };
    let pct = |count: u32| f64::from(count) * 100.0 / f64::from(q.max(1));
    let owned = ring.owned_counts();
    match client_args.output {
        Output::Json => {
            let members: Vec<_> = owned
                .iter()
                .map(|(m, count)| {
                    json!({
                        "node": m.id, "addr": addr_of(&m.id), "weight": m.weight, "zone": m.zone,
                        "owned": count, "owned_pct": pct(*count),
                        "replicas": replicas.get(m.id.as_str()).copied().unwrap_or(0),
                    })
                })
                .collect();
            let mut out = json!({
                "version": ring.version(), "partitions": q, "n": n, "members": members,
            });
            if list_partitions {
                out["preference_lists"] = lists
                    .iter()
                    .map(|(p, primaries)| json!({ "partition": p, "primaries": primaries }))
                    .collect();
            }
            println!("{out}");
        }
        Output::Human => {
            println!("ring version {}: {q} partitions, n={n}", ring.version());
            println!(
                "{:<12} {:<22} {:>6} {:<8} {:>7} {:>8} {:>9}",
                "node", "addr", "weight", "zone", "owned", "owned%", "replicas"
            );
            for (m, count) in &owned {
                println!(
                    "{:<12} {:<22} {:>6} {:<8} {:>7} {:>7.1}% {:>9}",
                    m.id,
                    addr_of(&m.id),
                    m.weight,
                    m.zone.as_deref().unwrap_or("-"),
                    count,
                    pct(*count),
                    replicas.get(m.id.as_str()).copied().unwrap_or(0)
                );
            }
            if list_partitions {
                for (p, primaries) in &lists {
                    println!("{p:>6}  {}", primaries.join(","));
                }
            }
        }
    }
    client.close().await;
    cluster.close().await;
    Ok(())
}

/// Runs `quiver cluster status`.
pub async fn cluster_status(client_args: ClientArgs) -> anyhow::Result<()> {
    let client = client_args.connect().await?;
    let statuses = client.status().await;
    match client_args.output {
        Output::Json => {
            let nodes: Vec<_> = statuses
                .iter()
                .map(|(node, st)| match st {
                    Ok(s) => json!({
                        "node": node,
                        "reachable": true,
                        "hints": s.hints,
                        "plugin_failures": s.plugin_failures,
                        "anti_entropy": {
                            "keys": s.ae_keys,
                            "exchanges": s.ae_exchanges,
                            "keys_repaired": s.ae_keys_repaired,
                            "bytes_sent": s.ae_bytes_sent,
                        },
                        "tombstones": s.tombstones,
                        "tombstones_reaped": s.tombstones_reaped,
                        "reads_speculated": s.reads_speculated,
                        "auth_refused": s.auth_refused,
                        "connections_refused": s.connections_refused,
                        "ring_version": s.ring_version,
                        "handoff": {
                            "partitions": s.handoff_partitions,
                            "keys": s.handoff_keys,
                            "keys_sent": s.handoff_keys_sent,
                            "keys_dropped": s.handoff_keys_dropped,
                        },
                        "partitions": s.partitions,
                        "n": s.n, "r": s.r, "w": s.w,
                        "members": s.members.iter().map(|m| json!({
                            "node": m.node, "addr": m.addr, "up": m.up, "partitions": m.partitions,
                            "state": m.state,
                            "owned_pct": f64::from(m.partitions) * 100.0
                                / f64::from(s.partitions.max(1)),
                        })).collect::<Vec<_>>(),
                    }),
                    Err(e) => json!({ "node": node, "reachable": false, "error": e.to_string() }),
                })
                .collect();
            println!("{}", json!({ "nodes": nodes }));
        }
        Output::Human => {
            println!(
                "{:<12} {:<8} {:<10} {:>14} {:>5} {:>9} {:>7} {:>9} {:>9} {:>8} {:>9} {:>10} {:>7} {:>7} {:>8}  sees down",
                "node",
                "state",
                "reachable",
                "owned",
                "ring",
                "handoff",
                "hints",
                "plugin-err",
                "ae-keys",
                "ae-exch",
                "ae-fixed",
                "ae-bytes",
                "tombs",
                "reaped",
                "refused"
            );
            for (node, st) in &statuses {
                match st {
                    Ok(s) => {
                        let me = s.members.iter().find(|m| &m.node == node);
                        let state = me.map_or("-", |m| m.state.as_str());
                        let mine = me.map_or(0, |m| m.partitions);
                        let mine = format!(
                            "{mine} ({:.1}%)",
                            f64::from(mine) * 100.0 / f64::from(s.partitions.max(1))
                        );
                        let down: Vec<&str> = s
                            .members
                            .iter()
                            .filter(|m| !m.up)
                            .map(|m| m.node.as_str())
                            .collect();
                        let down = if down.is_empty() {
                            "-".to_string()
                        } else {
                            down.join(",")
                        };
                        println!(
                            "{node:<12} {state:<8} {:<10} {mine:>14} {:>5} {:>9} {:>7} {:>9} \
                             {:>9} {:>8} {:>9} {:>10} {:>7} {:>7} {:>8}  {down}",
                            "yes",
                            s.ring_version,
                            s.handoff_keys,
                            s.hints,
                            s.plugin_failures,
                            s.ae_keys,
                            s.ae_exchanges,
                            s.ae_keys_repaired,
                            s.ae_bytes_sent,
                            s.tombstones,
                            s.tombstones_reaped,
                            s.auth_refused + s.connections_refused
                        );
                    }
                    Err(e) => println!(
                        "{node:<12} {:<8} {:<10} {:>14} {:>5} {:>9} {:>7} {:>9} {:>9} {:>8} {:>9} \
                         {:>10} {:>7} {:>7} {:>8}  ({e})",
                        "-", "NO", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-"
                    ),
                }
            }
            if let Some((_, Ok(s))) = statuses.iter().find(|(_, s)| s.is_ok()) {
                println!(
                    "ring: {} partitions, n={} r={} w={}",
                    s.partitions, s.n, s.r, s.w
                );
            }
        }
    }
    client.close().await;
    Ok(())
}
