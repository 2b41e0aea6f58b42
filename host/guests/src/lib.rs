//! Quiver's guest plugins, built from `plugins/` by this crate's build script.
//!
//! Each function returns the path of a Wasm file in this crate's build output (they exist
//! as long as the build directory does). Shipped reconcilers are [`cart`], [`lww`] and
//! [`counter`]; [`template`] is the starting point of `quiver plugin new`; the `fixture_*`
//! functions are hostile plugins for the runtime's sandbox tests.

use std::path::Path;

macro_rules! guest {
    ($(#[$doc:meta])* $name:ident, $var:literal) => {
        $(#[$doc])*
        pub fn $name() -> &'static Path {
            Path::new(env!($var))
        }
    };
}

guest!(
    /// Shopping cart: an observed-remove set that honours removes (component, no imports).
    cart, "QUIVER_GUEST_CART"
);
guest!(
    /// Last-write-wins by timestamp, then actor, then counter (component, no imports).
    lww, "QUIVER_GUEST_LWW"
);
guest!(
    /// PN-counter with per-actor totals (component, no imports).
    counter, "QUIVER_GUEST_COUNTER"
);
guest!(
    /// The minimal reconciler users copy (component, no imports).
    template, "QUIVER_GUEST_TEMPLATE"
);
guest!(
    /// Fixture: `merge` never returns.
    fixture_loop, "QUIVER_GUEST_LOOP"
);
guest!(
    /// Fixture: `merge` allocates 1 GiB.
    fixture_alloc, "QUIVER_GUEST_ALLOC"
);
guest!(
    /// Fixture: `merge` panics.
    fixture_trap, "QUIVER_GUEST_TRAP"
);
guest!(
    /// Fixture: `merge` returns a 64 MiB value.
    fixture_huge, "QUIVER_GUEST_HUGE"
);
guest!(
    /// Fixture: `merge` returns its first sibling, breaking commutativity.
    fixture_garbage, "QUIVER_GUEST_GARBAGE"
);
guest!(
    /// Fixture: a reconciler component that imports WASI (filesystem and more).
    fixture_fs, "QUIVER_GUEST_FS"
);
guest!(
    /// Fixture: a core Wasm module, not a component.
    fixture_not_a_component, "QUIVER_GUEST_NOT_A_COMPONENT"
);

/// The Python twin of [`cart`] (componentize-py, no imports), or `None` if the build could
/// not install componentize-py (no Python or no PyPI; the build printed a warning).
pub fn python_cart() -> Option<&'static Path> {
    let path = env!("QUIVER_GUEST_PY_CART");
    (!path.is_empty()).then(|| Path::new(path))
}

/// The reconcilers that ship with Quiver, by name, for suites run against each of them.
pub fn shipped() -> [(&'static str, &'static Path); 3] {
    [("cart", cart()), ("lww", lww()), ("counter", counter())]
}
