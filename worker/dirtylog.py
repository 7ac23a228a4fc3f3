"""Dirty-page logging in a queue worker (vhost-user spec "Migration"; protocol.md 1.10).

While a front-end migrates the guest it copies guest memory in passes, and re-copies the pages
written since the last pass: for the pages this daemon writes (replies, the used ring) it
learns which from a bitmap it shares with the daemon, the dirty log.  The supervisor hands
every worker the log's fd (control LOG_BASE) and the logging state (LOG_STATE: VHOST_F_LOG_ALL,
and the ring's VHOST_VRING_F_LOG with the guest-physical address of its used ring).  Each
worker maps the log itself and marks, with the atomic bit-sets of common/dirtylog.h, every
page it writes; the same C function marks for the native engine and for the Python plane.

A worker applies control messages between two requests only, so when it switches to a new
log (or turns logging off) no request is writing through the old mapping any more: the old
mapping is dropped then, and unmapped when the last view of it goes (worker/mapping.py).
"""

from __future__ import annotations

from pyvirtiofsd.common import native
from pyvirtiofsd.common.native import ffi
from pyvirtiofsd.worker.guestmem import GuestMemory, GuestMemoryError
from pyvirtiofsd.worker.mapping import map_shared


class DirtyLog:
    """The log as this worker maps it, and whether (and how) writes are logged now."""

    __slots__ = ("_view", "_ptr", "size", "log_all", "ring", "used_gpa")

    def __init__(self) -> None:
        self._view: memoryview | None = None
        self._ptr: object | None = None       # uint8_t * into _view (an export of it)
        self.size = 0
        self.log_all = False
        self.ring = False
        self.used_gpa = 0

    @property
    def active(self) -> bool:
        """Writes are logged: VHOST_F_LOG_ALL is on and there is a log to mark."""
        return self.log_all and self._ptr is not None

    @property
    def address(self) -> int:
        """The log's address in this process (0: no log), for the native engine."""
        return int(ffi.cast("uintptr_t", self._ptr)) if self._ptr is not None else 0

    def replace(self, fd: int | None, size: int, offset: int) -> tuple[object, memoryview] | None:
        """Map `size` bytes at `offset` of `fd` (None: no log) as the log from now on.  Returns
        the old mapping, for drop() once nothing can write through it any more.  On error
        (GuestMemoryError) the old log stays."""
        view = ptr = None
        if fd is not None:
            try:
                # From offset 0 like the guest regions (guestmem.py): the offset need not be
                # page aligned.  The supervisor checked that the fd holds offset + size bytes.
                view = map_shared(fd, offset + size)[offset:]
                ptr = native.address_of(view)
            except (OSError, ValueError, OverflowError) as e:
                raise GuestMemoryError(f"dirty log of {size:#x} bytes at offset {offset:#x}:"
                                       f" mmap failed: {e}") from None
        old = (self._ptr, self._view) if self._view is not None else None
        self._view, self._ptr, self.size = view, ptr, size if fd is not None else 0
        return old

    @staticmethod
    def drop(old: tuple[object, memoryview] | None) -> None:
        if old is not None:
            ptr, view = old
            ffi.release(ptr)
            try:
                view.release()
            except BufferError:
                pass        # still viewed elsewhere: unmapped when that view goes

    def mark(self, gpa: int, length: int) -> None:
        """Mark the pages of guest-physical [gpa, gpa + length)."""
        native.log_mark(self._ptr, self.size, gpa, length)

    def mark_used(self, offset: int, length: int) -> None:
        """A write at `offset` into the used ring: logged at log_guest_addr + offset, and only
        with VHOST_VRING_F_LOG."""
        if self.ring:
            native.log_mark(self._ptr, self.size, (self.used_gpa + offset) & (2**64 - 1),
                            length)


class ChainMarker:
    """Marks a reply's pages for one ring over one memory table: the chain walked again in C
    (common/dirtylog.h vfs_log_chain, the walk the native engine does), from the ring's
    descriptor table and, for indirect tables, the table's regions."""

    __slots__ = ("_log", "_keep", "_desc", "_size", "_regions", "_n")

    def __init__(self, log: DirtyLog, mem: GuestMemory, desc: memoryview, ring_size: int) -> None:
        views = mem.views()
        # The exports keep the mappings alive as long as this marker may read them.
        self._keep = [native.address_of(view) for _, _, _, view in views]
        self._desc = native.address_of(desc)
        regions = ffi.new("struct vfs_log_region[]", max(1, len(views)))
        for row, (gpa, size, _uaddr, _view), host in zip(regions, views, self._keep,
                                                          strict=False):
            row.gpa, row.size, row.host = gpa, size, host
        self._log = log
        self._regions = regions
        self._n = len(views)
        self._size = ring_size

    @property
    def log(self) -> DirtyLog:
        return self._log

    def mark(self, head: int, written: int) -> None:
        """The pages of the first `written` bytes of the writable part of chain `head`."""
        log = self._log
        native.log_chain(log._ptr, log.size, self._desc, self._size, head, written,
                         self._regions, self._n)
