"""The device-state model and format (common/devstate.py, docs/state-format.md)."""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtiofsd.common import devstate
from pyvirtiofsd.common.devstate import (
    DeviceState,
    Handle,
    Inode,
    Session,
    SessionOption,
    StateError,
)

SESSION = Session(minor=38, init_flags=0x1234_5678, max_write=1 << 20, max_pages=256,
                  options=SessionOption.XATTR | SessionOption.ANNOUNCE_SUBMOUNTS)


def _root() -> Inode:
    return Inode(nodeid=1, lookups=2, parent=0, name=b"", mode=stat.S_IFDIR | 0o755, dev=8, ino=2)


def sample() -> DeviceState:
    return DeviceState(
        session=SESSION,
        inodes=(_root(),
                Inode(nodeid=2, lookups=1, parent=1, name=b"dir", mode=stat.S_IFDIR | 0o700,
                      dev=8, ino=10, mount_id=31, handle_type=1, handle=b"\x01\x02\x03\x04"),
                Inode(nodeid=3, lookups=5, parent=2, name=b"f\xffile", mode=stat.S_IFREG | 0o644,
                      dev=8, ino=11),
                Inode(nodeid=4, lookups=1, parent=0, name=b"", mode=stat.S_IFREG, dev=0, ino=0,
                      invalid=True)),
        handles=(Handle(fh=7, nodeid=3, flags=os.O_RDWR | os.O_APPEND),
                 Handle(fh=8, nodeid=2, flags=os.O_RDONLY | os.O_DIRECTORY),
                 Handle(fh=9, nodeid=4, flags=os.O_WRONLY)),
        counters={"next_fh": 10, "lookups": 99})


def unchecked_encode(state: DeviceState, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Bytes for a state `encode` would refuse, with a valid frame and CRC: what decode's own
    checks must catch."""
    with monkeypatch.context() as m:
        m.setattr(devstate, "_check_state", lambda state: None)
        return devstate.encode(state)


# -- round trip ----------------------------------------------------------------------------------

_names = st.binary(min_size=1, max_size=devstate.NAME_MAX).filter(
    lambda n: n not in (b".", b"..") and b"/" not in n and b"\0" not in n)
_u64 = st.integers(0, (1 << 64) - 1)


@st.composite
def states(draw: st.DrawFn) -> DeviceState:
    n = draw(st.integers(0, 12))
    nodeids = draw(st.lists(st.integers(2, (1 << 64) - 1), min_size=n, max_size=n, unique=True))
    inodes = [Inode(nodeid=1, lookups=draw(_u64), parent=0, name=b"", mode=stat.S_IFDIR | 0o755,
                    dev=draw(_u64), ino=draw(_u64))]
    for nodeid in nodeids:
        invalid = draw(st.booleans())
        located = not invalid or draw(st.booleans())
        handle = draw(st.none() | st.binary(min_size=1, max_size=devstate.HANDLE_MAX))
        inodes.append(Inode(
            nodeid=nodeid, lookups=draw(_u64),
            parent=draw(st.sampled_from([i.nodeid for i in inodes])) if located else 0,
            name=draw(_names) if located else b"", mode=draw(st.integers(0, (1 << 32) - 1)),
            dev=draw(_u64), ino=draw(_u64), mount_id=draw(_u64) if handle else 0,
            handle_type=draw(st.integers(-(1 << 31), (1 << 31) - 1)) if handle else 0,
            handle=handle, invalid=invalid))
    fhs = draw(st.lists(_u64, max_size=8, unique=True))
    handles = tuple(Handle(fh=fh, nodeid=draw(st.sampled_from([i.nodeid for i in inodes])),
                           flags=draw(st.integers(0, (1 << 32) - 1))) for fh in fhs)
    counters = draw(st.dictionaries(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
                max_size=devstate.COUNTER_NAME_MAX), _u64, max_size=6))
    session = Session(minor=draw(st.integers(0, (1 << 32) - 1)), init_flags=draw(_u64),
                      max_write=draw(st.integers(0, (1 << 32) - 1)),
                      max_pages=draw(st.integers(0, (1 << 16) - 1)),
                      options=SessionOption(draw(st.integers(0, 63))))
    return DeviceState(session=session, inodes=tuple(inodes), handles=handles, counters=counters)


@settings(max_examples=150, deadline=None)
@given(states())
def test_round_trip(state: DeviceState) -> None:
    data = devstate.encode(state)
    assert devstate.decode(data) == state
    assert devstate.encode(devstate.decode(data)) == data


def test_sample_round_trip_and_lookup() -> None:
    state = devstate.decode(devstate.encode(sample()))
    assert state == sample()
    assert state.version == (devstate.FORMAT_MAJOR, devstate.FORMAT_MINOR)
    assert state.inode(3) is not None and state.inode(3).name == b"f\xffile"
    assert state.inode(5) is None


def test_file_round_trip(tmp_path) -> None:
    path = tmp_path / "state"
    devstate.write_file(path, sample())
    assert devstate.read_file(path) == sample()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    devstate.write_file(path, dataclasses.replace(sample(), counters={"x": 1}))
    assert devstate.read_file(path).counters == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]     # no temporary left


def test_write_file_refuses_a_bad_state_and_leaves_the_old_file(tmp_path) -> None:
    path = tmp_path / "state"
    devstate.write_file(path, sample())
    before = path.read_bytes()
    bad = dataclasses.replace(sample(), handles=(Handle(fh=1, nodeid=99, flags=0),))
    with pytest.raises(StateError, match="inode 99 is missing"):
        devstate.write_file(path, bad)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


# -- corruption ----------------------------------------------------------------------------------

def _one_line(err: pytest.ExceptionInfo[StateError]) -> str:
    text = str(err.value)
    assert "\n" not in text and text.startswith("device state: ")
    return text


def test_every_flipped_byte_is_refused() -> None:
    data = devstate.encode(sample())
    for pos in range(len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[pos] ^= bit
            with pytest.raises(StateError) as err:
                devstate.decode(bytes(bad))
            _one_line(err)


def test_every_truncation_is_refused() -> None:
    data = devstate.encode(sample())
    for n in range(len(data)):
        with pytest.raises(StateError) as err:
            devstate.decode(data[:n])
        assert "truncated" in _one_line(err) or n >= devstate.HEADER_SIZE


def test_truncated_payload_and_trailing_bytes() -> None:
    data = devstate.encode(sample())
    with pytest.raises(StateError, match=r"^device state: truncated: \d+ of \d+ payload bytes$"):
        devstate.decode(data[:-1])
    with pytest.raises(StateError, match="1 bytes after the payload"):
        devstate.decode(data + b"\0")


def test_wrong_crc() -> None:
    data = bytearray(devstate.encode(sample()))
    data[devstate.HEADER_SIZE - 1] ^= 0xFF
    with pytest.raises(StateError,
                       match=r"^device state: checksum mismatch: the state is corrupt$"):
        devstate.decode(bytes(data))


def test_wrong_magic() -> None:
    data = b"XXXXXXXX" + devstate.encode(sample())[8:]
    with pytest.raises(StateError, match="bad magic"):
        devstate.decode(data)


def test_newer_major_refused_before_the_payload_is_read() -> None:
    payload = devstate.encode(sample())[devstate.HEADER_SIZE:]
    data = devstate.frame(payload, major=devstate.FORMAT_MAJOR + 1)
    with pytest.raises(StateError, match=r"format version 2\.0 is not supported "
                                         r"\(this daemon reads 1\.x\)"):
        devstate.payload_length(data[:devstate.HEADER_SIZE])
    with pytest.raises(StateError, match=r"format version 2\.0"):
        devstate.decode(data)
    with pytest.raises(StateError, match=r"format version 0\.0"):
        devstate.decode(devstate.frame(payload, major=0))


def test_newer_minor_accepted_and_unknown_sections_skipped() -> None:
    payload = devstate.encode(sample())[devstate.HEADER_SIZE:]
    extra = struct.pack("<HHII", 99, 0, 1, 3) + b"new"
    state = devstate.decode(devstate.frame(payload + extra, minor=devstate.FORMAT_MINOR + 1))
    assert state.version == (devstate.FORMAT_MAJOR, devstate.FORMAT_MINOR + 1)
    assert dataclasses.replace(state, version=sample().version) == sample()


def test_oversized_payload_refused_from_the_header() -> None:
    header = devstate.HEADER.pack(devstate.MAGIC, devstate.FORMAT_MAJOR, 0,
                                  devstate.MAX_PAYLOAD + 1, 0)
    with pytest.raises(StateError, match="more than"):
        devstate.payload_length(header)


def test_read_file_refuses_garbage_and_truncation(tmp_path) -> None:
    path = tmp_path / "state"
    path.write_bytes(devstate.encode(sample())[:-3])
    with pytest.raises(StateError, match="truncated"):
        devstate.read_file(path)
    path.write_bytes(b"")
    with pytest.raises(StateError, match="truncated: 0 bytes"):
        devstate.read_file(path)


# -- cross-record checks, with a valid frame and CRC ----------------------------------------------

def _bad_states() -> list[tuple[str, DeviceState]]:
    s = sample()
    root, d, f, gone = s.inodes
    return [
        ("inode 3 appears twice", dataclasses.replace(s, inodes=(*s.inodes, f))),
        ("handle 7 appears twice", dataclasses.replace(s, handles=(*s.handles, s.handles[0]))),
        ("handle 5's inode 42 is missing",
         dataclasses.replace(s, handles=(Handle(fh=5, nodeid=42, flags=0),))),
        ("inode 3's parent 77 is missing",
         dataclasses.replace(s, inodes=(root, d, dataclasses.replace(f, parent=77), gone))),
        ("the root inode is missing", dataclasses.replace(s, inodes=(d, f, gone), handles=())),
        ("is its own ancestor",
         dataclasses.replace(s, inodes=(root, dataclasses.replace(d, parent=3), f, gone))),
        ("the root inode has a parent or a name",
         dataclasses.replace(s, inodes=(dataclasses.replace(root, name=b"x"), d, f, gone))),
        ("inode 3 has no parent",
         dataclasses.replace(s, inodes=(root, d, dataclasses.replace(f, parent=0), gone))),
        ("is not a single path component",
         dataclasses.replace(s, inodes=(root, d, dataclasses.replace(f, name=b"a/b"), gone))),
        ("is not a single path component",
         dataclasses.replace(s, inodes=(root, d, dataclasses.replace(f, name=b".."), gone))),
        ("inode nodeid 0", dataclasses.replace(s, inodes=(*s.inodes, dataclasses.replace(
            f, nodeid=0)))),
        ("FUSE major 8 is not 7",
         dataclasses.replace(s, session=dataclasses.replace(s.session, major=8))),
    ]


@pytest.mark.parametrize("message,state", _bad_states())
def test_cross_record_checks(message: str, state: DeviceState,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StateError, match=message):
        devstate.encode(state)
    data = unchecked_encode(state, monkeypatch)
    with pytest.raises(StateError, match=message) as err:
        devstate.decode(data)
    _one_line(err)


def test_unknown_session_option_refused() -> None:
    payload = bytearray(devstate.encode(sample())[devstate.HEADER_SIZE:])
    # the options word is the session record's last 8 bytes, after the first section header
    struct.pack_into("<Q", payload, 12 + 24, 1 << 40)
    with pytest.raises(StateError, match="option bits 0x10000000000 this version does not know"):
        devstate.decode(devstate.frame(bytes(payload)))


def test_missing_and_repeated_sections_refused() -> None:
    payload = devstate.encode(sample())[devstate.HEADER_SIZE:]
    _tag, _r, _count, length = struct.unpack_from("<HHII", payload)
    session = payload[:12 + length]
    with pytest.raises(StateError, match="the inodes section is missing"):
        devstate.decode(devstate.frame(session))
    with pytest.raises(StateError, match="section 1 appears twice"):
        devstate.decode(devstate.frame(payload + session))


def test_inflated_record_count_refused_without_allocating() -> None:
    payload = bytearray(devstate.encode(sample())[devstate.HEADER_SIZE:])
    _tag, _r, _count, length = struct.unpack_from("<HHII", payload)
    inode_section = 12 + length
    struct.pack_into("<I", payload, inode_section + 4, devstate.MAX_INODES)
    with pytest.raises(StateError, match="cannot hold 16777216 records"):
        devstate.decode(devstate.frame(bytes(payload)))


def test_limits_refused_on_encode() -> None:
    counters = {f"c{i}": i for i in range(devstate.MAX_COUNTERS + 1)}
    with pytest.raises(StateError, match="257 counters: more than 256"):
        devstate.encode(dataclasses.replace(sample(), counters=counters))
    with pytest.raises(StateError, match="name is not at most 255 bytes"):
        devstate.encode(dataclasses.replace(sample(), inodes=(
            *sample().inodes, Inode(nodeid=9, lookups=1, parent=1, name=b"n" * 256, mode=0,
                                    dev=0, ino=0))))
    with pytest.raises(StateError, match=r"file handle is not 1\.\.128 bytes"):
        devstate.encode(dataclasses.replace(sample(), inodes=(
            *sample().inodes, Inode(nodeid=9, lookups=1, parent=1, name=b"n", mode=0, dev=0,
                                    ino=0, handle=b"h" * 129))))
    with pytest.raises(StateError, match="lookup count -1 is not a 64-bit unsigned integer"):
        devstate.encode(dataclasses.replace(sample(), inodes=(
            dataclasses.replace(_root(), lookups=-1),)))


def test_bytes_are_as_documented() -> None:
    """docs/state-format.md, field by field: a root, one named inode with a file handle, one
    handle and one counter."""
    state = DeviceState(
        session=Session(minor=38, init_flags=0x11, max_write=4096, max_pages=1,
                        options=SessionOption.WRITEBACK | SessionOption.XATTR),
        inodes=(Inode(nodeid=1, lookups=1, parent=0, name=b"", mode=0o40755, dev=2, ino=3),
                Inode(nodeid=5, lookups=2, parent=1, name=b"ab", mode=0o100644, dev=2, ino=9,
                      mount_id=7, handle_type=1, handle=b"\xaa\xbb")),
        handles=(Handle(fh=6, nodeid=5, flags=2),),
        counters={"n": 4})
    session = struct.pack("<IIQIHHQ", 7, 38, 0x11, 4096, 1, 0, 0b1001)
    inodes = (struct.pack("<QQQIIQQQiHH", 1, 1, 0, 0, 0o40755, 2, 3, 0, 0, 0, 0)
              + struct.pack("<QQQIIQQQiHH", 5, 2, 1, 2, 0o100644, 2, 9, 7, 1, 2, 2)
              + b"ab\xaa\xbb")
    handles = struct.pack("<QQII", 6, 5, 2, 0)
    counters = struct.pack("<QB", 4, 1) + b"n"
    payload = b"".join(struct.pack("<HHII", tag, 0, count, len(body)) + body for tag, count, body
                       in ((1, 1, session), (2, 2, inodes), (3, 1, handles), (4, 1, counters)))
    prefix = b"PVFSDEV\0" + struct.pack("<HHQ", 1, 0, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(prefix))
    assert devstate.encode(state) == prefix + struct.pack("<I", crc) + payload
