"""The process table: the spawner, one worker per virtqueue, and the channels to them.

The supervisor forks a *spawner* that owns the fd table used for filesystem fds (the share's
root, /proc/self/fd, inode and file fds).  The spawner creates each worker with
clone(CLONE_FILES | CLONE_PARENT): workers share that one fd table, so an inode fd opened on one
queue is valid on every queue, while the supervisor's own fds (vhost-user socket, pid file,
channels) stay out of reach of the workers.  CLONE_PARENT makes the supervisor the parent of
every worker, so it reaps them and learns their exit status directly.

The spawner clones a *standby* too: a second spawner on the same fd table that takes over when
the spawner dies (spawner_exited), so no process but the supervisor is a single point of
failure.

Each worker request is a numbered message answered by one ACK/STOPPED/FAILED (common/control).
SET_CALL and enabling SET_ENABLE are sent without waiting for the answer, which is consumed
when it comes.  A worker that does not answer in time is looked at before it is killed: one
asleep in a system call with a request in flight (its journal and /proc/PID/stat say so) is
waited for, up to SLOW_REQUEST_LIMIT; one that is dead, spinning or stopped, or answers out of
protocol, is killed and respawned.  One that its seccomp policy killed (SIGSYS) is not: the
request it was serving would be served again and refused again, so the daemon stops, naming the
system call (virtiofsd exits too).

What this asks of a worker's loop (worker/main.py, and any native loop that replaces it):
* exactly one answer per request, with its sequence number, also for a message it cannot take
  (FAILED with the ProtocolError's errno: EMFILE when its fds found no room in the fd table);
* control messages applied between two requests at the latest, SET_CALL before the next
  completion is signalled (then the new notifier is signalled once), SET_ENABLE 0 answered
  only once nothing more is taken from the ring;
* every request journaled (popped, then executing) before its first system call and until its
  reply, so that a worker that sleeps in the kernel shows a request in flight; no busy loop
  while it waits (CPU use is what tells spinning from sleeping), and no sleeping outside a
  request except in its poll on the channel and kick fds;
* its channel end listed among the fds it owns in the journal (its successor closes it), and
  the arena's fd budget honoured by every path that adds an inode or handle.

Deaths are seen at once through each worker's pidfd.  The supervisor logs the signal or exit
status and the request the worker was serving (from its inflight journal, common/journal.py),
and starts a successor with the same memory and ring, resumed from the journal; when to respawn
and when to give up is supervisor/respawn.py.  While a queue has no worker, the control plane
keeps working: ring settings are kept for the successor and GET_VRING_BASE is answered from
the journal, which knows exactly where the ring stands.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import prctl

from pyvirtiofsd.common import control, native
from pyvirtiofsd.common.control import (
    DaxDone,
    Failed,
    LogBase,
    LogState,
    MemTable,
    MemUnmap,
    Message,
    MsgType,
    Ready,
    Region,
    RingFlag,
    RingGeometry,
    RingStart,
    RingStop,
    SetCall,
    SetEnable,
    SetInflight,
    Shutdown,
    Spawn,
    Spawned,
    Standby,
    StateCheck,
    StateLoad,
    StatePrepare,
    StateSave,
    Stopped,
)
from pyvirtiofsd.common.fuse_abi import Opcode
from pyvirtiofsd.common.inflight import queue_stride
from pyvirtiofsd.common.journal import Journal, SlotState
from pyvirtiofsd.common.seccomp import SigsysReport
from pyvirtiofsd.common.stats import Stats
from pyvirtiofsd.common.vhost_user import MemoryRegion
from pyvirtiofsd.supervisor import signals
from pyvirtiofsd.supervisor.respawn import RespawnPolicy

log = logging.getLogger("pyvirtiofsd.procs")

ANSWER_TIMEOUT = 10.0
# A worker asleep in a system call with a request in flight (a lease break, a FIFO, a hung NFS
# server) is waited for up to this long before it is treated as hung: killing it earlier would
# only replay the request into the same wait, and count towards failing the queue.
SLOW_REQUEST_LIMIT = 120.0
# A silent worker that used more than this share of a CPU since the last look is spinning.
SPIN_SHARE = 0.5
# Requests sent without waiting for their answer (SET_CALL, SET_ENABLE), at most, per worker:
# past that the channel's buffers could fill and block either side.
MAX_UNANSWERED = 8
# How long a disable (SET_VRING_ENABLE 0) waits for the worker to stop at a request boundary
# before the front-end is answered anyway: a worker between requests answers in microseconds,
# so the pause is exact (tests/test_pause_resume.py); one asleep in a system call stops when
# the call returns, and the front-end's control plane does not wait for that.
DISABLE_PATIENCE = 1.0
# How long a device-state load may take before CHECK_DEVICE_STATE is answered (a state of the
# largest inode table the daemon keeps, 2^18 inodes, loads in well under this).
STATE_TIMEOUT = 300.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# A start that failed for want of a free fd is retried after this long, without counting it
# towards failing the queue; so is one the spawner's death interrupted (at once).
RESOURCE_RETRY = 1.0
_NOT_THE_WORKERS_FAULT = frozenset({errno.EMFILE, errno.ENFILE, errno.EPIPE})
# Exit status a worker uses when its own set-up failed: respawning it would fail again.
EXIT_SETUP_FAILED = 78

WorkerEntry = Callable[[int, socket.socket], None]
# pidfds() maps the spawner's and the standby's pidfds to these instead of a queue number.
SPAWNER = -1
STANDBY = -2
# Sequence number of STANDBY requests on the spawner channel (SPAWNs use the queue index).
STANDBY_SEQ = 0x8000_0000
STANDBY_TRIES = 3
ENV_HOOKS = "PYVIRTIOFSD_TEST_HOOKS"
ENV_SPAWNER_DIES = "PYVIRTIOFSD_TEST_SPAWNER_DIES"


class FatalDeath(Exception):
    """A child died in a way respawning cannot repair; the daemon must stop."""


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
    # Set once it answered READY and resumed its ring: a death before that is a boot failure.
    up: bool = False
    # Its wait status, when it was reaped early (reap_dead) before worker_exited ran.
    status: int | None = None
    # Requests sent without waiting for the answer: their answers are consumed on arrival.
    unanswered: set[int] = field(default_factory=set)
    # Killed because it could not receive the fds of its ring: not a failed start.
    short_of_fds: bool = False
    # The requests its predecessor left in flight, as (head, pop counter): replaying them is
    # part of its start (supervisor/respawn.py), also after it answered its ring's start.
    inherited: frozenset[tuple[int, int]] = frozenset()

    def close(self) -> None:
        self.channel.close()
        os.close(self.pidfd)


@dataclass(frozen=True)
class ProcSample:
    """What /proc/PID/stat says of a process: its scheduler state and CPU seconds used."""

    state: str
    cpu: float
    at: float

    @classmethod
    def read(cls, pid: int, proc_fd: int = -1) -> ProcSample | None:
        try:
            fd = os.open(f"{pid}/stat" if proc_fd >= 0 else f"/proc/{pid}/stat",
                         os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd if proc_fd >= 0 else None)
            try:
                text = os.read(fd, 4096).decode("ascii", "replace")
            finally:
                os.close(fd)
            # comm may hold spaces and parentheses: the fields start after the last ')'.
            fields = text[text.rindex(")") + 2:].split()
            return cls(fields[0], (int(fields[11]) + int(fields[12])) / _CLK_TCK,
                       time.monotonic())
        except (OSError, ValueError, IndexError):
            return None


def asleep_in_kernel(before: ProcSample | None, after: ProcSample | None) -> bool:
    """Sleeping (S, D) and using (almost) no CPU between the two looks: blocked in a system
    call, not spinning, stopped (T) or dead (Z)."""
    if before is None or after is None or after.state not in ("S", "D"):
        return False
    elapsed = max(after.at - before.at, 1e-3)
    return (after.cpu - before.cpu) / elapsed < SPIN_SHARE


@dataclass
class RingSetup:
    """What a respawned worker needs to resume its ring."""

    geometry: RingGeometry
    kick: int | None
    call: int | None
    enabled: bool
    err: int | None = None
    # A worker has run this ring: its successor resumes it from the journal.
    delivered: bool = False


def _spawner_main(channel: socket.socket, entry: WorkerEntry,
                  confine: Callable[[], None] | None, predecessor: int = -1) -> None:
    """Runs in the spawner: clone a worker for each SPAWN request, a standby spawner for each
    STANDBY request, until EOF or SHUTDOWN.

    A standby (`predecessor` >= 0) was cloned by the spawner it may replace: it shares its fd
    table, filter and capabilities, and waits.  The supervisor only writes to it once that
    spawner is dead; the first request makes it the spawner, and it closes the dead one's
    channel end, which lives on in the shared table."""
    if predecessor < 0:
        # Forked with the supervisor's signals blocked: its handlers and wake-up fd are not ours.
        # Stop signals are ignored here and in every clone: the supervisor decides, and its
        # death takes the spawner and workers along (PR_SET_PDEATHSIG).
        signals.child_defaults(dict.fromkeys(signals.HANDLED, signal.SIG_IGN))
    prctl.set_name("pyvfs-spawner" if predecessor < 0 else "pyvfs-standby")
    prctl.set_pdeathsig(signal.SIGKILL)
    if predecessor >= 0:
        control.send(channel, Ready(0, seq=0))
    if confine is not None:
        try:
            confine()
        except Exception:
            log.exception("spawner: cannot confine itself")
            os._exit(EXIT_SETUP_FAILED)
    # Test hook (tests/test_availability.py): die once right after cloning a worker, before
    # telling the supervisor its pid.  Honoured only with PYVIRTIOFSD_TEST_HOOKS=1.
    dies = os.environ.get(ENV_SPAWNER_DIES) if os.environ.get(ENV_HOOKS) == "1" else None
    while True:
        try:
            msg = control.receive(channel, control.TO_SPAWNER)
        except control.ProtocolError as e:
            log.error("spawner: %s", e)
            if e.seq is not None:
                # Say so at once rather than let the supervisor wait for an answer.
                control.send(channel, Failed(e.errno, seq=e.seq))
            continue
        if msg is None or isinstance(msg, Shutdown):
            os._exit(0)
        if predecessor >= 0:
            prctl.set_name("pyvfs-spawner")
            control.close_fds([predecessor])
            predecessor = -1
        fd = msg.fds[0]
        standby = isinstance(msg, Standby)
        what = "a standby spawner" if standby else f"a worker for queue {msg.queue}"
        if standby:
            # A child is born with its parent's name: a standby must never show as the spawner.
            prctl.set_name("pyvfs-standby")
        native.settle_memory()
        try:
            pid = native.clone_process(native.CLONE_FILES | native.CLONE_PARENT)
        except OSError as e:
            log.error("spawner: cannot start %s: %s", what, e.strerror)
            control.close_fds([fd])
            control.send(channel, Failed(e.errno or errno.EIO, seq=msg.seq))
            continue
        if pid == 0:
            mine = channel.detach()    # the spawner's socket must survive this process's exit
            status = 0
            try:
                if isinstance(msg, Spawn):
                    entry(msg.queue, socket.socket(fileno=fd))
                else:
                    _spawner_main(socket.socket(fileno=fd), entry, None, mine)
            except (BrokenPipeError, ConnectionResetError):
                # The supervisor hung up: it never learnt of this process (the spawner died
                # before answering), and ends it.
                status = 1
            except BaseException:
                log.exception("%s failed", what)
                status = 1
            os._exit(status)
        if standby:
            prctl.set_name("pyvfs-spawner")
        elif dies and os.path.exists(dies):
            os.unlink(dies)
            os.kill(os.getpid(), signal.SIGKILL)
        # The channel end stays in the shared table: the new process uses it.  A worker's is
        # closed by its successor (the journal lists it among the fds the worker owns).
        control.send(channel, Spawned(pid, seq=msg.seq))


@dataclass
class ProcessTable:
    num_queues: int
    entry: WorkerEntry
    # Run in the spawner once its fds are closed: capabilities, no_new_privs, seccomp.
    confine_spawner: Callable[[], None] | None = None
    # Where a child killed by its seccomp filter left the system call's number.
    report: SigsysReport | None = None
    spawner_pid: int = 0
    spawner_pidfd: int = -1
    spawner: socket.socket | None = None
    # A second spawner sharing the fd table, idle until the spawner dies (_spawner_main).
    standby_pid: int = 0
    standby_pidfd: int = -1
    standby: socket.socket | None = None
    workers: dict[int, WorkerHandle] = field(default_factory=dict)
    memory: tuple[list[MemoryRegion], list[int]] | None = None
    rings: dict[int, RingSetup] = field(default_factory=dict)
    respawns: int = 0
    # Successors started per queue (`pyvirtiofsd status`).
    restarts: dict[int, int] = field(default_factory=dict)
    journal: Journal | None = None
    # Where each worker records the opcode it last started (common/stats.py).
    stats: Stats | None = None
    policy: RespawnPolicy = field(default_factory=RespawnPolicy)
    # A procfs directory fd, to tell a worker stuck in a system call from a hung one.
    proc_fd: int = -1
    # The supervisor's signal wake-up fd and whether a stop was asked for: a wait for a slow
    # worker ends as soon as the daemon is told to stop.
    wake_fd: int = -1
    stopping: Callable[[], bool] = lambda: False
    # Serves a worker's DAX request (supervisor/dax.py DaxWindow.answer): (queue, message) ->
    # the answer (DAX_DONE, DAX_IO_DONE).  None: no window, every request answered ENOSYS.
    dax: Callable[[int, Message], Message] | None = None
    # The dirty log (size, offset, fd; the fd is the control plane's) and each ring's logging
    # state (log_all, ring, used_gpa), for the workers started later.
    dirty_log: tuple[int, int, int] | None = None
    log_states: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    # The front-end's inflight region (SET_INFLIGHT_FD): its memfd (the connection's, not
    # ours to close), where it starts in it, its queue size and number of queues.  Each worker
    # gets its part before its ring starts, a respawned one too.
    inflight: tuple[int, int, int, int] | None = None

    # -- start and stop --------------------------------------------------------------------
    def start(self, keep_fds: set[int]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Everything the daemon imported and built so far is shared with the spawner and,
        # through it, with every worker: keep it so (native.settle_memory).
        native.settle_memory()
        with signals.blocked():
            pid = os.fork()
            if pid == 0:
                # Still blocking the supervisor's signals: _spawner_main installs its own.
                ours.close()
                _close_all_but(keep_fds | {theirs.fileno(), 0, 1, 2})
                try:
                    _spawner_main(theirs, self.entry, self.confine_spawner)
                finally:
                    os._exit(1)
        theirs.close()
        self.spawner_pid, self.spawner = pid, ours
        self.spawner_pidfd = os.pidfd_open(pid)
        self.make_standby()
        for q in range(self.num_queues):
            try:
                self.spawn(q)
                self.workers[q].up = True
            except WorkerGone:
                pass                  # its death is handled like any other (worker_exited)

    def make_standby(self) -> None:
        """Have the spawner clone a standby; without one the daemon runs on, and a death of the
        spawner stops it.  A standby that dies while starting is tried again."""
        for _ in range(STANDBY_TRIES):
            if self._start_standby() or _exited(self.spawner_pidfd):
                return

    def _start_standby(self) -> bool:
        assert self.spawner is not None and self.standby is None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            control.send(self.spawner, Standby(seq=STANDBY_SEQ, fds=(theirs.fileno(),)))
            theirs.close()
            answer = self._wait(self.spawner, control.FROM_SPAWNER, STANDBY_SEQ,
                                "spawner (standby)", self.spawner_pidfd)
            if not isinstance(answer, Spawned):
                err = answer.errno if isinstance(answer, Failed) else errno.EIO
                raise OSError(err, os.strerror(err))
            pid = answer.pid
            pidfd = os.pidfd_open(pid)
            try:
                self._wait(ours, control.FROM_SPAWNER, 0, "standby spawner", pidfd)
            except BaseException:
                os.kill(pid, signal.SIGKILL)
                _reap(pid)
                os.close(pidfd)
                raise
        except (OSError, control.ProtocolError) as e:
            theirs.close()
            ours.close()
            log.warning("no standby spawner (%s): if the spawner dies, the daemon stops",
                        e.strerror if isinstance(e, OSError) and e.strerror else e)
            return False
        self.standby_pid, self.standby_pidfd, self.standby = pid, pidfd, ours
        log.debug("standby spawner started, pid %d", pid)
        return True

    def spawn(self, queue: int) -> WorkerHandle:
        assert self.spawner is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            control.send(self.spawner, Spawn(queue, seq=queue, fds=(theirs.fileno(),)))
        finally:
            theirs.close()
        try:
            # Its death shows on its pidfd: its channel end lives on in the shared table.
            answer = self._wait(self.spawner, control.FROM_SPAWNER, queue,
                                f"spawner (queue {queue})", self.spawner_pidfd)
        except BaseException:
            ours.close()
            raise
        if not isinstance(answer, Spawned):
            ours.close()
            err = answer.errno if isinstance(answer, Failed) else errno.EIO
            raise OSError(err, f"spawner could not start the worker for queue {queue}"
                               f" ({os.strerror(err)})")
        pid = answer.pid
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            ours.close()
            raise
        handle = WorkerHandle(queue, pid, ours, pidfd)
        # From here on its death, at any point, is seen through the pidfd (worker_exited).
        self.workers[queue] = handle
        try:
            ready = self._wait(ours, control.FROM_WORKER, 0, f"worker for queue {queue}", pidfd)
            if not isinstance(ready, Ready) or ready.queue != queue:
                raise OSError(errno.EIO, "did not report ready")
        except (OSError, control.ProtocolError) as e:
            log.error("worker for queue %d (pid %d) did not start: %s", queue, pid,
                      e.strerror if isinstance(e, OSError) and e.strerror else e)
            self.kill(queue)
            raise WorkerGone(queue, "did not start") from None
        log.debug("worker for queue %d started, pid %d", queue, pid)
        return handle

    def _wait(self, sock: socket.socket, allowed: frozenset[MsgType], seq: int,
              who: str, pidfd: int = -1, handle: WorkerHandle | None = None,
              timeout: float = ANSWER_TIMEOUT) -> Message:
        """The answer numbered `seq`.  A worker's channel end lives on in the shared fd table
        after the worker died, so its death shows on its pidfd, not as EOF.  For a worker's
        answer (`handle`), a stop signal ends the wait (OSError ESHUTDOWN)."""
        deadline = time.monotonic() + timeout
        wake = self.wake_fd if handle is not None else -1
        while True:
            # Other workers that die meanwhile are reaped at once: a dead worker may hold a
            # lock of the shared tables, which is only taken over once it is no zombie, and the
            # worker answering here may be waiting for that lock.
            others = {h.pidfd: h for h in self.workers.values()
                      if h.status is None and h.pidfd != pidfd}
            watch = [sock, *others] if pidfd < 0 else [sock, pidfd, *others]
            if wake >= 0:
                watch.append(wake)
            left = deadline - time.monotonic()
            ready = readable(watch, left) if left > 0 else []
            if not ready:
                raise OSError(errno.ETIMEDOUT, f"{who} did not answer")
            if wake in ready:
                if self.stopping():
                    raise OSError(errno.ESHUTDOWN, "the daemon is stopping")
                wake = -1       # not a stop: the main loop reads it; do not spin on it
            for fd in ready:
                if fd in others:
                    others[fd].status = _reap(others[fd].pid)
            if sock not in ready:
                if pidfd >= 0 and pidfd in ready:
                    raise OSError(errno.EPIPE, f"{who} died")
                continue
            msg = control.receive(sock, allowed)
            if msg is None:
                # An empty datagram or a closed channel, from a process that is still alive.
                raise OSError(errno.ECONNRESET, f"{who} hung up")
            if msg.type in control.WORKER_ASKS:
                # The worker asked before it read our request: answer, then wait on.
                self._serve_ask(sock, msg)
                continue
            if msg.seq == seq:
                control.close_fds(msg.fds)
                return msg
            if handle is not None and self._late(handle, msg):
                continue
            log.warning("%s: stale answer %s #%d ignored", who, msg.type.name, msg.seq)

    def shutdown(self) -> None:
        for handle in self.workers.values():
            try:
                os.kill(handle.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in (self.spawner_pid, self.standby_pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for handle in self.workers.values():
            _reap(handle.pid)
            handle.close()
        if self.spawner_pid:
            _reap(self.spawner_pid)
            self.spawner_pid = 0
        if self.spawner_pidfd >= 0:
            os.close(self.spawner_pidfd)
            self.spawner_pidfd = -1
        self._drop_standby()
        self.workers.clear()
        if self.spawner is not None:
            self.spawner.close()
            self.spawner = None

    # -- requests to workers -----------------------------------------------------------------
    def request(self, queue: int, make: Callable[[int], Message], answer: bool = True,
                patience: float = 0.0, answer_timeout: float = ANSWER_TIMEOUT) -> Message | None:
        """Send the request `make(seq)` (with its fds, which stay ours) to the worker of `queue`
        and return its answer.  With answer=False
        (requests whose effect the supervisor also keeps, and that the worker cannot refuse)
        wait `patience` seconds at most, then return None: a later answer is consumed when it
        arrives."""
        handle = self.workers.get(queue)
        if handle is None:
            raise WorkerGone(queue, "is not running")
        handle.seq = (handle.seq + 1) & 0xFFFFFFFF or 1
        try:
            self._collect(handle)
            if not answer and len(handle.unanswered) < MAX_UNANSWERED:
                control.send(handle.channel, make(handle.seq))
                reply = self._within(handle, handle.seq, patience)
                if reply is None:
                    handle.unanswered.add(handle.seq)
                    return None
            else:
                control.send(handle.channel, make(handle.seq))
                reply = self._answer(handle, handle.seq, answer_timeout)
        except control.ProtocolError as e:
            log.error("worker for queue %d sent a malformed message (%s): killing it", queue, e)
            self.kill(queue)
            raise WorkerGone(queue, "broke the control protocol") from None
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise WorkerGone(queue, "died") from None   # worker_exited says how
            if e.errno == errno.ESHUTDOWN:
                # Not waited for any longer: every process is ended on the way out, this one
                # now (callers that wait for its death to read its journal need not wait).
                self.kill(queue)
                raise WorkerGone(queue, "was not waited for (the daemon is stopping)") from None
            log.error("worker for queue %d: %s: killing it", queue, e.strerror or e)
            self.kill(queue)
            raise WorkerGone(queue, "did not answer") from None
        if isinstance(reply, Failed):
            raise OSError(reply.errno, os.strerror(reply.errno))
        return reply

    def _within(self, handle: WorkerHandle, seq: int, patience: float) -> Message | None:
        """The answer to `seq` if it comes within `patience` seconds, else None."""
        if patience <= 0:
            return None
        try:
            return self._wait(handle.channel, control.FROM_WORKER, seq,
                              f"worker for queue {handle.queue}", handle.pidfd, handle,
                              timeout=patience)
        except OSError as e:
            if e.errno != errno.ETIMEDOUT:
                raise
            return None

    def _collect(self, handle: WorkerHandle) -> None:
        """Consume the answers that arrived for requests sent without waiting."""
        while handle.unanswered and readable([handle.channel], 0):
            msg = control.receive(handle.channel, control.FROM_WORKER)
            if msg is None:
                raise OSError(errno.ECONNRESET, "hung up")
            if msg.type in control.WORKER_ASKS:
                self._serve_ask(handle.channel, msg)
            else:
                self._late(handle, msg)

    def _late(self, handle: WorkerHandle, msg: Message) -> bool:
        """An answer to a request sent without waiting (True), logged if it is a refusal."""
        if msg.seq not in handle.unanswered:
            return False
        handle.unanswered.discard(msg.seq)
        control.close_fds(msg.fds)
        if isinstance(msg, Failed):
            log.warning("worker for queue %d refused a ring setting: %s", handle.queue,
                        os.strerror(msg.errno))
        return True

    # -- requests from workers (the DAX window) ----------------------------------------------
    def channels(self) -> dict[int, int]:
        """The workers' channel fds (to the queue): the supervisor's loop watches them for
        requests a worker makes while it serves a FUSE request."""
        return {h.channel.fileno(): q for q, h in self.workers.items() if h.status is None}

    def channel_readable(self, queue: int) -> None:
        """A worker's channel has a message outside any request of ours: its own request, or
        a late answer; a stale answer is ignored (as _wait does), a malformed message breaks
        the protocol and the worker is killed."""
        handle = self.workers.get(queue)
        if handle is None:
            return
        try:
            msg = control.receive(handle.channel, control.FROM_WORKER)
        except control.ProtocolError as e:
            log.error("worker for queue %d sent a malformed message (%s): killing it", queue, e)
            self.kill(queue)
            return
        if msg is None:
            return
        if msg.type in control.WORKER_ASKS:
            self._serve_ask(handle.channel, msg)
        elif not self._late(handle, msg):
            control.close_fds(msg.fds)
            log.warning("worker for queue %d: stale answer %s #%d ignored", queue,
                        msg.type.name, msg.seq)

    def _serve_ask(self, channel: socket.socket, msg: Message) -> None:
        queue = next((q for q, h in self.workers.items() if h.channel is channel), -1)
        if self.dax is None or queue < 0:
            control.close_fds(msg.fds)
            answer: Message = DaxDone(errno.ENOSYS, seq=msg.seq)
        else:
            answer = self.dax(queue, msg)    # owns msg.fds
        try:
            control.send(channel, answer)
        except OSError as e:
            log.warning("worker for queue %d: cannot answer its %s: %s", queue, msg.type.name,
                        e.strerror or e)

    def _answer(self, handle: WorkerHandle, seq: int,
                timeout: float = ANSWER_TIMEOUT) -> Message:
        """The worker's answer to `seq`.  Past ANSWER_TIMEOUT the worker is waited for only
        while it is asleep in the kernel with a request in flight, up to SLOW_REQUEST_LIMIT;
        silent and dead, spinning or stopped, it is given up (OSError ETIMEDOUT)."""
        who = f"worker for queue {handle.queue}"
        before = ProcSample.read(handle.pid, self.proc_fd)
        waited = 0.0
        while True:
            try:
                return self._wait(handle.channel, control.FROM_WORKER, seq, who, handle.pidfd,
                                  handle, timeout)
            except OSError as e:
                if e.errno != errno.ETIMEDOUT:
                    raise
            waited += ANSWER_TIMEOUT
            after = ProcSample.read(handle.pid, self.proc_fd)
            doing = self._in_flight(handle.queue)
            if doing is None or not asleep_in_kernel(before, after):
                raise OSError(errno.ETIMEDOUT, f"{who} did not answer")
            if waited >= SLOW_REQUEST_LIMIT:
                raise OSError(errno.ETIMEDOUT, f"{who} was in a system call for {waited:.0f} s"
                                               f" serving {doing}")
            log.warning("worker for queue %d (pid %d) has not answered for %.0f s: it is asleep"
                        " in a system call serving %s; waiting (up to %.0f s)", handle.queue,
                        handle.pid, waited, doing, SLOW_REQUEST_LIMIT)
            before = after

    def _in_flight(self, queue: int) -> str | None:
        """The requests the worker has taken and not replied to, per its journal."""
        if self.journal is None:
            return None
        busy = [r for r in self.journal.queue(queue).inflight()
                if r.state in (SlotState.POPPED, SlotState.EXECUTING)]
        if not busy:
            return None
        return "; ".join(f"{_op_name(r.opcode)} unique {r.unique:#x} {_STATE[r.state]}"
                         for r in busy[-3:])

    def kill(self, queue: int) -> None:
        handle = self.workers.get(queue)
        if handle is not None:
            try:
                os.kill(handle.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # Each of these works with or without a worker for the queue: a queue whose worker is dead
    # or not started yet gets the current memory table and ring when its successor starts.
    def set_mem_table(self, regions: list[MemoryRegion], fds: list[int]) -> None:
        """Every worker swaps tables between two requests (worker/main.py): in effect each is
        paused around the swap."""
        rows = _rows(regions)
        for q in list(self.workers):
            try:
                self.request(q, lambda seq: MemTable(rows, seq=seq, fds=tuple(fds)))
            except WorkerGone:
                pass
        self.memory = (list(regions), list(fds))

    def drop_memory(self) -> None:
        """The front-end is gone: its memory fds are closed, workers unmap it."""
        self.memory = None
        for q in list(self.workers):
            try:
                self.request(q, lambda seq: MemUnmap(seq=seq))
            except OSError as e:
                log.warning("worker for queue %d could not drop guest memory: %s", q, e)

    def start_ring(self, index: int, geometry: RingGeometry, kick: int | None,
                   call: int | None, err: int | None = None) -> None:
        setup = RingSetup(geometry, kick, call, bool(geometry.flags & RingFlag.ENABLED), err)
        self.rings[index] = setup
        if self.policy.retry(index):
            log.info("queue %d: ring restarted; trying a new worker", index)
            return
        if index not in self.workers:
            return                                   # its successor starts it
        try:
            self._send_ring(index, setup)
        except WorkerGone:
            pass

    def set_inflight(self, fd: int | None, offset: int = 0, queue_size: int = 0,
                     num_queues: int = 0) -> None:
        """Use the inflight region in `fd` from the next ring start on (None: none; workers
        that had one drop it).  Queues past `num_queues` have no part in it."""
        had = self.inflight is not None
        self.inflight = None if fd is None else (fd, offset, queue_size, num_queues)
        if fd is None and had:
            for q in list(self.workers):
                try:
                    self.request(q, lambda seq: SetInflight(0, 0, 0, 0, seq=seq))
                except OSError as e:
                    log.warning("worker for queue %d could not drop the inflight region: %s",
                                q, e)

    def _send_inflight(self, index: int) -> None:
        if self.inflight is None:
            return
        fd, offset, queue_size, num_queues = self.inflight
        if index >= num_queues:
            self.request(index, lambda seq: SetInflight(0, 0, 0, 0, seq=seq))
            return
        stride = queue_stride(queue_size)
        self.request(index, lambda seq: SetInflight(offset + index * stride, stride,
                                                    queue_size, 1, seq=seq, fds=(fd,)))

    def _send_ring(self, index: int, setup: RingSetup, resume: bool = False) -> None:
        g = setup.geometry
        self._send_inflight(index)
        flags = g.flags & ~(RingFlag.HAS_KICK | RingFlag.HAS_CALL | RingFlag.HAS_ERR
                            | RingFlag.ENABLED | RingFlag.RESUME)
        fds = []
        for flag, fd in ((RingFlag.HAS_KICK, setup.kick), (RingFlag.HAS_CALL, setup.call),
                         (RingFlag.HAS_ERR, setup.err)):
            if fd is not None:
                flags |= flag
                fds.append(fd)
        if setup.enabled:
            flags |= RingFlag.ENABLED
        if resume:
            flags |= RingFlag.RESUME
        self.request(index, lambda seq: RingStart(g.num, flags, g.desc, g.avail, g.used,
                                                  g.next_avail, seq=seq, fds=tuple(fds)))
        setup.delivered = True

    def stop_ring(self, index: int) -> int:
        setup = self.rings.pop(index, None)
        if index in self.workers:
            try:
                answer = self.request(index, lambda seq: RingStop(seq=seq))
            except WorkerGone:
                pass
            else:
                if isinstance(answer, Stopped):
                    return answer.next_avail
                self.kill(index)
        # No worker to ask: the journal says where the ring stands.
        handle = self.workers.get(index)
        if handle is not None:
            # Just killed for not answering: let it die before its journal is read.
            readable([handle.pidfd], ANSWER_TIMEOUT)
        if setup is not None and not setup.delivered:
            return setup.geometry.next_avail
        if self.journal is None:
            raise WorkerGone(index, "is not running")
        return self.journal.queue(index).next_avail()[0]

    def set_call(self, index: int, call: int | None) -> None:
        setup = self.rings.get(index)
        if setup is not None:
            setup.call = call
        if index in self.workers:
            try:
                # Answered without a round trip (the worker applies it between two requests, and
                # signals the new notifier then): a request asleep in the kernel must not hold
                # up the front-end's control plane.
                self.request(index, lambda seq: SetCall(
                    int(call is not None), seq=seq, fds=(call,) if call is not None else ()),
                    answer=False)
            except WorkerGone:
                pass

    def set_enable(self, index: int, enabled: bool) -> None:
        setup = self.rings.get(index)
        if setup is not None:
            setup.enabled = enabled
        if index in self.workers:
            try:
                # Enabling is answered without a round trip, as SET_CALL; disabling waits for
                # the worker to stop at a request boundary (protocol.md 1.8, "Ring states"),
                # for DISABLE_PATIENCE at most: one asleep in a system call finishes that
                # request and then stops, without holding up the front-end meanwhile.
                self.request(index, lambda seq: SetEnable(int(enabled), seq=seq), answer=False,
                             patience=0.0 if enabled else DISABLE_PATIENCE)
            except WorkerGone:
                pass

    # -- device state (worker/migration.py) ----------------------------------------------------
    # One worker does it all: the share's fds are in the fd table the workers share, and every
    # ring is stopped, so the first queue's worker is as good as any.
    STATE_QUEUE = 0

    def save_state(self, fd: int) -> None:
        """Have the state taken now and written to `fd` (ours still; the worker gets its own
        copy) once the worker has answered.  OSError when it cannot be taken."""
        self.request(self.STATE_QUEUE, lambda seq: StateSave(seq=seq, fds=(fd,)))

    def load_state(self, fd: int) -> None:
        """Have a state read from `fd` to EOF and applied, after the answer."""
        self.request(self.STATE_QUEUE, lambda seq: StateLoad(seq=seq, fds=(fd,)))

    def check_state(self) -> None:
        """OSError unless the last save or load completed.  A load may still be finding inodes
        and reopening handles when the front-end asks: that is waited for, STATE_TIMEOUT at
        most."""
        self.request(self.STATE_QUEUE, lambda seq: StateCheck(seq=seq),
                     answer_timeout=STATE_TIMEOUT)

    def prepare_state(self) -> None:
        """The pre-migration pass: every inode's location recorded now."""
        self.request(self.STATE_QUEUE, lambda seq: StatePrepare(seq=seq))
    # -- dirty-page logging (worker/dirtylog.py) -------------------------------------------------
    def set_log_base(self, size: int, offset: int, fd: int | None) -> None:
        """Every worker maps the new log (fd None: none) between two requests.  A worker that
        cannot is killed: it must not go on writing guest memory that is not logged, and its
        successor maps the log before it serves (respawn)."""
        self.dirty_log = (size, offset, fd) if fd is not None else None
        for q in list(self.workers):
            try:
                self._send_log_base(q)
            except WorkerGone:
                pass
            except OSError as e:
                log.error("worker for queue %d could not map the dirty log: %s; killing it",
                          q, e.strerror or e)
                self.kill(q)

    def set_log_state(self, index: int, log_all: bool, ring: bool, used_gpa: int) -> None:
        state = (int(log_all), int(ring), used_gpa)
        self.log_states[index] = state
        if index in self.workers:
            try:
                self.request(index, lambda seq: LogState(*state, seq=seq))
            except WorkerGone:
                pass

    def _send_log_base(self, queue: int) -> None:
        if self.dirty_log is None:
            self.request(queue, lambda seq: LogBase(0, 0, seq=seq))
        else:
            size, offset, fd = self.dirty_log
            self.request(queue, lambda seq: LogBase(size, offset, seq=seq, fds=(fd,)))

    def _send_log(self, queue: int) -> None:
        """A new worker's logging, before its ring starts: no write of it goes unlogged."""
        if self.dirty_log is not None:
            self._send_log_base(queue)
        state = self.log_states.get(queue)
        if state is not None and any(state):
            self.request(queue, lambda seq: LogState(*state, seq=seq))

    # -- deaths --------------------------------------------------------------------------------
    def pidfds(self) -> dict[int, int]:
        fds = {h.pidfd: q for q, h in self.workers.items()}
        if self.spawner_pidfd >= 0:
            fds[self.spawner_pidfd] = SPAWNER
        if self.standby_pidfd >= 0:
            fds[self.standby_pidfd] = STANDBY
        return fds

    def _drop_standby(self) -> int:
        """Reap the standby (killed or dead) and forget it; its wait status."""
        status = _reap(self.standby_pid) if self.standby_pid else 0
        if self.standby_pidfd >= 0:
            os.close(self.standby_pidfd)
        if self.standby is not None:
            self.standby.close()
        self.standby_pid, self.standby_pidfd, self.standby = 0, -1, None
        return status

    def spawner_exited(self) -> None:
        """The spawner died: its standby, which shares the fd table every worker uses, takes
        over (and starts a standby of its own).  Workers run on; the guest sees nothing."""
        pid = self.spawner_pid
        status = _reap(pid)
        os.close(self.spawner_pidfd)
        assert self.spawner is not None
        self.spawner.close()
        self.spawner_pid, self.spawner_pidfd, self.spawner = 0, -1, None
        why = _describe(status, self.report, SigsysReport.SPAWNER, pid)
        self._end_strays()
        sigsys = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
        if self.standby is None or sigsys or _exited(self.standby_pidfd):
            # A standby would be refused the same call; or there is none to take over.
            raise FatalDeath(f"the spawner (pid {pid}) {why}"
                             + ("" if sigsys else " and there is no standby to take over"))
        self.spawner_pid, self.spawner_pidfd, self.spawner = \
            self.standby_pid, self.standby_pidfd, self.standby
        self.standby_pid, self.standby_pidfd, self.standby = 0, -1, None
        log.error("the spawner (pid %d) %s; its standby (pid %d) takes over", pid, why,
                  self.spawner_pid)
        self.make_standby()

    def _end_strays(self) -> None:
        """Kill and reap children nobody knows of: a worker or standby the spawner cloned just
        before it died, without telling us its pid.  Such a worker would take over its
        queue's journal (closing the fds it lists) while the real successor does the same."""
        known = {self.standby_pid, *(h.pid for h in self.workers.values())}
        me = os.getpid()
        try:
            fd = os.open(f"{me}/task/{me}/children" if self.proc_fd >= 0
                         else f"/proc/{me}/task/{me}/children", os.O_RDONLY | os.O_CLOEXEC,
                         dir_fd=self.proc_fd if self.proc_fd >= 0 else None)
            try:
                text = os.read(fd, 65536).decode("ascii", "replace")
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("cannot list the supervisor's children to end strays: %s", e.strerror)
            return
        for pid in (int(p) for p in text.split() if p.isdigit()):
            if pid in known:
                continue
            log.warning("ending process %d, started by the dead spawner unannounced", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _reap(pid)

    def standby_exited(self) -> None:
        pid = self.standby_pid
        why = _describe(self._drop_standby(), self.report, SigsysReport.SPAWNER, pid)
        log.error("the standby spawner (pid %d) %s; starting another", pid, why)
        if self.spawner is not None:
            self.make_standby()

    def worker_exited(self, queue: int) -> None:
        """Reap a dead worker, say why and what it was doing, and plan its successor."""
        if queue == SPAWNER:
            self.spawner_exited()
            return
        if queue == STANDBY:
            self.standby_exited()
            return
        handle = self.workers.pop(queue)
        status = _reap(handle.pid) if handle.status is None else handle.status
        handle.close()
        why = _describe(status, self.report, SigsysReport.worker_slot(queue), handle.pid)
        # One line per death, whatever follows: the signal or status, the last opcode the
        # worker started, what was in flight and what recovery does about it.
        doing = f"{self.last_request(queue)}; last opcode {self.last_opcode(queue)}"
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS:
            raise FatalDeath(f"worker for queue {queue} (pid {handle.pid}) {why} ({doing}); a"
                             " respawned worker would be refused the same call (run with"
                             " --seccomp=log to find what the policy lacks)")
        if handle.short_of_fds:
            log.error("worker for queue %d (pid %d) had no free fd to resume its ring; trying"
                      " again in %.1f s", queue, handle.pid, RESOURCE_RETRY)
            self.policy.later(queue, RESOURCE_RETRY)
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_SETUP_FAILED:
            log.error("worker for queue %d (pid %d) failed to set up (%s; %s); not respawning",
                      queue, handle.pid, why, doing)
            self._fail(queue, f"its worker failed to set up ({why})")
            return
        delay = self.policy.died(queue, handle.up and not self._still_replaying(handle), why)
        if delay is None:
            log.error("worker for queue %d (pid %d) %s while starting (%s); not respawning:"
                      " the queue is failed", queue, handle.pid, why, doing)
            self._fail(queue, self.policy.failed[queue])
            return
        when = "respawning it" if not delay else f"respawning it in {delay:.1f} s"
        pending = len(self.journal.queue(queue).inflight()) if self.journal is not None else 0
        if pending:
            when += f"; its successor completes the {pending} request(s) left in flight"
        log.error("worker for queue %d (pid %d) %s (%s); %s", queue, handle.pid, why, doing,
                  when)

    def _in_flight_ids(self, queue: int) -> frozenset[tuple[int, int]]:
        if self.journal is None:
            return frozenset()
        return frozenset((r.head, r.counter) for r in self.journal.queue(queue).inflight())

    def _still_replaying(self, handle: WorkerHandle) -> bool:
        """Whether a respawned worker died before it completed what its predecessor left: a
        worker answers its ring's start before it replays the journal, so `up` alone would
        count a request that kills every worker serving it as deaths while serving, and the
        queue would never be failed."""
        return bool(handle.inherited & self._in_flight_ids(handle.queue))

    def next_respawn(self) -> float | None:
        """Seconds until a respawn is due (for the event loop's timeout), None if none is."""
        return self.policy.next_in()

    def respawn_due(self) -> None:
        for queue in self.policy.take_due():
            if queue not in self.workers:
                self.respawn(queue)

    def respawn(self, queue: int) -> None:
        """Start a successor with the memory and ring of the queue; it resumes from the
        journal.  A successor that dies on the way is handled by worker_exited."""
        self.respawns += 1
        self.restarts[queue] = self.restarts.get(queue, 0) + 1
        inherited = self._in_flight_ids(queue)
        try:
            handle = self.spawn(queue)
        except WorkerGone:
            return                   # it died starting: worker_exited counts that
        except OSError as e:
            if e.errno in _NOT_THE_WORKERS_FAULT:
                # No free fd, or the spawner died under the request (its standby takes over
                # first): not a failed start of the worker, so it is not counted as one.
                delay = 0.0 if e.errno == errno.EPIPE else RESOURCE_RETRY
                log.error("no worker for queue %d yet: %s; trying again in %.1f s", queue,
                          e.strerror or e, delay)
                self.policy.later(queue, delay)
                return
            # No process was started (the spawner could not, or did not answer): that is a
            # failed start too, retried later or the queue failed like any other.
            why = e.strerror or str(e)
            delay = self.policy.died(queue, False, why)
            if delay is None:
                self._fail(queue, self.policy.failed[queue])
            else:
                log.error("no worker for queue %d: %s; trying again in %.1f s", queue, why,
                          delay)
            return
        try:
            if self.memory is not None:
                regions, fds = self.memory
                rows = _rows(regions)
                self.request(queue, lambda seq: MemTable(rows, seq=seq, fds=tuple(fds)))
            self._send_log(queue)
            setup = self.rings.get(queue)
            if setup is not None:
                self._send_ring(queue, setup, resume=setup.delivered)
        except WorkerGone:
            return
        except OSError as e:
            # The worker refused its memory or ring: it cannot serve the queue.  If only for
            # want of a free fd, its death is not counted as a failed start (worker_exited).
            log.error("worker for queue %d could not resume its ring: %s", queue, e)
            handle.short_of_fds = e.errno in (errno.EMFILE, errno.ENFILE)
            self.kill(queue)
            return
        handle.inherited = inherited
        handle.up = True
        if not inherited:
            # Otherwise its start ends with the replay: its death settles the count then.
            self.policy.booted(queue)

    def _fail(self, queue: int, why: str) -> None:
        self.policy.give_up(queue, why)
        # The front-end hears of it through the ring's error notifier (SET_VRING_ERR).
        setup = self.rings.get(queue)
        if setup is not None and setup.err is not None:
            try:
                os.eventfd_write(setup.err, 1)
            except OSError:
                pass
        log.error("queue %d is failed: %s.  It is not served until the front-end restarts the"
                  " ring (SET_VRING_KICK) or the device.", queue, why)

    def last_opcode(self, queue: int) -> str:
        """The opcode the worker of `queue` started last, from its statistics."""
        if self.stats is None:
            return "unknown"
        op = self.stats.last_opcode(queue)
        return _op_name(op) if op else "none"

    def last_request(self, queue: int) -> str:
        """What the journal says the worker of `queue` was doing, for the log."""
        if self.journal is None:
            return "no journal"
        pending = self.journal.queue(queue).inflight()
        if not pending:
            return "no request in flight"
        return "; ".join(f"{_op_name(r.opcode)} unique {r.unique:#x} {_STATE[r.state]}"
                         for r in pending[-3:])


_STATE = {SlotState.POPPED: "just taken from the ring",
          SlotState.EXECUTING: "in its filesystem call",
          SlotState.REPLIED: "replied, not yet pushed"}


def _op_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"


def _rows(regions: list[MemoryRegion]) -> tuple[Region, ...]:
    return tuple(Region(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                 for r in regions)


def readable(items: list, timeout: float | None) -> list:
    """Those of `items` (fds, or objects with fileno()) that are readable, closed or in error
    within `timeout` seconds (None: however long it takes), as select() says, but with poll(2):
    a daemon that took over another's tables (supervisor/upgrade.py) holds fd numbers far above
    select()'s FD_SETSIZE."""
    poller = select.poll()
    by_fd: dict[int, object] = {}
    for item in items:
        fd = item if isinstance(item, int) else item.fileno()
        by_fd[fd] = item
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return [by_fd[fd] for fd, events in poller.poll(ms) if events]


def _exited(pidfd: int) -> bool:
    return bool(readable([pidfd], 0))


def _reap(pid: int) -> int:
    try:
        _, status = os.waitpid(pid, 0)
        return status
    except ChildProcessError:
        return 0


def _describe(status: int, report: SigsysReport | None = None, slot: int = 0,
              pid: int = 0) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = report.describe(slot, pid) if report is not None and sig == signal.SIGSYS else ""
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        return f"was killed by {name}{why}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _close_all_but(keep: set[int]) -> None:
    """Close every fd not in `keep` (crosvm jail style: a child declares what it keeps).

    close_range(2) over the gaps: no /proc needed (the sandbox has none at its root)."""
    low = 0
    for fd in sorted(fd for fd in keep if fd >= 0):
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, 0x7FFFFFFF)
