//! Reconciler calls as effects: the node machine asks its driver to run a bucket's plugin
//! (`Effect::Plugin`) and goes on in `on_plugin_done` — server-side updates (one per key at
//! a time, read again when a write lands meanwhile), reads that merge siblings and write
//! the merge back, and the sibling guard.

use std::sync::Arc;

use quiver_core::meta::{BucketEntry, BucketSpec, PluginRef, Stamp};
use quiver_core::ring::ClaimParams;
use quiver_node_core::SystemClock;
use quiver_node_core::membership::first_membership;
use quiver_node_core::node::{Durability, Effect, Node, PluginError, PluginOutput, PluginWork};
use quiver_sdk::wire::{ErrorCode, ReadOptions, Request, Response, WireSibling, WriteOptions};

const BUCKET: &str = "carts";

mod support;

use support::{TestDisk, node_config};

fn plugin() -> PluginRef {
    PluginRef {
        name: "cart".into(),
        hash: "ab".repeat(32),
    }
}

/// One node, n = r = w = 1, bucket `carts` reconciled by `cart` (guard past `threshold`).
fn node(threshold: u32) -> Node<TestDisk> {
    let mut cfg = node_config(1, 1, 1);
    cfg.durability = Durability::Buffered;
    let params = ClaimParams {
        partitions: 8,
        n_val: 1,
    };
    let (mut meta, _) =
        first_membership([("a".to_string(), "a:1".to_string())], params).expect("membership");
    let spec = BucketSpec {
        reconciler: Some(plugin()),
        sibling_threshold: Some(threshold),
        ..BucketSpec::default()
    };
    meta.buckets.insert(
        BUCKET.into(),
        BucketEntry {
            spec,
            stamp: Stamp::zero(),
        },
    );
    // Syncs inline, so these tests see the plugin steps alone.
    let disk = TestDisk::new(false);
    Node::boot("a", &meta, cfg, disk, Arc::new(SystemClock), 0, 0).expect("boots")
}

fn update(op: &str) -> Request {
    Request::Update {
        bucket: BUCKET.into(),
        key: b"k".to_vec(),
        op: op.as_bytes().to_vec(),
        options: WriteOptions::default(),
    }
}

fn put(value: &str) -> Request {
    Request::Put {
        bucket: BUCKET.into(),
        key: b"k".to_vec(),
        value: value.as_bytes().to_vec(),
        context: Vec::new(),
        options: WriteOptions::default(),
    }
}

fn get(raw: bool) -> Request {
    Request::Get {
        bucket: BUCKET.into(),
        key: b"k".to_vec(),
        options: ReadOptions {
            raw,
            ..ReadOptions::default()
        },
    }
}

/// The plugin calls among `fx`.
fn calls(fx: &[Effect]) -> Vec<(u64, PluginWork)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Plugin {
                call,
                work,
                plugin: p,
                bucket,
            } => {
                assert_eq!((p, bucket.as_str()), (&plugin(), BUCKET));
                Some((*call, work.clone()))
            }
            _ => None,
        })
        .collect()
}

/// The one plugin call among `fx`.
fn one_call(fx: &[Effect]) -> (u64, PluginWork) {
    let mut all = calls(fx);
    assert_eq!(all.len(), 1, "expected one plugin call: {fx:?}");
    all.remove(0)
}

fn reply(fx: &[Effect], ticket: u64) -> Option<Response> {
    fx.iter().find_map(|e| match e {
        Effect::Reply { ticket: t, result } if *t == ticket => Some(result.clone()),
        _ => None,
    })
}

fn values(response: &Response) -> Vec<Vec<u8>> {
    match response {
        Response::Get { siblings, .. } => {
            let mut v: Vec<Vec<u8>> = siblings.iter().map(|s| s.value.clone()).collect();
            v.sort();
            v
        }
        other => panic!("not a read: {other:?}"),
    }
}

#[test]
fn an_update_runs_the_reconciler_and_writes_what_it_returns() {
    let mut n = node(64);
    let fx = n.on_client(1, 1, update("add:apple"));
    assert!(
        reply(&fx, 1).is_none(),
        "answered before the plugin ran: {fx:?}"
    );
    let (call, work) = one_call(&fx);
    let PluginWork::Update { seen, op, actor } = work else {
        panic!("not an update: {fx:?}")
    };
    assert!(seen.siblings().is_empty());
    assert_eq!(op, b"add:apple");
    assert!(actor.starts_with("a/"), "{actor}");
    let fx = n.on_plugin_done(2, call, Ok(PluginOutput::Updated(b"[apple]".to_vec())));
    assert!(
        matches!(reply(&fx, 1), Some(Response::Written { .. })),
        "{fx:?}"
    );
    let fx = n.on_client(3, 2, get(false));
    assert_eq!(
        values(&reply(&fx, 2).expect("read")),
        vec![b"[apple]".to_vec()]
    );
}

#[test]
fn updates_of_one_key_run_one_at_a_time_and_read_again_after_a_write() {
    let mut n = node(64);
    let fx = n.on_client(1, 1, update("add:apple"));
    let (first, _) = calls(&fx)[0].clone();
    // A second update of the key waits for the first.
    let fx = n.on_client(2, 2, update("add:pear"));
    assert!(
        calls(&fx).is_empty(),
        "two updates of one key at once: {fx:?}"
    );
    // A put lands while the first update's plugin runs: it reads again.
    let fx = n.on_client(3, 3, put("[fig]"));
    assert!(matches!(reply(&fx, 3), Some(Response::Written { .. })));
    let fx = n.on_plugin_done(4, first, Ok(PluginOutput::Updated(b"[apple]".to_vec())));
    let (again, work) = one_call(&fx);
    let PluginWork::Update { seen, .. } = work else {
        panic!("not an update: {fx:?}")
    };
    assert_eq!(seen.siblings().len(), 1, "the retry sees the put");
    let fx = n.on_plugin_done(5, again, Ok(PluginOutput::Updated(b"[apple,fig]".to_vec())));
    assert!(matches!(reply(&fx, 1), Some(Response::Written { .. })));
    // Now the second update starts, on what the first wrote.
    let (second, work) = one_call(&fx);
    let PluginWork::Update { seen, op, .. } = work else {
        panic!("not an update: {fx:?}")
    };
    assert_eq!(op, b"add:pear");
    assert_eq!(seen.siblings()[0].value, b"[apple,fig]");
    let fx = n.on_plugin_done(
        6,
        second,
        Ok(PluginOutput::Updated(b"[apple,fig,pear]".to_vec())),
    );
    assert!(matches!(reply(&fx, 2), Some(Response::Written { .. })));
}

#[test]
fn a_read_merges_siblings_and_writes_the_merge_back() {
    let mut n = node(64);
    for (t, v) in [(1, "[apple]"), (2, "[pear]")] {
        let fx = n.on_client(t, t, put(v));
        assert!(matches!(reply(&fx, t), Some(Response::Written { .. })));
    }
    let fx = n.on_client(3, 3, get(false));
    let (call, work) = one_call(&fx);
    let PluginWork::Merge(object) = work else {
        panic!("not a merge: {fx:?}")
    };
    assert_eq!(object.siblings().len(), 2);
    let fx = n.on_plugin_done(4, call, Ok(PluginOutput::Value(b"[apple,pear]".to_vec())));
    match reply(&fx, 3) {
        Some(Response::Get { siblings, context }) => {
            let [WireSibling { value, actor, .. }] = siblings.as_slice() else {
                panic!("{siblings:?}")
            };
            assert_eq!(value, b"[apple,pear]");
            assert_eq!(actor, &format!("reconciled by {}", plugin()));
            assert!(!context.is_empty());
        }
        other => panic!("expected the merge, got {other:?}"),
    }
    // Written back: the stored state is the merge alone.
    let fx = n.on_client(5, 5, get(true));
    assert_eq!(
        values(&reply(&fx, 5).expect("raw read")),
        vec![b"[apple,pear]".to_vec()]
    );
}

#[test]
fn a_read_whose_plugin_fails_says_so_and_one_not_loaded_answers_the_siblings() {
    let mut n = node(64);
    for t in [1, 2] {
        n.on_client(t, t, put(&format!("[v{t}]")));
    }
    let fx = n.on_client(3, 3, get(false));
    let (call, _) = calls(&fx)[0].clone();
    let fx = n.on_plugin_done(
        4,
        call,
        Err(PluginError::Failed("cart: out of fuel".into())),
    );
    match reply(&fx, 3) {
        Some(Response::Error(e)) => {
            assert_eq!(e.code, ErrorCode::PluginFailed);
            assert!(e.message.contains("out of fuel"), "{}", e.message);
        }
        other => panic!("expected the plugin's failure, got {other:?}"),
    }
    let fx = n.on_client(5, 5, get(false));
    let (call, _) = calls(&fx)[0].clone();
    let fx = n.on_plugin_done(6, call, Err(PluginError::NotLoaded));
    assert_eq!(values(&reply(&fx, 5).expect("read")).len(), 2);
    // A raw read never asks the plugin.
    let fx = n.on_client(7, 7, get(true));
    assert!(calls(&fx).is_empty());
}

#[test]
fn a_write_past_the_sibling_threshold_is_merged_before_it_is_answered() {
    let mut n = node(2);
    for t in [1, 2] {
        let fx = n.on_client(t, t, put(&format!("[v{t}]")));
        assert!(calls(&fx).is_empty());
    }
    // The third sibling passes the threshold of 2.
    let fx = n.on_client(3, 3, put("[v3]"));
    assert!(reply(&fx, 3).is_none(), "answered before the guard: {fx:?}");
    let (call, work) = one_call(&fx);
    let PluginWork::Merge(object) = work else {
        panic!("not a merge: {fx:?}")
    };
    assert_eq!(object.siblings().len(), 3);
    let fx = n.on_plugin_done(4, call, Ok(PluginOutput::Value(b"[v1,v2,v3]".to_vec())));
    assert!(
        matches!(reply(&fx, 3), Some(Response::Written { .. })),
        "{fx:?}"
    );
    let fx = n.on_client(5, 5, get(true));
    assert_eq!(
        values(&reply(&fx, 5).expect("raw read")),
        vec![b"[v1,v2,v3]".to_vec()]
    );
}

#[test]
fn an_update_on_a_bucket_without_reconciler_is_refused() {
    let mut n = node(64);
    let fx = n.on_client(
        1,
        1,
        Request::Update {
            bucket: "plain".into(),
            key: b"k".to_vec(),
            op: b"x".to_vec(),
            options: WriteOptions::default(),
        },
    );
    match reply(&fx, 1) {
        Some(Response::Error(e)) => assert_eq!(e.code, ErrorCode::NoReconciler),
        other => panic!("expected no reconciler, got {other:?}"),
    }
}
