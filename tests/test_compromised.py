"""A modelled compromised worker: code that runs with exactly what a queue worker has, then
tries to get out.

`as_worker()` forks a child of the test process that sets up the sandbox of a mode with the
daemon's own code (Sandbox.enter(): namespaces or chroot, the private procfs, the share's
mounts), takes the workers' capability set, opens /proc/self/fd through the sandbox's procfs
as a worker does, and loads the spawner's and then the worker's seccomp filter with the `kill`
action, in the daemon's order (Sandbox.confine_spawner/confine_worker).  The attack then runs
there -- any Python a worker could be made to run -- and reports back over a pipe.  A call the
filter refuses kills it, which the tests see.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.common import native
from pyvirtiofsd.supervisor.config import parse
from pyvirtiofsd.supervisor.sandbox import Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox modes tried need root")

Attack = Callable[[Sandbox, int], dict]


def as_worker(mode: str, share: Path, tmp_path: Path, attack: Attack) -> dict:
    """Run attack(sandbox, proc_self_fd) as a compromised worker of a `mode` sandbox; its
    result (JSON), or {"killed": signal name} if the filter killed it."""
    config = parse([f"--socket-path={tmp_path / 'unused.sock'}", f"--shared-dir={share}",
                    f"--sandbox={mode}", "--rlimit-nofile=0"])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 1
        try:
            sandbox = Sandbox(config, 1)
            sandbox.compile_policies()
            child = sandbox.enter()
            if child:
                # The parent the daemon leaves outside: only waits.
                _, status = os.waitpid(child, 0)
                code = os.waitstatus_to_exitcode(status)
                if code < 0:
                    os.write(w, json.dumps({"killed": signal.Signals(-code).name}).encode())
                    code = 0
            else:
                proc_self_fd = os.open("self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                                       dir_fd=sandbox.proc_fd)
                sandbox.confine_spawner()
                sandbox.confine_worker(1)
                os.write(w, json.dumps(attack(sandbox, proc_self_fd)).encode())
                code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, (status, data)
    return json.loads(data)


def _read(path: str, dir_fd: int) -> str | None:
    """The file's text, or None if it cannot be opened from here."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, 100).decode(errors="replace")
    finally:
        os.close(fd)


USER = 1000


@pytest.fixture
def user_process() -> Iterator[tuple[subprocess.Popen, Path]]:
    """A host user's process (uid/gid 1000, no capabilities, dumpable -- any login session),
    running in a host directory outside the share that holds that user's private file."""
    home = Path(tempfile.mkdtemp(prefix="vfs-user-"))
    os.chmod(home, 0o755)
    secret = home / "secret"
    secret.write_text("host secret")
    os.chown(secret, USER, USER)
    os.chmod(secret, 0o600)

    def become_user() -> None:
        os.setgroups([])
        os.setresgid(USER, USER, USER)
        os.setresuid(USER, USER, USER)
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, cwd=home, preexec_fn=become_user)
    try:
        yield proc, secret
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(home)


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_no_proc_route_leads_out_of_the_share(mode: str, share: Path, tmp_path: Path,
                                              user_process) -> None:
    """Through procfs, /proc/PID/root and /proc/PID/cwd of a host process are the host's
    filesystem: with the host's pid namespace in view, a compromised worker acting as that
    user (setfsuid/setfsgid, which it may) opens any file the user can, outside the share.
    The sandbox's procfs must list the daemon's own processes only."""
    proc, secret = user_process

    def attack(sandbox: Sandbox, self_fd: int) -> dict:
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=sandbox.proc_fd)
        try:
            pids = sorted(int(n) for n in os.listdir(listing) if n.isdigit())
        finally:
            os.close(listing)
        found = {}
        for uid in (0, USER):
            native.setfsgid(uid)
            native.setfsuid(uid)
            for pid in {*pids, proc.pid}:
                for route in (f"{pid}/root{secret}", f"{pid}/cwd/secret"):
                    text = _read(route, sandbox.proc_fd)
                    if text is not None:
                        found[f"{uid}: {route}"] = text
            # Up from the worker's /proc/self/fd, then the same.
            text = _read(f"../../{proc.pid}/cwd/secret", self_fd)
            if text is not None:
                found[f"{uid}: self/fd/../../{proc.pid}/cwd/secret"] = text
        return {"pids": pids, "found": found}

    got = as_worker(mode, share, tmp_path, attack)
    assert got["found"] == {}
    # Only the sandbox's own processes are there: this one, none of the host's.
    assert got["pids"] == [1]
    assert proc.poll() is None


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_device_nodes_cannot_be_made_or_opened(mode: str, share: Path, tmp_path: Path) -> None:
    """A node for a host device, placed in the share (by the host, or by a worker before):
    the namespace sandbox's mounts are nodev, so opening it fails; and no worker has
    CAP_MKNOD to make one (without --allow-device-nodes).  chroot mode has no mount of its
    own: there only the host's nodev keeps such a node shut (README "Security model")."""
    os.mknod(share / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))

    def attack(sandbox: Sandbox, self_fd: int) -> dict:
        out = {}
        try:
            fd = os.open("/zero", os.O_RDONLY)
            out["open"] = "opened"
            os.close(fd)
        except OSError as e:
            out["open"] = e.errno
        try:
            os.mknod("/kmsg", stat.S_IFCHR | 0o666, os.makedev(1, 11))
            out["mknod"] = "made"
        except OSError as e:
            out["mknod"] = e.errno
        return out

    got = as_worker(mode, share, tmp_path, attack)
    assert got["mknod"] == errno.EPERM
    if mode == "namespace":
        assert got["open"] == errno.EACCES
    assert sorted(os.listdir(share)) == ["zero"]
