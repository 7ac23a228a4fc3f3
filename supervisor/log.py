"""Logging for every process of the daemon: one line per message, to stderr or syslog.

stderr lines read `[2024-05-01T12:00:00.123Z INFO pyvirtiofsd[1234] supervisor] message`; the pid
is taken when the record is made, so forked workers show their own pid, and `set_role` names the
process ("spawner", "worker q2"). Levels are virtiofsd's: error, warn, info, debug, trace, off.
"""

from __future__ import annotations

import logging
import logging.handlers
import socket
import sys
import time

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


class _RoleFilter(logging.Filter):
    """Stamps each record with the process role current when it was made."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


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
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter())
    handler.addFilter(_RoleFilter())
    log.addHandler(handler)
    if fallback_reason:
        log.warning("%s; logging to stderr", fallback_reason)


def _syslog_handler() -> tuple[logging.Handler | None, str | None]:
    """A handler connected to the syslog socket, or None and why not."""
    try:
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_ADDRESS, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
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
        if isinstance(handler, logging.handlers.SysLogHandler):
            sock: socket.socket | None = handler.socket
            if sock is not None and sock.fileno() >= 0:
                out.append(sock.fileno())
        elif isinstance(handler, logging.StreamHandler):
            try:
                out.append(handler.stream.fileno())
            except (AttributeError, OSError, ValueError):
                pass
    return sorted(set(out))

