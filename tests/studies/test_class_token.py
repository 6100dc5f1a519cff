"""Where MatMamba's summary token sits: every summary trains, is measured once and reported; a rerun reuses the
trainings and the steps; the finding comes from the numbers; a MatViT preset is a one-line error."""

import json

import pytest

from matvit import checkpoint, train
from matvit.registry import PRESETS
from scripts.studies import class_token

ARGS = ["--preset", "matmamba-tiny-digits", "--dataset", "digits", "--epochs", "1"]


def test_every_summary_is_trained_measured_and_reused(tmp_path, small_digits, capsys, monkeypatch):
    cache, out = tmp_path / "runs", tmp_path / "out"
    argv = [*ARGS, "--cache", str(cache), "--out", str(out)]
    assert class_token.main(argv) == 0
    report = json.loads((out / "class-token.json").read_text())
    assert list(report["summaries"]) == ["end", "middle", "mean"] and report["default"] == "end"
    for summary, row in report["summaries"].items():
        for key in ("top1", "knn1", "knn1_xl_index"):
            assert list(row[key]) == ["S", "M", "L", "XL"]
            assert all(0.0 <= v <= 1.0 for v in row[key].values())
        assert row["knn1_xl_index"]["XL"] == pytest.approx(row["knn1"]["XL"], abs=0.05)  # XL on XL: the diagonal
        assert json.loads((cache / summary / "config.json").read_text())["model"]["summary"] == summary
        assert row["train_seconds"] > 0 and row["epochs"] == 1
    assert (report["summaries"]["middle"]["patches_seen"], report["summaries"]["middle"]["patches"]) == (8, 16)
    md = (out / "class-token.md").read_text()
    assert "| `middle` | S |" in md and "| `end` (default) |" in md and report["finding"] in md
    assert (out / "class-token.png").stat().st_size > 0
    assert not [name for name in PRESETS if "-summary-" in name]  # the variants are registered only while it runs
    assert checkpoint.load(cache / "middle")[0].cls_index == 8  # a run loads without its variant preset
    assert "wrote" in capsys.readouterr().out

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")
    monkeypatch.setattr(train.Trainer, "run", no_training)
    assert class_token.main(argv) == 0  # every step saved
    assert capsys.readouterr().out.count("done before") == 3
    for step in (out / "steps").glob("*.json"):
        step.unlink()
    assert class_token.main(argv) == 0  # measured again from the cached trainings
    again = json.loads((out / "class-token.json").read_text())
    assert again["summaries"]["mean"]["knn1_xl_index"] == report["summaries"]["mean"]["knn1_xl_index"]


def test_the_finding_names_the_best_summary_by_its_margin():
    def row(xl, s, seen=16):
        return {"knn1_xl_index": {"S": s, "M": s, "L": xl, "XL": xl}, "patches_seen": seen, "patches": 16}
    rows = {"end": row(0.880, 0.850), "middle": row(0.850, 0.852, seen=8), "mean": row(0.885, 0.840)}
    line = class_token.finding(rows, "end")
    assert "at XL `mean` (88.50), 0.50 points over `end`" in line
    assert "at S `middle` (85.20), 0.20 points over `end`" in line
    assert "first 8 of 16 patches: 3.50 points under the best at XL" in line
    assert "over the default" not in line
    line = class_token.finding({"middle": rows["middle"], "mean": rows["mean"], "end": row(0.80, 0.80)}, "end")
    assert "at XL `mean` (88.50), 3.50 points over `middle` and 8.50 over the default `end`" in line


def test_a_matvit_preset_and_a_bad_summary_are_refused(tmp_path, capsys):
    argv = ["--preset", "matvit-tiny-digits", "--dataset", "digits", "--cache", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out")]
    assert class_token.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a MatMamba" in err and "matmamba-small-fmnist" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        class_token.build_parser().parse_args(["--summaries", "end,first"])
    assert class_token.build_parser().parse_args(["--summaries", "end,mean"]).summaries == ["end", "mean"]
