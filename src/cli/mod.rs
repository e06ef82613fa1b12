//! The command line: clap definitions, process setup, and dispatch to one
//! function per command. The functions live beside their command group
//! (`ingest.rs`, `inspect.rs`, `serve.rs`, `care.rs`); each calls the
//! library and prints. No storage logic lives here.

mod care;
mod ingest;
mod inspect;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use strata::store::repo::Repository;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Full and incremental VM disk backups, read back as raw images"
)]
pub struct Cli {
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
    Backup(ingest::BackupArgs),
    /// Serve an NBD export that QEMU pushes a backup into (blockdev-backup);
    /// commit it as a snapshot when the client disconnects cleanly.
    Receive(ingest::ReceiveArgs),
    /// List snapshots, oldest first.
    Snapshots(inspect::SnapshotsArgs),
    /// Show the allocation of a point-in-time image (or, with --own, of the snapshot itself).
    Map(inspect::MapArgs),
    /// Write a point-in-time image to a file (sparse) or block device.
    Restore(serve::RestoreArgs),
    /// Mount every snapshot as a read-only raw image (FUSE).
    Mount(serve::MountArgs),
    /// Unmount a strata mount (also a stale one left by a killed process).
    Umount(serve::UmountArgs),
    /// Check that snapshots read back intact (all when none are named).
    Verify(care::VerifyArgs),
    /// Remove snapshots; their children are rewritten and stay readable.
    Forget(care::ForgetArgs),
    /// Apply a retention policy, then collect garbage.
    Prune(care::PruneArgs),
    /// Never remove this snapshot (prune and forget refuse).
    Protect(care::ProtectArgs),
    /// Undo protect.
    Unprotect(care::ProtectArgs),
    /// Delete data no snapshot references.
    Gc,
    /// Repair the repository.
    Repair(care::RepairArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    strata::progress::set_enabled(!cli.quiet);
    // Listings die quietly when their reader goes away (`strata snapshots
    // | head`), like other Unix tools, instead of panicking on EPIPE. Only
    // these: commands that talk over sockets must see EPIPE as an error.
    if matches!(
        cli.command,
        Command::Snapshots(_) | Command::Map(_) | Command::Verify(_)
    ) {
        // SAFETY: restoring the default action of one signal at startup.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // Repository files are for the owner only (invariant 7).
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("strata: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(cli: &Cli) {
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
}

fn run(cli: &Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Init => care::init(cli),
        Command::Backup(a) => ingest::backup(cli, a),
        Command::Receive(a) => ingest::receive(cli, a),
        Command::Snapshots(a) => inspect::snapshots(cli, a),
        Command::Map(a) => inspect::map(cli, a),
        Command::Restore(a) => serve::restore(cli, a),
        Command::Mount(a) => serve::mount(cli, a),
        Command::Umount(a) => serve::umount(a),
        Command::Verify(a) => care::verify(cli, a),
        Command::Forget(a) => care::forget(cli, a),
        Command::Prune(a) => care::prune(cli, a),
        Command::Protect(a) => care::protect(cli, a, true),
        Command::Unprotect(a) => care::protect(cli, a, false),
        Command::Gc => care::gc(cli),
        Command::Repair(a) => care::repair(cli, a),
    }
}

/// The repository path from `--repo` or `STRATA_REPO`.
fn repo_path(cli: &Cli) -> Result<PathBuf> {
    match &cli.repo {
        Some(p) => Ok(p.clone()),
        None => bail!("no repository given: use --repo PATH or set STRATA_REPO"),
    }
}

fn open(cli: &Cli) -> Result<Repository> {
    Ok(Repository::open(&repo_path(cli)?)?)
}
