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
never valid; nodeid 1 (generation 0, slot 1) is FUSE_ROOT_ID and is never freed.

Locking and crash recovery.  Each table has one process-shared lock word (native.vfs_lock, owner
= pid, taken over when the owner died); every read or update of the table happens under it and
performs no syscall.  A worker may be killed at any instruction, also while holding the lock, so
updates are ordered such that the entries' *state words* are the single source of truth: an
entry's other fields are written first and the entry is then committed, or freed, by one aligned
8-byte store of its state word (``generation << 32 | state``).  Everything else in a table --
free list, high-water mark, live count, hash index -- is derived data, rebuilt from the state
words by ``_repair()`` whenever the lock was taken over from a dead owner.  What a crash can
still cost: an fd the dead process had opened but not committed, or had decided to close but not
yet closed, and pins the dead process held (those entries then stay open; never the unsafe way).

Layout of the mapping (all integers native-endian, '=' structs; offsets in bytes):

    0     header        "=8sIIIII"   magic, version, max_inodes, index_buckets, max_handles,
                                     max_queues
    32    fd budget     "=I"         most inodes + handles the guest may hold open (0: no
                                     limit); see ``limit_fds``
    64    inode header  "=IIIIII"    lock, free_head, hwm, live, index_used, repairs
    128   handle header "=IIIIII"    lock, free_head, hwm, live, (unused), repairs
    192   counters      max_queues x "=Q"                      (request count per queue)
    ...   inode entries (max_inodes + 1) x 56 bytes, slot 0 unused:
            "=QQIiQQQII" state, nlookup, pins, fd, dev, ino, mnt_id, next_free, (pad)
    ...   inode index   index_buckets x "=I": 0 empty, 0xFFFFFFFF tombstone, else a slot
    ...   handle entries (max_handles + 1) x 32 bytes, slot 0 unused:
            "=QQIiII"    state, nodeid, pins, fd, flags, next_free
Each region starts on a 64-byte boundary.  free_head chains free slots through next_free (0 ends
the list); slots at or above the high-water mark ``hwm`` were never used, so creating a table
touches no entry.  The index is an open-addressing hash over (dev, ino, mnt_id) with linear
probing, at least twice as many buckets as inode slots; it is rebuilt in place, dropping
tombstones, when empty buckets fall below a quarter.  The root inode is kept out of the index
and matched by (dev, ino) alone.

One thread per process may use an Arena: the lock owner is the pid, so two threads of one
process would both get in.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct

from pyvirtiofsd.common import native

__all__ = ["Arena", "HandleTable", "InodeTable", "QueueCounters"]

_MAGIC = b"PVFSARN1"
_VERSION = 1

_HEADER = struct.Struct("=8sIIIII")
_TABLE_HDR = struct.Struct("=IIIIII")  # lock, free_head, hwm, live, index_used, repairs
_TABLE_STATE = struct.Struct("=IIII")  # the same header from free_head on (offset 4)
_USED_OFF = 16
_REPAIRS_OFF = 20
_INODE_HDR_OFF = 64
_HANDLE_HDR_OFF = 128
_COUNTERS_OFF = 192
_BUDGET_OFF = 32
_LIVE_OFF = 12          # `live` in a table header

_INODE = struct.Struct("=QQIiQQQII")
_INODE_HOT = struct.Struct("=QQIi")  # state, nlookup, pins, fd
_INODE_KEY = struct.Struct("=Q16xQQQ")  # state, dev, ino, mnt_id
_I_NLOOKUP = 8
_I_PINS = 16
_I_NEXT = 48

_HANDLE = struct.Struct("=QQIiII")
_HANDLE_HOT = struct.Struct("=QQIiI")  # state, nodeid, pins, fd, flags
_H_PINS = 16
_H_NEXT = 28

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")

# Low half of a state word; the high half is the slot's generation.
_FREE = 0
_LIVE = 1
_CLOSING = 2  # handle removed by RELEASE while pinned: unusable, fd still open

_SLOT_MASK = 0xFFFFFFFF
_GEN_MASK = 0xFFFFFFFF
_EMPTY = 0
_TOMB = 0xFFFFFFFF
_MAX_SLOTS = 1 << 30

_vfs_lock = native.lib.vfs_lock
_vfs_unlock = native.lib.vfs_unlock
_fetch_add64 = native.lib.vfs_fetch_add64

# The lock owner is the calling process.  Workers are forked or cloned (clone_process runs the
# interpreter's at-fork hooks too), so refresh the cached pid in every child instead of paying a
# getpid() syscall per lock.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def _align(n: int) -> int:
    return (n + 63) & ~63


def _bad_id(kind: str, value: int) -> OSError:
    return OSError(errno.EBADF, f"unknown or stale {kind} {value:#x}")


def _full(kind: str, capacity: int) -> OSError:
    return OSError(errno.ENFILE, f"{kind} table full ({capacity} entries)")


def _over_budget(view: memoryview) -> bool:
    """Every live inode and handle holds an fd of the shared table: past the budget a new one
    is refused, so the guest cannot take the fds the daemon itself needs (control messages,
    respawns).  Read under one table's lock only: the other count may be a few entries old."""
    budget = _U32.unpack_from(view, _BUDGET_OFF)[0]
    if not budget:
        return False
    held = (_U32.unpack_from(view, _INODE_HDR_OFF + _LIVE_OFF)[0]
            + _U32.unpack_from(view, _HANDLE_HDR_OFF + _LIVE_OFF)[0])
    return held >= budget


def _too_many() -> OSError:
    return OSError(errno.ENFILE, "the guest holds as many open files as the daemon allows")


def _close_quietly(fd: int) -> None:
    # The entry is gone whatever close() says; an fd here is an O_PATH fd or a file whose
    # write-back errors were already reported by FLUSH/FSYNC.
    try:
        os.close(fd)
    except OSError:
        pass


def _alloc(view: memoryview, hdr: int, next_off: int, esize: int,
           capacity: int) -> tuple[int, tuple[int, int, int, int]]:
    """Pick a free slot (0 when full) and the table header that claims it; stores nothing.

    `next_off` is the offset of slot 0's next_free field.  The caller writes the entry, then
    the header, then commits the entry's state word.
    """
    free_head, hwm, live, used = _TABLE_STATE.unpack_from(view, hdr + 4)
    if free_head:
        slot = free_head
        free_head = _U32.unpack_from(view, next_off + slot * esize)[0]
    elif hwm <= capacity:
        slot = hwm
        hwm += 1
    else:
        return 0, (free_head, hwm, live, used)
    return slot, (free_head, hwm, live + 1, used)


class _Pinned:
    """Context manager pinning one id of a table for the duration of a with-block."""

    __slots__ = ("_id", "_table")

    def __init__(self, table: InodeTable | HandleTable, ident: int) -> None:
        self._table = table
        self._id = ident

    def __enter__(self):
        return self._table.acquire(self._id)

    def __exit__(self, *exc: object) -> None:
        self._table.release(self._id)


class InodeTable:
    """Inodes known to the guest, keyed by (dev, ino, mnt_id), each owning an O_PATH fd."""

    ROOT: int = 1  # FUSE_ROOT_ID

    def __init__(self, view: memoryview, words, lockp, capacity: int,
                 entries_off: int, index_off: int, index: memoryview) -> None:
        self._view = view
        self._idx_off = index_off
        self._words = words  # uint64_t * over the whole mapping: single-store commits
        self._lockp = lockp
        self._cap = capacity
        self._ent = entries_off
        self._idx = index
        self._mask = len(index) - 1
        self._hdr = _INODE_HDR_OFF

    # -- public API -------------------------------------------------------------------------

    def set_root(self, fd: int, dev: int, ino: int) -> None:
        """Install the shared directory's O_PATH fd as nodeid 1; the table owns `fd`."""
        off = self._ent + _INODE.size
        view = self._view
        self._lock()
        try:
            state = _U64.unpack_from(view, off)[0]
            if state & _GEN_MASK == _FREE:
                _INODE.pack_into(view, off, 0, 1, 0, fd, dev, ino, 0, 0, 0)
                self._words[off >> 3] = _LIVE
                free_head, hwm, live, used = _TABLE_STATE.unpack_from(view, self._hdr + 4)
                _TABLE_STATE.pack_into(view, self._hdr + 4, free_head, hwm, live + 1, used)
        finally:
            _vfs_unlock(self._lockp)
        if state & _GEN_MASK != _FREE:
            raise OSError(errno.EEXIST, "root inode already set")

    def lookup_or_insert(self, fd: int, dev: int, ino: int, mnt_id: int = 0) -> tuple[int, bool]:
        """Count one lookup of (dev, ino, mnt_id) whose O_PATH fd the caller just opened.

        Returns (nodeid, True) when a new entry now owns `fd`, or (nodeid, False) for a known
        inode -- then, and when this raises (ENFILE: table full), the caller closes `fd`.
        The root's (dev, ino) always yields ROOT, whatever mnt_id.
        """
        view = self._view
        idx = self._idx
        mask = self._mask
        ent = self._ent
        isize = _INODE.size
        h = hash((dev, ino, mnt_id)) & mask
        nodeid = 0
        self._lock()
        try:
            rstate, rdev, rino, _ = _INODE_KEY.unpack_from(view, ent + isize)
            if rstate == _LIVE and rdev == dev and rino == ino:
                roff = ent + isize + _I_NLOOKUP
                _U64.pack_into(view, roff, _U64.unpack_from(view, roff)[0] + 1)
                return self.ROOT, False
            b = h
            slot = 0
            for _ in range(mask + 1):
                s = idx[b]
                if s == _EMPTY:
                    break
                if s != _TOMB:
                    st, d, i, m = _INODE_KEY.unpack_from(view, ent + s * isize)
                    if i == ino and d == dev and m == mnt_id and st & _GEN_MASK == _LIVE:
                        slot = s
                        break
                b = (b + 1) & mask
            if slot:
                off = ent + slot * isize
                st, nlookup = _INODE_HOT.unpack_from(view, off)[:2]
                # A forgotten entry still pinned by a request in flight is revived as-is.
                _U64.pack_into(view, off + _I_NLOOKUP, nlookup + 1)
                return (st - _LIVE) | slot, False
            if _over_budget(view):
                raise _too_many()
            slot, header = _alloc(view, self._hdr, ent + _I_NEXT, isize, self._cap)
            if slot:
                off = ent + slot * isize
                gen_word = _U64.unpack_from(view, off)[0] & ~_GEN_MASK
                # Still FREE while written: a bad argument raises before anything changed.
                _INODE.pack_into(view, off, gen_word, 1, 0, fd, dev, ino, mnt_id, 0, 0)
                self._store_header(header)
                self._words[off >> 3] = gen_word | _LIVE  # commit
                self._index_put(slot, h)
                nodeid = gen_word | slot
        finally:
            _vfs_unlock(self._lockp)
        if not nodeid:
            raise _full("inode", self._cap)
        return nodeid, True

    def acquire(self, nodeid: int) -> int:
        """Pin `nodeid` and return its fd; EBADF if unknown, stale or forgotten."""
        slot = nodeid & _SLOT_MASK
        if not 0 < slot <= self._cap:
            raise _bad_id("nodeid", nodeid)
        off = self._ent + slot * _INODE.size
        view = self._view
        self._lock()
        try:
            state, nlookup, pins, fd = _INODE_HOT.unpack_from(view, off)
            # state == gen << 32 | LIVE  <=>  nodeid - slot == gen << 32 (nodeid >= 0, < 2**64)
            ok = state == nodeid - slot + _LIVE and (nlookup != 0 or slot == 1)
            if ok:
                _U32.pack_into(view, off + _I_PINS, pins + 1)
        finally:
            _vfs_unlock(self._lockp)
        if not ok:
            raise _bad_id("nodeid", nodeid)
        return fd

    def release(self, nodeid: int) -> None:
        """Unpin `nodeid`; closes its fd if it was forgotten and this was the last pin."""
        slot = nodeid & _SLOT_MASK
        if not 0 < slot <= self._cap:
            raise _bad_id("nodeid", nodeid)
        off = self._ent + slot * _INODE.size
        view = self._view
        close_fd = -1
        self._lock()
        try:
            state, nlookup, pins, fd = _INODE_HOT.unpack_from(view, off)
            ok = state == nodeid - slot + _LIVE and pins != 0
            if ok:
                if pins == 1 and nlookup == 0 and slot != 1:
                    self._free(slot, off, state)
                    close_fd = fd
                else:
                    _U32.pack_into(view, off + _I_PINS, pins - 1)
        finally:
            _vfs_unlock(self._lockp)
        if not ok:
            raise _bad_id("nodeid", nodeid)
        if close_fd >= 0:
            _close_quietly(close_fd)

    def pinned(self, nodeid: int) -> _Pinned:
        """``with table.pinned(nodeid) as fd:`` -- acquire, then release on exit."""
        return _Pinned(self, nodeid)

    def forget(self, nodeid: int, nlookup: int) -> None:
        """FORGET: drop up to `nlookup` lookups; the root is never freed, unknown ids ignored."""
        slot = nodeid & _SLOT_MASK
        if not 0 < slot <= self._cap:
            return
        off = self._ent + slot * _INODE.size
        view = self._view
        close_fd = -1
        self._lock()
        try:
            state, count, pins, fd = _INODE_HOT.unpack_from(view, off)
            if state == nodeid - slot + _LIVE:
                count -= min(nlookup, count)
                if count == 0 and pins == 0 and slot != 1:
                    self._free(slot, off, state)
                    close_fd = fd
                else:
                    _U64.pack_into(view, off + _I_NLOOKUP, count)
        finally:
            _vfs_unlock(self._lockp)
        if close_fd >= 0:
            _close_quietly(close_fd)

    def forget_all(self) -> None:
        """End of a FUSE session (DESTROY, or a new INIT): every inode but the root is
        forgotten; fds of entries pinned by a request in flight close at their last release."""
        view = self._view
        ent = self._ent
        isize = _INODE.size
        to_close: list[int] = []
        self._lock()
        try:
            hwm = min(_TABLE_STATE.unpack_from(view, self._hdr + 4)[1], self._cap + 1)
            for slot in range(2, hwm):
                off = ent + slot * isize
                state, _, pins, fd = _INODE_HOT.unpack_from(view, off)
                if state & _GEN_MASK != _LIVE:
                    continue
                if pins == 0:
                    self._free(slot, off, state)
                    to_close.append(fd)
                else:
                    _U64.pack_into(view, off + _I_NLOOKUP, 0)
        finally:
            _vfs_unlock(self._lockp)
        for fd in to_close:
            _close_quietly(fd)

    def live_count(self) -> int:
        """Entries whose fd is still open, the root included."""
        self._lock()
        try:
            return _TABLE_STATE.unpack_from(self._view, self._hdr + 4)[2]
        finally:
            _vfs_unlock(self._lockp)

    def info(self, nodeid: int) -> tuple[int, int, int]:
        """(nlookup, pins, fd) of a live entry, forgotten-but-pinned included; else EBADF."""
        slot = nodeid & _SLOT_MASK
        if not 0 < slot <= self._cap:
            raise _bad_id("nodeid", nodeid)
        off = self._ent + slot * _INODE.size
        self._lock()
        try:
            state, nlookup, pins, fd = _INODE_HOT.unpack_from(self._view, off)
        finally:
            _vfs_unlock(self._lockp)
        if state != nodeid - slot + _LIVE:
            raise _bad_id("nodeid", nodeid)
        return nlookup, pins, fd

    @property
    def repairs(self) -> int:
        """How often the lock was taken over from a dead process and the table rebuilt."""
        return _U32.unpack_from(self._view, self._hdr + _REPAIRS_OFF)[0]

    # -- internals, all called with the lock held --------------------------------------------

    def _lock(self) -> None:
        if _vfs_lock(self._lockp, _pid):
            try:
                self._repair()
            except BaseException:
                _vfs_unlock(self._lockp)
                raise

    def _store_header(self, header: tuple[int, int, int, int]) -> None:
        _TABLE_STATE.pack_into(self._view, self._hdr + 4, *header)

    def _free(self, slot: int, off: int, state: int) -> None:
        view = self._view
        _, dev, ino, mnt_id = _INODE_KEY.unpack_from(view, off)
        self._words[off >> 3] = (((state >> 32) + 1) & _GEN_MASK) << 32  # commit: FREE, next gen
        self._index_remove(slot, hash((dev, ino, mnt_id)) & self._mask)
        free_head, hwm, live, used = _TABLE_STATE.unpack_from(view, self._hdr + 4)
        _U32.pack_into(view, off + _I_NEXT, free_head)
        _TABLE_STATE.pack_into(view, self._hdr + 4, slot, hwm, live - 1, used)

    def _index_put(self, slot: int, h: int) -> None:
        """Store `slot` (known absent) in the first empty or tombstone bucket from `h`."""
        idx = self._idx
        mask = self._mask
        hdr = self._hdr
        b = h
        while idx[b] not in (_EMPTY, _TOMB):
            b = (b + 1) & mask
        if idx[b] == _EMPTY:
            used = _U32.unpack_from(self._view, hdr + _USED_OFF)[0]
            if (used + 1) * 4 > (mask + 1) * 3:
                # Too few empty buckets left for short probes: drop the tombstones.  The entry
                # is committed already, so the rebuild indexes it too.
                self._rebuild_index()
                return
            _U32.pack_into(self._view, hdr + _USED_OFF, used + 1)
        idx[b] = slot

    def _index_remove(self, slot: int, h: int) -> None:
        idx = self._idx
        mask = self._mask
        b = h
        for _ in range(mask + 1):
            s = idx[b]
            if s == slot:
                break
            if s == _EMPTY:
                return  # not indexed (a crash before the index store, repaired since)
            b = (b + 1) & mask
        else:
            return
        if idx[(b + 1) & mask] != _EMPTY:
            idx[b] = _TOMB  # a probe chain may run through this bucket
            return
        # Nothing probes past an empty bucket: turn this and the tombstones before it empty.
        freed = 0
        while idx[b] in (slot, _TOMB) and freed <= mask:
            idx[b] = _EMPTY
            freed += 1
            b = (b - 1) & mask
        used = _U32.unpack_from(self._view, self._hdr + _USED_OFF)[0]
        _U32.pack_into(self._view, self._hdr + _USED_OFF, used - freed)

    def _rebuild_index(self) -> None:
        view = self._view
        idx = self._idx
        mask = self._mask
        ent = self._ent
        isize = _INODE.size
        hwm = _TABLE_STATE.unpack_from(view, self._hdr + 4)[1]
        view[self._idx_off:self._idx_off + 4 * len(idx)] = bytes(4 * len(idx))
        used = 0
        for slot in range(2, min(hwm, self._cap + 1)):
            st, dev, ino, mnt_id = _INODE_KEY.unpack_from(view, ent + slot * isize)
            if st & _GEN_MASK == _LIVE:
                b = hash((dev, ino, mnt_id)) & mask
                while idx[b] != _EMPTY:
                    b = (b + 1) & mask
                idx[b] = slot
                used += 1
        _U32.pack_into(view, self._hdr + _USED_OFF, used)

    def _repair(self) -> None:
        """Rebuild free list, live count and index from the entries' state words."""
        view = self._view
        ent = self._ent
        isize = _INODE.size
        hdr = self._hdr
        hwm = min(max(_TABLE_STATE.unpack_from(view, hdr + 4)[1], 2), self._cap + 1)
        live = 1 if _U64.unpack_from(view, ent + isize)[0] & _GEN_MASK == _LIVE else 0
        free_head = 0
        for slot in range(hwm - 1, 1, -1):
            off = ent + slot * isize
            if _U64.unpack_from(view, off)[0] & _GEN_MASK == _LIVE:
                live += 1
            else:
                _U32.pack_into(view, off + _I_NEXT, free_head)
                free_head = slot
        _TABLE_STATE.pack_into(view, hdr + 4, free_head, hwm, live, 0)
        self._rebuild_index()
        repairs = _U32.unpack_from(view, hdr + _REPAIRS_OFF)[0]
        _U32.pack_into(view, hdr + _REPAIRS_OFF, (repairs + 1) & 0xFFFFFFFF)


class HandleTable:
    """Open files (FUSE fh), each owning an fd opened for I/O."""

    def __init__(self, view: memoryview, words, lockp, capacity: int, entries_off: int) -> None:
        self._view = view
        self._words = words
        self._lockp = lockp
        self._cap = capacity
        self._ent = entries_off
        self._hdr = _HANDLE_HDR_OFF

    def insert(self, fd: int, nodeid: int, flags: int) -> int:
        """Register an open file; the table owns `fd` unless this raises ENFILE."""
        view = self._view
        fh = 0
        self._lock()
        try:
            if _over_budget(view):
                raise _too_many()
            slot, header = _alloc(view, self._hdr, self._ent + _H_NEXT, _HANDLE.size, self._cap)
            if slot:
                off = self._ent + slot * _HANDLE.size
                gen_word = _U64.unpack_from(view, off)[0] & ~_GEN_MASK
                # Still FREE while written: a bad argument raises before anything changed.
                _HANDLE.pack_into(view, off, gen_word, nodeid, 0, fd, flags, 0)
                _TABLE_STATE.pack_into(view, self._hdr + 4, *header)
                self._words[off >> 3] = gen_word | _LIVE  # commit
                fh = gen_word | slot
        finally:
            _vfs_unlock(self._lockp)
        if not fh:
            raise _full("handle", self._cap)
        return fh

    def acquire(self, fh: int) -> tuple[int, int, int]:
        """Pin `fh`; returns (fd, nodeid, flags).  EBADF if unknown, stale or released."""
        slot = fh & _SLOT_MASK
        if not 0 < slot <= self._cap:
            raise _bad_id("fh", fh)
        off = self._ent + slot * _HANDLE.size
        view = self._view
        self._lock()
        try:
            state, nodeid, pins, fd, flags = _HANDLE_HOT.unpack_from(view, off)
            ok = state == fh - slot + _LIVE
            if ok:
                _U32.pack_into(view, off + _H_PINS, pins + 1)
        finally:
            _vfs_unlock(self._lockp)
        if not ok:
            raise _bad_id("fh", fh)
        return fd, nodeid, flags

    def release(self, fh: int) -> None:
        """Unpin `fh`; closes the fd if it was removed and this was the last pin."""
        slot = fh & _SLOT_MASK
        if not 0 < slot <= self._cap:
            raise _bad_id("fh", fh)
        off = self._ent + slot * _HANDLE.size
        view = self._view
        close_fd = -1
        self._lock()
        try:
            state, _, pins, fd, _ = _HANDLE_HOT.unpack_from(view, off)
            gen_word = fh - slot
            ok = pins != 0 and (state == gen_word + _LIVE or state == gen_word + _CLOSING)
            if ok:
                if pins == 1 and state & _GEN_MASK == _CLOSING:
                    self._free(slot, off, state)
                    close_fd = fd
                else:
                    _U32.pack_into(view, off + _H_PINS, pins - 1)
        finally:
            _vfs_unlock(self._lockp)
        if not ok:
            raise _bad_id("fh", fh)
        if close_fd >= 0:
            _close_quietly(close_fd)

    def pinned(self, fh: int) -> _Pinned:
        """``with table.pinned(fh) as (fd, nodeid, flags):`` -- acquire, release on exit."""
        return _Pinned(self, fh)

    def remove(self, fh: int) -> None:
        """RELEASE: `fh` is unusable at once; its fd is closed when the last pin goes."""
        slot = fh & _SLOT_MASK
        if not 0 < slot <= self._cap:
            raise _bad_id("fh", fh)
        off = self._ent + slot * _HANDLE.size
        view = self._view
        close_fd = -1
        self._lock()
        try:
            state, _, pins, fd, _ = _HANDLE_HOT.unpack_from(view, off)
            ok = state == fh - slot + _LIVE
            if ok:
                if pins == 0:
                    self._free(slot, off, state)
                    close_fd = fd
                else:
                    self._words[off >> 3] = fh - slot + _CLOSING
        finally:
            _vfs_unlock(self._lockp)
        if not ok:
            raise _bad_id("fh", fh)
        if close_fd >= 0:
            _close_quietly(close_fd)

    def remove_all(self) -> None:
        """End of a FUSE session: every handle is released as if by RELEASE."""
        view = self._view
        ent = self._ent
        hsize = _HANDLE.size
        to_close: list[int] = []
        self._lock()
        try:
            hwm = min(_TABLE_STATE.unpack_from(view, self._hdr + 4)[1], self._cap + 1)
            for slot in range(1, hwm):
                off = ent + slot * hsize
                state, _, pins, fd, _ = _HANDLE_HOT.unpack_from(view, off)
                if state & _GEN_MASK != _LIVE:
                    continue
                if pins == 0:
                    self._free(slot, off, state)
                    to_close.append(fd)
                else:
                    self._words[off >> 3] = state - _LIVE + _CLOSING
        finally:
            _vfs_unlock(self._lockp)
        for fd in to_close:
            _close_quietly(fd)

    def live_count(self) -> int:
        """Handles whose fd is still open, removed-but-pinned ones included."""
        self._lock()
        try:
            return _TABLE_STATE.unpack_from(self._view, self._hdr + 4)[2]
        finally:
            _vfs_unlock(self._lockp)

    @property
    def repairs(self) -> int:
        """How often the lock was taken over from a dead process and the table rebuilt."""
        return _U32.unpack_from(self._view, self._hdr + _REPAIRS_OFF)[0]

    # -- internals, all called with the lock held --------------------------------------------

    def _lock(self) -> None:
        if _vfs_lock(self._lockp, _pid):
            try:
                self._repair()
            except BaseException:
                _vfs_unlock(self._lockp)
                raise

    def _free(self, slot: int, off: int, state: int) -> None:
        view = self._view
        self._words[off >> 3] = (((state >> 32) + 1) & _GEN_MASK) << 32  # commit: FREE, next gen
        free_head, hwm, live, unused = _TABLE_STATE.unpack_from(view, self._hdr + 4)
        _U32.pack_into(view, off + _H_NEXT, free_head)
        _TABLE_STATE.pack_into(view, self._hdr + 4, slot, hwm, live - 1, unused)

    def _repair(self) -> None:
        """Rebuild free list and live count from the entries' state words."""
        view = self._view
        ent = self._ent
        hsize = _HANDLE.size
        hdr = self._hdr
        hwm = min(max(_TABLE_STATE.unpack_from(view, hdr + 4)[1], 1), self._cap + 1)
        live = 0
        free_head = 0
        for slot in range(hwm - 1, 0, -1):
            off = ent + slot * hsize
            if _U64.unpack_from(view, off)[0] & _GEN_MASK == _FREE:
                _U32.pack_into(view, off + _H_NEXT, free_head)
                free_head = slot
            else:
                live += 1
        _TABLE_STATE.pack_into(view, hdr + 4, free_head, hwm, live, 0)
        repairs = _U32.unpack_from(view, hdr + _REPAIRS_OFF)[0]
        _U32.pack_into(view, hdr + _REPAIRS_OFF, (repairs + 1) & 0xFFFFFFFF)


class QueueCounters:
    """Per-queue u64 request counters, updated lock-free with an atomic add."""

    def __init__(self, ptr, count: int) -> None:
        self._p = ptr  # uint64_t *
        self._n = count

    def add(self, queue: int, n: int = 1) -> None:
        if not 0 <= queue < self._n:
            raise IndexError(f"queue {queue} out of range 0..{self._n - 1}")
        _fetch_add64(self._p + queue, n)

    def get(self, queue: int) -> int:
        if not 0 <= queue < self._n:
            raise IndexError(f"queue {queue} out of range 0..{self._n - 1}")
        return self._p[queue]

    def snapshot(self) -> list[int]:
        p = self._p
        return [p[i] for i in range(self._n)]


class Arena:
    """The shared mapping and the three views onto it; create() before forking the workers."""

    inodes: InodeTable
    handles: HandleTable
    counters: QueueCounters

    def __init__(self, mm: mmap.mmap, max_inodes: int, buckets: int, max_handles: int,
                 max_queues: int, inodes_off: int, index_off: int, handles_off: int) -> None:
        self._mm = mm
        self._view = memoryview(mm)
        self._index = self._view[index_off:index_off + buckets * 4].cast("I")
        self._base = native.address_of(mm)
        words = native.u64_ptr(self._base, 0)
        self.inodes = InodeTable(self._view, words, native.u32_ptr(self._base, _INODE_HDR_OFF),
                                 max_inodes, inodes_off, index_off, self._index)
        self.handles = HandleTable(self._view, words,
                                   native.u32_ptr(self._base, _HANDLE_HDR_OFF),
                                   max_handles, handles_off)
        self.counters = QueueCounters(native.u64_ptr(self._base, _COUNTERS_OFF), max_queues)

    @classmethod
    def create(cls, max_inodes: int = 1 << 18, max_handles: int = 1 << 16,
               max_queues: int = 64) -> Arena:
        """Map a zeroed shared arena.  max_inodes counts the root; ids fit 32-bit slots."""
        for name, value, low in (("max_inodes", max_inodes, 1), ("max_handles", max_handles, 1),
                                 ("max_queues", max_queues, 1)):
            if not low <= value <= _MAX_SLOTS:
                raise ValueError(f"{name} must be in {low}..{_MAX_SLOTS}, not {value}")
        buckets = 1 << (2 * max_inodes - 1).bit_length()  # power of two >= 2 * max_inodes
        inodes_off = _align(_COUNTERS_OFF + 8 * max_queues)
        index_off = _align(inodes_off + _INODE.size * (max_inodes + 1))
        handles_off = _align(index_off + 4 * buckets)
        size = handles_off + _HANDLE.size * (max_handles + 1)
        mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        _HEADER.pack_into(mm, 0, _MAGIC, _VERSION, max_inodes, buckets, max_handles, max_queues)
        # Slot 1 is reserved for the root, so the inode high-water mark starts at 2.
        _TABLE_HDR.pack_into(mm, _INODE_HDR_OFF, 0, 0, 2, 0, 0, 0)
        _TABLE_HDR.pack_into(mm, _HANDLE_HDR_OFF, 0, 0, 1, 0, 0, 0)
        return cls(mm, max_inodes, buckets, max_handles, max_queues,
                   inodes_off, index_off, handles_off)

    def limit_fds(self, budget: int) -> None:
        """Refuse (ENFILE) a new inode or handle once live inodes + handles reach `budget`;
        0 lifts the limit."""
        if not 0 <= budget <= 0xFFFFFFFF:
            raise ValueError(f"fd budget {budget} out of range")
        _U32.pack_into(self._view, _BUDGET_OFF, budget)

    @property
    def fd_budget(self) -> int:
        return _U32.unpack_from(self._view, _BUDGET_OFF)[0]

    def close(self) -> None:
        """Unmap in this process.  The fds in the tables belong to the shared fd table and
        stay open."""
        if self._mm.closed:
            return
        self._index.release()
        self._view.release()
        native.ffi.release(self._base)
        self._mm.close()
