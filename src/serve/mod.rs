//! How snapshots are read back: restore to a file or device, and the FUSE
//! mount.

pub mod fusefs;
pub mod mount;
pub mod restore;
