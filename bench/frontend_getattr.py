"""GETATTR round trips per second through the test front-end, at queue depth 1 and 32.

    .venv/bin/python bench/frontend_getattr.py [--seconds S] [--depths 1,32] [-- CMD ...]

CMD is the daemon command line, with {socket} and {shared} replaced by a fresh socket path and
shared directory; it defaults to the Rust virtiofsd.  The figure includes the Python driver's
own cost per request, so it compares daemons only when they are measured the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyvirtiofsd.common import fuse_abi as fa
from tests.frontend import (
    ANCHOR,
    Frontend,
    FuseClient,
    start_daemon,
    stop_daemon,
)

DEFAULT_CMD = [ANCHOR, "--socket-path={socket}", "--shared-dir={shared}", "--sandbox=none"]
GETATTR_BODY = fa.GETATTR_IN.pack(0, 0)


def run(client: FuseClient, depth: int, seconds: float) -> float:
    """Keep `depth` GETATTRs in flight for `seconds`; returns completed requests per second."""
    vq = client.vq
    for _ in range(depth):
        client.submit(fa.Opcode.GETATTR, fa.ROOT_ID, GETATTR_BODY, kick=False)
    vq.kick()
    done = 0
    start = time.monotonic()
    end = start + seconds
    while True:
        replies = client.collect()
        for _token, (error, _body) in replies:
            if error:
                raise SystemExit(f"GETATTR failed: {os.strerror(error)}")
        done += len(replies)
        now = time.monotonic()
        if now >= end:
            break
        for _ in replies:
            client.submit(fa.Opcode.GETATTR, fa.ROOT_ID, GETATTR_BODY, kick=False)
        vq.kick()
    elapsed = time.monotonic() - start
    while vq.inflight:     # drain so the next run starts from an empty ring
        client.collect()
    return done / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--depths", default="1,32")
    ap.add_argument("cmd", nargs="*", help="daemon command ({socket}, {shared} substituted)")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]

    work = tempfile.mkdtemp(prefix="vfs-bench-")
    sock, shared = os.path.join(work, "s"), os.path.join(work, "share")
    os.mkdir(shared)
    argv = [a.format(socket=sock, shared=shared) for a in (args.cmd or DEFAULT_CMD)]
    proc = start_daemon(argv, os.path.join(work, "daemon.log"))
    try:
        # GETATTR is 4 descriptors: the ring must hold max(depths) chains.
        size = 1 << max(7, (4 * max(depths) - 1).bit_length())
        with Frontend.connect(sock, process=proc, queue_size=size) as fe:
            client = FuseClient(fe)
            client.init()
            print(f"daemon: {argv[0]}")
            for depth in depths:
                rate = run(client, depth, args.seconds)
                print(f"GETATTR depth {depth:>3}: {rate:10.0f} ops/s")
    finally:
        stop_daemon(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
