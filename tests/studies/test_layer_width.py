"""What one layer's width is worth: the per-layer points on hand-made numbers, and the benchmark on a consistency
result of digits (measured once, reused, one-line errors)."""

import json

import pytest

from scripts.studies import layer_width


def test_each_layer_is_scored_against_the_granularity_it_departs_from():
    trained = {"S": 0.50, "M": 0.55, "XL": 0.60}
    knn1 = {"XL,S,S": 0.56, "S,XL,S": 0.50, "S,S,XL": 0.49, "S,XL,XL": 0.52, "XL,S,XL": 0.59, "XL,XL,S": 0.605}
    points = layer_width.per_layer(trained, [{"spec": k, "knn1": v} for k, v in knn1.items()])
    assert points["widened"] == pytest.approx([6.0, 0.0, -1.0])
    assert points["narrowed"] == pytest.approx([-8.0, -1.0, 0.5])
    assert points["gap"] == pytest.approx(10.0) and (points["smallest"], points["largest"]) == ("S", "XL")

    rows = [{"seed": s, "trained": trained, "one_layer": [{"spec": k, "knn1": v} for k, v in knn1.items()],
             "settings": {}, "commit": "c", "command": "m", "machine": {}} for s in (0, 1)]
    combined = layer_width.combine(rows)
    assert combined["mean"]["widened"][0] == {"mean": 6.0, "sd": 0.0}
    rows[1]["one_layer"][0]["knn1"] = 0.54  # seed 1 gains 4 points at layer 1
    combined = layer_width.combine(rows)
    assert combined["mean"]["widened"][0] == pytest.approx({"mean": 5.0, "sd": 1.41}, abs=0.01)
    assert [s["widened"][0] for s in combined["per_seed"]] == pytest.approx([6.0, 4.0])


def test_the_benchmark_measures_every_one_layer_spec_of_a_steps_matvit(tmp_path, digits_consistency, capsys):
    result, cache = digits_consistency
    out = tmp_path / "layers"
    assert layer_width.main(["--result", str(result), "--cache", str(cache), "--out", str(out)]) == 0
    report = json.loads((out / "layer-width.json").read_text())
    seed = json.loads((out / "steps" / "seed-0.json").read_text())
    assert [r["spec"] for r in seed["one_layer"]][:2] == ["XL,S,S,S", "S,XL,S,S"] and len(seed["one_layer"]) == 8
    assert len(report["mean"]["widened"]) == len(report["mean"]["narrowed"]) == 4  # the tiny preset's depth
    assert report["per_seed"][0]["widened"] == [m["mean"] for m in report["mean"]["widened"]]  # one seed
    assert "| 1 |" in (out / "layer-width.md").read_text()
    assert (out / "layer-width.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out

    logged = []
    layer_width.run(result, cache, out, log=logged.append)
    assert logged == [f"[seed-0] done before: {out / 'steps' / 'seed-0.json'}"]
    assert layer_width.main(["--result", str(tmp_path), "--cache", str(cache),
                 "--out", str(tmp_path / "out")]) != 0
    assert "no consistency result there" in capsys.readouterr().err
