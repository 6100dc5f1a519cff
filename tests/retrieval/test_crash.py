"""Crash safety, tested the way SQLite tests it: every write (build, add, remove, rebuild, the API's item add
and delete) is killed with SIGKILL at every step boundary (`retrieval.store.crash_point`, set through
MATVIT_CRASH_AT), then resumed or run again at once, each command in a new process. After the kill the live
version opens and is exactly the one before the write, or exactly the one after it; after the rerun the index
is exactly what one uninterrupted write makes: the same ids and items, none twice, ids never reused, nothing
left aside. A full disk (ENOSPC) undoes the write and says so in one line."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from matvit import data
from retrieval import build, commit, embedding, jobs
from retrieval.encoder import Encoder
from retrieval.faiss_store import GalleryIndex
from retrieval.store import CRASH_AT, DiskFull, IndexBusy, is_disk_full, writer

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 4  # images per chunk file: 20 images make 5 chunks

# where each write is killed; the points from `version.switched` on come after the new version is live
JOB_POINTS = ["job.prepared", "job.chunk:1", "job.chunk:3", "version.staged", "version.renamed", "version.switched",
              "version.pruned", "job.committed", "job.cleaning", "job.done"]
VERSION_POINTS = ["version.staged", "version.renamed", "version.switched", "version.pruned"]
POINTS = {"build": JOB_POINTS, "add": JOB_POINTS, "remove": VERSION_POINTS + ["remove.committed"],
          "rebuild": VERSION_POINTS, "api_add": ["uploads.written"] + VERSION_POINTS,
          "api_delete": VERSION_POINTS + ["remove.committed"]}
LIVE_AFTER = {"version.switched", "version.pruned", "job.committed", "job.cleaning", "job.done", "remove.committed"}
CASES = [(write, point) for write, points in POINTS.items() for point in points]


class Runner:
    """`tests/retrieval/crashrun.py`: each command in a new process (a fork of one that imported matvit once)."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "tests.retrieval.crashrun"], cwd=ROOT, env=env,
                                        text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def __call__(self, request: dict, crash_at: str | None = None) -> dict:
        env = {CRASH_AT: crash_at} if crash_at else {}
        self.process.stdin.write(json.dumps({**request, "env": env, "chunk": CHUNK}) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def run():
    runner = Runner()
    yield runner
    runner.close()


def write_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(image[0]).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Two small galleries (20 images in two classes, 12 in a third) and three images to upload."""
    root = tmp_path_factory.mktemp("crash-images")
    images = data.load("digits", "test", 8, 1).images.numpy()
    write_pngs(root / "g1" / "a", images[:10])
    write_pngs(root / "g1" / "b", images[10:20])
    write_pngs(root / "g2" / "c", images[20:32])
    return {"g1": root / "g1", "g2": root / "g2", "uploads": write_pngs(root / "up", images[40:43])}


def requests(files: dict, checkpoint: Path) -> dict:
    """Each write as the runner takes it, given the index directory."""
    ck = str(checkpoint)
    job = ["--checkpoint", ck, "--batch-size", "2", "--workers", "2"]
    return {
        "build": lambda idx, gallery="g1": {"argv": ["build-index", *job, "--index-key", "Flat", "--out", str(idx),
                                                     "--images", str(files[gallery])]},
        "add": lambda idx: {"argv": ["index", "add", "--index", str(idx), *job, "--images", str(files["g2"])]},
        "remove": lambda idx: {"argv": ["index", "remove", "--index", str(idx), "--ids", "3,21"]},
        "rebuild": lambda idx: {"argv": ["index", "rebuild", "--index", str(idx), "--index-key", "HNSW32"]},
        "api_add": lambda idx: {"call": "api_add", "index": str(idx), "checkpoint": ck,
                                "images": [str(p) for p in files["uploads"][:2]]},
        "api_delete": lambda idx: {"call": "api_delete", "index": str(idx), "checkpoint": ck, "ids": [20, 5]},
    }


@pytest.fixture(scope="module")
def world(run, files, trained_dir, tmp_path_factory) -> dict:
    """The writes, the index each starts from (built once), and the index each makes when not interrupted."""
    root = tmp_path_factory.mktemp("crash-indexes")
    writes = requests(files, trained_dir)
    other, base = root / "other", root / "base"  # a build replaces another gallery's index
    for request in (writes["build"](other, "g2"), writes["build"](base),
                    {**writes["api_add"](base), "images": [str(p) for p in files["uploads"]]}):
        ok = run(request)
        assert ok["status"] == 0, ok["output"]
    starts = {write: other if write == "build" else base for write in writes}
    expected = {}
    for write, request in writes.items():
        shutil.copytree(starts[write], root / f"expected-{write}")
        ok = run(request(root / f"expected-{write}"))
        assert ok["status"] == 0, ok["output"]
        expected[write] = snapshot(root / f"expected-{write}")
    return {"writes": writes, "starts": starts, "expected": expected}


def snapshot(idx: Path) -> dict:
    """What the live version holds (it must open and answer a search)."""
    gallery = GalleryIndex.open(idx)
    try:
        ids, vectors = (np.array(a) for a in gallery.vectors())
        hits = gallery.search(vectors[:1], 1)[1]
        assert hits[0, 0] == ids[0]
        items = {i: {k: v for k, v in item.items() if k != "added_at"} for i, item in gallery.items(ids).items()}
        return {"version": gallery.version, "ids": ids.tolist(), "vectors": vectors, "items": items,
                "count": gallery.count, "next_id": gallery.manifest["next_id"], "manifest": gallery.manifest,
                "key": gallery.manifest["index_key"]}
    finally:
        os.close(gallery.lease)
        gallery.lease = None


def assert_same(got: dict, want: dict) -> None:
    assert got["ids"] == want["ids"] and got["count"] == want["count"] == len(got["ids"])
    assert got["items"] == want["items"] and got["next_id"] == want["next_id"] and got["key"] == want["key"]
    np.testing.assert_allclose(got["vectors"], want["vectors"], atol=1e-5)  # resumed: batched differently


def assert_whole(idx: Path, live: dict) -> None:
    """No item twice, ids never reused, every upload file an item's, nothing left aside by the killed write."""
    items = list(live["items"].values())
    assert len({(i["root"], i["path"] or i["source"]) for i in items}) == len(items)
    assert max(live["ids"]) < live["next_id"] and len(set(live["ids"])) == len(live["ids"])
    versions = sorted((p.name for p in idx.glob("v[0-9]*") if p.name[1:].isdigit()), key=lambda n: int(n[1:]))
    assert versions[-1] == live["version"]
    left = [p.name for pattern in ("v*.tmp", "CURRENT.*", "building*", "ondisk.tmp", "uploads/.*")
            for p in idx.glob(pattern)]
    assert left == []
    uploads = {i["path"] for i in items if live["manifest"]["roots"][i["root"]]["kind"] == "uploads"}
    assert {p.name for p in (idx / "uploads").glob("*")} == uploads
    assert not jobs.unfinished(idx, live["manifest"])


@pytest.mark.parametrize(("write", "point"), CASES)
def test_a_write_killed_at_any_step_leaves_one_whole_version_and_a_rerun_finishes_it(write, point, world, run,
                                                                                      tmp_path):
    idx = shutil.copytree(world["starts"][write], tmp_path / "index")
    before, expected = snapshot(idx), world["expected"][write]
    request = world["writes"][write](idx)

    killed = run(request, crash_at=point)
    assert killed["status"] == -signal.SIGKILL, f"never reached {point}: {killed['output']}"
    live = snapshot(idx)
    done = point.partition(":")[0] in LIVE_AFTER
    assert_same(live, expected if done else before)
    if not done:  # the previous version intact until the new one is whole
        assert live["version"] == before["version"]
    info = run({"argv": ["index", "info", "--index", str(idx)]})
    assert info["status"] == 0, info["output"]
    unfinished = json.loads(info["output"][info["output"].index("{"):])["unfinished_build"]
    assert unfinished == (write in ("build", "add") and not done)  # a finished write reads as finished

    if not (done and write == "api_add"):  # the client saw no answer: it checks, and sends again only if missing
        again = run({**request, "argv": request["argv"] + ["--resume"]} if write in ("build", "add") else request)
        if done and write in ("remove", "api_delete"):
            assert again["status"] == 2 and "no item with id" in again["output"]
        else:
            assert again["status"] == 0, again["output"]
            assert "is being written by another process" not in again["output"]
        if done and write in ("build", "add"):
            assert '"already_finished": true' in again["output"]
    final = snapshot(idx)
    assert_same(final, expected)
    assert_whole(idx, final)


def test_every_crash_point_is_tested():
    named = {m for path in (ROOT / "retrieval").glob("*.py")
             for m in re.findall(r'crash_point\("([^"]+)"\)', path.read_text())}
    tested = {point.partition(":")[0] for _, point in CASES}
    assert named - {p for p in named if p.startswith("milvus.")} == tested


def test_a_resume_never_writes_over_a_chunk_and_commits_every_image(world, run, tmp_path):
    """Chunks lost before a resume (as when a clean-up was killed part way) are embedded again under new numbers,
    not over the chunks that remain; the version holds every image."""
    idx = shutil.copytree(world["starts"]["build"], tmp_path / "index")
    request = world["writes"]["build"](idx)
    assert run(request, crash_at="version.staged")["status"] == -signal.SIGKILL
    chunks = sorted((idx / "building").glob("chunk-*.npz"))
    assert len(chunks) == 5  # 20 images, CHUNK 4
    for chunk in chunks[:2]:
        chunk.unlink()
    again = run({**request, "argv": request["argv"] + ["--resume"]})
    assert again["status"] == 0, again["output"]
    assert "resuming: 12 image(s) already embedded" in again["output"]
    assert_same(snapshot(idx), world["expected"]["build"])


def test_a_commit_refuses_chunks_that_miss_images(world, run, encoder, files, tmp_path):
    idx = shutil.copytree(world["starts"]["build"], tmp_path / "index")
    assert run(world["writes"]["build"](idx), crash_at="version.staged")["status"] == -signal.SIGKILL
    before = snapshot(idx)
    source = build.FolderSource(files["g1"], 8, 1, workers=0)
    job = {"kind": "build", "fingerprint": encoder.fingerprint, "submodel": "XL", "source": source.description}
    record, building, chunks = jobs.prepare(idx, job, True, before["manifest"])
    with pytest.raises(build.IndexStoreError, match="hold 16 of the 20 images"):
        commit.finish(build.open_store(idx), source, (record, chunks[1:], 1.0), before["manifest"] | {"next_id": 0},
                      None, "Flat", 0.95)
    assert snapshot(idx)["version"] == before["version"]


def test_a_build_with_fewer_items_keeps_the_version_it_replaced(world, run, tmp_path):
    idx = shutil.copytree(world["starts"]["add"], tmp_path / "index")  # 23 items
    before = snapshot(idx)
    done = run(world["writes"]["build"](idx, "g2"))  # 12
    assert done["status"] == 0 and "kept the replaced version" in done["output"], done["output"]
    assert snapshot(idx)["count"] == 12
    assert_same(_open_version(idx, before["version"]), before)


def _open_version(idx: Path, version: str) -> dict:
    """A version that is no longer live, opened as if it were."""
    view = shutil.copytree(idx, idx.parent / f"view-{version}", ignore=shutil.ignore_patterns("CURRENT"))
    (view / "CURRENT").write_text(version)
    return snapshot(view)


def test_version_names_keep_their_order_past_v999999(world, run, tmp_path):
    idx = shutil.copytree(world["starts"]["add"], tmp_path / "index")
    live = (idx / "CURRENT").read_text().strip()
    for name in [p.name for p in idx.glob("v[0-9]*")]:
        if name != live:
            shutil.rmtree(idx / name)
    (idx / live).rename(idx / "v999999")
    (idx / "CURRENT").write_text("v999999")
    count = snapshot(idx)["count"]
    for ids, version in (("0", "v1000000"), ("1", "v1000001"), ("2", "v1000002")):
        done = run({"argv": ["index", "remove", "--index", str(idx), "--ids", ids]})
        assert done["status"] == 0, done["output"]
        assert (idx / "CURRENT").read_text() == version
    assert snapshot(idx)["count"] == count - 3
    assert sorted(p.name for p in idx.glob("v[0-9]*")) == ["v1000001", "v1000002"]


HOLD_AND_DIE = """
import multiprocessing, os, signal, sys, time
from retrieval.store import writer
with writer(sys.argv[1]):
    children = [multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,)) for _ in range(2)]
    for child in children:
        child.start()
    print(" ".join(str(c.pid) for c in children), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writers_lock_is_taken_over_at_once_though_its_children_live_on(tmp_path, caplog):
    """Forked children (DataLoader workers) never hold the writer lock, and a dead writer's lock is stale."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "pids", "w") as out:  # a file, not a pipe: the children live on with it open
        done = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(tmp_path)], env=env, stdout=out,
                              stderr=out, timeout=120)
    assert done.returncode == -signal.SIGKILL, (tmp_path / "pids").read_text()
    children = [int(pid) for pid in (tmp_path / "pids").read_text().splitlines()[0].split()]
    try:
        assert all(_alive(pid) for pid in children)
        with writer(tmp_path, wait=0):
            assert (tmp_path / "LOCK").read_text() == str(os.getpid())
        assert any("took over the writer lock of pid" in r.getMessage() for r in caplog.records)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_threads_of_one_process_take_turns(tmp_path):
    held = threading.Event()
    release = threading.Event()

    def hold():
        with writer(tmp_path):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    try:
        with pytest.raises(IndexBusy, match=f"pid {os.getpid()}"):
            with writer(tmp_path, wait=0.1):
                pass
    finally:
        release.set()
        thread.join()
    start = time.monotonic()
    with writer(tmp_path, wait=1):
        assert time.monotonic() - start < 1


# --- a full disk -------------------------------------------------------------------------------
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_is_told_apart(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "x")) and is_disk_full(OSError(errno.EDQUOT, "x"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_disk_full(OSError(errno.EACCES, "x")) and not is_disk_full(RuntimeError("bad"))
    if Path("/dev/full").exists():  # a real full device, as FAISS reports it
        index = faiss.IndexFlatIP(4)
        index.add(np.zeros((10_000, 4), np.float32))  # more than a write buffer holds
        with pytest.raises(RuntimeError) as e:
            faiss.write_index(index, "/dev/full")
        assert is_disk_full(e.value)


@pytest.fixture(scope="module")
def encoder(trained_dir):
    return Encoder.load(trained_dir)


def _patch_write(monkeypatch, step: str) -> None:
    """Make one write step of a commit (or of an add's upload) fail as a full disk does."""
    if step == "faiss":
        def full(index, path):
            raise RuntimeError(f"Error: write error in {path}: 1 != 2 (No space left on device)")
        monkeypatch.setattr(faiss, "write_index", full)
    elif step == "vectors":
        monkeypatch.setattr(np, "save", enospc)
    elif step == "chunk":
        monkeypatch.setattr(np, "savez", enospc)
    else:  # a file by name
        for method in ("write_text", "write_bytes"):
            original = getattr(pathlib.Path, method)

            def failing(self, *args, _original=original, **kwargs):
                if self.name.startswith(step):
                    enospc()
                return _original(self, *args, **kwargs)
            monkeypatch.setattr(pathlib.Path, method, failing)


def _listing(idx: Path) -> set[str]:
    return {str(p.relative_to(idx)) for p in idx.rglob("*") if "building" not in p.parts}


@pytest.mark.parametrize("step", ["chunk", "faiss", "vectors", "manifest.json", "CURRENT"])
def test_a_full_disk_in_build_and_add_undoes_the_write_and_says_so(step, world, encoder, tmp_path, monkeypatch):
    idx = shutil.copytree(world["starts"]["add"], tmp_path / "index")
    before, listing = snapshot(idx), _listing(idx)
    source = build.FolderSource(Path(world["writes"]["add"](idx)["argv"][-1]), 8, 1, workers=0)
    monkeypatch.setattr(embedding, "CHUNK", 4)
    for write in (lambda: build.add(encoder, source, idx, batch_size=2),
                  lambda: build.build(encoder, source, idx, index_key="Flat", batch_size=2)):
        with monkeypatch.context() as m:
            _patch_write(m, step)
            with pytest.raises(DiskFull, match="^no space left on the index's disk: nothing was written") as e:
                write()
        assert "\n" not in str(e.value) and ("--resume" in str(e.value)) == (step == "chunk")
        assert snapshot(idx)["version"] == before["version"] and _listing(idx) == listing
        assert not list((idx / "building").glob("*.tmp.npz"))
        jobs.clean(idx)


@pytest.mark.parametrize("step", ["upload", "faiss", "manifest.json"])
def test_a_full_disk_in_an_api_add_leaves_no_upload_and_answers_507(step, world, trained_dir, files, tmp_path,
                                                                     monkeypatch):
    from fastapi.testclient import TestClient

    from app.api import Settings, create_app

    idx = shutil.copytree(world["starts"]["build"], tmp_path / "index")  # no uploads yet
    app = create_app(Settings(index=idx, checkpoint=trained_dir), load_in_background=False)
    with TestClient(app) as client:
        before, listing = snapshot(idx), _listing(idx)
        _patch_write(monkeypatch, f"{before['next_id']}." if step == "upload" else step)  # the upload's file
        r = client.post("/v1/items", files=[("files", ("a.png", files["uploads"][0].read_bytes(), "image/png"))])
        monkeypatch.undo()
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "disk_full" and "free some space" in r.json()["error"]["message"]
    assert snapshot(idx)["version"] == before["version"] and _listing(idx) == listing


def test_a_full_disk_is_one_line_and_exit_2_on_the_command_line(world, trained_dir, files, tmp_path, monkeypatch,
                                                                capsys):
    from app.cli import main

    idx = shutil.copytree(world["starts"]["add"], tmp_path / "index")
    before = snapshot(idx)
    _patch_write(monkeypatch, "vectors")
    code = main(["index", "add", "--index", str(idx), "--checkpoint", str(trained_dir), "--images",
                 str(files["g2"]), "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("matvit: error: no space left on the index's disk")
    assert snapshot(idx)["version"] == before["version"] and not list(idx.glob("v*.tmp"))
