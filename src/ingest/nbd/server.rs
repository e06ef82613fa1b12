//! `strata receive`: an NBD server that QEMU's `blockdev-backup` pushes
//! into. Every write lands in the staging file of a *partial* push under
//! `<repo>/partial/` and its record in the partial's journal before it is
//! acknowledged; FLUSH syncs both (see `store::partial`). A map of written
//! and zeroed ranges records it all; READ answers with the image as written
//! so far, over the parent's for an incremental. Complete chunk cells are
//! chunked while the push goes on (`cells.rs`). The first connection that
//! changed something and then sent NBD_CMD_DISC is committed through the
//! ordinary backup pipeline, and the partial removed. A connection that
//! drops leaves the partial for a retry (QEMU's `bitmap-mode: always` sends
//! only what was not acknowledged); one that only reads or asks questions
//! changes nothing.

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::cells::{Cells, Change};
use super::wire::*;
use super::{Endpoint, NbdUri, Stream};
use crate::error::{Error, IoContext, Result};
use crate::ingest::backup::{backup_with, BackupOptions};
use crate::ingest::changes::ChangeList;
use crate::ingest::source::Source;
use crate::model::extent::{ByteRange, Extent, ExtentKind};
use crate::model::image_map::ImageMap;
use crate::model::name::{DiskName, Selector, SnapshotRef};
use crate::model::snapshot::{SnapshotInfo, SnapshotKind};
use crate::model::written::Written;
use crate::store::image::{self, ChunkCache};
use crate::store::lock::{Activity, Registration};
use crate::store::partial::{self, Partial, PartialInfo, PushTarget, DIRECT_ALIGN};
use crate::store::repo::Repository;

#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    pub disk: Option<DiskName>,
    /// Export size of a full receive.
    pub size: Option<u64>,
    /// Receive an incremental on top of `parent` (default: the latest).
    pub incremental: bool,
    pub parent: Option<SnapshotRef>,
    pub differential: bool,
    pub label: String,
    pub checkpoint: Option<String>,
    pub bitmap: Option<String>,
    /// Survive a dropped writer and wait for the next connection.
    pub keep_listening: bool,
    /// Discard a partial push of the disk instead of resuming it.
    pub no_resume: bool,
}

/// What became of a partial push found at the start.
#[derive(Debug, Clone)]
pub enum Resumption {
    /// None was there.
    Fresh,
    /// It is resumed: the export reads as the parent with it over.
    Resumed(PartialInfo),
    /// `--no-resume` removed it (described; it may have been unreadable).
    Discarded(String),
}

/// What a receive has gathered: the partial (made at the first change) and
/// the written map.
struct Staging {
    root: PathBuf,
    disk: DiskName,
    target: PushTarget,
    partial: Option<Partial>,
    written: Written,
    /// What the commit reads from the staging file: the written ranges
    /// without the cells chunked as they arrived.
    plan: Vec<Extent>,
}

impl Staging {
    fn size(&self) -> u64 {
        self.target.size
    }

    /// The partial, created at the first change.
    fn partial(&mut self) -> Result<&mut Partial> {
        if self.partial.is_none() {
            self.partial = Some(Partial::create(&self.root, &self.disk, &self.target)?);
        }
        Ok(self.partial.as_mut().expect("just made"))
    }

    /// A WRITE: staged and recorded before it is acknowledged.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.partial()?.write(offset, data)?;
        self.written
            .insert(ByteRange::new(offset, data.len() as u64), ExtentKind::Data);
        Ok(())
    }

    /// A WRITE_ZEROES or TRIM: recorded before it is acknowledged.
    fn zero(&mut self, range: ByteRange) -> Result<()> {
        self.partial()?
            .record(Extent::new(range, ExtentKind::Zero))?;
        self.written.insert(range, ExtentKind::Zero);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        match &mut self.partial {
            Some(p) => p.sync(),
            None => Ok(()),
        }
    }
}

/// The staging file as a backup source: what was written, nothing else.
impl Source for Staging {
    fn describe(&self) -> String {
        "the NBD client's writes".into()
    }
    fn size(&self) -> u64 {
        self.target.size
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.partial {
            Some(p) => p
                .staging()
                .read_exact_at(buf, offset)
                .ctx(|| format!("read {}", p.staging_path().display())),
            // Nothing was written: the plan is empty.
            None => Err(Error::Nbd("no staging file to read".into())),
        }
    }
    fn allocation(&self) -> Result<Vec<Extent>> {
        Ok(self.plan.clone())
    }
    fn reads_anywhere(&self) -> bool {
        false
    }
}

/// QEMU pushes only what its bitmap marks dirty: an incremental on a parent
/// with damaged ranges would inherit the damage. Refused before anything is
/// written, so the job fails at once instead of after the copy.
fn refuse_damaged_parent(repo: &Repository, parent: &SnapshotInfo, map: &ImageMap) -> Result<()> {
    let damaged = repo.damaged_ranges(map)?;
    match damaged.first() {
        None => Ok(()),
        Some(first) => Err(Error::invalid(format!(
            "the parent {} has damaged ranges ({} bytes, the first at {}+{}): an incremental \
             push onto it would inherit them; push a full backup instead (receive without \
             --incremental, blockdev-backup with sync=full)",
            parent.reference(),
            damaged.iter().map(|r| r.length).sum::<u64>(),
            first.offset,
            first.length
        ))),
    }
}

enum Outcome {
    /// Clean disconnect after at least one change.
    Commit,
    /// Read or queried only: nothing to do.
    Untouched,
    /// Changed something, then vanished or misbehaved.
    Dropped(String),
}

/// The partial push of `disk` this receive continues, if any: resumed when
/// it matches `target`, discarded with `no_resume`, refused otherwise.
fn take_partial(
    root: &Path,
    disk: &DiskName,
    target: &PushTarget,
    no_resume: bool,
) -> Result<(Option<Partial>, Written, Resumption)> {
    if no_resume {
        let r = match partial::remove(root, disk)? {
            Some(what) => Resumption::Discarded(what),
            None => Resumption::Fresh,
        };
        return Ok((None, Written::default(), r));
    }
    let Some((partial, written)) = Partial::open(root, disk)? else {
        return Ok((None, Written::default(), Resumption::Fresh));
    };
    let info = partial.info(&written);
    if partial.target() != target {
        return Err(Error::invalid(format!(
            "there is a {} that does not match this receive ({target}); \
             receive with the options it was started with to resume it, or discard it \
             with `strata forget --partial {disk}` (or `receive --no-resume`)",
            info.describe()
        )));
    }
    Ok((Some(partial), written, Resumption::Resumed(info)))
}

/// Serve `listen` until a writer disconnects cleanly, then commit its
/// snapshot. `ready` is called once the socket is listening, with what
/// became of a partial push found there.
pub fn receive(
    repo: &Repository,
    listen: &NbdUri,
    opts: &ReceiveOptions,
    ready: impl FnOnce(&Resumption),
) -> Result<SnapshotInfo> {
    let disk = opts
        .disk
        .clone()
        .ok_or_else(|| Error::invalid("a disk name is required"))?;
    let _registration = Registration::new(repo, Activity::Receive, &format!("receive {disk}"))?;
    let parent = if opts.incremental {
        let r = opts.parent.clone().unwrap_or(SnapshotRef {
            disk: disk.clone(),
            selector: Selector::Latest,
        });
        Some(repo.resolve(&r)?)
    } else {
        if opts.parent.is_some() || opts.differential {
            return Err(Error::invalid(
                "--parent and --differential need --incremental",
            ));
        }
        None
    };
    let size = match (&parent, opts.size) {
        (Some(p), None) => p.size,
        (Some(p), Some(s)) if s == p.size => s,
        (Some(p), Some(s)) => {
            return Err(Error::invalid(format!(
                "--size {s} differs from the parent's size {}; an incremental export has the parent's size",
                p.size
            )))
        }
        (None, Some(s)) if s > 0 => s,
        (None, _) => return Err(Error::invalid("a full receive needs --size BYTES")),
    };
    let target = PushTarget {
        kind: match (&parent, opts.differential) {
            (None, _) => SnapshotKind::Full,
            (Some(_), false) => SnapshotKind::Incremental,
            (Some(_), true) => SnapshotKind::Differential,
        },
        parent: parent.as_ref().map(|p| p.id.clone()),
        size,
    };
    let base = parent.as_ref().map(|p| repo.image_map(p)).transpose()?;
    if let (Some(p), Some(map)) = (&parent, &base) {
        refuse_damaged_parent(repo, p, map)?;
    }
    let home = partial::home(repo);
    let (partial, written, resumption) = take_partial(&home, &disk, &target, opts.no_resume)?;
    let mut staging = Staging {
        root: home,
        disk: disk.clone(),
        target,
        partial,
        written,
        plan: Vec::new(),
    };
    let listener = Listener::bind(&listen.endpoint)?;
    ready(&resumption);
    loop {
        let stream = listener.accept()?;
        let (outcome, pre) = std::thread::scope(|s| {
            let mut cells = Cells::start(s, repo, size);
            let outcome = Connection {
                repo,
                staging: &mut staging,
                cells: &mut cells,
                base: base.as_ref(),
                cache: ChunkCache::new(16 << 20),
                changed: false,
                failed: false,
            }
            .serve(stream);
            let pre = match outcome {
                Outcome::Commit => Some(
                    cells
                        .finish()
                        .map(|pre| (pre, cells.remaining(staging.written.extents()))),
                ),
                _ => None,
            };
            (outcome, pre)
        });
        let kept = || match &staging.partial {
            Some(p) => format!(
                "; what was written is kept as a {} (`strata partials`): \
                 the next receive of {disk} with the same options resumes it",
                p.info(&staging.written).describe()
            ),
            None => String::new(),
        };
        match outcome {
            Outcome::Untouched => continue,
            Outcome::Dropped(why) if opts.keep_listening => {
                log::warn!(
                    "{why}; nothing committed{}; waiting for the next connection",
                    kept()
                );
                continue;
            }
            Outcome::Dropped(why) => {
                return Err(Error::Nbd(format!("{why}; nothing committed{}", kept())))
            }
            Outcome::Commit => {
                let (pre, plan) = pre.expect("finished on commit")?;
                staging.plan = plan;
                let changes = parent.as_ref().map(|_| ChangeList {
                    origin: "the NBD client's writes".into(),
                    size: Some(size),
                    extents: staging.plan.clone(),
                });
                let bopts = BackupOptions {
                    disk: Some(disk.clone()),
                    changes,
                    parent: parent.as_ref().map(|p| SnapshotRef {
                        disk: disk.clone(),
                        selector: Selector::Id(p.id.clone()),
                    }),
                    differential: opts.differential,
                    label: opts.label.clone(),
                    checkpoint: opts.checkpoint.clone(),
                    bitmap: opts.bitmap.clone(),
                    time: None,
                    // Unwritten ranges are not in the staging file to compare.
                    check_unchanged: 0.0,
                };
                // If the commit fails the partial stays: the client was told
                // its writes are stored.
                let info = backup_with(repo, &staging, &bopts, pre)?;
                if let Some(p) = staging.partial.take() {
                    if let Err(e) = p.discard() {
                        log::warn!(
                            "{} is committed; removing its partial push: {e}",
                            info.reference()
                        );
                    }
                }
                return Ok(info);
            }
        }
    }
}

/// Where in `buf` a `DIRECT_ALIGN`ed run of `len` bytes starts, growing
/// `buf` as needed (never shrunk: a WRITE payload arrives in it each time).
fn aligned_start(buf: &mut Vec<u8>, len: usize) -> usize {
    if buf.len() < len + DIRECT_ALIGN {
        buf.resize(len + DIRECT_ALIGN, 0);
    }
    buf.as_ptr().align_offset(DIRECT_ALIGN)
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(std::net::TcpListener),
}

impl Listener {
    fn bind(ep: &Endpoint) -> Result<Self> {
        match ep {
            Endpoint::Unix(path) => {
                // A socket file left by an earlier run: replace it, but never
                // another kind of file.
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_socket() {
                        return Err(Error::invalid(format!(
                            "{} exists and is not a socket",
                            path.display()
                        )));
                    }
                    std::fs::remove_file(path).ctx(|| format!("remove {}", path.display()))?;
                }
                let l = UnixListener::bind(path).ctx(|| format!("listen on {}", path.display()))?;
                Ok(Listener::Unix(l, path.clone()))
            }
            Endpoint::Tcp { host, port } => {
                let l = std::net::TcpListener::bind((host.as_str(), *port))
                    .ctx(|| format!("listen on {host}:{port}"))?;
                Ok(Listener::Tcp(l))
            }
        }
    }

    fn accept(&self) -> Result<Stream> {
        match self {
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept().ctx(|| "accept".into())?.0)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept().ctx(|| "accept".into())?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

struct Connection<'a, 'c> {
    repo: &'a Repository,
    staging: &'c mut Staging,
    cells: &'c mut Cells,
    base: Option<&'a ImageMap>,
    cache: ChunkCache,
    changed: bool,
    /// A write could not be stored: never commit this connection.
    failed: bool,
}

impl Connection<'_, '_> {
    fn serve(&mut self, stream: Stream) -> Outcome {
        let reader = match &stream {
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
        };
        let Ok(reader) = reader else {
            return Outcome::Untouched;
        };
        let mut r = BufReader::with_capacity(256 << 10, reader);
        let mut w = BufWriter::with_capacity(256 << 10, stream);
        let result = self.handshake(&mut r, &mut w).and_then(|go| {
            if go {
                self.transmission(&mut r, &mut w)
            } else {
                Ok(false)
            }
        });
        match result {
            Ok(true) if self.failed => {
                Outcome::Dropped("a write could not be stored (answered EIO)".into())
            }
            Ok(true) if self.changed => Outcome::Commit,
            Ok(_) if !self.changed => Outcome::Untouched,
            Ok(_) => Outcome::Dropped("the client went away without NBD_CMD_DISC".into()),
            Err(e) if self.changed => {
                Outcome::Dropped(format!("the writing client's connection failed: {e}"))
            }
            Err(e) => {
                log::info!("connection ended: {e}");
                Outcome::Untouched
            }
        }
    }

    fn flags(&self) -> u16 {
        TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
    }

    /// Options until an export is chosen (true) or the client leaves (false).
    fn handshake(&mut self, r: &mut impl Read, w: &mut impl Write) -> std::io::Result<bool> {
        w.write_all(&NBDMAGIC.to_be_bytes())?;
        w.write_all(&IHAVEOPT.to_be_bytes())?;
        w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        w.flush()?;
        let client_flags = u32_be(r)?;
        let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
        loop {
            if u64_be(r)? != IHAVEOPT {
                return Err(std::io::Error::other("bad option magic"));
            }
            let opt = u32_be(r)?;
            let len = u32_be(r)?;
            if len > MAX_OPTION {
                return Err(std::io::Error::other("option too long"));
            }
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data)?;
            match opt {
                OPT_EXPORT_NAME => {
                    w.write_all(&self.staging.size().to_be_bytes())?;
                    w.write_all(&self.flags().to_be_bytes())?;
                    if !no_zeroes {
                        w.write_all(&[0u8; 124])?;
                    }
                    w.flush()?;
                    return Ok(true);
                }
                OPT_GO | OPT_INFO => {
                    let mut info = Vec::new();
                    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    info.extend_from_slice(&self.staging.size().to_be_bytes());
                    info.extend_from_slice(&self.flags().to_be_bytes());
                    write_option_reply(w, opt, REP_INFO, &info)?;
                    if wants_block_size(&data) {
                        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        bs.extend_from_slice(&1u32.to_be_bytes());
                        bs.extend_from_slice(&(64u32 << 10).to_be_bytes());
                        bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                        write_option_reply(w, opt, REP_INFO, &bs)?;
                    }
                    write_option_reply(w, opt, REP_ACK, &[])?;
                    w.flush()?;
                    if opt == OPT_GO {
                        return Ok(true);
                    }
                }
                OPT_LIST => {
                    let mut name = Vec::new();
                    put_str(&mut name, "");
                    write_option_reply(w, opt, REP_SERVER, &name)?;
                    write_option_reply(w, opt, REP_ACK, &[])?;
                    w.flush()?;
                }
                OPT_ABORT => {
                    write_option_reply(w, opt, REP_ACK, &[])?;
                    w.flush()?;
                    return Ok(false);
                }
                _ => {
                    // Structured replies and meta contexts are not offered:
                    // simple replies serve every client.
                    write_option_reply(w, opt, REP_ERR_UNSUP, &[])?;
                    w.flush()?;
                }
            }
        }
    }

    /// Requests until NBD_CMD_DISC (true) or the end of the stream.
    fn transmission(
        &mut self,
        r: &mut BufReader<Stream>,
        w: &mut impl Write,
    ) -> std::io::Result<bool> {
        let mut buf = Vec::new();
        let mut payload = Vec::new();
        loop {
            let req = match Request::read_from(r) {
                Ok(Some(req)) => req,
                Ok(None) => return Err(std::io::Error::other("bad request magic")),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(e),
            };
            let size = self.staging.size();
            let in_range = req
                .offset
                .checked_add(u64::from(req.length))
                .is_some_and(|end| end <= size);
            match req.kind {
                CMD_DISC => {
                    w.flush()?;
                    return Ok(true);
                }
                CMD_READ => {
                    if !in_range || req.length > MAX_PAYLOAD {
                        // An error reply to READ carries no data.
                        write_simple_reply(w, EINVAL, req.cookie, &[])?;
                    } else {
                        buf.resize(req.length as usize, 0);
                        let range = ByteRange::new(req.offset, req.length.into());
                        match self.read(range, &mut buf) {
                            Ok(()) => write_simple_reply(w, 0, req.cookie, &buf)?,
                            Err(e) => {
                                log::error!("READ: {e}");
                                write_simple_reply(w, EIO, req.cookie, &[])?;
                            }
                        }
                    }
                }
                CMD_WRITE => {
                    if req.length > MAX_PAYLOAD {
                        write_simple_reply(w, EINVAL, req.cookie, &[])?;
                        w.flush()?;
                        return Err(std::io::Error::other("WRITE payload too large"));
                    }
                    // Aligned, so that the staging file can take it with O_DIRECT.
                    let len = req.length as usize;
                    let at = aligned_start(&mut payload, len);
                    let data = &mut payload[at..at + len];
                    r.read_exact(data)?;
                    let e = if !in_range {
                        ENOSPC
                    } else {
                        self.changed = true;
                        let range = ByteRange::new(req.offset, req.length.into());
                        let stored = self.staging.write(req.offset, data).and_then(|()| {
                            self.cells
                                .changed(range, Change::Data(data), &self.staging.written)
                        });
                        self.reply_code("WRITE", stored)
                    };
                    write_simple_reply(w, e, req.cookie, &[])?;
                }
                CMD_WRITE_ZEROES | CMD_TRIM => {
                    let e = if !in_range {
                        ENOSPC
                    } else {
                        self.changed = true;
                        let range = ByteRange::new(req.offset, req.length.into());
                        let stored = if range.is_empty() {
                            Ok(())
                        } else {
                            self.staging.zero(range).and_then(|()| {
                                self.cells
                                    .changed(range, Change::Zero, &self.staging.written)
                            })
                        };
                        self.reply_code("WRITE_ZEROES/TRIM", stored)
                    };
                    write_simple_reply(w, e, req.cookie, &[])?;
                }
                // QEMU counts everything acknowledged before an acknowledged
                // FLUSH as safe from a crash of the machine.
                CMD_FLUSH => {
                    self.changed = true;
                    let started = std::time::Instant::now();
                    let synced = self.staging.flush();
                    log::debug!("FLUSH synced the partial push in {:?}", started.elapsed());
                    let e = self.reply_code("FLUSH", synced);
                    write_simple_reply(w, e, req.cookie, &[])?;
                }
                CMD_CACHE => write_simple_reply(w, 0, req.cookie, &[])?,
                _ => write_simple_reply(w, EINVAL, req.cookie, &[])?,
            }
            // Answer now unless more requests are already waiting: QEMU keeps
            // many in flight, and one flush for a batch saves syscalls.
            if r.buffer().is_empty() {
                w.flush()?;
            }
        }
    }

    /// The NBD error for a change that was (not) stored; a connection with
    /// one failed change is never committed.
    fn reply_code(&mut self, what: &str, stored: Result<()>) -> u32 {
        match stored {
            Ok(()) => 0,
            Err(e) => {
                log::error!("{what}: {e}");
                self.failed = true;
                EIO
            }
        }
    }

    /// The image as written so far: the parent (or zeroes), then the writes.
    fn read(&self, range: ByteRange, buf: &mut [u8]) -> Result<()> {
        match self.base {
            Some(map) => {
                image::read_at(map, self.repo.chunks(), &self.cache, buf, range.offset)?;
            }
            None => buf.fill(0),
        }
        for (r, kind) in self.staging.written.within(range) {
            let out =
                &mut buf[(r.offset - range.offset) as usize..(r.end() - range.offset) as usize];
            match kind {
                ExtentKind::Zero => out.fill(0),
                ExtentKind::Data => self.staging.read_exact_at(out, r.offset)?,
            }
        }
        Ok(())
    }
}

/// Whether an OPT_GO/OPT_INFO payload asks for NBD_INFO_BLOCK_SIZE.
fn wants_block_size(data: &[u8]) -> bool {
    let Some(name_len) = data
        .get(..4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4")) as usize)
    else {
        return false;
    };
    let Some(rest) = data.get(4 + name_len..) else {
        return false;
    };
    let n = rest
        .get(..2)
        .map_or(0, |b| u16::from_be_bytes(b.try_into().expect("2")) as usize);
    (0..n).any(|i| {
        rest.get(2 + 2 * i..4 + 2 * i)
            .is_some_and(|b| u16::from_be_bytes(b.try_into().expect("2")) == INFO_BLOCK_SIZE)
    })
}
