"""A queue worker: one process per virtqueue, serving its requests one at a time.

It maps guest memory from the fds its control channel brings, runs its split ring and answers
FUSE requests through the passthrough filesystem.  Control messages are handled between
requests, so a new memory table or a stop request never races a request in progress: when the
worker answers, it no longer uses what the message replaced (vhost-user "suspended" state).
That also makes GET_VRING_BASE exact: every request popped before RING_STOP was answered is
completed, so the index it reports is both the next to pop and the used index reached -- but
for lock requests still waiting (SETLKW), the one kind of request that outlives its turn: each
waits in a helper thread (worker/locks.py) and is answered out of order when its wait ends.
RING_STOP ends those waits unanswered; they stay in the journal, and a ring resumed at the
reported index serves them again.

Every request goes through the queue's inflight journal (common/journal.py): popped, executing
(for non-idempotent calls), replied (reply in guest memory), pushed.  A worker started to replace
a dead one (RingFlag.RESUME) first finishes what the journal holds (worker/recovery.py), then
pops where the dead worker would have.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import socket
import struct
from collections.abc import Callable, Iterable

from pyvirtiofsd.common import control, native
from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.control import (
    Ack,
    DaxDone,
    DaxIoDone,
    Failed,
    LogBase,
    LogState,
    MemTable,
    MemUnmap,
    Message,
    Ready,
    RingFlag,
    RingStart,
    RingStop,
    SetCall,
    SetEnable,
    SetInflight,
    Shutdown,
    StateCheck,
    StateLoad,
    StatePrepare,
    StateSave,
    Stopped,
)
from pyvirtiofsd.common.fuse_abi import OUT_HEADER, WRITE_IN, InitFlag, Opcode
from pyvirtiofsd.common.inflight import InflightDesc, QueueRegion, map_region
from pyvirtiofsd.common.journal import Journal, QueueJournal, SlotState, geometry_key
from pyvirtiofsd.common.stats import Stats
from pyvirtiofsd.worker import testhooks
from pyvirtiofsd.worker.chain import Reader, Writer, has_window, ram_prefix
from pyvirtiofsd.worker.dax import DaxClient
from pyvirtiofsd.worker.dirtylog import DirtyLog
from pyvirtiofsd.worker.engine import PROBED_OPCODES, Engine, Status, buffer_address, defer_for
from pyvirtiofsd.worker.filesystem import FsOptions
from pyvirtiofsd.worker.fuse_server import PENDING, SERVER_INIT_FLAGS, FuseServer, Session
from pyvirtiofsd.worker.guestmem import GuestMemory, GuestMemoryError, WindowBuffer
from pyvirtiofsd.worker.locks import BOARD, Waits
from pyvirtiofsd.worker.migration import StateService
from pyvirtiofsd.worker.passthrough import PassthroughFs
from pyvirtiofsd.worker.recovery import JournaledArena, JournaledFs
from pyvirtiofsd.worker.virtqueue import ChainError, RingError, SplitQueue

log = logging.getLogger("pyvirtiofsd.worker")

# fuse_in_header.opcode and .unique, read at pop for the journal (and the test hooks).
_PEEK = struct.Struct("<IQ")
_PEEK_END = 4 + _PEEK.size
_IN_SIZE = 40                    # fuse_in_header
_OUT_SIZE = OUT_HEADER.size
_WRITE_IN_SIZE = WRITE_IN.size


def _peek(parts: list[memoryview]) -> tuple[int, int]:
    if parts and len(parts[0]) >= _PEEK_END:
        try:
            return _PEEK.unpack_from(parts[0], 4)
        except TypeError:
            return 0, 0                  # a header in the DAX window: no request
    head = bytearray()
    for p in parts:
        if isinstance(p, WindowBuffer):
            break
        head += p[:_PEEK_END - len(head)]
        if len(head) >= _PEEK_END:
            return _PEEK.unpack_from(head, 4)
    return 0, 0


def _supported_init_flags(fs: PassthroughFs) -> int:
    """Every INIT flag this daemon may agree to under its options: a session carried over from
    another daemon must have no other (worker/migration.py)."""
    # ALLOW_IDMAP is never offered, but a session carried on from the Rust virtiofsd has it,
    # and the server serves it (worker/fuse_server.py).
    carried = SERVER_INIT_FLAGS | InitFlag.ALLOW_IDMAP
    try:
        return int(carried | fs.init((1 << 64) - 1))
    except OSError:
        return int(carried)


class Worker:
    # Its DAX requests to the supervisor (worker/dax.py); set for every built worker.
    dax: DaxClient | None = None

    def __init__(self, queue_index: int, channel: socket.socket, server: FuseServer,
                 arena: Arena, journal: QueueJournal, fs: JournaledFs,
                 hooks: testhooks.Hooks | None = None, engine: Engine | None = None) -> None:
        self.index = queue_index
        self.channel = channel
        self.server = server
        self.counters = arena.counters
        self.journal = journal
        self.fs = fs
        self.hooks = hooks
        self.mem = GuestMemory()
        self.queue: SplitQueue | None = None
        # num, desc, avail, used, event_idx, indirect of the running ring
        self.geometry: tuple[int, int, int, int, bool, bool] | None = None
        self.kick: int | None = None
        self.call: int | None = None
        self.err: int | None = None
        self.enabled = False
        # Where the last ring stopped, or broke: GET_VRING_BASE reports it (protocol.md 1.7).
        self.stopped_at = 0
        self.poll = select.poll()
        self.poll.register(channel.fileno(), select.POLLIN)
        # The channel alone, checked between two requests of a batch so that a stop, a pause
        # or a new memory table need not wait for the ring to run empty.
        self.control_pending = select.poll()
        self.control_pending.register(channel.fileno(), select.POLLIN)
        self.busy = False
        self.running = True
        # Lock requests waiting in helper threads (worker/locks.py): answered out of order,
        # from the main loop, when their eventfd says one finished.
        self.waits = Waits(BOARD)
        # In the fd table the workers share: a successor closes it (recovery.py reclaim).
        journal.own_fd(self.waits.fd)
        self.poll.register(self.waits.fd, select.POLLIN)
        # The native data plane (worker/engine.c), or None for the Python reference.  With it,
        # self.queue (the Python SplitQueue) only validates rings, walks the chains the engine
        # hands back and replays the journal; the engine owns the ring indices.
        self.engine = engine
        if hooks is None:
            self._on_popped, self._finish = self._on_popped_plain, self._finish_plain
        else:
            self._on_popped, self._finish = self._on_popped_hooked, self._finish_hooked
        # What an answered control message left to do: recover a resumed ring, then serve it.
        self._recover_after: SplitQueue | None = None
        self._serve_after = False
        # Its requests to the supervisor for the DAX window, and the control messages that
        # arrived while it waited for their answers.
        self.dax = DaxClient(channel)
        server.dax = self.dax
        # Device-state transfers (worker/migration.py): set by build(); the pipe I/O of a save
        # or load runs after the answer (_state_after).
        self.state: StateService | None = None
        self._state_after: Callable[[], None] | None = None
        # Dirty-page logging for live migration (worker/dirtylog.py): off until told.
        self.dirty_log = DirtyLog()
        # Buffers outside guest RAM may be in the DAX window while it exists (guestmem.py).
        self.mem.window = lambda: server.session.dax_window if server.dax is not None else 0
        # The queue's part of the front-end's inflight region (SET_INFLIGHT), kept current by
        # the journal's C writes while a ring runs; and what a ring start found in it to
        # resubmit (a new daemon process, or a journal that does not describe the ring).
        self.inflight: QueueRegion | None = None
        self._inflight_map: mmap.mmap | None = None
        self._resubmit: list[InflightDesc] = []

    @classmethod
    def build(cls, queue: int, channel: socket.socket, arena: Arena, session: Session,
              journal: Journal, make_fs: Callable[[JournaledArena], PassthroughFs],
              owned_fds: Iterable[int] = (), data_plane: str = "python",
              poll_us: int = 0, stats: Stats | None = None,
              options: FsOptions | None = None, mount_fd: int = -1,
              inode_handles: bool = False) -> Worker:
        """The worker for `queue`, in its own process: takes over what a dead predecessor left
        (its pins and fds), then builds the filesystem over the journaled tables.
        `inode_handles`: new inodes on the share's mount are kept as file handles opened
        through `mount_fd` (--inode-file-handles, checked usable by the supervisor)."""
        jq = journal.queue(queue)
        tables = JournaledArena(arena, jq)
        tables.reclaim()
        for fd in owned_fds:
            jq.own_fd(fd)
        jq.count_boot()
        hooks = testhooks.load(journal, queue)
        if hooks is not None:
            hooks.at_boot()
        fs = JournaledFs(make_fs(tables), tables, hooks)
        if inode_handles and mount_fd >= 0:
            arena.inodes.use_file_handles(mount_fd, fs.inner._mnt_id(mount_fd))
        server = FuseServer(fs, queue, session,
                            stats=stats.queue(queue) if stats is not None else None,
                            options=options)
        engine = None
        if data_plane == "native":
            # Requests an option the native handlers do not implement changes go to Python.
            engine = Engine(channel.fileno(), jq.address, arena.address, queue,
                            defer_for(options))
            engine.poll_us = poll_us
            if stats is not None:
                engine.set_stats(stats.queue(queue).address)
            if hooks is not None:
                # Test hooks fire between the Python plane's steps: the requests they name
                # are served there, from the same journal records -- except those whose
                # native handlers stop at the same points themselves.
                named = hooks.opcodes()
                if named is None:
                    engine.serve_in_python(None)
                else:
                    engine.serve_in_python(named - PROBED_OPCODES)
                    engine.probe_natively(hooks.at_native, named)
            native = fs.native_options()
            if native is not None:
                engine.serve_natively(session.address, **native)
                fs.share_credentials(engine.credentials)
                engine.watch_lock_owners(BOARD.live_address)
        worker = cls(queue, channel, server, arena, jq, fs, hooks, engine)
        inner = fs.inner
        worker.state = StateService(arena, session, options or FsOptions(), inner._proc,
                                    inner._mnt_id, queue, mount_fd,
                                    supported_flags=_supported_init_flags(inner))
        return worker

    # -- control channel ------------------------------------------------------------------
    def on_control(self) -> None:
        try:
            # One that came while this worker waited for a DAX answer first (worker/dax.py).
            dax = self.dax
            msg = (dax.deferred.pop(0) if dax is not None and dax.deferred
                   else control.receive(self.channel, control.TO_WORKER))
        except control.ProtocolError as e:
            # The supervisor is trusted to be well-formed; a bad message means a bug: say so.
            # One whose fds found no room in the fd table (EMFILE) is answered FAILED at once:
            # the supervisor must not wait, and kill this worker, for an answer never sent.
            log.error("queue %d: malformed control message: %s", self.index, e)
            if e.seq is not None:
                control.send(self.channel, Failed(e.errno, seq=e.seq))
            return
        if msg is None:                      # supervisor gone
            self.running = False
            return
        if isinstance(msg, DaxDone | DaxIoDone):
            # The answer to a DAX request this worker stopped waiting for (worker/dax.py): it
            # is no request, and is not answered.
            return
        # dispatch() owns msg.fds and closes them on every path: closing them again here would
        # close whatever another worker opened under the same numbers in the shared fd table.
        try:
            answer = self.dispatch(msg)
        except OSError as e:
            log.error("queue %d: %s failed: %s", self.index, msg.type.name, e)
            answer = Failed(e.errno or errno.EIO, seq=msg.seq)
        except (GuestMemoryError, ValueError) as e:
            log.error("queue %d: %s refused: %s", self.index, msg.type.name, e)
            answer = Failed(errno.EINVAL, seq=msg.seq)
        control.send(self.channel, answer)
        # Serving comes after the answer: the supervisor's answer timeout measures how quickly
        # this worker answers, never how deep its ring is.
        queue, self._recover_after = self._recover_after, None
        if queue is not None and queue is self.queue:
            self.recover(queue)
        after, self._state_after = self._state_after, None
        if after is not None:
            after()
        if self._serve_after:
            self._serve_after = False
            self.process()

    def _deferred(self) -> bool:
        """Whether control messages wait that came while a DAX request awaited its answer."""
        return self.dax is not None and bool(self.dax.deferred)

    def dispatch(self, msg: Message) -> Message:
        """Carry out one request (control.TO_WORKER) and return its answer."""
        if isinstance(msg, MemTable):
            self.set_mem_table(msg)
        elif isinstance(msg, RingStart):
            self.start_ring(msg)
        elif isinstance(msg, RingStop):
            return Stopped(self.stop_ring(), seq=msg.seq)
        elif isinstance(msg, SetCall):
            self._replace_call(msg.fds[0] if msg.fds else None)
            # A call fd that arrives while requests completed unsignalled must not lose them.
            self.signal()
        elif isinstance(msg, SetEnable):
            self.enabled = bool(msg.enabled)
            self._serve_after = self.enabled
        elif isinstance(msg, Shutdown):
            self.running = False
        elif msg.type in control.STATE_MESSAGES:
            return self.on_state(msg)
        elif isinstance(msg, LogBase):
            self.set_log_base(msg)
        elif isinstance(msg, LogState):
            self.set_log_state(msg)
        elif isinstance(msg, SetInflight):
            self.set_inflight(msg)
        elif isinstance(msg, MemUnmap):
            if self.queue is not None:
                log.warning("queue %d: guest memory dropped under a running ring", self.index)
                self.stop_ring()
            self.mem.clear()
        return Ack(seq=msg.seq)

    def on_state(self, msg: Message) -> Message:
        """STATE_SAVE / LOAD / CHECK / PREPARE (worker/migration.py); only with the ring
        stopped, so no request changes the tables meanwhile."""
        service = self.state
        fd = msg.fds[0] if msg.fds else None
        try:
            if service is None:
                raise OSError(errno.ENOSYS, "no device-state service")
            if isinstance(msg, StateSave | StateLoad) and self.queue is not None:
                raise OSError(errno.EBUSY, "device state is moved only while the rings are"
                                           " stopped")
            if isinstance(msg, StateCheck):
                if service.outcome:
                    return Failed(service.outcome, seq=msg.seq)
            elif isinstance(msg, StatePrepare):
                service.prepare()
            elif isinstance(msg, StateSave):
                # Taken after the answer too: a large table takes a while to walk, and the
                # front-end reads the pipe until the worker closes it.
                service.outcome = errno.EINPROGRESS
                self._state_after = lambda out=fd: service.save(out)
                fd = None
            elif isinstance(msg, StateLoad):
                service.outcome = errno.EINPROGRESS
                self._state_after = lambda src=fd: service.receive(src)
                fd = None
        finally:
            if fd is not None:
                os.close(fd)
        return Ack(seq=msg.seq)

    def set_mem_table(self, msg: MemTable) -> None:
        """Swap in a new table; the queue's views are rebuilt against it before any use."""
        new = GuestMemory()
        new.window = self.mem.window
        try:
            for r, fd in zip(msg.regions, msg.fds, strict=True):
                new.add_region(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                               r.mmap_offset, fd)
        finally:
            control.close_fds(msg.fds)
        queue = None
        if self.queue is not None and self.geometry is not None:
            num, desc, avail, used, event_idx, indirect = self.geometry
            queue = SplitQueue(new, num, desc, avail, used, self._next_avail(),
                               event_idx=event_idx, indirect=indirect)
        if self.engine is not None and self.engine.running and queue is not None:
            # The ring goes on over the new table; the engine is started again by process().
            self.engine.stop()
        if queue is not None:
            self.queue = queue
            self._apply_log()
        self.mem.clear()
        self.mem = new

    def set_inflight(self, msg: SetInflight) -> None:
        """Map the queue's part of the inflight region (or drop it); used from the next ring
        start on (vhost-user sets it before the rings start)."""
        mapped = None
        try:
            if msg.has_fd:
                mapped = map_region(msg.fds[0], msg.offset, msg.length)
        finally:
            control.close_fds(msg.fds)     # the mapping keeps the memfd
        self._drop_inflight()
        if mapped is not None:
            self._inflight_map, off = mapped
            self.inflight = QueueRegion(memoryview(self._inflight_map), off, msg.desc_num)

    def _drop_inflight(self) -> None:
        self.journal.set_inflight(0, 0)
        if self.inflight is not None:
            self.inflight.view.release()
            self.inflight = None
        if self._inflight_map is not None:
            self._inflight_map.close()
            self._inflight_map = None

    def _inflight_start(self, queue: SplitQueue, resume: bool) -> SplitQueue:
        """Bring the inflight region in line with the ring being started, and attach it.
        Resumed from the journal, the region is made to say what the journal holds; otherwise
        the spec's reconnect step says what is still in flight (common/inflight.py), and those
        heads are resubmitted before anything new is taken: popping resumes at used index +
        their number, as libvhost-user does."""
        region = self.inflight
        assert region is not None and self.geometry is not None
        used = queue.next_used
        pending: list[InflightDesc] = []
        if region.desc_num != queue.size:
            log.warning("queue %d: the inflight region is for %d descriptors, the ring has %d:"
                        " not tracked", self.index, region.desc_num, queue.size)
            return queue
        if resume:
            # A push the predecessor made but did not record is settled first (recover() would
            # do it after this), or its head would stay marked and be served again by a later
            # daemon.
            self.journal.settle_push(used)
            region.reset(used)
            for rec in self.journal.inflight():
                region.mark(rec.head, rec.counter)
        else:
            try:
                pending = region.resubmit(used)
            except ValueError as e:
                log.warning("queue %d: %s; it is started afresh", self.index, e)
                region.reset(used)
        assert self._inflight_map is not None
        # The mapping's address, without keeping a buffer export (which would stop its close).
        ptr = native.ffi.from_buffer("uint8_t[]", self._inflight_map, require_writable=True)
        try:
            address = int(native.ffi.cast("uintptr_t", ptr))
        finally:
            native.ffi.release(ptr)
        self.journal.set_inflight(address + region.offset, region.desc_num)
        if not pending:
            return queue
        num, desc, avail, used_addr, event_idx, indirect = self.geometry
        queue = SplitQueue(self.mem, num, desc, avail, used_addr, used + len(pending),
                           event_idx=event_idx, indirect=indirect)
        self.journal.reset(used, geometry_key(num, desc, avail, used_addr), num)
        self._resubmit = pending
        self._recover_after = queue
        return queue

    def start_ring(self, msg: RingStart) -> None:
        num, flags, desc, avail, used = msg.num, msg.flags, msg.desc, msg.avail, msg.used
        next_avail = msg.next_avail
        fds = list(msg.fds)
        kick = fds.pop(0) if flags & RingFlag.HAS_KICK and fds else None
        call = fds.pop(0) if flags & RingFlag.HAS_CALL and fds else None
        err = fds.pop(0) if flags & RingFlag.HAS_ERR and fds else None
        control.close_fds(fds)
        event_idx = bool(flags & RingFlag.EVENT_IDX)
        indirect = bool(flags & RingFlag.INDIRECT)
        j = self.journal
        key = geometry_key(num, desc, avail, used)
        journaled, _ = j.next_avail()
        # The journal continues when this worker replaces a dead one, or when the front-end
        # restarts the very ring it describes at the index it reported (GET_VRING_BASE while
        # the worker was down): the requests it holds are still the device's to complete.
        resume = bool(flags & RingFlag.RESUME) or (
            j.geometry == key and journaled == next_avail and j.size == num)
        try:
            if not 0 < num <= j.capacity:
                raise ValueError(f"queue size {num} is larger than the journal's {j.capacity}")
            queue = SplitQueue(self.mem, num, desc, avail, used,
                               journaled if resume else next_avail,
                               event_idx=event_idx, indirect=indirect)
        except BaseException:
            control.close_fds([fd for fd in (kick, call, err) if fd is not None])
            raise
        self.stop_ring()
        for fd in (kick, err):
            if fd is not None:
                j.own_fd(fd)                 # the call fd: _replace_call()
        if resume:
            j.repair_next()
        else:
            self._abandon()
            j.reset(next_avail, key, num)
        self.geometry = (num, desc, avail, used, event_idx, indirect)
        if self.inflight is not None:
            queue = self._inflight_start(queue, resume)
        self.queue = queue
        self._apply_log()
        self.kick = kick
        if kick is not None:
            self.poll.register(kick, select.POLLIN)
        self._replace_call(call)
        self.err = err
        self.enabled = bool(flags & RingFlag.ENABLED)
        if resume:
            self._recover_after = queue
        # Rings start with SET_VRING_KICK; a front-end need not kick again (protocol.md 1.8).
        self._serve_after = True

    # -- dirty-page logging (worker/dirtylog.py) --------------------------------------------
    def set_log_base(self, msg: LogBase) -> None:
        """A new log (or none): every write from the next request on marks it.  Applied
        between two requests, so nothing writes through the old mapping when it is dropped."""
        try:
            old = self.dirty_log.replace(msg.fds[0] if msg.fds else None, msg.size, msg.offset)
        finally:
            control.close_fds(msg.fds)
        self._apply_log()
        DirtyLog.drop(old)

    def set_log_state(self, msg: LogState) -> None:
        log = self.dirty_log
        log.log_all, log.ring, log.used_gpa = bool(msg.log_all), bool(msg.ring), msg.used_gpa
        self._apply_log()

    def _apply_log(self) -> None:
        """Hand the logging state to whatever writes guest memory: the queue and the engine."""
        log = self.dirty_log
        active = log.active
        if self.queue is not None:
            self.queue.set_log(log if active else None)
        if self.engine is not None:
            self.engine.set_log(log.address if active else 0, log.size, log.ring, log.used_gpa)

    def _next_avail(self) -> int:
        if self.engine is not None and self.engine.running:
            return self.engine.next_avail
        return self.queue.next_avail if self.queue is not None else self.stopped_at

    def _start_engine(self, queue: SplitQueue) -> None:
        """Hand the ring to the engine where the Python queue has brought it (recovery)."""
        engine = self.engine
        if engine is None or engine.running or self.geometry is None:
            return
        num, desc, avail, used, event_idx, indirect = self.geometry
        engine.set_regions([(g, n, u, buffer_address(v)) for g, n, u, v in self.mem.views()])
        engine.start(num, desc, avail, used, queue.next_avail, event_idx=event_idx,
                     indirect=indirect)
        engine.set_fds(self.call, self.err)

    def stop_ring(self) -> int:
        if self._recover_after is not None:
            # Stopped before the journal was replayed: the next start replays it.
            self._recover_after = None
        # Resubmissions not journaled yet: the region still holds them, for the next start.
        self._resubmit = []
        self.journal.set_inflight(0, 0)
        if self.queue is not None:
            self.stopped_at = self._next_avail()
        had_ring = self.queue is not None
        # Requests waiting for a lock stay in the journal: a resumed ring serves them again.
        self.waits.cancel_all()
        self.queue = None
        if self.engine is not None:
            self.engine.stop()
            self.engine.set_fds(None, None)
            if had_ring:
                log.debug("queue %d: ring stopped at %d; %d request(s) answered natively",
                          self.index, self.stopped_at, self.engine.native)
        if self.kick is not None:
            self.poll.unregister(self.kick)
            self._close(self.kick)
            self.kick = None
        self._replace_call(None)
        if self.err is not None:
            self._close(self.err)
            self.err = None
        return self.stopped_at

    def _close(self, fd: int) -> None:
        self.journal.disown_fd(fd)       # before the close: a kill in between only leaks it
        os.close(fd)

    def _replace_call(self, fd: int | None) -> None:
        if self.call is not None:
            self._close(self.call)
        if fd is not None:
            self.journal.own_fd(fd)
        self.call = fd
        if self.engine is not None:
            self.engine.set_fds(fd, self.err)

    def _abandon(self) -> None:
        """The ring restarts elsewhere: requests still journaled will never be completed."""
        pending = self.journal.inflight()
        if pending:
            log.warning("queue %d: ring restarted at another index or address; %d journaled"
                        " request(s) of the old ring dropped", self.index, len(pending))
        for rec in pending:
            self.fs.abandon(rec)
        self.waits.cancel_all()

    # -- recovery ------------------------------------------------------------------------
    def recover(self, queue: SplitQueue) -> None:
        """Complete, in pop order and exactly once, what the journal holds (recovery.py)."""
        j = self.journal
        resubmitted = bool(self._resubmit)
        if resubmitted:
            self._journal_resubmissions(queue)
        j.settle_push(queue.next_used)
        todo = j.inflight()
        if not todo:
            # The predecessor may have died between a push and its notification.
            self.signal()
            return
        if not resubmitted:
            log.info("queue %d: completing %d request(s) the previous worker left in flight",
                     self.index, len(todo))
        for rec in todo:
            if self.hooks is not None:
                self.hooks.opcode = rec.opcode
            if rec.state == SlotState.REPLIED:
                self._complete(queue, rec.head, rec.used_len)
                continue
            try:
                chain = queue.walk(rec.head)
            except ChainError as e:
                log.warning("queue %d: journaled descriptor chain %d: %s", self.index,
                            rec.head, e)
                self._complete(queue, rec.head, 0)
                continue
            self.fs.begin_replay(rec)
            try:
                used = self._serve(chain)
            finally:
                self.fs.end_replay()
            if used == PENDING:
                self._wait(rec.head)         # a lock it waited for: waited for again
                continue
            self._complete(queue, rec.head, used)
        # As libvhost-user after reconnecting: one call, whatever the suppression state says.
        self.signal()

    def _journal_resubmissions(self, queue: SplitQueue) -> None:
        """The heads the inflight region holds (spec "Inflight I/O tracking", on reconnect),
        journaled as popped, in fetch order, from the avail positions they must have had (used
        index + rank), all of them before any is served: the journal recovery then serves each
        exactly once, and a worker killed meanwhile leaves its successor the whole list."""
        pending, self._resubmit = self._resubmit, []
        j = self.journal
        base = (queue.next_avail - len(pending)) & 0xFFFF
        log.info("queue %d: resubmitting %d request(s) the inflight region holds",
                 self.index, len(pending))
        for rank, d in enumerate(pending):
            try:
                opcode, unique = _peek(queue.walk(d.head).readable)
            except ChainError:
                opcode, unique = 0, 0            # recovery answers it with used length 0
            j.popped(d.head, (base + rank) & 0xFFFF, opcode, unique, effects=False)

    # -- data plane -----------------------------------------------------------------------
    def signal(self) -> None:
        if self.call is not None:
            os.eventfd_write(self.call, 1)

    def process(self) -> None:
        """Serve every available chain, re-checking after re-enabling notifications.

        Control messages that arrive meanwhile are handled between two requests; one that
        stops, disables or replaces the ring ends this batch (a replaced ring is then served).
        """
        if self.busy:
            return               # called from a control message handled inside a batch
        self.busy = True
        try:
            if self.engine is not None:
                self._process_native(self.engine)
                return
            while self.running and self.queue is not None and self.enabled:
                if self._batch(self.queue):
                    break
        finally:
            self.busy = False

    def _process_native(self, engine: Engine, wait: bool = False) -> None:
        """process() on the native plane: the engine serves, Python answers what it hands
        back and handles control messages between two of its batches.  With `wait` (the
        worker's main loop only: control messages handled here never nest), the engine also
        sleeps in C while the ring is empty, so a kick costs no Python at all."""
        while self.running and self.queue is not None and self.enabled:
            if self._deferred():
                # Control messages that came during a DAX request, before the next request.
                self.on_control()
                continue
            queue = self.queue
            self._start_engine(queue)
            # While a lock request waits, the main loop polls for its end: no sleep in C.
            sleep = wait and not self.waits.pending
            status = engine.serve(self.kick) if sleep else engine.run()
            if status is Status.EMPTY:
                break
            if status is Status.CONTROL:
                self.on_control()
            elif status is Status.DEFER:
                if self.server.stats is not None:
                    self.server.stats.deferred()
                head = engine.head
                readable, writable = engine.chain()
                self._on_popped(_peek(readable)[0])
                writer = Writer(writable) if writable else None
                reader = Reader(readable)
                header = engine.header()
                if header is not None:
                    reader.skip(_IN_SIZE)       # decoded once, by the engine
                used = self.server.handle(reader, writer, header)
                del readable, writable, reader, writer
                if used == PENDING:
                    self._wait(head)
                else:
                    self._finish(engine, head, used)
            elif status is Status.WALK:
                self._walk_in_python(engine, queue)
            else:
                log.error("queue %d: ring is broken, stopped processing it: %s", self.index,
                          engine.why)
                # The engine left next_avail at the entry it refused and wrote the err fd.
                self.stopped_at = engine.next_avail
                self.queue = None

    def _walk_in_python(self, engine: Engine, queue: SplitQueue) -> None:
        """A chain the engine would not walk: the reference walker serves or rejects it."""
        head, pos = engine.head, engine.pos
        j = self.journal
        try:
            chain = queue.walk(head)
        except ChainError as e:
            j.popped(head, pos, 0, 0, effects=False)
            log.warning("queue %d: malformed descriptor chain %d: %s", self.index, head, e)
            if self.hooks is not None:
                self.hooks.opcode = 0
            self._finish(engine, head, 0)
            return
        opcode, unique = _peek(chain.readable)
        j.popped(head, pos, opcode, unique)
        self._on_popped(opcode)
        used = self._serve(chain)
        if used == PENDING:
            self._wait(head)
        else:
            self._finish(engine, head, used)

    # What Python does around a request it serves for the engine: nothing more, or (a worker
    # with test hooks, chosen once at boot) the hook points of the Python plane's steps.
    def _on_popped_plain(self, opcode: int) -> None:
        pass

    @staticmethod
    def _finish_plain(engine: Engine, head: int, used: int) -> None:
        engine.complete(head, used)

    def _on_popped_hooked(self, opcode: int) -> None:
        assert self.hooks is not None
        self.hooks.opcode = opcode
        self.hooks.at("popped")

    def _finish_hooked(self, engine: Engine, head: int, used: int) -> None:
        hooks = self.hooks
        assert hooks is not None
        engine.replied(head, used)
        hooks.at("replied")
        engine.push(head, used)
        hooks.at("pushed")
        engine.pushed(head)

    def _batch(self, queue: SplitQueue) -> bool:
        """Serve `queue` until it is empty (True) or something else took over (False)."""
        j = self.journal
        hooks = self.hooks
        pending = self.control_pending.poll
        try:
            while True:
                while True:
                    if self._deferred() or pending(0):
                        self.on_control()
                        if self.queue is not queue or not self.enabled or not self.running:
                            return False
                    pos = queue.next_avail
                    try:
                        chain = queue.pop()
                    except ChainError as e:
                        j.popped(e.head, pos, 0, 0, effects=False)
                        log.warning("queue %d: malformed descriptor chain %d: %s",
                                    self.index, e.head, e)
                        if hooks is not None:
                            hooks.opcode = 0
                        self._complete(queue, e.head, 0)
                        continue
                    if chain is None:
                        break
                    opcode, unique = _peek(chain.readable)
                    j.popped(chain.head, pos, opcode, unique)
                    if hooks is not None:
                        hooks.opcode = opcode
                        hooks.at("popped")
                    used = self._serve(chain)
                    if used == PENDING:
                        self._wait(chain.head)
                    else:
                        self._complete(queue, chain.head, used)
                if not queue.enable_notification():
                    return True
        except RingError as e:
            log.error("queue %d: ring is broken, stopped processing it: %s", self.index, e)
            # pop() left next_avail at the entry it refused.
            self.stopped_at = queue.next_avail
            self.queue = None
            # The front-end learns through the error notifier (vhost-user SET_VRING_ERR); the
            # device needs a reset (virtio spec 2.1.2, DEVICE_NEEDS_RESET).
            if self.err is not None:
                os.eventfd_write(self.err, 1)
            return True

    def _serve(self, chain) -> int:
        if chain.window:
            return self._serve_window(chain)
        writer = Writer(chain.writable) if chain.writable else None
        return self.server.handle(Reader(chain.readable), writer)

    def _serve_window(self, chain) -> int:
        """A chain with buffers in the DAX window (virtqueue.py): only READ's data (the
        writable part after fuse_out_header) and WRITE's data (the readable part after
        fuse_in_header and fuse_write_in) may lie there -- the front-end moves them (FS_IO);
        anything else is a malformed chain, completed with used length 0 as any other."""
        readable, writable = chain.readable, chain.writable
        opcode = _peek(readable)[0] if ram_prefix(readable) >= _PEEK_END else 0
        if opcode == Opcode.READ:
            ok = not has_window(readable) and ram_prefix(writable) >= _OUT_SIZE
        elif opcode == Opcode.WRITE:
            ok = ram_prefix(readable) >= _IN_SIZE + _WRITE_IN_SIZE and not has_window(writable)
        else:
            ok = False
        if not ok:
            log.warning("queue %d: malformed descriptor chain %d: buffers in the DAX window"
                        " outside the data of a READ or WRITE (opcode %d)", self.index,
                        chain.head, opcode)
            return 0
        writer = Writer(writable, window=True) if writable else None
        return self.server.handle(Reader(readable, window=True), writer)

    def _complete(self, queue: SplitQueue, head: int, used: int) -> None:
        """Journal the reply, push it, free the slot, notify if asked to."""
        j = self.journal
        hooks = self.hooks
        j.replied(head, used, queue.next_used)
        if hooks is not None:
            hooks.at("replied")
        queue.push(head, used)
        if hooks is not None:
            hooks.at("pushed")
        j.pushed(head)
        self.counters.add(self.index, 1)
        if queue.should_notify():
            self.signal()

    # -- lock requests answered out of order (worker/locks.py) ---------------------------------
    def _wait(self, head: int) -> None:
        """The request just served waits for a lock, in a helper thread."""
        blocked = self.server.take_blocked()
        try:
            self.waits.start(head, blocked)
        except OSError as e:
            blocked.done(e.errno or errno.ENOLCK)
            self._answer(head, blocked.unique, e.errno or errno.ENOLCK)

    def finish_waits(self) -> None:
        """Answer the lock requests whose wait ended: granted (0), interrupted (EINTR) or
        failed.  A wait the ring's stop cancelled is not answered (the journal keeps it)."""
        for w in self.waits.finished():
            if not w.cancelled:
                self._answer(w.head, w.blocked.unique, w.err)

    def _answer(self, head: int, unique: int, err: int) -> None:
        """Complete `head` with a header-only reply, through the push path of either plane.
        The chain is walked again: the guest memory table may have changed while it waited."""
        queue = self.queue
        if queue is None:
            return
        try:
            chain = queue.walk(head)
        except ChainError as e:
            log.warning("queue %d: descriptor chain %d of a lock request: %s", self.index,
                        head, e)
            used = 0
        else:
            writer = Writer(chain.writable) if chain.writable else None
            used = self.server.reply_status(writer, unique, err)
            del chain, writer
        if self.hooks is not None:
            self.hooks.opcode = 0
        if self.engine is not None:
            self._start_engine(queue)
            self._finish(self.engine, head, used)
        else:
            self._complete(queue, head, used)

    def on_kick(self) -> None:
        try:
            os.eventfd_read(self.kick)
        except BlockingIOError:
            pass
        self.process()

    def run(self) -> None:
        control.send(self.channel, Ready(self.index, seq=0))
        chan = self.channel.fileno()
        waits = self.waits
        while self.running:
            if self._deferred():
                self.on_control()
                continue
            engine = self.engine
            if engine is not None and self.queue is not None and self.enabled:
                self.busy = True
                try:
                    self._process_native(engine, wait=True)
                finally:
                    self.busy = False
                if not waits.pending:
                    continue
            # A wait told to stop may have been signalled just before it began to sleep: the
            # signal is sent again until its thread returns.
            for fd, _ev in self.poll.poll(20 if waits.stuck() else None):
                if fd == chan:
                    self.on_control()
                elif fd == self.kick:
                    self.on_kick()
                elif fd == waits.fd:
                    self.finish_waits()
            if waits.pending and waits.stuck():
                waits.resend()
