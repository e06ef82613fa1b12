//! Change lists for `backup --changes`: strata's extent JSON, the output of
//! `qemu-img map --output=json`, or of `nbdinfo --map --json`. The format is
//! detected from the document's shape; errors carry a line and column or the
//! index of the offending entry.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::extent::{coalesce, ByteRange, Extent, ExtentKind};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeList {
    /// Where the list came from, for messages: a file name or a bitmap.
    pub origin: String,
    /// The disk size the list was made for, if it says.
    pub size: Option<u64>,
    /// Sorted, non-overlapping, coalesced.
    pub extents: Vec<Extent>,
}

impl ChangeList {
    /// Check the list against the size of the disk being backed up.
    pub fn check(&self, disk_size: u64) -> std::result::Result<(), String> {
        if let Some(size) = self.size {
            if size != disk_size {
                return Err(format!(
                    "the change list is for a disk of {size} bytes, but the source has {disk_size}"
                ));
            }
        }
        crate::model::extent::validate(&self.extents, disk_size)
    }

    /// The list with `reads` (sorted, non-overlapping) added as data where
    /// it lists nothing: what it lists, data or zero, stands.
    pub fn with_reads(&self, reads: &[ByteRange]) -> ChangeList {
        let mut extents = self.extents.clone();
        let mut listed = self.extents.iter().map(|e| e.range()).peekable();
        for r in reads {
            let mut pos = r.offset;
            while let Some(l) = listed.peek().copied() {
                if l.end() <= pos {
                    listed.next();
                    continue;
                }
                if l.offset >= r.end() {
                    break;
                }
                if l.offset > pos {
                    extents.push(Extent::new(
                        ByteRange::from_bounds(pos, l.offset),
                        ExtentKind::Data,
                    ));
                }
                pos = l.end();
                if pos >= r.end() {
                    break;
                }
                listed.next();
            }
            if pos < r.end() {
                extents.push(Extent::new(
                    ByteRange::from_bounds(pos, r.end()),
                    ExtentKind::Data,
                ));
            }
        }
        extents.sort_by_key(|e| e.offset);
        ChangeList {
            origin: self.origin.clone(),
            size: self.size,
            extents: coalesce(extents),
        }
    }
}

pub fn parse_file(path: &Path) -> Result<ChangeList> {
    let bad = |message: String| Error::BadChanges {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut list = parse(&text).map_err(bad)?;
    list.origin = path.display().to_string();
    Ok(list)
}

/// Only `size` and `extents` are read; other fields of an extent document
/// are accepted and ignored.
#[derive(Deserialize)]
struct StrataDoc {
    #[serde(default)]
    size: Option<u64>,
    extents: Vec<Extent>,
}

#[derive(Deserialize)]
struct QemuImgEntry {
    start: u64,
    length: u64,
    #[serde(default)]
    depth: u64,
    #[serde(default = "yes")]
    present: bool,
    zero: bool,
    data: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct NbdinfoEntry {
    offset: u64,
    length: u64,
    #[serde(rename = "type")]
    flags: u32,
    #[serde(default)]
    description: String,
}

/// Parse a change list from text.
pub fn parse(text: &str) -> std::result::Result<ChangeList, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
    let typed = |e: serde_json::Error| format!("invalid change list: {e}");
    match &value {
        serde_json::Value::Object(map) if map.contains_key("extents") => {
            let doc: StrataDoc = serde_json::from_str(text).map_err(typed)?;
            let list = ChangeList {
                origin: String::new(),
                size: doc.size,
                extents: doc.extents,
            };
            // Strata documents must already be in canonical order.
            if let Some(size) = list.size {
                crate::model::extent::validate(&list.extents, size)?;
            } else {
                crate::model::extent::validate(&list.extents, u64::MAX)?;
            }
            Ok(ChangeList {
                origin: String::new(),
                size: list.size,
                extents: coalesce(list.extents),
            })
        }
        serde_json::Value::Array(items) => {
            let first = items.first().and_then(|v| v.as_object());
            let extents = match first {
                None if items.is_empty() => Vec::new(),
                Some(o) if o.contains_key("start") => {
                    let entries: Vec<QemuImgEntry> = serde_json::from_str(text).map_err(typed)?;
                    entries
                        .iter()
                        .filter(|e| e.present && e.depth == 0 && (e.data || e.zero))
                        .map(|e| {
                            let kind = if e.data { ExtentKind::Data } else { ExtentKind::Zero };
                            Extent::new(ByteRange::new(e.start, e.length), kind)
                        })
                        .collect()
                }
                Some(o) if o.contains_key("offset") && o.contains_key("type") => {
                    let entries: Vec<NbdinfoEntry> = serde_json::from_str(text).map_err(typed)?;
                    nbdinfo_extents(&entries)?
                }
                _ => {
                    return Err(
                        "unrecognized change list: expected strata extent JSON, qemu-img map --output=json or nbdinfo --map --json output"
                            .into(),
                    )
                }
            };
            let extents: Vec<Extent> = extents.into_iter().filter(|e| e.length > 0).collect();
            crate::model::extent::validate(&extents, u64::MAX)?;
            Ok(ChangeList {
                origin: String::new(),
                size: None,
                extents: coalesce(extents),
            })
        }
        _ => Err(
            "unrecognized change list: expected a JSON object with \"extents\" or an array".into(),
        ),
    }
}

/// `nbdinfo --map` prints either a dirty bitmap (`dirty`/`clean`) or
/// `base:allocation` (bit 0 hole, bit 1 zero). A hole that is not known to
/// be zero has undefined contents, so it is read as data.
fn nbdinfo_extents(entries: &[NbdinfoEntry]) -> std::result::Result<Vec<Extent>, String> {
    let is_bitmap = entries
        .iter()
        .any(|e| e.description == "dirty" || e.description == "clean");
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.description.is_empty() {
            return Err(format!(
                "entry [{i}]: no \"description\"; cannot tell a dirty bitmap from base:allocation"
            ));
        }
        let range = ByteRange::new(e.offset, e.length);
        if is_bitmap {
            if e.flags & 1 != 0 {
                out.push(Extent::new(range, ExtentKind::Data));
            }
        } else if e.flags & 2 != 0 {
            out.push(Extent::new(range, ExtentKind::Zero));
        } else {
            out.push(Extent::new(range, ExtentKind::Data));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fill_only_what_is_not_listed() {
        let e = |o, l, k| Extent::new(ByteRange::new(o, l), k);
        let list = ChangeList {
            origin: "t".into(),
            size: None,
            extents: vec![
                e(10, 10, ExtentKind::Data),
                e(30, 10, ExtentKind::Zero),
                e(100, 5, ExtentKind::Data),
            ],
        };
        let r = |o, l| ByteRange::new(o, l);
        let got = list.with_reads(&[r(0, 50), r(60, 10), r(102, 1)]);
        assert_eq!(
            got.extents,
            vec![
                e(0, 30, ExtentKind::Data),
                e(30, 10, ExtentKind::Zero),
                e(40, 10, ExtentKind::Data),
                e(60, 10, ExtentKind::Data),
                e(100, 5, ExtentKind::Data),
            ]
        );
        assert_eq!(list.with_reads(&[]), list);
        assert!(validate_sorted(&got.extents));
    }

    fn validate_sorted(extents: &[Extent]) -> bool {
        extents
            .windows(2)
            .all(|w| w[0].offset + w[0].length <= w[1].offset)
    }

    fn data(offset: u64, length: u64) -> Extent {
        Extent::new(ByteRange::new(offset, length), ExtentKind::Data)
    }

    #[test]
    fn strata_format() {
        let list = parse(
            r#"{"format": "strata-extents/1", "size": 1000, "extents": [
                {"offset": 0, "length": 10}, {"offset": 10, "length": 5, "type": "data"},
                {"offset": 20, "length": 5, "type": "zero"}]}"#,
        )
        .unwrap();
        assert_eq!(list.size, Some(1000));
        assert_eq!(
            list.extents,
            vec![
                data(0, 15),
                Extent::new(ByteRange::new(20, 5), ExtentKind::Zero)
            ]
        );
    }

    #[test]
    fn malformed_json_names_the_position() {
        let err = parse("{\"extents\": [\n {\"offset\": 1,, }]}").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        let err = parse(r#"{"extents": [{"offset": "x", "length": 1}]}"#).unwrap_err();
        assert!(err.contains("column"), "{err}");
        let err =
            parse(r#"{"extents": [{"offset": 0, "length": 1, "type": "bogus"}]}"#).unwrap_err();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn overlapping_and_out_of_bounds_are_refused() {
        let err =
            parse(r#"{"extents": [{"offset": 0, "length": 10}, {"offset": 5, "length": 10}]}"#)
                .unwrap_err();
        assert!(err.contains("extents[1]"), "{err}");
        let err = parse(r#"{"size": 8, "extents": [{"offset": 0, "length": 10}]}"#).unwrap_err();
        assert!(err.contains("out of bounds"), "{err}");
        let list = parse(r#"{"extents": [{"offset": 0, "length": 10}]}"#).unwrap();
        assert!(list.check(5).unwrap_err().contains("out of bounds"));
    }

    #[test]
    fn qemu_img_map_format() {
        let list = parse(
            r#"[{"start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
                {"start": 65536, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false},
                {"start": 131072, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true},
                {"start": 196608, "length": 65536, "depth": 0, "present": false, "zero": true, "data": false}]"#,
        )
        .unwrap();
        assert_eq!(
            list.extents,
            vec![
                data(0, 65536),
                Extent::new(ByteRange::new(65536, 65536), ExtentKind::Zero)
            ]
        );
    }

    #[test]
    fn nbdinfo_formats() {
        let bitmap = parse(
            r#"[{"offset": 0, "length": 65536, "type": 0, "description": "clean"},
                {"offset": 65536, "length": 131072, "type": 1, "description": "dirty"}]"#,
        )
        .unwrap();
        assert_eq!(bitmap.extents, vec![data(65536, 131072)]);
        let alloc = parse(
            r#"[{"offset": 0, "length": 10, "type": 0, "description": "data"},
                {"offset": 10, "length": 10, "type": 3, "description": "hole,zero"},
                {"offset": 20, "length": 10, "type": 1, "description": "hole"}]"#,
        )
        .unwrap();
        assert_eq!(
            alloc.extents,
            vec![
                data(0, 10),
                Extent::new(ByteRange::new(10, 10), ExtentKind::Zero),
                data(20, 10)
            ]
        );
        assert!(parse(r#"[{"offset": 0, "length": 1, "type": 0}]"#).is_err());
        assert!(parse(r#"[{"foo": 1}]"#)
            .unwrap_err()
            .contains("unrecognized"));
    }
}
