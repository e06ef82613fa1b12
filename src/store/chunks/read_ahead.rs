//! Chunks fetched ahead of their reader. A sequential reader of a pack
//! (restore, a mount's read-ahead, copy, verify) fetches a window of
//! several consecutive chunks in one ranged request; the chunks it did not
//! ask for wait here for the readers that will. A chunk is handed out once.
//! While one thread fetches a window, others asking for a chunk in it wait
//! for that request instead of making their own. The bytes kept are
//! bounded: past the budget the oldest windows' chunks are dropped (and
//! fetched again if asked for), and a window on its way counts from the
//! moment it is claimed: past the budget, a new window waits for those in
//! flight. Chunks are pieces of their window's one buffer, not copies; a
//! buffer counts against the budget whole while any of its pieces waits
//! here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::{Deref, Range};
use std::sync::{Arc, Condvar, Mutex};

use crate::model::chunk_id::ChunkId;

/// A chunk's stored bytes: part of a buffer fetched for several chunks,
/// or all of one.
#[derive(Clone, Debug)]
pub struct Piece {
    buf: Arc<Vec<u8>>,
    range: Range<usize>,
}

impl Piece {
    pub fn whole(bytes: Vec<u8>) -> Piece {
        let range = 0..bytes.len();
        Piece {
            buf: Arc::new(bytes),
            range,
        }
    }

    /// `range` of `buf`, which must lie within it.
    pub fn of(buf: &Arc<Vec<u8>>, range: Range<usize>) -> Piece {
        assert!(range.end <= buf.len(), "a piece lies within its buffer");
        Piece {
            buf: buf.clone(),
            range,
        }
    }

    /// Which buffer this is a piece of.
    fn buffer(&self) -> usize {
        Arc::as_ptr(&self.buf) as usize
    }

    /// The bytes as a vector of their own: moved if this piece is all of
    /// a buffer nobody else holds, else copied.
    pub fn into_vec(self) -> Vec<u8> {
        if self.range.start == 0 && self.range.end == self.buf.len() {
            match Arc::try_unwrap(self.buf) {
                Ok(v) => return v,
                Err(buf) => return buf[self.range].to_vec(),
            }
        }
        self.buf[self.range].to_vec()
    }
}

/// Pieces are equal when their bytes are, wherever they lie.
impl PartialEq for Piece {
    fn eq(&self, other: &Piece) -> bool {
        **self == **other
    }
}

impl Deref for Piece {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

pub struct ReadAhead {
    state: Mutex<State>,
    arrived: Condvar,
    budget: usize,
}

#[derive(Default)]
struct State {
    ready: HashMap<ChunkId, Piece>,
    /// Ready chunks, oldest first (some may have been taken since).
    order: VecDeque<ChunkId>,
    /// Buffers with pieces ready, by buffer.
    held: HashMap<usize, Held>,
    /// Bytes of those buffers.
    bytes: usize,
    /// Chunks of windows being fetched.
    loading: HashSet<ChunkId>,
    /// Windows being fetched (their bytes count in `bytes`).
    fetching: usize,
    /// Chunks handed to readers lately, oldest first, and as a set.
    served: VecDeque<ChunkId>,
    served_set: HashSet<ChunkId>,
}

/// Chunks remembered as served: a window reaches back only for chunks not
/// among them (16 GiB of 1 MiB chunks).
const SERVED_REMEMBERED: usize = 16 << 10;

/// A buffer's pieces that wait here.
#[derive(Default)]
struct Held {
    pieces: usize,
    /// Their bytes, of the buffer's `len`.
    bytes: usize,
    len: usize,
}

/// The chunks a window brings (the first `chunks` of those asked for) and
/// the bytes kept for it in the budget until it is filled. Dropped unfilled
/// (the fetch failed, or panicked), it brings nothing: readers waiting for
/// its chunks fetch them themselves instead of waiting forever.
pub struct Claim<'a> {
    ahead: &'a ReadAhead,
    ids: &'a [ChunkId],
    pub chunks: usize,
    bytes: usize,
    open: bool,
}

impl Claim<'_> {
    /// Hand over what the window brought (chunks missing from `got` are
    /// simply not there: their readers fetch them themselves).
    pub fn fill(mut self, got: Vec<(ChunkId, Piece)>) {
        self.open = false;
        self.ahead.end(self.ids, self.chunks, self.bytes, got);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.open {
            self.ahead
                .end(self.ids, self.chunks, self.bytes, Vec::new());
        }
    }
}

impl State {
    fn insert(&mut self, id: ChunkId, piece: Piece) {
        self.hold(&piece);
        if let Some(old) = self.ready.insert(id, piece) {
            self.release(&old);
        }
        self.order.push_back(id);
    }

    fn hold(&mut self, piece: &Piece) {
        let held = self.held.entry(piece.buffer()).or_default();
        if held.pieces == 0 {
            held.len = piece.buf.len();
            self.bytes += held.len;
        }
        held.pieces += 1;
        held.bytes += piece.len();
    }

    /// Copy the pieces that wait of buffers mostly read out of them, so
    /// that those buffers go. A window's chunks are not
    /// all read soon: the chunks of an incremental's pack lie all over
    /// the image, and its buffer would hold the budget until the reader
    /// is past the last of them.
    fn compact(&mut self) {
        let sparse: HashSet<usize> = (self.held.iter())
            .filter(|(_, h)| h.bytes * 2 <= h.len)
            .map(|(buf, _)| *buf)
            .collect();
        if sparse.is_empty() {
            return;
        }
        let ids: Vec<ChunkId> = (self.ready.iter())
            .filter(|(_, p)| sparse.contains(&p.buffer()))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(old) = self.ready.remove(&id) {
                let own = Piece::whole(old.to_vec());
                self.release(&old);
                self.hold(&own);
                self.ready.insert(id, own);
            }
        }
    }

    /// Bring the bytes held down to `budget` less `room`: sparse buffers
    /// copied out first, then the oldest chunks dropped.
    fn make_room(&mut self, budget: usize, room: usize) {
        if self.bytes + room > budget {
            self.compact();
        }
        while self.bytes + room > budget && self.drop_oldest() {}
    }

    /// Drop the oldest ready chunk; false when none is left.
    fn drop_oldest(&mut self) -> bool {
        while let Some(old) = self.order.pop_front() {
            if self.remove(&old).is_some() {
                return true;
            }
        }
        false
    }

    fn remove(&mut self, id: &ChunkId) -> Option<Piece> {
        let piece = self.ready.remove(id)?;
        self.release(&piece);
        Some(piece)
    }

    fn release(&mut self, piece: &Piece) {
        if let Some(held) = self.held.get_mut(&piece.buffer()) {
            held.pieces -= 1;
            held.bytes -= piece.len();
            if held.pieces == 0 {
                self.held.remove(&piece.buffer());
                self.bytes -= piece.buf.len();
            }
        }
    }
}

impl ReadAhead {
    pub fn new(budget: usize) -> Self {
        ReadAhead {
            state: Mutex::new(State::default()),
            arrived: Condvar::new(),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The chunk's stored bytes if a window brought them, waiting while a
    /// window that has it is on its way; `None` when no window has it.
    pub fn take(&self, id: &ChunkId) -> Option<Piece> {
        let mut st = self.lock();
        loop {
            if let Some(piece) = st.remove(id) {
                return Some(piece);
            }
            if !st.loading.contains(id) {
                return None;
            }
            st = self.arrived.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Note that a reader has `id` (however it came): a window does not
    /// reach back for it.
    pub fn served(&self, id: &ChunkId) {
        let mut st = self.lock();
        if st.served_set.insert(*id) {
            st.served.push_back(*id);
            if st.served.len() > SERVED_REMEMBERED {
                if let Some(old) = st.served.pop_front() {
                    st.served_set.remove(&old);
                }
            }
        }
    }

    /// For each of `ids`: whether it was served lately, is ready or is on
    /// its way.
    pub fn settled(&self, ids: &[ChunkId]) -> Vec<bool> {
        let st = self.lock();
        ids.iter()
            .map(|id| {
                st.served_set.contains(id) || st.ready.contains_key(id) || st.loading.contains(id)
            })
            .collect()
    }

    /// Claim the chunks a window will bring: the longest prefix of `ids`
    /// that nobody holds or fetches, and room in the budget for the
    /// `span(n)` bytes that bring the first `n` of them (see
    /// `make_room`, else waiting for windows on their way). 0
    /// chunks means the first is on its way or ready already:
    /// [`take`](Self::take) it.
    pub fn claim<'a>(&'a self, ids: &'a [ChunkId], span: impl Fn(usize) -> usize) -> Claim<'a> {
        let mut st = self.lock();
        let (chunks, bytes) = loop {
            let n = ids
                .iter()
                .take_while(|id| !st.loading.contains(id) && !st.ready.contains_key(id))
                .count();
            if n == 0 {
                break (0, 0);
            }
            let bytes = span(n);
            st.make_room(self.budget, bytes);
            if st.bytes + bytes <= self.budget || st.fetching == 0 {
                st.loading.extend(&ids[..n]);
                st.bytes += bytes;
                st.fetching += 1;
                break (n, bytes);
            }
            st = self.arrived.wait(st).unwrap_or_else(|e| e.into_inner());
        };
        Claim {
            ahead: self,
            ids,
            chunks,
            bytes,
            open: true,
        }
    }

    /// End a claim on the first `chunks` of `ids`, with what it brought.
    fn end(&self, ids: &[ChunkId], chunks: usize, bytes: usize, got: Vec<(ChunkId, Piece)>) {
        let mut st = self.lock();
        for id in &ids[..chunks] {
            st.loading.remove(id);
        }
        if chunks > 0 {
            st.bytes -= bytes;
            st.fetching -= 1;
        }
        for (id, piece) in got {
            st.insert(id, piece);
        }
        st.make_room(self.budget, 0);
        if st.order.len() > 4 * st.ready.len() + 64 {
            // Taken chunks leave their names behind: drop them now and then.
            let State { order, ready, .. } = &mut *st;
            order.retain(|id| ready.contains_key(id));
        }
        drop(st);
        self.arrived.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn piece(bytes: Vec<u8>) -> Piece {
        Piece::whole(bytes)
    }

    /// Claim `ids` at 10 bytes a chunk; the chunks claimed.
    fn claim<'a>(ra: &'a ReadAhead, ids: &'a [ChunkId]) -> Claim<'a> {
        ra.claim(ids, |n| 10 * n)
    }

    #[test]
    fn a_window_serves_its_chunks_once() {
        let ra = ReadAhead::new(1 << 20);
        let ids = [id(1), id(2), id(3)];
        let c = claim(&ra, &ids);
        assert_eq!(c.chunks, 3);
        // Being fetched: nobody else claims them.
        assert_eq!(claim(&ra, &[id(2)]).chunks, 0);
        c.fill(vec![(id(2), piece(vec![2])), (id(3), piece(vec![3]))]);
        assert_eq!(ra.take(&id(2)).as_deref(), Some(&[2u8][..]));
        assert_eq!(ra.take(&id(2)), None);
        assert_eq!(ra.take(&id(1)), None);
        // Ready already: not claimed again.
        assert_eq!(claim(&ra, &[id(3), id(4)]).chunks, 0);
        assert_eq!(claim(&ra, &[id(4), id(3)]).chunks, 1);
    }

    #[test]
    fn readers_wait_for_a_window_on_its_way() {
        let ra = ReadAhead::new(1 << 20);
        let ids = [id(1), id(2)];
        let c = claim(&ra, &ids);
        assert_eq!(c.chunks, 2);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| ra.take(&id(2)));
            // The waiter either waits or, if it runs after the fill, finds
            // the chunk ready: both end with the chunk.
            c.fill(vec![(id(2), piece(vec![7; 10]))]);
            assert_eq!(waiter.join().unwrap().as_deref(), Some(&[7u8; 10][..]));
        });
    }

    #[test]
    fn a_fetch_that_panics_leaves_nobody_waiting() {
        let ra = ReadAhead::new(1 << 20);
        let ids = [id(1), id(2)];
        std::thread::scope(|s| {
            let fetcher = s.spawn(|| {
                let c = claim(&ra, &ids);
                assert_eq!(c.chunks, 2);
                panic!("the request failed in a way nobody handled");
            });
            assert!(fetcher.join().is_err());
        });
        // Not on its way any more: the reader fetches it itself.
        assert_eq!(ra.take(&id(2)), None);
        let st = ra.lock();
        assert_eq!((st.bytes, st.fetching), (0, 0));
        drop(st);
        assert_eq!(claim(&ra, &ids).chunks, 2);
    }

    #[test]
    fn the_budget_drops_the_oldest() {
        let ra = ReadAhead::new(25);
        for n in 0..5u8 {
            let one = [id(n)];
            let c = claim(&ra, &one);
            assert_eq!(c.chunks, 1);
            c.fill(vec![(id(n), piece(vec![n; 10]))]);
        }
        assert_eq!(ra.take(&id(0)), None);
        assert_eq!(ra.take(&id(2)), None);
        assert_eq!(ra.take(&id(3)).as_deref(), Some(&[3u8; 10][..]));
        assert_eq!(ra.take(&id(4)).as_deref(), Some(&[4u8; 10][..]));
        assert_eq!(ra.lock().bytes, 0);
    }

    #[test]
    fn windows_on_their_way_count_against_the_budget() {
        let ra = ReadAhead::new(25);
        let (two, three) = ([id(1), id(2)], [id(3)]);
        let first = claim(&ra, &two);
        assert_eq!((first.chunks, ra.lock().bytes), (2, 20));
        std::thread::scope(|s| {
            // 20 + 10 > 25: the second window waits for the first.
            let second = s.spawn(|| claim(&ra, &three));
            first.fill(vec![(id(2), piece(vec![2; 10]))]);
            let second = second.join().unwrap();
            assert_eq!(second.chunks, 1);
            assert!(ra.lock().bytes <= 25, "{}", ra.lock().bytes);
            second.fill(vec![(id(3), piece(vec![3; 10]))]);
        });
        assert_eq!(ra.take(&id(3)).as_deref(), Some(&[3u8; 10][..]));
        // Alone in flight, a window larger than the budget still goes.
        assert_eq!(claim(&ra, &[id(4), id(5), id(6)]).chunks, 3);
    }

    #[test]
    fn buffers_mostly_read_are_copied_out_before_chunks_are_dropped() {
        let buf = Arc::new(vec![5u8; 100]);
        let ra = ReadAhead::new(120);
        let ids: Vec<ChunkId> = (0..10).map(id).collect();
        let c = ra.claim(&ids, |_| 100);
        let pieces = (ids.iter().enumerate())
            .map(|(i, id)| (*id, Piece::of(&buf, i * 10..i * 10 + 10)))
            .collect();
        c.fill(pieces);
        for id in &ids[..6] {
            assert!(ra.take(id).is_some());
        }
        // 40 of its 100 bytes wait: a new window of 50 makes it go.
        let more = [id(20)];
        let c = ra.claim(&more, |_| 50);
        assert_eq!(c.chunks, 1);
        assert_eq!(Arc::strong_count(&buf), 1, "the buffer is free");
        assert_eq!(ra.lock().bytes, 40 + 50);
        c.fill(vec![(id(20), piece(vec![1; 50]))]);
        for id in &ids[6..] {
            assert_eq!(ra.take(id).unwrap().into_vec(), vec![5u8; 10]);
        }
    }

    #[test]
    fn pieces_share_their_buffer() {
        let buf = Arc::new((0..30u8).collect::<Vec<u8>>());
        let ra = ReadAhead::new(40);
        let ids = [id(1), id(2), id(3)];
        let c = ra.claim(&ids, |_| 30);
        assert_eq!(c.chunks, 3);
        c.fill(vec![
            (id(2), Piece::of(&buf, 10..20)),
            (id(3), Piece::of(&buf, 20..30)),
        ]);
        // The buffer counts whole while a piece of it waits.
        assert_eq!(ra.lock().bytes, 30);
        let two = ra.take(&id(2)).unwrap();
        assert_eq!(ra.lock().bytes, 30);
        assert_eq!(&*two, &buf[10..20]);
        assert_eq!(Arc::strong_count(&buf), 3);
        assert_eq!(two.into_vec(), (10..20u8).collect::<Vec<u8>>());
        assert_eq!(
            ra.take(&id(3)).unwrap().into_vec(),
            (20..30u8).collect::<Vec<u8>>()
        );
        assert_eq!((ra.lock().bytes, Arc::strong_count(&buf)), (0, 1));
        // All of an unshared buffer is moved out, not copied.
        let whole = Piece::whole(vec![7; 8]);
        let at = whole.as_ptr();
        let moved = whole.into_vec();
        assert_eq!(moved.as_ptr(), at);
    }
}
