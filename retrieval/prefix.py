"""Search on a prefix of the embeddings (Matryoshka dimensions), decided once for every caller.

A gallery keeps XL's full, L2-normalised vectors. Searching with the first `dims` dimensions:

- a prefix is re-normalised to unit length, so its similarity is the cosine of the two prefixes (the inner
  product of the normalised prefixes), the similarity a Matryoshka-trained model's prefix loss optimises;
- exact prefix search ranks the whole gallery by that similarity (one flat index of normalised prefixes per
  length, built on first use);
- the funnel shortlists `shortlist` items with the prefix, then re-ranks them by the full vectors' inner product
  (Matryoshka's funnel retrieval; FAISS's `IndexRefineFlat` does the same over a coarse index);
- a prefix index (index key `PrefixD,KEY`, for example `Prefix32,IVF4096,SQ8` or `Prefix16,HNSW16`) is a FAISS
  index of kind KEY over the normalised D-prefixes, whose candidates are always re-ranked by the stored full
  vectors (AdANNS-style): an approximate funnel that keeps only the prefixes' codes in memory.

`dims` equal to the vectors' length is plain full search; anything outside 1 .. length (or, for a model, outside
the lengths it was trained for) is a `UserError` naming the valid values.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import faiss
import numpy as np

from matvit.errors import UserError

EPS = 1e-12  # a prefix of zeros stays zero instead of dividing by zero
SHORTLIST = 100  # the funnel's default shortlist: at least this many, and 10 per neighbour asked for
PREFIX_KEY = re.compile(r"Prefix(\d+),(.+)")


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


@dataclass(frozen=True)
class Plan:
    """How a query searches: the prefix length, and the funnel's shortlist (None: exact on the prefix)."""

    dims: int
    shortlist: int | None = None

    @classmethod
    def of(cls, length: int, dims: int | None = None, funnel: int | None = None, k: int = 10,
           shortlist: int | None = None, allowed: list[int] | None = None) -> Plan:
        """The plan of `--dims` or `--funnel` (at most one; neither: full search) over vectors of `length`."""
        if dims is not None and funnel is not None:
            raise UserError("give either dims (exact search on a prefix) or funnel (a prefix's shortlist re-ranked "
                            "by the full vectors), not both")
        if funnel is None:
            if shortlist is not None:
                raise UserError("a shortlist is the funnel's: give funnel with it")
            return cls(check_dims(length if dims is None else dims, length, allowed))
        shortlist = max(SHORTLIST, 10 * k) if shortlist is None else shortlist
        if shortlist < k:
            raise UserError(f"the shortlist ({shortlist}) must hold at least k ({k}) items")
        return cls(check_dims(funnel, length, allowed), shortlist)

    def to_dict(self) -> dict:
        return {"dims": self.dims, "funnel": self.shortlist is not None, "shortlist": self.shortlist}

    @property
    def key(self) -> str:
        """A short name of the way of searching (the shortlist aside): `16`, or `16-funnel`."""
        return f"{self.dims}-funnel" if self.shortlist else str(self.dims)

    @property
    def text(self) -> str:
        return (f"the {self.dims}-d prefix's {self.shortlist} nearest, re-ranked by the full vectors" if self.shortlist
                else f"{self.dims} dimensions")


class PrefixSearch:
    """Prefix and funnel search over fixed full vectors (a gallery version never changes); `ids` name the rows
    (default: their positions). Thread-safe: each length's flat index is built once, on first use."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray | None = None) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ids = np.arange(len(self.vectors)) if ids is None else np.asarray(ids, dtype=np.int64)
        self._flat: dict[int, faiss.Index] = {}
        self._building = threading.Lock()

    def flat(self, dims: int) -> faiss.Index:
        with self._building:
            if dims not in self._flat:
                index = faiss.IndexFlatIP(dims)
                index.add(prefix(self.vectors, dims))
                self._flat[dims] = index
            return self._flat[dims]

    def search(self, queries: np.ndarray, k: int, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each queries x min(k, rows): the prefix's cosine for exact prefix search, the
        full vectors' inner product for the funnel."""
        k = min(k, len(self.vectors))
        if not k:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, rows = self.flat(plan.dims).search(prefix(queries, plan.dims), k if plan.shortlist is None
                                                   else min(plan.shortlist, len(self.vectors)))
        if plan.shortlist is not None:
            full = np.einsum("qd,qsd->qs", np.asarray(queries, dtype=np.float32), self.vectors[rows])
            order = np.argsort(-full, axis=1, kind="stable")[:, :k]
            scores, rows = np.take_along_axis(full, order, axis=1), np.take_along_axis(rows, order, axis=1)
        return scores, self.ids[rows]


def split_key(key: str) -> tuple[int | None, str]:
    """(D, KEY) of a prefix index key `PrefixD,KEY`; (None, key) for an index over the full vectors."""
    match = PREFIX_KEY.fullmatch(key)
    return (int(match[1]), match[2]) if match else (None, key)


def over_prefix(index: faiss.Index, length: int, dims: int) -> faiss.Index:
    """`index` (of `dims`-d vectors) fed the normalised `dims`-prefix of `length`-d vectors."""
    fed = faiss.IndexPreTransform(faiss.NormalizationTransform(dims, 2.0), index)
    fed.prepend_transform(faiss.RemapDimensionsTransform(length, dims, False))
    return fed


def index_dims(index: faiss.Index) -> int | None:
    """The prefix length a FAISS index (`over_prefix`, IDMap2-wrapped or not) searches; None for full vectors."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexPreTransform):
        first = faiss.downcast_VectorTransform(inner.chain.at(0))
        if isinstance(first, faiss.RemapDimensionsTransform):
            return first.d_out
    return None
