"""Shared memory the daemon's processes map: a memfd, so that it can also be reached by fd.

The inode and handle tables, the journals, the statistics and the FUSE session word are created
by the supervisor before anything forks and inherited as mappings; each is also a memfd the
supervisor keeps, so that a daemon taking over from it (supervisor/upgrade.py) can map the very
same pages.
"""

from __future__ import annotations

import mmap
import os

__all__ = ["attach", "create"]


def create(size: int, name: str, keep_fd: bool = True) -> tuple[int, mmap.mmap]:
    """A zeroed shared mapping of `size` bytes and its memfd (close-on-exec, the caller's);
    keep_fd=False: the mapping alone (fd -1), for a process that will never hand it over."""
    fd = os.memfd_create(f"pyvirtiofsd-{name}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    if not keep_fd:
        os.close(fd)
        fd = -1
    return fd, mm


def attach(fd: int) -> mmap.mmap:
    """The whole of the memfd `fd`, mapped shared."""
    size = os.fstat(fd).st_size
    if not size:
        raise ValueError(f"fd {fd}: an empty shared mapping")
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
