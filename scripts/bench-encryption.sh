#!/usr/bin/env bash
# An encrypted repository against an unencrypted one, side by side in one
# run on one image, for docs/PERFORMANCE.md (the encryption issue's bars:
# full backup, restore, mount cold sequential read and verify of an
# encrypted repository each at least 85% of the plain repository's speed),
# and restic (which always encrypts) on the same image for the older bars.
#
#   scripts/bench-encryption.sh               2 GiB image
#   BENCH_GIB=4 scripts/bench-encryption.sh   the issues' size
#   BENCH_DIR=/path ...                       scratch space (needs ~4x GIB)
#   BENCH_SETTLE=0 ...                        no wait after cache drops
#
# Each step runs three times, plain and encrypted alternated, and the medians
# are compared. Needs root (drop_caches, FUSE), qemu-utils, fuse3, python3,
# and restic for the restic rows (skipped when it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
GIB=${BENCH_GIB:-2}
W=${BENCH_DIR:-/var/tmp/strata-bench-enc}
SETTLE=${BENCH_SETTLE:-10}
cargo build --release --quiet
S="$PWD/target/release/strata"
rm -rf "$W"; mkdir -p "$W"
echo "bench passphrase" > "$W/pw"
export STRATA_PASSWORD_FILE="$W/pw" RESTIC_PASSWORD=bench
mounted() { grep -q " $1 " /proc/self/mountinfo; }
cleanup() {
    if mounted "$W/mnt"; then "$S" umount "$W/mnt" 2>/dev/null || umount -l "$W/mnt" || true; fi
}
trap cleanup EXIT

# See scripts/bench.sh: cold caches, and free memory settled back to the
# hypervisor so that every tool starts from the same memory state.
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; sleep "$SETTLE"; }
# t NAME CMD...: run; print and remember the seconds.
t() {
    local name=$1; shift
    sync
    /usr/bin/time -f "%e %M" -o "$W/.time" "$@" > /dev/null 2> "$W/.err" || { cat "$W/.err"; exit 1; }
    read -r secs kb < "$W/.time"
    printf '%-40s %8.2f s %8d MiB\n' "$name" "$secs" $((kb / 1024))
    echo "$secs" > "$W/.last"
}
median() { python3 -c 'import statistics, sys; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }
# ratio PLAIN ENC: the encrypted repository's speed as a share of the plain one's.
ratio() { python3 -c "print(f'{$1 / $2 * 100:.0f}%')"; }

echo "# strata encryption benchmark: ${GIB} GiB image, $(nproc) cores, $(date -u +%FT%TZ)"
python3 scripts/benchdata.py base "$W/disk.raw" "$GIB"
cat "$W/disk.raw" > /dev/null

echo; echo "## full backup (source in the page cache), fresh repositories"
declare -A B
for k in 1 2 3; do
    for kind in plain enc; do
        flag=""; [ $kind = enc ] && flag="--encrypt"
        "$S" --repo "$W/$kind$k" init $flag > /dev/null
        t "strata backup ($kind, round $k)" "$S" --repo "$W/$kind$k" -q backup --disk bench "$W/disk.raw"
        B[$kind]="${B[$kind]:-} $(cat "$W/.last")"
    done
done
BP=$(median ${B[plain]}); BE=$(median ${B[enc]})

echo; echo "## restore (cold cache)"
declare -A R
for k in 1 2 3; do
    for kind in plain enc; do
        rm -f "$W/out.raw"; drop
        t "strata restore ($kind, round $k)" "$S" --repo "$W/${kind}1" -q restore bench@latest "$W/out.raw"
        R[$kind]="${R[$kind]:-} $(cat "$W/.last")"
    done
done
cmp "$W/out.raw" "$W/disk.raw"
rm -f "$W/out.raw"
RP=$(median ${R[plain]}); RE=$(median ${R[enc]})

echo; echo "## mount, cold sequential read (dd bs=1M)"
mkdir -p "$W/mnt"
declare -A M
for k in 1 2 3; do
    for kind in plain enc; do
        "$S" --repo "$W/${kind}1" mount "$W/mnt" > /dev/null
        drop
        t "mount read ($kind, round $k)" dd if="$W/mnt/bench/latest.raw" of=/dev/null bs=1M
        M[$kind]="${M[$kind]:-} $(cat "$W/.last")"
        "$S" umount "$W/mnt" > /dev/null
    done
done
MP=$(median ${M[plain]}); ME=$(median ${M[enc]})

echo; echo "## verify (cold cache)"
declare -A V
for k in 1 2 3; do
    for kind in plain enc; do
        drop
        t "strata verify ($kind, round $k)" "$S" --repo "$W/${kind}1" -q verify
        V[$kind]="${V[$kind]:-} $(cat "$W/.last")"
    done
done
VP=$(median ${V[plain]}); VE=$(median ${V[enc]})

if command -v restic > /dev/null; then
    echo; echo "## restic on the same image (it always encrypts)"
    export RESTIC_REPOSITORY="$W/restic"
    restic init -q > /dev/null
    t "restic backup" restic backup -q "$W/disk.raw"; RB=$(cat "$W/.last")
    drop
    t "restic restore (cold)" restic restore -q latest --target "$W/rr"; RR=$(cat "$W/.last")
    rm -rf "$W/rr"
fi

echo; echo "## summary (medians of three; encrypted speed as a share of plain, bar >= 85%)"
printf '%-20s %8s %8s %8s\n' step plain enc share
printf '%-20s %8.2f %8.2f %8s\n' "full backup" "$BP" "$BE" "$(ratio "$BP" "$BE")"
printf '%-20s %8.2f %8.2f %8s\n' "restore" "$RP" "$RE" "$(ratio "$RP" "$RE")"
printf '%-20s %8.2f %8.2f %8s\n' "mount cold read" "$MP" "$ME" "$(ratio "$MP" "$ME")"
printf '%-20s %8.2f %8.2f %8s\n' "verify" "$VP" "$VE" "$(ratio "$VP" "$VE")"
if [ -n "${RB:-}" ]; then
    python3 -c "print(f'encrypted strata vs restic: backup {$RB / $BE:.2f}x, restore {$RR / $RE:.2f}x faster')"
fi
