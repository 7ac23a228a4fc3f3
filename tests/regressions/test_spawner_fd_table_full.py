"""Found by the 5-minute soak (bench/soak.py): a full shared fd table left a queue without a
worker for good.

With the fd table every worker shares at its limit, the spawner could not receive the control
channel of a worker it was asked to start (the kernel truncates the SCM_RIGHTS).  It logged and
ignored the request; the supervisor waited ten seconds for an answer, gave up, and never tried
again -- the queue stayed without a worker and the guest hung.  Now the spawner answers FAILED
at once, and a start that fails that way is a failed boot like any other: retried after a
growing delay, then the queue is failed with an error notification, and a ring restart tries
again.
"""

from __future__ import annotations

import os
import resource
import signal

from pyvirtiofsd.common import fuse_abi as fa
from tests.frontend import Frontend, FuseClient
from tests.test_recovery import children


def test_a_full_fd_table_fails_the_queue_instead_of_hanging_it(daemon_factory) -> None:
    d = daemon_factory()
    with Frontend.connect(d.socket, process=d.proc, queues=2) as fe:
        c = FuseClient(fe)
        c.init()
        c.getattr(fa.ROOT_ID)
        kids = {n: p for p, n in children(d.proc.pid).items()}
        spawner = kids["pyvfs-spawner"]
        limits = resource.prlimit(spawner, resource.RLIMIT_NOFILE)
        used = len(os.listdir(f"/proc/{spawner}/fd"))
        resource.prlimit(spawner, resource.RLIMIT_NOFILE, (used, limits[1]))
        try:
            os.kill(kids["pyvfs-q1"], signal.SIGKILL)
            line = d.wait_for("queue 1 is failed")
            assert "died 5 times" in line or "times in a row" in line, line
            assert "could not start the worker" in d.text
        finally:
            resource.prlimit(spawner, resource.RLIMIT_NOFILE, limits)
        # Room again: restarting the ring starts a worker, which serves.
        fe.start_queue(1, base=fe.get_vring_base(1))
        c.getattr(fa.ROOT_ID)
    assert "Traceback" not in d.text, d.text
