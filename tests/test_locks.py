"""File locks through the daemon's real socket, on both data planes (worker/locks.py).

GETLK / SETLK / SETLKW between FUSE lock owners, against host processes, blocking waits that
leave the queue serving, FUSE_INTERRUPT, release on FLUSH and RELEASE, two request queues, and
queue workers killed while they hold locks and while a request waits.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.worker.locks import OFFSET_MAX
from tests.conftest import DATA_PLANES, Daemon
from tests.frontend import Frontend, FuseClient, FuseError, interrupt, submit_lock
from tests.proctree import children

pytestmark = pytest.mark.data_planes(*DATA_PLANES)
ROOT = fa.ROOT_ID
RD, WR, UN = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
EOF = OFFSET_MAX
A, B, C = 0xA0A0, 0xB0B0, 0xC0C0          # lock owners (the guest's files_struct ids)
# How long a waiting request must stay unanswered to be believed waiting.
QUIET = 0.5
F_OFD_GETLK, F_OFD_SETLK = 36, 37
FLOCK = struct.Struct("=hh4xqqi4x")


@dataclass
class Session:
    daemon: Daemon
    fe: Frontend
    c: FuseClient        # request queue 1
    c2: FuseClient       # request queue 2
    node: int
    fh: int              # a handle for owner A's requests
    fh2: int             # another open of the same file, for owners B and C

    @property
    def path(self) -> Path:
        return self.daemon.share / "f"

    def worker(self, queue: int) -> int:
        (pid,) = [p for p, n in children(self.daemon.proc.pid).items()
                  if n == f"pyvfs-q{queue}"]
        return pid


@pytest.fixture
def s(daemon_factory) -> Iterator[Session]:
    d = daemon_factory("--request-queues=2")
    (d.share / "f").write_bytes(b"x" * 4096)
    fe = Frontend.connect(d.socket, process=d.proc, queues=3)
    try:
        c = FuseClient(fe, 1, pid=101)
        c2 = FuseClient(fe, 2, pid=202)
        c.init()
        node = c.lookup(ROOT, "f").nodeid
        fh = c.open(node, os.O_RDWR).fh
        fh2 = c2.open(node, os.O_RDWR).fh
        yield Session(d, fe, c, c2, node, fh, fh2)
        assert d.proc.poll() is None, d.text
    finally:
        fe.close()
    assert "Traceback" not in d.text, d.text


def err(fn, *args, **kw) -> int:
    with pytest.raises(FuseError) as ei:
        fn(*args, **kw)
    return ei.value.errno


def host_ofd_test(path: Path, typ: int, start: int = 0, length: int = 0) -> int:
    """The type of a lock a host process meets over the range (F_UNLCK: none)."""
    fd = os.open(path, os.O_RDWR)
    try:
        out = fcntl.fcntl(fd, F_OFD_GETLK, FLOCK.pack(typ, 0, start, length, 0))
        return FLOCK.unpack(out)[0]
    finally:
        os.close(fd)


# --- negotiation ----------------------------------------------------------------------------


def test_init_offers_locks_unless_turned_off(daemon_factory) -> None:
    for args, want in (((), fa.InitFlag.POSIX_LOCKS | fa.InitFlag.FLOCK_LOCKS),
                       (("--no-posix-lock",), fa.InitFlag.FLOCK_LOCKS),
                       (("--no-flock", "--no-posix-lock"), 0)):
        d = daemon_factory(*args)
        with Frontend.connect(d.socket, process=d.proc) as fe:
            c = FuseClient(fe)
            c.init()
            assert c.flags & (fa.InitFlag.POSIX_LOCKS | fa.InitFlag.FLOCK_LOCKS) == want, args


# --- POSIX locks between owners ---------------------------------------------------------------


def test_owners_conflict_and_getlk_names_the_holder(s: Session) -> None:
    c = s.c
    c.setlk(s.node, s.fh, A, 0, 99, WR, pid=101)
    assert err(c.setlk, s.node, s.fh2, B, 50, 60, WR, pid=202) == errno.EAGAIN
    assert err(c.setlk, s.node, s.fh2, B, 99, EOF, RD, pid=202) == errno.EAGAIN
    # The kernel reads the pid in the guest's pid namespace: the one that took the lock.
    assert c.getlk(s.node, s.fh2, B, 50, 60, RD) == (0, 99, WR, 101)
    # An owner's own locks never conflict with it.
    assert c.getlk(s.node, s.fh, A, 0, EOF, WR)[2] == UN
    c.setlk(s.node, s.fh2, B, 100, EOF, WR, pid=202)
    assert c.getlk(s.node, s.fh, A, 100, 100, RD) == (100, EOF, WR, 202)


def test_an_owners_ranges_split_and_merge(s: Session) -> None:
    c = s.c
    c.setlk(s.node, s.fh, A, 0, 99, WR, pid=101)
    c.setlk(s.node, s.fh, A, 40, 59, UN)             # splits into [0,39] and [60,99]
    c.setlk(s.node, s.fh2, B, 40, 59, WR, pid=202)
    assert err(c.setlk, s.node, s.fh2, B, 39, 39, RD) == errno.EAGAIN
    assert err(c.setlk, s.node, s.fh2, B, 60, 60, RD) == errno.EAGAIN
    c.setlk(s.node, s.fh, A, 0, 39, RD, pid=101)     # a downgrade: readers may share it
    c.setlk(s.node, s.fh2, C, 0, 39, RD, pid=303)
    assert err(c.setlk, s.node, s.fh2, C, 0, 0, WR) == errno.EAGAIN
    # Two readers hold [0, 39]: a writer is told of a read lock there, with no single pid.
    start, end, typ, pid = c.getlk(s.node, s.fh2, B, 0, 39, WR)
    assert (start, typ) == (0, RD) and end >= 39 and pid in (0, 101, 303)


def test_guest_and_host_processes_see_each_others_locks(s: Session) -> None:
    c = s.c
    c.setlk(s.node, s.fh, A, 0, 9, WR, pid=101)
    assert host_ofd_test(s.path, RD, 0, 10) == WR
    assert host_ofd_test(s.path, WR, 10, 0) == UN
    # A host process's POSIX lock: the guest conflicts with it and sees no guest pid.
    with open(s.path, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 100)
        assert err(c.setlk, s.node, s.fh2, B, 105, 105, RD) == errno.EAGAIN
        assert c.getlk(s.node, s.fh2, B, 100, EOF, RD) == (100, 109, WR, 0)
    c.setlk(s.node, s.fh2, B, 105, 105, RD, pid=202)  # the host process let go
    with open(s.path, "r+b") as f, pytest.raises(BlockingIOError):
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 105)


def test_bad_lock_requests(s: Session) -> None:
    c = s.c
    assert err(c.setlk, s.node, s.fh, A, 10, 5, WR) == errno.EINVAL
    assert err(c.setlk, s.node, s.fh, A, 0, 1 << 63, WR) == errno.EINVAL
    assert err(c.setlk, s.node, s.fh, A, 0, 1, 7) == errno.EINVAL
    assert err(c.getlk, s.node, s.fh, A, 0, 1, UN) == errno.EINVAL
    assert err(c.setlk, s.node, s.fh + 1000, A, 0, 1, WR) == errno.EBADF
    assert err(c.setlk, s.node, s.fh, A, 0, 1, 7, lk_flags=fa.LK_FLOCK) == errno.EINVAL


# --- release on FLUSH and RELEASE ------------------------------------------------------------


def test_flush_releases_the_closing_owners_locks_only(s: Session) -> None:
    c = s.c
    c.setlk(s.node, s.fh, A, 0, 9, WR, pid=101)
    c.setlk(s.node, s.fh2, B, 20, 29, WR, pid=202)
    c.flush(s.node, s.fh2, C)                         # an owner holding nothing closes
    assert err(c.setlk, s.node, s.fh2, C, 0, 0, RD) == errno.EAGAIN
    c.flush(s.node, s.fh, A)                          # A closes a descriptor of the file
    assert host_ofd_test(s.path, WR, 0, 10) == UN
    c.setlk(s.node, s.fh2, C, 0, 9, WR, pid=303)
    assert err(c.setlk, s.node, s.fh, A, 20, 20, RD) == errno.EAGAIN   # B's stay
    c.flush(s.node, s.fh2, B)
    c.flush(s.node, s.fh2, C)
    assert host_ofd_test(s.path, WR) == UN


def test_release_drops_the_locks_of_the_handles_own_owner(s: Session) -> None:
    """A guest OFD lock's owner is its open file description: no FLUSH names it, its RELEASE
    ends it.  The locks an owner took through another handle stay."""
    c = s.c
    fh = c.open(s.node, os.O_RDWR).fh
    c.setlk(s.node, fh, C, 0, 9, WR, pid=303)           # C: the new handle's own owner
    c.setlk(s.node, s.fh2, B, 20, 29, WR, pid=202)
    c.flush(s.node, fh, A)                              # a process's close: not C's
    assert err(c.setlk, s.node, s.fh, A, 5, 5, RD) == errno.EAGAIN
    c.release(s.node, fh)
    c.setlk(s.node, s.fh, A, 0, 9, WR, pid=101)
    assert err(c.setlk, s.node, s.fh, A, 20, 20, RD) == errno.EAGAIN
    assert host_ofd_test(s.path, RD, 0, 10) == WR


def test_flock_conflicts_with_host_flock_and_release_drops_it(s: Session) -> None:
    c = s.c
    c.setlk(s.node, s.fh, A, 0, EOF, WR, lk_flags=fa.LK_FLOCK)
    assert err(c.setlk, s.node, s.fh2, B, 0, EOF, RD, lk_flags=fa.LK_FLOCK) == errno.EAGAIN
    with open(s.path, "rb") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    # flock and POSIX locks are separate on Linux: the flock lock is no POSIX one.
    c.setlk(s.node, s.fh2, B, 0, EOF, WR, pid=202)
    c.flush(s.node, s.fh2, B)
    c.release(s.node, s.fh, release_flags=fa.RELEASE_FLOCK_UNLOCK, lock_owner=A)
    with open(s.path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh = c.open(s.node, os.O_RDONLY).fh
    with open(s.path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        c.setlk(s.node, fh, C, 0, EOF, RD, lk_flags=fa.LK_FLOCK)      # shared with the host
        assert err(c.setlk, s.node, s.fh2, B, 0, EOF, WR, lk_flags=fa.LK_FLOCK) == errno.EAGAIN


# --- blocking waits ---------------------------------------------------------------------------


def test_setlkw_waits_off_the_ring_and_completes_when_granted(s: Session) -> None:
    c = s.c
    c.setlk(s.node, s.fh, A, 0, 99, WR, pid=101)
    token, _unique = submit_lock(c, s.node, s.fh2, B, 0, 0, WR, pid=202)
    c.vq.expect_no_completion(QUIET)
    # The queue goes on: other requests, and other locks, are answered meanwhile.
    assert c.getattr(s.node).attr.size == 4096
    c.setlk(s.node, s.fh2, C, 200, 299, WR, pid=303)
    assert c.read(s.node, s.fh, 0, 4) == b"xxxx"
    c.setlk(s.node, s.fh, A, 0, 99, UN)
    assert c.result(token).error == 0
    assert c.getlk(s.node, s.fh, A, 0, 0, RD) == (0, 0, WR, 202)


def test_blocking_flock_waits_and_is_granted_on_release(s: Session) -> None:
    c = s.c
    c.setlk(s.node, s.fh, A, 0, EOF, WR, lk_flags=fa.LK_FLOCK)
    token, _ = submit_lock(c, s.node, s.fh2, B, 0, EOF, WR, lk_flags=fa.LK_FLOCK)
    c.vq.expect_no_completion(QUIET)
    c.release(s.node, s.fh, release_flags=fa.RELEASE_FLOCK_UNLOCK, lock_owner=A)
    assert c.result(token).error == 0
    with open(s.path, "rb") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)


def test_interrupt_ends_a_wait_with_eintr(s: Session) -> None:
    c = s.c
    c.setlk(s.node, s.fh, A, 0, 99, WR, pid=101)
    token, unique = submit_lock(c, s.node, s.fh2, B, 0, 0, WR, pid=202)
    c.vq.expect_no_completion(QUIET)
    interrupt(c, unique)
    assert c.result(token).error == errno.EINTR
    # B was never granted the lock: once A lets go, nothing of B's is left.
    c.setlk(s.node, s.fh, A, 0, 99, UN)
    assert c.getlk(s.node, s.fh, A, 0, EOF, WR)[2] == UN
    # An INTERRUPT for a request that is not waiting changes nothing.
    interrupt(c, 0xDEAD0)
    c.setlk(s.node, s.fh2, B, 0, 0, WR, pid=202)


def test_waits_across_queues_and_with_a_host_holder(s: Session) -> None:
    c, c2 = s.c, s.c2
    # A's lock taken through queue 1 is seen, and released, through queue 2.
    c.setlk(s.node, s.fh, A, 0, 9, WR, pid=101)
    assert c2.getlk(s.node, s.fh2, B, 0, 0, RD) == (0, 9, WR, 101)
    token, _ = submit_lock(c2, s.node, s.fh2, B, 5, 5, RD, pid=202)
    c2.vq.expect_no_completion(QUIET)
    c2.setlk(s.node, s.fh2, A, 0, 9, UN)
    assert c2.result(token).error == 0
    assert err(c.setlk, s.node, s.fh, C, 5, 5, WR) == errno.EAGAIN
    # A host process holds a lock; a guest wait on queue 1 ends when it lets go.
    c2.flush(s.node, s.fh2, B)
    with open(s.path, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        token, _ = submit_lock(c, s.node, s.fh, C, 0, EOF, WR, pid=303)
        c.vq.expect_no_completion(QUIET)
        assert c2.getattr(s.node).attr.size == 4096
    assert c.result(token).error == 0
    assert host_ofd_test(s.path, RD) == WR


# --- queue workers killed ------------------------------------------------------------------------


def test_a_worker_killed_holding_locks_loses_none(s: Session) -> None:
    c = s.c
    c.setlk(s.node, s.fh, A, 0, 9, WR, pid=101)
    c.setlk(s.node, s.fh2, B, 10, 19, RD, pid=202)
    os.kill(s.worker(1), signal.SIGKILL)
    s.daemon.wait_for("worker for queue 1")
    assert err(c.setlk, s.node, s.fh2, C, 0, 0, RD) == errno.EAGAIN
    assert err(c.setlk, s.node, s.fh2, C, 10, 10, WR) == errno.EAGAIN
    assert host_ofd_test(s.path, RD, 0, 10) == WR
    c.setlk(s.node, s.fh, A, 0, 9, UN)          # released through the successor
    c.setlk(s.node, s.fh2, C, 0, 9, WR, pid=303)
    c.flush(s.node, s.fh2, B)
    c.setlk(s.node, s.fh2, C, 10, 19, WR, pid=303)


def test_a_worker_killed_while_a_request_waits_answers_it_once(s: Session) -> None:
    c, c2 = s.c, s.c2
    c2.setlk(s.node, s.fh, A, 0, 9, WR, pid=101)
    token, _ = submit_lock(c, s.node, s.fh2, B, 0, 0, WR, pid=202)
    c.vq.expect_no_completion(QUIET)
    worker = s.worker(1)
    os.kill(worker, signal.SIGKILL)
    s.daemon.wait_for(f"worker for queue 1 (pid {worker}) was killed by SIGKILL")
    # The successor waits again; the request still has no answer, and the queue serves.
    assert c.getattr(s.node).attr.size == 4096
    c.vq.expect_no_completion(QUIET)
    c2.setlk(s.node, s.fh, A, 0, 9, UN)
    assert c.result(token).error == 0
    assert c2.getlk(s.node, s.fh, A, 0, 0, RD) == (0, 0, WR, 202)
    c.vq.expect_no_completion(QUIET)                   # answered once


def test_an_interrupt_that_comes_first_is_kept_for_its_request(s: Session) -> None:
    """The hiprio queue may serve an INTERRUPT before its request queue pops the SETLKW it
    names: the request is answered EINTR as soon as it would wait."""
    c = s.c
    c.setlk(s.node, s.fh, A, 0, 9, WR, pid=101)
    token = c.submit(fa.Opcode.SETLKW, s.node, fa.LK_IN.pack(s.fh2, B, 0, 0, WR, 202, 0),
                     kick=False)
    unique = c._pending[token][0]
    interrupt(c, unique)
    c.vq.kick(force=True)
    assert c.result(token).error == errno.EINTR
    c.setlk(s.node, s.fh, A, 0, 9, UN)
    assert c.getlk(s.node, s.fh, A, 0, EOF, WR)[2] == UN


def test_destroy_ends_every_wait(s: Session) -> None:
    """DESTROY answers every waiting request -- EINTR, or success when the session's end
    released the lock in the way first -- and no lock outlives the session."""
    c = s.c
    c.setlk(s.node, s.fh, A, 0, 9, WR, pid=101)
    token, _ = submit_lock(c, s.node, s.fh2, B, 0, 0, WR, pid=202)
    c.vq.expect_no_completion(QUIET)
    s.c2.destroy()
    assert c.result(token).error in (0, errno.EINTR)
    assert host_ofd_test(s.path, WR) == UN          # the owners' OFDs closed with the session


def test_a_stopped_ring_waits_again_when_it_resumes(s: Session) -> None:
    """GET_VRING_BASE while a request waits answers at once (the wait ends unanswered and the
    request stays in the journal); the ring resumed at that index waits again and answers."""
    c, c2 = s.c, s.c2
    c2.setlk(s.node, s.fh, A, 0, 9, WR, pid=101)
    token, _ = submit_lock(c, s.node, s.fh2, B, 0, 0, WR, pid=202)
    c.vq.expect_no_completion(QUIET)
    base = s.fe.get_vring_base(1)
    s.fe.start_queue(1, base)
    c.vq.expect_no_completion(QUIET)
    assert c.getattr(s.node).attr.size == 4096
    c2.setlk(s.node, s.fh, A, 0, 9, UN)
    assert c.result(token).error == 0
    assert c2.getlk(s.node, s.fh, A, 0, 0, RD) == (0, 0, WR, 202)


# --- the board and the ranges, without a daemon ---------------------------------------------------


def test_ranges_between_fuse_and_struct_flock() -> None:
    from pyvirtiofsd.worker.locks import flock_range, fuse_range
    assert fuse_range(0, EOF) == (0, 0)
    assert fuse_range(10, 19) == (10, 10)
    assert flock_range(10, 10) == (10, 19)
    assert flock_range(7, 0) == (7, EOF)
    for start, end in ((5, 4), (0, EOF + 1), (EOF + 1, EOF + 1)):
        with pytest.raises(OSError) as ei:
            fuse_range(start, end)
        assert ei.value.errno == errno.EINVAL


def test_board_owners_fill_up_and_a_session_end_clears_them() -> None:
    from pyvirtiofsd.worker.locks import MAX_OWNERS, LockBoard
    b = LockBoard()
    assert b.add_owner(7, A, 100, 1, 11) is None
    assert b.add_owner(7, A, 101, 2, 12) == 100           # one OFD per (inode, owner)
    assert b.owner(7, A) == (100, 11) and b.owner(7, B) is None and b.live == 1
    for n in range(1, MAX_OWNERS):
        assert b.add_owner(8, n, 200 + n, 1, 0) is None
    with pytest.raises(OSError) as ei:
        b.add_owner(9, A, 1, 1, 0)
    assert ei.value.errno == errno.ENOLCK
    assert b.owners_via(7, 1) == [A] and b.owners_via(7, 2) == []
    assert b.remove_owner(7, A) == 100 and b.live == MAX_OWNERS - 1
    b.interrupt(0x77)                                      # remembered: not waiting yet
    b.clear_owners()
    assert b.live == 0 and b.owner(8, 1) is None
    assert b.add_wait(0x77, 0) is False                    # forgotten with the session
    b.interrupt(0x78)
    assert b.add_wait(0x78, 0) is True and b.interrupted(0x78)


def test_a_worker_killed_while_waiting_then_interrupted(s: Session) -> None:
    """The INTERRUPT reaches the board while the request's worker is being replaced: the
    successor, serving the request again, answers it EINTR."""
    c, c2 = s.c, s.c2
    c2.setlk(s.node, s.fh, A, 0, 9, WR, pid=101)
    token, unique = submit_lock(c, s.node, s.fh2, B, 0, 0, WR, pid=202)
    c.vq.expect_no_completion(QUIET)
    worker = s.worker(1)
    os.kill(worker, signal.SIGKILL)
    interrupt(c, unique)
    assert c.result(token).error == errno.EINTR
    c2.setlk(s.node, s.fh, A, 0, 9, UN)
    assert c2.getlk(s.node, s.fh, A, 0, EOF, WR)[2] == UN
