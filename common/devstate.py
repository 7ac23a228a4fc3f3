"""The device state: what a destination daemon needs to carry on serving a guest's filesystem.

A migration (vhost-user SET_DEVICE_STATE_FD), a snapshot or a restart moves the same thing: every
inode the guest knows (its nodeid, lookup count and how to find it again), every open handle (its
fh and open flags), the counters, and the FUSE session the guest negotiated.  This module is the
model and its byte format only: pure data, no daemon imports, no file descriptors
(docs/state-format.md).

Wire layout (little-endian):

    header   magic "PVFSDEV\\0" | major u16 | minor u16 | payload length u64 | crc32 u32
             (the CRC32 covers the header bytes before it, then the payload)
    payload  sections: tag u16 | reserved u16 (0) | record count u32 | body length u32 | body

Nothing is returned from `decode` before the whole state has been checked: framing, CRC, every
record, and the cross-references (every handle's inode exists, every parent exists, the parent
chains reach the root, no nodeid or fh twice, counts within the limits below).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import struct
import zlib
from collections.abc import Mapping

MAGIC = b"PVFSDEV\0"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0

HEADER = struct.Struct("<8sHHQI")
HEADER_SIZE = HEADER.size

ROOT_NODEID = 1                 # FUSE_ROOT_ID
NAME_MAX = 255                  # a path component, as the host's NAME_MAX
HANDLE_MAX = 128                # MAX_HANDLE_SZ in <linux/fs.h>
COUNTER_NAME_MAX = 64
MAX_INODES = 1 << 24
MAX_HANDLES = 1 << 24
MAX_COUNTERS = 256
MAX_PAYLOAD = 1 << 30           # 16 Mi inodes with full names and handles fit well under it


class StateError(ValueError):
    """Device state that cannot be used: the message is one line saying what is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__("device state: " + " ".join(message.split()))


class Section(enum.IntEnum):
    """Payload sections; each appears at most once.  Unknown tags (a newer minor) are skipped."""
    SESSION = 1     # the negotiated FUSE session and the daemon options it depends on
    INODES = 2      # one record per inode the guest knows, the root included
    HANDLES = 3     # one record per open file or directory handle
    COUNTERS = 4    # named u64 counters


class SessionOption(enum.IntFlag):
    """Daemon options the guest's session depends on: a destination must have every one set."""
    NONE = 0
    WRITEBACK = 1 << 0
    ANNOUNCE_SUBMOUNTS = 1 << 1
    POSIX_ACL = 1 << 2
    XATTR = 1 << 3
    KILLPRIV_V2 = 1 << 4
    SECURITY_LABEL = 1 << 5


class InodeFlag(enum.IntFlag):
    INVALID = 1 << 0        # the source could not locate it: its requests get an errno
    HAS_HANDLE = 1 << 1     # a file handle (handle_type, handle, mount_id) follows the name


_SECTION = struct.Struct("<HHII")
# major, minor, init flags, max_write, max_pages, reserved, options
_SESSION = struct.Struct("<IIQIHHQ")
# nodeid, lookups, parent, flags, mode, dev, ino, mount id, handle type, name length, handle
# length; then the name and the handle
_INODE = struct.Struct("<QQQIIQQQiHH")
_HANDLE = struct.Struct("<QQII")            # fh, nodeid, open flags, reserved
_COUNTER = struct.Struct("<QB")             # value, name length; name
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


@dataclasses.dataclass(frozen=True)
class Inode:
    """One inode the guest knows.  `parent` and `name` locate it (find-paths); `handle` with
    `handle_type` and `mount_id` locate it by file handle; `dev`/`ino` confirm what was found."""
    nodeid: int
    lookups: int
    parent: int                 # 0: the root, or no path (found by handle alone, or invalid)
    name: bytes                 # b"" for the root
    mode: int                   # st_mode: file type and permission bits
    dev: int
    ino: int
    mount_id: int = 0
    handle_type: int = 0
    handle: bytes | None = None
    invalid: bool = False


@dataclasses.dataclass(frozen=True)
class Handle:
    """One open file or directory handle."""
    fh: int
    nodeid: int
    flags: int                  # the open flags the guest asked for (O_ACCMODE, O_APPEND, ...)


@dataclasses.dataclass(frozen=True)
class Session:
    """The FUSE session the guest negotiated (FUSE_INIT), and the options it depends on."""
    minor: int
    init_flags: int
    max_write: int
    max_pages: int
    options: SessionOption = SessionOption.NONE
    major: int = 7


@dataclasses.dataclass(frozen=True)
class DeviceState:
    """The whole state.  `version` is what `decode` read; `encode` always writes this module's."""
    session: Session
    inodes: tuple[Inode, ...]
    handles: tuple[Handle, ...] = ()
    counters: Mapping[str, int] = dataclasses.field(default_factory=dict)
    version: tuple[int, int] = (FORMAT_MAJOR, FORMAT_MINOR)

    def inode(self, nodeid: int) -> Inode | None:
        for inode in self.inodes:
            if inode.nodeid == nodeid:
                return inode
        return None


# -- checks shared by encode and decode ----------------------------------------------------------

def _check_u(value: int, bits: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise StateError(f"{what} {value!r} is not a {bits}-bit unsigned integer")


def _check_inode(i: Inode) -> None:
    _check_u(i.nodeid, 64, "inode nodeid")
    if i.nodeid == 0:
        raise StateError("inode nodeid 0")
    _check_u(i.lookups, 64, f"inode {i.nodeid} lookup count")
    _check_u(i.parent, 64, f"inode {i.nodeid} parent")
    _check_u(i.mode, 32, f"inode {i.nodeid} mode")
    _check_u(i.dev, 64, f"inode {i.nodeid} dev")
    _check_u(i.ino, 64, f"inode {i.nodeid} ino")
    _check_u(i.mount_id, 64, f"inode {i.nodeid} mount id")
    if not isinstance(i.handle_type, int) or not -(1 << 31) <= i.handle_type < (1 << 31):
        raise StateError(f"inode {i.nodeid} file handle type is not a 32-bit integer")
    if not isinstance(i.name, bytes) or len(i.name) > NAME_MAX:
        raise StateError(f"inode {i.nodeid} name is not at most {NAME_MAX} bytes")
    if i.handle is not None and (not isinstance(i.handle, bytes)
                                 or not 0 < len(i.handle) <= HANDLE_MAX):
        raise StateError(f"inode {i.nodeid} file handle is not 1..{HANDLE_MAX} bytes")
    if i.nodeid == ROOT_NODEID:
        if i.parent != 0 or i.name:
            raise StateError("the root inode has a parent or a name")
        return
    if i.parent == 0:
        # No path: found again by its file handle alone, or not at all (invalid).
        if not (i.invalid or i.handle) or i.name:
            raise StateError(f"inode {i.nodeid} has no parent")
        return
    if i.name in (b"", b".", b"..") or b"/" in i.name or b"\0" in i.name:
        raise StateError(f"inode {i.nodeid} name {i.name!r} is not a single path component")


def _check_handle(h: Handle) -> None:
    _check_u(h.fh, 64, "handle fh")
    _check_u(h.nodeid, 64, f"handle {h.fh} nodeid")
    _check_u(h.flags, 32, f"handle {h.fh} open flags")


def _check_session(s: Session) -> None:
    _check_u(s.major, 32, "FUSE major")
    _check_u(s.minor, 32, "FUSE minor")
    _check_u(s.init_flags, 64, "FUSE INIT flags")
    _check_u(s.max_write, 32, "max_write")
    _check_u(s.max_pages, 16, "max_pages")
    _check_u(int(s.options), 64, "session options")
    if s.major != 7:
        raise StateError(f"FUSE major {s.major} is not 7")
    unknown = int(s.options) & ~_known_options()
    if unknown:
        raise StateError(f"the session needs option bits {unknown:#x} this version does not know")


def _known_options() -> int:
    mask = 0
    for option in SessionOption:
        mask |= int(option)     # an int: ~ on a flag would only complement within known bits
    return mask


def _check_state(state: DeviceState) -> None:
    """The cross-record checks: run before encoding and before `decode` returns anything."""
    if len(state.inodes) > MAX_INODES:
        raise StateError(f"{len(state.inodes)} inodes: more than {MAX_INODES}")
    if len(state.handles) > MAX_HANDLES:
        raise StateError(f"{len(state.handles)} handles: more than {MAX_HANDLES}")
    if len(state.counters) > MAX_COUNTERS:
        raise StateError(f"{len(state.counters)} counters: more than {MAX_COUNTERS}")
    _check_session(state.session)
    parents: dict[int, int] = {}
    for inode in state.inodes:
        _check_inode(inode)
        if inode.nodeid in parents:
            raise StateError(f"inode {inode.nodeid} appears twice")
        parents[inode.nodeid] = inode.parent
    if ROOT_NODEID not in parents:
        raise StateError("the root inode is missing")
    for nodeid, parent in parents.items():
        if parent and parent not in parents:
            raise StateError(f"inode {nodeid}'s parent {parent} is missing")
    _check_chains(parents)
    seen: set[int] = set()
    for handle in state.handles:
        _check_handle(handle)
        if handle.fh in seen:
            raise StateError(f"handle {handle.fh} appears twice")
        seen.add(handle.fh)
        if handle.nodeid not in parents:
            raise StateError(f"handle {handle.fh}'s inode {handle.nodeid} is missing")
    for name, value in state.counters.items():
        if (not isinstance(name, str) or not name or len(name) > COUNTER_NAME_MAX
                or not name.isascii() or not name.isprintable()):
            raise StateError(f"counter name {name!r} is not 1..{COUNTER_NAME_MAX} printable ASCII")
        _check_u(value, 64, f"counter {name}")


def _check_chains(parents: dict[int, int]) -> None:
    """Every parent chain ends at the root (or at an invalid inode with no location): no cycles."""
    done: set[int] = {0}
    for start in parents:
        path: list[int] = []
        on_path: set[int] = set()
        node = start
        while node not in done:
            if node in on_path:
                raise StateError(f"inode {node} is its own ancestor")
            on_path.add(node)
            path.append(node)
            node = parents[node]
        done.update(path)


# -- encode --------------------------------------------------------------------------------------

def _section(tag: Section, count: int, body: bytes) -> bytes:
    return _SECTION.pack(tag, 0, count, len(body)) + body


def encode(state: DeviceState) -> bytes:
    """The state's bytes, header first.  Refuses (StateError) a state `decode` would refuse."""
    _check_state(state)
    s = state.session
    session = _SESSION.pack(s.major, s.minor, s.init_flags, s.max_write, s.max_pages, 0,
                            int(s.options))
    inodes = bytearray()
    for i in state.inodes:
        flags = (InodeFlag.INVALID if i.invalid else 0) | (InodeFlag.HAS_HANDLE if i.handle else 0)
        handle = i.handle or b""
        inodes += _INODE.pack(i.nodeid, i.lookups, i.parent, flags, i.mode, i.dev, i.ino,
                              i.mount_id, i.handle_type, len(i.name), len(handle))
        inodes += i.name + handle
    handles = b"".join(_HANDLE.pack(h.fh, h.nodeid, h.flags, 0) for h in state.handles)
    counters = bytearray()
    for name, value in sorted(state.counters.items()):
        raw = name.encode("ascii")
        counters += _COUNTER.pack(value, len(raw)) + raw
    payload = b"".join((
        _section(Section.SESSION, 1, session),
        _section(Section.INODES, len(state.inodes), bytes(inodes)),
        _section(Section.HANDLES, len(state.handles), handles),
        _section(Section.COUNTERS, len(state.counters), bytes(counters)),
    ))
    if len(payload) > MAX_PAYLOAD:
        raise StateError(f"{len(payload)} bytes: more than {MAX_PAYLOAD}")
    return frame(payload)


def frame(payload: bytes, major: int = FORMAT_MAJOR, minor: int = FORMAT_MINOR) -> bytes:
    """The header for `payload`, then the payload (no checks: `encode` is the way to bytes)."""
    prefix = HEADER.pack(MAGIC, major, minor, len(payload), 0)[:HEADER_SIZE - 4]
    return prefix + struct.pack("<I", zlib.crc32(payload, zlib.crc32(prefix))) + payload


# -- decode --------------------------------------------------------------------------------------

def payload_length(header: bytes) -> int:
    """From the first HEADER_SIZE bytes, how many payload bytes follow (for a reader on a pipe,
    which must know when the state ends).  Refuses a foreign magic, a newer major or a payload
    over MAX_PAYLOAD before any of it is read."""
    if len(header) < HEADER_SIZE:
        raise StateError(f"truncated: {len(header)} bytes, the header alone is {HEADER_SIZE}")
    magic, major, minor, length, _crc = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise StateError("bad magic: this is not a pyvirtiofsd device state")
    if major != FORMAT_MAJOR:
        raise StateError(f"format version {major}.{minor} is not supported "
                         f"(this daemon reads {FORMAT_MAJOR}.x)")
    if length > MAX_PAYLOAD:
        raise StateError(f"payload of {length} bytes: more than {MAX_PAYLOAD}")
    return length


class _Reader:
    """Bounded reads over one section's body: running past it is a StateError, not an exception
    from struct."""

    def __init__(self, data: memoryview, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> memoryview:
        if n > len(self.data) - self.pos:
            raise StateError(f"{self.what} section is truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def end(self) -> None:
        if self.pos != len(self.data):
            raise StateError(f"{self.what} section has {len(self.data) - self.pos} bytes left over")


def _sections(payload: memoryview) -> dict[int, tuple[int, memoryview]]:
    found: dict[int, tuple[int, memoryview]] = {}
    pos = 0
    while pos < len(payload):
        if len(payload) - pos < _SECTION.size:
            raise StateError("a section header is truncated")
        tag, reserved, count, length = _SECTION.unpack_from(payload, pos)
        pos += _SECTION.size
        if reserved:
            raise StateError(f"section {tag} has reserved bits set")
        if length > len(payload) - pos:
            raise StateError(f"section {tag} is truncated")
        if tag in found:
            raise StateError(f"section {tag} appears twice")
        found[tag] = (count, payload[pos:pos + length])
        pos += length
    for tag in (Section.SESSION, Section.INODES):
        if tag not in found:
            raise StateError(f"the {tag.name.lower()} section is missing")
    return found


def _decode_session(count: int, body: memoryview) -> Session:
    if count != 1:
        raise StateError(f"the session section holds {count} records, not 1")
    r = _Reader(body, "session")
    major, minor, init_flags, max_write, max_pages, reserved, options = r.unpack(_SESSION)
    r.end()
    if reserved:
        raise StateError("the session record has reserved bits set")
    if options & ~_known_options():
        raise StateError(f"the session needs option bits {options & ~_known_options():#x} "
                         "this version does not know")
    return Session(minor=minor, init_flags=init_flags, max_write=max_write, max_pages=max_pages,
                   options=SessionOption(options), major=major)


def _decode_inodes(count: int, body: memoryview) -> tuple[Inode, ...]:
    if count > MAX_INODES or count * _INODE.size > len(body):
        raise StateError(f"the inode section cannot hold {count} records")
    r = _Reader(body, "inode")
    out: list[Inode] = []
    for _ in range(count):
        (nodeid, lookups, parent, flags, mode, dev, ino, mnt_id, handle_type, name_len,
         handle_len) = r.unpack(_INODE)
        if flags & ~(InodeFlag.INVALID | InodeFlag.HAS_HANDLE):
            raise StateError(f"inode {nodeid} has unknown flags {flags:#x}")
        if bool(flags & InodeFlag.HAS_HANDLE) != bool(handle_len):
            raise StateError(f"inode {nodeid}'s file handle flag and length disagree")
        if name_len > NAME_MAX or handle_len > HANDLE_MAX:
            raise StateError(f"inode {nodeid}'s name or file handle is too long")
        name = bytes(r.take(name_len))
        handle = bytes(r.take(handle_len)) if handle_len else None
        out.append(Inode(nodeid=nodeid, lookups=lookups, parent=parent, name=name, mode=mode,
                         dev=dev, ino=ino, mount_id=mnt_id, handle_type=handle_type,
                         handle=handle, invalid=bool(flags & InodeFlag.INVALID)))
    r.end()
    return tuple(out)


def _decode_handles(count: int, body: memoryview) -> tuple[Handle, ...]:
    if count > MAX_HANDLES or count * _HANDLE.size != len(body):
        raise StateError(f"the handle section's {len(body)} bytes do not hold {count} records")
    r = _Reader(body, "handle")
    out: list[Handle] = []
    for _ in range(count):
        fh, nodeid, flags, reserved = r.unpack(_HANDLE)
        if reserved:
            raise StateError(f"handle {fh} has reserved bits set")
        out.append(Handle(fh=fh, nodeid=nodeid, flags=flags))
    r.end()
    return tuple(out)


def _decode_counters(count: int, body: memoryview) -> dict[str, int]:
    if count > MAX_COUNTERS:
        raise StateError(f"{count} counters: more than {MAX_COUNTERS}")
    r = _Reader(body, "counter")
    out: dict[str, int] = {}
    for _ in range(count):
        value, name_len = r.unpack(_COUNTER)
        raw = bytes(r.take(name_len))
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            raise StateError(f"counter name {raw!r} is not ASCII") from None
        if name in out:
            raise StateError(f"counter {name} appears twice")
        out[name] = value
    r.end()
    return out


def decode(data: bytes | bytearray | memoryview) -> DeviceState:
    """The state in `data`, checked whole; StateError (one line) for anything wrong with it."""
    view = memoryview(data).cast("B")
    length = payload_length(bytes(view[:HEADER_SIZE]))
    _magic, major, minor, _length, crc = HEADER.unpack_from(view)
    if len(view) - HEADER_SIZE < length:
        raise StateError(f"truncated: {len(view) - HEADER_SIZE} of {length} payload bytes")
    if len(view) - HEADER_SIZE > length:
        raise StateError(f"{len(view) - HEADER_SIZE - length} bytes after the payload")
    payload = view[HEADER_SIZE:]
    if zlib.crc32(payload, zlib.crc32(view[:HEADER_SIZE - 4])) != crc:
        raise StateError("checksum mismatch: the state is corrupt")
    sections = _sections(payload)
    state = DeviceState(
        session=_decode_session(*sections[Section.SESSION]),
        inodes=_decode_inodes(*sections[Section.INODES]),
        handles=_decode_handles(*sections.get(Section.HANDLES, (0, memoryview(b"")))),
        counters=_decode_counters(*sections.get(Section.COUNTERS, (0, memoryview(b"")))),
        version=(major, minor))
    _check_state(state)
    return state


# -- files ---------------------------------------------------------------------------------------

def write_file(path: str | os.PathLike[str], state: DeviceState) -> None:
    """Write the state so that `path` holds either the old file or the whole new one, on disk:
    a temporary file beside it, fsync, rename over, fsync of the directory."""
    data = encode(state)
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_file(path: str | os.PathLike[str]) -> DeviceState:
    """The state in the file at `path`; StateError when it is not a whole, valid state (an
    OSError when it cannot be read)."""
    with open(path, "rb") as f:
        header = f.read(HEADER_SIZE)
        length = payload_length(header)
        payload = f.read(length + 1)
    return decode(header + payload)
