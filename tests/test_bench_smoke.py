"""The benchmark harness end to end on its smallest setting: one workload, pyvirtiofsd only.

Checks that a run produces its JSON and its table; speed is never asserted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon serves files of any owner: root")
def test_quick_run_writes_json_and_table(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--daemons", "py", "--workloads",
         "getattr-d1", "--queues", "1", "--no-chart", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [json_path] = out.glob("bench-*.json")
    data = json.loads(json_path.read_text())
    row = data["rows"]["fe/getattr-d1/q1"]
    assert row["failures"] == {}, row["failures"]
    [value] = row["values"]["py"]
    assert value > 0
    assert data["summary"]["fe/getattr-d1/q1"]["median"]["py"] == value
    limits = data["limits"][0]
    assert limits["memcpy_mb_s"] > 0 and limits["syscall_ns"] > 0
    # The table names the workload and shows the figure with its share of the limit.
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| GETATTR, depth 1 "))
    assert "pyvirtiofsd" in proc.stdout and "%)" in line
    assert (out / json_path.with_suffix(".md").name).read_text().strip() == \
        proc.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon serves files of any owner: root")
def test_memory_sample_covers_every_process_of_the_daemon(daemon_factory) -> None:
    """bench.memory sums the PSS of the supervisor, the spawner, its standby and every queue
    worker."""
    from bench import memory
    from tests.frontend import Frontend, FuseClient

    d = daemon_factory("--request-queues=2")
    fe = Frontend.connect(d.socket, process=d.proc, queues=3)
    try:
        FuseClient(fe).init()
        s = memory.sample(d.proc.pid)
    finally:
        fe.close()
    procs = {k: v for k, v in s.items() if k != "total"}
    comms = sorted(k.split("[")[0] for k in procs)
    # The supervisor is the console script's process; hiprio and two request queues.
    assert comms.count("pyvfs-spawner") == 1, comms
    assert comms.count("pyvfs-standby") == 1, comms
    assert sorted(c for c in comms if c.startswith("pyvfs-q")) == \
        ["pyvfs-q0", "pyvfs-q1", "pyvfs-q2"], comms
    assert len(procs) == 6, comms
    assert all(v > 0 for v in procs.values()), s
    assert s["total"] == sum(procs.values())
    assert f"[{d.proc.pid}]" in " ".join(procs)


def test_bench_lists_the_memory_workload() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    assert any(ln.split()[:2] == ["memory", "memory"] for ln in proc.stdout.splitlines())


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon serves files of any owner: root")
def test_smaps_breaks_down_every_process_of_the_daemon(daemon_factory) -> None:
    """`python -m bench.smaps --pid` lists each process with its PSS split by mapping, and the
    last line sums them."""
    from tests.frontend import Frontend, FuseClient

    d = daemon_factory()
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        FuseClient(fe).init()
        proc = subprocess.run([sys.executable, "-m", "bench.smaps", "--pid", str(d.proc.pid),
                               "--top", "3"], cwd=REPO, capture_output=True, text=True,
                              timeout=60, check=False)
    finally:
        fe.close()
    assert proc.returncode == 0, proc.stderr
    heads = re.findall(r"^(\S+)\[(\d+)\]: PSS ([\d,]+) KiB", proc.stdout, re.M)
    comms = sorted(c for c, _, _ in heads)
    assert comms == sorted(["pyvirtiofsd", "pyvfs-spawner", "pyvfs-standby", "pyvfs-q0",
                            "pyvfs-q1"]), proc.stdout
    assert int(heads[0][1]) == d.proc.pid
    total = re.search(r"^all processes: PSS ([\d,]+) KiB", proc.stdout, re.M)
    assert total and int(total[1].replace(",", "")) == \
        sum(int(k.replace(",", "")) for _, _, k in heads)
    # Each process shows its heaviest mappings, the interpreter's anonymous memory among them.
    assert proc.stdout.count("private dirty  [anon]") == 5, proc.stdout


def test_smaps_refuses_a_bad_argument() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.smaps", "--top", "-1"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "--top" in proc.stderr
