//! Reading snapshots back: `restore`, `mount`, `umount`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use strata::model::name::SnapshotRef;
use strata::serve::mount::{self as fuse_mount, MountOptions, Unmounted};

use super::{done_event, open, started_event, Cli};
use strata::store::backend::Location;

#[derive(Args)]
pub struct RestoreArgs {
    /// DISK@ID or DISK@latest (with --domain: PREFIX@ID of a domain run).
    snapshot: String,
    /// File (written sparse; an existing one is replaced) or block device;
    /// with --domain, a directory.
    target: PathBuf,
    /// Restore every disk of a domain run into the directory TARGET, as
    /// TARGET/DEV.raw, and write TARGET/PREFIX.xml, the domain XML with
    /// its disks pointing at those files.
    #[arg(long)]
    domain: bool,
}

#[derive(Args)]
pub struct MountArgs {
    /// An existing, empty directory.
    mountpoint: PathBuf,
    /// Stay attached instead of returning once the mount is ready.
    #[arg(long)]
    foreground: bool,
    /// Let other users read the images.
    #[arg(long)]
    allow_other: bool,
}

/// Set (to 1) by `strata mount` on the server it starts in the background.
/// An environment variable rather than a hidden flag, because completion
/// scripts would offer a hidden flag.
const DAEMON_CHILD_ENV: &str = "STRATA_MOUNT_DAEMON_CHILD";

#[derive(Args)]
pub struct UmountArgs {
    /// Where the repository is mounted.
    mountpoint: PathBuf,
}

pub fn restore(cli: &Cli, a: &RestoreArgs) -> Result<ExitCode> {
    started_event(
        "restore",
        json!({"snapshot": a.snapshot, "target": a.target}),
    );
    if a.domain {
        return super::domain::restore(cli, &a.snapshot, &a.target);
    }
    let repo = open(cli)?;
    let info = repo.resolve(&SnapshotRef::parse(&a.snapshot)?)?;
    let restored = strata::serve::restore::restore(&repo, &info, &a.target)
        .with_context(|| format!("restore {} to {}", info.reference(), a.target.display()))?;
    let damaged: Vec<[u64; 2]> = restored
        .damaged
        .iter()
        .map(|r| [r.offset, r.length])
        .collect();
    done_event(
        "restore",
        json!({"snapshot": info.reference(), "target": a.target, "size": info.size,
               "ok": damaged.is_empty(), "damaged": damaged}),
    );
    if restored.damaged.is_empty() {
        println!("restored {} to {}", info.reference(), a.target.display());
        return Ok(ExitCode::SUCCESS);
    }
    print_damage(&info.reference(), &a.target, &restored);
    Ok(ExitCode::from(1))
}

/// What a restore of a damaged snapshot could not write, and what to do.
fn print_damage(snapshot: &str, target: &Path, restored: &strata::serve::restore::Restored) {
    let bytes: u64 = restored.damaged.iter().map(|r| r.length).sum();
    eprintln!(
        "restore: {} is damaged: {bytes} bytes in {} ranges could not be read and are left \
         as zeroes in {}; everything else was restored",
        snapshot,
        restored.damaged.len(),
        target.display()
    );
    for r in &restored.damaged {
        eprintln!("  damaged range {}+{}", r.offset, r.length);
    }
    for reason in &restored.reasons {
        eprintln!("  {reason}");
    }
    eprintln!(
        "a backup of the disk stores the damaged data again if the source still has it; \
         `strata verify` lists what is damaged"
    );
}

pub fn mount(cli: &Cli, a: &MountArgs) -> Result<ExitCode> {
    let opts = MountOptions {
        allow_other: a.allow_other,
        // The saved domain XML of each libvirt domain run, PREFIX/ID.xml.
        extra_files: super::domain::mount_files(),
    };
    let child = std::env::var_os(DAEMON_CHILD_ENV).is_some_and(|v| v == "1");
    if a.foreground || child {
        let repo = open(cli)?;
        let mountpoint = &a.mountpoint;
        // Resolved before mounting: afterwards a lookup would wait on the
        // very server that is not running yet.
        let resolved = mountpoint.canonicalize().ok();
        fuse_mount::serve(repo, mountpoint, &opts, || {
            if child {
                fuse_mount::detach_from_parent();
            } else {
                eprintln!("mounted {}; Ctrl-C unmounts", mountpoint.display());
                if let Some(mnt) = resolved {
                    notify_when_answering(mnt);
                }
            }
        })?;
    } else {
        mount_in_background(cli, &a.mountpoint, a.allow_other)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Send systemd `READY=1` (when it asked, through `$NOTIFY_SOCKET`) once
/// the mount answers. This runs while the server starts: the kernel holds
/// the stat below until the server has taken the mount over, so the
/// notification never comes before a reader could be served.
fn notify_when_answering(mnt: PathBuf) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("sd-notify".into())
        .spawn(move || match mount_answers(&mnt) {
            Ok(()) => {
                if let Err(e) = super::notify::ready() {
                    log::warn!("{e:#}");
                }
            }
            Err(e) => log::warn!("not telling systemd the mount is ready: {e:#}"),
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the readiness notifier: {e}");
    }
}

/// Whether `mnt` is now a mount that answers (its device differs from its
/// parent directory's).
fn mount_answers(mnt: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let parent = mnt.parent().context("the mount point has no parent")?;
    let parent_dev = std::fs::metadata(parent)
        .with_context(|| format!("stat {}", parent.display()))?
        .dev();
    let dev = std::fs::metadata(mnt)
        .with_context(|| format!("stat {}", mnt.display()))?
        .dev();
    if dev == parent_dev {
        bail!("{} is not mounted", mnt.display());
    }
    Ok(())
}

/// Run `strata mount` as a server (`STRATA_MOUNT_DAEMON_CHILD=1`) in its
/// own process group and return
/// once it reports the mount ready, or fail with what it printed.
fn mount_in_background(cli: &Cli, mnt: &Path, allow_other: bool) -> Result<()> {
    use std::io::{BufRead, Read};
    use std::os::unix::process::CommandExt;
    fuse_mount::check_mountpoint(mnt)?;
    let location = match super::repo_location(cli)? {
        Location::Dir(p) => Location::Dir(std::path::absolute(p)?),
        other => other,
    };
    let mnt = std::path::absolute(mnt)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--repo")
        .arg(location.to_string())
        .arg("mount")
        .arg(&mnt)
        .env(DAEMON_CHILD_ENV, "1");
    if allow_other {
        cmd.arg("--allow-other");
    }
    for _ in 0..cli.verbose {
        cmd.arg("-v");
    }
    // The passphrase is asked here, before detaching, and handed over on
    // the child's standard input: never in its arguments or environment.
    let backend = location.open(false)?;
    let passphrase = match strata::store::repo::read_config(backend.as_ref())?.encryption {
        Some(_) => {
            cmd.arg("--password-file").arg("/dev/stdin");
            Some(super::secret::passphrase(cli)?)
        }
        None => None,
    };
    let mut child = cmd
        .stdin(match passphrase {
            Some(_) => std::process::Stdio::piped(),
            None => std::process::Stdio::null(),
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .context("start the mount process")?;
    if let (Some(p), Some(mut stdin)) = (passphrase, child.stdin.take()) {
        use std::io::Write;
        stdin.write_all(format!("{p}\n").as_bytes())?;
    }
    let mut line = String::new();
    let stdout = child.stdout.take().context("child stdout")?;
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() == "ready" {
        println!("mounted {} (pid {})", mnt.display(), child.id());
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    child.wait()?;
    let err = err.trim().trim_start_matches("strata: error: ");
    bail!("mount failed: {err}")
}

pub fn umount(a: &UmountArgs) -> Result<ExitCode> {
    let mnt = &a.mountpoint;
    match fuse_mount::unmount(mnt)? {
        Unmounted::Clean => println!("unmounted {}", mnt.display()),
        Unmounted::Detached => println!(
            "{} detached; files still open there stay readable until closed",
            mnt.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}
