"""The REST API through FastAPI's test client: every endpoint, every error code, limits, live updates, the API key."""

import asyncio
import base64
import hmac
import io
import json
import logging
import shutil
import sqlite3
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.api import Settings, create_app
from matvit import data
from retrieval import build
from retrieval.encoder import Encoder
from retrieval.faiss_store import DirectoryStore, GalleryIndex
from retrieval.retriever import Retriever
from retrieval.store import writer

KEY = "s3cret-ключ"


@pytest.fixture(scope="module")
def index_dir(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("api-index")
    build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "train", 8, 1), out)
    return out


def make_client(index_dir, trained_dir, **settings) -> TestClient:
    app = create_app(Settings(index=index_dir, checkpoint=trained_dir, **settings), load_in_background=False)
    return TestClient(app)


@pytest.fixture(scope="module")
def client(index_dir, trained_dir):
    with make_client(index_dir, trained_dir) as c:
        yield c


@pytest.fixture
def own_index(index_dir, client, tmp_path):
    """A copy of the module's index (with the profile the module client measured), for tests that change it."""
    return shutil.copytree(index_dir, tmp_path / "own-index")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def queries():
    test = data.load("digits", "test", 8, 1)
    return [png(img[0].numpy()) for img in test.images[:12]], test.labels[:12].tolist()


def search_file(c, image: bytes, **fields) -> httpx.Response:
    return c.post("/v1/search", files={"file": ("q.png", image, "image/png")}, data={k: str(v) for k, v in
                                                                                    fields.items()})


def assert_same_hits(a: list[dict], b: list[dict]) -> None:
    """Same ids in the same order; scores equal up to float noise (encodes may be batched differently)."""
    assert [h["id"] for h in a] == [h["id"] for h in b]
    assert [h["score"] for h in a] == pytest.approx([h["score"] for h in b], abs=1e-5)


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_not_ready_is_503_with_json_error(tmp_path, trained_dir):
    with make_client(tmp_path / "missing", trained_dir) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert "no index yet" in r.json()["error"]["message"] and str(tmp_path) not in r.text
        assert c.post("/v1/search", json={"embedding": [0.0] * 32}).status_code == 503
        assert c.post("/v1/items", json={"images_b64": ["aGk="]}).status_code == 503
        assert c.delete("/v1/items/0").status_code == 503
        assert c.get("/healthz").status_code == 200


def test_readiness_waits_for_the_profile(own_index, trained_dir, monkeypatch):
    """The server measures the cost profile while loading (never in a request) and is not ready before."""
    (own_index / "profile.json").unlink()
    release, calls = threading.Event(), []
    measure = Retriever.ensure_profile

    def slow_profile(self):
        calls.append(1)
        assert release.wait(60)
        return measure(self)

    monkeypatch.setattr(Retriever, "ensure_profile", slow_profile)
    app = create_app(Settings(index=own_index, checkpoint=trained_dir), load_in_background=True)
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        r = c.get("/readyz")
        assert calls and r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        release.set()
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200 and (own_index / "profile.json").is_file()
        assert all(r["latency_ms_b1"] > 0 for r in c.get("/v1/submodels").json())
        assert len(calls) == 1


def test_index_and_submodels(client):
    info = client.get("/v1/index").json()
    assert info["count"] == 1437 and info["dimension"] == 32 and info["submodel"] == "XL"
    assert info["version"].startswith("v")
    rows = client.get("/v1/submodels").json()
    assert [r["spec"] for r in rows][:4] == ["S", "M", "L", "XL"]
    assert all(r["gflops"] > 0 and r["params"] > 0 and r["latency_ms_b1"] > 0 for r in rows)


def test_submodels_lists_the_profiled_and_every_named_granularity(own_index, trained_dir):
    """A profile measured for some submodels only: /v1/submodels lists those (with their latency), then the
    trained granularities it lacks (their computed cost, no latency)."""
    profile = json.loads((own_index / "profile.json").read_text())
    profile["rows"] = [r for r in profile["rows"] if r["spec"] in ("S", "XL")]
    (own_index / "profile.json").write_text(json.dumps(profile))
    encoder = Encoder.load(trained_dir)
    with make_client(own_index, trained_dir) as c:
        rows = c.get("/v1/submodels").json()
    assert [r["spec"] for r in rows] == ["S", "XL", "M", "L"]
    assert all(r["latency_ms_b1"] > 0 for r in rows[:2]) and all(r["latency_ms_b1"] is None for r in rows[2:])
    for row in rows:
        assert row["id"] == row["spec"] and row["backend"] == "eager"
        assert row["params"] == encoder.params(row["spec"])
        assert row["gflops"] == pytest.approx(encoder.gflops(row["spec"]), rel=1e-9)


def test_search_multipart_json_and_embedding(client, queries):
    images, labels = queries
    r = search_file(client, images[0], k=5, submodel="S")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    assert body["submodel"]["spec"] == "S"
    assert set(body["timings_ms"]) == {"decode", "queue", "encode", "search", "metadata", "total"}
    top1 = [search_file(client, img, k=1, submodel="S").json()["results"][0]["label"] for img in images]
    assert np.mean([t == str(y) for t, y in zip(top1, labels, strict=True)]) >= 0.5  # chance is 0.1

    r = client.post("/v1/search", json={"image_b64": base64.b64encode(images[0]).decode(), "k": 5, "submodel": "S"})
    assert_same_hits(r.json()["results"], body["results"])

    r = client.post("/v1/search", json={"image_b64": base64.b64encode(images[1]).decode(), "budget_gflops": 0.0009})
    assert r.status_code == 200 and r.json()["submodel"]["spec"] == "S" and len(r.json()["results"]) == 10

    gallery_item = client.get("/v1/items/0").json()
    assert gallery_item["id"] == 0 and gallery_item["source"].startswith("digits:")
    emb = [0.0] * 32
    emb[3] = 1.0
    r = client.post("/v1/search", json={"embedding": emb, "k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3 and r.json()["submodel"] is None


def test_search_refuses_several_files(client, queries):
    """One query image per search: a second file is refused (not encoded and ignored)."""
    files = [("file", (f"{i}.png", img, "image/png")) for i, img in enumerate(queries[0][:2])]
    r = client.post("/v1/search", files=files)
    assert r.status_code == 422 and "/v1/search/batch" in r.json()["error"]["message"]
    r = client.post("/v1/search", files=[files[0], ("files", files[1][1])])
    assert r.status_code == 422 and "/v1/search/batch" in r.json()["error"]["message"]


def test_batch_search(client, queries):
    images, _ = queries
    files = [("files", (f"{i}.png", img, "image/png")) for i, img in enumerate(images[:3])]
    r = client.post("/v1/search/batch", files=files, data={"k": "2", "submodel": "M"})
    assert r.status_code == 200, r.text
    responses = r.json()["responses"]
    assert len(responses) == 3 and all(len(x["results"]) == 2 for x in responses)
    for image, batched in zip(images[:3], responses, strict=True):
        assert_same_hits(batched["results"], search_file(client, image, k=2, submodel="M").json()["results"])
    r = client.post("/v1/search/batch", json={"images_b64": [base64.b64encode(i).decode() for i in images[:2]]})
    assert r.status_code == 200 and len(r.json()["responses"]) == 2


def test_dataset_items_and_their_images(client):
    r = client.get("/v1/items/5/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (8, 8)
    assert client.get("/v1/items/999999").json()["error"]["code"] == "not_found"
    assert client.get("/v1/items/999999/image").status_code == 404
    assert client.get("/v1/items/9223372036854775808").status_code == 422
    assert client.get("/v1/items/-1").status_code == 422


@pytest.fixture
def folder_index(trained_dir, tmp_path):
    """An index of a folder of three photos, and a file outside that folder."""
    folder = tmp_path / "gallery" / "cat"
    folder.mkdir(parents=True)
    photos = [png(np.full((20, 30, 3), 60 * i, dtype=np.uint8)) for i in range(3)]
    for i, photo in enumerate(photos):
        (folder / f"{i}.png").write_bytes(photo)
    (tmp_path / "secret.png").write_bytes(png(np.full((20, 30, 3), 7, dtype=np.uint8)))
    build.build(Encoder.load(trained_dir), build.FolderSource(tmp_path / "gallery", 8, 1, workers=0),
                tmp_path / "idx")
    return tmp_path / "idx", folder, photos


def test_folder_item_images_are_only_served_from_the_indexed_folder(folder_index, trained_dir, tmp_path):
    index, folder, photos = folder_index
    with make_client(index, trained_dir, max_item_image_bytes=5000) as c:
        by_name = {c.get(f"/v1/items/{i}").json()["source"]: i for i in range(3)}
        assert set(by_name) == {"cat/0.png", "cat/1.png", "cat/2.png"}  # relative to the indexed folder
        r = c.get(f"/v1/items/{by_name['cat/0.png']}/image")
        assert r.status_code == 200 and r.content == photos[0] and r.headers["content-type"] == "image/png"
        hits = c.post("/v1/search", json={"image_b64": base64.b64encode(photos[0]).decode()}).json()["results"]
        assert hits and all(str(tmp_path) not in str(h["metadata"]) for h in hits)

        (folder / "1.png").unlink()
        (folder / "1.png").symlink_to(tmp_path / "secret.png")  # a link out of the indexed folder
        r = c.get(f"/v1/items/{by_name['cat/1.png']}/image")
        assert r.status_code == 403 and r.json()["error"]["code"] == "image_refused"

        (folder / "2.png").write_bytes(png(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)))
        r = c.get(f"/v1/items/{by_name['cat/2.png']}/image")  # now over max_item_image_bytes
        assert r.status_code == 403 and "limit" in r.json()["error"]["message"]

        (folder / "0.png").unlink()
        assert c.get(f"/v1/items/{by_name['cat/0.png']}/image").status_code == 404


@pytest.mark.parametrize("kwargs, status, code", [
    ({"data": {"submodel": "S,XXL"}}, 400, "bad_request"),
    ({"data": {"k": "0"}}, 422, "validation_error"),
    ({"data": {"k": "1001"}}, 422, "validation_error"),
    ({"data": {"k": ["1", "2"]}}, 422, "validation_error"),
    ({"data": {"submodel": "S", "budget_ms": "3"}}, 422, "validation_error"),
    ({"data": {"budget_gflops": "0.0000001"}}, 400, "bad_request"),
    ({"data": {"submodel": "S" * 5000}}, 413, "too_large"),  # a form field over max_field_bytes
    ({"data": {"submodel": ""}}, 400, "bad_request"),  # not XL
    ({"data": {"submodel": " "}}, 400, "bad_request"),
])
def test_bad_parameters(client, queries, kwargs, status, code):
    r = client.post("/v1/search", files={"file": ("q.png", queries[0][0], "image/png")}, **kwargs)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


def test_bad_bodies(client):
    assert client.post("/v1/search", files={"file": ("q.txt", b"hello", "text/plain")}).status_code == 415
    assert client.post("/v1/search", content=b"hello", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/v1/search", content=b"{oops", headers={"content-type": "application/json"}).status_code == 400
    r = client.post("/v1/search", json={"image_b64": "***"})
    assert r.status_code == 422 and "base64" in r.json()["error"]["message"]
    assert client.post("/v1/search", json={"image_b64": 7}).status_code == 422
    assert client.post("/v1/search", json={"k": 3}).status_code == 422
    assert client.post("/v1/search", json=[1, 2]).status_code == 422
    assert client.post("/v1/search", json={"embedding": [1.0, 2.0]}).status_code == 400
    assert client.post("/v1/search", data={"k": "3"}, files={"other": ("x", b"x")}).status_code == 422
    assert client.post("/v1/search", data={"file": "not a file"}, files={"x": ("x", b"x")}).status_code == 422
    assert client.post("/v1/search/batch", json={"images_b64": []}).status_code == 422
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_size_limits(index_dir, trained_dir, queries):
    with make_client(index_dir, trained_dir, max_upload_bytes=2000, max_pixels=10_000, max_batch=2) as c:
        big = png(np.random.default_rng(0).integers(0, 256, (60, 60), dtype=np.uint8))
        assert len(big) > 2000
        r = c.post("/v1/search", files={"file": ("big.png", big, "image/png")})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        r = c.post("/v1/search", json={"image_b64": base64.b64encode(big).decode()})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        r = c.post("/v1/search", files={"file": ("bomb.png", huge_png_header(50_000, 50_000), "image/png")})
        assert r.status_code == 413 and "pixels" in r.json()["error"]["message"] + r.json()["error"]["code"]
        r = c.post("/v1/search", files={"file": ("wide.png", png(np.zeros((10, 2000), np.uint8)), "image/png")})
        assert r.status_code == 413
        files = [("files", (f"{i}.png", queries[0][0], "image/png")) for i in range(3)]
        r = c.post("/v1/search/batch", files=files)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many"
        r = c.post("/v1/search/batch", json={"images_b64": [base64.b64encode(queries[0][0]).decode()] * 3})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many"
        r = c.post("/v1/items", files=files)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many"


def test_chunked_bodies_are_held_to_the_limit(index_dir, trained_dir):
    """Without a Content-Length (chunked), a body is still refused once it passes the route's limit."""
    with make_client(index_dir, trained_dir, max_upload_bytes=10_000) as c:
        def megabyte_json():
            yield b'{"embedding": ['
            for _ in range(1000):
                yield b"0.0," * 250
            yield b"0.0]}"

        r = c.post("/v1/search", content=megabyte_json(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
        r = c.post("/v1/search", content=b"{" + b" " * 1_000_000 + b"}", headers={"content-type": "application/json"})
        assert r.status_code == 413  # declared length
        limit = c.app.state.service.settings.body_limit("/v1/search")
        padded = b'{"embedding": [' + b"1.0, " * 31 + b'1.0], "k": 3}' + b" " * (limit - 200)
        for content in (padded, iter([padded[:1000], padded[1000:]])):  # just under the limit: declared, chunked
            r = c.post("/v1/search", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 200 and len(r.json()["results"]) == 3

        form = httpx.Request("POST", "http://api/v1/search", files={"file": ("big.png", b"\0" * 1_000_000)})
        r = c.post("/v1/search", content=iter([form.read()]), headers={"content-type": form.headers["content-type"]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def stream_to(app, path: str, body: bytes, content_type: str, chunk: int = 1024) -> tuple[httpx.Response, int]:
    """POST `body` to the ASGI app in `chunk`-byte pieces without a Content-Length; the response and how many
    pieces the server pulled."""
    pulled = 0

    async def pieces():
        nonlocal pulled
        for start in range(0, len(body), chunk):
            pulled += 1
            yield body[start:start + chunk]

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
            return await c.post(path, content=pieces(), headers={"content-type": content_type})

    response = asyncio.run(post())
    return response, pulled


def test_chunked_bodies_are_refused_before_they_are_read_in_full(index_dir, trained_dir, queries):
    with make_client(index_dir, trained_dir, max_upload_bytes=10_000, max_batch=2) as c:
        limit = c.app.state.service.settings.body_limit("/v1/search")
        body = b'{"embedding": [' + b"0.0," * 250_000 + b"0.0]}"
        r, pulled = stream_to(c.app, "/v1/search", body, "application/json")
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert pulled <= limit // 1024 + 2 < len(body) // 1024

        many = httpx.Request("POST", "http://api/v1/search/batch",
                             files=[("files", (f"{i}.png", queries[0][0], "image/png")) for i in range(50)])
        body = many.read()
        r, pulled = stream_to(c.app, "/v1/search/batch", body, many.headers["content-type"], chunk=256)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many"
        assert pulled * 256 <= 3 * len(body) // 50 + 256  # stopped at the third of 50 files


def test_unexpected_errors_are_json_500_with_a_request_id(client, queries, monkeypatch, caplog):
    service = client.app.state.service

    def broken(*args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(service.retriever, "search", broken)
    with caplog.at_level(logging.ERROR, logger="app.api"):
        r = search_file(client, queries[0][0])
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == "internal" and error["request_id"] == r.headers["x-request-id"]
    assert "disk went away" not in r.text
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and error["request_id"] in tracebacks[0].getMessage()

    def broken_db(*args, **kwargs):
        raise sqlite3.OperationalError("database disk image is malformed")

    monkeypatch.setattr(service.retriever, "item", broken_db)
    r = client.get("/v1/items/1")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal"


def test_request_ids(client):
    r = client.get("/healthz", headers={"X-Request-ID": "trace-42.a"})
    assert r.headers["x-request-id"] == "trace-42.a"
    generated = {client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
                 for bad in ("has space", "x" * 500, "")}
    assert len(generated) == 3 and all(len(g) == 32 and g.isalnum() for g in generated)
    r = client.get("/v1/items/999999", headers={"X-Request-ID": "abc"})
    assert r.json()["error"]["request_id"] == "abc" == r.headers["x-request-id"]
    assert len(client.get("/v1/index").headers["x-request-id"]) == 32


def test_api_key(index_dir, trained_dir, queries, monkeypatch):
    compared = []
    compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or compare(a, b))
    with make_client(index_dir, trained_dir, api_key=KEY) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200  # open unless the operator asks otherwise
        r = c.get("/v1/index")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert c.get("/v1/index", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/v1/index", headers={"X-API-Key": KEY.encode()[:-2]}).status_code == 401
        assert compared
        assert c.get("/v1/index", headers={"X-API-Key": KEY.encode()}).status_code == 200
        assert c.get("/v1/items/1", headers={"Authorization": b"Bearer " + KEY.encode()}).status_code == 200
        assert c.get("/v1/items/1", headers={"Authorization": b"Basic " + KEY.encode()}).status_code == 401
        assert search_file(c, queries[0][0]).status_code == 401
        assert c.post("/v1/items", json={"images_b64": ["aGk="]}).status_code == 401
        assert c.delete("/v1/items/1").status_code == 401
        assert c.get("/v1/items/1/image").status_code == 401
    with make_client(index_dir, trained_dir, api_key=KEY, metrics_need_key=True) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"X-API-Key": "nope"}).status_code == 401
        assert c.get("/metrics", headers={"X-API-Key": KEY.encode()}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_concurrent_requests_with_different_submodels_match_sequential(client, queries):
    images, _ = queries
    jobs = [(img, spec) for img in images[:6] for spec in ("S", "XL", "S,M,L,XL")]

    def ask(job):
        img, spec = job
        return search_file(client, img, k=5, submodel=spec).json()["results"]

    sequential = [ask(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(ask, jobs))
    for a, b in zip(concurrent, sequential, strict=True):
        assert_same_hits(a, b)


def metric(text: str, sample: str) -> float:
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")), 0.0)


def test_metrics_count_requests_per_endpoint_and_submodel(client, queries):
    mixed = 'matvit_queries_total{submodel="mixnmatch"}'
    mixed_before = metric(client.get("/metrics").text, mixed)
    search_file(client, queries[0][0], submodel="L")
    for spec in ("S,M,L,XL", "XL,L,M,S", "M,M,M,XL"):
        assert search_file(client, queries[0][0], submodel=spec).status_code == 200
    client.request("BREW", "/coffee")
    text = client.get("/metrics").text
    assert 'matvit_requests_total{endpoint="/v1/search",method="POST",status="200"}' in text
    assert 'matvit_queries_total{submodel="L"}' in text
    assert "matvit_request_seconds_bucket" in text and 'matvit_encode_seconds_count{submodel="L"}' in text
    assert metric(text, mixed) == mixed_before + 3  # one label for every Mix'n'Match spec
    assert "M,M,M,XL" not in text and "XL,L,M,S" not in text
    assert 'endpoint="unmatched",method="other"' in text and "BREW" not in text


# --- live updates --------------------------------------------------------------------------------
def ids(hits: list[dict]) -> list[int]:
    return [h["id"] for h in hits]


def test_added_items_are_found_and_deleted_items_never_come_back(own_index, trained_dir, queries):
    images, _ = queries
    with make_client(own_index, trained_dir) as c:
        count = c.get("/v1/index").json()["count"]
        r = c.post("/v1/items", files=[("files", ("a.png", images[0], "image/png")),
                                       ("files", ("b.png", images[1], "image/png"))],
                   data={"labels": ["new-class", ""], "names": ["first", "second"]})
        assert r.status_code == 201, r.text
        added = r.json()["items"]
        assert [a["source"] for a in added] == ["first", "second"] and added[0]["id"] >= count
        assert added[0]["label_name"] == "new-class" and added[1]["label_name"] is None
        assert c.get("/v1/index").json()["count"] == count + 2

        hits = search_file(c, images[0], k=3).json()["results"]
        assert hits[0]["id"] == added[0]["id"] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert hits[0]["label"] == "new-class"
        r = c.get(f"/v1/items/{added[0]['id']}/image")
        assert r.status_code == 200 and r.content == images[0]

        r = c.post("/v1/items", json={"images_b64": [base64.b64encode(images[2]).decode()], "labels": ["7"]})
        assert r.status_code == 201 and r.json()["items"][0]["label_name"] == "7"

        gone = added[0]["id"]
        r = c.delete(f"/v1/items/{gone}")
        assert r.status_code == 200 and r.json() == {"deleted": [gone]}
        assert gone not in ids(search_file(c, images[0], k=1000).json()["results"])
        emb_hits = c.post("/v1/search", json={"embedding": [1.0] * 32, "k": 1000}).json()["results"]
        assert gone not in ids(emb_hits) and len(emb_hits) == 1000
        assert c.get(f"/v1/items/{gone}").status_code == 404
        assert c.get(f"/v1/items/{gone}/image").status_code == 404
        r = c.delete(f"/v1/items/{gone}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert c.get("/v1/index").json()["count"] == count + 2


def test_bad_item_adds_change_nothing(own_index, trained_dir, queries):
    images, _ = queries
    with make_client(own_index, trained_dir, max_pixels=10_000) as c:
        version = c.get("/v1/index").json()["version"]
        good = ("files", ("a.png", images[0], "image/png"))
        r = c.post("/v1/items", files=[good, ("files", ("b.txt", b"not an image", "text/plain"))])
        assert r.status_code == 415 and r.json()["error"]["code"] == "not_an_image"
        r = c.post("/v1/items", files=[good, ("files", ("bomb.png", huge_png_header(9000, 9000), "image/png"))])
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels"
        r = c.post("/v1/items", files=[good], data={"labels": ["a", "b"]})
        assert r.status_code == 422 and "labels" in r.json()["error"]["message"]
        r = c.post("/v1/items", json={"images_b64": [base64.b64encode(images[0]).decode()], "names": ["x", "y"]})
        assert r.status_code == 422
        assert c.post("/v1/items", json={"images_b64": []}).status_code == 422
        assert c.get("/v1/index").json()["version"] == version


def test_writes_while_another_writer_holds_the_index_are_409(own_index, trained_dir, queries):
    with make_client(own_index, trained_dir, write_wait=0.2) as c:
        with writer(own_index):
            r = c.post("/v1/items", files={"files": ("a.png", queries[0][0], "image/png")})
            assert r.status_code == 409 and r.json()["error"]["code"] == "index_busy"
            assert str(own_index) not in r.text and "<index>" in r.text  # what is wrong, not where
            assert c.delete("/v1/items/0").status_code == 409
            assert search_file(c, queries[0][0]).status_code == 200  # readers are never blocked
        assert c.delete("/v1/items/0").status_code == 200


def test_add_and_delete_while_other_threads_search(own_index, trained_dir, queries):
    """Every search sees one whole index version: before the add, after it, or after the delete."""
    image = queries[0][3]
    with make_client(own_index, trained_dir) as c:
        def ask() -> list[dict]:
            r = search_file(c, image, k=5, submodel="S")
            assert r.status_code == 200, r.text
            return r.json()["results"]

        before = ask()
        stop, seen = threading.Event(), []

        def searcher():
            seen.append(ask())
            while not stop.is_set():
                seen.append(ask())

        with ThreadPoolExecutor(max_workers=3) as pool:
            running = [pool.submit(searcher) for _ in range(3)]
            try:
                while len(seen) < 3 and not any(f.done() for f in running):
                    time.sleep(0.01)
                r = c.post("/v1/items", files={"files": ("q.png", image, "image/png")})
                assert r.status_code == 201, r.text
                new_id = r.json()["items"][0]["id"]
                after_add = ask()
                assert c.delete(f"/v1/items/{before[0]['id']}").status_code == 200
                after_delete = ask()
            finally:
                stop.set()
            for future in running:
                future.result()
    assert after_add[0]["id"] == new_id and ids(after_add)[1:] == ids(before)[:4]
    assert after_delete[0]["id"] == new_id and before[0]["id"] not in ids(after_delete)
    states = [before, after_add, after_delete]
    for hits in seen:
        state = next((s for s in states if ids(s) == ids(hits)), None)
        assert state is not None, ids(hits)
        assert_same_hits(hits, state)


def test_openapi_documents_every_endpoint_from_the_models(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path, method in (("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"), ("/v1/index", "get"),
                         ("/v1/submodels", "get"), ("/v1/search", "post"), ("/v1/search/batch", "post"),
                         ("/v1/items", "post"), ("/v1/items/{item_id}", "get"), ("/v1/items/{item_id}", "delete"),
                         ("/v1/items/{item_id}/image", "get")):
        assert method in paths.get(path, {}), (method, path)
    for path, fields in (("/v1/search", ("file", "image_b64")), ("/v1/search/batch", ("files", "images_b64")),
                         ("/v1/items", ("files", "images_b64"))):
        content = paths[path]["post"]["requestBody"]["content"]
        form = content["multipart/form-data"]["schema"]["properties"]
        body = content["application/json"]["schema"]["properties"]
        assert fields[0] in form and fields[1] in body
        if path.startswith("/v1/search"):
            assert form["k"]["maximum"] == body["k"]["maximum"] == 1000
    assert {"APIKeyHeader", "HTTPBearer"} <= set(schema["components"]["securitySchemes"])


def test_search_parameters_override_the_tuned_ones(trained_dir, tmp_path, queries):
    build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "train", 8, 1), tmp_path / "ivf",
                index_key="IVF16,Flat")
    ids, vectors = GalleryIndex.open(tmp_path / "ivf").vectors()
    query = np.asarray(vectors[7]) + 0.05 * np.random.default_rng(0).standard_normal(32).astype(np.float32)
    query /= np.linalg.norm(query)
    exact = np.asarray(ids)[np.argsort(-(np.asarray(vectors) @ query), kind="stable")[:10]].tolist()
    with make_client(tmp_path / "ivf", trained_dir) as c:
        every_list = c.post("/v1/search", json={"embedding": query.tolist(), "k": 10, "nprobe": 16})
        one_list = search_file(c, queries[0][0], k=10, submodel="S", nprobe=1)
        refused = search_file(c, queries[0][0], ef_search=64)
        invalid = search_file(c, queries[0][0], nprobe=0)
    assert [h["id"] for h in every_list.json()["results"]] == exact  # every list visited: exact search
    assert one_list.status_code == 200 and 1 <= len(one_list.json()["results"]) <= 10
    assert refused.status_code == 400 and "ef_search" in refused.json()["error"]["message"]
    assert invalid.status_code == 422


# --- readiness, errors that name no server path, odd inputs --------------------------------------
def wait_until_ready(c: TestClient, seconds: float = 120) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while (r := c.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    return r


def test_a_server_started_before_its_index_is_built_becomes_ready_when_it_is(trained_dir, tmp_path):
    later = tmp_path / "later"
    with make_client(later, trained_dir, index_poll_seconds=0.05) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert "no index yet" in r.text and str(tmp_path) not in r.text
        build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "train", 8, 1), later)
        assert wait_until_ready(c).status_code == 200
        r = c.post("/v1/search", json={"embedding": [1.0] * 32, "k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_an_index_of_another_checkpoint_is_a_lasting_503_until_a_version_of_this_one(own_index, trained_dir,
                                                                                    caplog):
    store = DirectoryStore(own_index)
    fingerprint = store.open().manifest["fingerprint"]

    def write_fingerprint(value: str) -> None:
        with store.writing():
            base = store.open()
            store.commit(base, np.zeros(0, np.int64), np.zeros((0, 32), np.float32), [],
                         {**base.manifest, "fingerprint": value})

    write_fingerprint("0" * 16)
    with caplog.at_level(logging.ERROR, logger="app.api"), make_client(own_index, trained_dir,
                                                                       index_poll_seconds=0.02) as c:
        for _ in range(5):
            r = c.get("/readyz")
            assert r.status_code == 503 and "another checkpoint" in r.json()["error"]["message"]
            assert str(own_index) not in r.text
            time.sleep(0.05)
        not_ready = [rec for rec in caplog.records if "not ready" in rec.getMessage()]
        assert len(not_ready) == 1 and "fingerprint" in not_ready[0].getMessage()  # logged once, as one line
        write_fingerprint(fingerprint)  # a new version, built with this checkpoint
        assert wait_until_ready(c).status_code == 200


def test_errors_name_what_is_wrong_not_where_the_server_keeps_it(client, index_dir, trained_dir, queries):
    r = search_file(client, queries[0][0], mode="cascade")  # no calibrated cascade beside the index
    assert r.status_code == 400 and "matvit cascade" in r.text and str(index_dir) not in r.text
    r = client.post("/v1/search", files={"file": ("q.png", b"\x89PNG not really", "image/png")})
    assert r.status_code == 415 and "BytesIO" not in r.text and " at 0x" not in r.text
    with make_client(index_dir, tmp := trained_dir.parent / "no-such-checkpoint") as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "<checkpoint>" in r.text and str(tmp) not in r.text


def test_embeddings_without_a_direction_are_refused(client):
    for bad in ([0.0] * 32, [1e300] * 32, [3.5e38] + [0.0] * 31, [-1e39] * 32):
        r = client.post("/v1/search", json={"embedding": bad})
        assert r.status_code == 422 and r.json()["error"]["code"] == "bad_embedding", (bad[:2], r.text)
    x = np.random.default_rng(0).standard_normal(32)
    plain = client.post("/v1/search", json={"embedding": x.tolist(), "k": 5}).json()["results"]
    huge = client.post("/v1/search", json={"embedding": (x * 1e37).tolist(), "k": 5}).json()["results"]
    tiny = client.post("/v1/search", json={"embedding": (x * 1e-40).tolist(), "k": 5}).json()["results"]
    assert len(plain) == 5
    assert_same_hits(huge, plain)  # the direction is what counts, however large the finite values
    assert_same_hits(tiny, plain)


def test_a_client_that_disconnects_mid_body_is_counted_499_without_a_traceback(client, caplog):
    pieces = [{"type": "http.request", "body": b'{"embedding": [1.0, ', "more_body": True}]

    async def receive() -> dict:
        return pieces.pop(0) if pieces else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/search", "raw_path": b"/v1/search", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"api"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("api", 80)}
    served = 'matvit_requests_total{endpoint="/v1/search",method="POST",status="%s"}'
    before = client.get("/metrics").text
    with caplog.at_level(logging.INFO, logger="app.api"):
        asyncio.run(client.app(scope, receive, send))
    after = client.get("/metrics").text
    assert not [rec for rec in caplog.records if rec.exc_info]
    assert metric(after, served % "499") == metric(before, served % "499") + 1
    assert metric(after, served % "500") == metric(before, served % "500")
