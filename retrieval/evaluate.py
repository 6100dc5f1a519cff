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


def grid(encoder: Encoder, gallery: data.ImageSet, queries: data.ImageSet, index_specs: list[Submodel],
         query_specs: list[Submodel], reference: str = "XL") -> dict:
    """`{"grid": {index spec: {query spec: {"knn1", "top5", "map10", "agree_xl"}}}}`."""
    embed = {}

    def embedded(spec: Submodel, which: str) -> np.ndarray:
        key = (spec.id, which)
        if key not in embed:
            images = gallery.images if which == "gallery" else queries.images
            embed[key] = encoder.encode(images, spec, desc=f"{which} {spec.text}")
        return embed[key]

    ref = encoder.spec(reference)
    ref_top1 = evaluate.search(embedded(ref, "gallery"), embedded(ref, "queries"), 1)[1][:, 0]
    gallery_labels = gallery.labels.numpy()
    result: dict = {"grid": {}}
    for i in index_specs:
        row = result["grid"][i.text] = {}
        for q in query_specs:
            _, idx = evaluate.search(embedded(i, "gallery"), embedded(q, "queries"), K)
            metrics = evaluate.knn_metrics(gallery_labels[idx], queries.labels.numpy())
            metrics["agree_xl"] = float((idx[:, 0] == ref_top1).mean())
            row[q.text] = metrics
    return result


def heatmap(result: dict, path: Path, title: str = "1-NN accuracy", metric: str = "knn1", ax=None) -> None:
    """Rows: index submodel; columns: query submodel; one annotated cell per pair."""
    rows = list(result["grid"])
    cols = list(next(iter(result["grid"].values())))
    values = np.array([[result["grid"][r][c][metric] for c in cols] for r in rows])
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 1.0 * len(rows) + 1.5))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=45 if max(map(len, cols)) > 3 else 0)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("query submodel")
    ax.set_ylabel("index submodel")
    ax.set_title(title)
    for r in range(len(rows)):
        for c in range(len(cols)):
            ax.text(c, r, f"{values[r, c]:.3f}", ha="center", va="center",
                    color="black" if values[r, c] > 0.6 else "white", fontsize=8)
    if own:
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def write(result: dict, out: Path) -> Path:
    """`out` as JSON and the heatmap beside it as PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    png = out.with_suffix(".png")
    heatmap(result, png)
    return png
