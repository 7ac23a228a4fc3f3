"""The Rust virtiofsd's device state (1.13), read and written, and mapped onto DeviceState.

virtiofsd writes its state through SET_DEVICE_STATE_FD as one postcard-serialized value with no
other framing (docs/rust-state-format.md): the bytes of `PassthroughFs::V1` or `::V2`.  This
module is two layers, both pure data with no I/O:

  wire   `RsState` and its parts mirror virtiofsd's serialized types field for field;
         `decode_wire` / `encode_wire` are strict postcard (canonical varints only, booleans and
         option tags 0 or 1, UTF-8 strings, no bytes left over), and `check_wire` holds the
         cross-references virtiofsd itself relies on.
  model  `to_device_state` / `from_device_state` translate to and from common.devstate's
         DeviceState; what one side has and the other cannot hold is refused with a StateError
         naming the part, or (where virtiofsd itself does not migrate it) documented and dropped.

`decode` and `encode` are the two calls the daemon makes.  A state is recognised by its framing
(`is_rust_state`): pyvirtiofsd's own begins with its magic "PVFSDEV\\0", virtiofsd's with the
version variant, 0 or 1.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from pyvirtiofsd.common import devstate
from pyvirtiofsd.common.devstate import (
    DeviceState,
    Handle,
    Inode,
    Session,
    SessionOption,
    StateError,
)
from pyvirtiofsd.common.fuse_abi import InitFlag

ROOT_ID = 1
# Linux's MAX_HANDLE_SZ and NAME_MAX: no file handle or path component is longer.
HANDLE_MAX = 128
NAME_MAX = 255
PATH_MAX = 4096
# Bounds on what a decode will build, far above what a guest can hold open.
MAX_ITEMS = 1 << 24
MAX_STATE = 1 << 30
# The counters of DeviceState that carry virtiofsd's next_inode / next_handle.
NEXT_NODEID = "next_nodeid"
NEXT_FH = "next_fh"
# virtiofsd's root inode starts with a reference count of 2 (as libfuse's does): one is the
# guest's, which the kernel never forgets, the other the daemon's own.
ROOT_OWN_REFS = 1


class Version(enum.IntEnum):
    """`serialized::PassthroughFs`'s variants: the first thing in the stream."""
    V1 = 0      # inodes, handles, counters, negotiated options
    V2 = 1      # V1, then a map of source mount IDs to paths in the shared directory


class Location(enum.IntEnum):
    """`serialized::InodeLocation`'s variants, in declaration order (postcard's index)."""
    ROOT_NODE = 0       # the root: the destination opens its own shared directory
    PATH = 1            # {parent: u64, filename: String}
    INVALID = 2         # the source lost it
    FULL_PATH = 3       # {filename: String}, relative to the shared directory
    FILE_HANDLE = 4     # {handle: SerializableFileHandle}


class HandleSource(enum.IntEnum):
    OPEN_INODE = 0      # {flags: i32}: open the handle's inode with these open(2) flags


@dataclasses.dataclass(frozen=True)
class RsFileHandle:
    """`SerializableFileHandle`: what name_to_handle_at returned on the source."""
    mnt_id: int
    handle_type: int
    handle: bytes


@dataclasses.dataclass(frozen=True)
class RsInode:
    id: int
    refcount: int
    location: Location
    parent: int = 0                          # PATH
    filename: str = ""                       # PATH, FULL_PATH
    location_handle: RsFileHandle | None = None     # FILE_HANDLE
    file_handle: RsFileHandle | None = None  # --migration-verify-handles: compare, never open


@dataclasses.dataclass(frozen=True)
class RsHandle:
    id: int
    inode: int
    flags: int                  # i32, as given to openat(2)


@dataclasses.dataclass(frozen=True)
class RsOptions:
    """`serialized::NegotiatedOpts`, in field order."""
    writeback: bool = False
    announce_submounts: bool = False
    posix_acl: bool = False
    sup_group_extension: bool = False


@dataclasses.dataclass(frozen=True)
class RsState:
    version: Version
    inodes: tuple[RsInode, ...]
    next_inode: int
    handles: tuple[RsHandle, ...]
    next_handle: int
    options: RsOptions
    mount_paths: Mapping[int, str] = dataclasses.field(default_factory=dict)    # V2 only


def is_rust_state(data: bytes | bytearray | memoryview) -> bool:
    """Whether `data` is framed as virtiofsd's state rather than pyvirtiofsd's own: the magic
    cannot begin with a version variant, so one byte tells them apart."""
    head = bytes(data[:len(devstate.MAGIC)])
    return not devstate.MAGIC.startswith(head) and head[:1] in (b"\x00", b"\x01")


# -- postcard, strictly ------------------------------------------------------------------------


class _Reader:
    """Postcard's encodings (postcard 1.x wire format): unsigned integers as LEB128 varints, i32
    zigzag-encoded, bool and Option tags one byte, strings and byte vectors length-prefixed.  A
    varint that is longer than needed or overflows its type is refused: virtiofsd never writes
    one, and accepting two spellings of a value would make the format ambiguous."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0
        self.what = "the state"

    def fail(self, problem: str) -> StateError:
        return StateError(f"virtiofsd state, {self.what}: {problem} (at byte {self.pos})")

    def varint(self, bits: int) -> int:
        value = shift = 0
        start = self.pos
        while True:
            if self.pos >= len(self.data):
                raise self.fail("truncated")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift >= bits:
                raise self.fail(f"a varint runs past {bits} bits")
        if value >> bits:
            raise self.fail(f"a varint overflows {bits} bits")
        if self.pos - start > 1 and byte == 0:
            raise self.fail("a varint is not in its shortest form")
        return value

    def u64(self) -> int:
        return self.varint(64)

    def i32(self) -> int:
        z = self.varint(32)
        return (z >> 1) ^ -(z & 1)

    def tag(self, what: str, limit: int) -> int:
        value = self.varint(32)
        if value >= limit:
            raise self.fail(f"unknown {what} {value}")
        return value

    def boolean(self) -> bool:
        return bool(self.tag("bool value", 2))

    def length(self, limit: int, unit: int = 1) -> int:
        """A sequence length: within `limit`, and no more elements than bytes left to hold them
        (each takes at least `unit` bytes), so a forged length cannot make us allocate."""
        n = self.u64()
        if n > limit or n * unit > len(self.data) - self.pos:
            raise self.fail(f"a length of {n} is impossible here")
        return n

    def raw(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail("truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def string(self, limit: int) -> str:
        raw = self.raw(self.length(limit))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not UTF-8") from None


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, value: int) -> None:
        while value >= 0x80:
            self.out.append((value & 0x7F) | 0x80)
            value >>= 7
        self.out.append(value)

    def i32(self, value: int) -> None:
        self.varint(((value << 1) ^ (value >> 31)) & 0xFFFF_FFFF)

    def boolean(self, value: bool) -> None:
        self.out.append(1 if value else 0)

    def string(self, value: str) -> None:
        raw = value.encode("utf-8")
        self.varint(len(raw))
        self.out += raw


def _read_file_handle(r: _Reader) -> RsFileHandle:
    mnt_id = r.u64()
    handle_type = r.i32()
    handle = r.raw(r.length(HANDLE_MAX))
    return RsFileHandle(mnt_id, handle_type, handle)


def _read_inode(r: _Reader) -> RsInode:
    inode_id = r.u64()
    r.what = f"inode {inode_id}"
    refcount = r.u64()
    location = Location(r.tag("inode location variant", len(Location)))
    parent, filename, location_handle = 0, "", None
    if location == Location.PATH:
        parent = r.u64()
        filename = r.string(NAME_MAX)
    elif location == Location.FULL_PATH:
        filename = r.string(PATH_MAX)
    elif location == Location.FILE_HANDLE:
        location_handle = _read_file_handle(r)
    file_handle = _read_file_handle(r) if r.boolean() else None
    return RsInode(inode_id, refcount, location, parent, filename, location_handle, file_handle)


def _read_handle(r: _Reader) -> RsHandle:
    handle_id = r.u64()
    r.what = f"handle {handle_id}"
    inode = r.u64()
    HandleSource(r.tag("handle source variant", len(HandleSource)))
    return RsHandle(handle_id, inode, r.i32())


def decode_wire(data: bytes | bytearray | memoryview) -> RsState:
    """virtiofsd's serialized state, parsed and checked (`check_wire`); StateError otherwise."""
    data = bytes(data)
    if len(data) > MAX_STATE:
        raise StateError(f"virtiofsd state of {len(data)} bytes: more than {MAX_STATE}")
    r = _Reader(data)
    r.what = "the version"
    version = Version(r.tag("state version (a newer virtiofsd?)", len(Version)))
    r.what = "the inode list"
    # Each inode takes at least 4 bytes: id, refcount, location, file handle tag.
    inodes = tuple(_read_inode(r) for _ in range(r.length(MAX_ITEMS, 4)))
    r.what = "next_inode"
    next_inode = r.u64()
    r.what = "the handle list"
    handles = tuple(_read_handle(r) for _ in range(r.length(MAX_ITEMS, 4)))
    r.what = "next_handle"
    next_handle = r.u64()
    r.what = "the negotiated options"
    options = RsOptions(r.boolean(), r.boolean(), r.boolean(), r.boolean())
    mount_paths: dict[int, str] = {}
    if version == Version.V2:
        r.what = "the mount paths"
        for _ in range(r.length(MAX_ITEMS, 2)):
            mount_id = r.u64()
            if mount_id in mount_paths:
                raise r.fail(f"mount ID {mount_id} appears twice")
            mount_paths[mount_id] = r.string(PATH_MAX)
    if r.pos != len(data):
        raise StateError(f"virtiofsd state: {len(data) - r.pos} bytes after the end")
    state = RsState(version, inodes, next_inode, handles, next_handle, options, mount_paths)
    check_wire(state)
    return state


def encode_wire(state: RsState) -> bytes:
    check_wire(state)
    w = _Writer()
    w.varint(state.version)
    w.varint(len(state.inodes))
    for i in state.inodes:
        w.varint(i.id)
        w.varint(i.refcount)
        w.varint(i.location)
        if i.location == Location.PATH:
            w.varint(i.parent)
            w.string(i.filename)
        elif i.location == Location.FULL_PATH:
            w.string(i.filename)
        elif i.location == Location.FILE_HANDLE:
            assert i.location_handle is not None
            _write_file_handle(w, i.location_handle)
        w.boolean(i.file_handle is not None)
        if i.file_handle is not None:
            _write_file_handle(w, i.file_handle)
    w.varint(state.next_inode)
    w.varint(len(state.handles))
    for h in state.handles:
        w.varint(h.id)
        w.varint(h.inode)
        w.varint(HandleSource.OPEN_INODE)
        w.i32(h.flags)
    w.varint(state.next_handle)
    o = state.options
    for flag in (o.writeback, o.announce_submounts, o.posix_acl, o.sup_group_extension):
        w.boolean(flag)
    if state.version == Version.V2:
        w.varint(len(state.mount_paths))
        for mount_id, path in state.mount_paths.items():
            w.varint(mount_id)
            w.string(path)
    return bytes(w.out)


def _write_file_handle(w: _Writer, fh: RsFileHandle) -> None:
    w.varint(fh.mnt_id)
    w.i32(fh.handle_type)
    w.varint(len(fh.handle))
    w.out += fh.handle


# -- what virtiofsd relies on ------------------------------------------------------------------

_U64 = 1 << 64


def _is_component(name: str) -> bool:
    raw = name.encode("utf-8")
    return 0 < len(raw) <= NAME_MAX and name not in (".", "..") and "/" not in name \
        and "\0" not in name


def _check_file_handle(fh: RsFileHandle, what: str) -> None:
    if not 0 <= fh.mnt_id < _U64 or not -(1 << 31) <= fh.handle_type < (1 << 31):
        raise StateError(f"virtiofsd state, {what}: mount ID or handle type out of range")
    if not 0 < len(fh.handle) <= HANDLE_MAX:
        raise StateError(f"virtiofsd state, {what}: a file handle of {len(fh.handle)} bytes")


def check_wire(state: RsState) -> None:
    """The cross-references a virtiofsd destination relies on, checked before anything is
    built from them: unique IDs, the root and only the root as RootNode, every parent present
    and no cycle, every handle's inode present, counters beyond every ID in use."""
    if len(state.inodes) > MAX_ITEMS or len(state.handles) > MAX_ITEMS:
        raise StateError("virtiofsd state: too many inodes or handles")
    ids: dict[int, RsInode] = {}
    for i in state.inodes:
        what = f"inode {i.id}"
        if not 0 < i.id < _U64 or not 0 <= i.refcount < _U64:
            raise StateError(f"virtiofsd state, {what}: ID or reference count out of range")
        if i.id in ids:
            raise StateError(f"virtiofsd state, {what}: appears twice")
        ids[i.id] = i
        if (i.location == Location.ROOT_NODE) != (i.id == ROOT_ID):
            raise StateError(f"virtiofsd state, {what}: only inode {ROOT_ID} is the root node")
        if i.location == Location.PATH and not _is_component(i.filename):
            raise StateError(f"virtiofsd state, {what}: {i.filename!r} is not one path component")
        if i.location == Location.FULL_PATH and not all(
                _is_component(c) for c in i.filename.split("/")):
            raise StateError(f"virtiofsd state, {what}: {i.filename!r} is not a relative path")
        if (i.location == Location.FILE_HANDLE) != (i.location_handle is not None):
            raise StateError(f"virtiofsd state, {what}: file handle and location disagree")
        if (i.parent and i.location != Location.PATH) or (
                i.filename and i.location not in (Location.PATH, Location.FULL_PATH)):
            raise StateError(f"virtiofsd state, {what}: a parent or name without a path")
        for fh in (i.location_handle, i.file_handle):
            if fh is not None:
                _check_file_handle(fh, what)
    if ids and ROOT_ID not in ids:
        raise StateError("virtiofsd state: inodes but no root node")
    for i in state.inodes:
        if i.location == Location.PATH:
            if i.parent not in ids:
                raise StateError(f"virtiofsd state, inode {i.id}: parent {i.parent} is missing")
            seen = {i.id}
            node = ids[i.parent]
            while node.location == Location.PATH:
                if node.id in seen:
                    raise StateError(f"virtiofsd state, inode {node.id}: is its own ancestor")
                seen.add(node.id)
                node = ids[node.parent]
    if ids and not max(ids) < state.next_inode < _U64:
        raise StateError("virtiofsd state: next_inode is not beyond every inode ID")
    handle_ids: set[int] = set()
    for h in state.handles:
        if not 0 <= h.id < _U64 or not -(1 << 31) <= h.flags < (1 << 31):
            raise StateError(f"virtiofsd state, handle {h.id}: ID or flags out of range")
        if h.id in handle_ids:
            raise StateError(f"virtiofsd state, handle {h.id}: appears twice")
        handle_ids.add(h.id)
        if h.inode not in ids:
            raise StateError(f"virtiofsd state, handle {h.id}: inode {h.inode} is missing")
    if handle_ids and not max(handle_ids) < state.next_handle < _U64:
        raise StateError("virtiofsd state: next_handle is not beyond every handle ID")
    if not 0 <= state.next_inode < _U64 or not 0 <= state.next_handle < _U64:
        raise StateError("virtiofsd state: a counter is out of range")
    if state.mount_paths and state.version != Version.V2:
        raise StateError("virtiofsd state: mount paths in a version 1 state")
    for mount_id, path in state.mount_paths.items():
        if not 0 <= mount_id < _U64 or not (path == "." or all(
                _is_component(c) for c in path.split("/"))):
            raise StateError(f"virtiofsd state, mount {mount_id}: {path!r} is not a relative path")


# -- onto DeviceState and back -----------------------------------------------------------------

# The INIT flags that follow virtiofsd's negotiated options (the rest of the session is not in
# its state).  With posix ACLs virtiofsd 1.13 also takes DONT_MASK and SETXATTR_EXT.
_OPTION_FLAGS = (
    ("writeback", SessionOption.WRITEBACK, InitFlag.WRITEBACK_CACHE),
    ("announce_submounts", SessionOption.ANNOUNCE_SUBMOUNTS, InitFlag.SUBMOUNTS),
    ("posix_acl", SessionOption.POSIX_ACL,
     InitFlag.POSIX_ACL | InitFlag.DONT_MASK | InitFlag.SETXATTR_EXT),
    ("sup_group_extension", SessionOption(0), InitFlag.CREATE_SUPP_GROUP),
)

# The FUSE session virtiofsd 1.13 serves a Linux guest, whatever its options: its FUSE minor
# (the guest's is at least that on any current kernel) and the INIT flags it always takes.  Read
# off its FUSE_INIT reply; the flags that depend on its options are set from the state
# (_OPTION_FLAGS) or from the loading daemon's own configuration (session_template).
VIRTIOFSD_MINOR = 38
# ALLOW_IDMAP is among them: virtiofsd takes it whenever a guest offers it (Linux 6.12 does), and
# the guest then sends requests it needs no ids for with uid and gid 0xffffffff; a loading
# pyvirtiofsd serves those as virtiofsd does (worker/fuse_server.py).
VIRTIOFSD_INIT_FLAGS = int(
    InitFlag.ASYNC_READ | InitFlag.ATOMIC_O_TRUNC | InitFlag.BIG_WRITES
    | InitFlag.HAS_IOCTL_DIR | InitFlag.AUTO_INVAL_DATA | InitFlag.ASYNC_DIO
    | InitFlag.PARALLEL_DIROPS | InitFlag.MAX_PAGES | InitFlag.INIT_EXT
    | InitFlag.ALLOW_IDMAP)
VIRTIOFSD_MAX_WRITE = 1 << 20
VIRTIOFSD_MAX_PAGES = 256


def session_template(minor: int, *, readdirplus: bool, killpriv_v2: bool,
                     security_label: bool, options: SessionOption) -> Session:
    """The session to carry on a virtiofsd guest with, for `to_device_state`: virtiofsd 1.13's
    (capped at this daemon's FUSE `minor`), with the flags that follow options virtiofsd does not
    record taken from the loading daemon's configuration -- the same options on both sides, as
    virtiofsd itself expects of a migration."""
    flags = VIRTIOFSD_INIT_FLAGS
    if readdirplus:
        flags |= InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO
    if killpriv_v2:
        flags |= InitFlag.HANDLE_KILLPRIV_V2
    if security_label:
        flags |= InitFlag.SECURITY_CTX
    return Session(minor=min(minor, VIRTIOFSD_MINOR), init_flags=int(flags),
                   max_write=VIRTIOFSD_MAX_WRITE, max_pages=VIRTIOFSD_MAX_PAGES, options=options)


def _child_refs(inodes: tuple[RsInode, ...]) -> dict[int, int]:
    """How many references each inode's children hold on it: virtiofsd counts a Path location's
    reference to its parent in the parent's refcount (the destination drops it once the child
    is open), so the guest's lookups are the refcount less these."""
    refs: dict[int, int] = {}
    for i in inodes:
        if i.location == Location.PATH:
            refs[i.parent] = refs.get(i.parent, 0) + 1
    return refs


def to_device_state(rs: RsState, session: Session) -> DeviceState:
    """DeviceState for a virtiofsd state.  virtiofsd keeps no FUSE session in its state (its
    destination answers as its own configuration says), so `session` gives the FUSE version,
    INIT flags and sizes to serve with; the options virtiofsd did record override its flags."""
    if not rs.inodes:
        raise StateError("virtiofsd state: no inodes (the guest had not mounted the "
                         "filesystem), nothing for pyvirtiofsd to carry on")
    refs = _child_refs(rs.inodes)
    inodes = []
    for i in rs.inodes:
        own = refs.get(i.id, 0) + (ROOT_OWN_REFS if i.id == ROOT_ID else 0)
        if i.refcount < own:
            raise StateError(f"virtiofsd state, inode {i.id}: reference count {i.refcount} is "
                             f"less than the {own} its children and the daemon hold")
        parent, name = 0, b""
        if i.location == Location.PATH:
            parent, name = i.parent, i.filename.encode("utf-8")
        elif i.location == Location.FULL_PATH:
            if "/" in i.filename:
                raise StateError(f"virtiofsd state, inode {i.id}: a path of several components "
                                 f"({i.filename!r}) has no parent inode to hang from")
            parent, name = ROOT_ID, i.filename.encode("utf-8")
        fh = i.file_handle
        mount_id = fh.mnt_id if fh else 0
        if i.location == Location.FILE_HANDLE:
            fh = _shared_dir_handle(rs, i)
            mount_id = fh.mnt_id
        elif i.id == ROOT_ID and fh is None:
            # The shared directory's mount, as the source named it (mount path "."): what
            # locates the inodes found by file handle, kept for writing them back.
            mount_id = next((m for m, p in rs.mount_paths.items() if p == "."), 0)
        inodes.append(Inode(
            nodeid=i.id, lookups=i.refcount - own, parent=parent, name=name,
            # virtiofsd's state has no mode, device or inode number: the destination learns
            # them when it opens the inode again.
            mode=0, dev=0, ino=0,
            mount_id=mount_id, handle_type=fh.handle_type if fh else 0,
            handle=fh.handle if fh else None, invalid=i.location == Location.INVALID))
    handles = []
    for h in rs.handles:
        if h.flags < 0:
            raise StateError(f"virtiofsd state, handle {h.id}: negative open flags {h.flags}")
        handles.append(Handle(fh=h.id, nodeid=h.inode, flags=h.flags))
    options, flags = SessionOption(session.options), session.init_flags
    for field, option, init_flag in _OPTION_FLAGS:
        if getattr(rs.options, field):
            options |= option
            flags |= init_flag
        else:
            options &= ~option
            flags &= ~init_flag
    sess = dataclasses.replace(session, options=options, init_flags=flags)
    counters = {NEXT_NODEID: rs.next_inode, NEXT_FH: rs.next_handle}
    state = DeviceState(session=sess, inodes=tuple(inodes), handles=tuple(handles),
                        counters=counters)
    devstate._check_state(state)
    return state


def _shared_dir_handle(rs: RsState, i: RsInode) -> RsFileHandle:
    """The file handle that locates inode `i` (file-handles mode), if DeviceState can carry it:
    DeviceState has no mount paths, so only a handle on the shared directory's own mount (the
    mount path ".") is understood the same way by both daemons."""
    fh = i.location_handle
    assert fh is not None
    if i.file_handle is not None and i.file_handle != fh:
        raise StateError(f"virtiofsd state, inode {i.id}: two different file handles")
    path = rs.mount_paths.get(fh.mnt_id)
    if path is None:
        raise StateError(f"virtiofsd state, inode {i.id}: its file handle's mount "
                         f"{fh.mnt_id} has no path")
    if path != ".":
        raise StateError(f"virtiofsd state, inode {i.id}: its file handle is on the submount "
                         f"{path!r}, which pyvirtiofsd's state cannot name; migrate with "
                         "--migration-mode=find-paths")
    return fh


def from_device_state(state: DeviceState) -> RsState:
    """virtiofsd's state for a DeviceState, as 1.13 writes it: version 2; an inode with a path
    by parent and name, its file handle (if any) attached for the destination to verify, as
    --migration-verify-handles does; an inode with no path by its file handle, as
    --migration-mode=file-handles does."""
    devstate._check_state(state)
    by_id = {i.nodeid: i for i in state.inodes}
    mount_paths: dict[int, str] = {}
    inodes = []
    for i in state.inodes:
        fh = None
        if i.handle is not None:
            fh = RsFileHandle(i.mount_id, i.handle_type, i.handle)
        location_handle = None
        if i.nodeid == ROOT_ID:
            location, parent, filename = Location.ROOT_NODE, 0, ""
        elif i.invalid:
            location, parent, filename = Location.INVALID, 0, ""
        elif i.parent == 0:
            # Found by its file handle alone (file-handles mode), as virtiofsd's FileHandle.
            location, parent, filename = Location.FILE_HANDLE, 0, ""
            location_handle, fh = fh, None
            assert location_handle is not None
            if by_id[ROOT_ID].mount_id != location_handle.mnt_id:
                raise StateError(f"inode {i.nodeid}: located by a file handle on mount "
                                 f"{location_handle.mnt_id}, not the shared directory's, and "
                                 "its path is not in the state")
            mount_paths[location_handle.mnt_id] = "."
        else:
            try:
                filename = i.name.decode("utf-8")
            except UnicodeDecodeError:
                raise StateError(f"inode {i.nodeid}: its name {i.name!r} is not UTF-8, and "
                                 "virtiofsd's state holds names as UTF-8 strings") from None
            location, parent = Location.PATH, i.parent
            if by_id[parent].invalid:
                raise StateError(f"inode {i.nodeid}: its parent {parent} is invalid, and "
                                 "virtiofsd's state cannot locate a child through it")
        inodes.append(RsInode(i.nodeid, 0, location, parent, filename, location_handle, fh))
    refs = _child_refs(tuple(inodes))
    out = []
    for rs_inode, i in zip(inodes, state.inodes, strict=True):
        own = refs.get(i.nodeid, 0) + (ROOT_OWN_REFS if i.nodeid == ROOT_ID else 0)
        if i.lookups + own >= _U64:
            raise StateError(f"inode {i.nodeid}: its reference count overflows")
        out.append(dataclasses.replace(rs_inode, refcount=i.lookups + own))
    handles = []
    for h in state.handles:
        if h.flags >= 1 << 31:
            raise StateError(f"handle {h.fh}: open flags {h.flags:#x} do not fit virtiofsd's i32")
        handles.append(RsHandle(h.fh, h.nodeid, h.flags))
    next_inode = state.counters.get(NEXT_NODEID, max(by_id) + 1)
    next_handle = state.counters.get(NEXT_FH, max((h.fh for h in state.handles), default=-1) + 1)
    s = state.session
    options = RsOptions(
        writeback=bool(s.options & SessionOption.WRITEBACK),
        announce_submounts=bool(s.options & SessionOption.ANNOUNCE_SUBMOUNTS),
        posix_acl=bool(s.options & SessionOption.POSIX_ACL),
        sup_group_extension=bool(s.init_flags & InitFlag.CREATE_SUPP_GROUP))
    rs = RsState(Version.V2, tuple(out), next_inode, tuple(handles), next_handle, options,
                 mount_paths)
    check_wire(rs)
    return rs


def decode(data: bytes | bytearray | memoryview, session: Session) -> DeviceState:
    """A virtiofsd 1.13 state as DeviceState (`session`: see to_device_state)."""
    return to_device_state(decode_wire(data), session)


def encode(state: DeviceState) -> bytes:
    """DeviceState as the bytes a virtiofsd 1.13 destination loads."""
    return encode_wire(from_device_state(state))
