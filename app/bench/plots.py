"""Benchmark figures: the index x query heatmap of a grid, the two consistency grids, the Mix'n'Match Pareto plot,
the query cascade against fixed submodels.

Drawn on `matplotlib.figure.Figure` objects (no pyplot, no GUI backend), saved as PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def heatmap(result: dict, ax: Axes, title: str = "1-NN accuracy", metric: str = "knn1") -> None:
    """Draw a grid on `ax`: rows index submodel, columns query submodel, one annotated cell per pair."""
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


def grid_png(result: dict, path: Path) -> Path:
    """The heatmap of one grid (`retrieval.grid.grid`'s result) as a PNG file."""
    rows, cols = len(result["grid"]), len(next(iter(result["grid"].values())))
    fig = Figure(figsize=(1.2 * cols + 2.5, 1.0 * rows + 1.5), layout="tight")
    heatmap(result, fig.subplots())
    fig.savefig(path, dpi=120)
    return Path(path)


def consistency_grids_png(r: dict, path: Path) -> None:
    """The nested model's grid beside the baselines' grid, from a consistency result."""
    fig = Figure(figsize=(11, 4.8), layout="tight")
    left, right = fig.subplots(1, 2)
    heatmap(r["matvit"], left, f"{r.get('family', 'MatViT')}: 1-NN accuracy")
    heatmap(r["baseline"], right, "Independent baselines: 1-NN accuracy")
    fig.savefig(path, dpi=120)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both lower cost and higher accuracy, by cost."""
    front, best = [], -1.0
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def pareto_png(r: dict, path: Path) -> None:
    """Mix'n'Match query encoders against the XL index, by GFLOPs, with the trained granularities and baselines."""
    m = r["matvit"]["grid"]
    pts = [(row["gflops"], row["knn1"]) for row in r["mixnmatch"]]
    fig = Figure(figsize=(7, 4.8), layout="tight")
    ax = fig.subplots()
    ax.scatter(*zip(*pts, strict=True), s=14, color="tab:blue", alpha=0.6, label="Mix'n'Match (XL index)")
    ax.plot(*zip(*pareto_front(pts), strict=True), color="tab:blue", lw=1, label="Pareto frontier")
    flops = {row["spec"]: row["gflops"] for row in r["mixnmatch"]}
    trained = [(flops[g], m["XL"][g]["knn1"], g) for g in m if g in flops]
    ax.plot([t[0] for t in trained], [t[1] for t in trained], "r*-", ms=12, lw=1,
            label="trained granularities (XL index)")
    for x, y, g in trained:
        ax.annotate(g, (x, y), textcoords="offset points", xytext=(5, -12))
    base = [(r["cost"]["baseline"][g]["gflops"], r["baseline"]["grid"][g][g]["knn1"]) for g in r["baseline"]["grid"]]
    ax.scatter(*zip(*base, strict=True), marker="s", color="tab:gray", label="baselines (own index)")
    ax.set_xlabel("query encoder GFLOPs per image")
    ax.set_ylabel("1-NN accuracy")
    ax.set_title(f"{r['dataset']}: query encoders against one XL index")
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)


def cascade_png(r: dict, cost_target: float, path: Path) -> None:
    """1-NN accuracy against mean GFLOPs per query: each fixed submodel and Mix'n'Match spec, and each cascade
    (`app.bench.cascade`)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    fixed = r["fixed"]
    pts = [(f["gflops"], f["accuracy"]) for f in r["mixnmatch"]]
    ax.scatter(*zip(*pts, strict=True), s=10, color="tab:gray", alpha=0.5, label="one Mix'n'Match spec")
    ax.plot(*zip(*pareto_front(pts), strict=True), color="tab:gray", lw=1, label="their Pareto frontier")
    ax.plot([f["gflops"] for f in fixed], [f["accuracy"] for f in fixed], "o-", color="tab:blue", label="one submodel")
    for f in fixed:
        ax.annotate(f["spec"], (f["gflops"], f["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    for c in r["cascades"]:
        t = c["test"]
        chain = " -> ".join(c["stages"])
        ax.plot([t["mean_gflops"]], [t["accuracy"]], "*", markersize=12,
                label=f"cascade for {c['target']:.1%}: {chain}")
    ax.axhline(r["cascades"][0]["target"] * r["xl_accuracy"], color="grey", ls="--", lw=1,
               label=f"{r['cascades'][0]['target']:.1%} of XL's accuracy")
    ax.axvline(cost_target * fixed[-1]["gflops"], color="grey", ls=":", lw=1, label=f"{cost_target:.0%} of XL's GFLOPs")
    ax.set_xlabel("mean GFLOPs per query")
    ax.set_ylabel("1-NN accuracy (test)")
    ax.set_title(f"Query cascade, {r['dataset']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
