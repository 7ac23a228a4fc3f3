"""pyvirtiofsd's entry point: configuration, set-up, and the supervisor's event loop.

Order: parse and check the configuration and the seccomp policies (exit 2 on any error, before
anything starts), lock the pid file, create the shared-state arena, open the listening socket,
enter the sandbox (supervisor/sandbox.py), open the shared directory from inside it, start the
spawner and one worker per virtqueue, drop the supervisor's own privileges, then serve the
vhost-user connection.  Signal handlers only record the signal; the loop acts on it (gunicorn's
arbiter habit).
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import select
import signal
import socket
import sys

import prctl

from pyvirtiofsd import __version__
from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.journal import Journal
from pyvirtiofsd.common.seccomp import PolicyError
from pyvirtiofsd.common.vhost_user import HEADER_SIZE, MAX_FDS, Header, HeaderFlag
from pyvirtiofsd.supervisor import log as logsetup
from pyvirtiofsd.supervisor.config import Config, ConfigError, check_startup, error_exit, run_cli
from pyvirtiofsd.supervisor.pidfile import PidFile
from pyvirtiofsd.supervisor.procs import EXIT_SETUP_FAILED, FatalDeath, ProcessTable
from pyvirtiofsd.supervisor.sandbox import Sandbox, SandboxError
from pyvirtiofsd.supervisor.sandbox import check as check_sandbox
from pyvirtiofsd.supervisor.vhost import Backend, Disconnect
from pyvirtiofsd.worker.filesystem import FsOptions
from pyvirtiofsd.worker.fuse_server import Session
from pyvirtiofsd.worker.main import Worker
from pyvirtiofsd.worker.passthrough import PassthroughFs

log = logging.getLogger("pyvirtiofsd")

MESSAGE_TIMEOUT = 10.0   # seconds to receive the rest of a message once it has started
# Options Config.unimplemented() still lists that the sandbox implements.
class Shutdown(Exception):
    pass


def fs_options(config: Config) -> FsOptions:
    return FsOptions(
        cache=str(config.cache),
        readonly=config.readonly,
        xattr=config.xattr,
        writeback=config.writeback,
        allow_direct_io=config.allow_direct_io,
        announce_submounts=config.announce_submounts,
        readdirplus=config.use_readdirplus,
    )


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


def recv_message(conn: socket.socket) -> tuple[Header, bytes, list[int]] | None:
    """One vhost-user message: the header arrives with any fds (spec "Communication")."""
    fds: list[int] = []
    data, anc, flags, _ = conn.recvmsg(HEADER_SIZE, socket.CMSG_SPACE(MAX_FDS * 4))
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(int.from_bytes(cdata[i:i + 4], sys.byteorder)
                       for i in range(0, len(cdata) - len(cdata) % 4, 4))
    try:
        if flags & socket.MSG_CTRUNC:
            # Name the request when its header came whole with the fds, as for other errors.
            what = f"request {Header.unpack(data).request}: " if len(data) == HEADER_SIZE else ""
            raise Disconnect(f"{what}more than {MAX_FDS} file descriptors in one message")
        if not data:
            if fds:
                raise Disconnect("file descriptors without a message")
            return None
        conn.settimeout(MESSAGE_TIMEOUT)
        try:
            while len(data) < HEADER_SIZE:
                more = conn.recv(HEADER_SIZE - len(data))
                if not more:
                    raise Disconnect("connection closed inside a message header")
                data += more
            hdr = Header.unpack(data)
            if not hdr.is_valid():
                raise Disconnect(f"request {hdr.request}: invalid header (flags {hdr.flags:#x},"
                                 f" size {hdr.size})")
            payload = b""
            while len(payload) < hdr.size:
                more = conn.recv(hdr.size - len(payload))
                if not more:
                    raise Disconnect(f"request {hdr.request}: connection closed inside payload")
                payload += more
        except TimeoutError:
            raise Disconnect("a message stayed incomplete for"
                             f" {MESSAGE_TIMEOUT:.0f} s") from None
        finally:
            conn.settimeout(None)
        return hdr, payload, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.num_queues = 1 + config.request_queues
        self.signals: list[int] = []
        self.arena = Arena.create(max_queues=max(64, self.num_queues))
        # The FUSE session (INIT state) is shared by every queue, like the arena.
        self.session = Session()
        self.sandbox = Sandbox(config, max(64, self.num_queues))
        # Inflight journals, one per queue: a respawned worker completes what its predecessor
        # left in flight (common/journal.py).
        self.journal = Journal.create(self.num_queues, config.queue_size)
        self.procs = ProcessTable(self.num_queues, self.worker_entry,
                                  confine_spawner=self.sandbox.confine_spawner,
                                  report=self.sandbox.report, journal=self.journal)
        self.root_fd = -1

    # -- set-up ----------------------------------------------------------------------------
    def open_share(self) -> None:
        """The share's root as seen from inside the sandbox ("/" once pivoted or chrooted)."""
        self.root_fd = os.open(self.sandbox.share_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(self.root_fd)
        self.arena.inodes.set_root(self.root_fd, st.st_dev, st.st_ino)

    def worker_entry(self, queue: int, channel: socket.socket) -> None:
        """Runs in the worker process, which shares the spawner's fd table."""
        logsetup.set_role(f"worker q{queue}")
        prctl.set_name(f"pyvfs-q{queue}")
        prctl.set_pdeathsig(signal.SIGKILL)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        try:
            # Through the sandbox's procfs: there is no /proc at the root of a sandbox.
            proc_fd = os.open("self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                              dir_fd=self.sandbox.proc_fd)
        except OSError as e:
            log.error("worker for queue %d cannot open /proc/self/fd: %s", queue, e)
            os._exit(EXIT_SETUP_FAILED)
        options = fs_options(self.config)
        worker = Worker.build(queue, channel, self.arena, self.session, self.journal,
                              lambda tables: PassthroughFs(tables, proc_fd, options),
                              owned_fds=(proc_fd,), data_plane=self.config.data_plane,
                              poll_us=self.config.poll_us)
        try:
            self.sandbox.confine_worker(queue)
        except OSError as e:
            log.error("worker for queue %d cannot confine itself: %s", queue, e)
            os._exit(EXIT_SETUP_FAILED)
        worker.run()

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def catch_signals(self) -> None:
        # As early as possible: as pid 1 of its namespace, the supervisor never sees a signal
        # it has no handler for.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, listener: socket.socket) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        self.catch_signals()
        keep = {self.root_fd, self.sandbox.proc_fd, *logsetup.fds()}
        self.procs.start(keep)
        os.close(self.root_fd)        # the spawner's fd table holds them now
        os.close(self.sandbox.proc_fd)
        self.sandbox.confine_supervisor()
        for warning in self.config.unimplemented():
            log.warning("%s is accepted but not implemented yet; it has no effect", warning)
        log.info("serving %s on %s with %d request queue(s)", self.config.shared_dir,
                 self.config.socket_path or f"fd {self.config.fd}", self.config.request_queues)
        status = 0
        try:
            conn = self.accept(listener, wake_r)
            if not self.config.reconnect:
                listener.close()
            self.serve(conn, wake_r)
            # --reconnect: filesystem state (inodes, handles, the FUSE session) stays; each
            # connection is a fresh vhost-user session (protocol.md 1.14).
            while self.config.reconnect:
                log.info("waiting for the next front-end (--reconnect)")
                self.serve(self.accept(listener, wake_r), wake_r)
        except Shutdown:
            log.info("terminating on signal")
        except FatalDeath as e:
            log.error("stopping: %s", e)
            status = 1
        finally:
            counts = self.arena.counters.snapshot()[: self.num_queues]
            log.info("requests served per queue: %s",
                     ", ".join(f"q{q}={n}" for q, n in enumerate(counts)))
            self.procs.shutdown()
        return status

    def wait(self, sock: socket.socket, wake: socket.socket) -> bool:
        """Block until `sock` is readable (True) while handling signals and worker deaths."""
        while True:
            pidfds = self.procs.pidfds()
            # Signals caught before the wake-up fd existed have no byte waiting on it.
            ready = [wake] if self.signals else select.select(
                [sock, wake, *pidfds], [], [], self.procs.next_respawn())[0]
            if wake in ready:
                try:
                    wake.recv(64)
                except BlockingIOError:
                    pass
                while self.signals:
                    sig = self.signals.pop(0)
                    if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                        raise Shutdown
            for fd in ready:
                if fd in pidfds:
                    self.procs.worker_exited(pidfds[fd])
            self.procs.respawn_due()
            if sock in ready:
                return True

    def accept(self, listener: socket.socket, wake: socket.socket) -> socket.socket:
        self.wait(listener, wake)
        conn, _ = listener.accept()
        log.info("front-end connected")
        return conn

    def serve(self, conn: socket.socket, wake: socket.socket) -> None:
        backend = Backend(self.procs, self.num_queues, self.config.queue_size, self.config.tag)
        try:
            while True:
                self.wait(conn, wake)
                try:
                    msg = recv_message(conn)
                    if msg is None:
                        log.info("front-end disconnected")
                        return
                    hdr, payload, fds = msg
                    reply = backend.handle(hdr, payload, fds)
                except Disconnect as e:
                    log.error("closing the vhost-user connection: %s", e)
                    return
                except ConnectionError as e:
                    log.info("front-end connection lost: %s", e)
                    return
                if reply is not None:
                    rhdr = Header(hdr.request, 1 | HeaderFlag.REPLY, len(reply))
                    try:
                        conn.sendall(rhdr.pack() + reply)
                    except OSError as e:
                        log.info("front-end connection lost: %s", e)
                        return
        finally:
            backend.close()
            conn.close()


def main(argv: list[str] | None = None) -> int:
    config = run_cli(sys.argv[1:] if argv is None else argv)
    # The pid file first: a second daemon on the same socket is told who holds it.
    pidfile = PidFile()
    try:
        if config.socket_path is not None:
            pidfile.acquire(config.socket_path)
        check_startup(config)
        check_sandbox(config)
    except ConfigError as e:
        pidfile.release()
        error_exit(str(e))
    logsetup.setup(config.log_level, config.syslog, "supervisor")
    for line in config.deprecations:
        log.warning("%s", line)
    prctl.set_name("pyvirtiofsd")
    sup = Supervisor(config)
    try:
        sup.sandbox.compile_policies()
    except PolicyError as e:
        pidfile.release()
        error_exit(f"seccomp policy: {e}")
    try:
        listener = open_listener(config)
    except OSError as e:
        pidfile.release()
        error_exit(f"cannot start: {e.strerror or e} ({e.filename or 'socket'})")
    log.debug("pyvirtiofsd %s starting", __version__)
    # Only the process that created the socket and pid file removes them: inside the sandbox
    # those paths would name files of the share.
    starter = os.getpid()
    try:
        try:
            child = sup.sandbox.enter()
        except SandboxError as e:
            log.error("cannot set up the %s sandbox: %s", config.sandbox, e)
            return 1
        if child:
            listener.close()
            return sup.sandbox.wait(child)
        sup.catch_signals()
        if os.getpid() != starter:
            pidfile.release()        # only closes this process's copy; the lock stays
        sup.open_share()
        return sup.run(listener)
    except OSError as e:
        if e.errno == errno.EPIPE:
            return 0
        log.error("fatal: %s", e)
        return 1
    finally:
        if os.getpid() == starter:
            if config.socket_path is not None:
                try:
                    os.unlink(config.socket_path)
                except OSError:
                    pass
            pidfile.release()


if __name__ == "__main__":
    raise SystemExit(main())
