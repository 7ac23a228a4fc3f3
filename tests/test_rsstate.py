"""common/rsstate.py: virtiofsd 1.13's device state, read and written (docs/rust-state-format.md).

The fixtures are real states saved by the Rust virtiofsd (tests/fixtures/rs-state/README.md).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtiofsd.common import devstate, rsstate
from pyvirtiofsd.common.devstate import (
    DeviceState,
    Handle,
    Inode,
    Session,
    SessionOption,
    StateError,
)
from pyvirtiofsd.common.fuse_abi import InitFlag
from pyvirtiofsd.common.rsstate import Location

FIXTURES = Path(__file__).parent / "fixtures" / "rs-state"
ALL = sorted(p.name for p in FIXTURES.glob("*.bin"))
MAPPABLE = ALL
# What the loading daemon supplies: virtiofsd's state has no FUSE session of its own.
SESSION = Session(minor=38, init_flags=int(InitFlag.ASYNC_READ | InitFlag.INIT_EXT),
                  max_write=1 << 20, max_pages=256)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_fixtures_are_all_there():
    assert ALL == ["file-handles.bin", "find-paths.bin", "lost-inode.bin", "posix-acl.bin",
                   "root-only.bin", "verify-handles.bin"]


# -- the real states ---------------------------------------------------------------------------

def test_find_paths_state_decodes_to_what_the_guest_did():
    state = rsstate.decode(fixture("find-paths.bin"), SESSION)
    got = {i.nodeid: (i.parent, i.name, i.lookups, i.invalid) for i in state.inodes}
    # d looked up once, f.txt once, top.txt twice; the root once, as the guest always holds it.
    assert got == {1: (0, b"", 1, False), 2: (1, b"d", 1, False), 3: (2, b"f.txt", 1, False),
                   4: (1, b"top.txt", 2, False)}
    assert {h.fh: (h.nodeid, h.flags) for h in state.handles} == {
        0: (3, os.O_RDWR), 1: (4, os.O_RDONLY), 2: (2, os.O_DIRECTORY)}
    assert state.counters == {rsstate.NEXT_NODEID: 5, rsstate.NEXT_FH: 3}
    # The guest accepted SUBMOUNTS and CREATE_SUPP_GROUP, nothing asked for writeback or ACLs.
    assert state.session.options == SessionOption.ANNOUNCE_SUBMOUNTS
    assert state.session.init_flags & InitFlag.SUBMOUNTS
    assert state.session.init_flags & InitFlag.CREATE_SUPP_GROUP
    assert not state.session.init_flags & (InitFlag.WRITEBACK_CACHE | InitFlag.POSIX_ACL)
    assert (state.session.minor, state.session.max_write) == (38, 1 << 20)
    wire = rsstate.decode_wire(fixture("find-paths.bin"))
    assert wire.version == rsstate.Version.V2 and wire.mount_paths == {}
    assert [i.refcount for i in wire.inodes] == [4, 2, 1, 2]


def test_verify_handles_state_carries_a_file_handle_per_inode():
    state = rsstate.decode(fixture("verify-handles.bin"), SESSION)
    assert len(state.inodes) == 4
    for inode in state.inodes:
        assert inode.handle and 0 < len(inode.handle) <= 128 and inode.mount_id
    assert len({i.handle for i in state.inodes}) == 4


def test_posix_acl_state_sets_the_option_and_flag():
    state = rsstate.decode(fixture("posix-acl.bin"), SESSION)
    assert state.session.options & SessionOption.POSIX_ACL
    assert state.session.init_flags & InitFlag.POSIX_ACL


def test_lost_inode_is_invalid_and_keeps_its_handle():
    state = rsstate.decode(fixture("lost-inode.bin"), SESSION)
    top = state.inode(4)
    assert top is not None and top.invalid and top.parent == 0 and top.lookups == 2
    # The root no longer counts a Path child for it.
    assert rsstate.decode_wire(fixture("lost-inode.bin")).inodes[0].refcount == 3
    assert state.inode(1).lookups == 1
    assert any(h.nodeid == 4 for h in state.handles)


def test_root_only_state():
    state = rsstate.decode(fixture("root-only.bin"), SESSION)
    assert [(i.nodeid, i.lookups) for i in state.inodes] == [(1, 1)]
    assert state.handles == ()


def test_file_handles_state_locates_inodes_by_handle_alone():
    wire = rsstate.decode_wire(fixture("file-handles.bin"))
    assert [i.location for i in wire.inodes] == [Location.ROOT_NODE] + [Location.FILE_HANDLE] * 3
    (mount,) = wire.mount_paths
    assert wire.mount_paths == {mount: "."}
    state = rsstate.decode(fixture("file-handles.bin"), SESSION)
    root, *rest = state.inodes
    assert (root.mount_id, root.handle) == (mount, None)
    for inode in rest:
        assert (inode.parent, inode.name, inode.mount_id) == (0, b"", mount)
        assert inode.handle and not inode.invalid
    # No Path children: the root's count is its own reference and the guest's.
    assert [i.lookups for i in state.inodes] == [1, 1, 1, 2]


def test_file_handles_on_a_submount_cannot_be_mapped():
    wire = rsstate.decode_wire(fixture("file-handles.bin"))
    (mount,) = wire.mount_paths
    sub = dataclasses.replace(wire, mount_paths={mount: "sub/mnt"})
    with pytest.raises(StateError, match=r"inode 2: .* submount 'sub/mnt'.*find-paths"):
        rsstate.to_device_state(sub, SESSION)
    state = rsstate.decode(fixture("file-handles.bin"), SESSION)
    elsewhere = dataclasses.replace(state, inodes=(
        dataclasses.replace(state.inodes[0], mount_id=mount + 1), *state.inodes[1:]))
    with pytest.raises(StateError, match=r"inode 2: located by a file handle on mount"):
        rsstate.encode(elsewhere)


@pytest.mark.parametrize("name", ALL)
def test_wire_round_trip_is_byte_exact(name):
    data = fixture(name)
    assert rsstate.is_rust_state(data)
    assert rsstate.encode_wire(rsstate.decode_wire(data)) == data


@pytest.mark.parametrize("name", MAPPABLE)
def test_model_round_trip_is_byte_exact(name):
    data = fixture(name)
    state = rsstate.decode(data, SESSION)
    assert rsstate.encode(state) == data
    # And through pyvirtiofsd's own format in between.
    assert rsstate.encode(devstate.decode(devstate.encode(state))) == data


def test_formats_are_told_apart_by_their_first_byte():
    ours = devstate.encode(rsstate.decode(fixture("find-paths.bin"), SESSION))
    assert not rsstate.is_rust_state(ours)
    assert not rsstate.is_rust_state(b"") and not rsstate.is_rust_state(b"\x02")
    with pytest.raises(StateError):
        devstate.decode(fixture("find-paths.bin"))


# -- corruption --------------------------------------------------------------------------------

def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text.startswith("device state: ")
    return text


@pytest.mark.parametrize("name", ALL)
def test_every_truncation_is_refused(name):
    data = fixture(name)
    for n in range(len(data)):
        with pytest.raises(StateError) as e:
            rsstate.decode_wire(data[:n])
        one_line(e)


@pytest.mark.parametrize("name", MAPPABLE)
def test_byte_flips_are_refused_or_decode_to_a_checked_state(name):
    """virtiofsd's state has no checksum, so some flips give another valid state; none may give
    anything but a StateError or a state that passed every check and re-encodes to its bytes."""
    data = fixture(name)
    refused = 0
    for pos in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[pos] ^= mask
            try:
                state = rsstate.decode(bytes(bad), SESSION)
            except StateError as e:
                assert "\n" not in str(e)
                refused += 1
                continue
            assert rsstate.encode(state) == bytes(bad)
    assert refused > len(data)


FIND_PATHS = bytes.fromhex(
    "010401040000020201010164000301010205662e747874000402010107746f702e7478740005"
    "030003000401040000020200808008030001000100")


def patched(old: str, new: str) -> bytes:
    h = FIND_PATHS.hex()
    assert h.count(old) == 1, old
    return bytes.fromhex(h.replace(old, new))


@pytest.mark.parametrize(("data", "message"), [
    (FIND_PATHS + b"\x00", "1 bytes after the end"),
    (b"\x02" + FIND_PATHS[1:], "unknown state version"),
    (patched("0104010400", "0184000104010400"), "not in its shortest form"),
    (patched("020201010164", "020205010164"), "unknown inode location variant 5"),
    (patched("00030101020566", "00030101090566"), "parent 9 is missing"),
    (patched("0402010107", "0202010107"), "inode 2: appears twice"),
    (patched("020201010164", "020201030164"), "is its own ancestor"),
    (patched("00040104000002020080", "00040109000002020080"), "handle 1: inode 9 is missing"),
    (patched("01016400", "0101ff00"), "not UTF-8"),
    (patched("0205662e74787400", "02052f2e74787400"), "not one path component"),
    (patched("7400050300", "7400040300"), "next_inode is not beyond"),
    (patched("0001000100", "0002000100"), "unknown bool value 2"),
    (patched("0104010400", "0104020400"), "only inode 1 is the root node"),
    (patched("0104010400", "010401" + "ff" * 10 + "0100"), "runs past 64 bits"),
    (patched("0104010400", "010401" + "ff" * 9 + "7f00"), "overflows 64 bits"),
    (b"\x01\xff\xff\xff\xff\x0f", "impossible here"),
])
def test_malformed_states_are_refused_saying_which_part(data, message):
    with pytest.raises(StateError, match=message) as e:
        rsstate.decode(data, SESSION)
    one_line(e)


def test_a_state_with_no_inodes_cannot_be_carried_on():
    empty = bytes.fromhex("01" "00" "01" "00" "00" "00000000" "00")
    assert rsstate.decode_wire(empty).inodes == ()
    with pytest.raises(StateError, match="no inodes"):
        rsstate.decode(empty, SESSION)


# -- what virtiofsd cannot hold ----------------------------------------------------------------

def base_state(**kw) -> DeviceState:
    inodes = (Inode(1, 1, 0, b"", 0o40755, 1, 2), Inode(2, 1, 1, b"f", 0o100644, 1, 3))
    return DeviceState(session=SESSION, inodes=inodes, handles=(Handle(0, 2, os.O_RDWR),),
                       **kw)


def test_a_name_that_is_not_utf8_is_refused():
    state = base_state()
    bad = dataclasses.replace(state, inodes=(state.inodes[0], dataclasses.replace(
        state.inodes[1], name=b"caf\xe9")))
    with pytest.raises(StateError, match=r"inode 2: its name .* is not UTF-8"):
        rsstate.encode(bad)


def test_open_flags_beyond_i32_are_refused():
    bad = dataclasses.replace(base_state(), handles=(Handle(0, 2, 1 << 31),))
    with pytest.raises(StateError, match="handle 0: open flags 0x80000000"):
        rsstate.encode(bad)


def test_what_virtiofsd_does_not_migrate_is_dropped_and_the_rest_kept():
    session = dataclasses.replace(SESSION, options=SessionOption.XATTR | SessionOption.WRITEBACK,
                                  init_flags=SESSION.init_flags | InitFlag.WRITEBACK_CACHE)
    state = dataclasses.replace(base_state(), session=session)
    back = rsstate.decode(rsstate.encode(state), SESSION)
    assert back.session.options == SessionOption.WRITEBACK
    assert back.session.init_flags & InitFlag.WRITEBACK_CACHE
    assert [(i.nodeid, i.lookups, i.parent, i.name, i.mode) for i in back.inodes] == [
        (1, 1, 0, b"", 0), (2, 1, 1, b"f", 0)]
    assert back.counters == {rsstate.NEXT_NODEID: 3, rsstate.NEXT_FH: 1}


# -- any model state -----------------------------------------------------------------------------

_OPTIONS = (SessionOption.WRITEBACK, SessionOption.ANNOUNCE_SUBMOUNTS, SessionOption.POSIX_ACL)
_FLAGS = (InitFlag.WRITEBACK_CACHE, InitFlag.SUBMOUNTS,
          InitFlag.POSIX_ACL | InitFlag.DONT_MASK | InitFlag.SETXATTR_EXT)
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
                min_size=1, max_size=20).filter(
    lambda s: s not in (".", "..") and len(s.encode()) <= 255)


@st.composite
def mappable_states(draw) -> DeviceState:
    """States virtiofsd can hold: UTF-8 names, invalid inodes only as leaves with no location,
    flags within i32, the session's options matching its INIT flags."""
    n = draw(st.integers(1, 12))
    ids = [1, *sorted(draw(st.sets(st.integers(2, 1 << 40), min_size=n - 1, max_size=n - 1)))]
    inodes, dirs = [], [1]
    shared_mount = draw(st.integers(1, 1 << 40))     # the shared directory's mount
    for k, nodeid in enumerate(ids):
        handle = draw(st.none() | st.binary(min_size=1, max_size=128))
        fh = dict(mount_id=draw(st.integers(1, 1 << 40)), handle_type=draw(
            st.integers(-(1 << 31), (1 << 31) - 1)), handle=handle) if handle else {}
        lookups = draw(st.integers(0, 1 << 62))
        if k == 0:
            inodes.append(Inode(1, lookups, 0, b"", 0, 0, 0, **{**fh, "mount_id": shared_mount}))
        elif draw(st.booleans()) and k == len(ids) - 1:
            inodes.append(Inode(nodeid, lookups, 0, b"", 0, 0, 0, invalid=True, **fh))
        elif handle and draw(st.booleans()):
            # Found by its file handle alone, on the shared directory's mount.
            inodes.append(Inode(nodeid, lookups, 0, b"", 0, 0, 0,
                                **{**fh, "mount_id": shared_mount}))
            dirs.append(nodeid)
        else:
            parent = draw(st.sampled_from(dirs))
            inodes.append(Inode(nodeid, lookups, parent, draw(names).encode(), 0, 0, 0, **fh))
            dirs.append(nodeid)
    handles = tuple(Handle(fh, draw(st.sampled_from(ids)), draw(st.integers(0, (1 << 31) - 1)))
                    for fh in sorted(draw(st.sets(st.integers(0, 1 << 40), max_size=6))))
    picked = draw(st.lists(st.booleans(), min_size=3, max_size=3))
    options, flags = SessionOption(0), int(InitFlag.INIT_EXT)
    for on, option, flag in zip(picked, _OPTIONS, _FLAGS, strict=True):
        if on:
            options |= option
            flags |= flag
    if draw(st.booleans()):
        flags |= InitFlag.CREATE_SUPP_GROUP
    session = dataclasses.replace(SESSION, options=options, init_flags=flags)
    counters = {rsstate.NEXT_NODEID: ids[-1] + draw(st.integers(1, 99)),
                rsstate.NEXT_FH: max((h.fh for h in handles), default=0) + draw(st.integers(1, 9))}
    return DeviceState(session=session, inodes=tuple(inodes), handles=handles, counters=counters)


@settings(max_examples=200, deadline=None)
@given(mappable_states())
def test_any_mappable_state_round_trips(state):
    data = rsstate.encode(state)
    assert rsstate.is_rust_state(data)
    back = rsstate.decode(data, state.session)
    # virtiofsd's state has mount IDs only inside file handles, and the shared directory's
    # (the root's) only while some inode is found by file handle on it.
    root = state.inodes[0]
    if root.handle is None and not any(i.parent == 0 and i.handle and not i.invalid
                                       for i in state.inodes[1:]):
        state = dataclasses.replace(state, inodes=(dataclasses.replace(root, mount_id=0),
                                                   *state.inodes[1:]))
    assert back == state
    assert rsstate.encode(back) == data


def test_the_bytes_patched_above_and_annotated_in_the_docs_are_the_real_state():
    assert fixture("find-paths.bin") == FIND_PATHS
    doc = (Path(__file__).parent.parent / "docs" / "rust-state-format.md").read_text()
    assert "`find-paths.bin` (59 bytes)" in doc and len(FIND_PATHS) == 59
