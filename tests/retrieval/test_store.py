"""The store interface: a Milvus collection (Milvus Lite, in this process) behaves as an index directory does."""

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app import cli
from app.api import Settings, create_app
from matvit import checkpoint, data
from retrieval import build, milvus_client, milvus_store
from retrieval.budget import Budget, BudgetError
from retrieval.encoder import Encoder
from retrieval.milvus_store import MilvusStore
from retrieval.prefix import Plan
from retrieval.retriever import Retriever
from retrieval.store import IndexBusy, IndexStoreError, ItemNotFound, open_store, rebuild, remove
from retrieval.tuning import SearchParamError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def encoder(trained_dir):
    return Encoder.load(trained_dir)


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """One Milvus Lite file for the module (its server starts once per process); each test takes a collection."""
    return tmp_path_factory.mktemp("milvus") / "gallery.db"


@pytest.fixture
def spec(lite, request):
    return f"milvus:{lite}#{request.node.name.removeprefix('test_')[:40]}"


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train", 8, 1), data.load("digits", "test", 8, 1)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_open_store_reads_directories_and_milvus_uris(tmp_path):
    assert open_store(tmp_path / "idx").files == tmp_path / "idx"
    lite = open_store(f"milvus:{tmp_path}/g.db#fmnist")
    assert isinstance(lite, MilvusStore) and lite.lite and lite.alias == "fmnist"
    assert lite.files == tmp_path / "g.files" / "fmnist"
    server = open_store("milvus:http://milvus.example:19530/prod")
    assert not server.lite and server.alias == "matvit" and server.files.parts[-2:] == ("milvus.example-19530-prod",
                                                                                       "matvit")
    with pytest.raises(IndexStoreError, match="ending in .db"):
        open_store(f"milvus:{tmp_path}/gallery")
    with pytest.raises(IndexStoreError, match="bad Milvus collection name"):
        open_store(f"milvus:{tmp_path}/g.db#no-dashes")
    with pytest.raises(IndexStoreError, match="no index at milvus:"):
        open_store(f"milvus:{tmp_path}/missing.db").open()


def test_build_and_search_match_the_faiss_directory(encoder, digits, spec, tmp_path):
    _, test = digits
    source = build.DatasetSource("digits", "test", 8, 1)
    report = build.build(encoder, source, spec)
    build.build(encoder, source, tmp_path / "faiss")
    assert report["count"] == report["added"] == 360 and report["index_key"] == "Flat"
    milvus, faiss_dir = Retriever(spec, encoder=encoder), Retriever(tmp_path / "faiss", encoder=encoder)
    manifest = milvus.index.manifest  # read back from the collection's properties
    assert manifest["fingerprint"] == encoder.fingerprint and manifest["submodel"] == "XL" and manifest["dim"] == 32
    assert manifest["next_id"] == manifest["count"] == 360 and manifest["classes"] == test.classes
    assert manifest["metric"] == "inner_product" and manifest["roots"][0]["kind"] == "dataset"
    hits = milvus.search(test.images[:20], k=5, submodel="XL")
    assert [h.neighbours[0]["id"] for h in hits] == list(range(20))  # each gallery image finds itself
    assert all(h.neighbours[0]["score"] == pytest.approx(1.0, abs=1e-4) for h in hits)
    for a, b in zip(milvus.search(test.images[20:40], k=5, submodel="S"),
                    faiss_dir.search(test.images[20:40], k=5, submodel="S"), strict=True):
        assert [h["id"] for h in a.neighbours] == [h["id"] for h in b.neighbours]
        assert [h["score"] for h in a.neighbours] == pytest.approx([h["score"] for h in b.neighbours], abs=1e-5)
    strip = lambda item: {k: v for k, v in item.items() if k != "added_at"}  # noqa: E731
    assert strip(milvus.item(7)) == strip(faiss_dir.item(7))
    item = milvus.item(7)
    assert item["source"] == test.sources[7] and item["label_name"] == test.classes[int(test.labels[7])]
    assert (item["width"], item["height"]) == (8, 8) and item["path"] is None and item["added_at"]
    assert milvus.item(360) is None and milvus.index.labels() == faiss_dir.index.labels()
    with pytest.raises(IndexStoreError, match="searches full vectors only"):  # no prefix search in Milvus
        milvus.search(test.images[:1], k=5, plan=Plan(8))


def test_add_remove_and_ids_are_never_reused(encoder, digits, spec):
    train, test = digits
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), spec)
    retriever = Retriever(spec, encoder=encoder, refresh_seconds=0)
    first = retriever.index.version
    assert retriever.remove([3, 7]) == [3, 7]
    assert retriever.index.version != first and retriever.index.count == 358
    results = retriever.search(test.images[:10], k=20)
    assert all(h["id"] not in (3, 7) for r in results for h in r.neighbours)
    assert retriever.item(3) is None
    with pytest.raises(ItemNotFound, match="no item with id 3"):
        remove(spec, [3, 5])
    assert retriever.index.count == 358 and retriever.item(5) is not None  # a refused remove removes nothing
    report = build.add(encoder, build.DatasetSource("digits", "train", 8, 1), spec)
    assert report["added"] == 1437 and report["count"] == 358 + 1437
    hits = retriever.search(train.images[:3], k=1)
    assert [h.neighbours[0]["id"] for h in hits] == [360, 361, 362]  # new ids start past every id ever given
    retriever.remove([361])
    added = retriever.add([png(test.images[0, 0].numpy())], labels=["new-class"], names=["mine.png"])
    assert added[0]["id"] == 360 + 1437 and added[0]["label_name"] == "new-class" and added[0]["source"] == "mine.png"
    manifest = retriever.index.manifest
    assert manifest["next_id"] == 360 + 1437 + 1 and manifest["classes"][-1] == "new-class"
    assert retriever.item_image(added[0]["id"], 10_000)[1] == "image/png"
    retriever.remove([added[0]["id"]])
    assert not list((open_store(spec).files / "uploads").glob(f"{added[0]['id']}.*"))


def test_a_released_collection_is_loaded_by_open_and_by_a_view_in_use(encoder, digits, spec):
    """As Milvus Lite opened in a new process, or a Milvus server after a restart, has its collections."""
    _, test = digits
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), spec)
    store = open_store(spec)
    view = store.open()
    store.client().release_collection(view.collection)
    retriever = Retriever(spec, encoder=encoder, refresh_seconds=0)
    assert retriever.search(test.images[:3], k=1)[0].neighbours[0]["id"] == 0
    rebuild(spec, "HNSW16")  # a new version in a new collection, released here as a writer elsewhere may leave it
    store.client().release_collection(store.open().collection)
    assert retriever.search(test.images[:3], k=1)[0].neighbours[0]["id"] == 0
    assert retriever.index.collection != view.collection and retriever.index.manifest["index_key"] == "HNSW16"
    store.client().release_collection(view.collection)
    scores, ids = view.search(np.full((2, 32), 0.1, np.float32), 3)
    assert ids.shape == (2, 3) and (ids >= 0).all() and np.isfinite(scores).all()
    store.client().release_collection(view.collection)
    assert view.item(4)["id"] == 4


def test_rows_of_an_add_killed_before_its_end_are_dropped_and_their_ids_never_reused(encoder, digits, spec,
                                                                                      monkeypatch):
    _, test = digits
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), spec)

    class Killed(BaseException):
        """Stands for a kill: nothing after the crash point runs (the store cleans nothing up)."""

    def crash(name):
        if name == "milvus.written":  # rows inserted, the manifest not yet final
            raise Killed

    retriever = Retriever(spec, encoder=encoder, refresh_seconds=0)
    monkeypatch.setattr(milvus_store, "crash_point", crash)
    with pytest.raises(Killed):
        retriever.add([png(test.images[0, 0].numpy())])
    monkeypatch.undo()
    assert open_store(spec).open().manifest["unfinished_from"] == 360
    added = retriever.add([png(test.images[1, 0].numpy())])
    index = open_store(spec).open()
    ids = sorted(int(row["id"]) for row in index.rows(["id"]))
    assert added[0]["id"] == 361 and ids == [*range(360), 361] and index.count == 361
    assert "unfinished_from" not in index.manifest


def test_wrong_model_is_refused(encoder, trained, spec, tmp_path):
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), spec)
    other = type(trained)(trained.config)
    other.load_state_dict(trained.state_dict())
    with torch.no_grad():
        other.head.bias.add_(1.0)
    checkpoint.save(other, tmp_path)
    with pytest.raises(IndexStoreError, match=r"model fingerprint \w+ does not match the index's \w+ \(milvus:"):
        Retriever(spec, tmp_path)
    with pytest.raises(IndexStoreError, match="does not match"):
        build.add(Encoder.load(tmp_path), build.DatasetSource("digits", "test", 8, 1), spec)
    assert open_store(spec).open().count == 360


def test_rebuild_fills_a_new_collection_and_switches_to_it(encoder, digits, spec):
    train, _ = digits
    build.build(encoder, build.DatasetSource("digits", "train", 8, 1), spec)
    remove(spec, [10])
    before = open_store(spec).open()
    report = rebuild(spec, "HNSW16", recall_target=0.99)
    after = open_store(spec).open()
    assert report["index_key"] == after.manifest["index_key"] == "HNSW16" and report["count"] == 1436
    assert "ef_search" in report["search_params"] and report["recall"]["at_10"] >= 0.99
    assert after.version != before.version and after.collection != before.collection
    assert after.items(range(1437)) == before.items(range(1437))  # re-indexed, not re-embedded
    scores, ids = before.search(np.zeros((1, 32), np.float32) + 0.1, 3)  # a view in use keeps its collection
    assert ids.shape == (1, 3) and (ids >= 0).all()
    retriever = Retriever(spec, encoder=encoder)
    assert [r.neighbours[0]["id"] for r in retriever.search(train.images[:5], k=1)] == [0, 1, 2, 3, 4]
    with pytest.raises(SearchParamError, match="'nprobe' does not apply"):
        retriever.search(train.images[:1], k=1, search_params={"nprobe": 4})
    assert retriever.search(train.images[:1], k=20, search_params={"ef_search": 16})[0].neighbours[0]["id"] == 0
    rebuild(spec, "Flat")
    names = open_store(spec)._collections()
    assert len(names) == 2 and open_store(spec).open().collection == names[-1]  # the one replaced is kept
    with pytest.raises(IndexStoreError, match="bad --index-key 'Nonsense7' for Milvus"):
        rebuild(spec, "Nonsense7")
    assert open_store(spec)._collections() == names


def test_api_serves_a_milvus_index_while_items_are_added_and_removed(encoder, trained_dir, digits, spec):
    _, test = digits
    build.build(encoder, build.DatasetSource("digits", "train", 8, 1), spec)
    app = create_app(Settings(index=spec, checkpoint=trained_dir), load_in_background=False)
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
        assert (open_store(spec).files / "profile.json").is_file()  # budgets: measured into the local directory
        info = c.get("/v1/index").json()
        assert info["count"] == 1437 and info["index_key"] == "Flat" and "@" in info["version"]
        image = png(test.images[0, 0].numpy())
        r = c.post("/v1/items", files=[("files", ("a.png", image, "image/png"))], data={"labels": "7"})
        assert r.status_code == 201, r.text
        new_id = r.json()["items"][0]["id"]
        assert new_id == 1437 and c.get("/v1/index").json()["count"] == 1438
        r = c.post("/v1/search", files={"file": ("q.png", image, "image/png")}, data={"k": "1", "budget_ms": "1000"})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == new_id
        assert c.get(f"/v1/items/{new_id}").json()["label_name"] == "7"
        assert c.get(f"/v1/items/{new_id}/image").content == image
        assert c.delete(f"/v1/items/{new_id}").json() == {"deleted": [new_id]}
        r = c.post("/v1/search", files={"file": ("q.png", image, "image/png")}, data={"k": "5"})
        assert new_id not in [h["id"] for h in r.json()["results"]]
        assert c.get(f"/v1/items/{new_id}").status_code == 404 and c.delete(f"/v1/items/{new_id}").status_code == 404
        embedding = [0.0] * 31 + [1.0]
        assert c.post("/v1/search", json={"embedding": embedding, "k": 3}).status_code == 200
        # a write from elsewhere in this process (Milvus Lite serves one process) is seen by the next request
        build.add(encoder, build.DatasetSource("digits", "test", 8, 1), spec)
        time.sleep(0.15)
        assert c.get("/v1/index").json()["count"] == 1437 + 360


def test_command_line_with_milvus_lite(trained_dir, digits, spec, tmp_path, capsys):
    _, test = digits
    query = tmp_path / "q.png"
    query.write_bytes(png(test.images[4, 0].numpy()))
    common = ["--checkpoint", str(trained_dir)]
    assert cli.main(["build-index", *common, "--dataset", "digits", "--split", "test", "--store", spec]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 360
    assert cli.main(["search", "--index", spec, *common, "--image", str(query), "-k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["id"] == 4
    assert cli.main(["index", "remove", "--index", spec, "--ids", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": [4]}
    assert cli.main(["index", "info", "--index", spec]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 359 and info["next_id"] == 360 and info["store"] == "milvus"
    assert info["unfinished_build"] is False and info["deleted_pending_rebuild"] == 0
    assert cli.main(["index", "remove", "--index", spec, "--ids", "4"]) == 2
    assert "matvit: error: no item with id 4" in capsys.readouterr().err
    assert cli.main(["search", "--index", spec, *common, "--image", str(query), "--budget-gflops", "1"]) == 0


HOLD = """
import sys, time
from pymilvus import MilvusClient
MilvusClient(sys.argv[1])
print("open", flush=True)
time.sleep(60)
"""


def test_a_lite_file_open_in_another_process_is_one_line_error(encoder, tmp_path, monkeypatch, capfd, caplog):
    path = tmp_path / "held.db"
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), f"milvus:{path}")
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "other.db")], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "open"
        with pytest.raises(IndexBusy, match="open in another process"):
            open_store(f"milvus:{tmp_path / 'other.db'}").open()
        check, calls = milvus_client.check_lite, []  # the other process opens the file just after the check:

        def late(*args):
            calls.append(args)
            return None if len(calls) == 1 else check(*args)

        monkeypatch.setattr(milvus_client, "check_lite", late)
        capfd.readouterr()
        caplog.clear()
        with pytest.raises(IndexBusy, match="open in another process"):
            open_store(f"milvus:{tmp_path / 'other.db'}").open()
        assert len(calls) == 2  # one line, no logged traceback:
        assert "Traceback" not in capfd.readouterr().err and not [r for r in caplog.records if r.exc_info]
    finally:
        child.kill()
        child.wait()
    assert open_store(f"milvus:{path}").open().count == 360  # the file this process opened stays usable


def test_budgets_and_bad_search_parameters(encoder, digits, spec):
    _, test = digits
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), spec)
    retriever = Retriever(spec, encoder=encoder)
    s_gflops = encoder.gflops("S")
    assert retriever.search(test.images[:1], k=1, budget=Budget(gflops=s_gflops * 1.01))[0].submodel.spec == "S"
    with pytest.raises(SearchParamError, match="Flat takes none"):
        retriever.search(test.images[:1], k=1, search_params={"ef_search": 32})
    with pytest.raises(BudgetError, match="no profile of this model on this machine"):
        retriever.search(test.images[:1], k=1, budget=Budget(ms=1000))
