"""Galleries from every dataset kind training reads: csv:, wds: and folder: index the same vectors and labels as
the images in memory, unreadable images are skipped, `index add --dataset` appends, mistakes are one line, and two
processes index shards as one does."""

import csv
import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from app.cli import main
from matvit import data
from matvit.shard_writer import write_shards
from retrieval import build
from retrieval.faiss_store import GalleryIndex
from retrieval.store import ItemNotFound


@pytest.fixture(scope="module")
def digit_test():
    return data.load("digits", "test", 8, 1)


@pytest.fixture(scope="module")
def gallery(digit_test, tmp_path_factory) -> Path:
    """The digits' test split three ways: `test/CLASS/NNNN.png` files, `gallery.csv` naming them in the dataset's
    order (with a split column), and shards in `shards/` (the test split written in the dataset's order)."""
    root = tmp_path_factory.mktemp("gallery")
    rows = []
    for i, (img, label) in enumerate(zip(digit_test.images, digit_test.labels.tolist(), strict=True)):
        path = Path("test") / str(label) / f"{i:04d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(root / path)
        rows.append({"path": str(path), "label": str(label), "split": "test"})
    with open(root / "gallery.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    write_shards("digits", root / "shards", max_count=100, progress=False)
    return root


def _index(directory: Path) -> tuple[np.ndarray, np.ndarray, dict[int, dict]]:
    index = GalleryIndex.open(directory)
    ids, vectors = index.vectors()
    return np.asarray(ids), np.asarray(vectors), index.items(ids)


def _build(trained_dir, out: Path, *gallery: str, workers: int = 0) -> dict:
    assert main(["build-index", "--checkpoint", str(trained_dir), "--out", str(out), "--device", "cpu",
                 "--workers", str(workers), "--batch-size", "64", *gallery]) == 0
    return GalleryIndex.open(out).manifest


@pytest.fixture(scope="module")
def in_memory(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("in-memory") / "index"
    _build(trained_dir, out, "--dataset", "digits", "--split", "test")
    return _index(out)


@pytest.mark.parametrize("kind", ["csv", "wds", "folder"])
def test_csv_shards_and_folder_index_what_memory_does(kind, gallery, in_memory, digit_test, trained_dir, tmp_path,
                                                      capsys):
    dataset = {"csv": f"csv:{gallery / 'gallery.csv'}", "wds": f"wds:{gallery / 'shards'}",
               "folder": f"folder:{gallery}"}[kind]
    manifest = _build(trained_dir, tmp_path / "index", "--dataset", dataset, "--split", "test",
                      *(["--workers", "1"] if kind == "wds" else []))
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == 360 and report["skipped"] == 0
    ids, vectors, items = _index(tmp_path / "index")
    assert len(ids) == 360 and manifest["next_id"] == 360
    # which digit each item is: its file name, or its key in the shards
    position = {i: int(Path(items[i]["source"].split("#")[-1]).stem) for i in ids.tolist()}
    assert sorted(position.values()) == list(range(360))
    if kind != "folder":  # csv rows and test shards keep the dataset's order: the same ids as in memory
        assert all(i == p for i, p in position.items())
    order = [position[i] for i in ids.tolist()]
    mem_ids, mem_vectors, mem_items = in_memory
    np.testing.assert_allclose(vectors, mem_vectors[order], atol=1e-5)
    assert [items[i]["label_name"] for i in ids.tolist()] == [str(int(digit_test.labels[p])) for p in order]
    assert [items[i]["label_name"] for i in ids.tolist()] == [mem_items[int(mem_ids[p])]["label_name"] for p in order]
    assert all((items[i]["width"], items[i]["height"]) == (8, 8) for i in ids.tolist())
    sample = items[int(ids[0])]
    if kind == "wds":  # inside a tar: a name (SHARD#KEY), no file to serve
        assert sample["source"] == "test-000000.tar#00000000" and sample["path"] is None
        assert manifest["roots"] == [{"kind": "dataset", "name": dataset, "split": "test", "data_dir": None}]
    else:  # a file the index can serve, relative to the manifest's folder or the folder
        assert sample["path"] == sample["source"] and (gallery / sample["path"]).is_file()
        assert manifest["roots"][0]["path"] == str(gallery.resolve())


def test_an_unreadable_image_in_a_csv_is_skipped_and_the_rest_indexed(gallery, trained_dir, tmp_path, caplog,
                                                                      capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    lines = (gallery / "gallery.csv").read_text().splitlines()
    rows = [line.split(",") for line in lines[1:6]]
    manifest = tmp_path / "list.csv"
    manifest.write_text("\n".join(["path,label,split", *(f"{gallery / p},{label},train" for p, label, _ in rows),
                                   "broken.png,3,train", "missing.png,4,train", ""]))
    with caplog.at_level(logging.WARNING):
        _build(trained_dir, tmp_path / "index", "--dataset", f"csv:{manifest}", "--split", "train")
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == 5 and report["skipped"] == 2
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "broken.png" in warned and "missing.png" in warned and "skipped 2 unreadable" in warned
    ids, _, items = _index(tmp_path / "index")
    assert ids.tolist() == [0, 1, 2, 3, 4]  # positions 5 and 6 were the unreadable rows
    # files outside the manifest's folder keep their absolute path as a name and no servable path
    assert items[0]["source"] == str(gallery / rows[0][0]) and items[0]["path"] is None
    with pytest.raises(ItemNotFound, match="no image file the server can send"):  # a 404, not a crash
        GalleryIndex.open(tmp_path / "index").image_file(items[0], 10**6)
    assert sorted({items[i]["label_name"] for i in ids.tolist()}) == sorted({label for _, label, _ in rows})


def _shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def _png(value: int, size: tuple[int, int] = (12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, color=value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_shard_batches_hold_exactly_the_positions_asked_and_bad_samples_are_errors(tmp_path):
    """Mixed shards: a corrupt image, a sample without .cls, one without an image, metadata members."""
    _shard(tmp_path / "test-000000.tar", [
        {"__key__": "a", "png": _png(10), "cls": 1},
        {"__key__": "b", "png": b"\x89PNG corrupt", "cls": 0},
        {"__key__": "c", "json": b"{}"},  # no image: not a gallery position
        {"__key__": "d", "jpg": _png(30), "txt": b"caption"},  # no .cls: indexed without a label
    ])
    _shard(tmp_path / "test-000001.tar", [{"__key__": f"e{i}", "webp": _png(40 + i, (8, 8)), "cls": 1}
                                          for i in range(3)])
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["x", "y"], "counts": {"test": 6}}))
    source = build.open_gallery(f"wds:{tmp_path}", "test", 8, 1, workers=0)
    assert len(source) == 6 and source.classes == ["x", "y"] and source.labels == [1, 0, -1, 1, 1, 1]
    assert [source.source(p) for p in (0, 2, 5)] == [("test-000000.tar#a", None), ("test-000000.tar#d", None),
                                                     ("test-000001.tar#e2", None)]
    batches = list(source.batches([5, 0, 1, 3, 2], 2))
    assert [b.positions for b in batches] == [[5, 0], [3], [2]]  # asked in batches [5, 0], [1, 3], [2]
    assert [b.errors for b in batches][::2] == [[], []] and batches[1].errors[0][0] == 1
    assert "test-000000.tar#b" in batches[1].errors[0][1]
    assert [b.sizes for b in batches] == [[(8, 8), (12, 10)], [(8, 8)], [(12, 10)]]
    assert [int(img.float().mean().round()) for b in batches if b.images is not None for img in b.images] == \
        [42, 10, 40, 30]


def test_index_add_from_shards_gives_new_ids(gallery, in_memory, trained_dir, tmp_path, capsys):
    out = tmp_path / "index"
    _build(trained_dir, out, "--dataset", "digits", "--split", "test")
    capsys.readouterr()
    assert main(["index", "add", "--index", str(out), "--checkpoint", str(trained_dir), "--device", "cpu",
                 "--workers", "0", "--dataset", f"wds:{gallery / 'shards'}", "--split", "test"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == 360 and report["skipped"] == 0
    ids, vectors, items = _index(out)
    assert ids.tolist() == list(range(720))
    np.testing.assert_allclose(vectors[360:], vectors[:360], atol=1e-5)
    assert [items[i]["label_name"] for i in range(360, 720)] == [items[i]["label_name"] for i in range(360)]
    manifest = GalleryIndex.open(out).manifest
    assert manifest["next_id"] == 720 and [r["kind"] for r in manifest["roots"]] == ["dataset", "dataset"]
    assert manifest["roots"][1]["name"] == f"wds:{gallery / 'shards'}"


@pytest.mark.parametrize("argv, message", [
    (["index", "add", "--index", "IDX"], "give exactly one of --images PATH or --dataset NAME"),
    (["index", "add", "--index", "IDX", "--images", "x", "--dataset", "digits"],
     "give exactly one of --images PATH or --dataset NAME"),
    (["build-index", "--out", "IDX", "--images", "x", "--dataset", "digits"],
     "give exactly one of --images PATH or --dataset NAME"),
    (["build-index", "--out", "IDX", "--dataset", "csv:nowhere/list.csv"], "CSV manifest not found"),
    (["build-index", "--out", "IDX", "--dataset", "wds:shards/{split}-*.tar"], "no shard matches shards/train-*.tar"),
    (["index", "add", "--index", "IDX", "--dataset", "wds:shards"], "no train-*.tar shards in shards"),
    (["build-index", "--out", "IDX", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
])
def test_gallery_mistakes_are_one_line(argv, message, trained_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    argv = [a.replace("IDX", str(tmp_path / "index")) for a in argv]
    assert main([*argv, "--checkpoint", str(trained_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_index_shards_as_one_does(gallery, trained_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for processes in (1, 2):
        launch = [sys.executable]
        if processes > 1:
            launch += ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
        command = [*launch, "-m", "matvit", "build-index", "--checkpoint", str(trained_dir), "--device", "cpu",
                   "--dataset", f"wds:{gallery / 'shards'}", "--split", "test", "--batch-size", "32",
                   "--workers", "1", "--out", str(tmp_path / str(processes))]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    (ids_one, vectors_one, items_one), (ids_two, vectors_two, items_two) = (_index(tmp_path / n) for n in "12")
    assert ids_one.tolist() == ids_two.tolist() == list(range(360))
    np.testing.assert_allclose(vectors_two, vectors_one, atol=1e-5)
    strip = [{i: {k: v for k, v in item.items() if k != "added_at"} for i, item in items.items()}
             for items in (items_one, items_two)]
    assert strip[0] == strip[1]
    assert GalleryIndex.open(tmp_path / "2").manifest["next_id"] == 360
    assert not (tmp_path / "2" / "building").exists()
