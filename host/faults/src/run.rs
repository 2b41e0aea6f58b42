//! One fault-injection run: start a cluster, run the workload under the nemesis' schedule,
//! heal, measure convergence, read every key and check the history.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use quiver_sdk::{Client, ClientConfig, ClusterClient, ReadOptions};
use serde::Serialize;

use crate::checker::{self, AppliedWindow, Verdict};
use crate::cluster::{Cluster, ClusterSpec};
use crate::nemesis::{Nemesis, Schedule, ScheduleSpec};
use crate::workload::{self, BUCKET, Workload, WorkloadSpec, key_name};

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The `quiver` binary.
    pub quiver: PathBuf,
    /// Nodes listen on `127.0.<subnet>.1..=nodes`.
    pub subnet: u8,
    /// Number of nodes.
    pub nodes: usize,
    /// Replicas per key (`--n`); reads for convergence ask this many.
    pub n: usize,
    /// Time the fault schedule may take.
    pub duration: Duration,
    /// Seed of the schedule and the workload.
    pub seed: u64,
    /// Keys of the workload.
    pub keys: usize,
    /// Concurrent workload workers.
    pub workers: usize,
    /// Shortest and longest fault.
    pub hold: (Duration, Duration),
    /// Shortest and longest quiet time before each fault.
    pub gap: (Duration, Duration),
    /// Fault kinds (see [`crate::nemesis::KINDS`]).
    pub kinds: Vec<String>,
    /// Extra `quiver server` flags.
    pub server_args: Vec<String>,
    /// The workload client's deadline per request.
    pub request_timeout: Duration,
    /// Pause after each operation of a worker.
    pub think: Duration,
    /// Longest wait for convergence after the final heal.
    pub convergence_timeout: Duration,
    /// Print progress lines on stderr.
    pub verbose: bool,
}

/// The report of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Seed used.
    pub seed: u64,
    /// Nodes.
    pub nodes: usize,
    /// Keys.
    pub keys: usize,
    /// Workers.
    pub workers: usize,
    /// Seconds the workload ran.
    pub workload_s: f64,
    /// The schedule as applied.
    pub windows: Vec<AppliedWindow>,
    /// The checker's findings.
    pub verdict: Verdict,
    /// Time from the final heal until every node, coordinating a read with r = n, returned
    /// every acknowledged add of every key; `None` if that did not happen in time.
    pub convergence_all_nodes_ms: Option<u64>,
    /// Time from the final heal until every replica of every key, read with r = 1 at that
    /// replica (which answers from its own copy first), held every acknowledged add.
    pub convergence_replicas_ms: Option<u64>,
    /// What the r = n reads answered before they converged (distinct consecutive answers).
    pub convergence_obstacles: Vec<String>,
    /// The cluster directory (node logs `nI.log`, data): deleted at the end of the run,
    /// unless the run failed or `QUIVER_FAULTS_KEEP` is set.
    pub cluster_dir: String,
}

impl Report {
    /// True when the checker found nothing wrong and every node converged.
    pub fn ok(&self) -> bool {
        self.verdict.valid() && self.convergence_all_nodes_ms.is_some()
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let v = &self.verdict;
        let pct = |a: &checker::Availability| {
            format!("{:.2} % ({} of {} ops)", a.fraction * 100.0, a.ok, a.ops)
        };
        let ms = |m: Option<u64>| match m {
            Some(m) => format!("{m} ms"),
            None => "NOT REACHED".into(),
        };
        let mut s = String::new();
        s.push_str(&format!(
            "quiver-faults: seed {}, {} nodes, {} keys, {} workers, workload {:.1} s\n",
            self.seed, self.nodes, self.keys, self.workers, self.workload_s
        ));
        s.push_str(
            "fault windows (availability of the ops started inside; convergence: every node \
             returns, with r = n, every add acknowledged before the heal):\n",
        );
        for (i, (w, a)) in self.windows.iter().zip(&v.per_window).enumerate() {
            let converged = match w.converged_ms {
                Some(m) => format!("{m} ms"),
                None if i + 1 < self.windows.len() => "not before the next fault".into(),
                None => "NOT REACHED".into(),
            };
            s.push_str(&format!(
                "  {:>7.1}-{:>7.1} s  {:<40} {:<32} converged {converged}\n",
                w.start_s,
                w.end_s,
                w.fault,
                pct(a),
            ));
        }
        s.push_str(&format!(
            "adds: {} acknowledged, {} attempted, {} indeterminate found\n",
            v.acked, v.attempted, v.recovered
        ));
        s.push_str(&format!(
            "lost acknowledged adds: {} {:?}\n",
            v.lost.len(),
            &v.lost[..v.lost.len().min(20)]
        ));
        s.push_str(&format!(
            "unexpected elements: {} {:?}\n",
            v.unexpected.len(),
            &v.unexpected[..v.unexpected.len().min(20)]
        ));
        s.push_str(&format!(
            "availability outside faults: {}\n",
            pct(&v.outside)
        ));
        s.push_str(&format!(
            "availability inside faults:  {}\n",
            pct(&v.inside)
        ));
        s.push_str(&format!(
            "convergence after final heal: every node (r=n) {}, every replica (r=1) {}\n",
            ms(self.convergence_all_nodes_ms),
            ms(self.convergence_replicas_ms)
        ));
        for o in &self.convergence_obstacles {
            s.push_str(&format!("  before convergence: {o}\n"));
        }
        if !v.errors.is_empty() {
            s.push_str("failed operations by error:\n");
            for (e, n) in &v.errors {
                s.push_str(&format!("  {n:>7}  {e}\n"));
            }
        }
        s.push_str(&format!(
            "verdict: {}\n",
            if self.ok() { "OK" } else { "FAILED" }
        ));
        s
    }
}

/// Runs the whole thing. Every process and nft table it creates is gone when it returns,
/// also on error or panic (their guards drop).
pub async fn run(spec: &RunSpec) -> anyhow::Result<Report> {
    let log = |m: String| {
        if spec.verbose {
            eprintln!("[quiver-faults] {m}");
        }
    };
    // The nemesis first: it deletes a stale table of an earlier, killed run.
    let nemesis = Nemesis::new(spec.subnet).context("nftables")?;
    let mut server_args = vec!["--n".to_string(), spec.n.to_string()];
    server_args.extend(spec.server_args.iter().cloned());
    let mut cluster = blocking(|| {
        Cluster::start(ClusterSpec {
            quiver: spec.quiver.clone(),
            subnet: spec.subnet,
            nodes: spec.nodes,
            server_args,
        })
    })?;
    log(format!(
        "{} nodes up in {}",
        spec.nodes,
        cluster.dir().display()
    ));
    let mut config = cluster.client_config()?;
    config.request_timeout = spec.request_timeout;

    // Ready = every node coordinates a read that every replica answers, i.e. every node
    // has its peer connections.
    let nothing = BTreeMap::new();
    let mut reads = NodeReads::default();
    let ready_by = Instant::now() + Duration::from_secs(60);
    while let Err(why) = reads
        .all_nodes_have(&cluster, &config, spec, &nothing)
        .await
    {
        if Instant::now() > ready_by {
            bail!("timed out after 60 s waiting until every node serves r = n reads: {why}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let schedule = Schedule::generate(&ScheduleSpec {
        seed: spec.seed,
        nodes: spec.nodes,
        duration: spec.duration,
        hold: spec.hold,
        gap: spec.gap,
        kinds: spec.kinds.clone(),
    });
    log(format!(
        "schedule: {} fault windows",
        schedule.windows.len()
    ));
    let client = ClusterClient::connect(cluster.addrs(), config.clone()).await?;
    let started = Instant::now();
    let load = Workload::start(
        client.clone(),
        &WorkloadSpec {
            seed: spec.seed,
            keys: spec.keys,
            workers: spec.workers,
            think: spec.think,
            backoff: Duration::from_millis(100),
        },
        started,
    );
    let mut applied: Vec<AppliedWindow> = Vec::new();
    let mut last_heal: Option<Instant> = None;
    for w in &schedule.windows {
        let gap_end = tokio::time::Instant::now() + w.gap;
        // During the quiet time, time the convergence of the previous heal: every node
        // must return every add acknowledged before it (the workload keeps running).
        if let (Some(healed), Some(prev)) = (last_heal, applied.last_mut()) {
            let target = load.acked();
            let mut last_why = String::new();
            while tokio::time::Instant::now() < gap_end {
                let probe = reads.all_nodes_have(&cluster, &config, spec, &target);
                match tokio::time::timeout_at(gap_end, probe).await {
                    Ok(Ok(())) => {
                        prev.converged_ms = Some(healed.elapsed().as_millis() as u64);
                        break;
                    }
                    // What kept the heal from converging, each distinct answer once.
                    Ok(Err(why)) if why != last_why => {
                        log(format!(
                            "{:>6} ms after heal: {why}",
                            healed.elapsed().as_millis()
                        ));
                        last_why = why;
                    }
                    _ => {}
                }
                tokio::time::sleep_until(
                    gap_end.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                )
                .await;
            }
        }
        tokio::time::sleep_until(gap_end).await;
        let start = started.elapsed();
        blocking(|| nemesis.apply(&mut cluster, &w.fault))?;
        log(format!(
            "{:>7.1} s  {:?} for {:?} ({} ops so far)",
            start.as_secs_f64(),
            w.fault,
            w.hold,
            load.ops()
        ));
        tokio::time::sleep(w.hold).await;
        blocking(|| nemesis.heal(&mut cluster))?;
        last_heal = Some(Instant::now());
        applied.push(AppliedWindow {
            kind: w.fault.kind().to_string(),
            fault: describe(&w.fault, &cluster),
            start_s: start.as_secs_f64(),
            end_s: started.elapsed().as_secs_f64(),
            converged_ms: None,
        });
    }
    // The workload stops at the final heal, so convergence is timed from the heal itself
    // (the healed node's peers must find it up again) with every acknowledged add in the
    // target. A schedule without windows runs the workload for the whole duration.
    if applied.is_empty() {
        tokio::time::sleep(spec.duration).await;
    }
    let healed = Instant::now();
    let history = load.stop().await;
    let workload_s = started.elapsed().as_secs_f64();
    client.close().await;
    log(format!("workload stopped: {} ops", history.len()));

    // Acknowledged adds per key, the target of convergence.
    let mut acked: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
    for op in &history {
        if op.outcome == workload::Outcome::Acked {
            acked.entry(op.key).or_default().insert(op.element);
        }
    }
    let (mut all_nodes_ms, mut replicas_ms) = (None, None);
    let deadline = healed + spec.convergence_timeout;
    let mut probe = Probe::default();
    // What kept the r = n reads from converging, in order (distinct consecutive answers).
    let mut obstacles: Vec<String> = Vec::new();
    while Instant::now() < deadline && (all_nodes_ms.is_none() || replicas_ms.is_none()) {
        // Replicas first: the r = n reads below repair what they find stale.
        if replicas_ms.is_none()
            && probe
                .replicas_have(&cluster, &config, spec, &acked)
                .await
                .unwrap_or(false)
        {
            replicas_ms = Some(healed.elapsed().as_millis() as u64);
        }
        if all_nodes_ms.is_none() {
            match reads.all_nodes_have(&cluster, &config, spec, &acked).await {
                Ok(()) => all_nodes_ms = Some(healed.elapsed().as_millis() as u64),
                Err(why) => {
                    if obstacles.last() != Some(&why) {
                        log(format!(
                            "{:>6} ms after heal: {why}",
                            healed.elapsed().as_millis()
                        ));
                        obstacles.push(why);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reads.close().await;
    log(format!(
        "convergence: all nodes {all_nodes_ms:?} ms, replicas {replicas_ms:?} ms"
    ));

    if let Some(last) = applied.last_mut() {
        last.converged_ms = all_nodes_ms;
    }

    // The final read: the union of every node's r = n read, so an add any replica holds is
    // found; whatever a node could not read is simply missing (and reported as lost).
    let mut final_sets: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
    for addr in cluster.addrs() {
        let Ok(c) = Client::connect(addr, config.clone()).await else {
            continue;
        };
        for k in 0..spec.keys {
            if let Ok(got) = c.get_with(BUCKET, key_name(k), &read_all(spec.n)).await {
                final_sets
                    .entry(k)
                    .or_default()
                    .extend(workload::union(&got).unwrap_or_default());
            }
        }
        c.close().await;
    }
    let verdict = checker::check(&history, &final_sets, &applied);
    if !verdict.valid()
        || all_nodes_ms.is_none()
        || std::env::var_os("QUIVER_FAULTS_KEEP").is_some()
    {
        // Node logs and data stay for a post-mortem; the processes still end.
        cluster.keep_dir();
        log(format!("kept {}", cluster.dir().display()));
    }
    Ok(Report {
        seed: spec.seed,
        nodes: spec.nodes,
        keys: spec.keys,
        workers: spec.workers,
        workload_s,
        windows: applied,
        verdict,
        convergence_all_nodes_ms: all_nodes_ms,
        convergence_replicas_ms: replicas_ms,
        convergence_obstacles: obstacles,
        cluster_dir: cluster.dir().display().to_string(),
    })
}

fn describe(fault: &crate::nemesis::Fault, c: &Cluster) -> String {
    use crate::nemesis::Fault::*;
    let names = |v: &[usize]| v.iter().map(|&i| c.name(i)).collect::<Vec<_>>().join(",");
    match fault {
        Partition { side } => format!("partition {} | rest", names(side)),
        OneWay { node } => format!("one-way: {} hears no peer", c.name(*node)),
        Loss { percent } => format!("loss {percent} % between nodes"),
        Pause { node } => format!("pause (SIGSTOP) {}", c.name(*node)),
        Crash { node } => format!("crash (kill -9) {}, restart", c.name(*node)),
        Skew { node, secs } => format!("clock skew {secs:+} s on {}", c.name(*node)),
    }
}

fn read_all(n: usize) -> ReadOptions {
    ReadOptions {
        r: Some(n as u8),
        ..ReadOptions::default()
    }
}

/// One client connection per node for the r = n reads, kept between checks: dialling and
/// closing five connections took most of a check (each close waits out QUIC's draining
/// period), which blurred the measured convergence by most of a second.
#[derive(Default)]
struct NodeReads {
    clients: HashMap<usize, Client>,
}

impl NodeReads {
    /// `Ok` when every node, coordinating a read of each key with r = n, returns every
    /// element of `want` (an empty `want` only checks that the reads succeed); otherwise
    /// what the first node (in name order) that fell short answered.
    ///
    /// Every read runs at once, so one check takes about one read, not one per key and
    /// node. A node whose connection failed is dialled afresh at the next check.
    async fn all_nodes_have(
        &mut self,
        cluster: &Cluster,
        config: &ClientConfig,
        spec: &RunSpec,
        want: &BTreeMap<usize, BTreeSet<u64>>,
    ) -> Result<(), String> {
        let mut reads = tokio::task::JoinSet::new();
        for (i, addr) in cluster.addrs().iter().enumerate() {
            let node = cluster.name(i);
            let c = match self.clients.get(&i) {
                Some(c) => c.clone(),
                None => {
                    let c = Client::connect(addr, config.clone())
                        .await
                        .map_err(|e| format!("{node}: {e}"))?;
                    self.clients.insert(i, c.clone());
                    c
                }
            };
            for k in 0..spec.keys {
                let (c, node, wanted) = (c.clone(), node.clone(), want.get(&k).cloned());
                let options = read_all(spec.n);
                reads.spawn(async move {
                    let (result, broken) = match c.get_with(BUCKET, key_name(k), &options).await {
                        Ok(got) => match (workload::union(&got), wanted) {
                            (Ok(have), Some(w)) if !w.is_subset(&have) => (
                                Err(format!(
                                    "{node}: key {k} lacks {} acknowledged adds",
                                    w.difference(&have).count()
                                )),
                                false,
                            ),
                            (Ok(_), _) => (Ok(()), false),
                            (Err(e), _) => (Err(format!("{node}: key {k}: {e}")), false),
                        },
                        // Only the node's own answer keeps the connection: after a
                        // transport failure or a timeout the next check dials afresh.
                        Err(e) => (
                            Err(format!("{node}: key {k}: {e}")),
                            !matches!(e, quiver_sdk::Error::Server { .. }),
                        ),
                    };
                    (i, k, result, broken)
                });
            }
        }
        let mut failures = Vec::new();
        while let Some(joined) = reads.join_next().await {
            match joined {
                Ok((i, k, Err(why), broken)) => {
                    if broken && let Some(c) = self.clients.remove(&i) {
                        c.close().await;
                    }
                    failures.push((i, k, why));
                }
                Ok(_) => {}
                Err(e) => failures.push((usize::MAX, 0, format!("read task: {e}"))),
            }
        }
        failures.sort();
        match failures.into_iter().next() {
            Some((_, _, why)) => Err(why),
            None => Ok(()),
        }
    }

    async fn close(self) {
        for (_, c) in self.clients {
            c.close().await;
        }
    }
}

/// Connections for the replica probe, kept between rounds.
#[derive(Default)]
struct Probe {
    routing: Option<ClusterClient>,
    conns: HashMap<String, Client>,
}

impl Probe {
    /// True when each of the n replicas of each key, read with r = 1 (its own copy first),
    /// holds every acknowledged add.
    async fn replicas_have(
        &mut self,
        cluster: &Cluster,
        config: &ClientConfig,
        spec: &RunSpec,
        want: &BTreeMap<usize, BTreeSet<u64>>,
    ) -> anyhow::Result<bool> {
        if self.routing.is_none() {
            self.routing = Some(ClusterClient::connect(cluster.addrs(), config.clone()).await?);
        }
        let Some(routing) = &self.routing else {
            bail!("no routing client")
        };
        for k in 0..spec.keys {
            let name = key_name(k);
            let replicas = routing.route(BUCKET, name.as_bytes()).await;
            for addr in replicas.iter().take(spec.n) {
                if !self.conns.contains_key(addr) {
                    let c = Client::connect(addr, config.clone()).await?;
                    self.conns.insert(addr.clone(), c);
                }
                let Some(c) = self.conns.get(addr) else {
                    bail!("no connection")
                };
                let got = match c.get_with(BUCKET, &name, &read_all(1)).await {
                    Ok(g) => g,
                    Err(e) => {
                        self.conns.remove(addr);
                        return Err(e.into());
                    }
                };
                let have = workload::union(&got)?;
                if let Some(w) = want.get(&k)
                    && !w.is_subset(&have)
                {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// Runs a blocking process operation (a node start waits for its readiness line) without
/// stalling the workload's tasks on this thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}
