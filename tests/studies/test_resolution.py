"""Latency against resolution: the growth and crossover on hand-made numbers, and the study end to end on the tiny
presets (every cell timed, reused by a rerun, one-line errors)."""

import json

import pytest

from scripts.studies import resolution

TINY = ["--vit", "matvit-tiny-digits", "--mamba", "matmamba-tiny-digits", "--batches", "1,2", "--repeats", "1",
        "--repeats-batched", "1", "--min-seconds", "0"]


def test_growth_is_the_log_log_slope_over_all_points_and_between_neighbours():
    linear = resolution.growth([16, 64, 256], [2 * p for p in (16, 64, 256)])
    assert linear["slope"] == pytest.approx(1.0, abs=1e-3)
    quadratic = resolution.growth([256, 16, 64], [0.01 * p * p for p in (256, 16, 64)])  # any order
    assert quadratic["slope"] == pytest.approx(2.0, abs=1e-3)
    assert [(s["from"], s["to"]) for s in quadratic["segments"]] == [(16, 64), (64, 256)]
    bent = resolution.growth([16, 64, 256], [1.0, 4.0, 64.0])  # linear, then quadratic
    assert [s["slope"] for s in bent["segments"]] == pytest.approx([1.0, 2.0], abs=1e-3)
    assert bent["slope"] == pytest.approx(1.5, abs=1e-3)
    assert resolution.growth([16], [1.0]) == {"slope": None, "intercept": None, "segments": []}


def test_the_crossover_is_where_mamba_overtakes_and_stays_ahead():
    res = [64, 128, 224, 384]
    assert resolution.crossover(res, [1, 2, 4, 8], [2, 3, 3, 5]) == 224
    assert resolution.crossover(res, [1, 2, 4, 8], [0.5, 3, 3, 5]) == 224  # faster at 64 too, but not at 128
    assert resolution.crossover(res, [1, 2, 4, 8], [0.5, 3, 5, 9]) is None  # faster at 64 only: not overtaken
    assert resolution.crossover(res, [1, 2, 4, 8], [0.5, 1, 2, 4]) == 64
    vit = resolution.growth([16, 64, 256], [0.01 * p * p for p in (16, 64, 256)])  # 0.01 p^2 meets p at p = 100
    mamba = resolution.growth([16, 64, 256], [float(p) for p in (16, 64, 256)])
    assert resolution.projected_crossover(vit, mamba) == pytest.approx(100.0, rel=1e-3)
    assert resolution.projected_crossover(mamba, vit) is None  # the scan grows faster: the fits never meet ahead


def _rows(ms: dict[str, callable]) -> list[dict]:
    """Synthetic steps at batch 1, patch 16: ms per image of each (role, spec) as a function of the patches."""
    rows = []
    for size in (64, 128, 224, 384):
        p = (size // 16) ** 2
        models = {role: {"preset": role, "patches": p, "patch_size": 16, "chunk_size": None,
                         "specs": {spec: {"params": 1, "gflops": 1.0, "ms": ms[role](p), "ms_per_image": ms[role](p)}
                                   for spec in resolution.SPECS}} for role in resolution.ROLES}
        rows.append({"resolution": size, "batch": 1, "models": models, "load_1min_at_start": 0.1})
    return rows


def test_the_analysis_names_the_crossover_or_says_it_lies_beyond():
    within = resolution.analyse(_rows({"vit": lambda p: 0.001 * p * p, "mamba": lambda p: 0.15 * p}))
    assert [c["resolution"] for c in within["crossover"]] == [224, 224]  # 0.001 p^2 > 0.15 p from 150 patches
    assert within["growth"][0]["slope"] == pytest.approx(2.0, abs=1e-3) and len(within["growth"]) == 4
    beyond = resolution.analyse(_rows({"vit": lambda p: 0.001 * p * p, "mamba": lambda p: 2.0 * p}))
    c = beyond["crossover"][0]
    assert c["resolution"] is None and c["mamba_faster_at"] == []
    assert c["projected_patches"] == pytest.approx(2000, rel=1e-3) and c["projected_px"] == round(16 * 2000 ** 0.5)
    report = {"options": {"vit": "v", "mamba": "m"}}
    assert resolution._crossover_text(c, report).startswith("not within the measured range: v is faster at 384 px")


def test_the_study_times_every_cell_and_a_rerun_reuses_its_steps(tmp_path, monkeypatch, capsys):
    out = tmp_path / "res"
    assert resolution.main([*TINY, "--resolutions", "8,16", "--out", str(out)]) == 0
    report = json.loads((out / "resolution.json").read_text())
    cells = {(c["resolution"], c["batch"], c["model"], c["spec"]): c for c in report["cells"]}
    assert set(cells) == {(r, b, m, s) for r in (8, 16) for b in (1, 2) for m in ("vit", "mamba") for s in ("S", "XL")}
    assert all(c["ms"] > 0 and c["ms_per_image"] == pytest.approx(c["ms"] / c["batch"], abs=1e-3)
               for c in cells.values())
    assert {r: c["patches"] for (r, *_), c in cells.items()} == {8: 16, 16: 64}
    assert cells[8, 1, "vit", "XL"]["params"] > cells[8, 1, "vit", "S"]["params"] > 0
    assert cells[16, 1, "mamba", "XL"]["gflops"] > cells[8, 1, "mamba", "XL"]["gflops"] > 0
    assert len(report["growth"]) == 8 and len(report["crossover"]) == 4
    assert report["commit"] and report["machine"]["cores"] and "scripts.studies.resolution" in report["command"]
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["r16-b1.json", "r16-b2.json", "r8-b1.json",
                                                                  "r8-b2.json"]
    md = (out / "resolution.md").read_text()
    assert "## Batch 2" in md and "| 16 | 64 |" in md and "## Crossover" in md
    assert (out / "resolution.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out

    def no_timing(*args, **kwargs):
        raise AssertionError("a step measured before was timed again")

    monkeypatch.setattr(resolution, "interleaved", no_timing)
    assert resolution.main([*TINY, "--resolutions", "8,16", "--out", str(out)]) == 0
    assert json.loads((out / "resolution.json").read_text())["cells"] == report["cells"]


def test_a_bad_resolution_is_a_one_line_error(tmp_path, capsys):
    assert resolution.main([*TINY, "--resolutions", "8,9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "9 px is not a multiple of" in err and "patch size 2" in err
    assert not (tmp_path / "steps").exists()  # checked before anything is timed
    with pytest.raises(SystemExit):
        resolution.build_parser().parse_args(["--out", "o", "--resolutions", "8,x"])
    assert "comma-separated whole numbers" in capsys.readouterr().err
