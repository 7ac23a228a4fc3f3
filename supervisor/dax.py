"""The DAX window: file ranges mapped into the front-end's cache window (protocol.md 1.5, 1.13,
3.5).

The guest's FUSE_SETUPMAPPING / FUSE_REMOVEMAPPING reach a queue worker, which asks the
supervisor over its control channel (common/control.py DAX_*); only the supervisor holds the
back-end channel (SET_BACKEND_REQ_FD).  Every request passes `DaxWindow.serve()`, the one gate:
the window is known, the range lies inside it (overflow-free: Python integers, and every number
below 2**64), offsets and lengths are page-aligned (the map_alignment INIT announces), the fd is
a regular file and is the file of the open handle `fh` named in the request (the handle table in
the shared arena says which inode that is), and its open mode allows the mapping.  Only then is
the front-end asked, and its answer (REPLY_ACK) is carried back to the worker.  A READ or
WRITE whose data lies in the window (worker/guestmem.py WindowBuffer) passes the same gate as
DAX_IO and becomes FS_IO: the front-end moves the data and answers the byte count (DAX_IO_DONE).

How a front-end tells it has a window, and how large:
* cloud-hypervisor (FS_* family): it sets up the back-end channel only when its virtio-fs device
  has a cache (`--fs ...,cache_size=SIZE`), and does not say how large the window is; the daemon
  takes the size from `--dax-window` (the same default, 8 GiB), and cloud-hypervisor checks each
  range against its own size again.
* Front-ends with VIRTIO shared memory regions (the SHMEM protocol feature, crosvm): they ask
  the back-end for its regions (GET_SHMEM_CONFIG, crosvm's GET_SHARED_MEMORY_REGIONS) and get
  region 0 of `--dax-window` bytes; the SHMEM_MAP / SHMEM_UNMAP requests then name shmid 0.

The supervisor keeps a table of what is mapped where, with the inode it came from: SHMEM_UNMAP
must name whole mappings, FS_SYNC needs the ranges of one file, and the table outlives any
worker (mappings belong to the window, not to the worker that asked for them).
"""

from __future__ import annotations

import bisect
import enum
import errno
import fcntl
import logging
import mmap
import os
import select
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass

from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.control import (
    DAX_ALL,
    DaxDone,
    DaxIo,
    DaxIoDone,
    DaxMap,
    DaxSync,
    DaxUnmap,
    Message,
)
from pyvirtiofsd.common.fuse_abi import SETUPMAPPING_FLAG_READ, SETUPMAPPING_FLAG_WRITE
from pyvirtiofsd.common.vhost_user import (
    FS_ENTRIES,
    FS_UNMAP_ALL,
    HEADER_SIZE,
    U64,
    FsBackendMsg,
    FsBackendRequest,
    FsMapFlag,
    Header,
    HeaderFlag,
    ProtocolFeature,
    ShmemBackendRequest,
    ShmemFlag,
    ShmemMap,
)

log = logging.getLogger("pyvirtiofsd.dax")

# The cache window a front-end has by default (cloud-hypervisor's DEFAULT_CACHE_SIZE).
DEFAULT_WINDOW = 8 << 30
PAGE = mmap.PAGESIZE
MAP_ALIGNMENT = PAGE.bit_length() - 1      # log2: FUSE_INIT's map_alignment
# How long the front-end has to answer one back-end request; past it the channel is dropped.
BACKEND_TIMEOUT = 10.0
SHMID = 0                                  # VIRTIO_FS_SHMCAP_ID_CACHE (protocol.md 3.5)
_U64_LIMIT = 1 << 64
_MAP_FLAGS = SETUPMAPPING_FLAG_READ | SETUPMAPPING_FLAG_WRITE


class Family(enum.Enum):
    FS = "FS_MAP/FS_UNMAP/FS_SYNC"
    SHMEM = "SHMEM_MAP/SHMEM_UNMAP"


class Refused(Exception):
    """A DAX request is refused with `errno` before the front-end hears of it."""

    def __init__(self, err: int, why: str) -> None:
        super().__init__(why)
        self.errno = err


@dataclass(frozen=True)
class Mapping:
    moffset: int
    length: int
    foffset: int
    dev: int
    ino: int
    writable: bool

    @property
    def end(self) -> int:
        return self.moffset + self.length


class DaxWindow:
    """One front-end connection's window: its back-end channel, family and mapping table."""

    def __init__(self, size: int, arena: Arena,
                 publish: Callable[[int], None] | None = None) -> None:
        self.size = size
        self.arena = arena
        # publish(size): tell the workers whether a window exists (0: none); Session.dax_window
        self.publish: Callable[[int], None] = publish or (lambda size: None)
        self.channel: socket.socket | None = None
        self.reply_ack = False
        self.family = Family.FS
        self.shmem_asked = False
        self.mappings: list[Mapping] = []       # sorted by moffset, never overlapping
        self.moved = 0                          # what the last FS_IO moved (answer())

    # -- the front-end's side of the set-up (supervisor/vhost.py) ----------------------------
    def negotiated(self, protocol_features: int) -> None:
        self.reply_ack = bool(protocol_features & ProtocolFeature.REPLY_ACK)
        self.family = Family.SHMEM if protocol_features & ProtocolFeature.SHMEM else Family.FS
        self._update()

    def attach(self, fd: int) -> None:
        """SET_BACKEND_REQ_FD: the channel (a connected UNIX stream socket) is ours from here."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise OSError(errno.ENOTSOCK, "the back-end channel is not a UNIX stream socket")
        self.detach()
        self.channel = sock
        self._update()

    def shmem_config(self) -> list[int]:
        """GET_SHMEM_CONFIG: region 0 is the window."""
        self.shmem_asked = True
        self._update()
        return [self.size]

    @property
    def active(self) -> bool:
        """Whether the guest may be offered DAX: a channel, and a window the front-end has."""
        if self.channel is None:
            return False
        return self.shmem_asked if self.family is Family.SHMEM else True

    def _update(self) -> None:
        self.publish(self.size if self.active else 0)

    def detach(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.mappings.clear()
        self._update()

    close = detach

    # -- the gate -----------------------------------------------------------------------------
    def answer(self, queue: int, msg: Message) -> Message:
        """The answer the worker gets (ProcessTable._serve_ask): DAX_IO_DONE with the bytes
        moved for DAX_IO, DAX_DONE for the others."""
        self.moved = 0
        err = self.serve(queue, msg)
        if isinstance(msg, DaxIo):
            return DaxIoDone(err, 0 if err else self.moved, seq=msg.seq)
        return DaxDone(err, seq=msg.seq)

    def serve(self, queue: int, msg: Message) -> int:
        """Carry out one worker's DAX request; 0 or the errno its guest request gets.  Owns
        (closes) the fds that came with `msg`."""
        try:
            if not self.active:
                raise Refused(errno.ENOSYS, "the front-end has no DAX window")
            if isinstance(msg, DaxMap):
                self._map(msg)
            elif isinstance(msg, DaxUnmap):
                self._unmap(msg.moffset, msg.length)
            elif isinstance(msg, DaxSync):
                self._sync(msg.fh)
            elif isinstance(msg, DaxIo):
                self.moved = self._io(msg)
            else:
                raise Refused(errno.EPROTO, f"{msg.type.name} is not a DAX request")
            return 0
        except Refused as e:
            log.warning("queue %d: DAX %s refused: %s", queue, msg.type.name, e)
            return e.errno
        except OSError as e:
            # fstat/fcntl of the fd that came with the request: a worker's fault, not ours.
            log.warning("queue %d: DAX %s refused: %s", queue, msg.type.name, e.strerror or e)
            return e.errno or errno.EIO
        finally:
            for fd in msg.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _range(self, moffset: int, length: int) -> None:
        if length == 0:
            raise Refused(errno.EINVAL, "empty range")
        if moffset % PAGE or length % PAGE:
            raise Refused(errno.EINVAL, f"range {moffset:#x}+{length:#x} is not"
                                        f" {PAGE}-byte aligned")
        if moffset + length > self.size:
            raise Refused(errno.EINVAL, f"range {moffset:#x}+{length:#x} goes past the end of"
                                        f" the {self.size:#x}-byte window")

    def _file_of(self, msg: DaxMap | DaxIo) -> tuple[os.stat_result, int]:
        """The fd a request brought is the file of its live handle `fh`, a regular file, and a
        file range that fits file offsets: its stat and access mode (O_ACCMODE)."""
        if msg.foffset + msg.length >= 1 << 63:
            raise Refused(errno.EINVAL, "file range past the largest file offset")
        known = self.arena.handle_file(msg.fh)
        if known is None:
            raise Refused(errno.EBADF, f"fh {msg.fh:#x} is not an open file")
        fd = msg.fds[0]
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != known[:2] or not stat.S_ISREG(st.st_mode):
            raise Refused(errno.EBADF, f"the fd sent is not the file of fh {msg.fh:#x}")
        return st, fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE

    def _map(self, msg: DaxMap) -> None:
        self._range(msg.moffset, msg.length)
        if msg.foffset % PAGE:
            raise Refused(errno.EINVAL, f"file offset {msg.foffset:#x} is not aligned")
        if msg.flags & ~_MAP_FLAGS or not msg.flags & _MAP_FLAGS:
            raise Refused(errno.EINVAL, f"mapping flags {msg.flags:#x}")
        writable = bool(msg.flags & SETUPMAPPING_FLAG_WRITE)
        st, mode = self._file_of(msg)
        fd = msg.fds[0]
        if mode == os.O_WRONLY or (writable and mode != os.O_RDWR):
            raise Refused(errno.EACCES, f"fh {msg.fh:#x} is not open for "
                                        f"{'reading and writing' if writable else 'reading'}")
        new = Mapping(msg.moffset, msg.length, msg.foffset, st.st_dev, st.st_ino, writable)
        if self.family is Family.SHMEM:
            # SHMEM_MAP may not overlap a mapping (VU+ 1.13): a range the guest maps again
            # replaces the whole mappings it covers; one it covers in part cannot be split
            # without the fd of the old mapping, and the Linux driver never asks that (it maps
            # whole, aligned 2 MiB ranges).
            old = self._overlapping(new.moffset, new.end)
            for m in old:
                if m.moffset < new.moffset or m.end > new.end:
                    raise Refused(errno.EBUSY, f"range {new.moffset:#x}+{new.length:#x} covers"
                                               f" part of the mapping at {m.moffset:#x}")
            for m in old:
                self._send_shmem(ShmemBackendRequest.SHMEM_UNMAP, m.moffset, m.length, 0)
                self._forget(m.moffset, m.end)
            self._send_shmem(ShmemBackendRequest.SHMEM_MAP, new.moffset, new.length,
                             new.foffset, ShmemFlag.WRITABLE if writable else 0, fd)
        else:
            flags = FsMapFlag.MAP_R | (FsMapFlag.MAP_W if writable else 0)
            self._send_fs(FsBackendRequest.FS_MAP,
                          [(new.foffset, new.moffset, new.length, int(flags))], fd)
        self._forget(new.moffset, new.end)
        bisect.insort(self.mappings, new, key=lambda m: m.moffset)

    def _unmap(self, moffset: int, length: int) -> None:
        if length == DAX_ALL:
            if moffset:
                raise Refused(errno.EINVAL, "a whole-window unmap starts at 0")
            if self.family is Family.FS:
                # cloud-hypervisor reads len ~0 as "the whole window".
                self._send_fs(FsBackendRequest.FS_UNMAP, [(0, 0, FS_UNMAP_ALL, 0)])
            else:
                for m in list(self.mappings):
                    self._send_shmem(ShmemBackendRequest.SHMEM_UNMAP, m.moffset, m.length, 0)
                    self._forget(m.moffset, m.end)
            self.mappings.clear()
            return
        self._range(moffset, length)
        end = moffset + length
        if self.family is Family.FS:
            self._send_fs(FsBackendRequest.FS_UNMAP, [(0, moffset, length, 0)])
        else:
            old = self._overlapping(moffset, end)
            for m in old:
                if m.moffset < moffset or m.end > end:
                    raise Refused(errno.EINVAL, f"range {moffset:#x}+{length:#x} covers part"
                                                f" of the mapping at {m.moffset:#x}")
            for m in old:
                self._send_shmem(ShmemBackendRequest.SHMEM_UNMAP, m.moffset, m.length, 0)
        self._forget(moffset, end)

    def _sync(self, fh: int) -> None:
        """FS_SYNC (msync in the front-end) of every range mapped from fh's file.  Without it
        in the SHMEM family the worker's fsync of the file covers the same pages: the window
        maps the file MAP_SHARED, so they are the file's page cache."""
        known = self.arena.handle_file(fh)
        if known is None:
            raise Refused(errno.EBADF, f"fh {fh:#x} is not an open file")
        if self.family is not Family.FS:
            return
        ranges = [(m.foffset, m.moffset, m.length, 0) for m in self.mappings
                  if (m.dev, m.ino) == known[:2]]
        for i in range(0, len(ranges), FS_ENTRIES):
            self._send_fs(FsBackendRequest.FS_SYNC, ranges[i:i + FS_ENTRIES])

    def _io(self, msg: DaxIo) -> int:
        """FS_IO (cloud-hypervisor's fs_backend_io): the front-end preads (READ) or pwrites
        (WRITE) between the fd and the guest-physical range, which it finds in its window;
        its answer is the byte count.  The daemon cannot know where the window lies (no
        message says), so the range is checked for what can be checked -- non-empty, no
        longer than the window, no wrap past 2**64 -- and the front-end checks it against
        its window (EFAULT outside)."""
        if self.family is not Family.FS:
            raise Refused(errno.EFAULT, "the SHMEM requests cannot move data: a buffer in the"
                                        " window cannot be served")
        if not self.reply_ack:
            raise Refused(errno.EFAULT, "FS_IO needs REPLY_ACK to learn what was moved")
        where = f"guest range {msg.gpa:#x}+{msg.length:#x}"
        if msg.length == 0 or msg.length > self.size or msg.gpa + msg.length > _U64_LIMIT:
            raise Refused(errno.EFAULT, f"{where} cannot lie in the {self.size:#x}-byte window")
        if msg.write not in (0, 1):
            raise Refused(errno.EINVAL, f"I/O direction {msg.write}")
        _st, mode = self._file_of(msg)
        fd = msg.fds[0]
        if mode == (os.O_RDONLY if msg.write else os.O_WRONLY):
            raise Refused(errno.EBADF, f"fh {msg.fh:#x} is not open for "
                                       f"{'writing' if msg.write else 'reading'}")
        # MAP_W: from guest memory to the file; MAP_R: from the file to guest memory.
        flags = FsMapFlag.MAP_W if msg.write else FsMapFlag.MAP_R
        moved = self._send_fs(FsBackendRequest.FS_IO,
                              [(msg.foffset, msg.gpa, msg.length, int(flags))], fd, count=True)
        if moved > msg.length:
            raise Refused(errno.EIO, f"the front-end says FS_IO moved {moved} of"
                                     f" {msg.length} bytes")
        return moved

    # -- the mapping table --------------------------------------------------------------------
    def _overlapping(self, start: int, end: int) -> list[Mapping]:
        return [m for m in self.mappings if m.moffset < end and start < m.end]

    def _forget(self, start: int, end: int) -> None:
        """Drop [start, end) from the table, keeping what lies outside it of a mapping it cuts
        (MAP_FIXED and munmap leave those parts mapped in the front-end)."""
        kept: list[Mapping] = []
        for m in self.mappings:
            if m.end <= start or m.moffset >= end:
                kept.append(m)
                continue
            if m.moffset < start:
                kept.append(Mapping(m.moffset, start - m.moffset, m.foffset, m.dev, m.ino,
                                    m.writable))
            if m.end > end:
                cut = end - m.moffset
                kept.append(Mapping(end, m.end - end, m.foffset + cut, m.dev, m.ino,
                                    m.writable))
        kept.sort(key=lambda m: m.moffset)
        self.mappings = kept

    # -- the back-end channel ----------------------------------------------------------------
    def _send_fs(self, request: FsBackendRequest, entries: list[tuple[int, int, int, int]],
                 fd: int | None = None, count: bool = False) -> int:
        msg = FsBackendMsg(tuple(entries))
        assert msg.is_valid()
        return self._send(int(request), request.name, msg.pack(), fd, count)

    def _send_shmem(self, request: ShmemBackendRequest, moffset: int, length: int,
                    foffset: int, flags: int = 0, fd: int | None = None) -> None:
        self._send(int(request), request.name,
                   ShmemMap(SHMID, foffset, moffset, length, int(flags)).pack(), fd)

    def _send(self, request: int, name: str, payload: bytes, fd: int | None,
              count: bool = False) -> int:
        """One back-end request and, with REPLY_ACK, its answer (0: done; else a failure, as
        -errno where the front-end says which; with `count` (FS_IO) a byte count, or -errno).
        A channel that fails is dropped: the guest's later DAX requests get ENOSYS."""
        sock = self.channel
        assert sock is not None
        flags = 1 | (HeaderFlag.NEED_REPLY if self.reply_ack else 0)
        data = Header(request, flags, len(payload)).pack() + payload
        try:
            sock.settimeout(BACKEND_TIMEOUT)
            if fd is not None:
                sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       fd.to_bytes(4, sys.byteorder))])
            else:
                sock.sendall(data)
            if not self.reply_ack:
                return 0
            value = self._reply(sock, request)
        except (OSError, ValueError) as e:
            log.error("the back-end channel failed on %s (%s): DAX is off until the front-end"
                      " sets a new one", name, e)
            self.detach()
            raise Refused(errno.EIO, f"{name}: back-end channel failed") from None
        finally:
            if self.channel is not None:
                self.channel.settimeout(None)
        signed = value - _U64_LIMIT if value >= 1 << 63 else value
        if count and signed >= 0:
            return value
        if value:
            err = -signed if -4096 < signed < 0 else errno.EIO
            raise Refused(err, f"the front-end refused {name} ({os.strerror(err)})")
        return 0

    @staticmethod
    def _reply(sock: socket.socket, request: int) -> int:
        data = b""
        while len(data) < HEADER_SIZE + U64.size:
            if not select.select([sock], [], [], BACKEND_TIMEOUT)[0]:
                raise TimeoutError("no answer")
            more = sock.recv(HEADER_SIZE + U64.size - len(data))
            if not more:
                raise ConnectionResetError("the front-end closed the channel")
            data += more
        hdr = Header.unpack(data[:HEADER_SIZE])
        if hdr.request != request or not hdr.flags & HeaderFlag.REPLY or hdr.size != U64.size:
            raise ValueError(f"unexpected answer (request {hdr.request}, flags {hdr.flags:#x},"
                             f" size {hdr.size})")
        return U64.unpack(data[HEADER_SIZE:])[0]
