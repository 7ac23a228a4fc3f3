"""The supervisor <-> worker control channel: a small typed message set (no pickle).

Each message is one SOCK_SEQPACKET datagram: a header (type, sequence number) followed by the
fixed payload of that type; fds travel as SCM_RIGHTS.  Requests flow supervisor -> worker, each
answered by exactly one ACK/STOPPED/FAILED carrying the same sequence number.  `MESSAGES` is the
whole protocol: which side may send a type, its payload layout, and how many fds it carries.
Anything else is malformed; every fd that arrives with a malformed message is closed.
"""

from __future__ import annotations

import array
import enum
import errno
import os
import socket
import struct
from dataclasses import dataclass

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
    # spawner protocol (supervisor <-> spawner)
    SPAWN = 16         # queue index; fd: the worker's end of its control channel
    SPAWNED = 17       # pid of the new worker (or standby spawner)
    STANDBY = 18       # clone a standby spawner sharing the fd table; fd: its channel end
    # worker -> supervisor
    READY = 32         # worker (or standby spawner) is up (sequence 0)
    ACK = 33
    STOPPED = 34       # next avail index
    FAILED = 35        # errno


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


_PAYLOAD: dict[MsgType, struct.Struct | None] = {
    MsgType.MEM_TABLE: None,                       # variable: n * REGION
    MsgType.RING_START: struct.Struct("=IIQQQII"),  # num, flags, desc, avail, used, next_avail, pad
    MsgType.RING_STOP: struct.Struct("="),
    MsgType.SET_CALL: struct.Struct("=I"),          # 1 = fd attached, 0 = none (polling)
    MsgType.SET_ENABLE: struct.Struct("=I"),
    MsgType.SHUTDOWN: struct.Struct("="),
    MsgType.MEM_UNMAP: struct.Struct("="),
    MsgType.SPAWN: struct.Struct("=I"),
    MsgType.SPAWNED: struct.Struct("=I"),
    MsgType.STANDBY: struct.Struct("="),
    MsgType.READY: struct.Struct("=I"),             # queue index
    MsgType.ACK: struct.Struct("="),
    MsgType.STOPPED: struct.Struct("=I"),
    MsgType.FAILED: struct.Struct("=i"),
}

# (min fds, max fds) per type; None for MEM_TABLE means "exactly one per region".
_FDS: dict[MsgType, tuple[int, int] | None] = {
    MsgType.MEM_TABLE: None,
    MsgType.RING_START: (0, 3),
    MsgType.SET_CALL: (0, 1),
    MsgType.SPAWN: (1, 1),
    MsgType.STANDBY: (1, 1),
}

TO_WORKER = frozenset({MsgType.MEM_TABLE, MsgType.RING_START, MsgType.RING_STOP,
                       MsgType.SET_CALL, MsgType.SET_ENABLE, MsgType.SHUTDOWN,
                       MsgType.MEM_UNMAP})
FROM_WORKER = frozenset({MsgType.READY, MsgType.ACK, MsgType.STOPPED, MsgType.FAILED})
TO_SPAWNER = frozenset({MsgType.SPAWN, MsgType.STANDBY, MsgType.SHUTDOWN})
FROM_SPAWNER = frozenset({MsgType.SPAWNED, MsgType.READY, MsgType.FAILED})


class ProtocolError(Exception):
    """A malformed or unexpected control message: the sender is not to be trusted further.

    `seq` is the message's sequence number when its header could be read, so that a request
    that cannot be honoured (its fds did not arrive) can still be answered, with `errno`."""

    def __init__(self, what: str, seq: int | None = None, err: int = errno.EPROTO) -> None:
        super().__init__(what)
        self.seq = seq
        self.errno = err


@dataclass(frozen=True, slots=True)
class Message:
    type: MsgType
    seq: int
    fields: tuple
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RingGeometry:
    num: int
    flags: RingFlag
    desc: int
    avail: int
    used: int
    next_avail: int


def encode(mtype: MsgType, seq: int, *fields: int, regions: tuple = ()) -> bytes:
    head = HEADER.pack(mtype, seq)
    if mtype is MsgType.MEM_TABLE:
        return head + b"".join(REGION.pack(*r) for r in regions)
    st = _PAYLOAD[mtype]
    assert st is not None
    return head + st.pack(*fields)


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
        if mtype is MsgType.MEM_TABLE:
            if len(body) % REGION.size or not 0 < len(body) // REGION.size <= MAX_FDS:
                raise ProtocolError(f"MEM_TABLE body of {len(body)} bytes")
            fields = tuple(REGION.unpack_from(body, i) for i in range(0, len(body), REGION.size))
            if len(fds) != len(fields):
                raise ProtocolError(f"MEM_TABLE with {len(fields)} regions but {len(fds)} fds")
        else:
            st = _PAYLOAD[mtype]
            assert st is not None
            if len(body) != st.size:
                raise ProtocolError(f"{mtype.name} body of {len(body)} bytes, expected {st.size}")
            fields = st.unpack(body)
            lo, hi = _FDS.get(mtype) or (0, 0)
            if not lo <= len(fds) <= hi:
                raise ProtocolError(f"{mtype.name} with {len(fds)} fds")
        return Message(mtype, seq, fields, tuple(fds))
    except ProtocolError:
        close_fds(fds)
        raise


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send(sock: socket.socket, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
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
