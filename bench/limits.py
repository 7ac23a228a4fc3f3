"""The machine's own limits (bench/limits.c), built with the system C compiler on first use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from .daemons import BENCH


def measure(build_dir: Path, seconds: float) -> dict[str, float]:
    """{memcpy_mb_s, syscall_ns, wakeup_rtt_us, preadv_mb_s, pwritev_mb_s}; raises
    RuntimeError if it cannot run."""
    src = BENCH / "limits.c"
    exe = build_dir / "limits"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        cc = shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise RuntimeError("no C compiler (cc) to build bench/limits.c")
        build_dir.mkdir(parents=True, exist_ok=True)
        tmp = build_dir / f"limits.{os.getpid()}"
        subprocess.run([cc, "-O2", "-o", str(tmp), str(src)], check=True,
                       capture_output=True, text=True)
        tmp.replace(exe)
    out = subprocess.run([str(exe), f"{seconds:g}"], check=True, capture_output=True,
                         text=True, timeout=60 + 4 * seconds)
    return json.loads(out.stdout)
