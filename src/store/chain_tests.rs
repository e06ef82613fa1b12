//! Chains of snapshots with keyframes, through the library: images equal
//! to the naive overlay of every own map at every depth, before and after
//! forget, after a catalog rebuild, and from a catalog written in schema 1.

use std::collections::HashSet;

use chrono::{Duration, TimeZone, Utc};

use crate::care::{forget, repair};
use crate::model::extent::ByteRange;
use crate::model::image_map::tests::{encode_v1, random_map, Rng};
use crate::model::image_map::{ImageMap, Piece, Segment};
use crate::model::name::DiskName;
use crate::model::snapshot::{SnapshotInfo, SnapshotKind};
use crate::store::catalog::KEYFRAME_EVERY;
use crate::store::repo::{NewSnapshot, Repository};

const SIZE: u64 = 1 << 30;

fn own(rng: &mut Rng, size: u64, segments: usize, chunks: u64) -> ImageMap {
    let m = random_map(rng, segments, chunks, size / (segments as u64 * 4).max(1));
    ImageMap::new(size, m.slice(ByteRange::new(0, size)).collect())
}

fn commit(repo: &Repository, parent: Option<&SnapshotInfo>, n: i64, own: ImageMap) -> SnapshotInfo {
    let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    repo.commit(NewSnapshot {
        disk: DiskName::parse("vm/sda").unwrap(),
        kind: match parent {
            None => SnapshotKind::Full,
            Some(_) => SnapshotKind::Incremental,
        },
        parent: parent.map(|p| p.id.clone()),
        time: t0 + Duration::seconds(n),
        granularity: 65536,
        label: String::new(),
        checkpoint: None,
        bitmap: None,
        stored_bytes: 0,
        own,
    })
    .unwrap()
}

/// What the image reads: holes and zero extents both read as zeroes.
fn content(m: &ImageMap) -> ImageMap {
    let data = m
        .segments
        .iter()
        .filter(|s| matches!(s.piece, Piece::Data { .. }))
        .copied()
        .collect::<Vec<Segment>>();
    ImageMap::new(m.size, data)
}

/// Own maps a snapshot's image needs below its stored base.
fn links_to_base(repo: &Repository, info: &SnapshotInfo) -> usize {
    let cat = repo.catalog();
    let mut cur = info.clone();
    let mut n = 0;
    while !cat.is_keyframe(&cur.disk, &cur.id).unwrap() {
        let Some(p) = cur.parent.clone() else { break };
        n += 1;
        cur = cat.get(&cur.disk, &p).unwrap().unwrap();
    }
    n
}

/// A chain of 50: a full with many segments, small incrementals, a few
/// large ones (keyframes by share), and size changes.
fn build_chain(repo: &Repository, rng: &mut Rng) -> Vec<(SnapshotInfo, ImageMap)> {
    let mut out: Vec<(SnapshotInfo, ImageMap)> = Vec::new();
    let full = own(rng, SIZE, 3000, 1 << 40);
    let info = commit(repo, None, 0, full.clone());
    out.push((info, full));
    for n in 1..50 {
        let size = match n {
            20 => SIZE / 2,
            21..=24 => SIZE / 2 + (n as u64) * 4096,
            _ => SIZE,
        };
        let segments = if n % 13 == 0 {
            6000
        } else {
            1 + rng.below(40) as usize
        };
        let top = own(rng, size, segments, 1 << 40);
        let (parent, parent_image) = out.last().unwrap();
        let image = parent_image.overlay(&top);
        let info = commit(repo, Some(parent), n, top);
        out.push((info, image));
    }
    out
}

fn check_all(repo: &Repository, chain: &[(SnapshotInfo, ImageMap)], exact: bool, what: &str) {
    let mut from_images = HashSet::new();
    for (info, image) in chain {
        let got = repo.image_map(info).unwrap();
        // What the mount and restore build from the same layers.
        let (base, tops) = repo
            .catalog()
            .image_layers(&info.disk, &info.id)
            .unwrap()
            .unwrap();
        let compact = crate::model::compact_map::CompactMap::overlay_all(&base, &tops);
        assert_eq!(compact.to_image_map(), got, "{what}: {}", info.reference());
        if exact {
            assert_eq!(&got, image, "{what}: {}", info.reference());
        } else {
            assert_eq!(
                content(&got),
                content(image),
                "{what}: {}",
                info.reference()
            );
        }
        assert!(
            links_to_base(repo, info) < KEYFRAME_EVERY,
            "{what}: {} is {} links below a stored map",
            info.reference(),
            links_to_base(repo, info)
        );
        from_images.extend(got.chunks());
    }
    // gc marks own maps: they must name exactly the images' chunks.
    let mut from_own = HashSet::new();
    for (info, _) in chain {
        from_own.extend(repo.own_map(info).unwrap().chunks());
    }
    assert_eq!(from_own, from_images, "{what}: own maps vs images");
}

#[test]
fn images_resolve_at_every_depth_and_survive_forget_and_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("r"), None).unwrap();
    let mut rng = Rng(0xdead_beef_1234_5678);
    let mut chain = build_chain(&repo, &mut rng);
    check_all(&repo, &chain, true, "committed");
    let stored: Vec<usize> = (0..chain.len())
        .filter(|&i| {
            let (info, _) = &chain[i];
            repo.catalog().is_keyframe(&info.disk, &info.id).unwrap()
        })
        .collect();
    // Both rules fire (every 16 links, and the large incrementals), and
    // most rows hold only their own map.
    assert!(
        stored.len() >= 3 && stored.len() <= 10,
        "keyframes {stored:?}"
    );
    assert!(stored.contains(&13), "share rule: {stored:?}");
    let (own_bytes, image_bytes) = repo.catalog().map_bytes().unwrap();
    assert!(image_bytes < own_bytes * 3, "{own_bytes} {image_bytes}");

    // Forget keyframes, their children, non-keyframes, and the full.
    let victims = [stored[1], stored[1] + 1, 5, stored[2], 0, chain.len() - 2];
    let mut ids: Vec<_> = victims.iter().map(|&i| chain[i].0.id.clone()).collect();
    ids.dedup();
    for id in ids {
        let i = chain.iter().position(|(s, _)| s.id == id).unwrap();
        let info = repo
            .catalog()
            .get(&chain[i].0.disk, &chain[i].0.id)
            .unwrap()
            .unwrap();
        forget::forget_one(&repo, &info).unwrap();
        chain.remove(i);
        // Parents and kinds changed: read them back.
        for (s, _) in chain.iter_mut() {
            *s = repo.catalog().get(&s.disk, &s.id).unwrap().unwrap();
        }
        check_all(&repo, &chain, false, &format!("after forgetting {id}"));
    }
    drop(repo);

    let report = repair::rebuild_catalog(
        &crate::store::backend::Location::Dir(dir.path().join("r")),
        &crate::store::repo::no_passphrase,
    )
    .unwrap();
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let repo = Repository::open(&dir.path().join("r")).unwrap();
    check_all(&repo, &chain, false, "rebuilt");
}

#[test]
fn schema_1_catalog_opens_and_grows() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("r");
    let repo = Repository::init(&root, None).unwrap();
    let mut rng = Rng(42);
    let full = own(&mut rng, SIZE, 500, 1 << 40);
    let mut chain = vec![(commit(&repo, None, 0, full.clone()), full)];
    for n in 1..4 {
        let top = own(&mut rng, SIZE, 20, 1 << 40);
        let image = chain.last().unwrap().1.overlay(&top);
        let info = commit(&repo, Some(&chain.last().unwrap().0), n, top);
        chain.push((info, image));
    }
    drop(repo);
    // What the previous version wrote: every row with both maps, in
    // encoding 1.
    {
        let conn = rusqlite::Connection::open(root.join("catalog.db")).unwrap();
        for (info, image) in &chain {
            let own = {
                let repo = Repository::open(&root).unwrap();
                repo.own_map(info).unwrap()
            };
            conn.execute(
                "UPDATE snapshots SET own_map = ?1, image_map = ?2 WHERE id = ?3",
                rusqlite::params![encode_v1(&own), encode_v1(image), info.id.as_str()],
            )
            .unwrap();
        }
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM snapshots WHERE substr(own_map, 1, 8) = 'strataM2'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0);
    }
    let repo = Repository::open(&root).unwrap();
    check_all(&repo, &chain, true, "schema 1");
    // New snapshots go on top of old rows; their rows are new-style.
    for n in 4..(4 + KEYFRAME_EVERY as i64 + 2) {
        let top = own(&mut rng, SIZE, 20, 1 << 40);
        let image = chain.last().unwrap().1.overlay(&top);
        let info = commit(&repo, Some(&chain.last().unwrap().0), n, top);
        chain.push((info, image));
    }
    check_all(&repo, &chain, true, "grown");
    assert!(repo
        .catalog()
        .is_keyframe(
            &chain[3 + KEYFRAME_EVERY].0.disk,
            &chain[3 + KEYFRAME_EVERY].0.id
        )
        .unwrap());
    assert!(!repo
        .catalog()
        .is_keyframe(&chain[4].0.disk, &chain[4].0.id)
        .unwrap());
    // forget of an old-style row folds it like any other.
    forget::forget_one(&repo, &chain[2].0).unwrap();
    chain.remove(2);
    for (s, _) in chain.iter_mut() {
        *s = repo.catalog().get(&s.disk, &s.id).unwrap().unwrap();
    }
    check_all(&repo, &chain, false, "old row forgotten");
}

#[test]
fn corrupt_blobs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("r");
    let repo = Repository::init(&root, None).unwrap();
    let mut rng = Rng(3);
    let full = commit(&repo, None, 0, own(&mut rng, SIZE, 10, 5));
    let inc = commit(&repo, Some(&full), 1, own(&mut rng, SIZE, 10, 5));
    drop(repo);
    let conn = rusqlite::Connection::open(root.join("catalog.db")).unwrap();
    conn.execute(
        "UPDATE snapshots SET own_map = X'7374726174614d32ff' WHERE id = ?1",
        [full.id.as_str()],
    )
    .unwrap();
    let repo = Repository::open(&root).unwrap();
    let err = repo.image_map(&inc).unwrap_err().to_string();
    assert!(err.contains(&full.id.to_string()), "{err}");
}
