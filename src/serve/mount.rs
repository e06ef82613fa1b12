//! Mount lifecycle: serve [`ImageFs`] at a mount point until unmounted or
//! signalled, find and clear strata mounts, and recognize stale ones.
//!
//! A mount is named `strata:<pid>` in `/proc/self/mountinfo`, so that
//! `umount` can find the serving process and wait for it to finish.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, MountOption, Session, SessionACL};

use crate::error::{Error, IoContext, Result};
use crate::serve::fusefs::ImageFs;
use crate::store::lock::{Activity, Registration};
use crate::store::pins::PinDir;
use crate::store::repo::Repository;

#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    /// Let other users read the images (FUSE `allow_other`).
    pub allow_other: bool,
    /// More read-only files to show beside the images.
    pub extra_files: Option<ExtraFiles>,
}

/// A read-only file the mount shows besides the images, at `path`
/// (relative to the mount point, e.g. `vm1/ID.xml`).
pub struct ExtraFile {
    pub path: String,
    pub body: Vec<u8>,
    pub time: std::time::SystemTime,
}

/// Lists the extra files; called again whenever the catalog changed, so
/// what it lists must only change when the catalog does.
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct ExtraFiles(pub Arc<dyn Fn(&Repository) -> Vec<ExtraFile> + Send + Sync>);

impl std::fmt::Debug for ExtraFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraFiles")
    }
}

/// Check that `mnt` is a directory we can mount on: not a live mount, and
/// not a stale one left by a killed process.
pub fn check_mountpoint(mnt: &Path) -> Result<()> {
    match std::fs::metadata(mnt) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Err(Error::invalid(format!(
            "{} is a stale mount left by a killed strata process; clear it with: strata umount {}",
            mnt.display(),
            mnt.display()
        ))),
        Err(e) => Err(Error::io(format!("mount point {}", mnt.display()), e)),
        Ok(m) if !m.is_dir() => Err(Error::invalid(format!(
            "mount point {} is not a directory; mount onto an empty directory",
            mnt.display()
        ))),
        Ok(_) => match find_mount(mnt)? {
            Some(m) => Err(Error::invalid(format!(
                "{} is already mounted ({}); unmount it first with: strata umount {}",
                mnt.display(),
                m.source,
                mnt.display()
            ))),
            None => Ok(()),
        },
    }
}

/// Serve buffers of 4 MiB and more from their own mappings, returned to
/// the system when freed. glibc otherwise raises its threshold to the
/// largest buffer freed so far, and a mount of object storage frees a
/// window of up to 12 MiB per request: those then come from the heap,
/// which fragments and keeps what it holds (peak RSS of a cold read of a
/// 1 GiB image flattened from 10 snapshots: 246-266 MiB; with this,
/// 216-235 MiB, for ~0.4 s more of page faults per GiB read).
fn fixed_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt changes an allocator setting; glibc serializes it.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// Mount and serve until unmounted or until SIGINT/SIGTERM/SIGHUP, which
/// unmount cleanly. `ready` runs once the mount is in place.
pub fn serve(
    repo: Repository,
    mnt: &Path,
    opts: &MountOptions,
    ready: impl FnOnce(),
) -> Result<()> {
    check_mountpoint(mnt)?;
    let mnt = mnt
        .canonicalize()
        .ctx(|| format!("mount point {}", mnt.display()))?;
    let registration = Registration::with_mountpoint(
        &repo,
        Activity::Mount,
        &format!("mount {}", mnt.display()),
        Some(mnt.display().to_string()),
    )?;
    // Block the signals before any thread starts, so that every thread
    // inherits the mask and only the signal thread below receives them.
    let signals = block_signals()?;
    let pins = PinDir::create(&repo, &registration)?;
    // A mount reads the same chunks again: keep them in this host's cache.
    repo.chunks().keep_reads(true);
    repo.chunks().prepare_reads()?;
    if repo.is_remote() {
        fixed_mmap_threshold();
    }
    let fs = ImageFs::new(Arc::new(repo), pins, opts.extra_files.clone())?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
        MountOption::FSName(format!("strata:{}", std::process::id())),
        MountOption::Subtype("strata".into()),
    ];
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2),
    );
    config.clone_fd = true;
    let mut session = Session::new(fs, &mnt, &config).ctx(|| format!("mount {}", mnt.display()))?;
    let mut unmounter = session.unmount_callable();
    raise_read_ahead(&mnt);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: sigwait on a set we built; the signals are blocked.
            unsafe { libc::sigwait(&signals, &mut sig) };
            log::info!("signal {sig}: unmounting");
            if let Err(e) = unmounter.unmount() {
                log::error!("unmount: {e}");
            }
        })
        .ctx(|| "spawn signal thread".into())?;
    ready();
    session.run().ctx(|| format!("serve {}", mnt.display()))?;
    Ok(())
}

/// The kernel gives a FUSE mount 128 KiB of read-ahead; sequential reads of
/// images go faster with more. Only root may change it, so this is best effort.
fn raise_read_ahead(mnt: &Path) {
    const READ_AHEAD_KB: &str = "1024";
    if let Ok(Some(entry)) = find_mount(mnt) {
        let knob = Path::new("/sys/class/bdi")
            .join(&entry.device)
            .join("read_ahead_kb");
        if let Err(e) = std::fs::write(&knob, READ_AHEAD_KB) {
            log::info!("cannot raise read-ahead ({}): {e}", knob.display());
        }
    }
}

fn block_signals() -> Result<libc::sigset_t> {
    // SAFETY: plain libc signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(Error::io(
                "pthread_sigmask",
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(set)
    }
}

/// A strata mount as listed in mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    /// `major:minor`, which names the mount's bdi in /sys/class/bdi.
    pub device: String,
    pub source: String,
    /// The serving process, from the `strata:<pid>` source name.
    pub pid: Option<i32>,
}

/// The strata mount at `mnt`, if any (live or stale).
pub fn find_mount(mnt: &Path) -> Result<Option<MountEntry>> {
    let want = absolute(mnt);
    let info = std::fs::read_to_string("/proc/self/mountinfo").ctx(|| "read mountinfo".into())?;
    for line in info.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(point), Some(fstype), Some(source)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 2))
        else {
            continue;
        };
        if !fstype.starts_with("fuse") || !source.starts_with("strata:") {
            continue;
        }
        let point = PathBuf::from(unescape(point));
        if point == want {
            return Ok(Some(MountEntry {
                device: fields.get(2).unwrap_or(&"").to_string(),
                pid: source.trim_start_matches("strata:").parse().ok(),
                source: source.to_string(),
                mountpoint: point,
            }));
        }
    }
    Ok(None)
}

/// The path without following a mount that may be stale.
fn absolute(p: &Path) -> PathBuf {
    let parent = p
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match (parent.canonicalize(), p.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => p.to_path_buf(),
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How an unmount went.
#[derive(Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// Gone, and the serving process has exited.
    Clean,
    /// Files were still open: detached from the tree; the serving process
    /// ends when the last one is closed.
    Detached,
}

/// Unmount the strata mount at `mnt` (live or stale).
pub fn unmount(mnt: &Path) -> Result<Unmounted> {
    let Some(entry) = find_mount(mnt)? else {
        return Err(Error::invalid(format!(
            "{} is not a strata mount (strata mounts are listed in /proc/mounts as strata:PID)",
            mnt.display()
        )));
    };
    let pidfd = entry.pid.and_then(pidfd_open);
    let path = std::ffi::CString::new(entry.mountpoint.as_os_str().as_bytes())
        .map_err(|_| Error::invalid("mount point contains a NUL byte"))?;
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
        if let Some(fd) = pidfd {
            wait_for_exit(fd);
        }
        return Ok(Unmounted::Clean);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EBUSY) {
        return Err(Error::io(format!("unmount {}", mnt.display()), err));
    }
    // SAFETY: as above.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(Error::io(
            format!("unmount {}", mnt.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(Unmounted::Detached)
}

fn pidfd_open(pid: i32) -> Option<i32> {
    // SAFETY: the pidfd_open syscall takes a pid and flags.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0).then_some(fd as i32)
}

/// Wait (at most 30 s) until the process behind `pidfd` has exited.
fn wait_for_exit(pidfd: i32) {
    let mut pfd = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, then close the descriptor we own.
    unsafe {
        libc::poll(&mut pfd, 1, 30_000);
        libc::close(pidfd);
    }
}

/// Print `ready` for the parent of a background mount, then let go of the
/// terminal: stdout and stderr go to /dev/null from here on.
pub fn detach_from_parent() {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::unix::io::AsRawFd;
        // SAFETY: dup2 onto the standard descriptors.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"\134"), "\\");
    }
}
