"""Search parameters of approximate indexes: measure recall against exact search, tune to a target.

Recall is measured with queries that are not in the index: a seeded sample of the stored vectors,
each moved off its own position by Gaussian noise as long as the distance to its nearest other
vector and renormalised, so a query is as far from the gallery as gallery items are from each
other (the way an unseen image, or a smaller submodel's embedding of a gallery image, lands).
The reference is exact inner-product search over every live vector of the index. recall@1 is the
share of queries whose approximate top-1 is the exact top-1; recall@10 the mean overlap of the two
top-10 lists.
"""

from __future__ import annotations

import faiss
import numpy as np

from matvit.errors import UserError

RECALL_TARGET = 0.95  # recall@10 that tuning aims for
PROBES = 1000  # recall queries
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
METHOD = ("1,000 stored vectors moved by Gaussian noise as long as the distance to their nearest other "
          "vector, against exact search over the whole index")


class SearchParamError(UserError):
    """A search parameter the index kind does not use."""


def parameter(index: faiss.Index) -> str | None:
    """The knob of this index kind: `nprobe` (IVF), `ef_search` (HNSW), or None (exact)."""
    try:
        faiss.extract_index_ivf(index)
        return "nprobe"
    except RuntimeError:
        pass
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return "ef_search" if isinstance(inner, faiss.IndexHNSW) else None


def faiss_params(index: faiss.Index, params: dict, deleted: np.ndarray) -> faiss.SearchParameters | None:
    """FAISS search parameters for `params`, filtering out the tombstoned ids."""
    knob = parameter(index)
    for name in params:
        if name != knob:
            raise SearchParamError(f"search parameter {name!r} does not apply to this index "
                                   f"({'it takes ' + knob if knob else 'exact search takes none'})")
    sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(deleted, dtype=np.int64))) if len(deleted) else None
    if not params and sel is None:
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


def probe_queries(vectors: np.ndarray, n: int = PROBES, seed: int = 0) -> np.ndarray:
    """`n` normalised queries near, but not at, sampled stored vectors."""
    rng = np.random.default_rng(seed)
    sample = np.asarray(vectors[np.sort(rng.choice(len(vectors), min(n, len(vectors)), replace=False))], np.float32)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    scores, _ = exact.search(sample, min(2, len(vectors)))
    nearest_other = np.sqrt(np.maximum(0.0, 2 - 2 * scores[:, -1])) if len(vectors) > 1 else np.full(len(sample), 0.1)
    noise = rng.standard_normal(sample.shape).astype(np.float32) / np.sqrt(sample.shape[1])
    queries = sample + noise * nearest_other[:, None]
    return queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)


def recall(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, deleted: np.ndarray, queries: np.ndarray,
           params: dict) -> dict:
    """recall@1 and recall@10 of `index` searched with `params`, against exact search over `vectors`."""
    k = min(10, len(ids))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    truth = np.asarray(ids)[exact.search(queries, k)[1]]
    found = index.search(queries, k, params=faiss_params(index, params, deleted))[1]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(found.tolist(), truth.tolist(), strict=True)]
    return {"at_1": float(np.mean(found[:, 0] == truth[:, 0])), "at_10": float(np.mean(overlap))}


def tune(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, deleted: np.ndarray,
         target: float = RECALL_TARGET) -> tuple[dict, dict]:
    """The cheapest setting whose recall@10 meets `target` (the most accurate tried when none does),
    and the recall measured at it."""
    knob = parameter(index)
    queries = probe_queries(vectors)
    if knob is None:
        values = [None]
    elif knob == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        values = sorted({min(nlist, 2**i) for i in range(int(np.log2(nlist)) + 2)})
    else:
        values = list(EF_SEARCH)
    for value in values:
        params = {} if value is None else {knob: value}
        measured = recall(index, ids, vectors, deleted, queries, params)
        if measured["at_10"] >= target:
            break
    return params, {**measured, "target": target, "met": measured["at_10"] >= target, "queries": len(queries),
                    "method": METHOD}
