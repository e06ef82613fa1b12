//! What the data is: names, extents, image maps, snapshot descriptions.
//! Pure values and their encodings; no I/O.

pub mod chunk_id;
pub mod compact_map;
pub mod extent;
pub mod image_map;
pub mod name;
pub mod snapshot;
pub mod written;
