"""The worker's map of guest memory: regions from SET_MEM_TABLE / ADD_MEM_REG (protocol.md 1.7).

Each region is reachable two ways: by guest-physical address (descriptor buffers, spec 2.7.5)
and by front-end user address (ring parts from SET_VRING_ADDR).  Addresses come from the guest
or the front-end and are never trusted: every lookup is bounds-checked and fails with
GuestMemoryError rather than touching memory outside a mapping.
"""

from __future__ import annotations

import ctypes
import os
import stat
from bisect import bisect_right
from collections.abc import Callable

from pyvirtiofsd.worker.mapping import map_shared

_ADDR_LIMIT = 1 << 64


def _no_window() -> int:
    return 0


class GuestMemoryError(Exception):
    """An address range is not (entirely) backed by guest memory, or a region is unusable."""


class WindowBuffer:
    """A buffer that lies outside guest RAM, where the DAX window may be: only the front-end
    can reach it (FS_IO, supervisor/dax.py), so it carries the guest-physical range and no
    memory.  Sliced like a memoryview, so the chain cursors (worker/chain.py) can split it;
    any attempt to read or write it as bytes fails (TypeError), so a header or a body other
    than READ's or WRITE's data never lands in it."""

    __slots__ = ("gpa", "length")

    def __init__(self, gpa: int, length: int) -> None:
        self.gpa = gpa
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> WindowBuffer:
        if not isinstance(key, slice):
            raise TypeError("a window buffer holds no bytes here")
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise TypeError("a window buffer is sliced contiguously")
        return WindowBuffer(self.gpa + start, max(0, stop - start))

    def __repr__(self) -> str:
        return f"WindowBuffer({self.gpa:#x}, {self.length:#x})"


class _Region:
    __slots__ = ("gpa", "size", "uaddr", "mmap_offset", "map", "view")

    def __init__(
        self, gpa: int, size: int, uaddr: int, mmap_offset: int, mapping: memoryview
    ) -> None:
        self.gpa = gpa
        self.size = size
        self.uaddr = uaddr
        self.mmap_offset = mmap_offset
        self.map = mapping
        self.view = memoryview(mapping)[mmap_offset : mmap_offset + size]

    def unmap(self) -> None:
        view, self.view = self.view, None
        try:
            view.release()
            self.map.release()
        except BufferError:
            # Slices handed out for an in-flight request still reference the mapping: it is
            # unmapped when the last of them is dropped, so late accesses never fault.
            pass
        self.map = None


class GuestMemory:
    """Guest memory regions, looked up by guest-physical or by front-end user address."""

    def __init__(self) -> None:
        self._by_gpa: list[_Region] = []
        self._by_uaddr: list[_Region] = []
        # Parallel arrays for the per-descriptor lookup (gpa_views): bisect over region starts.
        self._g_start: list[int] = []
        self._g_size: list[int] = []
        self._g_view: list[memoryview] = []
        self._u_start: list[int] = []
        # The DAX window's size while the front-end has one (0: none), read only for a buffer
        # outside guest RAM (window_buffers); the worker sets it from the FUSE session's page.
        self.window: Callable[[], int] = _no_window

    @property
    def regions(self) -> list[tuple[int, int, int, int]]:
        """(gpa, size, uaddr, mmap_offset) of every region, by guest-physical address."""
        return [(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in self._by_gpa]

    def views(self) -> list[tuple[int, int, int, memoryview]]:
        """(gpa, size, uaddr, view of the mapped region) of every region."""
        return [(r.gpa, r.size, r.uaddr, r.view) for r in self._by_gpa]

    def __len__(self) -> int:
        return len(self._by_gpa)

    def add_region(self, gpa: int, size: int, uaddr: int, mmap_offset: int, fd: int) -> None:
        """Map `size` bytes of `fd` at `mmap_offset` as guest range [gpa, gpa+size).

        The fd is not closed (its owner closes it).  On any error nothing is mapped.
        """
        where = f"region gpa={gpa:#x} size={size:#x} uaddr={uaddr:#x} offset={mmap_offset:#x}"
        if size <= 0 or gpa < 0 or uaddr < 0 or mmap_offset < 0:
            raise GuestMemoryError(f"{where}: empty region or negative address")
        if (
            gpa + size > _ADDR_LIMIT
            or uaddr + size > _ADDR_LIMIT
            or mmap_offset + size > _ADDR_LIMIT
        ):
            raise GuestMemoryError(f"{where}: range wraps past 2**64")
        # VU+: active regions never overlap in guest-physical nor in user address space.
        for r in self._by_gpa:
            if gpa < r.gpa + r.size and r.gpa < gpa + size:
                raise GuestMemoryError(f"{where}: overlaps guest range of region gpa={r.gpa:#x}")
            if uaddr < r.uaddr + r.size and r.uaddr < uaddr + size:
                raise GuestMemoryError(f"{where}: overlaps user range of region gpa={r.gpa:#x}")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise GuestMemoryError(f"{where}: fd {fd}: {e.strerror}") from None
        # Touching a page past the end of a file raises SIGBUS, which would kill the worker.
        if stat.S_ISREG(st.st_mode) and st.st_size < mmap_offset + size:
            raise GuestMemoryError(
                f"{where}: fd {fd} holds only {st.st_size:#x} bytes, "
                f"{mmap_offset + size:#x} needed"
            )
        # Map from offset 0 (libvhost-user style): mmap_offset need not be page aligned.  The
        # mapping keeps no fd (worker/mapping.py): a killed worker leaks none.
        try:
            mapping = map_shared(fd, mmap_offset + size)
        except (OSError, ValueError, OverflowError, ctypes.ArgumentError) as e:
            raise GuestMemoryError(f"{where}: mmap of fd {fd} failed: {e}") from None
        self._by_gpa.append(_Region(gpa, size, uaddr, mmap_offset, mapping))
        self._reindex()

    def remove_region(self, gpa: int, size: int, uaddr: int) -> None:
        """Unmap the region REM_MEM_REG names (its mmap offset is ignored, protocol.md 1.7)."""
        for i, r in enumerate(self._by_gpa):
            if r.gpa == gpa and r.size == size and r.uaddr == uaddr:
                del self._by_gpa[i]
                self._reindex()
                r.unmap()
                return
        raise GuestMemoryError(f"no region gpa={gpa:#x} size={size:#x} uaddr={uaddr:#x}")

    def clear(self) -> None:
        regions = self._by_gpa
        self._by_gpa = []
        self._reindex()
        for r in regions:
            r.unmap()

    def _reindex(self) -> None:
        self._by_gpa.sort(key=lambda r: r.gpa)
        self._by_uaddr = sorted(self._by_gpa, key=lambda r: r.uaddr)
        self._g_start = [r.gpa for r in self._by_gpa]
        self._g_size = [r.size for r in self._by_gpa]
        self._g_view = [r.view for r in self._by_gpa]
        self._u_start = [r.uaddr for r in self._by_uaddr]

    def gpa_views(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering guest-physical [gpa, gpa+length), one per region crossed.

        A buffer is only contiguous in guest-physical space, so it may straddle adjacent
        regions (protocol.md 5.2).  Any byte outside guest memory raises GuestMemoryError.
        """
        if length <= 0:
            if length == 0:
                return []
            raise GuestMemoryError(f"negative length {length} at gpa {gpa:#x}")
        starts = self._g_start
        i = bisect_right(starts, gpa) - 1
        if i >= 0:
            off = gpa - starts[i]
            size = self._g_size[i]
            if off + length <= size:
                return [self._g_view[i][off : off + length]]
            if off < size:
                return self._split(i, off, length, gpa)
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest memory")

    def _split(self, i: int, off: int, length: int, gpa: int) -> list[memoryview]:
        starts, sizes, views = self._g_start, self._g_size, self._g_view
        total = length
        out: list[memoryview] = []
        while True:
            size = sizes[i]
            k = size - off
            if k >= length:
                out.append(views[i][off : off + length])
                return out
            out.append(views[i][off:])
            length -= k
            end = starts[i] + size
            i += 1
            if i == len(starts) or starts[i] != end:
                raise GuestMemoryError(
                    f"guest range {gpa:#x}+{total:#x} runs past guest memory at {end:#x}"
                )
            off = 0

    def window_buffers(self, gpa: int, length: int) -> list[WindowBuffer]:
        """A descriptor buffer that gpa_views() refused, as a window buffer, when it may lie
        in the DAX window; GuestMemoryError otherwise.

        The back-end cannot know where the window is: the VMM places it (cloud-hypervisor: a
        64-bit PCI BAR the guest may move; SHMEM front-ends: a shared memory region whose
        address no message carries), so every buffer entirely outside guest RAM is a
        candidate, and the front-end, which knows, checks the range again when it serves
        FS_IO (EFAULT outside its window).  Refused here: no window; an empty or negative
        length; a range that wraps past 2**64; one longer than the window; one that touches
        guest RAM (a buffer is in RAM or in the window, never both)."""
        size = self.window()
        where = f"guest range {gpa:#x}+{length:#x}"
        if not size:
            raise GuestMemoryError(f"{where} is outside guest memory")
        if length <= 0 or gpa < 0 or gpa + length > _ADDR_LIMIT or length > size:
            raise GuestMemoryError(f"{where} cannot lie in the {size:#x}-byte DAX window")
        i = bisect_right(self._g_start, gpa + length - 1) - 1
        if i >= 0 and gpa < self._g_start[i] + self._g_size[i]:
            raise GuestMemoryError(f"{where} is partly in guest memory")
        return [WindowBuffer(gpa, length)]

    def uaddr_view(self, uaddr: int, length: int) -> memoryview:
        """A contiguous view of front-end user range [uaddr, uaddr+length) (ring parts)."""
        i = bisect_right(self._u_start, uaddr) - 1
        if length >= 0 and i >= 0:
            r = self._by_uaddr[i]
            off = uaddr - r.uaddr
            if off + length <= r.size:
                return r.view[off : off + length]
        raise GuestMemoryError(
            f"user range {uaddr:#x}+{length:#x} is not inside one guest memory region"
        )
