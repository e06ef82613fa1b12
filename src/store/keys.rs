//! Key files of an encrypted repository: `keys/<id>.json`, one per
//! passphrase, each holding the master key wrapped (AES-256-GCM) with a key
//! derived from its passphrase by Argon2id, the parameters stored beside
//! it. Any one passphrase opens the repository; removing a key file makes
//! its passphrase open nothing.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::backend::Backend;
use crate::store::crypto::{
    aes_key, from_hex, open, random, seal, to_hex, NONCE_LEN, SEAL_OVERHEAD,
};

pub const KEY_FORMAT: &str = "strata-key/1";

/// Argon2id cost: 32 MiB and three passes, about 0.07 s here, paid once per
/// command (64 MiB took twice as long, half of it faulting in fresh pages
/// on this VM, and cost an encrypted restore of 4 GiB a tenth of its
/// speed). Above OWASP's minimum for Argon2id (19 MiB, two passes). Each
/// key file stores its own parameters, so they can be raised later.
const MEMORY_KIB: u32 = 32 * 1024;
const ITERATIONS: u32 = 3;
const PARALLELISM: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kdf {
    pub algorithm: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub salt: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub format: String,
    pub id: String,
    pub created: String,
    pub kdf: Kdf,
    pub cipher: String,
    /// Nonce, wrapped master key and tag, in hex.
    pub wrapped: String,
}

/// Key files live under this prefix: `keys/<id>.json`.
pub const KEYS_PREFIX: &str = "keys/";

/// The key that wraps the master key, from a passphrase.
fn derive(passphrase: &str, kdf: &Kdf) -> Result<[u8; 32]> {
    if kdf.algorithm != "argon2id" {
        return Err(Error::invalid(format!(
            "unknown key derivation {:?}",
            kdf.algorithm
        )));
    }
    let salt = from_hex(&kdf.salt).ok_or_else(|| Error::invalid("key file: bad salt"))?;
    let params = argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32))
        .map_err(|e| Error::invalid(format!("key file: bad Argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(passphrase.as_bytes(), &salt, &mut out)
        .map_err(|e| Error::invalid(format!("key derivation failed: {e}")))?;
    Ok(out)
}

fn aad(id: &str) -> Vec<u8> {
    format!("strata key {id}").into_bytes()
}

/// Write a new key file wrapping `master` with `passphrase`.
pub fn create(backend: &dyn Backend, master: &[u8; 32], passphrase: &str) -> Result<KeyFile> {
    if passphrase.is_empty() {
        return Err(Error::invalid("the passphrase is empty"));
    }
    let mut raw = [0u8; 8];
    random(&mut raw)?;
    let id = to_hex(&raw);
    let mut salt = [0u8; 16];
    random(&mut salt)?;
    let kdf = Kdf {
        algorithm: "argon2id".into(),
        memory_kib: MEMORY_KIB,
        iterations: ITERATIONS,
        parallelism: PARALLELISM,
        salt: to_hex(&salt),
    };
    let kek = derive(passphrase, &kdf)?;
    let mut wrapped = vec![0u8; SEAL_OVERHEAD + master.len()];
    wrapped[NONCE_LEN..NONCE_LEN + master.len()].copy_from_slice(master);
    seal(&aes_key(&kek), &aad(&id), &mut wrapped)?;
    let file = KeyFile {
        format: KEY_FORMAT.into(),
        id,
        created: crate::model::snapshot::format_time(&chrono::Utc::now()),
        kdf,
        cipher: "aes-256-gcm".into(),
        wrapped: to_hex(&wrapped),
    };
    write(backend, &file)?;
    Ok(file)
}

fn write(backend: &dyn Backend, file: &KeyFile) -> Result<()> {
    let body = serde_json::to_vec_pretty(file).expect("key file serializes");
    backend.put(&format!("{KEYS_PREFIX}{}.json", file.id), &body)
}

/// Every key file, oldest first.
pub fn list(backend: &dyn Backend) -> Result<Vec<KeyFile>> {
    let mut out = Vec::new();
    for object in backend.list(KEYS_PREFIX)? {
        if !object.key.ends_with(".json") {
            continue;
        }
        // Removed since the listing: not a key any more.
        let Some(body) = backend.get(&object.key)? else {
            continue;
        };
        let file: KeyFile = serde_json::from_slice(&body)
            .map_err(|e| Error::invalid(format!("{}: malformed key file: {e}", object.key)))?;
        out.push(file);
    }
    out.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
    Ok(out)
}

/// The master key and the id of the key file `passphrase` opens.
pub fn unlock(backend: &dyn Backend, passphrase: &str) -> Result<([u8; 32], String)> {
    let files = list(backend)?;
    if files.is_empty() {
        return Err(Error::invalid(format!(
            "{} has no key files: the repository cannot be opened",
            backend.describe()
        )));
    }
    for file in &files {
        if let Some(master) = try_unwrap(file, passphrase)? {
            return Ok((master, file.id.clone()));
        }
    }
    Err(Error::WrongPassphrase)
}

fn try_unwrap(file: &KeyFile, passphrase: &str) -> Result<Option<[u8; 32]>> {
    let bad = || Error::invalid(format!("key file {}: malformed wrapped key", file.id));
    let mut wrapped = from_hex(&file.wrapped).ok_or_else(bad)?;
    if wrapped.len() != SEAL_OVERHEAD + 32 {
        return Err(bad());
    }
    let kek = derive(passphrase, &file.kdf)?;
    match open(&aes_key(&kek), &aad(&file.id), &mut wrapped) {
        Ok(range) => Ok(Some(wrapped[range].try_into().map_err(|_| bad())?)),
        // A wrong passphrase and a key file bound to another id look alike.
        Err(_) => Ok(None),
    }
}

/// Remove key `id`; never the last one.
pub fn remove(backend: &dyn Backend, id: &str) -> Result<()> {
    let files = list(backend)?;
    if !files.iter().any(|f| f.id == id) {
        return Err(Error::invalid(format!(
            "no key {id:?}; `strata key list` shows the keys"
        )));
    }
    if files.len() == 1 {
        return Err(Error::invalid(format!(
            "key {id} is the repository's only key; add another before removing it"
        )));
    }
    backend.delete(&format!("{KEYS_PREFIX}{id}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passphrases_wrap_one_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::store::backend::dir::DirBackend::new(dir.path());
        let root = &backend;
        let master = [42u8; 32];
        let a = create(root, &master, "first").unwrap();
        let b = create(root, &master, "second").unwrap();
        assert_eq!(unlock(root, "first").unwrap(), (master, a.id.clone()));
        assert_eq!(unlock(root, "second").unwrap(), (master, b.id.clone()));
        assert!(matches!(unlock(root, "third"), Err(Error::WrongPassphrase)));
        remove(root, &a.id).unwrap();
        assert!(matches!(unlock(root, "first"), Err(Error::WrongPassphrase)));
        assert!(remove(root, &b.id)
            .unwrap_err()
            .to_string()
            .contains("only key"));
        // A wrapped key bound to another id does not open.
        let mut moved = list(root).unwrap().remove(0);
        moved.id = "0000000000000000".into();
        assert!(try_unwrap(&moved, "second").unwrap().is_none());
    }
}
