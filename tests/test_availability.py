"""Availability under a hostile or slow guest: what the guest or a slow host can do to the
daemon must not stop it from serving (stalled log readers, fd exhaustion, requests stuck in a
host system call, a dead spawner)."""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.virtio import DescFlag
from pyvirtiofsd.supervisor.daemon import guest_fd_budget
from pyvirtiofsd.supervisor.procs import ProcessTable, ProcSample, asleep_in_kernel
from pyvirtiofsd.supervisor.respawn import MAX_BOOT_FAILURES
from tests.conftest import DAEMON, Daemon
from tests.frontend import Frontend, FuseClient, FuseError
from tests.proctree import children, fd_count

ROOT = fa.ROOT_ID
_WRITE = int(DescFlag.WRITE)
_NEXT = int(DescFlag.NEXT)


class Quiet:
    """A daemon whose stderr is read until it serves, then no more: a stalled log reader."""

    def __init__(self, share: Path, sock: str, *args: str) -> None:
        self.socket = sock
        self.proc = subprocess.Popen(
            [str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}", "--sandbox=none",
             "--log-level=info", *args], stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        self.head: list[bytes] = []
        for line in self.proc.stderr:
            self.head.append(line)
            if b"serving " in line:
                break
        else:
            raise AssertionError(b"".join(self.head).decode())
        self.rest = b""
        self._drain: threading.Thread | None = None

    def resume_reading(self) -> None:
        def drain() -> None:
            assert self.proc.stderr is not None
            self.rest = self.proc.stderr.read()
        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()

    def stop(self) -> str:
        if self._drain is None:
            self.resume_reading()
        if self.proc.poll() is None:
            self.proc.terminate()
        status = self.proc.wait(timeout=20)
        assert self._drain is not None
        self._drain.join(timeout=20)
        assert status == 0, self.rest.decode(errors="replace")
        return (b"".join(self.head) + self.rest).decode(errors="replace")


@pytest.fixture
def quiet(tmp_path: Path, share: Path) -> Iterator[Quiet]:
    d = Quiet(share, str(tmp_path / "q.sock"), "--request-queues=1")
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


# --- item: logging a guest can trigger -----------------------------------------------------

FLOOD = 3000


def test_a_stalled_log_reader_does_not_stall_the_device(quiet: Quiet) -> None:
    """Malformed chains make the worker warn for each; with nobody reading its stderr it must
    still complete every chain and keep serving (the pipe holds ~500 such lines)."""
    fe = Frontend.connect(quiet.socket, process=quiet.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        vq = fe.queue(1)
        good = fe.memory.alloc(4096)
        for _ in range(FLOOD):
            a, b = vq.alloc_desc(), vq.alloc_desc()
            vq.write_desc(a, good, 40, _NEXT, b)
            vq.write_desc(b, 1 << 40, 64, _WRITE)        # outside guest memory
            assert vq.wait(vq.publish(a, descs=[a, b])).used_len == 0
        assert c.getattr(ROOT).attr.ino > 0
        # The control plane too: a round trip to the worker of the flooded queue.
        fe.get_vring_base(1)
    finally:
        fe.close()
    text = quiet.stop()
    warned = text.count("malformed descriptor chain")
    assert 0 < warned < FLOOD // 10, warned


# --- item: the spawner is not a single point of failure -------------------------------------


def _wait_count(d: Daemon, text: str, n: int, timeout: float = 30.0) -> None:
    """Until the daemon logged `text` n times."""
    deadline = time.monotonic() + timeout
    while d.text.count(text) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} logged fewer than {n} times:\n{d.text}"
        try:
            line = d.lines.get(timeout=left)
        except queue.Empty:
            continue
        assert line is not None, f"the daemon exited:\n{d.text}"


def _supervisor(d: Daemon) -> int:
    """The supervisor's pid: the daemon itself, or its child inside the namespace sandbox."""
    inside = [p for p, n in children(d.proc.pid).items() if n == "pyvfs-sup"]
    return inside[0] if inside else d.proc.pid


def _named(d_pid: int, name: str) -> int:
    (pid,) = [p for p, n in children(d_pid).items() if n == name]
    return pid


def test_a_killed_spawner_is_replaced_and_the_guest_sees_nothing(daemon_factory) -> None:
    d = daemon_factory("--request-queues=1")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        (d.share / "f").write_bytes(b"")
        node = c.lookup(ROOT, "f").nodeid
        fh = c.open(node, os.O_RDWR).fh
        table = fd_count(_named(d.proc.pid, "pyvfs-spawner"))
        for n in range(3):
            spawner = _named(d.proc.pid, "pyvfs-spawner")
            standby = _named(d.proc.pid, "pyvfs-standby")
            os.kill(spawner, signal.SIGKILL)
            d.wait_for(f"the spawner (pid {spawner}) was killed by SIGKILL; its standby"
                       f" (pid {standby}) takes over")
            # The guest's open file works on, across the change.
            data = bytes([n]) * 4096
            assert c.write(node, fh, n * 4096, data) == len(data)
            assert c.read(node, fh, n * 4096, len(data)) == data
            # A round trip through the supervisor's loop: the new standby is up.
            fe.get_features()
            assert _named(d.proc.pid, "pyvfs-spawner") == standby
            # A worker killed now is replaced through the new spawner, and the request it
            # held completes.
            worker = _named(d.proc.pid, "pyvfs-q1")
            os.kill(worker, signal.SIGKILL)
            assert c.read(node, fh, 0, 4096 * (n + 1)) == b"".join(
                bytes([k]) * 4096 for k in range(n + 1))
            assert _named(d.proc.pid, "pyvfs-q1") != worker
            # No fd of the dead (channels, pidfds) is left in the table every worker shares.
            assert fd_count(_named(d.proc.pid, "pyvfs-spawner")) == table
        c.release(node, fh)
        c.forget(node, 1)
    finally:
        fe.close()
    assert d.proc.wait(timeout=20) == 0, d.text
    assert "stopping" not in d.text and "Traceback" not in d.text, d.text


# --- item: a slow request never gets a healthy worker killed --------------------------------


@pytest.mark.parametrize("sandbox", ["none", "namespace"])
def test_a_request_asleep_in_the_kernel_keeps_its_worker(daemon_factory, sandbox: str) -> None:
    """OPEN for writing of a file the host holds a read lease on sleeps in open(2) until the
    lease is given up (lease-break-time, 45 s by default).  Control messages for that queue
    meanwhile: those the supervisor can answer alone are answered at once, GET_VRING_BASE waits
    past the answer timeout because the worker is asleep in the kernel with a request in
    flight, and nothing is killed or replayed."""
    d = daemon_factory("--request-queues=1", f"--sandbox={sandbox}", "--seccomp=kill")
    sup = _supervisor(d)
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    holder: LeaseHolder | None = None
    try:
        c = FuseClient(fe)
        c.init()
        path = d.share / "leased"
        path.write_bytes(b"x")
        node = c.lookup(ROOT, "leased").nodeid
        holder = LeaseHolder(path)
        worker = _named(sup, "pyvfs-q1")
        token = c.submit(fa.Opcode.OPEN, node, fa.OPEN_IN.pack(os.O_WRONLY, 0))
        holder.wait_broken()
        # Answered by the supervisor alone (REPLY_ACK): the worker takes it between requests.
        fe.timeout = 3.0
        fe.set_vring_enable(1, True)
        fe.timeout = 60.0
        stopped: list[int | BaseException] = []

        def stop() -> None:
            try:
                stopped.append(fe.get_vring_base(1))
            except BaseException as e:
                stopped.append(e)

        t = threading.Thread(target=stop, daemon=True)
        t.start()
        # The supervisor read the worker's state through its procfs (the sandbox's own).
        d.wait_for("asleep in a system call serving OPEN")
        holder.give_up()
        t.join(timeout=30)
        assert stopped and isinstance(stopped[0], int), stopped
        reply = c.result(token, timeout=10)
        assert reply.error == 0
        assert _named(sup, "pyvfs-q1") == worker
        assert "killed" not in d.text and "completing" not in d.text, d.text
    finally:
        if holder is not None:
            holder.close()
        fe.close()


def test_a_stopped_worker_is_still_replaced(daemon_factory) -> None:
    """The other side of the slow-request rule: a worker that does not answer and is not
    asleep in a system call (here stopped, SIGSTOP) is killed after the answer timeout, and
    GET_VRING_BASE is answered from its journal."""
    d = daemon_factory("--request-queues=1")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        c.getattr(ROOT)
        worker = _named(d.proc.pid, "pyvfs-q1")
        os.kill(worker, signal.SIGSTOP)
        fe.timeout = 60.0
        assert fe.get_vring_base(1) == fe.queue(1).avail_idx
        line = d.wait_for(f"worker for queue 1 (pid {worker}) was killed by SIGKILL")
        assert "no request in flight" in line, line
        assert "did not answer: killing it" in d.text, d.text
        assert "asleep in a system call" not in d.text, d.text
    finally:
        fe.close()


@pytest.mark.parametrize(("state", "cpu", "waited_for"), [
    ("S", 0.1, True), ("D", 0.0, True),        # asleep in a system call
    ("R", 0.0, False), ("S", 9.0, False),      # running, or busy between short sleeps
    ("T", 0.0, False), ("Z", 0.0, False),      # stopped, dead
])
def test_only_a_worker_asleep_in_the_kernel_is_waited_for(state: str, cpu: float,
                                                          waited_for: bool) -> None:
    before = ProcSample("S", 1.0, 100.0)
    assert asleep_in_kernel(before, ProcSample(state, 1.0 + cpu, 110.0)) is waited_for
    assert not asleep_in_kernel(None, ProcSample(state, 1.0 + cpu, 110.0))


def test_proc_samples_tell_a_blocked_process_from_a_spinning_one() -> None:
    r, w = os.pipe()
    blocked = subprocess.Popen(["python3", "-c", "import os; os.write(1, b'r'); os.read(0, 1)"],
                               stdin=r, stdout=subprocess.PIPE)
    spinning = subprocess.Popen(["python3", "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 20
        assert blocked.stdout is not None and blocked.stdout.read(1) == b"r"
        while (ProcSample.read(blocked.pid) or ProcSample("?", 0, 0)).state != "S":
            assert time.monotonic() < deadline, "the reader never blocked"
        first = {p.pid: ProcSample.read(p.pid) for p in (blocked, spinning)}
        # Over a few CPU ticks: one asleep in read(2), the other using its CPU.
        while True:
            last = {p.pid: ProcSample.read(p.pid) for p in (blocked, spinning)}
            if last[blocked.pid].at - first[blocked.pid].at > 0.3 and \
                    last[spinning.pid].cpu > first[spinning.pid].cpu:
                break
            assert time.monotonic() < deadline, (first, last)
        assert asleep_in_kernel(first[blocked.pid], last[blocked.pid]), last
        assert not asleep_in_kernel(first[spinning.pid], last[spinning.pid]), last
    finally:
        for p in (blocked, spinning):
            p.kill()
            p.wait()
        os.close(r)
        os.close(w)


# --- item: fd exhaustion -----------------------------------------------------------------------

NOFILE = 256


def test_the_guest_cannot_take_the_fds_the_daemon_needs(daemon_factory) -> None:
    """LOOKUP without FORGET and OPEN without RELEASE stop at the budget (ENFILE, the
    daemon keeps 40 % of the open-file limit); control messages carrying fds, a respawn and
    new requests still work, and a FORGET gives room back."""
    d = daemon_factory("--request-queues=1", f"--rlimit-nofile={NOFILE}")
    budget = guest_fd_budget(NOFILE)
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        for n in range(NOFILE):
            (d.share / f"f{n}").write_bytes(b"x")
        held: list[int] = []
        refused = 0
        for n in range(NOFILE):
            try:
                held.append(c.lookup(ROOT, f"f{n}").nodeid)
            except FuseError as e:
                assert e.errno == errno.ENFILE, e
                refused += 1
        assert len(held) == budget - 1            # the root is one of them
        with pytest.raises(FuseError) as ei:
            c.open(ROOT, os.O_RDONLY | os.O_DIRECTORY)
        assert ei.value.errno == errno.ENFILE
        # A control message with an fd for the queue's worker: received and applied.
        vq = fe.queue(1)
        fe.set_vring_call(1, vq.call_fd)
        assert c.getattr(held[0]).attr.ino > 0
        # A worker dying now is replaced: its successor finds the fds it needs.
        worker = _named(d.proc.pid, "pyvfs-q1")
        os.kill(worker, signal.SIGKILL)
        assert c.getattr(held[-1]).attr.ino > 0
        assert _named(d.proc.pid, "pyvfs-q1") != worker
        # Room comes back with FORGET.
        c.forget(held.pop(), 1)
        held.append(c.lookup(ROOT, f"f{NOFILE - 1}").nodeid)
        for node in held:
            c.forget(node, 1)
    finally:
        fe.close()
    assert "failed" not in d.text and "Traceback" not in d.text, d.text


def test_a_control_message_whose_fds_find_no_room_is_answered_failed(tmp_path: Path) -> None:
    """The worker's half (worker/main.py on_control), in a process whose fd table is full."""
    script = tmp_path / "full.py"
    script.write_text(
        "import errno, os, resource, socket\n"
        "from pyvirtiofsd.common import control\n"
        "from pyvirtiofsd.common.control import Failed, SetCall\n"
        "from pyvirtiofsd.worker.main import Worker\n"
        "ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "w = Worker.__new__(Worker)\n"
        "w.index, w.channel, w.running = 1, theirs, True\n"
        "efd = os.eventfd(0)\n"
        "control.send(ours, SetCall(1, seq=7, fds=(efd,)))\n"
        "top = max(int(n) for n in os.listdir('/proc/self/fd'))\n"
        "for fd in range(top + 1):\n"
        "    try:\n"
        "        os.fstat(fd)\n"
        "    except OSError:\n"
        "        os.dup2(efd, fd)\n"          # no gap below the limit
        "resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, top + 1))\n"
        "ours.settimeout(5)\n"
        "w.on_control()\n"
        "answer = control.receive(ours, control.FROM_WORKER)\n"
        "assert isinstance(answer, Failed) and answer.seq == 7, answer\n"
        "assert answer.errno == errno.EMFILE, answer\n"
        "print('ok')\n")
    out = subprocess.run([str(DAEMON.parent / "python"), str(script)], capture_output=True,
                         text=True, timeout=60)
    assert out.stdout == "ok\n", out.stderr


@pytest.mark.parametrize(("err", "counted"), [(errno.EMFILE, False), (errno.ENFILE, False),
                                              (errno.EPIPE, False), (errno.EIO, True)])
def test_a_start_without_a_free_fd_is_not_a_boot_failure(monkeypatch, err: int,
                                                          counted: bool) -> None:
    table = ProcessTable(2, entry=lambda queue, channel: None)

    def spawn(queue: int) -> None:
        raise OSError(err, f"spawner could not start the worker for queue {queue}")

    monkeypatch.setattr(table, "spawn", spawn)
    for _ in range(MAX_BOOT_FAILURES):
        table.respawn(1)
    assert (1 in table.policy.failed) is counted
    if not counted:
        assert table.policy.next_in() is not None, "a retry must be planned"


def test_a_killed_spawner_is_replaced_inside_the_namespace_sandbox(daemon_factory) -> None:
    """The same under the default sandbox and seccomp filters: the standby's clone, the
    supervisor's look at its children through the sandbox's procfs."""
    d = daemon_factory("--request-queues=1", "--sandbox=namespace", "--seccomp=kill")
    sup = _supervisor(d)
    assert sup != d.proc.pid
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        for n in range(2):
            os.kill(_named(sup, "pyvfs-spawner"), signal.SIGKILL)
            _wait_count(d, "takes over", n + 1)
            fe.get_features()                   # the new standby is up
            os.kill(_named(sup, "pyvfs-q1"), signal.SIGKILL)
            assert c.getattr(ROOT).attr.ino > 0
            _named(sup, "pyvfs-standby")
    finally:
        fe.close()
    assert d.proc.wait(timeout=20) == 0, d.text
    for bad in ("stopping", "Traceback", "cannot list", "SIGSYS", "no standby"):
        assert bad not in d.text, d.text


def test_a_worker_the_dying_spawner_never_announced_is_ended(daemon_factory, monkeypatch,
                                                             tmp_path: Path) -> None:
    """The spawner dies after cloning a worker and before saying its pid (a test hook places
    the death).  That worker would take over the queue's journal alongside the real
    successor; the supervisor ends it, the standby takes over, and the queue is served."""
    flag = tmp_path / "spawner-dies"
    monkeypatch.setenv("PYVIRTIOFSD_TEST_HOOKS", "1")
    monkeypatch.setenv("PYVIRTIOFSD_TEST_SPAWNER_DIES", str(flag))
    d = daemon_factory("--request-queues=1", "--seccomp=none")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        c = FuseClient(fe)
        c.init()
        spawner = _named(d.proc.pid, "pyvfs-spawner")
        flag.write_bytes(b"")
        os.kill(_named(d.proc.pid, "pyvfs-q1"), signal.SIGKILL)
        d.wait_for(f"the spawner (pid {spawner}) was killed by SIGKILL; its standby")
        d.wait_for("started by the dead spawner unannounced")
        assert c.getattr(ROOT).attr.ino > 0
        assert not flag.exists()
        (worker,) = [p for p, n in children(d.proc.pid).items() if n == "pyvfs-q1"]
        assert fd_count(worker) == fd_count(_named(d.proc.pid, "pyvfs-spawner"))
    finally:
        fe.close()
    assert d.proc.wait(timeout=20) == 0, d.text
    assert "Traceback" not in d.text and "stopping" not in d.text, d.text


def test_a_stop_signal_ends_the_wait_for_a_slow_worker(daemon_factory) -> None:
    """SIGTERM while the supervisor waits for a worker asleep in a system call: the daemon
    stops at once (a runtime's grace period is shorter than the slow-request limit)."""
    d = daemon_factory("--request-queues=1")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    holder: LeaseHolder | None = None
    try:
        c = FuseClient(fe)
        c.init()
        path = d.share / "leased"
        path.write_bytes(b"x")
        node = c.lookup(ROOT, "leased").nodeid
        holder = LeaseHolder(path)
        c.submit(fa.Opcode.OPEN, node, fa.OPEN_IN.pack(os.O_WRONLY, 0))
        holder.wait_broken()
        fe.timeout = 60.0
        t = threading.Thread(target=lambda: _quietly(fe.get_vring_base, 1), daemon=True)
        t.start()
        d.wait_for("asleep in a system call serving OPEN")
        d.proc.send_signal(signal.SIGTERM)
        # Well before the lease breaks by itself (lease-break-time, 45 s).
        assert d.proc.wait(timeout=10) == 0, d.text
        d.wait_for("terminating on signal")
        t.join(timeout=10)
    finally:
        if holder is not None:
            holder.close()
        fe.close()


class LeaseHolder:
    """A read lease on `path` held by this process: an open for writing sleeps in the kernel
    until it is given up (or lease-break-time, 45 s, passes).  `broken` is set when the kernel
    tells us (SIGIO) that someone is waiting: the opener is asleep in open(2) from then on."""

    def __init__(self, path: Path) -> None:
        self.broken = threading.Event()
        self._old = signal.signal(signal.SIGIO, lambda *_: self.broken.set())
        self.fd = os.open(path, os.O_RDONLY)
        fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)

    def wait_broken(self) -> None:
        assert self.broken.wait(timeout=20), "nobody opened the leased file"

    def give_up(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)

    def close(self) -> None:
        os.close(self.fd)
        signal.signal(signal.SIGIO, self._old)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        pass            # the daemon went away under it, as the test intends
