//! Test support: real `quiver` processes on loopback.
//!
//! A [`NodeProc`] starts `quiver server` on `127.0.0.1:0`, waits for its readiness line
//! (printed after the endpoint is bound, so no sleeping is involved) and kills the process
//! when dropped, so a failing test never leaks a server.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quiver_sdk::{Client, ClientConfig, KeyToken};

/// Path of the `quiver` binary built for this test run.
pub fn quiver_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quiver"))
}

/// A running `quiver server` process.
pub struct NodeProc {
    child: Option<Child>,
    /// Address it listens on.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The admin key file it announced (its own `DATA_DIR/admin.key` or the cluster's).
    pub admin_key_file: PathBuf,
}

impl NodeProc {
    /// Starts a node on `data_dir` with extra flags; panics with the node's output if it
    /// does not come up.
    pub fn start(data_dir: &Path, extra: &[&str]) -> NodeProc {
        NodeProc::start_as(data_dir, "n1", "127.0.0.1:0", extra)
    }

    /// Starts a node with a given name and listen address.
    pub fn start_as(data_dir: &Path, id: &str, listen: &str, extra: &[&str]) -> NodeProc {
        let mut cmd = Command::new(quiver_bin());
        cmd.arg("server")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen, "--node-id", id])
            .args(extra)
            .env(
                "QUIVER_LOG",
                std::env::var("QUIVER_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn quiver server");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read readiness line");
        let addr = line
            .split_whitespace()
            .skip_while(|w| *w != "on")
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                let status = child.wait();
                panic!("node did not start: stdout {line:?}, status {status:?}")
            });
        let admin_key_file = line
            .split(", admin key ")
            .nth(1)
            .map(|rest| PathBuf::from(rest.trim_end().trim_end_matches(')')))
            .unwrap_or_else(|| data_dir.join("admin.key"));
        NodeProc {
            child: Some(child),
            addr,
            data_dir: data_dir.to_path_buf(),
            admin_key_file,
        }
    }

    /// The admin key this node accepts from its start.
    pub fn admin_key(&self) -> KeyToken {
        read_key(&self.admin_key_file)
    }

    /// Client settings: this node's CA and admin key.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new(self.ca_pem()).with_key(self.admin_key())
    }

    /// PEM of the cluster CA this node created.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.data_dir.join("ca.pem")).expect("ca.pem exists")
    }

    /// Connects an SDK client.
    pub async fn client(&self) -> Client {
        Client::connect(&self.addr.to_string(), self.client_config())
            .await
            .expect("connect to node")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL the node");
            c.wait().expect("reap the node");
        }
    }

    /// Sends `signal` (a `kill` name such as `STOP` or `CONT`) to the running node.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the node is running");
        let sent = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// The exit status if the process has exited by itself (it is reaped then).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("poll the node")?;
        self.child = None;
        Some(status)
    }

    /// SIGTERM and wait for a graceful exit; returns true if it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let pid = c.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        c.wait().expect("wait for the node").success()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A cluster of `quiver server` processes on `127.0.<subnet>.1..=n`, port 7470, sharing one
/// CA. Each test uses its own subnet so tests can run in parallel.
pub struct ClusterProc {
    /// Root directory (CA in `ca/`, node data in `nI/`).
    pub dir: tempfile::TempDir,
    /// Node processes; `None` while stopped.
    pub nodes: Vec<Option<NodeProc>>,
    /// Node addresses.
    pub addrs: Vec<String>,
    peers: Vec<String>,
    extra: Vec<String>,
}

impl ClusterProc {
    /// Starts `n` nodes named n1..=n with the extra server flags.
    pub fn start(subnet: u8, n: usize, extra: &[&str]) -> ClusterProc {
        let dir = tempfile::tempdir().expect("temp dir");
        quiver_node::certs::ensure_ca(&dir.path().join("ca")).expect("create CA");
        let token = quiver_node::cluster::keys::generate_token("admin").expect("admin key");
        quiver_node::cluster::keys::write_key_file(
            &dir.path().join("ca").join("admin.key"),
            &token,
        )
        .expect("write the admin key");
        let addrs: Vec<String> = (1..=n)
            .map(|i| format!("127.0.{subnet}.{i}:7470"))
            .collect();
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("n{}={a}", i + 1))
            .collect();
        let mut c = ClusterProc {
            dir,
            nodes: Vec::new(),
            addrs,
            peers,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..n {
            let node = c.spawn(i);
            c.nodes.push(Some(node));
        }
        c
    }

    fn spawn(&self, i: usize) -> NodeProc {
        let mut args: Vec<String> = vec![
            "--ca-dir".into(),
            self.ca_dir().display().to_string(),
            "--admin-key-file".into(),
            self.admin_key_file().display().to_string(),
        ];
        for p in &self.peers {
            args.push("--peer".into());
            args.push(p.clone());
        }
        // Anti-entropy is off unless a test asks for it, so tests of read repair and hinted
        // handoff see only the mechanism they test.
        if !self.extra.iter().any(|a| a == "--ae-interval-ms") {
            args.extend(["--ae-interval-ms".into(), "0".into()]);
        }
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NodeProc::start_as(
            &self.dir.path().join(format!("n{}", i + 1)),
            &format!("n{}", i + 1),
            &self.addrs[i],
            &args,
        )
    }

    /// The CA directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// The cluster's bootstrap admin key file (beside the CA), which every node accepts.
    pub fn admin_key_file(&self) -> PathBuf {
        self.ca_dir().join("admin.key")
    }

    /// The cluster's admin key.
    pub fn admin_key(&self) -> KeyToken {
        read_key(&self.admin_key_file())
    }

    /// Client settings: the cluster CA and its admin key.
    pub fn client_config(&self) -> ClientConfig {
        let ca = std::fs::read(self.ca_dir().join("ca.pem")).expect("read CA");
        ClientConfig::new(ca).with_key(self.admin_key())
    }

    /// SIGKILL node `i` (0-based).
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut n) = self.nodes[i].take() {
            n.kill9();
        }
    }

    /// SIGSTOP node `i`: its sockets stay open, it answers nothing (a long GC pause or a
    /// frozen VM). Dropping the cluster still kills it (SIGKILL ends a stopped process).
    pub fn pause(&self, i: usize) {
        self.nodes[i]
            .as_ref()
            .expect("node is running")
            .signal("STOP");
    }

    /// SIGCONT node `i` after [`ClusterProc::pause`].
    pub fn resume(&self, i: usize) {
        self.nodes[i]
            .as_ref()
            .expect("node is running")
            .signal("CONT");
    }

    /// SIGTERM node `i` and wait for its graceful exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut n) = self.nodes[i].take() {
            assert!(n.terminate(), "node {i} did not exit cleanly");
        }
    }

    /// Deletes the data directory of stopped node `i` (storage, identity, certificate).
    pub fn wipe(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is running");
        let dir = self.dir.path().join(format!("n{}", i + 1));
        std::fs::remove_dir_all(&dir).expect("wipe the data directory");
    }

    /// Restarts node `i` on its data directory.
    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is running");
        self.nodes[i] = Some(self.spawn(i));
    }

    /// A client connected to node `i`.
    pub async fn client(&self, i: usize) -> Client {
        Client::connect(&self.addrs[i], self.client_config())
            .await
            .expect("connect")
    }
}

/// Reads an access key file.
pub fn read_key(path: &Path) -> KeyToken {
    quiver_node::cluster::keys::read_key_file(path).expect("read the admin key file")
}

/// The admin key text of the cluster whose CA certificate is `ca_pem_path` (the key file
/// lies beside it), for `QUIVER_KEY`.
pub fn admin_key_beside(ca_pem_path: &Path) -> String {
    read_key(&ca_pem_path.with_file_name("admin.key")).reveal()
}

/// Polls `check` until it returns true, failing after 60 s.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, Duration::from_secs(60), check).await
}

/// Polls `check` every 50 ms until it returns true, failing after `limit`.
pub async fn eventually_within<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
