//! Peer response frames, as a node reads another node's answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_fuzz::{check_peer_response, decode_both};
use quiver_node::peer::PeerResponse;

fuzz_target!(|body: &[u8]| {
    if let Some(response) = decode_both::<PeerResponse>(body) {
        check_peer_response(&response);
    }
});
