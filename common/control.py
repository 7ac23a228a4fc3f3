"""The supervisor <-> worker control channel: a small typed message set (no pickle).

Each message is one SOCK_SEQPACKET datagram: a header (type, sequence number) followed by the
fixed payload of that type; fds travel as SCM_RIGHTS.  Requests flow supervisor -> worker, each
answered by exactly one ACK/STOPPED/FAILED carrying the same sequence number.  Every type is a
frozen dataclass (as common/vhost_user.py's structs) with its payload layout and how many fds it
carries; `MESSAGES` maps the header's type to it, and the four channel sets below say which side
may send which.  Anything else is malformed; every fd that arrives with a malformed message is
closed, in decode(), the one gate every received message passes.
"""

from __future__ import annotations

import array
import enum
import errno
import os
import socket
import struct
from dataclasses import dataclass, fields
from typing import ClassVar

MAX_MESSAGE = 4096
# A MEM_TABLE carries one fd per guest memory region, so this bounds the memory slots the
# supervisor can offer (GET_MAX_MEM_SLOTS).
MAX_FDS = 32

HEADER = struct.Struct("=HxxI")        # type, sequence number
REGION = struct.Struct("=QQQQ")        # guest_phys_addr, memory_size, userspace_addr, mmap_offset


class MsgType(enum.IntEnum):
    # supervisor -> worker
    MEM_TABLE = 1      # regions (n <= MAX_FDS) + one fd per region
    RING_START = 2     # ring geometry and next avail index; fds: kick, call, err (flags say which)
    RING_STOP = 3      # stop processing; answered by STOPPED with the next avail index
    SET_CALL = 4       # replace the call eventfd (0 or 1 fd)
    SET_ENABLE = 5     # enable (1) / disable (0) processing of a started ring
    SHUTDOWN = 6       # exit cleanly
    MEM_UNMAP = 7      # drop all guest memory (the front-end is gone; its rings are stopped)
    # device state (worker/migration.py), while every ring is stopped
    STATE_SAVE = 24    # take the device state and write it to the fd (the front-end's pipe end)
    STATE_LOAD = 25    # read a device state from the fd to EOF and apply it
    STATE_CHECK = 26   # whether the last save or load completed: ACK, or FAILED with errno
    STATE_PREPARE = 27  # the pre-migration pass: record where every inode is now
    LOG_BASE = 12      # the dirty log: size, offset + its fd (no fd: no log)
    LOG_STATE = 13     # dirty logging on/off, the ring's log flag and used-ring log address
    SET_INFLIGHT = 8   # the queue's part of the vhost-user inflight region (0 or 1 fd)
    # spawner protocol (supervisor <-> spawner)
    SPAWN = 16         # queue index; fd: the worker's end of its control channel
    SPAWNED = 17       # pid of the new worker (or standby spawner)
    STANDBY = 18       # clone a standby spawner sharing the fd table; fd: its channel end
    # worker -> supervisor
    READY = 32         # worker (or standby spawner) is up (sequence 0)
    ACK = 33
    STOPPED = 34       # next avail index
    FAILED = 35        # errno
    # worker -> supervisor: DAX window requests, each answered by DAX_DONE (supervisor/dax.py)
    DAX_MAP = 40       # map an open file's range into the window; fd: the file
    DAX_UNMAP = 41     # unmap a window range (length ~0: the whole window)
    DAX_SYNC = 42      # write back what the window maps of an open file (FUSE_FSYNC)
    # supervisor -> worker
    DAX_DONE = 43      # the answer to a DAX request: 0 or an errno
    # worker -> supervisor: READ/WRITE data in the window, moved by the front-end (FS_IO)
    DAX_IO = 44        # fd: the file
    # supervisor -> worker
    DAX_IO_DONE = 45   # the answer to DAX_IO: an errno, or 0 and the bytes moved


class RingFlag(enum.IntFlag):
    EVENT_IDX = 1
    ENABLED = 2
    HAS_KICK = 4
    HAS_CALL = 8
    # A respawned worker continues where its queue's inflight journal says (common/journal.py)
    # and first completes what the dead worker left in flight.
    RESUME = 16
    INDIRECT = 32
    HAS_ERR = 64


class ProtocolError(Exception):
    """A malformed or unexpected control message: the sender is not to be trusted further.

    `seq` is the message's sequence number when its header could be read, so that a request
    that cannot be honoured (its fds did not arrive) can still be answered, with `errno`."""

    def __init__(self, what: str, seq: int | None = None, err: int = errno.EPROTO) -> None:
        super().__init__(what)
        self.seq = seq
        self.errno = err


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One control message: the header's sequence number, the fds that travel with it, and
    (in each subclass) the fixed payload, in `STRUCT`'s order.  `FDS` is the (min, max) number
    of fds the type may carry; every type not listed with fds carries none."""

    seq: int
    fds: tuple[int, ...] = ()

    TYPE: ClassVar[MsgType]
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=")
    FDS: ClassVar[tuple[int, int]] = (0, 0)

    @property
    def type(self) -> MsgType:
        return self.TYPE

    def payload(self) -> tuple[int, ...]:
        # The fields after seq and fds (which travel in the header and as SCM_RIGHTS).
        return tuple(getattr(self, f.name) for f in fields(self)[2:])

    def pack(self) -> bytes:
        """The datagram; the fds go alongside it (send())."""
        return HEADER.pack(self.TYPE, self.seq) + self.STRUCT.pack(*self.payload())

    @classmethod
    def unpack(cls, seq: int, body: bytes, fds: tuple[int, ...] = ()) -> Message:
        """`body` must be exactly STRUCT.size bytes (decode() checks)."""
        return cls(*cls.STRUCT.unpack(body), seq=seq, fds=fds)

    def is_valid(self) -> bool:
        """Syntax only: as many fds as the type may carry."""
        lo, hi = self.FDS
        return lo <= len(self.fds) <= hi


@dataclass(frozen=True, slots=True)
class Region:
    """One guest memory region of a MEM_TABLE (the vhost-user MemoryRegion, as forwarded)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    STRUCT: ClassVar[struct.Struct] = REGION

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> Region:
        return cls(*cls.STRUCT.unpack_from(data, offset))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr,
                                self.mmap_offset)


# -- supervisor -> worker ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MemTable(Message):
    """The guest memory table: n <= MAX_FDS regions, exactly one fd per region."""

    regions: tuple[Region, ...]

    TYPE: ClassVar[MsgType] = MsgType.MEM_TABLE

    def pack(self) -> bytes:
        return HEADER.pack(self.TYPE, self.seq) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, seq: int, body: bytes, fds: tuple[int, ...] = ()) -> MemTable:
        """`body` must be a whole number of regions (decode() checks)."""
        return cls(tuple(Region.unpack(body, i) for i in range(0, len(body), REGION.size)),
                   seq=seq, fds=fds)

    def is_valid(self) -> bool:
        return 0 < len(self.regions) <= MAX_FDS and len(self.fds) == len(self.regions)


@dataclass(frozen=True, slots=True)
class RingStart(Message):
    """Ring geometry and next avail index; fds: kick, call, err, in that order, each present
    only when `flags` has HAS_KICK / HAS_CALL / HAS_ERR."""

    num: int
    flags: RingFlag
    desc: int
    avail: int
    used: int
    next_avail: int

    TYPE: ClassVar[MsgType] = MsgType.RING_START
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIQQQII")   # ..., next_avail, pad
    FDS: ClassVar[tuple[int, int]] = (0, 3)

    def payload(self) -> tuple[int, ...]:
        return (self.num, int(self.flags), self.desc, self.avail, self.used, self.next_avail,
                0)

    @classmethod
    def unpack(cls, seq: int, body: bytes, fds: tuple[int, ...] = ()) -> RingStart:
        num, flags, desc, avail, used, next_avail, _pad = cls.STRUCT.unpack(body)
        return cls(num, RingFlag(flags), desc, avail, used, next_avail, seq=seq, fds=fds)


@dataclass(frozen=True, slots=True)
class RingStop(Message):
    """Stop processing; answered by STOPPED with the next avail index."""

    TYPE: ClassVar[MsgType] = MsgType.RING_STOP


@dataclass(frozen=True, slots=True)
class SetCall(Message):
    """Replace the call eventfd: `has_fd` 1 with the fd attached, 0 for none (polling)."""

    has_fd: int

    TYPE: ClassVar[MsgType] = MsgType.SET_CALL
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=I")
    FDS: ClassVar[tuple[int, int]] = (0, 1)


@dataclass(frozen=True, slots=True)
class SetEnable(Message):
    """Enable (1) or disable (0) processing of a started ring."""

    enabled: int

    TYPE: ClassVar[MsgType] = MsgType.SET_ENABLE
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    """Exit cleanly (a worker, or the spawner)."""

    TYPE: ClassVar[MsgType] = MsgType.SHUTDOWN


@dataclass(frozen=True, slots=True)
class MemUnmap(Message):
    """Drop all guest memory (the front-end is gone; its rings are stopped)."""

    TYPE: ClassVar[MsgType] = MsgType.MEM_UNMAP


# -- dirty-page logging (vhost-user "Migration"; worker/dirtylog.py) -------------------------
@dataclass(frozen=True, slots=True)
class LogBase(Message):
    """The front-end's dirty log (SET_LOG_BASE): `size` bytes at `offset` in the attached fd,
    which the worker maps and uses from its next write to guest memory on; size 0 and no fd:
    no log (the worker unmaps it)."""

    size: int
    offset: int

    TYPE: ClassVar[MsgType] = MsgType.LOG_BASE
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQ")
    FDS: ClassVar[tuple[int, int]] = (0, 1)

    def is_valid(self) -> bool:
        return len(self.fds) == (1 if self.size else 0)


@dataclass(frozen=True, slots=True)
class LogState(Message):
    """Whether writes are logged (VHOST_F_LOG_ALL), and the worker's ring's VHOST_VRING_F_LOG
    with the guest-physical address its used-ring writes are logged at (SET_VRING_ADDR)."""

    log_all: int
    ring: int
    used_gpa: int

    TYPE: ClassVar[MsgType] = MsgType.LOG_STATE
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIQ")

    def is_valid(self) -> bool:
        return self.log_all in (0, 1) and self.ring in (0, 1) and not self.fds
@dataclass(frozen=True, slots=True)
class SetInflight(Message):
    """The queue's part of the vhost-user inflight region (common/inflight.py), used from the
    next RING_START on: `length` bytes at `offset` of the attached memfd, for `desc_num`
    descriptors.  Without an fd (`has_fd` 0): no region."""

    offset: int
    length: int
    desc_num: int
    has_fd: int

    TYPE: ClassVar[MsgType] = MsgType.SET_INFLIGHT
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQII")
    FDS: ClassVar[tuple[int, int]] = (0, 1)

    def is_valid(self) -> bool:
        if self.has_fd > 1 or len(self.fds) != self.has_fd:
            return False
        # A queue's part: 8-byte aligned words, the header and desc_num 16-byte entries.
        return not self.has_fd or (self.offset % 64 == 0 and 0 < self.desc_num <= 32768
                                   and 16 * self.desc_num + 16 <= self.length <= 1 << 20)


# -- supervisor <-> spawner --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Spawn(Message):
    """Start the worker of `queue`; fd: the worker's end of its control channel."""

    queue: int

    TYPE: ClassVar[MsgType] = MsgType.SPAWN
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=I")
    FDS: ClassVar[tuple[int, int]] = (1, 1)


@dataclass(frozen=True, slots=True)
class Spawned(Message):
    """The pid of the new worker (or standby spawner)."""

    pid: int

    TYPE: ClassVar[MsgType] = MsgType.SPAWNED
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class Standby(Message):
    """Clone a standby spawner sharing the fd table; fd: its channel end."""

    TYPE: ClassVar[MsgType] = MsgType.STANDBY
    FDS: ClassVar[tuple[int, int]] = (1, 1)


# -- worker (or spawner) -> supervisor ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready(Message):
    """The worker of `queue` (or a standby spawner, 0) is up; always sequence 0."""

    queue: int

    TYPE: ClassVar[MsgType] = MsgType.READY
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class Ack(Message):
    TYPE: ClassVar[MsgType] = MsgType.ACK


@dataclass(frozen=True, slots=True)
class Stopped(Message):
    """The answer to RING_STOP: where the front-end is to continue."""

    next_avail: int

    TYPE: ClassVar[MsgType] = MsgType.STOPPED
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class Failed(Message):
    """A request refused, with the reason."""

    errno: int

    TYPE: ClassVar[MsgType] = MsgType.FAILED
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=i")


# -- worker -> supervisor: the DAX window (supervisor/dax.py) ----------------------------------
# Requests a worker makes while it serves a FUSE request; the supervisor validates each against
# the window and the open handles before the front-end hears of it.  The sequence numbers are
# the worker's own; DAX_DONE echoes them.
DAX_ALL = (1 << 64) - 1      # a length meaning "the whole window"


@dataclass(frozen=True, slots=True)
class DaxMap(Message):
    """FUSE_SETUPMAPPING: map [foffset, +length) of open file `fh` at window offset `moffset`;
    `flags` are FUSE_SETUPMAPPING_FLAG_*; fd: the handle's file."""

    fh: int
    foffset: int
    length: int
    moffset: int
    flags: int

    TYPE: ClassVar[MsgType] = MsgType.DAX_MAP
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQQI4x")
    FDS: ClassVar[tuple[int, int]] = (1, 1)


@dataclass(frozen=True, slots=True)
class DaxUnmap(Message):
    """FUSE_REMOVEMAPPING (one range), or the whole window with length DAX_ALL."""

    moffset: int
    length: int

    TYPE: ClassVar[MsgType] = MsgType.DAX_UNMAP
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQ")


@dataclass(frozen=True, slots=True)
class DaxSync(Message):
    """FUSE_FSYNC of open file `fh`: write back what the window maps of its file first."""

    fh: int

    TYPE: ClassVar[MsgType] = MsgType.DAX_SYNC
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=Q")


@dataclass(frozen=True, slots=True)
class DaxDone(Message):
    """The answer to a DAX request: 0, or the errno the guest gets."""

    errno: int

    TYPE: ClassVar[MsgType] = MsgType.DAX_DONE
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=i")


@dataclass(frozen=True, slots=True)
class DaxIo(Message):
    """READ (write=0: file -> window) or WRITE (write=1: window -> file) of `length` bytes at
    file offset `foffset` of open file `fh`, the guest's buffer at guest-physical `gpa`,
    outside guest RAM (in the window); fd: the handle's file."""

    fh: int
    foffset: int
    gpa: int
    length: int
    write: int

    TYPE: ClassVar[MsgType] = MsgType.DAX_IO
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQQI4x")
    FDS: ClassVar[tuple[int, int]] = (1, 1)


@dataclass(frozen=True, slots=True)
class DaxIoDone(Message):
    """The answer to DAX_IO: errno 0 and the bytes the front-end moved, or the errno."""

    errno: int
    count: int

    TYPE: ClassVar[MsgType] = MsgType.DAX_IO_DONE
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=i4xQ")


# -- device state (supervisor -> worker) -------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StateSave(Message):
    """Take the device state now and, once answered, write it to the fd and close it (the
    answer comes first: the front-end reads only after its SET_DEVICE_STATE_FD reply)."""

    TYPE: ClassVar[MsgType] = MsgType.STATE_SAVE
    FDS: ClassVar[tuple[int, int]] = (1, 1)


@dataclass(frozen=True, slots=True)
class StateLoad(Message):
    """Once answered, read a device state from the fd until EOF, check it and apply it."""

    TYPE: ClassVar[MsgType] = MsgType.STATE_LOAD
    FDS: ClassVar[tuple[int, int]] = (1, 1)


@dataclass(frozen=True, slots=True)
class StateCheck(Message):
    """Did the last save or load complete?  ACK, or FAILED with the reason's errno."""

    TYPE: ClassVar[MsgType] = MsgType.STATE_CHECK


@dataclass(frozen=True, slots=True)
class StatePrepare(Message):
    """The pre-migration pass (dirty logging started): record every inode's location."""

    TYPE: ClassVar[MsgType] = MsgType.STATE_PREPARE


STATE_MESSAGES = frozenset({MsgType.STATE_SAVE, MsgType.STATE_LOAD, MsgType.STATE_CHECK,
                            MsgType.STATE_PREPARE})

MESSAGES: dict[MsgType, type[Message]] = {
    cls.TYPE: cls for cls in (MemTable, RingStart, RingStop, SetCall, SetEnable, Shutdown,
                              MemUnmap, SetInflight, Spawn, Spawned, Standby, Ready, Ack,
                              Stopped, Failed, DaxMap, DaxUnmap, DaxSync, DaxDone, DaxIo,
                              DaxIoDone, LogBase, LogState, StateSave, StateLoad, StateCheck,
                              StatePrepare)
}
assert set(MESSAGES) == set(MsgType)

TO_WORKER = frozenset({MsgType.MEM_TABLE, MsgType.RING_START, MsgType.RING_STOP,
                       MsgType.SET_CALL, MsgType.SET_ENABLE, MsgType.SHUTDOWN,
                       MsgType.MEM_UNMAP, MsgType.SET_INFLIGHT, MsgType.DAX_DONE,
                       MsgType.DAX_IO_DONE, MsgType.LOG_BASE, MsgType.LOG_STATE}) | STATE_MESSAGES
WORKER_ASKS = frozenset({MsgType.DAX_MAP, MsgType.DAX_UNMAP, MsgType.DAX_SYNC,
                         MsgType.DAX_IO})
FROM_WORKER = frozenset({MsgType.READY, MsgType.ACK, MsgType.STOPPED, MsgType.FAILED}
                        | WORKER_ASKS)
TO_SPAWNER = frozenset({MsgType.SPAWN, MsgType.STANDBY, MsgType.SHUTDOWN})
FROM_SPAWNER = frozenset({MsgType.SPAWNED, MsgType.READY, MsgType.FAILED})


@dataclass(frozen=True, slots=True)
class RingGeometry:
    num: int
    flags: RingFlag
    desc: int
    avail: int
    used: int
    next_avail: int


def decode(data: bytes, fds: list[int], allowed: frozenset[MsgType]) -> Message:
    """Parse one datagram; on any error close `fds` and raise ProtocolError."""
    try:
        if len(data) < HEADER.size:
            raise ProtocolError(f"message of {len(data)} bytes is shorter than the header")
        mtype_raw, seq = HEADER.unpack_from(data)
        try:
            mtype = MsgType(mtype_raw)
        except ValueError:
            raise ProtocolError(f"unknown message type {mtype_raw}") from None
        if mtype not in allowed:
            raise ProtocolError(f"message {mtype.name} is not allowed on this channel")
        body = data[HEADER.size:]
        cls = MESSAGES[mtype]
        if cls is MemTable:
            if len(body) % REGION.size or not 0 < len(body) // REGION.size <= MAX_FDS:
                raise ProtocolError(f"MEM_TABLE body of {len(body)} bytes")
        elif len(body) != cls.STRUCT.size:
            raise ProtocolError(f"{mtype.name} body of {len(body)} bytes, "
                                f"expected {cls.STRUCT.size}")
        msg = cls.unpack(seq, body, tuple(fds))
        if not msg.is_valid():
            raise ProtocolError(f"{mtype.name} with {len(fds)} fds")
        return msg
    except ProtocolError:
        close_fds(fds)
        raise


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send(sock: socket.socket, msg: Message) -> None:
    """Send `msg` with its fds (which stay open: the sender keeps them)."""
    send_bytes(sock, msg.pack(), msg.fds)


def send_bytes(sock: socket.socket, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def receive(sock: socket.socket, allowed: frozenset[MsgType]) -> Message | None:
    """One message, or None at EOF. Truncated datagrams or fds are protocol errors."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        seq = HEADER.unpack_from(data)[1] if len(data) >= HEADER.size else None
        if flags & socket.MSG_CTRUNC:
            # Also what the kernel does when the receiver's fd table is full (EMFILE).
            raise ProtocolError("control message whose fds could not all be received", seq,
                                errno.EMFILE)
        raise ProtocolError("truncated control message", seq)
    if not data and not fds:
        return None
    return decode(data, list(fds), allowed)
