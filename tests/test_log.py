"""Log lines to stderr and syslog (pyvirtiofsd.supervisor.log)."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys

import pytest

from pyvirtiofsd.supervisor import log

LINE = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) ([A-Z]+) pyvirtiofsd\[(\d+)\] "
                  r"([^\]]+)\] (.*)$")


@pytest.fixture
def stderr(capfd):
    """Reads what was written to fd 2 (by this process or a forked child) since the last call."""
    yield lambda: capfd.readouterr().err
    log.logger().handlers.clear()


def lines(text: str) -> list[tuple[str, ...]]:
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        assert m, line
        out.append(m.groups()[1:])
    return out


def test_stderr_format_and_role_per_process(stderr):
    log.setup("info", syslog=False, role="supervisor")
    log.logger().info("hello %s", "world")
    pid = os.fork()
    if pid == 0:
        try:
            log.set_role("worker q2")
            logging.getLogger("pyvirtiofsd.worker.x").warning("from the worker")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert lines(stderr()) == [
        ("INFO", str(os.getpid()), "supervisor", "hello world"),
        ("WARN", str(pid), "worker q2", "from the worker"),
    ]


@pytest.mark.parametrize(("level", "shown"), [
    ("error", ["ERROR"]),
    ("warn", ["ERROR", "WARN"]),
    ("info", ["ERROR", "WARN", "INFO"]),
    ("debug", ["ERROR", "WARN", "INFO", "DEBUG"]),
    ("trace", ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]),
    ("off", []),
])
def test_levels(stderr, level, shown):
    log.setup(level, syslog=False)
    lg = log.logger()
    lg.error("e")
    lg.warning("w")
    lg.info("i")
    lg.debug("d")
    lg.log(log.TRACE, "t")
    assert [entry[0] for entry in lines(stderr())] == shown


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="unknown log level 'warning'"):
        log.setup("warning", syslog=False)


def test_exception_stays_on_one_line(stderr):
    log.setup("info", syslog=False)
    try:
        raise OSError(5, "boom")
    except OSError:
        log.logger().exception("request failed")
    (entry,) = lines(stderr())
    assert entry[3].startswith("request failed | Traceback")
    assert entry[3].endswith("| OSError: [Errno 5] boom")


def test_newlines_cannot_forge_lines(stderr):
    log.setup("info", syslog=False)
    log.logger().info("lookup %r", "a\n[2024-01-01T00:00:00.000Z ERROR pyvirtiofsd[1] x] fake")
    log.logger().info("name %s", "a\nb\rc")
    assert [e[3] for e in lines(stderr())] == [
        "lookup 'a\\n[2024-01-01T00:00:00.000Z ERROR pyvirtiofsd[1] x] fake'",
        "name a | b\\rc"]


def test_setup_twice_replaces_the_handler(stderr):
    log.setup("info", syslog=False)
    log.setup("info", syslog=False)
    log.logger().info("once")
    assert len(lines(stderr())) == 1
    assert log.fds() == [sys.stderr.fileno()]


def test_syslog(tmp_path, monkeypatch, stderr):
    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        monkeypatch.setattr(log, "SYSLOG_ADDRESS", address)
        log.setup("debug", syslog=True, role="spawner")
        log.logger().info("ready")
        log.logger().error("bad")
        # facility daemon (3) * 8 + severity: info 6, error 3
        assert server.recv(4096) == f"<30>pyvirtiofsd[{os.getpid()}]: spawner: ready\0".encode()
        assert server.recv(4096) == f"<27>pyvirtiofsd[{os.getpid()}]: spawner: bad\0".encode()
        (fd,) = log.fds()
        assert fd != sys.stderr.fileno()
    assert stderr() == ""


def test_syslog_unreachable_falls_back_to_stderr(tmp_path, monkeypatch, stderr):
    monkeypatch.setattr(log, "SYSLOG_ADDRESS", str(tmp_path / "no-syslog"))
    log.setup("info", syslog=True)
    log.logger().info("still logged")
    entries = lines(stderr())
    assert entries[0][0] == "WARN" and "cannot log to syslog" in entries[0][3]
    assert entries[1] == ("INFO", str(os.getpid()), "supervisor", "still logged")
