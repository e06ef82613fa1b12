//! systemd's readiness notification (sd_notify), for `Type=notify` units:
//! one datagram `READY=1` to the unix socket named by `$NOTIFY_SOCKET`
//! (a leading `@` names the abstract namespace). A few lines, so no crate.

use std::os::unix::net::UnixDatagram;
use std::path::Path;

use anyhow::{Context, Result};

/// Tell systemd the service is ready, if it asked (`$NOTIFY_SOCKET` set).
pub fn ready() -> Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => send(&socket, "READY=1"),
        None => Ok(()),
    }
}

fn send(socket: &std::ffi::OsStr, message: &str) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound().context("create the notify socket")?;
    let bytes = socket.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)
                .context("abstract NOTIFY_SOCKET name")?;
            sock.send_to_addr(message.as_bytes(), &addr)
        }
        None => sock.send_to(message.as_bytes(), Path::new(socket)),
    };
    sent.with_context(|| format!("notify systemd through {}", socket.to_string_lossy()))?;
    Ok(())
}
