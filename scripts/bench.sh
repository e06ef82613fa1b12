#!/usr/bin/env bash
# Side-by-side benchmarks for docs/PERFORMANCE.md. Every number in one run,
# on one machine, against the named peer: restic, zstd, qemu-img convert of
# a qcow2 chain, qemu-storage-daemon's FUSE export, restic mount, dd.
#
#   scripts/bench.sh                  4 GiB image (the issues' size)
#   BENCH_GIB=1 scripts/bench.sh      quicker
#   BENCH_DIR=/path scripts/bench.sh  where the scratch data goes (needs ~5x GIB)
#   BENCH_SETTLE=0 scripts/bench.sh   no wait after cache drops (see drop below)
#
# Needs root (drop_caches, FUSE) and: qemu-utils, restic, fuse3, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
GIB=${BENCH_GIB:-4}
W=${BENCH_DIR:-/var/tmp/strata-bench}
DEPTH=${BENCH_DEPTH:-64}
cargo build --release --quiet
S="$PWD/target/release/strata"
rm -rf "$W"; mkdir -p "$W"
export STRATA_REPO="$W/repo" RESTIC_REPOSITORY="$W/restic" RESTIC_PASSWORD=bench
QSD_PID=""
mounted() { grep -q " $1 " /proc/self/mountinfo; }
cleanup() {
    for m in "$W/mnt"; do
        mounted "$m" && { "$S" umount "$m" 2>/dev/null || umount -l "$m" || true; }
    done
    [ -n "$QSD_PID" ] && kill "$QSD_PID" 2>/dev/null || true
    [ -n "${RESTIC_MOUNT_PID:-}" ] && kill -INT "$RESTIC_MOUNT_PID" 2>/dev/null || true
    for m in "$W/qfile" "$W/rmnt"; do mounted "$m" && umount -l "$m"; done || true
}
trap cleanup EXIT

# drop: cold cache, and memory in one known state for every tool. This VM
# hands free memory back to the hypervisor (virtio-balloon free page
# reporting) a few seconds after it is freed; touching such a page again
# costs ~10 us (dd of fresh pages: 370 MB/s, of pages just freed: 2.8
# GB/s). Without the wait, a run's speed depended on how long ago the step
# before it freed its pages: qemu-img convert took 3.4-9.9 s on one
# unchanged input. After BENCH_SETTLE seconds all free memory is returned.
SETTLE=${BENCH_SETTLE:-10}
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; sleep "$SETTLE"; }
# t NAME CMD...: run, print "NAME seconds maxrss_MiB". Dirty data of earlier
# steps is flushed first, so that nobody's time includes another's writeback
# (strata's commit uses syncfs, which would flush it).
t() {
    local name=$1; shift
    sync
    /usr/bin/time -f "%e %M" -o "$W/.time" "$@" > /dev/null 2> "$W/.err" || { cat "$W/.err"; exit 1; }
    read -r secs kb < "$W/.time"
    printf '%-44s %8.2f s %8d MiB\n' "$name" "$secs" $((kb / 1024))
    echo "$secs" > "$W/.last"
}
mbps() { python3 -c "print(f'{$1 / 2**20 / $2:.0f} MiB/s')"; }
# median X...: the middle value. Timings this noisy are taken three times.
median() { python3 -c 'import statistics, sys; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }
# ddread NAME FILE: sequential read throughput with dd bs=1M (bytes/s in .rate)
ddread() {
    local out
    out=$(dd if="$2" of=/dev/null bs=1M 2>&1 | tail -1)
    printf '%-44s %s\n' "$1" "$(echo "$out" | awk -F, '{print $NF}')"
    echo "$out" | awk '{print $1 / $(NF-3)}' > "$W/.rate"
}

echo "# strata benchmark: ${GIB} GiB image, $(nproc) cores, $(date -u +%FT%TZ)"
python3 scripts/benchdata.py base "$W/disk.raw" "$GIB"
SIZE=$(stat -c %s "$W/disk.raw")
ALLOC=$(( $(stat -c %b "$W/disk.raw") * 512 ))
echo "image: $SIZE bytes virtual, $ALLOC allocated"
cp --sparse=always "$W/disk.raw" "$W/state.raw"

echo; echo "## full backup (page cache warm for all)"
cat "$W/disk.raw" > /dev/null
t "zstd -1 -T2 (compress only)" sh -c "zstd -q -1 -T2 -c '$W/disk.raw' > /dev/null"; ZSTD=$(cat "$W/.last")
restic init -q > /dev/null
t "restic backup" restic backup -q "$W/disk.raw"; RESTIC=$(cat "$W/.last")
"$S" init > /dev/null
t "strata backup (full)" "$S" -q backup --disk bench "$W/disk.raw"; FULLS=$(cat "$W/.last")
# Twice more, into empty repositories kept until the end (deleting many
# files makes creating files slow here for the next half minute).
for k in 2 3; do
    STRATA_REPO="$W/repo-full$k" "$S" init > /dev/null
    t "strata backup (full, empty repo $k)" env STRATA_REPO="$W/repo-full$k" "$S" -q backup --disk bench "$W/disk.raw"
    FULLS="$FULLS $(cat "$W/.last")"
done
FULL=$(median $FULLS)
echo "strata full, median of three: $FULL s"
echo "strata/restic speed: $(python3 -c "print(f'{$RESTIC/$FULL:.2f}x')")   strata/zstd speed: $(python3 -c "print(f'{$ZSTD/$FULL:.2f}')")"
echo "strata full: $(mbps "$ALLOC" "$FULL") of allocated data"

echo; echo "## incrementals (3% of clusters changed each) and the equivalent qcow2 chain"
qemu-img convert -O qcow2 "$W/disk.raw" "$W/q0.qcow2"
for i in $(seq 1 8); do
    python3 scripts/benchdata.py change "$W/state.raw" 3 "$i" "$W/c$i.json"
    if [ "$i" -le 3 ]; then
        t "strata backup --changes (3%), #$i" "$S" -q backup --disk bench "$W/state.raw" --changes "$W/c$i.json"
        INCS="${INCS:-} $(cat "$W/.last")"
    else
        "$S" -q backup --disk bench "$W/state.raw" --changes "$W/c$i.json" > /dev/null
    fi
    # Each layer holds only the clusters this step changed, as a qcow2
    # incremental written by blockdev-backup sync=bitmap would.
    qemu-img create -q -f qcow2 -b "$W/q$((i-1)).qcow2" -F qcow2 "$W/q$i.qcow2"
    python3 scripts/benchdata.py qemu-io "$W/state.raw" "$W/c$i.json" "$W/parts" |
        qemu-io -f qcow2 "$W/q$i.qcow2" > /dev/null
    rm -rf "$W/parts"
    # restic gets the same nine states, for the verify and prune comparisons
    cp --sparse=always "$W/state.raw" "$W/disk.raw" && restic backup -q "$W/disk.raw" > /dev/null
done
INC=$(median $INCS)
echo "incremental/full time (medians): $(python3 -c "print(f'{100*$INC/$FULL:.1f}%')")"

echo; echo "## restore of the newest of full + 8 incrementals (cold cache)"
QIS=""; SRS=""
for k in 1 2 3; do
    drop; t "qemu-img convert -O raw (qcow2 chain)" qemu-img convert -O raw "$W/q8.qcow2" "$W/out-q.raw"; QIS="$QIS $(cat "$W/.last")"
    drop; t "strata restore" "$S" -q restore bench@latest "$W/out-s.raw"; SRS="$SRS $(cat "$W/.last")"
    cmp "$W/out-s.raw" "$W/state.raw" && cmp "$W/out-q.raw" "$W/state.raw"
    rm -f "$W/out-q.raw" "$W/out-s.raw"
done
echo "strata/qemu-img speed (medians): $(python3 -c "print(f'{$(median $QIS)/$(median $SRS):.2f}x')")"

echo; echo "## NBD pull over a unix socket (qemu-nbd -e 3), page cache warm"
qemu-img convert -O qcow2 "$W/disk.raw" "$W/pull.qcow2"
qemu-img bitmap --add "$W/pull.qcow2" b1
NBD_SOCK="$W/pull.sock"
serve() { qemu-nbd -r -f qcow2 -B b1 -e 3 --persistent --fork --socket "$NBD_SOCK" "$W/pull.qcow2"; cat "$W/pull.qcow2" > /dev/null; }
serve
# The raw file and the export, each into an empty repository (everything
# compressed and stored, as in a first full backup), then each into the
# benchmark repository, which holds the same data (deduplicated). Each pair
# runs back to back: this machine's speed drifts over minutes.
for r in file pull; do STRATA_REPO="$W/repo-$r" "$S" init > /dev/null; done
t "strata backup raw file (full, empty repo)" env STRATA_REPO="$W/repo-file" "$S" -q backup --disk pull "$W/disk.raw"; FILE=$(cat "$W/.last")
t "strata backup nbd+unix:// (full, empty repo)" env STRATA_REPO="$W/repo-pull" "$S" -q backup --disk pull "nbd+unix:///?socket=$NBD_SOCK"; PULL=$(cat "$W/.last")
rm -rf "$W/repo-file" "$W/repo-pull"
t "strata backup raw file (full, deduplicated)" "$S" -q backup --disk pull "$W/disk.raw"; FILED=$(cat "$W/.last")
t "strata backup nbd+unix:// (full, deduplicated)" "$S" -q backup --disk pull "nbd+unix:///?socket=$NBD_SOCK"; PULLD=$(cat "$W/.last")
pkill -f "qemu-nbd.*$NBD_SOCK" || true
echo "pull/file speed: $(python3 -c "print(f'{$FILE/$PULL:.2f}')") (empty repo), $(python3 -c "print(f'{$FILED/$PULLD:.2f}')") (deduplicated)"
# The same kind of 3% change, written by qemu-io so that the bitmap records it.
python3 -c '
import random
r = random.Random(5); clusters = (4 << 30) // 65536 * '"$GIB"' // 4
for c in sorted(r.sample(range(clusters), clusters * 3 // 100)):
    print(f"write -P {c % 251} {c * 65536} 64k")' > "$W/pull.cmds"
qemu-io -f qcow2 "$W/pull.qcow2" < "$W/pull.cmds" > /dev/null
serve
t "strata backup nbd+unix:// --bitmap (3%)" "$S" -q backup --disk pull "nbd+unix:///?socket=$NBD_SOCK" --bitmap b1; PINC=$(cat "$W/.last")
pkill -f "qemu-nbd.*$NBD_SOCK" || true
echo "incremental pull/full pull time: $(python3 -c "print(f'{100*$PINC/$PULLD:.1f}%')") (of the deduplicated full pull)"

echo; echo "## push: blockdev-backup sync=full from qemu-storage-daemon"
qemu-storage-daemon --blockdev driver=file,node-name=f0,filename="$W/pull.qcow2" \
    --blockdev driver=qcow2,node-name=disk0,file=f0 \
    --chardev socket,id=qmp,path="$W/qmp.sock",server=on,wait=off --monitor chardev=qmp \
    --pidfile "$W/qsd2.pid" --daemonize
QSD_PID=$(cat "$W/qsd2.pid")
cat "$W/pull.qcow2" > /dev/null
qemu-img create -q -f qcow2 "$W/target.qcow2" "$SIZE"
t "blockdev-backup into a local qcow2" python3 scripts/qmp.py "$W/qmp.sock" backup-file "$W/target.qcow2"; QF=$(cat "$W/.last")
# push NAME REPO: time blockdev-backup into strata receive, commit included
push() {
    rm -f "$W/recv.sock"
    STRATA_REPO="$2" "$S" receive --disk push --size "$SIZE" --listen "nbd+unix:///?socket=$W/recv.sock" > "$W/recv.out" 2>&1 &
    RECV=$!
    while ! grep -q listening "$W/recv.out"; do sleep 0.1; done
    t "$1" sh -c "python3 scripts/qmp.py '$W/qmp.sock' backup-nbd '$W/recv.sock' && tail --pid=$RECV -f /dev/null"
}
STRATA_REPO="$W/repo-push" "$S" init > /dev/null
push "blockdev-backup into strata receive (empty repo)" "$W/repo-push"; QR=$(cat "$W/.last")
rm -rf "$W/repo-push"
push "blockdev-backup into strata receive (deduplicated)" "$STRATA_REPO"; QRD=$(cat "$W/.last")
kill "$QSD_PID"; tail --pid="$QSD_PID" -f /dev/null; QSD_PID=""
echo "receive/qcow2 speed: $(python3 -c "print(f'{$QF/$QR:.2f}')") (empty repo), $(python3 -c "print(f'{$QF/$QRD:.2f}')") (deduplicated)"
rm -f "$W/target.qcow2"

echo; echo "## verify of full + 8 incrementals (cold cache)"
drop; t "restic check --read-data" restic check -q --read-data; RC=$(cat "$W/.last")
drop; t "strata verify" "$S" -q verify; SV=$(cat "$W/.last")
echo "strata/restic speed: $(python3 -c "print(f'{$RC/$SV:.2f}x')")"

echo; echo "## mount: sequential read of the newest image (dd bs=1M)"
mkdir -p "$W/mnt"
"$S" mount "$W/mnt" > /dev/null
MPID=$(grep -o 'strata:[0-9]*' /proc/self/mountinfo | head -1 | cut -d: -f2)
IMG="$W/mnt/bench/latest.raw"
touch "$W/qfile"
qemu-storage-daemon --blockdev driver=file,node-name=f,filename="$W/q8.qcow2" \
    --blockdev driver=qcow2,node-name=q,file=f \
    --export type=fuse,id=e,node-name=q,mountpoint="$W/qfile",writable=off \
    --pidfile "$W/qsd.pid" --daemonize
QSD_PID=$(cat "$W/qsd.pid")
SCOLD=""; QCOLD=""
for k in 1 2 3; do
    drop; ddread "qemu-storage-daemon fuse export, cold" "$W/qfile"; QCOLD="$QCOLD $(cat "$W/.rate")"
    drop; ddread "strata mount, cold" "$IMG"; SCOLD="$SCOLD $(cat "$W/.rate")"
done
kill "$QSD_PID"; tail --pid="$QSD_PID" -f /dev/null; QSD_PID=""
mounted "$W/qfile" && umount -l "$W/qfile"
echo "strata/qemu-storage-daemon cold read (medians): $(python3 -c "print(f'{$(median $SCOLD)/$(median $QCOLD):.2f}x')")"
ddread "strata mount, second read (page cache)" "$IMG"
ddread "strata mount, third read (page cache)" "$IMG"
echo "strata mount, page cache: $(python3 scripts/folios.py "$IMG")"
echo "strata mount RSS after reading: $(awk '/VmHWM/ {print int($2/1024) " MiB"}' /proc/$MPID/status)"
# The raw file, same history as the image above: dropped, read once, then timed.
drop; cat "$W/state.raw" > /dev/null
ddread "plain raw file, second read (page cache)" "$W/state.raw"
ddread "plain raw file, third read (page cache)" "$W/state.raw"
echo "plain raw file, page cache: $(python3 scripts/folios.py "$W/state.raw")"
mkdir -p "$W/rmnt"
restic mount -q "$W/rmnt" & RESTIC_MOUNT_PID=$!
while [ ! -e "$W/rmnt/snapshots/latest" ]; do sleep 0.2; done
RFILE=$(find "$W/rmnt/snapshots/latest/" -name disk.raw | head -1)
drop; ddread "restic mount, cold" "$RFILE"
kill -INT "$RESTIC_MOUNT_PID"; wait "$RESTIC_MOUNT_PID" 2>/dev/null || true; RESTIC_MOUNT_PID=""
mounted "$W/rmnt" && umount -l "$W/rmnt"

echo; echo "## chain depth: depth $DEPTH vs depth 1 (0.1% changed per step)"
cp --sparse=always "$W/disk.raw" "$W/deep.raw"
"$S" -q backup --disk deep "$W/deep.raw" > /dev/null
for i in $(seq 1 "$DEPTH"); do
    python3 scripts/benchdata.py change "$W/deep.raw" 0.1 $((100 + i)) "$W/d.json"
    "$S" -q backup --disk deep "$W/deep.raw" --changes "$W/d.json" --check-unchanged 0 > /dev/null
done
FIRST_INC=$("$S" snapshots --disk deep --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[1]["path"])')
drop; ddread "depth 1, cold" "$W/mnt/$FIRST_INC"; D1=$(cat "$W/.rate")
drop; ddread "depth $DEPTH, cold" "$W/mnt/deep/latest.raw"; DN=$(cat "$W/.rate")
echo "depth $DEPTH/depth 1 throughput: $(python3 -c "print(f'{100*$DN/$D1:.1f}%')")"
"$S" umount "$W/mnt" > /dev/null

echo; echo "## peak RSS"
t "strata backup (full, second disk)" "$S" -q backup --disk bench2 "$W/disk.raw"
t "strata restore" "$S" -q restore bench@latest "$W/out-s.raw"
rm -f "$W/out-s.raw"
echo; echo "## prune: remove 8 of 9 snapshots, gc included"
t "restic forget --keep-last 1 --prune" restic forget -q --keep-last 1 --prune; RP=$(cat "$W/.last")
t "strata prune --keep-last 1 --disk bench" "$S" -q prune --keep-last 1 --disk bench; SP=$(cat "$W/.last")
echo "strata time / restic time: $(python3 -c "print(f'{$SP/$RP:.3f}')")"
rm -rf "$W/repo-full2" "$W/repo-full3"
echo "done"
