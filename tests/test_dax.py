"""DAX end to end: file ranges mapped into the front-end's cache window (supervisor/dax.py).

The test front-end (tests/frontend.py CacheWindow, BackendChannel) plays the VMM: it reserves a
window, gives the daemon a back-end channel and maps, unmaps and syncs what the daemon asks,
with MAP_FIXED, as cloud-hypervisor does with its virtio-fs cache.  The tests read and write
"through the window" as a guest with dax=always does, and check the host file.  Both request
families run: cloud-hypervisor's FS_MAP/FS_UNMAP/FS_SYNC and SHMEM_MAP/SHMEM_UNMAP with
GET_SHMEM_CONFIG; both data planes (the engine hands these opcodes to Python).
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.control import (
    DAX_ALL,
    DaxDone,
    DaxIo,
    DaxIoDone,
    DaxMap,
    DaxSync,
    DaxUnmap,
    RingStop,
)
from pyvirtiofsd.common.vhost_user import (
    FS_UNMAP_ALL,
    FsBackendMsg,
    FsBackendRequest,
    Header,
    HeaderFlag,
    ProtocolFeature,
    Request,
)
from pyvirtiofsd.supervisor.dax import DaxWindow
from pyvirtiofsd.supervisor.status import prometheus
from pyvirtiofsd.worker.dax import DaxClient
from pyvirtiofsd.worker.main import Worker
from tests.conftest import DAEMON, DATA_PLANES, Daemon
from tests.frontend import (
    DEFAULT_INIT_FLAGS,
    DEFAULT_PROTOCOL_FEATURES,
    BackendChannel,
    BackendError,
    CacheWindow,
    Frontend,
    FuseClient,
    FuseError,
    attach_window,
)

pytestmark = pytest.mark.data_planes(*DATA_PLANES)
PAGE = mmap.PAGESIZE
_HANDLER_BUG = re.compile(r"failed: [A-Za-z]*(Error|Exception|Warning)\b")
MIB = 1 << 20
WINDOW = 64 * MIB
READ = fa.SETUPMAPPING_FLAG_READ
RW = fa.SETUPMAPPING_FLAG_READ | fa.SETUPMAPPING_FLAG_WRITE
DAX_FEATURES = ProtocolFeature.BACKEND_REQ | ProtocolFeature.BACKEND_SEND_FD


@dataclass
class DaxSession:
    daemon: Daemon
    fe: Frontend
    client: FuseClient
    window: CacheWindow
    channel: BackendChannel
    family: str

    def requests(self) -> list[tuple[str, tuple, int]]:
        return list(self.channel.requests)

    def open_file(self, name: str, data: bytes, flags: int = os.O_RDWR) -> tuple[int, int]:
        (self.daemon.share / name).write_bytes(data)
        nodeid = self.client.lookup(fa.ROOT_ID, name).nodeid
        return nodeid, self.client.open(nodeid, flags).fh


@pytest.fixture
def dax_session(daemon_factory) -> Iterator:
    """dax_session(family, *daemon_args, window=WINDOW): a daemon with --dax, a front-end
    whose window is `window` bytes, and a FUSE session that asked for DAX."""
    opened: list[DaxSession] = []

    def start(family: str = "fs", *args: str, window: int = WINDOW,
              dax_window: int = WINDOW, queues: int = 2) -> DaxSession:
        d = daemon_factory("--dax", f"--dax-window={dax_window}", *args)
        pf = DEFAULT_PROTOCOL_FEATURES | DAX_FEATURES
        if family == "shmem":
            pf |= ProtocolFeature.SHMEM
        fe = Frontend.connect(d.socket, process=d.proc, protocol_features=pf, queues=queues)
        win = CacheWindow(window)
        channel = attach_window(fe, win, family)
        client = FuseClient(fe)
        s = DaxSession(d, fe, client, win, channel, family)
        opened.append(s)
        out = client.init(flags=DEFAULT_INIT_FLAGS | fa.InitFlag.MAP_ALIGNMENT)
        assert out.all_flags & fa.InitFlag.MAP_ALIGNMENT
        assert out.map_alignment == PAGE.bit_length() - 1
        return s

    yield start
    for s in opened:
        alive = s.daemon.proc.poll() is None
        s.fe.close()
        s.channel.close()
        s.window.close()
        assert alive, "the daemon died during the test:\n" + s.daemon.text
        assert "Traceback" not in s.daemon.text, s.daemon.text
        # A handler that raised something other than OSError is a bug, though the guest sees
        # only EIO; so is a worker's death the test did not cause.
        assert not _HANDLER_BUG.search(s.daemon.text), s.daemon.text


def _content(n: int) -> bytes:
    return bytes((i * 7 + i // PAGE) & 0xFF for i in range(n))


@pytest.mark.parametrize("family", ["fs", "shmem"])
def test_map_read_write_sync_unmap(dax_session, family: str) -> None:
    s = dax_session(family)
    data = _content(4 * PAGE)
    nodeid, fh = s.open_file("f", data)
    before = len(s.requests())
    s.client.setupmapping(nodeid, fh, PAGE, 3 * PAGE, 2 * MIB, RW)
    name, details, err = s.channel.wait_for(before + 1)[before]
    assert err == 0
    if family == "fs":
        assert name == "FS_MAP"
        assert details == ((PAGE, 2 * MIB, 3 * PAGE, 3),)        # MAP_R | MAP_W
    else:
        assert name == "SHMEM_MAP"
        assert details == (PAGE, 2 * MIB, 3 * PAGE, 1)           # writable
    # What the guest reads through the window is the file, from the offset asked for.
    assert s.window.read(2 * MIB, 3 * PAGE) == data[PAGE:]
    # A write through the window is the host file's: the window maps it MAP_SHARED.
    s.window.write(2 * MIB + 10, b"through the window")
    path = s.daemon.share / "f"
    assert path.read_bytes()[PAGE + 10:PAGE + 28] == b"through the window"
    # And a write on the host shows in the window.
    with open(path, "r+b") as f:
        f.seek(2 * PAGE)
        f.write(b"from the host")
    assert s.window.read(2 * MIB + PAGE, 13) == b"from the host"
    n = len(s.requests())
    s.client.fsync(nodeid, fh)
    if family == "fs":
        name, details, err = s.channel.wait_for(n + 1)[n]
        assert (name, details, err) == ("FS_SYNC", ((PAGE, 2 * MIB, 3 * PAGE, 0),), 0)
    else:
        # No SHMEM message syncs; the worker's fsync of the file covers the window's pages.
        assert len(s.requests()) == n
    s.client.removemapping([(2 * MIB, 3 * PAGE)])
    name, details, err = s.channel.wait_for(n + (2 if family == "fs" else 1))[-1]
    assert err == 0
    assert name == ("FS_UNMAP" if family == "fs" else "SHMEM_UNMAP")
    with pytest.raises(OSError) as ei:
        s.window.read(2 * MIB, PAGE)
    assert ei.value.errno == errno.EFAULT
    assert path.read_bytes()[PAGE + 10:PAGE + 28] == b"through the window"


@pytest.mark.data_planes("native")
def test_dax_in_the_full_sandbox(dax_session) -> None:
    """The supervisor's and the workers' seccomp policies allow what DAX needs (SCM_RIGHTS
    both ways, fstat and F_GETFL of the file, the back-end channel), in the namespace sandbox."""
    s = dax_session("fs", "--sandbox=namespace", "--seccomp=kill")
    nodeid, fh = s.open_file("f", _content(2 * PAGE))
    s.client.setupmapping(nodeid, fh, 0, 2 * PAGE, 0, RW)
    s.window.write(0, b"sandboxed")
    s.client.fsync(nodeid, fh)
    s.client.removemapping([(0, 2 * PAGE)])
    assert (s.daemon.share / "f").read_bytes()[:9] == b"sandboxed"
    assert [r[0] for r in s.requests()] == ["FS_UNMAP", "FS_MAP", "FS_SYNC", "FS_UNMAP"]
    assert "SIGSYS" not in s.daemon.text


def test_the_back_end_channel_is_refused_without_dax(daemon_factory) -> None:
    d = daemon_factory()
    fe = Frontend.connect(d.socket, process=d.proc)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert not fe.protocol_features & DAX_FEATURES
        with pytest.raises(BackendError):
            fe.send(Request.SET_BACKEND_REQ_FD, fds=[b.fileno()])
        b.close()
        # The daemon closed its copy: the far end sees EOF.
        a.settimeout(10)
        assert a.recv(1) == b""
    finally:
        fe.close()
        a.close()


def test_a_back_end_channel_that_is_no_socket_is_refused(daemon_factory) -> None:
    d = daemon_factory("--dax")
    fe = Frontend.connect(d.socket, process=d.proc,
                          protocol_features=DEFAULT_PROTOCOL_FEATURES | DAX_FEATURES)
    try:
        r, w = os.pipe()
        try:
            with pytest.raises(BackendError):
                fe.send(Request.SET_BACKEND_REQ_FD, fds=[r])
        finally:
            os.close(r)
            os.close(w)
        client = FuseClient(fe)
        out = client.init(flags=DEFAULT_INIT_FLAGS | fa.InitFlag.MAP_ALIGNMENT)
        assert not out.all_flags & fa.InitFlag.MAP_ALIGNMENT
    finally:
        fe.close()


@pytest.mark.parametrize("family", ["fs", "shmem"])
def test_whole_window_unmap_on_destroy_and_init(dax_session, family: str) -> None:
    s = dax_session(family)
    nodeid, fh = s.open_file("f", _content(2 * PAGE))
    s.client.setupmapping(nodeid, fh, 0, 2 * PAGE, 0, READ)
    s.client.setupmapping(nodeid, fh, 0, PAGE, 8 * MIB, READ)
    assert s.window.read(8 * MIB, PAGE) == _content(PAGE)
    n = len(s.requests())
    s.client.destroy()
    assert s.window.mapped == {}
    got = s.requests()[n:]
    if family == "fs":
        # cloud-hypervisor's whole-window unmap: one entry of length ~0.
        assert got == [("FS_UNMAP", ((0, 0, FS_UNMAP_ALL, 0),), 0)]
    else:
        assert sorted(d[1] for _name, d, _err in got) == [0, 8 * MIB]
        assert {name for name, _d, _err in got} == {"SHMEM_UNMAP"}
    # A new session starts with an empty window as well (the driver's mappings are gone).
    s.client.init(flags=DEFAULT_INIT_FLAGS | fa.InitFlag.MAP_ALIGNMENT)
    nodeid, fh = s.open_file("g", _content(PAGE))
    s.client.setupmapping(nodeid, fh, 0, PAGE, 4 * MIB, READ)
    assert s.window.read(4 * MIB, PAGE) == _content(PAGE)


@pytest.mark.parametrize("family", ["fs", "shmem"])
def test_mappings_outside_the_window_are_refused(dax_session, family: str) -> None:
    s = dax_session(family)
    nodeid, fh = s.open_file("f", _content(4 * PAGE))
    n = len(s.requests())
    for foffset, length, moffset, flags in (
            (0, 2 * PAGE, WINDOW - PAGE, READ),         # runs past the end
            (0, PAGE, WINDOW, READ),                    # starts at the end
            (0, 2 * PAGE, (1 << 64) - PAGE, READ),      # wraps around 2**64
            (0, (1 << 64) - PAGE, PAGE, READ),          # longer than the window
            (0, PAGE, PAGE + 1, READ),                  # window offset not aligned
            (1, PAGE, PAGE, READ),                      # file offset not aligned
            (0, 0, PAGE, READ),                         # empty
            (0, PAGE, PAGE, 0),                         # neither read nor write
            (0, PAGE, PAGE, 4)):                        # unknown flag
        with pytest.raises(FuseError) as ei:
            s.client.setupmapping(nodeid, fh, foffset, length, moffset, flags)
        assert ei.value.errno == errno.EINVAL, (foffset, length, moffset, flags)
    for moffset, length in ((WINDOW - PAGE, 2 * PAGE), ((1 << 64) - PAGE, 2 * PAGE)):
        with pytest.raises(FuseError) as ei:
            s.client.removemapping([(moffset, length)])
        assert ei.value.errno == errno.EINVAL
    # None of them reached the front-end.
    assert len(s.requests()) == n
    assert s.window.mapped == {}


def test_bad_handles_are_refused(dax_session) -> None:
    s = dax_session("fs")
    nodeid, fh = s.open_file("f", _content(PAGE), os.O_RDONLY)
    n = len(s.requests())
    with pytest.raises(FuseError) as ei:
        s.client.setupmapping(nodeid, fh + (1 << 32), 0, PAGE, 0, READ)   # stale generation
    assert ei.value.errno == errno.EBADF
    with pytest.raises(FuseError) as ei:
        s.client.setupmapping(nodeid, fh, 0, PAGE, 0, RW)    # write mapping of a read-only fh
    assert ei.value.errno == errno.EACCES
    s.client.release(nodeid, fh)
    with pytest.raises(FuseError) as ei:
        s.client.setupmapping(nodeid, fh, 0, PAGE, 0, READ)  # released
    assert ei.value.errno == errno.EBADF
    assert len(s.requests()) == n


@pytest.mark.parametrize("family", ["fs", "shmem"])
def test_two_queues_share_one_window(dax_session, family: str) -> None:
    """Requests from two queue workers in flight at once are served one after the other by
    the supervisor, and a range mapped through one queue is removed through the other."""
    s = dax_session(family, "--request-queues=2", queues=3)
    data = _content(16 * PAGE)
    nodeid, fh = s.open_file("f", data)
    other = FuseClient(s.fe, queue=2)
    tokens = []
    for i in range(8):
        for client, base in ((s.client, 0), (other, 32 * MIB)):
            body = fa.SETUPMAPPING_IN.pack(fh, 2 * i * PAGE, 2 * PAGE, RW, base + 2 * i * MIB)
            tokens.append((client, client.submit(fa.Opcode.SETUPMAPPING, nodeid, body)))
    for client, token in tokens:
        assert client.result(token).error == 0
    for i in range(8):
        for base in (0, 32 * MIB):
            assert s.window.read(base + 2 * i * MIB, 2 * PAGE) == data[2 * i * PAGE:][:2 * PAGE]
    doc = s.daemon.status()
    assert doc["dax"] == {"window_bytes": WINDOW, "requests": family.upper(), "mappings": 16,
                          "mapped_bytes": 16 * 2 * PAGE}
    shown = subprocess.run([str(DAEMON), "status", s.daemon.socket], capture_output=True,
                           text=True, timeout=30, check=True).stdout
    assert f"DAX window: 64 MiB ({family.upper()}), 16 mappings of {16 * 2 * PAGE} bytes" \
        in shown, shown
    metrics = prometheus(doc)
    assert "pyvirtiofsd_dax_mappings 16\n" in metrics
    assert f"pyvirtiofsd_dax_window_bytes {WINDOW}\n" in metrics
    other.removemapping([(2 * i * MIB, 2 * PAGE) for i in range(8)])
    s.client.removemapping([(32 * MIB + 2 * i * MIB, 2 * PAGE) for i in range(8)])
    assert s.window.mapped == {}
    assert all(err == 0 for _name, _d, err in s.requests())
    assert s.daemon.status()["dax"]["mappings"] == 0


def test_malformed_removemapping_is_refused(dax_session) -> None:
    s = dax_session("fs")
    n = len(s.requests())
    one = fa.REMOVEMAPPING_ONE.pack(0, PAGE)
    for body in (fa.REMOVEMAPPING_IN.pack(0),                      # nothing to remove
                 fa.REMOVEMAPPING_IN.pack(2) + one,                # fewer ranges than counted
                 fa.REMOVEMAPPING_IN.pack(PAGE // 16 + 1) + one * (PAGE // 16 + 1),  # too many
                 b"\1\0"):                                         # no count
        r = s.client.request(fa.Opcode.REMOVEMAPPING, fa.ROOT_ID, body)
        assert r.error == errno.EINVAL, body[:8]
    assert len(s.requests()) == n


def test_the_front_ends_refusal_reaches_the_guest(dax_session) -> None:
    """cloud-hypervisor checks each range against its own cache_size too: a window smaller than
    --dax-window refuses what lies past its end, and the guest gets its errno."""
    s = dax_session("fs", window=4 * MIB)
    nodeid, fh = s.open_file("f", _content(PAGE))
    with pytest.raises(FuseError) as ei:
        s.client.setupmapping(nodeid, fh, 0, PAGE, 8 * MIB, READ)
    assert ei.value.errno == errno.EINVAL
    assert s.requests()[-1] == ("request 6", s.requests()[-1][1], errno.EINVAL)
    # The daemon does not count a refused mapping as mapped.
    s.client.setupmapping(nodeid, fh, 0, PAGE, 0, READ)
    assert s.window.read(0, PAGE) == _content(PAGE)


def test_shmem_mapping_over_part_of_a_mapping_is_refused(dax_session) -> None:
    s = dax_session("shmem")
    nodeid, fh = s.open_file("f", _content(4 * PAGE))
    s.client.setupmapping(nodeid, fh, 0, 2 * PAGE, 2 * MIB, READ)
    with pytest.raises(FuseError) as ei:
        s.client.setupmapping(nodeid, fh, 0, 2 * PAGE, 2 * MIB + PAGE, READ)
    assert ei.value.errno == errno.EBUSY
    # The same range again (the driver upgrading a read mapping to write) replaces it.
    n = len(s.requests())
    s.client.setupmapping(nodeid, fh, 2 * PAGE, 2 * PAGE, 2 * MIB, RW)
    assert [r[0] for r in s.requests()[n:]] == ["SHMEM_UNMAP", "SHMEM_MAP"]
    assert s.window.read(2 * MIB, 2 * PAGE) == _content(4 * PAGE)[2 * PAGE:]
    s.window.write(2 * MIB, b"rw")
    assert (s.daemon.share / "f").read_bytes()[2 * PAGE:2 * PAGE + 2] == b"rw"


def test_shmem_config_names_the_window(daemon_factory) -> None:
    d = daemon_factory("--dax", "--dax-window=32M")
    fe = Frontend.connect(d.socket, process=d.proc,
                          protocol_features=DEFAULT_PROTOCOL_FEATURES | DAX_FEATURES
                          | ProtocolFeature.SHMEM)
    try:
        reply = fe.send(Request.GET_SHMEM_CONFIG)
        assert reply is not None
        nregions, size0, size1 = (int.from_bytes(reply.payload[i:i + n], "little")
                                  for i, n in ((0, 4), (8, 8), (16, 8)))
        assert (nregions, size0, size1) == (1, 32 * MIB, 0)
        assert len(reply.payload) == 2056
    finally:
        fe.close()


def test_without_a_window_dax_is_not_offered(daemon_factory) -> None:
    """--dax alone offers nothing: the front-end must have a window (a back-end channel; for
    SHMEM front-ends also GET_SHMEM_CONFIG).  Without --dax the features are not offered."""
    for args, pf in ((("--dax",), DEFAULT_PROTOCOL_FEATURES | DAX_FEATURES), ((), None)):
        d = daemon_factory(*args)
        fe = Frontend.connect(d.socket, process=d.proc, protocol_features=pf)
        try:
            offered = fe.protocol_features & (DAX_FEATURES | ProtocolFeature.SHMEM)
            assert offered == (DAX_FEATURES | ProtocolFeature.SHMEM if args else 0)
            doc = d.status()
            assert doc.get("dax") == ({"window_bytes": 0, "requests": None, "mappings": 0,
                                       "mapped_bytes": 0} if args else None)
            client = FuseClient(fe)
            out = client.init(flags=DEFAULT_INIT_FLAGS | fa.InitFlag.MAP_ALIGNMENT)
            assert not out.all_flags & fa.InitFlag.MAP_ALIGNMENT
            (d.share / "f").write_bytes(_content(PAGE))
            nodeid = client.lookup(fa.ROOT_ID, "f").nodeid
            fh = client.open(nodeid, os.O_RDONLY).fh
            with pytest.raises(FuseError) as ei:
                client.setupmapping(nodeid, fh, 0, PAGE, 0, READ)
            assert ei.value.errno == errno.ENOSYS
            with pytest.raises(FuseError) as ei:
                client.removemapping([(0, PAGE)])
            assert ei.value.errno == errno.ENOSYS
            # Whatever the body, as virtiofsd answers these opcodes.
            for op in (fa.Opcode.SETUPMAPPING, fa.Opcode.REMOVEMAPPING):
                assert client.request(op, fa.ROOT_ID, b"\1").error == errno.ENOSYS
        finally:
            fe.close()


def test_a_mount_without_dax_sends_nothing(daemon_factory) -> None:
    """QEMU sets up a back-end channel for every vhost-user device, window or not: a session
    whose kernel did not ask for DAX (no FUSE_MAP_ALIGNMENT: mounted without dax) leaves the
    channel silent, so such a front-end never sees a request it does not know."""
    d = daemon_factory("--dax")
    fe = Frontend.connect(d.socket, process=d.proc,
                          protocol_features=DEFAULT_PROTOCOL_FEATURES | DAX_FEATURES)
    window = CacheWindow(WINDOW)
    channel = attach_window(fe, window)
    try:
        client = FuseClient(fe)
        out = client.init()
        assert not out.all_flags & fa.InitFlag.MAP_ALIGNMENT
        assert out.map_alignment == 0
        (d.share / "f").write_bytes(_content(PAGE))
        nodeid = client.lookup(fa.ROOT_ID, "f").nodeid
        fh = client.open(nodeid).fh
        client.fsync(nodeid, fh)
        client.destroy()
        client.init()
        assert channel.requests == []
    finally:
        fe.close()
        channel.close()
        window.close()


@pytest.mark.parametrize("family", ["fs", "shmem"])
def test_a_killed_worker_leaves_its_mappings_to_the_window(dax_session, family: str) -> None:
    """Mappings belong to the window (the front-end holds them), not to the worker that asked:
    a worker killed with mappings in place loses none of them; its successor serves reads
    through them and removes them."""
    s = dax_session(family)
    data = _content(2 * PAGE)
    nodeid, fh = s.open_file("f", data)
    s.client.setupmapping(nodeid, fh, 0, 2 * PAGE, 6 * MIB, RW)
    pid = next(p["pid"] for p in s.daemon.status()["processes"]
               if p["role"] == "worker" and p["queue"] == 1)
    os.kill(pid, signal.SIGKILL)
    s.daemon.wait_status(lambda doc: doc["worker_restarts"] >= 1 and any(
        p["role"] == "worker" and p["queue"] == 1 and p["pid"] not in (None, pid)
        and p["state"] == "serving" for p in doc["processes"]))
    assert s.window.read(6 * MIB, 2 * PAGE) == data
    s.window.write(6 * MIB, b"still")
    assert s.client.read(nodeid, fh, 0, 5) == b"still"
    n = len(s.requests())
    s.client.removemapping([(6 * MIB, 2 * PAGE)])
    assert s.channel.wait_for(n + 1)[n][2] == 0
    assert s.window.mapped == {}


# -- the gate and the worker's client, without a daemon -----------------------------------------
@pytest.fixture
def gate(tmp_path: Path) -> Iterator:
    """A DaxWindow over a real arena holding one handle of file `a`, with a back-end channel
    whose far end the test reads."""
    arena = Arena.create(max_inodes=16, max_handles=16)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(PAGE))
    b.write_bytes(bytes(PAGE))
    fd_a = os.open(a, os.O_RDWR)
    st = os.fstat(fd_a)
    root = os.open(tmp_path, os.O_PATH)
    arena.inodes.set_root(root, 0, 0)
    nodeid, _ = arena.inodes.lookup_or_insert(os.open(a, os.O_PATH), st.st_dev, st.st_ino)
    fh = arena.handles.insert(fd_a, nodeid, os.O_RDWR)
    window = DaxWindow(WINDOW, arena)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    window.negotiated(0)                 # no REPLY_ACK: requests go out unanswered
    window.attach(os.dup(theirs.fileno()))
    theirs.close()
    ours.setblocking(False)
    yield window, fh, a, b, ours
    window.close()
    ours.close()
    arena.close()


def _sent(sock: socket.socket) -> bytes:
    """Everything the window sent so far (a message with an fd arrives as its own chunk)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_gate_refuses_an_fd_that_is_not_the_handles_file(gate) -> None:
    window, fh, a, b, far = gate
    for path, flags, err in ((b, os.O_RDWR, errno.EBADF),     # another file
                             (a, os.O_WRONLY, errno.EACCES),  # cannot be mapped at all
                             (a, os.O_RDONLY, errno.EACCES)):  # not for a write mapping
        fd = os.open(path, flags)
        assert window.serve(1, DaxMap(fh, 0, PAGE, 0, RW, seq=1, fds=(fd,))) == err
        with pytest.raises(OSError):
            os.fstat(fd)                 # the gate closed it
        assert _sent(far) == b""
    fd = os.open(a, os.O_RDWR)
    assert window.serve(1, DaxMap(fh, 0, PAGE, 0, RW, seq=1, fds=(fd,))) == 0
    assert len(_sent(far)) == 12 + 256   # one FS_MAP went out
    assert window.serve(1, DaxUnmap(0, DAX_ALL, seq=2)) == 0
    assert window.mappings == []


def test_client_keeps_control_messages_that_arrive_while_it_waits() -> None:
    worker, sup = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        client = DaxClient(worker)
        sup.send(RingStop(seq=5).pack())
        sup.send(DaxDone(0, seq=99).pack())             # a stale answer: ignored
        sup.send(DaxDone(0, seq=1).pack())
        client.unmap(0, PAGE)
        assert [(m.type.name, m.seq) for m in client.deferred] == [("RING_STOP", 5)]
        sup.send(DaxDone(errno.EINVAL, seq=2).pack())
        with pytest.raises(OSError) as ei:
            client.unmap(0, PAGE)
        assert ei.value.errno == errno.EINVAL
        assert sup.recv(64)[:2] == (41).to_bytes(2, "little")   # the DAX_UNMAP it sent
    finally:
        worker.close()
        sup.close()


def test_gate_keeps_the_rest_of_a_mapping_a_range_cuts(gate) -> None:
    """FS_UNMAP of the middle of a mapping leaves both ends mapped (cloud-hypervisor unmaps
    exactly the range); FS_SYNC then names both ends, with their own file offsets."""
    window, fh, a, _b, far = gate
    fd = os.open(a, os.O_RDWR)
    assert window.serve(1, DaxMap(fh, 4 * PAGE, 4 * PAGE, 8 * PAGE, RW, seq=1, fds=(fd,))) == 0
    assert window.serve(1, DaxUnmap(9 * PAGE, PAGE, seq=2)) == 0
    _sent(far)
    assert [(m.moffset, m.length, m.foffset) for m in window.mappings] == \
        [(8 * PAGE, PAGE, 4 * PAGE), (10 * PAGE, 2 * PAGE, 6 * PAGE)]
    assert window.serve(1, DaxSync(fh, seq=3)) == 0
    msg = _sent(far)
    hdr, payload = Header.unpack(msg[:12]), FsBackendMsg.unpack(msg[12:])
    assert hdr.request == FsBackendRequest.FS_SYNC
    assert [e for e in payload.entries if e[2]] == [(4 * PAGE, 8 * PAGE, PAGE, 0),
                                                   (6 * PAGE, 10 * PAGE, 2 * PAGE, 0)]
    # A stale fh is refused before anything is sent.
    assert window.serve(1, DaxSync(fh + (1 << 32), seq=4)) == errno.EBADF
    assert _sent(far) == b""


@pytest.mark.parametrize("family", ["fs", "shmem"])
@pytest.mark.parametrize("crash", ["SETUPMAPPING:executing", "SETUPMAPPING:executed",
                                   "REMOVEMAPPING:popped", "REMOVEMAPPING:replied"])
def test_a_worker_killed_inside_a_mapping_request(dax_session, monkeypatch, crash: str,
                                                  family: str) -> None:
    """The worker dies at the hook's point of a SETUPMAPPING or REMOVEMAPPING: its successor
    completes the request from the journal (mapping again is idempotent, so a replay after the
    front-end mapped the range leaves it mapped once), and the guest sees no error."""
    monkeypatch.setenv("PYVIRTIOFSD_TEST_HOOKS", "1")
    monkeypatch.setenv("PYVIRTIOFSD_TEST_CRASH", crash)
    # The hook kills its own worker, which no worker seccomp policy allows.
    s = dax_session(family, "--seccomp=none")
    data = _content(2 * PAGE)
    nodeid, fh = s.open_file("f", data)
    s.client.setupmapping(nodeid, fh, 0, 2 * PAGE, 10 * MIB, RW)
    assert s.window.read(10 * MIB, 2 * PAGE) == data
    s.client.removemapping([(10 * MIB, 2 * PAGE)])
    assert s.window.mapped == {}
    line = s.daemon.wait_for("worker for queue 1 (pid")
    assert "was killed by SIGKILL" in line and crash.split(":")[0] in line, line
    assert all(err == 0 for _name, _d, err in s.requests()), s.requests()


def test_a_late_dax_answer_is_no_request(tmp_path: Path) -> None:
    """A DAX_DONE that comes after the worker stopped waiting for it reaches the worker's loop
    as a control message: it is dropped, not answered (an answer would be one the supervisor
    never asked for)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        w = Worker.__new__(Worker)
        w.index, w.channel, w.running = 1, theirs, True
        ours.send(DaxDone(0, seq=3).pack())
        w.on_control()
        assert w.running
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            ours.recv(64)
    finally:
        ours.close()
        theirs.close()


# -- READ and WRITE data in the window: FS_IO (cloud-hypervisor's fs_backend_io) ----------------
# A guest's read() into, or write() from, a page of the window (a DAX-mapped file, O_DIRECT)
# gives the device buffers outside guest RAM: the front-end moves that data (FS_IO).  The
# engine hands such a chain to Python (it walks only guest RAM), so both planes serve it.
def _window_source(s: DaxSession, data: bytes, moffset: int = 2 * MIB) -> int:
    """Map a file holding `data` writable at `moffset`: the window pages a guest reads into or
    writes from; their guest-physical address."""
    g_node, g_fh = s.open_file("g", data)
    s.client.setupmapping(g_node, g_fh, 0, len(data), moffset, RW)
    return s.window.gpa + moffset


def _fs_io(s: DaxSession, since: int) -> list[tuple]:
    return [r for r in s.requests()[since:] if r[0] == "FS_IO"]


def test_read_into_and_write_from_the_window(dax_session) -> None:
    s = dax_session("fs")
    data = _content(4 * PAGE)
    nodeid, fh = s.open_file("f", data)
    gpa = _window_source(s, bytes(4 * PAGE))
    g = s.daemon.share / "g"
    n = len(s.requests())
    # READ of f straight into the window: the front-end preads into the pages of g.
    r = s.client.read_foreign(nodeid, fh, 100, [(gpa + 10, 3000)])
    assert (r.error, r.body) == (0, b"")
    assert s.window.read(2 * MIB + 10, 3000) == data[100:3100]
    assert g.read_bytes()[10:3010] == data[100:3100]
    assert _fs_io(s, n) == [("FS_IO", (((100, gpa + 10, 3000, 1),), 3000), 0)]   # MAP_R
    # WRITE to f from the window: the front-end pwrites what the pages of g hold.
    s.window.write(2 * MIB + PAGE, b"written from the window")
    n = len(s.requests())
    r = s.client.write_foreign(nodeid, fh, 2 * PAGE + 5, [(gpa + PAGE, 23)])
    assert r.error == 0 and fa.WRITE_OUT.unpack(r.body)[0] == 23
    assert (s.daemon.share / "f").read_bytes()[2 * PAGE + 5:][:23] == b"written from the window"
    assert _fs_io(s, n) == [("FS_IO", (((2 * PAGE + 5, gpa + PAGE, 23, 2),), 23), 0)]  # MAP_W
    # Data split between guest memory and the window, in order: each part where it lies.
    n = len(s.requests())
    r = s.client.read_foreign(nodeid, fh, 0, [700, (gpa + 3 * PAGE, 900), 300])
    assert r.error == 0
    assert r.body == data[:700] + data[1600:1900]
    assert s.window.read(2 * MIB + 3 * PAGE, 900) == data[700:1600]
    assert len(_fs_io(s, n)) == 1
    r = s.client.write_foreign(nodeid, fh, 0, [b"ram:", (gpa + PAGE, 7), b":ram"])
    assert fa.WRITE_OUT.unpack(r.body)[0] == 15
    assert (s.daemon.share / "f").read_bytes()[:15] == b"ram:written:ram"


def test_a_read_into_the_window_stops_at_end_of_file(dax_session) -> None:
    """READ is short at end of file; cloud-hypervisor fails an FS_IO that meets it, so the
    daemon asks only for what the file holds, and nothing past its end."""
    s = dax_session("fs")
    nodeid, fh = s.open_file("f", _content(5000))
    gpa = _window_source(s, bytes(2 * PAGE))
    n = len(s.requests())
    r = s.client.read_foreign(nodeid, fh, 1000, [(gpa, 2 * PAGE)])
    assert r.error == 0
    assert s.window.read(2 * MIB, 4000) == _content(5000)[1000:]
    assert _fs_io(s, n) == [("FS_IO", (((1000, gpa, 4000, 1),), 4000), 0)]
    n = len(s.requests())
    r = s.client.read_foreign(nodeid, fh, 6000, [(gpa, PAGE)])
    assert r.error == 0
    assert _fs_io(s, n) == []


def test_window_buffers_the_front_end_refuses(dax_session) -> None:
    """The daemon cannot know where the window lies (no message says): a buffer outside
    guest RAM goes to the front-end, which refuses what is not in its window (EFAULT), and
    the guest gets that errno, as a read() into a bad buffer does."""
    s = dax_session("fs")
    nodeid, fh = s.open_file("f", _content(4 * PAGE))
    gpa = _window_source(s, bytes(PAGE))
    for buf in ((s.window.gpa + WINDOW - 100, 200),     # runs past the window's end
                (s.window.gpa - 4 * MIB, 100),          # below it, outside guest memory
                (gpa + 8 * PAGE, 100)):                 # in the window, where nothing is mapped
        n = len(s.requests())
        r = s.client.read_foreign(nodeid, fh, 0, [buf])
        assert r.error == errno.EFAULT, buf
        assert [err for _name, _d, err in s.requests()[n:]] == [errno.EFAULT]
    # A window page mapped read-only cannot be read into; it can be written from.
    s.client.setupmapping(*s.open_file("h", _content(PAGE)), 0, PAGE, 4 * MIB, READ)
    r = s.client.read_foreign(nodeid, fh, 0, [(s.window.gpa + 4 * MIB, 100)])
    assert r.error == errno.EFAULT
    r = s.client.write_foreign(nodeid, fh, 0, [(s.window.gpa + 4 * MIB, 100)])
    assert r.error == 0
    assert (s.daemon.share / "f").read_bytes()[:100] == _content(PAGE)[:100]


def test_window_io_with_a_bad_handle_is_refused(dax_session) -> None:
    """The handle must be live and open in the direction asked (the supervisor's gate checks
    the fd it is sent against the handle table): the front-end hears of nothing."""
    s = dax_session("fs")
    nodeid, fh = s.open_file("f", _content(PAGE), os.O_RDONLY)
    gpa = _window_source(s, bytes(PAGE))
    n = len(s.requests())
    assert s.client.read_foreign(nodeid, fh + (1 << 32), 0, [(gpa, 100)]).error == errno.EBADF
    assert s.client.write_foreign(nodeid, fh, 0, [(gpa, 100)]).error == errno.EBADF
    s.client.release(nodeid, fh)
    assert s.client.read_foreign(nodeid, fh, 0, [(gpa, 100)]).error == errno.EBADF
    assert s.requests()[n:] == []
    assert (s.daemon.share / "f").read_bytes() == _content(PAGE)


def test_malformed_window_chains_are_refused(dax_session) -> None:
    """What cannot lie in the window is a malformed chain (used length 0, nothing asked of
    the front-end): a range that wraps past 2**64, one longer than the window, one partly in
    guest memory, and any buffer in the window other than READ's or WRITE's data."""
    s = dax_session("fs")
    nodeid, fh = s.open_file("f", _content(4 * PAGE))
    gpa = _window_source(s, bytes(PAGE))
    vq = s.client.vq
    ram_end = s.fe.memory.regions[-1].end
    read_in = fa.ReadIn(fh, 0, 200).pack()
    n = len(s.requests())
    chains = [
        ([s.client.build(fa.Opcode.READ, nodeid, read_in)[1][0] + read_in],
         [16, ((1 << 64) - 100, 200)]),                         # wraps past 2**64
        ([s.client.build(fa.Opcode.READ, nodeid, read_in)[1][0] + read_in],
         [16, (s.window.gpa, WINDOW + PAGE)]),                  # longer than the window
        ([s.client.build(fa.Opcode.READ, nodeid, read_in)[1][0] + read_in],
         [16, (ram_end - 100, 200)]),                           # half in guest memory
        ([s.client.build(fa.Opcode.READ, nodeid, read_in)[1][0] + read_in],
         [(gpa, 16), 200]),                                     # fuse_out_header in it
        ([(gpa, 40), read_in], [16, 200]),                      # fuse_in_header in it
        ([s.client.build(fa.Opcode.GETATTR, nodeid, bytes(16))[1][0] + bytes(16)],
         [16, (gpa, fa.ATTR_OUT.size)]),                        # not READ's data
        ([s.client.build(fa.Opcode.WRITE, nodeid, b"", length=40 + 40 + 8)[1][0],
          (gpa, 40), b"12345678"], [16, 8]),                    # fuse_write_in in it
        ([s.client.build(fa.Opcode.WRITE, nodeid, b"", length=40 + 40 + 8)[1][0],
          fa.WriteIn(fh, 0, 8, 0).pack(), b"12345678"], [16, (gpa, 8)]),   # WRITE's reply
    ]
    for readable, writable in chains:
        c = vq.wait(vq.submit_foreign(readable, writable))
        assert c.used_len == 0, (readable, writable)
    assert s.requests()[n:] == []
    s.daemon.wait_for("buffers in the DAX window outside the data of a READ or WRITE")
    assert (s.daemon.share / "f").read_bytes() == _content(4 * PAGE)
    # The queue goes on.
    assert s.client.read(nodeid, fh, 0, 10) == _content(10)


def test_window_buffers_without_a_window_are_malformed(daemon_factory) -> None:
    """No window (no --dax, or no back-end channel): a buffer outside guest RAM is what it
    always was, a malformed chain."""
    for args in ((), ("--dax",)):
        d = daemon_factory(*args)
        fe = Frontend.connect(d.socket, process=d.proc,
                              protocol_features=DEFAULT_PROTOCOL_FEATURES
                              | (DAX_FEATURES if args else 0))
        try:
            client = FuseClient(fe)
            client.init()
            (d.share / "f").write_bytes(_content(PAGE))
            nodeid = client.lookup(fa.ROOT_ID, "f").nodeid
            fh = client.open(nodeid).fh
            read_in = fa.ReadIn(fh, 0, 100).pack()
            hdr = client.build(fa.Opcode.READ, nodeid, read_in)[1][0]
            c = client.vq.wait(client.vq.submit_foreign([hdr + read_in],
                                                        [16, (CacheWindow.DEFAULT_GPA, 100)]))
            assert c.used_len == 0
            assert "outside guest memory" in d.wait_for("malformed descriptor chain")
        finally:
            fe.close()


def test_shmem_front_ends_cannot_move_window_data(dax_session) -> None:
    """The SHMEM requests map and unmap only: no message moves data, so a buffer in the
    window is answered EFAULT and the front-end hears nothing."""
    s = dax_session("shmem")
    nodeid, fh = s.open_file("f", _content(PAGE))
    gpa = _window_source(s, bytes(PAGE))
    n = len(s.requests())
    assert s.client.read_foreign(nodeid, fh, 0, [(gpa, 100)]).error == errno.EFAULT
    assert s.client.write_foreign(nodeid, fh, 0, [(gpa, 100)]).error == errno.EFAULT
    assert s.requests()[n:] == []
    assert (s.daemon.share / "f").read_bytes() == _content(PAGE)


@pytest.mark.data_planes("native")
def test_window_io_in_the_full_sandbox(dax_session) -> None:
    s = dax_session("fs", "--sandbox=namespace", "--seccomp=kill")
    nodeid, fh = s.open_file("f", _content(2 * PAGE))
    gpa = _window_source(s, bytes(PAGE))
    assert s.client.read_foreign(nodeid, fh, 0, [(gpa, PAGE)]).error == 0
    assert s.window.read(2 * MIB, PAGE) == _content(2 * PAGE)[:PAGE]
    assert s.client.write_foreign(nodeid, fh, PAGE, [(gpa, 10)]).error == 0
    assert (s.daemon.share / "f").read_bytes()[PAGE:PAGE + 10] == _content(10)
    assert "SIGSYS" not in s.daemon.text


def test_gate_refuses_bad_window_io(gate) -> None:
    """DAX_IO passes the same gate as DAX_MAP: the fd must be the handle's file, open in the
    direction asked; the range non-empty, no longer than the window, not wrapping 2**64.
    Every refusal closes the fd and sends nothing."""
    window, fh, a, b, far = gate
    window.reply_ack = True
    base = CacheWindow.DEFAULT_GPA
    cases = [
        (b, os.O_RDWR, DaxIo(fh, 0, base, PAGE, 0, seq=1), errno.EBADF),        # another file
        (a, os.O_WRONLY, DaxIo(fh, 0, base, PAGE, 0, seq=1), errno.EBADF),      # cannot read
        (a, os.O_RDONLY, DaxIo(fh, 0, base, PAGE, 1, seq=1), errno.EBADF),      # cannot write
        (tmp := a.parent, os.O_RDONLY, DaxIo(fh, 0, base, PAGE, 0, seq=1), errno.EBADF),
        (a, os.O_RDWR, DaxIo(fh + (1 << 32), 0, base, PAGE, 0, seq=1), errno.EBADF),  # stale fh
        (a, os.O_RDWR, DaxIo(fh, 0, base, 0, 0, seq=1), errno.EFAULT),          # empty
        (a, os.O_RDWR, DaxIo(fh, 0, base, WINDOW + 1, 0, seq=1), errno.EFAULT),  # > the window
        (a, os.O_RDWR, DaxIo(fh, 0, (1 << 64) - PAGE, 2 * PAGE, 0, seq=1), errno.EFAULT),
        (a, os.O_RDWR, DaxIo(fh, (1 << 63) - 1, base, PAGE, 0, seq=1), errno.EINVAL),
        (a, os.O_RDWR, DaxIo(fh, 0, base, PAGE, 2, seq=1), errno.EINVAL),       # direction
    ]
    assert tmp.is_dir()
    for path, flags, msg, err in cases:
        fd = os.open(path, flags)
        msg = dataclasses.replace(msg, fds=(fd,))
        assert window.answer(1, msg) == DaxIoDone(err, 0, seq=1), (path, flags, msg)
        with pytest.raises(OSError):
            os.fstat(fd)                 # the gate closed it
    assert _sent(far) == b""
    # Without REPLY_ACK the daemon could not learn what was moved; SHMEM has no I/O request.
    window.reply_ack = False
    fd = os.open(a, os.O_RDWR)
    assert window.answer(1, DaxIo(fh, 0, base, PAGE, 0, seq=2, fds=(fd,))).errno == errno.EFAULT
    window.reply_ack = True
    window.negotiated(ProtocolFeature.REPLY_ACK | ProtocolFeature.SHMEM)
    window.shmem_config()
    fd = os.open(a, os.O_RDWR)
    assert window.answer(1, DaxIo(fh, 0, base, PAGE, 0, seq=3, fds=(fd,))).errno == errno.EFAULT
    assert _sent(far) == b""


def test_gate_carries_the_front_ends_count(gate) -> None:
    """The front-end's answer to FS_IO is the byte count (or -errno); more than was asked is
    a broken answer (EIO)."""
    window, fh, a, _b, far = gate
    window.negotiated(ProtocolFeature.REPLY_ACK)
    far.setblocking(True)
    for value, want in ((PAGE, DaxIoDone(0, PAGE, seq=5)), (100, DaxIoDone(0, 100, seq=5)),
                        ((-errno.EFAULT) & ((1 << 64) - 1), DaxIoDone(errno.EFAULT, 0, seq=5)),
                        (PAGE + 1, DaxIoDone(errno.EIO, 0, seq=5))):
        answer = Header(FsBackendRequest.FS_IO, 1 | HeaderFlag.REPLY, 8).pack() + \
            value.to_bytes(8, "little")
        far.send(answer)                 # read by the gate once its request is out
        got = window.answer(1, DaxIo(fh, 0, CacheWindow.DEFAULT_GPA, PAGE, 0, seq=5,
                                     fds=(os.open(a, os.O_RDWR),)))
        assert got == want
        sent = far.recv(65536)
        hdr = Header.unpack(sent[:12])
        assert hdr.request == FsBackendRequest.FS_IO and hdr.flags & HeaderFlag.NEED_REPLY
        assert FsBackendMsg.unpack(sent[12:]).entries[0] == \
            (0, CacheWindow.DEFAULT_GPA, PAGE, 1)


@pytest.mark.parametrize("crash", ["READ:executing", "READ:executed", "WRITE:executing",
                                   "WRITE:executed"])
def test_a_worker_killed_inside_window_io(dax_session, monkeypatch, crash: str) -> None:
    """The worker dies before or after the front-end moved a READ's or WRITE's window data:
    its successor replays the request from the journal (FS_IO at an offset is idempotent)
    and the guest sees the reply it would have had."""
    monkeypatch.setenv("PYVIRTIOFSD_TEST_HOOKS", "1")
    monkeypatch.setenv("PYVIRTIOFSD_TEST_CRASH", crash)
    s = dax_session("fs", "--seccomp=none")
    data = _content(2 * PAGE)
    nodeid, fh = s.open_file("f", data)
    gpa = _window_source(s, bytes(PAGE))
    if crash.startswith("READ"):
        r = s.client.read_foreign(nodeid, fh, PAGE, [(gpa, PAGE)])
        assert r.error == 0
        assert s.window.read(2 * MIB, PAGE) == data[PAGE:]
    else:
        s.window.write(2 * MIB, b"replayed")
        r = s.client.write_foreign(nodeid, fh, 100, [(gpa, 8)])
        assert r.error == 0 and fa.WRITE_OUT.unpack(r.body)[0] == 8
        assert (s.daemon.share / "f").read_bytes() == data[:100] + b"replayed" + data[108:]
    line = s.daemon.wait_for("worker for queue 1 (pid")
    assert "was killed by SIGKILL" in line and crash.split(":")[0] in line, line
    assert all(err == 0 for _name, _d, err in s.requests()), s.requests()
