"""`pyvirtiofsd status SOCKET-or-PIDFILE [--json]`: what a running daemon is doing.

Asks the daemon's status socket (supervisor/status.py) for its status document and prints it
for a person, or as the JSON itself with --json.  The target is the vhost-user socket
(its status socket is SOCKET.status), the pid file (SOCKET.pid), the status socket, or a
--metrics-socket.  Process ids are the host's: the daemon reports the ids of its own pid
namespace, and this command maps them through /proc (SO_PEERCRED names the supervisor, whose
descendants list both ids in the NSpid line of their status file).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from typing import Any

STATUS_SUFFIX = ".status"
PID_SUFFIX = ".pid"
TIMEOUT = 5.0
USAGE = "usage: pyvirtiofsd status SOCKET-or-PIDFILE [--json]"


class StatusError(Exception):
    pass


def candidates(target: str) -> list[str]:
    """Status sockets that may serve `target`, most likely first."""
    if target.endswith(PID_SUFFIX):
        return [target[: -len(PID_SUFFIX)] + STATUS_SUFFIX]
    if target.endswith(STATUS_SUFFIX):
        return [target]
    return [target + STATUS_SUFFIX, target]


def fetch(path: str, what: str = "/status") -> tuple[bytes, int]:
    """The body of GET `what` on the status socket `path`, and the server's host pid."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        sock.sendall(f"GET {what} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if not status_line.startswith("HTTP/1.0 200"):
        raise StatusError(f"{path} answered {status_line!r}")
    return body, pid


def read_status(target: str) -> tuple[dict[str, Any], int, str]:
    errors = []
    for path in candidates(target):
        try:
            body, pid = fetch(path)
            return json.loads(body), pid, path
        except (OSError, ValueError, StatusError) as e:
            errors.append(f"{path}: {getattr(e, 'strerror', None) or e}")
    raise StatusError("no status socket answered (" + "; ".join(errors) + "); is the daemon"
                      " running, and was it started with --socket-path or --metrics-socket?")


def _nspids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def host_pids(top: int) -> dict[int, int]:
    """The daemon's own pids -> host pids, for `top` and its descendants.

    `top` is the process that made the status socket listen: the supervisor, or with a
    namespace or chroot sandbox the parent that stays outside and waits for it."""
    mapping: dict[int, int] = {}
    todo = [top]
    while todo and len(mapping) < 4096:
        pid = todo.pop()
        ids = _nspids(pid)
        if ids:
            mapping.setdefault(ids[-1], ids[0])
        todo.extend(_children(pid))
    return mapping


def render(doc: dict[str, Any], path: str) -> str:
    lines = [f"pyvirtiofsd {doc['version']}: up {_duration(doc['uptime_s'])}, sharing"
             f" {doc['shared_dir']} on {doc['socket']} (front-end {doc['frontend']});"
             f" status from {path}"]
    lines.append("processes:")
    for p in doc["processes"]:
        role = p["role"] if p["role"] != "worker" else f"worker q{p['queue']}"
        host = p["host_pid"]
        if host is None:
            lines.append(f"  {role:12} -        {p['state']}")
            continue
        inner = (f" ({p['pid']} in its pid namespace)"
                 if p["pid"] is not None and host != p["pid"] else "")
        state = f"  {p['state']}" if "state" in p else ""
        lines.append(f"  {role:12} pid {host}{inner}{state}")
    lines.append("queue  kind     requests   errors  in-flight  restarts  last opcode")
    for q in doc["queues"]:
        lines.append(f"q{q['queue']:<5} {q['kind']:8} {q['requests']:8} {q['errors']:8}"
                     f" {q['in_flight']:10} {q['restarts']:9}  {q['last_opcode'] or '-'}")
    errs = [f"q{q['queue']} " + " ".join(f"{e}={n}" for e, n in q["errnos"].items())
            for q in doc["queues"] if q["errnos"]]
    lines.append("errors by errno: " + ("; ".join(errs) if errs else "none"))
    lines.append(f"inodes in use: {doc['inodes']}, handles in use: {doc['handles']},"
                 f" worker restarts: {doc['worker_restarts']}")
    dax = doc.get("dax")
    if dax is not None:
        lines.append(f"DAX window: {dax['window_bytes'] >> 20} MiB ({dax['requests']}),"
                     f" {dax['mappings']} mappings of {dax['mapped_bytes']} bytes"
                     if dax["window_bytes"] else "DAX window: none (the front-end has none)")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f} s"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    args = [a for a in argv if a != "--json"]
    if len(args) != 1 or args[0].startswith("-"):
        print(f"pyvirtiofsd: error: {USAGE}", file=sys.stderr)
        return 2
    try:
        doc, peer, path = read_status(args[0])
    except StatusError as e:
        print(f"pyvirtiofsd: error: status of {args[0]}: {e}", file=sys.stderr)
        return 1
    # peer is 0 when the daemon's pid is not visible from here (another pid namespace).
    pids = host_pids(peer) if peer > 0 else {}
    for p in doc["processes"]:
        p["host_pid"] = pids.get(p["pid"], p["pid"]) if p["pid"] is not None else None
    if peer > 0 and doc["processes"] and doc["processes"][0]["host_pid"] != peer:
        # The sandbox's parent: it made the sockets, forked the supervisor and waits for it.
        doc["processes"].insert(0, {"role": "parent", "pid": None, "host_pid": peer,
                                    "state": "waiting outside the sandbox"})
    if "--json" in argv:
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    else:
        sys.stdout.write(render(doc, path))
    return 0
