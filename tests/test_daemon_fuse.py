"""Every FUSE opcode pyvirtiofsd serves, through its real vhost-user socket.

Each test starts a daemon on a fresh share, drives it with the test front-end
(tests/frontend.py) and checks both the reply and the effect on the host directory.  After
every test the daemon must still be running and must never have logged a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from tests.conftest import DATA_PLANES, Daemon
from tests.frontend import Frontend, FuseClient, FuseError

# Every test on both data planes: the engine must answer as the reference does.
pytestmark = pytest.mark.data_planes(*DATA_PLANES)
ROOT = fa.ROOT_ID
MIB = 1 << 20
_HANDLER_BUG = re.compile(r"failed: [A-Za-z]*(Error|Exception|Warning)\b")


@dataclass
class Session:
    daemon: Daemon
    fe: Frontend
    client: FuseClient

    @property
    def share(self) -> Path:
        return self.daemon.share


@pytest.fixture
def open_session(daemon_factory) -> Iterator:
    """open_session(*daemon_args, queues=2, **connect_kw): a daemon plus an INIT'ed client."""
    opened: list[Session] = []

    def start(*args: str, queues: int = 2, **kw) -> Session:
        d = daemon_factory(*args)
        fe = Frontend.connect(d.socket, process=d.proc, queues=queues, **kw)
        client = FuseClient(fe)
        client.init()
        s = Session(d, fe, client)
        opened.append(s)
        return s

    yield start
    for s in opened:
        alive = s.daemon.proc.poll() is None
        s.fe.close()
        assert alive, "the daemon died during the test:\n" + s.daemon.text
        assert "Traceback" not in s.daemon.text, s.daemon.text
        # A handler that raised something other than OSError is a daemon bug, even though
        # the guest only sees EIO.
        assert not _HANDLER_BUG.search(s.daemon.text), s.daemon.text
        assert "killed by" not in s.daemon.text, s.daemon.text


@pytest.fixture
def session(open_session) -> Session:
    return open_session()


def errno_of(fn, *args, **kw) -> int:
    with pytest.raises(FuseError) as ei:
        fn(*args, **kw)
    return ei.value.errno


def tree(path: Path) -> dict[str, tuple]:
    """Every entry under `path` (not following symlinks): type/mode, uid, size, nlink, content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            else:
                content = None
            xattrs = tuple(sorted(os.listxattr(p, follow_symlinks=False)))
            out[os.path.relpath(p, path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                             st.st_nlink, st.st_mtime_ns, content, xattrs)
    return out


# --- session ---------------------------------------------------------------------------


def test_init_reply(session: Session) -> None:
    out = session.client.init_out
    assert (out.major, out.minor) == (fa.KERNEL_VERSION, fa.KERNEL_MINOR_VERSION)
    assert out.max_write == MIB and out.max_pages >= MIB // 4096
    assert session.client.flags & fa.InitFlag.INIT_EXT
    # Only flags the driver offered are accepted (protocol.md 4.4).
    assert out.all_flags & ~session.client.flags == 0


def _worker_fds(daemon: Daemon) -> int:
    """Open fds in the table the workers share (the spawner's)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    name = f.read().strip()
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if name == "pyvfs-spawner" and ppid == daemon.proc.pid:
                return len(os.listdir(f"/proc/{entry}/fd"))
    raise AssertionError("no spawner process")


def _settled(*clients: FuseClient) -> None:
    """Every queue's worker has answered a request, so none is still booting (and opening
    files in the fd table the workers share) while a test counts that table."""
    for c in clients:
        c.getattr(ROOT)


@pytest.mark.parametrize("how", ["destroy", "init-again"])
def test_a_new_session_releases_the_old_ones_inodes_and_handles(session: Session,
                                                                how: str) -> None:
    c = session.client
    for i in range(20):
        (session.share / f"f{i}").write_bytes(b"x")
    idle = _worker_fds(session.daemon)
    nodes = [c.lookup(ROOT, f"f{i}").nodeid for i in range(20)]
    handles = [c.open(n, os.O_RDONLY).fh for n in nodes]
    assert _worker_fds(session.daemon) >= idle + 40
    if how == "destroy":
        c.destroy()
        # Until the next INIT every request is refused (libfuse: got_init).
        r = c.request(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0))
        assert r.error == errno.EIO
    c.init()
    assert _worker_fds(session.daemon) <= idle
    assert errno_of(c.getattr, nodes[0]) == errno.EBADF
    assert errno_of(c.read, nodes[0], handles[0], 0, 1) == errno.EBADF
    assert c.getattr(ROOT).attr.ino == os.stat(session.share).st_ino
    assert c.read(c.lookup(ROOT, "f1").nodeid, c.open(c.lookup(ROOT, "f1").nodeid).fh,
                  0, 1) == b"x"


def test_requests_before_init_get_eio(daemon_factory) -> None:
    d = daemon_factory()
    with Frontend.connect(d.socket, process=d.proc) as fe:
        c = FuseClient(fe)
        assert c.request(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0)).error == errno.EIO
        assert c.request(fa.Opcode.LOOKUP, ROOT, b"x\0").error == errno.EIO
        c.init()
        assert c.getattr(ROOT).attr.ino == os.stat(d.share).st_ino
    assert "Traceback" not in d.text


def test_init_version_negotiation(daemon_factory) -> None:
    d = daemon_factory()
    with Frontend.connect(d.socket, process=d.proc) as fe:
        c = FuseClient(fe)
        getattr_body = fa.GETATTR_IN.pack(0, 0)
        # A newer major: the daemon answers with its own and waits for another INIT.
        r = c.request(fa.Opcode.INIT, 0, fa.InitIn(8, 0, 0, 0, 0).pack())
        assert r.error == 0 and fa.InitOut.unpack(r.body).major == fa.KERNEL_VERSION
        assert c.request(fa.Opcode.GETATTR, ROOT, getattr_body).error == errno.EIO
        # Too old a major or minor: refused, no session.
        for major, minor in ((6, 40), (7, fa.MIN_KERNEL_MINOR_VERSION - 1)):
            r = c.request(fa.Opcode.INIT, 0, fa.InitIn(major, minor, 0, 0, 0).pack())
            assert r.error == errno.EPROTO
            assert c.request(fa.Opcode.GETATTR, ROOT, getattr_body).error == errno.EIO
        # An older minor within range is accepted and answered with ours (protocol.md 4.1).
        out = c.init(minor=fa.MIN_KERNEL_MINOR_VERSION)
        assert (out.major, out.minor) == (fa.KERNEL_VERSION, fa.KERNEL_MINOR_VERSION)
        assert c.getattr(ROOT).attr.ino == os.stat(d.share).st_ino
    assert "Traceback" not in d.text


def test_one_session_for_every_queue(open_session) -> None:
    s = open_session("--request-queues=2", queues=3)
    q1, q2 = s.client, FuseClient(s.fe, queue=2)
    getattr_body = fa.GETATTR_IN.pack(0, 0)
    # INIT on queue 1 started the session for queue 2 too.
    assert q2.getattr(ROOT).attr.ino == os.stat(s.share).st_ino
    q2.destroy()
    assert q1.request(fa.Opcode.GETATTR, ROOT, getattr_body).error == errno.EIO
    assert q2.request(fa.Opcode.GETATTR, ROOT, getattr_body).error == errno.EIO
    q2.init()
    assert q1.getattr(ROOT).attr.ino == os.stat(s.share).st_ino


# --- names and inodes ------------------------------------------------------------------


def test_lookup_and_getattr(session: Session) -> None:
    c = session.client
    (session.share / "f").write_bytes(b"12345")
    os.chmod(session.share / "f", 0o640)
    e = c.lookup(ROOT, "f")
    st = os.stat(session.share / "f")
    assert (e.attr.ino, e.attr.size, e.attr.mode, e.attr.nlink) == (
        st.st_ino, 5, st.st_mode, 1)
    assert e.nodeid not in (0, ROOT)
    assert c.lookup(ROOT, "f").nodeid == e.nodeid
    a = c.getattr(e.nodeid).attr
    assert (a.ino, a.size, a.mode, a.mtime, a.mtimensec) == (
        st.st_ino, 5, st.st_mode, st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9)
    # A change on the host is seen by the next GETATTR.
    (session.share / "f").write_bytes(b"1234567")
    assert c.getattr(e.nodeid).attr.size == 7
    assert c.getattr(ROOT).attr.ino == os.stat(session.share).st_ino
    assert errno_of(c.lookup, ROOT, "missing") == errno.ENOENT
    # '.' names the directory itself.
    assert c.lookup(ROOT, ".").attr.ino == os.stat(session.share).st_ino


def test_forget_and_batch_forget(session: Session) -> None:
    c = session.client
    for name in "abc":
        (session.share / name).write_text(name)
    a = c.lookup(ROOT, "a").nodeid
    c.lookup(ROOT, "a")
    c.lookup(ROOT, "a")
    done = c.forget(a, 2)
    assert done.used_len == 0
    assert c.getattr(a).attr.size == 1           # one lookup left
    c.forget(a, 1)
    assert errno_of(c.getattr, a) == errno.EBADF
    b, cc = c.lookup(ROOT, "b").nodeid, c.lookup(ROOT, "c").nodeid
    c.lookup(ROOT, "c")
    assert c.batch_forget([(b, 1), (cc, 1)]).used_len == 0
    assert errno_of(c.getattr, b) == errno.EBADF
    assert c.getattr(cc).attr.size == 1
    c.batch_forget([(cc, 1)])
    assert errno_of(c.getattr, cc) == errno.EBADF
    # The files themselves are untouched, and a new lookup works again.
    assert sorted(p.name for p in session.share.iterdir()) == ["a", "b", "c"]
    assert c.getattr(c.lookup(ROOT, "a").nodeid).attr.size == 1
    # The largest count drops every lookup at once.
    d = c.lookup(ROOT, "a").nodeid
    c.lookup(ROOT, "a")
    c.forget(d, (1 << 64) - 1)
    assert errno_of(c.getattr, d) == errno.EBADF
    # The root is never dropped, and forgetting unknown ids is harmless.
    c.forget(ROOT, 1000)
    c.forget(0xDEAD_BEEF, 1)
    c.batch_forget([])
    c.batch_forget([(0, 1), ((1 << 64) - 1, 5)])
    # A BATCH_FORGET whose count overruns its body is ignored as a whole.
    b2 = c.lookup(ROOT, "b").nodeid
    body = fa.BATCH_FORGET_IN.pack(1000) + fa.FORGET_ONE.pack(b2, 1)
    _unique, readable = c.build(fa.Opcode.BATCH_FORGET, 0, body)
    assert session.fe.queue(0).request([b"".join(readable)]).used_len == 0
    assert c.getattr(b2).attr.size == 1
    assert c.getattr(ROOT).attr.ino == os.stat(session.share).st_ino


def test_setattr(session: Session) -> None:
    c = session.client
    p = session.share / "f"
    p.write_bytes(b"0123456789")
    node = c.lookup(ROOT, "f").nodeid
    assert stat.S_IMODE(c.setattr(node, mode=0o4710).attr.mode) == 0o4710
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4710
    a = c.setattr(node, uid=1234, gid=4321).attr
    assert (a.uid, a.gid) == (1234, 4321)
    assert (os.stat(p).st_uid, os.stat(p).st_gid) == (1234, 4321)
    assert c.setattr(node, size=4).attr.size == 4
    assert p.read_bytes() == b"0123"
    a = c.setattr(node, atime=(1_000_000, 5), mtime=(2_000_000, 7)).attr
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000 * 10**9 + 5, 2_000_000 * 10**9 + 7)
    assert (a.atime, a.mtime, a.mtimensec) == (1_000_000, 2_000_000, 7)
    # Through an open handle too.
    fh = c.open(node, os.O_RDWR).fh
    assert c.setattr(node, size=2, fh=fh).attr.size == 2
    assert p.read_bytes() == b"01"
    c.release(node, fh)
    # A directory cannot be truncated.
    d = c.mkdir(ROOT, "d").nodeid
    assert errno_of(c.setattr, d, size=0) == errno.EISDIR


def test_symlink_and_readlink(session: Session) -> None:
    c = session.client
    e = c.symlink(ROOT, "ln", "some/target")
    assert stat.S_ISLNK(e.attr.mode) and e.attr.size == len("some/target")
    assert os.readlink(session.share / "ln") == "some/target"
    assert c.readlink(e.nodeid) == b"some/target"
    os.symlink("/host/made", session.share / "ln2")
    assert c.readlink(c.lookup(ROOT, "ln2").nodeid) == b"/host/made"
    assert errno_of(c.symlink, ROOT, "ln", "other") == errno.EEXIST
    assert os.readlink(session.share / "ln") == "some/target"
    # READLINK of something that is not a symlink (readlinkat(fd, "") says ENOENT).
    (session.share / "f").touch()
    assert errno_of(c.readlink, c.lookup(ROOT, "f").nodeid) in (errno.EINVAL, errno.ENOENT)


def test_mknod(session: Session) -> None:
    c = session.client
    fifo = c.mknod(ROOT, "fifo", stat.S_IFIFO | 0o640)
    st = os.lstat(session.share / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert fifo.attr.ino == st.st_ino
    reg = c.mknod(ROOT, "reg", stat.S_IFREG | 0o600)
    assert stat.S_ISREG(os.lstat(session.share / "reg").st_mode) and reg.attr.size == 0
    # umask from the request is applied by the guest, not again here (DONT_MASK not offered).
    c.mknod(ROOT, "reg2", stat.S_IFREG | 0o666, umask=0o022)
    assert stat.S_IMODE(os.lstat(session.share / "reg2").st_mode) == 0o666
    assert errno_of(c.mknod, ROOT, "fifo", stat.S_IFIFO | 0o600) == errno.EEXIST
    # A FIFO is never opened by the daemon (it would block a worker).
    assert errno_of(c.open, fifo.nodeid, os.O_RDONLY) == errno.ENXIO


def test_mkdir_and_rmdir(session: Session) -> None:
    c = session.client
    e = c.mkdir(ROOT, "d", 0o750)
    st = os.stat(session.share / "d")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert (e.attr.ino, e.attr.nlink) == (st.st_ino, 2)
    assert os.stat(session.share).st_nlink == 3
    assert errno_of(c.mkdir, ROOT, "d") == errno.EEXIST
    c.mkdir(e.nodeid, "inner")
    assert (session.share / "d" / "inner").is_dir()
    assert errno_of(c.rmdir, ROOT, "d") == errno.ENOTEMPTY
    assert (session.share / "d" / "inner").is_dir()
    c.rmdir(e.nodeid, "inner")
    c.rmdir(ROOT, "d")
    assert not (session.share / "d").exists()
    assert errno_of(c.rmdir, ROOT, "d") == errno.ENOENT
    (session.share / "f").touch()
    assert errno_of(c.rmdir, ROOT, "f") == errno.ENOTDIR
    assert errno_of(c.mkdir, 0xFFFF_FFFF, "x") == errno.EBADF


def test_unlink(session: Session) -> None:
    c = session.client
    (session.share / "f").write_bytes(b"x")
    node = c.lookup(ROOT, "f").nodeid
    c.unlink(ROOT, "f")
    assert not (session.share / "f").exists()
    assert errno_of(c.unlink, ROOT, "f") == errno.ENOENT
    # The inode stays usable while the guest holds a lookup of it.
    assert c.getattr(node).attr.nlink == 0
    (session.share / "d").mkdir()
    assert errno_of(c.unlink, ROOT, "d") in (errno.EISDIR, errno.EPERM)
    assert (session.share / "d").is_dir()


def test_rename(session: Session) -> None:
    c = session.client
    (session.share / "a").write_bytes(b"A")
    (session.share / "b").write_bytes(b"B")
    sub = c.mkdir(ROOT, "sub").nodeid
    c.rename(ROOT, "a", sub, "a2")
    assert not (session.share / "a").exists()
    assert (session.share / "sub" / "a2").read_bytes() == b"A"
    # Plain RENAME replaces the target.
    c.rename(sub, "a2", ROOT, "b")
    assert (session.share / "b").read_bytes() == b"A"
    assert sorted(p.name for p in session.share.iterdir()) == ["b", "sub"]
    assert errno_of(c.rename, ROOT, "nope", ROOT, "x") == errno.ENOENT
    (session.share / "sub" / "x").touch()
    (session.share / "full").mkdir()
    (session.share / "full" / "y").touch()
    assert errno_of(c.rename, ROOT, "sub", ROOT, "full") == errno.ENOTEMPTY


def test_rename2_flags(session: Session) -> None:
    c = session.client
    (session.share / "a").write_bytes(b"A")
    (session.share / "b").write_bytes(b"B")
    assert errno_of(c.rename2, ROOT, "a", ROOT, "b", fa.RENAME_NOREPLACE) == errno.EEXIST
    assert (session.share / "b").read_bytes() == b"B"
    c.rename2(ROOT, "a", ROOT, "c", fa.RENAME_NOREPLACE)
    assert (session.share / "c").read_bytes() == b"A" and not (session.share / "a").exists()
    c.rename2(ROOT, "b", ROOT, "c", fa.RENAME_EXCHANGE)
    assert (session.share / "b").read_bytes() == b"A"
    assert (session.share / "c").read_bytes() == b"B"
    assert errno_of(c.rename2, ROOT, "b", ROOT, "none", fa.RENAME_EXCHANGE) == errno.ENOENT
    # WHITEOUT leaves a 0:0 character device in place of the source (overlayfs).
    c.rename2(ROOT, "b", ROOT, "w", fa.RENAME_WHITEOUT)
    st = os.lstat(session.share / "b")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (session.share / "w").read_bytes() == b"A"
    assert errno_of(c.rename2, ROOT, "w", ROOT, "x", 1 << 7) == errno.EINVAL
    assert (session.share / "w").exists()


def test_link(session: Session) -> None:
    c = session.client
    (session.share / "f").write_bytes(b"data")
    node = c.lookup(ROOT, "f").nodeid
    sub = c.mkdir(ROOT, "sub").nodeid
    e = c.link(node, sub, "hard")
    assert e.nodeid == node and e.attr.nlink == 2
    assert os.stat(session.share / "f").st_nlink == 2
    assert os.path.samefile(session.share / "f", session.share / "sub" / "hard")
    assert errno_of(c.link, node, sub, "hard") == errno.EEXIST
    assert errno_of(c.link, sub, ROOT, "dirlink") == errno.EPERM
    assert c.getattr(node).attr.nlink == 2


# --- files -----------------------------------------------------------------------------


def test_create(session: Session) -> None:
    c = session.client
    e, o = c.create(ROOT, "new", 0o640)
    st = os.stat(session.share / "new")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert e.attr.ino == st.st_ino and o.fh != 0
    assert c.write(e.nodeid, o.fh, 0, b"via create") == 10
    assert (session.share / "new").read_bytes() == b"via create"
    c.release(e.nodeid, o.fh)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    assert errno_of(c.create, ROOT, "new", flags=flags) == errno.EEXIST
    # Without O_EXCL an existing file is opened (and here truncated).
    e2, o2 = c.create(ROOT, "new", flags=os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    assert e2.nodeid == e.nodeid and (session.share / "new").read_bytes() == b""
    c.release(e2.nodeid, o2.fh)
    assert errno_of(c.create, 0x7777, "x") == errno.EBADF
    assert not (session.share / "x").exists()


def test_open_read_write_flush_fsync_release(session: Session) -> None:
    c = session.client
    p = session.share / "f"
    p.write_bytes(b"host bytes")
    node = c.lookup(ROOT, "f").nodeid
    ro = c.open(node, os.O_RDONLY).fh
    assert c.read(node, ro, 0, 100) == b"host bytes"
    assert c.read(node, ro, 5, 3) == b"byt"
    assert c.read(node, ro, 100, 10) == b""
    # A read-only handle does not write.
    assert errno_of(c.write, node, ro, 0, b"x") == errno.EBADF
    rw = c.open(node, os.O_RDWR).fh
    assert ro != rw
    assert c.write(node, rw, 5, b"BYTES, more") == 11
    assert p.read_bytes() == b"host BYTES, more"
    assert c.read(node, ro, 0, 100) == b"host BYTES, more"
    c.flush(node, rw)
    c.fsync(node, rw)
    c.fsync(node, rw, datasync=True)
    c.release(node, rw)
    c.release(node, ro)
    # Released handles are gone.
    assert errno_of(c.read, node, rw, 0, 1) == errno.EBADF
    assert errno_of(c.release, node, ro) == errno.EBADF
    # O_TRUNC on open truncates on the host; O_APPEND appends there.
    fh = c.open(node, os.O_WRONLY | os.O_TRUNC).fh
    assert p.read_bytes() == b""
    c.write(node, fh, 0, b"abc")
    c.release(node, fh)
    flags = os.O_WRONLY | os.O_APPEND
    fh = c.open(node, flags).fh
    # The kernel puts the file's open flags in fuse_write_in.flags.
    c.call(fa.Opcode.WRITE, node, [fa.WriteIn(fh, 0, 3, 0, 0, flags).pack(), b"def"])
    c.release(node, fh)
    assert p.read_bytes() == b"abcdef"
    # A directory is not opened as a file for writing.
    d = c.mkdir(ROOT, "d").nodeid
    assert errno_of(c.open, d, os.O_RDWR) == errno.EISDIR


def test_handle_belongs_to_its_inode(session: Session) -> None:
    c = session.client
    (session.share / "a").write_bytes(b"AAAA")
    (session.share / "b").write_bytes(b"BBBB")
    a, b = c.lookup(ROOT, "a").nodeid, c.lookup(ROOT, "b").nodeid
    fa_ = c.open(a, os.O_RDWR).fh
    # An fh used with another nodeid is refused, not served on the wrong file.
    assert errno_of(c.read, b, fa_, 0, 4) == errno.EBADF
    assert errno_of(c.write, b, fa_, 0, b"x") == errno.EBADF
    assert (session.share / "b").read_bytes() == b"BBBB"


def test_statfs(session: Session) -> None:
    s = session.client.statfs()
    v = os.statvfs(session.share)
    assert (s.bsize, s.namelen, s.frsize, s.blocks) == (v.f_bsize, v.f_namemax, v.f_frsize,
                                                         v.f_blocks)
    assert s.files == v.f_files and s.bfree > 0


def test_access(session: Session) -> None:
    c = session.client
    p = session.share / "f"
    p.write_bytes(b"")
    os.chmod(p, 0o600)
    node = c.lookup(ROOT, "f").nodeid
    c.access(node, os.R_OK | os.W_OK)
    c.access(node, os.F_OK)
    # Root without any x bit set cannot execute.
    assert errno_of(c.access, node, os.X_OK) == errno.EACCES
    os.chown(p, 1000, 1000)
    r = c.request(fa.Opcode.ACCESS, node, fa.ACCESS_IN.pack(os.R_OK), uid=1000, gid=1000)
    assert r.error == 0
    r = c.request(fa.Opcode.ACCESS, node, fa.ACCESS_IN.pack(os.R_OK), uid=1001, gid=1001)
    assert r.error == errno.EACCES


def test_fallocate(session: Session) -> None:
    c = session.client
    e, o = c.create(ROOT, "f")
    c.fallocate(e.nodeid, o.fh, 0, 3 * 4096)
    st = os.stat(session.share / "f")
    assert st.st_size == 3 * 4096 and st.st_blocks * 512 >= 3 * 4096
    # KEEP_SIZE allocates past EOF without changing the size.
    c.fallocate(e.nodeid, o.fh, 3 * 4096, 4096, mode=1)
    assert os.stat(session.share / "f").st_size == 3 * 4096
    # PUNCH_HOLE | KEEP_SIZE turns data back into zeros.
    c.write(e.nodeid, o.fh, 0, b"\xff" * 8192)
    c.fallocate(e.nodeid, o.fh, 0, 4096, mode=0x2 | 0x1)
    assert (session.share / "f").read_bytes()[:8192] == bytes(4096) + b"\xff" * 4096
    ro = c.open(e.nodeid, os.O_RDONLY).fh
    assert errno_of(c.fallocate, e.nodeid, ro, 0, 8192 * 4) == errno.EBADF


def test_lseek_data_and_hole(session: Session) -> None:
    c = session.client
    p = session.share / "sparse"
    with open(p, "wb") as f:
        f.write(b"d" * 4096)
        f.seek(MIB)
        f.write(b"e" * 4096)
    node = c.lookup(ROOT, "sparse").nodeid
    fh = c.open(node, os.O_RDONLY).fh
    hole = c.lseek(node, fh, 0, os.SEEK_HOLE)
    data = c.lseek(node, fh, hole, os.SEEK_DATA)
    assert 4096 <= hole < MIB and hole < data <= MIB
    with open(p, "rb") as f:
        assert hole == os.lseek(f.fileno(), 0, os.SEEK_HOLE)
        assert data == os.lseek(f.fileno(), hole, os.SEEK_DATA)
    assert c.lseek(node, fh, data, os.SEEK_HOLE) == MIB + 4096
    assert c.lseek(node, fh, 0, os.SEEK_END) == MIB + 4096
    assert c.lseek(node, fh, 123, os.SEEK_SET) == 123
    assert errno_of(c.lseek, node, fh, MIB + 4096, os.SEEK_DATA) == errno.ENXIO


def test_copy_file_range(session: Session) -> None:
    c = session.client
    (session.share / "src").write_bytes(b"0123456789")
    src = c.lookup(ROOT, "src").nodeid
    fin = c.open(src, os.O_RDONLY).fh
    e, fout = c.create(ROOT, "dst")
    assert c.copy_file_range(src, fin, 2, e.nodeid, fout.fh, 4, 5) == 5
    assert (session.share / "dst").read_bytes() == bytes(4) + b"23456"
    assert (session.share / "src").read_bytes() == b"0123456789"
    # Into a read-only handle: refused, nothing copied.
    assert errno_of(c.copy_file_range, e.nodeid, fout.fh, 0, src, fin, 0, 3) == errno.EBADF
    assert (session.share / "src").read_bytes() == b"0123456789"


def test_syncfs(session: Session) -> None:
    c = session.client
    (session.share / "f").write_bytes(b"x")
    c.syncfs()
    c.syncfs(c.lookup(ROOT, "f").nodeid)
    assert errno_of(c.syncfs, 0x4242) == errno.EBADF


# --- directories -----------------------------------------------------------------------


def test_opendir_readdir_readdirplus_fsyncdir_releasedir(session: Session) -> None:
    c = session.client
    (session.share / "file").write_bytes(b"x")
    (session.share / "dir").mkdir()
    os.symlink("file", session.share / "link")
    dh = c.opendir(ROOT).fh
    ents = {d.name: d for d in c.readdir_all(ROOT, dh)}
    assert ents.keys() == {b".", b"..", b"file", b"dir", b"link"}
    assert ents[b"file"].type == stat.S_IFREG >> 12
    assert ents[b"dir"].type == stat.S_IFDIR >> 12
    assert ents[b"link"].type == stat.S_IFLNK >> 12
    assert ents[b"file"].ino == os.stat(session.share / "file").st_ino
    # Offsets are cookies: resuming after the second entry skips the first two.
    listing = c.readdir(ROOT, dh)
    assert [d.name for d in c.readdir(ROOT, dh, listing[1].off)] == [
        d.name for d in listing[2:]]
    plus = {p.dirent.name: p for p in c.readdirplus(ROOT, dh)}
    assert plus.keys() == ents.keys()
    f = plus[b"file"].entry
    assert f.nodeid != 0 and f.attr.ino == os.stat(session.share / "file").st_ino
    assert f.attr.size == 1
    # READDIRPLUS counted a lookup: the nodeid works until forgotten.
    assert c.getattr(f.nodeid).attr.size == 1
    assert plus[b"."].entry.nodeid == 0
    c.fsyncdir(ROOT, dh)
    c.fsyncdir(ROOT, dh, datasync=True)
    c.releasedir(ROOT, dh)
    assert errno_of(c.readdir, ROOT, dh) == errno.EBADF
    sub = c.lookup(ROOT, "dir").nodeid
    sh = c.opendir(sub).fh
    assert {d.name for d in c.readdir_all(sub, sh)} == {b".", b".."}
    c.releasedir(sub, sh)
    assert errno_of(c.opendir, c.lookup(ROOT, "file").nodeid) == errno.ENOTDIR


def test_readdir_of_3000_entries(session: Session) -> None:
    c = session.client
    big = session.share / "big"
    big.mkdir()
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(3000)}
    for n in names:
        (big / n).touch()
    node = c.lookup(ROOT, "big").nodeid
    dh = c.opendir(node).fh
    got = [d.name.decode() for d in c.readdir_all(node, dh)]
    assert len(got) == 3002 and set(got) == names | {".", ".."}
    # Larger buffers, same listing.
    got = [d.name.decode() for d in c.readdir_all(node, dh, size=64 * 1024)]
    assert len(got) == 3002 and set(got) == names | {".", ".."}
    # READDIRPLUS all the way through, following cookies.
    seen: dict[str, int] = {}
    offset = 0
    while True:
        batch = c.readdirplus(node, dh, offset, 32 * 1024)
        if not batch:
            break
        for p in batch:
            seen[p.dirent.name.decode()] = p.entry.nodeid
        offset = batch[-1].dirent.off
    assert seen.keys() == names | {".", ".."}
    nodeids = [n for name, n in seen.items() if name not in (".", "..")]
    assert len(set(nodeids)) == 3000 and 0 not in nodeids
    c.batch_forget([(n, 1) for n in nodeids[:1000]])
    assert errno_of(c.getattr, nodeids[0]) == errno.EBADF
    assert c.getattr(nodeids[-1]).attr.size == 0
    c.releasedir(node, dh)


# --- extended attributes ---------------------------------------------------------------


def test_xattr_ops(open_session) -> None:
    s = open_session("--xattr")
    c = s.client
    p = s.share / "f"
    p.write_bytes(b"")
    node = c.lookup(ROOT, "f").nodeid
    c.setxattr(node, "user.one", b"value-1")
    c.setxattr(node, "user.two", b"")
    assert os.getxattr(p, "user.one") == b"value-1"
    assert c.getxattr(node, "user.one") == b"value-1"
    assert c.getxattr(node, "user.one", 0) == 7
    assert errno_of(c.getxattr, node, "user.one", 3) == errno.ERANGE
    assert set(c.listxattr(node)) >= {b"user.one", b"user.two"}
    assert c.listxattr(node, 0) == len(b"user.one\0user.two\0")
    os.setxattr(p, "user.host", b"h")
    assert c.getxattr(node, "user.host") == b"h"
    # XATTR_CREATE on an existing name; XATTR_REPLACE on a missing one.
    assert errno_of(c.setxattr, node, "user.one", b"x", flags=1) == errno.EEXIST
    assert errno_of(c.setxattr, node, "user.nope", b"x", flags=2) == errno.ENODATA
    c.removexattr(node, "user.one")
    assert "user.one" not in os.listxattr(p)
    assert errno_of(c.getxattr, node, "user.one") == errno.ENODATA
    assert errno_of(c.removexattr, node, "user.one") == errno.ENODATA
    # On a directory, and on a symlink itself (never its target).
    d = c.mkdir(ROOT, "d").nodeid
    c.setxattr(d, "user.d", b"dir")
    assert os.getxattr(s.share / "d", "user.d") == b"dir"
    os.symlink("f", s.share / "ln")
    ln = c.lookup(ROOT, "ln").nodeid
    assert errno_of(c.setxattr, ln, "user.x", b"1") == errno.EPERM   # user.* not on symlinks
    assert "user.x" not in os.listxattr(p)


def test_xattr_ops_without_xattr_option_are_enosys(session: Session) -> None:
    c = session.client
    p = session.share / "f"
    p.write_bytes(b"")
    os.setxattr(p, "user.k", b"v")
    node = c.lookup(ROOT, "f").nodeid
    assert errno_of(c.setxattr, node, "user.new", b"x") == errno.ENOSYS
    assert errno_of(c.getxattr, node, "user.k") == errno.ENOSYS
    assert errno_of(c.listxattr, node) == errno.ENOSYS
    assert errno_of(c.removexattr, node, "user.k") == errno.ENOSYS
    assert os.listxattr(p) == ["user.k"]


# --- interrupts, unknown opcodes, stale ids ----------------------------------------------


def test_interrupt_is_harmless(session: Session) -> None:
    c = session.client
    fe = session.fe
    (session.share / "f").write_bytes(b"abc")
    node = c.lookup(ROOT, "f").nodeid
    fh = c.open(node, os.O_RDONLY).fh
    # INTERRUPT of a request that completed, one never sent, on hiprio and on a request queue:
    # no reply (used.len 0), nothing else disturbed.
    for unique in (2, 0x1234_5678, 0):
        done = c._hiprio(fa.Opcode.INTERRUPT, 0, fa.INTERRUPT_IN.pack(unique))
        assert done.used_len == 0
    _unique, readable = c.build(fa.Opcode.INTERRUPT, 0, fa.INTERRUPT_IN.pack(4))
    done = fe.queue(1).request(readable, [fa.OUT_HEADER.size])
    assert done.used_len == 0
    assert c.read(node, fh, 0, 10) == b"abc"
    assert c.getattr(node).attr.size == 3


def test_unknown_opcodes_are_enosys(session: Session) -> None:
    for opcode in (7, 19, 999, 4096, 0x7FFF_FFFF):
        r = session.client.request(opcode, ROOT, b"\0" * 16, out_size=64)
        assert r == (errno.ENOSYS, b""), opcode
        assert session.client.getattr(ROOT).attr.ino == os.stat(session.share).st_ino


def test_never_issued_nodeids_and_handles_are_ebadf(session: Session) -> None:
    c = session.client
    (session.share / "f").write_bytes(b"abc")
    node = c.lookup(ROOT, "f").nodeid
    for bogus in (0, 2, 0xFFFF, 1 << 40, (1 << 64) - 1):
        if bogus == node:
            continue
        assert errno_of(c.getattr, bogus) == errno.EBADF
        assert errno_of(c.lookup, bogus, "f") == errno.EBADF
        assert errno_of(c.open, bogus, os.O_RDONLY) == errno.EBADF
    for fh in (0, 1, 77, 1 << 40):
        assert errno_of(c.read, node, fh, 0, 3) == errno.EBADF
        assert errno_of(c.write, node, fh, 0, b"x") == errno.EBADF
        assert errno_of(c.release, node, fh) == errno.EBADF
        assert errno_of(c.readdir, ROOT, fh) == errno.EBADF
    assert (session.share / "f").read_bytes() == b"abc"


def test_device_nodes_are_created_but_never_opened(open_session) -> None:
    session = open_session("--allow-device-nodes")
    c = session.client
    e = c.mknod(ROOT, "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = os.lstat(session.share / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert e.attr.rdev == os.makedev(1, 3)
    for flags in (os.O_RDONLY, os.O_RDWR):
        assert errno_of(c.open, e.nodeid, flags) == errno.ENXIO
    assert errno_of(c.setattr, e.nodeid, size=0) == errno.ENXIO


def test_framing_errors(session: Session) -> None:
    c = session.client
    vq = c.vq
    e, o = c.create(ROOT, "f")

    def raw(opcode: int, nodeid: int, body: bytes, length: int | None = None,
            out: int = 64) -> tuple[int, bytes]:
        unique, readable = c.build(opcode, nodeid, body, length=length)
        done = vq.wait(vq.submit(readable, [fa.OUT_HEADER.size, out] if out else []))
        if not out:
            return done.used_len, b""
        return c.parse(done, unique, fa.OUT_HEADER.size + out)

    getattr_in = fa.GETATTR_IN.pack(0, 0)
    # in.len beyond the chain, or shorter than the header: the request cannot be decoded.
    assert raw(fa.Opcode.GETATTR, ROOT, getattr_in, length=40 + 16 + 1)[0] == errno.EIO
    assert raw(fa.Opcode.GETATTR, ROOT, getattr_in, length=39)[0] == errno.EIO
    # Bodies too short, names without their NUL, WRITE data shorter than its size.
    assert raw(fa.Opcode.GETATTR, ROOT, b"\0" * 8)[0] == errno.EINVAL
    assert raw(fa.Opcode.LOOKUP, ROOT, b"f")[0] == errno.EINVAL
    assert raw(fa.Opcode.MKDIR, ROOT, fa.MKDIR_IN.pack(0o755, 0) + b"d")[0] == errno.EINVAL
    assert raw(fa.Opcode.WRITE, e.nodeid, fa.WriteIn(o.fh, 0, 100).pack() + b"x" * 10,
               out=8)[0] == errno.EINVAL
    assert os.path.getsize(session.share / "f") == 0
    assert not (session.share / "d").exists()
    # A reply that does not fit the writable buffers: only an EIO header.
    assert raw(fa.Opcode.GETATTR, ROOT, getattr_in, out=10) == (errno.EIO, b"")
    # No writable buffer at all: nothing can be written, the chain still comes back.
    assert raw(fa.Opcode.GETATTR, ROOT, getattr_in, out=0)[0] == 0
    assert c.getattr(ROOT).attr.ino == os.stat(session.share).st_ino


# --- permissions and read-only -----------------------------------------------------------


def test_other_uid_gets_eacces(session: Session) -> None:
    c = session.client
    secret = session.share / "secret"
    secret.mkdir(mode=0o700)
    (secret / "inside").write_bytes(b"root only")
    os.chmod(secret / "inside", 0o600)
    (session.share / "rootfile").write_bytes(b"r")
    os.chmod(session.share / "rootfile", 0o600)
    before = tree(session.share)
    node = c.lookup(ROOT, "secret").nodeid
    rf = c.lookup(ROOT, "rootfile").nodeid
    as_user = {"uid": 1000, "gid": 1000}
    op = fa.Opcode
    assert c.request(op.LOOKUP, node, b"inside\0", **as_user).error == errno.EACCES
    assert c.request(op.MKDIR, node, fa.MKDIR_IN.pack(0o755, 0) + b"x\0",
                     **as_user).error == errno.EACCES
    assert c.request(op.CREATE, node, fa.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0)
                     + b"x\0", **as_user).error == errno.EACCES
    assert c.request(op.OPENDIR, node, fa.OPEN_IN.pack(os.O_RDONLY, 0),
                     **as_user).error == errno.EACCES
    assert c.request(op.OPEN, rf, fa.OPEN_IN.pack(os.O_RDONLY, 0),
                     **as_user).error == errno.EACCES
    assert c.request(op.SETATTR, rf, fa.SetattrIn(fa.SetattrValid.MODE, mode=0o666).pack(),
                     **as_user).error == errno.EPERM
    assert c.request(op.UNLINK, ROOT, b"rootfile\0", **as_user).error == errno.EACCES
    assert tree(session.share) == before
    # Root itself still gets in, and the ids in force were restored for it.
    assert c.lookup(node, "inside").attr.size == 9
    e = c.mkdir(ROOT, "byroot")
    assert (e.attr.uid, os.stat(session.share / "byroot").st_uid) == (0, 0)


def test_files_created_for_a_uid_belong_to_it(session: Session) -> None:
    c = session.client
    os.chmod(session.share, 0o777)
    body = fa.MKDIR_IN.pack(0o755, 0) + b"userdir\0"
    r = c.request(fa.Opcode.MKDIR, ROOT, body, uid=1000, gid=1001)
    assert r.error == 0
    st = os.stat(session.share / "userdir")
    assert (st.st_uid, st.st_gid) == (1000, 1001)


def _with_groups(c: FuseClient, opcode: int, nodeid: int, body: bytes, groups: list[int],
                 out_size: int, uid: int, gid: int) -> tuple[int, bytes]:
    """A request carrying a FUSE_EXT_GROUPS extension (protocol.md 4.9)."""
    ext = fa.pack_supp_groups(groups)
    unique, readable = c.build(opcode, nodeid, body + ext, uid=uid, gid=gid,
                               total_extlen=len(ext) // 8)
    done = c.vq.wait(c.vq.submit(readable, [fa.OUT_HEADER.size, out_size]))
    return c.parse(done, unique, fa.OUT_HEADER.size + out_size)


def test_supplementary_groups_from_the_request(session: Session) -> None:
    c = session.client
    assert c.flags & fa.InitFlag.CREATE_SUPP_GROUP
    grp = session.share / "grp"
    grp.mkdir(mode=0o770)
    os.chown(grp, 0, 2000)
    (grp / "file").write_bytes(b"for group 2000")
    node = c.lookup(ROOT, "grp").nodeid
    as_user = {"uid": 1000, "gid": 1000}
    size = fa.ENTRY_OUT.size
    # ACCESS answers what access(2) answers for the caller with the request's groups (it is
    # never retried with the inode's group, unlike LOOKUP, which the guest kernel checked).
    search = fa.ACCESS_IN.pack(os.X_OK)
    assert c.request(fa.Opcode.ACCESS, node, search, **as_user).error == errno.EACCES
    err, _ = _with_groups(c, fa.Opcode.ACCESS, node, search, [3000, 2000], 0, **as_user)
    assert err == 0
    err, _ = _with_groups(c, fa.Opcode.ACCESS, node, search, [3000], 0, **as_user)
    assert err == errno.EACCES
    # The groups of one request do not leak into the next.
    assert c.request(fa.Opcode.ACCESS, node, search, **as_user).error == errno.EACCES
    err, body = _with_groups(c, fa.Opcode.LOOKUP, node, b"file\0", [3000, 2000], size,
                             **as_user)
    assert err == 0 and fa.EntryOut.unpack(body).attr.size == 14
    # A malformed extension is refused.
    bad = fa.EXT_HEADER.pack(16, fa.ExtType.GROUPS) + fa.SUPP_GROUPS.pack(100) + bytes(4)
    unique, readable = c.build(fa.Opcode.LOOKUP, node, b"file\0" + bad, total_extlen=2)
    done = c.vq.wait(c.vq.submit(readable, [fa.OUT_HEADER.size, size]))
    assert c.parse(done, unique, fa.OUT_HEADER.size + size).error == errno.EINVAL


def test_readonly_refuses_every_modification(open_session) -> None:
    s = open_session("--readonly", "--xattr")
    c = s.client
    (s.share / "f").write_bytes(b"data")
    (s.share / "d").mkdir()
    os.setxattr(s.share / "f", "user.k", b"v")
    before = tree(s.share)
    f = c.lookup(ROOT, "f").nodeid
    d = c.lookup(ROOT, "d").nodeid
    rofs = errno.EROFS
    assert errno_of(c.mkdir, ROOT, "new") == rofs
    assert errno_of(c.create, ROOT, "new") == rofs
    assert errno_of(c.mknod, ROOT, "new", stat.S_IFIFO | 0o600) == rofs
    assert errno_of(c.open, f, os.O_RDWR) == rofs
    assert errno_of(c.open, f, os.O_WRONLY) == rofs
    assert errno_of(c.open, f, os.O_RDONLY | os.O_TRUNC) == rofs
    assert errno_of(c.unlink, ROOT, "f") == rofs
    assert errno_of(c.rmdir, ROOT, "d") == rofs
    assert errno_of(c.rename, ROOT, "f", ROOT, "g") == rofs
    assert errno_of(c.rename2, ROOT, "f", d, "g", fa.RENAME_NOREPLACE) == rofs
    assert errno_of(c.setattr, f, mode=0o777) == rofs
    assert errno_of(c.setattr, f, size=0) == rofs
    assert errno_of(c.symlink, ROOT, "ln", "f") == rofs
    assert errno_of(c.link, f, ROOT, "hard") == rofs
    assert errno_of(c.setxattr, f, "user.new", b"x") == rofs
    assert errno_of(c.removexattr, f, "user.k") == rofs
    assert errno_of(c.access, f, os.W_OK) == rofs
    # A handle opened read-only cannot be written through either.
    fh = c.open(f, os.O_RDONLY).fh
    assert errno_of(c.write, f, fh, 0, b"X") in (rofs, errno.EBADF)
    assert errno_of(c.fallocate, f, fh, 0, 8192) in (rofs, errno.EBADF)
    assert errno_of(c.create, ROOT, "f", flags=os.O_RDONLY | os.O_CREAT | os.O_TRUNC) == rofs
    # CREATE of an existing file opens it for reading only.
    e, o = c.create(ROOT, "f", flags=os.O_RDONLY | os.O_CREAT)
    assert c.read(e.nodeid, o.fh, 0, 10) == b"data"
    assert tree(s.share) == before
    # Reading still works.
    assert c.read(f, fh, 0, 10) == b"data"
    assert c.getxattr(f, "user.k") == b"v"
    assert {x.name for x in c.readdir_all(ROOT, c.opendir(ROOT).fh)} >= {b"f", b"d"}


# --- big requests ----------------------------------------------------------------------


def _pattern(n: int, seed: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "little")).digest() * 128   # 4 KiB
    return (block * (n // len(block) + 1))[:n]


@pytest.mark.parametrize("layout", [
    {},
    {"split": 7},
    {"indirect": True, "split": 16},
    {"cross_region": 40 + 40 + MIB // 2 + 3},   # the data descriptor straddles the regions
    {"cross_region": 40, "split": 3},           # header | body on different regions
    {"cross_region": 40 + 40 + 4096, "indirect": True, "split": 5},
], ids=["plain", "split", "indirect", "straddle", "split-at-header", "indirect-straddle"])
def test_one_mib_write_and_read(open_session, layout: dict) -> None:
    s = open_session(regions=2, queue_size=256)
    c = s.client
    e, o = c.create(ROOT, "big")
    data = _pattern(MIB, 1)
    assert c.write(e.nodeid, o.fh, 0, data, **layout) == MIB
    assert (s.share / "big").read_bytes() == data
    host = _pattern(MIB, 2)
    (s.share / "big").write_bytes(host)
    read_layout = dict(layout)
    if "cross_region" in layout:
        # Readable part: 40 + 40 bytes; put the boundary inside the reply data instead.
        read_layout["cross_region"] = 80 + 16 + layout["cross_region"] % 4096 + 1
    assert c.read(e.nodeid, o.fh, 0, MIB, **read_layout) == host
    assert c.read(e.nodeid, o.fh, MIB - 10, MIB, **read_layout) == host[-10:]


def test_chain_of_more_buffers_than_iov_max(open_session) -> None:
    # 1100 data descriptors: more than one preadv/pwritev takes (IOV_MAX 1024), still within
    # a 2048-entry queue.
    s = open_session("--queue-size=2048", queue_size=2048)
    c = s.client
    e, o = c.create(ROOT, "big")
    data = _pattern(MIB, 3)
    assert c.write(e.nodeid, o.fh, 0, data, indirect=True, split=1100) == MIB
    assert (s.share / "big").read_bytes() == data
    assert c.read(e.nodeid, o.fh, 0, MIB, indirect=True, split=1100) == data
    assert c.read(e.nodeid, o.fh, MIB - 1000, MIB, split=1100) == data[-1000:]


def test_write_larger_than_max_write_is_refused(session: Session) -> None:
    c = session.client
    e, o = c.create(ROOT, "f")
    r = c.request(fa.Opcode.WRITE, e.nodeid,
                  [fa.WriteIn(o.fh, 0, MIB + 8192).pack(), bytes(MIB + 8192)])
    assert r.error == errno.ENOMEM
    assert os.path.getsize(session.share / "f") == 0


def test_many_requests_in_flight(session: Session) -> None:
    c = session.client
    blocks = [bytes([i]) * 4096 for i in range(32)]
    (session.share / "blocks").write_bytes(b"".join(blocks))
    node = c.lookup(ROOT, "blocks").nodeid
    fh = c.open(node, os.O_RDONLY).fh
    tokens = {c.submit(fa.Opcode.READ, node, fa.ReadIn(fh, 4096 * i, 4096).pack(),
                       out_size=4096, kick=False): i for i in range(32)}
    session.fe.queue(1).kick(force=True)
    got = {}
    while len(got) < 32:
        for token, (err, body) in c.collect():
            assert err == 0
            got[tokens[token]] = body
    assert [got[i] for i in range(32)] == blocks


# --- staying inside the share ------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret").write_bytes(b"outside secret")
    os.chmod(out / "secret", 0o600)
    return out


def test_dotdot_at_root_stays_at_root(session: Session, outside: Path) -> None:
    c = session.client
    share_ino = os.stat(session.share).st_ino
    e = c.lookup(ROOT, "..")
    assert e.attr.ino == share_ino
    assert c.getattr(e.nodeid).attr.ino == share_ino
    # Nothing reachable from there is outside the share.
    assert errno_of(c.lookup, e.nodeid, "outside") == errno.ENOENT
    assert errno_of(c.lookup, c.lookup(e.nodeid, "..").nodeid, "outside") == errno.ENOENT
    sub = c.mkdir(ROOT, "sub").nodeid
    up = c.request(fa.Opcode.LOOKUP, sub, b"..\0")
    assert up.error == errno.ENOENT or fa.EntryOut.unpack(up.body).attr.ino == share_ino
    dh = c.opendir(e.nodeid).fh
    assert {d.name for d in c.readdir_all(e.nodeid, dh)} == {b".", b"..", b"sub"}


_SLASHED = (b"../outside", b"../outside/secret", b"sub/x", b"/etc", b"/", b"a/",
            b"..//outside")


def test_names_with_a_slash_are_refused(session: Session, outside: Path) -> None:
    c = session.client
    (session.share / "sub").mkdir()
    (session.share / "sub" / "x").write_bytes(b"x")
    before, before_out = tree(session.share), tree(outside)
    for name in _SLASHED:
        _try_slashed_name(c, name)
    assert tree(session.share) == before
    assert tree(outside) == before_out


def _try_slashed_name(c: FuseClient, name: bytes) -> None:
    op = fa.Opcode
    requests = [
        (op.LOOKUP, name + b"\0"),
        (op.MKDIR, fa.MKDIR_IN.pack(0o755, 0) + name + b"\0"),
        (op.CREATE, fa.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + name + b"\0"),
        (op.MKNOD, fa.MKNOD_IN.pack(stat.S_IFREG | 0o644, 0, 0) + name + b"\0"),
        (op.SYMLINK, name + b"\0target\0"),
        (op.UNLINK, name + b"\0"),
        (op.RMDIR, name + b"\0"),
        (op.RENAME, fa.RENAME_IN.pack(ROOT) + b"sub\0" + name + b"\0"),
        (op.RENAME, fa.RENAME_IN.pack(ROOT) + name + b"\0moved\0"),
    ]
    for opcode, body in requests:
        r = c.request(opcode, ROOT, body)
        assert r.error == errno.EINVAL, (name, opcode, r)
    x = c.lookup(c.lookup(ROOT, "sub").nodeid, "x").nodeid
    assert c.request(op.LINK, ROOT, fa.LINK_IN.pack(x) + name + b"\0").error == errno.EINVAL


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_symlinks_out_of_the_share_are_never_followed(open_session, outside: Path,
                                                      kind: str) -> None:
    session = open_session("--xattr")
    c = session.client
    os.setxattr(outside / "secret", "user.secret", b"outside")
    target = outside if kind == "absolute" else os.path.relpath(outside, session.share)
    secret = outside / "secret"
    os.symlink(target, session.share / "dirlink")
    os.symlink(f"{target}/secret", session.share / "filelink")
    before_out = tree(outside)
    st_secret = os.stat(secret)

    dl = c.lookup(ROOT, "dirlink")
    fl = c.lookup(ROOT, "filelink")
    assert stat.S_ISLNK(dl.attr.mode) and stat.S_ISLNK(fl.attr.mode)
    assert dl.attr.ino != os.stat(outside).st_ino and fl.attr.ino != st_secret.st_ino
    assert c.readlink(fl.nodeid) == os.fsencode(f"{target}/secret")
    # Nothing below or behind the link.
    assert errno_of(c.lookup, dl.nodeid, "secret") == errno.ENOTDIR
    assert errno_of(c.opendir, dl.nodeid) in (errno.ENOTDIR, errno.ELOOP)
    for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
        assert errno_of(c.open, fl.nodeid, flags) == errno.ELOOP
    assert errno_of(c.create, ROOT, "filelink", flags=os.O_RDWR | os.O_CREAT) == errno.ELOOP
    assert errno_of(c.create, dl.nodeid, "new") in (errno.ENOTDIR, errno.ELOOP)
    assert errno_of(c.mkdir, dl.nodeid, "new") in (errno.ENOTDIR, errno.ELOOP)
    assert errno_of(c.symlink, dl.nodeid, "new", "x") in (errno.ENOTDIR, errno.ELOOP)
    assert errno_of(c.setattr, fl.nodeid, size=0) == errno.ELOOP
    # chmod/chown/utimes of a symlink node act on the link itself, never on its target.
    c.request(fa.Opcode.SETATTR, fl.nodeid,
              fa.SetattrIn(fa.SetattrValid.MODE, mode=0o777).pack())
    c.setattr(fl.nodeid, uid=4242, gid=4242)
    assert os.lstat(session.share / "filelink").st_uid == 4242
    c.setattr(fl.nodeid, mtime=(12345, 0))
    assert c.getattr(fl.nodeid).attr.mtime == 12345
    # Extended attributes of the link are the link's own, never the target's.
    assert errno_of(c.getxattr, fl.nodeid, "user.secret") == errno.ENODATA
    assert b"user.secret" not in c.listxattr(fl.nodeid)
    # (user.* cannot even exist on a symlink: EPERM.)
    assert errno_of(c.removexattr, fl.nodeid, "user.secret") in (errno.ENODATA, errno.EPERM)
    # A hard link of the symlink node links the symlink, not the secret.
    hard = c.link(fl.nodeid, ROOT, "hard")
    assert stat.S_ISLNK(hard.attr.mode)
    assert os.lstat(session.share / "hard").st_ino == os.lstat(session.share / "filelink").st_ino
    # Renaming something onto/through the link replaces the link only.
    (session.share / "plain").write_bytes(b"plain")
    c.rename(ROOT, "plain", ROOT, "filelink")
    assert (session.share / "filelink").read_bytes() == b"plain"
    assert tree(outside) == before_out
    st = os.stat(secret)
    assert (st.st_mode, st.st_uid, st.st_mtime_ns) == (st_secret.st_mode, st_secret.st_uid,
                                                         st_secret.st_mtime_ns)


def test_symlink_made_by_the_guest_cannot_be_used_to_escape(session: Session,
                                                            outside: Path) -> None:
    c = session.client
    before_out = tree(outside)
    ln = c.symlink(ROOT, "evil", str(outside))
    ln2 = c.symlink(ROOT, "evil2", "../outside/secret")
    assert errno_of(c.lookup, ln.nodeid, "secret") == errno.ENOTDIR
    assert errno_of(c.open, ln2.nodeid, os.O_RDWR) == errno.ELOOP
    assert errno_of(c.create, ln.nodeid, "planted") in (errno.ENOTDIR, errno.ELOOP)
    assert errno_of(c.rename, ROOT, "evil2", ln.nodeid, "x") in (errno.ENOTDIR, errno.ELOOP)
    assert tree(outside) == before_out


# --- several request queues --------------------------------------------------------------


_SERVED = re.compile(r"requests served per queue: (.*)$", re.M)


def served_counts(text: str) -> dict[int, int]:
    m = _SERVED.search(text)
    assert m, "no per-queue count in the log:\n" + text
    return {int(q[1:]): int(n) for q, n in (kv.strip().split("=") for kv in m[1].split(","))}


def test_cross_queue_nodeids_and_handles(daemon_factory) -> None:
    d = daemon_factory("--request-queues=2")
    fe = Frontend.connect(d.socket, process=d.proc, queues=3)
    q1 = FuseClient(fe, queue=1)
    q2 = FuseClient(fe, queue=2)
    sent = {0: 0, 1: 0, 2: 0}
    (d.share / "f").write_bytes(b"written on the host")
    q1.init()
    node = q1.lookup(ROOT, "f").nodeid
    q1.lookup(ROOT, "f")                                   # nlookup 2
    fh = q1.open(node, os.O_RDWR).fh
    sent[1] += 4
    # The fh and nodeid from queue 1 are served by the worker of queue 2.
    assert q2.read(node, fh, 0, 100) == b"written on the host"
    assert q2.write(node, fh, 0, b"WRITTEN") == 7
    assert (d.share / "f").read_bytes() == b"WRITTEN on the host"
    assert q2.getattr(node).attr.size == 19
    q2.release(node, fh)
    sent[2] += 4
    assert errno_of(q1.read, node, fh, 0, 1) == errno.EBADF
    sent[1] += 1
    # FORGET on hiprio drops the count taken on queue 1, for every queue.
    q1.forget(node, 1)
    sent[0] += 1
    assert q1.getattr(node).attr.size == 19
    assert q2.getattr(node).attr.size == 19
    sent[1] += 1
    sent[2] += 1
    q2.forget(node, 1)
    sent[0] += 1
    assert errno_of(q1.getattr, node) == errno.EBADF
    assert errno_of(q2.getattr, node) == errno.EBADF
    sent[1] += 1
    sent[2] += 1
    # And the other way round: a LOOKUP on queue 2 serves queue 1.
    sub = q2.mkdir(ROOT, "sub")
    (d.share / "sub" / "g").write_bytes(b"g")
    g = q2.lookup(sub.nodeid, "g").nodeid
    sent[2] += 2
    e, o = q1.create(sub.nodeid, "h")
    assert q1.getattr(g).attr.size == 1
    q1.write(e.nodeid, o.fh, 0, b"hh")
    sent[1] += 3
    assert q2.read(e.nodeid, o.fh, 0, 10) == b"hh"
    sent[2] += 1
    assert (d.share / "sub" / "h").read_bytes() == b"hh"
    # BATCH_FORGET on hiprio, for ids from both queues.
    q1.batch_forget([(g, 1), (e.nodeid, 1)])
    sent[0] += 1
    assert errno_of(q2.getattr, g) == errno.EBADF
    sent[2] += 1

    fe.close()
    assert d.proc.wait(timeout=20) == 0
    assert "Traceback" not in d.text
    counts = served_counts(d.text)
    assert counts == sent
    assert counts[1] > 0 and counts[2] > 0


def _drain(c: FuseClient, tokens: dict[int, object]) -> dict[object, tuple[int, bytes]]:
    got = {}
    while len(got) < len(tokens):
        for token, reply in c.collect():
            got[tokens[token]] = reply
    return got


def test_same_inodes_looked_up_on_two_queues_at_once(open_session) -> None:
    s = open_session("--request-queues=2", queues=3, queue_size=256)
    q1, q2 = s.client, FuseClient(s.fe, queue=2)
    names = [f"n{i:02d}" for i in range(40)]
    for n in names:
        (s.share / n).write_bytes(n.encode())
    _settled(q1, q2)
    idle = _worker_fds(s.daemon)
    t1 = {q1.submit(fa.Opcode.LOOKUP, ROOT, n.encode() + b"\0", kick=False): n for n in names}
    t2 = {q2.submit(fa.Opcode.LOOKUP, ROOT, n.encode() + b"\0", kick=False): n for n in names}
    s.fe.queue(1).kick(force=True)
    s.fe.queue(2).kick(force=True)
    r1, r2 = _drain(q1, t1), _drain(q2, t2)
    ids = {}
    for n in names:
        assert r1[n].error == 0 and r2[n].error == 0
        e1, e2 = fa.EntryOut.unpack(r1[n].body), fa.EntryOut.unpack(r2[n].body)
        # One inode, one nodeid, one fd, whichever queue won the race.
        assert e1.nodeid == e2.nodeid and e1.attr.ino == os.stat(s.share / n).st_ino
        ids[n] = e1.nodeid
    assert len(set(ids.values())) == len(names)
    assert _worker_fds(s.daemon) == idle + len(names)
    q1.batch_forget([(i, 1) for i in ids.values()])
    assert q2.read(ids["n07"], q2.open(ids["n07"], os.O_RDONLY).fh, 0, 10) == b"n07"
    q1.batch_forget([(i, 1) for i in ids.values()])
    assert errno_of(q1.getattr, ids["n07"]) == errno.EBADF       # counted exactly twice


def test_release_on_one_queue_while_reads_run_on_another(open_session) -> None:
    s = open_session("--request-queues=2", queues=3, queue_size=256)
    q1, q2 = s.client, FuseClient(s.fe, queue=2)
    data = _pattern(64 * 4096, 9)
    (s.share / "f").write_bytes(data)
    node = q1.lookup(ROOT, "f").nodeid
    _settled(q1, q2)
    before = _worker_fds(s.daemon)
    fh = q1.open(node, os.O_RDONLY).fh
    tokens = {q1.submit(fa.Opcode.READ, node, fa.ReadIn(fh, 4096 * i, 4096).pack(),
                        out_size=4096, kick=False): i for i in range(60)}
    s.fe.queue(1).kick(force=True)
    q2.release(node, fh)
    # Each READ either ran before the release (and read the right bytes) or after it (EBADF).
    for i, (err, body) in _drain(q1, tokens).items():
        assert (err, body) in ((0, data[4096 * i : 4096 * (i + 1)]), (errno.EBADF, b""))
    assert errno_of(q1.read, node, fh, 0, 1) == errno.EBADF
    # The file's fd closed with the last READ that had it pinned.
    assert _worker_fds(s.daemon) == before


def test_served_counts_logged_on_sigterm(daemon_factory) -> None:
    d = daemon_factory("--request-queues=2")
    fe = Frontend.connect(d.socket, process=d.proc, queues=3)
    c1, c2 = FuseClient(fe, queue=1), FuseClient(fe, queue=2)
    c1.init()
    c2.getattr(ROOT)
    c2.getattr(ROOT)
    c1.forget(ROOT, 1)
    assert d.stop() == 0
    fe.close()
    assert served_counts(d.text) == {0: 1, 1: 1, 2: 2}
    assert "Traceback" not in d.text
