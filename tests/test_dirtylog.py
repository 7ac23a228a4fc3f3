"""Dirty-page logging for live migration (vhost-user spec "Migration"; protocol.md 1.10).

The front-end driver plays QEMU: a memfd log sized as vhost_get_log_size sizes it, SET_LOG_BASE,
VHOST_F_LOG_ALL and each ring's VHOST_VRING_F_LOG turned on and off while the rings run.  The
driver knows which guest bytes the daemon wrote (the writable buffers up to each used.len), so
the log must hold exactly their pages, plus the used rings' pages and nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common import virtio
from pyvirtiofsd.common.vhost_user import LogDescription, ProtocolFeature, Request, VringAddr
from tests.conftest import DAEMON, DATA_PLANES, Daemon
from tests.frontend import (
    DEFAULT_PROTOCOL_FEATURES,
    BackendError,
    DaemonGone,
    DirtyLog,
    Frontend,
    FuseClient,
    pages_of,
)
from tests.proctree import children

pytestmark = pytest.mark.data_planes(*DATA_PLANES)

ROOT = fa.ROOT_ID
FILE_SIZE = 300_000          # 74 pages: READs of whole pages, of part of one, past the end


@dataclass
class Rig:
    daemon: Daemon
    fe: Frontend
    client: FuseClient
    kills_expected: bool = False

    def worker(self, queue: int) -> int:
        return next(p for p, n in children(self.daemon.proc.pid).items()
                    if n == f"pyvfs-q{queue}")

    def record(self) -> list[tuple[int, int]]:
        """From now on, collect the guest ranges the daemon wrote on every queue."""
        written: list[tuple[int, int]] = []
        for q in self.fe.queues.values():
            q.written = written
        return written

    def used_rings(self) -> set[int]:
        return pages_of((q.used_gpa, virtio.used_ring_size(q.size))
                        for q in self.fe.queues.values())

    def workload(self, rounds: int = 1) -> None:
        """READ (whole pages, a partial page, past EOF into a large buffer), GETATTR, LOOKUP,
        READDIRPLUS and READDIR, OPEN/RELEASE: every reply path of both planes."""
        c = self.client
        for _ in range(rounds):
            entry = c.lookup(ROOT, "data")
            c.getattr(entry.nodeid)
            fh = c.open(entry.nodeid, os.O_RDONLY).fh
            assert len(c.read(entry.nodeid, fh, 0, 128 << 10)) == 128 << 10
            assert len(c.read(entry.nodeid, fh, 4096 + 100, 1000)) == 1000
            # A 64 KiB buffer for the last 3 KiB: the pages the reply does not reach stay clean.
            assert len(c.read(entry.nodeid, fh, FILE_SIZE - 3000, 64 << 10)) == 3000
            c.release(entry.nodeid, fh)
            dh = c.opendir(ROOT).fh
            c.readdirplus(ROOT, dh, 0, 16 << 10)
            c.readdir(ROOT, dh, 0, 16 << 10)
            c.releasedir(ROOT, dh)
            c.forget(entry.nodeid, 1)
            c.statfs()


def _check(rig: Rig, log: DirtyLog, written: list[tuple[int, int]]) -> None:
    """Every page written is marked; besides them only used-ring pages are."""
    assert written, "the workload wrote nothing"
    marked = log.pages()
    want = pages_of(written)
    missing = want - marked
    assert not missing, f"pages written but not marked: {sorted(missing)[:10]}"
    extra = marked - want - rig.used_rings()
    assert not extra, f"pages marked but never written: {sorted(extra)[:10]}"
    # VHOST_VRING_F_LOG: the used ring of the request queue is logged too.
    q = rig.fe.queue(1)
    assert pages_of([(q.used_gpa + 2, 2)]) <= marked


@pytest.fixture
def rig(daemon_factory) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def start(*args: str, **kw) -> Rig:
        d = daemon_factory(*args)
        (d.share / "data").write_bytes(os.urandom(FILE_SIZE))
        (d.share / "dir").mkdir()
        fe = Frontend.connect(d.socket, process=d.proc, queues=2, **kw)
        c = FuseClient(fe)
        c.init()
        r = Rig(d, fe, c)
        made.append(r)
        return r

    yield start
    for r in made:
        r.fe.close()
        if not r.kills_expected:
            assert "killed by" not in r.daemon.text, r.daemon.text
        assert "Traceback" not in r.daemon.text, r.daemon.text


def test_every_page_written_is_marked_and_no_other(rig) -> None:
    r = rig()
    log = DirtyLog(r.fe.memory)
    try:
        r.fe.set_log_base(log)
        r.fe.set_logging(True)
        written = r.record()
        r.workload(2)
        _check(r, log, written)
    finally:
        log.close()


def test_chains_split_indirect_and_across_regions_are_marked(rig) -> None:
    """Buffers split over many descriptors, in an indirect table, and one straddling the
    boundary of two memory regions: the re-walk at push finds every written byte."""
    r = rig(regions=2)
    fe, c = r.fe, r.client
    log = DirtyLog(fe.memory)
    try:
        fe.set_log_base(log)
        fe.set_logging(True)
        entry = c.lookup(ROOT, "data")
        fh = c.open(entry.nodeid, os.O_RDONLY).fh
        written = r.record()
        body = fa.ReadIn(fh, 0, 20000).pack()
        half = fe.memory.regions[0].size
        for chain in ({"split": 7}, {"indirect": True, "split": 3}, {"cross_region": 40 + 5000}):
            got = c.call(fa.Opcode.READ, entry.nodeid, body, out_size=20000, **chain)
            assert len(got) == 20000
        assert any(a < half < a + n for a, n in written), "no write straddled the regions"
        _check(r, log, written)
    finally:
        log.close()


def test_logging_on_and_off_mid_workload(rig) -> None:
    r = rig()
    fe, c = r.fe, r.client
    log = DirtyLog(fe.memory)
    try:
        fe.set_log_base(log)
        # A log but no VHOST_F_LOG_ALL: nothing is marked.
        r.workload()
        assert not log.pages()
        # Turned on while requests are in flight on the running ring; those taken after it
        # are marked, whichever plane serves them.
        entry = c.lookup(ROOT, "data")
        fh = c.open(entry.nodeid, os.O_RDONLY).fh
        body = fa.ReadIn(fh, 0, 8192).pack()
        early = [c.submit(fa.Opcode.READ, entry.nodeid, body, out_size=8192) for _ in range(8)]
        fe.set_logging(True)
        for t in early:
            c.result(t)
        log.clear()
        written = r.record()
        late = [c.submit(fa.Opcode.READ, entry.nodeid, body, out_size=8192) for _ in range(8)]
        for t in late:
            assert len(c.result(t).body) == 8192
        r.workload()
        _check(r, log, written)
        # Off again: requests go on, the log stays clean.
        fe.set_logging(False)
        log.clear()
        r.workload()
        assert not log.pages()
    finally:
        log.close()


def _maps(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(f"memfd:{name}" in line for line in f)


def test_log_replaced_while_rings_run(rig) -> None:
    """QEMU moves to a larger log when guest memory grows: the workers switch between two
    requests and unmap the old log."""
    r = rig()
    fe = r.fe
    first = DirtyLog(fe.memory, name="dirty-log-first")
    second = DirtyLog(fe.memory, extra=4096, offset=3 * 4096 + 8, name="dirty-log-second")
    try:
        fe.set_log_base(first)
        fe.set_logging(True)
        r.workload()
        assert first.pages()
        workers = [r.worker(q) for q in (0, 1)]
        assert all(_maps(p, "dirty-log-first") for p in workers)
        fe.set_log_base(second)
        first.clear()
        written = r.record()
        r.workload()
        assert not first.pages()
        _check(r, second, written)
        for pid in workers:
            assert _maps(pid, "dirty-log-first") == 0, "the old log is still mapped"
            assert _maps(pid, "dirty-log-second") == 1
    finally:
        first.close()
        second.close()


def test_worker_respawned_keeps_logging(rig) -> None:
    r = rig()
    r.kills_expected = True
    fe = r.fe
    log = DirtyLog(fe.memory)
    try:
        fe.set_log_base(log)
        fe.set_logging(True)
        r.workload()
        pid = r.worker(1)
        os.kill(pid, signal.SIGKILL)
        r.daemon.wait_for("worker for queue 1 (pid")
        log.clear()
        written = r.record()
        r.workload()
        assert r.worker(1) != pid
        _check(r, log, written)
    finally:
        log.close()


def _log_fd(size: int) -> int:
    fd = os.memfd_create("bad-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _bad_logs(fe: Frontend) -> dict[str, tuple[bytes, int]]:
    need = DirtyLog(fe.memory).size
    pipe_r, pipe_w = os.pipe()
    os.close(pipe_w)
    return {
        "empty": (LogDescription(0, 0).pack(), _log_fd(4096)),
        "too small for guest memory": (LogDescription(need - 8, 0).pack(), _log_fd(need)),
        "past the end of its fd": (LogDescription(need, 4096).pack(), _log_fd(need)),
        "offset wraps": (LogDescription(need, 2**64 - 8).pack(), _log_fd(need)),
        "absurdly large": (LogDescription(1 << 40, 0).pack(), _log_fd(need)),
        "not shared memory": (LogDescription(need, 0).pack(), pipe_r),
    }


def test_bad_log_base_is_refused_and_logging_goes_on(rig) -> None:
    r = rig()
    fe = r.fe
    log = DirtyLog(fe.memory)
    try:
        fe.set_log_base(log)
        fe.set_logging(True)
        for what, (payload, fd) in _bad_logs(fe).items():
            try:
                with pytest.raises(BackendError):
                    fe.send(Request.SET_LOG_BASE, payload, [fd])
            finally:
                os.close(fd)
            assert "SET_LOG_BASE refused" in r.daemon.text, what
        # Without its fd (the gate counts fds before any handler runs).
        with pytest.raises(BackendError):
            fe.send(Request.SET_LOG_BASE, LogDescription(log.size, 0).pack())
        # The good log is still the one in use.
        log.clear()
        written = r.record()
        r.workload()
        _check(r, log, written)
    finally:
        log.close()


def test_log_requests_need_log_shmfd(rig) -> None:
    r = rig(protocol_features=DEFAULT_PROTOCOL_FEATURES & ~ProtocolFeature.LOG_SHMFD)
    fe = r.fe
    log = DirtyLog(fe.memory)
    try:
        with pytest.raises(BackendError):
            fe.send(Request.SET_LOG_BASE, log.describe().pack(), [log.fd])
        q = fe.queue(1)
        mem = fe.memory
        with pytest.raises(BackendError):
            fe.set_vring_addr(1, mem.uaddr(q.desc_gpa), mem.uaddr(q.used_gpa),
                              mem.uaddr(q.avail_gpa), log=q.used_gpa, flags=VringAddr.F_LOG)
        assert "LOG_SHMFD" in r.daemon.text
        r.workload()
    finally:
        log.close()


def test_log_features_are_offered_and_log_fd_is_closed(rig) -> None:
    r = rig()
    fe = r.fe
    assert fe.features & (1 << 26)                        # VHOST_F_LOG_ALL
    assert fe.protocol_features & ProtocolFeature.LOG_SHMFD
    # SET_LOG_FD: accepted, and its fd closed (the daemon reads no log notifier).
    rd, wr = os.pipe()
    try:
        fe.send(Request.SET_LOG_FD, b"", [wr])
        os.close(wr)
        wr = -1
        os.set_blocking(rd, True)
        assert os.read(rd, 1) == b""
    finally:
        os.close(rd)
        if wr >= 0:
            os.close(wr)
    # Ring addresses of a running ring still cannot move (only the log fields may change).
    q = fe.queue(1)
    mem = fe.memory
    with pytest.raises(BackendError):
        fe.set_vring_addr(1, mem.uaddr(q.desc_gpa), mem.uaddr(q.used_gpa) + 64,
                          mem.uaddr(q.avail_gpa))
    r.workload()


def test_capabilities_offer_migration() -> None:
    """Dirty logging and the device state together migrate a virtio-fs device: libvirt is
    told so (tests/test_guest_migration.py migrates a guest with QEMU 10)."""
    out = subprocess.run([str(DAEMON), "--print-capabilities"], capture_output=True,
                         text=True, check=True).stdout
    assert '"migrate-precopy"' in out



def test_refused_log_base_without_reply_ack_ends_the_connection(rig) -> None:
    """Without REPLY_ACK the reply QEMU waits for carries no status: a refused log is not
    answered as if it were taken (the migration would go on unlogged), the connection ends."""
    r = rig(reply_ack=False)
    fe = r.fe
    fd = _log_fd(4096)
    try:
        with pytest.raises(DaemonGone):
            fe.send(Request.SET_LOG_BASE, LogDescription(0, 0).pack(), [fd])
    finally:
        os.close(fd)
    assert r.daemon.proc.wait(timeout=20) == 0
    assert "SET_LOG_BASE cannot be answered: dirty log of 0x0 bytes" in r.daemon.text


def test_reply_left_by_a_dead_worker_is_marked_by_its_successor(rig, monkeypatch) -> None:
    """A worker killed with a READ's reply in guest memory but not pushed: its successor maps
    the log before it resumes the ring, and marks the reply's pages when it pushes it."""
    monkeypatch.setenv("PYVIRTIOFSD_TEST_HOOKS", "1")
    monkeypatch.setenv("PYVIRTIOFSD_TEST_CRASH", "READ:replied")
    r = rig("--seccomp=none")          # the hook kills its own worker
    r.kills_expected = True
    fe, c = r.fe, r.client
    log = DirtyLog(fe.memory)
    try:
        fe.set_log_base(log)
        fe.set_logging(True)
        entry = c.lookup(ROOT, "data")
        fh = c.open(entry.nodeid, os.O_RDONLY).fh
        pid = r.worker(1)
        written = r.record()
        data = c.read(entry.nodeid, fh, 8192, 40000)
        assert data == (r.daemon.share / "data").read_bytes()[8192:48192]
        assert r.worker(1) != pid, "the READ was not served across a respawn"
        assert "killed by SIGKILL" in r.daemon.text
        _check(r, log, written)
    finally:
        log.close()


def test_a_new_front_end_starts_without_the_old_log(rig) -> None:
    """--reconnect: the log and VHOST_F_LOG_ALL belong to the connection that set them; the
    workers unmap it when it ends, and the next front-end's requests mark nothing."""
    r = rig("--reconnect")
    log = DirtyLog(r.fe.memory, name="dirty-log-gone")
    try:
        r.fe.set_log_base(log)
        r.fe.set_logging(True)
        r.workload()
        assert log.pages()
        workers = [r.worker(q) for q in (0, 1)]
        r.fe.close()
        r.daemon.wait_for("front-end disconnected")
        log.clear()
        fe = Frontend.connect(r.daemon.socket, process=r.daemon.proc, queues=2)
        r.fe, r.client = fe, FuseClient(fe)
        r.client.init()
        r.workload()
        assert not log.pages()
        for pid in workers:
            assert _maps(pid, "dirty-log-gone") == 0, "the old connection's log is still mapped"
    finally:
        log.close()
