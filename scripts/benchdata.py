#!/usr/bin/env python3
"""Benchmark data for scripts/bench.sh.

  benchdata.py base PATH GIB          a sparse image, half allocated: in every
                                      512 KiB slot, 256 KiB of data, alternately
                                      random and compressible (16-symbol text)
  benchdata.py change PATH PERCENT SEED OUT.json
                                      overwrite PERCENT of the image's 64 KiB
                                      clusters with random data and write the
                                      changed ranges as strata extent JSON
"""
import json
import os
import random
import sys

SLOT = 512 << 10
PIECE = 256 << 10
CLUSTER = 64 << 10
TEXT = bytes((0x41 + (i & 15)) for i in range(256))


def piece(i):
    raw = os.urandom(PIECE)
    return raw if i % 2 == 0 else raw.translate(TEXT)


def base(path, gib):
    size = gib << 30
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // SLOT):
            f.seek(i * SLOT)
            f.write(piece(i))


def change(path, percent, seed, out):
    rng = random.Random(seed)
    size = os.path.getsize(path)
    clusters = size // CLUSTER
    picked = sorted(rng.sample(range(clusters), int(clusters * percent / 100)))
    extents = []
    with open(path, "r+b") as f:
        for c in picked:
            f.seek(c * CLUSTER)
            f.write(os.urandom(CLUSTER))
            if extents and extents[-1]["offset"] + extents[-1]["length"] == c * CLUSTER:
                extents[-1]["length"] += CLUSTER
            else:
                extents.append({"offset": c * CLUSTER, "length": CLUSTER, "type": "data"})
    with open(out, "w") as f:
        json.dump({"size": size, "extents": extents}, f)


if __name__ == "__main__":
    if sys.argv[1] == "base":
        base(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "change":
        change(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(__doc__)
