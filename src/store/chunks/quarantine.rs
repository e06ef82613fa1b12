//! Damaged chunks, moved out of use: `damaged/<hash>`.
//!
//! A chunk file found damaged (altered, truncated) by verify or by any read
//! is renamed here; a missing one leaves an empty file. Its name in the
//! store is then free, so the next backup that meets the same data stores it
//! anew (dedup only trusts a name that exists), and every snapshot using it
//! reads whole again. The files are also the memory of what is damaged: a
//! backup reads its parent's damaged ranges from the source again, and
//! `receive --incremental` refuses a damaged parent. A record whose chunk is
//! back under its name has healed; gc removes it, and those of chunks no
//! snapshot uses any more.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::model::chunk_id::ChunkId;

#[derive(Debug, Clone)]
pub struct Quarantine {
    dir: PathBuf,
}

/// What [`Quarantine::take`] found under the chunk's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// The file was moved into quarantine.
    Moved,
    /// There was no file: an empty record stands for it.
    Missing,
}

impl Taken {
    /// What happened, for messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Taken::Moved => "moved out of use; a backup that reads the same data stores it again",
            Taken::Missing => {
                "recorded as damaged; a backup that reads the same data stores it again"
            }
        }
    }
}

/// The outcome of a chunk read, with a chunk found damaged moved out of
/// use by `quarantine` before the error returns (every chunk store reads
/// through this).
pub fn on_damage(
    read: Result<()>,
    quarantine: impl FnOnce() -> Result<Option<Taken>>,
) -> Result<()> {
    match read {
        Err(crate::Error::BadChunk { hash, message }) => {
            let message = match quarantine() {
                Ok(Some(taken)) => format!("{message}; {}", taken.describe()),
                Ok(None) => message,
                Err(e) => format!("{message}; moving it out of use failed: {e}"),
            };
            Err(crate::Error::BadChunk { hash, message })
        }
        other => other,
    }
}

impl Quarantine {
    pub fn new(dir: PathBuf) -> Self {
        Quarantine { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// Move the chunk file at `chunk` into quarantine, or record it as
    /// missing. One rename: a process killed here leaves the chunk either in
    /// use or in quarantine, never lost.
    pub fn take(&self, chunk: &Path, id: &ChunkId) -> Result<Taken> {
        fs::create_dir_all(&self.dir).ctx(|| format!("create {}", self.dir.display()))?;
        let path = self.path(id);
        match fs::rename(chunk, &path) {
            Ok(()) => Ok(Taken::Moved),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !path.exists() {
                    fs::File::create(&path).ctx(|| format!("create {}", path.display()))?;
                }
                Ok(Taken::Missing)
            }
            Err(e) => Err(crate::Error::io(
                format!("quarantine {}", chunk.display()),
                e,
            )),
        }
    }

    /// Put a chunk moved by [`take`](Self::take) back at `chunk` (it was
    /// whole after all: stored anew by a backup between the failed read and
    /// the move). A chunk stored under the name meanwhile wins.
    pub fn give_back(&self, chunk: &Path, id: &ChunkId) -> Result<()> {
        let path = self.path(id);
        match fs::hard_link(&path, chunk) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(crate::Error::io(format!("restore {}", chunk.display()), e))
            }
            _ => {}
        }
        self.remove(id)
    }

    /// Every chunk on record, healed or not.
    pub fn list(&self) -> Result<Vec<ChunkId>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(crate::Error::io(format!("list {}", self.dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.ctx(|| format!("list {}", self.dir.display()))?;
            match entry.file_name().to_str().map(ChunkId::from_hex) {
                Some(Ok(id)) => out.push(id),
                _ => log::warn!("ignoring unexpected file {}", entry.path().display()),
            }
        }
        Ok(out)
    }

    /// The chunks on record that are still not back under their name.
    pub fn unhealed(&self, present: impl Fn(&ChunkId) -> bool) -> Result<HashSet<ChunkId>> {
        Ok(self.list()?.into_iter().filter(|id| !present(id)).collect())
    }

    pub fn remove(&self, id: &ChunkId) -> Result<()> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(crate::Error::io(format!("remove {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }
}
