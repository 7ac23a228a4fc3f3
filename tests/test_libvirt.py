"""libvirt runs pyvirtiofsd for a domain's <filesystem>, as it runs virtiofsd.

The test starts Debian's libvirtd itself -- no systemd -- in a private mount namespace whose
/etc/libvirt, /run/libvirt, /var/{lib,log,cache}/libvirt and /usr/share/qemu/vhost-user are
directories of the test, so it touches nothing of the host's and nothing of another run.  A TCG
domain (the project's guest kernel and initramfs, memfd shared memory) mounts the share; the
guest writes, the host reads.  What libvirt 9 does (src/qemu/qemu_virtiofs.c) and is checked:

* opens the vhost-user socket itself and passes the listening fd: `--fd=N`;
* passes the share and the <binary> sub-elements as one legacy `-o` list: `source=DIR`, then
  `cache=`, `xattr`, `no_flock`/`no_posix_lock` when the XML sets them;
* daemonizes the daemon and writes its pid to /run/libvirt/qemu/ID-NAME-fs0-fs.pid, holding a
  POSIX lock on byte 0 that the daemon inherits: at stop, a pid file nobody holds locked is taken
  as stale and its pid is NOT killed, so the daemon must keep that descriptor open;
* at domain stop removes the pid file (killing the pid's process group if the lock is held)
  and the socket.

`virsh shutdown` presses the ACPI power button: the guest (vfs.modules=button) waits for it in
/sys/firmware/acpi/interrupts/ff_pwr_btn, unmounts and powers off.  `virsh destroy` kills QEMU.
Either way no daemon process, socket or pid file may be left.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DAEMON, ROOT
from tests.guest_util import Kernel, ensure_kernel, guest_unavailable
from tests.proctree import children

pytestmark = pytest.mark.guest

BOOT_TIMEOUT = 90.0      # TCG on shared cores; a boot is ~8 s when the machine is idle
LIBVIRTD_TIMEOUT = 30.0
TAG = "myfs"

LIBVIRTD_CONF = """\
unix_sock_dir = "/run/libvirt"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:stderr"
"""
# QEMU as root (the daemon is started as root in any case), and nothing this machine lacks:
# no cgroup controllers, no per-domain /dev namespace, no virtlogd, no security driver.
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
# Runs in the private mount namespace; $1 is the test's directory.
NAMESPACE_SETUP = r"""
set -e
T=$1
mount -t tmpfs pyvfs-run /run
mkdir -p /run/libvirt
mount --bind "$T/run" /run/libvirt
for d in lib log cache; do
  mount -t tmpfs "pyvfs-$d" "/var/$d"
  mkdir -p "/var/$d/libvirt"
  mount --bind "$T/$d" "/var/$d/libvirt"
done
mount --bind "$T/etc" /etc/libvirt
mkdir -p /usr/share/qemu/vhost-user
mount --bind "$T/vhost-user" /usr/share/qemu/vhost-user
exec libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid
"""

# The guest's workload: write for the host, then wait for the ACPI power button (never pressed
# before `virsh destroy`).  The button driver makes the fixed event count in sysfs.
WORKLOAD = r"""
echo "written by the guest" > /mnt/from-guest
[ "$(cat /mnt/from-host)" = "written by the host" ] || exit 1
pressed() { set -- $(cat /sys/firmware/acpi/interrupts/ff_pwr_btn); [ "$1" != 0 ]; }
echo "@@GUEST waiting-for-power-button"
while ! pressed; do sleep 0.2; done
echo "@@GUEST power-button"
"""


def wait_until(what: str, check: Callable[[], bool], timeout: float,
               evidence: Callable[[], str] = lambda: "") -> None:
    """Poll an outside condition (a file libvirt or QEMU writes) until it holds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{evidence()}")
        time.sleep(delay)   # bounded poll interval, not a synchronisation
        delay = min(delay * 2, 0.25)


@dataclass
class Libvirt:
    base: Path
    proc: subprocess.Popen

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.base / 'run' / 'libvirt-sock'}"

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                                text=True, timeout=120)
        if check:
            assert result.returncode == 0, f"virsh {' '.join(args)}: {result.stderr}\n" \
                                           + self.log()
        return result

    def running(self) -> list[str]:
        return self.virsh("list", "--name").stdout.split()

    def log(self) -> str:
        return (self.base / "libvirtd.log").read_text(errors="replace")[-3000:]

    def pid_files(self, name: str) -> list[str]:
        return glob.glob(str(self.base / "run" / "qemu" / f"*-{name}-fs0-fs.pid"))

    def sockets(self, name: str) -> list[str]:
        return glob.glob(str(self.base / "lib" / "qemu" / f"domain-*-{name}" / "fs0-fs.sock"))

    def daemon_log(self, name: str) -> str:
        path = self.base / "log" / "qemu" / f"{name}-fs0-virtiofsd.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def kernel() -> Kernel:
    reason = guest_unavailable()
    if reason:
        pytest.skip(reason)
    return ensure_kernel("61")


@pytest.fixture(scope="module")
def libvirt(tmp_path_factory: pytest.TempPathFactory, kernel: Kernel) -> Iterator[Libvirt]:
    libvirtd = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
    assert os.access(libvirtd, os.X_OK) and shutil.which("virsh"), \
        "libvirtd or virsh is missing: run scripts/setup.sh"
    base = tmp_path_factory.mktemp("libvirt")
    for d in ("etc", "run", "lib", "log", "cache", "vhost-user"):
        (base / d).mkdir()
    (base / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
    (base / "etc" / "qemu.conf").write_text(QEMU_CONF)
    with open(base / "libvirtd.log", "wb") as log:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", NAMESPACE_SETUP,
             "sh", str(base)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    lv = Libvirt(base, proc)
    try:
        wait_until("libvirtd listening", lambda: proc.poll() is not None or os.path.exists(
            base / "run" / "libvirt-sock"), LIBVIRTD_TIMEOUT, lv.log)
        assert proc.poll() is None, f"libvirtd exited {proc.returncode}:\n{lv.log()}"
        lv.virsh("version")
        yield lv
    finally:
        for name in lv.running() if proc.poll() is None else []:
            lv.virsh("destroy", name, check=False)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def domain_xml(name: str, kernel: Kernel, share: Path, console: Path, binary: str) -> str:
    return f"""\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel.vmlinuz}</kernel>
    <initrd>{kernel.initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet vfs.tag={TAG} vfs.modules=button</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs'/>
      {binary}
      <source dir='{share}'/>
      <target dir='{TAG}'/>
    </filesystem>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
"""


def _family(pid: int) -> set[int]:
    out = {pid}
    for child in children(pid):
        out |= _family(child)
    return out


def _locked_by(path: str) -> set[int]:
    """Pids holding a POSIX lock on `path` (/proc/locks: ... PID MAJ:MIN:INODE START END)."""
    st = os.stat(path)
    holders = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:
                continue     # a waiter, not a holder
            if fields[1] == "POSIX" and fields[5].endswith(f":{st.st_ino}"):
                holders.add(int(fields[4]))
    return holders


@dataclass
class Running:
    pid: int
    argv: list[str]
    family: set[int]
    console: Path


def boot(lv: Libvirt, kernel: Kernel, tmp_path: Path, name: str, binary: str) -> Running:
    share = tmp_path / "share"
    share.mkdir()
    (share / ".guest-script.sh").write_text(WORKLOAD)
    (share / "from-host").write_text("written by the host\n")
    console = tmp_path / "console.log"
    xml = tmp_path / f"{name}.xml"
    xml.write_text(domain_xml(name, kernel, share, console, binary))
    lv.virsh("create", str(xml))

    def evidence() -> str:
        text = console.read_text(errors="replace") if console.exists() else "(no console)"
        return f"--- console ---\n{text[-3000:]}\n--- daemon ---\n{lv.daemon_log(name)[-3000:]}"

    wait_until("the guest mounting the share and waiting for the power button",
               lambda: console.exists() and "waiting-for-power-button" in console.read_text(
                   errors="replace"), BOOT_TIMEOUT, evidence)
    # The guest's write is on the host, through the daemon libvirt started.
    assert (share / "from-guest").read_text() == "written by the guest\n"
    [pid_file] = lv.pid_files(name)
    pid = int(Path(pid_file).read_text().strip())
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")[:-1]
    # libvirt's pid file names the daemon it started and stays locked by it.
    assert str(DAEMON) in argv[:2], argv
    assert _locked_by(pid_file) == {pid}, "the daemon must keep libvirt's pid-file lock"
    [sock] = lv.sockets(name)
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    family = _family(pid)
    assert len(family) >= 4, f"supervisor, spawner and workers: {family}"
    return Running(pid, argv, family, console)


def assert_nothing_left(lv: Libvirt, name: str, run: Running) -> None:
    wait_until(f"domain {name} gone", lambda: name not in lv.running(), BOOT_TIMEOUT, lv.log)
    # libvirt stops the daemon before it reports the domain gone; allow a moment for the exit.
    wait_until("every daemon process gone",
               lambda: not any(os.path.exists(f"/proc/{p}") for p in run.family), 20.0,
               lambda: lv.daemon_log(name))
    assert lv.pid_files(name) == []
    assert lv.sockets(name) == []
    errors = [line for line in lv.daemon_log(name).splitlines() if " ERROR " in line]
    assert not errors, errors


def test_libvirt_binary_with_options_and_shutdown(libvirt: Libvirt, kernel: Kernel,
                                                  tmp_path: Path) -> None:
    """<binary path=...> with options; `virsh shutdown` (ACPI) ends guest and daemon."""
    binary = (f"<binary path='{DAEMON}' xattr='on'><cache mode='always'/>"
              "<lock posix='off' flock='off'/></binary>")
    run = boot(libvirt, kernel, tmp_path, "pyvfs-shutdown", binary)
    share = tmp_path / "share"
    fd_arg, o, options = run.argv[-3:]
    assert fd_arg.startswith("--fd=") and o == "-o", run.argv
    assert options == f"source={share},cache=always,xattr,no_flock,no_posix_lock", run.argv
    log = libvirt.daemon_log("pyvfs-shutdown")
    assert "serving" in log and f"on fd {fd_arg[5:]}" in log, log

    libvirt.virsh("shutdown", "pyvfs-shutdown")
    assert_nothing_left(libvirt, "pyvfs-shutdown", run)
    console = run.console.read_text(errors="replace")
    assert "@@GUEST power-button" in console and "@@GUEST umount 0" in console, console


def test_libvirt_finds_the_descriptor_and_destroy(libvirt: Libvirt, kernel: Kernel,
                                                  tmp_path: Path) -> None:
    """No <binary>: libvirt takes pyvirtiofsd from its vhost-user descriptor (installed by
    scripts/install-vhost-user.sh); `virsh destroy` kills QEMU under the running guest."""
    vhost_user = libvirt.base / "vhost-user"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "install-vhost-user.sh"), "--dir",
                             str(vhost_user), str(DAEMON)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    try:
        run = boot(libvirt, kernel, tmp_path, "pyvfs-destroy", "")
        assert run.argv[-2:] == ["-o", f"source={tmp_path / 'share'}"], run.argv
        libvirt.virsh("destroy", "pyvfs-destroy")
        assert_nothing_left(libvirt, "pyvfs-destroy", run)
        assert "@@GUEST power-button" not in run.console.read_text(errors="replace")
    finally:
        (vhost_user / "40-pyvirtiofsd.json").unlink()


def test_libvirt_remote_locks_are_served(libvirt: Libvirt, kernel: Kernel,
                                         tmp_path: Path) -> None:
    """<lock posix='on' flock='on'/> becomes `-o ...,posix_lock,flock`, which virtiofsd refuses
    (it has no remote locks) and pyvirtiofsd honours: the domain starts and the daemon serves
    it; `virsh destroy` leaves nothing behind."""
    binary = f"<binary path='{DAEMON}'><lock posix='on' flock='on'/></binary>"
    run = boot(libvirt, kernel, tmp_path, "pyvfs-locks", binary)
    options = run.argv[-1]
    assert options.endswith(",flock,posix_lock") or options.endswith(",posix_lock,flock"), \
        run.argv
    log = libvirt.daemon_log("pyvfs-locks")
    assert "serving" in log and "invalid compat argument" not in log, log
    libvirt.virsh("destroy", "pyvfs-locks")
    assert_nothing_left(libvirt, "pyvfs-locks", run)


# --- the descriptor, without libvirt ---------------------------------------------------------


def test_descriptor_template_follows_the_schema() -> None:
    """etc/vhost-user/40-pyvirtiofsd.json: the keys of QEMU's vhost-user.json VhostUserBackend,
    type "fs", an absolute binary."""
    doc = json.loads((ROOT / "etc" / "vhost-user" / "40-pyvirtiofsd.json").read_text())
    assert set(doc) <= {"description", "type", "binary", "tags"} and doc["type"] == "fs"
    assert os.path.isabs(doc["binary"]) and os.path.basename(doc["binary"]) == "pyvirtiofsd"


def test_descriptor_installer_checks_the_binary(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "install-vhost-user.sh")
    ok = subprocess.run(["bash", script, "--dir", str(tmp_path), str(DAEMON)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads((tmp_path / "40-pyvirtiofsd.json").read_text())
    assert doc["type"] == "fs" and doc["binary"] == str(DAEMON)
    # A program that is not a virtio-fs back-end is not installed.
    bad = subprocess.run(["bash", script, "--dir", str(tmp_path / "other"), "/bin/true"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "does not report type" in bad.stderr
    assert not (tmp_path / "other" / "40-pyvirtiofsd.json").exists()
