"""The cross-consistency benchmark: one MatViT against four independently trained baselines.

MatViT's submodels share XL's metric space, so an index built with XL serves queries from every
submodel; baselines of different widths do not share a space (MatFormer Sec. 4.2.2). The benchmark
trains (or reuses) all five models with the same data, recipe, epochs and seed, then measures the
MatViT grid, the baseline grid, Mix'n'Match query encoders against the XL index, and the costs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matvit import data, metrics, provenance
from matvit import spec as specs
from matvit.config import GRANULARITY_NAMES, get_preset
from matvit.train import Trainer, TrainOptions, option_differences
from retrieval.budget import measure
from retrieval.encoder import Encoder
from retrieval.grid import grid_from_embeddings

from .plots import consistency_grids_png, pareto_png


@dataclass
class BenchOptions:
    dataset: str
    preset: str
    out: Path
    epochs: int | None = None
    reuse: bool = False
    cache: Path | None = None  # where the five trainings go; default runs/consistency/<preset>-<dataset>
    seed: int = 0
    data_dir: Path | None = None
    latency_repeats: int = 15


def _run_matches(run: Path, train_opts: TrainOptions) -> bool:
    """True when `run` is a finished training with exactly these options (every one but `out`)."""
    try:
        train = json.loads((run / "config.json").read_text())["train"]
        finished = (run / "eval.json").is_file()
        log_epochs = len((run / "train_log.jsonl").read_text().splitlines())
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return False
    same = not option_differences(train, json.loads(json.dumps(train_opts.to_dict())))  # as JSON gives it back
    return finished and same and log_epochs == train_opts.recipe.epochs


def train_cached(train_opts: TrainOptions, log=print, reuse: bool = True) -> float:
    """Train into `train_opts.out` unless (with `reuse`) a finished run of the same options is there; returns
    the training's wall time in seconds."""
    run = Path(train_opts.out)
    if reuse and _run_matches(run, train_opts):
        log(f"reusing {run}")
    else:
        log(f"training {run.name} ({train_opts.recipe.epochs} epochs) into {run}")
        Trainer(train_opts).run(log=log)
    return float(json.loads((run / "eval.json").read_text())["train_seconds"])


def train_or_reuse(opts: BenchOptions, baseline: str | None, log=print) -> tuple[Encoder, float]:
    """The trained model's encoder and its training wall time in seconds."""
    name = f"baseline-{baseline}" if baseline else "matvit"
    slug = opts.dataset.replace(":", "-").replace("/", "_").strip("_")
    run = Path(opts.cache or Path("runs") / "consistency" / f"{opts.preset}-{slug}") / name
    train_opts = TrainOptions(preset=opts.preset, dataset=opts.dataset, out=run, data_dir=opts.data_dir,
                              epochs=opts.epochs, baseline=baseline, seed=opts.seed)
    seconds = train_cached(train_opts, log, opts.reuse)
    return Encoder.load(run), seconds


def run(opts: BenchOptions, log=print) -> dict:
    """Train or reuse the five models, measure everything, write the outputs; returns the JSON dict."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    origin = provenance.record()  # the code that started the run, not whatever is checked out at its end
    matvit, matvit_seconds = train_or_reuse(opts, None, log)
    baselines = {g: train_or_reuse(opts, g, log) for g in GRANULARITY_NAMES}
    measure_start = time.perf_counter()
    cfg = matvit.config
    gallery = data.load(opts.dataset, "train", cfg.img_size, cfg.in_chans, opts.data_dir)
    queries = data.load(opts.dataset, "test", cfg.img_size, cfg.in_chans, opts.data_dir)

    named = specs.named(cfg)
    mg = {s.text: matvit.encode(gallery.images, s, desc=f"MatViT gallery {s.text}") for s in named}
    mq = {s.text: matvit.encode(queries.images, s, desc=f"MatViT queries {s.text}") for s in named}
    bg = {g: enc.encode(gallery.images, g, desc=f"baseline {g} gallery") for g, (enc, _) in baselines.items()}
    bq = {g: enc.encode(queries.images, g, desc=f"baseline {g} queries") for g, (enc, _) in baselines.items()}
    matvit_grid = grid_from_embeddings(mg, mq, gallery.labels, queries.labels)
    baseline_grid = grid_from_embeddings(bg, bq, gallery.labels, queries.labels)

    xl_index = mg["XL"]
    mixnmatch = []
    for spec in specs.monotone(cfg):
        emb = mq[spec.text] if spec.text in mq else matvit.encode(queries.images, spec)
        knn1 = metrics.knn1(xl_index, gallery.labels, emb, queries.labels)
        mixnmatch.append({"spec": spec.text, **measure(matvit, spec, opts.latency_repeats), "knn1": knn1})
    costs = {"matvit": {s.text: measure(matvit, s, opts.latency_repeats) for s in named},
             "baseline": {g: measure(enc, g, opts.latency_repeats) for g, (enc, _) in baselines.items()}}

    result = {
        "dataset": opts.dataset, "preset": opts.preset,
        "epochs": opts.epochs or get_preset(opts.preset).recipe.epochs, "seed": opts.seed,
        **origin,
        "matvit": matvit_grid, "baseline": baseline_grid, "mixnmatch": mixnmatch, "cost": costs,
        "train_seconds": {"matvit": matvit_seconds, "baseline": {g: s for g, (_, s) in baselines.items()}},
        "measure_seconds": round(time.perf_counter() - measure_start, 1),
        "classes": len(gallery.classes),
    }
    result["targets"] = targets(result)
    (out / "consistency.json").write_text(json.dumps(result, indent=2))
    (out / "consistency.md").write_text(markdown(result))
    consistency_grids_png(result, out / "grid.png")
    pareto_png(result, out / "pareto.png")
    return result


def mixnmatch_below(trained: dict[str, float], mixnmatch: list[dict]) -> dict[str, float]:
    """How far each Mix'n'Match spec's 1-NN lies above (+) or below (-) the segments joining the trained
    granularities' points (GFLOPs, 1-NN); `trained` maps a granularity to its 1-NN on the XL index."""
    flops = {row["spec"]: row["gflops"] for row in mixnmatch}
    xs, ys = zip(*sorted((flops[g], acc) for g, acc in trained.items() if g in flops), strict=True)
    return {row["spec"]: row["knn1"] - float(np.interp(row["gflops"], xs, ys)) for row in mixnmatch}


def narrowed_layers(below: dict[str, float], smallest: str = "S", miss: float = -0.005) -> list[tuple[int, int]]:
    """Per layer: (specs more than `miss` under the segments with that layer at `smallest`, specs with it)."""
    layers = [spec.split(",") for spec in below if "," in spec]
    depth = len(layers[0]) if layers else 0
    return [(sum(1 for spec, v in below.items() if "," in spec and spec.split(",")[i] == smallest and v < miss),
             sum(1 for names in layers if names[i] == smallest)) for i in range(depth)]


def targets(r: dict) -> list[dict]:
    """The five claims, each with the numbers that decide it."""
    m, b = r["matvit"]["grid"], r["baseline"]["grid"]
    names = list(m)
    out = []
    gaps = {g: m[g][g]["knn1"] - b[g][g]["knn1"] for g in names}
    out.append({"target": "1. each MatViT diagonal cell within 1.0 point of its baseline",
                "met": all(v >= -0.01 for v in gaps.values()), "matvit_minus_baseline": gaps})
    out.append({"target": "2. MatViT index XL / query S >= baseline S on itself",
                "met": m["XL"]["S"]["knn1"] >= b["S"]["S"]["knn1"],
                "matvit_xl_s": m["XL"]["S"]["knn1"], "baseline_s_s": b["S"]["S"]["knn1"]})
    off = {f"{i}/{q}": m[i][q]["knn1"] - m[q][q]["knn1"] for i in names for q in names if i != q}
    out.append({"target": "3. every MatViT off-diagonal cell within 2 points of its query submodel's diagonal",
                "met": all(v >= -0.02 for v in off.values()), "worst": min(off.values()) if off else 0.0})
    chance = 1.0 / r["classes"]
    boff = {f"{i}/{q}": b[i][q]["knn1"] for i in names for q in names if i != q}
    out.append({"target": "4. baseline off-diagonal cells within 10 points of chance",
                "met": all(abs(v - chance) <= 0.10 for v in boff.values()), "chance": chance,
                "max": max(boff.values()) if boff else 0.0})
    below = mixnmatch_below({g: m["XL"][g]["knn1"] for g in names}, r["mixnmatch"])
    out.append({"target": "5. Mix'n'Match points on or above the segments joining trained granularities (0.5 pt)",
                "met": all(v >= -0.005 for v in below.values()), "worst": min(below.values()),
                "below_by_more_than_0.5pt": sum(v < -0.005 for v in below.values()), "points": len(below)})
    return out


def markdown(r: dict) -> str:
    m, b = r["matvit"]["grid"], r["baseline"]["grid"]
    names = list(m)
    lines = [f"# Cross-consistency: {r['dataset']}, {r['preset']}, {r['epochs']} epochs", "",
             f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}`  ",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}", "",
             "1-NN accuracy (%). Rows: index (gallery) encoder; columns: query encoder. MatViT submodels, "
             "with the independently trained baseline of the same width in brackets on the diagonal.", "",
             "| index \\ query | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i in names:
        cells = [f"{100 * m[i][q]['knn1']:.2f}" + (f" ({100 * b[i][q]['knn1']:.2f})" if i == q else "")
                 for q in names]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += ["", "Baselines across models (index built by baseline i, queried by baseline j):", "",
              "| index \\ query | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i in names:
        lines.append(f"| {i} | " + " | ".join(f"{100 * b[i][q]['knn1']:.2f}" for q in names) + " |")
    lines += ["", "## Targets", ""]
    for t in r["targets"]:
        detail = ", ".join(f"{k}: {_fmt(v)}" for k, v in t.items() if k not in ("target", "met"))
        lines.append(f"- {'met' if t['met'] else '**missed**'}: {t['target']} ({detail})")
    lines += ["", "## Cost", "", "| encoder | params | GFLOPs | ms (batch 1) | ms (batch 32) |",
              "|---|---:|---:|---:|---:|"]
    for family, rows in r["cost"].items():
        for g, c in rows.items():
            lines.append(f"| {family} {g} | {c['params']:,} | {c['gflops']:.4f} | {c['latency_ms_b1']:.2f} | "
                         f"{c['latency_ms_b32']:.2f} |")
    ts = r["train_seconds"]
    lines += ["", f"Training wall time: MatViT (all granularities jointly) {ts['matvit'] / 60:.1f} min; "
              f"the four baselines {sum(ts['baseline'].values()) / 60:.1f} min together "
              f"({', '.join(f'{g} {s / 60:.1f}' for g, s in ts['baseline'].items())}).",
              f"Measuring (both grids, Mix'n'Match, costs) {r['measure_seconds'] / 60:.1f} min; trainings plus "
              f"measuring {(ts['matvit'] + sum(ts['baseline'].values()) + r['measure_seconds']) / 60:.1f} min.",
              "", f"Mix'n'Match: {len(r['mixnmatch'])} monotone specs queried against the MatViT XL index "
              "(`pareto.png`).", "", "![grids](grid.png)", "", "![pareto](pareto.png)"]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
