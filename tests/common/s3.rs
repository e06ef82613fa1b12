//! A real S3 server for the tests: SeaweedFS's `weed mini` (master, volume
//! server, filer and S3 gateway in one process) on 127.0.0.1, with its data
//! in a fresh temporary directory, one identity, and ports of its own so
//! that any number of servers (and test binaries) can run at once.
//!
//! `weed mini` rather than `weed server -filer -s3`: it answers in about
//! 1 s where `weed server` takes about 3.3 s, at the same ~115 MiB RSS.
//!
//! Requests from the tests go through curl's own SigV4 signing
//! (`--aws-sigv4`). curl 7.88 (bookworm) neither sorts nor encodes the query
//! it signs, so every query here is written sorted and percent-encoded.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for a (re)started server to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often to ask whether it answers yet.
const POLL: Duration = Duration::from_millis(50);
pub const REGION: &str = "us-east-1";

/// One `weed mini` process; killed (with its process group) and its data
/// removed on drop, also when the test panics. It also dies with the thread
/// that started it (`PR_SET_PDEATHSIG`), so a test killed outright leaves
/// no server behind: start it in the test that uses it, not in a static.
pub struct SeaweedFs {
    dir: tempfile::TempDir,
    ports: Ports,
    access_key: String,
    secret_key: String,
    child: Option<Child>,
    /// Where the log of the current run starts in `weed.log`.
    log_start: u64,
}

/// A server's TCP ports: every listener `weed mini` opens when the admin
/// UI, WebDAV, Iceberg and Lance are off (its gRPC ports would otherwise
/// default to HTTP port + 10000, admin's to 33646, clashing between servers).
#[derive(Clone, Copy)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
    admin: u16,
    admin_grpc: u16,
}

/// Ports of every server of this test process until it is dropped: a
/// server stopped for `restart` leaves its ports unbound, and a server
/// that another test starts meanwhile must not pick them.
static RESERVED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

impl Ports {
    /// Ten distinct ports free now and reserved in [`RESERVED`], below the
    /// kernel's ephemeral range so that no client connection takes one
    /// while the server is stopped between `stop` and `restart`.
    fn pick() -> Ports {
        let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
        let top = ephemeral_low().clamp(11_000, 65_535);
        let mut held = Vec::new();
        let mut seed = random_u64();
        while held.len() < 10 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let port = 10_000 + (seed % u64::from(top - 10_000)) as u16;
            if reserved.contains(&port) {
                continue;
            }
            // Holding each listener until all are picked keeps them distinct.
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                held.push(l);
            }
        }
        let p: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        reserved.extend(&p);
        Ports {
            master: p[0],
            master_grpc: p[1],
            volume: p[2],
            volume_grpc: p[3],
            filer: p[4],
            filer_grpc: p[5],
            s3: p[6],
            s3_grpc: p[7],
            admin: p[8],
            admin_grpc: p[9],
        }
    }

    /// Give the ports back to other servers of this process.
    fn release(&self) {
        let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
        reserved.retain(|p| !self.all().contains(p));
    }

    fn all(&self) -> [u16; 10] {
        [
            self.master,
            self.master_grpc,
            self.volume,
            self.volume_grpc,
            self.filer,
            self.filer_grpc,
            self.s3,
            self.s3_grpc,
            self.admin,
            self.admin_grpc,
        ]
    }
}

fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState's keys are random (per process, then incremented).
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() | 1
}

/// What a request got back.
#[derive(Debug)]
pub struct Response {
    /// 0 when there was no HTTP answer at all (connection refused, say).
    pub status: u16,
    /// The final response's headers, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A header's value (the name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `<Code>` of an S3 error body (`NoSuchKey`, `PreconditionFailed`).
    pub fn error_code(&self) -> Option<String> {
        let text = self.text();
        let doc = roxmltree::Document::parse(&text).ok()?;
        let code = doc.descendants().find(|n| n.has_tag_name("Code"))?;
        code.text().map(str::to_string)
    }
}

impl SeaweedFs {
    /// Start a server and return once it serves (see `wait_ready`).
    /// Panics, with the end of the server's log, if it does not within a
    /// minute.
    pub fn start() -> SeaweedFs {
        let dir = tempfile::Builder::new()
            .prefix("strata-s3")
            .tempdir()
            .unwrap();
        let suffix = format!("{:016x}", random_u64());
        let access_key = format!("strata{}", &suffix[..10]);
        let secret_key = format!("secret{suffix}");
        let config = serde_json::json!({
            "identities": [{
                "name": "strata",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        std::fs::write(dir.path().join("s3.json"), config.to_string()).unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let mut server = SeaweedFs {
            dir,
            ports: Ports::pick(),
            access_key,
            secret_key,
            child: None,
            log_start: 0,
        };
        // A port picked free can be taken before weed binds it: pick again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            server.spawn();
            match server.wait_ready() {
                Ok(()) => return server,
                Err(why) if attempt < 3 && server.port_taken() => {
                    eprintln!("{why}; trying other ports");
                    server.stop();
                    server.ports.release();
                    server.ports = Ports::pick();
                }
                Err(why) => server.fail(&why),
            }
        }
    }

    /// `http://127.0.0.1:PORT`, the S3 gateway.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The environment for a strata command on `s3://BUCKET_PREFIX`:
    /// endpoint, credentials, region, and STRATA_REPO (which an explicit
    /// `--repo` overrides). No AWS_ALLOW_HTTP: strata must allow plain
    /// http for an `http://` endpoint by itself.
    pub fn vars(&self, bucket_prefix: &str) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", REGION.to_string()),
            ("STRATA_REPO", format!("s3://{bucket_prefix}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's directory: its data (`data/`), `s3.json`, `weed.log`.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kill the server (SIGKILL: as abrupt as a crash) and reap it. Its
    /// data and ports stay for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the process group the child leads.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    /// Stop the server if it runs, and start it again on the same ports and
    /// data; return once it answers.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        if let Err(why) = self.wait_ready() {
            self.fail(&why);
        }
    }

    /// The unix sockets of this server's that outlive it: weed names its
    /// gRPC sockets after their ports, in /tmp whatever TMPDIR says. Nobody
    /// else can have these names while the ports are ours.
    pub fn sockets(&self) -> Vec<PathBuf> {
        let ends: Vec<String> = self
            .ports
            .all()
            .iter()
            .map(|p| format!("-{p}.sock"))
            .collect();
        let Ok(entries) = std::fs::read_dir("/tmp") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("seaweedfs-") && ends.iter().any(|end| name.ends_with(end))
            })
            .map(|e| e.path())
            .collect()
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log_from(0);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// curl with this server's credentials, signing with SigV4.
    pub fn curl(&self) -> Command {
        let mut c = Command::new("curl");
        c.args(["--silent", "--show-error", "--max-time", "30"])
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{REGION}:s3"))
            .arg("--user")
            .arg(format!("{}:{}", self.access_key, self.secret_key));
        c
    }

    /// A signed request. `path` starts with `/` and is already encoded (see
    /// [`key_path`]); a query must be sorted by name (curl 7.88 signs it
    /// as written).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Response {
        self.request_with(self.curl(), method, path, body, headers)
    }

    /// As [`Self::request`], with a curl of one's own (other credentials).
    pub fn request_with(
        &self,
        mut curl: Command,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Response {
        curl.arg("-X").arg(method);
        for (name, value) in headers {
            curl.arg("-H").arg(format!("{name}: {value}"));
        }
        if body.is_some() {
            // Not curl's default application/x-www-form-urlencoded.
            if !headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            {
                curl.args(["-H", "Content-Type: application/octet-stream"]);
            }
            // curl 7.88 signs a --data-binary body's hash without sending
            // it, which SeaweedFS refuses: sign no payload at all.
            curl.args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
                .args(["--data-binary", "@-"]);
        }
        let head = tempfile::NamedTempFile::new_in(self.dir.path()).unwrap();
        curl.arg("--dump-header").arg(head.path());
        // The status on a line of its own after the body.
        curl.args(["--write-out", "\n%{http_code}"])
            .arg(format!("{}{path}", self.endpoint()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = curl.spawn().expect("curl (scripts/install-deps.sh)");
        let mut stdin = child.stdin.take().unwrap();
        let out = std::thread::scope(|s| {
            s.spawn(move || stdin.write_all(body.unwrap_or_default()));
            child.wait_with_output().unwrap()
        });
        let nl = out.stdout.iter().rposition(|&b| b == b'\n');
        let nl = nl.unwrap_or_else(|| panic!("curl {method} {path}: no status"));
        let (body, status) = (&out.stdout[..nl], &out.stdout[nl + 1..]);
        // After a "100 Continue" block comes the real one: keep the last.
        let head = std::fs::read_to_string(head.path()).unwrap_or_default();
        let last = head.trim_end().rsplit("\r\n\r\n").next().unwrap_or("");
        let headers = last
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_string(), v.trim().to_string()))
            .collect();
        Response {
            status: String::from_utf8_lossy(status).parse().unwrap_or(0),
            headers,
            body: body.to_vec(),
        }
    }

    /// CreateBucket; panics unless it succeeds.
    pub fn create_bucket(&self, bucket: &str) {
        let r = self.request("PUT", &format!("/{bucket}"), None, &[]);
        assert_eq!(r.status, 200, "CreateBucket {bucket}: {}", r.text());
    }

    /// PutObject; panics unless it succeeds.
    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        let r = self.request("PUT", &key_path(bucket, key), Some(data), &[]);
        assert_eq!(r.status, 200, "PUT {bucket}/{key}: {}", r.text());
    }

    /// GetObject: `None` for a key that is not there.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let r = self.request("GET", &key_path(bucket, key), None, &[]);
        match r.status {
            200 => Some(r.body),
            404 => None,
            _ => panic!("GET {bucket}/{key}: {} {}", r.status, r.text()),
        }
    }

    /// DeleteObject (S3 answers 204 whether or not the key was there).
    pub fn delete(&self, bucket: &str, key: &str) {
        let r = self.request("DELETE", &key_path(bucket, key), None, &[]);
        assert_eq!(r.status, 204, "DELETE {bucket}/{key}: {}", r.text());
    }

    /// Every key under `prefix`, in S3's (byte) order, over as many
    /// ListObjectsV2 pages as it takes.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = String::new();
            if let Some(t) = &token {
                query += &format!("continuation-token={}&", encode(t, false));
            }
            query += &format!("list-type=2&prefix={}", encode(prefix, false));
            let r = self.request("GET", &format!("/{bucket}?{query}"), None, &[]);
            assert_eq!(r.status, 200, "LIST {bucket}/{prefix}: {}", r.text());
            let text = r.text();
            let doc = roxmltree::Document::parse(&text).unwrap();
            let root = doc.root_element();
            let child = |name: &str| {
                root.children()
                    .find(|n| n.has_tag_name(name))
                    .and_then(|n| n.text())
                    .map(str::to_string)
            };
            for c in root.children().filter(|n| n.has_tag_name("Contents")) {
                let key = c.children().find(|n| n.has_tag_name("Key")).unwrap();
                keys.push(key.text().unwrap_or_default().to_string());
            }
            if child("IsTruncated").as_deref() != Some("true") {
                return keys;
            }
            token = Some(child("NextContinuationToken").expect("truncated, no token"));
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none());
        let p = self.ports;
        let data = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        self.log_start = log.metadata().unwrap().len();
        let mut cmd = Command::new("weed");
        // Logs to stderr, i.e. weed.log, not to glog files in /tmp.
        cmd.arg("-logtostderr").arg("mini");
        cmd.arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-master.port.grpc={}", p.master_grpc))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-volume.port.grpc={}", p.volume_grpc))
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-filer.port.grpc={}", p.filer_grpc))
            .arg(format!("-s3.port={}", p.s3))
            .arg(format!("-s3.port.grpc={}", p.s3_grpc))
            // The admin server runs even without its UI.
            .arg(format!("-admin.port={}", p.admin))
            .arg(format!("-admin.port.grpc={}", p.admin_grpc))
            .arg(format!(
                "-s3.config={}",
                self.dir.path().join("s3.json").display()
            ))
            .args([
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
                // As AWS: a PUT into a missing bucket is NoSuchBucket, not
                // a new bucket.
                "-s3.autoCreateBucket=false",
            ])
            // Unix sockets of its own: the defaults are shared /tmp paths.
            .arg(format!(
                "-filer.localSocket={}",
                self.dir.path().join("filer.sock").display()
            ))
            .arg(format!(
                "-s3.localSocket={}",
                self.dir.path().join("s3.sock").display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group, so that killing it kills all of it.
            .process_group(0);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the thread that started it, even by SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run weed ({e}); scripts/install-deps.sh installs it")
        });
        self.child = Some(child);
    }

    /// Poll until the server serves (the master knows the volumes on disk
    /// and a signed ListBuckets gets 200), the process exits, or the time
    /// is up.
    fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Err(format!("weed mini exited ({status})"));
            }
            if self.volumes_known() && self.s3_answers() {
                eprintln!(
                    "weed mini on {} ready in {:?}",
                    self.endpoint(),
                    start.elapsed()
                );
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(format!("not serving after {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether the master knows the volume server and every volume on disk:
    /// until then, after a restart, reads of old objects fail with 500.
    fn volumes_known(&self) -> bool {
        let on_disk = std::fs::read_dir(self.dir.path().join("data"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".dat"))
            .count() as u64;
        let out = Command::new("curl")
            .args(["--silent", "--max-time", "2"])
            .arg(format!("http://127.0.0.1:{}/dir/status", self.ports.master))
            .output()
            .unwrap();
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return false;
        };
        let node = format!("127.0.0.1:{}", self.ports.volume);
        let nodes = status["Topology"]["DataCenters"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|dc| dc["Racks"].as_array().into_iter().flatten())
            .flat_map(|rack| rack["DataNodes"].as_array().into_iter().flatten());
        nodes
            .filter(|n| n["Url"] == node.as_str())
            .any(|n| n["Volumes"].as_u64().unwrap_or(0) >= on_disk)
    }

    /// Whether a signed ListBuckets gets 200: the identities are loaded,
    /// the filer answers.
    fn s3_answers(&self) -> bool {
        let mut curl = self.curl();
        curl.args(["--max-time", "2"]);
        self.request_with(curl, "GET", "/", None, &[]).status == 200
    }

    /// Whether weed gave up because a port was taken (it checks them all
    /// before it starts).
    fn port_taken(&self) -> bool {
        let log = self.log_from(self.log_start);
        log.contains("Port allocation failed") || log.contains("address already in use")
    }

    fn fail(&mut self, why: &str) -> ! {
        self.stop();
        panic!(
            "weed mini on {}: {why}; its log ends:\n{}",
            self.endpoint(),
            self.log_tail(40)
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// The log from `start` on, at most its last 64 KiB.
    fn log_from(&self, start: u64) -> String {
        let mut text = Vec::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path()) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(start.max(len.saturating_sub(64 << 10))));
            let _ = f.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.stop();
        for path in self.sockets() {
            let _ = std::fs::remove_file(path);
        }
        self.ports.release();
    }
}

/// `/BUCKET/KEY` with the key percent-encoded as SigV4 wants it (`/` kept).
pub fn key_path(bucket: &str, key: &str) -> String {
    format!("/{bucket}/{}", encode(key, true))
}

/// Percent-encode all but S3's unreserved characters (and `/` in a path).
pub fn encode(s: &str, path: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (path && b == b'/') {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// A valid S3 bucket name (3-63 of `a-z0-9-`, starting and ending with a
/// letter or digit) from `name`, unique to this process and call.
pub fn unique_bucket(name: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let suffix = format!(
        "-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut base = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (base.is_empty() || base.ends_with('-'))) {
            base.push(c);
        }
    }
    // Dashes collapsed above: no reserved "xn--" prefix either.
    if base.is_empty() {
        base.push('t');
    }
    base.truncate(63 - suffix.len());
    let base = base.trim_end_matches('-');
    format!("{base}{suffix}")
}
