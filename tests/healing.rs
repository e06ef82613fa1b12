//! Damage and healing: damaged chunks are moved out of use and stored again
//! by the next backup that meets their data; restore and the mount work
//! around damage; full file systems, failing sources and kills change
//! nothing that the next gc does not clean up.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// `(hash, offset, length)` of each chunk piece a snapshot's manifest lists.
fn manifest_chunks(env: &Env, snap: &str) -> Vec<(String, u64, u64)> {
    manifest_chunks_json(&env.repo, snap)
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["hash"].as_str().unwrap().to_string(),
                c["offset"].as_u64().unwrap(),
                c["length"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn chunk_path(env: &Env, hash: &str) -> PathBuf {
    env.repo.join("chunks").join(&hash[..2]).join(hash)
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    Flipped,
    Truncated,
    Missing,
}

fn damage(path: &Path, how: Damage) {
    match how {
        Damage::Flipped => {
            let mut body = std::fs::read(path).unwrap();
            let mid = body.len() / 2;
            body[mid] ^= 0x10;
            std::fs::write(path, body).unwrap();
        }
        Damage::Truncated => {
            let body = std::fs::read(path).unwrap();
            std::fs::write(path, &body[..body.len() / 3]).unwrap();
        }
        Damage::Missing => std::fs::remove_file(path).unwrap(),
    }
}

/// `verify --json`: exit code and report.
fn verify(env: &Env, args: &[&str]) -> (i32, Value) {
    let mut full = vec!["verify", "--json"];
    full.extend_from_slice(args);
    let out = env.run(&full);
    let report = serde_json::from_slice(&out.stdout).unwrap();
    (out.status.code().unwrap(), report)
}

fn damaged_refs(report: &Value) -> Vec<String> {
    report["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["snapshot"].as_str().unwrap().to_string())
        .collect()
}

/// A full and an incremental of a 16 MiB disk (random first half), and a
/// chunk of the full that the incremental inherits. The disk file is
/// `<disk>.raw` in the env.
struct Chain {
    snaps: Vec<(String, PathBuf)>,
    state: PathBuf,
    victim: (String, u64, u64),
}

fn chain(env: &Env) -> Chain {
    let snaps = raw_chain(env, "d", 16 << 20, 1);
    let victim = manifest_chunks(env, &snaps[0].0)
        .into_iter()
        .find(|(_, off, _)| *off >= 6 << 20)
        .unwrap();
    Chain {
        snaps,
        state: env.path("d.raw"),
        victim,
    }
}

/// A change list naming one 64 KiB block far from the victim, written into
/// the disk too, so the healing backup has something of its own.
fn unrelated_change(env: &Env, state: &Path) -> PathBuf {
    let f = std::fs::OpenOptions::new().write(true).open(state).unwrap();
    f.write_all_at(&random_bytes(999, 65536), 12 << 20).unwrap();
    let json = env.path("unrelated.json");
    std::fs::write(
        &json,
        format!(
            r#"{{"extents": [{{"offset": {}, "length": 65536}}]}}"#,
            12 << 20
        ),
    )
    .unwrap();
    json
}

/// `qemu-nbd` serving a raw file read-only on a unix socket; killed on drop.
struct QemuNbd {
    sock: PathBuf,
}

impl QemuNbd {
    fn serve(env: &Env, file: &Path) -> Self {
        let sock = env.path("heal-nbd.sock");
        sh(
            "qemu-nbd",
            &[
                "-r",
                "-f",
                "raw",
                "--fork",
                "--persistent",
                "--socket",
                sock.to_str().unwrap(),
                file.to_str().unwrap(),
            ],
        );
        QemuNbd { sock }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        stop_matching(&format!("qemu-nbd.*{}", self.sock.display()));
    }
}

#[derive(Debug, Clone, Copy)]
enum Healer {
    Full,
    Incremental,
    NbdIncremental,
}

/// Each kind of damage, healed by a full, by an incremental whose change
/// list says nothing of the damaged range, and by an incremental pulled over
/// NBD: verify finds and moves the chunk out of use, restore writes around
/// it, and after the healing backup every snapshot reads whole again.
#[test]
fn damage_is_healed_by_the_next_backup() {
    for how in [Damage::Flipped, Damage::Truncated, Damage::Missing] {
        for healer in [Healer::Full, Healer::Incremental, Healer::NbdIncremental] {
            damage_and_heal(how, healer);
        }
    }
}

fn damage_and_heal(how: Damage, healer: Healer) {
    let ctx = format!("{how:?} healed by {healer:?}");
    let env = Env::new();
    let c = chain(&env);
    let (hash, off, len) = c.victim.clone();
    damage(&chunk_path(&env, &hash), how);

    let (code, report) = verify(&env, &[]);
    assert_eq!(code, 1, "{ctx}");
    let all: Vec<String> = c.snaps.iter().map(|(s, _)| s.clone()).collect();
    assert_eq!(damaged_refs(&report), all, "{ctx}");
    for d in report["damaged"].as_array().unwrap() {
        assert_eq!(d["ranges"], serde_json::json!([[off, len]]), "{ctx}");
    }
    // Moved out of use, and remembered.
    assert!(!chunk_path(&env, &hash).exists(), "{ctx}");
    assert!(env.repo.join("damaged").join(&hash).exists(), "{ctx}");

    // Restore writes everything else, leaves the range zero, names it.
    let (snap, truth) = &c.snaps[1];
    let out = env.path("partial.raw");
    let run = env.run(&["restore", snap, out.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(1), "{ctx}");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains(&format!("{off}+{len}")), "{ctx}: {stderr}");
    let mut expected = std::fs::read(truth).unwrap();
    expected[off as usize..(off + len) as usize].fill(0);
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "{ctx}: restored bytes"
    );

    let heal = match healer {
        Healer::Full => env.backup(&["--disk", "d", c.state.to_str().unwrap()]),
        Healer::Incremental => {
            let json = unrelated_change(&env, &c.state);
            env.incremental("d", &c.state, &json)
        }
        Healer::NbdIncremental => {
            let json = unrelated_change(&env, &c.state);
            let nbd = QemuNbd::serve(&env, &c.state);
            env.backup(&[
                "--disk",
                "d",
                &nbd.uri(),
                "--changes",
                json.to_str().unwrap(),
            ])
        }
    };
    let (code, report) = verify(&env, &[]);
    assert_eq!(code, 0, "{ctx}: {report}");
    env.assert_restores(&heal, &c.state);
    for (snap, truth) in &c.snaps {
        env.assert_restores(snap, truth);
    }
    // The record of the healed chunk is gc's to drop.
    assert!(env.ok(&["gc"]).contains("1 damaged-chunk records"), "{ctx}");
    assert!(!env.repo.join("damaged").join(&hash).exists(), "{ctx}");
}

/// Through the mount, reads of a damaged range fail with EIO and the rest
/// reads normally; once a backup stored the data again, the same open
/// image reads whole.
#[test]
fn mount_reads_around_damage() {
    let env = Env::new();
    let c = chain(&env);
    let (hash, off, len) = c.victim.clone();
    damage(&chunk_path(&env, &hash), Damage::Flipped);
    let m = Mounted::new(&env, "mnt");
    let (snap, truth) = &c.snaps[1];
    let image = m.image(snap);
    let truth = std::fs::read(truth).unwrap();
    // O_DIRECT: each read goes to the mount as asked, not widened by the
    // kernel's read-ahead.
    let read = |at: u64, n: usize| -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&image)?;
        let layout = std::alloc::Layout::from_size_align(n, 4096).unwrap();
        // SAFETY: a fresh aligned allocation of n bytes, freed below.
        let buf = unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc(layout), n) };
        let got = f.read_exact_at(buf, at).map(|()| buf.to_vec());
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(buf.as_mut_ptr(), layout) };
        got
    };
    let err = read(off, 65536).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    for at in [0, off - (1 << 20), off + len, 15 << 20] {
        let got = read(at, 1 << 20).unwrap();
        assert!(
            got == truth[at as usize..at as usize + (1 << 20)],
            "at {at}"
        );
    }
    assert!(
        !chunk_path(&env, &hash).exists(),
        "the read moved it out of use"
    );
    env.backup(&["--disk", "d", c.state.to_str().unwrap()]);
    let got = read(off, len as usize).unwrap();
    assert!(got == truth[off as usize..(off + len) as usize]);
}

/// `receive --incremental` onto a parent with damaged ranges is refused
/// before it listens: QEMU would push only its dirty clusters.
#[test]
fn receive_refuses_a_damaged_parent() {
    let env = Env::new();
    let c = chain(&env);
    damage(&chunk_path(&env, &c.victim.0), Damage::Missing);
    assert_eq!(verify(&env, &["--quick"]).0, 1);
    let sock = env.path("recv.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let before = env.repo_state();
    let err = env.fails(&["receive", "--disk", "d", "--incremental", "--listen", &uri]);
    assert!(err.contains("damaged") && err.contains("full"), "{err}");
    assert!(!sock.exists(), "never listened");
    assert_eq!(env.repo_state(), before);
}

/// Run gc until it keeps no chunk for being recent: gc spares chunks written
/// in the last tenth of a second, since file systems stamp times with a
/// coarse clock.
fn gc_settled(env: &Env) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !env.ok(&["gc"]).contains("kept 0 recent") {
        assert!(
            std::time::Instant::now() < deadline,
            "gc keeps recent chunks"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A `tmpfs` mounted for a test and unmounted on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn new(env: &Env, name: &str, size: &str) -> Self {
        let path = env.path(name);
        std::fs::create_dir_all(&path).unwrap();
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                path.to_str().unwrap(),
            ],
        );
        Tmpfs { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn chunk_files(repo: &Path) -> usize {
    let mut n = 0;
    for sub in std::fs::read_dir(repo.join("chunks")).unwrap() {
        n += std::fs::read_dir(sub.unwrap().path()).unwrap().count();
    }
    n
}

/// A full repository file system: the backup fails naming the file and the
/// cause, commits nothing, gc removes what it stored, verify passes, and
/// once space is free the same backup works.
#[test]
fn full_repository_file_system() {
    let mut env = Env::new();
    let fs = Tmpfs::new(&env, "small", "40m");
    env.repo = fs.path.join("repo");
    env.ok(&["init"]);
    let disk = env.path("big.raw");
    std::fs::write(&disk, random_bytes(5, 24 << 20)).unwrap();
    let small = env.path("small.raw");
    std::fs::write(&small, random_bytes(6, 4 << 20)).unwrap();
    let first = env.backup(&["--disk", "s", small.to_str().unwrap()]);
    let filler = fs.path.join("filler");
    std::fs::write(&filler, vec![1u8; 20 << 20]).unwrap();
    let chunks_before = chunk_files(&env.repo);

    let err = env.fails(&["backup", "--disk", "big", disk.to_str().unwrap()]);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains(env.repo.to_str().unwrap()),
        "names the file: {err}"
    );
    assert_eq!(env.snapshots().len(), 1);
    assert_eq!(verify(&env, &[]).0, 0);
    gc_settled(&env);
    assert_eq!(
        chunk_files(&env.repo),
        chunks_before,
        "gc removed the leftovers"
    );

    std::fs::remove_file(&filler).unwrap();
    let big = env.backup(&["--disk", "big", disk.to_str().unwrap()]);
    assert_eq!(verify(&env, &[]).0, 0);
    env.assert_restores(&big, &disk);
    env.assert_restores(&first, &small);
}

/// A restore target on a full file system: exit 1 naming the target.
#[test]
fn full_restore_target() {
    let env = Env::new();
    let disk = env.path("d.raw");
    std::fs::write(&disk, random_bytes(8, 16 << 20)).unwrap();
    let snap = env.backup(&["--disk", "d", disk.to_str().unwrap()]);
    let fs = Tmpfs::new(&env, "target", "4m");
    let target = fs.path.join("out.raw");
    let err = env.fails(&["restore", &snap, target.to_str().unwrap()]);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains(target.to_str().unwrap()), "{err}");
}

/// An NBD server that answers reads with errors (nbdkit's error filter):
/// the backup fails naming the source, commits nothing, and gc removes what
/// it stored before the error.
#[test]
fn nbd_source_read_errors() {
    let env = Env::new();
    let disk = env.path("d.raw");
    std::fs::write(&disk, random_bytes(9, 8 << 20)).unwrap();
    let good = env.backup(&["--disk", "d", disk.to_str().unwrap()]);
    let chunks_before = chunk_files(&env.repo);
    let other = env.path("other.raw");
    std::fs::write(&other, random_bytes(10, 8 << 20)).unwrap();
    let sock = env.path("nbdkit.sock");
    let pidfile = env.path("nbdkit.pid");
    sh(
        "nbdkit",
        &[
            "--unix",
            sock.to_str().unwrap(),
            "--pidfile",
            pidfile.to_str().unwrap(),
            "--filter=error",
            "file",
            other.to_str().unwrap(),
            "error-pread=EIO",
            "error-pread-rate=100%",
        ],
    );
    let _stop = KillPidFile(pidfile.clone());
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let err = env.fails(&["backup", "--disk", "e", &uri]);
    assert!(err.contains("at offset") && err.contains("EIO"), "{err}");
    assert_eq!(env.snapshots().len(), 1);
    assert_eq!(verify(&env, &[]).0, 0);
    gc_settled(&env);
    assert_eq!(chunk_files(&env.repo), chunks_before);
    env.assert_restores(&good, &disk);
}

/// forget, gc and prune while an image is open in the mount: the open image
/// keeps reading correctly (its chunks are pinned), and once it is closed
/// gc frees them.
#[test]
fn gc_and_prune_beside_an_open_image() {
    let env = Env::new();
    let a = env.path("a.raw");
    std::fs::write(&a, random_bytes(11, 8 << 20)).unwrap();
    let first = env.backup(&["--disk", "d", a.to_str().unwrap()]);
    let b = env.path("b.raw");
    std::fs::write(&b, random_bytes(12, 8 << 20)).unwrap();
    env.backup(&["--disk", "d", b.to_str().unwrap()]);
    let m = Mounted::new(&env, "mnt");
    let open = std::fs::File::open(m.image(&first)).unwrap();

    env.ok(&["forget", &first]);
    let gc = env.ok(&["gc"]);
    assert!(gc.starts_with("deleted 0 chunks"), "{gc}");
    let mut got = vec![0u8; 8 << 20];
    open.read_exact_at(&mut got, 0).unwrap();
    assert!(
        got == std::fs::read(&a).unwrap(),
        "forgotten image reads whole"
    );
    // prune runs its gc beside the mount too.
    let out = env.ok(&["prune", "--keep-last", "1", "--json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["freed_bytes"], 0);

    // The kernel tells the mount of the close after close(2) returns.
    drop(open);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let gc = env.ok(&["gc"]);
        if gc.starts_with("deleted 8 chunks") {
            break;
        }
        assert!(gc.starts_with("deleted 0 chunks"), "{gc}");
        assert!(
            std::time::Instant::now() < deadline,
            "the pin outlived the open file"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(verify(&env, &[]).0, 0);
}

/// kill -9 of verify just after it moved a damaged chunk aside: the next
/// verify still reports the damage, and a backup heals it.
#[test]
fn killed_verify_while_quarantining() {
    let env = Env::new();
    let c = chain(&env);
    let (hash, _, _) = c.victim.clone();
    damage(&chunk_path(&env, &hash), Damage::Flipped);
    Paused::start(&env, &["verify"], "quarantine:taken").kill();
    assert!(!chunk_path(&env, &hash).exists());
    let (code, report) = verify(&env, &[]);
    assert_eq!(code, 1);
    assert_eq!(damaged_refs(&report).len(), 2);
    let json = unrelated_change(&env, &c.state);
    env.incremental("d", &c.state, &json);
    assert_eq!(verify(&env, &[]).0, 0);
    for (snap, truth) in &c.snaps {
        env.assert_restores(snap, truth);
    }
}

/// Damage nobody has verified yet, met by a backup's check of the ranges
/// its change list calls unchanged: the check moves the chunk out of use and
/// the backup reads those ranges from the source instead of failing. The
/// victim is the incremental's own chunk, which holds pieces of two cells,
/// so the check must read it (a whole chunk is proven by its hash alone).
#[test]
fn unchecked_damage_met_by_the_unchanged_check() {
    let env = Env::new();
    let c = chain(&env);
    let (hash, _, _) = manifest_chunks(&env, &c.snaps[1].0)
        .into_iter()
        .find(|(h, _, _)| {
            !manifest_chunks(&env, &c.snaps[0].0)
                .iter()
                .any(|f| &f.0 == h)
        })
        .unwrap();
    damage(&chunk_path(&env, &hash), Damage::Truncated);
    let json = unrelated_change(&env, &c.state);
    let snap = env.backup(&[
        "--disk",
        "d",
        c.state.to_str().unwrap(),
        "--changes",
        json.to_str().unwrap(),
        "--check-unchanged",
        "100",
    ]);
    let (code, report) = verify(&env, &[]);
    assert_eq!(code, 0, "{report}");
    env.assert_restores(&snap, &c.state);
    for (snap, truth) in &c.snaps {
        env.assert_restores(snap, truth);
    }
}

/// A push into a repository whose file system fills up: the writes that
/// cannot be stored are answered with an error, the client's job fails,
/// nothing is committed, the partial is kept (a retry may resume it) until
/// `forget --partial` clears it, the repository verifies clean, and once
/// space is free a push works.
#[test]
fn receive_into_a_full_repository() {
    let mut env = Env::new();
    let fs = Tmpfs::new(&env, "small", "24m");
    env.repo = fs.path.join("repo");
    env.ok(&["init"]);
    let size: u64 = 32 << 20;
    let src = env.path("src.raw");
    std::fs::write(&src, random_bytes(21, size as usize)).unwrap();
    let push = |env: &Env| -> (std::process::Output, std::process::Output) {
        let sock = env.path("recv.sock");
        let _ = std::fs::remove_file(&sock);
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let mut child = env
            .cmd()
            .args([
                "receive",
                "--disk",
                "r",
                "--size",
                &size.to_string(),
                "--listen",
                &uri,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("listening"), "{line}");
        let client = common::qemu_img_write(&src, &uri);
        (client, child.wait_with_output().unwrap())
    };
    let (client, receive) = push(&env);
    assert!(!client.status.success(), "the client saw the write errors");
    assert_eq!(receive.status.code(), Some(1));
    let err = String::from_utf8_lossy(&receive.stderr);
    assert!(err.contains("nothing committed"), "{err}");
    assert!(env.snapshots().is_empty());
    env.ok(&["forget", "--partial", "r"]);
    gc_settled(&env);
    assert_eq!(verify(&env, &[]).0, 0);

    let (client, receive) = {
        // Room now: a 32 MiB tmpfs more.
        sh(
            "mount",
            &["-o", "remount,size=96m", fs.path.to_str().unwrap()],
        );
        push(&env)
    };
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    assert!(
        receive.status.success(),
        "{}",
        String::from_utf8_lossy(&receive.stderr)
    );
    env.assert_restores("r@latest", &src);
}
