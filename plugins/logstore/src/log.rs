//! The log's on-disk format.
//!
//! ```text
//! file    = MAGIC record*
//! record  = payload_len:u32le  crc:u32le  payload          (crc = CRC-32C of len ++ payload)
//! payload = op_count:u32le op*
//! op      = 0x01 key_len:u32le key value_len:u32le value    (put)
//!         | 0x02 key_len:u32le key                           (delete)
//! ```
//!
//! One `apply` is one record, so a batch is all or nothing on disk: a record whose header,
//! payload or checksum is incomplete is a torn write and recovery drops it with everything
//! after it. The checksum covers the length too, so a flipped length bit is caught even when
//! the bytes it points to happen to be readable.

/// First bytes of every log file: names the format and its version, so that a future format
/// (or a file that is not a log at all) is refused instead of being "recovered" into nothing.
pub const MAGIC: &[u8; 8] = b"QVLOG\x00v1";
/// Bytes before the first record.
pub const HEADER_BYTES: u64 = MAGIC.len() as u64;
/// Bytes of a record before its payload (length + checksum).
pub const RECORD_HEADER_BYTES: u64 = 8;
/// Largest payload a record may have. A batch must fit in the guest's memory twice (the
/// batch itself and its encoding), so anything larger is refused up front; on replay a
/// larger length can only be corruption.
pub const RECORD_PAYLOAD_BYTES_MAX: u32 = 256 * 1024 * 1024;

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;

/// One operation of a batch, as the engine applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Insert or overwrite.
    Put {
        /// Key bytes.
        key: Vec<u8>,
        /// Value bytes.
        value: Vec<u8>,
    },
    /// Remove (no-op if absent).
    Delete {
        /// Key bytes.
        key: Vec<u8>,
    },
}

/// An operation decoded from a record: values are not copied, only located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A put whose value is `value_len` bytes at `value_pos` within the payload.
    Put {
        /// Key bytes.
        key: Vec<u8>,
        /// Offset of the value inside the payload.
        value_pos: usize,
        /// Value length.
        value_len: u32,
    },
    /// A delete.
    Delete {
        /// Key bytes.
        key: Vec<u8>,
    },
}

/// Bytes one live entry takes in a freshly compacted log (tag, both lengths, key, value);
/// used to decide when the log is mostly garbage.
pub fn entry_bytes(key_len: usize, value_len: u32) -> u64 {
    9 + key_len as u64 + u64::from(value_len)
}

fn len_u32(len: usize, what: &str) -> Result<u32, String> {
    u32::try_from(len).map_err(|_| format!("{what} of {len} bytes is too large for the log"))
}

/// Appends the encoding of a put to `payload` and returns the value's offset in it.
pub fn encode_put(payload: &mut Vec<u8>, key: &[u8], value: &[u8]) -> Result<usize, String> {
    payload.push(TAG_PUT);
    payload.extend_from_slice(&len_u32(key.len(), "key")?.to_le_bytes());
    payload.extend_from_slice(key);
    payload.extend_from_slice(&len_u32(value.len(), "value")?.to_le_bytes());
    let pos = payload.len();
    payload.extend_from_slice(value);
    Ok(pos)
}

/// Appends the encoding of a delete to `payload`.
pub fn encode_delete(payload: &mut Vec<u8>, key: &[u8]) -> Result<(), String> {
    payload.push(TAG_DELETE);
    payload.extend_from_slice(&len_u32(key.len(), "key")?.to_le_bytes());
    payload.extend_from_slice(key);
    Ok(())
}

/// Starts a payload for `op_count` operations.
pub fn start_payload(op_count: usize, capacity: usize) -> Result<Vec<u8>, String> {
    let mut payload = Vec::with_capacity(capacity);
    payload.extend_from_slice(&len_u32(op_count, "batch op count")?.to_le_bytes());
    Ok(payload)
}

/// The record header for `payload`; fails if the payload is over the limit.
pub fn record_header(payload: &[u8]) -> Result<[u8; RECORD_HEADER_BYTES as usize], String> {
    let len = len_u32(payload.len(), "batch")?;
    if len > RECORD_PAYLOAD_BYTES_MAX {
        return Err(format!(
            "batch of {len} bytes exceeds the record limit of {RECORD_PAYLOAD_BYTES_MAX} bytes"
        ));
    }
    let len_bytes = len.to_le_bytes();
    let crc = crc32c_update(crc32c_update(!0, &len_bytes), payload) ^ !0;
    let mut header = [0u8; RECORD_HEADER_BYTES as usize];
    header[..4].copy_from_slice(&len_bytes);
    header[4..].copy_from_slice(&crc.to_le_bytes());
    Ok(header)
}

/// Splits a record header into (payload length, checksum).
pub fn parse_header(header: &[u8; RECORD_HEADER_BYTES as usize]) -> (u32, u32) {
    let [a, b, c, d, e, f, g, h] = *header;
    (
        u32::from_le_bytes([a, b, c, d]),
        u32::from_le_bytes([e, f, g, h]),
    )
}

/// True if `payload` matches the checksum of its header.
pub fn checksum_ok(len: u32, crc: u32, payload: &[u8]) -> bool {
    crc32c_update(crc32c_update(!0, &len.to_le_bytes()), payload) ^ !0 == crc
}

/// Decodes a payload whose checksum already matched. A malformed payload with a valid
/// checksum was written that way (a bug or a foreign format), so it is an error, not a
/// torn tail to truncate.
pub fn decode(payload: &[u8]) -> Result<Vec<Decoded>, String> {
    let mut cursor = Cursor {
        bytes: payload,
        pos: 0,
    };
    let count = cursor.u32()?;
    // Every op takes at least 5 bytes: bounds the allocation by what the payload can hold.
    let mut ops = Vec::with_capacity((count as usize).min(payload.len() / 5));
    for _ in 0..count {
        match cursor.u8()? {
            TAG_PUT => {
                let key = cursor.bytes_with_len()?.to_vec();
                let value_len = cursor.u32()?;
                let value_pos = cursor.pos;
                cursor.skip(value_len as usize)?;
                ops.push(Decoded::Put {
                    key,
                    value_pos,
                    value_len,
                });
            }
            TAG_DELETE => {
                let key = cursor.bytes_with_len()?.to_vec();
                ops.push(Decoded::Delete { key });
            }
            tag => {
                return Err(format!(
                    "unknown op tag {tag} at payload offset {}",
                    cursor.pos - 1
                ));
            }
        }
    }
    if cursor.pos != payload.len() {
        return Err(format!(
            "{} trailing bytes after {count} ops",
            payload.len() - cursor.pos
        ));
    }
    Ok(ops)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "payload ends at {} but a field needs {n} bytes at {}",
                    self.bytes.len(),
                    self.pos
                )
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn skip(&mut self, n: usize) -> Result<(), String> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes_with_len(&mut self) -> Result<&'a [u8], String> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

/// CRC-32C (Castagnoli), the checksum of iSCSI, ext4 and LevelDB's log: better error
/// detection than CRC-32 for the same cost. Table built at compile time.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc32c_update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C catalogue's check value for "123456789".
        assert_eq!(crc32c_update(!0, b"123456789") ^ !0, 0xE306_9283);
    }

    #[test]
    fn payload_round_trips() {
        let mut p = start_payload(2, 64).expect("payload");
        let pos = encode_put(&mut p, b"k", b"value").expect("put");
        encode_delete(&mut p, b"gone").expect("delete");
        let ops = decode(&p).expect("decode");
        assert_eq!(
            ops,
            vec![
                Decoded::Put {
                    key: b"k".to_vec(),
                    value_pos: pos,
                    value_len: 5
                },
                Decoded::Delete {
                    key: b"gone".to_vec()
                }
            ]
        );
        assert_eq!(&p[pos..pos + 5], b"value");
        let header = record_header(&p).expect("header");
        let (len, crc) = parse_header(&header);
        assert!(checksum_ok(len, crc, &p));
        assert!(!checksum_ok(len, crc, &p[1..]));
        assert!(decode(&p[..p.len() - 1]).is_err());
    }
}
