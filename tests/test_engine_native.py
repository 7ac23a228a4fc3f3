"""The engine's native handlers against the Python reference, through two real daemons.

One daemon runs `--data-plane=native`, the other `--data-plane=python`, on two shares made
alike; every request goes to both and the replies must be byte-identical except for what two
directories cannot share (inode numbers, times, free-space counts).  The cases cover what the
native handlers serve (GETATTR, STATFS, READ, WRITE, FLUSH, ACCESS, RELEASE, RELEASEDIR, and
CREATE, MKDIR, UNLINK, RMDIR, SETATTR), their errors, and the cases they hand to Python (short
bodies, small reply buffers, O_APPEND writes, other callers' credentials, refusals Python
serves again with more groups).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from tests.frontend import Frontend, FuseClient, FuseReply
from tests.proctree import children

ROOT = fa.ROOT_ID
Op = fa.Opcode
DATA = bytes(range(256)) * 12 + b"tail"


def _seed(root: Path) -> None:
    root.mkdir()
    (root / "f").write_bytes(DATA)
    os.chmod(root / "f", 0o644)
    (root / "secret").write_bytes(b"s" * 100)
    os.chmod(root / "secret", 0o600)
    (root / "grp").write_bytes(b"g" * 10)
    os.chown(root / "grp", 0, 3000)
    os.chmod(root / "grp", 0o640)
    (root / "d").mkdir()
    (root / "d" / "inner").mkdir()
    (root / "d" / "inner" / "leaf").write_bytes(b"leaf")
    os.symlink("../f", root / "d" / "link")
    (root / "closed").mkdir(mode=0o700)
    (root / "closed" / "x").write_bytes(b"x")
    os.chmod(root / "d", 0o711)
    os.chmod(root, 0o755)


def _normal(opcode: int, r: FuseReply) -> tuple[int, bytes]:
    """The reply without what differs between two directories."""
    body = bytearray(r.body)
    if opcode in (Op.GETATTR, Op.SETATTR, Op.LOOKUP, Op.CREATE, Op.MKDIR) and not r.error:
        attr = 16 if opcode in (Op.GETATTR, Op.SETATTR) else 40
        body[attr:attr + 8] = bytes(8)                    # ino
        body[attr + 24:attr + 60] = bytes(36)             # a/m/ctime and their nsec
    if opcode == Op.READDIRPLUS and not r.error:
        pos = 0
        while pos < len(body):
            body[pos + 40:pos + 48] = bytes(8)                # attr.ino
            body[pos + 64:pos + 100] = bytes(36)              # times
            body[pos + 128:pos + 136] = bytes(8)              # dirent ino
            namelen = struct.unpack_from("<I", body, pos + 144)[0]
            pos += fa.direntplus_size(namelen)
    if opcode == Op.STATFS and not r.error:
        body[8:24] = bytes(16)                            # bfree, bavail
        body[32:40] = bytes(8)                            # ffree
    return r.error, bytes(body)


class Planes:
    """The same requests to a native-plane and a python-plane daemon."""

    def __init__(self, daemon_factory, tmp_path: Path) -> None:
        self.clients: list[FuseClient] = []
        self.fes: list[Frontend] = []
        self.daemons = []
        for plane in ("native", "python"):
            share = tmp_path / f"share-{plane}"
            _seed(share)
            # The native daemon also busy-polls (--poll-us): replies must not change.
            extra = ("--poll-us=200",) if plane == "native" else ()
            d = daemon_factory(f"--data-plane={plane}", *extra, share_dir=share)
            fe = Frontend.connect(d.socket, process=d.proc, queues=2)
            client = FuseClient(fe)
            client.init()
            self.daemons.append(d)
            self.fes.append(fe)
            self.clients.append(client)

    def close(self) -> None:
        for fe in self.fes:
            fe.close()

    def both(self, opcode: int, nodeid: int, body: bytes | list[bytes] = b"",
             **kw) -> FuseReply:
        native, python = (c.request(opcode, nodeid, body, **kw) for c in self.clients)
        assert _normal(opcode, native) == _normal(opcode, python), (Op(opcode).name, kw)
        return native

    def lookup(self, name: bytes, parent: int = ROOT) -> int:
        r = self.both(Op.LOOKUP, parent, name + b"\0")
        assert not r.error
        return fa.ENTRY_OUT.unpack_from(r.body)[0]

    def open(self, nodeid: int, flags: int, opcode: int = Op.OPEN) -> int:
        r = self.both(opcode, nodeid, fa.OPEN_IN.pack(flags, 0))
        assert not r.error
        return fa.OPEN_OUT.unpack(r.body)[0]

    def answered_natively(self, queue: int) -> int:
        """Stop a queue of the native daemon; how many requests its engine answered."""
        self.fes[0].get_vring_base(queue)
        line = self.daemons[0].wait_for(f"queue {queue}: ring stopped at")
        m = re.search(r"(\d+) request\(s\) answered natively", line)
        assert m is not None, line
        return int(m.group(1))


@pytest.fixture
def planes(daemon_factory, tmp_path: Path) -> Iterator[Planes]:
    p = Planes(daemon_factory, tmp_path)
    yield p
    p.close()
    for d in p.daemons:
        assert d.proc.poll() is None, "".join(d.log)
        assert "Traceback" not in "".join(d.log)


def _read(fh: int, offset: int, size: int) -> bytes:
    return fa.ReadIn(fh, offset, size).pack()


def _write(fh: int, offset: int, data: bytes, write_flags: int = 0,
           size: int | None = None, flags: int = os.O_RDWR) -> list[bytes]:
    # fuse_write_in.flags: the open flags of the guest's file (O_APPEND matters).
    head = fa.WRITE_IN.pack(fh, offset, len(data) if size is None else size, write_flags, 0,
                            flags)
    return [head, data]


def test_native_replies_are_the_reference_replies(planes: Planes) -> None:
    f = planes.lookup(b"f")
    secret = planes.lookup(b"secret")
    d = planes.lookup(b"d")
    fh = planes.open(f, os.O_RDWR)

    # GETATTR: inodes, an unknown nodeid, a handle, another caller, and what goes to Python.
    for nodeid in (ROOT, f, secret, d, 0x77777, 0):
        planes.both(Op.GETATTR, nodeid, fa.GETATTR_IN.pack(0, 0))
    planes.both(Op.GETATTR, f, fa.GETATTR_IN.pack(fa.GETATTR_FH, fh))
    planes.both(Op.GETATTR, f, fa.GETATTR_IN.pack(0, 0), uid=1000, gid=1000)
    planes.both(Op.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0), uid=0, gid=0)
    assert planes.both(Op.GETATTR, f, b"\0" * 8).error == errno.EINVAL
    assert planes.both(Op.GETATTR, f, fa.GETATTR_IN.pack(0, 0), out_size=40).error == errno.EIO

    # STATFS
    planes.both(Op.STATFS, ROOT)
    planes.both(Op.STATFS, d, uid=1000, gid=1000)
    assert planes.both(Op.STATFS, 0x77777).error == errno.EBADF

    # READ: within, across and past the end, bad offsets and handles, a short buffer.
    for offset, size in ((0, 4096), (1000, 100), (len(DATA) - 3, 64), (len(DATA) + 5, 10),
                         (0, 0), (1 << 63, 16), ((1 << 64) - 1, 16)):
        planes.both(Op.READ, f, _read(fh, offset, size), out_size=max(size, 1))
    planes.both(Op.READ, f, _read(fh, 0, 4096), out_size=100)      # buffer smaller than size
    assert planes.both(Op.READ, f, _read(fh + 1000, 0, 16), out_size=16).error == errno.EBADF
    assert planes.both(Op.READ, d, _read(fh, 0, 16), out_size=16).error == errno.EBADF
    assert planes.both(Op.READ, f, b"\0" * 20, out_size=16).error == errno.EINVAL
    planes.both(Op.READ, f, _read(fh, 0, 64), out_size=64, uid=1000, gid=1000)

    # WRITE: in place, bad offsets and handles, a size the request does not carry.
    r = planes.both(Op.WRITE, f, _write(fh, 10, b"hello"))
    assert r.body[:4] == struct.pack("<I", 5)
    planes.both(Op.WRITE, f, _write(fh, 1 << 63, b"x"))
    assert planes.both(Op.WRITE, f, _write(fh + 1000, 0, b"x")).error == errno.EBADF
    assert planes.both(Op.WRITE, f, _write(fh, 0, b"abc", size=4)).error == errno.EINVAL
    planes.both(Op.WRITE, f, _write(fh, len(DATA) + 10, b"gap"))  # extends the file
    planes.both(Op.WRITE, f, _write(fh, 0, b""))
    planes.both(Op.WRITE, f, _write(fh, 20, b"other caller"), uid=1000, gid=1000)
    planes.both(Op.WRITE, f, _write(fh, 40, b"kill", write_flags=fa.WRITE_KILL_SUIDGID))
    planes.both(Op.READ, f, _read(fh, 0, 8192), out_size=8192)

    # FLUSH
    planes.both(Op.FLUSH, f, fa.FLUSH_IN.pack(fh, 0))
    assert planes.both(Op.FLUSH, f, fa.FLUSH_IN.pack(fh + 1000, 0)).error == errno.EBADF
    assert planes.both(Op.FLUSH, d, fa.FLUSH_IN.pack(fh, 0)).error == errno.EBADF

    # ACCESS, as the owner and as another user (its credentials are switched to).
    for nodeid in (f, secret, d, ROOT):
        for mask in (0, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK | 0x10):
            planes.both(Op.ACCESS, nodeid, fa.ACCESS_IN.pack(mask))
            planes.both(Op.ACCESS, nodeid, fa.ACCESS_IN.pack(mask), uid=1000, gid=1000)
            planes.both(Op.ACCESS, nodeid, fa.ACCESS_IN.pack(mask), uid=1000, gid=0)
    assert planes.both(Op.ACCESS, secret, fa.ACCESS_IN.pack(os.R_OK), uid=1000,
                       gid=1000).error == errno.EACCES

    # Supplementary groups: a request with them is Python's; the next one without them, the
    # engine's, must not keep them (FUSE_EXT_GROUPS, protocol.md 4.9).
    grp = planes.lookup(b"grp")
    ext = fa.pack_supp_groups([3000])
    for _ in range(2):
        for c in planes.clients:
            unique, readable = c.build(Op.ACCESS, grp, fa.ACCESS_IN.pack(os.R_OK) + ext,
                                       uid=1000, gid=1000, total_extlen=len(ext) // 8)
            done = c.vq.wait(c.vq.submit(readable, [fa.OUT_HEADER.size, 16]))
            assert c.parse(done, unique, fa.OUT_HEADER.size + 16).error == 0
        assert planes.both(Op.ACCESS, grp, fa.ACCESS_IN.pack(os.R_OK), uid=1000,
                           gid=1000).error == errno.EACCES

    # O_APPEND writes are journaled as non-idempotent and stay with Python: same reply.
    afh = planes.open(f, os.O_WRONLY | os.O_APPEND)
    planes.both(Op.WRITE, f, _write(afh, 0, b"appended", flags=os.O_WRONLY | os.O_APPEND))
    # ... unless the kernel's page cache wrote it (WRITE_CACHE): at the offset it gives.
    planes.both(Op.WRITE, f, _write(afh, 1, b"C", write_flags=fa.WRITE_CACHE,
                                    flags=os.O_WRONLY | os.O_APPEND))
    planes.both(Op.RELEASE, f, fa.RELEASE_IN.pack(afh, os.O_WRONLY | os.O_APPEND, 0, 0))

    # RELEASE and RELEASEDIR: once, then the handle is gone.
    assert not planes.both(Op.RELEASE, f, fa.RELEASE_IN.pack(fh, os.O_RDWR, 0, 0)).error
    assert planes.both(Op.RELEASE, f, fa.RELEASE_IN.pack(fh, 0, 0, 0)).error == errno.EBADF
    assert planes.both(Op.READ, f, _read(fh, 0, 16), out_size=16).error == errno.EBADF
    dfh = planes.open(d, os.O_RDONLY | os.O_DIRECTORY, Op.OPENDIR)
    assert not planes.both(Op.RELEASEDIR, d, fa.RELEASE_IN.pack(dfh, 0, 0, 0)).error
    assert planes.both(Op.RELEASEDIR, d, fa.RELEASE_IN.pack(dfh, 0, 0, 0)).error == errno.EBADF

    # LOOKUP: nested directories, a symlink, what does not exist or cannot be named, another
    # caller's permissions (EACCES goes to Python, which retries with the directory's group).
    inner = planes.lookup(b"inner", d)
    planes.lookup(b"leaf", inner)
    planes.lookup(b"link", d)
    for parent, name, kw in ((ROOT, b"nope", {}), (ROOT, b"a/b", {}), (ROOT, b".", {}),
                             (d, b"..", {}), (ROOT, b"x" * 256, {}), (ROOT, b"x" * 255, {}),
                             (f, b"x", {}), (0x77777, b"f", {}), (d, b"inner", {"uid": 1000}),
                             (planes.lookup(b"closed"), b"x", {"uid": 1000, "gid": 1000}),
                             (ROOT, b"closed", {"uid": 1000, "gid": 1000})):
        planes.both(Op.LOOKUP, parent, name + b"\0", **kw)
    planes.both(Op.LOOKUP, ROOT, b"f")                        # no NUL: EINVAL
    planes.both(Op.LOOKUP, ROOT, b"f\0", out_size=64)         # no room: EIO
    assert planes.lookup(b"f") == f                           # the same inode, counted again

    # FORGET and BATCH_FORGET (hiprio queue, no reply): the lookup counts drop alike.
    assert planes.lookup(b"secret") == secret              # two lookups now
    for c in planes.clients:
        assert c.forget(secret, 1).used_len == 0
    planes.both(Op.GETATTR, secret, fa.GETATTR_IN.pack(0, 0))   # one lookup left
    for c in planes.clients:
        c.batch_forget([(secret, 1), (0x77777, 3), (d, 0)])
        c.forget(0x88888, 1)
    assert planes.both(Op.GETATTR, secret, fa.GETATTR_IN.pack(0, 0)).error == errno.EBADF
    planes.both(Op.GETATTR, d, fa.GETATTR_IN.pack(0, 0))

    # READDIRPLUS: whole directories, in pieces by cookie, too small a buffer, bad handles.
    for nodeid in (ROOT, d, inner):
        dfh = planes.open(nodeid, os.O_RDONLY | os.O_DIRECTORY, Op.OPENDIR)
        offset = 0
        for size in (4096, 300, 160, 1000, 0, 100):
            r = planes.both(Op.READDIRPLUS, nodeid, _read(dfh, offset, size),
                            out_size=max(size, 1))
            if not r.error and r.body:
                last = 0
                pos = 0
                while pos < len(r.body):
                    last = pos
                    pos += fa.direntplus_size(struct.unpack_from("<I", r.body, pos + 144)[0])
                offset = struct.unpack_from("<Q", r.body, last + 136)[0]
        planes.both(Op.READDIRPLUS, nodeid, _read(dfh, 0, 8192), out_size=8192)
        planes.both(Op.READDIRPLUS, nodeid, _read(dfh, 0, 4096), out_size=4096, uid=1000,
                    gid=1000)
        planes.both(Op.READDIRPLUS, nodeid, _read(dfh, 0, 4096), out_size=100)
        planes.both(Op.READDIRPLUS, nodeid, _read(dfh, 0, (1 << 20) + 1), out_size=4096)
        assert planes.both(Op.READDIRPLUS, nodeid, _read(dfh + 99, 0, 4096),
                           out_size=4096).error == errno.EBADF
        planes.both(Op.RELEASEDIR, nodeid, fa.RELEASE_IN.pack(dfh, 0, 0, 0))
    closed = planes.lookup(b"closed")
    cfh = planes.open(closed, os.O_RDONLY | os.O_DIRECTORY, Op.OPENDIR)
    planes.both(Op.READDIRPLUS, closed, _read(cfh, 0, 4096), out_size=4096, uid=1000,
                gid=1000)

    # OPEN and OPENDIR: flags stripped or kept, what cannot be opened, another caller.
    link = planes.lookup(b"link", d)
    opened: list[tuple[int, int, int]] = []
    for nodeid, flags, kw in ((f, os.O_RDONLY, {}), (f, os.O_WRONLY | os.O_DIRECT, {}),
                              (f, os.O_RDWR | os.O_NOATIME | os.O_APPEND, {}),
                              (secret, os.O_RDONLY, {"uid": 1000, "gid": 1000}),
                              (f, os.O_RDONLY, {"uid": 1000, "gid": 1000}),
                              (link, os.O_RDONLY, {}), (d, os.O_RDONLY, {}),
                              (0x77777, os.O_RDONLY, {})):
        r = planes.both(Op.OPEN, nodeid, fa.OPEN_IN.pack(flags, 0), **kw)
        if not r.error:
            opened.append((Op.RELEASE, nodeid, fa.OPEN_OUT.unpack(r.body)[0]))
    for nodeid, kw in ((d, {}), (ROOT, {}), (f, {}), (link, {}), (closed, {"uid": 1000})):
        r = planes.both(Op.OPENDIR, nodeid, fa.OPEN_IN.pack(os.O_RDONLY, 0), **kw)
        if not r.error:
            opened.append((Op.RELEASEDIR, nodeid, fa.OPEN_OUT.unpack(r.body)[0]))
    assert len(opened) == 7
    planes.both(Op.OPEN, f, fa.OPEN_IN.pack(os.O_RDWR | os.O_TRUNC, fa.OPEN_KILL_SUIDGID))
    for opcode, nodeid, handle in opened:
        assert not planes.both(opcode, nodeid, fa.RELEASE_IN.pack(handle, 0, 0, 0)).error

    # Both shares were changed alike, and the native daemon did answer natively.
    shares = [d.share for d in planes.daemons]
    assert (shares[0] / "f").read_bytes() == (shares[1] / "f").read_bytes()
    assert (shares[0] / "f").read_bytes() == b""           # truncated by the last OPEN
    assert planes.answered_natively(1) > 60
    assert planes.answered_natively(0) == 3


def test_readdirplus_of_a_large_directory_is_the_reference(planes: Planes) -> None:
    """The engine reads a directory in parts sized to the reply (so that the directory's
    position stays where the next reply starts); the entries of each reply must still be
    those Python's one getdents64 buffer yields, whatever the names' lengths and the reply
    sizes, also while names go away between two replies."""
    shares = [d.share for d in planes.daemons]
    names = [(f"{i:03d}" + "n" * (i * 37 % 253)).encode() for i in range(400)]
    for share in shares:
        (share / "big").mkdir()
        for name in names:
            (share / "big" / os.fsdecode(name)).write_bytes(b"")
    # The two directories' sizes may differ (how ext4 split them): looked up apart.
    big, other = (c.lookup(ROOT, "big").nodeid for c in planes.clients)
    assert big == other
    sizes = (4096, 1000, 8192, 600, 65536, 4096, 520, 12000)   # each fits any one entry
    for walk in range(2):
        dfh = planes.open(big, os.O_RDONLY | os.O_DIRECTORY, Op.OPENDIR)
        offset, listed, replies = 0, 0, 0
        while True:
            size = sizes[replies % len(sizes)]
            r = planes.both(Op.READDIRPLUS, big, _read(dfh, offset, size), out_size=size)
            replies += 1
            assert not r.error
            if not r.body:
                break
            pos = 0
            while pos < len(r.body):
                namelen = struct.unpack_from("<I", r.body, pos + 144)[0]
                offset = struct.unpack_from("<Q", r.body, pos + 136)[0]
                pos += fa.direntplus_size(namelen)
                listed += 1
            if walk == 1 and replies % 3 == 0:
                # Names removed behind and ahead of the listing, on both hosts alike.
                for share in shares:
                    for name in names[replies * 7:replies * 7 + 4]:
                        (share / "big" / os.fsdecode(name)).unlink(missing_ok=True)
        planes.both(Op.RELEASEDIR, big, fa.RELEASE_IN.pack(dfh, 0, 0, 0))
        if walk == 0:
            assert listed == len(names) + 2 and replies > 10


def test_both_planes_of_one_daemon_name_an_inode_alike(planes: Planes) -> None:
    """The engine reads an inode's device and number with statx, Python with fstat: the
    shared inode table must key them alike, or one inode would get two nodeids."""
    c = planes.clients[0]
    ext = fa.pack_supp_groups([3000])
    for name in (b"f", b"d", b"secret"):
        native = c.lookup(ROOT, name).nodeid
        # With supplementary groups the request is Python's.
        unique, readable = c.build(Op.LOOKUP, ROOT, name + b"\0" + ext,
                                   total_extlen=len(ext) // 8)
        done = c.vq.wait(c.vq.submit(readable, [fa.OUT_HEADER.size, fa.ENTRY_OUT.size]))
        r = c.parse(done, unique, fa.OUT_HEADER.size + fa.ENTRY_OUT.size)
        assert r.error == 0 and fa.ENTRY_OUT.unpack_from(r.body)[0] == native
        c.forget(native, 2)
    assert planes.answered_natively(1) == 3


def _setattr(valid: int, *, fh: int = 0, size: int = 0, mode: int = 0, uid: int = 0,
             gid: int = 0, atime: int = 0, mtime: int = 0) -> bytes:
    return fa.SetattrIn(valid, fh=fh, size=size, atime=atime, mtime=mtime, atimensec=5,
                        mtimensec=7, mode=mode, uid=uid, gid=gid).pack()


def test_native_changes_are_the_reference_replies(planes: Planes) -> None:
    """CREATE, MKDIR, UNLINK, RMDIR and SETATTR: served natively where nothing of Python's is
    needed, byte for byte what Python answers, and the shares end alike."""
    V = fa.SetattrValid
    native = 0                       # requests below the engine must answer itself
    d = planes.lookup(b"d")
    native += 1

    def both(opcode: int, nodeid: int, body: bytes, served: bool = True, **kw) -> FuseReply:
        nonlocal native
        native += served
        return planes.both(opcode, nodeid, body, **kw)

    def create(parent: int, name: bytes, flags: int, mode: int = 0o640, served: bool = True,
               **kw) -> FuseReply:
        return both(Op.CREATE, parent, fa.CREATE_IN.pack(flags, mode, 0o022, 0) + name + b"\0",
                    served, **kw)

    def mkdir(parent: int, name: bytes, mode: int = 0o750, served: bool = True,
              **kw) -> FuseReply:
        return both(Op.MKDIR, parent, fa.MKDIR_IN.pack(mode, 0o022) + name + b"\0", served,
                    **kw)

    # CREATE: a new file, as root and as another user (who owns it), then what exists.
    c = create(ROOT, b"new", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    assert not c.error and len(c.body) == 144
    new, new_fh = fa.ENTRY_OUT.unpack_from(c.body)[0], fa.OPEN_OUT.unpack_from(c.body, 128)[0]
    os.chmod(planes.daemons[0].share / "d", 0o777)
    os.chmod(planes.daemons[1].share / "d", 0o777)
    mine = create(d, b"mine", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o4755, uid=1000,
                  gid=1000)
    assert not mine.error and fa.ENTRY_OUT.unpack_from(mine.body)[17] == 1000   # attr.uid
    assert create(ROOT, b"new", os.O_RDWR | os.O_CREAT | os.O_EXCL).error == errno.EEXIST
    assert not create(ROOT, b"new", os.O_RDWR | os.O_CREAT, served=False).error  # opened
    assert create(ROOT, b"f/x", os.O_RDWR | os.O_CREAT, served=False).error == errno.EINVAL
    assert create(ROOT, b"x", os.O_RDWR | os.O_CREAT, uid=1000, gid=1000,
                  served=False).error == errno.EACCES      # EACCES: Python answers
    assert create(0x77777, b"x", os.O_RDWR | os.O_CREAT).error == errno.EBADF
    assert create(planes.lookup(b"f"), b"x", os.O_RDWR | os.O_CREAT).error == errno.ENOTDIR
    native += 1
    # The handle CREATE answered is a handle of the new inode.
    written = planes.both(Op.WRITE, new, _write(new_fh, 0, b"abc"))
    assert struct.unpack_from("<I", written.body)[0] == 3
    native += 1

    # MKDIR, then RMDIR of it, of what is not empty or not there, of a file.
    m = mkdir(ROOT, b"sub")
    assert not m.error
    sub = fa.ENTRY_OUT.unpack_from(m.body)[0]
    assert mkdir(ROOT, b"sub").error == errno.EEXIST
    assert not mkdir(sub, b"deeper", 0o1777).error
    assert mkdir(sub, b"theirs", uid=1000, gid=1000).error == errno.EACCES
    assert mkdir(ROOT, b"..", served=False).error == errno.EINVAL
    assert both(Op.RMDIR, ROOT, b"sub\0").error == errno.ENOTEMPTY
    assert both(Op.RMDIR, ROOT, b"new\0").error == errno.ENOTDIR
    assert both(Op.RMDIR, ROOT, b"gone\0").error == errno.ENOENT

    # SETATTR: mode, owner, size and times, on the inode and through the handle.
    for valid, kw in ((V.MODE, {"mode": 0o600}), (V.UID | V.GID, {"uid": 1000, "gid": 1001}),
                      (V.GID, {"gid": 3000}), (V.SIZE, {"size": 10}), (V.SIZE, {"size": 0}),
                      (V.ATIME | V.MTIME, {"atime": 1000, "mtime": 2000}),
                      (V.ATIME_NOW | V.MTIME, {"mtime": 3000}), (V.MODE | V.SIZE,
                                                                 {"mode": 0o644, "size": 4})):
        assert not both(Op.SETATTR, new, _setattr(valid, **kw)).error, (valid, kw)
        assert not both(Op.SETATTR, new, _setattr(valid | V.FH, fh=new_fh, **kw)).error
    assert both(Op.SETATTR, new, _setattr(V.SIZE, size=1 << 63)).error == errno.EINVAL
    assert both(Op.SETATTR, new, _setattr(V.SIZE | V.FH, fh=new_fh + 99)).error == errno.EBADF
    assert both(Op.SETATTR, sub, _setattr(V.SIZE, size=1)).error == errno.EISDIR
    assert both(Op.SETATTR, 0x77777, _setattr(V.MODE, mode=0o600)).error == errno.EBADF
    assert not both(Op.SETATTR, sub, _setattr(V.MODE | V.MTIME, mode=0o700, mtime=5)).error
    # Another user's file: refused by the host, so Python serves it again (member retry).
    secret = planes.lookup(b"secret")
    native += 1
    assert both(Op.SETATTR, secret, _setattr(V.MODE, mode=0o666), served=False, uid=1000,
                gid=1000).error == errno.EPERM
    # The owner may change the mode; a KILL_SUIDGID truncation stays with Python.
    mine_node = fa.ENTRY_OUT.unpack_from(mine.body)[0]
    assert not both(Op.SETATTR, mine_node, _setattr(V.MODE, mode=0o4700), uid=1000,
                    gid=1000).error
    assert not both(Op.SETATTR, mine_node, _setattr(V.SIZE | V.KILL_SUIDGID, size=1),
                    served=False, uid=1000, gid=1000).error
    assert both(Op.SETATTR, new, b"\0" * 40, served=False).error == errno.EINVAL

    # UNLINK: another user in a sticky-less root it may not write (Python's), a directory,
    # what is gone, then the file itself; its open handle still works.
    assert both(Op.UNLINK, ROOT, b"new\0", served=False, uid=1000,
                gid=1000).error == errno.EACCES
    assert both(Op.UNLINK, ROOT, b"sub\0").error == errno.EISDIR
    assert both(Op.UNLINK, ROOT, b"gone\0").error == errno.ENOENT
    assert not both(Op.UNLINK, ROOT, b"new\0").error
    assert not both(Op.SETATTR, new, _setattr(V.MODE | V.FH, fh=new_fh, mode=0o604)).error
    assert not both(Op.SETATTR, new, _setattr(V.MODE, mode=0o606)).error     # no name left
    assert not both(Op.UNLINK, d, b"mine\0").error
    assert not both(Op.RMDIR, sub, b"deeper\0").error
    assert not both(Op.RMDIR, ROOT, b"sub\0").error
    assert not both(Op.RELEASE, new, fa.RELEASE_IN.pack(new_fh, 0, 0, 0)).error

    # The shares changed alike.
    trees = [sorted(p.relative_to(d_.share).as_posix() for p in d_.share.rglob("*"))
             for d_ in planes.daemons]
    assert trees[0] == trees[1]
    assert planes.answered_natively(1) == native


def test_large_transfers_are_announced_one_by_one(daemon_factory, tmp_path: Path) -> None:
    """The engine announces the completions of a batch together -- unless a request moved
    64 KiB or more: a driver waiting for it must hear at once, or the ring runs dry while it
    waits for the whole batch (READ/WRITE 1 MiB at depth 4 ran at half speed so)."""
    share = tmp_path / "announced"
    _seed(share)
    d = daemon_factory(share_dir=share)
    # Without EVENT_IDX every announcement the engine makes is one write of the call eventfd.
    fe = Frontend.connect(d.socket, process=d.proc, queues=2, event_idx=False)
    try:
        c = FuseClient(fe)
        c.init()
        f = c.lookup(ROOT, "f").nodeid
        fh = c.open(f, os.O_RDWR).fh
        for big, expected in ((False, 1), (True, 6)):
            vq = c.vq
            while vq.poll():                 # nothing left over from the requests above
                pass
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(vq.call_fd)
            target = (vq.used_idx() + 6) & 0xFFFF
            size = 128 << 10 if big else 16
            tokens = [c.submit(Op.WRITE, f, _write(fh, i * size, bytes([i]) * size),
                               kick=False) for i in range(6)]
            vq.kick(force=True)
            deadline = time.monotonic() + 10
            while vq.used_idx() != target:   # the used index, not the call, says when
                assert time.monotonic() < deadline, "the requests did not complete"
            assert os.eventfd_read(vq.call_fd) == expected, big
            for t in tokens:
                r = c.result(t)
                assert r.error == 0 and struct.unpack_from("<I", r.body)[0] == size
    finally:
        fe.close()
    assert "Traceback" not in "".join(d.log)


def test_worker_killed_under_native_requests_completes_each_once(daemon_factory,
                                                                 tmp_path: Path) -> None:
    # The engine journals what it pops and pushes; a worker SIGKILLed at any point of a
    # batch of native requests leaves its successor (crash recovery, worker/recovery.py) to
    # complete every request exactly once: each WRITE lands, each LOOKUP counts once.
    share = tmp_path / "killed"
    _seed(share)
    d = daemon_factory(share_dir=share)
    fe = Frontend.connect(d.socket, process=d.proc, queues=2, queue_size=1024)
    try:
        c = FuseClient(fe)
        c.init()
        f = c.lookup(ROOT, "f").nodeid
        fh = c.open(f, os.O_RDWR).fh
        chunk = 64 << 10
        tokens = []
        for i in range(48):
            data = bytes([i]) * chunk
            tokens.append(("w", c.submit(Op.WRITE, f, _write(fh, i * chunk, data), kick=False)))
            tokens.append(("l", c.submit(Op.LOOKUP, ROOT, b"secret\0", kick=False)))
        worker = next(p for p, n in children(d.proc.pid).items() if n == "pyvfs-q1")
        c.vq.kick(force=True)
        # Killed once the batch has started (its first reply is out), wherever it then is.
        replies = {tokens[0][1]: c.result(tokens[0][1])}
        os.kill(worker, signal.SIGKILL)
        secret = 0
        for kind, token in tokens:
            r = replies[token] if token in replies else c.result(token)
            assert r.error == 0, (kind, r)
            if kind == "w":
                assert struct.unpack_from("<I", r.body)[0] == chunk
            else:
                secret = fa.ENTRY_OUT.unpack_from(r.body)[0]
        line = d.wait_for("worker for queue 1 (pid")
        assert "was killed by SIGKILL" in line, line
        data = (share / "f").read_bytes()
        assert data[:48 * chunk] == b"".join(bytes([i]) * chunk for i in range(48))
        # 48 lookups counted, no more, no fewer.
        c.forget(secret, 47)
        assert c.request(Op.GETATTR, secret, fa.GETATTR_IN.pack(0, 0)).error == 0
        c.forget(secret, 1)
        assert c.request(Op.GETATTR, secret, fa.GETATTR_IN.pack(0, 0)).error == errno.EBADF
    finally:
        fe.close()
    assert "Traceback" not in "".join(d.log)


def test_get_vring_base_inside_a_native_batch_is_exact(daemon_factory, tmp_path: Path) -> None:
    # As tests/test_pause_resume.py, with requests the engine serves itself: the ring stops
    # between two of them, every request before the index it reports is complete, none after
    # it ran, and the ring restarted there serves the rest once.
    share = tmp_path / "paused"
    _seed(share)
    d = daemon_factory(share_dir=share)
    fe = Frontend.connect(d.socket, process=d.proc, queues=2, queue_size=1024,
                          mem_size=256 << 20)
    try:
        c = FuseClient(fe)
        c.init()
        f = c.lookup(ROOT, "f").nodeid
        fh = c.open(f, os.O_RDWR | os.O_TRUNC).fh
        vq = fe.queue(1)
        start = vq.avail_idx
        chunk, count = 64 << 10, 900
        tokens = [c.submit(Op.WRITE, f, _write(fh, i * chunk, bytes([1 + i % 250]) * chunk),
                           kick=False, indirect=True) for i in range(count)]
        vq.kick(force=True)
        base = fe.get_vring_base(1)
        assert vq.used_idx() == base
        done = (base - start) & 0xFFFF
        assert (share / "f").stat().st_size == done * chunk
        fe.start_queue(1, base=base)
        for t in tokens:
            r = c.result(t)
            assert r.error == 0 and struct.unpack_from("<I", r.body)[0] == chunk
        data = (share / "f").read_bytes()
        assert data == b"".join(bytes([1 + i % 250]) * chunk for i in range(count))
        assert vq.used_idx() == vq.avail_idx and not vq.inflight
    finally:
        fe.close()
    assert "Traceback" not in "".join(d.log)
