"""The daemons compared, each started the same way: argv + --socket-path=S --shared-dir=D.

QEMU's C virtiofsd spells its options differently (-o source=...), so it runs through
bench/c-virtiofsd.sh, which takes the common spelling.  Every daemon runs with its default
cache mode (auto) and one thread per queue (the anchors' --thread-pool-size defaults to 0).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.frontend import ANCHOR

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def default_pyvirtiofsd() -> str:
    """The console script next to the interpreter running the bench (the venv's)."""
    local = Path(sys.executable).parent / "pyvirtiofsd"
    if local.exists():
        return str(local)
    return shutil.which("pyvirtiofsd") or str(REPO / ".venv" / "bin" / "pyvirtiofsd")


@dataclass(frozen=True)
class Daemon:
    key: str
    label: str
    exe: str                      # what must exist for the daemon to run
    argv: tuple[str, ...]         # gets --socket-path=S --shared-dir=D appended
    max_queues: int               # request queues it serves
    queue_args: Callable[[int], list[str]]
    # Driven by a front-end that hands it a vhost-user inflight region (INFLIGHT_SHMFD), as
    # cloud-hypervisor does: the request path keeps the region current.
    inflight: bool = False

    def command(self, queues: int = 1) -> list[str]:
        return [*self.argv, *(self.queue_args(queues) if queues > 1 else [])]

    def missing(self) -> str:
        """Why it cannot run here, '' if it can."""
        if not (os.path.isfile(self.exe) and os.access(self.exe, os.X_OK)):
            return f"not installed ({self.exe})"
        return ""


def all_daemons(pyvirtiofsd: str | None = None, poll_us: int | None = None) -> dict[str, Daemon]:
    """The daemons by key; `pyvirtiofsd` overrides which pyvirtiofsd executable runs.  With
    `poll_us`, "py-poll" is pyvirtiofsd again with its adaptive busy-poll of the avail ring
    (--poll-us), for the depth-1 rows with and without it."""
    py = pyvirtiofsd or default_pyvirtiofsd()
    polling = {} if poll_us is None else {
        "py-poll": Daemon("py-poll", f"pyvirtiofsd --poll-us={poll_us}", py,
                          (py, "--sandbox=none", f"--poll-us={poll_us}"), max_queues=16,
                          queue_args=lambda n: [f"--request-queues={n}"])}
    return {
        "py": Daemon("py", "pyvirtiofsd", py, (py, "--sandbox=none"),
                     max_queues=16, queue_args=lambda n: [f"--request-queues={n}"]),
        **polling,
        "py-inflight": Daemon("py-inflight", "pyvirtiofsd, inflight region", py,
                              (py, "--sandbox=none"), max_queues=16,
                              queue_args=lambda n: [f"--request-queues={n}"], inflight=True),
        "rs": Daemon("rs", "Rust virtiofsd", ANCHOR, (ANCHOR, "--sandbox=none"),
                     max_queues=1, queue_args=lambda n: []),
        # Inodes kept as file handles (--inode-file-handles=prefer), run only when named in
        # --daemons: the cost of opening an inode by handle for every request.
        "py-fh": Daemon("py-fh", "pyvirtiofsd --inode-file-handles=prefer", py,
                        (py, "--sandbox=none", "--inode-file-handles=prefer"), max_queues=16,
                        queue_args=lambda n: [f"--request-queues={n}"]),
        "rs-fh": Daemon("rs-fh", "Rust virtiofsd --inode-file-handles=prefer", ANCHOR,
                        (ANCHOR, "--sandbox=none", "--inode-file-handles=prefer"),
                        max_queues=1, queue_args=lambda n: []),
        "c": Daemon("c", "C virtiofsd", C_VIRTIOFSD, ("/bin/sh", str(BENCH / "c-virtiofsd.sh")),
                    max_queues=1, queue_args=lambda n: []),
    }


class Running:
    """One daemon process in its own process group, on a socket in `workdir`."""

    def __init__(self, daemon: Daemon, shared: str, workdir: str, queues: int = 1) -> None:
        self.daemon = daemon
        self.socket = os.path.join(workdir, f"{daemon.key}.sock")
        self.log = os.path.join(workdir, f"{daemon.key}.log")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        argv = [*daemon.command(queues), f"--socket-path={self.socket}",
                f"--shared-dir={shared}"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, close_fds=True,
                                         start_new_session=True)

    def stop(self, grace: float = 5.0) -> None:
        """Waits for the exit a disconnect causes, then ends what is left of the group."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        # Whatever is left of the group (workers of a daemon that did not exit) is ours.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return ""
