"""WebDataset tar shards, read back as a streamed `Source` (written from any dataset by `shard_writer`).

The layout is img2dataset's: per sample `KEY.jpg` (or `.jpeg`, `.png`, `.webp`: any image file, its bytes as
they are) and `KEY.cls` (the class index as text); other members (`.json`, `.txt`) are ignored. Beside the
shards (or one folder up), `dataset.json` names the classes and counts each split's samples:

    {"classes": ["airplane", "automobile", ...], "counts": {"train": 50000, "test": 10000}}

`classes` may be a number (names "0", "1", ...); without `counts`, img2dataset's `*_stats.json` files beside
the shards give each split's count (their `successes`).

`wds:PATTERN` names the shards of both splits: a directory written by `shard_writer.write_shards` (`train-*.tar`,
`test-*.tar`, `dataset.json`), or a pattern with `{split}` where `train` or `test` goes, with braces and
wildcards (`/data/{split}/{00000..00099}.tar`, `/data/{split}-*.tar`); names that match no file are left out.

Training streams never end and never need to: every DataLoader worker of every rank (a reader) reads its own
shards, one round after another (a round is an epoch- and seed-shuffled shard order dealt out to the readers:
each shard once when there are at least as many shards as readers, else one shard a reader), each round through
a shuffle buffer of samples, and stops after its share of the epoch's steps (webdataset's `with_epoch`). Every
rank so yields exactly len(source) // (batch size x world) full batches however unevenly the shards split, and
DDP ranks stay in lockstep. Evaluation reads every shard once, in order, without shuffling.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from . import images as imageio
from .data import DatasetError

log = logging.getLogger(__name__)

META_FILE = "dataset.json"
IMAGE_KEYS = tuple(sorted(s.removeprefix(".") for s in imageio.IMAGE_SUFFIXES))
SHUFFLE_BUFFER = 1000  # encoded samples per reader: a few MB for small images, bounded whatever the dataset size
SPLITS = ("train", "test")


def expand(pattern: str) -> list[str]:
    """Existing local files named by a brace pattern with optional wildcards, in the pattern's order."""
    found: dict[str, None] = {}
    for name in expand_urls(str(Path(pattern).expanduser())):
        matches = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
        found.update((m, None) for m in matches if Path(m).is_file())
    return list(found)


def split_shards(pattern: str, split: str) -> list[str]:
    """The shard files of `split` in `wds:PATTERN` (see the module docstring)."""
    folder = Path(pattern).expanduser()
    if folder.is_dir():
        shards = sorted(str(p) for p in folder.glob(f"{split}-*.tar"))
        if not shards:
            raise DatasetError(f"no {split}-*.tar shards in {folder}: write them with scripts/make_shards.py, "
                               "or give a pattern with {split} in it")
        return shards
    if "{split}" not in pattern:
        raise DatasetError(f"wds:{pattern} names no split: put {{split}} where train or test goes "
                           "(e.g. /data/{split}-{000000..000099}.tar), or give a directory of train-*.tar and "
                           "test-*.tar shards")
    shards = expand(pattern.replace("{split}", split))
    if not shards:
        raise DatasetError(f"no shard matches {pattern.replace('{split}', split)}")
    return shards


def read_meta(shards: list[str], split: str) -> tuple[list[str], int]:
    """Class names and the split's sample count, from `dataset.json` beside the shards (or one folder up),
    the count falling back to img2dataset's per-shard `*_stats.json`."""
    folder = Path(shards[0]).parent
    path = next((p for p in (folder / META_FILE, folder.parent / META_FILE) if p.is_file()), None)
    meta: dict = {}
    if path is not None:
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{path} is not valid JSON: {e}") from e
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if isinstance(classes, int) and not isinstance(classes, bool) and classes > 0:
        classes = [str(i) for i in range(classes)]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DatasetError(f"no class names for the shards in {folder}: add {folder / META_FILE} with "
                           '{"classes": ["name", ...], "counts": {"train": N, "test": M}}')
    count = meta.get("counts", {}).get(split) if isinstance(meta.get("counts"), dict) else None
    if count is None:
        count = stats_count(shards)
    if not isinstance(count, int) or count < 0:
        raise DatasetError(f"no sample count for the {split} shards in {folder}: add "
                           f'"counts": {{"{split}": N}} to {path or folder / META_FILE}')
    return list(classes), count


def stats_count(shards: list[str]) -> int | None:
    """The samples img2dataset wrote into these shards (its `NAME_stats.json` beside each `NAME.tar`), or None
    unless every shard has one."""
    total = 0
    for shard in shards:
        stats = Path(shard).with_name(Path(shard).name.removesuffix(".tar") + "_stats.json")
        try:
            total += int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


def _skip_shard(exn: Exception) -> bool:
    log.warning("skipped part of a shard: %s", exn)
    return True


class ShardStream(IterableDataset):
    """The batches one rank reads in one epoch, built inside each DataLoader worker (see the module docstring).
    `steps` is the rank's batch count when training (the stream is endless and cut there); None reads every
    shard of the rank's workers once."""

    def __init__(self, source: ShardSource, batch_size: int, *, epoch: int, seed: int, shuffle: bool,
                 drop_last: bool, rank: int, world: int, steps: int | None) -> None:
        super().__init__()
        self.source, self.batch_size, self.epoch, self.seed = source, batch_size, epoch, seed
        self.shuffle, self.drop_last, self.rank, self.world, self.steps = shuffle, drop_last, rank, world, steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.rank * workers + worker, self.world * workers
        pipeline = wds.DataPipeline(functools.partial(self.samples, reader, readers), wds.map(self.source.decode),
                                    wds.batched(self.batch_size, collation_fn=collate, partial=not self.drop_last))
        if self.steps is None:
            return iter(pipeline)
        share = self.steps // workers + (worker < self.steps % workers)  # this worker's batches of the epoch
        return iter(pipeline.with_epoch(nbatches=share)) if share else iter(())

    def samples(self, reader: int, readers: int) -> Iterator[dict]:
        """Raw samples of this reader's shards: once, in order (evaluation), or round after round (training),
        each round through a shuffle buffer that empties before the next round starts, so that a reader repeats
        no sample before it has read all of its round's shards."""
        shards = self.source.shards
        if self.steps is None:
            yield from wds.tarfile_samples([{"url": u} for u in shards[reader::readers]], handler=_skip_shard)
            return
        n, empty_rounds, round_ = len(shards), 0, 0
        rng = random.Random(f"samples:{self.seed}:{self.epoch}:{reader}")
        while True:
            order = list(range(n))
            random.Random(f"shards:{self.seed}:{self.epoch}:{round_}").shuffle(order)
            mine = [shards[order[j % n]] for j in range(reader, max(n, readers), readers)]
            read = 0
            raw = wds.tarfile_samples([{"url": u} for u in mine], handler=_skip_shard)
            for sample in wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=rng)(raw):
                read += 1
                yield sample
            empty_rounds = 0 if read else empty_rounds + 1
            if empty_rounds > n:
                raise DatasetError(f"no samples in the {self.source.split} shards of wds:{self.source.pattern}")
            round_ += 1


def collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([img for img, _ in batch]), torch.as_tensor([label for _, label in batch], dtype=torch.int64)


class ShardSource:
    """One split of a sharded dataset, decoded and resized in DataLoader workers; unreadable samples are
    skipped with a warning."""

    def __init__(self, pattern: str, split: str, img_size: int, in_chans: int) -> None:
        self.pattern, self.split, self.img_size, self.in_chans = pattern, split, img_size, in_chans
        self.shards = split_shards(pattern, split)
        self.classes, self.count = read_meta(self.shards, split)

    def __len__(self) -> int:
        return self.count

    def decode(self, sample: dict) -> tuple[torch.Tensor, int] | None:
        """A raw sample's (image, label), or None (with a warning) when it has no readable image or label."""
        where = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image is None or "cls" not in sample:
            log.warning("skipped %s: it needs an image (%s) and a .cls", where, ", ".join(IMAGE_KEYS))
            return None
        try:
            label = int(sample["cls"])
        except ValueError:
            log.warning("skipped %s: its .cls is not an integer", where)
            return None
        if not 0 <= label < len(self.classes):
            log.warning("skipped %s: class %d is not one of the %d classes", where, label, len(self.classes))
            return None
        try:
            return imageio.decode(image, self.img_size, self.in_chans)[0], label
        except imageio.ImageError as e:
            log.warning("skipped %s: %s", where, e)
            return None

    def loader(self, batch_size: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = False,
               drop_last: bool = False, rank: int = 0, world: int = 1, workers: int = 0) -> DataLoader:
        """`rank`'s batches of one epoch: with `shuffle`, exactly len // (batch_size x world) of them (rounded up
        without `drop_last`), all full; without, every sample of the rank's shards once, in shard order."""
        steps = None
        if shuffle:
            total = batch_size * world
            steps = len(self) // total if drop_last else -(-len(self) // total)
        stream = ShardStream(self, batch_size, epoch=epoch, seed=seed, shuffle=shuffle, drop_last=drop_last,
                             rank=rank, world=world, steps=steps)
        return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())
