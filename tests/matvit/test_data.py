"""Datasets: digits split, Fashion-MNIST IDX parsing, and folders of odd, big and broken images."""

import gzip
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from matvit import data, images
from tests.conftest import write_odd_images


def test_digits_split_is_fixed_and_disjoint():
    train, test = data.load("digits", "train", 8, 1), data.load("digits", "test", 8, 1)
    assert len(train) + len(test) == 1797
    assert not set(train.sources) & set(test.sources)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert data.load("digits", "train", 8, 1).sources == train.sources
    assert data.load("digits", "test", 16, 3).images.shape[1:] == (3, 16, 16)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    ds = data.load("fashion-mnist", "test", 28, 1, data_dir=tmp_path)
    assert ds.images.shape == (7, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.as_tensor(imgs, dtype=torch.uint8))
    assert ds.labels.tolist() == labels.tolist() and ds.classes[9] == "ankle-boot"
    with pytest.raises(data.DatasetError, match="dataset-fashion-mnist"):
        data.load("fashion-mnist", "train", 28, 1, data_dir=tmp_path)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_folder_reads_every_mode_and_skips_broken_files(tmp_path, caplog, in_chans):
    write_odd_images(tmp_path)
    with caplog.at_level(logging.WARNING):
        train = data.load_folder(tmp_path, "train", 32, in_chans, workers=0)
        test = data.load_folder(tmp_path, "test", 32, in_chans, workers=0)
    assert train.classes == ["cat", "dog"]
    assert len(train) + len(test) == 8 and train.skipped + test.skipped == 2
    assert train.images.shape[1:] == (in_chans, 32, 32)
    assert "skipped 1 unreadable image" in caplog.text or "skipped 2 unreadable image" in caplog.text
    named = dict(zip([s.rsplit("/", 1)[-1] for s in train.sources + test.sources],
                     torch.cat([train.labels, test.labels]).tolist(), strict=True))
    assert named["palette.gif"] == 1 and named["rgb.jpg"] == 0


def test_folder_with_train_and_test_subfolders(tmp_path):
    for split in ("train", "test"):
        write_odd_images(tmp_path / split)
    ds = data.load(f"folder:{tmp_path}", "test", 16, 3)
    assert len(ds) == 8 and ds.skipped == 2 and all("/test/" in s for s in ds.sources)


@pytest.mark.parametrize("present", ["train", "test"])
def test_folder_with_only_one_split_folder(tmp_path, present):
    write_odd_images(tmp_path / present)
    (tmp_path / present / "fox").mkdir()
    ds = data.load(f"folder:{tmp_path}", present, 16, 3)
    assert ds.classes == ["cat", "dog", "fox"]
    assert len(ds) == 8 and all(f"/{present}/" in s for s in ds.sources)
    assert sorted(set(ds.labels.tolist())) == [0, 1]
    missing = "test" if present == "train" else "train"
    with pytest.raises(data.DatasetError, match=f"no {missing}/ folder in {tmp_path}"):
        data.load(f"folder:{tmp_path}", missing, 16, 3)


def test_split_classes_come_from_both_split_folders(tmp_path):
    for split in ("train", "test"):
        write_odd_images(tmp_path / split)
    (tmp_path / "test" / "eel").mkdir()
    (tmp_path / "test" / "eel" / "a.png").write_bytes((tmp_path / "test" / "cat" / "grey.png").read_bytes())
    train, test = (data.load(f"folder:{tmp_path}", split, 16, 3) for split in ("train", "test"))
    assert train.classes == test.classes == ["cat", "dog", "eel"]
    assert dict(zip([s.rsplit("/", 1)[-1] for s in test.sources], test.labels.tolist(), strict=True))["a.png"] == 2


def test_list_classes_is_the_sorted_sub_folders(tmp_path):
    for name in ("zebra", "ant", "Moth"):
        (tmp_path / name).mkdir()
    (tmp_path / "readme.txt").write_text("not a class")
    assert data.list_classes(tmp_path) == ["Moth", "ant", "zebra"]


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert images.prepare(img, 4, 3).min() == 255


def test_unreadable_image_errors_are_one_line(tmp_path):
    with pytest.raises(images.ImageError, match="no such image file"):
        images.load(tmp_path / "missing.png", 8, 1)
    with pytest.raises(images.ImageError, match="cannot read uploaded image"):
        images.load(b"garbage", 8, 1)


def test_unknown_dataset_and_missing_folder():
    with pytest.raises(data.DatasetError, match="unknown dataset 'mnist'"):
        data.load("mnist", "train", 8, 1)
    with pytest.raises(data.DatasetError, match="image folder not found"):
        data.load("folder:/no/such/dir", "train", 8, 1)
