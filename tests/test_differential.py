"""Differential tests: generated FUSE request sequences against pyvirtiofsd and the Rust virtiofsd.

A hypothesis state machine plays a guest kernel: it walks paths with LOOKUP (caching what it
found, as the dentry cache does), creates, renames, links and removes entries, opens files and
directories, reads, writes, truncates, fallocates, seeks for data and holes, copies ranges, sets
attributes and xattrs -- as root or as one of a few unprivileged users, with modes drawn from a
small set so that permission bits matter.  Every request goes to both daemons; the replies must
agree (errno; attributes modulo inode numbers and times; data; listings as sets) and after each
example the two directories must hold the same tree (tests/differential.py).

Like the kernel, the machine never sends what default_permissions would refuse, never OPENs a
FIFO or symlink, and drops set-id bits with a SETATTR before an unprivileged write.  Where the
daemons are meant to differ it reacts to each reply as the kernel would (ENOSYS for
COPY_FILE_RANGE_64 -> COPY_FILE_RANGE) and names the row of docs/differences.md.

CI runs a fixed, derandomised set of examples.  A longer, random run:
    DIFF_EXAMPLES=2000 .venv/bin/pytest tests/test_differential.py
(DIFF_STEPS sets the steps per example, default 50.)
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    multiple,
    rule,
    run_state_machine_as_test,
)

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.fuse_abi import Opcode
from tests.differential import (
    KNOWN_DIFFERENCES,
    ROOT,
    SIDES,
    Cred,
    DaemonPair,
    Divergence,
    Handle,
    NodeMap,
    R,
    W,
    X,
    compare_trees,
    err_name,
    killed_mode,
    kills_privs,
    may,
    mismatch,
    norm_attr_out,
    norm_entry,
    norm_init,
    norm_statfs,
    owner_or_root,
    seed_tree,
)
from tests.frontend import DEFAULT_INIT_FLAGS, DaemonGone, FuseReply, ReplyTimeout

DOCS = Path(__file__).resolve().parent.parent / "docs" / "differences.md"
LONG_RUN = "DIFF_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("DIFF_EXAMPLES", "150"))
STEPS = int(os.environ.get("DIFF_STEPS", "50"))

pytestmark = pytest.mark.skipif(not DaemonPair.available(),
                                reason="needs root and the Rust virtiofsd anchor")

# --- what the generator draws from

NAMES = ("a", "b", "c", "d")
# Now and then a name of NAME_MAX bytes, or one with a newline and a byte that is not UTF-8.
ODD_NAMES = ("L" * 255, "odd \n\udcff")
PATHS = st.lists(st.sampled_from(NAMES * 4 + ODD_NAMES), min_size=1, max_size=2).map(tuple)
# 1003 reaches what belongs to group 1000 only through a supplementary group.
USERS = (Cred(1000, 1000), Cred(1001, 1000), Cred(1002, 1002), Cred(1003, 1003, (1000,)))
CREDS = st.sampled_from((ROOT, ROOT, ROOT, *USERS))
FILE_MODES = st.sampled_from((0o644, 0o600, 0o666, 0o640, 0o444, 0o000, 0o755, 0o664, 0o777,
                              0o4755, 0o2775, 0o6777, 0o4666))
DIR_MODES = st.sampled_from((0o755, 0o700, 0o777, 0o775, 0o750, 0o555, 0o2777, 0o711,
                             0o1777, 0o3775))
UMASKS = st.sampled_from((0, 0, 0o022, 0o077, 0o002))
OFFSETS = st.one_of(st.sampled_from((0, 1, 511, 4095, 4096, 8191, 65536, 1 << 20)),
                    st.integers(0, 70000))
LENGTHS = st.one_of(st.sampled_from((0, 1, 4096, 65536)), st.integers(0, 20000))
DATA = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.tuples(st.integers(0, 255), st.integers(1, 20000)).map(lambda t: bytes([t[0]]) * t[1]))
XATTR_NAMES = st.sampled_from((b"user.a", b"user.b", b"user.longer.name", b"trusted.t",
                               b"security.x"))
XATTR_VALUES = st.one_of(st.binary(max_size=40), st.sampled_from((b"", b"x" * 300)))
OPEN_FLAGS = st.sampled_from((os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_TRUNC,
                              os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND,
                              os.O_RDWR | os.O_APPEND, os.O_RDWR | os.O_DIRECT,
                              os.O_RDONLY | os.O_NOATIME, os.O_WRONLY | os.O_SYNC))
CREATE_FLAGS = st.sampled_from((os.O_RDWR | os.O_CREAT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                os.O_WRONLY | os.O_CREAT | os.O_APPEND))
SYMLINK_TARGETS = st.sampled_from(("a", "../b", "d/a", "/etc/passwd", "c" * 200, ".",
                                   "t" * 4095, "dir/"))
FALLOC_MODES = st.sampled_from((0, 1, 3, 0x10, 0x11))   # KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE
RENAME_FLAGS = st.sampled_from((None, None, 0, fa.RENAME_NOREPLACE, fa.RENAME_EXCHANGE,
                                fa.RENAME_NOREPLACE | fa.RENAME_EXCHANGE, fa.RENAME_WHITEOUT))
O_DIR = os.O_RDONLY | os.O_DIRECTORY

_ENTRY_OPS = frozenset({Opcode.LOOKUP, Opcode.MKDIR, Opcode.MKNOD, Opcode.SYMLINK, Opcode.LINK})


def _z(name: str | bytes) -> bytes:
    return os.fsencode(name) + b"\0"


class NodeRef(NamedTuple):
    """A nodeid pair the machine holds on to; the path it had may be gone or reused since."""

    path: tuple[str, ...]
    nodes: tuple[int, int]
    kind: int               # S_IFMT at lookup time: an inode never changes type

    def __repr__(self) -> str:
        return f"NodeRef({'/'.join(self.path)!r})"


class DiffMachine(RuleBasedStateMachine):
    handles = Bundle("handles")
    dirhandles = Bundle("dirhandles")
    nodes = Bundle("nodes")

    def __init__(self, pair: DaemonPair) -> None:
        super().__init__()
        self.pair = pair
        pair.ensure_alive()
        self.map = NodeMap()
        self.lookups = (Counter(), Counter())
        self.cache: dict[tuple[str, ...], tuple[int, int]] = {}
        self.open: list[Handle] = []
        self.name = pair.new_example()
        self.hosts = [side.share / self.name for side in pair.sides]
        if pair.readonly:
            # Nothing can be created through the daemons: both trees are made on the host.
            for host in self.hosts:
                seed_tree(host)
            root = self.entry(f"LOOKUP {self.name}", *pair.both(
                lambda i, s: (Opcode.LOOKUP, fa.ROOT_ID, _z(self.name), None)))
        else:
            root = self.entry(f"MKDIR {self.name}", *pair.both(
                lambda i, s: (Opcode.MKDIR, fa.ROOT_ID,
                              fa.MKDIR_IN.pack(0o777, 0) + _z(self.name), None)))
        if root is None:
            raise Divergence("could not make the example directory on either daemon")
        self.root = root

    # -- comparing replies

    def same(self, what: str, rp: FuseReply, rr: FuseReply,
             known: dict[tuple[int, int], str] | None = None) -> bool:
        """True when both succeeded; equal errors are fine; different errors diverge unless
        `known` maps the pair (pyvirtiofsd's, virtiofsd's) to a KNOWN_DIFFERENCES key."""
        if rp.error != rr.error:
            key = (known or {}).get((rp.error, rr.error))
            if key is None:
                raise mismatch(f"{what}: errno", err_name(rp.error), err_name(rr.error))
            assert key in KNOWN_DIFFERENCES
            self.pair.differences[key] += 1
            return False
        return rp.error == 0

    def _bodies(self, what: str, rp: FuseReply, rr: FuseReply, size: int) -> None:
        for side, r in zip(SIDES, (rp, rr), strict=True):
            if len(r.body) < size:
                raise Divergence(f"{what}: {side} replied {len(r.body)} bytes, {size} expected")

    def count(self, nodes: tuple[int, int]) -> None:
        for counter, n in zip(self.lookups, nodes, strict=True):
            counter[n] += 1

    def entry_pair(self, what: str, ep: fa.EntryOut, er: fa.EntryOut) -> tuple[int, int] | None:
        self.map.pair(ep.nodeid, er.nodeid, what)
        if norm_entry(ep) != norm_entry(er):
            raise mismatch(what, norm_entry(ep), norm_entry(er))
        if ep.nodeid == 0:
            return None
        nodes = (ep.nodeid, er.nodeid)
        self.count(nodes)
        return nodes

    def entry(self, what: str, rp: FuseReply, rr: FuseReply,
              known: dict[tuple[int, int], str] | None = None) -> tuple[int, int] | None:
        if not self.same(what, rp, rr, known):
            return None
        self._bodies(what, rp, rr, fa.ENTRY_OUT.size)
        return self.entry_pair(what, fa.EntryOut.unpack(rp.body), fa.EntryOut.unpack(rr.body))

    def attr(self, what: str, rp: FuseReply, rr: FuseReply) -> None:
        if self.same(what, rp, rr):
            self._bodies(what, rp, rr, fa.ATTR_OUT.size)
            a, b = fa.AttrOut.unpack(rp.body), fa.AttrOut.unpack(rr.body)
            if norm_attr_out(a) != norm_attr_out(b):
                raise mismatch(what, norm_attr_out(a), norm_attr_out(b))

    def data(self, what: str, rp: FuseReply, rr: FuseReply) -> bool:
        if self.same(what, rp, rr):
            if rp.body != rr.body:
                raise mismatch(what, _short(rp.body), _short(rr.body))
            return True
        return False

    def send(self, opcode: int, nodes: tuple[int, int], body: bytes | list[bytes] = b"",
             cred: Cred = ROOT, out_size: int | None = None,
             ext: bytes = b"") -> tuple[FuseReply, FuseReply]:
        return self.pair.both(lambda i, s: (opcode, nodes[i], body, out_size), cred, ext)

    def create_ext(self, parent: tuple[str, ...], cred: Cred) -> bytes:
        """FUSE_EXT_GROUPS the kernel adds to a request that creates an inode: the parent's
        group, when the caller is in it through a supplementary group (CREATE_SUPP_GROUP)."""
        if not self.pair.sides[0].client.flags & fa.InitFlag.CREATE_SUPP_GROUP:
            return b""
        st = self.hstat(parent)
        if st is None or st.st_gid == cred.gid or st.st_gid not in cred.groups:
            return b""
        return fa.pack_supp_groups([st.st_gid])

    def send_fh(self, opcode: int, h: Handle, pack, cred: Cred = ROOT,
                out_size: int | None = None, extra=b"") -> tuple[FuseReply, FuseReply]:
        """A request whose body names the handle: pack(fh) builds it per daemon."""
        return self.pair.both(lambda i, s: (opcode, h.nodes[i], [pack(h.fhs[i]), extra]
                                            if extra else pack(h.fhs[i]), out_size), cred)

    # -- the host side (the model's view of the tree is pyvirtiofsd's directory)

    def host(self, path: tuple[str, ...]) -> str:
        return os.path.join(self.hosts[0], *path)

    def hstat(self, path: tuple[str, ...]) -> os.stat_result | None:
        try:
            return os.lstat(self.host(path))
        except OSError:
            return None

    def forget_paths(self) -> None:
        """Namespace changed: the next access walks again (the kernel would revalidate)."""
        self.cache.clear()

    # -- walking paths as the kernel does

    def lookup_pair(self, parent: tuple[int, int], path: tuple[str, ...],
                    cred: Cred) -> tuple[int, int] | None:
        name = _z(path[-1])
        known = None
        nodes = self.entry(f"LOOKUP {'/'.join(path)}", *self.send(Opcode.LOOKUP, parent, name,
                                                                  cred), known)
        if nodes is not None:
            self.cache[path] = nodes
        return nodes

    def searchable(self, path: tuple[str, ...], cred: Cred) -> bool:
        """May `cred` look up names in the directory at `path` (kernel-side check)?  A walk
        through a non-directory ends in the guest's VFS (ENOTDIR) for everyone."""
        st = self.hstat(path)
        return st is not None and stat.S_ISDIR(st.st_mode) and may(cred, st, X)

    def resolve(self, path: tuple[str, ...], cred: Cred) -> tuple[int, int] | None:
        node = self.root
        for i in range(len(path)):
            prefix = path[:i + 1]
            if not self.searchable(path[:i], cred):
                return None
            cached = self.cache.get(prefix)
            if cached is None:
                cached = self.lookup_pair(node, prefix, cred)
                if cached is None:
                    return None
            node = cached
        return node

    def parent_for_change(self, path: tuple[str, ...], cred: Cred) -> tuple[int, int] | None:
        """The parent of `path` if it is a directory `cred` may add or remove names in."""
        parent = self.resolve(path[:-1], cred)
        if parent is None:
            return None
        st = self.hstat(path[:-1])
        if st is None or not stat.S_ISDIR(st.st_mode) or (
                cred != ROOT and not may(cred, st, W | X)):
            return None
        return parent

    def unsticky(self, path: tuple[str, ...], cred: Cred) -> bool:
        """check_sticky(): in a sticky directory only the owner of an entry or of the directory
        may remove or replace it."""
        d, e = self.hstat(path[:-1]), self.hstat(path)
        return (cred == ROOT or d is None or e is None or not d.st_mode & stat.S_ISVTX
                or cred.uid in (d.st_uid, e.st_uid))

    def target(self, t, cred: Cred) -> tuple[tuple[int, int], int, os.stat_result | None] | None:
        """(nodes, S_IFMT, host stat or None) of a path or a held node (None if forgotten)."""
        if isinstance(t, NodeRef):
            return (t.nodes, t.kind, None) if self.map.paired(*t.nodes) else None
        nodes = self.resolve(t, cred)
        if nodes is None:
            return None
        st = self.hstat(t)
        if st is None:
            return None
        return nodes, stat.S_IFMT(st.st_mode), st

    # -- setup

    @initialize(target=handles, populate=st.booleans())
    def populate(self, populate: bool):
        """Start most examples from a few entries and an open file, so rules find something."""
        if not populate:
            return multiple()
        if self.pair.readonly:
            h = self._open(("a",), os.O_RDONLY, ROOT)      # seed_tree() made the rest
            return h if h is not None else multiple()
        self.mkdir(("d",), 0o755, 0, ROOT)
        self.mknod(("d", "b"), "reg", 0o644, 0, ROOT)
        self.symlink(("c",), "d/b", ROOT)
        self.mkdir(("b",), 0o777, 0, ROOT)
        h = self._create(("a",), 0o666, 0, os.O_RDWR | os.O_CREAT, ROOT)
        if h is None:
            return multiple()
        self.write(h, 4096, b"populated" * 100)
        # Every run lists a directory both ways, whatever the rules draw later.
        for d in self.opendir((), ROOT).values:
            self.readdir(d, False, 4096)
            self.readdir(d, True, 4096)
            self._release(d)
        return h

    # -- names and inodes

    @rule(path=PATHS, cred=CREDS)
    def lookup(self, path, cred) -> None:
        parent = self.resolve(path[:-1], cred)
        if parent is not None and self.searchable(path[:-1], cred):
            self.lookup_pair(parent, path, cred)

    @rule(target=nodes, path=PATHS)
    def hold(self, path):
        nodes = self.resolve(path, ROOT)
        st = self.hstat(path)
        if nodes is None or st is None:
            return multiple()
        return NodeRef(path, nodes, stat.S_IFMT(st.st_mode))

    @rule(t=nodes)
    def forget(self, t) -> None:
        """FORGET every lookup of a held node; a later LOOKUP may get a new nodeid."""
        if not self.map.paired(*t.nodes) or t.nodes == self.root or any(
                h.nodes == t.nodes for h in self.open):
            return
        counts = [c[n] for c, n in zip(self.lookups, t.nodes, strict=True)]
        if not counts[0]:
            return
        for i, side in enumerate(self.pair.sides):
            side.client.forget(t.nodes[i], counts[i])
            self.lookups[i][t.nodes[i]] = 0
        self.map.drop(*t.nodes)
        self.pair.forgotten(t.nodes)
        self.cache = {p: n for p, n in self.cache.items() if n != t.nodes}

    @rule(t=st.one_of(PATHS, nodes), cred=CREDS)
    def getattr(self, t, cred) -> None:
        found = self.target(t, cred)
        if found:
            self.attr(f"GETATTR {t}", *self.send(Opcode.GETATTR, found[0],
                                                 fa.GETATTR_IN.pack(0, 0), cred))

    @rule(path=PATHS, mode=DIR_MODES, umask=UMASKS, cred=CREDS)
    def mkdir(self, path, mode, umask, cred) -> None:
        parent = self.parent_for_change(path, cred)
        if parent is None:
            return
        body = fa.MKDIR_IN.pack(mode & ~umask, umask) + _z(path[-1])
        nodes = self.entry(f"MKDIR {path} {mode:o}", *self.send(
            Opcode.MKDIR, parent, body, cred, ext=self.create_ext(path[:-1], cred)))
        if nodes:
            self.cache[path] = nodes

    @rule(path=PATHS, kind=st.sampled_from(("fifo", "reg", "chr", "sock", "blk")),
          mode=FILE_MODES, umask=UMASKS, cred=CREDS)
    def mknod(self, path, kind, mode, umask, cred) -> None:
        if kind in ("chr", "blk") and cred != ROOT:
            return                       # CAP_MKNOD, checked by the guest kernel
        parent = self.parent_for_change(path, cred)
        if parent is None:
            return
        fmt = {"fifo": stat.S_IFIFO, "reg": stat.S_IFREG, "chr": stat.S_IFCHR,
               "sock": stat.S_IFSOCK, "blk": stat.S_IFBLK}[kind]
        rdev = {"chr": os.makedev(1, 3), "blk": os.makedev(7, 200)}.get(kind, 0)
        body = fa.MKNOD_IN.pack(fmt | (mode & ~umask), rdev, umask) + _z(path[-1])
        nodes = self.entry(f"MKNOD {path} {kind} {mode:o}", *self.send(
            Opcode.MKNOD, parent, body, cred, ext=self.create_ext(path[:-1], cred)))
        if nodes:
            self.cache[path] = nodes

    @rule(path=PATHS, dest=SYMLINK_TARGETS, cred=CREDS)
    def symlink(self, path, dest, cred) -> None:
        parent = self.parent_for_change(path, cred)
        if parent is None:
            return
        nodes = self.entry(f"SYMLINK {path} -> {dest}", *self.send(
            Opcode.SYMLINK, parent, _z(path[-1]) + _z(dest), cred,
            ext=self.create_ext(path[:-1], cred)))
        if nodes:
            self.cache[path] = nodes

    @rule(src=PATHS, dst=PATHS, cred=CREDS)
    def link(self, src, dst, cred) -> None:
        found = self.target(src, cred)
        if found is None:
            return
        nodes, kind, st = found
        if kind == stat.S_IFDIR:
            return                       # EPERM in the guest's VFS
        if cred != ROOT and st.st_uid != cred.uid and not (
                kind == stat.S_IFREG and not kills_privs(st.st_mode)
                and may(cred, st, R | W)):
            return                       # fs.protected_hardlinks in the guest
        parent = self.parent_for_change(dst, cred)
        if parent is None:
            return
        rp, rr = self.pair.both(lambda i, s: (Opcode.LINK, parent[i], [
            fa.LINK_IN.pack(nodes[i]), _z(dst[-1])], None), cred)
        linked = self.entry(f"LINK {src} -> {dst}", rp, rr)
        if linked:
            self.cache[dst] = linked

    @rule(path=PATHS, cred=CREDS, directory=st.booleans())
    def remove(self, path, cred, directory) -> None:
        parent = self.parent_for_change(path, cred)
        if parent is None or not self.unsticky(path, cred):
            return
        op = Opcode.RMDIR if directory else Opcode.UNLINK
        self.same(f"{op.name} {path}", *self.send(op, parent, _z(path[-1]), cred))
        self.forget_paths()

    @rule(src=PATHS, dst=PATHS, flags=RENAME_FLAGS, cred=CREDS)
    def rename(self, src, dst, flags, cred) -> None:
        if flags == fa.RENAME_WHITEOUT and cred != ROOT:
            return                       # CAP_MKNOD
        old = self.parent_for_change(src, cred)
        new = self.parent_for_change(dst, cred)
        if old is None or new is None or not self.unsticky(src, cred) or not self.unsticky(
                dst, cred):
            return
        st = self.hstat(src)
        if cred != ROOT and st is not None and src[:-1] != dst[:-1]:
            # Moving a directory rewrites its '..': the guest asks for write permission on it
            # (and on the target too for an exchange).
            if stat.S_ISDIR(st.st_mode) and not may(cred, st, W):
                return
            tst = self.hstat(dst)
            if (flags or 0) & fa.RENAME_EXCHANGE and tst is not None and stat.S_ISDIR(
                    tst.st_mode) and not may(cred, tst, W):
                return
        names = _z(src[-1]) + _z(dst[-1])
        if flags is None:
            op = Opcode.RENAME
            rp, rr = self.pair.both(lambda i, s: (op, old[i], fa.RENAME_IN.pack(new[i]) + names,
                                                  None), cred)
        else:
            op = Opcode.RENAME2
            rp, rr = self.pair.both(lambda i, s: (op, old[i], fa.RENAME2_IN.pack(new[i], flags)
                                                  + names, None), cred)
        self.same(f"{op.name} {src} -> {dst} flags={flags}", rp, rr)
        self.forget_paths()

    # -- attributes

    def setattr(self, what: str, nodes: tuple[int, int], cred: Cred, h: Handle | None = None,
                **kw) -> tuple[FuseReply, FuseReply]:
        valid = kw.pop("valid", 0)
        v = fa.SetattrValid
        for key, flag in (("mode", v.MODE), ("uid", v.UID), ("gid", v.GID), ("size", v.SIZE),
                          ("atime", v.ATIME), ("mtime", v.MTIME)):
            if key in kw:
                valid |= flag
        if h is not None:
            valid |= v.FH

        def build(i, side):
            fields = dict(kw)
            if h is not None:
                fields["fh"] = h.fhs[i]
            return Opcode.SETATTR, nodes[i], fa.SetattrIn(valid, **fields).pack(), None
        replies = self.pair.both(build, cred)
        self.attr(what, *replies)
        return replies

    @rule(t=st.one_of(PATHS, nodes), mode=st.one_of(FILE_MODES, DIR_MODES), cred=CREDS)
    def chmod(self, t, mode, cred) -> None:
        found = self.target(t, cred if not isinstance(t, NodeRef) else ROOT)
        if found is None:
            return
        nodes, kind, st = found
        if kind == stat.S_IFLNK:
            return                       # chmod follows links; lchmod is EOPNOTSUPP
        if cred != ROOT:
            if st is None or not owner_or_root(cred, st):
                return
            if not cred.in_group(st.st_gid):
                mode &= ~stat.S_ISGID    # setattr_prepare() for a non-member
        self.setattr(f"SETATTR {t} mode={mode:o}", nodes, cred, mode=kind | mode)

    @rule(t=st.one_of(PATHS, nodes), uid=st.sampled_from((0, 1000, 1001, 1002, 1003, None)),
          gid=st.sampled_from((0, 1000, 1002, 1003, None)), cred=CREDS)
    def chown(self, t, uid, gid, cred) -> None:
        if uid is None and gid is None:
            return
        found = self.target(t, cred if not isinstance(t, NodeRef) else ROOT)
        if found is None:
            return
        nodes, _kind, st = found
        # chown is for root; the owner may only change the group to its own.
        if cred != ROOT and (st is None or st.st_uid != cred.uid
                             or uid not in (None, st.st_uid)
                             or (gid is not None and not cred.in_group(gid))):
            return
        kw = {}
        if uid is not None:
            kw["uid"] = uid
        if gid is not None:
            kw["gid"] = gid
        self.setattr(f"SETATTR {t} chown {uid}:{gid}", nodes, cred, **kw)

    @rule(path=PATHS, size=OFFSETS, cred=CREDS)
    def truncate(self, path, size, cred) -> None:
        found = self.target(path, cred)
        if found is None:
            return
        nodes, kind, st = found
        if kind != stat.S_IFREG or (cred != ROOT and not may(cred, st, W)):
            return
        kw = {"size": size}
        if cred != ROOT and kills_privs(st.st_mode):
            kw["mode"] = killed_mode(st.st_mode)    # fuse_setattr() without HANDLE_KILLPRIV
        self.setattr(f"SETATTR {path} size={size}", nodes, cred, **kw)

    @rule(t=st.one_of(PATHS, nodes), how=st.sampled_from(("now", "set", "atime")), cred=CREDS)
    def utimes(self, t, how, cred) -> None:
        found = self.target(t, cred if not isinstance(t, NodeRef) else ROOT)
        if found is None:
            return
        nodes, _kind, st = found
        if cred != ROOT and (st is None or not (owner_or_root(cred, st) or (
                how == "now" and may(cred, st, W)))):
            return
        v = fa.SetattrValid
        if how == "now":
            self.setattr(f"SETATTR {t} times=now", nodes, cred,
                         valid=v.ATIME | v.MTIME | v.ATIME_NOW | v.MTIME_NOW)
        elif how == "set":
            # Times are compared only here, where both must be exactly what was asked.
            replies = self.setattr(f"SETATTR {t} times=set", nodes, cred, atime=1_000_000_000,
                                   atimensec=5, mtime=1_234_567_890, mtimensec=999_999_999)
            for side, r in zip(SIDES, replies, strict=True):
                a = fa.AttrOut.unpack(r.body).attr if r.error == 0 else None
                if a and (a.atime, a.atimensec, a.mtime, a.mtimensec) != (
                        1_000_000_000, 5, 1_234_567_890, 999_999_999):
                    raise Divergence(f"SETATTR {t} times=set: {side} reports {a}")
        else:
            self.setattr(f"SETATTR {t} atime", nodes, cred, atime=86400)

    # -- files

    def _opened(self, what: str, rp: FuseReply, rr: FuseReply, nodes: tuple[int, int],
                flags: int, directory: bool = False, cred: Cred = ROOT,
                offset: int = 0) -> Handle | None:
        if not self.same(what, rp, rr):
            return None
        self._bodies(what, rp, rr, offset + fa.OPEN_OUT.size)
        op, orr = fa.OpenOut.unpack(rp.body, offset), fa.OpenOut.unpack(rr.body, offset)
        if op.open_flags != orr.open_flags:
            raise mismatch(f"{what}: open flags", hex(op.open_flags), hex(orr.open_flags))
        h = Handle(what, nodes, (op.fh, orr.fh), flags, directory, cred)
        self.open.append(h)
        return h

    @rule(target=handles, path=PATHS, mode=FILE_MODES, umask=UMASKS, flags=CREATE_FLAGS,
          cred=CREDS)
    def create(self, path, mode, umask, flags, cred):
        h = self._create(path, mode, umask, flags, cred)
        return multiple(h) if h else multiple()

    @rule(target=handles, path=PATHS, mode=FILE_MODES, flags=CREATE_FLAGS)
    def create_racing(self, path, mode, flags):
        """CREATE of a name the guest believed absent while the host made it meanwhile."""
        st_ = self.hstat(path)
        if st_ is not None and not (stat.S_ISREG(st_.st_mode) or stat.S_ISDIR(st_.st_mode)
                                    or stat.S_ISLNK(st_.st_mode)):
            return multiple()            # opening a FIFO for writing would block a daemon
        h = self._create(path, mode, 0, flags, ROOT, racing=True)
        return multiple(h) if h else multiple()

    def _create(self, path, mode, umask, flags, cred, racing: bool = False) -> Handle | None:
        if not racing and self.hstat(path) is not None:
            # The guest's dentry cache knows the entry: O_EXCL fails there, else it OPENs.
            if flags & os.O_EXCL:
                return None
            return self._open(path, flags & ~os.O_CREAT, cred)
        parent = self.parent_for_change(path, cred)
        if parent is None:
            return None
        body = fa.CREATE_IN.pack(flags, stat.S_IFREG | (mode & ~umask), umask, 0) + _z(path[-1])
        what = f"CREATE {path} {mode:o} flags={flags:#o}"
        rp, rr = self.send(Opcode.CREATE, parent, body, cred,
                           ext=self.create_ext(path[:-1], cred))
        if not self.same(what, rp, rr, {(errno.ELOOP, errno.EBADF): "open-special"}):
            return None
        self._bodies(what, rp, rr, fa.ENTRY_OUT.size + fa.OPEN_OUT.size)
        nodes = self.entry_pair(what, fa.EntryOut.unpack(rp.body), fa.EntryOut.unpack(rr.body))
        self.cache[path] = nodes
        return self._opened(what, rp, rr, nodes, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC),
                            cred=cred, offset=fa.ENTRY_OUT.size)

    @rule(target=handles, path=PATHS, flags=OPEN_FLAGS, cred=CREDS)
    def open_file(self, path, flags, cred):
        h = self._open(path, flags, cred)
        return multiple(h) if h else multiple()

    def _open(self, path, flags, cred) -> Handle | None:
        found = self.target(path, cred)
        if found is None:
            return None
        nodes, kind, st = found
        if kind != stat.S_IFREG:
            return None                  # the guest opens FIFOs and devices itself
        need = {os.O_RDONLY: R, os.O_WRONLY: W, os.O_RDWR: R | W}[flags & os.O_ACCMODE]
        if cred != ROOT and (not may(cred, st, need)
                             or (flags & os.O_TRUNC and kills_privs(st.st_mode))
                             or (flags & os.O_NOATIME and st.st_uid != cred.uid)):
            return None
        what = f"OPEN {path} flags={flags:#o}"
        return self._opened(what, *self.send(Opcode.OPEN, nodes, fa.OPEN_IN.pack(flags, 0), cred),
                            nodes, flags & ~os.O_TRUNC, cred=cred)

    @rule(h=handles, offset=OFFSETS, size=LENGTHS)
    def read(self, h, offset, size) -> None:
        if h.released or not h.readable:
            return
        self.data(f"READ {h} @{offset}+{size}", *self.send_fh(
            Opcode.READ, h, lambda fh: fa.ReadIn(fh, offset, size, 0, 0, h.flags).pack(),
            h.cred, out_size=size))

    @rule(h=handles, offset=OFFSETS, data=DATA)
    def write(self, h, offset, data) -> None:
        if h.released or not h.writable:
            return
        mode = self.fresh_mode(h)
        if mode is None:
            return
        if h.cred != ROOT and kills_privs(mode):
            # Without HANDLE_KILLPRIV the guest drops the set-id bits itself, as the writer,
            # before the write (fuse_setattr() from file_remove_privs()).
            self.setattr(f"SETATTR {h} drop set-id before WRITE", h.nodes, h.cred,
                         mode=killed_mode(mode))
        if h.flags & os.O_APPEND:
            offset = self.fresh_size(h)
        rp, rr = self.send_fh(Opcode.WRITE, h, lambda fh: fa.WriteIn(
            fh, offset, len(data), 0, 0, h.flags).pack(), h.cred, extra=data)
        what = f"WRITE {h} @{offset}+{len(data)}"
        if self.same(what, rp, rr) and rp.body != rr.body:
            raise mismatch(what, rp.body, rr.body)

    def _fresh_attr(self, h: Handle) -> fa.Attr | None:
        """GETATTR, as the kernel refreshes attributes before it acts on them."""
        rp, rr = self.send(Opcode.GETATTR, h.nodes, fa.GETATTR_IN.pack(0, 0), h.cred)
        self.attr(f"GETATTR {h}", rp, rr)
        return fa.AttrOut.unpack(rp.body).attr if rp.error == 0 else None

    def fresh_mode(self, h: Handle) -> int | None:
        a = self._fresh_attr(h)
        return None if a is None else a.mode

    def fresh_size(self, h: Handle) -> int:
        a = self._fresh_attr(h)
        return 0 if a is None else a.size

    @rule(h=handles, size=OFFSETS)
    def ftruncate(self, h, size) -> None:
        if h.released or not h.writable:
            return
        mode = self.fresh_mode(h)
        if mode is None:
            return
        kw = {"size": size}
        if h.cred != ROOT and kills_privs(mode):
            kw["mode"] = killed_mode(mode)
        self.setattr(f"SETATTR {h} size={size} (fh)", h.nodes, h.cred, h=h, **kw)

    @rule(h=handles)
    def fgetattr(self, h) -> None:
        if not h.released:
            self.attr(f"GETATTR {h} (fh)", *self.send_fh(
                Opcode.GETATTR, h, lambda fh: fa.GETATTR_IN.pack(fa.GETATTR_FH, fh), h.cred))

    @rule(h=handles, mode=FILE_MODES, how=st.sampled_from((None, "now", "set")))
    def fsetattr(self, h, mode, how) -> None:
        """fchmod() or futimens() through an open file (FATTR_FH)."""
        if h.released:
            return
        a = self._fresh_attr(h)
        if a is None:
            return
        v = fa.SetattrValid
        owner = h.cred == ROOT or a.uid == h.cred.uid
        if how is None:
            if not owner:
                return
            if h.cred != ROOT and not h.cred.in_group(a.gid):
                mode &= ~stat.S_ISGID
            self.setattr(f"SETATTR {h} mode={mode:o} (fh)", h.nodes, h.cred, h=h,
                         mode=stat.S_IFREG | mode)
        elif how == "now":
            # may_setattr(): the owner, or write permission by the mode bits now -- not the
            # handle's open mode.
            as_stat = os.stat_result((a.mode, 0, 0, 0, a.uid, a.gid, 0, 0, 0, 0))
            if not owner and not may(h.cred, as_stat, W):
                return
            self.setattr(f"SETATTR {h} times=now (fh)", h.nodes, h.cred, h=h,
                         valid=v.ATIME | v.MTIME | v.ATIME_NOW | v.MTIME_NOW)
        elif owner:
            self.setattr(f"SETATTR {h} times=set (fh)", h.nodes, h.cred, h=h, mtime=7,
                         mtimensec=8)

    @rule(h=handles, mode=FALLOC_MODES, offset=OFFSETS, length=st.integers(1, 70000))
    def fallocate(self, h, mode, offset, length) -> None:
        if h.released or not h.writable:
            return
        self.same(f"FALLOCATE {h} mode={mode:#x} @{offset}+{length}", *self.send_fh(
            Opcode.FALLOCATE, h, lambda fh: fa.FALLOCATE_IN.pack(fh, offset, length, mode)))

    @rule(h=handles, offset=OFFSETS, whence=st.sampled_from((os.SEEK_DATA, os.SEEK_HOLE)))
    def lseek(self, h, offset, whence) -> None:
        if h.released:
            return
        self.data(f"LSEEK {h} {offset} whence={whence}", *self.send_fh(
            Opcode.LSEEK, h, lambda fh: fa.LSEEK_IN.pack(fh, offset, whence)))

    @rule(src=handles, dst=handles, off_in=OFFSETS, off_out=OFFSETS, length=LENGTHS)
    def copy_file_range(self, src, dst, off_in, off_out, length) -> None:
        if src.released or dst.released or not src.readable or not dst.writable:
            return
        if dst.flags & os.O_APPEND:
            return                       # EBADF in the guest's VFS
        if src.nodes == dst.nodes and off_in < off_out + length and off_out < off_in + length:
            return                       # overlapping ranges of one file: EINVAL in the guest

        def body(i: int) -> bytes:
            return fa.COPY_FILE_RANGE_IN.pack(src.fhs[i], off_in, dst.nodes[i], dst.fhs[i],
                                              off_out, length, 0)

        # The kernel asks for COPY_FILE_RANGE_64 until a daemon answers ENOSYS, then uses the
        # 32-bit request on that connection (KNOWN_DIFFERENCES['copy-file-range-64']).
        def op_for(side) -> int:
            return Opcode.COPY_FILE_RANGE if side.no_copy_range_64 else Opcode.COPY_FILE_RANGE_64

        def build(i, side):
            op = op_for(side)
            return op, src.nodes[i], body(i), None
        replies = list(self.pair.both(build))
        for i, side in enumerate(self.pair.sides):
            if replies[i].error == errno.ENOSYS and op_for(side) == Opcode.COPY_FILE_RANGE_64:
                side.no_copy_range_64 = True
                self.pair.differences["copy-file-range-64"] += 1
                replies[i] = self.pair.one(i, Opcode.COPY_FILE_RANGE, src.nodes[i], body(i))
        what = f"COPY_FILE_RANGE {src}@{off_in} -> {dst}@{off_out} +{length}"
        rp, rr = replies
        if self.same(what, rp, rr):
            # fuse_write_out (u32 + padding) and fuse_copy_file_range_out (u64) read alike.
            counts = [int.from_bytes(r.body[:8], "little") for r in replies]
            if counts[0] != counts[1]:
                raise mismatch(what, counts[0], counts[1])

    @rule(h=handles, datasync=st.booleans(), flush=st.booleans())
    def fsync(self, h, datasync, flush) -> None:
        if h.released:
            return
        if flush:
            self.same(f"FLUSH {h}", *self.send_fh(Opcode.FLUSH, h,
                                                  lambda fh: fa.FLUSH_IN.pack(fh, 0)))
        else:
            self.same(f"FSYNC {h}", *self.send_fh(
                Opcode.FSYNC, h, lambda fh: fa.FSYNC_IN.pack(fh, int(datasync))))

    @rule(h=consumes(handles))
    def release(self, h) -> None:
        self._release(h)

    def _release(self, h: Handle) -> None:
        if h.released:
            return
        h.released = True
        self.open.remove(h)
        op = Opcode.RELEASEDIR if h.directory else Opcode.RELEASE
        self.same(f"{op.name} {h}", *self.send_fh(
            op, h, lambda fh: fa.RELEASE_IN.pack(fh, h.flags, 0, 0)))

    @rule(t=st.one_of(PATHS, nodes))
    def readlink(self, t) -> None:
        found = self.target(t, ROOT)
        if found and found[1] == stat.S_IFLNK:
            self.data(f"READLINK {t}", *self.send(Opcode.READLINK, found[0], b"",
                                                  out_size=4096))

    # -- directories

    @rule(target=dirhandles, path=st.one_of(st.just(()), PATHS), cred=CREDS)
    def opendir(self, path, cred):
        found = self.target(path, cred)
        if found is None:
            return multiple()
        nodes, kind, st = found
        if kind != stat.S_IFDIR or (cred != ROOT and not may(cred, st, R)):
            return multiple()
        h = self._opened(f"OPENDIR {path}", *self.send(Opcode.OPENDIR, nodes,
                                                       fa.OPEN_IN.pack(O_DIR, 0), cred),
                         nodes, O_DIR, directory=True, cred=cred)
        return multiple(h) if h else multiple()

    @rule(h=dirhandles, plus=st.booleans(), size=st.sampled_from((4096, 300, 200)))
    def readdir(self, h, plus, size) -> None:
        """The whole listing from each daemon, page by page with its own cookies."""
        if h.released:
            return
        op = Opcode.READDIRPLUS if plus else Opcode.READDIR
        what = f"{op.name} {h} size={size}"
        results = []
        for i in range(2):
            entries, offset, error = [], 0, 0
            for _ in range(256):
                r = self.pair.one(i, op, h.nodes[i], fa.ReadIn(h.fhs[i], offset, size).pack(),
                                  out_size=size, cred=h.cred)
                if r.error:
                    error = r.error
                    break
                try:
                    batch = fa.unpack_direntplus(r.body) if plus else fa.unpack_dirents(r.body)
                except ValueError as e:
                    raise Divergence(f"{what}: {SIDES[i]} sent a malformed listing: {e}") from None
                if not batch:
                    break
                entries.extend(batch)
                offset = (batch[-1].dirent if plus else batch[-1]).off
            results.append((error, entries))
        (ep, lp), (er, lr) = results
        if plus and (ep, er) == (errno.EINVAL, 0):
            # virtiofsd ends the listing where an entry with its attributes does not fit
            # (KNOWN_DIFFERENCES['readdirplus-small-buffer']).
            self.pair.differences["readdirplus-small-buffer"] += 1
            return
        if ep != er:
            raise mismatch(f"{what}: errno", err_name(ep), err_name(er))
        if plus:
            self._count_plus(what, lp, lr)
        names = [sorted((x.dirent if plus else x)[2:4][::-1] for x in listing)
                 for listing in (lp, lr)]
        if names[0] != names[1]:
            raise mismatch(what, names[0], names[1])
        if plus:
            attrs = [sorted((x.dirent.name, norm_entry(x.entry)) for x in listing
                            if x.dirent.name not in (b".", b".."))
                     for listing in (lp, lr)]
            if attrs[0] != attrs[1]:
                raise mismatch(f"{what} attributes", attrs[0], attrs[1])

    def _count_plus(self, what: str, *listings) -> None:
        """READDIRPLUS counts a lookup for each entry it returns with a nodeid."""
        by_name = [{x.dirent.name: x.entry for x in b} for b in listings]
        for i, b in enumerate(by_name):
            for e in b.values():
                if e.nodeid:
                    self.lookups[i][e.nodeid] += 1
        for name in by_name[0].keys() & by_name[1].keys():
            self.map.pair(by_name[0][name].nodeid, by_name[1][name].nodeid, f"{what} {name!r}")

    @rule(h=consumes(dirhandles))
    def releasedir(self, h) -> None:
        self._release(h)

    @rule(h=dirhandles)
    def fsyncdir(self, h) -> None:
        if not h.released:
            self.same(f"FSYNCDIR {h}", *self.send_fh(Opcode.FSYNCDIR, h,
                                                     lambda fh: fa.FSYNC_IN.pack(fh, 0)))

    # -- xattrs, access, statfs

    def xattr_target(self, t, cred: Cred, name: bytes, mask: int):
        found = self.target(t, cred if not isinstance(t, NodeRef) else ROOT)
        if found is None:
            return None
        nodes, kind, st = found
        if cred != ROOT and (name.startswith(b"trusted.") or (
                name.startswith(b"security.") and mask & W)):
            return None                  # CAP_SYS_ADMIN
        if name.startswith(b"user."):
            # xattr_permission(): user.* only on files and directories (EPERM/ENODATA).
            if kind not in (stat.S_IFREG, stat.S_IFDIR):
                return None
            if cred != ROOT and (st is None or not may(cred, st, mask)):
                return None
            if (cred != ROOT and mask & W and st.st_mode & stat.S_ISVTX
                    and st.st_uid != cred.uid and kind == stat.S_IFDIR):
                return None              # a sticky directory's user.* are its owner's
        return nodes

    @rule(t=st.one_of(PATHS, nodes), name=XATTR_NAMES, value=XATTR_VALUES,
          flags=st.sampled_from((0, 0, 1, 2)), cred=CREDS)
    def setxattr(self, t, name, value, flags, cred) -> None:
        nodes = self.xattr_target(t, cred, name, W)
        if nodes is None:
            return
        # fuse_setxattr_in is 16 bytes only once SETXATTR_EXT was negotiated (neither daemon
        # takes it today; a body of the wrong layout panics virtiofsd 1.13).
        if self.pair.sides[0].client.flags & fa.InitFlag.SETXATTR_EXT:
            head = fa.SETXATTR_IN.pack(len(value), flags, 0)
        else:
            head = fa.SETXATTR_IN_COMPAT.pack(len(value), flags)
        body = head + _z(name) + value
        self.same(f"SETXATTR {t} {name!r}={_short(value)} flags={flags}",
                  *self.send(Opcode.SETXATTR, nodes, body, cred))

    @rule(t=st.one_of(PATHS, nodes), name=XATTR_NAMES, size=st.sampled_from((0, 4, 64, 4096)),
          cred=CREDS)
    def getxattr(self, t, name, size, cred) -> None:
        nodes = self.xattr_target(t, cred, name, R)
        if nodes is not None:
            self.data(f"GETXATTR {t} {name!r} size={size}", *self.send(
                Opcode.GETXATTR, nodes, fa.GETXATTR_IN.pack(size) + _z(name), cred,
                out_size=size or fa.GETXATTR_OUT.size))

    @rule(t=st.one_of(PATHS, nodes), size=st.sampled_from((0, 6, 4096)), cred=CREDS)
    def listxattr(self, t, size, cred) -> None:
        found = self.target(t, cred if not isinstance(t, NodeRef) else ROOT)
        if found is None:
            return
        what = f"LISTXATTR {t} size={size}"
        rp, rr = self.send(Opcode.LISTXATTR, found[0], fa.GETXATTR_IN.pack(size), cred,
                           out_size=size or fa.GETXATTR_OUT.size)
        if not self.same(what, rp, rr):
            return
        # The size alone (size 0), or the names, whose order is the host's.
        a, b = (sorted(r.body.split(b"\0")) if size else r.body for r in (rp, rr))
        if a != b:
            raise mismatch(what, a, b)

    @rule(t=st.one_of(PATHS, nodes), name=XATTR_NAMES, cred=CREDS)
    def removexattr(self, t, name, cred) -> None:
        nodes = self.xattr_target(t, cred, name, W)
        if nodes is not None:
            self.same(f"REMOVEXATTR {t} {name!r}", *self.send(Opcode.REMOVEXATTR, nodes,
                                                              _z(name), cred))

    @rule(t=st.one_of(PATHS, nodes), mask=st.integers(0, 7), cred=CREDS)
    def access(self, t, mask, cred) -> None:
        found = self.target(t, cred if not isinstance(t, NodeRef) else ROOT)
        if found:
            known = ({(0, errno.EACCES): "access-root-search"}
                     if cred == ROOT and found[1] == stat.S_IFDIR else None)
            self.same(f"ACCESS {t} mask={mask}", *self.send(
                Opcode.ACCESS, found[0], fa.ACCESS_IN.pack(mask), cred), known)

    @rule(t=st.one_of(st.just(()), PATHS))
    def statfs(self, t) -> None:
        found = self.target(t, ROOT)
        if not found:
            return
        rp, rr = self.send(Opcode.STATFS, found[0])
        if self.same(f"STATFS {t}", rp, rr):
            a, b = (norm_statfs(fa.Kstatfs.unpack(r.body)) for r in (rp, rr))
            if a != b:
                raise mismatch(f"STATFS {t}", a, b)

    # -- the end of an example

    def teardown(self) -> None:
        if not all(s.alive() for s in self.pair.sides):
            raise Divergence("a daemon died:\n" + self.pair.describe_death())
        for h in list(self.open):
            self._release(h)
        self.pair.forget_all(self.lookups)
        compare_trees(*self.hosts)


def _short(b: bytes) -> str:
    return repr(b) if len(b) <= 48 else f"{b[:40]!r}... ({len(b)} bytes)"


def _pair(*extra: str, init_flags: int = DEFAULT_INIT_FLAGS):
    p = DaemonPair(extra, init_flags=init_flags)
    p.start()
    yield p
    # Shown with -s or -rP: how much each opcode was exercised.
    print(f"\n{' '.join(extra)}: {p.examples} examples, {p.restarts} restarts; requests sent "
          "to each daemon: " + ", ".join(f"{k} {v}" for k, v in p.sent.most_common())
          + "; known differences met: " + (", ".join(f"{k} {v}" for k, v in
                                                   p.differences.most_common()) or "none"))
    p.close()


@pytest.fixture(scope="module")
def pair():
    yield from _pair("--xattr")


@pytest.fixture(scope="module")
def readonly_pair():
    yield from _pair("--xattr", "--readonly", "--cache=never")


def test_init_replies_agree(pair):
    py, rs = (s.init_out for s in pair.sides)
    assert py.minor == fa.KERNEL_MINOR_VERSION           # KNOWN_DIFFERENCES['init-minor']
    assert norm_init(py) == norm_init(rs)


# Every opcode the machine can send; a run that never sent one of them tested less than it says.
EXERCISED = {op.name for op in (
    Opcode.LOOKUP, Opcode.GETATTR, Opcode.SETATTR, Opcode.READLINK, Opcode.SYMLINK, Opcode.MKNOD,
    Opcode.MKDIR, Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2, Opcode.LINK,
    Opcode.OPEN, Opcode.CREATE, Opcode.READ, Opcode.WRITE, Opcode.STATFS, Opcode.RELEASE,
    Opcode.FSYNC, Opcode.FLUSH, Opcode.SETXATTR, Opcode.GETXATTR, Opcode.LISTXATTR,
    Opcode.REMOVEXATTR, Opcode.OPENDIR, Opcode.READDIR, Opcode.READDIRPLUS, Opcode.RELEASEDIR,
    Opcode.FSYNCDIR, Opcode.ACCESS, Opcode.FALLOCATE, Opcode.LSEEK,
    Opcode.COPY_FILE_RANGE_64)}


def test_generated_sequences(pair):
    run_state_machine_as_test(
        lambda: DiffMachine(pair),
        settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                          derandomize=not LONG_RUN, database=None, print_blob=LONG_RUN,
                          suppress_health_check=list(HealthCheck)))
    assert set(pair.sent) >= EXERCISED, f"never sent: {sorted(EXERCISED - set(pair.sent))}"


@pytest.fixture(scope="module")
def writeback_pair():
    yield from _pair("--xattr", "--writeback", "--cache=always")


def test_generated_sequences_writeback(writeback_pair):
    """Write-back caching and cache=always: other open flags and timeouts, O_WRONLY opened
    O_RDWR on the host (the guest reads pages of write-only files)."""
    run_state_machine_as_test(
        lambda: DiffMachine(writeback_pair),
        settings=settings(max_examples=max(1, EXAMPLES // 3), stateful_step_count=STEPS,
                          deadline=None, derandomize=not LONG_RUN, database=None,
                          print_blob=LONG_RUN, suppress_health_check=list(HealthCheck)))


def test_generated_sequences_readonly(readonly_pair):
    """The same machine on --readonly shares seeded on the host: reads agree, and every change
    fails alike (EROFS or whatever the daemons check first)."""
    run_state_machine_as_test(
        lambda: DiffMachine(readonly_pair),
        settings=settings(max_examples=max(1, EXAMPLES // 3), stateful_step_count=STEPS,
                          deadline=None, derandomize=not LONG_RUN, database=None,
                          print_blob=LONG_RUN, suppress_health_check=list(HealthCheck)))


# --- divergences the generator found, kept as fixed sequences


def test_non_owner_write_and_truncate_drop_setid_bits(pair):
    """A writer that does not own a set-id file first sends SETATTR(mode without the set-id
    bits) as itself (no HANDLE_KILLPRIV); pyvirtiofsd answered EPERM, so the write failed."""
    m = DiffMachine(pair)
    user = USERS[0]
    for name, mode in (("w", 0o6777), ("t", 0o4766), ("g", 0o2676)):
        m._release(m._create((name,), 0o666, 0, os.O_RDWR | os.O_CREAT, ROOT))
        m.chmod((name,), mode, ROOT)
        h = m._open((name,), os.O_WRONLY, user)
        assert h is not None
        if name == "t":
            m.ftruncate(h, 10)
        else:
            m.write(h, 0, b"data")
    m.truncate(("w",), 1, user)
    m.teardown()
    modes = {n: stat.S_IMODE(os.lstat(m.host((n,))).st_mode) for n in "wtg"}
    # Set-group-ID without group execute is not in fuse_setattr()'s SETATTR; the host drops it
    # itself because the writer is not in the file's group (setattr_should_drop_sgid()).
    assert modes == {"w": 0o777, "t": 0o766, "g": 0o676}


def test_access_through_a_supplementary_group(pair):
    """A user who is in group 1000 only through a supplementary group, which FUSE does not
    carry: the guest allows it group access, and pyvirtiofsd answered EACCES/EPERM to opening a
    group-writable file, renaming and removing in a group-writable directory, and chgrp to that
    group (virtiofsd and the host allow all of it)."""
    m = DiffMachine(pair)
    member = USERS[3]
    assert member.groups == (1000,) and member.gid != 1000
    m.mkdir(("d",), 0o775, 0, ROOT)
    m.chown(("d",), None, 1000, ROOT)
    m._release(m._create(("d", "f"), 0o660, 0, os.O_RDWR | os.O_CREAT, ROOT))
    m.chown(("d", "f"), None, 1000, ROOT)
    h = m._open(("d", "f"), os.O_RDWR, member)
    assert h is not None
    m.write(h, 0, b"member data")
    m.read(h, 0, 100)
    m._release(h)
    m.lookup(("d", "f"), member)
    (dh,) = m.opendir(("d",), member).values
    m.readdir(dh, True, 4096)
    m.setxattr(("d", "f"), b"user.x", b"1", 0, member)
    m.rename(("d", "f"), ("d", "g"), None, member)
    m._release(m._create(("d", "h"), 0o640, 0, os.O_RDWR | os.O_CREAT, member))
    m.chown(("d", "h"), None, 1000, member)
    m.remove(("d", "g"), member, False)
    m.teardown()
    h_st = os.lstat(m.host(("d", "h")))
    assert not os.path.exists(m.host(("d", "g"))) and (h_st.st_uid, h_st.st_gid) == (1003, 1000)


def test_search_through_a_supplementary_group(pair):
    """Searching a directory the caller may search only through a supplementary group: the
    LOOKUP was refused with EACCES, where virtiofsd and the host serve it."""
    m = DiffMachine(pair)
    m.mkdir(("d",), 0o770, 0, ROOT)
    m.chown(("d",), None, 1000, ROOT)
    m.mkdir(("d", "e"), 0o755, 0, ROOT)
    m.lookup(("d", "e"), USERS[3])
    m.teardown()


def test_listxattr_needs_no_read_permission(pair):
    """LISTXATTR asks for no permission on the inode (only the walk to it); pyvirtiofsd
    re-opened the file as the caller and answered EACCES for an unreadable one."""
    m = DiffMachine(pair)
    m._release(m._create(("f",), 0o600, 0, os.O_RDWR | os.O_CREAT, ROOT))
    m.mkdir(("d",), 0o700, 0, ROOT)
    m.setxattr(("f",), b"user.a", b"1", 0, ROOT)
    for path in (("f",), ("d",)):
        for size in (0, 4096):
            m.listxattr(path, size, USERS[2])
    m.getxattr(("f",), b"security.x", 0, USERS[2])
    m.teardown()


def test_readdir_buffer_smaller_than_an_entry(pair):
    """A READDIR(PLUS) buffer too small for the next entry: pyvirtiofsd answered an empty
    listing -- the end of the directory, so the guest lost the rest of it; EINVAL now."""
    m = DiffMachine(pair)
    m.mkdir(("L" * 255,), 0o755, 0, ROOT)
    m._release(m._create(("a",), 0o644, 0, os.O_RDWR | os.O_CREAT, ROOT))
    (h,) = m.opendir((), ROOT).values
    for plus in (False, True):
        for size in (200, 300, 4096):
            m.readdir(h, plus, size)
    m.teardown()


def test_malformed_setxattr(tmp_path):
    """A SETXATTR whose value is not `size` bytes: EINVAL from pyvirtiofsd, while virtiofsd
    1.13 panics and exits (KNOWN_DIFFERENCES['malformed-setxattr'])."""
    body = fa.SETXATTR_IN_COMPAT.pack(0, 0) + b"user.a\0" + b"surplus"
    with DaemonPair() as p:
        py, rs = p.sides
        assert py.client.request(Opcode.SETXATTR, fa.ROOT_ID, body).error == errno.EINVAL
        token = rs.client.submit(Opcode.SETXATTR, fa.ROOT_ID, body)
        with pytest.raises((DaemonGone, ReplyTimeout)):
            rs.client.result(token)
        assert rs.proc.wait(10) != 0
        assert py.client.getattr(fa.ROOT_ID).attr.ino == os.stat(py.share).st_ino


def test_every_known_difference_is_documented():
    text = DOCS.read_text()
    rows = set(re.findall(r"^\|\s*`([a-z0-9-]+)`\s*\|", text, re.M))
    assert rows == set(KNOWN_DIFFERENCES), (
        f"docs/differences.md rows {sorted(rows)} != KNOWN_DIFFERENCES "
        f"{sorted(KNOWN_DIFFERENCES)}")


# --translate-uid/--translate-gid: guest 1000..1002 <-> host 2000..2002, guest 1003 may own
# nothing, host 5000..5009 shown as 1002; gids 1000..1002 <-> 3000..3002, guest 1003 -> 3003.
TRANSLATE = ("--translate-uid=map:1000:2000:3", "--translate-uid=forbid-guest:1003:1",
             "--translate-uid=squash-host:5000:1002:10", "--translate-gid=map:1000:3000:3",
             "--translate-gid=guest:1003:3003:1")


@pytest.fixture(scope="module")
def translate_pair():
    yield from _pair("--xattr", *TRANSLATE)


def test_translated_ids_agree(translate_pair):
    """Owners of what guests create, chown's new owner, forbidden ids (EIO on both) and the
    owners every reply shows, with virtiofsd's translation rules."""
    m = DiffMachine(translate_pair)
    a, b, forbidden = Cred(1000, 1000), Cred(1001, 1002), Cred(1003, 1003)
    m.mkdir(("d",), 0o777, 0, a)
    m._release(m._create(("d", "f"), 0o666, 0, os.O_RDWR | os.O_CREAT, b))
    m.mknod(("d", "p"), "fifo", 0o644, 0, b)
    m.symlink(("d", "l"), "f", a)
    m.mkdir(("g",), 0o755, 0, forbidden)
    assert m._create(("h",), 0o644, 0, os.O_RDWR | os.O_CREAT, forbidden) is None
    m.chown(("d", "f"), 1002, 1001, ROOT)
    m.chown(("d", "l"), 1003, None, ROOT)
    m.chown(("d", "p"), None, 1003, ROOT)
    for host in m.hosts:
        os.chown(os.path.join(host, "d"), 5003, 3001)
    m.getattr(("d",), ROOT)
    m.lookup(("d", "f"), ROOT)
    (dh,) = m.opendir(("d",), ROOT).values
    m.readdir(dh, True, 4096)
    m.teardown()
    owners = {n: os.lstat(m.host(("d", n)))[4:6] for n in "fpl"}
    assert owners == {"f": (2002, 3001), "p": (2001, 3003), "l": (2000, 3000)}
    assert not os.path.exists(m.host(("g",))) and not os.path.exists(m.host(("h",)))


XATTRMAPS = {
    "map-all": ":map::user.virtiofs.:",
    "map-trusted": ":map:trusted.:user.virtiofs.:",
    "rules": ":prefix:all:trusted.:user.virtiofs.: :unsupported:client:security.::"
             " :bad:server::security.: :ok:all:user.:: :bad:all:::",
}


@pytest.fixture(scope="module", params=list(XATTRMAPS), ids=list(XATTRMAPS))
def xattrmap_pair(request):
    yield from _pair(f"--xattrmap={XATTRMAPS[request.param]}")


def test_xattrmap_agrees(xattrmap_pair):
    """Names sent to the host, refused (EPERM/ENOTSUP, ENODATA for GETXATTR) and listed
    (prefixes stripped, names hidden) as virtiofsd maps them; the host trees' xattrs agree."""
    m = DiffMachine(xattrmap_pair)
    m._release(m._create(("f",), 0o644, 0, os.O_RDWR | os.O_CREAT, ROOT))
    for host in m.hosts:
        path = os.path.join(host, "f")
        os.setxattr(path, "user.virtiofs.trusted.host", b"h")
        os.setxattr(path, "user.plain", b"p")
        os.setxattr(path, "trusted.raw", b"r")
    for name in (b"user.a", b"trusted.b", b"security.c", b"user.virtiofs.d", b"other.e"):
        m.setxattr(("f",), name, b"v-" + name, 0, ROOT)
        m.getxattr(("f",), name, 4096, ROOT)
    for name in (b"trusted.host", b"user.plain", b"trusted.raw", b"system.posix_acl_access"):
        m.getxattr(("f",), name, 0, ROOT)
        m.getxattr(("f",), name, 4096, ROOT)
    for size in (0, 4096, 10):
        m.listxattr(("f",), size, ROOT)
    m.removexattr(("f",), b"trusted.b", ROOT)
    m.removexattr(("f",), b"user.plain", ROOT)
    m.listxattr(("f",), 4096, ROOT)
    m.teardown()
    host = set(os.listxattr(m.host(("f",))))
    assert host >= {"user.virtiofs.trusted.host", "trusted.raw"}
    assert "user.virtiofs.user.a" in host or "user.a" in host      # sent through the map
    assert not host & {"user.virtiofs.trusted.b", "trusted.b"}     # removed through it


def _acl(*entries: tuple[int, int]) -> bytes:
    """A system.posix_acl_* value (version 2) of (tag, perm) entries for the owner classes."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, 0xFFFFFFFF)
                                           for t, p in entries)


@pytest.fixture(scope="module")
def acl_pair():
    yield from _pair("--posix-acl")


def test_posix_acl_agrees(acl_pair):
    """FUSE_POSIX_ACL with DONT_MASK: the umask applied by the host unless a default ACL is
    inherited, ACL xattrs set, read and listed, SETXATTR_ACL_KILL_SGID."""
    m = DiffMachine(acl_pair)
    assert m.pair.sides[0].client.flags & fa.InitFlag.DONT_MASK
    m.mkdir(("d",), 0o777, 0o022, ROOT)
    m.setxattr(("d",), b"system.posix_acl_default", _acl((1, 6), (4, 6), (0x20, 4)), 0, ROOT)
    m._release(m._create(("d", "f"), 0o666, 0o077, os.O_RDWR | os.O_CREAT, ROOT))
    m.mkdir(("d", "e"), 0o777, 0o077, ROOT)
    m._release(m._create(("g",), 0o666, 0o027, os.O_RDWR | os.O_CREAT, ROOT))
    m.mknod(("p",), "fifo", 0o666, 0o022, ROOT)
    m.chmod(("g",), 0o2775, ROOT)
    value = _acl((1, 7), (4, 5), (0x20, 5))
    body = (fa.SETXATTR_IN.pack(len(value), 0, fa.SETXATTR_ACL_KILL_SGID)
            + b"system.posix_acl_access\0" + value)
    assert m.same("SETXATTR ACL_KILL_SGID", *m.send(Opcode.SETXATTR, m.resolve(("g",), ROOT),
                                                    body, ROOT))
    m.getxattr(("d",), b"system.posix_acl_default", 4096, ROOT)
    m.getxattr(("g",), b"system.posix_acl_access", 4096, ROOT)
    m.listxattr(("d",), 4096, ROOT)
    m.teardown()
    assert stat.S_IMODE(os.lstat(m.host(("g",))).st_mode) == 0o755
    assert os.getxattr(m.host(("d", "e")), "system.posix_acl_default")   # inherited


def test_generated_sequences_posix_acl(acl_pair):
    """The generator on a --posix-acl share: the daemons apply the umask the guest sends."""
    run_state_machine_as_test(
        lambda: DiffMachine(acl_pair),
        settings=settings(max_examples=max(1, EXAMPLES // 5), stateful_step_count=STEPS,
                          deadline=None, derandomize=not LONG_RUN, database=None,
                          print_blob=LONG_RUN, suppress_health_check=list(HealthCheck)))


@pytest.fixture(scope="module")
def label_pair():
    yield from _pair("--security-label",
                     init_flags=DEFAULT_INIT_FLAGS | fa.InitFlag.SECURITY_CTX)


def test_security_label_agrees(label_pair):
    """FUSE_SECURITY_CTX: the context each creating request carries lands on the new inode;
    one the host refuses undoes the creation on both.  (virtiofsd dies on a creating request
    without the extension, so every request here carries one.)"""
    pair = label_pair
    label = fa.pack_secctx(b"security.selinux", b"system_u:object_r:foo_t:s0\0")
    refused = fa.pack_secctx(b"user.label", b"L")
    made: list[tuple[str, bool]] = []
    for kind in ("dir", "reg", "fifo", "lnk"):
        for tag, ext in (("selinux", label), ("user", refused)):
            name = f"sl-{kind}-{tag}"
            z = _z(name)
            body = {"dir": fa.MKDIR_IN.pack(0o755, 0) + z,
                    "reg": fa.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + z,
                    "fifo": fa.MKNOD_IN.pack(0o10644, 0, 0) + z, "lnk": z + b"target\0"}[kind]
            opcode = {"dir": Opcode.MKDIR, "reg": Opcode.CREATE, "fifo": Opcode.MKNOD,
                      "lnk": Opcode.SYMLINK}[kind]
            rp, rr = pair.both(lambda i, s, o=opcode, b=body: (o, fa.ROOT_ID, b, None), ROOT,
                               ext)
            assert rp.error == rr.error, (name, rp.error, rr.error)
            made.append((name, rp.error == 0))
    for name, ok in made:
        seen = []
        for side in pair.sides:
            path = side.share / name
            seen.append({n: os.getxattr(path, n, follow_symlinks=False)
                         for n in os.listxattr(path, follow_symlinks=False)}
                        if os.path.lexists(path) else None)
        assert seen[0] == seen[1], (name, seen)
        assert (seen[0] is not None) == ok
    # user.* xattrs exist on regular files and directories only: the others are undone.
    assert dict(made) == {"sl-dir-selinux": True, "sl-dir-user": True, "sl-reg-selinux": True,
                          "sl-reg-user": True, "sl-fifo-selinux": True, "sl-fifo-user": False,
                          "sl-lnk-selinux": True, "sl-lnk-user": False}


@pytest.fixture(scope="module")
def killpriv_pair():
    yield from _pair("--xattr", "--killpriv-v2", "--allow-mmap", "--cache=never",
                     "--preserve-noatime")


def test_killpriv_v2_agrees(killpriv_pair):
    """INIT with HANDLE_KILLPRIV_V2 and DIRECT_IO_ALLOW_MMAP; set-id bits dropped where the
    guest's flags ask (WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID, OPEN_KILL_SUIDGID), by root and
    by a writer who does not own the file, and kept where they do not."""
    py, rs = (s.init_out for s in killpriv_pair.sides)
    assert norm_init(py) == norm_init(rs)
    want = fa.InitFlag.HANDLE_KILLPRIV_V2 | fa.InitFlag.DIRECT_IO_ALLOW_MMAP
    assert py.all_flags & want == want
    m = DiffMachine(killpriv_pair)
    user = USERS[0]
    names = ("root-w", "root-t", "root-o", "user-w", "user-t", "keep")
    for name in names:
        m._release(m._create((name,), 0o666, 0, os.O_RDWR | os.O_CREAT, ROOT))
        m.chmod((name,), 0o6777, ROOT)
    for name, cred in (("root-w", ROOT), ("user-w", user), ("keep", ROOT)):
        nodes = m.resolve((name,), ROOT)
        rp, rr = m.send(Opcode.OPEN, nodes, fa.OPEN_IN.pack(os.O_RDWR, 0), cred)
        assert m.same(f"OPEN {name}", rp, rr)
        fhs = [fa.OpenOut.unpack(r.body).fh for r in (rp, rr)]
        flags = 0 if name == "keep" else fa.WRITE_KILL_SUIDGID
        rp, rr = killpriv_pair.both(lambda i, s, n=nodes, f=fhs, w=flags: (
            Opcode.WRITE, n[i], [fa.WRITE_IN.pack(f[i], 0, 1, w, 0, os.O_RDWR), b"x"], None),
            cred)
        assert m.same(f"WRITE {name}", rp, rr)
        for i, side in enumerate(killpriv_pair.sides):
            side.client.release(nodes[i], fhs[i])
    for name, cred in (("root-t", ROOT), ("user-t", user)):
        body = fa.SetattrIn(fa.SetattrValid.SIZE | fa.SetattrValid.KILL_SUIDGID, size=1).pack()
        m.attr(f"SETATTR {name}", *m.send(Opcode.SETATTR, m.resolve((name,), ROOT), body, cred))
    nodes = m.resolve(("root-o",), ROOT)
    rp, rr = m.send(Opcode.OPEN, nodes, fa.OPEN_IN.pack(os.O_RDWR | os.O_TRUNC,
                                                        fa.OPEN_KILL_SUIDGID), ROOT)
    assert m.same("OPEN O_TRUNC", rp, rr)
    for i, side in enumerate(killpriv_pair.sides):
        side.client.release(nodes[i], fa.OpenOut.unpack((rp, rr)[i].body).fh)
    m.teardown()
    modes = {n: stat.S_IMODE(os.lstat(m.host((n,))).st_mode) for n in names}
    assert modes == {"root-w": 0o777, "root-t": 0o777, "root-o": 0o777, "user-w": 0o777,
                     "user-t": 0o777, "keep": 0o6777}


_EVERY_INIT_FLAG = sum(int(f) for f in fa.InitFlag)


@pytest.fixture(scope="module")
def everything_pair():
    yield from _pair("--xattr", "--killpriv-v2", "--allow-mmap", "--posix-acl",
                     "--security-label", init_flags=_EVERY_INIT_FLAG)


def test_init_with_every_flag_offered(everything_pair):
    """A kernel offering every INIT flag, every flag option on: pyvirtiofsd negotiates what
    virtiofsd 1.13 does but ALLOW_IDMAP, and the lock flags too (docs/differences.md, "INIT
    flags")."""
    py, rs = (s.init_out for s in everything_pair.sides)
    assert rs.all_flags & ~py.all_flags == fa.InitFlag.ALLOW_IDMAP
    assert py.all_flags & ~rs.all_flags == fa.InitFlag.POSIX_LOCKS | fa.InitFlag.FLOCK_LOCKS
    assert norm_init(py._replace(flags=0, flags2=0)) == norm_init(rs._replace(flags=0, flags2=0))
