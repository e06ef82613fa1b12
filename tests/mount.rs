//! The FUSE mount, read with cp, dd, qemu-img and raw syscalls.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;

use common::{allocated, assert_same, qemu_chain, sh, wait_exit, Env, Mounted, Qcow};

fn snapshot_map(env: &Env, snap: &str) -> Vec<(u64, u64, String)> {
    let doc: serde_json::Value = serde_json::from_str(&env.ok(&["map", "--json", snap])).unwrap();
    doc["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every snapshot of a QEMU-made chain reads back exactly through the mount,
/// with cp --sparse=always (which stays sparse), dd and qemu-img compare.
#[test]
fn mounted_images_equal_their_truths() {
    let env = Env::new();
    let chain = qemu_chain(&env, "vm1/vda", 4);
    let m = Mounted::new(&env, "mnt");
    for (i, (snap, truth)) in chain.iter().enumerate() {
        let image = m.image(snap);
        let copy = env.path(&format!("cp{i}.raw"));
        sh(
            "cp",
            &[
                "--sparse=always",
                image.to_str().unwrap(),
                copy.to_str().unwrap(),
            ],
        );
        assert_same(&copy, truth);
        assert!(
            allocated(&copy) <= allocated(truth) + (1 << 20),
            "cp copy of {snap} is not sparse: {} vs {}",
            allocated(&copy),
            allocated(truth)
        );
        let dd = env.path(&format!("dd{i}.raw"));
        sh(
            "dd",
            &[
                &format!("if={}", image.display()),
                &format!("of={}", dd.display()),
                "bs=1M",
                "status=none",
            ],
        );
        assert_same(&dd, truth);
        sh(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "raw",
                "-F",
                "raw",
                image.to_str().unwrap(),
                truth.to_str().unwrap(),
            ],
        );
        // st_blocks counts stored data, not the virtual size.
        let data: u64 = snapshot_map(&env, snap)
            .iter()
            .filter(|e| e.2 == "data")
            .map(|e| e.1)
            .sum();
        assert_eq!(allocated(&image), data.div_ceil(512) * 512, "{snap}");
        assert_eq!(std::fs::metadata(&image).unwrap().len(), (64 << 20) + 4608);
        // The .json is the snapshot's own extent JSON.
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(image.with_extension("json")).unwrap()).unwrap();
        let own: serde_json::Value =
            serde_json::from_str(&env.ok(&["map", "--own", "--json", snap])).unwrap();
        assert_eq!(json, own);
        std::fs::remove_file(copy).unwrap();
        std::fs::remove_file(dd).unwrap();
    }
    let latest = std::fs::read_link(m.mnt.join("vm1/vda/latest.raw")).unwrap();
    let newest = chain
        .last()
        .unwrap()
        .0
        .rsplit_once('@')
        .unwrap()
        .1
        .to_string();
    assert_eq!(latest, Path::new(&format!("{newest}.raw")));
}

/// Data ranges by SEEK_DATA/SEEK_HOLE on the mounted file.
fn seek_data_ranges(path: &Path) -> Vec<(u64, u64)> {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::ENXIO)
            );
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE {hole} after SEEK_DATA {data}");
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    out
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// SEEK_DATA/SEEK_HOLE agree with `strata map`; random 4 KiB preads and four
/// concurrent whole-image readers see exactly the truth.
#[test]
fn seeks_random_reads_and_concurrent_readers() {
    let env = Env::new();
    let chain = qemu_chain(&env, "db", 3);
    let m = Mounted::new(&env, "mnt");
    for (snap, _) in &chain {
        let want: Vec<(u64, u64)> = snapshot_map(&env, snap)
            .into_iter()
            .filter(|e| e.2 == "data")
            .map(|e| (e.0, e.1))
            .collect();
        assert_eq!(seek_data_ranges(&m.image(snap)), want, "{snap}");
    }

    let (snap, truth) = chain.last().unwrap();
    let image = File::open(m.image(snap)).unwrap();
    let truth_file = File::open(truth).unwrap();
    let size = truth_file.metadata().unwrap().len();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
    for _ in 0..1000 {
        let off = rng.next() % (size - 4096);
        image.read_exact_at(&mut a, off).unwrap();
        truth_file.read_exact_at(&mut b, off).unwrap();
        assert!(a == b, "4 KiB at {off} differs");
    }

    std::thread::scope(|s| {
        for (snap, truth) in chain.iter().take(4) {
            let path = m.image(snap);
            s.spawn(move || {
                let (img, tru) = (File::open(&path).unwrap(), File::open(truth).unwrap());
                let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
                let mut off = 0;
                while off < size {
                    let n = (size - off).min(1 << 20) as usize;
                    img.read_exact_at(&mut x[..n], off).unwrap();
                    tru.read_exact_at(&mut y[..n], off).unwrap();
                    assert!(x[..n] == y[..n], "{snap}: MiB at {off} differs");
                    off += n as u64;
                }
            });
        }
    });
}

/// Instant recovery: a qcow2 overlay on a mounted image can be written and
/// read while the repository stays untouched.
#[test]
fn instant_recovery_overlay() {
    let env = Env::new();
    let chain = qemu_chain(&env, "vm2", 1);
    let (snap, truth) = chain.last().unwrap();
    let before = env.repo_state();
    let m = Mounted::new(&env, "mnt");
    let overlay = Qcow::overlay(env.path("overlay.qcow2"), &m.image(snap), "raw").path;
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xee 1M 64k",
            overlay.to_str().unwrap(),
        ],
    );
    let got = env.path("overlay.raw");
    sh(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            overlay.to_str().unwrap(),
            got.to_str().unwrap(),
        ],
    );
    let want = env.path("want.raw");
    std::fs::copy(truth, &want).unwrap();
    File::options()
        .write(true)
        .open(&want)
        .unwrap()
        .write_all_at(&[0xee; 65536], 1 << 20)
        .unwrap();
    assert_same(&got, &want);
    drop(m);
    assert_eq!(env.repo_state(), before);
}

/// Unmount with a file open, kill -9 and remount, odd paths, and a backup
/// that lands while mounted.
#[test]
fn mount_lifecycle() {
    let env = Env::new();
    let chain = qemu_chain(&env, "vm3/sda", 1);
    let (snap, truth) = chain[0].clone();
    let truth_bytes = std::fs::read(&truth).unwrap();

    // Unmount while a reader holds a file open: it is detached, the reader
    // keeps reading correct data, and the server ends when it closes.
    let m = Mounted::new(&env, "mnt");
    let open = File::open(m.image(&snap)).unwrap();
    let out = env.ok(&["umount", m.mnt.to_str().unwrap()]);
    assert!(out.contains("detached"), "{out}");
    assert!(!m.is_mounted());
    let mut buf = vec![0u8; 1 << 20];
    open.read_exact_at(&mut buf, 40 << 20).unwrap();
    assert!(buf[..] == truth_bytes[40 << 20..41 << 20]);
    drop(open);
    wait_exit(m.pid);
    drop(m);

    // kill -9 leaves a stale mount: reported with its fix, which works.
    let m = Mounted::new(&env, "mnt");
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(m.pid, libc::SIGKILL) };
    wait_exit(m.pid);
    let err = env.fails(&["mount", m.mnt.to_str().unwrap()]);
    assert!(
        err.contains("stale") && err.contains("strata umount"),
        "{err}"
    );
    env.ok(&["umount", m.mnt.to_str().unwrap()]);
    assert!(!m.is_mounted());
    drop(m);

    let m = Mounted::new(&env, "mnt");
    let err = env.fails(&["mount", m.mnt.to_str().unwrap()]);
    assert!(err.contains("already mounted"), "{err}");
    for odd in [
        "vm3/sda/20200101T000000Z-0001.raw",
        "vm3/nope/latest.raw",
        "nope",
        "vm3/sda/latest.json",
        "vm3/sda/../../x",
    ] {
        let e = File::open(m.mnt.join(odd)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{odd}");
    }
    assert!(File::options().write(true).open(m.image(&snap)).is_err());

    // A backup taken while mounted shows up, and latest.raw follows it.
    let disk = common::Qcow {
        path: env.path("vm3_sda.qcow2"),
    };
    disk.io(&["write -P 0x99 8M 1M"]);
    let t2 = disk.truth(&env.path("new.raw"));
    let new = env.backup(&["--disk", "vm3/sda", t2.to_str().unwrap()]);
    assert_same(&m.image(&new), &t2);
    let latest = m.mnt.join("vm3/sda/latest.raw");
    assert_same(&latest, &t2);
    let listing: Vec<String> = std::fs::read_dir(m.mnt.join("vm3/sda"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        listing
            .iter()
            .any(|n| new.ends_with(n.trim_end_matches(".raw"))),
        "{listing:?}"
    );
    let status = Command::new("ls").arg(&m.mnt).status().unwrap();
    assert!(status.success());
}

/// The pin files of the mount (`pins/<mount>/<inode>.map`).
fn pins(env: &Env) -> usize {
    let Ok(dirs) = std::fs::read_dir(env.repo.join("pins")) else {
        return 0;
    };
    dirs.flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .filter(|p| {
            p.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "map")
        })
        .count()
}

/// Wait for the mount to handle releases (sent after close returns).
fn pins_become(env: &Env, want: usize) {
    for _ in 0..200 {
        if pins(env) == want {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert_eq!(pins(env), want, "pin files");
}

/// An image's map is kept, and pinned, from its first open to its last
/// release, then dropped; a stat alone pins nothing; reopened, an image
/// is resolved again and reads the same.
#[test]
fn maps_live_from_first_open_to_last_release() {
    let env = Env::new();
    let chain = qemu_chain(&env, "p", 2);
    let m = Mounted::new(&env, "mnt");
    let (a, b) = (m.image(&chain[0].0), m.image(&chain[1].0));
    let truth = |i: usize| std::fs::read(&chain[i].1).unwrap();
    let read = |f: &File| {
        let mut buf = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    };
    // A stat resolves the map to count the data; only an open pins it.
    assert!(allocated(&b) > 0);
    pins_become(&env, 0);
    let a1 = File::open(&a).unwrap();
    let a2 = File::open(&a).unwrap();
    pins_become(&env, 1);
    let b1 = File::open(&b).unwrap();
    pins_become(&env, 2);
    assert!(read(&a1) == truth(0));
    drop(a1);
    // Another handle still has it open.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(pins(&env), 2);
    assert!(read(&a2) == truth(0));
    assert!(read(&b1) == truth(1));
    drop(a2);
    pins_become(&env, 1);
    drop(b1);
    pins_become(&env, 0);
    for _ in 0..2 {
        let f = File::open(&b).unwrap();
        pins_become(&env, 1);
        assert!(read(&f) == truth(1));
        assert!(!seek_data_ranges(&b).is_empty());
        drop(f);
        pins_become(&env, 0);
    }
}
