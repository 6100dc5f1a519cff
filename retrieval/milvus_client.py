"""The process's Milvus clients, one per URI, opened once.

Milvus Lite runs inside the process that opens its file (a directory ending in .db) and keeps an `flock`
on the file's `LOCK` while that process lives (the kernel drops it when the process ends, even killed).
Another process that opens the file is refused at once, here as one line (`IndexBusy`), never a wait.
pymilvus and Milvus Lite log each failure with a traceback; matvit reports each as one line instead.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from .store_errors import IndexBusy, IndexStoreError

log = logging.getLogger(__name__)

NOT_LOADED = 101  # Milvus's error code for a search or query of a collection that is not loaded

_clients: dict[str, object] = {}
_clients_lock = threading.Lock()


@contextmanager
def milvus_errors(what: str):
    """Milvus's exceptions as one-line `IndexStoreError`s."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as e:
        log.debug("%s", what, exc_info=True)
        message = getattr(e, "message", None) or str(e)
        raise IndexStoreError(f"{what}: {message.strip().splitlines()[0] if message.strip() else type(e).__name__}") \
            from e


def open_client(uri: str, lite: bool, name: str, create: bool = False):
    """The process's client of `uri` (for Milvus Lite: its server in this process, started once); `name` is the
    store as the user wrote it, for messages; `create` lets a missing Milvus Lite file be made."""
    key = os.path.abspath(uri) if lite else uri
    with _clients_lock:
        if key in _clients:
            return _clients[key]
        if lite:
            check_lite(Path(key), name, create)
        from pymilvus import MilvusClient

        logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)
        logging.getLogger("milvus_lite.server_manager").addFilter(_not_a_held_file)
        try:
            with milvus_errors(f"cannot open {name}"):
                client = MilvusClient(key, timeout=30)
        except IndexStoreError:
            if lite:  # another process may have opened the file since the check
                check_lite(Path(key), name, create)
            raise
        _clients[key] = client
        return client


def check_lite(path: Path, name: str, create: bool) -> None:
    """A one-line error for a Milvus Lite file that is missing, or open in another process."""
    if not path.exists():
        if not create:
            raise IndexStoreError(f"no index at {name}: build one with `matvit build-index`")
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    lock = path / "LOCK"
    if not lock.exists():
        return
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise IndexBusy(f"{name} is open in another process (Milvus Lite serves one process at a time): "
                        "stop that process, send the change through its API, or use a Milvus server") from None
    finally:
        os.close(fd)


def _not_a_held_file(record: logging.LogRecord) -> bool:
    """Drops Milvus Lite's traceback of a file another process holds (`check_lite` says it in one line)."""
    return not (record.exc_info and type(record.exc_info[1]).__name__ == "DataDirLockedError")
