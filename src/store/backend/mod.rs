//! Where a repository's bytes live: one small interface over a local
//! directory ([`dir::DirBackend`]) and an S3 bucket prefix
//! ([`s3::S3Backend`]). Everything above names objects by keys such as
//! `config.json`, `manifests/vm1/vda/ID.json` or `chunks/ab/<hash>`, and
//! writes each object whole: a reader sees the old body or the new one.

pub mod dir;
pub mod s3;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::model::extent::ByteRange;

/// One stored object, as a listing or a `head` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// The store's clock, not this host's: a local file's mtime, an
    /// object's Last-Modified.
    pub modified: DateTime<Utc>,
    /// Changes whenever the object is written: an ETag, or a file's size
    /// and mtime.
    pub version: String,
}

/// What a create-only write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// An object exists under the key; nothing was written.
    Exists,
    /// Written, at this version if the store said which (as `list` and
    /// `head` would report it).
    New(Option<String>),
}

pub trait Backend: Send + Sync {
    /// The repository as a user names it: a path, or `s3://bucket/prefix`
    /// with its endpoint.
    fn describe(&self) -> String;
    /// The object's body, `None` when it does not exist.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Bytes `range` of an object, `None` when it does not exist; an
    /// object shorter than the range is an error.
    fn get_range(&self, key: &str, range: ByteRange) -> Result<Option<Vec<u8>>>;
    /// Write an object whole and durably, replacing one that exists.
    fn put(&self, key: &str, body: &[u8]) -> Result<()>;
    /// Write an object only if none exists under `key`; false when one does.
    /// Stores without conditional writes emulate it (see `s3`).
    fn put_new(&self, key: &str, body: &[u8]) -> Result<bool>;
    /// [`put_new`](Self::put_new), also giving the new object's version
    /// when the store reports one (an ETag), so that a reader need not
    /// fetch what it wrote to learn it.
    fn create(&self, key: &str, body: &[u8]) -> Result<Created> {
        Ok(match self.put_new(key, body)? {
            true => Created::New(None),
            false => Created::Exists,
        })
    }
    /// [`put_new`](Self::put_new) of a body the caller gives up, which a
    /// store may send without copying it.
    fn put_new_owned(&self, key: &str, body: Vec<u8>) -> Result<bool> {
        self.put_new(key, &body)
    }
    /// Replace an object only if it is still at `version` (as `head` or
    /// `list` reported it); false when it changed or is gone.
    fn replace_if(&self, key: &str, body: &[u8], version: &str) -> Result<bool>;
    /// Remove an object; a missing one is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// Every object whose key starts with `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;
    /// The directory, for a local repository: the chunk store, the catalog
    /// and the leases keep their file-system fast paths there.
    fn local_root(&self) -> Option<&Path>;
}

/// Where a repository is, as `--repo` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl Location {
    pub fn parse(text: &str) -> Result<Location> {
        let Some(rest) = text.strip_prefix("s3://") else {
            return Ok(Location::Dir(PathBuf::from(text)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !valid_bucket {
            return Err(Error::invalid(format!(
                "{text}: invalid bucket name {bucket:?} (3-63 lowercase letters, digits, '-' or '.')"
            )));
        }
        // Only characters that need no escaping in a key: others would be
        // encoded by the client and listed back under other names.
        if prefix
            .split('/')
            .any(|s| s == "." || s == ".." || (s.is_empty() && !prefix.is_empty()))
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        {
            return Err(Error::invalid(format!("{text}: invalid prefix {prefix:?}")));
        }
        Ok(Location::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// Open the backend; `create` makes a missing directory or bucket.
    pub fn open(&self, create: bool) -> Result<Arc<dyn Backend>> {
        Ok(match self {
            Location::Dir(path) => Arc::new(dir::DirBackend::new(path)),
            Location::S3 { bucket, prefix } => {
                Arc::new(s3::S3Backend::connect(bucket, prefix, create)?)
            }
        })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Dir(p) => write!(f, "{}", p.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        assert_eq!(
            Location::parse("/srv/repo").unwrap(),
            Location::Dir("/srv/repo".into())
        );
        assert_eq!(
            Location::parse("s3://backups/site-a/").unwrap(),
            Location::S3 {
                bucket: "backups".into(),
                prefix: "site-a".into()
            }
        );
        assert_eq!(
            Location::parse("s3://backups").unwrap().to_string(),
            "s3://backups"
        );
        for bad in [
            "s3://",
            "s3://UPPER",
            "s3://ab",
            "s3://b-/x",
            "s3://bucket/a/../b",
            "s3://bucket/a//b",
        ] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
    }
}
