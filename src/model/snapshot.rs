//! Snapshot metadata as the catalog, the manifests and `snapshots --json`
//! know it.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::name::{DiskName, SnapshotId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    Full,
    Incremental,
    Differential,
}

impl SnapshotKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Incremental => "incremental",
            SnapshotKind::Differential => "differential",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(SnapshotKind::Full),
            "incremental" => Ok(SnapshotKind::Incremental),
            "differential" => Ok(SnapshotKind::Differential),
            _ => Err(Error::invalid(format!("unknown snapshot kind {s:?}"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub disk: DiskName,
    pub id: SnapshotId,
    pub time: DateTime<Utc>,
    pub kind: SnapshotKind,
    pub parent: Option<SnapshotId>,
    pub size: u64,
    pub granularity: u64,
    pub label: String,
    pub checkpoint: Option<String>,
    pub bitmap: Option<String>,
    pub protected: bool,
    pub stored_bytes: u64,
}

impl SnapshotInfo {
    /// `DISK@ID`.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.disk, self.id)
    }

    /// Path of the image inside a mount.
    pub fn mount_path(&self) -> String {
        format!("{}/{}.raw", self.disk, self.id)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "disk": self.disk.as_str(),
            "id": self.id.as_str(),
            "ref": self.reference(),
            "time": format_time(&self.time),
            "kind": self.kind.as_str(),
            "parent": self.parent.as_ref().map(|p| p.as_str()),
            "size": self.size,
            "granularity": self.granularity,
            "label": self.label,
            "checkpoint": self.checkpoint,
            "bitmap": self.bitmap,
            "protected": self.protected,
            "path": self.mount_path(),
            "stored_bytes": self.stored_bytes,
        })
    }
}

impl SnapshotInfo {
    /// A one-line summary, as `backup` and `receive` print it.
    pub fn summary(&self) -> String {
        format!(
            "snapshot {} ({}, {} bytes, {} bytes stored)",
            self.reference(),
            self.kind.as_str(),
            self.size,
            self.stored_bytes
        )
    }

    /// A snapshot of disk `d` for unit tests.
    #[cfg(test)]
    pub fn for_test(time: DateTime<Utc>, seq: u32, kind: SnapshotKind, size: u64) -> Self {
        SnapshotInfo {
            disk: DiskName::parse("d").expect("valid name"),
            id: SnapshotId::new(time, seq),
            time,
            kind,
            parent: None,
            size,
            granularity: 65536,
            label: String::new(),
            checkpoint: None,
            bitmap: None,
            protected: false,
            stored_bytes: 0,
        }
    }
}

pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            Error::invalid(format!(
                "invalid RFC3339 time {s:?}: {e} (expected e.g. 2026-11-22T10:15:00Z)"
            ))
        })
}
