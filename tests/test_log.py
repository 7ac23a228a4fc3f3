"""Log lines to stderr and syslog (pyvirtiofsd.supervisor.log)."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading

import pytest

from pyvirtiofsd.supervisor import log

LINE = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) ([A-Z]+) pyvirtiofsd\[(\d+)\] "
                  r"([^\]]+)\] (.*)$")


@pytest.fixture
def stderr(capfd):
    """Reads what was written to fd 2 (by this process or a forked child) since the last call."""
    yield lambda: capfd.readouterr().err
    for handler in list(log.logger().handlers):
        log.logger().removeHandler(handler)
        handler.close()


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
    # The one handler left writes to stderr through a descriptor of its own (never blocking).
    (fd,) = log.fds()
    assert os.path.sameopenfile(fd, sys.stderr.fileno())


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


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limit(clock: _Clock) -> None:
    """Give the handler a rate limit that runs on `clock`."""
    (handler,) = log.logger().handlers
    for f in list(handler.filters):
        if isinstance(f, log.RateLimit):
            handler.removeFilter(f)
    handler.addFilter(log.RateLimit(clock))


def test_a_repeated_message_is_rate_limited_and_the_rest_counted(stderr):
    clock = _Clock()
    log.setup("info", syslog=False)
    _limit(clock)
    for n in range(1000):
        log.logger().warning("malformed chain %d", n)
    log.logger().info("another template has a bucket of its own")
    first = lines(stderr())
    assert len(first) == log.TEMPLATE_BURST + 1
    assert first[-1][3] == "another template has a bucket of its own"
    clock.now += 1.0          # ten more lines' worth of tokens
    for n in range(20):
        log.logger().warning("malformed chain %d", 1000 + n)
    later = lines(stderr())
    # The first let through says how many were not, then TEMPLATE_RATE lines in all.
    assert later[0][0] == "WARN"
    assert later[0][3] == f"{1000 - log.TEMPLATE_BURST} similar messages suppressed" \
                          " (malformed chain %d)"
    assert [e[3] for e in later[1:]] == [f"malformed chain {1000 + n}"
                                         for n in range(int(log.TEMPLATE_RATE))]


def test_many_templates_meet_the_process_ceiling(stderr):
    clock = _Clock()
    log.setup("info", syslog=False)
    _limit(clock)
    for n in range(log.PROCESS_BURST * 2):
        log.logger().warning(f"template {n}")
    assert len(lines(stderr())) == log.PROCESS_BURST


def test_a_stalled_stderr_reader_never_blocks_the_process(monkeypatch):
    r, w = os.pipe()
    os.set_blocking(r, False)
    monkeypatch.setattr(sys, "stderr", os.fdopen(w, "w"))
    clock = _Clock()
    try:
        log.setup("info", syslog=False)
        _limit(clock)

        def flood() -> None:
            for n in range(5000):
                clock.now += 1.0            # the rate limit lets every line through
                log.logger().warning("line %d %s", n, "x" * 100)

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        t.join(timeout=30)
        assert not t.is_alive(), "logging blocked on a full pipe"
        written = b""
        while True:
            try:
                chunk = os.read(r, 1 << 16)
            except BlockingIOError:
                break
            written += chunk
        # Whole lines only, then the rest dropped and counted.
        got = written.decode().splitlines()
        assert 0 < len(got) < 5000
        assert all(LINE.match(line) for line in got)
        kept = len(got)
        clock.now += 1.0
        log.logger().warning("reader is back")
        after = lines(os.read(r, 1 << 16).decode())
        assert after[0][3] == f"{5000 - kept} log lines dropped: the log reader fell behind"
        assert after[1][3] == "reader is back"
        # The inherited description was not switched to non-blocking for everyone sharing it.
        assert os.get_blocking(w)
    finally:
        for handler in list(log.logger().handlers):
            log.logger().removeHandler(handler)
            handler.close()
        os.close(r)


def test_a_stalled_syslog_reader_never_blocks_the_process(tmp_path, monkeypatch):
    address = str(tmp_path / "log")
    clock = _Clock()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        monkeypatch.setattr(log, "SYSLOG_ADDRESS", address)
        try:
            log.setup("info", syslog=True)
            _limit(clock)

            def flood() -> None:
                for n in range(5000):
                    clock.now += 1.0
                    log.logger().warning("line %d", n)

            t = threading.Thread(target=flood, daemon=True)
            t.start()
            t.join(timeout=30)
            assert not t.is_alive(), "logging blocked on a full syslog socket"
            server.setblocking(False)
            got = 0
            while True:
                try:
                    server.recv(4096)
                except BlockingIOError:
                    break
                got += 1
            assert 0 < got < 5000
            clock.now += 1.0
            log.logger().warning("reader is back")
            assert server.recv(4096).endswith(
                f"{5000 - got} log lines dropped: the log reader fell behind\0".encode())
            assert server.recv(4096).endswith(b"reader is back\0")
        finally:
            for handler in list(log.logger().handlers):
                log.logger().removeHandler(handler)
                handler.close()


def test_preformatted_messages_share_one_bucket_past_the_template_limit(stderr):
    clock = _Clock()
    log.setup("info", syslog=False)
    _limit(clock)
    (limit,) = [f for f in log.logger().handlers[0].filters if isinstance(f, log.RateLimit)]
    step = 1.0 / log.PROCESS_RATE           # the process ceiling never refuses here
    for n in range(log.MAX_TEMPLATES + 1000):
        clock.now += step
        log.logger().warning(f"name {n} from the guest")
    assert len(limit._buckets) == log.MAX_TEMPLATES + 1
    # Past the limit one bucket: its burst, then TEMPLATE_RATE lines a second.
    shared = log.TEMPLATE_BURST + int(1000 * step * log.TEMPLATE_RATE)
    passed = [e for e in lines(stderr()) if e[3].startswith("name ")]
    assert len(passed) <= log.MAX_TEMPLATES + shared + 1
