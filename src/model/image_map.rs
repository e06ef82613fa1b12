//! The resolved map of a point-in-time image: which byte ranges are zero and
//! which chunk (and where in it) holds each data range. Gaps are holes.
//!
//! A snapshot's map is computed once, when it is committed, by overlaying its
//! own segments onto its parent's map. Reads then do one binary search,
//! whatever the depth of the incremental chain (invariant 3).

use crate::error::{Error, Result};
use crate::model::chunk_id::ChunkId;
use crate::model::extent::{coalesce, ByteRange, Extent, ExtentKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    Zero,
    /// Bytes `skip..skip + len` of the chunk's raw data.
    Data {
        chunk: ChunkId,
        skip: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub range: ByteRange,
    pub piece: Piece,
}

impl Segment {
    pub fn zero(range: ByteRange) -> Self {
        Segment {
            range,
            piece: Piece::Zero,
        }
    }

    pub fn data(range: ByteRange, chunk: ChunkId, skip: u32) -> Self {
        Segment {
            range,
            piece: Piece::Data { chunk, skip },
        }
    }

    /// The part of this segment inside `[start, end)`, with the chunk offset
    /// moved along.
    pub fn clip(&self, start: u64, end: u64) -> Option<Segment> {
        let r = self.range.intersect(&ByteRange::from_bounds(start, end))?;
        let piece = match self.piece {
            Piece::Zero => Piece::Zero,
            Piece::Data { chunk, skip } => Piece::Data {
                chunk,
                skip: skip + (r.offset - self.range.offset) as u32,
            },
        };
        Some(Segment { range: r, piece })
    }

    pub fn kind(&self) -> ExtentKind {
        match self.piece {
            Piece::Zero => ExtentKind::Zero,
            Piece::Data { .. } => ExtentKind::Data,
        }
    }
}

/// What reading an image's bytes needs from its map: its size and the
/// segments over a range. Implemented by [`ImageMap`] and by the form the
/// mount and restore keep while they read,
/// [`CompactMap`](crate::model::compact_map::CompactMap).
pub trait MapView {
    fn size(&self) -> u64;
    /// Segments intersecting `range`, clipped to it, in order.
    fn slice(&self, range: ByteRange) -> impl Iterator<Item = Segment> + '_;
}

impl MapView for ImageMap {
    fn size(&self) -> u64 {
        self.size
    }

    fn slice(&self, range: ByteRange) -> impl Iterator<Item = Segment> + '_ {
        ImageMap::slice(self, range)
    }
}

/// Sorted, non-overlapping segments of an image of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageMap {
    pub size: u64,
    pub segments: Vec<Segment>,
}

impl ImageMap {
    /// A map from segments in any order, in canonical form: adjacent zero
    /// segments, and adjacent pieces of one chunk, are merged, so that two
    /// maps of the same image compare equal however they were built.
    pub fn new(size: u64, mut segments: Vec<Segment>) -> Self {
        // Decoded maps come sorted: skip the sort and its scratch buffer.
        if !segments.is_sorted_by_key(|s| s.range.offset) {
            segments.sort_by_key(|s| s.range.offset);
        }
        normalize(&mut segments);
        ImageMap { size, segments }
    }

    /// The image of a child: this map cut or extended to `size`, with `top`
    /// laid over it. Grown space stays a hole (reads as zeroes).
    pub fn overlay(&self, top: &ImageMap) -> ImageMap {
        let mut out = Vec::with_capacity(overlay_bound(self, top));
        self.overlay_below(top, u64::MAX, |s| push_merged(&mut out, s));
        ImageMap {
            size: top.size,
            segments: out,
        }
    }

    /// `self` with `tops` laid over it one after the other, oldest first:
    /// the same map as `tops.fold(self, overlay)`, but with one pass over
    /// `self` and one output, where the fold copies the whole image once
    /// per top. The tops (own maps, small next to the image) are first
    /// laid over each other; `self` then shows through only below every
    /// top's size (space cut by a top and grown again by a later one is a
    /// hole).
    pub fn overlay_all(self, tops: &[ImageMap]) -> ImageMap {
        match merge_tops(tops) {
            None => self,
            Some((top, limit)) => {
                let mut out = Vec::with_capacity(overlay_bound(&self, &top));
                self.overlay_below(&top, limit, |s| push_merged(&mut out, s));
                ImageMap {
                    size: top.size,
                    segments: out,
                }
            }
        }
    }

    /// [`overlay`](Self::overlay) with only the part of `self` below
    /// `limit` showing through, the result's segments handed to `emit` in
    /// order (not merged, empty ones included).
    pub(crate) fn overlay_below(&self, top: &ImageMap, limit: u64, mut emit: impl FnMut(Segment)) {
        let size = top.size;
        let mut base = self.segments.iter().peekable();
        let mut pos = 0u64;
        for t in top
            .segments
            .iter()
            .chain(std::iter::once(&Segment::zero(ByteRange::new(size, 0))))
        {
            // Copy the parent's segments in the gap [pos, t.start).
            let gap_end = t.range.offset.min(size).min(limit).max(pos);
            while let Some(b) = base.peek() {
                if b.range.offset >= gap_end {
                    break;
                }
                if let Some(c) = b.clip(pos, gap_end) {
                    emit(c);
                }
                if b.range.end() <= gap_end {
                    base.next();
                } else {
                    break;
                }
            }
            emit(*t);
            pos = t.range.end();
        }
    }

    /// Index of the first segment that ends after `offset`.
    pub fn first_after(&self, offset: u64) -> usize {
        self.segments.partition_point(|s| s.range.end() <= offset)
    }

    /// Segments intersecting `range`, clipped to it.
    pub fn slice(&self, range: ByteRange) -> impl Iterator<Item = Segment> + '_ {
        let end = range.end();
        self.segments[self.first_after(range.offset)..]
            .iter()
            .take_while(move |s| s.range.offset < end)
            .filter_map(move |s| s.clip(range.offset, end))
    }

    /// The allocation of the image as merged extents; gaps are holes.
    pub fn extents(&self) -> Vec<Extent> {
        coalesce(self.segments.iter().map(|s| Extent::new(s.range, s.kind())))
    }

    /// Bytes backed by stored data.
    pub fn data_bytes(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| matches!(s.piece, Piece::Data { .. }))
            .map(|s| s.range.length)
            .sum()
    }

    /// SEEK_DATA: the first offset `>= offset` backed by stored data. Zero
    /// extents count as holes: they read as zeroes and need not be copied.
    pub fn seek_data(&self, offset: u64) -> Option<u64> {
        self.segments[self.first_after(offset)..]
            .iter()
            .find(|s| matches!(s.piece, Piece::Data { .. }))
            .map(|s| s.range.offset.max(offset))
    }

    /// SEEK_HOLE: the first offset `>= offset` not backed by data, or the size.
    pub fn seek_hole(&self, offset: u64) -> u64 {
        let mut pos = offset;
        for s in &self.segments[self.first_after(offset)..] {
            if s.range.offset > pos || matches!(s.piece, Piece::Zero) {
                break;
            }
            pos = s.range.end();
        }
        pos.min(self.size).max(offset)
    }

    /// Distinct chunks the map refers to.
    pub fn chunks(&self) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = self
            .segments
            .iter()
            .filter_map(|s| match s.piece {
                Piece::Data { chunk, .. } => Some(chunk),
                Piece::Zero => None,
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The binary form kept in the catalog, the pins and (version
    /// [`ENCODING_VERSION`]) described in docs/FORMAT.md: the magic
    /// [`MAGIC`], the body's length, then the body compressed with zstd.
    /// The body names each distinct chunk once and refers to it by index,
    /// and stores offsets as the gap since the previous segment's end, all
    /// as LEB128 varints, so a map costs about its chunk names (32 bytes
    /// each, incompressible) plus a few bytes per segment.
    pub fn encode(&self) -> Vec<u8> {
        // Chunks in order of first use: an index is small, and a full
        // backup's indices count up, which zstd shrinks further.
        let mut index: std::collections::HashMap<ChunkId, u64> = Default::default();
        let mut table: Vec<ChunkId> = Vec::new();
        for s in &self.segments {
            if let Piece::Data { chunk, .. } = s.piece {
                index.entry(chunk).or_insert_with(|| {
                    table.push(chunk);
                    table.len() as u64 - 1
                });
            }
        }
        encode_parts(
            self.size,
            &table,
            self.segments.len(),
            self.segments.iter().map(|s| match s.piece {
                Piece::Zero => (s.range, None),
                Piece::Data { chunk, skip } => (s.range, Some((index[&chunk], skip))),
            }),
        )
    }

    /// Decode either encoding: [`ENCODING_VERSION`] (starts with [`MAGIC`])
    /// or version 1, the fixed-width form of catalogs written before it.
    /// A damaged blob is an error, never a panic or a wrong map.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        match bytes.strip_prefix(MAGIC) {
            Some(rest) => decode_v2(rest),
            None => decode_v1(bytes),
        }
    }
}

/// The first bytes of an encoded map ([`ENCODING_VERSION`] 2). Version 1
/// blobs start with the image size as u64 LE; these eight bytes would be a
/// size of about 3.6 EiB, beyond any disk (NBD and QEMU stop at 2^63), so
/// the two cannot be confused.
pub const MAGIC: &[u8; 8] = b"strataM2";

/// Largest decoded body accepted: far above any real map (a 1 TiB disk cut
/// into 1 MiB chunks is ~40 MB), small enough that a corrupt length
/// cannot make us allocate without bound.
const MAX_BODY: u64 = 1 << 32;

fn decode_v2(rest: &[u8]) -> Result<ImageMap> {
    let bad = |m: &str| Error::invalid(format!("image map: {m}"));
    let mut r = Reader {
        bytes: rest,
        pos: 0,
    };
    let len = r.varint()?;
    if len > MAX_BODY {
        return Err(bad("implausible length"));
    }
    let body = zstd::bulk::decompress(&rest[r.pos..], len as usize)
        .map_err(|e| Error::invalid(format!("image map: bad zstd frame: {e}")))?;
    if body.len() as u64 != len {
        return Err(bad("length does not match its body"));
    }
    let mut r = Reader {
        bytes: &body,
        pos: 0,
    };
    let size = r.varint()?;
    let chunks = r.varint()?;
    // Each id takes 32 bytes of the body: a count beyond that is damage.
    if chunks > (body.len() / 32) as u64 {
        return Err(bad("chunk count exceeds the body"));
    }
    let mut table = Vec::with_capacity(chunks as usize);
    for _ in 0..chunks {
        table.push(ChunkId(r.take(32)?.try_into().expect("32 bytes")));
    }
    let n = r.varint()?;
    // Every segment takes at least three bytes.
    if n > (body.len() / 3) as u64 {
        return Err(bad("segment count exceeds the body"));
    }
    let mut segments = Vec::with_capacity(n as usize);
    let mut end = 0u64;
    for _ in 0..n {
        let offset = end
            .checked_add(r.varint()?)
            .ok_or_else(|| bad("offset overflows"))?;
        let length = r.varint()?;
        end = offset
            .checked_add(length)
            .filter(|e| *e <= size)
            .ok_or_else(|| bad("segment beyond the image size"))?;
        let piece = match r.varint()? {
            0 => Piece::Zero,
            i => {
                let chunk = *table
                    .get((i - 1) as usize)
                    .ok_or_else(|| bad("chunk index out of range"))?;
                let skip = u32::try_from(r.varint()?).map_err(|_| bad("skip out of range"))?;
                Piece::Data { chunk, skip }
            }
        };
        segments.push(Segment {
            range: ByteRange::new(offset, length),
            piece,
        });
    }
    if r.pos != body.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(ImageMap::new(size, segments))
}

/// Version 1: size and segment count as u64 LE, then per segment offset
/// and length (u64 LE) and a tag: 0 zero, or 1 followed by the skip (u32
/// LE) and the 32-byte chunk id. Catalogs written before version 2 hold it.
fn decode_v1(bytes: &[u8]) -> Result<ImageMap> {
    let mut r = Reader { bytes, pos: 0 };
    let size = r.u64()?;
    let n = r.u64()?;
    let mut segments = Vec::with_capacity(n.min(1 << 20) as usize);
    for _ in 0..n {
        let range = ByteRange::new(r.u64()?, r.u64()?);
        let piece = match r.take(1)?[0] {
            0 => Piece::Zero,
            1 => {
                let skip = u32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes"));
                let chunk = ChunkId(r.take(32)?.try_into().expect("32 bytes"));
                Piece::Data { chunk, skip }
            }
            t => return Err(Error::invalid(format!("image map: bad segment tag {t}"))),
        };
        if range.offset.checked_add(range.length).is_none() {
            return Err(Error::invalid("image map: segment overflows"));
        }
        segments.push(Segment { range, piece });
    }
    Ok(ImageMap::new(size, segments))
}

/// The encoding ([`ImageMap::encode`]) of a map given as its chunk table, in
/// order of first use, and its `count` segments, each with the index of
/// its chunk in `table` and its skip, or `None` for zero. Shared with
/// [`CompactMap::encode`](crate::model::compact_map::CompactMap::encode),
/// which keeps its chunks in that order.
pub(crate) fn encode_parts(
    size: u64,
    table: &[ChunkId],
    count: usize,
    segments: impl Iterator<Item = (ByteRange, Option<(u64, u32)>)>,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + table.len() * 32 + count * 8);
    put_varint(&mut body, size);
    put_varint(&mut body, table.len() as u64);
    for c in table {
        body.extend_from_slice(&c.0);
    }
    put_varint(&mut body, count as u64);
    let mut end = 0u64;
    for (range, piece) in segments {
        put_varint(&mut body, range.offset - end);
        put_varint(&mut body, range.length);
        match piece {
            None => put_varint(&mut body, 0),
            Some((index, skip)) => {
                put_varint(&mut body, index + 1);
                put_varint(&mut body, u64::from(skip));
            }
        }
        end = range.end();
    }
    let mut out = Vec::with_capacity(body.len() / 2 + 24);
    out.extend_from_slice(MAGIC);
    put_varint(&mut out, body.len() as u64);
    // Level 3: maps are written once and read at every open.
    let packed = zstd::bulk::compress(&body, 3).expect("zstd compresses a buffer in memory");
    out.extend_from_slice(&packed);
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The version of the layout [`ImageMap::encode`] writes, shown by
/// `strata --version` and described in docs/FORMAT.md. Version 1 (no
/// magic, fixed width, uncompressed) is still read.
pub const ENCODING_VERSION: u32 = 2;

/// The most segments `top` laid over `base` can have: each top segment
/// adds itself and can split one base segment in two.
pub(crate) fn overlay_bound(base: &ImageMap, top: &ImageMap) -> usize {
    base.segments.len() + 2 * top.segments.len()
}

/// `tops` (oldest first) laid over each other, and the size below which
/// the map under them shows through (the smallest of theirs: space cut by
/// one top and grown again by a later one is a hole); `None` for no tops.
pub(crate) fn merge_tops(tops: &[ImageMap]) -> Option<(ImageMap, u64)> {
    let (first, rest) = tops.split_first()?;
    let merged = rest.iter().fold(first.clone(), |m, t| m.overlay(t));
    let limit = tops.iter().map(|t| t.size).min().unwrap_or(u64::MAX);
    Some((merged, limit))
}

/// Merge touching segments that continue each other and drop empty ones
/// (input sorted), in place.
fn normalize(segments: &mut Vec<Segment>) {
    let mut kept = 0;
    for i in 0..segments.len() {
        let s = segments[i];
        if s.range.is_empty() {
            continue;
        }
        if kept > 0 && continues(&segments[kept - 1], &s) {
            segments[kept - 1].range.length += s.range.length;
            continue;
        }
        segments[kept] = s;
        kept += 1;
    }
    segments.truncate(kept);
}

/// Append `s` to sorted, normalized `out`, merged into the last segment if
/// it continues it.
pub(crate) fn push_merged(out: &mut Vec<Segment>, s: Segment) {
    if s.range.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(last) if continues(last, &s) => last.range.length += s.range.length,
        _ => out.push(s),
    }
}

/// Whether `s` starts where `last` ends and holds what would follow it: both
/// zero, or the next bytes of the same chunk.
pub(crate) fn continues(last: &Segment, s: &Segment) -> bool {
    last.range.end() == s.range.offset
        && match (last.piece, s.piece) {
            (Piece::Zero, Piece::Zero) => true,
            (Piece::Data { chunk: a, skip: sa }, Piece::Data { chunk: b, skip: sb }) => {
                a == b && u64::from(sa) + last.range.length == u64::from(sb)
            }
            _ => false,
        }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .bytes
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or_else(|| Error::invalid("image map: truncated"))?;
        self.pos += n;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(Error::invalid("image map: varint overflows"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::invalid("image map: varint too long"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn data(off: u64, len: u64, n: u8) -> Segment {
        Segment::data(ByteRange::new(off, len), id(n), 0)
    }

    #[test]
    fn overlay_cuts_parent_segments() {
        let base = ImageMap::new(100, vec![data(0, 50, 1), data(60, 40, 2)]);
        let top = ImageMap::new(100, vec![Segment::zero(ByteRange::new(40, 30))]);
        let img = base.overlay(&top);
        assert_eq!(
            img.segments,
            vec![
                data(0, 40, 1),
                Segment::zero(ByteRange::new(40, 30)),
                Segment::data(ByteRange::new(70, 30), id(2), 10),
            ]
        );
    }

    #[test]
    fn overlay_truncates_and_grows() {
        let base = ImageMap::new(100, vec![data(0, 100, 1)]);
        let shrunk = base.overlay(&ImageMap::new(30, vec![]));
        assert_eq!(shrunk.segments, vec![data(0, 30, 1)]);
        let grown = shrunk.overlay(&ImageMap::new(200, vec![data(150, 10, 3)]));
        assert_eq!(grown.segments, vec![data(0, 30, 1), data(150, 10, 3)]);
        assert_eq!(grown.size, 200);
    }

    #[test]
    fn seek_and_slice() {
        let m = ImageMap::new(
            100,
            vec![
                data(10, 10, 1),
                Segment::zero(ByteRange::new(20, 5)),
                data(25, 5, 2),
                data(30, 5, 3),
            ],
        );
        assert_eq!(m.seek_data(0), Some(10));
        assert_eq!(m.seek_data(15), Some(15));
        assert_eq!(m.seek_data(20), Some(25));
        assert_eq!(m.seek_data(35), None);
        assert_eq!(m.seek_hole(0), 0);
        assert_eq!(m.seek_hole(12), 20);
        assert_eq!(m.seek_hole(26), 35);
        assert_eq!(m.seek_hole(50), 50);
        let s: Vec<_> = m.slice(ByteRange::new(15, 7)).collect();
        assert_eq!(
            s,
            vec![
                Segment::data(ByteRange::new(15, 5), id(1), 5),
                Segment::zero(ByteRange::new(20, 2))
            ]
        );
    }

    #[test]
    fn maps_are_canonical() {
        let z = |o, l| Segment::zero(ByteRange::new(o, l));
        let split = ImageMap::new(
            100,
            vec![
                z(0, 10),
                z(10, 10),
                data(20, 5, 1),
                Segment::data(ByteRange::new(25, 5), id(1), 5),
            ],
        );
        let whole = ImageMap::new(100, vec![z(0, 20), data(20, 10, 1)]);
        assert_eq!(split, whole);
        // Not merged: a gap, another chunk, or a non-continuing offset.
        let m = ImageMap::new(
            100,
            vec![
                z(0, 10),
                z(11, 1),
                data(20, 5, 1),
                data(25, 5, 1),
                data(30, 5, 2),
            ],
        );
        assert_eq!(m.segments.len(), 5);
        let base = ImageMap::new(30, vec![z(0, 10)]);
        let top = ImageMap::new(30, vec![z(10, 10)]);
        assert_eq!(base.overlay(&top).segments, vec![z(0, 20)]);
    }

    #[test]
    fn overlay_all_is_the_fold() {
        let mut rng = Rng(0x5851_f42d_4c95_7f2d);
        for round in 0..300 {
            let base = random_map(&mut rng, [0, 5, 200][round % 3], 20, 1 << 12);
            let tops: Vec<ImageMap> = (0..round % 7)
                .map(|_| {
                    let n = [0, 3, 40][rng.below(3) as usize];
                    let mut t = random_map(&mut rng, n, 50, 1 << 10);
                    // Sizes that cut the image and grow it again.
                    if rng.below(3) == 0 {
                        t.size = rng.below(base.size.max(1) * 2);
                        t.segments.retain(|s| s.range.end() <= t.size);
                    }
                    t
                })
                .collect();
            let fold = tops.iter().fold(base.clone(), |m, t| m.overlay(t));
            assert_eq!(base.overlay_all(&tops), fold, "round {round}");
        }
        // Cut to 10 by the first top, grown to 100 by the second: the base
        // beyond 10 must not show through.
        let base = ImageMap::new(100, vec![data(0, 100, 1)]);
        let tops = [
            ImageMap::new(10, vec![]),
            ImageMap::new(100, vec![data(50, 5, 2)]),
        ];
        assert_eq!(
            base.overlay_all(&tops).segments,
            vec![data(0, 10, 1), data(50, 5, 2)]
        );
    }

    #[test]
    fn new_sorts_and_merges() {
        let mut rng = Rng(3);
        for _ in 0..50 {
            let m = random_map(&mut rng, 100, 4, 1 << 12);
            let mut shuffled = m.segments.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.below(i as u64 + 1) as usize);
            }
            // Split pieces merge back.
            let mut split = Vec::new();
            for s in shuffled {
                let mid = s.range.offset + s.range.length / 2;
                split.extend(s.clip(s.range.offset, mid));
                split.extend(s.clip(mid, s.range.end()));
                split.push(Segment::zero(ByteRange::new(s.range.offset, 0)));
            }
            assert_eq!(ImageMap::new(m.size, split), m);
        }
    }

    /// A small deterministic generator (xorshift): the tests stay
    /// reproducible without a dependency.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// A random map: `n` segments with gaps, zero and data pieces drawn
    /// from `chunks` distinct chunks, random skips, lengths up to `max_len`.
    pub(crate) fn random_map(rng: &mut Rng, n: usize, chunks: u64, max_len: u64) -> ImageMap {
        let mut segments = Vec::new();
        let mut pos = 0u64;
        for _ in 0..n {
            pos += rng.below(3) * rng.below(max_len);
            let len = 1 + rng.below(max_len);
            let piece = if rng.below(4) == 0 {
                Piece::Zero
            } else {
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&rng.below(chunks).to_le_bytes());
                Piece::Data {
                    chunk: ChunkId(id),
                    skip: rng.below(2) as u32 * rng.below(1 << 22) as u32,
                }
            };
            segments.push(Segment {
                range: ByteRange::new(pos, len),
                piece,
            });
            pos += len;
        }
        ImageMap::new(pos + rng.below(max_len), segments)
    }

    /// The fixed-width version 1 encoder of catalogs written before
    /// version 2, kept to test that they still open.
    pub(crate) fn encode_v1(m: &ImageMap) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&m.size.to_le_bytes());
        out.extend_from_slice(&(m.segments.len() as u64).to_le_bytes());
        for s in &m.segments {
            out.extend_from_slice(&s.range.offset.to_le_bytes());
            out.extend_from_slice(&s.range.length.to_le_bytes());
            match s.piece {
                Piece::Zero => out.push(0),
                Piece::Data { chunk, skip } => {
                    out.push(1);
                    out.extend_from_slice(&skip.to_le_bytes());
                    out.extend_from_slice(&chunk.0);
                }
            }
        }
        out
    }

    #[test]
    fn encode_roundtrip() {
        let m = ImageMap::new(
            1 << 40,
            vec![data(0, 7, 9), Segment::zero(ByteRange::new(7, 1))],
        );
        assert_eq!(ImageMap::decode(&m.encode()).unwrap(), m);
        assert!(ImageMap::decode(&m.encode()[..20]).is_err());
        let empty = ImageMap::new(0, vec![]);
        assert_eq!(ImageMap::decode(&empty.encode()).unwrap(), empty);
        let sized = ImageMap::new(u64::MAX, vec![]);
        assert_eq!(ImageMap::decode(&sized.encode()).unwrap(), sized);
    }

    #[test]
    fn random_maps_roundtrip_in_both_encodings() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..300 {
            let n = [0, 1, 2, 10, 100, 1000][round % 6];
            let chunks = [1, 3, 1000, 1 << 40][round % 4];
            let max_len = [1, 4096, 1 << 20, 1 << 40][(round / 4) % 4];
            let m = random_map(&mut rng, n, chunks, max_len);
            assert_eq!(ImageMap::decode(&m.encode()).unwrap(), m, "round {round}");
            assert_eq!(
                ImageMap::decode(&encode_v1(&m)).unwrap(),
                m,
                "v1 round {round}"
            );
        }
    }

    #[test]
    fn distinct_chunks_are_named_once() {
        // 4096 segments over 16 chunks (small ranges grouped into shared
        // chunks): far below 53 bytes per segment of version 1.
        let mut segments = Vec::new();
        for i in 0..4096u64 {
            segments.push(Segment::data(
                ByteRange::new(i * 1_048_576, 65_536),
                id((i % 16) as u8),
                (i / 16 % 4) as u32 * 65_536,
            ));
        }
        let m = ImageMap::new(1 << 40, segments);
        let bytes = m.encode();
        assert!(bytes.len() < 4096 * 4, "{} bytes", bytes.len());
        assert_eq!(ImageMap::decode(&bytes).unwrap(), m);
        assert!(bytes.len() * 10 < encode_v1(&m).len());
    }

    #[test]
    fn damaged_blobs_are_errors() {
        let mut rng = Rng(7);
        let m = random_map(&mut rng, 50, 5, 1 << 20);
        let good = m.encode();
        for cut in 0..good.len() {
            let _ = ImageMap::decode(&good[..cut]).map(|d| assert_ne!(d, m, "cut {cut}"));
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x5a;
            // Whatever a flipped byte decodes to, decoding never panics.
            let _ = ImageMap::decode(&bad);
        }
        // A body that lies about its contents.
        let mut body = Vec::new();
        put_varint(&mut body, 100); // size
        put_varint(&mut body, 0); // no chunks
        put_varint(&mut body, 1); // one segment
        put_varint(&mut body, 0);
        put_varint(&mut body, 10);
        put_varint(&mut body, 1); // chunk index 0: out of range
        put_varint(&mut body, 0);
        let mut blob = MAGIC.to_vec();
        put_varint(&mut blob, body.len() as u64);
        blob.extend(zstd::bulk::compress(&body, 1).unwrap());
        assert!(ImageMap::decode(&blob).is_err());
        assert!(ImageMap::decode(b"strataM2").is_err());
        assert!(ImageMap::decode(&[]).is_err());
    }
}
