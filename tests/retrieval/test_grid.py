"""The cross-submodel grid and its metrics, checked against values worked out by hand."""

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from app.bench.plots import grid_png
from matvit import data
from matvit.metrics import knn_metrics
from retrieval.encoder import Encoder
from retrieval.grid import grid, grid_from_embeddings

ROOT = Path(__file__).resolve().parents[2]

# Twelve gallery items, embedded as the 12 basis vectors, so a query's scores over the gallery are its own
# coordinates: writing a query as a ranking of gallery positions fixes its neighbours exactly.
GALLERY_LABELS = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2])  # label 0: 3 items, 1: 7 items, 2: 2 items
QUERY_LABELS = np.array([0, 1, 2])
XL_RANKINGS = [
    [0, 3, 1, 4, 5, 6, 7, 8, 9, 10, 2, 11],  # label 0: hits at ranks 1 and 3 (the third 0 is at rank 11)
    [0, 1, 3, 10, 11, 4, 2, 5, 6, 7, 8, 9],  # label 1: hits at ranks 3, 6, 8, 9, 10 (two 1s beyond rank 10)
    [3, 4, 5, 6, 7, 8, 10, 0, 1, 2, 9, 11],  # label 2: hit at rank 7 only, none in the top 5
]
S_TOP1 = [1, 0, 11]  # the S query encoder's nearest gallery position for each query


def _queries(rankings: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(rankings), 12), np.float32)
    for row, ranking in zip(out, rankings, strict=True):
        row[ranking] = np.arange(12, 0, -1)
    return out


def _hand_made() -> tuple[dict, dict]:
    swap = np.eye(12, dtype=np.float32)[[3, 1, 2, 0, 4, 5, 6, 7, 8, 9, 10, 11]]  # S gallery: items 0 and 3 swapped
    s_rankings = [[top] + [g for g in range(12) if g != top] for top in S_TOP1]
    return {"S": swap, "XL": np.eye(12, dtype=np.float32)}, {"S": _queries(s_rankings), "XL": _queries(XL_RANKINGS)}


def test_grid_from_embeddings_matches_hand_computed_values():
    gallery, queries = _hand_made()
    result = grid_from_embeddings(gallery, queries, GALLERY_LABELS, QUERY_LABELS)
    xl = result["grid"]["XL"]["XL"]
    ap = [Fraction(1 + Fraction(2, 3), 3),  # (P@1 + P@3) / min(10, 3 items labelled 0)
          (Fraction(1, 3) + Fraction(2, 6) + Fraction(3, 8) + Fraction(4, 9) + Fraction(5, 10)) / 7,
          Fraction(1, 7) / 2]
    assert xl["knn1"] == pytest.approx(1 / 3)
    assert xl["top5"] == pytest.approx(2 / 3)
    assert xl["map10"] == pytest.approx(float(sum(ap) / 3))
    assert xl["agree_xl"] == 1.0
    # Index XL, queries S: S's nearest items 1 (label 0), 0 (label 0, not 1) and 11 (label 2); only the
    # second is XL's nearest.
    assert result["grid"]["XL"]["S"]["knn1"] == pytest.approx(2 / 3)
    assert result["grid"]["XL"]["S"]["agree_xl"] == pytest.approx(1 / 3)
    # Index S (items 0 and 3 swapped), queries XL: nearest items 3, 3, 0; labels 1, 1, 0; none is XL's.
    assert result["grid"]["S"]["XL"]["knn1"] == pytest.approx(1 / 3)
    assert result["grid"]["S"]["XL"]["agree_xl"] == 0.0
    assert result["grid"]["S"]["S"]["knn1"] == 1.0 and result["grid"]["S"]["S"]["agree_xl"] == 0.0
    assert "min(10" in result["map10_definition"]


def test_map_divides_by_the_relevant_gallery_items_not_the_hits_found():
    # Hits at ranks 1 and 3 of 3; the gallery holds four items labelled 0, so min(k, relevant) = 3.
    got = knn_metrics(np.array([[0, 1, 0]]), np.array([0]), np.array([0, 0, 0, 0, 1]))
    assert got["map3"] == pytest.approx((1 + 2 / 3) / 3)  # dividing by the 2 hits found would give 0.833
    # Fewer relevant items than k: divide by the relevant count (one item labelled 1, found at rank 2).
    assert knn_metrics(np.array([[0, 1, 0]]), np.array([1]), np.array([0, 0, 0, 0, 1]))["map3"] == pytest.approx(0.5)
    # A label the gallery does not hold scores 0.
    assert knn_metrics(np.array([[0, 1, 0]]), np.array([7]), np.array([0, 0, 0, 0, 1]))["map3"] == 0.0


def test_grid_keeps_the_asked_rows_and_columns_and_draws_a_heatmap(trained_dir, tmp_path):
    encoder = Encoder.load(trained_dir)
    gallery, queries = data.load("digits", "train", 8, 1), data.load("digits", "test", 8, 1)
    result = grid(encoder, gallery, queries, [encoder.spec("XL")], [encoder.spec("S"), encoder.spec("M")])
    assert list(result["grid"]) == ["XL"] and list(result["grid"]["XL"]) == ["S", "M"]
    g = {"XL": encoder.encode(gallery.images, "XL")}
    q = {s: encoder.encode(queries.images, s) for s in ("S", "M", "XL")}
    want = grid_from_embeddings(g, q, gallery.labels, queries.labels)["grid"]["XL"]
    for spec in ("S", "M"):
        assert result["grid"]["XL"][spec] == pytest.approx(want[spec], abs=1e-6)
    png = grid_png(result, tmp_path / "grid.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    json.dumps(result)  # the CLI writes it as JSON


def test_library_modules_do_not_import_matplotlib():
    """Plotting lives in app.bench: importing any module of matvit/ or retrieval/ leaves matplotlib unloaded."""
    script = (
        "import importlib, pkgutil, sys\n"
        "names = [f'{p}.{m.name}' for p in ('matvit', 'retrieval') for m in pkgutil.iter_modules([p])]\n"
        "assert 'retrieval.grid' in names and 'matvit.metrics' in names, names\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "    assert 'matplotlib' not in sys.modules, name\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
