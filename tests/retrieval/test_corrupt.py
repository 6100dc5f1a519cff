"""Corrupt files: every command that meets one says so in one line naming the file and what to do (exit 2),
changes nothing, and a server on a corrupt index does not report ready."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.api import Settings, create_app
from app.cli import main
from retrieval.faiss_store import DirectoryStore, GalleryIndex
from retrieval.store import IndexCorrupt

DIM = 32  # the test checkpoint's embedding size, so that `search` gets as far as the index


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def good_index(tmp_path_factory, trained):
    """A 300-item index of synthetic vectors with the test checkpoint's fingerprint."""
    from matvit.checkpoint import fingerprint

    out = tmp_path_factory.mktemp("corrupt") / "index"
    store = DirectoryStore(out)
    ids = np.arange(300)
    rows = [(int(i), f"item-{i}", None, 0, int(i) % 3, 8, 8, "2026-01-01T00:00:00+00:00") for i in ids]
    manifest = {"fingerprint": fingerprint(trained), "submodel": "XL", "dim": DIM, "metric": "inner_product",
                "roots": [{"kind": "dataset", "name": "synthetic"}], "classes": ["a", "b", "c"], "next_id": 300}
    with store.writing():
        store.commit(None, ids, vectors(300), rows, manifest, index_key="Flat")
    return out


def snapshot(directory) -> dict:
    """Every file's hash (the writer's LOCK aside: it only holds a pid while a writer runs)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "LOCK"}


def garbage(n: int) -> bytes:
    return np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes()


def truncate(path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def rewrite_manifest(path, change) -> None:
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(change(manifest)))


CORRUPTIONS = {  # name: (damage done to the live version, words the error must hold)
    "metadata truncated": (lambda v: truncate(v / "metadata.sqlite", 0.3), "metadata.sqlite"),
    "metadata garbage": (lambda v: (v / "metadata.sqlite").write_bytes(garbage(20_000)), "metadata.sqlite"),
    "metadata missing": (lambda v: (v / "metadata.sqlite").unlink(), "metadata.sqlite is missing"),
    "vectors truncated": (lambda v: truncate(v / "vectors.npy"), "vectors.npy"),
    "vectors of another shape": (lambda v: np.save(v / "vectors.npy", vectors(10)), "vectors.npy"),
    "ids garbage": (lambda v: (v / "ids.npy").write_bytes(garbage(500)), "ids.npy"),
    "deleted garbage": (lambda v: (v / "deleted.npy").write_bytes(garbage(50)), "deleted.npy"),
    "faiss truncated": (lambda v: truncate(v / "index.faiss"), "index.faiss"),
    "manifest a list": (lambda v: (v / "manifest.json").write_text("[1, 2]"), "manifest is a list"),
    "manifest binary": (lambda v: (v / "manifest.json").write_bytes(garbage(100)), "manifest.json"),
    "manifest count a string": (lambda v: rewrite_manifest(v / "manifest.json", lambda m: {**m, "count": "300"}),
                                "count is a string, not an integer"),
    "manifest roots an object": (lambda v: rewrite_manifest(v / "manifest.json", lambda m: {**m, "roots": {}}),
                                 "roots is an object, not a list"),
    "manifest classes numbers": (lambda v: rewrite_manifest(v / "manifest.json", lambda m: {**m, "classes": [1]}),
                                 "classes"),
    "manifest dim negative": (lambda v: rewrite_manifest(v / "manifest.json", lambda m: {**m, "dim": -1}), "dim -1"),
    "CURRENT binary": (lambda v: (v.parent / "CURRENT").write_bytes(b"\xff\xfe\x00\x01"),
                       "CURRENT file holds no version name"),
    "CURRENT outside": (lambda v: (v.parent / "CURRENT").write_text("../../etc"), "CURRENT file holds no version"),
}


@pytest.fixture(params=list(CORRUPTIONS))
def corrupt(request, good_index, tmp_path):
    """A copy of the good index with one file damaged: (index directory, words its error must hold)."""
    index = shutil.copytree(good_index, tmp_path / "index")
    damage, words = CORRUPTIONS[request.param]
    damage(index / (index / "CURRENT").read_text())
    return index, words


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("matvit: error: "), captured.err
    return lines[0]


def test_corrupt_index_files_are_one_line_errors_and_nothing_changes(corrupt, trained_dir, tmp_path, capsys):
    index, words = corrupt
    before = snapshot(index)
    query = tmp_path / "q.png"
    from PIL import Image
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(query)
    for argv in (["search", "--index", str(index), "--checkpoint", str(trained_dir), "--image", str(query)],
                 ["index", "info", "--index", str(index)],
                 ["index", "remove", "--index", str(index), "--ids", "3"],
                 ["index", "rebuild", "--index", str(index)]):
        assert main(argv) == 2, argv
        line = one_line_error(capsys)
        assert words in line and ("build-index" in line or "CURRENT" in line), line
    assert snapshot(index) == before  # nothing written, nothing removed
    with pytest.raises(IndexCorrupt, match="is corrupt"):
        GalleryIndex.open(index)


def test_a_good_index_still_opens(good_index):
    opened = GalleryIndex.open(good_index)
    assert opened.count == 300 and opened.item(5)["source"] == "item-5"


def test_a_server_on_a_corrupt_index_is_not_ready(corrupt, trained_dir):
    index, words = corrupt
    app = create_app(Settings(index=index, checkpoint=trained_dir), load_in_background=False)
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        message = r.json()["error"]["message"]
        assert words in message and str(index) not in message and str(index.parent) not in message
        assert c.post("/v1/search", json={"embedding": [1.0] * DIM}).status_code == 503


@pytest.fixture
def damaged_checkpoint(trained_dir, tmp_path):
    checkpoint = shutil.copytree(trained_dir, tmp_path / "checkpoint")
    return checkpoint


@pytest.mark.parametrize("damage, words", [
    (lambda c: truncate(c / "model.safetensors", 0.5), "model.safetensors is damaged"),
    (lambda c: truncate(c / "model.safetensors", 0.0001), "model.safetensors is damaged"),
    (lambda c: (c / "model.safetensors").write_bytes(garbage(4000)), "model.safetensors is damaged"),
    (lambda c: (c / "config.json").write_text("[]"), "config.json is not a matvit checkpoint config"),
    (lambda c: (c / "config.json").write_text('{"model": {"depth": "four"}}'), "config.json does not describe"),
])
def test_a_damaged_checkpoint_is_one_line(damaged_checkpoint, good_index, damage, words, tmp_path, capsys):
    damage(damaged_checkpoint)
    out = tmp_path / "new-index"
    for argv in (["search", "--index", str(good_index), "--checkpoint", str(damaged_checkpoint), "--image", "q.png"],
                 ["build-index", "--checkpoint", str(damaged_checkpoint), "--dataset", "digits", "--out", str(out)],
                 ["export", "--checkpoint", str(damaged_checkpoint), "--out", str(tmp_path / "export")]):
        assert main(argv) == 2, argv
        line = one_line_error(capsys)
        assert words in line and str(damaged_checkpoint) in line, line
    assert not (out / "CURRENT").exists()


def test_export_under_a_file_is_one_line(trained_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert main(["export", "--checkpoint", str(trained_dir), "--out", str(tmp_path / "afile" / "sub")]) == 2
    line = one_line_error(capsys)
    assert f"{tmp_path / 'afile'} is a file, not a directory" in line
    assert (tmp_path / "afile").read_text() == "mine"
    assert main(["export", "--checkpoint", str(trained_dir), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in one_line_error(capsys)
