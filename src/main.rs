//! The `strata` command: argument parsing and printing over the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use strata::care::prune::{self, Policy};
use strata::care::verify::{self, Subset, VerifyOptions};
use strata::care::{forget, gc, repair};
use strata::ingest::backup::{self, BackupOptions};
use strata::ingest::changes;
use strata::ingest::nbd::client::NbdSource;
use strata::ingest::nbd::server::{receive, ReceiveOptions};
use strata::ingest::nbd::NbdUri;
use strata::ingest::source::FileSource;
use strata::model::extent::{ExtentDoc, EXTENTS_FORMAT};
use strata::model::name::{DiskName, SnapshotRef};
use strata::model::snapshot::{format_time, parse_time};
use strata::serve::mount::{self, MountOptions, Unmounted};
use strata::store::lock::MaintenanceLock;
use strata::store::repo::Repository;

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
    /// Serve an NBD export that QEMU pushes a backup into (blockdev-backup);
    /// commit it as a snapshot when the client disconnects cleanly.
    Receive(ReceiveArgs),
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
    /// Check that snapshots read back intact (all when none are named).
    Verify {
        snapshots: Vec<String>,
        /// Check presence and metadata only, without reading chunk data.
        #[arg(long)]
        quick: bool,
        /// Read only a subset of the chunks: N/T (group N of T) or P%.
        #[arg(long)]
        read_data_subset: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots; their children are rewritten and stay readable.
    Forget {
        #[arg(required = true)]
        snapshots: Vec<String>,
        /// Also delete the data no snapshot references any more.
        #[arg(long)]
        prune: bool,
    },
    /// Apply a retention policy, then collect garbage.
    Prune(PruneArgs),
    /// Never remove this snapshot (prune and forget refuse).
    Protect { snapshot: String },
    /// Undo protect.
    Unprotect { snapshot: String },
    /// Delete data no snapshot references.
    Gc,
    /// Repair the repository.
    Repair {
        /// Rebuild the SQLite catalog from the manifest files.
        #[arg(long, required = true)]
        rebuild_catalog: bool,
    },
}

#[derive(Args)]
struct ReceiveArgs {
    #[arg(long)]
    disk: String,
    /// nbd+unix:///?socket=PATH or nbd://127.0.0.1:PORT
    #[arg(long)]
    listen: String,
    /// Export size of a full backup.
    #[arg(long)]
    size: Option<u64>,
    /// Receive an incremental (the export has the parent's size and reads
    /// as the parent's image underneath the writes).
    #[arg(long)]
    incremental: bool,
    /// Parent of the incremental (default: the disk's latest).
    #[arg(long, requires = "incremental")]
    parent: Option<String>,
    #[arg(long, requires = "incremental")]
    differential: bool,
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long)]
    checkpoint: Option<String>,
    /// The bitmap QEMU backs up with, recorded with the snapshot.
    #[arg(long)]
    bitmap: Option<String>,
    /// After a writer drops its connection, wait for the next one.
    #[arg(long)]
    keep_listening: bool,
}

#[derive(Args)]
struct PruneArgs {
    #[arg(long)]
    keep_last: Option<usize>,
    #[arg(long)]
    keep_hourly: Option<usize>,
    #[arg(long)]
    keep_daily: Option<usize>,
    #[arg(long)]
    keep_weekly: Option<usize>,
    #[arg(long)]
    keep_monthly: Option<usize>,
    #[arg(long)]
    keep_yearly: Option<usize>,
    /// Keep everything this much younger than the newest (e.g. 7d, 12h, 1y6m).
    #[arg(long)]
    keep_within: Option<String>,
    /// Only this disk.
    #[arg(long)]
    disk: Option<String>,
    /// Show what would be kept and removed; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BackupArgs {
    /// Disk name, e.g. vm1/vda.
    #[arg(long)]
    disk: String,
    /// Raw image file, block device, or NBD URI (nbd://host[:port]/export,
    /// nbd+unix:///export?socket=PATH).
    source: String,
    /// Take an incremental holding only the ranges listed in this JSON file.
    #[arg(long, conflicts_with = "bitmap")]
    changes: Option<PathBuf>,
    /// NBD source: take an incremental of what this dirty bitmap marks.
    #[arg(long)]
    bitmap: Option<String>,
    /// With --bitmap: if the bitmap is missing, take a full backup instead.
    #[arg(long, requires = "bitmap")]
    fallback_full: bool,
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
        .format_timestamp_millis()
        .init();
    strata::progress::set_enabled(!cli.quiet);
    // Listings die quietly when their reader goes away (`strata snapshots
    // | head`), like other Unix tools, instead of panicking on EPIPE. Only
    // these: commands that talk over sockets must see EPIPE as an error.
    if matches!(
        cli.command,
        Command::Snapshots { .. } | Command::Map { .. } | Command::Verify { .. }
    ) {
        // SAFETY: restoring the default action of one signal at startup.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
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
            let mut opts = BackupOptions {
                disk: Some(disk),
                changes,
                parent: a.parent.as_deref().map(SnapshotRef::parse).transpose()?,
                differential: a.differential,
                label: a.label.clone(),
                checkpoint: a.checkpoint.clone(),
                bitmap: a.bitmap.clone(),
                time: a.time.as_deref().map(parse_time).transpose()?,
                check_unchanged: a.check_unchanged,
            };
            let info = if NbdUri::is_nbd(&a.source) {
                let source = NbdSource::connect(&NbdUri::parse(&a.source)?, a.bitmap.as_deref())?;
                if let Some(bitmap) = &a.bitmap {
                    if source.has_bitmap(bitmap) {
                        opts.changes = Some(source.dirty(bitmap)?);
                    } else if a.fallback_full {
                        log::warn!(
                            "bitmap {bitmap} is missing: taking a full backup (--fallback-full)"
                        );
                        opts.parent = None;
                        opts.differential = false;
                        opts.bitmap = None;
                    } else {
                        source.dirty(bitmap)?; // fails with the clear message
                    }
                }
                let info = backup::backup(&repo, &source, &opts)?;
                source.disconnect();
                info
            } else {
                if a.bitmap.is_some() {
                    bail!("--bitmap needs an NBD source (nbd://… or nbd+unix://…)");
                }
                let source = FileSource::open(Path::new(&a.source))?;
                backup::backup(&repo, &source, &opts)?
            };
            println!("{}", info.summary());
        }
        Command::Receive(a) => {
            let repo = open(&cli)?;
            let opts = ReceiveOptions {
                disk: Some(DiskName::parse(&a.disk)?),
                size: a.size,
                incremental: a.incremental,
                parent: a.parent.as_deref().map(SnapshotRef::parse).transpose()?,
                differential: a.differential,
                label: a.label.clone(),
                checkpoint: a.checkpoint.clone(),
                bitmap: a.bitmap.clone(),
                keep_listening: a.keep_listening,
            };
            let listen = NbdUri::parse(&a.listen)?;
            let info = receive(&repo, &listen, &opts, || {
                // Scripts wait for this line before starting QEMU's job.
                println!("listening on {listen}");
                let _ = std::io::Write::flush(&mut std::io::stdout());
            })?;
            println!("{}", info.summary());
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
                    let kind = if e.kind == strata::model::extent::ExtentKind::Data {
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
        Command::Verify {
            snapshots,
            quick,
            read_data_subset,
            json,
        } => {
            let repo = open(&cli)?;
            let infos = snapshots
                .iter()
                .map(|r| Ok(repo.resolve(&SnapshotRef::parse(r)?)?))
                .collect::<Result<Vec<_>>>()?;
            let opts = VerifyOptions {
                quick: *quick,
                subset: read_data_subset
                    .as_deref()
                    .map(Subset::parse)
                    .transpose()?
                    .unwrap_or(Subset::All),
            };
            let report = verify::verify(&repo, &infos, &opts)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for d in &report.damaged {
                    println!("DAMAGED {}: {}", d.snapshot, d.reason);
                    for [o, l] in &d.ranges {
                        println!("    bytes {o}..{} ({l} bytes)", o + l);
                    }
                }
                println!(
                    "{}: {} snapshots, {} chunks checked{}",
                    if report.ok { "ok" } else { "damage found" },
                    report.checked_snapshots,
                    report.checked_chunks,
                    if *quick { " (presence only)" } else { "" }
                );
            }
            if !report.ok {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Forget { snapshots, prune } => {
            let repo = open(&cli)?;
            let lock = MaintenanceLock::acquire(repo.root(), "forget")?;
            // Resolve all first, so that a typo removes nothing.
            let infos = snapshots
                .iter()
                .map(|r| Ok(repo.resolve(&SnapshotRef::parse(r)?)?))
                .collect::<Result<Vec<_>>>()?;
            if let Some(p) = infos.iter().find(|i| i.protected) {
                bail!(
                    "{} is protected; unprotect it first (nothing was removed)",
                    p.reference()
                );
            }
            for info in &infos {
                forget::forget_one(&repo, info)?;
                println!("removed {}", info.reference());
            }
            if *prune {
                let r = gc::gc(&repo, &lock)?;
                println!(
                    "gc: deleted {} chunks, freed {} bytes",
                    r.deleted_chunks, r.freed_bytes
                );
            }
        }
        Command::Prune(a) => {
            let repo = open(&cli)?;
            let policy = Policy {
                last: a.keep_last,
                hourly: a.keep_hourly,
                daily: a.keep_daily,
                weekly: a.keep_weekly,
                monthly: a.keep_monthly,
                yearly: a.keep_yearly,
                within: a
                    .keep_within
                    .as_deref()
                    .map(prune::parse_duration)
                    .transpose()?,
            };
            let disk = a.disk.as_deref().map(DiskName::parse).transpose()?;
            let report = prune::prune(&repo, &policy, disk.as_ref(), a.dry_run)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let verb = if a.dry_run { "would " } else { "" };
                for k in &report.plan.keep {
                    println!("keep    {}  ({})", k.snapshot, k.rules.join(", "));
                }
                for r in &report.plan.remove {
                    println!("{verb}remove  {r}");
                }
                if let Some(why) = &report.gc_skipped {
                    println!("gc skipped: {why}");
                } else if !a.dry_run {
                    println!("freed {} bytes", report.freed_bytes);
                }
            }
        }
        Command::Protect { snapshot } | Command::Unprotect { snapshot } => {
            let protect = matches!(cli.command, Command::Protect { .. });
            let repo = open(&cli)?;
            let _lock = MaintenanceLock::acquire(repo.root(), "protect")?;
            let info = repo.resolve(&SnapshotRef::parse(snapshot)?)?;
            forget::set_protected(&repo, &info, protect)?;
            println!(
                "{} {}",
                if protect { "protected" } else { "unprotected" },
                info.reference()
            );
        }
        Command::Gc => {
            let repo = open(&cli)?;
            let lock = MaintenanceLock::acquire(repo.root(), "gc")?;
            let r = gc::gc(&repo, &lock)?;
            println!(
                "deleted {} chunks ({} bytes), {} unreferenced manifests, {} temporaries; kept {} recent chunks",
                r.deleted_chunks, r.freed_bytes, r.removed_manifests, r.removed_temporaries, r.kept_recent
            );
        }
        Command::Repair { .. } => {
            let path = repo_path(&cli)?;
            let r = repair::rebuild_catalog(&path)?;
            for s in &r.skipped {
                eprintln!("skipped {s}");
            }
            println!("rebuilt the catalog: {} snapshots", r.restored);
            if !r.skipped.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Restore { snapshot, target } => {
            let repo = open(&cli)?;
            let info = repo.resolve(&SnapshotRef::parse(snapshot)?)?;
            strata::serve::restore::restore(&repo, &info, target)?;
            println!("restored {} to {}", info.reference(), target.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
