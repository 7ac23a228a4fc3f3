"""A real client: QEMU 10 live-migrates a running guest between pyvirtiofsd and the Rust
virtiofsd 1.13, both ways (docs/rust-state-format.md).

As tests/test_guest_migration.py, whose QEMU, guest and workload this uses: the guest holds a
file open for reading, one for writing and a directory open while QEMU moves it; QEMU carries
the source daemon's device state in its migration stream to the destination daemon.  When the
source is pyvirtiofsd it is started with --migration-state-format=virtiofsd, as an operator
would for a virtiofsd destination; a pyvirtiofsd destination needs nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import start_daemon
from tests.frontend import ANCHOR, anchor_argv
from tests.guest_util import Kernel, guest_run, parse_values
from tests.test_guest_migration import (  # noqa: F401 -- the fixtures are used by name
    BOOT_TIMEOUT,
    MIGRATE_TIMEOUT,
    TAG,
    Console,
    Qmp,
    _share,
    kernel612,
    qemu10,
)

pytestmark = pytest.mark.guest


class Virtiofsd:
    """The Rust virtiofsd on the share, its log in a file."""

    def __init__(self, share: Path, log: Path) -> None:
        if not os.path.exists(ANCHOR):
            pytest.skip(f"Rust virtiofsd anchor not installed at {ANCHOR}")
        # sun_path holds 108 bytes and pytest's tmp_path grows with the test name.
        self.dir = tempfile.mkdtemp(prefix="vfs-")
        self.socket = os.path.join(self.dir, "s")
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                anchor_argv(self.socket, str(share), "--log-level=debug"),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"virtiofsd did not start:\n{self.text}")
            time.sleep(0.02)

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(20)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("direction", ["virtiofsd-to-pyvirtiofsd", "pyvirtiofsd-to-virtiofsd"])
def test_qemu_live_migrates_between_pyvirtiofsd_and_virtiofsd(
        tmp_path: Path, qemu10: list[str], kernel612: Kernel,  # noqa: F811
        direction: str) -> None:
    share = _share(tmp_path)
    to_rust = direction == "pyvirtiofsd-to-virtiofsd"
    py = start_daemon(share, str(tmp_path / "py.sock"),
                      *(["--migration-state-format=virtiofsd"] if to_rust else []))
    rs = Virtiofsd(share, tmp_path / "virtiofsd.log")
    src_sock, dst_sock = (py.socket, rs.socket) if to_rust else (rs.socket, py.socket)
    migration = str(tmp_path / "migration.sock")
    procs: list[subprocess.Popen] = []

    def qemu(sock: str, qmp: str, *extra: str) -> tuple[subprocess.Popen, Console]:
        argv = guest_run.qemu_argv(kernel612, sock, TAG, memory_mib=512)
        argv = [*qemu10, *argv[1:], "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc, Console(proc)

    def report() -> str:
        return (f"--- source console ---\n{src_console.text}\n--- destination console ---\n"
                f"{dst_console.text}\n--- pyvirtiofsd ---\n{py.text[-3000:]}\n"
                f"--- virtiofsd ---\n{rs.text[-3000:]}")

    try:
        src_qemu, src_console = qemu(src_sock, str(tmp_path / "src.qmp"))
        src_console.wait_for("@@HOLD ready", BOOT_TIMEOUT)
        dst_qemu, dst_console = qemu(dst_sock, str(tmp_path / "dst.qmp"),
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
                f"migration {status}\n{report()}")
            assert time.monotonic() < deadline, f"migration still {status}"
            time.sleep(0.2)
        print(f"{direction}: migration completed in {status.get('total-time')} ms, guest"
              f" stopped for {status.get('downtime')} ms")
        src_qmp.execute("quit")
        src_qmp.close()
        src_qemu.wait(30)
        assert dst_qmp.execute("query-status")["status"] in ("running", "paused")
        (share / "m" / "go").write_bytes(b"")
        try:
            dst_console.wait_for("@@HOLD done", MIGRATE_TIMEOUT)
            dst_console.wait_for("@@GUEST poweroff", 60)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{report()}") from None
        dst_qmp.close()
        dst_qemu.wait(60)
        py_text, rs_text = py.text, rs.text
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        py.stop()
        rs.stop()
    vals = parse_values(src_console.text.replace("\r", "") + "\n" + dst_console.text)
    assert vals["before.read"] == "read me" and vals["before.list"] == "a,b", vals
    assert vals["after.read"] == "read me", vals
    assert vals["after.list"] == "a,b", vals
    assert vals["after.w"] == "beforeafter.", vals
    assert vals["holder.rc"] == "0", vals
    assert (share / "m" / "w.txt").read_bytes() == b"beforeafter."
    if to_rust:
        assert "device state saved" in py_text, py_text[-3000:]
    else:
        assert "device state loaded" in py_text and "0 invalid" in py_text, py_text[-3000:]
    assert "Migration failed" not in rs_text and "Failed to" not in rs_text, rs_text[-3000:]
