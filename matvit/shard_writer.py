"""Writing any dataset as WebDataset tar shards (the layout `shards` reads: img2dataset's, with `dataset.json`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from . import data, sources
from . import images as imageio
from .data import DatasetError
from .shards import META_FILE, SPLITS

log = logging.getLogger(__name__)


def _dataset_items(name: str, split: str, data_dir: Path | None) -> tuple[list[str], int, Callable]:
    """Class names, sample count and a function from a sample's position to its (image file suffix, file bytes,
    label), None when the file cannot be read; nothing is read before it is asked for."""
    if name in ("digits", "fashion-mnist"):
        ds = data.load_digits(split) if name == "digits" else data.load_fashion_mnist(split, data_dir)
        return ds.classes, len(ds), lambda i: ("png", imageio.to_png(ds.images[i]), int(ds.labels[i]))
    if name.partition(":")[0] not in ("folder", "csv"):
        raise DatasetError(f"cannot write shards of {name!r}; use digits, fashion-mnist, folder:PATH or csv:FILE")
    files = sources.open_source(name, split, 8, 1, data_dir)  # a LabelledFiles: paths and labels, nothing decoded

    def item(i: int) -> tuple[str, bytes, int] | None:
        path = files.files[i]
        try:
            return path.suffix.lower().removeprefix("."), path.read_bytes(), files.labels[i]
        except OSError as e:
            log.warning("skipped %s: %s", path, e)
            return None

    return files.classes, len(files), item


def write_shards(dataset: str, out: Path, *, max_count: int = 10_000, data_dir: Path | None = None, seed: int = 0,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Write a dataset (`digits`, `fashion-mnist`, `folder:PATH` or `csv:FILE`) as `out/train-000000.tar` ...,
    `out/test-000000.tar` ... and `out/dataset.json` (written last); returns dataset.json's content.

    Built-in images are encoded as PNG; folder and CSV image files are copied as they are (an unreadable one is
    skipped when read). Training samples are written in a seeded random order, so that every shard mixes the
    classes as the reader's shuffle buffer needs; test samples keep the dataset's order."""
    if max_count < 1:
        raise DatasetError("--max-count must be at least 1")
    out = Path(out)
    old = [*out.glob("train-*.tar"), *out.glob("test-*.tar"), *out.glob(META_FILE)] if out.is_dir() else []
    if old and not overwrite:
        raise DatasetError(f"{out} already holds shards; pass --overwrite to replace them")
    for path in old:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    meta: dict = {"dataset": dataset, "classes": None, "counts": {}, "shards": {}}
    for split in SPLITS:
        classes, total, item = _dataset_items(dataset, split, data_dir)
        if meta["classes"] not in (None, classes):
            raise DatasetError(f"{dataset}: the train and test splits name different classes")
        meta["classes"] = classes
        order = np.random.default_rng(seed).permutation(total).tolist() if split == "train" else range(total)
        written = 0
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=max_count, verbose=0, mtime=0) as sink:
            for i in tqdm(order, desc=f"writing {split}", unit="image", disable=not progress or None):
                if (sample := item(i)) is not None:
                    suffix, content, label = sample
                    sink.write({"__key__": f"{written:08d}", suffix: content, "cls": label})
                    written += 1
            meta["shards"][split] = sink.shard
        meta["counts"][split] = written
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / META_FILE)
    return meta
