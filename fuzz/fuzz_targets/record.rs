//! Stored records (`record::decode_record`: format tag, postcard `LocalRecord`, validated).
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_node_core::record::{decode_record, encode_record};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(record) = decode_record(bytes) {
        let again = decode_record(&encode_record(&record)).expect("own encoding decodes");
        assert_eq!(again, record, "record round trip");
        quiver_fuzz::check_object(&record.object);
        let mut merged = record.clone();
        merged.merge_remote(&record.object);
        assert_eq!(merged, record, "merge_remote with itself");
    }
});
