//! Writes the seed corpora (`fuzz/corpus/<target>/<name>`) from real encodings of valid
//! values, so every fuzz run starts from inputs that reach deep into each decoder.
//!
//! Build it with the targets and run it (it rewrites the committed files; the encodings are
//! deterministic, so an unchanged format gives unchanged files):
//!
//!     RUSTC_BOOTSTRAP=1 cargo fuzz build --fuzz-dir fuzz --features seeds
//!     fuzz/target/x86_64-unknown-linux-gnu/release/seeds

use std::collections::BTreeMap;
use std::path::Path;

use quiver_core::access::{Grant, KeyEntry};
use quiver_core::causality::{
    ActorId, Dot, LocalRecord, Object, VersionVector, WriteOp, encode_context,
};
use quiver_core::membership::{MemberEntry, MemberState, RingEntry};
use quiver_core::merkle;
use quiver_core::meta::{BucketEntry, BucketSpec, MetaState, PluginInfo, PluginRef, Stamp};
use quiver_core::ring::{ClaimParams, Member, Ring};
use quiver_core::storage::keys;
use quiver_node_core::record::encode_record;
use quiver_node::peer::{PeerRequest, PeerResponse};
use quiver_sdk::wire::{
    ErrorCode, ErrorReply, KeyInfo, ReadOptions, Request, Response, WireDurability, WireSibling,
    WriteOptions,
};
use serde::Serialize;

fn actor(node: &str, epoch: u64) -> ActorId {
    ActorId {
        node: node.into(),
        incarnation: 0x5eed,
        epoch,
    }
}

fn dot(node: &str, epoch: u64, counter: u64) -> Dot {
    Dot {
        actor: actor(node, epoch),
        counter,
    }
}

/// A written value, two concurrent siblings, and a tombstone.
fn objects() -> Vec<Object> {
    let mut one = Object::new();
    one.apply_write(
        &VersionVector::new(),
        dot("n1", 1, 1),
        WriteOp::Put(b"v1".to_vec()),
        1000,
    );
    let mut other = Object::new();
    other.apply_write(
        &VersionVector::new(),
        dot("n2", 3, 1),
        WriteOp::Put(b"v2".to_vec()),
        1001,
    );
    let siblings = one.merge(&other);
    let mut deleted = siblings.clone();
    deleted.apply_write(
        &siblings.context().clone(),
        dot("n3", 2, 1),
        WriteOp::Delete,
        1002,
    );
    vec![one, siblings, deleted]
}

fn ring(partitions: u32, nodes: &[&str]) -> Ring {
    let members = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let m = Member::new(*n);
            if i % 2 == 0 {
                m.with_zone("z1")
            } else {
                m.with_weight(2)
            }
        })
        .collect();
    Ring::new(
        members,
        ClaimParams {
            partitions,
            n_val: 3,
        },
    )
    .expect("a valid ring")
}

fn meta() -> MetaState {
    let plugin = PluginRef {
        name: "cart".into(),
        hash: "ab".repeat(32),
    };
    let mut state = MetaState::default();
    state.buckets.insert(
        "carts".into(),
        BucketEntry {
            spec: BucketSpec {
                n: Some(3),
                r: Some(2),
                w: Some(2),
                sloppy_quorum: Some(true),
                reconciler: Some(plugin.clone()),
                sibling_threshold: Some(16),
                plugin_fuel: Some(1_000_000),
                plugin_memory_bytes: None,
                plugin_output_bytes: Some(4096),
            },
            stamp: Stamp::at(1000, "n1"),
        },
    );
    state.plugins.insert(
        plugin.clone(),
        PluginInfo {
            plugin,
            size: 12345,
            uploaded: Stamp::at(900, "n2"),
            forced: false,
        },
    );
    for (i, node) in ["n1", "n2", "n3", "n4"].iter().enumerate() {
        state.members.insert(
            (*node).into(),
            MemberEntry {
                version: i as u64,
                stamp: Stamp::at(10 + i as u64, *node),
                addr: format!("127.0.0.1:{}", 7000 + i),
                weight: 1 + i as u32 % 2,
                zone: (i % 2 == 0).then(|| "z1".to_string()),
                state: [
                    MemberState::Valid,
                    MemberState::Valid,
                    MemberState::Joining,
                    MemberState::Leaving,
                ][i],
            },
        );
    }
    state.ring = Some(RingEntry {
        ring: ring(8, &["n1", "n2", "n3"]),
        stamp: Stamp::zero(),
    });
    let grants: Vec<Grant> = ["carts:readwrite", "logs-*:read"]
        .iter()
        .map(|g| g.parse().expect("a valid grant"))
        .collect();
    state.keys.insert(
        "app".into(),
        KeyEntry::new(&[7; 32], [9; 16], false, grants, Stamp::at(50, "n1")),
    );
    state
        .keys
        .insert("old".into(), KeyEntry::tombstone(Stamp::at(60, "n2")));
    state
}

fn write_options() -> WriteOptions {
    WriteOptions {
        timeout_ms: Some(500),
        durability: Some(WireDurability::Sync),
        w: Some(2),
    }
}

fn requests(context: &[u8]) -> Vec<(&'static str, Request)> {
    let bucket = || "carts".to_string();
    vec![
        ("ping", Request::Ping),
        ("status", Request::Status),
        ("ring", Request::Ring),
        (
            "get",
            Request::Get {
                bucket: bucket(),
                key: b"k1".to_vec(),
                options: ReadOptions {
                    timeout_ms: Some(100),
                    r: Some(2),
                    raw: true,
                    head: false,
                },
            },
        ),
        (
            "put",
            Request::Put {
                bucket: bucket(),
                key: b"k1".to_vec(),
                context: context.to_vec(),
                value: b"value".to_vec(),
                options: write_options(),
            },
        ),
        (
            "delete",
            Request::Delete {
                bucket: bucket(),
                key: b"k1".to_vec(),
                context: context.to_vec(),
                options: WriteOptions::default(),
            },
        ),
        (
            "update",
            Request::Update {
                bucket: bucket(),
                key: b"k1".to_vec(),
                op: b"add:apple".to_vec(),
                options: write_options(),
            },
        ),
        (
            "plugin_upload",
            Request::PluginUpload {
                name: "cart".into(),
                component: b"\0asm\x0d\0\x01\0".to_vec(),
                force: true,
            },
        ),
        ("plugin_list", Request::PluginList),
        (
            "plugin_show",
            Request::PluginShow {
                name: "cart".into(),
            },
        ),
        (
            "bucket_set",
            Request::BucketSet {
                bucket: bucket(),
                changes: BucketSpec {
                    n: Some(3),
                    sibling_threshold: Some(8),
                    ..BucketSpec::default()
                },
                reconciler: Some("cart@abcdef".into()),
                detach_reconciler: false,
            },
        ),
        ("bucket_show", Request::BucketShow { bucket: bucket() }),
        (
            "cluster_join",
            Request::ClusterJoin {
                seed: "127.0.0.1:7000".into(),
            },
        ),
        (
            "cluster_leave",
            Request::ClusterLeave {
                node: Some("n2".into()),
            },
        ),
        ("cluster_plan", Request::ClusterPlan),
        ("cluster_commit", Request::ClusterCommit),
        (
            "authenticate",
            Request::Authenticate {
                key: "app".into(),
                secret: vec![7; 32],
            },
        ),
        (
            "key_create",
            Request::KeyCreate {
                name: "app".into(),
                admin: false,
                grants: vec!["carts:readwrite".into(), "logs-*:read".into()],
            },
        ),
        ("key_list", Request::KeyList),
        ("key_show", Request::KeyShow { name: "app".into() }),
        ("key_delete", Request::KeyDelete { name: "app".into() }),
    ]
}

fn responses(context: &[u8], ring_bytes: &[u8], object: &Object) -> Vec<(&'static str, Response)> {
    let key_info = KeyInfo {
        name: "app".into(),
        admin: false,
        grants: vec!["carts:readwrite".into()],
        created: Stamp::at(50, "n1"),
    };
    let plugin = meta().plugins.values().next().cloned().expect("one plugin");
    vec![
        (
            "pong",
            Response::Pong {
                node: "n1".into(),
                protocol: 1,
            },
        ),
        (
            "ring",
            Response::Ring {
                ring: ring_bytes.to_vec(),
                members: vec![
                    ("n1".into(), "127.0.0.1:7000".into()),
                    ("n2".into(), "127.0.0.1:7001".into()),
                ],
                n: 3,
            },
        ),
        (
            "get",
            Response::Get {
                siblings: object
                    .siblings()
                    .iter()
                    .map(|s| WireSibling {
                        value: s.value.clone(),
                        value_bytes: s.value.len() as u64,
                        tombstone: s.meta.tombstone,
                        timestamp_ms: s.meta.timestamp_ms,
                        actor: s.dot.actor.to_string(),
                    })
                    .collect(),
                context: context.to_vec(),
            },
        ),
        (
            "written",
            Response::Written {
                context: context.to_vec(),
            },
        ),
        (
            "plugins",
            Response::Plugins {
                versions: vec![plugin.clone()],
                buckets: vec![("carts".into(), plugin.plugin.clone())],
            },
        ),
        (
            "plugin_uploaded",
            Response::PluginUploaded {
                plugin: Box::new(plugin),
                violations: vec!["commutativity".into()],
                replicated_to: vec!["n1".into()],
                pending: vec!["n2".into()],
            },
        ),
        (
            "authenticated",
            Response::Authenticated {
                key: "app".into(),
                admin: true,
            },
        ),
        (
            "key_created",
            Response::KeyCreated {
                key: key_info.clone(),
                token: "app.0707".into(),
            },
        ),
        ("keys", Response::Keys(vec![key_info])),
        (
            "error",
            Response::Error(ErrorReply {
                code: ErrorCode::QuorumFailed,
                message: "2 of 3 answered".into(),
            }),
        ),
    ]
}

fn peer_requests(
    objects: &[Object],
    ring: &Ring,
    request: Request,
) -> Vec<(&'static str, PeerRequest)> {
    let data_key = |k: &[u8]| keys::data_key(b"carts", k).expect("a short bucket");
    let pairs: Vec<(Vec<u8>, Object)> = objects
        .iter()
        .enumerate()
        .map(|(i, o)| (data_key(format!("k{i}").as_bytes()), o.clone()))
        .collect();
    let digests: Vec<(Vec<u8>, merkle::Hash)> = pairs
        .iter()
        .map(|(k, o)| (k.clone(), merkle::object_digest(o)))
        .collect();
    let handoff = PeerRequest::HandoffPush(pairs.clone());
    vec![
        ("ping", PeerRequest::Ping),
        (
            "store",
            PeerRequest::Store {
                bucket: "carts".into(),
                key: b"k1".to_vec(),
                object: objects[1].clone(),
                hint_for: Some("n3".into()),
                sync: true,
            },
        ),
        (
            "fetch",
            PeerRequest::Fetch {
                bucket: "carts".into(),
                key: b"k1".to_vec(),
            },
        ),
        (
            "forward",
            PeerRequest::Forward {
                request,
                hint_for: None,
            },
        ),
        ("meta_digest", PeerRequest::MetaDigest(meta().digest())),
        (
            "meta_push",
            PeerRequest::MetaPush {
                state: meta(),
                blobs: vec![("ab".repeat(32), b"\0asm".to_vec())],
            },
        ),
        ("meta_blobs", PeerRequest::MetaBlobs(vec!["ab".repeat(32)])),
        (
            "ae_digest",
            PeerRequest::AeDigest {
                from: "n1".into(),
                trees: 2,
                digest: merkle::roots_digest(&[(3, 0, [1; 16]), (3, 5, [2; 16])]),
            },
        ),
        ("ae_done", PeerRequest::AeDone { from: "n1".into() }),
        (
            "ae_roots",
            PeerRequest::AeRoots(vec![(3, 0, [1; 16]), (3, 5, [2; 16])]),
        ),
        (
            "ae_leaves",
            PeerRequest::AeLeaves(vec![(3, 0, 1), (3, 5, 15)]),
        ),
        (
            "ae_keys",
            PeerRequest::AeKeys(vec![(3, 0, 17), (3, 5, 255)]),
        ),
        (
            "ae_fetch",
            PeerRequest::AeFetch(pairs.iter().map(|(k, _)| k.clone()).collect()),
        ),
        ("ae_push", PeerRequest::AePush(pairs.clone())),
        ("reap_check", PeerRequest::ReapCheck(digests.clone())),
        ("reap", PeerRequest::Reap(digests)),
        (
            "join",
            PeerRequest::Join {
                node: "n4".into(),
                entry: meta().members["n4"].clone(),
                partitions: 64,
                quorum: (3, 2, 2),
            },
        ),
        ("handoff_push", handoff.clone()),
        (
            "on_ring_handoff",
            PeerRequest::OnRing {
                ring: ring.id(),
                request: Box::new(handoff),
            },
        ),
    ]
}

fn peer_responses(objects: &[Object], response: Response) -> Vec<(&'static str, PeerResponse)> {
    let data_key = |k: &[u8]| keys::data_key(b"carts", k).expect("a short bucket");
    let pairs: Vec<(Vec<u8>, Object)> = objects
        .iter()
        .enumerate()
        .map(|(i, o)| (data_key(format!("k{i}").as_bytes()), o.clone()))
        .collect();
    let digests: Vec<(Vec<u8>, merkle::Hash)> = pairs
        .iter()
        .map(|(k, o)| (k.clone(), merkle::object_digest(o)))
        .collect();
    vec![
        ("pong", PeerResponse::Pong("n1".into())),
        ("stored", PeerResponse::Stored),
        ("fetched", PeerResponse::Fetched(objects[1].clone())),
        ("forwarded", PeerResponse::Forwarded(response)),
        ("meta_same", PeerResponse::MetaSame),
        ("meta", PeerResponse::Meta(meta())),
        (
            "blobs",
            PeerResponse::Blobs(vec![("ab".repeat(32), b"\0asm".to_vec())]),
        ),
        ("ae_match", PeerResponse::AeMatch(false)),
        ("ae_busy", PeerResponse::AeBusy),
        ("ae_released", PeerResponse::AeReleased),
        (
            "ae_groups",
            PeerResponse::AeGroups(vec![(3, 5, vec![[1; 16], [2; 16]])]),
        ),
        (
            "ae_leaf_hashes",
            PeerResponse::AeLeafHashes(vec![(3, 5, 1, vec![[3; 16], [4; 16]])]),
        ),
        (
            "ae_key_lists",
            PeerResponse::AeKeyLists(vec![(3, 5, 17, digests)]),
        ),
        ("ae_objects", PeerResponse::AeObjects(pairs)),
        ("ae_pushed", PeerResponse::AePushed(3)),
        (
            "reap_status",
            PeerResponse::ReapStatus(vec![(Some(60_000), false), (None, true)]),
        ),
        ("reaped", PeerResponse::Reaped(2)),
        ("joined", PeerResponse::Joined(Box::new(meta()))),
        ("handoff_stored", PeerResponse::HandoffStored(3)),
        (
            "error",
            PeerResponse::Error(ErrorReply {
                code: ErrorCode::Internal,
                message: "boom".into(),
            }),
        ),
    ]
}

fn body<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("encodes")
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let objects = objects();
    let context = encode_context(objects[1].context());
    let small_ring = ring(8, &["n1", "n2", "n3"]);
    let ring_bytes = small_ring.encode().expect("encodes");

    // Contexts.
    write(
        &dir,
        "context",
        "empty",
        &encode_context(&VersionVector::new()),
    );
    for (i, o) in objects.iter().enumerate() {
        write(
            &dir,
            "context",
            &format!("object{i}"),
            &encode_context(o.context()),
        );
    }

    // Rings of a few sizes, zones and weights.
    write(&dir, "ring", "q8_3", &ring_bytes);
    write(
        &dir,
        "ring",
        "q16_5",
        &ring(16, &["a", "b", "c", "d", "e"])
            .encode()
            .expect("encodes"),
    );
    let grown = small_ring
        .rebalance(vec![
            Member::new("n1"),
            Member::new("n2"),
            Member::new("n3"),
            Member::new("n4"),
        ])
        .expect("rebalances");
    write(
        &dir,
        "ring",
        "q8_rebalanced",
        &grown.encode().expect("encodes"),
    );

    // Stored records.
    for (i, o) in objects.iter().enumerate() {
        let record = LocalRecord {
            object: o.clone(),
            own_epoch: (i != 1).then_some(1),
        };
        write(
            &dir,
            "record",
            &format!("record{i}"),
            &encode_record(&record),
        );
    }

    // Stored metadata: the current format (3) and the two older ones `MetaStore::open`
    // still reads.
    let state = meta();
    let mut v3 = vec![3];
    v3.extend(body(&state));
    write(&dir, "meta_state", "v3", &v3);
    let without_keys = MetaState {
        keys: BTreeMap::new(),
        plugins_deleted: BTreeMap::new(),
        ..state.clone()
    };
    let mut v2 = vec![2];
    v2.extend(body(&without_keys));
    // The empty `keys` and `plugins_deleted` maps (one 0 byte each) are not in format 2.
    v2.truncate(v2.len() - 2);
    write(&dir, "meta_state", "v2", &v2);
    let mut v1 = vec![1];
    v1.extend(body(&(&state.buckets, &state.plugins)));
    write(&dir, "meta_state", "v1", &v1);

    // Client frames (bodies; the targets add the header).
    let reqs = requests(&context);
    for (name, r) in &reqs {
        write(&dir, "client_request", name, &body(r));
    }
    let resps = responses(&context, &ring_bytes, &objects[1]);
    for (name, r) in &resps {
        write(&dir, "client_response", name, &body(r));
    }

    // Peer frames.
    let put = reqs
        .iter()
        .find(|(n, _)| *n == "put")
        .map(|(_, r)| r.clone())
        .expect("a put");
    for (name, r) in peer_requests(&objects, &small_ring, put) {
        write(&dir, "peer_request", name, &body(&r));
    }
    let written = resps[3].1.clone();
    for (name, r) in peer_responses(&objects, written) {
        write(&dir, "peer_response", name, &body(&r));
    }

    // A node's store: records, their anti-entropy entries, a tombstone index entry, a
    // hint and the index marker (as `AeIndex::open` finds them).
    let mut pairs = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        let bucket: &[u8] = if i == 2 { b"b3" } else { b"carts" };
        let key = format!("k{i}");
        let dkey = keys::data_key(bucket, key.as_bytes()).expect("a short bucket");
        let record = LocalRecord {
            object: o.clone(),
            own_epoch: Some(1),
        };
        pairs.push((dkey.clone(), encode_record(&record)));
        let position = quiver_core::ring::key_position(bucket, key.as_bytes());
        let partition = quiver_core::ring::partition_of_position(&position, 64).expect("64");
        let tombstone = i == 2;
        let mut entry = vec![3, u8::from(tombstone)];
        entry.extend_from_slice(&merkle::object_digest(o));
        pairs.push((
            keys::ae_key(partition, merkle::leaf_of(&position), &dkey),
            entry,
        ));
        if tombstone {
            pairs.push((keys::reap_key(&dkey), 1000u64.to_be_bytes().to_vec()));
        }
        if i == 0 {
            pairs.push((
                keys::hint_key("n3", &dkey).expect("a short owner"),
                Vec::new(),
            ));
        }
    }
    write(
        &dir,
        "ae_store",
        "store",
        &quiver_fuzz::encode_pairs(&pairs),
    );
    // Only the data records: `open` rebuilds the entries from them.
    let records: Vec<_> = pairs
        .iter()
        .filter(|(k, _)| k[0] == keys::DATA_PREFIX)
        .cloned()
        .collect();
    write(
        &dir,
        "ae_store",
        "records_only",
        &quiver_fuzz::encode_pairs(&records),
    );
    assert_eq!(
        quiver_fuzz::decode_pairs(&quiver_fuzz::encode_pairs(&pairs)),
        pairs
    );
    println!("seeds written under {}", dir.display());
}
