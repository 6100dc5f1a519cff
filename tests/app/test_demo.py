"""The Streamlit demo: AppTest in process, a real headless Chromium against the served page, and `matvit demo`
stopping with its server."""

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from app.demo import tile_image
from matvit import data
from matvit.images import to_hwc, to_png
from retrieval import build
from retrieval.encoder import Encoder
from retrieval.retriever import Retriever

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "app" / "demo.py")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MAGENTA = (255, 0, 255)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def index_dir(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-index")
    build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "train", 8, 1), out)
    return out


@pytest.fixture(scope="module")
def mamba_demo(mamba_trained_dir, tmp_path_factory):
    """A MatMamba's digits index and its checkpoint."""
    out = tmp_path_factory.mktemp("mamba-demo-index")
    build.build(Encoder.load(mamba_trained_dir), build.DatasetSource("digits", "train", 8, 1), out)
    return out, mamba_trained_dir


def sixteen_bit_png(image: torch.Tensor) -> bytes:
    """A 1 x H x W uint8 image as a 16-bit grey PNG (mode I;16) that decodes back to the same 8-bit values."""
    buffer = io.BytesIO()
    Image.fromarray(image[0].numpy().astype(np.uint16) * 257).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder_index(trained_dir, tmp_path_factory):
    """An index built from a folder of digit PNG files (class per sub-folder), plus one item added through the
    library with a label and a `names` pointing at a magenta picture outside the gallery: (index, the added
    item's image, the outside file)."""
    tmp = tmp_path_factory.mktemp("folder-demo")
    train = data.load("digits", "train", 8, 1)
    for i in range(300):
        folder = tmp / "gallery" / train.classes[int(train.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(to_png(train.images[i]))
    outside = tmp / "secret.png"
    Image.new("RGB", (64, 64), MAGENTA).save(outside)
    index = tmp / "index"
    build.build(Encoder.load(trained_dir), build.FolderSource(tmp / "gallery", 8, 1), index)
    planted = data.load("digits", "test", 8, 1).images[0]
    Retriever(index, trained_dir).add([to_png(planted)], labels=["planted"], names=[str(outside)])
    return index, planted, outside


def use(monkeypatch, index, checkpoint, results):
    monkeypatch.setenv("MATVIT_INDEX", str(index))
    monkeypatch.setenv("MATVIT_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("MATVIT_RESULTS", str(results))


@pytest.fixture
def demo_env(index_dir, trained_dir, monkeypatch, tmp_path):
    use(monkeypatch, index_dir, trained_dir, tmp_path / "no-results")


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


def test_tiles_show_what_the_index_holds_never_a_named_file(folder_index, index_dir, trained_dir):
    """Dataset pixels, a file under the indexed folder, the stored copy of an API upload; an item whose file is
    gone has no picture (a placeholder), and an item's name is never read as a path."""
    index, planted, outside = folder_index
    digits = Retriever(index_dir, trained_dir)
    first = digits.index.items([0])[0]
    native = data.source_image(first["source"])
    assert np.array_equal(tile_image(digits, 0)[..., 0], native[0].numpy())  # the 8 x 8 digit, as RGB
    retriever = Retriever(index, trained_dir)
    items = retriever.index.items(list(range(retriever.index.count)))
    added = next(item for item in items.values() if item["label_name"] == "planted")
    assert added["source"] == str(outside)  # the name is kept as the item's label...
    picture = tile_image(retriever, added["id"])
    assert np.array_equal(picture[..., 0], planted[0].numpy())  # ...but the picture is the stored upload
    assert not (picture == MAGENTA).all(axis=-1).any()
    filed = next(item for item in items.values() if item["label_name"] != "planted")
    on_disk = np.asarray(Image.open(Path(retriever.index.root(filed)["path"]) / filed["path"]))
    assert np.array_equal(tile_image(retriever, filed["id"])[..., 0], on_disk)


def test_a_missing_gallery_file_gets_a_placeholder(trained_dir, tmp_path):
    train = data.load("digits", "train", 8, 1)
    for i in range(3):
        (tmp_path / "gallery" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "gallery" / "a" / f"{i}.png").write_bytes(to_png(train.images[i]))
    build.build(Encoder.load(trained_dir), build.FolderSource(tmp_path / "gallery", 8, 1), tmp_path / "index")
    (tmp_path / "gallery" / "a" / "1.png").unlink()
    retriever = Retriever(tmp_path / "index", trained_dir)
    by_name = {item["path"]: i for i, item in retriever.index.items([0, 1, 2]).items()}
    assert tile_image(retriever, by_name["a/1.png"]) is None
    assert tile_image(retriever, by_name["a/0.png"]) is not None


@pytest.fixture(params=["matvit", "matmamba"])
def any_demo_env(request, monkeypatch, tmp_path):
    """The demo's environment on a MatViT's index and checkpoint, or a MatMamba's."""
    if request.param == "matvit":
        return request.getfixturevalue("demo_env")
    use(monkeypatch, *request.getfixturevalue("mamba_demo"), tmp_path / "no-results")


def test_demo_random_query_shows_results_and_s_vs_xl(any_demo_env):
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
    assert len(at.get("image")) == 31  # the query and every result tile have a picture


def test_demo_on_a_folder_index_with_a_sixteen_bit_upload(folder_index, trained_dir, monkeypatch, tmp_path):
    """A folder-built index's results show their files, and a 16-bit PNG query (mode I;16) is searched and shown;
    the API-added item comes first, as its stored image."""
    index, planted, _ = folder_index
    use(monkeypatch, index, trained_dir, tmp_path / "no-results")
    at = AppTest.from_file(DEMO, default_timeout=120).run()
    at.file_uploader[0].set_value(("query.png", sixteen_bit_png(planted), "image/png")).run()
    assert not at.exception and not at.error
    labels = [label for label, _ in result_marks(at)]
    assert len(labels) == 30 and labels[20] == "planted"  # first of XL's (the same image as the query)
    assert len(at.get("image")) == 31 and not [c for c in at.caption if "no image" in c.value]


def test_demo_refuses_an_upload_over_the_image_limits(demo_env):
    header = Image.new("I;16", (7000, 7000))  # 49M pixels, over the 40M limit: refused from its header
    buffer = io.BytesIO()
    header.save(buffer, format="PNG")
    at = AppTest.from_file(DEMO, default_timeout=120).run()
    at.file_uploader[0].set_value(("huge.png", buffer.getvalue(), "image/png")).run()
    assert not at.exception
    assert "over the limit" in at.error[0].value


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


def test_demo_searches_the_dimensions_a_matryoshka_model_offers(matryoshka_index, matryoshka_dir, monkeypatch,
                                                                tmp_path):
    use(monkeypatch, matryoshka_index, matryoshka_dir, tmp_path / "no-results")
    at = AppTest.from_file(DEMO, default_timeout=120).run()
    dims = next(s for s in at.select_slider if s.label == "Dimensions")
    assert list(dims.options) == ["8", "16", "32"] and dims.value == 32
    dims.set_value(8).run()
    at.button[0].click().run()
    assert not at.exception
    assert "searched 8 dimensions" in at.caption[0].value and "searched 32 dimensions" in at.caption[-1].value
    at.checkbox[0].check().run()
    assert "searched the 8-d prefix's 100 nearest, re-ranked by the full vectors" in at.caption[0].value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen) -> None:
    for _ in range(240):
        assert process.poll() is None, "the demo exited before serving"
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the demo never answered on {url}")


@contextmanager
def served_demo(index: Path, checkpoint: Path, results: Path):
    """`matvit demo` on a free loopback port: yields its URL and process; stopped (SIGTERM) on the way out."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "matvit", "demo", "--index", str(index), "--checkpoint",
                                str(checkpoint), "--results", str(results), "--port", str(port)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process)
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_stopping_matvit_demo_stops_its_server(index_dir, trained_dir, tmp_path):
    """SIGTERM to `matvit demo` ends the Streamlit server it started: nothing is left listening."""
    with served_demo(index_dir, trained_dir, tmp_path) as (url, process):
        (server,) = [int(c) for c in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        left = running(server)
        if left:
            os.kill(server, signal.SIGKILL)
        assert not left, "the Streamlit server outlived `matvit demo`"
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))


def test_demo_in_headless_chromium(folder_index, trained_dir, tmp_path):
    """Serve the demo of a folder-built index with an API-added item on loopback; upload a 16-bit PNG in a real
    Chromium; results appear, each picture is a gallery image (never the file the added item's name points at),
    and the page shows no error. Saves a screenshot."""
    assert Path(CHROMIUM).exists(), "Chromium is missing: apt-get install chromium (make test does this)"
    from playwright.sync_api import sync_playwright

    index, planted, _ = folder_index
    query = tmp_path / "query.png"
    query.write_bytes(sixteen_bit_png(planted))
    with served_demo(index, trained_dir, tmp_path / "no-results") as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(url, timeout=60_000)
        page.get_by_text("Upload an image or draw a random test image").wait_for(timeout=120_000)
        page.locator("input[type=file]").set_input_files(str(query))
        page.get_by_text("GFLOPs").nth(2).wait_for(timeout=120_000)
        page.wait_for_function("() => { const shown = document.querySelectorAll('[data-testid=stMain] img'); "
                               "return shown.length >= 31 && Array.from(shown).every(i => i.complete); }",
                               timeout=120_000)
        page.screenshot(path=str(tmp_path / "demo.png"))
        assert page.locator("[data-testid=stException]").count() == 0
        assert page.get_by_text("planted").count() >= 1  # XL finds the added item (the query's image)
        sources = page.locator("[data-testid=stMain] img").evaluate_all("images => images.map(i => i.src)")
        assert len(sources) == 31  # the query and 30 result tiles
        for src in sources:
            picture = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
            assert not (np.abs(picture.astype(int) - MAGENTA).sum(axis=-1) < 60).any(), f"{src} shows the named file"
        browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000
