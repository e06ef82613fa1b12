#!/usr/bin/env bash
# Build strata and show the main job on a small disk: make a disk with QEMU,
# back it up full and then incrementally from a dirty bitmap, restore both
# snapshots and compare them with the disk as it was. Also mounts the
# repository when FUSE is available.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --quiet
strata="$PWD/target/release/strata"
work=$(mktemp -d /tmp/strata-demo.XXXXXX)
mnt="$work/mnt"
cleanup() {
    if mountpoint -q "$mnt" 2>/dev/null; then "$strata" umount "$mnt" || fusermount3 -uz "$mnt" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
export STRATA_REPO="$work/repo"
cd "$work"

echo "== a 64 MiB qcow2 with a persistent dirty bitmap, written by qemu-io"
qemu-img create -q -f qcow2 disk.qcow2 64M
qemu-img bitmap --add disk.qcow2 since-last
qemu-io -f qcow2 -c 'write -P 0xaa 0 8M' -c 'write -P 0xbb 32M 4M' disk.qcow2 >/dev/null
qemu-img convert -O raw disk.qcow2 monday.raw

echo "== full backup"
"$strata" init
"$strata" backup --disk vm1/vda monday.raw --label monday
qemu-img bitmap --clear disk.qcow2 since-last

echo "== more writes; the bitmap records them"
qemu-io -f qcow2 -c 'write -P 0xcc 1M 64k' -c 'write -z 32M 1M' -c 'discard 4M 1M' disk.qcow2 >/dev/null
qemu-img convert -O raw disk.qcow2 tuesday.raw
nbdinfo --map=qemu:dirty-bitmap:since-last --json -- [ qemu-nbd -r -f qcow2 -B since-last disk.qcow2 ] > dirty.json

echo "== incremental backup of just the dirty ranges"
"$strata" backup --disk vm1/vda tuesday.raw --changes dirty.json --label tuesday
"$strata" snapshots
"$strata" map --own vm1/vda@latest

echo "== restore both and compare with the disk as it was"
first=$("$strata" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["ref"])')
"$strata" restore "$first" r-monday.raw
"$strata" restore vm1/vda@latest r-tuesday.raw
cmp r-monday.raw monday.raw && cmp r-tuesday.raw tuesday.raw
echo "restored images are identical to the disk at each moment"
du -h --apparent-size r-tuesday.raw | sed 's/^/apparent: /'
du -h r-tuesday.raw | sed 's/^/allocated: /'

if "$strata" help mount >/dev/null 2>&1 && [ -e /dev/fuse ]; then
    echo "== mount and restore with cp"
    mkdir "$mnt"
    "$strata" mount "$mnt"
    find "$mnt" | sort
    cp --sparse=always "$mnt/vm1/vda/latest.raw" cp-latest.raw
    cmp cp-latest.raw tuesday.raw && echo "cp from the mount is identical"
    "$strata" umount "$mnt"
fi
if "$strata" help verify >/dev/null 2>&1; then
    echo "== verify"
    "$strata" verify
fi
echo "demo OK"
