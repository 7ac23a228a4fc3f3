"""Stopping, pausing and changing memory under a ring that is busy.

GET_VRING_BASE must stop a ring only once every request taken from it is completed, and answer
the exact index to resume from; SET_VRING_ENABLE 0 must stop processing the same way; a memory
table change swaps under running workers without losing or repeating a request (protocol.md
1.7, 1.8).  Each test puts a batch of CREATEs in flight -- each leaves a file, so what was
executed can be counted on the host -- and interrupts the worker while it serves the batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from tests.conftest import DATA_PLANES
from tests.frontend import Frontend, FuseClient

# Pausing at a request boundary and resuming exactly, on both data planes.
pytestmark = pytest.mark.data_planes(*DATA_PLANES)

ROOT = fa.ROOT_ID
BATCH = 120


@pytest.fixture
def conn(daemon_factory) -> Iterator[tuple[Frontend, FuseClient, Path]]:
    d = daemon_factory()
    fe = Frontend.connect(d.socket, process=d.proc, queues=2, queue_size=256)
    c = FuseClient(fe)
    c.init()
    yield fe, c, d.share
    alive = d.proc.poll() is None
    fe.close()
    assert alive, d.text
    assert "Traceback" not in d.text, d.text


def submit_batch(c: FuseClient, prefix: str = "f") -> list[int]:
    tokens = []
    for i in range(BATCH):
        body = fa.CREATE_IN.pack(os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, 0, 0) \
            + f"{prefix}{i:03}".encode() + b"\0"
        tokens.append(c.submit(fa.Opcode.CREATE, ROOT, body, kick=False, indirect=True))
    c.vq.kick(force=True)
    return tokens


def created(share: Path) -> list[str]:
    return sorted(os.listdir(share))


def finish(c: FuseClient, tokens: list[int]) -> None:
    for t in tokens:
        reply = c.result(t)
        assert reply.error == 0, os.strerror(reply.error)
        entry = fa.EntryOut.unpack(reply.body)
        c.release(entry.nodeid, fa.OpenOut.unpack(reply.body, fa.ENTRY_OUT.size).fh)
        c.forget(entry.nodeid, 1)


def test_get_vring_base_inside_a_batch_is_exact(conn) -> None:
    fe, c, share = conn
    vq = fe.queue(1)
    start = vq.avail_idx
    tokens = submit_batch(c)
    base = fe.get_vring_base(1)
    # Every request before `base` is complete and none after it was touched: the used index
    # is `base` and exactly that many files exist.
    assert vq.used_idx() == base
    done = (base - start) & 0xFFFF
    assert created(share) == [f"f{i:03}" for i in range(done)]
    fe.start_queue(1, base=base)
    finish(c, tokens)
    assert created(share) == [f"f{i:03}" for i in range(BATCH)]
    assert vq.used_idx() == vq.avail_idx and not vq.inflight


def test_disable_inside_a_batch_pauses_at_a_request_boundary(conn) -> None:
    fe, c, share = conn
    vq = fe.queue(1)
    start = vq.avail_idx
    tokens = submit_batch(c)
    fe.set_vring_enable(1, False)           # acked once the worker stopped processing
    paused_at = vq.used_idx()
    done = (paused_at - start) & 0xFFFF
    assert created(share) == [f"f{i:03}" for i in range(done)]
    vq.poll()                               # harvest what completed before the pause
    vq.expect_no_completion(0.3)
    assert vq.used_idx() == paused_at and len(created(share)) == done
    fe.set_vring_enable(1, True)
    finish(c, tokens)
    assert created(share) == [f"f{i:03}" for i in range(BATCH)]


def test_memory_hot_plug_inside_a_batch(conn) -> None:
    fe, c, share = conn
    tokens = submit_batch(c)
    region = fe.add_mem_region(1 << 20)
    finish(c, tokens)
    assert created(share) == [f"f{i:03}" for i in range(BATCH)]
    # Requests now use buffers in the new region too, then it goes away again.
    (share / "f000").write_bytes(b"hot-plugged")
    node = c.lookup(ROOT, "f000").nodeid
    fh = c.open(node, os.O_RDONLY).fh
    gpa = fe.memory.alloc_at(region.gpa, 4096)
    fe.memory.free(gpa)
    assert c.read(node, fh, 0, 64) == b"hot-plugged"
    c.release(node, fh)
    c.forget(node, 1)
    more = submit_batch(c, "g")
    fe.set_mem_table()                       # the whole table again, while serving
    finish(c, more)
    assert len(created(share)) == 2 * BATCH


def test_stop_restart_cycles_keep_every_request_once(conn) -> None:
    fe, c, share = conn
    vq = fe.queue(1)
    tokens = submit_batch(c)
    for _ in range(5):
        base = fe.get_vring_base(1)
        assert vq.used_idx() == base
        fe.start_queue(1, base=base)
    finish(c, tokens)
    assert created(share) == [f"f{i:03}" for i in range(BATCH)]
