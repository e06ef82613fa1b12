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

use crate::backup::{is_zero, GRANULARITY};
use crate::chunk::{aligned, ChunkId, DIRECT_ALIGN};
use crate::error::{Error, IoContext, Result};
use crate::extent::ByteRange;
use crate::image_map::{ImageMap, Piece, Segment};
use crate::repo::Repository;
use crate::snapshot::SnapshotInfo;

pub fn restore(repo: &Repository, info: &SnapshotInfo, target: &Path) -> Result<()> {
    let map = repo.image_map(info)?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(target)
        .ctx(|| format!("open {}", target.display()))?;
    let meta = file
        .metadata()
        .ctx(|| format!("stat {}", target.display()))?;
    let block_device = meta.file_type().is_block_device();
    if block_device {
        use std::io::{Seek, SeekFrom};
        let dev_size = (&file)
            .seek(SeekFrom::End(0))
            .ctx(|| "device size".into())?;
        if dev_size < map.size {
            return Err(Error::invalid(format!(
                "{} has {dev_size} bytes, the image needs {}",
                target.display(),
                map.size
            )));
        }
        zero_gaps(&file, &map)?;
    } else {
        file.set_len(0)
            .ctx(|| format!("truncate {}", target.display()))?;
        file.set_len(map.size)
            .ctx(|| format!("extend {}", target.display()))?;
    }
    let out = Output::new(&file, target);
    let bar = crate::progress::bytes(map.data_bytes(), &format!("restore {}", info.reference()));
    write_data(repo, &map, &out, !block_device, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    // Like cp, dd and qemu-img convert, a file is left to the kernel's
    // writeback; a device is flushed, since it is often detached next.
    if block_device {
        file.sync_all()
            .ctx(|| format!("fsync {}", target.display()))?;
    }
    Ok(())
}

/// On a device, write zeroes wherever the image has no data.
fn zero_gaps(file: &File, map: &ImageMap) -> Result<()> {
    let mut pos = 0;
    let mut gaps = Vec::new();
    for s in &map.segments {
        if s.range.offset > pos {
            gaps.push(ByteRange::from_bounds(pos, s.range.offset));
        }
        if matches!(s.piece, Piece::Zero) {
            gaps.push(s.range);
        }
        pos = s.range.end();
    }
    if pos < map.size {
        gaps.push(ByteRange::from_bounds(pos, map.size));
    }
    let zeroes = vec![0u8; 1 << 20];
    for g in gaps {
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

/// Where restored bytes go. Whole blocks are written with O_DIRECT where the
/// file system allows it: a restore writes gigabytes nobody rereads soon,
/// and through the page cache each 4 KiB is a page allocation and every
/// worker queues on the inode lock while it copies. Partial blocks (an
/// unaligned range's ends) go through the page cache.
struct Output<'a> {
    file: &'a File,
    direct: Option<File>,
}

impl<'a> Output<'a> {
    fn new(file: &'a File, path: &Path) -> Self {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Output { file, direct }
    }

    /// Write `data` at `offset`; `bounce` is the caller's scratch buffer for
    /// data not aligned in memory.
    fn write_at(&self, data: &[u8], offset: u64, bounce: &mut Vec<u8>) -> Result<()> {
        let align = DIRECT_ALIGN as u64;
        let end = offset + data.len() as u64;
        let (start, stop) = (offset.next_multiple_of(align), end / align * align);
        let Some(direct) = self.direct.as_ref().filter(|_| start < stop) else {
            return self.buffered(data, offset);
        };
        let head = (start - offset) as usize;
        let body = &data[head..head + (stop - start) as usize];
        let body = if body.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
            body
        } else {
            let copy = aligned(bounce, body.len());
            copy.copy_from_slice(body);
            &*copy
        };
        match direct.write_all_at(body, start) {
            Ok(()) => {}
            // Alignment the device refuses: write through the page cache.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.buffered(&data[head..head + body.len()], start)?
            }
            Err(e) => return Err(Error::io(format!("write at {start}"), e)),
        }
        self.buffered(&data[..head], offset)?;
        self.buffered(&data[(stop - offset) as usize..], stop)
    }

    fn buffered(&self, data: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .ctx(|| format!("write at {offset}"))
    }
}

/// Write every data segment, on all cores. Segments are handed out by an
/// atomic index; each worker keeps the chunk it decoded last, since
/// consecutive segments usually come from the same chunk.
fn write_data(
    repo: &Repository,
    map: &ImageMap,
    out: &Output,
    skip_zero_blocks: bool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    // Reading chunk files from a cold cache waits on the disk: more threads
    // than cores keep several reads in flight while others decode.
    let workers = 4 * std::thread::available_parallelism().map_or(2, |n| n.get());
    // Work is handed out per chunk, with all the segments that use it, so
    // that each chunk is read and decoded once. In an image flattened from
    // incrementals, a base chunk's segments are interleaved with newer ones.
    let runs = segments_by_chunk(map);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let (mut buf, mut bounce) = (Vec::new(), Vec::new());
                while !failed.load(Ordering::Relaxed) {
                    let Some(run) = runs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    match write_run(repo, out, run, (&mut buf, &mut bounce), skip_zero_blocks) {
                        Ok(n) => progress(n),
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
        None => Ok(()),
    }
}

fn chunk_of(s: &Segment) -> Option<ChunkId> {
    match s.piece {
        Piece::Data { chunk, .. } => Some(chunk),
        Piece::Zero => None,
    }
}

/// The data segments grouped by chunk, groups in order of first use.
fn segments_by_chunk(map: &ImageMap) -> Vec<Vec<&Segment>> {
    let mut groups: Vec<Vec<&Segment>> = Vec::new();
    let mut index: std::collections::HashMap<ChunkId, usize> = std::collections::HashMap::new();
    for seg in &map.segments {
        if let Some(chunk) = chunk_of(seg) {
            let i = *index.entry(chunk).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[i].push(seg);
        }
    }
    groups
}

/// Decode the run's chunk once and write each of its segments.
fn write_run(
    repo: &Repository,
    out: &Output,
    run: &[&Segment],
    (buf, bounce): (&mut Vec<u8>, &mut Vec<u8>),
    skip_zero_blocks: bool,
) -> Result<u64> {
    let Some(chunk) = run.first().and_then(|s| chunk_of(s)) else {
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
        write_range(out, seg.range, data, bounce, skip_zero_blocks)?;
        written += seg.range.length;
    }
    Ok(written)
}

fn write_range(
    out: &Output,
    range: ByteRange,
    data: &[u8],
    bounce: &mut Vec<u8>,
    skip_zero_blocks: bool,
) -> Result<()> {
    if !skip_zero_blocks {
        return out.write_at(data, range.offset, bounce);
    }
    // Write runs of non-zero blocks, so that zero blocks stay holes.
    let mut run: Option<ByteRange> = None;
    let mut write_run = |r: ByteRange| {
        let start = (r.offset - range.offset) as usize;
        out.write_at(&data[start..start + r.length as usize], r.offset, bounce)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_writes_any_alignment() {
        // Direct and buffered pieces, data misaligned in memory, ranges
        // touching inside one block: the file must read back exactly.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let out = Output::new(&file, &path);
        let mut truth = vec![0u8; 1 << 20];
        let source: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 253) as u8 + 1).collect();
        let mut bounce = Vec::new();
        let writes = [
            (0, 4096, 0),
            (4096, 8192, 1),
            (20_000, 70_001, 3),
            (90_001, 4095, 7),
            (94_096, 100, 0),
            (200_704, 65_536, 4096),
            (300_000, 1, 9),
            (1_048_000, 576, 11),
        ];
        for (offset, len, skip) in writes {
            let data = &source[skip..skip + len];
            out.write_at(data, offset as u64, &mut bounce).unwrap();
            truth[offset..offset + len].copy_from_slice(data);
        }
        assert_eq!(std::fs::read(&path).unwrap(), truth);
    }
}
