"""The distribution: `python -m build` makes an sdist and a wheel from the tracked files, the
wheel carries the seccomp policies and every native module setup.py lists, and installed
into a clean virtual environment -- offline, from the wheels scripts/setup.sh collected -- its
console script starts, answers --version and --print-capabilities, and serves a front-end."""

from __future__ import annotations

import ast
import json
import os
import runpy
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd import __version__
from pyvirtiofsd.common import fuse_abi as fa
from tests.conftest import start_daemon
from tests.frontend import Frontend, FuseClient

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = REPO / ".venv" / "wheelhouse"
TIMEOUT = 300


def cffi_modules() -> list[str]:
    """The dotted names of the native modules setup.py builds, from its cffi_modules list."""
    tree = ast.parse((REPO / "setup.py").read_text())
    specs: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "cffi_modules":
            specs = ast.literal_eval(node.value)
    assert specs, "setup.py lists no cffi_modules"
    names = []
    for spec in specs:
        script, _, var = spec.partition(":")
        ffi = runpy.run_path(str(REPO / script))[var]
        # FFI.set_source() records the module's dotted name first.
        names.append(ffi._assigned_source[0])
    return names


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False,
                          **kw)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[tuple[Path, Path, Path]]:
    """(sdist, wheel, clean venv with the wheel installed)."""
    if not WHEELHOUSE.is_dir():
        pytest.fail(f"{WHEELHOUSE} is missing: scripts/setup.sh collects the runtime"
                    " dependencies' wheels there")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    files = run(["git", "ls-files", "-z"], cwd=REPO).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    dist = work / "dist"
    # No isolation: the build requirements are the test extra's, already installed offline.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
        cwd=work)
    [sdist] = dist.glob("pyvirtiofsd-*.tar.gz")
    [wheel] = dist.glob("pyvirtiofsd-*.whl")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=work)
    run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
         "--no-index", "--find-links", str(WHEELHOUSE), str(wheel)], cwd=work)
    yield sdist, wheel, venv


def test_sdist_and_wheel_carry_policies_and_native_modules(built) -> None:
    sdist, wheel, _ = built
    policies = sorted(p.name for p in (REPO / "policies").glob("*.policy"))
    assert policies
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    for policy in policies:
        assert f"pyvirtiofsd/policies/{policy}" in names
    for module in cffi_modules():
        path = module.replace(".", "/")
        assert any(n.startswith(path + ".") and n.endswith(".so") for n in names), (
            module, [n for n in names if n.endswith(".so")])
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {"setup.py", "pyproject.toml", "common/native_build.py"} <= members
    assert {f"policies/{p}" for p in policies} <= members
    # C sources a build script may read (the wheel above was built from this sdist).
    sources = {str(p.relative_to(REPO)) for ext in ("c", "h") for p in REPO.glob(f"common/*.{ext}")}
    assert sources <= members


def test_installed_console_script_answers(built, tmp_path: Path) -> None:
    _, _, venv = built
    exe = str(venv / "bin" / "pyvirtiofsd")
    # The package comes from the clean environment, not from this checkout.
    where = run([str(venv / "bin" / "python"), "-c",
                 "import pyvirtiofsd.common._native as n; print(n.__file__)"], cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout
    assert run([exe, "--version"], cwd=tmp_path).stdout == f"pyvirtiofsd {__version__}\n"
    caps = json.loads(run([exe, "--print-capabilities"], cwd=tmp_path).stdout)
    assert caps["type"] == "fs"


@pytest.mark.skipif(os.geteuid() != 0, reason="the default sandbox and its policies need root")
def test_installed_daemon_serves_a_front_end(built, tmp_path: Path) -> None:
    _, _, venv = built
    exe = str(venv / "bin" / "pyvirtiofsd")
    share = tmp_path / "share"
    share.mkdir()
    sock = str(tmp_path / "vfs.sock")
    # The default sandbox and seccomp filters: the policies the wheel installed are loaded.
    d = start_daemon(share, sock, "--sandbox=namespace", exe=venv / "bin" / "pyvirtiofsd")
    try:
        with Frontend.connect(sock, process=d.proc, queues=2) as fe:
            client = FuseClient(fe)
            client.init()
            entry, opened = client.create(fa.ROOT_ID, "hello")
            client.write(entry.nodeid, opened.fh, 0, b"from the wheel\n")
            client.release(entry.nodeid, opened.fh)
            status = json.loads(run([exe, "status", sock, "--json"], cwd=tmp_path).stdout)
            assert status["queues"][1]["requests"] == 4
        assert (share / "hello").read_bytes() == b"from the wheel\n"
        # The front-end left: the daemon exits, as virtiofsd does.
        assert d.proc.wait(timeout=30) == 0
    finally:
        d.stop()
    assert "Traceback" not in d.text, d.text
