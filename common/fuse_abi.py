"""FUSE kernel ABI 7.45 as data (linux include/uapi/linux/fuse.h; reference/protocol.md section 4).

Opcodes and flag sets are enums; every wire struct is a precompiled little-endian
`struct.Struct` (virtio-fs FUSE is little-endian on every host this daemon supports, protocol.md
section 0).  The headers and the fixed request/reply bodies that other modules decode or build
also have a NamedTuple face with `unpack`/`pack`; the hot path may use the raw Structs directly.
Padding and reserved fields are `x` bytes in the formats and do not appear in the tuples.

No I/O here.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import NamedTuple

KERNEL_VERSION = 7
# The minor this server speaks and replies in INIT (protocol.md 4.1: both sides then use the
# smaller one).  Requests of every opcode up to 7.45 are either served or answered ENOSYS.
KERNEL_MINOR_VERSION = 45
# Oldest kernel minor accepted; older ones get EPROTO (virtiofsd does the same, and it lets the
# reply builders ignore the pre-7.27 compat sizes).
MIN_KERNEL_MINOR_VERSION = 27

ROOT_ID = 1
MIN_READ_BUFFER = 8192
UNIQUE_RESEND = 1 << 63
INVALID_UIDGID = 0xFFFFFFFF
NAME_MAX = 255
# FUSE_INIT sent by a driver of the other endianness (protocol.md 3.2).
INIT_BSWAP_RESERVED = 26 << 24

# Compat sizes (fuse.h); only the ones a >= 7.27 peer can still send matter here.
COMPAT_ENTRY_OUT_SIZE = 120
COMPAT_ATTR_OUT_SIZE = 96
COMPAT_MKNOD_IN_SIZE = 8
COMPAT_WRITE_IN_SIZE = 24
COMPAT_STATFS_SIZE = 48
COMPAT_SETXATTR_IN_SIZE = 8
COMPAT_INIT_OUT_SIZE = 8
COMPAT_22_INIT_OUT_SIZE = 24
# fuse_init_in before 7.36: major, minor, max_readahead, flags (flags2 follows only with INIT_EXT).
COMPAT_INIT_IN_SIZE = 16


class Opcode(enum.IntEnum):
    """`enum fuse_opcode` (protocol.md 4.3). 7 and 19 are unused."""

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53
    CUSE_INIT = 4096


class InitFlag(enum.IntFlag):
    """INIT flags, 64 bits: bits 32+ travel in `flags2` when INIT_EXT is set (protocol.md 4.5)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


class SetattrValid(enum.IntFlag):
    """`fuse_setattr_in.valid` (FATTR_*)."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


class OpenOutFlag(enum.IntFlag):
    """`fuse_open_out.open_flags` (FOPEN_*)."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7


class AttrFlag(enum.IntFlag):
    """`fuse_attr.flags`."""

    SUBMOUNT = 1 << 0
    DAX = 1 << 1


class ExtType(enum.IntEnum):
    """`enum fuse_ext_type`: 0..31 are the `nr_secctx` of a security-context header."""

    MAX_NR_SECCTX = 31
    GROUPS = 32


# fuse_open_in.open_flags / fuse_create_in.open_flags
OPEN_KILL_SUIDGID = 1 << 0
# fuse_release_in.release_flags
RELEASE_FLUSH = 1 << 0
RELEASE_FLOCK_UNLOCK = 1 << 1
# fuse_getattr_in.getattr_flags / fuse_statx_in.getattr_flags
GETATTR_FH = 1 << 0
# fuse_lk_in.lk_flags
LK_FLOCK = 1 << 0
# fuse_write_in.write_flags
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
# fuse_read_in.read_flags
READ_LOCKOWNER = 1 << 1
# fuse_fsync_in.fsync_flags
FSYNC_FDATASYNC = 1 << 0
# fuse_setxattr_in.setxattr_flags
SETXATTR_ACL_KILL_SGID = 1 << 0
# fuse_setupmapping_in.flags
SETUPMAPPING_FLAG_WRITE = 1 << 0
SETUPMAPPING_FLAG_READ = 1 << 1
# fuse_rename2_in.flags: renameat2(2) values (linux/fs.h), passed through by the kernel.
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2


class NotifyCode(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8
    PRUNE = 9


# --- Raw structs (Appendix A).  fuse_attr times are declared u64 in fuse.h but the kernel
# stores them in signed time64_t; packing them as i64 gives the same bytes for every valid
# time and keeps pre-1970 timestamps representable.
IN_HEADER = struct.Struct("<IIQQIIIH2x")
OUT_HEADER = struct.Struct("<IiQ")
INIT_IN = struct.Struct("<IIIII44x")
INIT_IN_COMPAT = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")
ATTR_OUT = struct.Struct("<QI4x" + ATTR.format[1:])
ATTR_OUT_HEAD = struct.Struct("<QI4x")
GETATTR_IN = struct.Struct("<I4xQ")
SETATTR_IN = struct.Struct("<I4xQQQQQQIIII4xII4x")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
OPEN_OUT = struct.Struct("<QIi")
READ_IN = struct.Struct("<QQIIQI4x")
WRITE_IN = struct.Struct("<QQIIQI4x")
WRITE_OUT = struct.Struct("<I4x")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<Q4x4xQ")
FSYNC_IN = struct.Struct("<QI4x")
KSTATFS = struct.Struct("<QQQQQIII4x24x")
STATFS_OUT = KSTATFS
FORGET_IN = struct.Struct("<Q")
FORGET_ONE = struct.Struct("<QQ")
BATCH_FORGET_IN = struct.Struct("<I4x")
MKNOD_IN = struct.Struct("<III4x")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QI4x")
LINK_IN = struct.Struct("<Q")
SETXATTR_IN = struct.Struct("<III4x")
SETXATTR_IN_COMPAT = struct.Struct("<II")
GETXATTR_IN = struct.Struct("<I4x")
GETXATTR_OUT = struct.Struct("<I4x")
FILE_LOCK = struct.Struct("<QQII")
LK_IN = struct.Struct("<QQQQIII4x")
LK_OUT = FILE_LOCK
ACCESS_IN = struct.Struct("<I4x")
INTERRUPT_IN = struct.Struct("<Q")
BMAP_IN = struct.Struct("<QI4x")
BMAP_OUT = struct.Struct("<Q")
IOCTL_IN = struct.Struct("<QIIQII")
IOCTL_OUT = struct.Struct("<iIII")
POLL_IN = struct.Struct("<QQII")
POLL_OUT = struct.Struct("<I4x")
FALLOCATE_IN = struct.Struct("<QQQI4x")
LSEEK_IN = struct.Struct("<QqI4x")
LSEEK_OUT = struct.Struct("<q")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")
COPY_FILE_RANGE_OUT = struct.Struct("<Q")
SETUPMAPPING_IN = struct.Struct("<QQQQQ")
REMOVEMAPPING_IN = struct.Struct("<I")
REMOVEMAPPING_ONE = struct.Struct("<QQ")
SYNCFS_IN = struct.Struct("<8x")
STATX_IN = struct.Struct("<I4xQII")
SX_TIME = struct.Struct("<qI4x")
STATX = struct.Struct("<IIQIIIH2xQQQQqI4xqI4xqI4xqI4xIIII112x")
STATX_OUT = struct.Struct("<QII16x" + STATX.format[1:])
DIRENT = struct.Struct("<QQII")
EXT_HEADER = struct.Struct("<II")
SECCTX_HEADER = struct.Struct("<II")
SECCTX = struct.Struct("<I4x")
SUPP_GROUPS = struct.Struct("<I")
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")
NOTIFY_DELETE_OUT = struct.Struct("<QQI4x")
NOTIFY_STORE_OUT = struct.Struct("<QQI4x")
NOTIFY_RETRIEVE_OUT = struct.Struct("<QQQI4x")
NOTIFY_RETRIEVE_IN = struct.Struct("<QQIIQQ")

NAME_OFFSET = DIRENT.size  # 24
NAME_OFFSET_DIRENTPLUS = ENTRY_OUT.size + DIRENT.size  # 152


# --- Tuple faces for the structs other modules decode or build.


class InHeader(NamedTuple):
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int

    @classmethod
    def unpack(cls, data) -> InHeader:
        return cls._make(IN_HEADER.unpack_from(data))

    def pack(self) -> bytes:
        return IN_HEADER.pack(*self)

    def is_valid(self) -> bool:
        """Syntax only: the length covers the header and the extension area it announces."""
        return self.len >= IN_HEADER.size + self.total_extlen * 8


class OutHeader(NamedTuple):
    len: int
    error: int
    unique: int

    @classmethod
    def unpack(cls, data) -> OutHeader:
        return cls._make(OUT_HEADER.unpack_from(data))

    def pack(self) -> bytes:
        return OUT_HEADER.pack(*self)

    def is_valid(self) -> bool:
        """protocol.md 4.2: error is 0 or a negated errno above -512; len covers the header."""
        return self.len >= OUT_HEADER.size and -512 < self.error <= 0


class InitIn(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int
    flags2: int

    @classmethod
    def unpack(cls, data) -> InitIn:
        """Accepts the 16-byte pre-7.36 body (flags2 = 0) and the full 64-byte one."""
        if len(data) < INIT_IN.size:
            return cls(*INIT_IN_COMPAT.unpack_from(data), 0)
        return cls._make(INIT_IN.unpack_from(data))

    def pack(self) -> bytes:
        return INIT_IN.pack(*self)

    @property
    def all_flags(self) -> int:
        """flags | flags2 << 32; flags2 only counts when INIT_EXT is set (protocol.md 4.4)."""
        if self.flags & InitFlag.INIT_EXT:
            return self.flags | (self.flags2 << 32)
        return self.flags


class InitOut(NamedTuple):
    major: int
    minor: int
    max_readahead: int = 0
    flags: int = 0
    max_background: int = 0
    congestion_threshold: int = 0
    max_write: int = 0
    time_gran: int = 0
    max_pages: int = 0
    map_alignment: int = 0
    flags2: int = 0
    max_stack_depth: int = 0
    request_timeout: int = 0

    @classmethod
    def unpack(cls, data) -> InitOut:
        return cls._make(INIT_OUT.unpack_from(data))

    def pack(self) -> bytes:
        return INIT_OUT.pack(*self)

    @property
    def all_flags(self) -> int:
        if self.flags & InitFlag.INIT_EXT:
            return self.flags | (self.flags2 << 32)
        return self.flags


class Attr(NamedTuple):
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int

    @classmethod
    def unpack(cls, data, offset: int = 0) -> Attr:
        return cls._make(ATTR.unpack_from(data, offset))

    def pack(self) -> bytes:
        return ATTR.pack(*self)


class EntryOut(NamedTuple):
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: Attr

    @classmethod
    def unpack(cls, data, offset: int = 0) -> EntryOut:
        head = ENTRY_OUT_HEAD.unpack_from(data, offset)
        return cls(*head, Attr.unpack(data, offset + ENTRY_OUT_HEAD.size))

    def pack(self) -> bytes:
        return ENTRY_OUT.pack(*self[:6], *self.attr)


class AttrOut(NamedTuple):
    attr_valid: int
    attr_valid_nsec: int
    attr: Attr

    @classmethod
    def unpack(cls, data) -> AttrOut:
        head = ATTR_OUT_HEAD.unpack_from(data)
        return cls(*head, Attr.unpack(data, ATTR_OUT_HEAD.size))

    def pack(self) -> bytes:
        return ATTR_OUT.pack(self.attr_valid, self.attr_valid_nsec, *self.attr)


class OpenIn(NamedTuple):
    flags: int
    open_flags: int

    @classmethod
    def unpack(cls, data) -> OpenIn:
        return cls._make(OPEN_IN.unpack_from(data))

    def pack(self) -> bytes:
        return OPEN_IN.pack(*self)


class CreateIn(NamedTuple):
    flags: int
    mode: int
    umask: int
    open_flags: int

    @classmethod
    def unpack(cls, data) -> CreateIn:
        return cls._make(CREATE_IN.unpack_from(data))

    def pack(self) -> bytes:
        return CREATE_IN.pack(*self)


class OpenOut(NamedTuple):
    fh: int
    open_flags: int
    backing_id: int = 0

    @classmethod
    def unpack(cls, data, offset: int = 0) -> OpenOut:
        return cls._make(OPEN_OUT.unpack_from(data, offset))

    def pack(self) -> bytes:
        return OPEN_OUT.pack(*self)


class ReadIn(NamedTuple):
    """fuse_read_in; also the body of READDIR/READDIRPLUS (offset = cookie)."""

    fh: int
    offset: int
    size: int
    read_flags: int = 0
    lock_owner: int = 0
    flags: int = 0

    @classmethod
    def unpack(cls, data) -> ReadIn:
        return cls._make(READ_IN.unpack_from(data))

    def pack(self) -> bytes:
        return READ_IN.pack(*self)


class WriteIn(NamedTuple):
    fh: int
    offset: int
    size: int
    write_flags: int = 0
    lock_owner: int = 0
    flags: int = 0

    @classmethod
    def unpack(cls, data) -> WriteIn:
        return cls._make(WRITE_IN.unpack_from(data))

    def pack(self) -> bytes:
        return WRITE_IN.pack(*self)


class SetattrIn(NamedTuple):
    valid: int
    fh: int = 0
    size: int = 0
    lock_owner: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    atimensec: int = 0
    mtimensec: int = 0
    ctimensec: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0

    @classmethod
    def unpack(cls, data) -> SetattrIn:
        return cls._make(SETATTR_IN.unpack_from(data))

    def pack(self) -> bytes:
        return SETATTR_IN.pack(*self)


class Kstatfs(NamedTuple):
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int

    @classmethod
    def unpack(cls, data) -> Kstatfs:
        return cls._make(KSTATFS.unpack_from(data))

    def pack(self) -> bytes:
        return KSTATFS.pack(*self)


class Dirent(NamedTuple):
    ino: int
    off: int
    type: int
    name: bytes


class DirentPlus(NamedTuple):
    entry: EntryOut
    dirent: Dirent


# --- Helpers


def rec_align(n: int) -> int:
    """FUSE_REC_ALIGN: directory records and extensions are padded to 8 bytes."""
    return (n + 7) & ~7


def dirent_size(namelen: int) -> int:
    return rec_align(NAME_OFFSET + namelen)


def direntplus_size(namelen: int) -> int:
    return rec_align(NAME_OFFSET_DIRENTPLUS + namelen)


_ZEROS = bytes(8)


def pack_dirent(ino: int, off: int, typ: int, name: bytes) -> bytes:
    """One READDIR record: fuse_dirent + name (no NUL) + zero padding (protocol.md 4.8)."""
    n = len(name)
    return b"".join((DIRENT.pack(ino, off, n, typ), name, _ZEROS[: -(NAME_OFFSET + n) & 7]))


def pack_direntplus(entry_out: bytes, ino: int, off: int, typ: int, name: bytes) -> bytes:
    """One READDIRPLUS record: a packed fuse_entry_out followed by the READDIR record."""
    return entry_out + pack_dirent(ino, off, typ, name)


def unpack_dirents(data) -> list[Dirent]:
    """Parse a READDIR reply body; raises ValueError on a malformed record."""
    out: list[Dirent] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < NAME_OFFSET:
            raise ValueError("truncated fuse_dirent")
        ino, off, namelen, typ = DIRENT.unpack_from(data, pos)
        if pos + NAME_OFFSET + namelen > end:
            raise ValueError("fuse_dirent name runs past the buffer")
        name = bytes(data[pos + NAME_OFFSET : pos + NAME_OFFSET + namelen])
        out.append(Dirent(ino, off, typ, name))
        pos += dirent_size(namelen)
    return out


def unpack_direntplus(data) -> list[DirentPlus]:
    """Parse a READDIRPLUS reply body; raises ValueError on a malformed record."""
    out: list[DirentPlus] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < NAME_OFFSET_DIRENTPLUS:
            raise ValueError("truncated fuse_direntplus")
        entry = EntryOut.unpack(data, pos)
        ino, off, namelen, typ = DIRENT.unpack_from(data, pos + ENTRY_OUT.size)
        start = pos + NAME_OFFSET_DIRENTPLUS
        if start + namelen > end:
            raise ValueError("fuse_direntplus name runs past the buffer")
        out.append(DirentPlus(entry, Dirent(ino, off, typ, bytes(data[start : start + namelen]))))
        pos += direntplus_size(namelen)
    return out


def iter_extensions(data) -> Iterator[tuple[int, memoryview]]:
    """Walk a request's extension area (its last total_extlen*8 bytes, protocol.md 4.9).

    Yields (type, payload-after-the-8-byte-header).  For a security context the type slot holds
    nr_secctx (0..31).  Raises ValueError if a record's size is not 8-aligned, is shorter than
    its header, or runs past the area.
    """
    mv = memoryview(data)
    pos, end = 0, len(mv)
    while pos < end:
        if end - pos < EXT_HEADER.size:
            raise ValueError("truncated extension header")
        size, typ = EXT_HEADER.unpack_from(mv, pos)
        if size < EXT_HEADER.size or size & 7 or size > end - pos:
            raise ValueError(f"bad extension size {size}")
        yield typ, mv[pos + EXT_HEADER.size : pos + size]
        pos += size


def unpack_supp_groups(payload) -> tuple[int, ...]:
    """The gids of a FUSE_EXT_GROUPS payload; raises ValueError if nr_groups overruns it."""
    if len(payload) < SUPP_GROUPS.size:
        raise ValueError("truncated fuse_supp_groups")
    (n,) = SUPP_GROUPS.unpack_from(payload)
    if SUPP_GROUPS.size + 4 * n > len(payload):
        raise ValueError("fuse_supp_groups count runs past the extension")
    return struct.unpack_from(f"<{n}I", payload, SUPP_GROUPS.size)


def pack_supp_groups(groups: tuple[int, ...] | list[int]) -> bytes:
    """A complete FUSE_EXT_GROUPS extension record (header + payload + padding)."""
    body = SUPP_GROUPS.pack(len(groups)) + struct.pack(f"<{len(groups)}I", *groups)
    size = rec_align(EXT_HEADER.size + len(body))
    return EXT_HEADER.pack(size, ExtType.GROUPS) + body + bytes(size - EXT_HEADER.size - len(body))


def pack_secctx(name: bytes, value: bytes) -> bytes:
    """A complete security context extension with one context (protocol.md 4.9): the header,
    fuse_secctx, the xattr name and the value, padded to 8 bytes."""
    body = SECCTX.pack(len(value)) + name + b"\0" + value
    size = rec_align(SECCTX_HEADER.size + len(body))
    return SECCTX_HEADER.pack(size, 1) + body + bytes(size - SECCTX_HEADER.size - len(body))
