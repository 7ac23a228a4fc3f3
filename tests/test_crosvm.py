"""crosvm's SLEEP / WAKE / SNAPSHOT / RESTORE (docs/crosvm.md), through the front-end driver.

crosvm is not packaged here: the front-end side (tests/frontend.py, crosvm_*) is ours, written
from crosvm's source (its vmm_vhost backend_client.rs and the device-side handler.rs, March
2024), and frames the requests as crosvm's vhost-user client sent them: flags VERSION alone, a
one-byte success answer, SNAPSHOT's followed by the state, RESTORE's payload the state with one
kick eventfd per ring.
"""

from __future__ import annotations

import os

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common import rsstate, snapshot
from pyvirtiofsd.common.devstate import StateError
from pyvirtiofsd.common.vhost_user import CROSVM_SUCCESS, VERSION, Header, HeaderFlag, Request
from tests.conftest import Daemon
from tests.frontend import (
    BackendError,
    Frontend,
    FuseClient,
    adopt,
    crosvm_restore,
    crosvm_sleep,
    crosvm_snapshot,
    crosvm_wake,
)
from tests.test_rsstate_migration import check_guest, populate, use

pytestmark = pytest.mark.data_planes("native", "python")


def test_sleep_stops_every_ring_where_it_is_and_wake_resumes(daemon_factory, share):
    populate(share)
    d: Daemon = daemon_factory()
    with Frontend.connect(d.socket, process=d.proc) as fe:
        c = FuseClient(fe)
        g = use(c)
        vq = fe.queue(1)
        crosvm_sleep(fe)
        # Asleep: a request the guest queues is not taken (no used entry), and the ring's
        # position is the driver's: every request before SLEEP completed.
        assert vq.used_idx() == vq.avail_idx
        token = c.submit(fa.Opcode.GETATTR, g.f, fa.GETATTR_IN.pack(0, 0))
        vq.expect_no_completion(0.3)
        crosvm_wake(fe)
        assert c.result(token).error == 0
        assert c.read(g.f, g.fh_rw, 0, 100) == b"hello\nbefore\n"
        # Twice in a row is harmless either way.
        crosvm_sleep(fe)
        crosvm_sleep(fe)
        crosvm_wake(fe)
        crosvm_wake(fe)
        assert c.getattr(g.top).attr.ino == os.stat(share / "top.txt").st_ino


@pytest.mark.parametrize("state_format", ["pyvirtiofsd", "virtiofsd"])
def test_snapshot_in_one_daemon_restore_in_a_fresh_one(daemon_factory, share, state_format):
    """With --migration-state-format=virtiofsd the snapshot nests virtiofsd's format: the
    restoring daemon reads it as it reads a state from virtiofsd."""
    populate(share)
    src: Daemon = daemon_factory(f"--migration-state-format={state_format}")
    fe = Frontend.connect(src.socket, process=src.proc)
    c = FuseClient(fe)
    g = use(c)
    crosvm_sleep(fe)
    data = crosvm_snapshot(fe)
    snap = snapshot.decode(data)
    assert rsstate.is_rust_state(snap.state) == (state_format == "virtiofsd")
    assert snap.acked_features == fe.acked_features
    for index, ring in enumerate(snap.rings):
        q = fe.queue(index)
        assert ring.flags & snapshot.RingFlag.RUNNING and ring.base == q.avail_idx
        assert (ring.size, ring.desc, ring.avail, ring.used) == (q.size, q.desc_gpa,
                                                                  q.avail_gpa, q.used_gpa)
    dst: Daemon = daemon_factory()
    fe2 = adopt(fe, dst.socket, process=dst.proc)
    fe.close()
    # crosvm's vhost_user_restore: the memory table, each ring's call eventfd, then RESTORE
    # with the kick eventfds; the VM's resume then wakes the device.
    fe2.set_mem_table()
    for index, q in sorted(fe2.queues.items()):
        fe2.set_vring_call(index, q.call_fd)
    crosvm_restore(fe2, data, [q.kick_fd for _, q in sorted(fe2.queues.items())])
    crosvm_wake(fe2)
    c.fe = fe2
    check_guest(c, g, share)
    dst.wait_for("device state loaded: 4 inodes (0 invalid), 3 handles")
    fe2.close()


def test_refusals_answer_failure_and_change_nothing(daemon_factory, share):
    populate(share)
    d: Daemon = daemon_factory()
    with Frontend.connect(d.socket, process=d.proc) as fe:
        c = FuseClient(fe)
        g = use(c)
        # SNAPSHOT while the rings run; RESTORE into a running device; RESTORE of garbage.
        with pytest.raises(BackendError):
            crosvm_snapshot(fe)
        crosvm_sleep(fe)
        good = crosvm_snapshot(fe)
        crosvm_wake(fe)
        with pytest.raises(BackendError):
            crosvm_restore(fe, good)
        with pytest.raises(BackendError):
            crosvm_restore(fe, b"\xff" * 64)
        assert "RESTORE refused: device state: bad magic" in d.wait_for("not a pyvirtiofsd snap")
        # The device kept serving, the guest's handles as they were.
        assert c.read(g.f, g.fh_rw, 0, 100) == b"hello\nbefore\n"


def test_restore_refuses_a_damaged_snapshot_before_applying_anything(daemon_factory, share):
    populate(share)
    src: Daemon = daemon_factory()
    with Frontend.connect(src.socket, process=src.proc) as fe:
        use(FuseClient(fe))
        crosvm_sleep(fe)
        data = crosvm_snapshot(fe)
    ring_end = 32 + 36 * 2
    damaged = {
        "ring record": data[:40] + bytes([data[40] ^ 1]) + data[41:],
        "device state": data[:ring_end + 30] + bytes([data[ring_end + 30] ^ 1])
        + data[ring_end + 31:],
        "truncated": data[:len(data) - 3],
    }
    for what, bad in damaged.items():
        if what == "ring record":
            with pytest.raises(StateError, match="checksum"):
                snapshot.decode(bad)
        dst: Daemon = daemon_factory()
        with Frontend.connect(dst.socket, process=dst.proc, queues=0) as fe2:
            fe2.set_mem_table()
            with pytest.raises(BackendError):
                crosvm_restore(fe2, bad)
            # Nothing applied: WAKE has no ring to start, and a fresh session serves.
            crosvm_wake(fe2)
            fe2.add_queue(0)
            fe2.add_queue(1)
            c = FuseClient(fe2)
            c.init()
            assert c.lookup(fa.ROOT_ID, "top.txt").nodeid, what
        dst.stop()


def test_framing_is_crosvms(daemon_factory, share):
    """The reply to each request: same code, VERSION|REPLY, exactly one success byte (SLEEP),
    and no reply at all expected beyond it."""
    d: Daemon = daemon_factory()
    with Frontend.connect(d.socket, process=d.proc) as fe:
        fe.send_raw(Header(Request.SLEEP, VERSION, 0).pack())
        msg = fe.recv_message()
        assert (msg.request, msg.flags, msg.payload) == (Request.SLEEP,
                                                         VERSION | HeaderFlag.REPLY,
                                                         CROSVM_SUCCESS.pack(1))
        # A payload where none belongs is refused with the failure byte, not a disconnect.
        fe.send_raw(Header(Request.WAKE, VERSION, 4).pack() + b"\0" * 4)
        assert fe.recv_message().payload == CROSVM_SUCCESS.pack(0)
        crosvm_wake(fe)
        assert fe.get_features()          # the connection carries on


# -- the snapshot format (common/snapshot.py), pure data ---------------------------------------

def _snap() -> snapshot.Snapshot:
    F = snapshot.RingFlag
    return snapshot.Snapshot(
        0x1_7000_0000, 0x8_A209,
        (snapshot.RingState(128, F.ENABLED | F.RUNNING | F.ADDRESSED, 7, 0x1000, 0x2000,
                            0x3000),
         snapshot.RingState(0, F(0), 0, 0, 0, 0)),
        b"PVFSDEV\0 and the rest")


def test_snapshot_round_trip():
    snap = _snap()
    assert snapshot.decode(snapshot.encode(snap)) == snap


def test_snapshot_every_truncation_and_wrong_version_refused():
    data = snapshot.encode(_snap())
    header = 32 + 2 * 36
    for n in range(header + 1):
        with pytest.raises(StateError):
            snapshot.decode(data[:n])
    bad = bytearray(data)
    bad[8] = 2
    with pytest.raises(StateError, match="snapshot version 2 is not supported"):
        snapshot.decode(bytes(bad))


@pytest.mark.parametrize(("ring", "message"), [
    (snapshot.RingState(128, snapshot.RingFlag.RUNNING, 0, 0, 0, 0), "without a size or addr"),
    (snapshot.RingState(100, snapshot.RingFlag.RUNNING | snapshot.RingFlag.ADDRESSED, 0, 1, 2,
                        3), "without a size or addr"),
    (snapshot.RingState(128, snapshot.RingFlag(0), 0, 0x1000, 0, 0), "inconsistent"),
    (snapshot.RingState(128, snapshot.RingFlag(8), 0, 0, 0, 0), "reserved bits"),
])
def test_snapshot_inconsistent_rings_refused(ring, message):
    snap = snapshot.Snapshot(0, 0, (ring,), b"x")
    with pytest.raises(StateError, match=message):
        snapshot.decode(snapshot.encode(snap))
