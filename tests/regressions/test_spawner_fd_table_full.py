"""Found by the 5-minute soak (bench/soak.py): a full shared fd table left a queue without a
worker for good.

With the fd table every worker shares at its limit, the spawner could not receive the control
channel of a worker it was asked to start (the kernel truncates the SCM_RIGHTS).  It logged and
ignored the request; the supervisor waited ten seconds for an answer, gave up, and never tried
again -- the queue stayed without a worker and the guest hung.  Now the spawner answers FAILED
at once, and a start that failed for want of a free fd is not the worker's fault: it is retried
every RESOURCE_RETRY seconds without counting towards failing the queue, so the queue is served
again as soon as fds are free, with no ring restart.
"""

from __future__ import annotations

import os
import resource
import signal

from pyvirtiofsd.common import fuse_abi as fa
from tests.frontend import Frontend, FuseClient
from tests.test_recovery import children


def test_a_full_fd_table_delays_the_worker_until_fds_are_free(daemon_factory) -> None:
    d = daemon_factory()
    with Frontend.connect(d.socket, process=d.proc, queues=2) as fe:
        c = FuseClient(fe)
        c.init()
        c.getattr(fa.ROOT_ID)
        kids = {n: p for p, n in children(d.proc.pid).items()}
        spawner = kids["pyvfs-spawner"]
        limits = resource.prlimit(spawner, resource.RLIMIT_NOFILE)
        # The lowest free number: with the limit there, no fd can be had (the table may have
        # holes higher up, which a limit at the count of open fds would leave free).
        used = {int(n) for n in os.listdir(f"/proc/{spawner}/fd")}
        lowest_free = min(set(range(len(used) + 1)) - used)
        resource.prlimit(spawner, resource.RLIMIT_NOFILE, (lowest_free, limits[1]))
        try:
            os.kill(kids["pyvfs-q1"], signal.SIGKILL)
            d.wait_for("could not start the worker")
            # Retried, never counted as a failed start: more often than the five failed
            # starts that fail a queue, and the queue is not failed.
            d.wait_count("trying again in", 6)
            assert "queue 1 is failed" not in d.text, d.text
        finally:
            resource.prlimit(spawner, resource.RLIMIT_NOFILE, limits)
        # Room again: the next retry starts a worker, which serves the same ring.
        d.wait_status(lambda doc: all(p["state"] == "serving" for p in doc["processes"]
                                      if p["role"] == "worker"), timeout=30)
        c.getattr(fa.ROOT_ID)
    assert "Traceback" not in d.text, d.text
