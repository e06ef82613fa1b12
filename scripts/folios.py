#!/usr/bin/env python3
"""How the kernel caches a file: page-cache folio sizes and LRU state.

  folios.py FILE [OFFSET]     maps 64 MiB of FILE from OFFSET, touches every
                              page (from the cache if it is there), and counts
                              the backing pages by /proc/kpageflags: 'small'
                              (a 4 KiB folio), 'head'/'tail' (part of a large
                              folio), 'active'/'inactive' (LRU list).

Needs root (kpageflags). Used for docs/PERFORMANCE.md: a FUSE file is cached
in 4 KiB folios on this kernel, an ext4 file in large folios.
"""
import collections
import ctypes
import mmap
import os
import struct
import sys

KPF_ACTIVE, KPF_HEAD, KPF_TAIL = 6, 15, 16


def main(path, offset=0):
    n = 64 << 20
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, n, access=mmap.ACCESS_COPY, offset=offset)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    for i in range(0, n, 4096):
        m[i]
    counts = collections.Counter()
    with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
        for i in range(0, n, 4096):
            pm.seek((base + i) // 4096 * 8)
            entry = struct.unpack("<Q", pm.read(8))[0]
            if not entry >> 63 & 1:
                counts["not present"] += 1
                continue
            kf.seek((entry & ((1 << 55) - 1)) * 8)
            flags = struct.unpack("<Q", kf.read(8))[0]
            size = "head" if flags >> KPF_HEAD & 1 else "tail" if flags >> KPF_TAIL & 1 else "small"
            counts[size] += 1
            counts["active" if flags >> KPF_ACTIVE & 1 else "inactive"] += 1
    print(path, dict(counts))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
