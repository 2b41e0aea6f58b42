//! The set-add workload: each operation reads a key through the routing client, unions the
//! sets of its siblings, adds one element never used before and writes the set back with
//! the read's context. With dotted version vectors no add may be lost: a write covers only
//! what its context saw, so concurrent or unseen versions survive as siblings.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_sdk::{ClusterClient, Error, GetResult};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The bucket the workload writes.
pub const BUCKET: &str = "faults";

/// Key `i` of the workload.
pub fn key_name(i: usize) -> String {
    format!("set-{i}")
}

/// How one operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The write was acknowledged: the element must never be lost.
    Acked,
    /// The read failed; no write was sent, the element was never attempted.
    ReadFailed(String),
    /// The write failed or timed out: the element may or may not be stored.
    WriteFailed(String),
}

/// One operation of the history.
#[derive(Debug, Clone)]
pub struct Op {
    /// The worker that ran it.
    pub worker: usize,
    /// The key index.
    pub key: usize,
    /// The element it added (unique across the run).
    pub element: u64,
    /// When it started, since the workload's start.
    pub start: Duration,
    /// When it ended.
    pub end: Duration,
    /// The result.
    pub outcome: Outcome,
}

/// A value that is not a set this workload wrote.
#[derive(Debug, thiserror::Error)]
#[error("value is not a set of elements: {0:?}")]
pub struct BadValue(pub String);

/// Encodes a set as comma-separated decimal numbers (readable with `quiver get`).
pub fn encode(set: &BTreeSet<u64>) -> Vec<u8> {
    set.iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes()
}

/// Decodes one sibling's value.
pub fn decode(value: &[u8]) -> Result<BTreeSet<u64>, BadValue> {
    let text =
        std::str::from_utf8(value).map_err(|_| BadValue(String::from_utf8_lossy(value).into()))?;
    if text.is_empty() {
        return Ok(BTreeSet::new());
    }
    text.split(',')
        .map(|e| {
            e.parse::<u64>()
                .map_err(|_| BadValue(text.chars().take(80).collect()))
        })
        .collect()
}

/// The union of every live sibling's set.
pub fn union(got: &GetResult) -> Result<BTreeSet<u64>, BadValue> {
    let mut set = BTreeSet::new();
    for v in got.values() {
        set.extend(decode(v)?);
    }
    Ok(set)
}

/// A short, countable name for an error (the kind, and the node's code when it answered).
pub fn classify(e: &Error) -> String {
    match e {
        Error::Server { code, .. } => format!("{code:?}"),
        Error::Timeout { .. } => "Timeout".into(),
        Error::Connect { .. } => "Connect".into(),
        Error::Connection { .. } => "Connection".into(),
        Error::Replicas { attempts } => {
            let last = attempts
                .last()
                .map(|a| classify(&a.error))
                .unwrap_or_default();
            format!("Replicas({} tried, last {last})", attempts.len())
        }
        other => {
            let s = other.to_string();
            s.split(':').next().unwrap_or_default().to_string()
        }
    }
}

/// Workload parameters.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Seed of the key choices.
    pub seed: u64,
    /// Number of keys.
    pub keys: usize,
    /// Concurrent workers (each one operation at a time).
    pub workers: usize,
    /// Pause after each operation of a worker.
    pub think: Duration,
    /// Pause after a failed operation, so an unavailable cluster is not hammered.
    pub backoff: Duration,
}

/// A running workload; [`Workload::stop`] ends it and returns the history.
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    history: Arc<Mutex<Vec<Op>>>,
    started: Instant,
}

impl Workload {
    /// Starts `spec.workers` workers on `client`; times are measured from `started`.
    pub fn start(client: ClusterClient, spec: &WorkloadSpec, started: Instant) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicU64::new(1));
        let tasks = (0..spec.workers)
            .map(|w| {
                let client = client.clone();
                let stop = Arc::clone(&stop);
                let history = Arc::clone(&history);
                let next = Arc::clone(&next);
                let spec = spec.clone();
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(spec.seed ^ ((w as u64 + 1) << 32));
                    while !stop.load(Ordering::Relaxed) {
                        let key = rng.random_range(0..spec.keys);
                        let element = next.fetch_add(1, Ordering::Relaxed);
                        let start = started.elapsed();
                        let outcome = add(&client, key, element).await;
                        let failed = outcome != Outcome::Acked;
                        let op = Op {
                            worker: w,
                            key,
                            element,
                            start,
                            end: started.elapsed(),
                            outcome,
                        };
                        history.lock().unwrap_or_else(|p| p.into_inner()).push(op);
                        let pause = if failed { spec.backoff } else { spec.think };
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Workload {
            stop,
            tasks,
            history,
            started,
        }
    }

    /// Operations finished so far.
    pub fn ops(&self) -> usize {
        self.history.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The adds acknowledged so far, by key index.
    pub fn acked(&self) -> BTreeMap<usize, BTreeSet<u64>> {
        let mut acked: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        for op in self
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if op.outcome == Outcome::Acked {
                acked.entry(op.key).or_default().insert(op.element);
            }
        }
        acked
    }

    /// Asks every worker to stop after its current operation, waits for them and returns
    /// the history in order of start.
    pub async fn stop(self) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let mut ops = std::mem::take(&mut *self.history.lock().unwrap_or_else(|p| p.into_inner()));
        ops.sort_by_key(|o| o.start);
        let _ = self.started;
        ops
    }
}

/// One read-add-write.
async fn add(client: &ClusterClient, key: usize, element: u64) -> Outcome {
    let name = key_name(key);
    let got = match client.get(BUCKET, &name).await {
        Ok(g) => g,
        Err(e) => return Outcome::ReadFailed(classify(&e)),
    };
    let mut set = match union(&got) {
        Ok(s) => s,
        // Never write over a value we cannot read: the checker reports it.
        Err(e) => return Outcome::ReadFailed(e.to_string()),
    };
    set.insert(element);
    match client
        .put(BUCKET, &name, encode(&set), Some(&got.context))
        .await
    {
        Ok(_) => Outcome::Acked,
        Err(e) => Outcome::WriteFailed(classify(&e)),
    }
}
