"""The dimensions benchmark: a model nested on both axes, the query encoder's width and the searched dimensions.

For a Matryoshka-trained model (`--embed-dims`) and for today's model (the same recipe and seed without the prefix
losses), on the XL index of the train split with the test split as queries: 1-NN for every query width (S ... XL) x
searched dimensions (each prefix, and the full embedding), exact on the prefix and through the funnel (the
prefix's shortlist re-ranked by the full vectors); for today's model also its PCA-reduced vectors, the classic
baseline. Every cell has its cost: encode GFLOPs and search MFLOPs per query, and both measured in milliseconds at
batch 1. Each model is one resumable step (`steps/NAME.json`, its training cached under `--cache`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from app.options import ints
from matvit import data, provenance
from matvit.registry import PRESETS
from matvit.train import TrainOptions
from retrieval.budget import measure
from retrieval.encoder import Encoder
from retrieval.prefix import SHORTLIST, Plan, PrefixSearch, prefix

from . import steps
from .consistency import options_json, train_cached, trained_on

MODELS = ("matryoshka", "today")  # trained with and without the prefix losses
METHODS = ("prefix", "funnel", "pca")  # exact search on the prefix, the funnel, PCA-reduced vectors (today's only)
SEARCH_QUERIES = 50  # batch-1 searches timed per cell


@dataclass
class DimsOptions:
    dataset: str
    preset: str
    out: Path
    dims: list[int]  # the Matryoshka prefixes searched (the full length is added)
    epochs: int | None = None  # default: the preset's recipe
    seed: int = 0
    shortlist: int = SHORTLIST
    cache: Path | None = None  # trainings; default runs/dims/<preset>-<dataset>
    data_dir: Path | None = None
    reuse: bool = False
    latency_repeats: int = 15


def train_options(opts: DimsOptions, model: str) -> TrainOptions:
    slug = opts.dataset.replace(":", "-").replace("/", "_").strip("_")
    cache = Path(opts.cache or Path("runs") / "dims" / f"{opts.preset}-{slug}")
    return TrainOptions(preset=opts.preset, dataset=opts.dataset, out=cache / model, data_dir=opts.data_dir,
                        epochs=opts.epochs, embed_dims=opts.dims if model == "matryoshka" else [], seed=opts.seed)


def search_ms(search, queries: np.ndarray) -> float:
    """Median milliseconds of `search(one query)` over the first `SEARCH_QUERIES` queries."""
    times = []
    for row in queries[:SEARCH_QUERIES]:
        start = time.perf_counter()
        search(row[None])
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def nearest(searcher: PrefixSearch, plan: Plan):
    """search(queries) -> the gallery position of each query's nearest, by `plan`."""
    return lambda queries: searcher.search(queries, 1, plan)[1]


def pca_search(gallery: np.ndarray, dims: int):
    """(search(queries) -> nearest positions, MFLOPs of one query's projection): exact search of PCA-reduced,
    re-normalised vectors, the projection fitted on the gallery (FAISS's `PCAMatrix`)."""
    pca = faiss.PCAMatrix(gallery.shape[1], dims)
    pca.train(np.ascontiguousarray(gallery, dtype=np.float32))
    flat = faiss.IndexFlatIP(dims)
    flat.add(prefix(pca.apply(np.ascontiguousarray(gallery, dtype=np.float32)), dims))

    def search(queries: np.ndarray) -> np.ndarray:
        return flat.search(prefix(pca.apply(np.ascontiguousarray(queries, dtype=np.float32)), dims), 1)[1]
    return search, 2 * gallery.shape[1] * dims / 1e6


def measure_model(opts: DimsOptions, model: str, log=print) -> dict:
    """Train or reuse one model and measure its cells."""
    run = train_options(opts, model)
    seconds = train_cached(run, log, opts.reuse)
    start = time.perf_counter()
    encoder = Encoder.load(run.out)
    gallery = data.load(opts.dataset, "train", encoder.image_size, encoder.channels, opts.data_dir)
    queries = data.load(opts.dataset, "test", encoder.image_size, encoder.channels, opts.data_dir)
    index = encoder.encode(gallery.images, "XL", desc=f"{model} gallery XL")
    embedded = {s.text: encoder.encode(queries.images, s, desc=f"{model} queries {s.text}") for s in encoder.named()}
    encode = {text: measure(encoder, text, opts.latency_repeats) for text in embedded}
    searcher, count, full = PrefixSearch(index), len(index), index.shape[1]
    searches = {}  # (method, dims) -> (search(queries) -> positions, MFLOPs per query)
    for dims in sorted({*opts.dims, full}):
        searches["prefix", dims] = (nearest(searcher, Plan(dims)), 2 * count * dims / 1e6)
        if dims < full:
            shortlist = min(opts.shortlist, count)
            searches["funnel", dims] = (nearest(searcher, Plan(dims, shortlist)),
                                        (2 * count * dims + 2 * shortlist * full) / 1e6)
            if model == "today":
                search, projection = pca_search(index, dims)
                searches["pca", dims] = (search, 2 * count * dims / 1e6 + projection)
    rows = []
    for (method, dims), (search, mflops) in searches.items():
        ms = search_ms(search, embedded["XL"])
        for text, emb in embedded.items():
            found = search(emb)[:, 0]
            rows.append({"query": text, "method": method, "dims": dims,
                         "knn1": float(np.mean(np.asarray(gallery.labels)[found] == np.asarray(queries.labels))),
                         "encode_gflops": encode[text]["gflops"], "search_mflops": mflops,
                         "encode_ms_b1": encode[text]["latency_ms_b1"], "search_ms_b1": ms})
    return {"embed_dims": encoder.model.dims, "full": full, "gallery": count,
            "queries": len(queries), "train_seconds": seconds, "trained_on": trained_on(run.out),
            "measure_seconds": time.perf_counter() - start, "rows": rows}


def settings(opts: DimsOptions, model: str) -> dict:
    return {"training": options_json(train_options(opts, model)), "dims": sorted(opts.dims),
            "shortlist": opts.shortlist}


def run(opts: DimsOptions, log=print) -> dict:
    """Measure both models (each step reused when done with the same settings), then write dims.json and dims.md."""
    out = Path(opts.out)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    record = provenance.record()
    result = {"command": record["command"], "commit": record["commit"], "machine": record["machine"],
              "dataset": opts.dataset, "preset": opts.preset, "dims": sorted(opts.dims), "shortlist": opts.shortlist,
              "models": {}}
    for model in MODELS:
        path, given = out / "steps" / f"{model}.json", settings(opts, model)
        row = steps.saved(path, given, log) if opts.reuse else None
        if row is None:
            row = steps.write(path, {"settings": given, "commit": record["commit"], **measure_model(opts, model, log)})
        result["models"][model] = row
    result["targets"] = targets(result)
    (out / "dims.json").write_text(json.dumps(result, indent=2))
    (out / "dims.md").write_text(markdown(result))
    log(f"wrote {out / 'dims.json'} and {out / 'dims.md'}")
    return result


def cell(model: dict, query: str, method: str, dims: int) -> dict | None:
    return next((r for r in model["rows"] if (r["query"], r["method"], r["dims"]) == (query, method, dims)), None)


def targets(result: dict) -> list[dict]:
    """The issue's targets this benchmark measures: nesting the dimensions nearly free at full length, and a small
    query's funnel on the smallest prefix near XL's full search."""
    mat, today = result["models"]["matryoshka"], result["models"]["today"]
    full, smallest = mat["full"], min(result["dims"])
    xl_full = cell(mat, "XL", "prefix", full)["knn1"]
    gap = xl_full - cell(today, "XL", "prefix", full)["knn1"]
    funnel = cell(mat, "S", "funnel", smallest)
    rows = [{"what": "Matryoshka training's XL full-dims 1-NN against today's model", "value": 100 * gap,
             "target": ">= -0.3 pt", "met": gap >= -0.003}]
    if funnel is not None:
        diff = funnel["knn1"] - xl_full
        rows.append({"what": f"S queries through the {smallest}-d funnel against XL queries on full search",
                     "value": 100 * diff, "target": ">= -0.5 pt", "met": diff >= -0.005})
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Searched dimensions x query width: {result['preset']} on {result['dataset']}", "",
             f"Command: `{result['command']}`  ", f"Commit: `{result['commit']}`  ",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores", "",
             "1-NN (%) on the XL index of the train split, test split as queries; `prefix`: exact search on the first "
             f"d dimensions; `funnel`: the d-prefix's {result['shortlist']} nearest re-ranked by the full vectors; "
             "`pca`: today's vectors PCA-reduced to d.", ""]
    for name, model in result["models"].items():
        full = model["full"]
        columns = [(m, d) for m in METHODS for d in sorted({*result["dims"], full}) if cell(model, "XL", m, d)]
        queries = list(dict.fromkeys(r["query"] for r in model["rows"]))
        lines += [f"## {name} (trained dims {', '.join(map(str, model['embed_dims']))}; training "
                  f"{model['train_seconds'] / 60:.1f} min)", "",
                  "| query | " + " | ".join(f"{m} {d}" for m, d in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        lines += [f"| {q} | " + " | ".join(f"{100 * cell(model, q, m, d)['knn1']:.2f}" for m, d in columns) + " |"
                  for q in queries]
        lines += ["", "| search | MFLOPs per query | ms at batch 1 |", "|---|---:|---:|"]
        lines += [f"| {m} {d} | {cell(model, 'XL', m, d)['search_mflops']:.2f} | "
                  f"{cell(model, 'XL', m, d)['search_ms_b1']:.3f} |" for m, d in columns]
        lines += ["", "| query | encode GFLOPs | encode ms at batch 1 |", "|---|---:|---:|"]
        lines += [f"| {q} | {cell(model, q, 'prefix', full)['encode_gflops']:.4f} | "
                  f"{cell(model, q, 'prefix', full)['encode_ms_b1']:.2f} |" for q in queries]
        lines.append("")
    lines += ["## Targets", "", "| what | measured | target | met |", "|---|---:|---|---|"]
    lines += [f"| {t['what']} | {t['value']:+.2f} pt | {t['target']} | {'yes' if t['met'] else 'no'} |"
              for t in result["targets"]]
    return "\n".join(lines) + "\n"


def add_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("dims", help="1-NN and cost of query width x searched dimensions, for a Matryoshka-trained "
                                      "model against today's (prefixes untrained, and PCA)")
    p.add_argument("--dataset", required=True, help="digits, fashion-mnist, folder:PATH, csv:FILE or wds:PATTERN")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--dims", type=ints, required=True, help="the Matryoshka prefixes, e.g. 16,32,64")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, help="default: the preset's recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shortlist", type=int, default=SHORTLIST, help="the funnel's shortlist")
    p.add_argument("--cache", type=Path, help="where the trainings are kept (default runs/dims/<preset>-<dataset>)")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--reuse", action="store_true", help="reuse finished steps and trainings; continue interrupted ones")
    p.set_defaults(func=cmd)


def cmd(args: argparse.Namespace) -> None:
    run(DimsOptions(dataset=args.dataset, preset=args.preset, out=args.out, dims=args.dims, epochs=args.epochs,
                    seed=args.seed, shortlist=args.shortlist, cache=args.cache, data_dir=args.data_dir,
                    reuse=args.reuse))
