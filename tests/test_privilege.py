"""What a guest caller gets from the workers' capabilities: no more than the host kernel would
give that uid.

The workers keep a file-serving capability set and act as each caller with setfsuid/setfsgid.
The kernel drops only the file-system capabilities (CAP_CHOWN, DAC_*, FOWNER, FSETID, MKNOD...)
from a process whose fsuid is not 0 (capabilities(7), "Effect of user ID changes on
capabilities"); CAP_SETFCAP, CAP_SETUID and CAP_SETGID stay, and whatever the daemon does as
itself carries all of them.  Each test is the attack through the front-end driver, with the
host-side result checked on the host; the default sandbox (namespace) is used.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from tests.conftest import Daemon
from tests.frontend import Frontend, FuseClient
from tests.test_daemon_fuse import errno_of

ROOT = fa.ROOT_ID
CAPS = "security.capability"
CAP_SYS_ADMIN = 21
# struct vfs_cap_data, revision 2 with the effective bit (linux/capability.h): cap_sys_admin=ep.
SYS_ADMIN_EP = struct.pack("<5I", 0x02000000 | 1, 1 << CAP_SYS_ADMIN, 0, 0, 0)
USER = 1000


@dataclass
class Env:
    daemon: Daemon
    root: FuseClient          # requests of guest uid 0
    user: FuseClient          # requests of guest uid/gid 1000
    share: Path


@pytest.fixture
def env(daemon_factory, share: Path) -> Iterator[Env]:
    d = daemon_factory("--sandbox=namespace", "--xattr")
    fe = Frontend.connect(d.socket, process=d.proc)
    root = FuseClient(fe)
    root.init()
    user = FuseClient(fe, uid=USER, gid=USER)
    user.flags = root.flags
    yield Env(d, root, user, share)
    fe.close()
    assert d.proc.poll() is None, d.text
    assert "Traceback" not in d.text and "SIGSYS" not in d.text, d.text


def file_caps(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, CAPS)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise


def test_only_uid_0_sets_file_capabilities(env: Env) -> None:
    """Guest uid 1000 may write the file, but setting cap_sys_admin=ep on it would give that
    capability to whoever runs it on the host: the kernel asks CAP_SETFCAP for that, which
    uid 1000 does not have."""
    f = env.share / "tool"
    f.write_bytes(b"#!/bin/sh\n")
    os.chmod(f, 0o777)                      # root's, writable by anyone
    mine = env.share / "mine"
    mine.write_bytes(b"x")
    os.chown(mine, USER, USER)
    for name in ("tool", "mine"):
        node = env.user.lookup(ROOT, name).nodeid
        assert errno_of(env.user.setxattr, node, CAPS, SYS_ADMIN_EP) == errno.EPERM
        assert file_caps(env.share / name) is None
        # The same caller's ordinary attributes still work (not a blanket refusal).
        env.user.setxattr(node, "user.note", b"ok")
    assert os.getxattr(f, "user.note") == b"ok"
    # Guest root may (it would need CAP_SETFCAP in the guest to send this).
    node = env.root.lookup(ROOT, "tool").nodeid
    env.root.setxattr(node, CAPS, SYS_ADMIN_EP)
    assert file_caps(f) == SYS_ADMIN_EP


def test_file_capabilities_are_removed_only_by_who_may_write_the_file(env: Env) -> None:
    """Removing them is what a write by a non-root user does on the host (killpriv), so a
    caller who may write the file may; one who may not gets EPERM, as on the host."""
    ro, rw = env.share / "ro", env.share / "rw"
    for path, mode in ((ro, 0o755), (rw, 0o777)):
        path.write_bytes(b"x")
        os.chmod(path, mode)
        os.setxattr(path, CAPS, SYS_ADMIN_EP)
    node = env.user.lookup(ROOT, "ro").nodeid
    assert errno_of(env.user.removexattr, node, CAPS) == errno.EPERM
    assert file_caps(ro) == SYS_ADMIN_EP
    env.user.removexattr(env.user.lookup(ROOT, "rw").nodeid, CAPS)
    assert file_caps(rw) is None


def test_set_id_bits_are_dropped_only_by_who_may_write_the_file(env: Env) -> None:
    """Without HANDLE_KILLPRIV the guest kernel drops a file's set-id bits before a write by a
    non-owner with a SETATTR of the writer's own.  That is only what a write does on the host,
    so it needs write permission: a read-only set-uid root program stays set-uid."""
    prog, shared = env.share / "prog", env.share / "shared"
    for path, mode in ((prog, 0o4755), (shared, 0o4777)):
        path.write_bytes(b"x")
        os.chmod(path, mode)
    node = env.user.lookup(ROOT, "prog").nodeid
    assert errno_of(env.user.setattr, node, mode=0o755) == errno.EPERM
    assert stat.S_IMODE(os.stat(prog).st_mode) == 0o4755
    node = env.user.lookup(ROOT, "shared").nodeid
    env.user.setattr(node, mode=0o777)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o777
    # Anything more than dropping set-id bits stays the owner's.
    os.chmod(shared, 0o4777)
    assert errno_of(env.user.setattr, node, mode=0o775) == errno.EPERM
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o4777


def test_the_rest_of_the_set_gives_a_non_root_caller_nothing(env: Env) -> None:
    """CHOWN, FSETID and the set-gid directory rules, for guest uid 1000: what the host kernel
    answers that uid (the daemon adds no path of its own where these capabilities count)."""
    os.chmod(env.share, 0o777)
    e, opened = env.user.create(ROOT, "mine", mode=0o755)
    env.user.release(e.nodeid, opened.fh)
    # CHOWN: giving a file away, or to a group one is not in.
    assert errno_of(env.user.setattr, e.nodeid, uid=0) == errno.EPERM
    # FSETID: set-gid on a file of a group one is not in is dropped silently.
    os.chown(env.share / "mine", USER, 0)
    env.user.setattr(e.nodeid, mode=0o2755)
    st = os.stat(env.share / "mine")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, 0, 0o755)
    # A set-gid directory of group 0: what is made in it takes group 0; a new file's own
    # set-gid bit is dropped for a non-member, a new directory inherits it.
    (env.share / "team").mkdir(mode=0o2777)
    os.chmod(env.share / "team", 0o2777)
    team = env.user.lookup(ROOT, "team").nodeid
    f, opened = env.user.create(team, "f", mode=0o2775)
    env.user.release(f.nodeid, opened.fh)
    env.user.mkdir(team, "d", mode=0o755)
    st = os.stat(env.share / "team" / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, 0, 0o775)
    st = os.stat(env.share / "team" / "d")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, 0, 0o2755)


# --- device nodes ---------------------------------------------------------------------------------


def test_guest_root_makes_no_host_device_node(env: Env) -> None:
    """A guest-made 1:11 is the host's /dev/kmsg for any host user the node's mode lets in;
    8:0 would be the host's first disk.  Refused (EPERM, what mknod(2) says without
    CAP_MKNOD) unless --allow-device-nodes; overlayfs whiteouts (0:0) still work."""
    c = env.root
    for name, kind, rdev in (("kmsg", stat.S_IFCHR, os.makedev(1, 11)),
                             ("sda", stat.S_IFBLK, os.makedev(8, 0)),
                             ("zero-blk", stat.S_IFBLK, 0)):
        assert errno_of(c.mknod, ROOT, name, kind | 0o666, rdev) == errno.EPERM, name
    assert os.listdir(env.share) == []
    wh = c.mknod(ROOT, "wh", stat.S_IFCHR | 0o000, 0)
    assert stat.S_ISCHR(wh.attr.mode) and wh.attr.rdev == 0
    c.mknod(ROOT, "a", stat.S_IFREG | 0o644)
    c.rename2(ROOT, "a", ROOT, "b", fa.RENAME_WHITEOUT)
    c.mknod(ROOT, "fifo", stat.S_IFIFO | 0o644)
    kinds = {n: (stat.S_IFMT(os.lstat(env.share / n).st_mode), os.lstat(env.share / n).st_rdev)
             for n in os.listdir(env.share)}
    assert kinds == {"wh": (stat.S_IFCHR, 0), "a": (stat.S_IFCHR, 0), "b": (stat.S_IFREG, 0),
                     "fifo": (stat.S_IFIFO, 0)}


def _worker_pids(d: Daemon) -> list[int]:
    from tests.test_seccomp import descendants
    return [p for p, n in descendants(d.proc.pid).items() if n.startswith("pyvfs-q")]


def _cap_eff(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))


CAP_MKNOD = 27


def test_allow_device_nodes_lets_guest_root_make_them(daemon_factory, share: Path) -> None:
    d = daemon_factory("--sandbox=namespace")
    # Without the option no worker can make a device node, whatever it is made to do.
    assert all(not _cap_eff(p) & 1 << CAP_MKNOD for p in _worker_pids(d))
    d = daemon_factory("--sandbox=namespace", "--allow-device-nodes")
    assert all(_cap_eff(p) & 1 << CAP_MKNOD for p in _worker_pids(d))
    with Frontend.connect(d.socket, process=d.proc) as fe:
        c = FuseClient(fe)
        c.init()
        e = c.mknod(ROOT, "kmsg", stat.S_IFCHR | 0o600, os.makedev(1, 11))
        assert e.attr.rdev == os.makedev(1, 11)
        # Made, never opened by the daemon.
        assert errno_of(c.open, e.nodeid, os.O_RDONLY) == errno.ENXIO
        user = FuseClient(fe, uid=USER, gid=USER)
        user.flags = c.flags
        os.chmod(share, 0o777)
        assert errno_of(user.mknod, ROOT, "null", stat.S_IFCHR | 0o666,
                        os.makedev(1, 3)) == errno.EPERM
    st = os.lstat(share / "kmsg")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 11)
    assert not (share / "null").exists()


def _mount_options(pid: int) -> dict[str, set[str]]:
    """Mount point (as the process sees it) -> its per-mount options."""
    out = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            out[fields[4]] = set(fields[5].split(","))
    return out


def test_the_share_is_nodev_and_nosuid_inside_the_sandbox(daemon_factory, share: Path) -> None:
    """A compromised worker that makes or finds a device node in the share cannot open it
    (the host's disk, /dev/kmsg): every mount of the share the workers see is nodev, and
    nosuid, since the daemon neither opens devices nor runs programs."""
    (share / "sub").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "below", str(share / "sub")],
                   check=True)
    try:
        d = daemon_factory("--sandbox=namespace")
        for pid in _worker_pids(d):
            mounts = _mount_options(pid)
            assert {"/", "/sub"} <= mounts.keys(), mounts
            for point, opts in mounts.items():
                assert {"nodev", "nosuid"} <= opts, (point, opts)
        d.stop()
        # Nothing of it reaches the host's mounts.
        host = _mount_options(os.getpid())
        assert "nodev" not in host[str(share / "sub")]
    finally:
        subprocess.run(["umount", "-l", str(share / "sub")], check=False)
