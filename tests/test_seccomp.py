"""Seccomp policies: the parser's errors, both architectures' tables, and each filter at work.

The filters are loaded by the project's own loader (common/seccomp.py) in forked children of
the test process, which then make allowed and refused calls; the parent checks how the child
ended and what the SIGSYS reporter recorded.  The daemon-level tests start pyvirtiofsd with a
broken policy, and make a running worker issue a refused call (with ptrace, as a compromised
worker would) to see the supervisor name it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import signal
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyseccomp
import pytest

from pyvirtiofsd.common import native, seccomp
from pyvirtiofsd.common.seccomp import PolicyError, SigsysReport
from tests.conftest import DAEMON, start_daemon
from tests.frontend import Frontend, FuseClient

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
NR = {name: pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
      for name in ("execve", "socket", "ptrace", "clone", "prctl", "ioctl", "mmap", "mprotect",
                   "kill", "rt_sigaction", "clone3", "getpid")}


# A pid above any pid_max, as the parent's supervisor: kill(2) of it is ESRCH if allowed.
NOBODY_PID = 0x3FFFFFF0
VARIABLES = {"SUPERVISOR_PID": NOBODY_PID}


def filter_for(role: str, action: str = "kill"):
    return seccomp.compile_filter(seccomp.load_policy(role, VARIABLES), action)


def run_confined(filt, action: str, body: Callable[[], object],
                 report: SigsysReport | None = None, slot: int = 0) -> int:
    """Fork; the child loads `filt` and runs `body`, exiting 0 if it returns, 3 if it raises.
    Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            seccomp.install(filt, action, "pyvirtiofsd test", report, slot)
            body()
            code = 0
        except BaseException:
            pass
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def killed_by_sigsys(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


# --- the policy files -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", seccomp.ROLES)
@pytest.mark.parametrize("arch", sorted(seccomp.ARCHES))
def test_every_policy_compiles_for_both_architectures(role: str, arch: str) -> None:
    policy = seccomp.load_policy(role)
    filt = seccomp.compile_filter(policy, "kill", seccomp.ARCHES[arch])
    with open(os.devnull, "wb") as sink:
        filt.export_bpf(sink)
    # Every name is some architecture's system call; the table used is arch-specific.
    table = {r.syscall: pyseccomp.resolve_syscall(seccomp.ARCHES[arch], r.syscall)
             for r in policy.rules}
    assert all(nr >= 0 or nr < -1 for nr in table.values())
    if arch == "aarch64":
        assert table.get("poll", -2) < 0                  # no poll(2) there
        assert table.get("ppoll", 0) >= 0


def test_every_non_obvious_line_is_commented() -> None:
    """A bare `name: 1` is fine for plain I/O; conditions and errno denials carry a reason."""
    for path in POLICY_DIR.glob("*.policy"):
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            code = line.split("#", 1)[0].strip()
            if not code or code.startswith("@") or code.endswith(": 1"):
                continue
            above = lines[n - 1].strip() if n else ""
            assert "#" in line or above.startswith("#"), f"{path.name}:{n + 1}: {line}"


# pthread_create's clone flags (glibc), the only clone a worker may make: its lock-wait threads.
THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x40000 | 0x800 | 0x10000 | 0x80000 | 0x100000 | 0x200000


def test_spawner_allows_what_workers_need_and_workers_clone_only_threads() -> None:
    worker, spawner = seccomp.load_policy("worker"), seccomp.load_policy("spawner")
    # Filters stack: a worker can only ever do what its spawner's filter allows too.
    assert {r.syscall for r in worker.rules} <= {r.syscall for r in spawner.rules}
    for name in ("seccomp", "prctl", "execve", "ptrace", "socketpair"):
        assert worker.rule(name) is None, name
    clone = worker.rule("clone")
    assert clone is not None and len(clone.alternatives) == 1
    (cmp,) = clone.alternatives[0]
    assert (cmp.arg, cmp.op, cmp.value) == (0, "==", THREAD_FLAGS)
    clone = spawner.rule("clone")
    assert clone is not None and len(clone.alternatives) == 2
    assert [(c.arg, c.op, c.value) for (c,) in clone.alternatives] == [
        (0, "==", native.CLONE_FILES | native.CLONE_PARENT | native.SIGCHLD),
        (0, "==", THREAD_FLAGS)]


def test_supervisor_keeps_only_read_only_opens() -> None:
    rule = seccomp.load_policy("supervisor").rule("openat")
    assert rule is not None
    (cmp,) = rule.alternatives[0]
    assert cmp.mask == os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC and cmp.value == 0


# --- parse errors: one line, file and line number ----------------------------------------------


def parse_files(files: dict[str, str], name: str = "t.policy") -> list[seccomp.Rule]:
    def read(included: str) -> str:
        if included not in files:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return files[included]
    return seccomp.parse(files[name], name, read)


@pytest.mark.parametrize(("text", "message"), [
    ("read: 1\nfoo: 1\n", "policies/t.policy:2: unknown syscall 'foo'"),
    ("read 1\n", "policies/t.policy:1: cannot parse 'read 1'"),
    ("read:\n", "policies/t.policy:1: cannot parse 'read:'"),
    ("prctl: arg0 == PR_NOPE\n", "policies/t.policy:1: unknown constant 'PR_NOPE'"),
    ("prctl: arg9 == 1\n", "policies/t.policy:1: cannot parse condition 'arg9 == 1'"),
    ("prctl: arg0 = 1\n", "policies/t.policy:1: cannot parse condition 'arg0 = 1'"),
    ("mmap: arg2 & PROT_EXEC != 0\n", "policies/t.policy:1: a masked comparison must use =="),
    ("mmap: arg2 > 1 && arg2 < 9\n", "policies/t.policy:1: arg2 is compared twice"),
    ("clone3: return ENOPE\n", "policies/t.policy:1: unknown errno 'ENOPE'"),
    ("read: 1\n\n# x\nread: 1\n", "policies/t.policy:4: 'read' is already listed at "
                                  "policies/t.policy:1"),
    ("@include nope.policy\n", "policies/t.policy:1: cannot read nope.policy"),
    ("@include t.policy\n", "policies/t.policy:1: t.policy includes itself"),
    ("@include ../x.policy\n", "policies/t.policy:1: cannot parse '@include ../x.policy'"),
    ("kill: arg1 == 0x1FFFFFFFFFFFFFFFF\n", "does not fit in 64 bits"),
    ("kill: arg1 == 0x10000001F\n", "policies/t.policy:1: kill arg1 is a 32-bit argument; "
                                     "0x10000001f does not fit in it"),
    ("fcntl: arg1 & 0x100000000 == 0\n", "fcntl arg1 is a 32-bit argument"),
    ("kill: arg1 < 9\n", "kill arg1 is a 32-bit argument: compare it with == or != (or a "
                         "mask), not <"),
    ("read: arg0 == 1\n", "policies/t.policy:1: the width of read arg0 is not known (add it "
                          "to ARG_BITS in common/seccomp.py)"),
    ("kill: arg0 == $NOPE\n", "policies/t.policy:1: unknown variable '$NOPE' (known: "
                             "$SUPERVISOR_PID)"),
])
def test_policy_errors_are_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as ei:
        rules = parse_files({"t.policy": text})
        seen: dict[str, str] = {}
        for r in rules:      # what load_policy does after parsing
            if r.syscall in seen:
                raise PolicyError(f"{r.where}: {r.syscall!r} is already listed at "
                                  f"{seen[r.syscall]}")
            seen[r.syscall] = r.where
    assert message in str(ei.value)
    assert "\n" not in str(ei.value)


def test_includes_expand_in_place_and_conditions_parse() -> None:
    rules = parse_files({
        "t.policy": "@include c.policy\nmmap: arg2 & PROT_EXEC == 0  # no code\n"
                    "prctl: arg0 == PR_SET_NAME || arg0 == 0x10 && arg1 != 3\n"
                    "clone: arg0 == CLONE_FILES | CLONE_PARENT | 17\nclone3: return ENOSYS\n",
        "c.policy": "read: 1\n"})
    by = {r.syscall: r for r in rules}
    assert [r.syscall for r in rules] == ["read", "mmap", "prctl", "clone", "clone3"]
    assert by["read"].where == "policies/c.policy:1" and by["read"].alternatives == ()
    (mm,) = by["mmap"].alternatives
    assert mm == (seccomp.Comparison(2, "==", 0, 4),)
    assert by["prctl"].alternatives == (
        (seccomp.Comparison(0, "==", 15),),
        (seccomp.Comparison(0, "==", 16), seccomp.Comparison(1, "!=", 3)))
    assert by["clone"].alternatives[0][0].value == 0x400 | 0x8000 | 17
    assert by["clone3"].errno == errno.ENOSYS


def test_daemon_with_a_broken_policy_fails_at_start_with_one_line(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    for f in POLICY_DIR.glob("*.policy"):
        (policies / f.name).write_text(f.read_text())
    broken = (policies / "worker.policy").read_text() + "frobnicate: 1\n"
    (policies / "worker.policy").write_text(broken)
    line = len(broken.splitlines())
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "s.sock"
    env = {**os.environ, seccomp.POLICY_DIR_ENV: str(policies)}
    done = subprocess.run([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}"],
                          capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "pyvirtiofsd: error: seccomp policy: policies/worker.policy:"
        f"{line}: unknown syscall 'frobnicate'"]
    assert not sock.exists()
    # --seccomp=none does not load policies, so a broken one cannot stand in its way.
    (policies / "worker.policy").write_text("read\n")
    done = subprocess.run([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                           "--seccomp=log"], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 2
    assert "policies/worker.policy:1: cannot parse 'read'" in done.stderr


# --- the filters at work -------------------------------------------------------------------------


def _execve() -> None:
    os.execv("/bin/true", ["true"])


def _inet_socket() -> None:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def _ptrace() -> None:
    LIBC.ptrace(0, 0, 0, 0)     # PTRACE_TRACEME


@pytest.mark.parametrize(("call", "name"), [(_execve, "execve"), (_inet_socket, "socket"),
                                            (_ptrace, "ptrace")])
def test_worker_policy_kills_and_reports_forbidden_calls(call, name: str) -> None:
    report = SigsysReport(4)
    filt = filter_for("worker")
    pid = os.fork()
    if pid == 0:
        try:
            seccomp.install(filt, "kill", "pyvirtiofsd test", report, 2)
            call()
        finally:
            os._exit(0)
    status = os.waitpid(pid, 0)[1]
    assert killed_by_sigsys(status), status
    arch = seccomp.arch_name(pyseccomp.system_arch())
    assert report.describe(2, pid) == \
        f" (seccomp refused system call {NR[name]} ({name}) on {arch})"
    assert report.take(2, pid) is None                     # taken once
    assert report.describe(3, pid) == ""                   # other slots untouched


def test_allowed_calls_run_normally_under_the_worker_policy(tmp_path: Path) -> None:
    path = tmp_path / "f"

    def work() -> None:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.pwrite(fd, b"data", 0)
        assert os.pread(fd, 4, 0) == b"data"
        with mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[:4] = b"abcd"
        os.kill(os.getpid(), 0)
        os.close(fd)
    assert run_confined(filter_for("worker"), "kill", work) == 0
    assert path.read_bytes() == b"data"


def _libc_call(name: str, *args) -> Callable[[], None]:
    def call() -> None:
        fn = getattr(LIBC, name)
        fn(*args)
    return call


def _mmap_exec() -> None:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)


def _mprotect_exec() -> None:
    m = mmap.mmap(-1, 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    LIBC.mprotect(ctypes.c_void_p(addr), 4096, mmap.PROT_READ | mmap.PROT_EXEC)


def _ioctl(request: int) -> Callable[[], None]:
    def call() -> None:
        LIBC.ioctl(0, ctypes.c_ulong(request), ctypes.byref(ctypes.c_int()))
    return call


def _prctl(option: int) -> Callable[[], None]:
    return _libc_call("prctl", option, 0, 0, 0, 0)


def _kill_self(sig: int) -> Callable[[], None]:
    return lambda: os.kill(os.getpid(), sig)


def _wait_any() -> None:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass


def _kill_nobody(sig: int, pid: int = NOBODY_PID) -> Callable[[], None]:
    """kill(2) of a pid above any pid_max: ESRCH if the filter lets it through."""
    def call() -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return call


@pytest.mark.parametrize(("role", "call", "allowed"), [
    # mmap/mprotect: never executable memory
    ("worker", _mmap_exec, False),
    ("worker", _mprotect_exec, False),
    ("supervisor", _mmap_exec, False),
    # ioctl requests: isatty() probes and FIONBIO only
    ("worker", _ioctl(0x5401), True),          # TCGETS
    ("worker", _ioctl(0x541B), False),         # FIONREAD
    ("worker", _ioctl(0x80086601), False),     # FS_IOC_GETFLAGS
    # socket families: AF_UNIX only (syslog)
    ("worker", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close(), True),
    ("worker", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM), False),
    ("supervisor", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM), False),
    ("supervisor", lambda: [s.close() for s in socket.socketpair()], True),
    ("worker", socket.socketpair, False),      # its channels come from the spawner
    # prctl options: the spawner sets up new workers; workers need none
    ("spawner", _prctl(15), True),             # PR_SET_NAME
    ("spawner", _prctl(8), False),             # PR_SET_KEEPCAPS
    ("spawner", _prctl(22), False),            # PR_SET_SECCOMP (strict mode)
    ("worker", _prctl(15), False),
    # kill: the lock-owner probe only (workers), SIGKILL of a worker (supervisor)
    ("worker", _kill_self(0), True),
    ("worker", _kill_self(signal.SIGUSR1), False),
    ("supervisor", _kill_self(signal.SIGTERM), False),
    # SIGSYS's handler stays
    ("worker", lambda: signal.signal(signal.SIGSYS, signal.SIG_IGN), False),
    ("worker", lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN), True),
    # the parent left outside: waits, forwards the stop signals, unlinks; nothing else
    ("parent", _kill_nobody(signal.SIGTERM), True),
    ("parent", _kill_nobody(signal.SIGHUP), True),
    ("parent", _kill_nobody(signal.SIGKILL), False),
    ("parent", _kill_nobody(signal.SIGUSR1), False),
    ("parent", _kill_nobody(signal.SIGTERM, NOBODY_PID + 1), False),   # not its supervisor
    ("parent", _wait_any, True),
    ("parent", lambda: os.open("/dev/null", os.O_RDONLY), False),
    ("parent", os.fork, False),
    ("parent", _execve, False),
    ("parent", socket.socketpair, False),
    # the supervisor reads files but cannot write or create one
    ("supervisor", lambda: os.close(os.open("/dev/null", os.O_RDONLY)), True),
    ("supervisor", lambda: os.open("/dev/null", os.O_WRONLY), False),
    # ... and makes the inflight region's memfd, close-on-exec
    ("supervisor", lambda: os.close(os.memfd_create("inflight", os.MFD_CLOEXEC)), True),
    ("supervisor", lambda: os.memfd_create("inflight", 0), False),
])
def test_argument_filters(role: str, call, allowed: bool) -> None:
    status = run_confined(filter_for(role), "kill", call)
    if allowed:
        assert status == 0, status
    else:
        assert killed_by_sigsys(status), status


# --- 32-bit arguments: only the low half counts ------------------------------------------------


def test_a_high_half_does_not_sneak_sigsys_past_the_filter() -> None:
    """A compromised worker asks rt_sigaction for signal 0x1_0000001F: the kernel truncates
    the int to 31 (SIGSYS), so the filter must refuse it as it refuses 31, or the worker could
    install a handler of its own and survive every refused call."""
    def replace_sigsys_handler() -> None:
        LIBC.syscall(NR["rt_sigaction"], ctypes.c_ulong((1 << 32) | signal.SIGSYS), None, None,
                     ctypes.c_ulong(8))
    for role in seccomp.ROLES:
        assert killed_by_sigsys(run_confined(filter_for(role), "kill",
                                             replace_sigsys_handler)), role
        # The same without the high half, and a signal any role may handle.
        assert killed_by_sigsys(run_confined(
            filter_for(role), "kill", lambda: signal.signal(signal.SIGSYS, signal.SIG_IGN)))
        assert run_confined(filter_for(role), "kill",
                            lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN)) == 0


# Arguments that make each filtered call harmless if it runs (bad fd, NULL pointer, a pid that
# cannot exist): the probes below look at the filter's verdict, not at what the call does.
_PROBE_ARGS: dict[str, tuple[int, ...]] = {
    "rt_sigaction": (0, 0, 0, 8), "kill": (0x3FFFFFF0, 0), "fcntl": ((1 << 32) - 1, 0, 0),
    "ioctl": ((1 << 32) - 1, 0, 0), "prctl": (0, 0, 0, 0, 0),
    "socket": (0, socket.SOCK_DGRAM, 0), "socketpair": (0, socket.SOCK_DGRAM, 0, 0),
    "seccomp": (0, 0, 0), "openat": ((1 << 32) - 1, 0, 0, 0), "memfd_create": (0, 0),
    "tgkill": (0x3FFFFFF0, 0x3FFFFFF0, 0),      # no such thread: ESRCH
}
_HIGH_HALVES = (1 << 32, 0xFFFFFFFF << 32, 0x80000000 << 32)


def _probes() -> list[tuple[str, str, int, int, bool]]:
    """(role, syscall, arg, low value, allowed) for every 32-bit argument a policy filters:
    one low value the rule refuses and one it allows, found among its own constants and
    their neighbours."""
    out = []
    for role in seccomp.ROLES:
        for rule in seccomp.load_policy(role, VARIABLES).rules:
            args = {c.arg for alt in rule.alternatives for c in alt
                    if seccomp.arg_bits(rule.syscall, c.arg) == 32}
            for arg in sorted(args):
                base = list(_PROBE_ARGS[rule.syscall]) + [0] * 6
                consts = {c.value for alt in rule.alternatives for c in alt if c.arg == arg}
                candidates = [0x7FFFFFFF, 0xFFFFFFFF, *sorted(consts),
                              *sorted(v + 1 for v in consts), 0, 1]
                verdicts: dict[bool, int] = {}
                for low in candidates:
                    base[arg] = low
                    verdicts.setdefault(rule.allows(base), low)
                for allowed, low in sorted(verdicts.items()):
                    out.append((role, rule.syscall, arg, low, allowed))
    return out


@pytest.mark.parametrize(("role", "name", "arg", "low", "allowed"), [
    pytest.param(*p, id=f"{p[0]}-{p[1]}-arg{p[2]}-{p[3]:#x}-{'allowed' if p[4] else 'refused'}")
    for p in _probes()])
def test_every_32bit_argument_filter_ignores_the_high_half(role: str, name: str, arg: int,
                                                           low: int, allowed: bool) -> None:
    """The kernel reads only the low 32 bits of an int argument: a value with anything in the
    high half is judged as its low half, whichever way (refused values stay refused, allowed
    ones are not killed because a library left garbage above them)."""
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    for high in (0, *_HIGH_HALVES):
        args = list(_PROBE_ARGS[name])
        args[arg] = low | high

        def call(args: list[int] = args) -> None:
            LIBC.syscall(nr, *(ctypes.c_ulong(a) for a in args))
        status = run_confined(filter_for(role), "kill", call)
        if allowed:
            assert status == 0, (hex(low | high), status)
        else:
            assert killed_by_sigsys(status), (hex(low | high), status)


def test_spawner_clones_workers_only_with_their_flags() -> None:
    r, w = os.pipe()

    def clone_worker_like() -> None:
        pid = native.clone_process(native.CLONE_FILES | native.CLONE_PARENT)
        if pid == 0:
            os._exit(0)
        os.write(w, struct.pack("=i", pid))

    status = run_confined(filter_for("spawner"), "kill", clone_worker_like)
    assert status == 0
    grandchild = struct.unpack("=i", os.read(r, 4))[0]
    assert os.waitpid(grandchild, 0)[1] == 0      # CLONE_PARENT: the test process reaps it
    os.close(r)
    os.close(w)
    # os.fork() is clone(CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD): refused.
    assert killed_by_sigsys(run_confined(filter_for("spawner"), "kill", os.fork))
    # A thread is clone(CLONE_VM | CLONE_THREAD ...) with pthread_create's exact flags, after
    # clone3 said ENOSYS: allowed for a worker's lock waits (worker.policy), nothing else.
    import threading

    def thread() -> None:
        t = threading.Thread(target=int)
        t.start()
        t.join()
    assert run_confined(filter_for("spawner"), "kill", thread) == 0
    assert run_confined(filter_for("worker"), "kill", thread) == 0
    assert killed_by_sigsys(run_confined(filter_for("worker"), "kill", os.fork))
    assert killed_by_sigsys(run_confined(filter_for("worker"), "kill", clone_worker_like))


def test_errno_denials_do_not_kill() -> None:
    def probe() -> None:
        res = LIBC.syscall(NR["clone3"], None, 0)
        assert res == -1 and ctypes.get_errno() == errno.ENOSYS
    assert run_confined(filter_for("worker"), "kill", probe) == 0


def test_log_action_lets_calls_through() -> None:
    assert run_confined(filter_for("worker", "log"), "log", _inet_socket) == 0


def test_trap_action_delivers_sigsys_without_a_report() -> None:
    report = SigsysReport(2)
    pid = os.fork()
    if pid == 0:
        try:
            seccomp.install(filter_for("worker", "trap"), "trap", "t", report, 1)
            _inet_socket()
        finally:
            os._exit(0)
    assert killed_by_sigsys(os.waitpid(pid, 0)[1])
    assert report.take(1, pid) is None


@pytest.mark.skipif(platform.machine() != "x86_64", reason="i386 system calls need x86_64")
def test_foreign_architecture_calls_are_killed() -> None:
    # mov eax, 20 (i386 getpid); int 0x80; ret -- run from an executable page made beforehand.
    code = bytes.fromhex("b814000000cd80c3")
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page[: len(code)] = code
    fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    unfiltered = os.fork()
    if unfiltered == 0:
        os._exit(0 if fn() == os.getpid() else 1)
    if os.waitpid(unfiltered, 0)[1] != 0:
        pytest.skip("this kernel has no i386 system call emulation")
    status = run_confined(filter_for("worker"), "kill", fn)
    assert killed_by_sigsys(status)
    del fn
    page.close()


# --- a running daemon --------------------------------------------------------------------------


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`: {pid: comm}."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            names[int(entry)] = stat[stat.index("(") + 1 : stat.rindex(")")]
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                out[child] = names[child]
                todo.append(child)
    return out


class _Regs(ctypes.Structure):
    """struct user_regs_struct (x86_64)."""

    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
        "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base",
        "ds", "es", "fs", "gs")]


def inject_syscall(pid: int, nr: int) -> None:
    """Make the (blocked) process `pid` issue system call `nr`, as injected code would: stop it
    with ptrace, rewind it onto the syscall instruction it sleeps in, and let it go."""
    ptrace = LIBC.ptrace
    ptrace.restype = ctypes.c_long
    ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
    seize, interrupt, getregs, setregs, detach = 0x4206, 0x4207, 12, 13, 17
    assert ptrace(seize, pid, None, None) == 0, os.strerror(ctypes.get_errno())
    assert ptrace(interrupt, pid, None, None) == 0
    os.waitpid(pid, 0x40000000)        # __WALL
    regs = _Regs()
    assert ptrace(getregs, pid, None, ctypes.byref(regs)) == 0
    assert regs.orig_rax != 2**64 - 1, "not stopped in a system call"
    regs.rip -= 2                      # the 2-byte `syscall` instruction
    regs.rax = nr
    regs.orig_rax = 2**64 - 1          # no syscall restart on the way out of the stop
    regs.rdi = regs.rsi = regs.rdx = 0
    assert ptrace(setregs, pid, None, ctypes.byref(regs)) == 0
    assert ptrace(detach, pid, None, None) == 0


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the injection rewrites x86_64 regs")
@pytest.mark.parametrize("args", [("--sandbox=namespace",), ("--sandbox=none", "--seccomp=kill")],
                         ids=["namespace-default-action", "none"])
def test_supervisor_names_the_call_that_killed_a_worker(tmp_path: Path, args) -> None:
    share = tmp_path / "share"
    share.mkdir()
    d = start_daemon(share, str(tmp_path / "s.sock"), *args)
    try:
        with Frontend.connect(d.socket, process=d.proc) as fe:
            FuseClient(fe).init()
            kids = descendants(d.proc.pid)
            worker = next(pid for pid, name in kids.items() if name == "pyvfs-q1")
            inject_syscall(worker, NR["execve"])
            line = d.wait_for("killed by SIGSYS")
            assert d.proc.wait(timeout=20) == 1
    finally:
        d.stop()
    assert ("worker for queue 1 (pid " in line and "seccomp refused system call "
            f"{NR['execve']} (execve) on {seccomp.arch_name(pyseccomp.system_arch())}" in line)
    assert "stopping:" in line and "--seccomp=log" in line
    assert "pyvirtiofsd worker q1: seccomp refused system call 59" in d.text
    assert "respawning" not in d.text


def test_worker_policy_serves_lock_waits_and_nothing_more(tmp_path: Path) -> None:
    """A worker under its filter: OFD locks and flock, a waiting F_OFD_SETLKW in a helper
    thread interrupted by SIGUSR2 (EINTR), setgroups() with a thread alive (glibc signals
    each thread); the classic process-owned F_SETLK is refused."""
    import fcntl
    import threading

    from pyvirtiofsd.worker import locks

    path = tmp_path / "f"
    path.write_bytes(b"")
    holder = os.open(path, os.O_RDWR)           # an OFD lock of the test process
    locks.try_posix(holder, fcntl.F_WRLCK, 0, 0)

    def body() -> None:
        fd = os.open(path, os.O_RDWR)
        assert locks.probe_posix(fd, fcntl.F_RDLCK, 0, 0)[0] == fcntl.F_WRLCK
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locks.install_wake_signal()
        result: list[int] = []
        call = locks.blocking_posix(fd, fcntl.F_WRLCK, 0, 0)
        t = threading.Thread(target=lambda: result.append(call()))
        t.start()
        os.setgroups([])
        while t.is_alive():
            locks.wake(os.getpid(), t.native_id or 0)
            t.join(0.01)
        assert result == [errno.EINTR], result

    assert run_confined(filter_for("worker"), "kill", body) == 0

    def classic() -> None:
        fcntl.lockf(os.open(path, os.O_RDWR), fcntl.LOCK_SH | fcntl.LOCK_NB)
    assert killed_by_sigsys(run_confined(filter_for("worker"), "kill", classic))
    os.close(holder)
