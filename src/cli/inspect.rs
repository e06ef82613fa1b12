//! Read-only listings: `snapshots`, `partials` and `map`.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use strata::model::extent::{ExtentDoc, ExtentKind, EXTENTS_FORMAT};
use strata::model::name::{DiskName, SnapshotRef};
use strata::model::snapshot::{format_time, SnapshotInfo};
use strata::store::partial;
use strata::store::repo::Repository;

use super::{open, Cli};

#[derive(Args)]
pub struct SnapshotsArgs {
    /// Only this disk.
    #[arg(long)]
    disk: Option<String>,
    /// One JSON array on stdout, for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PartialsArgs {
    /// One JSON array on stdout, for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct MapArgs {
    /// DISK@ID or DISK@latest.
    snapshot: String,
    /// The snapshot's own extents (what it stored), not the whole image's.
    #[arg(long)]
    own: bool,
    /// The extent JSON document (strata-extents/1) on stdout.
    #[arg(long)]
    json: bool,
}

pub fn snapshots(cli: &Cli, a: &SnapshotsArgs) -> Result<ExitCode> {
    let repo = open(cli)?;
    let disk = a.disk.as_deref().map(DiskName::parse).transpose()?;
    let snaps = repo.snapshots(disk.as_ref())?;
    if a.json {
        let runs = super::domain::by_snapshot(&repo)?;
        let v: Vec<_> = snaps
            .iter()
            .map(|s| {
                let mut j = s.to_json();
                let run = runs.get(&(s.disk.to_string(), s.id.to_string()));
                if let Some(o) = j.as_object_mut() {
                    o.insert("domain".into(), run.map(|r| r.0.clone()).into());
                    o.insert("quiesced".into(), run.map(|r| r.1).into());
                }
                j
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_snapshot_table(&snaps);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn partials(cli: &Cli, a: &PartialsArgs) -> Result<ExitCode> {
    let repo = open(cli)?;
    let partials = partial::list(&partial::home(&repo))?;
    if a.json {
        let v: Vec<_> = partials.iter().map(|p| p.to_json()).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<12} {:<21} {:>14} {:>14} {:<20} {:<20} state",
        "disk", "kind", "parent", "size", "written", "started", "last written"
    );
    for p in &partials {
        println!(
            "{:<24} {:<12} {:<21} {:>14} {:>14} {:<20} {:<20} {}",
            p.disk.to_string(),
            p.target.kind.as_str(),
            p.target
                .parent
                .as_ref()
                .map_or("-".to_string(), |p| p.to_string()),
            p.target.size,
            p.data_bytes,
            format_time(&p.created),
            format_time(&p.updated),
            if p.in_use { "receiving" } else { "resumable" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_snapshot_table(snaps: &[SnapshotInfo]) {
    println!(
        "{:<32} {:<20} {:<12} {:>14} {:>12} {:<21} label",
        "snapshot", "time", "kind", "size", "stored", "parent"
    );
    for s in snaps {
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

pub fn map(cli: &Cli, a: &MapArgs) -> Result<ExitCode> {
    let repo = open(cli)?;
    let info = repo.resolve(&SnapshotRef::parse(&a.snapshot)?)?;
    let doc = if a.own {
        repo.manifest(&info)
            .and_then(|m| m.extent_doc())
            .with_context(|| format!("manifest of {}", info.reference()))?
    } else {
        image_doc(&repo, &info)?
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{:>16} {:>16} type", "offset", "length");
        for e in &doc.extents {
            let kind = if e.kind == ExtentKind::Data {
                "data"
            } else {
                "zero"
            };
            println!("{:>16} {:>16} {kind}", e.offset, e.length);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The whole image, described as a full snapshot would be.
fn image_doc(repo: &Repository, info: &SnapshotInfo) -> Result<ExtentDoc> {
    let map = repo.image_map(info)?;
    Ok(ExtentDoc {
        format: EXTENTS_FORMAT.to_string(),
        disk: info.disk.to_string(),
        snapshot: info.id.to_string(),
        kind: "full".to_string(),
        parent: None,
        size: info.size,
        granularity: info.granularity,
        bitmap: info.bitmap.clone(),
        extents: map.extents(),
    })
}
