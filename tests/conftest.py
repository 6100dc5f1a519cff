"""Shared fixtures: a small MatViT and a small MatMamba trained briefly on scikit-learn's digits (seeded, CPU,
seconds), and a folder of awkward images."""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # keep test logs readable; tqdm reads it when first imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from matvit import checkpoint, data  # noqa: E402
from matvit.train import Trainer, TrainOptions  # noqa: E402


@pytest.fixture
def small_digits(monkeypatch):
    """Digits cut to 96 train and 48 test images, so that a whole run takes a few seconds."""
    original = data.load

    def load(name, split, *args, **kwargs):
        ds = original(name, split, *args, **kwargs)
        n = 96 if split == "train" else 48
        return data.ImageSet(ds.images[:n], ds.labels[:n], ds.classes, ds.sources[:n])

    monkeypatch.setattr(data, "load", load)


@pytest.fixture
def digits_consistency(tmp_path, small_digits):
    """A one-seed consistency result of digits (1 epoch, baseline S) and its training cache: `(result, cache)`,
    for the benchmarks on a result's kept MatViTs."""
    from app.bench.consistency import BenchOptions, run

    result, cache = tmp_path / "consistency", tmp_path / "runs"
    run(BenchOptions(dataset="digits", preset="matvit-tiny-digits", epochs=1, baselines=["S"], latency_repeats=1,
                     out=result, cache=cache), log=lambda s: None)
    return result, cache


@pytest.fixture(scope="session")
def trainer(tmp_path_factory) -> Trainer:
    """A finished run of `matvit-tiny-digits`, 8 epochs; its model is the one in memory at the end."""
    out = tmp_path_factory.mktemp("digits-run")
    trainer = Trainer(TrainOptions(preset="matvit-tiny-digits", dataset="digits", out=out, epochs=8))
    trainer.run(log=lambda s: None)
    return trainer


@pytest.fixture(scope="session")
def trained_dir(trainer):
    """The checkpoint directory of that run."""
    return trainer.out


@pytest.fixture(scope="session")
def trained(trained_dir):
    model, meta = checkpoint.load(trained_dir)
    return model


@pytest.fixture(scope="session")
def mamba_trained_dir(tmp_path_factory):
    """A run of `matmamba-tiny-digits` through `matvit train`, 3 epochs: the MatMamba checkpoint the commands'
    tests share."""
    from app.cli import main

    out = tmp_path_factory.mktemp("matmamba-run")
    assert main(["train", "--preset", "matmamba-tiny-digits", "--dataset", "digits", "--out", str(out),
                 "--epochs", "3"]) == 0
    return out


@pytest.fixture(scope="session")
def matryoshka_dir(tmp_path_factory):
    """A run of `matvit-tiny-digits` with Matryoshka dims 8 and 16 (and the full 32) through `matvit train`, 8
    epochs: the checkpoint the prefix searches' tests share."""
    from app.cli import main

    out = tmp_path_factory.mktemp("matryoshka-run")
    assert main(["train", "--preset", "matvit-tiny-digits", "--dataset", "digits", "--out", str(out), "--epochs", "8",
                 "--embed-dims", "8,16"]) == 0
    return out


@pytest.fixture(scope="session")
def matryoshka_index(matryoshka_dir, tmp_path_factory):
    """That checkpoint's XL index of the digits train split (tests that change an index copy it)."""
    from retrieval import build
    from retrieval.encoder import Encoder

    out = tmp_path_factory.mktemp("matryoshka-index") / "index"
    build.build(Encoder.load(matryoshka_dir), build.DatasetSource("digits", "train", 8, 1), out)
    return out


def write_odd_images(root):
    """One image per awkward mode or format, plus corrupt and misnamed files."""
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    rgb.save(root / "cat" / "rgb.jpg")
    rgb.convert("L").save(root / "cat" / "grey.png")
    rgb.convert("RGBA").save(root / "cat" / "rgba.png")
    rgb.convert("P").save(root / "dog" / "palette.gif")
    rgb.convert("CMYK").save(root / "dog" / "cmyk.jpg")
    rgb.save(root / "dog" / "photo.webp")
    Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(root / "dog" / "sixteen.png")
    rgb.resize((1200, 900)).save(root / "dog" / "big.jpg")
    (root / "dog" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "cat" / "truncated.png").write_bytes((root / "cat" / "grey.png").read_bytes()[:60])
    (root / "cat" / "notes.txt").write_text("not an image")
