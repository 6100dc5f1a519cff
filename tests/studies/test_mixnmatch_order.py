"""Mix'n'Match specs narrowing with depth against their widening mirrors: the comparison on hand-made numbers,
and the benchmark on a consistency result of digits (measured once, reused, one-line errors)."""

import json

import pytest

from scripts.studies import mixnmatch_order


def _rows(points: dict[str, tuple[float, float]]) -> list[dict]:
    return [{"spec": k, "gflops": g, "knn1": a} for k, (g, a) in points.items()]


def test_each_family_is_counted_against_the_segments_and_each_pair_against_its_mirror():
    trained = {"S": 0.5, "XL": 0.9}
    ends = {"S": (1.0, 0.5), "XL": (3.0, 0.9)}  # the segment: 0.7 at 2 GFLOPs
    widening = _rows({**ends, "S,XL": (2.0, 0.68), "S,M": (1.5, 0.61)})
    narrowing = _rows({**ends, "XL,S": (2.0, 0.71), "M,S": (1.5, 0.64)})
    c = mixnmatch_order.compare(trained, widening, narrowing)
    assert c["widening"] == pytest.approx({"misses": 1, "worst_points": -2.0, "mean_points": -0.5})
    assert c["narrowing"] == pytest.approx({"misses": 0, "worst_points": 1.0, "mean_points": 2.5})
    assert c["pairs"] == pytest.approx({"count": 2, "narrowing_better": 2, "mean_gain_points": 3.0})
    assert mixnmatch_order.mirror("S,M,XL") == "XL,M,S"


def test_the_benchmark_measures_the_mirrors_of_a_consistency_steps_specs(tmp_path, digits_consistency, capsys):
    result, cache = digits_consistency
    out = tmp_path / "order"
    assert mixnmatch_order.main(["--result", str(result), "--cache", str(cache), "--out", str(out)]) == 0
    report = json.loads((out / "mixnmatch-order.json").read_text())
    step = json.loads((result / "steps" / "seed-0.json").read_text())
    seed = json.loads((out / "steps" / "seed-0.json").read_text())
    widening = [r["spec"] for r in step["mixnmatch"]]
    assert sorted(r["spec"] for r in seed["narrowing"]) == sorted(map(mixnmatch_order.mirror, widening))
    assert seed["widening"] == step["mixnmatch"] and report["seeds"] == [0]
    assert report["uniform_recheck_points"] < 1.0  # the same model and gallery as the step's grid
    assert report["mean"]["pairs"]["count"] == 31  # 35 monotone specs at depth 4, less the 4 uniform ones
    assert report["per_seed"][0]["widening"] == report["mean"]["widening"]  # one seed: its means are its own
    assert "| mean over the seeds |" in (out / "mixnmatch-order.md").read_text()
    assert (out / "mixnmatch-order.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out

    logged = []
    mixnmatch_order.run(result, cache, out, log=logged.append)
    assert logged == [f"[seed-0] done before: {out / 'steps' / 'seed-0.json'}"]


def test_a_cache_without_the_steps_matvits_is_one_line(tmp_path, capsys):
    (tmp_path / "result" / "steps").mkdir(parents=True)
    (tmp_path / "result" / "steps" / "seed-3.json").write_text(json.dumps(
        {"seed": 3, "commit": "c", "settings": {"matvit": {"dataset": "digits", "data_dir": None}}}))
    args = ["--result", str(tmp_path / "result"), "--out", str(tmp_path / "out")]
    assert mixnmatch_order.main([*args, "--cache", str(tmp_path / "empty")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none of the MatViTs" in err
    assert mixnmatch_order.main(["--result", str(tmp_path), "--cache", str(tmp_path),
                 "--out", str(tmp_path / "out")]) != 0
    assert "no consistency result there" in capsys.readouterr().err
