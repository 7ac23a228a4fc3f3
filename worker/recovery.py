"""Exactly-once completion of the requests a dead worker left in its journal.

The journal (common/journal.py) says, for every head the dead worker took from its ring, how
far it got.  The successor finishes each, in pop order:

* REPLIED: the reply is already in guest memory (which outlives the worker), so only the used
  entry is pushed.  Nothing is executed again.
* POPPED: the request had not started anything that matters to repeat.  It is served again from
  its descriptor chain, which the guest may not touch until it is used.  Changes it made to the
  shared tables are undone first: lookups it counted are forgotten, handles it opened removed.
  This covers every idempotent operation (GETATTR, READ, WRITE at an offset, SETATTR,
  FSYNC, ...) and the table-only ones (LOOKUP, OPEN, READDIRPLUS, ...).  FORGETs it applied are
  not repeated: the journal counts them, and for the one being applied it holds the lookup count
  seen before, which tells whether it went through.  A replayed RELEASE whose handle is already
  gone was completed by the first run and is answered with success.
* EXECUTING: a non-idempotent filesystem call may or may not have happened.  Before making it
  the worker journaled what the names involved referred to (the pre-state); the replay compares
  with what they refer to now and answers from that instead of calling again:

    MKDIR, MKNOD, SYMLINK   name absent before, present now -> done: reply its entry
    CREATE                  name absent before, present now -> done: open it (no O_CREAT,
                            O_EXCL, O_TRUNC), reply entry + handle
    LINK                    new name absent before, now the target inode -> done
    UNLINK, RMDIR           name was inode X, now absent or another inode -> done: success
    RENAME, RENAME2         new name now holds the old inode and the old name does not (for
                            RENAME_EXCHANGE: the two swapped) -> done: success
    SETXATTR (XATTR_CREATE) absent before, now has the value -> done
    REMOVEXATTR             present before, absent now -> done
    WRITE to an O_APPEND    file size grew by exactly the write's length -> done
    file, FALLOCATE with    file size changed -> done
    COLLAPSE/INSERT_RANGE
  Anything else ("not done") runs the call for the first time.

What is guaranteed, and what is not:
* The guest gets exactly one reply for every request, and never a reply computed twice where
  the first computation changed the filesystem: no EEXIST for its own MKDIR, no ENOENT for its
  own UNLINK, no doubled append.
* The derivations assume no other writer (another guest, the host) changed the same names
  between the crash and the replay; one that did can make a "done" look "not done" or back.
* A pre-state that could not be taken (permission, a name the kernel would refuse) replays by
  running the call again, which answers what the first run would have answered for everything
  but a completed non-idempotent call.
* Lookup counts, handles and pins are journaled right after the table changes them, and the
  record is dropped right before they are returned.  A kill inside one of those windows of a
  few microseconds (only an outside SIGKILL can land there) leaks the change: a lookup count or
  a handle that is never returned, a pin -- the entry's fd then stays open until the FUSE
  session ends.  Nothing counted once is ever released twice.  The soak test
  (tests/soak.py) measures how often that happens under load: a few fds per hundred kills.
* The FORGET being applied is judged from the inode's lookup count; another queue looking the
  same inode up within those microseconds can make it look not applied (it is then applied
  again) or applied.
* Effects beyond MAX_EFFECTS for one request (a READDIRPLUS of thousands of entries) are not
  recorded and leak the same way if that request is interrupted.

Locks (worker/locks.py).  GETLK, SETLK and SETLKW replay as they are: an owner taking again
a lock it holds, or releasing a range it does not hold, changes nothing, and its locks live
on open file descriptions in the fd table the workers share, never in a worker.  So:
* a worker killed holding locks loses none, its owners' nor anyone else's: the guest keeps
  what it was told it holds, and releases it with an unlock or a FLUSH through any queue;
* a worker killed while a SETLKW waits (in one of its helper threads) owes the guest one
  answer to that request: the kernel drops the dead thread's wait, the request is still
  POPPED in the journal, and the successor serves it again -- it waits again, in a thread of
  its own, and answers when the lock is granted or the guest interrupts it.  If the lock had
  been granted and the worker died before the reply, the replay finds it held by the same
  owner and answers success at once;
* a ring stopped while requests wait (GET_VRING_BASE) ends their waits unanswered: they stay
  in the journal, and the ring resumed at the index it reported serves them again, as above.
  A ring restarted elsewhere abandons them like any other journaled request;
* kills inside the few instructions between making an owner's OFD and recording it on the
  board leak that fd until the session ends (no lock is on it yet); a pin a waiting request
  held is leaked the same way, which only keeps an unlocked fd open.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.arena import Arena, HandleTable, InodeTable, Pinned
from pyvirtiofsd.common.journal import Effect, Inflight, PinKind, PreState, QueueJournal, SlotState
from pyvirtiofsd.worker.filesystem import (
    Context,
    DirEntry,
    Entry,
    Filesystem,
    FsOptions,
    LockWait,
)
from pyvirtiofsd.worker.passthrough import PassthroughFs
from pyvirtiofsd.worker.testhooks import Hooks

log = logging.getLogger("pyvirtiofsd.recovery")

# Pre-state kinds and flags (journal slot fields).
PRE_NAMES = 1       # values: (dev, ino) of name a, (dev, ino) of name b
PRE_SIZE = 2        # values: (file size,)
PRE_XATTR = 3       # flags: F_A = the attribute existed
F_A = 1             # name a existed (its dev/ino are values 0, 1)
F_B = 2             # name b existed (values 2, 3)
F_UNKNOWN = 4       # the pre-state could not be taken

XATTR_CREATE = 1
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_INSERT_RANGE = 0x20
_NO_CREATE = ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)

T = TypeVar("T")


class JournaledInodes:
    """The shared inode table, with this worker's pins and lookup counts journaled (in the
    order common/state.c's vfs_*_j functions keep, which the native engine calls too)."""

    ROOT = InodeTable.ROOT

    def __init__(self, table: InodeTable, journal: QueueJournal) -> None:
        self._t = table
        self._j = journal
        self.skip_forgets = 0      # set for a replay: FORGETs its first run applied
        self.pending: tuple[int, int] | None = None    # and the one it may have applied

    def lookup_or_insert(self, fd: int, dev: int, ino: int, mnt_id: int = 0) -> tuple[int, bool]:
        return self._t.lookup_or_insert_journaled(self._j, fd, dev, ino, mnt_id)

    def acquire(self, nodeid: int) -> int:
        return self._t.acquire_journaled(self._j, nodeid)

    def release(self, nodeid: int) -> None:
        self._t.release_journaled(self._j, nodeid)

    def pinned(self, nodeid: int) -> Pinned[int]:
        return Pinned(self, nodeid)

    def forget(self, nodeid: int, nlookup: int) -> None:
        if self.skip_forgets:
            self.skip_forgets -= 1          # applied before the crash; counted already
            return
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == nodeid and self._applied(nodeid, nlookup,
                                                                          pending[1]):
            self._j.note_forget()           # it went through before the crash
            return
        self._t.forget_journaled(self._j, nodeid, nlookup)

    def _applied(self, nodeid: int, nlookup: int, before: int) -> bool:
        """Whether a FORGET of `nlookup` that saw `before` lookups has been applied."""
        try:
            now = self._t.info(nodeid)[0]
        except OSError:
            return True                     # the entry is gone: the FORGET dropped it
        return now != before and now == max(0, before - nlookup)

    # Whole-table calls hold no pin and count no lookup of one request: nothing to journal.
    def forget_all(self) -> None:
        self._t.forget_all()

    def info(self, nodeid: int) -> tuple[int, int, int]:
        return self._t.info(nodeid)

    def live_count(self) -> int:
        return self._t.live_count()


class JournaledHandles:
    """The shared handle table, with this worker's pins and the handles it opened journaled."""

    def __init__(self, table: HandleTable, journal: QueueJournal) -> None:
        self._t = table
        self._j = journal

    def insert(self, fd: int, nodeid: int, flags: int) -> int:
        return self._t.insert_journaled(self._j, fd, nodeid, flags)

    def acquire(self, fh: int) -> tuple[int, int, int]:
        return self._t.acquire_journaled(self._j, fh)

    def release(self, fh: int) -> None:
        self._t.release_journaled(self._j, fh)

    def pinned(self, fh: int) -> Pinned[tuple[int, int, int]]:
        return Pinned(self, fh)

    # RELEASE's removal is undone by no replay (a replayed RELEASE of a removed handle is
    # answered with success, JournaledFs.release), so it is not journaled.
    def remove(self, fh: int) -> None:
        self._t.remove(fh)

    def remove_all(self) -> None:
        self._t.remove_all()

    def live_count(self) -> int:
        return self._t.live_count()


class JournaledArena:
    """What a filesystem sees of the arena in a queue worker: the same tables, journaled."""

    def __init__(self, arena: Arena, journal: QueueJournal) -> None:
        self.arena = arena
        self.journal = journal
        self.inodes = JournaledInodes(arena.inodes, journal)
        self.handles = JournaledHandles(arena.handles, journal)
        self.counters = arena.counters

    def reclaim(self) -> None:
        """Release the pins and close the fds a dead predecessor on this queue left behind."""
        j = self.journal
        for kind, ident in j.pins():
            j.unpin(PinKind(kind), ident)
            table = self.arena.inodes if kind == PinKind.INODE else self.arena.handles
            try:
                table.release(ident)
            except OSError:
                pass
        for fd in j.owned_fds():
            j.disown_fd(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    def undo_effects(self, counter: int) -> tuple[int, tuple[int, int] | None]:
        """Undo the table changes journaled for the request popped as `counter`; returns what
        its replay must know of its FORGETs (see JournaledInodes.forget)."""
        j = self.journal
        if not j.owns_effects(counter):
            return 0, None
        forgets, pending, overflow = j.hints()
        if overflow:
            log.warning("queue request %d changed more table entries than the journal holds;"
                        " some lookups or handles stay counted", counter)
        while (effect := j.pop_effect()) is not None:
            kind, ident = effect
            try:
                if kind == Effect.LOOKUP:
                    self.arena.inodes.forget(ident, 1)
                elif kind == Effect.HANDLE:
                    self.arena.handles.remove(ident)
            except OSError:
                pass
        return forgets, pending


class JournaledFs(Filesystem):
    """A Filesystem whose non-idempotent calls journal their pre-state, and which answers a
    replayed EXECUTING request from the filesystem's current state (see the module doc).

    Every operation is listed: the idempotent ones pass straight to the inner filesystem, the
    others are overridden below.  With test hooks, each call fires the "executing" and
    "executed" kill points around the inner call."""

    def __init__(self, inner: PassthroughFs, tables: JournaledArena,
                 hooks: Hooks | None = None) -> None:
        self.inner = inner
        self._tables = tables
        self._inodes = tables.inodes
        self._handles = tables.handles
        self._j = tables.journal
        self._hooks = hooks
        self.replay: Inflight | None = None

    # -- what the worker and the native engine ask of the filesystem ------------------------
    @property
    def options(self) -> FsOptions:
        return self.inner.options

    def native_options(self) -> dict[str, int | bool] | None:
        return self.inner.native_options()

    def share_credentials(self, shared: object) -> None:
        self.inner.share_credentials(shared)

    def restore_credentials(self) -> None:
        self.inner.restore_credentials()

    # -- idempotent operations: served as they are ------------------------------------------
    def init(self, capable: int) -> int:
        return self._call(self.inner.init, capable)

    def destroy(self) -> None:
        return self._call(self.inner.destroy)

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        return self._call(self.inner.lookup, ctx, parent, name)

    def forget(self, nodeid: int, nlookup: int) -> None:
        return self._call(self.inner.forget, nodeid, nlookup)

    def batch_forget(self, items: Iterable[tuple[int, int]]) -> None:
        return self._call(self.inner.batch_forget, items)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        return self._call(self.inner.getattr, ctx, nodeid, fh)

    def setattr(self, ctx: Context, nodeid: int, attr: fa.SetattrIn,
                fh: int | None) -> tuple[os.stat_result, float]:
        return self._call(self.inner.setattr, ctx, nodeid, attr, fh)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        return self._call(self.inner.readlink, ctx, nodeid)

    def open(self, ctx: Context, nodeid: int, flags: int, kill_priv: bool) -> tuple[int, int]:
        return self._call(self.inner.open, ctx, nodeid, flags, kill_priv)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int,
             bufs: Sequence[memoryview]) -> int:
        return self._call(self.inner.read, ctx, nodeid, fh, offset, bufs)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        return self._call(self.inner.flush, ctx, nodeid, fh, lock_owner)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        return self._call(self.inner.fsync, ctx, nodeid, fh, datasync)

    def setupmapping(self, ctx: Context, nodeid: int, fh: int, foffset: int, length: int,
                     flags: int, moffset: int, mapper: Callable[..., None]) -> None:
        # Idempotent: mapping the same range again replaces it with the same pages.
        return self._call(self.inner.setupmapping, ctx, nodeid, fh, foffset, length, flags,
                          moffset, mapper)

    def window_io(self, ctx: Context, nodeid: int, fh: int, offset: int, bufs: Sequence,
                  write: bool, write_flags: int, mover: Callable[..., int]) -> int:
        # Idempotent as a READ, or a WRITE at an offset: FS_IO has no append.
        return self._call(self.inner.window_io, ctx, nodeid, fh, offset, bufs, write,
                          write_flags, mover)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        return self._call(self.inner.lseek, ctx, nodeid, fh, offset, whence)

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        return self._call(self.inner.copy_file_range, ctx, nodeid_in, fh_in, off_in,
                          nodeid_out, fh_out, off_out, length, flags)

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        return self._call(self.inner.opendir, ctx, nodeid, flags)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int,
                size: int) -> Iterable[DirEntry]:
        return self._call(self.inner.readdir, ctx, nodeid, fh, offset, size)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        return self._call(self.inner.fsyncdir, ctx, nodeid, fh, datasync)

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        return self._call(self.inner.statfs, ctx, nodeid)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        return self._call(self.inner.syncfs, ctx, nodeid)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        return self._call(self.inner.access, ctx, nodeid, mask)

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        return self._call(self.inner.getxattr, ctx, nodeid, name, size)

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        return self._call(self.inner.listxattr, ctx, nodeid, size)

    # Locks are idempotent per owner: taking again a lock the owner holds, or releasing one
    # it does not, changes nothing (see "Locks" in the module doc).
    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, start: int, end: int,
              typ: int, pid: int, lk_flags: int) -> tuple[int, int, int, int]:
        return self._call(self.inner.getlk, ctx, nodeid, fh, owner, start, end, typ, pid,
                          lk_flags)

    def setlk(self, ctx: Context, nodeid: int, fh: int, owner: int, start: int, end: int,
              typ: int, pid: int, lk_flags: int, sleep: bool) -> LockWait | None:
        return self._call(self.inner.setlk, ctx, nodeid, fh, owner, start, end, typ, pid,
                          lk_flags, sleep)

    def interrupt(self, unique: int) -> None:
        return self._call(self.inner.interrupt, unique)

    # -- replay bookkeeping ------------------------------------------------------------------
    def begin_replay(self, rec: Inflight) -> None:
        """Undo what `rec`'s first run changed in the tables; the next call replays it."""
        forgets, pending = self._tables.undo_effects(rec.counter)
        self._j.resume(rec)
        self._j.begin_effects(rec.counter, forgets)
        self._inodes.skip_forgets = forgets
        self._inodes.pending = pending
        self.replay = rec

    def abandon(self, rec: Inflight) -> None:
        """`rec` will never be completed (its ring was replaced): undo its table changes."""
        self._tables.undo_effects(rec.counter)
        self._j.drop_effects()

    def end_replay(self) -> None:
        self.replay = None
        self._inodes.skip_forgets = 0
        self._inodes.pending = None

    def _replayed(self, kind: int) -> PreState | None:
        """The pre-state of an EXECUTING request being replayed, if it is of `kind`."""
        rec = self.replay
        if rec is None or rec.state != SlotState.EXECUTING or rec.pre.kind != kind:
            return None
        if rec.pre.flags & F_UNKNOWN:
            return None
        return rec.pre

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Make the call, between the test hooks' kill points when there are any."""
        hooks = self._hooks
        if hooks is None:
            return fn(*args)
        hooks.at("executing")
        result = fn(*args)
        hooks.at("executed")
        return result

    def _run(self, pre: PreState, fn: Callable[..., T], *args: Any) -> T:
        """Journal `pre`, then make the call."""
        self._j.executing(pre)
        return self._call(fn, *args)

    # -- taking pre-states -------------------------------------------------------------------
    def _names(self, a: tuple[int, bytes], b: tuple[int, bytes] | None = None) -> PreState:
        flags = 0
        vals = [0, 0, 0, 0]
        try:
            ia = self.inner.identify(*a)
            ib = self.inner.identify(*b) if b is not None else None
        except OSError:
            return PreState(PRE_NAMES, F_UNKNOWN)
        if ia is not None:
            flags |= F_A
            vals[0:2] = ia
        if ib is not None:
            flags |= F_B
            vals[2:4] = ib
        return PreState(PRE_NAMES, flags, tuple(vals))

    @staticmethod
    def _a(pre: PreState) -> tuple[int, int] | None:
        return pre.values[0:2] if pre.flags & F_A else None

    @staticmethod
    def _b(pre: PreState) -> tuple[int, int] | None:
        return pre.values[2:4] if pre.flags & F_B else None

    def _now(self, parent: int, name: bytes) -> tuple[int, int] | bool | None:
        """What `name` in `parent` refers to now (PassthroughFs.identify), False when that
        cannot be told."""
        try:
            return self.inner.identify(parent, name)
        except OSError:
            return False

    def _inode_ident(self, nodeid: int) -> tuple[int, int] | None:
        try:
            with self._inodes.pinned(nodeid) as fd:
                st = os.fstat(fd)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _handle_size(self, fh: int) -> int | None:
        try:
            with self._handles.pinned(fh) as (fd, _nodeid, _flags):
                return os.fstat(fd).st_size
        except OSError:
            return None

    # -- creating names ----------------------------------------------------------------------
    def _created(self, parent: int, name: bytes) -> bool:
        """Replaying an EXECUTING creation of `name`: did the first run create it?"""
        pre = self._replayed(PRE_NAMES)
        if pre is None or self._a(pre) is not None:
            return False
        now = self._now(parent, name)
        return now is not None and now is not False

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int) -> Entry:
        if self._created(parent, name):
            return self.inner.lookup(ctx, parent, name)
        return self._run(self._names((parent, name)), self.inner.mkdir, ctx, parent, name, mode)

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int) -> Entry:
        if self._created(parent, name):
            return self.inner.lookup(ctx, parent, name)
        return self._run(self._names((parent, name)), self.inner.mknod, ctx, parent, name, mode,
                         rdev)

    def symlink(self, ctx: Context, target: bytes, parent: int, name: bytes) -> Entry:
        if self._created(parent, name):
            return self.inner.lookup(ctx, parent, name)
        return self._run(self._names((parent, name)), self.inner.symlink, ctx, target, parent,
                         name)

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               kill_priv: bool) -> tuple[Entry, int, int]:
        if self._created(parent, name):
            entry = self.inner.lookup(ctx, parent, name)
            try:
                fh, fopen = self.inner.open(ctx, entry.nodeid, flags & _NO_CREATE, kill_priv)
            except BaseException:
                self._inodes.forget(entry.nodeid, 1)
                raise
            return entry, fh, fopen
        return self._run(self._names((parent, name)), self.inner.create, ctx, parent, name,
                         mode, flags, kill_priv)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        pre = self._replayed(PRE_NAMES)
        if pre is not None and self._a(pre) is None:
            target = self._inode_ident(nodeid)
            if target is not None and self._now(newparent, newname) == target:
                return self.inner.lookup(ctx, newparent, newname)
        return self._run(self._names((newparent, newname)), self.inner.link, ctx, nodeid,
                         newparent, newname)

    # -- removing and moving names -----------------------------------------------------------
    def _removed(self, parent: int, name: bytes) -> bool:
        pre = self._replayed(PRE_NAMES)
        if pre is None or self._a(pre) is None:
            return False
        now = self._now(parent, name)
        return now is not False and now != self._a(pre)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        if self._removed(parent, name):
            return None
        return self._run(self._names((parent, name)), self.inner.unlink, ctx, parent, name)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        if self._removed(parent, name):
            return None
        return self._run(self._names((parent, name)), self.inner.rmdir, ctx, parent, name)

    def rename(self, ctx: Context, olddir: int, oldname: bytes, newdir: int, newname: bytes,
               flags: int) -> None:
        pre = self._replayed(PRE_NAMES)
        if pre is not None and self._a(pre) is not None and self._a(pre) != self._b(pre):
            old, new = self._now(olddir, oldname), self._now(newdir, newname)
            if old is not False and new is not False:
                if flags & fa.RENAME_EXCHANGE:
                    done = old == self._b(pre) and new == self._a(pre)
                else:
                    done = new == self._a(pre) and old != self._a(pre)
                if done:
                    return None
        return self._run(self._names((olddir, oldname), (newdir, newname)), self.inner.rename,
                         ctx, olddir, oldname, newdir, newname, flags)

    # -- size-changing writes ----------------------------------------------------------------
    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, bufs: Sequence[memoryview],
              write_flags: int, open_flags: int) -> int:
        if not open_flags & os.O_APPEND or write_flags & fa.WRITE_CACHE:
            return self._call(self.inner.write, ctx, nodeid, fh, offset, bufs, write_flags,
                              open_flags)
        total = sum(map(len, bufs))
        pre = self._replayed(PRE_SIZE)
        if pre is not None and self._handle_size(fh) == pre.values[0] + total:
            return total
        size = self._handle_size(fh)
        state = PreState(PRE_SIZE, F_UNKNOWN) if size is None else PreState(PRE_SIZE, 0,
                                                                            (size, 0, 0, 0))
        return self._run(state, self.inner.write, ctx, nodeid, fh, offset, bufs, write_flags,
                         open_flags)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int,
                  length: int) -> None:
        if not mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE):
            return self._call(self.inner.fallocate, ctx, nodeid, fh, mode, offset, length)
        pre = self._replayed(PRE_SIZE)
        if pre is not None:
            size = self._handle_size(fh)
            if size is not None and size != pre.values[0]:
                return None
        size = self._handle_size(fh)
        state = PreState(PRE_SIZE, F_UNKNOWN) if size is None else PreState(PRE_SIZE, 0,
                                                                            (size, 0, 0, 0))
        return self._run(state, self.inner.fallocate, ctx, nodeid, fh, mode, offset, length)

    # -- extended attributes -----------------------------------------------------------------
    def _xattr_present(self, ctx: Context, nodeid: int, name: bytes) -> bool | None:
        try:
            self.inner.getxattr(ctx, nodeid, name, 0)
        except OSError as e:
            return False if e.errno == errno.ENODATA else None
        return True

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int,
                 setxattr_flags: int) -> None:
        if not flags & XATTR_CREATE:
            return self._call(self.inner.setxattr, ctx, nodeid, name, value, flags,
                              setxattr_flags)
        pre = self._replayed(PRE_XATTR)
        if pre is not None and not pre.flags & F_A:
            try:
                if self.inner.getxattr(ctx, nodeid, name, max(len(value), 1)) == value:
                    return None
            except OSError:
                pass
        present = self._xattr_present(ctx, nodeid, name)
        state = PreState(PRE_XATTR, F_UNKNOWN if present is None else (F_A if present else 0))
        return self._run(state, self.inner.setxattr, ctx, nodeid, name, value, flags,
                         setxattr_flags)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        pre = self._replayed(PRE_XATTR)
        if pre is not None and pre.flags & F_A \
                and self._xattr_present(ctx, nodeid, name) is False:
            return None
        present = self._xattr_present(ctx, nodeid, name)
        state = PreState(PRE_XATTR, F_UNKNOWN if present is None else (F_A if present else 0))
        return self._run(state, self.inner.removexattr, ctx, nodeid, name)

    # -- handles -----------------------------------------------------------------------------
    def release(self, ctx: Context, nodeid: int, fh: int, flags: int, release_flags: int,
                lock_owner: int) -> None:
        return self._release(self.inner.release, ctx, nodeid, fh, flags, release_flags,
                             lock_owner)

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        return self._release(self.inner.releasedir, ctx, nodeid, fh, flags)

    def _release(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            return self._call(fn, *args)
        except OSError as e:
            # A handle is released once: gone when a replay comes means the first run did it.
            if self.replay is None or e.errno != errno.EBADF:
                raise
            return None
