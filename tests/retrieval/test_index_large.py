"""Large-gallery index paths on synthetic vectors: exact re-ranking of lossy codes, on-disk IVF versions."""

import faiss
import numpy as np
import pytest

from retrieval import faiss_store, gpu, store, store_common, tuning
from retrieval.faiss_store import DirectoryStore, GalleryIndex

DIM = 16


def clustered(n: int, seed: int = 0, spread: float = 0.05) -> np.ndarray:
    """Unit vectors in tight clusters of near-duplicates (what augmented copies of one image look like)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 20, DIM))
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rows(ids):
    return [(int(i), f"item-{i}", None, 0, int(i) % 3, 8, 8, "2026-01-01T00:00:00+00:00") for i in ids]


MANIFEST = {"fingerprint": "f" * 16, "submodel": "XL", "dim": DIM, "metric": "inner_product", "source": "test",
            "roots": [{"kind": "dataset", "name": "synthetic"}], "classes": ["a", "b", "c"], "next_id": 0}


def write(directory, ids, vectors, **kwargs):
    directory_store = DirectoryStore(directory)
    with directory_store.writing():
        base = directory_store.open() if (directory / "CURRENT").is_file() else None
        manifest = {**(base.manifest if base else MANIFEST), "next_id": int(max(ids, default=-1)) + 1}
        return directory_store.commit(base, ids, vectors, rows(ids), manifest, **kwargs)


def exact_top(vectors, ids, queries, k=10):
    return np.asarray(ids)[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]]


def test_rerank_orders_candidates_by_their_stored_vectors():
    vectors = clustered(2000)
    ids = np.arange(2000, dtype=np.int64) * 3 + 5  # lookup is by id, not position
    pq = faiss_store.make_faiss("IVF8,PQ2x4", DIM, vectors)
    pq.add_with_ids(vectors, ids)
    queries = tuning.probe_queries(vectors, 50)
    stored = tuning.Stored(ids, vectors)
    scores, found = tuning.search(pq, queries, 10, {"nprobe": 8, "rerank": 200}, np.zeros(0, np.int64), stored)
    truth = exact_top(vectors, ids, queries)
    np.testing.assert_array_equal(found, truth)  # every vector a candidate: the exact order
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, (found - 5) // 3, 1), atol=1e-5)
    codes_only = tuning.search(pq, queries, 10, {"nprobe": 8}, np.zeros(0, np.int64))[1]
    assert tuning.overlap(codes_only, truth)["at_10"] < 0.9  # two 4-bit codes per vector cannot order duplicates


def test_tuning_adds_reranking_only_where_codes_are_lossy():
    vectors = clustered(2000)
    ids = np.arange(2000, dtype=np.int64)
    pq = faiss_store.make_faiss("IVF8,PQ2x4", DIM, vectors)
    pq.add_with_ids(vectors, ids)
    params, measured = tuning.tune(pq, ids, vectors, np.zeros(0, np.int64), 0.95)
    assert measured["met"] and params["rerank"] > 1 and measured["at_10"] >= 0.95
    assert tuning.parameters(pq) == ("nprobe", "rerank")
    flat_lists = faiss_store.make_faiss("IVF8,Flat", DIM, vectors)
    assert tuning.parameters(flat_lists) == ("nprobe",)
    hnsw = faiss_store.make_faiss("HNSW8", DIM, vectors)
    with pytest.raises(tuning.SearchParamError, match="rerank"):
        tuning.faiss_params(hnsw, {"rerank": 4}, np.zeros(0, np.int64))


def test_exact_search_in_blocks_matches_one_pass(monkeypatch):
    vectors, queries = clustered(1000), clustered(40, seed=1)
    whole = tuning.exact_search(vectors, queries, 10)
    monkeypatch.setattr(tuning, "BLOCK", 64)
    scores, positions = tuning.exact_search(vectors, queries, 10)
    np.testing.assert_allclose(scores, whole[0], atol=1e-5)
    assert tuning.overlap(positions, whole[1])["at_10"] > 0.99  # ties may swap between blocks


def test_an_on_disk_index_grows_and_shrinks_in_new_versions_while_the_old_one_serves(tmp_path):
    vectors = clustered(3000)
    first = write(tmp_path, np.arange(2000), vectors[:2000], index_key="IVF16,Flat", on_disk=True,
                  recall_target=0.99)
    reader = GalleryIndex.open(tmp_path)
    assert first["on_disk"] and reader.manifest["on_disk"]
    assert (reader.version_dir / "index.ivfdata").stat().st_size >= 2000 * (DIM * 4 + 8)  # codes and ids on disk
    assert first["recall"]["met"]

    write(tmp_path, np.arange(2000, 3000), vectors[2000:])  # an add: the base's lists merged with a new block
    grown = GalleryIndex.open(tmp_path)
    assert grown.count == 3000 and grown.manifest["on_disk"] and grown.faiss_index.ntotal == 3000
    queries = vectors[[5, 2500]]
    found = grown.search(queries, 1, {"nprobe": 16})[1][:, 0]
    assert found.tolist() == [5, 2500]
    assert reader.search(queries, 1, {"nprobe": 16})[1][:, 0].tolist()[0] == 5  # the old version still serves

    store.remove(DirectoryStore(tmp_path), [5])  # a tombstone; the lists are the same file
    shrunk = GalleryIndex.open(tmp_path)
    assert shrunk.count == 2999 and shrunk.deleted.tolist() == [5]
    assert 5 not in shrunk.search(queries, 10, {"nprobe": 16})[1].ravel().tolist()
    assert (shrunk.version_dir / "index.ivfdata").stat().st_nlink >= 2  # hard-linked with the version before

    exact = exact_top(vectors[np.arange(3000) != 5], np.delete(np.arange(3000), 5), queries)
    np.testing.assert_array_equal(shrunk.search(queries, 10, {"nprobe": 16})[1], exact)

    back = store.rebuild(DirectoryStore(tmp_path), "auto")  # into memory, tombstones dropped
    assert not back["on_disk"] and GalleryIndex.open(tmp_path).deleted.tolist() == []


def test_on_disk_auto_picks_ivf_and_refuses_other_kinds(tmp_path):
    assert store_common.auto_index_key(1000, DIM, on_disk=True).startswith("IVF")
    assert store_common.auto_index_key(1000, DIM) == "Flat" and store_common.auto_index_key(2_000_000, DIM) == "HNSW32"
    with pytest.raises(store.IndexStoreError, match="not an IVF index"):
        write(tmp_path, np.arange(500), clustered(500), index_key="HNSW32", on_disk=True)
    assert not (tmp_path / "CURRENT").exists()  # nothing written


class StandInGpuIndex:
    """What `faiss.index_cpu_to_all_gpus` returns, on a machine without GPUs: a copy that counts its searches."""

    def __init__(self, index):
        self.index, self.searches = faiss.clone_index(index), 0

    def search(self, queries, k, params=None):
        self.searches += 1
        return self.index.search(queries, k, params=params)


def test_with_gpus_ivf_training_and_search_use_them_and_filtered_search_stays_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    moved = []

    def to_gpus(cpu_index, co=None, ngpu=-1):  # flat indexes (k-means, exact search) must be real FAISS indexes
        moved.append(type(cpu_index).__name__)
        return faiss.clone_index(cpu_index) if type(cpu_index) is faiss.IndexFlat else StandInGpuIndex(cpu_index)

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", type("Options", (), {}), raising=False)
    vectors = clustered(1000)
    trained = faiss_store.make_faiss("IVF8,Flat", DIM, vectors)
    clustering = faiss.downcast_index(faiss.extract_index_ivf(trained).clustering_index)
    assert moved == ["IndexFlat"] and clustering.metric_type == faiss.METRIC_INNER_PRODUCT and trained.is_trained
    tuning.exact_search(vectors, vectors[:2], 1)  # recall's exact search too
    assert moved == ["IndexFlat"] * 2

    write(tmp_path, np.arange(1000), vectors, index_key="IVF8,Flat", recall_target=0.9)
    gallery = GalleryIndex.open(tmp_path)
    copy = gallery.gpu_index
    assert isinstance(copy, StandInGpuIndex)
    searches = copy.searches
    found = gallery.search(vectors[:3], 1, {"nprobe": 8})[1][:, 0]
    assert found.tolist() == [0, 1, 2] and copy.searches == searches + 1

    write(tmp_path / "hnsw", np.arange(1000), vectors, index_key="HNSW8")
    store.remove(DirectoryStore(tmp_path / "hnsw"), [0])  # HNSW keeps a tombstone: the search filters on the CPU
    filtered = GalleryIndex.open(tmp_path / "hnsw")
    before = filtered.gpu_index.searches
    assert filtered.deleted.tolist() == [0] and 0 not in filtered.search(vectors[:3], 5)[1].ravel().tolist()
    assert filtered.gpu_index.searches == before


def test_without_gpus_nothing_moves(tmp_path, monkeypatch):
    """The CPU path, whatever this machine has: FAISS reporting no GPU moves nothing there."""
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda *a, **k: pytest.fail("moved to a GPU"), raising=False)
    write(tmp_path, np.arange(500), clustered(500), index_key="IVF8,Flat")
    assert gpu.count() == 0 and GalleryIndex.open(tmp_path).gpu_index is None


@pytest.mark.parametrize("gaps", [False, True], ids=["contiguous-ids", "ids-with-gaps"])
def test_stored_vectors_are_looked_up_by_id_and_missing_hits_are_zero(gaps):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 4)).astype(np.float32)
    ids = np.sort(rng.choice(1000, 50, replace=False)) if gaps else np.arange(50) + 7
    wanted = np.array([[ids[3], -1, ids[49]], [ids[0], ids[3], -1]])
    expected = np.stack([[vectors[3], np.zeros(4), vectors[49]], [vectors[0], vectors[3], np.zeros(4)]])
    np.testing.assert_array_equal(tuning.Stored(ids, vectors)(wanted), expected)
