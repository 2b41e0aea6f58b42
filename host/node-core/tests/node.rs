//! The node machine with a disk that does not sync inline (the server's shape): whatever
//! vouches for durable data waits for `Effect::Sync` to come back through `on_synced`,
//! and a failed sync is an error answer, never an acknowledgement.

use std::sync::Arc;

use quiver_core::causality::{Coordinator, VersionVector, WriteOp, coordinate_write};
use quiver_core::meta::{BucketEntry, BucketSpec, MetaState, Stamp};
use quiver_core::ring::ClaimParams;
use quiver_node_core::SystemClock;
use quiver_node_core::membership::first_membership;
use quiver_node_core::node::{Effect, Message, Node, NodeConfig, Observation};
use quiver_node_core::protocol::{PeerRequest, PeerResponse};
use quiver_node_core::request::{DataRequest, StoreRequest};
use quiver_sdk::wire::{ErrorCode, ReadOptions, Request, Response, WireDurability, WriteOptions};

const BUCKET: &str = "carts";

mod support;

use support::{Counter, TestDisk, node_config as config};

fn boot(names: &[&str], cfg: NodeConfig) -> Node<TestDisk> {
    boot_with(names, cfg, |_| {})
}

fn boot_with(names: &[&str], cfg: NodeConfig, meta: impl FnOnce(&mut MetaState)) -> Node<TestDisk> {
    let addrs = names.iter().map(|n| (n.to_string(), format!("{n}:1")));
    let params = ClaimParams {
        partitions: 16,
        n_val: u32::try_from(cfg.quorum.n).expect("small n"),
    };
    let (mut initial, _) = first_membership(addrs, params).expect("first membership");
    meta(&mut initial);
    let disk = TestDisk::new(true);
    Node::boot(names[0], &initial, cfg, disk, Arc::new(SystemClock), 0, 0).expect("boots")
}

fn sync_store(id: u64) -> Message {
    let coordinator = Coordinator {
        node: "b".into(),
        incarnation: 1,
    };
    let (record, _) = coordinate_write(
        None,
        &coordinator,
        &mut Counter(0),
        &VersionVector::new(),
        WriteOp::Put(b"v".to_vec()),
        1,
    );
    Message::Request {
        id,
        body: PeerRequest::from(DataRequest::Store(StoreRequest {
            bucket: BUCKET.into(),
            key: b"k".to_vec(),
            object: record.object,
            hint_for: None,
            sync: true,
        })),
    }
}

fn sync_token(fx: &[Effect]) -> u64 {
    fx.iter()
        .find_map(|e| match e {
            Effect::Sync { token } => Some(*token),
            _ => None,
        })
        .expect("the node asked for a sync")
}

fn responses(fx: &[Effect]) -> Vec<&PeerResponse> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Send {
                msg: Message::Response { body, .. },
                ..
            } => Some(body),
            _ => None,
        })
        .collect()
}

#[test]
fn a_sync_store_is_acknowledged_only_after_the_sync() {
    let mut node = boot(&["a", "b"], config(2, 1, 2));
    let fx = node.on_message(1, "b", sync_store(5));
    assert!(
        responses(&fx).is_empty(),
        "answered before the sync: {fx:?}"
    );
    let token = sync_token(&fx);
    let fx = node.on_synced(2, token, Ok(()));
    assert_eq!(responses(&fx), vec![&PeerResponse::Stored]);
    // A token already answered does nothing.
    assert!(node.on_synced(3, token, Ok(())).is_empty());
}

#[test]
fn a_failed_sync_is_an_error_answer_not_an_acknowledgement() {
    let mut node = boot(&["a", "b"], config(2, 1, 2));
    let fx = node.on_message(1, "b", sync_store(5));
    let token = sync_token(&fx);
    let fx = node.on_synced(2, token, Err("disk full".into()));
    match responses(&fx).as_slice() {
        [PeerResponse::Error(e)] => {
            assert_eq!(e.code, ErrorCode::Storage);
            assert!(e.message.contains("disk full"), "{}", e.message);
        }
        other => panic!("expected one error answer, got {other:?}"),
    }
}

fn client_put(durability: WireDurability) -> Request {
    Request::Put {
        bucket: BUCKET.into(),
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        context: Vec::new(),
        options: WriteOptions {
            durability: Some(durability),
            ..WriteOptions::default()
        },
    }
}

#[test]
fn a_lone_coordinator_answers_a_sync_put_only_after_its_sync() {
    // One member, n = w = 1: nothing else vouches for the write.
    let mut node = boot(&["a"], config(1, 1, 1));
    let fx = node.on_client(1, 9, client_put(WireDurability::Sync));
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::Reply { .. })),
        "answered before the sync: {fx:?}"
    );
    // The dot is issued with the local write, before the sync.
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Observe(Observation::DotIssued { .. })))
    );
    let token = sync_token(&fx);
    let fx = node.on_synced(2, token, Ok(()));
    let reply = fx.iter().find_map(|e| match e {
        Effect::Reply { ticket: 9, result } => Some(result),
        _ => None,
    });
    assert!(
        matches!(reply, Some(Response::Written { .. })),
        "expected the write acknowledged: {fx:?}"
    );
}

#[test]
fn a_lone_coordinator_whose_sync_fails_does_not_acknowledge() {
    let mut node = boot(&["a"], config(1, 1, 1));
    let fx = node.on_client(1, 9, client_put(WireDurability::Sync));
    let token = sync_token(&fx);
    let fx = node.on_synced(2, token, Err("I/O error".into()));
    let reply = fx.iter().find_map(|e| match e {
        Effect::Reply { ticket: 9, result } => Some(result),
        _ => None,
    });
    match reply {
        Some(Response::Error(e)) => assert_eq!(e.code, ErrorCode::Storage),
        other => panic!("expected a storage error, got {other:?}"),
    }
}

#[test]
fn each_bucket_replicates_by_its_own_spec() {
    // The default is n = w = 2; bucket "solo" is set to n = w = 1 in the metadata.
    let mut node = boot_with(&["a", "b"], config(2, 1, 2), |meta| {
        let spec = BucketSpec {
            n: Some(1),
            w: Some(1),
            r: Some(1),
            ..BucketSpec::default()
        };
        let stamp = Stamp::zero();
        meta.buckets
            .insert("solo".into(), BucketEntry { spec, stamp });
    });
    assert_eq!(node.placement().buckets.get("solo"), Some(&1));
    // A key whose one replica is this node.
    let key = (0u32..)
        .map(|i| format!("k{i}").into_bytes())
        .find(|k| {
            let list = node.ring().preference_list_for_key(b"solo", k, 1);
            list.primaries.first().is_some_and(|m| m.id == "a")
        })
        .expect("some key");
    let put = |bucket: &str| Request::Put {
        bucket: bucket.into(),
        key: key.clone(),
        value: b"v".to_vec(),
        context: Vec::new(),
        options: WriteOptions {
            durability: Some(WireDurability::Sync),
            ..WriteOptions::default()
        },
    };
    let sends = |fx: &[Effect]| {
        fx.iter()
            .filter(|e| matches!(e, Effect::Send { .. }))
            .count()
    };
    // "solo": this node alone holds the key, syncs and answers; nothing goes out.
    let fx = node.on_client(1, 1, put("solo"));
    assert_eq!(sends(&fx), 0, "{fx:?}");
    let fx = node.on_synced(2, sync_token(&fx), Ok(()));
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Reply {
            ticket: 1,
            result: Response::Written { .. }
        }
    )));
    // The default bucket: the other replica gets a store (this node coordinates or
    // forwards, either way one message goes out).
    let fx = node.on_client(3, 2, put("other"));
    assert_eq!(sends(&fx), 1, "{fx:?}");
}

/// Drives `node` by time alone from `from_ms` until `until_ms`: between two of its reported
/// deadlines a tick must do nothing (so a driver that sleeps until `next_deadline` misses
/// nothing), and each deadline must lie ahead of the last tick. Returns how many ticks at a
/// deadline did something.
fn quiet_between_deadlines(node: &mut Node<TestDisk>, from_ms: u64, until_ms: u64) -> usize {
    let mut now = from_ms;
    let mut busy = 0;
    while now < until_ms {
        let deadline = node.next_deadline().expect("gossip is always scheduled");
        assert!(
            deadline >= now,
            "deadline {deadline} lies behind the last tick at {now}"
        );
        for t in now + 1..deadline.min(until_ms) {
            let fx = node.on_tick(t);
            assert!(
                fx.is_empty(),
                "tick at {t} before the deadline {deadline} did {fx:?}"
            );
        }
        now = deadline.max(now + 1);
        if !node.on_tick(now).is_empty() {
            busy += 1;
        }
    }
    busy
}

#[test]
fn nothing_falls_due_between_the_deadlines_it_reports() {
    // Three members, none of the others ever answering: stores and fetches time out,
    // peers go down, probes back off, speculation, hint delivery, gossip and handoff
    // timers all come round.
    let mut cfg = config(3, 2, 2);
    cfg.read_speculate_ms = Some(20);
    cfg.ae_every_ms = Some(700);
    cfg.tombstone_grace_ms = Some(1_000);
    let mut node = boot(&["a", "b", "c"], cfg);
    let fx = node.on_client(1, 1, client_put(WireDurability::Sync));
    assert!(!fx.is_empty());
    let get = Request::Get {
        bucket: BUCKET.into(),
        key: b"k".to_vec(),
        options: Default::default(),
    };
    let fx = node.on_client(2, 2, get);
    assert!(!fx.is_empty());
    let busy = quiet_between_deadlines(&mut node, 2, 12_000);
    assert!(busy > 10, "only {busy} deadlines did anything");
}

#[test]
fn reads_answer_heads_and_keep_to_the_response_budget() {
    let mut cfg = config(1, 1, 1);
    cfg.response_bytes_max = 300;
    let mut node = boot(&["a"], cfg);
    let put = Request::Put {
        bucket: BUCKET.into(),
        key: b"k".to_vec(),
        value: vec![7; 200],
        context: Vec::new(),
        options: WriteOptions::default(),
    };
    let fx = node.on_client(1, 1, put);
    let fx = node.on_synced(2, sync_token(&fx), Ok(()));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Reply { ticket: 1, .. }))
    );
    let get = |head: bool| Request::Get {
        bucket: BUCKET.into(),
        key: b"k".to_vec(),
        options: ReadOptions {
            head,
            ..ReadOptions::default()
        },
    };
    let reply = |fx: Vec<Effect>| {
        fx.into_iter()
            .find_map(|e| match e {
                Effect::Reply { result, .. } => Some(result),
                _ => None,
            })
            .expect("a reply")
    };
    match reply(node.on_client(3, 2, get(false))) {
        Response::Error(e) => assert_eq!(e.code, ErrorCode::ResponseTooLarge, "{}", e.message),
        other => panic!("expected the budget refused, got {other:?}"),
    }
    match reply(node.on_client(4, 3, get(true))) {
        Response::Get { siblings, context } => {
            assert_eq!(siblings.len(), 1);
            assert!(siblings[0].value.is_empty());
            assert_eq!(siblings[0].value_bytes, 200);
            assert!(!context.is_empty());
        }
        other => panic!("expected the head, got {other:?}"),
    }
}

#[test]
fn a_call_the_driver_cannot_carry_fails_at_once() {
    let mut node = boot(&["a", "b", "c"], config(3, 2, 2));
    let fx = node.on_client(1, 1, client_put(WireDurability::Buffered));
    let stores: Vec<(String, u64)> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Send {
                to,
                msg: Message::Request { id, .. },
            } => Some((to.clone(), *id)),
            _ => None,
        })
        .collect();
    assert_eq!(stores.len(), 2, "{fx:?}");
    let mut replies = Vec::new();
    for (peer, id) in &stores {
        // Long before the 300 ms deadline.
        let fx = node.on_call_failed(5, peer, *id, format!("connection to {peer} refused"));
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::Observe(Observation::PeerTimeout)))
        );
        replies.extend(fx.into_iter().filter_map(|e| match e {
            Effect::Reply { result, .. } => Some(result),
            _ => None,
        }));
    }
    match replies.as_slice() {
        [Response::Error(e)] => {
            assert_eq!(e.code, ErrorCode::QuorumFailed);
            assert!(e.message.contains("refused"), "{}", e.message);
        }
        other => panic!("expected one quorum failure, got {other:?}"),
    }
    // A call already failed is not failed twice.
    let (peer, id) = &stores[0];
    assert!(node.on_call_failed(6, peer, *id, "again".into()).is_empty());
}

#[test]
fn a_node_without_a_ring_does_not_boot() {
    let disk = TestDisk::new(true);
    let booted = Node::boot(
        "a",
        &MetaState::default(),
        config(1, 1, 1),
        disk,
        Arc::new(SystemClock),
        0,
        0,
    );
    match booted {
        Err(e) => assert!(e.to_string().contains("no ring"), "{e}"),
        Ok(_) => panic!("booted without a ring"),
    }
}

#[test]
fn a_metadata_change_made_here_takes_effect_and_goes_to_every_peer() {
    let mut node = boot(&["a", "b", "c"], config(3, 2, 2));
    let before = node.meta_generation();
    let mut change = node.meta().clone();
    let spec = BucketSpec {
        n: Some(2),
        ..BucketSpec::default()
    };
    let stamp = Stamp::at(1, "a".to_string());
    change
        .buckets
        .insert("pairs".into(), BucketEntry { spec, stamp });
    let fx = node.change_meta(1, &change);
    let pushed: Vec<&str> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Send {
                to,
                msg:
                    Message::Request {
                        body: PeerRequest::MetaPush { state, .. },
                        ..
                    },
            } if state.buckets.contains_key("pairs") => Some(to.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(pushed, vec!["b", "c"]);
    assert_eq!(node.meta_generation(), before + 1);
    assert_eq!(node.placement().buckets.get("pairs"), Some(&2));
    // The same change again changes nothing and sends nothing.
    assert!(node.change_meta(2, &change).is_empty());
    assert_eq!(node.meta_generation(), before + 1);
}

#[test]
fn a_bucket_whose_n_changes_has_its_keys_refiled() {
    let mut cfg = config(1, 1, 1);
    cfg.durability = quiver_node_core::node::Durability::Buffered;
    let mut node = boot(&["a"], cfg);
    for i in 0..10 {
        let put = Request::Put {
            bucket: "x".into(),
            key: format!("k{i}").into_bytes(),
            value: b"v".to_vec(),
            context: Vec::new(),
            options: WriteOptions::default(),
        };
        let fx = node.on_client(1, i, put);
        assert!(
            fx.iter().any(|e| matches!(e, Effect::Reply { .. })),
            "{fx:?}"
        );
    }
    let filed_under = |node: &Node<TestDisk>, n: u8| -> u64 {
        let ae = node.replica().ae();
        ae.tree_ids()
            .into_iter()
            .filter(|id| id.0 == n)
            .map(|id| ae.tree_keys(id))
            .sum()
    };
    assert_eq!(filed_under(&node, 1), 10);
    // Bucket "x" now keeps 2 replicas (of a one-node cluster: its keys file under n = 2).
    let mut change = node.meta().clone();
    let spec = BucketSpec {
        n: Some(2),
        r: Some(1),
        w: Some(1),
        ..BucketSpec::default()
    };
    let stamp = Stamp::at(1, "a".to_string());
    change
        .buckets
        .insert("x".into(), BucketEntry { spec, stamp });
    node.change_meta(2, &change);
    assert!(
        node.next_deadline().is_some_and(|d| d <= 2),
        "the refile is due at once"
    );
    node.on_tick(3);
    assert_eq!(filed_under(&node, 2), 10);
    assert_eq!(filed_under(&node, 1), 0);
}

#[test]
fn a_request_with_a_bad_bucket_or_key_is_refused_before_it_is_routed() {
    let mut node = boot(&["a", "b", "c"], config(3, 2, 2));
    let get = |bucket: &str, key: &[u8]| Request::Get {
        bucket: bucket.into(),
        key: key.to_vec(),
        options: ReadOptions::default(),
    };
    for (request, code) in [
        (get("carts", b""), ErrorCode::EmptyKey),
        (get("", b"k"), ErrorCode::InvalidBucket),
        (get("carts", &vec![b'k'; 1 << 20]), ErrorCode::KeyTooLarge),
    ] {
        let fx = node.on_client(1, 1, request);
        assert!(
            !fx.iter().any(|e| matches!(e, Effect::Send { .. })),
            "routed: {fx:?}"
        );
        match fx.as_slice() {
            [
                Effect::Reply {
                    result: Response::Error(e),
                    ..
                },
            ] => assert_eq!(e.code, code),
            other => panic!("expected {code:?}, got {other:?}"),
        }
    }
}
