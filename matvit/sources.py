"""Training and evaluation data as sources of labelled uint8 images, read one rank's share at a time.

The built-in datasets (`digits`, `fashion-mnist`) sit in memory as an `ImageSet`: the fast path for small data.
Everything else streams from disk, decoded and resized in DataLoader workers, so memory stays flat as the
dataset grows: `folder:PATH` (a class per sub-folder), `csv:FILE` (a manifest of path and label) and
`wds:PATTERN` (WebDataset tar shards, see `shards`).

A source's `loader(...)` yields (uint8 N x C x H x W images, int64 labels) batches of one rank's share of one
epoch. Map-style sources share `DistributedSampler`'s split: with `drop_last`, the images of the k-th batches of
all ranks are exactly the k-th global batch of a one-process run with the same seed, whatever the world size.

An index reads its gallery from a `GallerySource`: a `Source` that can also be read by position (the gallery
readers are `retrieval.gallery`'s).
"""

from __future__ import annotations

import csv
import logging
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import data
from . import images as imageio
from .data import DatasetError

log = logging.getLogger(__name__)

DATASETS = ("digits", "fashion-mnist", "folder:PATH", "csv:FILE", "wds:PATTERN")
Batch = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class Source(Protocol):
    """Labelled images, read in batches of one rank's share of an epoch."""

    classes: list[str]

    def __len__(self) -> int: ...

    def loader(self, batch_size: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = False,
               drop_last: bool = False, rank: int = 0, world: int = 1, workers: int = 0) -> Iterable[Batch]: ...


@runtime_checkable
class GallerySource(Source, Protocol):
    """A `Source` that an index can also read by position: images at stable positions 0 .. len - 1 (the index's
    ids follow them, whatever the number of processes), decoded in batches of the positions asked."""

    labels: list[int]  # class index per position; -1: none
    description: str
    root_entry: dict  # recorded in the index manifest's roots

    def source(self, position: int) -> tuple[str, str | None]:
        """What the index records for an image: its name and its file relative to the root (None: no file)."""

    def batches(self, todo: list[int], batch_size: int) -> Iterator[data.DecodedBatch]:
        """`todo`'s images in order, unreadable ones as errors."""


def map_loader(dataset: Dataset, batch_size: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = False,
               drop_last: bool = False, rank: int = 0, world: int = 1, workers: int = 0,
               collate_fn=None) -> DataLoader:
    """A DataLoader over `rank`'s share of a map-style dataset, shuffled per (seed, epoch) when `shuffle`."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)


class InMemory:
    """A decoded `ImageSet` (built-in datasets, or a folder loaded whole)."""

    def __init__(self, images: data.ImageSet) -> None:
        keep = images.labels >= 0
        if not keep.all():
            images = data.ImageSet(images.images[keep], images.labels[keep], images.classes,
                                   [s for s, k in zip(images.sources, keep.tolist(), strict=True) if k], images.skipped)
        self.set, self.classes = images, images.classes

    @property
    def images(self) -> torch.Tensor:
        return self.set.images

    @property
    def labels(self) -> torch.Tensor:
        return self.set.labels

    def __len__(self) -> int:
        return len(self.set)

    def loader(self, batch_size: int, workers: int = 0, **split) -> DataLoader:
        return map_loader(self.set, batch_size, **split)  # decoded already: workers would only copy


class LabelledFiles(Dataset):
    """Image files with known labels, decoded one by one in DataLoader workers; unreadable files are dropped
    from their batch with a warning."""

    def __init__(self, files: list[Path], labels: list[int], classes: list[str], img_size: int,
                 in_chans: int) -> None:
        self.files, self.labels, self.classes = files, labels, classes
        self.img_size, self.in_chans = img_size, in_chans

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        try:
            return imageio.decode(self.files[i], self.img_size, self.in_chans)[0], self.labels[i]
        except imageio.ImageError as e:
            log.warning("skipped: %s", e)
            return None

    def loader(self, batch_size: int, **split) -> DataLoader:
        return map_loader(self, batch_size, collate_fn=collate_readable, **split)


def collate_readable(batch: list) -> Batch:
    ok = [item for item in batch if item is not None]
    if not ok:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return torch.stack([img for img, _ in ok]), torch.as_tensor([label for _, label in ok], dtype=torch.int64)


def folder_files(root: Path, split: str, img_size: int, in_chans: int) -> LabelledFiles:
    """The labelled images of a class-per-sub-folder tree (see `data.folder_split`), decoded when read."""
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    files, base, classes = data.folder_split(root, split)
    labels = data.folder_labels(files, base, classes)
    kept = [(f, label) for f, label in zip(files, labels, strict=True) if label >= 0]
    if not kept:
        raise DatasetError(f"no labelled images for split {split!r} in {root}: put each class's images in a "
                           "sub-folder of its own")
    return LabelledFiles([f for f, _ in kept], [label for _, label in kept], classes, img_size, in_chans)


def csv_files(manifest: Path, split: str, img_size: int, in_chans: int) -> LabelledFiles:
    """A CSV manifest with a header row and columns `path` and `label` (a class name), and optionally `split`
    (train or test; without it, a stable 90/10 split by a hash of the path). Relative paths are relative to
    the manifest's folder; the classes are the sorted distinct labels."""
    if not manifest.is_file():
        raise DatasetError(f"CSV manifest not found: {manifest}")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DatasetError(f"{manifest} needs a header row with the columns path and label (optionally split)")
    classes = sorted({row["label"] for row in rows})

    def in_split(row: dict) -> bool:
        if row.get("split"):
            return row["split"] == split
        return (zlib.crc32(row["path"].encode()) % 10 == 0) == (split == "test")

    rows = [row for row in rows if in_split(row)]
    if not rows:
        raise DatasetError(f"no rows for split {split!r} in {manifest}")
    index = {c: i for i, c in enumerate(classes)}
    files = [manifest.parent / row["path"] for row in rows]
    return LabelledFiles(files, [index[row["label"]] for row in rows], classes, img_size, in_chans)


def open_source(name: str, split: str, img_size: int, in_chans: int, data_dir: Path | None = None,
                in_memory: bool = False) -> Source:
    """The labelled images of a dataset's split: `digits` and `fashion-mnist` in memory, `folder:PATH`,
    `csv:FILE` and `wds:PATTERN` streamed (`folder:PATH` decoded whole into memory when `in_memory`)."""
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; use train or test")
    if name in ("digits", "fashion-mnist") or (in_memory and name.startswith("folder:")):
        return InMemory(data.load(name, split, img_size, in_chans, data_dir))
    kind, _, where = name.partition(":")
    if kind == "folder" and where:
        return folder_files(Path(where).expanduser(), split, img_size, in_chans)
    if kind == "csv" and where:
        return csv_files(Path(where).expanduser(), split, img_size, in_chans)
    if kind == "wds" and where:
        from .shards import ShardSource

        return ShardSource(where, split, img_size, in_chans)
    raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
