//! The nemesis: a deterministic schedule of faults drawn from a seed, applied to a
//! [`Cluster`] one window at a time and healed at the window's end.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cluster::{Cluster, ClusterError};
use crate::nft::{Firewall, NftError};

/// One kind of fault, with its targets (node indices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// `side` and the other nodes cannot exchange packets, both ways.
    Partition {
        /// The cut-off minority.
        side: Vec<usize>,
    },
    /// `node` receives nothing from the other nodes; they still receive from it.
    OneWay {
        /// The node that goes deaf.
        node: usize,
    },
    /// `percent` % of node-to-node packets are dropped at random.
    Loss {
        /// Drop probability per packet.
        percent: u8,
    },
    /// `node` is SIGSTOPped; heal sends SIGCONT.
    Pause {
        /// The paused node.
        node: usize,
    },
    /// `node` is killed with SIGKILL; heal restarts it on the same data directory.
    Crash {
        /// The killed node.
        node: usize,
    },
    /// `node` is restarted with its wall clock moved by `secs` (libfaketime); heal restarts
    /// it with the real clock.
    Skew {
        /// The skewed node.
        node: usize,
        /// Offset in seconds (either sign).
        secs: i64,
    },
}

impl Fault {
    /// The kind's name, one of [`KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Partition { .. } => "partition",
            Fault::OneWay { .. } => "one_way",
            Fault::Loss { .. } => "loss",
            Fault::Pause { .. } => "pause",
            Fault::Crash { .. } => "crash",
            Fault::Skew { .. } => "skew",
        }
    }
}

/// Every fault kind, by name, in the order [`Schedule::generate`] starts from.
pub const KINDS: [&str; 6] = ["partition", "one_way", "loss", "pause", "crash", "skew"];

/// One fault window of a schedule: start after the previous window's heal plus `gap`, hold
/// for `hold`.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Quiet time before the fault.
    pub gap: Duration,
    /// The fault.
    pub fault: Fault,
    /// How long the fault holds before it is healed.
    pub hold: Duration,
}

/// A fault schedule: the same seed and parameters always give the same schedule.
#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    /// The windows in order.
    pub windows: Vec<Window>,
}

/// Parameters of [`Schedule::generate`].
#[derive(Debug, Clone)]
pub struct ScheduleSpec {
    /// Seed of every draw.
    pub seed: u64,
    /// Number of nodes.
    pub nodes: usize,
    /// Total time the schedule may take (gaps and holds).
    pub duration: Duration,
    /// Shortest and longest fault.
    pub hold: (Duration, Duration),
    /// Shortest and longest quiet time between faults.
    pub gap: (Duration, Duration),
    /// Fault kinds to use (names of [`KINDS`]).
    pub kinds: Vec<String>,
}

impl Schedule {
    /// Draws a schedule: the kinds are taken in rounds, each round a seeded shuffle of
    /// every kind, so a schedule long enough for one round holds every kind once.
    pub fn generate(spec: &ScheduleSpec) -> Schedule {
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let mut windows = Vec::new();
        let mut used = Duration::ZERO;
        let mut round: Vec<String> = Vec::new();
        loop {
            if round.is_empty() {
                round = spec.kinds.clone();
                round.shuffle(&mut rng);
                round.reverse();
            }
            let Some(kind) = round.pop() else { break };
            let gap = draw(&mut rng, spec.gap);
            let hold = draw(&mut rng, spec.hold);
            if used + gap + hold > spec.duration {
                break;
            }
            used += gap + hold;
            let node = rng.random_range(0..spec.nodes);
            let fault = match kind.as_str() {
                "partition" => {
                    // A minority (fewer than half) is cut from the majority.
                    let size = rng.random_range(1..=(spec.nodes.saturating_sub(1) / 2).max(1));
                    let mut all: Vec<usize> = (0..spec.nodes).collect();
                    all.shuffle(&mut rng);
                    let mut side: Vec<usize> = all.into_iter().take(size).collect();
                    side.sort();
                    Fault::Partition { side }
                }
                "one_way" => Fault::OneWay { node },
                "loss" => Fault::Loss {
                    percent: rng.random_range(10..=40),
                },
                "pause" => Fault::Pause { node },
                "crash" => Fault::Crash { node },
                _ => {
                    let secs = rng.random_range(60..=3600);
                    Fault::Skew {
                        node,
                        secs: if rng.random_bool(0.5) { secs } else { -secs },
                    }
                }
            };
            windows.push(Window { gap, fault, hold });
        }
        Schedule { windows }
    }
}

fn draw(rng: &mut StdRng, (lo, hi): (Duration, Duration)) -> Duration {
    if hi <= lo {
        return lo;
    }
    Duration::from_millis(rng.random_range(lo.as_millis() as u64..=hi.as_millis() as u64))
}

/// Errors applying or healing a fault.
#[derive(Debug, thiserror::Error)]
pub enum NemesisError {
    /// An nft command failed.
    #[error(transparent)]
    Nft(#[from] NftError),
    /// A process operation failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Applies faults to a cluster through its own nftables table.
#[derive(Debug)]
pub struct Nemesis {
    firewall: Firewall,
}

impl Nemesis {
    /// A nemesis with table `quiver_faults_<subnet>` (one per subnet, so runs on distinct
    /// subnets never touch each other's rules).
    pub fn new(subnet: u8) -> Result<Nemesis, NemesisError> {
        Ok(Nemesis {
            firewall: Firewall::new(&format!("quiver_faults_{subnet}"))?,
        })
    }

    /// Starts `fault`.
    pub fn apply(&self, cluster: &mut Cluster, fault: &Fault) -> Result<(), NemesisError> {
        match fault {
            Fault::Partition { side } => {
                let (a, b): (Vec<_>, Vec<_>) = (0..cluster.len()).partition(|i| side.contains(i));
                let a: Vec<_> = a.iter().map(|&i| cluster.ip(i)).collect();
                let b: Vec<_> = b.iter().map(|&i| cluster.ip(i)).collect();
                self.firewall.partition(&a, &b)?;
            }
            Fault::OneWay { node } => {
                for j in (0..cluster.len()).filter(|j| j != node) {
                    self.firewall
                        .drop_one_way(cluster.ip(j), cluster.ip(*node))?;
                }
            }
            Fault::Loss { percent } => self.firewall.loss(cluster.ips(), *percent)?,
            Fault::Pause { node } => cluster.pause(*node)?,
            Fault::Crash { node } => cluster.kill9(*node),
            Fault::Skew { node, secs } => cluster.restart(*node, Some(*secs))?,
        }
        Ok(())
    }

    /// Ends every fault: flushes the rules, resumes paused nodes, restarts killed ones and
    /// restarts skewed ones with the real clock.
    pub fn heal(&self, cluster: &mut Cluster) -> Result<(), NemesisError> {
        self.firewall.heal()?;
        for i in 0..cluster.len() {
            if cluster.is_paused(i) {
                cluster.resume(i)?;
            }
            if !cluster.is_running(i) || cluster.skew(i).is_some() {
                cluster.restart(i, None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seed: u64) -> ScheduleSpec {
        ScheduleSpec {
            seed,
            nodes: 5,
            duration: Duration::from_secs(600),
            hold: (Duration::from_secs(10), Duration::from_secs(30)),
            gap: (Duration::from_secs(5), Duration::from_secs(15)),
            kinds: KINDS.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn a_seed_gives_one_schedule_and_every_round_holds_every_kind() {
        let a = Schedule::generate(&spec(7));
        let b = Schedule::generate(&spec(7));
        let faults = |s: &Schedule| {
            s.windows
                .iter()
                .map(|w| w.fault.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(faults(&a), faults(&b));
        assert_ne!(faults(&a), faults(&Schedule::generate(&spec(8))));
        let total: Duration = a.windows.iter().map(|w| w.gap + w.hold).sum();
        assert!(total <= Duration::from_secs(600));
        for round in a
            .windows
            .chunks(KINDS.len())
            .filter(|r| r.len() == KINDS.len())
        {
            let mut kinds: Vec<&str> = round.iter().map(|w| w.fault.kind()).collect();
            kinds.sort();
            let mut all = KINDS.to_vec();
            all.sort();
            assert_eq!(kinds, all);
        }
    }

    #[test]
    fn partitions_cut_a_minority() {
        for seed in 0..50 {
            for w in Schedule::generate(&spec(seed)).windows {
                if let Fault::Partition { side } = w.fault {
                    assert!(!side.is_empty() && side.len() * 2 < 5, "{side:?}");
                }
            }
        }
    }
}
