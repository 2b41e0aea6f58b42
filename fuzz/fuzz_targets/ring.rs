//! `Ring::decode`: rings from a client's `Ring` answer (and, inside `MetaState`, gossip).
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_core::ring::Ring;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(ring) = Ring::decode(bytes) {
        quiver_fuzz::check_ring(&ring);
    }
});
