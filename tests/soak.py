"""The soak: file streams on every request queue while queue workers are SIGKILLed.

One stream per request queue creates a file, writes random data in chunks, closes it, opens it
again, reads it back and checks its SHA-256; a third of the files (up to KEEP per stream) are
kept to the end, the rest unlinked and forgotten.  A killer SIGKILLs a random worker (request
queues and hiprio) every `kill_every` seconds on average.  Every FUSE error, protocol violation
or timeout the client sees is an error.  At the end every kept file is verified again through
the daemon and on the host, all lookups and handles are dropped, and the fd counts and RSS of
the daemon's processes are compared with those measured after the warm-up.

Used by tests/test_soak.py (bounded, in CI) and bench/soak.py (long runs, one command).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvirtiofsd.common import fuse_abi as fa
from tests.conftest import Daemon
from tests.frontend import Frontend, FrontendError, FuseClient, FuseError
from tests.proctree import children

ROOT = fa.ROOT_ID
CHUNK = 64 << 10
# Files kept (looked up, so holding an fd in the daemon) per stream: a long run must not fill
# the daemon's fd table with them.
KEEP = 300


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Usage:
    supervisor_fds: int
    table_fds: int          # the fd table the spawner and all workers share
    rss_kib: int            # supervisor + spawner + workers

    @classmethod
    def of(cls, daemon: Daemon) -> Usage:
        kids = children(daemon.proc.pid)
        spawner = next(p for p, n in kids.items() if n == "pyvfs-spawner")
        return cls(len(os.listdir(f"/proc/{daemon.proc.pid}/fd")),
                   len(os.listdir(f"/proc/{spawner}/fd")),
                   _rss_kib(daemon.proc.pid) + sum(_rss_kib(p) for p in kids))


@dataclass
class Result:
    seconds: float
    requests: int = 0               # completed by the client
    served: int = 0                 # the daemon's own count (its log at exit)
    kills: int = 0
    deaths_logged: int = 0
    errors: list[str] = field(default_factory=list)
    files_written: int = 0
    files_verified: int = 0
    start: Usage | None = None
    end: Usage | None = None

    def summary(self) -> str:
        s, e = self.start, self.end
        lines = [
            f"soak: {self.seconds:.0f} s, {self.requests} requests completed by the client,"
            f" {self.served} served by the daemon",
            f"soak: {self.kills} workers killed ({self.deaths_logged} deaths logged by the"
            f" supervisor), {len(self.errors)} errors seen by the client",
            f"soak: {self.files_written} files written and read back, {self.files_verified}"
            " kept files verified at the end",
        ]
        if s and e:
            lines.append(
                f"soak: fds: supervisor {s.supervisor_fds} -> {e.supervisor_fds}, shared table"
                f" {s.table_fds} -> {e.table_fds}; RSS {s.rss_kib} -> {e.rss_kib} KiB"
                f" ({e.rss_kib - s.rss_kib:+d} KiB)")
        return "\n".join(lines + [f"soak error: {m}" for m in self.errors[:10]])


class _Stream(threading.Thread):
    def __init__(self, soak: Soak, queue: int) -> None:
        super().__init__(name=f"stream-q{queue}", daemon=True)
        self.soak = soak
        self.client = FuseClient(soak.fe, queue=queue)
        self.queue = queue
        self.rng = random.Random(soak.seed * 100 + queue)
        self.kept: list[tuple[str, int, str]] = []     # name, nodeid, sha256
        self.requests = 0
        self.files = 0

    def _call(self, fn, *args):
        result = fn(*args)
        self.requests += 1
        return result

    def one_file(self, n: int) -> None:
        c, rng = self.client, self.rng
        name = f"q{self.queue}-{n}"
        data = rng.randbytes(rng.randint(1, 4 * CHUNK))
        digest = hashlib.sha256(data).hexdigest()
        entry, opened = self._call(c.create, ROOT, name, 0o644,
                                   os.O_RDWR | os.O_CREAT | os.O_EXCL)
        for off in range(0, len(data), CHUNK):
            assert self._call(c.write, entry.nodeid, opened.fh, off, data[off:off + CHUNK]) \
                == len(data[off:off + CHUNK])
        self._call(c.release, entry.nodeid, opened.fh)
        fh = self._call(c.open, entry.nodeid, os.O_RDONLY).fh
        back = b"".join(self._call(c.read, entry.nodeid, fh, off, CHUNK)
                        for off in range(0, len(data), CHUNK))
        self._call(c.release, entry.nodeid, fh)
        if hashlib.sha256(back).hexdigest() != digest:
            raise AssertionError(f"{name}: read back {len(back)} bytes that do not match")
        if n % 3 == 0 and len(self.kept) < KEEP:
            self.kept.append((name, entry.nodeid, digest))
        else:
            self._call(c.unlink, ROOT, name)
            self.soak.forget(entry.nodeid)
            self.requests += 1
        self.files += 1

    def run(self) -> None:
        n = 0
        while not self.soak.stop.is_set():
            try:
                self.one_file(n)
            except (FuseError, FrontendError, AssertionError, OSError) as e:
                self.soak.error(f"q{self.queue} file {n}: {type(e).__name__}: {e}")
                if isinstance(e, FrontendError):
                    return                  # the connection is unusable
            n += 1


class Soak:
    def __init__(self, daemon: Daemon, request_queues: int, seed: int = 1,
                 kill_every: float = 0.5) -> None:
        self.daemon = daemon
        self.queues = request_queues
        self.seed = seed
        self.kill_every = kill_every
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.fe = Frontend.connect(daemon.socket, process=daemon.proc, queues=1 + request_queues,
                                   mem_size=256 << 20, timeout=30)
        self.hiprio = FuseClient(self.fe)
        self.kills = 0

    def error(self, msg: str) -> None:
        with self.lock:
            self.errors.append(msg)

    def forget(self, nodeid: int) -> None:
        with self.lock:                     # one hiprio ring, many streams
            self.hiprio.forget(nodeid, 1)

    def settle(self) -> None:
        """Every worker is up and done recovering: one request through each queue."""
        for q in range(1, 1 + self.queues):
            FuseClient(self.fe, queue=q).getattr(ROOT)
        with self.lock:
            self.hiprio.forget(ROOT, 0)

    def killer(self) -> None:
        rng = random.Random(self.seed)
        while not self.stop.wait(rng.uniform(0.2, 1.8) * self.kill_every):
            workers = [p for p, n in children(self.daemon.proc.pid).items()
                       if n.startswith("pyvfs-q")]
            if workers:
                try:
                    os.kill(rng.choice(workers), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def run(self, seconds: float) -> Result:
        result = Result(seconds)
        self.hiprio.init()
        # Warm-up: one file per queue without kills, then the baseline.
        streams = [_Stream(self, q) for q in range(1, 1 + self.queues)]
        for s in streams:
            s.one_file(-3)
        self.settle()
        result.start = Usage.of(self.daemon)
        killer = threading.Thread(target=self.killer, name="killer", daemon=True)
        for s in streams:
            s.start()
        killer.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and all(s.is_alive() for s in streams):
            self.stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        self.stop.set()
        killer.join()
        for s in streams:
            s.join(60)
        self.settle()
        share = self.daemon.share
        c = FuseClient(self.fe, queue=1)
        for s in streams:
            for name, nodeid, digest in s.kept:
                try:
                    fh = c.open(nodeid, os.O_RDONLY).fh
                    size = (share / name).stat().st_size
                    data = b"".join(c.read(nodeid, fh, off, CHUNK)
                                    for off in range(0, size, CHUNK))
                    c.release(nodeid, fh)
                    ok = hashlib.sha256(data).hexdigest() == digest \
                        == hashlib.sha256((share / name).read_bytes()).hexdigest()
                    if not ok:
                        self.error(f"{name}: content changed")
                    result.files_verified += ok
                    (share / name).unlink()
                    self.forget(nodeid)
                except (FuseError, FrontendError, OSError) as e:
                    self.error(f"verifying {name}: {e}")
        # Only the warm-up files are left; everything looked up was forgotten.
        self.settle()
        result.end = Usage.of(self.daemon)
        result.requests = sum(s.requests for s in streams)
        result.files_written = sum(s.files for s in streams)
        result.kills = self.kills
        result.errors = list(self.errors)
        result.deaths_logged = len(re.findall(r"worker for queue \d+ \(pid \d+\) was killed by "
                                              r"SIGKILL", self.daemon.text))
        return result

    def close(self) -> None:
        self.fe.close()


def served(daemon: Daemon) -> int:
    """The daemon's own request count, from the line it logs when it stops."""
    m = re.search(r"requests served per queue: (.*)", daemon.text)
    return sum(int(n) for n in re.findall(r"=(\d+)", m.group(1))) if m else 0


def run(daemon_factory, share: Path, seconds: float, request_queues: int = 2,
        kill_every: float = 0.5, seed: int = 1) -> Result:
    """Start a daemon, soak it, stop it; `daemon_factory(*args)` starts a Daemon."""
    daemon = daemon_factory(f"--request-queues={request_queues}", "--log-level=info")
    soak = Soak(daemon, request_queues, seed, kill_every)
    try:
        result = soak.run(seconds)
    finally:
        soak.close()
    daemon.stop()
    result.served = served(daemon)
    return result
