# Sourced by the S3 benchmark scripts: start a SeaweedFS `weed mini` as
# tests/common/s3.rs starts it (every port chosen, on 127.0.0.1, extras
# off), with the identity in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
#
#   weed_start DIR [EXTRA FLAGS...]
#
# DIR holds its data, s3.json, weed.log and sockets. Sets PORTS (to remove
# its gRPC sockets in /tmp afterwards), WEED_PID (its own session and
# process group: kill -- -$WEED_PID) and AWS_ENDPOINT_URL; returns at once.

# free_ports N: N distinct TCP ports free on 127.0.0.1 now.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}

weed_start() {
    local dir=$1; shift
    local master mgrpc volume vgrpc filer fgrpc s3 s3grpc admin agrpc
    read -r -a PORTS < <(free_ports 10)
    read -r master mgrpc volume vgrpc filer fgrpc s3 s3grpc admin agrpc <<< "${PORTS[*]}"
    mkdir -p "$dir/data"
    cat > "$dir/s3.json" <<JSON
{"identities": [{"name": "bench",
  "credentials": [{"accessKey": "$AWS_ACCESS_KEY_ID", "secretKey": "$AWS_SECRET_ACCESS_KEY"}],
  "actions": ["Admin", "Read", "Write", "List"]}]}
JSON
    setsid weed -logtostderr mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port="$master" -master.port.grpc="$mgrpc" \
        -volume.port="$volume" -volume.port.grpc="$vgrpc" \
        -filer.port="$filer" -filer.port.grpc="$fgrpc" \
        -s3.port="$s3" -s3.port.grpc="$s3grpc" \
        -admin.port="$admin" -admin.port.grpc="$agrpc" \
        -s3.config="$dir/s3.json" -admin.ui=false -webdav=false \
        -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false \
        -filer.localSocket="$dir/filer.sock" -s3.localSocket="$dir/s3.sock" \
        "$@" > "$dir/weed.log" 2>&1 < /dev/null &
    WEED_PID=$!
    AWS_ENDPOINT_URL="http://127.0.0.1:$s3"
}
