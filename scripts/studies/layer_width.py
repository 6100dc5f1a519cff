"""What one layer's width is worth: on each MatViT of a consistency result still in its training cache, the XL
index of the train split queried by the specs that change one layer only (`spec.one_layer`): the largest width
at layer i and the smallest elsewhere (its gain over the smallest granularity), and the smallest at layer i and
the largest elsewhere (its loss from the largest). Where the Mix'n'Match specs miss the segments, this says which
layer's width the misses come from. One file per seed under OUT/steps, then the report over the seeds:

    python -m scripts.studies.layer_width --result docs/results/consistency-cifar10-warmup-15epochs \
        --cache runs/consistency/matvit-small-cifar-folder-data-augment-none --out docs/results/layer-width-cifar10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from matvit import provenance
from matvit import spec as specs

from . import kept, make_parser
from . import run as run_study


def per_layer(trained: dict[str, float], one_layer: list[dict]) -> dict:
    """Points per layer: `widened` (largest width at the layer only) over the smallest granularity, `narrowed`
    (smallest width at the layer only) against the largest, and the two granularities' gap."""
    names = list(trained)  # the granularities, smallest first
    small, large = names[0], names[-1]
    knn1 = {r["spec"]: r["knn1"] for r in one_layer}
    depth = len(one_layer[0]["spec"].split(","))
    at = lambda inner, outer, i: ",".join(inner if j == i else outer for j in range(depth))  # noqa: E731
    return {"widened": [round(100 * (knn1[at(large, small, i)] - trained[small]), 2) for i in range(depth)],
            "narrowed": [round(100 * (knn1[at(small, large, i)] - trained[large]), 2) for i in range(depth)],
            "gap": round(100 * (trained[large] - trained[small]), 2), "smallest": small, "largest": large}


def combine(seeds: list[dict]) -> dict:
    """Each seed's points per layer, and their means and spreads (sample standard deviation) over the seeds."""
    rows = [{"seed": r["seed"], **per_layer(r["trained"], r["one_layer"])} for r in seeds]
    spread = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
    mean = {k: [{"mean": round(float(np.mean(col)), 2), "sd": round(spread(col), 2)}
                for col in zip(*(r[k] for r in rows), strict=True)] for k in ("widened", "narrowed")}
    gaps = [r["gap"] for r in rows]
    return {"seeds": [r["seed"] for r in seeds], "per_seed": rows, "mean": mean,
            "gap": {"mean": round(float(np.mean(gaps)), 2), "sd": round(spread(gaps), 2)},
            "smallest": rows[0]["smallest"], "largest": rows[0]["largest"],
            "runs": [{k: r[k] for k in ("seed", "settings", "commit", "command", "machine")} for r in seeds]}


def run(result: Path, cache: Path, out: Path, log=print) -> dict:
    """Measure every seed of the consistency `result` whose MatViT is in `cache`, then write layer-width.json,
    .md and .png to `out`."""
    rows = kept.measure_result(result, cache, out, specs.one_layer, "one_layer", log=log)
    report = {"result": str(result), "cache": str(cache), "dataset": rows[0]["dataset"], **provenance.record(),
              **combine(rows)}
    (out / "layer-width.json").write_text(json.dumps(report, indent=2))
    (out / "layer-width.md").write_text(markdown(report))
    layers_png(report, out / "layer-width.png")
    return report


def markdown(r: dict) -> str:
    small, large, seeds = r["smallest"], r["largest"], ", ".join(map(str, r["seeds"]))
    several = len(r["seeds"]) > 1

    def cell(m: dict, values: list[float]) -> str:
        return f"{m['mean']:+.2f} ± {m['sd']:.2f} ({', '.join(f'{v:+.2f}' for v in values)})" if several \
            else f"{m['mean']:+.2f}"

    lines = [f"# What one layer's width is worth: {r['dataset']}, seed(s) {seeds}", "",
             f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}` (each seed's own: `runs` in the JSON)  ",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}", "",
             f"The MatViTs of `{r['result']}`, each queried against its {large} index of the train split (test split, "
             f"1-NN) by the specs that change one layer only. Points: the spec's 1-NN minus {small}'s on the same "
             f"index (layer widened to {large} alone) or minus {large}'s (layer narrowed to {small} alone)"
             + ("; mean ± standard deviation over the seeds, each seed's in brackets. " if several else ". ")
             + f"{large} lies {cell(r['gap'], [s['gap'] for s in r['per_seed']])} points above {small}.", "",
             f"| layer | {large} at this layer, {small} elsewhere: points over {small} | "
             f"{small} at this layer, {large} elsewhere: points from {large} |", "|---:|---|---|"]
    for i, (w, n) in enumerate(zip(r["mean"]["widened"], r["mean"]["narrowed"], strict=True)):
        lines.append(f"| {i + 1} | {cell(w, [s['widened'][i] for s in r['per_seed']])} | "
                     f"{cell(n, [s['narrowed'][i] for s in r['per_seed']])} |")
    return "\n".join([*lines, "", "![layers](layer-width.png)"]) + "\n"


def layers_png(r: dict, path: Path) -> None:
    """Per layer, the mean points of widening it alone and of narrowing it alone, each seed as a dot."""
    small, large = r["smallest"], r["largest"]
    depth = len(r["mean"]["widened"])
    x = np.arange(1, depth + 1)
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    for key, shift, label in (("widened", -0.2, f"{large} at the layer, {small} elsewhere (over {small})"),
                              ("narrowed", 0.2, f"{small} at the layer, {large} elsewhere (from {large})")):
        ax.bar(x + shift, [m["mean"] for m in r["mean"][key]], width=0.4, label=label, alpha=0.8)
        for s in r["per_seed"]:
            ax.scatter(x + shift, s[key], s=8, color="black", zorder=3)
    ax.axhline(0, color="gray", lw=0.8)
    ax.axhline(-r["gap"]["mean"], color="tab:red", lw=0.8, ls="--", label=f"{small} - {large}")
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("1-NN points")
    seeds = ", ".join(map(str, r["seeds"]))
    ax.set_title(f"{r['dataset']}: one layer's width (seed{'s' if len(r['seeds']) > 1 else ''} {seeds}; "
                 f"{large} - {small} = {r['gap']['mean']:+.2f})", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    q = make_parser("scripts.studies.layer_width", "What one layer's width is worth, on a consistency result's "
                                                   "MatViTs.")
    kept.add_arguments(q)
    return q


def _main(args: argparse.Namespace) -> None:
    r = run(args.result, args.cache, args.out)
    for key in ("widened", "narrowed"):
        print(f"{key} alone, points per layer (means of seeds {r['seeds']}): "
              + " ".join(f"{m['mean']:+.2f}" for m in r["mean"][key]))
    print(f"wrote {args.out / 'layer-width.json'}, layer-width.md, layer-width.png")


def main(argv: list[str] | None = None) -> int:
    return run_study(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
