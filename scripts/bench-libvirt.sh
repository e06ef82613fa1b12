#!/usr/bin/env bash
# strata backup --domain against virtnbdbackup (Debian package
# virtnbdbackup), both through libvirt's backup API in pull mode: a full
# and 8 incrementals (3% of the 64 KiB clusters rewritten with random data
# before each), the bytes each keeps, a restore of the newest state, and
# whether it is byte-exact. Two identical paused TCG domains, one per
# tool, get the same writes. Starts its own libvirtd and stops it, with
# the domains, on exit; on the default socket (qemu:///system), because
# virtnbdbackup asks for a user and password on any qemu+unix:// URI. So
# no other libvirtd may run meanwhile (nor tests/libvirt.rs).
#
#   scripts/bench-libvirt.sh [GIB] [WORKDIR]     (as root; default 1 GiB)
set -euo pipefail
cd "$(dirname "$0")/.."
GIB=${1:-1}
W=${2:-/tmp/strata-bench-libvirt}
S=$PWD/target/release/strata
command -v virtnbdbackup >/dev/null || {
    echo "needs virtnbdbackup: apt-get install --no-install-recommends virtnbdbackup" >&2
    exit 1
}
cargo build --release -q
rm -rf "$W" && mkdir -p "$W/run"

cat >/etc/libvirt/qemu.conf <<'EOF'
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
EOF
printf 'auth_unix_rw = "none"\nauth_unix_ro = "none"\n' >"$W/libvirtd.conf"
libvirtd --config "$W/libvirtd.conf" --pid-file "$W/libvirtd.pid" >"$W/libvirtd.log" 2>&1 &
LV=$!
export LIBVIRT_DEFAULT_URI=qemu:///system
cleanup() {
    for d in bench-strata bench-vnb; do
        virsh -q destroy "$d" >/dev/null 2>&1 || true
        for c in $(virsh -q checkpoint-list "$d" --name 2>/dev/null); do
            virsh -q checkpoint-delete "$d" "$c" --metadata >/dev/null 2>&1 || true
        done
        virsh -q undefine "$d" >/dev/null 2>&1 || true
    done
    kill "$LV" 2>/dev/null || true
    wait "$LV" 2>/dev/null || true
}
trap cleanup EXIT
deadline=$((SECONDS + 30))
until virsh -q version >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "libvirtd did not start" >&2; exit 1; }
    sleep 0.1
done

python3 scripts/benchdata.py base "$W/state.raw" "$GIB"
define() { # NAME IMAGE
    qemu-img convert -O qcow2 "$W/state.raw" "$2"
    cat >"$W/$1.xml" <<EOF
<domain type='qemu'><name>$1</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$2'/><target dev='vda' bus='virtio'/></disk>
</devices></domain>
EOF
    virsh -q define "$W/$1.xml" >/dev/null
    virsh -q start --paused "$1" >/dev/null
}
define bench-strata "$W/a.qcow2"
define bench-vnb "$W/b.qcow2"

# Seconds a command takes, printed as "LABEL SECONDS".
t() {
    local label=$1 start end
    shift
    start=$(date +%s.%N)
    "$@" >"$W/last.out" 2>&1 || { cat "$W/last.out" >&2; exit 1; }
    end=$(date +%s.%N)
    python3 -c "print(f'{\"$label\":44s} {$end - $start:7.2f} s')"
}

"$S" init --repo "$W/repo" >/dev/null
export STRATA_REPO=$W/repo
mkdir -p "$W/vnb"
t "strata full" "$S" -q backup --domain bench-strata
t "virtnbdbackup full" virtnbdbackup -U "$LIBVIRT_DEFAULT_URI" -d bench-vnb -l full -o "$W/vnb"
for i in $(seq 1 8); do
    python3 scripts/benchdata.py change "$W/state.raw" 3 "$i" "$W/c.json"
    python3 scripts/benchdata.py qemu-io "$W/state.raw" "$W/c.json" "$W/parts" >"$W/cmds"
    for d in bench-strata bench-vnb; do
        dev=/machine/peripheral/virtio-disk0/virtio-backend
        while read -r cmd; do
            virsh -q qemu-monitor-command "$d" --hmp "qemu-io -d $dev \"$cmd\"" >/dev/null
        done <"$W/cmds"
        virsh -q qemu-monitor-command "$d" --hmp "qemu-io -d $dev flush" >/dev/null
    done
    rm -rf "$W/parts"
    t "strata incremental #$i" "$S" -q backup --domain bench-strata
    t "virtnbdbackup incremental #$i" virtnbdbackup -U "$LIBVIRT_DEFAULT_URI" -d bench-vnb -l inc -o "$W/vnb"
done
echo "kept after full + 8 incrementals: strata $(du -sb "$W/repo" | cut -f1) bytes, virtnbdbackup $(du -sb "$W/vnb" | cut -f1) bytes (image data $(du -b --apparent-size "$W/state.raw" | cut -f1) bytes apparent, $(du -B1 "$W/state.raw" | cut -f1) allocated)"

sync && echo 3 >/proc/sys/vm/drop_caches
t "strata restore --domain (newest)" "$S" -q restore --domain bench-strata@latest "$W/r-strata"
sync && echo 3 >/proc/sys/vm/drop_caches
t "virtnbdrestore (newest)" virtnbdrestore -U "$LIBVIRT_DEFAULT_URI" -i "$W/vnb" -o "$W/r-vnb"
cmp "$W/r-strata/vda.raw" "$W/state.raw" && echo "strata restore: byte-exact"
img=$(find "$W/r-vnb" -type f ! -name '*.xml' ! -name '*.json' | head -1)
qemu-img compare -q "$img" "$W/state.raw" && echo "virtnbdrestore: byte-exact (qemu-img compare)"
