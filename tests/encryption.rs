//! Encrypted repositories: no disk content or unkeyed hash of it in any
//! file, passphrases and keys, tampering detected, and `copy` between
//! plain and encrypted repositories.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const MARKER: &[u8] = b"STRATA-SECRET-MARKER-7f3a91";

/// An encrypted repository whose commands read the passphrase from a file
/// (with a trailing newline, which is ignored).
fn encrypted_env(pass: &str) -> Env {
    let mut env = Env::new();
    std::fs::remove_dir_all(&env.repo).unwrap();
    let pw = env.path("pw");
    std::fs::write(&pw, format!("{pass}\n")).unwrap();
    env.vars
        .push(("STRATA_PASSWORD_FILE".into(), pw.to_str().unwrap().into()));
    let out = env.ok(&["init", "--encrypt"]);
    assert!(out.contains("encrypted"), "{out}");
    env
}

/// A disk whose every 64 KiB block starts with the marker, followed by
/// random bytes: no block is zero, and each 1 MiB cell is one chunk.
fn marked_disk(env: &Env, name: &str, size: usize, seed: u64) -> PathBuf {
    let mut data = random_bytes(seed, size);
    for block in data.chunks_mut(65536) {
        block[..MARKER.len()].copy_from_slice(MARKER);
    }
    let path = env.path(name);
    std::fs::write(&path, data).unwrap();
    path
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    files
        .into_iter()
        .filter(|f| {
            std::fs::read(f)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .collect()
}

fn chunk_names(repo: &Path) -> Vec<String> {
    let mut files = Vec::new();
    files_under(&repo.join("chunks"), &mut files);
    files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().to_string())
        .collect()
}

/// Marker data written into a disk is in a plain control repository's
/// files and in none of an encrypted one's, in any form; no chunk name is
/// the unkeyed hash of the data; dedup, restore and the mount work.
#[test]
fn nothing_in_clear_and_names_keyed() {
    let plain = Env::new();
    let env = encrypted_env("correct horse");
    let disk = marked_disk(&env, "d.raw", 4 << 20, 1);
    let image = std::fs::read(&disk).unwrap();
    let unkeyed: Vec<String> = image
        .chunks(1 << 20)
        .map(|c| blake3::hash(c).to_hex().to_string())
        .collect();

    plain.backup(&["--disk", "d", disk.to_str().unwrap()]);
    assert!(!files_holding(&plain.repo, MARKER).is_empty(), "control");
    assert!(unkeyed.iter().all(|h| chunk_names(&plain.repo).contains(h)));

    let full = env.backup(&["--disk", "d", disk.to_str().unwrap()]);
    // An incremental (its own chunk) and a second full (deduplicated).
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(MARKER, 2 << 20).unwrap();
    let json = env.path("c.json");
    std::fs::write(
        &json,
        r#"{"extents": [{"offset": 2097152, "length": 65536}]}"#,
    )
    .unwrap();
    let inc = env.incremental("d", &disk, &json);
    let again = env.ok(&["backup", "--disk", "e", disk.to_str().unwrap()]);
    let names = chunk_names(&env.repo);
    assert!(
        !unkeyed.iter().any(|h| names.contains(h)),
        "names are keyed"
    );
    assert_eq!(files_holding(&env.repo, MARKER), Vec::<PathBuf>::new());
    assert_eq!(
        files_holding(&env.repo, &MARKER[..12]),
        Vec::<PathBuf>::new()
    );
    let snaps = env.snapshots();
    let stored = |r: &str| {
        snaps
            .iter()
            .find(|s| s["ref"] == r)
            .map(|s| s["stored_bytes"].as_u64().unwrap())
            .unwrap()
    };
    assert!(again.contains("e@"), "{again}");
    assert_eq!(
        snaps.iter().find(|s| s["disk"] == "e").unwrap()["stored_bytes"],
        0
    );
    assert!(stored(&full) > 4 << 20 && stored(&inc) < 1 << 20);

    env.assert_restores(&inc, &disk);
    assert!(env.ok(&["verify"]).starts_with("ok"));
    let m = Mounted::new(&env, "mnt");
    assert!(std::fs::read(m.image(&inc)).unwrap() == std::fs::read(&disk).unwrap());
}

/// No passphrase on a non-terminal, or a wrong one: exit 1, a message that
/// says which, nothing changed.
#[test]
fn wrong_and_missing_passphrases() {
    let mut env = encrypted_env("right");
    let disk = marked_disk(&env, "d.raw", 1 << 20, 2);
    env.backup(&["--disk", "d", disk.to_str().unwrap()]);
    let before = env.repo_state();
    let good = env.vars.clone();

    env.vars.clear();
    for args in [
        &["snapshots"][..],
        &["backup", "--disk", "d", disk.to_str().unwrap()],
    ] {
        let err = env.fails(args);
        assert!(err.contains("no passphrase given"), "{err}");
    }
    let bad = env.path("bad");
    std::fs::write(&bad, "wrong\n").unwrap();
    env.vars = vec![("STRATA_PASSWORD_FILE".into(), bad.to_str().unwrap().into())];
    for args in [
        &["verify"][..],
        &["backup", "--disk", "d", disk.to_str().unwrap()],
    ] {
        let err = env.fails(args);
        assert!(
            err.contains("wrong passphrase") && !err.contains("damage"),
            "{err}"
        );
    }
    env.vars = vec![("STRATA_PASSWORD".into(), "right".into())];
    assert_eq!(env.snapshots().len(), 1);
    assert_eq!(env.repo_state(), before);
    env.vars = good;
    assert!(env.ok(&["verify"]).starts_with("ok"));
}

fn key_list(env: &Env) -> Vec<Value> {
    serde_json::from_str(&env.ok(&["key", "list", "--json"])).unwrap()
}

/// Several passphrases open one repository; a removed or replaced one opens
/// nothing; the last key stays.
#[test]
fn keys_added_changed_and_removed() {
    let mut env = encrypted_env("first");
    let disk = marked_disk(&env, "d.raw", 1 << 20, 3);
    let snap = env.backup(&["--disk", "d", disk.to_str().unwrap()]);
    let keys = key_list(&env);
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["current"], true);
    let first_id = keys[0]["id"].as_str().unwrap().to_string();

    let second = env.path("second");
    std::fs::write(&second, "second\n").unwrap();
    env.ok(&[
        "key",
        "add",
        "--new-password-file",
        second.to_str().unwrap(),
    ]);
    let use_file = |env: &mut Env, f: &Path| {
        env.vars = vec![("STRATA_PASSWORD_FILE".into(), f.to_str().unwrap().into())];
    };
    use_file(&mut env, &second);
    let keys = key_list(&env);
    assert_eq!(keys.len(), 2);
    let second_id = keys.iter().find(|k| k["current"] == true).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(second_id, first_id);
    env.assert_restores(&snap, &disk);

    // passwd replaces the key that opened the repository.
    let third = env.path("third");
    std::fs::write(&third, "third").unwrap();
    env.ok(&[
        "key",
        "passwd",
        "--new-password-file",
        third.to_str().unwrap(),
    ]);
    assert!(env.fails(&["snapshots"]).contains("wrong passphrase"));
    use_file(&mut env, &third);
    assert_eq!(key_list(&env).len(), 2);

    // The first passphrase still opens; remove its key, and it stops.
    env.ok(&["key", "remove", &first_id]);
    let first = env.path("pw");
    use_file(&mut env, &first);
    assert!(env.fails(&["snapshots"]).contains("wrong passphrase"));
    use_file(&mut env, &third);
    let last = key_list(&env)[0]["id"].as_str().unwrap().to_string();
    assert!(env.fails(&["key", "remove", &last]).contains("only key"));
    env.assert_restores(&snap, &disk);
}

fn verify_json(env: &Env) -> (i32, Value) {
    let out = env.run(&["verify", "--json"]);
    (
        out.status.code().unwrap(),
        serde_json::from_slice(&out.stdout).unwrap(),
    )
}

/// Altered, truncated and swapped chunks and manifests are damage: verify
/// names the snapshots and ranges, reads fail, never wrong bytes.
#[test]
fn tampering_is_detected() {
    let env = encrypted_env("pass");
    let disk = marked_disk(&env, "d.raw", 2 << 20, 4);
    let a = env.backup(&["--disk", "a", disk.to_str().unwrap()]);
    let other = marked_disk(&env, "o.raw", 1 << 20, 6);
    let b = env.backup(&["--disk", "b", other.to_str().unwrap()]);
    let chunk_path = |name: &str| env.repo.join("chunks").join(&name[..2]).join(name);
    let names = chunk_names(&env.repo);
    assert_eq!(names.len(), 3);

    // 1. a flipped byte in a sealed body
    let victim = chunk_path(&names[0]);
    let mut body = std::fs::read(&victim).unwrap();
    body[40] ^= 1;
    std::fs::write(&victim, &body).unwrap();
    let (code, report) = verify_json(&env);
    assert_eq!(code, 1);
    assert_eq!(report["damaged"].as_array().unwrap().len(), 1, "{report}");
    assert!(report["damaged"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("authentication failed"));
    let hit = report["damaged"][0]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let out = env.path("out.raw");
    let run = env.run(&["restore", &hit, out.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(1));
    // Heal it: the same data backed up again.
    env.backup(&["--disk", "a", disk.to_str().unwrap()]);
    env.backup(&["--disk", "b", other.to_str().unwrap()]);
    assert_eq!(verify_json(&env).0, 0);

    // 2. two chunk files swapped
    let names = chunk_names(&env.repo);
    let (x, y) = (chunk_path(&names[0]), chunk_path(&names[1]));
    let (bx, by) = (std::fs::read(&x).unwrap(), std::fs::read(&y).unwrap());
    std::fs::write(&x, &by).unwrap();
    std::fs::write(&y, &bx).unwrap();
    let (code, report) = verify_json(&env);
    assert_eq!(code, 1);
    let reasons = report["damaged"].to_string();
    assert!(
        reasons.contains(&names[0]) && reasons.contains(&names[1]),
        "{reasons}"
    );
    std::fs::write(&x, &bx).unwrap();
    std::fs::write(&y, &by).unwrap();
    // 3. truncated
    std::fs::write(&x, &bx[..bx.len() / 2]).unwrap();
    assert_eq!(verify_json(&env).0, 1);
    std::fs::write(&x, &bx).unwrap();
    assert_eq!(verify_json(&env).0, 0);

    // 4. a manifest altered, then one copied over another
    let manifest = |snap: &str| {
        let (disk, id) = snap.split_once('@').unwrap();
        env.repo
            .join("manifests")
            .join(disk)
            .join(format!("{id}.json"))
    };
    let original = std::fs::read_to_string(manifest(&a)).unwrap();
    let pos = original.rfind("\"sealed\": \"").unwrap() + 20;
    let mut altered = original.clone().into_bytes();
    altered[pos] = if altered[pos] == b'0' { b'1' } else { b'0' };
    std::fs::write(manifest(&a), &altered).unwrap();
    let (code, report) = verify_json(&env);
    assert_eq!(code, 1);
    assert_eq!(report["damaged"][0]["snapshot"], a);
    assert!(report["damaged"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("manifest"));
    std::fs::write(manifest(&a), &original).unwrap();
    std::fs::copy(manifest(&b), manifest(&a)).unwrap();
    let (code, report) = verify_json(&env);
    assert_eq!(code, 1);
    assert_eq!(report["damaged"][0]["snapshot"], a, "{report}");
    std::fs::write(manifest(&a), &original).unwrap();
    assert_eq!(verify_json(&env).0, 0);
}

fn copy_json(env: &Env, args: &[&str]) -> Value {
    let mut full = vec!["copy", "--json"];
    full.extend_from_slice(args);
    serde_json::from_str(&env.ok(&full)).unwrap()
}

/// plain -> encrypted -> another encrypted (other passphrase) -> plain:
/// images exact at every step, a second copy sends nothing, a killed copy
/// leaves nothing half-visible and a rerun finishes, and a conflicting
/// snapshot is refused, never overwritten.
#[test]
fn copy_between_plain_and_encrypted() {
    let plain = Env::new();
    let chain = raw_chain(&plain, "vm/a", 8 << 20, 2);
    let enc1 = encrypted_env("one");
    let enc2 = encrypted_env("two");
    let back = Env::new();
    let pw = |env: &Env| env.path("pw").to_str().unwrap().to_string();

    let r = copy_json(
        &plain,
        &[
            "--to",
            enc1.repo.to_str().unwrap(),
            "--to-password-file",
            &pw(&enc1),
        ],
    );
    assert_eq!(r["copied"].as_array().unwrap().len(), 3, "{r}");
    let r = copy_json(
        &plain,
        &[
            "--to",
            enc1.repo.to_str().unwrap(),
            "--to-password-file",
            &pw(&enc1),
        ],
    );
    assert_eq!(
        (
            r["copied"].as_array().unwrap().len(),
            r["chunks_sent"].as_u64()
        ),
        (0, Some(0))
    );
    assert_eq!(r["skipped"].as_array().unwrap().len(), 3);

    // Only the newest named: its ancestors come along.
    let newest = &chain[2].0;
    let r = copy_json(
        &enc1,
        &[
            newest,
            "--to",
            enc2.repo.to_str().unwrap(),
            "--to-password-file",
            &pw(&enc2),
        ],
    );
    assert_eq!(r["copied"].as_array().unwrap().len(), 3, "{r}");
    let killed = Paused::start(
        &enc2,
        &["copy", "--to", back.repo.to_str().unwrap()],
        "copy:chunks-sent",
    );
    killed.kill();
    assert!(back.snapshots().is_empty(), "nothing half-visible");
    let r = copy_json(&enc2, &["--to", back.repo.to_str().unwrap()]);
    assert_eq!(r["copied"].as_array().unwrap().len(), 3);
    for env in [&enc1, &enc2, &back] {
        assert!(env.ok(&["verify"]).starts_with("ok"));
        for (snap, truth) in &chain {
            env.assert_restores(snap, truth);
        }
    }
    let meta = |env: &Env| -> Vec<Value> {
        env.snapshots()
            .into_iter()
            .map(|s| serde_json::json!([s["ref"], s["time"], s["kind"], s["parent"], s["label"]]))
            .collect()
    };
    assert_eq!(meta(&back), meta(&plain));

    // A snapshot of the same DISK@ID with other data: refused.
    let other = Env::new();
    let src = other.path("x.raw");
    std::fs::write(&src, random_bytes(77, 1 << 20)).unwrap();
    let (disk, id) = chain[0].0.split_once('@').unwrap();
    let time = plain.snapshots()[0]["time"].as_str().unwrap().to_string();
    let made = other.backup(&["--disk", disk, src.to_str().unwrap(), "--time", &time]);
    assert_eq!(made, format!("{disk}@{id}"));
    let before = other.repo_state();
    let err = plain.fails(&["copy", "--to", other.repo.to_str().unwrap()]);
    assert!(
        err.contains("exists in the target with a different"),
        "{err}"
    );
    assert_eq!(other.repo_state(), before);
    other.assert_restores(&made, &src);
    // A target that does not exist is named, not created.
    let missing = plain.path("nowhere");
    let err = plain.fails(&["copy", "--to", missing.to_str().unwrap()]);
    assert!(err.contains("does not exist") && !missing.exists(), "{err}");
}
