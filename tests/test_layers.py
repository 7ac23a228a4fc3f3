"""The suite cannot pass with a layer missing (scripts/test.sh runs pytest with --no-skips)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *args], cwd=ROOT, env={**os.environ, **env}, text=True,
                          capture_output=True, timeout=300)


def test_a_missing_anchor_fails_the_run(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-virtiofsd")
    target = "tests/test_frontend_anchor.py::test_refused_request_raises_backend_error"
    strict = _run("--no-skips", target, env={"PYVIRTIOFSD_ANCHOR_RS": missing})
    assert strict.returncode == 1, strict.stdout
    assert "skipped tests fail this run" in strict.stdout
    assert missing in strict.stdout
    # The same selection without the flag is what a developer gets: skipped, not failed.
    lax = _run(target, env={"PYVIRTIOFSD_ANCHOR_RS": missing})
    assert lax.returncode == 0, lax.stdout
    assert "1 skipped" in lax.stdout
