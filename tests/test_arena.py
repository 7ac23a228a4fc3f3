"""The shared inode/handle arena: single-process semantics, then several processes at once."""

from __future__ import annotations

import errno
import os
import random
import select
import traceback
from collections.abc import Callable

import pytest

from pyvirtiofsd.common import native
from pyvirtiofsd.common.arena import Arena, InodeTable


def _opath(path) -> int:
    return os.open(path, os.O_PATH)


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _run_child(body: Callable[[], object], clone_flags: int | None = None,
               timeout: float = 30.0) -> int:
    """Run `body` in a forked (or cloned) child; return its exit status, failing on a hang."""
    pid = os.fork() if clone_flags is None else native.clone_process(clone_flags)
    if pid == 0:
        code = 1
        try:
            result = body()
            code = result if isinstance(result, int) else 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return _wait(pid, timeout)


def _wait(pid: int, timeout: float = 30.0) -> int:
    """Reap `pid` and return its exit status; kill it and fail the test if it hangs."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} did not finish within {timeout}s")
    finally:
        os.close(pidfd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _read_within(fd: int, timeout: float = 30.0) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        pytest.fail(f"no message from the child within {timeout}s")
    return os.read(fd, 100)


@pytest.fixture
def files(tmp_path):
    paths = []
    for i in range(8):
        p = tmp_path / f"f{i}"
        p.write_bytes(f"content {i}".encode())
        paths.append(p)
    return paths


@pytest.fixture
def arena(tmp_path):
    a = Arena.create(max_inodes=16, max_handles=8, max_queues=4)
    root = _opath(tmp_path)
    a.inodes.set_root(root, *_key(root))
    yield a
    a.close()


def _lookup(table: InodeTable, path) -> int:
    """LOOKUP as the filesystem does it: open O_PATH, register, close ours if it was known."""
    fd = _opath(path)
    try:
        nodeid, owned = table.lookup_or_insert(fd, *_key(fd))
    except OSError:
        os.close(fd)
        raise
    if not owned:
        os.close(fd)
    return nodeid


def _index(arena: Arena) -> list[int]:
    """The inode index's buckets (0 empty, 0xFFFFFFFF tombstone, else a slot)."""
    c = arena._c
    buckets = native.ffi.cast("uint32_t *", c.base + c.index_off)
    return [buckets[i] for i in range(c.buckets)]


# -- inodes, one process ------------------------------------------------------------------------


def test_root_is_fuse_root_id_and_never_freed(arena, tmp_path):
    inodes = arena.inodes
    assert inodes.live_count() == 1
    root_fd = inodes.acquire(InodeTable.ROOT)
    inodes.release(InodeTable.ROOT)
    assert os.fstat(root_fd).st_ino == tmp_path.stat().st_ino
    # A lookup that resolves to the root (say "..") counts on nodeid 1, whatever its mnt_id.
    fd = _opath(tmp_path)
    assert inodes.lookup_or_insert(fd, *_key(fd), mnt_id=77) == (1, False)
    os.close(fd)
    assert inodes.info(1)[0] == 2
    inodes.forget(1, 1000)
    assert inodes.info(1) == (0, 0, root_fd)
    assert inodes.acquire(1) == root_fd
    inodes.release(1)
    assert _is_open(root_fd)
    assert inodes.live_count() == 1


def test_set_root_twice_is_refused(arena, tmp_path):
    fd = _opath(tmp_path)
    with pytest.raises(OSError) as e:
        arena.inodes.set_root(fd, *_key(fd))
    assert e.value.errno == errno.EEXIST
    os.close(fd)


def test_lookup_counts_and_ownership(arena, files):
    inodes = arena.inodes
    fd = _opath(files[0])
    nodeid, owned = inodes.lookup_or_insert(fd, *_key(fd))
    assert owned and nodeid not in (0, 1)
    assert inodes.info(nodeid) == (1, 0, fd)
    fd2 = _opath(files[0])
    assert inodes.lookup_or_insert(fd2, *_key(fd2)) == (nodeid, False)
    os.close(fd2)  # the caller's copy; the table keeps its own
    assert inodes.info(nodeid) == (2, 0, fd)
    assert inodes.acquire(nodeid) == fd
    inodes.release(nodeid)
    assert inodes.live_count() == 2


def test_mnt_id_is_part_of_the_key(arena, files):
    inodes = arena.inodes
    fd_a, fd_b = _opath(files[0]), _opath(files[0])
    a, owned_a = inodes.lookup_or_insert(fd_a, *_key(fd_a), mnt_id=1)
    b, owned_b = inodes.lookup_or_insert(fd_b, *_key(fd_b), mnt_id=2)
    assert owned_a and owned_b and a != b
    assert inodes.live_count() == 3


def test_forget_drops_lookups_then_closes(arena, files):
    inodes = arena.inodes
    nodeid = _lookup(inodes, files[0])
    _lookup(inodes, files[0])
    _lookup(inodes, files[0])
    fd = inodes.info(nodeid)[2]
    inodes.forget(nodeid, 2)
    assert inodes.info(nodeid) == (1, 0, fd)
    inodes.forget(nodeid, 5)  # more than counted: clamps to zero
    assert not _is_open(fd)
    for op in (inodes.acquire, inodes.info):
        with pytest.raises(OSError) as e:
            op(nodeid)
        assert e.value.errno == errno.EBADF
    assert inodes.live_count() == 1


def test_forget_of_unknown_ids_is_ignored(arena, files):
    inodes = arena.inodes
    nodeid = _lookup(inodes, files[0])
    for bogus in (0, 1 << 32, 999, nodeid + (1 << 32), -1, 1 << 70):
        inodes.forget(bogus, 1)
    assert inodes.info(nodeid)[0] == 1


@pytest.mark.parametrize("bogus", [0, 17, 1 << 32, (1 << 32) | 1, -1, (1 << 64) + 1, 1 << 80])
def test_invalid_nodeids_are_ebadf(arena, bogus):
    for op in (arena.inodes.acquire, arena.inodes.release, arena.inodes.info):
        with pytest.raises(OSError) as e:
            op(bogus)
        assert e.value.errno == errno.EBADF


def test_stale_nodeid_never_reaches_new_occupant(arena, files):
    inodes = arena.inodes
    old = _lookup(inodes, files[0])
    inodes.forget(old, 1)
    new = _lookup(inodes, files[1])
    assert new & 0xFFFFFFFF == old & 0xFFFFFFFF  # the freed slot is reused...
    assert new != old  # ...under a new generation
    with pytest.raises(OSError) as e:
        inodes.acquire(old)
    assert e.value.errno == errno.EBADF
    inodes.forget(old, 1)  # a late FORGET of the old id must not touch the new inode
    assert inodes.info(new)[0] == 1


def test_full_table_is_enfile(files, tmp_path):
    arena = Arena.create(max_inodes=4, max_handles=1, max_queues=1)
    root = _opath(tmp_path)
    arena.inodes.set_root(root, *_key(root))
    ids = [_lookup(arena.inodes, files[i]) for i in range(3)]  # root + 3 = max_inodes
    fd = _opath(files[3])
    with pytest.raises(OSError) as e:
        arena.inodes.lookup_or_insert(fd, *_key(fd))
    assert e.value.errno == errno.ENFILE
    assert _is_open(fd)  # still the caller's
    # A known inode is still found when the table is full.
    assert _lookup(arena.inodes, files[0]) == ids[0]
    arena.inodes.forget(ids[1], 1)
    nodeid, owned = arena.inodes.lookup_or_insert(fd, *_key(fd))
    assert owned and arena.inodes.acquire(nodeid) == fd
    arena.inodes.release(nodeid)
    arena.close()


def test_pins_defer_close(arena, files):
    inodes = arena.inodes
    nodeid = _lookup(inodes, files[0])
    fd = inodes.acquire(nodeid)
    inodes.acquire(nodeid)
    inodes.forget(nodeid, 1)
    # Forgotten: no new user may pin it, but the two users in flight keep the fd open.
    with pytest.raises(OSError):
        inodes.acquire(nodeid)
    assert inodes.info(nodeid) == (0, 2, fd)
    assert inodes.live_count() == 2
    inodes.release(nodeid)
    assert _is_open(fd)
    inodes.release(nodeid)
    assert not _is_open(fd)
    assert inodes.live_count() == 1


def test_lookup_revives_forgotten_pinned_inode(arena, files):
    inodes = arena.inodes
    nodeid = _lookup(inodes, files[0])
    fd = inodes.acquire(nodeid)
    inodes.forget(nodeid, 1)
    assert _lookup(inodes, files[0]) == nodeid
    inodes.release(nodeid)
    assert inodes.info(nodeid) == (1, 0, fd)
    assert _is_open(fd)


def test_release_without_pin_is_ebadf(arena, files):
    nodeid = _lookup(arena.inodes, files[0])
    with pytest.raises(OSError) as e:
        arena.inodes.release(nodeid)
    assert e.value.errno == errno.EBADF
    assert arena.inodes.info(nodeid) == (1, 0, arena.inodes.info(nodeid)[2])


def test_pinned_context_releases_on_error(arena, files):
    inodes = arena.inodes
    nodeid = _lookup(inodes, files[0])
    with pytest.raises(ZeroDivisionError), inodes.pinned(nodeid) as fd:
        assert inodes.info(nodeid)[1] == 1
        assert os.fstat(fd).st_ino == files[0].stat().st_ino
        1 / 0  # noqa: B018
    assert inodes.info(nodeid)[1] == 0
    with pytest.raises(OSError), inodes.pinned(12345):
        pass


def test_index_survives_churn_with_tombstones(tmp_path, files):
    """Many distinct short-lived inodes through a tiny index: long-lived ones stay findable."""
    arena = Arena.create(max_inodes=4, max_handles=1, max_queues=1)  # 8 hash buckets
    inodes = arena.inodes
    root = _opath(tmp_path)
    inodes.set_root(root, *_key(root))
    keep = {k: inodes.lookup_or_insert(_opath(files[0]), 9, k)[0] for k in (100, 200)}
    before = _open_fds()
    for ino in range(1000, 1500):
        fd = _opath(files[1])
        nodeid, owned = inodes.lookup_or_insert(fd, 9, ino)
        assert owned
        assert inodes.lookup_or_insert(fd, 9, ino) == (nodeid, False)
        inodes.forget(nodeid, 2)
        for k, kept in keep.items():
            fd = _opath(files[0])
            assert inodes.lookup_or_insert(fd, 9, k) == (kept, False)
            os.close(fd)
            inodes.forget(kept, 1)
        # Tombstones are purged: probes keep ending at an empty bucket within a short run.
        index = _index(arena)
        assert index.count(0) * 4 >= len(index)
    assert _open_fds() == before
    assert inodes.live_count() == 3
    arena.close()


def test_random_operations_match_a_model(tmp_path, files):
    """Seeded random LOOKUP/FORGET/pin traffic against a dict model of the table."""
    rng = random.Random(1234)
    arena = Arena.create(max_inodes=12, max_handles=1, max_queues=1)
    inodes = arena.inodes
    root = _opath(tmp_path)
    inodes.set_root(root, *_key(root))
    fds_before = _open_fds()
    model: dict[int, list[int]] = {}  # ino -> [nodeid, nlookup, pins]
    dead: set[int] = set()
    for _ in range(4000):
        ino = rng.randrange(40)
        op = rng.random()
        entry = model.get(ino)
        if op < 0.4:
            fd = _opath(files[ino % len(files)])
            try:
                nodeid, owned = inodes.lookup_or_insert(fd, 5, ino)
            except OSError as e:
                assert e.errno == errno.ENFILE
                assert entry is None and len(model) == 11
                os.close(fd)
                continue
            if entry is None:
                assert owned and nodeid not in dead
                model[ino] = [nodeid, 1, 0]
            else:
                assert (nodeid, owned) == (entry[0], False)
                os.close(fd)
                entry[1] += 1
        elif entry is None:
            continue
        elif op < 0.7:
            n = rng.randrange(1, 3)
            inodes.forget(entry[0], n)
            entry[1] -= min(n, entry[1])
        elif op < 0.85 and entry[1]:
            inodes.acquire(entry[0])
            entry[2] += 1
        elif entry[2]:
            inodes.release(entry[0])
            entry[2] -= 1
        if entry is not None and entry[1] == 0 and entry[2] == 0:
            del model[ino]
            dead.add(entry[0])
            with pytest.raises(OSError):
                inodes.info(entry[0])
        elif entry is not None:
            assert inodes.info(entry[0])[:2] == (entry[1], entry[2])
        assert inodes.live_count() == 1 + len(model)
    for nodeid, nlookup, pins in list(model.values()):
        inodes.forget(nodeid, nlookup)
        for _ in range(pins):
            inodes.release(nodeid)
    assert inodes.live_count() == 1
    assert _open_fds() == fds_before
    arena.close()


# -- handles ------------------------------------------------------------------------------------


def test_handle_insert_acquire_remove(arena, files):
    handles = arena.handles
    fd = os.open(files[2], os.O_RDONLY)
    fh = handles.insert(fd, 7, os.O_RDONLY)
    assert fh != 0
    with handles.pinned(fh) as (hfd, nodeid, flags):
        assert (hfd, nodeid, flags) == (fd, 7, os.O_RDONLY)
        assert os.pread(hfd, 9, 0) == b"content 2"
    assert handles.live_count() == 1
    handles.remove(fh)
    assert not _is_open(fd)
    assert handles.live_count() == 0
    for op in (handles.acquire, handles.remove, handles.release):
        with pytest.raises(OSError) as e:
            op(fh)
        assert e.value.errno == errno.EBADF


def test_handle_remove_while_pinned(arena, files):
    handles = arena.handles
    fd = os.open(files[0], os.O_RDONLY)
    fh = handles.insert(fd, 2, 0)
    handles.acquire(fh)
    handles.remove(fh)
    # Unusable at once (a second RELEASE or a new READ gets EBADF), yet open for the reader.
    with pytest.raises(OSError):
        handles.acquire(fh)
    with pytest.raises(OSError):
        handles.remove(fh)
    assert os.pread(fd, 7, 0) == b"content"
    assert handles.live_count() == 1
    handles.release(fh)
    assert not _is_open(fd)
    assert handles.live_count() == 0


def test_stale_fh_and_full_handle_table(arena, files):
    handles = arena.handles
    fhs = [handles.insert(os.open(files[0], os.O_RDONLY), 2, 0) for _ in range(8)]
    fd = os.open(files[0], os.O_RDONLY)
    with pytest.raises(OSError) as e:
        handles.insert(fd, 2, 0)
    assert e.value.errno == errno.ENFILE
    handles.remove(fhs[3])
    fh = handles.insert(fd, 3, 0)
    assert fh & 0xFFFFFFFF == fhs[3] & 0xFFFFFFFF and fh != fhs[3]
    with pytest.raises(OSError):
        handles.acquire(fhs[3])
    assert handles.acquire(fh) == (fd, 3, 0)
    handles.release(fh)
    for bogus in (0, 9, -1, 1 << 64):
        with pytest.raises(OSError) as e:
            handles.acquire(bogus)
        assert e.value.errno == errno.EBADF


# -- counters -----------------------------------------------------------------------------------


def test_queue_counters(arena):
    counters = arena.counters
    counters.add(0)
    counters.add(3, 41)
    counters.add(3)
    assert counters.get(3) == 42
    assert counters.snapshot() == [1, 0, 0, 42]
    for bad in (-1, 4):
        with pytest.raises(IndexError):
            counters.add(bad)
        with pytest.raises(IndexError):
            counters.get(bad)


def test_queue_counters_are_atomic_across_processes(arena):
    def body() -> None:
        for _ in range(20000):
            arena.counters.add(1)

    # A forked writer and the parent race on the same word.
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    body()
    assert _wait(pid) == 0
    assert arena.counters.get(1) == 40000


# -- several processes --------------------------------------------------------------------------


def test_forked_child_updates_are_seen_by_parent(arena, files):
    inodes, handles = arena.inodes, arena.handles
    fd = _opath(files[0])  # inherited: the same number is valid in both processes
    file_fd = os.open(files[1], os.O_RDONLY)
    r, w = os.pipe()

    def child() -> None:
        nodeid, owned = inodes.lookup_or_insert(fd, *_key(fd))
        assert owned
        inodes.acquire(nodeid)
        inodes.release(nodeid)
        fh = handles.insert(file_fd, nodeid, os.O_RDONLY)
        os.write(w, f"{nodeid} {fh}".encode())

    assert _run_child(child) == 0
    os.close(w)
    nodeid, fh = map(int, os.read(r, 100).split())
    os.close(r)
    assert inodes.info(nodeid) == (1, 0, fd)
    fst = os.fstat(fd)
    assert _lookup(inodes, files[0]) == nodeid  # the child's insert is in the shared index
    assert inodes.acquire(nodeid) == fd
    inodes.release(nodeid)
    assert handles.acquire(fh) == (file_fd, nodeid, os.O_RDONLY)
    handles.release(fh)
    handles.remove(fh)
    inodes.forget(nodeid, 2)
    assert not _is_open(fd) and not _is_open(file_fd)
    assert fst.st_ino == files[0].stat().st_ino


def test_fd_opened_by_one_worker_is_used_by_another(arena, files):
    """Workers share one fd table (CLONE_FILES): an fd inserted by one works in the other."""
    inodes = arena.inodes
    r, w = os.pipe()

    def child() -> None:
        os.write(w, str(_lookup(inodes, files[4])).encode())

    assert _run_child(child, native.CLONE_FILES) == 0
    nodeid = int(os.read(r, 100))
    os.close(r)
    os.close(w)
    with inodes.pinned(nodeid) as fd:
        assert os.fstat(fd).st_ino == files[4].stat().st_ino
    inodes.forget(nodeid, 1)
    assert not _is_open(fd)


def test_pin_in_one_worker_defers_forget_in_another(arena, files):
    """FORGET on one queue while a request on another uses the fd: no close until unpinned."""
    inodes = arena.inodes
    nodeid = _lookup(inodes, files[5])
    fd = inodes.info(nodeid)[2]
    pinned_r, pinned_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = native.clone_process(native.CLONE_FILES)
    if pid == 0:
        code = 1
        try:
            got = inodes.acquire(nodeid)
            os.write(pinned_w, b"x")
            _read_within(go_r)
            ok = os.fstat(got).st_ino == files[5].stat().st_ino
            inodes.release(nodeid)
            code = 0 if ok else 2
        finally:
            os._exit(code)
    assert _read_within(pinned_r) == b"x"
    inodes.forget(nodeid, 1)
    assert _is_open(fd)
    assert inodes.info(nodeid) == (0, 1, fd)
    os.write(go_w, b"x")
    assert _wait(pid) == 0
    assert not _is_open(fd)
    assert inodes.live_count() == 1
    for p in (pinned_r, pinned_w, go_r, go_w):
        os.close(p)


@pytest.mark.parametrize("table", ["inodes", "handles"])
def test_dead_lock_holder_does_not_wedge(arena, files, table):
    lockp = getattr(arena, table)._lockp

    def die_holding_lock() -> None:
        assert native.lib.vfs_lock(lockp, os.getpid()) == 0
        os._exit(0)

    assert _run_child(die_holding_lock) == 0  # reaped: its pid is gone now

    def use_table() -> None:
        if table == "inodes":
            _lookup(arena.inodes, files[0])
        else:
            arena.handles.insert(os.open(files[0], os.O_RDONLY), 2, 0)

    assert _run_child(use_table, native.CLONE_FILES, timeout=10) == 0
    assert getattr(arena, table).repairs == 1
    assert getattr(arena, table).live_count() == (2 if table == "inodes" else 1)


def test_concurrent_workers_keep_counts_consistent(arena, files):
    """Four workers sharing the fd table run LOOKUP/pin/FORGET and open/read/RELEASE cycles on
    the same files; every pinned fd must still be the right file, and nothing may leak."""
    inodes, handles = arena.inodes, arena.handles
    fds_before = _open_fds()
    inos = [p.stat().st_ino for p in files]

    def worker() -> int:
        rng = random.Random(os.getpid())
        for _ in range(300):
            i = rng.randrange(len(files))
            nodeid = _lookup(inodes, files[i])
            with inodes.pinned(nodeid) as fd:
                if os.fstat(fd).st_ino != inos[i]:
                    return 2
            fh = handles.insert(os.open(files[i], os.O_RDONLY), nodeid, 0)
            with handles.pinned(fh) as (fd, owner, _):
                if owner != nodeid or os.pread(fd, 16, 0) != f"content {i}".encode():
                    return 3
            handles.remove(fh)
            inodes.forget(nodeid, 1)
        return 0

    pids = []
    for _ in range(4):
        pid = native.clone_process(native.CLONE_FILES)
        if pid == 0:
            code = 1
            try:
                code = worker()
            finally:
                os._exit(code)
        pids.append(pid)
    codes = [_wait(pid) for pid in pids]
    assert codes == [0, 0, 0, 0]
    assert inodes.live_count() == 1
    assert handles.live_count() == 0
    assert _open_fds() == fds_before
    assert inodes.repairs == 0


def test_create_validates_sizes_and_close_is_idempotent():
    for bad in ({"max_inodes": 0}, {"max_handles": 0}, {"max_queues": 0},
                {"max_inodes": (1 << 30) + 1}):
        with pytest.raises(ValueError):
            Arena.create(**bad)
    arena = Arena.create(max_inodes=2, max_handles=1, max_queues=1)
    assert arena.inodes.live_count() == 0  # no root yet
    with pytest.raises(OSError):
        arena.inodes.acquire(InodeTable.ROOT)
    arena.close()
    arena.close()
    with pytest.raises(TypeError):
        arena.inodes.live_count()   # unmapped: refused, never a read of freed memory


def test_session_end_releases_every_inode_and_handle(tmp_path) -> None:
    """DESTROY / a new INIT: all inodes but the root and all handles go; pinned fds wait."""
    arena = Arena.create(max_inodes=64, max_handles=16)
    root = os.open(tmp_path, os.O_PATH)
    st = os.fstat(root)
    arena.inodes.set_root(root, st.st_dev, st.st_ino)
    fds = []
    ids = []
    for i in range(5):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x")
        fd = os.open(p, os.O_PATH)
        fds.append(fd)
        fst = os.fstat(fd)
        ids.append(arena.inodes.lookup_or_insert(fd, fst.st_dev, fst.st_ino)[0])
    pinned = arena.inodes.acquire(ids[0])
    fh_fd = os.open(tmp_path / "f1", os.O_RDONLY)
    fh = arena.handles.insert(fh_fd, ids[1], 0)
    assert arena.handles.acquire(fh)[0] == fh_fd
    arena.handles.release(fh)
    held_fd = os.open(tmp_path / "f2", os.O_RDONLY)
    held = arena.handles.insert(held_fd, ids[2], 0)
    arena.handles.acquire(held)

    arena.handles.remove_all()
    arena.inodes.forget_all()

    assert arena.inodes.acquire(1) == root
    arena.inodes.release(1)
    for nodeid in ids:
        with pytest.raises(OSError) as e:
            arena.inodes.acquire(nodeid)
        assert e.value.errno == errno.EBADF
    for fd in fds[1:]:
        with pytest.raises(OSError):
            os.fstat(fd)
    os.fstat(pinned)                       # still pinned by a request in flight
    with pytest.raises(OSError):
        os.fstat(fh_fd)
    with pytest.raises(OSError):
        arena.handles.acquire(fh)
    os.fstat(held_fd)
    arena.inodes.release(ids[0])
    arena.handles.release(held)
    with pytest.raises(OSError):
        os.fstat(pinned)
    with pytest.raises(OSError):
        os.fstat(held_fd)
    assert arena.inodes.live_count() == 1
    assert arena.handles.live_count() == 0


def test_fd_budget_caps_inodes_and_handles_together(arena, files):
    """Past the budget a new inode or handle is ENFILE; known inodes are still found, and a
    freed entry makes room again.  0 lifts the cap."""
    inodes, handles = arena.inodes, arena.handles
    a = _lookup(inodes, files[0])
    fh = handles.insert(os.open(files[0], os.O_RDONLY), a, 0)
    arena.limit_fds(3)                       # root + a + fh: at the budget
    assert arena.fd_budget == 3
    fd = _opath(files[1])
    with pytest.raises(OSError) as e:
        inodes.lookup_or_insert(fd, *_key(fd))
    assert e.value.errno == errno.ENFILE and "open files" in e.value.strerror
    with pytest.raises(OSError) as e:
        handles.insert(fd, a, 0)
    assert e.value.errno == errno.ENFILE
    assert _is_open(fd)                      # still the caller's
    assert _lookup(inodes, files[0]) == a    # known: found, not refused
    handles.remove(fh)
    b, owned = inodes.lookup_or_insert(fd, *_key(fd))
    assert owned and b != a
    arena.limit_fds(0)
    fh = handles.insert(os.open(files[0], os.O_RDONLY), a, 0)
    assert arena.usage() == (3, 1)
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError):
            arena.limit_fds(bad)


# -- fh 0: a handle restored from the Rust virtiofsd, whose fhs count from 0 (common/rsstate.py)


def test_handle_zero_is_only_ever_restored(arena, files):
    handles = arena.handles
    fd0 = os.open(files[0], os.O_RDONLY)
    arena.restore_handle(0, fd0, 5, os.O_RDONLY)
    arena.restored()
    assert [(h.fh, h.nodeid) for h in arena.handle_entries()] == [(0, 5)]
    assert handles.live_count() == 1
    with handles.pinned(0) as (hfd, nodeid, _flags):
        assert (hfd, nodeid) == (fd0, 5) and os.pread(hfd, 9, 0) == b"content 0"
    # New handles never get slot 0, before or after fh 0 is gone.
    fd1 = os.open(files[1], os.O_RDONLY)
    fh1 = handles.insert(fd1, 6, os.O_RDONLY)
    assert fh1 & 0xFFFFFFFF != 0
    handles.remove(0)
    assert not _is_open(fd0) and handles.live_count() == 1
    with pytest.raises(OSError) as e:
        handles.acquire(0)
    assert e.value.errno == errno.EBADF
    fhs = {fh1}
    for i in range(2, 8):          # the rest of the table (8 slots, 1..8): slot 0 never reused
        fhs.add(handles.insert(os.open(files[i], os.O_RDONLY), 6, os.O_RDONLY))
    fhs.add(handles.insert(os.open(files[0], os.O_RDONLY), 6, os.O_RDONLY))
    assert all(fh & 0xFFFFFFFF for fh in fhs) and handles.live_count() == 8


def test_handle_zero_goes_with_the_session(arena, files):
    fd0 = os.open(files[0], os.O_RDONLY)
    arena.restore_handle(0, fd0, 5, os.O_RDONLY)
    arena.restored()
    arena.handles.remove_all()
    assert not _is_open(fd0) and arena.handles.live_count() == 0
    assert arena.handle_entries() == []


def test_inode_slot_zero_stays_invalid(arena, files):
    fd = _opath(files[0])
    with pytest.raises(OSError) as e:
        arena.restore_inode(0, fd, 1, *_key(fd), 0)
    assert e.value.errno == errno.EINVAL
    os.close(fd)
