"""The daemon's memory: PSS of every process it runs, idle, while serving, and after LOOKUP of
100,000 files.

Hosts run hundreds of these daemons, so what counts is the whole daemon: pyvirtiofsd's
supervisor, spawner and queue workers (and the sandbox's parent when there is one), the Rust
virtiofsd's single process.  PSS (proportional set size, /proc/PID/smaps_rollup) charges a page
shared by N processes 1/N to each, so the sum over the processes is what the daemon adds to
the host.  Guest memory is a memfd the front-end maps too: the pages of it a daemon touched are
in its PSS, half charged; every daemon touches the same rings and request buffers.

Three phases on one fresh daemon per measurement:
  idle     connected, negotiated, INIT answered, nothing else;
  serving  the highest sample taken while GETATTR and READ 1 MiB requests run on the request
           queue (handles open, buffers in use);
  lookup   after LOOKUP of every name in a 100,000-entry directory, each looked up once and
           never forgotten (the inode table's cost per inode), sampled half-way and at the
           end.  Every one of the three daemons
           keeps an O_PATH fd per inode by default, so where the hard RLIMIT_NOFILE is lower
           (20,000 on the machine of docs/benchmarks.md) the phase looks up as many names as
           fit in every daemon (pyvirtiofsd keeps 40 % of its limit for itself) and the
           100,000-file figure is extrapolated from it, marked as such.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.supervisor.daemon import guest_fd_budget
from tests.frontend import Frontend, FuseClient, FuseError
from tests.proctree import children

from .daemons import Daemon, Running
from .ring import Engine, Lane, Ring, Slot
from .workloads import MEM_SIZE, QUEUE_SIZE, U64, Ctx, failure, getattr_root, read_seq_1m

BIG_DIR = "dir100k"
BIG_ENTRIES = 100_000
FD_MARGIN = 2_000          # fds a daemon needs besides one per inode


def lookup_count() -> int:
    """How many of the BIG_ENTRIES names the LOOKUP phase looks up: all of them, unless the
    hard RLIMIT_NOFILE every daemon inherits (only CAP_SYS_RESOURCE raises it) cannot hold an
    fd per inode -- virtiofsd, QEMU's virtiofsd and pyvirtiofsd all keep one by default --
    then the most, in thousands, that fit in every daemon: pyvirtiofsd gives the guest only
    part of its limit (supervisor/daemon.py guest_fd_budget; ENFILE past it)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return BIG_ENTRIES
    fit = min(hard - FD_MARGIN, guest_fd_budget(hard) - FD_MARGIN // 2)
    if fit >= BIG_ENTRIES:
        return BIG_ENTRIES
    return max(1_000, fit // 1_000 * 1_000)


LOOKUPS = lookup_count()
# The LOOKUP phase is sampled half-way too: the cost per inode is taken between the two samples,
# after the first inodes have also touched whatever a daemon sizes once (a hash index whose
# pages the first few thousand inserts all touch costs nothing more at 100,000).
HALF = LOOKUPS // 2
LOOKUP_DEPTH = 16
SERVE_SECONDS = 1.5
SAMPLE_EVERY = 0.1
LOOKUP_TIMEOUT = 600.0     # seconds for 100,000 LOOKUPs: generous for a slow daemon


@dataclass(frozen=True)
class Phase:
    key: str
    title: str


PHASES = [
    Phase("idle", "Memory (PSS), idle after INIT"),
    Phase("serving", "Memory (PSS), serving GETATTR + READ 1 MiB"),
    Phase("lookup-half", f"Memory (PSS), after LOOKUP of {HALF:,} files"),
    Phase("lookup", f"Memory (PSS), after LOOKUP of {LOOKUPS:,} files"),
]
# Derived, not measured, when the LOOKUP phase could not look up all BIG_ENTRIES names:
# lookup + (lookup - lookup-half) / (LOOKUPS - HALF) * (BIG_ENTRIES - LOOKUPS).
EXTRAPOLATED = (None if LOOKUPS == BIG_ENTRIES else
                Phase("lookup-100k", f"Memory (PSS), {BIG_ENTRIES:,} files, extrapolated "
                                     f"from {HALF:,}-{LOOKUPS:,}"))


def extrapolate(m: dict[str, dict[str, int]]) -> float:
    """The 100,000-file figure (KiB) from a run's two LOOKUP samples: the cost per inode
    between them, carried on to BIG_ENTRIES."""
    half, full = m["lookup-half"]["total"], m["lookup"]["total"]
    return full + (full - half) / (LOOKUPS - HALF) * (BIG_ENTRIES - LOOKUPS)
KEY = "memory"              # the workload key: `--workloads memory`


def big_name(i: int) -> str:
    return f"m{i:06d}"


def make_big_dir(root) -> None:
    d = root / BIG_DIR
    d.mkdir()
    for i in range(BIG_ENTRIES):
        os.close(os.open(d / big_name(i), os.O_CREAT | os.O_WRONLY, 0o644))


def tree(pid: int) -> dict[int, str]:
    """{pid: comm} of `pid` and every process below it."""
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/comm") as f:
                out[p] = f.read().strip()
        except OSError:
            continue              # exited meanwhile
        todo.extend(children(p))
    return out


def pss_kib(pid: int) -> int | None:
    """The process's PSS in KiB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def sample(pid: int) -> dict[str, int]:
    """{'comm[pid]': PSS KiB} of the daemon's processes, plus 'total'."""
    out: dict[str, int] = {}
    for p, comm in sorted(tree(pid).items()):
        kib = pss_kib(p)
        if kib is not None:
            out[f"{comm}[{p}]"] = kib
    out["total"] = sum(out.values())
    return out


class Sampler(threading.Thread):
    """Samples the daemon's PSS every SAMPLE_EVERY seconds until stopped; keeps the highest."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.best: dict[str, int] = {"total": 0}
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(SAMPLE_EVERY):
            s = sample(self.pid)
            if s["total"] > self.best["total"]:
                self.best = s

    def stop(self) -> dict[str, int]:
        self._stop_evt.set()
        self.join()
        return self.best


def lookup_all(ctx: Ctx, parent: int, start: int, stop: int
               ) -> tuple[list[tuple[Ring, Lane]], list[int], dict[int, int]]:
    """LOOKUP_DEPTH lanes that together look up names start..stop-1 of BIG_DIR (nodeid
    `parent`) once each, then end."""
    failed = [0]
    errors: dict[int, int] = {}

    def lane(ring: Ring, i: int) -> Lane:
        s = Slot(ring, [len(big_name(0)) + 1], [fa.ENTRY_OUT.size])
        for k in range(start + i, stop, LOOKUP_DEPTH):
            s.args[0][:] = os.fsencode(big_name(k)) + b"\0"
            yield s.request(fa.Opcode.LOOKUP, parent)
            try:
                s.reply()
            except FuseError as e:
                failed[0] += 1
                errors[e.errno] = errors.get(e.errno, 0) + 1
                continue
            if U64.unpack_from(s.out[0])[0] == 0:
                failed[0] += 1
    return ctx.lanes(lane), failed, errors


class LookupsFailed(Exception):
    """Some of the 100,000 LOOKUPs were refused; the phases before were measured."""

    def __init__(self, n: int, errors: dict[int, int], partial: dict[str, dict[str, int]]):
        why = ", ".join(f"{os.strerror(e)} x{k:,}" for e, k in sorted(errors.items()))
        super().__init__(f"{n:,} of {LOOKUPS:,} LOOKUPs failed ({why})")
        self.partial = partial


def measure(daemon: Daemon, shared: str, workdir: str) -> dict[str, dict[str, int]]:
    """One fresh daemon through the three phases: {phase key: sample()}.  Raises
    LookupsFailed (with the phases measured) when some LOOKUP was refused."""
    run = Running(daemon, shared, workdir, 1)
    fe = None
    out: dict[str, dict[str, int]] = {}
    try:
        fe = Frontend.connect(run.socket, queues=2, queue_size=QUEUE_SIZE, mem_size=MEM_SIZE,
                              process=run.proc)
        client = FuseClient(fe, queue=1)
        client.init()
        out["idle"] = sample(run.proc.pid)

        # Every FuseClient request comes before the lean engine takes the ring over.
        parent = client.lookup(fa.ROOT_ID, BIG_DIR).nodeid
        ctx = Ctx(fe, client, 1, 4)
        lanes = read_seq_1m(ctx)[0] + getattr_root(ctx)[0]
        engine = Engine(fe, ctx.rings())
        sampler = Sampler(run.proc.pid)
        sampler.start()
        try:
            engine.run(lanes, SERVE_SECONDS, 0.2)
        finally:
            out["serving"] = sampler.stop()

        # The rings now belong to the lean engine: a fresh Ctx's lanes use them the same way.
        for key, start, stop in (("lookup-half", 0, HALF), ("lookup", HALF, LOOKUPS)):
            lk = Ctx(fe, client, 1, LOOKUP_DEPTH, _rings=ctx.rings())
            lanes, failed, errors = lookup_all(lk, parent, start, stop)
            t0 = time.monotonic()
            engine.run(lanes, LOOKUP_TIMEOUT, 0.0)
            if time.monotonic() - t0 >= LOOKUP_TIMEOUT:
                raise RuntimeError(f"{stop - start:,} LOOKUPs took more than "
                                   f"{LOOKUP_TIMEOUT:.0f} s")
            if failed[0]:
                raise LookupsFailed(failed[0], errors, out)
            out[key] = sample(run.proc.pid)
        return out
    except LookupsFailed:
        raise
    except Exception as e:
        raise failure(run, e) from e
    finally:
        if fe is not None:
            fe.close()
        run.stop()
