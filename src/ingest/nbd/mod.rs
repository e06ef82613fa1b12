//! The NBD protocol (fixed newstyle), as much of it as strata needs: a
//! client that pulls a disk and its dirty bitmap from QEMU, and a server
//! that QEMU's `blockdev-backup` pushes into. Written against the protocol
//! document (NetworkBlockDevice/nbd doc/proto.md) and proven against
//! qemu-nbd, qemu-storage-daemon, nbdinfo and qemu-img.

mod cells;
pub mod client;
pub mod server;
pub mod wire;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// Where an NBD export is: `nbd://host[:port]/export` or
/// `nbd+unix:///export?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    pub export: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

pub const DEFAULT_PORT: u16 = 10809;

impl NbdUri {
    pub fn is_nbd(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://")
    }

    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid(format!("invalid NBD URI {s:?}: {why}"));
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("missing ?socket=PATH"))?;
            if !path.is_empty() && !path.starts_with('/') {
                return Err(bad(
                    "a unix URI has no host: nbd+unix:///EXPORT?socket=PATH",
                ));
            }
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("missing socket=PATH"))?;
            return Ok(NbdUri {
                endpoint: Endpoint::Unix(PathBuf::from(socket)),
                export: path.trim_start_matches('/').to_string(),
            });
        }
        let rest = s
            .strip_prefix("nbd://")
            .ok_or_else(|| bad("expected nbd:// or nbd+unix://"))?;
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| bad("bad port"))?),
            None => (authority, DEFAULT_PORT),
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok(NbdUri {
            endpoint: Endpoint::Tcp {
                host: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port,
            },
            export: export.split('?').next().unwrap_or("").to_string(),
        })
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Endpoint::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

/// A connected byte stream, TCP or unix.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn connect(ep: &Endpoint) -> std::io::Result<Self> {
        Ok(match ep {
            Endpoint::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Endpoint::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = NbdUri::parse("nbd+unix:///disk0?socket=/run/x.sock").unwrap();
        assert_eq!(u.endpoint, Endpoint::Unix("/run/x.sock".into()));
        assert_eq!(u.export, "disk0");
        let u = NbdUri::parse("nbd+unix:///?socket=/s").unwrap();
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://127.0.0.1:10810/exp").unwrap();
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "exp");
        let u = NbdUri::parse("nbd://localhost").unwrap();
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "localhost".into(),
                port: 10809
            }
        );
        for bad in [
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://",
            "nbd://h:x/",
            "http://x",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
    }
}
