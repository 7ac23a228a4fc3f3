"""The `<socket>.pid` lock (pyvirtiofsd.supervisor.pidfile)."""

from __future__ import annotations

import fcntl
import os
import signal

import pytest

from pyvirtiofsd.supervisor.config import ConfigError
from pyvirtiofsd.supervisor.pidfile import PidFile, pidfile_path


class Holder:
    """A forked child that takes the pid file and keeps it until told to release it."""

    def __init__(self, socket_path: str) -> None:
        ready_r, ready_w = os.pipe()
        self._go_r, self._go_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            status = 1
            try:
                os.close(ready_r)
                os.close(self._go_w)
                pf = PidFile()
                pf.acquire(socket_path)
                os.write(ready_w, b"1")
                os.read(self._go_r, 1)  # until the parent writes or closes
                pf.release()
                status = 0
            finally:
                os._exit(status)
        os.close(ready_w)
        os.close(self._go_r)
        got = os.read(ready_r, 1)
        os.close(ready_r)
        assert got == b"1", "child could not take the pid file"

    def release(self) -> int:
        os.close(self._go_w)
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.close(self._go_w)
        os.waitpid(self.pid, 0)


def test_path_is_socket_plus_pid():
    assert pidfile_path("/run/vfs.sock") == "/run/vfs.sock.pid"


def test_acquire_writes_pid_and_release_removes(tmp_path):
    sock = str(tmp_path / "vfs.sock")
    pf = PidFile()
    pf.acquire(sock)
    try:
        assert pf.path == sock + ".pid"
        with open(sock + ".pid") as f:
            assert f.read() == f"{os.getpid()}\n"
        assert fcntl.fcntl(pf.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.stat(sock + ".pid").st_mode & 0o777 == 0o600
    finally:
        pf.release()
    assert not os.path.exists(sock + ".pid")
    assert pf.fd == -1
    pf.release()  # idempotent


def test_second_daemon_is_refused_while_the_first_holds_it(tmp_path):
    sock = str(tmp_path / "vfs.sock")
    holder = Holder(sock)
    try:
        with pytest.raises(ConfigError) as e:
            PidFile().acquire(sock)
        assert str(e.value) == f"another pyvirtiofsd (pid {holder.pid}) is serving {sock}"
    finally:
        assert holder.release() == 0
    with PidFile() as pf:
        pf.acquire(sock)
        with open(sock + ".pid") as f:
            assert f.read() == f"{os.getpid()}\n"


def test_file_left_by_a_dead_daemon_is_taken_over(tmp_path):
    sock = str(tmp_path / "vfs.sock")
    holder = Holder(sock)
    holder.kill()  # no release: the file stays, the lock goes with the process
    assert os.path.exists(sock + ".pid")
    with open(sock + ".pid", "w") as f:
        f.write("123456789\n")  # longer than ours: must not leave digits behind
    with PidFile() as pf:
        pf.acquire(sock)
        with open(sock + ".pid") as f:
            assert f.read() == f"{os.getpid()}\n"


def test_same_process_twice_on_one_object_is_a_bug(tmp_path):
    with PidFile() as pf:
        pf.acquire(str(tmp_path / "a.sock"))
        with pytest.raises(RuntimeError):
            pf.acquire(str(tmp_path / "b.sock"))


def test_release_in_a_forked_child_keeps_the_parents_file(tmp_path):
    sock = str(tmp_path / "vfs.sock")
    with PidFile() as pf:
        pf.acquire(sock)
        pid = os.fork()
        if pid == 0:
            try:
                pf.release()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.path.exists(sock + ".pid")
        with pytest.raises(ConfigError, match="another pyvirtiofsd"):
            PidFile().acquire(sock)


def test_symlink_at_the_pid_path_is_refused(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep\n")
    os.symlink(target, tmp_path / "vfs.sock.pid")
    with pytest.raises(ConfigError, match=r"cannot create pid file .*/vfs\.sock\.pid"):
        PidFile().acquire(str(tmp_path / "vfs.sock"))
    assert target.read_text() == "keep\n"


def test_unwritable_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot create pid file .*/missing/vfs\.sock\.pid"):
        PidFile().acquire(str(tmp_path / "missing" / "vfs.sock"))
