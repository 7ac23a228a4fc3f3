"""vhost-user wire formats (QEMU docs/interop/vhost-user.rst; protocol.md section 1).

Data only: request codes, feature bits, the header and every payload this back-end handles, each
with a syntax-only `is_valid()`.  Host-native byte order ('=') as the spec requires.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar

VERSION = 0x1
MAX_PAYLOAD = 0x1000          # larger payloads are refused (rust-vmm MAX_MSG_SIZE)
MAX_FDS = 32                  # fds accepted in one message (rust-vmm MAX_ATTACHED_FD_ENTRIES)
MEMORY_BASELINE_NREGIONS = 8  # regions in one SET_MEM_TABLE
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
MAX_CONFIG_SIZE = 256
# crosvm's RESTORE carries a whole snapshot as its payload: its own, larger bound.
MAX_RESTORE_PAYLOAD = 64 << 20


class HeaderFlag(enum.IntFlag):
    VERSION_MASK = 0x3
    REPLY = 0x4
    NEED_REPLY = 0x8


class Request(enum.IntEnum):
    """Front-end -> back-end requests (section 1.4)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44       # crosvm's GET_SHARED_MEMORY_REGIONS (section 1.13)
    # crosvm's own requests (its vmm_vhost crate from March 2024 until they were replaced there
    # by GET_VRING_BASE and DEVICE_STATE): sent with flags VERSION alone, each answered with
    # CROSVM_SUCCESS, SNAPSHOT's answer followed by the state; RESTORE carries the state as its
    # payload and, as fds, either nothing or one kick eventfd per ring.
    SLEEP = 1000        # stop every ring where it is, keeping its notifiers
    WAKE = 1001         # start the rings SLEEP stopped, from where they stopped
    SNAPSHOT = 1002     # the device's whole state, while asleep
    RESTORE = 1003      # bring a SNAPSHOT back into a fresh back-end, leaving it asleep


class ProtocolFeature(enum.IntFlag):
    """GET/SET_PROTOCOL_FEATURES bits (section 1.3)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    SHMEM = 1 << 22             # VIRTIO shared memory regions (section 1.3: bit 22)


# VHOST_USER_F_PROTOCOL_FEATURES: reuses the legacy virtio bit 30 (section 1.2).
F_PROTOCOL_FEATURES = 1 << 30
# VHOST_F_LOG_ALL: set by the front-end to start dirty logging.
F_LOG_ALL = 1 << 26


@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=III")

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        return cls(*cls.STRUCT.unpack(data))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.request, self.flags, self.size)

    def is_valid(self) -> bool:
        """Version 1, no reserved flag bits, no REPLY bit on a request, bounded size."""
        return (
            self.flags & HeaderFlag.VERSION_MASK == VERSION
            and self.flags & ~0xF == 0
            and not self.flags & HeaderFlag.REPLY
            and self.size <= (MAX_RESTORE_PAYLOAD if self.request == Request.RESTORE
                              else MAX_PAYLOAD)
        )

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)


HEADER_SIZE = Header.STRUCT.size
U64 = struct.Struct("=Q")


@dataclass(frozen=True, slots=True)
class VringState:
    """vhost_vring_state: SET/GET_VRING_BASE, SET_VRING_NUM, SET_VRING_ENABLE."""

    index: int
    num: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")

    @classmethod
    def unpack(cls, data: bytes) -> VringState:
        return cls(*cls.STRUCT.unpack(data))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """vhost_vring_addr: descriptor, used, available (in this order) and log addresses."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    F_LOG: ClassVar[int] = 0x1

    @classmethod
    def unpack(cls, data: bytes) -> VringAddr:
        return cls(*cls.STRUCT.unpack(data))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    def is_valid(self) -> bool:
        """Ring part alignment from the virtio spec 2.7 (desc 16, avail 2, used 4)."""
        return (
            self.flags & ~self.F_LOG == 0
            and self.desc & 0xF == 0
            and self.avail & 0x1 == 0
            and self.used & 0x3 == 0
        )


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """VhostUserMemoryRegion: a guest-physical range and where it sits in the sender and the fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> MemoryRegion:
        return cls(*cls.STRUCT.unpack_from(data, offset))

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    def is_valid(self) -> bool:
        limit = 1 << 64
        return (
            self.memory_size > 0
            and self.guest_phys_addr + self.memory_size <= limit
            and self.userspace_addr + self.memory_size <= limit
            and self.mmap_offset + self.memory_size <= limit
        )


MEMORY_HEADER = struct.Struct("=I4x")           # VhostUserMemory: nregions, padding
SINGLE_REGION_PAD = struct.Struct("=8x")        # VhostUserMemRegMsg: padding before the region


def unpack_memory_table(payload: bytes) -> list[MemoryRegion]:
    """SET_MEM_TABLE payload -> regions; raises ValueError when sizes disagree."""
    if len(payload) < MEMORY_HEADER.size:
        raise ValueError("memory table shorter than its header")
    (n,) = MEMORY_HEADER.unpack_from(payload)
    if not 1 <= n <= MEMORY_BASELINE_NREGIONS:
        raise ValueError(f"memory table with {n} regions (1..{MEMORY_BASELINE_NREGIONS})")
    if len(payload) < MEMORY_HEADER.size + n * MemoryRegion.STRUCT.size:
        raise ValueError(f"memory table of {len(payload)} bytes cannot hold {n} regions")
    return [
        MemoryRegion.unpack(payload, MEMORY_HEADER.size + i * MemoryRegion.STRUCT.size)
        for i in range(n)
    ]


def pack_memory_table(regions: list[MemoryRegion]) -> bytes:
    return MEMORY_HEADER.pack(len(regions)) + b"".join(r.pack() for r in regions)


def unpack_single_region(payload: bytes) -> MemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG payload (the 40-byte VhostUserMemRegMsg)."""
    if len(payload) < SINGLE_REGION_PAD.size + MemoryRegion.STRUCT.size:
        raise ValueError("single memory region payload too short")
    return MemoryRegion.unpack(payload, SINGLE_REGION_PAD.size)


def pack_single_region(region: MemoryRegion) -> bytes:
    return SINGLE_REGION_PAD.pack() + region.pack()


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """VhostUserConfig header; the payload bytes follow it."""

    offset: int
    size: int
    flags: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=III")

    @classmethod
    def unpack(cls, data: bytes) -> ConfigSpace:
        return cls(*cls.STRUCT.unpack_from(data))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.offset, self.size, self.flags)

    def is_valid(self, payload_len: int) -> bool:
        return (
            0 < self.size <= MAX_CONFIG_SIZE
            and payload_len == self.STRUCT.size + self.size
            and self.offset + self.size <= MAX_CONFIG_SIZE
        )


# -- the back-end channel (section 1.5): DAX window requests --------------------------------------
class FsBackendRequest(enum.IntEnum):
    """cloud-hypervisor's virtio-fs cache-window requests on the back-end channel (rust-vmm's
    numbering until 2024-05; protocol.md 1.5, legacy table)."""

    FS_MAP = 6
    FS_UNMAP = 7
    FS_SYNC = 8
    FS_IO = 9


class ShmemBackendRequest(enum.IntEnum):
    """VIRTIO shared memory region requests on the back-end channel (VU+, section 1.13).

    The two families share numbers (FS_IO and SHMEM_MAP are both 9), so a connection speaks
    one of them, decided by the negotiated SHMEM protocol feature (supervisor/dax.py)."""

    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


FS_ENTRIES = 8                  # VHOST_USER_FS_BACKEND_ENTRIES
FS_UNMAP_ALL = (1 << 64) - 1    # FS_UNMAP len meaning "the whole window" (cloud-hypervisor)


class FsMapFlag(enum.IntFlag):
    """VhostUserFSBackendMsg flags (VHOST_USER_FS_FLAG_MAP_R/W)."""

    MAP_R = 1 << 0
    MAP_W = 1 << 1


@dataclass(frozen=True, slots=True)
class FsBackendMsg:
    """VhostUserFSBackendMsg: up to FS_ENTRIES (fd_offset, cache_offset, len, flags) ranges,
    stored as four arrays; unused entries have len 0 and are skipped by the front-end."""

    entries: tuple[tuple[int, int, int, int], ...]

    STRUCT: ClassVar[struct.Struct] = struct.Struct(f"={4 * FS_ENTRIES}Q")

    @classmethod
    def unpack(cls, data: bytes) -> FsBackendMsg:
        v = cls.STRUCT.unpack(data)
        n = FS_ENTRIES
        return cls(tuple((v[i], v[n + i], v[2 * n + i], v[3 * n + i]) for i in range(n)))

    def pack(self) -> bytes:
        rows = list(self.entries) + [(0, 0, 0, 0)] * (FS_ENTRIES - len(self.entries))
        return self.STRUCT.pack(*(row[k] for k in range(4) for row in rows))

    def is_valid(self) -> bool:
        return len(self.entries) <= FS_ENTRIES and all(
            0 <= x < 1 << 64 for row in self.entries for x in row)


class ShmemFlag(enum.IntFlag):
    """VhostUserMMap flags (VU+: 0 read-only, 1 read-write)."""

    WRITABLE = 1 << 0


@dataclass(frozen=True, slots=True)
class ShmemMap:
    """VhostUserMMap: SHMEM_MAP (with one fd) and SHMEM_UNMAP."""

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=B7xQQQQ")

    @classmethod
    def unpack(cls, data: bytes) -> ShmemMap:
        return cls(*cls.STRUCT.unpack(data))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.shmid, self.fd_offset, self.shm_offset, self.len,
                                self.flags)


SHMEM_MAX_REGIONS = 256
SHMEM_CONFIG = struct.Struct(f"=I4x{SHMEM_MAX_REGIONS}Q")   # VhostUserShMemConfig (2056 B)


def pack_shmem_config(sizes: list[int]) -> bytes:
    """GET_SHMEM_CONFIG's reply: nregions and the size of each region by shmid (0 = unused)."""
    return SHMEM_CONFIG.pack(sum(1 for s in sizes if s),
                             *(sizes + [0] * (SHMEM_MAX_REGIONS - len(sizes))))


def unpack_shmem_config(data: bytes) -> list[int]:
    _n, *sizes = SHMEM_CONFIG.unpack(data)
    return sizes
# crosvm's VhostUserSuccess (vmm_vhost message.rs): one signed byte, non-zero for success.
CROSVM_SUCCESS = struct.Struct("=b")


@dataclass(frozen=True, slots=True)
class LogDescription:
    """VhostUserLog, the SET_LOG_BASE payload: the log is `mmap_size` bytes at `mmap_offset` in
    the attached fd, one bit per 4 KiB guest-physical page from address 0 (spec "Migration")."""

    mmap_size: int
    mmap_offset: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQ")
    PAGE: ClassVar[int] = 0x1000                # VHOST_LOG_PAGE

    @classmethod
    def unpack(cls, data: bytes) -> LogDescription:
        return cls(*cls.STRUCT.unpack(data))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset)

    def is_valid(self) -> bool:
        return self.mmap_size > 0 and self.mmap_offset + self.mmap_size <= 1 << 64

    @property
    def covers(self) -> int:
        """Guest-physical bytes the log has a bit for."""
        return self.mmap_size * 8 * self.PAGE
@dataclass(frozen=True, slots=True)
class InflightDescription:
    """VhostUserInflight: GET_INFLIGHT_FD / SET_INFLIGHT_FD (spec "Inflight I/O tracking";
    not packed: 20 bytes of fields and 4 of tail padding)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")

    @classmethod
    def unpack(cls, data: bytes) -> InflightDescription:
        return cls(*cls.STRUCT.unpack(data))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset, self.num_queues,
                                self.queue_size)

    def is_valid(self) -> bool:
        """Syntax only: at least one queue of a power-of-two size that a split ring can have,
        and a mapping that does not overflow."""
        return (self.num_queues > 0 and 0 < self.queue_size <= 32768
                and not self.queue_size & (self.queue_size - 1)
                and self.mmap_offset + self.mmap_size < 1 << 63)
