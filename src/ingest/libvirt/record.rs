//! The record of one domain run, `domains/<PREFIX>/<ID>.json`: which disks
//! it took and how, whether the guest was quiesced, the domain XML, and a
//! copy of the checkpoint it ended (to redefine it when libvirt lost it).
//!
//! Written inside the catalog transaction that inserts the run's rows,
//! before them: a record whose rows are missing (a crash before the
//! commit, a failed run) describes nothing and is ignored; a run exists
//! exactly when every one of its disks has its snapshot. In an encrypted
//! repository the body is sealed like a manifest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::name::{DiskName, Selector, SnapshotId, SnapshotRef};
use crate::store::crypto::{from_hex, to_hex};
use crate::store::repo::Repository;

pub const RUN_FORMAT: &str = "strata-domain-run/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub format: String,
    pub prefix: String,
    pub id: String,
    /// The libvirt domain's name.
    pub domain: String,
    pub quiesced: bool,
    /// The checkpoint this run made (none when no disk could hold one).
    pub checkpoint: Option<String>,
    /// That checkpoint's XML as libvirt gave it, without its parent.
    pub checkpoint_xml: Option<String>,
    pub disks: Vec<RunDisk>,
    /// The domain's (persistent) XML at backup time.
    pub domain_xml: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunDisk {
    pub target: String,
    /// The strata disk, `PREFIX/TARGET`.
    pub disk: String,
    /// full or incremental.
    pub kind: String,
    /// Why a disk that could have been incremental was taken in full.
    pub reason: Option<String>,
    /// Whether the run's checkpoint has a bitmap for this disk.
    pub in_checkpoint: bool,
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    format: String,
    sealed: String,
}

const DOMAINS: &str = "domains/";

fn key(prefix: &str, id: &str) -> String {
    format!("{DOMAINS}{prefix}/{id}.json")
}

fn what(prefix: &str, id: &str) -> String {
    format!("domain-run {prefix}@{id}")
}

/// Write the record durably (see `store::durable`).
pub fn save(repo: &Repository, run: &Run) -> Result<()> {
    let mut body = serde_json::to_vec_pretty(run).expect("a run serializes");
    if let Some(keys) = repo.keys() {
        let sealed = Sealed {
            format: RUN_FORMAT.into(),
            sealed: to_hex(&keys.seal_manifest(&what(&run.prefix, &run.id), &body)?),
        };
        body = serde_json::to_vec_pretty(&sealed).expect("a sealed run serializes");
    }
    repo.backend().put(&key(&run.prefix, &run.id), &body)
}

/// Remove a record whose run was not committed.
pub fn discard(repo: &Repository, prefix: &str, id: &str) {
    let _ = repo.backend().delete(&key(prefix, id));
}

fn read(repo: &Repository, prefix: &str, id: &str) -> Result<Option<Run>> {
    let file = key(prefix, id);
    let bad = |m: String| Error::invalid(format!("{file}: {m}"));
    let Some(body) = repo.backend().get(&file)? else {
        return Ok(None);
    };
    let body = match repo.keys() {
        None => body,
        Some(keys) => {
            let s: Sealed = serde_json::from_slice(&body)
                .map_err(|e| bad(format!("not a sealed run record: {e}")))?;
            let bytes = from_hex(&s.sealed).ok_or_else(|| bad("malformed seal".into()))?;
            keys.open_manifest(&what(prefix, id), &bytes)?
        }
    };
    let run: Run =
        serde_json::from_slice(&body).map_err(|e| bad(format!("malformed run record: {e}")))?;
    if run.prefix != prefix || run.id != id {
        return Err(bad("describes another run than its path names".into()));
    }
    Ok(Some(run))
}

/// Whether every disk of the run has its snapshot (the run was committed
/// and none of its snapshots was forgotten since).
fn visible(repo: &Repository, run: &Run) -> bool {
    let Ok(id) = SnapshotId::parse(&run.id) else {
        return false;
    };
    !run.disks.is_empty()
        && run.disks.iter().all(|d| {
            DiskName::parse(&d.disk).is_ok_and(|disk| {
                repo.resolve(&SnapshotRef {
                    disk,
                    selector: Selector::Id(id.clone()),
                })
                .is_ok()
            })
        })
}

/// The runs of PREFIX that exist, oldest first.
pub fn runs(repo: &Repository, prefix: &str) -> Result<Vec<Run>> {
    runs_under(repo, &format!("{DOMAINS}{prefix}/"))
}

fn runs_under(repo: &Repository, under: &str) -> Result<Vec<Run>> {
    let mut out = Vec::new();
    for o in repo.backend().list(under)? {
        let Some((prefix, id)) = o
            .key
            .strip_prefix(DOMAINS)
            .and_then(|k| k.strip_suffix(".json"))
            .and_then(|k| k.split_once('/'))
        else {
            continue;
        };
        if prefix.contains('/') || SnapshotId::parse(id).is_err() {
            continue;
        }
        if let Some(run) = read(repo, prefix, id)? {
            if visible(repo, &run) {
                out.push(run);
            }
        }
    }
    out.sort_by(|a, b| (&a.prefix, &a.id).cmp(&(&b.prefix, &b.id)));
    Ok(out)
}

/// Every existing run of every prefix.
pub fn all_runs(repo: &Repository) -> Result<Vec<Run>> {
    runs_under(repo, DOMAINS)
}

/// Every existing run, by (disk, id) of each of its snapshots: what
/// `snapshots --json` reports as `domain` and `quiesced`.
pub fn by_snapshot(repo: &Repository) -> Result<BTreeMap<(String, String), (String, bool)>> {
    let mut out = BTreeMap::new();
    for run in all_runs(repo)? {
        for d in &run.disks {
            out.insert(
                (d.disk.clone(), run.id.clone()),
                (run.prefix.clone(), run.quiesced),
            );
        }
    }
    Ok(out)
}

/// The run `PREFIX@ID` (or `PREFIX@latest`) names, if `s` names one.
pub fn find(repo: &Repository, s: &str) -> Result<Option<Run>> {
    let Some((prefix, sel)) = s.rsplit_once('@') else {
        return Ok(None);
    };
    if prefix.contains('/') || DiskName::parse(prefix).is_err() {
        return Ok(None);
    }
    let runs = runs(repo, prefix)?;
    Ok(if sel == "latest" {
        runs.into_iter().last()
    } else {
        runs.into_iter().find(|r| r.id == sel)
    })
}

/// The snapshots of a run, `PREFIX/TARGET@ID` each.
pub fn refs(run: &Run) -> Result<Vec<SnapshotRef>> {
    let id = SnapshotId::parse(&run.id)?;
    run.disks
        .iter()
        .map(|d| {
            Ok(SnapshotRef {
                disk: DiskName::parse(&d.disk)?,
                selector: Selector::Id(id.clone()),
            })
        })
        .collect()
}
