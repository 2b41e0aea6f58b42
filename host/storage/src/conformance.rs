//! The conformance suite every [`StorageEngine`] must pass.
//!
//! It checks the observable contract of `quiver_core::storage` (ordering, bounds, batch
//! semantics, binary keys, sizes), not crash behaviour, which needs an engine-specific
//! harness (see the fjall reopen test in `tests/storage.rs`). It lives in the library, not in
//! a test file, so that every engine (fjall, memory, and later Wasm storage adapters) runs the
//! very same checks: call [`run_all`] from a test with a constructor of fresh engines.
//!
//! Checks panic with a message naming the check, the engine and what was expected. Keys are
//! never empty: the node's key layout always starts with a prefix byte, and some engines
//! (fjall) reject empty keys.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;

use quiver_core::storage::{StorageEngine, StorageError, WriteBatch};

/// One check: gets a fresh, empty engine and panics on a violation.
pub type Check = fn(&dyn StorageEngine);

/// Every check, by name, in the order [`run_all`] runs them.
pub const CHECKS: &[(&str, Check)] = &[
    ("get_absent_key", get_absent_key),
    ("put_get_overwrite", put_get_overwrite),
    ("delete", delete),
    ("batch_applies_every_op", batch_applies_every_op),
    ("batch_ops_apply_in_order", batch_ops_apply_in_order),
    ("empty_batch", empty_batch),
    ("scan_order", scan_order),
    ("scan_bounds", scan_bounds),
    ("scan_limit", scan_limit),
    ("scan_skips_deleted", scan_skips_deleted),
    ("empty_values", empty_values),
    ("large_values", large_values),
    ("binary_keys", binary_keys),
    ("many_keys", many_keys),
    ("sync_succeeds", sync_succeeds),
];

/// Runs every check in [`CHECKS`], each on a fresh engine from `make`.
///
/// Panics on the first failing check, naming it.
pub fn run_all(make: &mut dyn FnMut() -> Arc<dyn StorageEngine>) {
    for (name, check) in CHECKS {
        let engine = make();
        // Re-panic with the check's name: the original assertion message is already printed
        // by the panic hook, this says which check and engine it came from.
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(engine.as_ref()))) {
            eprintln!(
                "storage conformance check `{name}` failed on engine `{}`",
                engine.name()
            );
            resume_unwind(panic);
        }
    }
}

/// Unwraps a storage result or panics naming the engine and the operation.
#[track_caller]
fn must<T>(engine: &dyn StorageEngine, what: &str, result: Result<T, StorageError>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("engine `{}`: {what} failed: {e}", engine.name()),
    }
}

#[track_caller]
fn apply(engine: &dyn StorageEngine, batch: &WriteBatch) {
    must(engine, "apply", engine.apply(batch));
}

#[track_caller]
fn put(engine: &dyn StorageEngine, key: &[u8], value: &[u8]) {
    let mut batch = WriteBatch::new();
    batch.put(key, value);
    apply(engine, &batch);
}

#[track_caller]
fn get(engine: &dyn StorageEngine, key: &[u8]) -> Option<Vec<u8>> {
    must(engine, "get", engine.get(key))
}

#[track_caller]
fn scan(
    engine: &dyn StorageEngine,
    start: &[u8],
    end: Option<&[u8]>,
    limit: usize,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    must(engine, "scan", engine.scan(start, end, limit))
}

fn keys_of(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
    pairs.iter().map(|(k, _)| k.clone()).collect()
}

fn to_vecs(keys: &[&[u8]]) -> Vec<Vec<u8>> {
    keys.iter().map(|k| k.to_vec()).collect()
}

/// A get of a key never written returns `None`; an empty engine scans empty.
pub fn get_absent_key(e: &dyn StorageEngine) {
    assert_eq!(
        get(e, b"missing"),
        None,
        "engine `{}`: get of an absent key must be None",
        e.name()
    );
    assert!(
        scan(e, b"", None, usize::MAX).is_empty(),
        "engine `{}`: a fresh engine must scan empty",
        e.name()
    );
    put(e, b"present", b"v");
    assert_eq!(
        get(e, b"presenT"),
        None,
        "engine `{}`: keys are case-sensitive bytes",
        e.name()
    );
    assert_eq!(
        get(e, b"presen"),
        None,
        "engine `{}`: a prefix of a key is a different key",
        e.name()
    );
    assert_eq!(
        get(e, b"present\0"),
        None,
        "engine `{}`: an extension of a key is a different key",
        e.name()
    );
}

/// Puts are visible to gets; a second put overwrites.
pub fn put_get_overwrite(e: &dyn StorageEngine) {
    put(e, b"k", b"v1");
    assert_eq!(
        get(e, b"k").as_deref(),
        Some(&b"v1"[..]),
        "engine `{}`: get after put",
        e.name()
    );
    put(e, b"k", b"second value, longer");
    assert_eq!(
        get(e, b"k").as_deref(),
        Some(&b"second value, longer"[..]),
        "engine `{}`: get after overwrite must return the new value",
        e.name()
    );
    put(e, b"k", b"s");
    assert_eq!(
        get(e, b"k").as_deref(),
        Some(&b"s"[..]),
        "engine `{}`: overwrite with a shorter value",
        e.name()
    );
    assert_eq!(
        scan(e, b"", None, usize::MAX).len(),
        1,
        "engine `{}`: an overwrite must not add a key",
        e.name()
    );
}

/// Deletes remove a key; deleting an absent key is a no-op, not an error.
pub fn delete(e: &dyn StorageEngine) {
    put(e, b"a", b"1");
    put(e, b"b", b"2");
    let mut batch = WriteBatch::new();
    batch.delete(&b"a"[..]);
    apply(e, &batch);
    assert_eq!(
        get(e, b"a"),
        None,
        "engine `{}`: get after delete must be None",
        e.name()
    );
    assert_eq!(
        get(e, b"b").as_deref(),
        Some(&b"2"[..]),
        "engine `{}`: delete must not touch other keys",
        e.name()
    );

    let mut batch = WriteBatch::new();
    batch.delete(&b"never-written"[..]);
    apply(e, &batch);
    assert_eq!(
        get(e, b"never-written"),
        None,
        "engine `{}`: delete of an absent key",
        e.name()
    );

    put(e, b"a", b"again");
    assert_eq!(
        get(e, b"a").as_deref(),
        Some(&b"again"[..]),
        "engine `{}`: put after delete must be visible",
        e.name()
    );
}

/// After `apply` returns, every operation of the batch is visible.
pub fn batch_applies_every_op(e: &dyn StorageEngine) {
    put(e, b"old", b"x");
    let mut batch = WriteBatch::new();
    batch
        .put(&b"k1"[..], &b"v1"[..])
        .put(&b"k2"[..], &b"v2"[..])
        .delete(&b"old"[..])
        .put(&b"k3"[..], &b"v3"[..]);
    apply(e, &batch);
    for (k, v) in [(&b"k1"[..], &b"v1"[..]), (b"k2", b"v2"), (b"k3", b"v3")] {
        assert_eq!(
            get(e, k).as_deref(),
            Some(v),
            "engine `{}`: every put of a batch must be visible",
            e.name()
        );
    }
    assert_eq!(
        get(e, b"old"),
        None,
        "engine `{}`: the delete of a batch must be visible",
        e.name()
    );
    assert_eq!(
        keys_of(&scan(e, b"", None, usize::MAX)),
        to_vecs(&[b"k1", b"k2", b"k3"]),
        "engine `{}`: scan after a batch",
        e.name()
    );
}

/// Operations of one batch apply in order: the last operation on a key wins.
pub fn batch_ops_apply_in_order(e: &dyn StorageEngine) {
    put(e, b"existing", b"old");
    let mut batch = WriteBatch::new();
    batch
        .put(&b"put-then-delete"[..], &b"v"[..])
        .delete(&b"put-then-delete"[..])
        .delete(&b"delete-then-put"[..])
        .put(&b"delete-then-put"[..], &b"v"[..])
        .put(&b"put-twice"[..], &b"first"[..])
        .put(&b"put-twice"[..], &b"second"[..])
        .put(&b"existing"[..], &b"new"[..])
        .delete(&b"existing"[..])
        .put(&b"flip"[..], &b"1"[..])
        .delete(&b"flip"[..])
        .put(&b"flip"[..], &b"3"[..]);
    apply(e, &batch);
    let name = e.name();
    assert_eq!(
        get(e, b"put-then-delete"),
        None,
        "engine `{name}`: put then delete of one key in a batch must leave it absent"
    );
    assert_eq!(
        get(e, b"delete-then-put").as_deref(),
        Some(&b"v"[..]),
        "engine `{name}`: delete then put of one key in a batch must leave it present"
    );
    assert_eq!(
        get(e, b"put-twice").as_deref(),
        Some(&b"second"[..]),
        "engine `{name}`: the later put of a batch wins"
    );
    assert_eq!(
        get(e, b"existing"),
        None,
        "engine `{name}`: put then delete of an existing key must leave it absent"
    );
    assert_eq!(
        get(e, b"flip").as_deref(),
        Some(&b"3"[..]),
        "engine `{name}`: put, delete, put must leave the last value"
    );
    assert_eq!(
        scan(e, b"", None, usize::MAX),
        vec![
            (b"delete-then-put".to_vec(), b"v".to_vec()),
            (b"flip".to_vec(), b"3".to_vec()),
            (b"put-twice".to_vec(), b"second".to_vec())
        ],
        "engine `{name}`: scan must agree with gets after an in-batch sequence"
    );
}

/// An empty batch is accepted and changes nothing.
pub fn empty_batch(e: &dyn StorageEngine) {
    apply(e, &WriteBatch::new());
    put(e, b"k", b"v");
    apply(e, &WriteBatch::new());
    assert_eq!(
        scan(e, b"", None, usize::MAX),
        vec![(b"k".to_vec(), b"v".to_vec())],
        "engine `{}`: an empty batch must change nothing",
        e.name()
    );
}

/// Scans return keys in ascending bytewise order, whatever the insertion order.
pub fn scan_order(e: &dyn StorageEngine) {
    let keys: [&[u8]; 8] = [b"b", b"a\x00", b"ab", b"a", b"ba", b"B", b"aa", b"\x01"];
    // Two batches plus single puts, so order can't come from one batch's layout.
    let mut batch = WriteBatch::new();
    for k in &keys[..4] {
        batch.put(*k, *k);
    }
    apply(e, &batch);
    for k in &keys[4..] {
        put(e, k, k);
    }
    let mut expected = to_vecs(&keys);
    expected.sort();
    let got = scan(e, b"", None, usize::MAX);
    assert_eq!(
        keys_of(&got),
        expected,
        "engine `{}`: scan must return keys in ascending byte order",
        e.name()
    );
    assert!(
        got.iter().all(|(k, v)| k == v),
        "engine `{}`: scan must pair each key with its own value",
        e.name()
    );
}

/// Scans cover `[start, end)`: start inclusive, end exclusive, no end = unbounded.
pub fn scan_bounds(e: &dyn StorageEngine) {
    let mut batch = WriteBatch::new();
    for k in [&b"a"[..], b"b", b"c", b"d", b"e"] {
        batch.put(k, k);
    }
    apply(e, &batch);
    let name = e.name();
    // (start, end, expected keys)
    type Case<'a> = (&'a [u8], Option<&'a [u8]>, &'a [&'a [u8]]);
    let cases: [Case<'_>; 9] = [
        (b"b", Some(b"d"), &[b"b", b"c"]),
        (b"b", None, &[b"b", b"c", b"d", b"e"]),
        (b"", Some(b"c"), &[b"a", b"b"]),
        (b"bb", Some(b"dd"), &[b"c", b"d"]),
        (b"a", Some(b"a\x00"), &[b"a"]),
        (b"e", None, &[b"e"]),
        (b"f", None, &[]),
        (b"c", Some(b"c"), &[]),
        (b"d", Some(b"b"), &[]),
    ];
    for (start, end, expected) in cases {
        assert_eq!(
            keys_of(&scan(e, start, end, usize::MAX)),
            to_vecs(expected),
            "engine `{name}`: scan [{start:?}, {end:?}) (an empty or inverted range must be empty, not an error)"
        );
    }
}

/// Scans return at most `limit` pairs, the smallest keys of the range.
pub fn scan_limit(e: &dyn StorageEngine) {
    let mut batch = WriteBatch::new();
    for i in 0u8..10 {
        batch.put([b'k', i], [i]);
    }
    apply(e, &batch);
    let name = e.name();
    assert!(
        scan(e, b"", None, 0).is_empty(),
        "engine `{name}`: limit 0 must return nothing"
    );
    assert_eq!(
        keys_of(&scan(e, b"", None, 1)),
        vec![vec![b'k', 0]],
        "engine `{name}`: limit 1"
    );
    assert_eq!(
        keys_of(&scan(e, &[b'k', 3], None, 4)),
        (3u8..7).map(|i| vec![b'k', i]).collect::<Vec<_>>(),
        "engine `{name}`: limit must return the first keys from start"
    );
    assert_eq!(
        scan(e, b"", None, 10).len(),
        10,
        "engine `{name}`: limit equal to the count"
    );
    assert_eq!(
        scan(e, b"", None, 11).len(),
        10,
        "engine `{name}`: limit above the count"
    );
    assert_eq!(
        scan(e, b"", Some(&[b'k', 2]), 5).len(),
        2,
        "engine `{name}`: end bound before the limit"
    );
}

/// Deleted keys don't show up in scans, including deletes that shadow older puts.
pub fn scan_skips_deleted(e: &dyn StorageEngine) {
    let mut batch = WriteBatch::new();
    for i in 0u8..6 {
        batch.put([b'k', i], [i]);
    }
    apply(e, &batch);
    let mut batch = WriteBatch::new();
    batch.delete([b'k', 0]).delete([b'k', 2]).delete([b'k', 5]);
    apply(e, &batch);
    assert_eq!(
        keys_of(&scan(e, b"", None, usize::MAX)),
        vec![vec![b'k', 1], vec![b'k', 3], vec![b'k', 4]],
        "engine `{}`: scan must skip deleted keys",
        e.name()
    );
    assert_eq!(
        keys_of(&scan(e, b"", None, 2)),
        vec![vec![b'k', 1], vec![b'k', 3]],
        "engine `{}`: deleted keys must not count towards the limit",
        e.name()
    );
}

/// An empty value is a value: present, distinct from absent.
pub fn empty_values(e: &dyn StorageEngine) {
    put(e, b"empty", b"");
    assert_eq!(
        get(e, b"empty"),
        Some(Vec::new()),
        "engine `{}`: an empty value must read back as Some(empty)",
        e.name()
    );
    assert_eq!(
        scan(e, b"", None, usize::MAX),
        vec![(b"empty".to_vec(), Vec::new())],
        "engine `{}`: scan must include keys with empty values",
        e.name()
    );
    put(e, b"empty", b"now full");
    put(e, b"empty", b"");
    assert_eq!(
        get(e, b"empty"),
        Some(Vec::new()),
        "engine `{}`: overwrite with an empty value",
        e.name()
    );
}

/// 1 MiB values (the node's default value limit, plus record overhead) round-trip intact.
pub fn large_values(e: &dyn StorageEngine) {
    const MIB: usize = 1024 * 1024;
    // Patterned, not constant, so truncation or block mix-ups are visible.
    let big = |seed: u8, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 8) as u8))
            .collect()
    };
    let one = big(1, MIB);
    let two = big(2, MIB + 4096);
    let mut batch = WriteBatch::new();
    batch
        .put(&b"big1"[..], one.clone())
        .put(&b"big2"[..], two.clone())
        .put(&b"small"[..], &b"s"[..]);
    apply(e, &batch);
    let name = e.name();
    assert!(
        get(e, b"big1") == Some(one.clone()),
        "engine `{name}`: a 1 MiB value must round-trip byte for byte"
    );
    assert!(
        get(e, b"big2") == Some(two),
        "engine `{name}`: a value just over 1 MiB must round-trip byte for byte"
    );
    let scanned = scan(e, b"big1", Some(b"big2"), usize::MAX);
    assert!(
        scanned.len() == 1 && scanned[0].1 == one,
        "engine `{name}`: scan must return the whole 1 MiB value"
    );
    put(e, b"big1", b"tiny");
    assert_eq!(
        get(e, b"big1").as_deref(),
        Some(&b"tiny"[..]),
        "engine `{name}`: overwrite a large value with a small one"
    );
    must(e, "sync", e.sync());
    assert_eq!(
        get(e, b"small").as_deref(),
        Some(&b"s"[..]),
        "engine `{name}`: small value next to large ones"
    );
}

/// Keys are arbitrary bytes, compared as unsigned bytes: 0x00 and 0xFF are ordinary.
pub fn binary_keys(e: &dyn StorageEngine) {
    let keys: [&[u8]; 9] = [
        b"\xff\xff",
        b"\x00",
        b"\xff",
        b"\x00\x00",
        b"\x01",
        b"\xff\x00",
        b"\x00\xff",
        b"\x7f\x80",
        b"d\x00key\xffwith\x00nuls",
    ];
    let mut batch = WriteBatch::new();
    for (i, k) in keys.iter().enumerate() {
        batch.put(*k, vec![u8::try_from(i).unwrap_or(u8::MAX)]);
    }
    apply(e, &batch);
    let name = e.name();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            get(e, k),
            Some(vec![u8::try_from(i).unwrap_or(u8::MAX)]),
            "engine `{name}`: binary key {k:?}"
        );
    }
    let mut expected = to_vecs(&keys);
    expected.sort();
    assert_eq!(
        keys_of(&scan(e, b"", None, usize::MAX)),
        expected,
        "engine `{name}`: binary keys must sort as unsigned bytes (0x00 first, 0xFF last)"
    );
    assert_eq!(
        keys_of(&scan(e, b"\xff", None, usize::MAX)),
        to_vecs(&[b"\xff", b"\xff\x00", b"\xff\xff"]),
        "engine `{name}`: scan from 0xFF"
    );
    assert_eq!(
        keys_of(&scan(e, b"\x00", Some(b"\x01"), usize::MAX)),
        to_vecs(&[b"\x00", b"\x00\x00", b"\x00\xff"]),
        "engine `{name}`: scan [0x00, 0x01)"
    );
    let mut batch = WriteBatch::new();
    batch.delete(&b"\x00"[..]).delete(&b"\xff\xff"[..]);
    apply(e, &batch);
    assert_eq!(get(e, b"\x00"), None, "engine `{name}`: delete of key 0x00");
    assert_eq!(
        get(e, b"\x00\x00").map(|v| v.len()),
        Some(1),
        "engine `{name}`: 0x0000 must survive deleting 0x00"
    );
}

/// Ten thousand keys in several batches: point reads, full and windowed scans, mass delete.
pub fn many_keys(e: &dyn StorageEngine) {
    const N: u32 = 10_000;
    let key = |i: u32| {
        let mut k = b"many/".to_vec();
        k.extend_from_slice(&i.to_be_bytes());
        k
    };
    // Insert in a scrambled order (i * 7919 mod N is a permutation: 7919 is prime, N is not
    // a multiple of it), in batches of 500.
    let order: Vec<u32> = (0..N).map(|i| (i * 7919) % N).collect();
    for chunk in order.chunks(500) {
        let mut batch = WriteBatch::new();
        for &i in chunk {
            batch.put(key(i), i.to_le_bytes());
        }
        apply(e, &batch);
    }
    let name = e.name();
    for i in [0, 1, 2, 4999, 5000, 9998, N - 1] {
        assert_eq!(
            get(e, &key(i)),
            Some(i.to_le_bytes().to_vec()),
            "engine `{name}`: key {i} of {N}"
        );
    }
    assert_eq!(get(e, &key(N)), None, "engine `{name}`: key past the last");
    let all = scan(e, b"many/", Some(b"many0"), usize::MAX);
    assert_eq!(
        all.len(),
        N as usize,
        "engine `{name}`: a full scan must return all {N} keys"
    );
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, (k, v))| *k == key(i as u32) && *v == (i as u32).to_le_bytes()),
        "engine `{name}`: a full scan of {N} keys must be in order with matching values"
    );
    let window = scan(e, &key(1234), Some(&key(1334)), usize::MAX);
    assert_eq!(
        keys_of(&window),
        (1234..1334).map(key).collect::<Vec<_>>(),
        "engine `{name}`: windowed scan"
    );

    let mut batch = WriteBatch::new();
    for i in (0..N).filter(|i| i % 2 == 0) {
        batch.delete(key(i));
    }
    apply(e, &batch);
    let odd = scan(e, b"many/", None, usize::MAX);
    assert_eq!(
        odd.len(),
        (N / 2) as usize,
        "engine `{name}`: after deleting every even key"
    );
    assert!(
        odd.iter()
            .enumerate()
            .all(|(j, (k, _))| *k == key(2 * j as u32 + 1)),
        "engine `{name}`: only odd keys must remain, in order"
    );
}

/// `sync` succeeds on an empty engine, after writes and when repeated, and changes nothing.
pub fn sync_succeeds(e: &dyn StorageEngine) {
    must(e, "sync of an empty engine", e.sync());
    put(e, b"k", b"v");
    must(e, "sync after a put", e.sync());
    must(e, "second sync", e.sync());
    assert_eq!(
        get(e, b"k").as_deref(),
        Some(&b"v"[..]),
        "engine `{}`: data must be readable after sync",
        e.name()
    );
    put(e, b"k2", b"v2");
    must(e, "sync after another put", e.sync());
    assert_eq!(
        scan(e, b"", None, usize::MAX).len(),
        2,
        "engine `{}`: scan after syncs",
        e.name()
    );
}
