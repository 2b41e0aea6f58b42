//! The fault-injection suite, bounded for CI (issue 12, point 5): three real `quiver server`
//! processes on 127.0.51.1-3 under a set-add workload while the nemesis partitions them (both
//! ways and one way), drops packets, pauses, kills and restarts them and skews a clock.
//!
//! The schedule is drawn from a fixed seed and holds every fault kind once; the run waits
//! on conditions (readiness lines, reads), never on sleeps that are "usually long enough",
//! except the fault windows themselves. Needs root, nft and libfaketime
//! (`scripts/faults-deps.sh`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use quiver_faults::nemesis::KINDS;
use quiver_faults::run::{RunSpec, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_add_is_lost_under_every_fault_kind() {
    let begun = Instant::now();
    let spec = RunSpec {
        quiver: PathBuf::from(env!("CARGO_BIN_EXE_quiver")),
        subnet: 51,
        nodes: 3,
        n: 3,
        // Six windows of at most 4 + 9 s fit in 80 s, and the first six windows of a schedule
        // are one of each kind (a seeded shuffle per round).
        duration: Duration::from_secs(80),
        seed: 20261207,
        keys: 4,
        workers: 4,
        hold: (Duration::from_secs(7), Duration::from_secs(9)),
        gap: (Duration::from_secs(3), Duration::from_secs(4)),
        kinds: KINDS.iter().map(|k| k.to_string()).collect(),
        server_args: vec!["--peer-timeout-ms".into(), "1000".into()],
        request_timeout: Duration::from_secs(3),
        think: Duration::from_millis(5),
        convergence_timeout: Duration::from_secs(60),
        verbose: true,
    };
    let report = run(&spec).await.expect("the run completes");
    println!("{}", report.text());
    let kinds: Vec<&str> = report.windows.iter().map(|w| w.kind.as_str()).collect();
    for k in KINDS {
        assert!(kinds.contains(&k), "fault kind {k} never ran: {kinds:?}");
    }
    let v = &report.verdict;
    assert!(v.lost.is_empty(), "lost acknowledged adds: {:?}", v.lost);
    assert!(
        v.unexpected.is_empty(),
        "unexpected elements: {:?}",
        v.unexpected
    );
    assert!(v.acked >= 100, "too few acknowledged adds: {}", v.acked);
    assert!(
        report.convergence_all_nodes_ms.is_some(),
        "some node did not return every acknowledged add within 60 s of the heal"
    );
    assert!(
        report.convergence_replicas_ms.is_some(),
        "some replica did not hold every acknowledged add within 60 s of the heal"
    );
    println!("whole test: {:.1} s", begun.elapsed().as_secs_f64());
}
