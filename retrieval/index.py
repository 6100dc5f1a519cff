"""The gallery index on disk: FAISS vectors, SQLite metadata and a manifest, saved as atomic versions.

    IDX/
      CURRENT             name of the live version; replaced atomically, so readers never see half a save
      v000002/            index.faiss, metadata.sqlite, manifest.json
      building/           embedded chunks of an unfinished build or add (what --resume continues)
      profile.json        measured cost of submodels on this machine (see `budget`)

FAISS indexes come from `index_factory` strings wrapped in IDMap2, so ids are stable. `auto` picks
exact search for small galleries, following the FAISS wiki's "Guidelines to choose an index":
`Flat` below 100k vectors (brute force stays in milliseconds), `HNSW32` up to 1M (fast, accurate,
memory is not yet a concern), and `IVF{4*sqrt(n)},PQ{dim/4}` beyond (K between 4 and 16 sqrt(n) centroids,
PQ to fit memory).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import sqlite3
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import faiss
import numpy as np

from matvit.errors import UserError

FORMAT = 1
FLAT_MAX, HNSW_MAX = 100_000, 1_000_000


class IndexStoreError(UserError):
    """A missing, corrupt or mismatched index directory."""


def auto_index_key(count: int, dim: int) -> str:
    if count < FLAT_MAX:
        return "Flat"
    if count < HNSW_MAX:
        return "HNSW32"
    return f"IVF{4 * int(math.sqrt(count))},PQ{max(1, dim // 4)}"


def make_faiss(key: str, dim: int, train_vectors: np.ndarray) -> faiss.Index:
    """An empty IDMap2-wrapped index from a factory string (trained on `train_vectors` when needed)."""
    try:
        index = faiss.index_factory(dim, f"IDMap2,{key}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexStoreError(f"bad --index-key {key!r}: {str(e).strip().splitlines()[-1]}") from e
    if not index.is_trained:
        index.train(np.ascontiguousarray(train_vectors, dtype=np.float32))
    return index


def versions_of_packages() -> dict:
    return {p: version(p) for p in ("matvit", "torch", "timm", "faiss-cpu")}


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


SCHEMA = """CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, label INTEGER, width INTEGER, height INTEGER,
    added_at TEXT NOT NULL)"""


@dataclass
class GalleryIndex:
    """The live version of an index directory, opened for search and metadata look-ups."""

    directory: Path
    version_dir: Path
    faiss_index: faiss.Index
    manifest: dict

    @classmethod
    def open(cls, directory: Path) -> GalleryIndex:
        directory = Path(directory)
        current = directory / "CURRENT"
        if not current.is_file():
            raise IndexStoreError(f"no index at {directory}: build one with `matvit build-index`")
        version_dir = directory / current.read_text().strip()
        try:
            manifest = json.loads((version_dir / "manifest.json").read_text())
        except FileNotFoundError as e:
            raise IndexStoreError(f"index {directory} is corrupt: its manifest.json is missing; rebuild it") from e
        except json.JSONDecodeError as e:
            raise IndexStoreError(f"index {directory} is corrupt: manifest.json is not valid JSON ({e})") from e
        missing = {"format", "fingerprint", "submodel", "dim", "metric", "count", "index_key"} - set(manifest)
        if missing:
            raise IndexStoreError(f"index {directory} is corrupt: manifest.json lacks {', '.join(sorted(missing))}")
        try:
            index = faiss.read_index(str(version_dir / "index.faiss"))
        except RuntimeError as e:
            raise IndexStoreError(f"index {directory} is corrupt: cannot read index.faiss") from e
        if index.ntotal != manifest["count"] or index.d != manifest["dim"]:
            raise IndexStoreError(f"index {directory} is corrupt: index.faiss holds {index.ntotal} vectors "
                                  f"of dim {index.d}, the manifest says {manifest['count']} of dim {manifest['dim']}")
        return cls(directory, version_dir, index, manifest)

    @property
    def count(self) -> int:
        return self.faiss_index.ntotal

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.manifest["fingerprint"]:
            raise IndexStoreError(
                f"model fingerprint {fingerprint} does not match the index's {self.manifest['fingerprint']} "
                f"({self.directory} was built with another checkpoint); use that checkpoint or rebuild the index")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each queries x min(k, count); inner product of L2-normalised vectors."""
        k = min(k, self.count)
        return self.faiss_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def items(self, ids) -> dict[int, dict]:
        ids = [int(i) for i in ids if 0 <= i < 2**63]  # SQLite integers are signed 64-bit
        if not ids:
            return {}
        with sqlite3.connect(f"file:{self.version_dir / 'metadata.sqlite'}?mode=ro", uri=True) as db:
            db.row_factory = sqlite3.Row
            marks = ",".join("?" * len(ids))
            rows = db.execute(f"SELECT * FROM items WHERE id IN ({marks})", ids).fetchall()
        classes = self.manifest.get("classes") or []
        out = {}
        for row in rows:
            item = dict(row)
            label = item["label"]
            item["label_name"] = classes[label] if label is not None and 0 <= label < len(classes) else None
            out[item["id"]] = item
        return out

    def item(self, item_id: int) -> dict | None:
        return self.items([item_id]).get(item_id)

    def all_ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.faiss_index.id_map)


def write_version(directory: Path, faiss_index: faiss.Index, rows: list[tuple], manifest: dict,
                  base: GalleryIndex | None = None) -> Path:
    """Save a new version (base's metadata plus `rows`) and switch CURRENT to it atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in directory.glob("v[0-9]*") if p.is_dir() and not p.name.endswith(".tmp"))
    name = f"v{int(existing[-1][1:]) + 1:06d}" if existing else "v000001"
    tmp = directory / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    faiss.write_index(faiss_index, str(tmp / "index.faiss"))
    if base is not None:
        shutil.copyfile(base.version_dir / "metadata.sqlite", tmp / "metadata.sqlite")
    with sqlite3.connect(tmp / "metadata.sqlite") as db:
        db.execute(SCHEMA)
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.close()
    manifest = {"format": FORMAT, **manifest, "count": faiss_index.ntotal, "updated_at": now(),
                "versions": versions_of_packages()}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, directory / name)
    (directory / "CURRENT.tmp").write_text(name)
    os.replace(directory / "CURRENT.tmp", directory / "CURRENT")
    for old in existing:
        shutil.rmtree(directory / old, ignore_errors=True)
    return directory / name
