"""Signals are never lost: a SIGTERM sent the moment the socket exists stops the daemon.

Runtimes cancel a pod start exactly like this: start the daemon, wait for its socket, send
SIGTERM to the process they started.  Every process blocks the signals it handles from its
first instruction until its handler is installed (supervisor/signals.py), so a signal that
arrives early waits instead of being dropped (a pid-namespace init ignores a signal it has no
handler for) or killing the process before it removed its socket and pid file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from tests.conftest import DAEMON
from tests.frontend import Frontend, FuseClient
from tests.proctree import children

ROUNDS = 12
EXIT_TIMEOUT = 15.0


def _start_then_stop(tmp_path: Path, share: Path, sandbox: str, n: int) -> None:
    sock = tmp_path / f"s{n}.sock"
    proc = subprocess.Popen([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                             f"--sandbox={sandbox}", "--log-level=info"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # The socket is made before the sandbox is entered: the earliest moment a runtime acts.
        deadline = time.monotonic() + EXIT_TIMEOUT
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the socket never appeared"
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"round {n}: SIGTERM was lost; the daemon still ran:\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"round {n}: exit status {proc.returncode}:\n{err}"
    assert not sock.exists(), f"round {n}: the socket was left behind"
    assert not Path(f"{sock}.pid").exists(), f"round {n}: the pid file was left behind"
    assert "Traceback" not in err, err


@pytest.mark.parametrize("sandbox", ["namespace", "none"])
def test_sigterm_as_soon_as_the_socket_exists(tmp_path: Path, share: Path, sandbox: str) -> None:
    for n in range(ROUNDS):
        _start_then_stop(tmp_path, share, sandbox, n)
    # Nothing of any round outlived it: no process of ours still runs with that share.
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            assert str(share).encode() not in cmdline, f"pid {entry} outlived its daemon"


def test_stop_signals_are_the_supervisors_alone(daemon_factory) -> None:
    """A runtime may signal the whole group: the spawner, its standby and the workers let the
    supervisor decide, so none of them dies and is respawned on the way out."""
    d = daemon_factory("--request-queues=1")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        kids = children(d.proc.pid)
        assert sorted(kids.values()) == ["pyvfs-q0", "pyvfs-q1", "pyvfs-spawner",
                                         "pyvfs-standby"]
        for pid in kids:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                os.kill(pid, sig)
        # Round trips through a worker and through the supervisor's loop.
        assert c.getattr(fa.ROOT_ID).attr.ino > 0
        fe.get_features()
        assert children(d.proc.pid) == kids
        assert "killed by" not in d.text, d.text
    finally:
        fe.close()
    assert d.proc.wait(timeout=20) == 0
