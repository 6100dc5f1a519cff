"""Building and growing an index: decode in workers, embed in batches, save chunks, then commit.

The index is any `retrieval.store.Store` (an index directory, or Milvus). Embeddings go to
`building/chunk-*.npz` in the store's local directory as they are made (see `jobs`), so a run killed at any
moment loses at most one chunk, leaves the live index untouched until its new version is whole, and
`resume=True` embeds only what no chunk holds yet, or does nothing when the job had committed. A commit
takes every image of the source (or refuses). Every write holds the index's writer lock for its whole run.

A gallery (`Source`) is every image file under a folder (`FolderSource`, `--images`), or a split of any
dataset training reads (`open_gallery`): `digits` and `fashion-mnist` in memory, `folder:PATH` and
`csv:FILE` as streamed files, `wds:PATTERN` as images read from inside their tar shards.

Under torchrun (`encoder.runtime`), every process embeds its share of the images (every world-th batch)
into chunks of its own, and the main process, which holds the lock, merges them. Ids follow the images'
positions in the source, so the index does not depend on the number of processes. Several machines need
the store's local directory on a filesystem they share; only the main process opens the store.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from matvit import data, sources
from matvit import images as imageio
from matvit.data import DatasetError
from matvit.images import IMAGE_SUFFIXES
from matvit.runtime import Runtime

from . import backends, jobs, tuning
from .encoder import Encoder
from .index import auto_index_key
from .store import (
    Gallery,
    IndexBusy,
    IndexStoreError,
    Store,
    crash_point,
    disk_space,
    now,
    open_store,
    settle_uploads,
)

log = logging.getLogger(__name__)
CHUNK = 4096
META_MEMBER = r"__[^/]*__($|/)"  # tar members webdataset skips as metadata


class Source(Protocol):
    """A gallery: images at stable positions 0 .. len - 1 (ids follow them, whatever the number of processes),
    decoded in batches of the positions asked."""

    classes: list[str]
    labels: list[int]  # class index per position; -1: none
    description: str
    root_entry: dict  # recorded in the index manifest's roots

    def __len__(self) -> int: ...

    def source(self, position: int) -> tuple[str, str | None]:
        """What the index records for an image: its name and its file relative to the root (None: no file)."""

    def batches(self, todo: list[int], batch_size: int) -> Iterator[data.DecodedBatch]:
        """`todo`'s images in order, unreadable ones as errors."""


class FilesSource:
    """Image files with labels (-1: none), decoded in worker processes; items record their paths relative to
    `base` (the index serves files under it), or no path for a file elsewhere."""

    def __init__(self, files: list[Path], labels: list[int], classes: list[str], base: Path, img_size: int,
                 in_chans: int, workers: int, description: str, root_entry: dict) -> None:
        self.files, self.labels, self.classes, self.base = files, labels, classes, Path(base).resolve()
        self.img_size, self.in_chans, self.workers = img_size, in_chans, workers
        self.description, self.root_entry = description, root_entry

    def __len__(self) -> int:
        return len(self.files)

    def source(self, position: int) -> tuple[str, str | None]:
        path = Path(os.path.normpath(os.path.abspath(self.files[position])))  # `..` folded, symlinks kept
        if not path.is_relative_to(self.base):
            return str(path), None
        relative = str(path.relative_to(self.base))
        return relative, relative

    def batches(self, todo: list[int], batch_size: int) -> Iterator[data.DecodedBatch]:
        files = [self.files[p] for p in todo]
        for b in data.iter_files(files, self.img_size, self.in_chans, self.workers, batch_size, desc="decoding"):
            errors = [(todo[i], e) for i, e in b.errors]
            yield data.DecodedBatch([todo[i] for i in b.positions], b.images, b.sizes, errors)


class FolderSource(FilesSource):
    """Every image file under a folder (class per sub-folder, or flat), whatever the split."""

    def __init__(self, root: Path, img_size: int, in_chans: int, workers: int = 2) -> None:
        root = Path(root)
        if not root.is_dir():
            raise IndexStoreError(f"image folder not found: {root}")
        root = root.resolve()
        files = data.list_images(root)
        if not files:
            raise IndexStoreError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
        classes = data.list_classes(root)
        super().__init__(files, data.folder_labels(files, root, classes), classes, root, img_size, in_chans,
                         workers, f"folder:{root} ({len(files)} files)", {"kind": "folder", "path": str(root)})
        self.root = root


def folder_source(root: Path, split: str, img_size: int, in_chans: int, workers: int = 2) -> FilesSource:
    """`folder:PATH`'s split as training reads it (`sources.folder_files`: the images in class sub-folders),
    streamed; paths relative to PATH."""
    root = Path(root).expanduser().resolve()
    files = sources.folder_files(root, split, img_size, in_chans)
    return FilesSource(files.files, files.labels, files.classes, root, img_size, in_chans, workers,
                       f"folder:{root}:{split} ({len(files)} files)",
                       {"kind": "folder", "path": str(root), "split": split})


def csv_source(manifest: Path, split: str, img_size: int, in_chans: int, workers: int = 2) -> FilesSource:
    """`csv:FILE`'s split as training reads it (`sources.csv_files`), in the manifest's row order, streamed;
    paths relative to the manifest's folder (a file outside it is recorded without a path)."""
    manifest = Path(manifest).expanduser().resolve()
    files = sources.csv_files(manifest, split, img_size, in_chans)
    return FilesSource(files.files, files.labels, files.classes, manifest.parent, img_size, in_chans, workers,
                       f"csv:{manifest}:{split} ({len(files)} files)",
                       {"kind": "csv", "path": str(manifest.parent), "manifest": str(manifest), "split": split})


class DatasetSource:
    """A split of a named dataset (digits, fashion-mnist, folder:PATH), already decoded in memory."""

    def __init__(self, name: str, split: str, img_size: int, in_chans: int, data_dir: Path | None = None,
                 images: data.ImageSet | None = None) -> None:
        """The split as `data.load` reads it, or `images` when given (e.g. some of its images, loaded already)."""
        self.set = data.load(name, split, img_size, in_chans, data_dir) if images is None else images
        self.classes = self.set.classes
        self.labels = self.set.labels.tolist()
        self.description = f"{name}:{split} ({len(self.set)} images)"
        self.root_entry = {"kind": "dataset", "name": name, "split": split,
                           "data_dir": str(Path(data_dir).resolve()) if data_dir else None}

    def __len__(self) -> int:
        return len(self.set)

    def source(self, position: int) -> tuple[str, str | None]:
        return self.set.sources[position], None

    def batches(self, todo: list[int], batch_size: int) -> Iterator[data.DecodedBatch]:
        for i in range(0, len(todo), batch_size):
            positions = todo[i:i + batch_size]
            images = self.set.images[positions]
            size = (int(images.shape[-1]), int(images.shape[-2]))
            yield data.DecodedBatch(positions, images, [size] * len(positions), [])


def _shard_samples(path: str) -> Iterator[tuple[str, dict[str, tuple[int, int]], bytes | None]]:
    """A shard's samples as webdataset groups them (consecutive members sharing a key, its metadata members
    skipped): (key, {suffix: (offset, size)}, the .cls content), from the tar headers and .cls members only."""
    from webdataset.tariterators import base_plus_ext

    key, members, cls = None, {}, None
    try:
        with tarfile.open(path, "r:*") as tar:
            while (info := tar.next()) is not None:
                tar.members = []  # keep memory flat over long shards
                if not info.isreg() or re.match(META_MEMBER, info.name):
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None:
                    continue
                if prefix != key:
                    if key is not None:
                        yield key, members, cls
                    key, members, cls = prefix, {}, None
                members.setdefault(suffix.lower(), (info.offset_data, info.size))
                if suffix.lower() == "cls":
                    cls = tar.extractfile(info).read(64)
    except (tarfile.TarError, OSError) as e:
        log.warning("skipped the rest of shard %s: %s", path, e)
    if key is not None:
        yield key, members, cls


class ShardImages(Dataset):
    """Images inside tar shards, each read by its (shard, offset, size) and decoded, as `data.ImageFiles` yields
    files: (position, image or None, original size, error). A process keeps its last shard open."""

    def __init__(self, shards: list[str], members: list[tuple[int, int, int, str]], img_size: int,
                 in_chans: int) -> None:
        self.shards, self.members, self.img_size, self.in_chans = shards, members, img_size, in_chans
        self._open: tuple[int, tarfile.TarFile] | None = None

    def __len__(self) -> int:
        return len(self.members)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": None}

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._open is None or self._open[0] != shard:
            self.close()
            self._open = shard, tarfile.open(self.shards[shard], "r:*")
        stream = self._open[1].fileobj  # the tar's bytes (decompressed when the shard is compressed)
        stream.seek(offset)
        content = stream.read(size)
        if len(content) != size:
            raise OSError("the shard ends before the image does")
        return content

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, tuple[int, int], str]:
        shard, offset, size, name = self.members[i]
        try:
            return i, *imageio.decode(self._read(shard, offset, size), self.img_size, self.in_chans), ""
        except (OSError, tarfile.TarError) as e:
            return i, None, (0, 0), f"cannot read {name}: {e}"
        except imageio.ImageError as e:
            return i, None, (0, 0), str(e).replace("uploaded image", name, 1)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


class ShardGallery:
    """One split of WebDataset shards (`wds:PATTERN`, see `matvit.shards`), its positions the samples that have
    an image, in shard order (the order training's unshuffled reader yields them).

    Opening the source lists every shard's members once (the tar headers and the small .cls files, no image
    bytes), so the count, labels and names are known before anything is embedded; each batch then reads just its
    own images by their offsets in the shards, decoded in worker processes, so every process of a torchrun group
    reads its share only. A sample without a (valid) .cls is indexed without a label. Images inside tars are no
    files the index can serve: an item records `SHARD#KEY` as its name and no path."""

    def __init__(self, pattern: str, split: str, img_size: int, in_chans: int, workers: int = 2) -> None:
        from matvit.shards import IMAGE_KEYS, ShardSource

        meta = ShardSource(pattern, split, img_size, in_chans)  # the shards, their classes and declared count
        self.shards, self.classes = meta.shards, meta.classes
        self.img_size, self.in_chans, self.workers = img_size, in_chans, workers
        folder = os.path.commonpath([str(Path(s).resolve().parent) for s in self.shards])
        names = [os.path.relpath(Path(s).resolve(), folder) for s in self.shards]
        self.members: list[tuple[int, int, int, str]] = []
        self.labels: list[int] = []
        imageless, unlabelled = 0, 0
        for shard, path in enumerate(self.shards):
            for key, members, cls in _shard_samples(path):
                image = next((members[k] for k in IMAGE_KEYS if k in members), None)
                if image is None:
                    imageless += 1
                    continue
                label = int(cls) if cls is not None and cls.strip().isdigit() else -1
                label = label if label < len(self.classes) else -1
                unlabelled += label < 0
                self.members.append((shard, *image, f"{names[shard]}#{key}"))
                self.labels.append(label)
        where = f"the {split} shards of wds:{pattern}"
        if not self.members:
            raise DatasetError(f"no images in {where}")
        if imageless:
            log.warning("left out %d sample(s) without an image (%s) in %s", imageless, ", ".join(IMAGE_KEYS), where)
        if unlabelled:
            log.warning("%d image(s) in %s have no valid .cls: indexed without a label", unlabelled, where)
        if len(self.members) != len(meta):
            log.warning("%s hold %d images; their dataset.json says %d", where, len(self.members), len(meta))
        self.description = f"wds:{pattern}:{split} ({len(self.members)} images in {len(self.shards)} shards)"
        self.root_entry = {"kind": "dataset", "name": f"wds:{pattern}", "split": split, "data_dir": None}

    def __len__(self) -> int:
        return len(self.members)

    def source(self, position: int) -> tuple[str, str | None]:
        return self.members[position][3], None

    def batches(self, todo: list[int], batch_size: int) -> Iterator[data.DecodedBatch]:
        images = ShardImages(self.shards, [self.members[p] for p in todo], self.img_size, self.in_chans)
        loader = DataLoader(images, batch_size=batch_size, num_workers=self.workers,
                            collate_fn=data.collate_readable)
        try:
            for b in loader:
                errors = [(todo[i], e) for i, e in b.errors]
                yield data.DecodedBatch([todo[i] for i in b.positions], b.images, b.sizes, errors)
        finally:
            images.close()


BUILT_IN = ("digits", "fashion-mnist")


def open_gallery(dataset: str, split: str, img_size: int, in_chans: int, data_dir: Path | None = None,
                 workers: int = 2) -> Source:
    """A dataset's split as a gallery, read as training reads it: `digits` and `fashion-mnist` decoded in
    memory, `folder:PATH`, `csv:FILE` and `wds:PATTERN` streamed."""
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; use train or test")
    if dataset in BUILT_IN:
        return DatasetSource(dataset, split, img_size, in_chans, data_dir)
    kind, _, where = dataset.partition(":")
    if kind == "folder" and where:
        return folder_source(Path(where), split, img_size, in_chans, workers)
    if kind == "csv" and where:
        return csv_source(Path(where), split, img_size, in_chans, workers)
    if kind == "wds" and where:
        return ShardGallery(where, split, img_size, in_chans, workers)
    raise DatasetError(f"unknown dataset {dataset!r}; choose one of: {', '.join(sources.DATASETS)}")


def embed_source(encoder: Encoder, source: Source, store: Store, job: dict, live: dict | None, spec,
                 batch_size: int, resume: bool) -> tuple[dict, list[dict], float] | None:
    """Embed every position no earlier chunk of this job holds (this process: every world-th batch of them), given
    the live version's manifest; returns the job's record, all chunks of all processes and the seconds spent, or
    None when resuming a job that has finished already (see `jobs.prepare`)."""
    rt = encoder.runtime
    prepared = jobs.prepare(store.files, job, resume, live) if rt.main else None
    record = rt.broadcast(None if prepared is None else prepared[0])
    if record is None:
        return None
    building, chunks = (prepared[1], prepared[2]) if rt.main else (store.files / jobs.BUILDING, [])
    rt.barrier()
    if not rt.main:
        chunks = jobs.load_chunks(building)
    done = {int(p) for c in chunks for key in ("positions", "bad") for p in c[key]}
    todo = [p for p in range(len(source)) if p not in done]
    mine = [p for i in range(rt.rank * batch_size, len(todo), rt.world * batch_size) for p in todo[i:i + batch_size]]
    number = jobs.next_chunk(building, rt.rank)
    pending: dict = {"positions": [], "embeddings": [], "sizes": [], "errors": []}
    start = time.perf_counter()
    bar = tqdm(total=len(mine), desc=f"embedding with {spec.text}", unit="img", disable=not rt.main or None)
    for batch in source.batches(mine, batch_size):
        for _, err in batch.errors:
            log.warning("skipped: %s", err)
        if batch.images is not None:
            pending["embeddings"].append(encoder.encode(batch.images, spec, batch_size))
        pending["positions"] += batch.positions
        pending["sizes"] += batch.sizes
        pending["errors"] += batch.errors
        bar.update(len(batch.positions) + len(batch.errors))
        if len(pending["positions"]) + len(pending["errors"]) >= CHUNK:
            jobs.save_chunk(building, rt.rank, number, **pending)
            number += 1
            pending = {k: [] for k in pending}
    bar.close()
    if pending["positions"] or pending["errors"]:
        jobs.save_chunk(building, rt.rank, number, **pending)
    rt.barrier()
    return record, jobs.load_chunks(building), time.perf_counter() - start


@contextmanager
def _writing(store: Store, wait: float, rt: Runtime, opening: bool = False) -> Iterator[Gallery | None]:
    """The index's writer lock, held by the main process for the whole group, and (with `opening`) the live
    index, opened by the main process (None elsewhere); when either fails, every process raises."""
    with ExitStack() as stack:
        refused, base = None, None
        if rt.main:
            try:
                stack.enter_context(store.writing(wait))
                base = store.open() if opening else None
            except IndexStoreError as e:
                refused = (isinstance(e, IndexBusy), str(e))
        if refused := rt.broadcast(refused):
            raise (IndexBusy if refused[0] else IndexStoreError)(refused[1])
        yield base


def _gather(chunks: list[dict], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    positions = np.concatenate([c["positions"] for c in chunks]) if chunks else np.zeros(0, np.int64)
    parts = [c["embeddings"] for c in chunks if len(c["positions"])]
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    sizes = np.concatenate([c["sizes"] for c in chunks]) if chunks else np.zeros((0, 2), np.int64)
    skipped = sum(len(c["bad"]) for c in chunks)
    order = np.argsort(positions, kind="stable")
    return positions[order], embeddings[order], sizes[order], skipped


def grow_manifest(manifest: dict, root: dict, class_names: list[str], next_id: int) -> tuple[dict, int, list[int]]:
    """`manifest` with `root` and the new class names added: (manifest, root index, class index of each name)."""
    roots, classes = list(manifest.get("roots", [])), list(manifest.get("classes") or [])
    if root not in roots:
        roots.append(root)
    for name in class_names:
        if name not in classes:
            classes.append(name)
    grown = {**manifest, "roots": roots, "classes": classes, "next_id": next_id}
    return grown, roots.index(root), [classes.index(n) for n in class_names]


def item_rows(ids, sources: list[tuple[str, str | None]], root: int, labels: list[int | None], sizes) -> list[tuple]:
    added = now()
    return [(int(i), name, path, root, label, int(w), int(h), added)
            for i, (name, path), label, (w, h) in zip(ids, sources, labels, sizes, strict=True)]


def _finish(store: Store, source: Source, embedded: tuple[dict, list[dict], float], manifest: dict,
            base: Gallery | None, index_key: str | None, recall_target: float, on_disk: bool = False,
            smallest: tuple[str, float] | None = None) -> dict:
    record, chunks, seconds = embedded
    positions, embeddings, sizes, skipped = _gather(chunks, manifest["dim"])
    covered = np.union1d(positions, np.concatenate([c["bad"] for c in chunks]) if chunks else [])
    if len(np.unique(positions)) != len(positions) or not np.array_equal(covered, np.arange(len(source))):
        raise IndexStoreError(f"the embedded chunks in {store.files / jobs.BUILDING} hold {len(covered)} of the "
                              f"{len(source)} images of {source.description}, or some twice; nothing was committed: "
                              "run it again without --resume")
    if len(positions) == 0:
        raise IndexStoreError(f"no readable images in {source.description}; nothing to index")
    why = None
    if smallest is not None:
        index_key, why = exact_or_hnsw(embeddings, on_disk, smallest)
        if why is not None:
            manifest = {**manifest, "auto": why}
    first_id = manifest.get("next_id", 0)
    ids = first_id + positions
    manifest, root, class_index = grow_manifest(manifest, source.root_entry, source.classes, first_id + len(source))
    labels = [class_index[source.labels[p]] if source.labels[p] >= 0 else None for p in positions]
    rows = item_rows(ids, [source.source(int(p)) for p in positions], root, labels, sizes)
    report = store.commit(base, ids, embeddings, rows, {**manifest, "job": record}, index_key, recall_target,
                          **({"on_disk": True} if on_disk else {}))
    crash_point("job.committed")
    if why is not None:
        report["auto"] = why
    jobs.clean(store.files)
    if skipped:
        log.warning("skipped %d unreadable image(s)", skipped)
    crash_point("job.done")
    return {"added": len(ids), "skipped": skipped, **report, "embed_seconds": round(seconds, 2),
            "images_per_s": round(len(ids) / seconds, 1) if seconds else None}


def _finished(store: Store, live: dict) -> dict:
    """The report of a resumed job that had finished already."""
    return {"added": 0, "skipped": 0, "already_finished": True, "version": store.current_version(),
            "count": live["count"]}


def build(encoder: Encoder, source: Source, index: str | Path | Store, submodel: str = "XL",
          index_key: str = "auto", batch_size: int = 256, resume: bool = False,
          recall_target: float = tuning.RECALL_TARGET, wait: float = 0.0, on_disk: bool = False) -> dict:
    """Embed a whole source with `submodel` into a new index at `index` (a directory, `milvus:URI` or a
    store), replacing what it held, after waiting up to `wait` seconds for another writer to finish. With
    `on_disk`, an IVF index keeps its inverted lists on disk (built per chunk, merged, memory-mapped)."""
    store, spec = open_store(index), encoder.spec(submodel)
    job = {"kind": "build", "fingerprint": encoder.fingerprint, "submodel": spec.text, "source": source.description}
    with _writing(store, wait, encoder.runtime):
        live = store.live_manifest() if encoder.runtime.main else None
        embedded = embed_source(encoder, source, store, job, live, spec, batch_size, resume)
        if not encoder.runtime.main:
            return {}
        if embedded is None:
            return _finished(store, live)
        manifest = {"fingerprint": encoder.fingerprint, "submodel": spec.text, "dim": encoder.dim,
                    "metric": "inner_product", "source": source.description, "roots": [], "classes": [],
                    "next_id": 0, "created_at": now()}
        smallest = smallest_encode_ms(encoder) if index_key == "auto" else None
        return _finish(store, source, embedded, manifest, None, index_key, recall_target, on_disk, smallest)


def smallest_encode_ms(encoder: Encoder) -> tuple[str, float]:
    """The smallest named submodel and its batch-1 encode time here, in milliseconds (eager)."""
    smallest = min(encoder.named(), key=encoder.gflops)
    image = backends.probe(encoder.model)[:1].to(encoder.runtime.device)
    return smallest.text, round(backends.median_latency_ms(backends.eager(encoder.embedder(smallest)), image), 4)


EXACT_SHARE = 0.5  # `auto` keeps exact search while it costs at most this share of the smallest encode


def exact_or_hnsw(embeddings: np.ndarray, on_disk: bool, smallest: tuple[str, float]) -> tuple[str, dict | None]:
    """`auto`'s kind for a new index of `embeddings`: by size (`index.auto_index_key`), except that when the
    exact search of one query would cost more than EXACT_SHARE of encoding it with the smallest submodel, HNSW32
    (tuned to the recall target), so that search never dominates a query (the share keeps the choice clear of
    timing noise). Returns the key and the measurement behind it."""
    key = auto_index_key(len(embeddings), embeddings.shape[1], on_disk)
    if key != "Flat":
        return "auto", None
    exact_ms = round(tuning.exact_search_ms(embeddings), 4)
    key = "HNSW32" if exact_ms > EXACT_SHARE * smallest[1] else "Flat"
    return key, {"exact_search_ms": exact_ms, "smallest": smallest[0], "smallest_encode_ms": smallest[1],
                 "chose": key}


def add(encoder: Encoder, source: Source, index: str | Path | Store, batch_size: int = 256, resume: bool = False,
        recall_target: float = tuning.RECALL_TARGET, wait: float = 0.0) -> dict:
    """Embed more images with the index's own submodel and add them under new ids."""
    store, rt = open_store(index), encoder.runtime
    with _writing(store, wait, rt, opening=True) as base:
        checked = None
        if rt.main:
            try:
                base.check_model(encoder.fingerprint)
                checked = (base.manifest["submodel"], base.version)
            except IndexStoreError as e:
                checked = str(e)
        checked = rt.broadcast(checked)
        if isinstance(checked, str):
            raise IndexStoreError(checked)
        submodel, version = checked
        job = {"kind": "add", "fingerprint": encoder.fingerprint, "base": version, "source": source.description}
        embedded = embed_source(encoder, source, store, job, base.manifest if rt.main else None,
                                encoder.spec(submodel), batch_size, resume)
        if not rt.main:
            return {}
        if embedded is None:
            return _finished(store, base.manifest)
        manifest = {**base.manifest, "source": f"{base.manifest.get('source', '')}; {source.description}"}
        return _finish(store, source, embedded, manifest, base, None, recall_target)


def add_images(encoder: Encoder, index: str | Path | Store, images: torch.Tensor, files: list[tuple[bytes, str]],
               sizes: list[tuple[int, int]], labels: list[str | None], names: list[str | None],
               wait: float = 0.0) -> list[int]:
    """Add decoded `images` (their file bytes and suffix kept in the store's `uploads/`); returns the new ids."""
    store = open_store(index)
    with store.writing(wait):
        base = store.open()
        base.check_model(encoder.fingerprint)
        embeddings = encoder.encode(images, base.manifest["submodel"])
        first_id = base.manifest["next_id"]
        ids = np.arange(first_id, first_id + len(images), dtype=np.int64)
        manifest, root, class_index = grow_manifest(base.manifest, {"kind": "uploads"},
                                                    [label for label in labels if label is not None],
                                                    first_id + len(images))
        index_of = dict(zip([label for label in labels if label is not None], class_index, strict=True))
        uploads = store.files / "uploads"
        settle_uploads(store, base)
        sources, fresh = [], not uploads.exists()
        try:  # files first, then the version that names them; a failure undoes both
            with disk_space():
                uploads.mkdir(exist_ok=True)
                for item_id, (content, suffix), name in zip(ids, files, names, strict=True):
                    path = f"{item_id}{suffix}"
                    sources.append((name or path, path))
                    (uploads / path).write_bytes(content)
                crash_point("uploads.written")
                rows = item_rows(ids, sources, root, [index_of.get(label) for label in labels], sizes)
                store.commit(base, ids, embeddings, rows, manifest)
        except BaseException:
            for _, path in sources:
                (uploads / path).unlink(missing_ok=True)
            if fresh and uploads.is_dir() and not any(uploads.iterdir()):
                uploads.rmdir()
            raise
    return ids.tolist()
