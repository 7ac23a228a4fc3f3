"""Fuzzing the descriptor-chain walker: whatever the guest writes into its rings.

Hypothesis fills a split ring's descriptor table, indirect tables, avail entries and avail
index with hostile values (loops, out-of-range and overflowing addresses, lengths past a region,
indirect inside indirect, readable after writable, chains longer than the queue, an index
jumping by more than the queue size) and pops from it.  The walker may only answer with a chain,
ChainError (that request fails) or RingError (the ring is broken); every buffer it hands out
lies inside guest memory; nothing loops.  Budgets: tests/fuzzing.py.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from pyvirtiofsd.common.journal import Journal
from pyvirtiofsd.common.virtio import DESC, DescFlag
from pyvirtiofsd.worker.chain import Reader, Writer
from pyvirtiofsd.worker.engine import Engine, Status, buffer_address
from pyvirtiofsd.worker.guestmem import GuestMemory, WindowBuffer
from pyvirtiofsd.worker.virtqueue import ChainError, RingError, SplitQueue
from tests.conftest import DATA_PLANES
from tests.fuzzing import budget

KIB = 1 << 10
# Two adjacent regions, a hole, a third region: (gpa, size, uaddr, mmap_offset).
LAYOUT = [(0, 64 * KIB, 0x7F00_0000_0000, 0), (64 * KIB, 64 * KIB, 0x7F10_0000_0000, 4096),
          (256 * KIB, 64 * KIB, 0x7F20_0000_0000, 0)]
MEM_END = 320 * KIB
QSIZE = 8
RING = 0x100                       # desc table, avail and used rings live here
TABLES = 0x2000                    # indirect tables
U16 = struct.Struct("<H")
F_NEXT, F_WRITE, F_INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


class Guest:
    """Guest memory as the daemon maps it, plus the driver's own view to write rings into."""

    def __init__(self) -> None:
        self.mem = GuestMemory()
        self.maps: list[tuple[int, int, mmap.mmap, int]] = []
        for gpa, size, uaddr, off in LAYOUT:
            fd = os.memfd_create("fuzz-guest")
            try:
                os.ftruncate(fd, off + size)
                self.maps.append((gpa, size, mmap.mmap(fd, off + size), off))
                self.mem.add_region(gpa, size, uaddr, off, fd)
            finally:
                os.close(fd)
        self.desc = RING
        self.avail = RING + 16 * QSIZE
        self.used = (self.avail + 6 + 2 * QSIZE + 3) & ~3

    def write(self, gpa: int, data: bytes) -> None:
        for base, size, m, off in self.maps:
            if base <= gpa < base + size:
                k = min(len(data), base + size - gpa)
                m[off + gpa - base : off + gpa - base + k] = data[:k]
                if k < len(data):
                    self.write(gpa + k, data[k:])
                return

    def uaddr(self, gpa: int) -> int:
        return LAYOUT[0][2] + gpa

    def clear(self) -> None:
        for _, _, m, off in self.maps:
            m[off:] = bytes(len(m) - off)

    def close(self) -> None:
        self.mem.clear()
        for _, _, m, _ in self.maps:
            m.close()


@pytest.fixture(scope="module")
def guest():
    g = Guest()
    yield g
    g.close()


addresses = st.one_of(
    st.integers(0, MEM_END + 4096),
    st.sampled_from([64 * KIB - 8, 128 * KIB - 4, 192 * KIB, 256 * KIB - 1, MEM_END - 16,
                     (1 << 64) - 1, (1 << 64) - 16, 1 << 63, 1 << 32]),
)
lengths = st.one_of(st.integers(0, 256), st.sampled_from([0, 16, 4096, 64 * KIB, 64 * KIB + 1,
                                                          (1 << 32) - 1, 1 << 31]))
flags = st.one_of(st.sampled_from([0, F_NEXT, F_WRITE, F_NEXT | F_WRITE, F_INDIRECT,
                                   F_INDIRECT | F_NEXT, F_INDIRECT | F_WRITE]),
                  st.integers(0, 0xFFFF))
nexts = st.one_of(st.integers(0, QSIZE + 1), st.sampled_from([0xFFFF, 0x8000]))
descriptor = st.tuples(addresses, lengths, flags, nexts)


@st.composite
def indirect_tables(draw):
    """Up to two indirect tables at TABLES / TABLES+0x400, and descriptors pointing at them."""
    tables = draw(st.lists(st.lists(descriptor, min_size=1, max_size=10), max_size=2))
    pointers = [(TABLES + 0x400 * i, 16 * len(t)) for i, t in enumerate(tables)]
    return tables, pointers


@st.composite
def rings(draw):
    tables, pointers = draw(indirect_tables())
    descs = draw(st.lists(descriptor, min_size=QSIZE, max_size=QSIZE))
    # Some descriptors point at the indirect tables, with any flags.
    for addr, length in pointers:
        i = draw(st.integers(0, QSIZE - 1))
        descs[i] = (addr, draw(st.sampled_from([length, length + 8, 16, 0])),
                    draw(st.sampled_from([F_INDIRECT, F_INDIRECT | F_WRITE, F_INDIRECT | F_NEXT])),
                    draw(nexts))
    heads = draw(st.lists(st.one_of(st.integers(0, QSIZE - 1), st.integers(0, 0xFFFF)),
                          min_size=QSIZE, max_size=QSIZE))
    start = draw(st.sampled_from([0, 0xFFF0, 0xFFFF, 7]))
    jump = draw(st.one_of(st.integers(0, QSIZE), st.integers(0, 0xFFFF)))
    indirect = draw(st.booleans())
    return tables, descs, heads, start, jump, indirect


def _inside(view: memoryview) -> bool:
    return 0 <= len(view) <= 64 * KIB


def write_ring(guest: Guest, ring) -> None:
    """Guest memory zeroed, then the drawn descriptor table, indirect tables and avail ring."""
    tables, descs, heads, start, jump, _indirect = ring
    guest.clear()
    for i, t in enumerate(tables):
        guest.write(TABLES + 0x400 * i, b"".join(DESC.pack(*d) for d in t))
    guest.write(guest.desc, b"".join(DESC.pack(*d) for d in descs))
    guest.write(guest.avail + 4, b"".join(U16.pack(h) for h in heads))
    guest.write(guest.avail + 2, U16.pack((start + jump) & 0xFFFF))


@budget(800)
@given(rings())
def test_hostile_rings_never_escape_guest_memory(guest: Guest, ring) -> None:
    _tables, _descs, _heads, start, jump, indirect = ring
    write_ring(guest, ring)
    q = SplitQueue(guest.mem, QSIZE, guest.uaddr(guest.desc), guest.uaddr(guest.avail),
                   guest.uaddr(guest.used), start, event_idx=False, indirect=indirect)
    popped = 0
    for _ in range(QSIZE + 2):
        try:
            chain = q.pop()
        except ChainError as e:
            assert 0 <= e.head < QSIZE
            q.push(e.head, 0)
            popped += 1
            continue
        except RingError:
            break
        if chain is None:
            break
        popped += 1
        assert 0 <= chain.head < QSIZE
        # The chain is bounded by the queue (or by the indirect table it went into).
        assert len(chain.readable) + len(chain.writable) <= 2 * 65536
        assert all(_inside(v) for v in chain.readable + chain.writable)
        data = Reader(chain.readable).read_all()
        assert len(data) == sum(map(len, chain.readable))
        if chain.writable:
            w = Writer(chain.writable)
            w.write(b"\xa5" * min(w.remaining, 64))
        q.push(chain.head, 0)
    assert popped <= min(jump, QSIZE) if jump <= QSIZE else popped == 0


WINDOW = 1 << 20


@budget(400)
@given(rings())
def test_hostile_rings_with_a_dax_window(guest: Guest, ring) -> None:
    """With a DAX window, what a descriptor names outside guest RAM may come out as a
    WindowBuffer: never overlapping guest RAM, never longer than the window, never wrapping
    2**64; a chain says whether it holds one; an indirect table is never one."""
    _tables, _descs, _heads, start, _jump, indirect = ring
    write_ring(guest, ring)
    guest.mem.window = lambda: WINDOW
    try:
        q = SplitQueue(guest.mem, QSIZE, guest.uaddr(guest.desc), guest.uaddr(guest.avail),
                       guest.uaddr(guest.used), start, event_idx=False, indirect=indirect)
        for _ in range(QSIZE + 2):
            try:
                chain = q.pop()
            except ChainError as e:
                q.push(e.head, 0)
                continue
            except RingError:
                break
            if chain is None:
                break
            bufs = chain.readable + chain.writable
            window = [b for b in bufs if isinstance(b, WindowBuffer)]
            assert chain.window == bool(window)
            for b in window:
                assert 0 < len(b) <= WINDOW and b.gpa + len(b) <= 1 << 64
                assert all(b.gpa + len(b) <= g or g + n <= b.gpa for g, n, _u, _o in LAYOUT)
            assert all(_inside(v) for v in bufs if isinstance(v, memoryview))
            q.push(chain.head, 0)
    finally:
        guest.mem.window = lambda: 0


# --- the same rings through the native engine ---------------------------------------------------
# The engine walks what it can in C and hands back (WALK) what it will not walk; the worker then
# walks that chain with the reference walker.  So on any ring the engine must pop the same
# sequence as the reference: a chain the reference accepts is served by the engine (DEFER, with
# buffers of the same sizes, every one inside guest memory) or handed back; a chain the reference
# rejects is handed back, never served; a broken ring breaks both; an empty one is empty for both.


def reference_pops(guest: Guest, start: int, indirect: bool) -> list[tuple]:
    q = SplitQueue(guest.mem, QSIZE, guest.uaddr(guest.desc), guest.uaddr(guest.avail),
                   guest.uaddr(guest.used), start, event_idx=False, indirect=indirect)
    out: list[tuple] = []
    for _ in range(QSIZE + 2):
        try:
            chain = q.pop()
        except ChainError as e:
            out.append(("rejected", e.head))
            continue
        except RingError:
            out.append(("broken",))
            break
        if chain is None:
            out.append(("empty",))
            break
        out.append(("chain", chain.head, [len(v) for v in chain.readable],
                    [len(v) for v in chain.writable]))
    return out


class EngineRig:
    """The engine over the fuzz guest's memory, as a worker starts it (worker/main.py)."""

    def __init__(self, guest: Guest, start: int, indirect: bool) -> None:
        self.journal = Journal.create(1, QSIZE)
        jq = self.journal.queue(0)
        jq.reset(start, 1, QSIZE)
        self.chan, self.peer = socket.socketpair()
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)
        self.spans = [(buffer_address(v), n) for _g, n, _u, v in guest.mem.views()]
        self.e = Engine(self.chan.fileno(), jq.address)
        self.e.set_regions([(g, n, u, buffer_address(v)) for g, n, u, v in guest.mem.views()])
        self.e.start(QSIZE, guest.uaddr(guest.desc), guest.uaddr(guest.avail),
                     guest.uaddr(guest.used), start, event_idx=False, indirect=indirect)
        self.e.set_fds(self.call, self.err)

    def inside(self, view: memoryview) -> bool:
        if not len(view):
            return True
        a = buffer_address(view)
        return any(base <= a and a + len(view) <= base + n for base, n in self.spans)

    def pops(self) -> list[tuple]:
        out: list[tuple] = []
        e = self.e
        for _ in range(QSIZE + 2):
            status = e.run()
            if status is Status.EMPTY:
                out.append(("empty",))
                break
            if status is Status.BROKEN:
                out.append(("broken",))
                break
            assert status in (Status.DEFER, Status.WALK), status
            head = e.head
            assert 0 <= head < QSIZE
            if status is Status.DEFER:
                readable, writable = e.chain()
                assert all(self.inside(v) for v in readable + writable)
                # Every byte the engine handed out is readable guest memory.
                assert len(b"".join(bytes(v) for v in readable)) == sum(map(len, readable))
                out.append(("chain", head, [len(v) for v in readable],
                            [len(v) for v in writable]))
                del readable, writable
            else:
                out.append(("walk", head))
            e.complete(head, 0)
        return out

    def close(self) -> None:
        self.e.close()
        for fd in (self.call, self.err):
            os.close(fd)
        self.chan.close()
        self.peer.close()


def agree(reference: list[tuple], engine: list[tuple]) -> None:
    assert len(reference) == len(engine), (reference, engine)
    for ref, eng in zip(reference, engine, strict=True):
        if eng[0] == "walk":
            assert ref[0] in ("chain", "rejected") and ref[1] == eng[1], (ref, eng)
        else:
            assert ref == eng, (reference, engine)


@budget(400)
@given(rings())
def test_hostile_rings_in_the_engine_pop_what_the_reference_pops(guest: Guest, ring) -> None:
    _tables, _descs, _heads, start, _jump, indirect = ring
    write_ring(guest, ring)
    reference = reference_pops(guest, start, indirect)
    write_ring(guest, ring)
    rig = EngineRig(guest, start, indirect)
    try:
        engine = rig.pops()
    finally:
        rig.close()
    agree(reference, engine)
    for kind in sorted({e[0] for e in engine}):
        event(f"engine: {kind}")


@budget(400)
@given(st.binary(min_size=16 * QSIZE, max_size=16 * QSIZE), st.binary(min_size=4 + 2 * QSIZE,
                                                                       max_size=4 + 2 * QSIZE))
def test_random_bytes_as_rings(guest: Guest, table: bytes, avail: bytes) -> None:
    guest.clear()
    guest.write(guest.desc, table)
    guest.write(guest.avail, avail)
    q = SplitQueue(guest.mem, QSIZE, guest.uaddr(guest.desc), guest.uaddr(guest.avail),
                   guest.uaddr(guest.used), 0, event_idx=True)
    for _ in range(QSIZE + 1):
        try:
            chain = q.pop()
        except ChainError as e:
            q.push(e.head, 0)
            continue
        except RingError:
            return
        if chain is None:
            return
        Reader(chain.readable).read_all()
        q.push(chain.head, 0)


# --- the same through a running daemon ---------------------------------------------------------

SCRATCH = 1 << 20


@pytest.fixture(scope="module", params=DATA_PLANES)
def live(request, tmp_path_factory):
    """One daemon per data plane, one connection: hostile chains on queue 1 between normal
    requests."""
    from tests.conftest import start_daemon
    from tests.frontend import Frontend, FuseClient

    share = tmp_path_factory.mktemp("share")
    d = start_daemon(share, str(share.parent / "fuzz.sock"), f"--data-plane={request.param}")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    c = FuseClient(fe)
    c.init()
    scratch = fe.memory.alloc(SCRATCH, 4096)
    yield d, fe, c, scratch
    alive = d.proc.poll() is None
    fe.close()
    d.stop()
    assert alive, d.text
    assert "Traceback" not in d.text, d.text


@st.composite
def live_chains(draw):
    n = draw(st.integers(1, 6))
    offsets = st.integers(0, SCRATCH - 1)
    entries = []
    for _ in range(n):
        where = draw(st.sampled_from(["scratch", "scratch", "edge", "wild"]))
        if where == "scratch":
            addr = draw(offsets)
        elif where == "edge":
            addr = draw(st.sampled_from([SCRATCH - 8, SCRATCH - 1]))
        else:
            addr = None
        wild = draw(st.sampled_from([0, 1 << 40, (1 << 64) - 8, 64 << 20]))
        length = draw(st.one_of(st.integers(0, 8192), st.sampled_from([(1 << 32) - 1, 1 << 30])))
        # No INDIRECT here: a table made of random scratch bytes could point the daemon's replies
        # at this driver's own rings (the unit harness above covers indirect tables).
        flag = draw(flags) & ~F_INDIRECT
        nxt = draw(st.integers(0, n + 1))
        entries.append((addr, wild, length, flag, nxt))
    payload = draw(st.binary(max_size=256))
    return entries, payload


@budget(300, expensive=True)
@given(live_chains())
def test_hostile_chains_through_the_daemon(live, chain) -> None:
    _daemon, fe, c, scratch = live
    entries, payload = chain
    vq = fe.queue(1)
    fe.memory.write(scratch, payload)
    descs = [vq.alloc_desc() for _ in entries]
    for i, (addr, wild, length, flag, nxt) in enumerate(entries):
        gpa = wild if addr is None else (scratch + addr) & 0xFFFFFFFFFFFFFFFF
        # `next` names one of this chain's descriptors, or something out of range.
        target = descs[nxt] if nxt < len(descs) else 0xFFFF - nxt
        vq.write_desc(descs[i], gpa, length, flag, target)
    # The driver reads back the whole scratch area; the daemon can only have written into the
    # chain's writable descriptors, which all lie there.
    token = vq.publish(descs[0], descs=descs, writable=[(scratch, SCRATCH)])
    done = vq.wait(token)
    assert done.head == descs[0]
    assert done.used_len <= sum(length for _a, _w, length, flag, _n in entries
                                if flag & F_WRITE)
    # The queue still serves ordinary requests.
    assert c.getattr(1).attr.ino

