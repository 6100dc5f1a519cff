"""`matvit bench dims`: both models trained and measured on every (query width, method, dims) cell, the funnel over
the whole gallery equal to full search, PCA for today's model only, and a rerun reusing the steps."""

from __future__ import annotations

import json

import pytest

from app.bench.dims import DimsOptions, cell, run


@pytest.fixture
def dims_result(tmp_path, small_digits):
    opts = DimsOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path / "dims", dims=[8, 16], epochs=1,
                       cache=tmp_path / "runs", latency_repeats=1)
    return opts, run(opts, log=lambda s: None)


def test_every_cell_of_both_models_is_measured(dims_result):
    opts, result = dims_result
    mat, today = result["models"]["matryoshka"], result["models"]["today"]
    assert mat["embed_dims"] == [8, 16, 32] and today["embed_dims"] == [32]
    for name, model in result["models"].items():
        methods = {"prefix": [8, 16, 32], "funnel": [8, 16]} | ({"pca": [8, 16]} if name == "today" else {})
        assert {(r["method"], r["dims"]) for r in model["rows"]} == {(m, d) for m, ds in methods.items() for d in ds}
        for query in ("S", "M", "L", "XL"):
            full = cell(model, query, "prefix", 32)
            assert 0 <= full["knn1"] <= 1 and full["encode_gflops"] > 0 and full["search_ms_b1"] > 0
            for d in (8, 16):  # a shortlist of 100 holds the whole 96-image gallery: the funnel is full search
                assert cell(model, query, "funnel", d)["knn1"] == full["knn1"]
                assert cell(model, query, "prefix", d)["search_mflops"] < full["search_mflops"]
    assert [t["target"] for t in result["targets"]] == [">= -0.3 pt", ">= -0.5 pt"]
    text = (opts.out / "dims.md").read_text()
    assert "## matryoshka (trained dims 8, 16, 32" in text and "| XL |" in text and "pca 8" in text
    assert json.loads((opts.out / "dims.json").read_text())["dims"] == [8, 16]


def test_a_rerun_reuses_the_steps(dims_result):
    opts, first = dims_result
    opts.reuse = True
    said = []
    second = run(opts, log=said.append)
    assert any("done before" in s for s in said) and not any("training" in s for s in said)
    assert second["models"] == first["models"]
