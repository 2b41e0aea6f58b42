//! Peer request frames (replication, metadata gossip, anti-entropy, handoff, reaping,
//! membership), as a node reads them from another node.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_fuzz::{check_peer_request, decode_both};
use quiver_node::peer::PeerRequest;

fuzz_target!(|body: &[u8]| {
    if let Some(request) = decode_both::<PeerRequest>(body) {
        check_peer_request(&request);
    }
});
