#!/usr/bin/env bash
# Install what strata's demo and tests need and a fresh machine may lack:
# qemu-utils (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon), libnbd-bin
# (nbdinfo) and fuse3. Uses apt-get; needs root. Does nothing when all are there.
set -euo pipefail
need=()
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
