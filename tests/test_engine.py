"""The native request engine (worker/engine.c) against the driver simulated in test_virtqueue.

Every case also runs the Python SplitQueue (the reference) over the same guest memory: the
engine must pop the same chains into the same buffers, and hand back (WALK) exactly the chains
the reference rejects, so that the reference rejects them with its own message.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofsd.common.journal import Journal, SlotState
from pyvirtiofsd.worker import engine
from pyvirtiofsd.worker.engine import Engine, EngineError, Status, buffer_address
from pyvirtiofsd.worker.virtqueue import ChainError, RingError
from tests.test_virtqueue import BOUNDARY, GAP, INDIRECT, MALFORMED, NEXT, FakeGuest

IN_HEADER = struct.Struct("<IIQQIIIHH")
GETATTR = 3


class Rig:
    """A FakeGuest, a queue journal and an engine started on the guest's ring."""

    def __init__(self, guest: FakeGuest, *, indirect: bool = True, next_avail: int = 0) -> None:
        self.g = guest
        self.journal = Journal.create(1, 64)
        self.jq = self.journal.queue(0)
        self.jq.reset(next_avail, 1, guest.n)
        self.chan, self.peer = socket.socketpair()
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)
        self.e = Engine(self.chan.fileno(), self.jq.address)
        self.e.set_regions([(gpa, n, u, buffer_address(v)) for gpa, n, u, v in
                            guest.mem.views()])
        self.e.start(guest.n, guest.uaddr(guest.desc), guest.uaddr(guest.avail),
                     guest.uaddr(guest.used), next_avail, event_idx=guest.event_idx,
                     indirect=indirect)
        self.e.set_fds(self.call, self.err)

    def close(self) -> None:
        self.e.close()
        for fd in (self.call, self.err):
            os.close(fd)
        self.chan.close()
        self.peer.close()

    def signalled(self, fd: int | None = None) -> int:
        try:
            return os.eventfd_read(self.call if fd is None else fd)
        except BlockingIOError:
            return 0


@pytest.fixture
def rig():
    g = FakeGuest()
    r = Rig(g)
    yield r
    r.close()
    g.close()


@pytest.fixture
def erig():
    g = FakeGuest(event_idx=True)
    r = Rig(g)
    yield r
    r.close()
    g.close()


def request(g: FakeGuest, opcode: int = GETATTR, unique: int = 7, body: bytes = b"",
            reply: int = 128) -> int:
    """A FUSE request chain: header + body readable, `reply` bytes writable."""
    data = IN_HEADER.pack(40 + len(body), opcode, unique, 1, 0, 0, 0, 0, 0) + body
    gpa = g.alloc(len(data))
    g.write(gpa, data)
    bufs = [(gpa, len(data), False)]
    if reply:
        bufs.append((g.alloc(reply), reply, True))
    return g.add_chain(bufs)


def lens(views) -> list[int]:
    return [len(v) for v in views]


# ---------------------------------------------------------------- basics


def test_empty_ring_reenables_notifications(rig):
    rig.g.write(rig.g.used, struct.pack("<H", 1))          # left disabled by someone
    assert rig.e.run() is Status.EMPTY
    assert rig.g.used_flags() == 0
    assert rig.e.next_avail == 0


def test_empty_ring_with_event_idx_sets_avail_event(erig):
    assert erig.e.run() is Status.EMPTY
    assert erig.g.avail_event() == 0


def test_defer_hands_back_the_chain_and_decoded_header(rig):
    g = rig.g
    head = request(g, unique=0x1234)
    g.publish(head)
    assert rig.e.run() is Status.DEFER
    assert (rig.e.head, rig.e.pos, rig.e.next_avail) == (head, 0, 1)
    readable, writable = rig.e.chain()
    assert lens(readable) == [40] and lens(writable) == [128]
    # Decoded once, by the engine: exactly what the reference would unpack.
    assert rig.e.header() == (*IN_HEADER.unpack(bytes(readable[0]))[:7], 0)
    assert rig.e.header()[1:3] == (GETATTR, 0x1234)
    # Popped into the journal with opcode and unique, the pop counter in its state word.
    [rec] = rig.jq.inflight()
    assert (rec.head, rec.state, rec.opcode, rec.unique) == (head, SlotState.POPPED, GETATTR,
                                                              0x1234)
    writable[0][:5] = b"reply"
    rig.e.complete(head, 5)
    assert g.used_idx() == 1 and g.used_elem(0) == (head, 5)
    assert rig.jq.inflight() == []                     # pushed: slot free
    assert rig.signalled() == 1
    assert rig.e.run() is Status.EMPTY


def test_views_are_the_reference_walkers(rig):
    g = rig.g
    data = bytes(range(200))
    g.write(BOUNDARY - 50, data)
    head = g.add_chain([(BOUNDARY - 50, 200, False), (BOUNDARY - 3, 6, True)])
    g.publish(head)
    ref = g.queue().walk(head)
    assert rig.e.run() is Status.DEFER
    readable, writable = rig.e.chain()
    assert lens(readable) == lens(ref.readable) == [50, 150]
    assert lens(writable) == lens(ref.writable) == [3, 3]
    assert b"".join(bytes(v) for v in readable) == data


def test_indirect_chain(rig):
    g = rig.g
    hdr = IN_HEADER.pack(40, GETATTR, 9, 1, 0, 0, 0, 0, 0)
    g.write(0x50000, hdr)
    head = g.add_chain([(0x50000, 40, False), (0x51000, 4, True), (0x52000, 100, True)],
                       indirect=True)
    g.publish(head)
    assert rig.e.run() is Status.DEFER
    readable, writable = rig.e.chain()
    assert lens(readable) == [40] and lens(writable) == [4, 100]


def test_short_header_is_deferred_with_zero_opcode(rig):
    g = rig.g
    g.write(0x50000, b"\x01" * 10)
    g.publish(g.add_chain([(0x50000, 10, False)]))
    assert rig.e.run() is Status.DEFER
    assert rig.e.header() is None
    [rec] = rig.jq.inflight()
    assert (rec.opcode, rec.unique) == (0, 0)


def test_header_split_over_buffers(rig):
    g = rig.g
    hdr = IN_HEADER.pack(40, GETATTR, 0xABCDEF, 1, 0, 0, 0, 0, 0)
    g.write(0x50000, hdr[:5])
    g.write(0x51000, hdr[5:])
    g.publish(g.add_chain([(0x50000, 5, False), (0x51000, 35, False)]))
    assert rig.e.run() is Status.DEFER
    [rec] = rig.jq.inflight()
    assert (rec.opcode, rec.unique) == (GETATTR, 0xABCDEF)


def test_requests_in_ring_order_and_wrap(rig):
    g = rig.g
    g.avail_idx = 0xFFFE
    g.set_used_idx(0xFFFE)
    rig.e.start(g.n, g.uaddr(g.desc), g.uaddr(g.avail), g.uaddr(g.used), 0xFFFE,
                event_idx=False, indirect=True)
    heads = [request(g, unique=k) for k in range(3)]
    g.publish(*heads)
    got = []
    for _ in heads:
        assert rig.e.run() is Status.DEFER
        got.append(rig.e.head)
        rig.e.complete(rig.e.head, 16)
    assert got == heads
    assert rig.e.run() is Status.EMPTY
    assert (rig.e.next_avail, rig.e.next_used, g.used_idx()) == (1, 1, 1)
    assert [g.used_elem(k)[0] for k in (0xFFFE, 0xFFFF, 0)] == heads


# ---------------------------------------------------------------- malformed chains and rings


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_chain_is_walked_by_the_reference(rig, case):
    make, match = case
    g = rig.g
    head = make(g)
    g.publish(head)
    good = 7                                           # a descriptor no bad chain uses
    gpa = g.alloc(40)
    g.write(gpa, IN_HEADER.pack(40, GETATTR, 1, 1, 0, 0, 0, 0, 0))
    g.set_desc(good, gpa, 40, 0)
    g.publish(good)
    assert rig.e.run() is Status.WALK
    assert (rig.e.head, rig.e.pos, rig.e.next_avail) == (head, 0, 1)
    # Nothing journaled: the Python plane records the pop of a chain it walks.
    assert rig.jq.inflight() == []
    with pytest.raises(ChainError, match=match):
        g.queue().walk(head)
    rig.e.complete(head, 0)
    assert rig.e.run() is Status.DEFER
    assert rig.e.head == good
    assert g.used_elem(0) == (head, 0)


def test_indirect_not_negotiated_is_walked(guest_factory):
    g = guest_factory()
    r = Rig(g, indirect=False)
    try:
        g.publish(g.add_chain([(0x50000, 4, False)], indirect=True))
        assert r.e.run() is Status.WALK
        with pytest.raises(ChainError, match="INDIRECT_DESC"):
            g.queue(indirect=False).walk(r.e.head)
    finally:
        r.close()


def test_buffer_at_the_top_of_the_address_space(rig):
    # The gate takes a buffer that ends exactly at 2**64, and nothing past it.
    g = rig.g
    top = bytearray(4096)
    top[-16:] = IN_HEADER.pack(40, GETATTR, 5, 1, 0, 0, 0, 0, 0)[:16]
    regions = [(gpa, n, u, buffer_address(v)) for gpa, n, u, v in g.mem.views()]
    rig.e.set_regions([*regions, (2**64 - 4096, 4096, 0x10_0000_0000, buffer_address(top))])
    rig.e.start(g.n, g.uaddr(g.desc), g.uaddr(g.avail), g.uaddr(g.used), 0, event_idx=False,
                indirect=True)
    g.set_desc(0, 2**64 - 16, 16, 0)
    g.set_desc(1, 2**64 - 16, 17, 0)
    g.publish(0, 1)
    assert rig.e.run() is Status.DEFER
    readable, _ = rig.e.chain()
    assert [bytes(v) for v in readable] == [bytes(top[-16:])]
    rig.e.complete(0, 0)
    assert rig.e.run() is Status.WALK and rig.e.head == 1


def test_indirect_table_straddling_regions_goes_to_python(rig):
    g = rig.g
    table = BOUNDARY - 40
    bufs = [(0x50000, 4, False), (0x51000, 5, False), (0x52000, 6, True), (0x53000, 7, True)]
    head = g.add_chain(bufs, indirect=True, table=table)
    g.publish(head)
    assert rig.e.run() is Status.WALK
    chain = g.queue().walk(head)                       # valid for the reference
    assert lens(chain.readable) == [4, 5]


def test_more_buffers_than_the_iovec_array_go_to_python(rig):
    g = rig.g
    n = 2000                                           # > max(2 * 8, 1024)
    t = g.alloc(16 * n)
    g.write(t, b"".join(struct.pack("<QIHH", 0x50000 + i, 1, NEXT, i + 1)
                        for i in range(n - 1)) + struct.pack("<QIHH", 0x60000, 1, 0, 0))
    g.set_desc(0, t, 16 * n, INDIRECT)
    g.publish(0)
    assert rig.e.run() is Status.WALK
    assert len(g.queue().walk(0).readable) == n


def test_head_out_of_range_breaks_the_ring(rig):
    g = rig.g
    g.publish(g.n)
    assert rig.e.run() is Status.BROKEN
    with pytest.raises(RingError) as ref:
        g.queue().pop()
    assert rig.e.why == str(ref.value)
    assert rig.e.next_avail == 0 and not rig.e.running
    assert rig.signalled(rig.err) == 1
    assert rig.e.run() is Status.EMPTY                 # stopped: serves nothing


@pytest.mark.parametrize("jump", [9, 100, 0x8000, 0xFFFF])
def test_avail_idx_jump_breaks_the_ring(rig, jump):
    rig.g.set_avail_idx(jump)
    assert rig.e.run() is Status.BROKEN
    with pytest.raises(RingError) as ref:
        rig.g.queue().pop()
    assert rig.e.why == str(ref.value)
    assert rig.e.next_avail == 0
    assert rig.signalled(rig.err) == 1


def test_ring_outside_memory_is_refused(rig):
    g = rig.g
    with pytest.raises(EngineError, match="not inside guest memory"):
        rig.e.start(8, 0x1000, g.uaddr(0x8000), g.uaddr(0x9000), 0, event_idx=False,
                    indirect=True)
    used = (1 << 20) - 68                             # fits without avail_event only
    rig.e.start(8, g.uaddr(0x1000), g.uaddr(0x8000), g.uaddr(used), 0, event_idx=False,
                indirect=True)
    with pytest.raises(EngineError):
        rig.e.start(8, g.uaddr(0x1000), g.uaddr(0x8000), g.uaddr(used), 0, event_idx=True,
                    indirect=True)


@pytest.mark.parametrize("bad", [
    (3, 0x1000, 0x8000, 0x9000), (8, 0x1008, 0x8000, 0x9000), (8, 0x1000, 0x8001, 0x9000),
    (8, 0x1000, 0x8000, 0x9002), (65536, 0x1000, 0x8000, 0x9000)])
def test_misplaced_ring_is_refused(rig, bad):
    size, d, a, u = bad
    g = rig.g
    with pytest.raises(EngineError):
        rig.e.start(size, g.uaddr(d & ~15) + (d & 15), g.uaddr(a & ~1) + (a & 1),
                    g.uaddr(u & ~3) + (u & 3), 0, event_idx=False, indirect=True)


def test_region_table_limits(rig):
    with pytest.raises(EngineError):
        rig.e.set_regions([(2**64 - 16, 32, 0, 0x1000)])
    with pytest.raises(EngineError):
        rig.e.set_regions([(0, 32, 2**64 - 16, 0x1000)])
    rig.e.set_regions([(2**64 - 32, 32, 2**64 - 32, 0x1000)])   # ends exactly at 2**64
    with pytest.raises(EngineError):
        rig.e.set_regions([(0, 16, 0, 0)])
    with pytest.raises(EngineError):
        rig.e.set_regions([(k << 20, 1 << 20, k << 20, 0x1000) for k in range(65)])


# ---------------------------------------------------------------- notifications and control


def test_notifications_suppressed_while_a_batch_runs(rig):
    g = rig.g
    g.publish(request(g))
    assert rig.e.run() is Status.DEFER
    assert g.used_flags() == 1                         # VRING_USED_F_NO_NOTIFY
    rig.e.complete(rig.e.head, 0)
    assert rig.e.run() is Status.EMPTY
    assert g.used_flags() == 0


def test_no_interrupt_flag_is_honoured(rig):
    g = rig.g
    g.set_avail_flags(1)
    g.publish(request(g))
    assert rig.e.run() is Status.DEFER
    rig.e.complete(rig.e.head, 0)
    assert rig.signalled() == 0


def test_event_idx_notifies_only_past_used_event(erig):
    g = erig.g
    g.set_used_event(1)
    heads = [request(g, unique=k) for k in range(3)]
    g.publish(*heads)
    counts = []
    for _ in heads:
        assert erig.e.run() is Status.DEFER
        erig.e.complete(erig.e.head, 0)
        counts.append(erig.signalled())
    # The first push always notifies (nothing signalled yet); then only crossing used_event 1.
    assert counts == [1, 1, 0]
    assert erig.e.run() is Status.EMPTY
    assert g.avail_event() == 3


def test_pending_control_message_ends_the_batch(rig):
    g = rig.g
    rig.e.poll_every = 1
    g.publish(request(g))
    rig.peer.send(b"x")
    assert rig.e.run() is Status.DEFER                 # the first request is served first
    rig.e.complete(rig.e.head, 0)
    g.publish(request(g))
    assert rig.e.run() is Status.CONTROL
    assert rig.e.next_avail == 1                       # nothing popped meanwhile
    assert g.used_flags() == 0                         # kicks wanted while Python works
    rig.chan.recv(1)
    assert rig.e.run() is Status.DEFER


def test_stop_then_start_resumes_at_the_given_index(rig):
    g = rig.g
    g.publish(request(g), request(g))
    assert rig.e.run() is Status.DEFER
    rig.e.complete(rig.e.head, 0)
    rig.e.stop()
    assert rig.e.run() is Status.EMPTY
    rig.e.start(g.n, g.uaddr(g.desc), g.uaddr(g.avail), g.uaddr(g.used), 1, event_idx=False,
                indirect=True)
    assert rig.e.next_used == 1                        # read back from the ring
    assert rig.e.run() is Status.DEFER and rig.e.pos == 1


@pytest.fixture
def guest_factory():
    made: list[FakeGuest] = []

    def make(**kw) -> FakeGuest:
        g = FakeGuest(**kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


# ---------------------------------------------------------------- differential


_BUF = st.tuples(
    st.sampled_from([0x50000, BOUNDARY - 20, GAP - 8, GAP + 8, 2 * (1 << 20) - 4,
                     4 * (1 << 20) + 16, 2**64 - 8]),
    st.integers(0, 64), st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(chains=st.lists(st.tuples(st.lists(_BUF, min_size=1, max_size=5), st.booleans()),
                       min_size=1, max_size=6))
def test_engine_pops_what_the_reference_pops(guest_factory, chains):
    g = guest_factory()
    r = Rig(g)
    try:
        ref = g.queue()
        for bufs, indirect in chains:
            if len(bufs) > g.n and not indirect:
                continue
            g.publish(g.add_chain(bufs, indirect=indirect))
            try:
                want = ref.pop()
            except ChainError:
                want = None
            status = r.e.run()
            if want is None:
                assert status is Status.WALK
                r.e.complete(r.e.head, 0)
                continue
            assert status is Status.DEFER
            readable, writable = r.e.chain()
            assert lens(readable) == lens(want.readable)
            assert lens(writable) == lens(want.writable)
            assert all(bytes(a) == bytes(b) for a, b in zip(readable, want.readable,
                                                             strict=True))
            r.e.complete(r.e.head, 0)
        assert r.e.run() is Status.EMPTY
        assert r.e.next_avail == ref.next_avail
    finally:
        r.close()


def test_busy_poll_window_adapts(rig):
    # --poll-us: an empty ring is spun on before sleeping; finding nothing halves the window
    # until it is gone, and the next wait starts it again at 1 µs.
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        rig.e.poll_us = 400
        rig.peer.send(b"x")                            # the sleep ends at once: CONTROL
        windows = []
        for _ in range(10):
            assert rig.e.serve(kick) is Status.CONTROL
            windows.append(rig.e._e.spin_us)
        assert windows[:4] == [200, 100, 50, 25]
        assert 1 in windows and 0 not in windows[windows.index(1):]
        # A request already published is served without spinning: the window stays.
        g = rig.g
        rig.e._e.spin_us = 300
        g.publish(request(g))
        assert rig.e.serve(kick) is Status.DEFER
        rig.e.complete(rig.e.head, 0)
        assert rig.e._e.spin_us == 300
    finally:
        os.close(kick)


def test_status_values_are_the_c_enum():
    engine.load()
    for status in Status:
        assert status == getattr(engine.lib, f"VFS_ENGINE_{status.name}")


@pytest.mark.parametrize("variant", ["bogus", ""])
def test_unknown_engine_build_is_refused_in_one_line(monkeypatch, variant):
    monkeypatch.setattr(engine, "lib", None)
    monkeypatch.setattr(engine, "ffi", None)
    monkeypatch.setenv("PYVIRTIOFSD_ENGINE", variant)
    with pytest.raises(engine.EngineUnavailable, match="expected one of default, asan") as e:
        engine.load()
    assert "\n" not in str(e.value)
