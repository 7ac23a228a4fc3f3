"""A vhost-user front-end and virtio-fs guest driver, for tests and benchmarks.

It plays QEMU's role (memfd guest memory, the negotiation sequence, ring setup) and the guest
driver's role (split rings, descriptor chains, FUSE requests) against a daemon over its real
UNIX socket.  protocol.md sections 1 (vhost-user), 2 (split ring), 3 (virtio-fs), 4 (FUSE).

Layers, each usable on its own so tests can inject faults at any of them:
  Frontend     vhost-user messages: typed helpers, `send()` for any request, `send_raw()` for
               arbitrary bytes; owns the socket, guest memory and the driver queues.
  GuestMemory  memfd regions at adjacent guest-physical addresses but distinct (fake) front-end
               user addresses, plus a first-fit allocator for rings and request buffers.
  DriverQueue  the driver half of one split ring: chains (direct, indirect, split, straddling a
               region boundary), avail publishing, kicks, used harvesting, many in flight.
  FuseClient   FUSE requests over a DriverQueue; typed helpers raise FuseError.
  CacheWindow, BackendChannel
               the DAX side of a VMM: a reserved cache window that the daemon's back-end
               requests (FS_MAP/FS_UNMAP/FS_SYNC or SHMEM_MAP/SHMEM_UNMAP) map with MAP_FIXED,
               served by a thread on the back-end channel (`attach_window()`).

Every wait has a deadline: a daemon that stops answering raises ReplyTimeout, one that closed
the connection or died raises DaemonGone.  Nothing here ever blocks without a timeout.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import itertools
import mmap
import os
import select
import socket
import struct
import subprocess
import threading
import time
from bisect import bisect_right, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common import virtio
from pyvirtiofsd.common.native import fence
from pyvirtiofsd.common.vhost_user import (
    CROSVM_SUCCESS,
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    FS_UNMAP_ALL,
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    U64,
    VERSION,
    VRING_NOFD_MASK,
    ConfigSpace,
    FsBackendMsg,
    FsBackendRequest,
    FsMapFlag,
    Header,
    HeaderFlag,
    InflightDescription,
    LogDescription,
    MemoryRegion,
    ProtocolFeature,
    Request,
    ShmemBackendRequest,
    ShmemFlag,
    ShmemMap,
    VringAddr,
    VringState,
    pack_memory_table,
    pack_single_region,
    unpack_shmem_config,
)
from pyvirtiofsd.common.virtio import DESC, U16, USED_ELEM, DescFlag, Feature

DEFAULT_TIMEOUT = 10.0
# Plain ints for the descriptor flags: IntFlag arithmetic costs more than the rest of a chain.
_NEXT, _WRITE = int(DescFlag.NEXT), int(DescFlag.WRITE)
PAGE = mmap.PAGESIZE
# Fake front-end user addresses: each region gets its own base so no two regions are adjacent in
# the "VMM" address space even when they are in guest-physical space.  The daemon only uses them
# to translate ring addresses (SET_VRING_ADDR, protocol.md 1.7).
UADDR_BASE = 0x7F00_0000_0000
UADDR_STRIDE = 1 << 36

# The Rust virtiofsd (scripts/install-anchors.sh); the variable lets a test run the suite with
# the anchor missing, to prove that such a run fails.
ANCHOR = os.environ.get("PYVIRTIOFSD_ANCHOR_RS", "/opt/anchors/virtiofsd-rs")

# Requests whose definition includes a reply (protocol.md 1.4 "always"); everything else gets
# only the REPLY_ACK u64, and only when NEED_REPLY is set (1.9).
_EXPLICIT_REPLY = frozenset({
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.GET_VRING_BASE,
    Request.IOTLB_MSG,
    Request.GET_CONFIG,
    Request.CREATE_CRYPTO_SESSION,
    Request.POSTCOPY_ADVISE,
    Request.POSTCOPY_END,
    Request.GET_INFLIGHT_FD,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
    Request.GET_SHARED_OBJECT,
    Request.SET_DEVICE_STATE_FD,
    Request.CHECK_DEVICE_STATE,
    Request.GET_SHMEM_CONFIG,
})

# Protocol features negotiated by default when the daemon offers them: the set QEMU's
# vhost-user-fs front-end would take, minus the ones that need a back-end channel or in-flight
# buffer this driver does not set up unless a test asks (pass protocol_features=).
DEFAULT_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.CONFIG
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
    | ProtocolFeature.DEVICE_STATE
)


# --- Errors: each says what the caller should do next.


class FrontendError(Exception):
    """Base class of everything the driver raises about the daemon."""


class DaemonGone(FrontendError):
    """The daemon closed the connection or exited: the session is over, start a new one."""


class ReplyTimeout(FrontendError, TimeoutError):
    """The daemon did not answer in time: it is hung or lost a notification."""


class ProtocolViolation(FrontendError):
    """The daemon sent something malformed (bad reply header, used entry for a free head...)."""


class BackendError(FrontendError):
    """The daemon refused a request: REPLY_ACK carried a non-zero value."""

    def __init__(self, request: int, value: int) -> None:
        self.request = request
        self.value = value
        super().__init__(f"daemon refused {_req_name(request)} (ack value {value:#x})")


class QueueFull(FrontendError):
    """Not enough free descriptors for the chain: complete some requests first."""


class FuseError(OSError):
    """A FUSE request failed: the reply carried -errno.  `.errno` is the positive errno."""

    def __init__(self, err: int, opcode: int | None = None) -> None:
        what = fa.Opcode(opcode).name if opcode in fa.Opcode._value2member_map_ else opcode
        super().__init__(err, f"{os.strerror(err)} (FUSE {what})")


def _req_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --- Guest memory


@dataclass(eq=False)
class Region:
    """One guest memory region as the daemon is told about it, plus our local view of it."""

    gpa: int
    size: int
    uaddr: int
    fd: int
    mmap_offset: int
    view: memoryview = field(repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def describe(self) -> MemoryRegion:
        return MemoryRegion(self.gpa, self.size, self.uaddr, self.mmap_offset)


class GuestMemory:
    """memfd-backed guest RAM and a first-fit allocator over its guest-physical addresses.

    The base RAM is ONE memfd mapped once locally and described as `regions` regions at adjacent
    guest-physical addresses, each with its own mmap_offset into that fd (as QEMU does for RAM
    split around a PCI hole) and its own user address.  add_region() adds hot-plugged regions
    with their own memfd (as for DIMMs).  Ordinary allocations never straddle a region
    boundary; alloc_at() places one anywhere that is free, which is how chains that cross a
    boundary are built.
    """

    def __init__(self, size: int, regions: int = 1, *, base_gpa: int = 0) -> None:
        if regions < 1 or size <= 0 or size % (regions * PAGE):
            raise ValueError(f"memory size {size} is not {regions} whole regions of pages")
        self.regions: list[Region] = []
        self._maps: list[tuple[int, mmap.mmap, memoryview]] = []
        self._free: list[list[int]] = []     # sorted [start, end) guest-physical ranges
        self._used: dict[int, int] = {}      # allocation start -> size
        fd, view = self._new_memfd(size, "guest-ram")
        per = size // regions
        for i in range(regions):
            self._attach(Region(base_gpa + i * per, per, UADDR_BASE + i * UADDR_STRIDE, fd,
                                i * per, view[i * per : (i + 1) * per]))

    def _new_memfd(self, size: int, name: str) -> tuple[int, memoryview]:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        view = memoryview(mm)
        self._maps.append((fd, mm, view))
        return fd, view

    def _attach(self, region: Region) -> None:
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        self._release(region.gpa, region.size)

    def add_region(self, size: int, gpa: int | None = None) -> Region:
        """A new region on its own memfd (hot-plug); by default right after the highest one."""
        if size <= 0 or size % PAGE:
            raise ValueError(f"region size {size} is not whole pages")
        if gpa is None:
            gpa = _align(max(r.end for r in self.regions), PAGE)
        if any(r.gpa < gpa + size and gpa < r.end for r in self.regions):
            raise ValueError(f"region at {gpa:#x}+{size:#x} overlaps an existing one")
        used_uaddrs = {r.uaddr for r in self.regions}
        uaddr = next(UADDR_BASE + i * UADDR_STRIDE for i in itertools.count()
                     if UADDR_BASE + i * UADDR_STRIDE not in used_uaddrs)
        fd, view = self._new_memfd(size, "guest-dimm")
        region = Region(gpa, size, uaddr, fd, 0, view)
        self._attach(region)
        return region

    def detach_region(self, region: Region) -> None:
        """Forget a region (after REM_MEM_REG); it must hold no live allocation."""
        if any(region.gpa <= a < region.end for a in self._used):
            raise ValueError("region still holds allocations")
        self.regions.remove(region)
        self._free = self._carve_out(region.gpa, region.end)
        for i, (fd, mm, view) in enumerate(self._maps):
            if fd == region.fd and not any(r.fd == fd for r in self.regions):
                region.view.release()
                view.release()
                with contextlib.suppress(BufferError):
                    mm.close()
                os.close(fd)
                del self._maps[i]
                break

    def _carve_out(self, start: int, end: int) -> list[list[int]]:
        out = []
        for s, e in self._free:
            if e <= start or s >= end:
                out.append([s, e])
                continue
            if s < start:
                out.append([s, start])
            if e > end:
                out.append([end, e])
        return out

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
        self.regions.clear()
        for fd, mm, view in self._maps:
            view.release()
            # A view a test still holds keeps the mapping alive until it is collected.
            with contextlib.suppress(BufferError):
                mm.close()
            os.close(fd)
        self._maps.clear()

    # -- translation

    def region_of(self, gpa: int) -> Region:
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                return r
        raise ValueError(f"guest address {gpa:#x} is in no region")

    def uaddr(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.uaddr + gpa - r.gpa

    def view(self, gpa: int, length: int) -> memoryview:
        """A local view of [gpa, gpa+length), which must lie in one region."""
        r = self.region_of(gpa)
        off = gpa - r.gpa
        if off + length > r.size:
            raise ValueError(f"{gpa:#x}+{length} crosses the end of its region")
        return r.view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        r = self.region_of(gpa)
        off = gpa - r.gpa
        if off + length <= r.size:
            return bytes(r.view[off : off + length])
        parts = []
        while length:
            r = self.region_of(gpa)
            off = gpa - r.gpa
            k = min(length, r.size - off)
            parts.append(bytes(r.view[off : off + k]))
            gpa += k
            length -= k
        return b"".join(parts)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        pos, n = 0, len(data)
        while pos < n:
            r = self.region_of(gpa)
            off = gpa - r.gpa
            k = min(n - pos, r.size - off)
            r.view[off : off + k] = data[pos : pos + k]
            gpa += k
            pos += k

    # -- allocator

    def _boundary_after(self, gpa: int) -> int:
        return self.region_of(gpa).end

    def alloc(self, size: int, align: int = 16) -> int:
        """First fit, never straddling a region boundary; raises MemoryError when full."""
        # Whole alignment units, so freed blocks leave no slivers for later scans to skip.
        size = _align(max(size, 1), align)
        for rng in self._free:
            start, end = rng
            a = _align(start, align)
            while a + size <= end:
                b = self._boundary_after(a)
                if a + size <= b:
                    self._take(a, size)
                    return a
                a = _align(b, align)
        raise MemoryError(f"no {size} free bytes of guest memory")

    def alloc_at(self, gpa: int, size: int) -> int:
        """Allocate exactly [gpa, gpa+size), which may straddle adjacent regions."""
        size = max(size, 1)
        for s, e in self._free:
            if s <= gpa and gpa + size <= e:
                self._take(gpa, size)
                return gpa
        raise MemoryError(f"guest range {gpa:#x}+{size} is not free")

    def _take(self, gpa: int, size: int) -> None:
        i = bisect_right(self._free, [gpa, float("inf")]) - 1
        s, e = self._free[i]
        del self._free[i]
        if gpa + size < e:
            self._free.insert(i, [gpa + size, e])
        if s < gpa:
            self._free.insert(i, [s, gpa])
        self._used[gpa] = size

    def free(self, gpa: int) -> None:
        self._release(gpa, self._used.pop(gpa))

    def _release(self, gpa: int, size: int) -> None:
        insort(self._free, [gpa, gpa + size])
        # Coalesce with the neighbours, which is what keeps cross-boundary placement possible.
        i = bisect_right(self._free, [gpa, gpa + size]) - 1
        if i + 1 < len(self._free) and self._free[i + 1][0] == self._free[i][1]:
            self._free[i][1] = self._free.pop(i + 1)[1]
        if i > 0 and self._free[i - 1][1] == self._free[i][0]:
            self._free[i - 1][1] = self._free.pop(i)[1]

    @property
    def free_bytes(self) -> int:
        return sum(e - s for s, e in self._free)


# --- vhost-user messages


class Message(NamedTuple):
    request: int
    flags: int
    payload: bytes
    fds: list[int]

    def u64(self) -> int:
        if len(self.payload) != U64.size:
            raise ProtocolViolation(
                f"{_req_name(self.request)} reply has {len(self.payload)} bytes, expected 8")
        return U64.unpack(self.payload)[0]


def connect_unix(path: str, timeout: float = DEFAULT_TIMEOUT,
                 process: subprocess.Popen | None = None) -> socket.socket:
    """Connect to a daemon's socket, retrying until it listens or the deadline passes.

    The probe must be the real connection: daemons like virtiofsd serve exactly one front-end,
    so a test connection that is closed again would end the daemon.
    """
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
        if process is not None and process.poll() is not None:
            raise DaemonGone(f"daemon exited with status {process.returncode} before "
                             f"listening on {path}")
        if time.monotonic() > deadline:
            raise ReplyTimeout(f"nothing listening on {path} after {timeout}s")
        time.sleep(0.005)  # retry interval of the poll, bounded by the deadline


class Frontend:
    """The VMM side of one vhost-user connection.

    `Frontend.connect()` runs the whole QEMU sequence; `Frontend(sock)` only wraps a connected
    socket so tests can negotiate by hand.  Replies follow REPLY_ACK rules (protocol.md 1.9):
    NEED_REPLY is set on requests without an explicit reply once REPLY_ACK is negotiated, a
    non-zero ack raises BackendError.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT,
                 process: subprocess.Popen | None = None) -> None:
        self.sock = sock
        self.process = process
        self.timeout = timeout
        self.features = 0               # offered by the daemon
        self.acked_features = 0
        self.protocol_features = 0      # offered
        self.acked_protocol_features = 0
        self.queue_num: int | None = None
        self.memory: GuestMemory | None = None
        self.queues: dict[int, DriverQueue] = {}
        self.inflight_region: tuple[int, InflightDescription] | None = None
        self._closed = False

    @property
    def timeout(self) -> float:
        """Seconds any reply or used entry may take before ReplyTimeout."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._timeout = value
        self.sock.settimeout(value)

    # -- construction

    @classmethod
    def connect(cls, socket_path: str, *, queues: int = 2, queue_size: int = 128,
                mem_size: int = 64 << 20, regions: int = 1, event_idx: bool = True,
                indirect: bool = True, reply_ack: bool = True,
                protocol_features: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                process: subprocess.Popen | None = None, inflight: bool = False) -> Frontend:
        """Connect and bring the device up the way QEMU does (protocol.md 1.7, 1.14).

        GET_FEATURES, SET_OWNER, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_FEATURES,
        (with `inflight`: GET_INFLIGHT_FD, SET_INFLIGHT_FD, kept as `inflight_region`)
        SET_MEM_TABLE, then per ring NUM, BASE, ADDR, KICK, CALL, ENABLE.
        """
        fe = cls(connect_unix(socket_path, timeout, process), timeout=timeout, process=process)
        try:
            if inflight:
                protocol_features = (DEFAULT_PROTOCOL_FEATURES if protocol_features is None
                                     else protocol_features) | ProtocolFeature.INFLIGHT_SHMFD
            fe.negotiate(event_idx=event_idx, indirect=indirect, reply_ack=reply_ack,
                         protocol_features=protocol_features)
            if fe.queue_num is not None and queues > fe.queue_num:
                raise ValueError(f"{queues} queues asked, daemon has {fe.queue_num}")
            if inflight:
                if not fe.acked_protocol_features & ProtocolFeature.INFLIGHT_SHMFD:
                    raise ValueError("the daemon does not offer INFLIGHT_SHMFD")
                fe.inflight_region = fe.get_inflight_fd(queues, queue_size)
                fe.set_inflight_fd(*fe.inflight_region)
            fe.memory = GuestMemory(mem_size, regions)
            fe.set_mem_table()
            for i in range(queues):
                fe.add_queue(i, queue_size)
        except BaseException:
            fe.close()
            raise
        return fe

    def negotiate(self, *, event_idx: bool = True, indirect: bool = True,
                  reply_ack: bool = True, protocol_features: int | None = None) -> None:
        self.features = self.get_features()
        self.set_owner()
        want = Feature.VERSION_1 | F_PROTOCOL_FEATURES
        if event_idx:
            want |= Feature.EVENT_IDX
        if indirect:
            want |= Feature.INDIRECT_DESC
        if self.features & F_PROTOCOL_FEATURES:
            self.protocol_features = self.get_protocol_features()
            pf = DEFAULT_PROTOCOL_FEATURES if protocol_features is None else protocol_features
            if not reply_ack:
                pf &= ~ProtocolFeature.REPLY_ACK
            self.set_protocol_features(self.protocol_features & pf)
            if self.acked_protocol_features & ProtocolFeature.MQ:
                self.queue_num = self.get_queue_num()
        self.set_features(self.features & want)

    # -- raw transport

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are; fds ride with the first byte (protocol.md 1.1)."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError) as e:
            raise DaemonGone(f"daemon closed the connection ({e.strerror})") from None
        except TimeoutError:
            raise ReplyTimeout(f"daemon did not read a message within {self.timeout}s") from None

    def _recv_exact(self, n: int, what: str, fds: list[int]) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(
                    n - len(buf), socket.CMSG_SPACE(MAX_FDS * 4))
            except TimeoutError:
                _close_fds(fds)
                raise ReplyTimeout(f"no {what} from the daemon within {self.timeout}s"
                                   + self._process_note()) from None
            except ConnectionResetError:
                _close_fds(fds)
                raise DaemonGone("daemon reset the connection" + self._process_note()) from None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                    fds.extend(got)
            if not data:
                _close_fds(fds)
                raise DaemonGone(f"daemon closed the connection while {what} was awaited"
                                 + self._process_note())
            buf += data
        return bytes(buf)

    def recv_message(self, what: str = "message") -> Message:
        """One message from the daemon: header, payload, and any fds that came with it."""
        fds: list[int] = []
        hdr = Header.unpack(self._recv_exact(HEADER_SIZE, what, fds))
        if hdr.size > MAX_PAYLOAD:
            _close_fds(fds)
            raise ProtocolViolation(f"{what} announces {hdr.size} payload bytes")
        payload = self._recv_exact(hdr.size, what, fds) if hdr.size else b""
        return Message(hdr.request, hdr.flags, payload, fds)

    def recv_reply(self, request: int) -> Message:
        """The reply to `request`: same code, flags exactly VERSION|REPLY (protocol.md 1.1)."""
        msg = self.recv_message(f"reply to {_req_name(request)}")
        if msg.request != request or msg.flags != VERSION | HeaderFlag.REPLY:
            _close_fds(msg.fds)
            raise ProtocolViolation(
                f"reply to {_req_name(request)} has request {msg.request} flags {msg.flags:#x}")
        return msg

    def expects_reply(self, request: int) -> bool:
        if request in _EXPLICIT_REPLY:
            return True
        return (request == Request.SET_LOG_BASE
                and bool(self.acked_protocol_features & ProtocolFeature.LOG_SHMFD))

    @property
    def reply_ack(self) -> bool:
        return bool(self.acked_protocol_features & ProtocolFeature.REPLY_ACK)

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             flags: int | None = None, *, reply: bool | None = None) -> Message | None:
        """Send one request and read what the protocol says comes back.

        flags=None: VERSION, plus NEED_REPLY when REPLY_ACK is negotiated and the request has no
        explicit reply.  reply=None: read an explicit reply, or an ack when NEED_REPLY is set.
        Returns the explicit reply (its fds are the caller's to close) or None; a non-zero ack
        raises BackendError.  fds sent are not closed here (they are the caller's).
        """
        explicit = self.expects_reply(request)
        if flags is None:
            flags = VERSION
            # SET_LOG_BASE's own reply is a u64 too: with NEED_REPLY it doubles as the ack.
            if self.reply_ack and (not explicit or request == Request.SET_LOG_BASE):
                flags |= HeaderFlag.NEED_REPLY
        self.send_raw(Header(request, flags, len(payload)).pack() + payload, fds)
        if reply is None:
            reply = explicit or bool(flags & HeaderFlag.NEED_REPLY)
        if not reply:
            return None
        msg = self.recv_reply(request)
        # SET_LOG_BASE's reply is a u64 status here and in libvhost-user; the Rust virtiofsd
        # echoes the 16-byte log description instead (protocol.md 1.4).
        if explicit and not (request == Request.SET_LOG_BASE and flags & HeaderFlag.NEED_REPLY
                             and len(msg.payload) == U64.size):
            return msg
        _close_fds(msg.fds)
        value = msg.u64()
        if value:
            raise BackendError(request, value)
        return None

    def _call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> Message:
        msg = self.send(request, payload, fds)
        assert msg is not None  # explicit-reply requests always return one
        return msg

    def _process_note(self) -> str:
        if self.process is not None and self.process.poll() is not None:
            return f" (daemon exited with status {self.process.returncode})"
        return ""

    def check_alive(self) -> None:
        """Raise DaemonGone if the daemon closed the connection or exited."""
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            data = None
        except OSError as e:
            raise DaemonGone(f"connection to the daemon failed ({e.strerror})") from None
        if data == b"":
            raise DaemonGone("daemon closed the connection" + self._process_note())
        if data:
            raise ProtocolViolation("daemon sent a message nobody asked for")
        if self.process is not None and self.process.poll() is not None:
            raise DaemonGone(f"daemon exited with status {self.process.returncode}")

    # -- typed requests (protocol.md 1.4, 1.7)

    def get_features(self) -> int:
        return self._call(Request.GET_FEATURES).u64()

    def set_features(self, features: int) -> None:
        self.send(Request.SET_FEATURES, U64.pack(features))
        self.acked_features = features

    def set_owner(self) -> None:
        self.send(Request.SET_OWNER)

    def get_protocol_features(self) -> int:
        return self._call(Request.GET_PROTOCOL_FEATURES).u64()

    def set_protocol_features(self, features: int) -> None:
        # Sent without NEED_REPLY as QEMU does: whether this very message is acked would
        # depend on the set it is changing.
        self.send(Request.SET_PROTOCOL_FEATURES, U64.pack(features), flags=VERSION)
        self.acked_protocol_features = features

    def get_queue_num(self) -> int:
        return self._call(Request.GET_QUEUE_NUM).u64()

    def get_max_mem_slots(self) -> int:
        return self._call(Request.GET_MAX_MEM_SLOTS).u64()

    def set_mem_table(self, regions: Sequence[Region] | None = None) -> None:
        regions = list(self.memory.regions if regions is None else regions)
        self.send(Request.SET_MEM_TABLE, pack_memory_table([r.describe() for r in regions]),
                  [r.fd for r in regions])

    def add_mem_region(self, size: int, gpa: int | None = None) -> Region:
        """Hot-plug a region on a new memfd with ADD_MEM_REG (needs CONFIGURE_MEM_SLOTS)."""
        region = self.memory.add_region(size, gpa)
        try:
            self.send(Request.ADD_MEM_REG, pack_single_region(region.describe()), [region.fd])
        except BaseException:
            with contextlib.suppress(ValueError):
                self.memory.detach_region(region)
            raise
        return region

    def rem_mem_region(self, region: Region) -> None:
        """REM_MEM_REG; the region is unmapped locally only once the daemon accepted."""
        self.send(Request.REM_MEM_REG, pack_single_region(region.describe()))
        self.memory.detach_region(region)

    def set_vring_num(self, index: int, num: int) -> None:
        self.send(Request.SET_VRING_NUM, VringState(index, num).pack())

    def set_vring_base(self, index: int, base: int) -> None:
        self.send(Request.SET_VRING_BASE, VringState(index, base).pack())

    def get_vring_base(self, index: int) -> int:
        """Stops the ring and returns the next avail index the daemon would process."""
        msg = self._call(Request.GET_VRING_BASE, VringState(index, 0).pack())
        if len(msg.payload) != VringState.STRUCT.size:
            raise ProtocolViolation(f"GET_VRING_BASE reply has {len(msg.payload)} bytes")
        state = VringState.unpack(msg.payload)
        if state.index != index:
            raise ProtocolViolation(f"GET_VRING_BASE for ring {index} answered for {state.index}")
        q = self.queues.get(index)
        if q is not None:
            q.started = False
        return state.num

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, log: int = 0,
                       flags: int = 0) -> None:
        self.send(Request.SET_VRING_ADDR, VringAddr(index, flags, desc, used, avail, log).pack())

    def _set_vring_fd(self, request: int, index: int, fd: int | None) -> None:
        if fd is None:
            self.send(request, U64.pack(index | VRING_NOFD_MASK))
        else:
            self.send(request, U64.pack(index), [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.send(Request.SET_VRING_ENABLE, VringState(index, int(enable)).pack())

    def get_config(self, offset: int = 0, size: int = virtio.FS_CONFIG.size) -> bytes:
        msg = self._call(Request.GET_CONFIG, ConfigSpace(offset, size, 0).pack() + bytes(size))
        if len(msg.payload) != ConfigSpace.STRUCT.size + size:
            raise ProtocolViolation(f"GET_CONFIG reply has {len(msg.payload)} bytes")
        return msg.payload[ConfigSpace.STRUCT.size :]

    def get_status(self) -> int:
        return self._call(Request.GET_STATUS).u64()

    def set_status(self, status: int) -> None:
        self.send(Request.SET_STATUS, U64.pack(status))

    def reset_device(self) -> None:
        self.send(Request.RESET_DEVICE)

    # -- device state (protocol.md 1.12), as QEMU's vhost_save_backend_state and
    # vhost_load_backend_state move it: the device stopped, a pipe, SET_DEVICE_STATE_FD with one
    # end (or the back-end's own channel when its reply has no "invalid fd" bit), the bytes to
    # EOF, then CHECK_DEVICE_STATE.

    STATE_SAVE, STATE_LOAD = 0, 1
    STATE_NO_FD = 0x100

    def set_device_state_fd(self, direction: int, fd: int,
                            phase: int = 0) -> tuple[int, int | None]:
        """(the reply's error code, the back-end's own channel fd or None)."""
        msg = self._call(Request.SET_DEVICE_STATE_FD, struct.pack("=II", direction, phase),
                         [fd])
        value = msg.u64()
        if value & self.STATE_NO_FD:
            _close_fds(msg.fds)
            return value & 0xFF, None
        if len(msg.fds) != 1 or value & 0xFF:
            _close_fds(msg.fds)
            raise ProtocolViolation(f"SET_DEVICE_STATE_FD reply {value:#x} with"
                                    f" {len(msg.fds)} fds")
        return 0, msg.fds[0]

    def check_device_state(self) -> int:
        return self._call(Request.CHECK_DEVICE_STATE).u64()

    def stop_device(self) -> None:
        """Every started ring stopped (GET_VRING_BASE), as QEMU stops the device."""
        for index, q in self.queues.items():
            if q.started:
                self.get_vring_base(index)

    def save_state(self) -> bytes:
        """The back-end's device state; BackendError when it is refused or fails."""
        self.stop_device()
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            err, own = self.set_device_state_fd(self.STATE_SAVE, wfd)
            os.close(wfd)
            wfd = -1
            if err:
                raise BackendError(Request.SET_DEVICE_STATE_FD, err)
            if own is not None:
                os.close(rfd)
                rfd = own
            chunks = []
            while chunk := _read_with_deadline(rfd, self.timeout):
                chunks.append(chunk)
        finally:
            _close_fds(fd for fd in (rfd, wfd) if fd >= 0)
        value = self.check_device_state()
        if value:
            raise BackendError(Request.CHECK_DEVICE_STATE, value)
        return b"".join(chunks)

    def load_state(self, data: bytes) -> None:
        """Hand `data` to the back-end as its device state; BackendError when refused."""
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            err, own = self.set_device_state_fd(self.STATE_LOAD, rfd)
            os.close(rfd)
            rfd = -1
            if err:
                raise BackendError(Request.SET_DEVICE_STATE_FD, err)
            if own is not None:
                os.close(wfd)
                wfd = own
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view[:1 << 16]):]
            os.close(wfd)
            wfd = -1
        finally:
            _close_fds(fd for fd in (rfd, wfd) if fd >= 0)
        value = self.check_device_state()
        if value:
            raise BackendError(Request.CHECK_DEVICE_STATE, value)

    # -- queues

    def add_queue(self, index: int, size: int = 128) -> DriverQueue:
        q = DriverQueue(self, index, size)
        self.queues[index] = q
        self.start_queue(index)
        return q

    def queue(self, index: int) -> DriverQueue:
        return self.queues[index]

    def start_queue(self, index: int, base: int | None = None) -> None:
        """(Re)start a ring: NUM, BASE, ADDR, KICK, CALL, then ENABLE when negotiated.

        base=None uses the driver's own avail index (right after a GET_VRING_BASE that
        drained everything, the two agree).
        """
        q = self.queues[index]
        self.set_vring_num(index, q.size)
        self.set_vring_base(index, q.avail_idx if base is None else base)
        mem = self.memory
        self.set_vring_addr(index, mem.uaddr(q.desc_gpa), mem.uaddr(q.used_gpa),
                            mem.uaddr(q.avail_gpa), **self._log_ring(q))
        # A kick still pending on the eventfd would wake virtiofsd's ring worker while
        # SET_VRING_KICK is being handled, before the ring is ready; the worker then spins on
        # the error holding the ring lock and the daemon never answers.  So the count is
        # drained here and the kick re-sent once the ring is up, as VU+ asks front-ends to do.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(q.kick_fd)
        self.set_vring_kick(index, q.kick_fd)
        self.set_vring_call(index, q.call_fd)
        if self.acked_features & F_PROTOCOL_FEATURES:
            self.set_vring_enable(index, True)
        self.sync()
        q.started = True
        if q.inflight:
            q.kick(force=True)

    # -- dirty-page logging (protocol.md 1.10), as QEMU's vhost_migration_log does it

    dirty_log: DirtyLog | None = None
    logging: bool = False

    def set_log_base(self, log: DirtyLog) -> None:
        """SET_LOG_BASE with the log's memfd; the daemon marks it from then on."""
        self.send(Request.SET_LOG_BASE, log.describe().pack(), [log.fd])
        self.dirty_log = log

    def _log_ring(self, q: DriverQueue) -> dict[str, int]:
        """SET_VRING_ADDR's log fields: VHOST_VRING_F_LOG at the used ring's guest address."""
        if not self.logging:
            return {}
        return {"flags": VringAddr.F_LOG, "log": q.used_gpa}

    def set_logging(self, on: bool) -> None:
        """VHOST_F_LOG_ALL on or off, then every started ring's log flag (QEMU's order, in
        vhost_dev_set_log): on running rings, without stopping them."""
        features = self.acked_features | F_LOG_ALL if on else self.acked_features & ~F_LOG_ALL
        self.set_features(features)
        self.logging = on
        mem = self.memory
        for index, q in self.queues.items():
            if q.started:
                self.set_vring_addr(index, mem.uaddr(q.desc_gpa), mem.uaddr(q.used_gpa),
                                    mem.uaddr(q.avail_gpa), **self._log_ring(q))

    def sync(self) -> None:
        """Return once the daemon has handled every request sent so far.

        Without REPLY_ACK nothing confirms SET_VRING_ENABLE, and a kick that overtakes it is
        lost by virtiofsd (its ring worker drains the eventfd while the ring is disabled).
        QEMU's enforce_reply() uses GET_FEATURES as the barrier; so does this.
        """
        if not self.reply_ack:
            self.get_features()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
        for q in self.queues.values():
            q.close()
        self.queues.clear()
        if self.memory is not None:
            self.memory.close()
        if self.inflight_region is not None:
            _close_fds((self.inflight_region[0],))
            self.inflight_region = None

    # -- inflight I/O tracking (protocol.md 1.11) and reconnecting as QEMU does

    def get_inflight_fd(self, num_queues: int,
                        queue_size: int) -> tuple[int, InflightDescription]:
        """GET_INFLIGHT_FD: the region's fd (the caller's to close) and its description."""
        msg = self._call(Request.GET_INFLIGHT_FD,
                         InflightDescription(0, 0, num_queues, queue_size).pack())
        if len(msg.fds) != 1 or len(msg.payload) != InflightDescription.STRUCT.size:
            _close_fds(msg.fds)
            raise ProtocolViolation(f"GET_INFLIGHT_FD reply of {len(msg.payload)} bytes with"
                                    f" {len(msg.fds)} fds")
        return msg.fds[0], InflightDescription.unpack(msg.payload)

    def set_inflight_fd(self, fd: int, desc: InflightDescription) -> None:
        self.send(Request.SET_INFLIGHT_FD, desc.pack(), [fd])

    def reconnect(self, socket_path: str, *, protocol_features: int | None = None,
                  inflight: tuple[int, InflightDescription] | None = None,
                  process: subprocess.Popen | None = None) -> None:
        """Bring the same device -- memory, rings, chains in flight -- up on a new connection
        (to the same daemon or another), as QEMU does after it lost its back-end: a new session
        (protocol.md 1.14), the inflight region handed back, and every ring restarted at its
        used index, since GET_VRING_BASE could not be asked."""
        new = connect_unix(socket_path, process=process or self.process)
        if process is not None:
            self.process = process
        old = self.sock
        for q in self.queues.values():
            with contextlib.suppress(KeyError, ValueError):
                q._poll.unregister(old.fileno())
            q._poll.register(new.fileno(), select.POLLIN)
        with contextlib.suppress(OSError):
            old.close()
        self.sock = new
        self.timeout = self.timeout
        self.acked_protocol_features = 0
        self.negotiate(protocol_features=protocol_features)
        if inflight is not None:
            self.set_inflight_fd(*inflight)
        self.set_mem_table()
        for i, q in self.queues.items():
            self.start_queue(i, base=q.used_idx())

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the dirty log


class DirtyLog:
    """A dirty log as QEMU makes one (vhost_get_log_size, vhost_log_alloc): a memfd with one
    bit per 4 KiB guest page from address 0 up to the end of guest memory, in u64 chunks."""

    CHUNK = LogDescription.PAGE * 64

    def __init__(self, memory: GuestMemory, *, extra: int = 0, offset: int = 0,
                 name: str = "dirty-log") -> None:
        end = max(r.end for r in memory.regions)
        self.size = ((end - 1) // self.CHUNK + 1) * 8 + extra
        self.offset = offset
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, offset + self.size)
        self._mm = mmap.mmap(self.fd, offset + self.size)

    def describe(self) -> LogDescription:
        return LogDescription(self.size, self.offset)

    def pages(self) -> set[int]:
        """Guest page numbers marked dirty."""
        data = self._mm[self.offset : self.offset + self.size]
        out = set()
        for i, byte in enumerate(data):
            if byte:
                out.update(i * 8 + b for b in range(8) if byte >> b & 1)
        return out

    def clear(self) -> None:
        self._mm[self.offset : self.offset + self.size] = bytes(self.size)

    def close(self) -> None:
        self._mm.close()
        os.close(self.fd)


def pages_of(ranges: Iterable[tuple[int, int]]) -> set[int]:
    """The 4 KiB guest pages that guest-physical (address, length) ranges touch."""
    out: set[int] = set()
    for a, n in ranges:
        if n > 0:
            out.update(range(a // LogDescription.PAGE, (a + n - 1) // LogDescription.PAGE + 1))
    return out


# --- driver-side split ring


class Completion(NamedTuple):
    token: int
    head: int
    used_len: int
    data: bytes          # the chain's whole writable part; the daemon wrote used_len of it


@dataclass(slots=True)
class _Inflight:
    token: int
    head: int
    descs: list[int]
    allocs: list[int]
    writable: list[tuple[int, int]]   # coalesced (gpa, length) runs
    foreign: int = 0                  # writable bytes outside guest memory (the DAX window)


class DriverQueue:
    """The guest driver's half of one split virtqueue (virtio spec 2.7).

    submit() builds a chain and publishes it; wait()/complete() harvest the used ring.  Many
    chains can be in flight; tokens are unique for the queue's lifetime (heads are reused).
    The low-level pieces (alloc_desc, write_desc, publish, kick) are public for fault tests.
    """

    def __init__(self, frontend: Frontend, index: int, size: int) -> None:
        if size < 1 or size & (size - 1) or size > virtio.MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {size} is not a power of two <= 32768")
        self.fe = frontend
        self.mem = frontend.memory
        self.index = index
        self.size = size
        self.event_idx = bool(frontend.acked_features & Feature.EVENT_IDX)
        self.indirect_ok = bool(frontend.acked_features & Feature.INDIRECT_DESC)
        # Alignment per virtio spec 2.7 (16 / 2 / 4); 64 keeps each part on its own cache line.
        self.desc_gpa = self.mem.alloc(virtio.desc_table_size(size), 64)
        self.avail_gpa = self.mem.alloc(virtio.avail_ring_size(size), 64)
        self.used_gpa = self.mem.alloc(virtio.used_ring_size(size), 64)
        self.desc = self.mem.view(self.desc_gpa, virtio.desc_table_size(size))
        self.avail = self.mem.view(self.avail_gpa, virtio.avail_ring_size(size))
        # Indexes the daemon reads concurrently are stored with one 2-byte store: pack_into
        # zero-fills first, so the daemon could see a transient 0 avail idx or used_event.
        self.avail16 = self.avail.cast("H")
        self.used = self.mem.view(self.used_gpa, virtio.used_ring_size(size))
        # Fields the device stores while we read them: one 2-byte load each (struct reads a
        # byte at a time and could mix an old and a new byte).
        self.used16 = self.used.cast("H")
        self._used_event_off = 4 + 2 * size
        self._avail_event_off = 4 + 8 * size
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poll = select.poll()
        self._poll.register(self.call_fd, select.POLLIN)
        self._poll.register(frontend.sock.fileno(), select.POLLIN)
        self.free_descs: list[int] = list(range(size - 1, -1, -1))
        self.avail_idx = 0          # shadow of avail.idx
        self.last_used = 0          # next used entry to harvest
        self._kicked_at = 0         # avail idx at the last kick decision (EVENT_IDX)
        self._tokens = itertools.count(1)
        self.inflight: dict[int, _Inflight] = {}
        self._by_head: dict[int, int] = {}
        self._done: dict[int, Completion] = {}
        self.started = False
        # When a list: each completion appends the guest ranges its used.len covers (the
        # bytes the daemon wrote), for the dirty-log tests.
        self.written: list[tuple[int, int]] | None = None
        self.kicks = 0              # statistics, for notification-suppression tests
        self.kicks_suppressed = 0
        self.calls = 0

    def close(self) -> None:
        for v in (self.avail16, self.used16, self.desc, self.avail, self.used):
            v.release()
        _close_fds((self.kick_fd, self.call_fd))

    # -- low level

    def alloc_desc(self) -> int:
        if not self.free_descs:
            raise QueueFull(f"queue {self.index}: all {self.size} descriptors in use")
        return self.free_descs.pop()

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int = 0) -> None:
        DESC.pack_into(self.desc, 16 * index, addr, length, flags, next_)

    def publish(self, head: int, *, descs: Sequence[int] = (), allocs: Sequence[int] = (),
                writable: Sequence[tuple[int, int]] = (), kick: bool = True,
                foreign: int = 0) -> int:
        """Put `head` on the avail ring and track it; returns the completion token.

        descs/allocs are returned to their free lists when the used entry arrives; writable
        runs are read back into Completion.data.
        """
        if head in self._by_head:
            raise ValueError(f"head {head} is already in flight")
        token = next(self._tokens)
        self.inflight[token] = _Inflight(token, head, list(descs), list(allocs), list(writable),
                                         foreign)
        self._by_head[head] = token
        U16.pack_into(self.avail, 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        fence()  # the ring entry is visible before the index that exposes it (spec 2.7.13)
        self.avail16[1] = self.avail_idx
        if kick:
            self.kick()
        return token

    def write_avail_idx(self, idx: int) -> None:
        """Store avail.idx directly (fault injection: 'guest moved the index')."""
        fence()
        self.avail16[1] = idx & 0xFFFF

    def kick(self, *, force: bool = False) -> bool:
        """Notify the daemon if its suppression state asks for it (spec 2.7.10, 2.7.13.4)."""
        fence()  # avail.idx store before the avail_event / used.flags load
        new, old = self.avail_idx, self._kicked_at
        self._kicked_at = new
        if self.event_idx:
            event = self.used16[self._avail_event_off >> 1]
            need = virtio.need_event(event, new, old)
        else:
            flags = self.used16[0]
            need = not flags & virtio.USED_F_NO_NOTIFY
        if need or force:
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1
            return True
        self.kicks_suppressed += 1
        return False

    def used_idx(self) -> int:
        return self.used16[1]

    # -- chains

    def submit(self, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *,
               indirect: bool = False, split: int = 1, cross_region: int | None = None,
               kick: bool = True) -> int:
        """Build a chain of device-readable buffers then device-writable ones; returns a token.

        split: each buffer is cut into up to `split` descriptors.  indirect: the descriptors go
        into an INDIRECT table (one ring descriptor).  cross_region: the buffers are laid out
        back to back in one area placed so that a region boundary falls at this byte offset of
        it (offsets count readable buffers, then writable ones, each 8-aligned) — a boundary
        inside a buffer makes a descriptor that straddles two regions.
        """
        sizes = [len(b) for b in readable] + list(writable)
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += _align(n, 8)
        if cross_region is None:
            area = self.mem.alloc(total, 64)
        else:
            area = self._alloc_across(total, cross_region)
        allocs = [area]
        try:
            for off, data in zip(offsets, readable, strict=False):
                self.mem.write(area + off, data)
            segs: list[tuple[int, int, int]] = []
            for i, (off, n) in enumerate(zip(offsets, sizes, strict=True)):
                flag = _WRITE if i >= len(readable) else 0
                parts = max(1, min(split, n))
                step, pos = -(-n // parts) if n else 0, 0
                for _ in range(parts):
                    k = min(step, n - pos)
                    segs.append((area + off + pos, k, flag))
                    pos += k
            if indirect:
                if not self.indirect_ok:
                    raise ValueError("INDIRECT_DESC was not negotiated")
                table = self.mem.alloc(16 * len(segs), 16)
                allocs.append(table)
                tv = self.mem.view(table, 16 * len(segs))
                for i, (addr, n, flag) in enumerate(segs):
                    nxt = _NEXT if i + 1 < len(segs) else 0
                    DESC.pack_into(tv, 16 * i, addr, n, flag | nxt, i + 1 if nxt else 0)
                tv.release()
                head = self.alloc_desc()
                descs = [head]
                self.write_desc(head, table, 16 * len(segs), DescFlag.INDIRECT)
            else:
                if len(segs) > len(self.free_descs):
                    raise QueueFull(f"queue {self.index}: chain of {len(segs)} descriptors, "
                                    f"{len(self.free_descs)} free")
                descs = [self.free_descs.pop() for _ in segs]
                for i, (addr, n, flag) in enumerate(segs):
                    last = i + 1 == len(segs)
                    self.write_desc(descs[i], addr, n, flag if last else flag | _NEXT,
                                    0 if last else descs[i + 1])
                head = descs[0]
        except BaseException:
            for a in allocs:
                self.mem.free(a)
            raise
        runs: list[tuple[int, int]] = []
        for addr, n, flag in segs:
            if not flag:
                continue
            if runs and runs[-1][0] + runs[-1][1] == addr:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((addr, n))
        return self.publish(head, descs=descs, allocs=allocs, writable=runs, kick=kick)

    def submit_foreign(self, readable: Sequence[bytes | tuple[int, int]],
                       writable: Sequence[int | tuple[int, int]], *, kick: bool = True) -> int:
        """A chain some of whose buffers are given as (gpa, length) and used as they are --
        outside guest memory, e.g. in the DAX window, as a guest's read() into a DAX-mapped
        page makes them.  bytes and sizes are placed in guest memory, as submit() does.
        Completion.data holds the writable part's guest-memory buffers only."""
        allocs: list[int] = []
        segs: list[tuple[int, int, int]] = []
        ours: list[bool] = []            # placed in guest memory here
        foreign = 0
        try:
            for i, part in enumerate([*readable, *writable]):
                flag = _WRITE if i >= len(readable) else 0
                ours.append(not isinstance(part, tuple))
                if isinstance(part, tuple):
                    segs.append((part[0], part[1], flag))
                    foreign += part[1] if flag else 0
                    continue
                n = part if isinstance(part, int) else len(part)
                gpa = self.mem.alloc(max(n, 1), 64)
                allocs.append(gpa)
                if not isinstance(part, int):
                    self.mem.write(gpa, part)
                segs.append((gpa, n, flag))
            if len(segs) > len(self.free_descs):
                raise QueueFull(f"queue {self.index}: chain of {len(segs)} descriptors")
            descs = [self.free_descs.pop() for _ in segs]
        except BaseException:
            for a in allocs:
                self.mem.free(a)
            raise
        for i, (addr, n, flag) in enumerate(segs):
            last = i + 1 == len(segs)
            self.write_desc(descs[i], addr, n, flag if last else flag | _NEXT,
                            0 if last else descs[i + 1])
        runs = [(a, n) for (a, n, flag), placed in zip(segs, ours, strict=True)
                if flag and placed]
        return self.publish(descs[0], descs=descs, allocs=allocs, writable=runs, kick=kick,
                            foreign=foreign)

    def _alloc_across(self, total: int, at: int) -> int:
        if not 0 < at < total:
            raise ValueError(f"boundary offset {at} is not inside the {total}-byte chain area")
        for r in self.mem.regions[1:]:
            try:
                return self.mem.alloc_at(r.gpa - at, total)
            except MemoryError:
                continue
        raise MemoryError("no free region boundary to straddle (connect with regions >= 2)")

    # -- completions

    def poll(self) -> int:
        """Harvest every used entry the daemon has published; returns how many."""
        idx = self.used16[1]
        n = (idx - self.last_used) & 0xFFFF
        if not n:
            return 0
        if n > self.size:
            raise ProtocolViolation(f"queue {self.index}: used idx jumped from "
                                    f"{self.last_used} to {idx}")
        fence()  # used entries are read only after the index that exposes them (spec 2.7.14)
        mem = self.mem
        for _ in range(n):
            head, used_len = USED_ELEM.unpack_from(self.used, 4 + 8 * (self.last_used % self.size))
            self.last_used = (self.last_used + 1) & 0xFFFF
            token = self._by_head.pop(head, None)
            if token is None:
                raise ProtocolViolation(f"queue {self.index}: used entry for head {head}, "
                                        "which is not in flight")
            rec = self.inflight.pop(token)
            capacity = sum(n for _, n in rec.writable) + rec.foreign
            if used_len > capacity:
                raise ProtocolViolation(f"queue {self.index}: used.len {used_len} exceeds the "
                                        f"{capacity} writable bytes of head {head}")
            if len(rec.writable) == 1:
                data = mem.read(*rec.writable[0])
            else:
                data = b"".join(mem.read(a, n) for a, n in rec.writable)
            if self.written is not None:
                left = used_len
                for a, k in rec.writable:
                    if left <= 0:
                        break
                    self.written.append((a, min(k, left)))
                    left -= k
            self.free_descs.extend(rec.descs)
            for a in rec.allocs:
                mem.free(a)
            self._done[token] = Completion(token, head, used_len, data)
        return n

    def _arm(self) -> bool:
        """Ask for a call on the next used entry; True if one arrived meanwhile."""
        if self.event_idx:
            self.avail16[self._used_event_off >> 1] = self.last_used
        fence()  # used_event store before the used.idx re-check (spec 2.7.10 race)
        return self.used16[1] != self.last_used

    def _sleep(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ReplyTimeout(f"queue {self.index}: no used entry within the deadline"
                               f" ({len(self.inflight)} in flight)" + self.fe._process_note())
        events = self._poll.poll(left * 1000)
        for fd, ev in events:
            if fd == self.call_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.call_fd)
                self.calls += 1
            elif ev:
                self.fe.check_alive()

    def wait(self, token: int, timeout: float | None = None) -> Completion:
        """The completion of `token`, waiting for the daemon's call if needed."""
        deadline = time.monotonic() + (self.fe.timeout if timeout is None else timeout)
        while True:
            done = self._done.pop(token, None)
            if done is not None:
                return done
            if token not in self.inflight:
                raise ValueError(f"token {token} is not in flight on queue {self.index}")
            if self.poll() or self._arm():
                continue
            self._sleep(deadline)

    def complete(self, timeout: float | None = None) -> list[Completion]:
        """Every completion available, waiting for at least one."""
        deadline = time.monotonic() + (self.fe.timeout if timeout is None else timeout)
        while True:
            self.poll()
            if self._done:
                out = list(self._done.values())
                self._done.clear()
                return out
            if not self.inflight:
                raise ValueError(f"nothing in flight on queue {self.index}")
            if self._arm():
                continue
            self._sleep(deadline)

    def expect_no_completion(self, timeout: float) -> None:
        """Assert the daemon publishes nothing for `timeout` seconds (for 'must ignore' tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll():
                raise ProtocolViolation(f"queue {self.index}: unexpected used entry")
            self._arm()
            with contextlib.suppress(ReplyTimeout):
                self._sleep(deadline)
        if self.poll():
            raise ProtocolViolation(f"queue {self.index}: unexpected used entry")

    def request(self, readable: Sequence[bytes], writable: Sequence[int] = (),
                timeout: float | None = None, **chain) -> Completion:
        return self.wait(self.submit(readable, writable, **chain), timeout)


# --- FUSE client


class FuseReply(NamedTuple):
    error: int           # positive errno, 0 on success
    body: bytes


# Reply body capacity per opcode when the caller does not say (protocol.md 4.3).
_REPLY_SIZE = {
    fa.Opcode.LOOKUP: fa.ENTRY_OUT.size,
    fa.Opcode.GETATTR: fa.ATTR_OUT.size,
    fa.Opcode.SETATTR: fa.ATTR_OUT.size,
    fa.Opcode.SYMLINK: fa.ENTRY_OUT.size,
    fa.Opcode.MKNOD: fa.ENTRY_OUT.size,
    fa.Opcode.MKDIR: fa.ENTRY_OUT.size,
    fa.Opcode.LINK: fa.ENTRY_OUT.size,
    fa.Opcode.OPEN: fa.OPEN_OUT.size,
    fa.Opcode.OPENDIR: fa.OPEN_OUT.size,
    fa.Opcode.WRITE: fa.WRITE_OUT.size,
    fa.Opcode.STATFS: fa.STATFS_OUT.size,
    fa.Opcode.INIT: fa.INIT_OUT.size,
    fa.Opcode.CREATE: fa.ENTRY_OUT.size + fa.OPEN_OUT.size,
    fa.Opcode.GETLK: fa.LK_OUT.size,
    fa.Opcode.LSEEK: fa.LSEEK_OUT.size,
    fa.Opcode.COPY_FILE_RANGE: fa.WRITE_OUT.size,
    fa.Opcode.COPY_FILE_RANGE_64: fa.COPY_FILE_RANGE_OUT.size,
    fa.Opcode.BMAP: fa.BMAP_OUT.size,
    fa.Opcode.TMPFILE: fa.ENTRY_OUT.size + fa.OPEN_OUT.size,
    fa.Opcode.STATX: fa.STATX_OUT.size,
}
_NO_BODY = frozenset({
    fa.Opcode.UNLINK, fa.Opcode.RMDIR, fa.Opcode.RENAME, fa.Opcode.RENAME2, fa.Opcode.RELEASE,
    fa.Opcode.RELEASEDIR, fa.Opcode.FSYNC, fa.Opcode.FSYNCDIR, fa.Opcode.SETXATTR,
    fa.Opcode.REMOVEXATTR, fa.Opcode.FLUSH, fa.Opcode.ACCESS, fa.Opcode.SETLK,
    fa.Opcode.SETLKW, fa.Opcode.DESTROY, fa.Opcode.FALLOCATE, fa.Opcode.SYNCFS,
})
DEFAULT_REPLY_SIZE = 4096

# What the Linux driver offers in INIT, minus the bits that change request formats (security
# context extensions) or are /dev/fuse-only (protocol.md 4.4, 4.5).
DEFAULT_INIT_FLAGS = (
    fa.InitFlag.ASYNC_READ | fa.InitFlag.POSIX_LOCKS | fa.InitFlag.ATOMIC_O_TRUNC
    | fa.InitFlag.EXPORT_SUPPORT | fa.InitFlag.BIG_WRITES | fa.InitFlag.DONT_MASK
    | fa.InitFlag.FLOCK_LOCKS | fa.InitFlag.HAS_IOCTL_DIR | fa.InitFlag.AUTO_INVAL_DATA
    | fa.InitFlag.DO_READDIRPLUS | fa.InitFlag.READDIRPLUS_AUTO | fa.InitFlag.ASYNC_DIO
    | fa.InitFlag.PARALLEL_DIROPS | fa.InitFlag.HANDLE_KILLPRIV | fa.InitFlag.POSIX_ACL
    | fa.InitFlag.ABORT_ERROR | fa.InitFlag.MAX_PAGES | fa.InitFlag.CACHE_SYMLINKS
    | fa.InitFlag.EXPLICIT_INVAL_DATA | fa.InitFlag.SUBMOUNTS
    | fa.InitFlag.HANDLE_KILLPRIV_V2 | fa.InitFlag.SETXATTR_EXT | fa.InitFlag.INIT_EXT
    | fa.InitFlag.CREATE_SUPP_GROUP | fa.InitFlag.HAS_EXPIRE_ONLY
    | fa.InitFlag.DIRECT_IO_ALLOW_MMAP | fa.InitFlag.NO_EXPORT_SUPPORT
    | fa.InitFlag.HAS_RESEND
)


def _name(name: str | bytes) -> bytes:
    return (os.fsencode(name) if isinstance(name, str) else name) + b"\0"


class FuseClient:
    """FUSE over virtio-fs request queues, the way the Linux driver frames it (protocol.md 3.2).

    Readable part: fuse_in_header in its own buffer, then the body (one buffer per element when
    a sequence is given, e.g. WRITE's fuse_write_in and its data).  Writable part:
    fuse_out_header in its own buffer, then the reply body buffer.

    `request()` returns FuseReply(error, body) with a positive errno (0 = success); the
    typed helpers raise FuseError instead.  Every reply is checked: unique echoed, out.len
    exact and within the buffers, error in -511..0, no body with an error, and (check_used_len)
    used.len == out.len.  A violation raises ProtocolViolation.
    """

    def __init__(self, frontend: Frontend, queue: int = 1, *, hiprio: int = 0,
                 uid: int = 0, gid: int = 0, pid: int = 0, check_used_len: bool = True) -> None:
        self.fe = frontend
        self.vq = frontend.queue(queue)
        self.hiprio_index = hiprio
        self.uid, self.gid, self.pid = uid, gid, pid
        self.check_used_len = check_used_len
        self._unique = itertools.count(2, 2)
        self._pending: dict[int, tuple[int, int, int]] = {}   # token -> unique, opcode, cap
        self.init_out: fa.InitOut | None = None
        self.flags = 0   # INIT flags the daemon accepted

    # -- framing

    def build(self, opcode: int, nodeid: int, body: bytes | Sequence[bytes] = b"", *,
              uid: int | None = None, gid: int | None = None, pid: int | None = None,
              unique: int | None = None, total_extlen: int = 0,
              length: int | None = None) -> tuple[int, list[bytes]]:
        """(unique, readable buffers) of one request; length overrides in.len (fault tests)."""
        parts = [body] if isinstance(body, bytes | bytearray | memoryview) else list(body)
        parts = [bytes(p) for p in parts if len(p)]
        if unique is None:
            unique = next(self._unique)
        n = fa.IN_HEADER.size + sum(len(p) for p in parts)
        hdr = fa.IN_HEADER.pack(n if length is None else length, opcode, unique, nodeid,
                                self.uid if uid is None else uid,
                                self.gid if gid is None else gid,
                                self.pid if pid is None else pid, total_extlen)
        return unique, [hdr, *parts]

    def submit(self, opcode: int, nodeid: int, body: bytes | Sequence[bytes] = b"", *,
               out_size: int | None = None, uid: int | None = None, gid: int | None = None,
               pid: int | None = None, kick: bool = True, **chain) -> int:
        """Queue one request; returns a token for result().  chain: DriverQueue.submit options."""
        if out_size is None:
            out_size = 0 if opcode in _NO_BODY else _REPLY_SIZE.get(opcode, DEFAULT_REPLY_SIZE)
        unique, readable = self.build(opcode, nodeid, body, uid=uid, gid=gid, pid=pid)
        writable = [fa.OUT_HEADER.size, out_size] if out_size else [fa.OUT_HEADER.size]
        token = self.vq.submit(readable, writable, kick=kick, **chain)
        self._pending[token] = (unique, opcode, fa.OUT_HEADER.size + out_size)
        return token

    def parse(self, c: Completion, unique: int, capacity: int) -> FuseReply:
        if len(c.data) < fa.OUT_HEADER.size or c.used_len < fa.OUT_HEADER.size:
            raise ProtocolViolation(f"reply of {c.used_len} bytes has no fuse_out_header")
        out = fa.OutHeader.unpack(c.data)
        if out.unique != unique:
            raise ProtocolViolation(f"reply unique {out.unique:#x}, request was {unique:#x}")
        if not out.is_valid() or out.len > capacity:
            raise ProtocolViolation(f"bad fuse_out_header {out} for {capacity} writable bytes")
        if out.error and out.len != fa.OUT_HEADER.size:
            raise ProtocolViolation(f"error reply {out.error} carries {out.len - 16} body bytes")
        if self.check_used_len and c.used_len != out.len:
            raise ProtocolViolation(f"used.len {c.used_len} != fuse_out_header.len {out.len}")
        return FuseReply(-out.error, c.data[fa.OUT_HEADER.size : out.len])

    def result(self, token: int, timeout: float | None = None) -> FuseReply:
        c = self.vq.wait(token, timeout)
        unique, _opcode, capacity = self._pending.pop(token)
        return self.parse(c, unique, capacity)

    def collect(self, timeout: float | None = None) -> list[tuple[int, FuseReply]]:
        """(token, reply) for every reply available on the queue, waiting for at least one."""
        out = []
        for c in self.vq.complete(timeout):
            unique, _opcode, capacity = self._pending.pop(c.token)
            out.append((c.token, self.parse(c, unique, capacity)))
        return out

    def request(self, opcode: int, nodeid: int, body: bytes | Sequence[bytes] = b"", *,
                uid: int | None = None, gid: int | None = None, pid: int | None = None,
                out_size: int | None = None, timeout: float | None = None,
                **chain) -> FuseReply:
        token = self.submit(opcode, nodeid, body, out_size=out_size, uid=uid, gid=gid, pid=pid,
                            **chain)
        return self.result(token, timeout)

    def call(self, opcode: int, nodeid: int, body: bytes | Sequence[bytes] = b"",
             **kw) -> bytes:
        """request() that raises FuseError on an error reply; returns the body."""
        r = self.request(opcode, nodeid, body, **kw)
        if r.error:
            raise FuseError(r.error, opcode)
        return r.body

    def _fixed(self, opcode: int, nodeid: int, body, st: struct.Struct, **kw) -> bytes:
        data = self.call(opcode, nodeid, body, **kw)
        if len(data) != st.size:
            raise ProtocolViolation(f"{fa.Opcode(opcode).name} reply body of {len(data)} "
                                    f"bytes, expected {st.size}")
        return data

    # -- session

    def init(self, *, major: int = fa.KERNEL_VERSION, minor: int = fa.KERNEL_MINOR_VERSION,
             max_readahead: int = 128 << 10, flags: int = DEFAULT_INIT_FLAGS) -> fa.InitOut:
        body = fa.InitIn(major, minor, max_readahead, flags & 0xFFFFFFFF, flags >> 32).pack()
        data = self.call(fa.Opcode.INIT, 0, body)
        if len(data) < fa.INIT_OUT.size:
            data = data + bytes(fa.INIT_OUT.size - len(data))
        self.init_out = fa.InitOut.unpack(data)
        self.flags = self.init_out.all_flags & flags
        return self.init_out

    def destroy(self) -> bool:
        """DESTROY; True if the daemon answered with a header (protocol.md 4.10), False if it
        only returned the chain (used.len 0), which is what virtiofsd does."""
        token = self.submit(fa.Opcode.DESTROY, 0)
        c = self.vq.wait(token)
        unique, _opcode, capacity = self._pending.pop(token)
        if c.used_len == 0:
            return False
        r = self.parse(c, unique, capacity)
        if r.error:
            raise FuseError(r.error, fa.Opcode.DESTROY)
        return True

    # -- hiprio queue: no reply, done when the used entry appears (protocol.md 3.3)

    def _hiprio(self, opcode: int, nodeid: int, body: bytes,
                timeout: float | None = None) -> Completion:
        _unique, readable = self.build(opcode, nodeid, body)
        # Linux sends a FORGET as one readable buffer (virtio_fs_send_forget).
        return self.fe.queue(self.hiprio_index).request([b"".join(readable)], (), timeout)

    def forget(self, nodeid: int, nlookup: int = 1, timeout: float | None = None) -> Completion:
        return self._hiprio(fa.Opcode.FORGET, nodeid, fa.FORGET_IN.pack(nlookup), timeout)

    def batch_forget(self, items: Sequence[tuple[int, int]],
                     timeout: float | None = None) -> Completion:
        body = fa.BATCH_FORGET_IN.pack(len(items)) + b"".join(
            fa.FORGET_ONE.pack(n, k) for n, k in items)
        return self._hiprio(fa.Opcode.BATCH_FORGET, 0, body, timeout)

    # -- entries and attributes

    def lookup(self, parent: int, name: str | bytes) -> fa.EntryOut:
        return fa.EntryOut.unpack(self._fixed(fa.Opcode.LOOKUP, parent, _name(name), fa.ENTRY_OUT))

    def getattr(self, nodeid: int, fh: int | None = None) -> fa.AttrOut:
        body = fa.GETATTR_IN.pack(0 if fh is None else fa.GETATTR_FH, fh or 0)
        return fa.AttrOut.unpack(self._fixed(fa.Opcode.GETATTR, nodeid, body, fa.ATTR_OUT))

    def setattr(self, nodeid: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None,
                atime: tuple[int, int] | None = None, mtime: tuple[int, int] | None = None,
                fh: int | None = None, extra_valid: int = 0) -> fa.AttrOut:
        """atime/mtime are (seconds, nanoseconds); extra_valid adds e.g. ATIME_NOW."""
        v = fa.SetattrValid
        valid, kw = extra_valid, {}
        for flag, key, value in ((v.MODE, "mode", mode), (v.UID, "uid", uid),
                                 (v.GID, "gid", gid), (v.SIZE, "size", size),
                                 (v.FH, "fh", fh)):
            if value is not None:
                valid |= flag
                kw[key] = value
        if atime is not None:
            valid |= v.ATIME
            kw["atime"], kw["atimensec"] = atime
        if mtime is not None:
            valid |= v.MTIME
            kw["mtime"], kw["mtimensec"] = mtime
        body = fa.SetattrIn(valid, **kw).pack()
        return fa.AttrOut.unpack(self._fixed(fa.Opcode.SETATTR, nodeid, body, fa.ATTR_OUT))

    def mkdir(self, parent: int, name: str | bytes, mode: int = 0o755,
              umask: int = 0) -> fa.EntryOut:
        body = fa.MKDIR_IN.pack(mode, umask) + _name(name)
        return fa.EntryOut.unpack(self._fixed(fa.Opcode.MKDIR, parent, body, fa.ENTRY_OUT))

    def mknod(self, parent: int, name: str | bytes, mode: int, rdev: int = 0,
              umask: int = 0) -> fa.EntryOut:
        body = fa.MKNOD_IN.pack(mode, rdev, umask) + _name(name)
        return fa.EntryOut.unpack(self._fixed(fa.Opcode.MKNOD, parent, body, fa.ENTRY_OUT))

    def symlink(self, parent: int, name: str | bytes, target: str | bytes) -> fa.EntryOut:
        body = _name(name) + _name(target)
        return fa.EntryOut.unpack(self._fixed(fa.Opcode.SYMLINK, parent, body, fa.ENTRY_OUT))

    def link(self, nodeid: int, newparent: int, newname: str | bytes) -> fa.EntryOut:
        body = fa.LINK_IN.pack(nodeid) + _name(newname)
        return fa.EntryOut.unpack(self._fixed(fa.Opcode.LINK, newparent, body, fa.ENTRY_OUT))

    def readlink(self, nodeid: int, size: int = 4096) -> bytes:
        return self.call(fa.Opcode.READLINK, nodeid, out_size=size)

    def unlink(self, parent: int, name: str | bytes) -> None:
        self.call(fa.Opcode.UNLINK, parent, _name(name))

    def rmdir(self, parent: int, name: str | bytes) -> None:
        self.call(fa.Opcode.RMDIR, parent, _name(name))

    def rename(self, parent: int, name: str | bytes, newparent: int,
               newname: str | bytes) -> None:
        self.call(fa.Opcode.RENAME, parent,
                  fa.RENAME_IN.pack(newparent) + _name(name) + _name(newname))

    def rename2(self, parent: int, name: str | bytes, newparent: int, newname: str | bytes,
                flags: int = 0) -> None:
        self.call(fa.Opcode.RENAME2, parent,
                  fa.RENAME2_IN.pack(newparent, flags) + _name(name) + _name(newname))

    # -- files

    def create(self, parent: int, name: str | bytes, mode: int = 0o644,
               flags: int = os.O_RDWR | os.O_CREAT, umask: int = 0,
               open_flags: int = 0) -> tuple[fa.EntryOut, fa.OpenOut]:
        body = fa.CREATE_IN.pack(flags, mode, umask, open_flags) + _name(name)
        size = fa.ENTRY_OUT.size + fa.OPEN_OUT.size
        data = self.call(fa.Opcode.CREATE, parent, body)
        if len(data) != size:
            raise ProtocolViolation(f"CREATE reply body of {len(data)} bytes, expected {size}")
        return fa.EntryOut.unpack(data), fa.OpenOut.unpack(data, fa.ENTRY_OUT.size)

    def open(self, nodeid: int, flags: int = os.O_RDWR, open_flags: int = 0) -> fa.OpenOut:
        body = fa.OPEN_IN.pack(flags, open_flags)
        return fa.OpenOut.unpack(self._fixed(fa.Opcode.OPEN, nodeid, body, fa.OPEN_OUT))

    def read(self, nodeid: int, fh: int, offset: int, size: int, **chain) -> bytes:
        body = fa.ReadIn(fh, offset, size).pack()
        return self.call(fa.Opcode.READ, nodeid, body, out_size=size, **chain)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, write_flags: int = 0,
              **chain) -> int:
        body = [fa.WriteIn(fh, offset, len(data), write_flags).pack(), data]
        return fa.WRITE_OUT.unpack(self._fixed(fa.Opcode.WRITE, nodeid, body, fa.WRITE_OUT,
                                               **chain))[0]

    def read_foreign(self, nodeid: int, fh: int, offset: int,
                     data: Sequence[int | tuple[int, int]]) -> FuseReply:
        """READ whose data buffers are `data`: sizes placed in guest memory, (gpa, length)
        used as they are (the DAX window); the reply's body holds the guest-memory part."""
        size = sum(p[1] if isinstance(p, tuple) else p for p in data)
        unique, readable = self.build(fa.Opcode.READ, nodeid, fa.ReadIn(fh, offset, size).pack())
        token = self.vq.submit_foreign(readable, [fa.OUT_HEADER.size, *data])
        return self.parse(self.vq.wait(token), unique, fa.OUT_HEADER.size + size)

    def write_foreign(self, nodeid: int, fh: int, offset: int,
                      data: Sequence[bytes | tuple[int, int]]) -> FuseReply:
        """WRITE whose data buffers are `data`: bytes placed in guest memory, (gpa, length)
        used as they are (the DAX window)."""
        size = sum(p[1] if isinstance(p, tuple) else len(p) for p in data)
        body = fa.WriteIn(fh, offset, size, 0).pack()
        unique, readable = self.build(fa.Opcode.WRITE, nodeid, body,
                                      length=fa.IN_HEADER.size + len(body) + size)
        token = self.vq.submit_foreign([*readable, *data],
                                       [fa.OUT_HEADER.size, fa.WRITE_OUT.size])
        return self.parse(self.vq.wait(token), unique, fa.OUT_HEADER.size + fa.WRITE_OUT.size)

    def release(self, nodeid: int, fh: int, flags: int = 0, release_flags: int = 0,
                lock_owner: int = 0) -> None:
        self.call(fa.Opcode.RELEASE, nodeid,
                  fa.RELEASE_IN.pack(fh, flags, release_flags, lock_owner))

    def flush(self, nodeid: int, fh: int, lock_owner: int = 0) -> None:
        self.call(fa.Opcode.FLUSH, nodeid, fa.FLUSH_IN.pack(fh, lock_owner))

    def fsync(self, nodeid: int, fh: int, datasync: bool = False) -> None:
        self.call(fa.Opcode.FSYNC, nodeid,
                  fa.FSYNC_IN.pack(fh, fa.FSYNC_FDATASYNC if datasync else 0))

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int = 0) -> None:
        self.call(fa.Opcode.FALLOCATE, nodeid, fa.FALLOCATE_IN.pack(fh, offset, length, mode))

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        body = fa.LSEEK_IN.pack(fh, offset, whence)
        return fa.LSEEK_OUT.unpack(self._fixed(fa.Opcode.LSEEK, nodeid, body, fa.LSEEK_OUT))[0]

    def copy_file_range(self, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int,
                        fh_out: int, off_out: int, length: int, flags: int = 0) -> int:
        body = fa.COPY_FILE_RANGE_IN.pack(fh_in, off_in, nodeid_out, fh_out, off_out, length,
                                          flags)
        data = self._fixed(fa.Opcode.COPY_FILE_RANGE, nodeid_in, body, fa.WRITE_OUT)
        return fa.WRITE_OUT.unpack(data)[0]

    def setupmapping(self, nodeid: int, fh: int, foffset: int, length: int, moffset: int,
                     flags: int = fa.SETUPMAPPING_FLAG_READ) -> None:
        self.call(fa.Opcode.SETUPMAPPING, nodeid,
                  fa.SETUPMAPPING_IN.pack(fh, foffset, length, flags, moffset))

    def removemapping(self, ranges: Sequence[tuple[int, int]], nodeid: int = fa.ROOT_ID) -> None:
        """(moffset, len) ranges; the array follows the 4-byte count (protocol.md 3.5)."""
        body = fa.REMOVEMAPPING_IN.pack(len(ranges)) + b"".join(
            fa.REMOVEMAPPING_ONE.pack(m, n) for m, n in ranges)
        self.call(fa.Opcode.REMOVEMAPPING, nodeid, body)

    def getlk(self, nodeid: int, fh: int, owner: int, start: int, end: int, type_: int,
              pid: int = 0, lk_flags: int = 0) -> tuple[int, int, int, int]:
        """Returns the conflicting lock (start, end, type, pid), type F_UNLCK if none."""
        body = fa.LK_IN.pack(fh, owner, start, end, type_, pid, lk_flags)
        return fa.LK_OUT.unpack(self._fixed(fa.Opcode.GETLK, nodeid, body, fa.LK_OUT))

    def setlk(self, nodeid: int, fh: int, owner: int, start: int, end: int, type_: int,
              pid: int = 0, lk_flags: int = 0, wait: bool = False) -> None:
        op = fa.Opcode.SETLKW if wait else fa.Opcode.SETLK
        self.call(op, nodeid, fa.LK_IN.pack(fh, owner, start, end, type_, pid, lk_flags))

    # -- directories

    def opendir(self, nodeid: int, flags: int = os.O_RDONLY) -> fa.OpenOut:
        body = fa.OPEN_IN.pack(flags, 0)
        return fa.OpenOut.unpack(self._fixed(fa.Opcode.OPENDIR, nodeid, body, fa.OPEN_OUT))

    def readdir(self, nodeid: int, fh: int, offset: int = 0,
                size: int = 4096) -> list[fa.Dirent]:
        body = fa.ReadIn(fh, offset, size).pack()
        data = self.call(fa.Opcode.READDIR, nodeid, body, out_size=size)
        try:
            return fa.unpack_dirents(data)
        except ValueError as e:
            raise ProtocolViolation(f"READDIR reply: {e}") from None

    def readdirplus(self, nodeid: int, fh: int, offset: int = 0,
                    size: int = 4096) -> list[fa.DirentPlus]:
        body = fa.ReadIn(fh, offset, size).pack()
        data = self.call(fa.Opcode.READDIRPLUS, nodeid, body, out_size=size)
        try:
            return fa.unpack_direntplus(data)
        except ValueError as e:
            raise ProtocolViolation(f"READDIRPLUS reply: {e}") from None

    def readdir_all(self, nodeid: int, fh: int, size: int = 4096) -> list[fa.Dirent]:
        """READDIR until an empty reply, following the cookies (protocol.md 4.8)."""
        out: list[fa.Dirent] = []
        offset = 0
        while True:
            batch = self.readdir(nodeid, fh, offset, size)
            if not batch:
                return out
            out.extend(batch)
            offset = batch[-1].off

    def releasedir(self, nodeid: int, fh: int) -> None:
        self.call(fa.Opcode.RELEASEDIR, nodeid, fa.RELEASE_IN.pack(fh, 0, 0, 0))

    def fsyncdir(self, nodeid: int, fh: int, datasync: bool = False) -> None:
        self.call(fa.Opcode.FSYNCDIR, nodeid,
                  fa.FSYNC_IN.pack(fh, fa.FSYNC_FDATASYNC if datasync else 0))

    # -- file system

    def statfs(self, nodeid: int = fa.ROOT_ID) -> fa.Kstatfs:
        return fa.Kstatfs.unpack(self._fixed(fa.Opcode.STATFS, nodeid, b"", fa.STATFS_OUT))

    def access(self, nodeid: int, mask: int) -> None:
        self.call(fa.Opcode.ACCESS, nodeid, fa.ACCESS_IN.pack(mask))

    def syncfs(self, nodeid: int = fa.ROOT_ID) -> None:
        self.call(fa.Opcode.SYNCFS, nodeid, fa.SYNCFS_IN.pack())

    # -- extended attributes

    def setxattr(self, nodeid: int, name: str | bytes, value: bytes, flags: int = 0,
                 setxattr_flags: int = 0) -> None:
        # The 16-byte fuse_setxattr_in only once SETXATTR_EXT was negotiated (protocol.md 4.3).
        if self.flags & fa.InitFlag.SETXATTR_EXT:
            head = fa.SETXATTR_IN.pack(len(value), flags, setxattr_flags)
        else:
            head = fa.SETXATTR_IN_COMPAT.pack(len(value), flags)
        self.call(fa.Opcode.SETXATTR, nodeid, head + _name(name) + value)

    def getxattr(self, nodeid: int, name: str | bytes, size: int = 4096) -> bytes | int:
        """The value, or with size=0 the size needed (fuse_getxattr_out)."""
        body = fa.GETXATTR_IN.pack(size) + _name(name)
        if size == 0:
            data = self._fixed(fa.Opcode.GETXATTR, nodeid, body, fa.GETXATTR_OUT,
                               out_size=fa.GETXATTR_OUT.size)
            return fa.GETXATTR_OUT.unpack(data)[0]
        return self.call(fa.Opcode.GETXATTR, nodeid, body, out_size=size)

    def listxattr(self, nodeid: int, size: int = 4096) -> list[bytes] | int:
        """The names, or with size=0 the size needed."""
        body = fa.GETXATTR_IN.pack(size)
        if size == 0:
            data = self._fixed(fa.Opcode.LISTXATTR, nodeid, body, fa.GETXATTR_OUT,
                               out_size=fa.GETXATTR_OUT.size)
            return fa.GETXATTR_OUT.unpack(data)[0]
        data = self.call(fa.Opcode.LISTXATTR, nodeid, body, out_size=size)
        return [n for n in data.split(b"\0") if n]

    def removexattr(self, nodeid: int, name: str | bytes) -> None:
        self.call(fa.Opcode.REMOVEXATTR, nodeid, _name(name))


# --- the DAX cache window and the back-end channel (protocol.md 1.5, 1.13, 3.5)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_MS_SYNC = 4
_PROT_NONE = 0


class CacheWindow:
    """The VMM's cache window: address space reserved PROT_NONE, into which the back-end's
    requests map file ranges with MAP_FIXED, as cloud-hypervisor maps its virtio-fs cache.

    It records what is mapped where, so that reads and writes "through the window" (what the
    guest does with DAX) touch only mapped pages: a stray access to the reservation would
    kill the test process with SIGSEGV, as it would fault the guest."""

    # Where the guest sees the window: past any guest memory a test gives (cloud-hypervisor
    # places its cache BAR in the 64-bit PCI hole, above RAM).
    DEFAULT_GPA = 1 << 40

    def __init__(self, size: int, gpa: int = DEFAULT_GPA) -> None:
        self.size = size
        self.gpa = gpa
        addr = _libc.mmap(None, size, _PROT_NONE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "cannot reserve the cache window")
        self.base = addr
        self.mapped: dict[int, tuple[int, bool]] = {}   # page offset -> (end, writable)

    def _fits(self, offset: int, length: int) -> bool:
        return length > 0 and offset + length <= self.size and not (offset | length) % PAGE

    def map(self, fd: int, fd_offset: int, offset: int, length: int, writable: bool) -> None:
        if not self._fits(offset, length):
            raise OSError(errno.EINVAL, "range outside the window")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        got = _libc.mmap(self.base + offset, length, prot, mmap.MAP_SHARED | _MAP_FIXED, fd,
                         fd_offset)
        if got in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap into the window failed")
        self._drop(offset, offset + length)
        self.mapped[offset] = (offset + length, writable)

    def unmap(self, offset: int, length: int) -> None:
        """Back to the reservation (cloud-hypervisor maps anonymous PROT_NONE over it)."""
        if not self._fits(offset, length):
            raise OSError(errno.EINVAL, "range outside the window")
        got = _libc.mmap(self.base + offset, length, _PROT_NONE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE,
                         -1, 0)
        if got in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "unmapping the window failed")
        self._drop(offset, offset + length)

    def sync(self, offset: int, length: int) -> None:
        if not self._fits(offset, length):
            raise OSError(errno.EINVAL, "range outside the window")
        if _libc.msync(self.base + offset, length, _MS_SYNC):
            raise OSError(ctypes.get_errno(), "msync failed")

    def _drop(self, start: int, end: int) -> None:
        for off, (e, w) in list(self.mapped.items()):
            if e <= start or off >= end:
                continue
            del self.mapped[off]
            if off < start:
                self.mapped[off] = (start, w)
            if e > end:
                self.mapped[end] = (e, w)

    def covered(self, offset: int, length: int, write: bool = False) -> bool:
        pos, end = offset, offset + length
        while pos < end:
            start = pos - pos % PAGE
            hit = next(((o, e, w) for o, (e, w) in self.mapped.items() if o <= start < e), None)
            if hit is None or (write and not hit[2]):
                return False
            pos = hit[1]
        return True

    def read(self, offset: int, length: int) -> bytes:
        """What the guest reads through the window; OSError(EFAULT) where nothing is mapped."""
        if not self.covered(offset, length):
            raise OSError(errno.EFAULT, f"window range {offset:#x}+{length:#x} is not mapped")
        return ctypes.string_at(self.base + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if not self.covered(offset, len(data), write=True):
            raise OSError(errno.EFAULT, f"window range {offset:#x}+{len(data):#x} is not"
                                        " mapped writable")
        ctypes.memmove(self.base + offset, data, len(data))

    def io(self, fd: int, fd_offset: int, gpa: int, length: int, to_file: bool,
           memory: GuestMemory | None) -> int:
        """FS_IO as cloud-hypervisor serves it: pread (to_file False) or pwrite between `fd`
        and guest-physical [gpa, +length) -- the window, or else guest memory; the bytes
        moved.  A range that leaves the window or memory is EFAULT; a page of the window
        that maps nothing (or is read-only, for a pread) is EFAULT from the kernel."""
        if self.gpa <= gpa < self.gpa + self.size:
            if gpa + length > self.gpa + self.size:
                raise OSError(errno.EFAULT, "range runs past the window")
            buf = memoryview((ctypes.c_char * length).from_address(
                self.base + gpa - self.gpa)).cast("B")
        else:
            try:
                if memory is None:
                    raise ValueError("no guest memory")
                buf = memory.view(gpa, length)
            except ValueError:
                raise OSError(errno.EFAULT, f"{gpa:#x}+{length:#x} is neither window nor"
                                            " guest memory") from None
        done = 0
        while done < length:
            if to_file:
                n = os.pwritev(fd, [buf[done:]], fd_offset + done)
            else:
                n = os.preadv(fd, [buf[done:]], fd_offset + done)
            if n == 0:
                # cloud-hypervisor fails an FS_IO that meets end of file (no errno: EINVAL).
                raise OSError(errno.EINVAL, "end of file")
            done += n
        return done

    def close(self) -> None:
        if self.base:
            _libc.munmap(self.base, self.size)
            self.base = 0
            self.mapped.clear()


class BackendChannel:
    """The front-end's end of the back-end channel (SET_BACKEND_REQ_FD), served by a thread as
    a VMM serves it beside the device's own socket.  `family` is "fs" (cloud-hypervisor's
    FS_MAP/FS_UNMAP/FS_SYNC/FS_IO) or "shmem" (SHMEM_MAP/SHMEM_UNMAP, region 0 = the window).
    Each request is logged in `requests` as (name, details, result) with the errno answered
    (0: done), and answered with a u64 (-errno on failure) when it asks for a reply."""

    def __init__(self, window: CacheWindow, family: str = "fs",
                 memory: GuestMemory | None = None) -> None:
        self.window = window
        self.family = family
        self.memory = memory
        self.requests: list[tuple[str, tuple, int]] = []
        self.changed = threading.Condition()
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ours.settimeout(None)
        self._stop = False
        self.thread = threading.Thread(target=self._serve, name="backend-channel", daemon=True)
        self.thread.start()

    def wait_for(self, count: int,
                 timeout: float = DEFAULT_TIMEOUT) -> list[tuple[str, tuple, int]]:
        """The log once it holds `count` requests (ReplyTimeout if it never does)."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise ReplyTimeout(f"{len(self.requests)} back-end requests, {count} awaited")
            return list(self.requests)

    def _recv(self, n: int, fds: list[int]) -> bytes:
        data = b""
        while len(data) < n:
            chunk, anc, _flags, _ = self.ours.recvmsg(n - len(data), socket.CMSG_SPACE(8 * 4))
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", cdata[: len(cdata) - len(cdata) % 4]))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _serve(self) -> None:
        while not self._stop:
            fds: list[int] = []
            try:
                hdr = Header.unpack(self._recv(HEADER_SIZE, fds))
                payload = self._recv(hdr.size, fds) if hdr.size else b""
            except (EOFError, OSError):
                _close_fds(fds)
                return
            try:
                name, details, err = self._handle(hdr.request, payload, fds)
            finally:
                _close_fds(fds)
            with self.changed:
                self.requests.append((name, details, err))
                self.changed.notify_all()
            if hdr.flags & HeaderFlag.NEED_REPLY:
                value = (-err) & ((1 << 64) - 1)
                if name == "FS_IO" and not err:
                    value = details[1]           # FS_IO answers the bytes it moved
                reply = Header(hdr.request, VERSION | HeaderFlag.REPLY, U64.size).pack()
                with contextlib.suppress(OSError):
                    self.ours.sendall(reply + U64.pack(value))

    def _handle(self, request: int, payload: bytes, fds: list[int]) -> tuple[str, tuple, int]:
        w = self.window
        moved = 0
        try:
            if self.family == "fs":
                name = FsBackendRequest(request).name
                entries = [e for e in FsBackendMsg.unpack(payload).entries if e[2]]
                for fd_offset, offset, length, flags in entries:
                    if request == FsBackendRequest.FS_MAP:
                        w.map(fds[0], fd_offset, offset, length, bool(flags & FsMapFlag.MAP_W))
                    elif request == FsBackendRequest.FS_UNMAP:
                        if length == FS_UNMAP_ALL:       # cloud-hypervisor: the whole window
                            offset, length = 0, w.size
                        w.unmap(offset, length)
                    elif request == FsBackendRequest.FS_SYNC:
                        w.sync(offset, length)
                    else:                                # FS_IO: `offset` is a guest address
                        moved += w.io(fds[0], fd_offset, offset, length,
                                      bool(flags & FsMapFlag.MAP_W), self.memory)
                if request == FsBackendRequest.FS_IO:
                    return name, (tuple(entries), moved), 0
                return name, tuple(entries), 0
            name = ShmemBackendRequest(request).name
            m = ShmemMap.unpack(payload)
            if m.shmid != 0:
                raise OSError(errno.EINVAL, f"no shared memory region {m.shmid}")
            details = (m.fd_offset, m.shm_offset, m.len, m.flags)
            if request == ShmemBackendRequest.SHMEM_MAP:
                if not w.covered(m.shm_offset, m.len) and any(
                        o < m.shm_offset + m.len and m.shm_offset < e
                        for o, (e, _w) in w.mapped.items()):
                    raise OSError(errno.EEXIST, "mapping over an existing mapping")
                w.map(fds[0], m.fd_offset, m.shm_offset, m.len,
                      bool(m.flags & ShmemFlag.WRITABLE))
            else:
                if w.mapped.get(m.shm_offset, (None,))[0] != m.shm_offset + m.len:
                    raise OSError(errno.EINVAL, "not one whole mapping")
                w.unmap(m.shm_offset, m.len)
            return name, details, 0
        except (OSError, ValueError, IndexError) as e:
            err = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
            return f"request {request}", (payload[:64],), err

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.ours.shutdown(socket.SHUT_RDWR)
        self.thread.join(DEFAULT_TIMEOUT)
        self.ours.close()
        self.theirs.close()


def attach_window(fe: Frontend, window: CacheWindow, family: str = "fs") -> BackendChannel:
    """Give the daemon a back-end channel to `window` (SET_BACKEND_REQ_FD); for the SHMEM
    family the driver first asks for the daemon's regions, as crosvm does."""
    channel = BackendChannel(window, family, fe.memory)
    try:
        if family == "shmem":
            sizes = unpack_shmem_config(fe.send(Request.GET_SHMEM_CONFIG).payload)
            if sizes[0] != window.size:
                raise ProtocolViolation(f"shared memory region 0 of {sizes[0]} bytes, the"
                                        f" window has {window.size}")
        fe.send(Request.SET_BACKEND_REQ_FD, fds=[channel.theirs.fileno()])
    except BaseException:
        channel.close()
        raise
    return channel
# --- moving a guest to another daemon


def adopt(src: Frontend, socket_path: str, *, process: subprocess.Popen | None = None,
          timeout: float | None = None) -> Frontend:
    """A front-end on a second daemon that takes `src`'s guest over, as a migration's
    destination does: the same features, the same guest memory and driver queues (their rings,
    descriptors in flight, kick and call eventfds).  Nothing is sent beyond the negotiation;
    the caller loads the state and sets the memory table and the rings up.  `src` keeps only
    its connection, for the caller to close."""
    fe = Frontend(connect_unix(socket_path, timeout or src.timeout, process),
                  timeout=timeout or src.timeout, process=process)
    try:
        fe.negotiate(event_idx=bool(src.acked_features & Feature.EVENT_IDX),
                     indirect=bool(src.acked_features & Feature.INDIRECT_DESC),
                     protocol_features=src.acked_protocol_features)
    except BaseException:
        fe.close()
        raise
    fe.memory, src.memory = src.memory, None
    fe.queues, src.queues = src.queues, {}
    for q in fe.queues.values():
        q._poll.unregister(src.sock.fileno())
        q._poll.register(fe.sock.fileno(), select.POLLIN)
        q.fe = fe
        q.started = False
    return fe


# --- crosvm's SLEEP / WAKE / SNAPSHOT / RESTORE, framed as crosvm's vhost-user client sent them
# (its vmm_vhost crate, backend_client.rs, March 2024): flags VERSION alone (no NEED_REPLY),
# every reply a one-byte VhostUserSuccess, SNAPSHOT's followed by the state; RESTORE's payload is
# the state, its fds nothing or one kick eventfd per ring.  crosvm itself is not packaged here:
# this side is ours, written from crosvm's source.

# SNAPSHOT's reply and RESTORE's payload carry a whole state: the driver's own bound for them.
CROSVM_MAX_STATE = 64 << 20


def _crosvm_call(fe: Frontend, request: int, payload: bytes = b"", fds: Sequence[int] = ()
                 ) -> bytes:
    """Send one crosvm request; returns the reply's payload after the success byte, raising
    BackendError when the byte says failure."""
    fe.send_raw(Header(request, VERSION, len(payload)).pack() + payload, fds)
    fds_in: list[int] = []
    what = f"reply to {_req_name(request)}"
    hdr = Header.unpack(fe._recv_exact(HEADER_SIZE, what, fds_in))
    if hdr.size > CROSVM_MAX_STATE:
        _close_fds(fds_in)
        raise ProtocolViolation(f"{what} announces {hdr.size} payload bytes")
    body = fe._recv_exact(hdr.size, what, fds_in) if hdr.size else b""
    _close_fds(fds_in)
    if hdr.request != request or hdr.flags != VERSION | HeaderFlag.REPLY:
        raise ProtocolViolation(f"{what} has request {hdr.request} flags {hdr.flags:#x}")
    if fds_in:
        raise ProtocolViolation(f"{what} carries file descriptors")
    if not body:
        raise ProtocolViolation(f"{what} has no success byte")
    (ok,) = CROSVM_SUCCESS.unpack_from(body)
    if not ok:
        raise BackendError(request, 1)
    return body[1:]


def crosvm_sleep(fe: Frontend) -> None:
    """SLEEP: every ring stops where it is; the driver's queues are marked stopped."""
    if _crosvm_call(fe, Request.SLEEP):
        raise ProtocolViolation("the reply to SLEEP has more than its success byte")
    for q in fe.queues.values():
        q.started = False


def crosvm_wake(fe: Frontend) -> None:
    """WAKE: the rings SLEEP stopped run again from where they stopped."""
    if _crosvm_call(fe, Request.WAKE):
        raise ProtocolViolation("the reply to WAKE has more than its success byte")
    for q in fe.queues.values():
        q.started = True
        if q.inflight:
            q.kick(force=True)


def crosvm_snapshot(fe: Frontend) -> bytes:
    return _crosvm_call(fe, Request.SNAPSHOT)


def crosvm_restore(fe: Frontend, state: bytes, queue_events: Sequence[int] = ()) -> None:
    """RESTORE into a fresh back-end (after SET_MEM_TABLE and, per ring, SET_VRING_CALL, as
    crosvm's vhost_user_restore does); the rings stay asleep until WAKE."""
    if _crosvm_call(fe, Request.RESTORE, state, queue_events):
        raise ProtocolViolation("the reply to RESTORE has more than its success byte")


# --- running a daemon


def anchor_argv(socket_path: str, shared_dir: str, *extra: str) -> list[str]:
    """Command line of the Rust virtiofsd used as the reference daemon."""
    return [ANCHOR, f"--socket-path={socket_path}", f"--shared-dir={shared_dir}",
            "--sandbox=none", *extra]


def start_daemon(argv: Sequence[str], log_path: str | None = None) -> subprocess.Popen:
    """Start a daemon with stdout+stderr to log_path (or discarded)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, close_fds=True)
    finally:
        if log_path:
            out.close()


def _read_with_deadline(fd: int, timeout: float) -> bytes:
    """One read of a device-state channel, or ReplyTimeout when nothing comes."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        raise ReplyTimeout(f"no device state for {timeout}s")
    return os.read(fd, 1 << 16)


def stop_daemon(proc: subprocess.Popen, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Kill a daemon this process started and reap it; returns its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise ReplyTimeout(f"daemon pid {proc.pid} survived SIGKILL for {timeout}s") from None


__all__ = [
    "ANCHOR", "DEFAULT_INIT_FLAGS", "DEFAULT_PROTOCOL_FEATURES", "DEFAULT_TIMEOUT",
    "BackendChannel", "BackendError", "CacheWindow", "Completion", "DaemonGone", "DriverQueue",
    "Frontend", "FrontendError",
    "FuseClient", "FuseError", "FuseReply", "GuestMemory", "Message", "ProtocolViolation",
    "QueueFull", "Region", "ReplyTimeout", "anchor_argv", "attach_window", "connect_unix",
    "start_daemon", "stop_daemon",
]
__all__ += ["DirtyLog", "pages_of"]      # dirty-page logging (tests/test_dirtylog.py)


# --- file locks: a request left waiting, and its interruption ------------------------------------


def submit_lock(client: FuseClient, nodeid: int, fh: int, owner: int, start: int, end: int,
                type_: int, *, pid: int = 0, lk_flags: int = 0,
                wait: bool = True) -> tuple[int, int]:
    """Queue a SETLKW (SETLK with wait=False) without waiting for its reply: (token, unique).
    client.result(token) collects the reply whenever it comes."""
    op = fa.Opcode.SETLKW if wait else fa.Opcode.SETLK
    token = client.submit(op, nodeid, fa.LK_IN.pack(fh, owner, start, end, type_, pid, lk_flags))
    return token, client._pending[token][0]


def interrupt(client: FuseClient, unique: int, timeout: float | None = None) -> Completion:
    """FUSE_INTERRUPT of request `unique`, on the hiprio queue as the spec places it."""
    return client._hiprio(fa.Opcode.INTERRUPT, 0, fa.INTERRUPT_IN.pack(unique), timeout)


def reconnect(fe: Frontend, socket_path: str, process: subprocess.Popen | None = None) -> None:
    """The same guest -- its memory, its rings and whatever is queued in them -- on a new
    connection, as a front-end that reconnects after the back-end restarted (cloud-hypervisor,
    QEMU's reconnect): features and memory negotiated again, every ring resumed where its used
    index stands.  No FUSE_INIT is sent: the guest's FUSE session goes on."""
    old = fe.sock
    new = connect_unix(socket_path, fe.timeout, process)
    for q in fe.queues.values():
        q._poll.unregister(old.fileno())
        q._poll.register(new.fileno(), select.POLLIN)
    old.close()
    fe.sock = new
    fe.process = process
    fe.timeout = fe.timeout
    fe.acked_protocol_features = 0      # a new session: no REPLY_ACK until negotiated again
    fe.negotiate()
    fe.set_mem_table()
    for i, q in fe.queues.items():
        fe.start_queue(i, base=q.used_idx())
