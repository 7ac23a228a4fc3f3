"""The control messages' wire format, pinned byte for byte, and their fd rules.

Supervisor and workers of one daemon always run the same code, but the layout is what the
fuzzers and the worker's seccomp-confined decoder are written against: a change must show.
"""

from __future__ import annotations

import dataclasses
import errno
import os

import pytest

from pyvirtiofsd.common import control
from pyvirtiofsd.common.control import MsgType, RingFlag

ALL = control.TO_WORKER | control.FROM_WORKER | control.TO_SPAWNER | control.FROM_SPAWNER

# (message, its datagram in hex): header "=HxxI" (type, seq), then the payload.
GOLDEN = [
    (control.RingStart(8, RingFlag.HAS_KICK | RingFlag.EVENT_IDX, 0x1000, 0x2000, 0x3000, 7,
                       seq=5),
     "0200000005000000" "08000000" "05000000" "0010000000000000" "0020000000000000"
     "0030000000000000" "07000000" "00000000"),
    (control.RingStop(seq=1), "0300000001000000"),
    (control.SetCall(0, seq=2), "0400000002000000" "00000000"),
    (control.SetEnable(1, seq=3), "0500000003000000" "01000000"),
    (control.Shutdown(seq=4), "0600000004000000"),
    (control.MemUnmap(seq=6), "0700000006000000"),
    (control.SetInflight(0x840, 0x840, 128, 0, seq=7),
     "0800000007000000" "4008000000000000" "4008000000000000" "80000000" "00000000"),
    (control.Spawn(2, seq=2), "1000000002000000" "02000000"),
    (control.Spawned(4242, seq=2), "1100000002000000" "92100000"),
    (control.Standby(seq=0xFFFFFFFF), "12000000ffffffff"),
    (control.Ready(3, seq=0), "2000000000000000" "03000000"),
    (control.Ack(seq=9), "2100000009000000"),
    (control.Stopped(0x1234, seq=9), "2200000009000000" "34120000"),
    (control.Failed(-errno.EPERM, seq=9), "2300000009000000" "ffffffff"),
    (control.DaxMap(0x100000002, 0x3000, 0x200000, 0x400000, 3, seq=7),
     "2800000007000000" "0200000001000000" "0030000000000000" "0000200000000000"
     "0000400000000000" "03000000" "00000000"),
    (control.DaxUnmap(0, control.DAX_ALL, seq=8),
     "2900000008000000" "0000000000000000" "ffffffffffffffff"),
    (control.DaxSync(0x100000002, seq=9), "2a00000009000000" "0200000001000000"),
    (control.DaxDone(errno.EINVAL, seq=9), "2b00000009000000" "16000000"),
    (control.StateSave(seq=7), "1800000007000000"),
    (control.StateLoad(seq=7), "1900000007000000"),
    (control.StateCheck(seq=8), "1a00000008000000"),
    (control.StatePrepare(seq=8), "1b00000008000000"),
    (control.DaxIo(0x100000002, 0x3000, 0x1_0000_0000_0000, 0x2000, 1, seq=10),
     "2c0000000a000000" "0200000001000000" "0030000000000000" "0000000000000100"
     "0020000000000000" "01000000" "00000000"),
    (control.DaxIoDone(0, 0x2000, seq=10), "2d0000000a000000" "00000000" "00000000"
     "0020000000000000"),
]
# Dirty-page logging (worker/dirtylog.py); a LOG_BASE with a log carries its fd (below).
GOLDEN += [
    (control.LogBase(0, 0, seq=7), "0c00000007000000" "0000000000000000" "0000000000000000"),
    (control.LogState(1, 1, 0x12345000, seq=8),
     "0d00000008000000" "01000000" "01000000" "0050341200000000"),
]


def test_log_base_carries_its_fd_exactly_when_it_has_a_log() -> None:
    wire = control.LogBase(0x2000, 0x10, seq=1).pack()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        msg = control.decode(wire, [fd], control.TO_WORKER)
        assert isinstance(msg, control.LogBase) and (msg.size, msg.offset) == (0x2000, 0x10)
    finally:
        os.close(fd)
    with pytest.raises(control.ProtocolError):
        control.decode(wire, [], control.TO_WORKER)
    with pytest.raises(control.ProtocolError):
        control.decode(control.LogState(2, 0, 0, seq=1).pack(), [], control.TO_WORKER)


def test_every_type_is_pinned() -> None:
    assert {m.type for m, _ in GOLDEN} | {MsgType.MEM_TABLE} == set(MsgType)


@pytest.mark.parametrize(("msg", "wire"), GOLDEN, ids=[m.type.name for m, _ in GOLDEN])
def test_wire_format(msg: control.Message, wire: str) -> None:
    assert msg.pack().hex() == wire
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(msg.FDS[0])]
    try:
        assert control.decode(bytes.fromhex(wire), list(fds), ALL) == \
            dataclasses.replace(msg, fds=tuple(fds))
    finally:
        control.close_fds(fds)


def test_mem_table_is_one_row_per_region_with_one_fd_each() -> None:
    regions = (control.Region(0, 0x1000, 0x7F0000000000, 0),
               control.Region(0x100000, 0x2000, 0x7F0000100000, 0x1000))
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in regions]
    data = control.MemTable(regions, seq=1, fds=tuple(fds)).pack()
    assert data[:8].hex() == "0100000001000000"
    assert data[8:40].hex() == ("0000000000000000" "0010000000000000" "00000000007f0000"
                                "0000000000000000")
    msg = control.decode(data, list(fds), control.TO_WORKER)
    assert isinstance(msg, control.MemTable) and msg.regions == regions
    control.close_fds(msg.fds)
    # One fd short: refused, and the fd that did come is closed.
    fd = os.open("/dev/null", os.O_RDONLY)
    with pytest.raises(control.ProtocolError, match="MEM_TABLE with 1 fds"):
        control.decode(data, [fd], control.TO_WORKER)
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize(("msg", "most"), [
    (control.RingStart(8, RingFlag(0), 0, 0, 0, 0, seq=1), 3),
    (control.SetCall(1, seq=1), 1),
    (control.Spawn(0, seq=1), 1),
    (control.Standby(seq=1), 1),
    (control.RingStop(seq=1), 0),
    (control.Failed(errno.EIO, seq=1), 0),
], ids=lambda v: v.type.name if isinstance(v, control.Message) else str(v))
def test_fd_allowance(msg: control.Message, most: int) -> None:
    fewest = msg.FDS[0]
    for n in range(fewest, most + 1):
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
        got = control.decode(msg.pack(), fds, ALL)
        assert got.fds == tuple(fds)
        control.close_fds(fds)
    for n in {fewest - 1, most + 1} - {-1}:
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
        with pytest.raises(control.ProtocolError, match=f"with {n} fds"):
            control.decode(msg.pack(), fds, ALL)
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)


@pytest.mark.parametrize(("msg", "nfds", "ok"), [
    (control.SetInflight(0x840, 0x840, 128, 1, seq=1), 1, True),
    (control.SetInflight(0x840, 0x840, 128, 1, seq=1), 0, False),
    (control.SetInflight(0, 0, 0, 0, seq=1), 0, True),
    (control.SetInflight(0, 0, 0, 0, seq=1), 1, False),
    (control.SetInflight(0x20, 0x840, 128, 1, seq=1), 1, False),     # not 64-byte aligned
    (control.SetInflight(0, 0x800, 128, 1, seq=1), 1, False),        # no room for the header
    (control.SetInflight(0, 0x840, 0, 1, seq=1), 1, False),          # no descriptors
])
def test_set_inflight_fds_follow_its_flag(msg: control.SetInflight, nfds: int, ok: bool) -> None:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    if ok:
        assert control.decode(msg.pack(), fds, control.TO_WORKER).fds == tuple(fds)
        control.close_fds(fds)
        return
    with pytest.raises(control.ProtocolError, match="SET_INFLIGHT with"):
        control.decode(msg.pack(), fds, control.TO_WORKER)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
