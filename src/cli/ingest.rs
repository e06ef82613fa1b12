//! How data comes in: `backup` (file, block device, NBD pull) and
//! `receive` (NBD push).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use strata::ingest::backup::{self, BackupOptions};
use strata::ingest::changes;
use strata::ingest::nbd::client::NbdSource;
use strata::ingest::nbd::server::{self, ReceiveOptions, Resumption};
use strata::ingest::nbd::NbdUri;
use strata::ingest::source::FileSource;
use strata::model::name::{DiskName, SnapshotRef};
use strata::model::snapshot::parse_time;

use super::{done_event, open_unsynced, started_event, Cli};

#[derive(Args)]
pub struct BackupArgs {
    /// Disk name, e.g. vm1/vda.
    #[arg(long, required_unless_present = "domain", conflicts_with = "domain")]
    disk: Option<String>,
    /// Raw image file, block device, or NBD URI (nbd://host[:port]/export,
    /// nbd+unix:///export?socket=PATH).
    #[arg(required_unless_present = "domain", conflicts_with = "domain")]
    source: Option<String>,
    /// Back up every disk of this libvirt domain at one checkpoint, as
    /// disks PREFIX/TARGET (e.g. web01/vda) sharing one snapshot id.
    #[arg(long, conflicts_with_all = ["changes", "bitmap", "parent", "differential", "checkpoint", "time"])]
    domain: Option<String>,
    /// With --domain: libvirt connection URI (default: LIBVIRT_DEFAULT_URI,
    /// else qemu:///system).
    #[arg(long, requires = "domain")]
    connect: Option<String>,
    /// With --domain: the disk name prefix (default: the domain name).
    #[arg(long, requires = "domain")]
    name: Option<String>,
    /// With --domain: disk targets not to back up (comma-separated).
    #[arg(long, requires = "domain", value_delimiter = ',')]
    exclude: Vec<String>,
    /// With --domain: full snapshots of every disk, not incrementals.
    #[arg(long, requires = "domain")]
    full: bool,
    /// With --domain: freeze the guest's file systems through the guest
    /// agent for the checkpoint (without an answering agent: crash-consistent).
    #[arg(long, requires = "domain")]
    quiesce: bool,
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
    /// Free-form text stored with the snapshot.
    #[arg(long, default_value = "")]
    label: String,
    /// Name of the checkpoint (libvirt) or bitmap generation this snapshot ends.
    #[arg(long)]
    checkpoint: Option<String>,
    /// When the data was taken, if not now (RFC3339).
    #[arg(long)]
    time: Option<String>,
    /// Percent of unchanged blocks to compare with the parent.
    #[arg(long, default_value_t = 1.0)]
    check_unchanged: f64,
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// Disk name, e.g. vm1/vda.
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
    /// Mark the snapshot differential.
    #[arg(long, requires = "incremental")]
    differential: bool,
    /// Free-form text stored with the snapshot.
    #[arg(long, default_value = "")]
    label: String,
    /// Name of the checkpoint (libvirt) or bitmap generation this snapshot ends.
    #[arg(long)]
    checkpoint: Option<String>,
    /// The bitmap QEMU backs up with, recorded with the snapshot.
    #[arg(long)]
    bitmap: Option<String>,
    /// After a writer drops its connection, wait for the next one.
    #[arg(long)]
    keep_listening: bool,
    /// Discard a partial push of this disk (see `partials`) instead of
    /// resuming it.
    #[arg(long)]
    no_resume: bool,
}

pub fn backup(cli: &Cli, a: &BackupArgs) -> Result<ExitCode> {
    if let Some(domain) = &a.domain {
        return super::domain::backup(
            cli,
            &super::domain::DomainBackup {
                domain,
                connect: a.connect.as_deref(),
                name: a.name.as_deref(),
                exclude: &a.exclude,
                full: a.full,
                quiesce: a.quiesce,
                label: &a.label,
                check_unchanged: a.check_unchanged,
            },
        );
    }
    // clap requires both without --domain.
    let (Some(disk), Some(source)) = (&a.disk, &a.source) else {
        bail!("--disk and SOURCE are required without --domain");
    };
    started_event("backup", json!({"disk": disk, "source": source}));
    // The backup's registration syncs the catalog, after its lease.
    let repo = open_unsynced(cli)?;
    let disk = DiskName::parse(disk)?;
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
    let info = if NbdUri::is_nbd(source) {
        let source = NbdSource::connect(&NbdUri::parse(source)?, a.bitmap.as_deref())?;
        if let Some(bitmap) = &a.bitmap {
            if source.has_bitmap(bitmap) {
                opts.changes = Some(source.dirty(bitmap)?);
            } else if a.fallback_full {
                log::warn!("bitmap {bitmap} is missing: taking a full backup (--fallback-full)");
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
        let source = FileSource::open(Path::new(source))?;
        backup::backup(&repo, &source, &opts)?
    };
    println!("{}", info.summary());
    done_event(
        "backup",
        json!({"snapshot": info.reference(), "kind": info.kind.as_str(),
               "size": info.size, "stored_bytes": info.stored_bytes}),
    );
    Ok(ExitCode::SUCCESS)
}

pub fn receive(cli: &Cli, a: &ReceiveArgs) -> Result<ExitCode> {
    // The receive's registration syncs the catalog, after its lease.
    let repo = open_unsynced(cli)?;
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
        no_resume: a.no_resume,
    };
    let listen = NbdUri::parse(&a.listen)?;
    let info = server::receive(&repo, &listen, &opts, |resumption| {
        match resumption {
            Resumption::Fresh => {}
            Resumption::Resumed(p) => println!("resuming the {}", p.describe()),
            Resumption::Discarded(what) => println!("discarded the {what} (--no-resume)"),
        }
        // Scripts wait for this line before starting QEMU's job.
        println!("listening on {listen}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    })?;
    println!("{}", info.summary());
    Ok(ExitCode::SUCCESS)
}
