"""The daemon once its sockets listen: set-up and the supervisor's event loop.

supervisor/cli.py has checked the configuration, locked the pid file and opened the listening
sockets; run() then creates the shared state (arena, journals, statistics), compiles the seccomp
policies, enters the sandbox (supervisor/sandbox.py), opens the shared directory from inside it,
starts the spawner and one worker per virtqueue, drops the supervisor's own privileges, and
serves the vhost-user connection.  Every module the daemon needs is imported before it enters
the sandbox, where the Python installation is out of sight.  Signal handlers only record the
signal; the loop acts on it (gunicorn's arbiter habit).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import sys
import time

import prctl

from pyvirtiofsd import __version__
from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.journal import Journal
from pyvirtiofsd.common.seccomp import PolicyError
from pyvirtiofsd.common.stats import Stats, bucket_bounds_us, queue_entry
from pyvirtiofsd.common.vhost_user import HEADER_SIZE, MAX_FDS, Header, HeaderFlag
from pyvirtiofsd.supervisor import log as logsetup
from pyvirtiofsd.supervisor.config import Config, error_exit
from pyvirtiofsd.supervisor.pidfile import PidFile
from pyvirtiofsd.supervisor.procs import EXIT_SETUP_FAILED, FatalDeath, ProcessTable
from pyvirtiofsd.supervisor.sandbox import Sandbox, SandboxError
from pyvirtiofsd.supervisor.status import StatusServer
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
        self.stats = Stats.create(self.num_queues)
        self.started = time.monotonic()
        self.connected = False
        self.status: StatusServer | None = None
        # The FUSE session (INIT state) is shared by every queue, like the arena.
        self.session = Session()
        self.sandbox = Sandbox(config, max(64, self.num_queues))
        # Inflight journals, one per queue: a respawned worker completes what its predecessor
        # left in flight (common/journal.py).
        self.journal = Journal.create(self.num_queues, config.queue_size)
        self.procs = ProcessTable(self.num_queues, self.worker_entry,
                                  confine_spawner=self.sandbox.confine_spawner,
                                  report=self.sandbox.report, journal=self.journal,
                                  stats=self.stats)
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
                              owned_fds=(proc_fd,), stats=self.stats)
        try:
            self.sandbox.confine_worker(queue)
        except OSError as e:
            log.error("worker for queue %d cannot confine itself: %s", queue, e)
            os._exit(EXIT_SETUP_FAILED)
        worker.run()

    def status_doc(self) -> dict:
        """The status document (supervisor/status.py), from the daemon's shared state."""
        procs = self.procs
        inodes, handles = self.arena.usage()
        processes = [{"role": "supervisor", "pid": os.getpid()}]
        if procs.spawner_pid:
            processes.append({"role": "spawner", "pid": procs.spawner_pid})
        queues = []
        for q in range(self.num_queues):
            handle = procs.workers.get(q)
            if handle is not None:
                processes.append({"role": "worker", "queue": q, "pid": handle.pid,
                                  "state": "serving" if handle.up else "starting"})
            else:
                processes.append({"role": "worker", "queue": q, "pid": None,
                                  "state": "failed" if q in procs.policy.failed
                                  else "restarting"})
            queues.append(queue_entry(q, self.stats.snapshot(q),
                                      len(self.journal.queue(q).inflight()),
                                      procs.restarts.get(q, 0)))
        return {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "socket": self.config.socket_path or f"fd {self.config.fd}",
            "shared_dir": self.config.shared_dir,
            "frontend": "connected" if self.connected else "waiting",
            "processes": processes,
            "queues": queues,
            "inodes": inodes,
            "handles": handles,
            "worker_restarts": procs.respawns,
            "latency_buckets_us": bucket_bounds_us(),
        }

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
            status = self.status
            listeners = status.listeners if status is not None else []
            # Signals caught before the wake-up fd existed have no byte waiting on it.
            ready = [wake] if self.signals else select.select(
                [sock, wake, *pidfds, *listeners], [], [], self.procs.next_respawn())[0]
            if status is not None:
                for fd in ready:
                    if fd in listeners:
                        status.serve(fd, self.status_doc)
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
        self.connected = True
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
            self.connected = False
            backend.close()
            conn.close()


def run(config: Config, listener: socket.socket, status_server: StatusServer,
        pidfile: PidFile, starter: int) -> int:
    """Everything after the sockets listen (supervisor/cli.py): the supervisor, its sandbox,
    its workers.  A front-end that connects meanwhile waits in the listen backlog."""
    logsetup.setup(config.log_level, config.syslog, "supervisor")
    for line in config.deprecations:
        log.warning("%s", line)
    prctl.set_name("pyvirtiofsd")
    sup = Supervisor(config)
    sup.status = status_server
    status_server.warn = log.warning
    try:
        sup.sandbox.compile_policies()
    except PolicyError as e:
        error_exit(f"seccomp policy: {e}")
    log.debug("pyvirtiofsd %s starting", __version__)
    try:
        try:
            child = sup.sandbox.enter()
        except SandboxError as e:
            log.error("cannot set up the %s sandbox: %s", config.sandbox, e)
            return 1
        if child:
            listener.close()
            status_server.close()
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
