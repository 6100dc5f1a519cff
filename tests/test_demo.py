"""The Streamlit demo: AppTest in process, and a real headless Chromium against the served page."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from app.demo import picture
from matvit import data
from matvit.images import to_hwc, to_png
from retrieval import build
from retrieval.encoder import Encoder
from retrieval.retriever import Retriever

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "app" / "demo.py")
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


def result_marks(at) -> list[tuple[str, str]]:
    """(label, mark) of every result tile on the page."""
    tiles = [m.value for m in at.markdown if m.value.startswith("#")]
    return [(t.split("`")[1], t.split("`")[2].split()[0]) for t in tiles]


def test_images_become_hwc_arrays_and_png_files():
    grey = torch.randint(0, 256, (1, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rgb = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert to_hwc(grey).shape == (5, 7) and to_hwc(rgb).shape == (5, 7, 3) and to_hwc(rgb).dtype == np.uint8
    assert to_hwc(rgb)[2, 3].tolist() == rgb[:, 2, 3].tolist()
    for image in (grey, rgb):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(to_png(image)))), to_hwc(image))
    digits = data.load("digits", "train", 8, 1)
    assert np.array_equal(picture(digits.sources[0]), digits.images[0, 0].numpy())  # native 8 x 8 digit
    assert picture("cat/photo.jpg") == "cat/photo.jpg"


def test_demo_random_query_shows_results_and_s_vs_xl(demo_env):
    at = AppTest.from_file(DEMO, default_timeout=120).run()
    assert not at.exception
    assert "1,437 items" in at.markdown[0].value
    at.button[0].click().run()
    assert not at.exception
    assert [s.value for s in at.subheader] == ["Results", "S and XL side by side, same query, same XL index"]
    captions = " ".join(c.value for c in at.caption)
    assert "**S**" in captions and "**XL**" in captions and "GFLOPs" in captions
    marks = result_marks(at)
    assert len(marks) == 30 and {m for _, m in marks} <= {"✅", "❌"}  # 10 chosen + 10 S + 10 XL, all marked


def test_demo_marks_correct_labels(demo_env, index_dir, trained_dir):
    queries = data.load("digits", "test", 8, 1)
    top = Retriever(index_dir, trained_dir).search(queries.images[:20], k=1, submodel="XL")
    pick = next(i for i, r in enumerate(top) if r.neighbours[0]["label"] == queries.classes[int(queries.labels[i])])
    true_label = queries.classes[int(queries.labels[pick])]
    at = AppTest.from_file(DEMO, default_timeout=120).run()
    at.session_state["pick"] = pick
    at.run()
    assert not at.exception
    marks = result_marks(at)
    assert marks and all((m == "✅") == (label == true_label) for label, m in marks)
    assert "✅" in {m for _, m in marks}


def test_demo_budget_slider_and_bad_spec(demo_env):
    at = AppTest.from_file(DEMO, default_timeout=120).run()
    at.radio[0].set_value("latency budget").run()
    at.button[0].click().run()
    assert not at.exception and at.slider[0].label.startswith("Latency budget")
    assert "within" in " ".join(c.value for c in at.caption)
    at.radio[0].set_value("Mix'n'Match spec").run()
    at.text_input[0].set_value("S,XXL,M,L").run()
    assert "unknown granularity 'XXL'" in at.error[0].value


def test_demo_in_headless_chromium(index_dir, trained_dir, tmp_path):
    """Serve the demo on loopback, upload an image in a real Chromium, see results appear, save a screenshot."""
    assert Path(CHROMIUM).exists(), "Chromium is missing: apt-get install chromium (make test does this)"
    shot = tmp_path / "demo.png"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_demo.py"), "--index", str(index_dir),
                    "--checkpoint", str(trained_dir), "--out", str(shot)],
                   check=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
