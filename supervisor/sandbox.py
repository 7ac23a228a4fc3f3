"""The sandbox: resource limits, namespaces or chroot, capabilities and seccomp, per process.

Order (DESIGN.md "Sandbox"), with virtiofsd's `--sandbox` semantics:

1. rlimits (`--rlimit-nofile`, virtiofsd's default rule; no core dumps unless
   PYVIRTIOFSD_CORE_DUMPS=1 asks for them).
2. `namespace` (default): unshare mount, pid, net, ipc and uts namespaces -- and a user namespace
   when not started as root, mapped from `--uid-map/--gid-map` (`:inside:outside:count:`, written
   by newuidmap/newgidmap when more than our own id is mapped).  The process that unshared stays
   outside the new pid namespace and only waits (`Parent`): it forwards signals, says how the
   sandboxed supervisor ended, and removes the socket and pid file it created.  The supervisor
   is pid 1 of the namespace; it makes every mount a slave of the host's (host mounts below
   the share still appear; nothing propagates back), creates a fresh read-only procfs that lists
   only its own namespace's processes (`subset=pid`), bind-mounts the share recursively, makes it
   the root with pivot_root and detaches the old root.
   `chroot` (root only): the same parent/supervisor split and pid namespace (the procfs must not
   show the host's processes: their /proc/PID/root leads out of any chroot), a fresh read-only
   procfs of it, then chroot into the share; no other namespace, so the share keeps the host's
   mount flags (mount it nodev,nosuid on the host).  `none`: no isolation, with a warning; for
   unprivileged use and debugging.
3. Capabilities: the spawner keeps only the workers' set (`WORKER_CAPS`, `--modcaps`) in its
   permitted, effective and bounding sets, and its workers inherit exactly that; the supervisor
   drops everything once its workers run; the parent keeps nothing.
4. In every child: PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, and the seccomp policy of its role
   (common/seccomp.py) loaded last.

Workers reach `/proc/self/fd` through the procfs fd made in step 2 (`proc_fd`), which is all the
procfs they can see.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import signal
from dataclasses import dataclass, field

import prctl

from pyvirtiofsd.common import native, seccomp
from pyvirtiofsd.common.seccomp import pyseccomp
from pyvirtiofsd.supervisor import log as logsetup
from pyvirtiofsd.supervisor import signals
from pyvirtiofsd.supervisor.config import (
    CAPABILITIES,
    Config,
    check_sandbox_options,
    default_rlimit_nofile,
)

log = logging.getLogger("pyvirtiofsd.sandbox")

CORE_DUMPS_ENV = "PYVIRTIOFSD_CORE_DUMPS"

# What file serving needs, as virtiofsd keeps it: ownership and mode changes on behalf of the
# guest, permission checks done by the kernel for the caller's fsuid, setfsuid/setfsgid and
# setgroups, file capabilities.  DAC_READ_SEARCH only for open_by_handle_at.  MKNOD only with
# --allow-device-nodes: since Linux 5.8 a whiteout (0:0) needs no capability, so without it a
# worker cannot make a device node at all -- not even one a compromised worker would open.
WORKER_CAPS = ("chown", "dac_override", "fowner", "fsetid", "setgid", "setuid", "setfcap")
DEVICE_CAP = "mknod"
FILE_HANDLE_CAP = "dac_read_search"
# The supervisor and the waiting parent keep none once set up.
SUPERVISOR_CAPS: tuple[str, ...] = ()

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_SLAVE = 0x1000, 0x4000, 1 << 19
MNT_DETACH = 2
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# The new mount API (Linux 5.2); the numbers are the same on every architecture.
SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT, SYS_MOUNT_SETATTR = 430, 431, 432, 442
AT_RECURSIVE = 0x8000
MS_REMOUNT = 32
FSOPEN_CLOEXEC, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE, FSMOUNT_CLOEXEC = 1, 1, 6, 1
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 1, 2, 4, 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.syscall.restype = ctypes.c_long


class SandboxError(Exception):
    """Set-up failed; the message is one line saying which step and why."""


def _check(res: int, what: str) -> int:
    if res < 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")
    return res


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount {target}")


# --- configuration checks (before anything starts) ----------------------------------------------


# The rules live with the configuration: they are checked before the socket listens, when
# this module is not imported yet.
check = check_sandbox_options


def _kernel_before(major: int, minor: int) -> bool:
    try:
        found = tuple(int(p) for p in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found < (major, minor)


def capability_numbers(names) -> frozenset[int]:
    return frozenset(CAPABILITIES.index(n) for n in names)


def worker_capabilities(config: Config) -> frozenset[int]:
    """The workers' capability set: virtiofsd's, edited by --modcaps (`+cap:-cap`)."""
    keep = set(WORKER_CAPS)
    if config.inode_file_handles != "never" or config.migration_mode == "file-handles":
        keep.add(FILE_HANDLE_CAP)
    if config.allow_device_nodes or _kernel_before(5, 8):
        keep.add(DEVICE_CAP)    # before 5.8 whiteouts need CAP_MKNOD too
    for item in (config.modcaps or "").split(":"):
        if item:
            (keep.add if item[0] == "+" else keep.discard)(item[1:].lower())
    return capability_numbers(keep)


# --- resource limits ----------------------------------------------------------------------------


def set_rlimit_nofile(requested: int | None) -> int:
    """virtiofsd's rule: None raises soft and hard to min(1000000, fs.nr_open) unless the soft
    limit is already higher (falling back to the hard limit, with a warning, when that is not
    permitted); N sets both to N or fails; 0 leaves the limit alone.  Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if requested == 0:
        return soft
    target = default_rlimit_nofile() if requested is None else requested
    if requested is None and soft >= target:
        return soft
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
    except (OSError, ValueError):
        nr_open = target
    if target > nr_open:
        raise SandboxError(f"--rlimit-nofile={target}: the kernel allows at most {nr_open} "
                           "(fs.nr_open)")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
        return target
    except (OSError, ValueError) as e:
        if requested is not None:
            raise SandboxError(f"--rlimit-nofile={target}: {getattr(e, 'strerror', None) or e}"
                               ) from None
    log.warning("cannot raise the open file limit to %d; using the hard limit (%d) instead",
                target, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def core_dumps_wanted() -> bool:
    return os.environ.get(CORE_DUMPS_ENV) == "1"


def limit_core_dumps() -> None:
    """No core dumps unless asked for: they would hold guest data and the daemon's memory."""
    if not core_dumps_wanted():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def set_dumpable() -> None:
    # Not dumpable also means: other processes of the same uid (a compromised worker) cannot
    # ptrace this one or open its /proc/PID files; that is why it is off without core dumps.
    prctl.set_dumpable(core_dumps_wanted())


# --- capabilities -------------------------------------------------------------------------------


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return max(prctl.ALL_CAPS)


LAST_CAP = _last_cap()


def limit_capabilities(keep: frozenset[int]) -> None:
    """Keep only `keep` in the bounding, permitted and effective sets; inheritable and ambient
    sets empty.  Capabilities this process does not have are simply not there."""
    if prctl.cap_effective.setpcap:
        for cap in range(LAST_CAP + 1):
            if cap not in keep and prctl.capbset_read(cap):
                prctl.capbset_drop(cap)
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient caps")
    known = [c for c in keep if c in prctl.ALL_CAPS]
    prctl.cap_inheritable.limit()
    prctl.cap_effective.limit(*known)
    prctl.cap_permitted.limit(*known)


# --- procfs -------------------------------------------------------------------------------------


def _syscall(nr: int, *args) -> int:
    return _libc.syscall(nr, *args)


def fresh_proc() -> int:
    """A new procfs instance, read-only, listing only processes (`subset=pid`), never attached
    to any directory: an O_PATH fd to its root.  Its pid namespace is the caller's."""
    fs = _check(_syscall(SYS_FSOPEN, b"proc", FSOPEN_CLOEXEC), "fsopen proc")
    try:
        # subset=pid (Linux 5.8) hides /proc/sys, /proc/kcore & co; older kernels lack it.
        _syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, b"subset", b"pid", 0)
        _check(_syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), "create procfs")
        return _check(_syscall(SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC,
                               MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
                               | MOUNT_ATTR_NOEXEC), "fsmount procfs")
    finally:
        os.close(fs)


def _proc_on_slash_proc() -> int:
    """The same without the new mount API: mounted over /proc of our own mount namespace."""
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        _mount("proc", "/proc", "proc", flags, "subset=pid")
    except SandboxError:
        _mount("proc", "/proc", "proc", flags)
    return os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


# --- namespaces ---------------------------------------------------------------------------------


def _parse_map(text: str) -> tuple[int, int, int]:
    inside, outside, count = (int(p) for p in text.strip(":").split(":"))
    return inside, outside, count


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise SandboxError(f"cannot write {path}: {e.strerror}") from None


@dataclass
class _IdMaps:
    """The user namespace's maps: virtiofsd's default is our own uid/gid, mapped to itself."""

    uid: list[tuple[int, int, int]]
    gid: list[tuple[int, int, int]]

    @classmethod
    def of(cls, config: Config) -> _IdMaps:
        uid, gid = os.geteuid(), os.getegid()
        return cls([_parse_map(m) for m in config.uid_map] or [(uid, uid, 1)],
                   [_parse_map(m) for m in config.gid_map] or [(gid, gid, 1)])

    def need_helper(self, kind: str) -> bool:
        """Anything but one id, ours, needs the setuid newuidmap/newgidmap (user_namespaces(7))."""
        maps, own = (self.uid, os.geteuid()) if kind == "uid" else (self.gid, os.getegid())
        return len(maps) != 1 or maps[0][1] != own or maps[0][2] != 1


def _run_map_helpers(maps: _IdMaps, pid: int) -> None:
    """newuidmap/newgidmap PID ... for the namespace `pid` just created (run from outside it)."""
    import subprocess  # only here, outside the sandbox: no other process needs it

    for kind, tool in (("uid", "newuidmap"), ("gid", "newgidmap")):
        if not maps.need_helper(kind):
            continue
        args = [str(v) for m in getattr(maps, kind) for v in m]
        try:
            done = subprocess.run([tool, str(pid), *args], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SandboxError(f"cannot run {tool}: {e}") from None
        if done.returncode != 0:
            raise SandboxError(f"{tool} failed: {' '.join(done.stderr.split()) or done.returncode}")


def _enter_user_namespace(maps: _IdMaps, flags: int) -> None:
    """unshare(flags | CLONE_NEWUSER) and map ids; writes our own single-id maps directly."""
    helper = 0
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    if maps.need_helper("uid") or maps.need_helper("gid"):
        # The helper stays in the parent user namespace: newuidmap must run from there.
        parent = os.getpid()
        helper = os.fork()
        if helper == 0:
            status = 1
            try:
                os.close(go_w)
                os.close(done_r)
                if os.read(go_r, 1) == b"g":
                    _run_map_helpers(maps, parent)
                    status = 0
            except SandboxError as e:
                os.write(done_w, str(e).encode()[:500])
            finally:
                os._exit(status)
    os.close(go_r)
    os.close(done_w)
    try:
        _check(_libc.unshare(flags | CLONE_NEWUSER), "unshare (user namespace)")
        if helper:
            os.write(go_w, b"g")
            os.close(go_w)
            go_w = -1
            why = os.read(done_r, 600).decode(errors="replace")
            _, status = os.waitpid(helper, 0)
            helper = 0
            if status != 0:
                raise SandboxError(why or "mapping ids in the user namespace failed")
        if not maps.need_helper("uid"):
            _write("/proc/self/uid_map", " ".join(map(str, maps.uid[0])) + "\n")
        if not maps.need_helper("gid"):
            # A single gid of our own may only be mapped with setgroups denied.
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/gid_map", " ".join(map(str, maps.gid[0])) + "\n")
    finally:
        if go_w >= 0:
            os.close(go_w)
        os.close(done_r)
        if helper:
            os.kill(helper, signal.SIGKILL)
            os.waitpid(helper, 0)
    # Act as root inside when root is mapped (virtiofsd); else stay who we are.
    if any(inside == 0 for inside, _, _ in maps.gid):
        os.setresgid(0, 0, 0)
    if any(inside == 0 for inside, _, _ in maps.uid):
        os.setresuid(0, 0, 0)


def _pivot_into(share: str) -> None:
    """Make `share` (already a mount point) the root; detach the old root."""
    old_root = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new_root = os.open(share, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new_root)
        nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "pivot_root")
        # pivot_root(".", "."): the old root ends up mounted on top of the new one, where
        # it is reached through old_root and detached.
        _check(_syscall(nr, b".", b"."), "pivot_root")
        os.fchdir(old_root)
        _mount(None, ".", None, MS_SLAVE | MS_REC)
        _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
        os.fchdir(new_root)
        os.chdir("/")
    finally:
        os.close(old_root)
        os.close(new_root)


class _MountAttr(ctypes.Structure):
    """struct mount_attr (linux/mount.h, mount_setattr(2))."""
    _fields_ = (("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64))


def _nodev_nosuid(path: str) -> None:
    """Mark every mount at and below `path` (in our own mount namespace) nodev and nosuid.

    The daemon never opens a device node or runs a program, so neither costs it anything,
    and a compromised worker then cannot open a device node it made or found in the share
    (the host's disk, /dev/kmsg), nor gain from a set-id program.  The guest is not
    affected: it opens its devices and runs its programs in its own kernel.  Mounts that
    appear below the share later (propagated from the host) keep the host's flags, which is
    why the host should mount the share nodev,nosuid as well (README "Security model")."""
    attr = _MountAttr(MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID, 0, 0, 0)
    res = _syscall(SYS_MOUNT_SETATTR, -100, os.fsencode(path), AT_RECURSIVE,
                   ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    if res == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        _check(res, f"mount_setattr nodev,nosuid {path}")
    # Before Linux 5.12: a remount of the top mount, keeping the flags it has (a user
    # namespace may not clear the ones it inherited locked).
    # ST_RDONLY..ST_RELATIME have the values of the MS_* flags they report.
    flags = os.statvfs(path).f_flag & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | 0x1C50)
    _mount(None, path, None, flags | MS_REMOUNT | MS_BIND | MS_NODEV | MS_NOSUID)
    log.warning("this kernel has no mount_setattr: mounts below %s keep their own "
                "nodev/nosuid flags", path)


def _same_dir(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# --- the sandbox ----------------------------------------------------------------------------


@dataclass
class Sandbox:
    """What every process of the daemon needs to confine itself, made before anything forks."""

    config: Config
    max_queues: int
    filters: dict[str, pyseccomp.SyscallFilter] = field(default_factory=dict)
    report: seccomp.SigsysReport | None = None
    worker_caps: frozenset[int] = frozenset()
    proc_fd: int = -1
    share_path: str = ""   # the share as this process sees it once inside

    def __post_init__(self) -> None:
        self.mode = self.config.sandbox
        self.action = self.config.seccomp
        self.worker_caps = worker_capabilities(self.config)
        self.report = seccomp.SigsysReport(2 + self.max_queues)
        self.share_path = self.config.shared_dir

    def compile_policies(self) -> None:
        """Parse and compile every role's policy now: a broken one stops the start (PolicyError)."""
        if self.action != "none":
            self.filters = seccomp.check_policies(self.action)

    # -- the supervisor's set-up ------------------------------------------------------------
    def enter(self) -> int:
        """Enter the sandbox.  Returns 0 in the process that goes on to serve, or, in the parent
        left outside (namespace and chroot modes), the pid of the sandboxed supervisor."""
        set_rlimit_nofile(self.config.rlimit_nofile)
        limit_core_dumps()
        if self.mode == "none":
            log.warning("--sandbox=none: no isolation; the daemon can reach every file its user "
                        "can (meant for unprivileged use and debugging)")
            self.proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            return 0
        if self.mode == "namespace" or self.mode == "chroot":
            # Only the pid namespace (and the user namespace) is entered before forking: the
            # parent must keep the host's mounts to remove the socket at the end; the child is
            # the new pid namespace's first process.  chroot mode needs it as much: a procfs
            # of the host's pid namespace leads out of any chroot through /proc/PID/root and
            # /proc/PID/cwd of every process a worker may act as the owner of.
            if os.geteuid() != 0:
                try:
                    _enter_user_namespace(_IdMaps.of(self.config), CLONE_NEWPID)
                except SandboxError as e:
                    if "unshare" in str(e):
                        raise SandboxError(f"{e} (unprivileged user namespaces may be disabled "
                                           "here: see user.max_user_namespaces, or use "
                                           "--sandbox=none)") from None
                    raise
            else:
                _check(_libc.unshare(CLONE_NEWPID), "unshare (pid namespace)")
        share = os.path.realpath(self.config.shared_dir)
        # The parent left outside keeps the pages of everything imported so far, shared with the
        # supervisor only until one of the two writes to them: the first garbage collection in
        # the supervisor would write to every object's header, and the parent would be left
        # holding a private copy of the whole heap (native.settle_memory).
        native.settle_memory()
        pid = os.fork()
        if pid:
            return pid
        try:
            prctl.set_pdeathsig(signal.SIGKILL)
            prctl.set_name("pyvfs-sup")
            if self.mode == "namespace":
                _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS),
                       "unshare")
                self._set_up_namespace(share)
            else:
                self._set_up_chroot(share)
            try:
                # Supplementary groups of the invoking root mean nothing to the guest.
                os.setgroups([])
            except PermissionError:
                pass     # a user namespace with setgroups denied: there are none
        except (SandboxError, OSError) as e:
            log.error("cannot set up the %s sandbox: %s", self.mode,
                      e if isinstance(e, SandboxError) else (e.strerror or e))
            os._exit(1)
        self.share_path = "/"
        return 0

    def _set_up_namespace(self, share: str) -> None:
        _mount(None, "/", None, MS_SLAVE | MS_REC)
        try:
            self.proc_fd = fresh_proc()
        except SandboxError:
            self.proc_fd = _proc_on_slash_proc()
        if _same_dir(share, "/"):
            _nodev_nosuid("/")
            return    # sharing the root itself: nothing to pivot to
        _mount(share, share, None, MS_BIND | MS_REC)
        _nodev_nosuid(share)
        _pivot_into(share)

    def _set_up_chroot(self, share: str) -> None:
        # The procfs of the new pid namespace, never the host's (see enter()): without the
        # new mount API (Linux 5.2) there is no way to make one outside a mount namespace.
        try:
            self.proc_fd = fresh_proc()
        except SandboxError as e:
            raise SandboxError(f"{e} (a private procfs is needed; use --sandbox=namespace)"
                               ) from None
        os.chroot(share)
        os.chdir("/")

    # -- the parent left outside ------------------------------------------------------------
    def wait(self, child: int) -> int:
        """In the parent: forward signals until the sandboxed supervisor exits; its status."""
        logsetup.set_role("sandbox parent")
        set_dumpable()
        limit_capabilities(frozenset())
        # Its filter allows installing its handlers (rt_sigaction, rt_sigprocmask) below.
        self.confine_parent(child)

        def forward(signum: int, _frame: object) -> None:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

        # The child blocks these from birth (supervisor/signals.py): one forwarded before its
        # handlers exist waits for them.
        signals.handled_by(dict.fromkeys(signals.HANDLED, forward))
        _, status = os.waitpid(child, 0)
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        sig = os.WTERMSIG(status)
        assert self.report is not None
        why = self.report.describe(seccomp.SigsysReport.SUPERVISOR, child) \
            if sig == signal.SIGSYS else ""
        log.error("the supervisor (pid %d) was killed by %s%s", child, _signame(sig), why)
        return 128 + sig

    # -- per process, once set up -----------------------------------------------------------
    def confine_parent(self, child: int) -> None:
        """The parent left outside: no new privileges and its own filter (policies/
        parent.policy, compiled again now that the supervisor's pid is known: signals go to
        it only).  A refused call kills the parent with a line on stderr; the supervisor then
        gets SIGKILL (its parent-death signal)."""
        prctl.set_no_new_privs(1)
        if self.action == "none":
            return
        policy = seccomp.load_policy("parent", {"SUPERVISOR_PID": child})
        seccomp.install(seccomp.compile_filter(policy, self.action), self.action,
                        "pyvirtiofsd sandbox parent")

    def confine_supervisor(self) -> None:
        """After the spawner and workers started: no capabilities, no new privileges, filter."""
        prctl.set_no_new_privs(1)
        set_dumpable()
        limit_capabilities(capability_numbers(SUPERVISOR_CAPS))
        self._load("supervisor", seccomp.SigsysReport.SUPERVISOR)

    def confine_spawner(self) -> None:
        prctl.set_pdeathsig(signal.SIGKILL)
        prctl.set_no_new_privs(1)
        set_dumpable()
        limit_capabilities(self.worker_caps)
        self._load("spawner", seccomp.SigsysReport.SPAWNER)

    def confine_worker(self, queue: int) -> None:
        """Last step before a worker serves: it inherited the spawner's capabilities and filter;
        its own filter narrows that."""
        prctl.set_no_new_privs(1)
        self._load("worker", seccomp.SigsysReport.worker_slot(queue), f"worker q{queue}")

    def _load(self, role: str, slot: int, who: str | None = None) -> None:
        seccomp.install(self.filters.get(role), self.action, f"pyvirtiofsd {who or role}",
                        self.report, slot)


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
