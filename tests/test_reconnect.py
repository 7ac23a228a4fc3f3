"""--reconnect: the front-end goes away and comes back; the guest's nodeids and handles live on.

Each connection is a fresh vhost-user session (protocol.md 1.14): features, memory and rings are
set up again, in any order the protocol allows, while the FUSE session, the inode table and the
open handles stay.  Without --reconnect the daemon exits at the first disconnect, as virtiofsd
does (tests/test_daemon_vhost.py checks that).
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from tests.conftest import DATA_PLANES, Daemon
from tests.frontend import DriverQueue, Frontend, FuseClient, GuestMemory, connect_unix
from tests.proctree import children, fd_count

# A new front-end keeps the filesystem state, on both data planes.
pytestmark = pytest.mark.data_planes(*DATA_PLANES)

ROOT = fa.ROOT_ID
MIB = 1 << 20


@pytest.fixture
def daemon(daemon_factory) -> Iterator[Daemon]:
    d = daemon_factory("--reconnect", "--request-queues=2")
    yield d
    assert d.proc.poll() is None, "the daemon exited:\n" + d.text
    assert "Traceback" not in d.text, d.text


def spawner(d: Daemon) -> int:
    return next(p for p, n in children(d.proc.pid).items() if n == "pyvfs-spawner")


# --- ways a front-end may bring the device up (protocol.md 1.7, 1.8) -------------------------


def bring_up_qemu(path: str, d: Daemon) -> Frontend:
    return Frontend.connect(path, process=d.proc, queues=3)


def _bare(path: str, d: Daemon) -> Frontend:
    fe = Frontend(connect_unix(path, process=d.proc), process=d.proc)
    fe.negotiate()
    fe.memory = GuestMemory(16 * MIB)
    return fe


def _ring(fe: Frontend, i: int, what: str) -> None:
    q = fe.queues[i]
    mem = fe.memory
    if what == "num":
        fe.set_vring_num(i, q.size)
    elif what == "base":
        fe.set_vring_base(i, q.avail_idx)
    elif what == "addr":
        fe.set_vring_addr(i, mem.uaddr(q.desc_gpa), mem.uaddr(q.used_gpa), mem.uaddr(q.avail_gpa))
    elif what == "kick":
        fe.set_vring_kick(i, q.kick_fd)
        q.started = True
    elif what == "call":
        fe.set_vring_call(i, q.call_fd)
    elif what == "enable":
        fe.set_vring_enable(i, True)


def bring_up_rings_before_memory(path: str, d: Daemon) -> Frontend:
    """Ring sizes, bases, addresses, notifiers and enables first; the memory table; kicks."""
    fe = _bare(path, d)
    for i in range(3):
        fe.queues[i] = DriverQueue(fe, i, 128)
        for what in ("enable", "call", "num", "addr", "base"):
            _ring(fe, i, what)
    fe.set_mem_table()
    for i in range(3):
        _ring(fe, i, "kick")
    return fe


def bring_up_call_last(path: str, d: Daemon) -> Frontend:
    """Memory first, then per ring: base, address, size, kick, enable, and the call fd last."""
    fe = _bare(path, d)
    fe.set_mem_table()
    for i in range(3):
        fe.queues[i] = DriverQueue(fe, i, 128)
        for what in ("base", "addr", "num", "kick", "enable", "call"):
            _ring(fe, i, what)
    return fe


BRING_UP: dict[str, Callable[[str, Daemon], Frontend]] = {
    "qemu-order": bring_up_qemu,
    "rings-before-memory": bring_up_rings_before_memory,
    "call-fd-last": bring_up_call_last,
}


@pytest.mark.parametrize("order", sorted(BRING_UP))
def test_handles_and_nodeids_survive_a_new_front_end(daemon: Daemon, order: str) -> None:
    share = daemon.share
    (share / "data").write_bytes(b"0123456789")
    (share / "dir").mkdir()
    fe = Frontend.connect(daemon.socket, process=daemon.proc, queues=3)
    c = FuseClient(fe)
    c.init()
    node = c.lookup(ROOT, "data").nodeid
    fh = c.open(node, os.O_RDWR).fh
    dnode = c.lookup(ROOT, "dir").nodeid
    dfh = c.opendir(dnode).fh
    new = c.create(dnode, "made-before", 0o600)
    fe.close()
    daemon.wait_frontends_served(1)

    fe2 = BRING_UP[order](daemon.socket, daemon)
    try:
        # No INIT: the session goes on, with the nodeids and handles of the old connection.
        c2 = FuseClient(fe2)
        c3 = FuseClient(fe2, queue=2)
        assert c2.read(node, fh, 2, 4) == b"2345"
        assert c3.write(node, fh, 0, b"AB") == 2
        assert (share / "data").read_bytes() == b"AB23456789"
        assert c2.write(new[0].nodeid, new[1].fh, 0, b"kept") == 4
        assert (share / "dir" / "made-before").read_bytes() == b"kept"
        assert [e.name for e in c3.readdir_all(dnode, dfh) if e.name[0:1] != b"."] \
            == [b"made-before"]
        assert c2.getattr(dnode).attr.ino == (share / "dir").stat().st_ino
        for cl, (n, h) in ((c2, (node, fh)), (c3, (new[0].nodeid, new[1].fh))):
            cl.release(n, h)
        c2.releasedir(dnode, dfh)
        c2.forget(node, 1)
        c2.forget(new[0].nodeid, 1)
        c2.forget(dnode, 1)
    finally:
        fe2.close()


def test_requests_queued_across_a_reconnect_complete(daemon: Daemon) -> None:
    # The same guest (same memory, same rings) reconnects, as QEMU does after a back-end
    # restart: requests it queued while the ring was paused are served after the reconnect.
    (daemon.share / "f").write_bytes(b"queued read")
    fe = Frontend.connect(daemon.socket, process=daemon.proc, queues=3)
    c = FuseClient(fe)
    c.init()
    node = c.lookup(ROOT, "f").nodeid
    fh = c.open(node, os.O_RDONLY).fh
    fe.set_vring_enable(1, False)
    token = c.submit(fa.Opcode.READ, node, fa.ReadIn(fh, 0, 64).pack(), out_size=64)
    old = fe.sock
    new = connect_unix(daemon.socket, process=daemon.proc)
    for q in fe.queues.values():
        q._poll.unregister(old.fileno())
        q._poll.register(new.fileno(), select.POLLIN)
    old.close()
    fe.sock = new
    fe.timeout = fe.timeout
    fe.acked_protocol_features = 0      # a new session: no REPLY_ACK until negotiated again
    try:
        fe.negotiate()
        fe.set_mem_table()
        for i, q in fe.queues.items():
            # The ring stopped where its used index stands: nothing was in flight.
            fe.start_queue(i, base=q.used_idx())
        r = c.result(token)
        assert (r.error, r.body) == (0, b"queued read")
        c.release(node, fh)
        c.forget(node, 1)
    finally:
        fe.close()


def test_repeated_reconnects_leak_no_fd(daemon: Daemon) -> None:
    def cycle(n: int) -> None:
        fe = Frontend.connect(daemon.socket, process=daemon.proc, queues=3, mem_size=8 * MIB,
                              regions=2)
        c = FuseClient(fe)
        if n == 1:
            c.init()
        assert c.getattr(ROOT).attr.ino == daemon.share.stat().st_ino
        fe.add_mem_region(MIB)
        fe.close()
        daemon.wait_frontends_served(n)

    cycle(1)
    sup, table = fd_count(daemon.proc.pid), fd_count(spawner(daemon))
    for n in range(2, 7):
        cycle(n)
    assert fd_count(daemon.proc.pid) == sup
    assert fd_count(spawner(daemon)) == table
    # No guest memory stays mapped in the workers after the front-end left.
    for pid, name in children(daemon.proc.pid).items():
        if name.startswith("pyvfs-q"):
            with open(f"/proc/{pid}/maps") as f:
                assert "guest-ram" not in f.read(), name


def test_a_bad_connection_is_dropped_and_the_next_one_served(daemon: Daemon) -> None:
    s = connect_unix(daemon.socket, process=daemon.proc)
    s.sendall(b"\x01\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00")  # version 3: invalid
    assert s.recv(1) == b""
    s.close()
    daemon.wait_for("closing the vhost-user connection")
    fe = Frontend.connect(daemon.socket, process=daemon.proc, queues=3)
    c = FuseClient(fe)
    c.init()
    assert c.getattr(ROOT).attr.ino == Path(daemon.share).stat().st_ino
    fe.close()
