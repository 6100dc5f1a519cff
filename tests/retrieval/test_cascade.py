"""The query cascade: confidence signals, calibration to a share of XL's accuracy, and the cascade through the
retriever, the command line and the API."""

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import cli
from app.api import Settings, create_app
from app.bench import cascade as bench_cascade
from matvit import data
from matvit.images import to_png
from retrieval import build, cascade
from retrieval.encoder import Encoder
from retrieval.prefix import Plan
from retrieval.retriever import Retriever


def test_confidence_is_label_agreement_or_the_score_margin():
    scores = np.array([[0.9, 0.5, 0.4], [0.8, 0.79, 0.1]])
    labels = np.array([[1, 1, 2], [3, -1, 3]])
    np.testing.assert_allclose(cascade.confidence("agreement", scores, labels), [2 / 3, 2 / 3])
    np.testing.assert_allclose(cascade.confidence("margin", scores, labels), [0.4, 0.01], atol=1e-9)
    assert cascade.confidence("agreement", scores, np.full((2, 3), -1)).tolist() == [0.0, 0.0]  # unlabelled


def synthetic_stages(n: int = 1000) -> list[cascade.Stage]:
    """S right on 90% of queries, confident on the ones it gets right; M no better than S but dearer; XL right
    on 95%."""
    rng = np.random.default_rng(0)
    s_right = rng.random(n) < 0.9
    s_conf = np.where(s_right, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.7, n))
    xl_right = s_right | (rng.random(n) < 0.5)
    return [cascade.Stage("S", 1.0, s_right, s_conf), cascade.Stage("M", 1.5, s_right, rng.random(n)),
            cascade.Stage("XL", 2.5, xl_right, np.ones(n))]


def test_a_query_stops_at_the_first_stage_confident_enough():
    right = np.ones(4, dtype=bool)
    stages = [cascade.Stage("S", 1.0, right, np.array([0.9, 0.2, 0.2, 0.5])),
              cascade.Stage("M", 2.0, right, np.array([0.0, 0.8, 0.1, 0.5])),
              cascade.Stage("XL", 4.0, right, np.zeros(4))]
    assert cascade.stops(stages, [0.5, 0.8]).tolist() == [0, 1, 2, 0]


def test_the_share_of_xl_accuracy_has_an_interval_that_narrows_with_more_queries():
    rng = np.random.default_rng(0)
    xl = rng.random(8000) < 0.9
    correct = xl & (rng.random(8000) < 0.98)
    few, many = bench_cascade.share_interval(correct[:500], xl[:500]), bench_cascade.share_interval(correct, xl)
    share = correct.mean() / xl.mean()
    assert many[0] <= share <= many[1] and many[1] - many[0] < few[1] - few[0] < 0.05


def test_calibration_keeps_the_target_share_of_xl_accuracy_at_the_least_cost():
    stages = synthetic_stages()
    policy = cascade.calibrate(stages, 0.99, "agreement", "f" * 16)
    c = policy.calibration
    xl = stages[-1].correct.mean()
    assert policy.stages == ["S", "XL"]  # M adds cost and no accuracy: the chain skips it
    chosen = [stages[0], stages[-1]]
    assert c["accuracy"] >= 0.99 * xl and c["xl_accuracy"] == pytest.approx(xl)
    assert c == {**c, **cascade.simulate(chosen, policy.thresholds, 0.99)} and c["surplus"] >= 0
    assert c["mean_gflops"] < 2.5 and c["stops"]["S"] > 0.5  # most queries stop at S
    for t in np.quantile(stages[0].confidence, np.linspace(0, 1, cascade.GRID)):
        cheaper = cascade.simulate(chosen, [t], 0.99)
        assert cheaper["mean_gflops"] >= c["mean_gflops"] or cheaper["surplus"] < 0
    kept = {tuple(ch["stages"]): ch for ch in c["chains"]}
    assert ("XL",) in kept and ("S",) not in kept  # XL alone meets any goal; S alone misses this one
    assert kept[("XL",)]["mean_gflops"] == 2.5 and kept[("S", "M", "XL")]["mean_gflops"] > c["mean_gflops"]
    assert min(ch["mean_gflops"] for ch in c["chains"]) == c["mean_gflops"]


def test_every_chain_keeps_its_stages_in_order():
    stages = synthetic_stages()
    found = [[s.spec for s in chain] for chain in cascade.chains(stages)]
    assert len(found) == 7 and ["S", "XL"] in found and ["M"] in found and ["S", "M", "XL"] in found
    assert all(chain == sorted(chain, key="SMXL".index) for chain in found)


def test_a_target_s_alone_meets_is_served_by_s_alone():
    stages = synthetic_stages()
    s_share = stages[0].correct.mean() / stages[-1].correct.mean()
    policy = cascade.calibrate(stages, s_share - 0.03, "agreement", "f" * 16)
    assert policy.stages == ["S"] and policy.thresholds == [] and policy.calibration["stops"] == {"S": 1.0}


def test_a_target_met_only_on_the_calibration_queries_is_not_enough():
    stages = synthetic_stages()
    s_share = stages[0].correct.mean() / stages[-1].correct.mean()
    policy = cascade.calibrate(stages, s_share - 0.001, "agreement", "f" * 16)  # S alone meets it, barely
    assert cascade.simulate(stages[:1], [], s_share - 0.001, stages[-1])["surplus"] < 0
    assert policy.stages != ["S"] and policy.calibration["accuracy"] > stages[0].correct.mean()


def test_a_cheaper_way_of_searching_as_accurate_is_chosen_and_stored(tmp_path):
    full = synthetic_stages()
    funnel = Plan(8, 100)
    cheap = [cascade.Stage(s.spec, s.gflops * 0.5, s.correct, s.confidence, funnel) for s in full]
    worse = [cascade.Stage(s.spec, s.gflops * 0.1, np.zeros_like(s.correct), s.confidence, Plan(8)) for s in full]
    stages = [s for trio in zip(full, cheap, worse, strict=True) for s in trio]  # grouped by spec, as measured
    policy = cascade.calibrate(stages, 0.99, "agreement", "f" * 16)
    assert policy.plan == funnel and policy.stages == ["S", "XL"]  # the funnel halves every stage's cost
    assert policy.calibration["xl_accuracy"] == pytest.approx(full[-1].correct.mean())  # XL on the full vectors
    assert policy.calibration["mean_gflops"] == pytest.approx(
        cascade.calibrate(full, 0.99, "agreement", "f" * 16).calibration["mean_gflops"] * 0.5)
    assert {c["search"] for c in policy.calibration["chains"]} == {None, "8-funnel"}  # 8 exact never meets it
    assert "S@8-funnel" in policy.calibration["fixed"] and "S" in policy.calibration["fixed"]
    policy.save(tmp_path / cascade.CASCADE_FILE)
    assert cascade.Policy.load(tmp_path / cascade.CASCADE_FILE, "f" * 16).plan == funnel
    old = {k: v for k, v in json.loads((tmp_path / cascade.CASCADE_FILE).read_text()).items() if k != "search"}
    (tmp_path / "old.json").write_text(json.dumps(old))  # written before cascades chose how to search
    assert cascade.Policy.load(tmp_path / "old.json", "f" * 16).plan is None


@pytest.fixture(scope="module")
def calibrated(trained_dir, tmp_path_factory):
    """A digits index with a cascade calibrated by `matvit cascade` on 300 of its own images."""
    index = tmp_path_factory.mktemp("cascade-index")
    build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "train", 8, 1), index)
    assert cli.main(["cascade", "--index", str(index), "--checkpoint", str(trained_dir), "--dataset", "digits",
                     "--queries", "300", "--target", "0.99"]) == 0
    return index


def test_the_calibrated_cascade_is_stored_and_searches(calibrated, trained_dir):
    stored = json.loads((calibrated / cascade.CASCADE_FILE).read_text())
    assert stored["stages"] and stored["stages"] == [s for s in ("S", "M", "L", "XL") if s in stored["stages"]]
    assert len(stored["thresholds"]) == len(stored["stages"]) - 1
    assert stored["calibration"]["queries"] == 300 and stored["calibration"]["command"].startswith("matvit cascade")
    retriever = Retriever(calibrated, trained_dir)
    test = data.load("digits", "test", 8, 1)
    results = retriever.search_cascade(test.images[:60], k=3)
    for r in results:
        ran = r.cascade["ran"]
        assert ran == stored["stages"][:len(ran)] and r.submodel.spec == ran[-1] and len(r.neighbours) == 3
        assert r.cascade["gflops"] == pytest.approx(sum(retriever.encoder.gflops(s) for s in ran))
        if len(ran) < len(stored["stages"]):
            assert r.cascade["confidence"] >= stored["thresholds"][len(ran) - 1]
    correct = [r.neighbours[0]["label"] == str(int(y)) for r, y in zip(results, test.labels[:60], strict=True)]
    assert np.mean(correct) > 0.5  # chance is 0.1


def test_a_cascade_for_another_model_is_refused(calibrated, tmp_path):
    policy = json.loads((calibrated / cascade.CASCADE_FILE).read_text())
    (tmp_path / cascade.CASCADE_FILE).write_text(json.dumps({**policy, "fingerprint": "0" * 16}))
    with pytest.raises(cascade.CascadeError, match="calibrated for model 0000000000000000"):
        cascade.Policy.load(tmp_path / cascade.CASCADE_FILE, policy["fingerprint"])
    with pytest.raises(cascade.CascadeError, match="calibrate one with `matvit cascade`"):
        cascade.Policy.load(tmp_path / "missing.json", policy["fingerprint"])


def test_the_api_searches_with_the_cascade_and_refuses_it_with_a_submodel(calibrated, trained_dir, tmp_path):
    image = to_png(data.load("digits", "test", 8, 1).images[0])
    app = create_app(Settings(index=calibrated, checkpoint=trained_dir), load_in_background=False)
    with TestClient(app) as client:
        r = client.post("/v1/search", files={"file": ("q.png", image, "image/png")}, data={"mode": "cascade", "k": "2"})
        assert r.status_code == 200, r.text
        body = r.json()
        stages = json.loads((calibrated / cascade.CASCADE_FILE).read_text())["stages"]
        ran = body["cascade"]["ran"]
        assert ran == stages[:len(ran)] and body["submodel"]["spec"] == ran[-1]
        assert len(body["results"]) == 2
        stopped = body["submodel"]["spec"]
        assert f'matvit_queries_total{{submodel="{stopped}"}} 1.0' in client.get("/metrics").text
        r = client.post("/v1/search", files={"file": ("q.png", image, "image/png")},
                        data={"mode": "cascade", "submodel": "S"})
        assert r.status_code == 422 and "mode=cascade" in r.json()["error"]["message"]
        plain = client.post("/v1/search", files={"file": ("q.png", image, "image/png")}, data={"submodel": "S"})
        assert plain.json()["cascade"] is None
    bare = tmp_path / "bare"
    build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "test", 8, 1), bare)
    app = create_app(Settings(index=bare, checkpoint=trained_dir), load_in_background=False)
    with TestClient(app) as client:
        r = client.post("/v1/search", files={"file": ("q.png", image, "image/png")}, data={"mode": "cascade"})
        assert r.status_code == 400 and "calibrate one with `matvit cascade`" in r.json()["error"]["message"]


def test_bench_cascade_compares_the_cascade_with_every_fixed_submodel(calibrated, trained_dir, tmp_path):
    out = tmp_path / "bench"
    assert cli.main(["bench", "cascade", "--index", str(calibrated), "--checkpoint", str(trained_dir), "--dataset",
                     "digits", "--calibration", "300", "--timed", "5", "--batch", "2", "--replay", "matvit-tiny-digits",
                     "--out", str(out)]) == 0
    r = json.loads((out / "cascade.json").read_text())
    assert [f["spec"] for f in r["fixed"]] == ["S", "M", "L", "XL"] and r["test_queries"] == 360
    assert len(r["mixnmatch"]) == 35 and {f["spec"] for f in r["fixed"]} <= {f["spec"] for f in r["mixnmatch"]}
    assert [c["target"] for c in r["cascades"]] == [0.995, 0.998, 1.0]
    stored = json.loads((calibrated / cascade.CASCADE_FILE).read_text())
    assert stored["target"] == 0.995 and stored["thresholds"] == r["cascades"][0]["thresholds"]
    for c in r["cascades"]:
        t = c["test"]
        assert sum(t["stops"].values()) == pytest.approx(1.0) and list(t["stops"]) == c["stages"]
        for timed in c["encode_ms"], c.get("replay_ms", c["encode_ms"]):
            assert [e["batch"] for e in timed] == [1, 2] and all(e["cascade"] > 0 and e["XL"] > 0 for e in timed)
        assert r["fixed"][0]["gflops"] <= t["mean_gflops"] <= sum(f["gflops"] for f in r["fixed"])
        low, high = t["share_of_xl_accuracy_95"]
        assert low <= t["share_of_xl_accuracy"] <= high
        met = [t["share_of_xl_accuracy"] >= c["target"], t["share_of_xl_gflops"] <= 0.6,
               *(e["share_of_xl"] <= 0.6 for e in c["encode_ms"] + c.get("replay_ms", []))]
        assert [x["met"] for x in c["targets"]] == met
    assert ["replay_ms" in c for c in r["cascades"]] == [True, False, False]  # the stored cascade's only
    assert r["xl_accuracy"] == r["fixed"][-1]["accuracy"]
    assert (out / "cascade.png").stat().st_size > 0 and "**cascade for 99.5%**" in (out / "cascade.md").read_text()


def test_bench_cascade_can_calibrate_on_part_of_the_test_split_and_evaluate_on_the_rest(calibrated, trained_dir,
                                                                                       tmp_path):
    out = tmp_path / "bench"
    assert cli.main(["bench", "cascade", "--index", str(calibrated), "--checkpoint", str(trained_dir), "--dataset",
                     "digits", "--split", "test", "--calibration", "120", "--target", "0.995", "--timed", "5",
                     "--batch", "2", "--replay", "none", "--out", str(out)]) == 0
    r = json.loads((out / "cascade.json").read_text())
    assert "replay_ms" not in r["cascades"][0] and len(r["cascades"][0]["targets"]) == 4
    assert (r["calibration_split"], r["calibration_queries"], r["test_queries"]) == ("test", 120, 240)
    assert r["cascades"][0]["calibration"]["queries"] == 120
    assert "120 images of the test split (not in the gallery)" in (out / "cascade.md").read_text()


def test_bench_cascade_refuses_an_unknown_replay_shape_before_measuring(tmp_path, capsys):
    assert cli.main(["bench", "cascade", "--index", str(tmp_path), "--checkpoint", str(tmp_path), "--dataset",
                     "digits", "--replay", "matvit-huge", "--out", str(tmp_path / "out")]) == 2
    assert "unknown preset 'matvit-huge'" in capsys.readouterr().err and not (tmp_path / "out").exists()
