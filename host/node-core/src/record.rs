//! How a key's record is stored, and how keys are shown in messages. Shared by the key-value
//! service, which writes records, and the anti-entropy index, which rebuilds its trees from
//! them.

use quiver_core::causality::LocalRecord;

/// Format tag of a stored record; a node refuses a record in a format it does not know
/// rather than misreading it.
const RECORD_FORMAT_V1: u8 = 1;

/// Renders a key for messages: UTF-8 text quoted, otherwise hex; long keys truncated.
pub fn render_key(key: &[u8]) -> String {
    const SHOWN_BYTES_MAX: usize = 64;
    let shown = &key[..key.len().min(SHOWN_BYTES_MAX)];
    let suffix = if key.len() > SHOWN_BYTES_MAX {
        "…"
    } else {
        ""
    };
    match std::str::from_utf8(shown) {
        Ok(s) if !s.chars().any(char::is_control) => format!("{s:?}{suffix}"),
        _ => {
            let hex: String = shown.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}{suffix}")
        }
    }
}

/// Encodes a record for storage.
pub fn encode_record(record: &LocalRecord) -> Vec<u8> {
    // Serializing plain data into a Vec cannot fail; an empty tail would be caught on read.
    postcard::to_extend(record, vec![RECORD_FORMAT_V1]).unwrap_or_default()
}

/// Decodes a stored record and checks its invariants.
pub fn decode_record(bytes: &[u8]) -> Result<LocalRecord, String> {
    let Some((&format, body)) = bytes.split_first() else {
        return Err("empty record".into());
    };
    if format != RECORD_FORMAT_V1 {
        return Err(format!("unknown record format {format}"));
    }
    let record: LocalRecord = postcard::from_bytes(body).map_err(|e| e.to_string())?;
    record.object.validate().map_err(|e| e.to_string())?;
    Ok(record)
}
