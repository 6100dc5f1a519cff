"""Cross-submodel retrieval evaluation: gallery embedded by one submodel, queries by another.

For every (index submodel, query submodel) pair: 1-NN accuracy, top-5 accuracy, mAP@10, and
agreement with XL (the share of queries whose nearest gallery item is the one XL-on-both-sides finds).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from matvit import data, evaluate  # noqa: E402
from matvit.spec import Submodel  # noqa: E402

from .encoder import Encoder  # noqa: E402

K = 10


def grid_from_embeddings(gallery: dict[str, np.ndarray], queries: dict[str, np.ndarray], gallery_labels,
                         query_labels, reference: tuple[str, str] = ("XL", "XL")) -> dict:
    """Every (gallery encoder, query encoder) pair of precomputed embeddings, keyed by encoder name."""
    gallery_labels, query_labels = np.asarray(gallery_labels), np.asarray(query_labels)
    ref_top1 = evaluate.search(gallery[reference[0]], queries[reference[1]], 1)[1][:, 0]
    result: dict = {"grid": {}}
    for i, g in gallery.items():
        row = result["grid"][i] = {}
        for q, emb in queries.items():
            _, idx = evaluate.search(g, emb, K)
            metrics = evaluate.knn_metrics(gallery_labels[idx], query_labels)
            metrics["agree_xl"] = float((idx[:, 0] == ref_top1).mean())
            row[q] = metrics
    return result


def grid(encoder: Encoder, gallery: data.ImageSet, queries: data.ImageSet, index_specs: list[Submodel],
         query_specs: list[Submodel], reference: str = "XL") -> dict:
    """`{"grid": {index spec: {query spec: {"knn1", "top5", "map10", "agree_xl"}}}}` for one model."""
    ref = encoder.spec(reference)

    def embed(images, specs, which):
        return {s.text: encoder.encode(images, s, desc=f"{which} {s.text}") for s in [*specs, ref]}
    g, q = embed(gallery.images, index_specs, "gallery"), embed(queries.images, query_specs, "queries")
    result = grid_from_embeddings(g, q, gallery.labels, queries.labels, (ref.text, ref.text))
    keep_rows, keep_cols = {s.text for s in index_specs}, {s.text for s in query_specs}
    result["grid"] = {i: {c: m for c, m in row.items() if c in keep_cols}
                      for i, row in result["grid"].items() if i in keep_rows}
    return result


def heatmap(result: dict, ax, title: str = "1-NN accuracy", metric: str = "knn1") -> None:
    """Draw the grid on `ax`: rows index submodel, columns query submodel, one annotated cell per pair."""
    rows = list(result["grid"])
    cols = list(next(iter(result["grid"].values())))
    values = np.array([[result["grid"][r][c][metric] for c in cols] for r in rows])
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=45 if max(map(len, cols)) > 3 else 0)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("query submodel")
    ax.set_ylabel("index submodel")
    ax.set_title(title)
    for r in range(len(rows)):
        for c in range(len(cols)):
            ax.text(c, r, f"{values[r, c]:.3f}", ha="center", va="center",
                    color="black" if values[r, c] > 0.6 else "white", fontsize=8)
    ax.figure.colorbar(image, ax=ax, fraction=0.046)


def write(result: dict, out: Path) -> Path:
    """`out` as JSON and the heatmap beside it as PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    png = out.with_suffix(".png")
    rows, cols = len(result["grid"]), len(next(iter(result["grid"].values())))
    fig, ax = plt.subplots(figsize=(1.2 * cols + 2.5, 1.0 * rows + 1.5))
    heatmap(result, ax)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
