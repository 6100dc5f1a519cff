"""How a store writes: one writer at a time (`writer`), named crash points for the crash tests (`crash_point`),
and a full disk met as one line (`disk_space`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .store_errors import DiskFull, IndexBusy

log = logging.getLogger(__name__)

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _lock_of_threads(path: Path) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(os.path.realpath(path), threading.Lock())


def _holder(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip()


@contextlib.contextmanager
def writer(directory: Path, wait: float = 0.0, name: str | None = None) -> Iterator[None]:
    """Hold the index's writer lock (one writer at a time, across processes and threads); `IndexBusy` when
    another writer keeps it longer than `wait` seconds.

    The lock is a POSIX record lock (`lockf`) on `directory/LOCK`, which holds the writer's pid, plus a lock
    among this process's threads (record locks do not tell threads apart). A record lock belongs to the one
    process that took it: the processes it forks (DataLoader workers) never hold it, and it ends when that
    process does, however it ends. So a writer killed mid-way leaves its pid in LOCK and nothing held: the next
    writer reports that stale lock and takes it over at once."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "LOCK"
    busy = f"index {name or directory} is being written by another process (pid {{}}); try again when it has finished"
    deadline = time.monotonic() + wait
    threads = _lock_of_threads(path)
    if not (threads.acquire(timeout=wait) if wait > 0 else threads.acquire(blocking=False)):
        raise IndexBusy(busy.format(os.getpid()))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    if time.monotonic() >= deadline:
                        raise IndexBusy(busy.format(_holder(fd) or "unknown")) from None
                    time.sleep(0.05)
            stale = _holder(fd)
            if stale:
                log.warning("index %s: took over the writer lock of pid %s, which ended without releasing it "
                            "(its write was interrupted; `--resume` continues a build or add)", name or directory,
                            stale)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the record lock
    finally:
        threads.release()


CRASH_AT = "MATVIT_CRASH_AT"
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """A step boundary of a write, named so that crash tests can stop there: with `MATVIT_CRASH_AT=NAME` (or
    `NAME:N`, its N-th time) this process kills itself with SIGKILL here, as `kill -9` would (no clean-up runs)."""
    target = os.environ.get(CRASH_AT)
    if not target:
        return
    point, _, nth = target.partition(":")
    if point == name:
        _reached[name] = _reached.get(name, 0) + 1
        if _reached[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the quota) is full: an OSError, SQLite's or FAISS's write error."""
    if isinstance(error, OSError):
        return error.errno in DISK_FULL
    if isinstance(error, sqlite3.OperationalError):
        return "disk is full" in str(error)
    if isinstance(error, RuntimeError):  # FAISS's writers: "... write error in FILE: n != m (No space left ...)"
        return any(os.strerror(code) in str(error) for code in DISK_FULL)
    return False


@contextlib.contextmanager
def disk_space(then: str = "free some space and run it again") -> Iterator[None]:
    """A full disk met inside as one-line `DiskFull` (the writer has undone what it wrote); `then` says what to do."""
    try:
        yield
    except DiskFull:
        raise
    except (OSError, sqlite3.OperationalError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        quota = isinstance(e, OSError) and e.errno == errno.EDQUOT
        raise DiskFull(f"{'the disk quota is used up' if quota else 'no space left'} on the index's disk: nothing "
                       f"was written and the live version is unchanged; {then}") from e
