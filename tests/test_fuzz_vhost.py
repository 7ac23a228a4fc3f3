"""Fuzzing the vhost-user socket: hostile front-ends.

Sequences of messages with wrong versions and flags, sizes larger or smaller than the payload,
too many or missing fds, requests before SET_OWNER, ring indexes out of range, memory regions
that overlap or overflow or are backed by fds that are not memfds, huge queue sizes -- mixed
with valid requests so that deeper states are reached.

* In-process, against `Backend` (the control plane) with a stand-in for the workers: every
  request is answered, refused or ends the connection (Disconnect), nothing else is raised, and
  once the connection is closed every fd the sequence sent is closed again.
* Against a running daemon with --reconnect: after every hostile connection the daemon is
  alive, serves the next front-end, and holds no fd more than before.

Budgets: tests/fuzzing.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirtiofsd.common.control import RingGeometry
from pyvirtiofsd.common.vhost_user import (
    F_PROTOCOL_FEATURES,
    HEADER_SIZE,
    U64,
    Header,
    InflightDescription,
    MemoryRegion,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    pack_memory_table,
    pack_single_region,
)
from pyvirtiofsd.supervisor.vhost import Backend, Disconnect
from tests.fuzzing import budget

MIB = 1 << 20
NUM_QUEUES = 3

# --- message strategies ---------------------------------------------------------------------

u64s = st.one_of(st.sampled_from([0, 1, 2, 0x100, 0x1FF, 1 << 30, 1 << 32, (1 << 64) - 1,
                                  F_PROTOCOL_FEATURES | (1 << 32) | (1 << 28) | (1 << 29),
                                  int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                                      | ProtocolFeature.CONFIGURE_MEM_SLOTS)]),
                 st.integers(0, (1 << 64) - 1))
indexes = st.one_of(st.integers(0, NUM_QUEUES + 1), st.sampled_from([0xFF, 0x100, 1 << 31]))
nums = st.one_of(st.sampled_from([0, 1, 2, 3, 64, 128, 256, 1024, 1 << 15, 1 << 16,
                                  (1 << 32) - 1]), st.integers(0, 70000))
addrs = st.one_of(st.sampled_from([0, 0x1000, 0x7F00_0000_0000, 0x7F00_0000_1000,
                                   (1 << 64) - 16, 1 << 63]), st.integers(0, (1 << 64) - 1))
regions = st.builds(MemoryRegion,
                    st.sampled_from([0, MIB, 2 * MIB, (1 << 64) - MIB, 1 << 40]),
                    st.sampled_from([0, 4096, MIB, 2 * MIB, (1 << 64) - 1]),
                    st.sampled_from([0x7F00_0000_0000, 0x7F00_0010_0000, (1 << 64) - 4096]),
                    st.sampled_from([0, 4096, 3, MIB, (1 << 64) - 1]))
FD_KINDS = ("memfd", "memfd-small", "eventfd", "pipe", "devnull", "file", "socket")


@st.composite
def payloads(draw, req: int) -> bytes:
    if req in (Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.SET_STATUS):
        return U64.pack(draw(u64s))
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        return U64.pack(draw(st.one_of(indexes, st.integers(0, 0x1FF), u64s)))
    if req in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
               Request.SET_VRING_ENABLE):
        return VringState(draw(indexes) & 0xFFFFFFFF, draw(nums) & 0xFFFFFFFF).pack()
    if req == Request.SET_VRING_ADDR:
        return VringAddr(draw(indexes) & 0xFFFFFFFF, draw(st.sampled_from([0, 1, 2, 0xFFFF])),
                         draw(addrs), draw(addrs), draw(addrs), draw(addrs)).pack()
    if req == Request.SET_MEM_TABLE:
        return pack_memory_table(draw(st.lists(regions, min_size=0, max_size=9)))
    if req in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        return pack_single_region(draw(regions))
    if req in (Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD):
        return InflightDescription(draw(st.sampled_from([0, 100, 4224, 8448, 1 << 20])),
                                   draw(st.sampled_from([0, 32, 4096])),
                                   draw(st.sampled_from([0, 1, NUM_QUEUES, NUM_QUEUES + 1])),
                                   draw(st.sampled_from([0, 3, 128, 1024, 32768]))).pack()
    if req == Request.GET_CONFIG:
        return struct.pack("=III", draw(st.integers(0, 300)), draw(st.integers(0, 300)), 0) \
            + bytes(draw(st.integers(0, 300)))
    return b""


@st.composite
def messages(draw) -> tuple[bytes, list[str]]:
    req = draw(st.one_of(st.sampled_from(list(Request)), st.integers(0, 60),
                         st.sampled_from([0xFFFF, (1 << 32) - 1])))
    payload = draw(payloads(req)) if draw(st.integers(0, 9)) else draw(st.binary(max_size=80))
    flags = draw(st.sampled_from([1, 1, 1, 9, 9, 0, 2, 5, 0x11, 0xFFFFFFFF]))
    size = len(payload)
    mutate = draw(st.integers(0, 19))
    if mutate == 0:
        size = draw(st.sampled_from([size + 1, max(0, size - 1), 0x1001, (1 << 32) - 1]))
    elif mutate == 1:
        payload = payload[:draw(st.integers(0, len(payload)))]      # short: the rest is lost
    fds = draw(st.lists(st.sampled_from(FD_KINDS), max_size=3))
    if req in (Request.SET_MEM_TABLE, Request.ADD_MEM_REG) and draw(st.booleans()):
        fds = ["memfd"] * max(1, (len(payload) - 8) // 32)
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR) \
            and draw(st.booleans()):
        fds = ["eventfd"]
    if req == Request.SET_INFLIGHT_FD and draw(st.booleans()):
        fds = [draw(st.sampled_from(["memfd", "memfd-small"]))]
    return Header(req & 0xFFFFFFFF, flags, size & 0xFFFFFFFF).pack() + payload, fds


def _start() -> list[tuple[bytes, list[str]]]:
    """The usual opening, so that sequences get past SET_OWNER and feature negotiation."""
    feats = F_PROTOCOL_FEATURES | (1 << 32) | (1 << 28) | (1 << 29)
    pf = int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS
             | ProtocolFeature.INFLIGHT_SHMFD)
    return [(Header(Request.SET_OWNER, 1, 0).pack(), []),
            (Header(Request.SET_PROTOCOL_FEATURES, 1, 8).pack() + U64.pack(pf), []),
            (Header(Request.SET_FEATURES, 9, 8).pack() + U64.pack(feats), []),
            (Header(Request.SET_MEM_TABLE, 9, 40).pack()
             + pack_memory_table([MemoryRegion(0, MIB, 0x7F00_0000_0000, 0)]), ["memfd"])]


sequences = st.tuples(st.booleans(), st.lists(messages(), min_size=1, max_size=12))


def make_fd(kind: str, tmp: Path) -> int:
    if kind == "memfd":
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, 2 * MIB)
        return fd
    if kind == "memfd-small":
        return os.memfd_create("fuzz-small", os.MFD_CLOEXEC)
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "devnull":
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    if kind == "file":
        return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


# --- the control plane, in process ----------------------------------------------------------


class FakeQueues:
    """Accepts what the control plane forwards to workers (their own checks are elsewhere)."""

    def __init__(self) -> None:
        self.started: dict[int, int] = {}

    def set_mem_table(self, regions, fds) -> None:
        pass

    def drop_memory(self) -> None:
        pass

    def start_ring(self, index: int, geometry: RingGeometry, kick, call, err=None) -> None:
        self.started[index] = geometry.next_avail

    def stop_ring(self, index: int) -> int:
        return self.started.pop(index, 0)

    def set_call(self, index: int, call) -> None:
        pass

    def set_enable(self, index: int, enabled: bool) -> None:
        pass

    # The device state needs a worker: refused, as a worker that cannot take it answers.
    def save_state(self, fd: int) -> None:
        raise OSError(errno.EIO, "no worker")

    def load_state(self, fd: int) -> None:
        raise OSError(errno.EIO, "no worker")

    def check_state(self) -> None:
        raise OSError(errno.EIO, "no worker")

    def prepare_state(self) -> None:
        raise OSError(errno.EIO, "no worker")

    def set_log_base(self, size: int, offset: int, fd) -> None:
        pass

    def set_log_state(self, index: int, log_all: bool, ring: bool, used_gpa: int) -> None:
        pass

    def set_inflight(self, fd, offset: int = 0, queue_size: int = 0,
                     num_queues: int = 0) -> None:
        pass


@budget(800)
@given(sequences)
def test_backend_answers_refuses_or_disconnects(tmp_path_factory, seq) -> None:
    opening, msgs = seq
    tmp = tmp_path_factory.getbasetemp() / "fuzz-file"
    before = _open_fds()
    backend = Backend(FakeQueues(), NUM_QUEUES, 1024)
    try:
        for data, kinds in (_start() if opening else []) + msgs:
            fds = [make_fd(k, tmp) for k in kinds]
            if len(data) < HEADER_SIZE:
                for fd in fds:
                    os.close(fd)
                continue
            hdr = Header.unpack(data[:HEADER_SIZE])
            payload = data[HEADER_SIZE:]
            if len(payload) != hdr.size or not hdr.is_valid():
                # Framing (vhost.receive) would wait for the rest or refuse the header; the
                # handler only ever sees whole, framed messages.
                for fd in fds:
                    os.close(fd)
                continue
            try:
                reply = backend.handle(hdr, payload, fds)
            except Disconnect:
                break
            assert reply is None or isinstance(reply, bytes)
    finally:
        backend.close()
    # No fd the sequence sent is still open (others may have closed meanwhile: GC).
    assert not _open_fds() - before


# --- a running daemon -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from tests.conftest import start_daemon
    from tests.proctree import children, fd_count

    share = tmp_path_factory.mktemp("vhostfuzz")
    d = start_daemon(share, str(share.parent / "fuzz.sock"), "--reconnect",
                     "--request-queues=2")

    def counts() -> tuple[int, int]:
        spawner = next(p for p, n in children(d.proc.pid).items() if n == "pyvfs-spawner")
        return fd_count(d.proc.pid), fd_count(spawner)

    yield d, counts
    alive = d.proc.poll() is None
    d.stop()
    assert alive, d.text
    assert "Traceback" not in d.text, d.text


def _session_works(d) -> None:
    from tests.frontend import Frontend, FuseClient

    with Frontend.connect(d.socket, process=d.proc, queues=3) as fe:
        c = FuseClient(fe)
        if "FUSE session started" not in d.text:
            c.init()
        assert c.getattr(1).attr.ino == os.stat(d.share).st_ino


@budget(200, expensive=True)
@given(sequences)
def test_daemon_survives_hostile_front_ends(daemon, tmp_path_factory, seq) -> None:
    d, counts = daemon
    opening, msgs = seq
    tmp = tmp_path_factory.getbasetemp() / "fuzz-file-2"
    if not hasattr(test_daemon_survives_hostile_front_ends, "baseline"):
        _session_works(d)
        d.wait_frontends_served(1)
        test_daemon_survives_hostile_front_ends.baseline = counts()
    n = d.status()["frontends_served"]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.socket)
    s.settimeout(2)
    try:
        for data, kinds in (_start() if opening else []) + msgs:
            fds = [make_fd(k, tmp) for k in kinds]
            try:
                with contextlib.suppress(OSError):
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                            struct.pack(f"{len(fds)}i", *fds))] if fds else []
                    s.sendmsg([data], anc)
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        s.close()
    # Serving is one connection at a time: once the next one is served, this one is done.
    _session_works(d)
    d.wait_frontends_served(n + 2)      # both connections fully torn down
    assert d.proc.poll() is None
    assert counts() == test_daemon_survives_hostile_front_ends.baseline
