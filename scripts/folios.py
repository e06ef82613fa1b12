#!/usr/bin/env python3
"""How a file's cached pages are held in the page cache: small (4 KiB) or
large folios. Explains the mount's second read in docs/PERFORMANCE.md: the
kernel charges each cached folio on every read, so a file cached in 4 KiB
folios rereads slower than one cached in large folios.

    scripts/folios.py FILE [MIB]    first MIB MiB (default 256) of FILE

Needs root (/proc/kpageflags). Maps the file and touches its pages, which
faults in pages not cached yet: run it on a file that was just read.
"""
import collections
import ctypes
import mmap
import os
import struct
import sys

KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16
PAGE = 4096


def main():
    path = sys.argv[1]
    limit = int(sys.argv[2]) << 20 if len(sys.argv) > 2 else 256 << 20
    fd = os.open(path, os.O_RDONLY)
    size = min(os.fstat(fd).st_size, limit) // PAGE * PAGE
    # A private writable mapping only to get its address from ctypes;
    # nothing is written, so the file's own pages stay mapped.
    m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof((ctypes.c_char * 1).from_buffer(m))
    for off in range(0, size, PAGE):
        m[off]
    with open("/proc/self/pagemap", "rb", buffering=0) as pm:
        pm.seek(base // PAGE * 8)
        entries = struct.unpack(f"<{size // PAGE}Q", pm.read(size // PAGE * 8))
    counts = collections.Counter()
    with open("/proc/kpageflags", "rb", buffering=0) as kf:
        for e in entries:
            if not e >> 63:
                counts["not present"] += 1
                continue
            kf.seek((e & ((1 << 55) - 1)) * 8)
            flags = struct.unpack("<Q", kf.read(8))[0]
            large = flags >> KPF_COMPOUND_HEAD & 1 or flags >> KPF_COMPOUND_TAIL & 1
            counts["in large folios" if large else "in 4 KiB folios"] += 1
    total = sum(counts.values())
    parts = ", ".join(f"{100 * n / total:.0f}% {k}" for k, n in sorted(counts.items()))
    print(f"{size >> 20} MiB, pages: {parts}")


if __name__ == "__main__":
    main()
