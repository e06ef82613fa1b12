//! libvirt domains: `backup --domain`, `domain-xml`, `restore --domain`,
//! and `PREFIX@ID` naming every snapshot of a domain run.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

use strata::model::name::SnapshotRef;
use strata::serve::mount::ExtraFiles;
use strata::store::repo::Repository;

use super::Cli;

#[derive(Args)]
pub struct DomainXmlArgs {
    /// PREFIX@ID (or PREFIX@latest) of a domain run.
    run: String,
}

/// The options of `backup --domain`.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub struct DomainBackup<'a> {
    pub domain: &'a str,
    pub connect: Option<&'a str>,
    pub name: Option<&'a str>,
    pub exclude: &'a [String],
    pub full: bool,
    pub quiesce: bool,
    pub label: &'a str,
    pub check_unchanged: f64,
}

#[cfg(feature = "libvirt")]
mod imp {
    use super::*;
    use std::path::PathBuf;

    use anyhow::Context;
    use serde_json::json;

    use super::super::{done_event, open, started_event};
    use strata::ingest::libvirt::{self, record, DomainOptions};
    use strata::serve::mount::ExtraFile;

    pub fn backup(cli: &Cli, a: &DomainBackup) -> Result<ExitCode> {
        let uri = libvirt::default_uri(a.connect);
        started_event("backup", json!({"domain": a.domain, "connect": uri}));
        let repo = open(cli)?;
        let opts = DomainOptions {
            uri,
            domain: a.domain.to_string(),
            name: a.name.map(String::from),
            exclude: a.exclude.to_vec(),
            full: a.full,
            quiesce: a.quiesce,
            label: a.label.to_string(),
            check_unchanged: a.check_unchanged,
        };
        let done = libvirt::backup_domain(&repo, &opts)
            .with_context(|| format!("backup of domain {}", a.domain))?;
        for n in &done.notes {
            println!("note: {n}");
        }
        for s in &done.snapshots {
            println!("{}", s.summary());
        }
        let r = &done.run;
        println!(
            "run {}@{} ({} disks, checkpoint {}, {})",
            r.prefix,
            r.id,
            r.disks.len(),
            r.checkpoint.as_deref().unwrap_or("none"),
            if r.quiesced {
                "quiesced"
            } else {
                "crash-consistent"
            }
        );
        done_event(
            "backup",
            json!({"run": format!("{}@{}", r.prefix, r.id), "quiesced": r.quiesced,
                   "checkpoint": r.checkpoint,
                   "snapshots": done.snapshots.iter().map(|s| s.reference()).collect::<Vec<_>>()}),
        );
        Ok(ExitCode::SUCCESS)
    }

    fn find(repo: &Repository, s: &str) -> Result<record::Run> {
        match record::find(repo, s)? {
            Some(run) => Ok(run),
            None => bail!(
                "{s} is not a domain run (PREFIX@ID); list them with: strata snapshots --json (field domain)"
            ),
        }
    }

    pub fn domain_xml(cli: &Cli, a: &DomainXmlArgs) -> Result<ExitCode> {
        let repo = open(cli)?;
        let run = find(&repo, &a.run)?;
        print!("{}", run.domain_xml);
        Ok(ExitCode::SUCCESS)
    }

    pub fn restore(cli: &Cli, run: &str, dir: &Path) -> Result<ExitCode> {
        started_event("restore", json!({"domain": run, "target": dir}));
        let repo = open(cli)?;
        let run = find(&repo, run)?;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolve {}", dir.display()))?;
        let mut files = BTreeMap::new();
        let mut failed = false;
        for (d, r) in run.disks.iter().zip(record::refs(&run)?) {
            let info = repo.resolve(&r)?;
            let target: PathBuf = dir.join(format!("{}.raw", d.target));
            let restored = strata::serve::restore::restore(&repo, &info, &target)
                .with_context(|| format!("restore {} to {}", info.reference(), target.display()))?;
            if !restored.damaged.is_empty() {
                eprintln!(
                    "strata: {} has {} damaged ranges, written as zeroes",
                    info.reference(),
                    restored.damaged.len()
                );
                failed = true;
            }
            println!("restored {} to {}", info.reference(), target.display());
            let path = target
                .to_str()
                .context("restore directory path is not UTF-8")?
                .to_string();
            files.insert(d.target.clone(), path);
        }
        let xml = libvirt::xml::with_raw_sources(&run.domain_xml, &files)?;
        let xml_path = dir.join(format!("{}.xml", run.prefix));
        std::fs::write(&xml_path, xml).with_context(|| format!("write {}", xml_path.display()))?;
        println!("domain XML {}", xml_path.display());
        done_event(
            "restore",
            json!({"domain": format!("{}@{}", run.prefix, run.id), "target": dir, "ok": !failed}),
        );
        Ok(if failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    }

    pub fn expand(repo: &Repository, s: &str) -> Result<Option<Vec<SnapshotRef>>> {
        match record::find(repo, s)? {
            Some(run) => Ok(Some(record::refs(&run)?)),
            None => Ok(None),
        }
    }

    pub fn by_snapshot(repo: &Repository) -> Result<BTreeMap<(String, String), (String, bool)>> {
        Ok(record::by_snapshot(repo)?)
    }

    pub fn mount_files() -> Option<ExtraFiles> {
        Some(ExtraFiles(std::sync::Arc::new(
            |repo: &Repository| match record::all_runs(repo) {
                Ok(runs) => runs
                    .into_iter()
                    .map(|r| ExtraFile {
                        path: format!("{}/{}.xml", r.prefix, r.id),
                        time: strata::model::name::SnapshotId::parse(&r.id)
                            .ok()
                            .and_then(|id| {
                                chrono::NaiveDateTime::parse_from_str(
                                    &id.as_str()[..16],
                                    "%Y%m%dT%H%M%SZ",
                                )
                                .ok()
                            })
                            .map_or(std::time::UNIX_EPOCH, |t| t.and_utc().into()),
                        body: r.domain_xml.into_bytes(),
                    })
                    .collect(),
                Err(e) => {
                    log::warn!("listing domain runs for the mount: {e}");
                    Vec::new()
                }
            },
        )))
    }
}

#[cfg(not(feature = "libvirt"))]
mod imp {
    use super::*;

    const OFF: &str = "this strata was built without libvirt support (cargo feature libvirt)";

    pub fn backup(_: &Cli, _: &DomainBackup) -> Result<ExitCode> {
        bail!(OFF)
    }
    pub fn domain_xml(_: &Cli, _: &DomainXmlArgs) -> Result<ExitCode> {
        bail!(OFF)
    }
    pub fn restore(_: &Cli, _: &str, _: &Path) -> Result<ExitCode> {
        bail!(OFF)
    }
    pub fn expand(_: &Repository, _: &str) -> Result<Option<Vec<SnapshotRef>>> {
        Ok(None)
    }
    pub fn by_snapshot(_: &Repository) -> Result<BTreeMap<(String, String), (String, bool)>> {
        Ok(BTreeMap::new())
    }
    pub fn mount_files() -> Option<ExtraFiles> {
        None
    }
}

pub use imp::{backup, by_snapshot, domain_xml, mount_files, restore};

/// The snapshots `s` names: every disk of a run for `PREFIX@ID`, else the
/// one `DISK@ID`.
pub fn refs(repo: &Repository, s: &str) -> Result<Vec<SnapshotRef>> {
    match imp::expand(repo, s)? {
        Some(refs) => Ok(refs),
        None => Ok(vec![SnapshotRef::parse(s)?]),
    }
}
