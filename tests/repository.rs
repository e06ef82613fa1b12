//! Backups from raw images and change lists, checked against real QEMU.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{allocated, assert_same, qemu_chain_with, sh, Env, Paused, Qcow};

const MIB: u64 = 1 << 20;

/// A full, five incrementals and a differential of a qcow2 written by
/// qemu-io, with change lists from `nbdinfo --map` over `qemu-nbd -B`.
#[test]
fn qemu_bitmap_chain_restores_byte_exact() {
    let env = Env::new();
    // The disk is not a multiple of the 64 KiB cluster: the last is partial.
    let rounds: Vec<Vec<String>> = [
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 5000 3000",
            "write -z 8M 512k",
        ][..],
        &["discard 0 256k", "write -P 0x21 67108000 5000"],
        &["write -P 0x31 2M 4M", "write -z 40M 1M"],
        &[
            "discard 2M 1M",
            "write -P 0x41 30M 64k",
            "write -P 0x42 41M 1",
        ],
        &["write -P 0x51 63M 1M", "write -z 0 64k"],
    ]
    .iter()
    .map(|r| r.iter().map(|c| c.to_string()).collect())
    .collect();
    let check = |_| vec!["--check-unchanged".to_string(), "20".to_string()];
    let snaps = qemu_chain_with(&env, "vm1/vda", &rounds, &check);
    let full = snaps[0].0.clone();

    let listed = env.snapshots();
    assert_eq!(listed.len(), 7);
    let kinds: Vec<&str> = listed.iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "incremental").count(), 5);
    assert_eq!(kinds.iter().filter(|k| **k == "differential").count(), 1);
    let differential = listed.iter().find(|s| s["kind"] == "differential").unwrap();
    assert_eq!(
        format!("vm1/vda@{}", differential["parent"].as_str().unwrap()),
        full
    );
    for (snap, truth) in &snaps {
        env.assert_restores(snap, truth);
    }
    env.assert_restores("vm1/vda@latest", &snaps.last().unwrap().1);

    // A dirty range that was discarded is recorded as zero, not skipped.
    let own: serde_json::Value =
        serde_json::from_str(&env.ok(&["map", "--own", "--json", &snaps[2].0])).unwrap();
    assert_eq!(own["kind"], "incremental");
    let first = &own["extents"][0];
    assert_eq!(first["offset"], 0);
    assert_eq!(first["type"], "zero");
    assert_eq!(own["format"], "strata-extents/1");
}

/// Grow, shrink and grow again between snapshots: each image has the size
/// and contents the disk had.
#[test]
fn disk_resized_between_snapshots() {
    let env = Env::new();
    let disk = Qcow::create(env.path("r.qcow2"), 32 * MIB);
    disk.add_bitmap("b");
    disk.io(&["write -P 0x01 0 32M"]);
    let t0 = disk.truth(&env.path("t0.raw"));
    let s0 = env.backup(&["--disk", "r", t0.to_str().unwrap()]);
    disk.clear_bitmap("b");
    let mut snaps = vec![(s0, t0)];

    let steps: [(&str, &[&str]); 3] = [
        ("+8M", &["write -P 0x02 36M 100k", "write -P 0x03 1M 1k"]),
        // Cluster-aligned: after an unaligned shrink, growing a qcow2 again
        // exposes stale bytes of the old partial cluster that no bitmap marks.
        ("20M", &["write -P 0x04 20970000 1520"]),
        ("40M", &["write -P 0x05 30M 64k"]),
    ];
    for (i, (size, cmds)) in steps.iter().enumerate() {
        sh("qemu-img", &["resize", "-q", "--shrink", disk.p(), size]);
        disk.io(cmds);
        let truth = disk.truth(&env.path(&format!("t{}.raw", i + 1)));
        let map = disk.dirty_map("b", &env.path(&format!("m{i}.json")));
        let snap = env.incremental("r", &truth, &map);
        disk.clear_bitmap("b");
        snaps.push((snap, truth));
    }
    let sizes: Vec<u64> = env
        .snapshots()
        .iter()
        .map(|s| s["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![32 * MIB, 40 * MIB, 20 * MIB, 40 * MIB]);
    for (snap, truth) in &snaps {
        env.assert_restores(snap, truth);
    }
}

/// `qemu-img map --output=json` of an overlay lists its own clusters.
#[test]
fn qemu_img_map_as_change_list() {
    let env = Env::new();
    let base = Qcow::create(env.path("base.qcow2"), 16 * MIB);
    base.io(&["write -P 0x61 0 8M"]);
    let t0 = base.truth(&env.path("t0.raw"));
    env.backup(&["--disk", "m", t0.to_str().unwrap()]);
    let top = Qcow::overlay(env.path("top.qcow2"), &base.path, "qcow2");

    top.io(&[
        "write -P 0x62 1M 64k",
        "write -z 4M 128k",
        "write -P 0x63 12M 3M",
    ]);
    let t1 = top.truth(&env.path("t1.raw"));
    let map = sh("qemu-img", &["map", "--output=json", top.p()]);
    std::fs::write(env.path("map.json"), map).unwrap();
    let snap = env.incremental("m", &t1, &env.path("map.json"));
    env.assert_restores(&snap, &t1);
    let own: serde_json::Value =
        serde_json::from_str(&env.ok(&["map", "--own", "--json", &snap])).unwrap();
    let covered: u64 = own["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(covered, 64 * 1024 + 128 * 1024 + 3 * MIB);
}

/// Bad input: a clear error, exit 1, and the repository exactly as before.
#[test]
fn bad_input_changes_nothing() {
    let env = Env::new();
    let disk = Qcow::create(env.path("d.qcow2"), 4 * MIB);
    disk.io(&["write -P 0x77 0 3M"]);
    let src = disk.truth(&env.path("src.raw"));
    let src = src.to_str().unwrap();

    // Before any full snapshot, an incremental has no parent.
    std::fs::write(
        env.path("ok.json"),
        r#"{"extents": [{"offset": 0, "length": 4096}]}"#,
    )
    .unwrap();
    let ok_json = env.path("ok.json");
    let err = env.fails(&[
        "backup",
        "--disk",
        "d",
        src,
        "--changes",
        ok_json.to_str().unwrap(),
    ]);
    assert!(err.contains("take a full backup first"), "{err}");

    env.backup(&["--disk", "d", src]);
    let before = (env.repo_state(), env.snapshots());

    let cases: &[(&str, &str)] = &[
        (
            "{\"extents\": [\n  {\"offset\": 0, \"length\": 4096},,\n]}",
            "line 2",
        ),
        (
            r#"{"extents": [{"offset": 0, "length": 8388608}]}"#,
            "out of bounds",
        ),
        (
            r#"{"extents": [{"offset": 0, "length": 8192}, {"offset": 4096, "length": 8192}]}"#,
            "extents[1]",
        ),
        (
            r#"{"extents": [{"offset": 65536, "length": 4096}, {"offset": 0, "length": 4096}]}"#,
            "extents[1]",
        ),
        (
            r#"{"size": 8388608, "extents": [{"offset": 0, "length": 4096}]}"#,
            "8388608",
        ),
        (
            r#"{"extents": [{"offset": 0, "length": 4096, "type": "hole"}]}"#,
            "hole",
        ),
        (r#"[1, 2]"#, "unrecognized"),
    ];
    for (i, (json, expect)) in cases.iter().enumerate() {
        let path = env.path(&format!("bad{i}.json"));
        std::fs::write(&path, json).unwrap();
        let err = env.fails(&[
            "backup",
            "--disk",
            "d",
            src,
            "--changes",
            path.to_str().unwrap(),
        ]);
        assert!(err.contains(expect), "case {i}: {err}");
        assert!(
            err.contains(path.to_str().unwrap()),
            "case {i} names the file: {err}"
        );
    }
    for bad in ["../x", "a//b", "/a", "a/b/c/d", "a\u{7}b"] {
        let err = env.fails(&["backup", "--disk", bad, src]);
        assert!(err.contains("invalid disk name"), "{bad:?}: {err}");
    }
    let err = env.fails(&[
        "backup",
        "--disk",
        "d",
        src,
        "--changes",
        ok_json.to_str().unwrap(),
        "--parent",
        "d@20200101T000000Z-0099",
    ]);
    assert!(err.contains("not found"), "{err}");
    let err = env.fails(&["backup", "--disk", "d", "/nonexistent/disk.raw"]);
    assert!(err.contains("/nonexistent/disk.raw"), "{err}");
    let short = env.path("short.raw");
    std::fs::write(&short, vec![1u8; 4096]).unwrap();
    std::fs::write(
        env.path("long.json"),
        r#"{"extents": [{"offset": 0, "length": 65536}]}"#,
    )
    .unwrap();
    let err = env.fails(&[
        "backup",
        "--disk",
        "d",
        short.to_str().unwrap(),
        "--changes",
        env.path("long.json").to_str().unwrap(),
    ]);
    assert!(err.contains("out of bounds"), "{err}");
    let err = env.fails(&[
        "restore",
        "d@20200101T000000Z-0001",
        env.path("x").to_str().unwrap(),
    ]);
    assert!(err.contains("not found"), "{err}");

    assert_eq!((env.repo_state(), env.snapshots()), before);

    // A repository refuses to be created in a non-empty directory.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["--repo", env.repo.to_str().unwrap(), "init"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Usage errors exit 2.
    assert_eq!(env.run(&["backup"]).status.code(), Some(2));
}

/// A change list that leaves out a changed range is caught by sampling
/// (here every unlisted block), names the range, and stores nothing: in a
/// chunk shared with a listed block (compared byte by byte), in a whole
/// chunk (compared by hash), in a hole of the parent (compared with zero)
/// and where the source has a hole and the parent data.
#[test]
fn lying_change_list_is_caught() {
    for (lie, at) in [
        ("write -P 0x02 2M 4k", 2 * MIB),
        ("write -P 0x03 4M 4k", 4 * MIB),
        ("write -P 0x04 6M 4k", 6 * MIB),
        // A hole in the source now, read as zeroes without reading it.
        ("write -z 4M 1M", 4 * MIB),
    ] {
        let env = Env::new();
        let disk = Qcow::create(env.path("d.qcow2"), 8 * MIB);
        disk.io(&["write -P 0x77 0 3M", "write -P 0x78 4M 1M"]);
        let src = disk.truth(&env.path("src.raw"));
        env.backup(&["--disk", "d", src.to_str().unwrap()]);
        // Two changes; the list names only the first.
        disk.io(&["write -P 0x01 0 64k", lie]);
        let src = disk.truth(&env.path("src2.raw"));
        let changes = env.path("lie.json");
        std::fs::write(&changes, r#"{"extents": [{"offset": 0, "length": 65536}]}"#).unwrap();
        let before = (env.repo_state(), env.snapshots());
        let args = [
            "backup",
            "--disk",
            "d",
            src.to_str().unwrap(),
            "--changes",
            changes.to_str().unwrap(),
        ];
        let err = env.fails(&[&args[..], &["--check-unchanged", "100"]].concat());
        assert!(
            err.contains(&format!("range {at}+65536")) && err.contains("bitmap is wrong"),
            "{lie}: {err}"
        );
        assert_eq!(before, (env.repo_state(), env.snapshots()));
        // With sampling off, the same list is taken at its word.
        env.backup(&[&args[1..], &["--check-unchanged", "0"]].concat());
    }
}

/// kill -9 at each step of a backup: earlier snapshots stay exact, nothing
/// half-made is listed, and the next backup works.
#[test]
fn killed_backup_leaves_repository_intact() {
    let env = Env::new();
    let disk = Qcow::create(env.path("d.qcow2"), 32 * MIB);
    disk.io(&["write -P 0x10 0 12M"]);
    let t0 = disk.truth(&env.path("t0.raw"));
    let s0 = env.backup(&["--disk", "k", t0.to_str().unwrap()]);
    disk.io(&["write -P 0x20 0 20M"]);
    let t1 = disk.truth(&env.path("t1.raw"));

    for step in [
        "backup:capturing",
        "backup:captured",
        "commit:manifest-written",
    ] {
        Paused::start(&env, &["backup", "--disk", "k", t1.to_str().unwrap()], step).kill();

        let listed = env.snapshots();
        assert_eq!(listed.len(), 1, "after kill at {step}: {listed:?}");
        env.assert_restores(&s0, &t0);
    }
    let s1 = env.backup(&["--disk", "k", t1.to_str().unwrap()]);
    env.assert_restores(&s1, &t1);
    env.assert_restores(&s0, &t0);
}

/// Identical data is stored once, across snapshots and disks, and the
/// repository is private to its owner.
#[test]
fn dedup_across_disks_and_private_files() {
    let env = Env::new();
    let disk = Qcow::create(env.path("d.qcow2"), 16 * MIB);
    disk.io(&["write -P 0x33 0 4M", "write -P 0x34 8M 4M"]);
    let t = disk.truth(&env.path("t.raw"));
    env.backup(&["--disk", "a", t.to_str().unwrap()]);
    env.backup(&["--disk", "b/c", t.to_str().unwrap()]);
    let listed = env.snapshots();
    assert!(listed[0]["stored_bytes"].as_u64().unwrap() > 0);
    assert_eq!(listed[1]["stored_bytes"], 0);
    assert_eq!(
        listed[1]["path"].as_str().unwrap(),
        format!("b/c/{}.raw", listed[1]["id"].as_str().unwrap())
    );
    env.assert_restores("b/c@latest", &t);

    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.repo), 0o700);
    for (path, _) in env.repo_state() {
        assert_eq!(
            mode(&path) & 0o077,
            0,
            "{} is readable by others",
            path.display()
        );
    }
    assert_same(&t, &t);
}

/// Restoring over an existing file, larger or smaller than the image and
/// full of other bytes, leaves exactly the image, as sparse as the truth.
#[test]
fn restore_replaces_an_existing_file() {
    let env = Env::new();
    let disk = Qcow::create(env.path("d.qcow2"), 8 * MIB);
    disk.io(&["write -P 0x31 1M 1M", "write -P 0x32 6M 64k"]);
    let truth = disk.truth(&env.path("t.raw"));
    let snap = env.backup(&["--disk", "d", truth.to_str().unwrap()]);
    let out = env.path("existing.raw");
    for old_size in [12 * MIB, 3 * MIB] {
        std::fs::write(&out, vec![0xEEu8; old_size as usize]).unwrap();
        env.ok(&["restore", &snap, out.to_str().unwrap()]);
        assert_same(&out, &truth);
        assert!(
            allocated(&out) <= allocated(&truth) + MIB,
            "{old_size}: not sparse"
        );
    }
}

/// A listing whose reader has gone (`strata snapshots | head`) ends
/// quietly by SIGPIPE, like other Unix tools, not with a panic.
#[test]
fn listing_into_a_closed_pipe_is_quiet() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let env = Env::new();
    let disk = Qcow::create(env.path("d.qcow2"), 4 * MIB);
    disk.io(&["write -P 0x41 0 64k"]);
    let truth = disk.truth(&env.path("t.raw"));
    env.backup(&["--disk", "d", truth.to_str().unwrap()]);
    for args in [&["snapshots"][..], &["map", "d@latest"]] {
        // A pipe whose read end is closed before strata starts, so that its
        // first write fails whatever the timing.
        let (read_end, write_end) = std::io::pipe().unwrap();
        drop(read_end);
        let out = env
            .cmd()
            .args(args)
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {stderr}"
        );
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// An incremental of scattered clusters in a repository whose chunks are
/// smaller than a group: groups stay within one chunk's buffer.
#[test]
fn small_chunk_size_incremental() {
    let env = Env::new();
    let config = env.repo.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["chunk_size"] = 65536.into();
    std::fs::write(&config, c.to_string()).unwrap();
    let disk = Qcow::create(env.path("d.qcow2"), 16 * MIB);
    disk.io(&["write -P 0x11 0 8M"]);
    let t0 = disk.truth(&env.path("t0.raw"));
    env.backup(&["--disk", "d", t0.to_str().unwrap()]);
    disk.io(&[
        "write -P 0x12 1M 64k",
        "write -P 0x13 5M 64k",
        "write -P 0x14 12M 64k",
    ]);
    let t1 = disk.truth(&env.path("t1.raw"));
    let changes = env.path("c.json");
    let extents: Vec<String> = [1, 5, 12]
        .iter()
        .map(|m| format!(r#"{{"offset": {}, "length": 65536}}"#, m * MIB))
        .collect();
    std::fs::write(
        &changes,
        format!(r#"{{"extents": [{}]}}"#, extents.join(",")),
    )
    .unwrap();
    let snap = env.incremental("d", &t1, &changes);
    env.assert_restores(&snap, &t1);
}
