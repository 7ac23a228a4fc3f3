"""The opcode suite inside the default sandbox (tests/test_sandbox_opcodes.py) again with
--inode-file-handles=prefer: open_by_handle_at(2) for every request that names an inode, as
the daemon, under the workers' kill-action seccomp filter and in fresh namespaces."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.test_sandbox_opcodes as sandbox_opcodes
from tests.conftest import Daemon, start_daemon
from tests.test_sandbox_opcodes import *  # noqa: F403 -- the tests and their fixtures
from tests.test_sandbox_opcodes import _spawner_below_the_sandbox, _usual_umask  # noqa: F401

# Those that count one O_PATH fd per inode, or use an inode after its last name is gone: what
# prefer changes on purpose (tests/test_inode_handles.py has their counterparts).
del test_a_new_session_releases_the_old_ones_inodes_and_handles  # noqa: F821
del test_same_inodes_looked_up_on_two_queues_at_once  # noqa: F821
del test_unlink  # noqa: F821

PREFER = "--inode-file-handles=prefer"


@pytest.fixture
def daemon_factory(tmp_path: Path, share: Path) -> Iterator:
    """test_sandbox_opcodes' daemon_factory with PREFER (a fixture that asked for that one by
    name would get conftest's: this module's name hides it)."""
    started: list[Daemon] = []

    def start(*args: str, share_dir: Path | None = None) -> Daemon:
        d = start_daemon(share_dir or share, str(tmp_path / f"vfs{len(started)}.sock"), PREFER,
                         *args, *sandbox_opcodes.SANDBOX_ARGS)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
    for d in started:
        assert "SIGSYS" not in d.text and "seccomp refused" not in d.text, d.text
        assert "inodes are kept as O_PATH fds" not in d.text, d.text
