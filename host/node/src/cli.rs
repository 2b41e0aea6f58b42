//! Command-line interface of the `quiver` binary: argument definitions and the client
//! commands. `main.rs` only parses, sets up logging and reports errors.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::{Args, Parser, Subcommand, ValueEnum};
use quiver_sdk::{ClientConfig, ClusterClient, Context, Durability as WireDurability, GetResult};
use quiver_sdk::{ReadOptions, WriteOptions};
use serde_json::json;

use crate::bench::BenchArgs;
use crate::config::FileConfig;
use crate::storage::{Durability, EngineKind};

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
    Update(crate::cli_plugins::UpdateArgs),
    /// Reconciler plugins: upload, list, show.
    #[command(subcommand)]
    Plugin(crate::cli_plugins::PluginCommand),
    /// Bucket properties: reconciler, n/r/w, sibling threshold, plugin limits.
    #[command(subcommand)]
    Bucket(crate::cli_plugins::BucketCommand),
    /// Access keys: create (with bucket grants or admin), list, show, delete; `init` writes
    /// a bootstrap admin key for a new cluster.
    #[command(subcommand)]
    Key(crate::cli_keys::KeyCommand),
}

/// `quiver cluster` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    #[command(flatten)]
    #[allow(missing_docs)]
    Membership(crate::cli_cluster::MembershipCommand),
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
    pub fn to_file_config(&self) -> Result<FileConfig, crate::config::ConfigError> {
        let buckets = self
            .buckets
            .iter()
            .map(|b| crate::config::BucketFileConfig::parse_flag(b))
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

/// `quiver get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Bucket name.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// Replica replies to wait for (default: the cluster's r).
    #[arg(long, value_name = "R")]
    pub r: Option<u8>,
    /// Show the siblings as stored, without the bucket's reconciler.
    #[arg(long)]
    pub raw: bool,
    /// Only the siblings' sizes and metadata and the context, no values (implies --raw):
    /// resolves a key whose siblings are too large to read together.
    #[arg(long)]
    pub head: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

/// `quiver put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// Bucket name.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// The value; `-` reads it from stdin. Omit it when using --file.
    pub value: Option<String>,
    /// Read the value from a file.
    #[arg(long, value_name = "FILE", conflicts_with = "value")]
    pub file: Option<PathBuf>,
    /// Context from a get: replaces the siblings that get returned.
    #[arg(long, value_name = "CTX")]
    pub context: Option<String>,
    /// Durability of this write (default: the node's setting).
    #[arg(long, value_name = "MODE")]
    pub durability: Option<Durability>,
    /// Replica acknowledgements to wait for (default: the cluster's w).
    #[arg(long, value_name = "W")]
    pub w: Option<u8>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

/// `quiver delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Bucket name.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// Context from a get: replaces the siblings that get returned.
    #[arg(long, value_name = "CTX")]
    pub context: Option<String>,
    /// Durability of this delete (default: the node's setting).
    #[arg(long, value_name = "MODE")]
    pub durability: Option<Durability>,
    /// Replica acknowledgements to wait for (default: the cluster's w).
    #[arg(long, value_name = "W")]
    pub w: Option<u8>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

fn wire_durability(d: Option<Durability>) -> Option<WireDurability> {
    d.map(|d| match d {
        Durability::Sync => WireDurability::Sync,
        Durability::Buffered => WireDurability::Buffered,
    })
}

fn parse_context(ctx: Option<&str>) -> anyhow::Result<Option<Context>> {
    ctx.map(|c| {
        c.parse::<Context>()
            .context("--context is not a context printed by quiver")
    })
    .transpose()
}

/// Runs `quiver get`.
pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let result = client
        .get_with(
            &args.bucket,
            args.key.as_bytes(),
            &ReadOptions {
                timeout_ms: None,
                r: args.r,
                raw: args.raw,
                head: args.head,
            },
        )
        .await
        .with_context(|| format!("get {}/{}", args.bucket, args.key))?;
    print_get(&result, args.client.output);
    client.close().await;
    Ok(())
}

/// A sibling's value for people; a head read shows the size it did not fetch.
fn shown_value(s: &quiver_sdk::Sibling) -> String {
    if s.value.is_empty() && s.value_bytes > 0 {
        format!("({} bytes, not read)", s.value_bytes)
    } else {
        render_value(&s.value)
    }
}

fn print_get(result: &GetResult, output: Output) {
    match output {
        Output::Json => {
            let siblings: Vec<_> = result
                .siblings
                .iter()
                .map(|s| {
                    json!({
                        "value": std::str::from_utf8(&s.value).ok(),
                        "value_base64": STANDARD.encode(&s.value),
                        "value_bytes": s.value_bytes,
                        "tombstone": s.tombstone,
                        "timestamp_ms": s.timestamp_ms,
                        "actor": s.actor,
                    })
                })
                .collect();
            let out = json!({
                "found": result.found(),
                "siblings": siblings,
                "context": result.context.to_string(),
            });
            println!("{out}");
        }
        Output::Human => {
            if !result.found() {
                println!("not found");
            } else if result.siblings.len() == 1 {
                println!("{}", shown_value(&result.siblings[0]));
            } else {
                println!("{} siblings:", result.siblings.len());
                for (i, s) in result.siblings.iter().enumerate() {
                    let shown = if s.tombstone {
                        "(deleted)".to_string()
                    } else {
                        shown_value(s)
                    };
                    println!(
                        "  [{}] {shown}    (actor {}, timestamp_ms {})",
                        i + 1,
                        s.actor,
                        s.timestamp_ms
                    );
                }
            }
            println!("context: {}", result.context);
        }
    }
}

fn render_value(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) => s.to_string(),
        Err(_) => format!(
            "<{} bytes of binary, base64 {}>",
            v.len(),
            STANDARD.encode(v)
        ),
    }
}

/// Runs `quiver put`.
pub async fn put(args: PutArgs) -> anyhow::Result<()> {
    let value = match (&args.value, &args.file) {
        (Some(v), None) if v == "-" => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read the value from stdin")?;
            buf
        }
        (Some(v), None) => v.as_bytes().to_vec(),
        (None, Some(f)) => std::fs::read(f)
            .with_context(|| format!("cannot read the value from {}", f.display()))?,
        (None, None) => bail!("give a value, `-` for stdin, or --file FILE"),
        (Some(_), Some(_)) => bail!("give either a value or --file, not both"),
    };
    let context = parse_context(args.context.as_deref())?;
    let client = args.client.connect().await?;
    let options = WriteOptions {
        timeout_ms: None,
        durability: wire_durability(args.durability),
        w: args.w,
    };
    let ctx = client
        .put_with(
            &args.bucket,
            args.key.as_bytes(),
            value,
            context.as_ref(),
            &options,
        )
        .await
        .with_context(|| format!("put {}/{}", args.bucket, args.key))?;
    print_written(&ctx, args.client.output);
    client.close().await;
    Ok(())
}

/// Runs `quiver delete`.
pub async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let context = parse_context(args.context.as_deref())?;
    let client = args.client.connect().await?;
    let options = WriteOptions {
        timeout_ms: None,
        durability: wire_durability(args.durability),
        w: args.w,
    };
    let ctx = client
        .delete_with(
            &args.bucket,
            args.key.as_bytes(),
            context.as_ref(),
            &options,
        )
        .await
        .with_context(|| format!("delete {}/{}", args.bucket, args.key))?;
    print_written(&ctx, args.client.output);
    client.close().await;
    Ok(())
}

fn print_written(ctx: &Context, output: Output) {
    match output {
        Output::Json => println!("{}", json!({ "context": ctx.to_string() })),
        Output::Human => println!("ok\ncontext: {ctx}"),
    }
}

/// Runs `quiver cluster ring`.
pub async fn cluster_ring(client_args: ClientArgs, list_partitions: bool) -> anyhow::Result<()> {
    let cluster = client_args.connect().await?;
    let client = cluster.any().await.context("no node answered")?;
    let (ring, addrs, n) = client.ring().await.context("fetch the ring")?;
    let q = ring.partitions();
    let mut replicas: std::collections::BTreeMap<&str, u32> = Default::default();
    let mut lists = Vec::with_capacity(q as usize);
    for p in 0..q {
        let list = ring
            .preference_list(p, n)
            .with_context(|| format!("partition {p}"))?;
        let primaries: Vec<&str> = list.primaries.iter().map(|m| m.id.as_str()).collect();
        for id in &primaries {
            *replicas.entry(id).or_default() += 1;
        }
        lists.push((p, primaries));
    }
    let addr_of = |id: &str| {
        addrs
            .iter()
            .find(|(m, _)| m == id)
            .map_or("", |(_, a)| a.as_str())
            .to_string()
    };
    let pct = |count: u32| f64::from(count) * 100.0 / f64::from(q.max(1));
    let owned = ring.owned_counts();
    match client_args.output {
        Output::Json => {
            let members: Vec<_> = owned
                .iter()
                .map(|(m, count)| {
                    json!({
                        "node": m.id, "addr": addr_of(&m.id), "weight": m.weight, "zone": m.zone,
                        "owned": count, "owned_pct": pct(*count),
                        "replicas": replicas.get(m.id.as_str()).copied().unwrap_or(0),
                    })
                })
                .collect();
            let mut out = json!({
                "version": ring.version(), "partitions": q, "n": n, "members": members,
            });
            if list_partitions {
                out["preference_lists"] = lists
                    .iter()
                    .map(|(p, primaries)| json!({ "partition": p, "primaries": primaries }))
                    .collect();
            }
            println!("{out}");
        }
        Output::Human => {
            println!("ring version {}: {q} partitions, n={n}", ring.version());
            println!(
                "{:<12} {:<22} {:>6} {:<8} {:>7} {:>8} {:>9}",
                "node", "addr", "weight", "zone", "owned", "owned%", "replicas"
            );
            for (m, count) in &owned {
                println!(
                    "{:<12} {:<22} {:>6} {:<8} {:>7} {:>7.1}% {:>9}",
                    m.id,
                    addr_of(&m.id),
                    m.weight,
                    m.zone.as_deref().unwrap_or("-"),
                    count,
                    pct(*count),
                    replicas.get(m.id.as_str()).copied().unwrap_or(0)
                );
            }
            if list_partitions {
                for (p, primaries) in &lists {
                    println!("{p:>6}  {}", primaries.join(","));
                }
            }
        }
    }
    client.close().await;
    cluster.close().await;
    Ok(())
}

/// Runs `quiver cluster status`.
pub async fn cluster_status(client_args: ClientArgs) -> anyhow::Result<()> {
    let client = client_args.connect().await?;
    let statuses = client.status().await;
    match client_args.output {
        Output::Json => {
            let nodes: Vec<_> = statuses
                .iter()
                .map(|(node, st)| match st {
                    Ok(s) => json!({
                        "node": node,
                        "reachable": true,
                        "hints": s.hints,
                        "plugin_failures": s.plugin_failures,
                        "anti_entropy": {
                            "keys": s.ae_keys,
                            "exchanges": s.ae_exchanges,
                            "keys_repaired": s.ae_keys_repaired,
                            "bytes_sent": s.ae_bytes_sent,
                        },
                        "tombstones": s.tombstones,
                        "tombstones_reaped": s.tombstones_reaped,
                        "reads_speculated": s.reads_speculated,
                        "auth_refused": s.auth_refused,
                        "connections_refused": s.connections_refused,
                        "ring_version": s.ring_version,
                        "handoff": {
                            "partitions": s.handoff_partitions,
                            "keys": s.handoff_keys,
                            "keys_sent": s.handoff_keys_sent,
                            "keys_dropped": s.handoff_keys_dropped,
                        },
                        "partitions": s.partitions,
                        "n": s.n, "r": s.r, "w": s.w,
                        "members": s.members.iter().map(|m| json!({
                            "node": m.node, "addr": m.addr, "up": m.up, "partitions": m.partitions,
                            "state": m.state,
                            "owned_pct": f64::from(m.partitions) * 100.0
                                / f64::from(s.partitions.max(1)),
                        })).collect::<Vec<_>>(),
                    }),
                    Err(e) => json!({ "node": node, "reachable": false, "error": e.to_string() }),
                })
                .collect();
            println!("{}", json!({ "nodes": nodes }));
        }
        Output::Human => {
            println!(
                "{:<12} {:<8} {:<10} {:>14} {:>5} {:>9} {:>7} {:>9} {:>9} {:>8} {:>9} {:>10} {:>7} {:>7} {:>8}  sees down",
                "node",
                "state",
                "reachable",
                "owned",
                "ring",
                "handoff",
                "hints",
                "plugin-err",
                "ae-keys",
                "ae-exch",
                "ae-fixed",
                "ae-bytes",
                "tombs",
                "reaped",
                "refused"
            );
            for (node, st) in &statuses {
                match st {
                    Ok(s) => {
                        let me = s.members.iter().find(|m| &m.node == node);
                        let state = me.map_or("-", |m| m.state.as_str());
                        let mine = me.map_or(0, |m| m.partitions);
                        let mine = format!(
                            "{mine} ({:.1}%)",
                            f64::from(mine) * 100.0 / f64::from(s.partitions.max(1))
                        );
                        let down: Vec<&str> = s
                            .members
                            .iter()
                            .filter(|m| !m.up)
                            .map(|m| m.node.as_str())
                            .collect();
                        let down = if down.is_empty() {
                            "-".to_string()
                        } else {
                            down.join(",")
                        };
                        println!(
                            "{node:<12} {state:<8} {:<10} {mine:>14} {:>5} {:>9} {:>7} {:>9} \
                             {:>9} {:>8} {:>9} {:>10} {:>7} {:>7} {:>8}  {down}",
                            "yes",
                            s.ring_version,
                            s.handoff_keys,
                            s.hints,
                            s.plugin_failures,
                            s.ae_keys,
                            s.ae_exchanges,
                            s.ae_keys_repaired,
                            s.ae_bytes_sent,
                            s.tombstones,
                            s.tombstones_reaped,
                            s.auth_refused + s.connections_refused
                        );
                    }
                    Err(e) => println!(
                        "{node:<12} {:<8} {:<10} {:>14} {:>5} {:>9} {:>7} {:>9} {:>9} {:>8} {:>9} \
                         {:>10} {:>7} {:>7} {:>8}  ({e})",
                        "-", "NO", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-"
                    ),
                }
            }
            if let Some((_, Ok(s))) = statuses.iter().find(|(_, s)| s.is_ok()) {
                println!(
                    "ring: {} partitions, n={} r={} w={}",
                    s.partitions, s.n, s.r, s.w
                );
            }
        }
    }
    client.close().await;
    Ok(())
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
