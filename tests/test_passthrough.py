"""Passthrough filesystem semantics, driven through FuseServer on a real directory.

Covers every opcode's success path and its errno replies, credentials, read-only mode, cache
modes, and that nothing the guest sends reaches outside the shared directory.
"""

from __future__ import annotations

import errno
import gc
import os
import stat
import subprocess

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.fuse_abi import Opcode, SetattrValid
from pyvirtiofsd.worker.chain import Reader, Writer
from pyvirtiofsd.worker.filesystem import FsOptions
from tests.test_fuse_server import running_env, split

GETATTR0 = fa.GETATTR_IN.pack(0, 0)


def content(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def outside(tmp_path):
    """A directory next to the share, with a file the guest must never reach."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_bytes(b"top secret")
    os.chmod(d / "secret", 0o600)
    return d


@pytest.fixture
def env(tmp_path):
    with running_env(tmp_path / "share", FsOptions(xattr=True)) as e:
        yield e


def open_env(tmp_path, **opts):
    """A share with other options; a test may open several in turn."""
    return running_env(tmp_path / "share2", FsOptions(**opts))


# -- names and inodes -----------------------------------------------------------------------


def test_lookup_getattr_and_errors(env):
    with open(env.path("f"), "wb") as f:
        f.write(b"12345")
    c = env.client
    e = c.lookup(1, b"f")
    st = os.stat(env.path("f"))
    assert e.nodeid not in (0, 1)
    assert (e.attr.ino, e.attr.size, e.attr.mode, e.attr.nlink) == (st.st_ino, 5, st.st_mode, 1)
    assert (e.attr.mtime, e.attr.mtimensec) == divmod(st.st_mtime_ns, 10**9)
    assert (e.entry_valid, e.attr_valid) == (1, 1)            # cache=auto: 1 s
    a = c.getattr(e.nodeid)
    assert a.attr == e.attr and a.attr_valid == 1
    # GETATTR_FH names an open file.
    fh = c.open(e.nodeid, os.O_RDONLY).fh
    a = fa.AttrOut.unpack(c.ok(Opcode.GETATTR, e.nodeid, fa.GETATTR_IN.pack(fa.GETATTR_FH, fh)))
    assert a.attr.ino == st.st_ino
    assert c.err(Opcode.LOOKUP, 1, b"missing\0") == errno.ENOENT
    assert c.err(Opcode.GETATTR, 0x7777, GETATTR0) == errno.EBADF
    assert c.err(Opcode.LOOKUP, 0x7777, b"f\0") == errno.EBADF
    assert c.err(Opcode.LOOKUP, 1, b"x" * 256 + b"\0") == errno.ENAMETOOLONG


def test_same_inode_same_nodeid_and_lookup_counts(env):
    with open(env.path("f"), "wb"):
        pass
    os.link(env.path("f"), env.path("hard"))
    c = env.client
    n1 = c.lookup(1, b"f").nodeid
    n2 = c.lookup(1, b"hard").nodeid
    assert n1 == n2
    assert env.arena.inodes.info(n1)[0] == 2
    c.forget(n1, 2)
    with pytest.raises(OSError):
        env.arena.inodes.info(n1)
    # After the last FORGET the nodeid is stale; a new lookup gets a new one.
    assert c.err(Opcode.GETATTR, n1, GETATTR0) == errno.EBADF
    assert c.lookup(1, b"f").nodeid != n1


def test_lookup_dot_and_dotdot(env):
    os.mkdir(env.path("d"))
    c = env.client
    d = c.lookup(1, b"d").nodeid
    assert c.lookup(d, b".").nodeid == d
    assert env.arena.inodes.info(d)[0] == 2
    assert c.lookup(1, b"..").nodeid == 1                     # the root is its own parent
    assert c.lookup(1, b".").nodeid == 1
    # '..' of anything else is never resolved from the directory's fd.
    assert c.err(Opcode.LOOKUP, d, b"..\0") == errno.ENOENT


def test_mkdir_rmdir_and_errors(env):
    c = env.client
    e = c.mkdir(1, b"d", 0o750)
    st = os.stat(env.path("d"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert e.attr.ino == st.st_ino
    assert c.err(Opcode.MKDIR, 1, fa.MKDIR_IN.pack(0o755, 0) + b"d\0") == errno.EEXIST
    c.mkdir(e.nodeid, b"inner")
    assert c.err(Opcode.RMDIR, 1, b"d\0") == errno.ENOTEMPTY
    c.ok(Opcode.RMDIR, e.nodeid, b"inner\0")
    c.ok(Opcode.RMDIR, 1, b"d\0")
    assert not os.path.exists(env.path("d"))
    assert c.err(Opcode.RMDIR, 1, b"d\0") == errno.ENOENT


def test_mode_is_taken_as_sent(env):
    """The kernel applied the umask already (no FUSE_DONT_MASK), so none is applied here."""
    c = env.client
    c.mkdir(1, b"d", 0o777)
    assert stat.S_IMODE(os.stat(env.path("d")).st_mode) == 0o777
    c.create(1, b"f", mode=0o666)
    assert stat.S_IMODE(os.stat(env.path("f")).st_mode) == 0o666


def test_mknod_symlink_readlink_link_unlink(env):
    c = env.client
    fifo = fa.EntryOut.unpack(c.ok(Opcode.MKNOD, 1,
                                   fa.MKNOD_IN.pack(stat.S_IFIFO | 0o640, 0, 0) + b"p\0"))
    assert stat.S_ISFIFO(os.lstat(env.path("p")).st_mode)
    assert stat.S_ISFIFO(fifo.attr.mode)
    s = fa.EntryOut.unpack(c.ok(Opcode.SYMLINK, 1, b"s\0target/with/../dots\0"))
    assert stat.S_ISLNK(s.attr.mode)
    assert os.readlink(env.path("s")) == "target/with/../dots"
    assert c.ok(Opcode.READLINK, s.nodeid) == b"target/with/../dots"
    assert c.err(Opcode.READLINK, fifo.nodeid) == errno.ENOENT      # readlinkat(fd, "")
    e, _ = c.create(1, b"f")
    ln = fa.EntryOut.unpack(c.ok(Opcode.LINK, 1, fa.LINK_IN.pack(e.nodeid) + b"g\0"))
    assert ln.nodeid == e.nodeid and ln.attr.nlink == 2
    assert os.path.samefile(env.path("f"), env.path("g"))
    # A hard link to the symlink links the symlink itself, not its target.
    c.ok(Opcode.LINK, 1, fa.LINK_IN.pack(s.nodeid) + b"s2\0")
    assert os.readlink(env.path("s2")) == "target/with/../dots"
    assert c.err(Opcode.LINK, 1, fa.LINK_IN.pack(e.nodeid) + b"g\0") == errno.EEXIST
    c.ok(Opcode.UNLINK, 1, b"g\0")
    assert not os.path.exists(env.path("g"))
    assert c.err(Opcode.UNLINK, 1, b"g\0") == errno.ENOENT
    os.mkdir(env.path("dir"))
    assert c.err(Opcode.UNLINK, 1, b"dir\0") == errno.EISDIR


def test_rename_and_rename2(env):
    c = env.client
    for name, data in ((b"a", b"A"), (b"b", b"B")):
        with open(env.path(name.decode()), "wb") as f:
            f.write(data)
    d = c.mkdir(1, b"d").nodeid
    c.ok(Opcode.RENAME, 1, fa.RENAME_IN.pack(d) + b"a\0a2\0")
    assert content(env.path("d", "a2")) == b"A"
    c.ok(Opcode.RENAME2, d, fa.RENAME2_IN.pack(1, 0) + b"a2\0a\0")
    assert content(env.path("a")) == b"A"
    noreplace = fa.RENAME2_IN.pack(1, fa.RENAME_NOREPLACE)
    assert c.err(Opcode.RENAME2, 1, noreplace + b"a\0b\0") == errno.EEXIST
    c.ok(Opcode.RENAME2, 1, noreplace + b"a\0c\0")
    c.ok(Opcode.RENAME2, 1, fa.RENAME2_IN.pack(1, fa.RENAME_EXCHANGE) + b"c\0b\0")
    assert content(env.path("b")) == b"A"
    assert content(env.path("c")) == b"B"
    # RENAME_WHITEOUT leaves a whiteout (character device 0/0) behind.
    c.ok(Opcode.RENAME2, 1, fa.RENAME2_IN.pack(d, fa.RENAME_WHITEOUT) + b"c\0c\0")
    st = os.lstat(env.path("c"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert content(env.path("d", "c")) == b"B"
    assert c.err(Opcode.RENAME2, 1, fa.RENAME2_IN.pack(1, 1 << 8) + b"b\0z\0") == errno.EINVAL
    assert c.err(Opcode.RENAME, 1, fa.RENAME_IN.pack(1) + b"nope\0z\0") == errno.ENOENT
    assert c.err(Opcode.RENAME, 1, fa.RENAME_IN.pack(0x9999) + b"b\0z\0") == errno.EBADF


# -- files ------------------------------------------------------------------------------------


def test_create_open_read_write_release(env):
    c = env.client
    e, o = c.create(1, b"f", os.O_RDWR | os.O_EXCL, 0o640)
    assert stat.S_IMODE(os.stat(env.path("f")).st_mode) == 0o640
    assert o.open_flags == 0                                  # cache=auto
    assert c.write(e.nodeid, o.fh, 0, b"hello world") == 11
    assert c.read(e.nodeid, o.fh, 6, 100) == b"world"
    assert c.read(e.nodeid, o.fh, 100, 10) == b""
    c.ok(Opcode.FLUSH, e.nodeid, fa.FLUSH_IN.pack(o.fh, 0))
    c.ok(Opcode.FSYNC, e.nodeid, fa.FSYNC_IN.pack(o.fh, 0))
    c.ok(Opcode.FSYNC, e.nodeid, fa.FSYNC_IN.pack(o.fh, fa.FSYNC_FDATASYNC))
    live = env.arena.handles.live_count()
    c.release(e.nodeid, o.fh)
    assert env.arena.handles.live_count() == live - 1
    assert c.err(Opcode.RELEASE, e.nodeid, fa.RELEASE_IN.pack(o.fh, 0, 0, 0)) == errno.EBADF
    assert c.err(Opcode.READ, e.nodeid, fa.ReadIn(o.fh, 0, 1).pack()) == errno.EBADF
    # O_EXCL on an existing name fails; without it CREATE opens the existing file.
    body = fa.CreateIn(os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, 0, 0).pack() + b"f\0"
    assert c.err(Opcode.CREATE, 1, body) == errno.EEXIST
    e2, o2 = c.create(1, b"f", os.O_RDWR)
    assert e2.nodeid == e.nodeid
    assert c.read(e2.nodeid, o2.fh, 0, 5) == b"hello"
    o3 = c.open(e.nodeid, os.O_WRONLY | os.O_TRUNC)
    assert os.path.getsize(env.path("f")) == 0
    # An fh is only valid with the nodeid it was opened for.
    other, _ = c.create(1, b"other")
    assert c.err(Opcode.READ, other.nodeid, fa.ReadIn(o3.fh, 0, 1).pack()) == errno.EBADF
    assert c.err(Opcode.FLUSH, e.nodeid, fa.FLUSH_IN.pack(0x5555, 0)) == errno.EBADF


def test_append_writes(env):
    c = env.client
    e, o = c.create(1, b"log", os.O_WRONLY | os.O_APPEND)
    c.write(e.nodeid, o.fh, 0, b"one,", os.O_WRONLY | os.O_APPEND)
    # A direct write of an O_APPEND file appends whatever offset the guest sent.
    c.write(e.nodeid, o.fh, 0, b"two,", os.O_WRONLY | os.O_APPEND)
    assert content(env.path("log")) == b"one,two,"
    # A page-cache write (FUSE_WRITE_CACHE) lands at its offset.
    body = fa.WriteIn(o.fh, 0, 3, fa.WRITE_CACHE, 0, os.O_WRONLY | os.O_APPEND).pack() + b"ONE"
    c.ok(Opcode.WRITE, e.nodeid, body)
    assert content(env.path("log")) == b"ONE,two,"


def test_big_read_and_write_through_split_buffers(env):
    """1 MiB each way, with the guest buffers split at odd places: data lands in place."""
    c = env.client
    e, o = c.create(1, b"big")
    data = os.urandom(1 << 20)
    req = c.request(Opcode.WRITE, e.nodeid, fa.WriteIn(o.fh, 0, len(data)).pack() + data)
    used, buf = c.raw(req, out=64, in_split=[40, 17, 23, 4095, 1, 65536, 3])
    assert fa.OutHeader.unpack(buf).error == 0
    assert fa.WRITE_OUT.unpack_from(buf, 16)[0] == len(data)
    assert content(env.path("big")) == data
    sizes = [16, 1, 4096 * 3 + 5, 999, 65536, 7]
    out = bytearray(16 + len(data) + 100)
    views = split(out, sizes)
    req = c.request(Opcode.READ, e.nodeid, fa.ReadIn(o.fh, 0, len(data)).pack())
    used = c.server.handle(Reader([memoryview(bytearray(req))]), Writer(views))
    assert used == 16 + len(data)
    assert fa.OutHeader.unpack(out) == (used, 0, c.unique)
    pos = 0
    for v in views:       # each view holds exactly its own slice of the reply stream
        assert bytes(v) == (bytes(out[:16]) + data + bytes(100))[pos:pos + len(v)]
        pos += len(v)
    assert bytes(out[16:used]) == data
    assert bytes(out[used:]) == bytes(100)


def test_setattr(env):
    c = env.client
    e, o = c.create(1, b"f", mode=0o644)
    c.write(e.nodeid, o.fh, 0, b"0123456789")
    V = SetattrValid

    def setattr(valid, nodeid=e.nodeid, **fields):
        body = fa.SetattrIn(int(valid), **fields).pack()
        return fa.AttrOut.unpack(c.ok(Opcode.SETATTR, nodeid, body))

    a = setattr(V.MODE, mode=stat.S_IFREG | 0o600)
    assert stat.S_IMODE(os.stat(env.path("f")).st_mode) == 0o600 == stat.S_IMODE(a.attr.mode)
    setattr(V.UID | V.GID, uid=1234, gid=5678)
    st = os.stat(env.path("f"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    setattr(V.GID, gid=42)
    assert (os.stat(env.path("f")).st_uid, os.stat(env.path("f")).st_gid) == (1234, 42)
    a = setattr(V.SIZE, size=4)                                    # no fh: reopened for it
    assert os.path.getsize(env.path("f")) == 4 == a.attr.size
    setattr(V.SIZE | V.FH, size=2, fh=o.fh)
    assert os.path.getsize(env.path("f")) == 2
    setattr(V.ATIME | V.MTIME, atime=1000, atimensec=5, mtime=2000, mtimensec=7)
    st = os.stat(env.path("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 7)
    setattr(V.MTIME, mtime=3000)                                    # atime untouched
    st = os.stat(env.path("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 3000 * 10**9)
    a = setattr(V.ATIME | V.ATIME_NOW | V.MTIME | V.MTIME_NOW | V.FH, fh=o.fh)
    assert a.attr.mtime > 3000 and a.attr.atime > 1000
    setattr(V.CTIME, ctime=5)                                      # accepted, host's ctime
    # KILL_SUIDGID with a truncation drops set-id bits.
    os.chmod(env.path("f"), 0o6755)
    setattr(V.SIZE | V.KILL_SUIDGID, size=0)
    assert stat.S_IMODE(os.stat(env.path("f")).st_mode) == 0o755
    d = c.mkdir(1, b"d").nodeid
    body = fa.SetattrIn(int(V.SIZE), size=0).pack()
    assert c.err(Opcode.SETATTR, d, body) == errno.EISDIR
    body = fa.SetattrIn(int(V.SIZE | V.FH), size=0, fh=o.fh).pack()
    assert c.err(Opcode.SETATTR, d, body) == errno.EBADF            # fh of another nodeid


def test_open_refuses_special_files(env):
    c = env.client
    os.mkfifo(env.path("fifo"))
    nodeid = c.lookup(1, b"fifo").nodeid
    # Opening a FIFO with no writer would block the worker; device nodes would reach the host.
    assert c.err(Opcode.OPEN, nodeid, fa.OpenIn(os.O_RDONLY, 0).pack()) == errno.ENXIO
    os.mknod(env.path("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    nodeid = c.lookup(1, b"null").nodeid
    assert c.err(Opcode.OPEN, nodeid, fa.OpenIn(os.O_RDWR, 0).pack()) == errno.ENXIO
    assert c.err(Opcode.OPENDIR, nodeid, fa.OpenIn(0, 0).pack()) == errno.ENXIO
    e, _ = c.create(1, b"file")
    assert c.err(Opcode.OPENDIR, e.nodeid, fa.OpenIn(0, 0).pack()) == errno.ENOTDIR


def test_fallocate_lseek_copy_file_range(env):
    c = env.client
    e, o = c.create(1, b"sparse")
    c.write(e.nodeid, o.fh, 0, b"a" * 4096)
    c.write(e.nodeid, o.fh, 1 << 20, b"b" * 4096)
    lseek = fa.LSEEK_OUT.unpack

    def seek(offset, whence):
        return lseek(c.ok(Opcode.LSEEK, e.nodeid, fa.LSEEK_IN.pack(o.fh, offset, whence)))[0]

    assert seek(0, os.SEEK_HOLE) == 4096
    assert seek(4096, os.SEEK_DATA) == 1 << 20
    assert c.err(Opcode.LSEEK, e.nodeid, fa.LSEEK_IN.pack(o.fh, 2 << 20, os.SEEK_DATA)) \
        == errno.ENXIO
    # Allocate the hole (unwritten extents still seek as holes), then punch a new one
    # (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) where the first data was.
    blocks = os.stat(env.path("sparse")).st_blocks
    c.ok(Opcode.FALLOCATE, e.nodeid, fa.FALLOCATE_IN.pack(o.fh, 4096, (1 << 20) - 4096, 0))
    assert os.stat(env.path("sparse")).st_blocks >= blocks + ((1 << 20) - 4096) // 512
    c.ok(Opcode.FALLOCATE, e.nodeid, fa.FALLOCATE_IN.pack(o.fh, 0, 4096, 3))
    assert seek(0, os.SEEK_DATA) >= 4096
    assert os.path.getsize(env.path("sparse")) == (1 << 20) + 4096
    c.ok(Opcode.FALLOCATE, e.nodeid, fa.FALLOCATE_IN.pack(o.fh, 0, 8 << 20, 0))
    assert os.path.getsize(env.path("sparse")) == 8 << 20
    # copy_file_range between two open files, 32- and 64-bit reply variants.
    dst, od = c.create(1, b"copy")
    body = fa.COPY_FILE_RANGE_IN.pack(o.fh, 1 << 20, dst.nodeid, od.fh, 10, 4096, 0)
    assert fa.WRITE_OUT.unpack(c.ok(Opcode.COPY_FILE_RANGE, e.nodeid, body))[0] == 4096
    body = fa.COPY_FILE_RANGE_IN.pack(o.fh, (1 << 20) + 4000, dst.nodeid, od.fh, 0, 10, 0)
    n = fa.COPY_FILE_RANGE_OUT.unpack(c.ok(Opcode.COPY_FILE_RANGE_64, e.nodeid, body))[0]
    assert n == 10
    assert content(env.path("copy")) == b"b" * 4106
    body = fa.COPY_FILE_RANGE_IN.pack(o.fh, 0, dst.nodeid, od.fh, 0, 10, 1)
    assert c.err(Opcode.COPY_FILE_RANGE, e.nodeid, body) == errno.EINVAL
    body = fa.COPY_FILE_RANGE_IN.pack(o.fh, 0, e.nodeid, od.fh, 0, 10, 0)
    assert c.err(Opcode.COPY_FILE_RANGE, e.nodeid, body) == errno.EBADF


# -- directories ----------------------------------------------------------------------------


def test_readdir_3000_entries_with_cookies(env):
    c = env.client
    names = {f"file-{i:04d}-{'x' * (i % 37)}".encode() for i in range(3000)}
    for n in names:
        os.close(os.open(os.path.join(env.root.encode(), n), os.O_CREAT | os.O_WRONLY))
    fh = c.opendir(1)
    seen: list[bytes] = []
    offset, calls = 0, 0
    while True:
        body = c.ok(Opcode.READDIR, 1, fa.ReadIn(fh, offset, 4096).pack())
        assert len(body) <= 4096
        if not body:
            break
        calls += 1
        ents = fa.unpack_dirents(body)
        seen += [d.name for d in ents]
        offset = ents[-1].off
    assert calls > 10
    assert len(seen) == len(set(seen)) == 3002
    assert set(seen) == names | {b".", b".."}
    c.ok(Opcode.FSYNCDIR, 1, fa.FSYNC_IN.pack(fh, 0))
    c.ok(Opcode.RELEASEDIR, 1, fa.RELEASE_IN.pack(fh, 0, 0, 0))
    assert c.err(Opcode.READDIR, 1, fa.ReadIn(fh, 0, 4096).pack()) == errno.EBADF


def test_readdir_types_and_small_buffers(env):
    c = env.client
    os.mkdir(env.path("dir"))
    os.symlink("x", env.path("lnk"))
    with open(env.path("reg"), "w"):
        pass
    fh = c.opendir(1)
    ents = fa.unpack_dirents(c.ok(Opcode.READDIR, 1, fa.ReadIn(fh, 0, 4096).pack()))
    types = {d.name: d.type for d in ents}
    assert types[b"dir"] == stat.S_IFDIR >> 12 and types[b"lnk"] == stat.S_IFLNK >> 12
    assert types[b"reg"] == stat.S_IFREG >> 12
    assert {d.ino for d in ents if d.name == b"reg"} == {os.stat(env.path("reg")).st_ino}
    # A buffer for one record returns one record; size 0 returns none.
    one = fa.unpack_dirents(c.ok(Opcode.READDIR, 1, fa.ReadIn(fh, 0, 32).pack()))
    assert len(one) == 1
    assert c.ok(Opcode.READDIR, 1, fa.ReadIn(fh, 0, 0).pack()) == b""
    assert c.err(Opcode.READDIR, 1, fa.ReadIn(fh, 0, (1 << 20) + 1).pack()) == errno.ENOMEM


def test_readdirplus_counts_lookups(env):
    c = env.client
    for i in range(20):
        os.mkdir(env.path(f"d{i:02d}"))
    fh = c.opendir(1)
    live = env.arena.inodes.live_count()
    # Room for three records of 160 bytes: only the returned entries are looked up.
    body = c.ok(Opcode.READDIRPLUS, 1, fa.ReadIn(fh, 0, 3 * 160 + 100).pack())
    first = fa.unpack_direntplus(body)
    assert len(first) == 3
    looked_up = [d for d in first if d.dirent.name not in (b".", b"..")]
    assert env.arena.inodes.live_count() == live + len(looked_up)
    for d in first:
        if d.dirent.name in (b".", b".."):
            assert d.entry.nodeid == 0 and d.entry.attr.mode == stat.S_IFDIR
        else:
            assert d.entry.attr.ino == os.stat(env.path(d.dirent.name.decode())).st_ino
            assert env.arena.inodes.info(d.entry.nodeid)[0] == 1
    # The rest, resumed from the last cookie.
    rest = fa.unpack_direntplus(c.ok(Opcode.READDIRPLUS, 1,
                                     fa.ReadIn(fh, first[-1].dirent.off, 65536).pack()))
    names = [d.dirent.name for d in first + rest]
    assert sorted(names) == sorted([b".", b".."] + [f"d{i:02d}".encode() for i in range(20)])
    nodeids = [d.entry.nodeid for d in first + rest if d.entry.nodeid]
    assert len(nodeids) == 20 == len(set(nodeids))
    assert c.lookup(1, b"d05").nodeid in nodeids
    for n in nodeids:
        c.forget(n, 1)
    nid = c.lookup(1, b"d05").nodeid
    assert env.arena.inodes.info(nid)[0] == 2          # the earlier LOOKUP's and this one
    c.forget(nid, 2)
    assert env.arena.inodes.live_count() == live


def test_statfs_access_syncfs(env):
    c = env.client
    s = fa.Kstatfs.unpack(c.ok(Opcode.STATFS, 1))
    v = os.statvfs(env.root)
    assert (s.bsize, s.namelen, s.frsize, s.blocks) == (v.f_bsize, v.f_namemax, v.f_frsize,
                                                        v.f_blocks)
    c.ok(Opcode.SYNCFS, 1, fa.SYNCFS_IN.pack())
    e, _ = c.create(1, b"f", mode=0o640)
    c.ok(Opcode.SYNCFS, e.nodeid, fa.SYNCFS_IN.pack())
    c.ok(Opcode.ACCESS, e.nodeid, fa.ACCESS_IN.pack(os.R_OK | os.W_OK))
    c.ok(Opcode.ACCESS, e.nodeid, fa.ACCESS_IN.pack(os.F_OK), uid=1000, gid=1000)
    # Root may execute only what someone may execute.
    assert c.err(Opcode.ACCESS, e.nodeid, fa.ACCESS_IN.pack(os.X_OK)) == errno.EACCES
    assert c.err(Opcode.ACCESS, e.nodeid, fa.ACCESS_IN.pack(os.R_OK), uid=1000,
                 gid=1000) == errno.EACCES
    os.chown(env.path("f"), 0, 1000)
    c.ok(Opcode.ACCESS, e.nodeid, fa.ACCESS_IN.pack(os.R_OK), uid=1000, gid=1000)
    assert c.err(Opcode.ACCESS, e.nodeid, fa.ACCESS_IN.pack(os.W_OK), uid=1000,
                 gid=1000) == errno.EACCES


# -- credentials ----------------------------------------------------------------------------


def test_other_uid_gets_eacces(env):
    """Requests run with the caller's ids: the host's permission checks apply to them."""
    os.mkdir(env.path("private"), 0o700)
    with open(env.path("private", "f"), "wb") as f:
        f.write(b"root only")
    with open(env.path("mine"), "wb") as f:
        f.write(b"x")
    os.chmod(env.path("mine"), 0o600)
    c = env.client
    priv = c.lookup(1, b"private", uid=1000, gid=1000).nodeid
    assert c.err(Opcode.LOOKUP, priv, b"f\0", uid=1000, gid=1000) == errno.EACCES
    assert c.err(Opcode.MKDIR, priv, fa.MKDIR_IN.pack(0o755, 0) + b"x\0", uid=1000,
                 gid=1000) == errno.EACCES
    assert c.err(Opcode.OPENDIR, priv, fa.OpenIn(0, 0).pack(), uid=1000, gid=1000) \
        == errno.EACCES
    mine = c.lookup(1, b"mine").nodeid
    assert c.err(Opcode.OPEN, mine, fa.OpenIn(os.O_RDONLY, 0).pack(), uid=1000, gid=1000) \
        == errno.EACCES
    body = fa.SetattrIn(int(SetattrValid.MODE), mode=0o666).pack()
    assert c.err(Opcode.SETATTR, mine, body, uid=1000, gid=1000) == errno.EPERM
    assert c.err(Opcode.MKDIR, 1, fa.MKDIR_IN.pack(0o755, 0) + b"x\0", uid=1000,
                 gid=1000) == errno.EACCES
    # Root still can, and files a user creates are that user's.
    assert c.lookup(priv, b"f").nodeid
    os.chmod(env.root, 0o777)
    e = c.mkdir(1, b"users", uid=1000, gid=1001)
    st = os.stat(env.path("users"))
    assert (st.st_uid, st.st_gid) == (1000, 1001) == (e.attr.uid, e.attr.gid)
    e, o = c.create(1, b"userfile", uid=1000, gid=1001)
    assert os.stat(env.path("userfile")).st_uid == 1000
    assert c.write(e.nodeid, o.fh, 0, b"data") == 4


# -- staying inside the share ---------------------------------------------------------------


def test_names_with_slash_or_dots_are_refused(env, outside):
    c = env.client
    os.mkdir(env.path("d"))
    d = c.lookup(1, b"d").nodeid
    rel = os.path.relpath(outside / "secret", env.root).encode()
    assert c.err(Opcode.LOOKUP, 1, rel + b"\0") == errno.EINVAL
    assert c.err(Opcode.LOOKUP, d, b"../../outside/secret\0") == errno.EINVAL
    assert c.err(Opcode.MKDIR, 1, fa.MKDIR_IN.pack(0o755, 0) + b"../x\0") == errno.EINVAL
    assert c.err(Opcode.MKDIR, 1, fa.MKDIR_IN.pack(0o755, 0) + b"..\0") == errno.EINVAL
    body = fa.CreateIn(os.O_CREAT | os.O_RDWR, 0o644, 0, 0).pack() + b"../escape\0"
    assert c.err(Opcode.CREATE, 1, body) == errno.EINVAL
    assert c.err(Opcode.UNLINK, d, b"..\0") == errno.EINVAL
    assert c.err(Opcode.UNLINK, 1, rel + b"\0") == errno.EINVAL
    assert c.err(Opcode.RENAME, d, fa.RENAME_IN.pack(1) + b"../d\0x\0") == errno.EINVAL
    assert c.err(Opcode.SYMLINK, 1, b"a/b\0target\0") == errno.EINVAL
    assert c.err(Opcode.LINK, 1, fa.LINK_IN.pack(d) + b".\0") == errno.EINVAL
    assert os.listdir(outside) == ["secret"]
    assert not os.path.exists(env.path("..", "escape"))


def test_symlink_out_of_the_share_is_never_followed(env, outside):
    os.symlink(str(outside / "secret"), env.path("esc"))
    os.symlink(str(outside), env.path("escdir"))
    c = env.client
    e = c.lookup(1, b"esc")
    assert stat.S_ISLNK(e.attr.mode)
    assert e.attr.ino == os.lstat(env.path("esc")).st_ino
    assert c.ok(Opcode.READLINK, e.nodeid) == str(outside / "secret").encode()
    assert c.err(Opcode.OPEN, e.nodeid, fa.OpenIn(os.O_RDONLY, 0).pack()) == errno.ELOOP
    assert c.err(Opcode.OPEN, e.nodeid, fa.OpenIn(os.O_WRONLY | os.O_TRUNC, 0).pack()) \
        == errno.ELOOP
    body = fa.SetattrIn(int(SetattrValid.SIZE), size=0).pack()
    assert c.err(Opcode.SETATTR, e.nodeid, body) == errno.ELOOP
    body = fa.SetattrIn(int(SetattrValid.MODE), mode=0o777).pack()
    c.call(Opcode.SETATTR, e.nodeid, body)       # EOPNOTSUPP for a symlink, never the target
    body = fa.SetattrIn(int(SetattrValid.UID), uid=4444).pack()
    c.ok(Opcode.SETATTR, e.nodeid, body)           # chowns the link itself
    assert os.lstat(env.path("esc")).st_uid == 4444
    body = fa.SetattrIn(int(SetattrValid.MTIME), mtime=12345).pack()
    c.call(Opcode.SETATTR, e.nodeid, body)
    # CREATE over the link (no O_EXCL) opens nothing through it.
    body = fa.CreateIn(os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644, 0, 0).pack() + b"esc\0"
    assert c.err(Opcode.CREATE, 1, body) == errno.ELOOP
    body = fa.CreateIn(os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644, 0, 0).pack() + b"esc\0"
    assert c.err(Opcode.CREATE, 1, body) == errno.EEXIST
    # A symlink to a directory is not a directory: nothing is reachable through it.
    dl = c.lookup(1, b"escdir").nodeid
    assert c.err(Opcode.LOOKUP, dl, b"secret\0") == errno.ENOTDIR
    assert c.err(Opcode.MKDIR, dl, fa.MKDIR_IN.pack(0o755, 0) + b"new\0") == errno.ENOTDIR
    assert c.err(Opcode.UNLINK, dl, b"secret\0") == errno.ENOTDIR
    assert c.err(Opcode.OPENDIR, dl, fa.OpenIn(0, 0).pack()) == errno.ELOOP
    assert c.err(Opcode.RENAME, dl, fa.RENAME_IN.pack(1) + b"secret\0stolen\0") == errno.ENOTDIR
    assert c.err(Opcode.LINK, 1, fa.LINK_IN.pack(e.nodeid) + b"esc\0") == errno.EEXIST
    st = os.stat(outside / "secret")
    assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_uid) == (10, 0o600, 0)
    assert st.st_mtime != 12345
    assert (outside / "secret").read_bytes() == b"top secret"
    assert sorted(os.listdir(outside)) == ["secret"]


def test_directory_moved_out_of_the_share(env, outside):
    """A directory renamed outside the share behind our back keeps working as itself only."""
    os.mkdir(env.path("d"))
    c = env.client
    d = c.lookup(1, b"d").nodeid
    os.rename(env.path("d"), outside / "d")
    assert c.err(Opcode.LOOKUP, d, b"..\0") == errno.ENOENT
    assert c.err(Opcode.LOOKUP, d, b"secret\0") == errno.ENOENT


# -- options --------------------------------------------------------------------------------


def test_readonly(tmp_path):
    with open_env(tmp_path, readonly=True, xattr=True) as e:
        with open(e.path("f"), "wb") as f:
            f.write(b"data")
        os.mkdir(e.path("d"))
        c = e.client
        f = c.lookup(1, b"f").nodeid
        d = c.lookup(1, b"d").nodeid
        fh = c.open(f, os.O_RDONLY).fh
        assert c.read(f, fh, 0, 10) == b"data"
        V = SetattrValid
        refused = [
            (Opcode.MKDIR, 1, fa.MKDIR_IN.pack(0o755, 0) + b"x\0"),
            (Opcode.MKNOD, 1, fa.MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0) + b"x\0"),
            (Opcode.SYMLINK, 1, b"x\0t\0"),
            (Opcode.CREATE, 1, fa.CreateIn(os.O_CREAT | os.O_RDWR, 0o644, 0, 0).pack() + b"x\0"),
            (Opcode.CREATE, 1, fa.CreateIn(os.O_CREAT, 0o644, 0, 0).pack() + b"x\0"),
            (Opcode.UNLINK, 1, b"f\0"),
            (Opcode.RMDIR, 1, b"d\0"),
            (Opcode.RENAME, 1, fa.RENAME_IN.pack(1) + b"f\0g\0"),
            (Opcode.RENAME2, 1, fa.RENAME2_IN.pack(1, fa.RENAME_EXCHANGE) + b"f\0d\0"),
            (Opcode.LINK, 1, fa.LINK_IN.pack(f) + b"g\0"),
            (Opcode.OPEN, f, fa.OpenIn(os.O_RDWR, 0).pack()),
            (Opcode.OPEN, f, fa.OpenIn(os.O_WRONLY, 0).pack()),
            (Opcode.OPEN, f, fa.OpenIn(os.O_RDONLY | os.O_TRUNC, 0).pack()),
            (Opcode.SETATTR, f, fa.SetattrIn(int(V.SIZE), size=0).pack()),
            (Opcode.SETATTR, f, fa.SetattrIn(int(V.MODE), mode=0o777).pack()),
            (Opcode.WRITE, f, fa.WriteIn(fh, 0, 1).pack() + b"x"),
            (Opcode.FALLOCATE, f, fa.FALLOCATE_IN.pack(fh, 0, 100, 0)),
            (Opcode.COPY_FILE_RANGE, f, fa.COPY_FILE_RANGE_IN.pack(fh, 0, f, fh, 10, 2, 0)),
            (Opcode.SETXATTR, f, fa.SETXATTR_IN_COMPAT.pack(1, 0) + b"user.x\0v"),
            (Opcode.REMOVEXATTR, f, b"user.x\0"),
            (Opcode.ACCESS, f, fa.ACCESS_IN.pack(os.W_OK)),
        ]
        for op, nodeid, body in refused:
            assert c.err(op, nodeid, body) == errno.EROFS, op.name
        assert content(e.path("f")) == b"data"
        assert sorted(os.listdir(e.root)) == ["d", "f"]
        # Opening an existing file read-only through CREATE still works.
        entry, o = c.create(1, b"f", os.O_RDONLY)
        assert entry.nodeid == f and c.read(f, o.fh, 0, 4) == b"data"
        c.ok(Opcode.ACCESS, f, fa.ACCESS_IN.pack(os.R_OK))
        c.opendir(d)


def test_xattrs(env):
    cwd = os.getcwd()
    c = env.client
    e, _ = c.create(1, b"f")
    d = c.mkdir(1, b"d").nodeid
    for nodeid in (e.nodeid, d):
        c.ok(Opcode.SETXATTR, nodeid, fa.SETXATTR_IN_COMPAT.pack(5, 0) + b"user.k\0value")
        assert fa.GETXATTR_OUT.unpack(c.ok(Opcode.GETXATTR, nodeid,
                                           fa.GETXATTR_IN.pack(0) + b"user.k\0"))[0] == 5
        assert c.ok(Opcode.GETXATTR, nodeid, fa.GETXATTR_IN.pack(64) + b"user.k\0") == b"value"
        assert c.err(Opcode.GETXATTR, nodeid, fa.GETXATTR_IN.pack(2) + b"user.k\0") \
            == errno.ERANGE
        names = c.ok(Opcode.LISTXATTR, nodeid, fa.GETXATTR_IN.pack(4096))
        assert b"user.k\0" in names.split(b"\0") or names.endswith(b"user.k\0")
        size = fa.GETXATTR_OUT.unpack(c.ok(Opcode.LISTXATTR, nodeid, fa.GETXATTR_IN.pack(0)))[0]
        assert size == len(names)
        flags = os.XATTR_CREATE
        assert c.err(Opcode.SETXATTR, nodeid,
                     fa.SETXATTR_IN_COMPAT.pack(1, flags) + b"user.k\0v") == errno.EEXIST
        c.ok(Opcode.REMOVEXATTR, nodeid, b"user.k\0")
        assert c.err(Opcode.GETXATTR, nodeid, fa.GETXATTR_IN.pack(64) + b"user.k\0") \
            == errno.ENODATA
    assert os.listxattr(env.path("f")) == []
    # The value length must match the size field.
    assert c.err(Opcode.SETXATTR, e.nodeid,
                 fa.SETXATTR_IN_COMPAT.pack(9, 0) + b"user.k\0value") == errno.EINVAL
    # Symlinks and FIFOs are reached through their magic link, never opened.
    os.symlink("nowhere", env.path("lnk"))
    os.mkfifo(env.path("fifo"))
    for name in (b"lnk", b"fifo"):
        nodeid = c.lookup(1, name).nodeid
        c.ok(Opcode.SETXATTR, nodeid, fa.SETXATTR_IN_COMPAT.pack(1, 0) + b"trusted.t\0v")
        assert c.ok(Opcode.GETXATTR, nodeid, fa.GETXATTR_IN.pack(64) + b"trusted.t\0") == b"v"
        assert b"trusted.t\0" in c.ok(Opcode.LISTXATTR, nodeid, fa.GETXATTR_IN.pack(4096))
        c.ok(Opcode.REMOVEXATTR, nodeid, b"trusted.t\0")
    assert os.getcwd() == cwd        # the detour through /proc/self/fd was undone


def test_xattrs_disabled_are_enosys(tmp_path):
    with open_env(tmp_path) as e:
        c = e.client
        with open(e.path("f"), "w"):
            pass
        f = c.lookup(1, b"f").nodeid
        assert c.err(Opcode.SETXATTR, f, fa.SETXATTR_IN_COMPAT.pack(1, 0) + b"user.a\0v") \
            == errno.ENOSYS
        assert c.err(Opcode.GETXATTR, f, fa.GETXATTR_IN.pack(0) + b"user.a\0") == errno.ENOSYS
        assert c.err(Opcode.LISTXATTR, f, fa.GETXATTR_IN.pack(0)) == errno.ENOSYS
        assert c.err(Opcode.REMOVEXATTR, f, b"user.a\0") == errno.ENOSYS


@pytest.mark.parametrize("cache,timeout,file_flags,dir_flags", [
    ("never", 0, fa.OpenOutFlag.DIRECT_IO, 0),
    ("metadata", 86400, fa.OpenOutFlag.DIRECT_IO,
     fa.OpenOutFlag.CACHE_DIR | fa.OpenOutFlag.KEEP_CACHE),
    ("auto", 1, 0, 0),
    ("always", 86400, fa.OpenOutFlag.KEEP_CACHE,
     fa.OpenOutFlag.CACHE_DIR | fa.OpenOutFlag.KEEP_CACHE),
])
def test_cache_modes(tmp_path, cache, timeout, file_flags, dir_flags):
    with open_env(tmp_path, cache=cache) as e:
        c = e.client
        entry, o = c.create(1, b"f")
        assert (entry.entry_valid, entry.attr_valid) == (timeout, timeout)
        assert c.getattr(entry.nodeid).attr_valid == timeout
        assert o.open_flags == file_flags
        assert c.open(entry.nodeid).open_flags == file_flags
        out = fa.OpenOut.unpack(c.ok(Opcode.OPENDIR, 1, fa.OpenIn(0, 0).pack()))
        assert out.open_flags == dir_flags


def test_open_flag_adjustments(tmp_path):
    with open_env(tmp_path, writeback=True) as e:
        c = e.client
        entry, _ = c.create(1, b"f")
        o = c.open(entry.nodeid, os.O_WRONLY | os.O_DIRECT | os.O_APPEND)
        flags = e.arena.handles.acquire(o.fh)[2]
        e.arena.handles.release(o.fh)
        # Writeback reads pages of write-only files; O_DIRECT is not allowed by default;
        # O_APPEND is applied per write.
        assert flags & os.O_ACCMODE == os.O_RDWR
        assert not flags & (os.O_DIRECT | os.O_APPEND)
        # A write-only file the caller may not read is still opened, write-only.
        os.chmod(e.path("f"), 0o200)
        os.chown(e.path("f"), 1000, 1000)
        o = c.open(entry.nodeid, os.O_WRONLY, uid=1000, gid=1000)
        assert e.arena.handles.acquire(o.fh)[2] & os.O_ACCMODE == os.O_WRONLY
        e.arena.handles.release(o.fh)
    with open_env(tmp_path, allow_direct_io=True) as e:
        c = e.client
        entry = c.lookup(1, b"f")
        o = c.open(entry.nodeid, os.O_RDONLY | os.O_DIRECT)
        assert e.arena.handles.acquire(o.fh)[2] & os.O_DIRECT
        e.arena.handles.release(o.fh)


def test_submounts_are_announced(env):
    os.mkdir(env.path("plain"))
    os.mkdir(env.path("mnt"))
    os.mkdir(env.path("bind"))
    if subprocess.run(["mount", "-t", "tmpfs", "none", env.path("mnt")]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        subprocess.run(["mount", "--bind", env.path("plain"), env.path("bind")], check=True)
        try:
            c = env.client
            assert c.lookup(1, b"plain").attr.flags == 0
            mnt = c.lookup(1, b"mnt")
            assert mnt.attr.flags == fa.AttrFlag.SUBMOUNT
            # Same filesystem, other mount: announced too, and a node of its own.
            bind = c.lookup(1, b"bind")
            assert bind.attr.flags == fa.AttrFlag.SUBMOUNT
            assert bind.nodeid != c.lookup(1, b"plain").nodeid
            with open(env.path("mnt", "inside"), "w"):
                pass
            assert c.lookup(mnt.nodeid, b"inside").attr.flags == 0
        finally:
            subprocess.run(["umount", "-l", env.path("bind")], check=True)
    finally:
        subprocess.run(["umount", "-l", env.path("mnt")], check=True)


def test_submounts_not_announced_when_disabled(tmp_path):
    with open_env(tmp_path, announce_submounts=False) as e:
        os.mkdir(e.path("mnt"))
        if subprocess.run(["mount", "-t", "tmpfs", "none", e.path("mnt")]).returncode != 0:
            pytest.skip("cannot mount tmpfs here")
        try:
            assert e.client.lookup(1, b"mnt").attr.flags == 0
        finally:
            subprocess.run(["umount", "-l", e.path("mnt")], check=True)


def test_kill_suidgid_on_write_and_open(env):
    c = env.client
    e, o = c.create(1, b"f", mode=0o755)
    os.chmod(env.path("f"), 0o6775)
    body = fa.WriteIn(o.fh, 0, 1, fa.WRITE_KILL_SUIDGID, 0, os.O_RDWR).pack() + b"x"
    c.ok(Opcode.WRITE, e.nodeid, body)
    assert stat.S_IMODE(os.stat(env.path("f")).st_mode) == 0o775
    # Set-group-ID without group execute is a mandatory-locking mark, not a privilege: kept.
    os.chmod(env.path("f"), 0o6764)
    body = fa.OpenIn(os.O_WRONLY | os.O_TRUNC, fa.OPEN_KILL_SUIDGID).pack()
    c.ok(Opcode.OPEN, e.nodeid, body)
    assert stat.S_IMODE(os.stat(env.path("f")).st_mode) == 0o2764
    assert os.path.getsize(env.path("f")) == 0


def test_device_nodes_need_privilege(env, tmp_path):
    c = env.client
    body = fa.MKNOD_IN.pack(stat.S_IFCHR | 0o666, os.makedev(1, 3), 0) + b"null\0"
    blk = fa.MKNOD_IN.pack(stat.S_IFBLK | 0o666, os.makedev(7, 0), 0) + b"loop\0"
    # Without --allow-device-nodes not even root makes one; a whiteout is no device.
    assert c.err(Opcode.MKNOD, 1, body) == errno.EPERM
    assert c.err(Opcode.MKNOD, 1, blk) == errno.EPERM
    wh = fa.EntryOut.unpack(c.ok(Opcode.MKNOD, 1, fa.MKNOD_IN.pack(stat.S_IFCHR, 0, 0)
                                 + b"wh\0"))
    assert stat.S_ISCHR(wh.attr.mode) and wh.attr.rdev == 0
    assert sorted(os.listdir(env.root)) == ["wh"]
    with open_env(tmp_path, allow_device_nodes=True) as e2:
        c = e2.client
        os.chmod(e2.root, 0o777)
        # fsuid != 0 drops CAP_MKNOD along with the other filesystem capabilities.
        assert c.err(Opcode.MKNOD, 1, body, uid=1000, gid=1000) == errno.EPERM
        e = fa.EntryOut.unpack(c.ok(Opcode.MKNOD, 1, body))
        assert stat.S_ISCHR(e.attr.mode) and e.attr.rdev == os.makedev(1, 3)


def fd_count() -> int:
    # Objects earlier tests left for the collector close their fds when it runs: not during
    # the count.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leaks_on_success_or_error_paths(env, outside):
    c = env.client
    os.mkfifo(env.path("fifo"))
    os.symlink(str(outside / "secret"), env.path("esc"))
    os.mkdir(env.path("private"), 0o700)
    fifo = c.lookup(1, b"fifo").nodeid
    c.ok(Opcode.LISTXATTR, fifo, fa.GETXATTR_IN.pack(0))  # keeps the cwd open from now on
    c.forget(fifo, 1)
    base = fd_count()
    nodeids: list[int] = []

    def keep(e: fa.EntryOut) -> int:
        nodeids.append(e.nodeid)
        return e.nodeid

    for _ in range(3):
        fifo = keep(c.lookup(1, b"fifo"))
        esc = keep(c.lookup(1, b"esc"))
        priv = keep(c.lookup(1, b"private"))
        assert c.err(Opcode.OPEN, fifo, fa.OpenIn(os.O_RDONLY, 0).pack()) == errno.ENXIO
        assert c.err(Opcode.OPEN, esc, fa.OpenIn(os.O_RDONLY, 0).pack()) == errno.ELOOP
        assert c.err(Opcode.LOOKUP, priv, b"x\0", uid=1000, gid=1000) == errno.EACCES
        assert c.err(Opcode.LOOKUP, 1, b"missing\0") == errno.ENOENT
        body = fa.CreateIn(os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644, 0, 0).pack() + b"esc\0"
        assert c.err(Opcode.CREATE, 1, body) == errno.EEXIST
        body = fa.CreateIn(os.O_CREAT | os.O_RDWR, 0o644, 0, 0).pack() + b"esc\0"
        assert c.err(Opcode.CREATE, 1, body) == errno.ELOOP
        e, o = c.create(1, b"f")
        keep(e)
        c.ok(Opcode.SETATTR, e.nodeid, fa.SetattrIn(int(SetattrValid.SIZE), size=3).pack())
        c.ok(Opcode.SYNCFS, e.nodeid, fa.SYNCFS_IN.pack())
        c.ok(Opcode.SETXATTR, fifo, fa.SETXATTR_IN_COMPAT.pack(1, 0) + b"trusted.a\0v")
        assert c.err(Opcode.GETXATTR, e.nodeid,
                     fa.GETXATTR_IN.pack(0) + b"user.none\0") == errno.ENODATA
        c.ok(Opcode.FLUSH, e.nodeid, fa.FLUSH_IN.pack(o.fh, 0))
        c.release(e.nodeid, o.fh)
        fh = c.opendir(1)
        c.ok(Opcode.READDIRPLUS, 1, fa.ReadIn(fh, 0, 8192).pack())
        c.ok(Opcode.RELEASEDIR, 1, fa.RELEASE_IN.pack(fh, 0, 0, 0))
        c.ok(Opcode.UNLINK, 1, b"f\0")
    # Every entry READDIRPLUS returned counted a lookup too.
    for nodeid in set(nodeids):
        while True:
            try:
                nlookup = env.arena.inodes.info(nodeid)[0]
            except OSError:
                break
            c.forget(nodeid, nlookup)
    for name in (b"fifo", b"esc", b"private"):
        c.forget(c.lookup(1, name).nodeid, 1)
    assert fd_count() == base
    assert env.arena.handles.live_count() == 0


def test_xattr_of_special_file_restores_an_unsearchable_cwd(env, tmp_path):
    """The detour through /proc/self/fd returns to a cwd the caller could not enter."""
    private = tmp_path / "private-cwd"
    private.mkdir(mode=0o700)
    os.mkfifo(env.path("fifo"))
    c = env.client
    fifo = c.lookup(1, b"fifo").nodeid
    old = os.getcwd()
    os.chdir(private)
    try:
        names = c.ok(Opcode.LISTXATTR, fifo, fa.GETXATTR_IN.pack(4096), uid=1000, gid=1000)
        assert names == b""
        assert os.getcwd() == str(private)
    finally:
        os.chdir(old)
