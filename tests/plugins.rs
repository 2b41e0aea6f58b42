//! Reconciler plugins on a real 3-node cluster over QUIC (127.0.19.x and 127.0.20.x):
//! upload, attach, merge on read across coordinators and a killed node, remove semantics,
//! server-side updates, a live version switch, and hostile plugins contained.
//!
//! Background work is awaited by polling for its effect; no test sleeps a guessed time.

mod support;

use quiver_core::meta::BucketSpec;
use quiver_sdk::{Client, Error, ErrorCode, ReadOptions, WriteOptions};
use serde_json::{Value, json};
use support::{ClusterProc, eventually};

fn w(n: u8) -> WriteOptions {
    WriteOptions {
        w: Some(n),
        ..Default::default()
    }
}

fn raw() -> ReadOptions {
    ReadOptions {
        raw: true,
        ..Default::default()
    }
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The same component with a custom section appended: another version (another hash)
/// with identical behaviour.
fn another_version(component: &[u8]) -> Vec<u8> {
    let name = b"quiver-test-version";
    let payload = b"2";
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name);
    section.extend_from_slice(payload);
    let mut out = component.to_vec();
    out.push(0); // custom section id
    out.push(section.len() as u8); // LEB128 size (< 128)
    out.extend_from_slice(&section);
    out
}

/// The visible items of a cart state (items with a tag that is not removed).
fn items(state: &[u8]) -> Vec<String> {
    let v: Value = serde_json::from_slice(state).expect("cart JSON");
    let mut out: Vec<String> = v
        .get("adds")
        .and_then(Value::as_object)
        .map(|adds| {
            adds.iter()
                .filter(|(_, tags)| tags.as_array().is_some_and(|t| !t.is_empty()))
                .map(|(item, _)| item.clone())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// One merged cart from a get.
async fn cart(client: &Client, key: &str) -> Vec<String> {
    let got = client.get("carts", key).await.expect("get cart");
    assert_eq!(got.siblings.len(), 1, "one merged cart: {got:?}");
    items(&got.siblings[0].value)
}

async fn update(client: &Client, key: &str, op: Value, opts: &WriteOptions) {
    client
        .update("carts", key, op.to_string().into_bytes(), opts)
        .await
        .unwrap_or_else(|e| panic!("update {op}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cart_merges_concurrent_adds_and_removes_across_coordinators_and_a_killed_node() {
    let mut c = ClusterProc::start(19, 3, &["--peer-timeout-ms", "2000"]);
    let n1 = c.client(0).await;
    let up = n1
        .plugin_upload("cart", read(quiver_guests::cart()), false)
        .await
        .expect("upload cart");
    assert!(up.violations.is_empty());
    assert_eq!(up.replicated_to, vec!["n1", "n2", "n3"]);
    let n2 = c.client(1).await;
    let info = n2
        .bucket_set("carts", BucketSpec::default(), Some("cart"), false)
        .await
        .expect("attach cart");
    assert_eq!(
        info.spec.reconciler.as_ref().map(|p| p.hash.clone()),
        Some(up.plugin.plugin.hash.clone())
    );
    let n3 = c.client(2).await;
    for client in [&n1, &n2, &n3] {
        eventually("every node to load the reconciler", || async {
            client
                .bucket_show("carts")
                .await
                .is_ok_and(|b| b.reconciler_loaded)
        })
        .await;
    }

    // Concurrent writers with no context on different coordinators: siblings, which a read
    // merges into one cart.
    n1.put(
        "carts",
        "c1",
        json!({"adds": {"apple": ["w1:1"]}})
            .to_string()
            .into_bytes(),
        None,
    )
    .await
    .expect("put on n1");
    n2.put(
        "carts",
        "c1",
        json!({"adds": {"pear": ["w2:1"]}}).to_string().into_bytes(),
        None,
    )
    .await
    .expect("put on n2");
    let stored = n3.get_with("carts", "c1", &raw()).await.expect("raw get");
    assert_eq!(
        stored.siblings.len(),
        2,
        "two siblings before a read merges them"
    );
    assert_eq!(cart(&n3, "c1").await, ["apple", "pear"]);
    // The merge was written back: the siblings are gone.
    let stored = n1.get_with("carts", "c1", &raw()).await.expect("raw get");
    assert_eq!(stored.siblings.len(), 1, "write-back replaced the siblings");

    // Removes are honoured: remove apple on n1 while n2 concurrently adds kiwi (both from
    // the same read): apple stays removed, kiwi arrives.
    let base = n1.get("carts", "c1").await.expect("get");
    let state: Value = serde_json::from_slice(&base.siblings[0].value).expect("json");
    let mut removed = state.clone();
    let tags = removed["adds"]["apple"].take();
    removed["adds"]
        .as_object_mut()
        .expect("adds")
        .remove("apple");
    removed["removed"] = json!({ "apple": tags });
    let mut added = state.clone();
    added["adds"]["kiwi"] = json!(["w2:2"]);
    n1.put(
        "carts",
        "c1",
        removed.to_string().into_bytes(),
        Some(&base.context),
    )
    .await
    .expect("remove apple");
    n2.put(
        "carts",
        "c1",
        added.to_string().into_bytes(),
        Some(&base.context),
    )
    .await
    .expect("add kiwi");
    assert_eq!(cart(&n3, "c1").await, ["kiwi", "pear"]);

    // Server-side updates from every coordinator, then with a node killed: nothing lost.
    update(&n1, "c2", json!({"add": "milk"}), &WriteOptions::default()).await;
    update(&n2, "c2", json!({"add": "eggs"}), &WriteOptions::default()).await;
    update(
        &n3,
        "c2",
        json!({"remove": "milk"}),
        &WriteOptions::default(),
    )
    .await;
    c.kill9(2);
    update(&n1, "c2", json!({"add": "bread"}), &w(2)).await;
    update(&n2, "c2", json!({"add": "milk"}), &w(2)).await;
    c.restart(2);
    let n3 = c.client(2).await;
    eventually("the restarted node to serve the full cart", || async {
        let got = n3
            .get_with(
                "carts",
                "c2",
                &ReadOptions {
                    r: Some(3),
                    ..Default::default()
                },
            )
            .await;
        got.is_ok_and(|g| {
            g.siblings.len() == 1 && items(&g.siblings[0].value) == ["bread", "eggs", "milk"]
        })
    })
    .await;

    // Switch the bucket to another version live while a client keeps writing and reading.
    let v2 = another_version(&read(quiver_guests::cart()));
    let up2 = n1
        .plugin_upload("cart", v2, false)
        .await
        .expect("upload v2");
    assert_ne!(up2.plugin.plugin.hash, up.plugin.plugin.hash);
    let writer = {
        let client = c.client(1).await;
        tokio::spawn(async move {
            for i in 0..40 {
                update(
                    &client,
                    "c3",
                    json!({ "add": format!("item{i}") }),
                    &WriteOptions::default(),
                )
                .await;
                let got = client
                    .get("carts", "c3")
                    .await
                    .expect("get during the switch");
                assert_eq!(got.siblings.len(), 1);
            }
        })
    };
    let prefix = format!("cart@{}", &up2.plugin.plugin.hash[..12]);
    let info = n1
        .bucket_set("carts", BucketSpec::default(), Some(&prefix), false)
        .await
        .expect("switch version");
    assert_eq!(
        info.spec.reconciler.map(|p| p.hash),
        Some(up2.plugin.plugin.hash.clone())
    );
    writer
        .await
        .expect("the writer kept working through the switch");
    for i in 0..3 {
        let client = c.client(i).await;
        eventually("every node to run the new version", || async {
            client.bucket_show("carts").await.is_ok_and(|b| {
                b.reconciler_loaded
                    && b.spec.reconciler.as_ref().map(|p| p.hash.as_str())
                        == Some(up2.plugin.plugin.hash.as_str())
            })
        })
        .await;
    }
    assert_eq!(cart(&n2, "c3").await.len(), 40);
    let listing = n3.plugin_show("cart").await.expect("plugin show");
    assert_eq!(listing.versions.len(), 2);
}

fn code(e: &Error) -> Option<ErrorCode> {
    e.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_refused_or_contained() {
    let c = ClusterProc::start(20, 3, &["--peer-timeout-ms", "2000"]);
    let n1 = c.client(0).await;
    // Refused at upload: not a component, imports the filesystem, breaks the laws.
    for (name, path) in [
        ("core-module", quiver_guests::fixture_not_a_component()),
        ("fs", quiver_guests::fixture_fs()),
        ("garbage", quiver_guests::fixture_garbage()),
    ] {
        let err = n1
            .plugin_upload(name, read(path), false)
            .await
            .expect_err(name);
        assert_eq!(code(&err), Some(ErrorCode::PluginRejected), "{name}: {err}");
    }
    let err = n1
        .plugin_upload("bad name!", read(quiver_guests::lww()), false)
        .await
        .expect_err("bad name");
    assert_eq!(code(&err), Some(ErrorCode::PluginRejected));
    // Contained at call time: uploaded with --force, attached, then a read of siblings
    // fails with the plugin named, the siblings stay intact, the node keeps serving.
    for (name, path) in [
        ("loop", quiver_guests::fixture_loop()),
        ("alloc", quiver_guests::fixture_alloc()),
        ("trap", quiver_guests::fixture_trap()),
        ("huge", quiver_guests::fixture_huge()),
    ] {
        n1.plugin_upload(name, read(path), true)
            .await
            .unwrap_or_else(|e| panic!("forced upload of {name}: {e}"));
        let bucket = format!("hostile-{name}");
        n1.bucket_set(&bucket, BucketSpec::default(), Some(name), false)
            .await
            .unwrap_or_else(|e| panic!("attach {name}: {e}"));
        n1.put(&bucket, "k", b"a".to_vec(), None)
            .await
            .expect("put a");
        n1.put(&bucket, "k", b"b".to_vec(), None)
            .await
            .expect("put b");
        let err = n1.get(&bucket, "k").await.expect_err(name);
        assert_eq!(code(&err), Some(ErrorCode::PluginFailed), "{name}: {err}");
        assert!(
            err.to_string().contains(name),
            "the error names the plugin: {err}"
        );
        let kept = n1.get_with(&bucket, "k", &raw()).await.expect("raw read");
        let mut values = kept.values();
        values.sort();
        assert_eq!(
            values,
            [b"a".as_slice(), b"b".as_slice()],
            "{name}: siblings intact"
        );
        n1.ping().await.expect("node alive");
    }
    // Other buckets are unaffected.
    n1.put("plain", "k", b"v".to_vec(), None)
        .await
        .expect("plain put");
    assert_eq!(
        n1.get("plain", "k").await.expect("plain get").values(),
        [b"v".as_slice()]
    );
}

// The sibling-explosion guard: past the bucket's threshold, a write is merged by the
// reconciler at once, so blind writes never pile up more siblings than the threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sibling_guard_merges_on_write_past_the_threshold() {
    let c = ClusterProc::start(21, 3, &["--peer-timeout-ms", "2000"]);
    let n1 = c.client(0).await;
    n1.plugin_upload("counter", read(quiver_guests::counter()), false)
        .await
        .expect("upload counter");
    let spec = BucketSpec {
        sibling_threshold: Some(3),
        ..BucketSpec::default()
    };
    n1.bucket_set("counts", spec, Some("counter"), false)
        .await
        .expect("attach counter");
    // Ten blind writes (no context): each would add a sibling.
    for i in 0..10u32 {
        let state = json!({ "p": { format!("writer{i}"): 1 } }).to_string();
        n1.put_with("counts", "k", state.into_bytes(), None, &w(3))
            .await
            .expect("blind write");
    }
    let stored = n1.get_with("counts", "k", &raw()).await.expect("raw get");
    assert!(
        stored.siblings.len() <= 3,
        "the guard keeps at most the threshold: {} siblings",
        stored.siblings.len()
    );
    // Nothing was lost to the early merges: the counter holds all ten increments.
    let got = n1.get("counts", "k").await.expect("get");
    let state: Value = serde_json::from_slice(&got.siblings[0].value).expect("counter JSON");
    let total: i64 = state["p"]
        .as_object()
        .map(|p| p.values().filter_map(Value::as_i64).sum())
        .unwrap_or(0);
    assert_eq!(total, 10, "every increment survives: {state}");
    // Server-side increments add up too.
    for _ in 0..5 {
        n1.update(
            "counts",
            "k",
            br#"{"add": 2}"#.to_vec(),
            &WriteOptions::default(),
        )
        .await
        .expect("increment");
    }
    let got = n1.get("counts", "k").await.expect("get");
    let state: Value = serde_json::from_slice(&got.siblings[0].value).expect("counter JSON");
    let p: i64 = state["p"]
        .as_object()
        .map(|p| p.values().filter_map(Value::as_i64).sum())
        .unwrap_or(0);
    let n: i64 = state["n"]
        .as_object()
        .map(|n| n.values().filter_map(Value::as_i64).sum())
        .unwrap_or(0);
    assert_eq!(p - n, 20);
}

/// `plugin delete NAME@HASH`: refused while a bucket uses the version, then gone from every
/// node with its bytes; the same bytes cannot come back under that name (issue 11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_version_is_deleted_everywhere_unless_a_bucket_uses_it() {
    let c = ClusterProc::start(43, 3, &["--peer-timeout-ms", "2000"]);
    let n1 = c.client(0).await;
    let lww = read(quiver_guests::lww());
    let v1 = n1
        .plugin_upload("lww", lww.clone(), false)
        .await
        .expect("upload v1");
    let v2 = n1
        .plugin_upload("lww", another_version(&lww), false)
        .await
        .expect("upload v2");
    let v1_spec = format!("lww@{}", v1.plugin.plugin.hash);
    n1.bucket_set("regs", BucketSpec::default(), Some(&v1_spec), false)
        .await
        .expect("attach v1");
    let err = n1.plugin_delete(&v1_spec).await.expect_err("in use");
    assert_eq!(code(&err), Some(ErrorCode::PluginInUse), "{err}");
    let err = n1.plugin_delete("lww").await.expect_err("needs a version");
    assert_eq!(code(&err), Some(ErrorCode::UnknownPlugin), "{err}");

    n1.bucket_set("regs", BucketSpec::default(), Some("lww"), false)
        .await
        .expect("attach v2 (the latest)");
    let gone = c
        .client(1)
        .await
        .plugin_delete(&v1_spec)
        .await
        .expect("delete v1 through n2");
    assert_eq!(gone.versions.len(), 1);
    for i in 0..3 {
        let listed = c.client(i).await.plugin_show("lww").await.expect("show");
        let hashes: Vec<&str> = listed
            .versions
            .iter()
            .map(|v| v.plugin.hash.as_str())
            .collect();
        assert_eq!(hashes, vec![v2.plugin.plugin.hash.as_str()], "node {i}");
    }
    let err = n1
        .plugin_upload("lww", lww, false)
        .await
        .expect_err("deleted for good");
    assert_eq!(code(&err), Some(ErrorCode::PluginRejected), "{err}");
    // The bucket still reconciles with v2.
    n1.put("regs", "k", b"a".to_vec(), None).await.expect("put");
    n1.put("regs", "k", b"b".to_vec(), None).await.expect("put");
    assert_eq!(n1.get("regs", "k").await.expect("get").siblings.len(), 1);
}
