"""systemd: sd_notify, socket activation and the units in etc/ (supervisor/systemd.py).

The service manager's side is played by the test: a datagram socket named by NOTIFY_SOCKET
(a path, or an abstract name), and systemd's own `systemd-socket-activate` for LISTEN_FDS.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pyvirtiofsd.supervisor.config import ConfigError, parse
from pyvirtiofsd.supervisor.systemd import Notifier, notify_address, take_listen_fd
from tests.conftest import DAEMON, ROOT
from tests.frontend import Frontend, FuseClient
from tests.guest_util import guest_run
from tests.proctree import children

TIMEOUT = 30.0
UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


class Manager:
    """The service manager's notify socket: each datagram with its sender's credentials."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(TIMEOUT)

    def receive(self) -> tuple[dict[str, str], int]:
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
        pid = next(UCRED.unpack(cdata[:UCRED.size])[0] for level, kind, cdata in anc
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        lines = data.decode().splitlines()
        assert all("=" in line for line in lines), data
        return dict(line.split("=", 1) for line in lines), pid

    def close(self) -> None:
        self.sock.close()


def _start(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        lines.extend(proc.stderr)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _family(pid: int) -> set[int]:
    """pid and every descendant."""
    out = {pid}
    for child in children(pid):
        out |= _family(child)
    return out


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# --- the notify protocol ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["path", "abstract"])
@pytest.mark.parametrize("sandbox", ["namespace", "none"])
def test_notify_sequence(tmp_path: Path, share: Path, kind: str, sandbox: str) -> None:
    """READY=1 comes once the socket listens, STATUS= follows the front-end, STOPPING=1 on
    SIGTERM; every message from the daemon's own processes."""
    if kind == "path":
        address: str | bytes = str(tmp_path / "notify")
        spelled = str(address)
    else:
        name = f"pyvirtiofsd-test-{os.getpid()}-{sandbox}"
        address, spelled = b"\0" + name.encode(), "@" + name
    manager = Manager(address)
    sock = str(tmp_path / "vfs.sock")
    env = {**os.environ, "NOTIFY_SOCKET": spelled}
    proc, log = _start([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                        f"--sandbox={sandbox}"], env)
    try:
        ready, pid = manager.receive()
        assert ready["READY"] == "1", ready
        assert "waiting for the front-end" in ready["STATUS"] and sock in ready["STATUS"]
        # Ready means usable: the socket already listens, the workers already run.
        assert guest_run.socket_listening(sock, proc.pid)
        family = _family(proc.pid)
        assert pid in family
        assert len(family) >= 3, "supervisor, spawner and workers run at READY=1"

        fe = Frontend.connect(sock, queues=2)
        connected, _ = manager.receive()
        assert connected == {"STATUS": "front-end connected; serving"}

        proc.send_signal(signal.SIGTERM)
        stopping, pid = manager.receive()
        assert stopping == {"STOPPING": "1", "STATUS": "terminating on signal"}
        # From one of the daemon's processes as they were while it ran: the sender may have
        # exited by now (the sandboxed supervisor ends right after its last message).
        assert pid in family | {proc.pid}
        fe.close()
        assert proc.wait(timeout=TIMEOUT) == 0, "".join(log)
    finally:
        _stop(proc)
        manager.close()


def test_front_end_leaving_is_reported_as_stopping(tmp_path: Path, share: Path) -> None:
    manager = Manager(str(tmp_path / "notify"))
    sock = str(tmp_path / "vfs.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc, log = _start([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                        "--sandbox=none"], env)
    try:
        assert manager.receive()[0]["READY"] == "1"
        Frontend.connect(sock, queues=2).close()
        assert manager.receive()[0]["STATUS"].startswith("front-end connected")
        assert manager.receive()[0] == {"STOPPING": "1", "STATUS": "front-end disconnected"}
        assert proc.wait(timeout=TIMEOUT) == 0, "".join(log)
    finally:
        _stop(proc)
        manager.close()


def test_fatal_stop_tells_the_manager_why(tmp_path: Path, share: Path) -> None:
    """A worker killed by SIGSYS -- what a seccomp refusal does -- cannot be respawned (its
    successor would be refused the same call): the daemon stops, and the manager reads why in
    STATUS=."""
    manager = Manager(str(tmp_path / "notify"))
    sock = str(tmp_path / "vfs.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc, log = _start([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                        "--sandbox=none", "--seccomp=none"], env)
    try:
        assert manager.receive()[0]["READY"] == "1"
        [worker] = [pid for pid, name in children(proc.pid).items() if name == "pyvfs-q1"]
        os.kill(worker, signal.SIGSYS)
        stopping, _ = manager.receive()
        assert stopping["STOPPING"] == "1", stopping
        assert stopping["STATUS"].startswith("stopping: worker for queue 1"), stopping
        assert proc.wait(timeout=TIMEOUT) == 1, "".join(log)
    finally:
        _stop(proc)
        manager.close()


def test_unreachable_manager_is_one_warning_not_a_failure(tmp_path: Path, share: Path) -> None:
    sock = str(tmp_path / "vfs.sock")
    proc, log = _start([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                        "--sandbox=none"],
                       {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    try:
        fe = Frontend.connect(sock, queues=2)   # it serves all the same
        fe.close()
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        _stop(proc)
    warnings = [line for line in log if "service manager" in line]
    assert len(warnings) == 1 and "WARN" in warnings[0], log


def test_notify_address_spellings() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abc") == b"\0abc"
    assert notify_address("@") is None
    assert notify_address("relative/path") is None
    env = {"NOTIFY_SOCKET": "relative"}
    assert Notifier(env).fd == -1
    assert env == {}, "the variable is unset, so nothing the daemon starts inherits it"


# --- socket activation -----------------------------------------------------------------------


def test_listen_fds_activation(tmp_path: Path, share: Path) -> None:
    """systemd-socket-activate plays the .socket unit: it binds and listens, and when the VMM
    connects it execs the daemon with that socket on fd 3 (LISTEN_FDS/LISTEN_PID).  The daemon
    serves the pending connection and binds nothing itself."""
    sock = str(tmp_path / "activated.sock")
    manager = Manager(str(tmp_path / "notify"))
    proc, log = _start(["systemd-socket-activate", "-l", sock, "-E", "NOTIFY_SOCKET",
                        str(DAEMON), f"--shared-dir={share}", "--sandbox=none"],
                       {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        fe = Frontend.connect(sock, queues=2, timeout=TIMEOUT, process=proc)
        ready, _ = manager.receive()
        assert ready["READY"] == "1" and "on fd 3" in ready["STATUS"], ready
        assert manager.receive()[0]["STATUS"].startswith("front-end connected")
        assert not os.path.exists(sock + ".pid"), "no pid file: the manager tracks the pid"
        fe.close()
        assert proc.wait(timeout=TIMEOUT) == 0, "".join(log)
    finally:
        _stop(proc)
        manager.close()
    assert any("serving" in line and "on fd 3" in line for line in log), log
    # The socket file is the manager's: the daemon leaves it alone.
    assert os.path.exists(sock)


# Puts the inherited socket on fd 3, sets LISTEN_PID to its own pid (kept by exec) and execs.
_EXEC_ACTIVATED = """
import os, sys
fd, pid, count, *argv = sys.argv[1:]
os.dup2(int(fd), 3)
os.close(int(fd))
os.environ.update(LISTEN_PID=str(os.getpid()) if pid == "self" else pid, LISTEN_FDS=count)
os.execv(argv[0], argv)
"""


def _run_activated(tmp_path: Path, share: Path, fds: str, *args: str,
                   pid: str = "self") -> subprocess.CompletedProcess:
    """The daemon started as a service manager would, with a listening socket on fd 3."""
    path = tmp_path / "l.sock"
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lsock:
        lsock.bind(str(path))
        lsock.listen(1)
        return subprocess.run(
            [sys.executable, "-c", _EXEC_ACTIVATED, str(lsock.fileno()), pid, fds, str(DAEMON),
             f"--shared-dir={share}", "--sandbox=none", *args],
            pass_fds=(lsock.fileno(),), capture_output=True, text=True, timeout=TIMEOUT)


def _one_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("pyvirtiofsd: error: ") and fragment in result.stderr, \
        result.stderr


def test_activation_with_a_socket_option_is_refused(tmp_path: Path, share: Path) -> None:
    _one_error(_run_activated(tmp_path, share, "1", f"--socket-path={tmp_path / 'x.sock'}"),
               "--socket-path cannot be used with socket activation")
    _one_error(_run_activated(tmp_path, share, "1", "--fd=3"),
               "--fd cannot be used with socket activation")


def test_activation_with_two_sockets_is_refused(tmp_path: Path, share: Path) -> None:
    _one_error(_run_activated(tmp_path, share, "2"), "passed 2 sockets")


def test_activation_for_another_process_is_ignored(tmp_path: Path, share: Path) -> None:
    # LISTEN_PID names someone else: the variables are not ours, so no socket at all.
    _one_error(_run_activated(tmp_path, share, "1", pid="1"), "a vhost-user socket is required")


def test_activation_replaces_the_config_files_socket(tmp_path: Path, share: Path) -> None:
    toml = tmp_path / "vm.toml"
    toml.write_text(f'shared-dir = "{share}"\nsocket-path = "{tmp_path / "file.sock"}"\n')
    config = parse(["--config", str(toml)], activated_fd=7)
    assert (config.fd, config.socket_path) == (7, None)
    with pytest.raises(ConfigError, match="--socket-path cannot be used with socket"):
        parse(["--config", str(toml), f"--socket-path={tmp_path / 'cli.sock'}"], activated_fd=7)


def test_take_listen_fd_unsets_the_variables() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "vfs"}
    r, w = os.pipe()
    saved = os.dup(3) if _is_open(3) else None
    try:
        os.dup2(r, 3)
        assert take_listen_fd(env) == 3
        assert env == {}
        assert not os.get_inheritable(3)
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        else:
            os.close(3)
        os.close(r)
        os.close(w)
    with pytest.raises(ConfigError, match="not a number"):
        take_listen_fd({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})
    assert take_listen_fd({"LISTEN_FDS": "1"}) is None


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- the units -------------------------------------------------------------------------------

UNITS = ["pyvirtiofsd.service", "pyvirtiofsd@.service", "pyvirtiofsd@.socket"]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on every unit in etc/, with the console script where a package
    installs it (/usr/local/bin, bind-mounted in a private mount namespace: ExecStart= names it
    without a path, and verify checks that it is executable)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: run scripts/setup.sh"
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        shutil.copy(ROOT / "etc" / name, units / name)
    # Templates are verified through an instance, loaded from the template beside it.
    targets = [units / "pyvirtiofsd.service", units / "pyvirtiofsd@vm1.service",
               units / "pyvirtiofsd@vm1.socket"]
    script = ('set -e; mount -t tmpfs none /usr/local/bin; ln -s "$1" /usr/local/bin/pyvirtiofsd;'
              ' shift; exec systemd-analyze verify "$@"')
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(DAEMON), *map(str, targets)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # A broken unit is caught: the same check fails on a typo.
    (units / "pyvirtiofsd@.service").write_text(
        (ROOT / "etc" / "pyvirtiofsd@.service").read_text().replace("Type=notify", "Type=notfy"))
    bad = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(DAEMON), str(units / "pyvirtiofsd@vm1.service")],
        capture_output=True, text=True, timeout=60)
    assert "notfy" in bad.stderr, bad


# What systemd does for a directive that can be reproduced without it: the capabilities it takes
# from the bounding set (systemd.exec(5)), and no_new_privs.
_DIRECTIVE_CAPS = {
    "ProtectKernelModules=yes": ["sys_module"],
    "ProtectClock=yes": ["sys_time", "wake_alarm"],
    "ProtectKernelLogs=yes": ["syslog"],
}


def test_unit_hardening_leaves_the_sandbox_working(tmp_path: Path, share: Path) -> None:
    """The template unit's NoNewPrivileges= and the capabilities its Protect*= directives remove,
    applied with setpriv: the daemon still builds its namespace sandbox and serves."""
    lines = (ROOT / "etc" / "pyvirtiofsd@.service").read_text().splitlines()
    assert "NoNewPrivileges=yes" in lines
    dropped = [cap for directive, caps in _DIRECTIVE_CAPS.items() if directive in lines
               for cap in caps]
    assert dropped, "the unit protects nothing that can be checked here"
    sock = str(tmp_path / "vfs.sock")
    proc, log = _start(["setpriv", "--no-new-privs",
                        "--bounding-set=" + ",".join(f"-{c}" for c in dropped),
                        str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                        "--sandbox=namespace"], dict(os.environ))
    try:
        fe = Frontend.connect(sock, queues=2, timeout=TIMEOUT, process=proc)
        fuse = FuseClient(fe)
        fuse.init()
        fuse.mkdir(1, "made-by-guest")
        assert (share / "made-by-guest").is_dir()
        fe.close()
        assert proc.wait(timeout=TIMEOUT) == 0, "".join(log)
    finally:
        _stop(proc)
    assert not [line for line in log if " ERROR " in line], log


def test_template_reads_the_instance_toml() -> None:
    lines = [line for line in (ROOT / "etc" / "pyvirtiofsd@.service").read_text().splitlines()
             if line and not line.startswith("#")]
    assert "ExecStart=pyvirtiofsd --config /etc/pyvirtiofsd/%i.toml" in lines
    assert "Type=notify" in lines and "NotifyAccess=all" in lines
    # Nothing that would stop the daemon's own sandbox from being built.
    keys = {line.split("=", 1)[0] for line in lines if "=" in line}
    assert not keys & {"RestrictNamespaces", "CapabilityBoundingSet", "SystemCallFilter",
                       "PrivateUsers", "ProtectSystem", "MemoryDenyWriteExecute"}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
