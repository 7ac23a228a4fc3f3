"""File locks: FUSE GETLK / SETLK / SETLKW with FUSE_POSIX_LOCKS and FUSE_FLOCK_LOCKS.

POSIX locks belong to a FUSE lock owner (fuse_lk_in.owner: the guest's files_struct), not to
a process of this daemon.  Each (inode, lock owner) that takes a lock gets one open file
description on the host, opened from the inode's O_PATH fd, and the lock is an
open-file-description lock on it (F_OFD_SETLK): the host kernel then gives each guest owner
POSIX semantics of its own -- its ranges merge and split, its own locks never conflict with
each other -- while owners conflict with one another and with host processes (classic POSIX
and OFD locks both; fcntl(2), "Open file description locks").  flock(2) locks (FUSE_LK_FLOCK)
go on the handle's own open file description, as flock(2) on the guest's file would.

The owner OFDs are entries of the shared handle table (common/arena.py), so their fds live in
the fd table every worker shares, and the (inode, owner) -> handle map is the `LockBoard`, a
page of shared memory made before the workers are forked (like the FUSE session word): a lock
taken through one queue is seen, changed and released through any other.  A worker that dies
takes no lock with it: the locks belong to open file descriptions in the shared fd table, not
to the worker, so the guest keeps exactly what it was told it holds.  The board's lock word is
the arena's robust lock (common/state.c vfs_lock): a worker killed while holding it does not
wedge the others.

Release (what the kernel expects, fs/fuse/file.c): the guest kernel keeps no record of the
locks FUSE took, so a close() in the guest sends FLUSH with its lock owner and the owner's
POSIX locks on that inode are dropped here (the owner's OFD is unlocked and closed).  An OFD
lock in the guest has the guest's open file description for owner, which no FLUSH names: the
owners whose first lock came through a handle are dropped when that handle is released (a
process's locks taken through it are gone by then, with the FLUSH of its close).  A RELEASE
with FUSE_RELEASE_FLOCK_UNLOCK drops the flock lock of the handle.  The native data plane
hands FLUSH and RELEASE to Python while the board holds any owner (`live`), so they do this
too.

SETLKW (and a blocking flock) never blocks the worker's ring: the non-blocking attempt is made
at once; if it conflicts, the wait runs in a helper thread of the worker (one per waiting
request) and the request completes out of order when the lock is granted, through the normal
push path, while the queue goes on serving.  Every waiting request is on the board with its
thread's ids, so a FUSE_INTERRUPT carrying its unique -- on the hiprio queue, served by another
worker -- finds it and interrupts the wait with a signal (SIGUSR2): the request is answered
EINTR (the kernel restarts the call, fs/fuse/file.c "locking is restartable").  An INTERRUPT
that comes before its request was seen is remembered for that unique.  GETLK reports a
conflicting lock of another guest owner with the guest pid that took it (the kernel reads
fuse_file_lock.pid in the guest's pid namespace, convert_fuse_file_lock); a lock held by a
host process has no guest pid and is reported with pid 0.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import signal
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator

from pyvirtiofsd.common import native, shm

_libc = ctypes.CDLL(None, use_errno=True)

F_OFD_GETLK = 36
F_OFD_SETLK = 37
F_OFD_SETLKW = 38
OFFSET_MAX = (1 << 63) - 1
# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid.
FLOCK = struct.Struct("=hh4xqqi4x")
# The signal that interrupts a waiting helper thread (installed without SA_RESTART).
WAKE_SIGNAL = signal.SIGUSR2
_SYS_TGKILL = 234 if os.uname().machine == "x86_64" else 131

# The board's layout: a header, the owner slots, the waiting requests, early interrupts.
_LOCK_OFF = 0            # u32: vfs_lock word
_LIVE_OFF = 4            # u32: owner slots in use (the native engine reads it)
_EARLY_NEXT_OFF = 8      # u32: next early-interrupt slot
# u32 each: slots below which every owner (waiting request) is.  Slots are taken lowest first
# and the mark comes down when the last one is freed, so a search reads only the slots in use.
_OWNERS_END_OFF = 12
_WAITS_END_OFF = 16
MAX_OWNERS = 2048
MAX_WAITS = 1024
_EARLY = 64
# nodeid (0: free), owner, fh of its OFD, the guest's fh it first locked through, guest pid
_OWNER = struct.Struct("<QQQQI4x")
_OWNER_PID_OFF = 32
_WAIT = struct.Struct("<QiiI4x")     # unique (0: free), tgid, tid, state
_KEY = struct.Struct("<QQ")
_U64 = struct.Struct("<Q")
_OWNERS_OFF = 64
_WAITS_OFF = _OWNERS_OFF + MAX_OWNERS * _OWNER.size
_EARLY_OFF = _WAITS_OFF + MAX_WAITS * _WAIT.size
_SIZE = _EARLY_OFF + _EARLY * 8
WAITING, INTERRUPTED = 1, 2


def fuse_range(start: int, end: int) -> tuple[int, int]:
    """fuse_file_lock's inclusive [start, end] (end OFFSET_MAX: to the end of the file) as
    struct flock's (l_start, l_len); EINVAL for a range the kernel would never send."""
    if start > OFFSET_MAX or end > OFFSET_MAX or end < start:
        raise OSError(errno.EINVAL, "lock range out of bounds")
    return start, 0 if end == OFFSET_MAX else end - start + 1


def flock_range(l_start: int, l_len: int) -> tuple[int, int]:
    """The inverse: struct flock as returned by F_OFD_GETLK (l_len >= 0) to [start, end]."""
    return l_start, OFFSET_MAX if l_len == 0 else l_start + l_len - 1


class LockBoard:
    """The lock state every worker shares: one MAP_SHARED mapping, made before the workers are
    forked.  Changed by the workers' main threads only, under the board's lock;
    a helper thread only reads whether its request was interrupted."""

    def __init__(self) -> None:
        # A memfd (common/shm.py), so that a daemon taking over in a live upgrade
        # (supervisor/upgrade.py) maps the very same board: the guest's locks live on in the
        # handle table's open file descriptions, and the board says which owner holds which.
        self.fd, self._mm = shm.create(_SIZE, "locks")
        self._map()

    def adopt(self, fd: int) -> None:
        """Use the board of the daemon this one took over from (before any worker forks)."""
        mm = shm.attach(fd)
        if len(mm) != _SIZE:
            mm.close()
            raise ValueError(f"a lock board of {len(mm)} bytes, not {_SIZE}")
        # The board made at import stays mapped (its address was handed out to C): unused.
        os.close(self.fd)
        self._unused = self._mm
        self.fd, self._mm = fd, mm
        self._map()

    def _map(self) -> None:
        self._base = native.address_of(self._mm)
        self._word = native.u32_ptr(self._base, _LOCK_OFF)
        self._live = native.u32_ptr(self._base, _LIVE_OFF)
        self._lib = native.lib

    @property
    def live_address(self) -> int:
        """Where the count of owner slots in use is (the native engine defers FLUSH and
        RELEASE to Python while it is not zero)."""
        return int(native.ffi.cast("uintptr_t", self._live))

    @property
    def live(self) -> int:
        return self._live[0]

    def _lock(self) -> None:
        # 1: taken over from a dead worker.  Every slot is written value first, key last (and
        # freed key first), so a half-made change is at worst a slot that is not there.
        self._lib.vfs_lock(self._word, os.getpid())

    def _unlock(self) -> None:
        self._lib.vfs_unlock(self._word)

    def _end(self, mark: int, start: int, size: int) -> int:
        return start + struct.unpack_from("<I", self._mm, mark)[0] * size

    def _owners_end(self) -> int:
        return self._end(_OWNERS_END_OFF, _OWNERS_OFF, _OWNER.size)

    def _waits_end(self) -> int:
        return self._end(_WAITS_END_OFF, _WAITS_OFF, _WAIT.size)

    def _free_slot(self, mark: int, start: int, limit: int, size: int) -> int:
        """A free slot (key 0) below the mark, else the one at the mark, raised; -1: full.
        Under the lock; the caller writes the slot's key last."""
        end = self._end(mark, start, size)
        at = self._find(_U64.pack(0), start, end, size)
        if at >= 0:
            return at
        if end >= limit:
            return -1
        struct.pack_into("<I", self._mm, mark, (end - start) // size + 1)
        return end

    def _lower(self, mark: int, start: int, size: int) -> None:
        """Bring the mark down over the free slots at its top (under the lock)."""
        n = struct.unpack_from("<I", self._mm, mark)[0]
        while n and _U64.unpack_from(self._mm, start + (n - 1) * size)[0] == 0:
            n -= 1
        struct.pack_into("<I", self._mm, mark, n)

    def _find(self, key: bytes, start: int, end: int, size: int) -> int:
        mm = self._mm
        at = start
        while True:
            at = mm.find(key, at, end)
            if at < 0 or (at - start) % size == 0:
                return at
            at += 1

    # -- owners ------------------------------------------------------------------------------
    def owner(self, nodeid: int, owner: int) -> tuple[int, int] | None:
        """(fh of the owner's OFD, guest pid) or None."""
        if not self._live[0]:
            return None
        at = self._find(_KEY.pack(nodeid, owner), _OWNERS_OFF, self._owners_end(), _OWNER.size)
        if at < 0:
            return None
        _n, _o, fh, _via, pid = _OWNER.unpack_from(self._mm, at)
        return fh, pid

    def _slots_of(self, nodeid: int) -> Iterator[tuple[int, int, int, int]]:
        """(owner, fh, via, pid) of every owner slot of `nodeid`."""
        if not self._live[0]:
            return
        key = _U64.pack(nodeid)
        at = _OWNERS_OFF
        while (at := self._find(key, at, self._owners_end(), _OWNER.size)) >= 0:
            _n, owner, fh, via, pid = _OWNER.unpack_from(self._mm, at)
            yield owner, fh, via, pid
            at += _OWNER.size

    def owners_of(self, nodeid: int) -> list[tuple[int, int, int]]:
        """(owner, fh, pid) of every owner slot of `nodeid`."""
        return [(owner, fh, pid) for owner, fh, _via, pid in self._slots_of(nodeid)]

    def owners_via(self, nodeid: int, fh: int) -> list[int]:
        """The owners of `nodeid` whose OFD was made for a lock through the guest's `fh`."""
        return [owner for owner, _fh, via, _pid in self._slots_of(nodeid) if via == fh]

    def add_owner(self, nodeid: int, owner: int, fh: int, via: int, pid: int) -> int | None:
        """Record the owner's OFD `fh`, made for a lock through the guest's handle `via`;
        returns the fh already recorded (another queue won the race: the caller drops its
        own), or None.  ENOLCK when the board is full."""
        self._lock()
        try:
            at = self._find(_KEY.pack(nodeid, owner), _OWNERS_OFF, self._owners_end(), _OWNER.size)
            if at >= 0:
                return _OWNER.unpack_from(self._mm, at)[2]
            at = self._free_slot(_OWNERS_END_OFF, _OWNERS_OFF, _WAITS_OFF, _OWNER.size)
            if at < 0:
                raise OSError(errno.ENOLCK, "no room for another lock owner")
            _OWNER.pack_into(self._mm, at, 0, owner, fh, via, pid)
            _U64.pack_into(self._mm, at, nodeid)
            self._live[0] += 1
            return None
        finally:
            self._unlock()

    def set_pid(self, nodeid: int, owner: int, pid: int) -> None:
        at = self._find(_KEY.pack(nodeid, owner), _OWNERS_OFF, self._owners_end(), _OWNER.size)
        if at >= 0:
            struct.pack_into("<I", self._mm, at + _OWNER_PID_OFF, pid & 0xFFFFFFFF)

    def remove_owner(self, nodeid: int, owner: int) -> int | None:
        """Forget the owner's OFD; returns its fh (the caller removes the handle)."""
        self._lock()
        try:
            at = self._find(_KEY.pack(nodeid, owner), _OWNERS_OFF, self._owners_end(), _OWNER.size)
            if at < 0:
                return None
            fh = _OWNER.unpack_from(self._mm, at)[2]
            _U64.pack_into(self._mm, at, 0)
            self._live[0] -= 1
            self._lower(_OWNERS_END_OFF, _OWNERS_OFF, _OWNER.size)
            return fh
        finally:
            self._unlock()

    def clear_owners(self) -> None:
        """The session ended: its handles (the OFDs among them) are gone, and the uniques of
        INTERRUPTs it remembered mean nothing to the next one."""
        self._lock()
        try:
            self._mm[_OWNERS_OFF:_WAITS_OFF] = bytes(_WAITS_OFF - _OWNERS_OFF)
            self._mm[_EARLY_OFF:_SIZE] = bytes(_SIZE - _EARLY_OFF)
            struct.pack_into("<I", self._mm, _OWNERS_END_OFF, 0)
            self._live[0] = 0
        finally:
            self._unlock()

    # -- waiting requests and interrupts ------------------------------------------------------
    def add_wait(self, unique: int, tid: int) -> bool:
        """Put a waiting request on the board (its thread `tid`, 0 until it runs: set_tid());
        True when an INTERRUPT for it came first.  ENOLCK when the board is full."""
        self._lock()
        try:
            at = self._find(_U64.pack(unique), _WAITS_OFF, self._waits_end(), _WAIT.size)
            if at >= 0:
                # Left by a worker that died while the request waited: its successor serves
                # the request again, and an INTERRUPT that reached the dead one still counts.
                state = _WAIT.unpack_from(self._mm, at)[3]
                _WAIT.pack_into(self._mm, at, unique, os.getpid(), tid, state)
                return state == INTERRUPTED
            at = self._free_slot(_WAITS_END_OFF, _WAITS_OFF, _EARLY_OFF, _WAIT.size)
            if at < 0:
                raise OSError(errno.ENOLCK, "too many requests waiting for a lock")
            early = self._find(_U64.pack(unique), _EARLY_OFF, _SIZE, 8)
            if early >= 0:
                _U64.pack_into(self._mm, early, 0)
            _WAIT.pack_into(self._mm, at, 0, os.getpid(), tid,
                            INTERRUPTED if early >= 0 else WAITING)
            _U64.pack_into(self._mm, at, unique)
            return early >= 0
        finally:
            self._unlock()

    def set_tid(self, unique: int, tid: int) -> None:
        at = self._find(_U64.pack(unique), _WAITS_OFF, self._waits_end(), _WAIT.size)
        if at >= 0:
            struct.pack_into("<i", self._mm, at + 12, tid)

    def remove_wait(self, unique: int) -> None:
        self._lock()
        try:
            at = self._find(_U64.pack(unique), _WAITS_OFF, self._waits_end(), _WAIT.size)
            if at >= 0:
                _U64.pack_into(self._mm, at, 0)
                self._lower(_WAITS_END_OFF, _WAITS_OFF, _WAIT.size)
        finally:
            self._unlock()

    def interrupted(self, unique: int) -> bool:
        """Read by the waiting thread itself: one aligned load, no lock."""
        at = self._find(_U64.pack(unique), _WAITS_OFF, self._waits_end(), _WAIT.size)
        return at >= 0 and _WAIT.unpack_from(self._mm, at)[3] == INTERRUPTED

    def interrupt(self, unique: int) -> None:
        """FUSE_INTERRUPT: stop the wait of request `unique`, in whichever worker it is."""
        if unique == 0:
            return
        self._lock()
        try:
            at = self._find(_U64.pack(unique), _WAITS_OFF, self._waits_end(), _WAIT.size)
            if at < 0:
                # Not (yet) waiting: remembered, in case its SETLKW is still on its way.
                nxt = struct.unpack_from("<I", self._mm, _EARLY_NEXT_OFF)[0] % _EARLY
                _U64.pack_into(self._mm, _EARLY_OFF + nxt * 8, unique)
                struct.pack_into("<I", self._mm, _EARLY_NEXT_OFF, (nxt + 1) % _EARLY)
                return
            _u, tgid, tid, _state = _WAIT.unpack_from(self._mm, at)
            struct.pack_into("<I", self._mm, at + 16, INTERRUPTED)
        finally:
            self._unlock()
        wake(tgid, tid)

    def interrupt_all(self) -> None:
        """The session ended: every wait stops."""
        woken = []
        self._lock()
        try:
            for at in range(_WAITS_OFF, self._waits_end(), _WAIT.size):
                u, tgid, tid, _state = _WAIT.unpack_from(self._mm, at)
                if u:
                    struct.pack_into("<I", self._mm, at + 16, INTERRUPTED)
                    woken.append((tgid, tid))
        finally:
            self._unlock()
        for tgid, tid in woken:
            wake(tgid, tid)


def wake(tgid: int, tid: int) -> None:
    """Interrupt the lock wait of thread `tid` of worker `tgid` (it may have ended: ESRCH)."""
    _libc.syscall(_SYS_TGKILL, tgid, tid, int(WAKE_SIGNAL))


def _ignore(signum: int, frame: object) -> None:
    pass


def install_wake_signal() -> None:
    """In a worker's main thread: WAKE_SIGNAL interrupts a helper thread's wait (EINTR)."""
    signal.signal(WAKE_SIGNAL, _ignore)
    signal.siginterrupt(WAKE_SIGNAL, True)


# The board of every PassthroughFs not given one.  Made when this module is first imported --
# by the supervisor, before it forks -- so all workers, respawned ones included, share it.
BOARD = LockBoard()


# -- the blocking calls, made by helper threads ---------------------------------------------------
def blocking_posix(fd: int, l_type: int, l_start: int, l_len: int) -> Callable[[], int]:
    """F_OFD_SETLKW on `fd`, once: returns 0 or the errno (EINTR when interrupted).  Through
    ctypes, which releases the GIL and, unlike fcntl.fcntl, does not retry after EINTR."""
    buf = ctypes.create_string_buffer(FLOCK.pack(l_type, os.SEEK_SET, l_start, l_len, 0),
                                      FLOCK.size)

    def call() -> int:
        if _libc.fcntl(ctypes.c_int(fd), ctypes.c_int(F_OFD_SETLKW), buf) == 0:
            return 0
        return ctypes.get_errno()
    return call


def blocking_flock(fd: int, operation: int) -> Callable[[], int]:
    def call() -> int:
        if _libc.flock(ctypes.c_int(fd), ctypes.c_int(operation)) == 0:
            return 0
        return ctypes.get_errno()
    return call


def try_posix(fd: int, l_type: int, l_start: int, l_len: int) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, FLOCK.pack(l_type, os.SEEK_SET, l_start, l_len, 0))


def probe_posix(fd: int, l_type: int, l_start: int, l_len: int) -> tuple[int, int, int]:
    """F_OFD_GETLK: (type, l_start, l_len) of the first conflicting lock, type F_UNLCK: none."""
    out = fcntl.fcntl(fd, F_OFD_GETLK, FLOCK.pack(l_type, os.SEEK_SET, l_start, l_len, 0))
    t, _w, s, n, _pid = FLOCK.unpack(out)
    return t, s, n


@dataclasses.dataclass(eq=False)
class Blocked:
    """A lock request that has to wait: `call` runs in a helper thread (returns 0 or an
    errno); `done(err)` runs in the worker's main thread once it returned, granted or not."""

    unique: int
    call: Callable[[], int]
    done: Callable[[int], None]


@dataclasses.dataclass(eq=False)
class Wait:
    head: int
    blocked: Blocked
    thread: threading.Thread | None = None
    tid: int = 0
    err: int = 0
    cancelled: bool = False


class Waits:
    """One worker's waiting lock requests and their helper threads.  Finished waits are
    reported through an eventfd the worker polls with its channel and kick."""

    def __init__(self, board: LockBoard) -> None:
        self.board = board
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.pending: dict[int, Wait] = {}        # by unique
        self._done: deque[Wait] = deque()
        install_wake_signal()

    def start(self, head: int, blocked: Blocked) -> None:
        """Wait for `blocked` in a thread of its own.  OSError (ENOLCK: too many waits,
        EAGAIN: no thread) when the wait could not start: nothing of it is left running."""
        unique = blocked.unique
        early = self.board.add_wait(unique, 0)
        w = Wait(head, blocked)
        w.thread = threading.Thread(target=self._run, args=(w,), daemon=True,
                                    name=f"lock-wait-{unique}")
        try:
            w.thread.start()
        except RuntimeError as e:
            self.board.remove_wait(unique)
            raise OSError(errno.EAGAIN, f"no thread to wait for a lock in: {e}") from None
        w.tid = w.thread.native_id or 0
        self.pending[unique] = w
        # Until here an INTERRUPT could not signal the thread: resend() does (stuck()).
        self.board.set_tid(unique, w.tid)
        if early:
            wake(os.getpid(), w.tid)

    def _run(self, w: Wait) -> None:
        board = self.board
        unique = w.blocked.unique
        while True:
            err = w.blocked.call()
            if err != errno.EINTR or w.cancelled or board.interrupted(unique):
                break
        w.err = err
        self._done.append(w)
        os.eventfd_write(self.fd, 1)

    def finished(self) -> list[Wait]:
        """The waits whose thread returned (in the main thread: bookkeeping done)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        out = []
        while self._done:
            w = self._done.popleft()
            if w.thread is not None:
                w.thread.join()
            self.pending.pop(w.blocked.unique, None)
            if not w.cancelled:
                self.board.remove_wait(w.blocked.unique)
            w.blocked.done(w.err)
            out.append(w)
        return out

    def cancel_all(self) -> None:
        """The ring stopped: the waits end unanswered (the journal keeps the requests, and a
        resumed ring serves them again)."""
        for w in list(self.pending.values()):
            if not w.cancelled:
                w.cancelled = True
                self.board.remove_wait(w.blocked.unique)
                wake(os.getpid(), w.tid)

    def stuck(self) -> bool:
        """Waits told to stop whose thread has not returned yet: a signal can land just
        before the thread enters the call, so the worker sends it again (resend())."""
        return any(w.cancelled or self.board.interrupted(u) for u, w in self.pending.items())

    def resend(self) -> None:
        for u, w in list(self.pending.items()):
            if w.cancelled or self.board.interrupted(u):
                wake(os.getpid(), w.tid)
