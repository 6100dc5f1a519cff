"""The Milvus Lite workflow as a user runs it: each command in its own process, reading what the one before wrote."""

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from streamlit.testing.v1 import AppTest

from matvit import data

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def matvit(*args: str, status: int = 0) -> str:
    """Run `matvit ARGS` in a new process; its stdout (its stderr when it is to fail)."""
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)
    assert done.returncode == status, done.stderr[-3000:]
    return done.stdout if status == 0 else done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`matvit serve` in its own process, until the block ends (then stopped as an operator stops it)."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.args = [*args, "--port", str(self.port)]

    def __enter__(self) -> httpx.Client:
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", *self.args], env=ENV, cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.client.get("/readyz").status_code == 200:
                    return self.client
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise AssertionError(f"the server did not get ready: {self.process.stderr.read()[-3000:]}")

    def __exit__(self, *_) -> None:
        self.client.close()
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()


def test_each_command_reads_what_the_one_before_wrote(trained_dir, tmp_path, monkeypatch):
    test, train = data.load("digits", "test", 8, 1), data.load("digits", "train", 8, 1)
    spec, checkpoint = f"milvus:{tmp_path / 'g.db'}", ["--checkpoint", str(trained_dir)]
    query = tmp_path / "q.png"
    query.write_bytes(png(test.images[5, 0].numpy()))
    folder = tmp_path / "more"
    for i in range(3):
        (folder / f"class{i}").mkdir(parents=True)
        (folder / f"class{i}" / f"{i}.png").write_bytes(png(train.images[i, 0].numpy()))

    assert '"count": 360' in matvit("build-index", *checkpoint, "--dataset", "digits", "--split", "test",
                                    "--store", spec, "--workers", "0")
    found = matvit("search", "--index", spec, *checkpoint, "--image", str(query), "-k", "1", "--json")
    assert '"id": 5,' in found  # the collection a new process opens is searchable
    assert '"count": 363' in matvit("index", "add", "--index", spec, *checkpoint, "--images", str(folder),
                                    "--workers", "0")
    assert matvit("index", "remove", "--index", spec, "--ids", "5").strip() == '{"removed": [5]}'
    assert '"index_key": "HNSW16"' in matvit("index", "rebuild", "--index", spec, "--index-key", "HNSW16")
    info = matvit("index", "info", "--index", spec)
    assert '"count": 362' in info and '"next_id": 363' in info and '"version": "matvit_v000002@' in info

    with Server("--index", spec, *checkpoint) as api:
        index = api.get("/v1/index").json()
        assert (index["count"], index["index_key"]) == (362, "HNSW16")
        r = api.post("/v1/search", files={"file": ("q.png", png(train.images[1, 0].numpy()), "image/png")},
                     data={"k": "1"})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == 361  # an image `index add` added
        r = api.post("/v1/items", files=[("files", ("n.png", png(test.images[7, 0].numpy()), "image/png"))],
                     data={"labels": "new"})
        assert r.status_code == 201 and r.json()["items"][0]["id"] == 363, r.text
        assert api.delete("/v1/items/360").json() == {"deleted": [360]}
        # Milvus Lite serves one process at a time: another command gets one line, at once
        refused = matvit("search", "--index", spec, *checkpoint, "--image", str(query), status=2)
        assert refused.splitlines() == [f"matvit: error: {spec} is open in another process (Milvus Lite serves "
                                        "one process at a time): stop that process, send the change through its "
                                        "API, or use a Milvus server"]

    with Server("--index", spec, *checkpoint) as api:  # restarted: what the last server wrote is there
        assert api.get("/v1/index").json()["count"] == 362
        assert api.get("/v1/items/363").json()["label_name"] == "new" and api.get("/v1/items/360").status_code == 404
        r = api.post("/v1/search", files={"file": ("q.png", png(test.images[7, 0].numpy()), "image/png")},
                     data={"k": "2"})
        assert {h["id"] for h in r.json()["results"]} == {7, 363}  # the same image, in the build and from the API

    monkeypatch.setenv("MATVIT_INDEX", spec)  # the demo opens the store in its own process too (this one)
    monkeypatch.setenv("MATVIT_CHECKPOINT", str(trained_dir))
    monkeypatch.setenv("MATVIT_RESULTS", str(tmp_path / "no-results"))
    at = AppTest.from_file(str(ROOT / "app" / "demo.py"), default_timeout=120).run()
    at.button[0].click().run()
    assert not at.exception and not at.error and "362 items" in at.markdown[0].value
    assert any(m.value.startswith("#1 ") for m in at.markdown)  # results were found
