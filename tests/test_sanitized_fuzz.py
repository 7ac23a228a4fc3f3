"""The chain and FUSE fuzzers on the AddressSanitizer/UBSan build of the native engine.

The engine reads guest-controlled memory in C, so CI builds it once with
`-fsanitize=address,undefined` (tests/sanitizer.py) and runs the fuzz harnesses that drive it --
in-process over fake guest memory, and through daemons on both data planes, whose workers load
the same build -- with their CI budget (tests/fuzzing.py).  Any sanitizer report from any process
fails the run.  A missing prerequisite (gcc's libasan, a compiler) fails too; nothing is
skipped.  The long run is scripts/fuzz.sh.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import sanitizer

FUZZERS = ["tests/test_fuzz_chain.py", "tests/test_fuzz_fuse.py"]
BUDGET_S = 900.0

PROBE = r"""
#include <stdlib.h>
#include <string.h>
/* Deliberate bugs: what the sanitizer build must turn into a failed run. */
int heap_overflow(int n) {
    char *p = malloc(16);
    if (!p) return -1;
    memset(p, 0, (size_t)n);
    int r = p[n - 1];
    free(p);
    return r;
}
int shift(int a, int b) { return a << b; }
"""


@pytest.fixture(scope="module")
def built() -> Path:
    return sanitizer.build()


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    """A cffi module with the bugs above, built with the engine's sanitizer flags."""
    from cffi import FFI

    out = tmp_path_factory.mktemp("probe")
    ffi = FFI()
    ffi.cdef("int heap_overflow(int n); int shift(int a, int b);")
    ffi.set_source("_sanitizer_probe", PROBE,
                   extra_compile_args=["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                                       "-fno-sanitize-recover=undefined", "-O1"],
                   extra_link_args=["-fsanitize=address,undefined"])
    ffi.compile(tmpdir=str(out), verbose=False)
    return out


def _call(probe: Path, expr: str) -> sanitizer.Run:
    code = f"import sys; sys.path.insert(0, {str(probe)!r}); import _sanitizer_probe as m; " \
           f"print(m.lib.{expr})"
    return sanitizer.run([sys.executable, "-c", code], timeout=120)


@pytest.mark.parametrize(("expr", "clean", "finding"), [
    ("heap_overflow(16)", True, None),
    ("heap_overflow(17)", False, "heap-buffer-overflow"),
    ("shift(1, 3)", True, None),
    ("shift(1, 40)", False, "shift exponent 40 is too large"),
])
def test_a_sanitizer_report_fails_the_run(probe: Path, expr: str, clean: bool,
                                          finding: str | None) -> None:
    r = _call(probe, expr)
    assert r.clean is clean, r.describe()
    if finding:
        assert r.returncode != 0
        assert any(finding in text for text in [r.output, *r.reports.values()]), r.describe()


def test_the_sanitized_engine_is_the_one_loaded(built: Path) -> None:
    code = ("import sys; from pyvirtiofsd.worker import engine; engine.load(); "
            "print(sorted(m.__file__ for n, m in sys.modules.items() "
            "if n in ('pyvirtiofsd.worker._engine', 'pyvirtiofsd.worker._engine_asan')))")
    r = sanitizer.run([sys.executable, "-c", code], timeout=120)
    assert r.clean, r.describe()
    assert r.output.strip().splitlines()[-1] == repr([str(built)])


def test_fuzzers_on_the_sanitized_engine(built: Path) -> None:
    r = sanitizer.run(sanitizer.pytest_argv([*FUZZERS, "-k", "engine or daemon"]),
                      timeout=BUDGET_S)
    assert r.clean, r.describe()
    summary = r.output.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" in summary, \
        r.output[-3000:]


def test_the_sanitizer_build_script_builds_in_place() -> None:
    """`python worker/engine_build.py --sanitize` is the documented way to build the module."""
    p = subprocess.run([str(sanitizer.PYTHON), "worker/engine_build.py", "--sanitize"],
                       cwd=sanitizer.ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == 0, p.stderr[-3000:]
