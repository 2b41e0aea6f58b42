//! nftables rules on the INPUT hook: partitions and packet loss between loopback addresses.
//!
//! Rules drop on INPUT, not OUTPUT: a drop on OUTPUT makes `sendto` fail with EPERM, which
//! a node sees as an error at once, not as the silent loss of a real partition.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use std::io::Write as _;

/// Errors of the `nft` command.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be run (not installed: see `scripts/faults-deps.sh`).
    #[error("cannot run nft: {0} (install it with scripts/faults-deps.sh)")]
    Spawn(std::io::Error),
    /// `nft` refused the commands.
    #[error("nft failed on {script:?}: {stderr}")]
    Failed {
        /// The commands given.
        script: String,
        /// What nft printed.
        stderr: String,
    },
}

/// One nftables table of our own with an INPUT filter chain. The table is deleted when the
/// guard drops (also on panic), and a stale table of the same name left by a killed run is
/// deleted before the new one is created, so a name per test (subnet) never leaks rules.
#[derive(Debug)]
pub struct Firewall {
    table: String,
}

impl Firewall {
    /// Creates table `inet NAME` with an empty INPUT chain (policy accept), after deleting
    /// a stale table of that name.
    pub fn new(name: &str) -> Result<Firewall, NftError> {
        // Deleting a table that does not exist fails; that is the usual case.
        let _ = run(&format!("delete table inet {name}\n"));
        run(&format!(
            "add table inet {name}\n\
             add chain inet {name} input {{ type filter hook input priority 0; policy accept; }}\n"
        ))?;
        Ok(Firewall {
            table: name.to_string(),
        })
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Drops every packet from `from` to `to` (one way: `to` hears nothing from `from`).
    pub fn drop_one_way(&self, from: Ipv4Addr, to: Ipv4Addr) -> Result<(), NftError> {
        run(&format!(
            "add rule inet {} input ip saddr {from} ip daddr {to} drop\n",
            self.table
        ))
    }

    /// Drops every packet between `a` and `b`, both ways.
    pub fn drop_between(&self, a: Ipv4Addr, b: Ipv4Addr) -> Result<(), NftError> {
        self.drop_one_way(a, b)?;
        self.drop_one_way(b, a)
    }

    /// Cuts every address of `side` from every address of `rest`, both ways.
    pub fn partition(&self, side: &[Ipv4Addr], rest: &[Ipv4Addr]) -> Result<(), NftError> {
        for a in side {
            for b in rest {
                self.drop_between(*a, *b)?;
            }
        }
        Ok(())
    }

    /// Drops `percent` % of the packets (drawn per packet by the kernel) between any two
    /// addresses of `addrs`.
    pub fn loss(&self, addrs: &[Ipv4Addr], percent: u8) -> Result<(), NftError> {
        let set = addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        run(&format!(
            "add rule inet {} input ip saddr {{ {set} }} ip daddr {{ {set} }} numgen random mod 100 < {percent} drop\n",
            self.table
        ))
    }

    /// Removes every rule (the table and chain stay).
    pub fn heal(&self) -> Result<(), NftError> {
        run(&format!("flush chain inet {} input\n", self.table))
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = run(&format!("delete table inet {}\n", self.table));
    }
}

/// Runs an nft script given on stdin (`nft -f -`), atomically.
fn run(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Failed {
            script: script.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
