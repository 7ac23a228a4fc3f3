"""The vhost-user control plane (QEMU docs/interop/vhost-user.rst; protocol.md section 1).

`Backend` holds one connection's device state and answers every request a virtio-fs front-end
sends.  Ring and memory changes are forwarded to the queue workers through `QueueControl`; the
supervisor itself never maps guest memory.  All checks on a message's shape happen in one place,
`Backend.gate()`, before any handler runs: payload size, owner state, negotiated protocol
features, and which requests may carry fds and how many.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pyvirtiofsd.common import inflight, snapshot, virtio
from pyvirtiofsd.common.control import MAX_FDS as CONTROL_MAX_FDS
from pyvirtiofsd.common.control import RingFlag, RingGeometry
from pyvirtiofsd.common.devstate import StateError
from pyvirtiofsd.common.vhost_user import (
    CROSVM_SUCCESS,
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    HEADER_SIZE,
    MAX_FDS,
    U64,
    ConfigSpace,
    Header,
    InflightDescription,
    LogDescription,
    MemoryRegion,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    pack_shmem_config,
    unpack_memory_table,
    unpack_single_region,
)
from pyvirtiofsd.supervisor.dax import DaxWindow

log = logging.getLogger("pyvirtiofsd.vhost")

FEATURES = (
    virtio.Feature.VERSION_1
    | virtio.Feature.INDIRECT_DESC
    | virtio.Feature.EVENT_IDX
    | F_PROTOCOL_FEATURES
    | F_LOG_ALL
)
BASE_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
    | ProtocolFeature.DEVICE_STATE
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.INFLIGHT_SHMFD
)
# Every region's fd reaches the workers in one control message.
MAX_MEM_SLOTS = CONTROL_MAX_FDS


MESSAGE_TIMEOUT = 10.0   # seconds to receive the rest of a message once it has started


class RequestError(Exception):
    """The request is refused; the front-end gets a failure ack (or, without one, a log line)."""


class Disconnect(Exception):
    """The connection cannot continue (bad framing, or a reply we cannot give)."""


def receive(conn: socket.socket) -> tuple[Header, bytes, list[int]] | None:
    """One vhost-user message off the connection, framed: the header arrives with any fds
    (spec "Communication"), is checked here (flags, payload size) before the payload is read,
    and the rest of the checks are Backend.gate()'s.  None: the front-end closed the
    connection.  Every fd received is closed on any error."""
    fds: list[int] = []
    data, anc, flags, _ = conn.recvmsg(HEADER_SIZE, socket.CMSG_SPACE(MAX_FDS * 4))
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(int.from_bytes(cdata[i:i + 4], sys.byteorder)
                       for i in range(0, len(cdata) - len(cdata) % 4, 4))
    try:
        if flags & socket.MSG_CTRUNC:
            # Name the request when its header came whole with the fds, as for other errors.
            what = f"request {Header.unpack(data).request}: " if len(data) == HEADER_SIZE else ""
            raise Disconnect(f"{what}more than {MAX_FDS} file descriptors in one message")
        if not data:
            if fds:
                raise Disconnect("file descriptors without a message")
            return None
        conn.settimeout(MESSAGE_TIMEOUT)
        try:
            while len(data) < HEADER_SIZE:
                more = conn.recv(HEADER_SIZE - len(data))
                if not more:
                    raise Disconnect("connection closed inside a message header")
                data += more
            hdr = Header.unpack(data)
            if not hdr.is_valid():
                raise Disconnect(f"request {hdr.request}: invalid header (flags {hdr.flags:#x},"
                                 f" size {hdr.size})")
            payload = bytearray()       # crosvm's RESTORE may carry megabytes
            while len(payload) < hdr.size:
                more = conn.recv(min(hdr.size - len(payload), 1 << 20))
                if not more:
                    raise Disconnect(f"request {hdr.request}: connection closed inside payload")
                payload += more
        except TimeoutError:
            raise Disconnect("a message stayed incomplete for"
                             f" {MESSAGE_TIMEOUT:.0f} s") from None
        finally:
            conn.settimeout(None)
        return hdr, bytes(payload), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class QueueControl(Protocol):
    """What the control plane needs from the process table (supervisor/procs.py)."""

    def set_mem_table(self, regions: list[MemoryRegion], fds: list[int]) -> None: ...
    def drop_memory(self) -> None: ...
    def start_ring(self, index: int, geometry: RingGeometry, kick: int | None,
                   call: int | None, err: int | None = None) -> None: ...
    def stop_ring(self, index: int) -> int: ...
    def set_call(self, index: int, call: int | None) -> None: ...
    def set_enable(self, index: int, enabled: bool) -> None: ...
    def save_state(self, fd: int) -> None: ...
    def load_state(self, fd: int) -> None: ...
    def check_state(self) -> None: ...
    def prepare_state(self) -> None: ...
    def set_log_base(self, size: int, offset: int, fd: int | None) -> None: ...
    def set_log_state(self, index: int, log_all: bool, ring: bool, used_gpa: int) -> None: ...
    def set_inflight(self, fd: int | None, offset: int = 0, queue_size: int = 0,
                     num_queues: int = 0) -> None: ...


@dataclass
class Vring:
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    started: bool = False
    enabled: bool = False
    # Stopped by crosvm's SLEEP (its notifiers kept): WAKE starts it again.
    sleeping: bool = False

    def close_fds(self, names: tuple[str, ...] = ("kick", "call", "err")) -> None:
        for name in names:
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


@dataclass(frozen=True)
class Rule:
    """How one request is framed: payload size (None = checked by its handler), fds allowed,
    whether the reply is part of the message definition, the protocol feature it needs, and
    whether SET_OWNER must have been seen."""

    size: int | None
    fds: tuple[int, int] = (0, 0)
    replies: bool = False
    gate: ProtocolFeature | None = None
    owner: bool = True
    # The reply a refused request gets when its definition has its own failure answer
    # (crosvm's VhostUserSuccess) rather than a REPLY_ACK or a disconnect.
    failure: bytes | None = None


_U64 = U64.size
_STATE = VringState.STRUCT.size
# SET_DEVICE_STATE_FD's payload: transfer direction, migration phase (spec "Migrating back-end
# state").  Its reply: bits 0-7 an error code, bit 8 "no fd" (the front-end's own channel is
# used); this back-end never offers a channel of its own, so bit 8 is always set.
DEVICE_STATE_PARAMS = struct.Struct("=II")
STATE_SAVE, STATE_LOAD = 0, 1
STATE_PHASE_STOPPED = 0
STATE_NO_FD = 0x100
_REGION_MSG = 8 + MemoryRegion.STRUCT.size

RULES: dict[Request, Rule] = {
    Request.GET_FEATURES: Rule(0, replies=True, owner=False),
    Request.SET_FEATURES: Rule(_U64),
    Request.SET_OWNER: Rule(0, owner=False),
    Request.RESET_OWNER: Rule(0),
    Request.SET_MEM_TABLE: Rule(None, fds=(1, 8)),
    Request.SET_VRING_NUM: Rule(_STATE),
    Request.SET_VRING_ADDR: Rule(VringAddr.STRUCT.size),
    Request.SET_VRING_BASE: Rule(_STATE),
    Request.GET_VRING_BASE: Rule(_STATE, replies=True),
    Request.SET_VRING_KICK: Rule(_U64, fds=(0, 1)),
    Request.SET_VRING_CALL: Rule(_U64, fds=(0, 1)),
    Request.SET_VRING_ERR: Rule(_U64, fds=(0, 1)),
    Request.GET_PROTOCOL_FEATURES: Rule(0, replies=True, owner=False),
    Request.SET_PROTOCOL_FEATURES: Rule(_U64, owner=False),
    Request.GET_QUEUE_NUM: Rule(0, replies=True, gate=ProtocolFeature.MQ, owner=False),
    Request.SET_VRING_ENABLE: Rule(_STATE),
    Request.GET_CONFIG: Rule(None, replies=True, gate=ProtocolFeature.CONFIG, owner=False),
    Request.SET_CONFIG: Rule(None, gate=ProtocolFeature.CONFIG),
    Request.RESET_DEVICE: Rule(0, gate=ProtocolFeature.RESET_DEVICE),
    Request.GET_MAX_MEM_SLOTS: Rule(0, replies=True, gate=ProtocolFeature.CONFIGURE_MEM_SLOTS,
                                    owner=False),
    Request.ADD_MEM_REG: Rule(_REGION_MSG, fds=(1, 1), gate=ProtocolFeature.CONFIGURE_MEM_SLOTS),
    # The spec says no fd SHOULD come with REM_MEM_REG, but a back-end MAY accept one.
    Request.REM_MEM_REG: Rule(_REGION_MSG, fds=(0, 1), gate=ProtocolFeature.CONFIGURE_MEM_SLOTS),
    Request.SET_STATUS: Rule(_U64, gate=ProtocolFeature.STATUS),
    Request.GET_STATUS: Rule(0, replies=True, gate=ProtocolFeature.STATUS),
    # DAX (supervisor/dax.py), offered with --dax only.  The back-end channel carries no
    # payload of its own; some front-ends send a u64 with it.  QEMU sets it up right after
    # the protocol features, before SET_OWNER (vhost_user_backend_init).
    Request.SET_BACKEND_REQ_FD: Rule(None, fds=(1, 1), gate=ProtocolFeature.BACKEND_REQ,
                                     owner=False),
    Request.GET_SHMEM_CONFIG: Rule(0, replies=True, gate=ProtocolFeature.SHMEM, owner=False),
    # Dirty logging (spec "Migration"): QEMU waits for SET_LOG_BASE's reply whenever LOG_SHMFD
    # is negotiated, REPLY_ACK or not (its vhost_user_set_log_base reads one back).
    Request.SET_LOG_BASE: Rule(LogDescription.STRUCT.size, fds=(1, 1), replies=True,
                               gate=ProtocolFeature.LOG_SHMFD),
    Request.SET_LOG_FD: Rule(0, fds=(1, 1)),
    Request.SET_DEVICE_STATE_FD: Rule(DEVICE_STATE_PARAMS.size, fds=(1, 1), replies=True,
                                      gate=ProtocolFeature.DEVICE_STATE),
    Request.CHECK_DEVICE_STATE: Rule(0, replies=True, gate=ProtocolFeature.DEVICE_STATE),
    Request.GET_INFLIGHT_FD: Rule(InflightDescription.STRUCT.size, replies=True,
                                  gate=ProtocolFeature.INFLIGHT_SHMFD),
    Request.SET_INFLIGHT_FD: Rule(InflightDescription.STRUCT.size, fds=(1, 1),
                                  gate=ProtocolFeature.INFLIGHT_SHMFD),
}
# With --dax: the back-end channel, fds over it, and VIRTIO shared memory regions.
DAX_PROTOCOL_FEATURES = (ProtocolFeature.BACKEND_REQ | ProtocolFeature.BACKEND_SEND_FD
                         | ProtocolFeature.SHMEM)


# crosvm's SLEEP / WAKE / SNAPSHOT / RESTORE (common/vhost_user.py; docs/crosvm.md): always
# answered, with one success byte, a refusal included.  RESTORE's fds are nothing or one kick
# eventfd per ring.
_CROSVM_FAILED = CROSVM_SUCCESS.pack(0)
_CROSVM_OK = CROSVM_SUCCESS.pack(1)
RULES.update({
    Request.SLEEP: Rule(0, replies=True, failure=_CROSVM_FAILED),
    Request.WAKE: Rule(0, replies=True, failure=_CROSVM_FAILED),
    Request.SNAPSHOT: Rule(0, replies=True, failure=_CROSVM_FAILED),
    Request.RESTORE: Rule(None, fds=(0, MAX_FDS), replies=True, failure=_CROSVM_FAILED),
})


def _channel() -> tuple[int, int]:
    """A channel for the device state between the supervisor and a worker: a socketpair, since
    the supervisor's seccomp policy has no pipe (policies/supervisor.policy); the worker reads
    and writes it as it does QEMU's pipe, to EOF."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return a.detach(), b.detach()


def _failure_reply(code: int) -> bytes | None:
    try:
        rule = RULES.get(Request(code))
    except ValueError:
        return None
    return rule.failure if rule is not None else None


def _name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


@dataclass
class Backend:
    queues: QueueControl
    num_queues: int
    max_queue_size: int = 1024
    tag: str | None = None
    owner: bool = False
    acked_features: int = 0
    protocol_features: int = 0
    status: int = 0
    regions: list[tuple[MemoryRegion, int]] = field(default_factory=list)
    vrings: list[Vring] = field(default_factory=list)
    # The DAX window of this connection (--dax), None without.
    dax: DaxWindow | None = None
    # The dirty log (spec "Migration"): its description and fd, kept for workers started
    # later; and the logging state each ring's worker was last given (log_all, ring, address).
    dirty_log: tuple[LogDescription, int] | None = None
    log_sent: dict[int, tuple[bool, bool, int]] = field(default_factory=dict)
    # The inflight region of this connection (INFLIGHT_SHMFD): its memfd and description.
    inflight: tuple[int, InflightDescription] | None = None
    # Fds that go with the next reply (GET_INFLIGHT_FD); the sender closes them once sent.
    reply_fds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vrings = [Vring() for _ in range(self.num_queues)]
        self._handlers: dict[Request, Callable[[bytes, list[int]], bytes | None]] = {
            req: getattr(self, "on_" + req.name.lower()) for req in RULES
        }

    @property
    def offered_protocol_features(self) -> int:
        # QEMU 7.1-8.0 crash when a back-end offers CONFIG, so only with --tag (as virtiofsd).
        extra = ProtocolFeature.CONFIG if self.tag else 0
        if self.dax is not None:
            extra |= DAX_PROTOCOL_FEATURES
        return int(BASE_PROTOCOL_FEATURES | extra)

    # -- the one validation gate ----------------------------------------------------------
    def gate(self, hdr: Header, payload: bytes, fds: list[int]) -> Rule:
        """The checks on a framed message (receive() checked its header) before its handler
        runs: known request, payload size, fd count, negotiated feature, owner."""
        try:
            req = Request(hdr.request)
        except ValueError:
            raise RequestError(f"unknown {_name(hdr.request)}") from None
        rule = RULES.get(req)
        if rule is None:
            raise RequestError(f"{req.name} is not supported by this back-end")
        if rule.size is not None and len(payload) != rule.size:
            raise RequestError(f"{req.name}: payload of {len(payload)} bytes, expected {rule.size}")
        lo, hi = rule.fds
        if not lo <= len(fds) <= hi:
            raise RequestError(f"{req.name}: {len(fds)} file descriptors, expected {lo}..{hi}")
        if rule.gate is not None and not self.protocol_features & rule.gate:
            raise RequestError(f"{req.name} needs protocol feature {rule.gate.name},"
                               " which was not negotiated")
        if rule.owner and not self.owner:
            raise RequestError(f"{req.name} before SET_OWNER")
        return rule

    def handle(self, hdr: Header, payload: bytes, fds: list[int]) -> bytes | None:
        """Process one request; returns the reply payload to send, if any.

        A handler takes ownership of an fd by removing it from the list it is given; whatever
        is left there is closed here, on success and on error alike.  Raises Disconnect when
        the connection must end.
        """
        owned = list(fds)
        try:
            rule = self.gate(hdr, payload, owned)
            reply = self._handlers[Request(hdr.request)](payload, owned)
        except RequestError as e:
            log.warning("vhost-user %s refused: %s", _name(hdr.request), e)
            failure = _failure_reply(hdr.request)
            if failure is not None:
                return failure
            if self._acks(hdr):
                return U64.pack(1)
            if hdr.request in RULES and RULES[Request(hdr.request)].replies:
                raise Disconnect(f"{_name(hdr.request)} cannot be answered: {e}") from None
            return None
        finally:
            for fd in owned:
                os.close(fd)
        if rule.replies:
            return reply
        return U64.pack(0) if self._acks(hdr) else None

    def _acks(self, hdr: Header) -> bool:
        """REPLY_ACK (spec "REPLY_ACK"): ack only when negotiated and asked for."""
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK and hdr.need_reply)

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < self.num_queues:
            raise RequestError(f"vring index {index} out of range (0..{self.num_queues - 1})")
        return self.vrings[index]

    # -- session and features -------------------------------------------------------------
    def on_get_features(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(int(FEATURES))

    def on_set_features(self, payload: bytes, fds: list[int]) -> None:
        (features,) = U64.unpack(payload)
        if features & ~int(FEATURES):
            raise RequestError(f"features {features & ~int(FEATURES):#x} were never offered")
        self._log_all(self.acked_features, features)
        self.acked_features = features
        if not features & F_PROTOCOL_FEATURES:
            # Without protocol features every ring is enabled at once (spec "Ring states").
            for i, vring in enumerate(self.vrings):
                self._set_enabled(i, vring, True)
        # VHOST_F_LOG_ALL may be turned on and off while the rings run (spec "Migration").
        self._update_logging()
        return None

    def on_set_owner(self, payload: bytes, fds: list[int]) -> None:
        if self.owner:
            raise RequestError("SET_OWNER on a connection that already has an owner")
        self.owner = True

    def on_reset_owner(self, payload: bytes, fds: list[int]) -> None:
        # Deprecated; the spec recommends ignoring it or disabling the rings: disable them.
        self.stop_all()

    def on_get_protocol_features(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(self.offered_protocol_features)

    def on_set_protocol_features(self, payload: bytes, fds: list[int]) -> None:
        (features,) = U64.unpack(payload)
        if features & ~self.offered_protocol_features:
            raise RequestError(f"protocol features {features:#x} include bits never offered")
        self.protocol_features = features
        if self.dax is not None:
            self.dax.negotiated(features)

    def on_get_queue_num(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(self.num_queues)

    def on_reset_device(self, payload: bytes, fds: list[int]) -> None:
        # Disable all rings and forget negotiated virtio features; keep ownership (spec).
        self.stop_all()
        if self.dax is not None:
            # The front-end unmaps the window across a reset (VU+ 1.13).
            self.dax.mappings.clear()
        self.acked_features = 0
        self.status = 0
        self._update_logging()

    def on_set_status(self, payload: bytes, fds: list[int]) -> None:
        (status,) = U64.unpack(payload)
        if status > 0xFF:
            raise RequestError(f"device status {status:#x} is wider than 8 bits")
        self.status = status

    def on_get_status(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(self.status)

    def on_get_config(self, payload: bytes, fds: list[int]) -> bytes:
        cfg = ConfigSpace.unpack(payload) if len(payload) >= ConfigSpace.STRUCT.size else None
        if cfg is None or not cfg.is_valid(len(payload)):
            # A zero-size config payload tells the front-end the request failed (spec).
            return ConfigSpace(0, 0, 0).pack()
        space = virtio.FS_CONFIG.pack((self.tag or "").encode(), self.num_queues - 1)
        data = space[cfg.offset : cfg.offset + cfg.size].ljust(cfg.size, b"\0")
        return cfg.pack() + data

    def on_set_config(self, payload: bytes, fds: list[int]) -> None:
        raise RequestError("the virtio-fs configuration space is read-only")

    # -- DAX: the back-end channel and the window (supervisor/dax.py) -----------------------
    def on_set_backend_req_fd(self, payload: bytes, fds: list[int]) -> None:
        if len(payload) not in (0, U64.size):
            raise RequestError(f"SET_BACKEND_REQ_FD: payload of {len(payload)} bytes")
        assert self.dax is not None          # the gate: BACKEND_REQ is offered with --dax only
        try:
            self.dax.attach(fds.pop())
        except OSError as e:
            raise RequestError(f"SET_BACKEND_REQ_FD: {e.strerror or e}") from None
        log.info("back-end channel set; the cache window is %s", "known" if self.dax.active
                 else "not known until GET_SHMEM_CONFIG")

    def on_get_shmem_config(self, payload: bytes, fds: list[int]) -> bytes:
        assert self.dax is not None          # the gate: SHMEM is offered with --dax only
        return pack_shmem_config(self.dax.shmem_config())
    # -- device state (spec "Migrating back-end state"; worker/migration.py) ----------------
    def on_set_device_state_fd(self, payload: bytes, fds: list[int]) -> bytes:
        direction, phase = DEVICE_STATE_PARAMS.unpack(payload)
        fd = fds.pop()
        try:
            if direction not in (STATE_SAVE, STATE_LOAD):
                raise RequestError(f"unknown transfer direction {direction}")
            if phase != STATE_PHASE_STOPPED:
                raise RequestError(f"migration phase {phase}: only STOPPED (0) is supported")
            running = [i for i, v in enumerate(self.vrings) if v.started]
            if running:
                raise RequestError(f"vring {running[0]} is running: the device must be"
                                   " stopped first (GET_VRING_BASE)")
            try:
                if direction == STATE_SAVE:
                    self.queues.save_state(fd)
                else:
                    self.queues.load_state(fd)
            except OSError as e:
                what = "taken" if direction == STATE_SAVE else "loaded"
                raise RequestError(f"the device state cannot be {what}: {e.strerror or e}"
                                   ) from None
        except RequestError as e:
            log.warning("vhost-user SET_DEVICE_STATE_FD refused: %s", e)
            return U64.pack(STATE_NO_FD | 1)
        finally:
            os.close(fd)           # the worker holds its own copy
        return U64.pack(STATE_NO_FD)

    def on_check_device_state(self, payload: bytes, fds: list[int]) -> bytes:
        try:
            self.queues.check_state()
        except OSError as e:
            # The worker logged the reason in one line when the transfer failed.
            log.warning("vhost-user CHECK_DEVICE_STATE: the last transfer failed (%s)",
                        e.strerror or e)
            return U64.pack(1)
        return U64.pack(0)

    def _log_all(self, before: int, after: int) -> None:
        """Dirty logging turning on means a migration is starting: the pre-migration pass
        records where every inode is while the guest still runs."""
        if after & F_LOG_ALL and not before & F_LOG_ALL:
            try:
                self.queues.prepare_state()
            except OSError as e:
                log.warning("pre-migration pass failed: %s", e.strerror or e)

    # -- memory ----------------------------------------------------------------------------
    def on_set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        try:
            regions = unpack_memory_table(payload)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if len(regions) != len(fds):
            raise RequestError(f"{len(regions)} regions but {len(fds)} file descriptors")
        self._check_regions(regions)
        table = list(zip(regions, fds, strict=True))
        fds.clear()
        self._apply_regions(table)

    def on_get_max_mem_slots(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(MAX_MEM_SLOTS)

    def on_add_mem_reg(self, payload: bytes, fds: list[int]) -> None:
        region = unpack_single_region(payload)
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise RequestError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        self._check_regions([r for r, _ in self.regions] + [region])
        self._apply_regions([*self.regions, (region, fds.pop())])

    def on_rem_mem_reg(self, payload: bytes, fds: list[int]) -> None:
        gone = unpack_single_region(payload)
        for i, (r, _fd) in enumerate(self.regions):
            # The mmap offset is ignored when matching (spec REM_MEM_REG).
            if (r.guest_phys_addr, r.memory_size, r.userspace_addr) == (
                gone.guest_phys_addr, gone.memory_size, gone.userspace_addr):
                self._apply_regions(self.regions[:i] + self.regions[i + 1:])
                return
        raise RequestError(f"REM_MEM_REG: no region at guest address {gone.guest_phys_addr:#x}")

    @staticmethod
    def _check_regions(regions: list[MemoryRegion]) -> None:
        for r in regions:
            if not r.is_valid():
                raise RequestError(f"memory region at {r.guest_phys_addr:#x} size"
                                   f" {r.memory_size:#x} is empty or overflows")
        for key in ("guest_phys_addr", "userspace_addr"):
            spans = sorted((getattr(r, key), getattr(r, key) + r.memory_size) for r in regions)
            for (_, end), (start, _) in itertools.pairwise(spans):
                if start < end:
                    raise RequestError(f"memory regions overlap at {key} {start:#x}")

    def _apply_regions(self, table: list[tuple[MemoryRegion, int]]) -> None:
        """Hand the whole new table to every worker; the supervisor keeps the region fds (a
        respawned worker needs them).  Fds end up owned by exactly one table, old or new."""
        kept = {fd for _, fd in table}
        known = {fd for _, fd in self.regions}
        try:
            self.queues.set_mem_table([r for r, _ in table], [fd for _, fd in table])
        except OSError as e:
            for fd in kept - known:
                os.close(fd)
            raise RequestError(f"a queue worker could not map the memory table: {e}") from None
        for fd in known - kept:
            os.close(fd)
        self.regions = table
        self._check_log_reach()

    def close_regions(self) -> None:
        for _, fd in self.regions:
            os.close(fd)
        self.regions = []

    # -- rings -----------------------------------------------------------------------------
    def on_set_vring_num(self, payload: bytes, fds: list[int]) -> None:
        st = VringState.unpack(payload)
        vring = self._vring(st.index)
        if st.num == 0 or st.num & (st.num - 1) or st.num > self.max_queue_size:
            raise RequestError(f"queue size {st.num} is not a power of two in"
                               f" 1..{self.max_queue_size}")
        if vring.started:
            raise RequestError(f"SET_VRING_NUM on running vring {st.index}")
        vring.num = st.num

    def on_set_vring_addr(self, payload: bytes, fds: list[int]) -> None:
        addr = VringAddr.unpack(payload)
        vring = self._vring(addr.index)
        if not addr.is_valid():
            raise RequestError(f"vring {addr.index}: misaligned ring address or unknown flags")
        if addr.flags & VringAddr.F_LOG and not self.protocol_features & ProtocolFeature.LOG_SHMFD:
            raise RequestError("VHOST_VRING_F_LOG, but dirty logging (LOG_SHMFD) was not"
                               " negotiated")
        if vring.started and not self._same_ring(vring.addr, addr):
            raise RequestError(f"SET_VRING_ADDR on running vring {addr.index}")
        vring.addr = addr
        self._send_log_state(addr.index, vring)

    def on_set_vring_base(self, payload: bytes, fds: list[int]) -> None:
        st = VringState.unpack(payload)
        vring = self._vring(st.index)
        if st.num > 0xFFFF:
            raise RequestError(f"vring base {st.num:#x} does not fit 16 bits (split ring)")
        if vring.started:
            raise RequestError(f"SET_VRING_BASE on running vring {st.index}")
        vring.base = st.num

    def on_get_vring_base(self, payload: bytes, fds: list[int]) -> bytes:
        st = VringState.unpack(payload)
        vring = self._vring(st.index)
        if vring.started:
            vring.base = self.queues.stop_ring(st.index)
            vring.started = False
        # The ring is stopped; its notifiers go with it (rust-vmm drops kick and call too).  The
        # error notifier stays: QEMU sets it once per device, not per ring start.
        vring.close_fds(("kick", "call"))
        return VringState(st.index, vring.base).pack()

    def _vring_fd(self, payload: bytes, fds: list[int]) -> tuple[int, Vring, int | None]:
        (value,) = U64.unpack(payload)
        index = value & 0xFF
        if value & ~0x1FF:
            raise RequestError(f"vring fd message with unknown bits {value:#x}")
        nofd = bool(value & 0x100)
        if nofd == bool(fds):
            raise RequestError("invalid-FD flag and attached fds disagree")
        vring = self._vring(index)
        fd = fds.pop() if fds else None
        return index, vring, fd

    def on_set_vring_kick(self, payload: bytes, fds: list[int]) -> None:
        index, vring, fd = self._vring_fd(payload, fds)
        if vring.kick is not None:
            os.close(vring.kick)
        vring.kick = fd
        self._start(index, vring)

    def on_set_vring_call(self, payload: bytes, fds: list[int]) -> None:
        index, vring, fd = self._vring_fd(payload, fds)
        if vring.call is not None:
            os.close(vring.call)
        vring.call = fd
        if vring.started:
            self.queues.set_call(index, fd)

    def on_set_vring_err(self, payload: bytes, fds: list[int]) -> None:
        _index, vring, fd = self._vring_fd(payload, fds)
        if vring.err is not None:
            os.close(vring.err)
        vring.err = fd

    def on_set_vring_enable(self, payload: bytes, fds: list[int]) -> None:
        st = VringState.unpack(payload)
        vring = self._vring(st.index)
        if not self.acked_features & F_PROTOCOL_FEATURES:
            raise RequestError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        if st.num > 1:
            raise RequestError(f"SET_VRING_ENABLE with value {st.num}")
        self._set_enabled(st.index, vring, bool(st.num))

    def _set_enabled(self, index: int, vring: Vring, enabled: bool) -> None:
        vring.enabled = enabled
        if vring.started:
            self.queues.set_enable(index, enabled)

    def _start(self, index: int, vring: Vring) -> None:
        """Rings start with SET_VRING_KICK (spec "Ring states", current wording)."""
        if vring.addr is None or vring.num == 0:
            raise RequestError(f"SET_VRING_KICK on vring {index} before its size and addresses")
        if vring.kick is None:
            # The invalid-FD flag asks the back-end to poll the ring; workers sleep on the kick
            # eventfd, so refuse at once rather than leave the ring's requests hanging.
            raise RequestError(f"vring {index}: polling without a kick fd is not supported")
        if vring.started:
            vring.base = self.queues.stop_ring(index)
            vring.started = False
        flags = RingFlag(0)
        if self.acked_features & virtio.Feature.EVENT_IDX:
            flags |= RingFlag.EVENT_IDX
        if self.acked_features & virtio.Feature.INDIRECT_DESC:
            flags |= RingFlag.INDIRECT
        if vring.enabled:
            flags |= RingFlag.ENABLED
        geometry = RingGeometry(vring.num, flags, vring.addr.desc, vring.addr.avail,
                                vring.addr.used, vring.base)
        try:
            self.queues.start_ring(index, geometry, vring.kick, vring.call, vring.err)
        except OSError as e:
            raise RequestError(f"vring {index} could not start: {e}") from None
        vring.started = True

    # -- pausing for a snapshot (supervisor/snapshot.py) --------------------------------------
    def pause_rings(self) -> list[int]:
        """Stop every running ring at an exact index, as GET_VRING_BASE does (every request
        taken from it is answered first); the rings stopped, for resume_rings()."""
        paused = []
        for i, vring in enumerate(self.vrings):
            if vring.started:
                vring.base = self.queues.stop_ring(i)
                vring.started = False
                paused.append(i)
        return paused

    def resume_rings(self, paused: list[int]) -> None:
        """Start the rings pause_rings() stopped again at the index each stopped at, with the
        notifiers, enable state and logging they had: the front-end sees no change but a
        delay.  A kick that came meanwhile is still on the kick eventfd."""
        for i in paused:
            try:
                self._start(i, self.vrings[i])
            except RequestError as e:
                log.error("vring %d could not be resumed after the snapshot: %s", i, e)

    def stop_all(self) -> None:
        for i, vring in enumerate(self.vrings):
            if vring.started:
                try:
                    vring.base = self.queues.stop_ring(i)
                except OSError as e:
                    log.warning("stopping vring %d: %s", i, e)
                vring.started = False
            vring.enabled = False
            vring.close_fds()

    # -- inflight I/O tracking (protocol.md 1.11) ------------------------------------------
    def on_get_inflight_fd(self, payload: bytes, fds: list[int]) -> bytes:
        """A zeroed region for the queues asked for, as libvhost-user lays it out (a memfd,
        offset 0); this connection uses it at once, and the front-end keeps it and hands
        it back with SET_INFLIGHT_FD on every (re)connection."""
        want = self._inflight_description(InflightDescription.unpack(payload))
        size = inflight.region_size(want.num_queues, want.queue_size)
        try:
            fd = os.memfd_create("pyvirtiofsd-inflight", os.MFD_CLOEXEC)
        except OSError as e:
            raise RequestError(f"cannot allocate an inflight region: {e.strerror}") from None
        try:
            os.ftruncate(fd, size)
            mine = os.dup(fd)
        except OSError as e:
            os.close(fd)
            raise RequestError(f"cannot allocate an inflight region of {size} bytes:"
                               f" {e.strerror}") from None
        got = InflightDescription(size, 0, want.num_queues, want.queue_size)
        self._use_inflight(mine, got)
        self.reply_fds.append(fd)
        return got.pack()

    def on_set_inflight_fd(self, payload: bytes, fds: list[int]) -> None:
        got = self._inflight_description(InflightDescription.unpack(payload))
        need = inflight.region_size(got.num_queues, got.queue_size)
        if got.mmap_size < need or got.mmap_offset % inflight.ALIGNMENT:
            raise RequestError(f"SET_INFLIGHT_FD: {got.mmap_size} bytes at offset"
                               f" {got.mmap_offset} for {got.num_queues} queues of"
                               f" {got.queue_size} (need {need} bytes, {inflight.ALIGNMENT}-byte"
                               " aligned)")
        try:
            size = os.fstat(fds[0]).st_size
        except OSError as e:
            raise RequestError(f"SET_INFLIGHT_FD: {e.strerror}") from None
        if size < got.mmap_offset + need:
            raise RequestError(f"SET_INFLIGHT_FD: the file holds {size} bytes, the region ends"
                               f" at {got.mmap_offset + need}")
        self._use_inflight(fds.pop(), got)

    def _inflight_description(self, d: InflightDescription) -> InflightDescription:
        if not d.is_valid() or d.num_queues > self.num_queues \
                or d.queue_size > self.max_queue_size:
            raise RequestError(f"inflight region for {d.num_queues} queues of {d.queue_size}"
                               f" descriptors (this device: 1..{self.num_queues} queues,"
                               f" power-of-two sizes up to {self.max_queue_size})")
        return d

    def _use_inflight(self, fd: int, d: InflightDescription) -> None:
        self.drop_inflight()
        self.inflight = (fd, d)
        self.queues.set_inflight(fd, d.mmap_offset, d.queue_size, d.num_queues)

    def drop_inflight(self) -> None:
        if self.inflight is not None:
            self.queues.set_inflight(None)
            os.close(self.inflight[0])
            self.inflight = None

    def take_reply_fds(self) -> list[int]:
        fds, self.reply_fds = self.reply_fds, []
        return fds

    def close(self) -> None:
        """End of the connection: stop rings, drop memory and notifiers."""
        self.stop_all()
        self.close_log()
        self.close_regions()
        self.queues.drop_memory()
        if self.dax is not None:
            self.dax.close()
        self.drop_inflight()
        for fd in self.take_reply_fds():
            os.close(fd)

    # -- crosvm's SLEEP / WAKE / SNAPSHOT / RESTORE (docs/crosvm.md) ------------------------
    def on_sleep(self, payload: bytes, fds: list[int]) -> bytes:
        """Every running ring stops where it is, as GET_VRING_BASE stops it, but keeps its
        kick and call eventfds for WAKE."""
        for i, vring in enumerate(self.vrings):
            if vring.started:
                try:
                    vring.base = self.queues.stop_ring(i)
                except OSError as e:
                    raise RequestError(f"vring {i} cannot be stopped: {e}") from None
                vring.started = False
                vring.sleeping = True
        return _CROSVM_OK

    def on_wake(self, payload: bytes, fds: list[int]) -> bytes:
        for i, vring in enumerate(self.vrings):
            if vring.sleeping:
                self._start(i, vring)
                vring.sleeping = False
        return _CROSVM_OK

    def on_snapshot(self, payload: bytes, fds: list[int]) -> bytes:
        """The rings (asleep) and the device state, for a RESTORE in a fresh back-end."""
        running = [i for i, v in enumerate(self.vrings) if v.started]
        if running:
            raise RequestError(f"SNAPSHOT while vring {running[0]} runs: SLEEP first")
        rings = tuple(self._ring_snapshot(v) for v in self.vrings)
        rfd, wfd = _channel()
        try:
            try:
                self.queues.save_state(wfd)
            finally:
                os.close(wfd)
            chunks = []
            while chunk := os.read(rfd, 1 << 20):
                chunks.append(chunk)
            self.queues.check_state()
        except OSError as e:
            raise RequestError(f"the device state cannot be taken: {e.strerror or e}") from None
        finally:
            os.close(rfd)
        snap = snapshot.Snapshot(self.acked_features, self.protocol_features, rings,
                                 b"".join(chunks))
        return _CROSVM_OK + snapshot.encode(snap)

    def on_restore(self, payload: bytes, fds: list[int]) -> bytes:
        """A SNAPSHOT brought back: everything is checked and the device state loaded (all or
        nothing) before the rings and features are set; the rings stay asleep until WAKE."""
        try:
            snap = snapshot.decode(payload)
        except StateError as e:
            raise RequestError(str(e)) from None
        if len(snap.rings) != self.num_queues:
            raise RequestError(f"a snapshot of {len(snap.rings)} rings, this device has "
                               f"{self.num_queues}")
        if fds and len(fds) != len(snap.rings):
            raise RequestError(f"{len(fds)} queue eventfds for {len(snap.rings)} rings")
        if any(v.started or v.sleeping for v in self.vrings):
            raise RequestError("RESTORE into a device whose rings were started")
        if snap.acked_features & ~int(FEATURES) or (
                snap.acked_protocol_features & ~self.offered_protocol_features):
            raise RequestError("the snapshot's features were never offered here")
        if not self.regions:
            raise RequestError("RESTORE before SET_MEM_TABLE")
        addrs = []
        for i, ring in enumerate(snap.rings):
            if ring.flags & snapshot.RingFlag.RUNNING and not fds:
                raise RequestError(f"vring {i} was running but RESTORE brought no eventfds")
            if ring.size > self.max_queue_size:
                raise RequestError(f"vring {i} of size {ring.size}: more than "
                                   f"{self.max_queue_size}")
            addrs.append(self._ring_addr(i, ring)
                         if ring.flags & snapshot.RingFlag.ADDRESSED else None)
        self._load_state(snap.state)
        # Nothing can fail from here on.
        self.acked_features = snap.acked_features
        self.protocol_features = snap.acked_protocol_features
        for i, (vring, ring, addr) in enumerate(zip(self.vrings, snap.rings, addrs,
                                                    strict=True)):
            vring.num, vring.addr, vring.base = ring.size, addr, ring.base
            vring.enabled = bool(ring.flags & snapshot.RingFlag.ENABLED)
            vring.sleeping = bool(ring.flags & snapshot.RingFlag.RUNNING)
            if fds:
                if vring.kick is not None:
                    os.close(vring.kick)
                vring.kick = fds[i]
        fds.clear()
        return _CROSVM_OK

    def _load_state(self, data: bytes) -> None:
        rfd, wfd = _channel()
        try:
            try:
                self.queues.load_state(rfd)
            finally:
                os.close(rfd)
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view[:1 << 20]):]
            os.close(wfd)
            wfd = -1
            self.queues.check_state()
        except OSError as e:
            raise RequestError(f"the device state was not loaded: {e.strerror or e}") from None
        finally:
            if wfd >= 0:
                os.close(wfd)

    def _ring_snapshot(self, vring: Vring) -> snapshot.RingState:
        """A ring as a snapshot keeps it: guest-physical addresses, since the front-end that
        restores it may map guest memory elsewhere."""
        flags = snapshot.RingFlag(0)
        if vring.enabled:
            flags |= snapshot.RingFlag.ENABLED
        if vring.sleeping:
            flags |= snapshot.RingFlag.RUNNING
        if vring.addr is None:
            return snapshot.RingState(vring.num, flags, vring.base, 0, 0, 0)
        flags |= snapshot.RingFlag.ADDRESSED
        return snapshot.RingState(vring.num, flags, vring.base, self._gpa(vring.addr.desc),
                                  self._gpa(vring.addr.avail), self._gpa(vring.addr.used))

    def _gpa(self, uaddr: int) -> int:
        for r, _fd in self.regions:
            if r.userspace_addr <= uaddr < r.userspace_addr + r.memory_size:
                return r.guest_phys_addr + uaddr - r.userspace_addr
        raise RequestError(f"ring address {uaddr:#x} is in no memory region")

    def _ring_addr(self, index: int, ring: snapshot.RingState) -> VringAddr:
        def uaddr(gpa: int) -> int:
            for r, _fd in self.regions:
                if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
                    return r.userspace_addr + gpa - r.guest_phys_addr
            raise RequestError(f"vring {index}: guest address {gpa:#x} is in no memory region")
        addr = VringAddr(index, 0, uaddr(ring.desc), uaddr(ring.used), uaddr(ring.avail), 0)
        if not addr.is_valid():
            raise RequestError(f"vring {index}: misaligned ring address")
        return addr

    # -- dirty-page logging (spec "Migration"; protocol.md 1.10; worker/dirtylog.py) ---------
    # A log for 128 TiB of guest memory; a larger size or offset is a front-end's mistake.
    MAX_LOG_SIZE = 1 << 32

    def on_set_log_base(self, payload: bytes, fds: list[int]) -> bytes:
        """Every worker maps the log and marks it from its next request on; the previous log
        is dropped once they all moved (QEMU replaces the log when guest memory grows)."""
        desc = LogDescription.unpack(payload)
        what = f"dirty log of {desc.mmap_size:#x} bytes at offset {desc.mmap_offset:#x}"
        if not desc.is_valid():
            raise RequestError(f"{what}: empty, or past the end of the address space")
        if desc.mmap_size > self.MAX_LOG_SIZE or desc.mmap_offset > self.MAX_LOG_SIZE:
            raise RequestError(f"{what}: size and offset are limited to {self.MAX_LOG_SIZE:#x}")
        reach = max((r.guest_phys_addr + r.memory_size for r, _ in self.regions), default=0)
        if desc.covers < reach:
            # QEMU sizes the log to the memory table (vhost_get_log_size) and grows it before
            # the table: a log that is short would silently lose pages.
            raise RequestError(f"{what}: covers guest memory up to {desc.covers:#x}, but the"
                               f" memory table reaches {reach:#x}")
        fd = fds[0]
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise RequestError(f"{what}: fd {fd}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise RequestError(f"{what}: its fd is not shared memory that can be mapped")
        if st.st_size < desc.mmap_offset + desc.mmap_size:
            # A worker touching a page past the end of the file would die of SIGBUS.
            raise RequestError(f"{what}: its fd holds only {st.st_size:#x} bytes")
        fds.clear()
        try:
            self.queues.set_log_base(desc.mmap_size, desc.mmap_offset, fd)
        except BaseException:
            os.close(fd)
            raise
        if self.dirty_log is not None:
            os.close(self.dirty_log[1])
        self.dirty_log = (desc, fd)
        log.info("dirty log: %#x bytes, covering guest memory up to %#x", desc.mmap_size,
                 desc.covers)
        return U64.pack(0)

    def on_set_log_fd(self, payload: bytes, fds: list[int]) -> None:
        """An eventfd to signal when the log was written (the kernel's vhost); the front-end
        reads the shared log itself, so the spec lets a back-end ignore it: handle() closes
        it."""

    @staticmethod
    def _same_ring(old: VringAddr | None, new: VringAddr) -> bool:
        """Only the log flag and address change: how QEMU turns logging on and off for a
        running ring (vhost_dev_set_log)."""
        return old is not None and (old.desc, old.used, old.avail) == (new.desc, new.used,
                                                                      new.avail)

    def _log_state(self, vring: Vring) -> tuple[bool, bool, int]:
        log_all = bool(self.acked_features & F_LOG_ALL)
        ring = bool(vring.addr is not None and vring.addr.flags & VringAddr.F_LOG)
        return log_all, ring, vring.addr.log if ring and vring.addr is not None else 0

    def _send_log_state(self, index: int, vring: Vring) -> None:
        """Tell the ring's worker when its logging changed (the worker keeps it across ring
        restarts, so a ring that starts logged writes nothing unlogged)."""
        state = self._log_state(vring)
        if state != self.log_sent.get(index, (False, False, 0)):
            self.queues.set_log_state(index, *state)
            self.log_sent[index] = state

    def _update_logging(self) -> None:
        for i, vring in enumerate(self.vrings):
            self._send_log_state(i, vring)

    def _check_log_reach(self) -> None:
        """Guest memory grew past the log: QEMU sends a larger log first (vhost_commit), so
        this is a front-end that forgot; writes there go unlogged until it sends one."""
        if self.dirty_log is None:
            return
        covers = self.dirty_log[0].covers
        reach = max((r.guest_phys_addr + r.memory_size for r, _ in self.regions), default=0)
        if reach > covers:
            log.warning("guest memory reaches %#x, past the dirty log's %#x: writes there are"
                        " not logged until a larger log is set (SET_LOG_BASE)", reach, covers)

    def close_log(self) -> None:
        """The front-end is gone: its log is unmapped, and logging off for the next one."""
        for i in [i for i, state in self.log_sent.items() if any(state)]:
            self.queues.set_log_state(i, False, False, 0)
        self.log_sent.clear()
        if self.dirty_log is not None:
            self.queues.set_log_base(0, 0, None)
            os.close(self.dirty_log[1])
            self.dirty_log = None
