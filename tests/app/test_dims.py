"""The dimensions searched, through the CLI and the API: `--dims` / `--funnel` (and the same fields), the pair used
reported with every answer, and a length the checkpoint was not trained for refused in one line or a 4xx JSON."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.api.service import Settings
from app.cli import main
from matvit import data
from tests.app.test_api import png


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    path = tmp_path_factory.mktemp("query") / "q.png"
    path.write_bytes(png(data.load("digits", "test", 8, 1).images[0, 0].numpy()))
    return path


def test_search_reports_the_dimensions_it_searched(matryoshka_index, matryoshka_dir, query, capsys):
    base = ["search", "--index", str(matryoshka_index), "--checkpoint", str(matryoshka_dir), "--image", str(query),
            "-k", "3", "--submodel", "S"]
    runs = {"full": [], "dims": ["--dims", "8"], "funnel": ["--funnel", "16", "--shortlist", "30"]}
    out = {}
    for name, extra in runs.items():
        assert main([*base, *extra, "--json"]) == 0
        out[name] = json.loads(capsys.readouterr().out)
    assert out["full"]["search"] == {"dims": 32, "funnel": False, "shortlist": None}
    assert out["dims"]["search"] == {"dims": 8, "funnel": False, "shortlist": None}
    assert out["funnel"]["search"] == {"dims": 16, "funnel": True, "shortlist": 30}
    assert all(len(o["results"]) == 3 and o["submodel"]["spec"] == "S" for o in out.values())
    assert main([*base, "--funnel", "8"]) == 0
    assert "searched the 8-d prefix's 100 nearest, re-ranked by the full vectors" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--dims", "12"], "dims 12 is not available: use 8, 16, 32"),
    (["--funnel", "64"], "dims 64 is not available: use 8, 16, 32"),
    (["--funnel", "8", "--shortlist", "2", "-k", "5"], "the shortlist (2) must hold at least k (5) items"),
    (["--dims", "8", "--shortlist", "50"], "a shortlist is the funnel's"),
])
def test_bad_dimensions_are_one_line(matryoshka_index, matryoshka_dir, query, capsys, extra, message):
    argv = ["search", "--index", str(matryoshka_index), "--checkpoint", str(matryoshka_dir), "--image", str(query)]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.fixture(scope="module")
def client(matryoshka_index, matryoshka_dir):
    app = create_app(Settings(index=matryoshka_index, checkpoint=matryoshka_dir), load_in_background=False)
    with TestClient(app) as c:
        yield c


def test_the_api_searches_the_dimensions_asked_and_says_so(client, query):
    image = query.read_bytes()
    r = client.post("/v1/search", files={"file": ("q.png", image, "image/png")}, data={"k": "4", "dims": "16"})
    assert r.status_code == 200, r.text
    assert r.json()["search"] == {"dims": 16, "funnel": False, "shortlist": None} and len(r.json()["results"]) == 4
    r = client.post("/v1/search", files={"file": ("q.png", image, "image/png")}, data={"funnel": "8"})
    assert r.json()["search"] == {"dims": 8, "funnel": True, "shortlist": 100}
    embedding = [1.0] + [0.0] * 31
    r = client.post("/v1/search", json={"embedding": embedding, "k": 2, "dims": 8})
    assert r.status_code == 200 and r.json()["search"]["dims"] == 8
    r = client.post("/v1/search/batch", json={"images_b64": [], "funnel": 8})
    assert r.status_code == 422


@pytest.mark.parametrize("fields, status, code, message", [
    ({"dims": "12"}, 400, "bad_request", "dims 12 is not available: use 8, 16, 32"),
    ({"funnel": "33"}, 400, "bad_request", "dims 33 is not available: use 8, 16, 32"),
    ({"dims": "8", "funnel": "8"}, 422, "validation_error", "either dims"),
    ({"shortlist": "50"}, 422, "validation_error", "a shortlist is the funnel's"),
    ({"dims": "0"}, 422, "validation_error", "dims"),
])
def test_bad_dimensions_are_4xx_json(client, query, fields, status, code, message):
    r = client.post("/v1/search", files={"file": ("q.png", query.read_bytes(), "image/png")}, data=fields)
    assert r.status_code == status and r.json()["error"]["code"] == code and message in r.json()["error"]["message"]
