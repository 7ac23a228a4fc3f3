"""The native data plane against the Python reference: the same generated request sequences,
byte-identical replies.

The state machine of tests/test_differential.py (LOOKUP, GETATTR, SETATTR, OPEN, READ, WRITE,
FLUSH, FSYNC, RELEASE, OPENDIR, READDIR, READDIRPLUS, RELEASEDIR, STATFS, ACCESS, FORGET,
CREATE, MKDIR, MKNOD, SYMLINK, LINK, UNLINK, RMDIR, RENAME, xattrs ... over a small tree whose
entries belong to several owners with modes drawn from a small set, sent by callers with
different uid, gid and supplementary groups) drives a `--data-plane=native` daemon and a
`--data-plane=python` daemon on identical fresh shares, each on its own tmpfs.  Besides the
machine's own checks (errno, attributes, data, listings, the final trees), every reply must be
byte for byte the other's, except attribute times and the nodeids and fhs each daemon
allocates, which must correspond one to one (tests/differential.py `SameBytes`).

CI runs a fixed, derandomised set of examples; DIFF_EXAMPLES / DIFF_STEPS as for
tests/test_differential.py run a longer, random one.
"""

from __future__ import annotations

import os
import re
import stat

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule, run_state_machine_as_test

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.fuse_abi import Opcode
from tests.conftest import DATA_PLANES, Daemon
from tests.differential import ROOT, DaemonPair, Divergence, SameBytes
from tests.frontend import Frontend, FuseClient, FuseReply
from tests.test_differential import EXERCISED, FILE_MODES, OFFSETS, PATHS, DiffMachine

LONG_RUN = "DIFF_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("DIFF_EXAMPLES", "150"))
STEPS = int(os.environ.get("DIFF_STEPS", "50"))
# PLANE_DIFF_PLANES=python,python checks the comparison itself on two reference daemons.
PLANES = tuple(os.environ.get("PLANE_DIFF_PLANES", ",".join(DATA_PLANES)).split(","))


def _planes(*extra: str):
    p = DaemonPair(extra, planes=PLANES)
    try:
        p.start()
        yield p
        print(f"\n{' '.join(extra)}: {p.examples} examples, {p.restarts} restarts, "
              f"{p.same_bytes.checked} reply pairs compared byte for byte; requests: "
              + ", ".join(f"{k} {v}" for k, v in p.sent.most_common()))
    finally:
        p.close()


@pytest.fixture(scope="module")
def planes():
    yield from _planes("--xattr")


@pytest.fixture(scope="module")
def writeback_planes():
    yield from _planes("--xattr", "--writeback", "--cache=always")


class PlaneMachine(DiffMachine):
    """DiffMachine, and what the native handlers of CREATE, UNLINK and SETATTR do differently
    for an inode the guest still holds once its name is gone."""

    @rule(path=PATHS, mode=FILE_MODES, size=OFFSETS, chmod=FILE_MODES)
    def create_unlink_setattr(self, path, mode, size, chmod) -> None:
        """CREATE, UNLINK of the new name, then SETATTR of the nameless inode through its
        handle and through its nodeid (_check_inode_beneath passes an inode with no links)."""
        if self.pair.readonly or self.hstat(path) is not None:
            return
        h = self._create(path, mode, 0, os.O_RDWR | os.O_CREAT | os.O_EXCL, ROOT)
        if h is None:
            return
        self.remove(path, ROOT, False)
        if self.hstat(path) is None:
            self.setattr(f"SETATTR {h} size={size} (fh, unlinked)", h.nodes, ROOT, h=h,
                         size=size)
            self.setattr(f"SETATTR {h} mode={chmod:o} (unlinked)", h.nodes, ROOT,
                         mode=stat.S_IFREG | chmod, mtime=5)
        self._release(h)


def _run(pair: DaemonPair, examples: int, machine: type[DiffMachine] = DiffMachine) -> None:
    run_state_machine_as_test(
        lambda: machine(pair),
        settings=settings(max_examples=examples, stateful_step_count=STEPS, deadline=None,
                          derandomize=not LONG_RUN, database=None, print_blob=LONG_RUN,
                          suppress_health_check=list(HealthCheck)))


def test_init_replies_are_identical(planes) -> None:
    native, python = (s.init_out for s in planes.sides)
    assert native == python


def test_generated_sequences(planes) -> None:
    before = planes.same_bytes.checked
    _run(planes, EXAMPLES)
    assert set(planes.sent) >= EXERCISED, f"never sent: {sorted(EXERCISED - set(planes.sent))}"
    assert planes.same_bytes.checked - before >= EXAMPLES
    assert planes.restarts == 0


def test_generated_sequences_unlinked_inodes(planes) -> None:
    """PlaneMachine's extra rule among the others: inodes changed after their name is gone."""
    before = planes.same_bytes.checked
    sent = planes.sent.copy()
    _run(planes, max(1, EXAMPLES // 3), PlaneMachine)
    new = planes.sent - sent
    assert new[Opcode.CREATE.name] and new[Opcode.UNLINK.name] and new[Opcode.SETATTR.name]
    assert planes.same_bytes.checked > before
    assert planes.restarts == 0


def test_generated_sequences_writeback(writeback_planes) -> None:
    """Write-back caching and cache=always: other open flags and cache timeouts."""
    _run(writeback_planes, max(1, EXAMPLES // 4))
    assert writeback_planes.restarts == 0


# --- the comparison itself: what it forgives and what it catches


def _entry(nodeid: int, ino: int, mtime: int, mode: int = 0o100644) -> bytes:
    attr = fa.ATTR.pack(ino, 10, 8, mtime, mtime, mtime, 1, 2, 3, mode, 1, 0, 0, 0, 4096, 0)
    return fa.ENTRY_OUT_HEAD.pack(nodeid, 0, 1, 1, 0, 0) + attr


def test_same_bytes_forgives_times_and_renumbered_ids_only() -> None:
    sb = SameBytes(DATA_PLANES)
    ok = (FuseReply(0, _entry(7, 40, 100)), FuseReply(0, _entry(9, 40, 200)))
    sb.check(Opcode.LOOKUP, [b"a\0", b"a\0"], ok)
    # The same inode again: the pairing 7 <-> 9 holds.
    sb.check(Opcode.LOOKUP, [b"a\0", b"a\0"], ok)
    with pytest.raises(Divergence, match="paired with"):
        sb.check(Opcode.LOOKUP, [b"b\0", b"b\0"],
                 (FuseReply(0, _entry(7, 41, 1)), FuseReply(0, _entry(8, 41, 1))))
    with pytest.raises(Divergence, match="replies differ"):      # the inode number
        sb.check(Opcode.LOOKUP, [b"a\0", b"a\0"],
                 (FuseReply(0, _entry(7, 40, 1)), FuseReply(0, _entry(9, 41, 1))))
    with pytest.raises(Divergence, match="replies differ"):      # the mode
        sb.check(Opcode.LOOKUP, [b"a\0", b"a\0"],
                 (FuseReply(0, _entry(7, 40, 1)), FuseReply(0, _entry(9, 40, 1, 0o100600))))
    with pytest.raises(Divergence, match="errno"):
        sb.check(Opcode.GETATTR, [b"", b""], (FuseReply(2, b""), FuseReply(13, b"")))
    with pytest.raises(Divergence, match="replies differ"):      # data is compared as is
        sb.check(Opcode.READ, [b"", b""], (FuseReply(0, b"abc"), FuseReply(0, b"abd")))


def test_same_bytes_lets_a_released_fh_be_reused() -> None:
    sb = SameBytes(DATA_PLANES)
    opened = fa.OPEN_OUT.pack(3, 0, 0), fa.OPEN_OUT.pack(5, 0, 0)
    sb.check(Opcode.OPEN, [b"", b""], tuple(FuseReply(0, o) for o in opened))
    with pytest.raises(Divergence):
        sb.check(Opcode.OPEN, [b"", b""], (FuseReply(0, opened[0]), FuseReply(0, opened[0])))
    release = [fa.RELEASE_IN.pack(3, 0, 0, 0), fa.RELEASE_IN.pack(5, 0, 0, 0)]
    sb.check(Opcode.RELEASE, release, (FuseReply(0, b""), FuseReply(0, b"")))
    sb.check(Opcode.OPEN, [b"", b""], (FuseReply(0, opened[0]), FuseReply(0, opened[0])))


# --- the plane asked for is the plane that serves


def _all_lines(d: Daemon, timeout: float = 30.0) -> str:
    """Everything the daemon logged, once it has exited and its stderr is closed."""
    d.stop()
    while True:
        line = d.lines.get(timeout=timeout)
        if line is None:
            return d.text


@pytest.mark.parametrize("plane", DATA_PLANES)
def test_the_plane_asked_for_is_the_one_serving(daemon_factory, share, plane: str) -> None:
    """A stopped ring says how many requests the engine answered itself: some on the native
    plane (LOOKUP, GETATTR and READ are among its opcodes), never a word on the python one."""
    (share / "f").write_bytes(b"native" * 100)
    d = daemon_factory(f"--data-plane={plane}")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        node = c.lookup(fa.ROOT_ID, "f").nodeid
        assert c.getattr(node).attr.size == 600
        fh = c.open(node, os.O_RDONLY).fh
        assert c.read(node, fh, 0, 6) == b"native"
        fe.get_vring_base(1)
    finally:
        fe.close()
    found = re.findall(r"queue 1: ring stopped at \d+; (\d+) request\(s\) answered natively",
                       _all_lines(d))
    if plane == "native":
        assert found and int(found[-1]) >= 3, d.text
    else:
        assert not found, d.text
