"""Retrieval: index once with XL, query with any submodel; atomic, resumable, model-checked indexes."""

import json

import numpy as np
import pytest
import torch

from matvit import checkpoint, data
from matvit.errors import UserError
from retrieval import build, embedding
from retrieval.budget import Budget, BudgetError, candidates, choose
from retrieval.encoder import Encoder
from retrieval.faiss_store import GalleryIndex
from retrieval.retriever import Retriever
from retrieval.store import IndexStoreError
from tests.conftest import write_odd_images


@pytest.fixture(scope="module")
def encoder(trained_dir):
    return Encoder.load(trained_dir)


@pytest.fixture(scope="module")
def digits_index(encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("index")
    build.build(encoder, build.DatasetSource("digits", "train", 8, 1), out)
    return out


def test_build_and_search_round_trip(digits_index, encoder):
    index = GalleryIndex.open(digits_index)
    assert index.count == 1437 and index.manifest["submodel"] == "XL" and index.manifest["index_key"] == "Flat"
    assert index.manifest["fingerprint"] == encoder.fingerprint and index.manifest["dim"] == 32
    gallery = data.load("digits", "train", 8, 1)
    retriever = Retriever(digits_index, encoder=encoder)
    hits = retriever.search(gallery.images[:20], k=5, submodel="XL")
    assert [h.neighbours[0]["id"] for h in hits] == list(range(20))  # each gallery image finds itself
    assert all(h.neighbours[0]["score"] == pytest.approx(1.0, abs=1e-4) for h in hits)
    assert [n["rank"] for n in hits[0].neighbours] == [1, 2, 3, 4, 5]
    assert hits[0].neighbours[0]["metadata"]["source"] == gallery.sources[0]


def test_xl_index_queried_with_s_returns_sensible_neighbours(digits_index, encoder):
    queries = data.load("digits", "test", 8, 1)
    retriever = Retriever(digits_index, encoder=encoder)
    for spec in ("S", "XL", "S,M,L,XL"):
        results = retriever.search(queries.images, k=1, submodel=spec)
        correct = [r.neighbours[0]["label"] == str(int(y)) for r, y in zip(results, queries.labels, strict=True)]
        assert np.mean(correct) > 0.5, spec  # chance is 0.1
        assert results[0].submodel.spec == spec


def test_wrong_checkpoint_is_refused(digits_index, trained, tmp_path):
    other = type(trained)(trained.config)
    other.load_state_dict(trained.state_dict())
    with torch.no_grad():
        other.head.bias.add_(1.0)
    checkpoint.save(other, tmp_path)
    with pytest.raises(IndexStoreError, match=r"model fingerprint \w+ does not match the index's \w+"):
        Retriever(digits_index, tmp_path)


def test_interrupted_build_keeps_old_index_and_resume_finishes_it(encoder, tmp_path, monkeypatch):
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), tmp_path)
    assert GalleryIndex.open(tmp_path).count == 360
    monkeypatch.setattr(embedding, "CHUNK", 100)
    calls = []
    original = Encoder.encode

    def failing_encode(self, images, *args, **kwargs):
        calls.append(len(images))
        if len(calls) == 7:
            raise RuntimeError("injected failure")
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode", failing_encode)
    with pytest.raises(RuntimeError, match="injected"):
        build.build(encoder, build.DatasetSource("digits", "train", 8, 1), tmp_path, batch_size=50)
    old = GalleryIndex.open(tmp_path)
    assert old.count == 360 and old.manifest["source"].startswith("digits:test")
    assert (tmp_path / "building").is_dir()

    calls.clear()
    monkeypatch.setattr(Encoder, "encode", lambda self, images, *a, **k: calls.append(len(images)) or original(
        self, images, *a, **k))
    report = build.build(encoder, build.DatasetSource("digits", "train", 8, 1), tmp_path, batch_size=50, resume=True)
    assert sum(calls) == 1437 - 300  # three chunks of 100 were saved before the failure
    index = GalleryIndex.open(tmp_path)
    ids = index.vectors()[0]
    assert index.count == report["count"] == 1437
    assert ids.tolist() == list(range(1437))
    assert not (tmp_path / "building").exists()
    assert sorted(p.name for p in tmp_path.glob("v*")) == [old.version_dir.name, index.version_dir.name]


@pytest.mark.parametrize("damage, message", [
    (lambda v: (v / "manifest.json").unlink(), "missing its manifest.json"),
    (lambda v: (v / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda v: (v / "manifest.json").write_text(json.dumps({"format": 2})), "lacks"),
    (lambda v: (v / "manifest.json").write_text(json.dumps({"format": 99})), "format 99; .* upgrade matvit"),
    (lambda v: (v / "manifest.json").write_text(json.dumps({"format": 1})), "format 1; .* rebuild it"),
    (lambda v: (v / "index.faiss").write_bytes(b"junk"), "cannot read v[0-9]+/index.faiss"),
])
def test_corrupt_index_is_detected(encoder, tmp_path, damage, message):
    build.build(encoder, build.DatasetSource("digits", "test", 8, 1), tmp_path)
    damage(GalleryIndex.open(tmp_path).version_dir)
    with pytest.raises(IndexStoreError, match=message):
        GalleryIndex.open(tmp_path)


def test_missing_index_directory(tmp_path):
    with pytest.raises(IndexStoreError, match="no index at"):
        GalleryIndex.open(tmp_path / "nothing")


def test_folder_with_corrupt_images_indexes_the_rest_and_add_appends(encoder, tmp_path):
    write_odd_images(tmp_path / "gallery")
    report = build.build(encoder, build.FolderSource(tmp_path / "gallery", 8, 1, workers=0), tmp_path / "idx")
    assert report["added"] == 8 and report["skipped"] == 2
    index = GalleryIndex.open(tmp_path / "idx")
    items = index.items(index.vectors()[0])
    big = next(i for i in items.values() if i["source"] == "dog/big.jpg")  # relative to the indexed root
    assert (big["width"], big["height"]) == (1200, 900) and big["label"] == 1
    assert index.manifest["classes"] == ["cat", "dog"]

    write_odd_images(tmp_path / "more")
    report = build.add(encoder, build.FolderSource(tmp_path / "more", 8, 1, workers=0), tmp_path / "idx")
    index = GalleryIndex.open(tmp_path / "idx")
    assert report["added"] == 8 and index.count == 16
    ids = index.vectors()[0].tolist()
    assert len(set(ids)) == 16 and min(ids) >= 0 and max(ids) < index.manifest["next_id"]
    assert [r["path"] for r in index.manifest["roots"]] == [str((tmp_path / d).resolve()) for d in ("gallery", "more")]


PROFILE = [
    {"spec": "S", "params": 10, "gflops": 1.0, "latency_ms_b1": 1.0},
    {"spec": "M", "params": 20, "gflops": 2.0, "latency_ms_b1": 2.0},
    {"spec": "L", "params": 40, "gflops": 4.0, "latency_ms_b1": 3.0},
    {"spec": "XL", "params": 80, "gflops": 8.0, "latency_ms_b1": 5.0},
]


def test_budget_picks_the_largest_that_fits_or_the_most_accurate():
    assert choose(PROFILE, Budget(ms=3.5))[0]["spec"] == "L"
    assert choose(PROFILE, Budget(gflops=2.0))[0]["spec"] == "M"
    assert choose(PROFILE, Budget(params=100))[0]["spec"] == "XL"
    measured = [dict(r, knn1=a) for r, a in zip(PROFILE, [0.80, 0.86, 0.85, 0.87], strict=True)]
    best, why = choose(measured, Budget(ms=3.5))
    assert best["spec"] == "M" and "most accurate measured 1-NN" in why


def test_budget_candidates_join_families_and_specs_each_once(encoder):
    both = candidates(encoder, "uniform;narrowing;S,S,M,XL;XL")
    assert len(both) == len(set(both)) == 35 + 1  # narrowing holds the 4 uniform specs; the mixed spec widens
    assert [s.text for s in both[:4]] == ["S", "M", "L", "XL"] and both[-1].text == "S,S,M,XL"
    assert [s.text for s in candidates(encoder, "one-layer")][:2] == ["XL,S,S,S", "S,XL,S,S"]
    with pytest.raises(UserError, match="granularit"):
        candidates(encoder, "uniform;widest")


def test_budget_errors_name_the_cheapest_feasible():
    with pytest.raises(BudgetError, match="no submodel fits 0.5 ms; the cheapest is S at 1 ms"):
        choose(PROFILE, Budget(ms=0.5))
    with pytest.raises(BudgetError, match="at most one budget"):
        Budget(ms=1, gflops=1)
    with pytest.raises(BudgetError, match="positive"):
        Budget(gflops=-1)


def test_retriever_budgets_use_costs_and_only_a_stored_profile_for_latency(digits_index, encoder):
    retriever = Retriever(digits_index, encoder=encoder)
    queries = data.load("digits", "test", 8, 1).images[:2]
    s_gflops = encoder.gflops("S")
    assert s_gflops < encoder.gflops("S", head=True)  # retrieval counts the embedding path only
    result = retriever.search(queries, k=3, budget=Budget(gflops=s_gflops * 1.01))
    assert result[0].submodel.spec == "S" and "GFLOPs" in result[0].submodel.reason
    (digits_index / "profile.json").unlink(missing_ok=True)
    with pytest.raises(BudgetError, match="no profile of this model on this machine"):
        retriever.search(queries, k=3, budget=Budget(ms=1000))  # a request never measures
    assert not (digits_index / "profile.json").exists()
    retriever.ensure_profile()
    assert retriever.search(queries, k=3, budget=Budget(ms=1000))[0].submodel.spec == "XL"
    with pytest.raises(BudgetError, match="the cheapest is S"):
        retriever.choose(budget=Budget(gflops=1e-6))
