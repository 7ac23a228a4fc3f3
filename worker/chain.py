"""Reader and Writer over a descriptor chain's buffers (cf. virtiofsd descriptor_utils.rs).

A chain's device-readable part and device-writable part are each one byte stream split over
guest buffers of any size (virtio spec 2.7.4: the device must not assume a layout).  Handlers
only ever see these two objects, never guest addresses -- except READ's and WRITE's data in
the DAX window, which arrive as WindowBuffers for the front-end to move (FS_IO).  Segments are
memoryviews onto the guest memory mapping, so `views()` lets preadv/pwritev move data with no
intermediate copy.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pyvirtiofsd.worker.guestmem import WindowBuffer


class ChainTooShort(ValueError):
    """The request or its reply does not fit the buffers the driver supplied."""


def ram_prefix(segs: Sequence[memoryview | WindowBuffer]) -> int:
    """How many bytes of `segs` come before the first one in the DAX window."""
    n = 0
    for s in segs:
        if isinstance(s, WindowBuffer):
            break
        n += len(s)
    return n


def has_window(segs: Sequence[memoryview | WindowBuffer]) -> bool:
    return any(isinstance(s, WindowBuffer) for s in segs)


class _Cursor:
    __slots__ = ("_segs", "_seg", "_off", "_left", "window")

    def __init__(self, segs: Sequence[memoryview], window: bool = False) -> None:
        # window: some segments are WindowBuffers (the chain's `window`); views() then hands
        # them out among the memoryviews, and only READ/WRITE may ask (worker/main.py).
        self.window = window
        self._segs = [s for s in segs if len(s)]
        self._seg = 0
        self._off = 0
        self._left = sum(len(s) for s in self._segs)

    @property
    def remaining(self) -> int:
        return self._left

    def _take(self, n: int) -> list[memoryview]:
        """Consume n bytes, returning the views that cover them."""
        if not 0 <= n <= self._left:
            # n may come from a guest-supplied length field: a negative one must not walk
            # the cursor backwards.
            raise ChainTooShort(f"need {n} bytes, {self._left} left in the chain")
        out: list[memoryview] = []
        segs = self._segs
        while n:
            seg = segs[self._seg]
            avail = len(seg) - self._off
            k = avail if avail < n else n
            out.append(seg[self._off : self._off + k])
            n -= k
            self._left -= k
            self._off += k
            if self._off == len(seg):
                self._seg += 1
                self._off = 0
        return out

    def skip(self, n: int) -> None:
        self._take(n)


class Reader(_Cursor):
    """Sequential reads from the device-readable part of a chain."""

    __slots__ = ()

    def read(self, n: int) -> bytes:
        segs = self._segs
        if self._seg < len(segs):
            seg = segs[self._seg]
            end = self._off + n
            if end <= len(seg) and n >= 0:   # fast path: inside one buffer
                data = bytes(seg[self._off : end])
                self._left -= n
                if end == len(seg):
                    self._seg += 1
                    self._off = 0
                else:
                    self._off = end
                return data
        return b"".join(self._take(n))

    def read_struct(self, st: struct.Struct) -> tuple:
        return st.unpack(self.read(st.size))

    def read_all(self) -> bytes:
        return self.read(self._left)

    def views(self, n: int) -> list[memoryview]:
        """The next n bytes as views (for pwritev), consumed."""
        return self._take(n)


class Writer(_Cursor):
    """Sequential writes into the device-writable part of a chain; counts bytes written."""

    __slots__ = ("_written", "_all")

    def __init__(self, segs: Sequence[memoryview], window: bool = False) -> None:
        super().__init__(segs, window)
        self._all = list(self._segs)
        self._written = 0

    @property
    def written(self) -> int:
        """Bytes from the start of the writable part up to the furthest write (used.len)."""
        return self._written

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        pos = 0
        for v in self._take(n):
            k = len(v)
            v[:] = data[pos : pos + k]
            pos += k
        self._written += n

    def views(self, n: int) -> list[memoryview]:
        """Views of up to n next bytes (for preadv); nothing is consumed or counted."""
        n = max(0, min(n, self._left))
        seg, off, out = self._seg, self._off, []
        while n:
            s = self._segs[seg]
            k = min(len(s) - off, n)
            out.append(s[off : off + k])
            n -= k
            seg, off = seg + 1, 0
        return out

    def advance(self, n: int) -> None:
        """Account for n bytes written through views()."""
        self._take(n)
        self._written += n

    def skip(self, n: int) -> None:
        """Leave n bytes as they are; they still count in `written`, which is the cursor
        position (used.len must cover every byte up to the last one written)."""
        self.advance(n)

    def write_at(self, offset: int, data: bytes) -> None:
        """Write at an absolute offset already covered by earlier writes/advances (headers)."""
        if offset < 0 or offset + len(data) > self._written:
            raise ChainTooShort("write_at beyond written bytes")
        for seg in self._all:
            if offset >= len(seg):
                offset -= len(seg)
                continue
            k = min(len(seg) - offset, len(data))
            seg[offset : offset + k] = data[:k]
            data = data[k:]
            offset = 0
            if not data:
                return
