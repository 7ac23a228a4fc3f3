"""SplitQueue against a driver simulated in this module over memfd-backed guest memory."""

from __future__ import annotations

import mmap
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofsd.common.virtio import DESC, USED_ELEM, DescFlag
from pyvirtiofsd.worker.chain import Reader, Writer, ram_prefix
from pyvirtiofsd.worker.guestmem import GuestMemory, GuestMemoryError, WindowBuffer
from pyvirtiofsd.worker.virtqueue import Chain, ChainError, RingError, SplitQueue

MiB = 1 << 20
NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
U16 = struct.Struct("<H")

# Guest layout: two adjacent regions (the second with an mmap offset and a user address that
# is not contiguous with the first), a gap, a third region.  (gpa, size, uaddr, mmap_offset)
LAYOUT = [
    (0, MiB, 0x7F00_0000_0000, 0),
    (MiB, MiB, 0x7F00_4000_0000, 0x3008),
    (4 * MiB, MiB, 0x5555_0000_0000, 0),
]
GAP = 3 * MiB
BOUNDARY = MiB                      # regions 0 and 1 meet here
RING_GPA = 0x1000
BUF_GPA = 0x40000


class FakeGuest:
    """The driver side: owns its own mappings of the memory and writes rings like a guest."""

    def __init__(self, qsize: int = 8, *, event_idx: bool = False) -> None:
        self.n = qsize
        self.event_idx = event_idx
        self.mem = GuestMemory()
        self._maps: list[tuple[int, int, mmap.mmap, int]] = []
        for gpa, size, uaddr, off in LAYOUT:
            fd = os.memfd_create("fake-guest")
            try:
                os.ftruncate(fd, off + size)
                self._maps.append((gpa, size, mmap.mmap(fd, off + size), off))
                self.mem.add_region(gpa, size, uaddr, off, fd)
            finally:
                os.close(fd)
        self.desc = RING_GPA
        self.avail = self.desc + 16 * qsize
        self.used = (self.avail + 6 + 2 * qsize + 3) & ~3
        self.avail_idx = 0
        self.next_desc = 0
        self.brk = BUF_GPA

    def close(self) -> None:
        self.mem.clear()
        for _, _, m, _ in self._maps:
            m.close()

    # -- raw memory, via the driver's own mappings --
    def _locate(self, gpa: int):
        for base, size, m, off in self._maps:
            if base <= gpa < base + size:
                return m, off + gpa - base, base + size - gpa
        raise AssertionError(f"test bug: {gpa:#x} not in guest memory")

    def write(self, gpa: int, data: bytes) -> None:
        while data:
            m, pos, room = self._locate(gpa)
            k = min(room, len(data))
            m[pos : pos + k] = data[:k]
            gpa, data = gpa + k, data[k:]

    def read(self, gpa: int, n: int) -> bytes:
        out = b""
        while n:
            m, pos, room = self._locate(gpa)
            k = min(room, n)
            out += m[pos : pos + k]
            gpa, n = gpa + k, n - k
        return out

    @staticmethod
    def uaddr(gpa: int) -> int:
        for base, size, ua, _ in LAYOUT:
            if base <= gpa < base + size:
                return ua + gpa - base
        raise AssertionError(gpa)

    def mem_error(self, gpa: int, length: int) -> str:
        """What the window gate says of [gpa, +length)."""
        with pytest.raises(GuestMemoryError) as ei:
            self.mem.window_buffers(gpa, length)
        return str(ei.value)

    def alloc(self, n: int) -> int:
        gpa = self.brk
        self.brk += max(n, 1)
        return gpa

    # -- ring fields --
    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                 table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.write(base + 16 * i, DESC.pack(addr, length, flags, nxt))

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.write(self.avail + 4 + 2 * (self.avail_idx % self.n), U16.pack(h))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.write(self.avail + 2, U16.pack(idx))

    def set_avail_flags(self, flags: int) -> None:
        self.write(self.avail, U16.pack(flags))

    def set_used_event(self, idx: int) -> None:
        self.write(self.avail + 4 + 2 * self.n, U16.pack(idx))

    def avail_event(self) -> int:
        return U16.unpack(self.read(self.used + 4 + 8 * self.n, 2))[0]

    def used_flags(self) -> int:
        return U16.unpack(self.read(self.used, 2))[0]

    def used_idx(self) -> int:
        # One 2-byte load, as a driver does: a byte-wise copy (mmap slicing, struct) racing
        # the device's store could mix an old and a new byte.
        m, pos, _ = self._locate(self.used + 2)
        with memoryview(m) as whole, whole[pos : pos + 2] as field, field.cast("H") as u16:
            return u16[0]

    def set_used_idx(self, idx: int) -> None:
        self.write(self.used + 2, U16.pack(idx))

    def used_elem(self, k: int) -> tuple[int, int]:
        return USED_ELEM.unpack(self.read(self.used + 4 + 8 * (k % self.n), 8))

    def queue(self, next_avail: int = 0, **kw) -> SplitQueue:
        kw.setdefault("event_idx", self.event_idx)
        return SplitQueue(self.mem, self.n, self.uaddr(self.desc), self.uaddr(self.avail),
                          self.uaddr(self.used), next_avail, **kw)

    # -- whole chains --
    def add_chain(self, bufs: list[tuple[int, int, bool]], *, indirect: bool = False,
                  table: int | None = None) -> int:
        """bufs: (gpa, len, writable) in chain order.  Returns the head descriptor index."""
        if indirect:
            table = self.alloc(16 * len(bufs)) if table is None else table
            for i, (gpa, n, w) in enumerate(bufs):
                more = i + 1 < len(bufs)
                self.set_desc(i, gpa, n, (WRITE if w else 0) | (NEXT if more else 0), i + 1,
                              table=table)
            head = self._take_desc()
            self.set_desc(head, table, 16 * len(bufs), INDIRECT)
            return head
        idx = [self._take_desc() for _ in bufs]
        for k, (gpa, n, w) in enumerate(bufs):
            more = k + 1 < len(bufs)
            self.set_desc(idx[k], gpa, n, (WRITE if w else 0) | (NEXT if more else 0),
                          idx[k + 1] if more else 0)
        return idx[0]

    def _take_desc(self) -> int:
        i = self.next_desc
        self.next_desc = (i + 1) % self.n
        return i


@pytest.fixture
def guest():
    g = FakeGuest()
    yield g
    g.close()


@pytest.fixture
def eguest():
    g = FakeGuest(event_idx=True)
    yield g
    g.close()


def lens(views: list[memoryview]) -> list[int]:
    return [len(v) for v in views]


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("size", [0, 3, 65536, 100, -8])
def test_bad_queue_size(guest, size):
    with pytest.raises(ValueError, match="power of two"):
        SplitQueue(guest.mem, size, guest.uaddr(RING_GPA), guest.uaddr(0x8000),
                   guest.uaddr(0x9000), 0, event_idx=False)


@pytest.mark.parametrize("delta", [(8, 0, 0), (0, 1, 0), (0, 0, 2)])
def test_misaligned_ring(guest, delta):
    d, a, u = delta
    with pytest.raises(ValueError, match="misaligned"):
        SplitQueue(guest.mem, 8, guest.uaddr(RING_GPA) + d, guest.uaddr(0x8000) + a,
                   guest.uaddr(0x9000) + u, 0, event_idx=False)


def test_ring_outside_memory(guest):
    with pytest.raises(GuestMemoryError):
        SplitQueue(guest.mem, 8, 0x1000, guest.uaddr(0x8000), guest.uaddr(0x9000), 0,
                   event_idx=False)
    # Used ring running past the end of region 0 in user-address space.
    with pytest.raises(GuestMemoryError):
        SplitQueue(guest.mem, 8, guest.uaddr(RING_GPA), guest.uaddr(0x8000),
                   guest.uaddr(MiB - 64), 0, event_idx=False)


def test_ring_trailer_only_needed_with_event_idx(guest):
    # used ring of size 8 without avail_event: 4 + 64 bytes, ending exactly at the region end.
    used = MiB - 68
    SplitQueue(guest.mem, 8, guest.uaddr(RING_GPA), guest.uaddr(0x8000), guest.uaddr(used), 0,
               event_idx=False)
    with pytest.raises(GuestMemoryError, match="not inside"):
        SplitQueue(guest.mem, 8, guest.uaddr(RING_GPA), guest.uaddr(0x8000),
                   guest.uaddr(used), 0, event_idx=True)


def test_initial_indices(guest):
    guest.set_used_idx(1234)
    q = guest.queue(next_avail=70000)
    assert q.next_used == 1234           # read from the ring, not assumed 0
    assert q.next_avail == 70000 & 0xFFFF
    assert q.size == 8


# ---------------------------------------------------------------- valid chains


def test_empty_ring(guest):
    q = guest.queue()
    assert q.pop() is None
    assert q.next_avail == 0


def test_direct_chain(guest):
    guest.write(0x50000, b"request")
    head = guest.add_chain([(0x50000, 7, False), (0x60000, 16, True)])
    guest.publish(head)
    q = guest.queue()
    chain = q.pop()
    assert isinstance(chain, Chain)
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"request"]
    assert lens(chain.writable) == [16]
    assert q.pop() is None
    assert q.next_avail == 1

    Writer(chain.writable).write(b"reply")
    q.push(chain.head, 5)
    assert guest.read(0x60000, 5) == b"reply"
    assert guest.used_idx() == 1
    assert guest.used_elem(0) == (head, 5)
    assert q.next_used == 1


def test_several_chains_in_order(guest):
    heads = [guest.add_chain([(0x50000 + 64 * i, 8, False)]) for i in range(3)]
    guest.publish(*heads)
    q = guest.queue()
    assert [q.pop().head for _ in range(3)] == heads
    assert q.pop() is None


def test_chain_straddling_two_regions(guest):
    data = bytes(range(200))
    guest.write(BOUNDARY - 50, data)
    head = guest.add_chain([(BOUNDARY - 50, 200, False), (BOUNDARY + 500, 10, True)])
    guest.publish(head)
    chain = guest.queue().pop()
    assert lens(chain.readable) == [50, 150]
    assert Reader(chain.readable).read_all() == data


def test_writable_straddling_two_regions(guest):
    head = guest.add_chain([(BOUNDARY - 3, 6, True)])
    guest.publish(head)
    chain = guest.queue().pop()
    assert chain.readable == []
    w = Writer(chain.writable)
    w.write(b"abcdef")
    assert guest.read(BOUNDARY - 3, 6) == b"abcdef"


def test_buffer_in_third_region(guest):
    guest.write(4 * MiB + 8, b"far")
    guest.publish(guest.add_chain([(4 * MiB + 8, 3, False)]))
    assert bytes(guest.queue().pop().readable[0]) == b"far"


def test_indirect_chain(guest):
    guest.write(0x50000, b"in-header")
    head = guest.add_chain(
        [(0x50000, 9, False), (0x51000, 4, True), (0x52000, 100, True)], indirect=True)
    guest.publish(head)
    chain = guest.queue().pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"in-header"]
    assert lens(chain.writable) == [4, 100]


def test_indirect_ignores_write_flag_on_table_descriptor(guest):
    guest.write(0x50000, b"R")
    head = guest.add_chain([(0x50000, 1, False)], indirect=True)
    table = guest.alloc(0) - 16
    guest.set_desc(head, table, 16, INDIRECT | WRITE)
    guest.publish(head)
    assert [bytes(v) for v in guest.queue().pop().readable] == [b"R"]


def test_indirect_table_straddling_regions(guest):
    table = BOUNDARY - 40                 # 2.5 descriptors before the boundary, 1.5 after
    bufs = [(0x50000, 4, False), (0x51000, 5, False), (0x52000, 6, True), (0x53000, 7, True)]
    head = guest.add_chain(bufs, indirect=True, table=table)
    guest.publish(head)
    chain = guest.queue().pop()
    assert lens(chain.readable) == [4, 5]
    assert lens(chain.writable) == [6, 7]


def test_indirect_table_next_out_of_order(guest):
    # Entries chained by next, not by position (spec 2.7.5.3.1: first is index 0).
    table = guest.alloc(48)
    guest.set_desc(0, 0x50000, 1, NEXT, 2, table=table)
    guest.set_desc(2, 0x51000, 2, NEXT, 1, table=table)
    guest.set_desc(1, 0x52000, 3, WRITE, 0, table=table)
    guest.set_desc(5, table, 48, INDIRECT)
    guest.publish(5)
    chain = guest.queue().pop()
    assert lens(chain.readable) == [1, 2]
    assert lens(chain.writable) == [3]


def test_direct_then_indirect(guest):
    table = guest.alloc(32)
    guest.set_desc(0, 0x51000, 8, NEXT, 1, table=table)
    guest.set_desc(1, 0x52000, 16, WRITE, 0, table=table)
    guest.set_desc(3, 0x50000, 4, NEXT, 6)
    guest.set_desc(6, table, 32, INDIRECT)
    guest.publish(3)
    chain = guest.queue().pop()
    assert lens(chain.readable) == [4, 8]
    assert lens(chain.writable) == [16]


def test_zero_length_descriptors_are_skipped(guest):
    head = guest.add_chain([(0x50000, 0, False), (0x50000, 3, False), (GAP, 0, False),
                            (0x51000, 0, True), (0x52000, 2, True)])
    guest.publish(head)
    chain = guest.queue().pop()
    assert lens(chain.readable) == [3]
    assert lens(chain.writable) == [2]


def test_empty_chain(guest):
    # A chain whose only descriptor is empty is valid: nothing to read, nothing to write.
    guest.publish(guest.add_chain([(0, 0, False)]))
    q = guest.queue()
    chain = q.pop()
    assert (chain.readable, chain.writable) == ([], [])
    q.push(chain.head, 0)
    assert guest.used_elem(0) == (chain.head, 0)


def test_chain_of_full_queue_size(guest):
    bufs = [(0x50000 + 16 * i, 16, i >= 4) for i in range(guest.n)]
    guest.publish(guest.add_chain(bufs))
    chain = guest.queue().pop()
    assert lens(chain.readable) == [16] * 4
    assert lens(chain.writable) == [16] * 4


def test_indirect_not_negotiated(guest):
    head = guest.add_chain([(0x50000, 4, False)], indirect=True)
    guest.publish(head)
    with pytest.raises(ChainError, match="INDIRECT_DESC"):
        guest.queue(indirect=False).pop()


# ---------------------------------------------------------------- malformed chains


def _bad_loop(g: FakeGuest) -> int:
    g.set_desc(0, 0x50000, 4, NEXT, 1)
    g.set_desc(1, 0x50000, 4, NEXT, 0)
    return 0


def _bad_self_loop(g: FakeGuest) -> int:
    g.set_desc(2, 0x50000, 4, NEXT | WRITE, 2)
    return 2


def _bad_indirect_loop(g: FakeGuest) -> int:
    t = g.alloc(64)
    g.set_desc(0, 0x50000, 1, NEXT, 3, table=t)
    g.set_desc(3, 0x50000, 1, NEXT, 0, table=t)
    g.set_desc(0, t, 64, INDIRECT)
    return 0


def _bad_next(g: FakeGuest) -> int:
    g.set_desc(0, 0x50000, 4, NEXT, g.n)
    return 0


def _bad_indirect_next(g: FakeGuest) -> int:
    t = g.alloc(32)
    g.set_desc(0, 0x50000, 1, NEXT, 2, table=t)       # table has only 2 entries
    g.set_desc(0, t, 32, INDIRECT)
    return 0


def _bad_gap(g: FakeGuest) -> int:
    g.set_desc(0, GAP + 16, 4, 0)
    return 0


def _bad_past_region(g: FakeGuest) -> int:
    g.set_desc(0, 0x50000, 4, NEXT, 1)
    g.set_desc(1, 5 * MiB - 16, 32, WRITE)
    return 0


def _bad_into_gap(g: FakeGuest) -> int:
    g.set_desc(0, 2 * MiB - 8, 9, 0)
    return 0


def _bad_overflow(g: FakeGuest) -> int:
    g.set_desc(0, 2**64 - 8, 16, 0)
    return 0


def _bad_nested(g: FakeGuest) -> int:
    inner = g.alloc(16)
    g.set_desc(0, 0x50000, 4, 0, table=inner)
    outer = g.alloc(16)
    g.set_desc(0, inner, 16, INDIRECT, table=outer)
    g.set_desc(0, outer, 16, INDIRECT)
    return 0


def _bad_indirect_and_next(g: FakeGuest) -> int:
    t = g.alloc(16)
    g.set_desc(0, 0x50000, 4, 0, table=t)
    g.set_desc(0, t, 16, INDIRECT | NEXT, 1)
    g.set_desc(1, 0x50000, 4, 0)
    return 0


def _bad_indirect_len(n: int):
    def make(g: FakeGuest) -> int:
        t = g.alloc(64)
        g.set_desc(0, 0x50000, 4, 0, table=t)
        g.set_desc(0, t, n, INDIRECT)
        return 0
    return make


def _bad_indirect_table_outside(g: FakeGuest) -> int:
    g.set_desc(0, 2 * MiB - 16, 32, INDIRECT)
    return 0


def _bad_indirect_buffer_outside(g: FakeGuest) -> int:
    t = g.alloc(16)
    g.set_desc(0, GAP, 4, 0, table=t)
    g.set_desc(0, t, 16, INDIRECT)
    return 0


def _bad_readable_after_writable(g: FakeGuest) -> int:
    g.add_chain([(0x50000, 4, False), (0x51000, 4, True), (0x52000, 4, False)])
    return 0


def _bad_readable_after_writable_indirect(g: FakeGuest) -> int:
    return g.add_chain([(0x51000, 4, True), (0x52000, 4, False)], indirect=True)


def _bad_writable_then_indirect_readable(g: FakeGuest) -> int:
    t = g.alloc(16)
    g.set_desc(0, 0x52000, 4, 0, table=t)
    g.set_desc(0, 0x51000, 4, WRITE | NEXT, 1)
    g.set_desc(1, t, 16, INDIRECT)
    return 0


def _bad_over_4gib(g: FakeGuest) -> int:
    # 4097 descriptors of 1 MiB each (all aliasing region 0): more than 2**32 bytes in total.
    n = 4097
    t = g.alloc(16 * n)
    g.write(t, b"".join(DESC.pack(0, MiB, NEXT, i + 1) for i in range(n - 1))
            + DESC.pack(0, MiB, 0, 0))
    g.set_desc(0, t, 16 * n, INDIRECT)
    return 0


MALFORMED = {
    "loop": (_bad_loop, "loop"),
    "self-loop": (_bad_self_loop, "loop"),
    "indirect-loop": (_bad_indirect_loop, "loop"),
    "next-out-of-range": (_bad_next, "next 8"),
    "indirect-next-out-of-range": (_bad_indirect_next, "next 2"),
    "address-in-gap": (_bad_gap, "outside guest memory"),
    "length-past-last-region": (_bad_past_region, "runs past guest memory at 0x500000"),
    "length-into-gap": (_bad_into_gap, "runs past"),
    "address-overflow": (_bad_overflow, "outside guest memory"),
    "nested-indirect": (_bad_nested, "nested"),
    "indirect-and-next": (_bad_indirect_and_next, "INDIRECT and NEXT"),
    "indirect-len-17": (_bad_indirect_len(17), "table length 17"),
    "indirect-len-8": (_bad_indirect_len(8), "table length 8"),
    "indirect-len-0": (_bad_indirect_len(0), "table length 0"),
    "indirect-table-outside": (_bad_indirect_table_outside, "indirect table"),
    "indirect-buffer-outside": (_bad_indirect_buffer_outside, "outside guest memory"),
    "readable-after-writable": (_bad_readable_after_writable, "after a writable"),
    "indirect-readable-after-writable": (_bad_readable_after_writable_indirect,
                                         "after a writable"),
    "indirect-readable-after-direct-writable": (_bad_writable_then_indirect_readable,
                                                "after a writable"),
    "over-4GiB": (_bad_over_4gib, "4 GiB"),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_chain(guest, case):
    make, match = case
    head = make(guest)
    guest.publish(head)
    # A good request behind the bad one must still be served.
    guest.write(0x70000, b"next")
    good = 7
    guest.set_desc(good, 0x70000, 4, 0)
    guest.publish(good)
    q = guest.queue()
    with pytest.raises(ChainError, match=match) as info:
        q.pop()
    assert info.value.head == head
    assert q.next_avail == 1             # consumed: the caller completes it with len 0
    q.push(info.value.head, 0)
    chain = q.pop()
    assert chain.head == good
    assert bytes(chain.readable[0]) == b"next"
    assert guest.used_elem(0) == (head, 0)


def test_zero_length_readable_after_writable_is_still_misordered(guest):
    guest.publish(guest.add_chain([(0x51000, 4, True), (0x52000, 0, False)]))
    with pytest.raises(ChainError, match="after a writable"):
        guest.queue().pop()


def test_head_out_of_range_is_ring_error(guest):
    guest.publish(guest.n)
    q = guest.queue()
    with pytest.raises(RingError, match="descriptor 8"):
        q.pop()
    assert q.next_avail == 0


@pytest.mark.parametrize("jump", [9, 100, 0x8000, 0xFFFF])
def test_avail_idx_jump_is_ring_error(guest, jump):
    guest.set_avail_idx(jump)
    q = guest.queue()
    with pytest.raises(RingError, match="ahead"):
        q.pop()
    assert q.next_avail == 0
    assert q.enable_notification()       # so the caller pops again and stops the ring


def test_avail_idx_jump_of_exactly_queue_size_is_fine(guest):
    for i in range(guest.n):
        guest.set_desc(i, 0x50000 + 8 * i, 8, 0)
    guest.publish(*range(guest.n))
    q = guest.queue()
    assert [q.pop().head for _ in range(guest.n)] == list(range(guest.n))
    assert q.pop() is None


def test_avail_idx_is_reread_after_shadow_runs_out(guest):
    guest.set_desc(0, 0x50000, 1, 0)
    guest.publish(0)
    q = guest.queue()
    assert q.pop().head == 0
    guest.set_desc(1, 0x50000, 1, 0)
    guest.publish(1)
    assert q.pop().head == 1
    assert q.pop() is None


# ---------------------------------------------------------------- indices and wrap


def test_indices_wrap_at_65536(guest):
    for i in range(3):
        guest.set_desc(i, 0x50000 + 8 * i, 8, WRITE)
    guest.avail_idx = 0xFFFE
    guest.set_used_idx(0xFFFE)
    guest.publish(0, 1, 2)               # avail idx wraps to 1
    assert guest.avail_idx == 1
    q = guest.queue(next_avail=0xFFFE)
    assert q.next_used == 0xFFFE
    heads = []
    for k in range(3):
        chain = q.pop()
        heads.append(chain.head)
        q.push(chain.head, 10 + k)
    assert heads == [0, 1, 2]
    assert q.pop() is None
    assert q.next_avail == 1
    assert (q.next_used, guest.used_idx()) == (1, 1)
    # Slots are idx % size: 0xFFFE % 8 == 6, then 7, then 0.
    assert [guest.used_elem(k) for k in (0xFFFE, 0xFFFF, 0)] == [(0, 10), (1, 11), (2, 12)]


def test_push_order_independent_of_pop_order(guest):
    for i in range(3):
        guest.set_desc(i, 0x50000, 1, 0)
    guest.publish(0, 1, 2)
    q = guest.queue()
    chains = [q.pop() for _ in range(3)]
    for c in reversed(chains):
        q.push(c.head, 0)
    assert [guest.used_elem(k)[0] for k in range(3)] == [2, 1, 0]
    assert guest.used_idx() == 3


# ---------------------------------------------------------------- notifications


def test_notify_without_event_idx_follows_avail_flags(guest):
    q = guest.queue()
    q.push(0, 0)
    assert q.should_notify()
    guest.set_avail_flags(1)             # VIRTQ_AVAIL_F_NO_INTERRUPT
    q.push(1, 0)
    assert not q.should_notify()
    guest.set_avail_flags(0)
    assert q.should_notify()


def test_event_idx_first_notification_always_sent(eguest):
    q = eguest.queue()
    eguest.set_used_event(100)           # would say "not yet"; nothing signalled so far
    q.push(0, 0)
    assert q.should_notify()


def test_event_idx_decisions(eguest):
    q = eguest.queue()
    q.push(0, 0)
    assert q.should_notify()             # used idx 1, signalled_used = 1
    eguest.set_avail_flags(1)            # ignored with EVENT_IDX (spec 2.7.10)
    eguest.set_used_event(1)             # driver: notify once entry at idx 1 is used
    q.push(1, 0)                         # used idx 2
    assert q.should_notify()
    eguest.set_used_event(5)
    q.push(2, 0)                         # used idx 3: event 5 not reached
    assert not q.should_notify()
    q.push(3, 0)
    q.push(4, 0)                         # used idx 5: batch 3..5 does not include entry 5
    assert not q.should_notify()
    q.push(5, 0)                         # used idx 6: entry 5 now used
    assert q.should_notify()
    assert not q.should_notify()         # nothing new since the last decision


def test_event_idx_batch_crossing_event(eguest):
    q = eguest.queue()
    q.push(0, 0)
    assert q.should_notify()             # signalled at 1
    eguest.set_used_event(2)
    for h in range(1, 5):
        q.push(h, 0)                     # used idx 5; entry 2 used within the batch
    assert q.should_notify()


def test_event_idx_wraps(eguest):
    eguest.set_used_idx(0xFFFF)
    q = eguest.queue()
    q.push(0, 0)                         # used idx 0
    assert q.should_notify()
    eguest.set_used_event(0)
    q.push(1, 0)                         # used idx 1 -> entry 0 used
    assert q.should_notify()
    eguest.set_used_event(0xFFFF)        # long ago
    q.push(2, 0)
    assert not q.should_notify()


def test_enable_notification_event_idx(eguest):
    eguest.set_desc(0, 0x50000, 1, 0)
    q = eguest.queue()
    assert not q.enable_notification()
    assert eguest.avail_event() == 0
    assert eguest.used_flags() == 0      # must stay 0 with EVENT_IDX
    eguest.publish(0)
    assert q.pop().head == 0
    assert not q.enable_notification()
    assert eguest.avail_event() == 1     # kick me when avail idx moves past 1
    # A buffer published after the device decided to sleep but before it re-armed: the
    # re-check reports it, so the device processes instead of waiting for a kick that the
    # driver (seeing the old avail_event) will not send.
    eguest.publish(0)
    q.disable_notification()
    assert eguest.used_flags() == 0
    assert q.enable_notification()
    assert q.pop().head == 0
    assert not q.enable_notification()
    assert eguest.avail_event() == 2


def test_enable_notification_without_event_idx(guest):
    guest.set_desc(0, 0x50000, 1, 0)
    q = guest.queue()
    q.disable_notification()
    assert guest.used_flags() == 1       # VIRTQ_USED_F_NO_NOTIFY
    assert not q.enable_notification()
    assert guest.used_flags() == 0
    guest.publish(0)
    assert q.enable_notification()
    q.pop()
    assert not q.enable_notification()


# ---------------------------------------------------------------- property: bytes round-trip

# Buffer placements chosen to hit region boundaries: near the end of region 0 (straddling into
# region 1), inside region 1, and inside region 2.
_ANCHORS = [0x50000, BOUNDARY - 64, BOUNDARY + 0x8000, 4 * MiB + 0x100]

_buffers = st.lists(
    st.tuples(st.sampled_from(range(len(_ANCHORS))), st.integers(0, 40), st.integers(0, 200)),
    min_size=1, max_size=8,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    readable=_buffers,
    writable=_buffers,
    nread=st.integers(0, 8),
    split=st.integers(0, 8),
    indirect=st.sampled_from(["none", "table", "tail"]),
    data=st.binary(min_size=8 * 200, max_size=8 * 200),
)
def test_random_chains_round_trip(readable, writable, nread, split, indirect, data):
    g = FakeGuest(qsize=16)
    try:
        cursor = {i: a for i, a in enumerate(_ANCHORS)}

        def place(spec):
            anchor, slack, n = spec
            gpa = cursor[anchor] + slack
            cursor[anchor] = gpa + n
            return gpa, n

        rd = [place(s) for s in readable[: max(nread, 1)]]
        wr = [place(s) for s in writable]
        payload = data[: sum(n for _, n in rd)]
        pos = 0
        for gpa, n in rd:
            g.write(gpa, payload[pos : pos + n])
            pos += n
        bufs = [(a, n, False) for a, n in rd] + [(a, n, True) for a, n in wr]
        if indirect == "none":
            head = g.add_chain(bufs)
        elif indirect == "table":
            head = g.add_chain(bufs, indirect=True)
        else:
            # Some direct descriptors, then an indirect table with the rest.
            k = min(split, len(bufs) - 1)
            tail = g.add_chain(bufs[k:], indirect=True)
            if k:
                idx = [g._take_desc() for _ in range(k)]
                for j, (a, n, w) in enumerate(bufs[:k]):
                    nxt = idx[j + 1] if j + 1 < k else tail
                    g.set_desc(idx[j], a, n, (WRITE if w else 0) | NEXT, nxt)
                head = idx[0]
            else:
                head = tail
        g.publish(head)
        q = g.queue()
        chain = q.pop()
        assert chain.head == head
        assert Reader(chain.readable).read_all() == payload

        reply = data[::-1][: sum(n for _, n in wr)]
        w = Writer(chain.writable)
        w.write(reply)
        q.push(chain.head, w.written)
        got = b"".join(g.read(a, n) for a, n in wr)
        assert got == reply
        assert g.used_elem(0) == (head, len(reply))
        assert g.used_idx() == 1
        del chain, w
    finally:
        g.close()


def test_driver_never_sees_used_idx_step_back(guest):
    """The used idx is published with one 2-byte store: a driver polling it from another
    process only ever sees it move forward.  (struct.pack_into zero-fills before packing, and
    a real driver once saw the index drop to 0 for an instant.)"""
    q = guest.queue()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                         # the "driver": polls used.idx until told to stop
        os.close(w)
        os.set_blocking(r, False)
        bad = 0
        last = guest.used_idx()
        while True:
            now = guest.used_idx()
            if now < last:               # no wrap below: 60,000 pushes from 0
                bad += 1
            last = now
            try:
                if os.read(r, 1):
                    break
            except BlockingIOError:
                pass
        os._exit(min(bad, 100))
    os.close(r)
    try:
        for _ in range(60_000):
            q.push(0, 0)
    finally:
        os.write(w, b"x")
        os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, "the driver saw the used idx step back"


# ---------------------------------------------------------------- buffers in the DAX window


def test_buffers_outside_guest_memory_are_window_buffers_while_a_window_exists(guest):
    """With a DAX window, a buffer entirely outside guest RAM (in the gap between regions, or
    past the last) is a WindowBuffer -- address and length, no memory -- and the chain says
    so; the window's size bounds it.  Without one it is a malformed chain (MALFORMED)."""
    guest.mem.window = lambda: 16 * MiB
    guest.write(0x50000, b"header")
    head = guest.add_chain([(0x50000, 6, False), (GAP + 16, 100, False),
                            (0x60000, 16, True), (1 << 40, 4096, True)])
    guest.publish(head)
    chain = guest.queue().pop()
    assert chain.window
    assert bytes(chain.readable[0]) == b"header"
    w = chain.readable[1]
    assert isinstance(w, WindowBuffer) and (w.gpa, len(w)) == (GAP + 16, 100)
    assert [type(v) for v in chain.writable] == [memoryview, WindowBuffer]
    assert (ram_prefix(chain.readable), ram_prefix(chain.writable)) == (6, 16)
    # The cursors hand window buffers out as views, split where asked; bytes never.
    r = Reader(chain.readable, window=True)
    assert r.read(6) == b"header"
    views = r.views(60)
    assert [(v.gpa, len(v)) for v in views] == [(GAP + 16, 60)]
    with pytest.raises(TypeError):
        r.read(10)
    w = Writer(chain.writable, window=True)
    w.advance(16)
    assert [(v.gpa, len(v)) for v in w.views(1000)] == [(1 << 40, 1000)]
    # A chain wholly in guest memory is no window chain.
    guest.publish(guest.add_chain([(0x50000, 6, False)]))
    assert not guest.queue().walk(guest.next_desc - 1).window


@pytest.mark.parametrize(("addr", "length", "why"), [
    (2 * MiB - 8, 16, "partly in guest memory"),           # starts in region 1, leaves it
    (GAP, MiB + 8, "partly in guest memory"),              # runs into region 2
    (2**64 - 8, 16, "cannot lie in"),                      # wraps past 2**64
    (1 << 40, 16 * MiB + 1, "cannot lie in"),              # longer than the window
])
def test_what_cannot_lie_in_the_window_is_malformed(guest, addr, length, why):
    guest.mem.window = lambda: 16 * MiB
    guest.publish(guest.add_chain([(0x50000, 4, False), (addr, length, True)]))
    with pytest.raises(ChainError) as ei:
        guest.queue().pop()
    assert why in guest.mem_error(addr, length) and "descriptor chain" in str(ei.value)


def test_an_indirect_table_is_never_in_the_window(guest):
    guest.mem.window = lambda: 16 * MiB
    guest.set_desc(0, GAP, 16, INDIRECT)
    guest.publish(0)
    with pytest.raises(ChainError, match="indirect table"):
        guest.queue().pop()
