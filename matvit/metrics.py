"""Batched embedding, classification accuracy and k-NN retrieval metrics."""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np
import torch
from tqdm import tqdm

from .images import to_input

Encoder = Callable[[torch.Tensor], torch.Tensor]


@torch.inference_mode()
def run_batched(fn: Encoder, images: torch.Tensor, batch_size: int = 512, desc: str | None = None,
                device: torch.device | str = "cpu") -> np.ndarray:
    """Apply `fn` (on `device`) to uint8 images in batches; float32 numpy rows out."""
    chunks = range(0, len(images), batch_size)
    out = [fn(to_input(images[i:i + batch_size].to(device))).float().cpu().numpy() for i in tqdm(
        chunks, desc=desc, unit="batch", leave=False, **({"disable": True} if desc is None else {}))]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def top1(logits: np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    return float((logits.argmax(1) == np.asarray(labels)).mean())


def search(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search: (scores, gallery positions), each queries x k."""
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def map_definition(k: int) -> str:
    """The mAP@k that `knn_metrics` computes, in words (recorded beside the numbers)."""
    return (f"AP@{k} = sum over ranks i <= {k} of precision@i * rel(i), divided by min({k}, number of gallery items "
            f"with the query's label) (0 when there are none); mAP@{k} is its mean over queries")


def knn_metrics(neighbour_labels: np.ndarray, query_labels, gallery_labels) -> dict[str, float]:
    """1-NN accuracy, top-5 accuracy (a correct label among 5 neighbours) and mAP@k (k = columns of
    `neighbour_labels`, the labels of each query's ranked neighbours; see `map_definition`)."""
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    hits = neighbour_labels == query_labels[:, None]
    k = hits.shape[1]
    precision = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    count = dict(zip(*(a.tolist() for a in np.unique(gallery_labels, return_counts=True)), strict=True))
    relevant = np.array([count.get(q, 0) for q in query_labels.tolist()], dtype=np.int64)
    denominator = np.minimum(k, relevant)
    ap = np.where(denominator > 0, (precision * hits).sum(1) / np.maximum(denominator, 1), 0.0)
    return {
        "knn1": float(hits[:, 0].mean()),
        "top5": float(hits[:, :5].any(1).mean()),
        f"map{k}": float(ap.mean()),
    }


def knn1(gallery: np.ndarray, gallery_labels, queries: np.ndarray, query_labels) -> float:
    """1-NN accuracy of `queries` against `gallery`."""
    _, idx = search(gallery, queries, 1)
    return float((np.asarray(gallery_labels)[idx[:, 0]] == np.asarray(query_labels)).mean())
