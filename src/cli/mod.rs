//! The command line: clap definitions, process setup, and dispatch to one
//! function per command. The functions live beside their command group
//! (`ingest.rs`, `inspect.rs`, `serve.rs`, `care.rs`); each calls the
//! library and prints. No storage logic lives here.

mod care;
mod copy;
mod docs;
mod domain;
mod ingest;
mod inspect;
mod locks;
mod notify;
mod secret;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use strata::progress;
use strata::store::backend::Location;
use strata::store::repo::Repository;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Full and incremental VM disk backups, read back as raw images",
    after_long_help = "Exit status: 0 success; 1 the operation failed, or verify found damage, or \
        restore could not read every range; 2 usage error.\n\n\
        Environment: STRATA_REPO is the repository when --repo is not given; \
        STRATA_PASSWORD_FILE or STRATA_PASSWORD give an encrypted repository's passphrase; \
        NOTIFY_SOCKET (set by systemd) makes mount --foreground report readiness.\n\n\
        Reference: docs/CLI.md in the source tree."
)]
pub struct Cli {
    /// Repository: a directory, or s3://BUCKET[/PREFIX] (endpoint and
    /// credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION).
    #[arg(long, env = "STRATA_REPO", global = true)]
    repo: Option<String>,
    /// This host's cache for repositories on object storage (catalog copy,
    /// chunk cache). Default: $XDG_CACHE_HOME/strata, else ~/.cache/strata.
    #[arg(long, env = "STRATA_CACHE_DIR", global = true)]
    cache_dir: Option<PathBuf>,
    /// Bound of the chunk cache, in bytes or with K, M, G or T (default 1G).
    #[arg(long, env = "STRATA_CACHE_SIZE", global = true)]
    cache_size: Option<String>,
    /// More log output (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less output: errors only, no progress bars.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// The passphrase of an encrypted repository, from this file (one
    /// trailing newline is ignored). Else STRATA_PASSWORD, else a prompt.
    #[arg(long, env = "STRATA_PASSWORD_FILE", global = true)]
    password_file: Option<PathBuf>,
    /// How backup, restore, verify and prune report progress: bars on a
    /// terminal (auto), JSON lines on stderr (json), or nothing (none).
    #[arg(long, value_enum, global = true, default_value_t = ProgressArg::Auto)]
    progress: ProgressArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProgressArg {
    Auto,
    Json,
    None,
}

#[derive(Subcommand)]
enum Command {
    /// Create an empty repository.
    Init(care::InitArgs),
    /// Take a snapshot of a raw image, block device or NBD export, or of
    /// every disk of a libvirt domain (--domain).
    Backup(ingest::BackupArgs),
    /// Serve an NBD export that QEMU pushes a backup into (blockdev-backup);
    /// commit it as a snapshot when the client disconnects cleanly.
    Receive(ingest::ReceiveArgs),
    /// List snapshots, oldest first.
    Snapshots(inspect::SnapshotsArgs),
    /// List partial pushes: what `receive` kept of writers that went away
    /// without a clean disconnect, for a retry to resume.
    Partials(inspect::PartialsArgs),
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
    /// Delete data no snapshot references, and old partial pushes.
    Gc(care::GcArgs),
    /// Repair the repository.
    Repair(care::RepairArgs),
    /// Manage the passphrases of an encrypted repository.
    Key(secret::KeyArgs),
    /// List who holds the repository: running backups, receives, restores,
    /// copies, mounts and maintenance (leases on object storage).
    Locks(locks::LocksArgs),
    /// Remove stale leases (their holder died or they expired).
    Unlock(locks::UnlockArgs),
    /// Print the libvirt domain XML saved with a domain run (PREFIX@ID).
    DomainXml(domain::DomainXmlArgs),
    /// Copy snapshots to another repository, sending only missing data.
    Copy(copy::CopyArgs),
    /// Print a shell completion script (bash, zsh or fish) on stdout.
    Completions(docs::CompletionsArgs),
    /// Write one man page per command into a directory.
    Man(docs::ManArgs),
}

/// Two malloc arenas, unless the environment chose (`MALLOC_ARENA_MAX`,
/// `GLIBC_TUNABLES`). glibc gives each thread that allocates under
/// contention an arena of its own, up to 8 per core, and each keeps the
/// high-water mark of what its thread allocated: a mount's 16 read-ahead
/// threads, a restore's 16 workers, a backup's upload threads. Reading
/// 1.5 GiB of one image through a mount at depth 30: peak RSS 212-216 MiB
/// with the default, 139-141 MiB with two arenas, at the same 450-470
/// MB/s (one arena: 126-129 MiB, but 408-436 MB/s).
fn limit_malloc_arenas() {
    let chosen = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
    #[cfg(target_env = "gnu")]
    if !chosen {
        // SAFETY: mallopt changes an allocator setting; called at startup,
        // before any other thread runs.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = chosen;
}

pub fn main() -> ExitCode {
    limit_malloc_arenas();
    let matches = command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(&cli);
    // The library reads these from the environment; the flags win.
    if let Some(dir) = &cli.cache_dir {
        std::env::set_var("STRATA_CACHE_DIR", dir);
    }
    if let Some(size) = &cli.cache_size {
        std::env::set_var("STRATA_CACHE_SIZE", size);
    }
    progress::set_mode(match (cli.progress, cli.quiet) {
        // Asked for by name, JSON wins over -q: scripts parse it.
        (ProgressArg::Json, _) => progress::Mode::Json,
        (ProgressArg::None, _) | (_, true) => progress::Mode::Off,
        (ProgressArg::Auto, false) => progress::Mode::Bars,
    });
    // Listings die quietly when their reader goes away (`strata snapshots
    // | head`), like other Unix tools, instead of panicking on EPIPE. Only
    // these: commands that talk over sockets must see EPIPE as an error.
    if matches!(
        cli.command,
        Command::Snapshots(_)
            | Command::Partials(_)
            | Command::Map(_)
            | Command::Verify(_)
            | Command::Completions(_)
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
            progress::event(serde_json::json!({"event": "error", "message": format!("{e:#}")}));
            eprintln!("strata: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The clap command, with `--version` naming the on-disk formats.
fn command() -> clap::Command {
    // clap wants a &'static str here; the text is built once per process.
    let version: &'static str = Box::leak(long_version().into_boxed_str());
    Cli::command().long_version(version)
}

/// The program version and the versions of every on-disk format it reads
/// and writes, from the library's constants so that they cannot drift.
fn long_version() -> String {
    use strata::model::{extent, image_map};
    use strata::store::{catalog, chunks::codec as chunk, keys, manifest, repo};
    format!(
        "{}\n\
         repository  {} (config.json)\n\
         chunk files version {} (reads {} and {})\n\
         manifests   {} (reads {}; sealed: {})\n\
         key files   {}\n\
         extent JSON {}\n\
         catalog     SQLite, schema {}\n\
         image maps  binary encoding {} (reads 1 and {})",
        env!("CARGO_PKG_VERSION"),
        repo::REPO_FORMAT,
        chunk::VERSION,
        chunk::VERSION_1,
        chunk::VERSION,
        manifest::MANIFEST_FORMAT,
        manifest::MANIFEST_FORMAT_1,
        manifest::SEALED_FORMAT,
        keys::KEY_FORMAT,
        extent::EXTENTS_FORMAT,
        catalog::SCHEMA_VERSION,
        image_map::ENCODING_VERSION,
        image_map::ENCODING_VERSION,
    )
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
        Command::Init(a) => care::init(cli, a),
        Command::Backup(a) => ingest::backup(cli, a),
        Command::Receive(a) => ingest::receive(cli, a),
        Command::Snapshots(a) => inspect::snapshots(cli, a),
        Command::Partials(a) => inspect::partials(cli, a),
        Command::Map(a) => inspect::map(cli, a),
        Command::Restore(a) => serve::restore(cli, a),
        Command::Mount(a) => serve::mount(cli, a),
        Command::Umount(a) => serve::umount(a),
        Command::Verify(a) => care::verify(cli, a),
        Command::Forget(a) => care::forget(cli, a),
        Command::Prune(a) => care::prune(cli, a),
        Command::Protect(a) => care::protect(cli, a, true),
        Command::Unprotect(a) => care::protect(cli, a, false),
        Command::Gc(a) => care::gc(cli, a),
        Command::Repair(a) => care::repair(cli, a),
        Command::Key(a) => secret::key(cli, a),
        Command::Locks(a) => locks::locks(cli, a),
        Command::Unlock(a) => locks::unlock(cli, a),
        Command::Copy(a) => copy::copy(cli, a),
        Command::DomainXml(a) => domain::domain_xml(cli, a),
        Command::Completions(a) => docs::completions(a),
        Command::Man(a) => docs::man(a),
    }
}

/// The repository from `--repo` or `STRATA_REPO`.
fn repo_location(cli: &Cli) -> Result<Location> {
    match &cli.repo {
        Some(p) => Ok(Location::parse(p)?),
        None => {
            bail!("no repository given: use --repo PATH|s3://BUCKET[/PREFIX] or set STRATA_REPO")
        }
    }
}

/// Open the repository, telling a missing directory and one that is not a
/// repository apart, since their fixes differ.
fn open(cli: &Cli) -> Result<Repository> {
    let repo = open_unsynced(cli)?;
    repo.refresh()?;
    Ok(repo)
}

/// [`open`] for a writer (backup, receive): its registration brings the
/// catalog up to date once it holds its lease, before any use of it.
fn open_unsynced(cli: &Cli) -> Result<Repository> {
    let location = repo_location(cli)?;
    if let Location::Dir(path) = &location {
        if !path.exists() {
            bail!(
                "repository {} does not exist; check --repo/STRATA_REPO, or create it with: strata init --repo {}",
                path.display(),
                path.display()
            );
        }
        if path.is_dir() && !path.join("config.json").exists() {
            bail!(
                "{} is not a strata repository (it has no config.json); check --repo/STRATA_REPO",
                path.display()
            );
        }
    }
    // The library's errors name the repository already (bad config.json,
    // format, the endpoint and the S3 error).
    Ok(Repository::open_unsynced(&location, &|| {
        secret::passphrase(cli)
    })?)
}

/// The `done` event of `--progress json`, with the command's summary.
fn done_event(command: &str, mut summary: serde_json::Value) {
    if let Some(map) = summary.as_object_mut() {
        map.insert("event".into(), "done".into());
        map.insert("command".into(), command.into());
    }
    progress::event(summary);
}

/// The `started` event of `--progress json`.
fn started_event(command: &str, what: serde_json::Value) {
    let mut map = serde_json::Map::new();
    map.insert("event".into(), "started".into());
    map.insert("command".into(), command.into());
    if let Some(fields) = what.as_object() {
        map.extend(fields.clone());
    }
    progress::event(serde_json::Value::Object(map));
}
