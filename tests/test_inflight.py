"""INFLIGHT_SHMFD (protocol.md 1.11): the front-end keeps the inflight region; requests it
holds are completed after a dropped connection or a new daemon process.

The region is written by the request path of both data planes (common/state.c, next to the
inflight journal) and read back by a worker whose journal does not describe the ring it starts
(common/inflight.py, worker/main.py).
"""

from __future__ import annotations

import mmap
import os
import signal
import stat
import time
from collections.abc import Iterator

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common import inflight
from pyvirtiofsd.common.vhost_user import InflightDescription, ProtocolFeature
from tests.conftest import DATA_PLANES, Daemon
from tests.frontend import (
    DEFAULT_PROTOCOL_FEATURES,
    BackendError,
    Frontend,
    FuseClient,
    GuestMemory,
    connect_unix,
)
from tests.proctree import children

pytestmark = pytest.mark.data_planes(*DATA_PLANES)

ROOT = fa.ROOT_ID
QUEUES = 2
SIZE = 128
FEATURES = DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.INFLIGHT_SHMFD
DEADLINE = 10.0


class Region:
    """The test's view of the region: what the front-end holds."""

    def __init__(self, fd: int, desc: InflightDescription) -> None:
        self.fd, self.desc = fd, desc
        self.mm = mmap.mmap(fd, desc.mmap_size, offset=desc.mmap_offset)
        self.view = memoryview(self.mm)

    def queue(self, q: int) -> inflight.QueueRegion:
        return inflight.QueueRegion(self.view, q * inflight.queue_stride(SIZE), SIZE)

    def in_flight(self, q: int) -> list[int]:
        r = self.queue(q)
        return [h for h in range(SIZE) if r.desc(h)[0]]

    def close(self) -> None:
        self.view.release()
        self.mm.close()
        os.close(self.fd)


def bring_up(d: Daemon, region: tuple[int, InflightDescription] | None = None
             ) -> tuple[Frontend, Region]:
    """QEMU's order with inflight tracking: features, GET_INFLIGHT_FD (or the region kept from
    before), SET_INFLIGHT_FD, memory, rings."""
    fe = Frontend(connect_unix(d.socket, process=d.proc), process=d.proc)
    fe.negotiate(protocol_features=FEATURES)
    assert fe.acked_protocol_features & ProtocolFeature.INFLIGHT_SHMFD
    fd, desc = region if region is not None else fe.get_inflight_fd(QUEUES, SIZE)
    fe.set_inflight_fd(fd, desc)
    fe.memory = GuestMemory(16 << 20)
    fe.set_mem_table()
    for q in range(QUEUES):
        fe.add_queue(q, SIZE)
    return fe, Region(fd, desc)


@pytest.fixture
def daemon(daemon_factory) -> Iterator[Daemon]:
    d = daemon_factory("--reconnect")
    yield d
    assert "Traceback" not in d.text, d.text


def wait_until(what: str, done) -> None:
    deadline = time.monotonic() + DEADLINE
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.005)


def test_the_region_follows_the_ring(daemon: Daemon) -> None:
    fe, region = bring_up(daemon)
    try:
        d = region.desc
        assert (d.mmap_offset, d.num_queues, d.queue_size) == (0, QUEUES, SIZE)
        assert d.mmap_size == QUEUES * inflight.queue_stride(SIZE) == os.fstat(region.fd).st_size
        (daemon.share / "f").write_bytes(b"x" * 8192)
        c = FuseClient(fe)
        c.init()
        node = c.lookup(ROOT, "f").nodeid
        fh = c.open(node, os.O_RDONLY).fh
        tokens = [c.submit(fa.Opcode.READ, node, fa.ReadIn(fh, i * 512, 512).pack(),
                           out_size=512) for i in range(8)]
        heads = {c.vq.inflight[t].head for t in tokens}
        for t in tokens:
            assert c.result(t).body == b"x" * 512
        c.release(node, fh)
        c.forget(node, 1)
        q = region.queue(1)
        features, version, desc_num, last_batch_head, used_idx = q.header()
        assert (features, version, desc_num) == (0, inflight.VERSION, SIZE)
        assert used_idx == fe.queue(1).used_idx()
        assert region.in_flight(1) == []
        # Each fetch had its own counter; the last head pushed heads the batch list.
        assert len({q.desc(h)[2] for h in heads}) == len(heads)
        assert last_batch_head == fe.queue(1).used[4 + 8 * ((used_idx - 1) % SIZE)]
    finally:
        fe.close()
        region.close()


def test_a_short_region_is_refused(daemon: Daemon) -> None:
    fe = Frontend(connect_unix(daemon.socket, process=daemon.proc), process=daemon.proc)
    try:
        fe.negotiate(protocol_features=FEATURES)
        fd = os.memfd_create("short")
        os.ftruncate(fd, 100)
        try:
            with pytest.raises(BackendError):
                fe.set_inflight_fd(fd, InflightDescription(100, 0, QUEUES, SIZE))
        finally:
            os.close(fd)
        daemon.wait_for("SET_INFLIGHT_FD refused: SET_INFLIGHT_FD: 100 bytes at offset 0")
        assert fe.get_queue_num() == QUEUES
    finally:
        fe.close()


def test_requests_outstanding_when_the_connection_drops_complete_once(daemon: Daemon) -> None:
    # The front-end queues a burst and drops the connection at once: the daemon stops the ring
    # between two requests, having completed all it took; the front-end, back with its region,
    # restarts the ring at its used index and gets every reply exactly once (the driver
    # refuses a used entry for a head that is not outstanding).
    (daemon.share / "f").write_bytes(bytes(range(256)) * 64)
    fe, region = bring_up(daemon)
    try:
        c = FuseClient(fe)
        c.init()
        node = c.lookup(ROOT, "f").nodeid
        fh = c.open(node, os.O_RDONLY).fh
        reads = [c.submit(fa.Opcode.READ, node, fa.ReadIn(fh, i * 256, 256).pack(),
                          out_size=256) for i in range(30)]
        getattr_ = c.submit(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0))
        fe.sock.close()
        daemon.wait_for("front-end disconnected")
        fe.reconnect(daemon.socket, protocol_features=FEATURES,
                     inflight=(region.fd, region.desc))
        for t in reads:
            assert c.result(t).body == bytes(range(256))
        r = c.result(getattr_)
        assert r.error == 0
        assert fa.AttrOut.unpack(r.body).attr.ino == daemon.share.stat().st_ino
        assert not c.vq.inflight
        assert region.in_flight(1) == []
        assert region.queue(1).header()[4] == fe.queue(1).used_idx()
        c.release(node, fh)
        c.forget(node, 1)
    finally:
        fe.close()
        region.close()


def test_a_new_daemon_completes_what_the_region_holds(daemon_factory, monkeypatch) -> None:
    # The first daemon takes INIT off the ring, marks it in flight and dies (its worker at
    # the test hook, its supervisor stopped so that no successor finishes the request, then
    # killed).  A second daemon, handed the region, serves that INIT first and then the
    # GETATTR queued behind it: each reply arrives exactly once.
    monkeypatch.setenv("PYVIRTIOFSD_TEST_HOOKS", "1")
    monkeypatch.setenv("PYVIRTIOFSD_TEST_CRASH", "INIT:popped")
    first = daemon_factory("--seccomp=none")
    monkeypatch.delenv("PYVIRTIOFSD_TEST_HOOKS")
    monkeypatch.delenv("PYVIRTIOFSD_TEST_CRASH")
    fe, region = bring_up(first)
    try:
        worker = next(p for p, n in children(first.proc.pid).items() if n == "pyvfs-q1")
        os.kill(first.proc.pid, signal.SIGSTOP)
        c = FuseClient(fe)
        init = c.submit(fa.Opcode.INIT, 0, fa.InitIn(fa.KERNEL_VERSION, fa.KERNEL_MINOR_VERSION,
                                                     128 << 10, 0, 0).pack())
        head = c.vq.inflight[init].head

        def dead() -> bool:
            with open(f"/proc/{worker}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] == "Z"

        wait_until("the worker died at the hook", dead)
        assert region.in_flight(1) == [head]
        getattr_ = c.submit(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0))
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()

        second = daemon_factory()
        fe.reconnect(second.socket, protocol_features=FEATURES,
                     inflight=(region.fd, region.desc), process=second.proc)
        r = c.result(init)
        assert r.error == 0
        assert fa.InitOut.unpack(r.body.ljust(fa.INIT_OUT.size, b"\0")).major == 7
        r = c.result(getattr_)
        assert r.error == 0
        assert fa.AttrOut.unpack(r.body).attr.ino == second.share.stat().st_ino
        second.wait_for("resubmitting 1 request(s) the inflight region holds")
        assert region.in_flight(1) == []
        assert region.queue(1).header()[4] == fe.queue(1).used_idx()
        # The ring goes on as usual, on the new daemon.
        assert stat.S_ISDIR(c.getattr(ROOT).attr.mode)
        assert "Traceback" not in second.text, second.text
    finally:
        fe.close()
        region.close()


@pytest.mark.parametrize("point", ["replied", "pushed"])
def test_a_respawned_worker_keeps_the_region_current(daemon_factory, monkeypatch,
                                                      point: str) -> None:
    # The worker dies with a GETATTR's reply written but not pushed, or pushed but not yet
    # recorded as such; its successor, given the region again, finishes it from the journal
    # (no second GETATTR), and the region ends with nothing in flight and the ring's used
    # index -- a head left marked would be served twice by a later daemon.
    monkeypatch.setenv("PYVIRTIOFSD_TEST_HOOKS", "1")
    monkeypatch.setenv("PYVIRTIOFSD_TEST_CRASH", f"GETATTR:{point}")
    d = daemon_factory("--seccomp=none")
    fe, region = bring_up(d)
    try:
        c = FuseClient(fe)
        c.init()
        assert c.getattr(ROOT).attr.ino == d.share.stat().st_ino
        if point == "replied":
            d.wait_for("completing 1 request(s) the previous worker left in flight")
        assert stat.S_ISDIR(c.getattr(ROOT).attr.mode)
        assert region.in_flight(1) == []
        assert region.queue(1).header()[4] == fe.queue(1).used_idx()
        assert "resubmitting" not in d.text
    finally:
        fe.close()
        region.close()


def test_resubmission_follows_the_fetch_order_and_survives_a_worker_crash(
        daemon_factory, monkeypatch) -> None:
    # A region as another back-end could leave it: a GETATTR, an INIT and a GETATTR, fetched
    # as INIT, the second GETATTR, the first, none completed.  The new daemon serves them in
    # that order; its worker dies once the first GETATTR's reply is written, and the successor
    # completes the rest from the journal -- each exactly once, the ring's used entries in
    # fetch order.
    first = daemon_factory()
    fe, region = bring_up(first)
    try:
        c = FuseClient(fe)
        fe.set_vring_enable(1, False)
        tokens = [c.submit(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0)),
                  c.submit(fa.Opcode.INIT, 0, fa.InitIn(fa.KERNEL_VERSION,
                                                        fa.KERNEL_MINOR_VERSION,
                                                        128 << 10, 0, 0).pack()),
                  c.submit(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0))]
        heads = [c.vq.inflight[t].head for t in tokens]
        fetched = [heads[1], heads[2], heads[0]]
        q = region.queue(1)
        used = fe.queue(1).used_idx()
        assert q.header()[4] == used and region.in_flight(1) == []
        for counter, head in enumerate(fetched, start=100):
            q.mark(head, counter)
        first.stop()

        monkeypatch.setenv("PYVIRTIOFSD_TEST_HOOKS", "1")
        monkeypatch.setenv("PYVIRTIOFSD_TEST_CRASH", "GETATTR:replied")
        second = daemon_factory("--seccomp=none")
        fe.reconnect(second.socket, protocol_features=FEATURES,
                     inflight=(region.fd, region.desc), process=second.proc)
        replies = [c.result(t) for t in tokens]
        assert [r.error for r in replies] == [0, 0, 0]
        for r in (replies[0], replies[2]):
            assert fa.AttrOut.unpack(r.body).attr.ino == second.share.stat().st_ino
        second.wait_for("resubmitting 3 request(s) the inflight region holds")
        second.wait_for("completing 2 request(s) the previous worker left in flight")
        ring = fe.queue(1).used
        order = [int.from_bytes(ring[4 + 8 * ((used + i) % SIZE):][:4], "little")
                 for i in range(3)]
        assert order == fetched
        assert region.in_flight(1) == []
        assert region.queue(1).header()[4] == fe.queue(1).used_idx() == (used + 3) & 0xFFFF
    finally:
        fe.close()
        region.close()
