//! NBD client: handshake (NBD_OPT_GO, falling back to EXPORT_NAME),
//! structured replies, meta contexts, BLOCK_STATUS over the whole disk, and
//! pipelined READs; and [`NbdSource`], a backup [`Source`] over it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Mutex;

use super::wire::*;
use super::{NbdUri, Stream};
use crate::error::{Error, Result};
use crate::ingest::changes::ChangeList;
use crate::ingest::source::Source;
use crate::model::extent::{coalesce, ByteRange, Extent, ExtentKind};

pub const BASE_ALLOCATION: &str = "base:allocation";

pub fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

pub struct Client {
    stream: Stream,
    uri: String,
    size: u64,
    flags: u16,
    structured: bool,
    /// Negotiated meta contexts by name.
    contexts: HashMap<String, u32>,
    max_request: u32,
    cookie: u64,
}

fn io(uri: &str, what: &str) -> impl Fn(std::io::Error) -> Error {
    let (uri, what) = (uri.to_string(), what.to_string());
    move |e| {
        let gone = matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
        );
        Error::Nbd(if gone {
            format!("{uri}: the server closed the connection during {what}")
        } else {
            format!("{uri}: {what}: {e}")
        })
    }
}

impl Client {
    /// Connect, negotiate the export and as many of `contexts` as the
    /// server has.
    pub fn connect(uri: &NbdUri, contexts: &[String]) -> Result<Self> {
        let name = uri.to_string();
        let stream = Stream::connect(&uri.endpoint)
            .map_err(|e| Error::Nbd(format!("{name}: cannot connect: {e}")))?;
        let mut c = Client {
            stream,
            uri: name,
            size: 0,
            flags: 0,
            structured: false,
            contexts: HashMap::new(),
            max_request: MAX_PAYLOAD,
            cookie: 0,
        };
        c.handshake(&uri.export, contexts)?;
        Ok(c)
    }

    fn err(&self, msg: String) -> Error {
        Error::Nbd(format!("{}: {msg}", self.uri))
    }

    fn handshake(&mut self, export: &str, contexts: &[String]) -> Result<()> {
        let uri = self.uri.clone();
        let s = &mut self.stream;
        let magic = u64_be(s).map_err(io(&uri, "handshake"))?;
        let opt = u64_be(s).map_err(io(&uri, "handshake"))?;
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(self.err("not an NBD newstyle server".into()));
        }
        let flags = u16_be(s).map_err(io(&uri, "handshake"))?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.err("server does not speak fixed newstyle".into()));
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE)
            | if no_zeroes {
                u32::from(FLAG_NO_ZEROES)
            } else {
                0
            };
        s.write_all(&client_flags.to_be_bytes())
            .map_err(io(&uri, "handshake"))?;

        let (kind, _) = self.option(OPT_STRUCTURED_REPLY, &[])?;
        self.structured = kind == REP_ACK;
        if self.structured && !contexts.is_empty() {
            let mut data = Vec::new();
            put_str(&mut data, export);
            data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for c in contexts {
                put_str(&mut data, c);
            }
            write_option(&mut self.stream, OPT_SET_META_CONTEXT, &data)
                .map_err(io(&uri, "SET_META_CONTEXT"))?;
            loop {
                let (kind, payload) = self.option_reply(OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_META_CONTEXT if payload.len() >= 4 => {
                        let id = u32::from_be_bytes(payload[..4].try_into().expect("4"));
                        let name = String::from_utf8_lossy(&payload[4..]).to_string();
                        self.contexts.insert(name, id);
                    }
                    REP_ACK => break,
                    k if k & (1 << 31) != 0 => {
                        return Err(self.err(format!("SET_META_CONTEXT refused (reply {k:#x})")))
                    }
                    _ => return Err(self.err("malformed SET_META_CONTEXT reply".into())),
                }
            }
        }

        let mut data = Vec::new();
        put_str(&mut data, export);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        write_option(&mut self.stream, OPT_GO, &data).map_err(io(&uri, "OPT_GO"))?;
        let mut got_size = false;
        loop {
            let (kind, payload) = self.option_reply(OPT_GO)?;
            match kind {
                REP_INFO if payload.len() >= 2 => {
                    let info = u16::from_be_bytes(payload[..2].try_into().expect("2"));
                    if info == INFO_EXPORT && payload.len() >= 12 {
                        self.size = u64::from_be_bytes(payload[2..10].try_into().expect("8"));
                        self.flags = u16::from_be_bytes(payload[10..12].try_into().expect("2"));
                        got_size = true;
                    } else if info == INFO_BLOCK_SIZE && payload.len() >= 14 {
                        let max = u32::from_be_bytes(payload[10..14].try_into().expect("4"));
                        self.max_request = max.clamp(4096, MAX_PAYLOAD);
                    }
                }
                REP_ACK if got_size => return Ok(()),
                REP_ERR_UNSUP => return self.export_name(export, no_zeroes),
                k if k & (1 << 31) != 0 => {
                    let msg = String::from_utf8_lossy(&payload).to_string();
                    return Err(
                        self.err(format!("export {export:?} refused: {msg} (reply {k:#x})"))
                    );
                }
                _ => return Err(self.err("malformed OPT_GO reply".into())),
            }
        }
    }

    /// The old way to pick an export, for servers without NBD_OPT_GO.
    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<()> {
        let uri = self.uri.clone();
        write_option(&mut self.stream, OPT_EXPORT_NAME, export.as_bytes())
            .map_err(io(&uri, "EXPORT_NAME"))?;
        self.size = u64_be(&mut self.stream).map_err(io(&uri, "EXPORT_NAME"))?;
        self.flags = u16_be(&mut self.stream).map_err(io(&uri, "EXPORT_NAME"))?;
        if !no_zeroes {
            let mut pad = [0u8; 124];
            self.stream
                .read_exact(&mut pad)
                .map_err(io(&uri, "EXPORT_NAME"))?;
        }
        Ok(())
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Result<(u32, Vec<u8>)> {
        let uri = self.uri.clone();
        write_option(&mut self.stream, opt, data).map_err(io(&uri, "option"))?;
        self.option_reply(opt)
    }

    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        let uri = self.uri.clone();
        let s = &mut self.stream;
        let magic = u64_be(s).map_err(io(&uri, "option reply"))?;
        let got = u32_be(s).map_err(io(&uri, "option reply"))?;
        let kind = u32_be(s).map_err(io(&uri, "option reply"))?;
        let len = u32_be(s).map_err(io(&uri, "option reply"))?;
        if magic != OPT_REPLY_MAGIC || got != opt || len > MAX_OPTION {
            return Err(self.err("malformed option reply".into()));
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload)
            .map_err(io(&uri, "option reply"))?;
        Ok((kind, payload))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The server says several connections see the same data
    /// (NBD_FLAG_CAN_MULTI_CONN); without it, extra connections may even
    /// block (qemu-nbd serves one client unless started with -e N).
    pub fn multi_conn(&self) -> bool {
        self.flags & TFLAG_CAN_MULTI_CONN != 0
    }

    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.contains_key(name)
    }

    /// Read several ranges with all requests in flight at once. Each buffer
    /// is filled from its offset; pieces larger than the server's maximum
    /// are split.
    pub fn read_many(&mut self, reads: &mut [(u64, &mut [u8])]) -> Result<()> {
        let uri = self.uri.clone();
        let max = self.max_request as usize;
        // (cookie) -> (index of buffer, start within it, length)
        let mut pending: HashMap<u64, (usize, usize, usize)> = HashMap::new();
        let mut out = Vec::new();
        for (i, (offset, buf)) in reads.iter().enumerate() {
            for start in (0..buf.len()).step_by(max) {
                let len = max.min(buf.len() - start);
                self.cookie += 1;
                Request {
                    flags: 0,
                    kind: CMD_READ,
                    cookie: self.cookie,
                    offset: offset + start as u64,
                    length: len as u32,
                }
                .write_to(&mut out)
                .expect("write to Vec");
                pending.insert(self.cookie, (i, start, len));
            }
        }
        self.stream.write_all(&out).map_err(io(&uri, "READ"))?;
        while !pending.is_empty() {
            let s = &mut self.stream;
            let magic = u32_be(s).map_err(io(&uri, "READ"))?;
            if magic == SIMPLE_REPLY_MAGIC {
                let error = u32_be(s).map_err(io(&uri, "READ"))?;
                let cookie = u64_be(s).map_err(io(&uri, "READ"))?;
                let (i, start, len) = pending
                    .remove(&cookie)
                    .ok_or_else(|| self.err(format!("reply to unknown request {cookie}")))?;
                if error != 0 {
                    return Err(self.err(format!(
                        "READ of {len} bytes at offset {} failed: the server answered error {}",
                        reads[i].0 + start as u64,
                        error_name(error)
                    )));
                }
                self.stream
                    .read_exact(&mut reads[i].1[start..start + len])
                    .map_err(io(&uri, "READ"))?;
            } else if magic == STRUCTURED_REPLY_MAGIC {
                let flags = u16_be(s).map_err(io(&uri, "READ"))?;
                let kind = u16_be(s).map_err(io(&uri, "READ"))?;
                let cookie = u64_be(s).map_err(io(&uri, "READ"))?;
                let length = u32_be(s).map_err(io(&uri, "READ"))? as usize;
                let Some(&(i, start, len)) = pending.get(&cookie) else {
                    return Err(Error::Nbd(format!(
                        "{uri}: reply to unknown request {cookie}"
                    )));
                };
                let req_offset = reads[i].0 + start as u64;
                match kind {
                    REPLY_TYPE_OFFSET_DATA if length >= 8 => {
                        let off = u64_be(s).map_err(io(&uri, "READ"))?;
                        let n = length - 8;
                        let at = off
                            .checked_sub(req_offset)
                            .map(|d| d as usize)
                            .filter(|&d| d + n <= len)
                            .ok_or_else(|| self.err("READ reply outside the request".into()))?;
                        let buf = &mut reads[i].1[start + at..start + at + n];
                        self.stream.read_exact(buf).map_err(io(&uri, "READ"))?;
                    }
                    REPLY_TYPE_OFFSET_HOLE if length == 12 => {
                        let off = u64_be(s).map_err(io(&uri, "READ"))?;
                        let n = u32_be(s).map_err(io(&uri, "READ"))? as usize;
                        let at = off
                            .checked_sub(req_offset)
                            .map(|d| d as usize)
                            .filter(|&d| d + n <= len)
                            .ok_or_else(|| self.err("READ hole outside the request".into()))?;
                        reads[i].1[start + at..start + at + n].fill(0);
                    }
                    REPLY_TYPE_NONE if length == 0 => {}
                    k if k & (1 << 15) != 0 => {
                        let mut payload = vec![0u8; length.min(MAX_OPTION as usize)];
                        s.read_exact(&mut payload).map_err(io(&uri, "READ"))?;
                        return Err(self.err(format!(
                            "READ of {len} bytes at offset {req_offset} failed: {}",
                            error_text(&payload)
                        )));
                    }
                    _ => return Err(self.err(format!("unexpected reply type {kind} to READ"))),
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    pending.remove(&cookie);
                }
            } else {
                return Err(self.err(format!("bad reply magic {magic:#x}")));
            }
        }
        Ok(())
    }

    /// The extents a meta context reports over the whole disk, as
    /// `(range, flags)`, asking again until the end is covered.
    pub fn block_status(&mut self, context: &str) -> Result<Vec<(ByteRange, u32)>> {
        let uri = self.uri.clone();
        let id = *self
            .contexts
            .get(context)
            .ok_or_else(|| self.err(format!("meta context {context} not negotiated")))?;
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let len = (self.size - pos).min(1 << 30) as u32;
            self.cookie += 1;
            let cookie = self.cookie;
            Request {
                flags: 0,
                kind: CMD_BLOCK_STATUS,
                cookie,
                offset: pos,
                length: len,
            }
            .write_to(&mut self.stream)
            .map_err(io(&uri, "BLOCK_STATUS"))?;
            let mut advanced = 0u64;
            loop {
                let s = &mut self.stream;
                let magic = u32_be(s).map_err(io(&uri, "BLOCK_STATUS"))?;
                if magic == SIMPLE_REPLY_MAGIC {
                    let error = u32_be(s).map_err(io(&uri, "BLOCK_STATUS"))?;
                    u64_be(s).map_err(io(&uri, "BLOCK_STATUS"))?;
                    return Err(self.err(format!(
                        "BLOCK_STATUS failed: the server answered error {}",
                        error_name(error)
                    )));
                }
                if magic != STRUCTURED_REPLY_MAGIC {
                    return Err(self.err(format!("bad reply magic {magic:#x}")));
                }
                let flags = u16_be(s).map_err(io(&uri, "BLOCK_STATUS"))?;
                let kind = u16_be(s).map_err(io(&uri, "BLOCK_STATUS"))?;
                let got = u64_be(s).map_err(io(&uri, "BLOCK_STATUS"))?;
                let length = u32_be(s).map_err(io(&uri, "BLOCK_STATUS"))? as usize;
                if got != cookie || length > 64 << 20 {
                    return Err(self.err("malformed BLOCK_STATUS reply".into()));
                }
                let mut payload = vec![0u8; length];
                s.read_exact(&mut payload)
                    .map_err(io(&uri, "BLOCK_STATUS"))?;
                if kind == REPLY_TYPE_BLOCK_STATUS && length >= 4 {
                    let ctx = u32::from_be_bytes(payload[..4].try_into().expect("4"));
                    if ctx == id {
                        for d in payload[4..].chunks_exact(8) {
                            let l = u32::from_be_bytes(d[..4].try_into().expect("4")) as u64;
                            let f = u32::from_be_bytes(d[4..].try_into().expect("4"));
                            let start = pos + advanced;
                            let l = l.min(self.size - start);
                            if l > 0 {
                                out.push((ByteRange::new(start, l), f));
                                advanced += l;
                            }
                        }
                    }
                } else if kind & (1 << 15) != 0 {
                    return Err(self.err(format!("BLOCK_STATUS failed: {}", error_text(&payload))));
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    break;
                }
            }
            if advanced == 0 {
                return Err(self.err(format!("BLOCK_STATUS made no progress at {pos}")));
            }
            pos += advanced;
        }
        Ok(out)
    }

    pub fn disconnect(mut self) {
        self.cookie += 1;
        let _ = Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: self.cookie,
            offset: 0,
            length: 0,
        }
        .write_to(&mut self.stream);
    }
}

fn error_text(payload: &[u8]) -> String {
    if payload.len() >= 6 {
        let code = u32::from_be_bytes(payload[..4].try_into().expect("4"));
        let n = (u16::from_be_bytes(payload[4..6].try_into().expect("2")) as usize)
            .min(payload.len() - 6);
        let message = String::from_utf8_lossy(&payload[6..6 + n]);
        match message.trim() {
            "" => format!("the server answered error {}", error_name(code)),
            m => format!("the server answered error {}: {m}", error_name(code)),
        }
    } else {
        "error".to_string()
    }
}

/// A disk pulled over NBD, for `strata backup nbd://…`.
pub struct NbdSource {
    uri: String,
    /// The first connection negotiated the meta contexts; more are opened
    /// for parallel reads when the server allows it.
    clients: Vec<Mutex<Client>>,
    next: std::sync::atomic::AtomicUsize,
    size: u64,
}

/// A single read is split into this many requests, all in flight at once...
const PIPELINE: usize = 4;
/// ...but none smaller than this: qemu-nbd's cost is per request, and 64 KiB
/// requests halve its throughput against 256 KiB ones.
const MIN_REQUEST: usize = 256 << 10;
/// Windows a backup reader asks for at once, pipelined on one connection.
const BATCH: usize = 4;
/// Connections for reading, when the server allows several.
const CONNECTIONS: usize = 3;

impl NbdSource {
    /// Connect asking for `base:allocation` and, if given, the bitmap.
    pub fn connect(uri: &NbdUri, bitmap: Option<&str>) -> Result<Self> {
        let mut contexts = vec![BASE_ALLOCATION.to_string()];
        if let Some(b) = bitmap {
            contexts.push(bitmap_context(b));
        }
        let first = Client::connect(uri, &contexts)?;
        let size = first.size();
        let multi = first.multi_conn();
        let mut clients = vec![Mutex::new(first)];
        if multi {
            for _ in 1..CONNECTIONS {
                match Client::connect(uri, &[]) {
                    Ok(c) if c.size() == size => clients.push(Mutex::new(c)),
                    Ok(_) => {
                        return Err(Error::Nbd(format!(
                            "{uri}: export size changed between connections"
                        )))
                    }
                    Err(e) => {
                        log::info!("extra NBD connection refused: {e}");
                        break;
                    }
                }
            }
        }
        Ok(NbdSource {
            uri: uri.to_string(),
            size,
            clients,
            next: Default::default(),
        })
    }

    fn client(&self) -> std::sync::MutexGuard<'_, Client> {
        self.clients[0].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn has_bitmap(&self, name: &str) -> bool {
        self.client().has_context(&bitmap_context(name))
    }

    /// The ranges the bitmap marks dirty, as a change list.
    pub fn dirty(&self, bitmap: &str) -> Result<ChangeList> {
        let ctx = bitmap_context(bitmap);
        if !self.has_bitmap(bitmap) {
            return Err(Error::Nbd(format!(
                "{}: the server does not export the dirty bitmap {bitmap:?} (qemu-nbd -B {bitmap}, or nbd-server-add with \"bitmap\")",
                self.uri
            )));
        }
        let extents = self
            .client()
            .block_status(&ctx)?
            .into_iter()
            .filter(|(_, f)| f & 1 != 0)
            .map(|(r, _)| Extent::new(r, ExtentKind::Data));
        Ok(ChangeList {
            origin: format!("bitmap {bitmap} of {}", self.uri),
            size: Some(self.size),
            extents: coalesce(extents),
        })
    }

    pub fn disconnect(self) {
        for c in self.clients {
            c.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .disconnect();
        }
    }
}

impl Source for NbdSource {
    fn describe(&self) -> String {
        self.uri.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset + buf.len() as u64 > self.size {
            return Err(Error::Nbd(format!(
                "{}: read past the end of the export",
                self.uri
            )));
        }
        let piece = buf.len().div_ceil(PIPELINE).max(MIN_REQUEST);
        let mut reads: Vec<(u64, &mut [u8])> = buf
            .chunks_mut(piece)
            .enumerate()
            .map(|(i, b)| (offset + (i * piece) as u64, b))
            .collect();
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.clients.len();
        self.clients[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_many(&mut reads)
    }

    fn parallel_reads(&self) -> usize {
        self.clients.len().max(2)
    }

    fn read_batch(&self) -> usize {
        BATCH
    }

    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<()> {
        if let Some((offset, buf)) = reads.iter().find(|(o, b)| o + b.len() as u64 > self.size) {
            return Err(Error::Nbd(format!(
                "{}: read of {} bytes at {offset} past the end of the export",
                self.uri,
                buf.len()
            )));
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.clients.len();
        self.clients[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_many(reads)
    }

    /// From `base:allocation`: known zeroes are `zero`, holes that read as
    /// zeroes are skipped, and everything else (including a hole without
    /// the zero bit: undefined contents) is read.
    fn allocation(&self) -> Result<Vec<Extent>> {
        let mut client = self.client();
        if !client.has_context(BASE_ALLOCATION) {
            return Ok(vec![Extent::new(
                ByteRange::new(0, self.size),
                ExtentKind::Data,
            )]);
        }
        let extents = client
            .block_status(BASE_ALLOCATION)?
            .into_iter()
            .filter_map(|(r, f)| match f & 3 {
                3 => None,
                2 => Some(Extent::new(r, ExtentKind::Zero)),
                _ => Some(Extent::new(r, ExtentKind::Data)),
            });
        Ok(coalesce(extents))
    }
}
