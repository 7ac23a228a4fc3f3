"""Device state in a queue worker: what a save collects, and how a load brings it back.

The worker is where the share's fds are (the shared fd table), so both directions run here,
on the supervisor's request (common/control.py STATE_SAVE / STATE_LOAD) and only while every
ring is stopped (vhost-user SET_DEVICE_STATE_FD, phase STOPPED): no request changes the tables
meanwhile.

Save: every inode the guest holds is located -- its parent's nodeid and its name, found from
the path the kernel gives its O_PATH fd (/proc/self/fd) and confirmed by (dev, ino); with
`--migration-mode file-handles` (or `--migration-verify-handles`) its file handle too -- and
every handle recorded with its open flags (common/devstate.py).

Load: the state is checked whole (format, checksum, references, options), then every inode is
found again, parents first -- by parent fd and name (find-paths), or by open_by_handle_at on
the share's mount (file-handles) -- and must be the same file (dev, ino, type); every handle is
reopened with its flags.  Only when all of that has succeeded are the entries put into the
tables, at exactly their nodeids and fhs, so a refused state leaves nothing behind.  With
`--migration-on-error guest-error` an inode that cannot be found again is put in as invalid
instead: the guest's requests on it (and on its handles) get EIO, as virtiofsd answers them.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
from collections.abc import Callable

from pyvirtiofsd.common import devstate, native, rsstate
from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.arena import Arena, InodeEntry
from pyvirtiofsd.common.devstate import DeviceState, Handle, Inode, SessionOption, StateError
from pyvirtiofsd.worker.filesystem import FsOptions
from pyvirtiofsd.worker.fuse_server import _MAX_PAGES as MAX_PAGES
from pyvirtiofsd.worker.fuse_server import MAX_WRITE, Session
from pyvirtiofsd.worker.passthrough import _open_beneath

log = logging.getLogger("pyvirtiofsd.migration")

_DELETED = b" (deleted)"
# Flags a reopen must not repeat: creation and truncation happened once, on the source.
_REOPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOFOLLOW | os.O_PATH | os.O_NOCTTY
_LOW32 = 0xFFFFFFFF
# Names looked at, at most, when inodes the kernel cannot name are searched for in the
# directories the guest holds (Locator.search).
SEARCH_LIMIT = 1 << 20

# The options a guest's session depends on, by the names the command line gives them.
_OPTION_NAMES = {
    SessionOption.WRITEBACK: "--writeback",
    SessionOption.ANNOUNCE_SUBMOUNTS: "--announce-submounts",
    SessionOption.POSIX_ACL: "--posix-acl",
    SessionOption.XATTR: "--xattr",
    SessionOption.KILLPRIV_V2: "--killpriv-v2",
    SessionOption.SECURITY_LABEL: "--security-label",
}


class MigrationError(Exception):
    """A state that cannot be taken or applied; the message is one line."""


def session_options(options: FsOptions) -> SessionOption:
    out = SessionOption.NONE
    for on, flag in ((options.writeback, SessionOption.WRITEBACK),
                     (options.announce_submounts, SessionOption.ANNOUNCE_SUBMOUNTS),
                     (options.posix_acl, SessionOption.POSIX_ACL),
                     (options.xattr, SessionOption.XATTR),
                     (options.killpriv_v2, SessionOption.KILLPRIV_V2),
                     (options.security_label, SessionOption.SECURITY_LABEL)):
        if on:
            out |= flag
    return out


def file_handle(fd: int) -> tuple[int, bytes, int]:
    """(handle type, handle, mount id) of the inode behind `fd` (name_to_handle_at(2))."""
    buf = native.ffi.new("uint8_t[128]")
    length, htype, mnt = (native.ffi.new("uint32_t[1]"), native.ffi.new("int[1]"),
                          native.ffi.new("uint64_t[1]"))
    if native.lib.vfs_name_to_handle(fd, buf, length, htype, mnt) != 0:
        err = native.ffi.errno
        raise OSError(err, os.strerror(err))
    return htype[0], bytes(native.ffi.buffer(buf, length[0])), mnt[0]


def open_by_handle(mount_fd: int, htype: int, handle: bytes, flags: int) -> int:
    fd = native.lib.vfs_open_by_handle(mount_fd, handle, len(handle), htype, flags)
    if fd < 0:
        err = native.ffi.errno
        raise OSError(err, os.strerror(err))
    return fd


class Locator:
    """Where each inode of the source is: its parent's nodeid and its name, from the path the
    kernel names its fd by, checked against its (dev, ino)."""

    def __init__(self, proc_fd: int, root_fd: int) -> None:
        self.proc_fd = proc_fd
        self.root_fd = root_fd
        self.root_path = os.readlink(b"%d" % root_fd, dir_fd=proc_fd)
        # Filled by a pre-migration pass (when dirty logging starts): the last place each
        # inode was seen, tried when the kernel no longer gives a path that leads to it.
        self.known: dict[int, tuple[int, bytes]] = {}

    def relative(self, fd: int) -> bytes | None:
        """The inode's path beneath the share root, or None (deleted, or outside it)."""
        path = os.readlink(b"%d" % fd, dir_fd=self.proc_fd)
        if path.endswith(_DELETED):
            return None
        root = self.root_path
        if root == b"/":
            return path.lstrip(b"/") or None
        if not path.startswith(root + b"/"):
            return None
        return path[len(root) + 1:]

    def locate(self, fd: int, nodeid: int, st: os.stat_result,
               by_key: dict[tuple[int, int], int],
               fds: dict[int, int]) -> tuple[int, bytes] | None:
        rel = self.relative(fd)
        found = self._check(rel, st, by_key) if rel is not None else None
        if found is None and nodeid in self.known:
            # Where the pre-migration pass saw it, if that name still leads to it.
            parent, name = self.known[nodeid]
            try:
                cst = os.stat(name, dir_fd=fds[parent], follow_symlinks=False)
            except (KeyError, OSError):
                return None
            if (cst.st_dev, cst.st_ino) == (st.st_dev, st.st_ino):
                found = parent, name
        return found

    def search(self, lost: dict[tuple[int, int], int],
               dirs: dict[int, int]) -> dict[int, tuple[int, bytes]]:
        """The inodes of `lost` ((dev, ino): nodeid) that the kernel cannot name any more (the
        name they were looked up by is gone) but that have another name in a directory the
        guest holds (`dirs`, nodeid: O_PATH fd): a hard link, or a rename the kernel did not
        see.  At most SEARCH_LIMIT names are looked at."""
        found: dict[int, tuple[int, bytes]] = {}
        budget = SEARCH_LIMIT
        for parent, pfd in dirs.items():
            if len(found) == len(lost) or budget <= 0:
                break
            try:
                dfd = os.open(b"%d" % pfd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                              dir_fd=self.proc_fd)
            except OSError:
                continue
            try:
                names = os.listdir(dfd)
            except OSError:
                names = []
            finally:
                os.close(dfd)
            for name in names[:budget]:
                raw = os.fsencode(name)
                try:
                    cst = os.stat(raw, dir_fd=pfd, follow_symlinks=False)
                except OSError:
                    continue
                nodeid = lost.get((cst.st_dev, cst.st_ino))
                if nodeid is not None and nodeid not in found:
                    found[nodeid] = parent, raw
            budget -= len(names)
        return found

    def _check(self, rel: bytes, st: os.stat_result,
               by_key: dict[tuple[int, int], int]) -> tuple[int, bytes] | None:
        parent_rel, _, name = rel.rpartition(b"/")
        try:
            pst = os.stat(parent_rel or b".", dir_fd=self.root_fd, follow_symlinks=False)
            cst = os.stat(rel, dir_fd=self.root_fd, follow_symlinks=False)
        except OSError:
            return None
        parent = by_key.get((pst.st_dev, pst.st_ino))
        if parent is None or (cst.st_dev, cst.st_ino) != (st.st_dev, st.st_ino):
            return None
        return parent, name


def _close_opened(entries: list[InodeEntry]) -> None:
    """Close the fds Arena.inode_entries() opened from inodes kept as file handles."""
    for e in entries:
        if e.opened:
            os.close(e.fd)


def collect(arena: Arena, started: bool, minor: int, init_flags: int, max_write: int,
            max_pages: int, options: FsOptions, locator: Locator,
            counters: dict[str, int] | None = None) -> DeviceState:
    """The device state of the tables as they are now (every ring stopped)."""
    entries = arena.inode_entries()
    try:
        return _collect(entries, arena, started, minor, init_flags, max_write, max_pages,
                        options, locator, counters)
    finally:
        _close_opened(entries)


def _collect(entries: list[InodeEntry], arena: Arena, started: bool, minor: int,
             init_flags: int, max_write: int, max_pages: int, options: FsOptions,
             locator: Locator, counters: dict[str, int] | None) -> DeviceState:
    by_key: dict[tuple[int, int], int] = {}
    for e in entries:
        by_key.setdefault((e.dev, e.ino), e.nodeid)
    fds = {e.nodeid: e.fd for e in entries}
    handles_wanted = (options.migration_mode == "file-handles"
                      or options.migration_verify_handles)
    stats = {e.nodeid: os.fstat(e.fd) for e in entries if e.fd >= 0}
    places = {e.nodeid: locator.locate(e.fd, e.nodeid, stats[e.nodeid], by_key, fds)
              for e in entries if e.nodeid in stats and e.nodeid != devstate.ROOT_NODEID}
    lost = {(stats[n].st_dev, stats[n].st_ino): n for n, where in places.items() if where is None}
    if lost:
        dirs = {n: fds[n] for n, st in stats.items() if stat.S_ISDIR(st.st_mode)}
        places.update(locator.search(lost, dirs))
    inodes: list[Inode] = []
    for e in entries:
        st = stats.get(e.nodeid)
        mode = st.st_mode if st is not None else 0
        if e.nodeid == devstate.ROOT_NODEID:
            inodes.append(Inode(nodeid=e.nodeid, lookups=e.nlookup, parent=0, name=b"",
                                mode=mode, dev=e.dev, ino=e.ino, mount_id=e.mnt_id))
            continue
        where = places.get(e.nodeid)
        handle: tuple[int, bytes, int] | None = None
        if handles_wanted and st is not None:
            try:
                handle = file_handle(e.fd)
            except OSError as err:
                log.warning("inode %#x has no file handle: %s", e.nodeid, err.strerror or err)
        parent, name = where if where is not None else (0, b"")
        inodes.append(Inode(
            nodeid=e.nodeid, lookups=e.nlookup, parent=parent, name=name, mode=mode,
            dev=e.dev, ino=e.ino, mount_id=handle[2] if handle else e.mnt_id,
            handle_type=handle[0] if handle else 0, handle=handle[1] if handle else None,
            invalid=where is None and handle is None))
        if where is None and handle is None:
            log.warning("inode %#x cannot be located (deleted, or moved out of the share): it"
                        " is sent as invalid", e.nodeid)
    known = {i.nodeid for i in inodes}
    handles = []
    for h in arena.handle_entries():
        if h.nodeid not in known:
            log.warning("fh %#x belongs to no inode the guest holds: not sent", h.fh)
            continue
        handles.append(Handle(fh=h.fh, nodeid=h.nodeid, flags=h.flags))
    session = devstate.Session(minor=minor if started else 0,
                               init_flags=init_flags if started else 0,
                               max_write=max_write, max_pages=max_pages,
                               options=session_options(options))
    return DeviceState(session=session, inodes=tuple(inodes), handles=tuple(handles),
                       counters=counters or {})


def prepare(arena: Arena, locator: Locator) -> int:
    """The pre-migration pass (dirty logging has started): record where every inode is now,
    so that one the kernel can no longer name by the switch-over can still be found."""
    entries = arena.inode_entries()
    by_key = {(e.dev, e.ino): e.nodeid for e in entries}
    fds = {e.nodeid: e.fd for e in entries}
    locator.known.clear()
    try:
        for e in entries:
            if e.nodeid == devstate.ROOT_NODEID or e.fd < 0:
                continue
            try:
                where = locator.locate(e.fd, e.nodeid, os.fstat(e.fd), by_key, fds)
            except OSError:
                where = None
            if where is not None:
                locator.known[e.nodeid] = where
    finally:
        _close_opened(entries)
    return len(locator.known)


def check_compatible(state: DeviceState, options: FsOptions,
                     supported_flags: int | None = None) -> None:
    """StateError (one line) when this daemon cannot serve the guest's session as the source
    did: an option the source had that is off here, or a session it cannot continue (a newer
    FUSE minor, a larger max_write, INIT flags it does not serve)."""
    missing = int(state.session.options) & ~int(session_options(options))
    if missing:
        names = [name for flag, name in _OPTION_NAMES.items() if missing & flag]
        raise StateError("the source served the guest with " + ", ".join(names)
                         + ", which this daemon does not have: start it with the same options")
    s = state.session
    if not s.minor:
        return                      # the guest had not started its FUSE session
    if s.minor > fa.KERNEL_MINOR_VERSION:
        raise StateError(f"the guest's FUSE session is 7.{s.minor}; this daemon speaks up to"
                         f" 7.{fa.KERNEL_MINOR_VERSION}")
    if s.max_write > MAX_WRITE or s.max_pages > MAX_PAGES:
        raise StateError(f"the guest may write {s.max_write} bytes ({s.max_pages} pages) at"
                         f" once; this daemon takes {MAX_WRITE} ({MAX_PAGES})")
    if supported_flags is not None and s.init_flags & ~supported_flags:
        raise StateError(f"the guest's FUSE session has INIT flags"
                         f" {s.init_flags & ~supported_flags:#x} this daemon does not serve")


def _parents_first(state: DeviceState) -> list[Inode]:
    by_id = {i.nodeid: i for i in state.inodes}
    depth: dict[int, int] = {0: -1}

    def depth_of(nodeid: int) -> int:
        chain = []
        while nodeid not in depth:
            chain.append(nodeid)
            nodeid = by_id[nodeid].parent
        d = depth[nodeid]
        for n in reversed(chain):
            d += 1
            depth[n] = d
        return d

    return sorted(state.inodes, key=lambda i: depth_of(i.nodeid))


def apply(state: DeviceState, arena: Arena, options: FsOptions, proc_fd: int, root_fd: int,
          mnt_id_of: Callable[[int], int], start_session: Callable[[int, int], None],
          share_mount_fd: int = -1, supported_flags: int | None = None) -> int:
    """Find every inode again and reopen every handle, then put them all into the (fresh)
    tables at once.  Returns how many inodes were put in as invalid.  MigrationError: nothing
    was changed."""
    check_compatible(state, options, supported_flags)
    held = arena.inode_entries()
    _close_opened(held)
    if len(held) > 1 or arena.handle_entries():
        raise MigrationError("the guest of this daemon already holds inodes or handles: a"
                             " device state is loaded only into a fresh daemon")
    guest_error = options.migration_on_error == "guest-error"
    by_handle = options.migration_mode == "file-handles"
    opened: dict[int, int] = {devstate.ROOT_NODEID: root_fd}
    found: dict[int, tuple[int, int, int]] = {}           # nodeid: dev, ino, mnt_id
    reopened: dict[int, int] = {}
    lost: list[int] = []
    # open_by_handle_at(2) names the filesystem by an fd that is not O_PATH: the one the
    # supervisor opened on the share before the sandbox, or else the share's root reopened for
    # reading.  (A handle on another mount inside the share does not decode through it, and is
    # then lost like any inode not found again.)
    mount_fd = -1
    if by_handle and share_mount_fd < 0:
        mount_fd = os.open(b"%d" % root_fd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                           dir_fd=proc_fd)

    def lose(what: str, nodeid: int, why: str) -> None:
        if not guest_error:
            raise MigrationError(f"{what} cannot be found again: {why}")
        log.warning("%s cannot be found again (%s): the guest gets EIO for it", what, why)
        lost.append(nodeid)

    try:
        for inode in _parents_first(state):
            if inode.nodeid == devstate.ROOT_NODEID:
                continue
            what = f"inode {inode.nodeid:#x}" + (f" ({inode.name.decode(errors='replace')})"
                                                 if inode.name else "")
            opened[inode.nodeid] = -1
            if inode.invalid:
                lose(what, inode.nodeid, "the source could not locate it")
                continue
            try:
                fd = _find(inode, opened, share_mount_fd if share_mount_fd >= 0 else mount_fd,
                           by_handle, options.migration_verify_handles)
            except OSError as e:
                lose(what, inode.nodeid, e.strerror or str(e))
                continue
            opened[inode.nodeid] = fd
            # What was opened, not what the state says: the same unless the state recorded
            # nothing (a virtiofsd state), and the tables find inodes by it.
            st = os.fstat(fd)
            found[inode.nodeid] = (st.st_dev, st.st_ino, mnt_id_of(fd))
        for h in state.handles:
            ifd = opened.get(h.nodeid, -1)
            if ifd < 0:
                # Its inode is lost: so is the handle (guest-error only; abort raised above).
                reopened[h.fh] = -1
                continue
            try:
                reopened[h.fh] = os.open(b"%d" % ifd, (h.flags & ~_REOPEN_STRIP) | os.O_CLOEXEC,
                                         dir_fd=proc_fd)
            except OSError as e:
                if not guest_error:
                    raise MigrationError(f"fh {h.fh:#x} of inode {h.nodeid:#x} cannot be"
                                         f" reopened: {e.strerror}") from None
                log.warning("fh %#x cannot be reopened (%s): the guest gets EIO for it", h.fh,
                            e.strerror)
                reopened[h.fh] = -1
        _check_capacity(state, arena)
    except BaseException:
        for nodeid, fd in opened.items():
            if fd >= 0 and nodeid != devstate.ROOT_NODEID:
                os.close(fd)
        for fd in reopened.values():
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        if mount_fd >= 0:
            os.close(mount_fd)
    # Everything was found: from here on the tables own the fds.
    for inode in state.inodes:
        if inode.nodeid == devstate.ROOT_NODEID:
            continue
        dev, ino, mnt = found.get(inode.nodeid, (0, 0, 0))
        arena.restore_inode(inode.nodeid, opened[inode.nodeid], inode.lookups, dev, ino, mnt)
    for h in state.handles:
        arena.restore_handle(h.fh, reopened[h.fh], h.nodeid, h.flags)
    arena.restored()
    if state.session.minor:
        start_session(state.session.minor, state.session.init_flags)
    return len(lost)


def _check_capacity(state: DeviceState, arena: Arena) -> None:
    max_inodes, max_handles = arena.capacity()
    for i in state.inodes:
        if (i.nodeid & _LOW32) > max_inodes:
            raise MigrationError(f"nodeid {i.nodeid:#x} does not fit this daemon's inode table"
                                 f" ({max_inodes} entries)")
    for h in state.handles:
        if (h.fh & _LOW32) > max_handles:
            raise MigrationError(f"fh {h.fh:#x} does not fit this daemon's handle table"
                                 f" ({max_handles} entries)")


def _find(inode: Inode, opened: dict[int, int], mount_fd: int, by_handle: bool,
          verify: bool) -> int:
    """An O_PATH fd for the inode, checked to be the very file the source had."""
    if by_handle and inode.handle is not None:
        fd = open_by_handle(mount_fd, inode.handle_type, inode.handle,
                            os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    else:
        pfd = opened.get(inode.parent, -1)
        if inode.parent == 0 or pfd < 0:
            raise OSError(errno.ENOENT, "no path to it" if inode.parent == 0
                          else "its parent directory is lost")
        fd = _open_beneath(pfd, inode.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        # A state from the Rust virtiofsd records no dev, ino or mode (0): nothing to compare.
        if ((inode.dev or inode.ino) and (st.st_dev, st.st_ino) != (inode.dev, inode.ino)) or (
                inode.mode and stat.S_IFMT(st.st_mode) != stat.S_IFMT(inode.mode)):
            raise OSError(errno.ESTALE, "a different file is there now")
        if (verify and not by_handle and inode.handle is not None
                and file_handle(fd)[:2] != (inode.handle_type, inode.handle)):
            raise OSError(errno.ESTALE, "its file handle differs")
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- moving the bytes: the front-end's pipe end, which may be non-blocking --------------------

def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            poller.poll()


def read_all(fd: int) -> bytes:
    """Everything up to EOF: the header first, so a foreign or oversized state is refused
    before its payload is read."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    buf = bytearray()
    want = devstate.HEADER_SIZE
    header_read = False
    while True:
        try:
            chunk = os.read(fd, min(1 << 20, max(want - len(buf), 1 << 16)))
        except BlockingIOError:
            poller.poll()
            continue
        if not chunk:
            return bytes(buf)
        buf += chunk
        if not header_read and rsstate.is_rust_state(buf[:len(devstate.MAGIC)]):
            # The Rust virtiofsd's state has no header: it ends at EOF, within a bound.
            header_read = True
            want = rsstate.MAX_STATE
        if not header_read and len(buf) >= devstate.HEADER_SIZE:
            header_read = True
            want = devstate.HEADER_SIZE + devstate.payload_length(bytes(buf[:devstate.HEADER_SIZE]))
        if header_read and len(buf) > want:
            raise StateError(f"more than the {want} bytes the state may have")


class StateService:
    """A worker's side of the device-state control messages (common/control.py STATE_*): the
    save or load itself runs after the answer, and its outcome is kept for STATE_CHECK."""

    def __init__(self, arena: Arena, session: Session, options: FsOptions, proc_fd: int,
                 mnt_id_of: Callable[[int], int], queue: int, mount_fd: int = -1,
                 supported_flags: int | None = None) -> None:
        self.arena = arena
        self.session = session
        self.options = options
        self.proc_fd = proc_fd
        self.mnt_id_of = mnt_id_of
        self.queue = queue
        self.mount_fd = mount_fd        # the supervisor's, shared by every worker: never closed
        self.supported_flags = supported_flags    # the INIT flags this daemon may agree to
        self._locator: Locator | None = None
        # errno of the last save or load, 0 when it completed; ENODATA before any (a fresh
        # worker, or a respawned one that never saw the transfer): nothing to vouch for.
        self.outcome = errno.ENODATA

    def _root_fd(self) -> int:
        entries = self.arena.inode_entries()
        _close_opened(entries)      # the root keeps its own fd, never a file handle
        for e in entries:
            if e.nodeid == devstate.ROOT_NODEID:
                return e.fd
        raise OSError(errno.ENOENT, "the share's root is not in the inode table")

    def locator(self) -> Locator:
        if self._locator is None:
            self._locator = Locator(self.proc_fd, self._root_fd())
        return self._locator

    def take(self) -> bytes:
        """The encoded state, now (the answer to STATE_SAVE waits for it)."""
        counters = {f"requests.q{q}": n
                    for q, n in enumerate(self.arena.counters.snapshot()) if n}
        state = collect(self.arena, self.session.started, self.session.minor,
                        self.session.flags, MAX_WRITE, MAX_PAGES, self.options, self.locator(),
                        counters)
        if self.options.migration_state_format == "virtiofsd":
            return rsstate.encode(state)
        return devstate.encode(state)

    def decode(self, data: bytes) -> DeviceState:
        """pyvirtiofsd's own state, or the Rust virtiofsd's (told apart by the first byte).
        virtiofsd's holds no FUSE session: the one virtiofsd serves a Linux guest is taken,
        with this daemon's options where virtiofsd's state does not say."""
        if not rsstate.is_rust_state(data):
            return devstate.decode(data)
        o = self.options
        template = rsstate.session_template(
            fa.KERNEL_MINOR_VERSION, readdirplus=o.readdirplus, killpriv_v2=o.killpriv_v2,
            security_label=o.security_label, options=session_options(o))
        return rsstate.decode(data, template)

    def save(self, fd: int) -> None:
        """Take the state, write it to the front-end's pipe end and close that (EOF ends the
        state; a state that cannot be taken is an empty one, and STATE_CHECK says why)."""
        try:
            data = self.take()
        except (StateError, MigrationError, OSError) as e:
            self.outcome = getattr(e, "errno", None) or errno.EINVAL
            log.error("device state cannot be taken: %s", getattr(e, "strerror", None) or e)
            os.close(fd)
            return
        self.send(fd, data)

    def send(self, fd: int, data: bytes) -> None:
        """Write the state to the front-end's pipe end and close it (EOF ends the state)."""
        try:
            write_all(fd, data)
            self.outcome = 0
            log.info("device state saved: %d bytes", len(data))
        except OSError as e:
            self.outcome = e.errno or errno.EIO
            log.error("device state could not be sent: %s", e.strerror or e)
        finally:
            os.close(fd)

    def receive(self, fd: int) -> None:
        """Read a state to EOF, check it whole, apply it; one line when it is refused."""
        try:
            data = read_all(fd)
            state = self.decode(data)
            lost = apply(state, self.arena, self.options, self.proc_fd, self._root_fd(),
                         self.mnt_id_of, self.session.start, self.mount_fd,
                         self.supported_flags)
            for name, n in state.counters.items():
                if name.startswith("requests.q") and name[10:].isdigit():
                    self.arena.counters.add(int(name[10:]), n)
            self.outcome = 0
            log.info("device state loaded: %d inodes (%d invalid), %d handles",
                     len(state.inodes), lost, len(state.handles))
        except (StateError, MigrationError) as e:
            self.outcome = errno.EINVAL
            log.error("device state refused: %s", e)
        except OSError as e:
            self.outcome = e.errno or errno.EIO
            log.error("device state refused: %s", e.strerror or e)
        finally:
            os.close(fd)

    def prepare(self) -> None:
        n = prepare(self.arena, self.locator())
        log.info("pre-migration pass: %d inodes located", n)
