//! The `quiver` command line against a real node: JSON output shapes, stdin and file
//! values, contexts round-tripping through the shell, and one-line errors.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use support::{NodeProc, quiver_bin};

fn quiver(node: &NodeProc, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(quiver_bin());
    cmd.args(args)
        .env("QUIVER_CLUSTER", node.addr.to_string())
        .env("QUIVER_CA", node.data_dir.join("ca.pem"))
        .env("QUIVER_KEY", node.admin_key().reveal())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn quiver");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    }
    child.wait_with_output().expect("quiver exits")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "quiver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

#[test]
fn json_output_and_contexts_round_trip_through_the_cli() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = NodeProc::start(dir.path(), &[]);

    let put = json(&quiver(
        &node,
        &["put", "b", "k", "hello", "--output", "json"],
        None,
    ));
    assert!(put["context"].as_str().is_some_and(|c| !c.is_empty()));
    json(&quiver(
        &node,
        &["put", "b", "k", "-", "--output", "json"],
        Some(b"from stdin"),
    ));
    let file = dir.path().join("value.bin");
    std::fs::write(&file, [0xffu8, 0x00, 0x80]).expect("write value file");
    json(&quiver(
        &node,
        &[
            "put",
            "b",
            "k",
            "--file",
            file.to_str().expect("utf-8 path"),
            "--output",
            "json",
        ],
        None,
    ));

    let got = json(&quiver(&node, &["get", "b", "k", "--output", "json"], None));
    assert_eq!(got["found"], true);
    let siblings = got["siblings"].as_array().expect("siblings array");
    assert_eq!(siblings.len(), 3);
    let texts: Vec<_> = siblings.iter().map(|s| s["value"].clone()).collect();
    assert!(texts.contains(&serde_json::json!("hello")));
    assert!(texts.contains(&serde_json::json!("from stdin")));
    assert!(
        texts.contains(&serde_json::Value::Null),
        "binary value has no text form"
    );
    assert!(siblings.iter().any(|s| s["value_base64"] == "/wCA"));
    for s in siblings {
        assert_eq!(s["tombstone"], false);
        assert!(s["timestamp_ms"].as_u64().is_some_and(|t| t > 0));
        assert!(s["actor"].as_str().is_some_and(|a| a.starts_with("n1/")));
    }

    let ctx = got["context"].as_str().expect("context string").to_string();
    json(&quiver(
        &node,
        &[
            "put",
            "b",
            "k",
            "merged",
            "--context",
            &ctx,
            "--output",
            "json",
        ],
        None,
    ));
    let got = json(&quiver(&node, &["get", "b", "k", "--output", "json"], None));
    assert_eq!(got["siblings"].as_array().expect("array").len(), 1);
    assert_eq!(got["siblings"][0]["value"], "merged");

    let ctx = got["context"].as_str().expect("context").to_string();
    json(&quiver(
        &node,
        &["delete", "b", "k", "--context", &ctx, "--output", "json"],
        None,
    ));
    let got = json(&quiver(&node, &["get", "b", "k", "--output", "json"], None));
    assert_eq!(got["found"], false);

    // Human output is plain text.
    let out = quiver(&node, &["get", "b", "nothing"], None);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("not found"));
}

#[test]
fn errors_are_one_line_with_a_nonzero_exit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = NodeProc::start(dir.path(), &[]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["put", "b", "", "v"], "EmptyKey"),
        (vec!["put", "b", "k", "v", "--context", "!!!"], "context"),
        (
            vec!["put", "b", "k", "v", "--context", "AAAA"],
            "InvalidContext",
        ),
        (vec!["put", "b", "k"], "give a value"),
        (
            vec!["get", "b", "k", "--ca", "/nonexistent/ca.pem"],
            "cannot read the cluster CA",
        ),
    ];
    for (args, needle) in cases {
        let out = quiver(&node, &args, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: one line, got {stderr:?}"
        );
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} should mention {needle}"
        );
    }
    // Server config errors are one line too.
    let out = Command::new(quiver_bin())
        .args(["server", "--node-id", "bad id", "--data-dir"])
        .arg(dir.path().join("other"))
        .output()
        .expect("run quiver server");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("node_id"));
}

#[test]
fn server_reads_its_settings_from_a_config_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let config = dir.path().join("quiver.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nnode_id = \"from-file\"\ndurability = \"buffered\"\nengine = \"memory\"\n",
            data.to_str().expect("utf-8 path")
        ),
    )
    .expect("write config");
    let mut child = Command::new(quiver_bin())
        .args(["server", "--config"])
        .arg(&config)
        .env("QUIVER_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("readiness line");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.contains("quiver node from-file listening on 127.0.0.1:"),
        "{line:?}"
    );
    assert!(
        data.join("ca.pem").exists(),
        "the CA is written into the configured data_dir"
    );

    // An unknown key in the file is a one-line error naming it.
    std::fs::write(&config, "listen_address = \"127.0.0.1:0\"\n").expect("write config");
    let out = Command::new(quiver_bin())
        .args(["server", "--config"])
        .arg(&config)
        .output()
        .expect("run server");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_address"));
}

#[test]
fn dev_starts_a_local_cluster_and_stops_it_gracefully() {
    /// Stops `quiver dev` (and so its nodes) with SIGTERM if the test fails half-way, so a
    /// failure never leaves servers holding the ports of the next run.
    struct StopOnDrop(Option<std::process::Child>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            if let Some(mut child) = self.0.take() {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let _ = child.wait();
            }
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut dev = StopOnDrop(Some(
        Command::new(quiver_bin())
            .args(["dev", "--nodes", "3", "--base-port", "17470", "--dir"])
            .arg(dir.path())
            .env("QUIVER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn quiver dev"),
    ));
    let child = dev.0.as_mut().expect("running");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        child.stdout.take().expect("stdout"),
    ));
    let cluster = lines.next().expect("a line").expect("utf-8");
    let ca = lines.next().expect("a line").expect("utf-8");
    assert_eq!(
        cluster,
        "export QUIVER_CLUSTER=127.0.0.1:17470,127.0.0.1:17471,127.0.0.1:17472"
    );
    let ca_path = ca.strip_prefix("export QUIVER_CA=").expect("CA line");
    let key_line = lines.next().expect("a line").expect("utf-8");
    let key = key_line
        .strip_prefix("export QUIVER_KEY=")
        .expect("key line")
        .to_string();
    // Without the key, nothing but a ping is served.
    let out = Command::new(quiver_bin())
        .args(["get", "dev", "k0"])
        .env("QUIVER_CLUSTER", "127.0.0.1:17470")
        .env("QUIVER_CA", ca_path)
        .env_remove("QUIVER_KEY")
        .output()
        .expect("run get");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, port) in [17470, 17471, 17472].iter().enumerate() {
        let out = Command::new(quiver_bin())
            .args([
                "put",
                "dev",
                &format!("k{i}"),
                "v",
                "--w",
                "3",
                "--output",
                "json",
            ])
            .env("QUIVER_CLUSTER", format!("127.0.0.1:{port}"))
            .env("QUIVER_CA", ca_path)
            .env("QUIVER_KEY", &key)
            .output()
            .expect("run put");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(quiver_bin())
        .args(["get", "dev", "k0", "--r", "3", "--output", "json"])
        .env("QUIVER_CLUSTER", "127.0.0.1:17472")
        .env("QUIVER_CA", ca_path)
        .env("QUIVER_KEY", &key)
        .output()
        .expect("run get");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(got["siblings"][0]["value"], "v");

    // The ring: 3 members share the default 1024 partitions, each holds a replica of every one (n=3).
    let out = Command::new(quiver_bin())
        .args(["cluster", "ring", "--partitions", "--output", "json"])
        .env("QUIVER_CLUSTER", "127.0.0.1:17471")
        .env("QUIVER_CA", ca_path)
        .env("QUIVER_KEY", &key)
        .output()
        .expect("run cluster ring");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ring: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(ring["partitions"], 1024);
    let members = ring["members"].as_array().expect("members");
    assert_eq!(members.len(), 3);
    let owned: u64 = members
        .iter()
        .map(|m| m["owned"].as_u64().expect("owned"))
        .sum();
    assert_eq!(owned, 1024);
    assert!(
        members
            .iter()
            .all(|m| m["replicas"] == 1024 && m["addr"] != "")
    );
    let lists = ring["preference_lists"].as_array().expect("lists");
    assert_eq!(lists.len(), 1024);
    assert!(
        lists
            .iter()
            .all(|l| l["primaries"].as_array().map(Vec::len) == Some(3))
    );

    let mut child = dev.0.take().expect("running");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    assert!(
        child.wait().expect("dev exits").success(),
        "dev stops its nodes and exits 0"
    );
}

/// A user starts a plugin with one command, builds it with the printed steps, and the
/// result validates: `plugin new`, cargo for wasm32-unknown-unknown, `plugin componentize`,
/// `plugin validate`; and `validate` rejects a plugin that breaks the laws.
#[test]
fn a_new_plugin_builds_componentizes_and_validates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |args: &[&str]| {
        Command::new(quiver_bin())
            .args(args)
            .output()
            .expect("run quiver")
    };
    let out = run(&[
        "plugin",
        "new",
        "myplug",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let project = dir.path().join("myplug");
    assert!(project.join("wit/quiver-plugin.wit").is_file());
    let again = run(&[
        "plugin",
        "new",
        "myplug",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    assert!(!again.status.success(), "refuses to overwrite");
    let bad = run(&["plugin", "new", "My Plug"]);
    assert!(!bad.status.success(), "refuses a bad name");

    // The build the README prescribes, in a target dir of its own.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-unknown-unknown"])
        .current_dir(&project)
        .env("CARGO_TARGET_DIR", project.join("target"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("run cargo");
    assert!(
        build.status.success(),
        "the new plugin builds: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    let core = project.join("target/wasm32-unknown-unknown/release/myplug.wasm");
    let component = dir.path().join("myplug.wasm");
    let out = run(&[
        "plugin",
        "componentize",
        &core.display().to_string(),
        "-o",
        &component.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["plugin", "validate", &component.display().to_string()]);
    assert!(
        out.status.success(),
        "the template obeys the laws: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let garbage = quiver_guests::fixture_garbage().display().to_string();
    let out = run(&["plugin", "validate", &garbage]);
    assert!(!out.status.success(), "a law breaker fails validation");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("commutative"),
        "names the broken law: {stdout}"
    );
}

/// `quiver key`: a key created with a grant prints its secret once, works for its bucket
/// only, is listed without its secret, and stops working once deleted.
#[test]
fn access_keys_are_created_used_listed_and_deleted_from_the_cli() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = NodeProc::start(dir.path(), &["--engine", "memory"]);
    let created = json(&quiver(
        &node,
        &[
            "key",
            "create",
            "shop",
            "--allow",
            "carts:readwrite",
            "--output",
            "json",
        ],
        None,
    ));
    assert_eq!(created["name"], "shop");
    let secret = created["secret"].as_str().expect("secret").to_string();
    assert!(secret.starts_with("shop."), "{secret}");
    let as_shop = |args: &[&str]| {
        Command::new(quiver_bin())
            .args(args)
            .env("QUIVER_CLUSTER", node.addr.to_string())
            .env("QUIVER_CA", node.data_dir.join("ca.pem"))
            .env("QUIVER_KEY", &secret)
            .output()
            .expect("run quiver")
    };
    assert!(
        as_shop(&["put", "carts", "alice", "apple"])
            .status
            .success()
    );
    let refused = as_shop(&["put", "other", "k", "v"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("Forbidden") && stderr.contains("\"other\""),
        "{stderr}"
    );
    assert!(
        !as_shop(&["key", "list"]).status.success(),
        "keys need an admin key"
    );

    let listed = json(&quiver(&node, &["key", "list", "--output", "json"], None));
    let text = listed.to_string();
    assert!(
        text.contains("\"shop\"") && text.contains("carts:readwrite"),
        "{text}"
    );
    assert!(
        !text.contains(&secret[5..]),
        "a listing never shows a secret"
    );
    let shown = json(&quiver(
        &node,
        &["key", "show", "shop", "--output", "json"],
        None,
    ));
    assert_eq!(shown["grants"][0], "carts:readwrite");

    json(&quiver(
        &node,
        &["key", "delete", "shop", "--output", "json"],
        None,
    ));
    let after = as_shop(&["get", "carts", "alice"]);
    assert!(!after.status.success());
    assert!(
        String::from_utf8_lossy(&after.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    // A malformed key is a one-line error that does not echo it.
    let bad = Command::new(quiver_bin())
        .args(["get", "carts", "alice"])
        .env("QUIVER_CLUSTER", node.addr.to_string())
        .env("QUIVER_CA", node.data_dir.join("ca.pem"))
        .env("QUIVER_KEY", "not-a-key-secretvalue")
        .output()
        .expect("run quiver");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("malformed access key"),
        "{stderr}"
    );
    assert!(!stderr.contains("secretvalue"), "{stderr}");
}
