"""Device-state migration through the front-end driver (vhost-user SET_DEVICE_STATE_FD and
CHECK_DEVICE_STATE, protocol.md 1.12; worker/migration.py; docs/state-format.md).

One daemon serves a guest that holds looked-up nodes, open files and an open directory; its
state is saved as QEMU saves it (device stopped, a pipe, CHECK_DEVICE_STATE) and loaded into a
fresh daemon before its rings start, and the guest carries on there with the same nodeids and
fhs.  Then what must be refused is: corrupt, truncated, wrong-version and wrong-checksum state,
options the destination lacks, and inodes the host moved or deleted in between (by
`--migration-on-error`).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.common import devstate
from pyvirtiofsd.common import fuse_abi as fa
from tests.conftest import DAEMON, DATA_PLANES, Daemon
from tests.frontend import BackendError, DirtyLog, Frontend, FuseClient, FuseError

# Restored tables and the EIO of lost inodes are served by both data planes.
pytestmark = pytest.mark.data_planes(*DATA_PLANES)

ROOT = fa.ROOT_ID
MODES = ("find-paths", "file-handles")


@dataclass
class Guest:
    """What the guest holds on the source: nodeids and fhs it goes on using after the move."""

    fe: Frontend
    c: FuseClient
    d: Daemon
    dir_id: int
    rw_id: int
    rw_fh: int
    ro_id: int
    ro_fh: int
    dir_fh: int
    nested_id: int


def hold(d: Daemon) -> Guest:
    share = d.share
    (share / "dir").mkdir()
    (share / "dir" / "sub").mkdir()
    (share / "dir" / "sub" / "deep.txt").write_bytes(b"deep")
    (share / "ro.txt").write_bytes(b"read me")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    c = FuseClient(fe)
    c.init()
    dir_id = c.lookup(ROOT, "dir").nodeid
    sub_id = c.lookup(dir_id, "sub").nodeid
    nested_id = c.lookup(sub_id, "deep.txt").nodeid
    entry, opened = c.create(dir_id, "rw.txt")
    c.write(entry.nodeid, opened.fh, 0, b"before")
    ro_id = c.lookup(ROOT, "ro.txt").nodeid
    ro_fh = c.open(ro_id, os.O_RDONLY).fh
    dir_fh = c.opendir(dir_id).fh
    return Guest(fe, c, d, dir_id, entry.nodeid, opened.fh, ro_id, ro_fh, dir_fh, nested_id)


def resume(d: Daemon, data: bytes) -> tuple[Frontend, FuseClient]:
    """The destination as QEMU brings it up: connected, state loaded, then the rings."""
    fe = Frontend.connect(d.socket, process=d.proc, queues=0)
    fe.load_state(data)
    fe.add_queue(0)
    fe.add_queue(1)
    return fe, FuseClient(fe)


def names(c: FuseClient, nodeid: int, fh: int) -> set[bytes]:
    return {e.name for e in c.readdir_all(nodeid, fh)} - {b".", b".."}


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def sandbox() -> tuple[str, ...]:
    return ()


@pytest.fixture
def pair(daemon_factory, mode: str,
         sandbox: tuple[str, ...]) -> Iterator[Callable[..., tuple[Daemon, Daemon]]]:
    def start(*dest_args: str) -> tuple[Daemon, Daemon]:
        src = daemon_factory(f"--migration-mode={mode}", *sandbox)
        dst = daemon_factory(f"--migration-mode={mode}", *sandbox, *dest_args)
        return src, dst
    yield start


def test_guest_carries_on_with_the_same_nodeids_and_fhs(pair) -> None:
    src, dst = pair()
    g = hold(src)
    data = g.fe.save_state()
    state = devstate.decode(data)
    held = {i.nodeid for i in state.inodes}
    assert {ROOT, g.dir_id, g.rw_id, g.ro_id, g.nested_id} <= held
    assert {h.fh for h in state.handles} == {g.rw_fh, g.ro_fh, g.dir_fh}
    g.fe.close()

    fe, c = resume(dst, data)
    with fe:
        assert c.read(g.rw_id, g.rw_fh, 0, 100) == b"before"
        assert c.write(g.rw_id, g.rw_fh, 6, b" and after") == 10
        assert (dst.share / "dir" / "rw.txt").read_bytes() == b"before and after"
        assert c.read(g.ro_id, g.ro_fh, 0, 100) == b"read me"
        assert names(c, g.dir_id, g.dir_fh) == {b"sub", b"rw.txt"}
        assert c.getattr(g.nested_id).attr.size == 4
        # The lookup counts came along: the same nodeid answers a new LOOKUP.
        assert c.lookup(g.dir_id, "rw.txt").nodeid == g.rw_id
        # New inodes and handles do not collide with the restored ones.
        entry, opened = c.create(g.dir_id, "new.txt")
        assert entry.nodeid not in held and opened.fh not in {g.rw_fh, g.ro_fh, g.dir_fh}
        c.release(g.rw_id, g.rw_fh)
        with pytest.raises(FuseError) as err:
            c.read(g.rw_id, g.rw_fh, 0, 10)
        assert err.value.errno == errno.EBADF
    assert "Traceback" not in src.text + dst.text


def test_source_keeps_serving_after_a_save(pair) -> None:
    src, _dst = pair()
    g = hold(src)
    g.fe.save_state()
    # QEMU restarts the rings when a migration fails or is cancelled.
    for q in (0, 1):
        g.fe.start_queue(q)
    assert g.c.read(g.rw_id, g.rw_fh, 0, 100) == b"before"
    g.fe.close()


def _corrupt(data: bytes, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[bytes, str]]:
    payload = data[devstate.HEADER_SIZE:]
    flipped = bytearray(data)
    flipped[-5] ^= 0x40
    bad_crc = bytearray(data)
    bad_crc[devstate.HEADER_SIZE - 1] ^= 0xFF
    # A valid frame and checksum around a state whose handle names an inode that is not there.
    state = devstate.decode(data)
    state = dataclasses.replace(state, handles=(*state.handles,
                                                devstate.Handle(fh=99, nodeid=0xDEAD, flags=0)))
    with monkeypatch.context() as m:
        m.setattr(devstate, "_check_state", lambda state: None)
        dangling = devstate.encode(state)
    return {
        "corrupt": (bytes(flipped), "checksum mismatch"),
        "truncated": (data[:len(data) // 2], "truncated"),
        "wrong version": (devstate.frame(payload, major=devstate.FORMAT_MAJOR + 1),
                          "format version 2.0 is not supported"),
        "wrong crc": (bytes(bad_crc), "checksum mismatch"),
        "empty": (b"", "truncated: 0 bytes"),
        # Neither pyvirtiofsd's magic nor the Rust virtiofsd's first byte (0 or 1).
        "foreign": (b"\xff" * 64, "bad magic"),
        "dangling handle": (dangling, "inode 57005 is missing"),
    }


def test_bad_state_is_refused_and_nothing_is_applied(daemon_factory, monkeypatch) -> None:
    src = daemon_factory()
    g = hold(src)
    data = g.fe.save_state()
    assert zlib.crc32(data)      # a real state to spoil
    for what, (bad, line) in _corrupt(data, monkeypatch).items():
        dst = daemon_factory()
        with Frontend.connect(dst.socket, process=dst.proc, queues=0) as fe:
            with pytest.raises(BackendError) as err:
                fe.load_state(bad)
            assert err.value.request == 43, what             # CHECK_DEVICE_STATE
            refused = dst.wait_for("device state refused")
            assert line in refused and refused.count("\n") <= 1, (what, refused)
            # Nothing half-applied: the guest's nodeids are unknown here, and the session is
            # not started (a request before FUSE_INIT is refused).
            fe.add_queue(0)
            fe.add_queue(1)
            c = FuseClient(fe)
            with pytest.raises(FuseError) as e:
                c.getattr(g.ro_id)
            assert e.value.errno == errno.EIO, what
            c.init()
            with pytest.raises(FuseError) as e:
                c.getattr(g.ro_id)
            assert e.value.errno == errno.EBADF, what
        dst.stop()
    # The source kept serving throughout.
    for q in (0, 1):
        g.fe.start_queue(q)
    assert g.c.read(g.ro_id, g.ro_fh, 0, 100) == b"read me"
    g.fe.close()


def test_options_the_destination_lacks_are_refused(daemon_factory) -> None:
    src = daemon_factory("--writeback", "--posix-acl")
    g = hold(src)
    data = g.fe.save_state()
    dst = daemon_factory()
    fe = Frontend.connect(dst.socket, process=dst.proc, queues=0)
    with fe, pytest.raises(BackendError):
        fe.load_state(data)
    line = dst.wait_for("device state refused")
    assert "--writeback, --posix-acl, --xattr" in line, line
    g.fe.close()


def _move_things(share: Path) -> None:
    """The host renames a held file and deletes another while the guest is stopped."""
    os.rename(share / "dir" / "sub" / "deep.txt", share / "dir" / "sub" / "moved.txt")
    os.unlink(share / "ro.txt")


def test_host_changes_abort_the_migration(pair) -> None:
    src, dst = pair("--migration-on-error=abort")
    g = hold(src)
    data = g.fe.save_state()
    g.fe.close()
    # The source gone (QEMU's source quits once the guest runs on the destination), nothing
    # holds the deleted file any more: no file handle finds it.
    src.stop()
    _move_things(src.share)
    fe = Frontend.connect(dst.socket, process=dst.proc, queues=0)
    with fe, pytest.raises(BackendError):
        fe.load_state(data)
    line = dst.wait_for("device state refused")
    assert "cannot be found again" in line, line


def test_host_changes_become_guest_errors(pair, mode: str) -> None:
    src, dst = pair("--migration-on-error=guest-error")
    g = hold(src)
    data = g.fe.save_state()
    g.fe.close()
    src.stop()
    _move_things(src.share)
    fe, c = resume(dst, data)
    with fe:
        # The deleted file is lost: EIO for its nodeid and its fh, as virtiofsd answers.
        for call in (lambda: c.getattr(g.ro_id), lambda: c.read(g.ro_id, g.ro_fh, 0, 10)):
            with pytest.raises(FuseError) as err:
                call()
            assert err.value.errno == errno.EIO
        if mode == "file-handles":
            # Found by its handle wherever it went.
            assert c.getattr(g.nested_id).attr.size == 4
        else:
            with pytest.raises(FuseError) as err:
                c.getattr(g.nested_id)
            assert err.value.errno == errno.EIO
        # Everything else carries on.
        assert c.read(g.rw_id, g.rw_fh, 0, 100) == b"before"
        assert names(c, g.dir_id, g.dir_fh) == {b"sub", b"rw.txt"}
        # A FORGET of a lost inode is still counted, and a new file may take its name.
        c.forget(g.ro_id)
        (dst.share / "ro.txt").write_bytes(b"new")
        assert c.lookup(ROOT, "ro.txt").nodeid != g.ro_id
    assert "cannot be found again" in dst.text


@pytest.mark.skipif(os.geteuid() != 0, reason="the namespace sandbox needs root here")
@pytest.mark.parametrize("sandbox", [("--sandbox=namespace", "--seccomp=kill")])
def test_migration_inside_the_sandbox(pair, sandbox) -> None:
    """Pivoted into the share, under the workers' kill-action seccomp filter."""
    src, dst = pair()
    g = hold(src)
    data = g.fe.save_state()
    g.fe.close()
    fe, c = resume(dst, data)
    with fe:
        assert c.read(g.rw_id, g.rw_fh, 0, 100) == b"before"
        assert names(c, g.dir_id, g.dir_fh) == {b"sub", b"rw.txt"}
        assert c.getattr(g.nested_id).attr.size == 4
    assert "seccomp refused" not in src.text + dst.text


def test_verify_handles_sends_and_checks_file_handles(daemon_factory) -> None:
    """find-paths with --migration-verify-handles: the state carries every inode's file
    handle, and the destination compares the one it finds by path against it."""
    src = daemon_factory("--migration-verify-handles")
    dst = daemon_factory("--migration-verify-handles")
    g = hold(src)
    data = g.fe.save_state()
    g.fe.close()
    state = devstate.decode(data)
    assert all(i.handle for i in state.inodes if i.nodeid != ROOT)
    # The same name, another file: the dev/ino check and the handle check refuse it.
    os.rename(src.share / "ro.txt", src.share / "old.txt")
    (src.share / "ro.txt").write_bytes(b"impostor")
    fe = Frontend.connect(dst.socket, process=dst.proc, queues=0)
    with fe, pytest.raises(BackendError):
        fe.load_state(data)
    assert "a different file is there now" in dst.wait_for("device state refused")


# --- --inode-file-handles ------------------------------------------------------------------------

def test_mandatory_file_handles_refuse_a_share_without_them(tmp_path: Path) -> None:
    """procfs has no file handles: the daemon refuses to start, in one line, exit status 2."""
    r = subprocess.run([str(DAEMON), f"--socket-path={tmp_path / 's'}", "--shared-dir=/proc/sys",
                        "--sandbox=none", "--inode-file-handles=mandatory"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "--inode-file-handles=mandatory: the shared directory's" \
        " filesystem gives no file handles" in errors[0], r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting procfs in the share needs root")
def test_mandatory_file_handles_refuse_inodes_without_them(daemon_factory, share: Path) -> None:
    """An inode without a file handle (a procfs mounted in the share) is not made known to the
    guest under --inode-file-handles=mandatory (EOPNOTSUPP, as name_to_handle_at says); with
    `never` it is."""
    (share / "proc").mkdir()
    (share / "file").write_bytes(b"x")
    subprocess.run(["mount", "-t", "proc", "proc", str(share / "proc")], check=True)
    try:
        for mode, refused in (("mandatory", True), ("never", False)):
            d = daemon_factory(f"--inode-file-handles={mode}")
            with Frontend.connect(d.socket, process=d.proc, queues=2) as fe:
                c = FuseClient(fe)
                c.init()
                assert c.lookup(ROOT, "file").nodeid != ROOT
                if refused:
                    with pytest.raises(FuseError) as err:
                        c.lookup(ROOT, "proc")
                    assert err.value.errno == errno.EOPNOTSUPP
                    # Nor does READDIRPLUS give it a nodeid.
                    fh = c.opendir(ROOT).fh
                    got = {p.dirent.name: p.entry.nodeid for p in c.readdirplus(ROOT, fh)}
                    assert got.get(b"proc", 0) == 0 and got[b"file"] != 0, got
                else:
                    assert c.lookup(ROOT, "proc").nodeid != ROOT
            d.stop()
    finally:
        subprocess.run(["umount", "-l", str(share / "proc")], check=True)


# --- finding inodes the kernel cannot name -----------------------------------------------------

def test_a_held_file_known_only_by_another_name_is_found(pair) -> None:
    """The name the guest looked a file up by is gone but a hard link remains (the kernel then
    names the fd "... (deleted)"): the source finds the other name in a directory the guest
    holds, and the destination opens it there."""
    src, dst = pair()
    g = hold(src)
    os.link(src.share / "ro.txt", src.share / "dir" / "other.txt")
    os.unlink(src.share / "ro.txt")
    data = g.fe.save_state()
    g.fe.close()
    inode = devstate.decode(data).inode(g.ro_id)
    assert inode is not None and (inode.parent, inode.name) == (g.dir_id, b"other.txt")
    fe, c = resume(dst, data)
    with fe:
        assert c.read(g.ro_id, g.ro_fh, 0, 100) == b"read me"
    assert "0 invalid" in dst.wait_for("device state loaded")


def test_log_all_starts_the_pre_migration_pass(daemon_factory) -> None:
    """Dirty logging turning on means a migration has started: the source records every
    inode's location then, while the guest still runs, and the state taken at switch-over
    carries the guest on."""
    src = daemon_factory()
    dst = daemon_factory()
    g = hold(src)
    log = DirtyLog(g.fe.memory)
    g.fe.set_log_base(log)
    g.fe.set_logging(True)
    located = src.wait_for("pre-migration pass")
    assert "pre-migration pass: 5 inodes located" in located, located   # dir, sub, deep, rw, ro
    # The guest keeps running meanwhile.
    assert g.c.read(g.ro_id, g.ro_fh, 0, 100) == b"read me"
    data = g.fe.save_state()
    g.fe.close()
    fe, c = resume(dst, data)
    with fe:
        assert c.getattr(g.nested_id).attr.size == 4
        assert c.read(g.rw_id, g.rw_fh, 0, 100) == b"before"


# --- the requests themselves (protocol.md 1.12) ------------------------------------------------

def test_set_device_state_fd_is_refused_unless_the_device_is_stopped(daemon_factory) -> None:
    """A transfer while a ring runs, in another phase than STOPPED or in an unknown direction
    is refused in the reply (error code, "invalid fd" bit set: no fd of the back-end's), and
    the connection and the guest carry on."""
    d = daemon_factory()
    g = hold(d)
    assert g.fe.check_device_state() != 0         # no transfer yet: nothing to vouch for
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        assert g.fe.set_device_state_fd(Frontend.STATE_SAVE, wfd) == (1, None)  # rings run
        g.fe.stop_device()
        assert g.fe.set_device_state_fd(Frontend.STATE_SAVE, wfd, phase=1) == (1, None)
        assert g.fe.set_device_state_fd(7, wfd) == (1, None)
        assert g.fe.set_device_state_fd(Frontend.STATE_SAVE, wfd) == (0, None)
    finally:
        os.close(wfd)
    data = b""
    while chunk := os.read(rfd, 1 << 16):
        data += chunk
    os.close(rfd)
    assert g.fe.check_device_state() == 0
    assert devstate.decode(data).inode(g.rw_id) is not None
    for q in (0, 1):
        g.fe.start_queue(q)
    assert g.c.read(g.rw_id, g.rw_fh, 0, 100) == b"before"
    g.fe.close()
    assert d.text.count("SET_DEVICE_STATE_FD refused") == 3, d.text


def test_a_session_this_daemon_cannot_continue_is_refused(daemon_factory, monkeypatch) -> None:
    """A state from a newer FUSE, a larger max_write or INIT flags this daemon does not serve
    (a state another daemon wrote) is refused in one line."""
    src = daemon_factory()
    g = hold(src)
    state = devstate.decode(g.fe.save_state())
    g.fe.close()
    s = state.session
    for session, line in (
            (dataclasses.replace(s, minor=99), "the guest's FUSE session is 7.99"),
            (dataclasses.replace(s, max_write=s.max_write * 2), "this daemon takes"),
            (dataclasses.replace(s, init_flags=s.init_flags | 1 << 62),
             "INIT flags 0x4000000000000000 this daemon does not serve")):
        dst = daemon_factory()
        with Frontend.connect(dst.socket, process=dst.proc, queues=0) as fe:
            with pytest.raises(BackendError):
                fe.load_state(devstate.encode(dataclasses.replace(state, session=session)))
            assert line in dst.wait_for("device state refused")
        dst.stop()
