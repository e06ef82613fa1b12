//! verify, forget, prune, gc and repair: retention over a QEMU chain,
//! located corruption, kill -9 at every step, concurrency, catalog rebuild.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::{manifest_chunks_json, qemu_chain_with, raw_chain, Env, Mounted, Paused};
use serde_json::Value;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap()
}

fn refs(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn listed(env: &Env) -> BTreeSet<String> {
    env.snapshots()
        .iter()
        .map(|s| s["ref"].as_str().unwrap().to_string())
        .collect()
}

/// Every listed snapshot restores to its truth.
fn assert_all_exact(env: &Env, chain: &[(String, PathBuf)]) {
    let now = listed(env);
    for (snap, truth) in chain.iter().filter(|(s, _)| now.contains(s)) {
        env.assert_restores(snap, truth);
    }
}

fn verify_ok(env: &Env) {
    let out = env.run(&["verify", "--json"]);
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["ok"], true, "{report}");
    assert!(out.status.success());
}

/// A full, ten incrementals and a differential spread over four months:
/// forgetting the base and a middle incremental, then pruning with several
/// policies, keeps every remaining image exact; the dry run predicts the run.
#[test]
fn forget_and_prune_keep_images_exact() {
    let env = Env::new();
    let start = chrono::DateTime::parse_from_rfc3339("2025-01-03T10:00:00Z").unwrap();
    let time_of = |k: usize| {
        vec![
            "--time".to_string(),
            (start + chrono::Duration::days(9 * k as i64)).to_rfc3339(),
        ]
    };
    let chain = qemu_chain_with(&env, "vm1/vda", &common::default_rounds(10), &time_of);
    assert_eq!(chain.len(), 12);

    // The base has two children (incremental 1 and the differential).
    env.ok(&["forget", &chain[0].0, &chain[6].0]);
    assert_eq!(listed(&env).len(), 10);
    assert_all_exact(&env, &chain);
    let kinds: Vec<Value> = env.snapshots().iter().map(|s| s["kind"].clone()).collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "full").count(),
        2,
        "{kinds:?}"
    );
    verify_ok(&env);

    for policy in [
        vec!["--keep-last", "3", "--keep-monthly", "2"],
        vec!["--keep-weekly", "2", "--keep-within", "20d"],
        vec!["--keep-yearly", "1"],
    ] {
        let mut dry = vec!["prune", "--dry-run", "--json"];
        dry.extend(&policy);
        let plan = json(&env.ok(&dry));
        let before = listed(&env);
        assert_eq!(before, listed(&env), "dry run changed nothing");
        let mut run = vec!["prune", "--json"];
        run.extend(&policy);
        let done = json(&env.ok(&run));
        assert_eq!(refs(&done["remove"]), refs(&plan["remove"]), "{policy:?}");
        assert_eq!(done["keep"], plan["keep"]);
        let after = listed(&env);
        let expect: BTreeSet<String> = before.difference(&refs(&plan["remove"])).cloned().collect();
        assert_eq!(after, expect);
        assert!(!after.is_empty());
        assert_all_exact(&env, &chain);
        verify_ok(&env);
    }
    assert_eq!(listed(&env).len(), 1);
    // The last prune dropped data: gc freed it.
    let err = env.fails(&["prune"]);
    assert!(err.contains("no retention rule"), "{err}");
}

/// Flip a byte in a chunk, truncate one, delete one, corrupt a manifest:
/// verify names exactly the damaged snapshots (those that no longer restore)
/// and the ranges; untouched snapshots still restore.
#[test]
fn verify_locates_corruption() {
    let env = Env::new();
    let chain = raw_chain(&env, "c", 16 << 20, 4);
    verify_ok(&env);
    let manifest = |snap: &str| -> Value {
        serde_json::json!({"chunks": manifest_chunks_json(&env.repo, snap)})
    };
    let chunk_path = |hash: &str| env.repo.join("chunks").join(&hash[..2]).join(hash);
    // Chunks that only the newest snapshot has: incremental 4's own data.
    let newest = manifest(&chain[4].0);
    let own = newest["chunks"].as_array().unwrap();
    let (victim, victim_range) = (
        own[0]["hash"].as_str().unwrap(),
        [own[0]["offset"].clone(), own[0]["length"].clone()],
    );
    // A chunk of the full that lies past every incremental's writes.
    let full = manifest(&chain[0].0);
    let base = full["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|c| c["offset"].as_u64().unwrap() >= 6 << 20)
        .unwrap();
    let base_hash = base["hash"].as_str().unwrap();

    let restorable = |env: &Env| -> BTreeSet<String> {
        chain
            .iter()
            .filter(|(s, _)| {
                env.run(&["restore", s, env.path("probe.raw").to_str().unwrap()])
                    .status
                    .success()
            })
            .map(|(s, _)| s.clone())
            .collect()
    };
    let damaged_set = |report: &Value| -> BTreeSet<String> {
        report["damaged"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["snapshot"].as_str().unwrap().to_string())
            .collect()
    };
    let all: BTreeSet<String> = chain.iter().map(|(s, _)| s.clone()).collect();

    // 1. a flipped byte in the newest snapshot's chunk
    let p = chunk_path(victim);
    let mut body = std::fs::read(&p).unwrap();
    let mid = body.len() / 2;
    body[mid] ^= 0x40;
    std::fs::write(&p, &body).unwrap();
    let out = env.run(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        damaged_set(&report),
        all.difference(&restorable(&env)).cloned().collect()
    );
    assert_eq!(damaged_set(&report), BTreeSet::from([chain[4].0.clone()]));
    assert_eq!(
        report["damaged"][0]["ranges"],
        serde_json::json!([victim_range])
    );
    assert!(report["damaged"][0]["reason"]
        .as_str()
        .unwrap()
        .contains(victim));
    // verify moved the chunk out of use: even --quick sees it now.
    assert!(!p.exists());
    assert_eq!(env.run(&["verify", "--quick"]).status.code(), Some(1));
    body[mid] ^= 0x40;
    std::fs::write(&p, &body).unwrap();
    verify_ok(&env);

    // 2. a truncated base chunk: every snapshot inherits it
    let p = chunk_path(base_hash);
    let body = std::fs::read(&p).unwrap();
    std::fs::write(&p, &body[..body.len() / 3]).unwrap();
    let out = env.run(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(damaged_set(&report), all);
    assert_eq!(restorable(&env), BTreeSet::new());
    for d in report["damaged"].as_array().unwrap() {
        assert_eq!(
            d["ranges"],
            serde_json::json!([[base["offset"], base["length"]]])
        );
    }
    std::fs::write(&p, &body).unwrap();

    // 3. a deleted chunk: --quick sees it too
    std::fs::remove_file(chunk_path(victim)).unwrap();
    let out = env.run(&["verify", "--quick", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(damaged_set(&report), BTreeSet::from([chain[4].0.clone()]));
    assert!(report["damaged"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("missing"));
    let text = String::from_utf8_lossy(&env.run(&["verify"]).stdout).to_string();
    assert!(text.contains(&format!("DAMAGED {}", chain[4].0)), "{text}");
    // Untouched snapshots still restore exactly.
    for (snap, truth) in &chain[..4] {
        env.assert_restores(snap, truth);
    }

    // 4. a corrupt manifest names only its own snapshot
    let (disk, id) = chain[2].0.split_once('@').unwrap();
    let mpath = env
        .repo
        .join("manifests")
        .join(disk)
        .join(format!("{id}.json"));
    std::fs::write(&mpath, b"{ not json").unwrap();
    let out = env.run(&["verify", &chain[1].0, &chain[2].0, &chain[3].0, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["checked_snapshots"], 3);
    assert_eq!(damaged_set(&report), BTreeSet::from([chain[2].0.clone()]));
    assert!(report["damaged"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("manifest"));
}

/// kill -9 at each step of prune and gc; afterwards verify passes and a
/// rerun completes.
#[test]
fn killed_prune_and_gc_recover() {
    for step in [
        "forget:children-rewritten",
        "forget:catalog-committed",
        "prune:forgotten",
        "gc:marked",
        "gc:trashed",
    ] {
        let env = Env::new();
        let chain = raw_chain(&env, "p", 8 << 20, 4);
        // gc spares what was written in the last instant; age everything so
        // that there is garbage for it to delete right away.
        common::sh(
            "find",
            &[
                env.repo.to_str().unwrap(),
                "-type",
                "f",
                "-exec",
                "touch",
                "-d",
                "1 hour ago",
                "{}",
                "+",
            ],
        );
        Paused::start(&env, &["prune", "--keep-last", "2"], step).kill();
        verify_ok(&env);
        assert_all_exact(&env, &chain);
        let second = json(&env.ok(&["prune", "--keep-last", "2", "--json"]));
        assert!(second["freed_bytes"].as_u64().is_some());
        assert_eq!(
            listed(&env),
            BTreeSet::from([chain[3].0.clone(), chain[4].0.clone()]),
            "{step}"
        );
        verify_ok(&env);
        assert_all_exact(&env, &chain);
        let leftovers: Vec<_> = env
            .repo_state()
            .into_iter()
            .filter(|(p, _)| {
                let n = p.to_string_lossy();
                n.ends_with(".trash") || n.contains(".tmp.")
            })
            .collect();
        assert!(leftovers.is_empty(), "{step}: {leftovers:?}");
        let orphan_manifests = walkdir_count(&env.repo.join("manifests"));
        assert_eq!(orphan_manifests, 2, "{step}");
    }
}

fn walkdir_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walkdir_count(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// gc beside a running backup keeps what it wrote; gc and prune run beside
/// a mount whose image is being read; a second prune fails clearly.
#[test]
fn concurrent_backup_mount_and_prune() {
    let env = Env::new();
    let chain = raw_chain(&env, "x", 8 << 20, 2);
    let src = env.path("new.raw");
    std::fs::write(&src, common::random_bytes(999, 4 << 20)).unwrap();

    let backup = Paused::start(
        &env,
        &["backup", "--disk", "y", src.to_str().unwrap()],
        "backup:captured",
    );
    env.ok(&["forget", &chain[0].0]);
    let gc = env.ok(&["gc"]);
    assert!(gc.contains("kept"), "{gc}");
    // Nothing the paused backup wrote may be gone: it commits and restores.
    let out = backup.resume();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.assert_restores("y@latest", &src);
    verify_ok(&env);

    {
        let m = Mounted::new(&env, "mnt");
        let image = m.image(&chain[2].0);
        let truth = std::fs::read(&chain[2].1).unwrap();
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                for _ in 0..3 {
                    assert!(std::fs::read(&image).unwrap() == truth);
                }
            });
            env.ok(&["gc"]);
            let out = json(&env.ok(&["prune", "--keep-last", "1", "--disk", "x", "--json"]));
            assert_eq!(out["remove"], serde_json::json!([chain[1].0]), "{out}");
            assert!(out["freed_bytes"].as_u64().is_some(), "{out}");
            reader.join().unwrap();
        });
        // The kept snapshot's file still reads exactly.
        assert!(std::fs::read(&image).unwrap() == truth);
    }
    env.ok(&["gc"]);
    verify_ok(&env);

    let first = Paused::start(&env, &["prune", "--keep-last", "1"], "prune:forgotten");
    let err = env.fails(&["prune", "--keep-last", "1"]);
    assert!(err.contains("is running"), "{err}");
    assert!(first.resume().status.success());
}

/// Delete the catalog and rebuild it from the manifests.
#[test]
fn rebuild_catalog_from_manifests() {
    let env = Env::new();
    let chain = raw_chain(&env, "r/s", 8 << 20, 3);
    env.ok(&["protect", &chain[1].0]);
    env.ok(&["forget", &chain[0].0]);
    let before = env.ok(&["snapshots", "--json"]);
    let verify_before = env.ok(&["verify", "--json"]);
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::remove_file(env.repo.join(f));
    }
    assert_eq!(env.snapshots().len(), 0);
    let err = env.fails(&["gc"]);
    assert!(err.contains("rebuild-catalog"), "{err}");
    let out = env.ok(&["repair", "--rebuild-catalog"]);
    assert!(out.contains("3 snapshots"), "{out}");
    assert_eq!(env.ok(&["snapshots", "--json"]), before);
    let after = env.run(&["verify", "--json"]);
    assert_eq!(String::from_utf8_lossy(&after.stdout), verify_before);
    assert_all_exact(&env, &chain);
}

/// Ids of the rows that store their resolved image map (keyframes).
fn keyframes(env: &Env) -> BTreeSet<String> {
    let conn = rusqlite::Connection::open(env.repo.join("catalog.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT disk || '@' || id FROM snapshots WHERE length(image_map) > 0")
        .unwrap();
    let ids = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<rusqlite::Result<BTreeSet<_>>>()
        .unwrap();
    ids
}

/// A chain longer than the keyframe interval: the 16th incremental
/// stores its image map, the others only their own. Forgetting that
/// keyframe, its child and middle snapshots, pruning, gc and a catalog
/// rebuild keep every remaining image exact at every depth.
#[test]
fn long_chain_keyframes_survive_forget_prune_and_rebuild() {
    let env = Env::new();
    let chain = raw_chain(&env, "long", 4 << 20, 20);
    assert_eq!(keyframes(&env), BTreeSet::from([chain[16].0.clone()]));
    assert_all_exact(&env, &chain);

    // The keyframe goes: its child stores the image instead.
    env.ok(&["forget", &chain[16].0]);
    assert_eq!(keyframes(&env), BTreeSet::from([chain[17].0.clone()]));
    for i in [17, 5, 11, 0] {
        env.ok(&["forget", &chain[i].0]);
    }
    assert_all_exact(&env, &chain);
    verify_ok(&env);
    env.ok(&["prune", "--keep-last", "6"]);
    assert_eq!(listed(&env).len(), 6);
    assert_all_exact(&env, &chain);
    verify_ok(&env);

    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::remove_file(env.repo.join(f));
    }
    env.ok(&["repair", "--rebuild-catalog"]);
    assert_eq!(listed(&env).len(), 6);
    assert_all_exact(&env, &chain);
    verify_ok(&env);
}
