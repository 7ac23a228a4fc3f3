"""Running tests on the AddressSanitizer/UndefinedBehaviorSanitizer build of the native engine.

worker/engine_build.py describes a second cffi module, `pyvirtiofsd.worker._engine_asan`, built
from the same C sources with `-fsanitize=address,undefined`; PYVIRTIOFSD_ENGINE=asan makes
worker/engine.py load it.  CPython itself is not instrumented, so the ASan runtime must be the
first library of the process: LD_PRELOAD names gcc's libasan.  Every process inherits that
environment, the daemons and their workers included.  ASan writes every report to its own file
under a log directory, UBSan to stderr (a daemon's is copied out by tests/conftest.py), so that
a report from a worker that was respawned is not lost: a run passes only if pytest passes *and*
no process reported anything.

    .venv/bin/python -m tests.sanitizer [pytest arguments]     # build, then run pytest

(scripts/fuzz.sh runs the fuzzers this way with a long budget; tests/test_sanitized_fuzz.py
with the CI budget.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
MODULE = "pyvirtiofsd.worker._engine_asan"
# What a sanitizer writes when it finds something (the report's first and last lines).
REPORT = re.compile(  # also in tests/conftest.py
    r"ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)"
                    r"Sanitizer|ERROR: LeakSanitizer")


class SanitizerSetupError(AssertionError):
    """Something the sanitizer run needs is missing: the run fails, it is never skipped."""


def libasan() -> str:
    """gcc's ASan runtime, as LD_PRELOAD needs it (an absolute path that exists)."""
    try:
        out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise SanitizerSetupError(f"gcc cannot name its libasan: {e}") from e
    if not os.path.isabs(out) or not os.path.exists(out):
        raise SanitizerSetupError(f"gcc's libasan.so is not installed (gcc said {out!r}); "
                                  "install gcc's libasan (Debian: libasan8)")
    return os.path.realpath(out)


def package_dir() -> Path:
    """Where `pyvirtiofsd.worker` is imported from (the checkout, in an editable install)."""
    code = "import pyvirtiofsd.worker as w; print(w.__path__[0])"
    out = subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return Path(out.strip())


def build() -> Path:
    """Compile the sanitized engine module into the worker package; its path.

    cffi compiles in a temporary directory with the source paths the build script gives it
    relative to the current directory, so the script's description is made from inside that
    temporary directory."""
    sys.path.insert(0, str(ROOT / "worker"))
    try:
        import engine_build
    finally:
        sys.path.pop(0)
    dest_dir = package_dir()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="engine-asan-") as tmp:
        os.chdir(tmp)
        try:
            built = engine_build.make_ffi(sanitize=True).compile(tmpdir=tmp, verbose=False)
        finally:
            os.chdir(cwd)
        dest = dest_dir / os.path.basename(built)
        shutil.move(built, dest)
    return dest


def environment(log_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a sanitized run: every report lands in log_dir/<tool>.<pid>."""
    env = dict(os.environ if base is None else base)
    env["PYVIRTIOFSD_ENGINE"] = "asan"
    env["LD_PRELOAD"] = libasan()
    # CPython's own allocations are not instrumented and it never frees some at exit: leak
    # checking would only report the interpreter.  halt_on_error: the first report ends the
    # process, and the run fails.
    env["ASAN_OPTIONS"] = (f"detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:"
                           f"log_path={log_dir}/asan")
    # UBSan, linked with ASan, reports on stderr whatever log_path says; a daemon's stderr
    # line with a report is copied to the test process's own stderr (tests/conftest.py).
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1:exitcode=87"
    return env


@dataclass
class Run:
    returncode: int
    output: str
    reports: dict[str, str]          # file name -> text, one per process that reported

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not self.reports and not REPORT.search(self.output)

    def describe(self) -> str:
        parts = [f"exit status {self.returncode}"]
        for name, text in sorted(self.reports.items()):
            parts.append(f"--- {name} ---\n{text[-6000:]}")
        parts.append("--- output (tail) ---\n" + self.output[-6000:])
        return "\n".join(parts)


def run(argv: list[str], timeout: float, extra_env: dict[str, str] | None = None) -> Run:
    """Run argv under the sanitized environment; collect every report."""
    with tempfile.TemporaryDirectory(prefix="sanitizer-logs-") as logs:
        env = environment(Path(logs))
        env.update(extra_env or {})
        try:
            p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=timeout, check=False)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
                errors="replace")
            rc = -1
            out += f"\n(timed out after {timeout:.0f} s)"
        reports = {f.name: f.read_text(errors="replace") for f in Path(logs).iterdir()}
    return Run(rc, out, reports)


def pytest_argv(args: list[str]) -> list[str]:
    # --capture=sys: a report written to fd 2 by C code is never held back in a capture file.
    return [str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys", *args]


def main(args: list[str]) -> int:
    print(f"sanitizer: building {MODULE}", flush=True)
    print(f"sanitizer: built {build()}", flush=True)
    r = run(pytest_argv(args or ["tests/test_fuzz_chain.py", "tests/test_fuzz_fuse.py"]),
            timeout=float(os.environ.get("SANITIZER_TIMEOUT", 24 * 3600)))
    print(r.output)
    if r.clean:
        print("sanitizer: clean")
        return 0
    print("sanitizer: FAILED\n" + r.describe(), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
