"""The API's decode limits: a mode-aware cost per image (413 `decode_too_large` over it, before decoding) and
a bound on how many images decode at once (`Settings.decode_slots`)."""

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from matvit import images
from retrieval import build
from retrieval.encoder import Encoder
from tests.app.test_api import make_client


def encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def sixteen_bit(side: int) -> bytes:
    ramp = np.linspace(0, 65535, side * side).reshape(side, side).astype(np.uint16)
    return encoded(ramp)


@pytest.fixture(scope="module")
def index_dir(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("api-decode-index")
    build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "train", 8, 1), out)
    return out


def search(c: TestClient, content: bytes):
    return c.post("/v1/search", files={"file": ("q", content, "application/octet-stream")}, data={"k": "3"})


def test_over_the_decode_limit_is_413_and_under_it_decodes(index_dir, trained_dir):
    """The digits model's input is 8 x 8: a 16-bit 300 x 300 PNG costs more than the limit, a 200 x 200 one less;
    a 1000 x 1000 JPEG, over the limit at full scale, decodes at 1/8 within it. Refused adds add nothing."""
    target = images.GAP * 8
    limit = images.decode_cost("I;16", 300, 300, target) - 1
    assert images.decode_cost("RGB", 1000, 1000, target) > limit > images.decode_cost("RGB", 125, 125, target)
    with make_client(index_dir, trained_dir, max_decode_bytes=limit) as c:
        r = search(c, sixteen_bit(300))
        assert r.status_code == 413 and r.json()["error"]["code"] == "decode_too_large"
        assert "mode I;16" in r.json()["error"]["message"] and f"limit of {limit:,}" in r.json()["error"]["message"]
        r = search(c, encoded(np.full((300, 300, 4), 200, np.uint8)))  # RGBA: the same pixels cost more
        assert r.status_code == 413 and r.json()["error"]["code"] == "decode_too_large"
        for content in (sixteen_bit(200), encoded(np.full((1000, 1000, 3), 90, np.uint8), "JPEG")):
            r = search(c, content)
            assert r.status_code == 200 and len(r.json()["results"]) == 3
        version = c.get("/v1/index").json()["version"]
        r = c.post("/v1/items", files=[("files", ("a.png", sixteen_bit(200), "image/png")),
                                       ("files", ("b.png", sixteen_bit(300), "image/png"))])
        assert r.status_code == 413 and r.json()["error"]["code"] == "decode_too_large"
        assert c.get("/v1/index").json()["version"] == version


def test_decodes_at_once_are_bounded_by_the_decode_slots(index_dir, trained_dir, monkeypatch):
    """Six concurrent uploads with two decode slots: two decode, four wait, and all are answered."""
    active, most, release = [0], [0], threading.Event()
    lock = threading.Lock()
    decode = images.decode

    def held_decode(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            release.wait(timeout=60)
            return decode(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(images, "decode", held_decode)
    with make_client(index_dir, trained_dir, decode_slots=2) as c, ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(search, c, sixteen_bit(40)) for _ in range(6)]
        deadline = time.monotonic() + 60
        while active[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # room for a third decode to start, were it allowed
        assert active[0] == 2
        release.set()
        assert [a.result().status_code for a in answers] == [200] * 6
    assert most[0] == 2
