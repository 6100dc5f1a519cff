"""`matvit bench index` with a Matryoshka model's prefix indexes: each is built, tuned with re-ranking and measured
like the other kinds, and checked against HNSW32 over the full vectors."""

from __future__ import annotations

import json

import pytest

from app.bench import index_measure
from app.bench.index_scale import IndexBenchError, ScaleOptions
from app.cli import main


def test_prefix_kinds_are_measured_against_hnsw_over_the_full_vectors(matryoshka_dir, tmp_path):
    argv = ["bench", "index", "--checkpoint", str(matryoshka_dir), "--dataset", "digits", "--sizes", "3000",
            "--kinds", "flat,hnsw,prefix8-flat,prefix8-hnsw,prefix16-hnswsq8,prefix16-ivfsq8", "--stores", "faiss",
            "--cache", str(tmp_path / "cache"), "--latency-queries", "8", "--batch-queries", "128",
            "--out", str(tmp_path / "out")]
    with index_measure.faiss_threads(1):
        assert main(argv) == 0
    r = json.loads((tmp_path / "out" / "index-scale.json").read_text())
    rows = {row["kind"]: row for row in r["rows"]}
    prefix_kinds = ("prefix8-flat", "prefix8-hnsw", "prefix16-hnswsq8", "prefix16-ivfsq8")
    assert [rows[k]["index_key"] for k in prefix_kinds] == [
        "Prefix8,Flat", "Prefix8,HNSW16", "Prefix16,HNSW16_SQ8", "Prefix16,IVF216,SQ8"]
    for kind in prefix_kinds:
        row = rows[kind]
        assert "rerank" in row["search_params"] and row["settings"]["rerank"]
        assert any("rerank" in p for p in row["sweep"])
        assert all(0 <= q["at_10"] <= 1 and 0 <= q["knn1"] <= 1 for q in row["queries"].values())
    assert rows["prefix16-ivfsq8"]["bytes_per_vector"] < rows["hnsw"]["bytes_per_vector"] / 3
    assert rows["prefix8-hnsw"]["hnsw_ef_construction"] == rows["prefix16-hnswsq8"]["hnsw_ef_construction"] == 40
    # 16 dims in 8-bit codes take half the bytes of 8 float dims, under the same graph
    assert rows["prefix16-hnswsq8"]["bytes_per_vector"] < rows["prefix8-hnsw"]["bytes_per_vector"]
    prefix_targets = [t for t in r["targets"] if "bytes_ratio" in t]
    assert [t["target"].split(" re-ranked")[0] for t in prefix_targets] == [
        "at 3,000, the prefix index Prefix8,HNSW16", "at 3,000, the prefix index Prefix16,HNSW16_SQ8",
        "at 3,000, the prefix index Prefix16,IVF216,SQ8"]
    assert all(isinstance(t["met"], bool) and set(t["knn1_minus_exact_pt"]) == {"S", "XL"} for t in prefix_targets)
    assert "Prefix8,HNSW16" in (tmp_path / "out" / "index-scale.md").read_text()


def test_an_unknown_kind_names_the_prefix_kinds(tmp_path):
    with pytest.raises(IndexBenchError, match="prefixD-flat, prefixD-hnsw, prefixD-hnswsq8, prefixD-ivfsq8"):
        ScaleOptions(out=tmp_path, kinds=("flat", "prefix-hnsw"))
