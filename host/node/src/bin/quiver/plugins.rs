//! `quiver plugin ...`, `quiver bucket ...` and `quiver update`: cluster-wide plugin and
//! bucket administration, and server-side updates through a bucket's reconciler.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use quiver_core::meta::{BucketSpec, PluginInfo, short_hash};
use quiver_sdk::WriteOptions;
use quiver_sdk::wire::BucketInfo;
use serde_json::json;

use crate::args::{ClientArgs, Output};

/// `quiver plugin` subcommands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Upload a reconciler plugin (a Wasm component) to the cluster: it is validated, its
    /// merge laws are checked, and it is stored and replicated to every node.
    Upload {
        /// Plugin name (letters, digits, '-', '_'); uploading again adds a version.
        name: String,
        /// The component file (.wasm).
        file: PathBuf,
        /// Store it even if its merge breaks the laws (the violations are printed).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// Every uploaded plugin version and the buckets using them.
    List {
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// One plugin's versions and the buckets using them.
    Show {
        /// Plugin name.
        name: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// Delete a plugin version from the cluster (its bytes too). Refused while a bucket
    /// uses it; final: the same bytes cannot be uploaded again under that name.
    Delete {
        /// The version, NAME@HASH (a unique hash prefix of 6 or more hex digits).
        plugin: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// Check a plugin locally: is it a valid reconciler component, and does its merge obey
    /// the laws (commutative, associative, idempotent, deterministic) on generated sibling
    /// sets? Exits non-zero on any violation. Upload runs the same check.
    Validate {
        /// The component file (.wasm).
        file: PathBuf,
        /// Sibling sets to generate.
        #[arg(long, default_value_t = 500)]
        cases: u32,
        /// Seed of the generated sets (the same seed checks the same sets).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Start a new Rust reconciler plugin: writes DIR/NAME with the WIT, a commented merge
    /// to replace, and a README with the build, validate and upload commands.
    New {
        /// Plugin (and crate) name.
        name: String,
        /// Where to create it.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Turn a core Wasm module built with wit-bindgen (e.g. for wasm32-unknown-unknown)
    /// into a component that `upload` accepts.
    Componentize {
        /// The core module.
        module: PathBuf,
        /// Where to write the component.
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// `quiver bucket` subcommands.
#[derive(Debug, Subcommand)]
pub enum BucketCommand {
    /// Change a bucket's properties on every node (unset options keep their value).
    Set(BucketSetArgs),
    /// A bucket's properties as a node applies them.
    Show {
        /// Bucket name.
        bucket: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
}

/// `quiver bucket set` options.
#[derive(Debug, Args)]
pub struct BucketSetArgs {
    /// Bucket name.
    pub bucket: String,
    /// Attach a reconciler: NAME (its latest version) or NAME@HASH (a hash prefix of at
    /// least 6 digits). Attaching another version swaps it live on every node.
    #[arg(long, value_name = "NAME[@HASH]")]
    pub reconciler: Option<String>,
    /// Detach the reconciler: siblings are returned to clients again.
    #[arg(long, conflicts_with = "reconciler")]
    pub detach_reconciler: bool,
    /// Replicas per key (changing it moves no existing data: set it before writing).
    #[arg(long)]
    pub n: Option<u8>,
    /// Default read quorum.
    #[arg(long)]
    pub r: Option<u8>,
    /// Default write quorum.
    #[arg(long)]
    pub w: Option<u8>,
    /// Sloppy quorum (false = primaries only).
    #[arg(long, value_name = "BOOL")]
    pub sloppy_quorum: Option<bool>,
    /// A write leaving more siblings than this is merged by the reconciler at once.
    /// [default: 16]
    #[arg(long, value_name = "N")]
    pub sibling_threshold: Option<u32>,
    /// Fuel per plugin call (deterministic instruction budget). [default: the engine's]
    #[arg(long, value_name = "UNITS")]
    pub plugin_fuel: Option<u64>,
    /// Memory cap per plugin call, in bytes. [default: the engine's]
    #[arg(long, value_name = "BYTES")]
    pub plugin_memory_bytes: Option<u64>,
    /// Largest value a plugin call may return, in bytes. [default: the engine's]
    #[arg(long, value_name = "BYTES")]
    pub plugin_output_bytes: Option<u64>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

/// `quiver update` options.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Bucket name (must have a reconciler).
    pub bucket: String,
    /// Key.
    pub key: String,
    /// The operation in the plugin's format, e.g. '{"add": 1}' for the counter plugin.
    pub op: String,
    /// Write quorum (default: the bucket's w).
    #[arg(long, value_name = "W")]
    pub w: Option<u8>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

fn plugin_json(p: &PluginInfo) -> serde_json::Value {
    json!({
        "name": p.plugin.name,
        "hash": p.plugin.hash,
        "size": p.size,
        "uploaded_ms": p.uploaded.timestamp_ms,
        "uploaded_by": p.uploaded.node,
        "forced": p.forced,
    })
}

/// Runs a `quiver plugin` subcommand.
pub async fn plugin(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Upload {
            name,
            file,
            force,
            client,
        } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("cannot read the plugin {}", file.display()))?;
            let cluster = client.connect().await?;
            let node = cluster.any().await?;
            let up = node
                .plugin_upload(&name, bytes, force)
                .await
                .with_context(|| format!("upload plugin {name}"))?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "plugin": plugin_json(&up.plugin),
                        "violations": up.violations,
                        "replicated_to": up.replicated_to,
                        "pending": up.pending,
                    })
                ),
                Output::Human => {
                    println!(
                        "uploaded {}@{} ({} bytes)",
                        up.plugin.plugin.name, up.plugin.plugin.hash, up.plugin.size
                    );
                    for v in &up.violations {
                        println!("law violation (forced): {v}");
                    }
                    println!("on nodes: {}", up.replicated_to.join(", "));
                    if !up.pending.is_empty() {
                        println!(
                            "not reached yet (they catch up when back): {}",
                            up.pending.join(", ")
                        );
                    }
                }
            }
            cluster.close().await;
            Ok(())
        }
        PluginCommand::List { client } => listing(client, None).await,
        PluginCommand::Show { name, client } => listing(client, Some(name)).await,
        PluginCommand::Delete { plugin, client } => {
            let cluster = client.connect().await?;
            let node = cluster.any().await?;
            let gone = node
                .plugin_delete(&plugin)
                .await
                .with_context(|| format!("delete plugin {plugin}"))?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "deleted": gone.versions.iter().map(plugin_json).collect::<Vec<_>>() })
                ),
                Output::Human => {
                    for v in &gone.versions {
                        println!("deleted {}@{}", v.plugin.name, v.plugin.hash);
                    }
                }
            }
            Ok(())
        }
        PluginCommand::Validate { file, cases, seed } => validate(&file, cases, seed),
        PluginCommand::New { name, dir } => new_plugin(&name, &dir),
        PluginCommand::Componentize { module, output } => componentize(&module, &output),
    }
}

fn validate(file: &std::path::Path, cases: u32, seed: u64) -> anyhow::Result<()> {
    let bytes = std::fs::read(file)
        .with_context(|| format!("cannot read the plugin {}", file.display()))?;
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin")
        .to_string();
    let cache = std::env::temp_dir().join("quiver-plugin-cache");
    let runtime = quiver_plugin::PluginRuntime::new(&cache)?;
    let reconciler = runtime.load_reconciler(&name, &bytes)?;
    let violations = quiver_node::plugin_engine::law_violations(&reconciler, seed, cases);
    if violations.is_empty() {
        println!(
            "{}: a valid reconciler; merge is commutative, associative, idempotent and deterministic on {cases} generated sibling sets",
            reconciler.label()
        );
        return Ok(());
    }
    for v in &violations {
        println!("violation: {v}");
    }
    bail!(
        "{}: {} law violations (upload refuses it unless --force)",
        reconciler.label(),
        violations.len()
    )
}

fn componentize(module: &std::path::Path, output: &std::path::Path) -> anyhow::Result<()> {
    let core = std::fs::read(module)
        .with_context(|| format!("cannot read the module {}", module.display()))?;
    let component = wit_component::ComponentEncoder::default()
        .module(&core)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| anyhow::anyhow!("cannot componentize {}: {e:#}", module.display()))?;
    std::fs::write(output, &component)
        .with_context(|| format!("cannot write {}", output.display()))?;
    println!("{} ({} bytes)", output.display(), component.len());
    Ok(())
}

const TEMPLATE_WIT: &str = include_str!("../../../../../wit/quiver-plugin.wit");
const TEMPLATE_LIB: &str = include_str!("plugin_template/lib.rs");
const TEMPLATE_CARGO: &str = include_str!("plugin_template/Cargo.toml");
const TEMPLATE_README: &str = include_str!("plugin_template/README.md");

fn new_plugin(name: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!(
            "plugin name {name:?}: use 1 to 64 lowercase letters, digits, '-' or '_', starting with a letter"
        );
    }
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let files = [
        ("Cargo.toml", TEMPLATE_CARGO.replace("{{name}}", name)),
        ("src/lib.rs", TEMPLATE_LIB.replace("{{name}}", name)),
        ("wit/quiver-plugin.wit", TEMPLATE_WIT.to_string()),
        ("README.md", TEMPLATE_README.replace("{{name}}", name)),
    ];
    for (path, text) in files {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "created {}; next steps are in its README.md",
        root.display()
    );
    Ok(())
}

async fn listing(client: ClientArgs, name: Option<String>) -> anyhow::Result<()> {
    let cluster = client.connect().await?;
    let node = cluster.any().await?;
    let list = match &name {
        Some(n) => node.plugin_show(n).await,
        None => node.plugin_list().await,
    }
    .context("list plugins")?;
    match client.output {
        Output::Json => println!(
            "{}",
            json!({
                "versions": list.versions.iter().map(plugin_json).collect::<Vec<_>>(),
                "buckets": list.buckets.iter().map(|(b, p)| json!({
                    "bucket": b, "plugin": p.name, "hash": p.hash,
                })).collect::<Vec<_>>(),
            })
        ),
        Output::Human => {
            println!(
                "{:<20} {:<14} {:>10}  uploaded by",
                "plugin", "hash", "bytes"
            );
            for p in &list.versions {
                let forced = if p.forced { " (forced)" } else { "" };
                println!(
                    "{:<20} {:<14} {:>10}  {}{forced}",
                    p.plugin.name,
                    short_hash(&p.plugin.hash),
                    p.size,
                    p.uploaded.node
                );
            }
            for (bucket, p) in &list.buckets {
                println!("bucket {bucket} uses {p}");
            }
        }
    }
    cluster.close().await;
    Ok(())
}

fn print_bucket(info: &BucketInfo, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "bucket": info.bucket,
                "n": info.n, "r": info.r, "w": info.w,
                "sloppy_quorum": info.sloppy_quorum,
                "sibling_threshold": info.sibling_threshold,
                "reconciler": info.spec.reconciler.as_ref().map(|p| json!({"name": p.name, "hash": p.hash})),
                "reconciler_loaded": info.reconciler_loaded,
                "plugin_fuel": info.spec.plugin_fuel,
                "plugin_memory_bytes": info.spec.plugin_memory_bytes,
                "plugin_output_bytes": info.spec.plugin_output_bytes,
                "set_by": info.set_by.as_ref().map(|s| json!({"node": s.node, "timestamp_ms": s.timestamp_ms})),
            })
        ),
        Output::Human => {
            println!("bucket {}", info.bucket);
            println!(
                "n={} r={} w={} sloppy_quorum={}",
                info.n, info.r, info.w, info.sloppy_quorum
            );
            match &info.spec.reconciler {
                Some(p) => {
                    let state = if info.reconciler_loaded {
                        "loaded"
                    } else {
                        "NOT loaded on this node yet"
                    };
                    println!("reconciler: {p} ({state})");
                    println!("sibling threshold: {}", info.sibling_threshold);
                }
                None => println!("reconciler: none (siblings are returned to clients)"),
            }
            if let Some(s) = &info.set_by {
                println!("set by {} at {} ms", s.node, s.timestamp_ms);
            }
        }
    }
}

/// Runs a `quiver bucket` subcommand.
pub async fn bucket(command: BucketCommand) -> anyhow::Result<()> {
    match command {
        BucketCommand::Set(args) => {
            let changes = BucketSpec {
                n: args.n,
                r: args.r,
                w: args.w,
                sloppy_quorum: args.sloppy_quorum,
                reconciler: None,
                sibling_threshold: args.sibling_threshold,
                plugin_fuel: args.plugin_fuel,
                plugin_memory_bytes: args.plugin_memory_bytes,
                plugin_output_bytes: args.plugin_output_bytes,
            };
            if changes == BucketSpec::default()
                && args.reconciler.is_none()
                && !args.detach_reconciler
            {
                bail!("nothing to change: give at least one option (see --help)");
            }
            let cluster = args.client.connect().await?;
            let node = cluster.any().await?;
            let info = node
                .bucket_set(
                    &args.bucket,
                    changes,
                    args.reconciler.as_deref(),
                    args.detach_reconciler,
                )
                .await
                .with_context(|| format!("bucket set {}", args.bucket))?;
            print_bucket(&info, args.client.output);
            cluster.close().await;
            Ok(())
        }
        BucketCommand::Show { bucket, client } => {
            let cluster = client.connect().await?;
            let node = cluster.any().await?;
            let info = node
                .bucket_show(&bucket)
                .await
                .with_context(|| format!("bucket show {bucket}"))?;
            print_bucket(&info, client.output);
            cluster.close().await;
            Ok(())
        }
    }
}

/// Runs `quiver update`.
pub async fn update(args: UpdateArgs) -> anyhow::Result<()> {
    let cluster = args.client.connect().await?;
    let options = WriteOptions {
        timeout_ms: None,
        durability: None,
        w: args.w,
    };
    let ctx = cluster
        .update(
            &args.bucket,
            args.key.as_bytes(),
            args.op.into_bytes(),
            &options,
        )
        .await
        .with_context(|| format!("update {}/{}", args.bucket, args.key))?;
    match args.client.output {
        Output::Json => println!("{}", json!({ "context": ctx.to_string() })),
        Output::Human => println!("ok\ncontext: {ctx}"),
    }
    cluster.close().await;
    Ok(())
}
