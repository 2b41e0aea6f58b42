//! Rust bindings of Quiver's `reconciler-plugin` world, generated once and shared by every Rust
//! guest in this workspace (one copy of the generated code instead of one per plugin).
//!
//! A plugin implements [`Guest`] and registers it with `quiver_guest::export!(MyType);`.

wit_bindgen::generate!({
    world: "reconciler-plugin",
    path: "../../wit",
    // The export macro must be callable from the plugin crates, and must find these bindings
    // through this crate rather than through a module of the calling crate.
    pub_export_macro: true,
    default_bindings_module: "quiver_guest",
});

pub use exports::quiver::plugin::reconciler::Guest;
pub use quiver::plugin::types::{Merged, PluginError, Sibling};

/// The siblings that are not tombstones, or `None` when every sibling is one.
///
/// Most state-based reconcilers (cart, counter) treat a delete as "no state from this
/// sibling" and only delete the key when every sibling agrees.
pub fn live(siblings: &[Sibling]) -> Option<Vec<&Sibling>> {
    let live: Vec<&Sibling> = siblings.iter().filter(|s| !s.tombstone).collect();
    if live.is_empty() { None } else { Some(live) }
}
