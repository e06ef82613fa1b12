//! The units in contrib/systemd: they pass `systemd-analyze verify`, and
//! their command lines, expanded the way systemd does, work as written.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{random_bytes, Env};

const INSTALLED: &str = "/usr/local/bin/strata";

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd")
}

/// A unit file, with the installed binary's path pointing at the test build.
fn unit(name: &str) -> String {
    std::fs::read_to_string(units_dir().join(name))
        .unwrap()
        .replace(INSTALLED, env!("CARGO_BIN_EXE_strata"))
}

/// The values of `key=` lines in a unit.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// The unit's `Environment=` settings, overridden by `file` (an
/// EnvironmentFile's contents), as systemd combines them.
fn environment(unit: &str, file: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for v in values(unit, "Environment") {
        let v = v.trim_matches('"');
        let (k, val) = v.split_once('=').unwrap();
        env.insert(k.to_string(), val.to_string());
    }
    for (k, v) in file {
        env.insert(k.to_string(), v.to_string());
    }
    env
}

/// Split a command line into words as systemd does (quotes group), then
/// expand each: `%%` and `%i`, `$$`, `${VAR}` (one word) and a whole-word
/// `$VAR` (split on whitespace).
fn expand(line: &str, env: &BTreeMap<String, String>, instance: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (word, quoted) in split_words(line) {
        let word = word
            .replace("%%", "\u{0}")
            .replace("%i", instance)
            .replace('\u{0}', "%");
        if let Some(var) = word.strip_prefix('$').filter(|v| !quoted && is_name(v)) {
            out.extend(
                env.get(var)
                    .into_iter()
                    .flat_map(|v| v.split_whitespace())
                    .map(String::from),
            );
            continue;
        }
        out.push(expand_braces(&word, env));
    }
    out
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn expand_braces(word: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = word;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("$$") {
            out.push('$');
            rest = r;
        } else if let Some((var, r)) = rest.strip_prefix("${").and_then(|r| r.split_once('}')) {
            out.push_str(env.get(var).map_or("", String::as_str));
            rest = r;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Words of a command line, and whether each was quoted.
fn split_words(line: &str) -> Vec<(String, bool)> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        let mut word = String::new();
        if first == '\'' || first == '"' {
            chars.next();
            for c in chars.by_ref() {
                if c == first {
                    break;
                }
                word.push(c);
            }
            words.push((word, true));
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
            words.push((word, false));
        }
    }
    words
}

/// Run one command line of a unit, the way systemd would, and insist it works.
fn run_line(line: &str, env: &BTreeMap<String, String>, instance: &str) -> String {
    let argv = expand(line, env, instance);
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(units_dir()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        std::fs::write(dir.path().join(&name), unit(&name)).unwrap();
    }
    // Templates are checked through an instance of them.
    let names = [
        "strata-backup@vm1-vda.service",
        "strata-backup@vm1-vda.timer",
        "strata-verify.service",
        "strata-verify.timer",
        "strata-prune.service",
        "strata-prune.timer",
        "strata-mount.service",
    ];
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(names.iter().map(|n| dir.path().join(n)))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

#[test]
fn backup_verify_and_prune_units_run_as_written() {
    let env = Env::new();
    let disk = env.path("disk.raw");
    std::fs::write(&disk, random_bytes(11, 8 << 20)).unwrap();
    let repo = env.repo.to_str().unwrap();

    // /etc/strata/vm1-vda.env of strata-backup@vm1-vda.service
    let backup = unit("strata-backup@.service");
    // Two backups an hour apart on one day (fixed times: never across midnight).
    for hour in ["01", "02"] {
        let opts = format!("--label nightly --time 2026-01-01T{hour}:00:00Z");
        let file = [
            ("STRATA_REPO", repo),
            ("DISK", "vm1/vda"),
            ("SOURCE", disk.to_str().unwrap()),
            ("BACKUP_OPTS", opts.as_str()),
        ];
        let vars = environment(&backup, &file);
        run_line(values(&backup, "ExecStart")[0], &vars, "vm1-vda");
    }
    let snaps = env.snapshots();
    assert_eq!(snaps.len(), 2);
    assert!(snaps.iter().all(|s| s["label"] == "nightly"));
    assert_eq!(snaps[1]["kind"], "full");

    // /etc/strata/strata.env of the repository-wide units
    let verify = unit("strata-verify.service");
    let vars = environment(&verify, &[("STRATA_REPO", repo)]);
    run_line(values(&verify, "ExecStart")[0], &vars, "");

    let prune = unit("strata-prune.service");
    let vars = environment(&prune, &[("STRATA_REPO", repo)]);
    let out = run_line(values(&prune, "ExecStart")[0], &vars, "");
    // Two backups on one day: --keep-daily keeps the newer.
    assert!(out.contains("remove"), "{out}");
    let left = env.snapshots();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["id"], snaps[1]["id"]);
}

/// A `strata mount --foreground` started for the test: killed and its mount
/// cleared on drop, whatever happened.
struct MountProcess {
    child: Child,
    mnt: PathBuf,
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

fn is_mounted(mnt: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = mnt.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(p))
}

/// Wait for the child to exit, up to a deadline; its status.
fn wait_with_deadline(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the mount did not stop in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start the mount unit's ExecStart with `NOTIFY_SOCKET` set to `address`
/// (a path, or `@name`), bound by `socket`; check READY=1 comes only once
/// the mount answers, then stop it as systemd does.
fn mount_unit_round(env: &Env, address: &str, socket: &UnixDatagram, snap: &str) {
    let mnt = env.path("mnt");
    let service = unit("strata-mount.service");
    let mut vars = environment(
        &service,
        &[
            ("STRATA_REPO", env.repo.to_str().unwrap()),
            ("MOUNTPOINT", mnt.to_str().unwrap()),
        ],
    );
    run_line(values(&service, "ExecStartPre")[0], &vars, "");
    assert!(mnt.is_dir());
    vars.insert("NOTIFY_SOCKET".into(), address.into());
    let argv = expand(values(&service, "ExecStart")[0], &vars, "");
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(&vars)
        .spawn()
        .unwrap();
    let mut proc = MountProcess {
        child,
        mnt: mnt.clone(),
    };

    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("no READY=1 within 30 s");
    // At this moment, before anything else happens, the mount must answer.
    assert!(is_mounted(&mnt), "READY=1 came before the mount existed");
    let parent_dev = std::fs::metadata(env.dir.path()).unwrap().dev();
    assert_ne!(std::fs::metadata(&mnt).unwrap().dev(), parent_dev);
    let (disk, id) = snap.rsplit_once('@').unwrap();
    assert!(mnt.join(disk).join(format!("{id}.raw")).is_file());
    assert_eq!(&buf[..n], b"READY=1");

    // systemctl stop: SIGTERM to the main process.
    // SAFETY: kill on the pid of our own child.
    unsafe { libc::kill(proc.child.id() as i32, libc::SIGTERM) };
    let status = wait_with_deadline(&mut proc.child, Duration::from_secs(30));
    assert!(status.success(), "mount exited with {status}");
    assert!(!is_mounted(&mnt), "the mount outlived its process");
}

#[test]
fn mount_unit_notifies_ready_once_the_mount_answers() {
    let env = Env::new();
    let disk = env.path("disk.raw");
    std::fs::write(&disk, random_bytes(5, 4 << 20)).unwrap();
    let snap = env.backup(&["--disk", "vm1/vda", disk.to_str().unwrap()]);

    let path = env.path("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    mount_unit_round(&env, path.to_str().unwrap(), &socket, &snap);

    // systemd may also hand out a socket in the abstract namespace.
    use std::os::linux::net::SocketAddrExt;
    let name = format!("strata-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    mount_unit_round(&env, &format!("@{name}"), &socket, &snap);
}
