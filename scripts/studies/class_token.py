"""Where MatMamba's summary token sits: in a causal scan a token sees only the tokens before it, so the class token
after the last patch (`end`: the reference's, and the presets' default) has seen the whole image, one amid the
patches (`middle`) only the first half, and the mean of all tokens (`mean`) reads every position, each of which saw
a different prefix (a class token first would see no patch at all). Each summary trains the same MatMamba preset
(same data, epochs and seed; a variant preset registered while the study runs, its summary recorded in the run's
config.json), then per granularity: test top-1, 1-NN with the train split as gallery embedded by the same
granularity (the diagonal, both from the run's eval.json) and 1-NN of each granularity's queries against the XL
index of the train split (the product's use: index once with XL). One step file per summary under OUT/steps;
trainings are reused from the cache.

    python -m scripts.studies.class_token --out docs/results/class-token-fmnist

Cost on 2 CPU cores: a `matmamba-small-fmnist` epoch takes about 143 s, so the three summaries at 3 epochs train for
about 22 minutes, plus about a minute and a half of evaluation each (the run's own, then the XL index): about 27
minutes in all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from app.bench import steps
from app.bench.consistency import options_json, train_cached
from matvit import checkpoint, data, metrics, provenance, registry
from matvit.config import Preset
from matvit.errors import UserError
from matvit.mamba import SUMMARIES, MatMamba, MatMambaConfig
from matvit.train import TrainOptions
from retrieval.encoder import Encoder

from . import make_parser
from . import run as run_study

WHAT = {"end": "class token after the last patch (the reference's)",
        "middle": "class token amid the patches: a causal scan shows it the first half only",
        "mean": "mean of all tokens after the final norm (class token at the end)"}


@dataclass
class ClassTokenOptions:
    preset: str = "matmamba-small-fmnist"
    dataset: str = "fashion-mnist"
    out: Path = Path("docs/results/class-token-fmnist")
    summaries: list[str] = field(default_factory=lambda: list(SUMMARIES))
    epochs: int = 3
    seed: int = 0
    cache: Path | None = None  # trainings, one folder per summary; default runs/class-token/PRESET-DATASET
    data_dir: Path | None = None


def variant_name(preset: str, summary: str) -> str:
    return f"{preset}-summary-{summary}"


@contextlib.contextmanager
def variant_presets(preset: str, summaries: list[str]) -> Iterator[dict[str, str]]:
    """`preset` with each summary, registered as `PRESET-summary-S` while the block runs (then removed): the names,
    by summary. A preset that is not a MatMamba is a `UserError`."""
    base = registry.get_preset(preset)
    if not isinstance(base.model, MatMambaConfig):
        mambas = [n for n, p in registry.PRESETS.items() if isinstance(p.model, MatMambaConfig)]
        raise UserError(f"--preset {preset} is not a MatMamba (the summary token is MatMamba's); use one of: "
                        f"{', '.join(mambas)}")
    names = {s: variant_name(preset, s) for s in summaries}
    added = [n for n in names.values() if n not in registry.PRESETS]
    config = base.model.to_dict()
    registry.register(MatMamba, {name: Preset(MatMambaConfig.from_dict({**config, "summary": s}), base.recipe)
                                 for s, name in names.items()})
    try:
        yield names
    finally:
        for name in added:
            registry.PRESETS.pop(name, None)


def train_options(opts: ClassTokenOptions, summary: str) -> TrainOptions:
    """The training of one summary (its variant preset must be registered)."""
    slug = opts.dataset.replace(":", "-").replace("/", "_").strip("_")
    cache = Path(opts.cache or Path("runs") / "class-token" / f"{opts.preset}-{slug}")
    return TrainOptions(preset=variant_name(opts.preset, summary), dataset=opts.dataset, out=cache / summary,
                        data_dir=opts.data_dir, epochs=opts.epochs, seed=opts.seed)


def query_xl_index(run: Path, dataset: str, data_dir: Path | None) -> tuple[dict[str, float], int]:
    """1-NN of the test split embedded by each granularity against the train split embedded by XL, and the number
    of queries."""
    encoder = Encoder.load(run)
    gallery, queries = (data.load(dataset, split, encoder.image_size, encoder.channels, data_dir)
                        for split in ("train", "test"))
    names = list(encoder.model.granularities)
    index = encoder.encode(gallery.images, names[-1], desc="gallery XL")
    return {g: metrics.knn1(index, gallery.labels, encoder.encode(queries.images, g, desc=f"queries {g}"),
                            queries.labels) for g in names}, len(queries.labels)


def measure_summary(opts: ClassTokenOptions, summary: str, log=print) -> dict:
    """Train (or reuse) one summary's model and measure it; the step's row, reused when saved with the same
    training options from the same run (fingerprint and commit)."""
    train_opts = train_options(opts, summary)
    seconds = train_cached(train_opts, log)
    run = Path(train_opts.out)
    config = checkpoint.read_config(run)
    ev = json.loads((run / "eval.json").read_text())
    settings = {"train": options_json(train_opts), "fingerprint": config["fingerprint"],
                "run_commit": ev.get("commit")}
    path = Path(opts.out) / "steps" / f"{summary}.json"
    if (row := steps.saved(path, settings, log)) is not None:
        return row
    start = time.perf_counter()
    xl_index, queries = query_xl_index(run, opts.dataset, opts.data_dir)
    model = config["model"]
    patches = (model["img_size"] // model["patch_size"]) ** 2
    row = {"settings": settings, "summary": summary, "what": WHAT[summary], "run": str(run),
           "recorded_summary": model["summary"], "patches": patches,
           "patches_seen": patches // 2 if summary == "middle" else patches,
           "epochs": train_opts.recipe.epochs, "seed": opts.seed, "train_seconds": seconds,
           "top1": ev["top1"], "knn1": ev["knn1"], "knn1_xl_index": xl_index,
           "queries": queries,
           "measure_seconds": round(time.perf_counter() - start, 1), **provenance.record()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return steps.write(path, row)


def finding(rows: dict[str, dict], default: str = "end") -> str:
    """The plain finding: the best summary on the XL index at the largest and the smallest granularity, by how many
    points over the next (and over the `default` summary when it is not the best), and what `middle`'s token
    sees."""
    names = list(next(iter(rows.values()))["knn1_xl_index"])
    xl = names[-1]
    at = lambda s, g: 100 * rows[s]["knn1_xl_index"][g]  # noqa: E731
    parts = []
    for g in (xl, names[0]):
        ranked = sorted(rows, key=lambda s: at(s, g), reverse=True)
        text = f"at {g} `{ranked[0]}` ({at(ranked[0], g):.2f})"
        if len(ranked) > 1:
            text += f", {at(ranked[0], g) - at(ranked[1], g):.2f} points over `{ranked[1]}`"
        if default in rows and default not in ranked[:2]:
            text += f" and {at(ranked[0], g) - at(default, g):.2f} over the default `{default}`"
        parts.append(text)
    line = f"Best 1-NN on the {xl} index: {'; '.join(parts)}."
    if "middle" in rows:
        m = rows["middle"]
        line += (f" `middle` sets the class token amid the patches, where a causal scan shows it only the first "
                 f"{m['patches_seen']} of {m['patches']} patches: "
                 f"{max(at(s, xl) for s in rows) - at('middle', xl):.2f} points under the best at {xl}.")
    return line


def run(opts: ClassTokenOptions, log=print) -> dict:
    """Measure every summary (reusing trainings and steps), then write class-token.json, .md and .png to `out`."""
    out = Path(opts.out)
    with variant_presets(opts.preset, opts.summaries):
        default = registry.get_preset(opts.preset).model.summary
        out.mkdir(parents=True, exist_ok=True)
        rows = {s: measure_summary(opts, s, log) for s in opts.summaries}
    report = {"preset": opts.preset, "dataset": opts.dataset, "epochs": opts.epochs, "seed": opts.seed,
              "default": default, **provenance.record(), "summaries": rows, "finding": finding(rows, default)}
    (out / "class-token.json").write_text(json.dumps(report, indent=2))
    (out / "class-token.md").write_text(markdown(report))
    bars_png(report, out / "class-token.png")
    return report


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("s" if n != 1 else "")


def markdown(r: dict) -> str:
    rows = r["summaries"]
    first = next(iter(rows.values()))
    names = list(first["knn1_xl_index"])
    xl = names[-1]
    m = r["machine"]
    lines = [f"# Where MatMamba's summary token sits: {r['dataset']}, {r['preset']}, {_epochs(r['epochs'])}, "
             f"seed {r['seed']}", "",
             f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}` (each run's own: `run_commit` in the JSON)  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}", "",
             "In a causal scan a token sees only the tokens before it. Each summary trained the same preset with the "
             "same data, epochs and seed. Percent, test split as queries: top-1 of the classifier; 1-NN with the "
             f"train split as gallery embedded by the same granularity (diagonal) and by {xl} (the {xl} index, "
             "the product's use).", "",
             "| summary | what the embedding reads | training (min) |", "|---|---|---:|"]
    lines += [f"| `{s}`{' (default)' if s == r['default'] else ''} | {row['what']} | {row['train_seconds'] / 60:.1f} |"
              for s, row in rows.items()]
    lines += ["", f"| summary | granularity | top-1 | 1-NN diagonal | 1-NN on the {xl} index |",
              "|---|---|---:|---:|---:|"]
    for s, row in rows.items():
        for g in names:
            lines.append(f"| `{s}` | {g} | {100 * row['top1'][g]:.2f} | {100 * row['knn1'][g]:.2f} | "
                         f"{100 * row['knn1_xl_index'][g]:.2f} |")
    n = first["queries"]
    acc = float(np.mean([row["knn1_xl_index"][xl] for row in rows.values()]))
    lines += ["", f"One seed per summary: on {n:,} queries a cell's binomial standard error is about "
              f"{100 * np.sqrt(acc * (1 - acc) / n):.2f} points."]
    lines += ["", f"**Finding**: {r['finding']}", "", "![1-NN on the XL index](class-token.png)"]
    return "\n".join(lines) + "\n"


def bars_png(r: dict, path: Path) -> None:
    """Grouped bars: 1-NN on the XL index per granularity, one bar per summary."""
    rows = r["summaries"]
    names = list(next(iter(rows.values()))["knn1_xl_index"])
    x = np.arange(len(names))
    width = 0.8 / len(rows)
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    values = []
    for i, (s, row) in enumerate(rows.items()):
        v = [100 * row["knn1_xl_index"][g] for g in names]
        values += v
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, v, width=width, label=s)
    low, high = min(values), max(values)
    ax.set_ylim(max(0.0, low - max(1.0, 0.5 * (high - low))), min(100.0, high + max(0.5, 0.2 * (high - low))))
    ax.set_xticks(x, names)
    ax.set_xlabel("query granularity")
    ax.set_ylabel(f"1-NN on the {names[-1]} index (%)")
    ax.set_title(f"{r['dataset']}, {r['preset']}, {_epochs(r['epochs'])}: where the summary token sits", fontsize=10)
    ax.legend(title="summary", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120)


def _summaries(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if unknown := [n for n in names if n not in SUMMARIES]:
        raise argparse.ArgumentTypeError(f"unknown summary {', '.join(unknown)}; known: {', '.join(SUMMARIES)}")
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct summaries of: {', '.join(SUMMARIES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    q = make_parser("scripts.studies.class_token", "Where MatMamba's summary token sits (end, middle, mean): top-1 "
                                                   "and 1-NN per granularity, on its own and on the XL index.")
    q.add_argument("--preset", default="matmamba-small-fmnist", help="a MatMamba preset")
    q.add_argument("--dataset", default="fashion-mnist")
    q.add_argument("--data-dir", type=Path)
    q.add_argument("--summaries", type=_summaries, default=list(SUMMARIES), help=f"of: {', '.join(SUMMARIES)}")
    q.add_argument("--epochs", type=int, default=3, help="epochs of every summary (the preset's recipe otherwise)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--cache", type=Path, help="training runs, one per summary (default "
                                              "runs/class-token/PRESET-DATASET)")
    q.add_argument("--out", type=Path, default=Path("docs/results/class-token-fmnist"))
    return q


def _cli(args: argparse.Namespace) -> None:
    if args.epochs < 1:
        raise UserError("--epochs must be 1 or more")
    r = run(ClassTokenOptions(preset=args.preset, dataset=args.dataset, out=args.out, summaries=args.summaries,
                              epochs=args.epochs, seed=args.seed, cache=args.cache, data_dir=args.data_dir))
    print(r["finding"])
    print(f"wrote {args.out / 'class-token.json'}, class-token.md, class-token.png")


def main(argv: list[str] | None = None) -> int:
    return run_study(build_parser(), _cli, argv)


if __name__ == "__main__":
    sys.exit(main())
