"""DAX: what a mapping costs, and a file read through the window versus READ requests.

    .venv/bin/python -m bench.dax [--mib 64]

Runs pyvirtiofsd with --dax on each data plane against the test front-end (tests/frontend.py),
whose back-end channel thread maps the file with MAP_FIXED into its cache window as
cloud-hypervisor does.  Prints per plane: the round trip of one 2 MiB SETUPMAPPING (guest ->
worker -> supervisor -> front-end and back) next to a GETATTR, and the time to get a file of
--mib MiB into the "guest" by mapping 2 MiB ranges and reading the window, versus 1 MiB READs;
and a 4 KiB READ into a window page (FS_IO) versus one into guest memory.
The front-end here is Python, so the absolute figures are its own; the ratios are the point.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.vhost_user import ProtocolFeature
from tests.frontend import (
    DEFAULT_INIT_FLAGS,
    DEFAULT_PROTOCOL_FEATURES,
    CacheWindow,
    Frontend,
    FuseClient,
    attach_window,
)

DAEMON = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "pyvirtiofsd"
RANGE = 2 << 20          # the Linux driver's DAX range (FUSE_DAX_SZ)
ROUNDS = 300


def run(plane: str, mib: int, tmp: Path) -> str:
    sock, share = tmp / f"{plane}.sock", tmp / "share"
    share.mkdir(exist_ok=True)
    window_size = max(1 << 30, mib << 20)
    proc = subprocess.Popen([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                             "--sandbox=none", "--dax", f"--dax-window={window_size}",
                             f"--data-plane={plane}", "--log-level=error"])
    window = CacheWindow(window_size)
    fe = channel = None
    try:
        pf = (DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.BACKEND_REQ
              | ProtocolFeature.BACKEND_SEND_FD)
        fe = Frontend.connect(str(sock), process=proc, protocol_features=pf)
        channel = attach_window(fe, window)
        c = FuseClient(fe)
        c.init(flags=DEFAULT_INIT_FLAGS | fa.InitFlag.MAP_ALIGNMENT)
        data = os.urandom(mib << 20)
        (share / "big").write_bytes(data)
        node = c.lookup(fa.ROOT_ID, "big").nodeid
        fh = c.open(node, os.O_RDONLY).fh
        t = time.perf_counter()
        for i in range(ROUNDS):
            c.setupmapping(node, fh, 0, RANGE, (i % 64) * RANGE)
        t_map = (time.perf_counter() - t) / ROUNDS
        t = time.perf_counter()
        for _ in range(ROUNDS):
            c.getattr(node)
        t_get = (time.perf_counter() - t) / ROUNDS
        c.removemapping([(i * RANGE, RANGE) for i in range(64)])
        t = time.perf_counter()
        for off in range(0, mib << 20, RANGE):
            c.setupmapping(node, fh, off, RANGE, off)
        got = window.read(0, mib << 20)
        t_dax = time.perf_counter() - t
        t = time.perf_counter()
        out = b"".join(c.read(node, fh, off, 1 << 20) for off in range(0, mib << 20, 1 << 20))
        t_read = time.perf_counter() - t
        if got != data or out != data:
            raise SystemExit(f"{plane}: the data read back differs")
        # A 4 KiB READ whose buffer is a window page (FS_IO: worker -> supervisor -> front-end
        # pread -> back) next to one into guest memory.
        (share / "dst").write_bytes(bytes(RANGE))
        dnode = c.lookup(fa.ROOT_ID, "dst").nodeid
        dfh = c.open(dnode, os.O_RDWR).fh
        c.setupmapping(dnode, dfh, 0, RANGE, mib << 20,
                       fa.SETUPMAPPING_FLAG_READ | fa.SETUPMAPPING_FLAG_WRITE)
        gpa = window.gpa + (mib << 20)
        t = time.perf_counter()
        for _ in range(ROUNDS):
            c.read_foreign(node, fh, 0, [(gpa, 4096)])
        t_io = (time.perf_counter() - t) / ROUNDS
        t = time.perf_counter()
        for _ in range(ROUNDS):
            c.read(node, fh, 0, 4096)
        t_ram = (time.perf_counter() - t) / ROUNDS
        if window.read(mib << 20, 4096) != data[:4096]:
            raise SystemExit(f"{plane}: FS_IO read back differs")
        return (f"{plane:6}: SETUPMAPPING {RANGE >> 20} MiB {t_map * 1e6:.0f} µs, GETATTR"
                f" {t_get * 1e6:.0f} µs; {mib} MiB: mapped and read through the window"
                f" {t_dax * 1e3:.1f} ms, READ 1 MiB x {mib} {t_read * 1e3:.1f} ms;"
                f" READ 4 KiB into the window (FS_IO) {t_io * 1e6:.0f} µs, into guest"
                f" memory {t_ram * 1e6:.0f} µs")
    finally:
        if fe is not None:
            fe.close()
        if channel is not None:
            channel.close()
        window.close()
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=64, help="file size in MiB (a multiple of 2)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyvfs-dax-") as tmp:
        for plane in ("native", "python"):
            print(run(plane, args.mib, Path(tmp)))


if __name__ == "__main__":
    main()
