"""The index at real scale: exact, HNSW, IVF-PQ, IVF-SQ8 and `auto` over 100k and 1M real embeddings.

    matvit bench index --out docs/results/index-scale/ [--checkpoint runs/fmnist]

The gallery is a MatViT's XL embeddings of the training split grown to the largest size by seeded
augmentation: copy 0 is the training images as they are, every further copy the whole split again,
each image randomly cropped (zoomed in up to 15% at a random offset), flipped (half of them),
rotated (up to 10 degrees either way) and given Gaussian pixel noise (sigma 6 of 255). A gallery of
size n is the first n vectors, its labels those of the source images. Queries are the test split,
embedded with S and with XL (the same XL index serves both). Embeddings are cached under the cache
directory (npy, keyed by the checkpoint's fingerprint), so a rerun never embeds again.

For each gallery size and index kind (`KINDS`), one step builds the index the way `build-index`
does (`retrieval.faiss_store.make_faiss`: IDMap2, trained on `TRAIN_SAMPLE` vectors), tunes `efSearch` /
`nprobe` (and for PQ / SQ codes and prefix indexes `rerank`, exact re-ranking from the memory-mapped gallery) with
`retrieval.tuning.tune` to the recall target, and measures: build and tuning time, bytes per vector
(serialized index / n), queries per second at batch 1 and batch 64, recall@1 and recall@10 of the S
and XL test queries against exact search over the same vectors, 1-NN label accuracy, and recall
against speed at every efSearch / nprobe of the tuning grid (and every rerank at the tuned nprobe). Each step writes
`OUT/steps/SIZE-KIND.json` when it ends and is skipped on a rerun with the same settings, so an
interrupted run continues where it stopped. `auto` is the kind `retrieval.store_common.auto_index_key`
picks at that size; when another kind of the run has the same factory string, its row is that
kind's measurement. For a Matryoshka-trained checkpoint, `prefixD-flat`, `prefixD-hnsw`, `prefixD-hnswsq8` and
`prefixD-ivfsq8` are prefix indexes (`PrefixD,...`: the index over the D-prefixes, its candidates re-ranked by
the full vectors).
Milvus Lite gets a row per size, with the index the Milvus store's `auto` picks.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from app import options
from matvit import data, provenance
from matvit.errors import UserError
from retrieval import tuning
from retrieval.encoder import Encoder
from retrieval.faiss_store import TRAIN_SAMPLE, make_faiss, training_size
from retrieval.store_common import FLAT_MAX, HNSW_MAX, auto_index_key

from . import steps
from .index_measure import (
    AUGMENTATION,
    BATCH,
    HNSW_EF_CONSTRUCTION,
    MILVUS_BATCH_QUERIES,
    MILVUS_LATENCY_QUERIES,
    TIMING_BUDGET,
    TIMING_REPEATS,
    Embeddings,
    K,
    faiss_search,
    measure,
    sweep,
)
from .index_report import findings, markdown, plot, stores_status, targets


def _ivf_lists(n: int) -> int:
    """The IVF list count `auto_index_key` uses at size n: 4 sqrt(n)."""
    return 4 * int(math.sqrt(n))


def _ivfpq_key(n: int, dim: int) -> str:
    """The memory-lean IVF-PQ: dim/4 bytes per code."""
    return f"IVF{_ivf_lists(n)},PQ{max(1, dim // 4)}"


KINDS: dict[str, Callable[[int, int], str]] = {
    "flat": lambda n, dim: "Flat",
    "hnsw": lambda n, dim: "HNSW32",
    "ivfpq": _ivfpq_key,
    "ivfsq8": lambda n, dim: f"IVF{_ivf_lists(n)},SQ8",  # what `auto` picks past HNSW_MAX
    "auto": auto_index_key,
}
# Prefix indexes of a Matryoshka model (`retrieval.prefix`): `prefixD-BASE` is BASE over the D-prefixes, its
# candidates re-ranked by the full vectors; `prefixD-flat` is the funnel over an exact prefix search.
PREFIX_BASES: dict[str, Callable[[int, int], str]] = {
    "flat": lambda n, dims: "Flat",
    "hnsw": lambda n, dims: "HNSW16",  # 16 links a node: HNSW32's alone take 256 bytes per vector
    "hnswsq8": lambda n, dims: "HNSW16_SQ8",  # the graph over 8-bit codes: a longer prefix in the same bytes
    "ivfsq8": lambda n, dims: f"IVF{_ivf_lists(n)},SQ8",
}
PREFIX_KIND = re.compile(rf"prefix(\d+)-({'|'.join(PREFIX_BASES)})")
PREFIX_KINDS = ", ".join(f"prefixD-{base}" for base in PREFIX_BASES)
STORES = ("faiss", "milvus")  # the FAISS index directory and Milvus Lite


def index_key(kind: str, n: int, dim: int) -> str:
    """The factory string of index kind `kind` (`KINDS`, or `PREFIX_KIND`) at gallery size n."""
    if kind in KINDS:
        return KINDS[kind](n, dim)
    dims, base = PREFIX_KIND.fullmatch(kind).groups()
    return f"Prefix{dims},{PREFIX_BASES[base](n, int(dims))}"


class IndexBenchError(UserError):
    """A bad benchmark option."""


@dataclass
class ScaleOptions:
    out: Path
    checkpoint: Path = Path("runs/fmnist")
    dataset: str = "fashion-mnist"
    data_dir: Path | None = None
    sizes: tuple[int, ...] = (100_000, 1_000_000)
    kinds: tuple[str, ...] = ("flat", "hnsw", "ivfpq", "ivfsq8", "auto")
    stores: tuple[str, ...] = STORES
    cache: Path = Path("runs/index-scale")
    recall_target: float = tuning.RECALL_TARGET
    latency_queries: int = 200  # single-query searches timed per query encoder
    batch_queries: int = 1024  # queries searched in batches of 64 per query encoder
    seed: int = 0
    log: Callable[[str], None] = field(default=print, repr=False)

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS and not PREFIX_KIND.fullmatch(k)]
        if unknown:
            raise IndexBenchError(f"unknown index kind {unknown[0]!r}; choose from {', '.join(KINDS)} or "
                                  + PREFIX_KINDS)
        unknown = [s for s in self.stores if s not in STORES]
        if unknown:
            raise IndexBenchError(f"unknown store {unknown[0]!r}; choose from {', '.join(STORES)}")
        if not self.sizes or min(self.sizes) < 2 * K:
            raise IndexBenchError(f"gallery sizes must be at least {2 * K}")
        if "faiss" in self.stores and "flat" not in self.kinds:
            raise IndexBenchError("--kinds needs flat: exact search is what the others are compared with")
        self.sizes = tuple(sorted(set(self.sizes)))
# --- the gallery ---------------------------------------------------------------------------------------
def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image, seeded: crop (zoom 1-1.15 at a random offset), flip (half), rotate (+-10 degrees), pixel noise
    (sigma 6); uint8 N x C x H x W in and out."""
    n = len(images)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-10, 10) * math.pi / 180
    scale = 1 / uniform(1.0, 1.15)  # the share of the image the crop keeps, per side
    tx, ty = uniform(-1, 1) * (1 - scale), uniform(-1, 1) * (1 - scale)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out + 6 * torch.randn(out.shape, generator=generator)
    return out.round().clamp(0, 255).to(torch.uint8)

def embeddings(opts: ScaleOptions, encoder: Encoder) -> Embeddings:
    """The gallery and queries of `opts`, from the cache when there, else embedded (resumable per copy)."""
    n = max(opts.sizes)
    slug = opts.dataset.replace(":", "-").replace("/", "_").strip("_")
    cache = Path(opts.cache) / f"{slug}-{encoder.fingerprint[:12]}-seed{opts.seed}"
    cached = sorted(m for m in (int(p.stem.split("-")[1]) for p in cache.glob("gallery-*.json")) if m >= n)
    if cached:  # a gallery at least this large: its prefix is this one
        opts.log(f"embeddings from {cache}")
        return _load_embeddings(cache, cached[0], json.loads((cache / f"gallery-{cached[0]}.json").read_text()))
    meta_path = cache / f"gallery-{n}.json"
    train = data.load(opts.dataset, "train", encoder.image_size, encoder.channels, opts.data_dir)
    test = data.load(opts.dataset, "test", encoder.image_size, encoder.channels, opts.data_dir)
    copies = math.ceil(n / len(train))
    (cache / "copies").mkdir(parents=True, exist_ok=True)
    seconds = 0.0
    for c in range(copies):
        path = cache / "copies" / f"copy-{c:04d}.npy"
        if path.is_file():
            continue
        images = train.images if c == 0 else augment(train.images, torch.Generator().manual_seed(opts.seed * 7919 + c))
        start = time.perf_counter()
        vectors = encoder.encode(images, "XL", 512, desc=f"gallery copy {c + 1}/{copies}")
        seconds += time.perf_counter() - start
        np.save(cache / "copies" / f".{path.name}", vectors)
        (cache / "copies" / f".{path.name}").rename(path)
        rate = len(images) / (time.perf_counter() - start)
        opts.log(f"embedded gallery copy {c + 1}/{copies} ({rate:,.0f} images/s)")
    gallery = np.lib.format.open_memmap(cache / f".gallery-{n}.npy", "w+", np.float32, (n, encoder.dim))
    for c in range(copies):
        lo = c * len(train)
        gallery[lo:min(n, lo + len(train))] = np.load(cache / "copies" / f"copy-{c:04d}.npy")[:n - lo]
    gallery.flush()
    del gallery
    (cache / f".gallery-{n}.npy").rename(cache / f"gallery-{n}.npy")
    np.save(cache / f"labels-{n}.npy", np.resize(train.labels.numpy(), n))
    for spec in ("S", "XL"):
        np.save(cache / f"queries-{spec}.npy", encoder.encode(test.images, spec, 512))
    np.save(cache / "query-labels.npy", test.labels.numpy())
    meta = {"dataset": opts.dataset, "checkpoint": str(opts.checkpoint), "fingerprint": encoder.fingerprint,
            "train_images": len(train), "test_images": len(test), "copies": copies, "seed": opts.seed,
            "augmentation": AUGMENTATION, "cache": str(cache),
            "embed_seconds": round(seconds, 1) if seconds else None}
    meta_path.write_text(json.dumps(meta, indent=2))
    for path in (cache / "copies").glob("copy-*.npy"):
        path.unlink()
    return _load_embeddings(cache, n, meta)


def _load_embeddings(cache: Path, n: int, meta: dict) -> Embeddings:
    return Embeddings(np.load(cache / f"gallery-{n}.npy", mmap_mode="r"), np.load(cache / f"labels-{n}.npy"),
                      {s: np.load(cache / f"queries-{s}.npy") for s in ("S", "XL")},
                      np.load(cache / "query-labels.npy"), meta)

def build_index(key: str, vectors: np.ndarray) -> tuple[faiss.Index, dict]:
    """The index `build-index` makes for `key` over `vectors` (ids 0..n-1), and how long training and adding took."""
    dim = vectors.shape[1]
    start = time.perf_counter()
    index = make_faiss(key, dim, vectors)
    trained = time.perf_counter()
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexPreTransform):  # a prefix index
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    done = time.perf_counter()
    return index, {"train_seconds": round(trained - start, 2), "add_seconds": round(done - trained, 2),
                   "build_seconds": round(done - start, 2), "train_vectors": training_size(len(vectors), key, dim)}


# --- the benchmark -------------------------------------------------------------------------------------
class Bench:
    def __init__(self, opts: ScaleOptions) -> None:
        self.opts, self.log = opts, opts.log
        self.out = Path(opts.out)
        (self.out / "steps").mkdir(parents=True, exist_ok=True)
        self.encoder = Encoder.load(opts.checkpoint)
        self.emb = embeddings(opts, self.encoder)
        self.dim = self.emb.gallery.shape[1]

    def settings(self, n: int, kind: str, key: str) -> dict:
        lossy = key.startswith("Prefix") or (key.startswith("IVF") and not key.endswith(",Flat"))  # re-ranked
        return {"size": n, "kind": kind, "index_key": key, "fingerprint": self.encoder.fingerprint,
                "dataset": self.opts.dataset, "seed": self.opts.seed, "recall_target": self.opts.recall_target,
                "queries": len(self.emb.query_labels), "latency_queries": self.opts.latency_queries,
                "batch_queries": self.opts.batch_queries, "timing": [TIMING_REPEATS, TIMING_BUDGET],
                **({"rerank": list(tuning.RERANK)} if lossy else {})}

    def truth(self, n: int) -> dict[str, np.ndarray]:
        """Exact top-10 gallery positions of every query over the first n vectors (cached beside the gallery)."""
        path = Path(self.emb.meta["cache"]) / f"truth-{n}.npz"
        if path.is_file():
            saved = np.load(path)
            return {spec: saved[spec] for spec in self.emb.queries}
        found = {spec: tuning.exact_search(self.emb.gallery[:n], q, K)[1] for spec, q in self.emb.queries.items()}
        np.savez(path, **found)
        return found

    def step(self, n: int, kind: str) -> dict:
        key = index_key(kind, n, self.dim)
        settings = self.settings(n, kind, key)
        path = self.out / "steps" / f"{n}-{kind}.json"
        if (row := steps.saved(path, settings, self.log)) is not None:
            return row
        twin = next((k for k in self.opts.kinds if k not in (kind, "auto") and index_key(k, n, self.dim) == key),
                    None)
        if kind == "auto" and twin is not None:
            row = {**self.step(n, twin), "settings": settings, "same_as": twin}
        else:
            self.log(f"[{n}-{kind}] building {key} over {n:,} vectors")
            row = {"settings": settings, **self.measure_faiss(n, key)}
        row.update({"kind": kind, "size": n, "index_key": key, **provenance.record()})
        steps.write(path, row)
        self.log(f"[{n}-{kind}] {key}: " + ", ".join(
            f"{s} recall@10 {r['at_10']:.4f} qps@1 {r['qps_batch_1']:,.0f}" for s, r in row["queries"].items())
            + f"; wrote {path}")
        return row

    def measure_faiss(self, n: int, key: str) -> dict:
        start = time.perf_counter()
        vectors = np.ascontiguousarray(self.emb.gallery[:n])
        truth = self.truth(n)
        index, timing = build_index(key, vectors)
        tune_start = time.perf_counter()
        search_params, probe = ({}, {"exact": True}) if key == "Flat" else tuning.tune(
            index, np.arange(n), vectors, np.zeros(0, np.int64), self.opts.recall_target)
        timing["tune_seconds"] = round(time.perf_counter() - tune_start, 2)
        size = len(faiss.serialize_index(index))
        stored = tuning.Stored(np.arange(n), self.emb.gallery[:n])  # memory-mapped, as build-index stores them
        row = {"store": "faiss", **timing, "search_params": search_params, "tuning_recall": probe,
               "index_bytes": size, "bytes_per_vector": round(size / n, 2),
               "queries": measure(faiss_search(index, search_params, stored), self.emb, truth,
                                  self.opts.latency_queries, self.opts.batch_queries),
               "sweep": sweep(index, self.emb, truth["XL"], stored, search_params),
               "hnsw_ef_construction": HNSW_EF_CONSTRUCTION if "HNSW" in key else None,
               "faiss_threads": {"batch_1": 1, f"batch_{BATCH}": faiss.omp_get_max_threads()},
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
        row["step_seconds"] = round(time.perf_counter() - start, 1)
        return row

    def milvus_timing(self) -> dict:
        """Queries timed against Milvus Lite, whose every search is a gRPC call taking tenths of a second."""
        return {"latency_queries": min(self.opts.latency_queries, MILVUS_LATENCY_QUERIES),
                "batch_queries": min(self.opts.batch_queries, MILVUS_BATCH_QUERIES)}

    def milvus_step(self, n: int) -> dict:
        """Milvus Lite with the `auto` index the Milvus store picks, built and tuned by the store itself."""
        settings = {**self.settings(n, "auto", "auto"), "store": "milvus", **self.milvus_timing(), "reloaded": True}
        path = self.out / "steps" / f"{n}-milvus-auto.json"
        if (row := steps.saved(path, settings, self.log)) is not None:
            return row
        self.log(f"[{n}-milvus-auto] filling a Milvus Lite collection with {n:,} vectors")
        row = {"settings": settings, **self.measure_milvus(n), "kind": "auto", "size": n, **provenance.record()}
        steps.write(path, row)
        self.log(f"[{n}-milvus-auto] {row['index_key']}: " + ", ".join(
            f"{s} recall@10 {r['at_10']:.4f} qps@1 {r['qps_batch_1']:,.0f}" for s, r in row["queries"].items())
            + f"; wrote {path}")
        return row

    def measure_milvus(self, n: int) -> dict:
        from retrieval.milvus_store import MilvusStore

        start = time.perf_counter()
        vectors = np.ascontiguousarray(self.emb.gallery[:n])
        truth = self.truth(n)
        classes = self.encoder.classes or [str(c) for c in range(int(self.emb.labels.max()) + 1)]
        added = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        img = self.encoder.image_size
        rows = [(i, f"{self.opts.dataset}:gallery:{i}", None, 0, int(label), img, img, added)
                for i, label in enumerate(self.emb.labels[:n].tolist())]
        manifest = {"fingerprint": self.encoder.fingerprint, "submodel": "XL", "dim": self.dim,
                    "metric": "inner_product", "source": "index-scale benchmark", "classes": classes,
                    "roots": [{"kind": "dataset", "path": self.opts.dataset}], "next_id": n}
        directory = Path(self.emb.meta["cache"]) / "milvus" / str(n)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        store = MilvusStore.from_spec(str(directory / "bench.db"))
        with store.writing():
            report = store.commit(None, np.arange(n), vectors, rows, manifest, "auto", self.opts.recall_target)
        built = time.perf_counter()
        gallery = store.open()
        client = store.client()  # searched as a server that starts on it: the collection loaded afresh
        client.release_collection(gallery.collection)
        client.load_collection(gallery.collection)
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        row = {"store": "milvus", "index_key": report["index_key"],
               "milvus_index": gallery.manifest.get("milvus_index"), "build_seconds": round(built - start, 2),
               "search_params": report["search_params"],
               "tuning_recall": report["recall"], "index_bytes": size, "bytes_per_vector": round(size / n, 2),
               "bytes_note": "the Milvus Lite file and its directory on disk (vectors, metadata, index)",
               "build_note": "inserting the rows, building the index and the store's own tuning; searched after "
                             "releasing and loading the collection again, as a server starting on it would",
               "queries": measure(lambda q: gallery.search(q, K)[1], self.emb, truth, **self.milvus_timing()),
               "sweep": [],
               "versions": {p: _version(p) for p in ("pymilvus", "milvus-lite")}}
        row["step_seconds"] = round(time.perf_counter() - start, 1)
        return row

    def run(self) -> dict:
        for n in self.opts.sizes:
            if "faiss" in self.opts.stores:
                for kind in self.opts.kinds:
                    self.step(n, kind)
                    self.report()
        if "milvus" in self.opts.stores:
            for n in self.opts.sizes:
                self.milvus_step(n)
                self.report()
        return self.report(plot_to=self.out / "index-scale.png")

    def report(self, plot_to: Path | None = None) -> dict:
        rows = []
        for n in self.opts.sizes:
            names = [kind for kind in self.opts.kinds if "faiss" in self.opts.stores]
            names += ["milvus-auto"] if "milvus" in self.opts.stores else []
            for name in names:
                path = self.out / "steps" / f"{n}-{name}.json"
                if path.is_file():
                    rows.append(json.loads(path.read_text()))
        result = {"dataset": self.opts.dataset, "checkpoint": str(self.opts.checkpoint),
                  "fingerprint": self.encoder.fingerprint, "gallery": self.emb.meta, "k": K, "batch": BATCH,
                  "recall_target": self.opts.recall_target, "recall_method": "against exact inner-product search "
                  "over the same vectors, on every test query (S and XL embeddings)",
                  "auto_rule": {"flat_max": FLAT_MAX, "hnsw_max": HNSW_MAX, "train_sample": TRAIN_SAMPLE},
                  "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.opts).items()
                              if k != "log"},
                  "stores": stores_status(self.opts.stores, rows), "rows": rows, **provenance.record()}
        result["targets"] = targets(result)
        result["findings"] = findings(result)
        (self.out / "index-scale.json").write_text(json.dumps(result, indent=2))
        (self.out / "index-scale.md").write_text(markdown(result))
        if rows and plot_to is not None:
            plot(result, plot_to)
        return result


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(opts: ScaleOptions) -> dict:
    return Bench(opts).run()


# --- command line ------------------------------------------------------------------------------------
def cmd_index(args: argparse.Namespace) -> None:
    if args.speed:
        from .index_speed import markdown as speed_markdown
        from .index_speed import run as run_speed

        print(speed_markdown(run_speed(args.checkpoint, args.dataset, args.index, args.out, args.queries)))
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
        return
    result = run(ScaleOptions(
        out=args.out, checkpoint=args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
        sizes=tuple(args.sizes), kinds=tuple(args.kinds.split(",")), stores=tuple(args.stores.split(",")),
        cache=args.cache, recall_target=args.recall_target, latency_queries=args.latency_queries,
        batch_queries=args.batch_queries, seed=args.seed))
    for t in result["targets"]:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}")
    print(f"wrote {args.out / 'index-scale.json'}, index-scale.md, index-scale.png ({len(result['rows'])} rows)")


def add_parser(bench_subparsers) -> None:
    """Register `matvit bench index` (the scale benchmark, or with --speed `index_speed`) under the `bench`
    subcommand's subparsers."""
    q = bench_subparsers.add_parser("index", help="Flat, HNSW, IVF-PQ, IVF-SQ8 and auto over 100k and 1M real "
                                                  "embeddings: recall, QPS, memory (--speed: build throughput and "
                                                  "per-submodel query latency)")
    q.add_argument("--out", type=Path, required=True,
                   help="results directory (with --speed: a path without suffix; .json and .md are written)")
    q.add_argument("--checkpoint", type=Path, default=Path("runs/fmnist"), help="the MatViT that embeds")
    q.add_argument("--dataset", default="fashion-mnist", help="its train split grows the gallery, test the queries")
    q.add_argument("--data-dir", type=Path)
    q.add_argument("--sizes", type=options.ints, default=[100_000, 1_000_000], help="gallery sizes")
    q.add_argument("--kinds", default="flat,hnsw,ivfpq,ivfsq8,auto",
                   help="index kinds: flat, hnsw, ivfpq, ivfsq8, auto, and a Matryoshka model's prefix indexes "
                        f"{PREFIX_KINDS} (prefixD-flat: the funnel)")
    q.add_argument("--stores", default="faiss,milvus", help="stores measured: faiss, milvus")
    q.add_argument("--cache", type=Path, default=Path("runs/index-scale"), help="cached embeddings")
    options.recall_target(q)
    q.add_argument("--latency-queries", type=int, default=200, help="batch-1 searches timed per query encoder")
    q.add_argument("--batch-queries", type=int, default=1024, help="queries searched in batches of 64")
    q.add_argument("--seed", type=int, default=0, help="seed of the gallery's augmentations")
    q.add_argument("--speed", action="store_true",
                   help="instead: build throughput and per-submodel query latency of one index of the train split")
    q.add_argument("--index", type=Path, default=Path("runs/bench-index"),
                   help="--speed: where the train split is indexed")
    q.add_argument("--queries", type=int, default=200, help="--speed: single-image queries timed per submodel")
    q.set_defaults(func=cmd_index)
