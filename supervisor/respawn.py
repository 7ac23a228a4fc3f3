"""When to start a new worker for a queue whose worker died, and when to stop trying.

A worker that dies while serving (killed, crashed on a request) is replaced at once: its
successor completes what it left in flight (worker/recovery.py) and the guest sees no error.
A worker that dies while *starting* -- before it answered READY, or while it was resuming its
ring, which includes replaying the requests its predecessor left -- would most likely die again
the same way: a broken set-up, or a request that kills every worker that serves it.  Those
boot failures are retried after a growing delay (gunicorn refuses to respawn a worker that
failed at boot; here a transient failure still gets a few chances), and after MAX_BOOT_FAILURES
in a row the queue is failed: no worker, the front-end told through the ring's error notifier,
and one line in the log saying why.  A new SET_VRING_KICK for that ring tries again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

BACKOFF_FIRST = 0.1       # seconds before retrying after the first boot failure
BACKOFF_LIMIT = 2.0
MAX_BOOT_FAILURES = 5


@dataclass
class RespawnPolicy:
    first: float = BACKOFF_FIRST
    limit: float = BACKOFF_LIMIT
    max_failures: int = MAX_BOOT_FAILURES
    clock: object = time.monotonic
    failures: dict[int, int] = field(default_factory=dict)   # consecutive boot failures
    due: dict[int, float] = field(default_factory=dict)      # queue -> when to respawn
    failed: dict[int, str] = field(default_factory=dict)     # queue -> why it was given up

    def died(self, queue: int, booted: bool, why: str) -> float | None:
        """Record a death; returns the delay before the respawn, or None: the queue failed."""
        if booted:
            self.failures[queue] = 0
            delay = 0.0
        else:
            n = self.failures.get(queue, 0) + 1
            self.failures[queue] = n
            if n >= self.max_failures:
                self.failed[queue] = (f"its worker died {n} times in a row while starting"
                                      f" (last: {why})")
                self.due.pop(queue, None)
                return None
            delay = min(self.first * 2 ** (n - 1), self.limit)
        self.due[queue] = self.clock() + delay
        return delay

    def later(self, queue: int, delay: float) -> None:
        """Try again after `delay` without counting a failure: the start was stopped by
        something outside the worker (no free fd, the spawner being replaced)."""
        self.due[queue] = self.clock() + delay

    def give_up(self, queue: int, why: str) -> None:
        self.failed[queue] = why
        self.due.pop(queue, None)

    def booted(self, queue: int) -> None:
        self.failures[queue] = 0

    def retry(self, queue: int) -> bool:
        """A failed queue gets a fresh budget and an immediate respawn (True), if it failed."""
        if self.failed.pop(queue, None) is None:
            return False
        self.failures[queue] = 0
        self.due[queue] = self.clock()
        return True

    def next_in(self) -> float | None:
        """Seconds until the earliest respawn (0 if one is overdue), None if none is planned."""
        if not self.due:
            return None
        return max(0.0, min(self.due.values()) - self.clock())

    def take_due(self) -> list[int]:
        now = self.clock()
        ready = sorted(q for q, t in self.due.items() if t <= now)
        for q in ready:
            del self.due[q]
        return ready
