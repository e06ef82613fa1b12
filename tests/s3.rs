//! Repositories on S3-compatible object storage, against a real SeaweedFS
//! server started by each test (`common::s3`): every command, two hosts
//! (two cache directories) at once, a deleted cache, kills, gc beside a
//! backup on another host, a server stopped mid-backup, bad credentials,
//! leases, and `copy` between directories and buckets.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::s3::{unique_bucket, SeaweedFs};
use common::{assert_same, random_bytes, raw_chain, Env, Mounted, Paused};

/// A repository `s3://BUCKET/repo` as one host sees it: its own cache
/// directory. `init` is run by the caller.
fn host(server: &SeaweedFs, bucket: &str, name: &str) -> Env {
    let dir = tempfile::Builder::new()
        .prefix("strata-s3-host")
        .tempdir()
        .unwrap();
    let mut vars = server.vars(&format!("{bucket}/repo"));
    vars.push((
        "STRATA_CACHE_DIR".into(),
        dir.path()
            .join(format!("cache-{name}"))
            .display()
            .to_string(),
    ));
    Env {
        repo: PathBuf::from(format!("s3://{bucket}/repo")),
        dir,
        vars,
    }
}

fn new_repo(server: &SeaweedFs, name: &str) -> (String, Env) {
    let bucket = unique_bucket(name);
    let env = host(server, &bucket, "a");
    env.ok(&["init"]);
    (bucket, env)
}

/// `strata backup --disk DISK FILE`, stopped at `step`.
fn paused_backup(env: &Env, disk: &str, file: &Path, step: &str) -> Paused {
    Paused::start(
        env,
        &["backup", "--disk", disk, file.to_str().unwrap()],
        step,
    )
}

fn cache_of(env: &Env) -> PathBuf {
    PathBuf::from(
        &env.vars
            .iter()
            .find(|(k, _)| k == "STRATA_CACHE_DIR")
            .unwrap()
            .1,
    )
}

/// `len` random bytes, distinct for each seed (`random_bytes` treats a
/// seed and its odd neighbour alike).
fn write_random(path: &Path, seed: u64, len: usize) {
    std::fs::write(path, random_bytes(2 * seed + 1, len)).unwrap();
}

#[test]
fn every_command_works_on_a_bucket() {
    let server = SeaweedFs::start();
    let (bucket, env) = new_repo(&server, "every");
    // init made the bucket and refuses a prefix that holds a repository.
    assert!(!server.list(&bucket, "repo/config.json").is_empty());
    let err = env.fails(&["init"]);
    assert!(err.contains("already holds objects"), "{err}");

    let chain = raw_chain(&env, "vm/a", 8 << 20, 3);
    for (snap, truth) in &chain {
        env.assert_restores(snap, truth);
    }
    let listed = env.snapshots();
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[1]["kind"], "incremental");
    let map: serde_json::Value =
        serde_json::from_str(&env.ok(&["map", &chain[3].0, "--json"])).unwrap();
    assert!(!map["extents"].as_array().unwrap().is_empty());

    let verify: serde_json::Value = serde_json::from_str(&env.ok(&["verify", "--json"])).unwrap();
    assert_eq!(verify["ok"], true);
    assert_eq!(verify["checked_snapshots"], 4);
    let half: serde_json::Value =
        serde_json::from_str(&env.ok(&["verify", "--json", "--read-data-subset", "1/2"])).unwrap();
    assert!(half["checked_chunks"].as_u64() < verify["checked_chunks"].as_u64());

    {
        let m = Mounted::new(&env, "mnt");
        for (snap, truth) in &chain {
            assert_same(&m.image(snap), truth);
        }
    }

    env.ok(&["protect", &chain[1].0]);
    assert_eq!(env.snapshots()[1]["protected"], true);
    let err = env.fails(&["forget", &chain[1].0]);
    assert!(err.contains("protected"), "{err}");
    env.ok(&["unprotect", &chain[1].0]);
    env.ok(&["forget", &chain[1].0]);
    env.ok(&["prune", "--keep-last", "2"]);
    let left: Vec<String> = env
        .snapshots()
        .iter()
        .map(|s| s["ref"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, [chain[2].0.clone(), chain[3].0.clone()]);
    for (snap, truth) in &chain[2..] {
        env.assert_restores(snap, truth);
    }
    env.ok(&["gc"]);
    env.ok(&["repair", "--rebuild-catalog"]);
    assert_eq!(env.snapshots().len(), 2);
    let verify: serde_json::Value = serde_json::from_str(&env.ok(&["verify", "--json"])).unwrap();
    assert_eq!(verify["ok"], true);
    // Nothing is held any more.
    let locks: serde_json::Value = serde_json::from_str(&env.ok(&["locks", "--json"])).unwrap();
    assert_eq!(locks, serde_json::json!([]));
}

#[test]
fn two_hosts_share_one_repository() {
    let server = SeaweedFs::start();
    let (bucket, a) = new_repo(&server, "hosts");
    let b = host(&server, &bucket, "b");
    write_random(&a.path("a.raw"), 1, 3 << 20);
    write_random(&b.path("b.raw"), 2, 3 << 20);
    // Backups of different disks, side by side, from two hosts.
    let pa = paused_backup(&a, "vm/a", &a.path("a.raw"), "backup:captured");
    let pb = paused_backup(&b, "vm/b", &b.path("b.raw"), "backup:captured");
    assert!(pa.resume().status.success());
    assert!(pb.resume().status.success());
    // Each host lists both, by the next command.
    for env in [&a, &b] {
        let disks: Vec<String> = env
            .snapshots()
            .iter()
            .map(|s| s["disk"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(disks, ["vm/a", "vm/b"]);
    }
    a.assert_restores("vm/b@latest", &b.path("b.raw"));

    // A mount on host a shows what host b commits later, within 30 s.
    let m = Mounted::new(&a, "mnt");
    write_random(&b.path("c.raw"), 3, 1 << 20);
    let snap = b.backup(&["--disk", "vm/c", b.path("c.raw").to_str().unwrap()]);
    let image = m.image(&snap);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !image.exists() {
        assert!(
            Instant::now() < deadline,
            "{snap} did not appear in host a's mount"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_same(&image, &b.path("c.raw"));
}

/// The requests a command made, as `-vv` logs them (`s3 OP KEY: N ms`).
fn requests(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.split_once("] s3 ").map(|(_, r)| r.to_string()))
        .collect()
}

#[test]
fn a_writer_syncs_once_after_its_lease_and_reads_back_nothing_it_wrote() {
    let server = SeaweedFs::start();
    let (bucket, a) = new_repo(&server, "series");
    let chain = raw_chain(&a, "vm/a", 4 << 20, 1);
    // Host b's first command is an incremental: its catalog is empty until
    // the registration syncs it, after the lease, and the parent must come
    // from that sync.
    let b = host(&server, &bucket, "b");
    let state = a.path("vm_a.raw");
    std::fs::copy(&state, b.path("b.raw")).unwrap();
    let changes = b.path("c.json");
    std::fs::write(&changes, r#"{"extents": [{"offset": 0, "length": 65536}]}"#).unwrap();
    let out = b.run(&[
        "-vv",
        "backup",
        "--disk",
        "vm/a",
        b.path("b.raw").to_str().unwrap(),
        "--changes",
        changes.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made = requests(&out);
    let position = |what: &str| {
        made.iter()
            .position(|r| r.starts_with(what))
            .unwrap_or_else(|| panic!("no {what} in {made:#?}"))
    };
    assert!(position("PUT leases/") < position("GET leases/maintenance.json"));
    assert!(position("GET leases/maintenance.json") < position("LIST manifests/"));
    let lists = made.iter().filter(|r| r.starts_with("LIST manifests/:"));
    assert_eq!(lists.count(), 1, "{made:#?}");
    assert!(
        !made.iter().any(|r| r.starts_with("LIST leases/")),
        "{made:#?}"
    );
    let snaps = b.snapshots();
    assert_eq!(snaps.len(), 3);
    assert_eq!(snaps[2]["parent"], snaps[1]["id"]);
    b.assert_restores(
        &format!("vm/a@{}", snaps[2]["id"].as_str().unwrap()),
        &state,
    );
    // Host b knows the version of the manifest it wrote: its next command
    // reads no manifest back. Host a reads the new one, once.
    let again = requests(&b.run(&["-vv", "snapshots"]));
    assert!(
        !again.iter().any(|r| r.starts_with("GET manifests/")),
        "{again:#?}"
    );
    let fetched = |env: &Env| {
        requests(&env.run(&["-vv", "snapshots"]))
            .iter()
            .filter(|r| r.starts_with("GET manifests/"))
            .count()
    };
    assert_eq!(fetched(&a), 1);
    assert_eq!(fetched(&a), 0);
    a.assert_restores(&chain[1].0, &chain[1].1);
}

#[test]
fn a_deleted_cache_loses_nothing() {
    let server = SeaweedFs::start();
    let (_, env) = new_repo(&server, "cache");
    let chain = raw_chain(&env, "vm/a", 4 << 20, 2);
    let before = env.snapshots();
    {
        // Fill the chunk cache through a mount, then throw it all away.
        let m = Mounted::new(&env, "mnt");
        assert_same(&m.image(&chain[2].0), &chain[2].1);
    }
    std::fs::remove_dir_all(cache_of(&env)).unwrap();
    assert_eq!(env.snapshots(), before);
    for (snap, truth) in &chain {
        env.assert_restores(snap, truth);
    }
    // And the next incremental follows the chain the bucket holds.
    let next = raw_chain(&env, "vm/b", 4 << 20, 1);
    env.assert_restores(&next[1].0, &next[1].1);
}

#[test]
fn the_chunk_cache_stays_within_its_size() {
    let server = SeaweedFs::start();
    let (_, mut env) = new_repo(&server, "bound");
    write_random(&env.path("a.raw"), 9, 24 << 20);
    let snap = env.backup(&["--disk", "vm/a", env.path("a.raw").to_str().unwrap()]);
    env.vars.push(("STRATA_CACHE_SIZE".into(), "8M".into()));
    {
        let m = Mounted::new(&env, "mnt");
        assert_same(&m.image(&snap), &env.path("a.raw"));
    }
    let used: u64 = walk(&cache_of(&env))
        .iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "cache"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(used > 0, "the mount cached nothing");
    assert!(used <= 8 << 20, "the chunk cache holds {used} bytes");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn wrong_credentials_endpoint_and_bucket_fail_clearly() {
    let server = SeaweedFs::start();
    let (bucket, env) = new_repo(&server, "creds");
    write_random(&env.path("a.raw"), 4, 1 << 20);
    env.backup(&["--disk", "vm/a", env.path("a.raw").to_str().unwrap()]);
    let objects = server.list(&bucket, "");

    let with = |k: &str, v: &str| {
        let mut e = host(&server, &bucket, "x");
        e.vars.retain(|(name, _)| name != k);
        e.vars.push((k.into(), v.into()));
        e
    };
    let started = Instant::now();
    let bad = with("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let err = bad.fails(&[
        "backup",
        "--disk",
        "vm/b",
        env.path("a.raw").to_str().unwrap(),
    ]);
    assert!(
        err.contains(&server.endpoint()) && err.contains("SignatureDoesNotMatch"),
        "{err}"
    );
    let err = with("AWS_ACCESS_KEY_ID", "nobody").fails(&["snapshots"]);
    assert!(
        err.contains(&server.endpoint()) && err.contains("InvalidAccessKeyId"),
        "{err}"
    );

    let missing = host(&server, &unique_bucket("nobucket"), "x");
    let err = missing.fails(&["snapshots"]);
    assert!(err.contains("NoSuchBucket"), "{err}");

    let down = with("AWS_ENDPOINT_URL", "http://127.0.0.1:9");
    let err = down.fails(&["snapshots"]);
    assert!(err.contains("http://127.0.0.1:9"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    // Nothing was written by any of them.
    assert_eq!(server.list(&bucket, ""), objects);
}

#[test]
fn a_killed_backup_leaves_nothing_visible_and_gc_takes_its_chunks() {
    let server = SeaweedFs::start();
    let (bucket, env) = new_repo(&server, "killed");
    write_random(&env.path("a.raw"), 5, 4 << 20);
    let s0 = env.backup(&["--disk", "vm/a", env.path("a.raw").to_str().unwrap()]);
    let chunks_before = server.list(&bucket, "repo/packs/").len();
    write_random(&env.path("b.raw"), 6, 4 << 20);
    for step in [
        "backup:capturing",
        "backup:captured",
        "commit:manifest-written",
    ] {
        let p = Paused::start(
            &env,
            &[
                "backup",
                "--disk",
                "vm/b",
                env.path("b.raw").to_str().unwrap(),
            ],
            step,
        );
        p.kill();
        let listed = env.snapshots();
        // The manifest is the commit: killed after writing it, the
        // snapshot exists whole; before, nothing of it is visible.
        if step == "commit:manifest-written" {
            assert_eq!(listed.len(), 2, "{listed:?}");
            env.assert_restores("vm/b@latest", &env.path("b.raw"));
            env.ok(&["forget", "vm/b@latest"]);
        } else {
            assert_eq!(listed.len(), 1, "after a kill at {step}: {listed:?}");
        }
    }
    // The dead backups' leases are stale (same host, process gone): gc
    // does not wait for them, and takes what they uploaded.
    let report = env.ok(&["gc"]);
    assert!(!report.contains("left for the next gc"), "{report}");
    assert_eq!(server.list(&bucket, "repo/packs/").len(), chunks_before);
    env.assert_restores(&s0, &env.path("a.raw"));
}

#[test]
fn gc_on_one_host_leaves_a_running_backup_on_another_alone() {
    let server = SeaweedFs::start();
    let (bucket, a) = new_repo(&server, "gcrace");
    let b = host(&server, &bucket, "b");
    write_random(&a.path("old.raw"), 7, 2 << 20);
    a.backup(&["--disk", "vm/old", a.path("old.raw").to_str().unwrap()]);
    a.ok(&["forget", "vm/old@latest"]); // its chunks are garbage now
                                        // Host b's backup reuses the garbage chunks and uploads new ones.
    let mut data = random_bytes(2 * 7 + 1, 2 << 20);
    data.extend(random_bytes(2 * 8 + 1, 2 << 20));
    std::fs::write(b.path("new.raw"), &data).unwrap();
    let running = paused_backup(&b, "vm/new", &b.path("new.raw"), "backup:captured");
    let locks: serde_json::Value = serde_json::from_str(&a.ok(&["locks", "--json"])).unwrap();
    assert!(
        locks
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["kind"] == "backup"),
        "{locks}"
    );
    let report = a.ok(&["gc"]);
    assert!(report.contains("left for the next gc"), "{report}");
    let out = running.resume();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.assert_restores("vm/new@latest", &b.path("new.raw"));
    // With nobody writing, gc deletes, and what is kept still reads.
    a.ok(&["gc"]);
    let verify: serde_json::Value = serde_json::from_str(&a.ok(&["verify", "--json"])).unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
}

#[test]
fn a_backup_whose_server_stops_fails_and_commits_nothing() {
    let mut server = SeaweedFs::start();
    let (_, env) = new_repo(&server, "down");
    write_random(&env.path("a.raw"), 10, 2 << 20);
    let s0 = env.backup(&["--disk", "vm/a", env.path("a.raw").to_str().unwrap()]);
    write_random(&env.path("b.raw"), 11, 8 << 20);
    let p = paused_backup(&env, "vm/b", &env.path("b.raw"), "backup:capturing");
    server.stop();
    let started = Instant::now();
    let out = p.resume();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    server.restart();
    let listed = env.snapshots();
    assert_eq!(listed.len(), 1, "{listed:?}");
    env.assert_restores(&s0, &env.path("a.raw"));
    let s1 = env.backup(&["--disk", "vm/b", env.path("b.raw").to_str().unwrap()]);
    env.assert_restores(&s1, &env.path("b.raw"));
}

#[test]
fn stale_leases_are_listed_and_removed() {
    let server = SeaweedFs::start();
    let (_, env) = new_repo(&server, "leases");
    write_random(&env.path("a.raw"), 12, 1 << 20);
    let snap = env.backup(&["--disk", "vm/a", env.path("a.raw").to_str().unwrap()]);
    let m = Mounted::new(&env, "mnt");
    let locks: serde_json::Value = serde_json::from_str(&env.ok(&["locks", "--json"])).unwrap();
    let mount = &locks.as_array().unwrap()[0];
    assert_eq!(mount["kind"], "mount");
    assert_eq!(
        mount["mountpoint"],
        m.mnt.canonicalize().unwrap().to_str().unwrap()
    );
    assert!(mount["expires"].is_string() && mount["pid"].as_u64().unwrap() > 0);
    assert_same(&m.image(&snap), &env.path("a.raw"));

    paused_backup(&env, "vm/b", &env.path("a.raw"), "backup:capturing").kill();
    let locks: serde_json::Value = serde_json::from_str(&env.ok(&["locks", "--json"])).unwrap();
    let stale: Vec<_> = locks
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["stale"] == true)
        .collect();
    assert_eq!(stale.len(), 1, "{locks}");
    assert_eq!(stale[0]["kind"], "backup");
    env.ok(&["unlock", "--stale"]);
    let locks: serde_json::Value = serde_json::from_str(&env.ok(&["locks", "--json"])).unwrap();
    assert_eq!(locks.as_array().unwrap().len(), 1, "{locks}");
    assert_eq!(locks[0]["kind"], "mount");
}

#[test]
fn an_encrypted_repository_on_a_bucket() {
    let server = SeaweedFs::start();
    let bucket = unique_bucket("enc");
    let mut env = host(&server, &bucket, "a");
    std::fs::write(env.path("pass"), "correct horse\n").unwrap();
    env.vars.push((
        "STRATA_PASSWORD_FILE".into(),
        env.path("pass").display().to_string(),
    ));
    env.ok(&["init", "--encrypt"]);
    let chain = raw_chain(&env, "vm/a", 4 << 20, 2);
    for (snap, truth) in &chain {
        env.assert_restores(snap, truth);
    }
    // What is in the bucket holds no data in clear.
    let sample = &random_bytes(7, 64)[..];
    for key in server.list(&bucket, "repo/packs/") {
        let body = server.get(&bucket, &key).unwrap();
        assert!(
            !body.windows(sample.len()).any(|w| w == sample),
            "{key} holds data in clear"
        );
    }
    std::fs::write(env.path("pass"), "wrong\n").unwrap();
    let err = env.fails(&["snapshots"]);
    assert!(err.contains("wrong passphrase"), "{err}");
}

#[test]
fn copy_between_directories_and_buckets() {
    let server = SeaweedFs::start();
    let mut local = Env::new();
    // The S3 endpoint and credentials, for the target.
    local.vars = server.vars("unused");
    local.vars.retain(|(k, _)| k != "STRATA_REPO");
    let chain = raw_chain(&local, "vm/a", 4 << 20, 3);
    let (bucket, remote) = new_repo(&server, "copy");
    let s3 = format!("s3://{bucket}/repo");
    let copy = |from: &Env, to: &str| -> serde_json::Value {
        serde_json::from_str(&from.ok(&["copy", "--to", to, "--json"])).unwrap()
    };
    // Directory to bucket, all of it; again: nothing.
    let first = copy(&local, &s3);
    assert_eq!(first["copied"].as_array().unwrap().len(), 4);
    assert!(first["chunks_sent"].as_u64().unwrap() > 0);
    let again = copy(&local, &s3);
    assert_eq!(again["copied"].as_array().unwrap().len(), 0);
    assert_eq!(again["chunks_sent"], 0);
    for (snap, truth) in &chain {
        remote.assert_restores(snap, truth);
    }
    assert_eq!(
        remote
            .snapshots()
            .iter()
            .map(|s| s["time"].clone())
            .collect::<Vec<_>>(),
        local
            .snapshots()
            .iter()
            .map(|s| s["time"].clone())
            .collect::<Vec<_>>()
    );

    // Bucket to bucket, killed after its first snapshot became visible,
    // then finished by a rerun.
    let (bucket2, remote2) = new_repo(&server, "copy2");
    let s3b = format!("s3://{bucket2}/repo");
    Paused::start(&remote, &["copy", "--to", &s3b], "import:manifest-written").kill();
    assert!(remote2.snapshots().len() <= 1);
    let rest = copy(&remote, &s3b);
    assert_eq!(remote2.snapshots().len(), 4, "{rest}");
    for (snap, truth) in &chain {
        remote2.assert_restores(snap, truth);
    }

    // Bucket to a new directory.
    let mut back = Env::new();
    back.vars = local.vars.clone();
    copy(&remote2, back.repo.to_str().unwrap());
    for (snap, truth) in &chain {
        back.assert_restores(snap, truth);
    }

    // A different image under the same DISK@ID in the target is refused.
    let mut other = Env::new();
    other.vars = local.vars.clone();
    std::fs::write(other.path("x.raw"), random_bytes(200, 1 << 20)).unwrap();
    other.backup(&["--disk", "vm/z", other.path("x.raw").to_str().unwrap()]);
    copy(&other, &s3b);
    std::fs::write(other.path("x.raw"), random_bytes(202, 1 << 20)).unwrap();
    let mut conflict = Env::new();
    conflict.vars = local.vars.clone();
    let id = other.snapshots()[0]["id"].as_str().unwrap().to_string();
    conflict.backup(&[
        "--disk",
        "vm/z",
        other.path("x.raw").to_str().unwrap(),
        "--time",
        other.snapshots()[0]["time"].as_str().unwrap(),
    ]);
    assert_eq!(conflict.snapshots()[0]["id"].as_str().unwrap(), id);
    let err = conflict.fails(&["copy", "--to", &s3b]);
    assert!(err.contains(&format!("vm/z@{id}")), "{err}");
    remote2.assert_restores(&format!("vm/z@{id}"), &{
        let p = other.path("x0.raw");
        std::fs::write(&p, random_bytes(200, 1 << 20)).unwrap();
        p
    });
}

/// An NBD pull (qemu-nbd, full then bitmap incremental) and a push into
/// `receive` (qemu-img writing to it), both into a bucket.
#[test]
fn nbd_pull_and_push_into_a_bucket() {
    use common::{sh, Qcow};
    use std::io::BufRead;
    let server = SeaweedFs::start();
    let (_, env) = new_repo(&server, "nbd");
    let disk = Qcow::create(env.path("d.qcow2"), 16 << 20);
    disk.add_bitmap("b1");
    disk.io(&["write -P 0x11 0 4M", "write -z 8M 1M"]);
    let t0 = disk.truth(&env.path("t0.raw"));
    let sock = env.path("qnbd.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let serve = || {
        let args = [
            "-r",
            "-f",
            "qcow2",
            "-B",
            "b1",
            "--fork",
            "--persistent",
            "--socket",
        ];
        let mut args: Vec<&str> = args.to_vec();
        args.extend([sock.to_str().unwrap(), disk.p()]);
        sh("qemu-nbd", &args)
    };
    let stop = || common::stop_matching(&format!("qemu-nbd.*{}", sock.display()));
    serve();
    let full = env.run(&["backup", "--disk", "q", &uri]);
    stop();
    assert!(
        full.status.success(),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );
    disk.clear_bitmap("b1");
    disk.io(&["write -P 0x22 1M 64k", "discard 2M 1M"]);
    let t1 = disk.truth(&env.path("t1.raw"));
    serve();
    let inc = env.run(&["backup", "--disk", "q", &uri, "--bitmap", "b1"]);
    stop();
    assert!(
        inc.status.success(),
        "{}",
        String::from_utf8_lossy(&inc.stderr)
    );
    let snaps = env.snapshots();
    assert_eq!(snaps[1]["kind"], "incremental");
    env.assert_restores(snaps[0]["ref"].as_str().unwrap(), &t0);
    env.assert_restores("q@latest", &t1);

    // Push: qemu-img writes the image into receive, which commits on the
    // clean disconnect.
    let rsock = env.path("recv.sock");
    let listen = format!("nbd+unix:///?socket={}", rsock.display());
    let mut child = env
        .cmd()
        .args([
            "receive",
            "--disk",
            "pushed",
            "--size",
            &(16u64 << 20).to_string(),
        ])
        .args(["--listen", &listen])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening"), "{line}");
    let client = common::qemu_img_write(&t1, &listen);
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.assert_restores("pushed@latest", &t1);
}

/// A forget on one host rewrites a child another host committed; gc on
/// that other host then marks the child as it is now, and deletes nothing
/// it needs.
#[test]
fn a_forget_on_one_host_is_seen_by_gc_on_another() {
    let server = SeaweedFs::start();
    let (bucket, a) = new_repo(&server, "forgetgc");
    let chain = raw_chain(&a, "vm/a", 4 << 20, 2);
    let b = host(&server, &bucket, "b");
    b.ok(&["forget", &chain[0].0, &chain[1].0]);
    // Host a committed chain[2] itself and has not looked since.
    a.ok(&["gc"]);
    a.assert_restores(&chain[2].0, &chain[2].1);
    let verify: serde_json::Value = serde_json::from_str(&a.ok(&["verify", "--json"])).unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(a.snapshots().len(), 1);
}

/// A manifest that cannot be read stops gc (which marks from the catalog)
/// before it deletes anything; other commands go on without it.
#[test]
fn gc_refuses_to_run_past_a_damaged_manifest() {
    let server = SeaweedFs::start();
    let (bucket, env) = new_repo(&server, "badmanifest");
    let chain = raw_chain(&env, "vm/a", 4 << 20, 1);
    write_random(&env.path("x.raw"), 30, 1 << 20);
    let x = env.backup(&["--disk", "vm/x", env.path("x.raw").to_str().unwrap()]);
    env.ok(&["forget", &x]); // garbage that gc would delete
    let (disk, id) = chain[1].0.split_once('@').unwrap();
    server.put(
        &bucket,
        &format!("repo/manifests/{disk}/{id}.json"),
        b"{not json",
    );
    let chunks = server.list(&bucket, "repo/packs/");
    let fresh = host(&server, &bucket, "fresh");
    let err = fresh.fails(&["gc"]);
    assert!(err.contains("cannot be brought up to date"), "{err}");
    assert_eq!(server.list(&bucket, "repo/packs/"), chunks);
    // Listing and restoring what is readable still work.
    assert_eq!(fresh.snapshots().len(), 1);
    fresh.assert_restores(&chain[0].0, &chain[0].1);
}

/// A chunk damaged inside a pack: verify on another host finds it and
/// records it (naming the pack), the next backup on a host that never saw
/// the damage stores the chunk anew, and gc repacks the damaged copy
/// away, while a host whose index still names the old pack reads on.
#[test]
fn damage_in_a_pack_is_found_healed_and_repacked_away() {
    let server = SeaweedFs::start();
    let (bucket, a) = new_repo(&server, "packdamage");
    let file = a.path("a.raw");
    write_random(&file, 40, 4 << 20);
    let s0 = a.backup(&["--disk", "vm/a", file.to_str().unwrap()]);
    let packs = server.list(&bucket, "repo/packs/");
    assert_eq!(packs.len(), 1, "{packs:?}");
    let b = host(&server, &bucket, "b");
    b.assert_restores(&s0, &file); // b's index now names the pack

    let mut body = server.get(&bucket, &packs[0]).unwrap();
    body[100] ^= 0x55; // inside the first chunk
    server.put(&bucket, &packs[0], &body);
    let c = host(&server, &bucket, "c");
    let run = c.run(&["verify", "--json"]);
    assert_eq!(run.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["damaged"][0]["snapshot"], s0.as_str(), "{report}");
    let records = server.list(&bucket, "repo/damaged/");
    assert_eq!(records.len(), 1);
    let named = String::from_utf8(server.get(&bucket, &records[0]).unwrap()).unwrap();
    assert!(packs[0].ends_with(named.trim()), "{named} vs {packs:?}");

    // Host a never read the damaged copy; its backup stores the chunk anew.
    a.backup(&["--disk", "vm/a", file.to_str().unwrap()]);
    let run = c.run(&["verify", "--json"]);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stdout)
    );
    c.assert_restores(&s0, &file);

    let report = a.ok(&["gc"]);
    assert!(report.contains("repacked 1 packs"), "{report}");
    assert!(report.contains("1 damaged-chunk records"), "{report}");
    let now = server.list(&bucket, "repo/packs/");
    assert!(!now.contains(&packs[0]), "{now:?}");
    assert!(server.list(&bucket, "repo/damaged/").is_empty());
    // b's index still names the deleted pack: it looks again.
    b.assert_restores(&s0, &file);
    let run = b.run(&["verify"]);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// gc rewrites a pack that is mostly garbage, keeping what is referenced,
/// and deletes one that is all garbage.
#[test]
fn gc_repacks_what_is_partly_garbage() {
    let server = SeaweedFs::start();
    let (bucket, env) = new_repo(&server, "repack");
    let x = env.path("x.raw");
    write_random(&x, 50, 8 << 20);
    let first = env.backup(&["--disk", "vm/x", x.to_str().unwrap()]);
    // Half of the disk changes; the second full shares the other half.
    let mut data = std::fs::read(&x).unwrap();
    data[..4 << 20].copy_from_slice(&random_bytes(1001, 4 << 20));
    std::fs::write(&x, &data).unwrap();
    let second = env.backup(&["--disk", "vm/x", x.to_str().unwrap()]);
    let y = env.path("y.raw");
    write_random(&y, 51, 2 << 20);
    let gone = env.backup(&["--disk", "vm/y", y.to_str().unwrap()]);
    let before = server.list(&bucket, "repo/packs/");
    env.ok(&["forget", &first, &gone]);
    let report = env.ok(&["gc"]);
    assert!(report.contains("repacked 1 packs"), "{report}");
    assert!(report.contains("deleted 6 chunks"), "{report}");
    let after = server.list(&bucket, "repo/packs/");
    assert_eq!(after.len(), before.len() - 1, "{before:?} -> {after:?}");
    env.assert_restores(&second, &x);
    let fresh = host(&server, &bucket, "fresh");
    fresh.assert_restores(&second, &x);
    assert!(fresh.ok(&["verify"]).contains("ok"));
}

/// Small packs (the last of each backup) are merged by gc into one, and
/// every snapshot still restores, also on a host whose index named the
/// old packs; a second gc changes nothing.
#[test]
fn gc_merges_small_packs_and_loses_nothing() {
    let server = SeaweedFs::start();
    let (bucket, env) = new_repo(&server, "merge");
    let mut snaps = Vec::new();
    for i in 0..5u64 {
        let file = env.path(&format!("d{i}.raw"));
        write_random(&file, 60 + i, 1 << 20);
        let snap = env.backup(&["--disk", &format!("vm/d{i}"), file.to_str().unwrap()]);
        snaps.push((snap, file));
    }
    let reader = host(&server, &bucket, "reader");
    reader.assert_restores(&snaps[0].0, &snaps[0].1);
    assert_eq!(server.list(&bucket, "repo/packs/").len(), 5);
    let report = env.ok(&["gc"]);
    assert!(report.contains("repacked 5 packs"), "{report}");
    assert_eq!(server.list(&bucket, "repo/packs/").len(), 1);
    for (snap, file) in &snaps {
        reader.assert_restores(snap, file);
    }
    let again = env.ok(&["gc"]);
    assert!(!again.contains("repacked"), "{again}");
    assert_eq!(server.list(&bucket, "repo/packs/").len(), 1);
    let fresh = host(&server, &bucket, "fresh");
    for (snap, file) in &snaps {
        fresh.assert_restores(snap, file);
    }
}
