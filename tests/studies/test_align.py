"""The alignment study: every option trains with its one change, measures its grid, and a rerun reuses its step."""

import json

from scripts.studies.align import AlignOptions, markdown, run, train_options


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
    cosine, baseline_cosine = train_options(opts, "cosine"), train_options(opts, "baseline-S-cosine")
    assert (cosine.head, cosine.baseline) == ("cosine", None)
    assert (baseline_cosine.head, baseline_cosine.baseline) == ("cosine", "S")
    plain = train_options(opts, "plain")
    assert (plain.distill, plain.weights, plain.mixnmatch_prob, plain.head, plain.recipe.epochs) == (
        "none", None, 0.0, None, 3)


def test_an_option_is_compared_with_the_baseline_s_of_its_own_classifier():
    def row(option, head, s, xl_s=None):
        grid = {"S": {"S": s}} | ({} if xl_s is None else {"XL": {"S": xl_s, "XL": s}})
        return {"option": option, "what": option, "epochs": 2, "settings": {"train": {"head": head}}, "grid": grid,
                "train_seconds": 60, "queries": 100, "commit": "c", "machine": {}}
    result = {"dataset": "digits", "preset": "matvit-tiny-digits", "epochs": 2, "seed": 0, "command": "c",
              "options": [row("plain", None, 0.80, 0.78), row("cosine", "cosine", 0.82, 0.81),
                          row("baseline-S", None, 0.80), row("baseline-S-cosine", "cosine", 0.84)]}
    lines = {line.split(" | ")[0]: line.split(" | ") for line in markdown(result).splitlines()}
    assert lines["| plain"][9] == "-2.00"  # 78 against plain baseline S's 80
    assert lines["| cosine"][9] == "-3.00"  # 81 against the cosine baseline S's 84
