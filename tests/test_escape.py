"""Nothing the guest sends reaches outside the share, in every sandbox mode.

Each test runs against a daemon in `namespace`, `chroot` and `none` mode -- the last has no
isolation at all, so there the passthrough's own confinement (single-component names, openat2
RESOLVE_BENEATH, no symlink ever followed, the still-beneath-the-root check of directories) is
all there is.  A directory `outside` next to the share holds what must never be read or changed;
every test compares it, byte for byte and stat for stat, before and after.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from tests.conftest import DATA_PLANES, Daemon
from tests.frontend import Frontend, FuseClient
from tests.test_daemon_fuse import errno_of, tree

# Every test on both data planes: the engine must answer as the reference does.
pytestmark = pytest.mark.data_planes(*DATA_PLANES)
ROOT = fa.ROOT_ID
MODES = ["namespace", "chroot", "none"]
O = fa.Opcode  # noqa: E741


@dataclass
class Env:
    daemon: Daemon
    client: FuseClient
    share: Path
    outside: Path

    def refused(self, opcode: int, nodeid: int, body: bytes, allowed: tuple[int, ...]) -> int:
        r = self.client.request(opcode, nodeid, body)
        assert r.error in allowed, (opcode, nodeid, body, r)
        return r.error


@pytest.fixture(params=MODES)
def env(request, daemon_factory, share: Path, tmp_path: Path) -> Iterator[Env]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"outside secret")
    os.chmod(outside / "secret", 0o600)
    (outside / "dir").mkdir()
    (outside / "dir" / "inner").write_bytes(b"inner")
    d = daemon_factory(f"--sandbox={request.param}", "--xattr")
    fe = Frontend.connect(d.socket, process=d.proc)
    c = FuseClient(fe)
    c.init()
    e = Env(d, c, share, outside)
    before = tree(outside)
    yield e
    fe.close()
    assert d.proc.poll() is None, d.text
    assert tree(outside) == before, "something outside the share changed"
    assert "Traceback" not in d.text and "SIGSYS" not in d.text, d.text


def test_dotdot_from_the_root_is_the_root(env: Env) -> None:
    c = env.client
    share_ino = os.stat(env.share).st_ino
    up = c.lookup(ROOT, "..")
    assert up.attr.ino == share_ino
    assert c.lookup(up.nodeid, "..").attr.ino == share_ino
    assert errno_of(c.lookup, up.nodeid, "outside") == errno.ENOENT
    sub = c.mkdir(ROOT, "sub").nodeid
    # '..' of anything else is never resolved.
    assert errno_of(c.lookup, sub, "..") == errno.ENOENT
    fh = c.opendir(up.nodeid).fh
    assert {d.name for d in c.readdir_all(up.nodeid, fh)} == {b".", b"..", b"sub"}


@pytest.mark.parametrize("name", [b"..", b"../outside", b"../outside/secret", b"/etc/passwd",
                                  b"sub/../../outside", b"/", b"a/", b"."])
def test_names_with_a_slash_or_dots_are_refused(env: Env, name: bytes) -> None:
    (env.share / "sub").mkdir()
    (env.share / "sub" / "x").write_bytes(b"x")
    (env.share / "file").write_bytes(b"file")
    before = tree(env.share)
    c = env.client
    sub = c.lookup(ROOT, "sub").nodeid
    file = c.lookup(ROOT, "file").nodeid
    bad = (errno.EINVAL, errno.ENOENT, errno.EEXIST, errno.EPERM, errno.EISDIR,
           errno.ENOTEMPTY, errno.EBUSY)
    for opcode, nodeid, body in [
        (O.MKDIR, sub, fa.MKDIR_IN.pack(0o755, 0) + name + b"\0"),
        (O.CREATE, sub, fa.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + name + b"\0"),
        (O.MKNOD, sub, fa.MKNOD_IN.pack(stat.S_IFREG | 0o644, 0, 0) + name + b"\0"),
        (O.SYMLINK, sub, name + b"\0target\0"),
        (O.UNLINK, sub, name + b"\0"),
        (O.RMDIR, sub, name + b"\0"),
        (O.RENAME, sub, fa.RENAME_IN.pack(ROOT) + b"x\0" + name + b"\0"),
        (O.RENAME, ROOT, fa.RENAME_IN.pack(sub) + name + b"\0moved\0"),
        (O.LINK, sub, fa.LINK_IN.pack(file) + name + b"\0"),
    ]:
        env.refused(opcode, nodeid, body, bad)
    if name not in (b".", b".."):
        env.refused(O.LOOKUP, sub, name + b"\0", (errno.EINVAL, errno.ENOENT))
    assert tree(env.share) == before


def test_symlinks_pointing_outside_are_never_followed(env: Env) -> None:
    share, outside, c = env.share, env.outside, env.client
    (share / "sub").mkdir()
    links = {
        "abs_dir": str(outside), "abs_file": str(outside / "secret"),
        "rel_dir": os.path.relpath(outside, share),
        "rel_file": os.path.relpath(outside / "secret", share),
        "sub/deep": os.path.relpath(outside / "dir", share / "sub"),
        "loop1": "loop2", "loop2": "loop1", "self": "self",
    }
    for name, target in links.items():
        os.symlink(target, share / name)
    sub = c.lookup(ROOT, "sub").nodeid
    for name, target in links.items():
        parent, base = (sub, name[4:]) if name.startswith("sub/") else (ROOT, name)
        e = c.lookup(parent, base)
        assert stat.S_ISLNK(e.attr.mode), name
        assert c.readlink(e.nodeid) == target.encode()
        assert errno_of(c.lookup, e.nodeid, "secret") == errno.ENOTDIR
        assert errno_of(c.lookup, e.nodeid, "inner") == errno.ENOTDIR
        for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            assert errno_of(c.open, e.nodeid, flags) == errno.ELOOP
        assert errno_of(c.opendir, e.nodeid) in (errno.ENOTDIR, errno.ELOOP)
        assert errno_of(c.mkdir, e.nodeid, "new") in (errno.ENOTDIR, errno.ELOOP)
        assert errno_of(c.create, e.nodeid, "new") in (errno.ENOTDIR, errno.ELOOP)
        assert errno_of(c.setattr, e.nodeid, size=0) == errno.ELOOP
        assert errno_of(c.getxattr, e.nodeid, "user.x") in (errno.ENODATA, errno.EPERM,
                                                            errno.ENOTSUP)
        # Creating a file over the link's name neither follows it nor replaces it.
        assert errno_of(c.create, parent, base) in (errno.EEXIST, errno.ELOOP)
    # A link the guest makes is just as inert.
    mine = c.symlink(ROOT, "mine", str(outside / "dir"))
    assert errno_of(c.lookup, mine.nodeid, "inner") == errno.ENOTDIR
    assert errno_of(c.rename, ROOT, "self", mine.nodeid, "x") in (errno.ENOTDIR, errno.ELOOP)
    assert sorted(os.listdir(share / "sub")) == ["deep"]


def test_directory_moved_out_from_under_an_open_handle(env: Env) -> None:
    share, outside, c = env.share, env.outside, env.client
    (share / "d" / "sub").mkdir(parents=True)
    (share / "d" / "a").write_bytes(b"a")
    d = c.lookup(ROOT, "d").nodeid
    sub = c.lookup(d, "sub").nodeid
    a = c.lookup(d, "a").nodeid
    fh = c.opendir(d).fh
    assert {e.name for e in c.readdir_all(d, fh)} == {b".", b"..", b"a", b"sub"}
    # The host moves the directory out of the share while the guest holds it open.
    os.rename(share / "d", outside / "d")
    (outside / "d" / "planted").write_bytes(b"not for the guest")
    before = tree(outside)
    assert errno_of(c.lookup, d, "planted") == errno.ENOENT
    assert errno_of(c.lookup, sub, "x") == errno.ENOENT
    assert errno_of(c.readdir, d, fh) == errno.ENOENT
    assert errno_of(c.opendir, d) == errno.ENOENT
    assert errno_of(c.opendir, sub) == errno.ENOENT
    assert errno_of(c.mkdir, d, "x") == errno.ENOENT
    assert errno_of(c.create, d, "y") == errno.ENOENT
    assert errno_of(c.mknod, sub, "n", stat.S_IFIFO | 0o644) == errno.ENOENT
    assert errno_of(c.symlink, d, "s", "t") == errno.ENOENT
    assert errno_of(c.unlink, d, "planted") == errno.ENOENT
    assert errno_of(c.rmdir, d, "sub") == errno.ENOENT
    assert errno_of(c.rename, d, "planted", ROOT, "stolen") == errno.ENOENT
    assert errno_of(c.rename, ROOT, "..", d, "x") in (errno.EINVAL, errno.ENOENT)
    assert errno_of(c.link, a, d, "l") == errno.ENOENT
    assert os.listdir(share) == []
    assert tree(outside) == before
    # Moved back, it is served again: the check is about where it is, not what it is.
    os.rename(outside / "d", share / "d")
    assert c.lookup(d, "planted").attr.size == len(b"not for the guest")
    c.releasedir(d, fh)


def test_nothing_moved_out_of_the_share_is_changed_through_what_the_guest_held(
        env: Env) -> None:
    """A directory the host moves out of the share takes no change through the nodeids and
    handles the guest held: not its own mode, owner, times or xattrs (default ACLs
    included), no O_TMPFILE in it, and none of the files it took along (SETATTR with or
    without a handle, new handles for writing, LINK back into the share)."""
    share, outside, c = env.share, env.outside, env.client
    (share / "d" / "sub").mkdir(parents=True)
    (share / "d" / "a").write_bytes(b"a")
    os.setxattr(share / "d", "user.keep", b"1")
    os.setxattr(share / "d" / "a", "user.keep", b"1")
    d = c.lookup(ROOT, "d").nodeid
    sub = c.lookup(d, "sub").nodeid
    a = c.lookup(d, "a").nodeid
    fh = c.open(a, os.O_RDWR).fh
    os.rename(share / "d", outside / "d")
    before = tree(outside)
    acl = (b"\x02\x00\x00\x00" + b"\x01\x00\x07\x00\xff\xff\xff\xff"
           + b"\x04\x00\x07\x00\xff\xff\xff\xff" + b"\x20\x00\x07\x00\xff\xff\xff\xff")
    for node in (d, sub, a):
        assert errno_of(c.setattr, node, mode=0o777) == errno.ENOENT
        assert errno_of(c.setattr, node, uid=1000, gid=1000) == errno.ENOENT
        assert errno_of(c.setattr, node, atime=(1, 0), mtime=(1, 0)) == errno.ENOENT
        assert errno_of(c.setxattr, node, "user.x", b"planted") == errno.ENOENT
        assert errno_of(c.removexattr, node, "user.keep") in (errno.ENOENT, errno.ENODATA)
    for node in (d, sub):
        # Without --posix-acl the ACL names are refused before the inode is looked at.
        assert errno_of(c.setxattr, node, "system.posix_acl_default", acl) == errno.ENOTSUP
        assert errno_of(c.open, node, os.O_TMPFILE | os.O_RDWR) == errno.ENOENT
    assert errno_of(c.setattr, a, size=0) == errno.ENOENT
    assert errno_of(c.setattr, a, size=0, fh=fh) == errno.ENOENT
    assert errno_of(c.setattr, a, mode=0o666, fh=fh) == errno.ENOENT
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert errno_of(c.open, a, flags) == errno.ENOENT
    assert errno_of(c.link, a, ROOT, "back") == errno.ENOENT
    assert os.listdir(share) == [] and tree(outside) == before
    # Moved back, everything is served again.
    os.rename(outside / "d", share / "d")
    c.setattr(d, mode=0o750)
    c.setattr(a, size=0, fh=fh)
    c.release(a, c.open(a, os.O_RDWR | os.O_TRUNC).fh)
    c.release(a, fh)
    assert stat.S_IMODE(os.stat(share / "d").st_mode) == 0o750
    assert os.path.getsize(share / "d" / "a") == 0


def test_a_file_the_guest_unlinked_can_still_be_changed_through_its_handle(env: Env) -> None:
    """Only a name leading outside is refused: a file with no name left (unlinked while
    open, or made with O_TMPFILE), or whose name is gone while another link stays, is the
    guest's own."""
    c = env.client
    e, opened = c.create(ROOT, "tmp", mode=0o600)
    fh = opened.fh
    c.write(e.nodeid, fh, 0, b"data")
    c.unlink(ROOT, "tmp")
    c.setattr(e.nodeid, size=1, fh=fh)
    c.setattr(e.nodeid, mode=0o640)
    assert c.getattr(e.nodeid).attr.size == 1
    c.release(e.nodeid, fh)
    tmp = c.open(ROOT, os.O_TMPFILE | os.O_RDWR).fh
    c.release(ROOT, tmp)
    assert os.listdir(env.share) == []
    # Looked up by a name that is gone, still linked by another: the guest's own file.
    e, opened = c.create(ROOT, "a", mode=0o600)
    c.release(e.nodeid, opened.fh)
    c.link(e.nodeid, ROOT, "b")
    c.unlink(ROOT, "a")
    c.setattr(e.nodeid, mode=0o644)
    c.release(e.nodeid, c.open(e.nodeid, os.O_RDWR | os.O_TRUNC).fh)
    assert stat.S_IMODE(os.stat(env.share / "b").st_mode) == 0o644
    c.unlink(ROOT, "b")


def test_hard_links_placed_by_the_host_expose_that_file_only(env: Env) -> None:
    share, outside, c = env.share, env.outside, env.client
    secret = outside / "secret"
    os.link(secret, share / "hl")
    # The host shared this inode: it is the file, whichever name the guest sees it by.
    e = c.lookup(ROOT, "hl")
    st = os.stat(secret)
    assert (e.attr.ino, e.attr.nlink) == (st.st_ino, 2)
    # Nothing leads from it to the directory it also lives in.
    assert errno_of(c.lookup, e.nodeid, "..") in (errno.ENOENT, errno.ENOTDIR)
    assert errno_of(c.lookup, e.nodeid, "dir") == errno.ENOTDIR
    assert errno_of(c.opendir, e.nodeid) == errno.ENOTDIR
    # Names the guest gives it are share names; removing them never touches the outside name.
    c.link(e.nodeid, ROOT, "hl2")
    c.rename(ROOT, "hl", ROOT, "renamed")
    c.unlink(ROOT, "renamed")
    c.unlink(ROOT, "hl2")
    assert os.listdir(share) == []
    assert os.stat(secret).st_nlink == 1 and secret.read_bytes() == b"outside secret"


def test_proc_magic_links_are_never_followed(env: Env) -> None:
    share, c = env.share, env.client
    targets = {"fd": "/proc/self/fd", "fd3": "/proc/self/fd/3", "cwd": "/proc/self/cwd",
               "root": "/proc/self/root", "init": "/proc/1/root", "etc": "/proc/1/root/etc"}
    for name, target in targets.items():
        os.symlink(target, share / name)
    guest = c.symlink(ROOT, "guest", "/proc/self/root/etc/passwd").nodeid
    for name, target in targets.items():
        e = c.lookup(ROOT, name)
        assert stat.S_ISLNK(e.attr.mode) and c.readlink(e.nodeid) == target.encode()
        for sub in ("etc", "0", "3", "passwd"):
            assert errno_of(c.lookup, e.nodeid, sub) == errno.ENOTDIR
        assert errno_of(c.open, e.nodeid, os.O_RDONLY) == errno.ELOOP
        assert errno_of(c.opendir, e.nodeid) in (errno.ENOTDIR, errno.ELOOP)
        assert errno_of(c.mkdir, e.nodeid, "x") in (errno.ENOTDIR, errno.ELOOP)
    assert errno_of(c.open, guest, os.O_RDWR) == errno.ELOOP
    # "proc" is only a name in the share: there is no /proc in reach of a name.
    assert errno_of(c.lookup, ROOT, "proc") == errno.ENOENT
    proc = c.mkdir(ROOT, "proc").nodeid
    assert errno_of(c.lookup, proc, "self") == errno.ENOENT
    assert sorted(os.listdir(share)) == sorted([*targets, "guest", "proc"])
