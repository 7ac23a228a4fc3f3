"""A real client: QEMU 10 live-migrates a running guest between two pyvirtiofsd daemons.

Debian trixie's QEMU 10 (scripts/install-qemu10.sh, a debootstrap tree) runs the guest against
one daemon; a second QEMU waits with `-incoming` on a UNIX socket, connected to a second daemon
on the same share.  The guest holds a file open for reading, one for writing and a directory
open (guest/holder.c) when the source QEMU migrates it: QEMU stops the device, takes the
device state over SET_DEVICE_STATE_FD, sends it in the migration stream, and the destination
QEMU loads it into the second daemon before the guest runs again.  The guest then reads, writes
and lists through the very fds it held, and the host sees what it wrote.  Once per migration
mode.  QEMU refuses to migrate a vhost-user device without dirty logging, which the daemon
serves too (LOG_SHMFD).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import start_daemon
from tests.guest_util import Kernel, ensure_kernel, guest_run, parse_values

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
TAG = "migfs"
BOOT_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 120.0
WORKLOAD = """
cp /mnt/.holder /tmp/holder
chmod 755 /tmp/holder
/tmp/holder /mnt/m
echo "@@VAL holder.rc $?"
"""


@pytest.fixture(scope="session")
def qemu10() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("guest tests need root")
    tree = guest_run.QEMU10_DIR
    # Idempotent, as the kernel fetch: a cached tree is used as it is.
    subprocess.run(["bash", str(REPO / "scripts" / "install-qemu10.sh")], check=True,
                   env={**os.environ, "QEMU10_DIR": str(tree)})
    return guest_run.qemu10_command(tree)


@pytest.fixture(scope="session")
def kernel612() -> Kernel:
    return ensure_kernel("612")


class Qmp:
    """QEMU's machine protocol on a UNIX socket: one command at a time, events skipped."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        json.loads(self.file.readline())          # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> object:
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Console:
    """A QEMU's serial console (its stdout), line by line, kept for the failure report."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.done = False
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            with self.cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self.cond.notify_all()
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def wait_for(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if marker in line:
                        return line
                left = deadline - time.monotonic()
                if self.done or left <= 0:
                    raise AssertionError(f"no {marker!r} on the console:\n" + self.text)
                self.cond.wait(left)

    @property
    def text(self) -> str:
        return "\n".join(self.lines[-80:])

    @property
    def all(self) -> str:
        with self.cond:
            return "\n".join(self.lines)


def _share(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    (share / "m" / "d").mkdir(parents=True)
    (share / "m" / "r.txt").write_bytes(b"read me")
    (share / "m" / "w.txt").write_bytes(b"before......")
    for name in ("a", "b"):
        (share / "m" / "d" / name).write_bytes(b"")
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
                    str(share / ".holder"), str(REPO / "guest" / "holder.c")], check=True)
    (share / guest_run.SCRIPT_NAME).write_text(WORKLOAD)
    return share


# pyvirtiofsd's default sandbox, with the seccomp action spelled out: every system call a
# migration makes the workers do must be in their policy.
SANDBOXED = ("--sandbox=namespace", "--seccomp=kill")


@dataclass
class Outcome:
    """One migration attempt: QEMU's final migration status, where the guest ended, what it
    printed and what the daemons logged."""

    status: dict
    vals: dict[str, str]
    src_text: str
    dst_text: str


def migrate_guest(tmp_path: Path, qemu10: list[str], kernel: Kernel, args: tuple[str, ...],
                  before: Callable[[Path], None] = lambda share: None) -> Outcome:
    """Boot a guest on a source daemon, run `before(share)` once it holds its files, migrate it
    to a destination daemon, then let it go on where it runs (on the destination, or on the
    source when the migration failed) and collect what it printed."""
    share = _share(tmp_path)
    src = start_daemon(share, str(tmp_path / "src.sock"), *args)
    dst = start_daemon(share, str(tmp_path / "dst.sock"), *args)
    migration = str(tmp_path / "migration.sock")
    procs: list[subprocess.Popen] = []

    def qemu(sock: str, qmp: str, *extra: str) -> tuple[subprocess.Popen, Console]:
        argv = guest_run.qemu_argv(kernel, sock, TAG, memory_mib=512)
        argv = [*qemu10, *argv[1:], "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc, Console(proc)

    def report() -> str:
        return (f"\n--- source console ---\n{src_console.text}\n--- destination console ---\n"
                f"{dst_console.text}\n--- source daemon ---\n{src.text[-3000:]}\n"
                f"--- destination daemon ---\n{dst.text[-3000:]}")

    try:
        src_qemu, src_console = qemu(src.socket, str(tmp_path / "src.qmp"))
        src_console.wait_for("@@HOLD ready", BOOT_TIMEOUT)
        before(share)
        dst_qemu, dst_console = qemu(dst.socket, str(tmp_path / "dst.qmp"),
                                     "-incoming", "defer")
        src_qmp = Qmp(str(tmp_path / "src.qmp"))
        dst_qmp = Qmp(str(tmp_path / "dst.qmp"))
        # With a return path the source learns whether the destination loaded the state (a
        # device state refused there fails the migration, and the guest stays on the source).
        for q in (src_qmp, dst_qmp):
            q.execute("migrate-set-capabilities",
                      capabilities=[{"capability": "return-path", "state": True}])
        dst_qmp.execute("migrate-incoming", uri=f"unix:{migration}")
        src_qmp.execute("migrate", uri=f"unix:{migration}")
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while True:
            status = src_qmp.execute("query-migrate")
            assert isinstance(status, dict)
            if status.get("status") in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, f"migration still {status}" + report()
            time.sleep(0.2)
        if status["status"] == "completed":
            print(f"{' '.join(args)}: migration completed in {status.get('total-time')} ms,"
                  f" guest stopped for {status.get('downtime')} ms")
            src_qmp.execute("quit")
            src_qemu.wait(30)
            assert dst_qmp.execute("query-status")["status"] in ("running", "paused")
            runs = dst_console
        else:
            # The destination gave up: the source runs the guest on.
            dst_qemu.wait(30)
            assert src_qmp.execute("query-status")["status"] == "running", report()
            runs = src_console
        # The guest goes on once it sees this file.
        (share / "m" / "go").write_bytes(b"")
        runs.wait_for("@@HOLD done", MIGRATE_TIMEOUT)
        runs.wait_for("@@GUEST poweroff", 60)
        for p in procs:
            p.wait(60)
    except AssertionError as e:
        raise AssertionError(f"{e}{report()}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        src.stop()
        dst.stop()
    vals = parse_values(src_console.all + "\n" + dst_console.all)
    assert vals["before.read"] == "read me" and vals["before.list"] == "a,b", vals
    assert vals["holder.rc"] == "0", report()
    assert "seccomp refused" not in src.text + dst.text
    return Outcome(status, vals, src.text, dst.text)


@pytest.mark.parametrize(("mode", "confinement"), [
    ("find-paths", ()), ("file-handles", ()), ("file-handles", SANDBOXED)],
    ids=["find-paths", "file-handles", "file-handles-sandboxed"])
def test_qemu_live_migrates_a_guest_between_two_daemons(tmp_path: Path, qemu10: list[str],
                                                       kernel612: Kernel, mode: str,
                                                       confinement: tuple[str, ...]) -> None:
    r = migrate_guest(tmp_path, qemu10, kernel612, (f"--migration-mode={mode}", *confinement))
    assert r.status["status"] == "completed", r.status
    assert r.vals["after.read"] == "read me", r.vals
    assert r.vals["after.list"] == "a,b", r.vals
    assert r.vals["after.w"] == "beforeafter.", r.vals
    # The host sees the guest's write, and the state went through both daemons.
    assert (tmp_path / "share" / "m" / "w.txt").read_bytes() == b"beforeafter."
    # QEMU turned dirty logging on first, which started the pre-migration pass.
    assert "pre-migration pass" in r.src_text, r.src_text[-3000:]
    assert "device state saved" in r.src_text, r.src_text[-3000:]
    assert "device state loaded" in r.dst_text and "0 invalid" in r.dst_text, r.dst_text[-3000:]


def _delete_and_rename(share: Path) -> None:
    """While the guest holds them: r.txt deleted, w.txt renamed."""
    os.unlink(share / "m" / "r.txt")
    os.rename(share / "m" / "w.txt", share / "m" / "w2.txt")


@pytest.mark.parametrize("on_error", ["abort", "guest-error"])
def test_qemu_migration_while_the_host_deletes_and_renames_held_files(
        tmp_path: Path, qemu10: list[str], kernel612: Kernel, on_error: str) -> None:
    """find-paths: the renamed file is found under its new name; the deleted one cannot be
    found again.  abort: the destination refuses the state, the migration fails and the guest
    runs on on the source with all its files.  guest-error: the guest moves, and only the
    deleted file's fd answers EIO.  --cache=never: the read after the move reaches the daemon
    (a page the guest still caches would answer it without asking)."""
    r = migrate_guest(tmp_path, qemu10, kernel612,
                      ("--migration-mode=find-paths", f"--migration-on-error={on_error}",
                       "--cache=never"),
                      before=_delete_and_rename)
    share = tmp_path / "share"
    if on_error == "abort":
        assert r.status["status"] == "failed", r.status
        assert "cannot be found again" in r.dst_text, r.dst_text[-3000:]
        assert r.vals["after.read"] == "read me", r.vals     # the source still holds it
    else:
        assert r.status["status"] == "completed", r.status
        assert "1 invalid" in r.dst_text, r.dst_text[-3000:]
        assert r.vals["after.read"] == "error Input/output error", r.vals
    assert r.vals["after.w"] == "beforeafter.", r.vals
    assert r.vals["after.list"] == "a,b", r.vals
    assert (share / "m" / "w2.txt").read_bytes() == b"beforeafter."
