"""Thin Python face of the cffi helpers in native_build.py.

Everything here is safe to call from any process of the daemon; none of it allocates guest- or
filesystem-visible state.
"""

from __future__ import annotations

import ctypes
import os

from pyvirtiofsd.common._native import ffi, lib

CLONE_FILES = 0x00000400
CLONE_PARENT = 0x00008000
SIGCHLD = 17

fence = lib.vfs_fence
setfsuid = lib.vfs_setfsuid
setfsgid = lib.vfs_setfsgid
# log_mark(log, size, gpa, length): dirty-page logging's atomic bit-sets (common/dirtylog.h).
log_mark = lib.vfs_log_mark
# log_chain(log, size, desc, ring_size, head, used_len, regions, n): a reply's pages (dirtylog.h).
log_chain = lib.vfs_log_chain_regions

_pyapi = ctypes.pythonapi


def address_of(buffer) -> object:
    """A `uint8_t *` into a writable buffer (mmap, bytearray); valid while the buffer lives."""
    return ffi.from_buffer("uint8_t[]", buffer, require_writable=True)


def u32_ptr(base, offset: int) -> object:
    return ffi.cast("uint32_t *", base + offset)


def u64_ptr(base, offset: int) -> object:
    return ffi.cast("uint64_t *", base + offset)


def clone_process(flags: int) -> int:
    """fork() with extra clone flags (CLONE_FILES, CLONE_PARENT): returns 0 in the child.

    os.fork() cannot share the fd table, so this wraps the raw clone syscall in the same
    interpreter hooks os.fork() uses (at-fork handlers, import lock, thread state).
    """
    _pyapi.PyOS_BeforeFork()
    pid = lib.vfs_raw_clone(flags | SIGCHLD)
    if pid == 0:
        _pyapi.PyOS_AfterFork_Child()
        return 0
    err = ffi.errno
    _pyapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, os.strerror(err), "clone")
    return pid
