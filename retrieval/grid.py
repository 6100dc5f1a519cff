"""Cross-submodel retrieval evaluation: gallery embedded by one submodel, queries by another.

For every (index submodel, query submodel) pair: 1-NN accuracy, top-5 accuracy, mAP@10, and
agreement with XL (the share of queries whose nearest gallery item is the one XL-on-both-sides finds).
The heatmap of a grid is drawn by `app.bench.plots`.
"""

from __future__ import annotations

import numpy as np

from matvit import data, metrics
from matvit.spec import Submodel

from .encoder import Encoder

K = 10


def grid_from_embeddings(gallery: dict[str, np.ndarray], queries: dict[str, np.ndarray], gallery_labels,
                         query_labels, reference: tuple[str, str] = ("XL", "XL")) -> dict:
    """Every (gallery encoder, query encoder) pair of precomputed embeddings, keyed by encoder name."""
    gallery_labels, query_labels = np.asarray(gallery_labels), np.asarray(query_labels)
    ref_top1 = metrics.search(gallery[reference[0]], queries[reference[1]], 1)[1][:, 0]
    result: dict = {"map10_definition": metrics.map_definition(K), "grid": {}}
    for i, g in gallery.items():
        row = result["grid"][i] = {}
        for q, emb in queries.items():
            _, idx = metrics.search(g, emb, K)
            cell = metrics.knn_metrics(gallery_labels[idx], query_labels, gallery_labels)
            cell["agree_xl"] = float((idx[:, 0] == ref_top1).mean())
            row[q] = cell
    return result


def grid(encoder: Encoder, gallery: data.ImageSet, queries: data.ImageSet, index_specs: list[Submodel],
         query_specs: list[Submodel], reference: str = "XL") -> dict:
    """`{"map10_definition", "grid": {index spec: {query spec: {"knn1", "top5", "map10", "agree_xl"}}}}`."""
    ref = encoder.spec(reference)

    def embed(images, specs, which):
        return {s.text: encoder.encode(images, s, desc=f"{which} {s.text}") for s in [*specs, ref]}
    g, q = embed(gallery.images, index_specs, "gallery"), embed(queries.images, query_specs, "queries")
    result = grid_from_embeddings(g, q, gallery.labels, queries.labels, (ref.text, ref.text))
    keep_rows, keep_cols = {s.text for s in index_specs}, {s.text for s in query_specs}
    result["grid"] = {i: {c: m for c, m in row.items() if c in keep_cols}
                      for i, row in result["grid"].items() if i in keep_rows}
    return result
