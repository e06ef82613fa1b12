//! The S3 test server itself (tests/common/s3.rs): it starts, answers,
//! refuses wrong credentials, keeps its data over a restart, runs beside
//! another, and leaves nothing behind; and the S3 semantics strata's S3
//! backend relies on hold on it (conditional PUTs, missing buckets).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::s3::{key_path, unique_bucket, SeaweedFs, REGION};

/// curl signing with other credentials.
fn curl_as(access_key: &str, secret_key: &str) -> Command {
    let mut c = Command::new("curl");
    c.args(["--silent", "--show-error", "--max-time", "30"])
        .arg("--aws-sigv4")
        .arg(format!("aws:amz:{REGION}:s3"))
        .arg("--user")
        .arg(format!("{access_key}:{secret_key}"));
    c
}

#[test]
fn answers_and_refuses_wrong_credentials() {
    let s3 = SeaweedFs::start();
    let bucket = unique_bucket("Answers & Refuses");
    s3.create_bucket(&bucket);
    // A key that needs encoding, written right after start.
    let key = "dir/a b+c=d@e";
    s3.put(&bucket, key, b"hello");
    assert_eq!(s3.get(&bucket, key).as_deref(), Some(&b"hello"[..]));
    assert_eq!(s3.list(&bucket, "dir/"), [key]);
    assert_eq!(s3.get(&bucket, "dir/missing"), None);

    let path = key_path(&bucket, key);
    let wrong_secret = curl_as(s3.access_key(), "not-the-secret");
    let r = s3.request_with(wrong_secret, "GET", &path, None, &[]);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("SignatureDoesNotMatch"));
    let wrong_key = curl_as("nosuchkey", s3.secret_key());
    let r = s3.request_with(wrong_key, "PUT", &path, Some(b"x"), &[]);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("InvalidAccessKeyId"));
    let r = s3.request_with(Command::new("curl"), "GET", &path, None, &[]);
    assert_eq!(r.status, 403, "unsigned: {}", r.text());
    assert_eq!(s3.get(&bucket, key).as_deref(), Some(&b"hello"[..]));

    // A missing bucket is NoSuchBucket, for a PUT too (no auto-creation).
    let missing = unique_bucket("missing");
    for (method, body) in [("GET", None), ("PUT", Some(&b"x"[..]))] {
        let r = s3.request(method, &key_path(&missing, "k"), body, &[]);
        assert_eq!(r.status, 404, "{method}: {}", r.text());
        assert_eq!(r.error_code().as_deref(), Some("NoSuchBucket"));
    }
}

#[test]
fn conditional_puts() {
    let s3 = SeaweedFs::start();
    let bucket = unique_bucket("conditional");
    s3.create_bucket(&bucket);
    let path = key_path(&bucket, "lock");
    let create = [("If-None-Match", "*")];
    let r = s3.request("PUT", &path, Some(b"one"), &create);
    assert_eq!(r.status, 200, "{}", r.text());
    let first = r.header("ETag").expect("an ETag").to_string();
    let r = s3.request("PUT", &path, Some(b"two"), &create);
    assert_eq!(r.status, 412, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("PreconditionFailed"));

    let r = s3.request("PUT", &path, Some(b"three"), &[("If-Match", &first)]);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s3.request("PUT", &path, Some(b"four"), &[("If-Match", &first)]);
    assert_eq!(r.status, 412, "stale ETag: {}", r.text());
    assert_eq!(s3.get(&bucket, "lock").as_deref(), Some(&b"three"[..]));
}

#[test]
fn stop_and_restart_keep_data_and_ports() {
    let mut s3 = SeaweedFs::start();
    let bucket = unique_bucket("restart");
    s3.create_bucket(&bucket);
    let data = common::random_bytes(1, 3 << 20);
    s3.put(&bucket, "big", &data);
    let endpoint = s3.endpoint();
    s3.stop();
    assert_eq!(s3.pid(), None);
    let r = s3.request("GET", &key_path(&bucket, "big"), None, &[]);
    assert_eq!(r.status, 0, "a stopped server answered: {}", r.text());
    s3.restart();
    assert_eq!(s3.endpoint(), endpoint);
    assert!(
        s3.get(&bucket, "big") == Some(data),
        "data lost over restart"
    );
    assert_eq!(s3.list(&bucket, ""), ["big"]);
    s3.put(&bucket, "after", b"x");
}

#[test]
fn servers_side_by_side() {
    let a = SeaweedFs::start();
    let b = SeaweedFs::start();
    assert_ne!(a.endpoint(), b.endpoint());
    assert_ne!(a.access_key(), b.access_key());
    let bucket = unique_bucket("side");
    a.create_bucket(&bucket);
    b.create_bucket(&bucket);
    a.put(&bucket, "k", b"a");
    b.put(&bucket, "k", b"b");
    assert_eq!(a.get(&bucket, "k").as_deref(), Some(&b"a"[..]));
    assert_eq!(b.get(&bucket, "k").as_deref(), Some(&b"b"[..]));
    // One server's credentials mean nothing to the other.
    let r = b.request_with(a.curl(), "GET", &key_path(&bucket, "k"), None, &[]);
    assert_eq!(r.error_code().as_deref(), Some("InvalidAccessKeyId"));
    let vars = a.vars("bkt/pre");
    let var = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(var("AWS_ENDPOINT_URL"), Some(a.endpoint().as_str()));
    assert_eq!(var("AWS_ACCESS_KEY_ID"), Some(a.access_key()));
    assert_eq!(var("AWS_SECRET_ACCESS_KEY"), Some(a.secret_key()));
    assert_eq!(var("AWS_REGION"), Some(REGION));
    assert_eq!(var("STRATA_REPO"), Some("s3://bkt/pre"));
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "PID (comm) STATE ...": comm may hold spaces, not ')'.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('Z'),
        Err(_) => true,
    }
}

#[test]
fn a_panicking_test_leaves_no_server() {
    let (tx, rx) = std::sync::mpsc::channel();
    let test = std::thread::spawn(move || {
        let s3 = SeaweedFs::start();
        tx.send((s3.pid().unwrap(), s3.data_dir().to_path_buf(), s3.sockets()))
            .unwrap();
        panic!("a failing test");
    });
    assert!(test.join().is_err());
    let (pid, dir, sockets) = rx.recv().unwrap();
    assert!(!sockets.is_empty());
    let sockets: Vec<_> = sockets.into_iter().filter(|s| s.exists()).collect();
    // Drop reaped it: not even a zombie is left.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert_eq!(sockets, Vec::<std::path::PathBuf>::new());
}

#[test]
fn the_server_dies_with_its_thread() {
    // As when a test is killed and no Drop runs: PR_SET_PDEATHSIG.
    let (pid, dir, sockets) = std::thread::spawn(|| {
        let s3 = SeaweedFs::start();
        let out = (s3.pid().unwrap(), s3.data_dir().to_path_buf(), s3.sockets());
        std::mem::forget(s3);
        out
    })
    .join()
    .unwrap();
    let start = Instant::now();
    while !exited(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "weed {pid} lives on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The forgotten SeaweedFs cannot clean up: reap and remove here.
    // SAFETY: waitpid(2) on our own child, which has exited.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
    std::fs::remove_dir_all(dir).unwrap();
    assert!(!sockets.is_empty());
    for path in sockets {
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn unique_bucket_names_are_valid() {
    let names = [
        "",
        "a",
        "Test_Name With Spaces",
        "--x--",
        "xn--punycode",
        "192.168.1.1",
        &"long".repeat(30),
    ];
    let buckets: Vec<String> = names.iter().map(|n| unique_bucket(n)).collect();
    for b in &buckets {
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        assert!((3..=63).contains(&b.len()), "{b}");
        assert!(b.chars().all(|c| ok_char(c) || c == '-'), "{b}");
        assert!(ok_char(b.chars().next().unwrap()), "{b}");
        assert!(ok_char(b.chars().last().unwrap()), "{b}");
        assert!(!b.contains("--"), "{b}");
    }
    let mut distinct = buckets.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), buckets.len());
}
