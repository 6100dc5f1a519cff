"""A prefix index (`--index-key PrefixD,KEY`): KEY over the D-prefixes of a Matryoshka model's XL vectors, its
candidates re-ranked by the stored full vectors, tuned, updated while it serves, and read back by a new process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from matvit import data
from matvit.errors import UserError
from retrieval import build
from retrieval.encoder import Encoder
from retrieval.faiss_store import GalleryIndex
from retrieval.retriever import Retriever
from tests.app.test_api import png


@pytest.fixture(scope="module")
def queries():
    return data.load("digits", "test", 8, 1).images[:60]


@pytest.fixture(scope="module")
def prefix_index(matryoshka_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix-index") / "index"
    report = build.build(Encoder.load(matryoshka_dir), build.DatasetSource("digits", "train", 8, 1), out,
                         index_key="Prefix8,HNSW16")
    assert report["index_key"] == "Prefix8,HNSW16"
    return out


def test_its_hits_are_scored_by_the_full_vectors_and_agree_with_exact_search(prefix_index, matryoshka_index,
                                                                              matryoshka_dir, queries):
    index = GalleryIndex.open(prefix_index)
    assert "rerank" in index.manifest["search_params"] and index.manifest["recall"]["met"]
    exact = Retriever(matryoshka_index, matryoshka_dir).search(queries, k=5, submodel="S")
    found = Retriever(prefix_index, matryoshka_dir).search(queries, k=5, submodel="S")
    ids, vectors = index.vectors()
    embedded = Encoder.load(matryoshka_dir).encode(queries, "S")
    for q, hits in enumerate(found):
        full = vectors[np.searchsorted(ids, [h["id"] for h in hits.neighbours])] @ embedded[q]
        np.testing.assert_allclose([h["score"] for h in hits.neighbours], full, atol=1e-4)
    top1 = np.mean([a.neighbours[0]["id"] == b.neighbours[0]["id"] for a, b in zip(found, exact, strict=True)])
    assert top1 >= 0.9


def test_a_serving_retriever_follows_deletes_and_adds(prefix_index, matryoshka_dir, queries, tmp_path):
    own = shutil.copytree(prefix_index, tmp_path / "index")
    retriever = Retriever(own, matryoshka_dir, refresh_seconds=0)
    first = retriever.search(queries[:1], k=3)[0].neighbours[0]["id"]
    assert retriever.remove([first]) == [first]
    assert first not in [h["id"] for h in retriever.search(queries[:1], k=3)[0].neighbours]
    added = retriever.add([png(queries[0, 0].numpy())], labels=["7"])
    assert retriever.search(queries[:1], k=1)[0].neighbours[0]["id"] == added[0]["id"]
    assert GalleryIndex.open(own).manifest["index_key"] == "Prefix8,HNSW16"


def test_a_new_process_searches_what_build_index_wrote(prefix_index, matryoshka_dir, tmp_path):
    query = tmp_path / "q.png"
    query.write_bytes(png(data.load("digits", "test", 8, 1).images[0, 0].numpy()))
    cli = "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", cli, "search", "--index", str(prefix_index), "--checkpoint",
                          str(matryoshka_dir), "--image", str(query), "-k", "3", "--json"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    result = json.loads(out.stdout)
    assert len(result["results"]) == 3
    assert result["results"][0]["score"] >= result["results"][-1]["score"]


@pytest.mark.parametrize("key, on_disk, message", [
    ("Prefix32,Flat", False, "a prefix index needs a length from 1 to 31"),
    ("Prefix8,Nope", False, "bad --index-key 'Prefix8,Nope'"),
    ("Prefix8,IVF4,SQ8", True, "is a prefix index, kept in memory: drop --on-disk"),
])
def test_bad_prefix_keys_are_one_line_and_write_nothing(matryoshka_dir, tmp_path, key, on_disk, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as caught:
        build.build(Encoder.load(matryoshka_dir), build.DatasetSource("digits", "test", 8, 1), tmp_path / "index",
                    index_key=key, on_disk=on_disk)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "index" / "CURRENT").exists()
