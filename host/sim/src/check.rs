//! The checkers: pure functions over what the simulation recorded.
//!
//! Each returns `Err(message)` naming the key, the dot and the value at fault; the driver
//! wraps the message with the seed and the replay command.

use std::collections::{BTreeMap, BTreeSet};

use quiver_core::causality::{Dot, Object, VersionVector};

/// A dot some coordinator issued (from `Observation::DotIssued`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// Coordinator.
    pub node: String,
    /// Key.
    pub key: String,
    /// The dot.
    pub dot: Dot,
    /// The client context the write was applied with: the siblings it replaced.
    pub context: VersionVector,
    /// Value (empty for a tombstone).
    pub value: Vec<u8>,
    /// Simulated time of issue, in ms.
    pub at_ms: u64,
}

/// A write the client saw acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedWrite {
    /// Client number.
    pub client: usize,
    /// Key.
    pub key: String,
    /// Its dot.
    pub dot: Dot,
    /// Value (empty for a delete).
    pub value: Vec<u8>,
    /// Simulated time of the acknowledgement, in ms.
    pub acked_ms: u64,
}

fn render(value: &[u8]) -> String {
    if value.is_empty() {
        "<tombstone>".to_string()
    } else {
        String::from_utf8_lossy(value).into_owned()
    }
}

/// Dots of `key` whose absence from `object` is explained: present as siblings, removed as
/// a tombstone every replica held (reaped), or covered by the client context of a write
/// that is itself explained, or by a reaped state's context. Contexts are version vectors,
/// so "covered by one of a set of contexts" is "covered by their join".
fn justified(object: &Object, issued: &[&Issued], reaped: &[&Object]) -> BTreeSet<Dot> {
    let mut set: BTreeSet<Dot> = object.siblings().iter().map(|s| s.dot.clone()).collect();
    let mut cover = VersionVector::new();
    for r in reaped {
        set.extend(r.siblings().iter().map(|s| s.dot.clone()));
        cover.join(r.context());
    }
    for i in issued {
        if set.contains(&i.dot) {
            cover.join(&i.context);
        }
    }
    loop {
        let mut grew = false;
        for i in issued {
            if !set.contains(&i.dot) && cover.covers(&i.dot) {
                set.insert(i.dot.clone());
                cover.join(&i.context);
                grew = true;
            }
        }
        if !grew {
            return set;
        }
    }
}

/// Tombstone states removed by reaping, by key.
fn reaped_by_key(reaped: &[(String, Object)]) -> BTreeMap<&str, Vec<&Object>> {
    let mut map: BTreeMap<&str, Vec<&Object>> = BTreeMap::new();
    for (key, object) in reaped {
        map.entry(key.as_str()).or_default().push(object);
    }
    map
}

fn by_key(issued: &[Issued]) -> BTreeMap<&str, Vec<&Issued>> {
    let mut map: BTreeMap<&str, Vec<&Issued>> = BTreeMap::new();
    for i in issued {
        map.entry(i.key.as_str()).or_default().push(i);
    }
    map
}

/// Checks `object` (a replica's state of `key`, or the merge of all replicas) against
/// every acknowledged write of the key; `what` names the object in messages.
fn check_object(
    key: &str,
    object: &Object,
    what: &str,
    acked: &[AckedWrite],
    issued: &[&Issued],
    reaped: &[&Object],
) -> Result<(), String> {
    let ok = justified(object, issued, reaped);
    for a in acked.iter().filter(|a| a.key == key) {
        if !ok.contains(&a.dot) {
            let siblings: Vec<String> = object
                .siblings()
                .iter()
                .map(|s| format!("{}={}", s.dot.actor, render(&s.value)))
                .collect();
            return Err(format!(
                "key {key:?}: acknowledged write {:?} (dot {}:{}, client {}, acked at {} ms) \
                 is lost in {what}: neither a sibling nor covered by a later write that survives; \
                 siblings there: [{}]",
                render(&a.value),
                a.dot.actor,
                a.dot.counter,
                a.client,
                a.acked_ms,
                siblings.join(", ")
            ));
        }
    }
    // Nothing never attempted: every surviving sibling is a write some coordinator issued.
    for s in object.siblings() {
        if !issued.iter().any(|i| i.dot == s.dot && i.value == s.value) {
            return Err(format!(
                "key {key:?}: {what} holds sibling {}:{}={:?} that no coordinator issued",
                s.dot.actor,
                s.dot.counter,
                render(&s.value)
            ));
        }
    }
    Ok(())
}

/// Checker 1, no acknowledged write lost: for every key, the merge of every node's copy
/// (a full read) keeps every acknowledged write as a sibling or covers it by a later write
/// whose context covered it and which survives in turn. With reaping, a delete may be
/// gone: a tombstone removed because every replica held it (`reaped`) explains its own
/// absence and that of what it overwrote (the resurrection checker covers the rest).
pub fn no_lost_writes(
    full_reads: &BTreeMap<String, Object>,
    acked: &[AckedWrite],
    issued: &[Issued],
    reaped: &[(String, Object)],
) -> Result<(), String> {
    let issued = by_key(issued);
    let reaped = reaped_by_key(reaped);
    let empty = Object::new();
    let keys: BTreeSet<&str> = acked.iter().map(|a| a.key.as_str()).collect();
    for key in keys {
        let object = full_reads.get(key).unwrap_or(&empty);
        let mine = issued.get(key).map(Vec::as_slice).unwrap_or(&[]);
        let gone = reaped.get(key).map(Vec::as_slice).unwrap_or(&[]);
        check_object(
            key,
            object,
            "the full read (merge of every node)",
            acked,
            mine,
            gone,
        )?;
    }
    Ok(())
}

/// Checker 2, convergence: after healing and read repair, every primary replica of every
/// key holds the same object, and that object keeps every acknowledged write (equality
/// alone is not enough: last-write-wins would make replicas equal by losing data).
pub fn convergence(
    replicas: &BTreeMap<String, Vec<(String, Object)>>,
    acked: &[AckedWrite],
    issued: &[Issued],
    reaped: &[(String, Object)],
) -> Result<(), String> {
    let issued = by_key(issued);
    let reaped = reaped_by_key(reaped);
    for (key, copies) in replicas {
        let mine = issued.get(key.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        let gone = reaped.get(key.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        for (node, object) in copies {
            let what = format!("primary replica {node}");
            check_object(key, object, &what, acked, mine, gone)?;
        }
        if let Some((first, reference)) = copies.first()
            && let Some((node, _)) = copies.iter().find(|(_, o)| o != reference)
        {
            return Err(format!(
                "key {key:?}: primary replicas {first} and {node} still differ after heal and \
                 read repair"
            ));
        }
    }
    Ok(())
}

/// Checker 3, hints drain: after healing, no node holds a hint marker.
pub fn hints_drained(hints: &[(String, String, String)]) -> Result<(), String> {
    match hints.first() {
        None => Ok(()),
        Some((node, owner, key)) => Err(format!(
            "{} hint marker(s) left after heal, e.g. node {node} still holds key {key:?} for {owner}",
            hints.len()
        )),
    }
}

/// Checker 4, dots are never issued twice for a key (riak_kv#679).
pub fn unique_dots(issued: &[Issued]) -> Result<(), String> {
    let mut seen: BTreeMap<(&str, &Dot), &Issued> = BTreeMap::new();
    for i in issued {
        if let Some(first) = seen.insert((i.key.as_str(), &i.dot), i) {
            return Err(format!(
                "key {:?}: dot {}:{} issued twice: by {} at {} ms for {:?} and by {} at {} ms for {:?}",
                i.key,
                i.dot.actor,
                i.dot.counter,
                first.node,
                first.at_ms,
                render(&first.value),
                i.node,
                i.at_ms,
                render(&i.value)
            ));
        }
    }
    Ok(())
}

/// Checker 5, no resurrection: a value an acknowledged delete overwrote (its dot is covered
/// by the context the delete was issued with) is never a live sibling of the final read.
///
/// This is the causal form of "a key whose last acknowledged write is a delete reads as
/// deleted": it also covers keys written concurrently with the delete (their values are
/// not covered and may legitimately survive as siblings) and keys written again later.
/// Without reaping no merge can bring such a value back (every copy of the tombstone's
/// context drops it); with reaping, a stale copy arriving after every replica forgot the
/// tombstone would.
pub fn no_resurrection(
    final_reads: &BTreeMap<String, Object>,
    acked: &[AckedWrite],
    issued: &[Issued],
) -> Result<(), String> {
    let empty = Object::new();
    for delete in acked.iter().filter(|a| a.value.is_empty()) {
        let Some(context) = issued
            .iter()
            .find(|i| i.key == delete.key && i.dot == delete.dot)
            .map(|i| &i.context)
        else {
            continue;
        };
        let object = final_reads.get(&delete.key).unwrap_or(&empty);
        if let Some(s) = object
            .siblings()
            .iter()
            .find(|s| !s.meta.tombstone && context.covers(&s.dot))
        {
            return Err(format!(
                "key {:?}: value {:?} (dot {}:{}) is readable again although the delete \
                 {}:{} acknowledged at {} ms (client {}) overwrote it",
                delete.key,
                render(&s.value),
                s.dot.actor,
                s.dot.counter,
                delete.dot.actor,
                delete.dot.counter,
                delete.acked_ms,
                delete.client
            ));
        }
    }
    Ok(())
}

/// Checker 6, reaping makes progress: with the whole cluster up and in agreement, no key
/// is still held as a tombstone-only state that every holder has held since before
/// `older_than_ms` (simulated ms: the grace period plus slack before the reaper stopped).
/// `held` lists `(node, key, simulated ms at which the node stored its tombstone state)`;
/// a key counts from its latest holder, since the reaper waits for every replica's grace.
pub fn tombstones_reaped(held: &[(String, String, u64)], older_than_ms: u64) -> Result<(), String> {
    let mut latest: BTreeMap<&str, (&str, u64)> = BTreeMap::new();
    for (node, key, t) in held {
        let e = latest.entry(key.as_str()).or_insert((node.as_str(), *t));
        if *t > e.1 {
            *e = (node.as_str(), *t);
        }
    }
    match latest.iter().find(|(_, (_, t))| *t < older_than_ms) {
        None => Ok(()),
        Some((key, (node, t))) => {
            let holders: Vec<String> = held
                .iter()
                .filter(|(_, k, _)| k == key)
                .map(|(n, _, t)| format!("{n} since {t} ms"))
                .collect();
            Err(format!(
                "key {key:?} is still held as a tombstone by every holder since {t} ms at the \
                 latest (node {node}; {} ms before the deadline {older_than_ms} ms) although \
                 every replica is up; holders: {}",
                older_than_ms - t,
                holders.join(", ")
            ))
        }
    }
}

/// Checker 7, membership settles: after healing, every node that is up holds the last
/// committed ring (`final_version`) and knows that every departed node left, and every node
/// the schedule told to leave has departed. `views` lists `(node, ring version, nodes it
/// knows left)` of every node that is up.
pub fn membership_settled(
    views: &[(String, u64, Vec<String>)],
    final_version: u64,
    must_depart: &[String],
    departed: &[String],
) -> Result<(), String> {
    if let Some(node) = must_depart.first() {
        return Err(format!(
            "node {node} was told to leave but has not departed after heal ({} such node(s))",
            must_depart.len()
        ));
    }
    for (node, version, left) in views {
        if *version != final_version {
            return Err(format!(
                "node {node} holds ring version {version}, the last committed is {final_version}"
            ));
        }
        if let Some(gone) = departed.iter().find(|d| !left.contains(d)) {
            return Err(format!(
                "node {node} does not know that {gone} left the cluster"
            ));
        }
    }
    Ok(())
}

/// Checker 8, no orphan copies: after settling, a node holds a key only if it is one of the
/// key's primaries under the final ring (handoff moved every other copy and dropped it),
/// and no node departed holding data. `holdings` lists `(node, key)` of every record of
/// every node that is up; `primaries` the final-ring primaries of each key held;
/// `bad_departures` describes departures that broke the rules.
pub fn no_orphan_copies(
    holdings: &[(String, String)],
    primaries: &BTreeMap<String, Vec<String>>,
    bad_departures: &[String],
) -> Result<(), String> {
    if let Some(bad) = bad_departures.first() {
        return Err(bad.clone());
    }
    for (node, key) in holdings {
        let owners = primaries.get(key).map(Vec::as_slice).unwrap_or(&[]);
        if !owners.contains(node) {
            return Err(format!(
                "node {node} still holds key {key:?} after settling, but the final ring's \
                 primaries are {owners:?}"
            ));
        }
    }
    Ok(())
}
