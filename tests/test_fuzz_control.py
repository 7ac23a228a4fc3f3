"""Fuzzing the control channel: whatever a (compromised) worker sends back to the supervisor.

The channel's decoder may only answer with a message or ProtocolError, and closes every fd
that came with a malformed message.  The supervisor side (ProcessTable.request) treats a
malformed or unexpected answer by killing that worker -- and only that worker -- and telling
its caller the worker is gone; it never raises anything else and keeps no fd it was sent.
Budgets: tests/fuzzing.py.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirtiofsd.common import control
from pyvirtiofsd.common.control import MsgType
from pyvirtiofsd.supervisor import procs as procs_module
from pyvirtiofsd.supervisor.procs import ProcessTable, WorkerGone, WorkerHandle
from tests.fuzzing import budget

ALL_TYPES = [int(t) for t in MsgType]


@st.composite
def datagrams(draw, seq: int | None = None):
    """A control datagram: random bytes, or a header of a real type with a mangled body."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    mtype = draw(st.one_of(st.sampled_from(ALL_TYPES), st.integers(0, 0xFFFF)))
    s = seq if seq is not None and draw(st.booleans()) else draw(st.integers(0, 0xFFFFFFFF))
    body = draw(st.one_of(st.binary(max_size=64),
                          st.sampled_from([b"", b"\0" * 4, b"\0" * 8, b"\0" * 32, b"\xff" * 4])))
    return control.HEADER.pack(mtype, s) + body


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _pipes(n: int) -> list[int]:
    """`n` fresh fds (read ends of pipes whose write ends are closed)."""
    fds = []
    for _ in range(n):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    return fds


@budget(2000)
@given(datagrams(), st.integers(0, 5), st.sampled_from([control.TO_WORKER, control.FROM_WORKER,
                                                        control.TO_SPAWNER,
                                                        control.FROM_SPAWNER]))
def test_decode_only_accepts_or_refuses_and_closes(data: bytes, nfds: int, allowed) -> None:
    before = _open_fds()
    fds = _pipes(nfds)
    try:
        msg = control.decode(data, list(fds), allowed)
    except control.ProtocolError:
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
        assert not _open_fds() - before
        return
    assert msg.type in allowed
    assert list(msg.fds) == fds
    # What was accepted is a typed message that packs back to what it read.
    assert control.decode(msg.pack(), list(msg.fds), allowed) == msg
    control.close_fds(msg.fds)
    assert _open_fds() - before == set()


@pytest.fixture
def table(monkeypatch):
    """A ProcessTable whose queue 0 'worker' is a sleeping process the test answers for."""
    # Stale answers make the supervisor wait for the right one; do not wait 10 s for it.
    monkeypatch.setattr(procs_module, "ANSWER_TIMEOUT", 0.2)
    procs = []
    t = ProcessTable(1, lambda q, ch: None)

    def worker() -> socket.socket:
        p = subprocess.Popen(["sleep", "600"])
        procs.append(p)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        t.workers[0] = WorkerHandle(0, p.pid, ours, os.pidfd_open(p.pid))
        return theirs

    yield t, worker, procs
    for h in t.workers.values():
        h.close()
    for p in procs:
        p.kill()
        p.wait()


@budget(300)
@given(st.lists(datagrams(seq=1), min_size=1, max_size=3), st.integers(0, 3))
def test_a_worker_answering_garbage_is_killed_alone(table, answers: list[bytes],
                                                    nfds: int) -> None:
    t, worker, procs = table
    theirs = worker()
    handle = t.workers[0]
    before = _open_fds()
    try:
        for i, data in enumerate(answers):
            fds = _pipes(nfds) if i == 0 else []
            try:
                control.send_bytes(theirs, data, fds)
            finally:
                control.close_fds(fds)
        try:
            answer = t.request(0, lambda seq: control.RingStop(seq=seq))
        except WorkerGone:
            # Malformed (or no) answer: the worker was killed; nobody else was touched.
            assert select.select([handle.pidfd], [], [], 10)[0], "worker not killed"
            procs[-1].wait(10)
        except OSError as e:
            # A well-formed FAILED answer is the worker refusing the request: not a kill.
            assert e.errno is not None
            assert procs[-1].poll() is None
        else:
            assert answer.type in control.FROM_WORKER and answer.seq == handle.seq
            assert procs[-1].poll() is None
        # Whatever came with the answers was closed (the pipes' other ends were ours).
        leaked = _open_fds() - before
        assert not leaked, leaked
    finally:
        theirs.close()
        h = t.workers.pop(0)
        h.close()
