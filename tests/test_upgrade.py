"""Live upgrade (supervisor/upgrade.py): `pyvirtiofsd upgrade SOCKET` takes over a running
daemon -- its vhost-user connection, rings, tables and journals -- while the front-end keeps
submitting, and a handover that fails leaves the old daemon serving.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common import inflight
from tests.conftest import DAEMON, DATA_PLANES, Daemon
from tests.frontend import Frontend, FuseClient

pytestmark = pytest.mark.data_planes(*DATA_PLANES)

ROOT = fa.ROOT_ID


class _Running:
    """What Daemon asks of its process, for a daemon that is not this process's child."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            self.returncode = 0
        return self.returncode


class Upgraded(Daemon):
    """The daemon `pyvirtiofsd upgrade` started: `proc` is the command, which returns once the
    daemon (its child) serves; `pid` is the daemon."""

    pid: int = 0

    def took_over(self, timeout: float = 30) -> int:
        """Wait for the command; the new daemon's pid."""
        assert self.proc.wait(timeout=timeout) == 0, self.text
        line = self.wait_for("pyvirtiofsd upgrade: pid ")
        self.pid = int(line.split()[3])
        self.proc = _Running(self.pid)          # type: ignore[assignment]
        return self.pid

    def stop(self) -> int:
        if not self.pid:
            return super().stop()
        pidfd = os.pidfd_open(self.pid)
        try:
            os.kill(self.pid, signal.SIGTERM)
            assert select.select([pidfd], [], [], 20)[0], "the upgraded daemon did not stop"
        finally:
            os.close(pidfd)
        return 0


def start_upgrade(d: Daemon) -> Upgraded:
    """`pyvirtiofsd upgrade SOCKET` from the installed entry point."""
    proc = subprocess.Popen([str(DAEMON), "upgrade", d.socket], stderr=subprocess.PIPE,
                            text=True)
    new = Upgraded(proc, d.socket, d.share)

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            new.log.append(line)
            new.lines.put(line)
        new.lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return new


@pytest.fixture
def upgraded() -> Iterator[list[Upgraded]]:
    made: list[Upgraded] = []
    yield made
    for d in made:
        d.stop()
        if os.environ.get("PYVIRTIOFSD_TEST_ECHO"):
            print(d.text)


@pytest.mark.parametrize("sandbox", ["none", "namespace", "chroot"])
def test_live_upgrade_in_the_middle_of_a_workload(daemon_factory, upgraded, sandbox) -> None:
    d = daemon_factory(f"--sandbox={sandbox}")
    share: Path = d.share
    (share / "data").write_bytes(b"")
    (share / "dir").mkdir()
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        node = c.lookup(ROOT, "data").nodeid
        fh = c.open(node, os.O_RDWR).fh
        dnode = c.lookup(ROOT, "dir").nodeid
        dfh = c.opendir(dnode).fh
        # Requests queued before and while the new daemon takes over.
        def write(i: int) -> int:
            return c.submit(fa.Opcode.WRITE, node, [fa.WriteIn(fh, i * 8, 8).pack(),
                                                    b"%08d" % i], out_size=8, indirect=True)

        before = [write(i) for i in range(20)]
        fe.process = None             # the old daemon exits on the way
        new = start_upgrade(d)
        upgraded.append(new)
        during = [write(i) for i in range(20, 40)]
        for t in before + during:
            r = c.result(t, timeout=30)
            assert r.error == 0
            assert fa.WRITE_OUT.unpack(r.body)[0] == 8
        try:
            assert d.proc.wait(timeout=30) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError("the old daemon did not exit:\n" + d.text + new.text) from None
        pid = new.took_over()
        new.wait_for("took over from pid")
        assert new.status()["processes"][0]["pid"] in (pid, 1)
        assert "live upgrade: handed over" in d.text
        # Every write landed once, in place; the handles and nodeids go on.
        assert (share / "data").read_bytes() == b"".join(b"%08d" % i for i in range(40))
        assert c.read(node, fh, 8, 8) == b"00000001"
        assert c.write(node, fh, 320, b"after") == 5
        assert (share / "data").read_bytes().endswith(b"after")
        assert [e.name for e in c.readdir_all(dnode, dfh) if e.name[:1] != b"."] == []
        created = c.create(dnode, "new", 0o600)
        assert (share / "dir" / "new").exists()
        c.release(created[0].nodeid, created[1].fh)
        c.release(node, fh)
        c.releasedir(dnode, dfh)
        assert new.status()["upgrades"] == 1
        assert "Traceback" not in new.text + d.text, new.text + d.text
    finally:
        fe.close()


def test_a_failed_upgrade_leaves_the_old_daemon_serving(daemon_factory) -> None:
    # The taker goes away without an answer (as a new daemon that failed would): the old one
    # restarts its rings where they stopped and serves on, handles included.
    d = daemon_factory()
    (d.share / "f").write_bytes(b"still here")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        node = c.lookup(ROOT, "f").nodeid
        fh = c.open(node, os.O_RDONLY).fh
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(d.socket + ".status")
            s.sendall(b"GET /upgrade HTTP/1.0\r\n\r\n")
            head = s.recv(65536)
            assert head.startswith(b"HTTP/1.0 200")
            token = c.submit(fa.Opcode.READ, node, fa.ReadIn(fh, 0, 10).pack(), out_size=10)
        d.wait_for("live upgrade failed: the new daemon went away without an answer;"
                   " this daemon serves on")
        assert c.result(token).body == b"still here"
        assert c.read(node, fh, 6, 4) == b"here"
        c.release(node, fh)
    finally:
        fe.close()


def test_upgrades_in_a_row_keep_the_region_the_socket_and_the_session(daemon_factory,
                                                                       upgraded) -> None:
    # Two upgrades under a front-end with an inflight region; then the front-end goes and a new
    # one connects to the socket the second daemon took over (--reconnect): same session.
    d = daemon_factory("--reconnect")
    (d.share / "f").write_bytes(b"0123456789")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2, inflight=True)
    try:
        c = FuseClient(fe)
        c.init()
        node = c.lookup(ROOT, "f").nodeid
        fh = c.open(node, os.O_RDWR).fh
        fe.process = None
        old_pid = d.proc.pid
        for n in (1, 2):
            new = start_upgrade(d)
            upgraded.append(new)
            new.took_over()
            new.wait_for(f"took over from pid {old_pid} (live upgrade {n})")
            assert c.write(node, fh, n - 1, b"AB"[n - 1:n]) == 1
            assert new.status()["upgrades"] == n
            old_pid, d = new.pid, new
        assert (d.share / "f").read_bytes() == b"AB23456789"
        assert c.read(node, fh, 0, 4) == b"AB23"
        # The region handed over goes on being kept by the new daemon's workers.
        fd, desc = fe.inflight_region
        mm = mmap.mmap(fd, desc.mmap_size, offset=desc.mmap_offset)
        with mm, memoryview(mm) as view:
            q = inflight.QueueRegion(view, inflight.queue_stride(desc.queue_size),
                                     desc.queue_size)
            assert q.header()[4] == fe.queue(1).used_idx()
            assert not any(q.desc(h)[0] for h in range(desc.queue_size))
    finally:
        fe.close()
    d.wait_frontends_served(1)
    with Frontend.connect(d.socket, queues=2) as fe2:
        c2 = FuseClient(fe2)
        assert c2.read(node, fh, 2, 4) == b"2345"
        c2.release(node, fh)
    assert "Traceback" not in d.text, d.text


def test_upgrade_before_any_front_end(daemon_factory, upgraded) -> None:
    d = daemon_factory()
    new = start_upgrade(d)
    upgraded.append(new)
    new.took_over()
    assert d.proc.wait(timeout=30) == 0
    assert os.path.exists(d.socket)
    with Frontend.connect(d.socket, queues=2) as fe:
        c = FuseClient(fe)
        c.init()
        assert c.getattr(ROOT).attr.ino == d.share.stat().st_ino


GOOD_RECORD = {
    "format": "pyvirtiofsd-handover", "version": 1, "argv": ["--shared-dir=/s"], "pid": 10,
    "spawner": 11, "listener": 3, "conn": 4,
    "shared": {"arena": 5, "journal": 6, "stats": 7, "session": 8, "locks": 30},
    "upgrades": 0,
    "frontend": {"features": 1 << 32, "protocol_features": 3, "status": 15,
                 "regions": [[0, 1 << 20, 0x7F0000000000, 0, 9]],
                 "inflight": [10, 4224, 0, 2, 128],
                 "vrings": [{"num": 128, "desc": 0x1000, "used": 0x3000, "avail": 0x2000,
                             "log": 0, "flags": 0, "base": 7, "kick": 11, "call": 12,
                             "err": None, "enabled": True, "started": True}]},
}


def _changed(path: tuple, value: object) -> bytes:
    import copy
    import json

    doc = copy.deepcopy(GOOD_RECORD)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return json.dumps(doc).encode()


def test_a_well_formed_record_reads_back() -> None:
    import json

    from pyvirtiofsd.supervisor.upgrade import Record

    rec = Record.unpack(json.dumps(GOOD_RECORD).encode())
    assert rec.frontend is not None and rec.frontend.vrings[0].base == 7
    assert json.loads(rec.pack()) == GOOD_RECORD


@pytest.mark.parametrize(("path", "value", "why"), [
    (("format",), "something-else", "not a pyvirtiofsd handover record"),
    (("version",), 2, "version 2"),
    (("argv",), ["ok", 3], "argv"),
    (("pid",), -1, "pid"),
    (("listener",), "3", "listener"),
    (("conn",), True, "conn"),
    (("shared", "session"), KeyError, "shared"),
    (("shared", "arena"), 1 << 40, "arena"),
    (("frontend", "status"), 256, "status"),
    (("frontend", "regions"), [[0, 1, 2, 3]], "regions"),
    (("frontend", "inflight"), [10, 4224, 0, 2], "inflight"),
    (("frontend", "vrings"), [{"num": 128}], "vring 0"),
    (("frontend", "vrings", 0, "base"), 1 << 16, "base"),
    (("frontend", "vrings", 0, "started"), 1, "started"),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else None)
def test_a_malformed_record_is_refused(path: tuple, value: object, why: str) -> None:
    from pyvirtiofsd.supervisor.upgrade import Record, Refused

    with pytest.raises(Refused, match=why):
        Record.unpack(_changed(path, value))
    with pytest.raises(Refused, match="not JSON"):
        Record.unpack(b"{")


def test_the_new_daemon_becomes_the_services_main_process(daemon_factory, upgraded,
                                                          tmp_path) -> None:
    # Under a service manager (NotifyAccess=all): MAINPID= names the new daemon before the old
    # one exits, then READY=1 comes from it; the old one says nothing (no STOPPING=1).
    from tests.test_systemd import Manager

    d = daemon_factory()
    manager = Manager(str(tmp_path / "notify"))
    try:
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
        proc = subprocess.Popen([str(DAEMON), "upgrade", d.socket], env=env,
                                stderr=subprocess.PIPE, text=True)
        new = Upgraded(proc, d.socket, d.share)
        upgraded.append(new)
        assert proc.stderr is not None
        first, sender = manager.receive()
        assert first == {"MAINPID": str(sender)}
        assert d.proc.wait(timeout=30) == 0
        ready, sender2 = manager.receive()
        assert ready["READY"] == "1" and sender2 == sender
        assert proc.wait(timeout=30) == 0
        # The daemon keeps the command's stderr: read up to the command's last line only.
        line = next(line for line in proc.stderr if line.startswith("pyvirtiofsd upgrade: pid"))
        new.pid = int(line.split()[3])
        assert new.pid == sender
        with Frontend.connect(d.socket, queues=2) as fe:
            FuseClient(fe).init()
    finally:
        manager.close()


def test_an_upgrade_keeps_thousands_of_inodes(daemon_factory, upgraded) -> None:
    # 1,500 inodes looked up, each an fd in the spawner's table at a number the new daemon
    # must give it again -- more than select() could watch if the connection landed above them.
    d = daemon_factory()
    names = [f"n{i:04d}" for i in range(1500)]
    for n in names:
        (d.share / n).write_bytes(n.encode())
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        nodes = {n: c.lookup(ROOT, n).nodeid for n in names}
        fe.process = None
        new = start_upgrade(d)
        upgraded.append(new)
        new.took_over()
        assert new.status()["inodes"] >= 1500
        for n in [*names[::97], names[-1]]:
            fh = c.open(nodes[n], os.O_RDONLY).fh
            assert c.read(nodes[n], fh, 0, 5) == n.encode()
            c.release(nodes[n], fh)
            assert c.getattr(nodes[n]).attr.ino == (d.share / n).stat().st_ino
    finally:
        fe.close()


def test_guest_locks_live_on_through_an_upgrade(daemon_factory, upgraded) -> None:
    """The board saying which guest owner holds which open file description is handed over
    with the tables (worker/locks.py): after the upgrade the holder still conflicts with
    others and can let go, and the host sees both."""
    from tests.test_locks import EOF, RD, UN, WR, host_ofd_test

    d = daemon_factory()
    path = d.share / "f"
    path.write_bytes(b"x" * 4096)
    fe = Frontend.connect(d.socket, process=d.proc)
    try:
        c = FuseClient(fe, pid=101)
        c.init()
        node = c.lookup(ROOT, "f").nodeid
        fh, fh2 = c.open(node, os.O_RDWR).fh, c.open(node, os.O_RDWR).fh
        c.setlk(node, fh, 0xA, 0, 99, WR, pid=101)
        assert host_ofd_test(path, RD, 0, 10) == WR
        fe.process = None
        new = start_upgrade(d)
        upgraded.append(new)
        assert d.proc.wait(timeout=30) == 0, d.text + new.text
        new.took_over()
        # Still held by owner A, as the guest was told.
        assert c.getlk(node, fh2, 0xB, 50, 60, RD) == (0, 99, WR, 101)
        assert host_ofd_test(path, RD, 0, 10) == WR
        # Owner A lets go through the board the new daemon adopted: nothing is left behind.
        c.setlk(node, fh, 0xA, 0, EOF, UN)
        assert host_ofd_test(path, WR, 0, 0) == UN
        c.setlk(node, fh2, 0xB, 0, 9, WR, pid=202)
        assert host_ofd_test(path, RD, 0, 10) == WR
        assert "Traceback" not in new.text + d.text, new.text + d.text
    finally:
        fe.close()


def test_an_upgrade_during_a_migration_is_refused_and_the_daemon_serves_on(daemon_factory,
                                                                           upgraded) -> None:
    """The handover record does not carry the dirty log: refused with one line, the old
    daemon restarts its rings and goes on logging."""
    from tests.frontend import DirtyLog

    d = daemon_factory()
    (d.share / "f").write_bytes(b"still here")
    fe = Frontend.connect(d.socket, process=d.proc)
    log = DirtyLog(fe.memory)
    try:
        c = FuseClient(fe)
        c.init()
        node = c.lookup(ROOT, "f").nodeid
        fh = c.open(node, os.O_RDONLY).fh
        fe.set_log_base(log)
        fe.set_logging(True)
        new = start_upgrade(d)
        upgraded.append(new)
        assert new.proc.wait(timeout=30) != 0
        d.wait_for("live upgrade failed: dirty logging is on")
        log.clear()
        assert c.read(node, fh, 0, 10) == b"still here"
        assert log.pages(), "the old daemon stopped logging"
        assert d.proc.poll() is None
    finally:
        fe.close()
        log.close()


def test_inodes_kept_as_file_handles_open_after_an_upgrade(daemon_factory, upgraded) -> None:
    """--inode-file-handles=prefer: the new daemon opens the share's mount fd again, through
    which the inodes the adopted table keeps as handles are opened."""
    d = daemon_factory("--inode-file-handles=prefer")
    (d.share / "dir").mkdir()
    (d.share / "dir" / "f").write_bytes(b"by handle")
    fe = Frontend.connect(d.socket, process=d.proc)
    try:
        c = FuseClient(fe)
        c.init()
        dnode = c.lookup(ROOT, "dir").nodeid
        node = c.lookup(dnode, "f").nodeid
        fe.process = None
        new = start_upgrade(d)
        upgraded.append(new)
        assert d.proc.wait(timeout=30) == 0, d.text + new.text
        new.took_over()
        assert c.getattr(node).attr.size == len(b"by handle")
        fh = c.open(node, os.O_RDONLY).fh
        assert c.read(node, fh, 0, 9) == b"by handle"
        assert c.lookup(dnode, "f").nodeid == node
        c.create(dnode, "g", 0o600)
        assert (d.share / "dir" / "g").exists()
    finally:
        fe.close()
