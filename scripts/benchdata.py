#!/usr/bin/env python3
"""Benchmark data for scripts/bench.sh.

  benchdata.py base PATH GIB          a sparse image, half allocated: in every
                                      512 KiB slot, 256 KiB of data, alternately
                                      random and compressible (16-symbol text)
  benchdata.py change PATH PERCENT SEED OUT.json
                                      overwrite PERCENT of the image's 64 KiB
                                      clusters with random data and write the
                                      changed ranges as strata extent JSON
  benchdata.py qemu-io PATH CHANGES.json PARTS_DIR
                                      print qemu-io commands that write the
                                      changed ranges of PATH into a qcow2
                                      overlay (data staged in PARTS_DIR), so
                                      that each layer of the qcow2 chain holds
                                      only what changed, as a real incremental
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


def qemu_io(path, changes, parts):
    os.makedirs(parts, exist_ok=True)
    with open(changes) as f:
        extents = json.load(f)["extents"]
    with open(path, "rb") as src:
        for i, e in enumerate(extents):
            part = os.path.join(parts, str(i))
            src.seek(e["offset"])
            with open(part, "wb") as out:
                out.write(src.read(e["length"]))
            print(f"write -q -s {part} {e['offset']} {e['length']}")


if __name__ == "__main__":
    if sys.argv[1] == "base":
        base(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "change":
        change(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "qemu-io":
        qemu_io(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
