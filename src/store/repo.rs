//! The repository: the chunk store, the manifests and the keys in a
//! [`Backend`] (a directory or an S3 bucket prefix), the catalog and other
//! host-local state in its *home*, and the one place where snapshots are
//! committed.
//!
//! ```text
//! config.json                format and chunking parameters
//! chunks/xx/<hash>           content-addressed chunks
//! manifests/<disk>/<id>.json one per snapshot: the truth the catalog is built from
//! keys/<id>.json             an encrypted repository's wrapped master key
//! damaged/<hash>             see `quarantine`
//! leases/…                   an object store's leases, see `lease`
//! ```
//!
//! The home is the repository directory itself for a local repository;
//! for one on object storage it is this host's cache directory for it
//! (`--cache-dir`), holding `catalog.db`, a chunk cache, `locks/`, `pins/`,
//! `tmp/` and `partial/`. There the catalog is a cache: it is brought up
//! to date with the manifests in the bucket each time the repository is
//! opened ([`Repository::refresh`]), and deleting it loses nothing.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::model::chunk_id::ChunkId;
use crate::model::extent::{merge_touching, ByteRange};
use crate::model::image_map::{ImageMap, Piece};
use crate::model::name::{DiskName, Selector, SnapshotId, SnapshotRef};
use crate::model::snapshot::{SnapshotInfo, SnapshotKind};
use crate::store::backend::{Backend, Created, Location};
use crate::store::catalog::{Catalog, SnapshotRecord, Writer};
use crate::store::chunks::local::LocalChunks;
use crate::store::chunks::object::ObjectChunks;
use crate::store::chunks::ChunkStore;
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
    location: Location,
    backend: Arc<dyn Backend>,
    /// Host-local state: the repository directory, or this host's cache
    /// directory for a repository on object storage.
    home: PathBuf,
    config: Config,
    chunks: Box<dyn ChunkStore>,
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
pub fn read_config(backend: &dyn Backend) -> Result<Config> {
    let where_ = || PathBuf::from(backend.describe());
    let body = backend
        .get("config.json")?
        .ok_or_else(|| Error::NotARepository(where_(), "it has no config.json".into()))?;
    let config: Config = serde_json::from_slice(&body)
        .map_err(|e| Error::NotARepository(where_(), e.to_string()))?;
    if config.format != REPO_FORMAT {
        return Err(Error::NotARepository(
            where_(),
            format!("unknown format {:?}", config.format),
        ));
    }
    if config.chunk_size == 0 || config.chunk_size > crate::store::chunks::MAX_CHUNK_SIZE as u64 {
        return Err(Error::NotARepository(
            where_(),
            format!("bad chunk_size {}", config.chunk_size),
        ));
    }
    match &config.encryption {
        Some(e) if *e != Encryption::current() => Err(Error::NotARepository(
            where_(),
            format!("unknown encryption {e:?}"),
        )),
        _ => Ok(config),
    }
}

/// This host's cache directory: `STRATA_CACHE_DIR` (`--cache-dir`), else
/// `$XDG_CACHE_HOME/strata`, else `~/.cache/strata`.
pub fn cache_base() -> PathBuf {
    std::env::var_os("STRATA_CACHE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("strata")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/strata")))
        .unwrap_or_else(|| std::env::temp_dir().join("strata"))
}

/// This host's cache directory for the repository `backend` describes.
pub fn cache_home(backend: &dyn Backend) -> PathBuf {
    let tag = blake3::hash(backend.describe().as_bytes()).to_hex();
    cache_base().join(&tag[..16])
}

/// The keys of an encrypted repository (and the id of the key file that
/// opened), or `None` for a plain one.
pub fn unlock(
    backend: &dyn Backend,
    config: &Config,
    passphrase: PassphraseSource,
) -> Result<Option<(Arc<Keys>, String)>> {
    if config.encryption.is_none() {
        return Ok(None);
    }
    let (master, id) = keys::unlock(backend, &passphrase()?)?;
    Ok(Some((Arc::new(Keys::from_master(&master)), id)))
}

impl Repository {
    /// Create a repository in `root`, which must be missing or empty; with
    /// a passphrase, an encrypted one.
    pub fn init(root: &Path, passphrase: Option<&str>) -> Result<Self> {
        Self::init_at(&Location::Dir(root.to_path_buf()), passphrase)
    }

    /// Create a repository at `location`: a missing or empty directory, or
    /// an S3 prefix that holds no objects (the bucket is created if it is
    /// missing).
    pub fn init_at(location: &Location, passphrase: Option<&str>) -> Result<Self> {
        let backend = location.open(true)?;
        match backend.local_root() {
            Some(root) => init_dir(root)?,
            None => {
                if !backend.list("")?.is_empty() {
                    return Err(Error::invalid(format!(
                        "{location} already holds objects; refusing to create a repository there (choose a new prefix)"
                    )));
                }
            }
        }
        let mut config = Config::default();
        if let Some(passphrase) = passphrase {
            let mut master = [0u8; 32];
            crypto::random(&mut master)?;
            keys::create(backend.as_ref(), &master, passphrase)?;
            config.encryption = Some(Encryption::current());
        }
        let body = serde_json::to_vec_pretty(&config).expect("config serializes");
        // The config is written last: its presence marks a complete
        // repository. Create-only: of two inits racing, one wins.
        if !backend.put_new("config.json", &body)? {
            return Err(Error::invalid(format!(
                "{location} was created by another process meanwhile"
            )));
        }
        let open =
            |p: &str| Self::open_backend(location.clone(), backend.clone(), &|| Ok(p.to_string()));
        let repo = match passphrase {
            Some(p) => open(p)?,
            None => Self::open_backend(location.clone(), backend.clone(), &no_passphrase)?,
        };
        repo.refresh()?;
        Ok(repo)
    }

    /// Open an unencrypted repository (an encrypted one fails: use
    /// [`open_with`](Self::open_with)).
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with(root, &no_passphrase)
    }

    /// Open a repository directory, asking `passphrase` if it is encrypted.
    pub fn open_with(root: &Path, passphrase: PassphraseSource) -> Result<Self> {
        Self::open_at(&Location::Dir(root.to_path_buf()), passphrase)
    }

    /// Open the repository at `location`, asking `passphrase` if it is
    /// encrypted. A repository on object storage brings this host's
    /// catalog up to date first.
    pub fn open_at(location: &Location, passphrase: PassphraseSource) -> Result<Self> {
        let repo = Self::open_unsynced(location, passphrase)?;
        repo.refresh()?;
        Ok(repo)
    }

    /// [`open_at`](Self::open_at) without bringing the catalog up to date:
    /// for a writer whose first use of the catalog follows its
    /// `Registration`, which syncs once its lease is taken. That sync,
    /// after the lease, is the one the parent must be chosen from; one
    /// before it would only add requests in series.
    pub fn open_unsynced(location: &Location, passphrase: PassphraseSource) -> Result<Self> {
        let backend = location.open(false)?;
        Self::open_backend(location.clone(), backend, passphrase)
    }

    fn open_backend(
        location: Location,
        backend: Arc<dyn Backend>,
        passphrase: PassphraseSource,
    ) -> Result<Self> {
        let config = read_config(backend.as_ref())?;
        let unlocked = unlock(backend.as_ref(), &config, passphrase)?;
        let (keys, key_id) = match unlocked {
            Some((keys, id)) => (Some(keys), Some(id)),
            None => (None, None),
        };
        let (home, chunks): (PathBuf, Box<dyn ChunkStore>) = match backend.local_root() {
            Some(root) => (
                root.to_path_buf(),
                Box::new(LocalChunks::new(
                    root.join("chunks"),
                    root.join("damaged"),
                    config.zstd_level,
                    keys.clone(),
                )),
            ),
            None => {
                let home = cache_home(backend.as_ref());
                fs::create_dir_all(&home).ctx(|| format!("create {}", home.display()))?;
                let chunks =
                    ObjectChunks::new(backend.clone(), &home, config.zstd_level, keys.clone())?;
                (home, Box::new(chunks))
            }
        };
        let catalog = Catalog::open(&home.join("catalog.db"))?;
        Ok(Repository {
            location,
            backend,
            home,
            chunks,
            config,
            catalog: Mutex::new(catalog),
            keys,
            key_id,
        })
    }

    /// Where the repository is, as `--repo` names it.
    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn backend_arc(&self) -> Arc<dyn Backend> {
        self.backend.clone()
    }

    /// The backend of a repository on object storage, which holds leases.
    pub fn shared_backend(&self) -> Option<Arc<dyn Backend>> {
        self.is_remote().then(|| self.backend.clone())
    }

    /// Whether the repository is on object storage (its catalog a cache).
    pub fn is_remote(&self) -> bool {
        self.backend.local_root().is_none()
    }

    /// Bring a cached catalog up to date with the manifests in the bucket;
    /// true when anything changed. A local repository's catalog is the
    /// truth already.
    pub fn refresh(&self) -> Result<bool> {
        if !self.is_remote() {
            return Ok(false);
        }
        crate::store::catalog_sync::sync(self, false)
    }

    /// [`refresh`](Self::refresh), failing (and changing nothing) if any
    /// manifest cannot be used: for maintenance, which must see every
    /// snapshot before it removes anything.
    pub fn refresh_strict(&self) -> Result<bool> {
        if !self.is_remote() {
            return Ok(false);
        }
        crate::store::catalog_sync::sync(self, true)
    }

    /// Where scratch files (receive's staging file) go: `tmp/` under
    /// [`scratch_root`](Self::scratch_root).
    pub fn scratch_dir(&self) -> PathBuf {
        self.scratch_root().join("tmp")
    }

    /// Where this host keeps what a push wrote before it is chunked: the
    /// home, except for an encrypted local repository, which must hold no
    /// disk content in clear: there, this host's cache directory
    /// ([`cache_base`]), under a name derived from the repository's path.
    pub fn scratch_root(&self) -> PathBuf {
        if self.keys.is_none() || self.is_remote() {
            return self.home.clone();
        }
        let root = self
            .home
            .canonicalize()
            .unwrap_or_else(|_| self.home.clone());
        let tag = blake3::hash(root.as_os_str().as_encoded_bytes()).to_hex();
        cache_base().join(&tag[..16])
    }

    /// The keys of an encrypted repository.
    pub fn keys(&self) -> Option<&Keys> {
        self.keys.as_deref()
    }

    /// The key file that opened this (encrypted) repository.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// Host-local state (see the module's documentation): the repository
    /// directory, or this host's cache directory for the repository.
    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn chunks(&self) -> &dyn ChunkStore {
        self.chunks.as_ref()
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

    /// Whether `info` still exists: after a pin (see `store::pins`), the
    /// check that gc cannot have missed both. Asks the truth: the catalog
    /// here, the manifest in the bucket on object storage.
    pub fn still_exists(&self, info: &SnapshotInfo) -> Result<bool> {
        if self.is_remote() {
            let key = manifest::manifest_key(&info.disk, &info.id);
            return Ok(self.backend.head(&key)?.is_some());
        }
        Ok(self.catalog().get(&info.disk, &info.id)?.is_some())
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
    /// `store::chunks::quarantine`), merged, in order.
    pub fn damaged_ranges(&self, image: &ImageMap) -> Result<Vec<ByteRange>> {
        Ok(damaged_ranges_in(image, &self.chunks.damaged()?))
    }

    pub fn manifest(&self, info: &SnapshotInfo) -> Result<Manifest> {
        manifest::read(self.backend(), &info.disk, &info.id, self.keys())
    }

    /// Make a snapshot copied from another repository visible under its own
    /// id and metadata, as [`commit`](Self::commit) does for a new one: its
    /// chunks flushed first, then its manifest, the catalog row last. A
    /// snapshot that exists already under that `DISK@ID` is an error.
    pub fn import(&self, info: &SnapshotInfo, own: &ImageMap) -> Result<()> {
        self.sync()?;
        self.catalog().write(|w| {
            if w.exists(&info.disk, &info.id)? {
                return Err(Error::invalid(format!(
                    "{} exists in the target already",
                    info.reference()
                )));
            }
            let image = keyframe_image(w, &info.disk, info.parent.as_ref(), own)?;
            let version = self.create_manifest(&Manifest::new(info, own), info)?;
            crate::testhook::pause("import:manifest-written");
            insert_committed(
                w,
                &SnapshotRecord {
                    info: info.clone(),
                    own: own.clone(),
                    image,
                },
                version,
            )
        })
    }

    /// Write the manifest of `info` as it is committed. On object storage
    /// the manifest is the commit, and it is written create-only: a
    /// snapshot committed under the same `DISK@ID` meanwhile (by another
    /// host) is an error, never overwritten. In a local repository the
    /// catalog row is the commit and a manifest without one is a leftover
    /// of a killed commit, replaced. The manifest's version, when the
    /// store reported it (see [`insert_committed`]).
    fn create_manifest(&self, m: &Manifest, info: &SnapshotInfo) -> Result<Option<String>> {
        if !self.is_remote() {
            manifest::write(self.backend(), m, &info.disk, &info.id, self.keys())?;
            return Ok(None);
        }
        let body = manifest::encode(m, &info.disk, &info.id, self.keys())?;
        crate::store::lease::ensure_held()?;
        let key = manifest::manifest_key(&info.disk, &info.id);
        let Created::New(version) = self.backend.create(&key, &body)? else {
            return Err(Error::invalid(format!(
                "{} exists in the repository already (committed by another process)",
                info.reference()
            )));
        };
        // A forget on another host may have removed the parent while this
        // snapshot was being taken: then it is taken back, never left
        // naming a parent that is gone (see `care::forget`).
        if let Some(p) = &info.parent {
            if self
                .backend
                .head(&manifest::manifest_key(&info.disk, p))?
                .is_none()
            {
                self.backend.delete(&key)?;
                return Err(Error::invalid(format!(
                    "{}: its parent {}@{p} was forgotten while it was being taken; \
                     nothing was committed, take it again",
                    info.reference(),
                    info.disk
                )));
            }
        }
        Ok(version)
    }

    /// The next free sequence number of `disk`'s ids. On object storage
    /// the bucket's manifests count too, those not (yet) in the catalog
    /// included: a domain run killed before its record left some.
    fn next_seq(&self, w: &Writer, disk: &DiskName) -> Result<u32> {
        let mut seq = w.next_seq(disk)?;
        if self.is_remote() {
            let prefix = format!("{}{disk}/", manifest::MANIFESTS_PREFIX);
            for o in self.backend.list(&prefix)? {
                if let Some((d, id)) = manifest::parse_key(&o.key) {
                    if d == *disk {
                        seq = seq.max(id.seq() + 1);
                    }
                }
            }
        }
        Ok(seq)
    }

    /// Make everything written durable: a local repository's file system,
    /// or the chunk uploads still in flight to a bucket.
    pub fn sync(&self) -> Result<()> {
        let Some(root) = self.backend.local_root() else {
            return self.chunks.flush();
        };
        let dir = fs::File::open(root).ctx(|| format!("open {}", root.display()))?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(Error::io("syncfs", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Make a snapshot visible. Its chunks are flushed first, then its
    /// manifest is written durably, and only then the catalog row appears.
    /// Commit several snapshots (of different disks) as one group, the
    /// disks of libvirt domain run `run` (its prefix): they share one id
    /// and appear together or not at all. `before_rows` writes what
    /// describes the group (the run's record) once the id is chosen; if it
    /// fails, nothing is committed. In a local repository all rows go in
    /// one catalog transaction, after `before_rows`; on object storage the
    /// manifests are written first and the record last, since the record
    /// is what makes the run's snapshots exist there (see `catalog_sync`).
    /// The id's sequence number is the next free one on every disk.
    pub fn commit_group(
        &self,
        news: Vec<NewSnapshot>,
        run: &str,
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
                seq = seq.max(self.next_seq(w, &new.disk)?);
            }
            let id = SnapshotId::new(time, seq);
            if !self.is_remote() {
                before_rows(&id)?;
            }
            let mut infos = Vec::with_capacity(news.len());
            let mut versions = Vec::with_capacity(news.len());
            for new in &news {
                let info = new.info(id.clone(), time);
                // A manifest without its row is what a crash here leaves:
                // invisible, and `repair --rebuild-catalog` would bring
                // back only the disks whose manifests were written.
                let mut m = Manifest::new(&info, &new.own);
                m.run = Some(run.to_string());
                versions.push(self.create_manifest(&m, &info)?);
                infos.push(info);
            }
            crate::testhook::pause("commit-group:manifests-written");
            if self.is_remote() {
                before_rows(&id)?;
            }
            let rows = infos.iter().zip(news.iter().zip(images)).zip(versions);
            for ((info, (new, image)), version) in rows {
                let record = SnapshotRecord {
                    info: info.clone(),
                    own: new.own.clone(),
                    image,
                };
                insert_committed(w, &record, version)?;
            }
            Ok(infos)
        })
    }

    pub fn commit(&self, new: NewSnapshot) -> Result<SnapshotInfo> {
        self.sync()?;
        log::debug!("synced");
        let mut cat = self.catalog();
        cat.write(|w| {
            // Inside the transaction, so that the chain it reads is the one
            // the row joins; a missing parent fails before anything is written.
            let image = keyframe_image(w, &new.disk, new.parent.as_ref(), &new.own)?;
            log::debug!("keyframe: {}", image.is_some());
            let seq = self.next_seq(w, &new.disk)?;
            let info = new.info(SnapshotId::new(new.time, seq), new.time);
            let version = self.create_manifest(&Manifest::new(&info, &new.own), &info)?;
            log::debug!("manifest written");
            crate::testhook::pause("commit:manifest-written");
            let record = SnapshotRecord {
                info: info.clone(),
                own: new.own.clone(),
                image,
            };
            insert_committed(w, &record, version)?;
            Ok(info)
        })
    }
}

/// The ranges of `image` whose chunks are in `damaged` (as
/// `ChunkStore::damaged` gives them), merged, in order.
pub fn damaged_ranges_in(image: &ImageMap, damaged: &HashSet<ChunkId>) -> Vec<ByteRange> {
    if damaged.is_empty() {
        return Vec::new();
    }
    merge_touching(image.segments.iter().filter_map(|s| match s.piece {
        Piece::Data { chunk, .. } if damaged.contains(&chunk) => Some(s.range),
        _ => None,
    }))
}

/// Insert the row of a snapshot committed here. With the version of its
/// manifest as written, the next sync reads it back only if another host
/// rewrote it meanwhile (forget of its parent); without one (a local
/// repository, a store that gives no ETag), a sync reads it back once.
fn insert_committed(w: &Writer, record: &SnapshotRecord, version: Option<String>) -> Result<()> {
    w.insert(record)?;
    match version {
        Some(v) => w.set_version(record.info.disk.as_str(), record.info.id.as_str(), &v),
        None => Ok(()),
    }
}

/// Prepare a local repository's directory: missing or empty, owner-only,
/// with the chunk store's subdirectories. The catalog and config come after.
fn init_dir(root: &Path) -> Result<()> {
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
    LocalChunks::create_layout(&root.join("chunks"))?;
    for dir in ["manifests", "locks", "tmp", "damaged"] {
        fs::create_dir_all(root.join(dir)).ctx(|| format!("create {dir}"))?;
    }
    Catalog::open(&root.join("catalog.db"))?;
    Ok(())
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
        assert!(plain.scratch_dir().starts_with(plain.home()));
        let enc = Repository::init(&dir.path().join("enc"), Some("pass")).unwrap();
        assert!(!enc.scratch_dir().starts_with(dir.path().join("enc")));
        assert!(enc.key_id().is_some() && plain.key_id().is_none());
        // A plain repository opens without a passphrase; an encrypted one not.
        assert!(Repository::open(plain.home()).is_ok());
        assert!(matches!(
            Repository::open(enc.home()),
            Err(Error::NeedPassphrase(_))
        ));
    }
}
