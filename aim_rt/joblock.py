"""One job per output directory: a lock file held while a run (or an export) writes there.

The lock is an flock on `DIR/.aim-rt.lock`, so the kernel releases it when its holder dies however it dies: a
lock file left by a dead process is simply taken over. The holder's PID and host are written into the file
for the message a second writer gets. Under torchrun, rank 0 holds the lock for the whole job (the other ranks
write inside that job and never take it).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from .errors import OutputError

LOCK_NAME = ".aim-rt.lock"


class JobLock:
    def __init__(self, directory: Path | str, flag: str = "--out"):
        self.path = Path(directory) / LOCK_NAME
        self.flag = flag
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
            return f"pid {pid} on {host}" if host else f"pid {pid}"
        except OSError:
            return "another process"

    def acquire(self, wait: bool = False) -> "JobLock":
        """Take the lock; a held lock is an error naming its holder, or with `wait`, waited for."""
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"{self.path.parent} is in use by another aim-rt job ({self._holder()}, lock "
                                  f"{self.path}); wait for it to finish, or pass another {self.flag}") from None
            # The previous holder may have unlinked the file between our open and our flock: then we locked an
            # orphan inode that nobody else will see; retry on the file that is there now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                self._fd = fd
                return self
            os.close(fd)
        raise OutputError(f"could not take the lock {self.path}: it keeps changing; is another job starting there?")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlinked while still locked: see acquire
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "JobLock":
        return self if self._fd is not None else self.acquire()  # `with lock.acquire(wait=True):` holds it once

    def __exit__(self, *exc) -> None:
        self.release()
