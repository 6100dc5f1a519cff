"""Query-encoder backends: each matches eager or is refused, `auto` picks the fastest that passes, the profile
records the serving backend and the latency budget holds against it, and the API says which backend serves."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.api import Settings, create_app
from matvit import data
from matvit.images import to_png
from retrieval import backends, budget, build
from retrieval.encoder import Encoder
from retrieval.retriever import Retriever


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("backend-cache")


@pytest.fixture(scope="module")
def queries():
    return data.load("digits", "test", 8, 1).images[:64]


@pytest.fixture(scope="module")
def eager_embeddings(trained_dir, queries):
    encoder = Encoder.load(trained_dir)
    return {spec: encoder.encode(queries, spec) for spec in ("S", "XL")}


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("name", ["onnx", "onnx-int8"])
def test_onnx_backends_match_eager_or_are_refused(trained_dir, cache, queries, eager_embeddings, name):
    encoder = Encoder.load(trained_dir, backend=name, backend_cache=cache)
    for spec in ("S", "XL"):
        trial = encoder.serve(spec, name)
        assert trial.backend == name and trial.cosine is not None
        if trial.passed:
            assert trial.cosine >= backends.MIN_COSINE
            assert encoder.serving(spec) == name
            assert rowwise_cosine(encoder.encode(queries, spec), eager_embeddings[spec]).min() >= 0.999
        else:  # refused: reported, and the submodel is served by eager, bit for bit
            assert name == "onnx-int8" and trial.cosine < backends.MIN_COSINE
            assert encoder.serving(spec) == "eager"
            np.testing.assert_allclose(encoder.encode(queries, spec), eager_embeddings[spec], atol=1e-6)
    assert (cache / encoder.fingerprint / "S" / ("model-int8.onnx" if name == "onnx-int8" else "model.onnx")).is_file()


def test_onnx_plain_backend_passes(trained_dir, cache):
    """Full-precision ONNX Runtime must always agree with eager (float rounding only)."""
    trial = Encoder.load(trained_dir, backend_cache=cache).serve("S", "onnx")
    assert trial.passed and trial.cosine > 0.99999


COMPILE_CHECK = """
import json, sys
import numpy as np
from matvit import data
from retrieval.encoder import Encoder
queries = data.load("digits", "test", 8, 1).images[:16]
eager = Encoder.load(sys.argv[1]).encode(queries, "S")
encoder = Encoder.load(sys.argv[1], backend="compile")
trial = encoder.serve("S", "compile")
one = np.concatenate([encoder.encode(queries[i:i + 1], "S") for i in range(len(queries))])
print(json.dumps({**trial.to_dict(), "serving": encoder.serving("S"), "gap": float(np.abs(one - eager).max())}))
"""


def test_compile_matches_eager(trained_dir):
    """In a process of its own: inductor's kernels leave an OpenMP pool that slows every later eager op."""
    done = subprocess.run([sys.executable, "-c", COMPILE_CHECK, str(trained_dir)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["passed"] and result["cosine"] >= backends.MIN_COSINE and result["serving"] == "compile"
    assert result["gap"] < 1e-4  # the compiled batch-1 path, query by query


def test_onnx_export_is_cached(trained_dir, cache, monkeypatch):
    encoder = Encoder.load(trained_dir, backend_cache=cache)
    encoder.serve("XL", "onnx")
    monkeypatch.setattr(type(encoder.model), "export", lambda *a, **k: pytest.fail("exported again"))
    assert Encoder.load(trained_dir, backend_cache=cache).serve("XL", "onnx").passed


def test_unknown_backend_is_a_user_error(trained_dir):
    with pytest.raises(backends.BackendError, match="unknown backend 'tensorrt'"):
        Encoder.load(trained_dir, backend="tensorrt")


# --- auto, the profile and the budget, with fake backends of known speed ---------------------------------------
FAKE_MS = {"eager": 40.0, "onnx": 5.0, "onnx-int8": 1.0}


@pytest.fixture
def fake_backends(monkeypatch):
    """`onnx`: eager's embeddings, 5 ms; `onnx-int8`: the fastest (1 ms) but wrong; `compile`: cannot build
    here; eager: 40 ms. Latency is read from the runner, so every timing is deterministic."""
    real_eager = backends.eager

    def tagged(runner, ms):
        def run(images):
            return runner(images)
        run.fake_ms = ms
        return run

    def eager(embedder):
        return tagged(real_eager(embedder), FAKE_MS["eager"])

    def build(name, model, fingerprint, spec, embedder, device, cache=None):
        if name == "compile":
            raise RuntimeError("no C++ compiler")
        right = real_eager(embedder)
        if name == "onnx-int8":
            wrong = torch.Generator().manual_seed(1)
            return tagged(lambda images: right(images) + 0.2 * torch.randn(len(images), 1, generator=wrong),
                          FAKE_MS[name])
        return tagged(right, FAKE_MS[name])

    def median_latency_ms(fn, images, warmup=3, repeats=15):
        return fn.fake_ms * (32 if len(images) == 32 else 1)

    monkeypatch.setattr(backends, "eager", eager)
    monkeypatch.setattr(backends, "build", build)
    monkeypatch.setattr(backends, "median_latency_ms", median_latency_ms)
    monkeypatch.setattr(budget, "median_latency_ms", median_latency_ms)


@pytest.fixture(scope="module")
def digits_index(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("backend-index")
    build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "train", 8, 1), out)
    return out


def test_auto_picks_the_fastest_backend_that_passes(trained_dir, fake_backends):
    encoder = Encoder.load(trained_dir, backend="auto")
    trials = {t.backend: t for t in encoder.select("S", repeats=1)}
    assert set(trials) == set(backends.AUTO) == {"eager", "onnx", "onnx-int8"}
    assert not trials["onnx-int8"].passed and trials["onnx-int8"].cosine < backends.MIN_COSINE
    assert trials["onnx-int8"].latency_ms_b1 is None  # a refused backend is not even timed
    assert trials["onnx"].passed and trials["onnx"].latency_ms_b1 == 5.0
    assert encoder.serving("S") == "onnx"  # int8 would be faster, but it failed its check


def test_an_asked_for_backend_that_fails_falls_back_to_eager(trained_dir, fake_backends):
    encoder = Encoder.load(trained_dir, backend="onnx-int8")
    trials = encoder.select("XL", repeats=1)
    assert [(t.backend, t.passed) for t in trials] == [("onnx-int8", False), ("eager", True)]
    assert encoder.serving("XL") == "eager"
    broken = Encoder.load(trained_dir, backend="compile")
    trial = broken.serve("S", "compile")
    assert not trial.passed and trial.cosine is None and "no C++ compiler" in trial.error
    assert broken.serving("S") == "eager"


def test_profile_records_the_serving_backend_and_the_budget_uses_its_latency(trained_dir, digits_index,
                                                                             fake_backends, tmp_path):
    index = shutil.copytree(digits_index, tmp_path / "index")
    retriever = Retriever(index, trained_dir, backend="auto")
    profile = retriever.ensure_profile()
    assert profile["backend"] == "auto"
    for row in profile["rows"]:
        assert row["backend"] == "onnx"
        assert row["latency_ms_b1"] == FAKE_MS["onnx"] and row["latency_ms_b32"] == 32 * FAKE_MS["onnx"]
        assert {t["backend"]: t["passed"] for t in row["backends"]} == {"eager": True, "onnx": True, "onnx-int8": False}
    # 10 ms holds for onnx (5 ms), not for eager (40 ms): the budget is met because onnx serves
    choice = retriever.choose(budget=budget.Budget(ms=10))
    assert choice.spec == "XL" and choice.backend == "onnx"
    result = retriever.search(data.load("digits", "test", 8, 1).images[:1], k=3, budget=budget.Budget(ms=10))[0]
    assert result.to_dict()["submodel"]["backend"] == "onnx"
    with pytest.raises(budget.BudgetError, match="the cheapest is .* at 5 ms"):  # int8's 1 ms never counts
        retriever.choose(budget=budget.Budget(ms=2))
    assert retriever.backends() == {"S": "onnx", "M": "onnx", "L": "onnx", "XL": "onnx"}

    # A new process finds the stored profile: it serves with the recorded backends without measuring again,
    # built at start (a server) or at first use (a one-off search, with no budget).
    for start in (True, False):
        again = Retriever(index, trained_dir, backend="auto")
        again.encoder.select = lambda *a, **k: pytest.fail("measured again")
        if start:
            again.ensure_profile()
        assert again.choose("S").backend == "onnx"
        assert again.search(data.load("digits", "test", 8, 1).images[:1], k=1, submodel="L")[0].submodel.backend \
            == "onnx"

    # A profile measured with another backend setting is stale for this one.
    eager = Retriever(index, trained_dir, backend="eager")
    assert budget.load_profile(eager.profile_path, eager.encoder.fingerprint, backend="eager") is None
    assert {r["backend"] for r in eager.ensure_profile()["rows"]} == {"eager"}
    assert eager.choose(budget=budget.Budget(ms=45)).backend == "eager"


def test_api_reports_the_serving_backend(trained_dir, digits_index, fake_backends, tmp_path):
    index = shutil.copytree(digits_index, tmp_path / "index")
    app = create_app(Settings(index=index, checkpoint=trained_dir, backend="auto"), load_in_background=False)
    with TestClient(app) as client:
        rows = client.get("/v1/submodels").json()
        assert {r["spec"]: r["backend"] for r in rows} == {"S": "onnx", "M": "onnx", "L": "onnx", "XL": "onnx"}
        xl = next(r for r in rows if r["spec"] == "XL")
        assert xl["latency_ms_b1"] == FAKE_MS["onnx"]
        assert {t["backend"]: t["passed"] for t in xl["backends"]}["onnx-int8"] is False
        image = data.load("digits", "test", 8, 1).images[0]
        found = client.post("/v1/search", files={"file": ("q.png", to_png(image), "image/png")},
                            data={"submodel": "S", "k": "2"})
        assert found.status_code == 200 and found.json()["submodel"]["backend"] == "onnx"


def test_api_refuses_an_unknown_backend_setting(trained_dir, digits_index):
    app = create_app(Settings(index=digits_index, checkpoint=trained_dir, backend="tpu"), load_in_background=False)
    with TestClient(app) as client:
        response = client.get("/readyz")
        assert response.status_code == 503 and "unknown backend 'tpu'" in response.json()["error"]["message"]


def test_bench_backends_times_every_backend_and_says_what_auto_chooses(tmp_path):
    from scripts.studies import backends as study

    out = tmp_path / "backends"
    assert study.main(["--out", str(out), "--preset", "matvit-tiny-digits", "--submodels", "S",
                       "--repeats", "3", "--patience", "0"]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    (model,) = result["models"]
    assert [r["backend"] for r in model["rows"]] == list(backends.AUTO)
    assert all(r["latency_ms_b1"] > 0 and r["probe_cosine"] > 0.99 for r in model["rows"])
    assert model["auto"]["S"]["backend"] in backends.AUTO
    assert result["command"].startswith("python -m scripts.studies.backends")
    assert "Query-encoder backends" in out.with_suffix(".md").read_text()
