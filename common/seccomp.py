"""Seccomp policies as data: parse `policies/*.policy`, compile them with libseccomp, load them.

A policy file lists the system calls one process role may make (policies/README.md is the
reference for the format)::

    @include common.policy                 # another file of the same directory, once
    read: 1                                # allowed
    mmap: arg2 & PROT_EXEC == 0            # allowed when the condition holds
    prctl: arg0 == PR_SET_NAME || arg0 == PR_GET_NAME
    clone3: return ENOSYS                  # refused with this errno, never the default action

A condition is alternatives joined by `||`, each a conjunction (`&&`) of comparisons of one
argument (`arg0`..`arg5`, each at most once per alternative) with `==`, `!=`, `<`, `<=`, `>`,
`>=`, or a masked `argN & MASK == VALUE`; values are numbers or the named constants below, or
several of them joined by `|`.  A system call appears once per compiled policy, includes
counted.  Names are checked against the x86_64 and aarch64 tables: a name neither has is an
error, a name only one has is simply absent from the other's filter.

What is not allowed gets the default action picked by `--seccomp`:

* ``kill``: the process dies by SIGSYS and the syscall number is reported first.  The filter
  traps (SECCOMP_RET_TRAP) into a C handler (common/native_build.py) that records the number in
  a shared `SigsysReport` slot and on stderr, then repeats the call with SIGSYS blocked, which
  the kernel answers by killing the process with SIGSYS -- as SECCOMP_RET_KILL_PROCESS would,
  but the supervisor can say which call it was.  Policies refuse `rt_sigaction` on SIGSYS, so
  nothing can replace that handler once the filter is in place.
* ``trap``: SIGSYS with its default disposition (virtiofsd's `trap`): the process dies, with a
  core dump if core dumps were asked for; the kernel logs the call (audit type 1326).
* ``log``: the call is allowed and the kernel logs it (audit type 1326 in dmesg/the journal):
  how an operator finds what a policy lacks.
* ``none``: no filter.

A call made under a foreign architecture (i386 `int 0x80`, x32) always kills the process.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import importlib
import itertools
import mmap
import os
import re
import struct
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyvirtiofsd import policies
from pyvirtiofsd.common import native

# The ABI names of the two libraries pyseccomp loads (glibc's libc since 2.x, libseccomp 2.x).
_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _import_pyseccomp() -> types.ModuleType:
    """pyseccomp, imported without ctypes.util where the libraries' ABI names load.

    pyseccomp finds libc and libseccomp with ctypes.util.find_library, which runs ldconfig in
    two child processes (about 20 ms of start-up) and imports subprocess, shutil, tempfile,
    random, bz2 and lzma: about 0.6 MB that every process of the daemon would carry.  It gets
    a find_library that answers the ABI names instead; where one of them does not load, the
    import is repeated with the real ctypes.util."""
    if "pyseccomp" in sys.modules or "ctypes.util" in sys.modules:
        return importlib.import_module("pyseccomp")
    try:
        for soname in _SONAMES.values():
            ctypes.CDLL(soname)
    except OSError:
        return importlib.import_module("pyseccomp")
    lookup = types.ModuleType("ctypes.util")
    lookup.find_library = _SONAMES.get          # type: ignore[attr-defined]
    sys.modules["ctypes.util"] = ctypes.util = lookup     # type: ignore[attr-defined]
    try:
        return importlib.import_module("pyseccomp")
    finally:
        # Not left for anything else that imports ctypes.util: it gets the real one.
        del sys.modules["ctypes.util"]
        del ctypes.util                          # type: ignore[attr-defined]


pyseccomp = _import_pyseccomp()

ACTIONS = ("kill", "trap", "log", "none")
ROLES = ("parent", "supervisor", "spawner", "worker")
ARCHES = {"x86_64": pyseccomp.Arch.X86_64, "aarch64": pyseccomp.Arch.AARCH64}
POLICY_PACKAGE = "pyvirtiofsd.policies"
# Operators may point the daemon at edited copies of the policies (they are checked the same way).
POLICY_DIR_ENV = "PYVIRTIOFSD_POLICY_DIR"

# Named values for conditions.  All of them are the same on x86_64 and aarch64 (asm-generic
# ioctl numbers, signal numbers and flags), which is why one table serves both.
CONSTANTS: dict[str, int] = {
    # prctl(2) options (linux/prctl.h)
    "PR_SET_PDEATHSIG": 1, "PR_GET_PDEATHSIG": 2, "PR_GET_DUMPABLE": 3, "PR_SET_DUMPABLE": 4,
    "PR_GET_KEEPCAPS": 7, "PR_SET_KEEPCAPS": 8, "PR_SET_NAME": 15, "PR_GET_NAME": 16,
    "PR_GET_SECCOMP": 21, "PR_SET_SECCOMP": 22, "PR_CAPBSET_READ": 23, "PR_CAPBSET_DROP": 24,
    "PR_SET_NO_NEW_PRIVS": 38, "PR_GET_NO_NEW_PRIVS": 39, "PR_CAP_AMBIENT": 47,
    "PR_SET_VMA": 0x53564D41,
    # mmap/mprotect (asm-generic/mman-common.h)
    "PROT_NONE": 0, "PROT_READ": 1, "PROT_WRITE": 2, "PROT_EXEC": 4,
    "MAP_SHARED": 1, "MAP_PRIVATE": 2, "MAP_FIXED": 0x10, "MAP_ANONYMOUS": 0x20,
    # socket families and types
    "AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16,
    "SOCK_STREAM": 1, "SOCK_DGRAM": 2, "SOCK_SEQPACKET": 5,
    "SOCK_NONBLOCK": 0o4000, "SOCK_CLOEXEC": 0o2000000,
    # clone(2) flags
    "CLONE_VM": 0x100, "CLONE_FS": 0x200, "CLONE_FILES": 0x400, "CLONE_SIGHAND": 0x800,
    "CLONE_PIDFD": 0x1000, "CLONE_PTRACE": 0x2000, "CLONE_VFORK": 0x4000,
    "CLONE_PARENT": 0x8000, "CLONE_THREAD": 0x10000, "CLONE_NEWNS": 0x20000,
    "CLONE_SYSVSEM": 0x40000, "CLONE_SETTLS": 0x80000, "CLONE_PARENT_SETTID": 0x100000,
    "CLONE_CHILD_CLEARTID": 0x200000, "CLONE_CHILD_SETTID": 0x1000000,
    "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000, "CLONE_NEWNET": 0x40000000,
    # signals
    "SIGHUP": 1, "SIGINT": 2, "SIGKILL": 9, "SIGUSR1": 10, "SIGSEGV": 11, "SIGUSR2": 12,
    "SIGTERM": 15, "SIGCHLD": 17, "SIGSYS": 31,
    "SIGSETXID": 33,               # glibc's internal SIGRTMIN + 1 (setuid/setgroups broadcast)
    # fcntl(2) commands
    "F_DUPFD": 0, "F_GETFD": 1, "F_SETFD": 2, "F_GETFL": 3, "F_SETFL": 4, "F_GETLK": 5,
    "F_SETLK": 6, "F_SETLKW": 7, "F_OFD_GETLK": 36, "F_OFD_SETLK": 37, "F_OFD_SETLKW": 38,
    "F_DUPFD_CLOEXEC": 1030,
    # memfd_create(2) flags
    "MFD_CLOEXEC": 1,
    # ioctl(2) requests (asm-generic/ioctls.h, linux/fs.h)
    "TCGETS": 0x5401, "FIONREAD": 0x541B, "FIONBIO": 0x5421, "FIOCLEX": 0x5451,
    "FS_IOC_GETFLAGS": 0x80086601, "FS_IOC_SETFLAGS": 0x40086602,
    "FS_IOC_FSGETXATTR": 0x801C581F, "FS_IOC_FSSETXATTR": 0x401C5820,
    # seccomp(2) operations
    "SECCOMP_SET_MODE_STRICT": 0, "SECCOMP_SET_MODE_FILTER": 1, "SECCOMP_GET_ACTION_AVAIL": 2,
    "SECCOMP_GET_NOTIF_SIZES": 3,
    # kill(2), wait
    "P_PID": 1, "P_PIDFD": 3, "WNOHANG": 1,
}

# The width of every argument a policy may compare, as the kernel declares it (SYSCALL_DEFINEn):
# the entry code casts the 64-bit register to the declared type, so an `int` argument is only
# its low 32 bits, while a seccomp filter sees the whole register (seccomp_data.args are u64).
# A 32-bit comparison must therefore look at the low half alone: `arg0 != SIGSYS` of
# rt_sigaction on the full register would let 0x1_0000001F through, which the kernel reads as
# SIGSYS.  A condition on an argument missing here is refused when the policy is read.
ARG_BITS: dict[tuple[str, int], int] = {
    ("rt_sigaction", 0): 32,       # int sig
    ("kill", 0): 32,               # pid_t pid
    ("kill", 1): 32,               # int sig
    ("fcntl", 1): 32,              # unsigned int cmd
    ("memfd_create", 1): 32,       # unsigned int flags
    ("ioctl", 1): 32,              # unsigned int cmd
    ("prctl", 0): 32,              # int option
    ("prctl", 1): 64,              # unsigned long arg2
    ("socket", 0): 32,             # int family
    ("socket", 1): 32,             # int type
    ("socketpair", 0): 32,         # int family
    ("socketpair", 1): 32,         # int type
    ("seccomp", 0): 32,            # unsigned int op
    ("tgkill", 2): 32,             # int sig
    ("openat", 2): 32,             # int flags
    ("mmap", 2): 64,               # unsigned long prot
    ("mprotect", 2): 64,           # unsigned long prot
    ("clone", 0): 64,              # unsigned long clone_flags
}
_U32 = (1 << 32) - 1

# Values known only once the daemon runs, written `$NAME` in a policy: the policy is checked at
# start with a placeholder and compiled again with the value when it is loaded.
VARIABLES = ("SUPERVISOR_PID",)    # the sandboxed supervisor, as its parent sees it
VARIABLE_PLACEHOLDER = 1

_OPS = {"==": pyseccomp.EQ, "!=": pyseccomp.NE, "<": pyseccomp.LT, "<=": pyseccomp.LE,
        ">": pyseccomp.GT, ">=": pyseccomp.GE}
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_INCLUDE = re.compile(r"@include\s+([A-Za-z0-9_-]+\.policy)")
_CMP = re.compile(r"arg([0-5])\s*(?:&\s*([^=!<>]+?)\s*)?(==|!=|<=|>=|<|>)\s*(.+)")
_U64 = (1 << 64) - 1


class PolicyError(Exception):
    """A policy that cannot be used; the message is one line `file:line: what is wrong`."""


@dataclass(frozen=True)
class Comparison:
    arg: int
    op: str
    value: int
    mask: int | None = None

    def to_args(self, bits: int) -> list[pyseccomp.Arg]:
        """libseccomp comparisons of which any one holding means this one holds, for an
        argument of `bits` bits (ARG_BITS)."""
        if bits == 64:
            if self.mask is not None:
                return [pyseccomp.Arg(self.arg, pyseccomp.MASKED_EQ, self.mask, self.value)]
            return [pyseccomp.Arg(self.arg, _OPS[self.op], self.value)]
        # Only the low 32 bits count: masks keep the high half out of every comparison.
        if self.mask is not None:
            return [pyseccomp.Arg(self.arg, pyseccomp.MASKED_EQ, self.mask & _U32, self.value)]
        if self.op == "==":
            return [pyseccomp.Arg(self.arg, pyseccomp.MASKED_EQ, _U32, self.value)]
        # `!=`: some bit of the low half differs from the value's.
        return [pyseccomp.Arg(self.arg, pyseccomp.MASKED_EQ, 1 << i, ~self.value & (1 << i))
                for i in range(32)]

    def holds(self, value: int, bits: int) -> bool:
        """What the comparison means for the argument the kernel receives (the reference the
        compiled filter is tested against)."""
        if bits == 32:
            value &= _U32
        if self.mask is not None:
            return value & self.mask == self.value
        return {"==": value == self.value, "!=": value != self.value, "<": value < self.value,
                "<=": value <= self.value, ">": value > self.value,
                ">=": value >= self.value}[self.op]


@dataclass(frozen=True)
class Rule:
    syscall: str
    where: str  # "policies/worker.policy:12"
    errno: int | None = None  # `return ERRNO`
    # Alternatives (OR) of conjunctions (AND); empty: allowed whatever the arguments.
    alternatives: tuple[tuple[Comparison, ...], ...] = ()

    def allows(self, args: Sequence[int]) -> bool:
        """Whether the call with these six argument registers is allowed by this rule."""
        if self.errno is not None:
            return False
        if not self.alternatives:
            return True
        return any(all(c.holds(args[c.arg], arg_bits(self.syscall, c.arg)) for c in alt)
                   for alt in self.alternatives)


@dataclass(frozen=True)
class Policy:
    role: str
    rules: tuple[Rule, ...]

    def rule(self, syscall: str) -> Rule | None:
        return next((r for r in self.rules if r.syscall == syscall), None)


# --- parsing ------------------------------------------------------------------------------------


def _read_policy_file(name: str) -> str:
    directory = os.environ.get(POLICY_DIR_ENV)
    if directory:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            return f.read()
    # The files next to the package's __init__ (an installed wheel or the source tree):
    # importlib.resources would cost the daemon's start-up its own imports (pathlib, zipfile).
    with open(os.path.join(os.path.dirname(policies.__file__), name), encoding="utf-8") as f:
        return f.read()


def _known_syscall(name: str) -> bool:
    return any(pyseccomp.resolve_syscall(arch, name) >= 0 for arch in ARCHES.values())


def _value(text: str, where: str, variables: Mapping[str, int] | None) -> int:
    total = 0
    for atom in text.split("|"):
        atom = atom.strip()
        if atom in CONSTANTS:
            total |= CONSTANTS[atom]
            continue
        if atom.startswith("$"):
            if atom[1:] not in VARIABLES:
                raise PolicyError(f"{where}: unknown variable {atom!r} (known: "
                                  f"{', '.join('$' + v for v in VARIABLES)})")
            total |= (variables or {}).get(atom[1:], VARIABLE_PLACEHOLDER)
            continue
        try:
            number = int(atom, 0)
        except ValueError:
            raise PolicyError(f"{where}: unknown constant {atom!r}") from None
        if not 0 <= number <= _U64:
            raise PolicyError(f"{where}: value {atom} does not fit in 64 bits")
        total |= number
    return total


def arg_bits(syscall: str, arg: int) -> int:
    """The declared width of `syscall`'s argument `arg` (KeyError if ARG_BITS lacks it)."""
    return ARG_BITS[(syscall, arg)]


def _condition(text: str, where: str, syscall: str,
               variables: Mapping[str, int] | None) -> tuple[tuple[Comparison, ...], ...]:
    alternatives = []
    for alternative in text.split("||"):
        comparisons: list[Comparison] = []
        for term in alternative.split("&&"):
            m = _CMP.fullmatch(term.strip())
            if not m:
                raise PolicyError(f"{where}: cannot parse condition {term.strip()!r} (expected "
                                  "argN OP VALUE or argN & MASK == VALUE)")
            arg, mask, op, value = int(m[1]), m[2], m[3], m[4]
            if any(c.arg == arg for c in comparisons):
                raise PolicyError(f"{where}: arg{arg} is compared twice in one alternative "
                                  "(libseccomp allows one comparison per argument)")
            if mask is not None and op != "==":
                raise PolicyError(f"{where}: a masked comparison must use == (arg{arg} & ... "
                                  f"{op})")
            cmp = Comparison(arg, op, _value(value, where, variables),
                             None if mask is None else _value(mask, where, variables))
            bits = ARG_BITS.get((syscall, arg))
            if bits is None:
                raise PolicyError(f"{where}: the width of {syscall} arg{arg} is not known (add "
                                  "it to ARG_BITS in common/seccomp.py)")
            if bits == 32:
                if cmp.value > _U32 or (cmp.mask or 0) > _U32:
                    raise PolicyError(f"{where}: {syscall} arg{arg} is a 32-bit argument; "
                                      f"{cmp.value:#x} does not fit in it")
                if op not in ("==", "!="):
                    raise PolicyError(f"{where}: {syscall} arg{arg} is a 32-bit argument: "
                                      f"compare it with == or != (or a mask), not {op}")
            comparisons.append(cmp)
        alternatives.append(tuple(comparisons))
    return tuple(alternatives)


def parse(text: str, name: str, read=_read_policy_file, _stack: tuple[str, ...] = (),
          variables: Mapping[str, int] | None = None) -> list[Rule]:
    """Rules of policy file `name` (its text given), includes expanded in place."""
    rules: list[Rule] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        where = f"policies/{name}:{lineno}"
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("@"):
            m = _INCLUDE.fullmatch(line)
            if not m:
                raise PolicyError(f"{where}: cannot parse {line!r} (expected @include "
                                  "NAME.policy)")
            included = m[1]
            if included in (*_stack, name):
                raise PolicyError(f"{where}: {included} includes itself")
            try:
                body = read(included)
            except OSError as e:
                raise PolicyError(f"{where}: cannot read {included}: {e.strerror or e}") from None
            rules.extend(parse(body, included, read, (*_stack, name), variables))
            continue
        syscall, sep, spec = line.partition(":")
        syscall, spec = syscall.strip(), spec.strip()
        if not sep or not spec:
            raise PolicyError(f"{where}: cannot parse {line!r} (expected SYSCALL: 1, "
                              "SYSCALL: CONDITION or SYSCALL: return ERRNO)")
        if not _NAME.fullmatch(syscall) or not _known_syscall(syscall):
            raise PolicyError(f"{where}: unknown syscall {syscall!r}")
        if spec == "1":
            rules.append(Rule(syscall, where))
        elif spec.startswith("return"):
            code = spec[len("return"):].strip()
            value = getattr(errno_mod, code, None) if code.isupper() else None
            if not isinstance(value, int):
                raise PolicyError(f"{where}: unknown errno {code!r} (expected a name such as "
                                  "EPERM)")
            rules.append(Rule(syscall, where, errno=value))
        else:
            rules.append(Rule(syscall, where,
                              alternatives=_condition(spec, where, syscall, variables)))
    return rules


def load_policy(role: str, variables: Mapping[str, int] | None = None) -> Policy:
    """Read and check `<role>.policy`; PolicyError names the file and line of any problem.
    `variables` gives the values of `$NAME`s (VARIABLES); without it they are placeholders,
    enough to check the policy before the values exist."""
    name = f"{role}.policy"
    try:
        text = _read_policy_file(name)
    except OSError as e:
        raise PolicyError(f"policies/{name}: cannot read: {e.strerror or e}") from None
    rules = parse(text, name, variables=variables)
    first: dict[str, Rule] = {}
    for rule in rules:
        if rule.syscall in first:
            raise PolicyError(f"{rule.where}: {rule.syscall!r} is already listed at "
                              f"{first[rule.syscall].where}")
        first[rule.syscall] = rule
    return Policy(role, tuple(rules))


# --- compiling and loading ------------------------------------------------------------------------


def compile_filter(policy: Policy, action: str, arch: int | None = None) -> pyseccomp.SyscallFilter:
    """A libseccomp filter for `policy` with `action` for everything else (not `none`).

    `arch` (an `ARCHES` value) builds the filter of another architecture, as the tests do to
    check both tables; by default it is the one this process runs on.
    """
    default = {"kill": pyseccomp.TRAP, "trap": pyseccomp.TRAP, "log": pyseccomp.LOG}[action]
    filt = pyseccomp.SyscallFilter(default)
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    try:
        # A binary tree instead of a list: cheaper for calls late in a long policy (2.5+).
        filt.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    except OSError:
        pass
    if arch is not None and arch != pyseccomp.system_arch():
        filt.add_arch(arch)
        filt.remove_arch(pyseccomp.Arch.NATIVE)
    for rule in policy.rules:
        try:
            if rule.errno is not None:
                filt.add_rule(pyseccomp.ERRNO(rule.errno), rule.syscall)
            elif not rule.alternatives:
                filt.add_rule(pyseccomp.ALLOW, rule.syscall)
            else:
                for alternative in rule.alternatives:
                    # A comparison may need several libseccomp ones joined by OR (a 32-bit
                    # `!=`): one rule per combination.
                    choices = [c.to_args(arg_bits(rule.syscall, c.arg)) for c in alternative]
                    for combination in itertools.product(*choices):
                        filt.add_rule(pyseccomp.ALLOW, rule.syscall, *combination)
        except OSError as e:
            raise PolicyError(f"{rule.where}: libseccomp refused the rule for {rule.syscall!r}: "
                              f"{e.strerror or e}") from None
    return filt


def check_policies(action: str) -> dict[str, pyseccomp.SyscallFilter]:
    """Parse and compile every role's policy (PolicyError on the first problem)."""
    return {role: compile_filter(load_policy(role), action) for role in ROLES}


def syscall_name(nr: int, arch: int) -> str:
    try:
        return pyseccomp.resolve_syscall(arch, nr).decode()
    except (ValueError, OSError):
        return "unknown"


def arch_name(arch: int) -> str:
    return next((name for name, token in ARCHES.items() if token == arch), f"arch {arch:#x}")


class SigsysReport:
    """Shared page the `kill` handler writes before its process dies: one slot per process.

    Slot layout (native endianness) `=IiII`: pid, syscall number, AUDIT_ARCH, count.  The pid is
    stored last, so a reader that finds its child's pid finds the number that goes with it.
    Created by the supervisor before anything forks; every process inherits it.
    """

    SLOT = struct.Struct("=IiII")
    SUPERVISOR = 0
    SPAWNER = 1

    def __init__(self, slots: int) -> None:
        size = max(mmap.PAGESIZE, self.SLOT.size * slots)
        self._map = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._base = native.address_of(self._map)
        self.slots = size // self.SLOT.size

    @staticmethod
    def worker_slot(queue: int) -> int:
        return 2 + queue

    def pointer(self, index: int):
        if not 0 <= index < self.slots:
            raise IndexError(index)
        return native.ffi.cast("struct vfs_sigsys_slot *", self._base + index * self.SLOT.size)

    def take(self, index: int, pid: int) -> tuple[int, int] | None:
        """(syscall number, arch) recorded by process `pid` in `index`, and clear the slot."""
        native.fence()
        got_pid, nr, arch, count = self.SLOT.unpack_from(self._map, index * self.SLOT.size)
        if got_pid != pid or not count:
            return None
        self.SLOT.pack_into(self._map, index * self.SLOT.size, 0, 0, 0, 0)
        return nr, arch

    def describe(self, index: int, pid: int) -> str:
        """` (seccomp refused system call N (name) on arch)`, or '' if nothing was recorded."""
        got = self.take(index, pid)
        if got is None:
            return ""
        nr, arch = got
        name = syscall_name(nr, arch)
        return f" (seccomp refused system call {nr} ({name}) on {arch_name(arch)})"


def install(filt: pyseccomp.SyscallFilter | None, action: str, who: str,
            report: SigsysReport | None = None, slot: int | None = None) -> None:
    """Load `filt` into this process (it then applies to every child it makes).

    With `kill`, the SIGSYS reporter goes in first; `who` begins its stderr line.
    """
    if filt is None or action == "none":
        return
    if action == "kill":
        pointer = report.pointer(slot) if report is not None and slot is not None \
            else native.ffi.NULL
        if native.lib.vfs_sigsys_install(pointer, os.getpid(), 2, who.encode()) != 0:
            err = native.ffi.errno
            raise OSError(err, f"cannot install the SIGSYS reporter: {os.strerror(err)}")
    filt.load()
