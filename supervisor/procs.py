"""The process table: the spawner, one worker per virtqueue, and the channels to them.

The supervisor forks a *spawner* that owns the fd table used for filesystem fds (the share's
root, /proc/self/fd, inode and file fds).  The spawner creates each worker with
clone(CLONE_FILES | CLONE_PARENT): workers share that one fd table, so an inode fd opened on one
queue is valid on every queue, while the supervisor's own fds (vhost-user socket, pid file,
channels) stay out of reach of the workers.  CLONE_PARENT makes the supervisor the parent of
every worker, so it reaps them and learns their exit status directly.

Each worker request is a numbered message answered by one ACK/STOPPED/FAILED (common/control).
A worker that does not answer in time, or answers out of protocol, is killed and respawned.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import prctl

from pyvirtiofsd.common import control, native
from pyvirtiofsd.common.control import Message, MsgType, RingFlag, RingGeometry
from pyvirtiofsd.common.vhost_user import MemoryRegion

log = logging.getLogger("pyvirtiofsd.procs")

ANSWER_TIMEOUT = 10.0
# Exit status a worker uses when its own set-up failed: respawning it would fail again.
EXIT_SETUP_FAILED = 78

WorkerEntry = Callable[[int, socket.socket], None]


class WorkerGone(OSError):
    def __init__(self, queue: int, why: str) -> None:
        super().__init__(errno.EIO, f"worker for queue {queue} {why}")


@dataclass
class WorkerHandle:
    queue: int
    pid: int
    channel: socket.socket
    pidfd: int
    seq: int = 0
    served_before: int = 0

    def close(self) -> None:
        self.channel.close()
        os.close(self.pidfd)


@dataclass
class RingSetup:
    """What a respawned worker needs to resume its ring."""

    geometry: RingGeometry
    kick: int | None
    call: int | None
    enabled: bool


def _spawner_main(channel: socket.socket, entry: WorkerEntry) -> None:
    """Runs in the spawner: clone a worker for each SPAWN request, until EOF or SHUTDOWN."""
    prctl.set_name("pyvfs-spawner")
    prctl.set_pdeathsig(signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_channels: dict[int, int] = {}
    while True:
        try:
            msg = control.receive(channel, control.TO_SPAWNER)
        except control.ProtocolError as e:
            log.error("spawner: %s", e)
            continue
        if msg is None or msg.type is MsgType.SHUTDOWN:
            os._exit(0)
        (queue,) = msg.fields
        fd = msg.fds[0]
        # The previous worker of this queue is gone; its channel end lives in the shared
        # table until someone closes it, and the supervisor would never see it hang up.
        old = worker_channels.pop(queue, None)
        if old is not None:
            control.close_fds([old])
        pid = native.clone_process(native.CLONE_FILES | native.CLONE_PARENT)
        if pid == 0:
            channel.detach()     # the spawner's socket must survive this process's exit
            status = 0
            try:
                entry(queue, socket.socket(fileno=fd))
            except BaseException:
                log.exception("worker for queue %d failed", queue)
                status = 1
            os._exit(status)
        worker_channels[queue] = fd
        control.send(channel, control.encode(MsgType.SPAWNED, msg.seq, pid))


@dataclass
class ProcessTable:
    num_queues: int
    entry: WorkerEntry
    spawner_pid: int = 0
    spawner: socket.socket | None = None
    workers: dict[int, WorkerHandle] = field(default_factory=dict)
    memory: tuple[list[MemoryRegion], list[int]] | None = None
    rings: dict[int, RingSetup] = field(default_factory=dict)
    respawns: int = 0

    # -- start and stop --------------------------------------------------------------------
    def start(self, keep_fds: set[int]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            _close_all_but(keep_fds | {theirs.fileno(), 0, 1, 2})
            try:
                _spawner_main(theirs, self.entry)
            finally:
                os._exit(1)
        theirs.close()
        self.spawner_pid, self.spawner = pid, ours
        for q in range(self.num_queues):
            self.spawn(q)

    def spawn(self, queue: int) -> WorkerHandle:
        assert self.spawner is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            control.send(self.spawner, control.encode(MsgType.SPAWN, queue, queue),
                         [theirs.fileno()])
        finally:
            theirs.close()
        answer = self._wait(self.spawner, control.FROM_SPAWNER, queue, f"spawner (queue {queue})")
        if answer.type is not MsgType.SPAWNED:
            ours.close()
            raise OSError(errno.EIO, f"spawner could not start the worker for queue {queue}")
        (pid,) = answer.fields
        handle = WorkerHandle(queue, pid, ours, os.pidfd_open(pid))
        ready = self._wait(ours, control.FROM_WORKER, 0, f"worker for queue {queue}")
        if ready.type is not MsgType.READY or ready.fields[0] != queue:
            handle.close()
            raise OSError(errno.EIO, f"worker for queue {queue} did not report ready")
        self.workers[queue] = handle
        log.debug("worker for queue %d started, pid %d", queue, pid)
        return handle

    def _wait(self, sock: socket.socket, allowed: frozenset[MsgType], seq: int,
              who: str) -> Message:
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                raise OSError(errno.ETIMEDOUT, f"{who} did not answer")
            msg = control.receive(sock, allowed)
            if msg is None:
                raise OSError(errno.EPIPE, f"{who} hung up")
            if msg.seq == seq:
                control.close_fds(msg.fds)
                return msg
            log.warning("%s: stale answer %s #%d ignored", who, msg.type.name, msg.seq)

    def shutdown(self) -> None:
        for handle in self.workers.values():
            try:
                os.kill(handle.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.spawner_pid:
            try:
                os.kill(self.spawner_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for handle in self.workers.values():
            _reap(handle.pid)
            handle.close()
        if self.spawner_pid:
            _reap(self.spawner_pid)
        self.workers.clear()
        if self.spawner is not None:
            self.spawner.close()
            self.spawner = None

    # -- requests to workers -----------------------------------------------------------------
    def request(self, queue: int, data_fn: Callable[[int], bytes], fds: list[int] = ()) -> Message:
        handle = self.workers.get(queue)
        if handle is None:
            raise WorkerGone(queue, "is not running")
        handle.seq = (handle.seq + 1) & 0xFFFFFFFF or 1
        try:
            control.send(handle.channel, data_fn(handle.seq), fds)
            answer = self._wait(handle.channel, control.FROM_WORKER, handle.seq,
                                f"worker for queue {queue}")
        except control.ProtocolError as e:
            log.error("worker for queue %d sent a malformed message (%s): killing it", queue, e)
            self.kill(queue)
            raise WorkerGone(queue, "broke the control protocol") from None
        except OSError as e:
            log.error("worker for queue %d: %s: killing it", queue, e.strerror or e)
            self.kill(queue)
            raise WorkerGone(queue, "did not answer") from None
        if answer.type is MsgType.FAILED:
            raise OSError(answer.fields[0], os.strerror(answer.fields[0]))
        return answer

    def kill(self, queue: int) -> None:
        handle = self.workers.get(queue)
        if handle is not None:
            try:
                os.kill(handle.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def set_mem_table(self, regions: list[MemoryRegion], fds: list[int]) -> None:
        rows = tuple((r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                     for r in regions)
        for q in list(self.workers):
            self.request(q, lambda seq: control.encode(MsgType.MEM_TABLE, seq, regions=rows), fds)
        self.memory = (list(regions), list(fds))

    def start_ring(self, index: int, geometry: RingGeometry, kick: int | None,
                   call: int | None) -> None:
        setup = RingSetup(geometry, kick, call, bool(geometry.flags & RingFlag.ENABLED))
        self._send_ring(index, setup)
        self.rings[index] = setup

    def _send_ring(self, index: int, setup: RingSetup) -> None:
        g = setup.geometry
        flags = g.flags & ~(RingFlag.HAS_KICK | RingFlag.HAS_CALL | RingFlag.ENABLED)
        fds = []
        if setup.kick is not None:
            flags |= RingFlag.HAS_KICK
            fds.append(setup.kick)
        if setup.call is not None:
            flags |= RingFlag.HAS_CALL
            fds.append(setup.call)
        if setup.enabled:
            flags |= RingFlag.ENABLED
        self.request(index, lambda seq: control.encode(
            MsgType.RING_START, seq, g.num, flags, g.desc, g.avail, g.used, g.next_avail, 0), fds)

    def stop_ring(self, index: int) -> int:
        answer = self.request(index, lambda seq: control.encode(MsgType.RING_STOP, seq))
        self.rings.pop(index, None)
        if answer.type is not MsgType.STOPPED:
            raise WorkerGone(index, f"answered {answer.type.name} to RING_STOP")
        return answer.fields[0]

    def set_call(self, index: int, call: int | None) -> None:
        setup = self.rings.get(index)
        if setup is not None:
            setup.call = call
        self.request(index, lambda seq: control.encode(
            MsgType.SET_CALL, seq, int(call is not None)), [call] if call is not None else [])

    def set_enable(self, index: int, enabled: bool) -> None:
        setup = self.rings.get(index)
        if setup is not None:
            setup.enabled = enabled
        self.request(index, lambda seq: control.encode(MsgType.SET_ENABLE, seq, int(enabled)))

    # -- deaths --------------------------------------------------------------------------------
    def pidfds(self) -> dict[int, int]:
        return {h.pidfd: q for q, h in self.workers.items()}

    def worker_exited(self, queue: int) -> None:
        """Reap a dead worker, say why, and start a new one with the same ring and memory."""
        handle = self.workers.pop(queue)
        status = _reap(handle.pid)
        handle.close()
        why = _describe(status)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_SETUP_FAILED:
            log.error("worker for queue %d (pid %d) failed to set up (%s); not respawning",
                      queue, handle.pid, why)
            return
        log.error("worker for queue %d (pid %d) %s; respawning it", queue, handle.pid, why)
        self.respawns += 1
        self.spawn(queue)
        if self.memory is not None:
            regions, fds = self.memory
            rows = tuple((r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                         for r in regions)
            self.request(queue, lambda seq: control.encode(MsgType.MEM_TABLE, seq, regions=rows),
                         fds)
        setup = self.rings.get(queue)
        if setup is not None:
            # Without a journal of in-flight heads, resume from the used index: requests the
            # dead worker popped but never completed are served again.
            g = setup.geometry
            resumed = RingGeometry(g.num, g.flags | RingFlag.RESUME_FROM_USED, g.desc, g.avail,
                                   g.used, g.next_avail)
            self._send_ring(queue, RingSetup(resumed, setup.kick, setup.call, setup.enabled))


def _reap(pid: int) -> int:
    try:
        _, status = os.waitpid(pid, 0)
        return status
    except ChildProcessError:
        return 0


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"was killed by {signal.Signals(sig).name}" if sig in signal.valid_signals() \
            else f"was killed by signal {sig}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _close_all_but(keep: set[int]) -> None:
    """Close every fd not in `keep` (crosvm jail style: a child declares what it keeps)."""
    fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
