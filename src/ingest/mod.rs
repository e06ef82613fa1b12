//! How bytes come in: sources, change lists, the backup pipeline, and NBD
//! (pull from QEMU as a client, push from QEMU into `receive`).

pub mod backup;
pub mod changes;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod nbd;
pub mod source;
