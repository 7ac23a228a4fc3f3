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


@pytest.mark.parametrize("mode", ["find-paths", "file-handles"])
def test_qemu_live_migrates_a_guest_between_two_daemons(tmp_path: Path, qemu10: list[str],
                                                       kernel612: Kernel, mode: str) -> None:
    share = _share(tmp_path)
    src = start_daemon(share, str(tmp_path / "src.sock"), f"--migration-mode={mode}")
    dst = start_daemon(share, str(tmp_path / "dst.sock"), f"--migration-mode={mode}")
    migration = str(tmp_path / "migration.sock")
    procs: list[subprocess.Popen] = []

    def qemu(sock: str, qmp: str, *extra: str) -> tuple[subprocess.Popen, Console]:
        argv = guest_run.qemu_argv(kernel612, sock, TAG, memory_mib=512)
        argv = [*qemu10, *argv[1:], "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc, Console(proc)

    try:
        src_qemu, src_console = qemu(src.socket, str(tmp_path / "src.qmp"))
        src_console.wait_for("@@HOLD ready", BOOT_TIMEOUT)
        dst_qemu, dst_console = qemu(dst.socket, str(tmp_path / "dst.qmp"),
                                     "-incoming", f"unix:{migration}")
        src_qmp = Qmp(str(tmp_path / "src.qmp"))
        dst_qmp = Qmp(str(tmp_path / "dst.qmp"))
        src_qmp.execute("migrate", uri=f"unix:{migration}")
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while True:
            status = src_qmp.execute("query-migrate")
            assert isinstance(status, dict)
            if status.get("status") == "completed":
                break
            assert status.get("status") not in ("failed", "cancelled"), (
                f"migration {status}\n--- source console ---\n{src_console.text}\n"
                f"--- destination console ---\n{dst_console.text}\n--- source daemon ---\n"
                f"{src.text[-3000:]}\n--- destination daemon ---\n{dst.text[-3000:]}")
            assert time.monotonic() < deadline, f"migration still {status}"
            time.sleep(0.2)
        print(f"{mode}: migration completed in {status.get('total-time')} ms, guest stopped"
              f" for {status.get('downtime')} ms")
        src_qmp.execute("quit")
        src_qmp.close()
        src_qemu.wait(30)
        assert dst_qmp.execute("query-status")["status"] in ("running", "paused")
        # The guest runs on the destination now; it goes on once it sees this file.
        (share / "m" / "go").write_bytes(b"")
        dst_console.wait_for("@@HOLD done", MIGRATE_TIMEOUT)
        dst_console.wait_for("@@GUEST poweroff", 60)
        dst_qmp.close()
        dst_qemu.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        src_text, dst_text = src.text, dst.text
        src.stop()
        dst.stop()
    vals = parse_values(src_console.text.replace("\r", "") + "\n" + dst_console.text)
    assert vals["before.read"] == "read me" and vals["before.list"] == "a,b", vals
    assert vals["after.read"] == "read me", vals
    assert vals["after.list"] == "a,b", vals
    assert vals["after.w"] == "beforeafter.", vals
    assert vals["holder.rc"] == "0", vals
    # The host sees the guest's write, and the state went through both daemons.
    assert (share / "m" / "w.txt").read_bytes() == b"beforeafter."
    assert "device state saved" in src_text, src_text[-3000:]
    assert "device state loaded" in dst_text and "0 invalid" in dst_text, dst_text[-3000:]
