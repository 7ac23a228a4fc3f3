"""A queue worker: one process per virtqueue, single-threaded.

It maps guest memory from the fds its control channel brings, runs its split ring and answers
FUSE requests through the passthrough filesystem.  Control messages are handled between
requests, so a new memory table or a stop request never races a request in progress: when the
worker answers, it no longer uses what the message replaced (vhost-user "suspended" state).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket

from pyvirtiofsd.common import control
from pyvirtiofsd.common.arena import Arena
from pyvirtiofsd.common.control import Message, MsgType, RingFlag
from pyvirtiofsd.worker.chain import Reader, Writer
from pyvirtiofsd.worker.fuse_server import FuseServer
from pyvirtiofsd.worker.guestmem import GuestMemory, GuestMemoryError
from pyvirtiofsd.worker.virtqueue import ChainError, RingError, SplitQueue

log = logging.getLogger("pyvirtiofsd.worker")


class Worker:
    def __init__(self, queue_index: int, channel: socket.socket, server: FuseServer,
                 arena: Arena) -> None:
        self.index = queue_index
        self.channel = channel
        self.server = server
        self.counters = arena.counters
        self.mem = GuestMemory()
        self.queue: SplitQueue | None = None
        # num, desc, avail, used, event_idx, indirect of the running ring
        self.geometry: tuple[int, int, int, int, bool, bool] | None = None
        self.kick: int | None = None
        self.call: int | None = None
        self.enabled = False
        # Where the last ring stopped, or broke: GET_VRING_BASE reports it (protocol.md 1.7).
        self.stopped_at = 0
        self.poll = select.poll()
        self.poll.register(channel.fileno(), select.POLLIN)
        self.running = True

    # -- control channel ------------------------------------------------------------------
    def on_control(self) -> None:
        try:
            msg = control.receive(self.channel, control.TO_WORKER)
        except control.ProtocolError as e:
            # The supervisor is trusted to be well-formed; a bad message means a bug: say so.
            log.error("queue %d: malformed control message: %s", self.index, e)
            return
        if msg is None:                      # supervisor gone
            self.running = False
            return
        # dispatch() owns msg.fds and closes them on every path: closing them again here would
        # close whatever another worker opened under the same numbers in the shared fd table.
        try:
            answer = self.dispatch(msg)
        except OSError as e:
            log.error("queue %d: %s failed: %s", self.index, msg.type.name, e)
            answer = control.encode(MsgType.FAILED, msg.seq, e.errno or errno.EIO)
        except (GuestMemoryError, ValueError) as e:
            log.error("queue %d: %s refused: %s", self.index, msg.type.name, e)
            answer = control.encode(MsgType.FAILED, msg.seq, errno.EINVAL)
        control.send(self.channel, answer)

    def dispatch(self, msg: Message) -> bytes:
        t = msg.type
        if t is MsgType.MEM_TABLE:
            self.set_mem_table(msg)
        elif t is MsgType.RING_START:
            self.start_ring(msg)
        elif t is MsgType.RING_STOP:
            idx = self.stop_ring()
            return control.encode(MsgType.STOPPED, msg.seq, idx)
        elif t is MsgType.SET_CALL:
            self._replace_call(msg.fds[0] if msg.fds else None)
            # A call fd that arrives while requests completed unsignalled must not lose them.
            self.signal()
        elif t is MsgType.SET_ENABLE:
            self.enabled = bool(msg.fields[0])
            if self.enabled:
                self.process()
        elif t is MsgType.SHUTDOWN:
            self.running = False
        return control.encode(MsgType.ACK, msg.seq)

    def set_mem_table(self, msg: Message) -> None:
        """Swap in a new table; the queue's views are rebuilt against it before any use."""
        new = GuestMemory()
        try:
            for (gpa, size, uaddr, offset), fd in zip(msg.fields, msg.fds, strict=True):
                new.add_region(gpa, size, uaddr, offset, fd)
        finally:
            control.close_fds(msg.fds)
        if self.queue is not None and self.geometry is not None:
            num, desc, avail, used, event_idx, indirect = self.geometry
            self.queue = SplitQueue(new, num, desc, avail, used, self.queue.next_avail,
                                    event_idx=event_idx, indirect=indirect)
        self.mem.clear()
        self.mem = new

    def start_ring(self, msg: Message) -> None:
        num, flags, desc, avail, used, next_avail, _ = msg.fields
        flags = RingFlag(flags)
        fds = list(msg.fds)
        kick = fds.pop(0) if flags & RingFlag.HAS_KICK and fds else None
        call = fds.pop(0) if flags & RingFlag.HAS_CALL and fds else None
        control.close_fds(fds)
        event_idx = bool(flags & RingFlag.EVENT_IDX)
        indirect = bool(flags & RingFlag.INDIRECT)
        try:
            queue = SplitQueue(self.mem, num, desc, avail, used, next_avail,
                               event_idx=event_idx, indirect=indirect)
            if flags & RingFlag.RESUME_FROM_USED:
                queue = SplitQueue(self.mem, num, desc, avail, used, queue.next_used,
                                   event_idx=event_idx, indirect=indirect)
        except BaseException:
            control.close_fds([fd for fd in (kick, call) if fd is not None])
            raise
        self.stop_ring()
        self.queue = queue
        self.geometry = (num, desc, avail, used, event_idx, indirect)
        self.kick = kick
        if kick is not None:
            self.poll.register(kick, select.POLLIN)
        self._replace_call(call)
        self.enabled = bool(flags & RingFlag.ENABLED)
        # Rings start with SET_VRING_KICK; a front-end need not kick again (protocol.md 1.8).
        self.process()

    def stop_ring(self) -> int:
        queue, self.queue = self.queue, None
        if queue is not None:
            self.stopped_at = queue.next_avail
        if self.kick is not None:
            self.poll.unregister(self.kick)
            os.close(self.kick)
            self.kick = None
        self._replace_call(None)
        return self.stopped_at

    def _replace_call(self, fd: int | None) -> None:
        if self.call is not None:
            os.close(self.call)
        self.call = fd

    # -- data plane -----------------------------------------------------------------------
    def signal(self) -> None:
        if self.call is not None:
            os.eventfd_write(self.call, 1)

    def process(self) -> None:
        """Serve every available chain, re-checking after re-enabling notifications."""
        queue = self.queue
        if queue is None or not self.enabled:
            return
        handle = self.server.handle
        served = 0
        try:
            while True:
                while True:
                    try:
                        chain = queue.pop()
                    except ChainError as e:
                        log.warning("queue %d: malformed descriptor chain %d: %s",
                                    self.index, e.head, e)
                        queue.push(e.head, 0)
                        if queue.should_notify():
                            self.signal()
                        continue
                    if chain is None:
                        break
                    writer = Writer(chain.writable) if chain.writable else None
                    used = handle(Reader(chain.readable), writer)
                    queue.push(chain.head, used)
                    served += 1
                    if queue.should_notify():
                        self.signal()
                if not queue.enable_notification():
                    break
        except RingError as e:
            log.error("queue %d: ring is broken, stopped processing it: %s", self.index, e)
            # pop() left next_avail at the entry it refused.
            self.stopped_at = queue.next_avail
            self.queue = None
        finally:
            if served:
                self.counters.add(self.index, served)

    def on_kick(self) -> None:
        try:
            os.eventfd_read(self.kick)
        except BlockingIOError:
            pass
        self.process()

    def run(self) -> None:
        control.send(self.channel, control.encode(MsgType.READY, 0, self.index))
        chan = self.channel.fileno()
        while self.running:
            for fd, _ev in self.poll.poll():
                if fd == chan:
                    self.on_control()
                elif fd == self.kick:
                    self.on_kick()
