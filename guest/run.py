"""Boot a Debian guest under QEMU (TCG) against a virtio-fs daemon and collect what happened.

The daemon is any command that takes ``--socket-path=S --shared-dir=D`` (pyvirtiofsd, the Rust
virtiofsd): the runner appends those two options to the given argv, waits until the socket is
listening, boots QEMU with a ``vhost-user-fs-pci`` device on it, and lets the guest's /init
(guest/build-initramfs.sh) mount the share and run the workload script the host wrote into it.

Usable as a module (``run_guest``, ``ensure_kernel``) and as a command::

    python3 guest/run.py --kernel 61 --share DIR --script FILE -- DAEMON [ARGS...]

which prints the workload's console output and exits non-zero if anything failed.
Standard library only: the demo runs it before the project's venv is needed.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

GUEST_DIR = Path(__file__).resolve().parent
WORK_DIR = GUEST_DIR / "work"
KERNELS = {"61": "k61", "612": "k612"}
SCRIPT_NAME = ".guest-script.sh"
MARKER = "@@GUEST "
QEMU = "qemu-system-x86_64"
# QEMU 10 from Debian trixie in a debootstrap tree (scripts/install-qemu10.sh): what moves a
# vhost-user back-end's state in a live migration (DEVICE_STATE, QEMU 9 and later).
QEMU10_DIR = Path(os.environ.get("QEMU10_DIR", str(WORK_DIR / "qemu10")))


class GuestError(RuntimeError):
    """The guest could not be prepared or started (not a workload failure)."""


@dataclass(frozen=True)
class Kernel:
    name: str
    vmlinuz: Path
    initrd: Path
    package: str


def ensure_kernel(name: str, log: Callable[[str], None] | None = None) -> Kernel:
    """Fetches the kernel tree and builds its initramfs if missing (both scripts are idempotent)."""
    if name not in KERNELS:
        raise GuestError(f"unknown guest kernel {name!r} (one of {', '.join(KERNELS)})")
    kdir = WORK_DIR / KERNELS[name]
    if not (kdir / ".done").exists():
        if log:
            log(f"fetching Debian's {name} kernel into {kdir} (once)")
        _run_script([str(GUEST_DIR / "fetch-kernels.sh"), name])
    initrd = kdir / "initramfs.gz"
    _run_script([str(GUEST_DIR / "build-initramfs.sh"), str(kdir), str(initrd)])
    return Kernel(name, kdir / "vmlinuz", initrd, (kdir / "package").read_text().strip())


def _run_script(argv: list[str]) -> None:
    proc = subprocess.run(["bash", *argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr.strip()}")


@dataclass
class ConsoleLine:
    at: float  # seconds since QEMU was started (host clock)
    text: str


@dataclass
class GuestResult:
    console: list[ConsoleLine]
    qemu_rc: int | None
    qemu_stderr: str
    daemon_rc: int | None  # None: it did not exit by itself and was killed
    daemon_output: str  # its stderr and stdout
    timed_out: bool
    daemon_exited_first: bool  # the daemon exited while QEMU was still running
    leftovers: list[str]  # processes of the daemon's group still alive after it exited (killed)
    wall: float  # daemon start to daemon exit
    markers: dict[str, list[str]] = field(default_factory=dict)
    mounted_at: float | None = None  # host seconds from QEMU start to the guest's mount

    @property
    def console_text(self) -> str:
        return "\n".join(line.text for line in self.console)

    @property
    def script_rc(self) -> int | None:
        fields = self.markers.get("script-exit")
        return int(fields[0]) if fields else None

    @property
    def guest_mount_uptime(self) -> float | None:
        """Guest's own uptime (seconds since kernel start) when the share was mounted."""
        fields = self.markers.get("mounted")
        return float(fields[0]) if fields else None

    @property
    def script_output(self) -> str:
        """Console lines between the mount and the script's exit: the workload's own output."""
        out: list[str] = []
        inside = False
        for line in self.console:
            if line.text.startswith(MARKER + "mounted"):
                inside = True
            elif line.text.startswith(MARKER + "script-exit"):
                break
            elif inside:
                out.append(line.text)
        return "\n".join(out)

    @property
    def ok(self) -> bool:
        return (
            not self.timed_out
            and not self.daemon_exited_first
            and self.qemu_rc == 0
            and self.script_rc == 0
            and "error" not in self.markers
            and self.markers.get("umount") == ["0"]
            and self.daemon_rc == 0
            and not self.leftovers
        )

    def failure(self) -> str:
        """One paragraph saying what went wrong, with the evidence; '' when ok."""
        if self.ok:
            return ""
        why = []
        if self.timed_out:
            why.append("timed out (QEMU and daemon killed)")
        if self.daemon_exited_first:
            why.append("the daemon exited while the guest was running")
        if "error" in self.markers:
            why.append("guest init: " + " ".join(self.markers["error"]))
        if self.script_rc not in (None, 0):
            why.append(f"workload script exited {self.script_rc}")
        if self.script_rc is None and not self.timed_out:
            why.append("the workload script never finished")
        if self.qemu_rc not in (0, None):
            why.append(f"QEMU exited {self.qemu_rc}")
        if self.markers.get("umount", ["0"]) != ["0"]:
            why.append("umount failed in the guest")
        if self.daemon_rc != 0 and not self.timed_out:
            why.append(
                "daemon was still running after QEMU exited"
                if self.daemon_rc is None
                else f"daemon exited {self.daemon_rc}"
            )
        if self.leftovers:
            why.append(f"daemon left processes behind: {', '.join(self.leftovers)}")
        tail = "\n".join(line.text for line in self.console[-40:])
        return (
            "; ".join(why)
            + f"\n--- console (last 40 lines) ---\n{tail}"
            + f"\n--- QEMU stderr ---\n{self.qemu_stderr[-3000:]}"
            + f"\n--- daemon output ---\n{self.daemon_output[-3000:]}"
        )


def socket_listening(path: str, pid: int | None = None) -> bool:
    """True once a UNIX socket is bound at ``path`` and listening.

    Read from /proc/net/unix instead of connecting: a vhost-user back-end serves exactly one
    frontend and exits when it disconnects, so a probe connection would end it. The table is
    per network namespace, so the daemon's own view (/proc/PID/net/unix) is read too.
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    tables = ["/proc/net/unix"] + ([f"/proc/{pid}/net/unix"] if pid is not None else [])
    for table in tables:
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    # Num RefCount Protocol Flags Type St Inode Path; Flags has __SO_ACCEPTCON.
                    parts = line.split()
                    if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                        return True
        except OSError:
            continue
    return False


def wait_listening(path: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not socket_listening(path, proc.pid):
        if proc.poll() is not None:
            raise GuestError(f"daemon exited with {proc.returncode} before listening on {path}")
        if time.monotonic() > deadline:
            raise GuestError(f"daemon did not listen on {path} within {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def qemu_argv(
    kernel: Kernel,
    sock: str,
    tag: str,
    *,
    smp: int = 1,
    memory_mib: int = 1024,
    num_request_queues: int | None = None,
    queue_size: int | None = None,
    append: str = "",
) -> list[str]:
    device = f"vhost-user-fs-pci,chardev=c0,tag={tag}"
    if num_request_queues is not None:
        device += f",num-request-queues={num_request_queues}"
    if queue_size is not None:
        device += f",queue-size={queue_size}"
    cmdline = f"console=ttyS0 panic=-1 quiet vfs.tag={tag} {append}".strip()
    return [
        QEMU,
        "-machine", "q35,accel=tcg",
        "-cpu", "max",
        "-m", f"{memory_mib}M",
        "-smp", str(smp),
        # vhost-user maps guest RAM in the daemon: it must be a shareable memfd.
        "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
        "-numa", "node,memdev=mem",
        "-chardev", f"socket,id=c0,path={sock}",
        "-device", device,
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(kernel.initrd),
        "-append", cmdline,
        "-display", "none",
        "-nodefaults",
        "-no-user-config",
        "-serial", "stdio",
        "-no-reboot",
        "-nic", "none",
    ]  # fmt: skip


def qemu10_command(tree: Path = QEMU10_DIR) -> list[str]:
    """The tree's qemu-system-x86_64 run through the tree's own dynamic loader and libraries
    (trixie's glibc is newer than the host's), with its firmware: no chroot, nothing mounted.
    Put it in place of qemu_argv()'s first element."""
    libs = f"{tree}/lib/x86_64-linux-gnu:{tree}/usr/lib/x86_64-linux-gnu"
    return [f"{tree}/lib64/ld-linux-x86-64.so.2", "--library-path", libs,
            f"{tree}/usr/bin/qemu-system-x86_64",
            "-L", f"{tree}/usr/share/qemu", "-L", f"{tree}/usr/share/seabios"]


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM then SIGKILL the process group this runner started ``proc`` in."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_guest(
    daemon_argv: Sequence[str],
    share: str | os.PathLike[str],
    script: str,
    *,
    kernel: Kernel,
    tag: str = "myfs",
    smp: int = 1,
    num_request_queues: int | None = None,
    queue_size: int | None = None,
    timeout: float = 60.0,
    daemon_exit_timeout: float = 10.0,
    keep_script: bool = False,
    on_line: Callable[[ConsoleLine], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> GuestResult:
    """Runs one boot: daemon on ``share``, guest runs ``script`` (sh) from the share, powers off.

    ``daemon_argv`` gets ``--socket-path=S --shared-dir=D`` appended. ``timeout`` bounds the
    whole boot; on expiry QEMU and the daemon are killed and ``timed_out`` is set. A daemon that
    exits while the guest runs gets QEMU killed a moment later (the guest would hang on its
    requests); a daemon still running ``daemon_exit_timeout`` seconds after QEMU exits is killed
    (``daemon_rc`` None). Raises GuestError if the daemon never listens. ``progress`` is told
    what happens, in plain words, as it happens (the demo prints it).
    """
    share = Path(share)
    script_path = share / SCRIPT_NAME
    script_path.write_text(script)
    with tempfile.TemporaryDirectory(prefix="pyvfs-guest-") as tmp:
        sock = os.path.join(tmp, "vfs.sock")
        with (
            open(os.path.join(tmp, "daemon.log"), "w+b") as daemon_log,
            open(os.path.join(tmp, "qemu.err"), "w+b") as qemu_err,
        ):
            try:
                result = _boot(
                    daemon_argv, share, sock, daemon_log, qemu_err, kernel, tag, smp,
                    num_request_queues, queue_size, timeout, daemon_exit_timeout, on_line,
                    progress or (lambda _: None),
                )  # fmt: skip
            finally:
                if not keep_script:
                    script_path.unlink(missing_ok=True)
    for line in result.console:
        if line.text.startswith(MARKER):
            name, _, rest = line.text[len(MARKER) :].partition(" ")
            result.markers[name] = [rest] if name == "error" else rest.split()
            if name == "mounted":
                result.mounted_at = line.at
    return result


def _boot(
    daemon_argv: Sequence[str],
    share: Path,
    sock: str,
    daemon_log: IO[bytes],
    qemu_err: IO[bytes],
    kernel: Kernel,
    tag: str,
    smp: int,
    num_request_queues: int | None,
    queue_size: int | None,
    timeout: float,
    daemon_exit_timeout: float,
    on_line: Callable[[ConsoleLine], None] | None,
    progress: Callable[[str], None],
) -> GuestResult:
    start = time.monotonic()
    deadline = start + timeout
    console: list[ConsoleLine] = []
    timed_out = daemon_exited_first = False
    daemon = subprocess.Popen(
        [*daemon_argv, f"--socket-path={sock}", f"--shared-dir={share}"],
        stdin=subprocess.DEVNULL,
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own children are killed with the group on timeout
    )
    progress(f"Starting {os.path.basename(daemon_argv[0])} on {share}, socket {sock}")
    qemu: subprocess.Popen | None = None
    try:
        try:
            wait_listening(sock, daemon, timeout=min(timeout, 30.0))
        except GuestError as e:
            daemon_log.seek(0)
            output = daemon_log.read().decode(errors="replace")[-3000:]
            raise GuestError(f"{e}; its output:\n{output}") from None
        progress(f"The daemon (pid {daemon.pid}) is listening on its socket")
        argv = qemu_argv(
            kernel, sock, tag, smp=smp, num_request_queues=num_request_queues,
            queue_size=queue_size,
        )  # fmt: skip
        progress(f"Booting {kernel.package} under QEMU ({smp} vCPU, software emulation, ~10 s)...")
        qemu_start = time.monotonic()
        qemu = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=qemu_err,
            start_new_session=True,
        )  # fmt: skip

        def tell(line: ConsoleLine) -> None:
            if line.text.startswith(MARKER + "mounted"):
                progress(f"The guest mounted the share ({line.at:.1f} s after QEMU started)")
            elif line.text.startswith(MARKER + "poweroff"):
                progress("The guest finished its script and is powering off")
            if on_line:
                on_line(line)

        reader = threading.Thread(
            target=_read_console, args=(qemu, qemu_start, console, tell), daemon=True
        )
        reader.start()
        exited = _wait_first([qemu, daemon], deadline)
        if qemu not in exited:
            if daemon in exited:
                # virtiofsd exits as soon as QEMU closes the socket at power-off, which may be
                # seen just before QEMU's own exit; a QEMU still running a moment later has lost
                # its back-end under a live guest, whose requests would hang forever.
                if not _wait_first([qemu], time.monotonic() + 3.0):
                    daemon_exited_first = True
                    _kill_group(qemu, grace=0)
            else:
                timed_out = True
                _kill_group(qemu, grace=0)
        qemu.wait()
        reader.join(timeout=10)
        # virtiofsd exits by itself when the frontend disconnects: give it a bounded moment.
        if not timed_out:
            _wait_first([daemon], time.monotonic() + daemon_exit_timeout)
        daemon_rc = daemon.poll()
        if daemon_rc is not None:
            progress(f"QEMU exited, and the daemon exited with status {daemon_rc}")
    finally:
        if qemu is not None:
            _kill_group(qemu, grace=0)
        _kill_group(daemon, grace=5.0)
    # Children the daemon left in its process group (e.g. orphaned workers) are a daemon bug:
    # report and end them. A pgid stays reserved while any member lives, so these are ours.
    leftovers = _group_members(daemon.pid)
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    daemon_log.seek(0)
    qemu_err.seek(0)
    return GuestResult(
        console=console,
        qemu_rc=None if timed_out else qemu.returncode,
        qemu_stderr=qemu_err.read().decode(errors="replace"),
        daemon_rc=daemon_rc,
        daemon_output=daemon_log.read().decode(errors="replace"),
        timed_out=timed_out,
        daemon_exited_first=daemon_exited_first,
        leftovers=[f"{pid} ({comm})" for pid, comm in leftovers],
        wall=time.monotonic() - start,
    )


def _group_members(pgid: int) -> list[tuple[int, str]]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        comm = data[data.index("(") + 1 : data.rindex(")")]
        fields = data[data.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            members.append((int(entry), comm))
    return members


def _wait_first(procs: list[subprocess.Popen], deadline: float) -> list[subprocess.Popen]:
    """Blocks until one of ``procs`` has exited or ``deadline`` passes; returns those exited."""
    fds = {}
    try:
        for p in procs:
            if p.poll() is None:
                fds[os.pidfd_open(p.pid)] = p
            else:
                return [q for q in procs if q.poll() is not None]
        with selectors.DefaultSelector() as sel:
            for fd in fds:
                sel.register(fd, selectors.EVENT_READ)
            sel.select(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for fd in fds:
            os.close(fd)
    return [p for p in procs if p.poll() is not None]


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def _read_console(
    qemu: subprocess.Popen,
    t0: float,
    out: list[ConsoleLine],
    on_line: Callable[[ConsoleLine], None] | None,
) -> None:
    assert qemu.stdout is not None
    for raw in qemu.stdout:
        line = ConsoleLine(time.monotonic() - t0, _ANSI.sub("", raw.decode(errors="replace")))
        line.text = line.text.rstrip("\n")
        out.append(line)
        if on_line:
            on_line(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="61")
    ap.add_argument("--share", required=True, help="directory the daemon shares")
    ap.add_argument("--script", required=True, help="sh script the guest runs from the share")
    ap.add_argument("--tag", default="myfs")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--num-request-queues", type=int)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--verbose", action="store_true", help="echo the whole console to stderr")
    ap.add_argument("--progress", action="store_true", help="say what happens on stderr")
    ap.add_argument("daemon", nargs=argparse.REMAINDER, help="-- DAEMON [ARGS...]")
    args = ap.parse_args(argv)
    daemon = args.daemon[1:] if args.daemon[:1] == ["--"] else args.daemon
    if not daemon:
        ap.error("missing daemon command after --")
    try:
        kernel = ensure_kernel(args.kernel)
        result = run_guest(
            daemon,
            args.share,
            Path(args.script).read_text(),
            kernel=kernel,
            tag=args.tag,
            smp=args.smp,
            num_request_queues=args.num_request_queues,
            timeout=args.timeout,
            on_line=(lambda line: print(line.text, file=sys.stderr)) if args.verbose else None,
            progress=(lambda text: print(text, file=sys.stderr, flush=True))
            if args.progress
            else None,
        )
    except (GuestError, OSError) as e:
        print(f"guest run failed: {e}", file=sys.stderr)
        return 2
    print(result.script_output)
    if not result.ok:
        print(f"guest run failed: {result.failure()}", file=sys.stderr)
        return 1
    mount = f"{result.mounted_at:.1f}" if result.mounted_at is not None else "?"
    print(
        f"booted {kernel.package}: share mounted {mount} s after QEMU start, "
        f"whole run {result.wall:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
