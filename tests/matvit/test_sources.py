"""Sources: streamed folders and CSV manifests read the same images as the in-memory path, unreadable files are
dropped, and the split across processes gives every global batch of a one-process run."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from matvit import data, sources
from matvit.data import DatasetError
from matvit.train import Trainer, TrainOptions


@pytest.fixture(scope="module")
def digit_tree(tmp_path_factory):
    """120 digits as PNGs in train/<class>/ and test/<class>/ (100 + 20), plus one corrupt file."""
    root = tmp_path_factory.mktemp("digit-tree")
    ds = data.load_digits("train")
    for i in range(120):
        folder = root / ("train" if i < 100 else "test") / str(int(ds.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i, 0].numpy()).save(folder / f"{i:04d}.png")
    (root / "train" / "3" / "broken.png").write_bytes(b"not a png")
    return root


def _all(source: sources.Source, **split) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(source.loader(16, **split))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_a_streamed_folder_reads_what_the_in_memory_path_decodes(digit_tree):
    streamed = sources.open_source(f"folder:{digit_tree}", "train", 8, 1)
    in_memory = sources.open_source(f"folder:{digit_tree}", "train", 8, 1, in_memory=True)
    assert isinstance(streamed, sources.LabelledFiles) and isinstance(in_memory, sources.InMemory)
    assert streamed.classes == in_memory.classes == [str(c) for c in range(10)]
    assert len(streamed) == 101 and len(in_memory) == 100  # the corrupt file is only found when decoded
    images, labels = _all(streamed, workers=2)  # decoded in two worker processes; the corrupt file dropped
    torch.testing.assert_close(images, in_memory.images, atol=0, rtol=0)
    torch.testing.assert_close(labels, in_memory.labels)


def test_a_csv_manifest_with_and_without_a_split_column(digit_tree, tmp_path):
    files = sorted(digit_tree.rglob("*.png"))
    rows = [{"path": str(f.relative_to(digit_tree)), "label": f.parent.name, "split": f.parts[-3]} for f in files]
    with_split = digit_tree / "with-split.csv"
    with open(with_split, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    train, test = (sources.open_source(f"csv:{with_split}", s, 8, 1) for s in ("train", "test"))
    assert (len(train), len(test)) == (101, 20)
    folder = sources.open_source(f"folder:{digit_tree}", "test", 8, 1, in_memory=True)
    images, labels = _all(test)
    torch.testing.assert_close(images, folder.images, atol=0, rtol=0)
    assert labels.tolist() == folder.labels.tolist()

    no_split = tmp_path / "no-split.csv"  # absolute paths, a stable 90/10 split by path
    with open(no_split, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label"])
        writer.writeheader()
        writer.writerows({"path": str(digit_tree / r["path"]), "label": r["label"]} for r in rows)
    train, test = (sources.open_source(f"csv:{no_split}", s, 8, 1) for s in ("train", "test"))
    assert len(train) + len(test) == len(rows) and 0 < len(test) < len(train)
    assert not {str(p) for p in train.files} & {str(p) for p in test.files}


def test_bad_datasets_get_one_line_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("file,class\na.png,cat\n")
    for name, message in [(f"csv:{tmp_path / 'missing.csv'}", "CSV manifest not found"),
                          (f"csv:{tmp_path / 'bad.csv'}", "needs a header row with the columns path and label"),
                          (f"folder:{tmp_path / 'nowhere'}", "image folder not found"),
                          ("imagenet", "unknown dataset")]:
        with pytest.raises(DatasetError, match=message):
            sources.open_source(name, "train", 8, 1)
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "unlabelled.png")
    with pytest.raises(DatasetError, match="no labelled images"):
        sources.open_source(f"folder:{tmp_path / 'flat'}", "train", 8, 1)


def _rows(images: torch.Tensor) -> list[bytes]:
    return sorted(bytes(row) for row in images.flatten(1).numpy().astype(np.uint8))


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_kth_batches_together_are_the_kth_global_batch(world):
    source = sources.open_source("digits", "train", 8, 1)
    global_batch = 12 * world

    def batches(rank, world, size):
        return list(source.loader(size, epoch=3, seed=7, shuffle=True, drop_last=True, rank=rank, world=world))

    alone = batches(0, 1, global_batch)
    shares = [batches(rank, world, global_batch // world) for rank in range(world)]
    assert len(alone) == len(source) // global_batch
    assert all(len(share) == len(alone) for share in shares)
    for k, (images, _) in enumerate(alone):
        together = torch.cat([share[k][0] for share in shares])
        assert _rows(together) == _rows(images)
    assert torch.equal(batches(0, 1, global_batch)[0][0], alone[0][0])  # the same seed and epoch: the same order
    other_epoch = list(source.loader(global_batch, epoch=4, seed=7, shuffle=True, drop_last=True))
    assert not torch.equal(other_epoch[0][0], alone[0][0])


@pytest.mark.parametrize("preset", ["matvit-tiny-digits", "matmamba-tiny-digits"])
def test_training_streams_a_folder_end_to_end(digit_tree, tmp_path, preset):
    opts = TrainOptions(preset, f"folder:{digit_tree}", tmp_path, epochs=1, batch_size=16)
    result = Trainer(opts, workers=1).run(log=lambda s: None)
    assert set(result["knn1"]) == {"S", "M", "L", "XL"}
    assert all(0.0 <= v <= 1.0 for v in result["top1"].values())
