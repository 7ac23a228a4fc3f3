"""Split-virtqueue and virtio-fs wire formats (virtio spec 1.3 section 2.7, 5.11). Little-endian.

Data only: no mmap or socket here.  Offsets are relative to the start of each ring part.
"""

from __future__ import annotations

import enum
import struct


class Feature(enum.IntFlag):
    """Device-independent virtio feature bits a split-ring back-end cares about (spec 6)."""

    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    # Bit 30 is reused by vhost-user for VHOST_USER_F_PROTOCOL_FEATURES (vhost_user.py).
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35


class DescFlag(enum.IntFlag):
    NEXT = 1
    WRITE = 2
    INDIRECT = 4


AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768

# struct virtq_desc: addr, len, flags, next (spec 2.7.5)
DESC = struct.Struct("<QIHH")
# struct virtq_used_elem: id (head index), len (bytes written) (spec 2.7.8)
USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")

DESC_SIZE = DESC.size


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    """flags, idx, ring[num], used_event."""
    return 4 + 2 * num + 2


def used_ring_size(num: int) -> int:
    """flags, idx, ring[num] of used elements, avail_event."""
    return 4 + 8 * num + 2


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event (spec 2.7.10): notify when new_idx passed event_idx since old_idx."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


# virtio-fs (spec 5.11)
VIRTIO_ID_FS = 26
FS_TAG_LEN = 36
# struct virtio_fs_config as Linux and QEMU define it: tag[36], num_request_queues (40 bytes).
FS_CONFIG = struct.Struct("<36sI")
