#!/usr/bin/env bash
# Repositories on object storage (issue #17), side by side with restic in
# one run against one SeaweedFS server (weed mini, started here on ports of
# its own on 127.0.0.1, stopped at the end), for docs/PERFORMANCE.md:
#
#   - the limit: what the server itself takes and gives (scripts/s3-limit.sh:
#     parallel PUTs and GETs of 1 MiB objects), at the start and at the end;
#     and, for orientation, the same at the size of strata's own objects;
#   - full backup into S3 vs `restic backup` into S3 (bar >= 3x);
#   - 3% incrementals (change lists, as scripts/bench.sh) into S3 vs the same
#     into a local directory repository (bar <= 2x);
#   - `strata copy` of full + 8 incrementals from a local directory
#     repository to S3 vs `restic copy` of the same 9 states from a local
#     restic repository to S3 (bar >= 2x);
#   - restore of the newest image from S3 vs `restic restore` from S3 (bar
#     >= 3x); every restored image is compared with the source (cmp);
#   - mount, cold sequential read (dd) of the newest image from S3 vs
#     `restic mount` of S3 (>= 3x) and vs a strata mount of the local
#     repository (>= 50%); cold: page cache dropped, chunk cache empty;
#   - peak RSS of backup, restore, copy and mount (<= 256 MiB), and the
#     mount's chunk cache after its reads (<= --cache-size).
# Where a bar asks more of the server than it can do (the payload strata
# must move, in the time the bar allows, above the limit), strata moving it
# at >= 80% of the limit counts instead (issue #17); the summary says so.
#
# restic's restores and mounts read the S3 repository `restic copy` wrote
# (9 snapshots, the same states): restic's incrementals of this data are
# large (content-defined chunks around scattered 64 KiB changes), and a
# second S3 copy of them would not fit beside the rest on these machines.
#
#   scripts/bench-s3.sh                    2 GiB image (issue #17's orientation size)
#   BENCH_GIB=1 scripts/bench-s3.sh        quicker, half the space
#   BENCH_DIR=/path ...                    scratch data and the server's data (~8x GIB
#                                          at the peak; checked before it starts)
#   BENCH_SETTLE=0 ...                     no wait after cache drops (see scripts/bench.sh)
#   BENCH_ROUNDS=1 ...                     restore and mount rounds (default 3, medians)
#   BENCH_CACHE_SIZE=512M ...              the mount's --cache-size
#   BENCH_LIMIT_MIB=512 ...                MiB per direction and parallelism in each
#                                          limit measurement
#   BENCH_STRATA=/path/to/strata ...       another build (default: cargo build --release)
#
# Needs root (drop_caches, FUSE), restic, weed (scripts/install-deps.sh),
# curl, python3 (the image comes from scripts/benchdata.py, no qemu).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/weed-mini.sh
GIB=${BENCH_GIB:-2}
W=${BENCH_DIR:-/var/tmp/strata-bench-s3}
SETTLE=${BENCH_SETTLE:-10}
ROUNDS=${BENCH_ROUNDS:-3}
CACHE_SIZE=${BENCH_CACHE_SIZE:-512M}
LIMIT_MIB=${BENCH_LIMIT_MIB:-512}
if [ -n "${BENCH_STRATA:-}" ]; then
    S=$BENCH_STRATA
else
    cargo build --release --quiet
    S="${CARGO_TARGET_DIR:-$PWD/target}/release/strata"
fi
command -v weed > /dev/null || { echo "no weed: scripts/install-deps.sh installs it" >&2; exit 1; }
command -v restic > /dev/null || { echo "no restic" >&2; exit 1; }
rm -rf "$W"; mkdir -p "$W"
# At the peak (the copies): the image, two local and three S3 repositories
# of strata (~0.65x GIB each), restic's local repository and its S3 copy
# (~2.5x GIB each).
avail=$(df -k --output=avail "$W" | tail -1)
need=$((8 * GIB << 20))
[ "$avail" -ge "$need" ] || { echo "$W: $((avail >> 20)) GiB free, needs ~$((need >> 20)) GiB (BENCH_GIB=1 needs half)" >&2; exit 1; }

WEED_PID=""; PORTS=(); RESTIC_MOUNT_PID=""
mounted() { grep -q " $1 " /proc/self/mountinfo; }
cleanup() {
    for m in "$W/mnt" "$W/lmnt"; do
        if mounted "$m"; then "$S" umount "$m" > /dev/null 2>&1 || umount -l "$m" || true; fi
    done
    if [ -n "$RESTIC_MOUNT_PID" ]; then kill -INT "$RESTIC_MOUNT_PID" 2>/dev/null || true; fi
    if mounted "$W/rmnt"; then umount -l "$W/rmnt" || true; fi
    # weed runs in a session and process group of its own (setsid).
    if [ -n "$WEED_PID" ]; then
        kill -KILL -- "-$WEED_PID" 2>/dev/null || true
        wait "$WEED_PID" 2>/dev/null || true
    fi
    for p in "${PORTS[@]}"; do rm -f /tmp/seaweedfs-*-"$p".sock; done
}
trap cleanup EXIT

# Timing, as scripts/bench.sh: caches dropped and freed memory settled back
# to the hypervisor before every cold step; dirty data flushed before every
# timed step.
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; sleep "$SETTLE"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
# io: this shell's rchar and wchar, which include those of every child it
# has waited for (the kernel adds a reaped child's I/O to its parent's).
# They count read/write/readv/writev/pread on files, pipes and sockets, not
# recv/recvfrom: the bytes a strata command read from chunk files are
# counted, those it received from the S3 server are not (see below).
io() {
    local k v
    while read -r k v; do
        case $k in rchar:) IO_R=$v ;; wchar:) IO_W=$v ;; esac
    done < /proc/$$/io
}
# t NAME CMD...: run, print "NAME seconds maxrss"; seconds in .last, KiB
# of peak RSS in .rss, bytes read and written (see io) in .rchar and .wchar,
# the command's stdout in .out.
t() {
    local name=$1; shift
    sync
    io; local r0=$IO_R w0=$IO_W
    /usr/bin/time -f "%e %M" -o "$W/.time" "$@" > "$W/.out" 2> "$W/.err" || {
        echo "FAILED: $name: $*" >&2; cat "$W/.out" "$W/.err" >&2; exit 1; }
    io
    read -r secs kb < "$W/.time"
    printf '%-50s %7.2f s %6d MiB RSS\n' "$name" "$secs" $((kb / 1024))
    echo "$secs" > "$W/.last"; echo "$kb" > "$W/.rss"
    echo $((IO_R - r0)) > "$W/.rchar"; echo $((IO_W - w0)) > "$W/.wchar"
}
# stored: the bytes stored, from a backup's "(..., N bytes stored)" in .out
stored() { grep -o '[0-9]* bytes stored' "$W/.out" | cut -d' ' -f1; }
py() { python3 -c "import statistics; median = lambda *a: statistics.median(a); print($1)"; }
median() { py "round(median($(echo "$*" | tr ' ' ',')), 3)"; }
maxof() { py "max([$(echo "$*" | tr ' ' ',')])"; }
mib() { py "f'{$1 / 2**20:.0f}'"; }
same() { cmp "$1" "$2" || { echo "FAILED: $3 differs from the source" >&2; exit 1; }; }

# ---------------------------------------------------------------- the server
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_REGION=us-east-1
# No bucket created by a PUT into it.
weed_start "$W/weed" -s3.autoCreateBucket=false
export AWS_DEFAULT_REGION=$AWS_REGION AWS_ENDPOINT_URL
EP=$AWS_ENDPOINT_URL
SIGN=(--aws-sigv4 "aws:amz:$AWS_REGION:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY")
deadline=$((SECONDS + 60))
until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "${SIGN[@]}" "$EP/")" = 200 ]; do
    kill -0 "$WEED_PID" 2>/dev/null || { tail -20 "$W/weed/weed.log"; echo "weed mini exited" >&2; exit 1; }
    [ "$SECONDS" -lt "$deadline" ] || { echo "weed mini: no answer in 60 s" >&2; exit 1; }
    sleep 0.1
done
# bucket NAME / unbucket NAME: CreateBucket / DeleteBucket. SeaweedFS keeps
# a bucket in volumes of its own and deletes them with it (a deleted
# object's space comes back only at a vacuum): scratch data goes into
# buckets that are deleted when done with.
bucket() {
    local code
    code=$(curl -s -o "$W/.resp" -w '%{http_code}' "${SIGN[@]}" -X PUT "$EP/$1")
    [ "$code" = 200 ] || { cat "$W/.resp"; echo "CreateBucket $1: $code" >&2; exit 1; }
}
unbucket() {
    local code
    code=$(curl -s -o "$W/.resp" -w '%{http_code}' "${SIGN[@]}" -X DELETE "$EP/$1")
    [ "$code" = 204 ] || { cat "$W/.resp"; echo "DeleteBucket $1: $code" >&2; exit 1; }
}
# objects BUCKET PREFIX: "KEY SIZE" of every object under PREFIX (ListObjectsV2).
objects() {
    python3 - "$EP" "$1" "$2" "$AWS_REGION" "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" <<'PY'
import subprocess, sys, urllib.parse, xml.etree.ElementTree as ET
ep, bucket, prefix, region, user = sys.argv[1:]
ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
token = None
while True:
    q = {"list-type": "2", "prefix": prefix}
    if token:
        q["continuation-token"] = token
    query = urllib.parse.urlencode(sorted(q.items()), quote_via=urllib.parse.quote, safe="")
    out = subprocess.run(["curl", "-sf", "--aws-sigv4", f"aws:amz:{region}:s3", "--user", user,
                          f"{ep}/{bucket}?{query}"], check=True, capture_output=True).stdout
    root = ET.fromstring(out)
    for c in root.iter(ns + "Contents"):
        print(c.findtext(ns + "Key"), c.findtext(ns + "Size"))
    if root.findtext(ns + "IsTruncated") != "true":
        break
    token = root.findtext(ns + "NextContinuationToken")
PY
}
# objstat BUCKET PREFIX: "BYTES COUNT" of the objects under PREFIX
objstat() { objects "$1" "$2" | awk '{b += $2; n++} END {print b + 0, n + 0}'; }
# describe BUCKET PREFIX: "N MiB in K objects (mean M KiB)"
describe() {
    local b n
    read -r b n < <(objstat "$1" "$2")
    py "f'{$b / 2**20:.0f} MiB in $n objects (mean {$b / max($n, 1) / 1024:.0f} KiB)'"
}
# limit WHEN: scripts/s3-limit.sh against this server (a bucket of its own,
# deleted after); the best parallelism's MiB/s per direction into
# LIMIT_PUT_WHEN / LIMIT_GET_WHEN.
limit() {
    bucket limit
    LIMIT_DIR="$W/limit" LIMIT_BUCKET=limit LIMIT_MIB=$LIMIT_MIB LIMIT_PAR="8 16" \
        scripts/s3-limit.sh > "$W/limit.out"
    unbucket limit
    sed 's/^/  /' "$W/limit.out"
    eval "LIMIT_PUT_$1=$(awk '/^PUT/ {gsub("=", " "); for (i = 1; i <= NF; i++) if ($i == "MiB/s") print $(i-1)}' "$W/limit.out" | sort -n | tail -1)"
    eval "LIMIT_GET_$1=$(awk '/^GET/ {gsub("=", " "); for (i = 1; i <= NF; i++) if ($i == "MiB/s") print $(i-1)}' "$W/limit.out" | sort -n | tail -1)"
}
# cpu PID: user+system seconds the process has used so far.
cpu() {
    python3 -c "import os; f = open('/proc/$1/stat').read().rsplit(')', 1)[1].split(); print((int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK'))"
}
# curlcfg OP BUCKET LISTFILE FILE: a curl config (see scripts/s3-limit.sh)
# with one transfer per "KEY SIZE" line: GET into /dev/null, or PUT of the
# first SIZE bytes of FILE (a file of that size made once per size).
curlcfg() {
    local op=$1 b=$2 list=$3 file=${4:-} first=1 key size
    (
        umask 077
        while read -r key size; do
            [ $first = 1 ] || echo next
            first=0
            echo "url = \"$EP/$b/$key\""
            echo "aws-sigv4 = \"aws:amz:$AWS_REGION:s3\""
            echo "user = \"$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY\""
            echo 'output = "/dev/null"'
            echo 'write-out = "%{http_code}\n"'
            echo 'silent'
            if [ "$op" = PUT ]; then
                [ -e "$file.$size" ] || head -c "$size" "$file" > "$file.$size"
                echo "upload-file = \"$file.$size\""
            fi
        done < "$list"
    ) > "$W/$op.cfg"
}
# curlrun NAME OP: run $W/OP.cfg, 16 transfers at once (as strata's 16
# uploads and 16 restore workers); print time, MiB/s of BYTES and the
# server's CPU seconds; seconds in .last.
curlrun() {
    local name=$1 op=$2 bytes=$3 w0 w1 t0 t1
    w0=$(cpu "$WEED_PID"); t0=$(date +%s.%N)
    curl --no-progress-meter --parallel --parallel-immediate --parallel-max 16 -K "$W/$op.cfg" > "$W/codes"
    t1=$(date +%s.%N); w1=$(cpu "$WEED_PID")
    [ "$(grep -vc '^200$' "$W/codes")" = 0 ] || { sort "$W/codes" | uniq -c; echo "FAILED: $name" >&2; exit 1; }
    python3 -c 'import sys; n, b, t0, t1, w0, w1 = sys.argv[1:]; b, t0, t1, w0, w1 = map(float, (b, t0, t1, w0, w1))
print(f"{n:<50} {t1 - t0:7.2f} s {b / 2**20 / (t1 - t0):6.0f} MiB/s, server {w1 - w0:.1f} CPU s")' "$name" "$bytes" "$t0" "$t1" "$w0" "$w1"
    py "$t1 - $t0" > "$W/.last"
}

export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$W/restic-cache"
export STRATA_CACHE_DIR="$W/cache"
for b in fulls strata restic; do bucket "$b"; done
echo "# strata object storage benchmark: ${GIB} GiB image, $(nproc) cores, $(date -u +%FT%TZ)"
echo "strata $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(restic version | cut -d' ' -f1-2)," \
    "weed $(weed version 2>/dev/null | awk '{print $3}') mini on $EP, load average $(load)"

python3 scripts/benchdata.py base "$W/disk.raw" "$GIB"
SIZE=$(stat -c %s "$W/disk.raw")
ALLOC=$(( $(stat -c %b "$W/disk.raw") * 512 ))
echo "image: $SIZE bytes virtual, $ALLOC allocated"

echo; echo "## the limit: parallel PUTs and GETs of 1 MiB objects (start), load $(load)"
limit start

echo; echo "## full backup into S3 (source in the page cache), load $(load)"
# Three strata backups into empty prefixes, the last the S3 repository of
# the rest of the run; the others, and restic's, in a bucket deleted after.
cat "$W/disk.raw" > /dev/null
RESTIC_REPOSITORY="s3:$EP/fulls/restic" restic init -q > /dev/null
t "restic backup -> S3" env RESTIC_REPOSITORY="s3:$EP/fulls/restic" restic backup -q "$W/disk.raw"; RFULL=$(cat "$W/.last")
echo "  restic stored $(describe fulls restic/)"
FULLS=""; FULL_RSS=""; FULL_STORED=""
for k in 1 2 3; do
    repo="s3://fulls/strata$k"; [ $k = 3 ] && repo=s3://strata/main
    "$S" --repo "$repo" init > /dev/null
    t "strata backup -> S3 (empty prefix $k)" "$S" --repo "$repo" --progress none backup --disk bench "$W/disk.raw"
    FULLS="$FULLS $(cat "$W/.last")"; FULL_RSS="$FULL_RSS $(cat "$W/.rss")"; FULL_STORED=$(stored)
done
FULL=$(median $FULLS)
echo "  strata stored $(describe strata main/) ($FULL_STORED bytes of chunks by its own count)"
unbucket fulls
echo "full backup restic / strata: $RFULL / $FULL s (median) = $(py "f'{$RFULL/$FULL:.2f}x'")"
# The local repositories the incrementals and the copies start from.
"$S" --repo "$W/local" init > /dev/null
t "strata backup -> local directory (reference)" "$S" --repo "$W/local" -q backup --disk bench "$W/disk.raw"; LFULL=$(cat "$W/.last")
RESTIC_REPOSITORY="$W/restic-local" restic init -q > /dev/null
t "restic backup -> local directory (reference)" env RESTIC_REPOSITORY="$W/restic-local" restic backup -q "$W/disk.raw"

echo; echo "## 3% incrementals (change lists), into S3 and into a local directory, load $(load)"
# Both strata repositories and restic's local one get the same 8 states.
SI=""; LI=""; SI_STORED=""
for i in $(seq 1 8); do
    python3 scripts/benchdata.py change "$W/disk.raw" 3 "$i" "$W/c$i.json"
    # Alternate which goes first (the page cache holds the changed image).
    for where in $([ $((i % 2)) = 1 ] && echo "s3 local" || echo "local s3"); do
        if [ "$where" = s3 ]; then
            t "strata backup --changes -> S3, #$i" "$S" --repo s3://strata/main --progress none backup --disk bench "$W/disk.raw" --changes "$W/c$i.json"
            SI="$SI $(cat "$W/.last")"; SI_STORED="$SI_STORED $(stored)"
        else
            t "strata backup --changes -> local, #$i" "$S" --repo "$W/local" -q backup --disk bench "$W/disk.raw" --changes "$W/c$i.json"
            LI="$LI $(cat "$W/.last")"
        fi
    done
    RESTIC_REPOSITORY="$W/restic-local" restic backup -q "$W/disk.raw" > /dev/null
done
SINC=$(median $SI); LINC=$(median $LI); SINC_STORED=$(median $SI_STORED)
echo "incremental S3 / local (medians of 8): $SINC / $LINC s = $(py "f'{$SINC/$LINC:.2f}x'");" \
    "stored per incremental (median) $(mib "$SINC_STORED") MiB: $(py "f'{$SINC_STORED/2**20/$SINC:.0f}'") MiB/s into S3"
echo "  strata's S3 repository now: $(describe strata main/)"

echo; echo "## copy of full + 8 incrementals, local directory -> S3 (cold), load $(load)"
RESTIC_REPOSITORY="s3:$EP/restic/copy" restic init -q > /dev/null
drop
t "restic copy local -> S3 (9 snapshots)" env RESTIC_REPOSITORY="s3:$EP/restic/copy" RESTIC_FROM_REPOSITORY="$W/restic-local" \
    RESTIC_FROM_PASSWORD="$RESTIC_PASSWORD" restic copy -q
RCOPY=$(cat "$W/.last")
[ "$(RESTIC_REPOSITORY="s3:$EP/restic/copy" restic snapshots --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))')" = 9 ] ||
    { echo "FAILED: restic copy did not copy 9 snapshots" >&2; exit 1; }
echo "  restic's local repository: $(du -sm "$W/restic-local" | cut -f1) MiB; copied: $(describe restic copy/)"
rm -rf "$W/restic-local"
"$S" --repo s3://strata/copy init > /dev/null
drop
t "strata copy local -> S3 (9 snapshots)" "$S" --repo "$W/local" -q copy --to s3://strata/copy
SCOPY=$(cat "$W/.last"); COPY_RSS=$(cat "$W/.rss")
read -r COPY_BYTES COPY_N < <(objstat strata copy/)
echo "  strata's local repository: $(du -sm "$W/local" | cut -f1) MiB; copied: $(describe strata copy/)"
[ "$("$S" --repo s3://strata/copy snapshots --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))')" = 9 ] ||
    { echo "FAILED: strata copy did not copy 9 snapshots" >&2; exit 1; }
"$S" --repo s3://strata/copy -q restore bench@latest "$W/out.raw" > /dev/null
same "$W/out.raw" "$W/disk.raw" "the newest image of strata's copy"
rm -f "$W/out.raw"
echo "copy restic / strata: $RCOPY / $SCOPY s = $(py "f'{$RCOPY/$SCOPY:.2f}x'"); newest image restored from strata's copy = source"

echo; echo "## restore of the newest image from S3 (cold), load $(load)"
# Beside it, what the server alone takes to serve the same objects:
# curl GETs every pack of the repository (the image references nearly all
# of them), 16 at once, into /dev/null.
objects strata main/packs/ > "$W/chunks.list"
read -r CHUNK_BYTES CHUNK_N < <(awk '{b += $2; n++} END {print b, n}' "$W/chunks.list")
curlcfg GET strata "$W/chunks.list"
RR=""; SR=""; CR=""; REST_RSS=""
for k in $(seq 1 "$ROUNDS"); do
    rm -rf "$W/rr"; drop
    t "restic restore <- S3" env RESTIC_REPOSITORY="s3:$EP/restic/copy" restic restore -q latest --target "$W/rr"
    RR="$RR $(cat "$W/.last")"
    same "$W/rr$W/disk.raw" "$W/disk.raw" "restic's restore"
    rm -rf "$W/rr"; drop
    t "strata restore <- S3" "$S" --repo s3://strata/main -q restore bench@latest "$W/out.raw"
    SR="$SR $(cat "$W/.last")"; REST_RSS="$REST_RSS $(cat "$W/.rss")"
    same "$W/out.raw" "$W/disk.raw" "strata's restore from S3"
    rm -f "$W/out.raw"; drop
    curlrun "curl GET of its $CHUNK_N pack objects" GET "$CHUNK_BYTES"; CR="$CR $(cat "$W/.last")"
done
drop
t "strata restore <- local (reference)" "$S" --repo "$W/local" -q restore bench@latest "$W/out.raw"
LREST=$(cat "$W/.last")
same "$W/out.raw" "$W/disk.raw" "strata's restore from the local repository"
rm -f "$W/out.raw"
# The payload of a restore: the chunks the image references, each once.
# The restore from the local repository reads the same chunks, stored in the
# same encoding, as files (which rchar counts; the S3 restore's received
# bytes it does not).
REST_IN=$(cat "$W/.rchar")
RREST=$(median $RR); SREST=$(median $SR); CREST=$(median $CR)
echo "restore restic / strata (medians): $RREST / $SREST s = $(py "f'{$RREST/$SREST:.2f}x'");" \
    "payload $(mib "$REST_IN") MiB (chunks the local restore read; all pack objects: $(mib "$CHUNK_BYTES") MiB):" \
    "strata from S3 $(py "f'{$REST_IN/2**20/$SREST:.0f}'") MiB/s, curl alone $(py "f'{$CHUNK_BYTES/2**20/$CREST:.0f}'") MiB/s"

echo; echo "## mount: cold sequential read of the newest image (dd bs=16M), load $(load)"
mkdir -p "$W/mnt" "$W/lmnt" "$W/rmnt"
MCACHE="$W/mcache"
# mpid MOUNTPOINT: the serving process of a strata mount (strata:PID)
mpid() { awk -v m="$1" '$5 == m { for (i = 6; i <= NF; i++) if ($i == "-") { split($(i+2), a, ":"); print a[2] } }' /proc/self/mountinfo; }
# ddread NAME FILE: time a dd of the whole file; rate in .rate (bytes/s)
ddread() {
    t "$1" dd if="$2" of=/dev/null bs=16M
    py "$SIZE / $(cat "$W/.last")" > "$W/.rate"
}
rate() { py "f'{$1 / 2**20:.0f} MiB/s'"; }
cachebytes() { du -sb "$MCACHE"/*/cache | awk '{s += $1} END {print s}'; }
RM=""; SM=""; LM=""; SM_IN=""; LM_IN=""; MOUNT_RSS=""; CACHE_AFTER=""
for k in $(seq 1 "$ROUNDS"); do
    # restic mount of its S3 repository, a fresh process each round
    RESTIC_REPOSITORY="s3:$EP/restic/copy" restic mount -q "$W/rmnt" > "$W/rmount.log" 2>&1 & RESTIC_MOUNT_PID=$!
    until [ -e "$W/rmnt/snapshots/latest" ]; do
        kill -0 "$RESTIC_MOUNT_PID" 2>/dev/null || { cat "$W/rmount.log"; exit 1; }
        sleep 0.2
    done
    drop; ddread "restic mount <- S3, cold" "$W/rmnt/snapshots/latest$W/disk.raw"; RM="$RM $(cat "$W/.rate")"
    kill -INT "$RESTIC_MOUNT_PID"; wait "$RESTIC_MOUNT_PID" 2>/dev/null || true; RESTIC_MOUNT_PID=""
    if mounted "$W/rmnt"; then umount -l "$W/rmnt"; fi
    # strata mount of S3, with an empty chunk cache every round
    rm -rf "$MCACHE"
    STRATA_CACHE_DIR="$MCACHE" "$S" --repo s3://strata/main mount --cache-size "$CACHE_SIZE" "$W/mnt" > /dev/null
    MPID=$(mpid "$W/mnt")
    drop
    # What the mount wrote: its FUSE replies (the image, holes included)
    # and the chunk cache's files, i.e. every chunk it fetched from S3.
    io_m0=$(awk '/^wchar/ {print $2}' "/proc/$MPID/io")
    ddread "strata mount <- S3, cold (empty chunk cache)" "$W/mnt/bench/latest.raw"; SM="$SM $(cat "$W/.rate")"
    SM_IN="$SM_IN $(( $(awk '/^wchar/ {print $2}' "/proc/$MPID/io") - io_m0 - SIZE ))"
    MOUNT_RSS="$MOUNT_RSS $(awk '/VmHWM/ {print $2}' "/proc/$MPID/status")"
    CACHE_AFTER="$CACHE_AFTER $(cachebytes)"
    if [ "$k" = "$ROUNDS" ]; then
        # The image read back through the bounded cache is the source.
        same "$W/mnt/bench/latest.raw" "$W/disk.raw" "the S3 mount's image"
        echo "  S3 mount's image = source (cmp); chunk cache after that second read: $(cachebytes) bytes"
        MOUNT_RSS="$MOUNT_RSS $(awk '/VmHWM/ {print $2}' "/proc/$MPID/status")"
        CACHE_AFTER="$CACHE_AFTER $(cachebytes)"
    fi
    "$S" umount "$W/mnt" > /dev/null
    # strata mount of the local directory repository
    "$S" --repo "$W/local" mount "$W/lmnt" > /dev/null
    LPID=$(mpid "$W/lmnt")
    drop
    # What the local mount read: the chunk files the image needs.
    io_l0=$(awk '/^rchar/ {print $2}' "/proc/$LPID/io")
    ddread "strata mount <- local directory, cold" "$W/lmnt/bench/latest.raw"; LM="$LM $(cat "$W/.rate")"
    LM_IN="$LM_IN $(( $(awk '/^rchar/ {print $2}' "/proc/$LPID/io") - io_l0 ))"
    "$S" umount "$W/lmnt" > /dev/null
done
RMR=$(median $RM); SMR=$(median $SM); LMR=$(median $LM)
# The payload: the chunks the local mount read (the S3 mount's own count
# is shown beside it; more would mean chunks fetched twice).
MOUNT_IN=$(median $LM_IN); MOUNT_FETCHED=$(median $SM_IN)
echo "cold read (medians): restic mount $(rate "$RMR"), strata S3 $(rate "$SMR"), strata local $(rate "$LMR");" \
    "payload $(mib "$MOUNT_IN") MiB of chunks (the local mount's reads), the S3 mount fetched $(mib "$MOUNT_FETCHED") MiB;" \
    "chunk cache after the reads:$(for c in $CACHE_AFTER; do printf ' %s' "$(mib "$c")"; done) MiB (--cache-size $CACHE_SIZE)"

echo; echo "## the limit again (end), load $(load)"
limit end
# For orientation: PUTs at the size of strata's objects (the chunk objects
# of the full backup, sizes as listed, random bytes), into a bucket deleted after.
bucket sized
head -c $((4 << 20)) /dev/urandom > "$W/rand"
# Sizes rounded up to 4 KiB: a few hundred sizes, one file each.
awk '{n = split($1, p, "/"); print "o/" p[n], int(($2 + 4095) / 4096) * 4096}' "$W/chunks.list" > "$W/sized.list"
SIZED_BYTES=$(awk '{b += $2} END {print b}' "$W/sized.list")
curlcfg PUT sized "$W/sized.list" "$W/rand"
curlrun "curl PUT of $CHUNK_N objects sized as strata's" PUT "$SIZED_BYTES"; SIZED_PUT=$(py "$SIZED_BYTES / 2**20 / $(cat "$W/.last")")
unbucket sized
rm -f "$W"/rand*
echo "server peak RSS: $(awk '/VmHWM/ {print int($2 / 1024) " MiB"}' "/proc/$WEED_PID/status")"

# ------------------------------------------------------------------ summary
LPUT=$(maxof "$LIMIT_PUT_start" "$LIMIT_PUT_end"); LGET=$(maxof "$LIMIT_GET_start" "$LIMIT_GET_end")
echo
echo "## summary: ${GIB} GiB image, $(date -u +%FT%TZ), load average $(load)"
echo "limit (1 MiB objects, best of start/end and of 8/16 in parallel): PUT $LPUT MiB/s, GET $LGET MiB/s"
echo "at strata's object sizes (mean $(py "f'{$CHUNK_BYTES / $CHUNK_N / 1024:.0f}'") KiB, 16 in parallel):" \
    "PUT $(py "f'{$SIZED_PUT:.0f}'") MiB/s, GET $(py "f'{$CHUNK_BYTES / 2**20 / $CREST:.0f}'") MiB/s (median)"
# row BAR RESULT MET
row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3"; }
# vs_limit BYTES SECS_ALLOWED SECS_TAKEN LIMIT: met by the bar itself, or,
# when BYTES in SECS_ALLOWED would exceed LIMIT (MiB/s), by >= 80% of it.
vs_limit() {
    python3 - "$@" <<'PY'
import sys
b, allowed, took, limit = map(float, sys.argv[1:])
need, got = b / 2**20 / allowed, b / 2**20 / took
if need <= limit:
    print(f"{'yes' if took <= allowed else '**no**'} (the bar needs {need:.0f} MiB/s, within the limit of {limit:.0f})")
else:
    share = got / limit
    print(f"{'yes' if share >= 0.8 else '**no**'}: the bar needs {need:.0f} MiB/s, above the limit of {limit:.0f};"
          f" strata {got:.0f} MiB/s = {share:.0%} of it (>= 80% counts)")
PY
}
echo
echo "| bar (#17) | result | met? |"
echo "| --- | --- | --- |"
row "full backup into S3 ≥ 3× \`restic backup\`" \
    "$(py "f'{$RFULL/$FULL:.2f}×'"): restic $RFULL s, strata $FULL s (median of $(echo $FULLS | tr ' ' '/')); $(mib "$FULL_STORED") MiB stored, $(py "f'{$FULL_STORED/2**20/$FULL:.0f}'") MiB/s" \
    "$(vs_limit "$FULL_STORED" "$(py "$RFULL/3")" "$FULL" "$LPUT")"
row "3% incremental into S3 ≤ 2× into a local directory" \
    "$(py "f'{$SINC/$LINC:.2f}×'"): $SINC s vs $LINC s (medians of 8); $(mib "$SINC_STORED") MiB stored, $(py "f'{$SINC_STORED/2**20/$SINC:.0f}'") MiB/s" \
    "$(vs_limit "$SINC_STORED" "$(py "2*$LINC")" "$SINC" "$LPUT")"
row "copy full + 8, directory → S3 ≥ 2× \`restic copy\`" \
    "$(py "f'{$RCOPY/$SCOPY:.2f}×'"): restic $RCOPY s, strata $SCOPY s; $(mib "$COPY_BYTES") MiB stored, $(py "f'{$COPY_BYTES/2**20/$SCOPY:.0f}'") MiB/s" \
    "$(vs_limit "$COPY_BYTES" "$(py "$RCOPY/2")" "$SCOPY" "$LPUT")"
row "restore from S3 ≥ 3× \`restic restore\`" \
    "$(py "f'{$RREST/$SREST:.2f}×'"): restic $RREST s, strata $SREST s (medians); $(mib "$REST_IN") MiB of chunks, $(py "f'{$REST_IN/2**20/$SREST:.0f}'") MiB/s" \
    "$(vs_limit "$REST_IN" "$(py "$RREST/3")" "$SREST" "$LGET")"
row "mount cold read from S3 ≥ 3× \`restic mount\`" \
    "$(py "f'{$SMR/$RMR:.2f}×'"): $(rate "$SMR") vs $(rate "$RMR") of image; $(mib "$MOUNT_IN") MiB of chunks, $(py "f'{$MOUNT_IN/2**20/($SIZE/$SMR):.0f}'") MiB/s" \
    "$(vs_limit "$MOUNT_IN" "$(py "$SIZE/$RMR/3")" "$(py "$SIZE/$SMR")" "$LGET")"
row "mount cold read from S3 ≥ 50% of from a local directory" \
    "$(py "f'{$SMR/$LMR:.0%}'"): $(rate "$SMR") vs $(rate "$LMR")" \
    "$(vs_limit "$MOUNT_IN" "$(py "$SIZE/$LMR*2")" "$(py "$SIZE/$SMR")" "$LGET")"
PEAK=$(maxof $FULL_RSS $REST_RSS $COPY_RSS $MOUNT_RSS)
row "peak RSS of backup, restore, copy, mount ≤ 256 MiB" \
    "backup $(( $(maxof $FULL_RSS) / 1024 )), restore $(( $(maxof $REST_RSS) / 1024 )), copy $((COPY_RSS / 1024)), mount $(( $(maxof $MOUNT_RSS) / 1024 )) MiB" \
    "$(py "'yes' if $PEAK <= 256 * 1024 else '**no**'")"
CMAX=$(maxof $CACHE_AFTER)
CLIM=$(python3 -c "import sys; t = sys.argv[1]; m = {'K': 10, 'M': 20, 'G': 30, 'T': 40}; print(int(t[:-1]) << m[t[-1].upper()] if t[-1].upper() in m else int(t))" "$CACHE_SIZE")
row "chunk cache after the mount's reads ≤ --cache-size ($CACHE_SIZE)" \
    "at most $(mib "$CMAX") MiB ($CMAX bytes)" \
    "$(py "'yes' if $CMAX <= $CLIM else '**no**'")"
echo
echo "references: strata into a local directory: full $LFULL s, restore $LREST s"
echo "done"
