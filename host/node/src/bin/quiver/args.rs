//! Options every client command shares: where the cluster is, how to trust it, which key
//! to present, and how to print results.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use quiver_sdk::{ClientConfig, ClusterClient};

/// Output format of client commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Readable text.
    #[default]
    Human,
    /// One JSON object on stdout, for scripts.
    Json,
}

/// How client commands find, trust and authenticate to the cluster.
#[derive(Clone, Args)]
pub struct ClientArgs {
    /// Node address(es), comma-separated: the ring is learned from the first that answers,
    /// then each request goes straight to a replica of its key.
    #[arg(
        long,
        env = "QUIVER_CLUSTER",
        value_name = "ADDR",
        default_value = "127.0.0.1:7470"
    )]
    pub cluster: String,
    /// The cluster CA certificate (DATA_DIR/ca.pem of a node).
    #[arg(
        long,
        env = "QUIVER_CA",
        value_name = "FILE",
        default_value = "quiver-data/ca.pem"
    )]
    pub ca: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    /// Client-side deadline per request, in ms.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Access key, as printed by `quiver key create` (or the contents of a node's
    /// DATA_DIR/admin.key). Prefer the environment variable: a flag shows in `ps`.
    #[arg(
        long = "key",
        id = "access_key",
        env = "QUIVER_KEY",
        hide_env_values = true,
        value_name = "NAME.SECRET"
    )]
    pub access_key: Option<String>,
}

impl std::fmt::Debug for ClientArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientArgs")
            .field("cluster", &self.cluster)
            .field("ca", &self.ca)
            .field("output", &self.output)
            .field("timeout_ms", &self.timeout_ms)
            .field("access_key", &self.access_key.as_ref().map(|_| "<secret>"))
            .finish()
    }
}

impl ClientArgs {
    /// Connects to the first node of `--cluster` that answers.
    pub async fn connect(&self) -> anyhow::Result<ClusterClient> {
        let config = self.client_config()?;
        Ok(ClusterClient::connect(&self.seeds()?, config).await?)
    }

    /// The client configuration: the cluster CA and the request deadline.
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let ca_pem = std::fs::read(&self.ca).with_context(|| {
            format!(
                "cannot read the cluster CA {} (set --ca or QUIVER_CA to a node's ca.pem)",
                self.ca.display()
            )
        })?;
        let mut config = ClientConfig::new(ca_pem);
        config.request_timeout = Duration::from_millis(self.timeout_ms.max(1));
        if let Some(text) = &self.access_key {
            // The error never echoes the text: it may be a real secret with a typo.
            let key = quiver_sdk::KeyToken::parse(text)
                .map_err(|e| anyhow::anyhow!("--key / QUIVER_KEY: {e}"))?;
            config.key = Some(key);
        }
        Ok(config)
    }

    /// The addresses of `--cluster`, in order.
    pub fn seeds(&self) -> anyhow::Result<Vec<&str>> {
        let seeds: Vec<&str> = self
            .cluster
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        if seeds.is_empty() {
            bail!("--cluster is empty: give at least one node address");
        }
        Ok(seeds)
    }
}
