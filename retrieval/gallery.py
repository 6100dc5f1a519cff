"""Gallery readers: what an index is built from, each a `matvit.sources.GallerySource` (a training `Source` that
can also be read by position).

A gallery is every image file under a folder (`FolderSource`, `--images`), or a split of any dataset training
reads (`open_gallery`): `digits` and `fashion-mnist` in memory, `folder:PATH` and `csv:FILE` as streamed
files, `wds:PATTERN` as images read from inside their tar shards (by their offsets, see `ShardGallery`).
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from matvit import data, sources
from matvit import images as imageio
from matvit.data import DatasetError
from matvit.images import IMAGE_SUFFIXES
from matvit.shards import IMAGE_KEYS, ShardSource
from matvit.sources import GallerySource

from .store_errors import IndexStoreError

log = logging.getLogger(__name__)
META_MEMBER = r"__[^/]*__($|/)"  # tar members webdataset skips as metadata


class FilesSource(sources.LabelledFiles):
    """Image files with labels (-1: none), decoded in worker processes; items record their paths relative to
    `base` (the index serves files under it), or no path for a file elsewhere."""

    def __init__(self, files: list[Path], labels: list[int], classes: list[str], base: Path, img_size: int,
                 in_chans: int, workers: int, description: str, root_entry: dict) -> None:
        super().__init__(files, labels, classes, img_size, in_chans)
        self.base, self.workers = Path(base).resolve(), workers
        self.description, self.root_entry = description, root_entry

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

    def loader(self, batch_size: int, workers: int = 0, **split) -> DataLoader:
        return sources.map_loader(self.set, batch_size, **split)  # decoded already: workers would only copy

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
        meta = self.stream = ShardSource(pattern, split, img_size, in_chans)  # the shards, classes, declared count
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

    def loader(self, batch_size: int, **split) -> DataLoader:
        """The samples streamed as training reads them (`ShardSource.loader`)."""
        return self.stream.loader(batch_size, **split)

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
                 workers: int = 2) -> GallerySource:
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
