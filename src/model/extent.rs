//! Byte ranges, extents and the extent JSON document (`strata-extents/1`).

use serde::{Deserialize, Serialize};

/// A half-open range of bytes `[offset, offset + length)` of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

impl ByteRange {
    pub fn new(offset: u64, length: u64) -> Self {
        ByteRange { offset, length }
    }

    pub fn from_bounds(start: u64, end: u64) -> Self {
        debug_assert!(start <= end);
        ByteRange {
            offset: start,
            length: end - start,
        }
    }

    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    pub fn contains(&self, other: &ByteRange) -> bool {
        self.offset <= other.offset && other.end() <= self.end()
    }

    pub fn intersect(&self, other: &ByteRange) -> Option<ByteRange> {
        let start = self.offset.max(other.offset);
        let end = self.end().min(other.end());
        (start < end).then(|| ByteRange::from_bounds(start, end))
    }

    /// Split at every multiple of `step` (absolute offsets), so that equal
    /// data at equal offsets yields equal pieces across snapshots.
    pub fn split_aligned(self, step: u64) -> impl Iterator<Item = ByteRange> {
        let end = self.end();
        let mut pos = self.offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let next = ((pos / step) + 1).saturating_mul(step).min(end);
            let piece = ByteRange::from_bounds(pos, next);
            pos = next;
            Some(piece)
        })
    }
}

/// Sorted, disjoint ranges with touching ones joined.
pub fn merge_touching(ranges: impl IntoIterator<Item = ByteRange>) -> Vec<ByteRange> {
    let mut out: Vec<ByteRange> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end() == r.offset => last.length += r.length,
            _ => out.push(r),
        }
    }
    out
}

impl std::fmt::Display for ByteRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, +{}]", self.offset, self.length)
    }
}

/// What a range of an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Bytes stored in the repository.
    #[default]
    Data,
    /// Reads as zeroes (written as zeroes, or discarded).
    Zero,
}

/// One entry of an extent list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    #[serde(rename = "type", default)]
    pub kind: ExtentKind,
}

impl Extent {
    pub fn new(range: ByteRange, kind: ExtentKind) -> Self {
        Extent {
            offset: range.offset,
            length: range.length,
            kind,
        }
    }

    pub fn range(&self) -> ByteRange {
        ByteRange::new(self.offset, self.length)
    }
}

/// Check that extents are non-empty, sorted, non-overlapping and inside
/// `size`. The error names the first offending entry by index.
pub fn validate(extents: &[Extent], size: u64) -> Result<(), String> {
    let mut prev_end = 0u64;
    for (i, e) in extents.iter().enumerate() {
        let end = e
            .offset
            .checked_add(e.length)
            .ok_or_else(|| format!("extents[{i}]: offset + length overflows"))?;
        if e.length == 0 {
            return Err(format!("extents[{i}]: length is 0"));
        }
        if i > 0 && e.offset < prev_end {
            return Err(format!(
                "extents[{i}]: offset {} overlaps or precedes extents[{}] ending at {prev_end} (extents must be sorted and non-overlapping)",
                e.offset,
                i - 1
            ));
        }
        if end > size {
            return Err(format!(
                "extents[{i}]: range {}..{end} is out of bounds of the disk size {size}",
                e.offset
            ));
        }
        prev_end = end;
    }
    Ok(())
}

/// Merge touching extents of the same kind. Input must be sorted.
pub fn coalesce(extents: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in extents {
        if e.length == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.kind == e.kind && last.offset + last.length == e.offset => {
                last.length += e.length;
            }
            _ => out.push(e),
        }
    }
    out
}

/// Zero detection and the recorded granularity: QEMU's default cluster size.
pub const GRANULARITY: u64 = 64 << 10;

pub const EXTENTS_FORMAT: &str = "strata-extents/1";

/// The extent JSON document of a snapshot (docs/CLI.md, "map --json").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtentDoc {
    pub format: String,
    pub disk: String,
    pub snapshot: String,
    pub kind: String,
    pub parent: Option<String>,
    pub size: u64,
    pub granularity: u64,
    pub bitmap: Option<String>,
    pub extents: Vec<Extent>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64) -> Extent {
        Extent::new(ByteRange::new(offset, length), ExtentKind::Data)
    }

    #[test]
    fn split_aligned_clips_to_grid() {
        let parts: Vec<_> = ByteRange::new(100, 250).split_aligned(128).collect();
        assert_eq!(
            parts,
            vec![
                ByteRange::new(100, 28),
                ByteRange::new(128, 128),
                ByteRange::new(256, 94)
            ]
        );
    }

    #[test]
    fn validate_names_the_bad_entry() {
        assert!(validate(&[ext(0, 10), ext(10, 5)], 15).is_ok());
        assert!(validate(&[ext(0, 10), ext(5, 5)], 100)
            .unwrap_err()
            .starts_with("extents[1]"));
        assert!(validate(&[ext(0, 10), ext(20, 5)], 24)
            .unwrap_err()
            .contains("out of bounds"));
        assert!(validate(&[ext(0, 0)], 24)
            .unwrap_err()
            .contains("length is 0"));
        assert!(validate(&[ext(u64::MAX, 2)], 24)
            .unwrap_err()
            .contains("overflows"));
    }

    #[test]
    fn coalesce_merges_same_kind_only() {
        let zero = Extent::new(ByteRange::new(20, 5), ExtentKind::Zero);
        let merged = coalesce([ext(0, 10), ext(10, 10), zero, ext(30, 1)]);
        assert_eq!(merged, vec![ext(0, 20), zero, ext(30, 1)]);
    }

    #[test]
    fn extent_type_defaults_to_data() {
        let e: Extent = serde_json::from_str(r#"{"offset": 4, "length": 8}"#).unwrap();
        assert_eq!(e, ext(4, 8));
    }
}
