"""A ring the guest broke: the queue stops, the front-end is told, the rest keeps serving.

When the avail index moves by more than the queue size (virtio spec 2.7.13.3) or names a head
outside the ring, the device cannot tell which requests are real: it stops that ring and
signals the ring's error notifier (vhost-user SET_VRING_ERR), the vhost-user way to report that
the device needs a reset.  GET_VRING_BASE still answers where the ring stopped.
"""

from __future__ import annotations

import os
import select

from pyvirtiofsd.common import fuse_abi as fa
from tests.frontend import Frontend, FuseClient


def test_a_broken_ring_signals_its_error_notifier(daemon_factory) -> None:
    d = daemon_factory("--request-queues=2")
    with Frontend.connect(d.socket, process=d.proc, queues=3) as fe:
        c = FuseClient(fe)
        c.init()
        c.getattr(fa.ROOT_ID)
        err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            vq = fe.queue(1)
            fe.set_vring_err(1, err)
            base = fe.get_vring_base(1)
            fe.start_queue(1, base=base)
            vq.write_avail_idx(vq.avail_idx + vq.size + 5)
            vq.kick(force=True)
            assert select.select([err], [], [], 10)[0], "no error notification"
            assert os.eventfd_read(err) == 1
        finally:
            os.close(err)
        d.wait_for("ring is broken")
        # The index it stopped at is the one before the jump; the other queue still serves.
        assert fe.get_vring_base(1) == base
        assert FuseClient(fe, queue=2).getattr(fa.ROOT_ID).attr.ino == os.stat(d.share).st_ino
