#!/usr/bin/env bash
# What an S3 server takes and gives on this machine: parallel PUTs, then
# GETs, of 1 MiB objects, with curl's own parallel transfers (one process,
# no process per request) signing with SigV4. The ceiling strata's S3
# backend can reach here, before any strata code runs.
#
#   scripts/s3-limit.sh                       own SeaweedFS (weed mini) on free ports
#   AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
#     LIMIT_BUCKET=name scripts/s3-limit.sh   an existing server and bucket
#   LIMIT_MIB=512 scripts/s3-limit.sh         less data (default 2048 per run)
#   LIMIT_PAR="4 8 16 32" scripts/s3-limit.sh  parallelism (default "8 16")
#   LIMIT_DIR=/path scripts/s3-limit.sh       scratch and server data (needs
#                                             LIMIT_MIB x runs, and more)
#
# Prints MiB/s per direction and parallelism, the CPU seconds curl and the
# server used (both on this machine's cores: a curl near its own limit would
# show here), and the server's peak RSS. Needs curl, python3, and weed
# (scripts/install-deps.sh) for an own server.
set -euo pipefail
. "$(dirname "$0")/weed-mini.sh"
MIB=${LIMIT_MIB:-2048}
PAR=${LIMIT_PAR:-8 16}
W=${LIMIT_DIR:-/var/tmp/strata-s3-limit}
REGION=${AWS_REGION:-us-east-1}
rm -rf "$W"; mkdir -p "$W"
WEED_PID=""
PORTS=()
cleanup() {
    # weed runs in a session and process group of its own (setsid).
    if [ -n "$WEED_PID" ]; then
        kill -KILL -- "-$WEED_PID" 2>/dev/null || true
        wait "$WEED_PID" 2>/dev/null || true
    fi
    # Its gRPC sockets, named after their ports, in /tmp.
    for p in "${PORTS[@]}"; do rm -f /tmp/seaweedfs-*-"$p".sock; done
    rm -rf "$W"
}
trap cleanup EXIT

if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
    AWS_ACCESS_KEY_ID=limit AWS_SECRET_ACCESS_KEY=limitsecret
    weed_start "$W"
fi
SIGN=(--aws-sigv4 "aws:amz:$REGION:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY")
EP=${AWS_ENDPOINT_URL%/}

# Wait (polling, up to a minute) for a signed ListBuckets to answer 200.
start=$(date +%s.%N)
deadline=$((SECONDS + 60))
until code=$(curl -s -o "$W/out" -w '%{http_code}' --max-time 2 "${SIGN[@]}" "$EP/"); [ "$code" = 200 ]; do
    if [ -n "$WEED_PID" ] && ! kill -0 "$WEED_PID" 2>/dev/null; then
        tail -20 "$W/weed.log"; echo "weed mini exited" >&2; exit 1
    fi
    # Another's server that refuses us (bad credentials, say) will go on.
    if [ -z "$WEED_PID" ] && [ "${code:0:1}" = 4 ]; then
        cat "$W/out"; echo; echo "ListBuckets at $EP: $code" >&2; exit 1
    fi
    [ "$SECONDS" -lt "$deadline" ] || { echo "no answer from $EP in 60 s" >&2; exit 1; }
    sleep 0.05
done
if [ -n "$WEED_PID" ]; then
    echo "weed mini $(weed version 2>/dev/null | awk '{print $3}') answered after" \
        "$(awk "BEGIN {printf \"%.2f\", $(date +%s.%N) - $start}") s"
fi

BUCKET=${LIMIT_BUCKET:-strata-s3-limit}
if [ -z "${LIMIT_BUCKET:-}" ]; then
    code=$(curl -s -o "$W/out" -w '%{http_code}' "${SIGN[@]}" -X PUT "$EP/$BUCKET")
    [ "$code" = 200 ] || { cat "$W/out"; echo "CreateBucket $BUCKET: $code" >&2; exit 1; }
fi
head -c $((1 << 20)) /dev/urandom > "$W/object"

# config OP PREFIX [N]: a curl config of N (MIB) transfers, one per object
# (options do not carry over `next`, so each repeats them). The file holds
# the secret: readable by us only.
config() {
    local op=$1 prefix=$2 n=${3:-$MIB} i
    (
        umask 077
        for ((i = 0; i < n; i++)); do
            [ "$i" -gt 0 ] && echo next
            echo "url = \"$EP/$BUCKET/$prefix/$i\""
            echo "aws-sigv4 = \"aws:amz:$REGION:s3\""
            echo "user = \"$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY\""
            echo 'output = "/dev/null"'
            echo 'write-out = "%{http_code}\n"'
            echo 'silent'
            if [ "$op" = PUT ]; then echo "upload-file = \"$W/object\""; fi
        done
    ) > "$W/$op.cfg"
}

# cpu PID: user+system seconds the process has used so far.
cpu() {
    python3 -c "import os; f = open('/proc/$1/stat').read().rsplit(')', 1)[1].split(); print((int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK'))"
}

# run OP PAR: the transfers, timed; every one must get 200.
run() {
    local op=$1 par=$2 t0 t1 w0=- w1=-
    [ -z "$WEED_PID" ] || w0=$(cpu "$WEED_PID")
    t0=$(date +%s.%N)
    local TIMEFORMAT='%U %S'
    { time curl --no-progress-meter --parallel --parallel-immediate --parallel-max "$par" \
        -K "$W/$op.cfg" > "$W/codes" 2> "$W/curl.err"; } 2> "$W/time" ||
        { cat "$W/curl.err"; exit 1; }
    t1=$(date +%s.%N)
    [ -z "$WEED_PID" ] || w1=$(cpu "$WEED_PID")
    bad=$(grep -vc '^200$' "$W/codes" || true)
    [ "$bad" = 0 ] || { sort "$W/codes" | uniq -c; echo "$op: $bad of $MIB failed" >&2; exit 1; }
    python3 - "$op" "$par" "$MIB" "$t0" "$t1" "$w0" "$w1" $(cat "$W/time") <<'PY'
import sys
op, par, mib, t0, t1, w0, w1, cu, cs = sys.argv[1:]
secs = float(t1) - float(t0)
cpu = f"curl {float(cu) + float(cs):.1f}"
if w0 != "-":
    cpu += f", server {float(w1) - float(w0):.1f}"
print(f"{op}  parallel {par:>3}: {mib} MiB in {secs:6.2f} s = {int(mib) / secs:5.0f} MiB/s"
      f"   CPU s: {cpu}")
PY
}

echo "$MIB objects of 1 MiB per run, $(nproc) cores, endpoint $EP," \
    "load average $(cut -d' ' -f1-3 /proc/loadavg)"
# Unmeasured: the server makes its first volumes on the first writes.
config PUT warmup 32
curl --no-progress-meter --parallel -K "$W/PUT.cfg" > /dev/null
for p in $PAR; do
    config PUT "p$p"
    run PUT "$p"
    config GET "p$p"
    run GET "$p"
done
if [ -n "$WEED_PID" ]; then
    grep -E 'VmHWM|VmRSS' "/proc/$WEED_PID/status" | awk '{printf "server %s %d MiB\n", $1, $2 / 1024}'
fi
echo "load average $(cut -d' ' -f1-3 /proc/loadavg)"
