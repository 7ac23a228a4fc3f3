"""The running daemon, inspected from outside: namespaces, root, capabilities, seccomp, limits.

Each test starts pyvirtiofsd in one sandbox mode and reads /proc/PID/* of every process it
made (the waiting parent, the supervisor, the spawner, the workers).  Also: the options that
shape the sandbox (--modcaps, --rlimit-nofile, --uid-map/--gid-map as a non-root user), host
mounts below the share (MS_SLAVE), and start-up refusals.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.supervisor.config import CAPABILITIES
from pyvirtiofsd.supervisor.sandbox import WORKER_CAPS
from tests.conftest import DAEMON, Daemon, start_daemon
from tests.frontend import Frontend, FuseClient
from tests.test_seccomp import descendants

MODES = ["namespace", "chroot", "none"]


def mask(*names: str) -> int:
    return sum(1 << CAPABILITIES.index(n) for n in names)


WORKER_MASK = mask(*WORKER_CAPS)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def caps(pid: int) -> dict[str, int]:
    s = status(pid)
    return {k: int(s[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}


def limit(pid: int, name: str) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith(name):
                soft, hard = line[len(name):].split()[:2]
                return soft, hard
    raise KeyError(name)


def ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


class Tree:
    """The daemon's processes by role."""

    def __init__(self, d: Daemon, mode: str) -> None:
        kids = descendants(d.proc.pid)
        self.workers = sorted(p for p, n in kids.items() if n.startswith("pyvfs-q"))
        self.spawner = next(p for p, n in kids.items() if n == "pyvfs-spawner")
        if mode == "none":
            self.parent = None
            self.supervisor = d.proc.pid
        else:
            self.parent = d.proc.pid
            self.supervisor = next(p for p, n in kids.items() if n == "pyvfs-sup")


@pytest.mark.parametrize("mode", MODES)
def test_every_process_keeps_only_what_its_role_needs(daemon_factory, mode: str) -> None:
    d = daemon_factory(f"--sandbox={mode}", "--request-queues=2")
    t = Tree(d, mode)
    assert len(t.workers) == 3
    for pid in [*t.workers, t.spawner]:
        s, c = status(pid), caps(pid)
        assert s["Seccomp"] == "2" and s["NoNewPrivs"] == "1", (pid, s)
        # The file-serving set, in every set a process can draw from; nothing to inherit.
        assert c == {"CapInh": 0, "CapPrm": WORKER_MASK, "CapEff": WORKER_MASK,
                     "CapBnd": WORKER_MASK, "CapAmb": 0}, (pid, c)
    # The workers' filter is stacked on the spawner's.
    assert {status(w)["Seccomp_filters"] for w in t.workers} == {"2"}
    assert status(t.spawner)["Seccomp_filters"] == "1"
    # The supervisor: nothing at all once its workers run (its documented set is empty).
    s = status(t.supervisor)
    assert s["Seccomp"] == "2" and s["NoNewPrivs"] == "1"
    assert caps(t.supervisor) == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd",
                                                "CapAmb"), 0)
    if t.parent is not None:
        # The parent only waits: no capabilities, no new privileges, a filter of its own.
        c = caps(t.parent)
        assert c["CapPrm"] == c["CapEff"] == c["CapBnd"] == 0
        s = status(t.parent)
        assert (s["Seccomp"], s["Seccomp_filters"], s["NoNewPrivs"]) == ("2", "1", "1"), s
    # No core dumps.
    for pid in [t.supervisor, t.spawner, *t.workers]:
        assert limit(pid, "Max core file size") == ("0", "0")


@pytest.mark.parametrize("mode", MODES)
def test_namespaces_and_root(daemon_factory, share: Path, mode: str) -> None:
    (share / "marker").write_text("in the share")
    d = daemon_factory(f"--sandbox={mode}")
    t = Tree(d, mode)
    host = {k: ns("self", k) for k in ("mnt", "pid", "net", "ipc", "uts")}
    share_st = os.stat(share)
    for pid in [t.supervisor, t.spawner, *t.workers]:
        root = os.stat(f"/proc/{pid}/root")
        if mode == "none":
            assert {k: ns(pid, k) for k in host} == host
            assert (root.st_dev, root.st_ino) == (os.stat("/").st_dev, os.stat("/").st_ino)
            continue
        # Its root is the share, whatever it does with paths.
        assert (root.st_dev, root.st_ino) == (share_st.st_dev, share_st.st_ino)
        assert os.listdir(f"/proc/{pid}/root") == ["marker"]
        if mode == "namespace":
            for kind in host:
                assert ns(pid, kind) != host[kind], (pid, kind)
        else:
            # chroot: a pid namespace of its own (its procfs must not show the host's
            # processes), no other namespace.
            assert ns(pid, "pid") != host["pid"]
            assert {k: ns(pid, k) for k in host if k != "pid"} == {
                k: v for k, v in host.items() if k != "pid"}
    if mode != "none":
        # The supervisor is the first process of its pid namespace, the parent stays outside.
        assert status(t.supervisor)["NSpid"].split() == [str(t.supervisor), "1"]
        assert ns(t.parent, "pid") == host["pid"] and ns(t.parent, "mnt") == host["mnt"]
        # The workers see no procfs but their own namespace's processes, read-only.
        assert int(status(t.workers[0])["NSpid"].split()[-1]) < 10


def test_modcaps_and_file_handles_edit_the_workers_set(daemon_factory) -> None:
    d = daemon_factory("--modcaps=-mknod:+sys_admin:-SETFCAP")
    want = (WORKER_MASK & ~mask("mknod", "setfcap")) | mask("sys_admin")
    for pid in Tree(d, "none").workers:
        c = caps(pid)
        assert c["CapEff"] == c["CapPrm"] == c["CapBnd"] == want
    assert "--modcaps" not in d.text        # no "not implemented" warning for it
    d = daemon_factory("--inode-file-handles=prefer", "--sandbox=namespace")
    for pid in Tree(d, "namespace").workers:
        assert caps(pid)["CapEff"] == WORKER_MASK | mask("dac_read_search")


def test_rlimit_nofile(daemon_factory) -> None:
    d = daemon_factory("--rlimit-nofile=4321")
    t = Tree(d, "none")
    assert limit(t.workers[0], "Max open files") == ("4321", "4321")
    soft, hard = (int(v) for v in limit(os.getpid(), "Max open files"))
    d = daemon_factory("--rlimit-nofile=0")
    assert limit(Tree(d, "none").workers[0], "Max open files") == (str(soft), str(hard))
    # The default rule: min(1000000, fs.nr_open), or the hard limit (with a warning) when
    # raising it is not permitted.
    d = daemon_factory("--sandbox=namespace")
    got = limit(Tree(d, "namespace").workers[0], "Max open files")
    with open("/proc/sys/fs/nr_open") as f:
        target = min(1_000_000, int(f.read()))
    if got != (str(target), str(target)):
        assert got == (str(hard), str(hard))
        assert f"cannot raise the open file limit to {target}" in d.text


def test_rlimit_nofile_above_nr_open_is_refused(tmp_path: Path, share: Path) -> None:
    with open("/proc/sys/fs/nr_open") as f:
        nr_open = int(f.read())
    done = subprocess.run([str(DAEMON), f"--socket-path={tmp_path / 's'}",
                           f"--shared-dir={share}", f"--rlimit-nofile={nr_open + 1}"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"the kernel allows at most {nr_open} (fs.nr_open)" in done.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.pid").exists()


def test_core_dumps_when_asked_for(tmp_path: Path, share: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYVIRTIOFSD_CORE_DUMPS", "1")
    d = start_daemon(share, str(tmp_path / "s.sock"), "--sandbox=namespace")
    try:
        t = Tree(d, "namespace")
        assert limit(t.workers[0], "Max core file size") == limit(os.getpid(),
                                                                  "Max core file size")
    finally:
        d.stop()


def test_signals_reach_the_sandboxed_supervisor_and_paths_are_cleaned(tmp_path: Path,
                                                                      share: Path) -> None:
    sock = tmp_path / "s.sock"
    d = start_daemon(share, str(sock), "--sandbox=namespace")
    with open(f"{sock}.pid") as f:
        assert int(f.read()) == d.proc.pid       # the parent, which runtimes signal
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=20) == 0
    assert "terminating on signal" in d.text
    # Removed by the parent: from inside the sandbox these paths would name share files.
    assert not sock.exists() and not Path(f"{sock}.pid").exists()


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_the_confined_parent_forwards_every_stop_signal(tmp_path: Path, share: Path, mode: str,
                                                        sig: int) -> None:
    sock = tmp_path / "s.sock"
    d = start_daemon(share, str(sock), f"--sandbox={mode}")
    assert status(d.proc.pid)["Seccomp"] == "2"
    d.proc.send_signal(sig)
    assert d.proc.wait(timeout=20) == 0
    assert "terminating on signal" in d.text and "SIGSYS" not in d.text, d.text
    assert not sock.exists() and not Path(f"{sock}.pid").exists()


def test_the_confined_parent_reports_a_killed_supervisor(tmp_path: Path, share: Path) -> None:
    sock = tmp_path / "s.sock"
    d = start_daemon(share, str(sock), "--sandbox=namespace")
    os.kill(Tree(d, "namespace").supervisor, signal.SIGKILL)
    assert d.proc.wait(timeout=20) == 128 + signal.SIGKILL
    assert "the supervisor (pid" in d.text and "was killed by SIGKILL" in d.text, d.text
    assert "SIGSYS" not in d.text, d.text
    assert not sock.exists() and not Path(f"{sock}.pid").exists()


def test_sandbox_option_refusals(tmp_path: Path, share: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(DAEMON), f"--socket-path={tmp_path / 's'}",
                               f"--shared-dir={share}", *args],
                              capture_output=True, text=True, timeout=30)
    # As root, ids need no mapping (virtiofsd refuses the same).
    done = run("--uid-map=:0:1000:1:")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["pyvirtiofsd: error: --uid-map can only be used by an "
                                        "unprivileged user with --sandbox=namespace"]
    done = run("--gid-map=:0:1000:1:", "--sandbox=none")
    assert done.returncode == 2 and "--gid-map can only be used" in done.stderr


def test_none_mode_warns_once(daemon_factory) -> None:
    d = daemon_factory()
    lines = [ln for ln in d.log if "--sandbox=none" in ln]
    assert len(lines) == 1 and "WARN" in lines[0] and "no isolation" in lines[0]


def test_a_respawned_worker_is_confined_like_the_first(daemon_factory, share: Path) -> None:
    (share / "f").write_bytes(b"survives")
    d = daemon_factory("--sandbox=namespace")
    with Frontend.connect(d.socket, process=d.proc) as fe:
        c = FuseClient(fe)
        c.init()
        node = c.lookup(fa.ROOT_ID, "f").nodeid
        fh = c.open(node, os.O_RDONLY).fh
        old = Tree(d, "namespace")
        os.kill(old.workers[1], signal.SIGKILL)
        # Served by the new worker, cloned by the same (confined) spawner.
        assert c.read(node, fh, 0, 100) == b"survives"
        d.wait_for("worker for queue 1 (pid")
        new = Tree(d, "namespace")
        (respawned,) = set(new.workers) - set(old.workers)
        s = status(respawned)
        assert (s["Seccomp"], s["Seccomp_filters"], s["NoNewPrivs"]) == ("2", "2", "1")
        assert caps(respawned)["CapBnd"] == WORKER_MASK
        assert ns(respawned, "mnt") == ns(old.workers[0], "mnt")
    assert "SIGSYS" not in d.text


# --- host mounts below the share ---------------------------------------------------------------


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def shared_share(tmp_path: Path) -> Iterator[Path]:
    """A share that is a mount point with shared propagation, as on systemd hosts."""
    share = tmp_path / "mshare"
    share.mkdir()
    _mount("--bind", str(share), str(share))
    _mount("--make-shared", str(share))
    yield share
    subprocess.run(["umount", "-R", "-l", str(share)], capture_output=True)


def test_host_mounts_below_the_share_appear_as_submounts(daemon_factory,
                                                         shared_share: Path) -> None:
    (shared_share / "before").mkdir()
    (shared_share / "after").mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m", "early", str(shared_share / "before"))
    (shared_share / "before" / "f").write_text("mounted before the start")
    d = daemon_factory("--sandbox=namespace", "--announce-submounts", share_dir=shared_share)
    # Mounted on the host while the daemon runs: it propagates into the sandbox (MS_SLAVE).
    _mount("-t", "tmpfs", "-o", "size=1m", "late", str(shared_share / "after"))
    (shared_share / "after" / "g").write_text("mounted after the start")
    with Frontend.connect(d.socket, process=d.proc) as fe:
        c = FuseClient(fe)
        c.init()
        for name, file, text in (("before", "f", b"mounted before the start"),
                                 ("after", "g", b"mounted after the start")):
            e = c.lookup(fa.ROOT_ID, name)
            assert e.attr.flags & fa.AttrFlag.SUBMOUNT, name
            assert e.attr.ino == os.stat(shared_share / name).st_ino
            f = c.lookup(e.nodeid, file)
            fh = c.open(f.nodeid, os.O_RDONLY).fh
            assert c.read(f.nodeid, fh, 0, 100) == text
    # The sandbox's own mounts (its procfs, the share's bind mount) stay in its namespace.
    below = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
             if line.split()[4].startswith(str(shared_share))]
    assert sorted(below) == sorted([str(shared_share), str(shared_share / "before"),
                                    str(shared_share / "after")])


# --- a non-root user -----------------------------------------------------------------------------


NOBODY = 65534


def _userns_allowed() -> str:
    """'' if an unprivileged user may create a user namespace here, else why not."""
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                return "user.max_user_namespaces is 0"
    except OSError:
        pass
    for knob in ("/proc/sys/kernel/unprivileged_userns_clone",
                 "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"):
        try:
            with open(knob) as f:
                value = f.read().strip()
        except OSError:
            continue
        if (knob.endswith("clone") and value == "0") or (knob.endswith("userns") and
                                                        value == "1"):
            return f"{knob} forbids unprivileged user namespaces"
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                            "--clear-groups", "unshare", "--user", "true"],
                           capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"unshare --user failed: {probe.stderr.strip()}"


def _python_root() -> str:
    """The directory holding the interpreter the venv links to (under /root here)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(DAEMON.parent / "python3")))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to become another user (setpriv)")
def test_unprivileged_user_runs_the_namespace_sandbox_with_id_maps() -> None:
    why = _userns_allowed()
    if why:
        pytest.skip(f"the kernel forbids unprivileged user namespaces: {why}")
    work = Path(tempfile.mkdtemp(prefix="vfs-nonroot-"))
    try:
        os.chmod(work, 0o755)
        share = work / "share"
        share.mkdir()
        os.chown(share, NOBODY, NOBODY)
        os.chown(work, NOBODY, NOBODY)
        (share / "hello").write_text("from the host")
        os.chown(share / "hello", NOBODY, NOBODY)
        sock = work / "s.sock"
        # The interpreter lives below /root (mode 0700): a private mount namespace shows it to
        # the unprivileged user at the same path; nothing else changes.  The daemon itself runs
        # as uid/gid 65534 with no capabilities, and makes its own user namespace.
        view = work / "rootview"
        view.mkdir()
        pyroot = _python_root()
        rel = os.path.relpath(pyroot, "/root")
        script = (
            f"set -e; mkdir -p {view}/{rel}; mount --bind {pyroot} {view}/{rel}; "
            f"mount --rbind {view} /root; exec setpriv --reuid={NOBODY} --regid={NOBODY} "
            f"--clear-groups --inh-caps=-all --bounding-set=-all "
            f"{DAEMON} --socket-path={sock} --shared-dir={share} --log-level=debug "
            f"--sandbox=namespace --uid-map=:0:{NOBODY}:1: --gid-map=:0:{NOBODY}:1:")
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                 script], stderr=subprocess.PIPE, text=True)
        d = Daemon(proc, str(sock), share)

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                d.log.append(line)
                d.lines.put(line)
            d.lines.put(None)
        threading.Thread(target=pump, daemon=True).start()
        try:
            d.wait_for("serving ")
            kids = descendants(proc.pid)
            sup = next(p for p, n in kids.items() if n == "pyvfs-sup")
            workers = [p for p, n in kids.items() if n.startswith("pyvfs-q")]
            # Not root on the host; root (uid 0) inside its own user namespace.
            assert status(sup)["Uid"].split()[0] == str(NOBODY)
            assert ns(sup, "user") != ns("self", "user")
            with open(f"/proc/{sup}/uid_map") as f:
                assert f.read().split() == ["0", str(NOBODY), "1"]
            for w in workers:
                assert status(w)["Seccomp"] == "2"
                assert caps(w)["CapEff"] == WORKER_MASK     # relative to its user namespace
                assert os.stat(f"/proc/{w}/root").st_ino == os.stat(share).st_ino
            with Frontend.connect(str(sock), process=proc) as fe:
                c = FuseClient(fe)
                c.init()
                e = c.lookup(fa.ROOT_ID, "hello")
                assert e.attr.uid == 0            # the host's 65534 is uid 0 inside
                fh = c.open(e.nodeid, os.O_RDONLY).fh
                assert c.read(e.nodeid, fh, 0, 100) == b"from the host"
                new, _ = c.create(fa.ROOT_ID, "made-by-guest", mode=0o640)
                assert new.attr.uid == 0
                # A guest uid with no mapping cannot be acted as.
                r = c.request(fa.Opcode.MKDIR, fa.ROOT_ID,
                              fa.MKDIR_IN.pack(0o755, 0) + b"as-1000\0", uid=1000, gid=1000)
                assert r.error != 0
            st = os.stat(share / "made-by-guest")
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)
            assert not (share / "as-1000").exists()
        finally:
            d.stop()
        assert not sock.exists()
    finally:
        subprocess.run(["umount", "-l", str(work / "rootview")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def test_chroot_needs_root(monkeypatch, tmp_path: Path, share: Path) -> None:
    """virtiofsd's rule, checked before anything starts (an in-process check of the config)."""
    from pyvirtiofsd.supervisor import sandbox
    from pyvirtiofsd.supervisor.config import ConfigError, parse

    config = parse([f"--socket-path={tmp_path / 's'}", f"--shared-dir={share}",
                    "--sandbox=chroot"])
    sandbox.check(config)
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY)
    with pytest.raises(ConfigError, match="--sandbox=chroot can only be used by root"):
        sandbox.check(config)
