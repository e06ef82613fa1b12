//! Where backups read from. A [`Source`] is a disk of known size that can be
//! read at any offset, from several threads at once.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::model::extent::{ByteRange, Extent, ExtentKind};

pub trait Source: Sync {
    /// For messages: a path or URI.
    fn describe(&self) -> String;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; a short read is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// What a full backup must look at: `data` ranges are read, `zero` ranges
    /// recorded as such, and the rest are holes.
    fn allocation(&self) -> Result<Vec<Extent>>;
    /// How many `read_exact_at` calls may usefully run at once.
    fn parallel_reads(&self) -> usize {
        2
    }
    /// How many consecutive windows a reader takes at once, to be read by
    /// one `read_many`: a network source sends them as one pipelined batch.
    fn read_batch(&self) -> usize {
        1
    }
    /// Fill each buffer from its offset.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<()> {
        for (offset, buf) in reads.iter_mut() {
            self.read_exact_at(buf, *offset)?;
        }
        Ok(())
    }
    /// Everything has been read; called before the snapshot is committed.
    fn finished(&self) {}
    /// Whether any offset reads the disk's current bytes (a file, a device,
    /// an NBD export), so that a backup can read its parent's damaged
    /// ranges again; not so for what a push wrote.
    fn reads_anywhere(&self) -> bool {
        true
    }
}

/// A raw image file or a block device.
pub struct FileSource {
    path: PathBuf,
    file: File,
    size: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).ctx(|| format!("open source {}", path.display()))?;
        let meta = file.metadata().ctx(|| format!("stat {}", path.display()))?;
        let ft = meta.file_type();
        let size = if ft.is_block_device() {
            use std::io::{Seek, SeekFrom};
            (&file)
                .seek(SeekFrom::End(0))
                .ctx(|| format!("size of {}", path.display()))?
        } else if ft.is_file() {
            meta.len()
        } else {
            return Err(Error::invalid(format!(
                "{}: not a regular file or block device; back up a raw image file, a block device or an NBD URI",
                path.display()
            )));
        };
        Ok(FileSource {
            path: path.to_path_buf(),
            file,
            size,
        })
    }
}

impl FileSource {
    fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            let what = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                format!(
                    "{}: source is shorter than expected ({} bytes at offset {offset} not readable)",
                    self.path.display(),
                    buf.len()
                )
            } else {
                format!("read {} at offset {offset}", self.path.display())
            };
            Error::io(what, e)
        })
    }

    /// Whether `at` is in data (true) or a hole (false), and where that run
    /// ends; `None` where SEEK_HOLE is unsupported or `at` is past the end
    /// (the read then reports it). A trailing hole ends at the file's
    /// current end, so a source that shrank still fails to read.
    fn run_at(&self, at: u64) -> Option<(bool, u64)> {
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on a descriptor we own; reads are positional.
        let hole = unsafe { libc::lseek(fd, at as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        if hole as u64 > at {
            return Some((true, hole as u64));
        }
        // SAFETY: as above.
        let data = unsafe { libc::lseek(fd, at as i64, libc::SEEK_DATA) };
        let until = if data >= 0 {
            data
        } else {
            // SAFETY: as above.
            unsafe { libc::lseek(fd, 0, libc::SEEK_END) }
        };
        (until as u64 > at).then_some((false, until as u64))
    }
}

impl Source for FileSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    /// Holes are zero-filled here rather than read: reading a hole of a
    /// sparse file makes the kernel allocate and clear page-cache pages,
    /// which was half the cost of `--check-unchanged`'s sample.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let (data, until) = self.run_at(at).unwrap_or((true, end));
            let part = &mut buf[(at - offset) as usize..(until.min(end) - offset) as usize];
            if data {
                self.read_data(part, at)?;
            } else {
                part.fill(0);
            }
            at = until.min(end);
        }
        Ok(())
    }

    fn allocation(&self) -> Result<Vec<Extent>> {
        data_ranges(&self.file, 0, self.size).map(|ranges| {
            ranges
                .into_iter()
                .map(|r| Extent::new(r, ExtentKind::Data))
                .collect()
        })
    }
}

/// Data ranges in `[start, size)` by SEEK_DATA/SEEK_HOLE; all of it where
/// unsupported.
fn data_ranges(file: &File, start: u64, size: u64) -> Result<Vec<ByteRange>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < size {
        // SAFETY: lseek on a descriptor we own; it only moves the shared offset,
        // which nothing else here uses (reads are positional).
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            if out.is_empty() && err.raw_os_error() == Some(libc::EINVAL) {
                return Ok(vec![ByteRange::from_bounds(start, size)]);
            }
            return Err(Error::io("lseek(SEEK_DATA)", err));
        }
        let data = data as u64;
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(Error::io(
                "lseek(SEEK_HOLE)",
                std::io::Error::last_os_error(),
            ));
        }
        let hole = (hole as u64).min(size);
        if hole > data {
            out.push(ByteRange::from_bounds(data, hole));
        }
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sparse_file_allocation() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8 << 20).unwrap();
        f.as_file().write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        f.flush().unwrap();
        let src = FileSource::open(f.path()).unwrap();
        let alloc = src.allocation().unwrap();
        assert_eq!(src.size(), 8 << 20);
        // The file system may round to its block size, but must cover the write
        // and skip the leading hole.
        assert!(!alloc.is_empty());
        assert!(alloc[0].offset <= 4 << 20 && alloc[0].offset > 0);
        let mut buf = [0u8; 16];
        assert!(src.read_exact_at(&mut buf, (8 << 20) - 8).is_err());
        // Holes read as zeroes without being read, data around them as data.
        let mut buf = vec![7u8; 2 << 20];
        src.read_exact_at(&mut buf, 3 << 20).unwrap();
        assert!(buf[..1 << 20].iter().all(|&b| b == 0));
        assert!(buf[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 1));
        assert!(buf[(1 << 20) + 4096..].iter().all(|&b| b == 0));
        let within = |o, l| data_ranges(&src.file, o, o + l).unwrap();
        assert!(within(0, 1 << 20).is_empty());
        assert!(within(6 << 20, 2 << 20).is_empty());
        let around = within(3 << 20, 2 << 20);
        assert_eq!(around.len(), 1);
        assert!(around[0].offset <= 4 << 20 && around[0].end() >= (4 << 20) + 4096);
        assert!(around[0].offset >= 3 << 20 && around[0].end() <= 5 << 20);
    }
}
