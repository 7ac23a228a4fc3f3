"""Micro-benchmark of the shared arena's hot path: acquire+release pairs per second.

Every FUSE request pins its inode (and, for I/O, its handle) once, so this bounds how much of a
request's budget the shared tables take.  Run: .venv/bin/python bench/arena_micro.py
"""

from __future__ import annotations

import os
import tempfile
import time

from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.journal import Journal


def _rate(fn, ident: int, rounds: int, repeat: int = 5) -> float:
    """Calls per second of the fastest of `repeat` runs: on a shared machine the others
    measure the neighbours (the timeit convention)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(rounds):
            fn(ident)
        best = min(best, time.perf_counter() - start)
    return rounds / best


def main(rounds: int = 50_000) -> None:
    arena = Arena.create()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.open(tmp, os.O_PATH)
        st = os.fstat(root)
        arena.inodes.set_root(root, st.st_dev, st.st_ino)
        path = os.path.join(tmp, "f")
        with open(path, "w"):
            pass
        fd = os.open(path, os.O_PATH)
        fst = os.fstat(fd)
        nodeid, _ = arena.inodes.lookup_or_insert(fd, fst.st_dev, fst.st_ino)
        fh = arena.handles.insert(os.open(path, os.O_RDONLY), nodeid, os.O_RDONLY)

        inodes, handles = arena.inodes, arena.handles
        # A queue worker's path: every pin and lookup also journaled for crash recovery.
        journal = Journal.create(1, 8)
        jq = journal.queue(0)
        jq.popped(0, 0, 3, 1)

        def inode_pair(ident: int) -> None:
            inodes.acquire(ident)
            inodes.release(ident)

        def handle_pair(ident: int) -> None:
            handles.acquire(ident)
            handles.release(ident)

        def inode_with(ident: int) -> None:
            with inodes.pinned(ident):
                pass

        def lookup_forget(ident: int) -> None:
            n, _ = inodes.lookup_or_insert(fd, fst.st_dev, fst.st_ino)
            inodes.forget(n, 1)

        def journaled_pair(ident: int) -> None:
            inodes.acquire_journaled(jq, ident)
            inodes.release_journaled(jq, ident)

        for name, fn, ident in (("inode acquire+release", inode_pair, nodeid),
                                ("handle acquire+release", handle_pair, fh),
                                ("inode pinned() block", inode_with, nodeid),
                                ("lookup_or_insert(known)+forget", lookup_forget, nodeid),
                                ("journaled inode acquire+release", journaled_pair, nodeid)):
            fn(ident)
            rate = _rate(fn, ident, rounds)
            print(f"{name:32s} {rate / 1e6:6.2f} M/s  ({1e6 / rate:5.2f} us each)")

        handles.remove(fh)
        inodes.forget(nodeid, 1)
    arena.close()


if __name__ == "__main__":
    main()
