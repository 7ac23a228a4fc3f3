"""Availability under a hostile or slow guest: what the guest or a slow host can do to the
daemon must not stop it from serving (stalled log readers, fd exhaustion, requests stuck in a
host system call, a dead spawner)."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.virtio import DescFlag
from tests.conftest import DAEMON
from tests.frontend import Frontend, FuseClient

ROOT = fa.ROOT_ID
_WRITE = int(DescFlag.WRITE)
_NEXT = int(DescFlag.NEXT)


class Quiet:
    """A daemon whose stderr is read until it serves, then no more: a stalled log reader."""

    def __init__(self, share: Path, sock: str, *args: str) -> None:
        self.socket = sock
        self.proc = subprocess.Popen(
            [str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}", "--sandbox=none",
             "--log-level=info", *args], stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        self.head: list[bytes] = []
        for line in self.proc.stderr:
            self.head.append(line)
            if b"serving " in line:
                break
        else:
            raise AssertionError(b"".join(self.head).decode())
        self.rest = b""
        self._drain: threading.Thread | None = None

    def resume_reading(self) -> None:
        def drain() -> None:
            assert self.proc.stderr is not None
            self.rest = self.proc.stderr.read()
        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()

    def stop(self) -> str:
        if self._drain is None:
            self.resume_reading()
        if self.proc.poll() is None:
            self.proc.terminate()
        status = self.proc.wait(timeout=20)
        assert self._drain is not None
        self._drain.join(timeout=20)
        assert status == 0, self.rest.decode(errors="replace")
        return (b"".join(self.head) + self.rest).decode(errors="replace")


@pytest.fixture
def quiet(tmp_path: Path, share: Path) -> Iterator[Quiet]:
    d = Quiet(share, str(tmp_path / "q.sock"), "--request-queues=1")
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


# --- item: logging a guest can trigger -----------------------------------------------------

FLOOD = 3000


def test_a_stalled_log_reader_does_not_stall_the_device(quiet: Quiet) -> None:
    """Malformed chains make the worker warn for each; with nobody reading its stderr it must
    still complete every chain and keep serving (the pipe holds ~500 such lines)."""
    fe = Frontend.connect(quiet.socket, process=quiet.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        vq = fe.queue(1)
        good = fe.memory.alloc(4096)
        for _ in range(FLOOD):
            a, b = vq.alloc_desc(), vq.alloc_desc()
            vq.write_desc(a, good, 40, _NEXT, b)
            vq.write_desc(b, 1 << 40, 64, _WRITE)        # outside guest memory
            assert vq.wait(vq.publish(a, descs=[a, b])).used_len == 0
        assert c.getattr(ROOT).attr.ino > 0
        # The control plane too: a round trip to the worker of the flooded queue.
        fe.get_vring_base(1)
    finally:
        fe.close()
    text = quiet.stop()
    warned = text.count("malformed descriptor chain")
    assert 0 < warned < FLOOD // 10, warned
