//! `strata locks` and `strata unlock --stale`: who holds the repository.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use strata::store::lease::{self, LeaseInfo};
use strata::store::lock;
use strata::store::repo::Repository;

use super::{open, Cli};

#[derive(Args)]
pub struct LocksArgs {
    /// One JSON array on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct UnlockArgs {
    /// Remove the leases whose holder is gone or that expired.
    #[arg(long, required = true)]
    stale: bool,
}

/// Every holder: the bucket's leases on object storage, this host's
/// registrations in a local repository (which the kernel releases when
/// their process dies, so they are never stale).
fn holders(repo: &Repository) -> Result<Vec<LeaseInfo>> {
    if let Some(backend) = repo.shared_backend() {
        return Ok(lease::list(backend.as_ref())?);
    }
    let host = lease::host_name();
    Ok(lock::holders(repo.home())?
        .into_iter()
        .map(|h| LeaseInfo {
            kind: h.activity.as_str().to_string(),
            host: host.clone(),
            pid: h.pid,
            started: strata::model::snapshot::format_time(
                &chrono::DateTime::from_timestamp_micros((h.started * 1e6) as i64)
                    .unwrap_or_default(),
            ),
            expires: String::new(),
            mountpoint: h.what.strip_prefix("mount ").map(str::to_string),
            what: h.what,
            boot: None,
            key: String::new(),
        })
        .collect())
}

pub fn locks(cli: &Cli, a: &LocksArgs) -> Result<ExitCode> {
    let repo = open(cli)?;
    let all = holders(&repo)?;
    if a.json {
        let out: Vec<_> = all
            .iter()
            .map(|l| {
                json!({
                    "kind": l.kind,
                    "host": l.host,
                    "pid": l.pid,
                    "started": l.started,
                    "expires": (!l.expires.is_empty()).then_some(&l.expires),
                    "mountpoint": l.mountpoint,
                    "what": l.what,
                    "stale": !l.expires.is_empty() && l.is_stale(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!("no locks");
    }
    for l in &all {
        let stale = if !l.expires.is_empty() && l.is_stale() {
            "  (stale)"
        } else {
            ""
        };
        println!(
            "{:<12} {}:{:<8} since {}  {}{stale}",
            l.kind, l.host, l.pid, l.started, l.what
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn unlock(cli: &Cli, a: &UnlockArgs) -> Result<ExitCode> {
    if !a.stale {
        bail!("only --stale leases can be removed");
    }
    let repo = open(cli)?;
    let Some(backend) = repo.shared_backend() else {
        // Local registrations of dead processes are dropped when listed.
        lock::holders(repo.home())?;
        println!("removed 0 stale locks (a local repository's locks go with their process)");
        return Ok(ExitCode::SUCCESS);
    };
    let removed = lease::remove_stale(backend.as_ref())?;
    for l in &removed {
        println!("removed {l}");
    }
    println!("removed {} stale locks", removed.len());
    Ok(ExitCode::SUCCESS)
}
