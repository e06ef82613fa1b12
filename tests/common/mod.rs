//! Shared helpers for the integration tests: a scratch repository, the
//! `strata` binary, real QEMU tools to make disks and their truths, and a
//! real S3 server ([`s3`]).
#![allow(dead_code)]

pub mod s3;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    /// Environment for every strata command (a passphrase file, say).
    pub vars: Vec<(String, String)>,
}

impl Env {
    /// A fresh directory with an initialized repository in `repo/`.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("strata-test")
            .tempdir()
            .unwrap();
        let repo = dir.path().join("repo");
        let env = Env {
            dir,
            repo,
            vars: Vec::new(),
        };
        env.ok(&["init"]);
        env
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
        c.arg("--repo").arg(&self.repo);
        c.envs(self.vars.iter().map(|(k, v)| (k, v)));
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Run strata, expect success, return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run strata, expect exit code 1, return stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "strata {args:?} should fail; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn snapshots(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["snapshots", "--json"])).unwrap()
    }

    /// Take a snapshot and return its `DISK@ID`.
    pub fn backup(&self, args: &[&str]) -> String {
        let mut full = vec!["backup"];
        full.extend_from_slice(args);
        let out = self.ok(&full);
        out.split_whitespace().nth(1).unwrap().to_string()
    }

    /// Take an incremental of `disk` from `source` holding the ranges of the
    /// `changes` JSON file; return its `DISK@ID`.
    pub fn incremental(&self, disk: &str, source: &Path, changes: &Path) -> String {
        self.backup(&[
            "--disk",
            disk,
            source.to_str().unwrap(),
            "--changes",
            changes.to_str().unwrap(),
        ])
    }

    /// Restore `snap` and compare it with `truth` byte for byte; check that
    /// the copy is no less sparse than the truth.
    pub fn assert_restores(&self, snap: &str, truth: &Path) {
        let out = self.path("restored.raw");
        self.ok(&["restore", snap, out.to_str().unwrap()]);
        assert_same(&out, truth);
        let (got, want) = (allocated(&out), allocated(truth));
        assert!(
            got <= want + (1 << 20),
            "{snap}: restored copy allocates {got} bytes, the truth {want}"
        );
        std::fs::remove_file(out).unwrap();
    }

    /// Every file in the repository with its size, for "nothing changed" checks.
    pub fn repo_state(&self) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        walk(&self.repo, &mut out);
        out.retain(|(p, _)| {
            let name = p.file_name().unwrap().to_string_lossy();
            // SQLite's side files and the lock notes change on any open.
            !name.starts_with("catalog.db") && !p.starts_with(self.repo.join("locks"))
        });
        out.sort();
        out
    }
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = e.metadata().unwrap();
        if meta.is_dir() {
            walk(&e.path(), out);
        } else {
            out.push((e.path(), meta.len()));
        }
    }
}

/// Run a tool and insist that it works.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

pub fn assert_same(a: &Path, b: &Path) {
    let out = Command::new("cmp").arg(a).arg(b).output().unwrap();
    assert!(
        out.status.success(),
        "{} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 disk driven with qemu-img and qemu-io.
pub struct Qcow {
    pub path: PathBuf,
}

impl Qcow {
    pub fn create(path: PathBuf, size: u64) -> Self {
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                path.to_str().unwrap(),
                &size.to_string(),
            ],
        );
        Qcow { path }
    }

    /// A new qcow2 at `path` backed by `backing` (of format `fmt`).
    pub fn overlay(path: PathBuf, backing: &Path, fmt: &str) -> Self {
        let b = backing.to_str().unwrap();
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                b,
                "-F",
                fmt,
                path.to_str().unwrap(),
            ],
        );
        Qcow { path }
    }

    pub fn p(&self) -> &str {
        self.path.to_str().unwrap()
    }

    pub fn add_bitmap(&self, name: &str) {
        sh("qemu-img", &["bitmap", "--add", self.p(), name]);
    }

    pub fn clear_bitmap(&self, name: &str) {
        sh("qemu-img", &["bitmap", "--clear", self.p(), name]);
    }

    /// Run qemu-io commands (`write -P 0xaa 0 64k`, `write -z ...`, `discard ...`).
    pub fn io(&self, cmds: &[&str]) {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(self.p());
        sh("qemu-io", &args);
    }

    /// The disk's contents now, as a raw file: the truth to compare with.
    pub fn truth(&self, out: &Path) -> PathBuf {
        sh(
            "qemu-img",
            &["convert", "-O", "raw", self.p(), out.to_str().unwrap()],
        );
        out.to_path_buf()
    }

    /// `nbdinfo --map` of a bitmap over `qemu-nbd -B`, written to `out`.
    pub fn dirty_map(&self, bitmap: &str, out: &Path) -> PathBuf {
        let json = sh(
            "nbdinfo",
            &[
                &format!("--map=qemu:dirty-bitmap:{bitmap}"),
                "--json",
                "--",
                "[",
                "qemu-nbd",
                "-r",
                "-f",
                "qcow2",
                "-B",
                bitmap,
                self.p(),
                "]",
            ],
        );
        std::fs::write(out, json).unwrap();
        out.to_path_buf()
    }
}

/// A disk of `64 MiB + 4.5 KiB` with a full and `n` incrementals taken from
/// its dirty bitmap, plus a differential after the second incremental.
/// Returns every snapshot's `DISK@ID` with its truth, in order.
pub fn qemu_chain(env: &Env, disk_name: &str, n: usize) -> Vec<(String, PathBuf)> {
    qemu_chain_with(env, disk_name, &default_rounds(n), &|_| Vec::new())
}

/// qemu-io commands for `n` rounds of writes: data, unaligned data, zero
/// writes, discards, and a write ending in the last, partial cluster.
pub fn default_rounds(n: usize) -> Vec<Vec<String>> {
    (1..=n as u64)
        .map(|k| {
            vec![
                format!("write -P {} {} 300k", 0x10 + k, (k * 7 % 60) << 20),
                format!("write -P {} {} 5000", 0x40 + k, k * 1_000_003 % (60 << 20)),
                format!("write -z {} 512k", (k * 13 % 60) << 20),
                format!("discard {} 192k", (k * 17 % 60) << 20),
                format!("write -P {} 67108000 5000", 0x80 + k),
            ]
        })
        .collect()
}

/// As [`qemu_chain`], one incremental per round of qemu-io commands, with
/// `extra(k)` added to the k-th backup (0 is the full; the differential is
/// taken right after incremental 2).
pub fn qemu_chain_with(
    env: &Env,
    disk_name: &str,
    rounds: &[Vec<String>],
    extra: &dyn Fn(usize) -> Vec<String>,
) -> Vec<(String, PathBuf)> {
    let mut taken = 0;
    let mut backup = |args: &[&str]| {
        let more = extra(taken);
        taken += 1;
        let mut args = args.to_vec();
        args.extend(more.iter().map(|s| s.as_str()));
        env.backup(&args)
    };
    let tag = disk_name.replace('/', "_");
    let disk = Qcow::create(env.path(&format!("{tag}.qcow2")), (64 << 20) + 4608);
    disk.add_bitmap("inc");
    disk.add_bitmap("diff");
    disk.io(&[
        "write -P 0xaa 0 12M",
        "write -P 0xbb 40M 6M",
        "write -z 56M 1M",
    ]);
    let truth = disk.truth(&env.path(&format!("{tag}-t0.raw")));
    let full = backup(&["--disk", disk_name, truth.to_str().unwrap()]);
    disk.clear_bitmap("inc");
    disk.clear_bitmap("diff");
    let mut out = vec![(full.clone(), truth)];
    for (i, round) in rounds.iter().enumerate() {
        let i = i + 1;
        let cmds: Vec<&str> = round.iter().map(|s| s.as_str()).collect();
        disk.io(&cmds);
        let truth = disk.truth(&env.path(&format!("{tag}-t{i}.raw")));
        let map = disk.dirty_map("inc", &env.path(&format!("{tag}-inc{i}.json")));
        let snap = backup(&[
            "--disk",
            disk_name,
            truth.to_str().unwrap(),
            "--changes",
            map.to_str().unwrap(),
        ]);
        disk.clear_bitmap("inc");
        out.push((snap, truth.clone()));
        if i == 2 {
            let map = disk.dirty_map("diff", &env.path(&format!("{tag}-diff.json")));
            let snap = backup(&[
                "--disk",
                disk_name,
                truth.to_str().unwrap(),
                "--changes",
                map.to_str().unwrap(),
                "--parent",
                &full,
                "--differential",
            ]);
            out.push((snap, truth));
        }
    }
    out
}

/// A `strata mount` that is always unmounted, even when a test fails.
pub struct Mounted<'a> {
    pub env: &'a Env,
    pub mnt: PathBuf,
    pub pid: i32,
}

impl<'a> Mounted<'a> {
    pub fn new(env: &'a Env, name: &str) -> Self {
        let mnt = env.path(name);
        std::fs::create_dir_all(&mnt).unwrap();
        let out = env.ok(&["mount", mnt.to_str().unwrap()]);
        // "mounted MNT (pid N)"
        let pid = out
            .rsplit("(pid ")
            .next()
            .and_then(|s| s.trim().trim_end_matches(')').parse().ok())
            .unwrap_or_else(|| panic!("no pid in {out:?}"));
        Mounted { env, mnt, pid }
    }

    /// The mounted path of a snapshot `DISK@ID`.
    pub fn image(&self, snap: &str) -> PathBuf {
        let (disk, id) = snap.rsplit_once('@').unwrap();
        self.mnt.join(disk).join(format!("{id}.raw"))
    }

    pub fn is_mounted(&self) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let p = self.mnt.to_str().unwrap();
        info.lines().any(|l| l.split(' ').nth(4) == Some(p))
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if self.is_mounted() {
            let ok = self
                .env
                .run(&["umount", self.mnt.to_str().unwrap()])
                .status
                .success();
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
    }
}

/// Block until process `pid` has exited (it need not be our child).
pub fn wait_exit(pid: i32) {
    // SAFETY: pidfd_open and poll on the descriptor it returns.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if fd < 0 {
            return; // already gone
        }
        let mut pfd = libc::pollfd {
            fd: fd as i32,
            events: libc::POLLIN,
            revents: 0,
        };
        libc::poll(&mut pfd, 1, 30_000);
        libc::close(fd as i32);
    }
}

/// A strata process stopped at a `STRATA_TEST_PAUSE` step.
pub struct Paused {
    pub child: std::process::Child,
}

impl Paused {
    /// Start `strata args` and return once it has reached `step`.
    pub fn start(env: &Env, args: &[&str], step: &str) -> Self {
        use std::io::BufRead;
        let mut child = env
            .cmd()
            .args(args)
            .env("STRATA_TEST_PAUSE", step)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let marker = format!("STRATA_TEST_PAUSED {step}");
        let mut seen = Vec::new();
        for line in stderr.lines().map_while(Result::ok) {
            if line == marker {
                return Paused { child };
            }
            seen.push(line);
        }
        let _ = child.wait();
        panic!("strata {args:?} never reached {step}: {seen:?}");
    }

    /// kill -9, and reap.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Let it go on; return its output.
    pub fn resume(mut self) -> Output {
        drop(self.child.stdin.take());
        self.child.wait_with_output().unwrap()
    }
}

/// `qemu-img convert -n` of the raw file `src` into the NBD export at
/// `uri` (receive's, say): QEMU as the writer of a push.
pub fn qemu_img_write(src: &Path, uri: &str) -> Output {
    Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(src)
        .arg(uri)
        .output()
        .unwrap()
}

/// Bytes from a fixed-seed xorshift: unique, incompressible test data.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A raw disk of random data and incrementals of it, each with a strata
/// change list; returns `(DISK@ID, truth)` in order.
pub fn raw_chain(env: &Env, disk: &str, size: u64, n: usize) -> Vec<(String, PathBuf)> {
    use std::os::unix::fs::FileExt;
    let tag = disk.replace('/', "_");
    let state = env.path(&format!("{tag}.raw"));
    let f = std::fs::File::create(&state).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&random_bytes(7, (size / 2) as usize), 0)
        .unwrap();
    let truth = env.path(&format!("{tag}-t0.raw"));
    std::fs::copy(&state, &truth).unwrap();
    let mut out = vec![(
        env.backup(&["--disk", disk, state.to_str().unwrap()]),
        truth,
    )];
    for i in 1..=n as u64 {
        // Every other incremental overwrites the same range: garbage for gc.
        let off = 1_000_000 + (i % 2) * 300_000;
        f.write_all_at(&random_bytes(100 + i, 200_000), off)
            .unwrap();
        let json = env.path(&format!("{tag}-c{i}.json"));
        std::fs::write(
            &json,
            format!(r#"{{"extents": [{{"offset": {off}, "length": 200000}}]}}"#),
        )
        .unwrap();
        let truth = env.path(&format!("{tag}-t{i}.raw"));
        std::fs::copy(&state, &truth).unwrap();
        let snap = env.backup(&[
            "--disk",
            disk,
            state.to_str().unwrap(),
            "--changes",
            json.to_str().unwrap(),
        ]);
        out.push((snap, truth));
    }
    out
}

/// `[{"hash", "offset", "length", "skip"}]`: the chunk behind each own data
/// range of `snap`, read from its manifest (of a plain repository).
pub fn manifest_chunks_json(repo: &Path, snap: &str) -> serde_json::Value {
    use strata::model::image_map::Piece;
    let (disk, id) = snap.split_once('@').unwrap();
    let backend = strata::store::backend::dir::DirBackend::new(repo);
    let (disk, id) = (
        strata::model::name::DiskName::parse(disk).unwrap(),
        strata::model::name::SnapshotId::parse(id).unwrap(),
    );
    let (_, own) = strata::store::manifest::read(&backend, &disk, &id, None)
        .unwrap()
        .decode()
        .unwrap();
    own.segments
        .iter()
        .filter_map(|s| match s.piece {
            Piece::Data { chunk, skip } => Some(serde_json::json!({
                "hash": chunk.to_hex(),
                "offset": s.range.offset,
                "length": s.range.length,
                "skip": skip,
            })),
            Piece::Zero => None,
        })
        .collect()
}

/// Stop every process whose command line matches `pattern` (`pgrep -f`)
/// and wait until each has exited: a qemu-nbd that is still going holds
/// its image's write lock.
pub fn stop_matching(pattern: &str) {
    let out = Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) with a pid and a signal number.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        wait_exit(pid);
    }
}

/// Kills, on drop, the process whose pid a file holds (nbdkit's --pidfile).
pub struct KillPidFile(pub PathBuf);

impl Drop for KillPidFile {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_exit(pid);
        }
    }
}
