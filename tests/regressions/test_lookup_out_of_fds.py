"""Found by the memory benchmark (bench/memory.py), which looks up more files than the hard
RLIMIT_NOFILE lets a daemon keep open: once the daemon's fd table is full, LOOKUP of a name
that exists was answered ENOENT, on both data planes.  The guest caches that as a negative
entry: the file vanishes for it.  The host said EMFILE; that is what the guest must hear."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.conftest import DAEMON, DATA_PLANES
from tests.frontend import Frontend, FuseClient, FuseError, start_daemon, stop_daemon

FDS = 300
FILES = 2 * FDS


@pytest.mark.parametrize("plane", DATA_PLANES)
def test_lookup_with_no_fd_left_is_emfile_not_enoent(tmp_path: Path, plane: str) -> None:
    share = tmp_path / "share"
    share.mkdir()
    for i in range(FILES):
        (share / f"f{i}").touch()
    sock = str(tmp_path / "vfs.sock")
    proc = start_daemon([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                         "--sandbox=none", f"--data-plane={plane}", f"--rlimit-nofile={FDS}"],
                        str(tmp_path / "log"))
    fe = Frontend.connect(sock, process=proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        errors: dict[str, int] = {}
        found = 0
        for i in range(FILES):
            try:
                c.lookup(1, f"f{i}")
                found += 1
            except FuseError as e:
                errors[errno.errorcode[e.errno]] = errors.get(errno.errorcode[e.errno], 0) + 1
        assert found >= FDS // 2
        assert errors, "every LOOKUP succeeded: the fd limit was not reached"
        assert set(errors) <= {"EMFILE", "ENFILE"}, errors
    finally:
        fe.close()
        stop_daemon(proc)
