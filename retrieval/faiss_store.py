"""The FAISS directory store: FAISS vectors, SQLite metadata and a manifest, saved as immutable versions
(the layout, and how a version is written and switched to: `faiss_versions`).

FAISS indexes come from `index_factory` strings wrapped in IDMap2, so ids are stable. `auto` follows the
FAISS wiki's "Guidelines to choose an index": `Flat` below 100k vectors (brute force stays in
milliseconds; a new build takes `HNSW32` instead when an exact search would cost more than half of
encoding a query, see `commit.exact_or_hnsw`), `HNSW32` below 10M (measured at 1M: hundreds of times
faster than Flat at recall@10 0.95; about 800 bytes per vector, so 8 GB at 10M), and
`IVF{4*sqrt(n)},SQ8` beyond (K between 4 and 16 sqrt(n) centroids; a byte per dimension, under a third
of Flat's memory), with exact re-ranking from the stored vectors tuned in where the codes alone miss the
recall target (measured at 1M: SQ8 with 2x re-ranking meets 0.95; PQ with dim/4 bytes takes a ninth of
Flat's memory but stays under it, so it is for an explicit `--index-key`). A non-exact index gets its
`efSearch`, `nprobe` (and `rerank`) tuned to a recall target (see `tuning`). Deletions are physical
where the FAISS index supports `remove_ids`, else the ids are tombstoned and filtered out of every
search with an `IDSelector` until a rebuild. `--index-key PrefixD,KEY` (for a Matryoshka-trained model,
`retrieval.prefix`) builds KEY over the vectors' D-prefixes and re-ranks its candidates by the stored full
vectors, so memory holds only the prefixes' codes and graph.

With `on_disk` an IVF index is built as FAISS's on-disk inverted lists (`ondisk`: a block per chunk of
vectors, merged on disk): the version holds `index.faiss` (quantizer and list offsets), `index.ivfdata`
(the lists, memory-mapped at search) and `trained.index` (to grow it); vectors.npy is memory-mapped
too. Its lists are read-only: an add merges the base's lists and the new block into the new version,
a removal is a tombstone (hard links keep the lists otherwise).

`DirectoryStore` is this layout behind the `retrieval.store.Store` interface (its `files` is the
directory itself); `GalleryIndex` is one version, a `retrieval.store.Gallery`. The index kind `auto` picks by
size is `store_common.auto_index_key`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import faiss
import numpy as np

from . import faiss_versions as versions
from . import gpu, ondisk, store_common, tuning
from .faiss_versions import FORMAT, read_current, write_version
from .prefix import Plan, PrefixSearch, index_dims, over_prefix, split_key
from .store_common import REBUILD, auto_index_key, check_manifest, check_model, label_name, read_item_file
from .store_errors import IndexCorrupt, IndexMissing, IndexStoreError
from .store_writes import disk_space, writer

log = logging.getLogger(__name__)
TRAIN_SAMPLE = 100_000  # vectors an IVF quantizer is trained on (at least)
SQL_CHUNK = 500  # ids per `IN (...)` query
ONDISK_CHUNK = 100_000  # vectors per block of an on-disk build


def training_size(count: int, key: str, dim: int) -> int:
    """How many of `count` vectors index kind `key` is trained on: TRAIN_SAMPLE, or 40 per IVF list when that is
    more (FAISS's k-means wants 39), or all of them when fewer."""
    try:
        lists = faiss.extract_index_ivf(faiss.index_factory(dim, key)).nlist
    except RuntimeError:  # not IVF
        lists = 0
    return min(max(TRAIN_SAMPLE, 40 * lists), count)


def training_sample(vectors: np.ndarray, key: str) -> np.ndarray:
    """A seeded sample of `training_size` `vectors` (read in order from a memory-mapped array)."""
    rng = np.random.default_rng(0)
    size = training_size(len(vectors), key, vectors.shape[1])
    return np.ascontiguousarray(vectors[np.sort(rng.choice(len(vectors), size, replace=False))], dtype=np.float32)


def make_faiss(key: str, dim: int, train_vectors: np.ndarray) -> faiss.Index:
    """An empty IDMap2-wrapped index from a factory string, or from `PrefixD,KEY` one of kind KEY over the
    D-prefixes (`retrieval.prefix`), trained on a sample of `train_vectors`."""
    dims, inner = split_key(key)
    if dims is not None and not 1 <= dims < dim:
        raise IndexStoreError(f"bad --index-key {key!r}: a prefix index needs a length from 1 to {dim - 1}")
    try:
        if dims is None:
            index = faiss.index_factory(dim, f"IDMap2,{key}", faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIDMap2(over_prefix(faiss.index_factory(dims, inner, faiss.METRIC_INNER_PRODUCT),
                                                  dim, dims))
    except RuntimeError as e:
        raise IndexStoreError(f"bad --index-key {key!r}: {str(e).strip().splitlines()[-1]}") from e
    if not index.is_trained:
        sample = training_sample(train_vectors, key)
        gpu.train_on_gpus(index)
        try:
            index.train(sample)
        except RuntimeError as e:
            raise IndexStoreError(f"--index-key {key!r} cannot be trained on {len(sample)} vectors: "
                                  f"{str(e).strip().splitlines()[-1]}") from e
    return index


@dataclass(eq=False)
class GalleryIndex:
    """One version of an index directory, opened for search and metadata look-ups (read-only)."""

    directory: Path
    version_dir: Path
    faiss_index: faiss.Index
    manifest: dict
    deleted: np.ndarray  # tombstoned ids, filtered out of every search
    searches_prefixes: ClassVar[bool] = True
    lease: int | None = field(default=None, repr=False)
    gpu_index: faiss.Index | None = field(default=None, repr=False)  # a search copy on FAISS's GPUs, if any
    _local: threading.local = field(default_factory=threading.local, repr=False)  # a metadata connection per thread
    _prefix: PrefixSearch | None = field(default=None, repr=False)
    _prefix_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, directory: Path) -> GalleryIndex:
        """The live version (retrying when a writer replaces it while it is being opened)."""
        directory = Path(directory)
        for _ in range(10):
            version_dir = directory / read_current(directory)
            lease = versions.lease(version_dir)
            if lease is not None:
                try:
                    return cls._load(directory, version_dir, lease)
                except BaseException:
                    os.close(lease)
                    raise
            if (directory / read_current(directory)) == version_dir:
                break  # CURRENT names a version that is not there: not a race
            time.sleep(0.01)
        raise IndexCorrupt(f"index {directory} is corrupt: CURRENT names {version_dir.name}, which is missing "
                           f"its manifest.json; {REBUILD}")

    @classmethod
    def _load(cls, directory: Path, version_dir: Path, lease: int) -> GalleryIndex:
        """Open a version, checking every file against its manifest (cheaply: shapes and counts, not contents),
        so that an index that opens can be searched, read and written."""
        corrupt = f"index {directory} is corrupt"
        try:
            manifest = json.loads((version_dir / "manifest.json").read_bytes())
        except ValueError as e:  # not JSON, or not text
            raise IndexCorrupt(f"{corrupt}: {version_dir.name}/manifest.json is not valid JSON; {REBUILD}") from e
        if not isinstance(manifest, dict):
            check_manifest(manifest, str(directory))  # says what it is instead
        if not isinstance(manifest.get("format"), int):
            raise IndexCorrupt(f"{corrupt}: {version_dir.name}/manifest.json lacks format; {REBUILD}")
        if manifest["format"] != FORMAT:
            newer = manifest["format"] > FORMAT
            raise IndexStoreError(
                f"index {directory} has format {manifest['format']}; this matvit reads format {FORMAT}: "
                + ("upgrade matvit" if newer else "rebuild it with `matvit build-index`"))
        check_manifest(manifest, str(directory))
        count, dim = manifest["count"], manifest["dim"]
        try:
            index = (ondisk.open_merged(version_dir / "index.faiss") if manifest.get("on_disk")
                     else faiss.read_index(str(version_dir / "index.faiss")))
        except (RuntimeError, OSError, ValueError) as e:
            raise IndexCorrupt(f"{corrupt}: cannot read {version_dir.name}/index.faiss; {REBUILD}") from e
        deleted = versions.load_array(version_dir / "deleted.npy", corrupt, None, (None,), np.int64)
        versions.load_array(version_dir / "ids.npy", corrupt, "r", (count,), np.int64)
        versions.load_array(version_dir / "vectors.npy", corrupt, "r", (count, dim), np.float32)
        if index.ntotal - len(deleted) != count or index.d != dim:
            raise IndexCorrupt(f"{corrupt}: index.faiss holds {index.ntotal} vectors of dim {index.d} "
                               f"({len(deleted)} deleted), the manifest says {count} of dim {dim}; {REBUILD}")
        versions.check_metadata(version_dir / "metadata.sqlite", count, corrupt)
        return cls(directory, version_dir, index, manifest, deleted, lease,
                   None if manifest.get("on_disk") else gpu.search_copy(index))

    def __del__(self) -> None:
        if self.lease is not None:
            os.close(self.lease)
            self.lease = None

    @property
    def version(self) -> str:
        return self.version_dir.name

    @property
    def count(self) -> int:
        """Items in the index (deleted ones excluded)."""
        return self.manifest["count"]

    @property
    def pending_deletions(self) -> int:
        return len(self.deleted)

    def check_model(self, fingerprint: str) -> None:
        check_model(self.manifest, fingerprint, str(self.directory))

    def search(self, queries: np.ndarray, k: int, search_params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each queries x min(k, count), id -1 past the hits; inner product of normalised vectors.

        `search_params` ({"nprobe": n}, {"ef_search": n}, {"rerank": r}) overrides the tuned value of this search
        only."""
        k = max(1, min(k, self.count))
        params = {**self.manifest.get("search_params", {}), **(search_params or {})}
        rerank = int(params.get("rerank", 1)) > 1 or index_dims(self.faiss_index)
        stored = tuning.Stored(*self.vectors()) if rerank else None
        on_gpus = self.gpu_index if not len(self.deleted) else None
        return tuning.search(self.faiss_index, queries, k, params, self.deleted, stored, on_gpus)

    def search_prefix(self, queries: np.ndarray, k: int, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of prefix or funnel search (`retrieval.prefix`) over the version's stored vectors, loaded
        into memory on first use (deleted items left out)."""
        with self._prefix_lock:
            if self._prefix is None:
                ids, vectors = self.vectors()
                live = ~np.isin(ids, self.deleted)
                self._prefix = PrefixSearch(vectors[live], ids[live])
        return self._prefix.search(queries, k, plan)

    def _query(self, sql: str, args=()) -> list[sqlite3.Row]:
        """Rows of a read-only query, on this thread's connection to the version's metadata (opened once: a
        version never changes, and a server's worker threads query it again and again)."""
        db = getattr(self._local, "db", None)
        if db is None:
            uri = versions.sqlite_uri(self.version_dir / "metadata.sqlite", read_only=True)
            db = self._local.db = sqlite3.connect(uri, uri=True)
            db.row_factory = sqlite3.Row
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise IndexCorrupt(f"index {self.directory} is corrupt: cannot read {self.version}/metadata.sqlite "
                               f"({versions.first_line(e)}); {REBUILD}") from e

    def items(self, ids) -> dict[int, dict]:
        """Metadata of the given ids that the index holds."""
        ids = sorted({int(i) for i in ids if 0 <= i < 2**63})  # SQLite integers are signed 64-bit
        out = {}
        for start in range(0, len(ids), SQL_CHUNK):
            chunk = ids[start:start + SQL_CHUNK]
            for row in self._query(f"SELECT * FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                item = dict(row)
                item["label_name"] = label_name(self.manifest, item["label"])
                out[item["id"]] = item
        return out

    def item(self, item_id: int) -> dict | None:
        return self.items([item_id]).get(item_id)

    def labels(self) -> dict[int, int | None]:
        """Label of every item, by id (one query, no id list)."""
        return {row["id"]: row["label"] for row in self._query("SELECT id, label FROM items")}

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every item, in id order, memory-mapped."""
        return (np.load(self.version_dir / "ids.npy", mmap_mode="r"),
                np.load(self.version_dir / "vectors.npy", mmap_mode="r"))

    def root(self, item: dict) -> dict:
        return self.manifest["roots"][item["root"]]

    def image_file(self, item: dict, max_bytes: int) -> bytes:
        """The bytes of a file item's image: only a regular file under its indexed root, at most `max_bytes`."""
        return read_item_file(item, self.root(item), self.directory, max_bytes)

    def advice(self) -> str | None:
        """What an operator should do about this index's kind, if anything."""
        key, flat_max = self.manifest["index_key"], store_common.FLAT_MAX
        if key == "Flat" and self.count >= flat_max:
            return (f"this exact (Flat) index holds {self.count:,} vectors, past the {flat_max:,} where `auto` "
                    f"chooses {auto_index_key(self.count, self.manifest['dim'])}; re-index from the stored vectors "
                    f"with `matvit index rebuild --index {self.directory} --index-key auto`")
        if len(self.deleted) > 0.2 * max(1, self.count):
            return (f"{len(self.deleted):,} deleted vectors are still filtered at search; "
                    f"`matvit index rebuild --index {self.directory}` drops them")
        return None


# --- writing -----------------------------------------------------------------------------------
def commit(directory: Path, base: GalleryIndex | None, new_ids: np.ndarray, new_vectors: np.ndarray,
           rows: list[tuple], manifest: dict, index_key: str | None = None,
           recall_target: float = tuning.RECALL_TARGET, removed: list[int] = (), on_disk: bool = False) -> dict:
    """Write a version holding `base`'s items (none when None) less `removed`, plus the new ones.

    With `index_key` the FAISS index is built afresh of that kind (`auto` by size) over every vector, its
    inverted lists on disk with `on_disk` (IVF kinds); without, `base`'s index is copied and updated (an on-disk
    one grows on disk). A new or grown approximate index is tuned to `recall_target`. The caller holds
    `writer(directory)`; returns a report."""
    dim = manifest["dim"]
    new_ids = np.asarray(new_ids, dtype=np.int64)
    new_vectors = np.asarray(new_vectors, dtype=np.float32).reshape(-1, dim)
    ids, vectors = new_ids, new_vectors
    if base is not None:
        old_ids, old_vectors = base.vectors()
        keep = ~np.isin(old_ids, np.asarray(removed, dtype=np.int64))
        ids, vectors = np.concatenate([old_ids[keep], new_ids]), np.concatenate([old_vectors[keep], new_vectors])
    staged = Path(directory) / "ondisk.tmp"
    if index_key is not None:
        key = auto_index_key(len(ids), dim, on_disk) if index_key == "auto" else index_key
        if on_disk and split_key(key)[0] is not None:
            raise IndexStoreError(f"--index-key {key!r} is a prefix index, kept in memory: drop --on-disk")
        deleted = np.zeros(0, np.int64)
        if on_disk:
            shutil.rmtree(staged, ignore_errors=True)
            index = ondisk.build(staged, key, training_sample(vectors, key), _chunks(ids, vectors))
        else:
            index = make_faiss(key, dim, vectors)
            index.add_with_ids(vectors, ids)
    elif base.manifest.get("on_disk"):  # on-disk lists are read-only: removals are tombstones, adds a new merge
        on_disk, key = True, base.manifest["index_key"]
        deleted = np.union1d(base.deleted, np.asarray(removed, dtype=np.int64))
        shutil.rmtree(staged, ignore_errors=True)
        index = ondisk.extend(staged, base.version_dir, _chunks(new_ids, new_vectors)) if len(new_ids) else \
            ondisk.link(staged, base.version_dir)
    else:
        key, index, deleted = base.manifest["index_key"], copy(base.faiss_index), base.deleted
        if len(removed):
            deleted = _remove_from(index, np.asarray(removed, dtype=np.int64), deleted)
        if len(new_ids):
            index.add_with_ids(new_vectors, new_ids)
    manifest = {**manifest, "index_key": key, "on_disk": on_disk}
    if key == "Flat":
        manifest.update(search_params={}, recall={"exact": True})
    elif index_key is not None or len(new_ids):
        params, recall = tuning.tune(index, ids, vectors, deleted, recall_target)
        manifest.update(search_params=params, recall=recall)
    write_version(directory, index, ids, vectors, manifest, None if base is None else base.version_dir, rows,
                  removed, deleted, staged if on_disk else None)
    return {"count": len(ids), "index_key": key, "on_disk": on_disk, "search_params": manifest["search_params"],
            "recall": manifest["recall"]}


def copy(index: faiss.Index) -> faiss.Index:
    """A copy of `index` to update (through serialisation for a prefix index, which `clone_index` cannot copy)."""
    return faiss.deserialize_index(faiss.serialize_index(index)) if index_dims(index) else faiss.clone_index(index)


def _chunks(ids: np.ndarray, vectors: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for lo in range(0, len(ids), ONDISK_CHUNK):
        yield ids[lo:lo + ONDISK_CHUNK], vectors[lo:lo + ONDISK_CHUNK]


def _remove_from(index: faiss.Index, ids: np.ndarray, deleted: np.ndarray) -> np.ndarray:
    """Remove `ids` physically where FAISS can, else tombstone them; returns the tombstones."""
    try:
        index.remove_ids(ids)
        return deleted
    except RuntimeError:
        return np.union1d(deleted, ids)


@dataclass
class DirectoryStore:
    """An index directory behind the `retrieval.store.Store` interface."""

    directory: Path

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.name = str(self.directory)
        self.files = self.directory

    def check_present(self) -> None:
        if not (self.directory / "CURRENT").is_file():
            raise IndexMissing(f"no index at {self.directory}: build one with `matvit build-index`")

    def open(self) -> GalleryIndex:
        return GalleryIndex.open(self.directory)

    def current_version(self) -> str | None:
        try:
            return read_current(self.directory)
        except IndexStoreError:
            return None

    def live_manifest(self) -> dict | None:
        try:
            return json.loads((self.directory / self.current_version() / "manifest.json").read_text())
        except (OSError, TypeError, ValueError):
            return None

    def writing(self, wait: float = 0.0) -> AbstractContextManager[None]:
        return writer(self.directory, wait)

    def commit(self, base: GalleryIndex | None, new_ids: np.ndarray, new_vectors: np.ndarray, rows: list[tuple],
               manifest: dict, index_key: str | None = None, recall_target: float = tuning.RECALL_TARGET,
               removed: list[int] = (), on_disk: bool = False) -> dict:
        try:
            with disk_space():
                return commit(self.directory, base, new_ids, new_vectors, rows, manifest, index_key, recall_target,
                              removed, on_disk)
        except BaseException:
            shutil.rmtree(self.directory / "ondisk.tmp", ignore_errors=True)
            raise
