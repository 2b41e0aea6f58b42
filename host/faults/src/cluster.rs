//! Real `quiver server` processes on `127.0.<subnet>.1..=n:7470` sharing one CA and admin
//! key, each owned by a guard that kills it (by PID) when dropped, also on panic.

use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use quiver_sdk::{ClientConfig, KeyToken};

/// How long a node may take to print its readiness line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors starting or signalling nodes.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A command or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A node did not come up.
    #[error("node {node} did not start: {message}")]
    Start {
        /// Node name.
        node: String,
        /// What happened (its first output line or exit status).
        message: String,
    },
    /// A setup command (`quiver ca init`, `quiver key init`) failed.
    #[error("{0}")]
    Setup(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// Where libfaketime's preload library lies, if installed (`scripts/faults-deps.sh`).
pub fn find_libfaketime() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("/usr/lib/faketime/libfaketime.so.1")];
    if let Ok(dirs) = std::fs::read_dir("/usr/lib") {
        for d in dirs.flatten() {
            candidates.push(d.path().join("faketime").join("libfaketime.so.1"));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// One running node process. Dropping it sends SIGKILL to its PID and reaps it (SIGKILL
/// also ends a SIGSTOPped process).
#[derive(Debug)]
struct NodeProcess {
    child: Child,
}

impl NodeProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The `quiver` binary.
    pub quiver: PathBuf,
    /// Third byte of the nodes' addresses: node i listens on `127.0.<subnet>.<i+1>:7470`.
    pub subnet: u8,
    /// Number of nodes.
    pub nodes: usize,
    /// Extra `quiver server` flags for every node.
    pub server_args: Vec<String>,
}

/// A running cluster. Dropping it kills every node and deletes the data directories.
#[derive(Debug)]
pub struct Cluster {
    spec: ClusterSpec,
    dir: tempfile::TempDir,
    procs: Vec<Option<NodeProcess>>,
    /// Node i's clock offset in seconds, when it runs under libfaketime.
    skew: Vec<Option<i64>>,
    paused: Vec<bool>,
    ips: Vec<Ipv4Addr>,
    addrs: Vec<String>,
}

impl Cluster {
    /// Creates the CA and admin key with the `quiver` binary and starts every node, each
    /// awaited by its readiness line (no sleeping).
    pub fn start(spec: ClusterSpec) -> Result<Cluster, ClusterError> {
        kill_stale(spec.subnet);
        let dir = tempfile::Builder::new()
            .prefix("quiver-faults-")
            .tempdir()
            .map_err(io("create the cluster directory"))?;
        let ca = dir.path().join("ca");
        setup(&spec.quiver, &["ca", "init", "--dir"], &ca)?;
        setup(
            &spec.quiver,
            &["key", "init", "--file"],
            &ca.join("admin.key"),
        )?;
        let ips: Vec<Ipv4Addr> = (1..=spec.nodes)
            .map(|i| Ipv4Addr::new(127, 0, spec.subnet, i as u8))
            .collect();
        let addrs = ips.iter().map(|ip| format!("{ip}:7470")).collect();
        let mut c = Cluster {
            procs: (0..spec.nodes).map(|_| None).collect(),
            skew: vec![None; spec.nodes],
            paused: vec![false; spec.nodes],
            spec,
            dir,
            ips,
            addrs,
        };
        for i in 0..c.spec.nodes {
            c.spawn(i)?;
        }
        Ok(c)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.spec.nodes
    }

    /// Always false: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.spec.nodes == 0
    }

    /// Node i's IP address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.ips[i]
    }

    /// Every node's IP address.
    pub fn ips(&self) -> &[Ipv4Addr] {
        &self.ips
    }

    /// Every node's client address (`ip:port`).
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Node i's name (`n1`, `n2`, ...).
    pub fn name(&self, i: usize) -> String {
        format!("n{}", i + 1)
    }

    /// The cluster directory (CA, node data and `nI.log` with each node's stderr).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Keeps the cluster directory (node logs, data) after the cluster is dropped, for a
    /// run whose checker found something to look at.
    pub fn keep_dir(&mut self) {
        self.dir.disable_cleanup(true);
    }

    /// Client settings: the cluster CA and admin key.
    pub fn client_config(&self) -> Result<ClientConfig, ClusterError> {
        let ca_dir = self.dir.path().join("ca");
        let ca = std::fs::read(ca_dir.join("ca.pem")).map_err(io("read ca.pem"))?;
        let text =
            std::fs::read_to_string(ca_dir.join("admin.key")).map_err(io("read admin.key"))?;
        let key = KeyToken::parse(&text)
            .map_err(|e| ClusterError::Setup(format!("admin key file: {e}")))?;
        Ok(ClientConfig::new(ca).with_key(key))
    }

    /// True while node i runs (not killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.procs[i].is_some()
    }

    /// SIGKILL node i: no shutdown code runs.
    pub fn kill9(&mut self, i: usize) {
        // Dropping the guard kills and reaps.
        self.procs[i] = None;
        self.paused[i] = false;
    }

    /// SIGSTOP node i: its sockets stay open and it answers nothing.
    pub fn pause(&mut self, i: usize) -> Result<(), ClusterError> {
        self.signal(i, "STOP")?;
        self.paused[i] = true;
        Ok(())
    }

    /// SIGCONT node i after [`Cluster::pause`].
    pub fn resume(&mut self, i: usize) -> Result<(), ClusterError> {
        self.signal(i, "CONT")?;
        self.paused[i] = false;
        Ok(())
    }

    /// True while node i is SIGSTOPped.
    pub fn is_paused(&self, i: usize) -> bool {
        self.paused[i]
    }

    /// Node i's clock offset in seconds, if it runs skewed.
    pub fn skew(&self, i: usize) -> Option<i64> {
        self.skew[i]
    }

    fn signal(&self, i: usize, signal: &str) -> Result<(), ClusterError> {
        let Some(p) = &self.procs[i] else {
            return Err(ClusterError::Setup(format!(
                "{} is not running",
                self.name(i)
            )));
        };
        let status = Command::new("kill")
            .args([format!("-{signal}"), p.pid().to_string()])
            .status()
            .map_err(io("run kill"))?;
        if !status.success() {
            return Err(ClusterError::Setup(format!(
                "kill -{signal} {} failed",
                p.pid()
            )));
        }
        Ok(())
    }

    /// (Re)starts node i on its data directory with clock offset `skew_secs` (libfaketime,
    /// monotonic clock untouched so tokio's timers keep working), or with the real clock.
    /// A running node is killed first.
    pub fn restart(&mut self, i: usize, skew_secs: Option<i64>) -> Result<(), ClusterError> {
        self.kill9(i);
        self.skew[i] = skew_secs;
        self.spawn(i)
    }

    fn spawn(&mut self, i: usize) -> Result<(), ClusterError> {
        let name = self.name(i);
        let ca = self.dir.path().join("ca");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .map_err(io("open the node log"))?;
        let mut cmd = Command::new(&self.spec.quiver);
        cmd.arg("server")
            .arg("--data-dir")
            .arg(self.dir.path().join(&name))
            .args(["--listen", &self.addrs[i], "--node-id", &name])
            .arg("--ca-dir")
            .arg(&ca)
            .arg("--admin-key-file")
            .arg(ca.join("admin.key"));
        for (j, a) in self.addrs.iter().enumerate() {
            cmd.arg("--peer").arg(format!("n{}={a}", j + 1));
        }
        cmd.args(&self.spec.server_args)
            .env(
                "QUIVER_LOG",
                std::env::var("QUIVER_FAULTS_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(secs) = self.skew[i] {
            let lib = find_libfaketime().ok_or_else(|| {
                ClusterError::Setup("libfaketime.so.1 not found: run scripts/faults-deps.sh".into())
            })?;
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME", format!("{secs:+}s"))
                // Without it tokio's timers, driven by the monotonic clock, break.
                .env("DONT_FAKE_MONOTONIC", "1");
        }
        let mut child = cmd.spawn().map_err(io(format!("spawn {name}")))?;
        let Some(stdout) = child.stdout.take() else {
            return Err(ClusterError::Setup("no stdout pipe".into()));
        };
        // Guard first, so an error below still kills the process.
        let guard = NodeProcess { child };
        // The readiness line is read on a thread so a hung start fails after a deadline;
        // the thread then keeps draining stdout so the node never blocks on a full pipe.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut reader.take(u64::MAX), &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|_| ClusterError::Start {
                node: name.clone(),
                message: format!("no readiness line within {START_TIMEOUT:?}"),
            })?;
        if !line.contains(" on ") {
            return Err(ClusterError::Start {
                node: name,
                message: format!(
                    "stdout {line:?}; see {}",
                    self.dir.path().join(format!("n{}.log", i + 1)).display()
                ),
            });
        }
        self.procs[i] = Some(guard);
        self.record_pids();
        self.paused[i] = false;
        Ok(())
    }
}

impl Cluster {
    /// Writes the PIDs of the running nodes to [`pid_file`], so a later run on this subnet
    /// can end them if this one is killed before its guards run (SIGKILL of the test).
    fn record_pids(&self) {
        let pids: Vec<String> = self
            .procs
            .iter()
            .flatten()
            .map(|p| p.pid().to_string())
            .collect();
        let _ = std::fs::write(pid_file(self.spec.subnet), pids.join("\n"));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The node guards kill the processes; the PID file has nothing left to say.
        let _ = std::fs::remove_file(pid_file(self.spec.subnet));
    }
}

/// Where the node PIDs of a run on `subnet` are recorded.
fn pid_file(subnet: u8) -> PathBuf {
    std::env::temp_dir().join(format!("quiver-faults-{subnet}.pids"))
}

/// Kills the nodes a killed earlier run on `subnet` left behind: only PIDs from its PID
/// file whose command line is still a `quiver server` listening on this subnet (a PID
/// reused by another process is left alone).
fn kill_stale(subnet: u8) {
    let Ok(text) = std::fs::read_to_string(pid_file(subnet)) else {
        return;
    };
    let listen = format!("127.0.{subnet}.");
    for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let ours =
            args.iter().any(|a| a == "server") && args.iter().any(|a| a.starts_with(&listen));
        if ours {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
    let _ = std::fs::remove_file(pid_file(subnet));
}

fn setup(quiver: &Path, args: &[&str], path: &Path) -> Result<(), ClusterError> {
    let out = Command::new(quiver)
        .args(args)
        .arg(path)
        .output()
        .map_err(io(format!("run {} {}", quiver.display(), args.join(" "))))?;
    if !out.status.success() {
        return Err(ClusterError::Setup(format!(
            "quiver {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
