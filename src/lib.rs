//! strata: full and incremental backups of virtual-machine disks, read back
//! as plain raw images. See `docs/ARCHITECTURE.md` for the map of the code.
//!
//! The modules are layers; each may use those listed before it:
//! `model` (what the data is), `store` (where bytes are kept), `ingest`
//! (how they come in), `serve` (how they are read back), `care` (how the
//! repository is looked after).

pub mod error;
pub mod progress;
pub mod testhook;

pub mod model;
pub mod store;

pub mod ingest;
pub mod serve;

pub mod care;

pub use error::{Error, Result};
