"""Real programs on a daemon's share, mounted on the host through the FUSE bridge.

Each workload runs against pyvirtiofsd (two request queues) and, for comparison, against the
Rust virtiofsd: tar extract + diff, cp -a of hard links / symlinks / sparse files / xattrs, git,
SQLite transactions with an integrity check, shutil.copytree/rmtree, and a writer and a reader
running at once with checksums.  Workloads run in child processes: a process that faults on an
mmap of the mount must never be the one whose threads serve that mount.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bridge import Bridge
from tests.frontend import ANCHOR, anchor_argv, start_daemon, stop_daemon

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="mounting through /dev/fuse needs root")


@dataclass
class Mounted:
    kind: str
    mnt: Path
    share: Path
    bridge: Bridge
    proc: object


@pytest.fixture(params=["pyvirtiofsd", "virtiofsd"])
def mounted(request, tmp_path, share, daemon_factory):
    kind = request.param
    # Somewhere every user can reach (pytest's tmp_path is root's alone).
    mntdir = tempfile.mkdtemp(prefix="vfsmnt-")
    os.chmod(mntdir, 0o755)
    mnt = Path(mntdir) / "mnt"
    mnt.mkdir()
    sockdir = None
    if kind == "pyvirtiofsd":
        d = daemon_factory("--xattr", "--request-queues=2")
        sock, proc, queues = d.socket, d.proc, 2
    else:
        if not os.path.exists(ANCHOR):
            pytest.skip(f"Rust virtiofsd anchor not installed at {ANCHOR}")
        sockdir = tempfile.mkdtemp(prefix="vfsb-")
        sock = os.path.join(sockdir, "s")
        proc = start_daemon(anchor_argv(sock, str(share), "--xattr"),
                            str(tmp_path / "anchor.log"))
        queues = 1
    try:
        with Bridge(sock, str(mnt), queues=queues, process=proc) as b:
            yield Mounted(kind, mnt, share, b, proc)
        assert not b.errors, b.errors
        # The daemon exits when its front-end (the bridge) disconnects.
        assert proc.wait(20) == 0
    finally:
        if kind != "pyvirtiofsd":
            stop_daemon(proc)
            shutil.rmtree(sockdir, ignore_errors=True)
        os.rmdir(mnt)
        os.rmdir(mntdir)


def run(*argv: str, cwd: Path | None = None, env: dict | None = None, user: int | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    argv = list(argv)
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check and r.returncode:
        raise AssertionError(f"{argv} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def python(code: str, *args: str) -> str:
    """Run a Python snippet in a child process; returns its stdout."""
    return run(sys.executable, "-c", textwrap.dedent(code), *map(str, args)).stdout


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def describe(root: Path, *, times: bool = False, owners: bool = True) -> dict:
    """{relative path: what cp -a / tar -p must preserve} and the hard-link groups."""
    out = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            item: dict = {"mode": oct(st.st_mode)}
            if owners:
                item["owner"] = (st.st_uid, st.st_gid)
            if times and not stat.S_ISLNK(st.st_mode):
                item["mtime"] = st.st_mtime_ns
            if stat.S_ISREG(st.st_mode):
                item.update(size=st.st_size, data=digest(p))
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                item["target"] = os.readlink(p)
            if not stat.S_ISLNK(st.st_mode):
                item["xattrs"] = {n: os.getxattr(p, n) for n in sorted(os.listxattr(p))
                                  if n.startswith("user.")}
            out[rel] = item
    return {"entries": out, "links": sorted(sorted(v) for v in inodes.values())}


def make_tree(root: Path) -> None:
    """A source tree with the things copies get wrong."""
    (root / "dir" / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "small.txt").write_text("hello\n")
    (root / "dir" / "page").write_bytes(bytes(range(256)) * 16)
    (root / "dir" / "sub" / "big.bin").write_bytes(os.urandom(3 * (1 << 20) + 12345))
    (root / "dir" / "sub" / "deeper" / "odd").write_bytes(os.urandom(4097))
    with open(root / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(8 << 20)
        f.write(b"tail")
    os.link(root / "small.txt", root / "dir" / "hardlink")
    os.link(root / "small.txt", root / "dir" / "sub" / "hardlink2")
    os.symlink("small.txt", root / "rel-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.symlink("../../small.txt", root / "dir" / "sub" / "up-link")
    os.setxattr(root / "small.txt", "user.colour", b"blue")
    os.setxattr(root / "dir", "user.empty", b"")
    os.setxattr(root / "dir" / "page", "user.big", os.urandom(1000))
    os.chmod(root / "dir" / "sub" / "deeper" / "odd", 0o751)
    os.chmod(root / "dir" / "sub", 0o2750)
    os.chown(root / "dir" / "page", 1000, 1001)
    os.utime(root / "empty.txt", ns=(1_000_000_000, 1_234_567_890_123_456_789))


def test_tar_extract_and_diff(mounted, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    tarball = tmp_path / "src.tar"
    xattrs = ("--xattrs", "--xattrs-include=user.*")
    run("tar", *xattrs, "-cf", str(tarball), "-C", str(src), ".")
    dst = mounted.mnt / "x"
    dst.mkdir()
    run("tar", *xattrs, "-xpf", str(tarball), "-C", str(dst))
    run("diff", "-r", "--no-dereference", str(src), str(dst))
    assert describe(dst) == describe(src)
    # What the daemon wrote is what the host holds.
    assert describe(mounted.share / "x") == describe(src)
    # And back out again: tar of the mount reproduces the archive's members.
    listing = run("tar", "-tvf", str(tarball)).stdout.splitlines()
    again = tmp_path / "again.tar"
    run("tar", *xattrs, "-cf", str(again), "-C", str(dst), ".")
    assert run("tar", "-tvf", str(again)).stdout.splitlines() == listing


def test_cp_a_links_sparse_files_and_xattrs(mounted, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    run("cp", "-a", str(src), str(mounted.mnt / "copy"))
    copy = mounted.mnt / "copy"
    want = describe(src, times=True)
    assert describe(copy, times=True) == want
    assert describe(mounted.share / "copy", times=True) == want
    # Hard links are one inode on the mount too, and the holes survived on the host.
    assert os.stat(copy / "small.txt").st_ino == os.stat(copy / "dir" / "hardlink").st_ino
    assert os.stat(copy / "small.txt").st_nlink == 3
    sparse = os.stat(mounted.share / "copy" / "sparse")
    assert sparse.st_size == (8 << 20) + 4 and sparse.st_blocks * 512 < 1 << 20
    got = run("getfattr", "--absolute-names", "-n", "user.colour", "--only-values",
              str(copy / "small.txt")).stdout
    assert got == "blue"


def test_git_init_add_commit_log(mounted):
    repo = mounted.mnt / "repo"
    repo.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(repo), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.org"}

    def git(*args: str) -> str:
        return run("git", *args, cwd=repo, env=env).stdout

    git("init", "-q", "-b", "main")
    for i in range(5):
        (repo / f"file{i}.txt").write_text(f"version {i}\n" * (i + 1) * 100)
        (repo / "sub").mkdir(exist_ok=True)
        (repo / "sub" / f"n{i}").write_bytes(os.urandom(5000))
        git("add", "-A")
        git("commit", "-q", "-m", f"commit {i}")
    git("mv", "file0.txt", "renamed.txt")
    git("rm", "-q", "file1.txt")
    git("commit", "-q", "-m", "rename and remove")
    git("gc", "-q")
    log = git("log", "--format=%s").splitlines()
    assert log == ["rename and remove", *[f"commit {i}" for i in reversed(range(5))]]
    git("fsck", "--strict")
    assert git("status", "--porcelain") == ""
    assert git("show", "HEAD~5:file0.txt") == "version 0\n" * 100


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite_transactions_and_integrity_check(mounted, journal):
    db = mounted.mnt / "test.db"
    out = python("""
        import sqlite3, sys
        db = sqlite3.connect(sys.argv[1], isolation_level=None)
        db.execute(f"PRAGMA journal_mode={sys.argv[2]}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
        db.execute("CREATE INDEX tv ON t(v)")
        for i in range(400):
            db.execute("BEGIN")
            db.execute("INSERT INTO t (v, b) VALUES (?, randomblob(?))", (f"row {i}", i * 7))
            if i % 10 == 9:
                db.execute("DELETE FROM t WHERE id = ?", (i - 5,))
                db.execute("UPDATE t SET v = v || '!' WHERE id % 7 = 0")
            db.execute("COMMIT")
        db.execute("BEGIN")
        db.execute("INSERT INTO t (v) VALUES ('rolled back')")
        db.execute("ROLLBACK")
        db.execute("VACUUM")
        print(db.execute("PRAGMA integrity_check").fetchone()[0])
        print(db.execute("SELECT count(*) FROM t").fetchone()[0])
        db.close()
    """, db, journal).split()
    assert out == ["ok", "360"]
    # A second process sees the same database through the host directory.
    out = python("""
        import sqlite3, sys
        db = sqlite3.connect(sys.argv[1])
        print(db.execute("PRAGMA integrity_check").fetchone()[0],
              db.execute("SELECT count(*) FROM t WHERE v = 'rolled back'").fetchone()[0])
    """, mounted.share / "test.db").split()
    assert out == ["ok", "0"]


def test_shutil_copytree_and_rmtree(mounted, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    python("""
        import shutil, sys
        shutil.copytree(sys.argv[1], sys.argv[2], symlinks=True)
    """, src, mounted.mnt / "tree")
    # copytree copies each hard link as a file of its own.
    copied = describe(mounted.mnt / "tree", owners=False)["entries"]
    assert copied == describe(src, owners=False)["entries"]
    python("""
        import shutil, sys
        shutil.rmtree(sys.argv[1])
    """, mounted.mnt / "tree")
    assert not (mounted.mnt / "tree").exists()
    assert os.listdir(mounted.share) == []
    # The removed inodes were forgotten through the hiprio queue.
    b = mounted.bridge
    assert b.counts["FORGET"] + b.counts["BATCH_FORGET"] > 0 and b.per_queue[0] > 0


def test_concurrent_writer_and_reader_with_checksums(mounted):
    """A writer appends checksummed records while a reader follows the file; other writers
    fill their own files at the same time."""
    script = """
        import hashlib, os, sys, time
        role, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
        REC = 4096

        def record(i):
            body = ((f"{i:08d}".encode() + os.urandom(56)) * (REC // 64))[:REC - 32]
            return body + hashlib.sha256(body).digest()

        if role == "writer":
            with open(path, "ab", buffering=0) as f:
                for i in range(n):
                    f.write(record(i))
                    if i % 64 == 0:
                        os.fsync(f.fileno())
            print("wrote", n)
        else:
            deadline = time.monotonic() + 100
            seen, pos = 0, 0
            while not os.path.exists(path):
                time.sleep(0.01)
            with open(path, "rb", buffering=0) as f:
                while seen < n:
                    f.seek(pos)
                    chunk = f.read(REC)
                    if len(chunk) < REC:
                        if time.monotonic() > deadline:
                            sys.exit(f"stuck at record {seen}")
                        time.sleep(0.002)
                        continue
                    body, digest = chunk[:-32], chunk[-32:]
                    assert hashlib.sha256(body).digest() == digest, f"record {seen} corrupt"
                    assert int(body[:8]) == seen, f"record {seen} out of order"
                    seen += 1
                    pos += REC
            print("read", seen)
    """
    n = 1500
    code = textwrap.dedent(script)
    target = mounted.mnt / "stream"
    procs = [subprocess.Popen([sys.executable, "-c", code, "reader", str(target), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    for name in ("stream", "side1", "side2"):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", code, "writer", str(mounted.mnt / name), str(n)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    assert [r[0].split() for r in results] == [["read", str(n)]] + [["wrote", str(n)]] * 3
    for name in ("stream", "side1", "side2"):
        data = (mounted.share / name).read_bytes()
        assert len(data) == n * 4096
        for i in range(0, len(data), 4096):
            rec = data[i:i + 4096]
            assert hashlib.sha256(rec[:-32]).digest() == rec[-32:]
    assert mounted.bridge.counts["WRITE"] >= 3 * n
    if mounted.kind == "pyvirtiofsd":
        # The requests were spread over both request queues.
        assert mounted.bridge.per_queue[1] > n and mounted.bridge.per_queue[2] > n


def test_non_owner_writes_a_setid_file(mounted):
    """A user who may write a set-user-ID file it does not own: the kernel drops the bit with a
    SETATTR as that user before the write (no HANDLE_KILLPRIV) and the write succeeds."""
    f = mounted.mnt / "setuid"
    f.write_bytes(b"original\n")
    os.chmod(f, 0o4777)
    run("sh", "-c", f"echo appended >> {f}", user=1000)
    st = os.stat(mounted.share / "setuid")
    assert stat.S_IMODE(st.st_mode) == 0o777
    assert (mounted.share / "setuid").read_bytes() == b"original\nappended\n"
    # And files an unprivileged user creates are its own on the host.
    os.chmod(mounted.mnt, 0o777)
    run("sh", "-c", f"echo mine > {mounted.mnt / 'mine'}", user=1000)
    st = os.stat(mounted.share / "mine")
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_access_through_a_supplementary_group(mounted):
    """FUSE carries the caller's uid and gid only; access the guest grants through one of its
    supplementary groups must work on the host too."""
    team = mounted.mnt / "team"
    team.mkdir()
    os.chown(team, 0, 1005)
    # Search permission through the supplementary group alone (docs/differences.md).
    os.chmod(team, 0o770)
    (team / "notes").write_text("shared\n")
    os.chown(team / "notes", 0, 1005)
    os.chmod(team / "notes", 0o660)
    member = ["setpriv", "--reuid=1000", "--regid=1000", "--groups=1005"]

    def sh(script: str) -> subprocess.CompletedProcess:
        return subprocess.run([*member, "sh", "-c", script], cwd="/", capture_output=True,
                              text=True, timeout=TIMEOUT)

    r = sh(f"cat {team}/notes && echo more >> {team}/notes && ls {team} && "
           f"mv {team}/notes {team}/renamed && touch {team}/new && chgrp 1005 {team}/new && "
           f"rm {team}/renamed")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["shared", "notes"]
    st = os.stat(mounted.share / "team" / "new")
    assert (st.st_uid, st.st_gid) == (1000, 1005)
    assert sorted(os.listdir(mounted.share / "team")) == ["new"]
    # Without the group the guest refuses.
    r = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "touch",
                        str(team / "x")], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_daemon_death_fails_requests_instead_of_hanging(tmp_path, daemon_factory):
    """When the daemon dies the bridge aborts the connection: a process holding a file on the
    mount gets ENOTCONN instead of waiting forever."""
    d = daemon_factory()
    mntdir = Path(tempfile.mkdtemp(prefix="vfsmnt-"))
    try:
        with Bridge(d.socket, str(mntdir), process=d.proc) as b:
            (mntdir / "f").write_text("x")
            child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
                import errno, os, sys
                fd = os.open(sys.argv[1], os.O_RDWR)
                print("open", flush=True)
                sys.stdin.readline()
                try:
                    os.fsync(fd)
                    print("ok")
                except OSError as e:
                    print(errno.errorcode[e.errno])
            """), str(mntdir / "f")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert child.stdout.readline() == "open\n"
            d.proc.kill()
            d.proc.wait()
            assert b.wait(20)
            out, _ = child.communicate("go\n", timeout=30)
            assert out.split() == ["ENOTCONN"]
            assert any("closed the vhost-user connection" in e for e in b.errors)
    finally:
        os.rmdir(mntdir)


# --- --posix-acl through a real kernel client ---------------------------------------------------


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_* value: version 2, then (tag, perm, id) entries in tag order."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


_UNDEFINED = 0xFFFFFFFF


@pytest.mark.parametrize("kind", ["pyvirtiofsd", "virtiofsd"])
def test_posix_acls_through_the_kernel(kind, tmp_path, share, daemon_factory):
    """--posix-acl with the host kernel as the FUSE client: a named-user ACL lets user 1000 read
    a 0600 file and write into a 0755 directory; a default ACL is inherited by what is created
    under it and replaces the creator's umask; elsewhere the umask applies (DONT_MASK)."""
    mntdir = tempfile.mkdtemp(prefix="vfsmnt-")
    os.chmod(mntdir, 0o755)
    mnt = Path(mntdir) / "mnt"
    mnt.mkdir()
    os.chmod(share, 0o755)
    if kind == "pyvirtiofsd":
        proc = daemon_factory("--posix-acl").proc
        sock = str(tmp_path / "vfs0.sock")
    else:
        if not os.path.exists(ANCHOR):
            pytest.skip(f"Rust virtiofsd anchor not installed at {ANCHOR}")
        sock = str(tmp_path / "anchor.sock")
        proc = start_daemon(anchor_argv(sock, str(share), "--posix-acl"),
                            str(tmp_path / "anchor.log"))
    try:
        with Bridge(sock, str(mnt), queues=1, process=proc) as b:
            (mnt / "secret").write_bytes(b"for 1000 only")
            os.chmod(mnt / "secret", 0o600)
            assert run("cat", str(mnt / "secret"), user=1000, check=False).returncode != 0
            reader = _acl((1, 6, _UNDEFINED), (2, 4, 1000), (4, 0, _UNDEFINED),
                          (0x10, 4, _UNDEFINED), (0x20, 0, _UNDEFINED))
            os.setxattr(mnt / "secret", "system.posix_acl_access", reader)
            assert run("cat", str(mnt / "secret"), user=1000).stdout == "for 1000 only"
            (mnt / "d").mkdir(0o755)
            writer = _acl((1, 7, _UNDEFINED), (2, 7, 1000), (4, 5, _UNDEFINED),
                          (0x10, 7, _UNDEFINED), (0x20, 5, _UNDEFINED))
            os.setxattr(mnt / "d", "system.posix_acl_access", writer)
            os.setxattr(mnt / "d", "system.posix_acl_default", writer)
            python("""
                import os, sys
                os.umask(0o077)
                open(os.path.join(sys.argv[1], "d", "f"), "w").close()
                open(os.path.join(sys.argv[1], "plain"), "w").close()
                os.mkdir(os.path.join(sys.argv[1], "d", "e"))
            """, mnt)
            assert run("touch", str(mnt / "d" / "by1000"), user=1000).returncode == 0
            assert b.errors == []
        assert proc.wait(20) == 0
    finally:
        if kind != "pyvirtiofsd":
            stop_daemon(proc)
        os.rmdir(mnt)
        os.rmdir(mntdir)
    modes = {n: stat.S_IMODE(os.lstat(share / n).st_mode)
             for n in ("plain", "d/f", "d/e", "d/by1000")}
    # The default ACL, not the umask, decides under d (mask rwx: group class rwx).
    assert modes == {"plain": 0o600, "d/f": 0o664, "d/e": 0o775, "d/by1000": 0o664}
    assert os.getxattr(share / "d" / "e", "system.posix_acl_default") == writer
    assert os.lstat(share / "d" / "by1000").st_uid == 1000


def test_translated_ids_through_the_kernel(tmp_path, share, daemon_factory):
    """--translate-uid/--translate-gid with the host kernel as the FUSE client: files made by
    any user land as the squashed host ids, and host ids mapped back show as guest ids."""
    mntdir = tempfile.mkdtemp(prefix="vfsmnt-")
    os.chmod(mntdir, 0o755)
    mnt = Path(mntdir) / "mnt"
    mnt.mkdir()
    os.chmod(share, 0o777)
    (share / "hosts").write_bytes(b"")
    os.chown(share / "hosts", 4321, 4321)
    d = daemon_factory("--translate-uid=squash-guest:0:4321:4294967295",
                       "--translate-gid=squash-guest:0:4321:4294967295",
                       "--translate-uid=host:4321:1000:1", "--translate-gid=host:4321:1000:1")
    try:
        with Bridge(d.socket, str(mnt), queues=1, process=d.proc) as b:
            assert os.lstat(mnt / "hosts")[4:6] == (1000, 1000)
            run("touch", str(mnt / "by-root"))
            run("mkdir", str(mnt / "by-1002"), user=1002)
            assert os.lstat(mnt / "by-root")[4:6] == (1000, 1000)
            assert b.errors == []
        assert d.proc.wait(20) == 0
    finally:
        os.rmdir(mnt)
        os.rmdir(mntdir)
    assert os.lstat(share / "by-root")[4:6] == os.lstat(share / "by-1002")[4:6] == (4321, 4321)
