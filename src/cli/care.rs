//! Looking after the repository: `init`, `verify`, `forget`, `prune`,
//! `protect`/`unprotect`, `gc`, `repair`.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use strata::care::prune::{self as retention, Policy, PruneReport};
use strata::care::verify::{self as check, Report as VerifyReport, Subset, VerifyOptions};
use strata::care::{forget as removal, gc as collect, repair as fix};
use strata::model::name::DiskName;
use strata::model::snapshot::SnapshotInfo;
use strata::store::lock::MaintenanceLock;
use strata::store::partial;
use strata::store::repo::Repository;

use super::{done_event, open, repo_location, started_event, Cli};

#[derive(Args)]
pub struct VerifyArgs {
    /// DISK@ID or DISK@latest; none: every snapshot.
    snapshots: Vec<String>,
    /// Check presence and metadata only, without reading chunk data.
    #[arg(long)]
    quick: bool,
    /// Read only a subset of the chunks: N/T (group N of T) or P%.
    #[arg(long)]
    read_data_subset: Option<String>,
    /// One JSON report on stdout, for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ForgetArgs {
    /// DISK@ID or DISK@latest, one or more.
    #[arg(required_unless_present = "partial")]
    snapshots: Vec<String>,
    /// Remove the partial push of this disk instead (see `partials`).
    #[arg(long, value_name = "DISK", conflicts_with_all = ["snapshots", "prune"])]
    partial: Option<String>,
    /// Also delete the data no snapshot references any more.
    #[arg(long)]
    prune: bool,
}

#[derive(Args)]
pub struct PruneArgs {
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    keep_last: Option<usize>,
    /// Keep the newest snapshot of each of the N most recent hours that have one.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<usize>,
    /// The same per UTC day.
    #[arg(long, value_name = "N")]
    keep_daily: Option<usize>,
    /// The same per ISO week.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<usize>,
    /// The same per month.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<usize>,
    /// The same per year.
    #[arg(long, value_name = "N")]
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
    /// One JSON report on stdout, for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ProtectArgs {
    /// DISK@ID or DISK@latest.
    snapshot: String,
}

#[derive(Args)]
pub struct RepairArgs {
    /// Rebuild the SQLite catalog from the manifest files.
    #[arg(long, required = true)]
    rebuild_catalog: bool,
}

#[derive(Args)]
pub struct InitArgs {
    /// Encrypt the repository (passphrase from --password-file,
    /// STRATA_PASSWORD_FILE, STRATA_PASSWORD, or asked twice).
    #[arg(long)]
    encrypt: bool,
}

pub fn init(cli: &Cli, a: &InitArgs) -> Result<ExitCode> {
    let location = repo_location(cli)?;
    let passphrase = match a.encrypt {
        true => Some(super::secret::new_passphrase(cli, None)?),
        false => None,
    };
    let repo = Repository::init_at(&location, passphrase.as_deref())?;
    match repo.key_id() {
        Some(key) => println!(
            "created encrypted repository {location} (key {key}); without a passphrase its data is lost"
        ),
        None => println!("created repository {location}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolve every reference first, so that a typo changes nothing.
/// `PREFIX@ID` of a domain run stands for all its snapshots.
fn resolve_all(repo: &Repository, refs: &[String]) -> Result<Vec<SnapshotInfo>> {
    let mut out = Vec::new();
    for r in refs {
        for one in super::domain::refs(repo, r)? {
            out.push(repo.resolve(&one)?);
        }
    }
    Ok(out)
}

pub fn verify(cli: &Cli, a: &VerifyArgs) -> Result<ExitCode> {
    started_event("verify", json!({"snapshots": a.snapshots}));
    let repo = open(cli)?;
    let infos = resolve_all(&repo, &a.snapshots)?;
    let opts = VerifyOptions {
        quick: a.quick,
        subset: a
            .read_data_subset
            .as_deref()
            .map(Subset::parse)
            .transpose()?
            .unwrap_or(Subset::All),
    };
    let report = check::verify(&repo, &infos, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_verify_report(&report, a.quick);
    }
    done_event(
        "verify",
        json!({"ok": report.ok, "checked_snapshots": report.checked_snapshots,
               "checked_chunks": report.checked_chunks, "damaged": report.damaged.len()}),
    );
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_verify_report(report: &VerifyReport, quick: bool) {
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
        if quick { " (presence only)" } else { "" }
    );
}

pub fn forget(cli: &Cli, a: &ForgetArgs) -> Result<ExitCode> {
    let repo = open(cli)?;
    if let Some(disk) = &a.partial {
        let disk = DiskName::parse(disk)?;
        return match partial::remove(&partial::home(&repo), &disk)? {
            Some(what) => {
                println!("removed the {what}");
                Ok(ExitCode::SUCCESS)
            }
            None => bail!("disk {disk} has no partial push"),
        };
    }
    let lock = MaintenanceLock::acquire(&repo, "forget")?;
    let infos = resolve_all(&repo, &a.snapshots)?;
    if let Some(p) = infos.iter().find(|i| i.protected) {
        bail!(
            "{} is protected; unprotect it first (nothing was removed)",
            p.reference()
        );
    }
    for info in &infos {
        removal::forget_one(&repo, info)?;
        println!("removed {}", info.reference());
    }
    if a.prune {
        let r = collect::gc(&repo, &lock)?;
        println!(
            "gc: deleted {} chunks, freed {} bytes",
            r.deleted_chunks, r.freed_bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn prune(cli: &Cli, a: &PruneArgs) -> Result<ExitCode> {
    started_event("prune", json!({"dry_run": a.dry_run}));
    let repo = open(cli)?;
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
            .map(retention::parse_duration)
            .transpose()?,
    };
    let disk = a.disk.as_deref().map(DiskName::parse).transpose()?;
    let report = retention::prune(&repo, &policy, disk.as_ref(), a.dry_run)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_prune_report(&report, a.dry_run);
    }
    done_event(
        "prune",
        json!({"kept": report.plan.keep.len(), "removed": report.plan.remove.len(),
               "freed_bytes": report.freed_bytes}),
    );
    Ok(ExitCode::SUCCESS)
}

fn print_prune_report(report: &PruneReport, dry_run: bool) {
    let verb = if dry_run { "would " } else { "" };
    for k in &report.plan.keep {
        println!("keep    {}  ({})", k.snapshot, k.rules.join(", "));
    }
    for r in &report.plan.remove {
        println!("{verb}remove  {r}");
    }
    if !dry_run {
        println!("freed {} bytes", report.freed_bytes);
    }
}

pub fn protect(cli: &Cli, a: &ProtectArgs, protect: bool) -> Result<ExitCode> {
    let repo = open(cli)?;
    let _lock = MaintenanceLock::acquire(&repo, "protect")?;
    let infos = resolve_all(&repo, std::slice::from_ref(&a.snapshot))?;
    for info in infos {
        removal::set_protected(&repo, &info, protect)?;
        println!(
            "{} {}",
            if protect { "protected" } else { "unprotected" },
            info.reference()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct GcArgs {
    /// Remove partial pushes nobody wrote to for this long (e.g. 7d, 12h).
    #[arg(long, value_name = "DURATION", default_value = "7d")]
    partial_max_age: String,
}

pub fn gc(cli: &Cli, a: &GcArgs) -> Result<ExitCode> {
    let repo = open(cli)?;
    let opts = collect::GcOptions {
        partial_max_age: retention::parse_duration(&a.partial_max_age)?,
    };
    let lock = MaintenanceLock::acquire(&repo, "gc")?;
    let r = collect::gc_with(&repo, &lock, &opts)?;
    for p in &r.removed_partials {
        println!("removed the {p}");
    }
    println!(
        "deleted {} chunks ({} bytes), {} unreferenced manifests, {} temporaries, {} damaged-chunk \
         records no longer needed; kept {} recent chunks",
        r.deleted_chunks,
        r.freed_bytes,
        r.removed_manifests,
        r.removed_temporaries,
        r.removed_damaged,
        r.kept_recent
    );
    if r.repacked_packs > 0 {
        println!("repacked {} packs", r.repacked_packs);
    }
    if let Some(why) = &r.deferred {
        println!("{why}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn repair(cli: &Cli, _a: &RepairArgs) -> Result<ExitCode> {
    let location = repo_location(cli)?;
    let r = fix::rebuild_catalog(&location, &|| super::secret::passphrase(cli))?;
    for s in &r.skipped {
        eprintln!("skipped {s}");
    }
    println!("rebuilt the catalog: {} snapshots", r.restored);
    Ok(if r.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
