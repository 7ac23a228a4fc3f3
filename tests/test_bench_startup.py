"""`python -m bench.startup` end to end on its smallest setting: it starts and stops the daemon,
connects, gets the first vhost-user reply and prints a row of figures.  Speed is never
asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon's default sandbox needs root")
def test_one_run_prints_a_row_of_figures() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.startup", "--runs", "2", "--daemons",
                           "py"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cell = r"\d+\.\d \(\d+\.\d-\d+\.\d\)"
    row = re.compile(rf"^\| pyvirtiofsd \| {cell} \| {cell} \| {cell} \| 0 \|$", re.M)
    assert row.search(proc.stdout), proc.stdout
    assert "2 runs" in proc.stdout.splitlines()[0]


def test_bad_arguments_exit_2() -> None:
    for args in (["--daemons", "py,zz"], ["--runs", "0"], ["--also", "nolabel"]):
        proc = subprocess.run([sys.executable, "-m", "bench.startup", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and "error" in proc.stderr, proc.stderr
