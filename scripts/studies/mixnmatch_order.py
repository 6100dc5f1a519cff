"""Where a Mix'n'Match spec narrows matters: specs whose width never increases with depth (`spec.narrowing`)
against their mirrors that widen (the consistency benchmark's, after the paper), each against the segments joining
the trained granularities. For each seed of a consistency result whose MatViT is still in the training cache, the
narrowing specs query that MatViT's XL index of the train split exactly as the step queried the widening ones
(same model, gallery, 1-NN and GFLOPs count); one file per seed under OUT/steps, then the report over the seeds:

    python -m scripts.studies.mixnmatch_order --result docs/results/consistency-cifar10-warmup-15epochs \
        --cache runs/consistency/matvit-small-cifar-folder-data-augment-none --out docs/results/mixnmatch-order-cifar10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from app.bench.consistency_report import MIXNMATCH_MISS, misses_by_mix, mixnmatch_below
from matvit import provenance
from matvit import spec as specs

from . import kept, make_parser
from . import run as run_study


def mirror(text: str) -> str:
    return ",".join(reversed(text.split(",")))


def compare(trained: dict[str, float], widening: list[dict], narrowing: list[dict]) -> dict:
    """Both families' mixed specs against the segments (points), and each widening spec against its mirror."""
    below = {name: {k: 100 * v for k, v in mixnmatch_below(trained, rows).items() if "," in k}
             for name, rows in (("widening", widening), ("narrowing", narrowing))}
    gain = np.array([below["narrowing"][mirror(k)] - v for k, v in below["widening"].items()])
    family = {name: {"misses": int(sum(v < 100 * MIXNMATCH_MISS for v in b.values())),
                     "worst_points": round(min(b.values()), 2),
                     "mean_points": round(float(np.mean(list(b.values()))), 2)}
              for name, b in below.items()}
    return {**family, "pairs": {"count": len(gain), "narrowing_better": int((gain > 0).sum()),
                                "mean_gain_points": round(float(gain.mean()), 2)},
            "below": below}


def _mean_rows(rows: list[list[dict]]) -> list[dict]:
    return [{**spec, "knn1": float(np.mean([r[k]["knn1"] for r in rows]))} for k, spec in enumerate(rows[0])]


def combine(seeds: list[dict]) -> dict:
    """Per seed and on the means over the seeds (mean 1-NN per spec and per granularity)."""
    per_seed = [{"seed": r["seed"], **compare(r["trained"], r["widening"], r["narrowing"])} for r in seeds]
    trained = {g: float(np.mean([r["trained"][g] for r in seeds])) for g in seeds[0]["trained"]}
    mean = compare(trained, _mean_rows([r["widening"] for r in seeds]), _mean_rows([r["narrowing"] for r in seeds]))
    rechecked = max(abs(100 * (n["knn1"] - r["trained"][n["spec"]])) for r in seeds for n in r["narrowing"]
                    if n["spec"] in r["trained"])
    return {"seeds": [r["seed"] for r in seeds], "per_seed": per_seed, "mean": mean, "trained_mean": trained,
            "uniform_recheck_points": round(rechecked, 2),
            "runs": [{k: r[k] for k in ("seed", "settings", "commit", "command", "machine")} for r in seeds]}


def run(result: Path, cache: Path, out: Path, log=print) -> dict:
    """Measure every seed of the consistency `result` whose MatViT is in `cache`, then write
    mixnmatch-order.json, .md and .png to `out`."""
    rows = kept.measure_result(result, cache, out, specs.narrowing, "narrowing", {"widening": "mixnmatch"}, log=log)
    report = {"result": str(result), "cache": str(cache), "dataset": rows[0]["dataset"], **provenance.record(),
              **combine(rows)}
    (out / "mixnmatch-order.json").write_text(json.dumps(report, indent=2))
    (out / "mixnmatch-order.md").write_text(markdown(report))
    order_png(report, out / "mixnmatch-order.png")
    return report


def markdown(r: dict) -> str:
    seeds, mean = ", ".join(map(str, r["seeds"])), r["mean"]
    cell = lambda f: f"{f['misses']} ({f['worst_points']:+.2f}, {f['mean_points']:+.2f})"  # noqa: E731
    lines = [f"# Mix'n'Match specs that narrow with depth against specs that widen: {r['dataset']}, seed(s) {seeds}",
             "", f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}` (each seed's own: `runs` in the JSON)  ",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}", "",
             f"The widening specs (width never decreasing with depth) are those the consistency benchmark measured in "
             f"`{r['result']}`; the narrowing ones are their mirrors (same parameters and GFLOPs), measured here on "
             "the same MatViT against the same XL index of the train split. Each mixed spec's 1-NN accuracy is "
             "compared with the segments joining S, M, L and XL (1-NN against GFLOPs) from the step's grid; "
             f"measured again here, the trained granularities differ from it by at most "
             f"{r['uniform_recheck_points']:.2f} points.", "",
             f"| seed | {mean['pairs']['count']} widening specs: misses (worst, mean against the segments) | "
             "narrowing: misses (worst, mean) | pairs where narrowing is better | mean gain (points) |",
             "|---|---|---|---:|---:|"]
    for name, c in [*((str(s["seed"]), s) for s in r["per_seed"]), ("mean over the seeds", mean)]:
        p = c["pairs"]
        lines.append(f"| {name} | {cell(c['widening'])} | {cell(c['narrowing'])} | "
                     f"{p['narrowing_better']} of {p['count']} | {p['mean_gain_points']:+.2f} |")
    below = mean["below"]
    worst = sorted(below["widening"].items(), key=lambda kv: kv[1])[:5]
    lines += ["", "A miss lies more than 0.5 points under the segments. The worst widening specs on the means, "
              "against their mirrors (points against the segments):", "",
              "| widening spec | points | its narrowing mirror | points |", "|---|---:|---|---:|",
              *(f"| `{k}` | {v:+.2f} | `{mirror(k)}` | {below['narrowing'][mirror(k)]:+.2f} |" for k, v in worst),
              "", "Narrowing specs on the means.", "",
              *misses_by_mix({k: v / 100 for k, v in below["narrowing"].items()}), "",
              "![order](mixnmatch-order.png)"]
    return "\n".join(lines) + "\n"


def order_png(r: dict, path: Path) -> None:
    """Each mixed spec's distance to the segments, narrowing mirror against widening spec, on the means."""
    below = r["mean"]["below"]
    xs = list(below["widening"].values())
    ys = [below["narrowing"][mirror(k)] for k in below["widening"]]
    fig = Figure(figsize=(5, 5), layout="tight")
    ax = fig.subplots()
    ax.scatter(xs, ys, s=14, alpha=0.7)
    lo, hi = min(xs + ys) - 0.2, max(xs + ys) + 0.2
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, label="equal")
    ax.axhline(100 * MIXNMATCH_MISS, color="tab:red", lw=0.8, ls="--", label="miss (0.5 points under)")
    ax.axvline(100 * MIXNMATCH_MISS, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("widening spec: 1-NN minus segments (points)")
    ax.set_ylabel("its narrowing mirror (points)")
    ax.set_title(f"{r['dataset']}: mirrored Mix'n'Match specs\n(means of seeds {', '.join(map(str, r['seeds']))})",
                 fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    q = make_parser("scripts.studies.mixnmatch_order", "Mix'n'Match specs narrowing with depth against their "
                                                       "widening mirrors, on a consistency result's MatViTs.")
    kept.add_arguments(q)
    return q


def _main(args: argparse.Namespace) -> None:
    r = run(args.result, args.cache, args.out)
    m = r["mean"]
    print(f"mixed specs more than 0.5 points under the segments, on the means of seeds {r['seeds']}: widening "
          f"{m['widening']['misses']}, narrowing {m['narrowing']['misses']} of {m['pairs']['count']}")
    print(f"wrote {args.out / 'mixnmatch-order.json'}, mixnmatch-order.md, mixnmatch-order.png")


def main(argv: list[str] | None = None) -> int:
    return run_study(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
