//! `strata backup --domain` against a real libvirtd (started here, on its
//! own unix socket) and QEMU (TCG domains started paused: no guest OS;
//! the "guest" writes with qemu-io through the monitor). The truth of a
//! disk is `qemu-img convert -U` of its image after a flush.
//!
//! One libvirtd at a time can run on a machine (it owns /run/libvirt), so
//! the tests take turns through a lock; each starts its own daemon and
//! stops it, with every domain it defined, even when it fails.

#![cfg(feature = "libvirt")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{assert_same, sh, Env, Paused};

static ONE_DAEMON: Mutex<()> = Mutex::new(());

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// What QEMU run by libvirt as root needs on a machine without systemd,
/// cgroups or namespaces to spare. The qemu driver reads its config from
/// /etc/libvirt/qemu.conf only, so that is where it goes.
const QEMU_CONF: &str = "user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n\
    cgroup_controllers = [ ]\nnamespaces = [ ]\nstdio_handler = \"file\"\n";

struct Libvirtd {
    child: Child,
    dir: tempfile::TempDir,
    uri: String,
    domains: Mutex<Vec<String>>,
    _turn: MutexGuard<'static, ()>,
}

impl Libvirtd {
    fn start() -> Self {
        let turn = ONE_DAEMON.lock().unwrap_or_else(|p| p.into_inner());
        let conf = Path::new("/etc/libvirt/qemu.conf");
        if std::fs::read_to_string(conf).ok().as_deref() != Some(QEMU_CONF) {
            std::fs::write(conf, QEMU_CONF).expect("write /etc/libvirt/qemu.conf (run as root)");
        }
        let dir = tempfile::Builder::new()
            .prefix("strata-lv")
            .tempdir()
            .unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let cfg = dir.path().join("libvirtd.conf");
        std::fs::write(
            &cfg,
            format!(
                "unix_sock_dir = \"{}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n",
                run.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("libvirtd.log")).unwrap();
        let child = Command::new("libvirtd")
            .arg("--config")
            .arg(&cfg)
            .arg("--pid-file")
            .arg(dir.path().join("libvirtd.pid"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("libvirtd (scripts/install-deps.sh installs it)");
        let sock = run.join("libvirt-sock");
        let uri = format!("qemu+unix:///system?socket={}", sock.display());
        let lv = Libvirtd {
            child,
            dir,
            uri,
            domains: Mutex::new(Vec::new()),
            _turn: turn,
        };
        lv.wait_until("libvirtd answers", || {
            sock.exists()
                && Command::new("virsh")
                    .args(["-c", &lv.uri, "version"])
                    .output()
                    .is_ok_and(|o| o.status.success())
        });
        lv
    }

    fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn virsh(&self, args: &[&str]) -> String {
        let mut all = vec!["-q", "-c", &self.uri];
        all.extend_from_slice(args);
        sh("virsh", &all)
    }

    fn virsh_status(&self, args: &[&str]) -> bool {
        Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .output()
            .unwrap()
            .status
            .success()
    }

    /// A strata environment talking to this daemon.
    fn env(&self) -> Env {
        let mut env = Env::new();
        env.vars
            .push(("LIBVIRT_DEFAULT_URI".into(), self.uri.clone()));
        env
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for d in self
            .domains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = self.virsh_status(&["destroy", d]);
            for cp in Command::new("virsh")
                .args(["-q", "-c", &self.uri, "checkpoint-list", d, "--name"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim().is_empty())
            {
                let _ = self.virsh_status(&["checkpoint-delete", d, cp.trim(), "--metadata"]);
            }
            let _ = self.virsh_status(&["undefine", d]);
        }
        // SAFETY: a signal to the daemon this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(self.dir.path().join("libvirtd.log")) {
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!(
                    "libvirtd log (last lines, newest first):\n{}",
                    tail.join("\n")
                );
            }
        }
    }
}

/// A TCG domain with disks in `dir`.
struct Domain<'a> {
    lv: &'a Libvirtd,
    name: String,
    dir: PathBuf,
}

fn disk_xml(dir: &Path, target: &str, format: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='{format}'/>\
         <source file='{}'/><target dev='{target}' bus='virtio'/></disk>",
        image(dir, target, format).display()
    )
}

fn image(dir: &Path, target: &str, format: &str) -> PathBuf {
    dir.join(format!("{target}.{format}"))
}

impl<'a> Domain<'a> {
    /// Define a domain with these (target, format) disks; started paused
    /// unless `shut_off`.
    fn new(
        lv: &'a Libvirtd,
        env: &Env,
        name: &str,
        disks: &[(&str, &str)],
        shut_off: bool,
    ) -> Self {
        let dir = env.path("images");
        std::fs::create_dir_all(&dir).unwrap();
        let mut xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        );
        for (t, f) in disks {
            sh(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    f,
                    image(&dir, t, f).to_str().unwrap(),
                    &SIZE.to_string(),
                ],
            );
            xml += &disk_xml(&dir, t, f);
        }
        xml += "<disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>";
        xml += "</devices></domain>";
        let file = dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        lv.domains.lock().unwrap().push(name.to_string());
        lv.virsh(&["define", file.to_str().unwrap()]);
        if !shut_off {
            lv.virsh(&["start", "--paused", name]);
        }
        Domain {
            lv,
            name: name.to_string(),
            dir,
        }
    }

    fn running(&self) -> bool {
        self.lv.virsh(&["domstate", &self.name]).trim() == "paused"
    }

    /// The qdev path of a disk's device in the running domain.
    fn device(&self, target: &str) -> String {
        let xml = self.lv.virsh(&["dumpxml", &self.name]);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let disk = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .find(|d| {
                d.children()
                    .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target))
            })
            .unwrap_or_else(|| panic!("no disk {target}"));
        let alias = disk
            .children()
            .find(|c| c.has_tag_name("alias"))
            .and_then(|a| a.attribute("name"))
            .unwrap();
        format!("/machine/peripheral/{alias}/virtio-backend")
    }

    /// The guest writes (qemu-io commands), through QEMU when running,
    /// to the image directly when shut off; then flushes.
    fn io(&self, target: &str, format: &str, cmds: &[&str]) {
        if self.running() {
            let dev = self.device(target);
            for c in cmds.iter().chain(&["flush"]) {
                let out = self.lv.virsh(&[
                    "qemu-monitor-command",
                    &self.name,
                    "--hmp",
                    &format!("qemu-io -d {dev} \"{c}\""),
                ]);
                assert!(
                    !out.contains("rror") && !out.contains("onflict"),
                    "qemu-io {c}: {out}"
                );
            }
        } else {
            let mut args = vec!["-f", format];
            for c in cmds {
                args.extend(["-c", c]);
            }
            let img = image(&self.dir, target, format);
            args.push(img.to_str().unwrap());
            sh("qemu-io", &args);
        }
    }

    fn truth(&self, target: &str, format: &str, out: &Path) {
        let img = image(&self.dir, target, format);
        sh(
            "qemu-img",
            &[
                "convert",
                "-U",
                "-f",
                format,
                "-O",
                "raw",
                img.to_str().unwrap(),
                out.to_str().unwrap(),
            ],
        );
    }

    fn checkpoints(&self) -> Vec<String> {
        self.lv
            .virsh(&["checkpoint-list", &self.name, "--name"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The QEMU node name of a disk's format layer (for QMP in tests).
    fn node(&self, target: &str) -> String {
        let xml = self.lv.virsh(&["dumpxml", &self.name]);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let disk = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .find(|d| {
                d.children()
                    .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target))
            })
            .unwrap();
        let index = disk
            .children()
            .find(|c| c.has_tag_name("source"))
            .and_then(|s| s.attribute("index"))
            .unwrap();
        format!("libvirt-{index}-format")
    }
}

/// One domain run: its stdout and the snapshots it made (by disk).
struct RunOut {
    stdout: String,
    run: String,
    kinds: Vec<(String, String)>,
}

fn backup(env: &Env, args: &[&str]) -> RunOut {
    let mut all = vec!["backup"];
    all.extend_from_slice(args);
    let stdout = env.ok(&all);
    let run = stdout
        .lines()
        .find_map(|l| l.strip_prefix("run "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no run line in {stdout}"))
        .to_string();
    let kinds = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("snapshot "))
        .map(|l| {
            let mut w = l.split_whitespace();
            let r = w.next().unwrap().to_string();
            let k = w
                .next()
                .unwrap()
                .trim_matches(|c| c == '(' || c == ',')
                .to_string();
            (r, k)
        })
        .collect();
    RunOut { stdout, run, kinds }
}

impl RunOut {
    fn kind(&self, disk: &str) -> &str {
        let id = self.run.split_once('@').unwrap().1;
        let r = format!("{disk}@{id}");
        self.kinds
            .iter()
            .find(|(x, _)| *x == r)
            .map(|(_, k)| k.as_str())
            .unwrap_or_else(|| panic!("no snapshot {r} in {}", self.stdout))
    }
}

/// Restore every listed disk of the run and compare with the truths.
fn assert_run_exact(env: &Env, dom: &Domain, run: &RunOut, disks: &[(&str, &str)]) {
    let (prefix, id) = run.run.split_once('@').unwrap();
    for (t, f) in disks {
        let truth = env.path(&format!("truth-{t}-{id}.raw"));
        dom.truth(t, f, &truth);
        let out = env.path(&format!("restored-{t}-{id}.raw"));
        env.ok(&[
            "restore",
            &format!("{prefix}/{t}@{id}"),
            out.to_str().unwrap(),
        ]);
        assert_same(&out, &truth);
    }
}

#[test]
fn two_disks_full_then_incrementals_restore_exactly() {
    let lv = Libvirtd::start();
    let env = lv.env();
    let disks = [("vda", "qcow2"), ("vdb", "qcow2")];
    let dom = Domain::new(&lv, &env, "st-two", &disks, false);
    // A checkpoint strata did not make: strata must leave it alone.
    let foreign = env.path("foreign.xml");
    std::fs::write(
        &foreign,
        "<domaincheckpoint><name>theirs</name></domaincheckpoint>",
    )
    .unwrap();
    lv.virsh(&["checkpoint-create", "st-two", foreign.to_str().unwrap()]);
    dom.io(
        "vda",
        "qcow2",
        &["write -P 0x11 0 1M", "write -P 0x12 8M 64k"],
    );
    dom.io("vdb", "qcow2", &["write -P 0x21 4M 2M"]);
    let r1 = backup(&env, &["--domain", "st-two", "--label", "nightly"]);
    assert_eq!(r1.kind("st-two/vda"), "full");
    assert_eq!(r1.kind("st-two/vdb"), "full");
    assert!(r1.stdout.contains("first run"), "{}", r1.stdout);
    assert_run_exact(&env, &dom, &r1, &disks);

    // Writes, zero writes and discards of earlier data.
    dom.io(
        "vda",
        "qcow2",
        &["write -P 0x13 512k 64k", "write -z 8M 64k"],
    );
    dom.io("vdb", "qcow2", &["discard 4M 1M", "write -P 0x22 60M 128k"]);
    let r2 = backup(&env, &["--domain", "st-two"]);
    assert_eq!(r2.kind("st-two/vda"), "incremental");
    assert_eq!(r2.kind("st-two/vdb"), "incremental");
    assert_run_exact(&env, &dom, &r2, &disks);

    dom.io("vdb", "qcow2", &["write -P 0x23 0 64k"]);
    let r3 = backup(&env, &["--domain", "st-two"]);
    assert_eq!(r3.kind("st-two/vda"), "incremental");
    assert_run_exact(&env, &dom, &r3, &disks);
    // The earlier runs still read back as they were.
    let id1 = r1.run.split_once('@').unwrap().1;
    let out = env.path("again.raw");
    env.ok(&[
        "restore",
        &format!("st-two/vda@{id1}"),
        out.to_str().unwrap(),
    ]);
    assert_same(&out, &env.path(&format!("truth-vda-{id1}.raw")));

    // One strata checkpoint, the last run's, named in its snapshots; the
    // foreign one untouched.
    let cps = dom.checkpoints();
    let snaps = env.snapshots();
    let last = snaps.last().unwrap();
    let cp = last["checkpoint"].as_str().unwrap();
    assert!(cp.starts_with("strata-"));
    let mut expect = vec![cp.to_string(), "theirs".to_string()];
    expect.sort();
    let mut got = cps.clone();
    got.sort();
    assert_eq!(got, expect);
    // All disks of a run share id and time; JSON names the domain.
    for s in &snaps {
        assert_eq!(s["domain"], "st-two");
        assert_eq!(s["quiesced"], false);
    }
    let of_r3: Vec<_> = snaps
        .iter()
        .filter(|s| s["id"] == r3.run.split_once('@').unwrap().1)
        .collect();
    assert_eq!(of_r3.len(), 2);
    assert_eq!(of_r3[0]["time"], of_r3[1]["time"]);
    assert_eq!(snaps[0]["label"], "nightly");

    // The domain XML, shown and restored with the disks pointing at raw files.
    let xml = env.ok(&["domain-xml", &r3.run]);
    assert!(xml.contains("<name>st-two</name>"), "{xml}");
    let dir = env.path("restored-domain");
    env.ok(&["restore", "--domain", &r3.run, dir.to_str().unwrap()]);
    let text = std::fs::read_to_string(dir.join("st-two.xml")).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    let mut seen = Vec::new();
    for d in doc.descendants().filter(|n| n.has_tag_name("disk")) {
        if d.attribute("device") != Some("disk") {
            continue;
        }
        let t = d
            .children()
            .find(|c| c.has_tag_name("target"))
            .and_then(|t| t.attribute("dev"))
            .unwrap();
        let src = d
            .children()
            .find(|c| c.has_tag_name("source"))
            .and_then(|s| s.attribute("file"))
            .unwrap();
        let drv = d
            .children()
            .find(|c| c.has_tag_name("driver"))
            .and_then(|s| s.attribute("type"))
            .unwrap();
        let expect = dir.canonicalize().unwrap().join(format!("{t}.raw"));
        assert_eq!(Path::new(src), expect);
        assert_eq!(drv, "raw");
        assert_same(
            &expect,
            &env.path(&format!(
                "truth-{t}-{}.raw",
                r3.run.split_once('@').unwrap().1
            )),
        );
        seen.push(t.to_string());
    }
    assert_eq!(seen, ["vda", "vdb"]);

    // The mount shows the XML beside the disks' directories.
    {
        let m = common::Mounted::new(&env, "mnt");
        let (prefix, id) = r3.run.split_once('@').unwrap();
        let shown = std::fs::read_to_string(m.mnt.join(prefix).join(format!("{id}.xml"))).unwrap();
        assert_eq!(shown, xml);
        assert_same(
            &m.image(&format!("st-two/vdb@{id}")),
            &env.path(&format!("truth-vdb-{id}.raw")),
        );
    }

    // PREFIX@ID for verify, protect, forget.
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["verify", "--json", &r3.run])).unwrap();
    assert_eq!(v["checked_snapshots"], 2, "{v}");
    assert_eq!(v["ok"], true);
    env.ok(&["protect", &r1.run]);
    assert!(env.fails(&["forget", &r1.run]).contains("protected"));
    env.ok(&["unprotect", &r1.run]);
    env.ok(&["forget", &r2.run]);
    assert_eq!(env.snapshots().len(), 4);
    let out = env.path("after-forget.raw");
    env.ok(&["restore", "st-two/vdb@latest", out.to_str().unwrap()]);
    assert_same(
        &out,
        &env.path(&format!(
            "truth-vdb-{}.raw",
            r3.run.split_once('@').unwrap().1
        )),
    );
}

#[test]
fn lost_checkpoint_metadata_is_redefined_and_stays_incremental() {
    let lv = Libvirtd::start();
    let env = lv.env();
    let disks = [("vda", "qcow2"), ("vdb", "qcow2")];
    let dom = Domain::new(&lv, &env, "st-lost", &disks, false);
    dom.io("vda", "qcow2", &["write -P 0x31 0 256k"]);
    backup(&env, &["--domain", "st-lost"]);
    for cp in dom.checkpoints() {
        lv.virsh(&["checkpoint-delete", "st-lost", &cp, "--metadata"]);
    }
    assert!(dom.checkpoints().is_empty());
    dom.io("vdb", "qcow2", &["write -P 0x32 1M 64k"]);
    let r = backup(&env, &["--domain", "st-lost"]);
    assert!(r.stdout.contains("redefined"), "{}", r.stdout);
    assert_eq!(r.kind("st-lost/vda"), "incremental");
    assert_eq!(r.kind("st-lost/vdb"), "incremental");
    assert_run_exact(&env, &dom, &r, &disks);
    // A snapshot of the last run forgotten: the bitmap no longer fits that
    // disk's latest snapshot, so it must not be laid over it.
    let id = r.run.split_once('@').unwrap().1;
    env.ok(&["forget", &format!("st-lost/vdb@{id}")]);
    dom.io("vdb", "qcow2", &["write -P 0x33 2M 64k"]);
    let r = backup(&env, &["--domain", "st-lost"]);
    assert_eq!(r.kind("st-lost/vdb"), "full");
    assert_run_exact(&env, &dom, &r, &disks);
}

#[test]
fn a_disk_whose_bitmap_is_gone_gets_a_full_the_other_stays_incremental() {
    let lv = Libvirtd::start();
    let env = lv.env();
    let disks = [("vda", "qcow2"), ("vdb", "qcow2")];
    let dom = Domain::new(&lv, &env, "st-bitmap", &disks, false);
    dom.io("vda", "qcow2", &["write -P 0x41 0 256k"]);
    dom.io("vdb", "qcow2", &["write -P 0x42 0 256k"]);
    backup(&env, &["--domain", "st-bitmap"]);
    let cp = dom.checkpoints().pop().unwrap();
    let node = dom.node("vdb");
    lv.virsh(&[
        "qemu-monitor-command",
        "st-bitmap",
        &format!(
            "{{\"execute\":\"block-dirty-bitmap-remove\",\"arguments\":{{\"node\":\"{node}\",\"name\":\"{cp}\"}}}}"
        ),
    ]);
    dom.io("vdb", "qcow2", &["write -P 0x43 2M 64k"]);
    dom.io("vda", "qcow2", &["write -P 0x44 2M 64k"]);
    let r = backup(&env, &["--domain", "st-bitmap"]);
    assert_eq!(r.kind("st-bitmap/vda"), "incremental");
    assert_eq!(r.kind("st-bitmap/vdb"), "full");
    assert!(
        r.stdout
            .contains("st-bitmap/vdb: full: its bitmap is missing or broken"),
        "{}",
        r.stdout
    );
    assert_run_exact(&env, &dom, &r, &disks);
    // The next run is incremental for both again.
    dom.io("vdb", "qcow2", &["write -P 0x45 3M 64k"]);
    let r = backup(&env, &["--domain", "st-bitmap"]);
    assert_eq!(r.kind("st-bitmap/vdb"), "incremental");
    assert_run_exact(&env, &dom, &r, &disks);
}

#[test]
fn an_added_disk_gets_a_full_and_a_removed_one_stops() {
    let lv = Libvirtd::start();
    let env = lv.env();
    let disks = [("vda", "qcow2"), ("vdb", "qcow2")];
    let dom = Domain::new(&lv, &env, "st-add", &disks, false);
    dom.io("vda", "qcow2", &["write -P 0x51 0 64k"]);
    backup(&env, &["--domain", "st-add"]);
    let vdc = image(&dom.dir, "vdc", "qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            vdc.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    let x = env.path("vdc.xml");
    std::fs::write(&x, disk_xml(&dom.dir, "vdc", "qcow2")).unwrap();
    // Hotplug needs a guest that answers ACPI; this one runs no OS, so the
    // disk goes into the configuration and the domain is restarted paused.
    lv.virsh(&["attach-device", "st-add", x.to_str().unwrap(), "--config"]);
    lv.virsh(&["destroy", "st-add"]);
    lv.virsh(&["start", "--paused", "st-add"]);
    dom.io("vdc", "qcow2", &["write -P 0x52 1M 64k"]);
    dom.io("vda", "qcow2", &["write -P 0x53 1M 64k"]);
    let r = backup(&env, &["--domain", "st-add"]);
    assert_eq!(r.kind("st-add/vda"), "incremental");
    assert_eq!(r.kind("st-add/vdc"), "full");
    assert!(
        r.stdout.contains("st-add/vdc: full: new disk"),
        "{}",
        r.stdout
    );
    assert_run_exact(
        &env,
        &dom,
        &r,
        &[("vda", "qcow2"), ("vdb", "qcow2"), ("vdc", "qcow2")],
    );

    let y = env.path("vdb.xml");
    std::fs::write(&y, disk_xml(&dom.dir, "vdb", "qcow2")).unwrap();
    lv.virsh(&["detach-device", "st-add", y.to_str().unwrap(), "--config"]);
    lv.virsh(&["destroy", "st-add"]);
    lv.virsh(&["start", "--paused", "st-add"]);
    dom.io("vdc", "qcow2", &["write -P 0x54 2M 64k"]);
    let r = backup(&env, &["--domain", "st-add"]);
    assert_eq!(r.kind("st-add/vda"), "incremental");
    assert_eq!(r.kind("st-add/vdc"), "incremental");
    assert!(!r.stdout.contains("st-add/vdb"), "{}", r.stdout);
    assert_run_exact(&env, &dom, &r, &[("vda", "qcow2"), ("vdc", "qcow2")]);
}

#[test]
fn a_shut_off_domain_is_backed_up_without_running_it() {
    let lv = Libvirtd::start();
    let env = lv.env();
    let disks = [("vda", "qcow2"), ("vdb", "qcow2")];
    let dom = Domain::new(&lv, &env, "st-off", &disks, true);
    dom.io("vda", "qcow2", &["write -P 0x61 0 1M"]);
    let r = backup(&env, &["--domain", "st-off"]);
    assert_eq!(r.kind("st-off/vda"), "full");
    assert!(r.stdout.contains("started paused"), "{}", r.stdout);
    assert_eq!(lv.virsh(&["domstate", "st-off"]).trim(), "shut off");
    assert_run_exact(&env, &dom, &r, &disks);
    // Offline writes land in the persistent bitmap the checkpoint left.
    dom.io("vdb", "qcow2", &["write -P 0x62 5M 64k"]);
    dom.io("vda", "qcow2", &["write -z 0 64k"]);
    let r = backup(&env, &["--domain", "st-off"]);
    assert_eq!(r.kind("st-off/vda"), "incremental");
    assert_eq!(r.kind("st-off/vdb"), "incremental");
    assert_eq!(lv.virsh(&["domstate", "st-off"]).trim(), "shut off");
    assert_run_exact(&env, &dom, &r, &disks);
}

#[test]
fn raw_disks_are_full_every_run_and_excluded_disks_are_left_out() {
    let lv = Libvirtd::start();
    let env = lv.env();
    let disks = [("vda", "qcow2"), ("vdb", "raw"), ("vdc", "qcow2")];
    let dom = Domain::new(&lv, &env, "st-raw", &disks, false);
    dom.io("vdb", "raw", &["write -P 0x71 0 1M"]);
    dom.io("vdc", "qcow2", &["write -P 0x72 0 1M"]);
    let r1 = backup(&env, &["--domain", "st-raw", "--exclude", "vdc"]);
    assert_eq!(r1.kind("st-raw/vdb"), "full");
    assert!(
        r1.stdout.contains("cannot hold a dirty bitmap"),
        "{}",
        r1.stdout
    );
    dom.io("vdb", "raw", &["write -P 0x73 2M 64k"]);
    dom.io("vda", "qcow2", &["write -P 0x74 2M 64k"]);
    let r2 = backup(&env, &["--domain", "st-raw", "--exclude", "vdc"]);
    assert_eq!(r2.kind("st-raw/vda"), "incremental");
    assert_eq!(r2.kind("st-raw/vdb"), "full");
    assert_run_exact(&env, &dom, &r2, &[("vda", "qcow2"), ("vdb", "raw")]);
    // The second full of vdb stored only what changed.
    let snaps = env.snapshots();
    let vdb2 = snaps
        .iter()
        .find(|s| s["ref"] == format!("st-raw/vdb@{}", r2.run.split_once('@').unwrap().1))
        .unwrap();
    assert!(vdb2["stored_bytes"].as_u64().unwrap() < 256 << 10, "{vdb2}");
    assert!(snaps.iter().all(|s| s["disk"] != "st-raw/vdc"));
    assert!(env
        .fails(&["backup", "--domain", "st-raw", "--exclude", "vdz"])
        .contains("no disk with that target"));
}

#[test]
fn a_killed_run_commits_nothing_and_the_next_is_fine() {
    let lv = Libvirtd::start();
    let env = lv.env();
    let disks = [("vda", "qcow2"), ("vdb", "qcow2")];
    let dom = Domain::new(&lv, &env, "st-kill", &disks, false);
    dom.io("vda", "qcow2", &["write -P 0x81 0 1M"]);
    let r1 = backup(&env, &["--domain", "st-kill"]);
    dom.io("vdb", "qcow2", &["write -P 0x82 1M 1M"]);
    let before = env.snapshots().len();
    let paused = Paused::start(&env, &["backup", "--domain", "st-kill"], "domain:captured");
    let killed = paused.child.id();
    // A second run while the first is alive leaves the first's job alone.
    let err = env.fails(&["backup", "--domain", "st-kill"]);
    assert!(err.contains("is backing up domain st-kill"), "{err}");
    paused.kill();
    assert_eq!(work_dirs_of(killed), 1);
    assert_eq!(env.snapshots().len(), before);
    // The killed run's job and checkpoint are still in libvirt.
    assert_eq!(dom.checkpoints().len(), 2);
    dom.io("vda", "qcow2", &["write -P 0x83 3M 64k"]);
    let r = backup(&env, &["--domain", "st-kill"]);
    assert_eq!(r.kind("st-kill/vda"), "incremental");
    assert_eq!(r.kind("st-kill/vdb"), "incremental");
    assert_run_exact(&env, &dom, &r, &disks);
    assert_eq!(dom.checkpoints().len(), 1);
    // The killed run's work directory went with its job.
    assert_eq!(work_dirs_of(killed), 0);
    // Killed while committing, after the manifests but before the rows.
    dom.io("vdb", "qcow2", &["write -P 0x84 5M 64k"]);
    Paused::start(
        &env,
        &["backup", "--domain", "st-kill"],
        "commit-group:manifests-written",
    )
    .kill();
    assert_eq!(env.snapshots().len(), before + 2);
    let r = backup(&env, &["--domain", "st-kill"]);
    assert_eq!(r.kind("st-kill/vdb"), "incremental");
    assert_run_exact(&env, &dom, &r, &disks);
    assert!(env.ok(&["domain-xml", &r1.run]).contains("st-kill"));
}

/// How many strata work directories of process `pid` there are.
fn work_dirs_of(pid: u32) -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("strata-libvirt-{pid}-"))
        })
        .count()
}

#[test]
fn quiesce_without_an_agent_goes_on_crash_consistent() {
    let lv = Libvirtd::start();
    let env = lv.env();
    let disks = [("vda", "qcow2")];
    let dom = Domain::new(&lv, &env, "st-quiesce", &disks, false);
    dom.io("vda", "qcow2", &["write -P 0x91 0 64k"]);
    let r = backup(&env, &["--domain", "st-quiesce", "--quiesce"]);
    assert!(r.stdout.contains("crash-consistent"), "{}", r.stdout);
    assert!(r.stdout.contains("guest agent"), "{}", r.stdout);
    let snaps = env.snapshots();
    assert_eq!(snaps[0]["quiesced"], false);
    assert_eq!(snaps[0]["domain"], "st-quiesce");
    assert_run_exact(&env, &dom, &r, &disks);
}

#[test]
fn a_domain_name_that_is_no_disk_name_needs_name() {
    let lv = Libvirtd::start();
    let env = lv.env();
    let disks = [("vda", "qcow2")];
    let dom = Domain::new(&lv, &env, "st+odd", &disks, false);
    dom.io("vda", "qcow2", &["write -P 0xa1 0 64k"]);
    let err = env.fails(&["backup", "--domain", "st+odd"]);
    assert!(err.contains("--name"), "{err}");
    assert!(env.snapshots().is_empty());
    let r = backup(&env, &["--domain", "st+odd", "--name", "odd"]);
    assert_eq!(r.kind("odd/vda"), "full");
    assert!(r.run.starts_with("odd@"));
    assert_run_exact(&env, &dom, &r, &disks);
    // Unknown domains fail with libvirt's message.
    let err = env.fails(&["backup", "--domain", "st-none"]);
    assert!(err.contains("st-none"), "{err}");
}

/// On object storage a domain run is all-or-nothing too: its manifests
/// count only once its record, written after them, exists.
#[test]
fn a_domain_run_into_a_bucket_is_all_or_nothing() {
    let server = common::s3::SeaweedFs::start();
    let lv = Libvirtd::start();
    let mut env = lv.env();
    let bucket = common::s3::unique_bucket("domain");
    env.repo = PathBuf::from(format!("s3://{bucket}/repo"));
    env.vars.extend(server.vars(&format!("{bucket}/repo")));
    env.vars.push((
        "STRATA_CACHE_DIR".into(),
        env.path("cache").display().to_string(),
    ));
    env.ok(&["init"]);
    let disks = [("vda", "qcow2"), ("vdb", "qcow2")];
    let dom = Domain::new(&lv, &env, "st-s3", &disks, false);
    dom.io("vda", "qcow2", &["write -P 0x91 0 1M"]);
    let r1 = backup(&env, &["--domain", "st-s3"]);
    assert_run_exact(&env, &dom, &r1, &disks);
    // Killed after both manifests are in the bucket, before the record.
    dom.io("vdb", "qcow2", &["write -P 0x92 1M 1M"]);
    Paused::start(
        &env,
        &["backup", "--domain", "st-s3"],
        "commit-group:manifests-written",
    )
    .kill();
    assert!(server.list(&bucket, "repo/manifests/").len() > 2);
    assert_eq!(env.snapshots().len(), 2);
    // Another host, with a cache of its own, sees the same.
    let mut other = env.vars.clone();
    other.retain(|(k, _)| k != "STRATA_CACHE_DIR");
    other.push((
        "STRATA_CACHE_DIR".into(),
        env.path("cache2").display().to_string(),
    ));
    let out = env
        .cmd()
        .envs(other)
        .args(["snapshots", "--json"])
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let r = backup(&env, &["--domain", "st-s3"]);
    assert_run_exact(&env, &dom, &r, &disks);
    assert_eq!(env.snapshots().len(), 4);
    // gc removes the dead run's manifests.
    assert_eq!(server.list(&bucket, "repo/manifests/").len(), 6);
    env.ok(&["gc"]);
    assert_eq!(server.list(&bucket, "repo/manifests/").len(), 4);
    assert_eq!(env.snapshots().len(), 4);
}
