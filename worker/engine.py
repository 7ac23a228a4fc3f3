"""Typed Python face of the native request engine (worker/engine.c).

The engine serves one queue's split ring in C and hands back, in ring order, every request it
does not serve itself (Status.DEFER: its buffers as memoryviews for the Python FuseServer) and
every chain it does not walk (Status.WALK: the Python SplitQueue walks it again, so a malformed
chain is rejected by the reference walker with the reference message).

PYVIRTIOFSD_ENGINE picks the compiled module: unset or "default" for the hardened build,
"asan" for the AddressSanitizer/UBSan build of worker/engine_build.py (for the fuzzers).
"""

from __future__ import annotations

import enum
import importlib
import os
from typing import TYPE_CHECKING, Any

from pyvirtiofsd.common.xattrmap import XattrMap

if TYPE_CHECKING:
    from pyvirtiofsd.worker.filesystem import FsOptions

_MODULES = {"default": "pyvirtiofsd.worker._engine", "asan": "pyvirtiofsd.worker._engine_asan"}
ENV_VARIANT = "PYVIRTIOFSD_ENGINE"
# The compiled module, loaded by load(): a daemon on the Python data plane never needs it.
ffi: Any = None
lib: Any = None


class EngineUnavailable(ImportError):
    """The engine module asked for cannot be loaded (the message says which and why)."""


def load() -> None:
    """Load the module PYVIRTIOFSD_ENGINE names, once; EngineUnavailable if it cannot be."""
    global ffi, lib
    if lib is not None:
        return
    variant = os.environ.get(ENV_VARIANT, "default")
    if variant not in _MODULES:
        raise EngineUnavailable(f"{ENV_VARIANT}={variant!r}: expected one of "
                                f"{', '.join(_MODULES)}")
    try:
        mod = importlib.import_module(_MODULES[variant])
    except ImportError as e:
        raise EngineUnavailable(f"the native engine ({variant} build) cannot be loaded: {e}; "
                                "reinstall, or use --data-plane=python") from None
    ffi, lib = mod.ffi, mod.lib


class Status(enum.IntEnum):
    """Why Engine.run() returned (enum vfs_engine_status in engine.h)."""

    EMPTY = 0
    CONTROL = 1
    DEFER = 2
    WALK = 3
    BROKEN = 4


class Defer(enum.IntFlag):
    """Options the native handlers do not implement (enum vfs_engine_defer): every request one
    of them changes goes to the Python FuseServer, which implements all of them."""

    IDS = 1 << 0
    XATTR = 1 << 1
    CREATE = 1 << 2
    OPEN = 1 << 3
    KILLPRIV = 1 << 4
    ENTRIES = 1 << 5


def defer_for(options: FsOptions | None) -> Defer:
    """What the engine must hand to Python under these filesystem options."""
    d = Defer(0)
    if options is None:
        return d
    if options.translate_uid or options.translate_gid:
        d |= Defer.IDS
    if options.posix_acl:
        d |= Defer.XATTR | Defer.CREATE
    if options.security_label:
        d |= Defer.CREATE
    if options.killpriv_v2:
        d |= Defer.KILLPRIV
    if options.preserve_noatime:
        d |= Defer.OPEN
    if options.inode_file_handles == "mandatory":
        d |= Defer.ENTRIES
    if options.xattrmap is not None:
        d |= Defer.XATTR
        if renames_capability(options.xattrmap):
            # The daemon drops the renamed security.capability where the kernel would.
            d |= Defer.KILLPRIV
    return d


def renames_capability(xattrmap: str) -> bool:
    """Does this --xattrmap give the guest's security.capability another name on the host?"""
    try:
        return XattrMap(xattrmap).to_host(b"security.capability") != b"security.capability"
    except OSError:
        return False


class EngineError(ValueError):
    """The engine refused a region table or a ring (the message says which)."""


def buffer_address(view: memoryview) -> int:
    """The address of a writable buffer, without keeping an export on it."""
    load()
    cdata = ffi.from_buffer("uint8_t[]", view, require_writable=True)
    try:
        return int(ffi.cast("uintptr_t", cdata))
    finally:
        ffi.release(cdata)


class Engine:
    """Queue `queue`'s engine: `journal` and `arena` are the addresses of the worker's own
    `struct vfs_jq` and `struct vfs_arena` (QueueJournal.address, Arena.address; arena 0: no
    tables).  Both must outlive the engine."""

    __slots__ = ("_e", "_views")

    def __init__(self, channel_fd: int, journal: int, arena: int = 0, queue: int = 0,
                 defer: int = 0) -> None:
        load()
        self._e = ffi.new("struct vfs_engine *")
        lib.vfs_engine_init(self._e, channel_fd, ffi.cast("struct vfs_jq *", journal),
                            ffi.cast("struct vfs_arena *", arena), queue)
        lib.vfs_engine_set_defer(self._e, int(defer))
        self._views = ffi.buffer

    def close(self) -> None:
        lib.vfs_engine_fini(self._e)

    # -- configuration (from control messages) ---------------------------------------------
    def set_regions(self, regions: list[tuple[int, int, int, int]]) -> None:
        """Replace the region table: (gpa, size, uaddr, host address) each.  The caller keeps
        the mappings alive for as long as the engine may use them."""
        e = self._e
        lib.vfs_engine_clear_regions(e)
        for gpa, size, uaddr, host in regions:
            if lib.vfs_engine_add_region(e, gpa, size, uaddr, ffi.cast("void *", host)):
                lib.vfs_engine_clear_regions(e)
                raise EngineError(ffi.string(e.why).decode())

    def start(self, size: int, desc: int, avail: int, used: int, next_avail: int, *,
              event_idx: bool, indirect: bool) -> None:
        r = lib.vfs_engine_start(self._e, size, desc, avail, used, next_avail & 0xFFFF,
                                 int(event_idx), int(indirect))
        if r == -12:
            raise MemoryError("no memory for the engine's iovec array")
        if r:
            raise EngineError(ffi.string(self._e.why).decode())

    def stop(self) -> None:
        lib.vfs_engine_stop(self._e)

    def set_fds(self, call: int | None, err: int | None) -> None:
        lib.vfs_engine_set_fds(self._e, -1 if call is None else call,
                               -1 if err is None else err)

    def serve_natively(self, session_word: int, *, proc_fd: int, timeout: int, readonly: bool,
                       switch_creds: bool, submounts: bool, euid: int, open_strip: int,
                       file_open_flags: int, dir_open_flags: int, writeback: bool) -> None:
        """Turn on the native handlers: `session_word` is the address of the FUSE session word
        (fuse_server.Session), the rest PassthroughFs.native_options()."""
        fs = self._e.fs
        fs.session = ffi.cast("uint64_t *", session_word)
        fs.proc_fd = proc_fd
        fs.timeout = timeout
        fs.readonly = readonly
        fs.switch_creds = switch_creds
        fs.submounts = submounts
        fs.euid = euid
        fs.open_strip = open_strip
        fs.file_open_flags = file_open_flags
        fs.dir_open_flags = dir_open_flags
        fs.writeback = writeback
        fs.enabled = 1

    @property
    def native_enabled(self) -> bool:
        return bool(self._e.fs.enabled)

    @property
    def credentials(self) -> object:
        """The struct (fsuid, fsgid, groups_empty, set_groups) holding the credentials in
        force, for PassthroughFs.share_credentials()."""
        return self._e.fs

    @property
    def native(self) -> int:
        """Requests answered natively."""
        return self._e.native

    @property
    def poll_us(self) -> int:
        return self._e.poll_us

    @poll_us.setter
    def poll_us(self, us: int) -> None:
        """Busy-poll an empty ring up to `us` microseconds in serve() (--poll-us)."""
        lib.vfs_engine_set_poll_us(self._e, us)

    def set_log(self, log: int, size: int, ring: bool, used_gpa: int) -> None:
        """Dirty-page logging into the `size`-byte log mapped at address `log` (0: off); with
        `ring`, the used ring's writes too, at guest-physical `used_gpa`.  The caller keeps the
        mapping alive until logging is turned off or moved (worker/dirtylog.py)."""
        lib.vfs_engine_set_log(self._e, ffi.cast("uint8_t *", log), size, int(ring), used_gpa)

    def set_stats(self, queue_block: int) -> None:
        """Record every natively answered request in this common/stats.py queue block (its
        address, QueueStats.address), as FuseServer.handle records what Python answers."""
        lib.vfs_engine_set_stats(self._e, ffi.cast("uint64_t *", queue_block))

    @property
    def defer(self) -> Defer:
        return Defer(self._e.defer)

    @property
    def poll_every(self) -> int:
        return self._e.poll_every

    @poll_every.setter
    def poll_every(self, n: int) -> None:
        self._e.poll_every = max(1, n)

    # -- the data plane -----------------------------------------------------------------------
    def run(self) -> Status:
        return Status(lib.vfs_engine_run(self._e))

    def serve(self, kick: int | None) -> Status:
        """run(), sleeping in C while the ring is empty until `kick` (the kick eventfd) or the
        control channel is readable; EMPTY when the sleep was interrupted."""
        return Status(lib.vfs_engine_serve(self._e, -1 if kick is None else kick))

    def complete(self, head: int, used_len: int) -> None:
        lib.vfs_engine_complete(self._e, head, used_len)

    def replied(self, head: int, used_len: int) -> None:
        """complete() in steps (test hooks): the reply journaled..."""
        lib.vfs_engine_replied(self._e, head, used_len)

    def push(self, head: int, used_len: int) -> None:
        """... the used element published ..."""
        lib.vfs_engine_push(self._e, head, used_len)

    def pushed(self, head: int) -> None:
        """... the push journaled, counted and notified."""
        lib.vfs_engine_pushed(self._e, head)

    def serve_in_python(self, opcodes: set[int] | None) -> None:
        """Hand every request with one of `opcodes` (None: every request) to Python."""
        words = [0, 0]
        for op in range(128):
            if opcodes is None or op in opcodes:
                words[op // 64] |= 1 << (op % 64)
        self._e.fs.python_ops[0], self._e.fs.python_ops[1] = words

    @property
    def running(self) -> bool:
        return bool(self._e.size)

    @property
    def next_avail(self) -> int:
        return self._e.next_avail

    @property
    def next_used(self) -> int:
        return self._e.next_used

    @property
    def head(self) -> int:
        """Descriptor index of the request handed back by run()."""
        return self._e.head

    @property
    def pos(self) -> int:
        """Its avail-ring position."""
        return self._e.pos

    @property
    def why(self) -> str:
        return ffi.string(self._e.why).decode()

    @property
    def completed(self) -> int:
        return self._e.completed

    def header(self) -> tuple[int, int, int, int, int, int, int, int] | None:
        """The deferred request's fuse_in_header fields (IN_HEADER order), when the chain
        holds a whole one."""
        e = self._e
        if not e.has_in:
            return None
        h = getattr(e, "in")           # a Python keyword: no attribute syntax
        return (h.len, h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid, h.total_extlen)

    def chain(self) -> tuple[list[memoryview], list[memoryview]]:
        """The deferred request's readable and writable buffers, as views of guest memory."""
        e = self._e
        iov = e.iov
        buf = self._views
        nr = e.nreadable
        views = [memoryview(buf(iov[k].iov_base, iov[k].iov_len))
                 for k in range(nr + e.nwritable)]
        return views[:nr], views[nr:]
