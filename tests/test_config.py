"""Command line, config file and startup checks (pyvirtiofsd.supervisor.config)."""

from __future__ import annotations

import dataclasses
import grp
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tomli

from pyvirtiofsd import __version__
from pyvirtiofsd.supervisor import config as cfg
from pyvirtiofsd.supervisor.config import (
    Action,
    CacheMode,
    Config,
    ConfigError,
    check_startup,
    load_file,
    parse,
    run_cli,
)
from tests.frontend import ANCHOR

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "pyvirtiofsd.toml"
BASE = ["--socket-path=/tmp/vfs.sock", "--shared-dir=/srv"]


def p(*args: str) -> Config:
    result = parse([*BASE, *args])
    assert isinstance(result, Config)
    return result


# --- defaults and flags ---------------------------------------------------------------------


def test_defaults_are_virtiofsds():
    c = p()
    assert (c.socket_path, c.shared_dir, c.fd, c.socket_group, c.tag) == (
        "/tmp/vfs.sock", "/srv", None, None, None)
    assert c.cache is CacheMode.AUTO
    assert c.sandbox == "namespace" and c.seccomp == "kill" and c.log_level == "info"
    assert c.announce_submounts and c.readdirplus
    assert not any((c.readonly, c.xattr, c.posix_acl, c.writeback, c.allow_direct_io,
                    c.allow_mmap, c.killpriv_v2, c.security_label, c.syslog, c.reconnect,
                    c.preserve_noatime, c.migration_verify_handles, c.migration_confirm_paths))
    assert c.thread_pool_size == 0 and c.rlimit_nofile is None
    assert c.inode_file_handles == "never" and c.xattrmap is None and c.modcaps is None
    assert c.uid_map == c.gid_map == c.translate_uid == c.translate_gid == ()
    assert (c.migration_mode, c.migration_on_error) == ("find-paths", "abort")
    assert (c.request_queues, c.queue_size) == (1, 1024)
    assert c.deprecations == () and c.unimplemented() == []
    assert c == Config(socket_path="/tmp/vfs.sock", shared_dir="/srv")


@pytest.mark.parametrize(("args", "name", "value"), [
    (["--fd=3"], "fd", 3),  # with BASE's socket path removed below
    (["--socket-group", "kvm"], "socket_group", "kvm"),
    (["--tag=fs0"], "tag", "fs0"),
    (["--tag", "x" * 36], "tag", "x" * 36),
    (["--cache=never"], "cache", CacheMode.NEVER),
    (["--cache", "Metadata"], "cache", CacheMode.METADATA),
    (["--cache=always"], "cache", CacheMode.ALWAYS),
    (["--readonly"], "readonly", True),
    (["--xattr"], "xattr", True),
    (["--posix-acl"], "posix_acl", True),
    (["--no-announce-submounts"], "announce_submounts", False),
    (["--no-announce-submounts", "--announce-submounts"], "announce_submounts", True),
    (["--announce-submounts", "--no-announce-submounts"], "announce_submounts", False),
    (["--no-readdirplus"], "readdirplus", False),
    (["--writeback"], "writeback", True),
    (["--allow-direct-io"], "allow_direct_io", True),
    (["--allow-mmap"], "allow_mmap", True),
    (["--thread-pool-size=1"], "thread_pool_size", 1),
    (["--rlimit-nofile", "0"], "rlimit_nofile", 0),
    (["--rlimit-nofile=4096"], "rlimit_nofile", 4096),
    (["--log-level=trace"], "log_level", "trace"),
    (["--log-level", "OFF"], "log_level", "off"),
    (["-d"], "log_level", "debug"),
    (["-d", "--log-level=error"], "log_level", "debug"),  # virtiofsd: -d wins
    (["--syslog"], "syslog", True),
    (["--sandbox=chroot"], "sandbox", "chroot"),
    (["--sandbox", "none"], "sandbox", "none"),
    (["--seccomp=log"], "seccomp", "log"),
    (["--seccomp=trap"], "seccomp", "trap"),
    (["--seccomp=none"], "seccomp", "none"),
    (["--modcaps=+sys_admin:-chown"], "modcaps", "+sys_admin:-chown"),
    (["--uid-map=:0:100000:65536:"], "uid_map", (":0:100000:65536:",)),
    (["--uid-map=/0/1/2/", "--uid-map=:5:6:7:"], "uid_map", (":0:1:2:", ":5:6:7:")),
    (["--gid-map", ":0:100000:65536:"], "gid_map", (":0:100000:65536:",)),
    (["--killpriv-v2"], "killpriv_v2", True),
    (["--killpriv-v2", "--no-killpriv-v2"], "killpriv_v2", False),
    (["--inode-file-handles=prefer"], "inode_file_handles", "prefer"),
    (["--inode-file-handles=mandatory"], "inode_file_handles", "mandatory"),
    (["--inode-file-handles=fallback"], "inode_file_handles", "prefer"),
    (["--xattrmap=:prefix:all::user.virtiofs.: :bad:all:::"], "xattrmap",
     ":prefix:all::user.virtiofs.: :bad:all:::"),
    (["--security-label"], "security_label", True),
    (["--translate-uid=map:0:1000:1"], "translate_uid", ("map:0:1000:1",)),
    (["--translate-gid", "Forbid-Guest/5/10"], "translate_gid", ("forbid-guest:5:10",)),
    (["--preserve-noatime"], "preserve_noatime", True),
    (["--migration-mode=file-handles"], "migration_mode", "file-handles"),
    (["--migration-on-error=guest-error"], "migration_on_error", "guest-error"),
    (["--migration-verify-handles"], "migration_verify_handles", True),
    (["--migration-confirm-paths"], "migration_confirm_paths", True),
    (["--request-queues=64"], "request_queues", 64),
    (["--queue-size", "32768"], "queue_size", 32768),
    (["--queue-size=2"], "queue_size", 2),
    (["--reconnect"], "reconnect", True),
    (["--data-plane=python"], "data_plane", "python"),
    (["--data-plane=python", "--data-plane=native"], "data_plane", "native"),
    (["--allow-device-nodes"], "allow_device_nodes", True),
    (["--poll-us=50"], "poll_us", 50),
    (["--dax"], "dax", True),
    (["--dax-window=16M"], "dax_window", 16 << 20),
    (["--dax-window", "2g"], "dax_window", 2 << 30),
    (["--dax-window=4194304"], "dax_window", 4 << 20),
    (["--cache=never", "--cache=always"], "cache", CacheMode.ALWAYS),  # last one wins
    (["-f"], "shared_dir", "/srv"),
])
def test_flag_sets_field(args, name, value):
    base = ["--shared-dir=/srv"] if "--fd=3" in args else BASE
    c = parse([*base, *args])
    assert isinstance(c, Config)
    assert getattr(c, name) == value
    # Nothing else moved away from the default, apart from what the flag implies.
    implied = {"xattr"} if name in ("posix_acl", "security_label", "xattrmap") else set()
    for f in dataclasses.fields(Config):
        if f.name in {name, "socket_path", "shared_dir", "deprecations", *implied}:
            continue
        assert getattr(c, f.name) == f.default, f.name


def test_posix_acl_security_label_and_xattrmap_imply_xattr():
    # virtiofsd's rule; with a map only the names it lets through reach the host.
    assert p("--posix-acl").xattr and p("--security-label").xattr
    assert p("--xattrmap=:ok:all:::").xattr
    assert p("--xattrmap=:prefix:all::user.virtiofs.: :bad:all:::").xattr
    assert not p().xattr


def test_fd_instead_of_socket_path():
    c = parse(["--fd", "4", "--shared-dir=/srv"])
    assert c.fd == 4 and c.socket_path is None


def test_derived_cache_rules():
    assert p("--cache=never").use_readdirplus is False
    assert p("--cache=auto").use_readdirplus is True
    assert p("--cache=auto", "--no-readdirplus").use_readdirplus is False
    assert [p(f"--cache={m}").cache_timeout for m in ("never", "auto", "metadata", "always")] == [
        0.0, 1.0, 86400.0, 86400.0]


def test_deprecated_spellings_are_accepted_and_noted():
    c = parse(["--socket=/tmp/old.sock", "--shared-dir=/srv", "-f", "-d",
               "--inode-file-handles=fallback", "-o", "xattr"])
    assert c.socket_path == "/tmp/old.sock"
    text = " ".join(c.deprecations)
    for word in ("'--socket'", "'-f'", "'-d'", "'fallback'", "'-o'"):
        assert word in text
    # --socket-path given too: it wins, and --socket is not reported as used.
    c = parse(["--socket=/a", "--socket-path=/b", "--shared-dir=/srv"])
    assert c.socket_path == "/b" and c.deprecations == ()


def test_unimplemented_lists_what_is_set():
    # Every option is acted on now, --inode-file-handles=prefer the last of them.
    c = p("--thread-pool-size=1", "--posix-acl", "--xattrmap=:ok:all:::", "--security-label",
          "--inode-file-handles=prefer", "--uid-map=:0:1:2:", "--gid-map=:0:1:2:",
          "--modcaps=+sys_admin", "--killpriv-v2", "--allow-mmap", "--reconnect")
    assert c.unimplemented() == []
    # Implemented options never show up.
    assert p("--translate-gid=map:0:1:2", "--translate-uid=squash-guest:0:107:4294967295",
             "--security-label", "--xattrmap=:map::user.virtiofs.:").unimplemented() == []
    assert p("--posix-acl", "--preserve-noatime", "--thread-pool-size=0").unimplemented() == []
    assert p("--cache=never", "--xattr", "--writeback", "--readonly", "--no-readdirplus",
             "--sandbox=none", "--seccomp=log", "--request-queues=4", "--reconnect",
             "--modcaps=+sys_admin", "--uid-map=:0:1:2:",
             "--gid-map=:0:1:2:").unimplemented() == []


# --- actions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "action"), [
    (["--print-capabilities"], Action.PRINT_CAPABILITIES),
    (["-V"], Action.VERSION), (["--version"], Action.VERSION),
    (["-h"], Action.HELP), (["--help", "--cache=never"], Action.HELP),
])
def test_actions_need_no_socket_or_shared_dir(args, action):
    assert parse(args) is action


def test_version_text():
    assert Action.VERSION.output() == f"pyvirtiofsd {__version__}\n"
    assert "--shared-dir" in Action.HELP.output()


@pytest.mark.skipif(not os.access(ANCHOR, os.X_OK), reason="virtiofsd anchor not installed")
def test_capabilities_are_virtiofsds():
    """virtiofsd's document, byte for byte, "migrate-precopy" included: live migration works
    (tests/test_guest_migration.py)."""
    theirs = subprocess.run([ANCHOR, "--print-capabilities"], capture_output=True, check=True)
    assert '"migrate-precopy"' in theirs.stdout.decode()
    assert Action.PRINT_CAPABILITIES.output() == theirs.stdout.decode()


def test_run_cli_prints_action_and_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["--print-capabilities"])
    assert e.value.code == 0
    assert capsys.readouterr().out == cfg.CAPABILITIES_JSON


# --- -o compat options ----------------------------------------------------------------------


@pytest.mark.parametrize(("opts", "name", "value"), [
    ("source=/data", "shared_dir", "/data"),
    ("cache=none", "cache", CacheMode.NEVER),
    ("cache=auto", "cache", CacheMode.AUTO),
    ("cache=always", "cache", CacheMode.ALWAYS),
    ("cache=metadata", "cache", CacheMode.METADATA),
    ("xattr", "xattr", True),
    ("xattr,no_xattr", "xattr", False),
    ("no_readdirplus", "readdirplus", False),
    ("no_readdirplus,readdirplus", "readdirplus", True),
    ("writeback", "writeback", True),
    ("writeback,no_writeback", "writeback", False),
    ("allow_direct_io", "allow_direct_io", True),
    ("allow_direct_io,no_allow_direct_io", "allow_direct_io", False),
    ("announce_submounts", "announce_submounts", True),
    ("killpriv_v2", "killpriv_v2", True),
    ("posix_acl", "posix_acl", True),
    ("security_label", "security_label", True),
    ("loglevel=debug", "log_level", "debug"),
    ("loglevel=err", "log_level", "error"),
    ("log_level=warn", "log_level", "warn"),
    ("sandbox=chroot", "sandbox", "chroot"),
    ("modcaps=-chown", "modcaps", "-chown"),
    ("xattrmap=:ok:all:::", "xattrmap", ":ok:all:::"),
    ("no_posix_lock", "posix_lock", False),
    ("no_flock", "flock", False),
    ("posix_lock", "posix_lock", True),
    ("flock", "flock", True),
])
def test_compat_option(opts, name, value):
    assert getattr(p("-o", opts), name) == value


def test_compat_options_apply_after_flags_whatever_the_order():
    # virtiofsd applies -o on top of the parsed flags.
    assert p("-o", "cache=none", "--cache=always").cache is CacheMode.NEVER
    assert p("--cache=always", "-ocache=none").cache is CacheMode.NEVER
    c = p("-o", "xattr", "-o", "writeback,cache=metadata")
    assert (c.xattr, c.writeback, c.cache) == (True, True, CacheMode.METADATA)


def test_compat_source_replaces_shared_dir():
    c = parse(["--socket-path=/s", "-o", "source=/data"])
    assert c.shared_dir == "/data"


# --- errors ---------------------------------------------------------------------------------


BAD_ARGS = [
    ([], "shared directory is required"),
    (["--shared-dir=/srv"], "--socket-path PATH or --fd FD"),
    ([*BASE, "--fd=3"], "cannot be used together"),
    (["--fd=3", "--shared-dir=/srv", "--socket-group=kvm"], "--socket-group cannot be used"),
    ([*BASE, "--bogus"], "unrecognized arguments: --bogus"),
    ([*BASE, "stray"], "unrecognized arguments: stray"),
    ([*BASE, "--sock=/x"], "unrecognized"),  # no abbreviations
    ([*BASE, "--cache"], "expected one argument"),
    ([*BASE, "--cache=none"], "--cache: invalid value 'none'"),
    ([*BASE, "--sandbox=jail"], "--sandbox: invalid value"),
    ([*BASE, "--seccomp=KILL"], "--seccomp: invalid value"),
    ([*BASE, "--log-level=warning"], "--log-level: invalid value"),
    ([*BASE, "--inode-file-handles=PREFER"], "--inode-file-handles: invalid value"),
    ([*BASE, "--migration-mode=file_handles"], "--migration-mode: invalid value"),
    ([*BASE, "--migration-on-error=ignore"], "--migration-on-error: invalid value"),
    ([*BASE, "--tag="], "--tag: invalid tag"),
    ([*BASE, "--tag=" + "x" * 37], "--tag: invalid tag"),
    ([*BASE, "--tag=" + "é" * 19], "--tag: invalid tag"),  # 38 bytes in UTF-8
    ([*BASE, "--tag=a\nb"], "--tag: invalid tag 'a\\nb'"),
    ([*BASE, "--thread-pool-size=-1"], "--thread-pool-size: invalid value '-1'"),
    ([*BASE, "--thread-pool-size=1e3"], "--thread-pool-size: invalid value"),
    ([*BASE, "--thread-pool-size=2"], "--thread-pool-size: value 2 is not supported: each queue "
     "is served by one worker process, one request at a time (0 or 1); use --request-queues=N"),
    ([*BASE, "--rlimit-nofile=lots"], "--rlimit-nofile: invalid value"),
    ([*BASE, "--request-queues=0"], "--request-queues: value 0 out of range (1..64)"),
    ([*BASE, "--request-queues=65"], "--request-queues: value 65 out of range"),
    ([*BASE, "--queue-size=1000"], "--queue-size: value 1000 is not a power of two"),
    ([*BASE, "--queue-size=65536"], "--queue-size: value 65536 out of range"),
    ([*BASE, "--queue-size=1"], "--queue-size: value 1 out of range"),
    (["--fd=-1", "--shared-dir=/srv"], "--fd: invalid value '-1'"),
    ([*BASE, "--uid-map=0:1:2"], "--uid-map: invalid map '0:1:2'"),
    ([*BASE, "--uid-map=:0:1:"], "--uid-map: invalid map"),
    ([*BASE, "--gid-map=:0:1:2/"], "--gid-map: invalid map"),
    ([*BASE, "--uid-map=:0:1:4294967296:"], "--uid-map: invalid map"),
    # virtiofsd's messages for rules (common/idmap.py).
    ([*BASE, "--translate-uid=guest:0:1"],
     "--translate-uid: Invalid ID map length (expected 3 elements, got 2 elements)"),
    ([*BASE, "--translate-uid=forbid-guest:0:1:2"],
     "Invalid ID map length (expected 2 elements, got 3 elements)"),
    ([*BASE, "--translate-uid=sideways:0:1:2"], "--translate-uid: Invalid ID map prefix sideways"),
    ([*BASE, "--translate-uid=guest"],
     "Invalid ID map length (expected 1 elements, got 0 elements)"),
    ([*BASE, "--translate-gid=map:0:x:2"],
     "--translate-gid: Invalid value x in ID map: invalid digit found in string"),
    ([*BASE, "--translate-gid=map:0::2"],
     "Invalid value  in ID map: cannot parse integer from empty string"),
    ([*BASE, "--translate-gid=map:0:1:4294967296"],
     "Invalid value 4294967296 in ID map: number too large to fit in target type"),
    ([*BASE, "--translate-uid=map:1:0:4294967295"],
     "--translate-uid: UID map: Parameter map:1:0:4294967295: Range overflow"),
    ([*BASE, "--translate-uid=map:0:100:10", "--translate-uid=squash-guest:5:0:1"],
     "--translate-uid: UID map: squash-guest:5:0:1: Guest-to-host mapping 'squash [5, 6) to 0'"
     " intersects previously added entry"),
    ([*BASE, "--translate-gid=host:10:0:5", "--translate-gid=map:0:12:1"],
     "--translate-gid: GID map: map:0:12:1: Host-to-guest mapping 'map [12, 13) to [0, 1)'"
     " intersects previously added entry"),
    ([*BASE, "--translate-gid=map:0:1:2", "--posix-acl"], "would break posix ACLs"),
    ([*BASE, "--modcaps=sys_admin"], "--modcaps: invalid entry 'sys_admin'"),
    ([*BASE, "--modcaps=+sys_admin:"], "--modcaps: invalid entry ''"),
    ([*BASE, "--modcaps=+superpower"], "unknown capability 'superpower'"),
    ([*BASE, "--xattrmap=foo"], "--xattrmap: xattrmap rule 1 is incomplete"),
    ([*BASE, "--xattrmap=:prefix:all:a:b"], "rule 1 is incomplete"),
    ([*BASE, "--xattrmap=:ok:all::: :rename:all:::"], "rule 2: invalid type 'rename'"),
    ([*BASE, "--xattrmap=:ok:guest:::"], "rule 1: invalid scope 'guest'"),
    ([*BASE, "--xattrmap=:map:a:b: :ok:all:::"], "rule 1: a map rule must be the last rule"),
    ([*BASE, "--xattrmap=  "], "xattrmap has no rules"),
    ([*BASE, "--migration-mode=file-handles", "--migration-verify-handles"],
     "--migration-verify-handles cannot be used with --migration-mode=file-handles"),
    ([*BASE, "--migration-mode=file-handles", "--migration-confirm-paths"],
     "--migration-confirm-paths cannot be used"),
    ([*BASE, "--inode-file-handles=mandatory", "--modcaps=-dac_read_search"],
     "cannot drop dac_read_search"),
    ([*BASE, "-o", "flocks"], "invalid compat argument '-o flocks'"),
    ([*BASE, "-o", "xattr,,writeback"], "invalid compat argument '-o '"),
    ([*BASE, "-o", "timeout=5"], "invalid compat argument '-o timeout=5'"),
    ([*BASE, "-o", "cache=sometimes"], "-o cache: invalid value 'sometimes'"),
    ([*BASE, "-o", "sandbox=none"], "-o sandbox: invalid value 'none'"),
    ([*BASE, "-o", "loglevel=trace"], "-o loglevel: invalid value 'trace'"),
    ([*BASE, "--config"], "expected one argument"),
    ([*BASE, "--shared-dir="], "--shared-dir: value must not be empty"),
    ([*BASE, "--xattr=yes"], "ignored explicit argument 'yes'"),
    ([*BASE, "--data-plane=rust"], "--data-plane: invalid value 'rust'"),
    ([*BASE, "--poll-us=1000001"], "--poll-us"),
    ([*BASE, "--poll-us=5", "--data-plane=python"], "--poll-us needs --data-plane=native"),
    ([*BASE, "--dax=yes"], "ignored explicit argument 'yes'"),
    ([*BASE, "--dax-window=3M"], "--dax-window: window size 3145728 is not a non-zero multiple"
     " of 2 MiB"),
    ([*BASE, "--dax-window=0"], "--dax-window: window size 0 is not"),
    ([*BASE, "--dax-window=8X"], "--dax-window: invalid size '8X'"),
    ([*BASE, "--dax-window=9223372036854775808"], "--dax-window: window size"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGS)
def test_error_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(ConfigError) as e:
        parse(args)
    assert message in str(e.value)
    with pytest.raises(SystemExit) as e:
        run_cli(args)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.err.endswith("\n")
    assert lines[0].startswith("pyvirtiofsd: error: ") and message in lines[0]


def test_error_exit_in_a_real_process():
    code = "import sys; from pyvirtiofsd.supervisor.config import run_cli; run_cli(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, *BASE, "--cache=bogus"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("pyvirtiofsd: error: argument --cache: invalid value 'bogus' "
                        "(expected auto, always, metadata, never)\n")


# The same command lines against virtiofsd: where it accepts, we accept, and where it refuses,
# we refuse. Deliberate differences, left out here: pyvirtiofsd also takes
# `--inode-file-handles VALUE` without '=', `-o log_level=` (the C daemon's spelling),
# `-o cache=never` and `-o source=` paths containing '=', and refuses a negative --fd and a
# --thread-pool-size above 1 (one worker process serves each queue, one request at a time).
DIFFERENTIAL = [
    [], ["--cache=NEVER"], ["--cache=none"], ["--sandbox=NONE"], ["--log-level=DEBUG"],
    ["--seccomp=KILL"], ["--tag=" + "x" * 36], ["--tag=" + "x" * 37], ["--tag="],
    ["--uid-map=:0:1:2:"], ["--uid-map=0:1:2"], ["--uid-map=:0:1:"], ["--gid-map=|1|2|3|"],
    ["--translate-uid=guest:0:1:2"], ["--translate-uid=guest:0:1"],
    ["--translate-uid=forbid-guest:0:1"], ["--translate-uid=SQUASH-host/1/2/3"],
    ["--translate-uid=guest:0:1:2", "--posix-acl"], ["--translate-uid=map:+1:2:3"],
    ["--translate-uid=guest:0:1:x"], ["--translate-uid=map:0:1:4294967296"],
    ["--translate-uid=guest:1:2:3:4"], ["--translate-gid=squash-guest:0:107:4294967295"],
    ["--translate-gid=Map|1|2|3"], ["--translate-gid=map"], ["--translate-gid=ma p:1:2:3"],
    ["--xattrmap=:map::user.virtiofs.:"], ["--xattrmap=foo"], ["--xattrmap=:ok:all:::"],
    ["--xattrmap=:map:a:b: :ok:all:::"], ["--xattrmap=:ok:nowhere:::"],
    ["--inode-file-handles=fallback"], ["--inode-file-handles=PREFER"],
    ["--migration-mode=file-handles"], ["--migration-mode=FILE-HANDLES"],
    ["--migration-on-error=guest-error"], ["--thread-pool-size=-1"], ["--rlimit-nofile=0"],
    ["--thread-pool-size=0"], ["--thread-pool-size=1"], ["--killpriv-v2"], ["--allow-mmap"],
    ["--preserve-noatime"], ["--security-label"], ["--posix-acl", "--xattrmap=:ok:all:::"],
    ["-o", "no_flock,no_posix_lock,xattr"], ["-o", "cache=NONE"],
    ["-o", "sandbox=none"], ["-o", "loglevel=err"], ["-o", "source=/srv,cache=none"],
    ["--no-killpriv-v2", "--killpriv-v2"], ["--announce-submounts", "--no-announce-submounts"],
    ["--bogus"], ["-d", "-f"], ["--socket=/tmp/vfs.sock"],
]


@pytest.mark.skipif(not os.access(ANCHOR, os.X_OK), reason="virtiofsd anchor not installed")
@pytest.mark.parametrize("args", DIFFERENTIAL, ids=" ".join)
def test_accepts_what_virtiofsd_accepts(args):
    # Not listed: -o flock and -o posix_lock, which virtiofsd refuses (it has no locks) and
    # this daemon honours (docs/differences.md, "Locks"; test_lock_options below).
    theirs = subprocess.run([ANCHOR, *BASE, *args, "--print-capabilities"],
                            capture_output=True, timeout=10)
    try:
        parse([*BASE, *args])
        ours = True
    except ConfigError:
        ours = False
    assert ours == (theirs.returncode == 0), theirs.stderr.decode()


# --- config file ------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pyvirtiofsd.toml"
    path.write_text(text)
    return str(path)


def test_file_values_and_command_line_precedence(tmp_path):
    path = write(tmp_path, """
shared-dir = "/from/file"
socket_path = "/run/file.sock"
cache = "never"
request-queues = 2
xattr = true
uid-map = [":0:100000:65536:"]
log-level = "warn"
""")
    c = parse(["--config", path])
    assert (c.shared_dir, c.socket_path, c.cache, c.request_queues, c.xattr, c.uid_map,
            c.log_level, c.config_file) == (
        "/from/file", "/run/file.sock", CacheMode.NEVER, 2, True, (":0:100000:65536:",), "warn",
        path)
    c = parse([f"--config={path}", "--cache=always", "--shared-dir=/cli", "--uid-map=:1:2:3:",
               "-d"])
    assert (c.shared_dir, c.cache, c.request_queues, c.uid_map, c.log_level) == (
        "/cli", CacheMode.ALWAYS, 2, (":1:2:3:",), "debug")
    # A listener on the command line replaces the file's, whichever kind it is.
    c = parse(["--config", path, "--fd=5"])
    assert (c.fd, c.socket_path) == (5, None)


@pytest.mark.parametrize(("text", "message"), [
    ('shared-dir = "/srv"\nbogus = 1\n', "key 'bogus': unknown key"),
    ('[shared-dir]\npath = "/srv"\n', "key 'shared-dir': expected a string, got dict"),
    ('cache = "sometimes"\n', "key 'cache': invalid value 'sometimes'"),
    ("cache = 1\n", "key 'cache': expected a string, got int"),
    ("request-queues = 0\n", "key 'request-queues': value 0 out of range (1..64)"),
    ('request-queues = "2"\n', "key 'request-queues': expected an integer, got str '2'"),
    ("queue-size = true\n", "key 'queue-size': expected an integer, got bool"),
    ("xattr = 1\n", "key 'xattr': expected true or false, got int"),
    ('uid-map = ":0:1:2:"\n', "key 'uid-map': expected a list of strings"),
    ('uid-map = ["0:1:2"]\n', "key 'uid-map': invalid map '0:1:2'"),
    ('tag = ""\n', "key 'tag': invalid tag ''"),
    ('shared-dir = "/a"\nshared_dir = "/b"\n', "given twice (also as 'shared-dir')"),
    ('config = "/etc/other.toml"\n', "key 'config': unknown key"),
    ('config-file = "/etc/other.toml"\n', "key 'config-file': unknown key"),
    ('deprecations = []\n', "key 'deprecations': unknown key"),
    ('socket = "/x"\n', "key 'socket': unknown key"),
    ('cache = "never\n', "invalid TOML"),
    ('dax = "yes"\n', "key 'dax': expected true or false, got str 'yes'"),
    ("dax-window = 8\n", "key 'dax-window': expected a string, got int"),
    ('dax-window = "1M"\n', "key 'dax-window': window size 1048576 is not"),
])
def test_file_errors_name_key_and_file(tmp_path, text, message, capsys):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_file(path)
    assert str(e.value).startswith(path + ": ") and message in str(e.value)
    with pytest.raises(SystemExit) as e:
        run_cli([*BASE, "--config", path])
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvirtiofsd: error: " + path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*/nope\.toml"):
        parse([*BASE, "--config", str(tmp_path / "nope.toml")])


def test_combination_rules_apply_to_the_file_too(tmp_path):
    path = write(tmp_path, 'shared-dir = "/srv"\nsocket-path = "/s"\nfd = 3\n')
    with pytest.raises(ConfigError, match="cannot be used together"):
        parse(["--config", path])
    path = write(tmp_path, 'socket-path = "/s"\n')
    with pytest.raises(ConfigError, match="shared directory is required"):
        parse(["--config", path])


# --- the example file cannot drift from Config ------------------------------------------------

_KEY_LINE = re.compile(r"^(?:# )?([a-z][a-z0-9-]*) = (.*)$")


def example_entries() -> list[tuple[str, str, str]]:
    """(key, value text, description) for each key line of etc/pyvirtiofsd.toml."""
    entries, comment = [], []
    for line in EXAMPLE.read_text().splitlines():
        m = _KEY_LINE.match(line)
        if m:
            entries.append((m.group(1), m.group(2), " ".join(comment)))
            comment = []
        elif line.startswith("#"):
            comment.append(line.lstrip("# "))
        else:
            comment = []
    return entries


def test_example_documents_every_key_in_field_order():
    entries = example_entries()
    keys = [k.replace("-", "_") for k, _, _ in entries]
    assert keys == list(cfg.FILE_KEYS)
    fields = tuple(f.name for f in dataclasses.fields(Config))
    assert set(fields) - set(cfg.FILE_KEYS) == {"config_file", "deprecations"}
    assert all(desc for _, _, desc in entries), "every key needs a one-line comment"


def test_example_shows_the_real_defaults():
    for key, text, desc in example_entries():
        name = key.replace("-", "_")
        default = cfg._DEFAULTS[name]
        value = cfg._file_value(name, tomli.loads(f"v = {text}")["v"])
        if name in ("shared_dir", "socket_path"):
            continue  # the sample values, uncommented
        if default is None:
            assert "unset" in desc, key
        else:
            assert value == default, key


def test_example_file_loads(tmp_path):
    c = parse(["--config", str(EXAMPLE)])
    assert c.shared_dir == "/srv/share" and c.socket_path == "/run/pyvirtiofsd/vhost-fs.sock"
    assert c == Config(shared_dir=c.shared_dir, socket_path=c.socket_path,
                       config_file=str(EXAMPLE))
    # Uncommenting every default (but not the unset examples) still gives the defaults.
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        m = _KEY_LINE.match(line)
        if m and line.startswith("# ") and cfg._DEFAULTS[m.group(1).replace("-", "_")] is not None:
            line = line[2:]
        lines.append(line)
    path = write(tmp_path, "\n".join(lines))
    assert parse(["--config", path]) == Config(shared_dir=c.shared_dir,
                                               socket_path=c.socket_path, config_file=path)


def test_systemd_unit_runs_the_example_config():
    unit = (EXAMPLE.parent / "pyvirtiofsd.service").read_text()
    assert re.search(r"^ExecStart=\S*pyvirtiofsd --config /etc/pyvirtiofsd.toml$", unit, re.M)


# --- startup checks ---------------------------------------------------------------------------


def startup(tmp_path: Path, **kw) -> None:
    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    fields = {"shared_dir": str(share), "socket_path": str(tmp_path / "vfs.sock")}
    fields.update(kw)
    check_startup(Config(**fields))


def test_startup_ok(tmp_path):
    startup(tmp_path)
    startup(tmp_path, socket_group=grp.getgrgid(os.getgid()).gr_name)


def test_startup_shared_dir_missing(tmp_path):
    msg = f"shared directory {tmp_path}/gone does not exist"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        startup(tmp_path, shared_dir=str(tmp_path / "gone"))


def test_startup_shared_dir_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="file is not a directory"):
        startup(tmp_path, shared_dir=str(tmp_path / "file"))


def _check_as_nobody(share: str) -> str:
    """check_startup for `share` in a child running as uid/gid 65534; returns its error text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                check_startup(Config(shared_dir=share, socket_path="/tmp/vfs-test.sock"))
                msg = "ok"
            except ConfigError as e:
                msg = str(e)
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_startup_shared_dir_unreadable_for_the_daemon_user():
    top = tempfile.mkdtemp(prefix="pyvirtiofsd-perm-")
    try:
        os.chmod(top, 0o711)
        share = os.path.join(top, "share")
        os.mkdir(share, 0o755)
        assert _check_as_nobody(share) == "ok"
        for mode in (0o700, 0o711, 0o744):  # no r, no r, no x
            os.chmod(share, mode)
            assert _check_as_nobody(share) == (
                f"shared directory {share} is not readable and searchable by uid 65534: "
                "Permission denied"), oct(mode)
    finally:
        shutil.rmtree(top)


def test_startup_socket_in_use(tmp_path):
    path = str(tmp_path / "vfs.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        msg = f"socket path {path} is in use by another process"
        with pytest.raises(ConfigError, match=re.escape(msg)):
            startup(tmp_path)
        # Asked of the kernel, not by connecting: nothing is waiting to be accepted.
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    # The listener is gone: the file left behind is stale, and that is fine.
    assert os.path.exists(path)
    startup(tmp_path)


def test_startup_bound_but_not_listening_is_stale(tmp_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "vfs.sock"))
        startup(tmp_path)


@pytest.mark.parametrize("probe", ["diag", "procfs"])
def test_listener_probes(tmp_path, probe):
    path = str(tmp_path / "vfs.sock")
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as other:
        listener.bind(path)
        other.bind(str(tmp_path / "other.sock"))
        other.listen()

        def listening() -> bool:
            if probe == "procfs":
                return cfg._listening_path_procfs(path)
            try:
                return cfg._listening_inodes_diag(os.stat(path))
            except OSError as e:
                pytest.skip(f"no unix sock_diag here: {e}")

        assert not listening()
        listener.listen()
        assert listening()


def test_startup_socket_path_is_not_a_socket(tmp_path):
    (tmp_path / "vfs.sock").write_text("")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        startup(tmp_path)


def test_startup_socket_directory_missing(tmp_path):
    msg = f"socket directory {tmp_path}/nodir does not exist"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        startup(tmp_path, socket_path=str(tmp_path / "nodir" / "vfs.sock"))


def test_startup_unknown_group(tmp_path):
    with pytest.raises(ConfigError, match="group 'no-such-group-x' does not exist"):
        startup(tmp_path, socket_group="no-such-group-x")


def test_startup_listen_fd(tmp_path):
    with socket.socket(socket.AF_UNIX) as s:
        with pytest.raises(ConfigError, match="is not a listening AF_UNIX socket"):
            startup(tmp_path, socket_path=None, fd=s.fileno())
        s.bind(str(tmp_path / "l.sock"))
        s.listen()
        startup(tmp_path, socket_path=None, fd=s.fileno())
        assert s.fileno() >= 0  # the check did not take the fd away
    r, w = os.pipe()
    try:
        with pytest.raises(ConfigError, match=re.escape(f"--fd {r} is not a socket")):
            startup(tmp_path, socket_path=None, fd=r)
    finally:
        os.close(r)
        os.close(w)
    closed = os.open("/", os.O_RDONLY)
    os.close(closed)
    msg = f"--fd {closed} is not an open file descriptor"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        startup(tmp_path, socket_path=None, fd=closed)


def test_lock_options():
    """Locks are on by default; --no-posix-lock, --no-flock, their -o spellings (libvirt's
    <lock posix='off' flock='off'/>) and the TOML keys turn each off."""
    c = p()
    assert (c.posix_lock, c.flock) == (True, True)
    assert (p("--no-posix-lock").posix_lock, p("--no-posix-lock").flock) == (False, True)
    assert (p("--no-flock").posix_lock, p("--no-flock").flock) == (True, False)
    c = p("-o", "no_posix_lock,no_flock")
    assert (c.posix_lock, c.flock) == (False, False)


def test_lock_options_in_the_file(tmp_path):
    path = write(tmp_path, "shared-dir = \"/srv\"\nsocket-path = \"/run/s\"\n"
                           "posix-lock = false\nflock = false\n")
    c = parse(["--config", path])
    assert (c.posix_lock, c.flock) == (False, False)
    with pytest.raises(ConfigError, match=r"posix-lock.*true or false"):
        parse(["--config", write(tmp_path, "shared-dir = \"/srv\"\nposix-lock = \"no\"\n")])
# -- --migration-state-format ------------------------------------------------------------------

def test_migration_state_format_from_the_command_line_and_the_file(tmp_path):
    assert p().migration_state_format == "pyvirtiofsd"
    assert p("--migration-state-format=virtiofsd").migration_state_format == "virtiofsd"
    path = tmp_path / "c.toml"
    path.write_text('migration-state-format = "virtiofsd"\n')
    assert p("--config", str(path)).migration_state_format == "virtiofsd"
    assert p("--config", str(path), "--migration-state-format=pyvirtiofsd"
             ).migration_state_format == "pyvirtiofsd"


def test_unknown_migration_state_format_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli([*BASE, "--migration-state-format=rust"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--migration-state-format: invalid value 'rust'" in err
