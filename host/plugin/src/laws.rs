//! Checks the merge laws of `wit/quiver-plugin.wit` on a plugin, through the component
//! boundary (what runs on the nodes, not a native re-implementation).
//!
//! Inputs are built from the plugin's own `examples()` and from merges of them, with
//! metadata drawn from a small space (three actors, close timestamps) so that ties happen.
//! Everything is derived from `seed`: a violation found once is found again.
//!
//! A merge result fed back as a sibling (for associativity and idempotence) carries the
//! metadata of the newest of its inputs (highest timestamp, then actor, then counter), and is
//! a tombstone if the merge deleted the key. That is what a node stores after merging.

use std::fmt;

use crate::error::PluginError;
use crate::runtime::{Limits, Merged, Reconciler, Sibling};

/// Most violations a report keeps (the count covers all of them).
const VIOLATIONS_KEPT_MAX: usize = 16;

/// Most siblings in one generated sibling set.
const SIBLINGS_PER_CASE_MAX: u64 = 4;

/// The laws a merge must obey.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Law {
    /// The order of the siblings does not change the result.
    Commutative,
    /// Merging a merge result with more siblings equals merging them all at once.
    Associative,
    /// Merging a sibling with itself, or a result with itself, changes nothing.
    Idempotent,
    /// The same input gives the same output every time.
    Deterministic,
    /// The plugin refused (with a `plugin-error`) input built from its own examples.
    AcceptsOwnValues,
}

impl fmt::Display for Law {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Law::Commutative => "commutative",
            Law::Associative => "associative",
            Law::Idempotent => "idempotent",
            Law::Deterministic => "deterministic",
            Law::AcceptsOwnValues => "accepts its own values",
        })
    }
}

/// One broken law, with the input that shows it.
#[derive(Clone, Debug)]
pub struct LawViolation {
    /// The law.
    pub law: Law,
    /// The siblings given to the first merge of the comparison.
    pub input: Vec<Sibling>,
    /// What was compared and what differed.
    pub detail: String,
}

/// The outcome of [`check_laws`].
#[derive(Clone, Debug)]
pub struct LawReport {
    /// The plugin, as `name@shorthash`.
    pub plugin: String,
    /// Generated sibling sets checked.
    pub cases: u32,
    /// Merges called.
    pub merges: u64,
    /// Every violation found (not only the kept ones).
    pub violation_count: u64,
    /// The first violations found.
    pub violations: Vec<LawViolation>,
}

impl LawReport {
    /// True if no law was broken.
    pub fn is_lawful(&self) -> bool {
        self.violation_count == 0
    }
}

impl fmt::Display for LawReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "plugin {}: {} cases, {} merges, {} violations",
            self.plugin, self.cases, self.merges, self.violation_count
        )?;
        for v in &self.violations {
            write!(
                f,
                "\n- {}: {} (input: {})",
                v.law,
                v.detail,
                describe(&v.input)
            )?;
        }
        Ok(())
    }
}

/// Checks that `r`'s merge is commutative, associative, idempotent and deterministic on
/// `cases` sibling sets generated from `seed`.
///
/// A sandbox failure (fuel, memory, trap, output size) ends the check with that error; a
/// `plugin-error` on input built from the plugin's own examples is reported as a violation
/// of [`Law::AcceptsOwnValues`].
pub fn check_laws(
    r: &Reconciler,
    seed: u64,
    cases: u32,
    limits: &Limits,
) -> Result<LawReport, PluginError> {
    let mut checker = Checker {
        r,
        limits,
        rng: SplitMix64(seed),
        next_counter: 1,
        report: LawReport {
            plugin: r.label().to_owned(),
            cases,
            merges: 0,
            violation_count: 0,
            violations: Vec::new(),
        },
    };
    let mut pool = r.examples(limits)?;
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    // Merges of examples are values too, and often the more interesting ones (e.g. a cart
    // with tags from several actors).
    let example_count = pool.len() as u64;
    for _ in 0..example_count {
        let pair = [checker.sibling_from(&pool), checker.sibling_from(&pool)];
        if let Some(Merged::Value(v)) = checker.merge(&pair)? {
            pool.push(v);
        }
    }
    for _ in 0..cases {
        checker.case(&pool)?;
    }
    Ok(checker.report)
}

struct Checker<'a> {
    r: &'a Reconciler,
    limits: &'a Limits,
    rng: SplitMix64,
    /// Every generated sibling gets its own dot, as the contract promises.
    next_counter: u64,
    report: LawReport,
}

impl Checker<'_> {
    /// One merge; `None` if the plugin refused the input (already recorded as a violation).
    fn merge(&mut self, siblings: &[Sibling]) -> Result<Option<Merged>, PluginError> {
        self.report.merges += 1;
        match self.r.merge(siblings, self.limits) {
            Ok(merged) => Ok(Some(merged)),
            Err(
                e @ (PluginError::InvalidValue { .. }
                | PluginError::InvalidOp { .. }
                | PluginError::Unsupported { .. }),
            ) => {
                self.violation(Law::AcceptsOwnValues, siblings, e.to_string());
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn violation(&mut self, law: Law, input: &[Sibling], detail: String) {
        self.report.violation_count += 1;
        if self.report.violations.len() < VIOLATIONS_KEPT_MAX {
            self.report.violations.push(LawViolation {
                law,
                input: input.to_vec(),
                detail,
            });
        }
    }

    /// Compares two merge outcomes; a refused merge was already reported.
    fn expect_equal(
        &mut self,
        law: Law,
        input: &[Sibling],
        what: &str,
        a: &Option<Merged>,
        b: &Option<Merged>,
    ) {
        if let (Some(a), Some(b)) = (a, b)
            && a != b
        {
            self.violation(law, input, format!("{what}: {} vs {}", show(a), show(b)));
        }
    }

    fn sibling_from(&mut self, pool: &[Vec<u8>]) -> Sibling {
        let tombstone = self.rng.below(8) == 0;
        let value = if tombstone {
            Vec::new()
        } else {
            pool[self.rng.below(pool.len() as u64) as usize].clone()
        };
        let counter = self.next_counter;
        self.next_counter += 1;
        Sibling {
            value,
            // Close timestamps and few actors, so ties in time and in actor both happen.
            timestamp_ms: 1_700_000_000_000 + self.rng.below(4),
            actor: ["n1", "n2", "n3"][self.rng.below(3) as usize].to_owned(),
            counter,
            tombstone,
        }
    }

    fn case(&mut self, pool: &[Vec<u8>]) -> Result<(), PluginError> {
        let len = 1 + self.rng.below(SIBLINGS_PER_CASE_MAX);
        let set: Vec<Sibling> = (0..len).map(|_| self.sibling_from(pool)).collect();
        let whole = self.merge(&set)?;

        let again = self.merge(&set)?;
        self.expect_equal(Law::Deterministic, &set, "merge(S) twice", &whole, &again);

        let mut reversed = set.clone();
        reversed.reverse();
        let merged = self.merge(&reversed)?;
        self.expect_equal(
            Law::Commutative,
            &set,
            "merge(S) vs merge(reverse(S))",
            &whole,
            &merged,
        );
        let mut shuffled = set.clone();
        self.rng.shuffle(&mut shuffled);
        let merged = self.merge(&shuffled)?;
        self.expect_equal(
            Law::Commutative,
            &set,
            "merge(S) vs merge(shuffle(S))",
            &whole,
            &merged,
        );

        let first = &set[..1];
        let alone = self.merge(first)?;
        let doubled = self.merge(&[set[0].clone(), set[0].clone()])?;
        self.expect_equal(
            Law::Idempotent,
            first,
            "merge([a]) vs merge([a, a])",
            &alone,
            &doubled,
        );
        if let Some(result) = &whole {
            let s = as_sibling(result, &set);
            let once = self.merge(std::slice::from_ref(&s))?;
            self.expect_equal(
                Law::Idempotent,
                &set,
                "merge(S) vs merge([merge(S)])",
                &whole,
                &once,
            );
            let twice = self.merge(&[s.clone(), s])?;
            self.expect_equal(
                Law::Idempotent,
                &set,
                "merge(S) vs merge([merge(S), merge(S)])",
                &whole,
                &twice,
            );
        }

        if set.len() >= 2 {
            let split = 1 + self.rng.below(set.len() as u64 - 1) as usize;
            let (left, right) = set.split_at(split);
            if let Some(l) = self.merge(left)? {
                let mut staged = vec![as_sibling(&l, left)];
                staged.extend_from_slice(right);
                let merged = self.merge(&staged)?;
                self.expect_equal(
                    Law::Associative,
                    &set,
                    &format!("merge(S) vs merge([merge(S[..{split}]), S[{split}..]])"),
                    &whole,
                    &merged,
                );
            }
            if let Some(r) = self.merge(right)? {
                let mut staged = left.to_vec();
                staged.push(as_sibling(&r, right));
                let merged = self.merge(&staged)?;
                self.expect_equal(
                    Law::Associative,
                    &set,
                    &format!("merge(S) vs merge([S[..{split}], merge(S[{split}..])])"),
                    &whole,
                    &merged,
                );
            }
        }
        Ok(())
    }
}

/// A merge result as the sibling a node would store: the newest input's metadata.
pub(crate) fn as_sibling(result: &Merged, inputs: &[Sibling]) -> Sibling {
    let newest = inputs.iter().max_by(|a, b| {
        (a.timestamp_ms, &a.actor, a.counter).cmp(&(b.timestamp_ms, &b.actor, b.counter))
    });
    let (timestamp_ms, actor, counter) = newest
        .map(|n| (n.timestamp_ms, n.actor.clone(), n.counter))
        .unwrap_or_default();
    let (value, tombstone) = match result {
        Merged::Value(v) => (v.clone(), false),
        Merged::Tombstone => (Vec::new(), true),
    };
    Sibling {
        value,
        timestamp_ms,
        actor,
        counter,
        tombstone,
    }
}

fn show(m: &Merged) -> String {
    match m {
        Merged::Tombstone => "tombstone".to_owned(),
        Merged::Value(v) => show_bytes(v),
    }
}

fn show_bytes(v: &[u8]) -> String {
    const SHOWN_MAX: usize = 120;
    let text = String::from_utf8_lossy(&v[..v.len().min(SHOWN_MAX)]).into_owned();
    if v.len() > SHOWN_MAX {
        format!("{text:?}… ({} bytes)", v.len())
    } else {
        format!("{text:?}")
    }
}

fn describe(siblings: &[Sibling]) -> String {
    let parts: Vec<String> = siblings
        .iter()
        .map(|s| {
            let value = if s.tombstone {
                "tombstone".to_owned()
            } else {
                show_bytes(&s.value)
            };
            format!("{}@{}:{}#{}", value, s.timestamp_ms, s.actor, s.counter)
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// A tiny seeded generator (SplitMix64): reproducible without a dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n` > 0); the modulo bias is irrelevant for test generation.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}
