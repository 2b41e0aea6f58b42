//! `quiver-faults run`: a fault-injection run against real `quiver server` processes,
//! printing the checker's report (text or JSON). Exit code 0 when no acknowledged add was
//! lost, nothing unexpected appeared and every node converged; 1 otherwise; 2 on a setup
//! error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use quiver_faults::nemesis::KINDS;
use quiver_faults::run::{RunSpec, run};

#[derive(Parser)]
#[command(version, about = "Fault injection for Quiver clusters on loopback")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster, run set adds under partitions, loss, pauses, crashes and clock skew,
    /// heal, and check that no acknowledged add was lost.
    Run(RunArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The `quiver` binary.
    #[arg(long)]
    quiver: PathBuf,
    /// Nodes, on 127.0.SUBNET.1..=N:7470.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Third byte of the node addresses.
    #[arg(long, default_value_t = 59)]
    subnet: u8,
    /// Replicas per key.
    #[arg(long, default_value_t = 3)]
    n: usize,
    /// How long the workload runs under the fault schedule (e.g. 600s, 10m).
    #[arg(long, default_value = "600s", value_parser = duration)]
    duration: Duration,
    /// Seed of the fault schedule and the workload's key choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keys written.
    #[arg(long, default_value_t = 10)]
    keys: usize,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Shortest fault.
    #[arg(long, default_value = "10s", value_parser = duration)]
    hold_min: Duration,
    /// Longest fault.
    #[arg(long, default_value = "30s", value_parser = duration)]
    hold_max: Duration,
    /// Shortest quiet time before a fault.
    #[arg(long, default_value = "5s", value_parser = duration)]
    gap_min: Duration,
    /// Longest quiet time before a fault.
    #[arg(long, default_value = "15s", value_parser = duration)]
    gap_max: Duration,
    /// Fault kinds, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = KINDS.map(String::from))]
    faults: Vec<String>,
    /// Client deadline per request.
    #[arg(long, default_value = "3s", value_parser = duration)]
    request_timeout: Duration,
    /// Pause after each operation of a worker.
    #[arg(long, default_value = "0ms", value_parser = duration)]
    think: Duration,
    /// Longest wait for convergence after the final heal.
    #[arg(long, default_value = "60s", value_parser = duration)]
    convergence_timeout: Duration,
    /// Extra `quiver server` flag (repeat), e.g. --server-arg=--ae-interval-ms=1000.
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

/// Parses `600s`, `10m`, `1500ms` or a number of seconds.
fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (ms, s or m)")),
    }
}

fn main() -> ExitCode {
    let Cmd::Run(a) = Cli::parse().command;
    for k in &a.faults {
        if !KINDS.contains(&k.as_str()) {
            eprintln!("unknown fault kind {k:?}; known: {}", KINDS.join(","));
            return ExitCode::from(2);
        }
    }
    let spec = RunSpec {
        quiver: a.quiver,
        subnet: a.subnet,
        nodes: a.nodes,
        n: a.n,
        duration: a.duration,
        seed: a.seed,
        keys: a.keys,
        workers: a.workers,
        hold: (a.hold_min, a.hold_max),
        gap: (a.gap_min, a.gap_max),
        kinds: a.faults,
        server_args: a.server_arg,
        request_timeout: a.request_timeout,
        think: a.think,
        convergence_timeout: a.convergence_timeout,
        verbose: !a.quiet,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // Ctrl-C drops the run, whose guards kill the nodes and delete the nft table; the
    // default SIGINT action would end the process without running them.
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(&spec) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    let Some(outcome) = outcome else {
        eprintln!("quiver-faults: interrupted; nodes and nft rules removed");
        return ExitCode::from(130);
    };
    match outcome {
        Ok(report) => {
            match a.output {
                Output::Text => print!("{}", report.text()),
                Output::Json => match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("cannot encode the report: {e}"),
                },
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("quiver-faults: {e:#}");
            ExitCode::from(2)
        }
    }
}
