"""`matvit bench speed`: report layout, targets, resumable steps and the CLI registration (no timing asserted)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from app.bench import speed, speed_models, speed_report
from app.cli import main
from matvit import checkpoint
from matvit import spec as specs
from matvit.errors import UserError
from matvit.model import MatViT
from matvit.registry import get_preset

TINY = "matvit-tiny-digits"
FAMILIES = {TINY: "MatViT", "matmamba-tiny-digits": "MatMamba"}


def tiny_options(out: Path, preset: str = TINY, **changes) -> speed.SpeedOptions:
    base = dict(out=out, presets=(preset,), dataset="digits", threads=1, batch=4, repeats=1, repeats_batched=1,
                mixes=2, index_images=40, index_batch=16, index_repeats=1, train_presets=(preset,), train_images=32,
                train_batch=16, train_repeats=1, max_load=None, log=lambda s: None)
    return speed.SpeedOptions(**{**base, **changes})


@pytest.fixture(scope="module", params=list(FAMILIES))
def finished(request, tmp_path_factory) -> tuple[Path, dict, str]:
    """The whole benchmark on a tiny preset of each family."""
    out = tmp_path_factory.mktemp("speed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speed, "MIN_SAMPLE_SECONDS", 0.0)
        result = speed.run(tiny_options(out, request.param))
    return out, result, request.param


def test_report_has_every_section_and_ratio(finished):
    out, r, preset = finished
    assert json.loads((out / "speed.json").read_text()) == r
    assert r["threads"] == 1 and r["torch"] == torch.__version__ and r["commit"] and r["machine"]["cpu"]
    assert r["command"] and r["retriever_uses"] == "extracted"
    (model,) = r["models"]
    assert model["model"] == preset
    timing = model["timing"]
    assert timing["family"] == FAMILIES[preset] and 0.5 < timing["nested_share_of_flops"] < 1
    assert set(timing["batches"]) == {"1", "4"}
    for b in timing["batches"].values():
        names = [row["spec"] for row in b["rows"]]
        assert {"S", "M", "L"} <= set(names) and names[-1] == "XL" and len(names) == 6  # S, M, L, 2 mixes, XL
        for row in b["rows"]:
            for key in ("nested", "extracted"):
                assert row["latency_ratio"][key] > 0 and row["throughput_vs_plain"][key] > 0
                assert row["deviation"][key] == pytest.approx(row["latency_ratio"][key] / row["flop_ratio"] - 1,
                                                              abs=1e-3)
            assert set(row["ms"]) == {"nested", "extracted", "plain"}
            assert 0 < row["flop_ratio"] <= 1
        xl = b["rows"][-1]
        assert xl["flop_ratio"] == 1.0 and xl["latency_ratio"] == {"nested": 1.0, "extracted": 1.0}
        assert {"fixed_ms", "ms_per_gflop", "fixed_share_of_xl"} <= set(b["fit_extracted"])
    index = model["index"]
    assert index["images"] == 40 and index["ratio"] == pytest.approx(
        index["build_images_per_s"] / index["forward_images_per_s"], rel=0.01)
    (train,) = r["training"]
    assert set(train["epoch_s"]) == {"joint", "S", "M", "L", "XL"} and train["steps_per_epoch"] == 2
    assert train["family"] == FAMILIES[preset]
    # epoch_s and baselines_sum_s are rounded to 1 ms; the ratio is computed before rounding
    matvit, together = train["epoch_s"]["joint"], train["baselines_sum_s"]
    assert (matvit - 5e-4) / (together + 5e-4) - 1e-4 <= train["ratio"] <= (matvit + 5e-4) / (together - 5e-4) + 1e-4


def test_targets_are_evaluated(finished):
    _, r, _ = finished
    by_section = {s: [t for t in r["targets"] if t["section"] == s] for s in (1, 2, 5)}
    assert len(by_section[1]) == 2 and len(by_section[2]) == 4 and len(by_section[5]) == 2
    for t in by_section[1]:
        assert t["met"] == (min(t["measured"].values()) >= speed_report.NESTING_TARGET)
        assert "nested XL" in t["measured"] and "extracted S" in t["measured"]
    for t in by_section[2]:
        tol = 0.25 if t["batch"] == 1 else 0.15
        assert t["met"] == all(abs(v) <= tol for v in t["deviation"].values()) and "XL" not in t["deviation"]
    index, train = by_section[5]
    assert index["met"] == (index["ratio"] >= 0.9) and train["met"] == (train["ratio"] <= 1.0)


def test_markdown_written(finished):
    out, r, preset = finished
    md = (out / "speed.md").read_text()
    for text in ("# Speed", "Command: `", "Commit: `", "torch threads", f"## {preset}", FAMILIES[preset], "### Batch 1",
                 "### Batch 4", "Indexing:", "## Training", "## Targets", "## Reading", "noisy on a shared CPU"):
        assert text in md
    assert md.count("| `") == 12  # one row per spec and batch
    assert (out / "speed.png").stat().st_size > 1000


def test_steps_resume_without_measuring_again(finished, monkeypatch):
    out, r, preset = finished
    assert sorted(p.name for p in (out / "steps").glob("*.json")) == [
        f"{preset}-index.json", f"{preset}-timing.json", f"train-{preset}.json"]

    def no_timing(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(speed, "interleaved", no_timing)
    again = speed.run(tiny_options(out, preset))
    assert again["models"] == r["models"] and again["training"] == r["training"]
    assert again["load_check"] == r["load_check"] and "load_1min" in again["load_check"]  # kept by the first step
    with pytest.raises(AssertionError, match="measured again"):  # other settings: that step is measured afresh
        speed.run(tiny_options(out, preset, repeats=2))


def test_checkpoint_is_timed_and_trains_its_preset(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = get_preset(TINY).model
    cfg.num_classes = 10
    checkpoint.save(MatViT(cfg), tmp_path / "ckpt", preset=TINY, dataset="digits")
    monkeypatch.setattr(speed, "MIN_SAMPLE_SECONDS", 0.0)
    r = speed.run(tiny_options(tmp_path / "out", presets=(), checkpoint=tmp_path / "ckpt", dataset=None,
                               train_presets=None, mixes=1))
    (model,) = r["models"]
    assert model["model"] == f"checkpoint:{tmp_path / 'ckpt'}" and model["index"]["dataset"] == "digits"
    assert [t["preset"] for t in r["training"]] == [TINY]
    assert all(t.get("report_only") for t in r["targets"] if t["section"] == 2)
    assert any("trained small model" in line for line in r["findings"])


def test_mixes_are_monotone_and_spread_between_s_and_xl():
    cfg = get_preset("matvit-ti16").model
    model = MatViT(cfg)
    chosen = speed_models.mixes(model, 4)
    flops = [model.forward_flops(s) for s in chosen]
    lo, hi = (model.forward_flops(g) for g in ("S", "XL"))
    monotone = {s.text for s in specs.monotone(cfg)}
    assert len({s.text for s in chosen}) == 4 and all(s.text in monotone and not s.uniform for s in chosen)
    assert flops == sorted(flops) and lo < flops[0] and flops[-1] < hi
    assert [s.text for s in speed_models.timed_specs(model, 4)][-1] == "XL"


def test_options_are_checked(tmp_path):
    with pytest.raises(speed.SpeedBenchError, match="--preset"):
        speed.SpeedOptions(out=tmp_path)
    with pytest.raises(UserError, match="unknown preset"):
        speed.SpeedOptions(out=tmp_path, presets=("matvit-nope",))
    with pytest.raises(speed.SpeedBenchError, match="no checkpoint"):
        speed.SpeedOptions(out=tmp_path, checkpoint=tmp_path / "missing")
    with pytest.raises(speed.SpeedBenchError, match="--batch"):
        speed.SpeedOptions(out=tmp_path, presets=(TINY,), batch=1)


def test_add_parser_registers_the_subcommand(tmp_path):
    parser = argparse.ArgumentParser()
    speed.add_parser(parser.add_subparsers(dest="bench_command"))
    args = parser.parse_args(["speed", "--preset", "matvit-ti16", "--preset", "matvit-s16", "--out", str(tmp_path),
                              "--threads", "2"])
    assert args.func is speed.cmd_speed and args.preset == ["matvit-ti16", "matvit-s16"] and args.threads == 2
    assert args.checkpoint is None and args.batch == 32 and args.max_load == 2.5
    assert main(["bench", "speed", "--out", str(tmp_path)]) == 2  # neither --preset nor --checkpoint: one line


def test_wait_for_quiet_records_the_load(monkeypatch):
    loads = iter([3.0, 1.0])
    monkeypatch.setattr(speed, "load_average", lambda: next(loads))
    monkeypatch.setattr(speed.time, "sleep", lambda s: None)
    got = speed.wait_for_quiet(2.5, 1200, lambda s: None)
    assert got["load_1min"] == 1.0 and not got["over_limit"] and got["max_load"] == 2.5
