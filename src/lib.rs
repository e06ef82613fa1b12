//! strata: full and incremental backups of virtual-machine disks, read back
//! as plain raw images. See `docs/ARCHITECTURE.md` for the map of the code.

pub mod backup;
pub mod catalog;
pub mod changes;
pub mod chunk;
pub mod error;
pub mod extent;
pub mod forget;
pub mod fusefs;
pub mod gc;
pub mod image;
pub mod image_map;
pub mod lock;
pub mod manifest;
pub mod mount;
pub mod name;
pub mod nbd;
pub mod progress;
pub mod prune;
pub mod repair;
pub mod repo;
pub mod restore;
pub mod snapshot;
pub mod source;
pub mod testhook;
pub mod verify;

pub use error::{Error, Result};
