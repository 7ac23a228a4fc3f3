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

import array
import errno
import logging
import os
import resource
import signal
import socket
import struct
import sys
import time

import prctl

from pyvirtiofsd import __version__
from pyvirtiofsd.common import devstate, native, shm
from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.devstate import DeviceState, StateError
from pyvirtiofsd.common.journal import Journal
from pyvirtiofsd.common.seccomp import PolicyError
from pyvirtiofsd.common.stats import Stats, bucket_bounds_us, queue_entry
from pyvirtiofsd.common.vhost_user import (
    Header,
    HeaderFlag,
    InflightDescription,
    MemoryRegion,
    VringAddr,
)
from pyvirtiofsd.supervisor import log as logsetup
from pyvirtiofsd.supervisor import signals, snapshot, upgrade
from pyvirtiofsd.supervisor.config import Config, error_exit
from pyvirtiofsd.supervisor.dax import DaxWindow
from pyvirtiofsd.supervisor.pidfile import PidFile
from pyvirtiofsd.supervisor.procs import (
    EXIT_SETUP_FAILED,
    FatalDeath,
    ProcessTable,
    readable,
)
from pyvirtiofsd.supervisor.sandbox import Sandbox, SandboxError
from pyvirtiofsd.supervisor.status import ActionError, StatusServer, status_path
from pyvirtiofsd.supervisor.systemd import Notifier
from pyvirtiofsd.supervisor.vhost import Backend, Disconnect, RequestError, receive
from pyvirtiofsd.worker import locks, migration
from pyvirtiofsd.worker.filesystem import FsOptions
from pyvirtiofsd.worker.fuse_server import Session
from pyvirtiofsd.worker.main import Worker
from pyvirtiofsd.worker.passthrough import PassthroughFs

log = logging.getLogger("pyvirtiofsd")

# Share of the open-file limit kept for the daemon's own fds in the table the workers share
# (control channels, guest memory, notifiers, respawns), as virtiofsd keeps about 40 %: the
# guest's inodes and handles get the rest, and past it LOOKUP, OPEN and CREATE answer ENFILE.
FD_RESERVE_SHARE = 0.4
FD_RESERVE_MIN = 64
# Options Config.unimplemented() still lists that the sandbox implements.
class Shutdown(Exception):
    pass


class UpgradeRequested(Exception):
    """A new daemon asked to take over (status socket, GET /upgrade)."""


class HandedOver(Exception):
    """A new daemon took over: this one ends without touching what it now serves."""


# How a sandboxed supervisor that handed over tells its waiting parent, which then leaves the
# socket and pid file to the new daemon.
EXIT_HANDED_OVER = 75


def guest_fd_budget(limit: int) -> int:
    """How many inodes + handles the guest may hold with an open-file limit of `limit`."""
    reserve = max(int(limit * FD_RESERVE_SHARE), FD_RESERVE_MIN)
    return max(limit - reserve, 16)


def file_handles_unusable(root_fd: int, mount_fd: int) -> str | None:
    """Why the share's inodes cannot be kept and found by file handle, or None."""
    try:
        htype, handle, _mnt = migration.file_handle(root_fd)
    except OSError as e:
        return f"the shared directory's filesystem gives no file handles ({e.strerror})"
    if mount_fd < 0:
        return "the shared directory cannot be opened for reading, as open_by_handle_at needs"
    try:
        os.close(migration.open_by_handle(mount_fd, htype, handle, os.O_PATH | os.O_CLOEXEC))
    except OSError as e:
        if e.errno == errno.EPERM:
            return "opening by file handle needs CAP_DAC_READ_SEARCH, which the daemon lacks"
        return f"a file handle of the shared directory does not open ({e.strerror})"
    return None


def fs_options(config: Config) -> FsOptions:
    return FsOptions(
        cache=str(config.cache),
        readonly=config.readonly,
        xattr=config.xattr,
        writeback=config.writeback,
        allow_direct_io=config.allow_direct_io,
        allow_device_nodes=config.allow_device_nodes,
        announce_submounts=config.announce_submounts,
        readdirplus=config.use_readdirplus,
        translate_uid=config.translate_uid,
        translate_gid=config.translate_gid,
        xattrmap=config.xattrmap,
        posix_acl=config.posix_acl,
        security_label=config.security_label,
        killpriv_v2=config.killpriv_v2,
        preserve_noatime=config.preserve_noatime,
        allow_mmap=config.allow_mmap,
        inode_file_handles=config.inode_file_handles,
        migration_mode=config.migration_mode,
        migration_on_error=config.migration_on_error,
        migration_verify_handles=config.migration_verify_handles,
        migration_confirm_paths=config.migration_confirm_paths,
        posix_lock=config.posix_lock,
        flock=config.flock,
        migration_state_format=config.migration_state_format,
    )


class Supervisor:
    # The connected front-end's back-end (None while none is), which a snapshot pauses; and
    # the state --restore-from loads before the front-end is accepted.
    backend: Backend | None = None
    restore: DeviceState | None = None

    def __init__(self, config: Config, adopted: upgrade.Adopted | None = None) -> None:
        self.config = config
        self.num_queues = 1 + config.request_queues
        self.signals: list[int] = []
        # A live upgrade (supervisor/upgrade.py): the state the previous daemon handed over.
        self.adopted = adopted
        self.upgrades = adopted.record.upgrades + 1 if adopted is not None else 0
        self.upgrade_client: socket.socket | None = None
        self.listener: socket.socket | None = None
        if adopted is not None:
            shared = adopted.shared
            self.arena = Arena(shm.attach(shared["arena"]), shared["arena"])
            self.stats = Stats(shm.attach(shared["stats"]), self.num_queues, shared["stats"])
        else:
            self.arena = Arena.create(max_queues=max(64, self.num_queues), keep_fd=True)
            self.stats = Stats.create(self.num_queues, keep_fd=True)
        self.started = time.monotonic()
        self.connected = False
        self.frontends_served = 0      # connections that ended (status: a reconnect's count)
        self.status: StatusServer | None = None
        # The DAX window of the connected front-end (--dax), for the status document.
        self.dax: DaxWindow | None = None
        # The FUSE session (INIT state) is shared by every queue, like the arena.
        self.session = Session(adopted.shared["session"] if adopted is not None else None,
                               keep_fd=True)
        if adopted is not None:
            # Which guest lock owner holds which open file description (worker/locks.py).
            locks.BOARD.adopt(adopted.shared["locks"])
        self.sandbox = Sandbox(config, max(64, self.num_queues))
        # Inflight journals, one per queue: a respawned worker completes what its predecessor
        # left in flight (common/journal.py).
        if adopted is not None:
            fd = adopted.shared["journal"]
            self.journal = Journal(shm.attach(fd), self.num_queues, config.queue_size, fd)
            for q in range(self.num_queues):
                # The fds the previous daemon's workers owned are not in this daemon's table:
                # their numbers may now name the tables' fds, which no worker may close.
                self.journal.queue(q).forget_fds()
        else:
            self.journal = Journal.create(self.num_queues, config.queue_size, keep_fd=True)
        self.procs = ProcessTable(self.num_queues, self.worker_entry,
                                  confine_spawner=self.sandbox.confine_spawner,
                                  report=self.sandbox.report, journal=self.journal,
                                  stats=self.stats)
        self.root_fd = -1
        # The share's filesystem for open_by_handle_at(2) (file-handles migration,
        # --inode-file-handles): a plain directory fd, which O_PATH is not; -1 if it cannot be
        # opened for reading (the worker then reopens the root through /proc).
        self.mount_fd = -1
        # --inode-file-handles prefer/mandatory, usable on this share: the workers keep new
        # inodes as file handles opened through mount_fd (common/state.c), not as O_PATH fds.
        self.inode_handles = False
        # The service manager, if any (systemd's NOTIFY_SOCKET); main() connects it.
        self.notifier = Notifier({})

    # -- set-up ----------------------------------------------------------------------------
    def open_share(self) -> None:
        """The share's root as seen from inside the sandbox ("/" once pivoted or chrooted)."""
        if self.adopted is None:     # else the adopted inode table holds it, at its old number
            self.root_fd = os.open(self.sandbox.share_path,
                                   os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            st = os.fstat(self.root_fd)
            self.arena.inodes.set_root(self.root_fd, st.st_dev, st.st_ino)
        # Opened anew after a live upgrade too: the inodes kept as file handles are opened
        # through it (--inode-file-handles).
        try:
            self.mount_fd = os.open(self.sandbox.share_path,
                                    os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            log.debug("no mount fd for file handles: %s", e.strerror or e)

    def file_handles_refused(self) -> str | None:
        """--inode-file-handles: whether the share's filesystem gives file handles and the
        daemon may open by them (CAP_DAC_READ_SEARCH), asked before any worker needs it.
        mandatory: the reason it cannot be honoured (one line); prefer: a warning, and then
        served without."""
        mode = self.config.inode_file_handles
        if mode == "never":
            return None
        # After a live upgrade the root is in the adopted table; the mount fd names it too.
        root = self.root_fd if self.adopted is None else self.mount_fd
        why = file_handles_unusable(root, self.mount_fd)
        if why is None:
            self.inode_handles = True
            return None
        if mode == "mandatory":
            return f"--inode-file-handles=mandatory: {why}"
        log.warning("--inode-file-handles=prefer: %s; inodes are kept as O_PATH fds", why)
        return None

    def worker_entry(self, queue: int, channel: socket.socket) -> None:
        """Runs in the worker process, which shares the spawner's fd table.  Its channel end is
        among the fds it owns: its successor closes it (worker/recovery.py reclaim)."""
        logsetup.set_role(f"worker q{queue}")
        prctl.set_name(f"pyvfs-q{queue}")
        prctl.set_pdeathsig(signal.SIGKILL)
        # Stop signals are the supervisor's to act on (supervisor/signals.py): a runtime that
        # signals the whole group must not make workers die and be respawned on the way out.
        for sig in signals.HANDLED:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
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
                              owned_fds=(proc_fd, channel.fileno()),
                              data_plane=self.config.data_plane,
                              poll_us=self.config.poll_us, stats=self.stats,
                              options=options, mount_fd=self.mount_fd,
                              inode_handles=self.inode_handles)
        try:
            self.sandbox.confine_worker(queue)
        except OSError as e:
            log.error("worker for queue %d cannot confine itself: %s", queue, e)
            os._exit(EXIT_SETUP_FAILED)
        native.settle_memory()
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
            "frontends_served": self.frontends_served,
            "processes": processes,
            "queues": queues,
            "inodes": inodes,
            "handles": handles,
            "worker_restarts": procs.respawns,
            "upgrades": self.upgrades,
            "latency_buckets_us": bucket_bounds_us(),
            **self._dax_status(),
        }

    def _dax_status(self) -> dict:
        """With --dax: the window the guest may use now (0: none) and what is mapped in it."""
        if not self.config.dax:
            return {}
        w = self.dax
        active = w is not None and w.active
        return {"dax": {"window_bytes": w.size if active else 0,
                        "requests": w.family.name if active else None,
                        "mappings": len(w.mappings) if active else 0,
                        "mapped_bytes": sum(m.length for m in w.mappings) if active else 0}}

    # -- live upgrade (supervisor/upgrade.py) -------------------------------------------------
    def request_upgrade(self, client: socket.socket) -> None:
        """A new daemon asks to take over (status socket): only a peer of this daemon's user
        or root, one at a time; the loop hands over between two vhost-user messages."""
        uid = struct.unpack("=iII", client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      12))[1]
        if uid not in (0, os.getuid()) or self.upgrade_client is not None:
            client.close()
            return
        self.upgrade_client = client

    def hand_over(self, backend: Backend | None, conn: socket.socket | None) -> bool:
        """Stop every started ring at an exact index, offer the state, and end if the new
        daemon took it (True); else restart the rings where they stopped and serve on."""
        client, self.upgrade_client = self.upgrade_client, None
        assert client is not None
        stopped: list[int] = []
        try:
            if backend is not None:
                for i, vring in enumerate(backend.vrings):
                    if vring.started:
                        vring.base = self.procs.stop_ring(i)
                        vring.started = False
                        stopped.append(i)
            upgrade.offer(client, self.handover_record(backend, conn, stopped))
        except (upgrade.Refused, OSError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            upgrade.refuse(client, why)
            assert backend is not None or not stopped
            for i in stopped:
                try:
                    backend._start(i, backend.vrings[i])    # type: ignore[union-attr]
                except RequestError as re:
                    log.error("vring %d did not restart: %s", i, re)
            log.error("live upgrade failed: %s; this daemon serves on", why)
            return False
        finally:
            client.close()
        log.info("live upgrade: handed over to a new daemon after stopping %d ring(s)",
                 len(stopped))
        return True

    def handover_record(self, backend: Backend | None, conn: socket.socket | None,
                        started: list[int]) -> upgrade.Record:
        frontend = None
        if backend is not None:
            # Connection state the handover record does not carry yet: refused, and this
            # daemon serves on (docs/restart.md).
            if backend.dirty_log is not None:
                raise upgrade.Refused("dirty logging is on (a migration is under way);"
                                      " upgrade once it is over")
            if backend.dax is not None and backend.dax.channel is not None:
                raise upgrade.Refused("the DAX back-end channel cannot be handed over")
            if any(v.sleeping for v in backend.vrings):
                raise upgrade.Refused("the rings are asleep (crosvm SLEEP); upgrade after WAKE")
            vrings = []
            for i, v in enumerate(backend.vrings):
                a = v.addr or VringAddr(i, 0, 0, 0, 0, 0)
                vrings.append(upgrade.Vring(v.num, a.desc, a.used, a.avail, a.log, a.flags,
                                            v.base, v.kick, v.call, v.err, v.enabled,
                                            i in started))
            inflight = None
            if backend.inflight is not None:
                fd, d = backend.inflight
                inflight = (fd, d.mmap_size, d.mmap_offset, d.num_queues, d.queue_size)
            frontend = upgrade.Frontend(
                backend.acked_features, backend.protocol_features, backend.status,
                tuple((r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, fd)
                      for r, fd in backend.regions), inflight, tuple(vrings))
        listener = self.listener.fileno() if self.listener is not None else None
        # The command line the daemon was started with (a daemon that took over was started
        # as `pyvirtiofsd upgrade SOCKET`: its predecessor's).
        argv = self.adopted.record.argv if self.adopted is not None else tuple(sys.argv[1:])
        return upgrade.Record(
            argv, os.getpid(), self.procs.spawner_pid, listener,
            conn.fileno() if conn is not None else None,
            {"arena": self.arena.fd, "journal": self.journal.fd, "stats": self.stats.fd,
             "session": self.session.fd, "locks": locks.BOARD.fd}, self.upgrades, frontend)

    def adopt_backend(self, adopted: upgrade.Adopted) -> Backend:
        """The connection's device state as the previous daemon left it, its rings restarted
        where they stopped: each worker resumes from its journal."""
        backend = Backend(self.procs, self.num_queues, self.config.queue_size, self.config.tag)
        fe = adopted.record.frontend
        if fe is None:
            return backend
        backend.owner = True
        backend.acked_features = fe.features
        backend.protocol_features = fe.protocol_features
        backend.status = fe.status
        backend._apply_regions([(MemoryRegion(g, n, u, o), adopted.fds[fd])
                                for g, n, u, o, fd in fe.regions])
        if fe.inflight is not None:
            fd, size, offset, nq, qs = fe.inflight
            backend._use_inflight(adopted.fds[fd], InflightDescription(size, offset, nq, qs))
        for i, v in enumerate(fe.vrings[: self.num_queues]):
            vring = backend.vrings[i]
            vring.num, vring.base, vring.enabled = v.num, v.base, v.enabled
            vring.addr = VringAddr(i, v.flags, v.desc, v.used, v.avail, v.log)
            vring.kick, vring.call, vring.err = (adopted.fd(v.kick), adopted.fd(v.call),
                                                 adopted.fd(v.err))
            if v.started:
                try:
                    backend._start(i, vring)
                except RequestError as e:
                    log.error("vring %d did not restart after the upgrade: %s", i, e)
        return backend

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def catch_signals(self) -> None:
        """Install the handlers and unblock (supervisor/signals.py): what arrived while they were
        blocked is recorded now, and the loop acts on it before anything else."""
        signals.handled_by(dict.fromkeys(signals.HANDLED, self.on_signal))

    # -- the loop ----------------------------------------------------------------------------
    def run(self, listener: socket.socket | None) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        self.procs.wake_fd = wake_r.fileno()
        self.procs.stopping = lambda: bool(self.signals)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.arena.limit_fds(guest_fd_budget(limit))
        log.debug("the guest may hold %d inodes and open files (open-file limit %d)",
                  self.arena.fd_budget, limit)
        table = self.adopted.table if self.adopted is not None else []
        keep = {self.root_fd, self.mount_fd, self.sandbox.proc_fd, *logsetup.fds(),
                *table} - {-1}
        self.procs.start(keep)
        for fd in (self.root_fd, self.mount_fd, *table):
            if fd >= 0:
                os.close(fd)          # the spawner's fd table holds them now
        if self.adopted is not None:
            # The sockets the loop select()s on, down into the numbers the tables' fds held
            # while the spawner started (select() takes numbers below FD_SETSIZE only).
            if self.adopted.conn is not None:
                self.adopted.conn = upgrade.lower(self.adopted.conn)
            if listener is not None:
                listener = socket.socket(fileno=upgrade.lower(listener.detach()))
        # Kept to read /proc/PID/stat of a worker that does not answer (procs.py _answer).
        self.procs.proc_fd = os.dup(self.sandbox.proc_fd)
        os.close(self.sandbox.proc_fd)
        self.sandbox.confine_supervisor()
        if self.restore is not None and not self.restore_state():
            self.procs.shutdown()
            return 2
        for warning in self.config.unimplemented():
            log.warning("%s is accepted but not implemented yet; it has no effect", warning)
        where = self.config.socket_path or f"fd {self.config.fd}"
        log.info("serving %s on %s with %d request queue(s)", self.config.shared_dir,
                 where, self.config.request_queues)
        # virtiofsd's words: Kata's runtime-rs waits for this line on stderr before it starts
        # the VM (share_virtio_fs_standalone.rs).
        log.info("Waiting for vhost-user socket connection...")
        self.notifier.ready(f"serving {self.config.shared_dir} on {where}; "
                            "waiting for the front-end")
        if self.adopted is not None and self.adopted.serving >= 0:
            os.write(self.adopted.serving, b"serving")      # `pyvirtiofsd upgrade` returns
            os.close(self.adopted.serving)
            self.adopted.serving = -1
        status = 0
        why = "stopping on an error"
        self.listener = listener
        handed_over = False
        try:
            adopted = self.adopted
            if adopted is not None:
                log.info("took over from pid %d (live upgrade %d)", adopted.record.pid,
                         self.upgrades)
            if adopted is not None and adopted.conn is not None:
                conn = socket.socket(fileno=adopted.conn)
                backend = self.adopt_backend(adopted)
            else:
                conn, backend = self.accept(listener, wake_r), None
            if not self.config.reconnect and listener is not None:
                listener.close()
                self.listener = None
            self.serve(conn, wake_r, backend)
            # --reconnect: filesystem state (inodes, handles, the FUSE session) stays; each
            # connection is a fresh vhost-user session (protocol.md 1.14).
            while self.config.reconnect:
                log.info("waiting for the next front-end (--reconnect)")
                self.notifier.status("front-end disconnected; waiting for the next (--reconnect)")
                self.serve(self.accept(listener, wake_r), wake_r)
            why = "front-end disconnected"
        except HandedOver:
            handed_over = True
            raise
        except Shutdown:
            log.info("terminating on signal")
            why = "terminating on signal"
        except FatalDeath as e:
            log.error("stopping: %s", e)
            why = f"stopping: {e}"
            status = 1
        finally:
            if not handed_over:
                self.notifier.stopping(why)
            counts = self.arena.counters.snapshot()[: self.num_queues]
            log.info("requests served per queue: %s",
                     ", ".join(f"q{q}={n}" for q, n in enumerate(counts)))
            self.procs.shutdown()
        return status

    def wait(self, sock: socket.socket, wake: socket.socket) -> bool:
        """Block until `sock` is readable (True) while handling signals and worker deaths."""
        while True:
            pidfds = self.procs.pidfds()
            # Workers' own requests (the DAX window) arrive on their channels.
            channels = self.procs.channels() if self.procs.dax is not None else {}
            status = self.status
            listeners = status.listeners if status is not None else []
            # Signals caught before the wake-up fd existed have no byte waiting on it.
            ready = [wake] if self.signals else readable(
                [sock, wake, *pidfds, *listeners, *channels], self.procs.next_respawn())
            if status is not None:
                for fd in ready:
                    if fd in listeners:
                        status.serve(fd, self.status_doc)
            if self.upgrade_client is not None:
                raise UpgradeRequested
            if wake in ready:
                try:
                    wake.recv(64)
                except BlockingIOError:
                    pass
                while self.signals:
                    sig = self.signals.pop(0)
                    if sig in signals.HANDLED:
                        raise Shutdown
            for fd in ready:
                if fd in pidfds:
                    self.procs.worker_exited(pidfds[fd])
            for fd in ready:
                if fd in channels and channels[fd] in self.procs.workers:
                    self.procs.channel_readable(channels[fd])
            self.procs.respawn_due()
            if sock in ready:
                return True

    def accept(self, listener: socket.socket, wake: socket.socket) -> socket.socket:
        while True:
            try:
                self.wait(listener, wake)
                break
            except UpgradeRequested:
                if self.hand_over(None, None):
                    raise HandedOver from None
        conn, _ = listener.accept()
        log.info("front-end connected")
        self.notifier.status("front-end connected; serving")
        return conn

    def serve(self, conn: socket.socket, wake: socket.socket,
              backend: Backend | None = None) -> None:
        if backend is None:
            backend = Backend(self.procs, self.num_queues, self.config.queue_size,
                              self.config.tag)
        if self.config.dax:
            window = DaxWindow(self.config.dax_window, self.arena, self._publish_dax)
            backend.dax = window
            self.procs.dax = window.answer
            self.dax = window
        self.connected = True
        self.backend = backend
        try:
            while True:
                try:
                    self.wait(conn, wake)
                except UpgradeRequested:
                    if self.hand_over(backend, conn):
                        raise HandedOver from None
                    continue
                try:
                    msg = receive(conn)
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
                    out = backend.take_reply_fds()
                    try:
                        if out:
                            # The fds go with the header (spec "Communication").
                            conn.sendmsg([rhdr.pack() + reply], [(
                                socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", out))])
                        else:
                            conn.sendall(rhdr.pack() + reply)
                    except OSError as e:
                        log.info("front-end connection lost: %s", e)
                        return
                    finally:
                        for fd in out:
                            os.close(fd)
        finally:
            self.backend = None
            self.connected = False
            self.frontends_served += 1
            backend.close()
            self.procs.dax = None
            self.dax = None
            conn.close()

    # -- snapshot and restore (supervisor/snapshot.py) ----------------------------------------
    def restore_state(self) -> bool:
        """--restore-from: the state loaded by the first queue's worker, before the front-end
        is accepted; the guest's FUSE session is the state's (no INIT comes again).  A load
        applies all of the state or nothing (worker/migration.py apply)."""
        state = self.restore
        assert state is not None
        try:
            snapshot.give(devstate.encode(state), self.procs.load_state, self.procs.check_state)
        except OSError as e:
            log.error("--restore-from %s: the state was not applied (%s): see the refusal"
                      " above", self.config.restore_from, snapshot.describe(e))
            return False
        self.restore = None
        log.info("restored from %s: %d inodes, %d handles, FUSE session %s",
                 self.config.restore_from, len(state.inodes), len(state.handles),
                 f"7.{state.session.minor}" if state.session.minor else "not started")
        return True

    def snapshot(self) -> bytes:
        """POST /snapshot on the status socket: the device state, taken with every ring
        paused at an exact index and resumed at it afterwards."""
        backend = self.backend
        paused: list[int] = []
        began = time.monotonic()
        try:
            if backend is not None:
                paused = backend.pause_rings()
            data = snapshot.take(self.procs.save_state, self.procs.check_state)
        except OSError as e:
            why = snapshot.describe(e)
            log.warning("snapshot refused: the device state cannot be taken: %s", why)
            raise ActionError(f"the device state cannot be taken: {why}", 500,
                              "Internal Server Error") from None
        finally:
            if backend is not None:
                backend.resume_rings(paused)
        log.info("snapshot taken: %d bytes, %d ring(s) paused for %.1f ms", len(data),
                 len(paused), (time.monotonic() - began) * 1e3)
        return data

    def _publish_dax(self, size: int) -> None:
        """Tell the workers whether the guest may be offered DAX (FUSE_INIT reads it)."""
        self.session.dax_window = size


def run(config: Config, listener: socket.socket | None, status_server: StatusServer,
        pidfile: PidFile, starter: int, restore: DeviceState | None = None,
        adopted: upgrade.Adopted | None = None) -> int:
    """Everything after the sockets listen (supervisor/cli.py): the supervisor, its sandbox,
    its workers.  A front-end that connects meanwhile waits in the listen backlog."""
    logsetup.setup(config.log_level, config.syslog, "supervisor")
    for line in config.deprecations:
        log.warning("%s", line)
    prctl.set_name("pyvirtiofsd")
    sup = Supervisor(config, adopted)
    sup.status = status_server
    if restore is not None:
        try:
            # What the state needs of this daemon's options, before anything starts.
            migration.check_compatible(restore, fs_options(config))
        except StateError as e:
            log.error("--restore-from %s: %s", config.restore_from, e)
            return 2
        sup.restore = restore
    if config.socket_path is not None:
        # Only SOCKET.status takes actions, never --metrics-socket.
        control = status_path(config.socket_path)
        status_server.action_listeners = [
            sock for sock, path in zip(status_server.listeners, status_server.paths,
                                       strict=True) if path == control]
        status_server.actions[snapshot.SNAPSHOT_PATH] = sup.snapshot
    status_server.upgrade = sup.request_upgrade
    # Connected before the sandbox hides the manager's socket (supervisor/systemd.py).
    sup.notifier = Notifier()
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
            if listener is not None:
                listener.close()
            status_server.close()
            if adopted is not None:
                # The sandboxed supervisor has them; this process only waits.
                adopted.close()
            status = sup.sandbox.wait(child)
            if status == EXIT_HANDED_OVER:
                raise HandedOver
            return status
        sup.catch_signals()
        if os.getpid() != starter:
            pidfile.release()        # only closes this process's copy; the lock stays
        sup.open_share()
        refused = sup.file_handles_refused()
        if refused:
            log.error("%s", refused)
            return 2
        return sup.run(listener)
    except OSError as e:
        if e.errno == errno.EPIPE:
            return 0
        log.error("fatal: %s", e)
        return 1
