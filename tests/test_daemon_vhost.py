"""pyvirtiofsd's vhost-user control plane, driven over its real socket.

Negotiation variants, ring stop/restart, memory hot-plug, and bad input of every kind: each bad
message must be refused with a failure ack (REPLY_ACK) or end the connection cleanly with a log
line naming it -- never a traceback, never a dead worker -- and where the connection is kept, the
next valid request must still work.  Malformed descriptor chains cost their own request (or
stop their ring), never the daemon or another queue.
"""

from __future__ import annotations

import hashlib
import os
import select
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.vhost_user import (
    F_PROTOCOL_FEATURES,
    U64,
    VERSION,
    VRING_NOFD_MASK,
    Header,
    HeaderFlag,
    MemoryRegion,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    pack_memory_table,
    pack_single_region,
)
from pyvirtiofsd.common.virtio import USED_F_NO_NOTIFY, DescFlag, Feature
from tests.conftest import Daemon
from tests.frontend import (
    PAGE,
    BackendError,
    DaemonGone,
    DriverQueue,
    Frontend,
    FuseClient,
    GuestMemory,
    ReplyTimeout,
    connect_unix,
)
from tests.proctree import children

ROOT = fa.ROOT_ID
MIB = 1 << 20
_NEXT, _WRITE, _INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


@dataclass
class Conn:
    """A daemon, one front-end connection to it, and the daemon's child processes."""

    daemon: Daemon
    fe: Frontend
    kids: list[int] = field(default_factory=list)
    client: FuseClient | None = None
    kills_expected: bool = False

    def fuse(self, queue: int = 1) -> FuseClient:
        if self.client is None:
            self.client = FuseClient(self.fe, queue)
            self.client.init()
        return self.client

    def still_serves(self) -> None:
        """The connection and every queue still work."""
        c = self.fuse()
        assert c.getattr(ROOT).attr.ino == os.stat(self.daemon.share).st_ino
        assert c.forget(ROOT, 1).used_len == 0
        assert self.daemon.proc.poll() is None

    def assert_clean_exit(self, *fragments: str) -> None:
        """The daemon closed the connection with one log line holding every fragment, and
        exited 0 with its children gone (virtiofsd exits when its front-end goes away)."""
        assert self.daemon.proc.wait(timeout=20) == 0, self.daemon.text
        line = self.daemon.wait_for("closing the vhost-user connection")
        assert all(f in line for f in fragments), self.daemon.text
        for pid in self.kids:
            assert not os.path.exists(f"/proc/{pid}"), f"child {pid} outlived the daemon"
        assert "Traceback" not in self.daemon.text


@pytest.fixture
def connect(daemon_factory) -> Iterator[Callable[..., Conn]]:
    """connect(*daemon_args, negotiate=True, **Frontend.connect kw) -> Conn."""
    conns: list[Conn] = []

    def start(*args: str, negotiate: bool = True, **kw) -> Conn:
        d = daemon_factory(*args)
        kids = list(children(d.proc.pid))
        if negotiate:
            fe = Frontend.connect(d.socket, process=d.proc, **kw)
        else:
            fe = Frontend(connect_unix(d.socket, process=d.proc), process=d.proc)
        conn = Conn(d, fe, kids)
        conns.append(conn)
        return conn

    yield start
    for conn in conns:
        conn.fe.close()
        # However the connection ended, the daemon then exits 0 and takes its children along.
        assert conn.daemon.proc.wait(timeout=20) == 0, conn.daemon.text
        for pid in conn.kids:
            assert not os.path.exists(f"/proc/{pid}"), f"child {pid} outlived the daemon"
        assert "Traceback" not in conn.daemon.text, conn.daemon.text
        if not conn.kills_expected:
            assert "killed by" not in conn.daemon.text, conn.daemon.text


def refused(fe: Frontend, request: int, payload: bytes = b"", fds=()) -> BackendError:
    with pytest.raises(BackendError) as ei:
        fe.send(request, payload, fds)
    assert ei.value.request == request and ei.value.value != 0
    return ei.value


def pipe_closed_by_daemon(send: Callable[[list[int]], None], n: int = 1) -> None:
    """send(fds) with the write ends of n pipes; afterwards the daemon holds none of them."""
    pipes = [os.pipe() for _ in range(n)]
    try:
        send([w for _, w in pipes])
        for _, w in pipes:
            os.close(w)
        for r, _ in pipes:
            # EOF only once every copy of the write end is closed, the daemon's included.
            os.set_blocking(r, True)
            assert os.read(r, 1) == b""
    finally:
        for r, w in pipes:
            for fd in (r, w):
                try:
                    os.close(fd)
                except OSError:
                    pass


# --- negotiation ------------------------------------------------------------------------


# Every pair of settings appears at least once (a pairwise covering set), plus all-on as QEMU
# negotiates it.
_VARIANTS = [(1, 1, 1, 2), (0, 0, 0, 1), (0, 1, 1, 2), (1, 0, 1, 2), (1, 1, 0, 2),
             (1, 1, 1, 1)]


@pytest.mark.parametrize(("event_idx", "indirect", "reply_ack", "regions"), [
    (bool(e), bool(i), bool(r), n) for e, i, r, n in _VARIANTS
], ids=[f"evidx{e}-indirect{i}-ack{r}-regions{n}" for e, i, r, n in _VARIANTS])
def test_negotiation_variants(connect, event_idx: bool, indirect: bool, reply_ack: bool,
                              regions: int) -> None:
    conn = connect(event_idx=event_idx, indirect=indirect, reply_ack=reply_ack, regions=regions)
    fe = conn.fe
    want = Feature.VERSION_1 | F_PROTOCOL_FEATURES
    want |= Feature.EVENT_IDX if event_idx else 0
    want |= Feature.INDIRECT_DESC if indirect else 0
    assert fe.features & want == want          # everything asked for is offered
    assert fe.acked_features == want
    assert fe.acked_protocol_features & ProtocolFeature.MQ
    assert bool(fe.acked_protocol_features & ProtocolFeature.REPLY_ACK) == reply_ack
    assert fe.queue_num == 2
    assert fe.get_max_mem_slots() >= 8
    c = conn.fuse()
    assert c.getattr(ROOT).attr.ino == os.stat(conn.daemon.share).st_ino
    if indirect:
        token = c.submit(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0), indirect=True)
        assert c.result(token).body
    if regions == 2:
        token = c.submit(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0), cross_region=40)
        assert c.result(token).body
    # Back-to-back requests: every kick the driver suppresses on the daemon's word
    # (avail_event, or used.flags) must still be served (spec 2.7.10).
    vq = fe.queue(1)
    for _ in range(20):
        c.getattr(ROOT)
    assert vq.kicks >= 1 and not vq.inflight
    if not event_idx:
        assert struct.unpack_from("<H", vq.used, 0)[0] & USED_F_NO_NOTIFY == 0


def test_status_and_features_queries(connect) -> None:
    conn = connect()
    fe = conn.fe
    fe.set_status(0x0F)
    assert fe.get_status() == 0x0F
    assert fe.get_features() & Feature.VERSION_1
    conn.still_serves()


def test_config_space_with_a_tag(connect) -> None:
    conn = connect("--tag=myfs", "--request-queues=2", queues=3,
                   protocol_features=int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                                         | ProtocolFeature.CONFIG))
    fe = conn.fe
    assert fe.acked_protocol_features & ProtocolFeature.CONFIG
    space = fe.get_config()
    assert space == b"myfs".ljust(36, b"\0") + struct.pack("<I", 2)
    assert fe.get_config(36, 4) == struct.pack("<I", 2)
    # A window outside the 40-byte space is answered with an empty (failed) config.
    reply = fe._call(Request.GET_CONFIG, struct.pack("=III", 300, 8, 0) + bytes(8))
    assert reply.payload[4:8] == bytes(4)
    refused(fe, Request.SET_CONFIG, struct.pack("=III", 0, 4, 0) + b"evil")
    assert fe.get_config()[:4] == b"myfs"
    conn.still_serves()


def test_config_is_not_offered_without_a_tag(connect) -> None:
    conn = connect()
    assert not conn.fe.protocol_features & ProtocolFeature.CONFIG
    conn.still_serves()


def test_without_protocol_features_rings_start_enabled(connect) -> None:
    conn = connect(negotiate=False)
    fe = conn.fe
    fe.features = fe.get_features()
    fe.set_owner()
    fe.set_features(Feature.VERSION_1)         # no F_PROTOCOL_FEATURES: no SET_VRING_ENABLE
    fe.memory = GuestMemory(16 * MIB)
    fe.set_mem_table()
    fe.add_queue(0)
    fe.add_queue(1)
    conn.still_serves()


# --- ring stop and restart ------------------------------------------------------------------


def test_get_vring_base_stops_and_restart_continues(connect) -> None:
    conn = connect()
    fe = conn.fe
    c = conn.fuse()
    for _ in range(5):
        c.getattr(ROOT)
    c.forget(ROOT, 1)
    assert fe.get_vring_base(1) == 6          # INIT + 5 GETATTR
    assert fe.get_vring_base(0) == 1
    # Asking again for a stopped ring gives the same index.
    assert fe.get_vring_base(1) == 6
    # A stopped ring is not processed...
    token = c.submit(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0))
    with pytest.raises(ReplyTimeout):
        c.result(token, timeout=0.3)
    # ...until restarted from the reported index.
    fe.start_queue(0)
    fe.start_queue(1, base=6)
    assert c.result(token).body
    assert fe.get_vring_base(1) == 7
    fe.start_queue(1)
    for _ in range(3):
        c.getattr(ROOT)
    assert fe.get_vring_base(1) == 10
    fe.start_queue(1)
    conn.still_serves()


def test_new_kick_fd_on_a_running_ring_keeps_its_place(connect) -> None:
    conn = connect()
    fe = conn.fe
    c = conn.fuse()
    for _ in range(3):
        c.getattr(ROOT)
    vq = fe.queue(1)
    old = vq.kick_fd
    vq.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        fe.set_vring_kick(1, vq.kick_fd)
        for _ in range(3):
            c.getattr(ROOT)
        # Kicks now arrive on the new fd only; nothing was served twice or skipped.
        assert fe.get_vring_base(1) == 7
    finally:
        os.close(old)
    fe.start_queue(1)
    conn.still_serves()


def test_ring_index_wraps_past_65535(connect) -> None:
    conn = connect()
    fe = conn.fe
    c = conn.fuse()
    vq = fe.queue(1)
    assert fe.get_vring_base(1) == 1
    # Resume the ring just before the 16-bit wrap of the free-running indices.
    start = 0xFFFE
    vq.avail_idx = vq.last_used = vq._kicked_at = start
    struct.pack_into("<H", vq.avail, 2, start)
    struct.pack_into("<H", vq.used, 2, start)
    fe.start_queue(1, base=start)
    for _ in range(5):
        c.getattr(ROOT)
    assert fe.get_vring_base(1) == (start + 5) & 0xFFFF


def test_disabled_ring_is_not_processed_until_enabled(connect) -> None:
    conn = connect()
    fe = conn.fe
    c = conn.fuse()
    fe.set_vring_enable(1, False)
    token = c.submit(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0))
    with pytest.raises(ReplyTimeout):
        c.result(token, timeout=0.3)
    fe.set_vring_enable(1, True)
    assert c.result(token).body


def test_new_call_fd_on_a_running_ring(connect) -> None:
    # Without EVENT_IDX every completion is signalled, so each one must reach the new fd.
    conn = connect(event_idx=False)
    fe = conn.fe
    c = conn.fuse()
    vq = fe.queue(1)
    old = vq.call_fd
    new = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        fe.set_vring_call(1, new)
        for fd in (old, new):
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
        token = c.submit(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0))
        assert select.select([new], [], [], 10)[0] == [new]
        assert c.result(token).body
        # The old notifier is no longer used.
        assert select.select([old], [], [], 0)[0] == []
    finally:
        os.close(new)


def test_reset_device_then_bring_up_again(connect) -> None:
    conn = connect()
    fe = conn.fe
    c = conn.fuse()
    c.getattr(ROOT)
    fe.reset_device()
    token = c.submit(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0))
    with pytest.raises(ReplyTimeout):
        c.result(token, timeout=0.3)
    fe.set_features(fe.acked_features)
    fe.start_queue(0)
    fe.start_queue(1, base=fe.queue(1).avail_idx - 1)
    assert c.result(token).body


# --- memory hot-plug ------------------------------------------------------------------------


def test_add_and_remove_memory_regions(connect) -> None:
    conn = connect(mem_size=16 * MIB)
    fe = conn.fe
    c = conn.fuse()
    (conn.daemon.share / "f").write_bytes(b"hot-plugged memory")
    node = c.lookup(ROOT, "f").nodeid
    fh = c.open(node, os.O_RDWR).fh
    r1 = fe.add_mem_region(2 * MIB)
    r2 = fe.add_mem_region(4 * MIB)
    # Everything but the ring itself in the new regions: request and reply buffers.
    for region in (r1, r2):
        assert _read_in(conn, region.gpa + 4096, node, fh, 64) == b"hot-plugged memory"
    # A chain straddling the boundary between base memory and the first hot-plugged region.
    token = c.submit(fa.Opcode.WRITE, node, [fa.WriteIn(fh, 0, 8).pack(), b"HOTPLUGS"],
                     cross_region=40 + 40 + 4)
    c.result(token)
    assert (conn.daemon.share / "f").read_bytes()[:8] == b"HOTPLUGS"
    fe.rem_mem_region(r1)
    assert c.read(node, fh, 0, 8) == b"HOTPLUGS"
    # The removed range is no longer guest memory: a chain there completes with length 0.
    vq = fe.queue(1)
    head = vq.alloc_desc()
    vq.write_desc(head, r1.gpa, 64, 0)
    assert vq.wait(vq.publish(head, descs=[head])).used_len == 0
    fe.rem_mem_region(r2)
    conn.still_serves()
    # Removing a region that is not there is refused.
    refused(fe, Request.REM_MEM_REG, pack_single_region(r2.describe()))
    conn.still_serves()


def _read_in(conn: Conn, region_gpa: int, node: int, fh: int, size: int) -> bytes:
    """READ with every buffer (not the ring) placed in the region at `region_gpa`."""
    fe, c = conn.fe, conn.fuse()
    vq = fe.queue(1)
    body = b"".join(c.build(fa.Opcode.READ, node, fa.ReadIn(fh, 0, size).pack())[1])
    buf = fe.memory.alloc_at(region_gpa, len(body) + 16 + size)
    fe.memory.write(buf, body)
    h = [vq.alloc_desc() for _ in range(2)]
    vq.write_desc(h[0], buf, len(body), _NEXT, h[1])
    vq.write_desc(h[1], buf + len(body), 16 + size, _WRITE)
    done = vq.wait(vq.publish(h[0], descs=h, allocs=[buf],
                              writable=[(buf + len(body), 16 + size)]))
    return done.data[16 : done.used_len] if done.used_len >= 16 else b""


def test_set_mem_table_while_rings_run(connect) -> None:
    # QEMU without CONFIGURE_MEM_SLOTS re-sends the whole table on every memory change.
    conn = connect(mem_size=8 * MIB)
    fe = conn.fe
    c = conn.fuse()
    (conn.daemon.share / "f").write_bytes(b"remapped")
    node = c.lookup(ROOT, "f").nodeid
    fh = c.open(node, os.O_RDONLY).fh
    dimm = fe.memory.add_region(2 * MIB)
    fe.set_mem_table()
    assert _read_in(conn, dimm.gpa, node, fh, 8) == b"remapped"
    assert c.read(node, fh, 0, 8) == b"remapped"
    fe.set_mem_table([r for r in fe.memory.regions if r is not dimm])
    fe.memory.detach_region(dimm)
    vq = fe.queue(1)
    head = vq.alloc_desc()
    vq.write_desc(head, dimm.gpa, 64, 0)
    assert vq.wait(vq.publish(head, descs=[head])).used_len == 0
    conn.still_serves()


def test_killed_worker_is_respawned_and_its_ring_resumes(connect) -> None:
    conn = connect("--request-queues=2", queues=3)
    conn.kills_expected = True
    c = conn.fuse()
    (conn.daemon.share / "f").write_bytes(b"survives")
    node = c.lookup(ROOT, "f").nodeid
    fh = c.open(node, os.O_RDONLY).fh
    names = {}
    for pid in conn.kids:
        with open(f"/proc/{pid}/comm") as f:
            names[f.read().strip()] = pid
    os.kill(names["pyvfs-q1"], 9)
    # Served once the new worker has the memory and the ring (the request may wait for it).
    assert c.read(node, fh, 0, 100) == b"survives"
    conn.daemon.wait_for("worker for queue 1 (pid")
    assert c.getattr(node).attr.size == 8
    os.kill(names["pyvfs-q0"], 9)
    assert c.forget(node, 1).used_len == 0
    assert FuseClient(conn.fe, queue=2).read(node, fh, 0, 3) == b"sur"
    conn.still_serves()
    assert "respawning it" in conn.daemon.text


def test_every_advertised_memory_slot_can_be_used(connect) -> None:
    conn = connect(mem_size=4 * MIB)
    fe = conn.fe
    slots = fe.get_max_mem_slots()
    added = [fe.add_mem_region(PAGE) for _ in range(slots - len(fe.memory.regions))]
    c = conn.fuse()
    assert c.getattr(ROOT).attr.ino > 0
    # The last slot carries a request.
    last = added[-1]
    vq = fe.queue(1)
    _unique, readable = c.build(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0))
    body = b"".join(readable)
    buf = fe.memory.alloc_at(last.gpa, PAGE)
    fe.memory.write(buf, body)
    h = [vq.alloc_desc() for _ in range(2)]
    vq.write_desc(h[0], buf, len(body), _NEXT, h[1])
    vq.write_desc(h[1], buf + 256, fa.OUT_HEADER.size + fa.ATTR_OUT.size, _WRITE)
    done = vq.wait(vq.publish(h[0], descs=h, allocs=[buf],
                              writable=[(buf + 256, fa.OUT_HEADER.size + fa.ATTR_OUT.size)]))
    assert done.used_len == fa.OUT_HEADER.size + fa.ATTR_OUT.size
    # One more is refused, and nothing breaks.
    region = fe.memory.add_region(PAGE)
    try:
        refused(fe, Request.ADD_MEM_REG, pack_single_region(region.describe()), [region.fd])
    finally:
        fe.memory.detach_region(region)
    conn.still_serves()


# --- bad input: the connection survives with a failure ack --------------------------------


def _memfd(size: int) -> int:
    fd = os.memfd_create("test-region", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _state(index: int, num: int) -> bytes:
    return VringState(index, num).pack()


def _addr(index: int, desc: int, used: int, avail: int, flags: int = 0) -> bytes:
    return VringAddr(index, flags, desc, used, avail, 0).pack()


def _bad_messages(fe: Frontend) -> dict[str, tuple[int, bytes]]:
    q = fe.queue(1)
    mem = fe.memory
    d, u, a = mem.uaddr(q.desc_gpa), mem.uaddr(q.used_gpa), mem.uaddr(q.avail_gpa)
    return {
        "short payload": (Request.SET_VRING_NUM, b"\1\0\0\0"),
        "long payload": (Request.SET_FEATURES, bytes(16)),
        "empty payload": (Request.SET_VRING_BASE, b""),
        "unknown request": (99, b""),
        "unsupported request": (Request.SEND_RARP, bytes(8)),
        "index out of range num": (Request.SET_VRING_NUM, _state(2, 128)),
        "index out of range addr": (Request.SET_VRING_ADDR, _addr(7, d, u, a)),
        "index out of range enable": (Request.SET_VRING_ENABLE, _state(255, 1)),
        "index out of range base": (Request.SET_VRING_BASE, _state(1 << 31, 0)),
        "index out of range call": (Request.SET_VRING_CALL, U64.pack(9 | VRING_NOFD_MASK)),
        "num not power of two": (Request.SET_VRING_NUM, _state(1, 100)),
        "num zero": (Request.SET_VRING_NUM, _state(1, 0)),
        "num too large": (Request.SET_VRING_NUM, _state(1, 1 << 16)),
        "num above the configured maximum": (Request.SET_VRING_NUM, _state(1, 2048)),
        "misaligned desc": (Request.SET_VRING_ADDR, _addr(1, d + 8, u, a)),
        "misaligned used": (Request.SET_VRING_ADDR, _addr(1, d, u + 2, a)),
        "misaligned avail": (Request.SET_VRING_ADDR, _addr(1, d, u, a + 1)),
        "vring addr unknown flags": (Request.SET_VRING_ADDR, _addr(1, d, u, a, flags=2)),
        "dirty log without its fd": (Request.SET_LOG_BASE, bytes(16)),
        "base beyond 16 bits": (Request.SET_VRING_BASE, _state(1, 0x10000)),
        "enable value 2": (Request.SET_VRING_ENABLE, _state(1, 2)),
        "kick unknown bits": (Request.SET_VRING_KICK, U64.pack(1 | VRING_NOFD_MASK | 1 << 20)),
        "call without fd or nofd flag": (Request.SET_VRING_CALL, U64.pack(1)),
        "features never offered": (Request.SET_FEATURES, U64.pack(1 << 63 | Feature.VERSION_1)),
        "protocol features never offered": (Request.SET_PROTOCOL_FEATURES, U64.pack(1 << 63)),
        "status wider than a byte": (Request.SET_STATUS, U64.pack(0x100)),
        "second SET_OWNER": (Request.SET_OWNER, b""),
        "memory table of 0 regions": (Request.SET_MEM_TABLE, pack_memory_table([])),
        "memory table without fds": (Request.SET_MEM_TABLE,
                                     pack_memory_table([mem.regions[0].describe()])),
        "config without CONFIG": (Request.SET_CONFIG, bytes(12 + 4)),
        "rem region never added": (Request.REM_MEM_REG, pack_single_region(
            MemoryRegion(1 << 40, PAGE, 1 << 41, 0))),
    }


def test_bad_requests_are_refused_and_the_connection_survives(connect) -> None:
    conn = connect()
    fe = conn.fe
    conn.fuse()
    for what, (request, payload) in _bad_messages(fe).items():
        try:
            refused(fe, request, payload)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}\n{conn.daemon.text}") from None
        conn.still_serves()
    # Each refusal is one warning naming the request.
    log = conn.daemon.text
    assert "SET_VRING_NUM refused" in log and "request 99 refused" in log


def test_bad_ring_settings_on_a_stopped_ring(connect) -> None:
    conn = connect()
    fe = conn.fe
    q = fe.queue(1)
    mem = fe.memory
    d, u, a = mem.uaddr(q.desc_gpa), mem.uaddr(q.used_gpa), mem.uaddr(q.avail_gpa)
    base = fe.get_vring_base(1)
    # A stopped ring still refuses bad values, and restarts fine afterwards.
    refused(fe, Request.SET_VRING_NUM, _state(1, 100))
    refused(fe, Request.SET_VRING_ADDR, _addr(1, d + 4, u, a))
    # Ring parts outside guest memory: refused when the ring is started (SET_VRING_KICK).
    fe.set_vring_num(1, q.size)
    fe.set_vring_base(1, base)
    fe.send(Request.SET_VRING_ADDR, _addr(1, 1 << 50, u, a))
    refused(fe, Request.SET_VRING_KICK, U64.pack(1), [q.kick_fd])
    # Ring straddling the end of its region.
    end = mem.regions[-1].uaddr + mem.regions[-1].size
    fe.send(Request.SET_VRING_ADDR, _addr(1, end - 16 * 4, u, a))
    refused(fe, Request.SET_VRING_KICK, U64.pack(1), [q.kick_fd])
    fe.start_queue(1, base=base)
    conn.still_serves()


def test_requests_before_set_owner_are_refused(connect) -> None:
    conn = connect(negotiate=False)
    fe = conn.fe
    fe.features = fe.get_features()
    fe.protocol_features = fe.get_protocol_features()
    fe.set_protocol_features(fe.protocol_features & (ProtocolFeature.REPLY_ACK
                                                     | ProtocolFeature.MQ))
    assert fe.reply_ack
    refused(fe, Request.SET_FEATURES, U64.pack(Feature.VERSION_1 | F_PROTOCOL_FEATURES))
    refused(fe, Request.SET_VRING_NUM, _state(0, 128))
    table = pack_memory_table([MemoryRegion(0, MIB, 0x7000_0000, 0)])
    pipe_closed_by_daemon(lambda fds: refused(fe, Request.SET_MEM_TABLE, table, fds))
    pipe_closed_by_daemon(lambda fds: refused(fe, Request.SET_VRING_KICK, U64.pack(0), fds))
    # The same connection then comes up normally.
    fe.set_owner()
    fe.set_features(fe.features & (Feature.VERSION_1 | F_PROTOCOL_FEATURES | Feature.EVENT_IDX))
    fe.memory = GuestMemory(16 * MIB)
    fe.set_mem_table()
    fe.add_queue(0)
    fe.add_queue(1)
    conn.still_serves()


def test_fds_on_requests_that_take_none_are_refused_and_closed(connect) -> None:
    conn = connect()
    fe = conn.fe
    pipe_closed_by_daemon(lambda fds: refused(fe, Request.SET_VRING_NUM, _state(1, 128), fds))
    pipe_closed_by_daemon(lambda fds: refused(fe, Request.SET_STATUS, U64.pack(0), fds))
    # Two fds where one is allowed; an fd together with the invalid-FD flag.
    pipe_closed_by_daemon(lambda fds: refused(fe, Request.SET_VRING_CALL, U64.pack(1), fds), 2)
    pipe_closed_by_daemon(lambda fds: refused(fe, Request.SET_VRING_ERR,
                                              U64.pack(1 | VRING_NOFD_MASK), fds))
    # Unknown request carrying fds.
    pipe_closed_by_daemon(lambda fds: refused(fe, 77, b"", fds), 3)
    # A well-formed SET_VRING_ERR keeps its fd; replacing it releases the old one.
    pipe_closed_by_daemon(lambda fds: (fe.send(Request.SET_VRING_ERR, U64.pack(1), fds),
                                       fe.send(Request.SET_VRING_ERR,
                                               U64.pack(1 | VRING_NOFD_MASK))))
    conn.still_serves()


def test_bad_memory_tables_are_refused(connect) -> None:
    conn = connect(mem_size=16 * MIB)
    fe = conn.fe
    conn.fuse()
    base = fe.memory.regions[0]
    top = base.end
    fd = _memfd(2 * MIB)
    small = _memfd(4096)
    try:
        cases = {
            "guest ranges overlap": [MemoryRegion(top, MIB, 1 << 44, 0),
                                     MemoryRegion(top + MIB // 2, MIB, 1 << 45, 0)],
            "user ranges overlap": [MemoryRegion(top, MIB, 1 << 44, 0),
                                    MemoryRegion(top + 4 * MIB, MIB, (1 << 44) + 4096, 0)],
            "guest range wraps": [MemoryRegion((1 << 64) - MIB // 2, MIB, 1 << 44, 0)],
            "user range wraps": [MemoryRegion(top, MIB, (1 << 64) - 4096, 0)],
            "offset wraps": [MemoryRegion(top, MIB, 1 << 44, (1 << 64) - 4096)],
            "empty region": [MemoryRegion(top, 0, 1 << 44, 0)],
            "fd smaller than the region": [MemoryRegion(top, MIB, 1 << 44, 0)],
            "offset past the end of the fd": [MemoryRegion(top, MIB, 1 << 44, 2 * MIB)],
        }
        for what, regions in cases.items():
            use = small if what == "fd smaller than the region" else fd
            table = pack_memory_table([base.describe(), *regions])
            try:
                refused(fe, Request.SET_MEM_TABLE, table, [base.fd] + [use] * len(regions))
            except AssertionError as e:
                raise AssertionError(f"SET_MEM_TABLE {what}: {e}") from None
            conn.still_serves()
            if len(regions) == 1:
                try:
                    refused(fe, Request.ADD_MEM_REG, pack_single_region(regions[0]), [use])
                except AssertionError as e:
                    raise AssertionError(f"ADD_MEM_REG {what}: {e}") from None
                conn.still_serves()
        # Overlapping the region already there.
        refused(fe, Request.ADD_MEM_REG,
                pack_single_region(MemoryRegion(base.gpa + MIB, MIB, 1 << 44, 0)), [fd])
        refused(fe, Request.ADD_MEM_REG,
                pack_single_region(MemoryRegion(top, MIB, base.uaddr + 4096, 0)), [fd])
        # More regions than fds, more fds than regions, too many regions.
        two = pack_memory_table([base.describe(), MemoryRegion(top, MIB, 1 << 44, 0)])
        refused(fe, Request.SET_MEM_TABLE, two, [base.fd])
        refused(fe, Request.SET_MEM_TABLE, pack_memory_table([base.describe()]),
                [base.fd, fd])
        nine = [MemoryRegion(top + i * MIB, MIB // 2, (1 << 44) + i * MIB, 0) for i in range(9)]
        refused(fe, Request.SET_MEM_TABLE, pack_memory_table(nine), [fd] * 8)
        refused(fe, Request.SET_MEM_TABLE, struct.pack("=I4x", 2) + base.describe().pack(),
                [base.fd])
        # fds that cannot be mapped shared and writable: a pipe, a read-only file.
        r, w = os.pipe()
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            for bad_fd in (r, ro):
                refused(fe, Request.ADD_MEM_REG,
                        pack_single_region(MemoryRegion(top, MIB, 1 << 44, 0)), [bad_fd])
                conn.still_serves()
        finally:
            for x in (r, w, ro):
                os.close(x)
        # ADD_MEM_REG without its fd.
        refused(fe, Request.ADD_MEM_REG,
                pack_single_region(MemoryRegion(top, MIB, 1 << 44, 0)))
    finally:
        os.close(fd)
        os.close(small)
    conn.still_serves()
    assert "SIGBUS" not in conn.daemon.text


def test_set_vring_kick_before_addresses_is_refused(connect) -> None:
    conn = connect(negotiate=False)
    fe = conn.fe
    fe.negotiate()
    fe.memory = GuestMemory(16 * MIB)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        # No memory, size or address yet.
        refused(fe, Request.SET_VRING_KICK, U64.pack(1), [kick])
        fe.set_mem_table()
        fe.set_vring_num(1, 128)
        refused(fe, Request.SET_VRING_KICK, U64.pack(1), [kick])
        refused(fe, Request.SET_VRING_KICK, U64.pack(1 | VRING_NOFD_MASK))
    finally:
        os.close(kick)
    fe.add_queue(0)
    fe.add_queue(1)
    conn.still_serves()


def test_without_reply_ack_a_refusal_is_logged_and_the_connection_kept(connect) -> None:
    conn = connect(reply_ack=False)
    fe = conn.fe
    fe.send(Request.SET_VRING_NUM, _state(5, 128))
    fe.send(99, b"junk")
    conn.still_serves()
    assert "SET_VRING_NUM refused" in conn.daemon.text
    assert "request 99 refused" in conn.daemon.text


# --- bad input: the connection ends cleanly -----------------------------------------------


def _raw(request: int, flags: int, size: int, payload: bytes = b"") -> bytes:
    return Header(request, flags, size).pack() + payload


def _named(request: int) -> str:
    """How the daemon's log names a request it could not even frame."""
    return f"request {int(request)}:"


_BAD_HEADERS = {
    "version 0": _raw(Request.GET_FEATURES, 0, 0),
    "version 2": _raw(Request.GET_FEATURES, 2, 0),
    "version 3": _raw(Request.SET_OWNER, 3 | HeaderFlag.NEED_REPLY, 0),
    "reserved flag bit": _raw(Request.GET_FEATURES, VERSION | 0x10, 0),
    "high flag bit": _raw(Request.SET_STATUS, VERSION | 1 << 31, 8, bytes(8)),
    "reply bit on a request": _raw(Request.GET_FEATURES, VERSION | HeaderFlag.REPLY, 0),
    "payload larger than 4096": _raw(Request.SET_MEM_TABLE, VERSION, 4097, bytes(4097)),
    "huge payload size": _raw(Request.SET_FEATURES, VERSION, 0xFFFF_FFFF, bytes(64)),
}


@pytest.mark.parametrize("what", sorted(_BAD_HEADERS))
def test_bad_headers_end_the_connection(connect, what: str) -> None:
    conn = connect()
    conn.fuse().getattr(ROOT)
    data = _BAD_HEADERS[what]
    conn.fe.send_raw(data)
    with pytest.raises(DaemonGone):
        conn.fe.get_features()
    conn.assert_clean_exit(_named(Header.unpack(data[:12]).request), "invalid header")


def test_too_many_fds_end_the_connection_and_are_closed(connect) -> None:
    conn = connect()
    fe = conn.fe
    pipe_closed_by_daemon(
        lambda fds: fe.send_raw(_raw(Request.SET_VRING_CALL, VERSION, 8, U64.pack(1)), fds), 40)
    with pytest.raises(DaemonGone):
        fe.get_features()
    conn.assert_clean_exit(_named(Request.SET_VRING_CALL), "file descriptors")


def test_eof_inside_a_payload(connect) -> None:
    conn = connect()
    conn.fe.send_raw(_raw(Request.SET_MEM_TABLE, VERSION, 200, bytes(50)))
    conn.fe.sock.shutdown(2)
    conn.assert_clean_exit(_named(Request.SET_MEM_TABLE), "inside payload")


def test_eof_inside_a_header(connect) -> None:
    conn = connect()
    conn.fe.send_raw(_raw(Request.GET_FEATURES, VERSION, 0)[:7])
    conn.fe.sock.shutdown(2)
    conn.assert_clean_exit("inside a message header")


def test_refused_request_with_a_reply_and_no_ack_ends_the_connection(connect) -> None:
    conn = connect(reply_ack=False)
    # GET_VRING_BASE of a ring that does not exist: there is no reply to give.
    conn.fe.send(Request.GET_VRING_BASE, _state(9, 0), reply=False)
    with pytest.raises(DaemonGone):
        conn.fe.recv_message()
    conn.assert_clean_exit("GET_VRING_BASE")


def test_disconnect_exits_0_and_reaps_every_child(connect) -> None:
    conn = connect("--request-queues=3", queues=4)
    assert len(conn.kids) == 6                 # spawner, its standby, 4 workers
    conn.still_serves()
    conn.fe.close()
    assert conn.daemon.proc.wait(timeout=20) == 0
    conn.daemon.wait_for("front-end disconnected")
    for pid in conn.kids:
        assert not os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(conn.daemon.socket)


# --- malformed descriptor chains -----------------------------------------------------------


def _chain(vq: DriverQueue, descs: list[tuple[int, int, int]]) -> tuple[int, list[int]]:
    """Write descs [(addr, len, flags)] linked by NEXT in order; returns (head, indices)."""
    idx = [vq.alloc_desc() for _ in descs]
    for i, (addr, n, flags) in enumerate(descs):
        nxt = idx[i + 1] if i + 1 < len(descs) else 0
        vq.write_desc(idx[i], addr, n, flags | (_NEXT if i + 1 < len(descs) else 0), nxt)
    return idx[0], idx


def _table(vq: DriverQueue, descs: list[tuple[int, int, int, int]]) -> int:
    """An indirect table of (addr, len, flags, next) in guest memory; returns its address."""
    gpa = vq.mem.alloc(16 * len(descs), 16)
    for i, d in enumerate(descs):
        vq.mem.write(gpa + 16 * i, struct.pack("<QIHH", *d))
    return gpa


def _expect_len0(vq: DriverQueue, head: int, descs: list[int], allocs=()) -> None:
    token = vq.publish(head, descs=descs, allocs=allocs)
    assert vq.wait(token).used_len == 0


@pytest.fixture
def two_queues(connect) -> Conn:
    conn = connect("--request-queues=2", queues=3, regions=2, mem_size=16 * MIB)
    conn.fuse(queue=1)
    return conn


def test_malformed_chains_complete_with_length_0(two_queues: Conn) -> None:
    conn = two_queues
    fe = conn.fe
    vq = fe.queue(2)
    mem = fe.memory
    good = mem.alloc(4096)
    end = mem.regions[-1].end
    # A loop: a -> b -> a.
    a, b = vq.alloc_desc(), vq.alloc_desc()
    vq.write_desc(a, good, 64, _NEXT, b)
    vq.write_desc(b, good + 64, 64, _NEXT, a)
    _expect_len0(vq, a, [a, b])
    # A self-loop on a writable descriptor.
    a = vq.alloc_desc()
    vq.write_desc(a, good, 64, _WRITE | _NEXT, a)
    _expect_len0(vq, a, [a])
    # Buffers outside guest memory, or running past its end.
    for addr, n in ((1 << 40, 64), (end - 10, 100), ((1 << 64) - 8, 64), (end, 1)):
        head, idx = _chain(vq, [(good, 40, 0), (addr, n, _WRITE)])
        _expect_len0(vq, head, idx)
    # next beyond the queue.
    a = vq.alloc_desc()
    vq.write_desc(a, good, 64, _NEXT, vq.size + 3)
    _expect_len0(vq, a, [a])
    # A readable descriptor after a writable one.
    head, idx = _chain(vq, [(good, 40, 0), (good + 64, 16, _WRITE), (good + 128, 8, 0)])
    _expect_len0(vq, head, idx)
    # Indirect: nested, with NEXT, bad lengths, outside memory, looping inside the table.
    inner = _table(vq, [(good, 40, 0, 0)])
    nested = _table(vq, [(good, 40, 0, 0)])
    vq.mem.write(nested, struct.pack("<QIHH", inner, 16, _INDIRECT, 0))
    loop = _table(vq, [(good, 40, _NEXT, 1), (good, 16, _WRITE | _NEXT, 0)])
    far = _table(vq, [(good, 40, _NEXT, 5), (good, 16, _WRITE, 0)])
    for addr, n, flags in ((nested, 16, _INDIRECT), (inner, 16, _INDIRECT | _NEXT),
                           (inner, 0, _INDIRECT), (inner, 24, _INDIRECT),
                           (1 << 40, 16, _INDIRECT), (loop, 32, _INDIRECT),
                           (far, 32, _INDIRECT)):
        h = vq.alloc_desc()
        vq.write_desc(h, addr, n, flags)
        try:
            _expect_len0(vq, h, [h])
        except AssertionError:
            raise AssertionError(f"indirect desc {addr:#x} len {n} flags {flags}") from None
    # Through all this the queue, the other request queue and hiprio keep working.
    c2 = FuseClient(fe, queue=2)
    assert c2.getattr(ROOT).attr.ino > 0
    conn.still_serves()
    assert "malformed descriptor chain" in conn.daemon.text


def test_indirect_chain_without_the_feature_is_refused(connect) -> None:
    conn = connect(indirect=False)
    fe = conn.fe
    c = conn.fuse()
    vq = fe.queue(1)
    _unique, readable = c.build(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0))
    body = b"".join(readable)
    buf = fe.memory.alloc(len(body) + 200)
    fe.memory.write(buf, body)
    table = _table(vq, [(buf, len(body), _NEXT, 1), (buf + 128, 16 + 104, _WRITE, 0)])
    h = vq.alloc_desc()
    vq.write_desc(h, table, 32, _INDIRECT)
    _expect_len0(vq, h, [h], [buf, table])
    conn.still_serves()


def test_chains_whose_buffers_hold_garbage(two_queues: Conn) -> None:
    conn = two_queues
    vq = conn.fe.queue(2)
    # No readable part, a header too short, a writable part too short for any reply, random
    # bytes: every one completes, none wedges the queue.
    junk = hashlib.sha512(b"junk").digest() * 5
    for readable, writable in (((), (64,)), ((b"\1" * 10,), (64,)), ((junk[:40],), (8,)),
                               ((junk[:300],), (300,)), ((junk[7:47],), ())):
        done = vq.request(list(readable), list(writable))
        assert done.used_len <= sum(writable)
    conn.still_serves()


def test_a_broken_avail_ring_stops_only_its_queue(two_queues: Conn) -> None:
    conn = two_queues
    fe = conn.fe
    c2 = FuseClient(fe, queue=2)
    for _ in range(3):
        c2.getattr(ROOT)
    vq = fe.queue(2)
    # A head index beyond the queue: the ring is unusable and queue 2 stops...
    bogus = vq.size + 7
    vq.publish(bogus)
    conn.daemon.wait_for("ring is broken")
    conn.still_serves()
    # ...and reports where it stopped.
    assert fe.get_vring_base(2) == 3
    # The avail index jumping by more than the queue size is the same kind of fault.
    q1 = fe.queue(1)
    c1 = conn.fuse()
    c1.getattr(ROOT)
    q1.write_avail_idx(q1.avail_idx + q1.size + 1)
    q1.kick(force=True)
    conn.daemon.wait_for("ahead of")
    q1.write_avail_idx(q1.avail_idx)
    assert fe.get_vring_base(1) == q1.avail_idx
    fe.start_queue(1)
    assert c1.getattr(ROOT).attr.ino > 0
    assert conn.daemon.proc.poll() is None


def test_kick_without_fd_is_refused_not_left_hanging(connect) -> None:
    """The invalid-FD flag on SET_VRING_KICK asks for polling, which the workers do not do:
    the request is refused at once instead of leaving the ring's requests unanswered."""
    conn = connect()
    fe = conn.fe
    index = 1
    fe.get_vring_base(index)                 # stop the ring, then try to restart it polled
    refused(fe, Request.SET_VRING_KICK, U64.pack(index | VRING_NOFD_MASK))
    assert "polling without a kick fd is not supported" in conn.daemon.text
    fe.start_queue(index)
    conn.still_serves()
