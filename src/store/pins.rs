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
use std::sync::Arc;

use crate::error::Result;
use crate::model::chunk_id::ChunkId;
use crate::model::image_map::ImageMap;
use crate::store::backend::Backend;
use crate::store::lock::Registration;
use crate::store::repo::Repository;

const PINS: &str = "pins/";

/// One mount's pins, `pins/<name>/<n>.map`; they go when this is dropped.
pub struct PinDir {
    backend: Arc<dyn Backend>,
    prefix: String,
}

impl std::fmt::Debug for PinDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinDir({})", self.prefix)
    }
}

impl PinDir {
    /// The pins of the mount registered as `registration`: beside the
    /// repository's leases (in the bucket) on object storage, else in the
    /// repository directory.
    pub fn create(repo: &Repository, registration: &Registration) -> Result<Self> {
        Ok(Self::under(repo.backend_arc(), &registration.pin_name()))
    }

    fn under(backend: Arc<dyn Backend>, name: &str) -> Self {
        PinDir {
            backend,
            prefix: format!("{PINS}{name}/"),
        }
    }

    fn key(&self, key: u64) -> String {
        format!("{}{key}.map", self.prefix)
    }

    /// Keep the chunks of `map` from gc under `key` until [`unpin`](Self::unpin).
    /// Written whole: gc never reads half a map.
    pub fn pin(&self, key: u64, map: &ImageMap) -> Result<()> {
        self.pin_encoded(key, &map.encode())
    }

    /// [`pin`](Self::pin) a map given in its binary encoding
    /// ([`ImageMap::encode`]; `CompactMap::encode` writes the same bytes).
    pub fn pin_encoded(&self, key: u64, encoded: &[u8]) -> Result<()> {
        self.backend.put(&self.key(key), encoded)
    }

    pub fn unpin(&self, key: u64) {
        let _ = self.backend.delete(&self.key(key));
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(pins) = self.backend.list(&self.prefix) {
            for p in pins {
                let _ = self.backend.delete(&p.key);
            }
        }
        if let Some(root) = self.backend.local_root() {
            let _ = std::fs::remove_dir(root.join(self.prefix.trim_end_matches('/')));
        }
    }
}

/// The chunks pinned by live holders (see [`Registration::pin_name`]):
/// those named in `live`, and those `alive_now` finds alive, asked only
/// for names not in `live` (a holder that registered after the caller
/// looked). Pins of holders that are gone are removed.
pub fn pinned_chunks(
    backend: &dyn Backend,
    live: &HashSet<String>,
    alive_now: &dyn Fn(&str) -> Result<bool>,
) -> Result<HashSet<ChunkId>> {
    let mut chunks = HashSet::new();
    let mut dead_dirs = HashSet::new();
    let mut late: HashSet<String> = HashSet::new();
    for pin in backend.list(PINS)? {
        let Some((name, file)) = pin.key[PINS.len()..].split_once('/') else {
            continue;
        };
        if !live.contains(name) && !late.contains(name) {
            if dead_dirs.contains(name) || !alive_now(name)? {
                backend.delete(&pin.key)?;
                dead_dirs.insert(name.to_string());
                continue;
            }
            late.insert(name.to_string());
        }
        if !file.ends_with(".map") {
            continue;
        }
        // Unpinned since the listing: the image was closed.
        let Some(bytes) = backend.get(&pin.key)? else {
            continue;
        };
        chunks.extend(ImageMap::decode(&bytes)?.chunks());
    }
    if let Some(root) = backend.local_root() {
        for name in dead_dirs {
            let _ = std::fs::remove_dir(root.join(PINS).join(name));
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
        let backend: Arc<dyn Backend> =
            Arc::new(crate::store::backend::dir::DirBackend::new(root.path()));
        let a = ChunkId::of(b"a");
        let b = ChunkId::of(b"b");
        let map = |id| ImageMap::new(1 << 20, vec![Segment::data(ByteRange::new(0, 4096), id, 0)]);
        let pins = PinDir::under(backend.clone(), "1.1000");
        pins.pin(7, &map(a)).unwrap();
        let stale = PinDir::under(backend.clone(), "2.1000");
        stale.pin(1, &map(b)).unwrap();
        std::mem::forget(stale); // as if its process had died
        let live = HashSet::from(["1.1000".to_string()]);
        let got = pinned_chunks(backend.as_ref(), &live, &|_| Ok(false)).unwrap();
        assert_eq!(got, HashSet::from([a]));
        assert!(!root.path().join("pins/2.1000").exists());
        pins.unpin(7);
        assert!(pinned_chunks(backend.as_ref(), &live, &|_| Ok(false))
            .unwrap()
            .is_empty());
        // A holder that registered after the caller looked counts.
        let late = PinDir::under(backend.clone(), "3.1000");
        late.pin(1, &map(b)).unwrap();
        let got = pinned_chunks(backend.as_ref(), &live, &|n| Ok(n == "3.1000")).unwrap();
        assert_eq!(got, HashSet::from([b]));
        drop(late);
        drop(pins);
        assert_eq!(
            std::fs::read_dir(root.path().join("pins")).unwrap().count(),
            0
        );
    }
}
