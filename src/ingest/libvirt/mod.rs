//! `strata backup --domain`: every disk of a libvirt domain at one
//! checkpoint, through libvirt's backup API in pull mode and strata's NBD
//! client, committed as one group of snapshots sharing one id.
//!
//! One run: (1) clean up what a killed run left (its backup job, its
//! checkpoint) and redefine strata's last checkpoint if libvirt lost it;
//! (2) decide per disk: incremental from the last run's checkpoint, or
//! full (first run, `--full`, new disk, raw format, broken bitmap);
//! (3) freeze the guest's file systems if asked, begin the backup job
//! together with the new checkpoint, thaw; (4) capture every disk from
//! libvirt's NBD export without committing; (5) commit all snapshots and
//! the run record at once; (6) end the job and delete strata's older
//! checkpoints. Any failure before (5) ends the job and deletes the new
//! checkpoint, so the next run is an incremental from the last good one.
//!
//! Nothing else in the library knows about libvirt; the CLI calls
//! [`backup_domain`] and the helpers of [`record`].

pub mod record;
pub mod virsh;
pub mod xml;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::error::{Error, IoContext, Result};
use crate::ingest::backup::{capture_snapshot, BackupOptions, Prechunked};
use crate::ingest::nbd::client::NbdSource;
use crate::ingest::nbd::NbdUri;
use crate::model::name::DiskName;
use crate::model::snapshot::{SnapshotInfo, SnapshotKind};
use crate::store::repo::Repository;

use record::{Run, RunDisk};
use virsh::Virsh;
use xml::{Disk, Part};

/// Checkpoints strata made, and only those, start with this.
pub const CHECKPOINT_PREFIX: &str = "strata-";

pub struct DomainOptions {
    /// Connection URI.
    pub uri: String,
    pub domain: String,
    /// Disk name prefix (default: the domain name).
    pub name: Option<String>,
    /// Targets not to back up.
    pub exclude: Vec<String>,
    pub full: bool,
    pub quiesce: bool,
    pub label: String,
    /// Percent of unchanged blocks to compare with the parent.
    pub check_unchanged: f64,
}

/// What a run did, for the CLI to print.
pub struct DomainRun {
    pub run: Run,
    pub snapshots: Vec<SnapshotInfo>,
    /// Things the operator should know (full disks and why, no agent...).
    pub notes: Vec<String>,
}

/// The connection URI: `--connect`, else LIBVIRT_DEFAULT_URI, else
/// qemu:///system.
pub fn default_uri(connect: Option<&str>) -> String {
    connect
        .map(String::from)
        .or_else(|| std::env::var("LIBVIRT_DEFAULT_URI").ok())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "qemu:///system".into())
}

/// The disk name prefix of a domain: `--name`, else the domain name if it
/// is one valid name segment.
pub fn prefix(domain: &str, name: Option<&str>) -> Result<String> {
    let p = name.unwrap_or(domain);
    let valid = !p.contains('/') && DiskName::parse(p).is_ok();
    match (valid, name) {
        (true, _) => Ok(p.to_string()),
        (false, None) => Err(Error::invalid(format!(
            "domain name {domain:?} is not a valid disk name segment (letters, digits, '.', '_', '-'; \
             not starting with '.'): give the disks a prefix with --name"
        ))),
        (false, Some(_)) => Err(Error::invalid(format!(
            "--name {p:?} is not a valid disk name segment (letters, digits, '.', '_', '-'; no '/')"
        ))),
    }
}

pub fn backup_domain(repo: &Repository, opts: &DomainOptions) -> Result<DomainRun> {
    let prefix = prefix(&opts.domain, opts.name.as_deref())?;
    let v = Virsh {
        uri: opts.uri.clone(),
        domain: opts.domain.clone(),
    };
    let mut notes = Vec::new();
    // libvirt's backup API needs a running QEMU. A shut-off domain is
    // started paused (its vCPUs never run, so the guest does not) and
    // destroyed after the run: one code path, and libvirt keeps managing
    // checkpoints and bitmaps itself, which a qemu-nbd of the images
    // would have to imitate.
    let state = v.state()?;
    let _started = if state == "shut off" {
        v.dom("start", &["--paused"])?;
        notes.push(format!(
            "domain {} was shut off: started paused for the backup (the guest did not run) and stopped again",
            opts.domain
        ));
        Some(Destroy(&v))
    } else {
        None
    };
    let live_xml = v.xml(false)?;
    let domain_xml = v.xml(true).unwrap_or_else(|_| live_xml.clone());
    let all = xml::disks(&live_xml)?;
    for t in &opts.exclude {
        if !all.iter().any(|d| &d.target == t) {
            return Err(Error::invalid(format!(
                "--exclude {t}: domain {} has no disk with that target",
                opts.domain
            )));
        }
    }

    cleanup_stale_job(&v)?;
    let runs = record::runs(repo, &prefix)?;
    let last = runs.last();
    let since = match last.and_then(|r| r.checkpoint.clone().map(|c| (r, c))) {
        Some((run, cp)) if !opts.full => match ensure_checkpoint(&v, run, &cp, &mut notes) {
            Ok(cp) => Some(cp),
            // Without the checkpoint there is nothing to be incremental
            // from; full snapshots are always right.
            Err(e) => {
                notes.push(format!("{e}: taking full snapshots"));
                None
            }
        },
        _ => None,
    };
    // Checkpoints strata made that no committed run ended (a killed run's):
    // deleting one merges its bitmap into its parent, so `since` still
    // covers every write since the last good run.
    for cp in v.checkpoints()? {
        if cp.starts_with(CHECKPOINT_PREFIX) && Some(&cp) != since.as_ref() {
            delete_checkpoint(&v, &cp, &mut notes);
        }
    }

    // Which disks, and how.
    let mut plan: Vec<(Disk, Option<String>)> = Vec::new(); // (disk, reason for a full)
    for d in &all {
        if opts.exclude.contains(&d.target) {
            continue;
        }
        if let Err(why) = d.backupable() {
            log::info!("not backing up {}: {why}", d.target);
            continue;
        }
        let disk = DiskName::parse(&format!("{prefix}/{}", d.target))?;
        let in_last = last.and_then(|r| r.disks.iter().find(|x| x.target == d.target));
        let reason = if !d.has_bitmaps() {
            Some(format!(
                "its format ({}) cannot hold a dirty bitmap: full every run, deduplicated",
                d.format
            ))
        } else if opts.full {
            Some("--full".into())
        } else if since.is_none() {
            (!runs.is_empty() || repo.snapshots(Some(&disk)).is_ok_and(|s| !s.is_empty()))
                .then(|| "no earlier checkpoint of strata's to go on from".into())
                .or_else(|| Some("first run".into()))
        } else if !in_last.is_some_and(|x| x.in_checkpoint) {
            Some("new disk (not in the last run's checkpoint)".into())
        } else if !latest_is(repo, &disk, last) {
            // The bitmap holds the writes since the last run's checkpoint;
            // laid over any other parent it would make a wrong image.
            Some("its latest snapshot is not the last run's (forgotten?)".into())
        } else {
            None
        };
        plan.push((d.clone(), reason));
    }
    if plan.is_empty() {
        return Err(Error::invalid(format!(
            "domain {} has no disk to back up (file or block disks that are not excluded)",
            opts.domain
        )));
    }

    let time = Utc::now();
    let checkpoint = format!("{CHECKPOINT_PREFIX}{}", time.format("%Y%m%dT%H%M%S%.6fZ"));
    let work = WorkDir::new()?;
    let socket = work.path.join("nbd.sock");
    let socket_s = path_string(&socket)?;

    // Begin; a disk whose bitmap libvirt finds missing or broken goes full
    // and we try again (each retry fixes one disk, so this ends).
    let quiesced;
    let job = loop {
        let bitmaps: Vec<String> = plan
            .iter()
            .filter(|(d, _)| d.has_bitmaps())
            .map(|(d, _)| d.target.clone())
            .collect();
        let scratch: BTreeMap<String, String> = plan
            .iter()
            .map(|(d, _)| {
                let p = work.path.join(format!("scratch-{}.qcow2", d.target));
                Ok((d.target.clone(), path_string(&p)?))
            })
            .collect::<Result<_>>()?;
        let mut parts = BTreeMap::new();
        for (d, reason) in &plan {
            let scratch = scratch[&d.target].as_str();
            let part = match (&since, reason) {
                (Some(since), None) => Part::Incremental { scratch, since },
                _ => Part::Full { scratch },
            };
            parts.insert(d.target.clone(), part);
        }
        let bxml = work.path.join("backup.xml");
        let cxml = work.path.join("checkpoint.xml");
        write(&bxml, &xml::backup(&socket_s, &all, &parts))?;
        let with_checkpoint = !bitmaps.is_empty();
        write(&cxml, &xml::checkpoint(&checkpoint, &all, &bitmaps))?;
        let thaw = if opts.quiesce {
            match v.dom("domfsfreeze", &[]) {
                Ok(_) => Some(Thaw(&v)),
                Err(e) => {
                    notes.push(format!(
                        "the guest agent did not freeze the file systems ({e}): going on crash-consistent"
                    ));
                    None
                }
            }
        } else {
            None
        };
        let begun = if with_checkpoint {
            v.backup_begin(&bxml, &cxml)
        } else {
            v.dom("backup-begin", &[&path_string(&bxml)?]).map(drop)
        };
        let q = thaw.is_some();
        drop(thaw); // thaw right after the checkpoint, also on failure
        match begun {
            Ok(()) => {
                quiesced = q;
                break Job {
                    v: &v,
                    checkpoint: with_checkpoint.then(|| checkpoint.clone()),
                    committed: false,
                };
            }
            Err(e) => {
                let msg = e.to_string();
                let broken = xml::broken_bitmap_disk(&msg);
                match broken
                    .and_then(|t| plan.iter_mut().find(|(d, r)| d.target == t && r.is_none()))
                {
                    Some((d, reason)) => {
                        *reason = Some(format!("its bitmap is missing or broken ({msg})"));
                        log::warn!("{}: bitmap unusable, taking it in full", d.target);
                    }
                    None => return Err(e),
                }
            }
        }
    };
    if opts.quiesce && !quiesced && !notes.iter().any(|n| n.contains("guest agent")) {
        notes.push("the file systems were not frozen: crash-consistent".into());
    }

    // Capture every disk; nothing is committed until all succeeded.
    let mut captured = Vec::new();
    let mut run_disks = Vec::new();
    for (d, reason) in &plan {
        let disk = DiskName::parse(&format!("{prefix}/{}", d.target))?;
        let uri = NbdUri::parse(&format!("nbd+unix:///{}?socket={socket_s}", d.target))?;
        let incremental = reason.is_none() && since.is_some();
        let bitmap = format!("backup-{}", d.target);
        let source = NbdSource::connect(&uri, incremental.then_some(bitmap.as_str()))
            .map_err(|e| Error::invalid(format!("{disk}: libvirt's NBD export: {e}")))?;
        let changes = if incremental {
            Some(source.dirty(&bitmap)?)
        } else {
            None
        };
        let bopts = BackupOptions {
            disk: Some(disk.clone()),
            changes,
            label: opts.label.clone(),
            checkpoint: d.has_bitmaps().then(|| checkpoint.clone()),
            bitmap: incremental.then(|| since.clone()).flatten(),
            time: Some(time),
            check_unchanged: opts.check_unchanged,
            ..Default::default()
        };
        let c = capture_snapshot(repo, &source, &bopts, Prechunked::default())
            .map_err(|e| Error::invalid(format!("{disk}: {e}")))?;
        source.disconnect();
        if let Some(r) = reason {
            notes.push(format!("{disk}: full: {r}"));
        }
        run_disks.push(RunDisk {
            target: d.target.clone(),
            disk: disk.to_string(),
            kind: if c.snapshot.kind == SnapshotKind::Full {
                "full"
            } else {
                "incremental"
            }
            .into(),
            reason: reason.clone(),
            in_checkpoint: job.checkpoint.is_some() && d.has_bitmaps(),
        });
        captured.push(c);
    }
    crate::testhook::pause("domain:captured");

    let checkpoint_xml = match &job.checkpoint {
        Some(cp) => Some(xml::checkpoint_for_redefine(&v.checkpoint_xml(cp)?)?),
        None => None,
    };
    let mut run = Run {
        format: record::RUN_FORMAT.into(),
        prefix: prefix.clone(),
        id: String::new(),
        domain: xml::domain_name(&live_xml)?,
        quiesced,
        checkpoint: job.checkpoint.clone(),
        checkpoint_xml,
        disks: run_disks,
        domain_xml,
    };
    // The registrations stay held until the commit is done (gc spares
    // the chunks of running backups).
    let (news, _registrations): (Vec<_>, Vec<_>) =
        captured.into_iter().map(|c| c.into_parts()).unzip();
    let saved = std::cell::RefCell::new(None);
    let committed = repo.commit_group(news, &prefix, &|id| {
        let mut r = run.clone();
        r.id = id.to_string();
        record::save(repo, &r)?;
        *saved.borrow_mut() = Some(r.id.clone());
        Ok(())
    });
    let snapshots = match committed {
        Ok(s) => s,
        Err(e) => {
            if let Some(id) = saved.borrow().as_ref() {
                record::discard(repo, &prefix, id);
            }
            return Err(e);
        }
    };
    run.id = snapshots[0].id.to_string();
    let mut job = job;
    job.committed = true;
    drop(job); // ends the backup job
               // The new checkpoint is the one to go on from; strata's older ones are
               // no longer needed.
    if let Some(cp) = &run.checkpoint {
        for old in v.checkpoints()? {
            if old.starts_with(CHECKPOINT_PREFIX) && &old != cp {
                delete_checkpoint(&v, &old, &mut notes);
            }
        }
    }
    Ok(DomainRun {
        run,
        snapshots,
        notes,
    })
}

/// Whether the disk's latest snapshot is the one `run` made.
fn latest_is(repo: &Repository, disk: &DiskName, run: Option<&Run>) -> bool {
    let latest = repo.resolve(&crate::model::name::SnapshotRef {
        disk: disk.clone(),
        selector: crate::model::name::Selector::Latest,
    });
    match (latest, run) {
        (Ok(s), Some(r)) => s.id.as_str() == r.id && s.checkpoint == r.checkpoint,
        _ => false,
    }
}

/// Make sure libvirt knows checkpoint `cp` of the last run, redefining it
/// from the copy in the run record if libvirt lost its metadata (the
/// bitmaps live in the qcow2 images and survive that).
fn ensure_checkpoint(v: &Virsh, run: &Run, cp: &str, notes: &mut Vec<String>) -> Result<String> {
    if v.checkpoints()?.iter().any(|c| c == cp) {
        return Ok(cp.to_string());
    }
    let Some(saved) = &run.checkpoint_xml else {
        return Err(Error::invalid(format!(
            "checkpoint {cp} is gone and the repository has no copy of it"
        )));
    };
    let work = WorkDir::new()?;
    let file = work.path.join("checkpoint.xml");
    write(&file, saved)?;
    v.checkpoint_redefine(&file)
        .map_err(|e| Error::invalid(format!("redefining the lost checkpoint {cp}: {e}")))?;
    notes.push(format!(
        "libvirt had lost checkpoint {cp}: redefined it from the copy in the repository"
    ));
    Ok(cp.to_string())
}

/// Delete one of strata's checkpoints. libvirt refuses when a disk's
/// bitmap is already gone; then only its metadata is deleted (libvirt no
/// longer offers it) and the note says that bitmaps of that checkpoint may
/// stay in the other disks' images. Never fails the run: a checkpoint left
/// over does not make later incrementals wrong, libvirt merges bitmaps
/// along the chain.
fn delete_checkpoint(v: &Virsh, cp: &str, notes: &mut Vec<String>) {
    let Err(e) = v.checkpoint_delete(cp) else {
        return;
    };
    match v.dom("checkpoint-delete", &[cp, "--metadata"]) {
        Ok(_) => notes.push(format!(
            "checkpoint {cp}: libvirt could not delete it ({e}); deleted its metadata only, \
             so its bitmaps may stay in the disk images (qemu-img bitmap --remove, domain off)"
        )),
        Err(e2) => notes.push(format!("could not delete checkpoint {cp}: {e}; {e2}")),
    }
}

/// A backup job a killed strata left running would block ours: end it if
/// it is strata's (its socket is in a strata work directory) and the
/// strata that began it is gone, and wait until libvirt has let go of it.
/// A live strata's job is left alone (the run fails as busy), and so is
/// anyone else's.
fn cleanup_stale_job(v: &Virsh) -> Result<()> {
    let Some(x) = v.backup_xml() else {
        return Ok(());
    };
    let Some(owner) = job_owner(&x) else {
        return Err(Error::invalid(format!(
            "domain {} has a backup job strata did not start; it is left alone: end it first",
            v.domain
        )));
    };
    // SAFETY: signal 0 only checks whether the process exists.
    if owner != std::process::id() && unsafe { libc::kill(owner as i32, 0) } == 0 {
        return Err(Error::Busy(format!(
            "strata (pid {owner}) is backing up domain {} right now",
            v.domain
        )));
    }
    log::warn!("ending a backup job a killed strata left behind");
    v.abort_job()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while v.backup_xml().is_some() {
        if Instant::now() > deadline {
            return Err(Error::invalid("the old backup job did not end within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The pid of the strata whose work directory holds the socket in a
/// backup job's XML, if it is strata's.
fn job_owner(backup_xml: &str) -> Option<u32> {
    let at = backup_xml.find(WORK_PREFIX)? + WORK_PREFIX.len();
    let digits: String = backup_xml[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The running backup job: ended on drop; until committed, its new
/// checkpoint is deleted too (a failed run leaves libvirt as it was).
struct Job<'a> {
    v: &'a Virsh,
    checkpoint: Option<String>,
    committed: bool,
}

impl Drop for Job<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.v.abort_job() {
            log::warn!("ending the backup job: {e}");
        }
        if !self.committed {
            if let Some(cp) = &self.checkpoint {
                if let Err(e) = self.v.checkpoint_delete(cp) {
                    log::warn!("removing checkpoint {cp} of the failed run: {e}");
                }
            }
        }
    }
}

/// Thaws the guest's file systems on drop.
struct Thaw<'a>(&'a Virsh);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.dom("domfsthaw", &[]) {
            log::warn!("thawing the guest's file systems: {e}");
        }
    }
}

/// Stops the domain strata started paused.
struct Destroy<'a>(&'a Virsh);

impl Drop for Destroy<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.dom("destroy", &[]) {
            log::warn!("stopping the domain started for the backup: {e}");
        }
    }
}

/// Where a run's socket and scratch files are: QEMU (run by libvirt)
/// creates them, so not in the repository.
const WORK_PREFIX: &str = "strata-libvirt-";

struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn new() -> Result<Self> {
        let base = std::env::temp_dir();
        Self::remove_stale(&base);
        for n in 0..1000u32 {
            let path = base.join(format!("{WORK_PREFIX}{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(WorkDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(format!("create {}", path.display()), e)),
            }
        }
        Err(Error::invalid("no free work directory name"))
    }
}

impl WorkDir {
    /// Work directories of killed runs (their strata is gone): libvirt
    /// ended their jobs, what is left are the directory and scratch files.
    fn remove_stale(base: &Path) {
        let Ok(entries) = std::fs::read_dir(base) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(WORK_PREFIX))
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: signal 0 only checks whether the process exists.
            let gone = unsafe { libc::kill(pid, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            if gone {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).ctx(|| format!("write {}", path.display()))
}

fn path_string(p: &Path) -> Result<String> {
    p.to_str()
        .map(String::from)
        .ok_or_else(|| Error::invalid(format!("path {} is not UTF-8", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_of_a_job() {
        let x = "<domainbackup mode='pull'><server transport='unix' socket='/tmp/strata-libvirt-4242-0/nbd.sock'/></domainbackup>";
        assert_eq!(job_owner(x), Some(4242));
        assert_eq!(
            job_owner("<domainbackup><server socket='/run/other.sock'/></domainbackup>"),
            None
        );
    }

    #[test]
    fn prefixes() {
        assert_eq!(prefix("web01", None).unwrap(), "web01");
        assert!(prefix("web 01", None)
            .unwrap_err()
            .to_string()
            .contains("--name"));
        assert_eq!(prefix("web 01", Some("web01")).unwrap(), "web01");
        assert!(prefix("x", Some("a/b")).is_err());
    }
}
