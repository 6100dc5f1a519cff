"""Building and growing an index: decode in workers, embed in batches, save chunks, then commit a version.

Embeddings go to `IDX/building/chunk-*.npz` as they are made (each written aside, then renamed), so
an interrupted run loses at most one chunk, leaves the live version untouched, and `resume=True`
embeds only what no chunk holds yet.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from matvit import data
from matvit.images import IMAGE_SUFFIXES

from .encoder import Encoder
from .index import GalleryIndex, IndexStoreError, auto_index_key, make_faiss, now, write_version

log = logging.getLogger(__name__)
CHUNK = 4096
RECALL_SAMPLE = 1000


class FolderSource:
    """Image files under a folder (class per sub-folder, or flat)."""

    def __init__(self, root: Path, img_size: int, in_chans: int, workers: int = 2) -> None:
        root = Path(root)
        if not root.is_dir():
            raise IndexStoreError(f"image folder not found: {root}")
        self.root, self.img_size, self.in_chans, self.workers = root, img_size, in_chans, workers
        self.files = data.list_images(root)
        if not self.files:
            raise IndexStoreError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.labels = data.folder_labels(self.files, root, self.classes)
        self.description = f"folder:{root.resolve()} ({len(self.files)} files)"

    def __len__(self) -> int:
        return len(self.files)

    def source(self, position: int) -> str:
        return str(self.files[position].resolve())

    def batches(self, todo: list[int], batch_size: int) -> Iterator[data.DecodedBatch]:
        files = [self.files[p] for p in todo]
        for b in data.iter_files(files, self.img_size, self.in_chans, self.workers, batch_size, desc="decoding"):
            errors = [(todo[i], e) for i, e in b.errors]
            yield data.DecodedBatch([todo[i] for i in b.positions], b.images, b.sizes, errors)


class DatasetSource:
    """A split of a named dataset (digits, fashion-mnist, folder:PATH), already decoded in memory."""

    def __init__(self, name: str, split: str, img_size: int, in_chans: int, data_dir: Path | None = None) -> None:
        self.set = data.load(name, split, img_size, in_chans, data_dir)
        self.classes = self.set.classes
        self.labels = self.set.labels.tolist()
        self.description = f"{name}:{split} ({len(self.set)} images)"

    def __len__(self) -> int:
        return len(self.set)

    def source(self, position: int) -> str:
        return self.set.sources[position]

    def batches(self, todo: list[int], batch_size: int) -> Iterator[data.DecodedBatch]:
        for i in range(0, len(todo), batch_size):
            positions = todo[i:i + batch_size]
            images = self.set.images[positions]
            size = (int(images.shape[-1]), int(images.shape[-2]))
            yield data.DecodedBatch(positions, images, [size] * len(positions), [])


Source = FolderSource | DatasetSource


def _save_chunk(building: Path, n: int, positions: list[int], embeddings: list[np.ndarray],
                sizes: list[tuple[int, int]], errors: list[tuple[int, str]]) -> None:
    tmp = building / f"chunk-{n:06d}.tmp.npz"
    np.savez(tmp, positions=np.asarray(positions, dtype=np.int64),
             embeddings=np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32),
             sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
             bad=np.asarray([p for p, _ in errors], dtype=np.int64))
    os.replace(tmp, building / f"chunk-{n:06d}.npz")


def _load_chunks(building: Path) -> list[dict]:
    return [dict(np.load(p)) for p in sorted(building.glob("chunk-[0-9]*[0-9].npz"))]


def _prepare_building(directory: Path, job: dict, resume: bool) -> tuple[Path, list[dict]]:
    """The building directory with the chunks of this same job when resuming, else empty."""
    building = directory / "building"
    job_file = building / "job.json"
    if resume and job_file.is_file() and json.loads(job_file.read_text()) == job:
        chunks = _load_chunks(building)
        log.warning("resuming: %d image(s) already embedded", sum(len(c["positions"]) for c in chunks))
        return building, chunks
    if resume:
        log.warning("nothing to resume in %s for this job; starting afresh", directory)
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    job_file.write_text(json.dumps(job, indent=2))
    return building, []


def embed_source(encoder: Encoder, source: Source, directory: Path, job: dict, spec, batch_size: int,
                 resume: bool) -> tuple[list[dict], float]:
    """Embed every position no earlier chunk holds; returns all chunks and the seconds spent."""
    building, chunks = _prepare_building(directory, job, resume)
    done = {int(p) for c in chunks for key in ("positions", "bad") for p in c[key]}
    todo = [p for p in range(len(source)) if p not in done]
    n_chunk = len(chunks)
    pending: dict = {"positions": [], "embeddings": [], "sizes": [], "errors": []}
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"embedding with {spec.text}", unit="img")
    for batch in source.batches(todo, batch_size):
        for _, err in batch.errors:
            log.warning("skipped: %s", err)
        if batch.images is not None:
            pending["embeddings"].append(encoder.encode(batch.images, spec, batch_size))
        pending["positions"] += batch.positions
        pending["sizes"] += batch.sizes
        pending["errors"] += batch.errors
        bar.update(len(batch.positions) + len(batch.errors))
        if len(pending["positions"]) + len(pending["errors"]) >= CHUNK:
            _save_chunk(building, n_chunk, **pending)
            n_chunk += 1
            pending = {k: [] for k in pending}
    bar.close()
    if pending["positions"] or pending["errors"]:
        _save_chunk(building, n_chunk, **pending)
    return _load_chunks(building), time.perf_counter() - start


def _gather(chunks: list[dict], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    positions = np.concatenate([c["positions"] for c in chunks]) if chunks else np.zeros(0, np.int64)
    parts = [c["embeddings"] for c in chunks if len(c["positions"])]
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    sizes = np.concatenate([c["sizes"] for c in chunks]) if chunks else np.zeros((0, 2), np.int64)
    skipped = sum(len(c["bad"]) for c in chunks)
    order = np.argsort(positions, kind="stable")
    return positions[order], embeddings[order], sizes[order], skipped


def recall_at_1(index, embeddings: np.ndarray, ids: np.ndarray, seed: int = 0) -> float:
    """Share of sampled gallery vectors whose approximate top-1 is their exact top-1."""
    rng = np.random.default_rng(seed)
    sample = embeddings[rng.choice(len(embeddings), min(RECALL_SAMPLE, len(embeddings)), replace=False)]
    exact = make_faiss("Flat", embeddings.shape[1], embeddings)
    exact.add_with_ids(embeddings, ids)
    return float((index.search(sample, 1)[1][:, 0] == exact.search(sample, 1)[1][:, 0]).mean())


def _finish(directory: Path, encoder: Encoder, source: Source, chunks: list[dict], seconds: float,
            manifest: dict, base: GalleryIndex | None, index_key: str) -> dict:
    dim = encoder.config.embed_dim
    positions, embeddings, sizes, skipped = _gather(chunks, dim)
    if len(positions) == 0:
        raise IndexStoreError(f"no readable images in {source.description}; nothing to index")
    first_id = base.manifest["next_id"] if base else 0
    ids = first_id + positions
    if base is None:
        key = auto_index_key(len(ids), dim) if index_key == "auto" else index_key
        index = make_faiss(key, dim, embeddings)
    else:
        key, index = base.manifest["index_key"], base.faiss_index
    index.add_with_ids(embeddings, ids)
    recall = None if key == "Flat" else recall_at_1(index, embeddings, ids)
    added = now()
    rows = [(int(i), source.source(int(p)), int(source.labels[int(p)]) if source.labels[int(p)] >= 0 else None,
             int(w), int(h), added) for i, p, (w, h) in zip(ids, positions, sizes, strict=True)]
    manifest = {**manifest, "index_key": key, "next_id": int(first_id + len(source)), "recall_at_1": recall}
    write_version(directory, index, rows, manifest, base)
    shutil.rmtree(directory / "building", ignore_errors=True)
    report = {"added": len(ids), "skipped": skipped, "count": index.ntotal, "index_key": key,
              "embed_seconds": round(seconds, 2), "images_per_s": round(len(ids) / seconds, 1) if seconds else None,
              "recall_at_1": recall}
    if skipped:
        log.warning("skipped %d unreadable image(s)", skipped)
    return report


def build(encoder: Encoder, source: Source, directory: Path, submodel: str = "XL", index_key: str = "auto",
          batch_size: int = 256, resume: bool = False) -> dict:
    """Embed a whole source with `submodel` into a new index version at `directory`."""
    spec = encoder.spec(submodel)
    job = {"kind": "build", "fingerprint": encoder.fingerprint, "submodel": spec.text, "source": source.description}
    chunks, seconds = embed_source(encoder, source, Path(directory), job, spec, batch_size, resume)
    manifest = {"fingerprint": encoder.fingerprint, "submodel": spec.text, "dim": encoder.config.embed_dim,
                "metric": "inner_product", "source": source.description, "classes": source.classes,
                "created_at": now()}
    return _finish(Path(directory), encoder, source, chunks, seconds, manifest, None, index_key)


def add(encoder: Encoder, source: FolderSource, directory: Path, batch_size: int = 256, resume: bool = False) -> dict:
    """Embed more images with the index's own submodel and add them under new ids."""
    base = GalleryIndex.open(directory)
    base.check_model(encoder.fingerprint)
    spec = encoder.spec(base.manifest["submodel"])
    job = {"kind": "add", "fingerprint": encoder.fingerprint, "base": base.version_dir.name,
           "source": source.description}
    chunks, seconds = embed_source(encoder, source, Path(directory), job, spec, batch_size, resume)
    classes = list(base.manifest.get("classes") or [])
    remap = {}
    for i, name in enumerate(source.classes):
        if name not in classes:
            classes.append(name)
        remap[i] = classes.index(name)
    source.labels = [remap.get(label, -1) for label in source.labels]
    sources = base.manifest.get("source", "")
    manifest = {**base.manifest, "classes": classes, "source": f"{sources}; {source.description}"}
    return _finish(Path(directory), encoder, source, chunks, seconds, manifest, base, base.manifest["index_key"])
