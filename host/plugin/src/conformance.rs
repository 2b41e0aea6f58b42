//! The conformance suite of reconciler plugins: the laws, plus the semantics each shipped
//! reconciler promises (cart, lww, counter).
//!
//! Like the storage engines' suite in `quiver-node`, it lives in the library so that tests,
//! `quiver plugin validate` and plugins written in other languages (a Python cart must pass
//! [`CART`]) all run the very same checks: call [`run`] with a loaded plugin and the lists
//! that apply, e.g. `run(&cart, &[COMMON, CART])`.
//!
//! Checks panic with a message naming the check, the plugin and what was expected.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use serde_json::Value;

use crate::error::PluginError;
use crate::laws::check_laws;
use crate::runtime::{Limits, Merged, Reconciler, Sibling};

/// One check: panics on a violation.
pub type Check = fn(&Reconciler);

/// Seed of the law check: fixed, so a failure reproduces.
const LAW_SEED: u64 = 0x5155_4956_4552;

/// Sibling sets the law check generates per plugin.
const LAW_CASES: u32 = 150;

/// Checks every reconciler must pass.
pub const COMMON: &[(&str, Check)] = &[
    ("laws_hold", laws_hold),
    ("examples_are_valid", examples_are_valid),
    ("all_tombstones_delete", all_tombstones_delete),
    ("no_siblings_is_an_error", no_siblings_is_an_error),
];

/// Checks of the shopping cart (observed-remove set).
pub const CART: &[(&str, Check)] = &[
    ("cart_add_and_remove", cart_add_and_remove),
    (
        "cart_remove_is_honoured_by_merge",
        cart_remove_is_honoured_by_merge,
    ),
    (
        "cart_concurrent_add_wins_over_remove",
        cart_concurrent_add_wins_over_remove,
    ),
    ("cart_readd_after_remove", cart_readd_after_remove),
    (
        "cart_tombstone_siblings_are_ignored",
        cart_tombstone_siblings_are_ignored,
    ),
    (
        "cart_invalid_input_is_refused",
        cart_invalid_input_is_refused,
    ),
];

/// Checks of last-write-wins.
pub const LWW: &[(&str, Check)] = &[
    ("lww_latest_timestamp_wins", lww_latest_timestamp_wins),
    (
        "lww_ties_break_by_actor_then_counter",
        lww_ties_break_by_actor_then_counter,
    ),
    (
        "lww_winning_tombstone_deletes",
        lww_winning_tombstone_deletes,
    ),
    ("lww_any_bytes_are_valid", lww_any_bytes_are_valid),
    ("lww_update_is_unsupported", lww_update_is_unsupported),
];

/// Checks of the PN-counter.
pub const COUNTER: &[(&str, Check)] = &[
    (
        "counter_increments_accumulate",
        counter_increments_accumulate,
    ),
    (
        "counter_concurrent_increments_add_up",
        counter_concurrent_increments_add_up,
    ),
    (
        "counter_stale_sibling_changes_nothing",
        counter_stale_sibling_changes_nothing,
    ),
    (
        "counter_tombstone_siblings_are_ignored",
        counter_tombstone_siblings_are_ignored,
    ),
    (
        "counter_invalid_input_is_refused",
        counter_invalid_input_is_refused,
    ),
];

/// Runs every check of every list on `r`. Panics on the first failing check, naming it.
pub fn run(r: &Reconciler, lists: &[&[(&str, Check)]]) {
    for (name, check) in lists.iter().flat_map(|l| l.iter()) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(r))) {
            eprintln!(
                "reconciler conformance check `{name}` failed on plugin `{}`",
                r.label()
            );
            resume_unwind(panic);
        }
    }
}

fn limits() -> Limits {
    Limits::default()
}

#[track_caller]
fn must<T>(r: &Reconciler, what: &str, result: Result<T, PluginError>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("plugin `{}`: {what} failed: {e}", r.label()),
    }
}

/// A live sibling with the given metadata.
pub fn sibling(value: &[u8], timestamp_ms: u64, actor: &str, counter: u64) -> Sibling {
    Sibling {
        value: value.to_vec(),
        timestamp_ms,
        actor: actor.to_owned(),
        counter,
        tombstone: false,
    }
}

/// A tombstone sibling with the given metadata.
pub fn tombstone(timestamp_ms: u64, actor: &str, counter: u64) -> Sibling {
    Sibling {
        value: Vec::new(),
        timestamp_ms,
        actor: actor.to_owned(),
        counter,
        tombstone: true,
    }
}

#[track_caller]
fn merge(r: &Reconciler, siblings: &[Sibling]) -> Merged {
    must(r, "merge", r.merge(siblings, &limits()))
}

#[track_caller]
fn merge_value(r: &Reconciler, siblings: &[Sibling]) -> Vec<u8> {
    match merge(r, siblings) {
        Merged::Value(v) => v,
        Merged::Tombstone => panic!(
            "plugin `{}`: merge deleted the key, expected a value",
            r.label()
        ),
    }
}

/// Merges `values` as siblings with distinct dots, in every rotation, checking that every
/// order gives the same value.
#[track_caller]
fn merge_values(r: &Reconciler, values: &[&[u8]]) -> Vec<u8> {
    let siblings: Vec<Sibling> = values
        .iter()
        .enumerate()
        .map(|(i, v)| sibling(v, 1_000 + i as u64, "n1", i as u64 + 1))
        .collect();
    let first = merge_value(r, &siblings);
    for shift in 1..siblings.len() {
        let mut rotated = siblings.clone();
        rotated.rotate_left(shift);
        assert_eq!(
            merge_value(r, &rotated),
            first,
            "plugin `{}`: merge depends on sibling order",
            r.label()
        );
    }
    first
}

#[track_caller]
fn update(r: &Reconciler, current: Option<&[u8]>, op: &str, actor: &str) -> Vec<u8> {
    must(
        r,
        &format!("update {op}"),
        r.update(current, op.as_bytes(), actor, &limits()),
    )
}

/// The laws hold on generated sibling sets.
pub fn laws_hold(r: &Reconciler) {
    let report = must(
        r,
        "check_laws",
        check_laws(r, LAW_SEED, LAW_CASES, &limits()),
    );
    assert!(report.is_lawful(), "{report}");
}

/// Every example merges on its own.
pub fn examples_are_valid(r: &Reconciler) {
    let examples = must(r, "examples", r.examples(&limits()));
    assert!(
        !examples.is_empty(),
        "plugin `{}`: examples() must return at least one value",
        r.label()
    );
    for example in examples {
        must(
            r,
            "merge of an example",
            r.merge(&[sibling(&example, 1, "n1", 1)], &limits()),
        );
    }
}

/// When every sibling is a tombstone the key stays deleted.
pub fn all_tombstones_delete(r: &Reconciler) {
    assert_eq!(
        merge(r, &[tombstone(5, "n1", 1)]),
        Merged::Tombstone,
        "plugin `{}`: one tombstone",
        r.label()
    );
    assert_eq!(
        merge(r, &[tombstone(5, "n1", 1), tombstone(9, "n2", 4)]),
        Merged::Tombstone,
        "plugin `{}`: only tombstones must merge to a tombstone",
        r.label()
    );
}

/// The host refuses an empty merge before reaching the plugin.
pub fn no_siblings_is_an_error(r: &Reconciler) {
    assert!(
        matches!(r.merge(&[], &limits()), Err(PluginError::NoSiblings { .. })),
        "plugin `{}`: merge of no siblings must be NoSiblings",
        r.label()
    );
}

#[track_caller]
fn expect_invalid_value(r: &Reconciler, good: &[u8], bad: &[u8]) {
    let siblings = [sibling(good, 1, "n1", 1), sibling(bad, 2, "n2", 1)];
    match r.merge(&siblings, &limits()) {
        Err(PluginError::InvalidValue { .. }) => {}
        other => panic!(
            "plugin `{}`: merge with value {:?} must fail with invalid-value, got {other:?}",
            r.label(),
            String::from_utf8_lossy(bad)
        ),
    }
}

#[track_caller]
fn expect_invalid_op(r: &Reconciler, op: &str) {
    match r.update(None, op.as_bytes(), "n1", &limits()) {
        Err(PluginError::InvalidOp { .. }) => {}
        other => panic!(
            "plugin `{}`: update {op:?} must fail with invalid-op, got {other:?}",
            r.label()
        ),
    }
}

// ---- cart ----

/// The items a cart state shows: those with at least one tag not removed.
pub fn cart_items(state: &[u8]) -> BTreeSet<String> {
    let Ok(Value::Object(cart)) = serde_json::from_slice::<Value>(state) else {
        panic!(
            "cart state is not a JSON object: {:?}",
            String::from_utf8_lossy(state)
        );
    };
    let tags_of = |field: &str| -> BTreeMap<String, BTreeSet<String>> {
        let mut out = BTreeMap::new();
        if let Some(Value::Object(items)) = cart.get(field) {
            for (item, tags) in items {
                let tags = tags.as_array().map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_owned))
                        .collect()
                });
                out.insert(item.clone(), tags.unwrap_or_default());
            }
        }
        out
    };
    let removed = tags_of("removed");
    tags_of("adds")
        .into_iter()
        .filter(|(item, tags)| {
            tags.iter()
                .any(|t| !removed.get(item).is_some_and(|r| r.contains(t)))
        })
        .map(|(item, _)| item)
        .collect()
}

fn items(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

fn add(item: &str) -> String {
    format!("{{\"add\":{item:?}}}")
}

fn remove(item: &str) -> String {
    format!("{{\"remove\":{item:?}}}")
}

/// Adds show items, removes hide them, removing an absent item is a no-op.
pub fn cart_add_and_remove(r: &Reconciler) {
    let s = update(r, None, &add("apple"), "n1");
    assert_eq!(cart_items(&s), items(&["apple"]), "add to an empty cart");
    let s = update(r, Some(&s), &add("pear"), "n1");
    let s = update(r, Some(&s), &add("apple"), "n1");
    assert_eq!(cart_items(&s), items(&["apple", "pear"]), "adds");
    let s = update(r, Some(&s), &remove("apple"), "n1");
    assert_eq!(
        cart_items(&s),
        items(&["pear"]),
        "remove drops every add of the item"
    );
    let s = update(r, Some(&s), &remove("kiwi"), "n1");
    assert_eq!(
        cart_items(&s),
        items(&["pear"]),
        "removing an absent item changes nothing"
    );
}

/// A remove in one sibling is not undone by merging a sibling that still has the item
/// (and was not re-added concurrently).
pub fn cart_remove_is_honoured_by_merge(r: &Reconciler) {
    let base = update(r, None, &add("apple"), "n1");
    let base = update(r, Some(&base), &add("pear"), "n1");
    let removed = update(r, Some(&base), &remove("apple"), "n2");
    let merged = merge_values(r, &[&base, &removed]);
    assert_eq!(
        cart_items(&merged),
        items(&["pear"]),
        "a removed item must stay removed after merge"
    );
    let other_change = update(r, Some(&base), &add("plum"), "n3");
    let merged = merge_values(r, &[&removed, &other_change, &base]);
    assert_eq!(
        cart_items(&merged),
        items(&["pear", "plum"]),
        "remove and an unrelated concurrent add"
    );
}

/// An add concurrent with a remove of the same item wins.
pub fn cart_concurrent_add_wins_over_remove(r: &Reconciler) {
    let base = update(r, None, &add("apple"), "n1");
    let removed = update(r, Some(&base), &remove("apple"), "n1");
    let readded = update(r, Some(&base), &add("apple"), "n2");
    let merged = merge_values(r, &[&removed, &readded]);
    assert_eq!(
        cart_items(&merged),
        items(&["apple"]),
        "a concurrent add must win over a remove"
    );
}

/// The same actor can remove and add an item again; the new add survives merging with the
/// remove.
pub fn cart_readd_after_remove(r: &Reconciler) {
    let s = update(r, None, &add("apple"), "n1");
    let removed = update(r, Some(&s), &remove("apple"), "n1");
    let readded = update(r, Some(&removed), &add("apple"), "n1");
    assert_eq!(
        cart_items(&readded),
        items(&["apple"]),
        "re-add after remove"
    );
    let merged = merge_values(r, &[&removed, &readded, &s]);
    assert_eq!(
        cart_items(&merged),
        items(&["apple"]),
        "re-add merged with its own remove"
    );
}

/// Tombstones are ignored next to carts.
pub fn cart_tombstone_siblings_are_ignored(r: &Reconciler) {
    let cart = update(r, None, &add("apple"), "n1");
    let merged = merge_value(r, &[tombstone(99, "n2", 7), sibling(&cart, 1, "n1", 1)]);
    assert_eq!(
        cart_items(&merged),
        items(&["apple"]),
        "a tombstone must not empty a cart"
    );
}

/// Malformed states and operations are refused with the right error, not a trap.
pub fn cart_invalid_input_is_refused(r: &Reconciler) {
    let good = update(r, None, &add("apple"), "n1");
    expect_invalid_value(r, &good, b"not json");
    expect_invalid_value(r, &good, br#"{"adds":{"x":["no-counter"]}}"#);
    expect_invalid_value(r, &good, br#"{"adds":[1,2]}"#);
    expect_invalid_value(r, &good, &[0xff, 0xfe]);
    expect_invalid_op(r, "{\"add\":1}");
    expect_invalid_op(r, "{\"paint\":\"apple\"}");
    expect_invalid_op(r, "garbage");
}

// ---- lww ----

/// The highest timestamp wins whatever the order.
pub fn lww_latest_timestamp_wins(r: &Reconciler) {
    let old = sibling(b"old", 100, "n9", 9);
    let new = sibling(b"new", 200, "n1", 1);
    assert_eq!(merge_value(r, &[old.clone(), new.clone()]), b"new");
    assert_eq!(merge_value(r, &[new, old]), b"new");
}

/// Equal timestamps: the greater actor wins, then the greater counter.
pub fn lww_ties_break_by_actor_then_counter(r: &Reconciler) {
    let a = sibling(b"from-a", 100, "a", 5);
    let b = sibling(b"from-b", 100, "b", 1);
    assert_eq!(
        merge_value(r, &[a.clone(), b.clone()]),
        b"from-b",
        "actor breaks a timestamp tie"
    );
    assert_eq!(
        merge_value(r, &[b, a]),
        b"from-b",
        "actor breaks a timestamp tie (reversed)"
    );
    let low = sibling(b"low", 100, "a", 1);
    let high = sibling(b"high", 100, "a", 2);
    assert_eq!(
        merge_value(r, &[high.clone(), low.clone()]),
        b"high",
        "counter breaks an actor tie"
    );
    assert_eq!(
        merge_value(r, &[low, high]),
        b"high",
        "counter breaks an actor tie (reversed)"
    );
}

/// A newest tombstone deletes; an older one loses.
pub fn lww_winning_tombstone_deletes(r: &Reconciler) {
    let value = sibling(b"v", 100, "n1", 1);
    assert_eq!(
        merge(r, &[value.clone(), tombstone(200, "n2", 1)]),
        Merged::Tombstone
    );
    assert_eq!(
        merge(r, &[tombstone(50, "n2", 1), value]),
        Merged::Value(b"v".to_vec())
    );
}

/// Values are opaque: not UTF-8, empty, large.
pub fn lww_any_bytes_are_valid(r: &Reconciler) {
    for value in [vec![], vec![0xff, 0x00, 0xfe], vec![7u8; 64 * 1024]] {
        assert_eq!(merge_value(r, &[sibling(&value, 1, "n1", 1)]), value);
    }
}

/// lww has no operations.
pub fn lww_update_is_unsupported(r: &Reconciler) {
    assert!(
        matches!(
            r.update(None, b"{}", "n1", &limits()),
            Err(PluginError::Unsupported { .. })
        ),
        "plugin `{}`: update must be unsupported",
        r.label()
    );
}

// ---- counter ----

/// The value of a PN-counter state: sum(p) - sum(n).
pub fn counter_value(state: &[u8]) -> i128 {
    let Ok(Value::Object(counter)) = serde_json::from_slice::<Value>(state) else {
        panic!(
            "counter state is not a JSON object: {:?}",
            String::from_utf8_lossy(state)
        );
    };
    let sum = |field: &str| -> i128 {
        counter
            .get(field)
            .and_then(Value::as_object)
            .map(|m| m.values().filter_map(Value::as_u64).map(i128::from).sum())
            .unwrap_or(0)
    };
    sum("p") - sum("n")
}

/// One actor's increments and decrements add up.
pub fn counter_increments_accumulate(r: &Reconciler) {
    let s = update(r, None, "{\"add\":3}", "n1");
    assert_eq!(counter_value(&s), 3);
    let s = update(r, Some(&s), "{\"add\":4}", "n1");
    assert_eq!(counter_value(&s), 7);
    let s = update(r, Some(&s), "{\"add\":-10}", "n1");
    assert_eq!(counter_value(&s), -3);
    let s = update(r, Some(&s), "{\"add\":0}", "n1");
    assert_eq!(counter_value(&s), -3);
}

/// Increments by different actors on the same base are all counted after a merge.
pub fn counter_concurrent_increments_add_up(r: &Reconciler) {
    let base = update(r, None, "{\"add\":10}", "n1");
    let a = update(r, Some(&base), "{\"add\":5}", "n1");
    let b = update(r, Some(&base), "{\"add\":2}", "n2");
    let c = update(r, Some(&base), "{\"add\":-1}", "n3");
    assert_eq!(counter_value(&merge_values(r, &[&a, &b, &c])), 16);
}

/// Merging an older state of the same counter changes nothing.
pub fn counter_stale_sibling_changes_nothing(r: &Reconciler) {
    let old = update(r, None, "{\"add\":1}", "n1");
    let new = update(r, Some(&old), "{\"add\":1}", "n1");
    assert_eq!(counter_value(&merge_values(r, &[&old, &new])), 2);
}

/// Tombstones are ignored next to counters.
pub fn counter_tombstone_siblings_are_ignored(r: &Reconciler) {
    let state = update(r, None, "{\"add\":4}", "n1");
    let merged = merge_value(r, &[sibling(&state, 1, "n1", 1), tombstone(99, "n2", 3)]);
    assert_eq!(counter_value(&merged), 4);
}

/// Malformed states and operations are refused with the right error, not a trap.
pub fn counter_invalid_input_is_refused(r: &Reconciler) {
    let good = update(r, None, "{\"add\":1}", "n1");
    expect_invalid_value(r, &good, b"[1,2]");
    expect_invalid_value(r, &good, br#"{"p":{"n1":-1}}"#);
    expect_invalid_value(r, &good, &[0xff]);
    expect_invalid_op(r, "{\"add\":\"three\"}");
    expect_invalid_op(r, "{\"add\":99999999999999999999}");
    expect_invalid_op(r, "{}");
    let max = update(r, None, &format!("{{\"add\":{}}}", i64::MAX), "n1");
    let max = update(r, Some(&max), &format!("{{\"add\":{}}}", i64::MAX), "n1");
    match r.update(Some(&max), b"{\"add\":2}", "n1", &limits()) {
        Err(PluginError::InvalidOp { .. }) => {}
        other => panic!(
            "plugin `{}`: an overflowing add must be invalid-op, got {other:?}",
            r.label()
        ),
    }
}
