"""The Milvus store: an index as one Milvus collection, through pymilvus's `MilvusClient`.

    milvus:./gallery.db[#NAME]                  Milvus Lite, run inside this process (one process at a time)
    milvus:http://HOST:19530[/DB][#NAME]        a Milvus server or cluster (also https://)

NAME (default `matvit`) is an alias that points at the live collection `NAME_v000001`, `NAME_v000002`,
... . A collection holds one row per item: `id` (the primary key, never reused), `vector` (the
L2-normalised embedding, searched by inner product), `source`, `path` ("" when none), `root`,
`label` (-1 when none), `width`, `height` and `added_at`. The manifest (model fingerprint,
submodel, dim, metric, classes, roots, next_id, count, index kind, search parameters, recall) is
the collection's property `matvit.manifest`, as JSON. Its index kinds and their tuning: `milvus_kinds`.

Adding and removing change the live collection in place: first the manifest reserves the new ids
(`next_id`), then the rows are inserted or deleted, then the manifest records the count and a new
`revision`, which readers see as a new version; a write killed in between leaves its reservation
(`unfinished_from`) in the manifest, and the next write deletes the rows it had inserted (never committed,
their ids never reused) first. A build or `index rebuild` fills a new collection, switches the alias to it
(readers never see half of it) and drops the collections before the one it replaced. Reads use Strong
consistency, so a search issued after a write has returned sees it.
Milvus searches only loaded collections (Milvus Lite opens them released in each new process): `open`
loads the live one, and a view whose collection was released meanwhile loads it again and retries once.

One writer at a time holds `LOCK` in the local directory (`files`): beside a Milvus Lite file
(`gallery.files/NAME/`), else under `$XDG_DATA_HOME/matvit/milvus/HOST-PORT[-DB]/NAME/`. That lock
spans the processes of one machine; writers of one collection on several machines are not
serialised. Milvus Lite itself lets one process at a time open its file (`retrieval.milvus_client`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

import numpy as np

from . import store_common, tuning
from .milvus_client import NOT_LOADED, open_client
from .milvus_client import milvus_errors as _milvus_errors
from .milvus_kinds import milvus_index, milvus_search_params, tune
from .prefix import Plan
from .store_common import (
    COLUMNS,
    check_model,
    label_name,
    now,
    read_item_file,
    versions_of_packages,
)
from .store_errors import IndexStoreError
from .store_writes import crash_point, writer

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST_KEY = "matvit.manifest"
UNFINISHED = "unfinished_from"  # in a manifest: an in-place write reserved ids from here and has not ended
DEFAULT_NAME = "matvit"
FIELDS = list(COLUMNS)  # the metadata fields, as in the directory store
TEXT_MAX = 65_535  # Milvus's longest VARCHAR
INSERT_BATCH = 1000  # rows per insert request
PAGE = 10_000  # ids per range query (under Milvus's 16,384 query window)
IN_CHUNK = 1000  # ids per `id in [...]` filter
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
SERVER_SCHEMES = ("http", "https", "tcp")


def _row(item_id, source, path, root, label, width, height, added_at, vector) -> dict:
    return {"id": int(item_id), "vector": vector, "source": str(source)[:TEXT_MAX], "path": path or "",
            "root": int(root), "label": -1 if label is None else int(label), "width": int(width),
            "height": int(height), "added_at": added_at}


def _item(entity: dict, manifest: dict) -> dict:
    item = {c: entity.get(c) for c in COLUMNS}
    item["id"] = int(item["id"])
    item["path"] = item["path"] or None
    item["label"] = None if item["label"] is None or item["label"] < 0 else int(item["label"])
    item["label_name"] = label_name(manifest, item["label"])
    return item


@dataclass(eq=False)
class MilvusGallery:
    """The live collection as one view: the manifest it had when opened, and its physical collection (a
    rebuild's alias switch does not move a view that is in use)."""

    store: MilvusStore
    collection: str
    manifest: dict
    searches_prefixes: ClassVar[bool] = False

    @property
    def version(self) -> str:
        return f"{self.collection}@{self.manifest['revision']}"

    @property
    def count(self) -> int:
        return self.manifest["count"]

    @property
    def pending_deletions(self) -> int:
        return 0  # Milvus drops deleted rows from every search itself

    def check_model(self, fingerprint: str) -> None:
        check_model(self.manifest, fingerprint, self.store.name)

    def search(self, queries: np.ndarray, k: int, search_params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.count))
        params = {**self.manifest.get("search_params", {}), **(search_params or {})}
        milvus_params = milvus_search_params(self.manifest["index_key"], params, k)
        scores = np.full((len(queries), k), -np.finfo(np.float32).max, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        if self.count == 0 or len(queries) == 0:
            return scores, ids
        hits = self._read(f"cannot search {self.store.name}", lambda client: client.search(
            self.collection, data=queries.tolist(), limit=k, search_params={"metric_type": "IP",
                                                                            "params": milvus_params},
            consistency_level="Strong"))
        for row, found in enumerate(hits):
            for col, hit in enumerate(list(found)[:k]):
                ids[row, col], scores[row, col] = int(hit["id"]), float(hit["distance"])
        return scores, ids

    def search_prefix(self, queries: np.ndarray, k: int, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        raise IndexStoreError(f"{self.store.name} is a Milvus collection, which searches full vectors only: search "
                              "a prefix of the dimensions (dims or funnel) in a FAISS index directory")

    def items(self, ids) -> dict[int, dict]:
        ids = sorted({int(i) for i in ids if 0 <= i < 2**63})
        out = {}
        for start in range(0, len(ids), IN_CHUNK):
            chunk = ids[start:start + IN_CHUNK]
            for entity in self._query(f"id in [{','.join(map(str, chunk))}]", FIELDS, len(chunk)):
                item = _item(entity, self.manifest)
                out[item["id"]] = item
        return out

    def item(self, item_id: int) -> dict | None:
        return self.items([item_id]).get(item_id)

    def labels(self) -> dict[int, int | None]:
        return {item["id"]: item["label"] for item in (_item(e, self.manifest) for e in self.rows(["id", "label"]))}

    def rows(self, fields: list[str]):
        """Every row's `fields`, a page of ids at a time (ids lie in [0, next_id))."""
        for start in range(0, self.manifest["next_id"], PAGE):
            yield from self._query(f"id >= {start} and id < {start + PAGE}", fields, PAGE)

    def _query(self, expression: str, fields: list[str], limit: int) -> list[dict]:
        return list(self._read(f"cannot read {self.store.name}", lambda client: client.query(
            self.collection, filter=expression, output_fields=fields, limit=limit, consistency_level="Strong")))

    def _read(self, what: str, call):
        """`call(client)`; when the collection was released since this view was opened (a Milvus restart, a
        `release` by an operator), it is loaded again and the call tried once more."""
        from pymilvus.exceptions import MilvusException

        client = self.store.client()
        with _milvus_errors(what):
            try:
                return call(client)
            except MilvusException as e:
                if e.code != NOT_LOADED:
                    raise
            log.warning("%s: collection %s was not loaded; loading it", self.store.name, self.collection)
            self.store.load(self.collection)
            return call(client)

    def root(self, item: dict) -> dict:
        return self.manifest["roots"][item["root"]]

    def image_file(self, item: dict, max_bytes: int) -> bytes:
        return read_item_file(item, self.root(item), self.store.files, max_bytes)

    def advice(self) -> str | None:
        flat_max = store_common.FLAT_MAX
        if self.manifest["index_key"] == "Flat" and self.count >= flat_max:
            return (f"this exact (Flat) index holds {self.count:,} vectors, past the {flat_max:,} where `auto` "
                    f"chooses an approximate one; re-index with `matvit index rebuild --index {self.store.name} "
                    f"--index-key auto`")
        return None


@dataclass(eq=False)
class MilvusStore:
    """One index in Milvus (Lite or a server), behind the `retrieval.store.Store` interface."""

    uri: str  # a Milvus Lite path ending in .db, or a server's URI
    alias: str
    files: Path
    name: str

    @classmethod
    def from_spec(cls, spec: str) -> MilvusStore:
        """`URI[#NAME]`, the part of `milvus:URI[#NAME]` after `milvus:`."""
        uri, _, alias = spec.partition("#")
        alias = alias or DEFAULT_NAME
        if not NAME_RE.fullmatch(alias):
            raise IndexStoreError(f"bad Milvus collection name {alias!r}: letters, digits and underscores, "
                                  "starting with a letter or an underscore")
        parsed = urlparse(uri)
        if parsed.scheme in SERVER_SCHEMES:
            if not parsed.hostname:
                raise IndexStoreError(f"milvus:{spec}: no host in the Milvus URI (e.g. milvus:http://HOST:19530)")
            place = "-".join(p for p in (parsed.hostname, str(parsed.port or 19530), parsed.path.strip("/")) if p)
            data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
            files = data_home / "matvit" / "milvus" / place.replace("/", "-") / alias
        elif uri.endswith(".db"):
            files = Path(uri[:-3] + ".files") / alias
        else:
            raise IndexStoreError(f"milvus:{spec}: give a Milvus Lite file ending in .db (milvus:./gallery.db) or a "
                                  "server URI (milvus:http://HOST:19530)")
        return cls(uri, alias, files, f"milvus:{spec}")

    @property
    def lite(self) -> bool:
        return self.uri.endswith(".db") and urlparse(self.uri).scheme not in SERVER_SCHEMES

    # --- the client -------------------------------------------------------------------------
    def client(self, create: bool = False):
        """The process's client of this URI (for Milvus Lite: its server in this process, started once)."""
        return open_client(self.uri, self.lite, self.name, create)

    def _describe(self) -> tuple[str, dict] | None:
        """(live collection, manifest), or None when there is no index."""
        client = self.client()
        with _milvus_errors(f"cannot read {self.name}"):
            if not client.has_collection(self.alias):
                return None
            info = client.describe_collection(self.alias)
        text = (info.get("properties") or {}).get(MANIFEST_KEY)
        if text is None:
            raise IndexStoreError(f"{self.name}: the collection {info['collection_name']} was not made by matvit "
                                  f"(it has no {MANIFEST_KEY} property); name another collection with #NAME")
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as e:
            raise IndexStoreError(f"index {self.name} is corrupt: its manifest is not valid JSON ({e})") from e
        return info["collection_name"], manifest

    # --- the Store interface ----------------------------------------------------------------
    def check_present(self) -> None:
        if self.lite and not Path(self.uri).exists():
            raise IndexStoreError(f"no index at {self.name}: build one with `matvit build-index`")

    def open(self) -> MilvusGallery:
        described = self._describe()
        if described is None:
            raise IndexStoreError(f"no index at {self.name}: build one with `matvit build-index`")
        collection, manifest = described
        if manifest.get("format") != FORMAT:
            raise IndexStoreError(f"index {self.name} has format {manifest.get('format')}; this matvit reads "
                                  f"format {FORMAT} of a Milvus index")
        missing = {"fingerprint", "submodel", "dim", "metric", "count", "index_key", "next_id", "roots",
                   "revision"} - set(manifest)
        if missing:
            raise IndexStoreError(f"index {self.name} is corrupt: its manifest lacks {', '.join(sorted(missing))}")
        self.load(collection)
        return MilvusGallery(self, collection, manifest)

    def load(self, collection: str) -> None:
        """Make `collection` searchable: Milvus serves only loaded collections, and a Milvus Lite file opened
        in a new process (or a server after a restart) has them released. A loaded one is left as it is."""
        from pymilvus.client.types import LoadState

        client = self.client()
        with _milvus_errors(f"cannot load {self.name}"):
            if client.get_load_state(collection)["state"] != LoadState.Loaded:
                client.load_collection(collection)

    def current_version(self) -> str | None:
        try:
            described = self._describe()
        except IndexStoreError:
            return None
        return None if described is None else f"{described[0]}@{described[1].get('revision')}"

    def live_manifest(self) -> dict | None:
        try:
            described = self._describe()
        except IndexStoreError:
            return None
        return None if described is None else described[1]

    def writing(self, wait: float = 0.0) -> AbstractContextManager[None]:
        self.client(create=True)  # Milvus Lite: refused at once when another process has the file
        return writer(self.files, wait, self.name)

    def commit(self, base: MilvusGallery | None, new_ids: np.ndarray, new_vectors: np.ndarray, rows: list[tuple],
               manifest: dict, index_key: str | None = None, recall_target: float = tuning.RECALL_TARGET,
               removed: list[int] = (), on_disk: bool = False) -> dict:
        if on_disk:
            raise IndexStoreError("--on-disk builds FAISS's on-disk lists in an index directory; Milvus keeps "
                                  "large collections itself (a cluster spreads them over its query nodes)")
        new_vectors = np.asarray(new_vectors, dtype=np.float32).reshape(-1, manifest["dim"])
        if index_key is not None or base is None:
            return self._fill_new(base, rows, new_vectors, manifest, index_key or "auto", recall_target, removed)
        client = self.client()
        revision, manifest = base.manifest["revision"], {k: v for k, v in manifest.items() if k != UNFINISHED}
        with _milvus_errors(f"cannot write {self.name}"):
            if UNFINISHED in base.manifest:  # the rows of an add killed before its end: never committed
                client.delete(base.collection, filter=f"id >= {int(base.manifest[UNFINISHED])}")
            # reserve the ids (and new classes and roots) before any row uses them; the job stays the base's
            self._set_manifest(base.collection, {**manifest, "job": base.manifest.get("job"), "count": base.count,
                                                 "revision": revision, UNFINISHED: base.manifest["next_id"]})
            crash_point("milvus.reserved")
            if len(removed):
                client.delete(base.collection, ids=[int(i) for i in removed])
            for batch in _batches(rows, new_vectors):
                client.insert(base.collection, batch)
            count = self._count(base.collection)
        crash_point("milvus.written")
        final = self._final(manifest, count, revision + 1)
        if base.manifest["index_key"] == "Flat":
            final.update(search_params={}, recall={"exact": True})
        self._set_manifest(base.collection, final)
        return {"count": count, "index_key": final["index_key"], "search_params": final.get("search_params", {}),
                "recall": final.get("recall")}

    # --- writing ----------------------------------------------------------------------------
    def _final(self, manifest: dict, count: int, revision: int) -> dict:
        versions = versions_of_packages()
        for package in ("pymilvus", "milvus-lite") if self.lite else ("pymilvus",):
            try:
                versions[package] = version(package)
            except PackageNotFoundError:
                pass
        return {**manifest, "format": FORMAT, "store": "milvus", "count": count, "revision": revision,
                "updated_at": now(), "versions": versions}

    def _set_manifest(self, collection: str, manifest: dict) -> None:
        with _milvus_errors(f"cannot write {self.name}"):
            self.client().alter_collection_properties(collection, properties={MANIFEST_KEY: json.dumps(manifest)})

    def _count(self, collection: str) -> int:
        result = self.client().query(collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(list(result)[0]["count(*)"])

    def _live(self) -> str | None:
        """The collection the alias points at (None when there is none)."""
        client = self.client()
        if not client.has_collection(self.alias):
            return None
        live = client.describe_collection(self.alias)["collection_name"]
        if live == self.alias:
            raise IndexStoreError(f"{self.name}: a collection named {self.alias} exists and is not an index of "
                                  "matvit's; name another with #NAME")
        return live

    def _collections(self) -> list[str]:
        """This index's collections in the order they were made (by number: _v999999 before _v1000000)."""
        pattern = re.compile(re.escape(self.alias) + r"_v(\d{6,})")
        found = [c for c in self.client().list_collections() if pattern.fullmatch(c)]
        return sorted(found, key=lambda c: int(c.rsplit("_v", 1)[1]))

    def _fill_new(self, base: MilvusGallery | None, rows: list[tuple], new_vectors: np.ndarray, manifest: dict,
                  index_key: str, recall_target: float, removed) -> dict:
        """A new collection with `base`'s rows (less `removed`) and the new ones, indexed as `index_key`; then
        the alias switches to it and the collections older than the one it replaced are dropped."""
        from pymilvus import DataType, MilvusClient

        client, dim = self.client(create=True), manifest["dim"]
        kept = 0 if base is None else base.count - len(removed)
        key, index_type, build_params = milvus_index(index_key, kept + len(rows))
        with _milvus_errors(f"cannot write {self.name}"):
            existing = self._collections()
            live = self._live()
            number = int(existing[-1].rsplit("_v", 1)[1]) + 1 if existing else 1
            collection = f"{self.alias}_v{number:06d}"
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            for text in ("source", "path"):
                schema.add_field(text, DataType.VARCHAR, max_length=TEXT_MAX)
            for number_field in ("root", "label", "width", "height"):
                schema.add_field(number_field, DataType.INT64)
            schema.add_field("added_at", DataType.VARCHAR, max_length=64)
            index_params = client.prepare_index_params()
            index_params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=build_params)
            client.create_collection(collection, schema=schema, consistency_level="Strong")
            client.create_index(collection, index_params, sync=False)  # on no rows yet: nothing to wait for
            client.load_collection(collection)
        try:
            with _milvus_errors(f"cannot write {self.name}"):
                ids, vectors = self._fill(collection, base, rows, new_vectors, removed)
                client.flush(collection)  # seal the inserted segments, so that Milvus indexes them
                count = self._count(collection)
            manifest = {k: v for k, v in manifest.items() if k != UNFINISHED}
            final = self._final({**manifest, "index_key": key, "milvus_index": {"type": index_type,
                                                                                 "params": build_params}},
                                count, 1 if base is None else base.manifest["revision"] + 1)
            params, recall = tune(MilvusGallery(self, collection, final), ids, vectors, recall_target)
            final.update(search_params=params, recall=recall)
            self._set_manifest(collection, final)
            crash_point("milvus.filled")
        except BaseException:
            with _milvus_errors(f"cannot clean up {self.name}"):
                client.drop_collection(collection)
            raise
        with _milvus_errors(f"cannot switch {self.name} to its new collection"):
            if live is None:
                client.create_alias(collection, self.alias)
            else:
                client.alter_alias(collection, self.alias)
            crash_point("milvus.switched")
            for old in existing:  # keep the collection just replaced: a reader may still use it
                if old != live:
                    client.drop_collection(old)
        return {"count": count, "index_key": key, "search_params": params, "recall": recall}

    def _fill(self, collection: str, base: MilvusGallery | None, rows: list[tuple], new_vectors: np.ndarray,
              removed) -> tuple[np.ndarray, np.ndarray]:
        """Insert `base`'s rows (less `removed`) and the new ones; returns every (id, vector) inserted."""
        client, dim = self.client(), new_vectors.shape[1]
        ids, vectors = [], []
        dropped = {int(i) for i in removed}
        old = base.rows(["id", "vector", *COLUMNS[1:]]) if base is not None else iter(())
        end = base.manifest.get(UNFINISHED) if base is not None else None  # rows past it were never committed
        for batch in itertools.chain(_kept(old, dropped, end), _batches(rows, new_vectors)):
            client.insert(collection, batch)
            ids.append(np.asarray([e["id"] for e in batch], np.int64))
            vectors.append(np.asarray([e["vector"] for e in batch], np.float32).reshape(-1, dim))
        return (np.concatenate(ids) if ids else np.zeros(0, np.int64),
                np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32))


def _batches(rows: list[tuple], vectors: np.ndarray):
    """Rows and their vectors as entities, `INSERT_BATCH` at a time."""
    for start in range(0, len(rows), INSERT_BATCH):
        part = vectors[start:start + INSERT_BATCH].tolist()
        yield [_row(*r, v) for r, v in zip(rows[start:start + INSERT_BATCH], part, strict=True)]


def _kept(entities, dropped: set[int], end: int | None = None):
    """Stored entities less the `dropped` ids (and those from `end` on), `INSERT_BATCH` at a time."""
    batch = []
    for entity in entities:
        if int(entity["id"]) not in dropped and (end is None or int(entity["id"]) < end):
            batch.append({c: entity[c] for c in ("id", "vector", *COLUMNS[1:])})
        if len(batch) == INSERT_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
