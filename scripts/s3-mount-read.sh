#!/usr/bin/env bash
# One cold sequential read of an image through a strata mount, with what it
# cost: wall time, CPU of the mount (and of the S3 server, if its pid is
# given), the mount's peak RSS, and from its -vv log the ranged GETs it made
# and the bytes they fetched. For measuring changes to the read path by
# hand (docs/PERFORMANCE.md, run B8); scripts/bench-s3.sh is the benchmark.
#
#   scripts/s3-mount-read.sh REPO [IMAGE]     IMAGE in the mount, default bench/latest.raw
#
# Environment: STRATA (the binary, default target/release/strata), the
# repository's AWS_* variables, SERVER_PID (the S3 server's, optional),
# CACHE_SIZE (default 512M), WORK (scratch directory, default a new one).
# Every run starts with an empty cache directory (so the pack index is
# synced at mount time, before the read) and dropped page caches. As root.
set -euo pipefail
repo=$1
image=${2:-bench/latest.raw}
S=${STRATA:-$(dirname "$0")/../target/release/strata}
W=${WORK:-$(mktemp -d)}
M=$W/mnt
mkdir -p "$M"
rm -rf "$W/cache"
cleanup() {
    if grep -q " $M " /proc/self/mountinfo; then "$S" umount "$M" > /dev/null 2>&1 || umount -l "$M"; fi
}
trap cleanup EXIT
STRATA_CACHE_DIR=$W/cache "$S" --repo "$repo" -vv mount --foreground \
    --cache-size "${CACHE_SIZE:-512M}" "$M" 2> "$W/mount.log" &
deadline=$((SECONDS + 60))
until grep -q " $M " /proc/self/mountinfo; do
    [ "$SECONDS" -lt "$deadline" ] || { cat "$W/mount.log" >&2; exit 1; }
    sleep 0.1
done
pid=$(awk -v m="$M" '$5 == m { for (i = 6; i <= NF; i++) if ($i == "-") { split($(i+2), a, ":"); print a[2] } }' /proc/self/mountinfo)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sync; echo 3 > /proc/sys/vm/drop_caches; sleep 2
gets0=$(grep -c "s3 GET packs" "$W/mount.log" || true)
m0=$(cpu "$pid"); s0=$([ -n "${SERVER_PID:-}" ] && cpu "$SERVER_PID" || echo 0)
t0=$(date +%s.%N)
dd if="$M/$image" of=/dev/null bs=16M 2> /dev/null
t1=$(date +%s.%N)
m1=$(cpu "$pid"); s1=$([ -n "${SERVER_PID:-}" ] && cpu "$SERVER_PID" || echo 0)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
cleanup
tick=$(getconf CLK_TCK)
reads=$(grep "s3 GET packs" "$W/mount.log" | tail -n +$((gets0 + 1)) || true)
printf 'wall %.2f s, mount %.2f CPU s, server %.2f CPU s, peak RSS %d MiB, %d GETs (%d while mounting) for %d MiB\n' \
    "$(echo "$t1 - $t0" | bc)" "$(echo "($m1 - $m0) / $tick" | bc -l)" "$(echo "($s1 - $s0) / $tick" | bc -l)" \
    $((hwm / 1024)) "$(printf '%s' "$reads" | grep -c . || true)" "$gets0" \
    "$(printf '%s\n' "$reads" | grep -o '+[0-9]*\]' | tr -d '+]' | awk '{s += $1} END {printf "%d", s / 1048576}')"
