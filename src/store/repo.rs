//! The repository: a directory holding the catalog, the chunk store and the
//! manifests, and the one place where snapshots are committed.
//!
//! ```text
//! <repo>/config.json         format and chunking parameters
//! <repo>/catalog.db          SQLite catalog (+ -wal, -shm)
//! <repo>/chunks/xx/<hash>    content-addressed chunks
//! <repo>/manifests/<disk>/<id>.json
//! <repo>/lock, locks/<pid>   see `lock`
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::model::extent::{merge_touching, ByteRange};
use crate::model::image_map::{ImageMap, Piece};
use crate::model::name::{DiskName, Selector, SnapshotId, SnapshotRef};
use crate::model::snapshot::{SnapshotInfo, SnapshotKind};
use crate::store::catalog::{Catalog, SnapshotRecord, Writer};
use crate::store::chunk::ChunkStore;
use crate::store::crypto::{self, Keys};
use crate::store::keys;
use crate::store::manifest::{self, Manifest};

pub const REPO_FORMAT: &str = "strata-repo/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub format: String,
    /// Data is cut into chunks at multiples of this many bytes of the disk.
    pub chunk_size: u64,
    pub zstd_level: i32,
    /// Present in an encrypted repository (`store::crypto`, `store::keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// How an encrypted repository is encrypted; the one scheme there is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    pub cipher: String,
    pub chunk_names: String,
    pub kdf: String,
}

impl Encryption {
    fn current() -> Self {
        Encryption {
            cipher: "aes-256-gcm".into(),
            chunk_names: "blake3-keyed".into(),
            kdf: "argon2id".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            format: REPO_FORMAT.to_string(),
            chunk_size: 1 << 20,
            zstd_level: 1,
            encryption: None,
        }
    }
}

pub struct Repository {
    root: PathBuf,
    config: Config,
    chunks: ChunkStore,
    catalog: Mutex<Catalog>,
    keys: Option<Arc<Keys>>,
    /// The key file the passphrase opened.
    key_id: Option<String>,
}

/// Where an encrypted repository's passphrase comes from; asked only when
/// the repository turns out to be encrypted.
pub type PassphraseSource<'a> = &'a dyn Fn() -> Result<String>;

/// For plain repositories: an encrypted one cannot be opened.
pub fn no_passphrase() -> Result<String> {
    Err(Error::NeedPassphrase("no passphrase was given".into()))
}

/// What a backup hands over to be committed.
pub struct NewSnapshot {
    pub disk: DiskName,
    pub kind: SnapshotKind,
    pub parent: Option<SnapshotId>,
    pub time: DateTime<Utc>,
    pub granularity: u64,
    pub label: String,
    pub checkpoint: Option<String>,
    pub bitmap: Option<String>,
    pub stored_bytes: u64,
    /// The snapshot's own segments; `own.size` is the virtual size.
    pub own: ImageMap,
}

impl NewSnapshot {
    /// The snapshot as it is committed under `id` at `time`.
    fn info(&self, id: SnapshotId, time: DateTime<Utc>) -> SnapshotInfo {
        SnapshotInfo {
            disk: self.disk.clone(),
            id,
            time,
            kind: self.kind,
            parent: self.parent.clone(),
            size: self.own.size,
            granularity: self.granularity,
            label: self.label.clone(),
            checkpoint: self.checkpoint.clone(),
            bitmap: self.bitmap.clone(),
            protected: false,
            stored_bytes: self.stored_bytes,
        }
    }
}

/// The repository's `config.json`, checked.
pub fn read_config(root: &Path) -> Result<Config> {
    let cfg_path = root.join("config.json");
    let body = fs::read(&cfg_path)
        .map_err(|e| Error::NotARepository(root.to_path_buf(), e.to_string()))?;
    let config: Config = serde_json::from_slice(&body)
        .map_err(|e| Error::NotARepository(root.to_path_buf(), e.to_string()))?;
    if config.format != REPO_FORMAT {
        return Err(Error::NotARepository(
            root.to_path_buf(),
            format!("unknown format {:?}", config.format),
        ));
    }
    if config.chunk_size == 0 || config.chunk_size > crate::store::chunk::MAX_CHUNK_SIZE as u64 {
        return Err(Error::NotARepository(
            root.to_path_buf(),
            format!("bad chunk_size {}", config.chunk_size),
        ));
    }
    match &config.encryption {
        Some(e) if *e != Encryption::current() => Err(Error::NotARepository(
            root.to_path_buf(),
            format!("unknown encryption {e:?}"),
        )),
        _ => Ok(config),
    }
}

/// The keys of an encrypted repository (and the id of the key file that
/// opened), or `None` for a plain one.
pub fn unlock(
    root: &Path,
    config: &Config,
    passphrase: PassphraseSource,
) -> Result<Option<(Arc<Keys>, String)>> {
    if config.encryption.is_none() {
        return Ok(None);
    }
    let (master, id) = keys::unlock(root, &passphrase()?)?;
    Ok(Some((Arc::new(Keys::from_master(&master)), id)))
}

impl Repository {
    /// Create a repository in `root`, which must be missing or empty; with
    /// a passphrase, an encrypted one.
    pub fn init(root: &Path, passphrase: Option<&str>) -> Result<Self> {
        if root.exists() {
            let mut entries = fs::read_dir(root).ctx(|| format!("read {}", root.display()))?;
            if entries.next().is_some() {
                return Err(Error::invalid(format!(
                    "{} is not empty; refusing to create a repository there (choose a new or empty directory)",
                    root.display()
                )));
            }
        }
        fs::create_dir_all(root).ctx(|| format!("create {}", root.display()))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .ctx(|| format!("chmod {}", root.display()))?;
        ChunkStore::create_layout(&root.join("chunks"))?;
        for dir in ["manifests", "locks", "tmp", "damaged"] {
            fs::create_dir_all(root.join(dir)).ctx(|| format!("create {dir}"))?;
        }
        let mut config = Config::default();
        if let Some(passphrase) = passphrase {
            let mut master = [0u8; 32];
            crypto::random(&mut master)?;
            keys::create(root, &master, passphrase)?;
            config.encryption = Some(Encryption::current());
        }
        Catalog::open(&root.join("catalog.db"))?;
        let body = serde_json::to_vec_pretty(&config).expect("config serializes");
        // The config is written last: its presence marks a complete repository.
        let tmp = root.join("config.json.tmp");
        fs::write(&tmp, body).ctx(|| "write config.json".into())?;
        fs::rename(&tmp, root.join("config.json")).ctx(|| "rename config.json".into())?;
        crate::store::durable::fsync_dir(root)?;
        match passphrase {
            Some(p) => Self::open_with(root, &|| Ok(p.to_string())),
            None => Self::open(root),
        }
    }

    /// Open an unencrypted repository (an encrypted one fails: use
    /// [`open_with`](Self::open_with)).
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with(root, &no_passphrase)
    }

    /// Open a repository, asking `passphrase` if it is encrypted.
    pub fn open_with(root: &Path, passphrase: PassphraseSource) -> Result<Self> {
        let config = read_config(root)?;
        let unlocked = unlock(root, &config, passphrase)?;
        let catalog = Catalog::open(&root.join("catalog.db"))?;
        let (keys, key_id) = match unlocked {
            Some((keys, id)) => (Some(keys), Some(id)),
            None => (None, None),
        };
        Ok(Repository {
            root: root.to_path_buf(),
            chunks: ChunkStore::new(
                root.join("chunks"),
                root.join("damaged"),
                config.zstd_level,
                keys.clone(),
            ),
            config,
            catalog: Mutex::new(catalog),
            keys,
            key_id,
        })
    }

    /// Where scratch files (receive's staging file) go: `tmp/` under
    /// [`scratch_root`](Self::scratch_root).
    pub fn scratch_dir(&self) -> PathBuf {
        self.scratch_root().join("tmp")
    }

    /// Where this host keeps what a push wrote before it is chunked: the
    /// repository, except for an encrypted one, which must hold no disk
    /// content in clear: there, this host's cache directory
    /// (`STRATA_CACHE_DIR`, else `$XDG_CACHE_HOME/strata`, else
    /// `~/.cache/strata`), under a name derived from the repository's path.
    pub fn scratch_root(&self) -> PathBuf {
        if self.keys.is_none() {
            return self.root.clone();
        }
        let base = std::env::var_os("STRATA_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("strata")))
            .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/strata")))
            .unwrap_or_else(|| std::env::temp_dir().join("strata"));
        let root = self
            .root
            .canonicalize()
            .unwrap_or_else(|_| self.root.clone());
        let tag = blake3::hash(root.as_os_str().as_encoded_bytes()).to_hex();
        base.join(&tag[..16])
    }

    /// The keys of an encrypted repository.
    pub fn keys(&self) -> Option<&Keys> {
        self.keys.as_deref()
    }

    /// The key file that opened this (encrypted) repository.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    pub fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshots(&self, disk: Option<&DiskName>) -> Result<Vec<SnapshotInfo>> {
        self.catalog().list(disk)
    }

    /// Look up `DISK@ID` or `DISK@latest`.
    pub fn resolve(&self, r: &SnapshotRef) -> Result<SnapshotInfo> {
        let cat = self.catalog();
        match &r.selector {
            Selector::Latest => cat
                .latest(&r.disk)?
                .ok_or_else(|| Error::NoSnapshots(r.disk.to_string())),
            Selector::Id(id) => cat
                .get(&r.disk, id)?
                .ok_or_else(|| Error::SnapshotNotFound(r.to_string())),
        }
    }

    /// The snapshot's own map and its resolved image map.
    pub fn maps(&self, info: &SnapshotInfo) -> Result<(ImageMap, ImageMap)> {
        self.catalog()
            .maps(&info.disk, &info.id)?
            .ok_or_else(|| Error::SnapshotNotFound(info.reference()))
    }

    /// The snapshot's own map: what it changed over its parent.
    pub fn own_map(&self, info: &SnapshotInfo) -> Result<ImageMap> {
        self.catalog()
            .own_map(&info.disk, &info.id)?
            .ok_or_else(|| Error::SnapshotNotFound(info.reference()))
    }

    /// The snapshot's resolved image map: one stored map and at most
    /// `catalog::KEYFRAME_EVERY - 1` own maps decoded and overlaid.
    /// Callers that read keep it for as long as they read.
    pub fn image_map(&self, info: &SnapshotInfo) -> Result<ImageMap> {
        self.catalog()
            .image_map(&info.disk, &info.id)?
            .ok_or_else(|| Error::SnapshotNotFound(info.reference()))
    }

    /// The ranges of `image` whose chunks are on record as damaged (see
    /// `store::quarantine`), merged, in order.
    pub fn damaged_ranges(&self, image: &ImageMap) -> Result<Vec<ByteRange>> {
        let damaged = self.chunks.damaged()?;
        if damaged.is_empty() {
            return Ok(Vec::new());
        }
        Ok(merge_touching(image.segments.iter().filter_map(
            |s| match s.piece {
                Piece::Data { chunk, .. } if damaged.contains(&chunk) => Some(s.range),
                _ => None,
            },
        )))
    }

    pub fn manifest(&self, info: &SnapshotInfo) -> Result<Manifest> {
        manifest::read(
            &manifest::manifest_path(&self.manifests_dir(), &info.disk, &info.id),
            self.keys(),
        )
    }

    /// Make a snapshot copied from another repository visible under its own
    /// id and metadata, as [`commit`](Self::commit) does for a new one: its
    /// chunks flushed first, then its manifest, the catalog row last. A
    /// snapshot that exists already under that `DISK@ID` is an error.
    pub fn import(&self, info: &SnapshotInfo, own: &ImageMap) -> Result<()> {
        self.sync()?;
        let manifests = self.manifests_dir();
        self.catalog().write(|w| {
            if w.exists(&info.disk, &info.id)? {
                return Err(Error::invalid(format!(
                    "{} exists in the target already",
                    info.reference()
                )));
            }
            let image = keyframe_image(w, &info.disk, info.parent.as_ref(), own)?;
            manifest::write(
                &manifests,
                &Manifest::new(info, own),
                &info.disk,
                &info.id,
                self.keys(),
            )?;
            crate::testhook::pause("import:manifest-written");
            w.insert(&SnapshotRecord {
                info: info.clone(),
                own: own.clone(),
                image,
            })
        })
    }

    /// Flush everything written to the repository's file system.
    pub fn sync(&self) -> Result<()> {
        let dir = fs::File::open(&self.root).ctx(|| format!("open {}", self.root.display()))?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(Error::io("syncfs", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Make a snapshot visible. Its chunks are flushed first, then its
    /// manifest is written durably, and only then the catalog row appears.
    /// Commit several snapshots (of different disks) as one group: they
    /// share one id and appear together, in one catalog transaction, or
    /// not at all. `before_rows` runs inside that transaction once the id
    /// is chosen and before any row is inserted (callers write what
    /// describes the group there; if it fails, nothing is committed).
    /// The id's sequence number is the next free one on every disk.
    pub fn commit_group(
        &self,
        news: Vec<NewSnapshot>,
        before_rows: &dyn Fn(&SnapshotId) -> Result<()>,
    ) -> Result<Vec<SnapshotInfo>> {
        let Some(first) = news.first() else {
            return Err(Error::invalid("an empty group of snapshots"));
        };
        let time = first.time;
        if news.iter().any(|n| n.time != time) {
            return Err(Error::invalid("snapshots of one group must share one time"));
        }
        self.sync()?;
        let manifests = self.manifests_dir();
        let mut cat = self.catalog();
        cat.write(|w| {
            // As in `commit`: inside the transaction, each disk's keyframe
            // decision sees the chain its row joins.
            let mut images = Vec::with_capacity(news.len());
            for new in &news {
                images.push(keyframe_image(w, &new.disk, new.parent.as_ref(), &new.own)?);
            }
            let mut seq = 1;
            for new in &news {
                seq = seq.max(w.next_seq(&new.disk)?);
            }
            let id = SnapshotId::new(time, seq);
            before_rows(&id)?;
            let mut infos = Vec::with_capacity(news.len());
            for new in &news {
                let info = new.info(id.clone(), time);
                // A manifest without its row is what a crash here leaves:
                // invisible, and `repair --rebuild-catalog` would bring
                // back only the disks whose manifests were written.
                manifest::write(
                    &manifests,
                    &Manifest::new(&info, &new.own),
                    &info.disk,
                    &info.id,
                    self.keys(),
                )?;
                infos.push(info);
            }
            crate::testhook::pause("commit-group:manifests-written");
            for (info, (new, image)) in infos.iter().zip(news.iter().zip(images)) {
                w.insert(&SnapshotRecord {
                    info: info.clone(),
                    own: new.own.clone(),
                    image,
                })?;
            }
            Ok(infos)
        })
    }

    pub fn commit(&self, new: NewSnapshot) -> Result<SnapshotInfo> {
        self.sync()?;
        log::debug!("synced");
        let manifests = self.manifests_dir();
        let mut cat = self.catalog();
        cat.write(|w| {
            // Inside the transaction, so that the chain it reads is the one
            // the row joins; a missing parent fails before anything is written.
            let image = keyframe_image(w, &new.disk, new.parent.as_ref(), &new.own)?;
            log::debug!("keyframe: {}", image.is_some());
            let seq = w.next_seq(&new.disk)?;
            let info = new.info(SnapshotId::new(new.time, seq), new.time);
            manifest::write(
                &manifests,
                &Manifest::new(&info, &new.own),
                &info.disk,
                &info.id,
                self.keys(),
            )?;
            log::debug!("manifest written");
            crate::testhook::pause("commit:manifest-written");
            w.insert(&SnapshotRecord {
                info: info.clone(),
                own: new.own.clone(),
                image,
            })?;
            Ok(info)
        })
    }
}

/// The image map a new child of `parent` with `own` must store, if the
/// catalog's keyframe rule asks for one (see `store::catalog`).
pub(crate) fn keyframe_image(
    w: &Writer,
    disk: &DiskName,
    parent: Option<&SnapshotId>,
    own: &ImageMap,
) -> Result<Option<ImageMap>> {
    let Some(pid) = parent else {
        return Ok(None);
    };
    if !w.keyframe_due(disk, Some(pid), own.encode().len())? {
        return Ok(None);
    }
    let base = w
        .image_map(disk, pid)?
        .ok_or_else(|| Error::SnapshotNotFound(format!("{disk}@{pid}")))?;
    Ok(Some(base.overlay(own)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypted_scratch_files_stay_outside_the_repository() {
        let dir = tempfile::tempdir().unwrap();
        let plain = Repository::init(&dir.path().join("plain"), None).unwrap();
        assert!(plain.scratch_dir().starts_with(plain.root()));
        let enc = Repository::init(&dir.path().join("enc"), Some("pass")).unwrap();
        assert!(!enc.scratch_dir().starts_with(dir.path().join("enc")));
        assert!(enc.key_id().is_some() && plain.key_id().is_none());
        // A plain repository opens without a passphrase; an encrypted one not.
        assert!(Repository::open(plain.root()).is_ok());
        assert!(matches!(
            Repository::open(enc.root()),
            Err(Error::NeedPassphrase(_))
        ));
    }
}
