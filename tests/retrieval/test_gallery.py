"""Gallery readers are the training `Source` read by position: one protocol, the same images either way."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from matvit import data, sources
from matvit.shard_writer import write_shards
from retrieval.gallery import FolderSource, open_gallery


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The digits' first 40 test images as `test/CLASS/NNNN.png` files and a `gallery.csv` naming them, and the
    digits as shards in `shards/`."""
    root = tmp_path_factory.mktemp("tree")
    digits = data.load("digits", "test", 8, 1)
    rows = []
    for i, (img, label) in enumerate(zip(digits.images[:40], digits.labels[:40].tolist(), strict=True)):
        path = Path("test") / str(label) / f"{i:04d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(root / path)
        rows.append({"path": str(path), "label": str(label), "split": "test"})
    (root / "train" / "0").mkdir(parents=True)
    with open(root / "gallery.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    write_shards("digits", root / "shards", max_count=100, progress=False)
    return root


def _read(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.mark.parametrize("kind", ["digits", "folder", "csv", "wds"])
def test_a_gallery_is_the_source_training_reads(kind, tree):
    name = {"digits": "digits", "folder": f"folder:{tree}", "csv": f"csv:{tree / 'gallery.csv'}",
            "wds": f"wds:{tree / 'shards'}"}[kind]
    gallery, source = open_gallery(name, "test", 8, 1, workers=0), sources.open_source(name, "test", 8, 1)
    assert isinstance(gallery, sources.GallerySource) and isinstance(gallery, sources.Source)
    assert not isinstance(source, sources.GallerySource)
    assert gallery.classes == source.classes and len(gallery) == len(source)
    images, labels = _read(gallery.loader(16))
    expected = _read(source.loader(16))
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])
    by_position = list(gallery.batches(list(range(len(gallery))), 16))
    assert [p for b in by_position for p in b.positions] == list(range(len(gallery)))
    assert torch.equal(torch.cat([b.images for b in by_position]), images)
    assert gallery.labels == labels.tolist()


def test_any_folder_of_images_is_a_gallery(tree):
    folder = FolderSource(tree / "test", 8, 1, workers=0)
    assert isinstance(folder, sources.GallerySource) and len(folder) == 40
    name, path = folder.source(0)
    assert name == path == str(folder.files[0].relative_to(tree / "test"))
    assert folder.classes[folder.labels[0]] == folder.files[0].parent.name
