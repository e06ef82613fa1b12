//! A local repository's chunk store: `chunks/<2 hex>/<64 hex>` files in
//! the encoding of `codec`.
//!
//! A file is written unnamed (O_TMPFILE) and linked under its name once
//! complete, so a chunk file under its final name is always whole;
//! durability comes from one `syncfs` before a snapshot is committed rather
//! than one `fsync` per chunk.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::codec::{
    chunk_id, decode, encode_into, is_current_file, padded, DIRECT_ALIGN, HEADER_LEN,
};
use super::quarantine::{on_damage, Quarantine, Taken};
use super::{ChunkStore, PutOutcome};
use crate::error::{Error, IoContext, Result};
use crate::model::chunk_id::ChunkId;
use crate::store::crypto::{Keys, SEAL_OVERHEAD};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // Chunk files as read from disk, before decoding: one buffer per thread.
    static FILE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    // Chunk files being written, aligned for O_DIRECT: one buffer per thread.
    static WRITE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Where chunks live, and how to put and get them.
#[derive(Debug, Clone)]
pub struct LocalChunks {
    dir: PathBuf,
    level: i32,
    /// The 256 subdirectories, each opened on first use: chunks are
    /// touched, created and linked relative to them, which spares a walk
    /// down the whole path per system call.
    subdirs: Arc<Vec<OnceLock<fs::File>>>,
    quarantine: Quarantine,
    /// An encrypted repository's keys: chunk names are keyed, bodies sealed.
    keys: Option<Arc<Keys>>,
}

impl LocalChunks {
    /// The store in `dir`, moving damaged chunks to `damaged`; with `keys`,
    /// an encrypted one.
    pub fn new(dir: PathBuf, damaged: PathBuf, level: i32, keys: Option<Arc<Keys>>) -> Self {
        LocalChunks {
            dir,
            level,
            subdirs: Arc::new((0..=255).map(|_| OnceLock::new()).collect()),
            quarantine: Quarantine::new(damaged),
            keys,
        }
    }

    /// The name of a chunk holding `data` in this store.
    pub fn id_of(&self, data: &[u8]) -> ChunkId {
        chunk_id(self.keys.as_deref(), data)
    }

    /// The open subdirectory holding chunks whose hash starts with `byte`.
    fn subdir(&self, byte: u8) -> Result<&fs::File> {
        let slot = &self.subdirs[byte as usize];
        if let Some(dir) = slot.get() {
            return Ok(dir);
        }
        let path = self.dir.join(format!("{byte:02x}"));
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&path)
            .ctx(|| format!("open {}", path.display()))?;
        Ok(slot.get_or_init(|| dir))
    }

    pub fn create_layout(dir: &Path) -> Result<()> {
        for i in 0..=255u8 {
            let sub = dir.join(format!("{i:02x}"));
            fs::create_dir_all(&sub).ctx(|| format!("create {}", sub.display()))?;
        }
        Ok(())
    }

    pub fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.path(id).exists()
    }

    /// Store `data` unless a chunk with its hash exists already.
    pub fn put(&self, data: &[u8]) -> Result<PutOutcome> {
        let id = self.id_of(data);
        let dir = self.subdir(id.0[0])?;
        let name = FileName::new(&id, None);
        let name = name.as_c();
        // An existing chunk is touched instead: gc keeps chunks newer than
        // the oldest running backup, and the touch fails if gc moved it away.
        if touch_at(dir, name) {
            return Ok(PutOutcome { id, stored: 0 });
        }
        let stored = WRITE_BUF.with(|cell| -> Result<usize> {
            let mut buf = cell.borrow_mut();
            let need = padded(HEADER_LEN + SEAL_OVERHEAD + data.len());
            let start = aligned_start(&mut buf, need);
            let out = &mut buf[start..start + need];
            let seal = self.keys.as_deref().map(|k| (k, &id));
            let len = encode_into(data, self.level, seal, out)?;
            create_file(dir, name, &out[..padded(len)])
                .ctx(|| format!("write {}", self.path(&id).display()))?;
            Ok(len)
        })?;
        Ok(PutOutcome {
            id,
            stored: stored as u64,
        })
    }

    /// Read and decode a chunk, checking its hash. A chunk found damaged or
    /// missing is moved out of use (see `quarantine`) before the error
    /// returns.
    pub fn get_into(&self, id: &ChunkId, into: &mut Vec<u8>) -> Result<()> {
        self.get_checked(id, into, None)
    }

    /// [`get_into`](Self::get_into), keeping a copy of the chunk file in
    /// `file` (for `copy` between repositories with the same keys, which
    /// sends checked files as they are).
    pub fn get_with_file(
        &self,
        id: &ChunkId,
        into: &mut Vec<u8>,
        file: &mut Vec<u8>,
    ) -> Result<()> {
        self.get_checked(id, into, Some(file))
    }

    fn get_checked(
        &self,
        id: &ChunkId,
        into: &mut Vec<u8>,
        file: Option<&mut Vec<u8>>,
    ) -> Result<()> {
        on_damage(self.read_into(id, into, file), || self.quarantine(id))
    }

    fn read_into(
        &self,
        id: &ChunkId,
        into: &mut Vec<u8>,
        file: Option<&mut Vec<u8>>,
    ) -> Result<()> {
        let dir = self.subdir(id.0[0])?;
        FILE_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            let read = match read_file(dir, FileName::new(id, None).as_c(), &mut buf) {
                // gc may be checking it under its trash name at this moment.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    read_file(dir, FileName::new(id, Some(TRASH)).as_c(), &mut buf)
                }
                other => other,
            };
            let body = read.map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::BadChunk {
                    hash: id.to_hex(),
                    message: format!("missing: {} does not exist", self.path(id).display()),
                },
                // Not damage: a transient or local failure (EIO, EMFILE...)
                // must not move a chunk out of use.
                _ => Error::io(format!("read {}", self.path(id).display()), e),
            })?;
            if let Some(file) = file {
                file.clear();
                file.extend_from_slice(&buf[body.clone()]);
            }
            decode(id, &mut buf[body], into, self.keys.as_deref())
        })
    }

    /// Store a chunk file as it is (from a repository with the same keys,
    /// checked there) unless a chunk with its name exists; returns the bytes
    /// written. Files of the old unpadded format are stored anew from `data`.
    pub fn put_file(&self, id: &ChunkId, file: &[u8], data: &[u8]) -> Result<u64> {
        if !is_current_file(file) {
            return Ok(self.put(data)?.stored);
        }
        let dir = self.subdir(id.0[0])?;
        let name = FileName::new(id, None);
        if touch_at(dir, name.as_c()) {
            return Ok(0);
        }
        WRITE_BUF.with(|cell| -> Result<u64> {
            let mut buf = cell.borrow_mut();
            let start = aligned_start(&mut buf, file.len());
            buf[start..start + file.len()].copy_from_slice(file);
            create_file(dir, name.as_c(), &buf[start..start + file.len()])
                .ctx(|| format!("write {}", self.path(id).display()))?;
            Ok(file.len() as u64)
        })
    }

    /// Move a chunk that failed to read out of use, so that no backup
    /// deduplicates onto it: the next one that meets its data stores it
    /// anew. `None` when it read whole after all (a backup stored it anew
    /// between the failed read and now).
    pub fn quarantine(&self, id: &ChunkId) -> Result<Option<Taken>> {
        let taken = self.quarantine.take(&self.path(id), id)?;
        crate::testhook::pause("quarantine:taken");
        if taken == Taken::Moved {
            let mut buf = Vec::new();
            let moved = fs::read(self.quarantine.path(id));
            if moved
                .is_ok_and(|mut body| decode(id, &mut body, &mut buf, self.keys.as_deref()).is_ok())
            {
                self.quarantine.give_back(&self.path(id), id)?;
                return Ok(None);
            }
        }
        log::warn!("chunk {id} is damaged; moved out of use");
        Ok(Some(taken))
    }

    /// Chunks on record as damaged and not stored anew since.
    pub fn damaged(&self) -> Result<HashSet<ChunkId>> {
        self.quarantine.unhealed(|id| self.contains(id))
    }

    /// The record of damaged chunks.
    pub fn quarantined(&self) -> &Quarantine {
        &self.quarantine
    }

    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.get_into(id, &mut v)?;
        Ok(v)
    }

    /// Set a chunk's mtime to now (see `put`); false if it is not there.
    pub fn touch(&self, id: &ChunkId) -> bool {
        self.subdir(id.0[0])
            .is_ok_and(|dir| touch_at(dir, FileName::new(id, None).as_c()))
    }

    /// Size of a chunk file on disk, or `None` if it is missing.
    pub fn stored_size(&self, id: &ChunkId) -> Option<u64> {
        fs::metadata(self.path(id)).ok().map(|m| m.len())
    }

    /// Every file under the store: chunks and leftover temporaries.
    pub fn list_files(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for i in 0..=255u8 {
            let sub = self.dir.join(format!("{i:02x}"));
            let rd = match fs::read_dir(&sub) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("list {}", sub.display()), e)),
            };
            for entry in rd {
                let entry = entry.ctx(|| format!("list {}", sub.display()))?;
                out.push(entry.path());
            }
        }
        Ok(out)
    }
}

/// Where in `buf` a `DIRECT_ALIGN`ed run of `len` bytes starts, growing
/// `buf` as needed. Grown, never cleared: zero-filling a chunk-sized buffer
/// per use would cost more than the I/O's CPU time.
fn aligned_start(buf: &mut Vec<u8>, len: usize) -> usize {
    if buf.len() < len + DIRECT_ALIGN {
        buf.resize(len + DIRECT_ALIGN, 0);
    }
    buf.as_ptr().align_offset(DIRECT_ALIGN)
}

/// Read a whole chunk file into `buf` (reused across calls) and return where
/// its bytes are in `buf`.
///
/// Chunk files are read with O_DIRECT where the file system allows it. Their
/// readers (restore, the mount, verify) stream far more than they reread, and
/// through the page cache every chunk would cost a page allocation per 4 KiB
/// (expensive on a VM) and be cached twice: once compressed here, once as
/// the decoded image the mount or the restored file keeps.
fn read_file(
    dir: &fs::File,
    name: &CStr,
    buf: &mut Vec<u8>,
) -> std::io::Result<std::ops::Range<usize>> {
    use std::io::Read;
    let mut file = match open_at(dir, name, libc::O_RDONLY | libc::O_DIRECT) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            buf.clear();
            open_at(dir, name, libc::O_RDONLY)?.read_to_end(buf)?;
            return Ok(0..buf.len());
        }
        Err(e) => return Err(e),
    };
    let size = file.metadata()?.len() as usize;
    let rounded = padded(size);
    let start = aligned_start(buf, rounded);
    let mut got = 0;
    while got < size {
        match file.read(&mut buf[start + got..start + rounded]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(start..start + got.min(size))
}

/// openat(2) relative to `dir`, close-on-exec, created files owner-only.
fn open_at(dir: &fs::File, name: &CStr, flags: libc::c_int) -> std::io::Result<fs::File> {
    // SAFETY: openat with a valid descriptor and C string.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            0o600,
        )
    };
    match fd {
        -1 => Err(std::io::Error::last_os_error()),
        // SAFETY: a fresh descriptor nobody else owns.
        fd => Ok(unsafe { fs::File::from_raw_fd(fd) }),
    }
}

/// Create `name` in `dir` holding `body` (aligned for O_DIRECT, whole
/// blocks) such that the name never shows a partial file: the data goes to
/// an unnamed file (O_TMPFILE) that is linked under `name` once complete.
/// If `name` appeared meanwhile, another writer stored the same chunk: that
/// is success. Where the file system lacks O_TMPFILE, a temporary name is
/// renamed instead.
///
/// The file is written with O_DIRECT where the file system allows it, for
/// the reason chunk files are read that way: a backup writes far more than
/// anyone rereads soon, and each page-cache page is an allocation. The
/// commit's syncfs makes the files and names durable.
fn create_file(dir: &fs::File, name: &CStr, body: &[u8]) -> std::io::Result<()> {
    let unnamed = |flags| open_at(dir, c".", libc::O_TMPFILE | libc::O_WRONLY | flags);
    let file = match unnamed(libc::O_DIRECT).or_else(|_| unnamed(0)) {
        Ok(f) => f,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
            return create_renamed(dir, name, body)
        }
        Err(e) => return Err(e),
    };
    write_body(&file, body)?;
    link_at(&file, dir, name)
}

/// `create_file` for file systems without O_TMPFILE: a unique temporary
/// name (gc removes ones a crash left), renamed over `name`.
fn create_renamed(dir: &fs::File, name: &CStr, body: &[u8]) -> std::io::Result<()> {
    let tmp = format!(
        "{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = CString::new(tmp).expect("no NUL");
    let open = |flags| {
        open_at(
            dir,
            &tmp,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | flags,
        )
    };
    let file = match open(libc::O_DIRECT) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0)?,
        other => other?,
    };
    write_body(&file, body)?;
    // SAFETY: valid descriptors and C strings.
    let rc = unsafe {
        libc::renameat(
            dir.as_raw_fd(),
            tmp.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn write_body(file: &fs::File, body: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    match file.write_all_at(body, 0) {
        // Alignment the device refuses: write through the page cache.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            clear_direct(file)?;
            file.write_all_at(body, 0)
        }
        other => other,
    }
}

/// Set once linkat(AT_EMPTY_PATH) was refused (it needs
/// CAP_DAC_READ_SEARCH); the /proc/self/fd path is used from then on.
static EMPTY_PATH_REFUSED: AtomicBool = AtomicBool::new(false);

/// Give the unnamed file `file` the name `name` in `dir`; an existing name
/// is success (another writer stored the same chunk).
fn link_at(file: &fs::File, dir: &fs::File, name: &CStr) -> std::io::Result<()> {
    let done = |rc: libc::c_int| match rc {
        0 => Ok(()),
        _ => match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            e => Err(e),
        },
    };
    if !EMPTY_PATH_REFUSED.load(Ordering::Relaxed) {
        // SAFETY: valid descriptors and C strings.
        let rc = unsafe {
            libc::linkat(
                file.as_raw_fd(),
                c"".as_ptr(),
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        };
        match done(rc) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)) => {
                EMPTY_PATH_REFUSED.store(true, Ordering::Relaxed);
            }
            other => return other,
        }
    }
    let proc = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    // SAFETY: valid descriptors and C strings.
    done(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
}

/// Switch `f` to buffered I/O.
fn clear_direct(f: &fs::File) -> std::io::Result<()> {
    // SAFETY: fcntl flag calls on a descriptor we own.
    let ok = unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_DIRECT) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

const TRASH: &str = "trash";

/// A chunk's file name (64 hex digits and an optional short extension) as
/// a C string on the stack: every put and get needs one, and they are hot
/// paths.
struct FileName([u8; 72]);

impl FileName {
    fn new(id: &ChunkId, extension: Option<&str>) -> Self {
        let mut buf = [0u8; 72];
        let hex = blake3::Hash::from_bytes(id.0).to_hex();
        buf[..64].copy_from_slice(hex.as_bytes());
        if let Some(ext) = extension {
            buf[64] = b'.';
            buf[65..65 + ext.len()].copy_from_slice(ext.as_bytes());
        }
        FileName(buf)
    }

    fn as_c(&self) -> &CStr {
        CStr::from_bytes_until_nul(&self.0).expect("the last byte is NUL")
    }
}

/// Where gc puts a chunk while it decides whether to delete it.
pub fn trash_path(chunk: &Path) -> PathBuf {
    chunk.with_extension(TRASH)
}

/// Set the mtime of `name` in `dir` to now; false if it does not exist.
fn touch_at(dir: &fs::File, name: &CStr) -> bool {
    // SAFETY: utimensat with a valid descriptor, C string and NULL times (= now).
    unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), std::ptr::null(), 0) == 0 }
}

impl ChunkStore for LocalChunks {
    fn id_of(&self, data: &[u8]) -> ChunkId {
        LocalChunks::id_of(self, data)
    }
    fn put(&self, data: &[u8]) -> Result<PutOutcome> {
        LocalChunks::put(self, data)
    }
    fn get_into(&self, id: &ChunkId, into: &mut Vec<u8>) -> Result<()> {
        LocalChunks::get_into(self, id, into)
    }
    fn get_with_file(&self, id: &ChunkId, into: &mut Vec<u8>, file: &mut Vec<u8>) -> Result<()> {
        LocalChunks::get_with_file(self, id, into, file)
    }
    fn put_file(&self, id: &ChunkId, file: &[u8], data: &[u8]) -> Result<u64> {
        LocalChunks::put_file(self, id, file, data)
    }
    fn contains(&self, id: &ChunkId) -> bool {
        LocalChunks::contains(self, id)
    }
    fn stored_size(&self, id: &ChunkId) -> Option<u64> {
        LocalChunks::stored_size(self, id)
    }
    fn touch(&self, id: &ChunkId) -> bool {
        LocalChunks::touch(self, id)
    }
    fn quarantine(&self, id: &ChunkId) -> Result<Option<Taken>> {
        LocalChunks::quarantine(self, id)
    }
    fn damaged_records(&self) -> Result<Vec<ChunkId>> {
        self.quarantined().list()
    }
    fn remove_damaged_record(&self, id: &ChunkId) -> Result<()> {
        self.quarantined().remove(id)
    }
    fn as_local(&self) -> Option<&LocalChunks> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::ENC_RAW;
    use super::*;

    /// A chunk store in a temporary directory (removed when dropped).
    fn scratch_store() -> (tempfile::TempDir, LocalChunks) {
        let dir = tempfile::tempdir().unwrap();
        LocalChunks::create_layout(dir.path()).unwrap();
        let store = LocalChunks::new(
            dir.path().to_path_buf(),
            dir.path().join("damaged"),
            1,
            None,
        );
        (dir, store)
    }

    #[test]
    fn roundtrip_compressible_and_random() {
        let (_dir, store) = scratch_store();
        let text = b"hello world ".repeat(10_000);
        let mut random = vec![0u8; 100_000];
        let mut x = 0x9E3779B97F4A7C15u64;
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for data in [&text[..], &random[..]] {
            let put = store.put(data).unwrap();
            assert!(put.stored > 0);
            assert_eq!(store.put(data).unwrap().stored, 0, "second put dedups");
            assert_eq!(store.get(&put.id).unwrap(), data);
        }
        // Random data is stored raw, text compressed; files are whole blocks.
        let raw = store.stored_size(&ChunkId::of(&random)).unwrap();
        assert_eq!(raw, padded(random.len() + HEADER_LEN) as u64);
        assert_eq!(
            fs::read(store.path(&ChunkId::of(&random))).unwrap()[3],
            ENC_RAW
        );
        assert!(store.stored_size(&ChunkId::of(&text)).unwrap() < 10_000);
        // Nothing but the chunks themselves: no temporaries left behind.
        assert_eq!(store.list_files().unwrap().len(), 2);
    }

    #[test]
    fn fallbacks_write_whole_named_files() {
        let (_dir, store) = scratch_store();
        // Linking through /proc/self/fd, as without CAP_DAC_READ_SEARCH.
        EMPTY_PATH_REFUSED.store(true, Ordering::Relaxed);
        let data = b"linked by path".repeat(500);
        let id = store.put(&data).unwrap().id;
        assert_eq!(store.get(&id).unwrap(), data);
        // A temporary name renamed, as on a file system without O_TMPFILE.
        let data = b"renamed".repeat(700);
        let id = ChunkId::of(&data);
        let mut body = vec![0u8; padded(HEADER_LEN + data.len()) + DIRECT_ALIGN];
        let start = aligned_start(&mut body, padded(HEADER_LEN + data.len()));
        let len = encode_into(&data, 1, None, &mut body[start..]).unwrap();
        let name = CString::new(id.to_hex()).unwrap();
        create_renamed(
            store.subdir(id.0[0]).unwrap(),
            &name,
            &body[start..start + padded(len)],
        )
        .unwrap();
        assert_eq!(store.get(&id).unwrap(), data);
        assert_eq!(store.list_files().unwrap().len(), 2, "no temporaries left");
    }

    #[test]
    fn version_1_files_are_read() {
        let (_dir, store) = scratch_store();
        let data = b"written by strata 0.1".repeat(300);
        let id = ChunkId::of(&data);
        let compressed = zstd::bulk::compress(&data, 1).unwrap();
        fs::write(store.path(&id), [&b"SC\x01\x01"[..], &compressed].concat()).unwrap();
        assert_eq!(store.get(&id).unwrap(), data);
        let raw = b"raw".repeat(5);
        let raw_id = ChunkId::of(&raw);
        fs::write(store.path(&raw_id), [&b"SC\x01\x00"[..], &raw].concat()).unwrap();
        assert_eq!(store.get(&raw_id).unwrap(), raw);
    }

    #[test]
    fn reads_of_every_size_reuse_one_buffer() {
        // Sizes around the O_DIRECT block, in shrinking and growing order,
        // through one thread's buffer: a stale tail must never leak in.
        let (_dir, store) = scratch_store();
        let mut out = Vec::new();
        for len in [9000, 1, 4094, 4095, 4096, 4097, 8192, 100, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let id = store.put(&data).unwrap().id;
            store.get_into(&id, &mut out).unwrap();
            assert_eq!(out, data, "length {len}");
        }
    }

    #[test]
    fn damage_is_detected_and_moved_out_of_use() {
        let (_dir, store) = scratch_store();
        let data = b"abc".repeat(1000);
        let id = store.put(&data).unwrap().id;
        let path = store.path(&id);
        let good = fs::read(&path).unwrap();
        let mut flipped = good.clone();
        flipped[HEADER_LEN + 2] ^= 1;
        let mut padding = good.clone();
        *padding.last_mut().unwrap() ^= 1;
        let mut long = good.clone();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        // A flipped bit in the payload, in the padding, a length that points
        // past the end, a cut header.
        for (body, why) in [
            (&flipped[..], "decompress"),
            (&padding[..], "padding"),
            (&long[..], "truncated"),
            (&long[..3], "header"),
        ] {
            fs::write(&path, body).unwrap();
            let err = store.get(&id).unwrap_err().to_string();
            assert!(
                err.contains(why) && err.contains("moved out of use"),
                "{err}"
            );
            // Out of use: the name is free, the body kept aside, and the
            // chunk on record until a put stores it again.
            assert!(!path.exists());
            assert_eq!(fs::read(store.quarantined().path(&id)).unwrap(), body);
            assert_eq!(store.damaged().unwrap(), HashSet::from([id]));
            assert!(store.put(&data).unwrap().stored > 0, "not deduplicated");
            assert_eq!(store.get(&id).unwrap(), data);
            assert!(store.damaged().unwrap().is_empty());
        }
        fs::remove_file(&path).unwrap();
        let err = store.get(&id).unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains("recorded"), "{err}");
        assert_eq!(store.damaged().unwrap(), HashSet::from([id]));
        // A chunk that reads whole again when it is moved (stored anew after
        // the failed read) goes back under its name.
        store.put(&data).unwrap();
        assert_eq!(store.quarantine(&id).unwrap(), None);
        assert_eq!(store.get(&id).unwrap(), data);
    }
}
