//! NBD against real peers: pull from qemu-nbd and qemu-storage-daemon, push
//! from qemu-storage-daemon's blockdev-backup (driven over QMP) into
//! `strata receive`, interop with nbdinfo and qemu-img, hostile clients.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{sh, Env, Qcow};
use serde_json::{json, Value};

/// A qemu-storage-daemon with one qcow2 disk (`disk0`), exported writable
/// over NBD for test I/O, and a QMP monitor.
struct Qsd {
    dir: PathBuf,
    pid: i32,
    qmp: BufReader<UnixStream>,
    /// Events that arrived while a command waited for its return.
    events: Vec<Value>,
}

impl Qsd {
    fn start(env: &Env, disk: &Qcow) -> Self {
        let dir = env.path("qsd");
        std::fs::create_dir_all(&dir).unwrap();
        let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
        sh(
            "qemu-storage-daemon",
            &[
                "--blockdev",
                &format!("driver=file,node-name=file0,filename={}", disk.p()),
                "--blockdev",
                "driver=qcow2,node-name=disk0,file=file0",
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", p("nbd.sock")),
                "--export",
                "type=nbd,id=rw,node-name=disk0,name=disk0,writable=on",
                "--chardev",
                &format!("socket,id=qmp,path={},server=on,wait=off", p("qmp.sock")),
                "--monitor",
                "chardev=qmp",
                "--pidfile",
                &p("qsd.pid"),
                "--daemonize",
            ],
        );
        let pid = std::fs::read_to_string(dir.join("qsd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut qmp = BufReader::new(UnixStream::connect(dir.join("qmp.sock")).unwrap());
        let mut greeting = String::new();
        qmp.read_line(&mut greeting).unwrap();
        let mut q = Qsd {
            dir,
            pid,
            qmp,
            events: Vec::new(),
        };
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    fn send(&mut self, execute: &str, arguments: Value) -> Value {
        let msg = json!({"execute": execute, "arguments": arguments});
        let s = self.qmp.get_mut();
        s.write_all(format!("{msg}\n").as_bytes()).unwrap();
        loop {
            let v = self.next();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
            self.events.push(v);
        }
    }

    /// Run a command that must succeed.
    fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        let v = self.send(execute, arguments.clone());
        assert!(v.get("error").is_none(), "{execute} {arguments}: {v}");
        v["return"].clone()
    }

    fn next(&mut self) -> Value {
        let mut line = String::new();
        assert!(self.qmp.read_line(&mut line).unwrap() > 0, "QMP closed");
        serde_json::from_str(&line).unwrap()
    }

    /// Wait for the job's BLOCK_JOB_COMPLETED (or _CANCELLED) event.
    fn wait_job(&mut self, job: &str) -> Value {
        let ends = |v: &Value| {
            let ev = v["event"].as_str().unwrap_or("");
            (ev == "BLOCK_JOB_COMPLETED" || ev == "BLOCK_JOB_CANCELLED")
                && v["data"]["device"] == job
        };
        if let Some(i) = self.events.iter().position(ends) {
            return self.events.remove(i);
        }
        loop {
            let v = self.next();
            if ends(&v) {
                return v;
            }
        }
    }

    fn io(&self, cmds: &[&str]) {
        let mut args = vec!["-f", "raw"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        let uri = self.uri("disk0");
        args.push(&uri);
        sh("qemu-io", &args);
    }

    fn truth(&self, out: &Path) -> PathBuf {
        sh(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &self.uri("disk0"),
                out.to_str().unwrap(),
            ],
        );
        out.to_path_buf()
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        // SAFETY: signalling the daemon we started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        common::wait_exit(self.pid);
    }
}

/// `strata receive` in the background, started and listening.
fn start_receive(env: &Env, args: &[&str]) -> (Child, PathBuf) {
    let sock = env.path(&format!("recv-{}.sock", args.len()));
    let listen = format!("nbd+unix:///?socket={}", sock.display());
    let mut child = env
        .cmd()
        .args(["receive", "--listen", &listen])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(&mut child);
    (child, sock)
}

/// Read receive's stdout up to its "listening on" line; return what came
/// before it (what became of a partial push).
fn wait_listening(child: &mut Child) -> String {
    let mut r = BufReader::new(child.stdout.as_mut().unwrap());
    let mut notes = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            let mut err = String::new();
            let _ = child.stderr.as_mut().unwrap().read_to_string(&mut err);
            panic!("receive did not start: {notes}{err}");
        }
        if line.starts_with("listening") {
            return notes;
        }
        notes.push_str(&line);
    }
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Pull from qemu-nbd -B (offline image): full and bitmap incremental; a
/// missing bitmap is an error unless --fallback-full.
#[test]
fn pull_from_qemu_nbd() {
    let env = Env::new();
    let disk = Qcow::create(env.path("d.qcow2"), 32 << 20);
    disk.add_bitmap("b1");
    disk.io(&["write -P 0x11 0 8M", "write -z 16M 1M"]);
    let t0 = disk.truth(&env.path("t0.raw"));
    let sock = env.path("qnbd.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let serve = || {
        sh(
            "qemu-nbd",
            &[
                "-r",
                "-f",
                "qcow2",
                "-B",
                "b1",
                "--fork",
                "--persistent",
                "--socket",
                sock.to_str().unwrap(),
                disk.p(),
            ],
        )
    };
    let stop = || common::stop_matching(&format!("qemu-nbd.*{}", sock.display()));
    serve();
    env.backup(&["--disk", "q", &uri]);
    stop();
    disk.clear_bitmap("b1");
    disk.io(&[
        "write -P 0x22 1M 64k",
        "discard 2M 1M",
        "write -z 4M 64k",
        "write -P 0x33 30M 5000",
    ]);
    let t1 = disk.truth(&env.path("t1.raw"));
    serve();
    let inc = env.backup(&["--disk", "q", &uri, "--bitmap", "b1"]);
    let err = env.fails(&["backup", "--disk", "q", &uri, "--bitmap", "nope"]);
    assert!(
        err.contains("does not export the dirty bitmap \"nope\""),
        "{err}"
    );
    let fb = env.backup(&["--disk", "q", &uri, "--bitmap", "nope", "--fallback-full"]);
    stop();
    let first = env.snapshots()[0]["ref"].as_str().unwrap().to_string();
    env.assert_restores(&first, &t0);
    env.assert_restores(&inc, &t1);
    env.assert_restores(&fb, &t1);
    assert!(env.run(&["verify"]).status.success());
    let snaps = env.snapshots();
    assert_eq!(snaps[1]["kind"], "incremental");
    assert_eq!(snaps[1]["bitmap"], "b1");
    assert_eq!(snaps[2]["kind"], "full");
    // Discarded and zero-written dirty ranges are zero extents.
    let own: Value = serde_json::from_str(&env.ok(&["map", "--own", "--json", &inc])).unwrap();
    let zeros: Vec<(u64, u64)> = own["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "zero")
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert!(
        zeros.contains(&(2 << 20, 1 << 20)) && zeros.contains(&(4 << 20, 64 << 10)),
        "{zeros:?}"
    );
    // The server gone: a clear error, nothing committed.
    let before = env.snapshots().len();
    let err = env.fails(&["backup", "--disk", "q", &uri]);
    assert!(err.contains("cannot connect"), "{err}");
    assert_eq!(env.snapshots().len(), before);
}

/// Pull from a running qemu-storage-daemon exporting a bitmap: full,
/// incremental and differential equal the disk at each moment.
#[test]
fn pull_from_running_qemu() {
    let env = Env::new();
    let disk = Qcow::create(env.path("d.qcow2"), 32 << 20);
    disk.io(&["write -P 0x44 0 4M"]);
    let mut q = Qsd::start(&env, &disk);
    q.cmd("transaction", json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "inc", "persistent": true}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "diff", "persistent": true}},
    ]}));
    let export = |q: &mut Qsd, name: &str, bitmaps: Value| {
        q.cmd("block-export-add", json!({"type": "nbd", "id": name, "node-name": "disk0", "name": name, "writable": false, "bitmaps": bitmaps}));
    };
    let t0 = q.truth(&env.path("t0.raw"));
    export(&mut q, "full", json!([]));
    let full = env.backup(&["--disk", "live", &q.uri("full")]);
    q.cmd("block-export-del", json!({"id": "full"}));

    q.io(&["write -P 0x55 8M 1M", "write -z 1M 64k", "discard 2M 128k"]);
    let t1 = q.truth(&env.path("t1.raw"));
    // An exported bitmap must be frozen: a new one takes over in the same
    // transaction (libvirt's checkpoint pattern).
    q.cmd("transaction", json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "inc2", "persistent": true}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "inc"}},
    ]}));
    export(&mut q, "e1", json!(["inc"]));
    let inc = env.backup(&["--disk", "live", &q.uri("e1"), "--bitmap", "inc"]);
    q.cmd("block-export-del", json!({"id": "e1"}));
    q.cmd(
        "block-dirty-bitmap-remove",
        json!({"node": "disk0", "name": "inc"}),
    );

    q.io(&["write -P 0x66 20M 3M"]);
    let t2 = q.truth(&env.path("t2.raw"));
    // Differential: a frozen copy of "diff", which keeps running.
    q.cmd("transaction", json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "inc3", "persistent": true}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "inc2"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "diffcopy", "disabled": true}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "disk0", "target": "diffcopy", "bitmaps": ["diff"]}},
    ]}));
    export(&mut q, "e2", json!(["inc2", "diffcopy"]));
    let inc2 = env.backup(&["--disk", "live", &q.uri("e2"), "--bitmap", "inc2"]);
    let diff = env.backup(&[
        "--disk",
        "live",
        &q.uri("e2"),
        "--bitmap",
        "diffcopy",
        "--parent",
        &full,
        "--differential",
    ]);
    q.cmd("block-export-del", json!({"id": "e2"}));

    for (snap, truth) in [(&full, &t0), (&inc, &t1), (&inc2, &t2), (&diff, &t2)] {
        env.assert_restores(snap, truth);
    }
    assert!(env.run(&["verify"]).status.success());
}

/// Push: blockdev-backup sync=full then sync=bitmap into `strata receive`,
/// with the safe QMP transactions of docs/QEMU.md. Killing receive mid-job
/// commits nothing and QEMU reports the job failed; the retry with the
/// kept bitmap succeeds.
#[test]
fn push_from_blockdev_backup() {
    let env = Env::new();
    let disk = Qcow::create(env.path("d.qcow2"), 32 << 20);
    disk.io(&["write -P 0x71 0 6M", "write -P 0x72 10M 2M"]);
    let mut q = Qsd::start(&env, &disk);
    let size = (32u64 << 20).to_string();

    let (child, sock) = start_receive(&env, &["--disk", "vm", "--size", &size]);
    q.cmd("blockdev-add", json!({"driver": "nbd", "node-name": "t0", "server": {"type": "unix", "path": sock}, "export": ""}));
    let t0 = q.truth(&env.path("t0.raw"));
    q.cmd("transaction", json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b0", "persistent": true}},
        {"type": "blockdev-backup", "data": {"device": "disk0", "target": "t0", "sync": "full", "job-id": "j0"}},
    ]}));
    let ev = q.wait_job("j0");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    q.cmd("blockdev-del", json!({"node-name": "t0"}));
    let (ok, out) = finish(child);
    assert!(ok, "{out}");
    let s0 = out.split_whitespace().nth(1).unwrap().to_string();
    env.assert_restores(&s0, &t0);

    // Incremental: new bitmap b1 takes over, b0 is frozen and backed up.
    q.io(&[
        "write -P 0x73 1M 128k",
        "write -z 10M 64k",
        "discard 11M 64k",
        "write -P 0x74 31M 1M",
    ]);
    let t1 = q.truth(&env.path("t1.raw"));
    let (child, sock) = start_receive(&env, &["--disk", "vm", "--incremental", "--bitmap", "b0"]);
    q.cmd("blockdev-add", json!({"driver": "nbd", "node-name": "t1", "server": {"type": "unix", "path": sock}, "export": ""}));
    q.cmd("transaction", json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b1", "persistent": true}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b0"}},
        {"type": "blockdev-backup", "data": {"device": "disk0", "target": "t1", "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "never", "job-id": "j1"}},
    ]}));
    let ev = q.wait_job("j1");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    q.cmd("blockdev-del", json!({"node-name": "t1"}));
    let (ok, out) = finish(child);
    assert!(ok, "{out}");
    q.cmd(
        "block-dirty-bitmap-remove",
        json!({"node": "disk0", "name": "b0"}),
    );
    let s1 = out.split_whitespace().nth(1).unwrap().to_string();
    env.assert_restores(&s1, &t1);
    assert_eq!(env.snapshots()[1]["kind"], "incremental");

    // Kill receive while a (throttled) job runs: QEMU reports failure,
    // nothing is committed, b1 is kept; the retry succeeds.
    q.io(&["write -P 0x75 0 16M"]);
    let t2 = q.truth(&env.path("t2.raw"));
    let (mut child, sock) = start_receive(&env, &["--disk", "vm", "--incremental"]);
    q.cmd("blockdev-add", json!({"driver": "nbd", "node-name": "t2", "server": {"type": "unix", "path": sock}, "export": ""}));
    q.cmd("blockdev-backup", json!({"device": "disk0", "target": "t2", "sync": "bitmap", "bitmap": "b1", "bitmap-mode": "on-success", "job-id": "j2", "speed": 1 << 20}));
    child.kill().unwrap();
    child.wait().unwrap();
    let ev = q.wait_job("j2");
    assert!(
        ev["data"].get("error").is_some() || ev["event"] == "BLOCK_JOB_CANCELLED",
        "{ev}"
    );
    let _ = q.send("blockdev-del", json!({"node-name": "t2"}));
    assert_eq!(env.snapshots().len(), 2);

    let (child, sock) = start_receive(&env, &["--disk", "vm", "--incremental"]);
    q.cmd("blockdev-add", json!({"driver": "nbd", "node-name": "t3", "server": {"type": "unix", "path": sock}, "export": ""}));
    q.cmd("blockdev-backup", json!({"device": "disk0", "target": "t3", "sync": "bitmap", "bitmap": "b1", "bitmap-mode": "on-success", "job-id": "j3"}));
    let ev = q.wait_job("j3");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    q.cmd("blockdev-del", json!({"node-name": "t3"}));
    let (ok, out) = finish(child);
    assert!(ok, "{out}");
    env.assert_restores("vm@latest", &t2);
    assert!(env.run(&["verify"]).status.success());
    // The killed receive's staging file is a leftover for gc.
    env.ok(&["gc"]);
    assert!(
        env.path("repo")
            .join("tmp")
            .read_dir()
            .unwrap()
            .next()
            .is_none(),
        "staging files left"
    );
}

/// nbdinfo and qemu-img against receive; garbage, oversized and
/// out-of-range requests get errors and the server keeps serving.
#[test]
fn receive_survives_bad_clients() {
    use strata::ingest::nbd::wire::*;
    let env = Env::new();
    let size: u64 = 8 << 20;
    let (child, sock) = start_receive(&env, &["--disk", "r", "--size", &size.to_string()]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());

    let info = sh("nbdinfo", &["--json", &uri]);
    assert!(info.contains(&format!("\"export-size\": {size}")), "{info}");

    // Garbage instead of a handshake.
    let mut g = UnixStream::connect(&sock).unwrap();
    let mut hello = [0u8; 18];
    g.read_exact(&mut hello).unwrap();
    g.write_all(b"this is not NBD at all, sorry").unwrap();
    let mut rest = Vec::new();
    let _ = g.read_to_end(&mut rest); // the server hangs up
    drop(g);

    // A well-formed client with bad requests.
    let mut c = UnixStream::connect(&sock).unwrap();
    assert_eq!(raw_handshake(&mut c), size);
    for (cookie, kind, offset, length, payload, want) in [
        (1, CMD_READ, size, 4096u32, 0usize, EINVAL),
        (2, CMD_READ, 0, 64 << 20, 0, EINVAL),
        (3, CMD_WRITE, size - 10, 4096, 4096, ENOSPC),
        (4, CMD_TRIM, u64::MAX - 5, 100, 0, ENOSPC),
        (5, 99, 0, 0, 0, EINVAL),
        (6, CMD_READ, 4096, 4096, 0, 0),
    ] {
        let (err, got) = raw_request(
            &mut c,
            req(kind, cookie, offset, length),
            &vec![0xabu8; payload],
        );
        assert_eq!((err, got), (want, cookie), "request {cookie}");
        if kind == CMD_READ && err == 0 {
            let mut data = vec![1u8; length as usize];
            c.read_exact(&mut data).unwrap();
            assert!(data.iter().all(|&b| b == 0));
        }
    }
    req(CMD_DISC, 7, 0, 0).write_to(&mut c).unwrap();
    drop(c);
    assert!(
        env.snapshots().is_empty(),
        "nothing written, nothing committed"
    );

    // Still serving: a real writer is committed.
    let src = env.path("src.raw");
    std::fs::write(&src, common::random_bytes(5, size as usize)).unwrap();
    let client = common::qemu_img_write(&src, &uri);
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    let (ok, out) = finish(child);
    assert!(ok, "{out}");
    env.assert_restores("r@latest", &src);

    // A writer that drops its connection commits nothing; exit 1.
    let (child, sock) = start_receive(&env, &["--disk", "r", "--size", &size.to_string()]);
    let mut c = UnixStream::connect(&sock).unwrap();
    raw_handshake(&mut c);
    assert_eq!(
        raw_request(&mut c, req(CMD_WRITE, 1, 0, 4096), &[7u8; 4096]).0,
        0
    );
    drop(c);
    let (ok, out) = finish(child);
    assert!(!ok && out.contains("nothing committed"), "{out}");
    assert_eq!(env.snapshots().len(), 1);
}

/// A raw NBD writer that keeps the truth of what it wrote.
struct Writer {
    c: UnixStream,
    cookie: u64,
    truth: Vec<u8>,
}

impl Writer {
    fn send(&mut self, kind: u16, offset: u64, length: u32, payload: &[u8]) {
        self.cookie += 1;
        let got = raw_request(&mut self.c, req(kind, self.cookie, offset, length), payload);
        assert_eq!(got, (0, self.cookie), "request {kind} at {offset}");
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        use strata::ingest::nbd::wire::CMD_WRITE;
        self.send(CMD_WRITE, offset, data.len() as u32, data);
        self.truth[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    fn zero(&mut self, kind: u16, offset: u64, length: u64) {
        self.send(kind, offset, length as u32, &[]);
        self.truth[offset as usize..(offset + length) as usize].fill(0);
    }

    fn check_read(&mut self, offset: u64, length: usize) {
        use strata::ingest::nbd::wire::CMD_READ;
        self.send(CMD_READ, offset, length as u32, &[]);
        let mut data = vec![0u8; length];
        self.c.read_exact(&mut data).unwrap();
        assert!(
            data == self.truth[offset as usize..offset as usize + length],
            "READ at {offset} differs from what was written"
        );
    }
}

/// receive chunks a 1 MiB cell as soon as the written map covers it. Every
/// way a cell can leave that path must still commit exactly what was
/// written: completed out of order, written again after chunking, read back
/// half written or chunked, completed by WRITE_ZEROES over older data, many
/// half-written cells, TRIM across cells, and a short last cell.
#[test]
fn receive_cells_in_every_state() {
    use strata::ingest::nbd::wire::*;
    const MIB: u64 = 1 << 20;
    let env = Env::new();
    let size = 80 * MIB + 12345;
    let (child, sock) = start_receive(&env, &["--disk", "cells", "--size", &size.to_string()]);
    let mut c = UnixStream::connect(&sock).unwrap();
    assert_eq!(raw_handshake(&mut c), size);
    let mut w = Writer {
        c,
        cookie: 0,
        truth: vec![0u8; size as usize],
    };
    let data = |seed: u64, len: u64| common::random_bytes(seed, len as usize);
    let q = MIB / 4;

    // Cell 0: completed out of order, then written again after chunking.
    for (i, piece) in [3u64, 1, 0, 2].into_iter().enumerate() {
        w.write(piece * q, &data(i as u64 + 1, q));
    }
    w.write(100_000, &data(9, 4096));
    // Cell 1: read while half written, then completed in the staging file.
    w.write(MIB, &data(10, MIB / 2));
    w.check_read(MIB + MIB / 2 - 4096, 8192);
    w.write(MIB + MIB / 2, &data(11, MIB / 2));
    // Cell 2: completed by WRITE_ZEROES, then read back once chunked.
    w.write(2 * MIB, &data(12, 3 * q));
    w.zero(CMD_WRITE_ZEROES, 2 * MIB + 3 * q, q);
    w.check_read(2 * MIB + 3 * q - 4096, 8192);
    // Cells 3..73: 70 half-written cells, more than memory holds.
    for cell in 3..73 {
        w.write(cell * MIB, &data(100 + cell, MIB / 2));
    }
    for cell in 3..73 {
        w.write(cell * MIB + MIB / 2, &data(200 + cell, MIB / 2));
    }
    // TRIM over a chunked cell and half of the next; then data beside it.
    w.zero(CMD_TRIM, 72 * MIB, MIB + MIB / 2);
    w.write(73 * MIB + MIB / 2, &data(13, MIB / 2));
    // Cell 76: data, zeroes over part of it, then the rest: the chunked
    // cell must not take the staged bytes under the zeroes.
    w.write(76 * MIB, &data(16, MIB / 2));
    w.zero(CMD_WRITE_ZEROES, 76 * MIB + 4096, 8192);
    w.write(76 * MIB + MIB / 2, &data(17, MIB / 2));
    // Unaligned pieces, and the short last cell written whole.
    w.write(75 * MIB + 1000, &data(14, 5000));
    w.write(80 * MIB, &data(15, 12345));

    req(CMD_DISC, 0, 0, 0).write_to(&mut w.c).unwrap();
    drop(w.c);
    let (ok, out) = finish(child);
    assert!(ok, "{out}");
    let truth = env.path("truth.raw");
    std::fs::write(&truth, &w.truth).unwrap();
    env.assert_restores("cells@latest", &truth);
    let verify = env.run(&["verify"]);
    assert!(verify.status.success(), "{verify:?}");
}

/// The client half of a fixed-newstyle handshake with NBD_OPT_EXPORT_NAME,
/// by hand; returns the export size.
fn raw_handshake<S: Read + Write>(c: &mut S) -> u64 {
    use strata::ingest::nbd::wire::*;
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    c.write_all(&u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .unwrap();
    write_option(c, OPT_EXPORT_NAME, b"").unwrap();
    let size = u64_be(c).unwrap();
    u16_be(c).unwrap();
    size
}

/// Send one request with `payload` after it; return the simple reply's
/// (error, cookie). READ data that follows is left to the caller.
fn raw_request<S: Read + Write>(
    c: &mut S,
    req: strata::ingest::nbd::wire::Request,
    payload: &[u8],
) -> (u32, u64) {
    use strata::ingest::nbd::wire::*;
    req.write_to(c).unwrap();
    c.write_all(payload).unwrap();
    assert_eq!(u32_be(c).unwrap(), SIMPLE_REPLY_MAGIC);
    (u32_be(c).unwrap(), u64_be(c).unwrap())
}

fn req(kind: u16, cookie: u64, offset: u64, length: u32) -> strata::ingest::nbd::wire::Request {
    strata::ingest::nbd::wire::Request {
        flags: 0,
        kind,
        cookie,
        offset,
        length,
    }
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// TCP URIs both ways, and --keep-listening after a dropped writer.
#[test]
fn tcp_and_keep_listening() {
    use strata::ingest::nbd::wire::*;
    let env = Env::new();
    let disk = Qcow::create(env.path("t.qcow2"), 8 << 20);
    disk.io(&["write -P 0x5c 1M 2M"]);
    let truth = disk.truth(&env.path("t.raw"));

    // Pull over TCP from qemu-nbd.
    let port = free_port().to_string();
    sh(
        "qemu-nbd",
        &[
            "-r",
            "-f",
            "qcow2",
            "--fork",
            "--persistent",
            "-b",
            "127.0.0.1",
            "-p",
            &port,
            disk.p(),
        ],
    );
    let pulled = env.run(&[
        "backup",
        "--disk",
        "tcp",
        &format!("nbd://127.0.0.1:{port}/"),
    ]);
    common::stop_matching(&format!("qemu-nbd.*-p {port}"));
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    env.assert_restores("tcp@latest", &truth);

    // Push over TCP, surviving a writer that drops its connection.
    let port = free_port();
    let listen = format!("nbd://127.0.0.1:{port}");
    let mut child = env
        .cmd()
        .args([
            "receive",
            "--disk",
            "tcp2",
            "--size",
            &(8u64 << 20).to_string(),
            "--listen",
            &listen,
            "--keep-listening",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening"), "{line}");
    {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        raw_handshake(&mut c);
        assert_eq!(
            raw_request(&mut c, req(CMD_WRITE, 1, 0, 512), &[9u8; 512]).0,
            0
        );
    } // dropped without NBD_CMD_DISC
    let client = common::qemu_img_write(&truth, &format!("{listen}/"));
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    let (ok, out) = finish(child);
    assert!(ok, "{out}");
    // The dropped writer's 512 bytes of 9s were kept and resumed by the
    // next connection, whose copy of the whole disk wrote over them.
    env.assert_restores("tcp2@latest", &truth);
    assert_eq!(env.snapshots().len(), 2);
}

// ---------------------------------------------------------------------------
// Resumable pushes: QEMU's `bitmap-mode: always` retried into a new receive.

/// `strata receive` in the background, killed (-9) if still running when
/// dropped, so that a failing test leaves no process behind.
struct Receiving {
    child: Option<Child>,
    sock: PathBuf,
    /// stdout before "listening on": what became of a partial push.
    notes: String,
}

impl Receiving {
    fn start(env: &Env, tag: &str, args: &[&str]) -> Self {
        let sock = env.path(&format!("recv-{tag}.sock"));
        let listen = format!("nbd+unix:///?socket={}", sock.display());
        let mut child = env
            .cmd()
            .args(["receive", "--listen", &listen])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let notes = wait_listening(&mut child);
        Receiving {
            child: Some(child),
            sock,
            notes,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Wait for it to exit: (success, stdout and stderr).
    fn finish(mut self) -> (bool, String) {
        finish(self.child.take().unwrap())
    }

    fn signal(mut self, sig: i32) -> (bool, String) {
        // SAFETY: signalling the child we started and have not reaped.
        unsafe { libc::kill(self.pid(), sig) };
        finish(self.child.take().unwrap())
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The NBD node of a receive, added to QEMU.
fn add_target(q: &mut Qsd, node: &str, sock: &Path) {
    q.cmd(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": node, "server": {"type": "unix", "path": sock}, "export": ""}),
    );
}

/// Bytes a dirty bitmap of `disk0` marks.
fn bitmap_count(q: &mut Qsd, name: &str) -> u64 {
    let nodes = q.cmd("query-named-block-nodes", json!({}));
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == "disk0")
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no bitmap {name}"))["count"]
        .as_u64()
        .unwrap()
}

/// `strata partials --json`.
fn partials(env: &Env) -> Vec<Value> {
    serde_json::from_str(&env.ok(&["partials", "--json"])).unwrap()
}

/// Poll until the partial of `disk` holds at least `bytes` of data; fail
/// after a deadline.
fn wait_partial_bytes(env: &Env, disk: &str, bytes: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let got = partials(env)
            .iter()
            .find(|p| p["disk"] == disk)
            .map_or(0, |p| p["data_bytes"].as_u64().unwrap());
        if got >= bytes {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the partial of {disk} never reached {bytes} bytes ({got})"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A byte pipe between QEMU and a receive that the test can cut, as a
/// network would: both sides see the connection drop, nobody sends DISC.
struct Proxy {
    path: PathBuf,
    streams: std::sync::Arc<std::sync::Mutex<Vec<UnixStream>>>,
}

impl Proxy {
    fn start(env: &Env, to: &Path) -> Self {
        let path = env.path("proxy.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let streams = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (to, kept) = (to.to_path_buf(), streams.clone());
        std::thread::spawn(move || {
            let Ok((front, _)) = listener.accept() else {
                return;
            };
            let back = UnixStream::connect(&to).unwrap();
            let mut k = kept.lock().unwrap();
            for (mut from, mut into) in [
                (front.try_clone().unwrap(), back.try_clone().unwrap()),
                (back.try_clone().unwrap(), front.try_clone().unwrap()),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Both);
                });
            }
            k.extend([front, back]);
        });
        Proxy { path, streams }
    }

    fn cut(&self) {
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// How a push is interrupted midway.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Cut {
    /// `kill -9` of receive.
    Kill,
    /// block-job-cancel, then receive is stopped before blockdev-del (which
    /// would disconnect cleanly and commit), as docs/QEMU.md says.
    Cancel,
    /// The connection drops under both.
    Drop,
}

const MIB: u64 = 1 << 20;

/// A disk with a full snapshot and bitmap `b0` started at that moment, then
/// written to: 13 MiB dirty in b0. Returns the qcow2 (served by the Qsd).
fn disk_with_parent(env: &Env) -> (Qcow, String) {
    let disk = Qcow::create(env.path("d.qcow2"), 32 * MIB);
    disk.io(&["write -P 0x31 0 16M"]);
    disk.add_bitmap("b0");
    let t0 = disk.truth(&env.path("t0.raw"));
    let full = env.backup(&["--disk", "vm", t0.to_str().unwrap()]);
    (disk, full)
}

fn guest_writes(q: &Qsd) {
    q.io(&[
        "write -P 0x61 0 8M",
        "write -z 9M 1M",
        "write -P 0x62 20M 4M",
        "write -P 0x63 31M 64k",
    ]);
}

/// Start a throttled `bitmap-mode: always` job (`job_id`, by the
/// `transaction` of `actions`) into `node`, let at least 2 MiB arrive, and
/// cut it as `cut` says. Returns what the partial held then.
fn cut_push(
    env: &Env,
    q: &mut Qsd,
    recv: Receiving,
    cut: Cut,
    node: &str,
    job_id: &str,
    actions: Value,
) -> u64 {
    q.cmd("transaction", json!({ "actions": actions }));
    let seen = wait_partial_bytes(env, "vm", 2 * MIB);
    match cut {
        Cut::Kill => {
            let (ok, _) = recv.signal(libc::SIGKILL);
            assert!(!ok);
            let ev = q.wait_job(job_id);
            assert!(ev["data"].get("error").is_some(), "{ev}");
        }
        Cut::Cancel => {
            q.cmd("block-job-cancel", json!({"device": job_id}));
            let ev = q.wait_job(job_id);
            assert_eq!(ev["event"], "BLOCK_JOB_CANCELLED", "{ev}");
            let (ok, out) = recv.signal(libc::SIGTERM);
            assert!(!ok, "{out}");
        }
        Cut::Drop => unreachable!("cut by the proxy"),
    }
    let _ = q.send("blockdev-del", json!({"node-name": node}));
    seen
}

/// The whole story for one kind of cut: an incremental push with
/// `sync=bitmap, bitmap-mode: always` cut midway, then retried into a new
/// receive that resumes the partial; the snapshot is byte-exact.
fn resume_incremental_after(cut: Cut) {
    let env = Env::new();
    let (disk, full) = disk_with_parent(&env);
    let mut q = Qsd::start(&env, &disk);
    guest_writes(&q);
    let t1 = q.truth(&env.path("t1.raw"));
    let dirty = 8 * MIB + MIB + 4 * MIB + 64 * 1024;

    let recv = Receiving::start(
        &env,
        "a",
        &["--disk", "vm", "--incremental", "--bitmap", "b0"],
    );
    let proxy = (cut == Cut::Drop).then(|| Proxy::start(&env, &recv.sock));
    let target = proxy.as_ref().map_or(recv.sock.clone(), |p| p.path.clone());
    add_target(&mut q, "ta", &target);
    // docs/QEMU.md's transaction, throttled so that the cut is midway.
    let actions = json!([
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b1", "persistent": true}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b0"}},
        {"type": "blockdev-backup", "data": {"device": "disk0", "target": "ta", "sync": "bitmap",
            "bitmap": "b0", "bitmap-mode": "always", "job-id": "ja", "speed": 2 * MIB}},
    ]);
    let kept = if let Some(proxy) = &proxy {
        q.cmd("transaction", json!({ "actions": actions }));
        let seen = wait_partial_bytes(&env, "vm", 2 * MIB);
        proxy.cut();
        let ev = q.wait_job("ja");
        assert!(ev["data"].get("error").is_some(), "{ev}");
        let _ = q.send("blockdev-del", json!({"node-name": "ta"}));
        let (ok, out) = recv.finish();
        assert!(!ok, "{out}");
        assert!(
            out.contains("nothing committed") && out.contains("partial push of vm"),
            "{out}"
        );
        seen
    } else {
        cut_push(&env, &mut q, recv, cut, "ta", "ja", actions)
    };
    assert_eq!(env.snapshots().len(), 1, "a cut push commits nothing");

    // The partial: listed, durable, smaller than the whole job.
    let listed = partials(&env);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let p = &listed[0];
    assert_eq!(p["disk"], "vm");
    assert_eq!(p["kind"], "incremental");
    assert_eq!(p["parent"], full.split('@').nth(1).unwrap());
    assert_eq!(p["in_use"], false);
    let held = p["data_bytes"].as_u64().unwrap() + p["zero_bytes"].as_u64().unwrap();
    assert!(
        held >= kept && held < dirty,
        "cut midway: {held} of {dirty}"
    );
    // QEMU cleared the bits of what was acknowledged, and kept the rest.
    let left = bitmap_count(&mut q, "b0");
    assert!(
        left > 0 && left < dirty,
        "b0 still marks {left} of {dirty} bytes"
    );

    // gc leaves a fresh partial alone.
    env.ok(&["gc"]);
    assert_eq!(partials(&env).len(), 1, "gc removed a fresh partial");

    match cut {
        Cut::Kill => control_without_resume(&env, &mut q, &t1),
        Cut::Cancel => refuse_mismatch(&env),
        Cut::Drop => {}
    }

    // The retry sends only what b0 still marks, and resumes the partial.
    let recv = Receiving::start(
        &env,
        "b",
        &["--disk", "vm", "--incremental", "--bitmap", "b0"],
    );
    assert!(
        recv.notes.contains("resuming the partial push of vm"),
        "{}",
        recv.notes
    );
    add_target(&mut q, "tb", &recv.sock);
    q.cmd(
        "blockdev-backup",
        json!({"device": "disk0", "target": "tb", "sync": "bitmap",
        "bitmap": "b0", "bitmap-mode": "always", "job-id": "jb"}),
    );
    let ev = q.wait_job("jb");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    q.cmd("blockdev-del", json!({"node-name": "tb"}));
    let (ok, out) = recv.finish();
    assert!(ok, "{out}");
    let snaps = env.snapshots();
    assert_eq!(snaps.len(), 2, "one snapshot for both attempts");
    assert_eq!(snaps[1]["kind"], "incremental");
    env.assert_restores("vm@latest", &t1);
    assert!(partials(&env).is_empty(), "the committed partial is gone");
    assert!(env.run(&["verify"]).status.success());
}

/// The control: the retry alone, without the partial (`--no-resume`),
/// commits an image that is not the disk. The partial is set aside and put
/// back afterwards, and the control's snapshot forgotten, so that the real
/// retry runs as if this never happened; `bitmap-mode: never` leaves b0 as
/// it is.
fn control_without_resume(env: &Env, q: &mut Qsd, truth: &Path) {
    let saved = env.path("saved-partial");
    sh(
        "cp",
        &[
            "-a",
            env.repo.join("partial/vm").to_str().unwrap(),
            saved.to_str().unwrap(),
        ],
    );
    let recv = Receiving::start(env, "c", &["--disk", "vm", "--incremental", "--no-resume"]);
    assert!(
        recv.notes.contains("discarded the partial push of vm"),
        "{}",
        recv.notes
    );
    assert!(partials(env).is_empty());
    add_target(q, "tc", &recv.sock);
    q.cmd(
        "blockdev-backup",
        json!({"device": "disk0", "target": "tc", "sync": "bitmap",
        "bitmap": "b0", "bitmap-mode": "never", "job-id": "jc"}),
    );
    let ev = q.wait_job("jc");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    q.cmd("blockdev-del", json!({"node-name": "tc"}));
    let (ok, out) = recv.finish();
    assert!(ok, "{out}");
    let out_path = env.path("control.raw");
    env.ok(&["restore", "vm@latest", out_path.to_str().unwrap()]);
    let same = Command::new("cmp")
        .arg("-s")
        .arg(&out_path)
        .arg(truth)
        .status()
        .unwrap();
    assert!(
        !same.success(),
        "the retry alone already had everything: the test proves nothing"
    );
    env.ok(&["forget", "vm@latest"]);
    sh(
        "cp",
        &[
            "-a",
            saved.to_str().unwrap(),
            env.repo.join("partial/vm").to_str().unwrap(),
        ],
    );
}

/// A receive whose kind, parent or size differs refuses, naming the partial.
fn refuse_mismatch(env: &Env) {
    let listen = format!("nbd+unix:///?socket={}", env.path("m.sock").display());
    for args in [
        vec!["--size", "33554432"],
        vec!["--incremental", "--differential"],
    ] {
        let mut all = vec!["receive", "--disk", "vm", "--listen", &listen];
        all.extend(args);
        let err = env.fails(&all);
        assert!(
            err.contains("partial push of vm") && err.contains("strata forget --partial vm"),
            "{err}"
        );
    }
    assert_eq!(
        partials(env).len(),
        1,
        "a refused receive keeps the partial"
    );
}

#[test]
fn resume_push_after_receive_killed() {
    resume_incremental_after(Cut::Kill);
}

#[test]
fn resume_push_after_job_cancelled() {
    resume_incremental_after(Cut::Cancel);
}

#[test]
fn resume_push_after_connection_dropped() {
    resume_incremental_after(Cut::Drop);
}

/// A re-tryable full: `sync=full` with a bitmap and `bitmap-mode: always`
/// into `receive --size`, receive killed midway, new writes, then the retry
/// with `sync=bitmap` on that bitmap into a new `receive --size`.
#[test]
fn resume_full_push_after_receive_killed() {
    let env = Env::new();
    let disk = Qcow::create(env.path("f.qcow2"), 32 * MIB);
    disk.io(&["write -P 0x41 0 12M", "write -P 0x42 16M 8M"]);
    let mut q = Qsd::start(&env, &disk);
    let size = (32 * MIB).to_string();
    let recv = Receiving::start(&env, "a", &["--disk", "vm", "--size", &size]);
    add_target(&mut q, "ta", &recv.sock);
    let actions = json!([
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "bf", "persistent": true}},
        {"type": "blockdev-backup", "data": {"device": "disk0", "target": "ta", "sync": "full",
            "bitmap": "bf", "bitmap-mode": "always", "job-id": "ja", "speed": 2 * MIB}},
    ]);
    cut_push(&env, &mut q, recv, Cut::Kill, "ta", "ja", actions);
    let listed = partials(&env);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["kind"], "full");
    assert!(listed[0]["data_bytes"].as_u64().unwrap() < 20 * MIB);

    // The guest writes on; bf records it with what was not copied.
    q.io(&["write -P 0x43 2M 1M", "write -z 17M 1M"]);
    let truth = q.truth(&env.path("t.raw"));
    let recv = Receiving::start(&env, "b", &["--disk", "vm", "--size", &size]);
    assert!(
        recv.notes.contains("resuming the partial push of vm"),
        "{}",
        recv.notes
    );
    add_target(&mut q, "tb", &recv.sock);
    q.cmd(
        "blockdev-backup",
        json!({"device": "disk0", "target": "tb", "sync": "bitmap",
        "bitmap": "bf", "bitmap-mode": "always", "job-id": "jb"}),
    );
    let ev = q.wait_job("jb");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    q.cmd("blockdev-del", json!({"node-name": "tb"}));
    let (ok, out) = recv.finish();
    assert!(ok, "{out}");
    let snaps = env.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["kind"], "full");
    env.assert_restores("vm@latest", &truth);
    assert!(partials(&env).is_empty());
}

/// The partial's life with a hand-driven client: kept on a drop (with the
/// message saying so), resumed (the export reads the partial's writes),
/// removed by `forget --partial`, discarded by `--no-resume`, and removed
/// by gc only past `--partial-max-age`.
#[test]
fn partial_push_lifecycle() {
    use strata::ingest::nbd::wire::*;
    let env = Env::new();
    let size = 8 * MIB;
    let sz = size.to_string();
    let args = ["--disk", "r", "--size", sz.as_str()];
    let connect = |recv: &Receiving| {
        let mut c = UnixStream::connect(&recv.sock).unwrap();
        assert_eq!(raw_handshake(&mut c), size);
        Writer {
            c,
            cookie: 0,
            truth: vec![0u8; size as usize],
        }
    };
    let drop_writer = |env: &Env, tag: &str, args: &[&str], seed: u64| {
        let recv = Receiving::start(env, tag, args);
        let mut w = connect(&recv);
        w.write(MIB, &common::random_bytes(seed, 3 * MIB as usize));
        w.send(CMD_FLUSH, 0, 0, &[]);
        drop(w);
        let (ok, out) = recv.finish();
        assert!(!ok && out.contains("nothing committed"), "{out}");
        assert!(out.contains("partial push of r"), "{out}");
    };

    drop_writer(&env, "a", &args, 1);
    let listed = partials(&env);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["data_bytes"], 3 * MIB);
    env.ok(&["gc"]);
    env.ok(&["gc", "--partial-max-age", "1h"]);
    assert_eq!(partials(&env).len(), 1);

    // Resumed: the export reads as the partial; a DISC commits both.
    let recv = Receiving::start(&env, "b", &args);
    assert!(recv.notes.contains("resuming"), "{}", recv.notes);
    let mut w = connect(&recv);
    w.truth[MIB as usize..4 * MIB as usize]
        .copy_from_slice(&common::random_bytes(1, 3 * MIB as usize));
    w.check_read(MIB - 4096, 2 * MIB as usize);
    w.write(3 * MIB + 5000, &common::random_bytes(2, 2 * MIB as usize));
    w.zero(CMD_WRITE_ZEROES, 0, 4096);
    req(CMD_DISC, 0, 0, 0).write_to(&mut w.c).unwrap();
    let (ok, out) = recv.finish();
    assert!(ok, "{out}");
    let truth = env.path("truth.raw");
    std::fs::write(&truth, &w.truth).unwrap();
    env.assert_restores("r@latest", &truth);
    assert!(partials(&env).is_empty());

    // forget --partial removes it; a second time there is none.
    drop_writer(&env, "c", &args, 3);
    let out = env.ok(&["forget", "--partial", "r"]);
    assert!(out.contains("removed the partial push of r"), "{out}");
    assert!(partials(&env).is_empty());
    let err = env.fails(&["forget", "--partial", "r"]);
    assert!(err.contains("no partial push"), "{err}");

    // --no-resume discards and says so; the new push starts empty.
    drop_writer(&env, "d", &args, 4);
    let recv = Receiving::start(&env, "e", &["--disk", "r", "--size", &sz, "--no-resume"]);
    assert!(
        recv.notes.contains("discarded the partial push of r"),
        "{}",
        recv.notes
    );
    let mut w = connect(&recv);
    w.check_read(MIB, 4096);
    drop(w);
    drop(recv);

    // gc removes a partial past the age given.
    drop_writer(&env, "f", &args, 5);
    let out = env.ok(&["gc", "--partial-max-age", "0h"]);
    assert!(out.contains("removed the partial push of r"), "{out}");
    assert!(partials(&env).is_empty());
    assert_eq!(env.snapshots().len(), 1);
}
