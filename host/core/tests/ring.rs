//! Tests of `quiver_core::ring`: partitioning, claim balance, movement on membership change,
//! preference lists and spacing, key placement, encoding.
//!
//! References: Dynamo (DeCandia et al., SOSP 2007) §4.2 "Partitioning Algorithm", §4.3
//! "Replication" (preference lists), §6.2 "Ensuring Uniform Load distribution", strategy 3
//! (Q equal-sized partitions, Q/S tokens per node).
//!
//! `cargo test -p quiver-core --test ring print_ring_figures -- --nocapture` prints the
//! balance, movement and spacing figures that notes cite.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use proptest::prelude::*;
use quiver_core::ring::{
    ClaimParams, DEFAULT_N_VAL, DEFAULT_PARTITIONS, Member, Ring, RingError, key_position,
    partition_for_key, partition_of_position, quotas,
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn params(partitions: u32, n_val: u32) -> ClaimParams {
    ClaimParams { partitions, n_val }
}

/// `count` members of weight 1 named `n00`, `n01`, ... (ids sort in creation order).
fn equal(count: usize) -> Vec<Member> {
    (0..count)
        .map(|i| Member::new(format!("n{i:02}")))
        .collect()
}

/// `count` members spread round-robin over `zones` zones `z0`, `z1`, ...
fn zoned(count: usize, zones: usize) -> Vec<Member> {
    (0..count)
        .map(|i| Member::new(format!("n{i:02}")).with_zone(format!("z{}", i % zones)))
        .collect()
}

fn ring(members: Vec<Member>, partitions: u32, n_val: u32) -> Ring {
    match Ring::new(members, params(partitions, n_val)) {
        Ok(r) => r,
        Err(e) => panic!("claim failed: {e}"),
    }
}

fn rebalance(r: &Ring, members: Vec<Member>) -> Ring {
    match r.rebalance(members) {
        Ok(r) => r,
        Err(e) => panic!("rebalance failed: {e}"),
    }
}

/// Owned partitions per member id.
fn counts(r: &Ring) -> BTreeMap<String, u32> {
    r.owned_counts()
        .into_iter()
        .map(|(m, c)| (m.id.clone(), c))
        .collect()
}

/// Least number of partitions any assignment meeting `next`'s quotas must move away from
/// `prev`'s owners: what each node owned beyond its new quota (departed nodes: everything).
fn required_moves(prev: &Ring, next: &Ring) -> u32 {
    let after = counts(next);
    counts(prev)
        .iter()
        .map(|(id, &c)| c.saturating_sub(after.get(id).copied().unwrap_or(0)))
        .sum()
}

fn moved(prev: &Ring, next: &Ring) -> u32 {
    match prev.diff(next) {
        Ok(d) => d.transfers.len() as u32,
        Err(e) => panic!("diff failed: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// Figures (shared by the assertions and by `print_ring_figures`)
// ---------------------------------------------------------------------------------------

/// One line of the balance table: equal weights, S nodes, Q partitions.
struct BalanceRow {
    s: usize,
    min: u32,
    max: u32,
    mean: f64,
    node_violations: u32,
}

impl BalanceRow {
    fn ratio(&self) -> f64 {
        f64::from(self.max) / self.mean
    }
    /// The best max/mean any assignment of whole partitions can reach: ceil(Q/S)/(Q/S).
    fn integer_bound(&self) -> f64 {
        (self.mean.ceil()) / self.mean
    }
}

fn balance_rows(partitions: u32, sizes: std::ops::RangeInclusive<usize>) -> Vec<BalanceRow> {
    sizes
        .map(|s| {
            let r = ring(equal(s), partitions, DEFAULT_N_VAL);
            let c: Vec<u32> = counts(&r).into_values().collect();
            BalanceRow {
                s,
                min: c.iter().copied().min().unwrap_or(0),
                max: c.iter().copied().max().unwrap_or(0),
                mean: f64::from(partitions) / s as f64,
                node_violations: r.spacing().node_violations,
            }
        })
        .collect()
}

fn balance_table(partitions: u32, rows: &[BalanceRow]) -> String {
    let mut out = format!(
        "balance, equal weights, Q={partitions}, N={DEFAULT_N_VAL}\n   S  min  max  max/mean  ceil(Q/S)/(Q/S)  node-spacing-violations\n"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:4} {:4} {:4}  {:8.3}  {:15.3}  {:5}",
            r.s,
            r.min,
            r.max,
            r.ratio(),
            r.integer_bound(),
            r.node_violations
        );
    }
    out
}

/// One line of the movement table: S equal nodes, one joins (or leaves).
struct MoveRow {
    s: usize,
    /// Partitions moved when a node whose id sorts last joins.
    join_last: u32,
    /// Partitions moved when a node whose id sorts first joins.
    join_first: u32,
    /// Partitions moved when the middle node leaves (S -> S-1).
    leave: u32,
    /// The leaver's partitions.
    leaver_owned: u32,
    /// Node / zone spacing violations after the join (last) and the leave.
    join_violations: u32,
    leave_violations: u32,
}

fn move_rows(partitions: u32, sizes: std::ops::RangeInclusive<usize>) -> Vec<MoveRow> {
    sizes
        .map(|s| {
            let base = ring(equal(s), partitions, DEFAULT_N_VAL);
            let mut with_last = equal(s);
            with_last.push(Member::new("zz-joiner"));
            let joined_last = rebalance(&base, with_last);
            let mut with_first = equal(s);
            with_first.push(Member::new("aa-joiner"));
            let joined_first = rebalance(&base, with_first);
            let mut without = equal(s);
            let leaver = without.remove(s / 2);
            let left = rebalance(&base, without);
            MoveRow {
                s,
                join_last: moved(&base, &joined_last),
                join_first: moved(&base, &joined_first),
                leave: moved(&base, &left),
                leaver_owned: base.partitions_of(&leaver.id).len() as u32,
                join_violations: joined_last.spacing().node_violations,
                leave_violations: left.spacing().node_violations,
            }
        })
        .collect()
}

fn move_table(partitions: u32, rows: &[MoveRow]) -> String {
    let mut out = format!(
        "movement, equal weights, Q={partitions}, N={DEFAULT_N_VAL} (fractions of Q; ideal join = 1/(S+1))\n   S  join(last id)  frac   x1/(S+1)  join(first id)  x1/(S+1)  leave  leaver-owned  viol-after-join  viol-after-leave\n"
    );
    for r in rows {
        let ideal = f64::from(partitions) / (r.s + 1) as f64;
        let _ = writeln!(
            out,
            "{:4} {:13}  {:.4}  {:8.3}  {:14}  {:8.3}  {:5}  {:12}  {:15}  {:16}",
            r.s,
            r.join_last,
            f64::from(r.join_last) / f64::from(partitions),
            f64::from(r.join_last) / ideal,
            r.join_first,
            f64::from(r.join_first) / ideal,
            r.leave,
            r.leaver_owned,
            r.join_violations,
            r.leave_violations
        );
    }
    out
}

/// How many preference lists each node is a primary of, relative to its share: a node owning
/// `c` partitions would be a primary of `n * c` lists if every `n` consecutive owners were
/// distinct. Returns the largest ratio over the nodes (1.0 = perfectly even).
fn primary_load_ratio(r: &Ring, n: usize) -> f64 {
    let mut load: BTreeMap<&str, u32> = BTreeMap::new();
    for p in 0..r.partitions() {
        let Ok(list) = r.preference_list(p, n) else {
            continue;
        };
        for m in list.primaries {
            *load.entry(m.id.as_str()).or_insert(0) += 1;
        }
    }
    r.owned_counts()
        .iter()
        .filter(|(_, c)| *c > 0)
        .map(|(m, c)| {
            f64::from(load.get(m.id.as_str()).copied().unwrap_or(0)) / (n as f64 * f64::from(*c))
        })
        .fold(0.0, f64::max)
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

#[test]
fn partition_counts_must_be_powers_of_two_from_8_to_65536() {
    let cases: &[(u32, bool)] = &[
        (0, false),
        (1, false),
        (4, false),
        (8, true),
        (12, false),
        (256, true),
        (1000, false),
        (1024, true),
        (65_536, true),
        (131_072, false),
        (u32::MAX, false),
    ];
    for &(q, ok) in cases {
        let got = Ring::new(equal(3), params(q, 2));
        match (ok, got) {
            (true, Ok(r)) => assert_eq!(r.partitions(), q),
            (false, Err(RingError::InvalidPartitionCount(bad))) => assert_eq!(bad, q),
            (ok, got) => panic!("Q={q}: expected ok={ok}, got {got:?}"),
        }
        assert_eq!(partition_for_key(q, b"b", b"k").is_ok(), ok, "Q={q}");
    }
}

#[test]
fn bad_member_lists_and_claim_parameters_are_typed_errors() {
    let cases: Vec<(&str, Vec<Member>, ClaimParams, RingError)> = vec![
        (
            "empty",
            vec![],
            ClaimParams::default(),
            RingError::EmptyMembers,
        ),
        (
            "duplicate id",
            vec![Member::new("a"), Member::new("b"), Member::new("a")],
            ClaimParams::default(),
            RingError::DuplicateMember("a".into()),
        ),
        (
            "zero weight",
            vec![Member::new("a"), Member::new("b").with_weight(0)],
            ClaimParams::default(),
            RingError::ZeroWeight("b".into()),
        ),
        (
            "empty id",
            vec![Member::new("")],
            ClaimParams::default(),
            RingError::EmptyMemberId,
        ),
        (
            "more members than partitions",
            equal(9),
            params(8, 2),
            RingError::TooManyMembers {
                members: 9,
                partitions: 8,
            },
        ),
        (
            "n_val 0",
            equal(3),
            params(256, 0),
            RingError::InvalidNVal {
                n_val: 0,
                partitions: 256,
            },
        ),
        (
            "n_val above Q/2",
            equal(3),
            params(8, 5),
            RingError::InvalidNVal {
                n_val: 5,
                partitions: 8,
            },
        ),
    ];
    for (name, members, p, want) in cases {
        assert_eq!(Ring::new(members, p), Err(want.clone()), "{name}");
    }
    // The same checks guard a rebalance.
    let r = ring(equal(3), 256, 3);
    assert_eq!(r.rebalance(vec![]), Err(RingError::EmptyMembers));
    assert_eq!(
        r.rebalance(vec![Member::new("x"), Member::new("x")]),
        Err(RingError::DuplicateMember("x".into()))
    );
    assert_eq!(
        r.preference_list(256, 3),
        Err(RingError::PartitionOutOfRange {
            partition: 256,
            partitions: 256
        })
    );
}

// ---------------------------------------------------------------------------------------
// Balance (Dynamo §6.2, strategy 3)
// ---------------------------------------------------------------------------------------

/// Strategy 3 with exact quotas: the largest owner holds ceil(Q/S) partitions, the integer
/// optimum. At the default Q=1024 that is within 1.10 x the mean for every S up to 64; at
/// Q=256 it is wherever whole partitions allow it (ceil(Q/S)/(Q/S) <= 1.10, i.e. Q/S >= 10
/// or S | Q), which is why 1024 is the default.
#[test]
fn equal_weights_largest_owner_is_within_ten_percent_of_the_mean() {
    for q in [256u32, 1024] {
        let rows = balance_rows(q, 3..=64);
        let table = balance_table(q, &rows);
        for r in &rows {
            assert_eq!(
                r.max,
                r.mean.ceil() as u32,
                "S={} Q={q}: largest owner above ceil(Q/S)\n{table}",
                r.s
            );
            assert!(r.max - r.min <= 1, "S={} Q={q}: spread\n{table}", r.s);
            let bound = 1.10f64.max(r.integer_bound());
            assert!(
                r.ratio() <= bound + 1e-9,
                "S={} Q={q}: max/mean {:.3} > {bound:.3}\n{table}",
                r.s,
                r.ratio()
            );
            if q == DEFAULT_PARTITIONS {
                assert!(r.ratio() <= 1.10, "S={} Q={q} (default)\n{table}", r.s);
            }
        }
    }
}

/// Weights are honoured exactly: each node owns its largest-remainder share of Q, so a
/// weight-2 node owns twice a weight-1 node's partitions up to one partition of rounding.
#[test]
fn weighted_nodes_own_their_exact_quota() {
    let cases: &[(u32, &[u32])] = &[
        (256, &[2, 1, 1, 1]),
        (256, &[2, 1]),
        (1024, &[1, 2, 3, 4]),
        (256, &[5, 1, 1, 1, 1, 1]),
        (4096, &[1, 1, 2, 2, 4, 8, 16]),
        (64, &[100, 1, 1]),
    ];
    for &(q, weights) in cases {
        let members: Vec<Member> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Member::new(format!("n{i:02}")).with_weight(w))
            .collect();
        let r = ring(members.clone(), q, 3);
        let expected = match quotas(&members, q) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(expected.iter().sum::<u32>(), q);
        let total: u32 = weights.iter().sum();
        let owned = counts(&r);
        for ((m, &w), &quota) in members.iter().zip(weights).zip(&expected) {
            let exact = f64::from(q) * f64::from(w) / f64::from(total);
            assert!(
                f64::from(quota) >= exact.floor() && f64::from(quota) <= exact.ceil(),
                "{weights:?} Q={q}: {} quota {quota}, exact {exact}",
                m.id
            );
            assert_eq!(owned.get(&m.id), Some(&quota), "{weights:?} Q={q}");
        }
    }
    // The headline case: weight 2 vs weight 1 is 2x up to rounding (103 vs 51 of 256).
    let r = ring(
        vec![
            Member::new("big").with_weight(2),
            Member::new("s1"),
            Member::new("s2"),
            Member::new("s3"),
        ],
        256,
        3,
    );
    let c = counts(&r);
    assert_eq!(c.get("big"), Some(&103));
    assert_eq!(c.get("s1"), Some(&51));
}

/// Remainders that tie go to the smallest ids, whatever order the members come in, so every
/// node computing quotas from the same membership agrees.
#[test]
fn quota_ties_go_to_the_smallest_ids_regardless_of_input_order() {
    let forward = vec![Member::new("a"), Member::new("b"), Member::new("c")];
    let backward: Vec<Member> = forward.iter().rev().cloned().collect();
    assert_eq!(quotas(&forward, 256), Ok(vec![86, 85, 85]));
    assert_eq!(quotas(&backward, 256), Ok(vec![85, 85, 86]));
    assert_eq!(
        Ring::new(forward, ClaimParams::default()),
        Ring::new(backward, ClaimParams::default()),
        "the ring does not depend on the order members are listed in"
    );
}

// ---------------------------------------------------------------------------------------
// Movement (Dynamo §6.2: adding a node moves ~1/(S+1) of the data)
// ---------------------------------------------------------------------------------------

/// A joiner takes exactly its quota, all of it from the existing nodes' surplus. Rounding
/// seats go to incumbents on a rebalance, so whatever its id the joiner gets
/// floor(Q/(S+1)) <= Q/(S+1).
/// Each row's join moved at most 1.1 x Q/(S+1) partitions, whichever end the joiner's id
/// sorts at.
fn check_join_moves(q: u32, rows: &[MoveRow], table: &str) {
    for r in rows {
        let ideal = f64::from(q) / (r.s + 1) as f64;
        assert!(
            f64::from(r.join_last) <= 1.1 * ideal,
            "S={} Q={q}: join moved {} > 1.1 x {ideal:.2}\n{table}",
            r.s,
            r.join_last
        );
        assert!(
            f64::from(r.join_first) <= 1.1 * ideal,
            "S={} Q={q}: join (first id) moved {}\n{table}",
            r.s,
            r.join_first
        );
    }
}

#[test]
fn adding_a_node_moves_at_most_1_1_over_s_plus_1_of_the_partitions() {
    for q in [DEFAULT_PARTITIONS, 256] {
        let rows = move_rows(q, 3..=63);
        let table = move_table(q, &rows);
        check_join_moves(q, &rows, &table);
    }
    let q = 256u32;
    // Every moved partition goes to the joiner, and from the nodes that had a surplus.
    for s in [3usize, 7, 16, 31, 50] {
        let base = ring(equal(s), q, 3);
        let mut members = equal(s);
        members.push(Member::new("zz-joiner"));
        let next = rebalance(&base, members);
        let diff = match base.diff(&next) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        assert!(diff.transfers.iter().all(|t| t.to == "zz-joiner"), "S={s}");
        assert_eq!(diff.transfers.len() as u32, required_moves(&base, &next));
        assert_eq!(
            next.partitions_of("zz-joiner").len() as u32,
            diff.transfers.len() as u32
        );
    }
}

/// A leaver's partitions, and nothing else, move; they go to the remaining nodes.
#[test]
fn removing_a_node_moves_only_the_leavers_partitions() {
    let q = 256u32;
    for s in 4..=64usize {
        let base = ring(equal(s), q, 3);
        for leaver in [0, s / 2, s - 1] {
            let mut members = equal(s);
            let gone = members.remove(leaver);
            let next = rebalance(&base, members);
            let diff = match base.diff(&next) {
                Ok(d) => d,
                Err(e) => panic!("{e}"),
            };
            let moved: BTreeSet<u32> = diff.transfers.iter().map(|t| t.partition).collect();
            let owned: BTreeSet<u32> = base.partitions_of(&gone.id).into_iter().collect();
            assert_eq!(moved, owned, "S={s}, {} leaves", gone.id);
            assert!(diff.transfers.iter().all(|t| t.from == gone.id));
        }
    }
}

/// A weight change moves exactly the quota difference, toward the re-weighted node.
#[test]
fn a_weight_change_moves_exactly_the_quota_difference() {
    let base = ring(equal(8), 256, 3);
    let mut heavier = equal(8);
    heavier[3].weight = 3;
    let next = rebalance(&base, heavier);
    let diff = match base.diff(&next) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    // 8 equal nodes own 32 each; with weights 1x7 + 3 the heavy node's quota is 77.
    assert_eq!(next.partitions_of("n03").len(), 77);
    assert_eq!(diff.transfers.len(), 77 - 32);
    assert!(diff.transfers.iter().all(|t| t.to == "n03"));
    assert_eq!(diff.transfers.len() as u32, required_moves(&base, &next));
    // And back: the partitions return in exactly the same number.
    let back = rebalance(&next, equal(8));
    assert_eq!(moved(&next, &back), 45);
}

#[test]
fn version_starts_at_one_and_each_rebalance_increments_it() {
    let r1 = ring(equal(4), 256, 3);
    assert_eq!(r1.version(), 1);
    let r2 = rebalance(&r1, equal(5));
    let r3 = rebalance(&r2, equal(5));
    assert_eq!((r2.version(), r3.version()), (2, 3));
    // Rebalancing to the same membership moves nothing.
    assert_eq!(moved(&r2, &r3), 0);
    let d = match r1.diff(&r2) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    assert_eq!((d.from_version, d.to_version), (1, 2));
    let flows = d.flows();
    assert_eq!(flows.values().sum::<u32>() as usize, d.transfers.len());
    assert!(flows.keys().all(|(_, to)| *to == "n04"));
}

#[test]
fn diff_of_rings_with_different_partition_counts_is_an_error() {
    let a = ring(equal(3), 256, 3);
    let b = ring(equal(3), 512, 3);
    assert_eq!(
        a.diff(&b),
        Err(RingError::PartitionCountMismatch { from: 256, to: 512 })
    );
}

// ---------------------------------------------------------------------------------------
// Preference lists (Dynamo §4.3) and spacing
// ---------------------------------------------------------------------------------------

fn check_preference_lists(r: &Ring, label: &str) {
    let owning = r.owned_counts().iter().filter(|(_, c)| *c > 0).count();
    for n in 1..=owning + 1 {
        for p in 0..r.partitions() {
            let list = match r.preference_list(p, n) {
                Ok(l) => l,
                Err(e) => panic!("{label}: {e}"),
            };
            let ids: Vec<&str> = list.nodes().map(|m| m.id.as_str()).collect();
            let unique: BTreeSet<&str> = ids.iter().copied().collect();
            assert_eq!(
                unique.len(),
                ids.len(),
                "{label} p={p} n={n}: repeats {ids:?}"
            );
            assert_eq!(
                ids.len(),
                owning,
                "{label} p={p} n={n}: every owner listed once"
            );
            assert_eq!(
                list.primaries.len(),
                n.min(owning),
                "{label} p={p} n={n}: primaries"
            );
            assert_eq!(
                list.primaries.first().map(|m| m.id.as_str()),
                r.owner(p).map(|m| m.id.as_str()),
                "{label} p={p}: the owner comes first"
            );
        }
    }
}

#[test]
fn preference_lists_never_repeat_a_node_and_have_n_distinct_primaries() {
    let cases: Vec<(&str, Vec<Member>, u32, u32)> = vec![
        ("3 equal", equal(3), 64, 3),
        ("5 equal, n_val 2", equal(5), 64, 2),
        ("8 equal", equal(8), 256, 3),
        ("2 nodes, N=3", equal(2), 64, 3),
        (
            "weighted",
            vec![
                Member::new("a").with_weight(4),
                Member::new("b"),
                Member::new("c").with_weight(2),
                Member::new("d"),
            ],
            128,
            3,
        ),
        ("9 in 3 zones", zoned(9, 3), 128, 3),
        ("7 in 3 zones (unbalanced)", zoned(7, 3), 128, 3),
        ("6 in 2 zones", zoned(6, 2), 64, 3),
        ("single node", equal(1), 8, 1),
    ];
    for (label, members, q, n_val) in cases {
        check_preference_lists(&ring(members, q, n_val), label);
    }
}

/// The list is the ring walk (Dynamo §4.3): checked against a direct model of the rule on
/// rings with and without zones, including fewer zones than n.
#[test]
fn preference_lists_follow_the_clockwise_walk_with_zone_skipping() {
    let rings = [
        ring(equal(5), 64, 3),
        ring(zoned(9, 3), 128, 3),
        ring(zoned(7, 2), 128, 3),
        ring(zoned(8, 4), 64, 2),
    ];
    for r in &rings {
        let owners: Vec<&Member> = r.owners().collect();
        let q = owners.len();
        for p in 0..q {
            // Distinct owners in clockwise order from p.
            let mut walk: Vec<&Member> = Vec::new();
            for step in 0..q {
                let m = owners[(p + step) % q];
                if !walk.iter().any(|w| w.id == m.id) {
                    walk.push(m);
                }
            }
            let zone = |m: &Member| m.zone.clone().unwrap_or_else(|| format!("own:{}", m.id));
            for n in 1..=4usize {
                // One node per unused zone first, then the passed-over nodes, in walk order.
                let mut chosen: Vec<bool> = vec![false; walk.len()];
                let mut zones: Vec<String> = Vec::new();
                for (k, m) in walk.iter().enumerate() {
                    if chosen.iter().filter(|c| **c).count() < n && !zones.contains(&zone(m)) {
                        zones.push(zone(m));
                        chosen[k] = true;
                    }
                }
                for k in 0..walk.len() {
                    if chosen.iter().filter(|c| **c).count() < n {
                        chosen[k] = true;
                    }
                }
                let want_primaries: Vec<&str> = walk
                    .iter()
                    .zip(&chosen)
                    .filter(|(_, c)| **c)
                    .map(|(m, _)| m.id.as_str())
                    .collect();
                let want_fallbacks: Vec<&str> = walk
                    .iter()
                    .zip(&chosen)
                    .filter(|(_, c)| !**c)
                    .map(|(m, _)| m.id.as_str())
                    .collect();
                let list = match r.preference_list(p as u32, n) {
                    Ok(l) => l,
                    Err(e) => panic!("{e}"),
                };
                let got_primaries: Vec<&str> =
                    list.primaries.iter().map(|m| m.id.as_str()).collect();
                let got_fallbacks: Vec<&str> =
                    list.fallbacks.iter().map(|m| m.id.as_str()).collect();
                assert_eq!(got_primaries, want_primaries, "p={p} n={n}");
                assert_eq!(got_fallbacks, want_fallbacks, "p={p} n={n}");
            }
        }
    }
}

/// The largest accepted ring claims, rebalances and round-trips (Dynamo §6.2 with Q=65536).
#[test]
fn a_65536_partition_ring_claims_rebalances_and_round_trips() {
    let q = 65_536u32;
    let r = ring(equal(16), q, 3);
    assert!(r.spacing().is_clean(), "{:?}", r.spacing());
    let joined = rebalance(&r, equal(17));
    assert_eq!(moved(&r, &joined), required_moves(&r, &joined));
    assert_eq!(moved(&r, &joined), q / 17);
    assert!(joined.spacing().is_clean(), "{:?}", joined.spacing());
    let mut fewer = equal(16);
    let gone = fewer.remove(5);
    let left = rebalance(&r, fewer);
    assert_eq!(moved(&r, &left), r.partitions_of(&gone.id).len() as u32);
    let bytes = match left.encode() {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    assert!(bytes.len() < 200 * 1024, "{} bytes", bytes.len());
    assert_eq!(Ring::decode(&bytes), Ok(left));
}

/// With >= N zones the primaries sit in N distinct zones, even where the ring's spacing has
/// zone violations (unbalanced zones); with fewer zones they cover all of them.
#[test]
fn with_three_zones_every_preference_list_spans_three_zones() {
    let cases: Vec<(&str, Vec<Member>, usize)> = vec![
        ("9 nodes, 3 balanced zones", zoned(9, 3), 3),
        ("7 nodes, zones of 3/2/2", zoned(7, 3), 3),
        ("4 nodes, zones of 2/1/1", zoned(4, 3), 3),
        ("12 nodes, 4 zones", zoned(12, 4), 3),
        ("6 nodes, 2 zones, N=3", zoned(6, 2), 2),
        (
            "zones by block",
            (0..9)
                .map(|i| Member::new(format!("n{i}")).with_zone(format!("z{}", i / 3)))
                .collect(),
            3,
        ),
    ];
    for (label, members, want_zones) in cases {
        let r = ring(members, 256, 3);
        for p in 0..r.partitions() {
            let list = match r.preference_list(p, 3) {
                Ok(l) => l,
                Err(e) => panic!("{e}"),
            };
            let zones: BTreeSet<&str> = list
                .primaries
                .iter()
                .filter_map(|m| m.zone.as_deref())
                .collect();
            assert_eq!(list.primaries.len(), 3, "{label} p={p}");
            assert_eq!(
                zones.len(),
                want_zones,
                "{label} p={p}: {:?}",
                list.primaries
            );
        }
    }
}

/// Spacing (no node twice within N consecutive partitions) holds exactly for equal weights
/// whenever whole partitions allow it: S >= 4 at Q=256, N=3 (S=3 is impossible: a cycle in
/// which every 3 consecutive owners differ has a length divisible by 3). Rebalancing by a
/// join keeps it. Zones: balanced zones (S a multiple of 3, round-robin) stay within the one
/// violation the 86/85/85 zone quotas force; others are reported by `print_ring_figures`.
#[test]
fn spacing_violations_are_zero_for_equal_weights_where_quotas_allow() {
    for s in 3..=64usize {
        let r = ring(equal(s), 256, 3);
        let report = r.spacing();
        if s == 3 {
            assert!(report.node_violations <= 1, "S=3: {report:?}");
        } else {
            assert!(report.is_clean(), "S={s}: {report:?}");
        }
    }
    for s in [4usize, 8, 16, 32, 64] {
        let r = ring(equal(s), 4096, 4);
        assert!(r.spacing().is_clean(), "Q=4096 S={s}: {:?}", r.spacing());
    }
    for s in (6..=30).step_by(3) {
        let r = ring(zoned(s, 3), 256, 3);
        let report = r.spacing();
        assert_eq!(report.node_violations, 0, "zoned S={s}: {report:?}");
        assert!(report.zone_violations <= 1, "zoned S={s}: {report:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Key placement (Dynamo §4.2)
// ---------------------------------------------------------------------------------------

#[test]
fn key_positions_are_sha256_of_length_prefixed_bucket_and_key() {
    // Known answers computed independently: sha256(u64_be(len(bucket)) || bucket || key).
    let cases: &[(&[u8], &[u8], u32, u32)] = &[
        (b"b", b"k", 256, 145),
        (b"b", b"k", 65_536, 37_198),
        (b"b", b"k", 8, 4),
        (b"carts", b"alice", 256, 222),
        (b"carts", b"alice", 65_536, 57_076),
        (b"carts", b"alice", 8, 6),
    ];
    for &(bucket, key, q, want) in cases {
        assert_eq!(partition_for_key(q, bucket, key), Ok(want));
        assert_eq!(
            partition_of_position(&key_position(bucket, key), q),
            Ok(want)
        );
    }
    let pos = key_position(b"b", b"k");
    assert_eq!(pos[..4], [0x91, 0x4e, 0xda, 0x44]);
    // The bucket's length prefix separates ("ab", "c") from ("a", "bc").
    assert_ne!(key_position(b"ab", b"c"), key_position(b"a", b"bc"));
    assert_ne!(key_position(b"", b"abc"), key_position(b"abc", b""));
    // A ring uses the same placement.
    let r = ring(equal(4), 256, 3);
    assert_eq!(r.partition_for_key(b"b", b"k"), 145);
    assert_eq!(
        r.preference_list_for_key(b"b", b"k", 3),
        match r.preference_list(145, 3) {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        }
    );
}

#[test]
fn keys_spread_evenly_over_partitions() {
    // 390 keys per partition: enough for the bounds below to be far from chance.
    let q = 256u32;
    let keys = 100_000u32;
    let mut hits = vec![0u32; q as usize];
    for i in 0..keys {
        let bucket = format!("b{}", i % 7);
        let key = format!("user:{i}");
        match partition_for_key(q, bucket.as_bytes(), key.as_bytes()) {
            Ok(p) => hits[p as usize] += 1,
            Err(e) => panic!("{e}"),
        }
    }
    let mean = f64::from(keys) / f64::from(q);
    let max = f64::from(hits.iter().copied().max().unwrap_or(0));
    let min = f64::from(hits.iter().copied().min().unwrap_or(0));
    let chi2: f64 = hits
        .iter()
        .map(|&h| (f64::from(h) - mean).powi(2) / mean)
        .sum();
    // 255 degrees of freedom: mean 255, sd ~22.6; 400 is > 6 sd out.
    assert!(
        chi2 < 400.0,
        "chi-square {chi2:.1} (min {min}, max {max}, mean {mean:.1})"
    );
    assert!(max / mean < 1.3, "max/mean {:.3}", max / mean);
    assert!(min / mean > 0.7, "min/mean {:.3}", min / mean);
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

#[test]
fn rings_round_trip_through_postcard_and_encode() {
    let r = ring(zoned(7, 3), 256, 3);
    let r = rebalance(&r, zoned(8, 3));
    let bytes = match r.encode() {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(Ring::decode(&bytes), Ok(r.clone()));
    let plain = match postcard::to_allocvec(&r) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(postcard::from_bytes::<Ring>(&plain), Ok(r.clone()));
    assert!(Ring::decode(&[]).is_err());
    assert!(Ring::decode(&[99]).is_err(), "unknown format tag");
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(Ring::decode(&trailing).is_err(), "trailing bytes");
}

/// Decoding validates: no byte flip of an encoded ring panics, and any ring that decodes
/// still meets every invariant (a ring from gossip is as safe as one built locally).
#[test]
fn corrupted_ring_bytes_never_decode_into_an_invalid_ring() {
    let r = ring(
        vec![
            Member::new("a").with_weight(2),
            Member::new("b"),
            Member::new("c").with_zone("z"),
        ],
        8,
        2,
    );
    let bytes = match r.encode() {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    for i in 0..bytes.len() {
        for flip in [1u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[i] ^= flip;
            if let Ok(decoded) = Ring::decode(&bad) {
                let got: Vec<u32> = decoded.owned_counts().iter().map(|(_, c)| *c).collect();
                assert!(
                    within_shares(decoded.members(), decoded.partitions(), &got),
                    "byte {i} ^ {flip:#x}: counts {got:?} outside the weight shares"
                );
            }
        }
        assert!(Ring::decode(&bytes[..i]).is_err(), "truncated at {i}");
    }
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Spec {
    id: u8,
    weight: u32,
    zone: Option<u8>,
}

/// Distinct members from `specs`, at most `partitions` of them (a ring needs no more).
fn members_of(specs: &[Spec], partitions: u32) -> Vec<Member> {
    let mut seen = BTreeSet::new();
    specs
        .iter()
        .filter(|s| seen.insert(s.id))
        .take(partitions as usize)
        .map(|s| Member {
            id: format!("node-{}", s.id),
            weight: s.weight,
            zone: s.zone.map(|z| format!("zone-{z}")),
        })
        .collect()
}

fn spec() -> impl Strategy<Value = Spec> {
    (0u8..24, 1u32..=8, prop::option::of(0u8..4)).prop_map(|(id, weight, zone)| Spec {
        id,
        weight,
        zone,
    })
}

/// Found by `rebalance_moves_exactly_the_required_partitions`: a rebalance rounds a small
/// share up for an incumbent that a fresh claim rounds down, and the ring used to count its
/// owning nodes from the fresh claim, so preference lists missed that node.
#[test]
fn a_rebalance_that_rounds_up_an_incumbent_lists_every_owner() {
    let spec = |id, weight| Spec {
        id,
        weight,
        zone: None,
    };
    let before = [spec(23, 1)];
    let after = [
        spec(0, 4),
        spec(11, 8),
        spec(10, 2),
        spec(12, 8),
        spec(23, 2),
    ];
    let old = ring(members_of(&before, 8), 8, 1);
    let new = match old.rebalance(members_of(&after, 8)) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    check_preference_lists(&new, "incumbent rounded up");
}

fn ring_size() -> impl Strategy<Value = u32> {
    prop::sample::select(vec![8u32, 16, 32, 64, 128, 256])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Dynamo §6.2 strategy 3: every partition has one owner, and each node owns exactly
    /// its quota, whose sum is Q.
    #[test]
    fn every_partition_is_owned_and_counts_equal_quotas(
        specs in prop::collection::vec(spec(), 1..12),
        q in ring_size(),
        n_val in 1u32..=4,
    ) {
        let members = members_of(&specs, q);
        let r = Ring::new(members.clone(), params(q, n_val)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let want = quotas(&members, q).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(want.iter().sum::<u32>(), q);
        prop_assert_eq!(r.owners().count(), q as usize);
        let c = counts(&r);
        for (m, quota) in members.iter().zip(&want) {
            prop_assert_eq!(c.get(&m.id).copied(), Some(*quota));
        }
        check_preference_lists(&r, "property");
    }

    /// Rebalance moves exactly what the quota changes require (never more), keeps every
    /// other assignment, and lands on the new quotas.
    #[test]
    fn rebalance_moves_exactly_the_required_partitions(
        before in prop::collection::vec(spec(), 1..12),
        after in prop::collection::vec(spec(), 1..12),
        q in ring_size(),
        n_val in 1u32..=4,
    ) {
        let old = Ring::new(members_of(&before, q), params(q, n_val)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let new_members = members_of(&after, q);
        let new = old.rebalance(new_members.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(new.version(), old.version() + 1);
        let diff = old.diff(&new).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(diff.transfers.len() as u32, required_moves(&old, &new));
        // Nobody gives up a partition it is allowed to keep, nobody receives one it has no
        // room for.
        let (before_counts, after_counts) = (counts(&old), counts(&new));
        for t in &diff.transfers {
            let had = before_counts.get(&t.from).copied().unwrap_or(0);
            let has = after_counts.get(&t.from).copied().unwrap_or(0);
            prop_assert!(has < had, "{} lost a partition without being over quota", t.from);
            let got_before = before_counts.get(&t.to).copied().unwrap_or(0);
            let got_after = after_counts.get(&t.to).copied().unwrap_or(0);
            prop_assert!(got_after > got_before, "{} received without being under quota", t.to);
        }
        // Every count is its exact weight share rounded down or up (a rebalance gives the
        // rounding seats to incumbents, so they may differ from a fresh claim's `quotas`).
        let got: Vec<u32> = new.owned_counts().iter().map(|(_, c)| *c).collect();
        prop_assert!(within_shares(new.members(), q, &got), "counts {:?}", got);
        check_preference_lists(&new, "property after rebalance");
    }
}

// ---------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------

/// Prints the figures notes cite: balance (Q=256 and the default 1024), movement on join
/// (both) and leave (Q=256),
/// spacing under zones and weights, preference-list load.
#[test]
fn print_ring_figures() {
    for q in [256u32, 1024] {
        println!("{}", balance_table(q, &balance_rows(q, 3..=64)));
    }
    let mut rows = Vec::new();
    for q in [DEFAULT_PARTITIONS, 256] {
        rows = move_rows(q, 3..=63);
        println!("{}", move_table(q, &rows));
        let worst = |f: fn(&MoveRow) -> u32| {
            rows.iter()
                .map(|r| f64::from(f(r)) * (r.s + 1) as f64 / f64::from(q))
                .fold(0.0, f64::max)
        };
        println!(
            "Q={q} join, worst moved/(Q/(S+1)): {:.3} (joiner id last), {:.3} (joiner id first)",
            worst(|r| r.join_last),
            worst(|r| r.join_first)
        );
    }
    println!(
        "leave: moved == leaver's partitions for every S: {}",
        rows.iter().all(|r| r.leave == r.leaver_owned)
    );

    println!(
        "\nspacing with zones (round-robin zone labels), Q=256, N=3; violations as node/zone pairs"
    );
    println!(
        "   S zones  claim   join(+1)  fresh(S+1)  leave(-1)  fresh(S-1)  primary-load max/share"
    );
    for (s, z) in [
        (6, 3),
        (7, 3),
        (9, 3),
        (12, 3),
        (12, 4),
        (15, 3),
        (16, 3),
        (24, 3),
        (30, 5),
    ] {
        let r = ring(zoned(s, z), 256, 3);
        let pair = |x: &Ring| {
            let v = x.spacing();
            format!("{}/{}", v.node_violations, v.zone_violations)
        };
        println!(
            "{s:4} {z:5}  {:>5}  {:>9}  {:>10}  {:>9}  {:>10}  {:.3}",
            pair(&r),
            pair(&rebalance(&r, zoned(s + 1, z))),
            pair(&ring(zoned(s + 1, z), 256, 3)),
            pair(&rebalance(&r, zoned(s - 1, z))),
            pair(&ring(zoned(s - 1, z), 256, 3)),
            primary_load_ratio(&r, 3)
        );
    }

    println!("\nspacing with weights, Q=256, N=3");
    println!("  weights                       max-quota  Q/N  node-viol  primary-load max/share");
    for weights in [
        vec![2u32, 1, 1, 1],
        vec![2, 1, 1, 1, 1, 1, 1, 1],
        vec![1, 2, 3, 4, 5, 6],
        vec![4, 1, 1, 1, 1],
        vec![1, 1, 1, 1, 1, 1, 1, 1, 8],
    ] {
        let members: Vec<Member> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Member::new(format!("n{i:02}")).with_weight(w))
            .collect();
        let r = ring(members, 256, 3);
        let max_quota = counts(&r).into_values().max().unwrap_or(0);
        println!(
            "  {:<28}  {max_quota:9}  {:3}  {:9}  {:.3}",
            format!("{weights:?}"),
            256 / 3,
            r.spacing().node_violations,
            primary_load_ratio(&r, 3)
        );
    }
}

/// True when each count is its member's exact weight share of `q`, rounded down or up, and
/// the counts sum to `q`.
fn within_shares(members: &[Member], q: u32, counts: &[u32]) -> bool {
    let total: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
    counts.iter().sum::<u32>() == q
        && members.iter().zip(counts).all(|(m, &c)| {
            let share = u64::from(q) * u64::from(m.weight);
            let floor = share / total;
            let ceil = floor + u64::from(share % total != 0);
            (floor..=ceil).contains(&u64::from(c))
        })
}
