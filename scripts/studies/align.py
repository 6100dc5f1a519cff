"""Which training recipe aligns the submodels' metric space: the XL-index / S-query cell against the diagonal.

Every option trains the preset's MatViT with the same data, epochs and seed and one change to the recipe
(self-distillation from XL, loss weights, random Mix'n'Match specs, more epochs), then measures its 4x4 1-NN
grid (training split as gallery, test split as queries) and, for the options in `mixnmatch`, every monotone
Mix'n'Match spec queried against its XL index. A baseline S of the same epochs gives the cell that target 2
of the consistency benchmark compares with. One step file per option (`steps/<option>.json`); a rerun measures
only what is missing, and trainings are reused from the cache.

    python -m scripts.studies.align --epochs 2 --out docs/results/align-fmnist
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.bench import steps
from app.bench.consistency import embed_named, options_json, train_cached
from app.bench.consistency_report import MIXNMATCH_MISS, misses_by_mix, mixnmatch_below
from matvit import metrics, provenance
from matvit import spec as specs
from matvit.registry import PRESETS, get_preset
from matvit.train import TrainOptions
from retrieval.encoder import Encoder
from retrieval.grid import grid_from_embeddings

from . import make_parser
from . import run as run_study

# name: (what changes, `TrainOptions` fields; `epochs_scale` multiplies the study's epochs)
OPTIONS: dict[str, tuple[str, dict]] = {
    "plain": ("joint training, every granularity's loss weighted 1", {}),
    "logits": ("+ KL of each smaller width's logits to XL's", {"distill": "logits"}),
    "embedding": ("+ 1 - cosine of each smaller width's embedding to XL's (detached)", {"distill": "embedding"}),
    "relational": ("+ squared error between each smaller width's similarities to XL's batch embeddings and XL's "
                   "own", {"distill": "relational"}),
    "small-weights": ("loss weights 2, 1.5, 1.25, 1 (S, M, L, XL)", {"weights": [2.0, 1.5, 1.25, 1.0]}),
    "mixnmatch": ("+ a random monotone Mix'n'Match spec in half the steps", {"mixnmatch_prob": 0.5}),
    "longer": ("plain, twice the epochs", {"epochs_scale": 2}),
    "cosine": ("cosine classifier (16 x cosine of the embedding to each class weight) instead of linear",
               {"head": "cosine"}),
    "baseline-S": ("an independent plain ViT of S's width (the reference of target 2)", {"baseline": "S"}),
    "baseline-S-cosine": ("baseline S with the cosine classifier (the reference of `cosine`)",
                          {"baseline": "S", "head": "cosine"}),
}
MIXNMATCH_MEASURED = ["plain", "mixnmatch", "cosine"]  # the options whose Mix'n'Match specs are measured by default


@dataclass
class AlignOptions:
    dataset: str
    preset: str
    out: Path
    epochs: int = 2
    options: list[str] = field(default_factory=lambda: list(OPTIONS))
    mixnmatch: list[str] = field(default_factory=lambda: list(MIXNMATCH_MEASURED))
    cache: Path | None = None  # trainings; default runs/align/<preset>-<dataset>
    seed: int = 0
    data_dir: Path | None = None


def train_options(opts: AlignOptions, name: str) -> TrainOptions:
    fields = dict(OPTIONS[name][1])
    epochs = opts.epochs * fields.pop("epochs_scale", 1)
    slug = opts.dataset.replace(":", "-").replace("/", "_").strip("_")
    cache = Path(opts.cache or Path("runs") / "align" / f"{opts.preset}-{slug}")
    # Every option on plain joint training, whatever the preset's recipe: the warm-up is the induce study's.
    return TrainOptions(preset=opts.preset, dataset=opts.dataset, out=cache / name, data_dir=opts.data_dir,
                        epochs=epochs, seed=opts.seed, **{"dense_epochs": 0, **fields})


def measure_option(opts: AlignOptions, name: str, log=print) -> dict:
    """Train (or reuse) one option's model and measure its grid (and Mix'n'Match specs); the step's row."""
    train_opts = train_options(opts, name)
    settings = {"train": options_json(train_opts), "mixnmatch": name in opts.mixnmatch}
    path = Path(opts.out) / "steps" / f"{name}.json"
    if (row := steps.saved(path, settings, log)) is not None:
        return row
    origin = provenance.record()
    seconds = train_cached(train_opts, log)
    encoder = Encoder.load(train_opts.out)
    gallery, queries, g, q = embed_named(encoder, opts.dataset, opts.data_dir, name)
    xl = encoder.named()[-1].text
    grid = grid_from_embeddings(g, q, gallery.labels, queries.labels, (xl, xl))["grid"]
    row = {"settings": settings, "option": name, "what": OPTIONS[name][0], "epochs": train_opts.recipe.epochs,
           "seed": opts.seed, **origin, "train_seconds": seconds,
           "queries": len(queries.labels),
           "grid": {i: {j: cell["knn1"] for j, cell in cols.items()} for i, cols in grid.items()}}
    if name in opts.mixnmatch:
        row["mixnmatch"] = []
        for spec in specs.monotone(encoder.model):
            emb = q[spec.text] if spec.text in q else encoder.encode(queries.images, spec, desc=f"{name} {spec.text}")
            row["mixnmatch"].append({"spec": spec.text, "gflops": encoder.gflops(spec),
                                     "knn1": metrics.knn1(g[xl], gallery.labels, emb, queries.labels)})
    return steps.write(path, row)


def run(opts: AlignOptions, log=print) -> dict:
    """Measure every option (reusing finished steps), then write align.json and align.md from all the steps in
    `out/steps` that match this study's dataset, preset and seed."""
    out = Path(opts.out)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    for name in opts.options:
        measure_option(opts, name, log)
    rows = [json.loads(p.read_text()) for p in sorted((out / "steps").glob("*.json"))]
    rows = sorted((r for r in rows if r["option"] in OPTIONS), key=lambda r: list(OPTIONS).index(r["option"]))
    result = {"dataset": opts.dataset, "preset": opts.preset, "epochs": opts.epochs, "seed": opts.seed,
              "command": provenance.record()["command"], "options": rows}
    (out / "align.json").write_text(json.dumps(result, indent=2))
    (out / "align.md").write_text(markdown(result))
    return result


def _pt(x: float | None, signed: bool = False) -> str:
    return "" if x is None else (f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}")


def markdown(r: dict) -> str:
    rows = {row["option"]: row for row in r["options"]}
    full = get_preset(r["preset"]).recipe.epochs
    first = r["options"][0] if r["options"] else {}
    lines = [f"# Aligning the metric space: {r['dataset']}, {r['preset']}, {r['epochs']} epochs "
             f"(the full recipe has {full})", "",
             f"Command: `{r['command']}`  ",
             f"Commits: {', '.join(sorted({'`' + row['commit'] + '`' for row in r['options']}))}  ",
             f"Machine: {first.get('machine', {}).get('cpu', '?')}, {first.get('machine', {}).get('cores', '?')} "
             f"cores, torch {first.get('machine', {}).get('torch', '?')}; seed {r['seed']}", "",
             "1-NN accuracy (%), training split as gallery, test split as queries. Diagonal: each granularity on "
             "its own index. XL / S: the XL index queried by S (target 2 asks it to reach baseline S on itself). "
             "Mix'n'Match misses: monotone specs more than 0.5 points under the segments joining the trained "
             "granularities on the XL index (target 5).", "",
             "| option | recipe | epochs | S | M | L | XL | XL / S | XL / S - S / S "
             "| XL / S - baseline S (same epochs and classifier) | Mix'n'Match misses | train min |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        grid = row["grid"]
        diag = [grid[g][g] if g in grid else None for g in ("S", "M", "L", "XL")]
        xl_s = grid.get("XL", {}).get("S")
        gap = xl_s - grid["S"]["S"] if xl_s is not None else None
        base = rows.get("baseline-S-cosine" if row["settings"]["train"].get("head") == "cosine" else "baseline-S")
        same_length = base is not None and base["epochs"] == row["epochs"]  # else no baseline of its length
        vs = xl_s - base["grid"]["S"]["S"] if xl_s is not None and same_length else None
        misses = ""
        if "mixnmatch" in row:
            below = mixnmatch_below(grid["XL"], row["mixnmatch"])
            misses = f"{sum(v < MIXNMATCH_MISS for v in below.values())} of {len(below)}"
        lines.append(f"| {name} | {row['what']} | {row['epochs']} | " + " | ".join(_pt(x) for x in diag)
                     + f" | {_pt(xl_s)} | {_pt(gap, True)} | {_pt(vs, True)} | {misses} | "
                       f"{row['train_seconds'] / 60:.1f} |")
    for name, row in rows.items():
        if "mixnmatch" not in row:
            continue
        lines += ["", f"**{name}**: " + "\n".join(misses_by_mix(mixnmatch_below(row["grid"]["XL"], row["mixnmatch"])))]
    if rows:
        acc, n = np.mean([row["grid"]["S"]["S"] for row in rows.values()]), first["queries"]
        lines += ["", f"One seed per option: on {n:,} queries a cell's binomial standard error is about "
                  f"{100 * float(np.sqrt(acc * (1 - acc) / n)):.2f} points, so differences of a few tenths between "
                  "options are within noise."]
    return "\n".join(lines) + "\n"


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if unknown := [n for n in names if n not in OPTIONS]:
        raise argparse.ArgumentTypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    q = make_parser("scripts.studies.align", "Training options against the XL-index / S-query cell, the diagonal and "
                                             "the Mix'n'Match misses.")
    q.add_argument("--dataset", default="fashion-mnist")
    q.add_argument("--preset", default="matvit-small-fmnist", choices=list(PRESETS))
    q.add_argument("--epochs", type=int, default=2, help="epochs of every option (a proxy of the full recipe)")
    q.add_argument("--options", type=_names, default=list(OPTIONS), help=f"of: {', '.join(OPTIONS)}")
    q.add_argument("--mixnmatch", type=_names, default=list(MIXNMATCH_MEASURED),
                   help="options whose Mix'n'Match specs are measured")
    q.add_argument("--out", type=Path, default=Path("docs/results/align-fmnist"))
    q.add_argument("--cache", type=Path, help="training runs (default runs/align/PRESET-DATASET)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--data-dir", type=Path)
    return q


def _cli(args: argparse.Namespace) -> None:
    run(AlignOptions(dataset=args.dataset, preset=args.preset, out=args.out, epochs=args.epochs, options=args.options,
                     mixnmatch=args.mixnmatch, cache=args.cache, seed=args.seed, data_dir=args.data_dir))
    print((args.out / "align.md").read_text())


def main(argv: list[str] | None = None) -> int:
    return run_study(build_parser(), _cli, argv)


if __name__ == "__main__":
    sys.exit(main())
