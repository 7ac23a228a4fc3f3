"""Saving the filesystem state to a file and loading it into the next daemon.

`pyvirtiofsd snapshot SOCKET FILE` asks a running daemon for its device state -- the same
state a live migration moves (docs/state-format.md): every inode the guest knows, every open
handle, the FUSE session, the counters -- and writes it to FILE; `--restore-from FILE` has a
fresh daemon load it before it accepts the front-end, so a front-end that reconnects to the
new daemon (an in-place restart or upgrade of pyvirtiofsd) finds its nodeids, handles and FUSE
session as it left them (docs/migration.md, "Snapshot to a file").

The request travels over the daemon's status socket (SOCKET.status, supervisor/status.py) as
`POST /snapshot`; the answer's body is the encoded state.  The file is written by the command,
not by the daemon: with the command's own credentials, in its own view of the filesystem (the
daemon may be confined to the shared directory), atomically and fsync'ed (devstate.write_file,
mode 0600).  The daemon takes the state while no ring runs: rings that run are stopped at an
exact index, as GET_VRING_BASE stops them (every request taken from them is answered first),
and started again at that index once the state is taken (supervisor/vhost.py pause_rings).
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from collections.abc import Callable

from pyvirtiofsd.common import devstate
from pyvirtiofsd.common.devstate import DeviceState, StateError

SNAPSHOT_PATH = "/snapshot"
# How long the command waits for the daemon's answer: a state of the largest inode table the
# daemon keeps (2^18 inodes) is taken in seconds.
CLIENT_TIMEOUT = 300.0
# How long the daemon lets a state travel between its processes (worker -> supervisor, and
# supervisor -> worker on a restore).
TRANSFER_TIMEOUT = 300.0
USAGE = "usage: pyvirtiofsd snapshot SOCKET FILE"


class SnapshotError(Exception):
    """A snapshot that could not be taken; the message is one line."""


# -- the daemon's side ------------------------------------------------------------------------

def take(save: Callable[[int], None], check: Callable[[], None]) -> bytes:
    """The device state, from the worker that takes it (`save(fd)`: supervisor/procs.py
    save_state).  A socket pair carries it (the supervisor's seccomp policy allows socketpair
    and no pipe): the worker writes after its answer and closes its end, so this reads to EOF,
    then `check()` says whether the worker got it all out."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            save(theirs.fileno())
        finally:
            theirs.close()
        ours.settimeout(TRANSFER_TIMEOUT)
        chunks = []
        while chunk := ours.recv(1 << 20):
            chunks.append(chunk)
    check()
    return b"".join(chunks)


def give(data: bytes, load: Callable[[int], None], check: Callable[[], None]) -> None:
    """Hand an encoded state to the worker that loads it (`load(fd)`: procs.load_state), then
    wait until it has been applied (`check()`: OSError when it was refused)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            load(theirs.fileno())
        finally:
            theirs.close()
        ours.settimeout(TRANSFER_TIMEOUT)
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
    check()


def read_restore(path: str) -> DeviceState:
    """The state in `path`, checked whole (docs/state-format.md); StateError or OSError says
    what is wrong in one line.  Read before the daemon starts anything."""
    return devstate.read_file(path)


def describe(e: BaseException) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


# -- the command ------------------------------------------------------------------------------

def request(path: str) -> bytes:
    """POST /snapshot on the status socket `path`: the state, or SnapshotError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CLIENT_TIMEOUT)
        sock.connect(path)
        sock.sendall(f"POST {SNAPSHOT_PATH} HTTP/1.0\r\nHost: localhost\r\n"
                     "Content-Length: 0\r\n\r\n".encode())
        data = bytearray()
        while chunk := sock.recv(1 << 20):
            data += chunk
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if not sep or not status_line.startswith("HTTP/1.0 "):
        raise SnapshotError(f"{path} answered no HTTP response")
    if not status_line.startswith("HTTP/1.0 200"):
        reason = " ".join(body.decode(errors="replace").split()) or status_line
        raise SnapshotError(reason)
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and int(value) != len(body):
            raise SnapshotError(f"the answer was cut short ({len(body)} of {int(value)} bytes)")
    return body


def _status_socket(target: str) -> str:
    from pyvirtiofsd.supervisor.statuscmd import candidates

    for path in candidates(target):
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return path
        except OSError:
            pass
    raise SnapshotError(f"no status socket for {target} (is the daemon running, and was it"
                        " started with --socket-path?)")


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if len(argv) != 2 or any(a.startswith("-") for a in argv):
        print(f"pyvirtiofsd: error: {USAGE}", file=sys.stderr)
        return 2
    target, out = argv
    try:
        path = _status_socket(target)
        data = request(path)
        # Checked whole before it is written: a file that exists is one a daemon can load.
        state = devstate.decode(data)
        devstate.write_file(out, state)
    except (OSError, SnapshotError, StateError) as e:
        print(f"pyvirtiofsd: error: snapshot of {target} to {out}: {describe(e)}",
              file=sys.stderr)
        return 1
    print(f"{out}: {len(state.inodes)} inodes, {len(state.handles)} handles"
          f" ({len(data)} bytes)")
    return 0
