"""Searching a Matryoshka model's index on a prefix of the dimensions: the served search is the prefix primitives
over the index's stored vectors, follows the live index (deleted items never come back), and refuses a length the
model was not trained for."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from matvit import data
from matvit.errors import UserError
from retrieval import build
from retrieval.encoder import Encoder
from retrieval.prefix import Plan, PrefixSearch
from retrieval.retriever import Retriever


@pytest.fixture(scope="module")
def query_images():
    return data.load("digits", "test", 8, 1).images[:6]


@pytest.mark.parametrize("plan", [Plan(8), Plan(16), Plan(8, 100), Plan(16, 40)], ids=str)
def test_a_prefix_search_is_the_primitive_over_the_stored_vectors(matryoshka_index, matryoshka_dir, query_images, plan):
    retriever = Retriever(matryoshka_index, matryoshka_dir)
    ids, vectors = retriever.index.vectors()
    embeddings = retriever.encoder.encode(query_images, "S")
    hits = retriever.search_embeddings(embeddings, 5, plan=plan)
    _, rows = PrefixSearch(vectors).search(embeddings, 5, plan)
    assert [[h["id"] for h in row] for row in hits] == ids[rows].tolist()
    results = retriever.search(query_images, k=5, submodel="S", plan=plan)
    assert all(r.search == plan and len(r.neighbours) == 5 for r in results)
    assert results[0].to_dict()["search"] == {"dims": plan.dims, "funnel": plan.shortlist is not None,
                                              "shortlist": plan.shortlist}


def test_a_funnel_over_the_whole_gallery_is_full_search(matryoshka_index, matryoshka_dir, query_images):
    retriever = Retriever(matryoshka_index, matryoshka_dir)
    full = retriever.search(query_images, k=5, submodel="M")
    funnel = retriever.search(query_images, k=5, submodel="M", plan=Plan(8, retriever.index.count))
    for a, b in zip(full, funnel, strict=True):
        assert [h["id"] for h in a.neighbours] == [h["id"] for h in b.neighbours]
        np.testing.assert_allclose([h["score"] for h in a.neighbours], [h["score"] for h in b.neighbours], atol=1e-5)
    assert full[0].search == Plan(32)


def test_a_deleted_item_leaves_the_prefix_search_of_a_serving_retriever(matryoshka_index, matryoshka_dir, query_images,
                                                                         tmp_path):
    own = shutil.copytree(matryoshka_index, tmp_path / "index")
    retriever = Retriever(own, matryoshka_dir, refresh_seconds=0)
    plan = Plan(8)
    before = retriever.search(query_images[:1], k=3, plan=plan)[0]
    first = before.neighbours[0]["id"]
    assert retriever.remove([first]) == [first]
    after = retriever.search(query_images[:1], k=3, plan=plan)[0]
    assert first not in [h["id"] for h in after.neighbours]
    assert [h["id"] for h in after.neighbours][:2] == [h["id"] for h in before.neighbours][1:3]


def test_lengths_the_model_was_not_trained_for_are_refused(matryoshka_index, matryoshka_dir, trained_dir, tmp_path):
    retriever = Retriever(matryoshka_index, matryoshka_dir)
    assert retriever.search_plan(dims=16) == Plan(16)
    assert retriever.search_plan(funnel=8, k=20) == Plan(8, 200)
    for bad in (dict(dims=12), dict(dims=64), dict(funnel=4)):
        with pytest.raises(UserError, match="is not available: use 8, 16, 32"):
            retriever.search_plan(**bad)
    today = tmp_path / "today"
    build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "test", 8, 1), today)
    with pytest.raises(UserError, match="dims 8 is not available: use 32"):
        Retriever(today, trained_dir).search_plan(dims=8)
