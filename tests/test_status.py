"""Observability: the statistics region, `pyvirtiofsd status`, the Prometheus endpoint and the
log line of a worker's death, checked against a workload whose figures are known."""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common import native, stats
from pyvirtiofsd.supervisor.status import prometheus
from tests.conftest import DAEMON
from tests.frontend import Frontend, FuseClient, FuseError

ROOT = fa.ROOT_ID
Op = fa.Opcode


# --- the region itself --------------------------------------------------------------------------

def test_native_layout_matches_the_documented_one() -> None:
    lib = native.lib
    assert (lib.VFS_STATS_QUEUE_WORDS, lib.VFS_STATS_ERRNOS, lib.VFS_STATS_OPCODES,
            lib.VFS_STATS_BUCKETS, lib.VFS_STATS_OP_WORDS) == (
        stats.QUEUE_WORDS, stats.ERRNOS, stats.OPCODES, stats.BUCKETS, stats.OP_WORDS)


@pytest.mark.parametrize(("ns", "bucket"), [
    (0, 0), (1, 0), (1000, 0), (1001, 1), (2000, 1), (2001, 2), (4000, 2), (4001, 3),
    (1_000_000, 10), ((1 << 22) * 1000, 22), ((1 << 22) * 1000 + 1, 23), (10**15, 23),
])
def test_latency_lands_in_the_bucket_of_its_bound(ns: int, bucket: int) -> None:
    s = stats.Stats.create(2)
    try:
        s.queue(1).record(Op.GETATTR, 0, ns)
        op = s.snapshot(1).ops[Op.GETATTR]
        assert op.buckets == tuple(int(b == bucket) for b in range(stats.BUCKETS))
        assert (op.count, op.errors, op.latency_sum_ns) == (1, 0, ns)
        if bucket < stats.BUCKETS - 1:
            assert ns <= stats.bucket_bounds_us()[bucket] * 1000
        if bucket:
            assert ns > stats.bucket_bounds_us()[bucket - 1] * 1000
    finally:
        s.close()


def test_errors_and_opcodes_out_of_range_have_their_own_words() -> None:
    s = stats.Stats.create(3)
    try:
        q = s.queue(2)
        q.started(Op.LOOKUP)
        q.record(Op.LOOKUP, errno.ENOENT, 10)
        q.record(Op.LOOKUP, errno.ENOENT, 10)
        q.record(Op.CUSE_INIT, 300, 10)          # opcode and errno past the table: slot 0
        q.record(Op.READ, 0, 10)
        snap = s.snapshot(2)
        assert (snap.requests, snap.errors, snap.last_opcode) == (4, 3, Op.LOOKUP)
        assert snap.errnos == {errno.ENOENT: 2, 0: 1}
        assert {op: (o.count, o.errors) for op, o in snap.ops.items()} == {
            Op.LOOKUP: (2, 2), 0: (1, 1), Op.READ: (1, 0)}
        # Other queues' blocks are untouched.
        assert s.snapshot(1).requests == 0 and s.snapshot(0).ops == {}
        with pytest.raises(IndexError):
            s.queue(3)
    finally:
        s.close()


# --- a daemon under a known workload ------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-z_:][a-z0-9_:]*)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')
_LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """A strict reader of the text exposition format: every sample belongs to a family with a
    TYPE line, and no sample appears twice."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            assert name not in types, f"family {name} declared twice"
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or (types.get(family) == "histogram"), f"no TYPE for {name}"
        key = (name, frozenset(_LABEL.findall(labels)))
        assert key not in samples, f"duplicate sample {line}"
        samples[key] = float(value)
    return samples


def http_get(path: str, what: str) -> tuple[str, str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(f"GET {what} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return head, body


def run_status(target: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DAEMON), "status", target, *extra], capture_output=True,
                          text=True, timeout=30, check=False)


def status_json(target: str) -> dict:
    done = run_status(target, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def known_workload(client: FuseClient) -> int:
    """INIT, then 10 requests on queue 1 (3 of them ENOENT) and one FORGET on hiprio; leaves
    the root and one file looked up and one handle open.  Returns the file's nodeid."""
    for _ in range(3):
        with pytest.raises(FuseError) as e:
            client.lookup(ROOT, "missing")
        assert e.value.errno == errno.ENOENT
    entry, opened = client.create(ROOT, "f")
    client.write(entry.nodeid, opened.fh, 0, b"x" * 4096)
    assert client.read(entry.nodeid, opened.fh, 0, 4096) == b"x" * 4096
    client.getattr(ROOT)
    client.getattr(ROOT)
    d = client.mkdir(ROOT, "d")
    assert client.lookup(ROOT, "d").nodeid == d.nodeid
    client.forget(d.nodeid, 2)
    return entry.nodeid


Q1_OPS = {"INIT": (1, 0), "LOOKUP": (4, 3), "CREATE": (1, 0), "WRITE": (1, 0), "READ": (1, 0),
          "GETATTR": (2, 0), "MKDIR": (1, 0)}


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon serves files of any owner: root")
def test_status_and_metrics_count_a_known_workload(daemon_factory, tmp_path: Path) -> None:
    metrics = str(tmp_path / "metrics.sock")
    d = daemon_factory(f"--metrics-socket={metrics}")
    fe = Frontend.connect(d.socket, process=d.proc, queues=2)
    try:
        client = FuseClient(fe)
        client.init()
        known_workload(client)

        # Figures from the pid file, the vhost-user socket and the metrics socket are the same.
        doc = status_json(d.socket + ".pid")
        assert status_json(d.socket)["queues"] == doc["queues"]
        assert status_json(metrics)["queues"] == doc["queues"]
        q0, q1 = doc["queues"]
        assert (q0["requests"], q0["errors"], q0["last_opcode"]) == (1, 0, "FORGET")
        assert (q1["requests"], q1["errors"], q1["errnos"]) == (11, 3, {"ENOENT": 3})
        assert {op: (s["count"], s["errors"]) for op, s in q1["ops"].items()} == Q1_OPS
        for s in q1["ops"].values():
            assert sum(s["buckets"]) == s["count"] and s["latency_sum_ns"] > 0
        assert q1["last_opcode"] == "LOOKUP"
        assert (q1["in_flight"], q1["restarts"]) == (0, 0)
        assert (doc["inodes"], doc["handles"]) == (2, 1)      # the root and f; f's handle
        assert doc["frontend"] == "connected" and doc["shared_dir"] == str(d.share)
        roles = [(p["role"], p.get("queue"), p.get("state")) for p in doc["processes"]]
        assert roles == [("supervisor", None, None), ("spawner", None, None),
                         ("worker", 0, "serving"), ("worker", 1, "serving")]
        assert doc["processes"][0]["host_pid"] == d.proc.pid       # --sandbox=none

        # The text for people shows the same figures.
        text = run_status(d.socket).stdout
        assert re.search(r"^q1 +request +11 +3 +0 +0 +LOOKUP$", text, re.M), text
        assert "errors by errno: q1 ENOENT=3" in text
        assert "inodes in use: 2, handles in use: 1" in text
        worker1 = next(p for p in doc["processes"] if p.get("queue") == 1)
        assert re.search(rf"worker q1 +pid {worker1['host_pid']} +serving", text), text

        # Prometheus: the same figures, and histograms that add up.
        head, body = http_get(metrics, "/metrics")
        assert head.startswith("HTTP/1.0 200") and "text/plain; version=0.0.4" in head
        m = parse_prometheus(body)
        assert m[("pyvirtiofsd_requests_total", frozenset({("queue", "1")}))] == 11
        assert m[("pyvirtiofsd_errors_total",
                  frozenset({("queue", "1"), ("errno", "ENOENT")}))] == 3
        assert m[("pyvirtiofsd_inodes", frozenset())] == 2
        assert m[("pyvirtiofsd_handles", frozenset())] == 1
        for op, (count, errors) in Q1_OPS.items():
            labels = {("queue", "1"), ("opcode", op)}
            assert m[("pyvirtiofsd_opcode_requests_total", frozenset(labels))] == count
            assert m[("pyvirtiofsd_opcode_errors_total", frozenset(labels))] == errors
            buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in m.items()
                              if k[0] == "pyvirtiofsd_request_duration_seconds_bucket"
                              and labels <= k[1]))
            assert len(buckets) == stats.BUCKETS
            assert [le for le, _ in buckets[:-1]] == [
                us / 1e6 for us in stats.bucket_bounds_us()]
            assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
            assert buckets[-1] == (float("inf"), count)
            assert m[("pyvirtiofsd_request_duration_seconds_count",
                      frozenset(labels))] == count
        assert http_get(metrics, "/nothing")[0].startswith("HTTP/1.0 404")

        # A worker killed: one log line with the signal, its last opcode and the recovery; the
        # successor serves and the status counts the restart.
        os.kill(worker1["host_pid"], signal.SIGKILL)
        line = d.wait_for("worker for queue 1 (pid")
        assert "was killed by SIGKILL" in line and "last opcode LOOKUP" in line, line
        assert "no request in flight" in line and "respawning it" in line, line
        client.getattr(ROOT)
        after = status_json(d.socket)
        q1 = after["queues"][1]
        assert (q1["requests"], q1["restarts"], q1["last_opcode"]) == (12, 1, "GETATTR")
        assert after["worker_restarts"] == 1
        new = next(p for p in after["processes"] if p.get("queue") == 1)
        assert new["state"] == "serving" and new["host_pid"] != worker1["host_pid"]
        m = parse_prometheus(http_get(metrics, "/metrics")[1])
        assert m[("pyvirtiofsd_worker_restarts_total", frozenset({("queue", "1")}))] == 1
    finally:
        fe.close()
    # The status sockets go with the daemon.
    assert d.stop() == 0
    assert not os.path.exists(d.socket + ".status") and not os.path.exists(metrics)


@pytest.mark.skipif(os.geteuid() != 0, reason="the default sandbox needs root")
def test_status_maps_sandboxed_pids_to_the_host(tmp_path: Path, share: Path) -> None:
    from tests.conftest import start_daemon

    sock = str(tmp_path / "vfs.sock")
    d = start_daemon(share, sock, "--sandbox=namespace", "--seccomp=kill")
    fe = Frontend.connect(sock, process=d.proc, queues=2)
    try:
        # Answered by a supervisor confined by its seccomp policy, with its workers serving.
        client = FuseClient(fe)
        client.init()
        client.getattr(ROOT)
        doc = status_json(sock)
        assert [q["requests"] for q in doc["queues"]] == [0, 2]
        m = parse_prometheus(http_get(sock + ".status", "/metrics")[1])
        assert m[("pyvirtiofsd_opcode_requests_total",
                  frozenset({("queue", "1"), ("opcode", "GETATTR")}))] == 1
        parent, sup, *rest = doc["processes"]
        assert parent == {"role": "parent", "pid": None, "host_pid": d.proc.pid,
                          "state": "waiting outside the sandbox"}
        assert sup["role"] == "supervisor" and sup["pid"] == 1 and sup["host_pid"] != 1
        for p in rest:
            with open(f"/proc/{p['host_pid']}/status") as f:
                nspid = next(ln for ln in f if ln.startswith("NSpid:")).split()[1:]
            assert [int(x) for x in nspid] == [p["host_pid"], p["pid"]]
    finally:
        fe.close()
        d.stop()
    assert "Traceback" not in d.text, d.text
    # The parent outside the sandbox made the sockets, and removes them.
    assert sorted(os.listdir(tmp_path)) == ["share"]


def test_status_of_nothing_says_so_in_one_line(tmp_path: Path) -> None:
    done = run_status(str(tmp_path / "none.sock"))
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "no status socket answered" in done.stderr
    done = subprocess.run([str(DAEMON), "status"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 2 and "usage: pyvirtiofsd status" in done.stderr


def test_prometheus_text_escapes_label_values() -> None:
    doc = {"version": 'a"b\\c\nd', "uptime_s": 1.5, "frontend": "waiting", "inodes": 1,
           "handles": 0, "queues": [], "latency_buckets_us": [1, 2]}
    m = parse_prometheus(prometheus(doc))
    assert m[("pyvirtiofsd_info", frozenset({("version", 'a\\"b\\\\c\\nd')}))] == 1


@pytest.mark.parametrize("where", ["same", "status", "nodir"])
def test_a_bad_metrics_socket_is_refused_before_anything_starts(tmp_path: Path, share: Path,
                                                                where: str) -> None:
    sock = str(tmp_path / "vfs.sock")
    metrics = {"same": sock, "status": sock + ".status",
               "nodir": str(tmp_path / "no" / "m.sock")}[where]
    done = subprocess.run([str(DAEMON), f"--socket-path={sock}", f"--shared-dir={share}",
                           "--sandbox=none", f"--metrics-socket={metrics}"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("pyvirtiofsd: error: ") and "metrics-socket" in line, line
    assert sorted(os.listdir(tmp_path)) == ["share"]      # no socket, pid file or status


def test_metrics_socket_is_a_config_file_key(tmp_path: Path) -> None:
    from pyvirtiofsd.supervisor.config import parse

    cfg = tmp_path / "c.toml"
    cfg.write_text('shared-dir = "/srv"\nsocket-path = "/run/v.sock"\n'
                   'metrics-socket = "/run/m.sock"\n')
    assert parse(["--config", str(cfg)]).metrics_socket == "/run/m.sock"
    assert parse(["--config", str(cfg), "--metrics-socket=/run/x.sock"]).metrics_socket == \
        "/run/x.sock"


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon serves files of any owner: root")
def test_a_silent_status_client_does_not_stop_the_daemon(daemon_factory) -> None:
    d = daemon_factory()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(d.socket + ".status")
        # It never sends a request: the supervisor gives up on it and closes it ...
        silent.settimeout(10)
        assert silent.recv(100) == b""
        # ... and goes on serving the front-end and other status clients.
        with Frontend.connect(d.socket, process=d.proc, queues=2) as fe:
            client = FuseClient(fe)
            client.init()
            client.getattr(ROOT)
            assert status_json(d.socket)["queues"][1]["requests"] == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon serves files of any owner: root")
def test_status_of_a_request_stuck_in_flight_and_a_failed_queue(daemon_factory,
                                                                 monkeypatch) -> None:
    # Every worker that executes a WRITE kills itself (worker/testhooks.py): the first while
    # serving it, its successors while completing it from the journal, until the queue fails.
    monkeypatch.setenv("PYVIRTIOFSD_TEST_HOOKS", "1")
    monkeypatch.setenv("PYVIRTIOFSD_TEST_CRASH", "WRITE:executing@1-")
    d = daemon_factory("--seccomp=none")      # the hook's kill(2) is no worker's to make
    with Frontend.connect(d.socket, process=d.proc, queues=2) as fe:
        client = FuseClient(fe)
        client.init()
        entry, opened = client.create(ROOT, "f")
        client.submit(Op.WRITE, entry.nodeid, fa.WriteIn(opened.fh, 0, 4).pack() + b"data")
        first = d.wait_for("worker for queue 1 (pid")
        assert "was killed by SIGKILL (WRITE unique" in first, first
        assert "last opcode WRITE" in first, first
        assert "its successor completes the 1 request(s) left in flight" in first, first
        d.wait_for("queue 1 is failed")
        last = [ln for ln in d.log if "worker for queue 1 (pid" in ln][-1]
        assert "while starting" in last and "not respawning: the queue is failed" in last, last

        doc = status_json(d.socket)
        q1 = doc["queues"][1]
        assert (q1["in_flight"], q1["restarts"], q1["last_opcode"]) == (1, 5, "WRITE")
        assert (q1["requests"], q1["errors"]) == (2, 0)      # INIT and CREATE were answered
        assert doc["worker_restarts"] == 5
        worker1 = next(p for p in doc["processes"] if p.get("queue") == 1)
        assert (worker1["pid"], worker1["host_pid"], worker1["state"]) == (None, None, "failed")
        assert re.search(r"^  worker q1 +- +failed$", run_status(d.socket).stdout, re.M)
        m = parse_prometheus(http_get(d.socket + ".status", "/metrics")[1])
        assert m[("pyvirtiofsd_in_flight_requests", frozenset({("queue", "1")}))] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon serves files of any owner: root")
@pytest.mark.parametrize("plane", ["native", "python"])
def test_requests_deferred_to_python_are_counted(daemon_factory, plane: str) -> None:
    """`deferred` counts what the native engine hands to the Python FUSE server: INIT (the
    session is Python's) and SYMLINK here, not the GETATTRs it answers itself; the Python
    plane defers nothing."""
    d = daemon_factory(f"--data-plane={plane}")
    with Frontend.connect(d.socket, process=d.proc, queues=2) as fe:
        client = FuseClient(fe)
        client.init()
        client.symlink(ROOT, "l", "target")
        for _ in range(3):
            client.getattr(ROOT)
        doc = status_json(d.socket)
        q0, q1 = doc["queues"]
        assert q1["requests"] == 5
        assert (q0["deferred"], q1["deferred"]) == (0, 2 if plane == "native" else 0)
        m = parse_prometheus(http_get(d.socket + ".status", "/metrics")[1])
        assert m[("pyvirtiofsd_deferred_requests_total", frozenset({("queue", "1")}))] == \
            q1["deferred"]
