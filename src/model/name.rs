//! Disk names, snapshot ids and `DISK@ID` references.
//!
//! Names become directory paths in the repository and in the mount, so they
//! are validated before anything touches the file system.

use std::fmt;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};

/// A validated disk name: one to three `/`-separated segments of
/// `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskName(String);

impl DiskName {
    pub fn parse(name: &str) -> Result<Self> {
        let bad = |reason: &str| Error::BadDiskName {
            name: name.to_string(),
            reason: reason.to_string(),
        };
        if name.is_empty() {
            return Err(bad("empty"));
        }
        if name.starts_with('/') {
            return Err(bad("must not start with '/'"));
        }
        let segments: Vec<&str> = name.split('/').collect();
        if segments.len() > 3 {
            return Err(bad("at most three '/'-separated segments"));
        }
        for seg in segments {
            if seg.is_empty() {
                return Err(bad("empty segment"));
            }
            if !valid_segment(seg) {
                return Err(bad(&format!(
                    "segment {seg:?} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}"
                )));
            }
        }
        Ok(DiskName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_segment(seg: &str) -> bool {
    let bytes = seg.as_bytes();
    bytes.len() <= 64
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl fmt::Display for DiskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A snapshot id: `YYYYMMDDTHHMMSSZ-NNNN`, so that ids sort by time and are
/// valid file names. The sequence number makes ids unique within a disk.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(String);

impl SnapshotId {
    pub fn new(time: DateTime<Utc>, seq: u32) -> Self {
        SnapshotId(format!("{}-{seq:04}", time.format("%Y%m%dT%H%M%SZ")))
    }

    pub fn parse(id: &str) -> Result<Self> {
        let ok = id.len() >= 21
            && id.is_ascii()
            && chrono::NaiveDateTime::parse_from_str(&id[..16], "%Y%m%dT%H%M%SZ").is_ok()
            && id.as_bytes()[16] == b'-'
            && id[17..].bytes().all(|b| b.is_ascii_digit());
        if ok {
            Ok(SnapshotId(id.to_string()))
        } else {
            Err(Error::invalid(format!(
                "invalid snapshot id {id:?}: expected YYYYMMDDTHHMMSSZ-NNNN"
            )))
        }
    }

    /// The sequence number after the `-`.
    pub fn seq(&self) -> u32 {
        self.0[17..].parse().unwrap_or(0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which snapshot of a disk a reference names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Latest,
    Id(SnapshotId),
}

/// `DISK@ID` or `DISK@latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    pub disk: DiskName,
    pub selector: Selector,
}

impl SnapshotRef {
    pub fn parse(s: &str) -> Result<Self> {
        let (disk, sel) = s
            .rsplit_once('@')
            .ok_or_else(|| Error::BadSnapshotRef(s.to_string()))?;
        let disk = DiskName::parse(disk)?;
        let selector = if sel == "latest" {
            Selector::Latest
        } else {
            Selector::Id(SnapshotId::parse(sel)?)
        };
        Ok(SnapshotRef { disk, selector })
    }
}

impl fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.selector {
            Selector::Latest => write!(f, "{}@latest", self.disk),
            Selector::Id(id) => write!(f, "{}@{}", self.disk, id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names() {
        for good in ["vm1", "vm1/vda", "a/b/c", "A.b_c-d", &"x".repeat(64)] {
            assert!(DiskName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/a",
            "a//b",
            "../x",
            "a/..",
            ".a",
            "a/b/c/d",
            "a b",
            "a\nb",
            "-a",
            &"x".repeat(65),
            "a/",
            "é",
        ] {
            assert!(DiskName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn snapshot_refs() {
        let r = SnapshotRef::parse("vm1/vda@20261122T101500Z-0003").unwrap();
        assert_eq!(r.disk.as_str(), "vm1/vda");
        assert_eq!(r.to_string(), "vm1/vda@20261122T101500Z-0003");
        assert!(matches!(
            SnapshotRef::parse("vm1@latest").unwrap().selector,
            Selector::Latest
        ));
        assert!(SnapshotRef::parse("vm1").is_err());
        assert!(SnapshotRef::parse("vm1@nope").is_err());
        assert!(SnapshotRef::parse("../x@latest").is_err());
        assert_eq!(
            SnapshotId::parse("20261122T101500Z-0042").unwrap().seq(),
            42
        );
    }
}
