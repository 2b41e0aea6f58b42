//! Builds the `logstore` guest (`plugins/logstore`) for `wasm32-wasip2` so that `cargo build`
//! and `cargo test` of the workspace need no manual step, and hands its path to the library
//! as `QUIVER_LOGSTORE_WASM`.
//!
//! The guest is a standalone package with its own lock file; it is built by a nested
//! `cargo build --locked` into a target directory under `OUT_DIR`, so it never contends for
//! the outer build's target-directory lock.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "wasm32-wasip2";

fn main() {
    if let Err(message) = run() {
        // A build script reports failure by panicking; say exactly what to fix.
        panic!("quiver-wasm-storage build script: {message}");
    }
}

fn var(name: &str) -> Result<OsString, String> {
    env::var_os(name).ok_or_else(|| format!("cargo did not set {name}"))
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .and_then(Path::parent)
        .ok_or("the crate is not at host/wasm-storage of the workspace")?
        .to_path_buf();
    let guest = root.join("plugins").join("logstore");
    let out_dir = PathBuf::from(var("OUT_DIR")?);

    // Directories are watched recursively by cargo.
    for path in [
        guest.join("src"),
        guest.join("Cargo.toml"),
        guest.join("Cargo.lock"),
        root.join("wit"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    ensure_target_installed()?;

    let target_dir = out_dir.join("guest-target");
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings are for the host: flags such as `-C target-cpu=native`
    // or clippy's wrapper (under `cargo clippy`) must not leak into a wasm build, and the
    // outer target and profile variables would redirect it. The jobserver variables stay:
    // sharing the outer build's job tokens keeps a 2-core machine from being oversubscribed.
    for name in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(name);
    }
    for (name, _) in env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PROFILE_") || name.starts_with("CARGO_CFG_") {
            cmd.env_remove(name.as_ref());
        }
    }
    let status = cmd
        .status()
        .map_err(|e| format!("could not run {cmd:?}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the logstore guest failed ({status}); command: {cmd:?}"
        ));
    }

    let built = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("quiver_logstore.wasm");
    // Copied to a stable name: the engine names itself after the file ("wasm:logstore").
    let component = out_dir.join("logstore.wasm");
    std::fs::copy(&built, &component)
        .map_err(|e| format!("copy {} to {}: {e}", built.display(), component.display()))?;
    println!(
        "cargo:rustc-env=QUIVER_LOGSTORE_WASM={}",
        component.display()
    );
    Ok(())
}

/// Installs the wasm32-wasip2 standard library if the active toolchain lacks it
/// (`rust-toolchain.toml` lists it, but a toolchain installed before that line was added,
/// or by other means, may not have it).
fn ensure_target_installed() -> Result<(), String> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("could not run {}: {e}", rustc.to_string_lossy()))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(GUEST_TARGET).is_dir() {
        return Ok(());
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", GUEST_TARGET]);
    if let Some(toolchain) = env::var_os("RUSTUP_TOOLCHAIN") {
        cmd.arg("--toolchain").arg(toolchain);
    }
    match cmd.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!(
            "the {GUEST_TARGET} target is not installed for {} and `{cmd:?}` failed \
             ({status}); install it by hand with `rustup target add {GUEST_TARGET}`",
            sysroot.display()
        )),
        Err(e) => Err(format!(
            "the {GUEST_TARGET} target is not installed for {} and rustup could not be run \
             ({e}); install the target with `rustup target add {GUEST_TARGET}`",
            sysroot.display()
        )),
    }
}
