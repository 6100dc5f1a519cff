"""Measuring one index of the scale benchmark (`index_scale`): recall against exact search, 1-NN label accuracy,
queries per second at batch 1 and batched, and recall against speed along the tuning grid."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from retrieval import tuning

K = 10  # neighbours per query: recall@10
BATCH = 64  # the batched-search size
SWEEP_QUERIES = 1000  # XL queries of the recall-against-speed sweep
SWEEP_LATENCY_QUERIES = 100  # batch-1 searches timed per sweep point
HNSW_EF_CONSTRUCTION = 40  # FAISS's default, what `build-index` builds with
TIMING_REPEATS = 3  # QPS is the best of this many passes over the same queries ...
TIMING_BUDGET = 20.0  # ... or of fewer, once the passes have taken this many seconds
MILVUS_LATENCY_QUERIES, MILVUS_BATCH_QUERIES = 20, 256  # fewer timed queries for Milvus Lite
AUGMENTATION = ("each image cropped (zoomed in 1-1.15x at a random offset), flipped left-right (half of them), "
                "rotated (up to 10 degrees either way) and given Gaussian pixel noise (sigma 6 of 255)")


@dataclass
class Embeddings:
    """The cached gallery (the largest size; smaller ones are its prefixes) and the test queries."""

    gallery: np.ndarray  # n x dim float32, memory-mapped
    labels: np.ndarray  # n, the source image's label
    queries: dict[str, np.ndarray]  # query encoder -> test queries x dim
    query_labels: np.ndarray
    meta: dict


def recall_at(found: np.ndarray, truth: np.ndarray) -> dict:
    """recall@1 (same top-1) and recall@10 (mean overlap of the top-10 lists), as in `retrieval.tuning.recall`."""
    overlap = [len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found.tolist(), truth.tolist(), strict=True)]
    return {"at_1": float(np.mean(found[:, 0] == truth[:, 0])), "at_10": float(np.mean(overlap))}


@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


Search = Callable[[np.ndarray], np.ndarray]  # queries -> ids of their K nearest (-1 past the hits)


def faiss_search(index: faiss.Index, search_params: dict, stored: tuning.Stored) -> Search:
    """The index's search as `build-index` runs it (re-ranking from the stored vectors where tuned)."""
    none = np.zeros(0, np.int64)
    return lambda queries: tuning.search(index, queries, K, search_params, none, stored)[1]


def qps(search: Search, queries: np.ndarray, batch: int, repeats: int = TIMING_REPEATS) -> float:
    """Queries per second searching `queries` `batch` at a time: the best of `repeats` passes (fewer once they took
    `TIMING_BUDGET` seconds), after a warm-up batch.

    Batch 1 runs on one FAISS thread: every FAISS kind here searches a single query on one thread anyway, and idle
    OpenMP threads spinning on a busy machine would otherwise be timed too."""
    with faiss_threads(1) if batch == 1 else contextlib.nullcontext():
        search(queries[:batch])
        best, spent = math.inf, 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            for lo in range(0, len(queries), batch):
                search(queries[lo:lo + batch])
            best, spent = min(best, time.perf_counter() - start), spent + time.perf_counter() - start
            if spent > TIMING_BUDGET:
                break
        return len(queries) / best


def measure(search: Search, emb: Embeddings, truth: dict[str, np.ndarray], latency_queries: int,
            batch_queries: int) -> dict:
    """Recall, 1-NN label accuracy and speed of a built index, for each query encoder."""
    rows = {}
    for spec, queries in emb.queries.items():
        found = search(queries)
        top1 = np.where(found[:, 0] >= 0, emb.labels[found[:, 0]], -1)  # -1: no hit
        rows[spec] = {**recall_at(found, truth[spec]), "knn1": float(np.mean(top1 == emb.query_labels)),
                      "qps_batch_1": round(qps(search, queries[:latency_queries], 1), 1),
                      f"qps_batch_{BATCH}": round(qps(search, queries[:batch_queries], BATCH), 1)}
    return rows


def sweep(index: faiss.Index, emb: Embeddings, truth: np.ndarray, stored: tuning.Stored,
          tuned: dict) -> list[dict]:
    """recall@10 of XL queries and batch-1 speed at every efSearch / nprobe of the tuning grid (codes alone), and
    where re-ranking was tuned in, at every rerank of its grid with the tuned nprobe / efSearch."""
    knob = tuning.parameter(index)
    if knob == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        grid = [{knob: v} for v in sorted({min(nlist, 2**i) for i in range(int(np.log2(nlist)) + 2)})]
    else:
        grid = [{knob: v} for v in tuning.EF_SEARCH] if knob else []
    if tuned.get("rerank", 1) > 1:
        grid += [{**({knob: tuned[knob]} if knob else {}), "rerank": r} for r in tuning.RERANK if r > 1]
    queries = emb.queries["XL"][:SWEEP_QUERIES]
    out = []
    for params in grid:
        search = faiss_search(index, params, stored)
        out.append({**params, "recall_at_10": recall_at(search(queries), truth[:len(queries)])["at_10"],
                    "qps_batch_1": round(qps(search, queries[:SWEEP_LATENCY_QUERIES], 1, repeats=1), 1)})
    return out
