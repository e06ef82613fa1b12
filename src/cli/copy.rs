//! `strata copy`: snapshots to another repository.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

use strata::care::copy;
use strata::model::name::{DiskName, SnapshotRef};
use strata::model::snapshot::SnapshotInfo;
use strata::store::backend::Location;
use strata::store::repo::Repository;

use super::{done_event, open, started_event, Cli};

#[derive(Args)]
pub struct CopyArgs {
    /// The target repository (it must exist: `strata init` it first).
    #[arg(long)]
    to: String,
    /// The target's passphrase, if it is encrypted (one trailing newline is ignored).
    #[arg(long)]
    to_password_file: Option<PathBuf>,
    /// `DISK@ID`, `DISK@latest` or `DISK` (all its snapshots); all when none.
    snapshots: Vec<String>,
    #[arg(long)]
    json: bool,
}

pub fn copy(cli: &Cli, a: &CopyArgs) -> Result<ExitCode> {
    started_event(
        "copy",
        serde_json::json!({"to": a.to, "snapshots": a.snapshots}),
    );
    let src = open(cli)?;
    let wanted = select(&src, &a.snapshots)?;
    let dst = open_target(a)?;
    let report = copy::copy(&src, &dst, &wanted)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for s in &report.copied {
            println!("copied  {s}");
        }
        for s in &report.skipped {
            println!("present {s}");
        }
        println!(
            "{} chunks ({} bytes) sent to {}",
            report.chunks_sent, report.bytes_sent, a.to
        );
    }
    done_event("copy", serde_json::to_value(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// The snapshots named, each resolved before anything is copied.
fn select(repo: &Repository, names: &[String]) -> Result<Vec<SnapshotInfo>> {
    let mut out = Vec::new();
    for name in names {
        if name.contains('@') {
            out.push(repo.resolve(&SnapshotRef::parse(name)?)?);
            continue;
        }
        let disk = DiskName::parse(name)?;
        let snaps = repo.snapshots(Some(&disk))?;
        if snaps.is_empty() {
            bail!("disk {disk} has no snapshots in the source repository");
        }
        out.extend(snaps);
    }
    Ok(out)
}

fn open_target(a: &CopyArgs) -> Result<Repository> {
    let location = Location::parse(&a.to)?;
    let missing = match &location {
        Location::Dir(p) => !p.join("config.json").exists(),
        s3 => s3.open(false)?.get("config.json")?.is_none(),
    };
    if missing {
        bail!(
            "the target repository {} does not exist; create it first with: strata init --repo {}",
            a.to,
            a.to
        );
    }
    let passphrase = || -> strata::Result<String> {
        if let Some(file) = &a.to_password_file {
            return super::secret::read_file(file);
        }
        if std::io::stdin().is_terminal() {
            return rpassword::prompt_password("passphrase of the target repository: ")
                .map_err(|e| strata::Error::io("read the passphrase from the terminal", e));
        }
        Err(strata::Error::NeedPassphrase(
            "the target is encrypted: give its passphrase with --to-password-file FILE".into(),
        ))
    };
    Ok(Repository::open_at(&location, &passphrase)?)
}
