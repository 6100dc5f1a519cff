"""Milvus's index kinds: an `--index-key` as Milvus's index type and build parameters, the search parameter of
each kind, and tuning it to a recall target."""

from __future__ import annotations

import math
import re

import numpy as np

from . import tuning
from .store_common import auto_index_key
from .store_errors import IndexStoreError


def milvus_index(key: str, count: int) -> tuple[str, str, dict]:
    """(recorded key, Milvus index type, build parameters) of an `--index-key`: `auto` (a FAISS-like choice
    by size: FLAT, HNSW32, IVF), `AUTOINDEX` (Milvus chooses), `Flat`, `HNSW[M]` or `IVF[nlist][,Flat]`."""
    if key == "auto":
        key = auto_index_key(count, 0).split(",")[0]  # Flat, HNSW32, or IVF{4 sqrt(n)} (flat lists here)
    text = key.strip().upper().replace("_", "")
    if text == "AUTOINDEX":
        return "AUTOINDEX", "AUTOINDEX", {}
    if text == "FLAT":
        return "Flat", "FLAT", {}
    if m := re.fullmatch(r"HNSW(\d*)", text):
        links = int(m.group(1) or 32)
        return f"HNSW{links}", "HNSW", {"M": links, "efConstruction": 200}
    if m := re.fullmatch(r"IVF(\d*)(,?FLAT)?", text):
        nlist = int(m.group(1) or max(1, 4 * int(math.sqrt(max(count, 1)))))
        return f"IVF{nlist},Flat", "IVF_FLAT", {"nlist": nlist}
    raise IndexStoreError(f"bad --index-key {key!r} for Milvus: use auto, AUTOINDEX, Flat, HNSW32 or IVF1024,Flat")


def knob(index_key: str) -> str | None:
    """The search parameter of an index kind: `ef_search` (HNSW), `nprobe` (IVF), or None."""
    return "ef_search" if index_key.startswith("HNSW") else "nprobe" if index_key.startswith("IVF") else None


def milvus_search_params(index_key: str, params: dict, k: int) -> dict:
    """Milvus search parameters for this index kind (`tuning.SearchParamError` for one it does not use)."""
    kind = knob(index_key)
    for name in params:
        if name != kind:
            raise tuning.SearchParamError(f"search parameter {name!r} does not apply to this index "
                                          f"({'it takes ' + kind if kind else index_key + ' takes none'})")
    if kind == "ef_search" and "ef_search" in params:
        return {"ef": max(int(params["ef_search"]), k)}  # Milvus needs ef >= k
    if kind == "nprobe" and "nprobe" in params:
        return {"nprobe": int(params["nprobe"])}
    return {}


def tune(gallery, ids: np.ndarray, vectors: np.ndarray, target: float) -> tuple[dict, dict]:
    """Like `tuning.tune`, with the search of a Milvus view (`gallery`): the cheapest ef / nprobe whose recall@10
    meets `target`."""
    key = gallery.manifest["index_key"]
    if key == "Flat" or len(ids) == 0:
        return {}, {"exact": True}
    kind = knob(key)
    queries = tuning.probe_queries(vectors)
    k = min(10, len(ids))
    truth = ids[tuning.exact_search(vectors, queries, k)[1]]
    if kind == "nprobe":
        nlist = gallery.manifest["milvus_index"]["params"]["nlist"]
        values = sorted({min(nlist, 2**i) for i in range(int(np.log2(nlist)) + 2)})
    else:
        values = list(tuning.EF_SEARCH) if kind else [None]
    for value in values:
        params = {} if value is None else {kind: value}
        measured = tuning.overlap(gallery.search(queries, k, params)[1], truth)
        if measured["at_10"] >= target:
            break
    return params, {**measured, "target": target, "met": measured["at_10"] >= target, "queries": len(queries),
                    "method": tuning.METHOD, "at_count": len(ids)}
