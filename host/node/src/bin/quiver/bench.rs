//! `quiver bench`: a closed-loop load generator (YCSB-style) against any cluster.
//!
//! Each of `--clients` tasks issues one request at a time for `--duration` seconds over a
//! pool of `--connections` QUIC connections; latencies go to per-task HDR histograms that are
//! merged at the end. Read and mixed workloads first load every key once, so reads hit.
//!
//! Puts behave like an application that keeps the causal context it last saw for a key: a
//! shared cache holds the context returned by the latest get or put of each key, and a put
//! sends it. Blind puts would pile up siblings on every key (each is concurrent with the
//! last); with the cache, siblings only come from racing writers, and a put refused with
//! `TooManySiblings` is resolved the way a client would: get, then put with that context.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use quiver_sdk::{ClusterClient as Client, Context, ErrorCode, WriteOptions};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use rand_distr::{Distribution as _, Zipf};
use serde_json::json;

use crate::args::{ClientArgs, Output};

/// Largest latency the histograms track, in microseconds (60 s); slower requests clamp.
const LATENCY_US_MAX: u64 = 60_000_000;
/// Zipfian exponent of YCSB's default request distribution.
const ZIPF_EXPONENT: f64 = 0.99;
/// Concurrent writes while preloading keys.
const PRELOAD_CONCURRENCY: usize = 64;

/// What mix of operations to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Puts only.
    Write,
    /// Gets only (keys are preloaded).
    Read,
    /// 50% gets, 50% puts (YCSB workload A).
    Mixed,
}

/// Which keys requests pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyDistribution {
    /// Every key equally likely.
    Uniform,
    /// A few hot keys (YCSB's zipfian, exponent 0.99).
    Zipfian,
}

/// `quiver bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// QUIC connections shared by the clients (round-robin).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Runtime threads of the load generator. One is the most efficient when the bench shares
    /// a small machine with the node (more threads mostly add scheduling delay to the tail);
    /// raise it against a remote cluster.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Measured run time, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Operation mix.
    #[arg(long, value_enum, default_value_t = Workload::Mixed)]
    pub workload: Workload,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Key popularity.
    #[arg(long, value_enum, default_value_t = KeyDistribution::Uniform)]
    pub distribution: KeyDistribution,
    /// Bytes per written value.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Bucket to use.
    #[arg(long, default_value = "bench")]
    pub bucket: String,
    /// Durability of writes (default: the node's setting).
    #[arg(long, value_name = "MODE")]
    pub durability: Option<quiver_storage::Durability>,
    /// Read quorum of gets (default: the cluster's r).
    #[arg(long)]
    pub r: Option<u8>,
    /// Write quorum of puts (default: the cluster's w).
    #[arg(long)]
    pub w: Option<u8>,
    /// Seed of the key and operation choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Get,
    Put,
}

struct TaskResult {
    gets: Histogram<u64>,
    puts: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).context("cannot create a latency histogram")
}

/// Shards of the context cache, to keep lock contention between clients low.
const CONTEXT_CACHE_SHARDS: usize = 64;

/// The latest context seen per key index.
struct ContextCache {
    shards: Vec<std::sync::Mutex<std::collections::HashMap<u64, Context>>>,
}

impl ContextCache {
    fn new() -> Self {
        Self {
            shards: (0..CONTEXT_CACHE_SHARDS)
                .map(|_| Default::default())
                .collect(),
        }
    }
    fn shard(&self, k: u64) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Context>> {
        // Only this module's closures hold the lock and none of them panics while holding it.
        self.shards[(k as usize) % CONTEXT_CACHE_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
    fn get(&self, k: u64) -> Option<Context> {
        self.shard(k).get(&k).cloned()
    }
    fn set(&self, k: u64, c: Context) {
        self.shard(k).insert(k, c);
    }
}

/// One put as the bench's model application does it (see the module docs).
async fn put_with_cache(
    client: &Client,
    cache: &ContextCache,
    bucket: &str,
    k: u64,
    value: &[u8],
    options: &WriteOptions,
) -> Result<(), quiver_sdk::Error> {
    let key = key_name(k);
    let ctx = cache.get(k);
    match client
        .put_with(
            bucket,
            key.as_bytes(),
            value.to_vec(),
            ctx.as_ref(),
            options,
        )
        .await
    {
        Ok(c) => {
            cache.set(k, c);
            Ok(())
        }
        Err(e) if e.code() == Some(ErrorCode::TooManySiblings) => {
            let read = client.get(bucket, key.as_bytes()).await?;
            let c = client
                .put_with(
                    bucket,
                    key.as_bytes(),
                    value.to_vec(),
                    Some(&read.context),
                    options,
                )
                .await?;
            cache.set(k, c);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn key_name(i: u64) -> String {
    format!("key{i:012}")
}

/// Runs the benchmark and prints its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.clients == 0
        || args.connections == 0
        || args.threads == 0
        || args.keys == 0
        || args.duration == 0
    {
        bail!("--clients, --connections, --threads, --keys and --duration must all be at least 1");
    }
    if args.value_size > quiver_core::limits::VALUE_BYTES_MAX_DEFAULT {
        bail!(
            "--value-size {} exceeds the default 1 MiB value limit",
            args.value_size
        );
    }
    let mut pool = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        pool.push(args.client.connect().await?);
    }
    let options = WriteOptions {
        timeout_ms: None,
        durability: args.durability.map(|d| match d {
            quiver_storage::Durability::Sync => quiver_sdk::Durability::Sync,
            quiver_storage::Durability::Buffered => quiver_sdk::Durability::Buffered,
        }),
        w: args.w,
    };
    let value = vec![b'x'; args.value_size];

    if args.workload != Workload::Write {
        preload(&pool, &args, &value, &options).await?;
    }

    let zipf = Zipf::new(args.keys as f64, ZIPF_EXPONENT).context("invalid zipf parameters")?;
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let bucket: Arc<str> = Arc::from(args.bucket.as_str());
    let value: Arc<[u8]> = Arc::from(value);
    let cache = Arc::new(ContextCache::new());
    let mut tasks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let client = pool[i % pool.len()].clone();
        let bucket = Arc::clone(&bucket);
        let value = Arc::clone(&value);
        let options = options.clone();
        let read_options = quiver_sdk::ReadOptions {
            timeout_ms: None,
            r: args.r,
            raw: false,
            head: false,
        };
        let cache = Arc::clone(&cache);
        let (workload, distribution, keys) = (args.workload, args.distribution, args.keys);
        let mut rng =
            SmallRng::seed_from_u64(args.seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        tasks.push(tokio::spawn(async move {
            let mut out = TaskResult {
                gets: histogram()?,
                puts: histogram()?,
                errors: 0,
                first_error: None,
            };
            while Instant::now() < deadline {
                let k = match distribution {
                    KeyDistribution::Uniform => rng.random_range(0..keys),
                    // Zipf samples 1..=n as floats.
                    KeyDistribution::Zipfian => (zipf.sample(&mut rng) as u64)
                        .saturating_sub(1)
                        .min(keys - 1),
                };
                let op = match workload {
                    Workload::Write => Op::Put,
                    Workload::Read => Op::Get,
                    Workload::Mixed => {
                        if rng.random_bool(0.5) {
                            Op::Get
                        } else {
                            Op::Put
                        }
                    }
                };
                let t0 = Instant::now();
                let result = match op {
                    Op::Get => client
                        .get_with(&bucket, key_name(k).as_bytes(), &read_options)
                        .await
                        .map(|r| cache.set(k, r.context)),
                    Op::Put => put_with_cache(&client, &cache, &bucket, k, &value, &options).await,
                };
                let us = (t0.elapsed().as_micros() as u64).clamp(1, LATENCY_US_MAX);
                match result {
                    Ok(()) => {
                        let h = if op == Op::Get {
                            &mut out.gets
                        } else {
                            &mut out.puts
                        };
                        h.saturating_record(us);
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            anyhow::Ok(out)
        }));
    }
    let mut gets = histogram()?;
    let mut puts = histogram()?;
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let r = t.await.context("a bench client task failed")??;
        gets.add(&r.gets).context("merging histograms")?;
        puts.add(&r.puts).context("merging histograms")?;
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = histogram()?;
    all.add(&gets).context("merging histograms")?;
    all.add(&puts).context("merging histograms")?;
    report(
        &args,
        elapsed,
        &all,
        &gets,
        &puts,
        errors,
        first_error.as_deref(),
    );
    for c in pool {
        c.close().await;
    }
    Ok(())
}

async fn preload(
    pool: &[Client],
    args: &BenchArgs,
    value: &[u8],
    options: &WriteOptions,
) -> anyhow::Result<()> {
    if args.client.output == Output::Human {
        eprintln!("preloading {} keys ...", args.keys);
    }
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..PRELOAD_CONCURRENCY.min(args.keys as usize) {
        let client = pool[i % pool.len()].clone();
        let next = Arc::clone(&next);
        let (bucket, value, options, keys) = (
            args.bucket.clone(),
            value.to_vec(),
            options.clone(),
            args.keys,
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if k >= keys {
                    return anyhow::Ok(());
                }
                client
                    .put_with(
                        &bucket,
                        key_name(k).as_bytes(),
                        value.clone(),
                        None,
                        &options,
                    )
                    .await
                    .with_context(|| format!("preloading {}", key_name(k)))?;
            }
        }));
    }
    for t in tasks {
        t.await.context("a preload task failed")??;
    }
    Ok(())
}

fn stats(h: &Histogram<u64>, elapsed: f64) -> serde_json::Value {
    json!({
        "ops": h.len(),
        "ops_per_sec": (h.len() as f64 / elapsed).round(),
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

fn report(
    args: &BenchArgs,
    elapsed: f64,
    all: &Histogram<u64>,
    gets: &Histogram<u64>,
    puts: &Histogram<u64>,
    errors: u64,
    first_error: Option<&str>,
) {
    let workload = format!("{:?}", args.workload).to_lowercase();
    let distribution = format!("{:?}", args.distribution).to_lowercase();
    match args.client.output {
        Output::Json => {
            let out = json!({
                "workload": workload,
                "distribution": distribution,
                "clients": args.clients,
                "connections": args.connections,
                "threads": args.threads,
                "keys": args.keys,
                "value_size": args.value_size,
                "durability": args.durability.map(|d| d.to_string()),
                "elapsed_sec": elapsed,
                "errors": errors,
                "first_error": first_error,
                "all": stats(all, elapsed),
                "get": stats(gets, elapsed),
                "put": stats(puts, elapsed),
            });
            println!("{out}");
        }
        Output::Human => {
            println!(
                "workload {workload}, {distribution} over {} keys, {} clients on {} connections, \
                 {}-byte values, {:.1} s",
                args.keys, args.clients, args.connections, args.value_size, elapsed
            );
            println!(
                "{:<5} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}",
                "op", "ops", "ops/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs"
            );
            for (name, h) in [("all", all), ("get", gets), ("put", puts)] {
                if h.is_empty() {
                    continue;
                }
                println!(
                    "{:<5} {:>10} {:>10.0} {:>9} {:>9} {:>9} {:>9}",
                    name,
                    h.len(),
                    h.len() as f64 / elapsed,
                    h.value_at_quantile(0.50),
                    h.value_at_quantile(0.99),
                    h.value_at_quantile(0.999),
                    h.max()
                );
            }
            println!("errors: {errors}");
            if let Some(e) = first_error {
                println!("first error: {e}");
            }
        }
    }
}
