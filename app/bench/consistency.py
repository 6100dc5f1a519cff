"""The cross-consistency benchmark: one MatViT against four independently trained baselines, over seeds.

MatViT's submodels share XL's metric space, so an index built with XL serves queries from every
submodel; baselines of different widths do not share a space (MatFormer Sec. 4.2.2). For each seed the
benchmark trains (or reuses) the MatViT and the baselines with the same data and recipe, each baseline with a seed
of its own (the paper's baselines are independent models) and, by default, as many passes over the data as the MatViT
(its dense warm-up included; `baseline_epochs` sets another count), then measures the MatViT grid, the
baseline grid, Mix'n'Match query encoders against the XL index, and the costs. Each seed's measurements are one
step file (`steps/seed-N.json`); the report gives every cell's mean and spread over the seeds. A MatViT recipe
changes nothing in the baselines, so a run may take the baselines' measurements from another result's steps whose
baselines trained with the same options (`baselines_from`) instead of training them again; likewise a run that
changes only the baselines may take the MatViT's measurements (`matvit_from`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.options import floats, ints
from matvit import checkpoint, data, metrics, provenance
from matvit import spec as specs
from matvit.config import AUGMENTATIONS, GRANULARITY_NAMES
from matvit.errors import UserError
from matvit.registry import PRESETS, family_of, get_preset
from matvit.train import TrainOptions, finished_run, option_differences
from matvit.warmup import dense_options
from matvit.warmup import train as train_with_warmup
from retrieval.budget import measure
from retrieval.encoder import Encoder
from retrieval.grid import grid_from_embeddings

from . import steps
from .consistency_report import markdown, targets


@dataclass
class BenchOptions:
    dataset: str
    preset: str
    out: Path
    epochs: int | None = None
    augment: str | None = None  # default: the preset's recipe
    mixnmatch_prob: float = 0.0  # MatViT only: a random monotone Mix'n'Match spec in this share of the steps
    weights: list[float] | None = None  # MatViT only: per-granularity loss weights, smallest first (None: all 1)
    dense_epochs: int | None = None  # MatViT only: a dense warm-up of this many epochs (0: none; None: the preset's)
    baseline_epochs: int | None = None  # None: the MatViT's passes over the data (warm-up + joint epochs)
    reuse: bool = False
    cache: Path | None = None  # trainings, under seed-N/; default runs/consistency/<preset>-<dataset>[-augment-<kind>]
    seeds: list[int] = field(default_factory=lambda: [0])
    baselines: list[str] = field(default_factory=lambda: list(GRANULARITY_NAMES))  # trained for every seed
    baselines_from: Path | None = None  # a consistency result whose steps' baselines (same options) are taken
    matvit_from: Path | None = None  # a consistency result whose steps' MatViT measurements (same options) are taken
    data_dir: Path | None = None
    latency_repeats: int = 15


def baseline_seed(seed: int, granularity: str) -> int:
    """Each baseline's own seed: 4 * seed + 1 ... 4 for S ... XL (the MatViT of that seed uses `seed`)."""
    return 4 * seed + GRANULARITY_NAMES.index(granularity) + 1


def _resumable(run: Path, train_opts: TrainOptions) -> bool:
    """True when `run` holds the training checkpoint of an interrupted training with exactly these options."""
    try:
        state = checkpoint.load_training(run)
    except checkpoint.CheckpointError:
        return False
    return state is not None and not option_differences(state["options"], train_opts.to_dict())


def share_warm_up(train_opts: TrainOptions, log=print) -> None:
    """Copy into the run a finished dense warm-up of the same options from another run of the same seed (a MatViT
    recipe that changes only the joint epochs, such as Mix'n'Match sampling, starts from the same dense ViT)."""
    dense = dense_options(train_opts)
    if finished_run(dense.out, dense):
        return
    for other in sorted(Path(train_opts.out).parent.glob("*/dense")):
        if finished_run(other, dense):  # not the run's own: that one is unfinished
            log(f"copying the finished dense warm-up {other} into {dense.out}")
            shutil.rmtree(dense.out, ignore_errors=True)
            shutil.copytree(other, dense.out)
            return


def train_cached(train_opts: TrainOptions, log=print, reuse: bool = True) -> float:
    """Train into `train_opts.out`; with `reuse`, take a finished run of the same options there, or continue an
    interrupted one (or its interrupted dense warm-up) from its last epoch, or start from the same seed's finished
    warm-up of another run. Returns the training's wall time in seconds."""
    run = Path(train_opts.out)
    if reuse and finished_run(run, train_opts):
        log(f"reusing {run}")
    else:
        if reuse and train_opts.recipe.dense_epochs:
            share_warm_up(train_opts, log)
        warm_up = train_opts.recipe.dense_epochs and _resumable(run / "dense", dense_options(train_opts))
        resume = reuse and bool(_resumable(run, train_opts) or warm_up)
        log(f"{'continuing' if resume else 'training'} {run.name} ({train_opts.recipe.epochs} epochs) in {run}")
        train_with_warmup(train_opts, resume=resume, log=log)
    return float(json.loads((run / "eval.json").read_text())["train_seconds"])


def trained_on(run: Path) -> dict:
    """The commit and CPU a finished training ran on (its eval.json's): a seed reproduces a training on the same
    kind of CPU only, and a reused training may come from another machine than the measuring."""
    ev = json.loads((Path(run) / "eval.json").read_text())
    return {"commit": ev.get("commit"), "cpu": ev.get("machine", {}).get("cpu")}


def matvit_run_name(mixnmatch_prob: float, weights: list[float] | None) -> str:
    """The MatViT's folder in a seed's training cache: `matvit`, with the recipe options that set it apart."""
    sampled = f"-mixnmatch-{mixnmatch_prob:g}" if mixnmatch_prob else ""
    weighted = "-weights-" + "-".join(f"{w:g}" for w in weights) if weights else ""
    return "matvit" + sampled + weighted


def passes(options: dict) -> int:
    """How many passes over the data a training of these options (`options_json`) made: its epochs, and its dense
    warm-up's."""
    recipe = options["recipe"]
    return recipe["epochs"] + (recipe.get("dense_epochs") or 0)


def train_options(opts: BenchOptions, seed: int, baseline: str | None) -> TrainOptions:
    """The training options of the seed's MatViT (`baseline` None) or of one of its baselines, which trains
    `opts.baseline_epochs` epochs, or by default as many as the MatViT's passes over the data."""
    epochs = opts.epochs
    if baseline:
        matvit = options_json(train_options(opts, seed, None))
        epochs = passes(matvit) if opts.baseline_epochs is None else opts.baseline_epochs
    slug = opts.dataset.replace(":", "-").replace("/", "_").strip("_")
    default = f"{opts.preset}-{slug}" + (f"-augment-{opts.augment}" if opts.augment else "")
    cache = Path(opts.cache or Path("runs") / "consistency" / default) / f"seed-{seed}"
    # a baseline has no nested widths: one serves every MatViT recipe
    mixnmatch, weights = (0.0, None) if baseline else (opts.mixnmatch_prob, opts.weights)
    name = f"baseline-{baseline}" if baseline else matvit_run_name(mixnmatch, weights)
    return TrainOptions(preset=opts.preset, dataset=opts.dataset, out=cache / name, data_dir=opts.data_dir,
                        epochs=epochs, augment=opts.augment, dense_epochs=opts.dense_epochs, baseline=baseline,
                        mixnmatch_prob=mixnmatch, weights=weights,
                        seed=baseline_seed(seed, baseline) if baseline else seed)


def embed_named(encoder: Encoder, dataset: str, data_dir: Path | None, label: str):
    """The dataset's train split (the gallery) and test split (the queries), and both embedded by every trained
    granularity: `(gallery, queries, {spec: gallery embeddings}, {spec: query embeddings})`."""
    gallery = data.load(dataset, "train", encoder.image_size, encoder.channels, data_dir)
    queries = data.load(dataset, "test", encoder.image_size, encoder.channels, data_dir)
    named = encoder.named()
    g = {s.text: encoder.encode(gallery.images, s, desc=f"{label} gallery {s.text}") for s in named}
    q = {s.text: encoder.encode(queries.images, s, desc=f"{label} queries {s.text}") for s in named}
    return gallery, queries, g, q


def options_json(train_opts: TrainOptions) -> dict:
    """A training's options but its output directory, as JSON gives them back (what step settings compare)."""
    return json.loads(json.dumps({k: v for k, v in train_opts.to_dict().items() if k != "out"}))


def step_settings(opts: BenchOptions, seed: int) -> dict:
    """What a seed's step was measured with: the MatViT's training options and each baseline's."""
    return {"matvit": options_json(train_options(opts, seed, None)),
            "baselines": {g: options_json(train_options(opts, seed, g)) for g in opts.baselines}}


def baselines_measured(row: dict | None, settings: dict) -> bool:
    """True when the step `row` measured every baseline of `settings` with the same training options."""
    if row is None:
        return False
    done = row["settings"].get("baselines", {})
    return all(g in done and not option_differences(done[g], options) for g, options in settings["baselines"].items())


def measure_baselines(opts: BenchOptions, seed: int, gallery, queries, commit: str, log=print) -> dict:
    """Train or reuse the seed's baselines and measure their grid and costs: the baselines' part of a step,
    recorded at `commit`, the checkout the step started from."""
    runs = {g: train_options(opts, seed, g) for g in opts.baselines}
    seconds = {g: train_cached(t, log, opts.reuse) for g, t in runs.items()}
    start = time.perf_counter()
    encoders = {g: Encoder.load(t.out) for g, t in runs.items()}
    bg = {g: enc.encode(gallery.images, g, desc=f"baseline {g} gallery") for g, enc in encoders.items()}
    bq = {g: enc.encode(queries.images, g, desc=f"baseline {g} queries") for g, enc in encoders.items()}
    largest = opts.baselines[-1]
    return {"settings": {g: options_json(t) for g, t in runs.items()}, "baselines": list(opts.baselines),
            "baseline_seeds": {g: t.seed for g, t in runs.items()}, "commit": commit,
            "grid": grid_from_embeddings(bg, bq, gallery.labels, queries.labels, (largest, largest)),
            # a baseline has the shape of MatViT's submodel of its width: its cost is that submodel's, timed once
            "cost": {g: {"params": enc.params(g), "gflops": enc.gflops(g)} for g, enc in encoders.items()},
            "trained_on": {g: trained_on(t.out) for g, t in runs.items()},
            "train_seconds": seconds, "measure_seconds": time.perf_counter() - start}


def baselines_of(row: dict) -> dict:
    """A saved step's baselines' part, as `measure_baselines` gives it."""
    return {"settings": row["settings"]["baselines"], "baselines": row["baselines"],
            "baseline_seeds": row["baseline_seeds"], "commit": row.get("baseline_commit", row["commit"]),
            "grid": row["baseline"], "cost": row["cost"]["baseline"], "train_seconds": row["train_seconds"]["baseline"],
            "trained_on": row.get("trained_on", {}).get("baseline", {})}


def _saved(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def measure_matvit(opts: BenchOptions, seed: int, log=print) -> dict:
    """Train or reuse the seed's MatViT and measure its grid, its Mix'n'Match specs against the XL index and its
    costs: the MatViT's part of a step (with the gallery and queries, which the baselines' part needs)."""
    run = train_options(opts, seed, None)
    seconds = train_cached(run, log, opts.reuse)
    matvit = Encoder.load(run.out)
    start = time.perf_counter()
    gallery, queries, mg, mq = embed_named(matvit, opts.dataset, opts.data_dir, "MatViT")
    mixnmatch = []
    for spec in specs.monotone(matvit.model):
        emb = mq[spec.text] if spec.text in mq else matvit.encode(queries.images, spec)
        mixnmatch.append({"spec": spec.text, "params": matvit.params(spec), "gflops": matvit.gflops(spec),
                          "knn1": metrics.knn1(mg["XL"], gallery.labels, emb, queries.labels)})
    return {"grid": grid_from_embeddings(mg, mq, gallery.labels, queries.labels), "mixnmatch": mixnmatch,
            "cost": {s.text: measure(matvit, s, opts.latency_repeats) for s in matvit.named()},
            "train_seconds": seconds, "trained_on": trained_on(run.out), "commit": None,
            "measure_seconds": time.perf_counter() - start, "classes": len(gallery.classes),
            "data": (gallery, queries)}


def matvit_of(row: dict) -> dict:
    """A saved step's MatViT part, as `measure_matvit` gives it (without the data)."""
    return {"grid": row["matvit"], "mixnmatch": row["mixnmatch"], "cost": row["cost"]["matvit"],
            "train_seconds": row["train_seconds"]["matvit"], "trained_on": row.get("trained_on", {}).get("matvit"),
            "commit": row.get("matvit_commit", row["commit"]), "measure_seconds": 0.0, "classes": row["classes"]}


def _taken(candidates: list[tuple[Path, dict | None]], measured, what: str) -> tuple[str | None, dict | None]:
    """The first saved step of `candidates` whose `what` part `measured` accepts: (where it was first measured, the
    step), or (None, None)."""
    for path, row in candidates:
        if measured(row):
            return row.get(f"{what}_from") or str(path), row
    return None, None


def measure_seed(opts: BenchOptions, seed: int, log=print) -> dict:
    """One seed's step: train or reuse its MatViT and baselines, then measure both grids, the Mix'n'Match specs
    against the XL index, and the costs. With --reuse, a saved step with these settings (and at least these
    baselines) is reused whole; each part is taken from the saved step, or from the same seed's step in
    `baselines_from` (the baselines) or `matvit_from` (the MatViT), when it trained with these options."""
    settings = step_settings(opts, seed)
    path = Path(opts.out) / "steps" / f"seed-{seed}.json"
    row = _saved(path) if opts.reuse else None

    def same_matvit(r: dict | None) -> bool:
        return r is not None and not option_differences(r["settings"]["matvit"], settings["matvit"])

    if baselines_measured(row, settings) and same_matvit(row):
        log(f"[seed {seed}] measured before: {path}")
        return row
    mine = [(path, row)]
    others = {what: [(Path(other) / "steps" / path.name, _saved(Path(other) / "steps" / path.name))]
              for what, other in (("baselines", opts.baselines_from), ("matvit", opts.matvit_from)) if other}
    origin = provenance.record()
    matvit_from, source = _taken(mine + others.get("matvit", []), same_matvit, "matvit")
    if source is not None:
        mpart = matvit_of(source)
        log(f"[seed {seed}] MatViT measured before (commit {mpart['commit'][:12]})")
    else:
        mpart = measure_matvit(opts, seed, log)
    baselines_from, source = _taken(mine + others.get("baselines", []),
                                    lambda r: baselines_measured(r, settings), "baselines")
    if source is not None:
        part = baselines_of(source)
        log(f"[seed {seed}] baselines {', '.join(part['baselines'])} measured before (commit {part['commit'][:12]})")
    else:
        cfg = get_preset(opts.preset).model
        gallery, queries = mpart.get("data") or (data.load(opts.dataset, split, cfg.img_size, cfg.in_chans,
                                                           opts.data_dir) for split in ("train", "test"))
        part = measure_baselines(opts, seed, gallery, queries, origin["commit"], log)
    row = {"settings": {"matvit": settings["matvit"], "baselines": part["settings"]}, "seed": seed,
           "baselines": part["baselines"], "baseline_seeds": part["baseline_seeds"], **origin,
           "matvit_commit": mpart["commit"] or origin["commit"], "matvit_from": matvit_from,
           "baseline_commit": part["commit"], "baselines_from": baselines_from,
           "matvit": mpart["grid"], "baseline": part["grid"], "mixnmatch": mpart["mixnmatch"],
           "cost": {"matvit": mpart["cost"], "baseline": part["cost"]},
           "train_seconds": {"matvit": mpart["train_seconds"], "baseline": part["train_seconds"]},
           "trained_on": {"matvit": mpart["trained_on"], "baseline": part["trained_on"]},
           "measure_seconds": round(mpart["measure_seconds"] + part.get("measure_seconds", 0.0), 1),
           "classes": mpart["classes"], "family": family_label(opts.preset)}
    row["targets"] = targets(row)
    return steps.write(path, row)


def _mean_grid(grids: list[dict]) -> dict:
    """Each cell present in any grid: every metric's mean over the grids that have it, the 1-NN's sample
    standard deviation (`knn1_std`, 0 for one grid) and the number of seeds (`n`)."""
    out: dict = {}
    for i in dict.fromkeys(i for g in grids for i in g):
        for q in dict.fromkeys(q for g in grids if i in g for q in g[i]):
            cells = [g[i][q] for g in grids if i in g and q in g[i]]
            knn = [c["knn1"] for c in cells]
            out.setdefault(i, {})[q] = {**{k: float(np.mean([c[k] for c in cells])) for k in cells[0]},
                                        "knn1_std": float(np.std(knn, ddof=1)) if len(knn) > 1 else 0.0,
                                        "n": len(knn)}
    return out


def step_passes(row: dict) -> dict:
    """Passes over the data of a step's MatViT and of each of its baselines."""
    settings = row["settings"]
    return {"matvit": passes(settings["matvit"]),
            "baseline": {g: passes(settings["baselines"][g]) for g in row["baselines"]}}


def family_label(preset: str) -> str:
    """How reports name the nested model of `preset` ("MatViT", "MatMamba")."""
    return family_of(get_preset(preset).model).label


def combine(rows: list[dict], family: str = "MatViT") -> dict:
    """The seeds' steps as one result: mean grids (with spreads), mean Mix'n'Match accuracy, the first measured
    costs, mean training seconds, every seed's row under `seeds`, and the targets on the means and per seed."""
    first = rows[0]
    mixnmatch = [{**spec, "knn1": float(np.mean([r["mixnmatch"][k]["knn1"] for r in rows]))}
                 for k, spec in enumerate(first["mixnmatch"])]
    baselines = list(dict.fromkeys(g for r in rows for g in r["baselines"]))
    first_with = {g: next(r for r in rows if g in r["baselines"]) for g in baselines}
    result = {
        "family": family,
        "seeds": [r["seed"] for r in rows],
        "matvit": {"map10_definition": first["matvit"]["map10_definition"],
                   "grid": _mean_grid([r["matvit"]["grid"] for r in rows])},
        "baseline": {"map10_definition": first["baseline"]["map10_definition"],
                     "grid": _mean_grid([r["baseline"]["grid"] for r in rows])},
        "mixnmatch": mixnmatch,
        "cost": {"matvit": first["cost"]["matvit"],
                 "baseline": {g: {k: r["cost"]["baseline"][g][k] for k in ("params", "gflops")}
                              for g, r in first_with.items()}},
        "cost_timed_in": f"seed {first['seed']}, {first['commit'][:7]}",
        "train_seconds": {"matvit": float(np.mean([r["train_seconds"]["matvit"] for r in rows])),
                          "baseline": {g: float(np.mean([r["train_seconds"]["baseline"][g] for r in rows
                                                         if g in r["baselines"]])) for g in baselines}},
        "passes": {"matvit": step_passes(first)["matvit"],
                   "baseline": {g: step_passes(r)["baseline"][g] for g, r in first_with.items()}},
        "measure_seconds": float(np.mean([r["measure_seconds"] for r in rows])),
        "classes": first["classes"],
        "runs": [{**{k: r[k] for k in ("seed", "baseline_seeds", "commit", "command", "matvit", "baseline",
                                       "train_seconds", "targets")},
                  "baseline_commit": r.get("baseline_commit", r["commit"]), "baselines_from": r.get("baselines_from"),
                  "matvit_commit": r.get("matvit_commit", r["commit"]), "matvit_from": r.get("matvit_from"),
                  "trained_on": r.get("trained_on"), "passes": step_passes(r)}
                 for r in rows],
    }
    result["baseline"]["grid"] = {g: result["baseline"]["grid"][g] for g in GRANULARITY_NAMES
                                  if g in result["baseline"]["grid"]}
    result["targets"] = targets(result)
    return result


def run(opts: BenchOptions, log=print) -> dict:
    """Measure every seed (reusing finished steps with --reuse), then write consistency.json, consistency.md and
    the plots from the steps of `opts.seeds`; returns the JSON dict."""
    recipe = train_options(opts, opts.seeds[0], None).recipe  # the MatViT's; checks its options before any work
    out = Path(opts.out)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    origin = provenance.record()  # the code that started the run, not whatever is checked out at its end
    rows = [measure_seed(opts, seed, log) for seed in opts.seeds]
    result = {"dataset": opts.dataset, "preset": opts.preset, "epochs": recipe.epochs,
              "dense_epochs": recipe.dense_epochs or 0, "augment": recipe.augment,
              "mixnmatch_prob": opts.mixnmatch_prob, "weights": opts.weights, **origin,
              **combine(rows, family_label(opts.preset))}
    (out / "consistency.json").write_text(json.dumps(result, indent=2))
    (out / "consistency.md").write_text(markdown(result))
    from .plots import consistency_grids_png, pareto_png

    consistency_grids_png(result, out / "grid.png")
    pareto_png(result, out / "pareto.png")
    return result


# --- command line ------------------------------------------------------------------------------------
def cmd_consistency(args: argparse.Namespace) -> None:
    unknown = [g for g in args.baselines if g not in GRANULARITY_NAMES]
    if unknown or "S" not in args.baselines:
        raise UserError(f"--baselines takes granularities of {', '.join(GRANULARITY_NAMES)}, S among them "
                        f"(got {','.join(args.baselines)})")
    for flag, result in (("--baselines-from", args.baselines_from), ("--matvit-from", args.matvit_from)):
        if result and not (result / "steps").is_dir():
            raise UserError(f"{flag} {result}: no consistency result there (no steps/ folder)")
    result = run(BenchOptions(dataset=args.dataset, preset=args.preset, out=args.out, epochs=args.epochs,
                              augment=args.augment, mixnmatch_prob=args.mixnmatch_prob, weights=args.weights,
                              dense_epochs=args.dense_epochs, baseline_epochs=args.baseline_epochs,
                              reuse=args.reuse, cache=args.cache, seeds=args.seeds, baselines_from=args.baselines_from,
                              matvit_from=args.matvit_from,
                              baselines=[g for g in GRANULARITY_NAMES if g in args.baselines], data_dir=args.data_dir))
    for t in result["targets"]:
        print(f"{'n/a   ' if t['met'] is None else 'met   ' if t['met'] else 'MISSED'} {t['target']}")
    print(f"wrote {args.out / 'consistency.json'}, consistency.md, grid.png, pareto.png")


def add_parser(bench_subparsers) -> None:
    """Register `matvit bench consistency` under the `bench` subcommand's subparsers."""
    q = bench_subparsers.add_parser("consistency", help="MatViT against four independently trained baselines")
    q.add_argument("--dataset", required=True, help="fashion-mnist, folder:PATH or digits")
    q.add_argument("--preset", required=True, choices=list(PRESETS))
    q.add_argument("--epochs", type=int, help="default: the preset's recipe")
    q.add_argument("--augment", choices=AUGMENTATIONS, help="default: the preset's recipe")
    q.add_argument("--mixnmatch-prob", type=float, default=0.0,
                   help="train the MatViT (not the baselines) with a random monotone Mix'n'Match spec in this share "
                        "of the steps, as `matvit train --mixnmatch-prob`")
    q.add_argument("--weights", type=floats,
                   help="the MatViT's per-granularity loss weights, smallest first, as `matvit train --weights` "
                        "(the baselines train one width)")
    q.add_argument("--dense-epochs", type=int,
                   help="the MatViT's dense warm-up, as `matvit train --dense-epochs` (0: none; default: the preset's)")
    q.add_argument("--baseline-epochs", type=int,
                   help="epochs of each baseline (default: as many passes over the data as the MatViT makes, its "
                        "dense warm-up included; results before equal training used the MatViT's joint epochs)")
    q.add_argument("--out", type=Path, default=Path("runs/consistency"))
    q.add_argument("--reuse", action="store_true",
                   help="reuse finished trainings of the same setting in --cache and measured seeds in --out/steps")
    q.add_argument("--cache", type=Path, help="training runs (default runs/consistency/PRESET-DATASET, with "
                                               "-augment-KIND when --augment is given)")
    q.add_argument("--seeds", type=ints, default=[0], help="comma-separated seeds; the report gives mean and spread")
    q.add_argument("--baselines", type=lambda t: [g.strip().upper() for g in t.split(",")],
                   default=list(GRANULARITY_NAMES), help="baselines trained for every seed (S at least)")
    q.add_argument("--baselines-from", type=Path, metavar="RESULT",
                   help="a consistency result directory: take each seed's baseline measurements from its steps when "
                        "they trained with the same options, instead of training the baselines again")
    q.add_argument("--matvit-from", type=Path, metavar="RESULT",
                   help="a consistency result directory: take each seed's MatViT measurements from its steps when it "
                        "trained with the same options, instead of training the MatViT again")
    q.add_argument("--data-dir", type=Path)
    q.set_defaults(func=cmd_consistency)
