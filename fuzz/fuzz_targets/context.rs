//! Opaque causal contexts, as a node reads them from a client's put or delete.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    quiver_fuzz::check_context(bytes);
});
