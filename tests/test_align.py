"""The alignment study: every option trains with its one change, measures its grid, and a rerun reuses its step."""

import json

from app.bench.align import AlignOptions, run, train_options


def test_each_option_is_measured_once_and_reported(tmp_path):
    opts = AlignOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path / "out", epochs=4,
                        options=["plain", "relational", "baseline-S"], mixnmatch=["plain"], cache=tmp_path / "runs")
    result = run(opts, log=lambda s: None)
    rows = {r["option"]: r for r in result["options"]}
    assert list(rows) == ["plain", "relational", "baseline-S"]
    assert set(rows["plain"]["grid"]) == {"S", "M", "L", "XL"} and set(rows["baseline-S"]["grid"]) == {"S"}
    assert 0.3 < rows["plain"]["grid"]["XL"]["S"] <= 1.0  # chance is 0.1
    assert len(rows["plain"]["mixnmatch"]) == 35 and "mixnmatch" not in rows["relational"]
    saved = json.loads((tmp_path / "runs" / "relational" / "config.json").read_text())["train"]
    assert saved["distill"] == "relational" and saved["recipe"]["epochs"] == 4
    report = (tmp_path / "out" / "align.md").read_text()
    assert "| relational |" in report and "layers at S (rows) and at XL (columns)" in report

    logged = []
    again = run(opts, log=logged.append)
    assert len(logged) == 3 and all("done before" in line for line in logged)
    assert again["options"] == result["options"]


def test_longer_doubles_the_epochs_and_options_change_one_thing():
    opts = AlignOptions(dataset="digits", preset="matvit-tiny-digits", out="x", epochs=3)
    assert train_options(opts, "longer").recipe.epochs == 6
    assert train_options(opts, "small-weights").weights == [2.0, 1.5, 1.25, 1.0]
    assert train_options(opts, "mixnmatch").mixnmatch_prob == 0.5
    assert train_options(opts, "baseline-S").baseline == "S"
    plain = train_options(opts, "plain")
    assert (plain.distill, plain.weights, plain.mixnmatch_prob, plain.recipe.epochs) == ("none", None, 0.0, 3)
