#!/usr/bin/env python3
"""Run one blockdev-backup through qemu-storage-daemon's QMP socket and wait
for it, for scripts/bench.sh.

  qmp.py SOCKET backup-nbd  SOCKPATH   # sync=full into an NBD target (strata receive)
  qmp.py SOCKET backup-file PATH       # sync=full into a new local qcow2 file
"""
import json
import socket
import sys


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def next(self):
        return json.loads(self.f.readline())

    def cmd(self, execute, **args):
        self.f.write(json.dumps({"execute": execute, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            v = self.next()
            if "error" in v:
                sys.exit(f"{execute}: {v['error']}")
            if "return" in v:
                return v["return"]

    def wait_job(self, job):
        while True:
            v = self.next()
            if v.get("event") == "BLOCK_JOB_COMPLETED" and v["data"]["device"] == job:
                if "error" in v["data"]:
                    sys.exit(f"job failed: {v['data']['error']}")
                return


def main():
    q = Qmp(sys.argv[1])
    kind, target = sys.argv[2], sys.argv[3]
    if kind == "backup-nbd":
        q.cmd("blockdev-add", driver="nbd", **{"node-name": "tgt"},
              server={"type": "unix", "path": target}, export="")
    else:
        q.cmd("blockdev-add", driver="file", **{"node-name": "tgtfile"}, filename=target)
        q.cmd("blockdev-add", driver="qcow2", **{"node-name": "tgt"}, file="tgtfile")
    q.cmd("blockdev-backup", device="disk0", target="tgt", sync="full", **{"job-id": "j"})
    q.wait_job("j")
    q.cmd("blockdev-del", **{"node-name": "tgt"})
    if kind == "backup-file":
        q.cmd("blockdev-del", **{"node-name": "tgtfile"})


main()
