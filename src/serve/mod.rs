//! How snapshots are read back: restore to a file or device, and the FUSE
//! mount.

pub mod fusefs;
pub mod mount;
pub mod restore;

use crate::error::{Error, Result};
use crate::model::compact_map::CompactMap;
use crate::model::snapshot::SnapshotInfo;
use crate::store::repo::Repository;

/// The image map of `info` in the form readers keep: built from the
/// catalog's layers as they are overlaid, so that the resolved
/// [`ImageMap`](crate::model::image_map::ImageMap) never exists beside it.
pub(crate) fn compact_image_map(repo: &Repository, info: &SnapshotInfo) -> Result<CompactMap> {
    let (base, tops) = repo
        .catalog()
        .image_layers(&info.disk, &info.id)?
        .ok_or_else(|| Error::SnapshotNotFound(info.reference()))?;
    Ok(CompactMap::overlay_all(&base, &tops))
}
