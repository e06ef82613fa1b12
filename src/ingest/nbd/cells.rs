//! Chunking `strata receive`'s writes while they arrive.
//!
//! `blockdev-backup` copies every cluster once, roughly in order. Writes are
//! gathered in memory per chunk cell (the backup grid); once a cell is
//! entirely written it goes to a worker that chunks it straight from memory,
//! so most data never passes through the staging file: on a VM every fresh
//! page-cache page is a costly allocation, and the commit would read it all
//! back. A cell leaves memory for the staging file, which stays the source
//! of truth for it, when it is not completed while newer cells arrive, when
//! it is written again after being chunked, and when a client reads it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Scope;

use super::server::Written;
use crate::error::{Error, IoContext, Result};
use crate::ingest::backup::{chunk_workers, store_window, Prechunked};
use crate::model::extent::{ByteRange, Extent, ExtentKind};
use crate::model::image_map::{Piece, Segment};
use crate::store::repo::Repository;

/// Cells held in memory at most, waiting for the rest of their writes.
const MAX_PENDING: usize = 64;

struct Pending {
    buf: Vec<u8>,
    /// Written parts, relative to the cell, disjoint and sorted.
    covered: BTreeMap<u64, u64>,
}

impl Pending {
    fn cover(&mut self, r: ByteRange) {
        let (mut start, mut end) = (r.offset, r.end());
        let touching: Vec<(u64, u64)> = self
            .covered
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.covered.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.covered.insert(start, end);
    }

    fn is_complete(&self, len: u64) -> bool {
        self.covered.get(&0) == Some(&len)
    }
}

#[derive(Default)]
struct Done {
    captured: HashMap<u64, Vec<Segment>>,
    /// Cells chunked, including those taken back by `materialize`.
    chunked: usize,
    stored: u64,
    error: Option<Error>,
}

#[derive(Default)]
struct Shared {
    done: Mutex<Done>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Done> {
        self.done.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Cells<'a> {
    repo: &'a Repository,
    cell: u64,
    size: u64,
    pending: BTreeMap<u64, Pending>,
    /// Pending cells, oldest first: the first to go to the staging file.
    age: VecDeque<u64>,
    /// Sent to a worker (chunked or being chunked).
    streamed: BTreeSet<u64>,
    /// Their data is in the staging file.
    staged: BTreeSet<u64>,
    /// Cell buffers allocated; they cycle through `spare`, the pending
    /// cells, the workers and `free_rx`, never freed, since a fresh buffer
    /// costs page faults.
    buffers: usize,
    spare: Vec<Vec<u8>>,
    free_rx: Receiver<Vec<u8>>,
    /// Cells sent to the workers.
    sent: usize,
    work_tx: Option<SyncSender<(u64, ByteRange, Vec<u8>)>>,
    shared: Arc<Shared>,
}

impl<'a> Cells<'a> {
    /// Start the chunking workers in `scope`.
    pub fn start<'s>(scope: &'s Scope<'s, 'a>, repo: &'a Repository, size: u64) -> Self {
        let workers = chunk_workers();
        let (work_tx, work_rx) = sync_channel(workers * 2);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (free_tx, free_rx) = channel();
        let shared = Arc::new(Shared::default());
        for _ in 0..workers {
            let (rx, free_tx, shared) = (work_rx.clone(), free_tx.clone(), shared.clone());
            scope.spawn(move || chunk_cells(repo, &rx, &free_tx, &shared));
        }
        Cells {
            repo,
            cell: repo.config().chunk_size,
            size,
            pending: BTreeMap::new(),
            age: VecDeque::new(),
            streamed: BTreeSet::new(),
            staged: BTreeSet::new(),
            buffers: 0,
            spare: Vec::new(),
            free_rx,
            sent: 0,
            work_tx: Some(work_tx),
            shared,
        }
    }

    fn range_of(&self, cell: u64) -> ByteRange {
        let start = cell * self.cell;
        ByteRange::from_bounds(start, (start + self.cell).min(self.size))
    }

    /// Store a WRITE; `written` already records it.
    pub fn write(
        &mut self,
        staging: &File,
        written: &Written,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let range = ByteRange::new(offset, data.len() as u64);
        for piece in range.split_aligned(self.cell) {
            let bytes = &data[(piece.offset - offset) as usize..(piece.end() - offset) as usize];
            let cell = piece.offset / self.cell;
            if self.streamed.contains(&cell) {
                self.materialize(staging, cell)?;
            }
            if self.staged.contains(&cell) {
                staging
                    .write_all_at(bytes, piece.offset)
                    .ctx(|| format!("write staging at {}", piece.offset))?;
                continue;
            }
            if !self.pending.contains_key(&cell) {
                self.open(staging, written, cell)?;
            }
            let base = cell * self.cell;
            let p = self.pending.get_mut(&cell).expect("just opened");
            let at = (piece.offset - base) as usize;
            p.buf[at..at + bytes.len()].copy_from_slice(bytes);
            p.cover(ByteRange::new(piece.offset - base, piece.length));
            self.send_if_complete(cell)?;
        }
        Ok(())
    }

    /// Store a WRITE_ZEROES or TRIM; `written` already records it.
    pub fn zero(&mut self, staging: &File, range: ByteRange) -> Result<()> {
        for cell in self.unchunk(staging, range)? {
            let Some(r) = self.range_of(cell).intersect(&range) else {
                continue;
            };
            let base = cell * self.cell;
            let p = self.pending.get_mut(&cell).expect("listed");
            p.buf[(r.offset - base) as usize..(r.end() - base) as usize].fill(0);
            p.cover(ByteRange::new(r.offset - base, r.length));
            self.send_if_complete(cell)?;
        }
        Ok(())
    }

    /// Put the cells `range` touches in the staging file, so that a READ can
    /// be answered from there.
    pub fn stage(&mut self, staging: &File, range: ByteRange) -> Result<()> {
        for cell in self.unchunk(staging, range)? {
            self.spill(staging, cell)?;
        }
        Ok(())
    }

    /// Put the chunked cells `range` touches back into the staging file;
    /// return the pending cells it touches.
    fn unchunk(&mut self, staging: &File, range: ByteRange) -> Result<Vec<u64>> {
        let cells = range.offset / self.cell..range.end().div_ceil(self.cell);
        let streamed: Vec<u64> = self.streamed.range(cells.clone()).copied().collect();
        for cell in streamed {
            self.materialize(staging, cell)?;
        }
        Ok(self.pending.range(cells).map(|(c, _)| *c).collect())
    }

    /// A new pending cell; what earlier zeroed in it counts as written.
    fn open(&mut self, staging: &File, written: &Written, cell: u64) -> Result<()> {
        let buf = self.buffer(staging)?;
        let range = self.range_of(cell);
        let mut p = Pending {
            buf,
            covered: BTreeMap::new(),
        };
        for (r, kind) in written.within(range) {
            // Data here would mean the cell is staged; only zeroes are left.
            if kind == ExtentKind::Zero {
                let rel = ByteRange::new(r.offset - range.offset, r.length);
                p.buf[rel.offset as usize..rel.end() as usize].fill(0);
                p.cover(rel);
            }
        }
        self.pending.insert(cell, p);
        self.age.push_back(cell);
        Ok(())
    }

    /// A cell-sized buffer: a returned one, a new one, or the oldest pending
    /// cell's after moving it to the staging file.
    fn buffer(&mut self, staging: &File) -> Result<Vec<u8>> {
        if let Some(buf) = self.spare.pop() {
            return Ok(buf);
        }
        if let Ok(buf) = self.free_rx.try_recv() {
            return Ok(buf);
        }
        if self.buffers < MAX_PENDING {
            self.buffers += 1;
            return Ok(vec![0u8; self.cell as usize]);
        }
        if let Some(&oldest) = self.age.front() {
            self.spill(staging, oldest)?;
            return Ok(self.spare.pop().expect("spill returns the buffer"));
        }
        // Every buffer is with the workers: wait for one.
        self.free_rx.recv().map_err(|_| self.worker_gone())
    }

    fn worker_gone(&self) -> Error {
        self.shared
            .lock()
            .error
            .take()
            .unwrap_or_else(|| Error::Nbd("a chunking worker stopped".into()))
    }

    fn send_if_complete(&mut self, cell: u64) -> Result<()> {
        let range = self.range_of(cell);
        if !self.pending[&cell].is_complete(range.length) {
            return Ok(());
        }
        let p = self.pending.remove(&cell).expect("checked");
        self.age.retain(|c| *c != cell);
        self.streamed.insert(cell);
        self.sent += 1;
        let tx = self.work_tx.as_ref().expect("workers run until finish");
        tx.send((cell, range, p.buf))
            .map_err(|_| self.worker_gone())
    }

    /// Move a pending cell's written parts to the staging file.
    fn spill(&mut self, staging: &File, cell: u64) -> Result<()> {
        let Some(p) = self.pending.remove(&cell) else {
            return Ok(());
        };
        self.age.retain(|c| *c != cell);
        let base = cell * self.cell;
        for (s, e) in &p.covered {
            staging
                .write_all_at(&p.buf[*s as usize..*e as usize], base + s)
                .ctx(|| format!("write staging at {}", base + s))?;
        }
        self.staged.insert(cell);
        self.spare.push(p.buf);
        Ok(())
    }

    /// Put a chunked cell back into the staging file, to be written again.
    fn materialize(&mut self, staging: &File, cell: u64) -> Result<()> {
        let segments = {
            let mut done = self.shared.lock();
            loop {
                if let Some(e) = done.error.take() {
                    return Err(e);
                }
                if let Some(s) = done.captured.remove(&cell) {
                    break s;
                }
                done = self
                    .shared
                    .changed
                    .wait(done)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        let mut data = Vec::new();
        for seg in segments {
            if let Piece::Data { chunk, skip } = seg.piece {
                self.repo.chunks().get_into(&chunk, &mut data)?;
                let bytes = data
                    .get(skip as usize..skip as usize + seg.range.length as usize)
                    .ok_or_else(|| Error::Nbd("a chunk shorter than its segment".into()))?;
                staging
                    .write_all_at(bytes, seg.range.offset)
                    .ctx(|| format!("write staging at {}", seg.range.offset))?;
            }
        }
        self.streamed.remove(&cell);
        self.staged.insert(cell);
        Ok(())
    }

    /// After the last write: move unfinished cells to the staging file,
    /// wait for the workers, and hand over what they chunked.
    pub fn finish(&mut self, staging: &File) -> Result<Prechunked> {
        let pending: Vec<u64> = self.pending.keys().copied().collect();
        for cell in pending {
            self.spill(staging, cell)?;
        }
        self.work_tx = None;
        let mut done = self.shared.lock();
        while done.error.is_none() && done.chunked < self.sent {
            done = self
                .shared
                .changed
                .wait(done)
                .unwrap_or_else(|e| e.into_inner());
        }
        if let Some(e) = done.error.take() {
            return Err(e);
        }
        let mut segments = Vec::new();
        for cell in &self.streamed {
            segments.extend(done.captured.remove(cell).expect("waited for"));
        }
        Ok(Prechunked {
            segments,
            stored_bytes: done.stored,
        })
    }

    /// `extents` without the cells chunked here.
    pub fn remaining(&self, extents: Vec<Extent>) -> Vec<Extent> {
        let mut out = Vec::new();
        for e in extents {
            let mut pos = e.offset;
            let end = e.offset + e.length;
            let cells = pos / self.cell..end.div_ceil(self.cell);
            for cell in self.streamed.range(cells) {
                let r = self.range_of(*cell);
                if r.offset > pos {
                    out.push(Extent::new(ByteRange::from_bounds(pos, r.offset), e.kind));
                }
                pos = pos.max(r.end());
            }
            if pos < end {
                out.push(Extent::new(ByteRange::from_bounds(pos, end), e.kind));
            }
        }
        out
    }
}

impl Drop for Cells<'_> {
    fn drop(&mut self) {
        // Workers end when the channel closes, also on an early return.
        self.work_tx = None;
    }
}

/// A worker: chunk complete cells until the channel closes.
fn chunk_cells(
    repo: &Repository,
    rx: &Mutex<Receiver<(u64, ByteRange, Vec<u8>)>>,
    free_tx: &Sender<Vec<u8>>,
    shared: &Shared,
) {
    loop {
        let item = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((cell, range, buf)) = item else { return };
        let result = store_window(repo, range, &buf[..range.length as usize]);
        let _ = free_tx.send(buf);
        let mut done = shared.lock();
        match result {
            Ok((segments, stored)) => {
                done.captured.insert(cell, segments);
                done.chunked += 1;
                done.stored += stored;
            }
            Err(e) => {
                done.error.get_or_insert(e);
            }
        }
        drop(done);
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_touching_and_overlapping_pieces() {
        let mut p = Pending {
            buf: Vec::new(),
            covered: BTreeMap::new(),
        };
        for (offset, length) in [(300, 100), (0, 100), (100, 50), (350, 100), (150, 149)] {
            p.cover(ByteRange::new(offset, length));
        }
        assert_eq!(p.covered.len(), 2, "{:?}", p.covered);
        assert!(!p.is_complete(450));
        p.cover(ByteRange::new(299, 1));
        assert!(p.is_complete(450));
        assert!(!p.is_complete(451));
    }
}
