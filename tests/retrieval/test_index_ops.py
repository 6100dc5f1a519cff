"""Operating an index: live versions, add and remove, one writer, rebuilds, tuned recall, item images, profiles."""

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from matvit import data
from retrieval import budget, build, commit, faiss_store, store, store_common, tuning
from retrieval.encoder import Encoder
from retrieval.faiss_store import GalleryIndex
from retrieval.retriever import Retriever
from retrieval.store import IndexBusy, ItemImageRefused, ItemNotFound

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def encoder(trained_dir):
    return Encoder.load(trained_dir)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train", 8, 1), data.load("digits", "test", 8, 1)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_running_retriever_follows_new_versions_and_old_readers_keep_theirs(encoder, digits, tmp_path):
    train, test = digits
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), tmp_path)
    retriever = Retriever(tmp_path, encoder=encoder, refresh_seconds=0)
    held = retriever.index  # a request in flight on the first version
    build.add(encoder, build.DatasetSource("digits", "train", 8, 1), tmp_path)
    build.add(encoder, build.DatasetSource("digits", "train", 8, 1), tmp_path)
    assert retriever.index.count == 360 + 2 * 1437 and retriever.index.version_dir != held.version_dir
    # two writes later, the version the old request holds is still whole
    assert held.version_dir.is_dir() and held.item(5)["source"] == test.sources[5]
    hits = retriever.search(train.images[:1], k=1)[0].neighbours
    assert hits[0]["id"] >= 360 and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    del held
    build.add(encoder, build.DatasetSource("digits", "test", 8, 1), tmp_path)
    retriever.index  # noqa: B018  (swaps to the newest version and lets the older ones go)
    versions = sorted(p.name for p in tmp_path.glob("v0*"))
    assert len(versions) == 2 and retriever.index.version_dir.name == versions[-1]


def test_removed_ids_never_come_back_and_ids_are_never_reused(encoder, digits, tmp_path):
    train, _ = digits
    for key in ("Flat", "HNSW32"):  # physical removal, and tombstones filtered at search
        directory = tmp_path / key
        build.build(encoder, build.DatasetSource("digits", "train", 8, 1), directory, index_key=key)
        retriever = Retriever(directory, encoder=encoder, refresh_seconds=0)
        assert retriever.remove([3, 7]) == [3, 7]
        results = retriever.search(train.images[:10], k=20)
        assert all(h["id"] not in (3, 7) for r in results for h in r.neighbours)
        assert results[3].neighbours[0]["id"] != 3 and retriever.item(3) is None
        assert retriever.index.count == 1435
        with pytest.raises(ItemNotFound, match="no item with id 3"):
            retriever.remove([3])
        build.add(encoder, build.DatasetSource("digits", "test", 8, 1), directory)
        ids = retriever.index.vectors()[0].tolist()
        assert min(ids[1435:]) == 1437 and 3 not in ids
        rebuilt = store.rebuild(directory, "auto")
        assert rebuilt["index_key"] == "Flat" and rebuilt["count"] == 1435 + 360
        assert len(retriever.index.deleted) == 0 and retriever.item(1437)["source"].startswith("digits:")


def test_one_writer_at_a_time(encoder, tmp_path):
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), tmp_path)
    with store.writer(tmp_path):
        with pytest.raises(IndexBusy, match=f"being written by another process \\(pid {os.getpid()}\\)"):
            build.add(encoder, build.DatasetSource("digits", "test", 8, 1), tmp_path)
        with pytest.raises(IndexBusy):
            store.remove(tmp_path, [1], wait=0.2)
    assert GalleryIndex.open(tmp_path).count == 360
    store.remove(tmp_path, [1])
    assert GalleryIndex.open(tmp_path).count == 359


def test_recall_uses_queries_outside_the_index_and_tuning_meets_the_target(encoder, tmp_path):
    build.build(encoder, build.DatasetSource("digits", "train", 8, 1), tmp_path, index_key="IVF32,Flat",
                recall_target=0.99)
    gallery = GalleryIndex.open(tmp_path)
    ids, vectors = gallery.vectors()
    queries = tuning.probe_queries(np.asarray(vectors))
    assert (queries @ np.asarray(vectors).T).max(axis=1).max() < 0.9999  # no query is a stored vector
    one = tuning.recall(gallery.faiss_index, ids, vectors, gallery.deleted, queries, {"nprobe": 1})
    assert one["at_10"] < 0.99  # one list of 32 misses neighbours: the measure can fail
    manifest = gallery.manifest
    assert manifest["recall"]["met"] and manifest["recall"]["at_10"] >= 0.99
    assert manifest["search_params"]["nprobe"] > 1
    # after an add, recall is measured again against exact search over the whole index
    report = build.add(encoder, build.DatasetSource("digits", "test", 8, 1), tmp_path, recall_target=0.99)
    grown = GalleryIndex.open(tmp_path)
    ids, vectors = grown.vectors()
    again = tuning.recall(grown.faiss_index, ids, vectors, grown.deleted, tuning.probe_queries(np.asarray(vectors)),
                          grown.manifest["search_params"])
    assert len(ids) == 1797 and report["recall"]["at_10"] == pytest.approx(again["at_10"])


def test_a_flat_index_past_the_threshold_says_so_and_rebuild_follows_auto(encoder, tmp_path, monkeypatch):
    build.build(encoder, build.DatasetSource("digits", "train", 8, 1), tmp_path)
    before = GalleryIndex.open(tmp_path)
    assert before.advice() is None
    monkeypatch.setattr(store_common, "FLAT_MAX", 1000)
    assert "index rebuild" in GalleryIndex.open(tmp_path).advice()
    report = store.rebuild(tmp_path)
    after = GalleryIndex.open(tmp_path)
    assert report["index_key"] == after.manifest["index_key"] == "HNSW32" and "ef_search" in report["search_params"]
    assert after.advice() is None
    np.testing.assert_array_equal(after.vectors()[1], before.vectors()[1])  # re-indexed, not re-embedded
    assert after.items(range(1437)) == before.items(range(1437))


def test_auto_is_exact_only_while_an_exact_search_costs_less_than_the_smallest_encoder(encoder, tmp_path,
                                                                                     monkeypatch):
    digits = build.DatasetSource("digits", "train", 8, 1)
    cheap = build.build(encoder, digits, tmp_path / "cheap")  # 1,437 vectors: microseconds against a forward pass
    assert cheap["index_key"] == "Flat" and cheap["auto"]["chose"] == "Flat" and cheap["auto"]["smallest"] == "S"
    assert 0 < cheap["auto"]["exact_search_ms"] < commit.EXACT_SHARE * cheap["auto"]["smallest_encode_ms"]
    monkeypatch.setattr(build, "smallest_encode_ms", lambda _: ("S", 0.0))  # an encoder faster than any search
    costly = build.build(encoder, digits, tmp_path / "costly")
    assert costly["index_key"] == "HNSW32" and costly["auto"]["chose"] == "HNSW32"
    assert costly["recall"]["at_10"] >= tuning.RECALL_TARGET and "ef_search" in costly["search_params"]
    assert GalleryIndex.open(tmp_path / "costly").manifest["auto"] == costly["auto"]
    asked = build.build(encoder, digits, tmp_path / "asked", index_key="Flat")
    assert asked["index_key"] == "Flat" and "auto" not in asked


def test_paths_with_uri_characters(encoder, tmp_path):
    directory = tmp_path / "odd?name#100%"
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), directory)
    assert GalleryIndex.open(directory).item(0)["source"].startswith("digits:")


def test_item_images_only_from_indexed_roots(encoder, tmp_path):
    gallery = tmp_path / "gallery" / "cat"
    gallery.mkdir(parents=True)
    photo = png_bytes(np.full((20, 30, 3), 200, dtype=np.uint8))
    (gallery / "a.png").write_bytes(photo)
    (gallery / "big.png").write_bytes(png_bytes(np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8)))
    secret = tmp_path / "secret.png"
    secret.write_bytes(photo)
    (gallery / "link.png").symlink_to(secret)
    build.build(encoder, build.FolderSource(tmp_path / "gallery", 8, 1, workers=0), tmp_path / "idx")
    retriever = Retriever(tmp_path / "idx", encoder=encoder)
    by_source = {retriever.item(i)["source"]: i for i in range(3)}
    assert set(by_source) == {"cat/a.png", "cat/big.png", "cat/link.png"}
    assert retriever.item_image(by_source["cat/a.png"], 10_000) == (photo, "image/png")
    with pytest.raises(ItemImageRefused, match="outside the indexed folder"):
        retriever.item_image(by_source["cat/link.png"], 10_000)
    with pytest.raises(ItemImageRefused, match="over the limit of 10,000"):
        retriever.item_image(by_source["cat/big.png"], 10_000)
    (gallery / "a.png").unlink()
    with pytest.raises(ItemNotFound, match="no longer at its recorded path"):
        retriever.item_image(by_source["cat/a.png"], 10_000)


def test_dataset_item_images_come_from_the_data_dir_the_index_was_built_from(trained_dir, tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 10, 5)
    for name, array in (("train-images-idx3-ubyte.gz", images), ("train-labels-idx1-ubyte.gz", labels)):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())
    encoder = Encoder.load(trained_dir)
    build.build(encoder, build.DatasetSource("fashion-mnist", "train", 8, 1, data_dir=tmp_path), tmp_path / "idx")
    content, media = Retriever(tmp_path / "idx", encoder=encoder).item_image(3, 10_000)
    assert media == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(content))), images[3])


def test_added_images_are_kept_and_served_and_removed(encoder, digits, tmp_path):
    _, test = digits
    build.build(encoder, build.DatasetSource("digits", "train", 8, 1), tmp_path)
    retriever = Retriever(tmp_path, encoder=encoder, refresh_seconds=0)
    files = [png_bytes(test.images[i, 0].numpy()) for i in range(2)]
    added = retriever.add(files, labels=["7", "new-class"], names=["mine.png", None])
    assert [a["id"] for a in added] == [1437, 1438]
    assert added[0]["source"] == "mine.png" and added[1]["label_name"] == "new-class"
    assert retriever.index.manifest["classes"][-1] == "new-class"
    assert retriever.search(test.images[:1], k=1)[0].neighbours[0]["id"] == 1437
    assert retriever.item_image(1438, 10_000) == (files[1], "image/png")
    with pytest.raises(Exception, match="cannot read uploaded image"):
        retriever.add([files[0], b"not an image"])
    assert retriever.index.count == 1439  # nothing of a refused batch was added
    retriever.remove([1438])
    assert not list((tmp_path / "uploads").glob("1438.*")) and retriever.index.count == 1438


def test_profile_from_another_machine_is_measured_again_keeping_accuracy(encoder, tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    first = budget.profile(encoder, [encoder.spec("S"), encoder.spec("XL")], accuracy=lambda s: 0.5, repeats=2)
    first["host"] = {**first["host"], "torch_threads": 999}
    budget.save_profile(first, path)
    assert budget.load_profile(path, encoder.fingerprint) is None  # stale: other threads
    again = budget.ensure_profile(encoder, path)
    assert [r["spec"] for r in again["rows"]] == ["S", "XL"] and all(r["knn1"] == 0.5 for r in again["rows"])
    assert again["host"] == budget.host() and budget.load_profile(path, encoder.fingerprint) == again
    assert not list(tmp_path.glob(".profile.json.*"))  # no temporary file left behind


SLOW_BUILD = """
import sys, time
from retrieval import build, embedding
from retrieval.encoder import Encoder
embedding.CHUNK = 100
encoder = Encoder.load(sys.argv[1])
original = Encoder.encode
def slow(self, images, *args, **kwargs):
    time.sleep(0.3)
    return original(self, images, *args, **kwargs)
Encoder.encode = slow
build.build(encoder, build.DatasetSource("digits", "train", 8, 1), sys.argv[2], batch_size=50)
"""


def test_build_killed_mid_way_keeps_serving_and_resumes_to_the_same_index(encoder, trained_dir, digits, tmp_path):
    train, test = digits
    build.build(encoder, build.DatasetSource("digits", "train", 8, 1), tmp_path / "straight")
    directory = tmp_path / "killed"
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), directory)
    serving = Retriever(directory, encoder=encoder, refresh_seconds=0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(trained_dir), str(directory)], env=env,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((directory / "building").glob("chunk-*[0-9].npz"))) < 3:
        assert child.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        assert serving.search(test.images[:2], k=1)[0].neighbours[0]["id"] == 0  # the old version keeps serving
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert serving.index.count == 360 and GalleryIndex.open(directory).count == 360
    report = build.build(encoder, build.DatasetSource("digits", "train", 8, 1), directory, resume=True)
    assert report["count"] == 1437
    straight, resumed = GalleryIndex.open(tmp_path / "straight"), GalleryIndex.open(directory)
    np.testing.assert_array_equal(resumed.vectors()[0], straight.vectors()[0])
    np.testing.assert_allclose(resumed.vectors()[1], straight.vectors()[1], atol=1e-5)  # batched differently
    strip = lambda items: {i: {k: v for k, v in it.items() if k != "added_at"} for i, it in items.items()}  # noqa: E731
    assert strip(resumed.items(range(1437))) == strip(straight.items(range(1437)))
    assert serving.index.count == 1437


def test_index_accuracy_reads_labels_without_an_id_list(encoder, digits, tmp_path, monkeypatch):
    _, test = digits
    monkeypatch.setattr(faiss_store, "SQL_CHUNK", 7)
    build.build(encoder, build.DatasetSource("digits", "train", 8, 1), tmp_path)
    gallery = GalleryIndex.open(tmp_path)
    assert len(gallery.items(range(1437))) == 1437  # chunked IN lists
    labels = gallery.labels()
    assert len(labels) == 1437 and labels[0] == int(data.load("digits", "train", 8, 1).labels[0])
    accuracy = budget.index_accuracy(gallery, encoder, test)
    assert accuracy(encoder.spec("XL")) > 0.5


def test_bad_index_key_is_one_line_and_writes_nothing(encoder, tmp_path):
    with pytest.raises(store.IndexStoreError, match="bad --index-key 'Nonsense7'"):
        build.build(encoder, build.DatasetSource("digits", "test", 8, 1), tmp_path, index_key="Nonsense7")
    assert not (tmp_path / "CURRENT").exists()


def test_info_is_what_index_info_prints_and_a_location_keeps_a_milvus_uri(encoder, tmp_path, capsys):
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), tmp_path)
    store.remove(tmp_path, [1])
    info = store.info(tmp_path)
    assert info["count"] == 359 and info["next_id"] == 360 and info["unfinished_build"] is False
    assert info["version"] == store.open_store(tmp_path).current_version() and info["advice"] is None
    assert main(["index", "info", "--index", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == info
    assert store.location("milvus:http://host:19530/db#gallery") == "milvus:http://host:19530/db#gallery"
    assert store.location("runs/idx") == Path("runs/idx")
