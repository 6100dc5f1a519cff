"""Search parameters of approximate indexes: measure recall against exact search, tune to a target.

Recall is measured with queries that are not in the index: a seeded sample of the stored vectors,
each moved off its own position by Gaussian noise as long as the distance to its nearest other
vector and renormalised, so a query is as far from the gallery as gallery items are from each
other (the way an unseen image, or a smaller submodel's embedding of a gallery image, lands).
The reference is exact inner-product search over every live vector of the index, block by block
(FAISS's `knn_ground_truth`, on its GPUs when it reports any), so the stored vectors may be
memory-mapped and larger than memory. recall@1 is the share of queries whose approximate top-1 is
the exact top-1; recall@10 the mean overlap of the two top-10 lists.

Knobs: `nprobe` (IVF lists visited), `ef_search` (HNSW breadth), and for IVF indexes with lossy codes
(PQ, SQ) and prefix indexes (`retrieval.prefix`) `rerank`: search `rerank` x k candidates and order them by
their exact stored vectors. Lossy codes cap recall whatever nprobe is (near-duplicate gallery items get the
same code), and so does a prefix; re-ranking lifts that cap for the cost of reading rerank x k stored vectors
per query. A prefix index always re-ranks (at least its k candidates), so its scores are the full vectors'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from matvit.errors import UserError

from .prefix import index_dims

RECALL_TARGET = 0.95  # recall@10 that tuning aims for
PROBES = 1000  # recall queries
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
RERANK = (1, 2, 4, 8, 16, 32, 64, 128)  # candidates re-ranked exactly, per result wanted
BLOCK = 262_144  # stored vectors in memory at once during exact search
METHOD = ("1,000 stored vectors moved by Gaussian noise as long as the distance to their nearest other "
          "vector, against exact search over the whole index")


class SearchParamError(UserError):
    """A search parameter the index kind does not use."""


def parameter(index: faiss.Index) -> str | None:
    """The main knob of this index kind: `nprobe` (IVF), `ef_search` (HNSW), or None (exact)."""
    try:
        faiss.extract_index_ivf(index)
        return "nprobe"
    except RuntimeError:
        pass
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return "ef_search" if isinstance(inner, faiss.IndexHNSW) else None


def parameters(index: faiss.Index) -> tuple[str, ...]:
    """Every knob of this index kind: its main one, and `rerank` for a prefix index or IVF with lossy (PQ, SQ)
    codes."""
    knob = parameter(index)
    lossy = knob == "nprobe" and not isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)),
                                                faiss.IndexIVFFlat)
    return tuple(k for k in (knob, "rerank" if lossy or index_dims(index) else None) if k)


def faiss_params(index: faiss.Index, params: dict, deleted: np.ndarray) -> faiss.SearchParameters | None:
    """FAISS search parameters for `params` (`rerank` aside), filtering out the tombstoned ids."""
    knobs = parameters(index)
    for name in params:
        if name not in knobs:
            raise SearchParamError(f"search parameter {name!r} does not apply to this index "
                                   f"({'it takes ' + ', '.join(knobs) if knobs else 'exact search takes none'})")
    sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(deleted, dtype=np.int64))) if len(deleted) else None
    knob = parameter(index)
    if knob not in params and sel is None:
        return None
    extra = {"sel": sel} if sel is not None else {}
    if knob == "nprobe" and "nprobe" in params:
        p = faiss.SearchParametersIVF(nprobe=int(params["nprobe"]), **extra)
    elif knob == "ef_search" and "ef_search" in params:
        p = faiss.SearchParametersHNSW(efSearch=int(params["ef_search"]), **extra)
    else:
        p = faiss.SearchParameters(**extra)
    p.keep_alive = (sel,)  # the selector must outlive the search
    return p


@dataclass
class Stored:
    """An index's exact vectors, looked up by id (a memory-mapped array is read only where looked up)."""

    ids: np.ndarray  # ascending
    vectors: np.ndarray

    def __post_init__(self) -> None:
        # ids without gaps (no deletions yet) are positions plus an offset: no binary search needed
        self.first = int(self.ids[0]) if len(self.ids) else 0
        self.contiguous = bool(len(self.ids)) and int(self.ids[-1]) - self.first == len(self.ids) - 1

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of `ids` (any shape; zeros where an id is -1), shaped ids.shape x dim."""
        flat = np.asarray(ids).ravel()
        order = np.argsort(flat, kind="stable")  # sorted ids: a cache-friendly search, the array read front to back
        wanted = flat[order]
        positions = wanted - self.first if self.contiguous else np.searchsorted(self.ids, wanted)
        out = np.empty((len(flat), self.vectors.shape[1]), np.float32)
        out[order] = np.take(self.vectors, np.clip(positions, 0, len(self.ids) - 1), axis=0)
        out[flat < 0] = 0
        return out.reshape(*np.shape(ids), -1)


def search(index: faiss.Index, queries: np.ndarray, k: int, params: dict, deleted: np.ndarray,
           stored: Stored | None = None, run_on: faiss.Index | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the k nearest: `index`'s search with `params` (run on its copy `run_on`, a GPU one,
    when given), re-ranked exactly when they ask for it or the index is a prefix index."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rerank = int(params.get("rerank", 1))
    fp = faiss_params(index, params, deleted)
    run_on = index if run_on is None else run_on
    if rerank <= 1 and not index_dims(index):
        return run_on.search(queries, k, params=fp)
    if stored is None:
        raise SearchParamError("rerank needs the index's stored vectors")
    _, candidates = run_on.search(queries, k * rerank, params=fp)
    scores = np.einsum("qd,qcd->qc", queries, stored(candidates))
    scores[candidates < 0] = -np.inf
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, ids = np.take_along_axis(scores, best, 1), np.take_along_axis(candidates, best, 1)
    return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k positions in `vectors`, read `BLOCK` rows at a time."""
    blocks = (np.ascontiguousarray(vectors[lo:lo + BLOCK], dtype=np.float32) for lo in range(0, len(vectors), BLOCK))
    return knn_ground_truth(np.ascontiguousarray(queries, dtype=np.float32), blocks, k, faiss.METRIC_INNER_PRODUCT)


def exact_search_ms(vectors: np.ndarray, queries: int = 20) -> float:
    """Median milliseconds of an exact (Flat) search of one query among `vectors` (k = 10)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    times = []
    for query in probe_queries(vectors, queries):
        start = time.perf_counter()
        flat.search(query[None], 10)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def probe_queries(vectors: np.ndarray, n: int = PROBES, seed: int = 0) -> np.ndarray:
    """`n` normalised queries near, but not at, sampled stored vectors."""
    rng = np.random.default_rng(seed)
    sample = np.asarray(vectors[np.sort(rng.choice(len(vectors), min(n, len(vectors)), replace=False))], np.float32)
    if len(vectors) > 1:
        scores, _ = exact_search(vectors, sample, 2)
        nearest_other = np.sqrt(np.maximum(0.0, 2 - 2 * scores[:, -1]))
    else:
        nearest_other = np.full(len(sample), 0.1)
    noise = rng.standard_normal(sample.shape).astype(np.float32) / np.sqrt(sample.shape[1])
    queries = sample + noise * nearest_other[:, None]
    return queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)


def overlap(found: np.ndarray, truth: np.ndarray) -> dict:
    """recall@1 (same top-1) and recall@k (mean overlap of the top-k lists) of `found` against `truth`."""
    shared = [len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found.tolist(), truth.tolist(), strict=True)]
    return {"at_1": float(np.mean(found[:, 0] == truth[:, 0])), "at_10": float(np.mean(shared))}


def recall(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, deleted: np.ndarray, queries: np.ndarray,
           params: dict) -> dict:
    """recall@1 and recall@10 of `index` searched with `params`, against exact search over `vectors`."""
    k = min(10, len(ids))
    truth = np.asarray(ids)[exact_search(vectors, queries, k)[1]]
    return overlap(search(index, queries, k, params, deleted, Stored(np.asarray(ids), vectors))[1], truth)


def tune(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, deleted: np.ndarray,
         target: float = RECALL_TARGET) -> tuple[dict, dict]:
    """The cheapest setting whose recall@10 meets `target` (the most accurate tried when none does),
    and the recall measured at it. Re-ranking is tried, from the least, only where the codes are lossy."""
    knobs = parameters(index)
    queries = probe_queries(vectors)
    k = min(10, len(ids))
    truth = np.asarray(ids)[exact_search(vectors, queries, k)[1]]
    stored = Stored(np.asarray(ids), vectors)
    knob = parameter(index)
    if knob == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        main = [{"nprobe": p} for p in sorted({min(nlist, 2**i) for i in range(int(np.log2(nlist)) + 2)})]
    else:
        main = [{"ef_search": ef} for ef in EF_SEARCH] if knob else [{}]
    reranks = RERANK if "rerank" in knobs else (1,)
    grid = [{**m, **({"rerank": r} if r > 1 else {})} for r in reranks for m in main]
    best = None
    for params in grid:
        measured = overlap(search(index, queries, k, params, deleted, stored)[1], truth)
        if best is None or measured["at_10"] > best[1]["at_10"]:
            best = (params, measured)
        if measured["at_10"] >= target:
            best = (params, measured)
            break
    params, measured = best
    return params, {**measured, "target": target, "met": measured["at_10"] >= target, "queries": len(queries),
                    "method": METHOD}
