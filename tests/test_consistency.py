"""The cross-consistency benchmark on digits: the claim itself, and the documented JSON layout."""

import dataclasses
import json

from matvit.config import get_preset
from retrieval.consistency import BenchOptions, _run_matches, pareto_front, run


def test_matvit_shares_a_space_and_baselines_do_not(tmp_path):
    result = run(BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path, epochs=6,
                              cache=tmp_path / "runs", latency_repeats=2), log=lambda s: None)
    matvit, baseline = result["matvit"]["grid"], result["baseline"]["grid"]
    # The claim: an XL index queried with S works for MatViT, and is near chance for separate models.
    assert matvit["XL"]["S"]["knn1"] > 0.5
    assert baseline["XL"]["S"]["knn1"] < 0.3
    assert matvit["XL"]["S"]["knn1"] > baseline["XL"]["S"]["knn1"] + 0.3

    saved = json.loads((tmp_path / "consistency.json").read_text())
    assert {"dataset", "preset", "epochs", "command", "commit", "machine", "matvit", "baseline", "mixnmatch",
            "train_seconds", "measure_seconds"} <= set(saved)
    for family in ("matvit", "baseline"):
        assert list(saved[family]["grid"]) == ["S", "M", "L", "XL"]
        assert set(saved[family]["grid"]["XL"]["S"]) == {"knn1", "top5", "map10", "agree_xl"}
    assert len(saved["mixnmatch"]) == 35  # C(4+3, 3) monotone specs at depth 4
    assert {"spec", "params", "gflops", "latency_ms_b1", "knn1"} <= set(saved["mixnmatch"][0])
    assert set(saved["train_seconds"]["baseline"]) == {"S", "M", "L", "XL"}
    assert len(saved["targets"]) == 5
    for name in ("consistency.md", "grid.png", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0

    reused = run(BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path, epochs=6, reuse=True,
                              cache=tmp_path / "runs", latency_repeats=2), log=lambda s: None)
    assert reused["matvit"]["grid"] == result["matvit"]["grid"]
    opts = BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path, reuse=True)
    recipe = dataclasses.replace(get_preset("matvit-tiny-digits").recipe, epochs=6)
    assert _run_matches(tmp_path / "runs" / "matvit", opts, None, recipe)
    assert not _run_matches(tmp_path / "runs" / "matvit", opts, None, dataclasses.replace(recipe, lr=recipe.lr / 2))


def test_pareto_front():
    assert pareto_front([(1, 0.5), (2, 0.4), (3, 0.7), (2, 0.6)]) == [(1, 0.5), (2, 0.6), (3, 0.7)]
