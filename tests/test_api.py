"""The REST API through FastAPI's test client: every endpoint, every error code, concurrency, the API key."""

import base64
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.api import Settings, create_app
from matvit import data
from retrieval import build
from retrieval.encoder import Encoder


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


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def queries():
    test = data.load("digits", "test", 8, 1)
    return [png(img[0].numpy()) for img in test.images[:12]], test.labels[:12].tolist()


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_not_ready_is_503_with_json_error(tmp_path, trained_dir):
    with make_client(tmp_path / "missing", trained_dir) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert "no index at" in r.json()["error"]["message"]
        assert c.post("/v1/search", json={"embedding": [0.0] * 32}).status_code == 503
        assert c.get("/healthz").status_code == 200


def test_index_and_submodels(client):
    info = client.get("/v1/index").json()
    assert info["count"] == 1437 and info["dimension"] == 32 and info["submodel"] == "XL"
    rows = client.get("/v1/submodels").json()
    assert [r["spec"] for r in rows][:4] == ["S", "M", "L", "XL"]
    assert all(r["gflops"] > 0 and r["params"] > 0 and r["latency_ms_b1"] > 0 for r in rows)


def test_search_multipart_json_and_embedding(client, queries):
    images, labels = queries
    r = client.post("/v1/search", files={"file": ("q.png", images[0], "image/png")}, data={"k": "5", "submodel": "S"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    assert body["submodel"]["spec"] == "S" and set(body["timings_ms"]) == {"decode", "encode", "search", "total"}
    top1 = [client.post("/v1/search", files={"file": ("q.png", img, "image/png")}, data={"k": "1", "submodel": "S"})
            .json()["results"][0]["label"] for img in images]
    assert np.mean([t == str(y) for t, y in zip(top1, labels, strict=True)]) >= 0.5  # chance is 0.1

    r = client.post("/v1/search", json={"image_b64": base64.b64encode(images[0]).decode(), "k": 5, "submodel": "S"})
    assert r.json()["results"] == body["results"]

    r = client.post("/v1/search", json={"image_b64": base64.b64encode(images[1]).decode(), "budget_gflops": 0.0009})
    assert r.status_code == 200 and r.json()["submodel"]["spec"] == "S" and len(r.json()["results"]) == 10

    gallery_item = client.get("/v1/items/0").json()
    assert gallery_item["id"] == 0 and gallery_item["source"].startswith("digits:")
    emb = [0.0] * 32
    emb[3] = 1.0
    r = client.post("/v1/search", json={"embedding": emb, "k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3 and r.json()["submodel"] is None


def test_batch_search(client, queries):
    images, _ = queries
    files = [("files", (f"{i}.png", img, "image/png")) for i, img in enumerate(images[:3])]
    r = client.post("/v1/search/batch", files=files, data={"k": "2", "submodel": "M"})
    assert r.status_code == 200, r.text
    responses = r.json()["responses"]
    assert len(responses) == 3 and all(len(x["results"]) == 2 for x in responses)
    single = client.post("/v1/search", files={"file": ("q.png", images[1], "image/png")}, data={"k": "2",
                                                                                              "submodel": "M"})
    assert responses[1]["results"] == single.json()["results"]
    r = client.post("/v1/search/batch", json={"images_b64": [base64.b64encode(i).decode() for i in images[:2]]})
    assert r.status_code == 200 and len(r.json()["responses"]) == 2


def test_items_and_images(client, index_dir, trained_dir, tmp_path):
    r = client.get("/v1/items/5/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (8, 8)
    assert client.get("/v1/items/999999").json()["error"]["code"] == "not_found"
    assert client.get("/v1/items/999999/image").status_code == 404
    assert client.get("/v1/items/9223372036854775808").status_code == 422
    assert client.get("/v1/items/-1").status_code == 422
    assert client.get("/v1/items/..%2F..%2Fetc%2Fpasswd/image").status_code in (404, 422)

    folder = tmp_path / "gallery" / "cat"
    folder.mkdir(parents=True)
    photo = png(np.full((20, 30, 3), 200, dtype=np.uint8))
    (folder / "a.png").write_bytes(photo)
    build.build(Encoder.load(trained_dir), build.FolderSource(tmp_path / "gallery", 8, 1, workers=0),
                tmp_path / "idx")
    with make_client(tmp_path / "idx", trained_dir) as c:
        r = c.get("/v1/items/0/image")
        assert r.status_code == 200 and r.content == photo
        (folder / "a.png").unlink()
        assert c.get("/v1/items/0/image").status_code == 404


@pytest.mark.parametrize("kwargs, status, code", [
    ({"data": {"submodel": "S,XXL"}}, 400, "bad_request"),
    ({"data": {"k": "0"}}, 422, "validation_error"),
    ({"data": {"k": "1001"}}, 422, "validation_error"),
    ({"data": {"submodel": "S", "budget_ms": "3"}}, 422, "validation_error"),
    ({"data": {"budget_gflops": "0.0000001"}}, 400, "bad_request"),
])
def test_bad_parameters(client, queries, kwargs, status, code):
    r = client.post("/v1/search", files={"file": ("q.png", queries[0][0], "image/png")}, **kwargs)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


def test_bad_bodies(client):
    assert client.post("/v1/search", files={"file": ("q.txt", b"hello", "text/plain")}).status_code == 415
    assert client.post("/v1/search", content=b"hello", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/v1/search", content=b"{oops", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/v1/search", json={"image_b64": "***"}).json()["error"]["code"] == "bad_base64"
    assert client.post("/v1/search", json={"k": 3}).status_code == 422
    assert client.post("/v1/search", json={"embedding": [1.0, 2.0]}).status_code == 400
    assert client.post("/v1/search", data={"k": "3"}, files={"other": ("x", b"x")}).status_code == 422
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
        r = c.post("/v1/search", files={"file": ("bomb.png", huge_png_header(50_000, 50_000), "image/png")})
        assert r.status_code == 413 and "pixels" in r.json()["error"]["message"] + r.json()["error"]["code"]
        r = c.post("/v1/search", files={"file": ("wide.png", png(np.zeros((10, 2000), np.uint8)), "image/png")})
        assert r.status_code == 413
        files = [("files", (f"{i}.png", queries[0][0], "image/png")) for i in range(3)]
        assert c.post("/v1/search/batch", files=files).status_code == 413


def test_api_key(index_dir, trained_dir, queries):
    with make_client(index_dir, trained_dir, api_key="s3cret") as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        r = c.get("/v1/index")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert c.get("/v1/index", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/v1/index", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/v1/items/1", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/v1/search", files={"file": ("q.png", queries[0][0], "image/png")})
        assert r.status_code == 401


def test_concurrent_requests_with_different_submodels_match_sequential(client, queries):
    images, _ = queries
    jobs = [(img, spec) for img in images[:6] for spec in ("S", "XL", "S,M,L,XL")]

    def ask(job):
        img, spec = job
        r = client.post("/v1/search", files={"file": ("q.png", img, "image/png")}, data={"k": "5", "submodel": spec})
        return [(h["id"], round(h["score"], 5)) for h in r.json()["results"]]

    sequential = [ask(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(ask, jobs))
    assert concurrent == sequential


def test_metrics_count_requests_per_endpoint_and_submodel(client, queries):
    client.post("/v1/search", files={"file": ("q.png", queries[0][0], "image/png")}, data={"submodel": "L"})
    text = client.get("/metrics").text
    assert 'matvit_requests_total{endpoint="/v1/search",method="POST",status="200"}' in text
    assert 'matvit_queries_total{submodel="L"}' in text
    assert "matvit_request_seconds_bucket" in text and 'matvit_encode_seconds_count{submodel="L"}' in text


def test_openapi_documents_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/healthz", "/readyz", "/metrics", "/v1/index", "/v1/submodels", "/v1/search", "/v1/search/batch",
                 "/v1/items/{item_id}", "/v1/items/{item_id}/image"):
        assert path in paths, path
    content = paths["/v1/search"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
