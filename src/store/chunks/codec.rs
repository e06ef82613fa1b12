//! The chunk encoding both chunk stores share: a chunk is an 8-byte header
//! (`SC`, version 2, encoding, payload length as u32 LE), the payload,
//! zstd-compressed unless that would be larger (and sealed with AES-256-GCM
//! in an encrypted repository), and zeroes up to a multiple of 4096 bytes.
//! The padding costs no space in a file (file systems allocate whole
//! blocks) and lets a local store write the whole file with O_DIRECT.
//! Version 1 (a 4-byte header, no length, no padding) is still read.

use std::cell::RefCell;

use crate::error::{Error, IoContext, Result};
use crate::model::chunk_id::ChunkId;
use crate::store::crypto::{Keys, NONCE_LEN, SEAL_OVERHEAD, TAG_LEN};

/// Chunks never exceed this many bytes of raw data.
pub const MAX_CHUNK_SIZE: usize = 4 << 20;

const MAGIC: [u8; 2] = *b"SC";
/// The chunk file version written; [`VERSION_1`] files are still read.
pub const VERSION: u8 = 2;
pub const VERSION_1: u8 = 1;
pub(super) const ENC_RAW: u8 = 0;
const ENC_ZSTD: u8 = 1;
/// Set on the encoding byte of a chunk sealed with the repository's key.
const ENC_SEALED: u8 = 0x80;
pub(super) const HEADER_LEN: usize = 8;
const HEADER_LEN_1: usize = 4;

thread_local! {
    // zstd contexts are costly to set up; each worker thread keeps its own.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compress `data` into `out`; `None` when it does not fit (no gain).
fn compress_into(data: &[u8], level: i32, out: &mut [u8]) -> Result<Option<usize>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            let c = zstd::bulk::Compressor::new(level).ctx(|| "zstd init".into())?;
            *slot = Some((level, c));
        }
        let (_, c) = slot.as_mut().expect("compressor was just set");
        // Too small a destination is zstd's error for "no gain".
        Ok(c.compress_to_buffer(data, out).ok())
    })
}

fn decompress(payload: &[u8], into: &mut Vec<u8>) -> std::io::Result<()> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        let d = slot.as_mut().expect("decompressor was just set");
        into.clear();
        // Reserve what the frame says it holds (bounded), not the maximum:
        // decoded chunks sit in caches, where spare capacity is waste.
        let want = zstd::zstd_safe::get_frame_content_size(payload)
            .ok()
            .flatten()
            .map_or(MAX_CHUNK_SIZE, |n| (n as usize).min(MAX_CHUNK_SIZE));
        into.reserve_exact(want);
        d.decompress_to_buffer(payload, into)?;
        Ok(())
    })
}

/// Length of the file holding a chunk body of `len` bytes.
pub(super) fn padded(len: usize) -> usize {
    len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
}

/// Encode raw data as a chunk file into `out`, which must hold
/// `padded(HEADER_LEN + SEAL_OVERHEAD + data.len())` bytes; returns the
/// body's length (header and payload). The file is `out[..padded(body)]`.
/// With `seal`, the payload is sealed under the chunk's name after
/// compression.
pub(super) fn encode_into(
    data: &[u8],
    level: i32,
    seal: Option<(&Keys, &ChunkId)>,
    out: &mut [u8],
) -> Result<usize> {
    out[..2].copy_from_slice(&MAGIC);
    out[2] = VERSION;
    let start = HEADER_LEN + if seal.is_some() { NONCE_LEN } else { 0 };
    // Compressed output must be smaller than the data to be worth it.
    let room = start + data.len().saturating_sub(1);
    let (mut encoding, len) = match compress_into(data, level, &mut out[start..room])? {
        Some(n) => (ENC_ZSTD, n),
        None => {
            out[start..start + data.len()].copy_from_slice(data);
            (ENC_RAW, data.len())
        }
    };
    let body = match seal {
        Some((keys, id)) => {
            keys.seal_chunk(id, &mut out[HEADER_LEN..start + len + TAG_LEN])?;
            encoding |= ENC_SEALED;
            len + SEAL_OVERHEAD
        }
        None => len,
    };
    out[3] = encoding;
    let payload_len = u32::try_from(body).expect("chunks are at most MAX_CHUNK_SIZE");
    out[4..HEADER_LEN].copy_from_slice(&payload_len.to_le_bytes());
    out[HEADER_LEN + body..padded(HEADER_LEN + body)].fill(0);
    Ok(HEADER_LEN + body)
}

/// The encoding byte and payload of a chunk file, or what is wrong with it.
fn parse(file: &[u8]) -> std::result::Result<(u8, std::ops::Range<usize>), &'static str> {
    if file.len() < HEADER_LEN_1 || file[..2] != MAGIC {
        return Err("bad header (truncated or not a chunk)");
    }
    match file[2] {
        VERSION_1 => Ok((file[3], HEADER_LEN_1..file.len())),
        VERSION if file.len() >= HEADER_LEN => {
            let len = u32::from_le_bytes(file[4..HEADER_LEN].try_into().expect("4 bytes")) as usize;
            let end = HEADER_LEN
                .checked_add(len)
                .filter(|&end| end <= file.len())
                .ok_or("truncated")?;
            // Damage in the padding is damage too: verify must report it.
            if !is_zero(&file[end..]) {
                return Err("nonzero padding");
            }
            Ok((file[3], HEADER_LEN..end))
        }
        _ => Err("bad header (truncated or not a chunk)"),
    }
}

/// Whether `buf` is all zero bytes, a machine word at a time.
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to handles the edges.
    let (head, body, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

fn bad_chunk(id: &ChunkId, message: &str) -> Error {
    Error::BadChunk {
        hash: id.to_hex(),
        message: message.to_string(),
    }
}

/// Decode a chunk file into `into` and check it against `id` (keyed by
/// `keys` in an encrypted repository, which only accepts sealed chunks).
/// A sealed `file` is opened in place.
pub fn decode(
    id: &ChunkId,
    file: &mut [u8],
    into: &mut Vec<u8>,
    keys: Option<&Keys>,
) -> Result<()> {
    let Some(keys) = keys else {
        return decode_unsealed(id, file, into);
    };
    let bad = |message: &str| bad_chunk(id, message);
    let (encoding, range) = parse(file).map_err(bad)?;
    if encoding & ENC_SEALED == 0 {
        return Err(bad("not sealed, in an encrypted repository"));
    }
    let body = &mut file[range];
    let open = keys.open_chunk(id, body).map_err(|e| bad(&e.to_string()))?;
    decode_payload(id, encoding, &body[open], into, Some(keys))
}

/// [`decode`] for an unencrypted repository, whose chunk files need not be
/// opened in place: from shared bytes.
pub fn decode_unsealed(id: &ChunkId, file: &[u8], into: &mut Vec<u8>) -> Result<()> {
    let bad = |message: &str| bad_chunk(id, message);
    let (encoding, range) = parse(file).map_err(bad)?;
    if encoding & ENC_SEALED != 0 {
        return Err(bad("sealed (encrypted) chunk in an unencrypted repository"));
    }
    decode_payload(id, encoding, &file[range], into, None)
}

/// Decompress (or copy) a chunk's opened payload into `into` and check it
/// against the chunk's name.
fn decode_payload(
    id: &ChunkId,
    encoding: u8,
    payload: &[u8],
    into: &mut Vec<u8>,
    keys: Option<&Keys>,
) -> Result<()> {
    let bad = |message: &str| bad_chunk(id, message);
    match encoding & !ENC_SEALED {
        ENC_RAW => {
            into.clear();
            into.extend_from_slice(payload);
        }
        ENC_ZSTD => {
            decompress(payload, into).map_err(|e| bad(&format!("cannot decompress: {e}")))?
        }
        _ => return Err(bad("unknown encoding")),
    }
    if chunk_id(keys, into) != *id {
        return Err(bad("content does not match its hash"));
    }
    Ok(())
}

/// The name of a chunk holding `data`: keyed in an encrypted repository.
pub(super) fn chunk_id(keys: Option<&Keys>, data: &[u8]) -> ChunkId {
    match keys {
        Some(k) => k.chunk_id(data),
        None => ChunkId::of(data),
    }
}

/// The stored form of a chunk holding `data` under `id` (sealed with
/// `keys`): the same bytes a local store writes to its file.
pub fn encode_file(data: &[u8], level: i32, keys: Option<&Keys>, id: &ChunkId) -> Result<Vec<u8>> {
    let mut out = vec![0u8; padded(HEADER_LEN + SEAL_OVERHEAD + data.len())];
    let len = encode_into(data, level, keys.map(|k| (k, id)), &mut out)?;
    out.truncate(padded(len));
    Ok(out)
}

/// Whether an encoded chunk is in the current (padded) format, which
/// [`ChunkStore::put_file`](super::ChunkStore::put_file)
/// stores as it is.
pub fn is_current_file(file: &[u8]) -> bool {
    file.get(2) == Some(&VERSION) && file.len() % DIRECT_ALIGN == 0
}

/// O_DIRECT wants buffers, offsets and lengths aligned to the logical block
/// size; 4096 covers every common device.
pub(super) const DIRECT_ALIGN: usize = 4096;
