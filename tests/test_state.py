"""The shared state's C (common/state.c) where the Python API cannot reach: a process killed
between any two stores of an update, a real SIGKILL of a busy lock holder, the index's probe
chains and tombstones, generation wrap, the header checks, the journal's guards.

Crash points: state.c marks the places between the stores of an update with VFS_CRASH_POINT();
this module builds a test copy of state.c (a separate cffi module) where the n-th crash point
reached calls _exit(), runs one update in a child sharing the fd table, and then checks, from
the product module, that the next user repaired the tables into a consistent state.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import random
import select
import signal
import struct
import subprocess
import traceback
from collections.abc import Callable

import pytest
from cffi import FFI

from pyvirtiofsd.common import native
from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.journal import Effect, Journal, PinKind, PreState, SlotState

_COMMON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "common")
# The build script itself (not an installed module): its cdef of state.h and its flags.
_spec = importlib.util.spec_from_file_location("native_build",
                                               os.path.join(_COMMON, "native_build.py"))
native_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native_build)

_HARNESS = r"""
#include <unistd.h>
/* Test build only: die at the n-th crash point reached (0: never), count the points passed. */
static int crash_countdown, crash_passed;
static void crash_point(void)
{
    crash_passed++;
    if (crash_countdown && --crash_countdown == 0)
        _exit(0);
}
#define VFS_CRASH_POINT() crash_point()
void vfs_test_crash_after(int n) { crash_countdown = n; crash_passed = 0; }
int vfs_test_crash_passed(void) { return crash_passed; }
#include "state.c"
"""

LOW32 = 0xFFFFFFFF
TOMB = 0xFFFFFFFF


@pytest.fixture(scope="module")
def crashlib(tmp_path_factory):
    """The test build of state.c (crash points, UBSan), compiled once for this module."""
    ffi = FFI()
    ffi.cdef(native_build.state_cdef()
             + "void vfs_test_crash_after(int n); int vfs_test_crash_passed(void);")
    # Undefined behaviour (a misaligned word, an overflowing shift) aborts the child here.
    ubsan = ["-fsanitize=undefined", "-fno-sanitize-recover=undefined"]
    ffi.set_source("_state_crash", _HARNESS, include_dirs=[_COMMON],
                   extra_compile_args=native_build.CFLAGS + ubsan, extra_link_args=ubsan)
    out = tmp_path_factory.mktemp("crashlib")
    path = ffi.compile(tmpdir=str(out))
    spec = importlib.util.spec_from_file_location("_state_crash", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_state_c_compiles_alone_warning_free(tmp_path):
    """state.c is a source of its own (the engine's module lists it too): it must build without
    the cffi wrapper, under the strictest warnings we hold it to."""
    out = tmp_path / "state.o"
    cmd = ["cc", "-std=gnu11", "-O2", "-c", "-Wall", "-Wextra", "-Werror", "-Wpedantic",
           "-Wshadow", "-Wconversion", "-fno-strict-aliasing", "-I", _COMMON,
           os.path.join(_COMMON, "state.c"), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0


# -- helpers -------------------------------------------------------------------------------------

def _wait(pid: int, timeout: float = 30.0) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} did not finish within {timeout}s")
    finally:
        os.close(pidfd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _in_child(body: Callable[[], int]) -> int:
    """Run `body` in a child sharing our fd table, as a queue worker does; its exit status."""
    pid = native.clone_process(native.CLONE_FILES)
    if pid == 0:
        code = 1
        try:
            code = body()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return _wait(pid)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


def _view_of(crashlib, arena: Arena):
    """A struct vfs_arena of the test build over the same mapping."""
    c = crashlib.ffi.new("struct vfs_arena *")
    base = crashlib.ffi.cast("void *", int(native.ffi.cast("uintptr_t", arena._c.base)))
    assert crashlib.lib.vfs_arena_attach(c, base, arena._c.size, os.getpid()) == 0
    return c


def _keys_in_buckets(buckets: int, wanted: list[int], dev: int = 9,
                     start: int = 1000) -> list[int]:
    """Inode numbers (with `dev`, mnt_id 0) whose first bucket is each of `wanted`, in order."""
    out = []
    ino = start
    for bucket in wanted:
        while native.lib.vfs_inode_hash(dev, ino, 0) & (buckets - 1) != bucket:
            ino += 1
        out.append(ino)
        ino += 1
    return out


def _tables(arena: Arena) -> dict:
    """Decode both tables' headers and state words straight from the mapping."""
    c, mm = arena._c, arena._mm
    out = {}
    for name, hdr, off, esize, next_off, cap, first in (
            ("inodes", 64, c.inodes_off, 56, 48, c.max_inodes, 2),
            ("handles", 128, c.handles_off, 32, 28, c.max_handles, 1)):
        lock, free_head, hwm, live, used, repairs = struct.unpack_from("=6I", mm, hdr)
        entries = {}
        for slot in range(1, cap + 1):
            e = off + slot * esize
            state, aux, pins, fd = struct.unpack_from("=QQIi", mm, e)
            key = struct.unpack_from("=QQQ", mm, e + 24) if name == "inodes" else None
            nxt = struct.unpack_from("=I", mm, e + next_off)[0]
            entries[slot] = (state, aux, pins, fd, key, nxt)
        out[name] = dict(lock=lock, free_head=free_head, hwm=hwm, live=live, used=used,
                         repairs=repairs, entries=entries, cap=cap, first=first)
    idx = native.ffi.cast("uint32_t *", c.base + c.index_off)
    out["index"] = [idx[i] for i in range(c.buckets)]
    return out


def _check_consistent(arena: Arena) -> None:
    """Every derived field agrees with the state words, and every live entry's fd is open."""
    t = _tables(arena)
    for name in ("inodes", "handles"):
        tab = t[name]
        ents, first, cap = tab["entries"], tab["first"], tab["cap"]
        assert tab["lock"] == 0, name
        assert first <= tab["hwm"] <= cap + 1, name
        for slot, (state, *_rest) in ents.items():
            if slot >= tab["hwm"]:
                assert state & LOW32 == 0, f"{name} slot {slot} used above the high-water mark"
        used = [s for s, e in ents.items() if e[0] & LOW32]
        assert tab["live"] == len(used), name
        for s in used:
            assert _is_open(ents[s][3]), f"{name} slot {s} owns a closed fd"
        chain, s = [], tab["free_head"]
        while s:
            assert s not in chain and first <= s < tab["hwm"], f"{name} free list"
            chain.append(s)
            s = ents[s][5]
        assert sorted(chain) == [s for s in range(first, tab["hwm"]) if not ents[s][0] & LOW32]
    ents, index = t["inodes"]["entries"], t["index"]
    mask = len(index) - 1
    assert t["inodes"]["used"] == sum(1 for b in index if b), "index_used"
    indexed = [b for b in index if b not in (0, TOMB)]
    live = [s for s in range(2, t["inodes"]["hwm"]) if ents[s][0] & LOW32]
    assert sorted(indexed) == live, "every live inode indexed exactly once"
    for slot in live:
        dev, ino, mnt_id = ents[slot][4]
        b = native.lib.vfs_inode_hash(dev, ino, mnt_id) & mask
        while index[b] != slot:
            assert index[b] != 0, f"inode slot {slot} not reachable from its bucket"
            b = (b + 1) & mask


def _fill_to_capacity(arena: Arena, path) -> None:
    """The free list and high-water mark hand out exactly the free slots, then ENFILE."""
    inodes, handles = arena.inodes, arena.handles
    spare = arena._c.max_inodes - inodes.live_count()
    got = []
    for i in range(spare):
        fd = os.open(path, os.O_PATH)
        nodeid, owned = inodes.lookup_or_insert(fd, 77, 1_000_000 + i)
        assert owned
        got.append(nodeid)
    fd = os.open(path, os.O_PATH)
    with pytest.raises(OSError) as e:
        inodes.lookup_or_insert(fd, 77, 2_000_000)
    assert e.value.errno == errno.ENFILE
    os.close(fd)
    fhs = [handles.insert(os.open(path, os.O_RDONLY), 2, 0)
           for _ in range(arena._c.max_handles - handles.live_count())]
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(OSError) as e:
        handles.insert(fd, 2, 0)
    assert e.value.errno == errno.ENFILE
    os.close(fd)
    for fh in fhs:
        handles.remove(fh)
    for nodeid in got:
        inodes.forget(nodeid, 1)
    _check_consistent(arena)


# -- a process killed between any two stores of an update ----------------------------------------

class _Scene:
    """One arena prepared for one update, and that update as the test build runs it."""

    def __init__(self, tmp_path, crashlib, op: str) -> None:
        self.path = tmp_path / "f"
        self.path.write_bytes(b"data")
        self.arena = Arena.create(max_inodes=4, max_handles=3, max_queues=1)
        self.lib, self.ffi = crashlib.lib, crashlib.ffi
        inodes, handles = self.arena.inodes, self.arena.handles
        root = os.open(tmp_path, os.O_PATH)
        inodes.set_root(root, *self._key(root))
        buckets = self.arena._c.buckets
        self.op = op
        self.fd = os.open(self.path, os.O_PATH)       # for an insert: the child's new fd
        self.kept = self._insert(9, _keys_in_buckets(buckets, [5])[0])
        if op == "inode insert, index rebuilt":
            # Tombstones in buckets 0..3 (each freed while the next bucket was in use), live
            # entries in 4 and 5: the next insert into an empty bucket passes 3/4 and rebuilds.
            inos = _keys_in_buckets(buckets, [0, 1, 2, 3, 4], start=5000)
            prev = None
            for ino in inos:
                nodeid = self._insert(9, ino)
                if prev is not None:
                    inodes.forget(prev, 1)
                prev = nodeid
            assert _tables(self.arena)["index"].count(TOMB) == 4
            self.new_ino = _keys_in_buckets(buckets, [6], start=9000)[0]
        else:
            self.new_ino = _keys_in_buckets(buckets, [5], start=9000)[0]  # probes past kept
        if op != "inode insert, index rebuilt":   # (no room left for it there)
            self.victim = self._insert(9, _keys_in_buckets(buckets, [5], start=7000)[0])
        if op == "inode release frees":
            inodes.acquire(self.victim)
            inodes.forget(self.victim, 1)
        self.fh = handles.insert(os.open(self.path, os.O_RDONLY), self.kept, 0)
        self.fh2 = handles.insert(os.open(self.path, os.O_RDONLY), self.kept, 0)
        if op in ("handle release frees", "remove_all"):
            handles.acquire(self.fh)
            if op == "handle release frees":
                handles.remove(self.fh)
        if op == "forget_all":
            inodes.acquire(self.kept)
        self.fds_before = len(os.listdir("/proc/self/fd"))
        self.view = _view_of(crashlib, self.arena)

    @staticmethod
    def _key(fd: int) -> tuple[int, int]:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    def _insert(self, dev: int, ino: int) -> int:
        nodeid, owned = self.arena.inodes.lookup_or_insert(os.open(self.path, os.O_PATH), dev,
                                                           ino)
        assert owned
        return nodeid

    def run(self) -> None:
        """The update, through the test build (in the child)."""
        lib, ffi, a = self.lib, self.ffi, self.view
        u64, i = ffi.new("uint64_t *"), ffi.new("int *")
        op = self.op
        if op.startswith("inode insert"):
            assert lib.vfs_inode_lookup_or_insert(a, self.fd, 9, self.new_ino, 0, u64, i) == 0
        elif op == "inode forget frees":
            assert lib.vfs_inode_forget(a, self.victim, 1, u64) == 0
        elif op == "inode release frees":
            assert lib.vfs_inode_release(a, self.victim) == 0
        elif op == "forget_all":
            assert lib.vfs_inode_forget_all(a) == 0
        elif op == "handle insert":
            assert lib.vfs_handle_insert(a, self.fd, self.kept, 0, u64) == 0
        elif op == "handle remove frees":
            assert lib.vfs_handle_remove(a, self.fh) == 0
        elif op == "handle release frees":
            assert lib.vfs_handle_release(a, self.fh) == 0
        elif op == "remove_all":
            assert lib.vfs_handle_remove_all(a) == 0
        else:
            raise AssertionError(op)

    def close(self) -> None:
        """Unmap, closing the fds the tables (and a crashed insert) left open."""
        t = _tables(self.arena)
        fds = {e[3] for name in ("inodes", "handles") for e in t[name]["entries"].values()
               if e[0] & LOW32}
        for fd in fds | {self.fd}:
            try:
                os.close(fd)
            except OSError:
                pass
        self.arena.close()


_OPS = ["inode insert", "inode insert, index rebuilt", "inode forget frees",
        "inode release frees", "forget_all", "handle insert", "handle remove frees",
        "handle release frees", "remove_all"]


@pytest.mark.parametrize("op", _OPS)
def test_kill_between_any_two_stores_is_repaired(tmp_path, crashlib, op):
    """For every crash point n of the update: die there with the lock held; the next user takes
    the lock over, rebuilds free list, live count and index from the state words, and every
    entry that survived is still found under its id."""
    n = 0
    while True:
        n += 1
        where = tmp_path / f"{n}"
        where.mkdir()
        scene = _Scene(where, crashlib, op)

        def child(scene=scene, n=n) -> int:
            scene.view.pid = os.getpid()
            scene.lib.vfs_test_crash_after(n)
            scene.run()
            return 3                    # ran to the end: n is past the last crash point

        status = _in_child(child)
        assert status in (0, 3), f"{op}: child failed at crash point {n}"
        arena = scene.arena
        inodes = arena.inodes
        assert inodes.live_count() >= 1          # takes the lock: repairs after a crash
        assert arena.handles.live_count() >= 0
        touched, other = ((arena.handles, inodes) if op.startswith("handle")
                          or op == "remove_all" else (inodes, arena.handles))
        assert touched.repairs == (1 if status == 0 else 0) and other.repairs == 0
        _check_consistent(arena)
        # What survived is still there under its id (forget_all left it only its pin).
        if op == "forget_all":
            assert inodes.info(scene.kept)[1] == 1
        else:
            assert inodes.acquire(scene.kept) >= 0
            inodes.release(scene.kept)
        st = os.fstat(scene.fd)
        fd = os.open(scene.path, os.O_PATH)
        again, owned = inodes.lookup_or_insert(fd, 9, scene.new_ino)
        if not owned:
            os.close(fd)        # the crashed insert was committed: found, not duplicated
        assert os.fstat(inodes.info(again)[2]).st_ino == st.st_ino
        if op == "inode insert, index rebuilt" and status == 3:
            assert TOMB not in _tables(arena)["index"]      # the rebuild dropped them
        _fill_to_capacity(arena, scene.path)
        scene.close()
        if status == 3:
            break
    assert n > 2, f"{op}: only {n - 1} crash points reached"


def test_sigkill_of_a_busy_lock_holder_is_repaired(tmp_path):
    """Real SIGKILLs at arbitrary moments of a worker hammering both tables."""
    path = tmp_path / "f"
    path.write_bytes(b"x")
    arena = Arena.create(max_inodes=32, max_handles=8, max_queues=1)
    root = os.open(tmp_path, os.O_PATH)
    arena.inodes.set_root(root, *_Scene._key(root))
    rng = random.Random(1234)
    for _ in range(20):
        r, w = os.pipe()

        def busy(w=w) -> int:
            inodes, handles = arena.inodes, arena.handles
            os.write(w, b"go")
            i = 0
            while True:
                i += 1
                fd = os.open(path, os.O_PATH)
                nodeid, owned = inodes.lookup_or_insert(fd, 5, i % 20)
                if not owned:
                    os.close(fd)
                fh = handles.insert(os.open(path, os.O_RDONLY), nodeid, 0)
                handles.remove(fh)
                inodes.forget(nodeid, 1 if i % 3 else 0)
                if i % 50 == 0:
                    inodes.forget_all()

        pid = native.clone_process(native.CLONE_FILES)
        if pid == 0:
            try:
                busy()
            finally:
                os._exit(1)
        ready, _, _ = select.select([r], [], [], 30)   # (one fd table: close after reading)
        assert ready and os.read(r, 2) == b"go"
        os.close(r)
        os.close(w)
        for _ in range(rng.randrange(20000)):     # a different moment each round
            pass
        os.kill(pid, signal.SIGKILL)
        assert _wait(pid) == -signal.SIGKILL
        assert arena.inodes.live_count() >= 1 and arena.handles.live_count() >= 0
        _check_consistent(arena)
    _fill_to_capacity(arena, path)
    arena.close()


# -- the index ------------------------------------------------------------------------------------

def test_tombstones_keep_probe_chains_and_are_purged_from_the_tail(tmp_path):
    """Colliding keys form one probe chain; removing one from its middle leaves a tombstone the
    later keys are still found through; removing the chain's tail empties it and the tombstones
    before it."""
    path = tmp_path / "f"
    path.write_bytes(b"x")
    arena = Arena.create(max_inodes=8, max_handles=1, max_queues=1)   # 16 buckets
    inodes = arena.inodes
    b = 3
    inos = _keys_in_buckets(arena._c.buckets, [b] * 4)
    ids = [inodes.lookup_or_insert(os.open(path, os.O_PATH), 9, ino)[0] for ino in inos]
    index = _tables(arena)["index"]
    assert index[b:b + 4] == [i & LOW32 for i in ids]
    inodes.forget(ids[1], 1)
    inodes.forget(ids[2], 1)
    assert _tables(arena)["index"][b:b + 4] == [ids[0] & LOW32, TOMB, TOMB, ids[3] & LOW32]
    fd = os.open(path, os.O_PATH)
    assert inodes.lookup_or_insert(fd, 9, inos[3]) == (ids[3], False)
    os.close(fd)
    _check_consistent(arena)
    inodes.forget(ids[3], 2)
    assert _tables(arena)["index"][b:b + 4] == [ids[0] & LOW32, 0, 0, 0]
    assert _tables(arena)["inodes"]["used"] == 1
    _check_consistent(arena)
    arena.close()


def test_index_wraps_around_its_end(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    arena = Arena.create(max_inodes=8, max_handles=1, max_queues=1)
    inodes = arena.inodes
    last = arena._c.buckets - 1
    inos = _keys_in_buckets(arena._c.buckets, [last] * 3)
    ids = [inodes.lookup_or_insert(os.open(path, os.O_PATH), 9, ino)[0] for ino in inos]
    index = _tables(arena)["index"]
    assert (index[last], index[0], index[1]) == tuple(i & LOW32 for i in ids)
    inodes.forget(ids[0], 1)
    fd = os.open(path, os.O_PATH)
    assert inodes.lookup_or_insert(fd, 9, inos[2]) == (ids[2], False)
    os.close(fd)
    _check_consistent(arena)
    arena.close()


def test_hash_is_fixed():
    """The bucket of a key is part of the shared layout: the same in every build and process."""
    assert native.lib.vfs_inode_hash(0, 0, 0) == 0
    assert native.lib.vfs_inode_hash(2049, 131, 0) == native.lib.vfs_inode_hash(2049, 131, 0)
    spread = {native.lib.vfs_inode_hash(2049, ino, 0) & 1023 for ino in range(1000)}
    assert len(spread) > 550        # sequential inode numbers do not pile into a few buckets


# -- ids ------------------------------------------------------------------------------------------

def test_generation_wraps_and_stale_ids_stay_stale(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    arena = Arena.create(max_inodes=4, max_handles=2, max_queues=1)
    inodes, handles = arena.inodes, arena.handles
    first = inodes.lookup_or_insert(os.open(path, os.O_PATH), 9, 1)[0]
    slot = first & LOW32
    inodes.forget(first, 1)
    # Age the (free) slot to the last generation, as 2**32 - 1 reuses would.
    state_word = native.ffi.cast("uint64_t *", arena._c.base + arena._c.inodes_off + slot * 56)
    state_word[0] = LOW32 << 32
    old = inodes.lookup_or_insert(os.open(path, os.O_PATH), 9, 2)[0]
    assert old == (LOW32 << 32) | slot
    inodes.forget(old, 1)
    new = inodes.lookup_or_insert(os.open(path, os.O_PATH), 9, 3)[0]
    # Generation 0 again: the id of 2**32 generations ago (`first`) names the slot again, the
    # last generation's does not.
    assert new == slot == first
    with pytest.raises(OSError) as e:
        inodes.acquire(old)
    assert e.value.errno == errno.EBADF
    fh_word = native.ffi.cast("uint64_t *", arena._c.base + arena._c.handles_off + 32)
    fh_word[0] = LOW32 << 32
    fh = handles.insert(os.open(path, os.O_RDONLY), new, 0)
    assert fh == (LOW32 << 32) | 1
    handles.remove(fh)
    assert handles.insert(os.open(path, os.O_RDONLY), new, 0) == 1
    with pytest.raises(OSError):
        handles.acquire(fh)
    _check_consistent(arena)
    arena.close()


# -- the header and the journal's guards ---------------------------------------------------------

def test_attach_checks_the_header():
    arena = Arena.create(max_inodes=4, max_handles=2, max_queues=2)
    c = arena._c
    view = native.ffi.new("struct vfs_arena *")
    assert native.lib.vfs_arena_attach(view, c.base, c.size, 1) == 0
    assert (view.max_inodes, view.buckets, view.max_handles, view.max_queues) == (4, 8, 2, 2)
    assert native.lib.vfs_arena_attach(view, c.base, c.size - 1, 1) == -errno.EINVAL
    assert native.lib.vfs_arena_attach(view, c.base + 64, c.size - 64, 1) == -errno.EINVAL
    version = native.ffi.cast("uint32_t *", c.base + 8)
    version[0] = 1                      # the layout of Python-hashed indexes
    assert native.lib.vfs_arena_attach(view, c.base, c.size, 1) == -errno.EINVAL
    version[0] = 2
    buckets = native.ffi.cast("uint32_t *", c.base + 20)
    buckets[0] = 16
    assert native.lib.vfs_arena_attach(view, c.base, c.size, 1) == -errno.EINVAL
    assert native.lib.vfs_arena_size(0, 1, 1) == 0
    assert native.lib.vfs_arena_size(1, 1, (1 << 30) + 1) == 0
    arena.close()


def test_journal_guards_heads_and_pin_room():
    journal = Journal.create(1, 4)
    jq = journal.queue(0)
    with pytest.raises(IndexError):
        jq.popped(4, 0, 1, 1)
    assert native.lib.vfs_jq_popped(jq.cdata, 4, 0, 1, 1, 1) == (1 << 64) - 1
    assert [jq.pin(PinKind.INODE, 100 + i) for i in range(9)] == [*range(8), -1]
    jq.unpin(PinKind.HANDLE, 103)       # another kind: not this record
    assert len(jq.pins()) == 8
    jq.unpin(PinKind.INODE, 103)
    assert (PinKind.INODE, 103) not in jq.pins() and len(jq.pins()) == 7
    assert jq.pin(PinKind.HANDLE, 7) == 3


def test_journaled_changes_record_in_order(tmp_path):
    """Pins recorded while held, effects after the change, FORGET announced with the count it
    found and counted after."""
    path = tmp_path / "f"
    path.write_bytes(b"x")
    arena = Arena.create(max_inodes=8, max_handles=2, max_queues=1)
    jq = Journal.create(1, 4).queue(0)
    inodes, handles = arena.inodes, arena.handles
    counter = jq.popped(0, 0, 1, 99)
    nodeid, owned = inodes.lookup_or_insert_journaled(jq, os.open(path, os.O_PATH), 9, 1)
    assert owned
    fd = inodes.acquire_journaled(jq, nodeid)
    assert jq.pins() == [(PinKind.INODE, nodeid)]
    fh = handles.insert_journaled(jq, os.open(path, os.O_RDONLY), nodeid, 0)
    assert handles.acquire_journaled(jq, fh)[1] == nodeid
    assert sorted(jq.pins()) == [(PinKind.INODE, nodeid), (PinKind.HANDLE, fh)]
    handles.release_journaled(jq, fh)
    inodes.release_journaled(jq, nodeid)
    assert jq.pins() == []
    assert _is_open(fd)
    assert jq.owns_effects(counter)
    assert jq.pop_effect() == (Effect.HANDLE, fh)
    assert jq.pop_effect() == (Effect.LOOKUP, nodeid)
    assert jq.pop_effect() is None
    with pytest.raises(OSError):
        inodes.acquire_journaled(jq, nodeid + (1 << 32))
    assert jq.pins() == []                          # a failed pin is not recorded
    inodes.forget_journaled(jq, nodeid, 1)
    assert jq.hints() == (1, None, False)
    assert not _is_open(fd)
    inodes.forget_journaled(jq, nodeid, 1)          # stale now: counted, changes nothing
    assert jq.hints() == (2, None, False)
    arena.close()


def test_journaled_forget_killed_midway_leaves_its_announcement(tmp_path, crashlib):
    """A worker killed inside a journaled FORGET (after the announcement, before the count):
    the journal names the FORGET and the count it saw, so a replay can tell it went through."""
    path = tmp_path / "f"
    path.write_bytes(b"x")
    n = 0
    while True:
        n += 1
        arena = Arena.create(max_inodes=8, max_handles=1, max_queues=1)
        jq = Journal.create(1, 4).queue(0)
        nodeid, _ = arena.inodes.lookup_or_insert(os.open(path, os.O_PATH), 9, 1)
        jq.popped(0, 0, 2, 7)
        view = _view_of(crashlib, arena)
        tq = crashlib.ffi.cast("struct vfs_jq *", jq.address)

        def child(view=view, tq=tq, nodeid=nodeid, n=n) -> int:
            view.pid = os.getpid()
            crashlib.lib.vfs_test_crash_after(n)
            crashlib.lib.vfs_inode_forget_j(view, tq, nodeid, 1)
            return 3

        status = _in_child(child)
        assert status in (0, 3)
        forgets, pending, _ = jq.hints()
        gone = arena.inodes.live_count() == 0
        if status == 3:
            assert (forgets, pending, gone) == (1, None, True)
            break
        if gone:    # applied: announced before, so a replay can tell
            assert (forgets, pending) in ((0, (nodeid, 1)), (1, None))
        else:       # not applied: announced or not, counted not yet
            assert forgets == 0 and pending in (None, (nodeid, 1))
        _check_consistent(arena)
        arena.close()
    assert n > 2
    arena.close()


# -- the journal's store order --------------------------------------------------------------

_PRE = PreState(kind=4, flags=1, values=(11, 22, 33, 44))
# One request's path through the journal, in order; the test kills a worker inside each step.
_STEPS = ["popped", "executing", "add_effect", "pin", "unpin", "forgetting", "note_forget",
          "replied", "pushed"]


def _journal_step(lib, q, step: str) -> None:
    """Step `step` of request (head 3, avail position 101, READ, unique 555) through `lib`."""
    if step == "popped":
        lib.vfs_jq_popped(q, 3, 101, 15, 555, 1)
    elif step == "executing":
        v = _PRE.values
        lib.vfs_jq_executing(q, _PRE.kind, _PRE.flags, v[0], v[1], v[2], v[3])
    elif step == "add_effect":
        lib.vfs_jq_add_effect(q, Effect.LOOKUP, 42)
    elif step == "pin":
        lib.vfs_jq_pin(q, PinKind.INODE, 42)
    elif step == "unpin":
        lib.vfs_jq_unpin(q, PinKind.INODE, 42)
    elif step == "forgetting":
        lib.vfs_jq_forgetting(q, 42, 5)
    elif step == "note_forget":
        lib.vfs_jq_note_forget(q)
    elif step == "replied":
        lib.vfs_jq_replied(q, 3, 96, 7)
    elif step == "pushed":
        lib.vfs_jq_pushed(q, 3)


def _check_journal(jq, step: str, done: bool) -> None:
    """What a successor reads is one of the states before or after `step`, never a torn one."""
    recs = jq.inflight()
    assert [r.head for r in recs] in ([], [3])
    for r in recs:
        # The slot's fields were written before the state word that makes it visible.
        assert (r.avail_pos, r.counter, r.opcode, r.unique) == (101, 1, 15, 555)
        if r.state == SlotState.EXECUTING:
            assert r.pre == _PRE
        if r.state == SlotState.REPLIED:
            assert r.used_len == 96
    # The pop is counted once whether or not its `next` store happened.
    assert jq.next_avail() == ((102, 2) if recs or step != "popped" else (101, 1))
    if step == "popped":
        assert not recs or recs[0].state == SlotState.POPPED
    pushing = jq.pushing()
    if pushing is not None:
        assert pushing == (3, 7)
        assert step == "pushed" or recs[0].state == SlotState.REPLIED
    elif step == "pushed":
        assert not recs                                 # freed before the push record went
    if jq.owns_effects(1):
        # Owned only once the record was cleared; then exactly what the steps so far recorded.
        at = _STEPS.index(step)
        forgets, pending, overflow = jq.hints()
        assert not overflow
        effects = []
        while (e := jq.pop_effect()) is not None:
            effects.append(e)
        lookup = [(Effect.LOOKUP, 42)]
        if at < _STEPS.index("add_effect"):
            assert effects == []
        elif step == "add_effect":
            assert effects in ([], lookup)
        else:
            assert effects == lookup
        if at < _STEPS.index("forgetting"):
            assert (forgets, pending) == (0, None)
        elif step == "forgetting":
            assert (forgets, pending) in ((0, None), (0, (42, 5)))
        elif step == "note_forget":
            assert (forgets, pending) in ((0, (42, 5)), (1, None))
        else:
            assert (forgets, pending) == (1, None)
    else:
        assert step in ("popped", "replied", "pushed")
    assert jq.pins() in ([], [(PinKind.INODE, 42)])


@pytest.mark.parametrize("step", _STEPS)
def test_journal_write_killed_at_any_store(crashlib, step):
    """A worker killed after any store of a journal write leaves a record its successor reads
    as the state before or after the write: fields are stored before the word that publishes
    them, and a new effects owner after the record it owns was cleared."""
    n = 0
    while True:
        n += 1
        journal = Journal.create(1, 8)
        jq = journal.queue(0)
        jq.reset(100, 7, 8)
        # A previous request, with effects left behind (its owner is cleared on reply) and a
        # FORGET announced at the index the next request's first one will have.
        jq.popped(2, 100, 1, 1)
        jq.add_effect(Effect.HANDLE, 9)
        jq.forgetting(78, 4)
        jq.replied(2, 16, 0)
        jq.pushed(2)
        q = native.lib
        for earlier in _STEPS[:_STEPS.index(step)]:
            _journal_step(q, jq.cdata, earlier)
        tq = crashlib.ffi.cast("struct vfs_jq *", jq.address)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                crashlib.lib.vfs_test_crash_after(n)
                _journal_step(crashlib.lib, tq, step)
                code = 3
            finally:
                os._exit(code)
        status = _wait(pid)
        assert status in (0, 3)
        _check_journal(jq, step, status == 3)
        if status == 3:
            break
    assert n >= 2, f"{step}: no store reached"


def test_session_end_over_several_close_batches(tmp_path):
    """forget_all / remove_all drop the lock every 64 fds: with a few hundred entries, pinned
    ones spread among them, every unpinned fd is closed and every pinned one waits."""
    path = tmp_path / "f"
    path.write_bytes(b"x")
    arena = Arena.create(max_inodes=400, max_handles=300, max_queues=1)
    inodes, handles = arena.inodes, arena.handles
    root = os.open(tmp_path, os.O_PATH)
    inodes.set_root(root, *_Scene._key(root))
    ids = [inodes.lookup_or_insert(os.open(path, os.O_PATH), 9, i)[0] for i in range(300)]
    fhs = [handles.insert(os.open(path, os.O_RDONLY), ids[i], 0) for i in range(250)]
    pinned_ids, pinned_fhs = ids[::37], fhs[::41]
    fds = {i: inodes.info(i)[2] for i in ids}
    hfds = {}
    for fh in fhs:
        hfds[fh] = handles.acquire(fh)[0]
        if fh not in pinned_fhs:
            handles.release(fh)
    for i in pinned_ids:
        inodes.acquire(i)
    inodes.forget_all()
    handles.remove_all()
    assert inodes.live_count() == 1 + len(pinned_ids)
    assert handles.live_count() == len(pinned_fhs)
    assert [i for i in ids if _is_open(fds[i])] == pinned_ids
    assert [fh for fh in fhs if _is_open(hfds[fh])] == pinned_fhs
    _check_consistent(arena)
    for i in pinned_ids:
        inodes.release(i)
        assert not _is_open(fds[i])
    for fh in pinned_fhs:
        handles.release(fh)
        assert not _is_open(hfds[fh])
    assert (inodes.live_count(), handles.live_count()) == (1, 0)
    _check_consistent(arena)
    arena.close()


# --- device state: walking the tables and restoring them at the same ids -----------------------

def test_restored_tables_keep_every_id_and_stay_consistent(tmp_path):
    src = Arena.create(max_inodes=16, max_handles=8, max_queues=1)
    dst = Arena.create(max_inodes=16, max_handles=8, max_queues=1)
    for arena in (src, dst):
        root = os.open(tmp_path, os.O_PATH)
        st = os.fstat(root)
        arena.inodes.set_root(root, st.st_dev, st.st_ino)
    ids = []
    for i in range(6):
        (tmp_path / f"f{i}").write_bytes(b"x")
        fd = os.open(tmp_path / f"f{i}", os.O_PATH)
        st = os.fstat(fd)
        nodeid, _ = src.inodes.lookup_or_insert(fd, st.st_dev, st.st_ino, 0)
        ids.append(nodeid)
    src.inodes.lookup_or_insert(os.open(tmp_path / "f0", os.O_PATH), *_key(tmp_path / "f0"))
    src.inodes.forget(ids[2], 1)           # a gap, and a slot whose generation moved on
    fhs = [src.handles.insert(os.open(tmp_path / "f1", os.O_RDWR), ids[1], os.O_RDWR)
           for _ in range(3)]
    src.handles.remove(fhs[1])
    inodes, handles = src.inode_entries(), src.handle_entries()
    assert [e.nodeid for e in inodes] == [1, *ids[:2], *ids[3:]]
    assert inodes[1].nlookup == 2
    assert [(h.fh, h.nodeid, h.flags) for h in handles] == [
        (fhs[0], ids[1], os.O_RDWR), (fhs[2], ids[1], os.O_RDWR)]

    for e in inodes[1:]:
        dst.restore_inode(e.nodeid, os.dup(e.fd), e.nlookup, e.dev, e.ino, e.mnt_id)
    for h in handles:
        dst.restore_handle(h.fh, os.dup(h.fd), h.nodeid, h.flags)
    dst.restored()
    _check_consistent(dst)
    strip = [(e.nodeid, e.nlookup, e.dev, e.ino, e.mnt_id) for e in inodes]
    assert [(e.nodeid, e.nlookup, e.dev, e.ino, e.mnt_id) for e in dst.inode_entries()] == strip
    assert [(h.fh, h.nodeid, h.flags) for h in dst.handle_entries()] == [
        (h.fh, h.nodeid, h.flags) for h in handles]
    # A known inode is found at its restored id; new entries never take a restored one.
    fd = os.open(tmp_path / "f3", os.O_PATH)
    assert dst.inodes.lookup_or_insert(fd, *_key(tmp_path / "f3")) == (ids[3], False)
    os.close(fd)
    (tmp_path / "new").write_bytes(b"")
    new, inserted = dst.inodes.lookup_or_insert(os.open(tmp_path / "new", os.O_PATH),
                                                *_key(tmp_path / "new"))
    # (The forgotten ids[2] may come back: the guest holds it no more, and FUSE ids are only
    # unique among the ones it holds.)
    assert inserted and new not in [e.nodeid for e in inodes]
    assert dst.handles.insert(os.open(tmp_path / "f1", os.O_RDONLY), ids[1], 0) not in (
        fhs[0], fhs[2])
    _check_consistent(dst)
    # Taken slots, the root's and slots outside the table are refused.
    with pytest.raises(OSError) as err:
        dst.restore_inode(ids[0], -1, 1, 0, 0, 0)
    assert err.value.errno == errno.EEXIST
    for bad in (1, 17, 0):
        with pytest.raises(OSError) as err:
            dst.restore_inode(bad, -1, 1, 0, 0, 0)
        assert err.value.errno == errno.EINVAL
    src.close()
    dst.close()


def test_an_invalid_restored_inode_answers_eio_until_forgotten(tmp_path):
    arena = Arena.create(max_inodes=8, max_handles=4, max_queues=1)
    root = os.open(tmp_path, os.O_PATH)
    st = os.fstat(root)
    arena.inodes.set_root(root, st.st_dev, st.st_ino)
    (tmp_path / "gone").write_bytes(b"")
    dev, ino, _mnt = _key(tmp_path / "gone")
    lost = (1 << 32) | 3                       # generation 1, slot 3
    arena.restore_inode(lost, -1, 2, dev, ino, 0)
    arena.restore_handle(3, -1, lost, os.O_RDONLY)
    arena.restored()
    for call in (lambda: arena.inodes.acquire(lost), lambda: arena.handles.acquire(3)):
        with pytest.raises(OSError) as err:
            call()
        assert err.value.errno == errno.EIO
    # Not in the index: a LOOKUP of the same file makes a new, working entry.
    fd = os.open(tmp_path / "gone", os.O_PATH)
    nodeid, inserted = arena.inodes.lookup_or_insert(fd, dev, ino, 0)
    assert inserted and nodeid != lost
    # FORGET still counts; the last one frees the slot.
    arena.inodes.forget(lost, 2)
    with pytest.raises(OSError) as err:
        arena.inodes.acquire(lost)
    assert err.value.errno == errno.EBADF
    arena.handles.remove(3)
    assert [e.nodeid for e in arena.inode_entries()] == [1, nodeid]
    arena.close()


def _key(path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, 0
