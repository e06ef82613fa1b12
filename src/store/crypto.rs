//! The keys of an encrypted repository and what they do: keyed chunk names
//! and sealed (encrypted and authenticated) chunk and manifest bodies.
//!
//! One random 32-byte master key (unwrapped from a key file with a
//! passphrase, see `store::keys`) yields three independent keys through
//! blake3's key derivation: one for chunk names (blake3 in keyed mode, so a
//! name tells nothing to whoever lacks the key), one for chunk bodies and
//! one for manifests (AES-256-GCM, a random 96-bit nonce per message; ring's
//! implementation, six times faster here than RustCrypto's, which kept an
//! encrypted restore at half the speed of a plain one).
//! What each seal is bound to (its associated data) makes a body valid only
//! under its own name: a chunk under its chunk name, a manifest under its
//! `DISK@ID`. `docs/FORMAT.md` has the whole scheme and its threat model.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::error::{Error, Result};
use crate::model::chunk_id::ChunkId;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a seal adds to a body: the nonce before it, the tag after it.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

const CONTEXT_CHUNK_NAMES: &str = "strata 2026-12-02 chunk names";
const CONTEXT_CHUNKS: &str = "strata 2026-12-02 chunk bodies";
const CONTEXT_MANIFESTS: &str = "strata 2026-12-02 manifests";

/// The keys derived from a repository's master key.
pub struct Keys {
    names: [u8; 32],
    chunks: LessSafeKey,
    manifests: LessSafeKey,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// Fill `buf` from the operating system's random source.
pub fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| Error::invalid(format!("no random numbers: {e}")))
}

impl Keys {
    pub fn from_master(master: &[u8; 32]) -> Self {
        let derive = |context| blake3::derive_key(context, master);
        Keys {
            names: derive(CONTEXT_CHUNK_NAMES),
            chunks: aes_key(&derive(CONTEXT_CHUNKS)),
            manifests: aes_key(&derive(CONTEXT_MANIFESTS)),
        }
    }

    /// The keyed name of a chunk holding `data`.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.names, data).as_bytes())
    }

    /// Seal `buf[NONCE_LEN..len - TAG_LEN]` in place: a fresh nonce goes in
    /// front, the tag at the end. The chunk's name is bound to it.
    pub fn seal_chunk(&self, id: &ChunkId, buf: &mut [u8]) -> Result<()> {
        seal(&self.chunks, &id.0, buf)
    }

    /// Open what [`seal_chunk`](Self::seal_chunk) made; returns the range of
    /// the plaintext inside `buf`.
    pub fn open_chunk(&self, id: &ChunkId, buf: &mut [u8]) -> Result<std::ops::Range<usize>> {
        open(&self.chunks, &id.0, buf)
    }

    pub fn seal_manifest(&self, what: &str, body: &[u8]) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; NONCE_LEN + body.len() + TAG_LEN];
        buf[NONCE_LEN..NONCE_LEN + body.len()].copy_from_slice(body);
        seal(&self.manifests, manifest_aad(what).as_bytes(), &mut buf)?;
        Ok(buf)
    }

    pub fn open_manifest(&self, what: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        let mut buf = sealed.to_vec();
        let range = open(&self.manifests, manifest_aad(what).as_bytes(), &mut buf)?;
        Ok(buf[range].to_vec())
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn manifest_aad(what: &str) -> String {
    format!("strata manifest {what}")
}

/// An AES-256-GCM key.
pub fn aes_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32 bytes is an AES-256 key"))
}

/// Seal `buf[NONCE_LEN..len - TAG_LEN]` in place under a fresh random
/// nonce, written in front; the tag goes at the end.
pub fn seal(key: &LessSafeKey, aad: &[u8], buf: &mut [u8]) -> Result<()> {
    let len = buf.len();
    if len < SEAL_OVERHEAD {
        return Err(Error::invalid("nothing to seal"));
    }
    let mut nonce = [0u8; NONCE_LEN];
    random(&mut nonce)?;
    buf[..NONCE_LEN].copy_from_slice(&nonce);
    let (body, tag_out) = buf[NONCE_LEN..].split_at_mut(len - SEAL_OVERHEAD);
    // Each nonce is drawn at random once: see FORMAT.md for the bound.
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
        .map_err(|_| Error::invalid("encryption failed"))?;
    tag_out.copy_from_slice(tag.as_ref());
    Ok(())
}

/// Open what [`seal`] made; returns where the plaintext is in `buf`.
pub fn open(key: &LessSafeKey, aad: &[u8], buf: &mut [u8]) -> Result<std::ops::Range<usize>> {
    let len = buf.len();
    if len < SEAL_OVERHEAD {
        return Err(Error::invalid("sealed body too short"));
    }
    let nonce: [u8; NONCE_LEN] = buf[..NONCE_LEN].try_into().expect("NONCE_LEN bytes");
    key.open_in_place(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf[NONCE_LEN..],
    )
    .map_err(|_| Error::invalid("authentication failed (altered, truncated or misplaced)"))?;
    Ok(NONCE_LEN..len - TAG_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_bind_their_name() {
        let keys = Keys::from_master(&[7; 32]);
        let other = Keys::from_master(&[8; 32]);
        let data = b"disk contents".repeat(100);
        let id = keys.chunk_id(&data);
        assert_ne!(id, ChunkId::of(&data), "names are keyed");
        assert_ne!(id, other.chunk_id(&data));
        let mut buf = vec![0u8; data.len() + SEAL_OVERHEAD];
        buf[NONCE_LEN..NONCE_LEN + data.len()].copy_from_slice(&data);
        keys.seal_chunk(&id, &mut buf).unwrap();
        assert!(!buf.windows(13).any(|w| w == b"disk contents"));
        let sealed = buf.clone();
        let range = keys.open_chunk(&id, &mut buf).unwrap();
        assert_eq!(&buf[range], &data[..]);
        // Another name, another key, a flipped bit: all refused.
        let wrong = keys.chunk_id(b"other");
        assert!(keys.open_chunk(&wrong, &mut sealed.clone()).is_err());
        assert!(other.open_chunk(&id, &mut sealed.clone()).is_err());
        let mut flipped = sealed.clone();
        flipped[20] ^= 1;
        assert!(keys.open_chunk(&id, &mut flipped).is_err());
        // Manifests are bound to what they describe.
        let m = keys.seal_manifest("vm/a@1", b"{}").unwrap();
        assert_eq!(keys.open_manifest("vm/a@1", &m).unwrap(), b"{}");
        assert!(keys.open_manifest("vm/a@2", &m).is_err());
    }
}
