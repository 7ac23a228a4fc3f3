"""Migration between pyvirtiofsd and the Rust virtiofsd 1.13, both ways, through the front-end
driver playing QEMU and the guest (docs/rust-state-format.md).

The source serves a guest that has looked names up and holds a file open for writing, one for
reading and a directory open; its rings are stopped (GET_VRING_BASE), its state saved
(SET_DEVICE_STATE_FD SAVE); the destination, started on the same share, loads that state before
its rings start, and the guest carries on with the same nodeids and handles.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.common import devstate, rsstate
from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.fuse_abi import InitFlag
from tests.conftest import Daemon
from tests.frontend import (
    ANCHOR,
    DEFAULT_INIT_FLAGS,
    BackendError,
    Frontend,
    FuseClient,
    FuseError,
    adopt,
    anchor_argv,
    start_daemon,
    stop_daemon,
)


@dataclass
class Rust:
    proc: object
    socket: str
    log: Path

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def rust_factory(tmp_path: Path) -> Iterator:
    if not os.path.exists(ANCHOR):
        pytest.skip(f"Rust virtiofsd anchor not installed at {ANCHOR}")
    started: list[tuple[Rust, str]] = []

    def start(share: Path, *extra: str) -> Rust:
        # sun_path holds 108 bytes and pytest's tmp_path grows with the test name.
        sockdir = tempfile.mkdtemp(prefix="vfs-")
        sock = os.path.join(sockdir, "s")
        log = tmp_path / f"rust{len(started)}.log"
        proc = start_daemon(anchor_argv(sock, str(share), "--log-level=debug", *extra), str(log))
        r = Rust(proc, sock, log)
        started.append((r, sockdir))
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"virtiofsd did not start:\n{r.text}")
            time.sleep(0.01)
        return r

    yield start
    for r, sockdir in started:
        status = stop_daemon(r.proc)
        shutil.rmtree(sockdir, ignore_errors=True)
        print(f"--- virtiofsd log (exit {status}) ---\n{r.text[-3000:]}")


@dataclass
class Guest:
    """What the guest holds when the source stops: nodeids and handles, checked afterwards."""
    d: int
    f: int
    top: int
    fh_rw: int
    fh_ro: int
    fh_dir: int


def populate(share: Path) -> None:
    (share / "d").mkdir()
    (share / "d" / "f.txt").write_bytes(b"hello\n")
    (share / "top.txt").write_bytes(b"top\n")


def use(c: FuseClient) -> Guest:
    c.init()
    d = c.lookup(fa.ROOT_ID, "d").nodeid
    f = c.lookup(d, "f.txt").nodeid
    top = c.lookup(fa.ROOT_ID, "top.txt").nodeid
    g = Guest(d, f, top, c.open(f, os.O_RDWR).fh, c.open(top, os.O_RDONLY).fh,
              c.opendir(d).fh)
    c.write(f, g.fh_rw, 6, b"before\n")
    return g


def stop_and_save(fe: Frontend) -> bytes:
    return fe.save_state()          # GET_VRING_BASE on every ring first, as QEMU stops it


def carry_on(fe: Frontend, state: bytes, c: FuseClient) -> None:
    """The destination's half, as QEMU orders it: the state is loaded while no ring runs, then
    the memory table and the rings (at the bases the source stopped at)."""
    fe.load_state(state)
    fe.set_mem_table()
    for index in sorted(fe.queues):
        fe.start_queue(index)
    c.fe = fe


def check_guest(c: FuseClient, g: Guest, share: Path) -> None:
    """The guest's nodeids and handles work on the destination, and the host sees its write."""
    assert c.read(g.f, g.fh_rw, 0, 100) == b"hello\nbefore\n"
    c.write(g.f, g.fh_rw, 13, b"after\n")
    assert (share / "d" / "f.txt").read_bytes() == b"hello\nbefore\nafter\n"
    assert c.read(g.top, g.fh_ro, 0, 100) == b"top\n"
    assert {e.name for e in c.readdir_all(g.d, g.fh_dir)} >= {b".", b"..", b"f.txt"}
    assert c.getattr(g.f).attr.ino == os.stat(share / "d" / "f.txt").st_ino
    # The lookup counts came along: the guest's FORGETs are taken without complaint, and the
    # names can be looked up again.
    assert c.lookup(g.d, "f.txt").nodeid == g.f
    c.release(g.f, g.fh_rw)
    c.releasedir(g.d, g.fh_dir)


# -- the driver against virtiofsd alone: the flow is right before pyvirtiofsd is in it ---------

def test_driver_migrates_between_two_virtiofsd(rust_factory, share):
    populate(share)
    src = rust_factory(share)
    fe = Frontend.connect(src.socket, process=src.proc)
    c = FuseClient(fe)
    g = use(c)
    state = stop_and_save(fe)
    assert rsstate.is_rust_state(state)
    dst = rust_factory(share)
    fe2 = adopt(fe, dst.socket, process=dst.proc)
    fe.close()
    carry_on(fe2, state, c)
    check_guest(c, g, share)
    fe2.close()


def test_virtiofsd_refuses_check_without_transfer(rust_factory, share):
    """The driver's CHECK_DEVICE_STATE failure path, proven on virtiofsd."""
    src = rust_factory(share)
    with Frontend.connect(src.socket, process=src.proc) as fe:
        assert fe.check_device_state() != 0


def test_session_template_is_what_virtiofsd_negotiates(rust_factory, share):
    """rsstate's FUSE session for a virtiofsd guest is the one virtiofsd 1.13 really agrees to
    with a Linux guest, once the options in its state are applied."""
    for extra in ((), ("--posix-acl",)):
        r = rust_factory(share, *extra)
        with Frontend.connect(r.socket, process=r.proc) as fe:
            c = FuseClient(fe)
            # What Linux 6.12 offers besides: ALLOW_IDMAP, which virtiofsd takes.
            offered = DEFAULT_INIT_FLAGS | InitFlag.ALLOW_IDMAP
            out = c.init(flags=int(offered))
            agreed = out.flags | out.flags2 << 32
            state = rsstate.decode(fe.save_state(), rsstate.session_template(
                fa.KERNEL_MINOR_VERSION, readdirplus=True, killpriv_v2=False,
                security_label=False, options=devstate.SessionOption(0)))
        assert agreed & InitFlag.ALLOW_IDMAP
        assert state.session.init_flags == agreed, InitFlag(state.session.init_flags ^ agreed)
        assert state.session.minor == min(out.minor, fa.KERNEL_MINOR_VERSION)
        assert (state.session.max_write, state.session.max_pages) == (out.max_write,
                                                                      out.max_pages)


# -- pyvirtiofsd in it --------------------------------------------------------------------------

# Each mode on the source, the same on the destination (virtiofsd ignores it there).
MODES = {
    "find-paths": (),
    "verify-handles": ("--migration-verify-handles",),
    "file-handles": ("--migration-mode=file-handles",),
}


@pytest.mark.parametrize("mode", MODES)
def test_virtiofsd_to_pyvirtiofsd(rust_factory, daemon_factory, share, mode):
    populate(share)
    src = rust_factory(share, *MODES[mode])
    fe = Frontend.connect(src.socket, process=src.proc)
    c = FuseClient(fe)
    g = use(c)
    state = stop_and_save(fe)
    dst: Daemon = daemon_factory(*MODES[mode])
    fe2 = adopt(fe, dst.socket, process=dst.proc)
    fe.close()
    carry_on(fe2, state, c)
    check_guest(c, g, share)
    dst.wait_for("device state loaded: 4 inodes (0 invalid), 3 handles")
    fe2.close()


@pytest.mark.parametrize("mode", MODES)
def test_pyvirtiofsd_to_virtiofsd(rust_factory, daemon_factory, share, mode):
    populate(share)
    src: Daemon = daemon_factory("--migration-state-format=virtiofsd", *MODES[mode])
    fe = Frontend.connect(src.socket, process=src.proc)
    c = FuseClient(fe)
    g = use(c)
    state = stop_and_save(fe)
    assert rsstate.is_rust_state(state)
    decoded = rsstate.decode_wire(state)
    assert {i.id for i in decoded.inodes} == {fa.ROOT_ID, g.d, g.f, g.top}
    assert {h.id for h in decoded.handles} == {g.fh_rw, g.fh_ro, g.fh_dir}
    # pyvirtiofsd records every inode's path, and in the handle modes its file handle too:
    # virtiofsd's destination opens the path and checks that the handle matches.
    f = next(i for i in decoded.inodes if i.id == g.f)
    assert (f.location, f.parent, f.filename) == (rsstate.Location.PATH, g.d, "f.txt")
    assert (f.file_handle is not None) == (mode != "find-paths")
    dst = rust_factory(share)
    fe2 = adopt(fe, dst.socket, process=dst.proc)
    fe.close()
    carry_on(fe2, state, c)
    check_guest(c, g, share)
    fe2.close()


def test_pyvirtiofsd_writes_its_own_format_by_default(daemon_factory, share):
    populate(share)
    src: Daemon = daemon_factory()
    with Frontend.connect(src.socket, process=src.proc) as fe:
        use(FuseClient(fe))
        state = stop_and_save(fe)
    assert state.startswith(devstate.MAGIC) and not rsstate.is_rust_state(state)


def test_unmappable_virtiofsd_state_is_refused_and_the_daemon_keeps_serving(
        daemon_factory, share):
    """A state pyvirtiofsd cannot carry on (here: a name that is not UTF-8 cannot happen in
    virtiofsd's format, so a dangling parent) is refused with one line; nothing is applied."""
    populate(share)
    bad = bytes.fromhex("01" "02" "01030000" "0502010901" "64" "00" "06" "00" "00"
                "00010001" "00")
    with pytest.raises(devstate.StateError, match="parent 9 is missing"):
        rsstate.decode_wire(bad)
    dst: Daemon = daemon_factory()
    with Frontend.connect(dst.socket, process=dst.proc) as fe:
        for index in sorted(fe.queues):
            fe.get_vring_base(index)
        with pytest.raises(BackendError):
            fe.load_state(bad)
        line = dst.wait_for("device state refused")
        assert "virtiofsd state, inode 5: parent 9 is missing" in line
        for index in sorted(fe.queues):
            fe.start_queue(index)
        c = FuseClient(fe)
        c.init()
        assert c.lookup(fa.ROOT_ID, "top.txt").nodeid


@pytest.mark.parametrize("on_error", ["abort", "guest-error"])
def test_inode_virtiofsd_lost_in_both_on_error_modes(rust_factory, daemon_factory, share,
                                                     on_error):
    """The host deletes a file the guest holds: virtiofsd sends that inode as Invalid; an
    aborting destination refuses the whole state, a guest-error one answers EIO for it alone."""
    populate(share)
    src = rust_factory(share)
    fe = Frontend.connect(src.socket, process=src.proc)
    c = FuseClient(fe)
    g = use(c)
    (share / "top.txt").unlink()
    state = stop_and_save(fe)
    assert any(i.location == rsstate.Location.INVALID for i in rsstate.decode_wire(state).inodes)
    dst: Daemon = daemon_factory(f"--migration-on-error={on_error}")
    fe2 = adopt(fe, dst.socket, process=dst.proc)
    fe.close()
    if on_error == "abort":
        with pytest.raises(BackendError):
            fe2.load_state(state)
        assert "cannot be found again" in dst.wait_for("device state refused")
        fe2.close()
        return
    fe2.load_state(state)
    fe2.set_mem_table()
    for index in sorted(fe2.queues):
        fe2.start_queue(index)
    c.fe = fe2
    with pytest.raises(FuseError) as e:
        c.read(g.top, g.fh_ro, 0, 10)
    assert e.value.errno == errno.EIO
    with pytest.raises(FuseError) as e:
        c.getattr(g.top)
    assert e.value.errno == errno.EIO
    assert c.read(g.f, g.fh_rw, 0, 100) == b"hello\nbefore\n"
    dst.wait_for("device state loaded: 4 inodes (1 invalid), 3 handles")
    fe2.close()


def test_guest_from_virtiofsd_may_send_no_ids(rust_factory, daemon_factory, share):
    """virtiofsd takes FUSE_ALLOW_IDMAP from a Linux 6.12 guest, which then sends uid and gid
    0xffffffff for requests it needs no ids for: pyvirtiofsd carries such a session on, serving
    them as virtiofsd does; its own sessions never have the flag and refuse such ids."""
    populate(share)
    src = rust_factory(share)
    fe = Frontend.connect(src.socket, process=src.proc)
    c = FuseClient(fe)
    out = c.init(flags=int(DEFAULT_INIT_FLAGS | InitFlag.ALLOW_IDMAP))
    assert out.flags2 << 32 & InitFlag.ALLOW_IDMAP
    top = c.lookup(fa.ROOT_ID, "top.txt").nodeid
    state = stop_and_save(fe)
    dst: Daemon = daemon_factory()
    fe2 = adopt(fe, dst.socket, process=dst.proc)
    fe.close()
    carry_on(fe2, state, c)
    c.uid = c.gid = fa.INVALID_UIDGID
    assert c.getattr(top).attr.ino == os.stat(share / "top.txt").st_ino
    fe2.close()
    own: Daemon = daemon_factory()
    with Frontend.connect(own.socket, process=own.proc) as fe3:
        c3 = FuseClient(fe3)
        c3.init(flags=int(DEFAULT_INIT_FLAGS | InitFlag.ALLOW_IDMAP))
        assert not c3.flags & InitFlag.ALLOW_IDMAP
        c3.uid = c3.gid = fa.INVALID_UIDGID
        with pytest.raises(FuseError) as e:
            c3.getattr(fa.ROOT_ID)
        assert e.value.errno == errno.EPERM
