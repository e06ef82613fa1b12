//! Where bytes are kept: chunk files, the catalog, manifests, the
//! repository that ties them together, leases, and reading an image back
//! from its map.

pub mod backend;
pub mod catalog;
pub mod catalog_sync;
#[cfg(test)]
mod chain_tests;
pub mod chunks;
pub mod crypto;
pub mod durable;
pub mod image;
pub mod keys;
pub mod lease;
pub mod lock;
pub mod manifest;
pub mod partial;
pub mod pins;
pub mod repo;
