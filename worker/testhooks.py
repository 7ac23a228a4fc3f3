"""Deterministic kill points for the recovery tests.

A worker SIGKILLs itself at a chosen point of a chosen request, so a test can place a crash
exactly (no timing races).  Honoured only when the environment has PYVIRTIOFSD_TEST_HOOKS=1;
otherwise `load()` returns None and the worker never looks at hooks again.

    PYVIRTIOFSD_TEST_CRASH=SPEC[,SPEC...]
    SPEC   = WHAT:POINT[@FIRST[-[LAST]]]
    WHAT   = a FUSE opcode name (WRITE, CREATE...), '*' for any request, or qN for POINT boot
    POINT  = popped     taken from the ring and journaled, nothing executed
             executing  about to run the filesystem call (pre-state journaled)
             executed   the filesystem call returned; no reply yet
             replied    reply in guest memory and journaled; not pushed
             pushed     used entry published; journal slot not yet freed
             boot       worker of queue N starting (before it says READY)

On the native data plane the engine's own handlers of CREATE, MKDIR, UNLINK, RMDIR and
SETATTR (engine.PROBED_OPCODES) stop at these points themselves, and the log says "in the
native engine"; a request of another opcode a hook names is served by the Python plane.

The hook fires on matching occurrences FIRST..LAST (default FIRST = LAST = 1; `@2-` means from
the second on), counted across every worker and respawn of the daemon in the journal's shared
hook counters.  The worker kills itself with kill(2), which the worker seccomp policy refuses:
run such a daemon with --seccomp=none.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from dataclasses import dataclass

from pyvirtiofsd.common.fuse_abi import Opcode
from pyvirtiofsd.common.journal import MAX_HOOKS, Journal

log = logging.getLogger("pyvirtiofsd.testhooks")

ENV_ENABLE = "PYVIRTIOFSD_TEST_HOOKS"
ENV_CRASH = "PYVIRTIOFSD_TEST_CRASH"
POINTS = frozenset({"popped", "executing", "executed", "replied", "pushed", "boot"})
_SPEC = re.compile(r"^(?P<what>[A-Z_0-9]+|\*|q\d+):(?P<point>[a-z]+)"
                   r"(?:@(?P<first>\d+)(?P<range>-(?P<last>\d+)?)?)?$")
_FOREVER = 1 << 62


@dataclass(frozen=True, slots=True)
class CrashPoint:
    index: int          # its shared hit counter
    opcode: int         # -1: any request; for boot points the queue
    point: str
    first: int
    last: int


def parse(text: str) -> list[CrashPoint]:
    """The specs of PYVIRTIOFSD_TEST_CRASH; ValueError names the first bad one."""
    out: list[CrashPoint] = []
    for i, spec in enumerate(s.strip() for s in text.split(",") if s.strip()):
        m = _SPEC.match(spec)
        if m is None or m["point"] not in POINTS:
            raise ValueError(f"test crash spec {spec!r} is not WHAT:POINT[@FIRST[-[LAST]]]")
        if i >= MAX_HOOKS:
            raise ValueError(f"more than {MAX_HOOKS} test crash specs")
        what, point = m["what"], m["point"]
        if point == "boot":
            if not what.startswith("q"):
                raise ValueError(f"test crash spec {spec!r}: boot points name a queue (qN)")
            code = int(what[1:])
        elif what == "*":
            code = -1
        else:
            try:
                code = int(Opcode[what])
            except KeyError:
                raise ValueError(f"test crash spec {spec!r}: unknown opcode {what}") from None
        first = int(m["first"] or 1)
        last = first
        if m["range"]:
            last = int(m["last"]) if m["last"] else _FOREVER
        out.append(CrashPoint(i, code, point, first, last))
    return out


class Hooks:
    """The crash points that concern one worker."""

    def __init__(self, points: list[CrashPoint], journal: Journal, queue: int) -> None:
        self._journal = journal
        self._queue = queue
        self._boot = [p for p in points if p.point == "boot" and p.opcode == queue]
        self._points = [p for p in points if p.point != "boot"]
        self.opcode = 0          # of the request being served
        self._where = ""         # which plane serves it, for the log

    def opcodes(self) -> set[int] | None:
        """The opcodes a request-path point names; None: any request."""
        if any(p.opcode < 0 for p in self._points):
            return None
        return {p.opcode for p in self._points}

    def at(self, point: str) -> None:
        for p in self._points:
            if p.point == point and p.opcode in (-1, self.opcode):
                self._hit(p)

    def at_native(self, opcode: int, point: str) -> None:
        """at(), called by the native engine inside a request it serves itself."""
        self.opcode = opcode
        self._where = " in the native engine"
        try:
            self.at(point)
        finally:
            self._where = ""

    def at_boot(self) -> None:
        for p in self._boot:
            self._hit(p)

    def _hit(self, p: CrashPoint) -> None:
        n = self._journal.hook_hit(p.index)
        if p.first <= n <= p.last:
            log.warning("queue %d: test hook %s at %s%s (hit %d): killing this worker",
                        self._queue, _what(p), p.point, self._where, n)
            os.kill(os.getpid(), signal.SIGKILL)


def _what(p: CrashPoint) -> str:
    if p.point == "boot":
        return f"q{p.opcode}"
    if p.opcode < 0:
        return "*"
    try:
        return Opcode(p.opcode).name
    except ValueError:
        return str(p.opcode)


def load(journal: Journal, queue: int) -> Hooks | None:
    """The hooks for this worker, or None unless test hooks are enabled."""
    if os.environ.get(ENV_ENABLE) != "1":
        return None
    try:
        points = parse(os.environ.get(ENV_CRASH, ""))
    except ValueError as e:
        log.error("%s ignored: %s", ENV_CRASH, e)
        return None
    return Hooks(points, journal, queue) if points else None
