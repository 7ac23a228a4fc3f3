"""systemd integration without libsystemd: readiness notification and socket activation.

Notification (sd_notify(3), "the NOTIFY_SOCKET protocol"): the service manager names an AF_UNIX
datagram socket in $NOTIFY_SOCKET -- a path, or an abstract name spelled with a leading '@' --
and the service sends newline-separated `KEY=VALUE` assignments to it, one datagram each.  The
daemon sends READY=1 once its socket listens and its workers run, STATUS= lines as it goes, and
STOPPING=1 when it begins to shut down.  The socket is connected before the sandbox is entered:
after pivot_root and the new network namespace neither a path nor an abstract name would be
reachable, while an already connected socket keeps working.  The sender is then the sandboxed
supervisor, not the process the manager started, hence `NotifyAccess=all` in the unit.

Socket activation (sd_listen_fds(3)): when $LISTEN_PID is our pid, $LISTEN_FDS descriptors start
at fd 3.  A vhost-user back-end serves one socket, so exactly one is accepted, and it takes the
place of `--fd`.  Both mechanisms unset their variables, as sd_notify and sd_listen_fds do with
unset_environment, so nothing the daemon starts inherits them.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

from pyvirtiofsd.supervisor.config import ConfigError

log = logging.getLogger("pyvirtiofsd")

SD_LISTEN_FDS_START = 3  # sd-daemon.h: the first passed descriptor
MAX_STATUS = 200         # keep a STATUS= line to one readable sentence


def take_listen_fd(environ: MutableMapping[str, str] | None = None) -> int | None:
    """The socket passed by socket activation, or None when the daemon was not activated.

    Variables addressed to another process (LISTEN_PID is not ours, e.g. inherited through a
    wrapper) are ignored, as sd_listen_fds does.  More than one descriptor, or a count that is
    not a number, is a configuration error.
    """
    env = os.environ if environ is None else environ
    pid = env.pop("LISTEN_PID", None)
    count = env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if count is None or pid is None:
        return None
    if not pid.isdigit() or int(pid) != os.getpid():
        return None
    if not count.isdigit():
        raise ConfigError(f"socket activation: LISTEN_FDS={count!r} is not a number")
    if int(count) != 1:
        raise ConfigError(f"socket activation passed {count} sockets; pyvirtiofsd serves exactly "
                          "one (one ListenStream= in the .socket unit)")
    fd = SD_LISTEN_FDS_START
    try:
        os.set_inheritable(fd, False)
    except OSError:
        raise ConfigError(f"socket activation: fd {fd} is not open") from None
    return fd


def notify_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET as a socket address: '@name' is abstract, '/path' a file; else None."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends state changes to the service manager; does nothing when there is none.

    Delivery failures are logged once and otherwise ignored: a manager that went away must not
    stop the daemon from serving its guest.
    """

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.sock: socket.socket | None = None
        self._failed = False
        value = env.pop("NOTIFY_SOCKET", None)
        if not value:
            return
        address = notify_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying",
                        value)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
        except OSError as e:
            sock.close()
            log.warning("cannot reach the service manager at NOTIFY_SOCKET=%s: %s", value,
                        e.strerror or e)
            return
        self.sock = sock

    @property
    def fd(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def send(self, **fields: str) -> None:
        """One datagram of KEY=VALUE lines, in the order given (READY before STATUS)."""
        if self.sock is None:
            return
        lines = []
        for key, value in fields.items():
            text = " ".join(str(value).split())  # a value may not span lines
            lines.append(f"{key}={text}")
        try:
            # sendmsg, not send: the supervisor's seccomp policy allows sendmsg alone.
            self.sock.sendmsg([("\n".join(lines) + "\n").encode()])
        except OSError as e:
            if not self._failed:
                log.warning("cannot notify the service manager: %s", e.strerror or e)
            self._failed = True

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status[:MAX_STATUS])

    def status(self, status: str) -> None:
        self.send(STATUS=status[:MAX_STATUS])

    def stopping(self, status: str = "stopping") -> None:
        self.send(STOPPING="1", STATUS=status[:MAX_STATUS])

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
