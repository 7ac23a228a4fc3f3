"""Device side of one split virtqueue (virtio spec 2.7; protocol.md 2.2-2.5).

Everything read from the rings comes from the guest: a malformed descriptor chain costs that
one request (ChainError; the caller completes it with used.len 0), a broken ring stops the queue
(RingError; the device needs a reset).  Neither ever reads or writes outside guest memory.

The driver runs concurrently on other CPUs, so the barriers of protocol.md 2.5 are explicit
fence() calls: plain Python loads and stores on the mapping carry no ordering of their own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvirtiofsd.common.native import fence
from pyvirtiofsd.common.virtio import (
    AVAIL_F_NO_INTERRUPT,
    DESC,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    USED_ELEM,
    USED_F_NO_NOTIFY,
    DescFlag,
    avail_ring_size,
    desc_table_size,
    need_event,
    used_ring_size,
)
from pyvirtiofsd.worker.dirtylog import ChainMarker, DirtyLog
from pyvirtiofsd.worker.guestmem import GuestMemory, GuestMemoryError

_U16 = struct.Struct("<H")
_F_NEXT = int(DescFlag.NEXT)
_F_WRITE = int(DescFlag.WRITE)
_F_INDIRECT = int(DescFlag.INDIRECT)
# `next` is 16 bits, so no chain inside an indirect table can reach past entry 65535.
_MAX_INDIRECT = 1 << 16
_MAX_CHAIN_BYTES = 1 << 32


def _join_prefix(parts: list[memoryview], n: int) -> bytes:
    out = bytearray()
    for p in parts:
        if len(out) + len(p) >= n:
            out += p[: n - len(out)]
            break
        out += p
    return bytes(out)


class ChainError(Exception):
    """One descriptor chain is malformed; complete `head` with used.len 0 and go on."""

    def __init__(self, head: int, reason: str) -> None:
        super().__init__(f"descriptor chain {head}: {reason}")
        self.head = head


class RingError(Exception):
    """The ring itself is inconsistent; stop processing it (device needs reset)."""


@dataclass(slots=True)
class Chain:
    """A popped request: guest buffers in chain order, readable part then writable part."""

    head: int
    readable: list[memoryview]
    writable: list[memoryview]


class SplitQueue:
    """Pops available chains and pushes used elements on one split ring."""

    __slots__ = (
        "_mem", "_size", "_mask", "_desc", "_avail", "_used", "_event_idx", "_indirect",
        "_next_avail", "_shadow_avail", "_next_used", "_signalled_used", "_signalled_valid",
        "_used16", "_avail16",
        "_used_event_off", "_avail_event_off", "_log", "_marker",
    )

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_uaddr: int,
        avail_uaddr: int,
        used_uaddr: int,
        next_avail: int,
        *,
        event_idx: bool,
        indirect: bool = True,
    ) -> None:
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        # Alignment from spec 2.7 table "Virtqueue Part Alignment".
        if desc_uaddr & 15 or avail_uaddr & 1 or used_uaddr & 3:
            raise ValueError(
                f"misaligned ring: desc {desc_uaddr:#x} (16), avail {avail_uaddr:#x} (2), "
                f"used {used_uaddr:#x} (4)"
            )
        # used_event / avail_event only exist (and are only mapped by the front-end) with
        # EVENT_IDX, as in QEMU's vhost_get_{avail,used}_size().
        trailer = 0 if event_idx else 2
        self._mem = mem
        self._size = size
        self._mask = size - 1
        self._desc = mem.uaddr_view(desc_uaddr, desc_table_size(size))
        self._avail = mem.uaddr_view(avail_uaddr, avail_ring_size(size) - trailer)
        self._used = mem.uaddr_view(used_uaddr, used_ring_size(size) - trailer)
        # Fields the driver reads while we write them (used idx, flags, avail_event) are stored
        # through a u16 view: one 2-byte store.  struct.pack_into zero-fills before it packs,
        # so the driver could observe a transient 0 (a used idx "jumping" backwards).
        self._used16 = self._used.cast("H")
        # The same for the fields the driver writes while we read them (avail idx, flags,
        # used_event): struct assembles "<H" a byte at a time, so a read racing the driver's
        # store could see 0x01FF -> 0x0200 as 0x0100.  x86 and virtio are both little-endian.
        self._avail16 = self._avail.cast("H")
        self._event_idx = event_idx
        self._indirect = indirect
        self._next_avail = next_avail & 0xFFFF
        self._shadow_avail = self._next_avail
        # The device reads the next used index from the ring (vhost-user SET_VRING_BASE).
        self._next_used = _U16.unpack_from(self._used, 2)[0]
        self._signalled_used = 0
        self._signalled_valid = False
        self._used_event_off = 4 + 2 * size
        self._avail_event_off = 4 + 8 * size
        # The dirty log while writes are logged (worker/dirtylog.py), else None.
        self._log: DirtyLog | None = None
        self._marker: ChainMarker | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def next_avail(self) -> int:
        """Next available-ring index to process (free-running u16, for GET_VRING_BASE)."""
        return self._next_avail

    @property
    def next_used(self) -> int:
        return self._next_used

    def pop(self) -> Chain | None:
        """The next available chain, or None when the driver has published nothing new.

        Raises RingError (state unchanged) for a broken ring, ChainError (chain consumed)
        for a malformed chain.
        """
        last = self._next_avail
        if last == self._shadow_avail:
            avail_idx = self._avail16[1]
            if avail_idx == last:
                return None
            if (avail_idx - last) & 0xFFFF > self._size:
                raise RingError(
                    f"avail idx {avail_idx} is more than {self._size} ahead of {last}"
                )
            # spec 2.7.13 / protocol.md 2.5 step 1: ring entries and descriptors must not
            # be read before the avail idx that published them.
            fence()
            self._shadow_avail = avail_idx
        head = _U16.unpack_from(self._avail, 4 + 2 * (last & self._mask))[0]
        if head >= self._size:
            raise RingError(f"avail ring entry {last} names descriptor {head} >= {self._size}")
        self._next_avail = (last + 1) & 0xFFFF
        return self._walk(head)

    def walk(self, head: int) -> Chain:
        """The chain at `head` again, without taking anything from the avail ring: for a
        request a previous worker popped but never completed (worker/recovery.py)."""
        if not 0 <= head < self._size:
            raise ChainError(head, f"head {head} is outside the ring of {self._size}")
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        # Chain rules: spec 2.7.5.3, 2.7.4.2; protocol.md 2.3.
        gpa_views = self._mem.gpa_views
        unpack = DESC.unpack_from
        table = self._desc
        limit = self._size
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        total = 0
        in_write = False
        in_table = False
        i = head
        count = 0
        while True:
            count += 1
            if count > limit:
                raise ChainError(head, "chain longer than its table (loop?)")
            addr, length, flags, nxt = unpack(table, i * DESC_SIZE)
            if flags & _F_INDIRECT:
                # The WRITE flag of the descriptor pointing to the table is ignored (2.7.5.3.2).
                if in_table:
                    raise ChainError(head, "nested indirect descriptor")
                if not self._indirect:
                    raise ChainError(head, "indirect descriptor without INDIRECT_DESC")
                if flags & _F_NEXT:
                    raise ChainError(head, "descriptor has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise ChainError(head, f"indirect table length {length}")
                try:
                    parts = gpa_views(addr, length)
                except GuestMemoryError as e:
                    raise ChainError(head, f"indirect table: {e}") from None
                limit = min(length // DESC_SIZE, _MAX_INDIRECT)
                # A table straddling regions is rare; a private copy of its reachable part
                # keeps lookups simple (the device never writes the table, spec 2.7.5.2).
                table = parts[0] if len(parts) == 1 else _join_prefix(parts, limit * DESC_SIZE)
                in_table = True
                i = 0
                count = 0
                continue
            if flags & _F_WRITE:
                in_write = True
            elif in_write:
                raise ChainError(head, "device-readable descriptor after a writable one")
            if length:
                total += length
                if total > _MAX_CHAIN_BYTES:
                    raise ChainError(head, "chain longer than 4 GiB")
                try:
                    views = gpa_views(addr, length)
                except GuestMemoryError as e:
                    raise ChainError(head, str(e)) from None
                if in_write:
                    writable += views
                else:
                    readable += views
            if not flags & _F_NEXT:
                return Chain(head, readable, writable)
            if nxt >= limit:
                raise ChainError(head, f"next {nxt} is outside the table of {limit}")
            i = nxt

    def push(self, head: int, written: int) -> None:
        """Return chain `head` to the driver with `written` bytes in its writable part."""
        if self._marker is not None:
            self._push_logged(head, written, self._marker)
            return
        used = self._used
        n = self._next_used
        USED_ELEM.pack_into(used, 4 + 8 * (n & self._mask), head, written)
        # spec 2.7.8.2: the element (and the reply bytes) before the used idx that publishes it.
        fence()
        n = (n + 1) & 0xFFFF
        self._used16[1] = n
        self._next_used = n

    def should_notify(self) -> bool:
        """Whether the driver wants a used-buffer notification for what was pushed since the
        last call (spec 2.7.10; protocol.md 2.5 step 7)."""
        # Store (used idx) -> load (flags / used_event) ordering: a full barrier.
        fence()
        if not self._event_idx:
            return not self._avail16[0] & AVAIL_F_NO_INTERRUPT
        new = self._next_used
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if not valid:
            return True
        return need_event(self._avail16[self._used_event_off >> 1], new, old)

    def disable_notification(self) -> None:
        """Ask the driver not to kick while the device is busy (advisory, spec 2.7.10)."""
        if not self._event_idx:
            self._used16[0] = USED_F_NO_NOTIFY
            if self._log is not None:
                self._log.mark_used(0, 2)

    def enable_notification(self) -> bool:
        """Ask for a kick on the next available buffer; True if buffers are already waiting.

        The caller must process again instead of sleeping when this returns True: a chain
        published before the request became visible would never be kicked for.
        """
        if self._event_idx:
            self._used16[self._avail_event_off >> 1] = self._next_avail
        else:
            self._used16[0] = 0
        if self._log is not None:
            self._log.mark_used(self._avail_event_off if self._event_idx else 0, 2)
        # Store (avail_event / flags) -> load (avail idx): a full barrier (protocol.md 2.5 step 3).
        fence()
        return self._avail16[1] != self._next_avail

    # -- dirty-page logging (vhost-user "Migration"; worker/dirtylog.py) -----------------------
    def set_log(self, log: DirtyLog | None) -> None:
        """Log every write to guest memory in `log` from now on (None: stop logging)."""
        self._log = log
        self._marker = None if log is None else ChainMarker(log, self._mem, self._desc,
                                                             self._size)

    def _push_logged(self, head: int, written: int, marker: ChainMarker) -> None:
        """push() while logging, in worker/engine.c's push_logged order: the reply's pages
        and the used element marked before the used idx publishes them, the idx after."""
        marker.mark(head, written)
        log = marker.log
        used = self._used
        n = self._next_used
        slot = 4 + 8 * (n & self._mask)
        USED_ELEM.pack_into(used, slot, head, written)
        log.mark_used(slot, 8)
        fence()
        n = (n + 1) & 0xFFFF
        self._used16[1] = n
        self._next_used = n
        log.mark_used(2, 2)
