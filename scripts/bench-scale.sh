#!/usr/bin/env bash
# Metadata at scale (issue #15), without the disk space: nbdkit's
# sparse-random plugin serves a huge virtual disk with PERCENT of it
# allocated in random runs (deterministic by seed). strata backs it up in
# full over NBD (skipping holes through base:allocation), then takes INCS
# incrementals whose change lists name CHANGE_PERMILLE/1000 of the disk
# as scattered 64 KiB clusters, all inside allocated runs (so every one
# holds data and is stored as a new grouped chunk, as a real incremental
# would be; the disk itself does not change, which only makes the
# unchanged-range check trivially pass). Reports peak RSS and time of
# every backup, catalog and manifest bytes after the full and after the
# incrementals, the time to the first byte of the newest image through
# the mount, and the mount's RSS after reading ten images.
#
#   scripts/bench-scale.sh                  256 GiB, 30 incrementals of 0.1%
#   SCALE_SIZE=1T scripts/bench-scale.sh    the issue's size (~10 GiB + 30 GiB of chunks)
#   SCALE_DIR=/path SCALE_INCS=5 ...        scratch directory, fewer incrementals
#   SCALE_REUSE=1 ...                       only the mount part, on the repository
#                                           an earlier run left in SCALE_DIR
#   SCALE_STRATA=/path/to/strata ...        another build (to compare before/after)
#
# Needs root (FUSE), nbdkit (sparse-random plugin), nbdinfo, python3.
# (nbdkit's cow filter would let the disk change for real, but nbdkit
# 1.32 aborts in block status on it at these sizes.)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SCALE_SIZE:-256G}
INCS=${SCALE_INCS:-30}
PERCENT=${SCALE_PERCENT:-1}
PERMILLE=${SCALE_CHANGE_PERMILLE:-1}
W=${SCALE_DIR:-/var/tmp/strata-scale}
cargo build --release --quiet
S=${SCALE_STRATA:-$PWD/target/release/strata}
REUSE=${SCALE_REUSE:-}
if [ -n "$REUSE" ]; then
    [ -d "$W/repo" ] && [ -f "$W/alloc.json" ] || { echo "SCALE_REUSE: no earlier run in $W" >&2; exit 1; }
    mkdir -p "$W/mnt"
else
    rm -rf "$W"; mkdir -p "$W/mnt"
fi
export STRATA_REPO="$W/repo"
SOCK="$W/nbd.sock"
NBDKIT_PID=""
cleanup() {
    grep -q " $W/mnt " /proc/self/mountinfo && { "$S" umount "$W/mnt" || umount -l "$W/mnt"; }
    [ -n "$NBDKIT_PID" ] && kill "$NBDKIT_PID" 2>/dev/null || true
}
trap cleanup EXIT

if [ -z "$REUSE" ]; then
nbdkit -f -U "$SOCK" sparse-random size="$SIZE" percent="$PERCENT" seed=1 &
NBDKIT_PID=$!
URI="nbd+unix:///?socket=$SOCK"
# sparse-random lays out its runs before it listens.
for _ in $(seq 600); do [ -S "$SOCK" ] && nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
BYTES=$(nbdinfo --size "$URI")
nbdinfo --map --json "$URI" > "$W/alloc.json"

"$S" init -q
meta() { # catalog (after a checkpoint of the WAL) and manifests, in bytes
    python3 - "$W/repo" <<'EOF'
import os, sqlite3, sys
root = sys.argv[1]
c = sqlite3.connect(os.path.join(root, "catalog.db"))
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
own, image = c.execute("SELECT sum(length(own_map)), sum(length(image_map)) FROM snapshots").fetchone()
c.close()
cat = os.path.getsize(os.path.join(root, "catalog.db"))
man = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "manifests")) for f in fs)
print(f"catalog {cat} manifests {man} total {cat + man} (own maps {own}, stored image maps (keyframes) {image})")
EOF
}
run() { # label, command...: wall time and peak RSS
    local label=$1; shift
    /usr/bin/time -f "$label: %e s, peak RSS %M KiB" -o "$W/time.txt" "$@" >/dev/null
    cat "$W/time.txt"
}

echo "disk: $SIZE ($BYTES bytes), $PERCENT% allocated; $INCS incrementals of $PERMILLE/1000 of the disk"
run "full" "$S" -q backup --disk vm/big "$URI"
echo "after the full: $(meta)"
for i in $(seq "$INCS"); do
    python3 - "$W/alloc.json" "$BYTES" "$PERMILLE" "$i" > "$W/changes.json" <<'EOF'
import json, random, sys
alloc, size, permille, seed = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
C = 65536
runs = [(e["offset"], e["length"]) for e in alloc if e["type"] & 1 == 0]  # allocated
clusters = [o for off, ln in runs for o in range((off + C - 1) // C * C, off + ln - C + 1, C)]
random.seed(seed)
want = min(len(clusters), size * permille // 1000 // C)
pick = sorted(random.sample(clusters, want))
print(json.dumps({"size": size, "extents": [{"offset": o, "length": C} for o in pick]}))
EOF
    run "incremental $i" "$S" -q backup --disk vm/big "$URI" --changes "$W/changes.json"
done
echo "after $INCS incrementals: $(meta)"
fi

"$S" mount "$W/mnt"
MPID=$(grep " $W/mnt " /proc/self/mountinfo | grep -o 'strata:[0-9]*' | cut -d: -f2)
newest=$(ls "$W/mnt/vm/big/" | grep -v latest | grep raw | tail -1)
python3 - "$W/mnt/vm/big/$newest" <<'EOF'
import sys, time
t = time.monotonic()
with open(sys.argv[1], "rb") as f:
    f.read(1)
print(f"mount: first byte of the newest image ({sys.argv[1].rsplit('/', 1)[1]}): {time.monotonic() - t:.3f} s")
EOF
# The ten newest images, each read where it holds data: 64 MiB from the
# first allocated run (and the first byte), all kept open together; the
# server's memory is read while they are open. (Before 2026-12-02 this
# opened every image, then kept the newest ten open: the peak counted the
# maps of all 31.)
python3 - "$W/alloc.json" "$W/mnt/vm/big" "$MPID" <<'EOF'
import json, os, sys
alloc, d, pid = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
first = next(e["offset"] for e in alloc if e["type"] & 1 == 0)
names = [n for n in sorted(os.listdir(d)) if n.endswith(".raw") and n != "latest.raw"][-10:]
files = [open(os.path.join(d, n), "rb") for n in names]
for f in files:
    f.read(1)
    os.pread(f.fileno(), 64 << 20, first)
print(f"mount: {len(files)} images open, 64 MiB of data read from each")
mem = " ".join(" ".join(l.split()) for l in open(f"/proc/{pid}/status") if l.startswith(("VmHWM", "VmRSS")))
print(f"mount server (pid {pid}), {len(files)} images open: {mem}")
EOF
sleep 1
echo "mount server (pid $MPID), images closed: $(grep -E 'VmHWM|VmRSS' /proc/"$MPID"/status | tr -s ' \n' ' ')"
"$S" umount "$W/mnt"
du -sh "$W/repo/chunks" | sed 's/^/chunks: /'
