//! Chunking `strata receive`'s writes while they arrive.
//!
//! `blockdev-backup` copies every cluster once, roughly in order. Every
//! write is in the staging file before it is acknowledged (durability, see
//! `store::partial`), written there with O_DIRECT where it can be, so that
//! the push does not fill the page cache: on a VM every fresh page-cache
//! page is a costly allocation. A copy of each write is also gathered in
//! memory per chunk cell; once the written map covers a whole cell, a
//! worker chunks it from memory, so the commit after the job only handles
//! the rest, reading it from the staging file. A cell leaves that path,
//! with nothing to write since the staging file has it all, when newer
//! cells need its buffer, when it already held data from before its buffer
//! (an earlier connection, or an evicted buffer), and when it is changed
//! again after being sent (what the worker made of it is then dropped).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Scope;

use crate::error::{Error, Result};
use crate::ingest::backup::{chunk_workers, store_window, Prechunked};
use crate::model::extent::{ByteRange, Extent, ExtentKind};
use crate::model::image_map::Segment;
use crate::model::written::Written;
use crate::store::repo::Repository;

/// Cells held in memory at most, waiting for the rest of their writes.
const MAX_PENDING: usize = 64;

#[derive(Default)]
struct Done {
    captured: HashMap<u64, Vec<Segment>>,
    /// Cells chunked, including those changed again meanwhile.
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

/// What a change brought: bytes, or zeroes.
pub enum Change<'d> {
    Data(&'d [u8]),
    Zero,
}

pub struct Cells {
    cell: u64,
    size: u64,
    /// Cells being gathered in memory: what was written of them, at their
    /// offsets (the parts not yet written hold anything).
    pending: HashMap<u64, Vec<u8>>,
    /// Pending cells, oldest first: the first to give up their buffer.
    age: VecDeque<u64>,
    /// Sent to a worker (chunked or being chunked), unchanged since.
    streamed: BTreeSet<u64>,
    /// Left to the commit, which reads them from the staging file.
    unsent: BTreeSet<u64>,
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

impl Cells {
    /// Start the chunking workers in `scope`.
    pub fn start<'s, 'a: 's>(scope: &'s Scope<'s, 'a>, repo: &'a Repository, size: u64) -> Self {
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
            cell: repo.config().chunk_size,
            size,
            pending: HashMap::new(),
            age: VecDeque::new(),
            streamed: BTreeSet::new(),
            unsent: BTreeSet::new(),
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

    /// `range` was written or zeroed (`written` and the staging file already
    /// hold it): gather it, and send the cells it completes to the workers.
    pub fn changed(&mut self, range: ByteRange, change: Change, written: &Written) -> Result<()> {
        for piece in range.split_aligned(self.cell) {
            let cell = piece.offset / self.cell;
            if self.streamed.remove(&cell) || self.unsent.contains(&cell) {
                self.unsent.insert(cell);
                continue;
            }
            let whole = self.range_of(cell);
            if !self.pending.contains_key(&cell) && !self.open(cell, whole, piece, written)? {
                self.unsent.insert(cell);
                continue;
            }
            let buf = self.pending.get_mut(&cell).expect("opened");
            let at = (piece.offset - whole.offset) as usize..(piece.end() - whole.offset) as usize;
            match change {
                Change::Data(data) => buf[at].copy_from_slice(
                    &data[(piece.offset - range.offset) as usize
                        ..(piece.end() - range.offset) as usize],
                ),
                Change::Zero => buf[at].fill(0),
            }
            let covered: u64 = written.within(whole).iter().map(|(r, _)| r.length).sum();
            if covered == whole.length {
                self.send(cell, whole)?;
            }
        }
        Ok(())
    }

    /// A buffer for `cell`, first touched by `piece`; false if the cell
    /// already holds data that is only in the staging file.
    fn open(
        &mut self,
        cell: u64,
        whole: ByteRange,
        piece: ByteRange,
        written: &Written,
    ) -> Result<bool> {
        let before = written.within(whole);
        let staged_only = before
            .iter()
            .any(|(r, k)| *k == ExtentKind::Data && !piece.contains(r));
        if staged_only {
            return Ok(false);
        }
        let mut buf = self.buffer()?;
        for (r, k) in before {
            if k == ExtentKind::Zero {
                buf[(r.offset - whole.offset) as usize..(r.end() - whole.offset) as usize].fill(0);
            }
        }
        self.pending.insert(cell, buf);
        self.age.push_back(cell);
        Ok(true)
    }

    /// A cell-sized buffer: a returned one, a new one, or the oldest
    /// pending cell's, which is then left to the commit.
    fn buffer(&mut self) -> Result<Vec<u8>> {
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
        while let Some(oldest) = self.age.pop_front() {
            if let Some(buf) = self.pending.remove(&oldest) {
                self.unsent.insert(oldest);
                return Ok(buf);
            }
        }
        // Every buffer is with the workers: wait for one.
        self.free_rx.recv().map_err(|_| self.worker_gone())
    }

    fn send(&mut self, cell: u64, whole: ByteRange) -> Result<()> {
        let buf = self.pending.remove(&cell).expect("pending");
        self.age.retain(|c| *c != cell);
        self.streamed.insert(cell);
        self.sent += 1;
        let tx = self.work_tx.as_ref().expect("workers run until finish");
        tx.send((cell, whole, buf)).map_err(|_| self.worker_gone())
    }

    fn worker_gone(&self) -> Error {
        self.shared
            .lock()
            .error
            .take()
            .unwrap_or_else(|| Error::Nbd("a chunking worker stopped".into()))
    }

    /// After the last write: wait for the workers and hand over what they
    /// chunked of the cells nobody changed since.
    pub fn finish(&mut self) -> Result<Prechunked> {
        // Cells still gathering are read from the staging file by the commit.
        self.pending.clear();
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

impl Drop for Cells {
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
    fn remaining_leaves_out_streamed_cells() {
        let (tx, _rx) = sync_channel(1);
        let (_free_tx, free_rx) = channel();
        let mut c = Cells {
            cell: 100,
            size: 450,
            pending: HashMap::new(),
            age: VecDeque::new(),
            streamed: BTreeSet::new(),
            unsent: BTreeSet::new(),
            buffers: 0,
            spare: Vec::new(),
            free_rx,
            sent: 0,
            work_tx: Some(tx),
            shared: Arc::new(Shared::default()),
        };
        c.streamed.extend([1, 4]);
        let e = |o, l, k| Extent::new(ByteRange::new(o, l), k);
        let got = c.remaining(vec![
            e(50, 200, ExtentKind::Data),
            e(400, 50, ExtentKind::Zero),
        ]);
        assert_eq!(
            got,
            vec![e(50, 50, ExtentKind::Data), e(200, 50, ExtentKind::Data)]
        );
    }
}
