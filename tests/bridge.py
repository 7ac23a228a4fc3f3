"""Host FUSE bridge: mount a running virtio-fs daemon's share on the host through /dev/fuse.

    python -m tests.bridge --socket SOCK MOUNTPOINT [--queues N]

The bridge is the guest driver of tests/frontend.py with the host kernel's FUSE client in front
of it: it mounts a `fuse` filesystem whose requests it reads from /dev/fuse, places each one in a
descriptor chain on a virtqueue of the daemon, and writes the daemon's reply back to /dev/fuse.
So real programs (tar, cp, git, sqlite...) run against pyvirtiofsd -- or against virtiofsd,
for comparison -- without a VM.  Framing follows the Linux virtio-fs driver (protocol.md 3.2):
fuse_in_header and the request's arguments in readable buffers, fuse_out_header and room for
the reply in writable ones; FORGET and BATCH_FORGET go to the hiprio queue and get no reply.

Two threads: one reads /dev/fuse and submits chains (round-robin over the request queues), one
waits for the daemon's calls and writes replies, so many requests are in flight at once.  One
lock guards the driver's rings and guest-memory allocator, which both threads touch.

Where /dev/fuse and virtio-fs differ, the bridge adjusts (all in `_INIT_MASK` and `_init_reply`):
* INIT flags the kernel offers that only make sense with a /dev/fuse server in the same host --
  PASSTHROUGH (backing files registered by ioctl on /dev/fuse), OVER_IO_URING, ALLOW_IDMAP --
  are hidden from the daemon, so it cannot accept them;
* max_write in the INIT reply is capped to what one read of /dev/fuse can carry here;
* INTERRUPT is not forwarded: virtio-fs has no interrupts (the Linux driver never queues one)
  and both daemons serve each request to completion anyway.
A reply the daemon could not produce (it returned the chain without writing a header) becomes
EIO, so no process on the mount waits forever.  If the daemon goes away the connection is
aborted (umount MNT_FORCE): processes get ENOTCONN instead of hanging.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import logging
import os
import select
import signal
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.fuse_abi import InitFlag, Opcode
from tests.frontend import DEFAULT_TIMEOUT, Frontend, FrontendError, QueueFull

log = logging.getLogger("bridge")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
MS_NOSUID, MS_NODEV = 2, 4
MNT_FORCE, MNT_DETACH = 1, 2

MAX_WRITE = 1 << 20
# One read of /dev/fuse must hold the largest request: a WRITE of max_write bytes plus its
# headers (fuse_dev_do_read() refuses smaller buffers with EINVAL).
READ_BUFFER = MAX_WRITE + 0x10000
MEM_SIZE = 128 << 20
_INIT_MASK = int(InitFlag.PASSTHROUGH | InitFlag.OVER_IO_URING | InitFlag.ALLOW_IDMAP)

# Reply body room per opcode (protocol.md 4.3); opcodes whose size the request names are in
# _out_size(); anything unknown gets a page, the most any other reply needs.
_BODYLESS = frozenset({
    Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2, Opcode.RELEASE,
    Opcode.RELEASEDIR, Opcode.FSYNC, Opcode.FSYNCDIR, Opcode.SETXATTR, Opcode.REMOVEXATTR,
    Opcode.FLUSH, Opcode.ACCESS, Opcode.SETLK, Opcode.SETLKW, Opcode.FALLOCATE, Opcode.SYNCFS,
    Opcode.DESTROY,
})
_FIXED = {
    Opcode.LOOKUP: fa.ENTRY_OUT.size, Opcode.MKNOD: fa.ENTRY_OUT.size,
    Opcode.MKDIR: fa.ENTRY_OUT.size, Opcode.SYMLINK: fa.ENTRY_OUT.size,
    Opcode.LINK: fa.ENTRY_OUT.size, Opcode.GETATTR: fa.ATTR_OUT.size,
    Opcode.SETATTR: fa.ATTR_OUT.size, Opcode.OPEN: fa.OPEN_OUT.size,
    Opcode.OPENDIR: fa.OPEN_OUT.size, Opcode.CREATE: fa.ENTRY_OUT.size + fa.OPEN_OUT.size,
    Opcode.TMPFILE: fa.ENTRY_OUT.size + fa.OPEN_OUT.size, Opcode.WRITE: fa.WRITE_OUT.size,
    Opcode.STATFS: fa.STATFS_OUT.size, Opcode.INIT: fa.INIT_OUT.size,
    Opcode.GETLK: fa.LK_OUT.size, Opcode.LSEEK: fa.LSEEK_OUT.size,
    Opcode.COPY_FILE_RANGE: fa.WRITE_OUT.size,
    Opcode.COPY_FILE_RANGE_64: fa.COPY_FILE_RANGE_OUT.size, Opcode.BMAP: fa.BMAP_OUT.size,
    Opcode.STATX: fa.STATX_OUT.size, Opcode.POLL: fa.POLL_OUT.size,
}
_PAGE = 4096


def _out_size(opcode: int, body: memoryview) -> int:
    """Room for the reply body of one request."""
    if opcode in _BODYLESS:
        return 0
    if opcode in (Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS) and len(body) >= 20:
        return min(int.from_bytes(body[16:20], "little"), MAX_WRITE)
    if opcode in (Opcode.GETXATTR, Opcode.LISTXATTR) and len(body) >= 4:
        size = int.from_bytes(body[0:4], "little")
        return min(size, MAX_WRITE) if size else fa.GETXATTR_OUT.size
    return _FIXED.get(opcode, _PAGE)


def _check(res: int, what: str) -> None:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


@dataclass(slots=True)
class _Pending:
    unique: int
    opcode: int
    queue: int
    capacity: int           # writable bytes: fuse_out_header + body room


class Bridge:
    """Mount the share of the daemon listening on `socket_path` at `mountpoint`.

    Use as a context manager (or start()/close()).  `queues` request queues are set up (the
    daemon must offer that many; virtiofsd has one).  `counts` tallies the kernel's requests by
    opcode name, `per_queue` the chains placed on each virtqueue.  `process`, if given, is the
    daemon's Popen, used only to say why it went away.
    """

    def __init__(self, socket_path: str, mountpoint: str, *, queues: int = 1,
                 process=None, timeout: float = DEFAULT_TIMEOUT, mem_size: int = MEM_SIZE,
                 fsname: str = "vfsbridge") -> None:
        if queues < 1:
            raise ValueError("at least one request queue is needed")
        self.socket_path = socket_path
        self.mountpoint = os.path.abspath(mountpoint)
        self.queues = queues
        self.process = process
        self.timeout = timeout
        self.mem_size = mem_size
        self.fsname = fsname
        self.fe: Frontend | None = None
        self.fuse_fd = -1
        self.mounted = False
        self.init_out: fa.InitOut | None = None
        self.counts: Counter = Counter()
        self.per_queue: Counter = Counter()    # chains submitted per virtqueue index
        self.errors: list[str] = []           # what went wrong in the threads, for tests
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)   # signalled when chains complete
        self._pending: dict[tuple[int, int], _Pending] = {}   # (queue, token) -> request
        self._next_queue = 0
        self._stop_fd = -1
        self._threads: list[threading.Thread] = []
        self._initialised = threading.Event()
        self._gone = threading.Event()         # the FUSE connection or the daemon ended

    # -- life cycle

    def start(self) -> Bridge:
        try:
            self.fe = Frontend.connect(self.socket_path, queues=1 + self.queues,
                                       mem_size=self.mem_size, event_idx=False, indirect=True,
                                       timeout=self.timeout, process=self.process)
            self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            opts = (f"fd={self.fuse_fd},rootmode=40000,user_id=0,group_id=0,"
                    "default_permissions,allow_other")
            _check(_libc.mount(self.fsname.encode(), self.mountpoint.encode(),
                               f"fuse.{self.fsname}".encode(), MS_NOSUID | MS_NODEV,
                               opts.encode()), f"mount {self.mountpoint}")
            self.mounted = True
            for fn, name in ((self._read_loop, "bridge-reader"),
                             (self._reply_loop, "bridge-replies")):
                t = threading.Thread(target=fn, name=name, daemon=True)
                t.start()
                self._threads.append(t)
            # The kernel holds every other request until INIT is answered.
            if not self._initialised.wait(self.timeout):
                raise TimeoutError(f"no FUSE INIT reply within {self.timeout}s"
                                   + self._why())
            if self.init_out is None:
                raise OSError(errno.EPROTO, "the daemon refused FUSE INIT" + self._why())
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Unmount (lazily), stop the threads, abort the FUSE connection, disconnect."""
        if self.mounted:
            self.mounted = False
            if _libc.umount2(self.mountpoint.encode(), MNT_DETACH) < 0:
                log.warning("umount %s: %s", self.mountpoint, os.strerror(ctypes.get_errno()))
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)
        for t in self._threads:
            t.join(self.timeout)
        self._threads.clear()
        # Closing the last /dev/fuse fd aborts the connection if files on it are still open.
        for attr in ("fuse_fd", "_stop_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        if self.fe is not None:
            self.fe.close()
            self.fe = None

    def __enter__(self) -> Bridge:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the mount's connection or the daemon ends; True if it did."""
        return self._gone.wait(timeout)

    def _why(self) -> str:
        if self.process is not None and self.process.poll() is not None:
            return f" (daemon exited with status {self.process.returncode})"
        return "; " + "; ".join(self.errors) if self.errors else ""

    def _fail(self, what: str) -> None:
        self.errors.append(what)
        log.error("%s", what)

    def _abort(self) -> None:
        """The daemon is gone: fail every request on the mount instead of hanging them."""
        if self.mounted:
            self.mounted = False
            _libc.umount2(self.mountpoint.encode(), MNT_FORCE | MNT_DETACH)
        self._gone.set()

    # -- kernel -> daemon

    def _read_loop(self) -> None:
        poller = select.poll()
        poller.register(self.fuse_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        buf = bytearray(READ_BUFFER)
        view = memoryview(buf)
        while True:
            events = dict(poller.poll())
            if self._stop_fd in events:
                return
            if events.get(self.fuse_fd, 0) & (select.POLLERR | select.POLLHUP):
                self._gone.set()
                return
            try:
                n = os.readv(self.fuse_fd, [buf])
            except BlockingIOError:
                continue                    # the request was interrupted before we read it
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENODEV:  # unmounted or aborted
                    self._gone.set()
                    return
                self._fail(f"reading /dev/fuse: {e}")
                self._gone.set()
                return
            try:
                self._forward(view[:n])
            except FrontendError as e:
                self._fail(f"daemon: {e}")
                self._abort()
                return
            except Exception as e:      # a bug here must not leave the mount hanging
                self._fail(f"forwarding a request: {type(e).__name__}: {e}")
                self._abort()
                return

    def _forward(self, req: memoryview) -> None:
        if len(req) < fa.IN_HEADER.size:
            self._fail(f"short request of {len(req)} bytes from the kernel")
            return
        hdr = fa.InHeader.unpack(req)
        opcode, unique = hdr.opcode, hdr.unique
        self.counts[_name(opcode)] += 1
        if opcode == Opcode.INTERRUPT:
            return
        head = bytes(req[: fa.IN_HEADER.size])
        body = req[fa.IN_HEADER.size : hdr.len]
        if opcode in (Opcode.FORGET, Opcode.BATCH_FORGET):
            # As the Linux driver sends them: one readable buffer on hiprio, nothing written.
            self._submit(0, [head + bytes(body)], (), None)
            return
        if opcode == Opcode.INIT:
            body = memoryview(self._init_request(bytes(body)))
        if opcode == Opcode.WRITE and len(body) >= fa.WRITE_IN.size:
            readable = [head, bytes(body[: fa.WRITE_IN.size]), bytes(body[fa.WRITE_IN.size :])]
        else:
            readable = [head, bytes(body)]
        out = _out_size(opcode, body)
        writable = (fa.OUT_HEADER.size, out) if out else (fa.OUT_HEADER.size,)
        queue = 1 + self._next_queue
        self._next_queue = (self._next_queue + 1) % self.queues
        self._submit(queue, [r for r in readable if r], writable,
                     _Pending(unique, opcode, queue, fa.OUT_HEADER.size + out))

    def _submit(self, queue: int, readable: Sequence[bytes], writable: Sequence[int],
                pending: _Pending | None) -> None:
        vq = self.fe.queue(queue)
        with self._room:
            while True:
                try:
                    token = vq.submit(readable, writable, indirect=True)
                    break
                except (QueueFull, MemoryError):
                    # Wait for completions to give back descriptors or guest memory.
                    if not self._room.wait(self.timeout):
                        raise FrontendError(
                            f"queue {queue} stayed full for {self.timeout}s") from None
            self._pending[(queue, token)] = pending or _Pending(0, 0, queue, 0)
            self.per_queue[queue] += 1

    @staticmethod
    def _init_request(body: bytes) -> bytes:
        """The kernel's fuse_init_in without the flags a daemon behind virtio cannot take."""
        init = fa.InitIn.unpack(body)
        flags = init.flags & ~_INIT_MASK & 0xFFFFFFFF
        flags2 = init.flags2 & ~(_INIT_MASK >> 32)
        fixed = init._replace(flags=flags, flags2=flags2).pack()
        return fixed[: len(body)] if len(body) < len(fixed) else fixed + body[len(fixed):]

    # -- daemon -> kernel

    def _reply_loop(self) -> None:
        poller = select.poll()
        calls = {}
        for index, vq in self.fe.queues.items():
            poller.register(vq.call_fd, select.POLLIN)
            calls[vq.call_fd] = index
        poller.register(self.fe.sock.fileno(), select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop_fd in events:
                return
            if self.fe.sock.fileno() in events:
                # The front-end never expects a message: this is the daemon hanging up.
                self._fail("the daemon closed the vhost-user connection" + self._why())
                self._abort()
                return
            for fd in events:
                if fd in calls:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
            try:
                for pending, completion in self._harvest():
                    self._reply(pending, completion)
            except FrontendError as e:
                self._fail(f"daemon: {e}")
                self._abort()
                return
            except Exception as e:      # a bug here must not leave the mount hanging
                self._fail(f"answering the kernel: {type(e).__name__}: {e}")
                self._abort()
                return

    def _harvest(self) -> list:
        out = []
        with self._room:
            for index, vq in self.fe.queues.items():
                if not vq.poll():
                    continue
                for key in [k for k in self._pending if k[0] == index and
                            k[1] not in vq.inflight]:
                    out.append((self._pending.pop(key), vq.wait(key[1], 0)))
            if out:
                self._room.notify_all()
        return out

    def _reply(self, p: _Pending, c) -> None:
        if p.capacity == 0:
            return                          # hiprio: nothing to answer
        data = c.data
        if c.used_len < fa.OUT_HEADER.size:
            self._error(p, errno.EIO, f"{_name(p.opcode)} came back without a reply")
            return
        out = fa.OutHeader.unpack(data)
        if out.unique != p.unique or not out.is_valid() or out.len > min(c.used_len, p.capacity):
            self._error(p, errno.EIO, f"{_name(p.opcode)}: malformed reply header {out}")
            return
        reply = data[: out.len]
        if p.opcode == Opcode.INIT:
            reply = self._init_reply(reply)
        self._write(reply, p)

    def _init_reply(self, reply: bytes) -> bytes:
        out = fa.OutHeader.unpack(reply)
        if out.error:
            self._initialised.set()
            return reply
        body = reply[fa.OUT_HEADER.size :]
        init = fa.InitOut.unpack(body + bytes(max(0, fa.INIT_OUT.size - len(body))))
        init = init._replace(max_write=min(init.max_write, MAX_WRITE),
                             flags=init.flags & ~_INIT_MASK & 0xFFFFFFFF,
                             flags2=init.flags2 & ~(_INIT_MASK >> 32))
        self.init_out = init
        self._initialised.set()
        return reply[: fa.OUT_HEADER.size] + init.pack()[: len(body)]

    def _error(self, p: _Pending, err: int, why: str) -> None:
        self._fail(why)
        self._write(fa.OUT_HEADER.pack(fa.OUT_HEADER.size, -err, p.unique), p)

    def _write(self, reply: bytes, p: _Pending) -> None:
        try:
            os.write(self.fuse_fd, reply)
        except OSError as e:
            # ENOENT: the kernel no longer waits for it (interrupted, or the connection was
            # aborted); ENODEV: the connection is gone.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                self._fail(f"writing the {_name(p.opcode)} reply: {e}")
                if e.errno == errno.EINVAL and reply[8:16] == p.unique.to_bytes(8, "little"):
                    with contextlib.suppress(OSError):
                        os.write(self.fuse_fd, fa.OUT_HEADER.pack(16, -errno.EIO, p.unique))


def _name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return str(opcode)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bridge", description=(
        "Mount the share of a running virtio-fs daemon (pyvirtiofsd or virtiofsd) on the host "
        "through /dev/fuse, until interrupted or unmounted."))
    ap.add_argument("--socket", required=True, help="the daemon's vhost-user socket")
    ap.add_argument("--queues", type=int, default=1, help="request queues to use (default 1)")
    ap.add_argument("mountpoint")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bridge: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        bridge = Bridge(args.socket, args.mountpoint, queues=args.queues).start()
    except (OSError, FrontendError) as e:
        print(f"bridge: {e}", file=sys.stderr)
        return 1
    init = bridge.init_out
    log.info("mounted %s at %s (FUSE 7.%d, max_write %d)", args.socket, bridge.mountpoint,
             init.minor, init.max_write)
    try:
        while not stop.is_set() and not bridge.wait(0.2):
            pass
    finally:
        bridge.close()
    for e in bridge.errors:
        print(f"bridge: {e}", file=sys.stderr)
    return 1 if bridge.errors else 0


if __name__ == "__main__":
    sys.exit(main())
