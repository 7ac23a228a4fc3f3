"""Shared fixtures: a running pyvirtiofsd on a fresh share."""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DAEMON = ROOT / ".venv" / "bin" / "pyvirtiofsd"
START_TIMEOUT = 30.0
# A sanitizer's report in a daemon's stderr (tests/sanitizer.py): copied to this process's own
# stderr as well, so that a sanitized run sees it even from a worker that was respawned.
_SANITIZER_REPORT = re.compile(r"ERROR: AddressSanitizer|runtime error:|SUMMARY: "
                               r"(Address|UndefinedBehavior)Sanitizer")
# --data-plane values: the C request engine, and the Python reference implementation.
DATA_PLANES = ("native", "python")


@dataclass
class Daemon:
    """A pyvirtiofsd process; `log` collects its stderr lines as they arrive."""

    proc: subprocess.Popen
    socket: str
    share: Path
    lines: queue.Queue = field(default_factory=queue.Queue)
    log: list[str] = field(default_factory=list)

    def wait_for(self, text: str, timeout: float = START_TIMEOUT) -> str:
        """Block until a log line containing `text` arrives (or the daemon exits)."""
        for line in self.log:
            if text in line:
                return line
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"daemon never logged {text!r}; log:\n"
                                     + "".join(self.log)) from None
            if line is None:
                raise AssertionError(f"daemon exited ({self.proc.wait()}) before logging "
                                     f"{text!r}; log:\n" + "".join(self.log))
            if text in line:
                return line

    def wait_count(self, text: str, n: int, timeout: float = START_TIMEOUT) -> None:
        """Block until `text` was logged at least `n` times (or the daemon exits)."""
        while self.text.count(text) < n:
            try:
                if self.lines.get(timeout=timeout) is None:
                    raise AssertionError("the daemon exited:\n" + self.text)
            except queue.Empty:
                raise AssertionError(f"{text!r} logged fewer than {n} times:\n{self.text}") \
                    from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    @property
    def text(self) -> str:
        return "".join(self.log)

    def status(self) -> dict:
        """The daemon's status document: GET /status on SOCKET.status (supervisor/status.py),
        what tests read counters from instead of counting log lines, which are rate-limited."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.socket + ".status")
            s.sendall(b"GET /status HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data.partition(b"\r\n\r\n")[2])

    def wait_status(self, done: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        """Poll the status document until `done` says yes (or the daemon exits)."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status()
            if done(doc):
                return doc
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}):\n{self.text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"status never reached the condition: {doc}\n{self.text}")
            time.sleep(0.01)

    def wait_frontends_served(self, n: int) -> None:
        """Until `n` front-end connections have ended and been torn down."""
        self.wait_status(lambda doc: doc["frontends_served"] >= n)


def start_daemon(share: Path, sock: str, *args: str, exe: Path = DAEMON) -> Daemon:
    argv = [str(exe), f"--socket-path={sock}", f"--shared-dir={share}",
            "--sandbox=none", "--log-level=debug", *args]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    d = Daemon(proc, sock, share)

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            d.log.append(line)
            d.lines.put(line)
            if os.environ.get("PYVIRTIOFSD_TEST_ECHO"):
                sys.stderr.write(line)
            elif _SANITIZER_REPORT.search(line):
                sys.__stderr__.write(line)
        d.lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    d.wait_for("serving ")
    return d


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    return d


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`@pytest.mark.data_planes(*planes)` (on a test, class or module) runs every daemon the
    test starts through `daemon_factory` once per plane; the closest marker wins, so a module
    can run on both planes and one slow test on fewer."""
    marker = metafunc.definition.get_closest_marker("data_planes")
    if marker is None or "data_plane" not in metafunc.fixturenames:
        return
    if not marker.args or set(marker.args) - set(DATA_PLANES):
        raise ValueError(f"data_planes takes some of {DATA_PLANES}, not {marker.args}")
    metafunc.parametrize("data_plane", marker.args)


@pytest.fixture
def data_plane() -> str | None:
    """The --data-plane daemon_factory passes; None leaves the daemon's default (native)."""
    return None


@pytest.fixture
def daemon_factory(tmp_path: Path, share: Path, data_plane: str | None) -> Iterator:
    started: list[Daemon] = []

    def start(*args: str, share_dir: Path | None = None) -> Daemon:
        if data_plane is not None and not any(a.startswith("--data-plane") for a in args):
            args = (*args, f"--data-plane={data_plane}")
        d = start_daemon(share_dir or share, str(tmp_path / f"vfs{len(started)}.sock"), *args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """An in-process PassthroughFs sets the process umask to 0 (the guest kernel applies the
    caller's), and a shared fixture may have made one before this test: every test starts with
    the umask the permission tests assume, and leaves the one it found."""
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- every layer must run ---------------------------------------------------------------------
# The differential, bridge, anchor and guest layers skip when a prerequisite is missing (an
# anchor daemon, /dev/fuse, a guest kernel).  A developer running one file may accept that; the
# README's test command passes --no-skips, so a run with a layer missing fails instead of
# passing with less tested than it claims.

_skipped: list[str] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-skips", action="store_true",
                     help="fail the run if any test was skipped (every layer must run)")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        _skipped.append(f"{report.nodeid}: {why}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--no-skips") and _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if config.getoption("--no-skips") and _skipped:
        terminalreporter.section("skipped tests fail this run (--no-skips)", red=True)
        for line in _skipped:
            terminalreporter.write_line(line)
