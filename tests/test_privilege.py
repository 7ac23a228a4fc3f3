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
