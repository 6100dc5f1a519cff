"""The backbones side by side: read from two consistency results and one speed result, nothing measured."""

from __future__ import annotations

import json

import pytest

from scripts.studies import backbones

NAMES = ("S", "M", "L", "XL")


def consistency(path, preset: str, family: str | None, knn1: float, params: int, passes: int | None) -> None:
    grid = {i: {q: {"knn1": knn1 + (0.01 if i == q else 0.0)} for q in NAMES} for i in NAMES}
    result = {"preset": preset, "seeds": [0], "epochs": 15, "dense_epochs": 5, "matvit": {"grid": grid},
              "baseline": {"grid": {"S": {"S": {"knn1": 0.5}}}},
              "cost": {"matvit": {g: {"params": params * (k + 1), "gflops": 0.01 * (k + 1)}
                                  for k, g in enumerate(NAMES)}},
              "train_seconds": {"matvit": 600.0}, "machine": {"cpu": "Some CPU"}}
    if family:
        result["family"] = family
    if passes:
        result["passes"] = {"matvit": passes}
    path.mkdir()
    (path / "consistency.json").write_text(json.dumps(result))


def speed(path, epochs: dict[str, float]) -> None:
    models = [{"model": p, "timing": {"batches": {b: {"rows": [{"spec": g, "ms": {"extracted": k + int(b)}}
                                                               for k, g in enumerate(NAMES)]} for b in ("1", "32")}}}
              for p in epochs]
    training = [{"preset": p, "epoch_s": {"joint": s}, "images": 4096} for p, s in epochs.items()]
    path.mkdir()
    (path / "speed.json").write_text(json.dumps({"models": models, "training": training, "command": "bench speed",
                                                 "machine": {"cpu": "Some CPU", "cores": 2}}))


@pytest.fixture
def inputs(tmp_path):
    consistency(tmp_path / "vit", "vit-preset", None, 0.8, 1000, None)  # a result from before families and passes
    consistency(tmp_path / "mamba", "mamba-preset", "MatMamba", 0.7, 500, 15)
    speed(tmp_path / "speed", {"vit-preset": 10.0, "mamba-preset": 20.0})
    return tmp_path


def test_the_two_backbones_are_read_side_by_side(inputs, capsys):
    out = inputs / "out"
    assert backbones.main(["--vit-result", str(inputs / "vit"), "--mamba-result", str(inputs / "mamba"),
                           "--speed", str(inputs / "speed"), "--out", str(out)]) == 0
    r = json.loads((out / "backbones.json").read_text())
    vit, mamba = r["sides"]["vit"], r["sides"]["mamba"]
    assert (vit["family"], vit["passes"], mamba["family"], mamba["passes"]) == ("MatViT", 20, "MatMamba", 15)
    assert mamba["granularities"]["S"] == {"params": 500, "gflops": 0.01, "knn1_own_index": pytest.approx(0.71),
                                           "knn1_xl_index": pytest.approx(0.7), "baseline_knn1": 0.5,
                                           "ms": {"1": 1, "32": 32}}
    assert mamba["granularities"]["M"]["baseline_knn1"] is None
    assert r["train_cost_ratio"] == pytest.approx(2.0) and r["recipe_cost_ratio"] == pytest.approx(1.5)
    md = (out / "backbones.md").read_text()
    assert ("| S | 1,000 | 500 | 0.0100 | 0.0100 | 81.00 | 71.00 | 80.00 | 70.00 | 50.00 | 50.00 | 1.00 | 1.00 | "
            "32.00 | 32.00 |") in md
    assert "| M | 2,000 | 1,000 | 0.0200 | 0.0200 | 81.00 | 71.00 | 80.00 | 70.00 |  |  | 2.00 |" in md
    assert "costs 2.00x MatViT's per image" in md and "training costs 1.50x" in md


def test_a_speed_result_without_a_preset_is_one_line(inputs, capsys):
    (inputs / "speed2").mkdir()
    (inputs / "speed2" / "speed.json").write_text(json.dumps({"models": [], "training": []}))
    assert backbones.main(["--vit-result", str(inputs / "vit"), "--mamba-result", str(inputs / "mamba"),
                           "--speed", str(inputs / "speed2"), "--out", str(inputs / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no timing and training of vit-preset" in err
    assert backbones.main(["--vit-result", str(inputs / "nowhere"), "--mamba-result", str(inputs / "mamba"),
                           "--speed", str(inputs / "speed"), "--out", str(inputs / "out")]) == 2
    assert "no consistency.json in" in capsys.readouterr().err
