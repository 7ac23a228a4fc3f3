"""virtiofsd's options that change what the guest sees, through the daemon's real socket on both
data planes: --translate-uid/--translate-gid, --xattrmap, --posix-acl, --security-label,
--killpriv-v2, --preserve-noatime, --allow-mmap.

The native engine hands every request such an option changes to the Python FuseServer
(worker/engine.c, deferred_by_options); these tests hold both planes to the same answers.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.idmap import IdMap, IdMapError
from pyvirtiofsd.common.xattrmap import XattrMap, XattrMapError
from pyvirtiofsd.worker.engine import Defer, Engine, defer_for
from pyvirtiofsd.worker.filesystem import FsOptions
from tests.conftest import DATA_PLANES
from tests.frontend import DEFAULT_INIT_FLAGS, Frontend, FuseClient, FuseError

pytestmark = pytest.mark.data_planes(*DATA_PLANES)
ROOT = fa.ROOT_ID
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as other ids needs root")

# guest uids 1000..1002 <-> host 2000..2002; guest 1003 may own nothing; host 5000..5009 look
# like guest 1002; gids: guest 1000..1002 <-> host 3000..3002, guest 1003 -> host 3003 only.
TRANSLATE = ("--translate-uid=map:1000:2000:3", "--translate-uid=forbid-guest:1003:1",
             "--translate-uid=squash-host:5000:1002:10", "--translate-gid=map:1000:3000:3",
             "--translate-gid=guest:1003:3003:1")


@pytest.fixture
def client(daemon_factory, share: Path):
    clients: list[Frontend] = []

    def start(*args: str, flags: int = DEFAULT_INIT_FLAGS) -> FuseClient:
        os.chmod(share, 0o777)
        d = daemon_factory(*args)
        fe = Frontend.connect(d.socket, process=d.proc, queues=2)
        clients.append(fe)
        c = FuseClient(fe)
        c.init(flags=flags)
        return c

    yield start
    for fe in clients:
        fe.close()


def _as(c: FuseClient, uid: int, gid: int) -> FuseClient:
    c.uid, c.gid = uid, gid
    return c


def _owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


@needs_root
def test_creations_are_owned_by_the_mapped_host_ids(client, share):
    c = _as(client(*TRANSLATE), 1001, 1002)
    d = c.mkdir(ROOT, "d", 0o777)
    assert (d.attr.uid, d.attr.gid) == (1001, 1002)
    assert _owner(share / "d") == (2001, 3002)
    e, _ = c.create(d.nodeid, "f", 0o644)
    assert (e.attr.uid, e.attr.gid) == (1001, 1002)
    assert _owner(share / "d" / "f") == (2001, 3002)
    n = c.mknod(d.nodeid, "p", 0o10644)
    s = c.symlink(d.nodeid, "l", "f")
    assert (n.attr.uid, s.attr.uid) == (1001, 1001)
    assert _owner(share / "d" / "p") == _owner(share / "d" / "l") == (2001, 3002)
    # An id no rule covers is itself.
    _as(c, 1500, 1500).mkdir(ROOT, "plain")
    assert _owner(share / "plain") == (1500, 1500)


@needs_root
def test_every_reply_shows_guest_owners(client, share):
    c = client(*TRANSLATE)
    (share / "h").write_bytes(b"x")
    os.chown(share / "h", 5007, 3001)        # squash-host: 5007 -> 1002; map: 3001 -> 1001
    (share / "u").mkdir()
    os.chown(share / "u", 7, 3003)           # unmapped uid; gid 3003 has no host->guest rule
    e = c.lookup(ROOT, "h")
    assert (e.attr.uid, e.attr.gid) == (1002, 1001)
    a = c.getattr(e.nodeid)
    assert (a.attr.uid, a.attr.gid) == (1002, 1001)
    u = c.lookup(ROOT, "u")
    assert (u.attr.uid, u.attr.gid) == (7, 3003)
    fh = c.opendir(ROOT).fh
    plus = {d.dirent.name: d.entry.attr for d in c.readdirplus(ROOT, fh)}
    c.releasedir(ROOT, fh)
    assert (plus[b"h"].uid, plus[b"h"].gid) == (1002, 1001)
    assert (plus[b"u"].uid, plus[b"u"].gid) == (7, 3003)


@needs_root
def test_chown_maps_the_new_owner(client, share):
    c = client(*TRANSLATE)
    (share / "f").write_bytes(b"")
    e = c.lookup(ROOT, "f")
    a = c.setattr(e.nodeid, uid=1000, gid=1001)
    assert (a.attr.uid, a.attr.gid) == (1000, 1001)
    assert _owner(share / "f") == (2000, 3001)
    a = c.setattr(e.nodeid, gid=1003)        # guest-only rule: 1003 -> 3003, shown as 3003
    assert _owner(share / "f") == (2000, 3003) and a.attr.gid == 3003


@needs_root
def test_forbidden_guest_ids_own_nothing(client, share):
    """virtiofsd answers EIO (its error has no errno) when a forbidden id would own an inode."""
    c = client(*TRANSLATE)
    (share / "f").write_bytes(b"")
    e = c.lookup(ROOT, "f")
    with pytest.raises(FuseError) as ei:
        c.setattr(e.nodeid, uid=1003)
    assert ei.value.errno == errno.EIO and _owner(share / "f") == (0, 0)
    _as(c, 1003, 1003)
    for make in (lambda: c.mkdir(ROOT, "d"), lambda: c.create(ROOT, "g"),
                 lambda: c.mknod(ROOT, "p", 0o10644), lambda: c.symlink(ROOT, "l", "f")):
        with pytest.raises(FuseError) as ei:
            make()
        assert ei.value.errno == errno.EIO
    assert sorted(os.listdir(share)) == ["f"]
    # Anything else runs as the overflow id: it may read what anyone may, and nothing more.
    os.chmod(share / "f", 0o600)
    assert c.getattr(e.nodeid).attr.uid == 0
    with pytest.raises(FuseError) as ei:
        c.open(e.nodeid, os.O_RDONLY)
    assert ei.value.errno == errno.EACCES


@needs_root
def test_kubevirt_squash(client, share):
    """KubeVirt: every guest id is qemu's 107 on the host; host ids are shown as they are."""
    os.chown(share, 107, 107)
    c = client("--translate-uid=squash-guest:0:107:4294967295",
               "--translate-gid=squash-guest:0:107:4294967295")
    for uid in (0, 1000):
        e = _as(c, uid, uid).mkdir(ROOT, f"by{uid}")
        assert (e.attr.uid, e.attr.gid) == (107, 107)
        assert _owner(share / f"by{uid}") == (107, 107)


# --- --xattrmap -------------------------------------------------------------------------------


def _errno(fn, *args, **kw) -> int:
    with pytest.raises(FuseError) as ei:
        fn(*args, **kw)
    return ei.value.errno


def test_xattrmap_prefixes_everything(client, share):
    c = client("--xattrmap=:map::user.virtiofs.:")
    (share / "f").write_bytes(b"")
    os.setxattr(share / "f", "user.raw", b"r")          # not under the prefix: hidden
    os.setxattr(share / "f", "user.virtiofs.trusted.t", b"t")
    e = c.lookup(ROOT, "f")
    c.setxattr(e.nodeid, "security.selinux", b"label")
    c.setxattr(e.nodeid, "user.u", b"u")
    assert set(os.listxattr(share / "f")) == {
        "user.raw", "user.virtiofs.trusted.t", "user.virtiofs.security.selinux",
        "user.virtiofs.user.u"}
    assert c.getxattr(e.nodeid, "trusted.t") == b"t"
    assert sorted(c.listxattr(e.nodeid)) == [b"security.selinux", b"trusted.t", b"user.u"]
    c.removexattr(e.nodeid, "trusted.t")
    assert "user.virtiofs.trusted.t" not in os.listxattr(share / "f")
    # The size asked about is the host's list, which is never shorter than what is shown.
    assert c.listxattr(e.nodeid, 0) == sum(len(n) + 1 for n in os.listxattr(share / "f"))


def test_xattrmap_refuses_and_hides(client, share):
    # A rule scoped `all` matches host names by PREPEND: scopes are split to keep them apart.
    c = client("--xattrmap=:ok:client:user.:: :bad:client:trusted.::"
               " :unsupported:client:security.:: :unsupported:server::security.:"
               " :ok:server::user.:")
    (share / "f").write_bytes(b"")
    os.setxattr(share / "f", "trusted.host", b"h")
    os.setxattr(share / "f", "security.host", b"h")
    os.setxattr(share / "f", "user.a", b"a")
    e = c.lookup(ROOT, "f")
    assert _errno(c.setxattr, e.nodeid, "trusted.x", b"1") == errno.EPERM
    assert _errno(c.getxattr, e.nodeid, "trusted.host") == errno.ENODATA
    assert _errno(c.removexattr, e.nodeid, "trusted.host") == errno.EPERM
    assert _errno(c.setxattr, e.nodeid, "security.x", b"1") == errno.ENOTSUP
    assert _errno(c.getxattr, e.nodeid, "security.host") == errno.ENOTSUP
    # No rule for these names: refused and hidden, never passed through (virtiofsd panics).
    assert _errno(c.setxattr, e.nodeid, "system.x", b"1") == errno.EPERM
    assert c.listxattr(e.nodeid) == [b"user.a"]
    c.setxattr(e.nodeid, "user.b", b"b")
    assert os.getxattr(share / "f", "user.b") == b"b"


def test_acl_xattrs_need_posix_acl(client, share):
    """Without --posix-acl the ACL xattrs are neither served nor listed (virtiofsd)."""
    c = client("--xattr")
    (share / "f").write_bytes(b"")
    acl = (b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff"
           + b"\x04\x00\x04\x00\xff\xff\xff\xff" + b"\x20\x00\x04\x00\xff\xff\xff\xff")
    os.setxattr(share / "f", "system.posix_acl_access", acl)
    os.setxattr(share / "f", "user.a", b"a")
    e = c.lookup(ROOT, "f")
    for name in ("system.posix_acl_access", "system.posix_acl_default", "system.posix_acl"):
        assert _errno(c.getxattr, e.nodeid, name) == errno.ENOTSUP
        assert _errno(c.setxattr, e.nodeid, name, acl) == errno.ENOTSUP
    assert c.listxattr(e.nodeid) == [b"user.a"]


@needs_root
def test_renamed_capability_is_dropped_where_the_kernel_would(client, share):
    """With security.capability renamed, the host kernel no longer drops it on a write, a
    truncate or a chown: the daemon does (virtiofsd)."""
    c = client("--xattrmap=:map::user.virtiofs.:")
    caps = b"\x01\x00\x00\x02" + b"\x00" * 16
    for name in ("w", "t", "o"):
        (share / name).write_bytes(b"data")
        os.setxattr(share / name, "user.virtiofs.security.capability", caps)
    w = c.lookup(ROOT, "w")
    fh = c.open(w.nodeid, os.O_RDWR).fh
    c.write(w.nodeid, fh, 0, b"x")
    c.setattr(c.lookup(ROOT, "t").nodeid, size=1)
    c.setattr(c.lookup(ROOT, "o").nodeid, uid=1000)
    for name in ("w", "t", "o"):
        assert "user.virtiofs.security.capability" not in os.listxattr(share / name), name


# --- --posix-acl and --security-label --------------------------------------------------------


def _acl(*entries: tuple[int, int]) -> bytes:
    """A system.posix_acl_* value (version 2) of (tag, perm) entries for the owner classes."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, 0xFFFFFFFF)
                                           for t, p in entries)


USER_OBJ, GROUP_OBJ, OTHER = 0x01, 0x04, 0x20


def test_posix_acl_needs_the_kernel_flags(client):
    """Without POSIX_ACL, DONT_MASK and SETXATTR_EXT on offer the session is refused (EPROTO),
    as virtiofsd refuses it; with them all three are negotiated."""
    c = client("--posix-acl")
    for missing in (fa.InitFlag.DONT_MASK, fa.InitFlag.POSIX_ACL, fa.InitFlag.SETXATTR_EXT):
        assert _errno(c.init, flags=DEFAULT_INIT_FLAGS & ~missing) == errno.EPROTO
        assert _errno(c.getattr, ROOT) == errno.EIO       # no session
    c.init()
    need = fa.InitFlag.POSIX_ACL | fa.InitFlag.DONT_MASK | fa.InitFlag.SETXATTR_EXT
    assert c.flags & need == need


def test_posix_acl_umask_default_acls_and_sgid(client, share):
    c = client("--posix-acl")
    d = c.mkdir(ROOT, "d", 0o777, umask=0o022)
    # DONT_MASK: the daemon applies the umask where the parent has no default ACL ...
    assert stat.S_IMODE(d.attr.mode) == 0o755
    assert stat.S_IMODE(c.create(ROOT, "g", 0o666, umask=0o077)[0].attr.mode) == 0o600
    assert stat.S_IMODE(c.mknod(ROOT, "p", 0o10666, umask=0o027).attr.mode) == 0o640
    # ... and a default ACL replaces it (acl(5)).
    c.setxattr(d.nodeid, "system.posix_acl_default",
               _acl((USER_OBJ, 6), (GROUP_OBJ, 6), (OTHER, 6)))
    assert c.listxattr(d.nodeid) == [b"system.posix_acl_default"]
    f, _ = c.create(d.nodeid, "f", 0o666, umask=0o077)
    assert stat.S_IMODE(f.attr.mode) == 0o666
    assert stat.S_IMODE(c.mkdir(d.nodeid, "e", 0o777, umask=0o077).attr.mode) == 0o666
    assert os.getxattr(share / "d" / "e", "system.posix_acl_default")
    # SETXATTR_ACL_KILL_SGID: the guest asks to drop set-group-ID with the access ACL.
    g = c.lookup(ROOT, "g")
    os.chmod(share / "g", 0o2775)
    c.setxattr(g.nodeid, "system.posix_acl_access",
               _acl((USER_OBJ, 7), (GROUP_OBJ, 5), (OTHER, 5)), 0, fa.SETXATTR_ACL_KILL_SGID)
    assert stat.S_IMODE(os.lstat(share / "g").st_mode) == 0o755


def _send_ext(c: FuseClient, opcode: int, body: bytes, ext: bytes) -> int:
    """The errno of a request sent with extensions (0: success)."""
    unique, readable = c.build(opcode, ROOT, [body, ext], total_extlen=len(ext) // 8)
    size = fa.OUT_HEADER.size + fa.ENTRY_OUT.size + fa.OPEN_OUT.size
    token = c.vq.submit(readable, [fa.OUT_HEADER.size, size - fa.OUT_HEADER.size])
    return c.parse(c.vq.wait(token), unique, size).error


def test_security_label_is_set_on_create(client, share):
    c = client("--security-label", flags=DEFAULT_INIT_FLAGS | fa.InitFlag.SECURITY_CTX)
    assert c.flags & fa.InitFlag.SECURITY_CTX
    label = fa.pack_secctx(b"security.selinux", b"system_u:object_r:foo_t:s0\0")
    mode = fa.MKNOD_IN.pack(0o10644, 0, 0)
    for opcode, body, name in (
            (fa.Opcode.MKDIR, fa.MKDIR_IN.pack(0o755, 0) + b"d\0", "d"),
            (fa.Opcode.CREATE, fa.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"f\0",
             "f"),
            (fa.Opcode.SYMLINK, b"l\0f\0", "l"), (fa.Opcode.MKNOD, mode + b"p\0", "p")):
        assert _send_ext(c, opcode, body, label) == 0
        assert os.getxattr(share / name, "security.selinux", follow_symlinks=False) == \
            b"system_u:object_r:foo_t:s0\0"
    # A context the host refuses undoes the creation (user.* xattrs exist on files only).
    bad = fa.pack_secctx(b"user.label", b"L")
    assert _send_ext(c, fa.Opcode.MKNOD, mode + b"q\0", bad) == errno.EPERM
    assert not os.path.lexists(share / "q")
    # No context (no LSM in the guest), or none at all: created without one.
    assert _send_ext(c, fa.Opcode.MKDIR, fa.MKDIR_IN.pack(0o755, 0) + b"e\0",
                     fa.SECCTX_HEADER.pack(8, 0)) == 0
    c.mkdir(ROOT, "n")
    assert "security.selinux" not in os.listxattr(share / "n")
    # Two contexts: refused, as virtiofsd does.
    two = fa.SECCTX_HEADER.pack(len(label), 2) + label[8:]
    assert _send_ext(c, fa.Opcode.MKDIR, fa.MKDIR_IN.pack(0o755, 0) + b"t\0", two) == \
        errno.EINVAL


def test_security_label_needs_the_kernel_flag(client):
    c = client("--security-label", flags=DEFAULT_INIT_FLAGS | fa.InitFlag.SECURITY_CTX)
    assert _errno(c.init, flags=DEFAULT_INIT_FLAGS) == errno.EPROTO
    assert _errno(c.getattr, ROOT) == errno.EIO


# --- --killpriv-v2, --preserve-noatime, --allow-mmap -----------------------------------------


def test_killpriv_v2_is_negotiated_only_when_asked(client):
    assert not client().flags & fa.InitFlag.HANDLE_KILLPRIV_V2      # virtiofsd's default
    assert client("--killpriv-v2").flags & fa.InitFlag.HANDLE_KILLPRIV_V2
    assert not client("--killpriv-v2", flags=DEFAULT_INIT_FLAGS
                      & ~fa.InitFlag.HANDLE_KILLPRIV_V2).flags & fa.InitFlag.HANDLE_KILLPRIV_V2


@needs_root
def test_killpriv_v2_drops_setid_bits_the_guest_asks_to(client, share):
    """With HANDLE_KILLPRIV_V2 the guest sends no SETATTR(mode) first: the flags on WRITE,
    SETATTR(size) and OPEN(O_TRUNC) ask the daemon to drop the bits, also for root (whose
    CAP_FSETID keeps the host kernel from doing it)."""
    c = client("--killpriv-v2")
    for name in ("w", "t", "o", "keep"):
        (share / name).write_bytes(b"data")
        os.chmod(share / name, 0o6755)
    w = c.lookup(ROOT, "w")
    fh = c.open(w.nodeid, os.O_RDWR).fh
    c.write(w.nodeid, fh, 0, b"x", write_flags=fa.WRITE_KILL_SUIDGID)
    c.setattr(c.lookup(ROOT, "t").nodeid, size=1, extra_valid=fa.SetattrValid.KILL_SUIDGID)
    c.open(c.lookup(ROOT, "o").nodeid, os.O_RDWR | os.O_TRUNC, fa.OPEN_KILL_SUIDGID)
    k = c.lookup(ROOT, "keep")
    c.write(k.nodeid, c.open(k.nodeid, os.O_RDWR).fh, 0, b"x")   # root, no flag: kept
    modes = {n: stat.S_IMODE(os.lstat(share / n).st_mode) for n in ("w", "t", "o", "keep")}
    assert modes == {"w": 0o755, "t": 0o755, "o": 0o755, "keep": 0o6755}


@needs_root
def test_preserve_noatime(client, share):
    """O_NOATIME is cleared unless --preserve-noatime (virtiofsd): a non-owner's open with it
    then fails as open(2) does, EPERM."""
    (share / "f").write_bytes(b"data")
    os.chmod(share / "f", 0o644)
    for args, expect in (((), 0), (("--preserve-noatime",), errno.EPERM)):
        c = _as(client(*args), 1000, 1000)
        e = c.lookup(ROOT, "f")
        if expect:
            assert _errno(c.open, e.nodeid, os.O_RDONLY | os.O_NOATIME) == expect
        else:
            c.open(e.nodeid, os.O_RDONLY | os.O_NOATIME)
    # The owner's read through an O_NOATIME open leaves the access time alone.
    c = client("--preserve-noatime")
    os.utime(share / "f", ns=(1_000_000_000, 2_000_000_000))
    e = c.lookup(ROOT, "f")
    fh = c.open(e.nodeid, os.O_RDONLY | os.O_NOATIME).fh
    assert c.read(e.nodeid, fh, 0, 4) == b"data"
    assert os.stat(share / "f").st_atime_ns == 1_000_000_000


def test_allow_mmap_negotiates_direct_io_allow_mmap(client):
    assert not client("--cache=never").flags & fa.InitFlag.DIRECT_IO_ALLOW_MMAP
    assert client("--cache=never", "--allow-mmap").flags & fa.InitFlag.DIRECT_IO_ALLOW_MMAP


# --- the rule language and the engine switch (no daemon) -------------------------------------


def test_xattrmap_rules():
    m = XattrMap(":prefix:all:trusted.:user.virtiofs.: :ok:client:user.:: :bad:server::user.:"
                 " :unsupported:all:security.:: :ok:all:::")
    assert m.to_host(b"trusted.a") == b"user.virtiofs.trusted.a"
    assert m.to_host(b"user.b") == b"user.b"
    assert m.to_guest(b"user.virtiofs.trusted.a") == b"trusted.a"
    assert m.to_guest(b"user.b") is None
    with pytest.raises(OSError) as ei:
        m.to_host(b"security.x")
    assert ei.value.errno == errno.ENOTSUP
    # On the host side the `unsupported` rule's empty PREPEND matches, and hides, every name.
    assert m.to_guest(b"security.x") is None and m.to_guest(b"system.y") is None
    # map expands to prefix, bad for the target, ok for the rest.
    k = XattrMap(":map:trusted.:user.virtiofs.:")
    assert k.to_host(b"trusted.x") == b"user.virtiofs.trusted.x"
    assert k.to_host(b"user.y") == b"user.y"
    assert k.to_guest(b"user.virtiofs.z") == b"z"     # any name under the prefix is stripped
    with pytest.raises(OSError) as ei:
        k.to_host(b"user.virtiofs.z")
    assert ei.value.errno == errno.EPERM


@pytest.mark.parametrize(("value", "message"), [
    ("foo", "xattrmap rule 1 is incomplete"),
    (":ok:all::: :rename:all:::", "rule 2: invalid type 'rename'"),
    (":ok:guest:::", "rule 1: invalid scope 'guest'"),
    (":map:a:b: :ok:all:::", "rule 1: a map rule must be the last rule"),
    ("   ", "xattrmap has no rules"),
])
def test_xattrmap_errors(value, message):
    with pytest.raises(XattrMapError, match=message):
        XattrMap(value)


def test_id_map_directions_and_defaults():
    m = IdMap(["map:10:100:5", "guest:20:200:2", "host:300:30:2", "squash-guest:40:400:3",
               "squash-host:500:50:3", "forbid-guest:60:2"])
    assert [m.to_host(i) for i in (9, 10, 14, 15, 21, 42, 300)] == [9, 100, 104, 15, 201, 400, 300]
    assert [m.to_guest(i) for i in (100, 104, 200, 301, 502, 503)] == [10, 14, 200, 31, 50, 503]
    with pytest.raises(PermissionError):
        m.to_host(61)
    assert m.to_host_or_overflow(61) == 65534 and m.to_host(62) == 62


def test_id_map_refuses_overlaps_per_direction():
    IdMap(["guest:0:10:5", "host:0:10:5"])            # one in each direction: fine
    with pytest.raises(IdMapError, match="Host-to-guest mapping 'map"):
        IdMap(["host:10:0:5", "map:100:12:1"])
    with pytest.raises(IdMapError, match="'fail \\[4, 6\\)' intersects"):
        IdMap(["squash-guest:0:1:5", "forbid-guest:4:2"])


def test_engine_defers_what_translation_changes():
    assert defer_for(None) == defer_for(FsOptions()) == Defer(0)
    assert defer_for(FsOptions(translate_gid=("map:0:1:1",))) == Defer.IDS
    e = Engine(-1, 0, 0, 1, defer_for(FsOptions(translate_uid=("map:0:1:1",))))
    try:
        assert e.defer == Defer.IDS
    finally:
        e.close()
    assert defer_for(FsOptions(xattrmap=":map:trusted.:user.virtiofs.:")) == Defer.XATTR
    assert defer_for(FsOptions(posix_acl=True)) == Defer.XATTR | Defer.CREATE
    assert defer_for(FsOptions(security_label=True)) == Defer.CREATE
    assert defer_for(FsOptions(killpriv_v2=True)) == Defer.KILLPRIV
    assert defer_for(FsOptions(preserve_noatime=True)) == Defer.OPEN
    assert defer_for(FsOptions(allow_mmap=True)) == Defer(0)      # INIT only: always Python
    assert defer_for(FsOptions(xattrmap=":map::user.virtiofs.:")) == Defer.XATTR | Defer.KILLPRIV
