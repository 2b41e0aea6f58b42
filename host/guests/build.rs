//! Builds the guest plugins of `plugins/` (a separate cargo workspace) for their wasm targets,
//! turns the core modules into components, and hands their paths to `src/lib.rs`.
//!
//! Everything a fresh machine needs is done here, so that `cargo test --workspace` alone
//! builds the guests: a missing wasm target is installed with rustup.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

/// Core modules componentized with `wit-component`: (lib file stem, env var set for lib.rs).
/// Built for `wasm32-unknown-unknown`, so they import nothing.
const COMPONENTS: &[(&str, &str)] = &[
    ("cart", "QUIVER_GUEST_CART"),
    ("lww", "QUIVER_GUEST_LWW"),
    ("counter", "QUIVER_GUEST_COUNTER"),
    ("template", "QUIVER_GUEST_TEMPLATE"),
    ("fixture_loop", "QUIVER_GUEST_LOOP"),
    ("fixture_alloc", "QUIVER_GUEST_ALLOC"),
    ("fixture_trap", "QUIVER_GUEST_TRAP"),
    ("fixture_huge", "QUIVER_GUEST_HUGE"),
    ("fixture_garbage", "QUIVER_GUEST_GARBAGE"),
];

/// The one guest built for WASI: rustc's wasm32-wasip2 target emits a component directly.
const WASI_COMPONENT: (&str, &str) = ("fixture_fs", "QUIVER_GUEST_FS");

/// Deliberately left a core module.
const CORE_MODULE: (&str, &str) = ("fixture_not_a_component", "QUIVER_GUEST_NOT_A_COMPONENT");

const CORE_TARGET: &str = "wasm32-unknown-unknown";
const WASI_TARGET: &str = "wasm32-wasip2";

/// Environment of the outer build that would leak into the nested one: flags meant for the
/// host target (and for clippy), and a target dir that would make the nested cargo wait on
/// the lock the outer cargo holds.
const STRIPPED_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTC_WORKSPACE_WRAPPER",
    "CLIPPY_ARGS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
];

fn main() {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| fail("host/guests must sit two levels below the repository root"))
        .to_path_buf();
    let plugins = root.join("plugins");
    let out_dir = PathBuf::from(env_var("OUT_DIR"));

    rerun_if_changed(&root.join("wit"));
    rerun_if_changed(&plugins.join("Cargo.toml"));
    rerun_if_changed(&plugins.join("Cargo.lock"));
    for member in plugin_members(&plugins) {
        rerun_if_changed(&member);
    }

    ensure_target(CORE_TARGET);
    ensure_target(WASI_TARGET);

    let target_dir = nested_target_dir(&out_dir);
    let manifest = plugins.join("Cargo.toml");
    cargo_build(
        &manifest,
        &target_dir,
        CORE_TARGET,
        &["--workspace", "--exclude", "fixture-fs"],
    );
    cargo_build(
        &manifest,
        &target_dir,
        WASI_TARGET,
        &["--package", "fixture-fs"],
    );

    let core_out = target_dir.join(CORE_TARGET).join("release");
    for (stem, var) in COMPONENTS {
        let core = read(&core_out.join(format!("{stem}.wasm")));
        let component = componentize(stem, &core);
        publish(&out_dir, stem, var, &component);
    }
    let (stem, var) = WASI_COMPONENT;
    let wasi = read(
        &target_dir
            .join(WASI_TARGET)
            .join("release")
            .join(format!("{stem}.wasm")),
    );
    publish(&out_dir, stem, var, &wasi);
    let (stem, var) = CORE_MODULE;
    publish(
        &out_dir,
        stem,
        var,
        &read(&core_out.join(format!("{stem}.wasm"))),
    );

    python_cart(&root, &target_dir, &out_dir);
}

/// componentize-py's release that fits wasmtime 48 (see the shared toolchain notes).
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";

/// Builds the Python twin of the cart with componentize-py, installed from PyPI into a venv
/// beside the nested target dir (shared by every profile, reinstalled only if the pinned
/// version changes). Without Python or PyPI the twin is skipped with a warning, and
/// `python_cart()` returns `None`; everything else still builds.
fn python_cart(root: &Path, target_dir: &Path, out_dir: &Path) {
    let app_dir = root.join("plugins").join("python").join("cart");
    rerun_if_changed(&app_dir.join("app.py"));
    let out = out_dir.join("py_cart.wasm");
    match build_python_cart(root, &app_dir, target_dir, &out) {
        Ok(()) => println!("cargo:rustc-env=QUIVER_GUEST_PY_CART={}", out.display()),
        Err(why) => {
            println!("cargo:warning=skipping the Python cart plugin: {why}");
            println!("cargo:rustc-env=QUIVER_GUEST_PY_CART=");
        }
    }
}

fn build_python_cart(
    root: &Path,
    app_dir: &Path,
    target_dir: &Path,
    out: &Path,
) -> Result<(), String> {
    let venv = target_dir.join("python-venv");
    let tool = venv.join("bin").join("componentize-py");
    let marker = venv.join("quiver-installed.txt");
    if fs::read_to_string(&marker).ok().as_deref() != Some(COMPONENTIZE_PY) {
        run(
            Command::new("python3")
                .arg("-m")
                .arg("venv")
                .arg("--clear")
                .arg(&venv),
            "python3 -m venv",
        )?;
        run(
            Command::new(venv.join("bin").join("pip")).args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                COMPONENTIZE_PY,
            ]),
            "pip install componentize-py (is PyPI reachable?)",
        )?;
        fs::write(&marker, COMPONENTIZE_PY)
            .map_err(|e| format!("write {}: {e}", marker.display()))?;
    }
    // --stub-wasi: the interpreter's WASI imports become trapping stubs, so the component
    // imports nothing, like every reconciler.
    run(
        Command::new(&tool)
            .arg("-d")
            .arg(root.join("wit"))
            .args([
                "-w",
                "reconciler-plugin",
                "componentize",
                "app",
                "--stub-wasi",
                "-p",
            ])
            .arg(app_dir)
            .arg("-o")
            .arg(out),
        "componentize-py",
    )
}

fn run(command: &mut Command, what: &str) -> Result<(), String> {
    match command.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("{what} failed ({status})")),
        Err(e) => Err(format!("{what} could not start: {e}")),
    }
}

fn env_var(name: &str) -> String {
    env::var(name).unwrap_or_else(|_| fail(&format!("cargo did not set {name}")))
}

fn fail(message: &str) -> ! {
    panic!("quiver-guests build: {message}")
}

fn rerun_if_changed(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
}

/// The member crate directories of the plugins workspace (each has a Cargo.toml), found by
/// walking two levels, so a new plugin needs no edit here.
fn plugin_members(plugins: &Path) -> Vec<PathBuf> {
    let mut members = Vec::new();
    let mut dirs = vec![plugins.to_path_buf()];
    for _depth in 0..2 {
        let mut next = Vec::new();
        for dir in dirs {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !path.is_dir() || path.file_name().is_some_and(|n| n == "target") {
                    continue;
                }
                if path.join("Cargo.toml").is_file() {
                    members.push(path);
                } else {
                    next.push(path);
                }
            }
        }
        dirs = next;
    }
    members.sort();
    members
}

/// The rustc that cargo gave this build script: the toolchain of rust-toolchain.toml.
fn rustc() -> String {
    env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned())
}

fn target_installed(target: &str) -> bool {
    let Ok(output) = Command::new(rustc()).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Path::new(&sysroot)
        .join("lib")
        .join("rustlib")
        .join(target)
        .join("lib")
        .is_dir()
}

/// Installs a missing wasm target for the toolchain in use (a fresh machine has only the
/// host target unless rustup honoured rust-toolchain.toml's `targets`).
fn ensure_target(target: &str) {
    if target_installed(target) {
        return;
    }
    println!("cargo:warning=installing the {target} Rust target with rustup");
    let mut rustup = Command::new("rustup");
    rustup.args(["target", "add", target]);
    if let Ok(toolchain) = env::var("RUSTUP_TOOLCHAIN") {
        rustup.args(["--toolchain", &toolchain]);
    }
    let installed = rustup.status().map(|s| s.success()).unwrap_or(false);
    if !installed || !target_installed(target) {
        fail(&format!(
            "the Rust target {target} is missing and `rustup target add {target}` failed; \
             install it by hand (it is listed in rust-toolchain.toml)"
        ));
    }
}

/// A target dir shared by every profile of the outer build (`<target>/<profile>/build/<pkg>/out`
/// → `<target>/quiver-guests`), so `cargo test`, `cargo build --release` and clippy do not
/// each rebuild the guests. The nested build is always `--release`.
fn nested_target_dir(out_dir: &Path) -> PathBuf {
    let build_dir = out_dir
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "build"));
    match build_dir.and_then(Path::parent).and_then(Path::parent) {
        Some(target) => target.join("quiver-guests"),
        None => out_dir.join("guests-target"),
    }
}

fn cargo_build(manifest: &Path, target_dir: &Path, target: &str, selection: &[&str]) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target")
        .arg(target)
        .arg("--target-dir")
        .arg(target_dir)
        .args(selection);
    for name in STRIPPED_ENV {
        command.env_remove(name);
    }
    // The outer cargo's RUSTC is the pinned toolchain's compiler; keep it (and CARGO_HOME,
    // which is inherited) so the nested build uses the same toolchain and registry cache.
    command.env("RUSTC", rustc());
    let status = command
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run cargo for the guests: {e}")));
    if !status.success() {
        fail(&format!(
            "building the guest plugins for {target} failed ({status}); see the output above, \
             or run: cargo build --release --locked --manifest-path {} --target {target}",
            manifest.display()
        ));
    }
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", path.display())))
}

/// Wraps a core module built with wit-bindgen (which embeds the world it implements in a
/// custom section) into a component. No WASI adapter: these modules import nothing.
fn componentize(stem: &str, core: &[u8]) -> Vec<u8> {
    let mut encoder = wit_component::ComponentEncoder::default();
    let encoded = match encoder.module(core) {
        Ok(encoder) => encoder.validate(true).encode(),
        Err(e) => Err(e),
    };
    encoded.unwrap_or_else(|e| fail(&format!("cannot componentize {stem}: {e:#}")))
}

fn publish(out_dir: &Path, stem: &str, var: &str, bytes: &[u8]) {
    let path = out_dir.join(format!("{stem}.wasm"));
    fs::write(&path, bytes)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
    println!("cargo:rustc-env={var}={}", path.display());
}
