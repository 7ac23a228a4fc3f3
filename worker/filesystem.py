"""The filesystem interface the FUSE server calls (cf. virtiofsd filesystem.rs).

Handlers take decoded Python values and return Python values -- never wire bytes -- and report
failure by raising OSError with the errno the guest should see.  Every operation defaults to
ENOSYS, so an implementation only overrides what it serves and the server answers the rest
the way the kernel expects for "not implemented" (protocol.md 4.2).

Data-moving operations take buffer lists (iovecs) instead of byte strings: `read` fills the
views of the reply's guest buffers and `write` consumes the views of the request's guest
buffers, so file data moves between the file and guest memory with no intermediate copy.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pyvirtiofsd.common.fuse_abi import SetattrIn

CACHE_MODES = ("never", "metadata", "auto", "always")


@dataclass(frozen=True, slots=True)
class Context:
    """Who asks: the caller's ids from fuse_in_header, plus extension data.

    `groups` are the supplementary groups of a FUSE_EXT_GROUPS extension (protocol.md 4.9),
    `umask` the caller's umask for creation requests (0 otherwise), `secctx` the (xattr name,
    value) of a security context extension (FUSE_SECURITY_CTX) to set on the inode created.
    """

    uid: int
    gid: int
    pid: int
    umask: int = 0
    groups: tuple[int, ...] = ()
    secctx: tuple[bytes, bytes] | None = None


class Entry(NamedTuple):
    """A LOOKUP-like result; each returned Entry with nodeid != 0 counts one lookup."""

    nodeid: int
    generation: int
    attr: os.stat_result
    entry_timeout: float
    attr_timeout: float
    attr_flags: int = 0  # fuse_attr.flags (FUSE_ATTR_SUBMOUNT)


class DirEntry(NamedTuple):
    """One directory record; `off` is the cookie that resumes the listing after it."""

    ino: int
    off: int
    type: int  # DT_* (st_mode >> 12)
    name: bytes


@dataclass(frozen=True)
class FsOptions:
    """What the configuration lets the filesystem do (built by the supervisor)."""

    cache: str = "auto"
    readonly: bool = False
    xattr: bool = False
    writeback: bool = False
    allow_direct_io: bool = False
    allow_device_nodes: bool = False
    announce_submounts: bool = True
    readdirplus: bool = True
    # Id translation rules, canonical "type:a:b[:c]" (common/idmap.py); applied by the FUSE
    # server where requests and replies cross between guest and host ids.
    translate_uid: tuple[str, ...] = ()
    translate_gid: tuple[str, ...] = ()
    # --xattrmap rules (common/xattrmap.py), applied to every xattr name; None: names as they are.
    xattrmap: str | None = None
    # POSIX ACLs (FUSE_POSIX_ACL): without it the ACL xattrs are refused and hidden (virtiofsd).
    posix_acl: bool = False
    # Security labels (FUSE_SECURITY_CTX): the context a creating request carries is set.
    security_label: bool = False
    # FUSE_HANDLE_KILLPRIV_V2: the guest leaves dropping set-id bits to the daemon.
    killpriv_v2: bool = False
    # Keep the guest's O_NOATIME (virtiofsd clears it by default).
    preserve_noatime: bool = False
    # FUSE_DIRECT_IO_ALLOW_MMAP: shared mmap of files opened with FOPEN_DIRECT_IO.
    allow_mmap: bool = False
    # Device-state migration (worker/migration.py): how the destination finds each inode again
    # (find-paths / file-handles), what an inode it cannot find becomes (abort / guest-error),
    # whether find-paths also compares file handles, and whether the source re-checks every
    # path when the state is taken.
    # --inode-file-handles: "mandatory" makes an inode known to the guest only when it has a
    # file handle (name_to_handle_at), so that file-handles migration can always find it again.
    inode_file_handles: str = "never"
    migration_mode: str = "find-paths"
    migration_on_error: str = "abort"
    migration_verify_handles: bool = False
    migration_confirm_paths: bool = False
    # FUSE_POSIX_LOCKS and FUSE_FLOCK_LOCKS (worker/locks.py): the guest's fcntl and flock
    # locks are taken on the host; off, the guest kernel keeps them to itself.
    posix_lock: bool = True
    flock: bool = True
    # Whose format a saved state is in: "pyvirtiofsd", or "virtiofsd" for a Rust virtiofsd 1.13
    # destination (common/rsstate.py).  A load reads either.
    migration_state_format: str = "pyvirtiofsd"

    def __post_init__(self) -> None:
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {self.cache!r}")


# A lock request that has to wait (Filesystem.setlk): the blocking call, made in a helper
# thread (0 or an errno), and what the worker's main thread does once it returned.
LockWait = tuple[Callable[[], int], Callable[[int], None]]


def _enosys() -> OSError:
    return OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


class Filesystem:
    """Every operation the server may call; the defaults answer ENOSYS.

    Ids are FUSE nodeids and file handles (fh).  Names are bytes without the NUL; the server
    has checked they are NUL-terminated on the wire but not what they contain.
    """

    # -- session ---------------------------------------------------------------------------
    def init(self, capable: int) -> int:
        """A new session starts; `capable` is the kernel's INIT flag set (InitFlag bits).
        Returns the optional INIT flags this filesystem wants on top of the server's."""
        return 0

    def destroy(self) -> None:
        """The session ended (DESTROY)."""

    # -- names and inodes ------------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        raise _enosys()

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Drop `nlookup` lookups of `nodeid`; never fails (FORGET has no reply)."""

    def batch_forget(self, items: Iterable[tuple[int, int]]) -> None:
        for nodeid, nlookup in items:
            self.forget(nodeid, nlookup)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        """(attributes, attr timeout in seconds); `fh` is set for GETATTR_FH requests."""
        raise _enosys()

    def setattr(self, ctx: Context, nodeid: int, attr: SetattrIn,
                fh: int | None) -> tuple[os.stat_result, float]:
        """Apply the fields `attr.valid` (SetattrValid) selects; `fh` is set with FATTR_FH."""
        raise _enosys()

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        raise _enosys()

    def symlink(self, ctx: Context, target: bytes, parent: int, name: bytes) -> Entry:
        raise _enosys()

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int) -> Entry:
        raise _enosys()

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int) -> Entry:
        raise _enosys()

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _enosys()

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _enosys()

    def rename(self, ctx: Context, olddir: int, oldname: bytes, newdir: int, newname: bytes,
               flags: int) -> None:
        """RENAME (flags 0) and RENAME2 (RENAME_NOREPLACE / EXCHANGE / WHITEOUT)."""
        raise _enosys()

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        raise _enosys()

    # -- files -----------------------------------------------------------------------------
    def open(self, ctx: Context, nodeid: int, flags: int, kill_priv: bool) -> tuple[int, int]:
        """(fh, FOPEN_* flags) for open(2) `flags`."""
        raise _enosys()

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               kill_priv: bool) -> tuple[Entry, int, int]:
        """(entry, fh, FOPEN_* flags); creates `name` unless it exists and O_EXCL is unset."""
        raise _enosys()

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int,
             bufs: Sequence[memoryview]) -> int:
        """Fill `bufs` in order from `offset`; returns the bytes read (short only at EOF)."""
        raise _enosys()

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, bufs: Sequence[memoryview],
              write_flags: int, open_flags: int) -> int:
        """Write `bufs` in order at `offset`; returns the bytes written.  `write_flags` are
        FUSE_WRITE_*, `open_flags` the file's open(2) flags as the kernel sees them."""
        raise _enosys()

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        raise _enosys()

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int, release_flags: int,
                lock_owner: int) -> None:
        raise _enosys()

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    def setupmapping(self, ctx: Context, nodeid: int, fh: int, foffset: int, length: int,
                     flags: int, moffset: int, mapper: Callable[..., None]) -> None:
        """DAX: map [foffset, +length) of open file `fh` at window offset `moffset` by calling
        `mapper(fd, fh, foffset, length, moffset, flags)` with the file's fd while it is
        pinned (worker/dax.py DaxClient.map).  `flags`: FUSE_SETUPMAPPING_FLAG_*."""
        raise _enosys()

    def window_io(self, ctx: Context, nodeid: int, fh: int, offset: int, bufs: Sequence,
                  write: bool, write_flags: int, mover: Callable[..., int]) -> int:
        """READ (write=False) into or WRITE from `bufs`, some of which are WindowBuffers in
        the DAX window (worker/guestmem.py): those are moved by `mover(fd, fh, foffset, gpa,
        length, write)` -> bytes moved (worker/dax.py DaxClient.io), with the file's fd
        pinned; the rest as read()/write() would.  Returns the bytes moved, in order."""
        raise _enosys()

    def fallocate(self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int,
                  length: int) -> None:
        raise _enosys()

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        raise _enosys()

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        raise _enosys()

    # -- directories -----------------------------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        raise _enosys()

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int,
                size: int) -> Iterable[DirEntry]:
        """Entries after cookie `offset`, at least as many as fit in `size` reply bytes.

        READDIRPLUS uses the same listing; the server looks each returned name up itself.
        """
        raise _enosys()

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        raise _enosys()

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    # -- whole filesystem, permissions, xattrs ---------------------------------------------
    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        raise _enosys()

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        raise _enosys()

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        raise _enosys()

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int,
                 setxattr_flags: int) -> None:
        raise _enosys()

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        """The value, or with `size == 0` its length (protocol.md 4.3 GETXATTR)."""
        raise _enosys()

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        """NUL-separated names, or with `size == 0` the list's length."""
        raise _enosys()

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        raise _enosys()

    # -- locks -------------------------------------------------------------------------------
    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, start: int, end: int,
              typ: int, pid: int, lk_flags: int) -> tuple[int, int, int, int]:
        """The first lock conflicting with the one described, as (type, start, end, pid);
        type F_UNLCK when there is none."""
        raise _enosys()

    def setlk(self, ctx: Context, nodeid: int, fh: int, owner: int, start: int, end: int,
              typ: int, pid: int, lk_flags: int, sleep: bool) -> LockWait | None:
        """Take or release a lock of `owner` (flock(2) semantics with LK_FLOCK).  None when
        done; with `sleep`, a LockWait when the lock must be waited for."""
        raise _enosys()

    def interrupt(self, unique: int) -> None:
        """FUSE_INTERRUPT: request `unique` should stop waiting (no reply)."""
