"""Found by tests/test_fuzz_control.py: an empty datagram from a live worker.

On a SOCK_SEQPACKET channel an empty datagram reads like end-of-file.  The supervisor took it
for the worker's death and went on without killing it, so a worker that answered with an empty
message stayed alive and unanswered.  It is a malformed answer: that worker is killed.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess

import pytest

from pyvirtiofsd.common.control import RingStop
from pyvirtiofsd.supervisor.procs import ProcessTable, WorkerGone, WorkerHandle


def test_an_empty_answer_kills_the_worker() -> None:
    sleeper = subprocess.Popen(["sleep", "600"])
    table = ProcessTable(1, lambda q, ch: None)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    handle = WorkerHandle(0, sleeper.pid, ours, os.pidfd_open(sleeper.pid))
    table.workers[0] = handle
    try:
        theirs.send(b"")
        with pytest.raises(WorkerGone):
            table.request(0, lambda seq: RingStop(seq=seq))
        assert select.select([handle.pidfd], [], [], 10)[0], "the worker was not killed"
        assert sleeper.wait(10) == -9
    finally:
        theirs.close()
        handle.close()
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
