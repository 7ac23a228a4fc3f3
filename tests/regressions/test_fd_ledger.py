"""Found by the real-guest kill test (tests/test_guest.py): a respawned worker closed an fd of
another queue's worker.

A worker that got its call eventfd with its ring (a respawned worker, or a front-end that sets
the call fd before the kick, as QEMU does) recorded it twice in its fd ledger
(common/journal.py).  Replacing the call fd dropped one record; the stale one named a number the
shared fd table later gave to another queue's notifier.  When the worker was killed, its
successor closed "its" recorded fds -- among them the other queue's kick fd -- and that queue
stopped hearing its guest: the guest hung.
"""

from __future__ import annotations

import os
import signal

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.journal import Journal
from tests.conftest import Daemon
from tests.frontend import Frontend, FuseClient
from tests.test_recovery import children


def eventfds(pid: int) -> set[int]:
    """The eventfds (kick and call notifiers) in the fd table the workers share."""
    base = f"/proc/{pid}/fd"
    return {int(n) for n in os.listdir(base) if "eventfd" in os.readlink(f"{base}/{n}")}


def kill(d: Daemon, fe: Frontend, name: str) -> None:
    pid = next(p for p, n in children(d.proc.pid).items() if n == name)
    os.kill(pid, signal.SIGKILL)
    d.wait_for(f"(pid {pid}) was killed by SIGKILL")
    fe.get_features()     # answered once the successor is up, with its memory and ring


def test_an_fd_recorded_twice_is_one_record() -> None:
    jq = Journal.create(1, 4).queue(0)
    jq.own_fd(7)
    jq.own_fd(7)
    jq.disown_fd(7)
    assert jq.owned_fds() == []


def test_killing_a_worker_after_a_call_fd_change_leaves_other_queues_alone(daemon_factory):
    d = daemon_factory("--request-queues=2")
    with Frontend.connect(d.socket, process=d.proc, queues=3) as fe:
        c1 = FuseClient(fe, queue=1)
        c2 = FuseClient(fe, queue=2)
        c1.init()
        spawner = next(p for p, n in children(d.proc.pid).items() if n == "pyvfs-spawner")
        # A successor gets kick and call together with its ring.
        kill(d, fe, "pyvfs-q1")
        c1.getattr(fa.ROOT_ID)
        # A new call fd for ring 1: the old one is closed and its number freed ...
        vq = fe.queue(1)
        old = vq.call_fd
        vq._poll.unregister(old)
        vq.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vq._poll.register(vq.call_fd)
        fe.set_vring_call(1, vq.call_fd)
        os.close(old)
        c1.getattr(fa.ROOT_ID)
        # ... and ring 2 restarts, so its worker receives new notifiers under freed numbers.
        fe.start_queue(2, base=fe.get_vring_base(2))
        notifiers = eventfds(spawner)
        q2 = next(p for p, n in children(d.proc.pid).items() if n == "pyvfs-q2")
        kill(d, fe, "pyvfs-q1")
        # The successor closed its predecessor's kick and call and got new ones, nothing else.
        assert len(eventfds(spawner)) == len(notifiers)
        for _ in range(3):
            c2.call(fa.Opcode.GETATTR, fa.ROOT_ID, fa.GETATTR_IN.pack(0, 0), timeout=3)
        c1.getattr(fa.ROOT_ID)
        assert next(p for p, n in children(d.proc.pid).items() if n == "pyvfs-q2") == q2
    assert "Bad file descriptor" not in d.text, d.text
    assert "Traceback" not in d.text, d.text
