"""Passthrough filesystem over the shared directory (cf. virtiofsd passthrough/mod.rs).

Every inode the guest knows is one O_PATH|O_NOFOLLOW fd in the shared inode table and every
open file one fd in the shared handle table (common/arena.py), so any queue worker serves any
nodeid or fh.  Each operation pins the entries it uses for its whole duration; an fd is never
closed under a request in flight on another queue.

Staying inside the share:
* names are single path components opened relative to the parent's fd with O_NOFOLLOW, never
  '.', '..', empty, or containing '/' (LOOKUP of '.' returns the parent itself, LOOKUP of '..'
  only works at the root, which is its own parent); symlinks are never followed; where the
  kernel has openat2 (5.6) the open also says so to the kernel: RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, so nothing can resolve above the parent even if
  a check here were wrong;
* a name is only resolved or created in a directory that is still beneath the share's root:
  one the host moved out of the share (while the guest holds it) answers ENOENT to LOOKUP,
  CREATE, MKDIR & co. and to READDIR.  The kernel's name for the directory (its /proc/self/fd
  link) must lead from the root, without symlinks, back to that same directory;
* an inode is only changed while it is still in the share (_check_inode_beneath): SETATTR,
  SETXATTR/REMOVEXATTR, LINK of it and OPEN for writing, O_TRUNC or O_TMPFILE answer ENOENT
  for something the host moved out; an inode with no name left (unlinked, O_TMPFILE) is only
  reached through the guest's own nodeid or handle and may still be changed;
* a file is opened for I/O by re-opening its O_PATH fd through the /proc/self/fd directory the
  worker holds -- the magic link names the inode itself, so no path is resolved again;
* only regular files and directories are ever opened for I/O: opening a device node or FIFO
  the guest created could reach host devices or block the worker.

Credentials: every operation runs with the caller's uid/gid as fsuid/fsgid and with the
supplementary groups the request carried (FUSE_EXT_GROUPS, else none), so the host kernel
checks permissions as for that user; with a non-zero fsuid the kernel also ignores the daemon's
file-system capabilities.  It keeps CAP_SETFCAP (and SETUID/SETGID) whatever the fsuid, so the
checks the kernel would make with them are made here: security.capability is set by uid 0
only and removed only by a caller who may write the file (_check_xattr_change); set-id bits
are dropped as the daemon only for such a caller (_chmod).  MKNOD of a block or character
device needs --allow-device-nodes (_check_device_node).

FUSE does not carry the caller's other supplementary groups except, for requests that create
an inode, the parent's group (CREATE_SUPP_GROUP); so anything else the guest allowed through
one of them (virtio-fs always mounts with default_permissions: the guest kernel checked first)
would fail here.  Such an operation the host refuses is tried once more
with the groups of the inodes it names added (`_member_retry`).  That grants nothing the guest
could not have by sending that gid as the caller's own, which it is free to do.  ACCESS is a
question, not an operation the guest checked, and is never retried; LOOKUP is not either, so
searching a directory takes the caller's gid or the groups the request carried.  The ids are
switched only when they change.  The process umask is 0: the guest kernel already applied the
caller's umask because FUSE_DONT_MASK is not negotiated (fuse.h), so applying one here again
would be wrong.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import os
import stat
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common import native
from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.xattrmap import XattrMap
from pyvirtiofsd.worker.filesystem import Context, DirEntry, Entry, Filesystem, FsOptions

if TYPE_CHECKING:
    from pyvirtiofsd.worker.recovery import JournaledArena

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")

AT_SYMLINK_NOFOLLOW = 0x100
AT_EACCESS = 0x200
AT_EMPTY_PATH = 0x1000
STATX_MNT_ID = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_STATX_SIZE = 256
_STATX_MASK = struct.Struct("=I")
_STATX_MNT_ID = struct.Struct("=Q")
_STATX_MNT_ID_OFF = 144
_DIRENT64 = struct.Struct("=QqHB")  # d_ino, d_off, d_reclen, d_type; name follows at 19
MAX_BUFFER_SIZE = 1 << 20
# preadv/pwritev take at most IOV_MAX buffers (EINVAL beyond); a chain may have more, so
# longer lists go in slices through the short-transfer loops.
_IOV_MAX = os.sysconf("SC_IOV_MAX")


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _fn(name: str, restype, *argtypes):
    f = getattr(_libc, name)
    f.restype = restype
    f.argtypes = argtypes
    return f


_c_int, _c_uint, _c_char_p, _c_void_p = (ctypes.c_int, ctypes.c_uint, ctypes.c_char_p,
                                         ctypes.c_void_p)
# glibc >= 2.28 wrappers for the calls os does not expose (or not with the flags needed).
_renameat2 = _fn("renameat2", _c_int, _c_int, _c_char_p, _c_int, _c_char_p, _c_uint)
_fchownat = _fn("fchownat", _c_int, _c_int, _c_char_p, ctypes.c_uint32, ctypes.c_uint32, _c_int)
_utimensat = _fn("utimensat", _c_int, _c_int, _c_char_p, ctypes.POINTER(_Timespec), _c_int)
_futimens = _fn("futimens", _c_int, _c_int, ctypes.POINTER(_Timespec))
_faccessat = _fn("faccessat", _c_int, _c_int, _c_char_p, _c_int, _c_int)
_fallocate = _fn("fallocate", _c_int, _c_int, _c_int, ctypes.c_int64, ctypes.c_int64)
_syncfs = _fn("syncfs", _c_int, _c_int)
_statx = _fn("statx", _c_int, _c_int, _c_char_p, _c_int, _c_uint, _c_void_p)
_getdents64 = _fn("getdents64", ctypes.c_ssize_t, _c_int, _c_void_p, ctypes.c_size_t)


def _check(res: int) -> int:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _lstat_at(dir_fd: int, name: bytes) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def _member_retry(*nodeid_args: int, new_gid: bool = False,
                  entries: tuple[tuple[int, int], ...] = ()):
    """Serve the operation again, after the host refused it with EACCES/EPERM, with these groups
    among the caller's supplementary ones (module docstring): those of the inodes in the given
    positional arguments (after ctx), of the entries named by (directory nodeid, name) argument
    pairs, and with new_gid of the group a SETATTR assigns."""
    def wrap(fn):
        @functools.wraps(fn)
        def op(self, ctx: Context, *args):
            try:
                return fn(self, ctx, *args)
            except PermissionError:
                gids = {args[1].gid} if new_gid and args[1].valid & fa.SetattrValid.GID else set()
                more = self._groups_of(ctx, [args[i] for i in nodeid_args],
                                       [(args[d], args[n]) for d, n in entries], gids)
                if not more:
                    raise
            return fn(self, dataclasses.replace(ctx, groups=ctx.groups + more), *args)
        return op
    return wrap


def _check_name(name: bytes) -> None:
    """A single path component that can only name an entry of the directory itself."""
    if len(name) > fa.NAME_MAX:
        raise _err(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name or name == b"." or name == b"..":
        raise _err(errno.EINVAL)


def _check_device_node(mode: int, rdev: int, allowed: bool) -> None:
    """EPERM for a block or character device unless --allow-device-nodes: a node the guest
    makes is a host device node, which any host process allowed by its mode could open (a
    guest-made 1:11 is the host's /dev/kmsg).  EPERM is what mknod(2) says without
    CAP_MKNOD.  A whiteout (character device 0:0, overlayfs) opens no device and is allowed."""
    kind = mode & _S_IFMT
    if allowed or kind not in (stat.S_IFBLK, stat.S_IFCHR):
        return
    if kind == stat.S_IFCHR and rdev == 0:
        return
    raise _err(errno.EPERM)


def _signed32(v: int) -> int:
    """A u32 from the wire as the C int it stands for (open(2) flags)."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _offset(v: int) -> int:
    """A file offset from the wire; loff_t is signed, so the top half is out of range."""
    if v >= 1 << 63:
        raise _err(errno.EINVAL)
    return v


def _signed64(v: int) -> int:
    """A u64 cookie from the wire as the off_t it came from."""
    return v - (1 << 64) if v >= 1 << 63 else v


# O_* flags a FUSE OPEN may carry that must not reach the re-open: creation flags belong to
# CREATE (the kernel strips them too), O_NOFOLLOW would refuse the /proc magic link, O_APPEND
# is applied per write (see write()), O_NOATIME could fail for a non-owner (virtiofsd clears it).
_OPEN_STRIP = (os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_APPEND | os.O_NOATIME
               | os.O_PATH)
_O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)

_S_IFMT = 0o170000
XATTR_NAME_CAPS = b"security.capability"   # linux/xattr.h
_DELETED = b" (deleted)"   # what d_path() appends to the name of an unlinked dentry
_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
_TIMEOUTS = {"never": 0.0, "metadata": 86400.0, "auto": 1.0, "always": 86400.0}


class Credentials:
    """The credentials this process has in force, as switched per request: fsuid, fsgid,
    whether no supplementary groups are set, whether groups can be set at all.  On the native
    data plane the engine's `struct vfs_engine_fs` (the same fields) takes its place, so that
    Python and C, which both switch, never skip a switch nor repeat one."""

    __slots__ = ("fsgid", "fsuid", "groups_empty", "set_groups")

    def __init__(self, fsuid: int, fsgid: int) -> None:
        self.fsuid = fsuid
        self.fsgid = fsgid
        self.groups_empty = 0
        self.set_groups = 1


class PassthroughFs(Filesystem):
    def __init__(self, arena: Arena | JournaledArena, proc_self_fd: int,
                 options: FsOptions) -> None:
        self._inodes = arena.inodes
        self._handles = arena.handles
        self._proc = proc_self_fd
        self.options = options
        self._timeout = _TIMEOUTS[options.cache]
        self._readonly = options.readonly
        self._submounts = options.announce_submounts
        self._writeback = options.writeback
        self._strip = ((_OPEN_STRIP & ~(os.O_NOATIME if options.preserve_noatime else 0))
                       | (0 if options.allow_direct_io else os.O_DIRECT))
        cache = options.cache
        file_flags = {"never": fa.OpenOutFlag.DIRECT_IO, "metadata": fa.OpenOutFlag.DIRECT_IO,
                      "always": fa.OpenOutFlag.KEEP_CACHE}.get(cache, 0)
        dir_flags = {"metadata": fa.OpenOutFlag.CACHE_DIR | fa.OpenOutFlag.KEEP_CACHE,
                     "always": fa.OpenOutFlag.CACHE_DIR | fa.OpenOutFlag.KEEP_CACHE}.get(cache, 0)
        self._file_open_flags = int(file_flags)
        self._dir_open_flags = int(dir_flags)
        # Credentials currently in force in this process (see the module docstring).  Only a
        # root daemon can switch; an unprivileged one serves everything as itself.
        self._switch_creds = os.geteuid() == 0
        self._creds = Credentials(os.geteuid(), os.getegid())
        # The groups in force when not creds.groups_empty (None: not known).
        self._groups: tuple[int, ...] | None = None
        self._statx_buf = ctypes.create_string_buffer(_STATX_SIZE)
        self._dirbuf = ctypes.create_string_buffer(0)
        self._xmap = XattrMap(options.xattrmap) if options.xattrmap is not None else None
        self._posix_acl = options.posix_acl
        # The host name of the guest's security.capability when the map renames it: the host
        # kernel no longer drops it on a write, truncate or chown, so this daemon does (as
        # virtiofsd does).  None: the kernel does it.
        self._caps_name: bytes | None = None
        if self._xmap is not None:
            try:
                name = self._xmap.to_host(XATTR_NAME_CAPS)
            except OSError:
                name = XATTR_NAME_CAPS
            self._caps_name = None if name == XATTR_NAME_CAPS else name
        self._handles_mandatory = options.inode_file_handles == "mandatory"
        self._handle_buf = (native.ffi.new("uint8_t[128]"), native.ffi.new("uint32_t[1]"),
                            native.ffi.new("int[1]"), native.ffi.new("uint64_t[1]"))
        self._cwd = -1
        self._root_path: bytes | None = None
        self._root_fd = -1
        os.umask(0)

    # -- helpers ---------------------------------------------------------------------------
    def _as_caller(self, ctx: Context) -> None:
        if not self._switch_creds:
            return
        c = self._creds
        gid = ctx.gid
        if gid != c.fsgid:
            native.setfsgid(gid)
            # setfsgid reports the previous id and never fails visibly; ask again to know.
            if native.setfsgid(gid) != gid:
                raise OSError(errno.EPERM, f"cannot act as gid {gid}")
            c.fsgid = gid
        uid = ctx.uid
        if uid != c.fsuid:
            native.setfsuid(uid)
            if native.setfsuid(uid) != uid:
                raise OSError(errno.EPERM, f"cannot act as uid {uid}")
            c.fsuid = uid
        groups = ctx.groups
        if c.set_groups and (groups if c.groups_empty else groups != self._groups):
            try:
                os.setgroups(groups)
            except PermissionError:
                # A user namespace with setgroups denied (user_namespaces(7)), which an
                # unprivileged daemon maps its single id in: no group can be given there.
                c.set_groups = 0
                return
            self._groups = groups
            c.groups_empty = 0 if groups else 1

    def _groups_of(self, ctx: Context, nodeids: Sequence[int],
                   entries: Sequence[tuple[int, bytes]], gids: set[int]) -> tuple[int, ...]:
        """The groups of `nodeids`, `entries` and `gids` the caller does not have yet (():
        no retry)."""
        if not self._switch_creds or not self._creds.set_groups or ctx.uid == 0:
            return ()               # root's refusals are not about groups
        for nodeid in nodeids:
            try:
                with self._inodes.pinned(nodeid) as fd:
                    gids.add(os.fstat(fd).st_gid)
            except OSError:
                continue
        for parent, name in entries:
            try:
                _check_name(name)
                with self._inodes.pinned(parent) as fd:
                    st = self._as_daemon(_lstat_at, fd, name)
                    gids.add(st.st_gid)
            except OSError:
                continue
        gids.difference_update((ctx.gid, *ctx.groups))
        return tuple(sorted(gids))

    def restore_credentials(self) -> None:
        """Act as the daemon itself again (its own fsuid/fsgid; groups as set last)."""
        if self._switch_creds:
            native.setfsuid(os.geteuid())
            native.setfsgid(os.getegid())
            self._creds.fsuid = os.geteuid()
            self._creds.fsgid = os.getegid()

    def identify(self, parent: int, name: bytes) -> tuple[int, int] | None:
        """(dev, ino) that `name` in `parent` refers to now, None if absent; OSError if that
        cannot be told (a name no operation would accept, an unknown parent).  Crash recovery
        (worker/recovery.py) compares these before and after a non-idempotent call.  It asks
        as the daemon itself, so that the caller's permissions cannot hide a name; the next
        operation switches to its caller again."""
        self.restore_credentials()
        _check_name(name)
        with self._inodes.pinned(parent) as pfd:
            try:
                st = _lstat_at(pfd, name)
            except FileNotFoundError:
                return None
        return st.st_dev, st.st_ino

    # -- the native data plane (worker/engine.c) shares these -----------------------------
    def native_options(self) -> dict[str, int | bool] | None:
        """What the engine's handlers need of this filesystem (Engine.serve_natively's
        keywords); None when they could not answer as it does."""
        if self._timeout != int(self._timeout):
            return None
        return {"proc_fd": self._proc, "timeout": int(self._timeout),
                "readonly": self._readonly, "switch_creds": self._switch_creds,
                "submounts": self._submounts, "euid": os.geteuid(),
                "open_strip": self._strip, "file_open_flags": self._file_open_flags,
                "dir_open_flags": self._dir_open_flags, "writeback": self._writeback}

    def share_credentials(self, shared: object) -> None:
        """Keep the credentials in force in `shared` (the engine's struct vfs_engine_fs, with
        Credentials' fields) from now on."""
        c = self._creds
        shared.fsuid, shared.fsgid = c.fsuid, c.fsgid
        shared.groups_empty, shared.set_groups = c.groups_empty, c.set_groups
        self._creds = shared

    def _writable(self) -> None:
        if self._readonly:
            raise _err(errno.EROFS)

    def _mnt_id(self, fd: int) -> int:
        buf = self._statx_buf
        _check(_statx(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_MNT_ID, buf))
        if _STATX_MASK.unpack_from(buf, 0)[0] & STATX_MNT_ID:
            return _STATX_MNT_ID.unpack_from(buf, _STATX_MNT_ID_OFF)[0]
        return 0

    def _register(self, fd: int, parent_fd: int) -> Entry:
        """Count a lookup of the inode behind the O_PATH `fd` (owned by this call)."""
        try:
            st = os.fstat(fd)
            mnt_id = self._mnt_id(fd)
            attr_flags = 0
            # A directory on another filesystem or mount is announced as a submount so the
            # guest gives it its own superblock (FUSE_ATTR_SUBMOUNT, fuse.h 7.32).
            if self._submounts and stat.S_ISDIR(st.st_mode) and (
                    os.fstat(parent_fd).st_dev != st.st_dev or self._mnt_id(parent_fd) != mnt_id):
                attr_flags = fa.AttrFlag.SUBMOUNT
            if self._handles_mandatory:
                self._check_file_handle(fd)
            nodeid, owned = self._inodes.lookup_or_insert(fd, st.st_dev, st.st_ino, mnt_id)
        except BaseException:
            os.close(fd)
            raise
        if not owned:
            os.close(fd)
        return Entry(nodeid, 0, st, self._timeout, self._timeout, int(attr_flags))

    def _check_file_handle(self, fd: int) -> None:
        """--inode-file-handles=mandatory: an inode without a file handle is not made known to
        the guest (virtiofsd fails the request the same way), so that every inode it holds can
        be found again by handle (file-handles migration)."""
        buf = self._handle_buf
        if native.lib.vfs_name_to_handle(fd, buf[0], buf[1], buf[2], buf[3]) != 0:
            err = native.ffi.errno
            raise OSError(err, f"no file handle ({os.strerror(err)}) and "
                               "--inode-file-handles=mandatory")

    def _lookup_at(self, parent_fd: int, name: bytes) -> Entry:
        fd = _open_beneath(parent_fd, name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        return self._register(fd, parent_fd)

    def _check_beneath(self, dir_fd: int) -> None:
        """ENOENT unless the directory `dir_fd` is still beneath the share's root: its path as
        the kernel names it (/proc/self/fd/N) must lead, from the root and with no symlink, to
        this very directory.  Done as the daemon: only reachability is asked here."""
        self._know_root()
        self._as_daemon(self._reachable, dir_fd, True)

    def _know_root(self) -> None:
        if self._root_path is None:
            with self._inodes.pinned(self._inodes.ROOT) as rfd:
                # The root is never forgotten, so its fd stays valid for the worker's lifetime.
                self._root_fd = rfd
                self._root_path = os.readlink(b"%d" % rfd, dir_fd=self._proc)

    def _check_inode_beneath(self, ifd: int) -> None:
        """Before anything changes the inode behind `ifd` (its attributes, xattrs, data opened
        for writing, a new link, an O_TMPFILE in it): ENOENT unless it is still in the share.
        A directory must be beneath the root (_check_beneath); another inode must be reached
        from the root by the name the kernel knows it by -- unless it has no name left at all
        (unlinked while the guest holds it, or made with O_TMPFILE): then only the guest's own
        nodeid or handle reaches it, and nothing outside the share can."""
        self._know_root()
        self._as_daemon(self._reachable, ifd, False)

    def _reachable(self, fd: int, directory: bool) -> None:
        have = os.fstat(fd)
        if not stat.S_ISDIR(have.st_mode):
            if directory:
                raise _err(errno.ENOTDIR)     # what resolving a name in it would say
            if have.st_nlink == 0:
                return
        path = os.readlink(b"%d" % fd, dir_fd=self._proc)
        root = self._root_path
        if root != b"/" and path != root and not path.startswith(root + b"/"):
            # Without a sandbox the kernel names paths from the host's root.
            raise _err(errno.ENOENT)
        try:
            if root == b"/":
                # The share is this process's root (pivoted or chrooted): no path, symlinks
                # included, resolves outside it, so reaching this very inode is the whole
                # question -- asked without opening anything (a worker killed while it holds an
                # fd in the shared table would leave that fd behind).
                found = os.stat(path.lstrip(b"/") or b".", dir_fd=self._root_fd,
                                follow_symlinks=False)
            else:
                # Symlinks could lead anywhere: the path is walked with none.
                fd = _open_beneath(self._root_fd, path[len(root):].lstrip(b"/") or b".",
                                   os.O_PATH | os.O_CLOEXEC)
                try:
                    found = os.fstat(fd)
                finally:
                    os.close(fd)
        except OSError:
            found = None
        if found is not None and (found.st_dev, found.st_ino) == (have.st_dev, have.st_ino):
            return
        if not directory and path.endswith(_DELETED):
            # The name it was looked up by is gone but it has other links (the guest's LINK
            # then UNLINK, or a host hard link): reached only through what the guest holds,
            # like an unlinked file.  (A host name that itself ends in " (deleted)" reads the
            # same when its directory is outside a pivoted root; the host would have to make
            # one and move it out under a held nodeid.)
            return
        raise _err(errno.ENOENT)

    def _reopen(self, fd: int, flags: int) -> int:
        """An I/O fd for the inode behind the O_PATH `fd`, through its /proc magic link."""
        return os.open(str(fd), (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC, dir_fd=self._proc)

    @staticmethod
    def _check_openable(fd: int, directory: bool) -> os.stat_result:
        st = os.fstat(fd)
        mode = st.st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            if directory and not stat.S_ISDIR(mode):
                raise _err(errno.ENOTDIR)
            return st
        # What open(2) of the magic link would say for a symlink; other types are refused.
        raise _err(errno.ELOOP if stat.S_ISLNK(mode) else errno.ENXIO)

    def _pin_handle(self, fh: int, nodeid: int) -> int:
        """Pin `fh` and return its fd; EBADF unless it belongs to `nodeid` (virtiofsd)."""
        fd, owner, _ = self._handles.acquire(fh)
        if owner != nodeid:
            self._handles.release(fh)
            raise _err(errno.EBADF)
        return fd

    def _chmod_inode(self, fd: int, mode: int) -> None:
        os.chmod(str(fd), mode, dir_fd=self._proc)

    def _chmod(self, ifd: int, hfd: int, mode: int) -> None:
        def chmod() -> None:
            if hfd >= 0:
                os.fchmod(hfd, mode)
            else:
                self._chmod_inode(ifd, mode)
        try:
            chmod()
        except PermissionError:
            # Without HANDLE_KILLPRIV the guest drops the set-id bits of a file before a write
            # or truncate by a non-owner with a SETATTR of that writer's own (fuse_setattr()),
            # which only the owner could do.  Dropping set-id bits and nothing else never
            # grants anything, so it is done as the daemon (virtiofsd does every chmod so).
            old = stat.S_IMODE(os.fstat(ifd).st_mode)
            setid = stat.S_ISUID | stat.S_ISGID
            if mode == old or mode & ~old or (old ^ mode) & ~setid:
                raise
            # ... and only for a caller who may write the file: that is what a write does.
            self._check_caller_may_write(ifd)
            self._as_daemon(chmod)

    def _check_caller_may_write(self, ifd: int) -> None:
        """EPERM unless the caller now in force may write the inode behind `ifd` (with its
        fsuid, fsgid, groups and the capabilities the kernel leaves that fsuid)."""
        if _faccessat(self._proc, str(ifd).encode(), os.W_OK, AT_EACCESS) != 0:
            raise _err(errno.EPERM)

    def _check_xattr_change(self, ctx: Context, ifd: int, name: bytes, removing: bool) -> None:
        """An xattr change: the inode must still be in the share (_check_inode_beneath).
        security.capability grants capabilities to whoever executes the file.  The kernel
        asks CAP_SETFCAP to set or remove it (capabilities(7), "File capabilities"), and the
        worker keeps CAP_SETFCAP whatever fsuid it acts as (setfsuid drops only the
        file-system capabilities), so the kernel's check would pass for any caller.  Setting
        is for uid 0 only; removing is what any write by a non-root caller does on the host
        (killpriv, sent as REMOVEXATTR by a guest without HANDLE_KILLPRIV), so a caller who may
        write the file may."""
        self._check_inode_beneath(ifd)
        if name != XATTR_NAME_CAPS or ctx.uid == 0:
            return
        if not removing:
            raise _err(errno.EPERM)
        self._check_caller_may_write(ifd)

    @staticmethod
    def _kill_suidgid(fd: int) -> None:
        """Drop set-user-ID, and set-group-ID if group-executable, on the open file `fd` as a
        write by a non-owner would (FATTR_ / FUSE_WRITE_ / FUSE_OPEN_KILL_SUIDGID)."""
        mode = os.fstat(fd).st_mode
        drop = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & drop:
            os.fchmod(fd, stat.S_IMODE(mode) & ~drop)

    def _in_proc_dir(self, fn: Callable[[str], T], fd: int) -> T:
        """Run fn(name) with the cwd in /proc/self/fd: path-based xattr calls on a magic link
        reach inodes that must not be opened (symlinks, devices, FIFOs) -- virtiofsd's trick."""
        if self._cwd < 0:
            self._cwd = self._as_daemon(os.open, ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        os.fchdir(self._proc)
        try:
            return fn(str(fd))
        finally:
            # The way back may not be searchable for the caller's fsuid.
            self._as_daemon(os.fchdir, self._cwd)

    def _as_daemon(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) with the daemon's own fsuid, then the caller's again."""
        fsuid = self._creds.fsuid
        if not self._switch_creds or fsuid == os.geteuid():
            return fn(*args)
        native.setfsuid(os.geteuid())
        try:
            return fn(*args)
        finally:
            native.setfsuid(fsuid)

    def _open_flags(self, flags: int) -> int:
        flags = _signed32(flags) & ~self._strip
        # With writeback caching the guest reads pages of files opened write-only (virtiofsd).
        if self._writeback and flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    def _open_fd(self, ifd: int, flags: int, requested: int) -> tuple[int, int]:
        """(fd, the flags it was opened with)."""
        try:
            return self._reopen(ifd, flags), flags
        except PermissionError:
            # The writeback upgrade to O_RDWR needs read permission the caller may lack.
            if flags & os.O_ACCMODE != requested & os.O_ACCMODE:
                flags = (flags & ~os.O_ACCMODE) | (requested & os.O_ACCMODE)
                return self._reopen(ifd, flags), flags
            raise

    # -- session ---------------------------------------------------------------------------
    def destroy(self) -> None:
        # The session is over: the kernel holds no nodeid or fh any more (virtiofsd drops
        # every inode and handle here too), so none of their fds may stay open.
        self._handles.remove_all()
        self._inodes.forget_all()

    def init(self, capable: int) -> int:
        want = 0
        # What --posix-acl and --security-label need of the guest kernel; without it the
        # session is refused, as virtiofsd does, rather than served without them.
        for on, need, what in (
                (self._posix_acl, fa.InitFlag.POSIX_ACL | fa.InitFlag.DONT_MASK
                 | fa.InitFlag.SETXATTR_EXT, "--posix-acl"),
                (self.options.security_label, fa.InitFlag.SECURITY_CTX, "--security-label")):
            if on:
                if capable & need != need:
                    raise OSError(errno.EPROTO, f"{what}: the guest kernel does not offer "
                                  f"{fa.InitFlag(need & ~capable)!r}")
                want |= need
        if self.options.readdirplus:
            want |= fa.InitFlag.DO_READDIRPLUS | fa.InitFlag.READDIRPLUS_AUTO
        if self._writeback:
            want |= fa.InitFlag.WRITEBACK_CACHE
        if self._submounts:
            want |= fa.InitFlag.SUBMOUNTS
        if self.options.killpriv_v2:
            # The guest then sends WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID and
            # OPEN_KILL_SUIDGID instead of a SETATTR of the mode first (write(), _truncate(),
            # open() drop the bits).  Not offered by the guest: served without, as virtiofsd.
            want |= fa.InitFlag.HANDLE_KILLPRIV_V2
        if self.options.allow_mmap:
            want |= fa.InitFlag.DIRECT_IO_ALLOW_MMAP
        return int(want)

    # -- names and inodes ------------------------------------------------------------------
    @_member_retry(0)
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        self._as_caller(ctx)
        if name == b"." or name == b"..":
            if name == b".." and parent != self._inodes.ROOT:
                # Resolving '..' from an fd could leave the share (a directory moved out of
                # it); the kernel only asks with FUSE_EXPORT_SUPPORT, which is not offered.
                raise _err(errno.ENOENT)
            with self._inodes.pinned(parent) as pfd:
                # The root is its own parent.  Count one more lookup of `parent` itself.
                return self._register(os.dup(pfd), pfd)
        _check_name(name)
        with self._inodes.pinned(parent) as pfd:
            self._check_beneath(pfd)
            return self._lookup_at(pfd, name)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self._inodes.forget(nodeid, nlookup)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        # An open file and its inode's O_PATH fd are the same inode: `fh` adds nothing
        # (virtiofsd ignores it too).
        self._as_caller(ctx)
        with self._inodes.pinned(nodeid) as fd:
            return os.fstat(fd), self._timeout

    @_member_retry(0, new_gid=True)
    def setattr(self, ctx: Context, nodeid: int, attr: fa.SetattrIn,
                fh: int | None) -> tuple[os.stat_result, float]:
        self._writable()
        self._as_caller(ctx)
        valid = attr.valid
        V = fa.SetattrValid
        with self._inodes.pinned(nodeid) as ifd:
            self._check_inode_beneath(ifd)
            hfd = self._pin_handle(fh, nodeid) if fh is not None else -1
            try:
                if valid & V.MODE:
                    self._chmod(ifd, hfd, attr.mode & 0o7777)
                if valid & (V.UID | V.GID | V.SIZE):
                    self._drop_mapped_caps(ifd, True)
                if valid & (V.UID | V.GID):
                    uid = attr.uid if valid & V.UID else 0xFFFFFFFF
                    gid = attr.gid if valid & V.GID else 0xFFFFFFFF
                    _check(_fchownat(ifd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
                if valid & V.SIZE:
                    self._truncate(ifd, hfd, attr.size, bool(valid & V.KILL_SUIDGID)
                                   and not valid & V.MODE)
                if valid & (V.ATIME | V.MTIME | V.ATIME_NOW | V.MTIME_NOW):
                    self._utimens(ifd, hfd, attr, valid)
                # FATTR_CTIME: the host sets ctime itself on every change above.
            finally:
                if hfd >= 0:
                    self._handles.release(fh)
            return os.fstat(ifd), self._timeout

    def _truncate(self, ifd: int, hfd: int, size: int, kill: bool) -> None:
        if size >= 1 << 63:
            raise _err(errno.EINVAL)
        if hfd >= 0:
            os.ftruncate(hfd, size)
            if kill:
                self._kill_suidgid(hfd)
            return
        if stat.S_ISDIR(self._check_openable(ifd, False).st_mode):
            raise _err(errno.EISDIR)
        # truncate(2) needs write permission only, so no read access is asked for.
        fd = self._reopen(ifd, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.ftruncate(fd, size)
            if kill:
                self._kill_suidgid(fd)
        finally:
            os.close(fd)

    def _utimens(self, ifd: int, hfd: int, attr: fa.SetattrIn, valid: int) -> None:
        V = fa.SetattrValid
        times = (_Timespec * 2)((0, UTIME_OMIT), (0, UTIME_OMIT))
        if valid & V.ATIME_NOW:
            times[0].tv_nsec = UTIME_NOW
        elif valid & V.ATIME:
            times[0].tv_sec, times[0].tv_nsec = _signed64(attr.atime), attr.atimensec
        if valid & V.MTIME_NOW:
            times[1].tv_nsec = UTIME_NOW
        elif valid & V.MTIME:
            times[1].tv_sec, times[1].tv_nsec = _signed64(attr.mtime), attr.mtimensec
        if hfd >= 0:
            _check(_futimens(hfd, times))
        else:
            _check(_utimensat(self._proc, str(ifd).encode(), times, 0))

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        self._as_caller(ctx)
        with self._inodes.pinned(nodeid) as fd:
            return os.readlink(b"", dir_fd=fd)

    def symlink(self, ctx: Context, target: bytes, parent: int, name: bytes) -> Entry:
        self._writable()
        _check_name(name)
        if not target:
            raise _err(errno.ENOENT)
        self._as_caller(ctx)
        with self._inodes.pinned(parent) as pfd:
            self._check_beneath(pfd)
            os.symlink(target, name, dir_fd=pfd)
            self._label(ctx, pfd, name)
            return self._lookup_at(pfd, name)

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int) -> Entry:
        self._writable()
        _check_name(name)
        _check_device_node(mode, rdev, self.options.allow_device_nodes)
        self._as_caller(ctx)
        with self._inodes.pinned(parent) as pfd:
            self._check_beneath(pfd)
            self._making(ctx, os.mknod, name, mode & (_S_IFMT | 0o7777), rdev, dir_fd=pfd)
            self._label(ctx, pfd, name)
            return self._lookup_at(pfd, name)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int) -> Entry:
        self._writable()
        _check_name(name)
        self._as_caller(ctx)
        with self._inodes.pinned(parent) as pfd:
            self._check_beneath(pfd)
            self._making(ctx, os.mkdir, name, mode & 0o7777, dir_fd=pfd)
            self._label(ctx, pfd, name)
            return self._lookup_at(pfd, name)

    def _making(self, ctx: Context, fn: Callable[..., T], *args, **kw) -> T:
        """A call that creates an inode.  With FUSE_DONT_MASK (--posix-acl) the guest leaves
        the caller's umask to the host, which applies it only where the parent has no default
        ACL (acl(5)): it is this process's umask for the call.  Otherwise the guest applied
        it already and the umask stays 0."""
        if not self._posix_acl or not ctx.umask:
            return fn(*args, **kw)
        os.umask(ctx.umask & 0o777)
        try:
            return fn(*args, **kw)
        finally:
            os.umask(0)

    def _label(self, ctx: Context, pfd: int, name: bytes, fd: int = -1) -> None:
        """Set the security context the request carried (FUSE_SECURITY_CTX) on the inode just
        made as `name` in `pfd` (or open as `fd`); on failure the inode is removed again and
        the request fails (virtiofsd).  Set as the daemon: the context is the guest's LSM's
        decision; the host's LSM still checks the relabel."""
        if ctx.secctx is None:
            return
        try:
            xname = self._host_xattr(ctx.secctx[0])
            if fd >= 0:
                self._as_daemon(os.setxattr, fd, xname, ctx.secctx[1])
                return
            fd = self._as_daemon(_open_beneath, pfd, name, os.O_PATH | os.O_CLOEXEC)
            try:
                self._as_daemon(self._in_proc_dir,
                                lambda t: os.setxattr(t, xname, ctx.secctx[1]), fd)
            finally:
                os.close(fd)
        except OSError:
            try:
                st = _lstat_at(pfd, name)
                remove = os.rmdir if stat.S_ISDIR(st.st_mode) else os.unlink
                self._as_daemon(lambda: remove(name, dir_fd=pfd))
            except OSError:
                pass
            raise

    @_member_retry(0)
    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self._writable()
        _check_name(name)
        self._as_caller(ctx)
        with self._inodes.pinned(parent) as pfd:
            self._check_beneath(pfd)
            os.unlink(name, dir_fd=pfd)

    @_member_retry(0)
    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self._writable()
        _check_name(name)
        self._as_caller(ctx)
        with self._inodes.pinned(parent) as pfd:
            self._check_beneath(pfd)
            os.rmdir(name, dir_fd=pfd)

    # Moving a directory to another parent also needs write permission on it (and, for an
    # exchange, on the other one): their groups count too.
    @_member_retry(0, 2, entries=((0, 1), (2, 3)))
    def rename(self, ctx: Context, olddir: int, oldname: bytes, newdir: int, newname: bytes,
               flags: int) -> None:
        self._writable()
        _check_name(oldname)
        _check_name(newname)
        if flags & ~(fa.RENAME_NOREPLACE | fa.RENAME_EXCHANGE | fa.RENAME_WHITEOUT):
            raise _err(errno.EINVAL)
        self._as_caller(ctx)
        with self._inodes.pinned(olddir) as ofd, self._inodes.pinned(newdir) as nfd:
            self._check_beneath(ofd)
            self._check_beneath(nfd)
            if flags:
                _check(_renameat2(ofd, oldname, nfd, newname, flags))
            else:
                os.rename(oldname, newname, src_dir_fd=ofd, dst_dir_fd=nfd)

    @_member_retry(0, 1)
    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        self._writable()
        _check_name(newname)
        self._as_caller(ctx)
        with self._inodes.pinned(nodeid) as ifd, self._inodes.pinned(newparent) as pfd:
            self._check_beneath(pfd)
            self._check_inode_beneath(ifd)
            # linkat(AT_SYMLINK_FOLLOW) on the magic link links the inode itself; AT_EMPTY_PATH
            # would need CAP_DAC_READ_SEARCH.
            os.link(str(ifd), newname, src_dir_fd=self._proc, dst_dir_fd=pfd,
                    follow_symlinks=True)
            return self._lookup_at(pfd, newname)

    # -- files -----------------------------------------------------------------------------
    @_member_retry(0)
    def open(self, ctx: Context, nodeid: int, flags: int, kill_priv: bool) -> tuple[int, int]:
        if self._readonly and (flags & os.O_ACCMODE != os.O_RDONLY
                               or flags & os.O_TRUNC or flags & _O_TMPFILE == _O_TMPFILE):
            raise _err(errno.EROFS)
        self._as_caller(ctx)
        oflags = self._open_flags(flags)
        with self._inodes.pinned(nodeid) as ifd:
            st = self._check_openable(ifd, False)
            if _open_changes(oflags):
                self._check_inode_beneath(ifd)
            fd, oflags = self._open_fd(ifd, oflags, flags)
            try:
                if oflags & os.O_TRUNC:
                    self._drop_mapped_caps(fd, False)
                if kill_priv and oflags & os.O_TRUNC:
                    self._kill_suidgid(fd)
                fh = self._handles.insert(fd, nodeid, oflags & 0xFFFFFFFF)
            except BaseException:
                os.close(fd)
                raise
        return fh, self._dir_open_flags if stat.S_ISDIR(st.st_mode) else self._file_open_flags

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               kill_priv: bool) -> tuple[Entry, int, int]:
        _check_name(name)
        if self._readonly:
            # Never create; an existing file may still be opened (read-only) -- virtiofsd.
            try:
                entry = self.lookup(ctx, parent, name)
            except FileNotFoundError:
                raise _err(errno.EROFS) from None
            return self._open_entry(ctx, entry, flags, kill_priv)
        self._as_caller(ctx)
        oflags = self._open_flags(flags) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        with self._inodes.pinned(parent) as pfd:
            self._check_beneath(pfd)
            try:
                fd = self._making(ctx, _open_beneath, pfd, name, oflags | os.O_CLOEXEC,
                                  mode & 0o7777)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                entry = self._lookup_at(pfd, name)
                return self._open_entry(ctx, entry, flags, kill_priv)
            try:
                self._label(ctx, pfd, name, fd)
                entry = self._lookup_at(pfd, name)
            except BaseException:
                os.close(fd)
                raise
        try:
            fh = self._handles.insert(fd, entry.nodeid,
                                     oflags & ~(os.O_CREAT | os.O_EXCL) & 0xFFFFFFFF)
        except BaseException:
            os.close(fd)
            self._inodes.forget(entry.nodeid, 1)
            raise
        return entry, fh, self._file_open_flags

    def _open_entry(self, ctx: Context, entry: Entry, flags: int,
                    kill_priv: bool) -> tuple[Entry, int, int]:
        """Open what CREATE found existing; the lookup it counted is undone on failure."""
        try:
            fh, open_flags = self.open(ctx, entry.nodeid, flags & ~(os.O_CREAT | os.O_EXCL),
                                       kill_priv)
        except BaseException:
            self._inodes.forget(entry.nodeid, 1)
            raise
        return entry, fh, open_flags

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int,
             bufs: Sequence[memoryview]) -> int:
        self._as_caller(ctx)
        fd = self._pin_handle(fh, nodeid)
        try:
            n = os.preadv(fd, bufs[:_IOV_MAX], _offset(offset))
            want = sum(map(len, bufs))
            total = n
            while n > 0 and total < want:
                # Short read before EOF (e.g. a signal or a pipe-like file): continue after it.
                n = os.preadv(fd, _skip(bufs, total)[:_IOV_MAX], offset + total)
                total += n
            return total
        finally:
            self._handles.release(fh)

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, bufs: Sequence[memoryview],
              write_flags: int, open_flags: int) -> int:
        self._writable()
        self._as_caller(ctx)
        # O_APPEND is stripped at open so mmap'd and kernel-cached (WRITE_CACHE) writes land at
        # the offset the guest chose; direct writes of an O_APPEND file append on the host too,
        # which keeps appends atomic when several guests share a file (virtiofsd).
        rwf = os.RWF_APPEND if open_flags & os.O_APPEND and not write_flags & fa.WRITE_CACHE else 0
        fd = self._pin_handle(fh, nodeid)
        try:
            self._drop_mapped_caps(fd, False)
            n = os.pwritev(fd, bufs[:_IOV_MAX], _offset(offset), rwf)
            want = sum(map(len, bufs))
            total = n
            while n > 0 and total < want:
                n = os.pwritev(fd, _skip(bufs, total)[:_IOV_MAX], offset + total, rwf)
                total += n
            if write_flags & fa.WRITE_KILL_SUIDGID:
                self._kill_suidgid(fd)
            return total
        finally:
            self._handles.release(fh)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        self._as_caller(ctx)
        fd = self._pin_handle(fh, nodeid)
        try:
            # The guest closed one of its descriptors: closing a duplicate does what that close
            # does on the host (reports write-back errors, drops POSIX locks) -- virtiofsd.
            os.close(os.dup(fd))
        finally:
            self._handles.release(fh)

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int, release_flags: int,
                lock_owner: int) -> None:
        self._pin_handle(fh, nodeid)
        try:
            self._handles.remove(fh)
        finally:
            self._handles.release(fh)  # the fd closes here, or when the last user unpins

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self._as_caller(ctx)
        fd = self._pin_handle(fh, nodeid)
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        finally:
            self._handles.release(fh)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int,
                  length: int) -> None:
        self._writable()
        self._as_caller(ctx)
        if offset >= 1 << 63 or length >= 1 << 63:
            raise _err(errno.EINVAL)
        fd = self._pin_handle(fh, nodeid)
        try:
            _check(_fallocate(fd, mode, offset, length))
        finally:
            self._handles.release(fh)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        self._as_caller(ctx)
        fd = self._pin_handle(fh, nodeid)
        try:
            return os.lseek(fd, offset, whence)
        finally:
            self._handles.release(fh)

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        self._writable()
        if flags:
            raise _err(errno.EINVAL)   # copy_file_range(2) defines no flags
        if off_in >= 1 << 63 or off_out >= 1 << 63:
            raise _err(errno.EINVAL)
        self._as_caller(ctx)
        fd_in = self._pin_handle(fh_in, nodeid_in)
        try:
            fd_out = self._pin_handle(fh_out, nodeid_out)
            try:
                return os.copy_file_range(fd_in, fd_out, length, off_in, off_out)
            finally:
                self._handles.release(fh_out)
        finally:
            self._handles.release(fh_in)

    # -- directories -----------------------------------------------------------------------
    @_member_retry(0)
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        self._as_caller(ctx)
        with self._inodes.pinned(nodeid) as ifd:
            self._check_openable(ifd, True)
            self._check_beneath(ifd)
            fd = self._reopen(ifd, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fh = self._handles.insert(fd, nodeid, os.O_RDONLY | os.O_DIRECTORY)
            except BaseException:
                os.close(fd)
                raise
        return fh, self._dir_open_flags

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int,
                size: int) -> list[DirEntry]:
        if size == 0:
            return []
        self._as_caller(ctx)
        # getdents64 records are never larger than FUSE's, so `size` bytes of them fill a reply
        # of `size`; a record too big for a tiny buffer would make getdents64 fail instead.
        bufsize = min(max(size, 4096), MAX_BUFFER_SIZE)
        if len(self._dirbuf) < bufsize:
            self._dirbuf = ctypes.create_string_buffer(bufsize)
        buf = self._dirbuf
        fd = self._pin_handle(fh, nodeid)
        try:
            self._check_beneath(fd)
            # The position is the open file description's, shared by every queue; the guest
            # serialises getdents on one open directory (f_pos lock), so no two READDIRs of
            # one fh race here.
            os.lseek(fd, _signed64(offset), os.SEEK_SET)
            n = _check(_getdents64(fd, buf, bufsize))
        finally:
            self._handles.release(fh)
        data = buf.raw[:n]
        out: list[DirEntry] = []
        pos = 0
        unpack = _DIRENT64.unpack_from
        while pos < n:
            ino, off, reclen, typ = unpack(data, pos)
            end = data.find(b"\0", pos + 19, pos + reclen)
            name = data[pos + 19 : end if end >= 0 else pos + reclen]
            out.append(DirEntry(ino, off & 0xFFFFFFFFFFFFFFFF, typ, name))
            pos += reclen
        return out

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self.release(ctx, nodeid, fh, flags, 0, 0)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self.fsync(ctx, nodeid, fh, datasync)

    # -- whole filesystem, permissions, xattrs ---------------------------------------------
    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        self._as_caller(ctx)
        with self._inodes.pinned(nodeid) as fd:
            return os.fstatvfs(fd)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        self._as_caller(ctx)
        with self._inodes.pinned(nodeid) as ifd:
            # syncfs(2) needs a real open file; reopen the inode itself (it may sit on a
            # submount) unless it is not safe to open, then the root's filesystem is synced.
            try:
                self._check_openable(ifd, False)
            except OSError:
                with self._inodes.pinned(self._inodes.ROOT) as rfd:
                    fd = self._reopen(rfd, os.O_RDONLY | os.O_DIRECTORY)
            else:
                fd = self._reopen(ifd, os.O_RDONLY | os.O_NONBLOCK)
            try:
                _check(_syncfs(fd))
            finally:
                os.close(fd)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        mask &= os.R_OK | os.W_OK | os.X_OK
        if mask & os.W_OK and self._readonly:
            raise _err(errno.EROFS)
        self._as_caller(ctx)
        with self._inodes.pinned(nodeid) as fd:
            # AT_EACCESS: check with the fsuid/fsgid, groups and capabilities now in force,
            # i.e. the caller's (virtiofsd re-implements the same mode-bit rules by hand).
            _check(_faccessat(self._proc, str(fd).encode(), mask, AT_EACCESS))

    def _host_xattr(self, name: bytes) -> bytes:
        """The host's name for the guest's xattr `name`: ENOTSUP for the ACL xattrs without
        --posix-acl (virtiofsd: a name that is a prefix of theirs), then the --xattrmap."""
        if not self._posix_acl and any(acl.startswith(name) for acl in _ACL_NAMES):
            raise _err(errno.ENOTSUP)
        return self._xmap.to_host(name) if self._xmap is not None else name

    def _guest_xattrs(self, names: list[str]) -> list[bytes]:
        """What LISTXATTR shows of the host's names: mapped, ACLs hidden without --posix-acl."""
        out = []
        for n in map(os.fsencode, names):
            guest = self._xmap.to_guest(n) if self._xmap is not None else n
            if not guest or (not self._posix_acl
                             and any(acl.startswith(guest) for acl in _ACL_NAMES)):
                continue
            out.append(guest)
        return out

    def _drop_mapped_caps(self, fd: int, o_path: bool) -> None:
        """Remove the renamed security.capability from the inode behind `fd`, as the host kernel
        removes the real one on a write, truncate or chown (only with an --xattrmap that
        renames it)."""
        name = self._caps_name
        if name is None:
            return
        try:
            if o_path:
                self._as_daemon(self._in_proc_dir, lambda t: os.removexattr(t, name), fd)
            else:
                self._as_daemon(os.removexattr, fd, name)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise

    def _xattr_call(self, nodeid: int, fn: Callable[[int | str], T],
                    check: Callable[[int], None] | None = None) -> T:
        """fn(target) on a re-opened fd for files and directories, else on the magic link;
        a change (`check` given) runs check(inode fd) first."""
        if not self.options.xattr:
            raise _err(errno.ENOSYS)
        if check is not None:
            self._writable()
        with self._inodes.pinned(nodeid) as ifd:
            if check is not None:
                check(ifd)
            mode = os.fstat(ifd).st_mode
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                # Opened as the daemon: the xattr calls check the caller's permission
                # themselves (xattr_permission()), and LISTXATTR needs none -- reading the
                # file's data is not what is asked.
                fd = self._as_daemon(self._reopen, ifd, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    return fn(fd)
                finally:
                    os.close(fd)
            return self._in_proc_dir(fn, ifd)

    @_member_retry(0)
    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int,
                 setxattr_flags: int) -> None:
        self._as_caller(ctx)
        if not self.options.xattr:
            raise _err(errno.ENOSYS)
        name = self._host_xattr(name)

        def check(ifd: int) -> None:
            self._check_xattr_change(ctx, ifd, name, False)
            if (self._posix_acl and setxattr_flags & fa.SETXATTR_ACL_KILL_SGID
                    and name == _ACL_NAMES[0]):
                # The guest asks to drop set-group-ID with the new access ACL, as
                # posix_acl_update_mode() does for a caller outside the file's group.
                mode = os.fstat(ifd).st_mode
                if mode & stat.S_ISGID:
                    self._as_daemon(self._chmod_inode, ifd, stat.S_IMODE(mode) & ~stat.S_ISGID)

        self._xattr_call(nodeid, lambda t: os.setxattr(t, name, value, flags), check)

    @_member_retry(0)
    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        self._as_caller(ctx)
        if not self.options.xattr:
            raise _err(errno.ENOSYS)
        try:
            name = self._host_xattr(name)
        except PermissionError:
            # A name the map refuses reads as absent (virtiofsd).
            raise _err(errno.ENODATA) from None
        value = self._xattr_call(nodeid, lambda t: os.getxattr(t, name))
        if size == 0:
            return len(value)
        if len(value) > size:
            raise _err(errno.ERANGE)
        return value

    @_member_retry(0)
    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        self._as_caller(ctx)
        names = self._xattr_call(nodeid, os.listxattr)
        raw = sum(len(os.fsencode(n)) + 1 for n in names)
        # The size asked for and checked is the host's list, before mapping and hiding (what
        # virtiofsd answers): never smaller than what is sent.
        if size == 0:
            return raw
        if raw > size:
            raise _err(errno.ERANGE)
        return b"".join(n + b"\0" for n in self._guest_xattrs(names))

    @_member_retry(0)
    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        self._as_caller(ctx)
        if not self.options.xattr:
            raise _err(errno.ENOSYS)
        name = self._host_xattr(name)
        self._xattr_call(nodeid, lambda t: os.removexattr(t, name),
                         lambda ifd: self._check_xattr_change(ctx, ifd, name, True))


# openat2(2) resolve flags (linux/openat2.h).
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_openat2 = native.lib.vfs_openat2
_openat2_ok: bool | None = None


def _have_openat2() -> bool:
    """Asked once: a kernel without openat2 (before 5.6) says ENOSYS, or EPERM behind some
    container runtimes' filters; one with it refuses the empty path otherwise."""
    global _openat2_ok
    if _openat2_ok is None:
        _openat2(-1, b"", 0, 0, 0)
        _openat2_ok = native.ffi.errno not in (errno.ENOSYS, errno.EPERM)
    return _openat2_ok


def _open_beneath(dir_fd: int, name: bytes, flags: int, mode: int = 0) -> int:
    """openat(dir_fd, name, flags | O_NOFOLLOW) that the kernel itself keeps beneath `dir_fd`
    (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) where it can; an
    O_PATH|O_NOFOLLOW open of a symlink still yields the link itself (openat2(2))."""
    flags |= os.O_NOFOLLOW
    if not _have_openat2():
        return os.open(name, flags, mode, dir_fd=dir_fd)
    fd = _openat2(dir_fd, name, flags, mode, _RESOLVE)
    if fd < 0:
        err = native.ffi.errno
        raise OSError(err, os.strerror(err), name)
    return fd


def _open_changes(oflags: int) -> bool:
    """Whether an OPEN with these (signed, stripped) flags can change the inode: writing,
    truncating, or an O_TMPFILE made in a directory."""
    return (oflags & os.O_ACCMODE != os.O_RDONLY or bool(oflags & os.O_TRUNC)
            or oflags & _O_TMPFILE == _O_TMPFILE)


def _skip(bufs: Sequence[memoryview], n: int) -> list[memoryview]:
    """`bufs` without their first `n` bytes."""
    out: list[memoryview] = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out
