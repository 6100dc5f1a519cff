"""FAISS on GPUs, when FAISS reports any: IVF training (k-means assignment) and search.

The faiss-cpu wheel reports no GPU, so the CPU path is the default. With a FAISS built for CUDA (conda's
`faiss-gpu`) on a machine with GPUs, IVF quantizers are trained and indexes searched on every visible GPU,
after FAISS's documented pattern: `index_cpu_to_all_gpus` for a search copy, a GPU flat index as the
IVF's `clustering_index` for training. The CPU index stays the one that is saved, tuned and filtered:
HNSW and on-disk inverted lists have no GPU version, and a search that filters tombstoned ids runs
on the CPU.
"""

from __future__ import annotations

import logging

import faiss

log = logging.getLogger(__name__)


def count() -> int:
    """GPUs FAISS can use (0 for the faiss-cpu wheel)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def train_on_gpus(index: faiss.Index) -> None:
    """Let an untrained IVF index assign its k-means points on the GPUs (nothing for other kinds, or without)."""
    if not count():
        return
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))


def search_copy(index: faiss.Index) -> faiss.Index | None:
    """A copy of `index` on every GPU to search with, or None (no GPU, or a kind FAISS cannot move)."""
    if not count():
        return None
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as e:
        log.info("searching on the CPU: FAISS cannot move this index to the GPUs (%s)", str(e).strip()[:200])
        return None
