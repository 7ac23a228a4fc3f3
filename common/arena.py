"""Shared filesystem state: the inode table, the handle table and per-queue counters.

Every queue worker must see one filesystem: a nodeid returned on one queue is valid on every
other, an fh opened on one queue is usable on another, and FORGET on the hiprio queue drops the
lookup count that LOOKUPs on request queues raised.  The tables therefore live in one
MAP_SHARED anonymous mapping created before the workers are forked and inherited by all of them.
Workers also share one fd table (clone(CLONE_FILES)), so an fd number stored here means the same
open file in every worker.

Use-after-close: because fd numbers are global to all workers, an entry's fd is closed only once
nobody can still be using it.  Users *pin* an entry for the duration of a request
(acquire/release); an inode's fd is closed when both its lookup count and its pin count are
zero, a handle's fd when it was removed (RELEASE) and its pin count is zero.  The close itself
always happens after the lock is dropped.

Ids.  A nodeid or fh is ``(generation << 32) | slot``, slot >= 1.  A slot's generation is bumped
every time the slot is freed, so a stale id never reaches the slot's next occupant.  Id 0 is
never handed out; nodeid 1 (generation 0, slot 1) is FUSE_ROOT_ID and is never freed.  One
exception: a state loaded from the Rust virtiofsd, whose fhs count from 0, may put a handle in
handle slot 0 (fh 0); that slot is never handed out again once it is freed.

The tables are implemented once, in C (common/state.c, declared in common/state.h), and called
from here through the _native cffi module and directly by the native request engine, so both
change the same entries the same way.  This module is their Python face: it maps the C
functions' negative errno results to OSError and owns the mapping.

Locking and crash recovery.  Each table has one process-shared lock word (vfs_lock, owner =
pid, taken over when the owner died); every read or update of the table happens under it and
performs no syscall.  A worker may be killed at any instruction, also while holding the lock, so
updates are ordered such that the entries' *state words* are the single source of truth: an
entry's other fields are written first and the entry is then committed, or freed, by one aligned
8-byte store of its state word (``generation << 32 | state``).  Everything else in a table --
free list, high-water mark, live count, hash index -- is derived data, rebuilt from the state
words (slots_repair() in state.c) whenever the lock was taken over from a dead owner.  What a
crash can still cost: an fd the dead process had opened but not committed, or had decided to
close but not yet closed, and pins the dead process held (those entries then stay open; never
the unsafe way).

Layout of the mapping (all integers native-endian, '=' structs; offsets in bytes):

    0     header        "=8sIIIII"   magic "PVFSARN2", version 3, max_inodes, index_buckets,
                                     max_handles, max_queues
    32    fd budget     "=I"         most inodes + handles the guest may hold open (0: no
                                     limit); see ``limit_fds``
    64    inode header  "=IIIIIII"   lock, free_head, hwm, live, index_used, repairs, by_handle
    128   handle header "=IIIIIII"   lock, free_head, hwm, live, (unused), repairs, (unused)
    192   counters      max_queues x "=Q"                      (request count per queue)
    ...   inode entries (max_inodes + 1) x 56 bytes, slot 0 unused:
            "=QQIiQQQII" state, nlookup, pins, fd, dev, ino, mnt_id, next_free, (pad)
    ...   inode index   index_buckets x "=I": 0 empty, 0xFFFFFFFF tombstone, else a slot
    ...   handle entries (max_handles + 1) x 32 bytes, slot 0 only restored (fh 0):
            "=QQIiII"    state, nodeid, pins, fd, flags, next_free
    ...   inode file handles (max_inodes + 1) x 48 bytes, slot 0 unused:
            "=iI40s"     handle type, length, handle -- of an inode entry whose fd is -2
                         (--inode-file-handles: kept as a file handle, opened for each pin)
Both kinds of entry start with the same 24 bytes (state, nlookup or nodeid, pins, fd), all that
the slot core shared by the two tables touches.  Each region starts on a 64-byte boundary.
free_head chains free slots through next_free (0 ends the list); slots at or above the
high-water mark ``hwm`` were never used, so creating a table touches no entry.  The index is an
open-addressing hash over (dev, ino, mnt_id) with linear probing, at least twice as many buckets
as inode slots.  A key's first bucket is ``vfs_inode_hash(dev, ino, mnt_id) & (buckets - 1)``:
murmur3's 64-bit finaliser chained over mnt_id, dev and ino, the same in every process and in C
(Python's tuple hash is neither).  The index is rebuilt in place, dropping tombstones, when empty
buckets fall below a quarter.  The root inode is kept out of the index and matched by (dev, ino)
alone.  The functions that walk a whole table and close what they free (forget_all, remove_all)
drop the lock every 64 fds to close them.

One thread per process may use an Arena: the lock owner is the pid, so two threads of one
process would both get in.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import weakref
from typing import Generic, NamedTuple, Protocol, TypeVar

from pyvirtiofsd.common import native, shm
from pyvirtiofsd.common.journal import QueueJournal

__all__ = ["Arena", "HandleTable", "InodeEntry", "InodeTable", "Pinnable", "Pinned",
           "QueueCounters"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

_MAX_SLOTS = 1 << 30
_U64_MAX = (1 << 64) - 1
# Where the tables' lock words are (the header layout above).
_INODE_LOCK_OFF = 64
_VFS_OPENED = 1  # state.h: vfs_inode_acquire opened the fd from a file handle
_HANDLE_LOCK_OFF = 128
_SLOT_WORD = struct.Struct("=I")
_SLOT_HEAD = struct.Struct("=QQIi")

# Raw views of table entries (handle_file): state + nodeid, flags, inode (dev, ino).
_ENTRY_HEAD = struct.Struct("=QQ")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_DEV_INO = struct.Struct("=QQ")

_ffi = native.ffi
_lib = native.lib

# The lock owner is the calling process.  Workers are forked or cloned (clone_process runs the
# interpreter's at-fork hooks too), so every child refreshes the pid cached in its arenas'
# views instead of paying a getpid() syscall per lock.
_attached: weakref.WeakSet[Arena] = weakref.WeakSet()


def _refresh_pid() -> None:
    pid = os.getpid()
    for arena in _attached:
        arena._c.pid = pid


os.register_at_fork(after_in_child=_refresh_pid)


def _bad_id(kind: str, value: int) -> OSError:
    return OSError(errno.EBADF, f"unknown or stale {kind} {value:#x}")


def _refused(arena_c, kind: str, capacity: int) -> OSError:
    """ENFILE for a refused new entry, saying whether the fd budget or the table was full."""
    budget = _lib.vfs_arena_fd_budget(arena_c)
    counts = _ffi.new("uint32_t[2]")
    _lib.vfs_arena_usage(arena_c, counts, counts + 1)
    if budget and counts[0] + counts[1] >= budget:
        return OSError(errno.ENFILE, "the guest holds as many open files as the daemon allows")
    return OSError(errno.ENFILE, f"{kind} table full ({capacity} entries)")


class Pinnable(Protocol[T_co]):
    """A table whose ids can be pinned: what `acquire` returns stays valid until `release`."""

    def acquire(self, ident: int, /) -> T_co: ...

    def release(self, ident: int, /) -> None: ...


class Pinned(Generic[T]):
    """``with Pinned(table, id) as what_acquire_returns:`` -- acquire, release on exit; for
    any Pinnable table (the arena's own, and the journaled views of them in a queue worker)."""

    __slots__ = ("_id", "_table")

    def __init__(self, table: Pinnable[T], ident: int) -> None:
        self._table = table
        self._id = ident

    def __enter__(self) -> T:
        return self._table.acquire(self._id)

    def __exit__(self, *exc: object) -> None:
        self._table.release(self._id)


class _SlotTable:
    """What both tables share on the Python side: the C view, reusable out-parameters (one
    thread per process uses an Arena) and the id-checking call."""

    _kind = ""

    def __init__(self, c, capacity: int, lock_off: int) -> None:
        self._c = c  # struct vfs_arena *
        self._cap = capacity
        self._lockp = native.u32_ptr(c.base, lock_off)  # the lock word, for crash tests
        self._u64 = _ffi.new("uint64_t[1]")
        self._u32 = _ffi.new("uint32_t[1]")
        self._int = _ffi.new("int[1]")

    def _by_id(self, ident: int, fn, *args) -> int:
        """Call the C function `fn(*args)` about `ident`: a negative result (-EBADF), or an id
        no u64 can hold, is an unknown or stale id; a positive one (VFS_OPENED) is returned."""
        try:
            rc = fn(*args)
        except OverflowError:
            rc = -errno.EBADF
        if rc == -errno.EIO:
            # Restored from a device state but not found again (vfs_inode_restore).
            raise OSError(errno.EIO, f"{self._kind} {ident:#x} was lost in a migration")
        if rc in (-errno.EBADF, -errno.EINVAL):
            raise _bad_id(self._kind, ident)
        if rc < 0:
            # open_by_handle_at(2) of an inode kept as a file handle: ESTALE for a file gone.
            raise OSError(-rc, f"{self._kind} {ident:#x} cannot be opened by its file handle")
        return rc



class InodeTable(_SlotTable):
    """Inodes known to the guest, keyed by (dev, ino, mnt_id), each owning an O_PATH fd -- or,
    with --inode-file-handles=prefer (use_file_handles), its file handle, opened again for each
    pin and closed at its release."""

    ROOT: int = 1  # FUSE_ROOT_ID
    _kind = "nodeid"

    def __init__(self, c, capacity: int, lock_off: int) -> None:
        super().__init__(c, capacity, lock_off)
        # (nodeid, fd) of the pins whose fd was opened from a file handle, latest last: a
        # request holds a few at most, closed by the release of their nodeid.
        self._opened: list[tuple[int, int]] = []

    def use_file_handles(self, mount_fd: int, mnt_id: int) -> None:
        """Keep new inodes on the mount `mnt_id` as file handles, opened through `mount_fd`
        (the share's filesystem, not O_PATH; not owned by the table)."""
        _lib.vfs_arena_use_file_handles(self._c, mount_fd, mnt_id)

    def by_handle_count(self) -> int:
        """Live entries kept as a file handle, holding no fd."""
        return _lib.vfs_inode_by_handle(self._c)

    def _pinned_fd(self, nodeid: int, rc: int) -> int:
        fd = self._int[0]
        if rc == _VFS_OPENED:
            self._opened.append((nodeid, fd))
        return fd

    def _close_opened(self, nodeid: int, journal: QueueJournal | None = None) -> None:
        opened = self._opened
        for i in range(len(opened) - 1, -1, -1):
            if opened[i][0] == nodeid:
                fd = opened.pop(i)[1]
                if journal is not None:
                    journal.disown_fd(fd)   # before the close: never a number reused since
                os.close(fd)
                return

    def set_root(self, fd: int, dev: int, ino: int) -> None:
        """Install the shared directory's O_PATH fd as nodeid 1; the table owns `fd`."""
        if _lib.vfs_inode_set_root(self._c, fd, dev, ino) == -errno.EEXIST:
            raise OSError(errno.EEXIST, "root inode already set")

    def lookup_or_insert(self, fd: int, dev: int, ino: int, mnt_id: int = 0) -> tuple[int, bool]:
        """Count one lookup of (dev, ino, mnt_id) whose O_PATH fd the caller just opened.

        Returns (nodeid, True) when a new entry now owns `fd`, or (nodeid, False) for a known
        inode -- then, and when this raises (ENFILE: table full, or the fd budget reached), the
        caller closes `fd`.
        The root's (dev, ino) always yields ROOT, whatever mnt_id.
        """
        out, inserted = self._u64, self._int
        rc = _lib.vfs_inode_lookup_or_insert(self._c, fd, dev, ino, mnt_id, out, inserted)
        if rc:
            raise _refused(self._c, "inode", self._cap)
        return out[0], inserted[0] != 0

    def acquire(self, nodeid: int) -> int:
        """Pin `nodeid` and return its fd; EBADF if unknown, stale or forgotten (ESTALE: kept
        as a file handle whose file is gone)."""
        rc = self._by_id(nodeid, _lib.vfs_inode_acquire, self._c, nodeid, self._int)
        return self._pinned_fd(nodeid, rc)

    def release(self, nodeid: int) -> None:
        """Unpin `nodeid`; closes its fd if it was forgotten and this was the last pin (or the
        fd its pin opened from a file handle)."""
        try:
            self._by_id(nodeid, _lib.vfs_inode_release, self._c, nodeid)
        finally:
            self._close_opened(nodeid)

    def pinned(self, nodeid: int) -> Pinned[int]:
        """``with inodes.pinned(nodeid) as fd:`` -- the fd stays open for the block."""
        return Pinned(self, nodeid)

    def forget(self, nodeid: int, nlookup: int) -> None:
        """FORGET: drop up to `nlookup` lookups; the root is never freed, unknown ids ignored."""
        if 0 <= nodeid <= _U64_MAX:
            _lib.vfs_inode_forget(self._c, nodeid, min(max(nlookup, 0), _U64_MAX), self._u64)

    # -- the same, journaled for crash recovery (state.h: "journaled table changes") -------------
    def lookup_or_insert_journaled(self, journal: QueueJournal, fd: int, dev: int, ino: int,
                                   mnt_id: int = 0) -> tuple[int, bool]:
        """lookup_or_insert, then the LOOKUP recorded as an effect of the current request."""
        out, inserted = self._u64, self._int
        rc = _lib.vfs_inode_lookup_j(self._c, journal.cdata, fd, dev, ino, mnt_id, out, inserted)
        if rc:
            raise _refused(self._c, "inode", self._cap)
        return out[0], inserted[0] != 0

    def acquire_journaled(self, journal: QueueJournal, nodeid: int) -> int:
        """acquire, then the pin recorded in the queue's journal."""
        rc = self._by_id(nodeid, _lib.vfs_inode_acquire_j, self._c, journal.cdata, nodeid,
                         self._int)
        return self._pinned_fd(nodeid, rc)

    def release_journaled(self, journal: QueueJournal, nodeid: int) -> None:
        """The pin's record dropped, then release."""
        try:
            self._by_id(nodeid, _lib.vfs_inode_release_j, self._c, journal.cdata, nodeid)
        finally:
            self._close_opened(nodeid, journal)

    def forget_journaled(self, journal: QueueJournal, nodeid: int, nlookup: int) -> None:
        """forget, announced in the journal with the lookup count it found and counted after
        (unknown ids are announced with a count of 0 and change nothing)."""
        if 0 <= nodeid <= _U64_MAX:
            _lib.vfs_inode_forget_j(self._c, journal.cdata, nodeid,
                                    min(max(nlookup, 0), _U64_MAX))
        else:
            journal.forgetting(0, 0)
            journal.note_forget()

    def forget_all(self) -> None:
        """End of a FUSE session (DESTROY, or a new INIT): every inode but the root is
        forgotten; fds of entries pinned by a request in flight close at their last release."""
        _lib.vfs_inode_forget_all(self._c)

    def live_count(self) -> int:
        """Entries whose fd is still open, the root included."""
        return _lib.vfs_inode_live(self._c)

    def info(self, nodeid: int) -> tuple[int, int, int]:
        """(nlookup, pins, fd) of a live entry, forgotten-but-pinned included; else EBADF."""
        self._by_id(nodeid, _lib.vfs_inode_info, self._c, nodeid, self._u64, self._u32, self._int)
        return self._u64[0], self._u32[0], self._int[0]

    @property
    def repairs(self) -> int:
        """How often the lock was taken over from a dead process and the table rebuilt."""
        return _lib.vfs_inode_repairs(self._c)


class HandleTable(_SlotTable):
    """Open files (FUSE fh), each owning an fd opened for I/O."""

    _kind = "fh"

    def insert(self, fd: int, nodeid: int, flags: int) -> int:
        """Register an open file; the table owns `fd` unless this raises ENFILE."""
        rc = _lib.vfs_handle_insert(self._c, fd, nodeid, flags, self._u64)
        if rc:
            raise _refused(self._c, "handle", self._cap)
        return self._u64[0]

    def acquire(self, fh: int) -> tuple[int, int, int]:
        """Pin `fh`; returns (fd, nodeid, flags).  EBADF if unknown, stale or released."""
        fd, nodeid, flags = self._int, self._u64, self._u32
        self._by_id(fh, _lib.vfs_handle_acquire, self._c, fh, fd, nodeid, flags)
        return fd[0], nodeid[0], flags[0]

    def release(self, fh: int) -> None:
        """Unpin `fh`; closes the fd if it was removed and this was the last pin."""
        self._by_id(fh, _lib.vfs_handle_release, self._c, fh)

    def pinned(self, fh: int) -> Pinned[tuple[int, int, int]]:
        """``with handles.pinned(fh) as (fd, nodeid, flags):`` -- valid for the block."""
        return Pinned(self, fh)

    def remove(self, fh: int) -> None:
        """RELEASE: `fh` is unusable at once; its fd is closed when the last pin goes."""
        self._by_id(fh, _lib.vfs_handle_remove, self._c, fh)

    # -- the same, journaled for crash recovery ------------------------------------------------
    def insert_journaled(self, journal: QueueJournal, fd: int, nodeid: int, flags: int) -> int:
        """insert, then the new handle recorded as an effect of the current request."""
        rc = _lib.vfs_handle_insert_j(self._c, journal.cdata, fd, nodeid, flags, self._u64)
        if rc:
            raise _refused(self._c, "handle", self._cap)
        return self._u64[0]

    def acquire_journaled(self, journal: QueueJournal, fh: int) -> tuple[int, int, int]:
        """acquire, then the pin recorded in the queue's journal."""
        fd, nodeid, flags = self._int, self._u64, self._u32
        self._by_id(fh, _lib.vfs_handle_acquire_j, self._c, journal.cdata, fh, fd, nodeid, flags)
        return fd[0], nodeid[0], flags[0]

    def release_journaled(self, journal: QueueJournal, fh: int) -> None:
        """The pin's record dropped, then release."""
        self._by_id(fh, _lib.vfs_handle_release_j, self._c, journal.cdata, fh)

    def remove_all(self) -> None:
        """End of a FUSE session: every handle is released as if by RELEASE."""
        _lib.vfs_handle_remove_all(self._c)

    def live_count(self) -> int:
        """Handles whose fd is still open, removed-but-pinned ones included."""
        return _lib.vfs_handle_live(self._c)

    @property
    def repairs(self) -> int:
        """How often the lock was taken over from a dead process and the table rebuilt."""
        return _lib.vfs_handle_repairs(self._c)


class QueueCounters:
    """Per-queue u64 request counters, updated lock-free with an atomic add."""

    def __init__(self, c, count: int) -> None:
        self._c = c
        self._n = count

    def add(self, queue: int, n: int = 1) -> None:
        if not 0 <= queue < self._n:
            raise IndexError(f"queue {queue} out of range 0..{self._n - 1}")
        _lib.vfs_counter_add(self._c, queue, n)

    def get(self, queue: int) -> int:
        if not 0 <= queue < self._n:
            raise IndexError(f"queue {queue} out of range 0..{self._n - 1}")
        return _lib.vfs_counter_get(self._c, queue)

    def snapshot(self) -> list[int]:
        return [_lib.vfs_counter_get(self._c, q) for q in range(self._n)]


class InodeEntry(NamedTuple):
    nodeid: int
    nlookup: int
    dev: int
    ino: int
    mnt_id: int
    fd: int
    opened: bool = False  # `fd` was opened from the entry's file handle: the caller closes it


class HandleEntry(NamedTuple):
    fh: int
    nodeid: int
    flags: int
    fd: int


class Arena:
    """The shared mapping and the three views onto it; create() before forking the workers."""

    inodes: InodeTable
    handles: HandleTable
    counters: QueueCounters

    def __init__(self, mm: mmap.mmap, fd: int = -1) -> None:
        """Attach to a mapping formatted by create() (here or in a parent process); `fd`:
        its memfd, when this process keeps it."""
        self._mm = mm
        self.fd = fd
        self._base = native.address_of(mm)
        self._c = _ffi.new("struct vfs_arena *")
        if _lib.vfs_arena_attach(self._c, self._base, len(mm), os.getpid()):
            _ffi.release(self._base)
            raise ValueError("not a pyvirtiofsd arena of this version")
        c = self._c
        self.inodes = InodeTable(c, c.max_inodes, _INODE_LOCK_OFF)
        self.handles = HandleTable(c, c.max_handles, _HANDLE_LOCK_OFF)
        self.counters = QueueCounters(c, c.max_queues)
        _attached.add(self)

    def limit_fds(self, budget: int) -> None:
        """Refuse (ENFILE) a new inode or handle once live inodes + handles reach `budget`;
        0 lifts the limit."""
        if not 0 <= budget <= 0xFFFFFFFF:
            raise ValueError(f"fd budget {budget} out of range")
        _lib.vfs_arena_limit_fds(self._c, budget)

    @property
    def fd_budget(self) -> int:
        return _lib.vfs_arena_fd_budget(self._c)

    def usage(self) -> tuple[int, int]:
        """(inodes, handles) whose fd is open, read from the table headers without taking the
        locks: a snapshot for status reports that never waits for a worker."""
        counts = _ffi.new("uint32_t[2]")     # its own: a status thread may ask
        _lib.vfs_arena_usage(self._c, counts, counts + 1)
        return counts[0], counts[1]

    @classmethod
    def create(cls, max_inodes: int = 1 << 18, max_handles: int = 1 << 16,
               max_queues: int = 64, keep_fd: bool = False) -> Arena:
        """Map a zeroed shared arena.  max_inodes counts the root; ids fit 32-bit slots.
        keep_fd: keep its memfd (the supervisor, for a live upgrade)."""
        for name, value, low in (("max_inodes", max_inodes, 1), ("max_handles", max_handles, 1),
                                 ("max_queues", max_queues, 1)):
            if not low <= value <= _MAX_SLOTS:
                raise ValueError(f"{name} must be in {low}..{_MAX_SLOTS}, not {value}")
        size = _lib.vfs_arena_size(max_inodes, max_handles, max_queues)
        fd, mm = shm.create(size, "arena", keep_fd)
        base = native.address_of(mm)
        try:
            rc = _lib.vfs_arena_format(base, size, max_inodes, max_handles, max_queues)
        finally:
            _ffi.release(base)
        if rc:
            mm.close()
            os.close(fd)
            raise OSError(-rc, "cannot format the shared arena")
        return cls(mm, fd)

    def table_fds(self) -> list[int]:
        """Every fd number the inode and handle tables hold open (live or closing entries), read
        from the entries' first 24 bytes (state, -, pins, fd) up to each table's high-water
        mark: what a daemon taking over the tables must find at the same numbers."""
        c = self._c
        out: set[int] = set()
        for header, first, size, count in ((_INODE_LOCK_OFF, c.inodes_off, 56, c.max_inodes),
                                          (_HANDLE_LOCK_OFF, c.handles_off, 32, c.max_handles)):
            hwm = min(_SLOT_WORD.unpack_from(self._mm, header + 8)[0], count + 1)
            for slot in range(1, hwm):
                state, _x, _pins, fd = _SLOT_HEAD.unpack_from(self._mm, first + slot * size)
                if state & 0xFFFFFFFF and fd >= 0:
                    out.add(fd)
        return sorted(out)

    def handle_file(self, fh: int) -> tuple[int, int, int] | None:
        """(dev, ino, open flags) of the file behind the live handle `fh`, or None.

        Read without taking the locks, for the supervisor, which must never wait for a worker:
        an entry's state word is written last (the module doc), so an entry whose state word
        is the same live word before and after its fields are read was read whole.  The answer
        is a snapshot: the handle may be released a moment later, as after any check."""
        c = self._c
        slot = fh & 0xFFFFFFFF
        if not 0 < slot <= c.max_handles or fh >> 64:
            return None
        live = (fh & ~0xFFFFFFFF) | 1
        at = c.handles_off + 32 * slot
        state, nodeid = _ENTRY_HEAD.unpack_from(self._mm, at)
        (flags,) = _U32.unpack_from(self._mm, at + 24)
        if state != live or _ENTRY_HEAD.unpack_from(self._mm, at)[0] != live:
            return None
        islot = nodeid & 0xFFFFFFFF
        if not 0 < islot <= c.max_inodes:
            return None
        ilive = (nodeid & ~0xFFFFFFFF) | 1
        iat = c.inodes_off + 56 * islot
        (istate,) = _U64.unpack_from(self._mm, iat)
        dev, ino = _DEV_INO.unpack_from(self._mm, iat + 24)
        if istate != ilive or _U64.unpack_from(self._mm, iat)[0] != ilive:
            return None
        return dev, ino, flags
    # -- device state (common/devstate.py): walk and restore the tables while no queue serves --
    def inode_entries(self) -> list[InodeEntry]:
        """Every inode the guest holds (forgotten-but-pinned ones left out), root included."""
        out: list[InodeEntry] = []
        nodeid, nlookup, dev, ino, mnt = (_ffi.new("uint64_t[1]") for _ in range(5))
        fd = _ffi.new("int[1]")
        slot = 1
        while True:
            rc = _lib.vfs_inode_entry(self._c, slot, nodeid, nlookup, dev, ino, mnt, fd)
            if rc == -errno.EINVAL:
                return out
            if rc >= 0:
                out.append(InodeEntry(nodeid[0], nlookup[0], dev[0], ino[0], mnt[0], fd[0],
                                      rc == _VFS_OPENED))
            slot += 1

    def handle_entries(self) -> list[HandleEntry]:
        out: list[HandleEntry] = []
        fh, nodeid = _ffi.new("uint64_t[1]"), _ffi.new("uint64_t[1]")
        flags, fd = _ffi.new("uint32_t[1]"), _ffi.new("int[1]")
        slot = 0            # a handle restored from the Rust virtiofsd may be fh 0
        while True:
            rc = _lib.vfs_handle_entry(self._c, slot, fh, nodeid, flags, fd)
            if rc == -errno.EINVAL:
                return out
            if rc == 0:
                out.append(HandleEntry(fh[0], nodeid[0], flags[0], fd[0]))
            slot += 1

    def restore_inode(self, nodeid: int, fd: int, nlookup: int, dev: int, ino: int,
                      mnt_id: int) -> None:
        """Put an inode at exactly `nodeid`; the table owns `fd` (-1: invalid, answers EIO)."""
        rc = _lib.vfs_inode_restore(self._c, nodeid, fd, nlookup, dev, ino, mnt_id)
        if rc:
            raise OSError(-rc, f"nodeid {nodeid:#x} cannot be restored")

    def restore_handle(self, fh: int, fd: int, nodeid: int, flags: int) -> None:
        rc = _lib.vfs_handle_restore(self._c, fh, fd, nodeid, flags)
        if rc:
            raise OSError(-rc, f"fh {fh:#x} cannot be restored")

    def capacity(self) -> tuple[int, int]:
        """(inode slots, handle slots): the largest slot number an id may name in each."""
        return self._c.max_inodes, self._c.max_handles

    def restored(self) -> None:
        """All restored entries are in: rebuild the free lists and the inode index."""
        _lib.vfs_arena_restored(self._c)

    @property
    def address(self) -> int:
        """The address of this process's `struct vfs_arena` (for the native engine)."""
        return int(_ffi.cast("uintptr_t", self._c))

    def close(self) -> None:
        """Unmap in this process.  The fds in the tables belong to the shared fd table and
        stay open."""
        if self._mm.closed:
            return
        _attached.discard(self)
        # A use after this raises (cffi refuses None) instead of reading an unmapped address.
        self.inodes._c = self.handles._c = self.counters._c = None
        _ffi.release(self._base)
        self._mm.close()

