//! The `strata` command: argument parsing and printing over the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use strata::backup::{self, BackupOptions};
use strata::changes;
use strata::extent::{ExtentDoc, EXTENTS_FORMAT};
use strata::mount::{self, MountOptions, Unmounted};
use strata::name::{DiskName, SnapshotRef};
use strata::repo::Repository;
use strata::snapshot::{format_time, parse_time};
use strata::source::FileSource;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Full and incremental VM disk backups, read back as raw images"
)]
struct Cli {
    /// Repository directory.
    #[arg(long, env = "STRATA_REPO", global = true)]
    repo: Option<PathBuf>,
    /// More log output (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less output: errors only, no progress bars.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an empty repository.
    Init,
    /// Take a snapshot of a raw image, block device or NBD export.
    Backup(BackupArgs),
    /// List snapshots, oldest first.
    Snapshots {
        #[arg(long)]
        disk: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show the allocation of a point-in-time image (or, with --own, of the snapshot itself).
    Map {
        snapshot: String,
        #[arg(long)]
        own: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write a point-in-time image to a file (sparse) or block device.
    Restore { snapshot: String, target: PathBuf },
    /// Mount every snapshot as a read-only raw image (FUSE).
    Mount {
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
    },
    /// Unmount a strata mount (also a stale one left by a killed process).
    Umount { mountpoint: PathBuf },
}

#[derive(Args)]
struct BackupArgs {
    /// Disk name, e.g. vm1/vda.
    #[arg(long)]
    disk: String,
    /// Raw image file or block device.
    source: PathBuf,
    /// Take an incremental holding only the ranges listed in this JSON file.
    #[arg(long)]
    changes: Option<PathBuf>,
    /// Parent of a non-full snapshot (default: the disk's latest).
    #[arg(long)]
    parent: Option<String>,
    /// Mark the snapshot differential.
    #[arg(long)]
    differential: bool,
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long)]
    checkpoint: Option<String>,
    /// When the data was taken, if not now (RFC3339).
    #[arg(long)]
    time: Option<String>,
    /// Percent of unchanged blocks to compare with the parent.
    #[arg(long, default_value_t = 1.0)]
    check_unchanged: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => log::LevelFilter::Error,
        (false, 0) => log::LevelFilter::Warn,
        (false, 1) => log::LevelFilter::Info,
        (false, 2) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_target(false)
        .init();
    strata::progress::set_enabled(!cli.quiet);
    // Repository files are for the owner only (invariant 7).
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("strata: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Run `strata mount --daemon-child` in its own process group and return
/// once it reports the mount ready, or fail with what it printed.
fn mount_in_background(cli: &Cli, mnt: &Path, allow_other: bool) -> Result<()> {
    use std::io::{BufRead, Read};
    use std::os::unix::process::CommandExt;
    mount::check_mountpoint(mnt)?;
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

fn repo_path(cli: &Cli) -> Result<PathBuf> {
    match &cli.repo {
        Some(p) => Ok(p.clone()),
        None => bail!("no repository given: use --repo PATH or set STRATA_REPO"),
    }
}

fn open(cli: &Cli) -> Result<Repository> {
    Ok(Repository::open(&repo_path(cli)?)?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Init => {
            let path = repo_path(&cli)?;
            Repository::init(&path)?;
            println!("created repository {}", path.display());
        }
        Command::Backup(a) => {
            let repo = open(&cli)?;
            let disk = DiskName::parse(&a.disk)?;
            let changes = a.changes.as_deref().map(changes::parse_file).transpose()?;
            let opts = BackupOptions {
                disk: Some(disk),
                changes,
                parent: a.parent.as_deref().map(SnapshotRef::parse).transpose()?,
                differential: a.differential,
                label: a.label.clone(),
                checkpoint: a.checkpoint.clone(),
                bitmap: None,
                time: a.time.as_deref().map(parse_time).transpose()?,
                check_unchanged: a.check_unchanged,
            };
            let source = FileSource::open(&a.source)?;
            let info = backup::backup(&repo, &source, &opts)?;
            println!(
                "snapshot {} ({}, {} bytes, {} bytes stored)",
                info.reference(),
                info.kind.as_str(),
                info.size,
                info.stored_bytes
            );
        }
        Command::Snapshots { disk, json } => {
            let repo = open(&cli)?;
            let disk = disk.as_deref().map(DiskName::parse).transpose()?;
            let snaps = repo.snapshots(disk.as_ref())?;
            if *json {
                let v: Vec<_> = snaps.iter().map(|s| s.to_json()).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<32} {:<20} {:<12} {:>14} {:>12} {:<21} label",
                    "snapshot", "time", "kind", "size", "stored", "parent"
                );
                for s in &snaps {
                    println!(
                        "{:<32} {:<20} {:<12} {:>14} {:>12} {:<21} {}{}",
                        s.reference(),
                        format_time(&s.time),
                        s.kind.as_str(),
                        s.size,
                        s.stored_bytes,
                        s.parent.as_ref().map_or("-".to_string(), |p| p.to_string()),
                        s.label,
                        if s.protected { " [protected]" } else { "" }
                    );
                }
            }
        }
        Command::Map {
            snapshot,
            own,
            json,
        } => {
            let repo = open(&cli)?;
            let info = repo.resolve(&SnapshotRef::parse(snapshot)?)?;
            let doc = if *own {
                repo.manifest(&info)
                    .with_context(|| format!("manifest of {}", info.reference()))?
                    .extent_doc()
            } else {
                // The whole image, described as a full snapshot would be.
                let map = repo.image_map(&info)?;
                ExtentDoc {
                    format: EXTENTS_FORMAT.to_string(),
                    disk: info.disk.to_string(),
                    snapshot: info.id.to_string(),
                    kind: "full".to_string(),
                    parent: None,
                    size: info.size,
                    granularity: info.granularity,
                    bitmap: info.bitmap.clone(),
                    extents: map.extents(),
                }
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("{:>16} {:>16} type", "offset", "length");
                for e in &doc.extents {
                    let kind = if e.kind == strata::extent::ExtentKind::Data {
                        "data"
                    } else {
                        "zero"
                    };
                    println!("{:>16} {:>16} {kind}", e.offset, e.length);
                }
            }
        }
        Command::Mount {
            mountpoint,
            foreground,
            allow_other,
            daemon_child,
        } => {
            let opts = MountOptions {
                allow_other: *allow_other,
            };
            if *foreground || *daemon_child {
                let repo = open(&cli)?;
                let child = *daemon_child;
                mount::serve(repo, mountpoint, &opts, || {
                    if child {
                        mount::detach_from_parent();
                    } else {
                        eprintln!("mounted {}; Ctrl-C unmounts", mountpoint.display());
                    }
                })?;
            } else {
                mount_in_background(&cli, mountpoint, *allow_other)?;
            }
        }
        Command::Umount { mountpoint } => match mount::unmount(mountpoint)? {
            Unmounted::Clean => println!("unmounted {}", mountpoint.display()),
            Unmounted::Detached => println!(
                "{} detached; files still open there stay readable until closed",
                mountpoint.display()
            ),
        },
        Command::Restore { snapshot, target } => {
            let repo = open(&cli)?;
            let info = repo.resolve(&SnapshotRef::parse(snapshot)?)?;
            strata::restore::restore(&repo, &info, target)?;
            println!("restored {} to {}", info.reference(), target.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
