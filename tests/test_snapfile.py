"""`pyvirtiofsd snapshot SOCKET FILE` and `--restore-from FILE`: the filesystem state saved to a
file by one daemon run and loaded by the next (supervisor/snapshot.py; docs/migration.md,
"Snapshot to a file").

The guest of the front-end driver holds looked-up nodes, open files and an open directory; the
state is saved while its rings run, the daemon is stopped, a new one starts on the same socket
with --restore-from, and the same guest (memory, rings) reconnects without FUSE_INIT and goes
on with the same nodeids and fhs.  A bad file (missing, corrupt, another major version,
options the daemon lacks, files gone) makes the daemon exit 2 with nothing applied.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.common import devstate
from pyvirtiofsd.common import fuse_abi as fa
from tests.conftest import DAEMON, DATA_PLANES, Daemon, start_daemon
from tests.frontend import Frontend, FuseClient, reconnect

pytestmark = pytest.mark.data_planes(*DATA_PLANES)

ROOT = fa.ROOT_ID


def snapshot(sock: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(DAEMON), "snapshot", sock, str(out)], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def run(tmp_path: Path, share: Path, data_plane: str) -> Iterator:
    """Starts daemons on one socket path, one after the other; stops what is left."""
    started: list[Daemon] = []
    sock = str(tmp_path / "vfs.sock")

    def start(*args: str) -> Daemon:
        d = start_daemon(share, sock, f"--data-plane={data_plane}", *args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def hold(d: Daemon) -> tuple[Frontend, FuseClient, dict[str, int]]:
    share = d.share
    (share / "dir").mkdir()
    (share / "dir" / "deep.txt").write_bytes(b"deep")
    (share / "ro.txt").write_bytes(b"read me")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    c = FuseClient(fe)
    c.init()
    ids = {"dir": c.lookup(ROOT, "dir").nodeid}
    ids["deep"] = c.lookup(ids["dir"], "deep.txt").nodeid
    entry, opened = c.create(ids["dir"], "rw.txt")
    ids["rw"], ids["rw_fh"] = entry.nodeid, opened.fh
    c.write(ids["rw"], ids["rw_fh"], 0, b"before")
    ids["ro"] = c.lookup(ROOT, "ro.txt").nodeid
    ids["ro_fh"] = c.open(ids["ro"], os.O_RDONLY).fh
    ids["dir_fh"] = c.opendir(ids["dir"]).fh
    return fe, c, ids


def names(c: FuseClient, nodeid: int, fh: int) -> set[bytes]:
    return {e.name for e in c.readdir_all(nodeid, fh)} - {b".", b".."}


@pytest.mark.parametrize("sandbox", [(), ("--sandbox=namespace", "--seccomp=kill")],
                         ids=["no-sandbox", "namespace"])
def test_a_restarted_daemon_serves_the_same_nodeids_and_fhs(run, tmp_path: Path,
                                                            sandbox: tuple[str, ...]) -> None:
    first = run(*sandbox)
    fe, c, ids = hold(first)
    out = tmp_path / "state" / "fs.state"
    out.parent.mkdir()
    # Taken while the rings run: the daemon pauses them and resumes them.
    r = snapshot(first.socket, out)
    assert r.returncode == 0, r.stderr + first.text
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert os.listdir(out.parent) == ["fs.state"]          # no temporary file left behind
    state = devstate.read_file(out)
    assert {ROOT, ids["dir"], ids["deep"], ids["rw"], ids["ro"]} <= {i.nodeid
                                                                      for i in state.inodes}
    assert {h.fh for h in state.handles} == {ids["rw_fh"], ids["ro_fh"], ids["dir_fh"]}
    assert state.session.minor == fa.KERNEL_MINOR_VERSION
    first.wait_for("snapshot taken")
    # The rings run on after the snapshot.
    assert c.read(ids["ro"], ids["ro_fh"], 0, 100) == b"read me"
    assert first.stop() == 0

    second = run(*sandbox, f"--restore-from={out}")
    second.wait_for("restored from")
    with fe:
        reconnect(fe, second.socket, second.proc)
        # No FUSE_INIT: the session, the nodeids and the fhs are the ones the state carried.
        assert c.read(ids["rw"], ids["rw_fh"], 0, 100) == b"before"
        assert c.write(ids["rw"], ids["rw_fh"], 6, b" and after") == 10
        assert (second.share / "dir" / "rw.txt").read_bytes() == b"before and after"
        assert c.read(ids["ro"], ids["ro_fh"], 0, 100) == b"read me"
        assert names(c, ids["dir"], ids["dir_fh"]) == {b"deep.txt", b"rw.txt"}
        assert c.getattr(ids["deep"]).attr.size == 4
        # New ids do not collide with the carried ones.
        new = c.lookup(ROOT, "dir").nodeid
        assert new == ids["dir"]
        fh = c.open(ids["deep"], os.O_RDONLY).fh
        assert fh not in (ids["rw_fh"], ids["ro_fh"], ids["dir_fh"])
        assert c.read(ids["deep"], fh, 0, 10) == b"deep"
        for node, h in ((ids["rw"], ids["rw_fh"]), (ids["ro"], ids["ro_fh"]),
                        (ids["deep"], fh)):
            c.release(node, h)
        c.releasedir(ids["dir"], ids["dir_fh"])
        c.forget(ids["deep"], 1)
    assert "Traceback" not in second.text, second.text


def test_a_snapshot_under_load_answers_every_request_once(run) -> None:
    d = run()
    fe = Frontend.connect(d.socket, process=d.proc, queues=2, queue_size=256)
    c = FuseClient(fe)
    c.init()
    tokens: list[int] = []
    pending: set[int] = set()

    def submit_and_collect() -> int:
        """Up to 32 CREATEs in flight, then whatever completed; how many were submitted.
        CREATE with O_EXCL of a new name each: a request served twice fails (EEXIST), a lost
        one never completes, and the driver refuses a completion it did not expect."""
        n = 0
        while len(pending) < 32:
            body = fa.CREATE_IN.pack(os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, 0, 0) \
                + f"f{len(tokens):05}".encode() + b"\0"
            t = c.submit(fa.Opcode.CREATE, ROOT, body)
            tokens.append(t)
            pending.add(t)
            n += 1
        for t, reply in c.collect():
            assert reply.error == 0, os.strerror(reply.error)
            pending.discard(t)
        return n

    with fe, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as status:
        while len(tokens) < 64:
            submit_and_collect()
        for t in sorted(pending):
            assert c.result(t).error == 0
        pending.clear()
        # The request `pyvirtiofsd snapshot` sends, from here so that the workload runs on
        # while the daemon takes the state, and after it has answered.
        status.connect(d.socket + ".status")
        status.sendall(b"POST /snapshot HTTP/1.0\r\n\r\n")
        answered, after = False, 0
        while not answered or after < 64:
            n = submit_and_collect()
            if answered:
                after += n
            elif select.select([status], [], [], 0)[0]:
                answered = True
        status.settimeout(30)
        answer = b""
        while chunk := status.recv(1 << 20):
            answer += chunk
        for t in sorted(pending):
            reply = c.result(t)
            assert reply.error == 0, os.strerror(reply.error)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), answer[:200]
    assert sorted(os.listdir(d.share)) == [f"f{i:05}" for i in range(len(tokens))]
    assert " 2 ring(s) paused" in d.wait_for("snapshot taken")
    # A consistent cut: each CREATE before it left an inode and an open handle in the state,
    # none after it did; and it fell inside the workload.
    state = devstate.decode(body)
    cut = len(state.handles)
    assert len(state.inodes) == 1 + cut
    assert 64 <= cut < len(tokens)


# -- bad files ----------------------------------------------------------------------------------

def start_bad(share: Path, tmp_path: Path, data_plane: str, *args: str) -> tuple[int, list[str]]:
    sock = tmp_path / "bad.sock"
    proc = subprocess.run([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                           "--sandbox=none", f"--data-plane={data_plane}", *args],
                          capture_output=True, text=True, timeout=60)
    assert not sock.exists()
    return proc.returncode, proc.stderr.splitlines()


@pytest.fixture
def good(run, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A state file of a guest that holds files, from a daemon now stopped."""
    d = run()
    fe, _c, ids = hold(d)
    out = tmp_path / "good.state"
    with fe:
        r = snapshot(d.socket, out)
        assert r.returncode == 0, r.stderr
    d.stop()
    return out, ids


def corrupt(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def other_major(data: bytes) -> bytes:
    magic, _major, minor, length, _crc = devstate.HEADER.unpack_from(data)
    head = struct.pack("<8sHHQ", magic, devstate.FORMAT_MAJOR + 1, minor, length)
    payload = data[devstate.HEADER_SIZE:]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


@pytest.mark.parametrize("damage, why", [
    (lambda data: data[:-5], "truncated"),
    (corrupt, "checksum"),
    (other_major, "version"),
    (lambda data: b"not a state file at all, really not" + data, "magic"),
])
def test_a_damaged_file_stops_the_daemon_before_it_listens(good, share: Path, tmp_path: Path,
                                                           data_plane: str, damage,
                                                           why: str) -> None:
    path, _ids = good
    bad = tmp_path / "bad.state"
    bad.write_bytes(damage(path.read_bytes()))
    rc, lines = start_bad(share, tmp_path, data_plane, f"--restore-from={bad}")
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("pyvirtiofsd: error: --restore-from"), lines


def test_a_missing_file_stops_the_daemon(share: Path, tmp_path: Path, data_plane: str) -> None:
    rc, lines = start_bad(share, tmp_path, data_plane, f"--restore-from={tmp_path}/none")
    assert rc == 2
    assert lines == [f"pyvirtiofsd: error: --restore-from {tmp_path}/none: No such file or"
                     " directory"]


def test_options_the_state_needs_are_refused(run, share: Path, tmp_path: Path,
                                             data_plane: str) -> None:
    d = run("--writeback")
    fe, _c, _ids = hold(d)
    out = tmp_path / "wb.state"
    with fe:
        assert snapshot(d.socket, out).returncode == 0
    d.stop()
    rc, lines = start_bad(share, tmp_path, data_plane, f"--restore-from={out}")
    assert rc == 2
    assert len(lines) == 1 and "--writeback" in lines[0] and "--restore-from" in lines[0], lines
    # With the option, the same file loads.
    d2 = run("--writeback", f"--restore-from={out}")
    d2.wait_for("restored from")


def test_files_gone_since_the_snapshot_are_refused_whole(good, run, share: Path,
                                                         tmp_path: Path,
                                                         data_plane: str) -> None:
    path, _ids = good
    os.unlink(share / "dir" / "rw.txt")
    rc, lines = start_bad(share, tmp_path, data_plane, "--log-level=error",
                          f"--restore-from={path}")
    assert rc == 2
    assert any("device state refused" in line and "rw.txt" in line for line in lines), lines
    assert any("--restore-from" in line and "not applied" in line for line in lines), lines


@pytest.mark.data_planes("python")
def test_a_snapshot_needs_a_daemon(tmp_path: Path, data_plane: str) -> None:
    r = snapshot(str(tmp_path / "nobody.sock"), tmp_path / "x.state")
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and "no status socket" in r.stderr
    assert not (tmp_path / "x.state").exists()


def test_a_snapshot_between_two_front_ends(run, tmp_path: Path) -> None:
    # --reconnect keeps the state while no front-end is connected: it is taken as it is.
    d = run("--reconnect", f"--metrics-socket={tmp_path}/metrics.sock")
    fe, _c, ids = hold(d)
    fe.close()
    d.wait_frontends_served(1)
    out = tmp_path / "idle.state"
    r = snapshot(d.socket, out)
    assert r.returncode == 0, r.stderr + d.text
    assert " 0 ring(s) paused" in d.wait_for("snapshot taken")
    assert {h.fh for h in devstate.read_file(out).handles} == {ids["rw_fh"], ids["ro_fh"],
                                                               ids["dir_fh"]}
    # The socket scrapers are pointed at takes no actions.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(f"{tmp_path}/metrics.sock")
        s.sendall(b"POST /snapshot HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 404"), answer
    assert d.text.count("snapshot taken") == 1


def test_a_request_queued_across_the_restart_is_served_by_the_new_daemon(run,
                                                                          tmp_path: Path) -> None:
    first = run()
    fe, c, ids = hold(first)
    with fe:
        # The guest's ring is disabled (paused by the front-end) and a READ waits in it.
        fe.set_vring_enable(1, False)
        token = c.submit(fa.Opcode.READ, ids["ro"], fa.ReadIn(ids["ro_fh"], 0, 64).pack(),
                         out_size=64)
        out = tmp_path / "fs.state"
        r = snapshot(first.socket, out)
        assert r.returncode == 0, r.stderr
        # The snapshot resumed the ring as it found it: still disabled, the READ still waits.
        c.vq.expect_no_completion(0.2)
        assert first.stop() == 0
        second = run(f"--restore-from={out}")
        reconnect(fe, second.socket, second.proc)
        reply = c.result(token)
        assert (reply.error, reply.body) == (0, b"read me")
