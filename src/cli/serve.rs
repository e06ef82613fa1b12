//! Reading snapshots back: `restore`, `mount`, `umount`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;

use strata::model::name::SnapshotRef;
use strata::serve::mount::{self as fuse_mount, MountOptions, Unmounted};

use super::{open, repo_path, Cli};

#[derive(Args)]
pub struct RestoreArgs {
    snapshot: String,
    target: PathBuf,
}

#[derive(Args)]
pub struct MountArgs {
    mountpoint: PathBuf,
    /// Stay attached instead of returning once the mount is ready.
    #[arg(long)]
    foreground: bool,
    /// Let other users read the images.
    #[arg(long)]
    allow_other: bool,
    /// Internal: the background child of a `mount` without --foreground.
    #[arg(long, hide = true)]
    daemon_child: bool,
}

#[derive(Args)]
pub struct UmountArgs {
    mountpoint: PathBuf,
}

pub fn restore(cli: &Cli, a: &RestoreArgs) -> Result<ExitCode> {
    let repo = open(cli)?;
    let info = repo.resolve(&SnapshotRef::parse(&a.snapshot)?)?;
    let restored = strata::serve::restore::restore(&repo, &info, &a.target)?;
    if restored.damaged.is_empty() {
        println!("restored {} to {}", info.reference(), a.target.display());
        return Ok(ExitCode::SUCCESS);
    }
    let bytes: u64 = restored.damaged.iter().map(|r| r.length).sum();
    eprintln!(
        "restore: {} is damaged: {bytes} bytes in {} ranges could not be read and are left \
         as zeroes in {}; everything else was restored",
        info.reference(),
        restored.damaged.len(),
        a.target.display()
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
    Ok(ExitCode::from(1))
}

pub fn mount(cli: &Cli, a: &MountArgs) -> Result<ExitCode> {
    let opts = MountOptions {
        allow_other: a.allow_other,
    };
    if a.foreground || a.daemon_child {
        let repo = open(cli)?;
        let child = a.daemon_child;
        let mountpoint = &a.mountpoint;
        fuse_mount::serve(repo, mountpoint, &opts, || {
            if child {
                fuse_mount::detach_from_parent();
            } else {
                eprintln!("mounted {}; Ctrl-C unmounts", mountpoint.display());
            }
        })?;
    } else {
        mount_in_background(cli, &a.mountpoint, a.allow_other)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Run `strata mount --daemon-child` in its own process group and return
/// once it reports the mount ready, or fail with what it printed.
fn mount_in_background(cli: &Cli, mnt: &Path, allow_other: bool) -> Result<()> {
    use std::io::{BufRead, Read};
    use std::os::unix::process::CommandExt;
    fuse_mount::check_mountpoint(mnt)?;
    let repo = std::path::absolute(repo_path(cli)?)?;
    let mnt = std::path::absolute(mnt)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--repo")
        .arg(&repo)
        .arg("mount")
        .arg(&mnt)
        .arg("--daemon-child");
    if allow_other {
        cmd.arg("--allow-other");
    }
    for _ in 0..cli.verbose {
        cmd.arg("-v");
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .context("start the mount process")?;
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
