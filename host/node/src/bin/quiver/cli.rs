//! Command-line interface of the `quiver` binary: the argument definitions. The commands
//! themselves live beside it (`data`, `status`, `cluster`, `plugins`, `keys`, `bench`,
//! `dev`); `main.rs` only parses, sets up logging, dispatches and reports errors.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::args::ClientArgs;
use crate::bench::BenchArgs;
use crate::data::{DeleteArgs, GetArgs, PutArgs};
use quiver_node::config::FileConfig;
use quiver_storage::{Durability, EngineKind};

/// Quiver: a Dynamo-style, always-writeable key-value store.
#[derive(Debug, Parser)]
#[command(
    name = "quiver",
    version,
    about = "Quiver: a Dynamo-style, always-writeable key-value store",
    long_about = None,
    propagate_version = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one node in the foreground (Ctrl-C or SIGTERM stops it gracefully).
    Server(Box<ServerArgs>),
    /// Read a key: every concurrent sibling and the context to write back with.
    Get(GetArgs),
    /// Write a value. Without --context the write is concurrent with what is stored.
    Put(PutArgs),
    /// Delete a key (writes a tombstone). Pass the context of a get to replace what it saw.
    Delete(DeleteArgs),
    /// Closed-loop load generator: prints throughput and latency percentiles.
    Bench(BenchArgs),
    /// Start a local cluster on loopback (one process per node) and print the environment
    /// a client needs.
    Dev(crate::dev::DevArgs),
    /// Cluster certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Cluster membership and health.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Apply an operation with the bucket reconciler's `update` at a replica (e.g. a
    /// counter increment or a cart add), with no read-modify-write by the client.
    Update(crate::plugins::UpdateArgs),
    /// Reconciler plugins: upload, list, show.
    #[command(subcommand)]
    Plugin(crate::plugins::PluginCommand),
    /// Bucket properties: reconciler, n/r/w, sibling threshold, plugin limits.
    #[command(subcommand)]
    Bucket(crate::plugins::BucketCommand),
    /// Access keys: create (with bucket grants or admin), list, show, delete; `init` writes
    /// a bootstrap admin key for a new cluster.
    #[command(subcommand)]
    Key(crate::keys::KeyCommand),
}

/// `quiver cluster` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    #[command(flatten)]
    #[allow(missing_docs)]
    Membership(crate::cluster::MembershipCommand),
    /// Every member as each reachable node sees it: status (joining, valid, leaving),
    /// up/down, partitions owned, hints held, anti-entropy and handoffs still to do.
    Status {
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// The ring as a node serves it: each member's partitions (owned, and held as one of
    /// the first n replicas) and, with `--partitions`, every partition's preference list.
    Ring {
        /// Also list every partition with its primaries.
        #[arg(long)]
        partitions: bool,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
}

/// `quiver ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a cluster CA (ca.pem, ca.key) in DIR, unless one exists. Start every node of a
    /// cluster with `--ca-dir DIR` so their certificates share it.
    Init {
        /// Directory for the CA files.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

/// `quiver server` options; each may also be set in the TOML file given with `--config`
/// (same names with underscores). Flags win over the file.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory: storage, certificates (ca.pem for clients), node identity.
    /// [default: quiver-data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// UDP address to listen on. [default: 127.0.0.1:7470]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Node name, unique in the cluster. [default: node-PORT]
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// When a write is acknowledged: `sync` = after an fsync shared with concurrent writes
    /// (group commit); `buffered` = once in memory, may be lost on power failure.
    /// [default: sync]
    #[arg(long, value_name = "MODE")]
    pub durability: Option<Durability>,
    /// Storage engine: `fjall` (durable, on disk) or `memory` (lost on restart).
    /// [default: fjall]
    #[arg(long, value_name = "ENGINE")]
    pub engine: Option<EngineKind>,
    /// Largest value accepted, in bytes. [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub value_bytes_max: Option<usize>,
    /// Concurrent requests (streams) per client connection. [default: 256]
    #[arg(long, value_name = "N")]
    pub streams_per_connection_max: Option<u32>,
    /// Default server-side deadline of a request, in ms. [default: 10000]
    #[arg(long, value_name = "MS")]
    pub request_timeout_ms: Option<u32>,
    /// Group commit: longest a sync round is held open for the writers of the previous
    /// round to come back, so they share one fsync (0 = never wait). [default: 1000]
    #[arg(long, value_name = "US")]
    pub group_commit_window_us: Option<u64>,
    /// Another cluster member, as ID=ADDR; repeat for each. Give every node the same list
    /// (a node skips its own entry).
    #[arg(long = "peer", value_name = "ID=ADDR")]
    pub peers: Vec<String>,
    /// Replicas per key. [default: min(3, cluster size)]
    #[arg(long, value_name = "N")]
    pub n: Option<usize>,
    /// Default read quorum. [default: majority of n]
    #[arg(long, value_name = "R")]
    pub r: Option<usize>,
    /// Default write quorum. [default: majority of n]
    #[arg(long, value_name = "W")]
    pub w: Option<usize>,
    /// Sloppy quorum: let fallbacks stand in for unreachable primaries and keep hints.
    /// [default: true]
    #[arg(long, value_name = "BOOL")]
    pub sloppy_quorum: Option<bool>,
    /// Ring partitions, a power of two, identical on every node, fixed when the cluster is
    /// first started. [default: 1024]
    #[arg(long, value_name = "Q")]
    pub partitions: Option<u32>,
    /// Deadline of one node-to-node request, in ms. [default: 2000]
    #[arg(long, value_name = "MS")]
    pub peer_timeout_ms: Option<u32>,
    /// Most hints kept for unreachable nodes. [default: 1000000]
    #[arg(long, value_name = "N")]
    pub hints_max: Option<u64>,
    /// Read repair: bring replicas found stale by a read up to date. [default: true]
    #[arg(long, value_name = "BOOL")]
    pub read_repair: Option<bool>,
    /// Share of gets (0 to 1) that ask every replica, so that read repair sees them all;
    /// the others ask only R replicas (the coordinator's own copy first) and ask another
    /// in place of each that fails. 1 reads like Riak, lower shares save node-to-node
    /// traffic; hinted handoff and anti-entropy keep the replicas not asked in step.
    /// Only with --read-repair true. [default: 0.1]
    #[arg(long, value_name = "SHARE")]
    pub read_repair_chance: Option<f64>,
    /// A get still short of R replies after this many ms also asks a replica it left out
    /// (speculative retry), instead of waiting up to --peer-timeout-ms for a slow one; 0
    /// turns it off. [default: 20]
    #[arg(long, value_name = "MS")]
    pub read_speculate_ms: Option<u64>,
    /// Active anti-entropy: time between hash-tree exchanges with a peer, in ms; 0 turns
    /// it off. [default: 5000]
    #[arg(long, value_name = "MS")]
    pub ae_interval_ms: Option<u64>,
    /// Keys one anti-entropy exchange repairs at most (the rest waits for the next).
    /// [default: 10000]
    #[arg(long, value_name = "N")]
    pub ae_max_keys: Option<usize>,
    /// How long in ms every replica must have held a tombstone (each by its own clock)
    /// before it may be reaped; reaping runs with anti-entropy, needs every member up, and
    /// waits while any node holds a hint for the key. [default: 60000]
    #[arg(long, value_name = "MS")]
    pub tombstone_grace_ms: Option<u64>,
    /// Time between gossip rounds, in ms: each round pulls the cluster metadata (members,
    /// ring, buckets, plugins) from a random peer when its digest differs. [default: 1000]
    #[arg(long, value_name = "MS")]
    pub gossip_interval_ms: Option<u64>,
    /// Time between handoff passes, in ms: each pass pushes replicas this node no longer
    /// owns to their new owners (at most --ae-max-keys keys) and drops what they hold.
    /// [default: 1000]
    #[arg(long, value_name = "MS")]
    pub handoff_interval_ms: Option<u64>,
    /// Relative capacity of this node when it joins a cluster (`quiver cluster join`):
    /// partitions are claimed in proportion. Nodes of the initial --peer list have weight
    /// 1. [default: 1]
    #[arg(long, value_name = "N")]
    pub weight: Option<u32>,
    /// Failure domain (rack, zone) of this node when it joins a cluster; replicas of a key
    /// are spread over distinct zones where enough exist. [default: none]
    #[arg(long, value_name = "NAME")]
    pub zone: Option<String>,
    /// Cluster CA directory (holding ca.pem and ca.key, see `quiver ca init`) that signs
    /// this node's certificate on first start. [default: a new CA in the data directory]
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Client and peer connections this node holds at once; more are refused at the handshake. [default: 4096]
    #[arg(long, value_name = "N")]
    pub connections_max: Option<u32>,
    /// Connections from one IP address at once; more are refused at the handshake. [default: 256]
    #[arg(long, value_name = "N")]
    pub connections_per_address_max: Option<u32>,
    /// Most fuel a bucket may give its plugin per call (`bucket set --plugin-fuel`); larger settings are refused, and capped where another node set them. [default: 1000000000]
    #[arg(long, value_name = "N")]
    pub plugin_fuel_max: Option<u64>,
    /// Most linear memory a bucket may give its plugin per call, in bytes. [default: 134217728]
    #[arg(long, value_name = "N")]
    pub plugin_memory_bytes_max: Option<u64>,
    /// Largest value a bucket may let its plugin return, in bytes. [default: the value limit]
    #[arg(long, value_name = "N")]
    pub plugin_output_bytes_max: Option<u64>,
    /// Plugin uploads this node takes at once (each holds up to 64 MiB in memory while it is checked); more are refused until one ends. [default: 2]
    #[arg(long, value_name = "N")]
    pub plugin_uploads_max: Option<u32>,
    /// Plugin calls (merges, updates) run at once, each on a thread of its own, never on
    /// the threads serving requests. [default: cores - 1, at least 1]
    #[arg(long, value_name = "N")]
    pub plugin_workers: Option<u32>,
    /// Largest get reply (siblings with their values) in bytes; past it a get is refused
    /// with ResponseTooLarge and `get --head` gives the context to resolve the siblings.
    /// [default: 64 MiB, or 4 values if values are larger]
    #[arg(long, value_name = "BYTES")]
    pub response_bytes_max: Option<u64>,
    /// A bootstrap admin key shared by the cluster (written by `quiver key init --file F`):
    /// the node accepts it from its first start, so every node of a new cluster takes the
    /// same key at once. Deleting the key (`quiver key delete NAME`) is final; a restart
    /// with this flag does not bring it back. [default: a new node writes its own admin key
    /// to DATA_DIR/admin.key]
    #[arg(long, value_name = "FILE")]
    pub admin_key_file: Option<PathBuf>,
    /// Replication properties of one bucket, as NAME:n=3,r=2,w=2,sloppy_quorum=false (any
    /// subset); repeat per bucket. `sloppy_quorum=false` requires primaries only.
    #[arg(long = "bucket", value_name = "NAME:PROPS")]
    pub buckets: Vec<String>,
    /// Threads that run requests (a process setting, not in the config file). Several nodes
    /// on one machine run faster with fewer threads each: `quiver dev` gives each node
    /// cores / nodes. [default: one per core]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

impl ServerArgs {
    /// The flags as a partial config, to overlay on the file.
    pub fn to_file_config(&self) -> Result<FileConfig, quiver_node::config::ConfigError> {
        let buckets = self
            .buckets
            .iter()
            .map(|b| quiver_node::config::BucketFileConfig::parse_flag(b))
            .collect::<Result<std::collections::BTreeMap<_, _>, _>>()?;
        Ok(FileConfig {
            data_dir: self.data_dir.clone(),
            listen: self.listen,
            node_id: self.node_id.clone(),
            durability: self.durability,
            engine: self.engine,
            value_bytes_max: self.value_bytes_max,
            streams_per_connection_max: self.streams_per_connection_max,
            request_timeout_ms: self.request_timeout_ms,
            group_commit_window_us: self.group_commit_window_us,
            peers: Some(self.peers.clone()),
            n: self.n,
            r: self.r,
            w: self.w,
            sloppy_quorum: self.sloppy_quorum,
            partitions: self.partitions,
            peer_timeout_ms: self.peer_timeout_ms,
            hints_max: self.hints_max,
            read_repair: self.read_repair,
            read_repair_chance: self.read_repair_chance,
            read_speculate_ms: self.read_speculate_ms,
            ae_interval_ms: self.ae_interval_ms,
            ae_max_keys: self.ae_max_keys,
            tombstone_grace_ms: self.tombstone_grace_ms,
            gossip_interval_ms: self.gossip_interval_ms,
            handoff_interval_ms: self.handoff_interval_ms,
            weight: self.weight,
            zone: self.zone.clone(),
            ca_dir: self.ca_dir.clone(),
            connections_max: self.connections_max,
            connections_per_address_max: self.connections_per_address_max,
            plugin_fuel_max: self.plugin_fuel_max,
            plugin_memory_bytes_max: self.plugin_memory_bytes_max,
            plugin_output_bytes_max: self.plugin_output_bytes_max,
            plugin_uploads_max: self.plugin_uploads_max,
            plugin_workers: self.plugin_workers,
            response_bytes_max: self.response_bytes_max,
            admin_key_file: self.admin_key_file.clone(),
            buckets: if buckets.is_empty() {
                None
            } else {
                Some(buckets)
            },
        })
    }
}

#[cfg(test)]
mod tests {
    /// clap checks a command line's definition (unique argument names, valid defaults)
    /// only when it parses one; this runs the checks for every subcommand at once.
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
