"""Guest-level workloads: a QEMU (TCG) guest runs fio and a metadata loop on the share.

One boot per daemon and repetition runs every job in turn.  The guest is Debian 12's 6.1
kernel with one vCPU and QEMU's default virtio-fs queue size (128); its initramfs is
bench/build-guest-initramfs.sh's (busybox, Debian's fio with its libraries, metaloop).  fio
writes its JSON into the share after the last job; the metadata loop prints one line.  Under
TCG the guest's own CPU time dominates these figures: they show what a guest sees here, not
what the daemons can do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .daemons import BENCH, REPO, Daemon

FIO_FILE = "fio.dat"
FIO_SIZE = 64 << 20
OUT_DIR = ".bench-out"
META_FILES = 2000


@dataclass(frozen=True)
class GuestJob:
    key: str
    title: str
    unit: str
    limit: str
    rw: str = ""
    bs: str = ""
    iodepth: int = 1


JOBS = [
    GuestJob("fio-seqread", "fio read 1 MiB sequential, direct, depth 4", "MB/s", "memcpy",
             "read", "1m", 4),
    GuestJob("fio-seqwrite", "fio write 1 MiB sequential, direct, depth 4", "MB/s", "memcpy",
             "write", "1m", 4),
    GuestJob("fio-randread-d1", "fio randread 4 KiB, direct, depth 1", "IOPS", "syscall",
             "randread", "4k", 1),
    GuestJob("fio-randread-d16", "fio randread 4 KiB, direct, depth 16", "IOPS", "syscall",
             "randread", "4k", 16),
    GuestJob("fio-randwrite-d1", "fio randwrite 4 KiB, direct, depth 1", "IOPS", "syscall",
             "randwrite", "4k", 1),
    GuestJob("fio-randwrite-d16", "fio randwrite 4 KiB, direct, depth 16", "IOPS", "syscall",
             "randwrite", "4k", 16),
    GuestJob("meta-create", f"create {META_FILES:,} files", "ops/s", "syscall"),
    GuestJob("meta-stat", f"stat {META_FILES:,} files (cold caches)", "ops/s", "syscall"),
    GuestJob("meta-unlink", f"unlink {META_FILES:,} files (cold caches)", "ops/s", "syscall"),
]
FIO_JOBS = [j for j in JOBS if j.rw]


def _load_runner():
    """guest/run.py, loaded by path: guest/ is not a package."""
    spec = importlib.util.spec_from_file_location("guest_run", REPO / "guest" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def unavailable() -> str:
    """Why no guest can run here ('' if one can)."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed"
    if not shutil.which("cc"):
        return "no C compiler (cc) for the guest's metadata loop"
    return ""


class GuestBench:
    BOOT_ALLOWANCE = 150.0    # seconds from QEMU's start to the first job, under load

    def __init__(self, share: str, fio_runtime: float, fio_ramp: float,
                 log=lambda _m: None, log_dir: Path | None = None) -> None:
        self.runner = _load_runner()
        self.log_dir = log_dir
        self.boots = 0
        self.share = Path(share)
        self.runtime = fio_runtime
        self.ramp = fio_ramp
        base = self.runner.ensure_kernel("61", log)
        initrd = REPO / "guest" / "work" / "bench-debs" / "initramfs-k61"
        log("building the bench guest's initramfs (fio, metaloop) if needed")
        proc = subprocess.run(["bash", str(BENCH / "build-guest-initramfs.sh"),
                               str(base.vmlinuz.parent), str(initrd)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"build-guest-initramfs.sh failed:\n{proc.stderr.strip()}")
        self.kernel = self.runner.Kernel(base.name, base.vmlinuz, initrd, base.package)
        self.share.mkdir(parents=True, exist_ok=True)
        block = bytes(range(256)) * 4096
        with open(self.share / FIO_FILE, "wb") as f:
            for _ in range(FIO_SIZE // len(block)):
                f.write(block)

    def script(self) -> str:
        """The guest's workload: each fio job bounded in time, its JSON copied to the share
        at once; a virtio ring the guest driver gave up on ends the boot (nothing after it
        could complete)."""
        limit = int(self.runtime + self.ramp + 40)
        lines = [
            "export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu",
            f"mkdir -p /mnt/{OUT_DIR}",
            "check() {",
            "  bad=$(dmesg | grep -m1 -E 'virtio|virtiofs|fuse' | grep -E 'not a head|failed|"
            "error|broken' || true)",
            "  if [ -n \"$bad\" ]; then echo \"@@BROKEN $1 $bad\"; sync; poweroff -f; fi",
            "}",
        ]
        for j in FIO_JOBS:
            lines.append(f"echo '@@JOB {j.key}'")
            lines.append(
                f"timeout -s KILL {limit} fio --name={j.key} --filename=/mnt/{FIO_FILE}"
                f" --size={FIO_SIZE} --direct=1 --ioengine=libaio --rw={j.rw} --bs={j.bs}"
                f" --iodepth={j.iodepth} --runtime={self.runtime:g} --ramp_time={self.ramp:g}"
                f" --time_based --thread --eta=never --output-format=json"
                f" --output=/tmp/{j.key}.json || echo \"@@FAILED {j.key} $?\"")
            lines.append(f"check {j.key}")
            lines.append(f"cp /tmp/{j.key}.json /mnt/{OUT_DIR}/ 2>/dev/null || true")
        lines.append("echo '@@JOB meta'")
        lines.append(f"timeout -s KILL {limit} metaloop /mnt/.bench-meta {META_FILES}"
                     " || echo \"@@FAILED meta $?\"")
        lines.append("check meta")
        return "\n".join(lines) + "\n"

    def run(self, daemon: Daemon) -> dict[str, float | str]:
        """One boot against `daemon`: {job key: figure, or why there is none}."""
        out = self.share / OUT_DIR
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(self.share / ".bench-meta", ignore_errors=True)
        self.boots += 1
        # A guest whose request was never answered cannot finish (exiting fio waits for its
        # AIO): a watchdog ends QEMU when no job has started for a job's time plus slack.
        job_allowance = self.runtime + self.ramp + 50
        state = {"last": time.monotonic(), "allowance": self.BOOT_ALLOWANCE, "job": "boot",
                 "stalled": ""}

        def on_line(line) -> None:
            if line.text.startswith("@@JOB "):
                state.update(last=time.monotonic(), allowance=job_allowance,
                             job=line.text.split()[1])

        stop = threading.Event()

        def watchdog() -> None:
            while not stop.wait(1.0):
                if time.monotonic() - state["last"] > state["allowance"]:
                    state["stalled"] = (f"guest stalled in {state['job']}: nothing for "
                                        f"{state['allowance']:.0f} s, QEMU killed")
                    for pid in _children("qemu-system"):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    return

        dog = threading.Thread(target=watchdog, daemon=True)
        dog.start()
        try:
            r = self.runner.run_guest(daemon.command(1), self.share, self.script(),
                                      kernel=self.kernel, on_line=on_line,
                                      timeout=self.BOOT_ALLOWANCE + 8 * job_allowance)
        finally:
            stop.set()
            dog.join()
        text = r.script_output
        broken = re.search(r"@@BROKEN (\S+) (.*)", text)
        why = ("guest virtio ring broke: " + broken.group(2).strip() if broken
               else state["stalled"] or ("timed out" if r.timed_out else "guest run failed"))
        failed = dict(re.findall(r"@@FAILED (\S+) (\d+)", text))
        values: dict[str, float | str] = {}
        for j in FIO_JOBS:
            path = out / f"{j.key}.json"
            if j.key in failed:
                values[j.key] = f"fio exited {failed[j.key]}"
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                values[j.key] = why
                continue
            res = data["jobs"][0]["write" if "write" in j.rw else "read"]
            values[j.key] = res["bw_bytes"] / 1e6 if j.unit == "MB/s" else res["iops"]
        m = re.search(r"@@VAL meta (\S+) (\S+) (\S+)", text)
        for i, key in enumerate(("meta-create", "meta-stat", "meta-unlink")):
            values[key] = float(m.group(i + 1)) if m else (
                f"metaloop exited {failed['meta']}" if "meta" in failed else why)
        if self.log_dir is not None and any(isinstance(v, str) for v in values.values()):
            path = self.log_dir / f"guest-{daemon.key}-boot{self.boots}.log"
            path.write_text(f"{why}\n--- console ---\n{r.console_text}\n--- QEMU stderr ---\n"
                            f"{r.qemu_stderr}\n--- daemon output ---\n{r.daemon_output}\n")
            values["log"] = str(path)
        return values


def _children(comm_prefix: str) -> list[int]:
    """This process's children whose command name starts with `comm_prefix`."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index("(") + 1 : data.rindex(")")]
        if int(data[data.rindex(")") + 2 :].split()[1]) == me and comm.startswith(comm_prefix):
            found.append(int(entry))
    return found

