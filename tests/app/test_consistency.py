"""The cross-consistency benchmark: the claim itself on digits, the documented JSON layout, the five
targets on hand-made results, and which cached trainings `--reuse` may take."""

import copy
import itertools
import json
from pathlib import Path

import pytest

from app.bench import consistency, consistency_report, steps
from app.bench.consistency import (
    BenchOptions,
    baselines_measured,
    options_json,
    run,
    step_settings,
    train_cached,
    train_options,
)
from app.bench.consistency_report import targets
from app.bench.plots import pareto_front
from app.cli import main
from matvit.train import Trainer, TrainOptions, finished_run, option_differences
from scripts.studies.kept import step_matvit


def test_matvit_shares_a_space_and_baselines_do_not(tmp_path, monkeypatch):
    # Each provenance record sees a new commit, as when the checkout moves on during a long run.
    record, commits = consistency.provenance.record, itertools.count()
    monkeypatch.setattr(consistency.provenance, "record", lambda *a: {**record(*a), "commit": f"c{next(commits)}"})
    result = run(BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path, epochs=6,
                              cache=tmp_path / "runs", latency_repeats=2), log=lambda s: None)
    matvit, baseline = result["matvit"]["grid"], result["baseline"]["grid"]
    # The claim: an XL index queried with S works for MatViT, and is near chance for separate models.
    assert matvit["XL"]["S"]["knn1"] > 0.5
    assert baseline["XL"]["S"]["knn1"] < 0.3
    assert matvit["XL"]["S"]["knn1"] > baseline["XL"]["S"]["knn1"] + 0.3

    saved = json.loads((tmp_path / "consistency.json").read_text())
    assert {"dataset", "preset", "epochs", "seeds", "command", "commit", "machine", "matvit", "baseline", "mixnmatch",
            "train_seconds", "measure_seconds", "runs"} <= set(saved)
    for family in ("matvit", "baseline"):
        assert list(saved[family]["grid"]) == ["S", "M", "L", "XL"]
        assert set(saved[family]["grid"]["XL"]["S"]) == {"knn1", "top5", "map10", "agree_xl", "knn1_std", "n"}
        assert "min(10" in saved[family]["map10_definition"]
    assert len(saved["mixnmatch"]) == 35  # C(4+3, 3) monotone specs at depth 4
    assert {"spec", "params", "gflops", "knn1"} <= set(saved["mixnmatch"][0])
    assert set(saved["train_seconds"]["baseline"]) == {"S", "M", "L", "XL"}
    assert saved["passes"] == {"matvit": 6, "baseline": {"S": 6, "M": 6, "L": 6, "XL": 6}}  # equal training
    assert saved["runs"][0]["passes"] == saved["passes"]
    assert "Every model makes the same 6 passes" in (tmp_path / "consistency.md").read_text()
    # Independent baselines: each its own seed, none the MatViT's.
    assert saved["runs"][0]["baseline_seeds"] == {"S": 1, "M": 2, "L": 3, "XL": 4}
    assert saved["targets"] == targets(saved)
    assert (saved["epochs"], saved["dense_epochs"], saved["augment"]) == (6, 0, "none")  # the recipe as it ran
    assert "# Cross-consistency: digits, matvit-tiny-digits, 6 epochs" in (tmp_path / "consistency.md").read_text()
    warmed = consistency_report.markdown({**saved, "dense_epochs": 2})
    assert "2 dense + 6 joint epochs, seed(s) 0" in warmed.splitlines()[0] and "trained for 2 epochs" in warmed
    for name in ("consistency.md", "grid.png", "pareto.png", "steps/seed-0.json"):
        assert (tmp_path / name).stat().st_size > 0
    # Baselines trained in the step are recorded at the step's own commit, not reported as taken from elsewhere.
    assert saved["runs"][0]["baseline_commit"] == saved["runs"][0]["commit"]
    assert "Baselines measured before" not in (tmp_path / "consistency.md").read_text()
    # Each training records the CPU it ran on (here, the measuring machine's).
    trained = saved["runs"][0]["trained_on"]
    assert trained["matvit"]["cpu"] == saved["machine"]["cpu"] and set(trained["baseline"]) == {"S", "M", "L", "XL"}
    assert f"Trained on: {saved['machine']['cpu']} (seed 0 MatViT, seed 0 baseline S" in (
        tmp_path / "consistency.md").read_text()

    # A second seed with baseline S only: seed 0's step is reused whole, seed 1 trains two models.
    logged = []
    two = run(BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path, epochs=6, reuse=True,
                           cache=tmp_path / "runs", latency_repeats=2, seeds=[0, 1], baselines=["S"]),
              log=logged.append)
    assert any(line.startswith("[seed 0] measured before") for line in logged)
    assert sum(line.startswith("training") for line in logged) == 2
    runs = {r["seed"]: r for r in two["runs"]}
    assert runs[1]["baseline_seeds"] == {"S": 5}
    for i, q in (("XL", "S"), ("S", "S"), ("L", "M")):
        cells = [runs[s]["matvit"]["grid"][i][q]["knn1"] for s in (0, 1)]
        assert two["matvit"]["grid"][i][q]["knn1"] == pytest.approx(sum(cells) / 2)
        assert two["matvit"]["grid"][i][q]["knn1_std"] == pytest.approx(abs(cells[0] - cells[1]) / 2 ** 0.5)
        assert two["matvit"]["grid"][i][q]["n"] == 2
    assert two["baseline"]["grid"]["S"]["S"]["n"] == 2 and two["baseline"]["grid"]["M"]["M"]["n"] == 1
    assert [t["met"] for t in runs[1]["targets"]][0] is None  # no M, L, XL baselines for seed 1
    assert "± " in (tmp_path / "consistency.md").read_text()

    # The options the benchmark trains with, as written by the real training into config.json.
    ran = tmp_path / "runs" / "seed-0" / "matvit"
    assert finished_run(ran, TrainOptions("matvit-tiny-digits", "digits", tmp_path, epochs=6))
    assert not finished_run(ran, TrainOptions("matvit-tiny-digits", "digits", tmp_path, epochs=6, mode="sample"))


def _fake_run(path, opts: TrainOptions, logged_epochs: int | None = None, finished: bool = True):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"train": opts.to_dict()}))
    (path / "train_log.jsonl").write_text("{}\n" * (opts.recipe.epochs if logged_epochs is None else logged_epochs))
    if finished:
        (path / "eval.json").write_text("{}")


BENCH = {"preset": "matvit-tiny-digits", "dataset": "digits", "epochs": 3, "seed": 0}


@pytest.mark.parametrize("cached", [
    {"mode": "sample"}, {"distill": "logits"}, {"mixnmatch_prob": 0.5}, {"weights": [1.0, 1.0, 1.0, 2.0]},
    {"lr": 5e-4}, {"batch_size": 64}, {"epochs": 4}, {"seed": 1}, {"baseline": "S"}, {"dataset": "fashion-mnist"},
])
def test_reuse_refuses_a_run_trained_with_any_other_option(tmp_path, cached):
    _fake_run(tmp_path / "run", TrainOptions(**{**BENCH, **cached}, out=tmp_path / "run"))
    assert not finished_run(tmp_path / "run", TrainOptions(**BENCH, out=tmp_path / "run"))


def test_reuse_takes_a_finished_run_with_the_same_options_wherever_it_was_written(tmp_path):
    _fake_run(tmp_path / "a", TrainOptions(**BENCH, out=tmp_path / "elsewhere"))
    assert finished_run(tmp_path / "a", TrainOptions(**BENCH, out=tmp_path / "a"))
    _fake_run(tmp_path / "b", TrainOptions(**BENCH, out=tmp_path / "b"), finished=False)
    assert not finished_run(tmp_path / "b", TrainOptions(**BENCH, out=tmp_path / "b"))
    _fake_run(tmp_path / "c", TrainOptions(**BENCH, out=tmp_path / "c"), logged_epochs=2)
    assert not finished_run(tmp_path / "c", TrainOptions(**BENCH, out=tmp_path / "c"))
    assert not finished_run(tmp_path / "missing", TrainOptions(**BENCH, out=tmp_path / "missing"))


def test_reuse_takes_a_run_that_recorded_no_warm_up_as_0():
    opts = TrainOptions(**BENCH, out="run", baseline="XL", dense_epochs=0)
    older = opts.to_dict() | {"dense_epochs": 0}  # how runs recorded a turned-off warm-up before they wrote None
    assert opts.to_dict()["dense_epochs"] is None and not option_differences(older, opts.to_dict())
    assert option_differences(older, TrainOptions(**BENCH, out="run", dense_epochs=5).to_dict())


def test_reuse_compares_the_recipe_that_ran_not_how_it_was_asked_for():
    unpinned = {k: v for k, v in BENCH.items() if k != "epochs"}
    by_default = TrainOptions(**unpinned, out="run").to_dict()  # the preset's epochs, `epochs` left unset
    epochs = by_default["recipe"]["epochs"]
    assert not option_differences(by_default, TrainOptions(**unpinned, out="run", epochs=epochs).to_dict())
    assert option_differences(by_default, TrainOptions(**unpinned, out="run", epochs=epochs + 1).to_dict()) == [
        f"recipe.epochs (saved {epochs}, given {epochs + 1})"]


def test_reuse_continues_an_interrupted_training_of_the_same_options(tmp_path, monkeypatch):
    opts = TrainOptions(**{**BENCH, "epochs": 1}, out=tmp_path / "run")
    seconds = train_cached(opts, log=lambda s: None)
    (tmp_path / "run" / "eval.json").unlink()  # as if stopped after its last epoch, before evaluating
    monkeypatch.setattr(Trainer, "train_epoch", lambda self: pytest.fail("trained again"))
    logged = []
    assert train_cached(opts, log=logged.append) == seconds and logged[0].startswith("continuing run")
    assert (tmp_path / "run" / "eval.json").is_file()
    other = TrainOptions(**{**BENCH, "epochs": 1, "seed": 1}, out=tmp_path / "run")
    with pytest.raises(pytest.fail.Exception, match="trained again"):  # other options start over
        train_cached(other, log=lambda s: None)


def test_reuse_continues_after_a_finished_dense_warm_up(tmp_path, monkeypatch, small_digits):
    opts = TrainOptions(**{**BENCH, "epochs": 1}, dense_epochs=1, out=tmp_path / "run")
    train_cached(opts, log=lambda s: None)
    for name in ("training.pt", "eval.json", "train_log.jsonl"):  # as if stopped before the joint epochs began
        (tmp_path / "run" / name).unlink()
    trained = []
    original = Trainer.train_epoch
    monkeypatch.setattr(Trainer, "train_epoch", lambda self: (trained.append(self.out.name), original(self))[1])
    logged = []
    train_cached(opts, log=logged.append)
    assert logged[0].startswith("continuing run") and trained == ["run"]  # the joint epoch, not the warm-up again
    assert any(line.startswith("reusing the finished dense warm-up") for line in logged)


def test_a_mixnmatch_run_starts_from_the_same_seeds_finished_dense_warm_up(tmp_path, monkeypatch, small_digits):
    plain = TrainOptions(**{**BENCH, "epochs": 1}, dense_epochs=1, out=tmp_path / "seed-0" / "matvit")
    train_cached(plain, log=lambda s: None)
    mixed = TrainOptions(**{**BENCH, "epochs": 1}, dense_epochs=1, mixnmatch_prob=0.5,
                         out=tmp_path / "seed-0" / "matvit-mixnmatch-0.5")
    trained = []
    original = Trainer.train_epoch
    monkeypatch.setattr(Trainer, "train_epoch", lambda self: (trained.append(self.out.name), original(self))[1])
    logged = []
    train_cached(mixed, log=logged.append)
    assert trained == ["matvit-mixnmatch-0.5"]  # its joint epoch only: the warm-up was copied, not trained again
    assert logged[0] == f"copying the finished dense warm-up {plain.out / 'dense'} into {mixed.out / 'dense'}"
    assert finished_run(mixed.out, mixed)
    other_seed = TrainOptions(**{**BENCH, "epochs": 1, "seed": 1}, dense_epochs=1, mixnmatch_prob=0.5,
                              out=tmp_path / "seed-0" / "matvit-seed-1")
    train_cached(other_seed, log=logged.append)
    assert trained[-2:] == ["dense", "matvit-seed-1"]  # a warm-up of other options is not taken


def test_an_unset_option_matches_a_step_written_before_it_existed(tmp_path):
    opts = BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path)
    given = {"matvit": options_json(train_options(opts, 0, None))}
    assert given["matvit"]["augment"] is None
    older = {"matvit": {k: v for k, v in given["matvit"].items() if k != "augment"}}
    assert steps.same_settings(older, given)
    plain = BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path, augment="crop")
    assert not steps.same_settings(older, {"matvit": options_json(train_options(plain, 0, None))})
    assert train_options(plain, 2, "S").out == Path("runs/consistency/matvit-tiny-digits-digits-augment-crop/seed-2/"
                                                     "baseline-S")


@pytest.mark.parametrize("recipe, name", [({"mixnmatch_prob": 0.5}, "matvit-mixnmatch-0.5"),
                                          ({"weights": [2.0, 1.5, 1.25, 1.0]}, "matvit-weights-2-1.5-1.25-1")])
def test_a_matvit_recipe_trains_its_own_matvit_beside_the_same_baselines(tmp_path, recipe, name):
    plain = BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path)
    other = BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path, **recipe)
    matvit = train_options(other, 1, None)
    assert all(getattr(matvit, k) == v for k, v in recipe.items()) and matvit.out.name == name
    assert matvit.out.parent == train_options(plain, 1, None).out.parent
    step = {"seed": 1, "settings": {"matvit": options_json(matvit)}}
    assert step_matvit(step, matvit.out.parent.parent) == matvit.out  # where the benches on kept MatViTs look
    baseline = train_options(other, 1, "S")
    assert baseline == train_options(plain, 1, "S") and baseline.mixnmatch_prob == 0 and baseline.weights is None
    assert not steps.same_settings({"matvit": options_json(train_options(plain, 1, None))},
                                   {"matvit": options_json(matvit)})


def test_another_matvit_recipe_takes_the_baselines_measured_before(tmp_path, small_digits):
    common = dict(dataset="digits", preset="matvit-tiny-digits", epochs=1, baselines=["S"], latency_repeats=1)
    first = run(BenchOptions(**common, out=tmp_path / "plain", cache=tmp_path / "runs"), log=lambda s: None)
    logged = []
    warm = BenchOptions(**common, out=tmp_path / "warm", cache=tmp_path / "other", dense_epochs=1, baseline_epochs=1,
                        baselines_from=tmp_path / "plain")
    second = run(warm, log=logged.append)
    assert not any("baseline-S" in line for line in logged)  # trained no baseline, its cache is empty
    assert any(line.startswith("[seed 0] baselines S measured before") for line in logged)
    step = json.loads((tmp_path / "warm" / "steps" / "seed-0.json").read_text())
    assert step["baseline_commit"] == first["runs"][0]["commit"]
    assert second["baseline"] == first["baseline"] and second["runs"][0]["baseline_seeds"] == {"S": 1}
    assert step["settings"]["matvit"]["recipe"]["dense_epochs"] == 1
    assert step["baselines_from"] == str(tmp_path / "plain" / "steps" / "seed-0.json")
    assert step["trained_on"]["baseline"] == first["runs"][0]["trained_on"]["baseline"]
    report = (tmp_path / "warm" / "consistency.md").read_text()
    assert f"Baselines measured before: seed 0 in `{step['baselines_from']}`" in report
    # A baseline costs what MatViT's submodel of its width costs: only the MatViT's submodels are timed.
    assert second["cost"]["baseline"] == first["cost"]["baseline"] == {"S": {k: second["cost"]["matvit"]["S"][k]
                                                                         for k in ("params", "gflops")}}
    cost = report.split("## Cost")[1]
    assert f"timed in the step of seed 0, {second['runs'][0]['commit'][:7]}" in cost
    assert "Each baseline has the shape" in cost and "| S |" in cost and "| baseline S |" not in cost
    assert (tmp_path / "other" / "seed-0" / "matvit" / "dense").is_dir()  # the MatViT trained with its warm-up

    # Baselines of other options are not taken: a step measured with 1 epoch does not serve 2.
    longer = step_settings(BenchOptions(**{**common, "epochs": 2}, out=tmp_path), 0)
    assert not baselines_measured(step, longer) and baselines_measured(step, step_settings(warm, 0))
    assert not baselines_measured(step, step_settings(BenchOptions(**{**common, "baselines": ["S", "M"]},
                                                                   out=tmp_path), 0))


def test_a_matmamba_is_measured_and_named_as_one(tmp_path):
    result = run(BenchOptions(dataset="digits", preset="matmamba-tiny-digits", out=tmp_path, epochs=1,
                              baselines=["S", "XL"], cache=tmp_path / "runs", latency_repeats=1), log=lambda s: None)
    assert result["family"] == "MatMamba" and list(result["matvit"]["grid"]) == ["S", "M", "L", "XL"]
    assert len(result["mixnmatch"]) == 35 and result["passes"] == {"matvit": 1, "baseline": {"S": 1, "XL": 1}}
    assert result["targets"][0]["target"].startswith("1. each MatMamba diagonal cell")
    md = (tmp_path / "consistency.md").read_text()
    assert "MatMamba submodels" in md and "MatViT" not in md
    assert json.loads((tmp_path / "runs" / "seed-0" / "matvit" / "config.json").read_text())["family"] == "matmamba"


def test_trainings_are_listed_under_the_cpu_they_ran_on():
    xeon, epyc = {"commit": "a", "cpu": "Intel Xeon"}, {"commit": "b", "cpu": "AMD EPYC"}
    runs = [{"seed": 0, "trained_on": {"matvit": xeon, "baseline": {"S": epyc}}},
            {"seed": 1, "trained_on": {"matvit": epyc, "baseline": {}}},
            {"seed": 2, "trained_on": None}]  # a step written before trainings recorded their CPU
    line = consistency_report.trained_on_lines(runs, "MatViT")[0]
    assert line.startswith("Trained on: Intel Xeon (seed 0 MatViT); AMD EPYC (seed 0 baseline S, seed 1 MatViT)")
    assert consistency_report.trained_on_lines([{"seed": 0}], "MatViT") == []


def test_baselines_make_as_many_passes_as_the_matvit_warm_up_included(tmp_path):
    plain = BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path, epochs=6)
    warm = BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path, epochs=6, dense_epochs=3)
    assert train_options(warm, 0, None).recipe.dense_epochs == 3
    assert train_options(plain, 0, "S").recipe.epochs == 6
    for g in ("S", "XL"):  # a baseline is a plain ViT: no warm-up of its own, 3 + 6 epochs
        baseline = train_options(warm, 0, g)
        assert (baseline.recipe.epochs, baseline.recipe.dense_epochs) == (9, None)
    assert consistency.passes(options_json(train_options(warm, 0, None))) == 9
    # The old count on request: the MatViT's joint epochs, as results before equal training were measured.
    joint = BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path, epochs=6, dense_epochs=3,
                         baseline_epochs=6)
    assert step_settings(joint, 0)["baselines"] == step_settings(plain, 0)["baselines"]
    report = consistency_report.passes_sentence({"passes": {"matvit": 9, "baseline": {"S": 6, "XL": 6}}})
    assert "**Unequal training**: the MatViT makes 9 passes over the data, the baselines S 6, XL 6." in report
    assert "same 9 passes" in consistency_report.passes_sentence({"passes": {"matvit": 9, "baseline": {"S": 9}}})
    assert consistency_report.passes_sentence({}) == ""  # a result from before passes were recorded
    off = BenchOptions(dataset="digits", preset="matvit-tiny-digits", out=tmp_path, epochs=6, dense_epochs=0)
    assert step_settings(off, 0) == step_settings(plain, 0)  # no warm-up, however it is asked for


@pytest.mark.parametrize("bad, message", [(["--baselines-from", "nothing"], "no consistency result there"),
                                          (["--weights", "2,1"], "--weights needs 4 values")])
def test_a_bad_bench_option_is_one_line(tmp_path, capsys, bad, message):
    argv = ["bench", "consistency", "--dataset", "digits", "--preset", "matvit-tiny-digits", "--out",
            str(tmp_path / "out"), *bad]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _cells(diagonal: dict, off: dict) -> dict:
    names = list(diagonal)
    return {"grid": {i: {q: {"knn1": diagonal[i] if i == q else off[f"{i}/{q}"]} for q in names} for i in names}}


def _passing() -> dict:
    """Two granularities and one Mix'n'Match spec that meet all five targets, each with a small margin."""
    return {
        "classes": 10,
        "matvit": _cells({"S": 0.80, "XL": 0.90}, {"S/XL": 0.89, "XL/S": 0.79}),
        "baseline": _cells({"S": 0.79, "XL": 0.905}, {"S/XL": 0.12, "XL/S": 0.08}),
        "mixnmatch": [{"spec": "S", "gflops": 1.0, "knn1": 0.79}, {"spec": "S,XL", "gflops": 1.5, "knn1": 0.85},
                      {"spec": "XL", "gflops": 2.0, "knn1": 0.90}],
    }


def _set(r: dict, path: str, value: float) -> dict:
    r = copy.deepcopy(r)
    *keys, last = path.split(".")
    node = r
    for key in keys:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return r


def test_targets_all_met_on_a_passing_result():
    got = targets(_passing())
    assert [t["met"] for t in got] == [True] * 5
    assert got[1]["matvit_xl_s"] == 0.79 and got[1]["baseline_s_s"] == 0.79
    assert got[3]["chance"] == pytest.approx(0.1) and got[3]["max"] == 0.12
    assert got[4]["worst"] == pytest.approx(0.0) and got[4]["points"] == 3


@pytest.mark.parametrize("missed, path, value", [
    (0, "baseline.grid.XL.XL.knn1", 0.915),  # MatViT XL 1.5 points below its baseline
    (1, "baseline.grid.S.S.knn1", 0.795),  # baseline S on itself beats MatViT's XL index queried with S
    (2, "matvit.grid.S.XL.knn1", 0.87),  # index S / query XL 3 points below XL's diagonal
    (3, "baseline.grid.S.XL.knn1", 0.25),  # baselines share a space: 15 points above chance
    (4, "mixnmatch.1.knn1", 0.835),  # the mix 1 point below the segment joining S and XL (0.845)
])
def test_each_target_misses_when_its_numbers_do(missed, path, value):
    got = targets(_set(_passing(), path, value))
    assert [t["met"] for t in got] == [i != missed for i in range(5)]


def test_targets_without_the_baselines_they_need_are_not_measured():
    r = _passing()
    r["baseline"] = _cells({"XL": 0.905}, {})
    got = targets(r)
    assert got[0]["met"] is None and got[1]["met"] is None and got[3]["met"] is None
    assert got[2]["met"] and got[4]["met"]


def test_pareto_front():
    assert pareto_front([(1, 0.5), (2, 0.4), (3, 0.7), (2, 0.6)]) == [(1, 0.5), (2, 0.6), (3, 0.7)]


def test_baselines_at_equal_passes_take_the_matvit_measured_before(tmp_path, small_digits):
    common = dict(dataset="digits", preset="matvit-tiny-digits", epochs=1, dense_epochs=1, baselines=["S"],
                  latency_repeats=1)
    unequal = run(BenchOptions(**common, baseline_epochs=1, out=tmp_path / "unequal", cache=tmp_path / "runs"),
                  log=lambda s: None)
    assert unequal["passes"] == {"matvit": 2, "baseline": {"S": 1}}
    logged = []
    equal = run(BenchOptions(**common, out=tmp_path / "equal", cache=tmp_path / "other",
                             matvit_from=tmp_path / "unequal"), log=logged.append)
    assert not (tmp_path / "other" / "seed-0" / "matvit").exists()  # no MatViT trained again
    assert any(line.startswith("[seed 0] MatViT measured before") for line in logged)
    assert equal["passes"] == {"matvit": 2, "baseline": {"S": 2}}
    assert equal["matvit"] == unequal["matvit"] and equal["mixnmatch"] == unequal["mixnmatch"]
    step = json.loads((tmp_path / "equal" / "steps" / "seed-0.json").read_text())
    assert step["matvit_from"] == str(tmp_path / "unequal" / "steps" / "seed-0.json")
    assert step["matvit_commit"] == unequal["runs"][0]["commit"]
    assert step["settings"]["baselines"]["S"]["recipe"]["epochs"] == 2
    report = (tmp_path / "equal" / "consistency.md").read_text()
    assert f"MatViT measured before: seed 0 in `{step['matvit_from']}`" in report
    assert "Every model makes the same 2 passes" in report
