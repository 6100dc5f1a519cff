"""Search on a prefix of the embeddings (Matryoshka dimensions), decided once for every caller.

A gallery keeps XL's full, L2-normalised vectors. Searching with the first `dims` dimensions:

- a prefix is re-normalised to unit length, so its similarity is the cosine of the two prefixes (the inner
  product of the normalised prefixes), the similarity a Matryoshka-trained model's prefix loss optimises;
- `exact` ranks the whole gallery by that similarity;
- `funnel` shortlists `shortlist` items with the prefix, then re-ranks them by the full vectors' inner
  product (Matryoshka's funnel retrieval; FAISS's `IndexRefineFlat` does the same over a coarse index).

`dims` equal to the vectors' length is plain full search; anything outside 1 .. length is a `UserError` naming
the valid values.
"""

from __future__ import annotations

import faiss
import numpy as np

from matvit.errors import UserError

EPS = 1e-12  # a prefix of zeros stays zero instead of dividing by zero


def check_dims(dims: int, length: int, allowed: list[int] | None = None) -> int:
    """`dims` if it is a prefix length these vectors have (and, given `allowed`, one of those), else a one-line
    `UserError` naming the valid values."""
    if not (1 <= dims <= length and (allowed is None or dims in allowed)):
        choices = ", ".join(map(str, allowed)) if allowed is not None else f"1 to {length}"
        raise UserError(f"dims {dims} is not available: use {choices}")
    return dims


def prefix(vectors: np.ndarray, dims: int) -> np.ndarray:
    """The first `dims` dimensions of each row, normalised to unit length (float32, contiguous)."""
    head = np.ascontiguousarray(vectors[:, :check_dims(dims, vectors.shape[1])], dtype=np.float32)
    return head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), EPS)


def exact(gallery: np.ndarray, queries: np.ndarray, dims: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact search of `queries` in `gallery` on the `dims`-prefix: (similarities, gallery positions), each
    queries x k."""
    index = faiss.IndexFlatIP(dims)
    index.add(prefix(gallery, dims))
    return index.search(prefix(queries, dims), min(k, len(gallery)))


def funnel(gallery: np.ndarray, queries: np.ndarray, dims: int, k: int,
           shortlist: int) -> tuple[np.ndarray, np.ndarray]:
    """The `shortlist` nearest by the `dims`-prefix, re-ranked by the full vectors' inner product: (full
    similarities, gallery positions) of the best k, each queries x k."""
    if shortlist < k:
        raise UserError(f"the shortlist ({shortlist}) must hold at least k ({k}) items")
    _, candidates = exact(gallery, queries, dims, shortlist)
    full = np.einsum("qd,qsd->qs", np.asarray(queries, dtype=np.float32),
                     np.asarray(gallery, dtype=np.float32)[candidates])
    order = np.argsort(-full, axis=1, kind="stable")[:, :min(k, candidates.shape[1])]
    return np.take_along_axis(full, order, axis=1), np.take_along_axis(candidates, order, axis=1)
