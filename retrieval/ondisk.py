"""IVF indexes larger than memory: FAISS's on-disk inverted lists, searched memory-mapped.

The recipe of FAISS's own `demo_ondisk_ivf.py`, in four steps that each hold at most one chunk of vectors
in memory:

1. `train`: train the IVF quantizer (and PQ / SQ codebooks) on a sample that fits in memory; the empty
   trained index is saved as `trained.index` (and blocks of an earlier training are dropped);
2. `add`: add a chunk of vectors, with their ids, to a copy of the trained index and save it as
   `blocks/block-NNNNNN.index` (each chunk written aside, then renamed: an interrupted build keeps the
   chunks it finished, and `added` says which);
3. `merge`: reads every block with `faiss.IO_FLAG_MMAP` (the blocks stay on disk) and writes the merged
   inverted lists into one file, `index.ivfdata`, with FAISS's `OnDiskInvertedLists.merge_from_multiple`
   (what `faiss.contrib.ondisk.merge_ondisk` does, here with the lists of an earlier merged index first
   when growing one); then `index.faiss` is written: the quantizer and the lists' offsets only;
4. `open`: read `index.faiss`; its `OnDiskInvertedLists` memory-map `index.ivfdata` themselves
   (read-only, found beside `index.faiss` with `IO_FLAG_ONDISK_SAME_DIR`, so the directory may
   move): the operating system pages in the lists a search probes, and memory holds the quantizer and
   whatever the page cache keeps. (Reading `index.faiss` itself with `IO_FLAG_MMAP` is for array
   lists; with on-disk lists FAISS 1.15 then crashes at search.)

Searching is the FAISS index's own `search` (`nprobe` through `faiss.SearchParametersIVF`). The index
is IVF only (`IVF...,Flat`, `IVF...,PQ...`, `IVF...,SQ8`, optionally after a transform such as
`OPQ16,`); the vectors' ids are the IVF's own (no IDMap2 wrapper). Metric: inner product.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from . import gpu
from .store_errors import IndexStoreError

TRAINED, MERGED, LISTS = "trained.index", "index.faiss", "index.ivfdata"


class OnDiskError(IndexStoreError):
    """A key that is not an IVF index, or an on-disk index in the wrong state for the operation."""


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """FAISS prints its on-disk lists' progress (resizing, renamed files) with C's printf: send it to stderr, so
    that stdout stays the caller's (a command's JSON report)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _write(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


@dataclass
class OnDiskIVF:
    """An on-disk IVF index being built, or built, in `directory`."""

    directory: Path

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)

    @property
    def blocks(self) -> list[Path]:
        return sorted((self.directory / "blocks").glob("block-*.index"))

    def train(self, key: str, dim: int, sample: np.ndarray) -> None:
        """Train an empty IVF index of factory string `key` on `sample` and save it."""
        try:
            index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
            faiss.extract_index_ivf(index)
        except RuntimeError as e:
            raise OnDiskError(f"index key {key!r} is not an IVF index (on-disk lists need one, e.g. "
                              "IVF4096,PQ32)") from e
        if isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFPQR):
            raise OnDiskError(f"index key {key!r}: FAISS cannot keep IVFPQR (re-ranked PQ) lists on disk")
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if len(sample) < faiss.extract_index_ivf(index).nlist:
            raise OnDiskError(f"{len(sample):,} training vectors for {faiss.extract_index_ivf(index).nlist:,} "
                              "lists: train on at least one vector per list")
        gpu.train_on_gpus(index)
        index.train(sample)
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in [*self.blocks, self.directory / MERGED, self.directory / LISTS]:  # made with another training
            path.unlink(missing_ok=True)
        _write(index, self.directory / TRAINED)

    def trained(self) -> faiss.Index:
        path = self.directory / TRAINED
        if not path.is_file():
            raise OnDiskError(f"no trained index in {self.directory}: train it first")
        return faiss.read_index(str(path))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> Path:
        """Add one chunk into its own block of inverted lists, saved as the next block file."""
        ids, vectors = np.asarray(ids, dtype=np.int64), np.ascontiguousarray(vectors, dtype=np.float32)
        if len(ids) != len(vectors):
            raise OnDiskError(f"{len(ids):,} ids for {len(vectors):,} vectors")
        index = self.trained()
        index.add_with_ids(vectors, ids)
        (self.directory / "blocks").mkdir(exist_ok=True)
        path = self.directory / "blocks" / f"block-{len(self.blocks):06d}.index"
        _write(index, path)
        return path

    def added(self) -> int:
        """Vectors in the finished blocks."""
        return sum(faiss.read_index(str(p), faiss.IO_FLAG_MMAP).ntotal for p in self.blocks)

    def merge(self, before: Path | None = None) -> Path:
        """Merge the lists of the merged index `before` (when given) and of every block into `index.ivfdata`
        and write `index.faiss`; returns its path."""
        blocks = self.blocks
        if not blocks and before is None:
            raise OnDiskError(f"no blocks in {self.directory}: add vectors before merging")
        parts = [open_merged(before)] if before is not None else []
        parts += [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in blocks]
        index = self.trained()
        ivf = faiss.extract_index_ivf(index)
        for path in (self.directory / LISTS, self.directory / MERGED):
            path.unlink(missing_ok=True)
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(self.directory / LISTS))
        pointers = faiss.InvertedListsPtrVector()
        for part in parts:
            pointers.push_back(faiss.extract_index_ivf(part).invlists)
        with _stdout_to_stderr():
            index.ntotal = ivf.ntotal = lists.merge_from_multiple(pointers.data(), pointers.size(), False)
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # the index owns its lists now
        _write(index, self.directory / MERGED)
        return self.directory / MERGED

    def open(self) -> faiss.Index:
        """The merged index, its inverted lists memory-mapped from `index.ivfdata`."""
        return open_merged(self.directory / MERGED)


def open_merged(path: Path) -> faiss.Index:
    """A merged index file, its inverted lists memory-mapped from the `index.ivfdata` beside it."""
    if not Path(path).is_file():
        raise OnDiskError(f"no merged index in {Path(path).parent}: merge its blocks first")
    with _stdout_to_stderr():
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


def build(directory: Path, key: str, sample: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]]
          ) -> faiss.Index:
    """Train on `sample`, add each (ids, vectors) chunk, merge, and open memory-mapped."""
    ondisk = OnDiskIVF(directory)
    ondisk.train(key, np.asarray(sample).shape[1], sample)
    for ids, vectors in chunks:
        ondisk.add(ids, vectors)
    ondisk.merge()
    return ondisk.open()


def extend(directory: Path, base: Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> faiss.Index:
    """A new on-disk index in `directory`: the merged index in `base` (its training reused) plus the chunks."""
    ondisk = OnDiskIVF(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(base) / TRAINED, directory / TRAINED)
    for ids, vectors in chunks:
        ondisk.add(ids, vectors)
    ondisk.merge(before=Path(base) / MERGED)
    return ondisk.open()


def link(directory: Path, base: Path) -> faiss.Index:
    """The merged index in `base`, unchanged, as a new on-disk index in `directory` (hard links where the
    filesystem has them: both are read-only)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in (TRAINED, MERGED, LISTS):
        try:
            os.link(Path(base) / name, directory / name)
        except OSError:
            shutil.copyfile(Path(base) / name, directory / name)
    return open_merged(directory / MERGED)
