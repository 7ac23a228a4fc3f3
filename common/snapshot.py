"""The state crosvm's SNAPSHOT takes and RESTORE gives back (docs/crosvm.md).

crosvm treats it as opaque bytes that come back, whole, to a fresh back-end.  Besides the device
state proper (what a migration's SET_DEVICE_STATE_FD carries, nested whole and checked by the
worker that loads it, all or nothing), a fresh back-end needs what the front-end negotiated and
each ring's place, because crosvm's RESTORE is not followed by the ring set-up messages: it
brings the rings back asleep, and WAKE starts them.  Ring addresses are guest-physical: the
front-end that restores may map guest memory at other addresses of its own.  Pure data, no I/O.

Layout (little-endian):

    magic "PVFSSNAP" | version u16 | ring count u16 | acked features u64 |
    acked protocol features u64 | crc32 u32 (of the bytes before it and the ring records)
    ring record, per ring: size u32 | flags u32 (bit 0 enabled, bit 1 was running, bit 2 has
        addresses) | next avail index u16 | reserved u16 | desc, avail, used guest-physical
        addresses u64 each
    the device state (docs/state-format.md, or docs/rust-state-format.md), to the end
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib

from pyvirtiofsd.common.devstate import StateError

MAGIC = b"PVFSSNAP"
VERSION = 1
MAX_RINGS = 1 + 64          # hiprio and the most request queues the daemon serves

_HEADER = struct.Struct("<8sHHQQ")
_CRC = struct.Struct("<I")
_RING = struct.Struct("<IIHHQQQ")


class RingFlag(enum.IntFlag):
    ENABLED = 1 << 0
    RUNNING = 1 << 1        # it was started when SLEEP stopped it: WAKE starts it again
    ADDRESSED = 1 << 2      # desc, avail and used were set


@dataclasses.dataclass(frozen=True)
class RingState:
    size: int
    flags: RingFlag
    base: int
    desc: int
    avail: int
    used: int


@dataclasses.dataclass(frozen=True)
class Snapshot:
    acked_features: int
    acked_protocol_features: int
    rings: tuple[RingState, ...]
    state: bytes            # the device state, as SET_DEVICE_STATE_FD would carry it


def encode(snap: Snapshot) -> bytes:
    if len(snap.rings) > MAX_RINGS:
        raise StateError(f"snapshot of {len(snap.rings)} rings: more than {MAX_RINGS}")
    head = _HEADER.pack(MAGIC, VERSION, len(snap.rings), snap.acked_features,
                        snap.acked_protocol_features)
    rings = b"".join(_RING.pack(r.size, int(r.flags), r.base, 0, r.desc, r.avail, r.used)
                     for r in snap.rings)
    return head + _CRC.pack(zlib.crc32(rings, zlib.crc32(head))) + rings + snap.state


def decode(data: bytes | bytearray | memoryview) -> Snapshot:
    """The snapshot in `data`, its framing and rings checked (the nested device state is
    checked by the worker that loads it); StateError, one line, for anything wrong."""
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size + _CRC.size:
        raise StateError(f"snapshot truncated: {len(view)} bytes")
    magic, version, count, features, protocol = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise StateError("bad magic: this is not a pyvirtiofsd snapshot")
    if version != VERSION:
        raise StateError(f"snapshot version {version} is not supported (this daemon reads "
                         f"{VERSION})")
    if count > MAX_RINGS:
        raise StateError(f"snapshot of {count} rings: more than {MAX_RINGS}")
    start = _HEADER.size + _CRC.size
    end = start + count * _RING.size
    if len(view) < end:
        raise StateError("snapshot truncated in its ring records")
    (crc,) = _CRC.unpack_from(view, _HEADER.size)
    if zlib.crc32(view[start:end], zlib.crc32(view[:_HEADER.size])) != crc:
        raise StateError("snapshot checksum mismatch: it is corrupt")
    rings = []
    for i in range(count):
        size, flags, base, reserved, desc, avail, used = _RING.unpack_from(
            view, start + i * _RING.size)
        if reserved or flags & ~int(RingFlag.ENABLED | RingFlag.RUNNING | RingFlag.ADDRESSED):
            raise StateError(f"snapshot ring {i} has reserved bits set")
        if flags & RingFlag.RUNNING and (not size or size & (size - 1)
                                         or not flags & RingFlag.ADDRESSED):
            raise StateError(f"snapshot ring {i} was running without a size or addresses")
        if base > 0xFFFF or (not flags & RingFlag.ADDRESSED and (desc or avail or used)):
            raise StateError(f"snapshot ring {i} is inconsistent")
        rings.append(RingState(size, RingFlag(flags), base, desc, avail, used))
    if len(view) == end:
        raise StateError("snapshot without a device state")
    return Snapshot(features, protocol, tuple(rings), bytes(view[end:]))
