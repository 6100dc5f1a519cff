"""Inducing a MatViT from a dense ViT against training one from scratch: 1-NN grids, and what each costs.

The steps, each a cached, resumable run under the cache directory that writes its own result file
(`OUT/steps/NAME.json`) as it finishes, so an interrupted benchmark continues where it stopped:

1. `dense`: the plain ViT a user already has, here an independently trained baseline of the XL FFN width;
2. per importance score (`taylor`, `weight`, `none`): its reordering of the dense model as it is (`IMP-0`, the raw
   slices) and after E epochs of joint fine-tuning (`IMP-E`, `matvit induce`);
3. `scratch-E`: a MatViT trained from scratch for the same E epochs;
4. `full`: the preset's full recipe, when the consistency benchmark's training of it is in its cache.

For each: the index x query 1-NN grid over the trained granularities, its diagonal, the cost in epochs and training
seconds, and the consistency benchmark's targets 1-3 against its committed baselines (`docs/results/consistency-*`).

    python -m scripts.studies.induce --dataset fashion-mnist --preset matvit-small-fmnist \\
        --out docs/results/induce-fmnist
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from app.bench import steps
from matvit import checkpoint, data, provenance
from matvit import spec as specs
from matvit.induce import InduceOptions, induce, prepare, prepared
from matvit.model import MatViT
from matvit.registry import PRESETS, get_preset
from matvit.train import Trainer, TrainOptions, finished_run
from retrieval.encoder import Encoder
from retrieval.grid import grid_from_embeddings

from . import make_parser
from . import run as run_study


@dataclass
class InduceBenchOptions:
    dataset: str
    preset: str
    out: Path
    epochs: int = 2  # joint training epochs of every induced and from-scratch MatViT
    dense_epochs: int = 5
    importances: tuple[str, ...] = ("taylor", "weight", "none")
    scratch: bool = True  # also train a MatViT from scratch for the same joint epochs
    cache: Path | None = None  # trainings; default runs/induce/PRESET-DATASET
    seed: int = 0
    data_dir: Path | None = None
    reference: Path | None = None  # a consistency.json of the same preset and dataset; default: found in docs
    full_run: Path | None = None  # the preset's full-recipe MatViT; default: the consistency benchmark's cache
    log: Callable[[str], None] = field(default=print, repr=False)


def _slug(dataset: str) -> str:
    return dataset.replace(":", "-").replace("/", "_").strip("_")


def find_reference(dataset: str, preset: str, root: Path = Path("docs/results")) -> Path | None:
    """The committed consistency result of this preset and dataset, if any: one of the preset's own recipe (its
    epochs, warm-up and augmentation, no Mix'n'Match sampling) first, then the one with the most seeds."""
    recipe = get_preset(preset).recipe

    def rank(r: dict) -> tuple[bool, int]:
        own = (r.get("epochs"), r.get("dense_epochs") or None, r.get("augment"), r.get("mixnmatch_prob") or 0.0) == (
            recipe.epochs, recipe.dense_epochs or None, recipe.augment, 0.0)
        return own, len(r.get("seeds") or [0])

    found = {path: json.loads(path.read_text()) for path in sorted(root.glob("*/consistency.json"))}
    mine = [path for path, r in found.items() if r.get("dataset") == dataset and r.get("preset") == preset]
    return max(mine, key=lambda path: rank(found[path]), default=None)


class Bench:
    def __init__(self, opts: InduceBenchOptions) -> None:
        self.opts, self.log = opts, opts.log
        self.out = Path(opts.out)
        self.cache = Path(opts.cache or Path("runs") / "induce" / f"{opts.preset}-{_slug(opts.dataset)}")
        (self.out / "steps").mkdir(parents=True, exist_ok=True)
        self.origin = provenance.record()
        cfg = get_preset(opts.preset).model
        self.gallery = data.load(opts.dataset, "train", cfg.img_size, cfg.in_chans, opts.data_dir)
        self.queries = data.load(opts.dataset, "test", cfg.img_size, cfg.in_chans, opts.data_dir)
        self.reference_path = opts.reference or find_reference(opts.dataset, opts.preset)
        self.reference = json.loads(self.reference_path.read_text()) if self.reference_path else None

    # --- one step ----------------------------------------------------------------------------------------
    def step(self, name: str, settings: dict, make) -> dict:
        """The step's result file when it was written with these settings, else `make()`'s result, written."""
        path = self.out / "steps" / f"{name}.json"
        if (row := steps.saved(path, settings, self.log)) is not None:
            return row
        self.log(f"[{name}] running")
        start = time.perf_counter()
        result = {"name": name, "settings": settings, **make()}
        result["step_seconds"] = round(time.perf_counter() - start, 1)
        result.update(self.origin)  # the command and code of the process that ran this step
        steps.write(path, result)
        self.log(f"[{name}] diagonal 1-NN " + ", ".join(f"{g} {v:.4f}" for g, v in result["diagonal"].items())
                 + f"; wrote {path}")
        self.report()
        return result

    def grid(self, model: MatViT) -> dict:
        encoder = Encoder(model)
        named = specs.named(model.config)
        g = {s.text: encoder.encode(self.gallery.images, s, desc=f"gallery {s.text}") for s in named}
        q = {s.text: encoder.encode(self.queries.images, s, desc=f"queries {s.text}") for s in named}
        xl = named[-1].text
        cells = grid_from_embeddings(g, q, self.gallery.labels, self.queries.labels, (xl, xl))
        return {"grid": cells["grid"], "map10_definition": cells["map10_definition"],
                "diagonal": {s.text: cells["grid"][s.text][s.text]["knn1"] for s in named}}

    def _train(self, opts: TrainOptions) -> tuple[MatViT, dict]:
        if finished_run(opts.out, opts):
            self.log(f"reusing the finished training in {opts.out}")
        else:
            Trainer(opts).run(resume=True, log=self.log)
        model, _ = checkpoint.load(opts.out)
        return model, json.loads((Path(opts.out) / "eval.json").read_text())

    # --- the steps ---------------------------------------------------------------------------------------
    def dense(self) -> dict:
        opts = TrainOptions(preset=self.opts.preset, dataset=self.opts.dataset, out=self.cache / "dense",
                            data_dir=self.opts.data_dir, epochs=self.opts.dense_epochs, baseline="XL",
                            seed=self.opts.seed)

        def make() -> dict:
            model, ev = self._train(opts)
            return {"method": "dense", "run": str(opts.out), "top1": ev["top1"], **self.grid(model),
                    "epochs": {"dense": opts.recipe.epochs, "joint": 0},
                    "seconds": {"dense": ev["train_seconds"], "reorder": 0.0, "joint": 0.0}}
        return self.step("dense", {"epochs": opts.recipe.epochs, "seed": self.opts.seed}, make)

    def induced(self, importance: str, epochs: int, dense: dict) -> dict:
        opts = InduceOptions(source=str(Path(dense["run"]) / "model.safetensors"), preset=self.opts.preset,
                             dataset=self.opts.dataset, out=self.cache / f"{importance}-{epochs}",
                             data_dir=self.opts.data_dir, importance=importance, epochs=epochs, seed=self.opts.seed)

        def make() -> dict:
            if epochs == 0:  # the raw slices: measured straight from the reordered model
                model, summary = prepare(opts, log=self.log)
                top1, joint = None, 0.0
            else:
                if prepared(opts) and finished_run(opts.out, opts.train_options()):
                    self.log(f"reusing the finished training in {opts.out}")
                else:
                    induce(opts, workers=2, resume=True, log=self.log)
                summary = json.loads((Path(opts.out) / "induce.json").read_text())
                model, _ = checkpoint.load(opts.out)
                ev = json.loads((Path(opts.out) / "eval.json").read_text())
                top1, joint = ev["top1"], ev["train_seconds"]
            return {"method": "induced", "importance": importance, "run": str(opts.out), "top1": top1,
                    "shares": summary["mean_after"], "uniform_shares": summary["uniform_shares"],
                    **self.grid(model), "epochs": {"dense": dense["epochs"]["dense"], "joint": epochs},
                    "seconds": {"dense": dense["seconds"]["dense"], "reorder": summary["seconds"], "joint": joint}}
        settings = {"importance": importance, "epochs": epochs, "dense_epochs": dense["epochs"]["dense"],
                    "seed": self.opts.seed}
        return self.step(f"{importance}-{epochs}", settings, make)

    def scratch(self, epochs: int) -> dict:
        opts = TrainOptions(preset=self.opts.preset, dataset=self.opts.dataset, out=self.cache / f"scratch-{epochs}",
                            data_dir=self.opts.data_dir, epochs=epochs, dense_epochs=0, seed=self.opts.seed)

        def make() -> dict:
            model, ev = self._train(opts)
            return {"method": "scratch", "run": str(opts.out), "top1": ev["top1"], **self.grid(model),
                    "epochs": {"dense": 0, "joint": epochs},
                    "seconds": {"dense": 0.0, "reorder": 0.0, "joint": ev["train_seconds"]}}
        return self.step(f"scratch-{epochs}", {"epochs": epochs, "seed": self.opts.seed}, make)

    def full(self) -> dict | None:
        """The preset's full recipe, from the consistency benchmark's cache when it trained it with this seed."""
        run = self.opts.full_run or (Path("runs") / "consistency" / f"{self.opts.preset}-{_slug(self.opts.dataset)}"
                                     / f"seed-{self.opts.seed}" / "matvit")
        opts = TrainOptions(preset=self.opts.preset, dataset=self.opts.dataset, out=run,
                            data_dir=self.opts.data_dir, seed=self.opts.seed)
        if not finished_run(run, opts):
            self.log(f"[full] no finished full-recipe training in {run}: not run")
            return None

        def make() -> dict:
            model, _ = checkpoint.load(run)
            ev = json.loads((run / "eval.json").read_text())  # its train_seconds count the dense warm-up too
            warm_up = ev.get("dense_warmup", {"epochs": 0, "train_seconds": 0.0})
            return {"method": "full", "run": str(run), "top1": ev["top1"], **self.grid(model),
                    "epochs": {"dense": warm_up["epochs"], "joint": opts.recipe.epochs},
                    "seconds": {"dense": warm_up["train_seconds"], "reorder": 0.0,
                                "joint": ev["train_seconds"] - warm_up["train_seconds"]}}
        return self.step("full", {"epochs": opts.recipe.epochs, "dense_epochs": opts.recipe.dense_epochs,
                                  "seed": self.opts.seed}, make)

    def run(self) -> dict:
        dense = self.dense()
        for importance in self.opts.importances:
            self.induced(importance, 0, dense)
        first, *rest = self.opts.importances
        self.induced(first, self.opts.epochs, dense)
        if self.opts.scratch:
            self.scratch(self.opts.epochs)
        for importance in rest:
            self.induced(importance, self.opts.epochs, dense)
        self.full()
        return self.report()

    # --- the report --------------------------------------------------------------------------------------
    def report(self) -> dict:
        """Gather every finished step into induce.json, induce.md and induce.png (also after each step)."""
        steps = {p.stem: json.loads(p.read_text()) for p in sorted((self.out / "steps").glob("*.json"))}
        order = ["dense", *(f"{i}-0" for i in self.opts.importances),
                 *(f"{i}-{self.opts.epochs}" for i in self.opts.importances), f"scratch-{self.opts.epochs}", "full"]
        steps = {k: steps[k] for k in order if k in steps}
        for s in steps.values():
            s["targets"] = targets(s["grid"], self.reference)
        result = {"dataset": self.opts.dataset, "preset": self.opts.preset, "epochs": self.opts.epochs,
                  "dense_epochs": self.opts.dense_epochs, "seed": self.opts.seed, **self.origin,
                  "reference": str(self.reference_path) if self.reference_path else None,
                  "reference_grids": _reference_grids(self.reference), "steps": steps}
        (self.out / "induce.json").write_text(json.dumps(result, indent=2))
        (self.out / "induce.md").write_text(markdown(result))
        plot(result, self.out / "induce.png")
        return result


def _reference_grids(ref: dict | None) -> dict | None:
    if ref is None:
        return None
    knn = lambda g: {i: {q: c["knn1"] for q, c in row.items()} for i, row in g["grid"].items()}  # noqa: E731
    return {"epochs": ref["epochs"], "dense_epochs": ref.get("dense_epochs", 0), "matvit": knn(ref["matvit"]),
            "baseline": knn(ref["baseline"]), "train_seconds": ref["train_seconds"], "command": ref["command"],
            "commit": ref["commit"]}


def targets(grid: dict, reference: dict | None) -> list[dict]:
    """The consistency benchmark's targets 1-3 (`app.bench.consistency.targets`) for one grid; 1 and 2 against the
    reference's independently trained baselines. Targets 4 and 5 concern the baselines and Mix'n'Match: not here."""
    names = list(grid)
    if len(names) < 2:
        return []
    out = []
    if reference is not None:
        b = reference["baseline"]["grid"]
        gaps = {g: grid[g][g]["knn1"] - b[g][g]["knn1"] for g in names}
        out.append({"target": "1. each diagonal cell within 1.0 point of the baseline of its width",
                    "met": all(v >= -0.01 for v in gaps.values()), "minus_baseline": gaps})
        out.append({"target": "2. index XL / query S >= baseline S on itself",
                    "met": grid["XL"]["S"]["knn1"] >= b["S"]["S"]["knn1"],
                    "xl_s": grid["XL"]["S"]["knn1"], "baseline_s_s": b["S"]["S"]["knn1"]})
    off = {f"{i}/{q}": grid[i][q]["knn1"] - grid[q][q]["knn1"] for i in names for q in names if i != q}
    out.append({"target": "3. every off-diagonal cell within 2 points of its query submodel's diagonal",
                "met": all(v >= -0.02 for v in off.values()), "worst": min(off.values())})
    return out


LABELS = {"dense": "dense ViT (XL only)", "full": "MatViT, full recipe", "scratch": "MatViT from scratch"}


def label(step: dict) -> str:
    if step["method"] == "induced":
        joint = step["epochs"]["joint"]
        return f"induced, {step['importance']}, " + (f"{joint} epoch{'s' * (joint > 1)}" if joint else "raw slices")
    if step["method"] == "scratch":
        joint = step["epochs"]["joint"]
        return f"MatViT from scratch, {joint} epoch{'s' * (joint > 1)}"
    return LABELS[step["method"]]


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def markdown(r: dict) -> str:
    steps, ref = r["steps"], r["reference_grids"]
    names = ["S", "M", "L", "XL"]
    with_scratch = any(s["method"] == "scratch" for s in steps.values())
    scratch = "; a MatViT from scratch gets the same joint epochs" * with_scratch
    lines = [f"# Inducing a MatViT from a dense ViT: {r['dataset']}, {r['preset']}", "",
             f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}`  ",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']} "
             f"({r['machine']['torch_threads']} thread{'s' * (r['machine']['torch_threads'] > 1)})", "",
             f"The dense model is a plain ViT of the XL FFN width trained for {r['dense_epochs']} epochs. Each "
             f"importance score reorders its FFN neurons (raw slices: no training after it), then `matvit induce` "
             f"trains all granularities jointly for {r['epochs']} epoch(s) from there{scratch}. 1-NN accuracy (%) "
             "with the training split as gallery and the test split as queries. Epochs and seconds are training "
             "only (seconds: dense + reorder + joint; the time of "
             "each model's own evaluation is not included). They were measured on shared cores and vary with "
             "the load of other jobs; each step's wall time, evaluation included, is `step_seconds` in its file.", "",
             "| model | epochs (dense + joint) | training s (after the dense model / total) | S | M | L | XL "
             "| index XL, query S | worst off-diagonal "
             "| targets met |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in steps.values():
        d, g = s["diagonal"], s["grid"]
        secs, after = sum(s["seconds"].values()), s["seconds"]["reorder"] + s["seconds"]["joint"]
        worst = next((t["worst"] for t in s["targets"] if t["target"].startswith("3.")), None)
        met = ", ".join(t["target"][0] + (" yes" if t["met"] else " no") for t in s["targets"]) or "n/a"
        xl_s = g["XL"]["S"]["knn1"] if "S" in g.get("XL", {}) else None
        lines.append(f"| {label(s)} | {s['epochs']['dense']} + {s['epochs']['joint']} | "
                     + (f"{after:.0f} / {secs:.0f} | " if s["method"] == "induced" else f"{secs:.0f} | ")
                     + " | ".join(_pct(d.get(n)) for n in names)
                     + f" | {_pct(xl_s)} | {'' if worst is None else f'{100 * worst:+.2f}'} | {met} |")
    if ref is not None:
        m, b = ref["matvit"], ref["baseline"]
        lines.append(f"| MatViT, full recipe, quoted from `{r['reference']}` (not re-run) | "
                     f"{ref.get('dense_epochs', 0)} + {ref['epochs']} | "
                     f"{ref['train_seconds']['matvit']:.0f} | " + " | ".join(_pct(m[n][n]) for n in names)
                     + f" | {_pct(m['XL']['S'])} | | |")
        lines.append(f"| independent baselines, one per width, quoted from the same file | {ref['epochs']} each | "
                     f"{sum(ref['train_seconds']['baseline'].values()):.0f} | "
                     + " | ".join(_pct(b[n][n]) for n in names) + f" | {_pct(b['XL']['S'])} | | |")
    if "full" not in steps:
        lines += ["", "The preset's full recipe was not trained here (no finished run in the consistency benchmark's "
                  "cache)" + ("; its committed result is quoted above." if ref is not None else ".")]
    lines += ["", "## Reading", "", *findings(r)]
    lines += ["", "Targets (from the consistency benchmark; 1 and 2 against its committed 10-epoch baselines): "
              "1. every diagonal cell within 1.0 point of the baseline of its width; 2. index XL / query S at "
              "least the baseline S on itself; 3. every off-diagonal cell within 2 points of its query's diagonal.",
              "", "## Grids", "", "1-NN accuracy (%); rows: the granularity that built the index, columns: the "
              "query's."]
    for s in steps.values():
        g = s["grid"]
        cols = list(next(iter(g.values())))
        lines += ["", f"**{label(s)}**{_shares(s)}", "",
                  "| index \\ query | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for i, row in g.items():
            lines.append(f"| {i} | " + " | ".join(_pct(row[c]["knn1"]) for c in cols) + " |")
        for t in s["targets"]:
            detail = ", ".join(f"{k}: {_fmt(v)}" for k, v in t.items() if k not in ("target", "met"))
            lines.append(f"\n- {'met' if t['met'] else '**missed**'}: {t['target']} ({detail})")
    lines += ["", "![diagonal 1-NN per granularity](induce.png)"]
    return "\n".join(lines) + "\n"


def findings(r: dict) -> list[str]:
    """What the finished steps say, in sentences built from their numbers."""
    steps, e = r["steps"], r["epochs"]
    out = []
    pts = lambda v: f"{100 * v:.2f}"  # noqa: E731
    raw = {k: s for k, s in steps.items() if s["method"] == "induced" and s["epochs"]["joint"] == 0}
    tuned = {k: s for k, s in steps.items() if s["method"] == "induced" and s["epochs"]["joint"] > 0}
    scratch = steps.get(f"scratch-{e}")
    if "dense" in steps and raw:
        out.append(f"- Raw slices of the dense ViT (XL {pts(steps['dense']['diagonal']['XL'])}): S on its own index "
                   + ", ".join(f"{s['importance']} {pts(s['diagonal']['S'])}" for s in raw.values())
                   + "; M " + ", ".join(f"{s['importance']} {pts(s['diagonal']['M'])}" for s in raw.values()) + ".")
    dense_xl = steps["dense"]["diagonal"]["XL"] if "dense" in steps else None
    for s in tuned.values():
        missed = [t for t in s["targets"] if not t["met"]]
        against_dense = ""
        if dense_xl is not None:
            lowest = min(s["diagonal"].values())
            against_dense = (f" (lowest {100 * (lowest - dense_xl):+.2f} points against the dense ViT's XL "
                             f"{pts(dense_xl)})")
        out.append(f"- {label(s)}: diagonal " + ", ".join(f"{g} {pts(v)}" for g, v in s["diagonal"].items())
                   + f"{against_dense}; index XL / query S {pts(s['grid']['XL']['S']['knn1'])}; "
                   + (f"targets {', '.join(t['target'][0] for t in s['targets'] if t['met'])} met"
                      if len(missed) < len(s["targets"]) else "no target met")
                   + (f", {', '.join(t['target'][0] for t in missed)} missed" if missed else "") + ".")
    if scratch is not None:
        out.append(f"- {label(scratch)}: diagonal " + ", ".join(f"{g} {pts(v)}" for g, v in scratch["diagonal"].items())
                   + f"; index XL / query S {pts(scratch['grid']['XL']['S']['knn1'])}.")
    return out


def _shares(step: dict) -> str:
    if not step.get("shares"):
        return ""
    text = lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items())  # noqa: E731
    return (f" (mean share of the FFN importance in the first neurons: {text(step['shares'])}; "
            f"uniform: {text(step['uniform_shares'])})")


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


COLORS = {"taylor": "tab:blue", "weight": "tab:orange", "none": "tab:green", "scratch": "tab:red",
          "dense": "black", "full": "tab:purple"}


def plot(r: dict, path: Path) -> None:
    """Left: each model's diagonal (index and query by the same granularity); right: queries of each granularity
    against the XL index. One colour per importance score, raw slices dashed, trained models solid, the reference
    baselines as grey squares."""
    names = ["S", "M", "L", "XL"]
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    for s in r["steps"].values():
        g = s["grid"]
        xs = [n for n in names if n in g]
        at = [names.index(n) for n in xs]
        style = "--" if s["method"] == "induced" and s["epochs"]["joint"] == 0 else "-"
        marker = "o" if len(xs) > 1 else "D"
        color = COLORS.get(s.get("importance") or s["method"])
        left.plot(at, [g[n][n]["knn1"] for n in xs], style, marker=marker, color=color, label=label(s))
        right.plot(at, [g["XL"][n]["knn1"] for n in xs], style, marker=marker, color=color)
    if r["reference_grids"] is not None:
        b = r["reference_grids"]["baseline"]
        for ax in (left, right):
            ax.plot(range(len(names)), [b[n][n] for n in names], "s", color="tab:gray", ms=8,
                    label=f"independent baselines ({r['reference_grids']['epochs']} epochs, own index)")
    left.set_title("diagonal: index and queries by the same granularity")
    right.set_title("one XL index, queries by each granularity")
    for ax in (left, right):
        ax.set_xticks(range(len(names)), names)
        ax.set_xlabel("granularity")
        ax.grid(alpha=0.3)
    left.set_ylabel("1-NN accuracy")
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    fig.savefig(path, dpi=120)


# --- command line ------------------------------------------------------------------------------------
def _cli(args: argparse.Namespace) -> None:
    opts = InduceBenchOptions(dataset=args.dataset, preset=args.preset, out=args.out, epochs=args.epochs,
                              dense_epochs=args.dense_epochs, importances=tuple(args.importances.split(",")),
                              scratch=args.scratch, cache=args.cache, seed=args.seed, data_dir=args.data_dir,
                              reference=args.reference)
    result = Bench(opts).run()
    print(f"wrote {args.out / 'induce.json'}, induce.md, induce.png ({len(result['steps'])} steps)")


def build_parser() -> argparse.ArgumentParser:
    q = make_parser("scripts.studies.induce", "MatViTs induced from a dense ViT against one trained from scratch.")
    q.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, folder:PATH or digits")
    q.add_argument("--preset", default="matvit-small-fmnist", choices=list(PRESETS))
    q.add_argument("--epochs", type=int, default=2, help="joint epochs of the induced and from-scratch MatViTs")
    q.add_argument("--dense-epochs", type=int, default=5, help="training epochs of the dense XL-width ViT")
    q.add_argument("--importances", default="taylor,weight,none", help="importance scores to compare")
    q.add_argument("--no-scratch", dest="scratch", action="store_false",
                   help="skip the MatViT trained from scratch for the same joint epochs")
    q.add_argument("--out", type=Path, default=Path("docs/results/induce-fmnist"))
    q.add_argument("--cache", type=Path, help="training runs (default runs/induce/PRESET-DATASET)")
    q.add_argument("--reference", type=Path,
                   help="consistency.json whose baselines decide the targets (default: the committed one of the "
                        "same preset and dataset under docs/results)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--data-dir", type=Path)
    return q


def main(argv: list[str] | None = None) -> int:
    return run_study(build_parser(), _cli, argv)


if __name__ == "__main__":
    sys.exit(main())
