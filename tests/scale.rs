//! Metadata that grows with what changed (issue #15): a 64 GiB virtual
//! disk served by nbdkit's sparse-random plugin, a full backup and a few
//! incrementals of scattered clusters. Asserts sizes (catalog map blobs,
//! manifests), never times.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const GIB: u64 = 1 << 30;
const CLUSTER: u64 = 65536;

/// `(own_map bytes, image_map bytes)` of every row, oldest first.
fn rows(repo: &Path) -> Vec<(String, usize, usize)> {
    let conn = rusqlite::Connection::open(repo.join("catalog.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, length(own_map), length(image_map) FROM snapshots ORDER BY id")
        .unwrap();
    let out = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<Vec<_>>>()
        .unwrap();
    out
}

fn manifest_len(repo: &Path, id: &str) -> u64 {
    std::fs::metadata(repo.join("manifests/vm/big").join(format!("{id}.json")))
        .unwrap()
        .len()
}

#[test]
fn metadata_grows_with_changes_not_disk_size() {
    let env = Env::new();
    let sock = env.path("nbd.sock");
    let pidfile = env.path("nbdkit.pid");
    let size = 64 * GIB;
    sh(
        "nbdkit",
        &[
            "--unix",
            sock.to_str().unwrap(),
            "--pidfile",
            pidfile.to_str().unwrap(),
            "sparse-random",
            &format!("size={size}"),
            "percent=1",
            "seed=7",
        ],
    );
    let _stop = KillPidFile(pidfile);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let alloc: Value = serde_json::from_str(&sh("nbdinfo", &["--map", "--json", &uri])).unwrap();
    let data: Vec<(u64, u64)> = alloc
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64().unwrap() & 1 == 0)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    let allocated: u64 = data.iter().map(|d| d.1).sum();
    assert!(allocated > size / 200, "{allocated}");

    let full = env.backup(&["--disk", "vm/big", &uri]);
    let full_map = env.ok(&["map", &full, "--json"]);
    // Clusters inside allocated runs, spread over the disk: 256 per
    // incremental, a different set each time.
    let clusters: Vec<u64> = data
        .iter()
        .flat_map(|&(o, l)| (o.div_ceil(CLUSTER)..(o + l) / CLUSTER).map(|c| c * CLUSTER))
        .collect();
    let mut snaps = vec![full.clone()];
    for round in 0..3u64 {
        let step = clusters.len() / 256;
        let extents: Vec<Value> = (0..256)
            .map(|i| serde_json::json!({"offset": clusters[i * step + round as usize], "length": CLUSTER}))
            .collect();
        let changes = env.path(&format!("changes{round}.json"));
        std::fs::write(
            &changes,
            serde_json::json!({"size": size, "extents": extents}).to_string(),
        )
        .unwrap();
        snaps.push(env.backup(&[
            "--disk",
            "vm/big",
            &uri,
            "--changes",
            changes.to_str().unwrap(),
        ]));
    }

    let rows = rows(&env.repo);
    assert_eq!(rows.len(), 4);
    let (full_id, full_own, full_image) = &rows[0];
    // The full's row: its own map only (it is its image), ~40 bytes per
    // 1 MiB chunk of data, where encoding 1 took 53 per segment, twice.
    assert_eq!(*full_image, 0, "a full stores no separate image map");
    let chunks = allocated / (1 << 20);
    assert!(
        (*full_own as u64) < 40 * chunks + 4096,
        "full own map {full_own} bytes for ~{chunks} chunks"
    );
    for (id, own, image) in &rows[1..] {
        // 256 clusters in 64 grouped chunks: chunk names and a few bytes
        // per cluster, whatever the disk's size or the full's map.
        assert_eq!(*image, 0, "{id}: no keyframe this shallow");
        assert!(*own < 64 * 32 + 256 * 12 + 512, "{id}: own map {own} bytes");
        assert!(*own * 4 < *full_own, "{id}: {own} vs full {full_own}");
        let m = manifest_len(&env.repo, id);
        assert!(m < 256 * 200, "{id}: manifest {m} bytes");
        assert!(
            m * 2 < manifest_len(&env.repo, full_id),
            "{id}: manifest {m}"
        );
    }

    // The disk did not change: every image resolves to the full's
    // allocation, and the metadata checks out.
    for snap in &snaps[1..] {
        let map: Value = serde_json::from_str(&env.ok(&["map", snap, "--json"])).unwrap();
        let full: Value = serde_json::from_str(&full_map).unwrap();
        assert_eq!(map["extents"], full["extents"], "{snap}");
    }
    assert!(env.run(&["verify", "--quick"]).status.success());
}
