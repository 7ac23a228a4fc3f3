"""pyvirtiofsd's entry point: from exec to listening sockets, then the daemon.

A runtime starts one daemon per VM and waits for its socket before it boots the guest, so the
socket listens as early as it safely can: parse and check the configuration (exit 2 on any
error, before anything starts), lock the pid file, open the vhost-user socket and the status
sockets -- and only then import and build the rest of the daemon (supervisor/daemon.py).  A
front-end that connects meanwhile waits in the listen backlog; nothing it sends is lost.  This
module therefore imports only what those steps need (`python -X importtime` shows it).

`pyvirtiofsd status ...` is answered by supervisor/statuscmd.py.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import sys
from typing import NoReturn

from pyvirtiofsd.supervisor import signals
from pyvirtiofsd.supervisor.config import (
    Config,
    ConfigError,
    check_sandbox_options,
    check_startup,
    error_exit,
    run_cli,
)
from pyvirtiofsd.supervisor.pidfile import PidFile
from pyvirtiofsd.supervisor.status import StatusServer, status_path
from pyvirtiofsd.supervisor.systemd import take_listen_fd


def open_listener(config: Config) -> socket.socket:
    if config.fd is not None:
        return socket.socket(fileno=config.fd)
    path = config.socket_path
    assert path is not None
    if os.path.exists(path):
        os.unlink(path)          # stale: check_startup refused a live one
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    if config.socket_group is not None:
        os.chown(path, -1, grp.getgrnam(config.socket_group).gr_gid)
        os.chmod(path, 0o660)
    sock.listen(1)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["status"]:
        from pyvirtiofsd.supervisor import statuscmd

        return statuscmd.main(args[1:])
    if args[:1] == ["snapshot"]:
        from pyvirtiofsd.supervisor import snapshot

        return snapshot.main(args[1:])
    if args[:1] == ["upgrade"]:
        from pyvirtiofsd.supervisor import upgrade

        return upgrade.main(args[1:])
    # Before anything else the daemon does: a signal that arrives now waits for the handler of
    # the process that will serve (supervisor/signals.py).
    signals.block()
    try:
        activated_fd = take_listen_fd()
    except ConfigError as e:
        error_exit(str(e))
    config = run_cli(args, activated_fd=activated_fd)
    # The pid file first: a second daemon on the same socket is told who holds it.
    pidfile = PidFile()
    try:
        if config.socket_path is not None:
            pidfile.acquire(config.socket_path)
        check_startup(config)
        check_sandbox_options(config)
    except ConfigError as e:
        pidfile.release()
        error_exit(str(e))
    restore = None
    if config.restore_from is not None:
        # Read and checked whole before the socket listens: a bad file starts nothing.
        from pyvirtiofsd.supervisor import snapshot

        try:
            restore = snapshot.read_restore(config.restore_from)
        except (OSError, ValueError) as e:
            pidfile.release()
            error_exit(f"--restore-from {config.restore_from}: {snapshot.describe(e)}")
    try:
        listener = open_listener(config)
    except OSError as e:
        pidfile.release()
        error_exit(f"cannot start: {e.strerror or e} ({e.filename or 'socket'})")
    status_paths = ([status_path(config.socket_path)] if config.socket_path else []) + (
        [config.metrics_socket] if config.metrics_socket else [])
    try:
        status_server = StatusServer.open(status_paths, config.socket_group)
    except OSError as e:
        listener.close()
        if config.socket_path is not None:
            os.unlink(config.socket_path)
        pidfile.release()
        error_exit(f"cannot start: {e.strerror or e} ({e.filename or 'status socket'})")
    _serve(config, listener, status_server, pidfile, restore=restore)


def _serve(config: Config, listener: socket.socket | None, status_server: StatusServer,
           pidfile: PidFile, adopted: object = None, restore: object = None) -> NoReturn:
    # Only the process that created the sockets and the pid file removes them: inside the
    # sandbox those paths would name files of the share.  A daemon that handed over to a new
    # one (supervisor/upgrade.py) leaves them to it.
    starter = os.getpid()
    handed_over = False
    try:
        from pyvirtiofsd.supervisor import daemon

        try:
            status = daemon.run(config, listener, status_server, pidfile, starter,
                                restore=restore, adopted=adopted)  # type: ignore[arg-type]
        except daemon.HandedOver:
            # A sandboxed supervisor says so to the parent that waits for it.
            handed_over = True
            status = 0 if os.getpid() == starter else daemon.EXIT_HANDED_OVER
    finally:
        if os.getpid() == starter and not handed_over:
            if config.socket_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(config.socket_path)
            status_server.unlink()
            pidfile.release()
    exit_now(status)


def serve_adopted(config: Config, adopted: object) -> int:
    """The rest of `pyvirtiofsd upgrade`, once the old daemon is gone: its pid file and status
    sockets become this daemon's, its vhost-user socket was taken over."""
    signals.block()
    pidfile = PidFile()
    try:
        if config.socket_path is not None:
            pidfile.acquire(config.socket_path)
        status_paths = ([status_path(config.socket_path)] if config.socket_path else []) + (
            [config.metrics_socket] if config.metrics_socket else [])
        status_server = StatusServer.open(status_paths, config.socket_group)
    except (ConfigError, OSError) as e:
        sys.stderr.write(f"pyvirtiofsd upgrade: cannot take over: {e}\n")
        return 1
    fd = adopted.listener                                   # type: ignore[attr-defined]
    _serve(config, socket.socket(fileno=fd) if fd is not None else None, status_server,
           pidfile, adopted)


def exit_now(status: int) -> NoReturn:
    """End the process once the daemon is done, without the interpreter's teardown.

    Freeing every module costs a few tens of milliseconds per process, twice with a sandbox
    (the supervisor, then its parent), and a runtime that stops a VM waits for the daemon to
    exit.  Nothing is left to do at that point but to flush what was logged and printed: the
    workers and the spawner are gone and the sockets and pid file removed.
    """
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    raise SystemExit(main())
