"""The signals the daemon handles, and how each process takes them from its first instruction.

A signal that arrives before its handler exists is lost: the default action kills a process
before it removed its socket and pid file, and a pid namespace's first process (the sandboxed
supervisor) silently drops a signal it has no handler for (pid_namespaces(7)).  So `main()`
blocks them before anything else; each process installs its handlers and only then unblocks
(`handled_by`).  The mask is inherited across fork and clone, so a child is born blocking them:
what its parent forwards early stays pending until the child's handlers are in place.

Only the supervisor acts on them (and the namespace sandbox's waiting parent forwards them to
it).  The spawner, its standby and the workers ignore them: a runtime that signals the whole
process group (systemd's KillMode=control-group) gets one orderly shutdown, not workers dying
and being respawned on the way out; they end with the supervisor (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Each stops the daemon (virtiofsd: SIGTERM, SIGINT; SIGHUP as the controlling terminal closes).
HANDLED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

Handler = Callable[[int, object], None] | int | signal.Handlers


def block() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def unblock() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


def handled_by(handlers: dict[int, Handler]) -> None:
    """Install `handlers` (every signal of HANDLED must have one), then unblock: a signal that
    arrived meanwhile is delivered now, to its handler."""
    missing = HANDLED - handlers.keys()
    if missing:
        raise ValueError(f"no disposition for {sorted(missing)}")
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    unblock()


@contextmanager
def blocked() -> Iterator[None]:
    """Around a fork: the child must not run the parent's handlers before it has its own."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def child_defaults(handlers: dict[int, Handler]) -> None:
    """In a forked child, still blocking HANDLED: drop the parent's wake-up fd (its number may
    name another file here) and handlers, then unblock."""
    signal.set_wakeup_fd(-1)
    handled_by(handlers)
