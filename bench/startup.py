"""Start-up time of pyvirtiofsd, the Rust virtiofsd and QEMU's C virtiofsd, side by side.

    .venv/bin/python -m bench.startup [--runs 20] [--daemons py,rs,c] [--sandbox MODE]

A runtime (libvirt, Kata, kubevirt) starts one daemon per VM and waits for its socket before it
boots the guest, so what counts is the time from exec to a socket that accepts a connection.
Each run starts every daemon once (the order rotating between runs), measures

* listening: from just before the exec to the first successful connect() on the socket (the
  socket is probed every PROBE_INTERVAL s, as a runtime polls for it);
* first reply: from the exec to the answer to the front-end's first message
  (VHOST_USER_GET_FEATURES), sent at once on that connection: the daemon is then serving;
* exit: from closing that connection -- every daemon exits when its front-end leaves -- to
  the daemon's exit,

and prints the median, minimum and maximum of each over all runs.  Every daemon runs with its
default sandbox unless --sandbox names one (namespace, chroot or none; QEMU's C daemon has no
`none` and then runs with chroot).  It prints figures: nothing passes or fails on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .daemons import C_VIRTIOFSD, default_pyvirtiofsd

PROBE_INTERVAL = 0.0005
# VHOST_USER_GET_FEATURES (1), version 1 flags, no payload; the reply carries a u64.
GET_FEATURES = struct.pack("=III", 1, 1, 0)
REPLY_SIZE = 12 + 8
TIMEOUT = 20.0
ANCHOR = "/opt/anchors/virtiofsd-rs"


@dataclass
class Subject:
    key: str
    label: str
    exe: str
    argv: list[str]
    start: list[float] = field(default_factory=list)
    reply: list[float] = field(default_factory=list)
    stop: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def subjects(keys: list[str], sandbox: str | None, pyvirtiofsd: str) -> list[Subject]:
    """argv templates with {sock} and {dir}."""
    box = [f"--sandbox={sandbox}"] if sandbox else []
    c_box = ["-o", f"sandbox={'chroot' if sandbox == 'none' else sandbox}"] if sandbox else []
    table = {
        "py": Subject("py", "pyvirtiofsd", pyvirtiofsd,
                      [pyvirtiofsd, "--socket-path={sock}", "--shared-dir={dir}", *box]),
        "rs": Subject("rs", "Rust virtiofsd", ANCHOR,
                      [ANCHOR, "--socket-path={sock}", "--shared-dir={dir}", *box]),
        "c": Subject("c", "C virtiofsd", C_VIRTIOFSD,
                     [C_VIRTIOFSD, "--socket-path={sock}", "-o", "source={dir}", *c_box]),
    }
    return [table[k] for k in keys]


def wait_listening(path: str, proc: subprocess.Popen) -> socket.socket:
    """Connect as soon as the daemon listens; OSError if it exits or takes too long."""
    deadline = time.perf_counter() + TIMEOUT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if proc.poll() is not None:
            raise OSError(f"exited with status {proc.returncode} before listening")
        if time.perf_counter() > deadline:
            raise OSError(f"not listening after {TIMEOUT:.0f} s")
        time.sleep(PROBE_INTERVAL)


def run_once(s: Subject, share: str, workdir: str) -> None:
    sock_path = os.path.join(workdir, f"{s.key}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    argv = [a.format(sock=sock_path, dir=share) for a in s.argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        conn = wait_listening(sock_path, proc)
        t1 = time.perf_counter()
        with conn:
            conn.settimeout(TIMEOUT)
            conn.sendall(GET_FEATURES)
            answer = b""
            while len(answer) < REPLY_SIZE:
                more = conn.recv(REPLY_SIZE - len(answer))
                if not more:
                    raise OSError("closed the connection instead of answering GET_FEATURES")
                answer += more
            t2 = time.perf_counter()
        proc.wait(TIMEOUT)
        t3 = time.perf_counter()
        s.start.append(t1 - t0)
        s.reply.append(t2 - t0)
        s.stop.append(t3 - t2)
    except (OSError, subprocess.TimeoutExpired) as e:
        s.failures.append(str(e))
    finally:
        # Whatever is left of its process group (a daemon that did not exit) is ours.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _cell(values: list[float]) -> str:
    ms = 1000.0
    return (f"{statistics.median(values) * ms:.1f}"
            f" ({min(values) * ms:.1f}-{max(values) * ms:.1f})")


def table(rows: list[Subject], runs: int, sandbox: str | None, load: str = "") -> str:
    out = [f"Start-up of each daemon, {runs} runs, sandbox {sandbox or 'default'}: median"
           f" (min-max), ms{load}", "",
           "| daemon | exec → listening | exec → first reply | disconnect → exit | failed |",
           "|---|---|---|---|---|"]
    for s in rows:
        if not s.start:
            out.append(f"| {s.label} | - | - | - | {len(s.failures)} |")
            continue
        out.append(f"| {s.label} | {_cell(s.start)} | {_cell(s.reply)} | {_cell(s.stop)}"
                   f" | {len(s.failures)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.startup",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="starts per daemon (default 20)")
    ap.add_argument("--daemons", default="py,rs,c", help="subset of py,rs,c (default all)")
    ap.add_argument("--sandbox", choices=("namespace", "chroot", "none"),
                    help="the sandbox every daemon runs with (default: each one's default)")
    ap.add_argument("--pyvirtiofsd", default=default_pyvirtiofsd(),
                    help="pyvirtiofsd executable (default: the venv's)")
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=EXE",
                    help="one more pyvirtiofsd executable, e.g. another version or install,"
                    " run side by side under LABEL (repeatable)")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.daemons.split(",") if k.strip()]
    if bad := [k for k in keys if k not in ("py", "rs", "c")]:
        print(f"python -m bench.startup: error: unknown daemon(s) {bad}: use py, rs, c",
              file=sys.stderr)
        return 2
    if args.runs < 1:
        print("python -m bench.startup: error: --runs must be at least 1", file=sys.stderr)
        return 2
    rows = subjects(keys, args.sandbox, args.pyvirtiofsd)
    for extra in args.also:
        label, sep, exe = extra.partition("=")
        if not sep or not label or not exe:
            print(f"python -m bench.startup: error: --also {extra!r}: give LABEL=EXE",
                  file=sys.stderr)
            return 2
        row = subjects(["py"], args.sandbox, exe)[0]
        row.key, row.label = f"py{len(rows)}", label
        rows.append(row)
    for s in rows:
        if not os.access(s.exe, os.X_OK):
            s.failures.append(f"not installed ({s.exe})")
    ready = [s for s in rows if not s.failures]
    load_before = os.getloadavg()[0]
    workdir = tempfile.mkdtemp(prefix="pyvfs-startup-")
    try:
        share = os.path.join(workdir, "share")
        os.mkdir(share)
        for i in range(args.runs):
            for k in range(len(ready)):
                run_once(ready[(i + k) % len(ready)], share, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # Start-up is mostly CPU work: other load on the machine shows in every figure.
    load = (f"; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after,"
            f" {os.cpu_count()} CPUs")
    sys.stdout.write(table(rows, args.runs, args.sandbox, load))
    for s in rows:
        for why in sorted(set(s.failures)):
            print(f"{s.label}: {why}", file=sys.stderr)
    return 0 if all(s.start for s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
