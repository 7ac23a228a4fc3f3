"""FUSE request decoding, dispatch and replies (cf. virtiofsd server.rs).

One call of `FuseServer.handle` serves one descriptor chain: it decodes `fuse_in_header` and the
opcode's body from the Reader, calls the Filesystem, and writes `fuse_out_header` + body into
the Writer (protocol.md 3.2, 4.2).  It never raises for anything the guest sent:

* a chain shorter than fuse_in_header cannot be answered (there is no `unique`): it is dropped
  (used length 0) with one warning per worker;
* `in.len` smaller than the header, or larger than the readable bytes, is a framing error:
  EIO (the request cannot be decoded at all, so it is not an argument error);
* `in.len` above max_write plus a page: ENOMEM (virtiofsd);
* a body too short for the opcode's struct, a name not NUL-terminated or with interior NULs,
  malformed extensions: EINVAL;
* an OSError from the filesystem becomes `-errno`, a number too large for the C call it
  feeds EINVAL; anything else EIO plus one log line naming the opcode; unknown or unserved
  opcodes ENOSYS;
* requests before FUSE_INIT get EIO (libfuse refuses them too); FORGET, BATCH_FORGET,
  INTERRUPT and NOTIFY_REPLY never get a reply (used length 0);
* a reply that does not fit the writable buffers is answered with EIO if at least the header
  fits, else nothing is written (used length 0); the first such reply per worker is logged.

Session state (started, negotiated minor and flags) lives in a `Session`: a word of shared
memory, because FUSE_INIT arrives on one request queue while every queue worker -- and a worker
respawned later -- must see the same session (protocol.md 3.2: all queues share one FUSE
session).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os
import struct
import time

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common import native, shm
from pyvirtiofsd.common.fuse_abi import InitFlag, Opcode
from pyvirtiofsd.common.idmap import IdMap
from pyvirtiofsd.common.stats import QueueStats
from pyvirtiofsd.worker.chain import ChainTooShort, Reader, Writer
from pyvirtiofsd.worker.dax import DaxClient
from pyvirtiofsd.worker.filesystem import Context, Entry, Filesystem, FsOptions
from pyvirtiofsd.worker.locks import Blocked

log = logging.getLogger("pyvirtiofsd.fuse")

MAX_WRITE = 1 << 20
_MAX_REQUEST = MAX_WRITE + 0x1000      # virtiofsd: MAX_BUFFER_SIZE + FUSE_BUFFER_HEADER_SIZE
_MAX_PAGES = (MAX_WRITE - 1) // mmap.PAGESIZE + 1
_NGROUPS_MAX = 65536
_COPY_RANGE_MAX_32 = 0xFFFFF000        # what fits fuse_write_out.size (libfuse clamps the same)

# INIT flags this server always accepts when the kernel offers them (virtiofsd 1.13's set minus
# ALLOW_IDMAP: with it the kernel may send uid/gid 0xffffffff, and this server runs every
# request with the caller's ids).  The filesystem adds what its options enable (init()).
SERVER_INIT_FLAGS = int(
    InitFlag.ASYNC_READ | InitFlag.PARALLEL_DIROPS | InitFlag.BIG_WRITES
    | InitFlag.AUTO_INVAL_DATA | InitFlag.ASYNC_DIO | InitFlag.HAS_IOCTL_DIR
    | InitFlag.ATOMIC_O_TRUNC | InitFlag.MAX_PAGES | InitFlag.INIT_EXT
    | InitFlag.CREATE_SUPP_GROUP)

_IN = fa.IN_HEADER
_INVALID_ID = fa.INVALID_UIDGID
_ALLOW_IDMAP = int(InitFlag.ALLOW_IDMAP)
_IN_SIZE = _IN.size
_OUT_PACK = fa.OUT_HEADER.pack
_OUT_SIZE = fa.OUT_HEADER.size
_ENTRY_PACK = fa.ENTRY_OUT.pack
_NO_REPLY = frozenset((Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT,
                       Opcode.NOTIFY_REPLY))
_NS = 1_000_000_000
# Requests whose caller becomes the owner of a new inode (IdTranslation).
_OWNING = frozenset((Opcode.CREATE, Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK))
_now_ns = time.monotonic_ns


class _Waiting:
    """A handler's answer for a lock request left waiting (take_blocked())."""


_WAITING = _Waiting()
# What an opcode handler returns: the reply body, the length of a body it already placed in the
# Writer after a reserved header (READ), _WAITING, or None for no reply at all.
_Result = bytes | int | _Waiting | None
_INIT = int(Opcode.INIT)
_WRITE = int(Opcode.WRITE)
_WRITE_IN_SIZE = fa.WRITE_IN.size
_WRITE_SIZE_OFF = 16                   # fuse_write_in.size
_MAP_FLAGS = fa.SETUPMAPPING_FLAG_READ | fa.SETUPMAPPING_FLAG_WRITE
_REMOVEMAPPING_MAX = mmap.PAGESIZE // fa.REMOVEMAPPING_ONE.size   # FUSE_REMOVEMAPPING_MAX_ENTRY
# log2 of the alignment of SETUPMAPPING's offsets (INIT's map_alignment): a page, which the
# front-end's mmap needs; the Linux driver's 2 MiB ranges are multiples of it.
DAX_MAP_ALIGNMENT = mmap.PAGESIZE.bit_length() - 1
# handle()'s answer for a request that waits for a lock: no reply yet (take_blocked()).
PENDING = -1


class Session:
    """The FUSE session shared by every queue worker.

    One 8-byte word in an anonymous MAP_SHARED page: bit 0 started, bits 1..8 the negotiated
    minor, bits 16..63 the negotiated INIT flags.  It is written by one aligned store, so a
    reader on another queue sees either the old or the new session, never a mix.  Create it
    before the workers are forked.
    """

    def __init__(self, fd: int | None = None, keep_fd: bool = False) -> None:
        """A new session (keep_fd: with its memfd, for a live upgrade), or (`fd`) the one in
        that memfd."""
        if fd is None:
            self.fd, self._mm = shm.create(mmap.PAGESIZE, "session", keep_fd)
        else:
            self.fd, self._mm = fd, shm.attach(fd)
        self._base = native.address_of(self._mm)
        self._word = native.u64_ptr(self._base, 0)

    @property
    def started(self) -> bool:
        return bool(self._word[0] & 1)

    @property
    def minor(self) -> int:
        return (self._word[0] >> 1) & 0xFF

    @property
    def flags(self) -> int:
        return self._word[0] >> 16

    def start(self, minor: int, flags: int) -> None:
        self._word[0] = 1 | (minor & 0xFF) << 1 | (flags & ((1 << 48) - 1)) << 16

    def stop(self) -> None:
        self._word[0] = 0

    # The DAX window's size in bytes, 0 for none: the supervisor writes it when the front-end
    # has a window and a back-end channel (supervisor/dax.py), INIT reads it.
    @property
    def dax_window(self) -> int:
        return int(self._word[1])

    @dax_window.setter
    def dax_window(self, size: int) -> None:
        self._word[1] = size

    @property
    def address(self) -> int:
        """Where the word is (the native engine reads it)."""
        return int(native.ffi.cast("uintptr_t", self._word))


# The session of every FuseServer not given one.  Made when this module is first imported --
# by the supervisor, before it forks -- so all workers, respawned ones included, share it.


def _einval(what: str) -> OSError:
    return OSError(errno.EINVAL, what)


def _split_time(t: float) -> tuple[int, int]:
    s = int(t)
    return s, int((t - s) * _NS)


class IdTranslation:
    """--translate-uid/--translate-gid at the wire (common/idmap.py): the ids a request carries
    become host ids before the filesystem sees them, the owners in every reply guest ids.

    Where a request would make a guest id own something on the host -- the caller of CREATE,
    MKNOD, MKDIR and SYMLINK, the owner SETATTR gives -- a forbidden id fails the request with
    EIO, as virtiofsd answers it (its error carries no errno).  Any other request of a caller
    with a forbidden id runs as the overflow id (nobody), as an id without a mapping does in a
    user namespace: virtiofsd runs those as itself, this daemon never does.
    """

    __slots__ = ("uids", "gids")

    def __init__(self, uids: IdMap, gids: IdMap) -> None:
        self.uids = uids
        self.gids = gids

    @classmethod
    def of(cls, options: FsOptions | None) -> IdTranslation | None:
        if options is None or not (options.translate_uid or options.translate_gid):
            return None
        return cls(IdMap(options.translate_uid, "UID"), IdMap(options.translate_gid, "GID"))

    def caller(self, uid: int, gid: int, pid: int, groups: tuple[int, ...],
               owner: bool) -> Context:
        if owner:
            return Context(self.uids.to_host(uid), self.gids.to_host(gid), pid, 0,
                           tuple(map(self.gids.to_host, groups)))
        return Context(self.uids.to_host_or_overflow(uid), self.gids.to_host_or_overflow(gid),
                       pid, 0, tuple(map(self.gids.to_host_or_overflow, groups)))


def attr_fields(st: os.stat_result, flags: int = 0, ids: IdTranslation | None = None) -> tuple:
    """fuse_attr fields (fa.ATTR order) of a stat result, owners as the guest sees them."""
    a_s, a_ns = divmod(st.st_atime_ns, _NS)
    m_s, m_ns = divmod(st.st_mtime_ns, _NS)
    c_s, c_ns = divmod(st.st_ctime_ns, _NS)
    # st_rdev in glibc's encoding equals the kernel's 32-bit new_encode_dev() for every
    # major < 4096 and minor < 2**20, which is what fuse_attr.rdev carries.
    uid, gid = st.st_uid, st.st_gid
    if ids is not None:
        uid, gid = ids.uids.to_guest(uid), ids.gids.to_guest(gid)
    return (st.st_ino, st.st_size, st.st_blocks, a_s, m_s, c_s, a_ns, m_ns, c_ns, st.st_mode,
            st.st_nlink, uid, gid, st.st_rdev & 0xFFFFFFFF, st.st_blksize, flags)


def pack_entry(e: Entry, ids: IdTranslation | None = None) -> bytes:
    es, ens = _split_time(e.entry_timeout)
    as_, ans = _split_time(e.attr_timeout)
    return _ENTRY_PACK(e.nodeid, e.generation, es, as_, ens, ans,
                       *attr_fields(e.attr, e.attr_flags, ids))


def _unpack(st: struct.Struct, body: bytes) -> tuple:
    if len(body) < st.size:
        raise _einval(f"body of {len(body)} bytes, {st.size} expected")
    return st.unpack_from(body)


def _name(payload: bytes) -> bytes:
    """Exactly one NUL-terminated name."""
    if not payload or payload[-1] != 0:
        raise _einval("name not NUL-terminated")
    name = payload[:-1]
    if b"\0" in name:
        raise _einval("NUL inside a name")
    return name


def _two_names(payload: bytes) -> tuple[bytes, bytes]:
    """Exactly two NUL-terminated names, one after the other."""
    i = payload.find(b"\0")
    if i < 0:
        raise _einval("name not NUL-terminated")
    return payload[:i], _name(payload[i + 1:])


class FuseServer:
    def __init__(self, fs: Filesystem, queue_index: int = 1,
                 session: Session | None = None, stats: QueueStats | None = None,
                 options: FsOptions | None = None) -> None:
        self.fs = fs
        self.ids = IdTranslation.of(options)
        self.queue_index = queue_index
        self.session = session if session is not None else Session()
        # The ids a request without any runs with (ALLOW_IDMAP, below): the daemon's own.
        self._own_ids = (os.geteuid(), os.getegid())
        self.stats = stats
        # The DAX window's requests to the supervisor (worker/dax.py); None: no DAX.
        self.dax: DaxClient | None = None
        # The request being served, for its statistics: opcode (-1 until its header is
        # decoded) and the errno of its error reply (0: none).
        self._op = -1
        self._err = 0
        self._warned_short = False
        self._warned_room = False
        self._warned_version = False
        # The SETLKW handle() just left waiting (PENDING), for the worker to take.
        self._blocked: Blocked | None = None
        self._unique = 0
        op_ = Opcode
        self._ops = {int(op): fn for op, fn in (
            (op_.LOOKUP, self._lookup), (op_.FORGET, self._forget), (op_.GETATTR, self._getattr),
            (op_.SETATTR, self._setattr), (op_.READLINK, self._readlink),
            (op_.SYMLINK, self._symlink), (op_.MKNOD, self._mknod), (op_.MKDIR, self._mkdir),
            (op_.UNLINK, self._unlink), (op_.RMDIR, self._rmdir), (op_.RENAME, self._rename),
            (op_.LINK, self._link), (op_.OPEN, self._open), (op_.READ, self._read),
            (op_.WRITE, self._write), (op_.STATFS, self._statfs), (op_.RELEASE, self._release),
            (op_.FSYNC, self._fsync), (op_.SETXATTR, self._setxattr),
            (op_.GETXATTR, self._getxattr), (op_.LISTXATTR, self._listxattr),
            (op_.REMOVEXATTR, self._removexattr), (op_.FLUSH, self._flush), (op_.INIT, self._init),
            (op_.OPENDIR, self._opendir), (op_.READDIR, self._readdir),
            (op_.RELEASEDIR, self._releasedir), (op_.FSYNCDIR, self._fsyncdir),
            (op_.ACCESS, self._access), (op_.CREATE, self._create),
            (op_.INTERRUPT, self._interrupt), (op_.DESTROY, self._destroy),
            (op_.BATCH_FORGET, self._batch_forget), (op_.FALLOCATE, self._fallocate),
            (op_.READDIRPLUS, self._readdirplus), (op_.RENAME2, self._rename2),
            (op_.LSEEK, self._lseek), (op_.COPY_FILE_RANGE, self._copy_file_range),
            (op_.SYNCFS, self._syncfs), (op_.COPY_FILE_RANGE_64, self._copy_file_range_64),
            (op_.SETUPMAPPING, self._setupmapping), (op_.REMOVEMAPPING, self._removemapping),
            (op_.GETLK, self._getlk), (op_.SETLK, self._setlk), (op_.SETLKW, self._setlkw),
        )}

    # -- the request loop's entry point ----------------------------------------------------
    def handle(self, reader: Reader, writer: Writer | None,
               header: tuple[int, int, int, int, int, int, int, int] | None = None) -> int:
        """Serve one request; returns the used length (bytes written to `writer`).

        `header`: fuse_in_header's fields (IN_HEADER order) when the caller decoded them
        already (the native engine); the reader then starts after the header.  The one place
        requests the Python plane answers are counted (common/stats.py says what is recorded).
        """
        stats = self.stats
        if stats is None:
            return self._handle(reader, writer, header)
        self._op = -1
        self._err = 0
        start = _now_ns()
        used = self._handle(reader, writer, header)
        if self._op >= 0:
            stats.record(self._op, self._err, _now_ns() - start)
        return used

    def _handle(self, reader: Reader, writer: Writer | None,
                header: tuple[int, int, int, int, int, int, int, int] | None = None) -> int:
        try:
            if header is None:
                header = _IN.unpack(reader.read(_IN_SIZE))
            length, opcode, unique, nodeid, uid, gid, pid, extlen = header
        except ChainTooShort:
            if not self._warned_short:
                self._warned_short = True
                log.warning("queue %d: dropped a request shorter than fuse_in_header"
                            " (reported once)", self.queue_index)
            return 0
        if self.stats is not None:
            self._op = opcode
            self.stats.started(opcode)
        no_reply = opcode in _NO_REPLY
        if opcode != _INIT and not self.session.started:
            return 0 if no_reply else self._error(writer, unique, errno.EIO)
        if length < _IN_SIZE or length - _IN_SIZE > reader.remaining:
            return 0 if no_reply else self._error(writer, unique, errno.EIO)
        if length > _MAX_REQUEST:
            return 0 if no_reply else self._error(writer, unique, errno.ENOMEM)
        self._unique = unique
        handler = self._ops.get(opcode)
        if handler is None:
            return 0 if no_reply else self._error(writer, unique, errno.ENOSYS)
        try:
            body_len = length - _IN_SIZE
            groups: tuple[int, ...] = ()
            secctx: tuple[bytes, bytes] | None = None
            if opcode == _WRITE:
                # Only fuse_write_in is copied; the data stays in guest memory for pwritev.
                body = reader.read(min(body_len, _WRITE_IN_SIZE))
                if len(body) == _WRITE_IN_SIZE and struct.unpack_from(
                        "<I", body, _WRITE_SIZE_OFF)[0] > body_len - _WRITE_IN_SIZE:
                    raise _einval("WRITE size larger than its request")
            else:
                body = reader.read(body_len)
                if extlen:
                    # Extensions are the request's last total_extlen*8 bytes (protocol.md 4.9).
                    ext_len = extlen * 8
                    if ext_len > body_len:
                        raise _einval("extensions longer than the request")
                    groups, secctx = self._extensions(body[body_len - ext_len:])
                    body = body[:body_len - ext_len]
            if _INVALID_ID in (uid, gid) and self.session.flags & _ALLOW_IDMAP:
                # Only a session carried on from the Rust virtiofsd has ALLOW_IDMAP (it accepts
                # the flag, this server does not offer it): the kernel then sends no ids for a
                # request it needs none for (protocol.md 4.2), and virtiofsd serves such a
                # request as itself.  So does this server, rather than refuse the guest's
                # every GETATTR after the move.
                uid, gid = self._own_ids
            if self.ids is None:
                ctx = Context(uid, gid, pid, 0, groups)
            else:
                ctx = self.ids.caller(uid, gid, pid, groups, opcode in _OWNING)
            if secctx is not None:
                ctx = dataclasses.replace(ctx, secctx=secctx)
            result = handler(ctx, nodeid, body, reader, writer)
        except OSError as e:
            return 0 if no_reply else self._error(writer, unique, e.errno or errno.EIO)
        except OverflowError:
            # A guest number that fits no C type of the call it feeds (an offset, a mode).
            return 0 if no_reply else self._error(writer, unique, errno.EINVAL)
        except Exception as e:
            log.error("queue %d: %s failed: %s: %s", self.queue_index, _op_name(opcode),
                      type(e).__name__, e)
            return 0 if no_reply else self._error(writer, unique, errno.EIO)
        if result is None:
            return 0
        if result is _WAITING:
            return PENDING
        if isinstance(result, int):
            # The handler placed `result` body bytes after the header it reserved.
            writer.write_at(0, _OUT_PACK(_OUT_SIZE + result, 0, unique))
            return writer.written
        return self._reply(writer, unique, result, opcode)

    # -- replies ---------------------------------------------------------------------------
    def _reply(self, writer: Writer | None, unique: int, body: bytes, opcode: int) -> int:
        n = _OUT_SIZE + len(body)
        if writer is None or writer.remaining < n:
            if not self._warned_room:
                self._warned_room = True
                log.warning("queue %d: %s reply of %d bytes does not fit the %d writable bytes"
                            " (reported once)", self.queue_index, _op_name(opcode), n,
                            0 if writer is None else writer.remaining)
            return self._error(writer, unique, errno.EIO)
        writer.write(_OUT_PACK(n, 0, unique))
        if body:
            writer.write(body)
        return n

    def _error(self, writer: Writer | None, unique: int, err: int) -> int:
        # protocol.md 4.2: header only, error = -errno within -1..-511.
        if not 0 < err < 512:
            err = errno.EIO
        self._err = err
        hdr = _OUT_PACK(_OUT_SIZE, -err, unique)
        if writer is None:
            return 0
        if writer.written >= _OUT_SIZE:      # the header was reserved already (READ)
            writer.write_at(0, hdr)
            return _OUT_SIZE
        if writer.remaining < _OUT_SIZE:
            return 0
        writer.write(hdr)
        return _OUT_SIZE

    def _extensions(self, data: bytes) -> tuple[tuple[int, ...], tuple[bytes, bytes] | None]:
        """The supplementary groups and the security context (protocol.md 4.9)."""
        groups: tuple[int, ...] = ()
        secctx: tuple[bytes, bytes] | None = None
        labels = bool(self.session.flags & InitFlag.SECURITY_CTX)
        try:
            for typ, payload in fa.iter_extensions(data):
                if typ == fa.ExtType.GROUPS:
                    groups = fa.unpack_supp_groups(payload)
                    if len(groups) > _NGROUPS_MAX:
                        raise ValueError("too many supplementary groups")
                elif labels and typ <= fa.ExtType.MAX_NR_SECCTX:
                    # Without FUSE_SECURITY_CTX negotiated a context means nothing: skipped.
                    secctx = _secctx(typ, payload)
        except ValueError as e:
            raise _einval(str(e)) from None
        return groups, secctx

    # -- session ---------------------------------------------------------------------------
    def _init(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
              writer: Writer | None) -> _Result:
        major, minor, max_readahead, flags = _unpack(fa.INIT_IN_COMPAT, body)
        flags2 = 0
        if flags & InitFlag.INIT_EXT and len(body) >= fa.INIT_IN_COMPAT.size + 4:
            flags2 = struct.unpack_from("<I", body, fa.INIT_IN_COMPAT.size)[0]
        if major > fa.KERNEL_VERSION:
            # protocol.md 4.1: answer with our version and wait for the kernel's next INIT.
            return fa.InitOut(fa.KERNEL_VERSION, fa.KERNEL_MINOR_VERSION).pack()
        if major < fa.KERNEL_VERSION or minor < fa.MIN_KERNEL_MINOR_VERSION:
            if not self._warned_version:
                self._warned_version = True
                log.error("queue %d: the guest speaks FUSE %d.%d; 7.%d or newer is needed"
                          " (reported once)", self.queue_index, major, minor,
                          fa.MIN_KERNEL_MINOR_VERSION)
            raise OSError(errno.EPROTO, "FUSE version too old")
        capable = flags | (flags2 << 32 if flags & InitFlag.INIT_EXT else 0)
        if self.session.started:
            # A second INIT starts a new session (protocol.md 3.2).
            self.session.stop()
            self.fs.destroy()
        enabled = capable & (SERVER_INIT_FLAGS | self.fs.init(capable) | self._dax_init(capable))
        self.session.start(min(minor, fa.KERNEL_MINOR_VERSION), enabled)
        log.info("queue %d: FUSE session started: kernel 7.%d, flags %#x", self.queue_index,
                 minor, enabled)
        alignment = DAX_MAP_ALIGNMENT if enabled & InitFlag.MAP_ALIGNMENT else 0
        return fa.INIT_OUT.pack(
            fa.KERNEL_VERSION, fa.KERNEL_MINOR_VERSION, max_readahead, enabled & 0xFFFFFFFF,
            0xFFFF, 0xFFFF // 4 * 3, MAX_WRITE, 1, _MAX_PAGES, alignment, enabled >> 32, 0, 0)

    # -- DAX (worker/dax.py, supervisor/dax.py; protocol.md 3.5) ------------------------------
    def _dax_window(self) -> int:
        """The window's size when the front-end has one and this worker may ask for it."""
        return self.session.dax_window if self.dax is not None else 0

    def _dax_init(self, capable: int) -> int:
        """A DAX session (the kernel offers FUSE_MAP_ALIGNMENT only when mounted with dax and
        the device has a window): the window starts empty -- the previous driver's mappings
        would otherwise stay readable through it -- and the kernel learns the alignment.

        Only then: QEMU sets up a back-end channel for every vhost-user device, window or not,
        and answers the FS_* requests it does not know with a failure and an error line."""
        if not self._dax_window() or not capable & InitFlag.MAP_ALIGNMENT:
            return 0
        self._dax_clear()
        return int(InitFlag.MAP_ALIGNMENT)

    def _dax_clear(self) -> None:
        assert self.dax is not None
        try:
            self.dax.unmap_all()
        except OSError as e:
            log.warning("queue %d: could not empty the DAX window: %s", self.queue_index,
                        e.strerror or e)

    def _setupmapping(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                      writer: Writer | None) -> _Result:
        if not self._dax_window():
            # As before DAX existed here, and as virtiofsd answers, whatever the body.
            raise OSError(errno.ENOSYS, "no DAX window")
        fh, foffset, length, flags, moffset = _unpack(fa.SETUPMAPPING_IN, body)
        if flags & ~_MAP_FLAGS or not flags & _MAP_FLAGS:
            raise _einval(f"SETUPMAPPING flags {flags:#x}")
        assert self.dax is not None
        self.fs.setupmapping(ctx, nodeid, fh, foffset, length, flags, moffset, self.dax.map)
        return b""

    def _removemapping(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                       writer: Writer | None) -> _Result:
        if not self._dax_window():
            raise OSError(errno.ENOSYS, "no DAX window")
        (count,) = _unpack(fa.REMOVEMAPPING_IN, body)
        # The array follows the 4-byte count at once (protocol.md 3.5).
        size = fa.REMOVEMAPPING_IN.size
        one = fa.REMOVEMAPPING_ONE
        if not 0 < count <= _REMOVEMAPPING_MAX or len(body) < size + count * one.size:
            raise _einval(f"REMOVEMAPPING of {count} ranges in {len(body)} bytes")
        assert self.dax is not None
        for i in range(count):
            moffset, length = one.unpack_from(body, size + i * one.size)
            self.dax.unmap(moffset, length)
        return b""

    def _destroy(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                 writer: Writer | None) -> _Result:
        if self._dax_window() and self.session.flags & InitFlag.MAP_ALIGNMENT:
            self._dax_clear()
        self.session.stop()
        self.fs.destroy()
        return b""

    def _interrupt(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                   writer: Writer | None) -> _Result:
        # Only a lock wait outlives its turn on the ring; every other request has completed
        # already.  No reply: the interrupted request answers EINTR itself.
        (unique,) = _unpack(fa.INTERRUPT_IN, body)
        self.fs.interrupt(unique)
        return None

    # -- locks (worker/locks.py) -----------------------------------------------------------
    def _lk(self, ctx: Context, nodeid: int, body: bytes, sleep: bool | None) -> _Result:
        fh, owner, start, end, typ, pid, lk_flags = _unpack(fa.LK_IN, body)
        if sleep is None:
            t, s, e, p = self.fs.getlk(ctx, nodeid, fh, owner, start, end, typ, pid, lk_flags)
            return fa.LK_OUT.pack(s, e, t, p)
        # The pid of the request's lock is the guest's (fuse_lk_fill: the caller's tgid).
        wait = self.fs.setlk(ctx, nodeid, fh, owner, start, end, typ, pid or ctx.pid,
                             lk_flags, sleep)
        if wait is None:
            return b""
        self._blocked = Blocked(self._unique, *wait)
        return _WAITING

    def _getlk(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
               writer: Writer | None) -> _Result:
        return self._lk(ctx, nodeid, body, None)

    def _setlk(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
               writer: Writer | None) -> _Result:
        return self._lk(ctx, nodeid, body, False)

    def _setlkw(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                writer: Writer | None) -> _Result:
        return self._lk(ctx, nodeid, body, True)

    def take_blocked(self) -> Blocked:
        """The lock request handle() answered PENDING for: the worker waits for it."""
        blocked, self._blocked = self._blocked, None
        assert blocked is not None
        return blocked

    def reply_status(self, writer: Writer | None, unique: int, err: int) -> int:
        """A header-only reply (err 0: success) for a request answered later; its used
        length."""
        if err:
            return self._error(writer, unique, err)
        return self._reply(writer, unique, b"", Opcode.SETLKW)

    # -- names and inodes ------------------------------------------------------------------
    def _lookup(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                writer: Writer | None) -> _Result:
        return pack_entry(self.fs.lookup(ctx, nodeid, _name(body)), self.ids)

    def _forget(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                writer: Writer | None) -> _Result:
        (nlookup,) = _unpack(fa.FORGET_IN, body)
        self.fs.forget(nodeid, nlookup)
        return None

    def _batch_forget(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                      writer: Writer | None) -> _Result:
        (count,) = _unpack(fa.BATCH_FORGET_IN, body)
        one = fa.FORGET_ONE
        start = fa.BATCH_FORGET_IN.size
        if start + count * one.size > len(body):
            log.warning("queue %d: BATCH_FORGET of %d entries in %d bytes ignored",
                        self.queue_index, count, len(body))
            return None
        self.fs.batch_forget(one.iter_unpack(body[start:start + count * one.size]))
        return None

    def _getattr(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                 writer: Writer | None) -> _Result:
        getattr_flags, fh = _unpack(fa.GETATTR_IN, body)
        st, timeout = self.fs.getattr(ctx, nodeid, fh if getattr_flags & fa.GETATTR_FH
                                      else None)
        return self._attr_out(st, timeout)

    def _attr_out(self, st: os.stat_result, timeout: float) -> bytes:
        s, ns = _split_time(timeout)
        return fa.ATTR_OUT.pack(s, ns, *attr_fields(st, 0, self.ids))

    def _setattr(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                 writer: Writer | None) -> _Result:
        attr = fa.SetattrIn._make(_unpack(fa.SETATTR_IN, body))
        if self.ids is not None and attr.valid & (fa.SetattrValid.UID | fa.SetattrValid.GID):
            # The new owner is a guest id: a forbidden one fails (IdTranslation).
            attr = attr._replace(
                uid=self.ids.uids.to_host(attr.uid) if attr.valid & fa.SetattrValid.UID
                else attr.uid,
                gid=self.ids.gids.to_host(attr.gid) if attr.valid & fa.SetattrValid.GID
                else attr.gid)
        fh = attr.fh if attr.valid & fa.SetattrValid.FH else None
        st, timeout = self.fs.setattr(ctx, nodeid, attr, fh)
        return self._attr_out(st, timeout)

    def _readlink(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                  writer: Writer | None) -> _Result:
        return self.fs.readlink(ctx, nodeid)

    def _symlink(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                 writer: Writer | None) -> _Result:
        name, target = _two_names(body)
        return pack_entry(self.fs.symlink(ctx, target, nodeid, name), self.ids)

    def _mknod(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
               writer: Writer | None) -> _Result:
        mode, rdev, umask = _unpack(fa.MKNOD_IN, body)
        name = _name(body[fa.MKNOD_IN.size:])
        ctx = dataclasses.replace(ctx, umask=umask)
        return pack_entry(self.fs.mknod(ctx, nodeid, name, mode, rdev), self.ids)

    def _mkdir(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
               writer: Writer | None) -> _Result:
        mode, umask = _unpack(fa.MKDIR_IN, body)
        name = _name(body[fa.MKDIR_IN.size:])
        ctx = dataclasses.replace(ctx, umask=umask)
        return pack_entry(self.fs.mkdir(ctx, nodeid, name, mode), self.ids)

    def _unlink(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                writer: Writer | None) -> _Result:
        self.fs.unlink(ctx, nodeid, _name(body))
        return b""

    def _rmdir(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
               writer: Writer | None) -> _Result:
        self.fs.rmdir(ctx, nodeid, _name(body))
        return b""

    def _rename(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                writer: Writer | None) -> _Result:
        (newdir,) = _unpack(fa.RENAME_IN, body)
        old, new = _two_names(body[fa.RENAME_IN.size:])
        self.fs.rename(ctx, nodeid, old, newdir, new, 0)
        return b""

    def _rename2(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                 writer: Writer | None) -> _Result:
        newdir, flags = _unpack(fa.RENAME2_IN, body)
        old, new = _two_names(body[fa.RENAME2_IN.size:])
        self.fs.rename(ctx, nodeid, old, newdir, new, flags)
        return b""

    def _link(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
              writer: Writer | None) -> _Result:
        (oldnodeid,) = _unpack(fa.LINK_IN, body)
        name = _name(body[fa.LINK_IN.size:])
        return pack_entry(self.fs.link(ctx, oldnodeid, nodeid, name), self.ids)

    # -- files -----------------------------------------------------------------------------
    def _open(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
              writer: Writer | None) -> _Result:
        flags, open_flags = _unpack(fa.OPEN_IN, body)
        fh, fopen = self.fs.open(ctx, nodeid, flags, bool(open_flags & fa.OPEN_KILL_SUIDGID))
        return fa.OPEN_OUT.pack(fh, fopen, 0)

    def _create(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                writer: Writer | None) -> _Result:
        flags, mode, umask, open_flags = _unpack(fa.CREATE_IN, body)
        name = _name(body[fa.CREATE_IN.size:])
        ctx = dataclasses.replace(ctx, umask=umask)
        entry, fh, fopen = self.fs.create(ctx, nodeid, name, mode, flags,
                                          bool(open_flags & fa.OPEN_KILL_SUIDGID))
        return pack_entry(entry, self.ids) + fa.OPEN_OUT.pack(fh, fopen, 0)

    def _read(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
              writer: Writer | None) -> _Result:
        fh, offset, size = _unpack(fa.READ_IN, body)[:3]
        if writer is None or writer.remaining < _OUT_SIZE:
            raise OSError(errno.EIO, "no room for the reply header")
        writer.advance(_OUT_SIZE)               # the header goes in last (handle())
        if writer.window:
            n = self._window_io(ctx, nodeid, fh, offset, writer.views(size), False)
        else:
            n = self.fs.read(ctx, nodeid, fh, offset, writer.views(size))
        writer.advance(n)
        return n

    def _write(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
               writer: Writer | None) -> _Result:
        fh, offset, size, write_flags, _owner, flags = _unpack(fa.WRITE_IN, body)
        if reader.window:
            n = self._window_io(ctx, nodeid, fh, offset, reader.views(size), True, write_flags)
        else:
            n = self.fs.write(ctx, nodeid, fh, offset, reader.views(size), write_flags, flags)
        return fa.WRITE_OUT.pack(n)

    def _window_io(self, ctx: Context, nodeid: int, fh: int, offset: int, bufs: list,
                   write: bool, write_flags: int = 0) -> int:
        """READ into / WRITE from data buffers some of which lie in the DAX window: the
        front-end moves those between the file and its window (FS_IO, worker/dax.py)."""
        if not self._dax_window():
            raise OSError(errno.EFAULT, "buffers outside guest memory and no DAX window")
        assert self.dax is not None
        return self.fs.window_io(ctx, nodeid, fh, offset, bufs, write, write_flags,
                                 self.dax.io)

    def _flush(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
               writer: Writer | None) -> _Result:
        fh, lock_owner = _unpack(fa.FLUSH_IN, body)
        self.fs.flush(ctx, nodeid, fh, lock_owner)
        return b""

    def _release(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                 writer: Writer | None) -> _Result:
        fh, flags, release_flags, lock_owner = _unpack(fa.RELEASE_IN, body)
        self.fs.release(ctx, nodeid, fh, flags, release_flags, lock_owner)
        return b""

    def _fsync(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
               writer: Writer | None) -> _Result:
        fh, fsync_flags = _unpack(fa.FSYNC_IN, body)
        if self._dax_window() and self.session.flags & InitFlag.MAP_ALIGNMENT:
            # What the guest wrote through the window first (FS_SYNC: msync in the front-end).
            assert self.dax is not None
            self.dax.sync(fh)
        self.fs.fsync(ctx, nodeid, fh, bool(fsync_flags & fa.FSYNC_FDATASYNC))
        return b""

    def _fallocate(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                   writer: Writer | None) -> _Result:
        fh, offset, length, mode = _unpack(fa.FALLOCATE_IN, body)
        self.fs.fallocate(ctx, nodeid, fh, mode, offset, length)
        return b""

    def _lseek(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
               writer: Writer | None) -> _Result:
        fh, offset, whence = _unpack(fa.LSEEK_IN, body)
        return fa.LSEEK_OUT.pack(self.fs.lseek(ctx, nodeid, fh, offset, whence))

    def _copy_range(self, ctx: Context, nodeid: int, body: bytes, limit: int) -> int:
        fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = _unpack(
            fa.COPY_FILE_RANGE_IN, body)
        return self.fs.copy_file_range(ctx, nodeid, fh_in, off_in, nodeid_out, fh_out, off_out,
                                       min(length, limit), flags)

    def _copy_file_range(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                         writer: Writer | None) -> _Result:
        return fa.WRITE_OUT.pack(self._copy_range(ctx, nodeid, body, _COPY_RANGE_MAX_32))

    def _copy_file_range_64(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                            writer: Writer | None) -> _Result:
        return fa.COPY_FILE_RANGE_OUT.pack(self._copy_range(ctx, nodeid, body, (1 << 63) - 1))

    # -- directories -----------------------------------------------------------------------
    def _opendir(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                 writer: Writer | None) -> _Result:
        flags, _ = _unpack(fa.OPEN_IN, body)
        fh, fopen = self.fs.opendir(ctx, nodeid, flags)
        return fa.OPEN_OUT.pack(fh, fopen, 0)

    def _dir_request(self, body: bytes, writer: Writer | None) -> tuple[int, int, int]:
        fh, offset, size = _unpack(fa.READ_IN, body)[:3]
        if size > MAX_WRITE:
            raise OSError(errno.ENOMEM, "READDIR buffer larger than max_write")
        room = 0 if writer is None else writer.remaining - _OUT_SIZE
        return fh, offset, max(0, min(size, room))

    def _readdir(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                 writer: Writer | None) -> _Result:
        fh, offset, size = self._dir_request(body, writer)
        out: list[bytes] = []
        used = 0
        pack = fa.pack_dirent
        for d in self.fs.readdir(ctx, nodeid, fh, offset, size):
            n = fa.dirent_size(len(d.name))
            if used + n > size:
                if not out:
                    raise _too_small()
                break
            out.append(pack(d.ino, d.off, d.type, d.name))
            used += n
        return b"".join(out)

    def _readdirplus(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                     writer: Writer | None) -> _Result:
        fh, offset, size = self._dir_request(body, writer)
        out: list[bytes] = []
        used = 0
        pack = fa.pack_direntplus
        fs = self.fs
        for d in fs.readdir(ctx, nodeid, fh, offset, size):
            n = fa.direntplus_size(len(d.name))
            if used + n > size:
                if not out:
                    raise _too_small()
                break                         # checked before the lookup: nothing to undo
            name = d.name
            if name == b"." or name == b"..":
                # Not looked up (no lookup count): a negative entry carrying ino and type.
                entry = _ENTRY_PACK(0, 0, 0, 0, 0, 0, d.ino, 0, 0, 0, 0, 0, 0, 0, 0,
                                    d.type << 12, 0, 0, 0, 0, 0, 0)
            else:
                try:
                    entry = pack_entry(fs.lookup(ctx, nodeid, name), self.ids)
                except FileNotFoundError:
                    continue                  # removed since it was listed
                except OSError:
                    if out:
                        break                 # keep what was counted; the guest asks again
                    raise
            out.append(pack(entry, d.ino, d.off, d.type, name))
            used += n
        return b"".join(out)

    def _releasedir(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                    writer: Writer | None) -> _Result:
        fh, flags = _unpack(fa.RELEASE_IN, body)[:2]
        self.fs.releasedir(ctx, nodeid, fh, flags)
        return b""

    def _fsyncdir(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                  writer: Writer | None) -> _Result:
        fh, fsync_flags = _unpack(fa.FSYNC_IN, body)
        if self._dax_window() and self.session.flags & InitFlag.MAP_ALIGNMENT:
            # What the guest wrote through the window first (FS_SYNC: msync in the front-end).
            assert self.dax is not None
            self.dax.sync(fh)
        self.fs.fsyncdir(ctx, nodeid, fh, bool(fsync_flags & fa.FSYNC_FDATASYNC))
        return b""

    # -- whole filesystem, permissions, xattrs ---------------------------------------------
    def _statfs(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                writer: Writer | None) -> _Result:
        s = self.fs.statfs(ctx, nodeid)
        return fa.KSTATFS.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                               s.f_bsize, s.f_namemax, s.f_frsize)

    def _syncfs(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                writer: Writer | None) -> _Result:
        self.fs.syncfs(ctx, nodeid)
        return b""

    def _access(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                writer: Writer | None) -> _Result:
        (mask,) = _unpack(fa.ACCESS_IN, body)
        self.fs.access(ctx, nodeid, mask)
        return b""

    def _setxattr(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                  writer: Writer | None) -> _Result:
        if self.session.flags & InitFlag.SETXATTR_EXT:
            size, flags, setxattr_flags = _unpack(fa.SETXATTR_IN, body)
            rest = body[fa.SETXATTR_IN.size:]
        else:
            size, flags = _unpack(fa.SETXATTR_IN_COMPAT, body)
            setxattr_flags = 0
            rest = body[fa.SETXATTR_IN_COMPAT.size:]
        i = rest.find(b"\0")
        if i < 0:
            raise _einval("xattr name not NUL-terminated")
        value = rest[i + 1:]
        if len(value) != size:
            raise _einval(f"xattr value of {len(value)} bytes, size says {size}")
        self.fs.setxattr(ctx, nodeid, rest[:i], value, flags, setxattr_flags)
        return b""

    @staticmethod
    def _xattr_reply(result: bytes | int) -> bytes:
        return fa.GETXATTR_OUT.pack(result) if isinstance(result, int) else result

    def _getxattr(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                  writer: Writer | None) -> _Result:
        (size,) = _unpack(fa.GETXATTR_IN, body)
        name = _name(body[fa.GETXATTR_IN.size:])
        if size > MAX_WRITE:
            raise OSError(errno.ENOMEM, "xattr buffer larger than max_write")
        return self._xattr_reply(self.fs.getxattr(ctx, nodeid, name, size))

    def _listxattr(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                   writer: Writer | None) -> _Result:
        (size,) = _unpack(fa.GETXATTR_IN, body)
        if size > MAX_WRITE:
            raise OSError(errno.ENOMEM, "xattr buffer larger than max_write")
        return self._xattr_reply(self.fs.listxattr(ctx, nodeid, size))

    def _removexattr(self, ctx: Context, nodeid: int, body: bytes, reader: Reader,
                     writer: Writer | None) -> _Result:
        self.fs.removexattr(ctx, nodeid, _name(body))
        return b""


def _secctx(count: int, payload: memoryview) -> tuple[bytes, bytes] | None:
    """The one security context of a fuse_secctx_header extension: (xattr name, value).  The
    kernel sends one (or none when no LSM gives a context); more is refused, as virtiofsd does."""
    if count == 0:
        return None
    if count > 1:
        raise ValueError(f"{count} security contexts (one is served)")
    if len(payload) < fa.SECCTX.size:
        raise ValueError("truncated fuse_secctx")
    (size,) = fa.SECCTX.unpack_from(payload)
    rest = bytes(payload[fa.SECCTX.size:])
    end = rest.find(b"\0")
    if size == 0 or end <= 0 or len(rest) - end - 1 < size:
        raise ValueError("malformed security context")
    return rest[:end], rest[end + 1:end + 1 + size]


def _too_small() -> OSError:
    # Not even the next entry fits: an empty reply would read as the end of the directory, so
    # the rest of it would silently vanish (getdents(2) answers EINVAL too; so does virtiofsd).
    return OSError(errno.EINVAL, "directory buffer too small for the next entry")


def _op_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"
