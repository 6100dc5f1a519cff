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
does (`retrieval.index.make_faiss`: IDMap2, trained on `TRAIN_SAMPLE` vectors), tunes `efSearch` /
`nprobe` (and for PQ / SQ codes `rerank`, exact re-ranking from the memory-mapped gallery) with
`retrieval.tuning.tune` to the recall target, and measures: build and tuning time, bytes per vector
(serialized index / n), queries per second at batch 1 and batch 64, recall@1 and recall@10 of the S
and XL test queries against exact search over the same vectors, 1-NN label accuracy, and recall
against speed at every efSearch / nprobe of the tuning grid (and every rerank at the tuned nprobe). Each step writes
`OUT/steps/SIZE-KIND.json` when it ends and is skipped on a rerun with the same settings, so an
interrupted run continues where it stopped. `auto` is the kind `retrieval.index.auto_index_key`
picks at that size; when another kind of the run has the same factory string, its row is that
kind's measurement. Milvus Lite gets a row per size, with the index the Milvus store's `auto` picks.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from matvit import data, provenance
from matvit.errors import UserError
from retrieval import tuning
from retrieval.encoder import Encoder
from retrieval.index import FLAT_MAX, HNSW_MAX, TRAIN_SAMPLE, auto_index_key, make_faiss, training_size

from . import steps

K = 10  # neighbours per query: recall@10
BATCH = 64  # the batched-search size
SWEEP_QUERIES = 1000  # XL queries of the recall-against-speed sweep
SWEEP_LATENCY_QUERIES = 100  # batch-1 searches timed per sweep point
HNSW_EF_CONSTRUCTION = 40  # FAISS's default, what `build-index` builds with
TIMING_REPEATS = 3  # QPS is the best of this many passes over the same queries ...
TIMING_BUDGET = 20.0  # ... or of fewer, once the passes have taken this many seconds
MILVUS_LATENCY_QUERIES, MILVUS_BATCH_QUERIES = 20, 256  # fewer timed queries for Milvus Lite


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
STORES = ("faiss", "milvus")  # the FAISS index directory and Milvus Lite


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
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise IndexBenchError(f"unknown index kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
        unknown = [s for s in self.stores if s not in STORES]
        if unknown:
            raise IndexBenchError(f"unknown store {unknown[0]!r}; choose from {', '.join(STORES)}")
        if not self.sizes or min(self.sizes) < 2 * K:
            raise IndexBenchError(f"gallery sizes must be at least {2 * K}")
        if "faiss" in self.stores and "flat" not in self.kinds:
            raise IndexBenchError("--kinds needs flat: exact search is what the others are compared with")
        self.sizes = tuple(sorted(set(self.sizes)))


# --- the gallery ---------------------------------------------------------------------------------------
AUGMENTATION = ("each image cropped (zoomed in 1-1.15x at a random offset), flipped left-right (half of them), "
                "rotated (up to 10 degrees either way) and given Gaussian pixel noise (sigma 6 of 255)")


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


@dataclass
class Embeddings:
    """The cached gallery (the largest size; smaller ones are its prefixes) and the test queries."""

    gallery: np.ndarray  # n x dim float32, memory-mapped
    labels: np.ndarray  # n, the source image's label
    queries: dict[str, np.ndarray]  # query encoder -> test queries x dim
    query_labels: np.ndarray
    meta: dict


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


# --- measuring one index -------------------------------------------------------------------------------
def recall_at(found: np.ndarray, truth: np.ndarray) -> dict:
    """recall@1 (same top-1) and recall@10 (mean overlap of the top-10 lists), as in `retrieval.tuning.recall`."""
    overlap = [len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found.tolist(), truth.tolist(), strict=True)]
    return {"at_1": float(np.mean(found[:, 0] == truth[:, 0])), "at_10": float(np.mean(overlap))}


@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


Search = Callable[[np.ndarray], np.ndarray]  # queries -> ids of their K nearest (-1 past the hits)


def faiss_search(index: faiss.Index, search_params: dict, stored: tuning.Stored) -> Search:
    """The index's search as `build-index` runs it (re-ranking from the stored vectors where tuned)."""
    none = np.zeros(0, np.int64)
    return lambda queries: tuning.search(index, queries, K, search_params, none, stored)[1]


def qps(search: Search, queries: np.ndarray, batch: int, repeats: int = TIMING_REPEATS) -> float:
    """Queries per second searching `queries` `batch` at a time: the best of `repeats` passes (fewer once they took
    `TIMING_BUDGET` seconds), after a warm-up batch.

    Batch 1 runs on one FAISS thread: every FAISS kind here searches a single query on one thread anyway, and idle
    OpenMP threads spinning on a busy machine would otherwise be timed too."""
    with faiss_threads(1) if batch == 1 else contextlib.nullcontext():
        search(queries[:batch])
        best, spent = math.inf, 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            for lo in range(0, len(queries), batch):
                search(queries[lo:lo + batch])
            best, spent = min(best, time.perf_counter() - start), spent + time.perf_counter() - start
            if spent > TIMING_BUDGET:
                break
        return len(queries) / best


def measure(search: Search, emb: Embeddings, truth: dict[str, np.ndarray], latency_queries: int,
            batch_queries: int) -> dict:
    """Recall, 1-NN label accuracy and speed of a built index, for each query encoder."""
    rows = {}
    for spec, queries in emb.queries.items():
        found = search(queries)
        top1 = np.where(found[:, 0] >= 0, emb.labels[found[:, 0]], -1)  # -1: no hit
        rows[spec] = {**recall_at(found, truth[spec]), "knn1": float(np.mean(top1 == emb.query_labels)),
                      "qps_batch_1": round(qps(search, queries[:latency_queries], 1), 1),
                      f"qps_batch_{BATCH}": round(qps(search, queries[:batch_queries], BATCH), 1)}
    return rows


def sweep(index: faiss.Index, emb: Embeddings, truth: np.ndarray, stored: tuning.Stored,
          tuned: dict) -> list[dict]:
    """recall@10 of XL queries and batch-1 speed at every efSearch / nprobe of the tuning grid (codes alone), and
    where re-ranking was tuned in, at every rerank of its grid with the tuned nprobe."""
    knob = tuning.parameter(index)
    if knob is None:
        return []
    if knob == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        grid = [{knob: v} for v in sorted({min(nlist, 2**i) for i in range(int(np.log2(nlist)) + 2)})]
        if tuned.get("rerank", 1) > 1:
            grid += [{knob: tuned[knob], "rerank": r} for r in tuning.RERANK if r > 1]
    else:
        grid = [{knob: v} for v in tuning.EF_SEARCH]
    queries = emb.queries["XL"][:SWEEP_QUERIES]
    out = []
    for params in grid:
        search = faiss_search(index, params, stored)
        out.append({**params, "recall_at_10": recall_at(search(queries), truth[:len(queries)])["at_10"],
                    "qps_batch_1": round(qps(search, queries[:SWEEP_LATENCY_QUERIES], 1, repeats=1), 1)})
    return out


def build_index(key: str, vectors: np.ndarray) -> tuple[faiss.Index, dict]:
    """The index `build-index` makes for `key` over `vectors` (ids 0..n-1), and how long training and adding took."""
    dim = vectors.shape[1]
    start = time.perf_counter()
    index = make_faiss(key, dim, vectors)
    trained = time.perf_counter()
    inner = faiss.downcast_index(index.index)
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
        lossy = key.startswith("IVF") and not key.endswith(",Flat")  # tuned with re-ranking too
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
        key = KINDS[kind](n, self.dim)
        settings = self.settings(n, kind, key)
        path = self.out / "steps" / f"{n}-{kind}.json"
        if (row := steps.saved(path, settings, self.log)) is not None:
            return row
        twin = next((k for k in self.opts.kinds if k != kind and k != "auto" and KINDS[k](n, self.dim) == key), None)
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
               "hnsw_ef_construction": HNSW_EF_CONSTRUCTION if key.startswith("HNSW") else None,
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


def stores_status(stores: tuple[str, ...], rows: list[dict]) -> dict:
    """Whether each store was measured (at which sizes)."""
    out = {}
    for store in stores:
        sizes = sorted({row["size"] for row in rows if row.get("store", "faiss") == store})
        out[store] = {"measured": bool(sizes), "sizes": sizes}
        if not sizes:
            out[store]["reason"] = "not run yet"
    return out


# --- targets, Markdown, plot ---------------------------------------------------------------------------
def _row(r: dict, n: int, kind: str, store: str = "faiss") -> dict | None:
    return next((row for row in r["rows"] if row["size"] == n and row["kind"] == kind
                 and row.get("store", "faiss") == store), None)


def targets(r: dict) -> list[dict]:
    """At the largest size: `auto` at least 20x exact Flat's batch-1 QPS with recall@10 >= 0.95 (S and XL queries);
    IVF-PQ at most 1/8 of Flat's bytes per vector."""
    if not r["rows"]:
        return []
    n = max(row["size"] for row in r["rows"])
    flat, auto, ivfpq = _row(r, n, "flat"), _row(r, n, "auto"), _row(r, n, "ivfpq")
    out = []
    if flat and auto:
        speedup = {s: auto["queries"][s]["qps_batch_1"] / flat["queries"][s]["qps_batch_1"] for s in auto["queries"]}
        recall = {s: auto["queries"][s]["at_10"] for s in auto["queries"]}
        out.append({"target": f"at {n:,}, auto ({auto['index_key']}) answers a batch-1 query >= 20x faster than "
                              "exact Flat, with recall@10 >= 0.95",
                    "speedup": {s: round(v, 1) for s, v in speedup.items()},
                    "recall_at_10": {s: round(v, 4) for s, v in recall.items()},
                    "met": min(speedup.values()) >= 20 and min(recall.values()) >= 0.95})
    if flat and ivfpq:
        ratio = ivfpq["bytes_per_vector"] / flat["bytes_per_vector"]
        out.append({"target": f"at {n:,}, IVF-PQ ({ivfpq['index_key']}) needs <= 1/8 of Flat's bytes per vector",
                    "ratio": round(ratio, 4), "flat_to_ivfpq": round(1 / ratio, 1), "met": ratio <= 1 / 8})
    return out


def _meets(row: dict, flat: dict) -> bool:
    """Whether `row` is at least 20x Flat's batch-1 QPS with recall@10 >= 0.95, for S and for XL queries."""
    return all(q["qps_batch_1"] >= 20 * flat["queries"][s]["qps_batch_1"] and q["at_10"] >= 0.95
               for s, q in row["queries"].items())


def findings(r: dict) -> list[str]:
    """What the numbers say, per size: unreachable recall targets and what tuning then chose, the accuracy cost,
    memory, and (where `auto` misses the speed and recall target) the measured kinds that meet it."""
    out = []
    for n in sorted({row["size"] for row in r["rows"]}):
        flat = _row(r, n, "flat")
        rows = [row for row in r["rows"] if row["size"] == n and not row.get("same_as") and row is not flat]
        for row in rows:
            store = "Milvus Lite " if row.get("store") == "milvus" else ""
            name = f"{n:,}, {store}`{row['index_key']}`"
            tuned = row.get("tuning_recall") or {}
            codes = [p for p in row["sweep"] if "rerank" not in p]  # the knob alone (no re-ranking)
            if codes and max(p["recall_at_10"] for p in codes) < r["recall_target"]:
                knob = next(k for k in codes[0] if k not in ("recall_at_10", "qps_batch_1"))
                best = max(p["recall_at_10"] for p in codes)
                enough = next(p for p in codes if p["recall_at_10"] >= best - 0.005)
                out.append(f"- {name}: without re-ranking, recall@10 never reaches {r['recall_target']} (XL queries: "
                           f"at most {best:.4f}); it is flat from {knob} {enough[knob]} on (within 0.005 of its best; "
                           f"{enough['qps_batch_1']:,.0f} QPS at batch 1 against {codes[-1]['qps_batch_1']:,.0f} at "
                           f"{codes[-1][knob]}): the codes, not the lists probed, limit recall.")
                rerank = row["search_params"].get("rerank", 1)
                if rerank > 1:
                    out.append(f"- {name}: tuning re-ranks {rerank} x 10 candidates per query by their stored vectors "
                               f"(read memory-mapped) at {knob} {row['search_params'][knob]}: recall@10 "
                               f"{_pair(row, 'at_10', '.4f')} (S / XL) at {_pair(row, 'qps_batch_1', ',.0f')} QPS at "
                               "batch 1; the stored vectors it reads are not in the bytes per vector.")
                elif tuned.get("met") is False:
                    out.append(f"- {name}: tuning keeps {_param(row)}, the most accurate setting it tried.")
            if row.get("train_seconds", 0) > 1:
                out.append(f"- {name}: building took {row['build_seconds']:,.0f} s, {row['train_seconds']:,.0f} s of "
                           f"them training on {row.get('train_vectors', min(n, TRAIN_SAMPLE)):,} vectors.")
            if flat:
                cost = max(flat["queries"][s]["knn1"] - q["knn1"] for s, q in row["queries"].items())
                mine, exact = (" / ".join(f"{q['knn1']:.4f}" for q in x["queries"].values()) for x in (row, flat))
                share = row["bytes_per_vector"] / flat["bytes_per_vector"]
                out.append(f"- {name}: 1-NN label accuracy {mine} (S / XL) against exact {exact}: "
                           f"{100 * cost:.2f} points lower at most; {share:.2f} of Flat's bytes per vector.")
    n = max((row["size"] for row in r["rows"]), default=0)
    flat, auto = _row(r, n, "flat"), _row(r, n, "auto")
    if flat and auto and not _meets(auto, flat):
        good = [row for row in r["rows"] if row["size"] == n and row.get("store", "faiss") == "faiss"
                and not row.get("same_as") and row["kind"] != "flat" and _meets(row, flat)]
        if good:
            best = min(good, key=lambda row: row["bytes_per_vector"])
            names = ", ".join(f"`{row['index_key']}`" for row in good)
            out.append(f"- At {n:,}, `auto` (`{auto['index_key']}`) misses the speed and recall target; of the "
                       f"measured kinds, {names} meet it. Recommended: `{best['index_key']}` "
                       f"({best['bytes_per_vector']:,.0f} bytes per vector, {_param(best)}).")
        else:
            out.append(f"- At {n:,}, `auto` (`{auto['index_key']}`) misses the speed and recall target, and no other "
                       "measured kind meets it.")
    return out


def _pair(row: dict, key: str, fmt: str) -> str:
    """S / XL values of one measure."""
    return f"{format(row['queries']['S'][key], fmt)} / {format(row['queries']['XL'][key], fmt)}"


def _param(row: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in row["search_params"].items()) or "-"


def markdown(r: dict) -> str:
    g = r["gallery"]
    m = r["machine"]
    lines = [
        f"# The index at scale: {r['dataset']}",
        "",
        f"Command: `{r['command']}`  ",
        f"Commit: `{r['commit']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs while this ran), FAISS "
        f"{faiss.__version__}; batch-1 searches on 1 FAISS thread, batch {r['batch']} on "
        f"{faiss.omp_get_max_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}  ",
        f"Checkpoint: `{r['checkpoint']}` (fingerprint `{r['fingerprint']}`)",
        "",
        f"Gallery: XL embeddings of the {g['train_images']:,} training images, copy 0 as they are and "
        f"{g['copies'] - 1} seeded augmented copies ({AUGMENTATION}); a gallery of size n is the first n. "
        f"Queries: the {g['test_images']:,} test images embedded with S and with XL. Recall@1 / recall@10: "
        f"{r['recall_method']}; 1-NN: the share of test queries whose nearest gallery vector has their label. "
        f"efSearch / nprobe (and for PQ / SQ codes the exact re-ranking factor, reading the memory-mapped gallery) "
        f"tuned with `retrieval.tuning.tune` to recall@10 >= {r['recall_target']} on its own "
        f"probe queries; HNSW built with efConstruction {HNSW_EF_CONSTRUCTION} (FAISS's default, what "
        f"`build-index` builds). QPS at batch 1 over the first {r['options']['latency_queries']} queries, at batch "
        f"{r['batch']} over the first {r['options']['batch_queries']} (Milvus Lite: {MILVUS_LATENCY_QUERIES} and "
        f"{MILVUS_BATCH_QUERIES}), each the best of {TIMING_REPEATS} passes "
        f"(fewer once the passes took {TIMING_BUDGET:.0f} s); bytes per vector: the serialized index (IDMap2 "
        "included) over n, which leaves out the stored vectors re-ranking reads.",
        "",
    ]
    batched = f"qps_batch_{r['batch']}"
    for n in sorted({row["size"] for row in r["rows"]}):
        lines += [f"## {n:,} vectors", "",
                  "| kind | index | search | build s | bytes/vector | QPS b1 S / XL | QPS b64 S / XL | "
                  "recall@1 S / XL | recall@10 S / XL | 1-NN S / XL |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in (row for row in r["rows"] if row["size"] == n):
            kind = row["kind"] + (f" (= {row['same_as']})" if row.get("same_as") else "")
            kind = f"Milvus Lite {kind}" if row.get("store") == "milvus" else kind
            lines.append(f"| {kind} | `{row['index_key']}` | {_param(row)} | {row['build_seconds']:,.1f} | "
                         f"{row['bytes_per_vector']:,.1f} | {_pair(row, 'qps_batch_1', ',.0f')} | "
                         f"{_pair(row, batched, ',.0f')} | {_pair(row, 'at_1', '.4f')} | "
                         f"{_pair(row, 'at_10', '.4f')} | {_pair(row, 'knn1', '.4f')} |")
        lines.append("")
    if r["targets"]:
        lines += ["## Targets", "", "| target | measured | result |", "|---|---|---|"]
        for t in r["targets"]:
            if "speedup" in t:
                got = ("speed-up " + ", ".join(f"{s} {v:,.1f}x" for s, v in t["speedup"].items())
                       + "; recall@10 " + ", ".join(f"{s} {v:.4f}" for s, v in t["recall_at_10"].items()))
            else:
                got = f"1/{t['flat_to_ivfpq']} of Flat"
            lines.append(f"| {t['target']} | {got} | {'met' if t['met'] else '**missed**'} |")
        lines.append("")
    if r.get("findings"):
        lines += ["## Reading", "", *r["findings"], ""]
    lines += ["## Stores", ""]
    for store, status in r["stores"].items():
        said = (f"measured above at {', '.join(f'{n:,}' for n in status['sizes'])} vectors" if status["measured"]
                else f"not measured ({status['reason']})")
        lines.append(f"- {store}: {said}")
    lines.append("")
    return "\n".join(lines)


COLORS = {"flat": "black", "hnsw": "tab:blue", "ivfpq": "tab:orange", "ivfsq8": "tab:green"}


def plot(r: dict, path: Path) -> None:
    """Per size: recall@10 of XL queries against batch-1 QPS along each index's efSearch / nprobe (dashed: along
    rerank at the tuned nprobe), tuned points marked (S hollow, XL filled)."""
    sizes = sorted({row["size"] for row in r["rows"]})
    fig = Figure(figsize=(6 * len(sizes), 4.6), layout="tight")
    axes = np.atleast_1d(fig.subplots(1, len(sizes)))
    for ax, n in zip(axes, sizes, strict=True):
        for row in (row for row in r["rows"] if row["size"] == n and not row.get("same_as")):
            if row.get("store") == "milvus":
                q = row["queries"]
                ax.scatter(q["XL"]["qps_batch_1"], q["XL"]["at_10"], marker="D", color="tab:cyan", s=50, zorder=3,
                           label=f"Milvus Lite auto {row['index_key']} {_param(row)}")
                ax.scatter(q["S"]["qps_batch_1"], q["S"]["at_10"], marker="D", facecolors="none",
                           edgecolors="tab:cyan", s=50, zorder=3)
                continue
            color = COLORS.get(row["kind"], "tab:purple")
            for reranked, style in ((False, ".-"), (True, ".--")):
                line = [p for p in row["sweep"] if ("rerank" in p) == reranked]
                ax.plot([p["qps_batch_1"] for p in line], [p["recall_at_10"] for p in line], style, color=color, lw=1,
                        alpha=0.6)
            q = row["queries"]
            ax.scatter(q["XL"]["qps_batch_1"], q["XL"]["at_10"], color=color, s=60, zorder=3,
                       label=f"{row['kind']} {row['index_key']} {_param(row)}")
            ax.scatter(q["S"]["qps_batch_1"], q["S"]["at_10"], facecolors="none", edgecolors=color, s=60, zorder=3)
        auto = _row(r, n, "auto")
        if auto:
            ax.scatter(auto["queries"]["XL"]["qps_batch_1"], auto["queries"]["XL"]["at_10"], marker="*", s=220,
                       color="gold", edgecolors="black", zorder=4, label=f"auto = {auto['index_key']}")
        ax.axhline(r["recall_target"], color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("queries per second, batch 1 (log)")
        ax.set_ylabel("recall@10 against exact")
        ax.set_title(f"{n:,} vectors (filled: XL queries, hollow: S)")
        ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path, dpi=120)


def run(opts: ScaleOptions) -> dict:
    return Bench(opts).run()
