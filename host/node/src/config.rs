//! Node configuration: a TOML file whose every option is also a command-line flag.
//!
//! Precedence: flag > config file > default. The merged result is a [`NodeConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use quiver_storage::{Durability, EngineKind};

/// Default address a node listens on.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7470";
/// Default data directory, relative to the working directory.
pub const DATA_DIR_DEFAULT: &str = "quiver-data";
/// Default server-side deadline of a request, in milliseconds.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u32 = 10_000;
/// Default number of ring partitions.
pub const PARTITIONS_DEFAULT: u32 = quiver_core::ring::DEFAULT_PARTITIONS;
/// Default deadline of one node-to-node request, in milliseconds.
pub const PEER_TIMEOUT_MS_DEFAULT: u32 = 2_000;
/// Default time between anti-entropy exchanges, in ms.
pub const AE_INTERVAL_MS_DEFAULT: u64 = 5_000;
/// Default time between gossip rounds, in ms.
pub const GOSSIP_INTERVAL_MS_DEFAULT: u64 = 1_000;
/// Default time between handoff passes, in ms.
pub const HANDOFF_INTERVAL_MS_DEFAULT: u64 = 1_000;
/// Default number of keys one anti-entropy exchange repairs at most.
pub const AE_MAX_KEYS_DEFAULT: usize = 10_000;
/// Default time every replica must hold a tombstone before it may be reaped, in ms: far
/// beyond a request deadline, so no store or repair computed before the delete is still in
/// flight.
pub const TOMBSTONE_GRACE_MS_DEFAULT: u64 = 60_000;
/// Default share of gets that ask every replica (Cassandra's old `read_repair_chance`).
pub const READ_REPAIR_CHANCE_DEFAULT: f64 = 0.1;
/// Default speculation delay of a get, in ms: well above a loaded get's p99.9 on a small
/// machine, far below the peer timeout.
pub const READ_SPECULATE_MS_DEFAULT: u64 = 20;
/// Largest group-commit window accepted, in microseconds (longer only adds latency).
pub const GROUP_COMMIT_WINDOW_US_MAX: u64 = 100_000;
/// Largest server-side deadline a client may ask for, in milliseconds.
pub const REQUEST_TIMEOUT_MS_MAX: u32 = 300_000;

/// Errors of configuration loading.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Parser message (names the offending key).
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting {name}: {message}")]
    Invalid {
        /// Setting name.
        name: &'static str,
        /// Why.
        message: String,
    },
}

/// Options as they appear in a TOML file; every field optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Listen address.
    pub listen: Option<SocketAddr>,
    /// Node name.
    pub node_id: Option<String>,
    /// Default durability of writes.
    pub durability: Option<Durability>,
    /// Storage engine.
    pub engine: Option<EngineKind>,
    /// Largest value accepted, in bytes.
    pub value_bytes_max: Option<usize>,
    /// Concurrent streams per client connection.
    pub streams_per_connection_max: Option<u32>,
    /// Default request deadline, in milliseconds.
    pub request_timeout_ms: Option<u32>,
    /// Group-commit window, in microseconds.
    pub group_commit_window_us: Option<u64>,
    /// Cluster members other than this node, as `ID=ADDR` (this node's own entry, if
    /// listed, is ignored so that every node can be given the same list).
    pub peers: Option<Vec<String>>,
    /// Replicas per key.
    pub n: Option<usize>,
    /// Default read quorum.
    pub r: Option<usize>,
    /// Default write quorum.
    pub w: Option<usize>,
    /// Replace unreachable primaries with fallbacks holding hints.
    pub sloppy_quorum: Option<bool>,
    /// Ring partitions (power of two, the same on every node).
    pub partitions: Option<u32>,
    /// Deadline of one node-to-node request, in milliseconds.
    pub peer_timeout_ms: Option<u32>,
    /// Largest number of hints this node keeps for unreachable nodes.
    pub hints_max: Option<u64>,
    /// Repair stale replicas found by reads.
    pub read_repair: Option<bool>,
    /// Share of gets (0 to 1) that ask every replica; the others ask R.
    pub read_repair_chance: Option<f64>,
    /// A get short of R replies after this many ms asks one more replica; 0 turns it off.
    pub read_speculate_ms: Option<u64>,
    /// Time between anti-entropy exchanges in ms; 0 turns anti-entropy off.
    pub ae_interval_ms: Option<u64>,
    /// Keys one anti-entropy exchange repairs at most.
    pub ae_max_keys: Option<usize>,
    /// How long every replica must have held a tombstone before it may be reaped, in ms.
    pub tombstone_grace_ms: Option<u64>,
    /// Time between gossip rounds in ms.
    pub gossip_interval_ms: Option<u64>,
    /// Time between handoff passes in ms.
    pub handoff_interval_ms: Option<u64>,
    /// This node's weight (relative capacity) when it joins a cluster.
    pub weight: Option<u32>,
    /// This node's zone (failure domain) when it joins a cluster.
    pub zone: Option<String>,
    /// Directory holding the cluster CA (`ca.pem`, `ca.key`) that signs this node's
    /// certificate on first start; without it a new CA is created.
    pub ca_dir: Option<PathBuf>,
    /// Client and peer connections this node holds at once; more are refused at the handshake.
    pub connections_max: Option<u32>,
    /// Connections from one IP address at once; more are refused at the handshake.
    pub connections_per_address_max: Option<u32>,
    /// Most fuel a bucket may give its plugin per call (`bucket set --plugin-fuel`); larger settings are refused, and capped where another node set them.
    pub plugin_fuel_max: Option<u64>,
    /// Most linear memory a bucket may give its plugin per call, in bytes.
    pub plugin_memory_bytes_max: Option<u64>,
    /// Largest value a bucket may let its plugin return, in bytes.
    pub plugin_output_bytes_max: Option<u64>,
    /// Plugin uploads this node takes at once (each holds up to 64 MiB in memory while it is checked); more are refused until one ends.
    pub plugin_uploads_max: Option<u32>,
    /// Plugin calls (merges, updates) this node runs at once, each on its own thread.
    pub plugin_workers: Option<u32>,
    /// Largest get reply (siblings with their values), in bytes.
    pub response_bytes_max: Option<u64>,
    /// A cluster-wide bootstrap admin key (`quiver key init`) this node accepts from its
    /// first start; without it a new node writes its own to `DATA_DIR/admin.key`.
    pub admin_key_file: Option<PathBuf>,
    /// Per-bucket replication properties (`[buckets.NAME]` tables); the same on every node.
    pub buckets: Option<std::collections::BTreeMap<String, BucketFileConfig>>,
}

/// A bucket's replication properties as written in the config file; unset fields take the
/// node defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketFileConfig {
    /// Replicas per key.
    pub n: Option<usize>,
    /// Read quorum.
    pub r: Option<usize>,
    /// Write quorum.
    pub w: Option<usize>,
    /// False: primaries only (no fallbacks, no hints).
    pub sloppy_quorum: Option<bool>,
}

impl BucketFileConfig {
    /// Parses the command-line form `NAME:n=3,r=2,w=2,sloppy_quorum=false`.
    pub fn parse_flag(spec: &str) -> Result<(String, BucketFileConfig), ConfigError> {
        let bad = |why: String| ConfigError::Invalid {
            name: "bucket",
            message: format!("{spec:?}: {why}"),
        };
        let (name, props) = spec
            .split_once(':')
            .ok_or_else(|| bad("expected NAME:n=3,r=2,w=2,sloppy_quorum=false".into()))?;
        let mut out = BucketFileConfig::default();
        for kv in props.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("{kv:?} is not KEY=VALUE")))?;
            let num = || v.parse::<usize>().map_err(|e| bad(format!("{k}: {e}")));
            match k {
                "n" => out.n = Some(num()?),
                "r" => out.r = Some(num()?),
                "w" => out.w = Some(num()?),
                "sloppy_quorum" => {
                    out.sloppy_quorum =
                        Some(v.parse::<bool>().map_err(|e| bad(format!("{k}: {e}")))?)
                }
                other => return Err(bad(format!("unknown property {other:?}"))),
            }
        }
        Ok((name.to_string(), out))
    }
}

impl FileConfig {
    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Overlays `flags` on `self`: every option set in `flags` wins.
    pub fn overlay(self, flags: FileConfig) -> FileConfig {
        FileConfig {
            data_dir: flags.data_dir.or(self.data_dir),
            listen: flags.listen.or(self.listen),
            node_id: flags.node_id.or(self.node_id),
            durability: flags.durability.or(self.durability),
            engine: flags.engine.or(self.engine),
            value_bytes_max: flags.value_bytes_max.or(self.value_bytes_max),
            streams_per_connection_max: flags
                .streams_per_connection_max
                .or(self.streams_per_connection_max),
            request_timeout_ms: flags.request_timeout_ms.or(self.request_timeout_ms),
            group_commit_window_us: flags.group_commit_window_us.or(self.group_commit_window_us),
            peers: flags.peers.filter(|p| !p.is_empty()).or(self.peers),
            n: flags.n.or(self.n),
            r: flags.r.or(self.r),
            w: flags.w.or(self.w),
            sloppy_quorum: flags.sloppy_quorum.or(self.sloppy_quorum),
            partitions: flags.partitions.or(self.partitions),
            peer_timeout_ms: flags.peer_timeout_ms.or(self.peer_timeout_ms),
            hints_max: flags.hints_max.or(self.hints_max),
            read_repair: flags.read_repair.or(self.read_repair),
            read_repair_chance: flags.read_repair_chance.or(self.read_repair_chance),
            read_speculate_ms: flags.read_speculate_ms.or(self.read_speculate_ms),
            ae_interval_ms: flags.ae_interval_ms.or(self.ae_interval_ms),
            ae_max_keys: flags.ae_max_keys.or(self.ae_max_keys),
            tombstone_grace_ms: flags.tombstone_grace_ms.or(self.tombstone_grace_ms),
            gossip_interval_ms: flags.gossip_interval_ms.or(self.gossip_interval_ms),
            handoff_interval_ms: flags.handoff_interval_ms.or(self.handoff_interval_ms),
            weight: flags.weight.or(self.weight),
            zone: flags.zone.or(self.zone),
            ca_dir: flags.ca_dir.or(self.ca_dir),
            connections_max: flags.connections_max.or(self.connections_max),
            connections_per_address_max: flags
                .connections_per_address_max
                .or(self.connections_per_address_max),
            plugin_fuel_max: flags.plugin_fuel_max.or(self.plugin_fuel_max),
            plugin_memory_bytes_max: flags
                .plugin_memory_bytes_max
                .or(self.plugin_memory_bytes_max),
            plugin_output_bytes_max: flags
                .plugin_output_bytes_max
                .or(self.plugin_output_bytes_max),
            plugin_uploads_max: flags.plugin_uploads_max.or(self.plugin_uploads_max),
            plugin_workers: flags.plugin_workers.or(self.plugin_workers),
            response_bytes_max: flags.response_bytes_max.or(self.response_bytes_max),
            admin_key_file: flags.admin_key_file.or(self.admin_key_file),
            buckets: match (self.buckets, flags.buckets) {
                (Some(mut file), Some(flags)) => {
                    file.extend(flags);
                    Some(file)
                }
                (file, flags) => flags.or(file),
            },
        }
    }

    /// Fills in defaults and validates.
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let listen = match self.listen {
            Some(l) => l,
            None => LISTEN_DEFAULT.parse().map_err(|e| ConfigError::Invalid {
                name: "listen",
                message: format!("{e}"),
            })?,
        };
        let node_id = self
            .node_id
            .unwrap_or_else(|| format!("node-{}", listen.port()));
        if node_id.is_empty()
            || node_id.len() > 64
            || !node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::Invalid {
                name: "node_id",
                message: format!(
                    "{node_id:?}: use 1 to 64 characters of letters, digits, '-', '_' or '.'"
                ),
            });
        }
        let value_bytes_max = self
            .value_bytes_max
            .unwrap_or(quiver_core::limits::VALUE_BYTES_MAX_DEFAULT);
        if value_bytes_max == 0 || value_bytes_max > 64 * 1024 * 1024 {
            return Err(ConfigError::Invalid {
                name: "value_bytes_max",
                message: format!("{value_bytes_max}: must be between 1 and 67108864 (64 MiB)"),
            });
        }
        let streams = self
            .streams_per_connection_max
            .unwrap_or(quiver_core::limits::STREAMS_PER_CONNECTION_MAX_DEFAULT);
        if streams == 0 || streams > 65_536 {
            return Err(ConfigError::Invalid {
                name: "streams_per_connection_max",
                message: format!("{streams}: must be between 1 and 65536"),
            });
        }
        // One core stays free of plugin work where there are several.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let one_value = value_bytes_max as u64 + 64 * 1024;
        let client_limits = ClientLimits {
            response_bytes_max: bounded(
                "response_bytes_max",
                self.response_bytes_max
                    .unwrap_or((64 * 1024 * 1024u64).max(4 * one_value)),
                one_value,
                1024 * 1024 * 1024,
            )?,
            plugin_workers: bounded(
                "plugin_workers",
                self.plugin_workers
                    .unwrap_or(cores.saturating_sub(1).max(1)),
                1,
                1024,
            )?,
            connections_max: bounded(
                "connections_max",
                self.connections_max.unwrap_or(4096),
                1,
                1_000_000,
            )?,
            connections_per_address_max: bounded(
                "connections_per_address_max",
                self.connections_per_address_max.unwrap_or(256),
                1,
                1_000_000,
            )?,
            plugin_fuel_max: bounded(
                "plugin_fuel_max",
                self.plugin_fuel_max.unwrap_or(1_000_000_000),
                1,
                u64::MAX,
            )?,
            plugin_memory_bytes_max: bounded(
                "plugin_memory_bytes_max",
                self.plugin_memory_bytes_max.unwrap_or(128 * 1024 * 1024),
                65536,
                4 * 1024 * 1024 * 1024,
            )?,
            plugin_output_bytes_max: bounded(
                "plugin_output_bytes_max",
                self.plugin_output_bytes_max
                    .unwrap_or(value_bytes_max as u64),
                1,
                64 * 1024 * 1024,
            )?,
            plugin_uploads_max: bounded(
                "plugin_uploads_max",
                self.plugin_uploads_max.unwrap_or(2),
                1,
                64,
            )?,
        };
        let timeout = self
            .request_timeout_ms
            .unwrap_or(REQUEST_TIMEOUT_MS_DEFAULT);
        if timeout == 0 || timeout > REQUEST_TIMEOUT_MS_MAX {
            return Err(ConfigError::Invalid {
                name: "request_timeout_ms",
                message: format!("{timeout}: must be between 1 and {REQUEST_TIMEOUT_MS_MAX}"),
            });
        }
        let window_us = self.group_commit_window_us.unwrap_or(
            quiver_storage::group_commit::GROUP_COMMIT_WINDOW_DEFAULT.as_micros() as u64,
        );
        if window_us > GROUP_COMMIT_WINDOW_US_MAX {
            return Err(ConfigError::Invalid {
                name: "group_commit_window_us",
                message: format!("{window_us}: must be at most {GROUP_COMMIT_WINDOW_US_MAX}"),
            });
        }
        let mut peers = std::collections::BTreeMap::new();
        let mut advertise = None;
        for spec in self.peers.unwrap_or_default() {
            let (id, addr) = spec.split_once('=').ok_or_else(|| ConfigError::Invalid {
                name: "peers",
                message: format!("{spec:?}: expected ID=ADDR, e.g. n2=127.0.0.1:7471"),
            })?;
            let addr: SocketAddr = addr.trim().parse().map_err(|e| ConfigError::Invalid {
                name: "peers",
                message: format!("{spec:?}: bad address: {e}"),
            })?;
            let id = id.trim().to_string();
            if id == node_id {
                // This node's own entry: the address the others (and clients) use for it.
                advertise = Some(addr);
                continue;
            }
            if peers.insert(id.clone(), addr).is_some() {
                return Err(ConfigError::Invalid {
                    name: "peers",
                    message: format!("{id:?} is listed twice"),
                });
            }
        }
        let members = peers.len() + 1;
        let n = self.n.unwrap_or(members.min(3));
        let majority = n / 2 + 1;
        let quorum = quiver_core::quorum::Quorum::new(
            n,
            self.r.unwrap_or(majority),
            self.w.unwrap_or(majority),
        )
        .map_err(|e| ConfigError::Invalid {
            name: "n/r/w",
            message: e.to_string(),
        })?;
        let sloppy = self.sloppy_quorum.unwrap_or(true);
        let mut buckets = std::collections::BTreeMap::new();
        for (name, b) in self.buckets.unwrap_or_default() {
            let bn = b.n.unwrap_or(quorum.n);
            let majority = bn / 2 + 1;
            let q = quiver_core::quorum::Quorum::new(
                bn,
                b.r.unwrap_or(if b.n.is_some() { majority } else { quorum.r }),
                b.w.unwrap_or(if b.n.is_some() { majority } else { quorum.w }),
            )
            .map_err(|e| ConfigError::Invalid {
                name: "buckets",
                message: format!("{name:?}: {e}"),
            })?;
            buckets.insert(
                name,
                BucketProps {
                    quorum: q,
                    sloppy: b.sloppy_quorum.unwrap_or(sloppy),
                },
            );
        }
        let partitions = self.partitions.unwrap_or(PARTITIONS_DEFAULT);
        let peer_timeout_ms = self.peer_timeout_ms.unwrap_or(PEER_TIMEOUT_MS_DEFAULT);
        if peer_timeout_ms == 0 || peer_timeout_ms > REQUEST_TIMEOUT_MS_MAX {
            return Err(ConfigError::Invalid {
                name: "peer_timeout_ms",
                message: format!(
                    "{peer_timeout_ms}: must be between 1 and {REQUEST_TIMEOUT_MS_MAX}"
                ),
            });
        }
        let chance = self
            .read_repair_chance
            .unwrap_or(READ_REPAIR_CHANCE_DEFAULT);
        if !(0.0..=1.0).contains(&chance) {
            return Err(ConfigError::Invalid {
                name: "read_repair_chance",
                message: format!("{chance}: must be a share between 0 and 1"),
            });
        }
        let read_speculate_ms = self.read_speculate_ms.unwrap_or(READ_SPECULATE_MS_DEFAULT);
        if read_speculate_ms > u64::from(REQUEST_TIMEOUT_MS_MAX) {
            return Err(ConfigError::Invalid {
                name: "read_speculate_ms",
                message: format!(
                    "{read_speculate_ms}: must be at most {REQUEST_TIMEOUT_MS_MAX} (0 turns it off)"
                ),
            });
        }
        let ae_max_keys = self.ae_max_keys.unwrap_or(AE_MAX_KEYS_DEFAULT);
        if ae_max_keys == 0 {
            return Err(ConfigError::Invalid {
                name: "ae_max_keys",
                message: "0: an exchange must be allowed to repair at least one key (turn \
                          anti-entropy off with ae_interval_ms = 0)"
                    .into(),
            });
        }
        let ae_interval_ms = self.ae_interval_ms.unwrap_or(AE_INTERVAL_MS_DEFAULT);
        let interval =
            |name: &'static str, value: Option<u64>, default: u64| match value.unwrap_or(default) {
                0 => Err(ConfigError::Invalid {
                    name,
                    message: "0: must be at least 1 ms".into(),
                }),
                ms => Ok(std::time::Duration::from_millis(ms)),
            };
        let gossip_interval = interval(
            "gossip_interval_ms",
            self.gossip_interval_ms,
            GOSSIP_INTERVAL_MS_DEFAULT,
        )?;
        let handoff_interval = interval(
            "handoff_interval_ms",
            self.handoff_interval_ms,
            HANDOFF_INTERVAL_MS_DEFAULT,
        )?;
        let weight = self.weight.unwrap_or(1);
        if weight == 0 {
            return Err(ConfigError::Invalid {
                name: "weight",
                message: "0: weights start at 1".into(),
            });
        }
        if self.zone.as_deref() == Some("") {
            return Err(ConfigError::Invalid {
                name: "zone",
                message: "empty: leave it out for a node without zone".into(),
            });
        }
        Ok(NodeConfig {
            gossip_interval,
            handoff_interval,
            weight,
            zone: self.zone,
            read_repair: self.read_repair.unwrap_or(true),
            // Whole per-mille steps: exact, and the resolved config stays `Eq`.
            full_reads_per_mille: (chance * 1000.0).round() as u32,
            read_speculate: (read_speculate_ms > 0)
                .then(|| std::time::Duration::from_millis(read_speculate_ms)),
            ae_interval: (ae_interval_ms > 0)
                .then(|| std::time::Duration::from_millis(ae_interval_ms)),
            ae_max_keys,
            tombstone_grace: std::time::Duration::from_millis(
                self.tombstone_grace_ms
                    .unwrap_or(TOMBSTONE_GRACE_MS_DEFAULT),
            ),
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DATA_DIR_DEFAULT)),
            listen,
            node_id,
            durability: self.durability.unwrap_or_default(),
            engine: self.engine.unwrap_or(EngineKind::Fjall),
            value_bytes_max,
            streams_per_connection_max: streams,
            request_timeout_ms: timeout,
            group_commit_window: std::time::Duration::from_micros(window_us),
            peers,
            advertise,
            quorum,
            sloppy_quorum: sloppy,
            buckets,
            partitions,
            peer_timeout: std::time::Duration::from_millis(u64::from(peer_timeout_ms)),
            hints_max: self.hints_max.unwrap_or(crate::kv::HINTS_MAX_DEFAULT),
            ca_dir: self.ca_dir,
            admin_key_file: self.admin_key_file,
            client_limits,
        })
    }
}

/// A node's resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Data directory (storage, certificates, node identity).
    pub data_dir: PathBuf,
    /// UDP address the QUIC endpoint binds.
    pub listen: SocketAddr,
    /// Node name, also the writer name in version vectors.
    pub node_id: String,
    /// Default durability of writes.
    pub durability: Durability,
    /// Storage engine.
    pub engine: EngineKind,
    /// Largest value accepted, in bytes.
    pub value_bytes_max: usize,
    /// Concurrent streams a client connection may open.
    pub streams_per_connection_max: u32,
    /// Default request deadline, in milliseconds.
    pub request_timeout_ms: u32,
    /// Longest a sync round waits for the writers of the previous round.
    pub group_commit_window: std::time::Duration,
    /// The other members: name → address.
    pub peers: std::collections::BTreeMap<String, SocketAddr>,
    /// This node's address as the member list gives it (what clients are told to use);
    /// the bound address when the list does not name this node.
    pub advertise: Option<SocketAddr>,
    /// Default n/r/w.
    pub quorum: quiver_core::quorum::Quorum,
    /// Sloppy quorum on or off.
    pub sloppy_quorum: bool,
    /// Ring partitions.
    pub partitions: u32,
    /// Deadline of one node-to-node request.
    pub peer_timeout: std::time::Duration,
    /// Largest number of hints kept.
    pub hints_max: u64,
    /// Repair stale replicas found by reads.
    pub read_repair: bool,
    /// Gets per thousand that ask every replica (with read repair on).
    pub full_reads_per_mille: u32,
    /// Delay after which a get short of R replies asks a replica it left out; `None` off.
    pub read_speculate: Option<std::time::Duration>,
    /// Time between anti-entropy exchanges; `None` when off.
    pub ae_interval: Option<std::time::Duration>,
    /// Keys one anti-entropy exchange repairs at most.
    pub ae_max_keys: usize,
    /// How long every replica must have held a tombstone before it may be reaped.
    pub tombstone_grace: std::time::Duration,
    /// Time between gossip rounds.
    pub gossip_interval: std::time::Duration,
    /// Time between handoff passes.
    pub handoff_interval: std::time::Duration,
    /// Weight when joining a cluster.
    pub weight: u32,
    /// Zone when joining a cluster.
    pub zone: Option<String>,
    /// CA directory for the first start, if not this node's own.
    pub ca_dir: Option<PathBuf>,
    /// The cluster-wide bootstrap admin key file, if any.
    pub admin_key_file: Option<PathBuf>,
    /// Bounds on what clients may make this node hold or run.
    pub client_limits: ClientLimits,
    /// Buckets with their own replication properties.
    pub buckets: std::collections::BTreeMap<String, BucketProps>,
}

/// Bounds on what clients (and bucket settings made by admins) may make a node hold or run:
/// connections, plugin call limits, concurrent plugin uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    /// Client and peer connections this node holds at once; more are refused at the
    /// handshake.
    pub connections_max: u32,
    /// Connections from one IP address at once; more are refused at the handshake.
    pub connections_per_address_max: u32,
    /// Most fuel a bucket may give its plugin per call (`bucket set --plugin-fuel`); larger
    /// settings are refused, and capped where another node set them.
    pub plugin_fuel_max: u64,
    /// Most linear memory a bucket may give its plugin per call, in bytes.
    pub plugin_memory_bytes_max: u64,
    /// Largest value a bucket may let its plugin return, in bytes.
    pub plugin_output_bytes_max: u64,
    /// Plugin uploads this node takes at once (each holds up to 64 MiB in memory while it
    /// is checked); more are refused until one ends.
    pub plugin_uploads_max: u32,
    /// Plugin calls run at once (the plugin pool's threads).
    pub plugin_workers: u32,
    /// Largest get reply, in bytes: past it a get answers `ResponseTooLarge` (a head read
    /// still works).
    pub response_bytes_max: u64,
}

/// `value` if it lies in `min..=max`, else a configuration error naming `name`.
fn bounded<T: PartialOrd + std::fmt::Display + Copy>(
    name: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::Invalid {
            name,
            message: format!("{value}: must be between {min} and {max}"),
        });
    }
    Ok(value)
}

pub use quiver_node_core::buckets::BucketProps;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_defaults_fill_the_rest() {
        let file: FileConfig =
            toml::from_str("listen = \"127.0.0.1:9000\"\ndurability = \"buffered\"\n")
                .expect("valid toml");
        let flags = FileConfig {
            durability: Some(Durability::Sync),
            ..Default::default()
        };
        let cfg = file.overlay(flags).resolve().expect("valid");
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.durability, Durability::Sync);
        assert_eq!(cfg.node_id, "node-9000");
        assert_eq!(cfg.engine, EngineKind::Fjall);
    }

    #[test]
    fn bucket_properties_from_flags_and_file() {
        let (name, b) =
            BucketFileConfig::parse_flag("carts:n=5,w=3,sloppy_quorum=false").expect("valid flag");
        assert_eq!(name, "carts");
        assert_eq!(
            (b.n, b.r, b.w, b.sloppy_quorum),
            (Some(5), None, Some(3), Some(false))
        );
        assert!(BucketFileConfig::parse_flag("carts").is_err());
        assert!(BucketFileConfig::parse_flag("carts:x=1").is_err());
        let file: FileConfig = toml::from_str(
            "peers = [\"a=127.0.0.1:1\", \"b=127.0.0.1:2\"]\n[buckets.carts]\nn = 1\n",
        )
        .expect("valid toml");
        let cfg = file.resolve().expect("valid");
        assert_eq!(cfg.advertise, None, "the list does not name this node");
        let carts = cfg.buckets.get("carts").expect("carts");
        assert_eq!((carts.quorum.n, carts.quorum.r, carts.quorum.w), (1, 1, 1));
        assert_eq!((cfg.quorum.n, cfg.quorum.r, cfg.quorum.w), (3, 2, 2));
        let bad: FileConfig = toml::from_str("[buckets.x]\nn = 2\nw = 3\n").expect("toml");
        assert!(bad.resolve().is_err(), "w > n is refused at start");
    }

    #[test]
    fn a_node_finds_its_own_address_in_the_shared_member_list() {
        let file = FileConfig {
            node_id: Some("n2".into()),
            listen: Some("0.0.0.0:7471".parse().expect("addr")),
            peers: Some(vec!["n1=127.0.8.1:7470".into(), "n2=127.0.8.2:7471".into()]),
            ..Default::default()
        };
        let cfg = file.resolve().expect("valid");
        assert_eq!(cfg.advertise, Some("127.0.8.2:7471".parse().expect("addr")));
        assert_eq!(cfg.peers.keys().collect::<Vec<_>>(), vec!["n1"]);
        let dup = FileConfig {
            peers: Some(vec!["a=127.0.0.1:1".into(), "a=127.0.0.1:2".into()]),
            ..Default::default()
        };
        assert!(dup.resolve().is_err(), "a member listed twice is refused");
        let bad = FileConfig {
            peers: Some(vec!["a:127.0.0.1:1".into()]),
            ..Default::default()
        };
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        assert!(toml::from_str::<FileConfig>("listen_addr = \"x\"").is_err());
        let bad = FileConfig {
            node_id: Some("a b".into()),
            ..Default::default()
        };
        assert!(matches!(
            bad.resolve(),
            Err(ConfigError::Invalid {
                name: "node_id",
                ..
            })
        ));
        let bad = FileConfig {
            value_bytes_max: Some(0),
            ..Default::default()
        };
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn membership_settings_default_and_are_checked() {
        let file: FileConfig = toml::from_str(
            "gossip_interval_ms = 250\nhandoff_interval_ms = 300\nweight = 2\nzone = \"rack-a\"\n",
        )
        .expect("valid toml");
        let cfg = file.resolve().expect("valid");
        assert_eq!(cfg.gossip_interval.as_millis(), 250);
        assert_eq!(cfg.handoff_interval.as_millis(), 300);
        assert_eq!((cfg.weight, cfg.zone.as_deref()), (2, Some("rack-a")));
        let cfg = FileConfig::default().resolve().expect("defaults");
        assert_eq!(cfg.gossip_interval.as_millis(), 1000);
        assert_eq!(cfg.handoff_interval.as_millis(), 1000);
        assert_eq!((cfg.weight, cfg.zone), (1, None));
        for (bad, name) in [
            (
                FileConfig {
                    gossip_interval_ms: Some(0),
                    ..Default::default()
                },
                "gossip_interval_ms",
            ),
            (
                FileConfig {
                    handoff_interval_ms: Some(0),
                    ..Default::default()
                },
                "handoff_interval_ms",
            ),
            (
                FileConfig {
                    weight: Some(0),
                    ..Default::default()
                },
                "weight",
            ),
            (
                FileConfig {
                    zone: Some(String::new()),
                    ..Default::default()
                },
                "zone",
            ),
        ] {
            assert!(
                matches!(bad.resolve(), Err(ConfigError::Invalid { name: n, .. }) if n == name),
                "{name}"
            );
        }
    }

    #[test]
    fn read_spread_settings_default_and_are_checked() {
        let cfg = FileConfig::default().resolve().expect("defaults");
        assert_eq!(cfg.full_reads_per_mille, 100);
        assert_eq!(cfg.read_speculate.map(|d| d.as_millis()), Some(20));
        let file: FileConfig = toml::from_str("read_repair_chance = 1.0\nread_speculate_ms = 0\n")
            .expect("valid toml");
        let cfg = file.resolve().expect("valid");
        assert_eq!((cfg.full_reads_per_mille, cfg.read_speculate), (1000, None));
        for (bad, name) in [
            (
                FileConfig {
                    read_repair_chance: Some(1.5),
                    ..Default::default()
                },
                "read_repair_chance",
            ),
            (
                FileConfig {
                    read_repair_chance: Some(f64::NAN),
                    ..Default::default()
                },
                "read_repair_chance",
            ),
            (
                FileConfig {
                    read_speculate_ms: Some(u64::MAX),
                    ..Default::default()
                },
                "read_speculate_ms",
            ),
        ] {
            assert!(
                matches!(bad.resolve(), Err(ConfigError::Invalid { name: n, .. }) if n == name),
                "{name}"
            );
        }
    }

    #[test]
    fn client_limits_default_and_are_checked() {
        let cfg = FileConfig::default().resolve().expect("defaults");
        let l = &cfg.client_limits;
        assert_eq!(
            (l.connections_max, l.connections_per_address_max),
            (4096, 256)
        );
        assert_eq!(l.plugin_output_bytes_max, cfg.value_bytes_max as u64);
        assert_eq!(
            (l.plugin_fuel_max, l.plugin_uploads_max),
            (1_000_000_000, 2)
        );
        let file: FileConfig =
            toml::from_str("connections_max = 10\nplugin_uploads_max = 1\n").expect("toml");
        let cfg = file.resolve().expect("valid");
        assert_eq!(cfg.client_limits.connections_max, 10);
        for (bad, name) in [
            (
                FileConfig {
                    connections_max: Some(0),
                    ..Default::default()
                },
                "connections_max",
            ),
            (
                FileConfig {
                    plugin_uploads_max: Some(1000),
                    ..Default::default()
                },
                "plugin_uploads_max",
            ),
            (
                FileConfig {
                    plugin_memory_bytes_max: Some(1),
                    ..Default::default()
                },
                "plugin_memory_bytes_max",
            ),
        ] {
            assert!(
                matches!(bad.resolve(), Err(ConfigError::Invalid { name: n, .. }) if n == name),
                "{name}"
            );
        }
    }
}
