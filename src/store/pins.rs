//! Images held open by mounts: `pins/<pid>.<start>/<n>.map`.
//!
//! gc marks what the catalog's own maps reference, but a mount may be
//! serving an image whose snapshot was forgotten after it was opened. While
//! an image is open, the mount keeps its image map here (the binary map
//! encoding), and gc marks those chunks too. A directory whose mount is gone
//! (its registration no longer held) is removed by gc.
//!
//! Order makes this safe without a lock between mount and gc: gc reads the
//! catalog's maps first and the pins second; a mount writes the pin and then
//! checks that the snapshot is still in the catalog (see `serve::fusefs`).
//! Either gc sees the snapshot in the catalog, or it sees the pin, or the
//! open fails because the snapshot is gone.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::model::chunk_id::ChunkId;
use crate::model::image_map::ImageMap;
use crate::store::lock::{Activity, Holder};

fn pins_dir(root: &Path) -> PathBuf {
    root.join("pins")
}

fn dir_name(holder: &Holder) -> String {
    format!("{}.{}", holder.pid, (holder.started * 1e6) as u64)
}

/// One mount's pins; the directory goes when this is dropped.
#[derive(Debug)]
pub struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    /// The pin directory of the mount registered as `holder`.
    pub fn create(root: &Path, holder: &Holder) -> Result<Self> {
        let dir = pins_dir(root).join(dir_name(holder));
        fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
        Ok(PinDir { dir })
    }

    fn path(&self, key: u64) -> PathBuf {
        self.dir.join(format!("{key}.map"))
    }

    /// Keep the chunks of `map` from gc under `key` until [`unpin`](Self::unpin).
    pub fn pin(&self, key: u64, map: &ImageMap) -> Result<()> {
        self.pin_encoded(key, &map.encode())
    }

    /// [`pin`](Self::pin) a map given in its binary encoding
    /// ([`ImageMap::encode`]).
    pub fn pin_encoded(&self, key: u64, encoded: &[u8]) -> Result<()> {
        let path = self.path(key);
        let tmp = path.with_extension("tmp");
        // Whole or absent under its name: gc must never read half a map.
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, encoded))
            .ctx(|| format!("write {}", tmp.display()))?;
        fs::rename(&tmp, &path).ctx(|| format!("rename {}", tmp.display()))
    }

    pub fn unpin(&self, key: u64) {
        let _ = fs::remove_file(self.path(key));
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The chunks pinned by the live mounts among `holders`; directories of
/// mounts that are gone are removed.
pub fn pinned_chunks(root: &Path, holders: &[Holder]) -> Result<HashSet<ChunkId>> {
    let live: HashSet<String> = holders
        .iter()
        .filter(|h| h.activity == Activity::Mount)
        .map(dir_name)
        .collect();
    let dir = pins_dir(root);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(crate::Error::io(format!("list {}", dir.display()), e)),
    };
    let mut chunks = HashSet::new();
    for entry in entries {
        let path = entry.ctx(|| format!("list {}", dir.display()))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !live.contains(name) {
            let _ = fs::remove_dir_all(&path);
            continue;
        }
        for pin in fs::read_dir(&path).ctx(|| format!("list {}", path.display()))? {
            let pin = pin.ctx(|| format!("list {}", path.display()))?.path();
            if pin.extension().is_none_or(|e| e != "map") {
                continue;
            }
            let bytes = match fs::read(&pin) {
                Ok(b) => b,
                // Unpinned since the listing: the image was closed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(crate::Error::io(format!("read {}", pin.display()), e)),
            };
            chunks.extend(ImageMap::decode(&bytes)?.chunks());
        }
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::extent::ByteRange;
    use crate::model::image_map::Segment;

    #[test]
    fn pins_of_live_mounts_count_and_dead_ones_go() {
        let root = tempfile::tempdir().unwrap();
        let holder = |pid, activity| Holder {
            pid,
            activity,
            what: String::new(),
            started: 1000.5,
        };
        let (live, dead) = (holder(1, Activity::Mount), holder(2, Activity::Mount));
        let a = ChunkId::of(b"a");
        let b = ChunkId::of(b"b");
        let map = |id| ImageMap::new(1 << 20, vec![Segment::data(ByteRange::new(0, 4096), id, 0)]);
        let pins = PinDir::create(root.path(), &live).unwrap();
        pins.pin(7, &map(a)).unwrap();
        let stale = PinDir::create(root.path(), &dead).unwrap();
        stale.pin(1, &map(b)).unwrap();
        std::mem::forget(stale); // as if its process had died
        let got = pinned_chunks(root.path(), std::slice::from_ref(&live)).unwrap();
        assert_eq!(got, HashSet::from([a]));
        assert!(!root.path().join("pins").join(dir_name(&dead)).exists());
        pins.unpin(7);
        assert!(pinned_chunks(root.path(), &[live]).unwrap().is_empty());
        drop(pins);
        assert_eq!(fs::read_dir(root.path().join("pins")).unwrap().count(), 0);
    }
}
