"""WebDataset shards: written from any dataset, read back exactly, streamed in lockstep across ranks and
workers, named by directories, {split} and brace patterns, and trained on end to end."""

import importlib.util
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds

from matvit import data
from matvit.data import DatasetError
from matvit.images import to_png
from matvit.shard_writer import write_shards
from matvit.shards import ShardSource
from matvit.sources import open_source
from matvit.train import Trainer, TrainOptions
from tests.conftest import write_odd_images


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    """Digits in uneven shards: 1,437 training samples as 5 x 250 + 187, 360 test samples as 250 + 110."""
    out = tmp_path_factory.mktemp("digit-shards")
    write_shards("digits", out, max_count=250, progress=False)
    return out


def _read(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _pairs(images: torch.Tensor, labels: torch.Tensor) -> Counter:
    return Counter((img.numpy().tobytes(), int(y)) for img, y in zip(images, labels, strict=True))


def test_shards_read_back_the_dataset_exactly(digit_shards):
    meta = json.loads((digit_shards / "dataset.json").read_text())
    assert meta["counts"] == {"train": 1437, "test": 360} and meta["shards"] == {"train": 6, "test": 2}
    assert meta["classes"] == [str(c) for c in range(10)]
    test, train = data.load("digits", "test", 8, 1), data.load("digits", "train", 8, 1)
    source = open_source(f"wds:{digit_shards}", "test", 8, 1)
    assert len(source) == 360 and source.classes == test.classes
    images, labels = _read(source.loader(64))  # one reader: the test split in the dataset's order
    assert torch.equal(images, test.images) and torch.equal(labels, test.labels)
    source = ShardSource(str(digit_shards), "train", 8, 1)
    images, labels = _read(source.loader(100, workers=2))  # written shuffled, read by two workers: the same set
    assert len(labels) == 1437 and _pairs(images, labels) == _pairs(train.images, train.labels)
    again = _read(source.loader(100, workers=2))
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)  # a stable order
    halves = [_read(source.loader(100, rank=rank, world=2)) for rank in (0, 1)]  # ranks share the shards out
    assert sum((_pairs(*half) for half in halves), Counter()) == _pairs(train.images, train.labels)


def test_training_batches_keep_ranks_in_lockstep(digit_shards):
    source = ShardSource(str(digit_shards), "train", 8, 1)
    steps = 1437 // (32 * 2)
    orders = {}
    for rank in (0, 1):
        for epoch in (0, 1):
            batches = list(source.loader(32, epoch=epoch, seed=3, shuffle=True, drop_last=True, rank=rank,
                                         world=2, workers=2))
            assert len(batches) == steps  # 6 shards among 4 readers: uneven, yet every rank yields `steps` batches
            assert all(x.shape == (32, 1, 8, 8) and x.dtype == torch.uint8 and y.shape == (32,) for x, y in batches)
            orders[rank, epoch] = torch.cat([y for _, y in batches])
    assert not torch.equal(orders[0, 0], orders[0, 1]) and not torch.equal(orders[0, 0], orders[1, 0])
    again = torch.cat([y for _, y in source.loader(32, epoch=1, seed=3, shuffle=True, drop_last=True, rank=0,
                                                    world=2, workers=2)])
    assert torch.equal(again, orders[0, 1])  # seeded: the same epoch reads the same batches
    three = list(source.loader(32, shuffle=True, drop_last=True, rank=2, world=3, workers=2))
    assert len(three) == 1437 // 96


def test_fewer_shards_than_readers_still_fill_every_batch(tmp_path):
    write_shards("digits", tmp_path, max_count=1000, progress=False)  # 2 training shards, 3 ranks x 2 workers
    source = ShardSource(str(tmp_path), "train", 8, 1)
    for rank in (0, 1, 2):
        batches = list(source.loader(16, shuffle=True, drop_last=True, rank=rank, world=3, workers=2))
        assert len(batches) == 1437 // 48 and all(len(y) == 16 for _, y in batches)


def test_one_reader_reads_no_sample_twice_in_an_epoch(digit_shards):
    train = data.load("digits", "train", 8, 1)
    images, labels = _read(ShardSource(str(digit_shards), "train", 8, 1).loader(50, shuffle=True, drop_last=True))
    assert len(labels) == 1400
    assert not _pairs(images, labels) - _pairs(train.images, train.labels)  # a sub-multiset of the split


def test_split_and_brace_patterns(digit_shards, tmp_path):
    by_dir = ShardSource(str(digit_shards), "train", 8, 1).shards
    assert len(by_dir) == 6
    assert ShardSource(f"{digit_shards}/{{split}}-{{000000..000099}}.tar", "train", 8, 1).shards == by_dir
    assert ShardSource(f"{digit_shards}/{{split}}-*.tar", "train", 8, 1).shards == by_dir
    assert ShardSource(f"{digit_shards}/{{split}}-{{000001..000002}}.tar", "train", 8, 1).shards == by_dir[1:3]
    # img2dataset's layout, one folder per split: counts from its *_stats.json, classes from dataset.json above
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        for i, shard in enumerate(sorted(digit_shards.glob(f"{split}-*.tar"))):
            (tmp_path / split / f"{i:05d}.tar").write_bytes(shard.read_bytes())
            n = sum(1 for m in tarfile.open(shard) if m.name.endswith(".cls"))
            (tmp_path / split / f"{i:05d}_stats.json").write_text(json.dumps({"successes": n, "failed": 0}))
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": 10}))
    source = open_source(f"wds:{tmp_path}/{{split}}/{{00000..00009}}.tar", "test", 8, 1)
    assert len(source) == 360 and source.classes == [str(c) for c in range(10)]
    images, labels = _read(source.loader(128))
    assert torch.equal(labels, data.load("digits", "test", 8, 1).labels)


def test_errors_say_what_to_fix(digit_shards, tmp_path):
    with pytest.raises(DatasetError, match="no shard matches .*/train-"):
        ShardSource(f"{tmp_path}/{{split}}-{{000000..000009}}.tar", "train", 8, 1)
    with pytest.raises(DatasetError, match=r"names no split: put \{split\}"):
        ShardSource(f"{digit_shards}/train-{{000000..000005}}.tar", "train", 8, 1)
    with pytest.raises(DatasetError, match="no train-\\*.tar shards in"):
        ShardSource(str(tmp_path), "train", 8, 1)
    (tmp_path / "train-000000.tar").write_bytes((digit_shards / "train-000000.tar").read_bytes())
    with pytest.raises(DatasetError, match="no class names .* add .*dataset.json with"):
        ShardSource(str(tmp_path), "train", 8, 1)
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["a", "b"]}))
    with pytest.raises(DatasetError, match='no sample count .* add "counts": {"train": N}'):
        ShardSource(str(tmp_path), "train", 8, 1)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json is not valid JSON"):
        ShardSource(str(tmp_path), "train", 8, 1)
    with pytest.raises(DatasetError, match="already holds shards; pass --overwrite"):
        write_shards("digits", digit_shards, progress=False)
    with pytest.raises(DatasetError, match="cannot write shards of 'wds:"):
        write_shards(f"wds:{digit_shards}", tmp_path / "again", progress=False)


def test_unreadable_samples_are_skipped_with_a_warning(tmp_path, caplog):
    images = data.load("digits", "test", 8, 1).images[:40]
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        for i, img in enumerate(images):
            sink.write({"__key__": f"{i:04d}", "png": to_png(img), "cls": i % 2, "json": {"note": "ignored"}})
        sink.write({"__key__": "0100", "jpg": b"\xff\xd8\xff not a jpeg", "cls": 1})
        sink.write({"__key__": "0101", "png": to_png(images[0])})  # no label
        sink.write({"__key__": "0102", "png": to_png(images[0]), "cls": 7})  # no such class
        sink.write({"__key__": "0103", "png": to_png(images[0]), "cls": "one"})
    (tmp_path / "test-000000.tar").write_bytes((tmp_path / "train-000000.tar").read_bytes())
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["even", "odd"],
                                                       "counts": {"train": 44, "test": 44}}))
    source = ShardSource(str(tmp_path), "test", 8, 1)
    with caplog.at_level(logging.WARNING, logger="matvit.shards"):
        got, labels = _read(source.loader(16))
    assert torch.equal(got, images) and labels.tolist() == [i % 2 for i in range(40)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "matvit.shards"]
    assert len(warnings) == 4 and all("skipped sample 01" in w for w in warnings)
    assert any("cannot read" in w for w in warnings) and any("class 7" in w for w in warnings)
    batches = list(ShardSource(str(tmp_path), "train", 8, 1).loader(8, shuffle=True, drop_last=True))
    assert len(batches) == 44 // 8 and all(len(y) == 8 for _, y in batches)


def test_folder_images_are_copied_byte_for_byte(tmp_path):
    for split in ("train", "test"):
        write_odd_images(tmp_path / "photos" / split)
    meta = write_shards(f"folder:{tmp_path / 'photos'}", tmp_path / "shards", progress=False)
    assert meta["classes"] == ["cat", "dog"] and meta["counts"] == {"train": 10, "test": 10}
    with tarfile.open(tmp_path / "shards" / "test-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    originals = sorted((p for p in (tmp_path / "photos" / "test").rglob("*") if p.is_file() and p.suffix != ".txt"),
                       key=str)
    images = [members[f"{i:08d}.{p.suffix[1:]}"] for i, p in enumerate(originals)]
    assert images == [p.read_bytes() for p in originals]
    source = ShardSource(str(tmp_path / "shards"), "test", 16, 3)
    got, _ = _read(source.loader(4))
    assert got.shape == (8, 3, 16, 16)  # the corrupt and truncated files are skipped when read


def test_make_shards_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_shards", Path(__file__).resolve().parents[2] / "scripts" /
                                                  "make_shards.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--dataset", "digits", "--out", str(tmp_path), "--max-count", "1000"]) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == {"train": 2, "test": 1}
    assert script.main(["--dataset", "digits", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"make_shards: error: {tmp_path} already holds shards; pass " \
                                              "--overwrite to replace them"


@pytest.mark.parametrize("preset", ["matvit-tiny-digits", "matmamba-tiny-digits"])
def test_training_on_shards_end_to_end(digit_shards, tmp_path, preset):
    opts = TrainOptions(preset=preset, dataset=f"wds:{digit_shards}", out=tmp_path, epochs=1,
                        batch_size=64)
    trainer = Trainer(opts, workers=0)
    assert trainer.steps_per_epoch == 1437 // 64 and trainer.train_set.classes == [str(c) for c in range(10)]
    result = trainer.run(log=lambda s: None)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["top1"] == result["top1"] and saved["knn1"] == result["knn1"]
    for metric in ("top1", "knn1"):
        assert set(saved[metric]) == {"S", "M", "L", "XL"} and all(0.0 <= v <= 1.0 for v in saved[metric].values())
    assert all(v > 0.15 for v in saved["knn1"].values())  # 1-NN over the streamed gallery: above chance (0.1)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and set(log[0]["acc"]) == {"S", "M", "L", "XL"}
    assert json.loads((tmp_path / "config.json").read_text())["dataset"] == f"wds:{digit_shards}"
