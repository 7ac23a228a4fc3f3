"""The running daemon: its process tree, and command-line failures before anything starts."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from tests.conftest import DAEMON
from tests.proctree import children


def _fd_targets(pid: int) -> set[tuple[int, str]]:
    base = f"/proc/{pid}/fd"
    return {(int(n), os.readlink(f"{base}/{n}")) for n in os.listdir(base)}


def test_one_supervisor_one_worker_per_virtqueue(daemon_factory) -> None:
    d = daemon_factory("--request-queues=2")
    kids = children(d.proc.pid)
    names = sorted(kids.values())
    # hiprio + 2 request queues, the spawner that holds their shared fd table, and its
    # standby.
    assert names == ["pyvfs-q0", "pyvfs-q1", "pyvfs-q2", "pyvfs-spawner", "pyvfs-standby"], kids
    workers = [pid for pid, name in kids.items() if name.startswith("pyvfs-q")]
    spawner = next(pid for pid, name in kids.items() if name == "pyvfs-spawner")
    standby = next(pid for pid, name in kids.items() if name == "pyvfs-standby")
    assert children(spawner) == {}, "workers must be the supervisor's children"
    # CLONE_FILES: the workers and the spawners see one and the same fd table ...
    tables = {frozenset(_fd_targets(pid)) for pid in [*workers, spawner, standby]}
    assert len(tables) == 1
    # ... which holds none of the supervisor's control-plane fds (its listening socket).
    sup = _fd_targets(d.proc.pid)
    listening = {target for _, target in sup if target.startswith("socket:")}
    assert not listening & {target for _, target in next(iter(tables))}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DAEMON), *args], capture_output=True, text=True, timeout=30)


def _one_error_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyvirtiofsd: error: ")
    assert fragment in lines[0]


def test_unknown_flag_exits_2(tmp_path: Path) -> None:
    _one_error_line(_run("--socket-path", str(tmp_path / "s"), "--shared-dir", str(tmp_path),
                         "--frobnicate"), "--frobnicate")


def test_missing_shared_dir_exits_2(tmp_path: Path) -> None:
    _one_error_line(_run(f"--socket-path={tmp_path / 's'}",
                         f"--shared-dir={tmp_path / 'nope'}"), "does not exist")


def test_socket_in_use_exits_2(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        s.listen(1)
        _one_error_line(_run(f"--socket-path={path}", f"--shared-dir={tmp_path}"), "in use")


def test_second_daemon_on_same_socket_is_refused(daemon_factory, share: Path) -> None:
    d = daemon_factory()
    result = _run(f"--socket-path={d.socket}", f"--shared-dir={share}", "--sandbox=none")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert d.proc.poll() is None, "the first daemon must keep running"


def test_sigterm_stops_every_process(daemon_factory) -> None:
    d = daemon_factory()
    kids = list(children(d.proc.pid))
    assert d.stop() == 0
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} outlived the supervisor"
    assert not os.path.exists(d.socket)
