"""Where an index lives: the one store interface, and the choice of a store from a location.

`open_store(spec)` reads what a user gives as `--index` / `--out` (or `--store`):

    runs/fmnist-index                 an index directory: FAISS, SQLite metadata, versions (`retrieval.faiss_store`)
    milvus:./gallery.db               Milvus Lite, run inside this process, in that local file
    milvus:http://HOST:19530          a Milvus server or cluster (`https://`, `/DB` and `#COLLECTION` too)
                                      (`retrieval.milvus_store`)

A `Store` opens `Gallery` views for reading (one view serves a request from start to end: `search`, `items`,
`manifest`), names its live version (`current_version`), and writes under its writer lock with `commit`
(what `build.add` and `remove` below go through). `info` says what an index holds. Everything outside the
two stores (building, searching, the API, the demo, the command line) talks to these two protocols only; the
stores implement them without importing this module, and share what they have in common from the modules
below it (`store_errors`, `store_common`, `store_writes`). Each store also has a local directory, `files`, for
what belongs to the index without being part of it: the chunks of an unfinished build (`building/`), images
added through the API (`uploads/`), the cost profile (`profile.json`) and the writer's `LOCK`.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from . import jobs, tuning
from .prefix import Plan
from .store_errors import (  # noqa: F401  (every store's errors are the interface's)
    DiskFull,
    IndexBusy,
    IndexCorrupt,
    IndexMissing,
    IndexStoreError,
    ItemImageRefused,
    ItemNotFound,
)
from .store_writes import CRASH_AT, crash_point, disk_space, is_disk_full, writer  # noqa: F401

MILVUS_PREFIX = "milvus:"


@runtime_checkable
class Gallery(Protocol):
    """One consistent view of an index, for reading."""

    manifest: dict  # fingerprint, submodel, dim, metric, classes, roots, next_id, count, index_key, ...
    searches_prefixes: bool  # whether `search_prefix` can search (else it refuses in one line)

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

    def search_prefix(self, queries: np.ndarray, k: int, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) like `search`, on a prefix of the vectors or through the funnel (`retrieval.prefix`)."""

    def items(self, ids) -> dict[int, dict]:
        """Metadata of the given ids that the index holds (with `label_name`)."""

    def item(self, item_id: int) -> dict | None: ...

    def labels(self) -> dict[int, int | None]:
        """Label of every item, by id."""

    def root(self, item: dict) -> dict:
        """The indexed root an item came from (a folder, a dataset, or the uploads)."""

    def image_file(self, item: dict, max_bytes: int) -> bytes:
        """The bytes of a file item's image (see `store_common.read_item_file`)."""

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


def location(text: str) -> str | Path:
    """A location as typed (`--index`): a directory's path, or a `milvus:` URI kept as it is (a Path would fold
    its `//`)."""
    return text if text.startswith(MILVUS_PREFIX) else Path(text)


def open_store(spec: str | Path | Store) -> Store:
    """The store a user's `--index` names (a Store is returned as it is)."""
    if isinstance(spec, Store):
        return spec
    text = str(spec)
    if text.startswith(MILVUS_PREFIX):
        from .milvus_store import MilvusStore

        return MilvusStore.from_spec(text[len(MILVUS_PREFIX):])
    from .faiss_store import DirectoryStore

    return DirectoryStore(Path(spec))


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


def info(store: str | Path | Store) -> dict:
    """What the live index holds: its manifest, version, deletions still filtered, whether a build or an add is
    unfinished (what `--resume` continues), and what an operator should do about it, if anything."""
    store = open_store(store)
    index = store.open()
    return {**index.manifest, "version": index.version, "deleted_pending_rebuild": index.pending_deletions,
            "unfinished_build": jobs.unfinished(store.files, index.manifest), "advice": index.advice()}
