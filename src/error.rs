//! The library's error type. Every variant carries enough context to tell a
//! user what went wrong without a backtrace.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message (not a `source`), so that `{:#}` at
    // the edge does not print it twice.
    #[error("{context}: {err}")]
    Io {
        context: String,
        err: std::io::Error,
    },
    #[error("catalog: {0}")]
    Catalog(rusqlite::Error),
    #[error("invalid disk name {name:?}: {reason}")]
    BadDiskName { name: String, reason: String },
    #[error("invalid snapshot reference {0:?}: expected DISK@ID or DISK@latest")]
    BadSnapshotRef(String),
    #[error("snapshot {0} not found; list snapshots with: strata snapshots")]
    SnapshotNotFound(String),
    #[error("disk {0} has no snapshots; list disks and snapshots with: strata snapshots")]
    NoSnapshots(String),
    #[error("{path}: {message}")]
    BadChanges { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("not a strata repository: {0} ({1})")]
    NotARepository(PathBuf, String),
    #[error("chunk {hash}: {message}")]
    BadChunk { hash: String, message: String },
    #[error("repository is busy: {0}")]
    Busy(String),
    #[error("{0}")]
    Nbd(String),
    #[error("wrong passphrase: no key of this repository opens with it")]
    WrongPassphrase,
    #[error("the repository is encrypted: {0}")]
    NeedPassphrase(String),
    /// An object store refused or could not be reached.
    #[error("{endpoint}: {message}")]
    Remote { endpoint: String, message: String },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            err: source,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Catalog(e)
    }
}

/// Attach a context string to `std::io::Result`s, the way `anyhow` does at the edge.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
