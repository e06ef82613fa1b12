//! Writing a point-in-time image to a file or block device.
//!
//! To a regular file the output is sparse: holes, zero extents and all-zero
//! blocks are not written. A block device gets zero ranges written (by
//! `fallocate(ZERO_RANGE)` where the device supports it), since its old
//! contents would otherwise show through.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, IoContext, Result};
use crate::model::chunk_id::ChunkId;
use crate::model::compact_map::CompactMap;
use crate::model::extent::GRANULARITY;
use crate::model::extent::{merge_touching, ByteRange};
use crate::model::image_map::{Piece, Segment};
use crate::model::snapshot::SnapshotInfo;
use crate::store::chunks::is_zero;
use crate::store::lock::{Activity, Registration};
use crate::store::pins::PinDir;
use crate::store::repo::Repository;

/// What a restore could not write: ranges of the image whose chunks are
/// damaged, left as zeroes, and why.
#[derive(Debug, Default)]
pub struct Restored {
    pub damaged: Vec<ByteRange>,
    pub reasons: Vec<String>,
}

/// Write the image of `info` to `target`. Damaged chunks do not stop it: their
/// ranges are left zero and returned, the rest is written.
pub fn restore(repo: &Repository, info: &SnapshotInfo, target: &Path) -> Result<Restored> {
    let map = crate::serve::compact_image_map(repo, info)?;
    let _pinned = pin(repo, info, &map)?;
    let (file, readable) = open_target(target).ctx(|| format!("open {}", target.display()))?;
    let meta = file
        .metadata()
        .ctx(|| format!("stat {}", target.display()))?;
    let block_device = meta.file_type().is_block_device();
    if block_device {
        use std::io::{Seek, SeekFrom};
        let dev_size = (&file)
            .seek(SeekFrom::End(0))
            .ctx(|| "device size".into())?;
        if dev_size < map.size() {
            return Err(Error::invalid(format!(
                "{} has {dev_size} bytes, the image needs {}",
                target.display(),
                map.size()
            )));
        }
        zero_gaps(&file, &map)?;
    } else {
        if meta.len() > 0 {
            clear(&file).ctx(|| format!("clear {}", target.display()))?;
        }
        file.set_len(map.size())
            .ctx(|| format!("extend {}", target.display()))?;
    }
    let out = Output {
        file: &file,
        path: target,
        turn: Mutex::new(()),
        prefault: readable && !block_device,
    };
    let bar = crate::progress::bytes(map.data_bytes(), &format!("restore {}", info.reference()));
    // Chunks are read in the map's order, mostly the order they were stored.
    repo.chunks().will_read(map.chunk_table());
    let mut restored = write_data(repo, &map, &out, !block_device, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    restored.damaged = merge_touching(restored.damaged);
    if block_device {
        zero_ranges(&file, &restored.damaged)?;
    }
    // Like cp, dd and qemu-img convert, a file is left to the kernel's
    // writeback; a device is flushed, since it is often detached next.
    if block_device {
        file.sync_all()
            .ctx(|| format!("fsync {}", target.display()))?;
    }
    Ok(restored)
}

/// Pin the image like a mount's open image, so that a forget and gc
/// meanwhile (on any host) leave its chunks alone, and check that the
/// snapshot is still there. A local repository this user cannot write to
/// (mounted read-only, say) is restored from unpinned, with a warning:
/// nothing can change it anyway, unless another user runs gc there.
fn pin(
    repo: &Repository,
    info: &SnapshotInfo,
    map: &crate::model::compact_map::CompactMap,
) -> Result<Option<(Registration, PinDir)>> {
    let pinned = Registration::new(
        repo,
        Activity::Restore,
        &format!("restore {}", info.reference()),
    )
    .and_then(|r| {
        let pins = PinDir::create(repo, &r)?;
        pins.pin_encoded(0, &map.encode())?;
        Ok((r, pins))
    });
    let pinned = match pinned {
        Ok(p) => Some(p),
        Err(Error::Io { context, err }) if !repo.is_remote() => {
            log::warn!("restoring without a pin: {context}: {err}");
            None
        }
        Err(e) => return Err(e),
    };
    if !repo.still_exists(info)? {
        return Err(Error::SnapshotNotFound(info.reference()));
    }
    Ok(pinned)
}

/// Open for writing, and for reading too where allowed (for the prefault,
/// see [`Output`]); returns whether the file is readable.
fn open_target(target: &Path) -> std::io::Result<(File, bool)> {
    let open = |read| {
        OpenOptions::new()
            .read(read)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(target)
    };
    match open(true) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok((open(false)?, false)),
        r => r.map(|f| (f, true)),
    }
}

/// Drop the old contents of an existing regular file, so that the sparse
/// output shows no stale bytes.
///
/// Not by truncating to zero where a hole can be punched: ext4 takes a
/// truncate to size zero for the replace-via-truncate pattern and, when the
/// file is closed, starts writeback of everything written since
/// (`auto_da_alloc`). restore would then wait on the disk for the whole
/// image as it exits, which cp and qemu-img convert into a new file do not.
fn clear(file: &File) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    // SAFETY: fallocate on a descriptor we own.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len as i64,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        file.set_len(0)
    }
}

/// On a device, write zeroes wherever the image has no data.
fn zero_gaps(file: &File, map: &CompactMap) -> Result<()> {
    let mut pos = 0;
    let mut gaps = Vec::new();
    for s in map.segments() {
        if s.range.offset > pos {
            gaps.push(ByteRange::from_bounds(pos, s.range.offset));
        }
        if matches!(s.piece, Piece::Zero) {
            gaps.push(s.range);
        }
        pos = s.range.end();
    }
    if pos < map.size() {
        gaps.push(ByteRange::from_bounds(pos, map.size()));
    }
    zero_ranges(file, &gaps)
}

/// Write zeroes over `ranges`, by `fallocate(ZERO_RANGE)` where supported.
fn zero_ranges(file: &File, ranges: &[ByteRange]) -> Result<()> {
    let zeroes = vec![0u8; 1 << 20];
    for g in ranges {
        // SAFETY: fallocate on a descriptor we own.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE,
                g.offset as i64,
                g.length as i64,
            )
        };
        if rc != 0 {
            for piece in g.split_aligned(zeroes.len() as u64) {
                file.write_all_at(&zeroes[..piece.length as usize], piece.offset)
                    .ctx(|| format!("write zeroes at {}", piece.offset))?;
            }
        }
    }
    Ok(())
}

/// Where restored bytes go, one write at a time. A buffered write holds the
/// file's inode lock, so writers cannot overlap anyway; queued on it, they
/// spin and take the CPU the decoding workers need. Behind a mutex they
/// sleep: side by side, a cold restore took 4.4-5.0 s this way against
/// 4.7-5.3 s with free-for-all writes and 10 s with O_DIRECT writes (which
/// share the disk with the chunk reads instead of leaving it to writeback).
///
/// With `prefault`, each writer first has the page cache pages it is about
/// to fill allocated, outside the lock: readahead of a hole in a regular
/// file makes zeroed pages without I/O. Allocating and first touching a page
/// is most of a buffered write's cost where the memory was handed back to a
/// hypervisor (free page reporting: 370 MB/s for one writer here, twice that
/// for two); under the inode lock it is paid on one core, here on all.
struct Output<'a> {
    file: &'a File,
    path: &'a Path,
    turn: Mutex<()>,
    prefault: bool,
}

impl Output<'_> {
    fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        if self.prefault {
            // SAFETY: readahead on a descriptor we own, into the page cache;
            // a failure only loses the head start.
            unsafe { libc::readahead(self.file.as_raw_fd(), offset as i64, data.len()) };
        }
        let _turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        self.file
            .write_all_at(data, offset)
            .ctx(|| format!("write {} at offset {offset}", self.path.display()))
    }
}

/// Write every data segment, on all cores. Segments are handed out by an
/// atomic index; each worker keeps the chunk it decoded last, since
/// consecutive segments usually come from the same chunk. Runs whose chunk
/// is damaged are skipped and returned.
fn write_data(
    repo: &Repository,
    map: &CompactMap,
    out: &Output,
    skip_zero_blocks: bool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Restored> {
    // Reading chunk files from a cold cache waits on the disk: more threads
    // than cores keep several reads in flight while others decode. Cold
    // restores of the bench image, alternated: 4 per core 3.47-3.86 s,
    // 8 per core 2.98-3.50 s, 16 per core 3.59-4.10 s.
    let workers = 8 * std::thread::available_parallelism().map_or(2, |n| n.get());
    // Work is handed out per chunk, with all the segments that use it, so
    // that each chunk is read and decoded once. In an image flattened from
    // incrementals, a base chunk's segments are interleaved with newer ones.
    let runs = SegmentsByChunk::new(map);
    // Pack by pack from object storage, where a chunk fetched brings the
    // rest of its pack that the image uses.
    let order = repo.chunks().reading_order(map.chunk_table())?;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let damaged = Mutex::new(Restored::default());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut buf = Vec::new();
                let mut run = Vec::new();
                while !failed.load(Ordering::Relaxed) {
                    let at = next.fetch_add(1, Ordering::Relaxed);
                    let Some(indices) = order.get(at).and_then(|&c| runs.get(c)) else {
                        break;
                    };
                    run.clear();
                    run.extend(indices.iter().map(|&i| map.segment(i as usize)));
                    match write_run(repo, out, &run, &mut buf, skip_zero_blocks) {
                        Ok(n) => progress(n),
                        Err(Error::BadChunk { hash, message }) => {
                            let mut d = damaged.lock().unwrap_or_else(|p| p.into_inner());
                            d.damaged.extend(run.iter().map(|seg| seg.range));
                            d.reasons.push(format!("chunk {hash}: {message}"));
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => {
            let mut d = damaged.into_inner().unwrap_or_else(|p| p.into_inner());
            d.damaged.sort();
            Ok(d)
        }
    }
}

fn chunk_of(s: &Segment) -> Option<ChunkId> {
    match s.piece {
        Piece::Data { chunk, .. } => Some(chunk),
        Piece::Zero => None,
    }
}

/// The indices of the data segments grouped by chunk, groups in order of
/// first use (the order of the map's chunk table), in two flat arrays (4
/// bytes a segment and a chunk).
struct SegmentsByChunk {
    /// Group `c` is `order[bounds[c]..bounds[c + 1]]`.
    bounds: Vec<u32>,
    order: Vec<u32>,
}

impl SegmentsByChunk {
    fn new(map: &CompactMap) -> Self {
        let chunks = map.chunk_table().len();
        let mut bounds = vec![0u32; chunks + 1];
        for i in 0..map.len() {
            if let Some(c) = map.chunk_index(i) {
                bounds[c + 1] += 1;
            }
        }
        for c in 0..chunks {
            bounds[c + 1] += bounds[c];
        }
        let mut next = bounds.clone();
        let mut order = vec![0u32; bounds[chunks] as usize];
        for i in 0..map.len() {
            if let Some(c) = map.chunk_index(i) {
                // A map has fewer than 2^32 segments.
                order[next[c] as usize] = i as u32;
                next[c] += 1;
            }
        }
        SegmentsByChunk { bounds, order }
    }

    fn get(&self, group: usize) -> Option<&[u32]> {
        let (start, end) = (*self.bounds.get(group)?, *self.bounds.get(group + 1)?);
        Some(&self.order[start as usize..end as usize])
    }
}

/// Decode the run's chunk once and write each of its segments.
fn write_run(
    repo: &Repository,
    out: &Output,
    run: &[Segment],
    buf: &mut Vec<u8>,
    skip_zero_blocks: bool,
) -> Result<u64> {
    let Some(chunk) = run.first().and_then(chunk_of) else {
        return Ok(0);
    };
    repo.chunks().get_into(&chunk, buf)?;
    let mut written = 0;
    for seg in run {
        let Piece::Data { skip, .. } = seg.piece else {
            continue;
        };
        let data = buf
            .get(skip as usize..skip as usize + seg.range.length as usize)
            .ok_or_else(|| Error::BadChunk {
                hash: chunk.to_hex(),
                message: "shorter than the map needs".into(),
            })?;
        write_range(out, seg.range, data, skip_zero_blocks)?;
        written += seg.range.length;
    }
    Ok(written)
}

fn write_range(out: &Output, range: ByteRange, data: &[u8], skip_zero_blocks: bool) -> Result<()> {
    if !skip_zero_blocks {
        return out.write_at(data, range.offset);
    }
    // Write runs of non-zero blocks, so that zero blocks stay holes.
    let mut run: Option<ByteRange> = None;
    let write_run = |r: ByteRange| {
        let start = (r.offset - range.offset) as usize;
        out.write_at(&data[start..start + r.length as usize], r.offset)
    };
    for block in range.split_aligned(GRANULARITY) {
        let start = (block.offset - range.offset) as usize;
        if is_zero(&data[start..start + block.length as usize]) {
            if let Some(r) = run.take() {
                write_run(r)?;
            }
        } else {
            run = Some(match run {
                Some(r) => ByteRange::from_bounds(r.offset, block.end()),
                None => block,
            });
        }
    }
    if let Some(r) = run {
        write_run(r)?;
    }
    Ok(())
}
