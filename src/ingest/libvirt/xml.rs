//! The little of libvirt's XML that strata reads and writes.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// A `<disk>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `target dev`, e.g. `vda`.
    pub target: String,
    /// `device`: disk, lun, cdrom, floppy.
    pub device: String,
    /// `type`: file, block, network, volume...
    pub kind: String,
    /// The file or block device path, if any.
    pub source: Option<String>,
    /// `driver type` (raw when not given, as libvirt assumes).
    pub format: String,
}

impl Disk {
    /// Whether strata backs this disk up: a disk (or lun) with a file or
    /// block source. cdroms, floppies, empty drives and network disks not.
    pub fn backupable(&self) -> std::result::Result<(), String> {
        if self.device != "disk" && self.device != "lun" {
            return Err(format!("a {}", self.device));
        }
        if self.kind != "file" && self.kind != "block" {
            return Err(format!("source type {:?} (only file and block)", self.kind));
        }
        if self.source.is_none() {
            return Err("no source (empty drive)".into());
        }
        Ok(())
    }

    /// Whether the format can hold persistent dirty bitmaps.
    pub fn has_bitmaps(&self) -> bool {
        self.format == "qcow2"
    }
}

fn parse(xml: &str) -> Result<roxmltree::Document<'_>> {
    roxmltree::Document::parse(xml)
        .map_err(|e| Error::invalid(format!("libvirt returned XML strata cannot parse: {e}")))
}

/// The disks of a domain XML, in document order.
pub fn disks(xml: &str) -> Result<Vec<Disk>> {
    let doc = parse(xml)?;
    let mut out = Vec::new();
    for d in doc.descendants().filter(|n| n.has_tag_name("disk")) {
        // Only the domain's own <devices><disk>, not those inside other
        // elements (a checkpoint's <disks>).
        if !d.parent().is_some_and(|p| p.has_tag_name("devices")) {
            continue;
        }
        let child = |name: &str| d.children().find(|c| c.has_tag_name(name));
        let Some(target) = child("target").and_then(|t| t.attribute("dev")) else {
            continue;
        };
        let source = child("source").and_then(|s| {
            s.attribute("file")
                .or_else(|| s.attribute("dev"))
                .map(String::from)
        });
        out.push(Disk {
            target: target.to_string(),
            device: d.attribute("device").unwrap_or("disk").to_string(),
            kind: d.attribute("type").unwrap_or("file").to_string(),
            source,
            format: child("driver")
                .and_then(|dr| dr.attribute("type"))
                .unwrap_or("raw")
                .to_string(),
        });
    }
    Ok(out)
}

/// The domain's `<name>`.
pub fn domain_name(xml: &str) -> Result<String> {
    let doc = parse(xml)?;
    doc.root_element()
        .children()
        .find(|c| c.has_tag_name("name"))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string())
        .ok_or_else(|| Error::invalid("domain XML has no <name>"))
}

/// The XML for a new checkpoint whose name is `name`: a bitmap on the
/// disks in `bitmap`, none on every other disk (which libvirt would
/// otherwise pick for itself).
pub fn checkpoint(name: &str, all: &[Disk], bitmap: &[String]) -> String {
    let mut s = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <disks>\n",
        escape(name)
    );
    for d in all {
        let mode = if bitmap.contains(&d.target) {
            "bitmap"
        } else {
            "no"
        };
        s += &format!(
            "    <disk name='{}' checkpoint='{mode}'/>\n",
            escape(&d.target)
        );
    }
    s + "  </disks>\n</domaincheckpoint>\n"
}

/// How one disk takes part in a backup job.
pub enum Part<'a> {
    No,
    Full { scratch: &'a str },
    Incremental { scratch: &'a str, since: &'a str },
}

/// A pull-mode backup XML: NBD on the unix socket `socket`, each disk as
/// `parts` says (a disk not listed is left out).
pub fn backup(socket: &str, all: &[Disk], parts: &BTreeMap<String, Part>) -> String {
    let mut s = format!(
        "<domainbackup mode='pull'>\n  <server transport='unix' socket='{}'/>\n  <disks>\n",
        escape(socket)
    );
    for d in all {
        let t = escape(&d.target);
        s += &match parts.get(&d.target).unwrap_or(&Part::No) {
            Part::No => format!("    <disk name='{t}' backup='no'/>\n"),
            Part::Full { scratch } => format!(
                "    <disk name='{t}' backup='yes' type='file' backupmode='full'><scratch file='{}'/></disk>\n",
                escape(scratch)
            ),
            Part::Incremental { scratch, since } => format!(
                "    <disk name='{t}' backup='yes' type='file' backupmode='incremental' incremental='{}'><scratch file='{}'/></disk>\n",
                escape(since),
                escape(scratch)
            ),
        };
    }
    s + "  </disks>\n</domainbackup>\n"
}

/// A checkpoint's XML as libvirt printed it, made fit to be redefined
/// alone later: without `<parent>` (strata deletes older checkpoints, and
/// a redefined checkpoint naming a missing parent is refused).
pub fn checkpoint_for_redefine(xml: &str) -> Result<String> {
    let doc = parse(xml)?;
    let mut out = xml.to_string();
    if let Some(p) = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("parent"))
    {
        out.replace_range(p.range(), "");
    }
    Ok(out)
}

/// `xml` (a domain) with the disks named in `files` (target → path) made
/// raw files at those paths: what `restore --domain` writes.
pub fn with_raw_sources(xml: &str, files: &BTreeMap<String, String>) -> Result<String> {
    let doc = parse(xml)?;
    // Edits as (byte range, replacement), applied from the end backwards
    // so that earlier ranges stay valid.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for d in doc.descendants().filter(|n| n.has_tag_name("disk")) {
        if !d.parent().is_some_and(|p| p.has_tag_name("devices")) {
            continue;
        }
        let child = |name: &str| d.children().find(|c| c.has_tag_name(name));
        let Some(target) = child("target").and_then(|t| t.attribute("dev")) else {
            continue;
        };
        let Some(path) = files.get(target) else {
            continue;
        };
        let source = format!("<source file='{}'/>", escape(path));
        let driver = "<driver name='qemu' type='raw'/>".to_string();
        match d.attribute_node("type") {
            Some(a) => edits.push((a.range_value(), "file".into())),
            None => {
                // `<disk` is 5 bytes: insert the attribute right after.
                let at = d.range().start + 5;
                edits.push((at..at, " type='file'".into()));
            }
        }
        let mut added = String::new();
        match child("driver") {
            Some(dr) => edits.push((dr.range(), driver)),
            None => added += &driver,
        }
        match child("source") {
            Some(src) => edits.push((src.range(), source)),
            None => added += &source,
        }
        // A restored file has no backing chain.
        if let Some(b) = child("backingStore") {
            edits.push((b.range(), String::new()));
        }
        if !added.is_empty() {
            let at = child("target").map_or(d.range().start, |t| t.range().start);
            edits.push((at..at, added));
        }
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for (r, text) in edits {
        out.replace_range(r, &text);
    }
    parse(&out)?;
    Ok(out)
}

/// Escape text for an XML attribute or element.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// From libvirt's "missing or broken bitmap 'X' for disk 'vdb'", the disk.
pub fn broken_bitmap_disk(message: &str) -> Option<String> {
    let at = message.find("bitmap")?;
    let rest = &message[at..];
    let after = rest.find("for disk '")? + "for disk '".len();
    let end = rest[after..].find('\'')?;
    Some(rest[after..after + end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOM: &str = r#"<domain type='qemu'>
  <name>web01</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/img/a.qcow2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/sdz'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn reads_disks() {
        let d = disks(DOM).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].target, "vda");
        assert_eq!(d[0].format, "qcow2");
        assert!(d[0].backupable().is_ok() && d[0].has_bitmaps());
        assert_eq!(d[1].source.as_deref(), Some("/dev/sdz"));
        assert!(d[1].backupable().is_ok() && !d[1].has_bitmaps());
        assert!(d[2].backupable().is_err());
        assert_eq!(domain_name(DOM).unwrap(), "web01");
    }

    #[test]
    fn rewrites_sources() {
        let files: BTreeMap<_, _> = [("vda", "/r/vda.raw"), ("vdb", "/r/v'db.raw")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let out = with_raw_sources(DOM, &files).unwrap();
        let d = disks(&out).unwrap();
        assert_eq!(d[0].source.as_deref(), Some("/r/vda.raw"));
        assert_eq!(d[1].source.as_deref(), Some("/r/v'db.raw"));
        assert_eq!((d[1].kind.as_str(), d[1].format.as_str()), ("file", "raw"));
        assert_eq!(d[0].format, "raw");
        assert!(!out.contains("backingStore"));
        assert_eq!(d[2].source, None);
    }

    #[test]
    fn finds_the_broken_disk() {
        let m = "checkpoint inconsistent: missing or broken bitmap 'strata-2' for disk 'vdb'";
        assert_eq!(broken_bitmap_disk(m).as_deref(), Some("vdb"));
        assert_eq!(broken_bitmap_disk("domain is not running"), None);
    }

    #[test]
    fn strips_parent() {
        let x = "<domaincheckpoint><name>b</name><parent><name>a</name></parent><disks/></domaincheckpoint>";
        let out = checkpoint_for_redefine(x).unwrap();
        assert_eq!(
            out,
            "<domaincheckpoint><name>b</name><disks/></domaincheckpoint>"
        );
    }
}
