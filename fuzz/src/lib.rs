//! Checks shared by the fuzz targets (`fuzz_targets/`).
//!
//! Every target feeds arbitrary bytes to one decoder that reads network or disk input. The
//! decoder may refuse them (an error is fine) but must not panic, hang or allocate without
//! bound. When it accepts them, the checks here hold the decoded value to more: it encodes
//! back to bytes that decode to an equal value, and states that pass their own validation
//! behave under the merges the node runs on them.

use std::fmt::Debug;

use quiver_core::causality::{Object, decode_context, encode_context};
use quiver_core::membership::RingEntry;
use quiver_core::merkle;
use quiver_core::meta::MetaState;
use quiver_core::ring::Ring;
use quiver_core::storage::keys;
use quiver_node::peer::{PeerRequest, PeerResponse};
use quiver_sdk::wire::{self, FRAME_HEADER_BYTES, Request, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest frame a target hands to `decode_frame`: large enough for any input libFuzzer
/// generates, so the header check is the only length check in play.
pub const FRAME_MAX: usize = 16 * 1024 * 1024;

/// `body` with a frame header that declares its length.
pub fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Decodes `body` as a frame body and as a whole frame, the two ways the node and the SDK
/// read frames; both must agree. Also feeds the raw bytes to `decode_frame` (header checks).
pub fn decode_both<T>(body: &[u8]) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let _ = wire::decode_frame::<T>(body, FRAME_MAX);
    let from_body = wire::decode_body::<T>(body).ok();
    let from_frame = wire::decode_frame::<T>(&framed(body), FRAME_MAX).ok();
    assert_eq!(
        from_body, from_frame,
        "decode_body and decode_frame disagree"
    );
    let value = from_body?;
    round_trip(&value);
    Some(value)
}

/// Encoding a decoded value and decoding it again gives an equal value (through the frame
/// encoder, as the node sends it).
pub fn round_trip<T>(value: &T)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let frame = wire::encode_frame(value).expect("a decoded value encodes");
    let again: T = wire::decode_frame(&frame, usize::MAX).expect("a re-encoded value decodes");
    assert_eq!(&again, value, "round trip changed the value");
}

/// An object from outside: if it passes `validate` (as the node requires before merging),
/// merging it with itself or with the empty object gives it back, and the result validates.
pub fn check_object(object: &Object) {
    let _ = merkle::object_digest(object);
    if object.validate().is_err() {
        return;
    }
    let merged = object.merge(object);
    assert_eq!(&merged, object, "merge with itself is not idempotent");
    assert!(merged.validate().is_ok(), "a merge broke the invariants");
    assert_eq!(&object.merge(&Object::new()), object, "merge with empty");
    assert_eq!(&Object::new().merge(object), object, "merge into empty");
    let context = object.context();
    let decoded = decode_context(&encode_context(context)).expect("own context decodes");
    assert_eq!(&decoded, context, "context round trip");
}

/// An engine data key from outside: splitting it never panics, and a split key joins back
/// into the same bytes.
pub fn check_data_key(key: &[u8]) {
    if let Some((bucket, k)) = keys::split_data_key(key) {
        assert_eq!(
            keys::data_key(bucket, k).as_deref(),
            Some(key),
            "data key round trip"
        );
    }
}

/// A ring from outside (already checked by `Ring::decode`'s invariants): its derived views
/// do not panic and its encoding round-trips.
pub fn check_ring(ring: &Ring) {
    let bytes = ring.encode().expect("a decoded ring encodes");
    let again = Ring::decode(&bytes).expect("a re-encoded ring decodes");
    assert_eq!(&again, ring, "ring round trip");
    assert_eq!(again.id(), ring.id(), "ring id");
    let _ = ring.spacing();
    let _ = ring.owned_counts();
    let q = ring.partitions();
    for p in [0, 1, q / 2, q - 1] {
        for n in [1, ring.n_val() as usize, ring.members().len() + 1] {
            let list = ring.preference_list(p, n).expect("partition in range");
            assert!(list.nodes().count() <= ring.members().len());
        }
    }
    let _ = ring.preference_list_for_key(b"bucket", b"key", 3);
    let diff = ring.diff(ring).expect("a ring diffs with itself");
    assert!(diff.flows().is_empty(), "a ring moves data to itself");
}

/// Metadata from outside: it round-trips, merging it into itself changes nothing, and its
/// ring passes the ring checks.
pub fn check_meta(state: &MetaState) {
    round_trip(state);
    let _ = state.digest();
    let mut merged = state.clone();
    let changes = merged.merge(state);
    assert!(changes.is_empty(), "merge with itself changed {changes:?}");
    assert_eq!(&merged, state, "merge with itself is not idempotent");
    let mut into_empty = MetaState::default();
    into_empty.merge(state);
    if let Some(RingEntry { ring, .. }) = &state.ring {
        check_ring(ring);
    }
    for name in state.plugins.keys().map(|p| p.name.as_str()).take(4) {
        let _ = state.resolve(name);
    }
}

/// A client request as the node reads it: contexts of writes decode too.
pub fn check_request(request: &Request) {
    match request {
        Request::Put { context, .. } | Request::Delete { context, .. } => {
            check_context(context);
        }
        _ => {}
    }
}

/// A response as the SDK reads it: its ring and contexts decode too.
pub fn check_response(response: &Response) {
    match response {
        Response::Ring { ring, .. } => {
            if let Ok(ring) = Ring::decode(ring) {
                check_ring(&ring);
            }
        }
        Response::Get { context, .. } | Response::Written { context } => check_context(context),
        _ => {}
    }
}

/// Opaque context bytes: if they decode, the context re-encodes to bytes that decode equal.
pub fn check_context(bytes: &[u8]) {
    if let Ok(vv) = decode_context(bytes) {
        let again = decode_context(&encode_context(&vv)).expect("own encoding decodes");
        assert_eq!(again, vv, "context round trip");
    }
}

/// A peer request as the replica side reads it.
pub fn check_peer_request(request: &PeerRequest) {
    let _ = request.claimed_sender();
    match request {
        PeerRequest::Store { object, .. } => check_object(object),
        PeerRequest::Forward { request, .. } => check_request(request),
        PeerRequest::MetaPush { state, .. } => check_meta(state),
        PeerRequest::AeFetch(keys) => keys.iter().for_each(|k| check_data_key(k)),
        PeerRequest::AePush(pairs) | PeerRequest::HandoffPush(pairs) => {
            for (key, object) in pairs {
                check_data_key(key);
                check_object(object);
            }
        }
        PeerRequest::ReapCheck(pairs) | PeerRequest::Reap(pairs) => {
            pairs.iter().for_each(|(k, _)| check_data_key(k));
        }
        PeerRequest::OnRing { request, .. } => check_peer_request(request),
        _ => {}
    }
}

/// A peer response as the requesting node reads it.
pub fn check_peer_response(response: &PeerResponse) {
    match response {
        PeerResponse::Fetched(object) => check_object(object),
        PeerResponse::Forwarded(response) => check_response(response),
        PeerResponse::Meta(state) => check_meta(state),
        PeerResponse::Joined(state) => check_meta(state),
        PeerResponse::AeObjects(pairs) => {
            for (key, object) in pairs {
                check_data_key(key);
                check_object(object);
            }
        }
        PeerResponse::AeKeyLists(lists) => {
            for (_, _, _, keys) in lists {
                keys.iter().for_each(|(k, _)| check_data_key(k));
                let _ = merkle::diff_keys(keys, keys);
            }
        }
        PeerResponse::AeGroups(groups) => {
            for (_, _, hashes) in groups {
                assert!(merkle::differing(hashes, hashes).is_empty());
            }
        }
        _ => {}
    }
}

/// Key prefixes of the `ae_store` target's input: a pair's selector byte picks one.
pub const STORE_PREFIXES: [u8; 5] = [
    keys::AE_PREFIX,
    keys::DATA_PREFIX,
    keys::REAP_PREFIX,
    keys::HINT_PREFIX,
    keys::META_PREFIX,
];

/// Reads engine `(key, value)` pairs from the `ae_store` target's input: per pair a selector
/// byte (the key's prefix, from [`STORE_PREFIXES`]), a length byte and that many more key
/// bytes, a big-endian 2-byte length and that many value bytes. Truncated input ends the list
/// with what is there.
pub fn decode_pairs(mut bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (head, rest) = bytes.split_at(n.min(bytes.len()));
        *bytes = rest;
        head
    }
    let mut out = Vec::new();
    while let Some((&sel, rest)) = bytes.split_first() {
        bytes = rest;
        let klen = take(&mut bytes, 1).first().copied().unwrap_or(0);
        let mut key = vec![STORE_PREFIXES[usize::from(sel) % STORE_PREFIXES.len()]];
        key.extend_from_slice(take(&mut bytes, usize::from(klen)));
        let vlen = match *take(&mut bytes, 2) {
            [hi, lo] => usize::from(u16::from_be_bytes([hi, lo])),
            _ => 0,
        };
        let value = take(&mut bytes, vlen).to_vec();
        out.push((key, value));
    }
    out
}

/// Encodes engine `(key, value)` pairs in the form [`decode_pairs`] reads; each key must
/// start with one of [`STORE_PREFIXES`] and be under 257 bytes, each value under 64 KiB.
pub fn encode_pairs(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in pairs {
        let (&prefix, rest) = key.split_first().expect("a non-empty key");
        let sel = STORE_PREFIXES
            .iter()
            .position(|&p| p == prefix)
            .expect("a known prefix");
        out.push(sel as u8);
        out.push(u8::try_from(rest.len()).expect("a key under 257 bytes"));
        out.extend_from_slice(rest);
        let vlen = u16::try_from(value.len()).expect("a value under 64 KiB");
        out.extend_from_slice(&vlen.to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}
