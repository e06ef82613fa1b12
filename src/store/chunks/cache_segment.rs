//! One segment file of the chunk cache (`object_cache`): records appended
//! one after another, each a header (magic, body length, chunk id) and the
//! chunk file as stored in the bucket. Nothing else is in the file, so a
//! segment is read back by walking its headers; a record cut short (a
//! process killed while appending, a full disk) ends the walk. Bodies are
//! checked by whoever reads them, as reads from the bucket are: a header
//! that lies costs a download, never a wrong chunk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::model::chunk_id::ChunkId;

const MAGIC: [u8; 4] = *b"SCC1";
pub const HEADER_LEN: u64 = 4 + 4 + 32;

/// Where a record's body is in its segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

/// A segment's name: its sequence number (age) in 16 hex digits.
pub fn file_name(seq: u64) -> String {
    format!("{seq:016x}.seg")
}

/// The sequence number of a segment file's name, if it is one.
pub fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

pub fn path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(file_name(seq))
}

/// A new, empty segment; fails if one of that number exists (another
/// process made it).
pub fn create(dir: &Path, seq: u64) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path(dir, seq))
}

/// The bytes a record of a `body_len` body takes.
pub fn record_len(body_len: usize) -> u64 {
    HEADER_LEN + body_len as u64
}

/// Write a record at `at`; the body's slot. Header and body are two
/// writes, not a copy of the body: a record cut between them is one cut
/// short.
pub fn append(file: &File, seq: u64, at: u64, id: &ChunkId, body: &[u8]) -> io::Result<Slot> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("chunk too large"))?;
    let mut header = [0u8; HEADER_LEN as usize];
    header[..4].copy_from_slice(&MAGIC);
    header[4..8].copy_from_slice(&len.to_le_bytes());
    header[8..].copy_from_slice(&id.0);
    file.write_all_at(&header, at)?;
    file.write_all_at(body, at + HEADER_LEN)?;
    Ok(Slot {
        segment: seq,
        offset: at + HEADER_LEN,
        len,
    })
}

/// The records of `file` from byte `from` on, up to the first one cut
/// short or not a record; and where that walk stopped.
pub fn scan(file: &File, seq: u64, from: u64) -> (Vec<(ChunkId, Slot)>, u64) {
    let size = file.metadata().map_or(0, |m| m.len());
    let mut found = Vec::new();
    let mut at = from;
    let mut header = [0u8; HEADER_LEN as usize];
    while at + HEADER_LEN <= size && file.read_exact_at(&mut header, at).is_ok() {
        let (magic, rest) = header.split_at(4);
        let (len, id) = rest.split_at(4);
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default());
        let end = at + HEADER_LEN + u64::from(len);
        if magic != MAGIC || end > size {
            break;
        }
        let id = ChunkId(id.try_into().unwrap_or_default());
        found.push((
            id,
            Slot {
                segment: seq,
                offset: at + HEADER_LEN,
                len,
            },
        ));
        at = end;
    }
    (found, at)
}

/// A record's body.
pub fn read(file: &File, slot: &Slot) -> io::Result<Vec<u8>> {
    let mut body = vec![0u8; slot.len as usize];
    file.read_exact_at(&mut body, slot.offset)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_a_cut_record_ends_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let file = create(dir.path(), 7).unwrap();
        assert!(create(dir.path(), 7).is_err(), "a segment is made once");
        let (a, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
        let first = append(&file, 7, 0, &a, b"first body").unwrap();
        let at = record_len(10);
        let second = append(&file, 7, at, &b, &[9u8; 1000]).unwrap();
        let end = at + record_len(1000);
        assert_eq!(scan(&file, 7, 0), (vec![(a, first), (b, second)], end));
        assert_eq!(read(&file, &second).unwrap(), vec![9u8; 1000]);
        // Killed while appending: the half-written record is not one.
        append(&file, 7, end, &a, &[5u8; 100]).unwrap();
        file.set_len(end + 60).unwrap();
        assert_eq!(scan(&file, 7, 0).0.len(), 2);
        // From where an earlier walk stopped.
        assert_eq!(scan(&file, 7, at), (vec![(b, second)], end));
        // Garbage where a header should be.
        file.write_all_at(b"XXXX", at).unwrap();
        assert_eq!(scan(&file, 7, 0), (vec![(a, first)], at));
    }

    #[test]
    fn names() {
        assert_eq!(parse_name(&file_name(0x2a)), Some(0x2a));
        assert_eq!(parse_name("000000000000002a.tmp"), None);
        assert_eq!(parse_name("2a.seg"), None);
        assert_eq!(parse_name("zz00000000000000.seg"), None);
    }
}
