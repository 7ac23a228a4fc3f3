"""Fuzzing the FUSE server: hostile requests against a real share, as a queue worker runs it.

Each example is a short session of requests whose opcodes, header fields and bodies come from
Hypothesis: truncated headers, `len` larger or smaller than the buffer, unknown opcodes, names
without NUL or containing '/', '.' and '..', huge sizes and offsets, nodeids and fhs never
issued, already forgotten or released, readable/writable buffers split anywhere.  The server is
built the way a worker builds it (journaled tables and filesystem, worker/recovery.py).

After every request: `handle` returned a used length within the writable buffer and, when a
reply was written, its header is well formed (exact length, errno in 1..511, the request's
unique).  After every example: a DESTROY leaves exactly the fds there were before, and nothing
outside the share changed.  Budgets: tests/fuzzing.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.fuse_abi import Opcode
from pyvirtiofsd.common.journal import Journal
from pyvirtiofsd.worker.chain import Reader, Writer
from pyvirtiofsd.worker.engine import Engine, Status, buffer_address
from pyvirtiofsd.worker.filesystem import Context, FsOptions
from pyvirtiofsd.worker.fuse_server import FuseServer, Session
from pyvirtiofsd.worker.passthrough import PassthroughFs
from pyvirtiofsd.worker.recovery import JournaledArena, JournaledFs
from tests.conftest import DATA_PLANES
from tests.fuzzing import budget
from tests.test_virtqueue import BUF_GPA, FakeGuest

ROOT = fa.ROOT_ID
MAX_REPLY = 1 << 17

# Opcode -> (fixed struct before the tail, tail kind).
BODIES: dict[int, tuple[struct.Struct | None, str]] = {
    Opcode.LOOKUP: (None, "name"), Opcode.FORGET: (fa.FORGET_IN, ""),
    Opcode.GETATTR: (fa.GETATTR_IN, ""), Opcode.SETATTR: (fa.SETATTR_IN, ""),
    Opcode.READLINK: (None, ""), Opcode.SYMLINK: (None, "two"),
    Opcode.MKNOD: (fa.MKNOD_IN, "name"), Opcode.MKDIR: (fa.MKDIR_IN, "name"),
    Opcode.UNLINK: (None, "name"), Opcode.RMDIR: (None, "name"),
    Opcode.RENAME: (fa.RENAME_IN, "two"), Opcode.LINK: (fa.LINK_IN, "name"),
    Opcode.OPEN: (fa.OPEN_IN, ""), Opcode.READ: (fa.READ_IN, ""),
    Opcode.WRITE: (fa.WRITE_IN, "data"), Opcode.STATFS: (None, ""),
    Opcode.RELEASE: (fa.RELEASE_IN, ""), Opcode.FSYNC: (fa.FSYNC_IN, ""),
    Opcode.SETXATTR: (fa.SETXATTR_IN_COMPAT, "xattr"), Opcode.GETXATTR: (fa.GETXATTR_IN, "name"),
    Opcode.LISTXATTR: (fa.GETXATTR_IN, ""), Opcode.REMOVEXATTR: (None, "name"),
    Opcode.FLUSH: (fa.FLUSH_IN, ""), Opcode.OPENDIR: (fa.OPEN_IN, ""),
    Opcode.READDIR: (fa.READ_IN, ""), Opcode.RELEASEDIR: (fa.RELEASE_IN, ""),
    Opcode.FSYNCDIR: (fa.FSYNC_IN, ""), Opcode.GETLK: (fa.LK_IN, ""),
    Opcode.SETLK: (fa.LK_IN, ""), Opcode.ACCESS: (fa.ACCESS_IN, ""),
    Opcode.CREATE: (fa.CREATE_IN, "name"), Opcode.INTERRUPT: (fa.INTERRUPT_IN, ""),
    Opcode.BMAP: (fa.BMAP_IN, ""), Opcode.DESTROY: (None, ""), Opcode.IOCTL: (fa.IOCTL_IN, ""),
    Opcode.POLL: (fa.POLL_IN, ""), Opcode.BATCH_FORGET: (fa.BATCH_FORGET_IN, "forgets"),
    Opcode.FALLOCATE: (fa.FALLOCATE_IN, ""), Opcode.READDIRPLUS: (fa.READ_IN, ""),
    Opcode.RENAME2: (fa.RENAME2_IN, "two"), Opcode.LSEEK: (fa.LSEEK_IN, ""),
    Opcode.COPY_FILE_RANGE: (fa.COPY_FILE_RANGE_IN, ""), Opcode.SYNCFS: (fa.SYNCFS_IN, ""),
    Opcode.STATX: (fa.STATX_IN, ""), Opcode.COPY_FILE_RANGE_64: (fa.COPY_FILE_RANGE_IN, ""),
    Opcode.SETUPMAPPING: (fa.SETUPMAPPING_IN, ""), Opcode.TMPFILE: (fa.CREATE_IN, "name"),
}
ENTRY_REPLIES = {Opcode.LOOKUP, Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK, Opcode.LINK,
                 Opcode.CREATE}
OPEN_REPLIES = {Opcode.OPEN, Opcode.OPENDIR}
_BITS = {"B": 8, "H": 16, "I": 32, "Q": 64, "b": 8, "h": 16, "i": 32, "q": 64}


QSIZE = 64


def _build_env(base: Path, capacity: int):
    share = base / "share"
    outside = base / "outside"
    share.mkdir()
    outside.mkdir()
    (outside / "canary").write_bytes(b"must not change")
    arena = Arena.create(max_inodes=4096, max_handles=1024, max_queues=4)
    root = os.open(share, os.O_PATH | os.O_DIRECTORY)
    st_ = os.fstat(root)
    arena.inodes.set_root(root, st_.st_dev, st_.st_ino)
    proc = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    journal = Journal.create(1, capacity)
    tables = JournaledArena(arena, journal.queue(0))
    fs = JournaledFs(PassthroughFs(tables, proc, FsOptions(xattr=True)), tables)
    server = FuseServer(fs, 1, Session())
    # Extended attributes of a symlink make the filesystem open, once, the directory it
    # returns to (passthrough _in_proc_dir): open it now so it is part of the baseline.
    os.symlink("x", share / "warm")
    ctx = Context(0, 0, 0)
    link = fs.lookup(ctx, ROOT, b"warm")
    fs.listxattr(ctx, link.nodeid, 0)
    fs.forget(link.nodeid, 1)
    (share / "warm").unlink()
    return (server, fs, journal.queue(0), share, outside), proc, arena


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    built, proc, _arena = _build_env(tmp_path_factory.mktemp("fuzzfuse"), 8)
    yield built
    os.close(proc)


class EngineGuest:
    """The native engine serving a fake guest's ring, with the FUSE server behind it for what
    it hands back -- the loop of worker/main.py (_process_native) over fake guest memory."""

    def __init__(self, server: FuseServer, jq, arena: Arena) -> None:
        self.g = FakeGuest(QSIZE)
        self.server, self.jq = server, jq
        jq.reset(0, 1, QSIZE)
        self.chan, self.peer = socket.socketpair()
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)
        self.queue = self.g.queue()
        # With the shared tables, as a worker gives them: the opcodes the engine serves
        # natively are fuzzed there, the rest in the FUSE server it hands them to.
        self.e = Engine(self.chan.fileno(), jq.address, arena.address, 0)
        # The native handlers on, with the filesystem's options and credentials, as a worker
        # turns them on (worker/main.py Worker.build).
        options = server.fs.native_options()
        assert options is not None
        self.e.serve_natively(server.session.address, **options)
        server.fs.share_credentials(self.e.credentials)
        self.e.set_regions([(g, n, u, buffer_address(v)) for g, n, u, v in
                            self.g.mem.views()])
        self.e.start(QSIZE, self.g.uaddr(self.g.desc), self.g.uaddr(self.g.avail),
                     self.g.uaddr(self.g.used), 0, event_idx=False, indirect=True)
        self.e.set_fds(self.call, self.err)
        self.served = 0

    def close(self) -> None:
        self.e.close()
        for fd in (self.call, self.err):
            os.close(fd)
        self.chan.close()
        self.peer.close()
        self.g.close()

    def serve(self, data: bytes, in_split, out_size, out_split, indirect: bool):
        """One request through the ring: (used length, the writable bytes as one buffer)."""
        g = self.g
        g.brk = BUF_GPA
        bufs = []
        for piece in _split(bytearray(data), in_split) or [memoryview(b"")]:
            gpa = g.alloc(len(piece))
            g.write(gpa, bytes(piece))
            bufs.append((gpa, len(piece), False))
        outs = []
        if out_size:
            for piece in _split(bytearray(out_size), out_split):
                gpa = g.alloc(len(piece))
                g.write(gpa, b"\xee" * len(piece))
                outs.append((gpa, len(piece)))
                bufs.append((gpa, len(piece), True))
        head = g.add_chain(bufs, indirect=indirect)
        g.publish(head)
        while True:
            status = self.e.run()
            if status is Status.EMPTY:
                break
            assert status in (Status.DEFER, Status.WALK), (status, self.e.why)
            h = self.e.head
            if status is Status.DEFER:
                readable, writable = self.e.chain()
                used = self.server.handle(Reader(readable),
                                          Writer(writable) if writable else None)
                del readable, writable
            else:
                chain = self.queue.walk(h)
                opcode, unique = struct.unpack_from("<IQ", Reader(chain.readable)
                                                    .read_all().ljust(16, b"\0"), 4)
                self.jq.popped(h, self.e.pos, opcode, unique)
                w = Writer(chain.writable) if chain.writable else None
                used = self.server.handle(Reader(chain.readable), w)
                del chain, w
            self.e.complete(h, used)
        assert g.used_idx() == (self.served + 1) & 0xFFFF
        done_head, used = g.used_elem(self.served)
        self.served += 1
        assert done_head == head
        reply = b"".join(g.read(gpa, n) for gpa, n in outs)
        return used, bytearray(reply)


@pytest.fixture(scope="module")
def engine_env(tmp_path_factory):
    built, proc, arena = _build_env(tmp_path_factory.mktemp("fuzzengine"), QSIZE)
    server, _fs, jq, _share, _outside = built
    eg = EngineGuest(server, jq, arena)
    yield built, eg
    eg.close()
    os.close(proc)


def _snapshot(path: Path) -> list[tuple[str, int, bytes]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            data = Path(p).read_bytes() if os.path.isfile(p) and not os.path.islink(p) else b""
            out.append((os.path.relpath(p, path), st_.st_mode, data))
    return sorted(out)


def _int(fmt: str, pool: list[int]):
    bits = _BITS[fmt]
    signed = fmt.islower()
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    interesting = [v for v in (0, 1, 2, 4096, hi, hi - 1, lo, 1 << (bits - 1)) if lo <= v <= hi]
    # Clamped, not filtered: the choice is an index into this list, so its length must not
    # depend on the ids the daemon issued (they grow with the examples run before).
    interesting += [min(max(v, lo), hi) for v in pool]
    return st.one_of(st.sampled_from(interesting), st.integers(0, min(hi, 70000)),
                     st.integers(lo, hi))


def _likely(draw, percent: int) -> bool:
    return draw(st.integers(0, 99)) < percent


# Names that exist in every example's share (see SEED), new ones, and hostile ones.
GOOD_NAMES = [b"a", b"b", b"dir", b"ln", b"new", b"n2", b"fifo"]
BAD_NAMES = [b".", b"..", b"", b"a/b", b"../x", b"/etc", b"x" * 256, b"sub/..", b"\xff\xfe"]
names = st.one_of(st.sampled_from(GOOD_NAMES), st.sampled_from(GOOD_NAMES),
                  st.sampled_from(BAD_NAMES), st.binary(min_size=0, max_size=12))


@st.composite
def requests(draw, nodes: list[int], fhs: list[int]):
    if _likely(draw, 90):
        opcode = draw(st.sampled_from(sorted(BODIES)))
    else:
        opcode = draw(st.one_of(st.sampled_from([0, 7, 19, 54, 999, 4096, (1 << 32) - 1]),
                                st.integers(0, 100)))
    st_, tail = BODIES.get(opcode, (None, ""))
    pool = nodes + fhs
    body = b""
    if st_ is not None:
        fmt = st_.format.lstrip("<")
        fields = []
        for ch in fmt:
            if ch == "x" or ch.isdigit():
                continue
            if ch == "Q" and pool and _likely(draw, 50):
                fields.append(draw(st.sampled_from(pool)))       # an id issued before
            elif _likely(draw, 50):
                fields.append(draw(st.integers(0, 4096)))
            else:
                fields.append(draw(_int(ch, pool)))
        if opcode == Opcode.FALLOCATE:
            # Real allocations stay small (the share is on the host's disk).
            fields[1] %= 1 << 20
            fields[2] %= 1 << 20
        body = st_.pack(*fields)
    if tail == "name":
        body += draw(names) + (b"\0" if _likely(draw, 85) else draw(
            st.sampled_from([b"", b"\0\0", b"\0x"])))
    elif tail == "two":
        body += draw(names) + b"\0" + draw(names) + draw(st.sampled_from([b"\0", b""]))
    elif tail == "xattr":
        body += draw(st.sampled_from([b"user.a", b"trusted.x", b"security.y", b"user."])) \
            + b"\0" + draw(st.binary(max_size=32))
    elif tail == "data":
        body += draw(st.binary(max_size=4096))
    elif tail == "forgets":
        n = draw(st.integers(0, 5))
        body += b"".join(fa.FORGET_ONE.pack(draw(st.sampled_from(pool or [0])),
                                            draw(_int("Q", [1]))) for _ in range(n))
    if _likely(draw, 10):
        body = draw(st.binary(max_size=64)) if draw(st.booleans()) else body[:draw(
            st.integers(0, len(body)))]
    nodeid = draw(st.sampled_from(nodes)) if _likely(draw, 80) else draw(_int("Q", nodes))
    extlen = 0 if _likely(draw, 85) else draw(st.sampled_from([1, 2, 3, 0xFFFF]))
    ext = b""
    if extlen and extlen != 0xFFFF:
        ext = draw(st.binary(min_size=8 * extlen, max_size=8 * extlen))
    total = 40 + len(body) + len(ext)
    length = total if _likely(draw, 85) else draw(st.sampled_from(
        [total + 1, total - 1, 40, 39, 0, (1 << 32) - 1, 1 << 21]))
    uid = 0 if _likely(draw, 80) else draw(st.sampled_from([1000, 65534, (1 << 32) - 1]))
    hdr = fa.IN_HEADER.pack(length & 0xFFFFFFFF, opcode, draw(st.integers(1, 1 << 40)), nodeid,
                            uid, uid, 1, extlen)
    data = hdr + body + ext
    if _likely(draw, 5):
        data = data[:draw(st.integers(0, len(data)))]     # truncated
    in_split = draw(st.lists(st.integers(1, 64), max_size=3))
    out_size = draw(st.one_of(st.sampled_from([None, 0, 1, 15, 16, 17, 32, 160, 4096]),
                              st.integers(0, MAX_REPLY)))
    out_split = draw(st.lists(st.integers(1, 64), max_size=3))
    return opcode, data, in_split, out_size, out_split


def _split(data: bytes | bytearray, sizes: list[int]) -> list[memoryview]:
    out, pos = [], 0
    mv = memoryview(data)
    for s in sizes:
        if pos >= len(mv):
            break
        out.append(mv[pos:pos + s])
        pos += s
    if pos < len(mv):
        out.append(mv[pos:])
    return out


def _serve(server: FuseServer, jq, data: bytes, in_split, out_size, out_split):
    buf = bytearray(out_size or 0)
    writer = Writer(_split(buf, out_split)) if out_size is not None and out_size > 0 else None
    opcode, unique = struct.unpack_from("<IQ", data.ljust(16, b"\0"), 4)
    jq.popped(0, 0, opcode, unique)
    used = server.handle(Reader(_split(bytearray(data), in_split)), writer)
    jq.replied(0, used, 0)
    jq.pushed(0)
    return used, buf


def _name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return "unknown opcode"


def seed(share: Path) -> None:
    """A fresh share: a file, a directory with a file, a symlink and a FIFO."""
    for p in list(share.iterdir()):
        if not p.is_symlink() and p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    (share / "a").write_bytes(b"0123456789" * 50)
    (share / "dir").mkdir()
    (share / "dir" / "b").write_bytes(b"b")
    (share / "ln").symlink_to("a")
    os.mkfifo(share / "fifo")


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _session(env, data, serve) -> None:
    """One example: a fresh share, up to 8 hostile requests served by `serve`, every reply
    checked; then everything the session opened is closed and only the share changed."""
    server, fs, _jq, share, outside = env
    before_outside = _snapshot(outside.parent / "outside")
    if not server.session.started:
        fs.destroy()
        server.session.start(fa.KERNEL_MINOR_VERSION, 0)
    baseline = _fds()
    seed(share)
    nodes: list[int] = [ROOT]
    fhs: list[int] = []
    try:
        for _ in range(data.draw(st.integers(1, 8))):
            opcode, req, in_split, out_size, out_split = data.draw(requests(nodes, fhs))
            used, buf = serve(req, in_split, out_size, out_split)
            capacity = out_size or 0
            assert 0 <= used <= capacity
            if used == 0:
                continue
            assert used >= fa.OUT_HEADER.size
            length, error, unique = fa.OUT_HEADER.unpack_from(buf)
            assert length == used
            assert unique == struct.unpack_from("<Q", req, 8)[0]
            assert -511 <= error <= 0
            event(f"{_name(opcode)}: {'ok' if not error else os.strerror(-error)}")
            if error:
                assert length == fa.OUT_HEADER.size
                continue
            if opcode in ENTRY_REPLIES and used >= 16 + 8:
                nodes.append(struct.unpack_from("<Q", buf, 16)[0])
            if opcode == Opcode.CREATE and used >= 16 + fa.ENTRY_OUT.size + 8:
                fhs.append(struct.unpack_from("<Q", buf, 16 + fa.ENTRY_OUT.size)[0])
            if opcode in OPEN_REPLIES and used >= 24:
                fhs.append(struct.unpack_from("<Q", buf, 16)[0])
    finally:
        fs.restore_credentials()
        fs.destroy()
    # Everything the session opened is closed again, and only the share changed.
    assert not _fds() - baseline
    assert _snapshot(outside.parent / "outside") == before_outside
    assert sorted(os.listdir(outside.parent)) == ["outside", "share"]


@budget(400)
@given(st.data())
def test_hostile_requests(env, data) -> None:
    jq = env[2]
    _session(env, data, lambda req, in_split, out_size, out_split:
             _serve(env[0], jq, req, in_split, out_size, out_split))


@budget(400)
@given(st.data())
def test_hostile_requests_through_the_engine(engine_env, data) -> None:
    """The same sessions as chains on a ring the native engine serves over fake guest memory
    (split at any byte, some through an indirect table, straddling the boundary between two
    guest memory regions): what it serves natively and what it hands to the FUSE server."""
    env, eg = engine_env
    indirect = data.draw(st.booleans())
    native = eg.e.native
    _session(env, data, lambda req, in_split, out_size, out_split:
             eg.serve(req, in_split, out_size, out_split, indirect))
    event(f"served natively: {'some' if eg.e.native > native else 'none'}")


# --- the same requests through a running daemon, on each data plane -----------------------------


@pytest.fixture(scope="module", params=DATA_PLANES)
def live(request, tmp_path_factory):
    """One daemon per data plane, one connection; its share is re-seeded for every example."""
    from tests.conftest import start_daemon
    from tests.frontend import Frontend, FuseClient

    base = tmp_path_factory.mktemp(f"live-{request.param}")
    share, outside = base / "share", base / "outside"
    share.mkdir()
    outside.mkdir()
    (outside / "canary").write_bytes(b"must not change")
    d = start_daemon(share, str(base / "fuzz.sock"), "--xattr",
                     f"--data-plane={request.param}")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    c = FuseClient(fe)
    c.init()
    yield d, fe, c, share, outside
    alive = d.proc.poll() is None
    fe.close()
    d.stop()
    assert alive, d.text
    assert "Traceback" not in d.text, d.text


@budget(150, expensive=True)
@given(st.data())
def test_hostile_requests_through_the_daemon(live, data) -> None:
    d, fe, c, share, outside = live
    before = _snapshot(outside)
    seed(share)
    vq = fe.queue(1)
    nodes: list[int] = [ROOT]
    fhs: list[int] = []
    for _ in range(data.draw(st.integers(1, 8))):
        opcode, req, in_split, out_size, out_split = data.draw(requests(nodes, fhs))
        if opcode in (Opcode.INIT, Opcode.DESTROY):
            continue        # a new session would end this one's nodeids mid-example
        readable = [bytes(v) for v in _split(bytearray(req), in_split)] or [b""]
        writable = [len(v) for v in _split(bytearray(out_size or 0), out_split)]
        done = vq.wait(vq.submit(readable, writable, indirect=data.draw(st.booleans())))
        used, buf = done.used_len, done.data
        assert 0 <= used <= (out_size or 0)
        if used == 0:
            continue
        length, error, unique = fa.OUT_HEADER.unpack_from(buf)
        assert (length, unique) == (used, struct.unpack_from("<Q", req, 8)[0])
        assert -511 <= error <= 0
        event(f"{_name(opcode)}: {'ok' if not error else os.strerror(-error)}")
        if error:
            continue
        if opcode in ENTRY_REPLIES and used >= 16 + 8:
            nodes.append(struct.unpack_from("<Q", buf, 16)[0])
        if opcode in OPEN_REPLIES and used >= 24:
            fhs.append(struct.unpack_from("<Q", buf, 16)[0])
    # The daemon still serves ordinary requests, and nothing outside its share changed.
    assert c.getattr(ROOT).attr.ino == os.stat(share).st_ino
    assert d.proc.poll() is None
    assert _snapshot(outside) == before
