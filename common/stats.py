"""Per-request statistics: one shared region of u64 counters, per queue and per FUSE opcode.

The supervisor maps the region (anonymous, MAP_SHARED) before it forks the workers; each worker
writes the block of its own queue, and the supervisor reads every block to answer
`pyvirtiofsd status` and the Prometheus endpoint (supervisor/status.py).  Nothing here is
filesystem state: losing it costs figures, never a request.

Layout (every integer a native-endian, naturally aligned u64 word; offsets in words):

    header    8 words   0: magic "PVFSSTS1"  1: version  2: queues  3: QUEUE_WORDS
                        4: ERRNOS  5: OPCODES  6: BUCKETS  7: (zero)
    queue q   at 8 + q * QUEUE_BLOCK words, QUEUE_BLOCK = QUEUE_WORDS + ERRNOS
                                                          + OPCODES * OP_WORDS
      +0                      requests     requests answered (or dropped without an answer)
      +1                      errors       of those, answered with an error (-errno)
      +2                      last_opcode  opcode of the request most recently started
      +3                      deferred     of those, requests the native request engine handed
                                           to the Python FUSE server (counted by the worker's
                                           Python side; 0 on the Python data plane)
      +4 .. +15               zero (room for more per-queue words)
      +QUEUE_WORDS + e        errno e      answers with -e, 1 <= e < ERRNOS; word 0 counts
                                           the larger ones
      +QUEUE_WORDS + ERRNOS + op * OP_WORDS    one block per opcode op < OPCODES (slot 0
                                           counts larger ones, such as CUSE_INIT):
          +0 count  +1 errors  +2 latency_sum_ns  +3 + b  histogram bucket b

Histogram bucket b (0 <= b < BUCKETS - 1) counts requests that took at most 2**b microseconds
(and more than 2**(b-1)); the last bucket counts everything slower.  Latency is measured from
the moment the request's header is decoded to the moment its reply is written into guest
memory, on CLOCK_MONOTONIC.

What a data plane must do per request (the Python FuseServer does exactly this, in
FuseServer.handle; a native one calls the same C function, vfs_stats_record in
common/native_build.py, with the same queue block pointer):

1. once fuse_in_header is read: store the opcode into word +2 (a plain aligned store);
2. once the reply is in guest memory (or it was decided there is none): one call
   ``vfs_stats_record(queue_block, opcode, errno_or_0, elapsed_ns)``, which adds 1 to
   requests, the opcode's count and its bucket, elapsed_ns to its latency sum, and, for an
   error reply, 1 to errors, the opcode's errors and the errno's word.

All adds are atomic (relaxed): one process writes a block, any process may read it at any time
and sees each word whole.  A reader may see a histogram a request ahead of its count: the words
are not updated as one.  Requests that are never decoded (a chain shorter than
fuse_in_header) are not counted.
"""

from __future__ import annotations

import errno
import mmap
import struct
from dataclasses import dataclass, field
from typing import Any

from pyvirtiofsd.common import native, shm
from pyvirtiofsd.common.fuse_abi import Opcode

__all__ = ["BUCKETS", "OpStats", "QueueSnapshot", "QueueStats", "Stats", "bucket_bounds_us",
           "queue_entry"]

MAGIC = b"PVFSSTS1"
VERSION = 1
HEADER_WORDS = 8
QUEUE_WORDS = 16
ERRNOS = 128
OPCODES = 64
BUCKETS = 24
OP_WORDS = 3 + BUCKETS
QUEUE_BLOCK = QUEUE_WORDS + ERRNOS + OPCODES * OP_WORDS

# Per-queue words.
REQUESTS = 0
ERRORS = 1
LAST_OPCODE = 2
DEFERRED = 3

_HEADER = struct.Struct("=8sQQQQQQQ")
_record = native.lib.vfs_stats_record
_fetch_add = native.lib.vfs_fetch_add64


def bucket_bounds_us() -> list[int]:
    """Upper bound of each histogram bucket but the last, in microseconds."""
    return [1 << b for b in range(BUCKETS - 1)]


@dataclass(frozen=True)
class OpStats:
    count: int
    errors: int
    latency_sum_ns: int
    buckets: tuple[int, ...]


@dataclass(frozen=True)
class QueueSnapshot:
    requests: int
    errors: int
    last_opcode: int
    errnos: dict[int, int] = field(default_factory=dict)   # errno (0: >= ERRNOS) -> answers
    ops: dict[int, OpStats] = field(default_factory=dict)  # opcode (0: >= OPCODES) -> figures
    deferred: int = 0      # handed by the native engine to the Python FUSE server


class QueueStats:
    """The writer's side of one queue's block: what a worker's FuseServer calls."""

    __slots__ = ("_p", "queue")

    def __init__(self, ptr, queue: int) -> None:
        self._p = ptr          # uint64_t * to the queue's block
        self.queue = queue

    @property
    def address(self) -> int:
        """The block's address, for the native engine, which records what it answers itself."""
        return int(native.ffi.cast("uintptr_t", self._p))

    def started(self, opcode: int) -> None:
        self._p[LAST_OPCODE] = opcode

    def record(self, opcode: int, err: int, ns: int) -> None:
        _record(self._p, opcode, err, ns)

    def deferred(self) -> None:
        """One request the native engine handed to the Python FUSE server."""
        _fetch_add(self._p + DEFERRED, 1)


class Stats:
    """The whole region; create() in the supervisor before the workers are forked."""

    def __init__(self, mm: mmap.mmap, queues: int, fd: int = -1) -> None:
        self._mm = mm
        self.fd = fd
        self.queues = queues
        self._words = memoryview(mm).cast("Q")
        self._base = native.address_of(mm)

    @classmethod
    def create(cls, queues: int, keep_fd: bool = False) -> Stats:
        """keep_fd: keep its memfd (the supervisor, for a live upgrade)."""
        if not 0 < queues <= 0x10000:
            raise ValueError(f"statistics for {queues} queues")
        size = 8 * (HEADER_WORDS + queues * QUEUE_BLOCK)
        fd, mm = shm.create(size, "stats", keep_fd)
        _HEADER.pack_into(mm, 0, MAGIC, VERSION, queues, QUEUE_WORDS, ERRNOS, OPCODES, BUCKETS,
                          0)
        return cls(mm, queues, fd)

    def _offset(self, queue: int) -> int:
        if not 0 <= queue < self.queues:
            raise IndexError(f"queue {queue} out of range 0..{self.queues - 1}")
        return HEADER_WORDS + queue * QUEUE_BLOCK

    def queue(self, queue: int) -> QueueStats:
        return QueueStats(native.u64_ptr(self._base, 8 * self._offset(queue)), queue)

    def last_opcode(self, queue: int) -> int:
        return self._words[self._offset(queue) + LAST_OPCODE]

    def snapshot(self, queue: int) -> QueueSnapshot:
        """The queue's figures as they stand; only non-zero errnos and opcodes are listed."""
        w = self._words
        base = self._offset(queue)
        errs = base + QUEUE_WORDS
        errnos = {e: w[errs + e] for e in range(ERRNOS) if w[errs + e]}
        ops: dict[int, OpStats] = {}
        for op in range(OPCODES):
            o = errs + ERRNOS + op * OP_WORDS
            if w[o]:
                ops[op] = OpStats(w[o], w[o + 1], w[o + 2], tuple(w[o + 3:o + 3 + BUCKETS]))
        return QueueSnapshot(w[base + REQUESTS], w[base + ERRORS], w[base + LAST_OPCODE],
                             errnos, ops, w[base + DEFERRED])

    def close(self) -> None:
        if self._mm.closed:
            return
        self._words.release()
        native.ffi.release(self._base)
        self._mm.close()


def errno_name(e: int) -> str:
    """ENOENT for 2; 'other' for the word that counts errnos >= ERRNOS."""
    if e == 0:
        return "other"
    return errno.errorcode.get(e, f"E{e}")


def opcode_name(opcode: int) -> str:
    if opcode == 0:
        return "OTHER"
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"OPCODE_{opcode}"


def queue_entry(queue: int, snap: QueueSnapshot, in_flight: int,
                restarts: int) -> dict[str, Any]:
    """One queue of the status document (supervisor/status.py), from its snapshot."""
    return {
        "queue": queue,
        "kind": "hiprio" if queue == 0 else "request",
        "requests": snap.requests,
        "errors": snap.errors,
        "errnos": {errno_name(e): n for e, n in sorted(snap.errnos.items())},
        "deferred": snap.deferred,
        "in_flight": in_flight,
        "restarts": restarts,
        "last_opcode": opcode_name(snap.last_opcode) if snap.last_opcode else None,
        "ops": {opcode_name(op): {"count": s.count, "errors": s.errors,
                                  "latency_sum_ns": s.latency_sum_ns,
                                  "buckets": list(s.buckets)}
                for op, s in sorted(snap.ops.items())},
    }
