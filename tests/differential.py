"""Differential testing of pyvirtiofsd against the Rust virtiofsd, and of pyvirtiofsd's two data
planes against each other: daemons, normal forms, model.

`DaemonPair` runs both daemons as root with `--sandbox=none --xattr` (pyvirtiofsd also with
`--allow-device-nodes`, which virtiofsd has no choice about) on two directories that start out
identical, each behind its own Frontend/FuseClient (tests/frontend.py), and sends one
request to both at once.  The rest turns what they answer into values that compare equal
exactly when the daemons behaved the same:

* attributes without inode numbers and times, which differ between any two directories, and
  with a little slack in st_blocks (`Blocks`);
* nodeids through a bijection (`NodeMap`): the first reply naming a nodeid pairs it with the
  other daemon's, and a later reply that breaks the pairing is a divergence -- so "the same
  inode has the same nodeid" (hard links, LOOKUP of '.') is compared too;
* directory listings as sets of (name, type) -- cookies and order are the daemon's own;
* whole trees as {path: type, mode, owner, size, blocks, data, data extents, link target,
  xattrs} plus hard-link groups (`snapshot`).

`may()` is the guest kernel's default_permissions check (virtio-fs mounts always use it): a
request it refuses never reaches the daemon, so the generator does not send it.  Where the two
daemons are meant to differ, the difference is in `KNOWN_DIFFERENCES` and in the table of
docs/differences.md (a test keeps the two in step).

`DaemonPair(planes=("native", "python"))` pairs two pyvirtiofsd daemons instead, one per
`--data-plane`, each on its own fresh tmpfs so that the host answers both alike (inode numbers,
free counts).  There every reply must also be byte-identical (`SameBytes`), except attribute
times and the ids each daemon allocates (nodeids, fhs), which must correspond one to one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
import shutil
import stat
import struct
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pyvirtiofsd.common import fuse_abi as fa
from tests.frontend import (
    ANCHOR,
    DEFAULT_INIT_FLAGS,
    DaemonGone,
    Frontend,
    FuseClient,
    FuseReply,
    ReplyTimeout,
    anchor_argv,
    start_daemon,
    stop_daemon,
)

ROOT_DIR = Path(__file__).resolve().parent.parent
DAEMON = ROOT_DIR / ".venv" / "bin" / "pyvirtiofsd"
SIDES = ("pyvirtiofsd", "virtiofsd")
REPLY_TIMEOUT = 5.0


class Divergence(AssertionError):
    """The two daemons answered one request differently (or left different trees)."""


# Differences that are intended, by key.  Each key is a row of docs/differences.md; the
# generator and the tests name the key wherever they accept or work around the difference.
KNOWN_DIFFERENCES: dict[str, str] = {
    "translate-forbidden-caller": "with --translate-uid/-gid, a request by a forbidden guest id "
                                  "that creates nothing runs as the overflow id (65534); "
                                  "virtiofsd runs it as itself",
    "init-minor": "INIT answers FUSE 7.45; virtiofsd 1.13 answers 7.38",
    "access-root-search": "ACCESS answers what access(2) on the host answers: root may "
                          "search any directory; virtiofsd says EACCES for X_OK on a directory "
                          "without execute bits",
    "copy-file-range-64": "COPY_FILE_RANGE_64 is served; virtiofsd answers ENOSYS and the "
                          "kernel falls back to COPY_FILE_RANGE",
    "credentials": "every request runs with the caller's fsuid/fsgid; virtiofsd switches "
                   "only for requests that create an inode",
    "malformed-setxattr": "a SETXATTR whose value is not `size` bytes long is answered "
                          "EINVAL; virtiofsd 1.13 panics and exits",
    "readdirplus-small-buffer": "a READDIRPLUS buffer too small for the next entry is "
                                "EINVAL; virtiofsd answers an empty page (the end of the "
                                "directory) when the name alone would fit",
    "open-special": "opening something that is not a regular file or directory (a CREATE that "
                    "finds a symlink) fails like open(2) with O_NOFOLLOW (ELOOP); virtiofsd "
                    "answers EBADF",
}


# --- credentials and the guest kernel's permission check


class Cred(NamedTuple):
    """A caller: FUSE carries uid and gid; the supplementary groups only the guest knows
    (except the one FUSE_EXT_GROUPS names for requests that create an inode)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def __repr__(self) -> str:
        extra = f", {self.groups}" if self.groups else ""
        return f"Cred({self.uid}, {self.gid}{extra})"

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


ROOT = Cred(0, 0)
R, W, X = 4, 2, 1


def may(cred: Cred, st: os.stat_result, mask: int) -> bool:
    """generic_permission() for a caller without supplementary groups (fs/namei.c)."""
    if cred.uid == 0:
        # CAP_DAC_OVERRIDE: everything but executing a file with no x bit at all.
        return not (mask & X and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111)
    if st.st_uid == cred.uid:
        bits = st.st_mode >> 6
    elif cred.in_group(st.st_gid):
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & mask == mask


def owner_or_root(cred: Cred, st: os.stat_result) -> bool:
    return cred.uid == 0 or cred.uid == st.st_uid


def kills_privs(mode: int) -> bool:
    """Whether a write or truncate by a caller without CAP_FSETID drops set-id bits
    (should_remove_suid(): set-user-ID, or set-group-ID with group execute)."""
    return stat.S_ISREG(mode) and bool(
        mode & stat.S_ISUID or mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP)


def killed_mode(mode: int) -> int:
    """The mode fuse_setattr() asks for when it drops set-id bits (file type included)."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


# --- one daemon


@dataclass
class Side:
    """One daemon, its share and its FUSE session."""

    name: str
    argv_for: Callable[[str], list[str]]     # socket path -> command line
    share: Path
    workdir: Path
    proc: object = None
    fe: Frontend | None = None
    client: FuseClient | None = None
    init_out: fa.InitOut | None = None
    starts: int = 0
    no_copy_range_64: bool = False    # what a kernel remembers after ENOSYS
    init_flags: int = DEFAULT_INIT_FLAGS   # what the "kernel" offers at INIT

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> None:
        self.starts += 1
        sock = str(self.workdir / f"{self.name}{self.starts}.sock")
        self.proc = start_daemon(self.argv_for(sock), str(self.log))
        try:
            self.fe = Frontend.connect(sock, process=self.proc, timeout=REPLY_TIMEOUT)
            self.client = FuseClient(self.fe)
            self.init_out = self.client.init(flags=self.init_flags)
        except BaseException:
            self.stop()
            raise
        self.no_copy_range_64 = False

    def alive(self) -> bool:
        """Running and still connected (a hang-up or unexpected message means it is not)."""
        if self.proc is None or self.proc.poll() is not None or self.fe is None:
            return False
        p = select.poll()
        p.register(self.fe.sock.fileno(), select.POLLIN)
        return not p.poll(0)

    def stop(self) -> None:
        if self.fe is not None:
            self.fe.close()
            self.fe = None
        if self.proc is not None:
            stop_daemon(self.proc)
            self.proc = None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class DaemonPair:
    """pyvirtiofsd and the Rust virtiofsd on two directories that start identical -- or, with
    `planes`, pyvirtiofsd on each of two data planes, each share a fresh tmpfs.

    Both run for as long as the pair is used (a fresh pair per example is too slow); examples
    work in fresh subdirectories (`new_example`).  A daemon that died or hung is restarted
    together with the other by `ensure_alive()`, so one crash does not fail every later
    example -- the crash itself was already reported as a divergence.
    """

    def __init__(self, extra: Sequence[str] = ("--xattr",),
                 planes: tuple[str, str] | None = None,
                 init_flags: int = DEFAULT_INIT_FLAGS) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="vfsdiff-"))
        os.chmod(self.base, 0o755)
        self.examples = 0
        self.restarts = 0
        self.sent: Counter = Counter()       # requests per opcode name, for the run's summary
        self.differences: Counter = Counter()  # KNOWN_DIFFERENCES keys met
        self.mounts: list[Path] = []
        self.same_bytes = SameBytes(planes) if planes else None
        shares = []
        for name in [f"{i}-{p}" for i, p in enumerate(planes)] if planes else ("py", "rs"):
            share = self.base / name
            share.mkdir()
            if planes:
                # Its own filesystem per share: inode numbers and free counts then move only
                # with what that share's daemon did (tmpfs numbers inodes in creation order).
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755",
                                "vfsdiff", str(share)], check=True, capture_output=True)
                self.mounts.append(share)
            os.chmod(share, 0o755)
            shares.append(share)
        extra = list(extra)
        self.readonly = "--readonly" in extra
        # DIFF_DAEMON_ARGS: more options for pyvirtiofsd only (e.g. --seccomp=log to debug).
        own = os.environ.get("DIFF_DAEMON_ARGS", "").split()

        def ours(share: Path, plane: str):
            def argv(sock: str) -> list[str]:
                return [str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                        "--sandbox=none", "--log-level=warn", f"--data-plane={plane}",
                        "--allow-device-nodes", *extra, *own]
            return argv

        if planes:
            names = [f"{p}-plane" + (f"-{i}" if planes[0] == planes[1] else "")
                     for i, p in enumerate(planes)]
            self.sides = tuple(Side(n, ours(share, plane), share, self.base, init_flags=init_flags)
                               for n, plane, share in zip(names, planes, shares, strict=True))
            return
        py_share, rs_share = shares

        def anchor(sock: str) -> list[str]:
            return anchor_argv(sock, str(rs_share), "--log-level=warn", *extra)

        # Against the Rust virtiofsd, pyvirtiofsd runs its default and fastest plane.
        self.sides = (Side("pyvirtiofsd", ours(py_share, "native"), py_share, self.base,
                           init_flags=init_flags),
                      Side("virtiofsd", anchor, rs_share, self.base, init_flags=init_flags))

    @staticmethod
    def available() -> bool:
        return os.path.exists(ANCHOR) and os.path.exists(DAEMON) and os.geteuid() == 0

    def start(self) -> None:
        for side in self.sides:
            side.start()

    def stop(self) -> None:
        for side in self.sides:
            side.stop()

    def close(self) -> None:
        self.stop()
        for m in self.mounts:
            # Lazily: a worker of a daemon killed a moment ago may still hold an fd in it.
            subprocess.run(["umount", "-l", str(m)], check=True, capture_output=True)
        self.mounts.clear()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> DaemonPair:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ensure_alive(self) -> None:
        if all(s.alive() for s in self.sides):
            return
        self.restarts += 1
        self.stop()
        self.start()

    def new_example(self) -> str:
        """A fresh name for an example's directory (created by the caller through FUSE)."""
        self.examples += 1
        return f"ex{self.examples}"

    def describe_death(self) -> str:
        out = []
        for s in self.sides:
            state = "alive" if s.alive() else f"gone (status {s.proc and s.proc.poll()})"
            out.append(f"{s.name}: {state}\n--- {s.name} log tail ---\n{s.log_tail()}")
        return "\n".join(out)

    # -- requests

    def both(self, build: Callable[[int, Side], tuple[int, int, bytes | list[bytes], int | None]],
             cred: Cred = ROOT, ext: bytes = b"") -> tuple[FuseReply, FuseReply]:
        """Send one request to each daemon (both in flight at once); build(i, side) returns
        (opcode, nodeid, body, out_size) for that side.  `ext`: request extensions, appended
        to the body (protocol.md 4.9)."""
        if ext:
            return self._both_ext(build, cred, ext)
        tokens, bodies = [], []
        for i, side in enumerate(self.sides):
            opcode, nodeid, body, out_size = build(i, side)
            if i == 0:
                self.sent[_op_name(opcode)] += 1
            bodies.append(body)
            tokens.append(side.client.submit(opcode, nodeid, body, out_size=out_size,
                                             uid=cred.uid, gid=cred.gid, pid=1))
        replies = tuple(self._result(side, t) for side, t in zip(self.sides, tokens, strict=True))
        if self.same_bytes is not None:
            self.same_bytes.check(opcode, bodies, replies)
        return replies

    def _both_ext(self, build, cred: Cred, ext: bytes) -> tuple[FuseReply, FuseReply]:
        # FuseClient.submit() has no total_extlen: frame the request with build() instead.
        sent, bodies = [], []
        for i, side in enumerate(self.sides):
            opcode, nodeid, body, out_size = build(i, side)
            bodies.append(body)
            if i == 0:
                self.sent[_op_name(opcode)] += 1
            parts = [body] if isinstance(body, bytes | bytearray) else list(body)
            unique, readable = side.client.build(opcode, nodeid, [*parts, ext], uid=cred.uid,
                                                 gid=cred.gid, pid=1,
                                                 total_extlen=len(ext) // 8)
            size = out_size if out_size is not None else fa.ENTRY_OUT.size + fa.OPEN_OUT.size
            token = side.client.vq.submit(readable, [fa.OUT_HEADER.size, size])
            sent.append((side, token, unique, fa.OUT_HEADER.size + size))
        out = []
        for side, token, unique, capacity in sent:
            try:
                c = side.client.vq.wait(token)
            except (DaemonGone, ReplyTimeout) as e:
                raise Divergence(f"{side.name} stopped answering: {e}\n"
                                 + self.describe_death()) from None
            out.append(side.client.parse(c, unique, capacity))
        if self.same_bytes is not None:
            self.same_bytes.check(opcode, bodies, tuple(out))
        return tuple(out)

    def one(self, i: int, opcode: int, nodeid: int, body: bytes | list[bytes],
            out_size: int | None = None, cred: Cred = ROOT) -> FuseReply:
        side = self.sides[i]
        if i == 0:
            self.sent[_op_name(opcode)] += 1
        token = side.client.submit(opcode, nodeid, body, out_size=out_size, uid=cred.uid,
                                   gid=cred.gid, pid=1)
        return self._result(side, token)

    def _result(self, side: Side, token: int) -> FuseReply:
        try:
            return side.client.result(token)
        except (DaemonGone, ReplyTimeout) as e:
            raise Divergence(f"{side.name} stopped answering: {e}\n"
                             + self.describe_death()) from None

    def forget_all(self, counts: Sequence[Counter]) -> None:
        for side, counter in zip(self.sides, counts, strict=True):
            items = [(n, k) for n, k in counter.items() if k > 0 and n != fa.ROOT_ID]
            for i in range(0, len(items), 64):
                side.client.batch_forget(items[i:i + 64])
        if self.same_bytes is not None:
            self.same_bytes.nodes.clear()

    def forgotten(self, nodes: tuple[int, int]) -> None:
        """Both daemons were sent FORGETs for every lookup of `nodes`: either may reuse it."""
        if self.same_bytes is not None:
            self.same_bytes.nodes.drop(*nodes)


def _op_name(opcode: int) -> str:
    try:
        return fa.Opcode(opcode).name
    except ValueError:
        return str(opcode)


def seed_tree(root: Path) -> None:
    """The same small tree in any directory (for shares the daemons may not change)."""
    root.mkdir()
    os.chmod(root, 0o777)
    (root / "d").mkdir()
    (root / "b").mkdir(mode=0o700)
    os.chmod(root / "b", 0o700)
    with open(root / "a", "wb") as f:
        f.write(b"seeded" * 1000)
        f.seek(1 << 20)
        f.write(b"after a hole")
    os.chmod(root / "a", 0o644)
    os.setxattr(root / "a", "user.a", b"value")
    (root / "d" / "b").write_bytes(b"")
    os.chmod(root / "d" / "b", 0o4755)
    os.chown(root / "d" / "b", 1000, 1000)
    os.symlink("d/b", root / "c")
    os.mkfifo(root / "d" / "a")
    os.link(root / "a", root / "d" / "c")


# --- normal forms


class NodeMap:
    """The pairing of pyvirtiofsd's nodeids with virtiofsd's (dropped once both are forgotten:
    a daemon may then reuse the number)."""

    def __init__(self) -> None:
        self.a2b: dict[int, int] = {fa.ROOT_ID: fa.ROOT_ID}
        self.b2a: dict[int, int] = {fa.ROOT_ID: fa.ROOT_ID}

    def pair(self, a: int, b: int, what: str) -> None:
        if (a == 0) != (b == 0):
            raise Divergence(f"{what}: nodeid {a} vs {b} (one is a negative entry)")
        if a == 0:
            return
        known_b = self.a2b.get(a)
        known_a = self.b2a.get(b)
        if known_b is None and known_a is None:
            self.a2b[a] = b
            self.b2a[b] = a
            return
        if known_b != b or known_a != a:
            raise Divergence(f"{what}: pyvirtiofsd nodeid {a} (paired with {known_b}) vs "
                             f"virtiofsd nodeid {b} (paired with {known_a}): the daemons "
                             "disagree on which inodes are the same")


    def paired(self, a: int, b: int) -> bool:
        return self.a2b.get(a) == b

    def drop(self, a: int, b: int) -> None:
        self.a2b.pop(a, None)
        self.b2a.pop(b, None)


class Blocks(int):
    """st_blocks, equal to any count within BLOCKS_SLACK: ext4 may give one of two files with
    the same extents an extent-tree block more than the other, depending on its allocator."""

    __hash__ = None     # equality is not transitive, so never a dict key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and abs(int(self) - int(other)) <= BLOCKS_SLACK

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __repr__(self) -> str:
        return f"{int(self)}"


BLOCKS_SLACK = 16       # 512-byte units: two 4 KiB blocks


def norm_attr(a: fa.Attr) -> tuple:
    """fuse_attr without what differs between two directories: ino and the three times."""
    return (("size", a.size), ("blocks", Blocks(a.blocks)), ("mode", oct(a.mode)),
            ("nlink", a.nlink),
            ("uid", a.uid), ("gid", a.gid), ("rdev", a.rdev), ("blksize", a.blksize),
            ("flags", a.flags))


def norm_entry(e: fa.EntryOut) -> tuple:
    return (("negative", e.nodeid == 0), ("generation", e.generation),
            ("entry_valid", (e.entry_valid, e.entry_valid_nsec)),
            ("attr_valid", (e.attr_valid, e.attr_valid_nsec)), *norm_attr(e.attr))


def norm_attr_out(a: fa.AttrOut) -> tuple:
    return (("attr_valid", (a.attr_valid, a.attr_valid_nsec)), *norm_attr(a.attr))


def norm_statfs(s: fa.Kstatfs) -> tuple:
    # Free counts move with everything else on the host's filesystem.
    return (("blocks", s.blocks), ("files", s.files), ("bsize", s.bsize),
            ("namelen", s.namelen), ("frsize", s.frsize))


def norm_init(o: fa.InitOut) -> tuple:
    """INIT reply without the minor version (KNOWN_DIFFERENCES['init-minor'])."""
    return tuple((k, v) for k, v in o._asdict().items() if k != "minor")


def mismatch(what: str, a, b) -> Divergence:
    return Divergence(f"{what}:\n  {SIDES[0]}: {a}\n  {SIDES[1]}: {b}")


def err_name(e: int) -> str:
    return "ok" if e == 0 else errno.errorcode.get(e, str(e))


# --- byte-identical replies (two data planes of pyvirtiofsd)


class Bijection:
    """Which id one daemon allocated where the other allocated which: the first reply naming
    an id pairs it (ids are compared by their order of first appearance), a later reply must
    keep the pairing.  An id freed on both sides (FORGET to zero, RELEASE) is dropped, since
    either daemon may then hand the number out again."""

    def __init__(self, kind: str, names: tuple[str, str], fixed: int | None = None) -> None:
        self.kind, self.names, self.fixed = kind, names, fixed
        self.clear()

    def clear(self) -> None:
        self.a2b: dict[int, int] = {}
        self.b2a: dict[int, int] = {}
        if self.fixed is not None:
            self.a2b[self.fixed] = self.b2a[self.fixed] = self.fixed

    def pair(self, a: int, b: int, what: str) -> None:
        if (a == 0) != (b == 0):
            raise Divergence(f"{what}: {self.kind} {a} vs {b} (one of them is 0)")
        if a == 0:
            return
        known_b, known_a = self.a2b.get(a), self.b2a.get(b)
        if known_b is None and known_a is None:
            self.a2b[a], self.b2a[b] = b, a
        elif known_b != b or known_a != a:
            raise Divergence(f"{what}: {self.names[0]} {self.kind} {a} (paired with {known_b}) "
                             f"vs {self.names[1]} {self.kind} {b} (paired with {known_a})")

    def drop(self, a: int, b: int) -> None:
        if a != self.fixed:
            self.a2b.pop(a, None)
            self.b2a.pop(b, None)


_U64 = struct.Struct("<Q")
_ATTR_TIMES = (24, 60)          # fuse_attr: atime, mtime, ctime, then their nsec fields
_ENTRY_HEAD = fa.ENTRY_OUT_HEAD.size
_ATTR_OUT_HEAD = fa.ATTR_OUT_HEAD.size
_ENTRY_REPLY = frozenset({fa.Opcode.LOOKUP, fa.Opcode.MKNOD, fa.Opcode.MKDIR, fa.Opcode.SYMLINK,
                          fa.Opcode.LINK})
_ATTR_REPLY = frozenset({fa.Opcode.GETATTR, fa.Opcode.SETATTR})
_OPEN_REPLY = frozenset({fa.Opcode.OPEN, fa.Opcode.OPENDIR})
_RELEASES = frozenset({fa.Opcode.RELEASE, fa.Opcode.RELEASEDIR})


def _masked(opcode: int, body: bytes) -> tuple[bytes, list[tuple[str, int]]]:
    """The reply body with attribute times and allocated ids zeroed, and the ids in the order
    they appear: ('nodeid' | 'fh', value).  Layouts: protocol.md 4.5 (fuse_entry_out,
    fuse_attr_out, fuse_open_out, fuse_direntplus)."""
    buf = bytearray(body)
    ids: list[tuple[str, int]] = []

    def attr(off: int) -> None:
        if off + fa.ATTR.size <= len(buf):
            buf[off + _ATTR_TIMES[0]:off + _ATTR_TIMES[1]] = bytes(_ATTR_TIMES[1] - _ATTR_TIMES[0])

    def take(kind: str, off: int) -> None:
        if off + 8 <= len(buf):
            ids.append((kind, _U64.unpack_from(buf, off)[0]))
            buf[off:off + 8] = bytes(8)

    def entry(off: int) -> None:
        take("nodeid", off)
        attr(off + _ENTRY_HEAD)

    if opcode in _ENTRY_REPLY:
        entry(0)
    elif opcode == fa.Opcode.CREATE:
        entry(0)
        take("fh", fa.ENTRY_OUT.size)
    elif opcode in _OPEN_REPLY:
        take("fh", 0)
    elif opcode in _ATTR_REPLY:
        attr(_ATTR_OUT_HEAD)
    elif opcode == fa.Opcode.READDIRPLUS:
        pos = 0
        while pos + fa.ENTRY_OUT.size + fa.DIRENT.size <= len(buf):
            entry(pos)
            namelen = fa.DIRENT.unpack_from(buf, pos + fa.ENTRY_OUT.size)[2]
            pos += (fa.ENTRY_OUT.size + fa.DIRENT.size + namelen + 7) & ~7
    return bytes(buf), ids


class SameBytes:
    """Two data planes of pyvirtiofsd must answer every request byte for byte alike, except
    attribute times (each host inode has its own) and the nodeids and fhs each daemon
    allocates, which must correspond one to one (`Bijection`)."""

    def __init__(self, names: tuple[str, str]) -> None:
        self.names = tuple(f"{n} plane" for n in names)
        self.nodes = Bijection("nodeid", self.names, fixed=fa.ROOT_ID)
        self.fhs = Bijection("fh", self.names)
        self.checked = 0

    def check(self, opcode: int, bodies: Sequence[bytes | list[bytes]],
              replies: Sequence[FuseReply]) -> None:
        what = _op_name(opcode)
        a, b = replies
        if a.error != b.error:
            raise Divergence(f"{what}: errno {err_name(a.error)} ({self.names[0]}) vs "
                             f"{err_name(b.error)} ({self.names[1]})")
        (ma, ids_a), (mb, ids_b) = _masked(opcode, a.body), _masked(opcode, b.body)
        if ma != mb:
            at = next((i for i, (x, y) in enumerate(zip(ma, mb, strict=False)) if x != y),
                      min(len(ma), len(mb)))
            raise Divergence(f"{what}: replies differ from byte {at} ({len(ma)} and {len(mb)} "
                             f"bytes; times and ids masked)\n  {self.names[0]}: "
                             f"{ma[max(0, at - 16):at + 48].hex()}\n  {self.names[1]}: "
                             f"{mb[max(0, at - 16):at + 48].hex()}")
        for (kind, x), (_kind, y) in zip(ids_a, ids_b, strict=True):
            (self.nodes if kind == "nodeid" else self.fhs).pair(x, y, what)
        if opcode in _RELEASES and not a.error:
            fh = [_U64.unpack_from(bd if isinstance(bd, bytes | bytearray) else bd[0])[0]
                  for bd in bodies]
            self.fhs.drop(*fh)
        self.checked += 1


# --- trees


class Node(NamedTuple):
    kind: str
    mode: str
    uid: int
    gid: int
    size: int | None
    blocks: int | None
    nlink: int
    content: str | None        # sha256 of the data, the link target, or the device number
    extents: tuple | None      # data extents of a regular file (SEEK_DATA/SEEK_HOLE)
    xattrs: tuple


def _extents(fd: int, size: int) -> tuple:
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return tuple(out)


def _xattrs(path: str) -> tuple:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError as e:
            out.append((n, err_name(e.errno)))
    return tuple(out)


def snapshot(root: Path) -> tuple[dict[str, Node], set[frozenset[str]]]:
    """Every entry under `root` by relative path, and the groups of hard-linked paths."""
    nodes: dict[str, Node] = {}
    by_ino: dict[int, set[str]] = {}

    def walk(d: str, rel: str) -> None:
        for entry in os.scandir(d):
            path = entry.path
            name = f"{rel}/{entry.name}" if rel else entry.name
            st = os.lstat(path)
            mode = st.st_mode
            size = blocks = content = extents = None
            if stat.S_ISREG(mode):
                kind, size, blocks = "file", st.st_size, Blocks(st.st_blocks)
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    h = hashlib.sha256()
                    while chunk := os.read(fd, 1 << 20):
                        h.update(chunk)
                    content = h.hexdigest()[:16]
                    extents = _extents(fd, st.st_size)
                finally:
                    os.close(fd)
            elif stat.S_ISDIR(mode):
                kind, size, blocks = "dir", st.st_size, Blocks(st.st_blocks)
            elif stat.S_ISLNK(mode):
                kind, content = "symlink", os.readlink(path)
            elif stat.S_ISFIFO(mode):
                kind = "fifo"
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                kind = "chr" if stat.S_ISCHR(mode) else "blk"
                content = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            elif stat.S_ISSOCK(mode):
                kind = "socket"
            else:
                kind = f"type {stat.S_IFMT(mode):o}"
            nodes[name] = Node(kind, oct(stat.S_IMODE(mode)), st.st_uid, st.st_gid, size,
                               blocks, st.st_nlink, content, extents, _xattrs(path))
            if not stat.S_ISDIR(mode):
                by_ino.setdefault(st.st_ino, set()).add(name)
            if stat.S_ISDIR(mode):
                walk(path, name)

    walk(str(root), "")
    return nodes, {frozenset(v) for v in by_ino.values() if len(v) > 1}


def compare_trees(a: Path, b: Path) -> None:
    """Raise Divergence naming every path where the two trees differ."""
    na, la = snapshot(a)
    nb, lb = snapshot(b)
    problems = []
    for path in sorted(na.keys() | nb.keys()):
        x, y = na.get(path), nb.get(path)
        if x is None or y is None:
            problems.append(f"  {path}: only in {SIDES[0] if y is None else SIDES[1]}")
        elif x != y:
            diffs = [f"{f}={getattr(x, f)!r}/{getattr(y, f)!r}" for f in Node._fields
                     if getattr(x, f) != getattr(y, f)]
            problems.append(f"  {path}: " + ", ".join(diffs))
    if la != lb:
        problems.append(f"  hard links: {sorted(map(sorted, la))} / {sorted(map(sorted, lb))}")
    if problems:
        raise Divergence(f"final trees differ ({SIDES[0]}/{SIDES[1]}):\n" + "\n".join(problems))


# --- handles


@dataclass
class Handle:
    """An open file or directory on both daemons."""

    what: str                      # the path it was opened by, for messages
    nodes: tuple[int, int]
    fhs: tuple[int, int]
    flags: int
    directory: bool = False
    cred: Cred = ROOT               # who opened it, and who reads and writes through it
    released: bool = field(default=False, compare=False)

    @property
    def readable(self) -> bool:
        return self.flags & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR)

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)

    def __repr__(self) -> str:
        kind = "dir" if self.directory else f"flags={self.flags:#o}"
        return f"Handle({self.what!r}, {kind})"
