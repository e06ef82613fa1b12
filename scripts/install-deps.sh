#!/usr/bin/env bash
# Install what strata's demo and tests need and a fresh machine may lack:
# qemu-utils (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon), libnbd-bin
# (nbdinfo), nbdkit (NBD servers that fail on purpose), fuse3 and man-db
# (the man page test renders with man -l). systemd-analyze, which checks the
# units in contrib/systemd, comes with systemd itself and is not installed
# here (too much for a test machine); its test is skipped where it is
# missing. Uses apt-get; needs root. Does nothing when all are there.
set -euo pipefail
need=()
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v man >/dev/null || need+=(man-db)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    # --no-install-recommends: nothing that could pull in another QEMU.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
