//! `CompactMap`: a resolved image map in the form kept while an image is
//! read — by the mount for each open image, by restore for the command.
//!
//! An [`ImageMap`] segment takes 56 bytes, 32 of them the name of its chunk,
//! repeated in every piece of that chunk: an image flattened from many
//! incrementals cuts its chunks into many pieces (half a million segments
//! over ~130,000 chunks for a 1 TiB disk at depth 30, 28 MB). Here each
//! distinct chunk is named once, in a table in order of first use (the
//! order [`ImageMap::encode`] writes), and the segments are columns: start
//! (u64), length (u32), index into the table (u32) and skip (u32), 20 bytes
//! a segment. The rare length of 4 GiB or more (a long zero run) is kept
//! aside. It answers the same queries as [`ImageMap`], with the same
//! results, and is built from one, or straight from the layers the catalog
//! resolves an image from ([`CompactMap::overlay_all`]), so that opening
//! an image never holds the resolved [`ImageMap`] beside it.

use std::collections::HashMap;

use crate::model::chunk_id::ChunkId;
use crate::model::extent::ByteRange;
use crate::model::image_map::{self, merge_tops, overlay_bound, ImageMap, MapView, Piece, Segment};

/// `pieces` value of a zero segment.
const ZERO: u32 = u32::MAX;
/// `lens` value of a segment whose length is in `long`.
const LONG: u32 = u32::MAX;

/// The segments of an image of `size` bytes, sorted, canonical (as
/// [`ImageMap`]'s), in columns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompactMap {
    size: u64,
    starts: Vec<u64>,
    lens: Vec<u32>,
    /// Index into `chunks`, or [`ZERO`].
    pieces: Vec<u32>,
    /// Where in its chunk a data segment starts; 0 for zero segments.
    skips: Vec<u32>,
    /// (segment index, length) of the segments with [`LONG`] lengths, by
    /// index.
    long: Vec<(u32, u64)>,
    /// Distinct chunks, in order of first use.
    chunks: Vec<ChunkId>,
    data_bytes: u64,
}

impl From<&ImageMap> for CompactMap {
    fn from(map: &ImageMap) -> Self {
        let mut b = Builder::new(map.size, map.segments.len());
        for s in &map.segments {
            b.push(*s);
        }
        b.finish()
    }
}

/// Builds a [`CompactMap`] from sorted segments.
pub struct Builder {
    map: CompactMap,
    index: HashMap<ChunkId, u32>,
}

impl Builder {
    /// A map of an image of `size` bytes, with room for `segments` segments.
    pub fn new(size: u64, segments: usize) -> Self {
        Builder {
            map: CompactMap {
                size,
                starts: Vec::with_capacity(segments),
                lens: Vec::with_capacity(segments),
                pieces: Vec::with_capacity(segments),
                skips: Vec::with_capacity(segments),
                ..CompactMap::default()
            },
            index: HashMap::new(),
        }
    }

    /// Append `s`, which must start at or after the end of the last one;
    /// merged with it if it continues it, as [`ImageMap::new`] would.
    pub fn push(&mut self, s: Segment) {
        let m = &mut self.map;
        if s.range.is_empty() {
            return;
        }
        if let Some(last) = m.len().checked_sub(1) {
            debug_assert!(m.end_of(last) <= s.range.offset, "segments out of order");
            if image_map::continues(&m.segment(last), &s) {
                m.set_len(last, m.len_of(last) + s.range.length);
                if let Piece::Data { .. } = s.piece {
                    m.data_bytes += s.range.length;
                }
                return;
            }
        }
        let i = m.len();
        assert!(i < LONG as usize, "a map of 2^32 segments");
        m.starts.push(s.range.offset);
        m.lens.push(0);
        m.set_len(i, s.range.length);
        match s.piece {
            Piece::Zero => {
                m.pieces.push(ZERO);
                m.skips.push(0);
            }
            Piece::Data { chunk, skip } => {
                let next = m.chunks.len();
                let c = *self.index.entry(chunk).or_insert_with(|| {
                    assert!(next < ZERO as usize, "a map of 2^32 chunks");
                    m.chunks.push(chunk);
                    next as u32
                });
                m.pieces.push(c);
                m.skips.push(skip);
                m.data_bytes += s.range.length;
            }
        }
    }

    pub fn finish(self) -> CompactMap {
        let mut m = self.map;
        // Capacities were a guess from the input; merging may have left room.
        m.starts.shrink_to_fit();
        m.lens.shrink_to_fit();
        m.pieces.shrink_to_fit();
        m.skips.shrink_to_fit();
        m.long.shrink_to_fit();
        m.chunks.shrink_to_fit();
        m
    }
}

impl CompactMap {
    /// The compact form of `base.overlay_all(tops)` (tops oldest first, as
    /// `Catalog::image_layers` gives them), built as the overlay runs: the
    /// only full copy of the image besides `base` is this one.
    pub fn overlay_all(base: &ImageMap, tops: &[ImageMap]) -> CompactMap {
        let Some((top, limit)) = merge_tops(tops) else {
            return CompactMap::from(base);
        };
        let mut b = Builder::new(top.size, overlay_bound(base, &top));
        base.overlay_below(&top, limit, |s| b.push(s));
        b.finish()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    fn len_of(&self, i: usize) -> u64 {
        match self.lens[i] {
            LONG => {
                let at = self.long.partition_point(|&(j, _)| (j as usize) < i);
                self.long[at].1
            }
            l => u64::from(l),
        }
    }

    fn set_len(&mut self, i: usize, len: u64) {
        let at = self.long.partition_point(|&(j, _)| (j as usize) < i);
        let kept = self.long.get(at).is_some_and(|&(j, _)| j as usize == i);
        match u32::try_from(len) {
            Ok(l) if l != LONG => {
                self.lens[i] = l;
                if kept {
                    self.long.remove(at);
                }
            }
            _ => {
                self.lens[i] = LONG;
                if kept {
                    self.long[at].1 = len;
                } else {
                    self.long.insert(at, (i as u32, len));
                }
            }
        }
    }

    fn end_of(&self, i: usize) -> u64 {
        self.starts[i] + self.len_of(i)
    }

    /// Segment `i`.
    pub fn segment(&self, i: usize) -> Segment {
        let range = ByteRange::new(self.starts[i], self.len_of(i));
        match self.pieces[i] {
            ZERO => Segment::zero(range),
            c => Segment::data(range, self.chunks[c as usize], self.skips[i]),
        }
    }

    /// Index into [`chunk_table`](Self::chunk_table) of segment `i`'s
    /// chunk, `None` for a zero segment.
    pub fn chunk_index(&self, i: usize) -> Option<usize> {
        match self.pieces[i] {
            ZERO => None,
            c => Some(c as usize),
        }
    }

    /// The distinct chunks, in order of first use.
    pub fn chunk_table(&self) -> &[ChunkId] {
        &self.chunks
    }

    pub fn segments(&self) -> impl Iterator<Item = Segment> + '_ {
        (0..self.len()).map(|i| self.segment(i))
    }

    /// The same map as an [`ImageMap`].
    pub fn to_image_map(&self) -> ImageMap {
        ImageMap {
            size: self.size,
            segments: self.segments().collect(),
        }
    }

    /// Index of the first segment that ends after `offset`.
    pub fn first_after(&self, offset: u64) -> usize {
        // Segments are disjoint and sorted: of those starting at or before
        // `offset`, only the last can reach past it.
        let i = self.starts.partition_point(|&s| s <= offset);
        if i > 0 && self.end_of(i - 1) > offset {
            i - 1
        } else {
            i
        }
    }

    /// Segments intersecting `range`, clipped to it.
    pub fn slice(&self, range: ByteRange) -> impl Iterator<Item = Segment> + '_ {
        let end = range.end();
        (self.first_after(range.offset)..self.len())
            .take_while(move |&i| self.starts[i] < end)
            .filter_map(move |i| self.segment(i).clip(range.offset, end))
    }

    /// Bytes backed by stored data.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// SEEK_DATA, as [`ImageMap::seek_data`].
    pub fn seek_data(&self, offset: u64) -> Option<u64> {
        let from = self.first_after(offset);
        self.pieces[from..]
            .iter()
            .position(|&p| p != ZERO)
            .map(|i| self.starts[from + i].max(offset))
    }

    /// SEEK_HOLE, as [`ImageMap::seek_hole`].
    pub fn seek_hole(&self, offset: u64) -> u64 {
        let mut pos = offset;
        for i in self.first_after(offset)..self.len() {
            if self.starts[i] > pos || self.pieces[i] == ZERO {
                break;
            }
            pos = self.end_of(i);
        }
        pos.min(self.size).max(offset)
    }

    /// Distinct chunks the map refers to, sorted, as [`ImageMap::chunks`].
    pub fn chunks(&self) -> Vec<ChunkId> {
        let mut ids = self.chunks.clone();
        ids.sort_unstable();
        ids
    }

    /// The same bytes as [`ImageMap::encode`] of this map.
    pub fn encode(&self) -> Vec<u8> {
        image_map::encode_parts(
            self.size,
            &self.chunks,
            self.len(),
            (0..self.len()).map(|i| {
                let range = ByteRange::new(self.starts[i], self.len_of(i));
                match self.pieces[i] {
                    ZERO => (range, None),
                    c => (range, Some((u64::from(c), self.skips[i]))),
                }
            }),
        )
    }

    /// Bytes of memory the map holds (its columns and table).
    pub fn heap_bytes(&self) -> usize {
        self.starts.capacity() * 8
            + (self.lens.capacity() + self.pieces.capacity() + self.skips.capacity()) * 4
            + self.long.capacity() * std::mem::size_of::<(u32, u64)>()
            + self.chunks.capacity() * 32
    }
}

impl MapView for CompactMap {
    fn size(&self) -> u64 {
        self.size
    }

    fn slice(&self, range: ByteRange) -> impl Iterator<Item = Segment> + '_ {
        CompactMap::slice(self, range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::image_map::tests::{random_map, Rng};

    /// Offsets worth asking about: every segment boundary, one byte either
    /// side, the size and beyond, and some random ones.
    fn probes(m: &ImageMap, rng: &mut Rng) -> Vec<u64> {
        let mut at = vec![
            0,
            1,
            m.size.saturating_sub(1),
            m.size,
            m.size + 1,
            u64::MAX / 2,
        ];
        for s in &m.segments {
            for p in [s.range.offset, s.range.end()] {
                at.extend([p.saturating_sub(1), p, p + 1]);
            }
        }
        for _ in 0..20 {
            at.push(rng.below(m.size.max(1) + 10));
        }
        at
    }

    fn check(m: &ImageMap, rng: &mut Rng, what: &str) {
        let c = CompactMap::from(m);
        assert_eq!(c.size(), m.size, "{what}");
        assert_eq!(c.len(), m.segments.len(), "{what}");
        assert_eq!(c.to_image_map(), *m, "{what}");
        assert_eq!(c.data_bytes(), m.data_bytes(), "{what}");
        assert_eq!(c.chunks(), m.chunks(), "{what}");
        assert_eq!(c.encode(), m.encode(), "{what}");
        // Built from the segments one by one, pieces split: merged back.
        let mut b = Builder::new(m.size, 0);
        for s in &m.segments {
            // (A data piece's skip is a u32: split only where it stays one.)
            let half = match s.piece {
                Piece::Data { skip, .. } if u64::from(skip) + s.range.length > 1 << 32 => 0,
                _ => s.range.length / 2,
            };
            if half == 0 {
                b.push(*s);
                continue;
            }
            let mid = s.range.offset + half;
            b.push(s.clip(s.range.offset, mid).unwrap());
            b.push(s.clip(mid, s.range.end()).unwrap());
        }
        assert_eq!(b.finish(), c, "{what}: built from split segments");
        let at = probes(m, rng);
        for &o in &at {
            assert_eq!(
                c.first_after(o),
                m.first_after(o),
                "{what}: first_after({o})"
            );
            assert_eq!(c.seek_data(o), m.seek_data(o), "{what}: seek_data({o})");
            assert_eq!(c.seek_hole(o), m.seek_hole(o), "{what}: seek_hole({o})");
        }
        for _ in 0..50 {
            let a = at[rng.below(at.len() as u64) as usize];
            let len = match rng.below(3) {
                0 => rng.below(16),
                1 => rng.below(m.size.max(1)),
                _ => u64::MAX / 4,
            };
            let r = ByteRange::new(a, len);
            let want: Vec<Segment> = m.slice(r).collect();
            assert_eq!(c.slice(r).collect::<Vec<_>>(), want, "{what}: slice {r}");
            assert_eq!(
                MapView::slice(&c, r).collect::<Vec<_>>(),
                want,
                "{what}: view {r}"
            );
        }
    }

    #[test]
    fn answers_as_the_image_map_does() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for round in 0..400 {
            let n = [0, 1, 2, 10, 100, 1000][round % 6];
            let chunks = [1, 3, 1000, 1 << 40][round % 4];
            // Lengths up to 2^40 give segments of 4 GiB and more.
            let max_len = [1, 4096, 1 << 20, 1 << 33, 1 << 40][(round / 4) % 5];
            let m = random_map(&mut rng, n, chunks, max_len);
            check(&m, &mut rng, &format!("round {round}"));
        }
    }

    #[test]
    fn overlays_answer_alike() {
        // Images as the catalog resolves them: a base with own maps laid
        // over it, some of other sizes (cutting the image and growing it).
        let mut rng = Rng(99);
        for round in 0..100 {
            let base = random_map(&mut rng, [0, 10, 300][round % 3], 40, 1 << 16);
            let mut tops = Vec::new();
            for _ in 0..round % 6 {
                let mut top = random_map(&mut rng, 30, 1000, 1 << 14);
                if rng.below(3) == 0 {
                    top.size = base.size / 2 + rng.below(base.size.max(1));
                    top.segments.retain(|s| s.range.end() <= top.size);
                }
                tops.push(top);
            }
            let image = tops.iter().fold(base.clone(), |m, t| m.overlay(t));
            let what = format!("round {round}");
            let direct = CompactMap::overlay_all(&base, &tops);
            assert_eq!(direct, CompactMap::from(&image), "{what}");
            // Its columns are no bigger than needed.
            assert_eq!(direct.starts.capacity(), direct.len(), "{what}");
            check(&image, &mut rng, &what);
        }
    }

    #[test]
    fn long_lengths_and_merges() {
        let z = |o, l| Segment::zero(ByteRange::new(o, l));
        let id = ChunkId([7; 32]);
        // Zero pieces that merge across the 4 GiB mark and back.
        let mut b = Builder::new(1 << 40, 1);
        b.push(z(0, u64::from(u32::MAX) - 1));
        b.push(z(u64::from(u32::MAX) - 1, 1));
        b.push(z(u64::from(u32::MAX), 5));
        b.push(Segment::data(ByteRange::new(1 << 33, 10), id, 0));
        b.push(Segment::data(ByteRange::new((1 << 33) + 10, 10), id, 10));
        b.push(z(1 << 34, 1 << 35));
        let c = b.finish();
        let want = ImageMap::new(
            1 << 40,
            vec![
                z(0, u64::from(u32::MAX) + 5),
                Segment::data(ByteRange::new(1 << 33, 20), id, 0),
                z(1 << 34, 1 << 35),
            ],
        );
        assert_eq!(c.to_image_map(), want);
        assert_eq!(c.long.len(), 2);
        assert_eq!(c.data_bytes(), 20);
        assert_eq!(c.chunk_table(), &[id]);
        assert_eq!(c.chunk_index(1), Some(0));
        assert_eq!(c.chunk_index(0), None);
        assert_eq!(c.first_after(u64::from(u32::MAX) + 4), 0);
        assert_eq!(c.first_after(u64::from(u32::MAX) + 5), 1);
        assert_eq!(c.seek_hole(1 << 33), (1 << 33) + 20);
        // 20 bytes a segment and 32 a chunk, however many pieces use it.
        assert!(c.heap_bytes() <= 3 * 20 + 32 + 2 * 16);
    }

    #[test]
    fn empty_map() {
        let m = ImageMap::new(0, vec![]);
        let c = CompactMap::from(&m);
        assert!(c.is_empty());
        assert_eq!(c.seek_data(0), None);
        assert_eq!(c.seek_hole(0), 0);
        assert_eq!(c.slice(ByteRange::new(0, 10)).count(), 0);
        assert_eq!(c.encode(), m.encode());
    }
}
