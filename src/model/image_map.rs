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
    fn clip(&self, start: u64, end: u64) -> Option<Segment> {
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
        segments.sort_by_key(|s| s.range.offset);
        ImageMap {
            size,
            segments: normalize(segments),
        }
    }

    /// The image of a child: this map cut or extended to `size`, with `top`
    /// laid over it. Grown space stays a hole (reads as zeroes).
    pub fn overlay(&self, top: &ImageMap) -> ImageMap {
        let size = top.size;
        let mut out = Vec::with_capacity(self.segments.len() + top.segments.len());
        let mut base = self.segments.iter().peekable();
        let mut pos = 0u64;
        for t in top
            .segments
            .iter()
            .chain(std::iter::once(&Segment::zero(ByteRange::new(size, 0))))
        {
            // Copy the parent's segments in the gap [pos, t.start).
            let gap_end = t.range.offset.min(size);
            while let Some(b) = base.peek() {
                if b.range.offset >= gap_end {
                    break;
                }
                if let Some(c) = b.clip(pos, gap_end) {
                    out.push(c);
                }
                if b.range.end() <= gap_end {
                    base.next();
                } else {
                    break;
                }
            }
            if !t.range.is_empty() {
                out.push(*t);
            }
            pos = t.range.end();
        }
        ImageMap {
            size,
            segments: normalize(out),
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

    /// The binary form kept in the catalog (version [`ENCODING_VERSION`]):
    /// size and segment count as u64 LE, then per segment offset and length
    /// (u64 LE) and a tag: 0 zero, or 1 followed by the skip (u32 LE) and
    /// the 32-byte chunk id.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.segments.len() * 53);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.segments.len() as u64).to_le_bytes());
        for s in &self.segments {
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

    pub fn decode(bytes: &[u8]) -> Result<Self> {
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
            segments.push(Segment { range, piece });
        }
        Ok(ImageMap::new(size, segments))
    }
}

/// The version of the layout [`ImageMap::encode`] writes. The bytes carry
/// no version field; this names the layout for `strata --version` and
/// docs/FORMAT.md, and must change with it.
pub const ENCODING_VERSION: u32 = 1;

/// Merge touching segments that continue each other (input sorted).
fn normalize(segments: Vec<Segment>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
    for s in segments {
        if s.range.is_empty() {
            continue;
        }
        if let Some(last) = out.last_mut() {
            let touching = last.range.end() == s.range.offset;
            let continues = match (last.piece, s.piece) {
                (Piece::Zero, Piece::Zero) => true,
                (Piece::Data { chunk: a, skip: sa }, Piece::Data { chunk: b, skip: sb }) => {
                    a == b && u64::from(sa) + last.range.length == u64::from(sb)
                }
                _ => false,
            };
            if touching && continues {
                last.range.length += s.range.length;
                continue;
            }
        }
        out.push(s);
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .bytes
            .get(self.pos..self.pos + n)
            .ok_or_else(|| Error::invalid("image map: truncated"))?;
        self.pos += n;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
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
    fn encode_roundtrip() {
        let m = ImageMap::new(
            1 << 40,
            vec![data(0, 7, 9), Segment::zero(ByteRange::new(7, 1))],
        );
        assert_eq!(ImageMap::decode(&m.encode()).unwrap(), m);
        assert!(ImageMap::decode(&m.encode()[..20]).is_err());
    }
}
