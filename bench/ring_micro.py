"""Micro-benchmark of the split-ring engine: pop + push of a 2-descriptor chain.

Prints chains per second handled by the device side only (the simulated driver refills the
available ring between timed batches).  A figure to compare changes with, not a test.

    .venv/bin/python bench/ring_micro.py [seconds]
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time

from pyvirtiofsd.common.virtio import DESC, DescFlag
from pyvirtiofsd.worker.guestmem import GuestMemory
from pyvirtiofsd.worker.virtqueue import SplitQueue

QSIZE = 256
MEM = 1 << 20
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x3000, 0x4000
UADDR = 0x7F00_0000_0000
U16 = struct.Struct("<H")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    fd = os.memfd_create("ring-micro")
    os.ftruncate(fd, MEM)
    driver = mmap.mmap(fd, MEM)
    mem = GuestMemory()
    mem.add_region(0, MEM, UADDR, 0, fd)
    os.close(fd)
    # One chain, head 0: 64 readable bytes (a FUSE request header) then 4 KiB writable.
    DESC.pack_into(driver, DESC_GPA, 0x10000, 64, int(DescFlag.NEXT), 1)
    DESC.pack_into(driver, DESC_GPA + 16, 0x20000, 4096, int(DescFlag.WRITE), 0)
    for k in range(QSIZE):
        U16.pack_into(driver, AVAIL_GPA + 4 + 2 * k, 0)
    q = SplitQueue(mem, QSIZE, UADDR + DESC_GPA, UADDR + AVAIL_GPA, UADDR + USED_GPA, 0,
                   event_idx=True)

    avail = 0
    done = 0
    busy = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        avail = (avail + QSIZE) & 0xFFFF         # publish a full ring of the same chain
        U16.pack_into(driver, AVAIL_GPA + 2, avail)
        t0 = time.perf_counter()
        pop, push = q.pop, q.push
        for _ in range(QSIZE):
            chain = pop()
            push(chain.head, 4096)
        q.should_notify()
        busy += time.perf_counter() - t0
        done += QSIZE
    del chain
    mem.clear()
    driver.close()
    print(f"split ring, 2-descriptor chain: {done / busy:,.0f} pop+push per second "
          f"({busy / done * 1e6:.2f} us per chain, {done} chains)")


if __name__ == "__main__":
    main()
