"""--inode-file-handles=prefer: inodes kept as file handles, opened again for each request.

The whole opcode suite of tests/test_daemon_fuse.py (the escape tests included) runs again here
with a daemon that keeps its inodes as file handles, on both data planes; the tests below check
what only this mode does: no O_PATH fd held per inode, a file gone answering ESTALE.
"""

from __future__ import annotations

import errno
import inspect
import os
from collections.abc import Iterator

import pytest

from pyvirtiofsd.common import devstate
from pyvirtiofsd.common import fuse_abi as fa
from tests import test_availability as availability
from tests import test_daemon_fuse as suite
from tests import test_migration as migration
from tests import test_recovery as recovery
from tests.conftest import DATA_PLANES
from tests.frontend import Frontend, FuseClient, FuseError
from tests.test_daemon_fuse import Session, _settled, _worker_fds, errno_of, outside  # noqa: F401
from tests.test_recovery import rig  # noqa: F401 (a fixture)

pytestmark = pytest.mark.data_planes(*DATA_PLANES)
ROOT = fa.ROOT_ID
PREFER = "--inode-file-handles=prefer"


@pytest.fixture
def open_session(daemon_factory) -> Iterator:
    """tests/test_daemon_fuse.py's open_session, every daemon started with PREFER."""
    opened: list[Session] = []

    def start(*args: str, queues: int = 2, **kw) -> Session:
        d = daemon_factory(PREFER, *args)
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
        assert not suite._HANDLER_BUG.search(s.daemon.text), s.daemon.text
        assert "killed by" not in s.daemon.text, s.daemon.text
        # The share gives file handles: prefer is honoured, not fallen back from.
        assert "inodes are kept as O_PATH fds" not in s.daemon.text, s.daemon.text


@pytest.fixture
def session(open_session) -> Session:
    return open_session()


def _uses_a_session(fn) -> bool:
    params = inspect.signature(fn).parameters
    return "session" in params or "open_session" in params


# Tests that count one O_PATH fd per inode, or use an inode after its last name is gone: what
# prefer changes on purpose.  Their counterparts with prefer are below.
_FD_BOUND = {"test_a_new_session_releases_the_old_ones_inodes_and_handles",
             "test_same_inodes_looked_up_on_two_queues_at_once", "test_unlink"}

# The opcode suite, collected again in this module so that it gets the fixtures above.
for _name, _test in list(vars(suite).items()):
    if (_name.startswith("test_") and callable(_test) and _uses_a_session(_test)
            and _name not in _FD_BOUND):
        globals()[_name] = _test
del _name, _test


def _lookup_many(c: FuseClient, n: int) -> list[int]:
    return [c.lookup(ROOT, f"f{i}").nodeid for i in range(n)]


@pytest.mark.parametrize("mode", ["never", "prefer"])
def test_no_fd_is_held_per_inode(daemon_factory, share, mode: str) -> None:
    """2,000 inodes looked up: with prefer the fd table the workers share does not grow with
    them (each request opens its inode and closes it); with never it holds one O_PATH fd
    each -- the same count, so the test can tell the two apart."""
    n = 2000
    for i in range(n):
        (share / f"f{i}").write_bytes(b"x")
    d = daemon_factory(f"--inode-file-handles={mode}")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        _settled(c)
        FuseClient(fe, queue=0).forget(0xDEAD, 1)   # the hiprio queue's worker answered too
        before = _worker_fds(d)
        nodeids = _lookup_many(c, n)
        assert len(set(nodeids)) == n
        assert all(c.getattr(nid).attr.size == 1 for nid in nodeids[::97])
        grown = _worker_fds(d) - before
        if mode == "prefer":
            assert grown == 0, grown
        else:
            assert grown == n, grown
        # Every inode still answers, and FORGET frees what it held.
        c.batch_forget([(nid, 1) for nid in nodeids])
        assert errno_of(c.getattr, nodeids[0]) == errno.EBADF
        assert _worker_fds(d) == before
    finally:
        fe.close()
    assert "Traceback" not in d.text, d.text


def test_a_file_gone_answers_estale(session: Session) -> None:
    """An inode kept as a file handle whose file is deleted on the host: open_by_handle_at(2)
    fails with ESTALE and the request gets it, as virtiofsd answers (with an O_PATH fd the
    inode would live on, unlinked).  A name looked up again is a new inode."""
    c = session.client
    (session.share / "gone").write_bytes(b"abc")
    nodeid = c.lookup(ROOT, "gone").nodeid
    assert c.getattr(nodeid).attr.size == 3
    os.unlink(session.share / "gone")
    assert errno_of(c.getattr, nodeid) == errno.ESTALE
    assert errno_of(c.open, nodeid, os.O_RDONLY) == errno.ESTALE
    c.forget(nodeid, 1)
    assert errno_of(c.getattr, nodeid) == errno.EBADF
    (session.share / "gone").write_bytes(b"new!")
    fresh = c.lookup(ROOT, "gone")
    assert fresh.attr.size == 4 and c.getattr(fresh.nodeid).attr.size == 4


def test_identity_is_checked_as_with_fds(session: Session) -> None:
    """A name replaced on the host is a different inode (dev, ino), never the old nodeid; and
    the same inode reached by two names is one nodeid."""
    c = session.client
    (session.share / "a").write_bytes(b"1")
    os.link(session.share / "a", session.share / "b")
    a = c.lookup(ROOT, "a").nodeid
    assert c.lookup(ROOT, "b").nodeid == a
    os.rename(session.share / "a", session.share / "old")
    (session.share / "a").write_bytes(b"22")
    assert c.lookup(ROOT, "a").nodeid != a
    assert c.getattr(a).attr.size == 1


def test_unlink_of_an_inode_the_guest_holds(session: Session) -> None:
    """test_unlink with prefer: the file is removed; its inode lives on while an open handle
    holds it, and once that is released nothing keeps it (no O_PATH fd): a GETATTR of the
    nodeid then answers ESTALE, virtiofsd's answer."""
    c = session.client
    (session.share / "f").write_bytes(b"x")
    node = c.lookup(ROOT, "f").nodeid
    fh = c.open(node, os.O_RDONLY).fh
    c.unlink(ROOT, "f")
    assert not (session.share / "f").exists()
    assert errno_of(c.unlink, ROOT, "f") == errno.ENOENT
    assert c.getattr(node).attr.nlink == 0
    assert c.read(node, fh, 0, 1) == b"x"
    c.release(node, fh)
    assert errno_of(c.getattr, node) == errno.ESTALE
    (session.share / "d").mkdir()
    assert errno_of(c.unlink, ROOT, "d") in (errno.EISDIR, errno.EPERM)
    assert (session.share / "d").is_dir()


def test_same_inodes_looked_up_on_two_queues_at_once(open_session) -> None:
    """Two queues race to insert the same 40 inodes: one nodeid each, and no fd held."""
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
    r1, r2 = suite._drain(q1, t1), suite._drain(q2, t2)
    ids = {}
    for n in names:
        assert r1[n].error == 0 and r2[n].error == 0
        e1, e2 = fa.EntryOut.unpack(r1[n].body), fa.EntryOut.unpack(r2[n].body)
        assert e1.nodeid == e2.nodeid and e1.attr.ino == os.stat(s.share / n).st_ino
        ids[n] = e1.nodeid
    assert len(set(ids.values())) == len(names)
    assert _worker_fds(s.daemon) == idle
    q1.batch_forget([(i, 1) for i in ids.values()])
    assert q2.read(ids["n07"], q2.open(ids["n07"], os.O_RDONLY).fh, 0, 10) == b"n07"
    q1.batch_forget([(i, 1) for i in ids.values()])
    assert errno_of(q1.getattr, ids["n07"]) == errno.EBADF       # counted exactly twice


# --- migration: file handles and paths, into a daemon that keeps handles too -------------------

@pytest.mark.parametrize("mode", migration.MODES)
@pytest.mark.parametrize("sandbox", [(), ("--sandbox=namespace", "--seccomp=kill")],
                         ids=["no-sandbox", "namespace"])
def test_migration_with_prefer(daemon_factory, mode: str, sandbox: tuple[str, ...]) -> None:
    """test_migration's scenario with prefer on both sides: the source's inodes kept as file
    handles are saved (opened for the walk, closed after), and the destination keeps the ones
    it finds again as file handles: once a file is deleted on the host its nodeid answers
    ESTALE, where an O_PATH fd would have kept it alive."""
    src = daemon_factory(PREFER, f"--migration-mode={mode}", *sandbox)
    dst = daemon_factory(PREFER, f"--migration-mode={mode}", *sandbox)
    g = migration.hold(src)
    data = g.fe.save_state()
    if not sandbox:                                  # (the sandbox's spawner is deeper down)
        stopped = _worker_fds(src)
        assert g.fe.save_state() == data
        assert _worker_fds(src) == stopped           # the walk's fds are closed again
    held = {i.nodeid for i in devstate.decode(data).inodes}
    assert {ROOT, g.dir_id, g.rw_id, g.ro_id, g.nested_id} <= held
    g.fe.close()
    fe, c = migration.resume(dst, data)
    with fe:
        assert c.read(g.rw_id, g.rw_fh, 0, 100) == b"before"
        assert c.write(g.rw_id, g.rw_fh, 6, b" and after") == 10
        assert (dst.share / "dir" / "rw.txt").read_bytes() == b"before and after"
        assert migration.names(c, g.dir_id, g.dir_fh) == {b"sub", b"rw.txt"}
        assert c.getattr(g.nested_id).attr.size == 4
        assert c.lookup(g.dir_id, "rw.txt").nodeid == g.rw_id
        os.unlink(dst.share / "dir" / "sub" / "deep.txt")
        assert errno_of(c.getattr, g.nested_id) == errno.ESTALE
    assert "Traceback" not in src.text + dst.text
    assert "seccomp refused" not in src.text + dst.text


# --- recovery: a worker killed in the middle of a request -------------------------------------

@pytest.mark.parametrize("point", recovery.POINTS)
@pytest.mark.parametrize("opcode", ["LOOKUP", "READ", "RENAME", "MKDIR", "SETATTR"])
def test_worker_killed_inside_a_request(rig, opcode: str, point: str) -> None:  # noqa: F811
    """test_recovery's scenarios with prefer: the fd a pin opened from a file handle is in
    the journal, so the successor closes it -- the fd table is back where it was."""
    r = rig(f"{opcode}:{point}", PREFER)
    base = r.table_fds()
    recovery.CASES[opcode](r)
    r.settled()
    assert r.table_fds() == base, r.daemon.text
    assert r.daemon.text.count("test hook") == 1


def test_inodes_past_the_fd_budget(daemon_factory, share) -> None:
    """test_availability's fd budget with prefer: inodes kept as handles hold no fd, so the
    guest looks up four times as many as the budget lets it hold as fds (all refused with
    ENFILE past the budget without prefer), and they all answer; open files still count."""
    nofile = availability.NOFILE
    budget = availability.guest_fd_budget(nofile)
    n = 4 * nofile
    for i in range(n):
        (share / f"f{i}").write_bytes(b"x")
    d = daemon_factory("--request-queues=1", f"--rlimit-nofile={nofile}", PREFER)
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        held = _lookup_many(c, n)
        assert len(set(held)) == n > budget
        assert all(c.getattr(nid).attr.size == 1 for nid in held[::37])
        handles = []
        with pytest.raises(FuseError) as ei:
            for nid in held:
                handles.append(c.open(nid, os.O_RDONLY).fh)
        assert ei.value.errno == errno.ENFILE
        assert len(handles) == budget - 1           # the root's fd is one of them
        for nid, fh in zip(held[:len(handles)], handles, strict=True):
            c.release(nid, fh)
        c.batch_forget([(nid, 1) for nid in held])
    finally:
        fe.close()
    assert "Traceback" not in d.text, d.text


def test_an_inode_number_reused_by_a_new_file_is_a_new_inode(session: Session) -> None:
    """A file deleted while the guest holds its nodeid: nothing keeps its inode (no fd), so the
    filesystem may give its number to the next file.  That file's handle differs (another
    generation): it gets a new nodeid, and the old one goes on answering ESTALE."""
    c = session.client
    (session.share / "old").write_bytes(b"old")
    old_ino = os.stat(session.share / "old").st_ino
    old = c.lookup(ROOT, "old").nodeid
    os.unlink(session.share / "old")
    reused = None
    for i in range(64):                 # ext4 hands a freed inode number out again at once
        p = session.share / f"new{i}"
        p.write_bytes(b"new!")
        if os.stat(p).st_ino == old_ino:
            reused = p.name
            break
    assert reused is not None, "the filesystem gave the freed inode number to no new file"
    e = c.lookup(ROOT, reused)
    assert e.nodeid != old and e.attr.ino == old_ino
    assert c.getattr(e.nodeid).attr.size == 4
    assert errno_of(c.getattr, old) == errno.ESTALE
    assert c.lookup(ROOT, reused).nodeid == e.nodeid
