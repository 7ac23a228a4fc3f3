"""The `<socket>.pid` file: one daemon per socket path, as virtiofsd does it.

The file is locked with flock for the daemon's lifetime, so the lock, not the file's existence,
says whether a daemon is running: a file left by a crashed daemon is simply taken over.
"""

from __future__ import annotations

import errno
import fcntl
import os

from pyvirtiofsd.supervisor.config import ConfigError

PIDFILE_SUFFIX = ".pid"  # virtiofsd: socket path + ".pid"


def pidfile_path(socket_path: str) -> str:
    return socket_path + PIDFILE_SUFFIX


class PidFile:
    def __init__(self) -> None:
        self.path: str | None = None
        self._fd = -1
        self._owner = 0

    @property
    def fd(self) -> int:
        """The locked file's descriptor (-1 when not held): keep it open in children that must
        hold the lock, close it in those that must not."""
        return self._fd

    def acquire(self, socket_path: str) -> None:
        """Create and lock `<socket_path>.pid` and write our pid into it.

        ConfigError if another daemon holds it, or if the file cannot be created.
        """
        if self._fd >= 0:
            raise RuntimeError(f"pid file {self.path} is already held")
        path = pidfile_path(socket_path)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as e:
                raise ConfigError(f"cannot create pid file {path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    who = f"pid {holder}" if holder else "pid unknown"
                    raise ConfigError(f"another pyvirtiofsd ({who}) is serving {socket_path}"
                                      ) from None
                raise ConfigError(f"cannot lock pid file {path}: {e.strerror}") from None
            # The holder unlinks the file before releasing the lock; if we locked an inode that
            # is no longer at the path, a new daemon may already own the path's file: retry.
            try:
                same = _same_file(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            except OSError as e:
                os.close(fd)
                raise ConfigError(f"cannot check pid file {path}: {e.strerror}") from None
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"cannot write pid file {path}: {e.strerror}") from None
        self.path, self._fd, self._owner = path, fd, os.getpid()

    def release(self) -> None:
        """Unlink the file, then drop the lock; a no-op when not held.

        In a forked child this only closes the inherited descriptor: the file and the lock
        (held by the open file description) stay with the daemon that took them.
        """
        if self._fd < 0:
            return
        try:
            if os.getpid() == self._owner:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = -1
            self.path = None

    def __enter__(self) -> PidFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
