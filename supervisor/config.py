"""Command line and TOML configuration, compatible with virtiofsd 1.13.

Every option virtiofsd accepts is accepted here with the same name, values and default, so the
daemon is a drop-in for container runtimes and libvirt. Values are validated when parsed (a bad
value is one `pyvirtiofsd: error: ...` line and exit status 2, never a traceback); what needs the
filesystem (does the shared directory exist, is the socket in use) is `check_startup`'s job.

Precedence: built-in defaults < `--config FILE` < command line < `-o` compat options (virtiofsd
applies `-o` after all other flags) < `-d`.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import grp
import os
import re
import socket
import stat
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from pyvirtiofsd import __version__
from pyvirtiofsd.common import idmap, xattrmap
from pyvirtiofsd.worker import engine

PROG = "pyvirtiofsd"

# virtiofsd's MAX_TAG_LEN: the tag field of struct virtio_fs_config (virtio spec 5.11.4).
MAX_TAG_LEN = 36
MAX_REQUEST_QUEUES = 64
MAX_QUEUE_SIZE = 32768  # virtio spec 2.7: split queue size is a power of two up to 32768

# `--print-capabilities` output (vhost-user.json schema, read by libvirt to learn the backend
# type and which options it may pass separately): virtiofsd's, byte for byte.  "migrate-precopy"
# promises libvirt that the domain can be live-migrated: the daemon moves its device state
# (DEVICE_STATE, worker/migration.py) and logs the pages it dirties (LOG_SHMFD), which
# tests/test_guest_migration.py shows with QEMU 10.
CAPABILITIES_JSON = """{
  "type": "fs",
  "features": [
    "migrate-precopy",
    "separate-options"
  ]
}
"""


class ConfigError(Exception):
    """A configuration problem; the message is one line saying what to fix."""


class CacheMode(enum.StrEnum):
    AUTO = "auto"
    ALWAYS = "always"
    METADATA = "metadata"
    NEVER = "never"


LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "off")
SANDBOX_MODES = ("namespace", "chroot", "none")
SECCOMP_ACTIONS = ("kill", "log", "trap", "none")
DATA_PLANES = ("native", "python")
MAX_POLL_US = 1_000_000
DAX_DEFAULT_WINDOW = 8 << 30          # cloud-hypervisor's default cache_size
INODE_FILE_HANDLES = ("never", "prefer", "mandatory")
MIGRATION_MODES = ("find-paths", "file-handles")
MIGRATION_ON_ERROR = ("abort", "guest-error")
# The device state written on a migration's source (SET_DEVICE_STATE_FD SAVE): pyvirtiofsd's own
# (docs/state-format.md), or the Rust virtiofsd 1.13's for a virtiofsd destination
# (docs/rust-state-format.md).  QEMU moves the state as opaque bytes and the two back-ends never
# talk, so nothing tells the source what the destination reads: the operator does.  Loading
# needs no option, the two formats differ in their first byte.
MIGRATION_STATE_FORMATS = ("pyvirtiofsd", "virtiofsd")
# Linux capability names (linux/capability.h, without CAP_), for --modcaps.
CAPABILITIES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
    "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod",
    "lease", "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog",
    "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)


@dataclass(frozen=True)
class Config:
    """The validated configuration. Field names are the long option names with '_' for '-'."""

    socket_path: str | None = None
    fd: int | None = None
    socket_group: str | None = None
    shared_dir: str = ""
    tag: str | None = None
    cache: CacheMode = CacheMode.AUTO
    readonly: bool = False
    # Effective value: --posix-acl, --security-label and --xattrmap all turn it on (virtiofsd).
    xattr: bool = False
    posix_acl: bool = False
    announce_submounts: bool = True
    readdirplus: bool = True
    # File locks served on the host (worker/locks.py); virtiofsd answers ENOSYS instead.
    posix_lock: bool = True
    flock: bool = True
    writeback: bool = False
    allow_direct_io: bool = False
    allow_mmap: bool = False
    # MKNOD of block and character devices (the guest may not make host devices otherwise).
    allow_device_nodes: bool = False
    thread_pool_size: int = 0
    # None: virtiofsd's rule, min(1000000, /proc/sys/fs/nr_open); 0 leaves the limit alone.
    rlimit_nofile: int | None = None
    log_level: str = "info"
    syslog: bool = False
    sandbox: str = "namespace"
    seccomp: str = "kill"
    modcaps: str | None = None
    uid_map: tuple[str, ...] = ()  # canonical ":inside:outside:count:"
    gid_map: tuple[str, ...] = ()
    killpriv_v2: bool = False
    inode_file_handles: str = "never"
    xattrmap: str | None = None
    security_label: bool = False
    translate_uid: tuple[str, ...] = ()  # canonical "type:a:b[:c]"
    translate_gid: tuple[str, ...] = ()
    preserve_noatime: bool = False
    migration_mode: str = "find-paths"
    migration_on_error: str = "abort"
    migration_verify_handles: bool = False
    migration_confirm_paths: bool = False
    # pyvirtiofsd's own options.
    request_queues: int = 1
    queue_size: int = 1024
    reconnect: bool = False
    # Who serves the rings: the C request engine (worker/engine.c) or the Python reference.
    data_plane: str = "native"
    # A UNIX socket serving status and Prometheus metrics (supervisor/status.py); None: none.
    metrics_socket: str | None = None
    # Busy-poll the avail ring this long (µs) before sleeping; 0: never (native plane only).
    poll_us: int = 0
    # DAX (supervisor/dax.py): offered when the front-end has a cache window; its size.
    dax: bool = False
    dax_window: int = DAX_DEFAULT_WINDOW
    # Which daemon's device-state format a migration source writes (MIGRATION_STATE_FORMATS).
    migration_state_format: str = "pyvirtiofsd"
    # A state file (`pyvirtiofsd snapshot`) loaded before the front-end is accepted
    # (supervisor/snapshot.py); None: start with no state.
    restore_from: str | None = None
    config_file: str | None = None
    # Deprecated spellings that were used; the supervisor logs one warning line for each.
    deprecations: tuple[str, ...] = field(default=(), compare=False)

    @property
    def use_readdirplus(self) -> bool:
        # virtiofsd never offers READDIRPLUS with cache=never: the entries would expire at once.
        return self.readdirplus and self.cache != CacheMode.NEVER

    @property
    def cache_timeout(self) -> float:
        """Entry and attribute timeout in seconds, as virtiofsd derives it from the cache mode."""
        return {CacheMode.NEVER: 0.0, CacheMode.AUTO: 1.0}.get(self.cache, 86400.0)

    def unimplemented(self) -> list[str]:
        """Options that are set but that the daemon does not act on yet, as command-line text."""
        out: list[str] = []
        # None left: the --migration-* options act on device-state migration
        # (worker/migration.py), and --inode-file-handles prefer/mandatory keep inodes as file
        # handles (common/state.c).  An option accepted before it is acted on goes here.
        return out


# Fields that are not options: never in a config file.
NON_FILE_FIELDS = frozenset({"config_file", "deprecations"})
FILE_KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in NON_FILE_FIELDS)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


class Action(enum.Enum):
    """A command line that asks for output instead of a daemon."""

    HELP = "help"
    VERSION = "version"
    PRINT_CAPABILITIES = "print-capabilities"

    def output(self) -> str:
        if self is Action.VERSION:
            return f"{PROG} {__version__}\n"
        if self is Action.PRINT_CAPABILITIES:
            return CAPABILITIES_JSON
        return _build_parser().format_help()


# --- value converters: str (command line) or TOML scalar -> normalised value, ValueError ------


def _show(value: object) -> str:
    """A value quoted for an error message, on one line whatever it contains."""
    text = repr(value)
    return text if isinstance(value, str) else f"'{text}'"


def _choice(choices: Sequence[str], *, fold: bool = False,
            aliases: dict[str, str] | None = None) -> Callable[[str], str]:
    def convert(value: str) -> str:
        key = value.lower() if fold else value
        key = (aliases or {}).get(key, key)
        if key not in choices:
            raise ValueError(f"invalid value {_show(value)} (expected {', '.join(choices)})")
        return key
    return convert


def _uint(lo: int = 0, hi: int = (1 << 64) - 1) -> Callable[[str | int], int]:
    def convert(value: str | int) -> int:
        if isinstance(value, str):
            if not re.fullmatch(r"[0-9]+", value):
                raise ValueError(f"invalid value {_show(value)} (expected a decimal number)")
            value = int(value)
        if not lo <= value <= hi:
            raise ValueError(f"value {value} out of range ({lo}..{hi})")
        return value
    return convert


_DAX_RANGE = 2 << 20                  # FUSE_DAX_SZ: the Linux driver maps 2 MiB ranges
_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _dax_window(value: str) -> int:
    m = re.fullmatch(r"([0-9]+)([kKmMgGtT]?)(?:i?[bB])?", value)
    if not m:
        raise ValueError(f"invalid size {_show(value)} (expected bytes, or a number with K, M,"
                         " G or T)")
    size = int(m.group(1)) * _SIZE_SUFFIX[m.group(2).lower()]
    if not _DAX_RANGE <= size < 1 << 63 or size % _DAX_RANGE:
        raise ValueError(f"window size {size} is not a non-zero multiple of 2 MiB (the guest"
                         " maps 2 MiB ranges)")
    return size


def _queue_size(value: str | int) -> int:
    size = _uint(2, MAX_QUEUE_SIZE)(value)
    if size & (size - 1):
        raise ValueError(f"value {size} is not a power of two")
    return size


def _nonempty(value: str) -> str:
    if not value:
        raise ValueError("value must not be empty")
    if "\0" in value:
        raise ValueError(f"value {_show(value)} contains a NUL byte")
    return value


def _tag(value: str) -> str:
    size = len(value.encode("utf-8", "surrogateescape"))
    if not 1 <= size <= MAX_TAG_LEN or "\n" in value or "\0" in value:
        raise ValueError(f"invalid tag {_show(value)} (1 to {MAX_TAG_LEN} bytes, no newline)")
    return value


def _id_map(value: str) -> str:
    # `:inside:outside:count:` with any non-alphanumeric delimiter, the same at both ends.
    if len(value) < 2 or value[0] != value[-1] or value[0].isalnum():
        raise ValueError(f"invalid map {_show(value)} (expected :inside:outside:count:)")
    parts = value[1:-1].split(value[0])
    if len(parts) != 3 or not all(re.fullmatch(r"[0-9]+", p) and int(p) < 1 << 32
                                  for p in parts):
        raise ValueError(f"invalid map {_show(value)} (expected :inside:outside:count:)")
    return ":" + ":".join(str(int(p)) for p in parts) + ":"


def _translate(value: str) -> str:
    # virtiofsd's syntax and messages (common/idmap.py); normalised to "type:a:b[:c]".
    try:
        return str(idmap.Rule.parse(value))
    except idmap.IdMapError as e:
        raise ValueError(str(e)) from None


def _thread_pool_size(value: str | int) -> int:
    # virtiofsd: 0 serves a queue in its own thread, N hands its requests to N threads.  Here
    # one worker process serves each queue, one request at a time: 0 and 1 both say exactly
    # that; more is refused rather than ignored (--request-queues gives parallel requests).
    size = _uint()(value)
    if size > 1:
        raise ValueError(f"value {size} is not supported: each queue is served by one worker "
                         "process, one request at a time (0 or 1); use --request-queues=N for "
                         "requests served in parallel")
    return size


def _modcaps(value: str) -> str:
    for item in value.split(":"):
        if len(item) < 2 or item[0] not in "+-":
            raise ValueError(f"invalid entry {_show(item)} in {_show(value)} "
                             "(expected +cap or -cap, separated by ':')")
        if item[1:].lower() not in CAPABILITIES:
            raise ValueError(f"unknown capability {_show(item[1:])}")
    return value


def _xattrmap(value: str) -> str:
    """An xattr mapping (common/xattrmap.py): rules `:type:scope:key:prepend:` or
    `:map:key:prepend:`, each with its own delimiter, separated by whitespace; only the last
    rule may be `map`."""
    xattrmap.parse(value)       # XattrMapError is a ValueError
    return value


# Field -> converter for one string (or TOML scalar) value. Bool fields take no converter.
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "socket_path": _nonempty,
    "fd": _uint(0, (1 << 31) - 1),
    "socket_group": _nonempty,
    "shared_dir": _nonempty,
    "tag": _tag,
    "cache": lambda v: CacheMode(_choice(list(CacheMode), fold=True)(v)),
    "thread_pool_size": _thread_pool_size,
    "rlimit_nofile": _uint(),
    "log_level": _choice(LOG_LEVELS, fold=True),
    "sandbox": _choice(SANDBOX_MODES, fold=True),
    "seccomp": _choice(SECCOMP_ACTIONS),
    "modcaps": _modcaps,
    "uid_map": _id_map,
    "gid_map": _id_map,
    # "fallback" is kept here and turned into "prefer" (with a deprecation notice) in parse().
    "inode_file_handles": _choice((*INODE_FILE_HANDLES, "fallback")),
    "xattrmap": _xattrmap,
    "translate_uid": _translate,
    "translate_gid": _translate,
    "migration_mode": _choice(MIGRATION_MODES),
    "migration_on_error": _choice(MIGRATION_ON_ERROR),
    "request_queues": _uint(1, MAX_REQUEST_QUEUES),
    "queue_size": _queue_size,
    "data_plane": _choice(DATA_PLANES),
    "metrics_socket": _nonempty,
    "poll_us": _uint(0, MAX_POLL_US),
    "dax_window": _dax_window,
    "migration_state_format": _choice(MIGRATION_STATE_FORMATS),
    "restore_from": _nonempty,
}
_LIST_FIELDS = frozenset({"uid_map", "gid_map", "translate_uid", "translate_gid"})
_INT_FIELDS = frozenset({"fd", "thread_pool_size", "rlimit_nofile", "request_queues", "poll_us",
                         "queue_size"})
_BOOL_FIELDS = frozenset(k for k, v in _DEFAULTS.items() if isinstance(v, bool))


# --- command line -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            message += f" (see {PROG} --help)"
        raise ConfigError(" ".join(message.split("\n")))

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise ConfigError(message or f"exit {status}")


def _arg_type(name: str) -> Callable[[str], Any]:
    convert = _CONVERTERS[name]

    def parse_value(value: str) -> Any:
        try:
            return convert(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse_value.__name__ = name  # argparse names the type in some messages
    return parse_value


def _build_parser() -> _Parser:
    p = _Parser(prog=PROG, add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS,
                description="vhost-user virtio-fs device daemon (virtiofsd compatible).",
                epilog=f"{PROG} status SOCKET-or-PIDFILE [--json] shows what a running daemon"
                       " is doing (processes, requests, errors, in-flight, restarts, inodes).")
    def value(name: str, help: str, *, opt: str | None = None, dest: str | None = None,
              **kw: Any) -> None:
        p.add_argument(opt or _opt(name), dest=dest or name, type=_arg_type(name),
                       metavar=name.upper(), help=help, **kw)

    def flag(name: str, help: str, *, const: bool = True, opt: str | None = None) -> None:
        p.add_argument(opt or _opt(name), dest=name, action="store_const", const=const,
                       help=help)

    p.add_argument("-h", "--help", dest="action_help", action="store_true", help="print help")
    p.add_argument("-V", "--version", dest="action_version", action="store_true",
                   help="print version")
    p.add_argument("--print-capabilities", dest="action_caps", action="store_true",
                   help="print vhost-user.json backend program capabilities and exit")
    p.add_argument("--config", dest="config_file", metavar="FILE",
                   help="read options from a TOML file; the command line overrides it")
    value("shared_dir", "shared directory path")
    value("tag", "the tag that the virtio device advertises")
    value("socket_path", "[deprecated] vhost-user socket path", opt="--socket", dest="socket")
    value("socket_path", "vhost-user socket path")
    value("socket_group", "name of group for the vhost-user socket")
    value("fd", "file descriptor for the listening (not yet connected) socket")
    value("thread_pool_size", "threads serving each queue: 0 or 1, each queue's worker process "
          "serves its requests one at a time (a lock request that must wait waits in a thread "
          "of its own) [default: 0]")
    flag("xattr", "enable support for extended attributes")
    flag("posix_acl", "enable support for posix ACLs (implies --xattr)")
    value("xattrmap", "rules translating extended attributes between host and guest")
    value("sandbox", "sandbox mechanism: namespace, chroot, none [default: namespace]")
    flag("readonly", "prevent the guest from making modifications to the filesystem")
    value("seccomp", "action on a disallowed syscall: none, kill, log, trap [default: kill]")
    flag("announce_submounts", "tell the guest which directories are mount points [default]")
    flag("announce_submounts", "do not tell the guest which directories are mount points",
         const=False, opt="--no-announce-submounts")
    value("inode_file_handles", "use file handles for inodes: never, prefer, mandatory "
          "[default: never]")
    value("cache", "caching policy: auto, always, never, metadata [default: auto]")
    flag("allow_mmap", "allow shared mmap with --cache=metadata or never")
    flag("allow_device_nodes", "let the guest create block and character device nodes "
         "[default: refused, EPERM; overlayfs whiteouts (0:0) are always allowed]")
    flag("readdirplus", "disable support for READDIRPLUS operations", const=False,
         opt="--no-readdirplus")
    flag("posix_lock", "do not take the guest's POSIX (fcntl) locks on the host; the guest "
         "kernel then keeps them to itself", const=False, opt="--no-posix-lock")
    flag("flock", "do not take the guest's flock(2) locks on the host; the guest kernel then "
         "keeps them to itself", const=False, opt="--no-flock")
    flag("writeback", "enable writeback cache")
    flag("allow_direct_io", "honor the O_DIRECT flag passed down by guest applications")
    value("modcaps", "modify the list of capabilities, e.g. --modcaps=+sys_admin:-chown")
    value("log_level", "log level: error, warn, info, debug, trace, off [default: info]")
    flag("syslog", "log to syslog [default: stderr]")
    value("rlimit_nofile", "maximum number of file descriptors (0 leaves it unchanged)")
    p.add_argument("-o", dest="compat_options", action="append", metavar="COMPAT_OPTIONS",
                   help="[deprecated] options in the legacy format")
    p.add_argument("-d", dest="compat_debug", action="store_true",
                   help='[deprecated] set log level to "debug"')
    flag("killpriv_v2", "disable KILLPRIV V2 support [default]", const=False,
         opt="--no-killpriv-v2")
    flag("killpriv_v2", "enable KILLPRIV V2 support")
    p.add_argument("-f", dest="compat_foreground", action="store_true",
                   help="[deprecated] no effect")
    flag("security_label", "enable security label support (implies --xattr)")
    value("uid_map", "map a host UID range into the namespace (:inside:outside:count:)",
          action="append")
    value("gid_map", "map a host GID range into the namespace (:inside:outside:count:)",
          action="append")
    value("translate_uid", "translate UIDs between guest and host (TYPE:BASE:BASE:COUNT)",
          action="append")
    value("translate_gid", "translate GIDs between guest and host (TYPE:BASE:BASE:COUNT)",
          action="append")
    flag("preserve_noatime", "preserve O_NOATIME instead of clearing it")
    value("migration_mode", "find-paths or file-handles [default: find-paths]")
    value("migration_on_error", "abort or guest-error [default: abort]")
    flag("migration_verify_handles", "find-paths migration: verify inodes by file handle")
    flag("migration_confirm_paths", "find-paths migration: re-check paths at switch-over")
    value("request_queues", f"number of request queues, 1..{MAX_REQUEST_QUEUES} [default: 1]")
    value("queue_size", f"largest virtqueue size accepted, a power of two up to "
          f"{MAX_QUEUE_SIZE} [default: 1024]")
    flag("reconnect", "keep state and wait for the next frontend after a disconnect")
    value("data_plane", "who serves the virtqueues: native (the C request engine) or python "
          "(the reference implementation) [default: native]")
    value("metrics_socket", "also serve status (GET /status) and Prometheus metrics"
          " (GET /metrics) on this UNIX socket")
    value("poll_us", "busy-poll each ring this many microseconds before sleeping, adapting "
          "to how often it finds work; native data plane only [default: 0, never]")
    flag("dax", "offer DAX (file ranges mapped into the front-end's cache window) when the "
         "front-end has a window: cloud-hypervisor's cache_size, or VIRTIO shared memory "
         "regions (GET_SHMEM_CONFIG) [default: off]")
    value("restore_from", "load the filesystem state (nodeids, open handles, FUSE session) "
          "that `pyvirtiofsd snapshot` saved to this file before accepting the front-end")
    value("dax_window", "size of the cache window, as cloud-hypervisor's cache_size, and the "
          "shared memory region offered to SHMEM front-ends; a multiple of 2M [default: 8G]")
    value("migration_state_format", "device state a migration source writes: pyvirtiofsd, or "
          "virtiofsd for a Rust virtiofsd 1.13 destination (loading reads either) "
          "[default: pyvirtiofsd]")
    return p


# -o compat options, as virtiofsd's legacy parser maps them (and the C daemon's posix_lock and
# flock, which virtiofsd refuses because it does not implement locks; this daemon does).
_COMPAT_FLAGS: dict[str, tuple[str, bool]] = {
    "xattr": ("xattr", True), "no_xattr": ("xattr", False),
    "readdirplus": ("readdirplus", True), "no_readdirplus": ("readdirplus", False),
    "writeback": ("writeback", True), "no_writeback": ("writeback", False),
    "allow_direct_io": ("allow_direct_io", True),
    "no_allow_direct_io": ("allow_direct_io", False),
    "announce_submounts": ("announce_submounts", True),
    "killpriv_v2": ("killpriv_v2", True), "no_killpriv_v2": ("killpriv_v2", False),
    "posix_acl": ("posix_acl", True), "no_posix_acl": ("posix_acl", False),
    "security_label": ("security_label", True), "no_security_label": ("security_label", False),
    "posix_lock": ("posix_lock", True), "no_posix_lock": ("posix_lock", False),
    "flock": ("flock", True), "no_flock": ("flock", False),
}
_COMPAT_NOOPS: frozenset[str] = frozenset()
_COMPAT_LOG_LEVEL = _choice(["debug", "info", "warn", "error"], aliases={"err": "error"})
_COMPAT_VALUES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "source": ("shared_dir", _nonempty),
    "xattrmap": ("xattrmap", _xattrmap),
    "modcaps": ("modcaps", _modcaps),
    "cache": ("cache", lambda v: CacheMode(
        _choice(["auto", "always", "metadata", "never"], aliases={"none": "never"})(v))),
    # `loglevel` is virtiofsd's spelling, `log_level` the C daemon's; the values are the C ones.
    "loglevel": ("log_level", _COMPAT_LOG_LEVEL),
    "log_level": ("log_level", _COMPAT_LOG_LEVEL),
    "sandbox": ("sandbox", _choice(["namespace", "chroot"])),
}


def _apply_compat(values: dict[str, Any], lines: list[str]) -> None:
    for line in lines:
        for option in line.split(","):
            if "=" in option:
                key, _, raw = option.partition("=")
                if key not in _COMPAT_VALUES:
                    raise ConfigError(f"invalid compat argument '-o {option}'")
                name, convert = _COMPAT_VALUES[key]
                try:
                    values[name] = convert(raw)
                except ValueError as e:
                    raise ConfigError(f"-o {key}: {e}") from None
            elif option in _COMPAT_FLAGS:
                name, on = _COMPAT_FLAGS[option]
                values[name] = on
            elif option not in _COMPAT_NOOPS:
                raise ConfigError(f"invalid compat argument '-o {option}'")


# --- config file --------------------------------------------------------------------------------


def load_file(path: str) -> dict[str, Any]:
    """Read a TOML config file into {field: normalised value}; ConfigError names key and file."""
    import tomli  # only with --config: nothing else needs it before the socket listens

    try:
        with open(path, "rb") as f:
            data = tomli.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomli.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, raw in data.items():
        name = key.replace("-", "_")
        where = f"{path}: key '{key}'"
        if name not in FILE_KEYS:
            raise ConfigError(f"{where}: unknown key")
        if name in spelled:
            raise ConfigError(f"{where}: given twice (also as '{spelled[name]}')")
        spelled[name] = key
        try:
            values[name] = _file_value(name, raw)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return values


def _file_value(name: str, raw: object) -> Any:
    def want(kind: str) -> NoReturn:
        raise ValueError(f"expected {kind}, got {type(raw).__name__} {_show(raw)}")

    if name in _BOOL_FIELDS:
        if not isinstance(raw, bool):
            want("true or false")
        return raw
    if name in _LIST_FIELDS:
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            want("a list of strings")
        return tuple(_CONVERTERS[name](v) for v in raw)
    if name in _INT_FIELDS:
        if isinstance(raw, bool) or not isinstance(raw, int):
            want("an integer")
        return _CONVERTERS[name](raw)
    if not isinstance(raw, str):
        want("a string")
    return _CONVERTERS[name](raw)


# --- parse ------------------------------------------------------------------------------------


def parse(argv: Sequence[str], *, activated_fd: int | None = None) -> Config | Action:
    """Parse the command line (without the program name); ConfigError on any problem.

    `activated_fd` is a listening socket passed by socket activation (supervisor/systemd.py):
    it replaces a config file's socket, like `--fd` would, and refuses one on the command line.
    """
    ns = vars(_build_parser().parse_args(list(argv)))
    if ns.pop("action_help", False):
        return Action.HELP
    if ns.pop("action_version", False):
        return Action.VERSION
    if ns.pop("action_caps", False):
        return Action.PRINT_CAPABILITIES

    deprecations: list[str] = []
    compat_options = ns.pop("compat_options", None)
    compat_debug = ns.pop("compat_debug", False)
    if ns.pop("compat_foreground", False):
        deprecations.append("use of deprecated flag '-f': it has no effect, please remove it")
    socket_alias = ns.pop("socket", None)
    if socket_alias is not None and "socket_path" not in ns:
        ns["socket_path"] = socket_alias
        deprecations.append("use of deprecated option '--socket': use '--socket-path' instead")
    for name in _LIST_FIELDS & ns.keys():
        ns[name] = tuple(ns[name])

    values = dict(_DEFAULTS)
    config_file = ns.pop("config_file", None)
    if config_file is not None:
        from_file = load_file(config_file)
        # The listener is one choice: a socket or an fd on the command line replaces the file's.
        if "socket_path" in ns or "fd" in ns:
            from_file.pop("socket_path", None)
            from_file.pop("fd", None)
        values.update(from_file)
        values["config_file"] = config_file
    values.update(ns)
    if activated_fd is not None:
        for name in ("socket_path", "fd"):
            if name in ns:
                raise ConfigError(f"{_opt(name)} cannot be used with socket activation "
                                  "(LISTEN_FDS): the service manager passes the socket")
        values["socket_path"], values["fd"] = None, activated_fd
    if compat_options:
        _apply_compat(values, compat_options)
        deprecations.append("use of deprecated option format '-o': specify options without it "
                            "(e.g. '--cache auto' instead of '-o cache=auto')")
    if compat_debug:
        values["log_level"] = "debug"
        deprecations.append("use of deprecated flag '-d': use '--log-level debug' instead")
    if values["inode_file_handles"] == "fallback":
        values["inode_file_handles"] = "prefer"
        deprecations.append("use of deprecated value 'fallback' for '--inode-file-handles': "
                            "use 'prefer' instead")
    # virtiofsd: --posix-acl, --security-label and --xattrmap turn --xattr on.  With a map, only
    # the names its rules let through reach the host (common/xattrmap.py).
    values["xattr"] = bool(values["xattr"] or values["posix_acl"] or values["security_label"]
                           or values["xattrmap"] is not None)
    values["deprecations"] = tuple(deprecations)
    _check_combination(values)
    return Config(**values)


def _check_combination(v: dict[str, Any]) -> None:
    if not v["shared_dir"]:
        raise ConfigError("the shared directory is required: give --shared-dir DIR "
                          "(or shared-dir in the config file)")
    if v["socket_path"] is None and v["fd"] is None:
        raise ConfigError("a vhost-user socket is required: give --socket-path PATH or --fd FD")
    if v["socket_path"] is not None and v["fd"] is not None:
        raise ConfigError("--socket-path and --fd cannot be used together: give only one")
    if v["socket_group"] is not None and v["fd"] is not None:
        raise ConfigError("--socket-group cannot be used with --fd: the runtime that created "
                          "the socket sets its group")
    if v["posix_acl"] and (v["translate_uid"] or v["translate_gid"]):
        raise ConfigError("--translate-uid/--translate-gid cannot be used with --posix-acl: "
                          "translating IDs would break posix ACLs")
    for name, what in (("translate_uid", "UID"), ("translate_gid", "GID")):
        try:
            idmap.check_rules(v[name], what)
        except idmap.IdMapError as e:
            raise ConfigError(f"{_opt(name)}: {e}") from None
    if v["migration_mode"] == "file-handles":
        for name in ("migration_verify_handles", "migration_confirm_paths"):
            if v[name]:
                raise ConfigError(f"{_opt(name)} cannot be used with "
                                  "--migration-mode=file-handles (it is unnecessary there)")
    if v["poll_us"] and v["data_plane"] != "native":
        raise ConfigError("--poll-us needs --data-plane=native: the Python data plane does "
                          "not busy-poll")
    if (v["inode_file_handles"] != "never" and v["modcaps"] is not None
            and "-dac_read_search" in v["modcaps"].lower().split(":")):
        raise ConfigError("--modcaps cannot drop dac_read_search with "
                          f"--inode-file-handles={v['inode_file_handles']}: it opens handles")


def error_exit(message: str, status: int = 2) -> NoReturn:
    """Print `pyvirtiofsd: error: MESSAGE` as one line on stderr and exit."""
    line = " ".join(str(message).splitlines())
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def run_cli(argv: Sequence[str], *, activated_fd: int | None = None) -> Config:
    """parse() for main(): prints help/version/capabilities and exits 0, errors exit 2."""
    try:
        result = parse(argv, activated_fd=activated_fd)
    except ConfigError as e:
        error_exit(str(e))
    if isinstance(result, Action):
        sys.stdout.write(result.output())
        sys.stdout.flush()
        raise SystemExit(0)
    return result


# --- startup checks (touch the filesystem) ------------------------------------------------------


def default_rlimit_nofile() -> int:
    """virtiofsd's default file limit: min(1000000, /proc/sys/fs/nr_open)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return min(1_000_000, int(f.read()))
    except (OSError, ValueError):
        return 1_000_000


def check_startup(config: Config) -> None:
    """Checks that need the filesystem, run before the sandbox; ConfigError names the path."""
    _check_shared_dir(config.shared_dir)
    if config.socket_path is not None:
        _check_socket_path(config.socket_path)
    if config.fd is not None:
        _check_listen_fd(config.fd)
    if config.metrics_socket is not None:
        if config.socket_path is not None and (
                os.path.abspath(config.metrics_socket) in (
                    os.path.abspath(config.socket_path),
                    os.path.abspath(config.socket_path) + ".status")):
            raise ConfigError(f"--metrics-socket {config.metrics_socket} is the path of the"
                              " vhost-user socket or its status socket: choose another path")
        _check_socket_path(config.metrics_socket, "--metrics-socket")
    if config.socket_group is not None:
        try:
            grp.getgrnam(config.socket_group)
        except KeyError:
            raise ConfigError(f"--socket-group: group {_show(config.socket_group)} does not "
                              "exist") from None
    if config.data_plane == "native":
        try:
            engine.load()
        except engine.EngineUnavailable as e:
            raise ConfigError(f"--data-plane=native: {e}") from None


def check_sandbox_options(config: Config) -> None:
    """virtiofsd's rules for sandbox options; ConfigError says what to change."""
    root = os.geteuid() == 0
    if config.sandbox == "chroot" and not root:
        raise ConfigError("--sandbox=chroot can only be used by root (use --sandbox=namespace "
                          "instead)")
    for name, maps in (("--uid-map", config.uid_map), ("--gid-map", config.gid_map)):
        if maps and (root or config.sandbox != "namespace"):
            raise ConfigError(f"{name} can only be used by an unprivileged user with "
                              "--sandbox=namespace")


def _check_shared_dir(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"shared directory {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"shared directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"shared directory {path} is not a directory")
    # Reading needs r, resolving entries needs x; try both rather than trust mode bits (ACLs).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.stat(".", dir_fd=fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise ConfigError(f"shared directory {path} is not readable and searchable by uid "
                          f"{os.geteuid()}: {e.strerror}") from None


def _check_socket_path(path: str, what: str = "socket") -> None:
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"{what} directory {parent} does not exist or is not a directory")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"{what} path {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{what} path {path} exists and is not a socket: remove it or "
                          "choose another path")
    if _socket_listening(path, st):
        raise ConfigError(f"{what} path {path} is in use by another process")
    # A socket nobody listens on is stale: the supervisor unlinks it before binding.


def _socket_listening(path: str, st: os.stat_result) -> bool:
    """Is a listening socket bound to this file?

    Asked of the kernel (sock_diag, or /proc/net/unix) rather than by connecting: a vhost-user
    backend still waiting for its frontend would take a probe connection for the frontend and
    exit when it closes.
    """
    try:
        return _listening_inodes_diag(st)
    except OSError:
        return _listening_path_procfs(path)


_TCP_LISTEN = 10
_NLMSG_ERROR, _NLMSG_DONE, _SOCK_DIAG_BY_FAMILY = 2, 3, 20
_NLM_F_REQUEST_DUMP = 0x301
_UDIAG_SHOW_VFS, _UNIX_DIAG_VFS = 0x2, 1
_NLMSG = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
_RTATTR = struct.Struct("=HH")
_UNIX_DIAG_VFS_ATTR = struct.Struct("=II")  # vfs inode, vfs dev (kernel encoding)


def _listening_inodes_diag(st: os.stat_result) -> bool:
    """Netlink sock_diag: is any listening AF_UNIX socket bound to this device and inode?"""
    want_dev = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
    want_ino = st.st_ino & 0xFFFFFFFF  # the attribute carries 32 bits of the inode
    req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0, _UDIAG_SHOW_VFS,
                              0xFFFFFFFF, 0xFFFFFFFF)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 4) as nl:
        nl.send(_NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP,
                            1, 0) + req)
        found = False
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind = _NLMSG.unpack_from(data, off)[:2]
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    errno_ = -struct.unpack_from("=i", data, off + _NLMSG.size)[0]
                    raise OSError(errno_, os.strerror(errno_))
                if length < _NLMSG.size:
                    raise OSError(0, "malformed sock_diag reply")
                attr = off + _NLMSG.size + _UNIX_DIAG_MSG.size
                while attr + _RTATTR.size <= off + length:
                    alen, atype = _RTATTR.unpack_from(data, attr)
                    if alen < _RTATTR.size:
                        break
                    if atype == _UNIX_DIAG_VFS:
                        ino, dev = _UNIX_DIAG_VFS_ATTR.unpack_from(data, attr + _RTATTR.size)
                        found = found or (ino == want_ino and dev == want_dev)
                    attr += (alen + 3) & ~3
                off += (length + 3) & ~3


def _listening_path_procfs(path: str) -> bool:
    """Fallback without sock_diag: a listening socket whose bound name is this path."""
    wanted = {path, os.path.abspath(path)}
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                cols = line.split(None, 7)
                # Flags carry __SO_ACCEPTCON (0x10000) for listening sockets.
                if len(cols) == 8 and int(cols[3], 16) & 0x10000 and cols[7].rstrip("\n") in wanted:
                    return True
    except OSError:
        pass
    return False


def _check_listen_fd(fd: int) -> None:
    try:
        st = os.fstat(fd)
    except OSError:
        raise ConfigError(f"--fd {fd} is not an open file descriptor") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"--fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_UNIX or not sock.getsockopt(socket.SOL_SOCKET,
                                                                 socket.SO_ACCEPTCONN):
            raise ConfigError(f"--fd {fd} is not a listening AF_UNIX socket")
    finally:
        sock.detach()
