"""On-disk IVF: chunks added into their own blocks, merged with FAISS's merge_ondisk, searched memory-mapped."""

import shutil

import faiss
import numpy as np
import pytest

from retrieval.ondisk import LISTS, MERGED, TRAINED, OnDiskError, OnDiskIVF, build


def clustered(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("key", ["IVF32,Flat", "IVF32,PQ4x4np"])
def test_merged_on_disk_index_searches_like_one_built_in_memory(tmp_path, key):
    vectors, queries = clustered(3000), clustered(50, seed=1)
    ids = np.arange(3000, dtype=np.int64) * 7 + 100  # ids are kept, whatever they are
    chunks = [(ids[i:i + 1000], vectors[i:i + 1000]) for i in range(0, 3000, 1000)]
    ondisk = build(tmp_path / "ivf", key, vectors[:2000], chunks)

    memory = OnDiskIVF(tmp_path / "ivf").trained()  # the same trained quantizer, every vector added in memory
    memory.add_with_ids(vectors, ids)
    params = faiss.SearchParametersIVF(nprobe=8)
    d_disk, i_disk = ondisk.search(queries, 10, params=params)
    d_mem, i_mem = memory.search(queries, 10, params=params)
    assert ondisk.ntotal == 3000 and np.array_equal(i_disk, i_mem) and np.allclose(d_disk, d_mem, atol=1e-5)
    assert set(i_disk.ravel().tolist()) <= set(ids.tolist())

    lists = faiss.extract_index_ivf(ondisk).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
    assert len(OnDiskIVF(tmp_path / "ivf").blocks) == 3 and OnDiskIVF(tmp_path / "ivf").added() == 3000
    code_size = faiss.extract_index_ivf(ondisk).code_size
    assert (tmp_path / "ivf" / LISTS).stat().st_size >= 3000 * (code_size + 8)  # codes and ids live on disk
    extra = (tmp_path / "ivf" / MERGED).stat().st_size - (tmp_path / "ivf" / TRAINED).stat().st_size
    assert 0 < extra < 64 * 32  # beyond the trained index, index.faiss holds the 32 lists' offsets, not the codes


def test_a_moved_directory_opens_and_a_retraining_drops_old_blocks(tmp_path):
    vectors = clustered(1200)
    build(tmp_path / "a", "IVF16,Flat", vectors, [(np.arange(600), vectors[:600]), (np.arange(600, 1200),
                                                                                      vectors[600:])])
    shutil.move(tmp_path / "a", tmp_path / "b")
    index = OnDiskIVF(tmp_path / "b").open()
    assert index.ntotal == 1200
    assert index.search(vectors[:5], 1, params=faiss.SearchParametersIVF(nprobe=16))[1][:, 0].tolist() == [0, 1, 2,
                                                                                                           3, 4]
    again = OnDiskIVF(tmp_path / "b")
    again.train("IVF16,Flat", 16, vectors)
    assert again.blocks == [] and not (tmp_path / "b" / MERGED).exists()


def test_mistakes_are_user_errors(tmp_path):
    ondisk = OnDiskIVF(tmp_path / "x")
    with pytest.raises(OnDiskError, match="not an IVF index"):
        ondisk.train("HNSW32", 16, clustered(100))
    with pytest.raises(OnDiskError, match="at least one vector per list"):
        ondisk.train("IVF64,Flat", 16, clustered(10))
    with pytest.raises(OnDiskError, match="train it first"):
        ondisk.add(np.arange(3), clustered(3))
    ondisk.train("IVF4,Flat", 16, clustered(100))
    with pytest.raises(OnDiskError, match="add vectors before merging"):
        ondisk.merge()
    with pytest.raises(OnDiskError, match="3 ids for 2 vectors"):
        ondisk.add(np.arange(3), clustered(2))
    with pytest.raises(OnDiskError, match="merge its blocks first"):
        ondisk.open()
