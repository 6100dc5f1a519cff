"""Datasets: scikit-learn's digits, Fashion-MNIST IDX files, and folders of images (`folder:PATH`).

Every dataset comes out as an in-memory `ImageSet` of uint8 C x H x W images at the model's size.
"""

from __future__ import annotations

import functools
import gzip
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import images as imageio
from .errors import UserError

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
DATASETS = ("digits", "fashion-mnist", "folder:PATH")


class DatasetError(UserError):
    """A dataset that cannot be found or read."""


@dataclass
class ImageSet(Dataset):
    """Decoded images (uint8 N x C x H x W), labels, class names, and where each image came from."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    sources: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _resize(images: np.ndarray, img_size: int, in_chans: int) -> torch.Tensor:
    """Grey uint8 N x H x W arrays to N x C x img_size x img_size (no-op at the native size)."""
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8).copy()).unsqueeze(1)
    if t.shape[-1] != img_size:
        t = torch.nn.functional.interpolate(t.float(), size=img_size, mode="bilinear", antialias=True)
        t = t.round().clamp(0, 255).to(torch.uint8)
    return t.expand(-1, in_chans, -1, -1).contiguous()


def load_digits(split: str, img_size: int = 8, in_chans: int = 1) -> ImageSet:
    """scikit-learn's 1,797 8x8 digits, a fixed seeded 80/20 train/test split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    cut = int(0.8 * len(order))
    idx = order[:cut] if split == "train" else order[cut:]
    pixels = (d.images[idx] * (255 / 16)).round().astype(np.uint8)
    return ImageSet(_resize(pixels, img_size, in_chans), torch.as_tensor(d.target[idx]),
                    [str(c) for c in range(10)], [f"digits:{i}" for i in idx])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, data_dir: Path | None, img_size: int = 28, in_chans: int = 1) -> ImageSet:
    """Fashion-MNIST from its IDX files (gzipped or not)."""
    root = Path(data_dir or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    found = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}{ext}" for ext in (".gz", "")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DatasetError(
                f"Fashion-MNIST not found in {root} (no {candidates[0].name}); install the Debian package "
                "dataset-fashion-mnist or pass --data-dir"
            )
        found[kind] = _read_idx(path)
    images, labels = found["images-idx3-ubyte"], found["labels-idx1-ubyte"]
    return ImageSet(_resize(images, img_size, in_chans), torch.as_tensor(labels.astype(np.int64)),
                    list(FASHION_MNIST_CLASSES), [f"fashion-mnist:{split}:{i}" for i in range(len(labels))])


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in a stable order."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in imageio.IMAGE_SUFFIXES and p.is_file())


def list_classes(root: Path) -> list[str]:
    """Class names of a class-per-sub-folder tree: its sub-folders, sorted."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())


def folder_split(root: Path, split: str) -> tuple[list[Path], Path, list[str]]:
    """Files of `split`, the folder their class sub-folders are in, and the class names.

    When `root/train` or `root/test` exists, those are the splits (a missing one is empty) and the classes are
    the sub-folders of either; else a stable 90/10 split of the whole tree by a hash of each relative path.
    """
    splits = [root / s for s in ("train", "test") if (root / s).is_dir()]
    if splits:
        base = root / split
        files = list_images(base) if base.is_dir() else []
        classes = sorted({c for folder in splits for c in list_classes(folder)})
    else:
        base = root
        everything = list_images(root)
        in_test = [zlib.crc32(str(p.relative_to(root)).encode()) % 10 == 0 for p in everything]
        files = [p for p, t in zip(everything, in_test, strict=True) if t == (split == "test")]
        classes = list_classes(root)
    return files, base, classes


def folder_labels(files: list[Path], base: Path, classes: list[str]) -> list[int]:
    """Class index of each file from its first sub-folder under `base`; -1 for files directly in it."""
    class_index = {c: i for i, c in enumerate(classes)}
    parts = [f.relative_to(base).parts for f in files]
    return [class_index.get(p[0], -1) if len(p) > 1 else -1 for p in parts]


class ImageFiles(Dataset):
    """Image files decoded one by one (in DataLoader workers): (position, image or None, size, error)."""

    def __init__(self, files: list[Path], img_size: int, in_chans: int) -> None:
        self.files, self.img_size, self.in_chans = files, img_size, in_chans

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, tuple[int, int], str]:
        try:
            return i, *imageio.decode(self.files[i], self.img_size, self.in_chans), ""
        except imageio.ImageError as e:
            return i, None, (0, 0), str(e)


@dataclass
class DecodedBatch:
    """The readable images of a batch with their positions and original sizes, and the unreadable ones."""

    positions: list[int]
    images: torch.Tensor | None
    sizes: list[tuple[int, int]]
    errors: list[tuple[int, str]]


def collate_readable(batch: list) -> DecodedBatch:
    ok = [(i, img, size) for i, img, size, _ in batch if img is not None]
    return DecodedBatch([i for i, _, _ in ok], torch.stack([img for _, img, _ in ok]) if ok else None,
                        [size for _, _, size in ok], [(i, err) for i, img, _, err in batch if img is None])


def iter_files(files: list[Path], img_size: int, in_chans: int, workers: int = 2, batch_size: int = 256,
               desc: str = "decoding"):
    """Decode files in DataLoader worker processes, yielding `DecodedBatch`es with a progress bar."""
    loader = DataLoader(ImageFiles(files, img_size, in_chans), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_readable)
    yield from tqdm(loader, desc=desc, unit="batch", leave=False)


def decode_files(files: list[Path], img_size: int, in_chans: int, workers: int = 2,
                 desc: str = "decoding") -> tuple[list[int], torch.Tensor, list[tuple[int, str]]]:
    """Decode many files: (readable positions, their images, [(position, error)])."""
    kept, chunks, bad = [], [], []
    for batch in iter_files(files, img_size, in_chans, workers, desc=desc):
        kept += batch.positions
        bad += batch.errors
        if batch.images is not None:
            chunks.append(batch.images)
    empty = torch.empty(0, in_chans, img_size, img_size, dtype=torch.uint8)
    return kept, torch.cat(chunks) if chunks else empty, bad


def load_folder(root: Path, split: str, img_size: int, in_chans: int, workers: int = 2) -> ImageSet:
    """A class-per-sub-folder tree of images of any size and mode; unreadable files are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    files, base, classes = folder_split(root, split)
    if not base.is_dir():
        raise DatasetError(f"no {split}/ folder in {root}: a tree split into train/ and test/ needs both")
    if not files:
        raise DatasetError(f"no images ({', '.join(sorted(imageio.IMAGE_SUFFIXES))}) for split {split!r} in {root}")
    kept, images, bad = decode_files(files, img_size, in_chans, workers, desc=f"decoding {split}")
    for _, err in bad:
        log.warning("skipped: %s", err)
    if bad:
        log.warning("skipped %d unreadable image(s) of %d in %s", len(bad), len(files), root)
    labels = folder_labels([files[i] for i in kept], base, classes)
    return ImageSet(images, torch.as_tensor(labels, dtype=torch.int64), classes,
                    [str(files[i]) for i in kept], skipped=len(bad))


@functools.lru_cache(maxsize=4)
def _native(name: str, split: str, data_dir: str | None = None) -> ImageSet:
    if name == "digits":
        return load_digits(split)
    return load_fashion_mnist(split, data_dir and Path(data_dir))


def source_image(source: str, data_dir: str | None = None) -> torch.Tensor | None:
    """The native-size uint8 C x H x W image of a dataset source as the loaders above record it
    (`digits:17`, `fashion-mnist:train:5`, read from `data_dir` when given); None for anything else."""
    parts = source.split(":")
    if parts[0] == "digits" and len(parts) == 2:
        for split in ("train", "test"):
            ds = _native("digits", split)
            if source in ds.sources:
                return ds.images[ds.sources.index(source)]
    if parts[0] == "fashion-mnist" and len(parts) == 3 and parts[1] in ("train", "test") and parts[2].isdigit():
        ds = _native("fashion-mnist", parts[1], data_dir)
        return ds.images[int(parts[2])] if int(parts[2]) < len(ds) else None
    return None


def load(name: str, split: str, img_size: int, in_chans: int, data_dir: Path | None = None) -> ImageSet:
    """A dataset by name: `digits`, `fashion-mnist` or `folder:PATH`; split `train` or `test`."""
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; use train or test")
    if name == "digits":
        return load_digits(split, img_size, in_chans)
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir, img_size, in_chans)
    if name.startswith("folder:"):
        return load_folder(Path(name.removeprefix("folder:")).expanduser(), split, img_size, in_chans)
    raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
