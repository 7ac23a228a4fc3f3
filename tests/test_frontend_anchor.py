"""The front-end driver (tests/frontend.py) proven against the Rust virtiofsd.

If these pass, a failure of the same sequence against pyvirtiofsd is the daemon's, not the
driver's.  One anchor process per test; it serves a single connection and exits after it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.common import fuse_abi as fa
from pyvirtiofsd.common.vhost_user import F_PROTOCOL_FEATURES, ProtocolFeature, Request, VringState
from pyvirtiofsd.common.virtio import DESC, DescFlag, Feature
from tests.frontend import (
    ANCHOR,
    DEFAULT_INIT_FLAGS,
    BackendError,
    DaemonGone,
    DriverQueue,
    Frontend,
    FuseClient,
    FuseError,
    GuestMemory,
    QueueFull,
    ReplyTimeout,
    anchor_argv,
    start_daemon,
    stop_daemon,
)


@dataclass
class Anchor:
    proc: object
    socket: str
    share: Path
    log: Path

    def connect(self, **kw) -> Frontend:
        return Frontend.connect(self.socket, process=self.proc, **kw)


@pytest.fixture
def anchor_factory(tmp_path: Path) -> Iterator:
    if not os.path.exists(ANCHOR):
        pytest.skip(f"Rust virtiofsd anchor not installed at {ANCHOR}")
    started: list[tuple[Anchor, str]] = []

    def start(*extra: str) -> Anchor:
        share = tmp_path / "share"
        share.mkdir(exist_ok=True)
        # The socket lives in a short directory: sun_path holds 108 bytes and pytest's
        # tmp_path grows with the test name.
        sockdir = tempfile.mkdtemp(prefix="vfs-")
        sock = os.path.join(sockdir, "s")
        log = tmp_path / f"anchor{len(started)}.log"
        proc = start_daemon(anchor_argv(sock, str(share), "--log-level=debug", *extra), str(log))
        a = Anchor(proc, sock, share, log)
        started.append((a, sockdir))
        return a

    yield start
    for a, sockdir in started:
        status = stop_daemon(a.proc)
        shutil.rmtree(sockdir, ignore_errors=True)
        # Shown by pytest only when the test failed.
        print(f"--- anchor log (exit {status}) ---\n{a.log.read_text(errors='replace')[-4000:]}")


@pytest.fixture
def anchor(anchor_factory) -> Anchor:
    return anchor_factory()


@pytest.fixture
def session(anchor: Anchor) -> Iterator[tuple[Frontend, FuseClient]]:
    fe = anchor.connect()
    client = FuseClient(fe)
    client.init()
    yield fe, client
    fe.close()


def chain_descs(vq: DriverQueue, token: int) -> tuple[bool, list[tuple[int, int, int]]]:
    """(indirect?, [(addr, len, flags)]) of an in-flight chain, read back from guest memory."""
    mem = vq.mem
    head = vq.inflight[token].head
    addr, length, flags, nxt = DESC.unpack_from(vq.desc, 16 * head)
    if flags & DescFlag.INDIRECT:
        table = mem.read(addr, length)
        out, i = [], 0
        while True:
            a, n, f, nx = DESC.unpack_from(table, 16 * i)
            out.append((a, n, f))
            if not f & DescFlag.NEXT:
                return True, out
            i = nx
    out = [(addr, length, flags)]
    while flags & DescFlag.NEXT:
        addr, length, flags, nxt = DESC.unpack_from(vq.desc, 16 * nxt)
        out.append((addr, length, flags))
    return False, out


# --- vhost-user


@pytest.mark.parametrize(("event_idx", "indirect", "reply_ack"), [
    (True, True, True), (False, False, True), (True, False, False), (False, True, False)])
def test_negotiation_and_first_request(anchor: Anchor, event_idx, indirect, reply_ack):
    with anchor.connect(event_idx=event_idx, indirect=indirect, reply_ack=reply_ack,
                        regions=2) as fe:
        assert fe.features & Feature.VERSION_1 and fe.features & F_PROTOCOL_FEATURES
        want = Feature.VERSION_1 | F_PROTOCOL_FEATURES
        want |= Feature.EVENT_IDX if event_idx else 0
        want |= Feature.INDIRECT_DESC if indirect else 0
        assert fe.acked_features == fe.features & want
        assert fe.acked_protocol_features & ProtocolFeature.MQ
        assert bool(fe.acked_protocol_features & ProtocolFeature.REPLY_ACK) == reply_ack
        assert fe.queue_num == 2          # hiprio + one request queue
        # Ring addresses were given as user addresses of distinct, non-adjacent regions.
        r0, r1 = fe.memory.regions
        assert r0.end == r1.gpa and r0.uaddr + r0.size < r1.uaddr
        client = FuseClient(fe)
        init = client.init()
        assert (init.major, init.minor) >= (7, fa.MIN_KERNEL_MINOR_VERSION)
        assert init.minor <= fa.KERNEL_MINOR_VERSION and init.max_write >= 4096
        assert client.getattr(fa.ROOT_ID).attr.ino == os.stat(anchor.share).st_ino
        vq = fe.queue(1)
        assert vq.kicks >= 1 and not vq.inflight


def test_refused_request_raises_backend_error(anchor: Anchor):
    fe = anchor.connect()
    with pytest.raises(BackendError) as ei:
        fe.send(Request.SET_VRING_NUM, VringState(99, 128).pack())
    assert ei.value.request == Request.SET_VRING_NUM and ei.value.value != 0
    # virtiofsd treats a refused request as fatal and hangs up after the NACK.
    with pytest.raises(DaemonGone):
        fe.get_features()
    fe.close()


def test_missing_reply_times_out(anchor: Anchor):
    fe = anchor.connect(reply_ack=False)
    fe.timeout = 0.3
    start = time.monotonic()
    with pytest.raises(ReplyTimeout):
        # Without REPLY_ACK nothing answers SET_VRING_ENABLE: waiting must end, not hang.
        fe.send(Request.SET_VRING_ENABLE, VringState(1, 1).pack(), reply=True)
    assert time.monotonic() - start < 5
    fe.close()


def test_daemon_death_is_an_exception(session, anchor: Anchor):
    fe, client = session
    stop_daemon(anchor.proc)
    start = time.monotonic()
    with pytest.raises(DaemonGone):
        client.getattr(fa.ROOT_ID)
    assert time.monotonic() - start < fe.timeout


def test_get_vring_base_counts_requests_and_ring_restarts(session):
    fe, client = session
    for _ in range(5):
        client.getattr(fa.ROOT_ID)
    assert fe.get_vring_base(1) == 6          # INIT + 5 GETATTR
    assert fe.get_vring_base(0) == 0
    # A stopped ring is not processed...
    token = client.submit(fa.Opcode.GETATTR, fa.ROOT_ID, fa.GETATTR_IN.pack(0, 0))
    with pytest.raises(ReplyTimeout):
        client.result(token, timeout=0.3)
    # ...until it is started again from the index the daemon reported (start_queue kicks again
    # because a chain is waiting).
    fe.start_queue(0)
    fe.start_queue(1, base=6)
    assert fa.AttrOut.unpack(client.result(token).body).attr.ino > 0
    assert fe.get_vring_base(1) == 7


def test_memory_hotplug_region_carries_a_chain(anchor: Anchor):
    with anchor.connect(mem_size=16 << 20) as fe:
        client = FuseClient(fe)
        client.init()
        (anchor.share / "f").write_bytes(b"hot-plugged")
        node = client.lookup(fa.ROOT_ID, "f").nodeid
        fh = client.open(node, os.O_RDONLY).fh
        region = fe.add_mem_region(2 << 20)
        assert region.gpa == fe.memory.regions[0].end
        # Readable part in the base region, writable part in the new one.
        token = client.submit(fa.Opcode.READ, node, fa.ReadIn(fh, 0, 64).pack(), out_size=64,
                              cross_region=80, kick=False)
        _, descs = chain_descs(fe.queue(1), token)
        assert all(fe.memory.region_of(a) is region for a, _, f in descs if f & DescFlag.WRITE)
        fe.queue(1).kick()
        assert client.result(token).body == b"hot-plugged"
        fe.rem_mem_region(region)
        assert region not in fe.memory.regions
        assert client.read(node, fh, 4, 7) == b"plugged"


# --- FUSE through the driver


def test_init_reply(session):
    _fe, client = session
    out = client.init_out
    assert out.major == fa.KERNEL_VERSION
    # A server only accepts flags the driver offered (protocol.md 4.4).
    assert out.all_flags & ~DEFAULT_INIT_FLAGS == 0
    assert client.flags & fa.InitFlag.INIT_EXT


def test_lookup_create_write_read_readdir_unlink(session, anchor: Anchor):
    _fe, client = session
    entry, opened = client.create(fa.ROOT_ID, "file.txt", 0o640)
    assert stat.S_ISREG(entry.attr.mode) and entry.attr.mode & 0o777 == 0o640
    assert client.write(entry.nodeid, opened.fh, 0, b"hello virtio-fs") == 15
    assert client.read(entry.nodeid, opened.fh, 6, 100) == b"virtio-fs"
    client.flush(entry.nodeid, opened.fh)
    client.release(entry.nodeid, opened.fh)
    assert (anchor.share / "file.txt").read_bytes() == b"hello virtio-fs"

    looked = client.lookup(fa.ROOT_ID, "file.txt")
    assert looked.nodeid == entry.nodeid and looked.attr.size == 15
    sub = client.mkdir(fa.ROOT_ID, "dir", 0o755)
    assert stat.S_ISDIR(sub.attr.mode)

    dh = client.opendir(fa.ROOT_ID).fh
    names = {d.name: d for d in client.readdir_all(fa.ROOT_ID, dh)}
    assert {b".", b"..", b"file.txt", b"dir"} <= names.keys()
    assert names[b"file.txt"].type == stat.S_IFREG >> 12
    plus = client.readdirplus(fa.ROOT_ID, dh)
    assert {p.dirent.name for p in plus} >= {b"file.txt", b"dir"}
    client.releasedir(fa.ROOT_ID, dh)

    client.unlink(fa.ROOT_ID, "file.txt")
    client.rmdir(fa.ROOT_ID, "dir")
    assert not (anchor.share / "file.txt").exists()
    with pytest.raises(FuseError) as ei:
        client.lookup(fa.ROOT_ID, "file.txt")
    assert ei.value.errno == errno.ENOENT
    r = client.request(fa.Opcode.LOOKUP, fa.ROOT_ID, b"dir\0")
    assert r.error == errno.ENOENT and r.body == b""


def test_more_opcodes(anchor_factory):
    a = anchor_factory("--xattr")
    with a.connect() as fe:
        client = FuseClient(fe)
        client.init()
        e, o = client.create(fa.ROOT_ID, "x", 0o600)
        client.write(e.nodeid, o.fh, 0, b"0123456789")
        assert client.setattr(e.nodeid, size=4, fh=o.fh).attr.size == 4
        assert client.lseek(e.nodeid, o.fh, 0, os.SEEK_END) == 4
        client.fallocate(e.nodeid, o.fh, 0, 8192)
        assert client.getattr(e.nodeid).attr.size == 8192
        client.fsync(e.nodeid, o.fh)
        client.setxattr(e.nodeid, "user.k", b"value")
        assert client.getxattr(e.nodeid, "user.k") == b"value"
        assert client.getxattr(e.nodeid, "user.k", 0) == 5
        assert b"user.k" in client.listxattr(e.nodeid)
        client.removexattr(e.nodeid, "user.k")
        with pytest.raises(FuseError) as ei:
            client.getxattr(e.nodeid, "user.k")
        assert ei.value.errno == errno.ENODATA
        link = client.symlink(fa.ROOT_ID, "ln", "x")
        assert client.readlink(link.nodeid) == b"x"
        fifo = client.mknod(fa.ROOT_ID, "fifo", stat.S_IFIFO | 0o600)
        assert stat.S_ISFIFO(fifo.attr.mode) and stat.S_ISFIFO(os.lstat(a.share / "fifo").st_mode)
        client.unlink(fa.ROOT_ID, "fifo")
        hard = client.link(e.nodeid, fa.ROOT_ID, "x2")
        assert hard.attr.nlink == 2
        client.rename(fa.ROOT_ID, "x2", fa.ROOT_ID, "x3")
        client.rename2(fa.ROOT_ID, "x3", fa.ROOT_ID, "x4", fa.RENAME_NOREPLACE)
        assert sorted(p.name for p in a.share.iterdir()) == ["ln", "x", "x4"]
        e2, o2 = client.create(fa.ROOT_ID, "y", 0o600)
        assert client.copy_file_range(e.nodeid, o.fh, 0, e2.nodeid, o2.fh, 0, 4) == 4
        assert (a.share / "y").read_bytes() == b"0123"
        assert client.statfs().bsize > 0
        client.access(e.nodeid, os.R_OK)
        client.syncfs()
        client.destroy()


def test_chain_split_across_two_regions(anchor: Anchor):
    with anchor.connect(regions=2) as fe:
        client = FuseClient(fe)
        client.init()
        e, o = client.create(fa.ROOT_ID, "f")
        vq = fe.queue(1)
        # Region boundary between in_header and fuse_write_in (40), between fuse_write_in and
        # the data (80); for READ between the readable and writable parts (80) and between
        # fuse_out_header and the data (96).  (virtiofsd cannot serve one descriptor that
        # straddles two regions, so the boundary is put between buffers here.)
        for at, payload in ((40, b"A" * 100), (80, b"B" * 50)):
            token = client.submit(fa.Opcode.WRITE, e.nodeid,
                                  [fa.WriteIn(o.fh, 0, len(payload)).pack(), payload],
                                  cross_region=at, kick=False)
            _, descs = chain_descs(vq, token)
            assert len({id(fe.memory.region_of(a)) for a, _, _ in descs}) == 2
            vq.kick()
            assert fa.WRITE_OUT.unpack(client.result(token).body)[0] == len(payload)
        for at in (80, 96):
            token = client.submit(fa.Opcode.READ, e.nodeid, fa.ReadIn(o.fh, 0, 200).pack(),
                                  out_size=200, cross_region=at, kick=False)
            _, descs = chain_descs(vq, token)
            assert len({id(fe.memory.region_of(a)) for a, _, _ in descs}) == 2
            vq.kick()
            assert client.result(token).body == b"B" * 50 + b"A" * 50


def test_indirect_table_and_split_descriptors(anchor: Anchor):
    with anchor.connect(regions=2) as fe:
        client = FuseClient(fe)
        client.init()
        e, o = client.create(fa.ROOT_ID, "f")
        vq = fe.queue(1)
        data = bytes(range(256)) * 4
        token = client.submit(fa.Opcode.WRITE, e.nodeid, [fa.WriteIn(o.fh, 0, len(data)).pack(),
                              data], indirect=True, split=3, cross_region=80, kick=False)
        indirect, descs = chain_descs(vq, token)
        # 3 readable buffers and 2 writable ones, each cut in 3, all in one table.
        assert indirect and len(descs) == 15
        assert [bool(f & DescFlag.WRITE) for _, _, f in descs] == [False] * 9 + [True] * 6
        vq.kick()
        assert fa.WRITE_OUT.unpack(client.result(token).body)[0] == len(data)
        assert client.read(e.nodeid, o.fh, 0, 2048, indirect=True, split=5) == data
        token = client.submit(fa.Opcode.READ, e.nodeid, fa.ReadIn(o.fh, 0, 1024).pack(),
                              out_size=1024, split=4, kick=False)
        indirect, descs = chain_descs(vq, token)
        assert not indirect and len(descs) == 16   # four buffers, four descriptors each
        vq.kick()
        assert client.result(token).body == data


def test_32_requests_in_flight(session, anchor: Anchor):
    fe, client = session
    blocks = [bytes([i]) * 4096 for i in range(32)]
    (anchor.share / "blocks").write_bytes(b"".join(blocks))
    node = client.lookup(fa.ROOT_ID, "blocks").nodeid
    fh = client.open(node, os.O_RDONLY).fh
    vq = fe.queue(1)
    tokens = {}
    for i in range(32):
        t = client.submit(fa.Opcode.READ, node, fa.ReadIn(fh, 4096 * i, 4096).pack(),
                          out_size=4096, kick=False)
        tokens[t] = i
    # 4 descriptors per READ chain: the 128-entry ring is now exactly full.
    assert len(vq.inflight) == 32 and not vq.free_descs
    with pytest.raises(QueueFull):
        client.submit(fa.Opcode.GETATTR, fa.ROOT_ID, fa.GETATTR_IN.pack(0, 0))
    kicks = vq.kicks
    vq.kick()
    assert vq.kicks == kicks + 1
    got = {}
    while len(got) < 32:
        for token, (error, body) in client.collect():
            assert error == 0
            got[tokens[token]] = body
    assert [got[i] for i in range(32)] == blocks
    assert len(vq.free_descs) == vq.size


def test_forget_on_hiprio(session, anchor: Anchor):
    fe, client = session
    for name in ("a", "b", "c"):
        (anchor.share / name).write_bytes(name.encode())
    a = client.lookup(fa.ROOT_ID, "a").nodeid
    assert client.lookup(fa.ROOT_ID, "a").nodeid == a        # nlookup 2
    done = client.forget(a, 1)
    assert done.used_len == 0 and fe.queue(0).inflight == {}
    assert client.getattr(a).attr.size == 1                  # one reference left
    client.forget(a, 1)
    with pytest.raises(FuseError) as ei:
        client.getattr(a)                                    # inode dropped
    assert ei.value.errno == errno.EBADF
    b = client.lookup(fa.ROOT_ID, "b").nodeid
    c = client.lookup(fa.ROOT_ID, "c").nodeid
    client.batch_forget([(b, 1), (c, 1)])
    for node in (b, c):
        with pytest.raises(FuseError):
            client.getattr(node)


# --- the driver's own guest memory (no daemon needed)


def test_guest_memory_regions_and_allocator():
    mem = GuestMemory(4 << 20, regions=2)
    try:
        r0, r1 = mem.regions
        assert (r0.gpa, r0.size, r1.gpa, r0.mmap_offset, r1.mmap_offset) == (
            0, 2 << 20, 2 << 20, 0, 2 << 20)
        assert r0.fd == r1.fd and r1.uaddr - r0.uaddr > r0.size
        total = mem.free_bytes
        # Ordinary allocations skip to the next region rather than straddle the boundary.
        a = mem.alloc((2 << 20) - 64)
        b = mem.alloc(4096)
        assert a == 0 and b == r1.gpa
        mem.free(a)
        mem.free(b)
        assert mem.free_bytes == total
        # alloc_at may straddle; reads and writes follow the data across the boundary.
        c = mem.alloc_at(r1.gpa - 3, 6)
        mem.write(c, b"abcdef")
        assert mem.read(c, 6) == b"abcdef"
        assert bytes(r0.view[-3:]) == b"abc" and bytes(r1.view[:3]) == b"def"
        assert mem.uaddr(r1.gpa + 5) == r1.uaddr + 5
        with pytest.raises(MemoryError):
            mem.alloc_at(r1.gpa - 1, 2)
        with pytest.raises(ValueError):
            mem.view(c, 6)
        mem.free(c)
        assert mem.free_bytes == total
        hot = mem.add_region(1 << 20)
        assert hot.gpa == r1.end and hot.fd != r0.fd and mem.free_bytes == total + (1 << 20)
        mem.detach_region(hot)
        assert mem.free_bytes == total and hot not in mem.regions
    finally:
        mem.close()
