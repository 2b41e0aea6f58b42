//! `quiver get`, `put` and `delete`: single-key requests through the routing client.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use quiver_sdk::{Context, Durability as WireDurability, GetResult};
use quiver_sdk::{ReadOptions, WriteOptions};
use quiver_storage::Durability;
use serde_json::json;

use crate::args::{ClientArgs, Output};

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
