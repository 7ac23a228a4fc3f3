"""Every FUSE opcode, through the front-end driver, inside the default sandbox.

The tests of test_daemon_fuse.py run here again with `--sandbox=namespace --seccomp=kill`:
pivoted into the share, in fresh namespaces, with the workers' seccomp policy killing any call
it does not list.  A worker the filter killed stops the daemon, so a system call the policy
lacks fails the test that needs it; each daemon's log is also checked for SIGSYS at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.test_daemon_fuse as daemon_fuse
from tests.conftest import Daemon, start_daemon
from tests.test_daemon_fuse import *  # noqa: F403 -- the tests themselves, re-collected here
from tests.test_seccomp import descendants

SANDBOX_ARGS = ("--sandbox=namespace", "--seccomp=kill")


@pytest.fixture
def daemon_factory(tmp_path: Path, share: Path) -> Iterator:
    started: list[Daemon] = []

    def start(*args: str, share_dir: Path | None = None) -> Daemon:
        d = start_daemon(share_dir or share, str(tmp_path / f"vfs{len(started)}.sock"), *args,
                         *SANDBOX_ARGS)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
    for d in started:
        assert "SIGSYS" not in d.text and "seccomp refused" not in d.text, d.text


def _worker_fds(daemon: Daemon) -> int:
    """The shared fd table's size, the spawner found below the sandbox's supervisor."""
    kids = descendants(daemon.proc.pid)
    spawner = next(p for p, n in kids.items() if n == "pyvfs-spawner")
    return len(os.listdir(f"/proc/{spawner}/fd"))


@pytest.fixture(autouse=True)
def _spawner_below_the_sandbox(monkeypatch) -> None:
    monkeypatch.setattr(daemon_fuse, "_worker_fds", _worker_fds)


@pytest.fixture(autouse=True)
def _usual_umask() -> Iterator[None]:
    """Shares made with the umask the permission tests assume (an in-process PassthroughFs of an
    earlier test module leaves the test process at umask 0)."""
    old = os.umask(0o022)
    yield
    os.umask(old)
