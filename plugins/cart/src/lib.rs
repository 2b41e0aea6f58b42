//! Shopping cart: an observed-remove set whose removes stick unless a concurrent add
//! re-adds the item. The state format is documented in this crate's README.md.

use std::collections::{BTreeMap, BTreeSet};

use quiver_guest::{Guest, Merged, PluginError, Sibling};
use serde::{Deserialize, Serialize};

/// The stored state. `BTreeMap`/`BTreeSet` serialise sorted, so equal states are equal bytes
/// on every node (the laws compare bytes).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cart {
    /// Item → tags of the adds of that item not yet removed.
    #[serde(default)]
    adds: BTreeMap<String, BTreeSet<String>>,
    /// Item → tags of adds of that item that a remove has observed.
    #[serde(default)]
    removed: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum Op {
    Add(String),
    Remove(String),
}

/// Splits a tag "actor:counter" (the actor may itself contain ':').
fn parse_tag(tag: &str) -> Option<(&str, u64)> {
    let (actor, counter) = tag.rsplit_once(':')?;
    Some((actor, counter.parse().ok()?))
}

impl Cart {
    fn parse(bytes: &[u8]) -> Result<Cart, PluginError> {
        let cart: Cart = serde_json::from_slice(bytes)
            .map_err(|e| PluginError::InvalidValue(format!("cart state is not valid JSON: {e}")))?;
        for tag in cart.adds.values().chain(cart.removed.values()).flatten() {
            if parse_tag(tag).is_none() {
                return Err(PluginError::InvalidValue(format!(
                    "cart tag {tag:?} is not \"actor:counter\""
                )));
            }
        }
        Ok(cart)
    }

    /// Adds every tag of `other` (a union: merge must not depend on order or grouping).
    fn absorb(&mut self, other: Cart) {
        for (item, tags) in other.adds {
            self.adds.entry(item).or_default().extend(tags);
        }
        for (item, tags) in other.removed {
            self.removed.entry(item).or_default().extend(tags);
        }
    }

    /// Drops removed tags from `adds` and empty entries. Stripping every removed tag (not
    /// only fully removed items) is what keeps merge associative: the result then does not
    /// depend on which siblings were merged first.
    fn normalize(&mut self) {
        for (item, removed) in &self.removed {
            if let Some(tags) = self.adds.get_mut(item) {
                tags.retain(|t| !removed.contains(t));
            }
        }
        self.adds.retain(|_, tags| !tags.is_empty());
        self.removed.retain(|_, tags| !tags.is_empty());
    }

    fn to_bytes(&self) -> Result<Vec<u8>, PluginError> {
        serde_json::to_vec(self)
            .map_err(|e| PluginError::InvalidValue(format!("cannot encode cart: {e}")))
    }

    /// The next counter of `actor`: one past any tag of it, live or removed, so a re-add
    /// after a remove gets a tag the remove has not observed.
    fn next_counter(&self, actor: &str) -> Result<u64, PluginError> {
        let highest = self
            .adds
            .values()
            .chain(self.removed.values())
            .flatten()
            .filter_map(|t| parse_tag(t))
            .filter(|(a, _)| *a == actor)
            .map(|(_, c)| c)
            .max()
            .unwrap_or(0);
        highest
            .checked_add(1)
            .ok_or_else(|| PluginError::InvalidValue(format!("counter of {actor:?} overflows")))
    }
}

struct CartPlugin;

impl Guest for CartPlugin {
    fn merge(siblings: Vec<Sibling>) -> Result<Merged, PluginError> {
        let Some(live) = quiver_guest::live(&siblings) else {
            return Ok(Merged::Tombstone);
        };
        let mut merged = Cart::default();
        for sibling in live {
            merged.absorb(Cart::parse(&sibling.value)?);
        }
        merged.normalize();
        Ok(Merged::Value(merged.to_bytes()?))
    }

    fn update(
        current: Option<Vec<u8>>,
        op: Vec<u8>,
        actor: String,
    ) -> Result<Vec<u8>, PluginError> {
        let mut cart = match current {
            Some(bytes) => Cart::parse(&bytes)?,
            None => Cart::default(),
        };
        let op: Op = serde_json::from_slice(&op).map_err(|e| {
            PluginError::InvalidOp(format!(
                "expected {{\"add\":\"item\"}} or {{\"remove\":\"item\"}}: {e}"
            ))
        })?;
        match op {
            Op::Add(item) => {
                let tag = format!("{actor}:{}", cart.next_counter(&actor)?);
                cart.adds.entry(item).or_default().insert(tag);
            }
            // Removing an absent item is a no-op: the client may act on a stale view.
            Op::Remove(item) => {
                if let Some(tags) = cart.adds.remove(&item) {
                    cart.removed.entry(item).or_default().extend(tags);
                }
            }
        }
        cart.normalize();
        cart.to_bytes()
    }

    fn examples() -> Vec<Vec<u8>> {
        [
            r#"{"adds":{},"removed":{}}"#,
            r#"{"adds":{"apple":["n1:1"]},"removed":{}}"#,
            r#"{"adds":{"apple":["n2:1"],"pear":["n2:2"]},"removed":{}}"#,
            r#"{"adds":{"pear":["n1:3"]},"removed":{"apple":["n1:1"]}}"#,
            r#"{"adds":{"apple":["n1:1","n3:7"],"plum":["n3:8"]},"removed":{"pear":["n2:2"]}}"#,
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect()
    }
}

quiver_guest::export!(CartPlugin);
