"""A real guest through a live upgrade: QEMU 7.2 (which never reconnects a vhost-user-fs
back-end) runs a read/write loop with files held open while `pyvirtiofsd upgrade` replaces the
daemon under it; the guest sees no error and the host sees every write.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.guest_util import GuestDaemon, Kernel, run_guest
from tests.test_guest import (  # noqa: F401
    BOOT_TIMEOUT,
    PRELUDE,
    SANDBOXED,
    assert_ran,
    daemon,
    kernel61,
)

pytestmark = pytest.mark.guest

ROUNDS = 300
UPGRADE_AT = 100

UPGRADE_WORKLOAD = (
    PRELUDE
    + rf"""
loop() {{
  exec 3>u/held.log
  exec 4<u/ro.txt
  i=0
  while [ $i -lt {ROUNDS} ]; do
    printf '%08d\n' $i >&3
    echo "round $i" > u/f.$i
    [ "$(cat u/f.$i)" = "round $i" ]
    [ "$(head -c 5 /proc/self/fd/4)" = "ro ok" ]
    if [ $i -eq {UPGRADE_AT} ]; then echo "@@UPGRADE"; fi
    i=$((i + 1))
  done
  exec 3>&-
  exec 4<&-
  [ "$(wc -l < u/held.log)" -eq {ROUNDS} ]
}}
step loop
exit $failed
"""
)


WRAPPER = r"""
"$0" "$@"
rc=$?
for a; do case $a in --socket-path=*) s=${a#--socket-path=};; esac; done
while [ -S "$s" ]; do sleep 0.1; done
exit $rc
"""


def _daemon_of(share: Path) -> tuple[int, str] | None:
    """(pid, socket) of the pyvirtiofsd serving `share` (its command line says so)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if f"--shared-dir={share}" in argv and any("pyvirtiofsd" in a for a in argv[:2]):
            for a in argv:
                if a.startswith("--socket-path="):
                    return int(entry), a.partition("=")[2]
    return None


@pytest.mark.parametrize("confinement", [(), SANDBOXED], ids=["as-configured", "sandboxed"])
def test_guest_loop_through_a_live_upgrade(daemon: GuestDaemon, kernel61: Kernel,  # noqa: F811
                                           tmp_path: Path, confinement: tuple[str, ...]) -> None:
    if daemon.name != "pyvirtiofsd":
        pytest.skip("the live upgrade is pyvirtiofsd's")
    share = tmp_path / "share"
    share.mkdir()
    (share / "u").mkdir()
    (share / "u" / "ro.txt").write_text("ro ok\n")
    upgrades: list[subprocess.CompletedProcess] = []
    new_pids: list[int] = []

    def on_line(line) -> None:
        if line.text.startswith("@@UPGRADE") and not upgrades:
            found = _daemon_of(share)
            assert found is not None
            run = subprocess.run([daemon.argv[0], "upgrade", found[1]], capture_output=True,
                                 text=True, timeout=60)
            upgrades.append(run)
            if run.returncode == 0:
                new_pids.append(int(run.stderr.split("pid ")[1].split()[0]))

    # The first daemon ends at the handover; the wrapper stands in for it until the daemon
    # that took over ends too (it removes the socket then), so that the runner does not take
    # the first exit for a lost back-end.
    wrapper = ["/bin/sh", "-c", WRAPPER, *daemon.command(), *confinement]
    try:
        result = run_guest(wrapper, share, UPGRADE_WORKLOAD, kernel=kernel61,
                           timeout=BOOT_TIMEOUT * 2, on_line=on_line)
    finally:
        for pid in new_pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    assert upgrades and upgrades[0].returncode == 0, upgrades and upgrades[0].stderr
    assert "live upgrade: handed over" in result.daemon_output, result.daemon_output
    assert_ran(result, ["loop"])
    held = (share / "u" / "held.log").read_text().split()
    assert held == [f"{i:08d}" for i in range(ROUNDS)]
    for i in range(ROUNDS):
        assert (share / "u" / f"f.{i}").read_text() == f"round {i}\n"
