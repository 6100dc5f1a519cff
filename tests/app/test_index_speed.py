"""`matvit bench index`: Flat, HNSW, IVF-PQ and auto over a grown digits gallery; `--speed`: build throughput and
per-submodel query latency."""

import json

import numpy as np
import pytest
import torch

from app.bench import index_measure, index_scale
from app.cli import main
from retrieval import tuning


def test_bench_index_speed_writes_its_report(trained_dir, tmp_path, capsys):
    out = tmp_path / "results" / "index-digits"
    assert main(["bench", "index", "--speed", "--checkpoint", str(trained_dir), "--dataset", "digits",
                 "--index", str(tmp_path / "idx"), "--queries", "4", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["build_in_memory"]["count"] == 1437 and report["build_from_png_files"]["count"] == 360
    assert report["xl_forward"]["images"] == 1437 and report["xl_forward"]["images_per_s"] > 0
    assert list(report["query_latency_ms"]) == ["S", "M", "L", "XL"]
    s, xl = report["query_latency_ms"]["S"], report["query_latency_ms"]["XL"]
    assert {"decode", "encode", "search", "total", "gflops", "params"} <= set(s)
    assert s["gflops"] < xl["gflops"] and s["params"] < xl["params"]
    assert report["command"].startswith("matvit bench index") and report["queries"] == 4
    md = out.with_suffix(".md").read_text()
    assert "1437-image XL index (median of 4" in md and md.count("\n| ") >= 9
    assert "wrote" in capsys.readouterr().out


def test_augment_is_seeded_and_keeps_images_close():
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    a = index_scale.augment(images, torch.Generator().manual_seed(3))
    b = index_scale.augment(images, torch.Generator().manual_seed(3))
    c = index_scale.augment(images, torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, images)


def ivfpq_without_polysemous_training(mp: pytest.MonkeyPatch) -> None:
    """IVF-PQ as `auto` builds it, less the polysemous training that takes seconds per code byte."""
    mp.setitem(index_scale.KINDS, "ivfpq", lambda n, dim: f"{index_scale._ivfpq_key(n, dim)}np")


@pytest.fixture(scope="module")
def scale_run(trained_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    argv = ["bench", "index", "--checkpoint", str(trained_dir), "--dataset", "digits", "--sizes", "2000,4000",
            "--stores", "faiss", "--cache", str(tmp / "cache"), "--latency-queries", "8", "--batch-queries", "128",
            "--out", str(tmp / "out")]
    with pytest.MonkeyPatch.context() as mp, index_measure.faiss_threads(1):  # OpenMP threads crawl on a busy machine
        ivfpq_without_polysemous_training(mp)
        assert main(argv) == 0
    return tmp, argv


def test_bench_index_scale_rows_and_exact_recall(scale_run):
    tmp, _ = scale_run
    r = json.loads((tmp / "out" / "index-scale.json").read_text())
    assert [(row["size"], row["store"], row["kind"]) for row in r["rows"]] == [
        (n, "faiss", k) for n in (2000, 4000) for k in ("flat", "hnsw", "ivfpq", "ivfsq8", "auto")]
    for row in r["rows"]:
        assert (tmp / "out" / "steps" / f"{row['size']}-{row['kind']}.json").is_file()
        assert set(row["queries"]) == {"S", "XL"} and row["bytes_per_vector"] > 0 and row["build_seconds"] >= 0
        for q in row["queries"].values():
            assert {"at_1", "at_10", "knn1", "qps_batch_1", "qps_batch_64"} <= set(q)
            assert 0 <= q["at_1"] <= 1 and 0 <= q["at_10"] <= 1 and q["qps_batch_1"] > 0
        if row["kind"] == "flat":
            assert row["index_key"] == "Flat" and row["search_params"] == {} and row["sweep"] == []
            assert all(q["at_1"] == 1.0 and q["at_10"] == 1.0 for q in row["queries"].values())
            flat_knn1 = {s: q["knn1"] for s, q in row["queries"].items()}
        if row["kind"] == "auto":  # below FLAT_MAX auto is exact search, so its row is Flat's
            assert row["same_as"] == "flat" and {s: q["knn1"] for s, q in row["queries"].items()} == flat_knn1
    ivfpq = next(row for row in r["rows"] if row["kind"] == "ivfpq" and row["size"] == 4000)
    assert ivfpq["index_key"] == "IVF252,PQ8np" and "nprobe" in ivfpq["search_params"]
    assert [p["nprobe"] for p in ivfpq["sweep"] if "rerank" not in p] == [1, 2, 4, 8, 16, 32, 64, 128, 252]
    reranked = [p for p in ivfpq["sweep"] if "rerank" in p]  # along rerank at the tuned nprobe, where tuned in
    assert [p["rerank"] for p in reranked] == (list(tuning.RERANK[1:]) if ivfpq["search_params"].get("rerank") else [])
    assert all(p["nprobe"] == ivfpq["search_params"]["nprobe"] for p in reranked)
    hnsw = next(row for row in r["rows"] if row["kind"] == "hnsw" and row["size"] == 4000)
    assert hnsw["hnsw_ef_construction"] == 40 and "ef_search" in hnsw["search_params"]
    flat = next(row for row in r["rows"] if row["kind"] == "flat" and row["size"] == 4000)
    assert ivfpq["bytes_per_vector"] < flat["bytes_per_vector"] / 2  # 8 bytes of code against 128 of vector
    assert r["gallery"]["copies"] == 3 and r["gallery"]["train_images"] == 1437
    assert r["stores"] == {"faiss": {"measured": True, "sizes": [2000, 4000]}}
    assert [t["met"] for t in r["targets"]] in ([False, True], [False, False])  # exact auto cannot be 20x Flat
    md = (tmp / "out" / "index-scale.md").read_text()
    assert "## 4,000 vectors" in md and "| auto (= flat) | `Flat` |" in md
    assert (tmp / "out" / "index-scale.png").stat().st_size > 0


def test_bench_index_scale_resumes_without_rebuilding(scale_run, monkeypatch):
    tmp, argv = scale_run
    cache = next((tmp / "cache").iterdir())
    gallery = np.load(cache / "gallery-4000.npy")
    assert gallery.shape == (4000, 32) and np.allclose(np.linalg.norm(gallery, axis=1), 1, atol=1e-4)
    assert np.array_equal(np.load(cache / "labels-4000.npy")[:1437], np.load(cache / "labels-4000.npy")[1437:2874])
    before = (tmp / "out" / "steps" / "4000-hnsw.json").read_text()

    def no_rebuilds(*args, **kwargs):
        raise AssertionError("a finished step or the cached embeddings were computed again")

    ivfpq_without_polysemous_training(monkeypatch)
    monkeypatch.setattr(index_scale, "make_faiss", no_rebuilds)
    monkeypatch.setattr(index_scale.Encoder, "encode", no_rebuilds)
    assert main(argv) == 0
    assert (tmp / "out" / "steps" / "4000-hnsw.json").read_text() == before


def test_bench_index_scale_milvus_rows(scale_run):
    tmp, argv = scale_run
    out = tmp / "milvus-out"
    assert main([*argv[:argv.index("--sizes")], "--sizes", "2000", "--stores", "milvus", "--cache", str(tmp / "cache"),
                 "--latency-queries", "2", "--batch-queries", "64", "--out", str(out)]) == 0
    r = json.loads((out / "index-scale.json").read_text())
    (row,) = r["rows"]
    assert row["store"] == "milvus" and row["kind"] == "auto" and row["index_key"] == "Flat"  # exact below 100k
    assert row["queries"]["XL"]["at_1"] == 1.0 and row["queries"]["XL"]["at_10"] > 0.99
    assert row["bytes_per_vector"] > 0 and r["targets"] == [] and r["stores"]["milvus"]["sizes"] == [2000]
    assert "| Milvus Lite auto | `Flat` |" in (out / "index-scale.md").read_text()


def test_bench_index_scale_refuses_bad_options(tmp_path, capsys):
    assert main(["bench", "index", "--kinds", "flat,annoy", "--out", str(tmp_path)]) == 2
    assert "unknown index kind 'annoy'" in capsys.readouterr().err
