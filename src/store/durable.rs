//! Files replaced whole and durably: written to a temporary name beside the
//! target (`<name>.tmp.<pid>`, which gc removes if a crash leaves it),
//! flushed, renamed over the target, and the directory flushed. Readers see
//! the old file or the new one, never a part.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{IoContext, Result};

/// Replace `path` with `body`, owner-only, creating its directory.
pub fn replace(path: &Path, body: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(name);
    write_synced(&tmp, body)?;
    fs::rename(&tmp, path).ctx(|| format!("rename {}", tmp.display()))?;
    fsync_dir(dir)
}

/// Write `body` to a new owner-only file at `path` (truncating one that
/// is there) and flush it; the caller gives it its final name.
pub fn write_synced(path: &Path, body: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .ctx(|| format!("create {}", path.display()))?;
    f.write_all(body)
        .ctx(|| format!("write {}", path.display()))?;
    f.sync_all().ctx(|| format!("fsync {}", path.display()))
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("fsync {}", dir.display()))
}
