"""Logging for every process of the daemon: one line per message, to stderr or syslog.

stderr lines read `[2024-05-01T12:00:00.123Z INFO pyvirtiofsd[1234] supervisor] message`; the pid
is taken when the record is made, so forked workers show their own pid, and `set_role` names the
process ("spawner", "worker q2"). Levels are virtiofsd's: error, warn, info, debug, trace, off.

A guest can make the daemon log (malformed chains, bogus FORGETs), so logging can neither flood
nor stall it:
* each process rate-limits its lines with token buckets, one per message template plus one for
  the whole process; what a bucket refuses is counted and reported by one "N similar messages
  suppressed" line when that template is next let through;
* the log fd never blocks: stderr is reopened as a file description of our own with O_NONBLOCK
  (or written with MSG_DONTWAIT when it is a socket, as is syslog), and a line the reader has
  no room for is dropped and counted ("N log lines dropped") instead of stopping the process,
  and with it the vhost-user control plane, on a stalled reader.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging.handlers

LOGGER_NAME = "pyvirtiofsd"
TRACE = logging.DEBUG - 5
LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
    "off": logging.CRITICAL + 10,  # above every level the daemon logs at
}
SYSLOG_ADDRESS = "/dev/log"

# virtiofsd's level names; set in our formatter only, not in the process-wide logging tables.
_NAMES = {logging.ERROR: "ERROR", logging.WARNING: "WARN", logging.INFO: "INFO",
          logging.DEBUG: "DEBUG", TRACE: "TRACE", logging.CRITICAL: "ERROR"}

_role = "supervisor"

# Per message template: a burst, then a sustained rate; and a ceiling for the whole process
# (templates are a bounded set, but many of them together must not flood either).
TEMPLATE_BURST = 50
TEMPLATE_RATE = 10.0          # lines per second
PROCESS_BURST = 500
PROCESS_RATE = 100.0
MAX_TEMPLATES = 512
# Lines are written whole or not at all: a pipe write of at most PIPE_BUF bytes is atomic.
LINE_MAX = select.PIPE_BUF


class _RoleFilter(logging.Filter):
    """Stamps each record with the process role current when it was made."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


class _Bucket:
    __slots__ = ("tokens", "stamp", "suppressed")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now
        self.suppressed = 0

    def refill(self, burst: float, rate: float, now: float) -> bool:
        """Add what `rate` earned since the last call; True if a token is there to take."""
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        return self.tokens >= 1.0


class RateLimit(logging.Filter):
    """Token buckets per message template and per process.  A record let through after others
    of its template were refused carries their number (`record.suppressed`); the handlers
    write it as a line of its own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 template_burst: float = TEMPLATE_BURST, template_rate: float = TEMPLATE_RATE,
                 process_burst: float = PROCESS_BURST, process_rate: float = PROCESS_RATE
                 ) -> None:
        super().__init__()
        self.clock = clock
        self.template = (template_burst, template_rate)
        self.process = (process_burst, process_rate)
        self._total = _Bucket(process_burst, clock())
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        key = (record.name, record.msg if isinstance(record.msg, str) else repr(type(record.msg)))
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TEMPLATES:
                # Messages formatted before logging are each a "template": they share one
                # bucket past this many, so the table stays bounded.
                key = ("", "(messages of other templates)")
                bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(self.template[0], now)
        # Both must have room before either is charged: a template kept quiet by the process
        # ceiling keeps its own tokens.
        room = bucket.refill(*self.template, now)
        total = self._total.refill(*self.process, now)
        if not (room and total):
            bucket.suppressed += 1
            return False
        bucket.tokens -= 1.0
        self._total.tokens -= 1.0
        record.suppressed = bucket.suppressed
        bucket.suppressed = 0
        return True


def _suppressed_record(record: logging.LogRecord, count: int) -> logging.LogRecord:
    """The "N similar messages suppressed" line that goes out before `record`."""
    template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
    notice = logging.LogRecord(record.name, logging.WARNING, record.pathname, record.lineno,
                               "%d similar messages suppressed (%s)", (count, template), None)
    notice.role = getattr(record, "role", _role)
    return notice


def _level_name(record: logging.LogRecord) -> str:
    return _NAMES.get(record.levelno, record.levelname)


def _text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The message on one line: names from the guest must not forge extra log lines."""
    text = record.getMessage()
    if record.exc_info:
        text += "\n" + formatter.formatException(record.exc_info)
    if "\n" in text or "\r" in text:
        text = " | ".join(text.replace("\r", "\\r").splitlines())
    return text


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z"
        return (f"[{stamp} {_level_name(record)} {LOGGER_NAME}[{record.process}] "
                f"{record.role}] {_text(self, record)}")


class _SyslogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{LOGGER_NAME}[{record.process}]: {record.role}: {_text(self, record)}"


def _encode(line: str) -> bytes:
    data = line.encode("utf-8", "backslashreplace")
    if len(data) >= LINE_MAX:
        data = data[:LINE_MAX - 4].decode("utf-8", "ignore").encode() + b"..."
    return data


class _Lines(logging.Handler):
    """Writes each record as one datagram or one atomic line, never blocking; what the reader
    has no room for is dropped, counted, and reported once a line goes through again."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def _send(self, data: bytes) -> None:
        """Write `data` without blocking; BlockingIOError if the reader has no room."""
        raise NotImplementedError

    def _frame(self, record: logging.LogRecord) -> bytes:
        raise NotImplementedError

    def emit(self, record: logging.LogRecord) -> None:
        try:
            frames = []
            if self.dropped:
                notice = logging.LogRecord(record.name, logging.WARNING, record.pathname,
                                           record.lineno, "%d log lines dropped: the log"
                                           " reader fell behind", (self.dropped,), None)
                notice.role = getattr(record, "role", _role)
                frames.append((self._frame(notice), True))
            count = getattr(record, "suppressed", 0)
            if count:
                frames.append((self._frame(_suppressed_record(record, count)), False))
            frames.append((self._frame(record), False))
        except Exception:
            self.handleError(record)
            return
        for data, is_drop_notice in frames:
            try:
                self._send(data)
            except OSError:
                # EAGAIN: the reader has no room.  Anything else (EPIPE, ECONNREFUSED): the
                # reader is gone.  Either way nobody is waited for; the notice itself is not
                # counted, it is simply sent again with the next line.
                if not is_drop_notice:
                    self.dropped += 1
                continue
            if is_drop_notice:
                self.dropped = 0


class _StreamLines(_Lines):
    """stderr through a file description of our own: O_NONBLOCK set on the one we inherited
    would change it for every process sharing it (a terminal's shell, the runtime)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.setFormatter(_StderrFormatter())
        self.sock: socket.socket | None = None
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            self.fd = -1              # started with stderr closed: lines go nowhere
            return
        if stat.S_ISSOCK(mode):
            # journald's stdout stream: sockets cannot be reopened through /proc.
            self.sock = socket.socket(fileno=os.dup(fd))
            self.fd = self.sock.fileno()
        elif stat.S_ISREG(mode):
            # Never blocks on a reader; reopening would lose O_APPEND and the offset.
            self.fd = os.dup(fd)
        else:
            try:
                self.fd = os.open(f"/proc/self/fd/{fd}",
                                  os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError:
                self.fd = os.dup(fd)
                os.set_blocking(self.fd, False)

    def _frame(self, record: logging.LogRecord) -> bytes:
        return _encode(self.format(record)) + b"\n"

    def _send(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.send(data, socket.MSG_DONTWAIT)
        elif self.fd >= 0:
            os.write(self.fd, data)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        try:
            if self.sock is not None:
                self.sock.close()
            elif self.fd >= 0:
                os.close(self.fd)
        except OSError:
            pass
        self.fd = -1
        super().close()


def logger() -> logging.Logger:
    """The daemon's logger; modules may also use logging.getLogger(__name__) under it."""
    return logging.getLogger(LOGGER_NAME)


def setup(level: str, syslog: bool, role: str = "supervisor") -> None:
    """Configure the `pyvirtiofsd` logger (replacing any earlier setup).

    If syslog is asked for but /dev/log cannot be reached, logging stays on stderr and says so,
    as virtiofsd does.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (expected {', '.join(LEVELS)})")
    set_role(role)
    log = logger()
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.setLevel(LEVELS[level])
    log.propagate = False
    # A message that cannot be delivered is dropped: logging's default is to print a multi-line
    # traceback to stderr for each one.
    logging.raiseExceptions = False

    fallback_reason = None
    handler: logging.Handler | None = None
    if syslog:
        handler, fallback_reason = _syslog_handler()
    if handler is None:
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            fd = 2                    # sys.stderr replaced by an object with no fd
        handler = _StreamLines(fd)
    handler.addFilter(_RoleFilter())
    handler.addFilter(RateLimit())
    log.addHandler(handler)
    if fallback_reason:
        log.warning("%s; logging to stderr", fallback_reason)


def _syslog_lines() -> logging.handlers.SysLogHandler:
    """SysLogHandler's framing, sent with MSG_DONTWAIT; no reconnect (inside the sandbox
    /dev/log cannot be reached again).  logging.handlers (with pickle and queue) is imported
    only by a daemon that logs to syslog: every process of the daemon would carry it."""
    import logging.handlers

    class SyslogLines(logging.handlers.SysLogHandler, _Lines):
        def __init__(self) -> None:
            logging.handlers.SysLogHandler.__init__(
                self, address=SYSLOG_ADDRESS,
                facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            self.dropped = 0

        def _frame(self, record: logging.LogRecord) -> bytes:
            prio = self.encodePriority(self.facility, self.mapPriority(record.levelname))
            return f"<{prio}>".encode() + _encode(self.format(record)) + b"\0"

        def _send(self, data: bytes) -> None:
            self.socket.send(data, socket.MSG_DONTWAIT)

        emit = _Lines.emit

    return SyslogLines()


def _syslog_handler() -> tuple[logging.Handler | None, str | None]:
    """A handler connected to the syslog socket, or None and why not."""
    try:
        handler = _syslog_lines()
    except OSError as e:
        return None, f"cannot log to syslog at {SYSLOG_ADDRESS}: {e.strerror or e}"
    if handler.socket.fileno() < 0:
        # Python 3.11 swallows a failed connect at construction and retries on every message;
        # ask once ourselves so the reason can be reported.
        handler.close()
        reason = "not reachable"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(SYSLOG_ADDRESS)
            except OSError as e:
                reason = e.strerror or str(e)
        return None, f"cannot log to syslog at {SYSLOG_ADDRESS}: {reason}"
    handler.setFormatter(_SyslogFormatter())
    return handler, None


def set_role(role: str) -> None:
    """Name this process in every later log line (call right after fork in the child)."""
    global _role
    _role = role


def fds() -> list[int]:
    """File descriptors the log handlers write to: a child that closes fds must keep these."""
    out = []
    for handler in logger().handlers:
        sock: socket.socket | None = getattr(handler, "socket", None)    # syslog's
        if isinstance(sock, socket.socket):
            if sock.fileno() >= 0:
                out.append(sock.fileno())
        elif isinstance(handler, _StreamLines) and handler.fd >= 0:
            out.append(handler.fd)
    return sorted(set(out))

