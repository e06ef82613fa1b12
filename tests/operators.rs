//! What operators meet around the commands: completions, man pages, the
//! CLI reference, `--version`, JSON progress and the error messages.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use common::{random_bytes, Env, Mounted};

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

fn stdout_of(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands `strata --help` lists, without `help`.
fn subcommands() -> Vec<String> {
    let help = stdout_of(strata().arg("--help").output().unwrap());
    let section = help.split("Commands:").nth(1).unwrap();
    let section = section.split("\n\n").next().unwrap();
    section
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Every `--long` flag a help text names.
fn long_flags(help: &str) -> Vec<String> {
    let mut flags: Vec<String> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

/// What the bash completion in `script` offers for the last of `words`,
/// as bash-completion would ask it (`COMP_WORDS`, `COMP_CWORD`, and the
/// command, current and previous word as arguments).
fn complete(script: &Path, words: &[&str]) -> Vec<String> {
    let n = words.len();
    let probe = format!(
        "source {}; COMP_WORDS=({}); COMP_CWORD={}; _strata strata '{}' '{}'; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words.join(" "),
        n - 1,
        words[n - 1],
        words[n - 2],
    );
    let out = stdout_of(Command::new("bash").arg("-c").arg(&probe).output().unwrap());
    out.lines().map(String::from).collect()
}

#[test]
fn bash_completion_offers_subcommands() {
    let script = stdout_of(strata().args(["completions", "bash"]).output().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("strata.bash");
    std::fs::write(&file, script).unwrap();
    assert_eq!(complete(&file, &["strata", "ba"]), ["backup"]);
    let verify = complete(&file, &["strata", "verify", "--re"]);
    assert!(
        verify.iter().any(|w| w == "--read-data-subset"),
        "{verify:?}"
    );
    // Only what a user may type: no internal flags.
    let mount = complete(&file, &["strata", "mount", "--"]);
    assert!(mount.iter().any(|w| w == "--foreground"), "{mount:?}");
    assert!(!mount.iter().any(|w| w.contains("daemon")), "{mount:?}");
    for shell in ["zsh", "fish"] {
        let script = stdout_of(strata().args(["completions", shell]).output().unwrap());
        assert!(script.contains("backup") && script.contains("read-data-subset"));
    }
}

#[test]
fn every_man_page_renders() {
    let dir = tempfile::tempdir().unwrap();
    stdout_of(strata().arg("man").arg(dir.path()).output().unwrap());
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    let mut want: Vec<String> = subcommands()
        .iter()
        .map(|c| format!("strata-{c}.1"))
        .collect();
    want.push("strata.1".into());
    want.sort();
    // Commands with subcommands (`key`) get a page per subcommand too.
    let commands = subcommands();
    let nested = |p: &String| {
        commands
            .iter()
            .any(|c| p.starts_with(&format!("strata-{c}-")))
    };
    let top: Vec<String> = pages.iter().filter(|p| !nested(p)).cloned().collect();
    assert_eq!(top, want);
    assert!(
        pages.contains(&"strata-key-passwd.1".to_string()),
        "{pages:?}"
    );
    for page in &pages {
        let out = Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(dir.path().join(page))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.is_empty(), "{page}: {err}");
        let name = page.trim_end_matches(".1");
        assert!(text.contains(name), "{page} does not name itself:\n{text}");
    }
}

/// docs/CLI.md names every command and every long flag that clap knows.
#[test]
fn cli_reference_covers_every_command_and_flag() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CLI.md")).unwrap();
    let mut missing = Vec::new();
    let top = stdout_of(strata().arg("--help").output().unwrap());
    for flag in long_flags(&top) {
        if !doc.contains(&format!("`{flag}")) {
            missing.push(flag);
        }
    }
    for cmd in subcommands() {
        if !doc.contains(&format!("### `strata {cmd}")) {
            missing.push(format!("section for {cmd}"));
        }
        let help = stdout_of(strata().args([&cmd, "--help"]).output().unwrap());
        // The section of this command: from its heading to the next one.
        let section = doc
            .split(&format!("### `strata {cmd}"))
            .nth(1)
            .map(|s| s.split("\n### ").next().unwrap())
            .unwrap_or("");
        for flag in long_flags(&help) {
            let global = top.contains(&flag);
            if !global && !section.contains(&format!("`{flag}")) {
                missing.push(format!("{cmd} {flag}"));
            }
        }
    }
    assert!(missing.is_empty(), "docs/CLI.md lacks: {missing:?}");
}

/// README and docs link only to files of the repository.
#[test]
fn docs_link_only_inside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        files.push(e.unwrap().path());
    }
    let root = root.canonicalize().unwrap();
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "md"))
    {
        let text = std::fs::read_to_string(file).unwrap();
        for target in text.split("](").skip(1).filter_map(|s| s.split(')').next()) {
            let path = target.split('#').next().unwrap();
            if path.is_empty() || path.starts_with("http://") || path.starts_with("https://") {
                continue;
            }
            let resolved = file.parent().unwrap().join(path).canonicalize();
            assert!(
                resolved.as_ref().is_ok_and(|p| p.starts_with(&root)),
                "{}: link {target} leaves the repository or is broken",
                file.display()
            );
        }
    }
}

#[test]
fn version_names_the_formats() {
    let out = stdout_of(strata().arg("--version").output().unwrap());
    for want in [
        env!("CARGO_PKG_VERSION"),
        "strata-repo/1",
        "chunk files version 2 (reads 1 and 2)",
        "manifests   strata-manifest/2 (reads strata-manifest/1; sealed: strata-sealed-manifest/1)",
        "strata-sealed-manifest/1",
        "strata-key/1",
        "strata-extents/1",
        "catalog     SQLite, schema 2",
        "image maps  binary encoding 2 (reads 1 and 2)",
    ] {
        assert!(out.contains(want), "--version lacks {want:?}:\n{out}");
    }
}

/// Every stderr line of a `--progress json` run is an event; progress only
/// grows, per task; the last event is `done` (or `error`).
fn json_events(out: &Output) -> Vec<serde_json::Value> {
    let err = String::from_utf8_lossy(&out.stderr);
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(events.first().unwrap()["event"], "started", "{err}");
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for e in events.iter().filter(|e| e["event"] == "progress") {
        let task = e["task"].as_str().unwrap().to_string();
        let (done, total) = match e.get("bytes_done") {
            Some(d) => (d.as_u64().unwrap(), e["bytes_total"].as_u64().unwrap()),
            None => (
                e["items_done"].as_u64().unwrap(),
                e["items_total"].as_u64().unwrap(),
            ),
        };
        assert!(done <= total, "{e}");
        let last = seen.insert(task, done).unwrap_or(0);
        assert!(done >= last, "progress went back: {err}");
    }
    events
}

#[test]
fn json_progress_of_long_commands() {
    let env = Env::new();
    let disk = env.path("disk.raw");
    std::fs::write(&disk, random_bytes(7, 96 << 20)).unwrap();
    let run = |args: &[&str]| {
        let mut full = vec!["--progress", "json"];
        full.extend_from_slice(args);
        let started = std::time::Instant::now();
        let out = env.run(&full);
        let seconds = started.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let events = json_events(&out);
        // Throttled: at most four a second per task (plus the first).
        let progress = events.iter().filter(|e| e["event"] == "progress").count();
        assert!(
            progress as f64 <= 1.0 + 4.0 * seconds,
            "{progress} progress events in {seconds:.2} s"
        );
        events
    };
    let backup = run(&["backup", "--disk", "vm1/vda", disk.to_str().unwrap()]);
    // The first chunk stored is always reported (nothing throttles it).
    let progress: Vec<_> = backup.iter().filter(|e| e["event"] == "progress").collect();
    assert!(!progress.is_empty(), "no progress events: {backup:?}");
    assert_eq!(progress[0]["bytes_total"], 96 << 20);
    let done = backup.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["command"], "backup");
    assert_eq!(done["size"], 96 << 20);
    let snap = done["snapshot"].as_str().unwrap().to_string();
    let restored = env.path("restored.raw");
    let restore = run(&["restore", &snap, restored.to_str().unwrap()]);
    assert_eq!(restore.last().unwrap()["event"], "done");
    common::assert_same(&disk, &restored);
    // verify --json keeps its document on stdout, events go to stderr.
    let out = env.run(&["--progress", "json", "verify", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true);
    let verify = json_events(&out);
    assert_eq!(
        verify.last().unwrap()["checked_chunks"],
        report["checked_chunks"]
    );
    let prune = run(&["prune", "--keep-last", "1", "--json"]);
    assert_eq!(prune.last().unwrap()["event"], "done");
    assert_eq!(prune.last().unwrap()["kept"], 1);
    // A failure ends with an error event, and no done.
    let out = env.run(&[
        "--progress",
        "json",
        "restore",
        "vm1/vda@latest",
        "/nonexistent/dir/x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let events: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(events.last().unwrap()["event"], "error", "{err}");
    assert!(!events.iter().any(|e| e["event"] == "done"));
}

/// Common mistakes: the exit code, and a message that names what failed
/// and what to do.
#[test]
fn common_mistakes_are_explained() {
    let env = Env::new();
    let disk = env.path("disk.raw");
    std::fs::write(&disk, random_bytes(3, 1 << 20)).unwrap();
    let snap = env.backup(&["--disk", "vm1/vda", disk.to_str().unwrap()]);
    let plain = env.path("plain");
    std::fs::create_dir(&plain).unwrap();
    let missing = env.path("missing");
    let mnt = Mounted::new(&env, "mnt");
    let (m, p, miss) = (
        mnt.mnt.to_str().unwrap(),
        plain.to_str().unwrap(),
        missing.to_str().unwrap(),
    );
    // A well-formed id that no snapshot has.
    let unknown = format!("{}9999", &snap[..snap.len() - 4]);
    #[rustfmt::skip]
    let table: &[(&[&str], bool, i32, &[&str])] = &[
        // (arguments, with --repo, exit code, the message names these)
        (&["snapshots"], false, 1, &["no repository given", "--repo", "STRATA_REPO"]),
        (&["--repo", miss, "snapshots"], false, 1, &["does not exist", miss, "strata init"]),
        (&["--repo", p, "snapshots"], false, 1, &["not a strata repository", p]),
        (&["map", &unknown], true, 1, &["not found", &unknown, "strata snapshots"]),
        (&["map", "vm9/vdz@latest"], true, 1, &["vm9/vdz", "no snapshots", "strata snapshots"]),
        (&["restore", "vm1/vda", "/tmp/x"], true, 1, &["DISK@ID", "vm1/vda"]),
        (&["backup", "--disk", "../x", "/dev/null"], true, 1, &["invalid disk name", "../x"]),
        (&["backup", "--disk", "vm1/vda", miss], true, 1, &[miss]),
        (&["backup", "--disk", "vm1/vda", p, "--time", "yesterday"], true, 1, &["yesterday", "2026-"]),
        (&["restore", "vm1/vda@latest", "/nonexistent/x"], true, 1, &["restore vm1/vda@", "/nonexistent/x"]),
        (&["mount", miss], true, 1, &["mount point", miss]),
        (&["backup", "--disk", "vm1/vda", p], true, 1, &[p, "not a regular file", "NBD URI"]),
        (&["mount", m], true, 1, &["already mounted", m, "strata umount"]),
        (&["umount", p], true, 1, &["not a strata mount", p]),
        (&["init"], true, 1, &["not empty", "new or empty directory"]),
        (&["prune"], true, 1, &["no retention rule", "--keep-last"]),
        (&["verify", "--read-data-subset", "9/7"], true, 1, &["9/7", "N/T"]),
        (&["backup", "--disk"], true, 2, &["--disk"]),
        (&["frobnicate"], true, 2, &["frobnicate"]),
        (&["snapshots", "--bogus"], true, 2, &["--bogus"]),
    ];
    for (args, with_repo, code, words) in table {
        let out = if *with_repo {
            env.run(args)
        } else {
            let mut c = strata();
            c.env_remove("STRATA_REPO").args(*args);
            c.output().unwrap()
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "strata {args:?}: {err}");
        for w in *words {
            assert!(err.contains(w), "strata {args:?}: {w:?} not in {err}");
        }
        assert!(!err.contains("panicked"), "strata {args:?}: {err}");
    }
}
