//! Access keys against real nodes over QUIC: who may do what, and that nothing a refused
//! client tried changed what was acknowledged before (issue 11, points 1 and 2).

mod support;

use quiver_core::meta::BucketSpec;
use quiver_sdk::wire::Request;
use quiver_sdk::{Client, ClientConfig, Error, ErrorCode, KeyToken, ReadOptions, WriteOptions};
use support::ClusterProc;

const SUBNET: u8 = 40;

fn code(result: Result<impl std::fmt::Debug, Error>) -> ErrorCode {
    match result {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("expected a typed refusal, got {e}")),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
    }
}

fn ca(cluster: &ClusterProc) -> Vec<u8> {
    std::fs::read(cluster.ca_dir().join("ca.pem")).expect("read CA")
}

async fn connect_as(cluster: &ClusterProc, i: usize, key: Option<&KeyToken>) -> Client {
    let mut config = ClientConfig::new(ca(cluster));
    config.key = key.cloned();
    Client::connect(&cluster.addrs[i], config)
        .await
        .expect("connect")
}

fn w3() -> WriteOptions {
    WriteOptions {
        w: Some(3),
        ..WriteOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_authenticate_and_grants_authorize_on_every_node() {
    let cluster = ClusterProc::start(SUBNET, 3, &[]);
    let admin = cluster.client(0).await;
    // Acknowledged values that every refusal below must leave intact.
    let mut acked = Vec::new();
    for bucket in ["a", "b"] {
        admin
            .put_with(bucket, "k1", b"before".to_vec(), None, &w3())
            .await
            .expect("admin put");
        acked.push((bucket, "k1", b"before".to_vec()));
    }

    // No key: nothing but a ping, on every node.
    for i in 0..3 {
        let anonymous = connect_as(&cluster, i, None).await;
        anonymous.ping().await.expect("a ping needs no key");
        assert_eq!(
            code(anonymous.put("a", "k1", b"evil".to_vec(), None).await),
            ErrorCode::Unauthenticated
        );
        assert_eq!(
            code(anonymous.get("a", "k1").await),
            ErrorCode::Unauthenticated
        );
        assert_eq!(code(anonymous.status().await), ErrorCode::Unauthenticated);
        assert_eq!(
            code(
                anonymous
                    .plugin_upload("evil", b"\0asm".to_vec(), true)
                    .await
            ),
            ErrorCode::Unauthenticated
        );
    }
    // A wrong secret is refused at connect, and so is a made-up name.
    let admin_key = cluster.admin_key();
    let mut secret = *admin_key.secret();
    secret[0] ^= 0xff;
    for forged in [
        KeyToken::new(admin_key.name(), secret).expect("token"),
        KeyToken::new("nobody", *admin_key.secret()).expect("token"),
    ] {
        let mut config = ClientConfig::new(ca(&cluster));
        config.key = Some(forged);
        assert_eq!(
            code(Client::connect(&cluster.addrs[1], config).await),
            ErrorCode::Unauthenticated
        );
    }

    // Keys with grants, created through node 1; the change reaches every node at once.
    let creator = cluster.client(1).await;
    let (ro_info, ro) = creator
        .key_create("reader", false, &["a:read".to_string()])
        .await
        .expect("create a read-only key");
    assert_eq!(ro_info.grants, vec!["a:read".to_string()]);
    let (_, rw) = creator
        .key_create("writer", false, &["a:readwrite".to_string()])
        .await
        .expect("create a read-write key");
    assert_eq!(
        code(creator.key_create("writer", false, &[]).await),
        ErrorCode::InvalidKey
    );
    assert_eq!(
        code(creator.key_create("bad", false, &["a:all".into()]).await),
        ErrorCode::InvalidKey
    );
    let listed = creator.key_list().await.expect("list");
    let names: Vec<&str> = listed.iter().map(|k| k.name.as_str()).collect();
    assert!(names.contains(&"reader") && names.contains(&"writer") && names.contains(&"admin"));

    for i in 0..3 {
        let reader = connect_as(&cluster, i, Some(&ro)).await;
        assert_eq!(
            reader.get("a", "k1").await.expect("read a").values(),
            vec![b"before".as_slice()]
        );
        reader.status().await.expect("status needs any key");
        assert_eq!(
            code(reader.put("a", "k1", b"evil".to_vec(), None).await),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(reader.delete("a", "k1", None).await),
            ErrorCode::Forbidden
        );
        assert_eq!(code(reader.get("b", "k1").await), ErrorCode::Forbidden);

        let writer = connect_as(&cluster, i, Some(&rw)).await;
        writer
            .put_with("a", format!("w{i}"), b"by writer".to_vec(), None, &w3())
            .await
            .expect("the writer writes a");
        acked.push(("a", ["w0", "w1", "w2"][i], b"by writer".to_vec()));
        let err = writer.put("b", "k1", b"evil".to_vec(), None).await;
        match &err {
            Err(Error::Server { message, .. }) => {
                assert!(
                    message.contains("put") && message.contains("\"b\""),
                    "{message}"
                )
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(code(err), ErrorCode::Forbidden);
        assert_eq!(code(writer.get("b", "k1").await), ErrorCode::Forbidden);
        assert_eq!(
            code(writer.plugin_upload("evil", b"\0asm".to_vec(), true).await),
            ErrorCode::Forbidden
        );
        let n1 = BucketSpec {
            n: Some(1),
            ..BucketSpec::default()
        };
        assert_eq!(
            code(writer.bucket_set("a", n1, None, false).await),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(writer.cluster_admin(&Request::ClusterCommit).await),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(
                writer
                    .cluster_admin(&Request::ClusterLeave { node: None })
                    .await
            ),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(writer.key_create("mine", true, &[]).await),
            ErrorCode::Forbidden
        );
        assert_eq!(code(writer.key_delete("admin").await), ErrorCode::Forbidden);
    }

    // An upload too large for a request frame takes the upload path: without an admin key
    // it is refused before its body is read, so it cannot hold an upload slot either.
    let big = vec![0u8; 3 * 1024 * 1024];
    let anonymous = connect_as(&cluster, 0, None).await;
    assert_eq!(
        code(anonymous.plugin_upload("evil", big.clone(), true).await),
        ErrorCode::Unauthenticated
    );
    let writer = connect_as(&cluster, 0, Some(&rw)).await;
    assert_eq!(
        code(writer.plugin_upload("evil", big, true).await),
        ErrorCode::Forbidden
    );
    // Only the header and the upload tag are sent, and the stream stays open: the refusal
    // comes at once, not after the node waited for 60 MB that never arrive.
    let probe = quiver_sdk::wire::encode_frame(&Request::PluginUpload {
        name: String::new(),
        component: Vec::new(),
        force: false,
    })
    .expect("encode");
    let (mut send, mut recv) = anonymous.connection().open_bi().await.expect("stream");
    let mut head = (60u32 * 1024 * 1024).to_be_bytes().to_vec();
    head.push(probe[4]);
    send.write_all(&head).await.expect("send the header");
    let reply = tokio::time::timeout(std::time::Duration::from_secs(5), recv.read_to_end(1 << 20))
        .await
        .expect("refused without waiting for the body")
        .expect("a reply");
    let reply: quiver_sdk::wire::Response =
        quiver_sdk::wire::decode_frame(&reply, 1 << 20).expect("a frame");
    assert!(
        matches!(&reply, quiver_sdk::wire::Response::Error(e) if e.code == ErrorCode::Unauthenticated),
        "{reply:?}"
    );

    // An admin key may change a bucket and upload a plugin.
    let lww = std::fs::read(quiver_guests::lww()).expect("lww component");
    let up = admin
        .plugin_upload("lww", lww, false)
        .await
        .expect("admin uploads");
    assert_eq!(up.replicated_to.len(), 3, "{up:?}");
    admin
        .bucket_set(
            "c",
            BucketSpec {
                sibling_threshold: Some(8),
                ..BucketSpec::default()
            },
            None,
            false,
        )
        .await
        .expect("admin sets a bucket");

    // Deleting the writer's key ends it on every node, on connections already open too.
    let open: Vec<Client> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(connect_as(&cluster, i, Some(&rw)).await);
        }
        v
    };
    cluster
        .client(2)
        .await
        .key_delete("writer")
        .await
        .expect("delete the writer's key");
    for (i, writer) in open.iter().enumerate() {
        assert_eq!(
            code(writer.put("a", "k1", b"late".to_vec(), None).await),
            ErrorCode::Unauthenticated,
            "node {i} still takes the deleted key"
        );
        let mut config = ClientConfig::new(ca(&cluster));
        config.key = Some(rw.clone());
        assert_eq!(
            code(Client::connect(&cluster.addrs[i], config).await),
            ErrorCode::Unauthenticated
        );
    }
    let status = admin.status().await.expect("status");
    assert!(status.auth_refused > 0, "refusals are counted: {status:?}");

    // Every acknowledged value is intact on every node.
    for i in 0..3 {
        let c = cluster.client(i).await;
        for (bucket, key, value) in &acked {
            let got = c
                .get_with(
                    bucket,
                    key,
                    &ReadOptions {
                        r: Some(3),
                        ..ReadOptions::default()
                    },
                )
                .await
                .expect("admin get");
            assert_eq!(
                got.values(),
                vec![value.as_slice()],
                "{bucket}/{key} on node {i}"
            );
        }
    }
}

/// A node started without `--admin-key-file` writes its own admin key, readable by its
/// owner only, and keeps it across restarts.
#[tokio::test]
async fn a_new_node_writes_its_admin_key_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = support::NodeProc::start(dir.path(), &["--engine", "memory"]);
    let file = node.admin_key_file.clone();
    assert_eq!(file, dir.path().join("admin.key"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "admin.key is for its owner only");
    }
    let key = node.admin_key();
    assert!(key.name().starts_with("admin-"));
    let client = node.client().await;
    client.status().await.expect("the admin key works");
    drop(client);
    drop(node);
    let again = support::NodeProc::start(dir.path(), &["--engine", "memory"]);
    assert_eq!(again.admin_key(), key, "the key file is kept, not replaced");
}

/// A peer's requests may claim only the node id its certificate names: n2's certificate
/// cannot end n1's anti-entropy lease on n3 (issue 11, point 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_claim_another_nodes_id() {
    use quiver_node::peer::{PeerError, PeerRequest, PeerResponse, Peers, peer_client_config};
    let cluster = ClusterProc::start(SUBNET + 2, 3, &[]);
    let identity = quiver_node::certs::load_identity(&quiver_node::certs::CertPaths::in_dir(
        &cluster.dir.path().join("n2"),
    ))
    .expect("n2's identity");
    let endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    let peers = Peers::new(
        "n2".into(),
        Default::default(),
        endpoint,
        peer_client_config(&identity).expect("peer TLS"),
        std::time::Duration::from_secs(5),
    );
    let n3 = cluster.addrs[2].parse().expect("n3 address");
    for claim in ["n1", "n3", "nobody"] {
        match peers
            .call_addr(n3, &PeerRequest::AeDone { from: claim.into() })
            .await
        {
            Err(PeerError::Refused { message, .. }) => {
                assert!(
                    message.contains("certificate is for node \"n2\""),
                    "{message}"
                );
            }
            other => panic!("n2 claiming {claim} was answered {other:?}"),
        }
    }
    // Claiming its own id is fine.
    let reply = peers
        .call_addr(n3, &PeerRequest::AeDone { from: "n2".into() })
        .await
        .expect("n3 answers");
    assert!(!matches!(reply, PeerResponse::Error(_)), "{reply:?}");
}

/// Connections are bounded per source address, refusals are counted, and a freed slot is
/// usable again; bucket plugin limits above the node's caps are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_plugin_limits_hold() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = support::NodeProc::start(
        dir.path(),
        &[
            "--engine",
            "memory",
            "--connections-per-address-max",
            "2",
            "--plugin-fuel-max",
            "1000000",
        ],
    );
    let first = node.client().await;
    let second = node.client().await;
    match Client::connect(&node.addr.to_string(), node.client_config()).await {
        Err(Error::Connect { .. }) => {}
        other => panic!("a third connection from one address was not refused: {other:?}"),
    }
    drop(second);
    support::eventually("a freed connection slot", || async {
        Client::connect(&node.addr.to_string(), node.client_config())
            .await
            .is_ok()
    })
    .await;
    let status = first.status().await.expect("status");
    assert!(status.connections_refused >= 1, "{status:?}");

    let too_much = BucketSpec {
        plugin_fuel: Some(2_000_000),
        ..BucketSpec::default()
    };
    assert_eq!(
        code(first.bucket_set("b", too_much, None, false).await),
        ErrorCode::LimitExceeded
    );
    let fine = BucketSpec {
        plugin_fuel: Some(500_000),
        ..BucketSpec::default()
    };
    first
        .bucket_set("b", fine, None, false)
        .await
        .expect("within the cap");
}
