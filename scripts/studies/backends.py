"""The query-encoder backends side by side: latency, agreement with eager, and what `auto` chooses.

    python -m scripts.studies.backends --out docs/results/backends \\
        --checkpoint runs/induce/matvit-small-fmnist-fashion-mnist/taylor-2 --preset matvit-s16

For each model (a trained checkpoint, and a preset with seeded random weights) and each submodel: every
backend's median latency at batch 1 and 32, its worst probe cosine against eager (the check `auto`
applies) and its cosine on real images, and `auto`'s choice. For the trained Fashion-MNIST checkpoint,
the 1-NN accuracy of test queries against an XL-embedded train gallery, eager against int8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from matvit import checkpoint, data, metrics, provenance
from matvit.images import to_input
from matvit.model import MatViT
from matvit.registry import get_preset
from retrieval import backends
from retrieval.encoder import Encoder

from . import make_parser
from . import run as run_study

_patience = {"deadline": None}


def wait_for_quiet_cpu(limit: float = 2.5, patience_s: int = 900) -> float:
    """The 1-minute load average, after waiting for it to drop to `limit` (at most `patience_s` over the
    whole run: then it is only recorded)."""
    if _patience["deadline"] is None:
        _patience["deadline"] = time.monotonic() + patience_s
    while True:
        load = os.getloadavg()[0]
        if load <= limit or time.monotonic() >= _patience["deadline"]:
            return round(load, 2)
        print(f"load {load:.2f} > {limit}: waiting", flush=True)
        time.sleep(60)


def knn1(gallery: np.ndarray, labels: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> float:
    _, ids = metrics.search(gallery, queries, 1)
    return float(np.mean(labels[ids[:, 0]] == truth))


def bench_model(name: str, model: MatViT, submodels: list[str], cache: Path, images: torch.Tensor | None,
                repeats: int, names: tuple[str, ...] = backends.AUTO) -> dict:
    """Every backend on every submodel of `model`; `images`: real uint8 images for the cosine on data."""
    fingerprint = checkpoint.fingerprint(model)
    c = model.config
    probe = backends.probe(model)
    one = torch.zeros(1, c.in_chans, c.img_size, c.img_size)
    rows = []
    for text in submodels:
        spec = model.spec(text)
        encoder = Encoder(model, backend="eager")
        embedder = encoder.embedder(spec)
        reference = backends.eager(embedder)(probe)
        real = to_input(images) if images is not None else None
        real_reference = backends.eager(embedder)(real) if real is not None else None
        for backend in names:
            load = wait_for_quiet_cpu()
            start = time.perf_counter()
            runner = backends.build(backend, model, fingerprint, spec, embedder, torch.device("cpu"), cache)
            runner(probe), runner(probe[:1])
            build_s = time.perf_counter() - start
            single = torch.cat([runner(probe[i:i + 1]) for i in range(len(probe))])  # the batch-1 query path
            row = {"model": name, "submodel": spec.text, "backend": backend, "build_s": round(build_s, 2),
                   "probe_cosine": round(min(backends.min_cosine(runner(probe), reference),
                                             backends.min_cosine(single, reference)), 6),
                   "latency_ms_b1": round(backends.median_latency_ms(runner, one, repeats=repeats), 3),
                   "latency_ms_b32": round(backends.median_latency_ms(runner, one.expand(32, -1, -1, -1),
                                                                      warmup=1, repeats=max(3, repeats // 3)), 3),
                   "load_1min": load}
            row["passes"] = row["probe_cosine"] >= backends.MIN_COSINE
            if real is not None:
                embedded = runner(real) if backend != "compile" else torch.cat([runner(x[None]) for x in real])
                cos = torch.nn.functional.cosine_similarity(embedded.float(), real_reference, dim=1)
                row["data_cosine_min"] = round(float(cos.min()), 6)
                row["data_cosine_mean"] = round(float(cos.mean()), 6)
            print(json.dumps(row), flush=True)
            rows.append(row)
    auto = Encoder(model, backend="auto", backend_cache=cache)
    choices = {}
    for text in submodels:
        wait_for_quiet_cpu()
        trials = auto.select(text, repeats)
        choices[model.spec(text).text] = {"backend": auto.serving(text), "trials": [t.to_dict() for t in trials]}
        print(text, json.dumps(choices[model.spec(text).text]), flush=True)
    return {"model": name, "fingerprint": fingerprint, "img_size": c.img_size, "rows": rows, "auto": choices}


def int8_knn(model: MatViT, cache: Path, data_dir: Path | None, gallery_n: int, query_n: int) -> dict:
    """1-NN accuracy of Fashion-MNIST test queries (S and XL) against an XL-eager train gallery, eager
    against int8 (and onnx) query encoders."""
    c = model.config
    train = data.load("fashion-mnist", "train", c.img_size, c.in_chans, data_dir)
    test = data.load("fashion-mnist", "test", c.img_size, c.in_chans, data_dir)
    gallery_images, gallery_labels = train.images[:gallery_n], np.asarray(train.labels[:gallery_n])
    query_images, query_labels = test.images[:query_n], np.asarray(test.labels[:query_n])
    fingerprint = checkpoint.fingerprint(model)
    eager_encoder = Encoder(model)
    gallery = eager_encoder.encode(gallery_images, "XL")
    out = {"gallery": f"fashion-mnist train[:{gallery_n}], XL, eager", "queries": f"fashion-mnist test[:{query_n}]"}
    for text in ("S", "XL"):
        spec = model.spec(text)
        embedder = eager_encoder.embedder(spec)
        result = {}
        for backend in ("eager", "onnx", "onnx-int8"):
            runner = backends.build(backend, model, fingerprint, spec, embedder, torch.device("cpu"), cache)
            queries = metrics.run_batched(runner, query_images, 256)
            result[backend] = round(knn1(gallery, gallery_labels, queries, query_labels), 4)
        result["int8_change"] = round(result["onnx-int8"] - result["eager"], 4)
        out[text] = result
        print(text, json.dumps(result), flush=True)
    return out


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# Query-encoder backends", "",
             f"Command: `{result['command']}`  ", f"Commit: `{result['commit']}`  ",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']} with {result['machine']['torch_threads']} threads, onnxruntime "
             f"{result['onnxruntime']}  ",
             f"A backend serves only when its worst probe row has cosine >= {backends.MIN_COSINE} against eager; "
             "`auto` takes the fastest at batch 1 of those. Latencies are medians on a shared CPU (the 1-minute "
             "load when each row was timed is recorded); compare rows within a model, not across runs. `compile` "
             "compiles the batch-1 query path only (other batch sizes run eager, so its batch-32 column is eager's); "
             "its cosines are of the compiled batch-1 path. Data cosine: 512 Fashion-MNIST test images.", ""]
    for model in result["models"]:
        lines += [f"## {model['model']} ({model['img_size']}x{model['img_size']})", "",
                  "| submodel | backend | ms @1 | ms @32 | x eager @1 | x eager @32 | probe cosine | data cosine "
                  "(min / mean) | passes | load |",
                  "|---|---|---:|---:|---:|---:|---:|---:|:-:|---:|"]
        eager = {(r["submodel"]): r for r in model["rows"] if r["backend"] == "eager"}
        for r in model["rows"]:
            e = eager.get(r["submodel"], r)
            data_cos = (f"{r['data_cosine_min']:.5f} / {r['data_cosine_mean']:.5f}" if "data_cosine_min" in r
                        else "-")
            lines.append(f"| {r['submodel']} | {r['backend']} | {r['latency_ms_b1']:.2f} | {r['latency_ms_b32']:.1f} "
                         f"| {e['latency_ms_b1'] / r['latency_ms_b1']:.2f} "
                         f"| {e['latency_ms_b32'] / r['latency_ms_b32']:.2f} | {r['probe_cosine']:.5f} | {data_cos} "
                         f"| {'yes' if r['passes'] else 'no'} | {r['load_1min']:.2f} |")
        lines += ["", "`auto` (measured again, batch 1):", ""]
        for text, choice in model["auto"].items():
            trials = ", ".join(f"{t['backend']} {t['latency_ms_b1']:.2f} ms" if t.get("passed")
                               else f"{t['backend']} refused (cosine {t.get('cosine', float('nan')):.5f})"
                               for t in choice["trials"])
            lines.append(f"- {text}: **{choice['backend']}** ({trials})")
        lines.append("")
    if result.get("int8_knn"):
        k = result["int8_knn"]
        lines += ["## int8 and retrieval quality (Fashion-MNIST)", "",
                  f"Gallery {k['gallery']}; queries {k['queries']}; 1-NN accuracy by query encoder:", "",
                  "| submodel | eager | onnx | onnx-int8 | int8 change |", "|---|---:|---:|---:|---:|"]
        for text in ("S", "XL"):
            r = k[text]
            lines.append(f"| {text} | {r['eager']:.4f} | {r['onnx']:.4f} | {r['onnx-int8']:.4f} | "
                         f"{r['int8_change']:+.4f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    q = make_parser("scripts.studies.backends", "Eager, ONNX Runtime and int8 side by side per submodel: latency, "
                                                "agreement with eager, what `auto` chooses.")
    q.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    q.add_argument("--checkpoint", type=Path, help="a trained Fashion-MNIST checkpoint directory")
    q.add_argument("--preset", default="matvit-s16", help="a preset timed with seeded random weights")
    q.add_argument("--submodels", default="S;XL")
    q.add_argument("--repeats", type=int, default=15)
    q.add_argument("--gallery", type=int, default=5000)
    q.add_argument("--queries", type=int, default=2000)
    q.add_argument("--data-dir", type=Path)
    q.add_argument("--backends", default=",".join(backends.AUTO),
                   help="timed side by side in this process (compile slows every later eager op: see "
                        "retrieval/backends.py)")
    q.add_argument("--patience", type=int, default=1200, help="seconds to wait in all for a 1-minute load "
                                                              "under 2.5 before timing anyway")
    return q


def run(args: argparse.Namespace) -> None:
    names = tuple(args.backends.split(","))
    _patience["deadline"] = time.monotonic() + args.patience
    import onnxruntime

    cache = Path(tempfile.mkdtemp(prefix="matvit-backends-"))
    submodels = args.submodels.split(";")
    result = {**provenance.record(),
              "onnxruntime": onnxruntime.__version__, "uptime_at_start": subprocess.run(
                  ["uptime"], capture_output=True, text=True).stdout.strip(), "models": []}
    out_json, out_md = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    out_json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_json.write_text(json.dumps(result, indent=2))
        write_markdown(result, out_md)

    if args.checkpoint:
        trained, _ = checkpoint.load(args.checkpoint)
        trained.eval()
        c = trained.config
        test = data.load("fashion-mnist", "test", c.img_size, c.in_chans, args.data_dir)
        result["int8_knn"] = int8_knn(trained, cache, args.data_dir, args.gallery, args.queries)
        save()
        result["models"].append(bench_model(f"trained {args.checkpoint.name} ({args.checkpoint.parent.name})",
                                            trained, submodels, cache, test.images[:512], args.repeats, names))
        save()
    if args.preset:
        torch.manual_seed(0)
        model = MatViT(get_preset(args.preset).model).eval()
        result["models"].append(bench_model(f"{args.preset}, random weights (seed 0)", model, submodels, cache, None,
                                            args.repeats, names))
        save()


def main(argv: list[str] | None = None) -> int:
    return run_study(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
