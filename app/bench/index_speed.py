"""The index benchmark: build throughput and per-submodel query latency, written to <out>.{json,md}.

    matvit bench index --speed --checkpoint runs/fmnist --dataset fashion-mnist --out docs/results/index-fmnist

In one run it measures: building the index from the in-memory train split, building it from the
test split saved as PNG files (decoded in DataLoader workers), the pure XL forward throughput on
the same machine, and the latency of single-image queries with each named submodel.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from matvit import data, provenance
from matvit.images import to_png
from retrieval import build
from retrieval.encoder import Encoder
from retrieval.retriever import Retriever


def forward_throughput(encoder: Encoder, images, spec: str = "XL", batch_size: int = 256) -> float:
    encoder.encode(images[:batch_size], spec, batch_size)  # warm-up
    start = time.perf_counter()
    encoder.encode(images, spec, batch_size)
    return len(images) / (time.perf_counter() - start)


def query_latency(retriever: Retriever, files: list[Path], spec: str) -> dict:
    retriever.search(files[:3], k=10, submodel=spec)  # warm-up: extraction, caches
    timings = [retriever.search([f], k=10, submodel=spec)[0].timings_ms for f in files]
    return {key: round(float(np.median([t[key] for t in timings])), 3) for key in timings[0]}


def run(checkpoint: Path, dataset: str, index: Path, out: Path, queries: int = 200) -> dict:
    """Build `index` from the train split, time everything, write `out`.json and `out`.md; returns the report."""
    encoder = Encoder.load(checkpoint)
    size, channels = encoder.image_size, encoder.channels
    train = build.DatasetSource(dataset, "train", size, channels)
    test = data.load(dataset, "test", size, channels)
    report = {"dataset": dataset, "checkpoint": str(checkpoint), "fingerprint": encoder.fingerprint, "queries": queries,
              **provenance.record()}

    sample = train.set.images[:10000]
    report["xl_forward"] = {"images": len(sample), "images_per_s": round(forward_throughput(encoder, sample), 1)}
    report["build_in_memory"] = build.build(encoder, train, index)

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, (img, label) in enumerate(zip(test.images, test.labels.tolist(), strict=True)):
            path = Path(tmp) / "gallery" / test.classes[label] / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(to_png(img))
            files.append(path)
        folder = build.FolderSource(Path(tmp) / "gallery", size, channels, workers=2)
        report["build_from_png_files"] = build.build(encoder, folder, Path(tmp) / "index")
        retriever = Retriever(index, encoder=encoder)
        report["query_latency_ms"] = {}
        for spec in encoder.named():
            row = query_latency(retriever, files[:queries], spec.text)
            report["query_latency_ms"][spec.text] = {**row, "gflops": round(encoder.gflops(spec), 5),
                                                      "params": encoder.params(spec)}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    mem, png = r["build_in_memory"], r["build_from_png_files"]
    lines = [
        f"# Index build and query latency: {r['dataset']}",
        "",
        f"Command: `{r['command']}`  ",
        f"Commit: `{r['commit']}`  ",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}",
        "",
        "| what | images | images/s |",
        "|---|---:|---:|",
        f"| pure XL forward (in-memory tensors, batch 256) | {r['xl_forward']['images']} | "
        f"{r['xl_forward']['images_per_s']:,.0f} |",
        f"| build-index, in-memory train split ({mem['index_key']}) | {mem['added']} | {mem['images_per_s']:,.0f} |",
        f"| build-index, PNG files decoded in 2 workers ({png['index_key']}) | {png['added']} | "
        f"{png['images_per_s']:,.0f} |",
        "",
        f"Single-image queries against the {mem['count']}-image XL index (median of {r['queries']}, ms):",
        "",
        "| query submodel | GFLOPs | params | decode | encode | search | total |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for spec, t in r["query_latency_ms"].items():
        lines.append(f"| {spec} | {t['gflops']:.4f} | {t['params']:,} | {t['decode']:.2f} | {t['encode']:.2f} | "
                     f"{t['search']:.2f} | {t['total']:.2f} |")
    return "\n".join(lines) + "\n"
