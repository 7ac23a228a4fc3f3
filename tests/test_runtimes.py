"""The exact command lines Kata Containers and KubeVirt start virtiofsd with, given to pyvirtiofsd.

Each test plays the runtime: it builds the argv the runtime's source builds, hands over the
socket the way the runtime does, reads the logs where the runtime reads them, plays the VMM over
the real socket, and ends the daemon the way the runtime does.

* Kata, Go runtime (src/runtime/virtcontainers/virtiofsd.go): the runtime binds and listens,
  passes the socket as fd 3 (`--fd=3`), `--syslog --cache=MODE --shared-dir=DIR`, then the
  configured `virtio_fs_extra_args` (default `--thread-pool-size=1 --announce-submounts`, older
  configurations `-o announce_submounts`).  stderr is not read; the runtime watches the process
  and stops it with SIGKILL, then removes the socket itself.
* Kata, Rust runtime (src/runtime-rs/.../share_virtio_fs_standalone.rs): `--socket-path S
  --shared-dir D --cache MODE --sandbox none --seccomp none --inode-file-handles MODE`, extra
  args, `--xattr`; it reads stderr and starts the VM once a line contains "Waiting for
  vhost-user socket connection"; stops with SIGKILL.
* KubeVirt (pkg/virt-controller/services/virtiofs.go): a container running as uid 107 with no
  capabilities and no privilege escalation, `--socket-path=S --shared-dir=D --sandbox=none
  --cache=auto --migration-on-error=guest-error --migration-mode=find-paths`; the daemon exits
  when QEMU in the compute container goes away.  Its privileged dispatcher execs `--sandbox
  chroot --modcaps=+dac_read_search:-mknod --inode-file-handles=prefer --migration-mode=
  file-handles ... --translate-uid/gid=squash-guest:0:107:4294967295 --xattr` with an empty
  environment.

Options pyvirtiofsd accepts but does not act on yet get the same one-line warning as from any
other command line (Config.unimplemented()); nothing new is accepted silently.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from pyvirtiofsd.supervisor.config import Config, parse
from tests.conftest import DAEMON
from tests.frontend import Frontend, FuseClient
from tests.guest_util import guest_run
from tests.proctree import children

TIMEOUT = 30.0
KUBEVIRT_UID = 107      # util.NonRootUID: qemu's uid in the virt-launcher image
WAITING = "Waiting for vhost-user socket connection"

# Puts the inherited listening socket on fd 3 (Go's cmd.ExtraFiles[0]) and execs the rest.
_EXEC_WITH_FD3 = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.execvp(sys.argv[2], sys.argv[2:])
"""
# In a private mount namespace: a /dev whose `log` is the test's syslog socket ($1/syslog.sock),
# so --syslog is observable without touching the host's /dev.
_WITH_DEV_LOG = r"""
set -e
T=$1; shift
D=$T/dev
mkdir -p "$D"
mount -t tmpfs pyvfs-dev "$D"
for n in null zero full random urandom; do : > "$D/$n"; mount --bind "/dev/$n" "$D/$n"; done
mkdir "$D/shm"
mount --bind /dev/shm "$D/shm"
ln -s /proc/self/fd "$D/fd"
: > "$D/log"
mount --bind "$T/syslog.sock" "$D/log"
mount --move "$D" /dev
exec "$@"
"""


def _family(pid: int) -> set[int]:
    out = {pid}
    for child in children(pid):
        out |= _family(child)
    return out


def _wait_gone(pids: set[int], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while alive := [p for p in pids if os.path.exists(f"/proc/{p}")]:
        assert time.monotonic() < deadline, f"processes {alive} outlived the daemon"
        time.sleep(0.02)   # bounded poll of /proc, not a synchronisation


class Lines:
    """Lines from a stream or a datagram socket, collected by a thread, awaited with a deadline."""

    def __init__(self, read: Callable[[], str | None]) -> None:
        self.all: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            while (line := read()) is not None:
                self.all.append(line)
                self._q.put(line)
            self._q.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        for line in list(self.all):
            if text in line:
                return line
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r}:\n" + "\n".join(self.all)) from None
            if line is None:
                raise AssertionError(f"stream ended before {text!r}:\n" + "\n".join(self.all))
            if text in line:
                return line

    @classmethod
    def of_stream(cls, stream) -> Lines:
        return cls(lambda: (stream.readline().rstrip("\n") or None))

    @classmethod
    def of_syslog(cls, sock: socket.socket) -> Lines:
        def read() -> str | None:
            try:
                return sock.recv(65536).decode(errors="replace").rstrip("\0\n")
            except OSError:
                return None
        return cls(read)


def _serve_once(sock: str, share: Path, proc: subprocess.Popen,
                name: str = "made-by-guest") -> Frontend:
    """Play the VMM and the guest driver: connect, FUSE INIT, make a directory on the share."""
    fe = Frontend.connect(sock, queues=2, timeout=TIMEOUT, process=proc)
    fuse = FuseClient(fe)
    fuse.init()
    fuse.mkdir(1, name)
    assert (share / name).is_dir()
    return fe


def _unimplemented_warned(args: Sequence[str], lines: list[str]) -> None:
    """Every option Config.unimplemented() lists for `args` is warned about, in one line."""
    config = parse([a if a != "--fd=3" else "--fd=0" for a in args])
    assert isinstance(config, Config)
    for option in config.unimplemented():
        hits = [line for line in lines if f"{option} is accepted but not implemented yet" in line]
        assert len(hits) == 1, (option, lines)


# --- Kata Containers, Go runtime -------------------------------------------------------------

KATA_GO_EXTRA = {
    "default": ["--thread-pool-size=1", "--announce-submounts"],
    "legacy-o": ["--thread-pool-size=1", "-o", "announce_submounts"],
}


@pytest.mark.parametrize("extra", list(KATA_GO_EXTRA), ids=list(KATA_GO_EXTRA))
@pytest.mark.parametrize("ending", ["vmm-gone", "sigkill"])
def test_kata_go_runtime(tmp_path: Path, share: Path, extra: str, ending: str) -> None:
    sock = str(tmp_path / "vhost-fs.sock")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(str(tmp_path / "syslog.sock"))
    logs = Lines.of_syslog(syslog)
    args = ["--syslog", "--cache=auto", f"--shared-dir={share}", "--fd=3",
            *KATA_GO_EXTRA[extra]]
    # getSocketFD(): the runtime binds and listens, then passes a dup of the listener.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(sock)
        listener.listen()
        proc = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_FD3, str(listener.fileno()),
             "unshare", "--mount", "--propagation", "private", "sh", "-c", _WITH_DEV_LOG, "sh",
             str(tmp_path), str(DAEMON), *args],
            pass_fds=(listener.fileno(),), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    try:
        logs.wait_for(WAITING)
        family = _family(proc.pid)
        assert len(family) >= 4, "sandbox parent, supervisor, spawner, workers"
        fe = _serve_once(sock, share, proc)
        if ending == "vmm-gone":
            fe.close()
            assert proc.wait(timeout=TIMEOUT) == 0
            logs.wait_for("front-end disconnected")
        else:
            # Stop(): SIGKILL to the pid the runtime started, nothing else.
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL
            fe.close()
        _wait_gone(family)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        syslog.close()
    # Everything went to syslog, tagged like any daemon's line; stderr stayed empty.
    assert all(line.startswith("<") and "pyvirtiofsd[" in line for line in logs.all), logs.all
    assert proc.stderr is not None and proc.stderr.read() == ""
    _unimplemented_warned(args, logs.all)
    if extra == "legacy-o":
        assert any("deprecated option format '-o'" in line for line in logs.all)
    # The socket is the runtime's to remove.
    assert os.path.exists(sock)


# --- Kata Containers, Rust runtime -------------------------------------------------------------


def _kata_rs_args(sock: str, share: Path) -> list[str]:
    return ["--socket-path", sock, "--shared-dir", str(share), "--cache", "auto",
            "--sandbox", "none", "--seccomp", "none", "--inode-file-handles", "never",
            "--thread-pool-size=1", "--announce-submounts", "--xattr"]


@pytest.mark.parametrize("ending", ["vmm-gone", "sigkill"])
def test_kata_rs_runtime(tmp_path: Path, share: Path, ending: str) -> None:
    sock = str(tmp_path / "vhost-fs.sock")
    args = _kata_rs_args(sock, share)
    proc = subprocess.Popen([str(DAEMON), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = Lines.of_stream(proc.stderr)
    try:
        # run_virtiofsd(): the VM starts once this line is read, so the socket listens by then.
        stderr.wait_for(WAITING)
        assert guest_run.socket_listening(sock, proc.pid)
        family = _family(proc.pid)
        fe = _serve_once(sock, share, proc)
        if ending == "vmm-gone":
            fe.close()
            assert proc.wait(timeout=TIMEOUT) == 0
            assert not os.path.exists(sock) and not os.path.exists(sock + ".pid")
        else:
            os.kill(proc.pid, signal.SIGKILL)           # shutdown_virtiofsd()
            assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL
            fe.close()
        _wait_gone(family)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _unimplemented_warned(args, stderr.all)
    if ending == "sigkill":
        # The next sandbox reuses the path: the killed daemon's socket and pid file are stale,
        # and the new daemon takes them over.
        again = subprocess.Popen([str(DAEMON), *args], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            Lines.of_stream(again.stderr).wait_for(WAITING)
            _serve_once(sock, share, again, "made-after-restart").close()
            assert again.wait(timeout=TIMEOUT) == 0
        finally:
            if again.poll() is None:
                again.kill()
                again.wait()


# --- KubeVirt -----------------------------------------------------------------------------------


@pytest.fixture
def pod_dir() -> Iterator[Path]:
    """A directory uid 107 can reach (pytest's own tree is root's alone)."""
    with tempfile.TemporaryDirectory(prefix="pyvfs-pod-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def test_kubevirt_unprivileged_container(pod_dir: Path) -> None:
    """uid 107, no capabilities (bounding set empty), no_new_privs: as the virtiofs container's
    securityContext asks.  The guest's files are created as that uid."""
    sockdir = pod_dir / "virtiofs-containers"
    share = pod_dir / "vol"
    for path in (sockdir, share):
        path.mkdir()
        os.chown(path, KUBEVIRT_UID, KUBEVIRT_UID)
    sock = str(sockdir / "vol.sock")
    args = [f"--socket-path={sock}", f"--shared-dir={share}", "--sandbox=none", "--cache=auto",
            "--migration-on-error=guest-error", "--migration-mode=find-paths"]
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={KUBEVIRT_UID}", f"--regid={KUBEVIRT_UID}", "--clear-groups",
         "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", str(DAEMON), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = Lines.of_stream(proc.stderr)
    try:
        stderr.wait_for(WAITING)
        family = _family(proc.pid)
        for pid in family:
            assert os.stat(f"/proc/{pid}").st_uid == KUBEVIRT_UID
        fe = _serve_once(sock, share, proc)
        assert os.stat(share / "made-by-guest").st_uid == KUBEVIRT_UID
        fe.close()     # QEMU in the compute container went away
        assert proc.wait(timeout=TIMEOUT) == 0
        _wait_gone(family)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(sock) and not os.path.exists(sock + ".pid")
    assert not [line for line in stderr.all if " ERROR " in line], stderr.all
    _unimplemented_warned(args, stderr.all)


def test_kubevirt_privileged_dispatcher(tmp_path: Path, share: Path) -> None:
    """The privileged dispatcher's execve: root, chroot sandbox, an empty environment.  Every
    guest id is squashed onto qemu's 107, which owns the volume as in virt-launcher: the guest's
    root makes a directory there, owned by 107 on the host."""
    sock = str(tmp_path / "vol.sock")
    os.chown(share, 107, 107)
    args = ["--socket-path", sock, "--shared-dir", str(share), "--cache", "auto",
            "--sandbox", "chroot", "--modcaps=+dac_read_search:-mknod",
            "--inode-file-handles=prefer", "--migration-mode=file-handles",
            "--migration-on-error=guest-error",
            "--translate-uid=squash-guest:0:107:4294967295",
            "--translate-gid=squash-guest:0:107:4294967295", "--xattr"]
    proc = subprocess.Popen([str(DAEMON), *args], env={}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = Lines.of_stream(proc.stderr)
    try:
        stderr.wait_for(WAITING)
        family = _family(proc.pid)
        fe = _serve_once(sock, share, proc)
        made = (share / "made-by-guest").stat()
        assert (made.st_uid, made.st_gid) == (107, 107)
        fe.close()
        assert proc.wait(timeout=TIMEOUT) == 0
        _wait_gone(family)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(sock)
    _unimplemented_warned(args, stderr.all)


# --- libvirt 10's command line (separate options) ----------------------------------------------

# libvirt's daemonized child: lock byte 0 of the pid file and write the pid (virPidFileAcquire),
# keep the descriptor across exec, pass the listening socket as fd 3, exec the daemon.
_EXEC_LIKE_LIBVIRT = """
import fcntl, os, sys
pidfile, fd = sys.argv[1], int(sys.argv[2])
os.dup2(fd, 3)
os.close(fd)
p = os.open(pidfile, os.O_WRONLY | os.O_CREAT, 0o644)
fcntl.lockf(p, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
os.ftruncate(p, 0)
os.write(p, str(os.getpid()).encode())
os.set_inheritable(p, True)
os.execvp(sys.argv[3], sys.argv[3:])
"""


def _posix_lock_holders(path: str) -> set[int]:
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return {int(fields[4]) for fields in map(str.split, f)
                if "->" not in fields and fields[1] == "POSIX"
                and fields[5].endswith(f":{ino}")}


def test_libvirt_separate_options(tmp_path: Path, share: Path) -> None:
    """Newer libvirt runs `BINARY --print-capabilities` and, seeing "separate-options", builds
    virtiofsd's own options instead of `-o` (qemu_virtiofs.c); the pid file stays locked by the
    daemon for its whole life, so that libvirt's stop finds and kills it."""
    caps = json.loads(subprocess.run([str(DAEMON), "--print-capabilities"], capture_output=True,
                                     text=True, timeout=TIMEOUT, check=True).stdout)
    assert caps["type"] == "fs" and "separate-options" in caps["features"]
    sock, pidfile = str(tmp_path / "fs0-fs.sock"), str(tmp_path / "1-dom-fs0-fs.pid")
    args = ["--fd=3", "--shared-dir", str(share), "--cache", "always", "--sandbox", "chroot",
            "--xattr", "--thread-pool-size=1", "--rlimit-nofile=4096", "--log-level", "debug"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(sock)
        listener.listen()
        proc = subprocess.Popen(
            [sys.executable, "-c", _EXEC_LIKE_LIBVIRT, pidfile, str(listener.fileno()),
             str(DAEMON), *args], pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = Lines.of_stream(proc.stderr)
    try:
        stderr.wait_for(WAITING)
        assert int(Path(pidfile).read_text()) == proc.pid
        family = _family(proc.pid)
        fe = _serve_once(sock, share, proc)
        assert _posix_lock_holders(pidfile) == {proc.pid}
        fe.close()
        assert proc.wait(timeout=TIMEOUT) == 0
        _wait_gone(family)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _unimplemented_warned(args, stderr.all)
    # The pid file and the socket are libvirt's to remove.
    assert os.path.exists(pidfile) and os.path.exists(sock)


# --- stopping the whole process group ------------------------------------------------------


@pytest.mark.parametrize("sandbox", ["namespace", "none"])
def test_sigterm_to_the_process_group_is_a_clean_stop(tmp_path: Path, share: Path,
                                                      sandbox: str) -> None:
    """systemd's default control-group kill, libvirt's group kill and `timeout` signal every
    process: workers and spawner leave the signal to the supervisor, which stops cleanly."""
    sock = str(tmp_path / "vfs.sock")
    proc = subprocess.Popen([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                             f"--sandbox={sandbox}"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    stderr = Lines.of_stream(proc.stderr)
    try:
        stderr.wait_for(WAITING)
        family = _family(proc.pid)
        fe = Frontend.connect(sock, queues=2, timeout=TIMEOUT, process=proc)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
        fe.close()
        _wait_gone(family)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr.wait_for("terminating on signal")
    errors = [line for line in stderr.all if " ERROR " in line]
    assert not errors, stderr.all
