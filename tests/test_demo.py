"""The Streamlit demo: AppTest in process, and a real headless Chromium against the served page."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from retrieval import build
from retrieval.encoder import Encoder

DEMO = str(Path(__file__).resolve().parent.parent / "app" / "demo.py")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def index_dir(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-index")
    build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "train", 8, 1), out)
    return out


@pytest.fixture
def demo_env(index_dir, trained_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MATVIT_INDEX", str(index_dir))
    monkeypatch.setenv("MATVIT_CHECKPOINT", str(trained_dir))
    monkeypatch.setenv("MATVIT_RESULTS", str(tmp_path / "no-results"))


def test_demo_random_query_shows_results_and_s_vs_xl(demo_env):
    at = AppTest.from_file(DEMO, default_timeout=120).run()
    assert not at.exception
    assert "1,437 items" in at.markdown[0].value
    at.button[0].click().run()
    assert not at.exception
    assert [s.value for s in at.subheader] == ["Results", "S and XL side by side, same query, same XL index"]
    captions = " ".join(c.value for c in at.caption)
    assert "**S**" in captions and "**XL**" in captions and "GFLOPs" in captions
    marks = " ".join(m.value for m in at.markdown)
    assert "✅" in marks  # correct labels are marked


def test_demo_budget_slider_and_bad_spec(demo_env):
    at = AppTest.from_file(DEMO, default_timeout=120).run()
    at.radio[0].set_value("latency budget").run()
    at.button[0].click().run()
    assert not at.exception and at.slider[0].label.startswith("Latency budget")
    assert "within" in " ".join(c.value for c in at.caption)
    at.radio[0].set_value("Mix'n'Match spec").run()
    at.text_input[0].set_value("S,XXL,M,L").run()
    assert "unknown granularity 'XXL'" in at.error[0].value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_in_headless_chromium(index_dir, trained_dir, tmp_path):
    """Serve the demo on loopback, upload an image in a real browser, and see results appear."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is missing: apt-get install chromium (make test does this)"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", DEMO, "--server.headless", "true", "--server.address",
         "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false", "--",
         "--index", str(index_dir), "--checkpoint", str(trained_dir), "--results", str(tmp_path / "none")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        query = tmp_path / "query.png"
        Image.fromarray(np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))).save(query)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, timeout=60_000)
            page.get_by_text("Upload an image or draw a random test image").wait_for(timeout=60_000)
            page.locator("input[type=file]").set_input_files(str(query))
            page.get_by_text("S and XL side by side").wait_for(timeout=60_000)
            assert page.get_by_text("GFLOPs").count() >= 3
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            browser.close()
        assert (tmp_path / "demo.png").stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(timeout=30)
