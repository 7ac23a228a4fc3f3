"""Live upgrade: a new daemon takes over a running one without the front-end noticing.

`pyvirtiofsd upgrade SOCKET`, run from the new installation, is the new daemon.  It asks the
running one for its state on the status socket (`GET /upgrade`, SOCKET.status); the running
supervisor stops every started ring at an exact index between two vhost-user messages (each
worker answers once every request it took is complete), and answers with the handover record
below.  The new process takes what the record names straight from the old processes with
pidfd_getfd(2) -- the vhost-user socket and connection, guest memory, notifiers, the inflight
region, the shared state's memfds from the supervisor; from the spawner every fd the inode and
handle tables name, put back at the same numbers -- checks all of it, and answers `taken` (the
old daemon then exits, leaving sockets, pid file and connection alone) or `refused: WHY` (the
old daemon restarts its rings where they stopped and serves on; so it does when the new process
goes away without answering).  Then it starts as any daemon does -- configuration parsed by the
new code from the old command line, sandbox, spawner, workers -- on the adopted tables and
journals, and restarts each ring at the index it stopped at: the workers resume from the
journals, the front-end's queued requests are served, nodeids and handles go on.

The record (version 1) is one JSON object, validated field by field before anything is used:

    format "pyvirtiofsd-handover", version 1
    argv            the old daemon's command line (strings)
    pid, spawner    the old supervisor's and spawner's pids
    listener, conn  fds of the vhost-user socket and connection (null: none; without
                    --reconnect the socket is closed once a front-end connected)
    shared          {"arena", "journal", "stats", "session", "locks"}: memfds (common/shm.py)
    upgrades        upgrades so far
    frontend        null, or the connection's device state: features, protocol_features,
                    status; regions [[gpa, size, uaddr, mmap_offset, fd]]; inflight null or
                    [fd, mmap_size, mmap_offset, num_queues, queue_size]; vrings, one per
                    queue: {num, desc, used, avail, log, flags, base, kick, call, err,
                    enabled, started}
Fds are numbers in the old supervisor's table; pids the old supervisor's (its own pid
namespace's, in a namespace or chroot sandbox: the taker translates them); the fds the tables
name are read from the adopted arena itself (Arena.table_fds), never from the record.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import resource
import select
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any

FORMAT = "pyvirtiofsd-handover"
VERSION = 1
MAX_RECORD = 1 << 20
OFFER_TIMEOUT = 30.0      # seconds the old daemon waits for the new one's verdict
EXIT_TIMEOUT = 10.0       # seconds the new daemon waits for the old one to exit
_NR_PIDFD_GETFD = 438     # the same number on every architecture (asm-generic)


class Refused(Exception):
    """The handover cannot go on; the old daemon serves on."""


def _fd(v: Any, what: str, null: bool = False) -> int | None:
    if v is None and null:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 20:
        raise Refused(f"handover record: {what} is not an fd number")
    return v


def _int(v: Any, what: str, bits: int = 64) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << bits:
        raise Refused(f"handover record: {what} is not a {bits}-bit unsigned integer")
    return v


@dataclass(frozen=True)
class Vring:
    num: int
    desc: int
    used: int
    avail: int
    log: int
    flags: int
    base: int
    kick: int | None
    call: int | None
    err: int | None
    enabled: bool
    started: bool


@dataclass(frozen=True)
class Frontend:
    features: int
    protocol_features: int
    status: int
    regions: tuple[tuple[int, int, int, int, int], ...]
    inflight: tuple[int, int, int, int, int] | None
    vrings: tuple[Vring, ...]

    def fds(self) -> set[int]:
        out = {r[4] for r in self.regions}
        if self.inflight is not None:
            out.add(self.inflight[0])
        for v in self.vrings:
            out.update(fd for fd in (v.kick, v.call, v.err) if fd is not None)
        return out


@dataclass(frozen=True)
class Record:
    argv: tuple[str, ...]
    pid: int
    spawner: int
    listener: int | None
    conn: int | None
    shared: dict[str, int]
    upgrades: int
    frontend: Frontend | None

    def pack(self) -> bytes:
        fe = self.frontend
        doc = {"format": FORMAT, "version": VERSION, "argv": list(self.argv), "pid": self.pid,
               "spawner": self.spawner, "listener": self.listener, "conn": self.conn,
               "shared": self.shared, "upgrades": self.upgrades,
               "frontend": None if fe is None else {
                   "features": fe.features, "protocol_features": fe.protocol_features,
                   "status": fe.status, "regions": [list(r) for r in fe.regions],
                   "inflight": None if fe.inflight is None else list(fe.inflight),
                   "vrings": [v.__dict__ for v in fe.vrings]}}
        return json.dumps(doc).encode()

    @classmethod
    def unpack(cls, data: bytes, num_queues: int | None = None) -> Record:
        """Parse and check a record; Refused names the first thing wrong."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise Refused("handover record: not JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise Refused("handover record: not a pyvirtiofsd handover record")
        if doc.get("version") != VERSION:
            raise Refused(f"handover record version {doc.get('version')!r}; this daemon reads"
                          f" version {VERSION}")
        argv = doc.get("argv")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise Refused("handover record: argv is not a list of strings")
        shared = doc.get("shared")
        names = ("arena", "journal", "stats", "session", "locks")
        if not isinstance(shared, dict) or set(shared) != set(names):
            raise Refused("handover record: shared must name arena, journal, stats, session,"
                          " locks")
        return cls(tuple(argv), _int(doc.get("pid"), "pid", 31),
                   _int(doc.get("spawner"), "spawner", 31),
                   _fd(doc.get("listener"), "listener", True),
                   _fd(doc.get("conn"), "conn", True),
                   {k: _fd(shared[k], k) for k in names},
                   _int(doc.get("upgrades"), "upgrades", 32),
                   _frontend(doc.get("frontend")))


def _frontend(doc: Any) -> Frontend | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise Refused("handover record: frontend is not an object")
    regions = doc.get("regions")
    if not isinstance(regions, list) or not all(isinstance(r, list) and len(r) == 5
                                                 for r in regions):
        raise Refused("handover record: regions")
    rows = tuple((_int(r[0], "gpa"), _int(r[1], "size"), _int(r[2], "uaddr"),
                  _int(r[3], "mmap_offset"), _fd(r[4], "region")) for r in regions)
    inflight = doc.get("inflight")
    if inflight is not None:
        if not isinstance(inflight, list) or len(inflight) != 5:
            raise Refused("handover record: inflight")
        inflight = (_fd(inflight[0], "inflight"), _int(inflight[1], "mmap_size"),
                    _int(inflight[2], "mmap_offset"), _int(inflight[3], "num_queues", 16),
                    _int(inflight[4], "queue_size", 16))
    vrings = doc.get("vrings")
    if not isinstance(vrings, list):
        raise Refused("handover record: vrings")
    out = []
    for i, v in enumerate(vrings):
        if not isinstance(v, dict):
            raise Refused(f"handover record: vring {i}")
        flags = [v.get("enabled"), v.get("started")]
        if not all(isinstance(f, bool) for f in flags):
            raise Refused(f"handover record: vring {i} enabled/started")
        out.append(Vring(_int(v.get("num"), "num", 16), _int(v.get("desc"), "desc"),
                         _int(v.get("used"), "used"), _int(v.get("avail"), "avail"),
                         _int(v.get("log"), "log"), _int(v.get("flags"), "flags", 32),
                         _int(v.get("base"), "base", 16), _fd(v.get("kick"), "kick", True),
                         _fd(v.get("call"), "call", True), _fd(v.get("err"), "err", True),
                         *flags))
    return Frontend(_int(doc.get("features"), "features"),
                    _int(doc.get("protocol_features"), "protocol_features"),
                    _int(doc.get("status"), "status", 8), rows, inflight, tuple(out))


# -- the old daemon's side ---------------------------------------------------------------------
def offer(client: socket.socket, record: Record) -> None:
    """Send the record and wait for the verdict; returns when the new daemon took over,
    Refused otherwise (its reason, or that it went away or stayed silent)."""
    body = record.pack()
    client.settimeout(OFFER_TIMEOUT)
    client.sendall(f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    verdict = b""
    try:
        while not verdict.endswith(b"\n") and len(verdict) < 4096:
            more = client.recv(4096)
            if not more:
                break
            verdict += more
    except TimeoutError:
        raise Refused(f"the new daemon gave no answer in {OFFER_TIMEOUT:.0f} s") from None
    text = verdict.decode("utf-8", "replace").strip()
    if text == "taken":
        return
    if text.startswith("refused"):
        raise Refused(f"the new daemon {text}")
    raise Refused("the new daemon went away without an answer")


def refuse(client: socket.socket, why: str) -> None:
    """Tell a taker that asked in vain why, if it still listens (409, the reason as text)."""
    body = (why + "\n").encode()
    try:
        client.settimeout(1.0)
        client.sendall(b"HTTP/1.0 409 Conflict\r\nContent-Type: text/plain\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
    except OSError:
        pass


# -- the new daemon's side ---------------------------------------------------------------------
def _pidfd_getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    got = libc.syscall(_NR_PIDFD_GETFD, pidfd, fd, 0)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"taking fd {fd} from the old daemon: {os.strerror(err)}")
    return got


def _low(fd: int) -> int:
    """`fd` moved to the lowest free number (close-on-exec), the old one closed."""
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved


def lower(fd: int) -> int:
    """`fd`, moved to the lowest free number if that is lower."""
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    if moved > fd:
        os.close(moved)
        return fd
    os.close(fd)
    return moved


def _high(fd: int, floor: int) -> int:
    """`fd` moved to the lowest free number >= `floor` (close-on-exec), the old one closed."""
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    os.close(fd)
    return moved


@dataclass
class Adopted:
    """What the new daemon took over, as fds in its own table."""

    record: Record
    listener: int | None
    conn: int | None
    shared: dict[str, int]
    fds: dict[int, int]           # old supervisor fd number -> ours
    table: list[int]              # fds of the tables, at their numbers in the spawner's table
    serving: int = -1             # written "serving" (then closed) once the daemon serves

    def fd(self, old: int | None) -> int | None:
        return None if old is None else self.fds[old]

    def close(self) -> None:
        """Close every fd taken (a process that does not serve them)."""
        for fd in {*self.fds.values(), *self.table}:
            try:
                os.close(fd)
            except OSError:
                pass
        if self.serving >= 0:
            os.close(self.serving)
            self.serving = -1


def _request(target: str) -> tuple[socket.socket, bytes]:
    from pyvirtiofsd.supervisor.status import status_path

    path = status_path(target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise Refused(f"cannot reach the running daemon at {path}: {e.strerror or e}") from None
    sock = socket.socket(fileno=_high(sock.detach(), 4096))
    sock.settimeout(OFFER_TIMEOUT)
    sock.sendall(b"GET /upgrade HTTP/1.0\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise Refused("the running daemon refused the upgrade (see its log)")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if head.startswith(b"HTTP/1.0 409"):
        raise Refused("the running daemon refused: "
                      + body[:length].decode("utf-8", "replace").strip())
    if not head.startswith(b"HTTP/1.0 200") or not 0 < length <= MAX_RECORD:
        raise Refused("the running daemon did not answer with a handover record")
    while len(body) < length:
        more = sock.recv(length - len(body))
        if not more:
            raise Refused("the handover record was cut short")
        body += more
    return sock, body


def take_over(record: Record, floor: int) -> Adopted:
    """Every fd the record names, and the tables' fds put at their numbers; Refused (with
    every fd taken closed again) when anything is missing or does not fit."""
    from pyvirtiofsd.common import shm
    from pyvirtiofsd.common.arena import Arena

    taken: list[int] = []
    placed: list[int] = []
    pidfds: list[int] = []
    try:
        sup = _high(os.pidfd_open(record.pid), floor)
        pidfds.append(sup)
        spawner = _high(os.pidfd_open(record.spawner), floor)
        pidfds.append(spawner)

        def take(pidfd: int, fd: int) -> int:
            got = _high(_pidfd_getfd(pidfd, fd), floor)
            taken.append(got)
            return got

        fds: dict[int, int] = {}
        wanted = set(record.shared.values())
        for fd in (record.listener, record.conn):
            if fd is not None:
                wanted.add(fd)
        if record.frontend is not None:
            wanted |= record.frontend.fds()
        for fd in sorted(wanted):
            fds[fd] = take(sup, fd)
        shared = {k: fds[v] for k, v in record.shared.items()}
        arena = Arena(shm.attach(shared["arena"]))
        try:
            table = arena.table_fds()
        finally:
            arena.close()
        for number in table:
            got = _pidfd_getfd(spawner, number)
            if got == number:                   # the lowest free number: already in place
                placed.append(number)
                continue
            try:
                try:
                    os.fstat(number)
                except OSError:
                    pass
                else:
                    raise Refused(f"fd {number} of the tables is taken in this process")
                os.dup2(got, number, inheritable=False)
                placed.append(number)
            finally:
                os.close(got)
        if record.listener is None and record.conn is None:
            raise Refused("the running daemon has neither a socket nor a connection")
        # Down from the staging area, now that the tables' numbers are held: the event loop
        # select()s on some of them, which takes numbers below FD_SETSIZE only.
        for old, high in list(fds.items()):
            fds[old] = _low(high)
            taken[taken.index(high)] = fds[old]
        shared = {k: fds[v] for k, v in record.shared.items()}
        return Adopted(record, fds.get(record.listener) if record.listener is not None else None,
                       fds[record.conn] if record.conn is not None else None, shared, fds,
                       table)
    except BaseException:
        for fd in taken + placed:
            try:
                os.close(fd)
            except OSError:
                pass
        raise
    finally:
        for fd in pidfds:
            os.close(fd)


def _nspid(pid: int) -> int | None:
    """`pid`'s number in its own (innermost) pid namespace."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


def _host_pid(top: int, nspid: int) -> int:
    """The process of the daemon whose first process is `top` that is `nspid` in its own pid
    namespace, as this process sees it."""
    family = {top}
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            parents[int(entry)] = int(text[text.rindex(")") + 2:].split()[1])
    grew = True
    while grew:
        more = {p for p, pp in parents.items() if pp in family} - family
        family |= more
        grew = bool(more)
    for pid in sorted(family):
        if _nspid(pid) == nspid:
            return pid
    raise Refused(f"no process {nspid} in the running daemon (pid {top})")


def _wait_exit(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(int(EXIT_TIMEOUT * 1000)):
            raise OSError(errno.ETIMEDOUT, f"the old daemon (pid {pid}) did not exit")
    finally:
        os.close(pidfd)


def main(args: list[str]) -> int:
    """`pyvirtiofsd upgrade SOCKET`: become the daemon serving SOCKET."""
    from pyvirtiofsd.supervisor.config import ConfigError, parse

    if len(args) != 1 or args[0].startswith("-"):
        sys.stderr.write("usage: pyvirtiofsd upgrade SOCKET\n")
        return 2
    # Everything taken is staged at the top of the table, out of the way of the numbers the
    # tables' fds must keep (a collision is refused, never resolved by guessing).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    floor = hard - 512 if hard >= 2048 else hard // 2
    try:
        client, body = _request(args[0])
    except (Refused, OSError, ValueError) as e:
        sys.stderr.write(f"pyvirtiofsd upgrade: {e}\n")
        return 1
    adopted = None
    try:
        record = Record.unpack(body)
        try:
            config = parse(list(record.argv))
        except ConfigError as e:
            raise Refused(f"the new version refuses the running daemon's options: {e}") \
                from None
        if not hasattr(config, "sandbox"):
            raise Refused("the running daemon's options are not a daemon's")
        if config.data_plane == "native":
            # Loaded before anything forks, as a normal start does (config.check_startup):
            # a confined worker cannot map new code.
            from pyvirtiofsd.worker import engine

            try:
                engine.load()
            except engine.EngineUnavailable as e:
                raise Refused(f"--data-plane=native: {e}") from None
        # The pids as this process sees them: with a namespace or chroot sandbox the record's
        # are the supervisor's own pid namespace's.  The status socket's peer is the process
        # that made it, the daemon's first (which holds the pid file).
        top = struct.unpack("=iII", client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      12))[0]
        record = dataclasses.replace(record, pid=_host_pid(top, record.pid),
                                     spawner=_host_pid(top, record.spawner))
        adopted = take_over(record, floor)
    except (Refused, OSError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        with_reason = f"refused: {why}\n".encode()
        try:
            client.sendall(with_reason)
        except OSError:
            pass
        client.close()
        sys.stderr.write(f"pyvirtiofsd upgrade: {why}\n")
        return 1
    # The command returns once the new daemon serves (a service manager's reload command
    # must end); the daemon is its child, which goes on.
    ours, theirs = os.pipe()
    pid = os.fork()
    if pid:
        os.close(theirs)
        word = os.read(ours, 64)
        if word != b"serving":
            sys.stderr.write("pyvirtiofsd upgrade: the new daemon did not take over\n")
            return 1
        sys.stderr.write(f"pyvirtiofsd upgrade: pid {pid} serves {args[0]}\n")
        return 0
    os.close(ours)
    os.set_inheritable(theirs, False)
    from pyvirtiofsd.supervisor import cli
    from pyvirtiofsd.supervisor.systemd import Notifier

    # Under a service manager the new daemon becomes the service's main process before the old
    # one exits (NotifyAccess=all, as in etc/pyvirtiofsd.service).
    Notifier(dict(os.environ)).send(MAINPID=str(os.getpid()))
    client.sendall(b"taken\n")
    client.close()
    try:
        _wait_exit(top)
    except OSError as e:
        sys.stderr.write(f"pyvirtiofsd upgrade: {e.strerror}\n")
        cli.exit_now(1)
    adopted.serving = theirs
    return cli.serve_adopted(config, adopted)
