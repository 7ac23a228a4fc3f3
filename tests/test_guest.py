"""Real-guest end-to-end tests: a Debian kernel under QEMU (TCG) mounts the daemon's share.

Run against pyvirtiofsd (default) or the Rust virtiofsd anchor::

    GUEST_DAEMON=anchor .venv/bin/pytest -m guest tests/test_guest.py

The first run fetches Debian's kernels into guest/work/ (guest/fetch-kernels.sh).
"""

from __future__ import annotations

import calendar
import fcntl
import hashlib
import os
import random
import signal
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.guest_util import (
    GuestDaemon,
    GuestResult,
    Kernel,
    ensure_kernel,
    guest_unavailable,
    parse_steps,
    parse_values,
    queue_interrupts,
    run_guest,
    selected_daemon,
)

pytestmark = pytest.mark.guest

# A boot takes 8-30 s here (TCG on 2 shared cores); the margin keeps a loaded machine from flaking.
BOOT_TIMEOUT = 90.0

# Shared by both workloads: each step runs in a `set -e` subshell (not in an && list, where the
# shell would ignore -e) and reports "@@STEP ok|FAIL NAME"; the script exits 1 if any failed.
PRELUDE = r"""
failed=0
up() { cut -d' ' -f1 /proc/uptime; }
step() {
  t0=$(up)
  ( set -e; "$1" )
  rc=$?
  took=$(echo "$(up) $t0" | awk '{ printf "%.2fs", $1 - $2 }')
  if [ $rc -eq 0 ]; then echo "@@STEP ok $1 $took"
  else echo "@@STEP FAIL $1 rc=$rc $took"; failed=1; fi
}
val() { echo "@@VAL $1 $2"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
cd /mnt
"""

BASIC_WORKLOAD = (
    PRELUDE
    + r"""
mkdir w
files() {
  printf 'hello\n' > w/a.txt
  [ "$(cat w/a.txt)" = hello ]
  echo more >> w/a.txt
  printf XY | dd of=w/a.txt bs=1 seek=1 conv=notrunc 2>/dev/null
  printf 'abcdefgh' > w/t.txt
  truncate -s 3 w/t.txt
  # 1 MiB through the daemon and back, with the guest's page cache dropped in between.
  dd if=/dev/urandom of=/tmp/r.bin bs=64k count=16 2>/dev/null
  cp /tmp/r.bin w/r.bin
  drop_caches
  cmp /tmp/r.bin w/r.bin
  [ "$(cat w/a.txt)" = "$(printf 'hXYlo\nmore')" ]
  [ "$(cat w/t.txt)" = abc ]
}
dirs() {
  mkdir -p w/d1/d2/d3
  [ -d w/d1/d2/d3 ]
  mkdir w/d1/d2/d3/x
  rmdir w/d1/d2/d3/x
}
rename() {
  echo r > w/old
  mv w/old w/d1/new
  [ ! -e w/old ]
  echo keep > w/over.src
  echo lose > w/over.dst
  mv w/over.src w/over.dst
  [ "$(cat w/over.dst)" = keep ]
}
hardlink() {
  ln w/a.txt w/hard
  [ "$(stat -c %h w/a.txt)" = 2 ]
  [ "$(stat -c %i w/a.txt)" = "$(stat -c %i w/hard)" ]
}
symlink() {
  ln -s a.txt w/sym
  [ "$(readlink w/sym)" = a.txt ]
  [ "$(cat w/sym)" = "$(cat w/a.txt)" ]
  [ -L w/sym ]
}
modes() {
  chmod 0640 w/a.txt
  [ "$(stat -c %a w/a.txt)" = 640 ]
  printf '#!/bin/sh\necho ran\n' > w/x.sh
  chmod 0755 w/x.sh
  [ "$(w/x.sh)" = ran ]
  : > w/owned
  chown 1234:5678 w/owned
  [ "$(stat -c %u:%g w/owned)" = 1234:5678 ]
  touch -d '2001-02-03 04:05:06' w/dated
  mkfifo w/fifo
  [ -p w/fifo ]
}
readdir() {
  mkdir w/many
  seq 1 3000 | sed 's/^/f/' | (cd w/many && xargs touch)
  drop_caches
  n=$(ls -1 w/many | wc -l)
  val many.count "$n"
  [ "$n" -eq 3000 ]
  [ "$(find w/many -type f | wc -l)" -eq 3000 ]
}
unlink() {
  mkdir w/gone
  : > w/gone/x
  echo y > w/gone/y
  exec 3< w/gone/y
  rm w/gone/x w/gone/y
  [ "$(cat <&3)" = y ]
  exec 3<&-
  rmdir w/gone
  [ ! -e w/gone ]
}
bigfile() {
  # Staged in the guest's tmpfs so the share sees 1 MiB writes (a pipe would make them 4 KiB).
  dd if=/dev/urandom of=/tmp/big.bin bs=1M count=64 2>/dev/null
  sha256sum < /tmp/big.bin > /tmp/sum.w
  dd if=/tmp/big.bin of=w/big.bin bs=1M 2>/dev/null
  rm /tmp/big.bin
  drop_caches
  sha256sum < w/big.bin > /tmp/sum.r
  cmp /tmp/sum.w /tmp/sum.r
  val big.sha256 "$(cut -d' ' -f1 /tmp/sum.r)"
  val big.md5 "$(md5sum < w/big.bin | cut -d' ' -f1)"
}
stats() {
  val a.stat "$(stat -c '%s %a %h %F' w/a.txt)"
  val sym.stat "$(stat -c '%s %F' w/sym)"
  val big.stat "$(stat -c '%s %F' w/big.bin)"
  val dated.mtime "$(stat -c %Y w/dated)"
  val fifo.stat "$(stat -c %F w/fifo)"
  val statfs "$(stat -f -c '%b %S' /mnt)"
}
for s in files dirs rename hardlink symlink modes readdir unlink bigfile stats; do step $s; done
exit $failed
"""
)

BASIC_STEPS = [
    "files", "dirs", "rename", "hardlink", "symlink", "modes", "readdir", "unlink", "bigfile",
    "stats",
]  # fmt: skip

WRITER_FILES = 150

PARALLEL_WORKLOAD = (
    PRELUDE
    + rf"""
mkdir p
cat > /tmp/writer.sh <<'EOS'
# $1: writer name. Creates, writes and re-reads files, then one 8 MiB file, all in /mnt/p.
i=0
while [ $i -lt {WRITER_FILES} ]; do
  f=/mnt/p/$1.$i
  printf '%s %d\n' "$1" "$i" > "$f" || exit 1
  [ "$(cat "$f")" = "$1 $i" ] || exit 1
  i=$((i + 1))
done
dd if=/dev/zero of=/mnt/p/$1.big bs=1M count=8 2>/dev/null || exit 1
EOS
parallel() {{
  # One writer pinned to each vCPU: the driver picks the request queue from the submitting CPU.
  taskset -c 0 sh /tmp/writer.sh w0 &
  p0=$!
  taskset -c 1 sh /tmp/writer.sh w1 &
  p1=$!
  wait "$p0"
  wait "$p1"
  drop_caches
  [ "$(ls p | wc -l)" -eq {2 * WRITER_FILES + 2} ]
}}
step parallel
val cpus "$(nproc)"
grep virtio /proc/interrupts
exit $failed
"""
)


@pytest.fixture(scope="session")
def daemon() -> GuestDaemon:
    reason = guest_unavailable()
    if reason:
        pytest.skip(reason)
    d = selected_daemon()
    missing = d.missing()
    if missing:
        pytest.fail(missing)
    return d


@pytest.fixture(scope="session")
def kernel61(daemon: GuestDaemon) -> Kernel:
    return ensure_kernel("61")


@pytest.fixture(scope="session")
def kernel612(daemon: GuestDaemon) -> Kernel:
    return ensure_kernel("612")


def assert_ran(result: GuestResult, steps: list[str]) -> dict[str, str]:
    assert result.ok, result.failure()
    reported = parse_steps(result.script_output)
    failed = {name: detail for name, (ok, detail) in reported.items() if not ok}
    assert not failed, f"guest steps failed: {failed}\n{result.script_output}"
    assert sorted(reported) == sorted(steps), result.script_output
    return parse_values(result.script_output)


def report(name: str, result: GuestResult) -> None:
    print(
        f"{name}: share mounted {result.mounted_at:.2f} s after QEMU start "
        f"(guest uptime {result.guest_mount_uptime:.2f} s), boot total {result.wall:.2f} s"
    )


# pyvirtiofsd's default sandbox, with the seccomp action spelled out: every system call the
# guest's workload makes the workers do must be in their policy.
SANDBOXED = ("--sandbox=namespace", "--seccomp=kill")


@pytest.mark.parametrize("confinement", [(), SANDBOXED], ids=["as-configured", "sandboxed"])
def test_guest_basic_ops(daemon: GuestDaemon, kernel61: Kernel, tmp_path: Path,
                         confinement: tuple[str, ...]) -> None:
    if confinement and daemon.name != "pyvirtiofsd":
        pytest.skip("the sandboxed run is pyvirtiofsd's")
    share = tmp_path / "share"
    share.mkdir()
    result = run_guest([*daemon.command(), *confinement], share, BASIC_WORKLOAD,
                       kernel=kernel61, timeout=BOOT_TIMEOUT)  # fmt: skip
    report(f"basic ops on {kernel61.package} against {daemon.name} {' '.join(confinement)}",
           result)
    vals = assert_ran(result, BASIC_STEPS)
    assert "SIGSYS" not in result.daemon_output, result.daemon_output[-2000:]
    w = share / "w"

    a = w / "a.txt"
    assert a.read_bytes() == b"hXYlo\nmore\n"
    assert stat.S_IMODE(a.stat().st_mode) == 0o640
    assert a.stat().st_nlink == 2
    assert (w / "hard").stat().st_ino == a.stat().st_ino
    assert vals["a.stat"] == "11 640 2 regular file"
    assert (w / "t.txt").read_bytes() == b"abc"
    assert (w / "r.bin").stat().st_size == 1 << 20

    assert (w / "d1" / "d2" / "d3").is_dir()
    assert not (w / "d1" / "d2" / "d3" / "x").exists()
    assert (w / "d1" / "new").read_bytes() == b"r\n"
    assert not (w / "old").exists()
    assert not (w / "over.src").exists()
    assert (w / "over.dst").read_bytes() == b"keep\n"

    assert os.readlink(w / "sym") == "a.txt"
    assert vals["sym.stat"] == "5 symbolic link"
    assert stat.S_IMODE((w / "x.sh").stat().st_mode) == 0o755
    owned = (w / "owned").stat()
    assert (owned.st_uid, owned.st_gid) == (1234, 5678)
    # The guest has no time zone: touch -d took UTC.
    dated = calendar.timegm((2001, 2, 3, 4, 5, 6))
    assert int((w / "dated").stat().st_mtime) == dated
    assert vals["dated.mtime"] == str(dated)
    assert stat.S_ISFIFO((w / "fifo").lstat().st_mode)
    assert vals["fifo.stat"] == "fifo"

    many = sorted(os.listdir(w / "many"))
    assert vals["many.count"] == "3000"
    assert many == sorted(f"f{i}" for i in range(1, 3001))
    assert not (w / "gone").exists()

    big = (w / "big.bin").read_bytes()
    assert len(big) == 64 << 20
    assert vals["big.stat"] == f"{64 << 20} regular file"
    assert hashlib.sha256(big).hexdigest() == vals["big.sha256"]
    assert hashlib.md5(big).hexdigest() == vals["big.md5"]

    blocks, bsize = (int(v) for v in vals["statfs"].split())
    st = os.statvfs(share)
    assert blocks * bsize == st.f_blocks * st.f_frsize

    assert not (share / ".guest-script.sh").exists()
    assert sorted(p.name for p in share.iterdir()) == ["w"]


def test_guest_parallel_queues(daemon: GuestDaemon, kernel612: Kernel, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    queues = min(2, daemon.max_request_queues)
    result = run_guest(
        daemon.command(request_queues=queues), share, PARALLEL_WORKLOAD, kernel=kernel612,
        smp=2, num_request_queues=queues, timeout=BOOT_TIMEOUT,
    )  # fmt: skip
    report(f"parallel writers on {kernel612.package}, {queues} queue(s), {daemon.name}", result)
    vals = assert_ran(result, ["parallel"])
    assert vals["cpus"] == "2"

    # The guest saw completions on every request queue it was given, and on no other.
    irqs = queue_interrupts(result.script_output)
    request_irqs = {name: n for name, n in irqs.items() if name.startswith("requests.")}
    assert sorted(request_irqs) == [f"requests.{i}" for i in range(queues)], irqs
    assert all(n > 0 for n in request_irqs.values()), irqs
    daemon.check_queues(result, queues)

    names = sorted(os.listdir(share / "p"))
    expected = [f"w{k}.{i}" for k in (0, 1) for i in range(WRITER_FILES)] + ["w0.big", "w1.big"]
    assert names == sorted(expected)
    for k in (0, 1):
        for i in range(WRITER_FILES):
            assert (share / "p" / f"w{k}.{i}").read_text() == f"w{k} {i}\n"
        assert (share / "p" / f"w{k}.big").stat().st_size == 8 << 20


KILL_FILES = 60

KILL_WORKLOAD = (
    PRELUDE
    + rf"""
mkdir k
cat > /tmp/killed.sh <<'EOS'
# $1: writer name. Files of random data, their checksums kept in the guest's own tmpfs; every
# sixth file the host is told to kill a worker (@@KILL), and the writer goes on regardless.
i=0
while [ $i -lt {KILL_FILES} ]; do
  dd if=/dev/urandom of=/tmp/$1.$i bs=4k count=$((1 + i % 8)) 2>/dev/null || exit 1
  cp /tmp/$1.$i /mnt/k/$1.$i || exit 1
  md5sum < /tmp/$1.$i > /tmp/$1.$i.sum
  rm /tmp/$1.$i
  [ $((i % 6)) -eq 0 ] && echo "@@KILL $1 $i"
  i=$((i + 1))
done
EOS
killed() {{
  taskset -c 0 sh /tmp/killed.sh w0 &
  p0=$!
  taskset -c 1 sh /tmp/killed.sh w1 &
  p1=$!
  wait "$p0"
  wait "$p1"
  drop_caches
  for w in w0 w1; do
    i=0
    while [ $i -lt {KILL_FILES} ]; do
      [ "$(md5sum < k/$w.$i)" = "$(cat /tmp/$w.$i.sum)" ]
      i=$((i + 1))
    done
  done
  mkdir k/d && mv k/w0.0 k/d/moved && rm k/w1.0 && rmdir k/d 2>/dev/null || true
  [ -f k/d/moved ] && [ ! -e k/w1.0 ] && [ ! -e k/w0.0 ]
}}
step killed
exit $failed
"""
)


def _daemon_workers() -> list[int]:
    """Queue workers of the pyvirtiofsd this test process started (children of its child)."""
    me = os.getpid()
    procs: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                st = f.read()
        except OSError:
            continue
        procs[int(entry)] = (int(st[st.rindex(")") + 2 :].split()[1]),
                             st[st.index("(") + 1 : st.rindex(")")])
    daemons = {pid for pid, (ppid, name) in procs.items() if ppid == me and name == "pyvirtiofsd"}
    return [pid for pid, (ppid, name) in procs.items()
            if ppid in daemons and name.startswith("pyvfs-q")]


def test_guest_workload_survives_worker_kills(daemon: GuestDaemon, kernel612: Kernel,
                                              tmp_path: Path) -> None:
    if daemon.name != "pyvirtiofsd":
        pytest.skip("only pyvirtiofsd has queue workers to kill")
    share = tmp_path / "share"
    share.mkdir()
    kills: list[int] = []
    rng = random.Random(7)

    def on_line(line) -> None:
        if line.text.startswith("@@KILL"):
            workers = _daemon_workers()
            if workers:
                victim = rng.choice(workers)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                except ProcessLookupError:
                    pass

    result = run_guest(
        daemon.command(request_queues=2), share, KILL_WORKLOAD, kernel=kernel612, smp=2,
        num_request_queues=2, timeout=BOOT_TIMEOUT * 2, on_line=on_line,
    )  # fmt: skip
    report(f"writers under worker kills on {kernel612.package}", result)
    assert_ran(result, ["killed"])
    assert len(kills) >= 10, kills
    # Every kill was noticed and the worker replaced; nothing else went wrong.
    assert result.daemon_output.count("respawning it") >= len(kills) - 1, result.daemon_output
    assert "Traceback" not in result.daemon_output
    names = sorted(os.listdir(share / "k"))
    expected = sorted([f"w{k}.{i}" for k in (0, 1) for i in range(1, KILL_FILES)] + ["d"])
    assert names == expected
    for k in (0, 1):
        for i in range(1, KILL_FILES):
            assert (share / "k" / f"w{k}.{i}").stat().st_size == 4096 * (1 + i % 8)


# --- fsx-style verification while the host kills workers and the spawner ----------------------

FSX_OPS = 1500
FSX_MAXLEN = 256 * 1024
FSX_MARK = 60          # operations between two kills asked for, per verifier

FSX_WORKLOAD = (
    PRELUDE
    + rf"""
# The verifier is copied out of the share before any kill is asked for.
cp /mnt/.fsx /tmp/fsx
chmod 755 /tmp/fsx
mkdir f
fsx() {{
  taskset -c 0 /tmp/fsx f/a {FSX_OPS} 1 {FSX_MAXLEN} {FSX_MARK} a &
  p0=$!
  taskset -c 1 /tmp/fsx f/b {FSX_OPS} 2 {FSX_MAXLEN} {FSX_MARK} b &
  p1=$!
  wait "$p0"
  wait "$p1"
}}
step fsx
exit $failed
"""
)


def _build_fsx(out: Path) -> None:
    src = Path(__file__).resolve().parent.parent / "guest" / "fsx.c"
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror",
                    "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong", "-o", str(out), str(src)],
                   check=True, capture_output=True, text=True)


def _daemon_children() -> dict[int, str]:
    """{pid: name} of the live workers and spawner of the pyvirtiofsd this test started (below
    the sandbox's waiting parent, when there is one); zombies are left out."""
    procs: dict[int, tuple[int, str]] = {}
    zombies: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                st = f.read()
        except OSError:
            continue
        state, ppid = st[st.rindex(")") + 2 :].split()[:2]
        procs[int(entry)] = (int(ppid), st[st.index("(") + 1 : st.rindex(")")])
        if state == "Z":
            zombies.add(int(entry))
    ours = {pid for pid, (ppid, name) in procs.items() if ppid == os.getpid()}
    # Two levels down at most: daemon -> (sandboxed supervisor) -> workers and spawner.
    ours |= {pid for pid, (ppid, _) in procs.items() if ppid in ours}
    return {pid: name for pid, (ppid, name) in procs.items()
            if ppid in ours and pid not in zombies
            and (name == "pyvfs-spawner" or name.startswith("pyvfs-q"))}


def _fnv(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


@pytest.mark.parametrize("confinement", [(), SANDBOXED], ids=["as-configured", "sandboxed"])
def test_guest_fsx_while_workers_and_the_spawner_are_killed(daemon: GuestDaemon,
                                                            kernel612: Kernel, tmp_path: Path,
                                                            confinement: tuple[str, ...]
                                                            ) -> None:
    """Two verifiers on two request queues, every read checked against a model, while the
    host SIGKILLs a worker or the spawner at random every FSX_MARK operations.  With
    --cache=never every read and write reaches the daemon.  The guest sees no error and no
    wrong byte; the files on the host are what the guest's model says."""
    if daemon.name != "pyvirtiofsd":
        pytest.skip("only pyvirtiofsd has workers and a spawner to kill")
    share = tmp_path / "share"
    share.mkdir()
    _build_fsx(share / ".fsx")
    rng = random.Random(12)
    kills: list[str] = []
    killed: set[int] = set()

    def on_line(line) -> None:
        if not line.text.startswith("@@KILL"):
            return
        # Not one already killed: both verifiers may ask within a millisecond of each other.
        procs = {p: n for p, n in _daemon_children().items() if p not in killed}
        if not procs:
            return
        # One kill in four is the spawner (its standby takes over); the rest a worker.
        spawners = [p for p, n in procs.items() if n == "pyvfs-spawner"]
        workers = [p for p, n in procs.items() if n != "pyvfs-spawner"]
        pool = spawners if (len(kills) % 4 == 3 and spawners) or not workers else workers
        victim = rng.choice(pool)
        try:
            os.kill(victim, signal.SIGKILL)
            kills.append(procs[victim])
            killed.add(victim)
        except ProcessLookupError:
            pass

    result = run_guest(
        [*daemon.command(request_queues=2), "--cache=never", *confinement], share,
        FSX_WORKLOAD,
        kernel=kernel612, smp=2, num_request_queues=2, timeout=BOOT_TIMEOUT * 4,
        on_line=on_line,
    )  # fmt: skip
    report(f"fsx under worker and spawner kills on {kernel612.package}", result)
    print(f"{len(kills)} kills, {kills.count('pyvfs-spawner')} of them the spawner")
    assert "@@FSX FAIL" not in result.script_output, result.script_output
    vals = assert_ran(result, ["fsx"])
    spawner_kills = kills.count("pyvfs-spawner")
    assert len(kills) >= 2 * FSX_OPS // FSX_MARK - 4, kills
    assert spawner_kills >= 5, kills
    out = result.daemon_output
    assert out.count("takes over") >= spawner_kills, out[-3000:]
    assert out.count("respawning it") >= len(kills) - spawner_kills - 1, out[-3000:]
    assert "stopping" not in out and "Traceback" not in out, out[-3000:]
    for name in ("a", "b"):
        data = (share / "f" / name).read_bytes()
        assert str(len(data)) == vals[f"{name}.size"]
        assert _fnv(data) == vals[f"{name}.fnv"]


# -- DAX with the QEMU here --------------------------------------------------------------------
# QEMU 7.2's vhost-user-fs has no cache window (no cache-size property: `-device
# vhost-user-fs-pci,help`), but it takes the back-end channel every vhost-user back-end offers.
# A guest mounted without dax must then work as usual, and the daemon must send QEMU nothing:
# QEMU answers back-end requests it does not know with an error.
DAX_WORKLOAD = PRELUDE + r"""
io() {
  printf 'dax off\n' > plain
  drop_caches
  [ "$(cat plain)" = "dax off" ]
  sync plain
}
step io
val mount "$(grep ' /mnt ' /proc/mounts)"
# What this kernel says to dax=always on a device without a window (reported, see docs).
mkdir -p /tmp/dax
val daxmount "$(mount -t virtiofs -o dax=always myfs /tmp/dax 2>&1; echo rc=$?)"
val daxmsg "$(dmesg | grep -i dax | tail -2 | tr '\n' ' ')"
exit $failed
"""


def test_guest_with_dax_on_a_qemu_without_a_window(daemon: GuestDaemon, kernel61: Kernel,
                                                   tmp_path: Path) -> None:
    if daemon.name != "pyvirtiofsd":
        pytest.skip("--dax is pyvirtiofsd's")
    share = tmp_path / "share"
    share.mkdir()
    result = run_guest([*daemon.command(), "--dax", "--log-level=debug"], share, DAX_WORKLOAD,
                       kernel=kernel61, timeout=BOOT_TIMEOUT)
    vals = assert_ran(result, ["io"])
    print(f"dax=always mount in the guest: {vals['daxmount']} / {vals['daxmsg']}")
    assert "virtiofs" in vals["mount"] and "dax" not in vals["mount"], vals["mount"]
    assert (share / "plain").read_text() == "dax off\n"
    # QEMU set up the back-end channel; the session did not ask for DAX, so nothing was sent.
    assert "back-end channel set" in result.daemon_output, result.daemon_output[-2000:]
    for trouble in ("refused", "could not empty the DAX window", "back-end channel failed"):
        assert trouble not in result.daemon_output, result.daemon_output[-2000:]
# --- file locks: flock, POSIX and OFD locks between guest processes, queues and the host ---------

LOCK_ROWS = 60         # rows each SQLite writer inserts, one transaction each

LOCK_WORKLOAD = (
    PRELUDE
    + rf"""
cp /mnt/.locktool /tmp/lt
cp /mnt/.sqlw /tmp/sqlw
chmod 755 /tmp/lt /tmp/sqlw
mkdir l
cd l
: > f
: > g
: > h
# Waits for a file another process (or the host) makes when it has done its part.
waitfile() {{ while [ ! -e "$1" ]; do usleep 20000; done; }}
# The exit status of a command that must fail with 1 (a conflicting lock).
busy() {{ rc=0; "$@" || rc=$?; [ $rc -eq 1 ]; }}
flock_locks() {{
  taskset -c 0 /tmp/lt flock f hold w 0 0 r1 go1 &
  p=$!
  waitfile r1
  busy taskset -c 1 /tmp/lt flock f try r 0 0
  echo "@@HOST probe f"
  waitfile probe.f
  [ "$(cat probe.f)" = "posix-free flock-busy" ]
  taskset -c 1 /tmp/lt flock f wait w 0 0 > w1.out &
  w=$!
  stat f > /dev/null
  [ ! -s w1.out ]
  touch go1
  wait $p
  wait $w
  [ "$(cat w1.out)" = got ]
}}
posix_locks() {{
  taskset -c 0 /tmp/lt posix f hold w 0 10 r2 go2 &
  p=$!
  waitfile r2
  # The pid a guest sees is the holder's own.
  [ "$(taskset -c 1 /tmp/lt posix f getlk w 0 0)" = "w 0 10 $p" ]
  busy taskset -c 1 /tmp/lt posix f try r 5 1
  busy taskset -c 1 /tmp/lt ofd f try r 9 1
  taskset -c 1 /tmp/lt posix f try w 10 5
  echo "@@HOST probe f"
  waitfile probe.f
  [ "$(cat probe.f)" = "posix-busy flock-free" ]
  taskset -c 1 /tmp/lt posix f wait r 0 0 > w2.out &
  w=$!
  stat f > /dev/null
  [ ! -s w2.out ]
  touch go2
  wait $p
  wait $w
  [ "$(cat w2.out)" = got ]
}}
ofd_locks() {{
  taskset -c 1 /tmp/lt ofd g hold r 0 0 r3 go3 &
  p=$!
  waitfile r3
  taskset -c 0 /tmp/lt ofd g try r 0 100
  busy taskset -c 0 /tmp/lt ofd g try w 50 1
  busy taskset -c 0 /tmp/lt posix g try w 0 0
  [ "$(taskset -c 0 /tmp/lt ofd g getlk w 0 0 | cut -d' ' -f1-3)" = "r 0 0" ]
  taskset -c 0 /tmp/lt ofd g wait w 0 0 > w3.out &
  w=$!
  stat g > /dev/null
  [ ! -s w3.out ]
  touch go3
  wait $p
  wait $w
  [ "$(cat w3.out)" = got ]
}}
host_locks() {{
  echo "@@HOST lock g"
  waitfile host.locked
  busy /tmp/lt posix g try w 0 0
  busy /tmp/lt ofd g try r 0 0
  # A host process has no pid in the guest: 0.
  [ "$(/tmp/lt posix g getlk w 0 0)" = "w 0 0 0" ]
  taskset -c 1 /tmp/lt posix g wait w 0 0 > w4.out &
  w=$!
  stat g > /dev/null
  [ ! -s w4.out ]
  echo "@@HOST unlock g"
  wait $w
  [ "$(cat w4.out)" = got ]
  taskset -c 0 /tmp/lt posix h hold w 0 0 r4 go4 &
  p=$!
  waitfile r4
  echo "@@HOST probe h"
  waitfile probe.h
  [ "$(cat probe.h)" = "posix-busy flock-free" ]
  touch go4
  wait $p
}}
killed_holder() {{
  taskset -c 0 /tmp/lt posix f hold w 0 0 r5 go5 &
  p=$!
  waitfile r5
  kill -9 $p
  wait $p || true
  # Its descriptor closed as it died (FLUSH): the lock is gone.
  taskset -c 1 /tmp/lt posix f try w 0 0
  taskset -c 1 /tmp/lt flock f hold w 0 0 r6 go6 &
  p=$!
  waitfile r6
  kill -9 $p
  wait $p || true
  taskset -c 0 /tmp/lt flock f try w 0 0
}}
killed_waiter() {{
  taskset -c 0 /tmp/lt posix f hold w 0 0 r7 go7 &
  p=$!
  waitfile r7
  taskset -c 1 /tmp/lt posix f wait w 0 0 > w7.out &
  w=$!
  stat f > /dev/null
  kill -9 $w
  touch go7
  wait $p
  # virtio-fs sends no INTERRUPT: the killed waiter goes once its request is answered.
  wait $w || true
  [ ! -s w7.out ]
  taskset -c 0 /tmp/lt posix f try w 0 0
  taskset -c 1 /tmp/lt flock f try w 0 0
}}
sqlite() {{
  echo "@@HOST sqlite db"
  taskset -c 0 /tmp/sqlw db guest0 {LOCK_ROWS} > s0.out &
  a=$!
  taskset -c 1 /tmp/sqlw db guest1 {LOCK_ROWS} > s1.out &
  b=$!
  wait $a
  wait $b
  waitfile host.sqlite
  [ "$(cat host.sqlite)" = "host done" ]
  /tmp/sqlw db check > check.out
  val sqlite.check "$(tr '\n' ' ' < check.out)"
  [ "$(cat check.out)" = "$(printf 'rows %d\nok' {3 * LOCK_ROWS})" ]
}}
for s in flock_locks posix_locks ofd_locks host_locks killed_holder killed_waiter sqlite; do
  step $s
done
exit $failed
"""
)
LOCK_STEPS = ["flock_locks", "posix_locks", "ofd_locks", "host_locks", "killed_holder",
              "killed_waiter", "sqlite"]


def _build_static(src: str, out: Path, *libs: str) -> None:
    path = Path(__file__).resolve().parent.parent / "guest" / src
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror",
                    "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong", "-o", str(out), str(path),
                    *libs], check=True, capture_output=True, text=True)


class HostSide:
    """What the host does when the guest asks (@@HOST lines): hold and drop a POSIX lock,
    say which locks a host process would meet, and run a third SQLite writer."""

    def __init__(self, share: Path) -> None:
        self.dir = share / "l"
        self.held: dict[str, object] = {}
        self.writer: threading.Thread | None = None
        self.errors: list[str] = []

    def _answer(self, name: str, text: str) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text)
        os.rename(tmp, self.dir / name)           # the guest never reads half of it

    def on_line(self, line) -> None:
        if not line.text.startswith("@@HOST "):
            return
        try:
            self._do(*line.text.split()[1:])
        except Exception as e:                    # reported by the test, not lost in a thread
            self.errors.append(f"{line.text}: {e!r}")

    def _do(self, what: str, name: str) -> None:
        path = self.dir / name
        if what == "lock":
            f = open(path, "r+b")                 # noqa: SIM115 -- held until "unlock"
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.held[name] = f
            self._answer("host.locked", "")
        elif what == "unlock":
            self.held.pop(name).close()           # type: ignore[attr-defined]
        elif what == "probe":
            (self.dir / f"probe.{name}").unlink(missing_ok=True)
            with open(path, "r+b") as f:
                try:
                    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    posix = "posix-free"
                except BlockingIOError:
                    posix = "posix-busy"
            with open(path, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    flock = "flock-free"
                except BlockingIOError:
                    flock = "flock-busy"
            self._answer(f"probe.{name}", f"{posix} {flock}")
        elif what == "sqlite":
            self.writer = threading.Thread(target=self._sqlite, args=(path,), daemon=True)
            self.writer.start()

    def _sqlite(self, path: Path) -> None:
        import sqlite3
        try:
            db = sqlite3.connect(path, timeout=120, isolation_level=None)
            db.execute("CREATE TABLE IF NOT EXISTS t (who TEXT, i INTEGER)")
            for i in range(LOCK_ROWS):
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO t VALUES (?, ?)", ("host", i))
                db.execute("COMMIT")
            db.close()
            self._answer("host.sqlite", "host done")
        except Exception as e:
            self.errors.append(f"host SQLite writer: {e!r}")
            self._answer("host.sqlite", f"host failed: {e!r}")


@pytest.mark.parametrize("plane", ["python", "native"])
def test_guest_locks(daemon: GuestDaemon, kernel612: Kernel, tmp_path: Path,
                     plane: str) -> None:
    """flock, fcntl POSIX and OFD locks, blocking and not, between two guest processes on two
    CPUs (two request queues) and a host process; a guest process killed while it holds a
    lock and while it waits for one; three SQLite writers, two in the guest and one on the
    host, on one database.  --cache=never, so the writers read each other's pages from the
    host, and the sandbox with its seccomp filters, so the lock waits' threads run in it."""
    if daemon.name != "pyvirtiofsd":
        pytest.skip("virtiofsd answers lock requests with ENOSYS (docs/differences.md, Locks)")
    share = tmp_path / "share"
    share.mkdir()
    _build_static("locktool.c", share / ".locktool")
    _build_static("sqlw.c", share / ".sqlw", "-lsqlite3", "-lm")
    host = HostSide(share)
    result = run_guest(
        [*daemon.command(request_queues=2), "--cache=never", f"--data-plane={plane}",
         *SANDBOXED], share, LOCK_WORKLOAD,
        kernel=kernel612, smp=2, num_request_queues=2, timeout=BOOT_TIMEOUT * 3,
        on_line=host.on_line,
    )  # fmt: skip
    report(f"locks on {kernel612.package}, {plane} data plane", result)
    for f in host.held.values():
        f.close()                                 # type: ignore[attr-defined]
    assert not host.errors, host.errors
    vals = assert_ran(result, LOCK_STEPS)
    assert vals["sqlite.check"] == f"rows {3 * LOCK_ROWS} ok", vals
    out = result.daemon_output
    assert "SIGSYS" not in out and "Traceback" not in out, out[-3000:]
    daemon.check_queues(result, 2)                # the processes on two CPUs used both queues
    import sqlite3
    db = sqlite3.connect(share / "l" / "db")
    rows = db.execute("SELECT who, count(*), min(i), max(i) FROM t GROUP BY who").fetchall()
    assert sorted(rows) == [(w, LOCK_ROWS, 0, LOCK_ROWS - 1)
                            for w in ("guest0", "guest1", "host")], rows
