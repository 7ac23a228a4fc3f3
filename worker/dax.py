"""A worker's side of the DAX window: its requests to the supervisor (supervisor/dax.py).

FUSE_SETUPMAPPING / FUSE_REMOVEMAPPING / FUSE_FSYNC, and READ/WRITE data in the window
(DAX_IO), are served while a request is in flight, so the worker asks the supervisor over its
control channel and waits for the answer (DAX_DONE or DAX_IO_DONE, with the same sequence
number).  The supervisor's own requests may arrive meanwhile
(a ring stop, a new memory table): they are kept, in order, and the worker's loop handles them
between two requests, as it handles any control message (worker/main.py).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from collections.abc import Callable

from pyvirtiofsd.common import control
from pyvirtiofsd.common.control import (
    DAX_ALL,
    DaxDone,
    DaxIo,
    DaxIoDone,
    DaxMap,
    DaxSync,
    DaxUnmap,
    Failed,
    Message,
)

log = logging.getLogger("pyvirtiofsd.dax")

# How long a worker waits for the supervisor's answer: the supervisor gives the front-end 10 s
# per back-end message, and one request may need a few (an unmap before a map).
ANSWER_TIMEOUT = 60.0


class DaxClient:
    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        # Control messages that arrived while an answer was awaited, oldest first.
        self.deferred: list[Message] = []
        self._seq = 0

    def map(self, fd: int, fh: int, foffset: int, length: int, moffset: int,
            flags: int) -> None:
        self._ask(lambda seq: DaxMap(fh, foffset, length, moffset, flags, seq=seq, fds=(fd,)))

    def unmap(self, moffset: int, length: int) -> None:
        self._ask(lambda seq: DaxUnmap(moffset, length, seq=seq))

    def unmap_all(self) -> None:
        self.unmap(0, DAX_ALL)

    def sync(self, fh: int) -> None:
        self._ask(lambda seq: DaxSync(fh, seq=seq))

    def io(self, fd: int, fh: int, foffset: int, gpa: int, length: int, write: bool) -> int:
        """FS_IO: the front-end moves `length` bytes between the file at `foffset` and the
        guest's buffer at `gpa` in its window (write: to the file); the bytes it moved."""
        return self._ask(lambda seq: DaxIo(fh, foffset, gpa, length, int(write), seq=seq,
                                           fds=(fd,)))

    def _ask(self, make: Callable[[int], Message]) -> int:
        """Send the request and wait for its answer; OSError with the errno the guest gets.
        Returns the bytes moved (DAX_IO_DONE), else 0."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        seq = self._seq
        msg = make(seq)
        control.send(self.channel, msg)
        poll = select.poll()
        poll.register(self.channel.fileno(), select.POLLIN)
        left = ANSWER_TIMEOUT * 1000
        while True:
            if not poll.poll(left):
                raise OSError(errno.EIO, f"no answer to {msg.type.name}")
            try:
                got = control.receive(self.channel, control.TO_WORKER)
            except control.ProtocolError as e:
                # As worker/main.py answers one it cannot take: at once, so nobody waits.
                log.error("malformed control message: %s", e)
                if e.seq is not None:
                    control.send(self.channel, Failed(e.errno, seq=e.seq))
                continue
            if got is None:
                raise OSError(errno.EIO, "the supervisor is gone")
            if isinstance(got, DaxDone | DaxIoDone):
                if got.seq != seq:
                    continue                 # the answer to one that timed out: too late
                if got.errno:
                    raise OSError(got.errno, os.strerror(got.errno))
                return got.count if isinstance(got, DaxIoDone) else 0
            self.deferred.append(got)
