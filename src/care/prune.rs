//! Retention: which snapshots a `--keep-…` policy keeps, and `prune`, which
//! forgets the rest and collects garbage.
//!
//! Semantics are restic's. Per disk, each rule is applied on its own to the
//! snapshots from newest to oldest; a snapshot kept by any rule is kept:
//! - `last N`: the N newest;
//! - `hourly/daily/weekly/monthly/yearly N`: the newest snapshot of each of
//!   the N most recent UTC hours / days / ISO weeks / months / years that
//!   have a snapshot;
//! - `within D`: every snapshot at most D older than the disk's newest.
//!
//! Protected snapshots are always kept.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::care::forget::forget_one;
use crate::care::gc::{gc, GcReport};
use crate::error::{Error, Result};
use crate::model::name::DiskName;
use crate::model::snapshot::SnapshotInfo;
use crate::store::lock::MaintenanceLock;
use crate::store::repo::Repository;

#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub last: Option<usize>,
    pub hourly: Option<usize>,
    pub daily: Option<usize>,
    pub weekly: Option<usize>,
    pub monthly: Option<usize>,
    pub yearly: Option<usize>,
    pub within: Option<Duration>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.last.is_none()
            && self.hourly.is_none()
            && self.daily.is_none()
            && self.weekly.is_none()
            && self.monthly.is_none()
            && self.yearly.is_none()
            && self.within.is_none()
    }
}

/// `7d`, `12h`, `2w`, `1y6m`: y = 365 days, m = 30 days, w, d, h.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || {
        Error::invalid(format!(
            "invalid duration {s:?}: expected e.g. 7d, 12h, 2w, 1y6m"
        ))
    };
    let mut total = Duration::zero();
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let unit = match c {
            'y' => Duration::days(365),
            'm' => Duration::days(30),
            'w' => Duration::weeks(1),
            'd' => Duration::days(1),
            'h' => Duration::hours(1),
            _ => return Err(bad()),
        };
        total += unit * n as i32;
    }
    if !num.is_empty() || s.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// The period a snapshot falls in, for one bucket rule.
type BucketKey = fn(&DateTime<Utc>) -> String;

/// The rules that keep each snapshot of one disk (given oldest first);
/// an empty list means remove.
pub fn apply(policy: &Policy, snaps: &[SnapshotInfo]) -> Vec<Vec<&'static str>> {
    let mut rules: Vec<Vec<&'static str>> = vec![Vec::new(); snaps.len()];
    let newest_first: Vec<usize> = (0..snaps.len()).rev().collect();
    if let Some(n) = policy.last {
        for &i in newest_first.iter().take(n) {
            rules[i].push("last");
        }
    }
    let buckets: [(&'static str, Option<usize>, BucketKey); 5] = [
        ("hourly", policy.hourly, |t| {
            t.format("%Y-%m-%dT%H").to_string()
        }),
        ("daily", policy.daily, |t| t.format("%Y-%m-%d").to_string()),
        ("weekly", policy.weekly, |t| t.format("%G-W%V").to_string()),
        ("monthly", policy.monthly, |t| t.format("%Y-%m").to_string()),
        ("yearly", policy.yearly, |t| t.format("%Y").to_string()),
    ];
    for (name, count, key) in buckets {
        let Some(n) = count else { continue };
        let mut last: Option<String> = None;
        let mut kept = 0;
        for &i in &newest_first {
            if kept == n {
                break;
            }
            let k = key(&snaps[i].time);
            if last.as_ref() != Some(&k) {
                rules[i].push(name);
                kept += 1;
                last = Some(k);
            }
        }
    }
    if let (Some(d), Some(newest)) = (policy.within, snaps.last()) {
        for (i, s) in snaps.iter().enumerate() {
            if s.time >= newest.time - d {
                rules[i].push("within");
            }
        }
    }
    for (i, s) in snaps.iter().enumerate() {
        if s.protected {
            rules[i].push("protected");
        }
    }
    rules
}

#[derive(Debug, Clone, Serialize)]
pub struct Kept {
    pub snapshot: String,
    pub rules: Vec<&'static str>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PrunePlan {
    pub keep: Vec<Kept>,
    pub remove: Vec<String>,
    #[serde(skip)]
    pub remove_infos: Vec<SnapshotInfo>,
}

pub fn plan(repo: &Repository, policy: &Policy, disk: Option<&DiskName>) -> Result<PrunePlan> {
    if policy.is_empty() {
        return Err(Error::invalid(
            "no retention rule given: use --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly or --keep-within",
        ));
    }
    let all = repo.snapshots(disk)?;
    let mut disks: Vec<DiskName> = all.iter().map(|s| s.disk.clone()).collect();
    disks.sort();
    disks.dedup();
    let mut out = PrunePlan::default();
    for d in disks {
        let snaps: Vec<SnapshotInfo> = all.iter().filter(|s| s.disk == d).cloned().collect();
        for (s, rules) in snaps.iter().zip(apply(policy, &snaps)) {
            if rules.is_empty() {
                out.remove.push(s.reference());
                out.remove_infos.push(s.clone());
            } else {
                out.keep.push(Kept {
                    snapshot: s.reference(),
                    rules,
                });
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    #[serde(flatten)]
    pub plan: PrunePlan,
    pub freed_bytes: u64,
    #[serde(skip)]
    pub gc: Option<GcReport>,
}

/// Apply `policy`: forget what it does not keep (oldest first), then gc.
pub fn prune(
    repo: &Repository,
    policy: &Policy,
    disk: Option<&DiskName>,
    dry_run: bool,
) -> Result<PruneReport> {
    let lock = MaintenanceLock::acquire(repo, "prune")?;
    let plan = plan(repo, policy, disk)?;
    if dry_run {
        return Ok(PruneReport {
            plan,
            freed_bytes: 0,
            gc: None,
        });
    }
    for info in &plan.remove_infos {
        forget_one(repo, info)?;
    }
    crate::testhook::pause("prune:forgotten");
    let gc_report = gc(repo, &lock)?;
    Ok(PruneReport {
        freed_bytes: gc_report.freed_bytes,
        plan,
        gc: Some(gc_report),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::snapshot::SnapshotKind;

    fn snap(time: &str, seq: u32) -> SnapshotInfo {
        let time = crate::model::snapshot::parse_time(time).unwrap();
        SnapshotInfo::for_test(time, seq, SnapshotKind::Incremental, 1)
    }

    fn kept(policy: &Policy, snaps: &[SnapshotInfo]) -> Vec<String> {
        snaps
            .iter()
            .zip(apply(policy, snaps))
            .filter(|(_, r)| !r.is_empty())
            .map(|(s, _)| s.time.format("%m-%d %H").to_string())
            .collect()
    }

    /// The worked example of docs/RETENTION.md.
    #[test]
    fn restic_bucket_semantics() {
        let times = [
            "2026-01-05T10:00:00Z", // Mon, ISO week 2
            "2026-01-06T10:00:00Z",
            "2026-01-06T18:00:00Z",
            "2026-01-12T09:00:00Z", // week 3
            "2026-02-01T09:00:00Z", // Sunday: still week 5
            "2026-02-02T09:00:00Z", // week 6
            "2026-02-02T21:00:00Z",
        ];
        let snaps: Vec<_> = times
            .iter()
            .enumerate()
            .map(|(i, t)| snap(t, i as u32 + 1))
            .collect();
        let p = |f: fn(&mut Policy)| {
            let mut p = Policy::default();
            f(&mut p);
            p
        };
        assert_eq!(
            kept(&p(|p| p.last = Some(2)), &snaps),
            ["02-02 09", "02-02 21"]
        );
        assert_eq!(
            kept(&p(|p| p.daily = Some(3)), &snaps),
            ["01-12 09", "02-01 09", "02-02 21"]
        );
        assert_eq!(
            kept(&p(|p| p.weekly = Some(3)), &snaps),
            ["01-12 09", "02-01 09", "02-02 21"]
        );
        assert_eq!(
            kept(&p(|p| p.monthly = Some(5)), &snaps),
            ["01-12 09", "02-02 21"]
        );
        assert_eq!(kept(&p(|p| p.yearly = Some(1)), &snaps), ["02-02 21"]);
        assert_eq!(
            kept(&p(|p| p.hourly = Some(2)), &snaps),
            ["02-02 09", "02-02 21"]
        );
        assert_eq!(
            kept(&p(|p| p.within = Some(Duration::days(2))), &snaps),
            ["02-01 09", "02-02 09", "02-02 21"]
        );
        // Rules are independent: the union is kept.
        assert_eq!(
            kept(
                &p(|p| {
                    p.last = Some(1);
                    p.monthly = Some(2)
                }),
                &snaps
            ),
            ["01-12 09", "02-02 21"]
        );
        let mut protected = snaps.clone();
        protected[0].protected = true;
        let rules = apply(&p(|p| p.last = Some(1)), &protected);
        assert_eq!(rules[0], ["protected"]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d").unwrap(), Duration::days(7));
        assert_eq!(parse_duration("1y2m").unwrap(), Duration::days(425));
        assert_eq!(parse_duration("36h").unwrap(), Duration::hours(36));
        for bad in ["", "7", "d", "7x", "-1d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
