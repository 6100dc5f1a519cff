"""Budgets over both knobs: for a Matryoshka model a budget chooses the pair (query submodel, way of searching), each
pair costing its encode plus its search, the search timed per way at the index's size in the profile."""

from __future__ import annotations

import json
import shutil

import pytest

from app.cli import main
from matvit import data
from retrieval import cascade
from retrieval.budget import Budget, BudgetError, choose, pairs, search_gflops, searches
from retrieval.prefix import Plan
from retrieval.retriever import Retriever
from tests.app.test_api import png

ROWS = [{"spec": "S", "params": 10, "gflops": 1.0, "latency_ms_b1": 1.0},
        {"spec": "XL", "params": 80, "gflops": 4.0, "latency_ms_b1": 3.0}]
WAYS = [{"key": "32", "dims": 32, "shortlist": None, "search_gflops": 2.0, "search_ms_b1": 2.0},
        {"key": "8", "dims": 8, "shortlist": None, "search_gflops": 0.5, "search_ms_b1": 0.3}]


def test_a_pair_costs_its_encode_plus_its_search():
    both = pairs(ROWS, WAYS)
    assert [(p["spec"], p["search"]["key"], p["latency_ms_b1"], p["gflops"]) for p in both] == [
        ("S", "32", 3.0, 3.0), ("S", "8", 1.3, 1.5), ("XL", "32", 5.0, 6.0), ("XL", "8", 3.3, 4.5)]
    best, why = choose(both, Budget(ms=3.5))  # S on full vectors fits too, but XL on 8 dims has more GFLOPs
    assert (best["spec"], best["search"]["key"]) == ("XL", "8") and "(submodel, search) pairs" in why
    measured = pairs([dict(r, knn1_by_search={"32": a, "8": b}) for r, a, b in zip(ROWS, (0.9, 0.8), (0.7, 0.85),
                                                                                    strict=True)], WAYS)
    best, why = choose(measured, Budget(ms=3.5))
    assert (best["spec"], best["search"]["key"], best["knn1"]) == ("S", "32", 0.9) and "measured 1-NN" in why
    with pytest.raises(BudgetError, match="the cheapest is S searching 8 dims at 1.3 ms"):
        choose(both, Budget(ms=1.0))


def test_the_ways_of_searching_and_their_flops():
    assert searches(32, [8, 16, 32], k=20) == [Plan(32), Plan(8), Plan(16), Plan(8, 200), Plan(16, 200)]
    assert searches(32, [32]) == [Plan(32)]
    assert search_gflops(Plan(8), 1000, 32) == pytest.approx(2 * 1000 * 8 / 1e9)
    assert search_gflops(Plan(8, 100), 1000, 32) == pytest.approx((2 * 1000 * 8 + 2 * 100 * 32) / 1e9)


@pytest.fixture
def own_index(matryoshka_index, tmp_path):
    return shutil.copytree(matryoshka_index, tmp_path / "index")


def test_a_budget_chooses_the_search_unless_dims_are_asked_for(own_index, matryoshka_dir):
    retriever = Retriever(own_index, matryoshka_dir, refresh_seconds=0)
    queries = data.load("digits", "test", 8, 1).images[:2]
    encoder, count = retriever.encoder, retriever.index.count
    budget = Budget(gflops=encoder.gflops("S") + search_gflops(Plan(8), count, 32) * 1.0001)
    result = retriever.search(queries, k=3, budget=budget)[0]
    assert (result.submodel.spec, result.search) == ("S", Plan(8))
    assert "(submodel, search) pairs" in result.submodel.reason
    asked = retriever.search(queries, k=3, budget=budget, plan=Plan(16))[0]
    assert asked.search == Plan(16) and asked.submodel.spec == "S"  # dims asked for: the budget picks the submodel
    with pytest.raises(BudgetError, match="searching 8 dims"):
        retriever.search(queries, k=3, budget=Budget(gflops=encoder.gflops("S") * 0.5))


def test_the_profile_times_each_way_at_the_index_size_and_latency_budgets_use_them(own_index, matryoshka_dir):
    retriever = Retriever(own_index, matryoshka_dir, refresh_seconds=0)
    assert retriever.budget_ways(10, latency=True) == []  # nothing timed yet: a latency budget picks the submodel
    profile = retriever.ensure_profile()
    assert [w["key"] for w in profile["searches"]] == ["32", "8", "16", "8-funnel", "16-funnel"]
    assert all(w["gallery"] == retriever.index.count and w["search_ms_b1"] > 0 for w in profile["searches"])
    queries = data.load("digits", "test", 8, 1).images[:2]
    generous = retriever.search(queries, k=3, budget=Budget(ms=1e6))[0]
    assert (generous.submodel.spec, generous.search) == ("XL", Plan(32))
    retriever.remove([retriever.search(queries[:1], k=1)[0].neighbours[0]["id"]])
    again = retriever.ensure_profile()  # the index changed size: its searches are timed again
    assert all(w["gallery"] == retriever.index.count for w in again["searches"])
    assert json.loads((own_index / "profile.json").read_text())["searches"] == again["searches"]


def test_profile_measures_every_pair_and_search_reports_the_chosen_one(own_index, matryoshka_dir, tmp_path,
                                                                      capsys):
    assert main(["profile", "--checkpoint", str(matryoshka_dir), "--index", str(own_index), "--dataset", "digits",
                 "--split", "test", "--submodels", "S;XL"]) == 0
    out = capsys.readouterr().out
    assert "8-funnel" in out and "16-funnel" in out
    profile = json.loads((own_index / "profile.json").read_text())
    for row in profile["rows"]:
        assert set(row["knn1_by_search"]) == {"32", "8", "16", "8-funnel", "16-funnel"}
        assert row["knn1_by_search"]["32"] == row["knn1"]
    query = tmp_path / "q.png"
    query.write_bytes(png(data.load("digits", "test", 8, 1).images[0, 0].numpy()))
    assert main(["search", "--index", str(own_index), "--checkpoint", str(matryoshka_dir), "--image", str(query),
                 "--budget-ms", "1000000", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    best = max(a for r in profile["rows"] for a in r["knn1_by_search"].values())
    row = next(r for r in profile["rows"] if r["spec"] == answer["submodel"]["spec"])
    key = Plan(answer["search"]["dims"], answer["search"]["shortlist"]).key
    assert row["knn1_by_search"][key] == best and "measured 1-NN" in answer["submodel"]["reason"]


def test_the_cascade_of_a_matryoshka_model_chooses_how_it_searches(own_index, matryoshka_dir, capsys):
    assert main(["cascade", "--index", str(own_index), "--checkpoint", str(matryoshka_dir), "--dataset", "digits",
                 "--queries", "200", "--target", "0.9", "--stages", "S;XL"]) == 0
    assert "searching" in capsys.readouterr().out
    stored = json.loads((own_index / cascade.CASCADE_FILE).read_text())
    fixed = stored["calibration"]["fixed"]
    assert set(fixed) == {f"{s}{w}" for s in ("S", "XL") for w in ("", "@8", "@16", "@8-funnel", "@16-funnel")}
    retriever = Retriever(own_index, matryoshka_dir, refresh_seconds=0)
    count = retriever.index.count
    assert fixed["S@8"]["gflops"] == pytest.approx(retriever.encoder.gflops("S") + search_gflops(Plan(8), count, 32))
    policy = retriever.cascade()
    queries = data.load("digits", "test", 8, 1).images[:4]
    results = retriever.search_cascade(queries, k=3)
    assert all(r.search == (policy.plan or Plan(32)) for r in results)  # the calibrated way of searching
    assert all(r.search == Plan(16) for r in retriever.search_cascade(queries, k=3, plan=Plan(16)))
