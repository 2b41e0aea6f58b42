//! Response frames, as the SDK reads them from a node.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_fuzz::{check_response, decode_both};
use quiver_sdk::wire::Response;

fuzz_target!(|body: &[u8]| {
    if let Some(response) = decode_both::<Response>(body) {
        check_response(&response);
    }
});
