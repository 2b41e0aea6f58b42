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

use quiver_sdk::{Client, ClientConfig};

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
}

impl NodeProc {
    /// Starts a node on `data_dir` with extra flags; panics with the node's output if it
    /// does not come up.
    pub fn start(data_dir: &Path, extra: &[&str]) -> NodeProc {
        let mut cmd = Command::new(quiver_bin());
        cmd.arg("server")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--node-id", "n1"])
            .args(extra)
            .env("QUIVER_LOG", "warn")
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
        NodeProc {
            child: Some(child),
            addr,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// PEM of the cluster CA this node created.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.data_dir.join("ca.pem")).expect("ca.pem exists")
    }

    /// Connects an SDK client.
    pub async fn client(&self) -> Client {
        Client::connect(&self.addr.to_string(), ClientConfig::new(self.ca_pem()))
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
