"""Where an index lives: one small interface over a FAISS index directory and a Milvus collection.

`open_store(spec)` reads what a user gives as `--index` / `--out` (or `--store`):

    runs/fmnist-index                 an index directory: FAISS, SQLite metadata, versions (`retrieval.index`)
    milvus:./gallery.db               Milvus Lite, run inside this process, in that local file
    milvus:http://HOST:19530          a Milvus server or cluster (`https://`, `/DB` and `#COLLECTION` too)

A `Store` opens `Gallery` views for reading (one view serves a request from start to end), tells
whether a newer view exists, and writes under its writer lock with `commit`. Everything outside
`retrieval.index` and `retrieval.milvus_store` (building, searching, the API, the demo, the command
line) talks to these two protocols only. Each store also has a local directory, `files`, for what
belongs to the index without being part of it: the chunks of an unfinished build (`building/`),
images added through the API (`uploads/`), the cost profile (`profile.json`) and the writer's `LOCK`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from matvit.errors import UserError

from . import tuning

log = logging.getLogger(__name__)
MILVUS_PREFIX = "milvus:"


class IndexStoreError(UserError):
    """A missing, corrupt or mismatched index, or a bad index operation."""


class IndexMissing(IndexStoreError):
    """No index has been built at the place given (yet)."""


class IndexCorrupt(IndexStoreError):
    """An index whose files cannot be read as its manifest describes them."""


class IndexBusy(IndexStoreError):
    """Another writer holds the index's lock."""


class ItemNotFound(IndexStoreError):
    """An id the index does not hold, or an item whose image file is gone."""


class ItemImageRefused(IndexStoreError):
    """An item image that may not be served (outside the indexed roots, not a regular file, too large)."""


class DiskFull(IndexStoreError):
    """No space left where a write goes (ENOSPC, EDQUOT); the write left nothing behind."""


@runtime_checkable
class Gallery(Protocol):
    """One consistent view of an index, for reading."""

    manifest: dict  # fingerprint, submodel, dim, metric, classes, roots, next_id, count, index_key, ...

    @property
    def version(self) -> str:
        """Names this view; every write makes a new one."""

    @property
    def count(self) -> int:
        """Items in the index."""

    @property
    def pending_deletions(self) -> int:
        """Deleted items still filtered at search (until a rebuild)."""

    def check_model(self, fingerprint: str) -> None:
        """Refuse a model other than the one that built the index."""

    def search(self, queries: np.ndarray, k: int, search_params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each queries x min(k, count), id -1 past the hits; inner product of normalised vectors."""

    def items(self, ids) -> dict[int, dict]:
        """Metadata of the given ids that the index holds (with `label_name`)."""

    def item(self, item_id: int) -> dict | None: ...

    def labels(self) -> dict[int, int | None]:
        """Label of every item, by id."""

    def root(self, item: dict) -> dict:
        """The indexed root an item came from (a folder, a dataset, or the uploads)."""

    def image_file(self, item: dict, max_bytes: int) -> bytes:
        """The bytes of a file item's image (see `read_item_file`)."""

    def advice(self) -> str | None:
        """What an operator should do about this index, if anything."""


@runtime_checkable
class Store(Protocol):
    """An index: where its views come from and where its writes go."""

    name: str  # as the user gave it, for messages
    files: Path  # the local directory: building/, uploads/, profile.json, LOCK

    def check_present(self) -> None:
        """`IndexStoreError` when the index plainly is not there (without opening it)."""

    def open(self) -> Gallery:
        """The live view."""

    def current_version(self) -> str | None:
        """The live view's version, cheaply (None when it cannot be told)."""

    def live_manifest(self) -> dict | None:
        """The live view's manifest, cheaply (None when there is no index or it cannot be read)."""

    def writing(self, wait: float = 0.0) -> AbstractContextManager[None]:
        """Hold the one writer's lock; `IndexBusy` when another writer keeps it longer than `wait` seconds."""

    def commit(self, base: Gallery | None, new_ids: np.ndarray, new_vectors: np.ndarray, rows: list[tuple],
               manifest: dict, index_key: str | None = None, recall_target: float = tuning.RECALL_TARGET,
               removed: list[int] = (), on_disk: bool = False) -> dict:
        """Make the live index `base`'s items (none when None) less `removed`, plus the new ones, with
        `manifest`. With `index_key` the vector index is built afresh of that kind (`auto` by size), with
        `on_disk` as inverted lists on disk where the store has them. The caller holds `writing()`; returns a
        report (count, index_key, search_params, recall)."""


def open_store(spec: str | Path | Store) -> Store:
    """The store a user's `--index` names (a Store is returned as it is)."""
    if isinstance(spec, Store):
        return spec
    text = str(spec)
    if text.startswith(MILVUS_PREFIX):
        from .milvus_store import MilvusStore

        return MilvusStore.from_spec(text[len(MILVUS_PREFIX):])
    from .index import DirectoryStore

    return DirectoryStore(Path(spec))


# --- what both stores share -------------------------------------------------------------------
COLUMNS = ("id", "source", "path", "root", "label", "width", "height", "added_at")  # of a metadata row


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


REBUILD = "build the index again with `matvit build-index`"
MANIFEST_FIELDS = {"fingerprint": str, "submodel": str, "dim": int, "metric": str, "count": int, "index_key": str,
                   "next_id": int, "roots": list}  # what every manifest holds, and its type
MANIFEST_OPTIONAL = {"classes": list, "on_disk": bool, "search_params": dict, "recall": dict}
_JSON_TYPES = {str: "a string", int: "an integer", bool: "a boolean", list: "a list", dict: "an object"}


def check_manifest(manifest, name: str) -> dict:
    """`manifest` when it has every field with its type (`IndexCorrupt` naming the first that is wrong)."""
    where = f"index {name} is corrupt: its manifest"
    if not isinstance(manifest, dict):
        raise IndexCorrupt(f"{where} is {_json_type(manifest)}, not an object; {REBUILD}")
    missing = sorted(set(MANIFEST_FIELDS) - set(manifest))
    if missing:
        raise IndexCorrupt(f"{where} lacks {', '.join(missing)}; {REBUILD}")
    for key, kind in {**MANIFEST_FIELDS, **MANIFEST_OPTIONAL}.items():
        value = manifest.get(key)
        if key in manifest and _json_type(value) != _JSON_TYPES[kind] and not (value is None and
                                                                              key in MANIFEST_OPTIONAL):
            raise IndexCorrupt(f"{where}'s {key} is {_json_type(value)}, not {_JSON_TYPES[kind]}; {REBUILD}")
    if manifest["dim"] < 1 or manifest["count"] < 0 or manifest["next_id"] < 0:
        raise IndexCorrupt(f"{where} says dim {manifest['dim']}, count {manifest['count']}, next_id "
                           f"{manifest['next_id']}; {REBUILD}")
    if not all(isinstance(root, dict) and isinstance(root.get("kind"), str) for root in manifest["roots"]):
        raise IndexCorrupt(f"{where}'s roots are not objects with a kind; {REBUILD}")
    if not all(isinstance(c, str) for c in manifest.get("classes") or []):
        raise IndexCorrupt(f"{where}'s classes are not all strings; {REBUILD}")
    return manifest


def _json_type(value) -> str:
    """What a JSON value is, in words (`an integer`, `a list`, `null`, ...)."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return "a fractional number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def check_model(manifest: dict, fingerprint: str, name: str) -> None:
    if fingerprint != manifest["fingerprint"]:
        raise IndexStoreError(
            f"model fingerprint {fingerprint} does not match the index's {manifest['fingerprint']} "
            f"({name} was built with another checkpoint); use that checkpoint or rebuild the index")


def label_name(manifest: dict, label: int | None) -> str | None:
    classes = manifest.get("classes") or []
    return classes[label] if label is not None and 0 <= label < len(classes) else None


def read_item_file(item: dict, root: dict, files: Path, max_bytes: int) -> bytes:
    """The bytes of a file item's image: only a regular file under its indexed root (`files/uploads` for
    images added through the API), at most `max_bytes`."""
    if not item.get("path") or root["kind"] not in ("uploads", "folder", "csv"):
        raise ItemNotFound(f"item {item['id']} has no image file the server can send")
    base = (Path(files) / "uploads" if root["kind"] == "uploads" else Path(root["path"])).resolve()
    try:
        path = (base / item["path"]).resolve(strict=True)
    except (FileNotFoundError, RuntimeError) as e:
        raise ItemNotFound(f"the image file of item {item['id']} is no longer at its recorded path") from e
    if not path.is_relative_to(base):
        raise ItemImageRefused(f"the image file of item {item['id']} lies outside the indexed folder")
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ItemImageRefused(f"the image of item {item['id']} is not a regular file")
    if info.st_size > max_bytes:
        raise ItemImageRefused(f"the image file of item {item['id']} has {info.st_size:,} bytes, over the "
                               f"limit of {max_bytes:,}")
    with open(path, "rb") as f:
        content = f.read(max_bytes + 1)
    if len(content) > max_bytes:
        raise ItemImageRefused(f"the image file of item {item['id']} is over the limit of {max_bytes:,} bytes")
    return content


# --- one writer, crash points, a full disk ------------------------------------------------------
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


# --- operations on any store ------------------------------------------------------------------
REMOVING = ".removing.json"  # in uploads/: the files of a removal, deleted once its version is live


def settle_uploads(store: Store, live: Gallery) -> None:
    """Delete the upload files a killed write left behind: those of an add that never committed (ids the index
    has not given out yet) and those of a committed removal. The caller holds `writing()`."""
    uploads = store.files / "uploads"
    if not uploads.is_dir():
        return
    for path in uploads.iterdir():
        stem = path.name.partition(".")[0]
        if stem.isdigit() and int(stem) >= live.manifest["next_id"]:
            path.unlink(missing_ok=True)
    pending = uploads / REMOVING
    if pending.is_file():
        try:
            names = {int(k): v for k, v in json.loads(pending.read_text()).items()}
        except (ValueError, AttributeError):
            names = {}
        held = live.items(names)
        for item_id, name in names.items():
            if item_id not in held:
                (uploads / Path(name).name).unlink(missing_ok=True)
        pending.unlink()


def remove(store: str | Path | Store, ids: list[int], wait: float = 0.0) -> list[int]:
    """Delete items by id; `ItemNotFound` (nothing removed) for an id the index lacks. Ids are never reused."""
    store = open_store(store)
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise IndexStoreError("no ids to remove")
    with store.writing(wait):
        base = store.open()
        settle_uploads(store, base)
        held = base.items(ids)
        missing = [i for i in ids if i not in held]
        if missing:
            raise ItemNotFound(f"no item with id {missing[0]} in the index")
        # uploaded files belong to the index (folder files are the user's): listed first, deleted once committed
        files = {i: item["path"] for i, item in held.items() if base.root(item)["kind"] == "uploads"}
        pending = store.files / "uploads" / REMOVING
        with disk_space():
            if files:
                pending.write_text(json.dumps(files))
            try:
                store.commit(base, np.zeros(0, np.int64), np.zeros((0, base.manifest["dim"]), np.float32), [],
                             base.manifest, removed=ids)
            except BaseException:
                pending.unlink(missing_ok=True)
                raise
        crash_point("remove.committed")
        for name in files.values():
            (store.files / "uploads" / name).unlink(missing_ok=True)
        pending.unlink(missing_ok=True)
    return ids


def rebuild(store: str | Path | Store, index_key: str = "auto", recall_target: float = tuning.RECALL_TARGET,
            wait: float = 0.0, on_disk: bool = False) -> dict:
    """Re-index the stored vectors with another index kind (no re-embedding), its lists on disk with `on_disk`."""
    store = open_store(store)
    with store.writing(wait):
        base = store.open()
        empty = np.zeros((0, base.manifest["dim"]), np.float32)
        with disk_space():
            return store.commit(base, np.zeros(0, np.int64), empty, [], base.manifest, index_key, recall_target,
                                on_disk=on_disk)
