"""What keeps the daemon's memory down (docs/benchmarks.md, "Memory: where it goes"): modules no
process needs stay unimported, pyseccomp loads without ctypes.util (and falls back to it), the
supervisor and workers freeze what they built, and the benchmark's LOOKUP phase fits the
daemon's fd budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.frontend import Frontend, FuseClient
from tests.proctree import children

REPO = Path(__file__).resolve().parent.parent

# Imported by nothing the daemon runs: each would be carried by every one of its processes.
UNNEEDED = ("hashlib", "_hashlib", "logging.handlers", "pickle", "ctypes.util", "subprocess",
            "tempfile", "shutil", "random", "bz2", "lzma")


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_daemon_imports_nothing_its_processes_do_not_need() -> None:
    out = _python("import json, sys\n"
                  "import pyvirtiofsd.supervisor.cli, pyvirtiofsd.supervisor.daemon\n"
                  "print(json.dumps(sorted(sys.modules)))")
    loaded = set(json.loads(out))
    assert "pyvirtiofsd.worker.main" in loaded and "pyseccomp" in loaded
    assert loaded.isdisjoint(UNNEEDED), sorted(loaded & set(UNNEEDED))


def test_pyseccomp_loaded_by_abi_name_leaves_the_real_ctypes_util() -> None:
    out = _python("from pyvirtiofsd.common.seccomp import pyseccomp\n"
                  "import sys; print('ctypes.util' in sys.modules)\n"
                  "import ctypes.util\n"
                  "print(hasattr(ctypes.util, '_findSoname_ldconfig'), "
                  "pyseccomp._libseccomp._name)")
    before, after = out.splitlines()
    assert before == "False"
    assert after == "True libseccomp.so.2"


def test_pyseccomp_falls_back_to_the_library_search() -> None:
    """Where an ABI name does not load, pyseccomp is imported the ordinary way."""
    out = _python("import sys\n"
                  "from pyvirtiofsd.common import seccomp\n"
                  "del sys.modules['pyseccomp']\n"
                  "seccomp._SONAMES['seccomp'] = 'libseccomp.so.0-no-such-version'\n"
                  "m = seccomp._import_pyseccomp()\n"
                  "import ctypes.util\n"
                  "print(m is sys.modules['pyseccomp'], "
                  "hasattr(ctypes.util, '_findSoname_ldconfig'), "
                  "m._libseccomp._name == ctypes.util.find_library('seccomp'))")
    assert out.split() == ["True", "True", "True"]


def test_settle_memory_freezes_what_was_built() -> None:
    out = _python("import gc\n"
                  "from pyvirtiofsd.common import native\n"
                  "before = gc.get_freeze_count()\n"
                  "junk = [[i] for i in range(1000)]\n"
                  "native.settle_memory()\n"
                  "print(gc.get_freeze_count() - before >= 1000)")
    assert out.strip() == "True"


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon serves files of any owner: root")
def test_no_process_of_the_daemon_maps_openssl(daemon_factory) -> None:
    d = daemon_factory("--request-queues=1")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        FuseClient(fe).init()
        pids = [d.proc.pid, *children(d.proc.pid)]
        assert len(pids) == 5, pids       # supervisor, spawner, standby, two workers
        for pid in pids:
            maps = _maps(pid)
            assert "libpython" in maps or "python3" in maps, pid
            assert "libcrypto" not in maps and "_hashlib" not in maps, pid
    finally:
        fe.close()


def test_bench_lookups_fit_the_daemons_fd_budget(monkeypatch) -> None:
    import resource

    from bench import memory
    from pyvirtiofsd.supervisor.daemon import guest_fd_budget

    for hard, expected in ((20_000, 11_000), (1_000_000, memory.BIG_ENTRIES)):
        monkeypatch.setattr(resource, "getrlimit", lambda _r, h=hard: (1024, h))
        n = memory.lookup_count()
        assert n == expected
        # Inodes of the lookups plus the serving phase's few handles stay under the budget.
        assert n + 100 <= guest_fd_budget(hard)
