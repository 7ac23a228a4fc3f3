"""A lean request engine over the test front-end's rings, for daemon-bound measurements.

tests/frontend.py builds every chain from scratch and copies each reply back into a bytes
object, which is right for tests but costs the driver more than some daemons spend on the
request.  Here each in-flight request owns a *slot*: an indirect descriptor table and buffers
allocated once, described once, and re-published for every request it carries.  A request
then costs the driver a header write, an avail-ring entry and a look at the reply header in
place.  This is how the Linux virtio-fs driver frames requests (virtqueue_add_sgs uses an
indirect table whenever INDIRECT_DESC is negotiated; one sg per FUSE argument, one per page
of data), so the daemons also see realistic chains.

Connection set-up, negotiation and INIT still go through tests.frontend.Frontend/FuseClient.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable, Generator, Sequence

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.native import fence
from pyvirtiofsd.common.virtio import DESC, USED_ELEM, DescFlag, need_event
from tests.frontend import (
    DaemonGone,
    DriverQueue,
    Frontend,
    FuseError,
    ProtocolViolation,
    ReplyTimeout,
)

PAGE = 4096
_NEXT, _WRITE, _INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
_IN = fa.IN_HEADER
_OUT = fa.OUT_HEADER

# A lane is a generator that yields the slot it wants sent and is resumed once that slot's
# reply has arrived (it then reads the reply through the slot).
Lane = Generator["Slot", None, None]


class Slot:
    """One reusable request chain: fuse_in_header, body args, fuse_out_header, reply args.

    `readable`/`writable` are the argument sizes after the headers; an argument larger than a
    page is cut into page-sized descriptors, as guest pages would be.  `args[i]` is a view of
    readable argument i, `out[i]` of writable argument i.
    """

    __slots__ = ("args", "head", "hdr", "inlen", "opcode", "out", "outhdr", "ring", "table",
                 "unique", "_table_gpa")

    def __init__(self, ring: Ring, readable: Sequence[int], writable: Sequence[int]) -> None:
        mem = ring.mem
        sizes = [_IN.size, *readable, _OUT.size, *writable]
        nread = 1 + len(readable)
        offsets, total = [], 0
        for n in sizes:
            align = PAGE if n >= PAGE else 64     # data buffers are whole guest pages
            total = -(-total // align) * align
            offsets.append(total)
            total += n
        area = mem.alloc(total, PAGE)
        segs: list[tuple[int, int, int]] = []
        for i, (off, n) in enumerate(zip(offsets, sizes, strict=True)):
            flag = _WRITE if i >= nread else 0
            pos = 0
            while True:   # page-sized pieces; a zero-length argument keeps one descriptor
                k = min(PAGE, n - pos)
                segs.append((area + off + pos, k, flag))
                pos += k
                if pos >= n:
                    break
        if len(segs) > ring.size:
            raise ValueError(f"chain of {len(segs)} descriptors exceeds the queue size")
        self._table_gpa = mem.alloc(16 * len(segs), 16)
        self.table = mem.view(self._table_gpa, 16 * len(segs))
        for i, (addr, n, flag) in enumerate(segs):
            last = i + 1 == len(segs)
            DESC.pack_into(self.table, 16 * i, addr, n, flag | (0 if last else _NEXT),
                           0 if last else i + 1)
        views = [mem.view(area + off, n) for off, n in zip(offsets, sizes, strict=True)]
        self.hdr = views[0]
        self.args = views[1:nread]
        self.outhdr = views[nread]
        self.out = views[nread + 1 :]
        self.inlen = _IN.size + sum(readable)
        self.ring = ring
        self.head = ring.take_desc()
        ring.write_head(self.head, self._table_gpa, 16 * len(segs))
        ring.slots[self.head] = self
        self.unique = 0
        self.opcode = 0

    def request(self, opcode: int, nodeid: int) -> Slot:
        """Write the fuse_in_header for the next request this slot carries; returns self."""
        n = self.inlen
        self.unique = unique = self.ring.next_unique()
        self.opcode = opcode
        _IN.pack_into(self.hdr, 0, n, opcode, unique, nodeid, 0, 0, 0, 0)
        return self

    def reply(self) -> int:
        """Checks the reply header; returns the reply body length (the body is in `out`).

        Raises FuseError on an error reply: a benchmark only counts work that was done.
        """
        length, error, unique = _OUT.unpack_from(self.outhdr)
        if unique != self.unique:
            raise ProtocolViolation(f"reply unique {unique:#x}, request was {self.unique:#x}")
        if error:
            raise FuseError(-error, self.opcode)
        return length - _OUT.size


class ForgetSlot:
    """A FORGET as Linux sends it: header and body in one readable buffer, no reply part."""

    __slots__ = ("buf", "head", "ring")

    def __init__(self, ring: Ring) -> None:
        size = _IN.size + fa.FORGET_IN.size
        gpa = ring.mem.alloc(size, 64)
        self.buf = ring.mem.view(gpa, size)
        self.ring = ring
        self.head = ring.take_desc()
        ring.vq.write_desc(self.head, gpa, size, 0)
        ring.slots[self.head] = self

    def request(self, nodeid: int, nlookup: int = 1) -> ForgetSlot:
        _IN.pack_into(self.buf, 0, len(self.buf), fa.Opcode.FORGET, self.ring.next_unique(),
                      nodeid, 0, 0, 0, 0)
        fa.FORGET_IN.pack_into(self.buf, _IN.size, nlookup)
        return self


class Ring:
    """The driver half of one split ring, taken over from a tests.frontend DriverQueue.

    The queue must have nothing in flight.  Every request goes through a Slot; the ring keeps
    the avail/used indices itself and shares notification suppression with the DriverQueue.

    Ring fields the other side reads concurrently are stored through 16-bit memoryview items:
    struct.pack_into zero-fills its target before writing the bytes, so a concurrent reader
    can see 0 in between.  `glitches` counts used.idx values that could not be right (moved
    by more than was in flight): a daemon that stores the index that way shows them.
    """

    GLITCH_REREADS = 100_000

    def __init__(self, vq: DriverQueue) -> None:
        if vq.inflight:
            raise ValueError("queue has requests in flight")
        self.vq = vq
        self.mem = vq.mem
        self.size = vq.size
        self.slots: dict[int, Slot | ForgetSlot] = {}
        self.free: list[Slot | ForgetSlot] = []
        self.pending = 0
        self.glitches = 0
        self._unique = 2 + (vq.index << 48)   # distinct per queue, even (bit 0: resend/notify)
        self._avail = vq.avail.cast("H")      # [0] flags, [1] idx, [2+i] ring, [2+size] event
        self._used = vq.used.cast("H")        # [1] idx, [2+4*size] avail_event
        self._used_event = 2 + self.size
        self._avail_event = 2 + 4 * self.size

    def take_desc(self) -> int:
        return self.vq.alloc_desc()

    def write_head(self, head: int, table: int, length: int) -> None:
        self.vq.write_desc(head, table, length, _INDIRECT)

    def next_unique(self) -> int:
        self._unique += 2
        return self._unique

    def publish(self, slot: Slot | ForgetSlot) -> None:
        vq = self.vq
        self._avail[2 + (vq.avail_idx % self.size)] = slot.head
        vq.avail_idx = (vq.avail_idx + 1) & 0xFFFF
        self.pending += 1

    def post(self, slot: Slot | ForgetSlot) -> None:
        """Send without waiting (FORGET): the engine returns the slot to `free` when done."""
        self.publish(slot)
        self.flush()

    def flush(self) -> None:
        """Expose published entries (one index store) and kick if the device wants one."""
        vq = self.vq
        fence()  # ring entries are visible before the index that exposes them (spec 2.7.13)
        self._avail[1] = vq.avail_idx
        fence()  # avail.idx store before the avail_event load (spec 2.7.10)
        old, new = vq._kicked_at, vq.avail_idx
        vq._kicked_at = new
        if not vq.event_idx or need_event(self._used[self._avail_event], new, old):
            os.eventfd_write(vq.kick_fd, 1)

    def harvest(self, out: list[Slot | ForgetSlot]) -> int:
        """Append every completed slot to `out`; returns how many."""
        vq = self.vq
        used16 = self._used
        last = vq.last_used
        n = (used16[1] - last) & 0xFFFF
        if not n:
            return 0
        if n > self.pending:
            self.glitches += 1
            for _ in range(self.GLITCH_REREADS):
                n = (used16[1] - last) & 0xFFFF
                if n <= self.pending:
                    break
            else:
                raise ProtocolViolation(f"queue {vq.index}: used idx moved by {n}, "
                                        f"{self.pending} in flight")
            if not n:
                return 0
        fence()  # used entries are read only after the index that exposes them (spec 2.7.14)
        used, size, slots = vq.used, self.size, self.slots
        for _ in range(n):
            head, _len = USED_ELEM.unpack_from(used, 4 + 8 * (last % size))
            last = (last + 1) & 0xFFFF
            slot = slots.get(head)
            if slot is None:
                raise ProtocolViolation(f"queue {vq.index}: used entry for unknown head {head}")
            out.append(slot)
        vq.last_used = last
        self.pending -= n
        return n

    def arm(self) -> bool:
        """Ask for a call on the next used entry; True if one arrived meanwhile."""
        vq = self.vq
        if vq.event_idx:
            self._avail[self._used_event] = vq.last_used
        fence()  # used_event store before the used.idx re-check (spec 2.7.10 race)
        return self._used[1] != vq.last_used


class Engine:
    """Runs lanes over one or more rings until a deadline; counts completed requests."""

    def __init__(self, fe: Frontend, rings: Sequence[Ring], timeout: float = 10.0) -> None:
        self.fe = fe
        self.requests = 0     # every request completed by the last run(), FORGETs included
        self.rings = list(rings)
        self.timeout = timeout
        self._poll = select.poll()
        self._by_fd: dict[int, Ring] = {}
        for r in self.rings:
            self._poll.register(r.vq.call_fd, select.POLLIN)
            self._by_fd[r.vq.call_fd] = r
        self._poll.register(fe.sock.fileno(), select.POLLIN)

    def _wait(self, done: list[Slot]) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            for r in self.rings:
                r.harvest(done)
            if done:
                return
            if any(r.arm() for r in self.rings):
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReplyTimeout("no completion within the deadline"
                                   f" ({sum(r.pending for r in self.rings)} in flight)")
            for fd, _ev in self._poll.poll(left * 1000):
                if fd in self._by_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                else:
                    self.fe.check_alive()
                    raise DaemonGone("daemon connection became readable")

    def run(self, lanes: Sequence[tuple[Ring, Lane]], seconds: float, warmup: float = 0.0,
            units: Callable[[], float] | None = None) -> tuple[float, float]:
        """Drive the lanes for warmup+seconds; returns (units done in the window, window s).

        units() reads the workload's own counter (bytes, entries...); by default requests.
        A lane counts its units when it is resumed with a reply.  The window closes at the
        deadline or when every lane has ended; requests still in flight then are drained.
        """
        stats = [0]
        self.requests = 0
        count = units or (lambda: stats[0])
        owner: dict[int, Lane] = {}
        start = time.monotonic()
        t_warm = start + warmup
        end = t_warm + seconds
        base, t0 = (None, 0.0) if warmup > 0 else (count(), start)
        for ring, lane in lanes:
            slot = next(lane, None)
            if slot is not None:
                owner[id(slot)] = lane
                ring.publish(slot)
        for r in self.rings:
            r.flush()
        done: list[Slot] = []
        result: tuple[float, float] | None = None
        while owner:
            self._wait(done)
            touched = set()
            for slot in done:
                lane = owner.pop(id(slot), None)
                self.requests += 1
                if lane is None:            # a posted (fire-and-forget) request
                    slot.ring.free.append(slot)
                    continue
                stats[0] += 1
                if result is not None:      # past the deadline: drain only
                    lane.close()
                    continue
                try:
                    nxt = lane.send(None)
                except StopIteration:
                    continue
                owner[id(nxt)] = lane
                nxt.ring.publish(nxt)
                touched.add(nxt.ring)
            done.clear()
            for r in touched:
                r.flush()
            now = time.monotonic()
            if base is None and now >= t_warm:
                base, t0 = count(), now
            if result is None and (now >= end or not owner):
                result = (count() - (base if base is not None else 0),
                          now - (t0 if base is not None else start))
        for r in self.rings:        # posted requests still out
            while r.pending:
                self._wait(done)
                for slot in done:
                    slot.ring.free.append(slot)
                self.requests += len(done)
                done.clear()
        assert result is not None
        return result
