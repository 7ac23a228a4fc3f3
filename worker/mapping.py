"""Shared mappings of guest memory that keep no file descriptor.

Python's mmap.mmap() keeps a dup() of the file descriptor it maps for as long as the mapping
lives.  In a queue worker that dup sits in the fd table every worker shares, and a worker that
is killed never closes it: each respawn would leak one fd per guest memory region.  Mapping
with mmap(2) directly keeps nothing but the mapping; the caller closes the fd it was given.

The mapping is a byte memoryview.  It is unmapped when the last view of it is gone (a request
in flight may still hold slices after the region was removed), never while one exists.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long)
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_shared(fd: int, length: int) -> memoryview:
    """Map bytes [0, length) of `fd` read-write and MAP_SHARED; OSError if mmap(2) fails."""
    if length <= 0:
        raise ValueError(f"mapping length {length}")
    addr = _mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    try:
        array = (ctypes.c_ubyte * length).from_address(addr)
        # Every view of the mapping keeps `array` alive; the last one to go unmaps.
        weakref.finalize(array, _munmap, addr, length)
    except BaseException:
        _munmap(addr, length)
        raise
    return memoryview(array).cast("B")
