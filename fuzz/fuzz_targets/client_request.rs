//! Client request frames, as the node reads them from a client stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_fuzz::{check_request, decode_both};
use quiver_sdk::wire::Request;

fuzz_target!(|body: &[u8]| {
    if let Some(request) = decode_both::<Request>(body) {
        check_request(&request);
    }
});
