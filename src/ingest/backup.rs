//! Taking a snapshot: plan what to read from a [`Source`], cut it into
//! chunks on a fixed grid, store them on all cores, and commit.
//!
//! Reader threads (`Source::parallel_reads`) read windows of at most one
//! chunk into a small pool of reusable buffers; worker threads find zero
//! blocks, hash, compress and store. Memory is bounded by the pool,
//! whatever the disk size.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel};
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::ingest::changes::ChangeList;
use crate::ingest::source::Source;
use crate::model::chunk_id::ChunkId;
use crate::model::extent::{merge_touching, ByteRange, ExtentKind, GRANULARITY};
use crate::model::image_map::{ImageMap, Piece, Segment};
use crate::model::name::{DiskName, Selector, SnapshotRef};
use crate::model::snapshot::{SnapshotInfo, SnapshotKind};
use crate::store::chunks::is_zero;
use crate::store::image::{self, ChunkCache};
use crate::store::lock::{Activity, Registration};
use crate::store::repo::{damaged_ranges_in, NewSnapshot, Repository};

#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    pub disk: Option<DiskName>,
    /// `None`: a full snapshot. Otherwise the ranges to read.
    pub changes: Option<ChangeList>,
    pub parent: Option<SnapshotRef>,
    pub differential: bool,
    pub label: String,
    pub checkpoint: Option<String>,
    pub bitmap: Option<String>,
    pub time: Option<DateTime<Utc>>,
    /// Percent (0..=100) of unchanged blocks to compare with the parent.
    pub check_unchanged: f64,
}

/// Segments stored before the backup ran (by `receive`, while the data
/// arrived), for parts of the disk the source's plan leaves out.
#[derive(Debug, Default)]
pub struct Prechunked {
    pub segments: Vec<Segment>,
    pub stored_bytes: u64,
}

/// Take a snapshot of `source` as `opts` says and commit it.
pub fn backup(
    repo: &Repository,
    source: &dyn Source,
    opts: &BackupOptions,
) -> Result<SnapshotInfo> {
    backup_with(repo, source, opts, Prechunked::default())
}

/// [`backup`], with segments already stored for ranges outside the plan.
pub fn backup_with(
    repo: &Repository,
    source: &dyn Source,
    opts: &BackupOptions,
    pre: Prechunked,
) -> Result<SnapshotInfo> {
    let captured = capture_snapshot(repo, source, opts, pre)?;
    let read = captured.read_bytes;
    let info = repo.commit(captured.snapshot)?;
    log::info!(
        "committed {} ({} bytes read, {} bytes stored)",
        info.reference(),
        read,
        info.stored_bytes
    );
    Ok(info)
}

/// A snapshot whose data is stored but which does not exist yet: commit
/// it ([`Repository::commit`], or several at once with
/// [`Repository::commit_group`]) or drop it. Until then its registration
/// keeps gc from deleting the chunks it wrote.
pub struct CapturedSnapshot {
    pub snapshot: NewSnapshot,
    /// Data bytes read from the source.
    pub read_bytes: u64,
    _registration: Registration,
}

impl CapturedSnapshot {
    /// The snapshot to commit and the registration to hold until then.
    pub fn into_parts(self) -> (NewSnapshot, Registration) {
        (self.snapshot, self._registration)
    }
}

/// Everything [`backup_with`] does but the commit: callers that must
/// commit several snapshots together (all disks of one VM) capture each
/// first.
pub fn capture_snapshot(
    repo: &Repository,
    source: &dyn Source,
    opts: &BackupOptions,
    pre: Prechunked,
) -> Result<CapturedSnapshot> {
    let disk = opts
        .disk
        .clone()
        .ok_or_else(|| Error::invalid("a disk name is required"))?;
    if !(0.0..=100.0).contains(&opts.check_unchanged) {
        return Err(Error::invalid(format!(
            "--check-unchanged must be between 0 and 100, not {}",
            opts.check_unchanged
        )));
    }
    let (registration, damaged) = register_listing_damage(repo, &disk, opts.changes.is_some());
    let registration = registration?;
    let size = source.size();
    let (kind, parent, plan) = match &opts.changes {
        None => {
            if opts.differential || opts.parent.is_some() {
                return Err(Error::invalid(
                    "--parent and --differential need a change list (--changes or --bitmap)",
                ));
            }
            (SnapshotKind::Full, None, source.allocation()?)
        }
        Some(changes) => {
            changes.check(size).map_err(|m| {
                Error::invalid(format!(
                    "change list {} does not fit {}: {m}",
                    changes.origin,
                    source.describe()
                ))
            })?;
            let parent_ref = opts.parent.clone().unwrap_or(SnapshotRef {
                disk: disk.clone(),
                selector: Selector::Latest,
            });
            if parent_ref.disk != disk {
                return Err(Error::invalid(format!(
                    "parent {parent_ref} belongs to another disk than {disk}"
                )));
            }
            let parent = repo.resolve(&parent_ref).map_err(|e| match e {
                Error::NoSnapshots(d) => Error::invalid(format!(
                    "disk {d} has no snapshot to be the parent of an incremental; take a full backup first"
                )),
                e => e,
            })?;
            let kind = if opts.differential {
                SnapshotKind::Differential
            } else {
                SnapshotKind::Incremental
            };
            let damaged = damaged.transpose()?;
            let changes = checked_changes(
                repo,
                source,
                &parent,
                changes,
                opts.check_unchanged,
                damaged,
            )?;
            (kind, Some(parent), changes.extents)
        }
    };

    let total: u64 = plan
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| e.length)
        .sum();
    let bar = crate::progress::bytes(total, &format!("backup {disk}"));
    let mut segments = Vec::new();
    let mut windows = Vec::new();
    for e in &plan {
        match e.kind {
            ExtentKind::Zero => segments.push(Segment::zero(e.range())),
            ExtentKind::Data => windows.extend(e.range().split_aligned(repo.config().chunk_size)),
        }
    }
    log::debug!("reading {total} bytes from {}", source.describe());
    // Only incrementals group small windows into one chunk: a full backup
    // keeps one chunk per run so that unchanged data deduplicates against
    // earlier fulls, and a differential re-sends mostly the clusters the
    // previous one had, which deduplicate only if cut the same way.
    let groups = if kind == SnapshotKind::Incremental {
        // A group is read into one chunk-sized buffer.
        group_windows(&windows, GROUP_BYTES.min(repo.config().chunk_size))
    } else {
        windows.iter().map(std::slice::from_ref).collect()
    };
    let captured = capture(repo, source, &groups, &|n| bar.inc(n))?;
    source.finished();
    log::debug!("read; committing");
    bar.finish_and_clear();
    segments.extend(captured.segments);
    segments.extend(pre.segments);
    crate::testhook::pause("backup:captured");
    let own = ImageMap::new(size, segments);
    Ok(CapturedSnapshot {
        snapshot: NewSnapshot {
            disk,
            kind,
            parent: parent.map(|p| p.id),
            time: opts.time.unwrap_or_else(Utc::now),
            granularity: GRANULARITY,
            label: opts.label.clone(),
            checkpoint: opts.checkpoint.clone(),
            bitmap: opts.bitmap.clone(),
            stored_bytes: captured.stored_bytes + pre.stored_bytes,
            own,
        },
        read_bytes: total,
        _registration: registration,
    })
}

/// Register the backup (its lease, the catalog synced after it) and, for
/// an incremental, list the records of damaged chunks meanwhile: that
/// listing needs neither, and on object storage it is one request fewer
/// in series.
fn register_listing_damage(
    repo: &Repository,
    disk: &DiskName,
    incremental: bool,
) -> (Result<Registration>, Option<Result<HashSet<ChunkId>>>) {
    std::thread::scope(|s| {
        let damaged = incremental.then(|| s.spawn(|| repo.chunks().damaged()));
        let registration = Registration::new(repo, Activity::Backup, &format!("backup {disk}"));
        let damaged = damaged.map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        (registration, damaged)
    })
}

/// The change list to back up: `changes` plus the parent's damaged ranges,
/// checked against the parent where it says nothing changed. A parent chunk
/// that the check finds damaged is moved out of use by the read, so the
/// next round reads its range from the source instead of failing.
/// `damaged`: the chunks on record as damaged, if listed already.
fn checked_changes(
    repo: &Repository,
    source: &dyn Source,
    parent: &SnapshotInfo,
    changes: &ChangeList,
    percent: f64,
    mut damaged: Option<HashSet<ChunkId>>,
) -> Result<ChangeList> {
    // Resolved once: both the damage and the unchanged-range check read it.
    let map = repo.image_map(parent)?;
    let mut rounds = 0;
    loop {
        // A later round lists again: the check recorded a chunk it found damaged.
        let damaged = match damaged.take() {
            Some(d) => d,
            None => repo.chunks().damaged()?,
        };
        let with_damage = with_parent_damage(source, parent, &map, &damaged, changes)?;
        match check_unchanged(repo, source, parent, &map, &with_damage, percent) {
            Err(Error::BadChunk { hash, message }) if rounds < MAX_CHECK_ROUNDS => {
                log::warn!("the parent's chunk {hash} is damaged ({message})");
                rounds += 1;
            }
            other => return other.map(|()| with_damage),
        }
    }
}

/// How many damaged parent chunks one backup's check steps around before it
/// gives up (each costs a new sample): verify finds them all at once.
const MAX_CHECK_ROUNDS: usize = 8;

/// `changes` plus the ranges of the parent's image whose chunks are damaged,
/// read again from the source so that the new snapshot is whole whatever
/// the change list says (and its data stored anew heals the parent too).
fn with_parent_damage(
    source: &dyn Source,
    parent: &SnapshotInfo,
    map: &ImageMap,
    damaged: &HashSet<ChunkId>,
    changes: &ChangeList,
) -> Result<ChangeList> {
    let size = source.size();
    let damaged: Vec<ByteRange> = damaged_ranges_in(map, damaged)
        .into_iter()
        .filter_map(|r| r.intersect(&ByteRange::new(0, size)))
        .collect();
    if damaged.is_empty() {
        return Ok(changes.clone());
    }
    if !source.reads_anywhere() {
        return Err(Error::invalid(format!(
            "the parent {} has damaged ranges, which {} cannot supply; take a full backup",
            parent.reference(),
            source.describe()
        )));
    }
    log::warn!(
        "the parent {} has {} damaged bytes in {} ranges; reading them from {} again",
        parent.reference(),
        damaged.iter().map(|r| r.length).sum::<u64>(),
        damaged.len(),
        source.describe()
    );
    Ok(changes.with_reads(&damaged))
}

struct Captured {
    segments: Vec<Segment>,
    stored_bytes: u64,
}

/// Threads that zero-detect, hash, compress and store chunks. Chunk files
/// are written with O_DIRECT, so a worker waits on the disk for each: with
/// three per core the cores stay busy (an incremental of small chunks took
/// 0.7-1.1 s with two workers and 0.4-0.6 s with six on two cores).
pub(crate) fn chunk_workers() -> usize {
    3 * std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The most data one group of small windows stores as one chunk. Reading
/// any piece of a chunk means reading all of it, so larger groups make
/// random reads (the mount) and the `--check-unchanged` sample of later
/// incrementals dearer: with 1 MiB groups the sample read 1 MiB per 64 KiB
/// cluster and a chain of 3% incrementals took 0.17-0.33 s each; with
/// 256 KiB, 0.17-0.26 s (one chunk file per cluster: 0.24-0.31 s).
const GROUP_BYTES: u64 = 256 << 10;

/// Consecutive windows gathered into groups of at most `limit` bytes (a
/// larger window stands alone), each to be read into one buffer and stored
/// as one chunk. An incremental's windows are mostly single clusters spread
/// over the disk; one chunk file each, the per-file cost (create, link, a
/// small O_DIRECT write) was most of the backup's time.
fn group_windows(windows: &[ByteRange], limit: u64) -> Vec<&[ByteRange]> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, w) in windows.iter().enumerate() {
        if i > start && bytes + w.length > limit {
            groups.push(&windows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += w.length;
    }
    if start < windows.len() {
        groups.push(&windows[start..]);
    }
    groups
}

/// Read each group of windows (each inside one chunk cell, together at most
/// one chunk) from `source` into one buffer and store it.
fn capture(
    repo: &Repository,
    source: &dyn Source,
    groups: &[&[ByteRange]],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Captured> {
    let workers = chunk_workers();
    let chunk_size = repo.config().chunk_size as usize;
    let (work_tx, work_rx) = sync_channel::<(&[ByteRange], Vec<u8>)>(workers * 2);
    let work_rx = Mutex::new(work_rx);
    let readers = source.parallel_reads().max(1);
    let batch = source.read_batch().max(1);
    let (free_tx, free_rx) = channel::<Vec<u8>>();
    // Enough for every reader to hold a full batch at once (so readers
    // never wait on each other for buffers) and for workers to stay busy.
    for _ in 0..(workers + readers * batch) * 2 {
        free_tx.send(vec![0u8; chunk_size]).expect("receiver alive");
    }
    let free_rx = Mutex::new(free_rx);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let stored = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        failed.store(true, Ordering::SeqCst);
        first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    };

    std::thread::scope(|s| {
        for _ in 0..workers {
            let free_tx = free_tx.clone();
            s.spawn(|| {
                let free_tx = free_tx;
                loop {
                    let item = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((group, mut buf)) = item else { break };
                    if !failed.load(Ordering::SeqCst) {
                        let stored_group = match group {
                            [one] => store_window(repo, *one, &buf[..one.length as usize]),
                            _ => store_group(repo, group, &mut buf),
                        };
                        match stored_group {
                            Ok((segs, n)) => {
                                stored.fetch_add(n, Ordering::Relaxed);
                                results
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .extend(segs);
                                progress(group.iter().map(|w| w.length).sum());
                                crate::testhook::pause("backup:capturing");
                            }
                            Err(e) => fail(e),
                        }
                    }
                    let _ = free_tx.send(buf);
                }
            });
        }
        // Readers take batches of groups in order from a shared index;
        // several reads in flight hide a network source's latency. Results
        // are sorted afterwards, so order does not matter.
        for _ in 0..readers {
            let work_tx = work_tx.clone();
            s.spawn(|| {
                let work_tx = work_tx;
                while !failed.load(Ordering::SeqCst) {
                    let start = next.fetch_add(batch, Ordering::Relaxed);
                    let Some(taken) = groups.get(start..groups.len().min(start + batch)) else {
                        break;
                    };
                    let mut bufs = Vec::with_capacity(taken.len());
                    for _ in taken {
                        match free_rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(buf) => bufs.push(buf),
                            Err(_) => return,
                        }
                    }
                    let mut reads: Vec<(u64, &mut [u8])> = Vec::new();
                    for (group, buf) in taken.iter().zip(bufs.iter_mut()) {
                        let mut rest = &mut buf[..];
                        for w in group.iter() {
                            let (part, tail) = rest.split_at_mut(w.length as usize);
                            reads.push((w.offset, part));
                            rest = tail;
                        }
                    }
                    if let Err(e) = source.read_many(&mut reads) {
                        fail(e);
                        break;
                    }
                    drop(reads);
                    for (group, buf) in taken.iter().zip(bufs) {
                        if work_tx.send((group, buf)).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        drop(work_tx);
    });

    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(Captured {
        segments: results.into_inner().unwrap_or_else(|p| p.into_inner()),
        stored_bytes: stored.into_inner(),
    })
}

/// Split one window into zero blocks and data runs; store each run as a chunk.
pub(crate) fn store_window(
    repo: &Repository,
    range: ByteRange,
    data: &[u8],
) -> Result<(Vec<Segment>, u64)> {
    let mut segs = Vec::new();
    let mut stored = 0;
    for (part, zero) in split_zeroes(range, data) {
        if zero {
            segs.push(Segment::zero(part));
        } else {
            let start = (part.offset - range.offset) as usize;
            let put = repo
                .chunks()
                .put(&data[start..start + part.length as usize])?;
            stored += put.stored;
            segs.push(Segment::data(part, put.id, 0));
        }
    }
    Ok((segs, stored))
}

/// Store a group of windows read back to back into `data`: zero blocks as
/// zero segments, the data runs of all windows as one chunk. `data` is
/// reused as scratch space (the runs are moved to its front).
fn store_group(
    repo: &Repository,
    group: &[ByteRange],
    data: &mut [u8],
) -> Result<(Vec<Segment>, u64)> {
    let mut segs = Vec::new();
    let mut runs = Vec::new();
    let mut len = 0;
    let mut pos = 0;
    for w in group {
        for (part, zero) in split_zeroes(*w, &data[pos..pos + w.length as usize]) {
            if zero {
                segs.push(Segment::zero(part));
            } else {
                let at = pos + (part.offset - w.offset) as usize;
                data.copy_within(at..at + part.length as usize, len);
                runs.push((part, len));
                len += part.length as usize;
            }
        }
        pos += w.length as usize;
    }
    if runs.is_empty() {
        return Ok((segs, 0));
    }
    let put = repo.chunks().put(&data[..len])?;
    for (part, skip) in runs {
        let skip = u32::try_from(skip).expect("a group is at most one chunk");
        segs.push(Segment::data(part, put.id, skip));
    }
    Ok((segs, put.stored))
}

/// The window's `GRANULARITY` blocks as runs of zero (true) and data
/// (false) blocks, in order.
fn split_zeroes(range: ByteRange, data: &[u8]) -> Vec<(ByteRange, bool)> {
    let mut parts: Vec<(ByteRange, bool)> = Vec::new();
    for block in range.split_aligned(GRANULARITY) {
        let start = (block.offset - range.offset) as usize;
        let zero = is_zero(&data[start..start + block.length as usize]);
        match parts.last_mut() {
            Some((last, z)) if *z == zero => last.length += block.length,
            _ => parts.push((block, zero)),
        }
    }
    parts
}

/// Compare a sample of the blocks the change list calls unchanged with the
/// parent's image: a lying bitmap must not produce a wrong snapshot.
fn check_unchanged(
    repo: &Repository,
    source: &dyn Source,
    parent: &SnapshotInfo,
    map: &ImageMap,
    changes: &ChangeList,
    percent: f64,
) -> Result<()> {
    if percent <= 0.0 {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let common = parent.size.min(source.size());
    let cache = ChunkCache::new(CHECK_CACHE_CHUNKS * crate::store::chunks::MAX_CHUNK_SIZE);
    let mut rng = SplitMix(
        Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64 ^ u64::from(std::process::id()),
    );
    let mut listed = changes.extents.iter().peekable();
    let cell_size = repo.config().chunk_size;
    // Sample whole chunk cells: each decoded parent chunk serves every
    // unlisted block in it, and the blocks of a cell are read as one batch
    // (one round trip from a network source, not one per block).
    let mut sample: Vec<(ByteRange, Vec<ByteRange>)> = Vec::new();
    for cell in ByteRange::new(0, common).split_aligned(cell_size) {
        if rng.next_f64() * 100.0 >= percent {
            continue;
        }
        let mut blocks = Vec::new();
        for block in cell.split_aligned(GRANULARITY) {
            while listed
                .peek()
                .is_some_and(|e| e.offset + e.length <= block.offset)
            {
                listed.next();
            }
            // Skip blocks (partly) listed as changed.
            if listed.peek().is_none_or(|e| e.offset >= block.end()) {
                blocks.push(block);
            }
        }
        if !blocks.is_empty() {
            sample.push((cell, blocks));
        }
    }
    // Cells are independent: several in flight hide disk and network waits.
    let next = AtomicUsize::new(0);
    let decoded = AtomicUsize::new(0);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let threads = check_threads(repo).min(sample.len());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let (mut ours, mut theirs) =
                    (vec![0u8; cell_size as usize], vec![0u8; cell_size as usize]);
                while let Some((cell, blocks)) = sample.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let checked = compare_cell(
                        repo,
                        source,
                        parent,
                        map,
                        &cache,
                        *cell,
                        blocks,
                        &mut ours,
                        &mut theirs,
                    );
                    match checked {
                        Ok(n) => {
                            decoded.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            next.store(sample.len(), Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let sampled: usize = sample.iter().map(|(_, b)| b.len()).sum();
    log::debug!(
        "check-unchanged: {sampled} blocks match the parent, {} of them compared by \
         decoding it ({:.3} s)",
        decoded.into_inner(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Compare `blocks` of one cell of `source` with the parent's image; returns
/// how many needed the parent's chunks decoded.
#[allow(clippy::too_many_arguments)]
fn compare_cell(
    repo: &Repository,
    source: &dyn Source,
    parent: &SnapshotInfo,
    map: &ImageMap,
    cache: &ChunkCache,
    cell: ByteRange,
    blocks: &[ByteRange],
    ours: &mut [u8],
    theirs: &mut [u8],
) -> Result<usize> {
    let at = |b: &ByteRange| (b.offset - cell.offset) as usize..(b.end() - cell.offset) as usize;
    read_blocks(source, cell, blocks, ours)?;
    let id_of = |data: &[u8]| repo.chunks().id_of(data);
    let proven = proven_cheaply(
        map,
        cell,
        &merge_touching(blocks.iter().copied()),
        ours,
        &id_of,
    );
    let mut proven = proven.iter().peekable();
    let mut rest = Vec::new();
    for b in blocks {
        while proven.peek().is_some_and(|p| p.end() <= b.offset) {
            proven.next();
        }
        if !proven.peek().is_some_and(|p| p.contains(b)) {
            rest.push(*b);
        }
    }
    for b in &rest {
        image::read_at(map, repo.chunks(), cache, &mut theirs[at(b)], b.offset)?;
    }
    match rest.iter().find(|b| ours[at(b)] != theirs[at(b)]) {
        None => Ok(rest.len()),
        Some(b) => Err(Error::invalid(format!(
            "the change list calls range {}+{} unchanged since {}, but it differs from it: \
             the bitmap is wrong or stale; take a full backup (or use --fallback-full)",
            b.offset,
            b.length,
            parent.reference()
        ))),
    }
}

/// Read `blocks` of `cell` from `source` into their places in `ours`.
fn read_blocks(
    source: &dyn Source,
    cell: ByteRange,
    blocks: &[ByteRange],
    ours: &mut [u8],
) -> Result<()> {
    let mut reads = Vec::with_capacity(blocks.len());
    let mut rest = &mut ours[..cell.length as usize];
    let mut pos = cell.offset;
    for b in blocks {
        let (_, tail) = rest.split_at_mut((b.offset - pos) as usize);
        let (buf, tail) = tail.split_at_mut(b.length as usize);
        reads.push((b.offset, buf));
        rest = tail;
        pos = b.end();
    }
    source.read_many(&mut reads)
}

/// The parts of `read` (ranges of `cell` whose source bytes are in `ours`)
/// that equal the parent without decoding a chunk: zeroes where the parent
/// has no data, and whole chunks (pieces from their first byte that `read`
/// covers) whose hash the source's bytes have. A hash that differs proves
/// nothing (the piece may be part of a longer chunk): those blocks are
/// compared byte by byte.
fn proven_cheaply(
    map: &ImageMap,
    cell: ByteRange,
    read: &[ByteRange],
    ours: &[u8],
    id_of: &dyn Fn(&[u8]) -> ChunkId,
) -> Vec<ByteRange> {
    let bytes =
        |r: &ByteRange| &ours[(r.offset - cell.offset) as usize..(r.end() - cell.offset) as usize];
    let mut proven = Vec::new();
    let zero_part = |r: ByteRange, proven: &mut Vec<ByteRange>| {
        if !r.is_empty() && is_zero(bytes(&r)) {
            proven.push(r);
        }
    };
    for run in read {
        let mut pos = run.offset;
        for seg in &map.segments[map.first_after(run.offset)..] {
            if seg.range.offset >= run.end() {
                break;
            }
            let Piece::Data { chunk, skip } = seg.piece else {
                continue;
            };
            zero_part(
                ByteRange::from_bounds(pos, seg.range.offset.max(pos)),
                &mut proven,
            );
            if skip == 0 && run.contains(&seg.range) && id_of(bytes(&seg.range)) == chunk {
                proven.push(seg.range);
            }
            pos = pos.max(seg.range.end().min(run.end()));
        }
        zero_part(ByteRange::from_bounds(pos, run.end()), &mut proven);
    }
    merge_touching(proven)
}

/// Cells compared at once by `--check-unchanged`: parent chunks are read
/// from disk and source blocks may come over the network, so more than the
/// cores (8 measured no better than 4 on two cores). From object storage
/// each parent chunk is a request, and waiting on it costs no core: 16 in
/// flight, as many as the uploader keeps (~100 chunk GETs over a 20 ms
/// round trip: 0.73-1.55 s with 4, 0.34-0.45 s with 16; with the server on
/// the same two cores, no difference).
fn check_threads(repo: &Repository) -> usize {
    if repo.is_remote() {
        16
    } else {
        4
    }
}

/// Decoded parent chunks kept by `--check-unchanged` (of at most
/// `MAX_CHUNK_SIZE` each): a chunk serves the sampled blocks of its cell
/// and of the next.
const CHECK_CACHE_CHUNKS: usize = 4;

/// A small, good-enough PRNG for sampling (no need for a crate).
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        assert!(is_zero(&v[3..997]));
        v[999] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&v[..999]));
    }

    #[test]
    fn small_windows_are_grouped() {
        let k = 1024u64;
        let w = |offset: u64, length: u64| ByteRange::new(offset, length);
        let mut windows: Vec<ByteRange> = (0..20).map(|i| w(i * 1000 * k, 64 * k)).collect();
        windows.insert(3, w(8000 * k, 4096 * k));
        let sizes = |limit| -> Vec<usize> {
            group_windows(&windows, limit)
                .iter()
                .map(|g| g.len())
                .collect()
        };
        // Three small ones, the large one alone, then four to a group.
        assert_eq!(sizes(GROUP_BYTES), vec![3, 1, 4, 4, 4, 4, 1]);
        assert_eq!(sizes(128 * k), vec![2, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 1]);
        assert!(group_windows(&[], GROUP_BYTES).is_empty());
    }

    #[test]
    fn a_group_is_one_chunk_with_zero_blocks_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("repo"), None).unwrap();
        let g = GRANULARITY;
        // Two windows read back to back: data, zero block, data | data.
        let group = [ByteRange::new(10 * g, 3 * g), ByteRange::new(100 * g, g)];
        let mut data = vec![0u8; 4 * g as usize];
        data[..g as usize].fill(1);
        data[2 * g as usize..].fill(2);
        data[3 * g as usize..].fill(3);
        let want: Vec<u8> = [&data[..g as usize], &data[2 * g as usize..]].concat();
        let (segs, stored) = store_group(&repo, &group, &mut data).unwrap();
        assert!(stored > 0);
        let id = ChunkId::of(&want);
        assert_eq!(
            segs,
            vec![
                Segment::zero(ByteRange::new(11 * g, g)),
                Segment::data(ByteRange::new(10 * g, g), id, 0),
                Segment::data(ByteRange::new(12 * g, g), id, g as u32),
                Segment::data(ByteRange::new(100 * g, g), id, 2 * g as u32),
            ]
        );
        assert_eq!(repo.chunks().get(&id).unwrap(), want);
    }

    #[test]
    fn proven_without_decoding() {
        let k = 1024u64;
        let cell = ByteRange::new(0, 16 * k);
        let mut ours = vec![0u8; cell.length as usize];
        ours[4096..8192].fill(1);
        ours[8192..12288].fill(2);
        let whole = ChunkId::of(&ours[4096..8192]);
        // A chunk longer than its piece: the piece's bytes do not hash to it.
        let longer = ChunkId::of(&[&ours[8192..12288], &[9u8; 100][..]].concat());
        let map = ImageMap::new(
            cell.length,
            vec![
                Segment::data(ByteRange::new(4096, 4096), whole, 0),
                Segment::data(ByteRange::new(8192, 4096), longer, 0),
            ],
        );
        let all = [cell];
        assert_eq!(
            proven_cheaply(&map, cell, &all, &ours, &ChunkId::of),
            vec![ByteRange::new(0, 8192), ByteRange::new(12288, 4096)]
        );
        // Only what was read counts; a chunk read in part proves nothing.
        let read = [ByteRange::new(2048, 4096)];
        assert_eq!(
            proven_cheaply(&map, cell, &read, &ours, &ChunkId::of),
            vec![ByteRange::new(2048, 2048)]
        );
        // Source bytes that differ: a nonzero hole, a changed chunk.
        ours[100] = 7;
        ours[5000] = 7;
        assert_eq!(
            proven_cheaply(&map, cell, &all, &ours, &ChunkId::of),
            vec![ByteRange::new(12288, 4096)]
        );
    }
}
