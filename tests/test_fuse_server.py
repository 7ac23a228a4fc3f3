"""FuseServer: framing, INIT negotiation, the errno table, no-reply opcodes, reply placement.

Requests are built as bytes and served through Reader/Writer over bytearrays -- the same
objects the queue workers hand over for guest memory -- on a real temporary directory with a
shared Arena.  `Client` and the `env` fixture are reused by test_passthrough.py.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.fuse_abi import InitFlag, Opcode
from pyvirtiofsd.worker.chain import Reader, Writer
from pyvirtiofsd.worker.filesystem import Filesystem, FsOptions
from pyvirtiofsd.worker.fuse_server import SERVER_INIT_FLAGS, FuseServer, Session
from pyvirtiofsd.worker.passthrough import PassthroughFs

ALL_FLAGS = (1 << 43) - 1 & ~int(InitFlag.INIT_RESERVED)


class Reply(NamedTuple):
    used: int
    error: int
    body: bytes


def split(data: bytes | bytearray, sizes: list[int]) -> list[memoryview]:
    """`data` as consecutive views of the given sizes (the rest in a last view)."""
    out, pos = [], 0
    mv = memoryview(data)
    for s in sizes:
        out.append(mv[pos:pos + s])
        pos += s
    if pos < len(mv):
        out.append(mv[pos:])
    return out


class Client:
    """Builds FUSE requests and decodes the replies of one FuseServer."""

    def __init__(self, server: FuseServer) -> None:
        self.server = server
        self.unique = 100

    def raw(self, req: bytes, out: int | None = 1 << 16, in_split: list[int] | None = None,
            out_split: list[int] | None = None) -> tuple[int, bytearray]:
        reader = Reader(split(bytearray(req), in_split or []))
        buf = bytearray(out or 0)
        writer = Writer(split(buf, out_split or [])) if out is not None else None
        try:
            used = self.server.handle(reader, writer)
        finally:
            restore = getattr(self.server.fs, "restore_credentials", None)
            if restore is not None:
                restore()    # the test's own file operations run as root again
        return used, buf

    def request(self, op: int, nodeid: int = 1, body: bytes = b"", *, uid: int = 0,
                gid: int = 0, pid: int = 4242, ext: bytes = b"") -> bytes:
        self.unique += 1
        assert len(ext) % 8 == 0
        return fa.InHeader(40 + len(body) + len(ext), op, self.unique, nodeid, uid, gid, pid,
                           len(ext) // 8).pack() + body + ext

    def call(self, op: int, nodeid: int = 1, body: bytes = b"", *, out: int | None = 1 << 16,
             **kw) -> Reply:
        used, buf = self.raw(self.request(op, nodeid, body, **kw), out)
        if used == 0:
            return Reply(0, 0, b"")
        hdr = fa.OutHeader.unpack(buf)
        assert hdr.unique == self.unique
        assert hdr.len == used, "out.len must equal the used length"
        assert hdr.is_valid()
        return Reply(used, hdr.error, bytes(buf[16:used]))

    def ok(self, op: int, nodeid: int = 1, body: bytes = b"", **kw) -> bytes:
        r = self.call(op, nodeid, body, **kw)
        assert r.error == 0, f"{Opcode(op).name} failed: {os.strerror(-r.error)}"
        return r.body

    def err(self, op: int, nodeid: int = 1, body: bytes = b"", **kw) -> int:
        r = self.call(op, nodeid, body, **kw)
        assert r.used == 16 and r.body == b""
        return -r.error

    # -- typed helpers ---------------------------------------------------------------------
    def init(self, flags: int = ALL_FLAGS, minor: int = 45, major: int = 7) -> fa.InitOut:
        body = fa.InitIn(major, minor, 128 * 1024, flags & 0xFFFFFFFF, flags >> 32).pack()
        return fa.InitOut.unpack(self.ok(Opcode.INIT, 0, body))

    def lookup(self, parent: int, name: bytes, **kw) -> fa.EntryOut:
        return fa.EntryOut.unpack(self.ok(Opcode.LOOKUP, parent, name + b"\0", **kw))

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, **kw) -> fa.EntryOut:
        body = fa.MKDIR_IN.pack(mode, 0o022) + name + b"\0"
        return fa.EntryOut.unpack(self.ok(Opcode.MKDIR, parent, body, **kw))

    def create(self, parent: int, name: bytes, flags: int = os.O_RDWR, mode: int = 0o644,
               **kw) -> tuple[fa.EntryOut, fa.OpenOut]:
        body = fa.CreateIn(flags | os.O_CREAT, mode, 0o022, 0).pack() + name + b"\0"
        reply = self.ok(Opcode.CREATE, parent, body, **kw)
        assert len(reply) == 144
        return fa.EntryOut.unpack(reply), fa.OpenOut.unpack(reply, 128)

    def open(self, nodeid: int, flags: int = os.O_RDWR, **kw) -> fa.OpenOut:
        return fa.OpenOut.unpack(self.ok(Opcode.OPEN, nodeid, fa.OpenIn(flags, 0).pack(), **kw))

    def opendir(self, nodeid: int = 1) -> int:
        return fa.OpenOut.unpack(self.ok(Opcode.OPENDIR, nodeid, fa.OpenIn(0, 0).pack())).fh

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, flags: int = 0) -> int:
        body = fa.WriteIn(fh, offset, len(data), 0, 0, flags).pack() + data
        return fa.WRITE_OUT.unpack(self.ok(Opcode.WRITE, nodeid, body))[0]

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        return self.ok(Opcode.READ, nodeid, fa.ReadIn(fh, offset, size).pack())

    def release(self, nodeid: int, fh: int) -> None:
        self.ok(Opcode.RELEASE, nodeid, fa.RELEASE_IN.pack(fh, 0, 0, 0))

    def getattr(self, nodeid: int, **kw) -> fa.AttrOut:
        return fa.AttrOut.unpack(self.ok(Opcode.GETATTR, nodeid, fa.GETATTR_IN.pack(0, 0), **kw))

    def forget(self, nodeid: int, nlookup: int) -> None:
        r = self.call(Opcode.FORGET, nodeid, fa.FORGET_IN.pack(nlookup), out=None)
        assert r.used == 0


@dataclass
class Env:
    root: str
    arena: Arena
    proc: int
    fs: PassthroughFs
    server: FuseServer
    client: Client
    session: Session

    def server_like(self, options: FsOptions | None = None) -> Client:
        """Another queue's worker: its own filesystem object, the same arena and session."""
        fs = PassthroughFs(self.arena, self.proc, options or self.fs.options)
        return Client(FuseServer(fs, 2, self.session))

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)


def make_env(root: str, options: FsOptions, init: bool = True) -> Env:
    arena = Arena.create(max_inodes=8192, max_handles=1024, max_queues=4)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    st = os.fstat(fd)
    arena.inodes.set_root(fd, st.st_dev, st.st_ino)
    proc = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    fs = PassthroughFs(arena, proc, options)
    session = Session()
    server = FuseServer(fs, 1, session)
    client = Client(server)
    if init:
        client.init()
    return Env(root, arena, proc, fs, server, client, session)


@contextmanager
def running_env(root: Path, options: FsOptions, init: bool = True) -> Iterator[Env]:
    """A share at `root` (mode 0755), by default with an initialised session; the process
    state the filesystem changes (umask, groups) is put back afterwards."""
    root.mkdir(exist_ok=True)
    os.chmod(root, 0o755)
    groups = os.getgroups()
    umask = os.umask(0o022)
    os.umask(umask)
    e = make_env(str(root), options, init)
    try:
        yield e
    finally:
        os.setgroups(groups)
        os.umask(umask)
        os.close(e.proc)
        e.arena.close()


@pytest.fixture
def options() -> FsOptions:
    return FsOptions(xattr=True)


@pytest.fixture
def env(tmp_path, options):
    with running_env(tmp_path / "share", options) as e:
        yield e


# -- framing and errors -----------------------------------------------------------------------


def test_truncated_header_is_dropped_and_logged_once(env, caplog):
    caplog.set_level(logging.WARNING)
    used, buf = env.client.raw(b"\x01" * 39)
    assert used == 0 and buf == bytearray(len(buf))
    used, _ = env.client.raw(b"\x01" * 20)
    assert used == 0
    assert len([r for r in caplog.records if "shorter than fuse_in_header" in r.message]) == 1


def test_length_inconsistent_with_chain_is_eio(env):
    c = env.client
    req = c.request(Opcode.LOOKUP, 1, b"x\0")
    longer = fa.IN_HEADER.pack(len(req) + 8, *fa.IN_HEADER.unpack(req[:40])[1:]) + req[40:]
    used, buf = c.raw(longer)
    assert (used, fa.OutHeader.unpack(buf)) == (16, (16, -errno.EIO, c.unique))
    shorter = fa.IN_HEADER.pack(39, *fa.IN_HEADER.unpack(req[:40])[1:]) + req[40:]
    used, buf = c.raw(shorter)
    assert fa.OutHeader.unpack(buf).error == -errno.EIO


def test_trailing_bytes_after_len_are_ignored(env):
    os.mkdir(env.path("d"))
    c = env.client
    used, buf = c.raw(c.request(Opcode.LOOKUP, 1, b"d\0") + b"garbage!")
    assert fa.OutHeader.unpack(buf).error == 0 and used == 16 + 128


def test_oversized_request_is_enomem(env):
    c = env.client
    req = c.request(Opcode.LOOKUP, 1, b"x" * ((1 << 20) + 4096) + b"\0")
    _used, buf = c.raw(req)
    assert fa.OutHeader.unpack(buf).error == -errno.ENOMEM


def test_unknown_and_unserved_opcodes_are_enosys(env):
    c = env.client
    assert c.err(99) == errno.ENOSYS
    assert c.err(7) == errno.ENOSYS
    for op in (Opcode.BMAP, Opcode.IOCTL,
               Opcode.POLL, Opcode.SETUPMAPPING, Opcode.REMOVEMAPPING, Opcode.TMPFILE,
               Opcode.STATX):
        assert c.err(op, 1, bytes(64)) == errno.ENOSYS, op.name


def test_short_bodies_are_einval(env):
    c = env.client
    for op in (Opcode.GETATTR, Opcode.SETATTR, Opcode.OPEN, Opcode.READ, Opcode.WRITE,
               Opcode.RELEASE, Opcode.FSYNC, Opcode.FLUSH, Opcode.OPENDIR, Opcode.READDIR,
               Opcode.READDIRPLUS, Opcode.ACCESS, Opcode.CREATE, Opcode.MKDIR, Opcode.MKNOD,
               Opcode.RENAME, Opcode.RENAME2, Opcode.LINK, Opcode.FALLOCATE, Opcode.LSEEK,
               Opcode.COPY_FILE_RANGE, Opcode.COPY_FILE_RANGE_64, Opcode.GETXATTR,
               Opcode.LISTXATTR, Opcode.SETXATTR):
        assert c.err(op, 1, b"\1\2\3") == errno.EINVAL, op.name


def test_names_must_be_exactly_nul_terminated(env):
    os.mkdir(env.path("a"))
    c = env.client
    assert c.err(Opcode.LOOKUP, 1, b"a") == errno.EINVAL          # no NUL
    assert c.err(Opcode.LOOKUP, 1, b"a\0b\0") == errno.EINVAL     # NUL inside
    assert c.err(Opcode.LOOKUP, 1, b"") == errno.EINVAL
    assert c.err(Opcode.RENAME, 1, fa.RENAME_IN.pack(1) + b"a\0") == errno.EINVAL
    assert c.err(Opcode.SYMLINK, 1, b"only-one-name\0") == errno.EINVAL
    assert os.path.isdir(env.path("a"))


def test_write_size_beyond_its_data_is_einval(env):
    c = env.client
    e, o = c.create(1, b"f")
    body = fa.WriteIn(o.fh, 0, 100).pack() + b"x" * 50
    assert c.err(Opcode.WRITE, e.nodeid, body) == errno.EINVAL
    assert os.path.getsize(env.path("f")) == 0


def test_requests_before_init_get_eio(tmp_path):
    with running_env(tmp_path / "share", FsOptions(), init=False) as e:
        c = e.client
        assert c.err(Opcode.GETATTR, 1, fa.GETATTR_IN.pack(0, 0)) == errno.EIO
        assert c.call(Opcode.FORGET, 1, fa.FORGET_IN.pack(1)).used == 0
        c.init()
        assert c.getattr(1).attr.ino == os.stat(e.root).st_ino
        # DESTROY ends the session: back to EIO until the next INIT.
        assert c.ok(Opcode.DESTROY) == b""
        assert c.err(Opcode.GETATTR, 1, fa.GETATTR_IN.pack(0, 0)) == errno.EIO
        c.init()
        assert c.getattr(1).attr.ino == os.stat(e.root).st_ino


def test_init_started_on_one_queue_serves_all_sharing_the_session(tmp_path):
    with running_env(tmp_path / "share", FsOptions(), init=False) as e:
        other = e.server_like()
        assert other.err(Opcode.GETATTR, 1, fa.GETATTR_IN.pack(0, 0)) == errno.EIO
        e.client.init()
        assert other.getattr(1).attr.ino == os.stat(e.root).st_ino
        # A server with its own session has not seen any INIT.
        lone = Client(FuseServer(e.fs, 3, Session()))
        assert lone.err(Opcode.GETATTR, 1, fa.GETATTR_IN.pack(0, 0)) == errno.EIO


def test_init_negotiation(env):
    out = env.client.init(ALL_FLAGS)
    assert (out.major, out.minor) == (7, fa.KERNEL_MINOR_VERSION)
    assert out.max_write == 1 << 20 and out.max_pages == (1 << 20) // os.sysconf("SC_PAGESIZE")
    assert out.max_readahead == 128 * 1024 and out.time_gran == 1
    flags = out.all_flags
    want = (SERVER_INIT_FLAGS | InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO
            | InitFlag.SUBMOUNTS | InitFlag.POSIX_LOCKS | InitFlag.FLOCK_LOCKS)
    assert flags == want
    assert flags & InitFlag.CREATE_SUPP_GROUP and out.flags2 == InitFlag.CREATE_SUPP_GROUP >> 32
    for never in (InitFlag.WRITEBACK_CACHE, InitFlag.POSIX_ACL, InitFlag.DONT_MASK,
                  InitFlag.EXPORT_SUPPORT, InitFlag.ALLOW_IDMAP, InitFlag.PASSTHROUGH,
                  InitFlag.SPLICE_READ, InitFlag.SECURITY_CTX):
        assert not flags & never, never.name
    assert env.session.started and env.session.flags == flags


def test_init_replies_only_offered_flags(env):
    offered = int(InitFlag.ASYNC_READ | InitFlag.MAX_PAGES | InitFlag.DO_READDIRPLUS)
    out = env.client.init(offered)
    assert out.flags == offered and out.flags2 == 0
    # flags2 only counts with INIT_EXT (protocol.md 4.4).
    body = fa.InitIn(7, 45, 4096, int(InitFlag.ASYNC_READ), 0xFFFF).pack()
    out = fa.InitOut.unpack(env.client.ok(Opcode.INIT, 0, body))
    assert out.flags == InitFlag.ASYNC_READ and out.flags2 == 0


def test_init_writeback_and_option_flags(tmp_path):
    opts = FsOptions(writeback=True, readdirplus=False, announce_submounts=False)
    with running_env(tmp_path / "share", opts, init=False) as e:
        flags = e.client.init().all_flags
        assert flags & InitFlag.WRITEBACK_CACHE
        assert not flags & (InitFlag.DO_READDIRPLUS | InitFlag.SUBMOUNTS)


def test_init_versions(env):
    c = env.client
    out = c.init(major=8)            # newer major: answer 7.x and wait for another INIT
    assert (out.major, out.minor) == (7, fa.KERNEL_MINOR_VERSION)
    body = fa.InitIn(6, 30, 0, 0, 0).pack()
    assert c.err(Opcode.INIT, 0, body) == errno.EPROTO
    body = fa.InitIn(7, 26, 0, 0, 0).pack()
    assert c.err(Opcode.INIT, 0, body) == errno.EPROTO
    # A pre-7.36 kernel sends the 16-byte fuse_init_in.
    out = fa.InitOut.unpack(c.ok(Opcode.INIT, 0, fa.INIT_IN_COMPAT.pack(7, 31, 4096, 1)))
    assert out.flags == 1 and out.minor == fa.KERNEL_MINOR_VERSION
    assert env.session.minor == 31


def test_forget_and_interrupt_have_no_reply(env):
    os.mkdir(env.path("d"))
    c = env.client
    e = c.lookup(1, b"d")
    assert c.call(Opcode.INTERRUPT, 0, fa.INTERRUPT_IN.pack(5)).used == 0
    assert c.call(Opcode.FORGET, e.nodeid, fa.FORGET_IN.pack(1)).used == 0
    with pytest.raises(OSError):
        env.arena.inodes.info(e.nodeid)
    # A FORGET with a short body, or for an unknown node, is dropped silently too.
    assert c.call(Opcode.FORGET, 12345, b"\1").used == 0
    assert c.call(Opcode.FORGET, 12345, fa.FORGET_IN.pack(1)).used == 0


def test_batch_forget(env):
    c = env.client
    ids = []
    for name in (b"a", b"b", b"c"):
        os.mkdir(env.path(name.decode()))
        ids.append(c.lookup(1, name).nodeid)
    c.lookup(1, b"a")
    body = fa.BATCH_FORGET_IN.pack(3) + b"".join(fa.FORGET_ONE.pack(i, 1) for i in ids)
    assert c.call(Opcode.BATCH_FORGET, 0, body, out=None).used == 0
    assert env.arena.inodes.info(ids[0])[0] == 1
    for i in ids[1:]:
        with pytest.raises(OSError):
            env.arena.inodes.info(i)
    # A count larger than the entries present forgets nothing.
    body = fa.BATCH_FORGET_IN.pack(5) + fa.FORGET_ONE.pack(ids[0], 1)
    assert c.call(Opcode.BATCH_FORGET, 0, body).used == 0
    assert env.arena.inodes.info(ids[0])[0] == 1


def test_reply_without_room(env, caplog):
    os.mkdir(env.path("d"))
    c = env.client
    # No writable part at all, or less than a header: nothing can be written.
    assert c.call(Opcode.LOOKUP, 1, b"d\0", out=None).used == 0
    used, buf = c.raw(c.request(Opcode.LOOKUP, 1, b"d\0"), out=8)
    assert used == 0 and buf == bytearray(8)
    # Room for a header but not the 128-byte entry: an EIO header.
    r = c.call(Opcode.LOOKUP, 1, b"d\0", out=40)
    assert (r.used, r.error) == (16, -errno.EIO)
    assert any("does not fit" in rec.message for rec in caplog.records)


def test_unexpected_exception_is_eio_and_logged(tmp_path, caplog):
    class Broken(Filesystem):
        def lookup(self, ctx, parent, name):
            raise RuntimeError("boom")

    session = Session()
    c = Client(FuseServer(Broken(), 5, session))
    c.init()
    caplog.set_level(logging.ERROR)
    assert c.err(Opcode.LOOKUP, 1, b"x\0") == errno.EIO
    assert any("LOOKUP" in r.message and "boom" in r.message for r in caplog.records)
    # The default Filesystem answers ENOSYS for what it does not implement.
    assert c.err(Opcode.MKDIR, 1, fa.MKDIR_IN.pack(0o755, 0) + b"x\0") == errno.ENOSYS


def test_error_codes_stay_in_range(tmp_path):
    class Weird(Filesystem):
        def getattr(self, ctx, nodeid, fh):
            raise OSError(4000, "out of range")

    c = Client(FuseServer(Weird(), 5, Session()))
    c.init()
    assert c.err(Opcode.GETATTR, 1, fa.GETATTR_IN.pack(0, 0)) == errno.EIO


def test_reply_header_split_across_buffers(env):
    """The out header and the body may straddle descriptors of any size."""
    with open(env.path("f"), "wb") as f:
        f.write(bytes(range(256)) * 64)
    c = env.client
    nodeid = c.lookup(1, b"f").nodeid
    fh = c.open(nodeid, os.O_RDONLY).fh
    req = c.request(Opcode.READ, nodeid, fa.ReadIn(fh, 10, 5000).pack())
    used, buf = c.raw(req, out=8192, in_split=[3, 37, 1, 9], out_split=[7, 5, 3, 1000, 1])
    assert used == 16 + 5000
    assert fa.OutHeader.unpack(buf) == (used, 0, c.unique)
    assert bytes(buf[16:used]) == (bytes(range(256)) * 64)[10:5010]
    # The lookup reply (a fixed struct) split the same way.
    req = c.request(Opcode.LOOKUP, 1, b"f\0")
    used, buf = c.raw(req, out=200, out_split=[1, 2, 3, 17])
    assert fa.OutHeader.unpack(buf).error == 0
    assert fa.EntryOut.unpack(buf, 16).nodeid == nodeid


def test_read_error_after_reserving_header(env):
    c = env.client
    e, o = c.create(1, b"f")
    assert c.err(Opcode.READ, e.nodeid, fa.ReadIn(o.fh + 7, 0, 10).pack()) == errno.EBADF


def test_groups_extension(env):
    """FUSE_EXT_GROUPS supplies a supplementary group for the creation (protocol.md 4.9)."""
    os.mkdir(env.path("team"), 0o770)
    os.chown(env.path("team"), 0, 4321)
    os.chmod(env.path("team"), 0o770)
    c = env.client
    team = c.lookup(1, b"team").nodeid
    body = fa.MKDIR_IN.pack(0o755, 0) + b"x\0"
    assert c.err(Opcode.MKDIR, team, body, uid=1000, gid=1000) == errno.EACCES
    ext = fa.pack_supp_groups((4321,))
    e = fa.EntryOut.unpack(c.ok(Opcode.MKDIR, team, body, uid=1000, gid=1000, ext=ext))
    st = os.stat(env.path("team", "x"))
    assert (st.st_uid, st.st_gid, e.attr.uid) == (1000, 1000, 1000)
    # An empty security context (not negotiated) is skipped; the groups still apply.
    ext2 = fa.SECCTX_HEADER.pack(8, 0) + ext
    c.ok(Opcode.MKDIR, team, fa.MKDIR_IN.pack(0o755, 0) + b"y\0", uid=1000, gid=1000, ext=ext2)
    assert os.path.isdir(env.path("team", "y"))


def test_malformed_extensions_are_einval(env):
    c = env.client
    body = fa.MKDIR_IN.pack(0o755, 0) + b"x\0"
    bad = fa.EXT_HEADER.pack(64, 32) + bytes(8)          # size runs past the area
    assert c.err(Opcode.MKDIR, 1, body, ext=bad) == errno.EINVAL
    bad = fa.EXT_HEADER.pack(16, 32) + fa.SUPP_GROUPS.pack(9) + bytes(4)
    assert c.err(Opcode.MKDIR, 1, body, ext=bad) == errno.EINVAL
    # total_extlen larger than the whole body.
    req = bytearray(c.request(Opcode.MKDIR, 1, body))
    req[36:38] = (10).to_bytes(2, "little")
    _used, buf = c.raw(bytes(req))
    assert fa.OutHeader.unpack(buf).error == -errno.EINVAL
    assert not os.path.exists(env.path("x"))


def test_two_workers_share_nodeids_and_handles(env):
    """Two servers on one arena: what one hands out, the other serves (DESIGN.md)."""
    a, b = env.client, env.server_like()
    os.mkdir(env.path("d"))
    nodeid = a.lookup(1, b"d").nodeid
    assert b.getattr(nodeid).attr.ino == os.stat(env.path("d")).st_ino
    # The same inode looked up on the other queue is the same nodeid, one more lookup.
    assert b.lookup(1, b"d").nodeid == nodeid
    assert env.arena.inodes.info(nodeid)[0] == 2
    e, o = a.create(nodeid, b"f")
    assert b.write(e.nodeid, o.fh, 0, b"from b") == 6
    assert a.read(e.nodeid, o.fh, 0, 100) == b"from b"
    b.release(e.nodeid, o.fh)
    assert a.err(Opcode.READ, e.nodeid, fa.ReadIn(o.fh, 0, 1).pack()) == errno.EBADF
    # FORGET on one queue drops the count the other raised.
    b.forget(nodeid, 1)
    assert env.arena.inodes.info(nodeid)[0] == 1
    a.forget(nodeid, 1)
    assert a.err(Opcode.GETATTR, nodeid, fa.GETATTR_IN.pack(0, 0)) == errno.EBADF


def test_random_requests_always_get_a_well_formed_answer(env, tmp_path, caplog):
    """Whatever the bytes, handle() returns a used length and, for a reply, a valid header;
    no request reaches the catch-all (no 'failed' log) and nothing outside the share moves."""
    sentinel = tmp_path / "sentinel"
    sentinel.write_bytes(b"keep")
    os.mkdir(env.path("d"))
    with open(env.path("d", "f"), "wb") as f:
        f.write(b"x" * 100)
    c = env.client
    d = c.lookup(1, b"d").nodeid
    known = [1, d, c.lookup(d, b"f").nodeid]
    rng = random.Random(1234)
    opcodes = [int(o) for o in Opcode] + [0, 7, 19, 54, 0xFFFF, 0xFFFFFFFF]
    caplog.set_level(logging.ERROR)
    errors: dict[int, int] = {}
    for i in range(4000):
        op = opcodes[i % len(opcodes)]
        body = rng.randbytes(rng.choice((0, 1, 8, 16, 24, 40, 64, 88, 130)))
        if rng.random() < 0.5:
            body += rng.choice((b"", b"name\0", b"a\0b\0", b"../x\0", b"user.k\0v"))
        ext = rng.choice((b"", b"", fa.pack_supp_groups((rng.randrange(1 << 32),)),
                          rng.randbytes(8)))
        nodeid = rng.choice([*known, rng.randrange(1 << 64)])
        req = c.request(op, nodeid, body, uid=rng.choice((0, 1000)), gid=0, ext=ext)
        if rng.random() < 0.1:                       # lie about the length
            req = fa.IN_HEADER.pack(rng.randrange(1 << 32), *fa.IN_HEADER.unpack(req[:40])[1:]) \
                + req[40:]
        out = rng.choice((None, 8, 16, 100, 4096))
        used, buf = c.raw(req, out)
        assert 0 <= used <= (out or 0)
        if used:
            hdr = fa.OutHeader.unpack(buf)
            assert hdr.len == used and hdr.unique == c.unique and hdr.is_valid(), (op, hdr)
            errors[-hdr.error] = errors.get(-hdr.error, 0) + 1
        if not env.session.started:
            c.init()                                  # after a DESTROY
    # The requests got past the decoding into the filesystem, not just framing errors.
    assert errors.get(0, 0) > 30 and errors.get(errno.EBADF, 0) > 100
    assert len(errors) > 8
    assert not [r.message for r in caplog.records if "failed" in r.message]
    assert sentinel.read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["sentinel", "share"]
