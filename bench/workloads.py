"""Front-end-level workloads: FUSE requests straight onto the daemon's rings.

Each workload is a set of *lanes* (bench.ring): a lane is one stream of dependent requests,
as one guest thread would issue them; `depth` lanes per request queue run concurrently.  With
two request queues each queue gets its own `depth` lanes (two guest vCPUs, each with its own
queue).  The driver and the daemon share the machine's two cores, so these figures compare
daemons measured the same way; they are not what a guest would see.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyvirtiofsd.common import fuse_abi as fa
from tests.frontend import DirtyLog, Frontend, FuseClient

from .daemons import Daemon, Running
from .ring import Engine, ForgetSlot, Lane, Ring, Slot

Op = fa.Opcode
U64 = struct.Struct("<Q")
QUEUE_SIZE = 1024          # what QEMU's vhost-user-fs-pci accepts at most
MEM_SIZE = 64 << 20
KiB, MiB = 1 << 10, 1 << 20

# Fixture: one tree shared by every daemon (bench.harness.make_fixture).
DIR_ENTRIES = 10_000
DATA_SIZE = 64 * MiB
DIR_NAME, DATA_NAME, WDATA_NAME, SCRATCH_NAME = "dir10k", "data.bin", "wdata.bin", "scratch"


def entry_name(i: int) -> str:
    return f"f{i:05d}"


@dataclass
class Ctx:
    """One connected session: the FuseClient for set-up, then the rings for the timed part."""

    fe: Frontend
    client: FuseClient
    queues: int
    depth: int
    _rings: list[Ring] | None = None
    _hiprio: Ring | None = None

    def rings(self) -> list[Ring]:
        """The request rings, taken over from the driver (no FuseClient calls after this)."""
        if self._rings is None:
            self._rings = [Ring(self.fe.queue(1 + i)) for i in range(self.queues)]
        return self._rings

    def hiprio(self) -> Ring:
        if self._hiprio is None:
            self._hiprio = Ring(self.fe.queue(0))
        return self._hiprio

    def lanes(self, make: Callable[[Ring, int], Lane]) -> list[tuple[Ring, Lane]]:
        """`depth` lanes per request queue; lane numbers are unique across queues."""
        out = []
        for q, ring in enumerate(self.rings()):
            for i in range(self.depth):
                out.append((ring, make(ring, q * self.depth + i)))
        return out


class Counter:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> float:
        return self.n


# --- workloads: each returns (lanes, units counter or None for "requests")


def getattr_root(ctx: Ctx):
    def lane(ring: Ring, _i: int) -> Lane:
        s = Slot(ring, [fa.GETATTR_IN.size], [fa.ATTR_OUT.size])
        fa.GETATTR_IN.pack_into(s.args[0], 0, 0, 0)
        while True:
            yield s.request(Op.GETATTR, fa.ROOT_ID)
            s.reply()
    return ctx.lanes(lane), None


def getattr_file(ctx: Ctx):
    """GETATTR of a file looked up once: an inode that --inode-file-handles keeps as a file
    handle, opened for every request (the root always keeps its fd)."""
    nodeid = ctx.client.lookup(fa.ROOT_ID, DIR_NAME).nodeid
    nodeid = ctx.client.lookup(nodeid, entry_name(0)).nodeid

    def lane(ring: Ring, _i: int) -> Lane:
        s = Slot(ring, [fa.GETATTR_IN.size], [fa.ATTR_OUT.size])
        fa.GETATTR_IN.pack_into(s.args[0], 0, 0, 0)
        while True:
            yield s.request(Op.GETATTR, nodeid)
            s.reply()
    return ctx.lanes(lane), None


def lookup_getattr(ctx: Ctx):
    """LOOKUP of a name in the 10,000-entry directory, then GETATTR of the inode it gave."""
    parent = ctx.client.lookup(fa.ROOT_ID, DIR_NAME).nodeid
    names = [os.fsencode(entry_name(i)) + b"\0" for i in range(DIR_ENTRIES)]
    pairs = Counter()

    def lane(ring: Ring, i: int) -> Lane:
        lk = Slot(ring, [len(names[0])], [fa.ENTRY_OUT.size])
        ga = Slot(ring, [fa.GETATTR_IN.size], [fa.ATTR_OUT.size])
        fa.GETATTR_IN.pack_into(ga.args[0], 0, 0, 0)
        k = i * 7919   # lanes start apart in the directory
        while True:
            lk.args[0][:] = names[k % DIR_ENTRIES]
            k += 1
            yield lk.request(Op.LOOKUP, parent)
            lk.reply()
            yield ga.request(Op.GETATTR, U64.unpack_from(lk.out[0])[0])
            ga.reply()
            pairs.n += 1
    return ctx.lanes(lane), pairs


def create_cycle(ctx: Ctx):
    """CREATE, WRITE 4 KiB, RELEASE, UNLINK; then FORGET on the hiprio queue, unawaited,
    as the guest's inode eviction would send it."""
    parent = ctx.client.lookup(fa.ROOT_ID, SCRATCH_NAME).nodeid
    hp = ctx.hiprio()
    hp.free.extend(ForgetSlot(hp) for _ in range(64))
    cycles = Counter()
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC

    def lane(ring: Ring, i: int) -> Lane:
        name = os.fsencode(f"c{i:04d}") + b"\0"
        cr = Slot(ring, [fa.CREATE_IN.size, len(name)], [fa.ENTRY_OUT.size, fa.OPEN_OUT.size])
        fa.CREATE_IN.pack_into(cr.args[0], 0, flags, 0o100644, 0, 0)
        cr.args[1][:] = name
        wr = Slot(ring, [fa.WRITE_IN.size, 4 * KiB], [fa.WRITE_OUT.size])
        wr.args[1][:] = b"w" * (4 * KiB)
        rl = Slot(ring, [fa.RELEASE_IN.size], [])
        ul = Slot(ring, [len(name)], [])
        ul.args[0][:] = name
        sync_forget = ForgetSlot(hp)
        while True:
            yield cr.request(Op.CREATE, parent)
            cr.reply()
            nodeid = U64.unpack_from(cr.out[0])[0]
            fh = U64.unpack_from(cr.out[1])[0]
            fa.WRITE_IN.pack_into(wr.args[0], 0, fh, 0, 4 * KiB, 0, 0, 0)
            yield wr.request(Op.WRITE, nodeid)
            wr.reply()
            fa.RELEASE_IN.pack_into(rl.args[0], 0, fh, os.O_RDWR, 0, 0)
            yield rl.request(Op.RELEASE, nodeid)
            rl.reply()
            yield ul.request(Op.UNLINK, parent)
            ul.reply()
            if hp.free:
                hp.post(hp.free.pop().request(nodeid))
            else:                   # every posted FORGET still out: wait for this one
                yield sync_forget.request(nodeid)
            cycles.n += 1
    return ctx.lanes(lane), cycles


def _open(ctx: Ctx, name: str, flags: int) -> tuple[int, int]:
    nodeid = ctx.client.lookup(fa.ROOT_ID, name).nodeid
    return nodeid, ctx.client.open(nodeid, flags).fh


def read_random_4k(ctx: Ctx):
    nodeid, fh = _open(ctx, DATA_NAME, os.O_RDONLY)
    rnd = random.Random(4096)
    offsets = [rnd.randrange(DATA_SIZE // (4 * KiB)) * 4 * KiB for _ in range(8192)]

    def lane(ring: Ring, i: int) -> Lane:
        s = Slot(ring, [fa.READ_IN.size], [4 * KiB])
        k = i * 257
        while True:
            fa.READ_IN.pack_into(s.args[0], 0, fh, offsets[k & 8191], 4 * KiB, 0, 0, 0)
            k += 1
            yield s.request(Op.READ, nodeid)
            if s.reply() != 4 * KiB:
                raise RuntimeError("short READ from a cached file")
    return ctx.lanes(lane), None


def _sequential(ctx: Ctx, write: bool):
    name, flags = (WDATA_NAME, os.O_RDWR) if write else (DATA_NAME, os.O_RDONLY)
    nodeid, fh = _open(ctx, name, flags)
    done = Counter()
    nlanes = ctx.depth * ctx.queues
    chunks = DATA_SIZE // MiB

    def lane(ring: Ring, i: int) -> Lane:
        if write:
            s = Slot(ring, [fa.WRITE_IN.size, MiB], [fa.WRITE_OUT.size])
            s.args[1][:] = bytes(range(256)) * (MiB // 256)
        else:
            s = Slot(ring, [fa.READ_IN.size], [MiB])
        k = i
        while True:
            off = (k % chunks) * MiB
            k += nlanes    # lanes interleave: together they move through the file in order
            if write:
                fa.WRITE_IN.pack_into(s.args[0], 0, fh, off, MiB, 0, 0, 0)
                yield s.request(Op.WRITE, nodeid)
                s.reply()
                got = U64.unpack_from(s.out[0])[0] & 0xFFFFFFFF
            else:
                fa.READ_IN.pack_into(s.args[0], 0, fh, off, MiB, 0, 0, 0)
                yield s.request(Op.READ, nodeid)
                got = s.reply()
            if got != MiB:
                raise RuntimeError(f"short {'WRITE' if write else 'READ'}: {got} bytes")
            done.n += got
    return ctx.lanes(lane), done


def read_seq_1m(ctx: Ctx):
    return _sequential(ctx, write=False)


def write_seq_1m(ctx: Ctx):
    return _sequential(ctx, write=True)


def readdirplus(ctx: Ctx):
    """OPENDIR, READDIRPLUS in 4 KiB buffers (the guest's page) to the end, RELEASEDIR."""
    dirid = ctx.client.lookup(fa.ROOT_ID, DIR_NAME).nodeid
    entries = Counter()
    esize, dsize = fa.ENTRY_OUT.size, fa.DIRENT.size

    def lane(ring: Ring, _i: int) -> Lane:
        od = Slot(ring, [fa.OPEN_IN.size], [fa.OPEN_OUT.size])
        fa.OPEN_IN.pack_into(od.args[0], 0, os.O_RDONLY | os.O_DIRECTORY, 0)
        rd = Slot(ring, [fa.READ_IN.size], [4 * KiB])
        rl = Slot(ring, [fa.RELEASE_IN.size], [])
        while True:
            yield od.request(Op.OPENDIR, dirid)
            od.reply()
            fh = U64.unpack_from(od.out[0])[0]
            cookie = 0
            while True:
                fa.READ_IN.pack_into(rd.args[0], 0, fh, cookie, 4 * KiB, 0, 0, 0)
                yield rd.request(Op.READDIRPLUS, dirid)
                n = rd.reply()
                if not n:
                    break
                buf, pos = rd.out[0], 0
                while pos < n:
                    _ino, cookie, namelen, _typ = fa.DIRENT.unpack_from(buf, pos + esize)
                    pos += (esize + dsize + namelen + 7) & ~7
                    entries.n += 1
            fa.RELEASE_IN.pack_into(rl.args[0], 0, fh, 0, 0, 0)
            yield rl.request(Op.RELEASEDIR, dirid)
            rl.reply()
    return ctx.lanes(lane), entries


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    unit: str            # of the figure reported
    limit: str           # "syscall" (per-operation figures) or "memcpy" (bandwidth)
    depth: int
    build: Callable
    scale: float = 1.0   # units per counted thing -> unit (bytes -> MB)


FRONTEND = [
    Workload("getattr-d1", "GETATTR, depth 1", "ops/s", "syscall", 1, getattr_root),
    Workload("getattr-d64", "GETATTR, depth 64", "ops/s", "syscall", 64, getattr_root),
    Workload("getattr-file-d1", "GETATTR of a file, depth 1", "ops/s", "syscall", 1,
             getattr_file),
    Workload("lookup-getattr", "LOOKUP+GETATTR, 10,000-entry dir", "pairs/s", "syscall", 1,
             lookup_getattr),
    Workload("create-cycle", "CREATE+WRITE 4K+RELEASE+UNLINK", "cycles/s", "syscall", 1,
             create_cycle),
    Workload("read4k-d1", "READ 4 KiB random, depth 1", "IOPS", "syscall", 1, read_random_4k),
    Workload("read4k-d32", "READ 4 KiB random, depth 32", "IOPS", "syscall", 32,
             read_random_4k),
    Workload("read1m", "READ 1 MiB sequential, depth 4", "MB/s", "memcpy", 4, read_seq_1m,
             scale=1e-6),
    Workload("write1m", "WRITE 1 MiB sequential, depth 4", "MB/s", "memcpy", 4, write_seq_1m,
             scale=1e-6),
    Workload("readdirplus", "READDIRPLUS of 10,000 entries", "entries/s", "syscall", 1,
             readdirplus),
]


def group_cpu_ns(pgid: int) -> int:
    """CPU time of every thread in process group `pgid` (/proc/PID/task/TID/schedstat)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
            if int(data[data.rindex(")") + 2 :].split()[2]) != pgid:
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue      # exited meanwhile
    return total


def failure(run, e: Exception) -> RuntimeError:
    """What a measurement that failed says: the error, then the end of the daemon's log."""
    tail = run.log_tail(600).strip()
    return RuntimeError(f"{type(e).__name__}: {e}" + (f"\n{tail}" if tail else ""))


def measure(daemon: Daemon, wl: Workload, queues: int, shared: str, workdir: str,
            seconds: float, warmup: float, dirty_log: bool = False) -> dict[str, float]:
    """One fresh daemon, one workload: {value (in wl.unit), glitches (impossible used.idx
    values seen), cpu_us (the daemon's CPU time per request, all its processes/threads)}.
    With `dirty_log`, the daemon logs every page it writes, as during a live migration."""
    run = Running(daemon, shared, workdir, queues)
    fe = None
    log = None
    try:
        fe = Frontend.connect(run.socket, queues=1 + queues, queue_size=QUEUE_SIZE,
                              mem_size=MEM_SIZE, process=run.proc, inflight=daemon.inflight)
        if not fe.queue(1).indirect_ok:
            raise RuntimeError("the daemon did not offer INDIRECT_DESC")
        client = FuseClient(fe, queue=1)
        client.init()
        if dirty_log:
            log = DirtyLog(fe.memory)
            fe.set_log_base(log)
            fe.set_logging(True)
        ctx = Ctx(fe, client, queues, wl.depth)
        lanes, units = wl.build(ctx)
        rings = ctx.rings() + ([ctx._hiprio] if ctx._hiprio else [])
        engine = Engine(fe, rings)
        cpu0 = group_cpu_ns(run.proc.pid)
        done, elapsed = engine.run(lanes, seconds, warmup, units)
        cpu = group_cpu_ns(run.proc.pid) - cpu0
        return {"value": done / elapsed * wl.scale,
                "glitches": sum(r.glitches for r in rings),
                "cpu_us": cpu / 1000 / max(1, engine.requests)}
    except Exception as e:
        raise failure(run, e) from e
    finally:
        if fe is not None:
            fe.close()
        run.stop()
        if log is not None:
            log.close()
