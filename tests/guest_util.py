"""Helpers for the real-guest tests: which daemon to boot against and how to read the console.

The QEMU runner itself is guest/run.py (standard library only, also used by guest/demo.sh);
it is loaded here by path because guest/ is not a package.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.frontend import ANCHOR

REPO = Path(__file__).resolve().parent.parent


def _load_runner():
    spec = importlib.util.spec_from_file_location("guest_run", REPO / "guest" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body is processed.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


guest_run = _load_runner()
GuestResult = guest_run.GuestResult
Kernel = guest_run.Kernel
ensure_kernel = guest_run.ensure_kernel
run_guest = guest_run.run_guest


def no_queue_check(result: GuestResult, queues: int) -> None:
    """The anchor has no per-queue workers to inspect."""


_SERVED = re.compile(r"requests served per queue: (.*)$", re.MULTILINE)


def pyvirtiofsd_queue_check(result: GuestResult, queues: int) -> None:
    """Asserts each of the ``queues`` request-queue workers served requests during ``result``.

    Reads the supervisor's exit summary ``requests served per queue: q0=N, q1=N, ...`` (q0 is
    hiprio, q1..qN the request queues).
    """
    m = _SERVED.search(result.daemon_output)
    assert m, "pyvirtiofsd logged no per-queue request counts:\n" + result.daemon_output[-2000:]
    served = {int(q): int(n) for q, n in re.findall(r"q(\d+)=(\d+)", m.group(1))}
    for q in range(1, queues + 1):
        assert served.get(q, 0) > 0, f"request queue {q} served nothing: {m.group(0)}"


@dataclass(frozen=True)
class GuestDaemon:
    """A virtio-fs back-end the guest tests can boot against.

    ``argv`` gets ``--socket-path=S --shared-dir=D`` appended by the runner.
    """

    name: str
    argv: tuple[str, ...]
    # Request queues the daemon can serve; the Rust and C virtiofsd serve exactly one and reject
    # vring index 2 (QEMU then hangs the guest), so the multi-queue run uses min(2, this).
    max_request_queues: int
    # Extra argv to serve N request queues (the Rust anchor takes none).
    queue_args: Callable[[int], list[str]]
    # Daemon-specific evidence that every request-queue worker served requests.
    check_queues: Callable[[GuestResult, int], None]

    def command(self, request_queues: int | None = None) -> list[str]:
        extra = self.queue_args(request_queues) if request_queues else []
        return [*self.argv, *extra]

    def missing(self) -> str:
        """Why this daemon cannot be run here ('' if it can)."""
        exe = self.argv[0]
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            return f"{self.name} daemon not found at {exe}"
        return ""


DAEMONS = {
    "anchor": GuestDaemon(
        name="anchor",
        argv=(ANCHOR, "--sandbox=none"),
        max_request_queues=1,
        queue_args=lambda n: [],
        check_queues=no_queue_check,
    ),
    "pyvirtiofsd": GuestDaemon(
        name="pyvirtiofsd",
        argv=(str(REPO / ".venv" / "bin" / "pyvirtiofsd"), "--sandbox=none"),
        max_request_queues=2,
        queue_args=lambda n: [f"--request-queues={n}"],
        check_queues=pyvirtiofsd_queue_check,
    ),
}


def selected_daemon() -> GuestDaemon:
    """The daemon named by GUEST_DAEMON (anchor|pyvirtiofsd, default pyvirtiofsd)."""
    name = os.environ.get("GUEST_DAEMON", "pyvirtiofsd")
    if name not in DAEMONS:
        raise pytest.UsageError(f"GUEST_DAEMON={name!r}: expected one of {', '.join(DAEMONS)}")
    return DAEMONS[name]


def guest_unavailable() -> str:
    """Why no guest can be booted on this machine ('' if one can)."""
    if os.geteuid() != 0:
        return "guest tests need root (the daemons share files owned by anyone)"
    if not any(
        os.access(os.path.join(d, guest_run.QEMU), os.X_OK)
        for d in os.environ.get("PATH", "").split(os.pathsep)
    ):
        return f"{guest_run.QEMU} is not installed (apt-get install qemu-system-x86)"
    return ""


_STEP = re.compile(r"^@@STEP (ok|FAIL) (\S+)(?: (.*))?$")
_VAL = re.compile(r"^@@VAL (\S+) ?(.*)$")


def parse_steps(output: str) -> dict[str, tuple[bool, str]]:
    """``@@STEP ok|FAIL NAME [detail]`` lines of a workload -> {name: (ok, detail)}."""
    steps = {}
    for line in output.splitlines():
        m = _STEP.match(line.strip())
        if m:
            steps[m.group(2)] = (m.group(1) == "ok", m.group(3) or "")
    return steps


def parse_values(output: str) -> dict[str, str]:
    """``@@VAL KEY VALUE`` lines of a workload -> {key: value}."""
    vals = {}
    for line in output.splitlines():
        m = _VAL.match(line.strip())
        if m:
            vals[m.group(1)] = m.group(2).strip()
    return vals


def queue_interrupts(interrupts: str) -> dict[str, int]:
    """Interrupt counts per virtio-fs virtqueue from the guest's /proc/interrupts lines.

    Each vq has its own MSI-X vector named ``virtioN-<vq name>`` (``hiprio``, ``requests.0``,
    ``requests.1``...); a completion the device signals on a queue shows up on that line.
    """
    counts: dict[str, int] = {}
    for line in interrupts.splitlines():
        fields = line.split()
        if not fields or not fields[0].rstrip(":").isdigit():
            continue
        name = fields[-1]
        m = re.match(r"virtio\d+-(.+)$", name)
        if not m:
            continue
        counts[m.group(1)] = sum(int(f) for f in fields[1:] if f.isdigit())
    return counts
