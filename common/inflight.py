"""The vhost-user inflight region (protocol feature INFLIGHT_SHMFD; protocol.md 1.11).

The front-end asks for it with GET_INFLIGHT_FD (queue count and size), keeps the memfd the
back-end allocates, and hands it back with SET_INFLIGHT_FD on every connection.  It outlives the
back-end process: after a restart or a dropped connection, it is what says which requests the
guest is still waiting for.

Layout (split ring; native byte order, as libvhost-user and DPDK lay it out):

    the region    queue 0 | queue 1 | ... ; each queue at q * queue_stride(queue_size)
    queue header  "=QHHHH"  features (0), version (1; 0 = never initialised), desc_num,
                            last_batch_head, used_idx (the back-end's copy of used->idx)
    desc[desc_num] "=B5xHQ" inflight (heads only), padding, next (batch list), counter

The request path keeps it current in C, next to the inflight journal (common/state.c,
vfs_jq_popped / replied / pushed): on pop `counter` then `inflight = 1`; before the used-ring
push the head is linked in as `last_batch_head`; after it, `inflight = 0` and `used_idx`.  The
journal stays the richer record (replies written but not pushed, pre-states of non-idempotent
calls, table effects) and is what a respawned worker or a front-end reconnecting to the same
daemon resumes from; the region is what a *new* daemon process resumes from, when it has no
journal for the ring (queue_resubmit()).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

__all__ = ["ALIGNMENT", "DESC", "HEADER", "VERSION", "InflightDesc", "QueueRegion",
           "queue_stride", "region_size"]

ALIGNMENT = 64            # each queue's part starts on a cache line (libvhost-user, DPDK)
VERSION = 1
HEADER = struct.Struct("=QHHHH")
DESC = struct.Struct("=B5xHQ")
MAX_QUEUE_SIZE = 32768


def queue_stride(queue_size: int) -> int:
    """Bytes of one queue's part: the header and desc_num entries, rounded up to ALIGNMENT
    (libvhost-user's ALIGN_UP(16 * size + 2, 64), which leaves room for the header)."""
    return (DESC.size * queue_size + 2 + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


def region_size(num_queues: int, queue_size: int) -> int:
    return queue_stride(queue_size) * num_queues


@dataclass(frozen=True, slots=True)
class InflightDesc:
    head: int
    counter: int


@dataclass
class QueueRegion:
    """One queue's part of a mapped region: read and repaired on the cold path only (ring
    start); the request path writes it in C."""

    view: memoryview
    offset: int
    desc_num: int

    def header(self) -> tuple[int, int, int, int, int]:
        return HEADER.unpack_from(self.view, self.offset)

    def _put_header(self, features: int, version: int, desc_num: int, last_batch_head: int,
                    used_idx: int) -> None:
        HEADER.pack_into(self.view, self.offset, features, version, desc_num,
                         last_batch_head, used_idx)

    def desc(self, head: int) -> tuple[int, int, int]:
        """(inflight, next, counter) of `head`."""
        return DESC.unpack_from(self.view, self.offset + HEADER.size + head * DESC.size)

    def mark(self, head: int, counter: int) -> None:
        """`head` is in flight, fetched as `counter`."""
        at = self.offset + HEADER.size + head * DESC.size
        DESC.pack_into(self.view, at, 1, self.desc(head)[1], counter)

    def _clear(self, head: int) -> None:
        self.view[self.offset + HEADER.size + head * DESC.size] = 0

    def reset(self, used_idx: int) -> None:
        """A ring starts afresh: nothing in flight, the used index where the ring stands."""
        end = self.offset + HEADER.size + self.desc_num * DESC.size
        self.view[self.offset:end] = bytes(end - self.offset)
        self._put_header(0, VERSION, self.desc_num, 0, used_idx & 0xFFFF)

    def resubmit(self, used_idx: int) -> list[InflightDesc]:
        """The spec's reconnect step: repair the last batch against the ring's used index now,
        then every head still in flight, in the order it was fetched.  The region is left
        describing exactly those heads in flight and `used_idx`.  ValueError: the region is
        not one a back-end of this ring wrote (the caller starts the ring afresh)."""
        _features, version, desc_num, last_batch_head, copy = self.header()
        if version == 0:
            # Never initialised (a fresh memfd): nothing was in flight (spec "Inflight I/O
            # tracking": the back-end initialises it).
            self.reset(used_idx)
            return []
        if version != VERSION:
            raise ValueError(f"inflight region version {version}, expected {VERSION}")
        if desc_num != self.desc_num:
            raise ValueError(f"inflight region for {desc_num} descriptors, the ring has"
                             f" {self.desc_num}")
        if copy != used_idx & 0xFFFF:
            # The last batch went out after its heads were linked in but before they were
            # cleared: clear them (batch size = used idx - copy; the request path pushes
            # batches of one, longer batches follow the list).
            batch = (used_idx - copy) & 0xFFFF
            if batch > desc_num or last_batch_head >= desc_num:
                raise ValueError(f"inflight region used_idx {copy} and the ring's {used_idx}"
                                 f" are {batch} apart")
            head = last_batch_head
            for _ in range(batch):
                self._clear(head)
                head = self.desc(head)[1]
                if head >= desc_num:
                    break
            self._put_header(0, VERSION, desc_num, last_batch_head, used_idx & 0xFFFF)
        out = [InflightDesc(h, self.desc(h)[2]) for h in range(desc_num) if self.desc(h)[0]]
        out.sort(key=lambda d: d.counter)
        return out


def map_region(fd: int, offset: int, length: int) -> tuple[mmap.mmap, int]:
    """Map `length` bytes at `offset` of the region's file: (mapping, offset of the bytes in
    it), the mapping starting on the page below `offset` as mmap(2) requires."""
    base = offset & ~(mmap.ALLOCATIONGRANULARITY - 1)
    mm = mmap.mmap(fd, offset - base + length, flags=mmap.MAP_SHARED,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
    return mm, offset - base
