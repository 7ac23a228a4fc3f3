"""What the daemon is doing, for operators: a status document and Prometheus metrics.

Both are made from the daemon's shared state, never from its logs: the per-request statistics
the workers write (common/stats.py), the inflight journals (in-flight requests), the arena's
table headers (inodes and handles in use) and the supervisor's process table (pids, restarts).
The document is put together by the daemon (supervisor/daemon.py); this module is imported
before the sockets listen, so it stays light.

They are served over HTTP/1.0 on UNIX sockets the supervisor binds before it enters its
sandbox: always ``SOCKET.status`` next to a vhost-user socket given by path, and the opt-in
``--metrics-socket PATH``.  ``GET /status`` answers the JSON document `pyvirtiofsd status`
prints (supervisor/statuscmd.py), ``GET /metrics`` the Prometheus text exposition format
(version 0.0.4), so ``curl --unix-socket PATH http://localhost/metrics`` or any scraper that
speaks HTTP over a UNIX socket can read it.  ``SOCKET.status`` alone also takes actions,
``POST PATH``: ``POST /snapshot`` answers the device state (supervisor/snapshot.py).

The supervisor answers between two vhost-user messages, in its one thread: a client has
REQUEST_TIMEOUT to send its request and as long to take the answer, so a slow or silent client
delays the control plane by at most twice that much.  The sockets are mode 0600 (0660 with
--socket-group, like the vhost-user socket).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

REQUEST_TIMEOUT = 0.25      # seconds a client has to send its request, and to read the answer
PER_WAKEUP = 4              # clients answered before the loop looks at the front-end again
MAX_REQUEST = 4096
# An action's answer (a snapshot: the whole device state) may be large: the client has this
# long to take it.
ACTION_SEND_TIMEOUT = 30.0
STATUS_SUFFIX = ".status"

_NOT_FOUND = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 34\r\n\r\n" \
             b"only GET /status and GET /metrics\n"
_PROM_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def status_path(socket_path: str) -> str:
    """The status socket that goes with a vhost-user socket."""
    return socket_path + STATUS_SUFFIX


class StatusServer:
    """The listening sockets and the answer to one request at a time."""

    def __init__(self, listeners: list[socket.socket], paths: list[str]) -> None:
        self.listeners = listeners
        self.paths = paths
        # Where a failed accept is reported: the daemon sets its logger once logging is set
        # up (this module is imported before, and does not load the logging package).
        self.warn: Callable[[str], None] = lambda message: None
        # `POST PATH` actions (PATH: callable giving the answer's body, or raising ActionError)
        # and the listeners that take them: only SOCKET.status, never --metrics-socket, which
        # scrapers are pointed at.  supervisor/snapshot.py's POST /snapshot is one.
        self.actions: dict[str, Callable[[], bytes]] = {}
        self.action_listeners: list[socket.socket] = []
        # GET /upgrade: the connection goes to the daemon, which hands over to the client
        # (supervisor/upgrade.py); None answers it 404.
        self.upgrade: Callable[[socket.socket], None] | None = None

    @classmethod
    def open(cls, paths: list[str], group: str | None = None) -> StatusServer:
        """Bind every path (a stale socket file is replaced: the pid file or the startup
        check has made sure no daemon serves it); OSError names the path."""
        listeners: list[socket.socket] = []
        bound: list[str] = []
        try:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listeners.append(sock)
                # Only the owner (and the socket's group) may read the daemon's figures.
                old = os.umask(0o177)
                try:
                    sock.bind(path)
                finally:
                    os.umask(old)
                bound.append(path)
                if group is not None:
                    os.chown(path, -1, grp.getgrnam(group).gr_gid)
                    os.chmod(path, 0o660)
                sock.listen(8)
                sock.setblocking(False)
        except OSError as e:
            for sock in listeners:
                sock.close()
            for path in bound:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if e.filename is None:
                e.filename = path
            raise
        return cls(listeners, bound)

    def close(self) -> None:
        for sock in self.listeners:
            sock.close()
        self.listeners = []

    def unlink(self) -> None:
        for path in self.paths:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def serve(self, listener: socket.socket, collect: Callable[[], dict[str, Any]]) -> None:
        """Answer the clients waiting on `listener` (readable), each within REQUEST_TIMEOUT; at
        most PER_WAKEUP of them, so that a crowd of clients cannot hold up the control plane
        (the others are answered on the next turns of the loop)."""
        for _ in range(PER_WAKEUP):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.warn(f"status socket: accept failed: {e.strerror or e}")
                return
            try:
                method, path = _read_request_line(conn)
                if (method, path) == ("GET", "/upgrade") and self.upgrade is not None \
                        and listener in self.action_listeners:
                    self.upgrade(conn)        # the daemon's now, open or closed
                    continue
                with conn:
                    if method == "POST":
                        _send(conn, self._act(listener, path), ACTION_SEND_TIMEOUT)
                    else:
                        _send(conn, self._answer(path if method == "GET" else "", collect))
            except (OSError, ValueError):
                conn.close()                  # a client that went away, or was too slow

    def _act(self, listener: socket.socket, path: str) -> bytes:
        """The answer to `POST path`: 200 with the action's body, or one line saying why not."""
        action = self.actions.get(path)
        if action is None or listener not in self.action_listeners:
            return _text(404, "Not Found", f"no action POST {path} on this socket\n")
        try:
            body = action()
        except ActionError as e:
            return _text(e.status, e.reason, str(e) + "\n")
        head = (f"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    @staticmethod
    def _answer(path: str, collect: Callable[[], dict[str, Any]]) -> bytes:
        if path == "/status":
            body, kind = (json.dumps(collect(), indent=1) + "\n").encode(), "application/json"
        elif path == "/metrics":
            body, kind = prometheus(collect()).encode(), _PROM_TYPE
        else:
            return _NOT_FOUND
        head = f"HTTP/1.0 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("status client too slow")
    return left


class ActionError(Exception):
    """An action that cannot be carried out: the HTTP status and one line saying why."""

    def __init__(self, message: str, status: int = 409, reason: str = "Conflict") -> None:
        super().__init__(" ".join(message.split()))
        self.status = status
        self.reason = reason


def _text(status: int, reason: str, body: str) -> bytes:
    data = body.encode()
    return (f"HTTP/1.0 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def _read_request_line(conn: socket.socket) -> tuple[str, str]:
    """(method, path) of `METHOD PATH HTTP/1.x`; headers and any body are ignored."""
    path = _read_request(conn, keep_method=True)
    method, _, path = path.partition(" ")
    return method, path


def _read_request(conn: socket.socket, keep_method: bool = False) -> str:
    """The path of `GET PATH HTTP/1.x` (headers are read and ignored), within
    REQUEST_TIMEOUT in all however the client spreads its bytes.  keep_method: "METHOD PATH"
    for any method."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    data = b""
    while b"\n\n" not in data.replace(b"\r\n", b"\n"):
        conn.settimeout(_left(deadline))
        more = conn.recv(MAX_REQUEST - len(data))
        if not more:
            break
        data += more
        if len(data) >= MAX_REQUEST:
            raise ValueError("request too long")
    words = data.split(b"\n", 1)[0].split()
    if keep_method:
        if len(words) < 2:
            return ""
        return (words[0].decode("ascii", "replace") + " "
                + words[1].split(b"?", 1)[0].decode("ascii", "replace"))
    if len(words) < 2 or words[0] != b"GET":
        return ""
    return words[1].split(b"?", 1)[0].decode("ascii", "replace")


def _send(conn: socket.socket, data: bytes, timeout: float = REQUEST_TIMEOUT) -> None:
    """All of `data` within `timeout`, or TimeoutError."""
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while view:
        conn.settimeout(_left(deadline))
        view = view[conn.send(view):]


# -- Prometheus text format ----------------------------------------------------------------------

def _labels(**kv: object) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in kv.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus(doc: dict[str, Any]) -> str:
    """The status document as Prometheus text (exposition format 0.0.4)."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    family("pyvirtiofsd_info", "gauge", "Version of the daemon (always 1).")
    out.append(f"pyvirtiofsd_info{_labels(version=doc['version'])} 1")
    family("pyvirtiofsd_uptime_seconds", "gauge", "Seconds since the daemon started.")
    out.append(f"pyvirtiofsd_uptime_seconds {doc['uptime_s']:.3f}")
    family("pyvirtiofsd_frontend_connected", "gauge", "1 while a vhost-user front-end is"
           " connected.")
    out.append(f"pyvirtiofsd_frontend_connected {int(doc['frontend'] == 'connected')}")
    family("pyvirtiofsd_inodes", "gauge", "Inodes in use (each holds an O_PATH fd).")
    out.append(f"pyvirtiofsd_inodes {doc['inodes']}")
    family("pyvirtiofsd_handles", "gauge", "Open file handles.")
    out.append(f"pyvirtiofsd_handles {doc['handles']}")
    if "dax" in doc:
        family("pyvirtiofsd_dax_window_bytes", "gauge", "Size of the DAX cache window the"
               " guest may map files into (0: none).")
        out.append(f"pyvirtiofsd_dax_window_bytes {doc['dax']['window_bytes']}")
        family("pyvirtiofsd_dax_mappings", "gauge", "File ranges mapped in the DAX window.")
        out.append(f"pyvirtiofsd_dax_mappings {doc['dax']['mappings']}")
        family("pyvirtiofsd_dax_mapped_bytes", "gauge", "Bytes mapped in the DAX window.")
        out.append(f"pyvirtiofsd_dax_mapped_bytes {doc['dax']['mapped_bytes']}")
    queues = doc["queues"]
    for name, kind, key, help_ in (
            ("pyvirtiofsd_requests_total", "counter", "requests", "Requests served."),
            ("pyvirtiofsd_request_errors_total", "counter", "errors",
             "Requests answered with an error."),
            ("pyvirtiofsd_in_flight_requests", "gauge", "in_flight",
             "Requests taken from the ring and not yet answered."),
            ("pyvirtiofsd_worker_restarts_total", "counter", "restarts",
             "Workers started to replace a dead one."),
            ("pyvirtiofsd_deferred_requests_total", "counter", "deferred",
             "Requests the native request engine handed to the Python FUSE server.")):
        family(name, kind, help_)
        out.extend(f"{name}{_labels(queue=q['queue'])} {q[key]}" for q in queues)
    family("pyvirtiofsd_errors_total", "counter", "Error answers by errno.")
    for q in queues:
        out.extend(f"pyvirtiofsd_errors_total{_labels(queue=q['queue'], errno=e)} {n}"
                   for e, n in q["errnos"].items())
    family("pyvirtiofsd_opcode_requests_total", "counter", "Requests served by FUSE opcode.")
    for q in queues:
        out.extend(f"pyvirtiofsd_opcode_requests_total{_labels(queue=q['queue'], opcode=op)}"
                   f" {s['count']}" for op, s in q["ops"].items())
    family("pyvirtiofsd_opcode_errors_total", "counter", "Error answers by FUSE opcode.")
    for q in queues:
        out.extend(f"pyvirtiofsd_opcode_errors_total{_labels(queue=q['queue'], opcode=op)}"
                   f" {s['errors']}" for op, s in q["ops"].items())
    name = "pyvirtiofsd_request_duration_seconds"
    family(name, "histogram", "Time from decoding a request to its reply in guest memory.")
    bounds = [repr(us / 1e6) for us in doc["latency_buckets_us"]] + ["+Inf"]
    for q in queues:
        for op, s in q["ops"].items():
            total = 0
            for le, n in zip(bounds, s["buckets"], strict=True):
                total += n
                out.append(f"{name}_bucket{_labels(queue=q['queue'], opcode=op, le=le)} {total}")
            out.append(f"{name}_sum{_labels(queue=q['queue'], opcode=op)}"
                       f" {s['latency_sum_ns'] / 1e9:.9f}")
            out.append(f"{name}_count{_labels(queue=q['queue'], opcode=op)} {total}")
    return "\n".join(out) + "\n"
