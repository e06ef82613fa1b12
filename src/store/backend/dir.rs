//! A repository in a local directory: each key is a file under the root.

use std::fs;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::{Backend, ObjectInfo};
use crate::error::{Error, IoContext, Result};
use crate::model::extent::ByteRange;
use crate::store::durable;

pub struct DirBackend {
    root: PathBuf,
}

impl DirBackend {
    pub fn new(root: &Path) -> Self {
        DirBackend {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

fn info(key: String, meta: &fs::Metadata) -> ObjectInfo {
    use std::os::unix::fs::MetadataExt;
    let modified = meta
        .modified()
        .map(DateTime::<Utc>::from)
        .unwrap_or_default();
    ObjectInfo {
        key,
        size: meta.len(),
        modified,
        version: format!("{}.{}.{}", meta.len(), meta.mtime(), meta.mtime_nsec()),
    }
}

impl Backend for DirBackend {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        match fs::read(&path) {
            Ok(body) => Ok(Some(body)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
        }
    }

    fn get_range(&self, key: &str, range: ByteRange) -> Result<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let path = self.path(key);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        };
        let mut buf = vec![0u8; range.length as usize];
        file.read_exact_at(&mut buf, range.offset)
            .ctx(|| format!("read {range} of {}", path.display()))?;
        Ok(Some(buf))
    }

    fn put(&self, key: &str, body: &[u8]) -> Result<()> {
        durable::replace(&self.path(key), body)
    }

    fn put_new(&self, key: &str, body: &[u8]) -> Result<bool> {
        let path = self.path(key);
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        let tmp = path.with_extension(format!("new.{}", std::process::id()));
        durable::write_synced(&tmp, body)?;
        // link(2) fails with EEXIST instead of replacing: create-only. File
        // systems without hard links (vfat, some FUSE) get rename(2) with
        // RENAME_NOREPLACE instead.
        let linked = match fs::hard_link(&tmp, &path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                rename_noreplace(&tmp, &path)
            }
            other => other,
        };
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                durable::fsync_dir(dir)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io(format!("create {}", path.display()), e)),
        }
    }

    /// Not atomic: a directory's leases are not used across hosts (its
    /// locks are `flock`s), so nothing races here.
    fn replace_if(&self, key: &str, body: &[u8], version: &str) -> Result<bool> {
        match self.head(key)? {
            Some(o) if o.version == version => self.put(key, body).map(|()| true),
            _ => Ok(false),
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // Walk the deepest directory the prefix names in full.
        let base = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let mut out = Vec::new();
        walk(&self.root, base, &mut out)?;
        out.retain(|o| o.key.starts_with(prefix));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path(key);
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(info(key.to_string(), &m))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("stat {}", path.display()), e)),
        }
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c =
        |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: renameat2 with two NUL-terminated paths we own.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn walk(root: &Path, rel: &str, out: &mut Vec<ObjectInfo>) -> Result<()> {
    let dir = root.join(rel);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("list {}", dir.display()), e)),
    };
    for entry in entries {
        let entry = entry.ctx(|| format!("list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let key = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let meta = match entry.metadata() {
            Ok(m) => m,
            // Removed between the listing and now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("stat {}", entry.path().display()), e)),
        };
        if meta.is_dir() {
            walk(root, &key, out)?;
        } else {
            out.push(info(key, &meta));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirBackend::new(dir.path());
        assert_eq!(b.get("a/b.json").unwrap(), None);
        b.put("a/b.json", b"one").unwrap();
        assert_eq!(b.get("a/b.json").unwrap().unwrap(), b"one");
        assert!(!b.put_new("a/b.json", b"two").unwrap());
        assert_eq!(b.get("a/b.json").unwrap().unwrap(), b"one");
        assert!(b.put_new("a/c/d.json", b"three").unwrap());
        let keys: Vec<_> = b.list("a/").unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(keys, ["a/b.json", "a/c/d.json"]);
        assert_eq!(b.list("a/c").unwrap().len(), 1);
        assert_eq!(b.head("a/b.json").unwrap().unwrap().size, 3);
        b.delete("a/b.json").unwrap();
        b.delete("a/b.json").unwrap();
        assert_eq!(b.head("a/b.json").unwrap(), None);
    }
}
