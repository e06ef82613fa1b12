//! Chunking `strata receive`'s writes while they arrive.
//!
//! `blockdev-backup` copies every cluster once, roughly in order. Every
//! write is in the staging file before it is acknowledged (durability, see
//! `store::partial`); once the written map covers a whole chunk cell, a
//! worker reads the cell back from the staging file (the page cache, just
//! written) and chunks it, so the commit after the job only handles cells
//! written in part. A cell changed again after it was sent is left to the
//! commit, which reads it from the staging file like any other; what the
//! worker made of it is dropped.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Scope;

use crate::error::{Error, IoContext, Result};
use crate::ingest::backup::{chunk_workers, store_window, Prechunked};
use crate::model::extent::{ByteRange, Extent, ExtentKind};
use crate::model::image_map::Segment;
use crate::model::written::Written;
use crate::store::repo::Repository;

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

/// A complete cell for a worker: where it is, and which parts of it are
/// zero writes (the staging file may hold older data there).
struct Job {
    cell: u64,
    range: ByteRange,
    zeros: Vec<ByteRange>,
    staging: Arc<File>,
}

pub struct Cells {
    cell: u64,
    size: u64,
    /// Sent to a worker (chunked or being chunked), unchanged since.
    streamed: BTreeSet<u64>,
    /// Changed after being sent: the commit reads them from the staging file.
    unsent: BTreeSet<u64>,
    /// Cells sent to the workers.
    sent: usize,
    work_tx: Option<SyncSender<Job>>,
    shared: Arc<Shared>,
}

impl Cells {
    /// Start the chunking workers in `scope`.
    pub fn start<'s, 'a: 's>(scope: &'s Scope<'s, 'a>, repo: &'a Repository, size: u64) -> Self {
        let workers = chunk_workers();
        let (work_tx, work_rx) = sync_channel(workers * 2);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let shared = Arc::new(Shared::default());
        let cell = repo.config().chunk_size;
        for _ in 0..workers {
            let (rx, shared) = (work_rx.clone(), shared.clone());
            scope.spawn(move || chunk_cells(repo, cell, &rx, &shared));
        }
        Cells {
            cell,
            size,
            streamed: BTreeSet::new(),
            unsent: BTreeSet::new(),
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
    /// hold it): send the cells it completes to the workers.
    pub fn changed(
        &mut self,
        range: ByteRange,
        written: &Written,
        staging: &Arc<File>,
    ) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        for cell in range.offset / self.cell..range.end().div_ceil(self.cell) {
            if self.streamed.remove(&cell) || self.unsent.contains(&cell) {
                self.unsent.insert(cell);
                continue;
            }
            let whole = self.range_of(cell);
            let parts = written.within(whole);
            if parts.iter().map(|(r, _)| r.length).sum::<u64>() < whole.length {
                continue;
            }
            let zeros = parts
                .into_iter()
                .filter(|(_, k)| *k == ExtentKind::Zero)
                .map(|(r, _)| r)
                .collect();
            self.streamed.insert(cell);
            self.sent += 1;
            let tx = self.work_tx.as_ref().expect("workers run until finish");
            let job = Job {
                cell,
                range: whole,
                zeros,
                staging: staging.clone(),
            };
            tx.send(job).map_err(|_| self.worker_gone())?;
        }
        Ok(())
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
fn chunk_cells(repo: &Repository, cell: u64, rx: &Mutex<Receiver<Job>>, shared: &Shared) {
    let mut buf = vec![0u8; cell as usize];
    loop {
        let item = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(job) = item else { return };
        let data = &mut buf[..job.range.length as usize];
        let result = job
            .staging
            .read_exact_at(data, job.range.offset)
            .ctx(|| format!("read the staging file at {}", job.range.offset))
            .and_then(|()| {
                for z in &job.zeros {
                    let at = (z.offset - job.range.offset) as usize;
                    data[at..at + z.length as usize].fill(0);
                }
                store_window(repo, job.range, data)
            });
        let mut done = shared.lock();
        match result {
            Ok((segments, stored)) => {
                done.captured.insert(job.cell, segments);
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
        let mut c = Cells {
            cell: 100,
            size: 450,
            streamed: BTreeSet::new(),
            unsent: BTreeSet::new(),
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
