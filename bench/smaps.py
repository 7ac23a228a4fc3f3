"""Where a daemon's memory goes: every process's PSS, split by mapping, from /proc/PID/smaps.

    .venv/bin/python -m bench.smaps                 # a fresh pyvirtiofsd, idle after INIT
    .venv/bin/python -m bench.smaps --pid PID       # a running daemon and every process below it
    .venv/bin/python -m bench.smaps --top 12        # more mappings per process (default 6)
    .venv/bin/python -m bench.smaps --sandbox namespace   # the default sandbox's six processes

Per process: PSS, its private dirty part (pages no other process maps: what this process
wrote since it was forked, or allocated), and the anonymous and file-backed parts; then the
mappings that weigh most, grouped as the heap, anonymous memory (the interpreter's object
arenas), shared memory (the daemon's tables, guest memory) and each file by name.  The
last line sums the processes: the figure bench/memory.py reports.  docs/benchmarks.md
("Memory: where it goes") reads these figures.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .memory import tree

_RANGE = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
_FIELD = re.compile(r"^(\w+):\s+(\d+) kB")


@dataclass
class Usage:
    """One process: totals (KiB) from smaps_rollup, PSS and private dirty per mapping group."""

    rollup: dict[str, int]
    pss: Counter = field(default_factory=Counter)
    dirty: Counter = field(default_factory=Counter)


def group(name: str) -> str:
    """The name a mapping is reported under."""
    if not name:
        return "[anon]"
    if name.startswith("/memfd:") or name.startswith("/dev/shm/") or \
            name.startswith("/dev/zero") or name.startswith("/SYSV"):
        return "[shared memory]"
    if name.startswith("["):
        return name
    return os.path.basename(name.split(" (deleted)")[0])


def usage(pid: int) -> Usage | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            rollup = {m[1]: int(m[2]) for line in f if (m := _FIELD.match(line))}
        u = Usage(rollup)
        current = "[anon]"
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if _RANGE.match(line):
                    parts = line.split(None, 5)
                    current = group(parts[5].strip() if len(parts) > 5 else "")
                elif line.startswith("Pss:"):
                    u.pss[current] += int(line.split()[1])
                elif line.startswith("Private_Dirty:"):
                    u.dirty[current] += int(line.split()[1])
    except (OSError, ValueError):
        return None                 # it exited meanwhile
    return u


def report(pid: int, top: int) -> str:
    lines = []
    total: Counter = Counter()
    for p, comm in sorted(tree(pid).items()):
        u = usage(p)
        if u is None:
            continue
        r = u.rollup
        for key in ("Pss", "Private_Dirty", "Pss_Anon", "Pss_File", "Pss_Shmem"):
            total[key] += r.get(key, 0)
        lines.append(f"{comm}[{p}]: PSS {r['Pss']:,} KiB, private dirty "
                     f"{r['Private_Dirty']:,}, anonymous {r.get('Pss_Anon', 0):,}, file "
                     f"{r.get('Pss_File', 0):,}, shared memory {r.get('Pss_Shmem', 0):,}")
        for name, kib in u.pss.most_common(top):
            lines.append(f"    {kib:8,} KiB PSS {u.dirty[name]:8,} private dirty  {name}")
    lines.append(f"all processes: PSS {total['Pss']:,} KiB, private dirty "
                 f"{total['Private_Dirty']:,}, anonymous {total['Pss_Anon']:,}, file "
                 f"{total['Pss_File']:,}, shared memory {total['Pss_Shmem']:,}")
    return "\n".join(lines)


def fresh_daemon(exe: str, top: int, sandbox: str = "none") -> str:
    """A pyvirtiofsd on an empty share, connected and INIT answered, reported, stopped."""
    from tests.frontend import Frontend, FuseClient

    with tempfile.TemporaryDirectory(prefix="pyvfs-smaps-") as tmp:
        share = Path(tmp) / "share"
        share.mkdir()
        sock = str(Path(tmp) / "vfs.sock")
        proc = subprocess.Popen([exe, f"--sandbox={sandbox}", f"--socket-path={sock}",
                                 f"--shared-dir={share}", "--log-level=error"],
                                stdin=subprocess.DEVNULL, start_new_session=True)
        fe = None
        try:
            fe = Frontend.connect(sock, queues=2, process=proc)
            FuseClient(fe, queue=1).init()
            time.sleep(0.3)           # the workers finish what INIT started
            return report(proc.pid, top)
        finally:
            if fe is not None:
                fe.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    from .daemons import default_pyvirtiofsd

    ap = argparse.ArgumentParser(prog="python -m bench.smaps", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pid", type=int, help="a running daemon's pid (default: start one)")
    ap.add_argument("--top", type=int, default=6, help="mappings listed per process")
    ap.add_argument("--pyvirtiofsd", default=None, help="the executable to start")
    ap.add_argument("--sandbox", default="none", choices=("none", "chroot", "namespace"),
                    help="the started daemon's sandbox (default none, as the benchmark runs it)")
    args = ap.parse_args(argv)
    if args.top < 0:
        ap.error("--top must be 0 or more")
    if args.pid is not None:
        if not os.path.exists(f"/proc/{args.pid}"):
            ap.error(f"no process {args.pid}")
        print(report(args.pid, args.top))
    else:
        print(fresh_daemon(args.pyvirtiofsd or default_pyvirtiofsd(), args.top, args.sandbox))
    return 0


if __name__ == "__main__":
    sys.exit(main())
