//! The engine: an append-only log plus an ordered in-memory index of where each live value
//! lies in it (the Bitcask design, with a `BTreeMap` so scans are ordered).
//!
//! Invariants:
//! - `end` is the length of the log's valid prefix and the offset of the next record; the
//!   file never holds bytes past `end` except while an append is in flight (a failed append
//!   is cut back, and if even that fails the store refuses further writes).
//! - Every index entry points at the value bytes of a record wholly below `end`.
//! - Once `failed` is set (a failed fsync, or a log whose state on disk is unknown), every
//!   later `apply` and `sync` fails naming that first failure, as the node's contract asks:
//!   after a failed fsync the kernel may have dropped pages it claimed to hold.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};

use crate::log::{self, Decoded, Op};

/// The directory the host preopens for this component.
pub const DATA_DIR: &str = "/data";
/// The log file.
const LOG_FILE: &str = "quiver.log";
/// Where compaction writes the next log before renaming it over the current one.
const COMPACT_FILE: &str = "quiver.log.compact";
/// Compaction never runs on a log smaller than this: rewriting a small log buys little.
const COMPACT_LOG_BYTES_MIN: u64 = 16 * 1024 * 1024;
/// Compaction runs once the log is more than this many times the size of its live data.
const COMPACT_GARBAGE_RATIO: u64 = 2;
/// Compaction groups live entries into records of about this size (one record per entry
/// would cost a header each; one record for everything would need it all in memory).
const COMPACT_RECORD_BYTES_TARGET: usize = 4 * 1024 * 1024;
/// Read buffer for replaying the log on open.
const REPLAY_BUFFER_BYTES: usize = 1024 * 1024;

/// Key-value pairs in key order, as a scan returns them.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Where a live value lies in the log.
#[derive(Debug, Clone, Copy)]
struct Loc {
    offset: u64,
    len: u32,
}

/// The engine state. See the module docs for its invariants.
pub struct LogStore {
    dir: PathBuf,
    file: File,
    index: BTreeMap<Vec<u8>, Loc>,
    end: u64,
    /// Bytes the live entries would take in a compacted log ([`log::entry_bytes`] summed).
    live_bytes: u64,
    failed: Option<String>,
}

fn ctx(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> String {
    move |e| format!("logstore: {what}: {e}")
}

impl LogStore {
    /// Opens the log in `dir`, creating it if absent, replaying it into the index and cutting
    /// off a torn or corrupt tail.
    pub fn open(dir: &str) -> Result<Self, String> {
        let dir = PathBuf::from(dir);
        let log_path = dir.join(LOG_FILE);
        // A compaction that crashed before its rename left a partial next log: the current
        // log is still complete, so the leftover is garbage.
        let compact_path = dir.join(COMPACT_FILE);
        match fs::remove_file(&compact_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ctx(format!(
                    "remove leftover {} of an interrupted compaction",
                    compact_path.display()
                ))(e));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&log_path)
            .map_err(ctx(format!("open {}", log_path.display())))?;
        let len = file
            .metadata()
            .map_err(ctx(format!("stat {}", log_path.display())))?
            .len();
        let mut store = LogStore {
            dir,
            file,
            index: BTreeMap::new(),
            end: log::HEADER_BYTES,
            live_bytes: 0,
            failed: None,
        };
        if len < log::HEADER_BYTES {
            store.init_header(&log_path, len)?;
        } else {
            store.check_header(&log_path)?;
            store.replay(&log_path, len)?;
        }
        Ok(store)
    }

    /// Writes the header of a new log. A shorter file is a creation that crashed midway, but
    /// only if what it holds is a prefix of the header: anything else is not ours to erase.
    fn init_header(&mut self, log_path: &Path, len: u64) -> Result<(), String> {
        let mut existing = Vec::new();
        (&self.file)
            .read_to_end(&mut existing)
            .map_err(ctx(format!("read {}", log_path.display())))?;
        let prefix_len = usize::try_from(len).unwrap_or(usize::MAX);
        if existing.len() != prefix_len || !log::MAGIC.starts_with(&existing) {
            return Err(format!(
                "logstore: {} holds {len} bytes that are not a logstore header; refusing to \
                 overwrite it",
                log_path.display()
            ));
        }
        let what = format!("create {}", log_path.display());
        self.file.set_len(0).map_err(ctx(&what))?;
        self.file.seek(SeekFrom::Start(0)).map_err(ctx(&what))?;
        self.file.write_all(log::MAGIC).map_err(ctx(&what))?;
        self.file.sync_all().map_err(ctx(&what))?;
        sync_dir(&self.dir)?;
        self.end = log::HEADER_BYTES;
        Ok(())
    }

    fn check_header(&mut self, log_path: &Path) -> Result<(), String> {
        let mut magic = [0u8; log::MAGIC.len()];
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.read_exact(&mut magic))
            .map_err(ctx(format!("read the header of {}", log_path.display())))?;
        if &magic != log::MAGIC {
            return Err(format!(
                "logstore: {} does not start with the logstore header {:?} (found {:?}): \
                 not a log of this format version; refusing to touch it",
                log_path.display(),
                String::from_utf8_lossy(log::MAGIC),
                String::from_utf8_lossy(&magic)
            ));
        }
        Ok(())
    }

    /// Replays every whole record into the index, then truncates whatever follows the last
    /// one (a torn append, or bytes a crash left half-written).
    fn replay(&mut self, log_path: &Path, len: u64) -> Result<(), String> {
        let what = format!("replay {}", log_path.display());
        self.file
            .seek(SeekFrom::Start(log::HEADER_BYTES))
            .map_err(ctx(&what))?;
        let mut reader = BufReader::with_capacity(REPLAY_BUFFER_BYTES, &self.file);
        let mut pos = log::HEADER_BYTES;
        let mut payload = Vec::new();
        let torn: Option<String> = loop {
            if pos == len {
                break None;
            }
            let mut header = [0u8; log::RECORD_HEADER_BYTES as usize];
            if len - pos < log::RECORD_HEADER_BYTES {
                break Some(format!("{} bytes, less than a record header", len - pos));
            }
            reader.read_exact(&mut header).map_err(ctx(&what))?;
            let (payload_len, crc) = log::parse_header(&header);
            if payload_len > log::RECORD_PAYLOAD_BYTES_MAX {
                break Some(format!("record length {payload_len} over the limit"));
            }
            let record_end = pos + log::RECORD_HEADER_BYTES + u64::from(payload_len);
            if record_end > len {
                break Some(format!(
                    "record of {payload_len} bytes runs past the end of the file"
                ));
            }
            payload.clear();
            payload.resize(payload_len as usize, 0);
            reader.read_exact(&mut payload).map_err(ctx(&what))?;
            if !log::checksum_ok(payload_len, crc, &payload) {
                break Some("checksum mismatch".to_owned());
            }
            let ops = log::decode(&payload).map_err(|e| {
                format!(
                    "logstore: {}: the record at offset {pos} has a valid checksum but does \
                     not decode ({e}); refusing to guess",
                    log_path.display()
                )
            })?;
            index_ops(&mut self.index, &mut self.live_bytes, pos, ops);
            pos = record_end;
        };
        drop(reader);
        self.end = pos;
        if let Some(reason) = torn {
            // Only the tail can be torn: the log is append-only and every earlier record was
            // whole when the next one was appended. Cutting here loses no synced batch unless
            // the disk corrupted a synced record, which a log cannot repair either way.
            eprintln!(
                "logstore: {}: dropping {} bytes from offset {pos} ({reason})",
                log_path.display(),
                len - pos
            );
            let what = format!("truncate the torn tail of {}", log_path.display());
            self.file.set_len(pos).map_err(ctx(&what))?;
            self.file.sync_all().map_err(ctx(&what))?;
        }
        Ok(())
    }

    /// Applies a decoded record found at `record_offset` to the index.
    fn index_record(&mut self, record_offset: u64, ops: Vec<Decoded>) {
        index_ops(&mut self.index, &mut self.live_bytes, record_offset, ops);
    }
}

/// Applies a decoded record found at `record_offset` to `index` (a free function so that
/// replay can borrow the file for reading meanwhile).
fn index_ops(
    index: &mut BTreeMap<Vec<u8>, Loc>,
    live_bytes: &mut u64,
    record_offset: u64,
    ops: Vec<Decoded>,
) {
    let payload_offset = record_offset + log::RECORD_HEADER_BYTES;
    for op in ops {
        match op {
            Decoded::Put {
                key,
                value_pos,
                value_len,
            } => {
                let loc = Loc {
                    offset: payload_offset + value_pos as u64,
                    len: value_len,
                };
                let key_len = key.len();
                if let Some(old) = index.insert(key, loc) {
                    *live_bytes -= log::entry_bytes(key_len, old.len);
                }
                *live_bytes += log::entry_bytes(key_len, value_len);
            }
            Decoded::Delete { key } => {
                if let Some(old) = index.remove(&key) {
                    *live_bytes -= log::entry_bytes(key.len(), old.len);
                }
            }
        }
    }
}

impl LogStore {
    fn check_usable(&self) -> Result<(), String> {
        match &self.failed {
            Some(cause) => Err(format!(
                "logstore: refusing writes after an earlier failure ({cause}); reopen to recover"
            )),
            None => Ok(()),
        }
    }

    fn read_value(&mut self, loc: Loc) -> Result<Vec<u8>, String> {
        let mut value = vec![0u8; loc.len as usize];
        self.file
            .seek(SeekFrom::Start(loc.offset))
            .and_then(|_| self.file.read_exact(&mut value))
            .map_err(ctx(format!(
                "read {} bytes at offset {} of {LOG_FILE}",
                loc.len, loc.offset
            )))?;
        Ok(value)
    }

    /// Reads one key.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        match self.index.get(key).copied() {
            Some(loc) => self.read_value(loc).map(Some),
            None => Ok(None),
        }
    }

    /// Up to `limit` pairs with `start <= key < end`, in key order.
    pub fn scan(&mut self, start: &[u8], end: Option<&[u8]>, limit: u32) -> Result<Pairs, String> {
        let upper = match end {
            // `BTreeMap::range` panics on an inverted range; the contract says it is empty.
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        let hits: Vec<(Vec<u8>, Loc)> = self
            .index
            .range::<[u8], _>((Bound::Included(start), upper))
            .take(limit as usize)
            .map(|(k, loc)| (k.clone(), *loc))
            .collect();
        let mut out = Vec::with_capacity(hits.len());
        for (key, loc) in hits {
            let value = self.read_value(loc)?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Appends `ops` as one record and applies them to the index.
    pub fn apply(&mut self, ops: Vec<Op>) -> Result<(), String> {
        self.check_usable()?;
        if ops.is_empty() {
            return Ok(());
        }
        // Before the append, so that a failed compaction fails a batch that was not applied.
        if self.needs_compaction() {
            self.compact()?;
        }
        let capacity = 4 + ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => 9 + key.len() + value.len(),
                Op::Delete { key } => 5 + key.len(),
            })
            .sum::<usize>();
        let mut payload = log::start_payload(ops.len(), capacity)?;
        let mut value_pos = Vec::with_capacity(ops.len());
        for op in &ops {
            match op {
                Op::Put { key, value } => {
                    value_pos.push(log::encode_put(&mut payload, key, value)?)
                }
                Op::Delete { key } => log::encode_delete(&mut payload, key)?,
            }
        }
        let header = log::record_header(&payload)?;
        let record_offset = self.end;
        self.append(&header, &payload)?;
        let mut positions = value_pos.into_iter();
        let decoded = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => Decoded::Put {
                    key,
                    // One position was pushed per put, in order.
                    value_pos: positions.next().unwrap_or_default(),
                    value_len: value.len() as u32,
                },
                Op::Delete { key } => Decoded::Delete { key },
            })
            .collect();
        self.index_record(record_offset, decoded);
        Ok(())
    }

    fn append(&mut self, header: &[u8], payload: &[u8]) -> Result<(), String> {
        let at = self.end;
        let result = self.file.seek(SeekFrom::Start(at)).and_then(|_| {
            // One write of the whole record where possible: fewer host calls, and a
            // crash mid-record is caught by the checksum either way.
            let mut record = Vec::with_capacity(header.len() + payload.len());
            record.extend_from_slice(header);
            record.extend_from_slice(payload);
            self.file.write_all(&record)
        });
        match result {
            Ok(()) => {
                self.end = at + header.len() as u64 + payload.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Part of the record may be in the file: cut it off, or the next record
                // would land after garbage that recovery stops at, losing it.
                if let Err(cut) = self.file.set_len(at) {
                    self.failed = Some(format!(
                        "could not cut a failed append back to offset {at}: {cut}"
                    ));
                }
                Err(format!(
                    "logstore: append of {} bytes at offset {at} of {LOG_FILE}: {e}",
                    header.len() + payload.len()
                ))
            }
        }
    }

    /// Makes every applied batch durable.
    pub fn sync(&mut self) -> Result<(), String> {
        self.check_usable()?;
        if let Err(e) = self.file.sync_data() {
            let cause = format!("fdatasync of {LOG_FILE}: {e}");
            self.failed = Some(cause.clone());
            return Err(format!("logstore: {cause}"));
        }
        Ok(())
    }

    fn needs_compaction(&self) -> bool {
        self.end > COMPACT_LOG_BYTES_MIN
            && self.end > COMPACT_GARBAGE_RATIO * (self.live_bytes + log::HEADER_BYTES)
    }

    /// Rewrites the live entries to a new log and renames it over the current one. Until the
    /// rename the current log is untouched, so a crash (or an error) anywhere before it loses
    /// nothing; after it the new log holds everything, synced.
    fn compact(&mut self) -> Result<(), String> {
        let path = self.dir.join(COMPACT_FILE);
        match self.write_compacted(&path) {
            Ok((file, locs, end)) => {
                let log_path = self.dir.join(LOG_FILE);
                if let Err(e) = fs::rename(&path, &log_path) {
                    let _ = fs::remove_file(&path);
                    return Err(ctx(format!(
                        "compaction: rename over {}",
                        log_path.display()
                    ))(e));
                }
                // The new file is the log now, whatever happens to the directory sync.
                self.file = file;
                self.end = end;
                for (loc, new) in self.index.values_mut().zip(locs) {
                    *loc = new;
                }
                if let Err(e) = sync_dir(&self.dir) {
                    self.failed = Some(format!("directory sync after compaction: {e}"));
                    return Err(e);
                }
                Ok(())
            }
            Err(e) => {
                // Best effort: the leftover is removed on the next open anyway.
                let _ = fs::remove_file(&path);
                Err(format!(
                    "logstore: compaction failed, log left as it was: {e}"
                ))
            }
        }
    }

    /// Writes the compacted log to `path`; returns it (synced), the new location of every
    /// index entry in key order, and its length.
    fn write_compacted(&mut self, path: &Path) -> Result<(File, Vec<Loc>, u64), String> {
        let what = format!("write {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(ctx(&what))?;
        let mut out = BufWriter::with_capacity(COMPACT_RECORD_BYTES_TARGET, &file);
        out.write_all(log::MAGIC).map_err(ctx(&what))?;
        let mut end = log::HEADER_BYTES;
        let entries: Vec<(Vec<u8>, Loc)> =
            self.index.iter().map(|(k, l)| (k.clone(), *l)).collect();
        let mut locs = Vec::with_capacity(entries.len());
        let mut chunk: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut chunk_bytes = 0usize;
        let mut entries = entries.into_iter().peekable();
        while let Some((key, loc)) = entries.next() {
            let value = self.read_value(loc)?;
            chunk_bytes += 9 + key.len() + value.len();
            chunk.push((key, value));
            if chunk_bytes >= COMPACT_RECORD_BYTES_TARGET || entries.peek().is_none() {
                let mut payload = log::start_payload(chunk.len(), chunk_bytes + 4)?;
                let mut positions = Vec::with_capacity(chunk.len());
                for (k, v) in &chunk {
                    positions.push((log::encode_put(&mut payload, k, v)?, v.len() as u32));
                }
                let header = log::record_header(&payload)?;
                out.write_all(&header)
                    .and_then(|_| out.write_all(&payload))
                    .map_err(ctx(&what))?;
                let payload_offset = end + log::RECORD_HEADER_BYTES;
                locs.extend(positions.into_iter().map(|(pos, len)| Loc {
                    offset: payload_offset + pos as u64,
                    len,
                }));
                end = payload_offset + payload.len() as u64;
                chunk.clear();
                chunk_bytes = 0;
            }
        }
        out.flush().map_err(ctx(&what))?;
        drop(out);
        file.sync_all()
            .map_err(ctx(format!("sync {}", path.display())))?;
        Ok((file, locs, end))
    }
}

/// Makes a create or rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ctx(format!("sync directory {}", dir.display())))
}
