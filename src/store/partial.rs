//! Partial pushes: what `receive` got from a writer that went away without
//! NBD_CMD_DISC, kept so that a retry can finish it. QEMU's backup job with
//! `bitmap-mode: always` clears the bit of every cluster whose write was
//! acknowledged, even when the job fails, so its retry sends only the rest:
//! the snapshot needs both.
//!
//! ```text
//! <home>/partial/<disk, '/' as '+'>/partial.json   kind, parent, size, created
//!                                   staging.raw    written bytes at their disk offsets (sparse)
//!                                   journal        (offset, length, kind) records, in order
//! ```
//!
//! Durability is what QEMU assumes of a backup target, which it never
//! flushes during a job: a write's bytes are in the staging file and its
//! record in the journal (the page cache is enough: it survives the process)
//! before the write is acknowledged, and [`Partial::sync`] (NBD FLUSH)
//! fdatasyncs both, so a machine crash keeps everything acknowledged before
//! an acknowledged FLUSH. The journal is the truth of what was written:
//! staged bytes without a record are never read. A record carries its own
//! checksum; replay stops at the first bad one, a torn tail.
//!
//! `<home>` is the repository, or for an encrypted one, which must hold no
//! disk content in clear, this host's cache directory for it (see
//! [`home`]). Functions here take `<home>` as `root`.
//!
//! The receive using a partial holds an exclusive `flock` on its journal
//! for its whole life; gc and `forget --partial` leave a locked one alone.
//! The journal is linked into place last at creation, so a directory
//! without one is an interrupted creation, removed on sight.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::model::extent::{ByteRange, Extent, ExtentKind};
use crate::model::name::{DiskName, SnapshotId};
use crate::model::snapshot::{format_time, parse_time, SnapshotKind};
use crate::model::written::Written;
use crate::store::durable::fsync_dir;
use crate::store::repo::Repository;

pub const PARTIAL_FORMAT: &str = "strata-partial/1";
/// How long gc keeps a partial nobody wrote to, unless told otherwise.
pub const DEFAULT_MAX_AGE_DAYS: i64 = 7;

const META: &str = "partial.json";
const STAGING: &str = "staging.raw";
const JOURNAL: &str = "journal";

/// What a push is, which its retry must match to resume it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushTarget {
    pub kind: SnapshotKind,
    pub parent: Option<SnapshotId>,
    pub size: u64,
}

impl std::fmt::Display for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.parent {
            Some(p) => write!(f, "{} on {p}, {} bytes", self.kind.as_str(), self.size),
            None => write!(f, "{}, {} bytes", self.kind.as_str(), self.size),
        }
    }
}

/// `partial.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format: String,
    disk: String,
    kind: SnapshotKind,
    parent: Option<String>,
    size: u64,
    created: String,
}

/// A partial as `strata partials` lists it.
#[derive(Debug, Clone)]
pub struct PartialInfo {
    pub disk: DiskName,
    pub target: PushTarget,
    pub created: DateTime<Utc>,
    /// Last change of the journal.
    pub updated: DateTime<Utc>,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// A running receive holds it.
    pub in_use: bool,
}

impl PartialInfo {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "disk": self.disk.to_string(),
            "kind": self.target.kind.as_str(),
            "parent": self.target.parent.as_ref().map(|p| p.to_string()),
            "size": self.target.size,
            "created": format_time(&self.created),
            "updated": format_time(&self.updated),
            "data_bytes": self.data_bytes,
            "zero_bytes": self.zero_bytes,
            "in_use": self.in_use,
        })
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        format!(
            "partial push of {} ({}; {} bytes written, {} zeroed; started {}, last written {})",
            self.disk,
            self.target,
            self.data_bytes,
            self.zero_bytes,
            format_time(&self.created),
            format_time(&self.updated)
        )
    }
}

/// The partial of one disk, locked by this process.
#[derive(Debug)]
pub struct Partial {
    dir: PathBuf,
    disk: DiskName,
    target: PushTarget,
    created: DateTime<Utc>,
    staging: Arc<File>,
    /// The staging file opened with O_DIRECT, for aligned writes: a push
    /// would otherwise fill the page cache with data nobody reads again.
    /// `None` where the file system refuses it.
    direct: Option<File>,
    journal: File,
    /// Length of the valid records; a failed append is cut back to it.
    journal_len: u64,
    /// Written since the last `sync`.
    dirty: bool,
    /// An append failed and could not be undone: refuse further records,
    /// which replay would never reach.
    broken: bool,
}

/// O_DIRECT wants buffers, offsets and lengths aligned to the logical block
/// size; 4096 covers every common device.
pub const DIRECT_ALIGN: usize = 4096;

fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Where the partial pushes of `repo` live: in it, or in this host's cache
/// for an encrypted one (`Repository::scratch_root`).
pub fn home(repo: &Repository) -> PathBuf {
    repo.scratch_root()
}

pub fn partials_dir(root: &Path) -> PathBuf {
    root.join("partial")
}

fn dir_of(root: &Path, disk: &DiskName) -> PathBuf {
    // '+' is not allowed in a disk name, so this is reversible.
    partials_dir(root).join(disk.as_str().replace('/', "+"))
}

fn disk_of(dir_name: &str) -> Option<DiskName> {
    DiskName::parse(&dir_name.replace('+', "/")).ok()
}

fn flock_exclusive(file: &File) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

fn mkdir_private(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ctx(|| format!("create {}", dir.display()))
}

fn open_rw(path: &Path, append: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .append(append)
        .mode(0o600)
        .open(path)
}

/// Why a journal cannot be used, or its lock when it can.
enum Locked {
    /// No partial (or an interrupted creation, now removed).
    Absent,
    /// Another process holds it.
    Busy,
    Held(File),
}

/// Lock the journal in `dir`; clear an interrupted creation.
fn lock_journal(dir: &Path) -> Result<Locked> {
    let path = dir.join(JOURNAL);
    let journal = match open_rw(&path, true) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.exists() && !creation_in_progress(dir) {
                remove_dir(dir)?;
            }
            return Ok(Locked::Absent);
        }
        Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
    };
    if !flock_exclusive(&journal) {
        return Ok(Locked::Busy);
    }
    // Removed (by gc or forget) between our open and our lock?
    let same = fs::metadata(&path)
        .ok()
        .zip(journal.metadata().ok())
        .is_some_and(|(a, b)| a.ino() == b.ino() && a.dev() == b.dev());
    if !same {
        return Ok(Locked::Absent);
    }
    Ok(Locked::Held(journal))
}

/// A creator links the journal last and holds a lock on its temporary
/// name until then.
fn creation_in_progress(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name().to_string_lossy().starts_with("journal.tmp.")
            && File::open(e.path()).is_ok_and(|f| !flock_exclusive(&f))
    })
}

fn remove_dir(dir: &Path) -> Result<()> {
    // The journal first: without it the rest is an interrupted creation.
    match fs::remove_file(dir.join(JOURNAL)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("remove {}", dir.display()), e)),
    }
    fs::remove_dir_all(dir).ctx(|| format!("remove {}", dir.display()))
}

const RECORD: usize = 32;
const RECORD_MAGIC: &[u8; 4] = b"SJ01";

fn encode(e: &Extent) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..4].copy_from_slice(RECORD_MAGIC);
    r[4] = match e.kind {
        ExtentKind::Data => 1,
        ExtentKind::Zero => 2,
    };
    r[8..16].copy_from_slice(&e.offset.to_le_bytes());
    r[16..24].copy_from_slice(&e.length.to_le_bytes());
    let check = blake3::hash(&r[..24]);
    r[24..].copy_from_slice(&check.as_bytes()[..8]);
    r
}

fn decode(r: &[u8], size: u64) -> Option<Extent> {
    if &r[..4] != RECORD_MAGIC || r[24..] != blake3::hash(&r[..24]).as_bytes()[..8] {
        return None;
    }
    let kind = match r[4] {
        1 => ExtentKind::Data,
        2 => ExtentKind::Zero,
        _ => return None,
    };
    let offset = u64::from_le_bytes(r[8..16].try_into().ok()?);
    let length = u64::from_le_bytes(r[16..24].try_into().ok()?);
    let end = offset.checked_add(length)?;
    (length > 0 && end <= size).then(|| Extent::new(ByteRange::new(offset, length), kind))
}

/// The written map a journal describes, and the length of its valid records.
fn replay(journal: &File, path: &Path, size: u64) -> Result<(Written, u64)> {
    let mut written = Written::default();
    let mut r = std::io::BufReader::with_capacity(1 << 20, journal);
    let mut rec = [0u8; RECORD];
    let mut valid = 0u64;
    loop {
        match r.read_exact(&mut rec) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        }
        let Some(e) = decode(&rec, size) else {
            break;
        };
        written.insert(e.range(), e.kind);
        valid += RECORD as u64;
    }
    Ok((written, valid))
}

fn read_meta(dir: &Path) -> Result<(DiskName, PushTarget, DateTime<Utc>)> {
    let path = dir.join(META);
    let body = fs::read(&path).ctx(|| format!("read {}", path.display()))?;
    let bad = |why: String| Error::invalid(format!("{}: {why}", path.display()));
    let m: Meta = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
    if m.format != PARTIAL_FORMAT {
        return Err(bad(format!("unknown format {:?}", m.format)));
    }
    let disk = DiskName::parse(&m.disk)?;
    let parent = m.parent.as_deref().map(SnapshotId::parse).transpose()?;
    let created = parse_time(&m.created)?;
    let target = PushTarget {
        kind: m.kind,
        parent,
        size: m.size,
    };
    Ok((disk, target, created))
}

fn unreadable(disk: &DiskName, e: Error) -> Error {
    Error::invalid(format!(
        "the partial push of {disk} is unreadable ({e}); remove it with `strata forget --partial {disk}`"
    ))
}

fn mtime(path: &Path) -> Option<DateTime<Utc>> {
    fs::metadata(path).ok()?.modified().ok().map(DateTime::from)
}

impl Partial {
    /// Start a new partial of `disk`; fails if one exists.
    pub fn create(root: &Path, disk: &DiskName, target: &PushTarget) -> Result<Self> {
        let dir = dir_of(root, disk);
        mkdir_private(&dir)?;
        let created = Utc::now();
        let tmp = dir.join(format!("journal.tmp.{}", std::process::id()));
        let journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&tmp)
            .ctx(|| format!("create {}", tmp.display()))?;
        if !flock_exclusive(&journal) {
            return Err(Error::Busy(format!("{} is locked", tmp.display())));
        }
        // Left by a dead process with our pid?
        journal
            .set_len(0)
            .ctx(|| format!("truncate {}", tmp.display()))?;
        let meta = Meta {
            format: PARTIAL_FORMAT.into(),
            disk: disk.to_string(),
            kind: target.kind,
            parent: target.parent.as_ref().map(|p| p.to_string()),
            size: target.size,
            created: format_time(&created),
        };
        let meta_tmp = dir.join(format!("{META}.tmp"));
        let body = serde_json::to_vec_pretty(&meta).expect("meta serializes");
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&meta_tmp)
            .ctx(|| format!("create {}", meta_tmp.display()))?;
        f.write_all_at(&body, 0)
            .and_then(|()| f.sync_all())
            .ctx(|| format!("write {}", meta_tmp.display()))?;
        fs::rename(&meta_tmp, dir.join(META)).ctx(|| format!("rename {}", meta_tmp.display()))?;
        let staging_path = dir.join(STAGING);
        let staging = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&staging_path)
            .ctx(|| format!("create {}", staging_path.display()))?;
        staging
            .set_len(target.size)
            .ctx(|| format!("size {}", staging_path.display()))?;
        fsync_dir(&dir)?;
        // The journal's name makes the partial exist: last, and never over
        // another's (link fails if it exists).
        fs::hard_link(&tmp, dir.join(JOURNAL)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Busy(format!("a partial push of {disk} appeared meanwhile"))
            } else {
                Error::io(format!("link {}", dir.join(JOURNAL).display()), e)
            }
        })?;
        fs::remove_file(&tmp).ctx(|| format!("remove {}", tmp.display()))?;
        fsync_dir(&dir)?;
        fsync_dir(&partials_dir(root))?;
        Ok(Partial {
            dir,
            disk: disk.clone(),
            target: target.clone(),
            created,
            direct: open_direct(&staging_path),
            staging: Arc::new(staging),
            journal,
            journal_len: 0,
            dirty: false,
            broken: false,
        })
    }

    /// The partial of `disk`, locked, with what it holds; a torn journal
    /// tail is cut off. `None` if there is none.
    pub fn open(root: &Path, disk: &DiskName) -> Result<Option<(Self, Written)>> {
        let dir = dir_of(root, disk);
        let journal = match lock_journal(&dir)? {
            Locked::Absent => return Ok(None),
            Locked::Busy => {
                return Err(Error::Busy(format!(
                    "the partial push of {disk} ({}) is in use by another receive",
                    dir.display()
                )))
            }
            Locked::Held(f) => f,
        };
        let (meta_disk, target, created) = read_meta(&dir).map_err(|e| unreadable(disk, e))?;
        if meta_disk != *disk {
            return Err(Error::invalid(format!(
                "{} describes disk {meta_disk}, not {disk}",
                dir.join(META).display()
            )));
        }
        let jpath = dir.join(JOURNAL);
        let (written, valid) = replay(&journal, &jpath, target.size)?;
        let len = journal
            .metadata()
            .ctx(|| format!("stat {}", jpath.display()))?
            .len();
        if valid < len {
            log::warn!(
                "{}: ignoring {} bytes of torn records at the end",
                jpath.display(),
                len - valid
            );
            journal
                .set_len(valid)
                .ctx(|| format!("truncate {}", jpath.display()))?;
        }
        let spath = dir.join(STAGING);
        let staging = open_rw(&spath, false).ctx(|| format!("open {}", spath.display()))?;
        let direct = open_direct(&spath);
        Ok(Some((
            Partial {
                dir,
                disk: disk.clone(),
                target,
                created,
                staging: Arc::new(staging),
                direct,
                journal,
                journal_len: valid,
                dirty: false,
                broken: false,
            },
            written,
        )))
    }

    pub fn target(&self) -> &PushTarget {
        &self.target
    }

    pub fn info(&self, written: &Written) -> PartialInfo {
        let (data_bytes, zero_bytes) = written.totals();
        PartialInfo {
            disk: self.disk.clone(),
            target: self.target.clone(),
            created: self.created,
            updated: mtime(&self.dir.join(JOURNAL)).unwrap_or(self.created),
            data_bytes,
            zero_bytes,
            in_use: true,
        }
    }

    /// The staging file: written bytes at their offsets.
    pub fn staging(&self) -> &Arc<File> {
        &self.staging
    }

    pub fn staging_path(&self) -> PathBuf {
        self.dir.join(STAGING)
    }

    /// Stage a WRITE: its bytes, then its record.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let align = DIRECT_ALIGN as u64;
        let aligned = offset % align == 0
            && data.len() as u64 % align == 0
            && (data.as_ptr() as usize) % DIRECT_ALIGN == 0;
        let mut done = false;
        if let (true, Some(direct)) = (aligned, &self.direct) {
            match direct.write_all_at(data, offset) {
                Ok(()) => done = true,
                // Some file systems accept the flag and refuse the I/O.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => {
                    return Err(Error::io(
                        format!("write {} at {offset}", self.staging_path().display()),
                        e,
                    ))
                }
            }
        }
        if !done {
            self.staging
                .write_all_at(data, offset)
                .ctx(|| format!("write {} at {offset}", self.staging_path().display()))?;
        }
        self.record(Extent::new(
            ByteRange::new(offset, data.len() as u64),
            ExtentKind::Data,
        ))
    }

    /// Record a change: one `write` of a whole record, or none.
    pub fn record(&mut self, e: Extent) -> Result<()> {
        let path = self.dir.join(JOURNAL);
        if self.broken {
            return Err(Error::invalid(format!(
                "{}: an earlier record could not be written",
                path.display()
            )));
        }
        self.dirty = true;
        let rec = encode(&e);
        // O_APPEND: the offset is the end of the file.
        match std::io::Write::write_all(&mut self.journal, &rec) {
            Ok(()) => {
                self.journal_len += RECORD as u64;
                Ok(())
            }
            Err(err) => {
                // A short record in the middle would hide every later one.
                if self.journal.set_len(self.journal_len).is_err() {
                    self.broken = true;
                }
                Err(Error::io(format!("append to {}", path.display()), err))
            }
        }
    }

    /// Make everything recorded so far survive a crash of the machine.
    pub fn sync(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        // Data before the records that point at it.
        self.staging
            .sync_data()
            .ctx(|| format!("fsync {}", self.staging_path().display()))?;
        self.journal
            .sync_data()
            .ctx(|| format!("fsync {}", self.dir.join(JOURNAL).display()))?;
        self.dirty = false;
        Ok(())
    }

    /// Delete it (after its snapshot was committed, or to start afresh).
    pub fn discard(self) -> Result<()> {
        remove_dir(&self.dir)
    }
}

/// Every partial in the repository.
pub fn list(root: &Path) -> Result<Vec<PartialInfo>> {
    let mut out = Vec::new();
    for (disk, dir) in dirs(root)? {
        let jpath = dir.join(JOURNAL);
        let journal = match File::open(&jpath) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("open {}", jpath.display()), e)),
        };
        let (_, target, created) = match read_meta(&dir) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("{}", unreadable(&disk, e));
                continue;
            }
        };
        let in_use = !flock_exclusive(&journal);
        let (written, _) = replay(&journal, &jpath, target.size)?;
        let (data_bytes, zero_bytes) = written.totals();
        out.push(PartialInfo {
            disk,
            target,
            created,
            updated: mtime(&jpath).unwrap_or(created),
            data_bytes,
            zero_bytes,
            in_use,
        });
    }
    Ok(out)
}

/// Partial directories by disk, sorted.
fn dirs(root: &Path) -> Result<Vec<(DiskName, PathBuf)>> {
    let top = partials_dir(root);
    let entries = match fs::read_dir(&top) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("list {}", top.display()), e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.ctx(|| format!("list {}", top.display()))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().to_string());
        match name.as_deref().and_then(disk_of) {
            Some(disk) => out.push((disk, path)),
            None => log::warn!("ignoring unexpected {}", path.display()),
        }
    }
    out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    Ok(out)
}

/// Remove the partial of `disk`, also an unreadable one; describe what
/// was removed, `None` if there was none.
pub fn remove(root: &Path, disk: &DiskName) -> Result<Option<String>> {
    let dir = dir_of(root, disk);
    let journal = match lock_journal(&dir)? {
        Locked::Absent => return Ok(None),
        Locked::Busy => {
            return Err(Error::Busy(format!(
                "the partial push of {disk} is in use by a running receive"
            )))
        }
        Locked::Held(f) => f,
    };
    let what = match read_meta(&dir) {
        Ok((_, target, created)) => {
            let jpath = dir.join(JOURNAL);
            let (written, _) = replay(&journal, &jpath, target.size)?;
            let (data_bytes, zero_bytes) = written.totals();
            PartialInfo {
                disk: disk.clone(),
                target,
                created,
                updated: mtime(&jpath).unwrap_or(created),
                data_bytes,
                zero_bytes,
                in_use: false,
            }
            .describe()
        }
        Err(e) => format!("unreadable partial push of {disk} ({e})"),
    };
    remove_dir(&dir)?;
    Ok(Some(what))
}

/// gc's part: remove partials not written to since before `older_than`
/// and not in use. Returns what was removed.
pub fn sweep(root: &Path, older_than: DateTime<Utc>) -> Result<Vec<PartialInfo>> {
    let mut removed = Vec::new();
    for (disk, dir) in dirs(root)? {
        let journal = match lock_journal(&dir)? {
            Locked::Held(f) => f,
            Locked::Absent | Locked::Busy => continue,
        };
        let jpath = dir.join(JOURNAL);
        let updated = mtime(&jpath).unwrap_or_else(Utc::now);
        if updated >= older_than {
            continue;
        }
        // Described before it goes; an unreadable description does not
        // keep an abandoned partial alive.
        let info = read_meta(&dir).ok().map(|(_, target, created)| {
            let (written, _) = replay(&journal, &jpath, target.size).unwrap_or_default();
            let (data_bytes, zero_bytes) = written.totals();
            PartialInfo {
                disk: disk.clone(),
                target,
                created,
                updated,
                data_bytes,
                zero_bytes,
                in_use: false,
            }
        });
        remove_dir(&dir)?;
        if let Some(info) = info {
            removed.push(info);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> PushTarget {
        PushTarget {
            kind: SnapshotKind::Full,
            parent: None,
            size: 1 << 20,
        }
    }

    #[test]
    fn journal_replays_and_ignores_a_torn_tail() {
        let root = tempfile::tempdir().unwrap();
        let disk = DiskName::parse("vm/vda").unwrap();
        let mut p = Partial::create(root.path(), &disk, &target()).unwrap();
        p.write(0, &[7u8; 4096]).unwrap();
        p.record(Extent::new(ByteRange::new(1024, 1024), ExtentKind::Zero))
            .unwrap();
        p.sync().unwrap();
        assert!(
            Partial::open(root.path(), &disk).is_err(),
            "a held partial is busy"
        );
        drop(p);
        // A torn record: half of one, as a crash mid-append could leave.
        let jpath = dir_of(root.path(), &disk).join(JOURNAL);
        let mut half = encode(&Extent::new(ByteRange::new(0, 8192), ExtentKind::Data)).to_vec();
        half.truncate(20);
        let mut body = fs::read(&jpath).unwrap();
        body.extend_from_slice(&half);
        fs::write(&jpath, body).unwrap();

        let (mut p, written) = Partial::open(root.path(), &disk).unwrap().unwrap();
        assert_eq!(written.totals(), (3072, 1024));
        assert_eq!(p.target(), &target());
        assert_eq!(fs::metadata(&jpath).unwrap().len(), 2 * RECORD as u64);
        // Appends after the cut are replayed.
        p.write(8192, &[1u8; 100]).unwrap();
        drop(p);
        let listed = list(root.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].data_bytes, listed[0].zero_bytes), (3172, 1024));
        assert!(!listed[0].in_use);

        // gc keeps a fresh one and removes an old one.
        let yesterday = Utc::now() - chrono::Duration::days(1);
        assert!(sweep(root.path(), yesterday).unwrap().is_empty());
        let tomorrow = Utc::now() + chrono::Duration::days(1);
        assert_eq!(sweep(root.path(), tomorrow).unwrap().len(), 1);
        assert!(list(root.path()).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_record_ends_the_replay() {
        let r = encode(&Extent::new(ByteRange::new(4096, 512), ExtentKind::Data));
        assert!(decode(&r, 1 << 20).is_some());
        assert!(decode(&r, 4096).is_none(), "outside the disk");
        let mut bad = r;
        bad[10] ^= 1;
        assert!(decode(&bad, 1 << 20).is_none());
        assert!(decode(&[0u8; RECORD], 1 << 20).is_none(), "zeroes");
    }

    #[test]
    fn an_unreadable_partial_is_refused_and_removable() {
        let root = tempfile::tempdir().unwrap();
        let disk = DiskName::parse("d").unwrap();
        drop(Partial::create(root.path(), &disk, &target()).unwrap());
        fs::write(dir_of(root.path(), &disk).join(META), b"{").unwrap();
        let err = Partial::open(root.path(), &disk).unwrap_err().to_string();
        assert!(err.contains("strata forget --partial d"), "{err}");
        assert!(list(root.path()).unwrap().is_empty());
        let what = remove(root.path(), &disk).unwrap().unwrap();
        assert!(what.contains("unreadable"), "{what}");
        assert!(remove(root.path(), &disk).unwrap().is_none());
    }

    #[test]
    fn encrypted_repositories_keep_partials_outside() {
        let dir = tempfile::tempdir().unwrap();
        let plain = Repository::init(&dir.path().join("plain"), None).unwrap();
        assert_eq!(home(&plain), plain.home());
        let enc = Repository::init(&dir.path().join("enc"), Some("pass")).unwrap();
        assert!(!partials_dir(&home(&enc)).starts_with(enc.home()));
    }

    #[test]
    fn an_interrupted_creation_is_cleared() {
        let root = tempfile::tempdir().unwrap();
        let disk = DiskName::parse("d").unwrap();
        let dir = dir_of(root.path(), &disk);
        mkdir_private(&dir).unwrap();
        fs::write(dir.join(META), b"{").unwrap();
        assert!(Partial::open(root.path(), &disk).unwrap().is_none());
        assert!(!dir.exists());
        assert_eq!(disk_of("vm1+vda").unwrap().as_str(), "vm1/vda");
    }
}
