"""A worker killed in the middle of a request: the guest still gets one correct reply, and the
request's effect happens exactly once (common/journal.py, worker/recovery.py).

Every kill is placed by the worker's test hooks (worker/testhooks.py): the worker SIGKILLs
itself at a chosen point of a chosen request, so nothing depends on timing.  After each case
the shared fd table must hold exactly the fds it held before the request (no lookup counted
twice, no handle or notifier fd leaked by the dead worker), and the daemon must have logged
why the worker died and what it was doing.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from tests.conftest import DATA_PLANES, Daemon
from tests.frontend import Frontend, FuseClient, FuseError
from tests.proctree import children, fd_count

# Every kill point on the native plane (a hooked worker still serves through the engine: see
# the last test), and the in-flight case below on both planes.
pytestmark = pytest.mark.data_planes("native")

ROOT = fa.ROOT_ID
POINTS = ("popped", "executing", "executed", "replied", "pushed")


@dataclass
class Rig:
    daemon: Daemon
    fe: Frontend
    client: FuseClient

    @property
    def share(self) -> Path:
        return self.daemon.share

    def spawner(self) -> int:
        return next(p for p, n in children(self.daemon.proc.pid).items() if n == "pyvfs-spawner")

    def table_fds(self) -> int:
        """Fds in the table the spawner and every worker share."""
        return fd_count(self.spawner())

    def worker(self, queue: int) -> int:
        return next(p for p, n in children(self.daemon.proc.pid).items()
                    if n == f"pyvfs-q{queue}")

    def settled(self) -> None:
        """A GETATTR on every queue: each has a live worker that finished its recovery."""
        for q in (1,):
            FuseClient(self.fe, queue=q).getattr(ROOT)
        self.client.forget(ROOT, 0)


@pytest.fixture
def rig(daemon_factory, monkeypatch) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def start(crash: str, *args: str) -> Rig:
        monkeypatch.setenv("PYVIRTIOFSD_TEST_HOOKS", "1")
        monkeypatch.setenv("PYVIRTIOFSD_TEST_CRASH", crash)
        # The hook kills its own worker, which no worker seccomp policy allows.
        d = daemon_factory(*args, "--seccomp=none")
        fe = Frontend.connect(d.socket, process=d.proc, queues=2)
        c = FuseClient(fe)
        c.init()
        r = Rig(d, fe, c)
        made.append(r)
        return r

    yield start
    for r in made:
        alive = r.daemon.proc.poll() is None
        r.fe.close()
        assert alive, "the daemon died:\n" + r.daemon.text
        assert "Traceback" not in r.daemon.text, r.daemon.text


def killed(rig: Rig, opcode: str) -> None:
    """The worker of queue 1 died from the hook, and the log says what it was doing."""
    line = rig.daemon.wait_for("worker for queue 1 (pid")
    assert "was killed by SIGKILL" in line, line
    assert opcode in line, line
    assert "respawning it" in line, line


# --- one scenario per opcode -----------------------------------------------------------------
# Each takes the rig, runs the request that the hook interrupts, and checks the result.  All
# lookups and handles it makes are dropped again at the end, so the fd table is back where it
# started.


def do_read(r: Rig) -> None:
    (r.share / "f").write_bytes(b"read me exactly once")
    node = r.client.lookup(ROOT, "f").nodeid
    fh = r.client.open(node, os.O_RDONLY).fh
    base = r.table_fds()
    assert r.client.read(node, fh, 5, 100) == b"me exactly once"
    killed(r, "READ")
    r.settled()
    assert r.table_fds() == base
    r.client.release(node, fh)
    r.client.forget(node, 1)


def do_write_append(r: Rig) -> None:
    # An O_APPEND write is not idempotent: done twice it would append twice.
    (r.share / "log").write_bytes(b"start;")
    node = r.client.lookup(ROOT, "log").nodeid
    flags = os.O_WRONLY | os.O_APPEND
    fh = r.client.open(node, flags).fh
    body = [fa.WriteIn(fh, 0, 6, 0, 0, flags).pack(), b"entry;"]
    assert fa.WRITE_OUT.unpack(r.client.call(fa.Opcode.WRITE, node, body))[0] == 6
    killed(r, "WRITE")
    assert (r.share / "log").read_bytes() == b"start;entry;"
    r.client.release(node, fh)
    r.client.forget(node, 1)


def do_write(r: Rig) -> None:
    (r.share / "w").write_bytes(b"0123456789")
    node = r.client.lookup(ROOT, "w").nodeid
    fh = r.client.open(node, os.O_RDWR).fh
    assert r.client.write(node, fh, 4, b"ab") == 2
    killed(r, "WRITE")
    assert (r.share / "w").read_bytes() == b"0123ab6789"
    assert r.client.read(node, fh, 0, 20) == b"0123ab6789"
    r.client.release(node, fh)
    r.client.forget(node, 1)


def do_create(r: Rig) -> None:
    entry, opened = r.client.create(ROOT, "new", 0o640, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    killed(r, "CREATE")
    st = (r.share / "new").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and entry.attr.ino == st.st_ino
    # The handle it answered works, and is the only one: after RELEASE and FORGET nothing of
    # the file stays open (checked by the caller's fd count).
    assert r.client.write(entry.nodeid, opened.fh, 0, b"via the new fh") == 14
    assert (r.share / "new").read_bytes() == b"via the new fh"
    r.client.release(entry.nodeid, opened.fh)
    r.client.forget(entry.nodeid, 1)
    assert sorted(os.listdir(r.share)) == ["new"]


def do_mkdir(r: Rig) -> None:
    entry = r.client.mkdir(ROOT, "d", 0o750)
    killed(r, "MKDIR")
    st = (r.share / "d").stat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert entry.attr.ino == st.st_ino
    assert r.client.getattr(entry.nodeid).attr.ino == st.st_ino
    r.client.forget(entry.nodeid, 1)


def do_unlink(r: Rig) -> None:
    (r.share / "x").write_bytes(b"bye")
    (r.share / "keep").write_bytes(b"stay")
    r.client.unlink(ROOT, "x")          # success, not ENOENT from a second unlink
    killed(r, "UNLINK")
    assert sorted(os.listdir(r.share)) == ["keep"]


def do_rename(r: Rig) -> None:
    (r.share / "a").write_bytes(b"moved")
    (r.share / "b").write_bytes(b"replaced")
    r.client.rename(ROOT, "a", ROOT, "b")
    killed(r, "RENAME")
    assert sorted(os.listdir(r.share)) == ["b"]
    assert (r.share / "b").read_bytes() == b"moved"


def do_rmdir(r: Rig) -> None:
    (r.share / "empty").mkdir()
    r.client.rmdir(ROOT, "empty")
    killed(r, "RMDIR")
    assert os.listdir(r.share) == []


def do_link(r: Rig) -> None:
    (r.share / "t").write_bytes(b"target")
    node = r.client.lookup(ROOT, "t").nodeid
    entry = r.client.link(node, ROOT, "l")
    killed(r, "LINK")
    assert entry.nodeid == node and entry.attr.nlink == 2
    assert (r.share / "t").stat().st_nlink == 2
    r.client.forget(node, 2)


def do_symlink(r: Rig) -> None:
    entry = r.client.symlink(ROOT, "s", "some/where")
    killed(r, "SYMLINK")
    assert os.readlink(r.share / "s") == "some/where"
    r.client.forget(entry.nodeid, 1)


def do_setattr(r: Rig) -> None:
    # Idempotent: a replay sets the same mode, size and times again.
    (r.share / "s").write_bytes(b"0123456789")
    node = r.client.lookup(ROOT, "s").nodeid
    attr = r.client.setattr(node, mode=0o600, size=4, mtime=(1234, 5)).attr
    killed(r, "SETATTR")
    st = (r.share / "s").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns) == (0o600, 4, 1234 * 10**9 + 5)
    assert (attr.mode, attr.size, attr.mtime, attr.mtimensec) == (st.st_mode, 4, 1234, 5)
    r.client.forget(node, 1)


def do_lookup(r: Rig) -> None:
    (r.share / "f").write_bytes(b"x")
    node = r.client.lookup(ROOT, "f").nodeid
    killed(r, "LOOKUP")
    # Counted once: one FORGET drops it.
    r.client.forget(node, 1)
    r.settled()
    with pytest.raises(FuseError) as e:
        r.client.getattr(node)
    assert e.value.errno == errno.EBADF


def do_release(r: Rig) -> None:
    (r.share / "f").write_bytes(b"x")
    node = r.client.lookup(ROOT, "f").nodeid
    fh = r.client.open(node, os.O_RDONLY).fh
    r.client.release(node, fh)          # success, not EBADF from a second RELEASE
    killed(r, "RELEASE")
    with pytest.raises(FuseError) as e:
        r.client.read(node, fh, 0, 1)
    assert e.value.errno == errno.EBADF
    r.client.forget(node, 1)


CASES: dict[str, Callable[[Rig], None]] = {
    "READ": do_read, "WRITE": do_write, "CREATE": do_create, "MKDIR": do_mkdir,
    "UNLINK": do_unlink, "RENAME": do_rename, "RMDIR": do_rmdir, "LINK": do_link,
    "SYMLINK": do_symlink, "LOOKUP": do_lookup, "RELEASE": do_release, "SETATTR": do_setattr,
}
# Served by the engine's own handlers, which stop at the kill points themselves.
NATIVE = {"CREATE", "MKDIR", "UNLINK", "RMDIR", "SETATTR"}


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("opcode", sorted(CASES))
def test_worker_killed_inside_a_request(rig, opcode: str, point: str) -> None:
    # LOOKUP scenarios look the file up once before the interrupted request only via it.
    r = rig(f"{opcode}:{point}")
    base = r.table_fds()
    CASES[opcode](r)
    r.settled()
    assert r.table_fds() == base, r.daemon.text
    assert r.daemon.text.count("test hook") == 1
    # The request was killed where the plane it is served on (the engine, for NATIVE) was.
    assert (f"test hook {opcode} at {point} in the native engine" in r.daemon.text) == (
        opcode in NATIVE), r.daemon.text


@pytest.mark.parametrize("point", POINTS)
def test_worker_killed_inside_an_append(rig, point: str) -> None:
    r = rig(f"WRITE:{point}")
    base = r.table_fds()
    do_write_append(r)
    r.settled()
    assert r.table_fds() == base


@pytest.mark.parametrize("point", ("popped", "executed", "replied"))
def test_forget_is_applied_once(rig, point: str) -> None:
    r = rig(f"FORGET:{point}")
    (r.share / "f").write_bytes(b"x")
    base = r.table_fds()
    node = r.client.lookup(ROOT, "f").nodeid
    assert r.client.lookup(ROOT, "f").nodeid == node       # two lookups counted
    r.client.forget(node, 1)                                # killed inside this one
    line = r.daemon.wait_for("worker for queue 0 (pid")
    assert "FORGET" in line
    # One lookup left: the inode is still known ...
    assert r.client.getattr(node).attr.size == 1
    r.client.forget(node, 1)
    r.settled()
    # ... and the second FORGET dropped it.
    with pytest.raises(FuseError) as e:
        r.client.getattr(node)
    assert e.value.errno == errno.EBADF
    assert r.table_fds() == base


@pytest.mark.parametrize("crash", ["MKDIR:executing@1-2", "MKDIR:executed,MKDIR:replied"])
def test_killed_twice_on_the_same_request(rig, crash: str) -> None:
    # The successor dies too while replaying it (before the call, or after answering from the
    # state the first run left); the third worker completes it.
    r = rig(crash)
    base = r.table_fds()
    entry = r.client.mkdir(ROOT, "d")
    assert (r.share / "d").is_dir() and entry.attr.ino == (r.share / "d").stat().st_ino
    r.client.forget(entry.nodeid, 1)
    r.settled()
    assert r.table_fds() == base
    assert r.daemon.text.count("test hook") == 2


@pytest.mark.data_planes(*DATA_PLANES)
def test_requests_in_flight_on_a_dead_worker_complete_in_order(rig) -> None:
    # Many requests queued while the worker dies on the first of them: all complete once.
    r = rig("CREATE:executed@3")
    vq = r.client.vq
    tokens = []
    for i in range(20):
        body = fa.CREATE_IN.pack(os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, 0, 0) \
            + f"f{i:02}".encode() + b"\0"
        tokens.append(r.client.submit(fa.Opcode.CREATE, ROOT, body, kick=False))
    vq.kick(force=True)
    for t in tokens:
        reply = r.client.result(t)
        assert reply.error == 0
        entry = fa.EntryOut.unpack(reply.body)
        opened = fa.OpenOut.unpack(reply.body, fa.ENTRY_OUT.size)
        r.client.release(entry.nodeid, opened.fh)
        r.client.forget(entry.nodeid, 1)
    killed(r, "CREATE")
    assert sorted(os.listdir(r.share)) == [f"f{i:02}" for i in range(20)]


def test_worker_dying_at_boot_is_backed_off_then_its_queue_failed(rig) -> None:
    # The first worker of queue 1 dies on a request; its successors all die while starting
    # (boots 2 to 6); the seventh, after the front-end restarted the ring, lives.
    r = rig("GETATTR:popped,q1:boot@2-6")
    fe = r.fe
    base = fe.get_vring_base(1)
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        fe.set_vring_err(1, err)
        fe.start_queue(1, base=base)
        token = r.client.submit(fa.Opcode.GETATTR, ROOT, fa.GETATTR_IN.pack(0, 0))
        line = r.daemon.wait_for("queue 1 is failed")
        assert "died 5 times in a row while starting" in line, line
        # Growing delays between the attempts, not a loop.
        text = r.daemon.text
        delays = [text.index(f"respawning it in {d} s") for d in ("0.1", "0.2", "0.4", "0.8")]
        assert delays == sorted(delays)
        assert text.count("respawning it") == 5
        # The front-end was told through the ring's error notifier.
        assert os.eventfd_read(err) >= 1
    finally:
        os.close(err)
    assert "pyvfs-q1" not in children(r.daemon.proc.pid).values()
    # Everything else still works: the control plane and the hiprio queue.
    assert r.fe.get_features()
    assert r.client.forget(ROOT, 0).used_len == 0
    # With no worker, GET_VRING_BASE is answered from the journal: the GETATTR was taken.
    assert fe.get_vring_base(1) == base + 1
    # Restarting the ring tries again; the new worker completes the journaled GETATTR.
    fe.start_queue(1, base=base + 1)
    assert r.client.result(token).error == 0
    r.settled()
    assert "pyvfs-q1" in children(r.daemon.proc.pid).values()


@pytest.mark.parametrize("applied", [True, False])
def test_forget_interrupted_between_table_and_journal(tmp_path: Path, applied: bool) -> None:
    # A kill can land after the inode table applied a FORGET and before the journal counted it
    # (no hook reaches inside that window, so the state is built by hand): the replay looks at
    # the lookup count the FORGET saw and applies it only if it had not gone through.
    from pyvirtiofsd.common.arena import Arena
    from pyvirtiofsd.common.journal import Journal
    from pyvirtiofsd.worker.filesystem import FsOptions
    from pyvirtiofsd.worker.passthrough import PassthroughFs
    from pyvirtiofsd.worker.recovery import JournaledArena, JournaledFs

    arena = Arena.create(max_inodes=64, max_handles=16, max_queues=2)
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    st_ = os.fstat(root)
    arena.inodes.set_root(root, st_.st_dev, st_.st_ino)
    (tmp_path / "f").write_bytes(b"x")
    proc = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    try:
        jq = Journal.create(1, 4).queue(0)
        jq.reset(0, 1, 4)
        tables = JournaledArena(arena, jq)
        fs = JournaledFs(PassthroughFs(tables, proc, FsOptions()), tables)
        from pyvirtiofsd.worker.filesystem import Context
        ctx = Context(0, 0, 0)
        node = fs.lookup(ctx, ROOT, b"f").nodeid
        fs.lookup(ctx, ROOT, b"f")
        assert arena.inodes.info(node)[0] == 2
        # The FORGET request is popped; its first run dies inside the window.
        jq.begin_effects(jq.popped(0, 0, fa.Opcode.FORGET, 7))
        jq.forgetting(node, 2)
        if applied:
            arena.inodes.forget(node, 1)
        rec = jq.inflight()[0]
        fs.begin_replay(rec)
        fs.forget(node, 1)
        fs.end_replay()
        assert arena.inodes.info(node)[0] == 1
    finally:
        os.close(proc)
        arena.close()


@pytest.mark.data_planes("native")
def test_kill_points_are_those_of_the_plane_asked_for(rig) -> None:
    """With --data-plane=native the kill points above are the native plane's: a worker with
    test hooks still serves through the engine (it reports, when its ring stops, how many
    requests it answered natively) -- were it to fall back to the Python plane, crash
    recovery of the native plane would go untested."""
    r = rig("MKNOD:popped")               # a kill point this test never reaches
    (r.share / "f").write_bytes(b"x")
    node = r.client.lookup(ROOT, "f").nodeid
    assert r.client.getattr(node).attr.size == 1
    r.client.forget(node, 1)
    # The worker logs it before it answers the supervisor, which answers this.
    r.fe.get_vring_base(1)
    line = r.daemon.wait_for("answered natively", timeout=10)
    m = re.search(r"queue 1: ring stopped at \d+; (\d+) request\(s\) answered natively", line)
    assert m and int(m.group(1)) >= 2, line


def test_journaled_fs_lists_every_operation() -> None:
    # An operation JournaledFs does not list itself would fall back to Filesystem's ENOSYS
    # default and the guest would lose it only in queue workers; nothing is forwarded by
    # attribute lookup either, so what a request runs is what the class says.
    from pyvirtiofsd.worker import recovery
    from pyvirtiofsd.worker.filesystem import Filesystem

    operations = {n for n, v in vars(Filesystem).items() if callable(v) and n[0] != "_"}
    assert operations - set(vars(recovery.JournaledFs)) == set()
    for cls in (recovery.JournaledFs, recovery.JournaledArena, recovery.JournaledInodes,
                recovery.JournaledHandles):
        assert "__getattr__" not in vars(cls), cls


def test_identify_tells_what_a_name_is_as_the_daemon(tmp_path: Path) -> None:
    # The pre-state of a non-idempotent call: (dev, ino) of the name, None when absent, an
    # error for what no operation would accept -- read as the daemon, so that a caller who
    # may not search the directory cannot make a completed call look not done.
    from pyvirtiofsd.common.arena import Arena
    from pyvirtiofsd.worker.filesystem import Context, FsOptions
    from pyvirtiofsd.worker.passthrough import PassthroughFs

    arena = Arena.create(max_inodes=16, max_handles=4, max_queues=1)
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    st_ = os.fstat(root)
    arena.inodes.set_root(root, st_.st_dev, st_.st_ino)
    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "d" / "f").write_bytes(b"x")
    proc = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    fs = PassthroughFs(arena, proc, FsOptions())
    try:
        d = fs.lookup(Context(0, 0, 0), ROOT, b"d").nodeid
        f = os.stat(tmp_path / "d" / "f")
        assert fs.identify(d, b"f") == (f.st_dev, f.st_ino)
        assert fs.identify(d, b"absent") is None
        for bad in (b"", b".", b"..", b"a/b", b"a\0b", b"n" * (fa.NAME_MAX + 1)):
            with pytest.raises(OSError):
                fs.identify(d, bad)
        with pytest.raises(OSError) as e:
            fs.identify(1 << 40, b"f")
        assert e.value.errno == errno.EBADF
        if os.geteuid() == 0:
            # A caller that may not search `d` is refused; identify still sees the name.
            with pytest.raises(PermissionError):
                fs.lookup(Context(4242, 4242, 0), d, b"f")
            assert fs.identify(d, b"f") == (f.st_dev, f.st_ino)
    finally:
        fs.restore_credentials()
        os.close(proc)
        arena.close()
