"""Speed as ratios measured side by side: nesting costs nothing, smaller is faster, indexing and training keep up.

    matvit bench speed --preset matvit-ti16 --preset matvit-s16 [--checkpoint DIR] --out docs/results/speed

Absolute times on a shared CPU are noise; a ratio of two models timed in the same run, interleaved repeat
by repeat, is not. Every figure here is such a ratio (the absolute milliseconds are recorded beside it).
For each model (a preset with seeded random weights, or a trained checkpoint):

1. Nesting costs nothing: embedding throughput of the nested MatViT at XL, and of each extracted submodel
   (`MatViT.extract`), against a plain timm ViT built with the same widths (`build_standalone`);
   the nested MatViT at the smaller specs is shown too. Target >= 0.97, batch 1 and batch B.
2. Smaller is really faster: latency(spec) / latency(XL) against GFLOPs(spec) / GFLOPs(XL) (the embedding
   path, `MatViT.forward_flops`) for S, M, L and Mix'n'Match specs of the monotone family, for the
   extracted models (what the retriever encodes with) and the nested model given the spec (`model.embed(x, spec)`).
   Target: within 15% of the FLOP ratio at batch B, 25% at batch 1. A least-squares fit
   ms = fixed + slope x GFLOPs over the specs says how much of a forward does not shrink with the FFN.
3. Indexing: `retrieval.build.build` images/s on the first N images of a dataset against the pure XL
   forward (the extracted XL ViT on the same images, already converted to float, same batch size); >= 0.9.
4. Training: a `matvit.train.Trainer` epoch over the first N training images, MatViT (all granularities
   jointly) against the sum of the four per-width baselines' epochs; <= 1.0.

Each time is the median of the calls timed in R rounds with the compared models interleaved (the order
rotated every round) after a warm-up; a ratio is the ratio of two such medians from the same rounds. torch
runs on a fixed number of threads, recorded. Each model's timing, its indexing and each training preset is a
step that writes `OUT/steps/NAME.json` when it ends and is skipped on a rerun with the same settings, so an
interrupted run continues where it stopped; `OUT/speed.json`, `speed.md` and `speed.png` are rewritten after every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from matvit import data, provenance
from matvit import spec as specs
from matvit.config import GRANULARITY_NAMES
from matvit.errors import UserError
from matvit.images import to_input
from matvit.model import MatViT, MatViTConfig
from matvit.nested import Embedding
from matvit.registry import PRESETS, get_preset
from matvit.spec import Submodel

from . import steps

# Targets of issue "Smaller must be faster".
NESTING_TARGET = 0.97  # throughput against a plain timm ViT of the same widths
FLOP_TOLERANCE = {1: 0.25}  # latency ratio within this share of the FLOP ratio at batch 1 ...
BATCHED_TOLERANCE = 0.15  # ... and this at the batched size
INDEX_TARGET = 0.9  # build-index images/s against the pure XL forward
TRAIN_TARGET = 1.0  # joint epoch against the four baselines' epochs together

MIN_SAMPLE_SECONDS = 0.2  # a model is called as often in a row as takes about this long (each call timed)
MAX_CALLS = 50
INDEX_SECONDS = 8.0  # default indexing size: about this many seconds of XL forward
INDEX_LIMITS = (64, 8192)
RETRIEVER_PATH = "extracted"  # retrieval.encoder.Encoder encodes with extracted standalone models (DESIGN.md)


class SpeedBenchError(UserError):
    """A bad speed benchmark option."""


@dataclass
class SpeedOptions:
    out: Path
    presets: tuple[str, ...] = ()
    checkpoint: Path | None = None
    dataset: str | None = None  # images of indexing and training; default the checkpoint's, else fashion-mnist
    data_dir: Path | None = None
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    batch: int = 32
    repeats: int = 7  # batch-1 repeats
    repeats_batched: int = 3
    mixes: int = 3  # Mix'n'Match specs timed besides S, M, L, XL
    index_images: int = 0  # 0: about INDEX_SECONDS of XL forward
    index_batch: int = 256
    index_repeats: int = 3
    train_presets: tuple[str, ...] | None = None  # default: the checkpoint's preset, else matvit-small-fmnist
    train_images: int = 4096
    train_batch: int = 128
    train_repeats: int = 3
    max_load: float | None = 2.5  # wait before the first measurement while the 1-minute load is higher ...
    load_wait: float = 1200.0  # ... for at most this many seconds
    seed: int = 0
    log: Callable[[str], None] = field(default=print, repr=False)

    def __post_init__(self) -> None:
        if not self.presets and self.checkpoint is None:
            raise SpeedBenchError("give at least one --preset NAME or a --checkpoint DIR")
        for name in (*self.presets, *(self.train_presets or ())):
            get_preset(name)  # unknown names raise with the list of known ones
        if self.checkpoint is not None and not (Path(self.checkpoint) / "model.safetensors").is_file():
            raise SpeedBenchError(f"no checkpoint at {self.checkpoint} (model.safetensors is missing)")
        for name in ("threads", "batch", "repeats", "repeats_batched", "index_batch", "index_repeats",
                     "train_images", "train_batch", "train_repeats"):
            if getattr(self, name) < 1:
                raise SpeedBenchError(f"--{name.replace('_', '-')} must be at least 1")
        if self.batch == 1:
            raise SpeedBenchError("--batch is the batched size, timed besides batch 1: give at least 2")
        if self.train_images < self.train_batch:
            raise SpeedBenchError("--train-images must hold at least one --train-batch")
        if self.mixes < 0 or self.index_images < 0:
            raise SpeedBenchError("--mixes and --index-images cannot be negative")


# --- timing ------------------------------------------------------------------------------------------
Call = Callable[[], object]


def interleaved(calls: dict[str, Call], repeats: int, warmup: int = 1,
                min_seconds: float = 0.0) -> dict[str, list[float]]:
    """Seconds of every timed call of each function: `repeats` rounds, each running the functions one after the
    other in an order rotated every round, after `warmup` calls each. With `min_seconds`, a function is called as
    often in a row as it takes about that long (counted once, from a probe call), each call timed on its own."""
    names = list(calls)
    in_a_row = {}
    for name in names:
        for _ in range(warmup):
            calls[name]()
        in_a_row[name] = 1
        if min_seconds:
            start = time.perf_counter()
            calls[name]()
            took = time.perf_counter() - start
            in_a_row[name] = max(1, min(MAX_CALLS, math.ceil(min_seconds / max(took, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(in_a_row[name]):
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median time of a over median time of b (both gathered interleaved, in the same rounds)."""
    return float(statistics.median(times[a]) / statistics.median(times[b]))


def median_ms(times: list[float]) -> float:
    return round(1e3 * statistics.median(times), 4)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def wait_for_quiet(max_load: float | None, wait: float, log: Callable[[str], None]) -> dict:
    """Sleep a minute at a time (up to `wait` seconds) while the 1-minute load average is above `max_load`."""
    start, load = time.monotonic(), load_average()
    while max_load is not None and load is not None and load > max_load and time.monotonic() - start < wait:
        log(f"1-minute load {load} > {max_load}: waiting for the CPU to quieten")
        time.sleep(60)
        load = load_average()
    return {"load_1min": load, "max_load": max_load, "waited_s": round(time.monotonic() - start),
            "over_limit": bool(max_load is not None and load is not None and load > max_load)}


# --- what is timed -----------------------------------------------------------------------------------
@dataclass
class Subject:
    """A model whose speed is measured: a preset with seeded random weights, or a trained checkpoint."""

    name: str
    model: MatViT
    weights: str  # "random (seed N)" or the checkpoint path
    fingerprint: str
    dataset: str  # images for indexing
    preset: str | None  # the preset it was built from (a checkpoint's config says)

    @property
    def config(self) -> MatViTConfig:
        return self.model.config

    @property
    def slug(self) -> str:
        return self.name.replace(":", "-").replace("/", "_").strip("_.")


def subjects(opts: SpeedOptions) -> Iterator[Subject]:
    from matvit import checkpoint

    for name in opts.presets:
        torch.manual_seed(opts.seed)
        model = MatViT(get_preset(name).model).eval()
        yield Subject(name, model, f"random (seed {opts.seed})", checkpoint.fingerprint(model),
                      opts.dataset or "fashion-mnist", name)
    if opts.checkpoint is not None:
        model, meta = checkpoint.load(opts.checkpoint)
        yield Subject(f"checkpoint:{opts.checkpoint}", model, str(opts.checkpoint), checkpoint.fingerprint(model),
                      opts.dataset or meta.get("dataset") or "fashion-mnist", meta.get("preset"))


def mixes(model: MatViT, n: int) -> list[Submodel]:
    """`n` Mix'n'Match specs of the monotone family (widths never shrink with depth: MatFormer's recipe for
    submodels on the accuracy-compute Pareto front), at GFLOPs evenly spaced between S and XL."""
    flops = model.forward_flops
    lo, hi = flops("S"), flops("XL")
    pool = [s for s in specs.monotone(model) if not s.uniform]
    chosen: list[Submodel] = []
    for i in range(1, n + 1):
        target = lo + (hi - lo) * i / (n + 1)
        left = [s for s in pool if s not in chosen]
        if left:
            chosen.append(min(left, key=lambda s: (abs(flops(s) - target), s.text)))
    return sorted(chosen, key=flops)


def timed_specs(model: MatViT, n_mixes: int) -> list[Submodel]:
    """S, M, L, the Mix'n'Match specs, XL: cheapest first."""
    named = [model.spec(g) for g in GRANULARITY_NAMES if g in model.granularities]
    return sorted(named[:-1] + mixes(model, n_mixes), key=model.forward_flops) + named[-1:]


def plain_call(embedding: Embedding, x: torch.Tensor) -> Call:
    return lambda: embedding(x)


def nested_call(model: MatViT, spec: Submodel, x: torch.Tensor) -> Call:
    return lambda: model.embed(x, spec)


def tokens(config: MatViTConfig) -> int:
    return (config.img_size // config.patch_size) ** 2 + 1


def ffn_share(model: MatViT) -> float:
    """The FFNs' share of XL's embedding-path FLOPs: the most any narrower FFN can save."""
    xl, config = model.spec("XL"), model.config
    t, d = tokens(config), config.embed_dim
    return sum(4 * t * d * w for w in xl.widths) / model.forward_flops(xl)


def fit(points: list[tuple[float, float]]) -> dict:
    """Least squares ms = fixed + slope * GFLOPs."""
    x, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    slope, fixed = np.polyfit(x, y, 1) if len(points) > 1 else (y[0] / x[0], 0.0)
    return {"fixed_ms": round(float(fixed), 4), "ms_per_gflop": round(float(slope), 4)}


# --- the benchmark -----------------------------------------------------------------------------------
class Bench:
    def __init__(self, opts: SpeedOptions) -> None:
        self.opts, self.log = opts, opts.log
        self.out = Path(opts.out)
        (self.out / "steps").mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(opts.threads)
        self.origin = provenance.record()  # the code that started the run
        self.quiet: dict | None = None  # the load check before the first measurement
        self.names: list[str] = []
        self.train_names: list[str] = []

    def _settings(self, kind: str, **extra) -> dict:
        o = self.opts
        return {"kind": kind, "threads": o.threads, "seed": o.seed, **extra}

    def _cached(self, path: Path, settings: dict) -> dict | None:
        return steps.saved(path, settings, self.log)

    def _write(self, path: Path, row: dict) -> dict:
        steps.write(path, row)
        self.report()
        return row

    def _begin(self) -> dict:
        """The load check (before the first measurement of the run only: later, this run's own threads are in the
        load average), then the load as the step starts."""
        first = self.quiet is None
        if first:
            self.quiet = wait_for_quiet(self.opts.max_load, self.opts.load_wait, self.log)
        torch.set_num_threads(self.opts.threads)
        return {**({"load_check": self.quiet} if first else {}), "load_1min_at_start": load_average()}

    # 1 and 2: nesting and smaller specs
    def timing_step(self, s: Subject) -> dict:
        o, cfg = self.opts, s.config
        spec_list = timed_specs(s.model, o.mixes)
        settings = self._settings("timing", model=s.name, fingerprint=s.fingerprint, batch=o.batch,
                                  repeats=o.repeats, repeats_batched=o.repeats_batched,
                                  specs=[x.text for x in spec_list])
        path = self.out / "steps" / f"{s.slug}-timing.json"
        if (saved := self._cached(path, settings)) is not None:
            return saved
        from matvit.extract import Features, build_standalone

        start, row = time.perf_counter(), {"settings": settings, **self._begin()}
        extracted = {x.id: s.model.extract(x) for x in spec_list}
        torch.manual_seed(o.seed + 1)
        plain = {x.id: Embedding(Features(build_standalone(cfg.timm_kwargs(), list(x.widths)))).eval()
                 for x in spec_list}
        xl = spec_list[-1]
        flops = {x.id: s.model.forward_flops(x) for x in spec_list}
        batches = {}
        for b, repeats in ((1, o.repeats), (o.batch, o.repeats_batched)):
            self.log(f"[{s.slug}-timing] batch {b}: {3 * len(spec_list)} models x {repeats} repeats")
            x = torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
            calls: dict[str, Call] = {}
            for sp in spec_list:
                calls[f"nested:{sp.id}"] = nested_call(s.model, sp, x)
                calls[f"extracted:{sp.id}"] = plain_call(extracted[sp.id], x)
                calls[f"plain:{sp.id}"] = plain_call(plain[sp.id], x)
            with torch.inference_mode():
                t = interleaved(calls, repeats, warmup=1, min_seconds=MIN_SAMPLE_SECONDS)
            rows = []
            for sp in spec_list:
                k = sp.id
                rows.append({
                    "spec": sp.text, "gflops": round(flops[k] / 1e9, 5),
                    "flop_ratio": round(flops[k] / flops[xl.id], 4),
                    "params": s.model.num_params(sp),
                    "ms": {kind: median_ms(t[f"{kind}:{k}"]) for kind in ("nested", "extracted", "plain")},
                    # throughput against the plain timm ViT of the same widths = its time over ours
                    "throughput_vs_plain": {kind: round(ratio(t, f"plain:{k}", f"{kind}:{k}"), 4)
                                            for kind in ("nested", "extracted")},
                    "latency_ratio": {kind: round(ratio(t, f"{kind}:{k}", f"{kind}:{xl.id}"), 4)
                                      for kind in ("nested", "extracted")},
                })
            for r in rows:
                r["deviation"] = {kind: round(v / r["flop_ratio"] - 1, 4) for kind, v in r["latency_ratio"].items()}
            ext_fit = fit([(r["gflops"], r["ms"]["extracted"]) for r in rows])
            ext_fit["fixed_share_of_xl"] = round(ext_fit["fixed_ms"] / rows[-1]["ms"]["extracted"], 4)
            batches[str(b)] = {"batch": b, "repeats": repeats, "rows": rows, "fit_extracted": ext_fit,
                               "calls_timed": {name: len(vs) for name, vs in t.items()}}
        row.update({"model": s.name, "weights": s.weights, "fingerprint": s.fingerprint, "preset": s.preset,
                    "config": cfg.to_dict(), "tokens": tokens(cfg), "ffn_share_of_flops": round(ffn_share(s.model), 4),
                    "batches": batches, "load_1min_at_end": load_average(),
                    "step_seconds": round(time.perf_counter() - start, 1), **provenance.record()})
        return self._write(path, row)

    # 5: indexing
    def index_step(self, s: Subject) -> dict:
        o, cfg = self.opts, s.config
        settings = self._settings("index", model=s.name, fingerprint=s.fingerprint, dataset=s.dataset,
                                  images=o.index_images, batch=o.index_batch, repeats=o.index_repeats)
        path = self.out / "steps" / f"{s.slug}-index.json"
        if (saved := self._cached(path, settings)) is not None:
            return saved
        from retrieval import build
        from retrieval.encoder import Encoder

        start, row = time.perf_counter(), {"settings": settings, **self._begin()}
        xl = s.model.extract("XL")
        b = o.index_batch
        n = o.index_images
        if not n:  # about INDEX_SECONDS of XL forward, whole batches
            probe = torch.zeros(min(b, 32), cfg.in_chans, cfg.img_size, cfg.img_size)
            with torch.inference_mode():
                xl(probe)
                t0 = time.perf_counter()
                xl(probe)
                rate = len(probe) / (time.perf_counter() - t0)
            n = min(max(INDEX_LIMITS[0], round(rate * INDEX_SECONDS)), INDEX_LIMITS[1])
        gallery = first_images(s.dataset, "test", n, cfg, o.data_dir)
        n = len(gallery.images)
        x = to_input(gallery.images)
        encoder = Encoder(s.model)
        source = build.DatasetSource(s.dataset, "test", cfg.img_size, cfg.in_chans, o.data_dir, images=gallery)
        scratch = Path(tempfile.mkdtemp(prefix="matvit-speed-"))

        def forward() -> None:
            with torch.inference_mode():
                for i in range(0, n, b):
                    xl(x[i:i + b])

        def build_index() -> None:
            where = Path(tempfile.mkdtemp(dir=scratch))
            build.build(encoder, source, where / "index", "XL", batch_size=b)
            shutil.rmtree(where)

        self.log(f"[{s.slug}-index] build-index and XL forward over {n} images x {o.index_repeats} repeats")
        try:
            t = interleaved({"build": build_index, "forward": forward}, o.index_repeats, warmup=1)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        row.update({"model": s.name, "dataset": s.dataset, "images": n, "batch": b,
                    "build_images_per_s": round(n / statistics.median(t["build"]), 1),
                    "forward_images_per_s": round(n / statistics.median(t["forward"]), 1),
                    "ratio": round(ratio(t, "forward", "build"), 4),
                    "samples_s": {k: [round(v, 4) for v in vs] for k, vs in t.items()},
                    "load_1min_at_end": load_average(), "step_seconds": round(time.perf_counter() - start, 1),
                    **provenance.record()})
        return self._write(path, row)

    # 5: training
    def train_step(self, preset: str, dataset: str) -> dict:
        o = self.opts
        settings = self._settings("train", preset=preset, dataset=dataset, images=o.train_images, batch=o.train_batch,
                                  repeats=o.train_repeats)
        path = self.out / "steps" / f"train-{preset}.json"
        if (saved := self._cached(path, settings)) is not None:
            return saved
        from matvit.sources import InMemory
        from matvit.train import Trainer, TrainOptions

        start, row = time.perf_counter(), {"settings": settings, **self._begin()}
        scratch = Path(tempfile.mkdtemp(prefix="matvit-speed-train-"))
        trainers = {}
        try:
            for g in (None, *GRANULARITY_NAMES):
                name = "MatViT" if g is None else g
                t = Trainer(TrainOptions(preset=preset, dataset=dataset, out=scratch / name, data_dir=o.data_dir,
                                         epochs=1, batch_size=o.train_batch, dense_epochs=0, baseline=g, seed=o.seed))
                full = t.train_set.set
                t.train_set = InMemory(data.ImageSet(full.images[:o.train_images], full.labels[:o.train_images],
                                                     full.classes, full.sources[:o.train_images]))
                trainers[name] = t
            steps = len(trainers["MatViT"].train_set) // o.train_batch
            for t in trainers.values():  # warm-up: two steps each
                t.steps_per_epoch = min(2, steps)
                t.train_epoch()
                t.steps_per_epoch = steps
            self.log(f"[train-{preset}] MatViT and four baselines, {steps} steps each x {o.train_repeats} repeats")
            samples = interleaved({k: t.train_epoch for k, t in trainers.items()}, o.train_repeats, warmup=0)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        epoch = {k: statistics.median(v) for k, v in samples.items()}
        together = sum(v for k, v in epoch.items() if k != "MatViT")
        row.update({"preset": preset, "dataset": dataset, "images": steps * o.train_batch, "batch": o.train_batch,
                    "steps_per_epoch": steps, "mode": trainers["MatViT"].opts.mode,
                    "epoch_s": {k: round(v, 3) for k, v in epoch.items()},
                    "baselines_sum_s": round(together, 3), "ratio": round(epoch["MatViT"] / together, 4),
                    "samples_s": {k: [round(v, 3) for v in vs] for k, vs in samples.items()},
                    "load_1min_at_end": load_average(), "step_seconds": round(time.perf_counter() - start, 1),
                    **provenance.record()})
        return self._write(path, row)

    def train_presets(self, first: list[Subject]) -> list[tuple[str, str]]:
        """(preset, dataset) of each training measurement."""
        o = self.opts
        if o.train_presets is not None:
            return [(p, o.dataset or "fashion-mnist") for p in o.train_presets]
        trained = next((s for s in first if s.name.startswith("checkpoint:") and s.preset in PRESETS), None)
        if trained is not None:
            return [(trained.preset, trained.dataset)]
        return [("matvit-small-fmnist", o.dataset or "fashion-mnist")]

    def run(self) -> dict:
        subject_list = list(subjects(self.opts))
        self.names = [s.slug for s in subject_list]
        training = self.train_presets(subject_list)
        self.train_names = [p for p, _ in training]
        for s in subject_list:
            self.timing_step(s)
            self.index_step(s)
        for preset, dataset in training:
            self.train_step(preset, dataset)
        return self.report(plot_to=self.out / "speed.png")

    def report(self, plot_to: Path | None = None) -> dict:
        def load(name: str) -> dict | None:
            path = self.out / "steps" / f"{name}.json"
            return json.loads(path.read_text()) if path.is_file() else None

        models = []
        for slug in self.names:
            timing, index = load(f"{slug}-timing"), load(f"{slug}-index")
            if timing or index:
                models.append({"model": (timing or index)["model"], "timing": timing, "index": index})
        training = [t for p in self.train_names if (t := load(f"train-{p}"))]
        steps = [row for m in models for row in (m["timing"], m["index"]) if row] + training
        checked = self.quiet or next((row["load_check"] for row in steps if row.get("load_check")), None)
        options = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                   for k, v in dataclasses.asdict(self.opts).items() if k != "log"}
        result = {**self.origin, "threads": self.opts.threads, "torch": torch.__version__, "options": options,
                  "load_check": checked, "method": METHOD, "retriever_uses": RETRIEVER_PATH,
                  "models": models, "training": training}
        result["targets"] = targets(result)
        result["findings"] = findings(result)
        (self.out / "speed.json").write_text(json.dumps(result, indent=2))
        (self.out / "speed.md").write_text(markdown(result))
        if plot_to is not None and any(m["timing"] for m in models):
            plot(result, plot_to)
        return result


METHOD = ("torch.set_num_threads fixed (recorded); every model warmed up, then timed in R rounds with the compared "
          "models interleaved (each in turn, the order rotated every round; a model is called as often in a row as "
          "takes about 0.2 s, every call timed on its own); a time is the median of all its timed calls and "
          "a ratio is the ratio of two such medians from the same rounds, so a burst of load from other jobs falls "
          "on both sides or is voted out by the median. Network inputs: seeded random images; everything under "
          "torch.inference_mode.")


NATIVE = {"digits": (8, 1), "fashion-mnist": (28, 1)}


def first_images(dataset: str, split: str, n: int, config: MatViTConfig, data_dir: Path | None) -> data.ImageSet:
    """The first `n` images of a split at the model's size (a built-in read at its native size, only those `n`
    resized, as `data.load` resizes)."""
    size, chans = NATIVE.get(dataset, (config.img_size, config.in_chans))
    full = data.load(dataset, split, size, chans, data_dir)
    images = full.images[:n]
    if images.shape[-1] != config.img_size:
        images = F.interpolate(images.float(), size=config.img_size, mode="bilinear", antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    if images.shape[1] != config.in_chans:
        images = images[:, :1].expand(-1, config.in_chans, -1, -1)
    return data.ImageSet(images.contiguous(), full.labels[:n], full.classes, full.sources[:n])


# --- targets, findings, Markdown, plot ---------------------------------------------------------------
def _is_trained_small(model: dict) -> bool:
    return model["model"].startswith("checkpoint:")


def tolerance(batch: int) -> float:
    return FLOP_TOLERANCE.get(batch, BATCHED_TOLERANCE)


def targets(r: dict) -> list[dict]:
    out = []
    for m in r["models"]:
        timing, name = m["timing"], m["model"]
        for b in (timing or {}).get("batches", {}).values():
            cands = [(f"nested {row['spec']}", row["throughput_vs_plain"]["nested"]) for row in b["rows"]
                     if row["spec"] == "XL"]
            cands += [(f"extracted {row['spec']}", row["throughput_vs_plain"]["extracted"]) for row in b["rows"]]
            worst = min(cands, key=lambda c: c[1])
            out.append({"section": 1, "model": name, "batch": b["batch"],
                        "target": f"nested XL and every extracted submodel >= {NESTING_TARGET}x a plain timm ViT's "
                                  "throughput",
                        "measured": {k: v for k, v in cands}, "worst": {"which": worst[0], "ratio": worst[1]},
                        "met": worst[1] >= NESTING_TARGET})
        for b in (timing or {}).get("batches", {}).values():
            tol = tolerance(b["batch"])
            for kind in ("extracted", "nested"):
                devs = {row["spec"]: row["deviation"][kind] for row in b["rows"] if row["spec"] != "XL"}
                worst = max(devs, key=lambda k: abs(devs[k]))
                out.append({"section": 2, "model": name, "batch": b["batch"], "kind": kind,
                            "target": f"latency ratio within {tol:.0%} of the FLOP ratio ({kind})",
                            "deviation": devs, "worst": {"spec": worst, "deviation": devs[worst]},
                            "met": all(abs(v) <= tol for v in devs.values()),
                            "report_only": _is_trained_small(m)})
        if m["index"]:
            out.append({"section": 5, "model": name, "target": f"build-index >= {INDEX_TARGET}x the pure XL forward's "
                        "images/s", "ratio": m["index"]["ratio"], "met": m["index"]["ratio"] >= INDEX_TARGET})
    for t in r["training"]:
        out.append({"section": 5, "model": t["preset"], "target": f"joint training epoch <= {TRAIN_TARGET}x the four "
                    "baselines' epochs together", "ratio": t["ratio"], "met": t["ratio"] <= TRAIN_TARGET})
    return out


def findings(r: dict) -> list[str]:
    """What the ratios say: where the FLOP saving does not arrive, and why."""
    out = []
    for m in r["models"]:
        timing = m["timing"]
        if not timing:
            continue
        name, share = m["model"], timing["ffn_share_of_flops"]
        for b in timing["batches"].values():
            s_row = next(row for row in b["rows"] if row["spec"] == "S")
            xl = b["rows"][-1]
            f = b["fit_extracted"]
            tol = tolerance(b["batch"])
            lat, fl = s_row["latency_ratio"]["extracted"], s_row["flop_ratio"]
            verdict = "within" if abs(lat / fl - 1) <= tol else "outside"
            out.append(
                f"- {name}, batch {b['batch']}: extracted S takes {lat:.2f}x XL's time for {fl:.2f}x its GFLOPs "
                f"({verdict} {tol:.0%}); the FFNs are {share:.0%} of XL's FLOPs at {timing['tokens']} tokens, so "
                f"no granularity can save more. Fit over the specs: {f['fixed_ms']:.2f} ms + {f['ms_per_gflop']:.2f} "
                f"ms/GFLOP, i.e. {f['fixed_share_of_xl']:.0%} of XL's {xl['ms']['extracted']:.2f} ms does not "
                "shrink with the FLOPs.")
        if _is_trained_small(m):
            devs = ", ".join(f"{row['deviation']['extracted']:+.0%} at batch {b['batch']}"
                             for b in timing["batches"].values() for row in b["rows"] if row["spec"] == "S")
            out.append(
                f"- {name} is a trained small model ({timing['tokens']} tokens of width "
                f"{timing['config']['embed_dim']}); its extracted S is off its FLOP ratio by {devs}. Its matmuls are "
                "so small that costs independent of the FFN width (per-operator dispatch in every layer, layer "
                "norms, attention's softmax and reshapes, the patch embedding) are a large share of a forward, so "
                "the latency ratios cannot follow the FLOP ratios down.")
    limit = r["options"].get("max_load")
    for row in [x for m in r["models"] for x in (m["timing"], m["index"]) if x] + r["training"]:
        peak = max(v for v in (row.get("load_1min_at_start"), row.get("load_1min_at_end")) if v is not None)
        if limit is not None and peak > limit:
            what = row.get("model") or f"training {row.get('preset')}"
            out.append(f"- {what} ({row['settings']['kind']}): the 1-minute load reached {peak} during this step "
                       f"(limit {limit}): other jobs shared the cores, so its absolute times, and the ratios of its "
                       "shortest calls most, carry that noise.")
    return out


def markdown(r: dict) -> str:
    m = r["machine"]
    q = r["load_check"] or {}
    lines = [
        "# Speed: smaller must be faster",
        "",
        f"Command: `{r['command']}`  ",
        f"Commit: `{r['commit']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs), Python {m['python']}, "
        f"torch {r['torch']}, {r['threads']} torch threads  ",
        f"Load: 1-minute load average {q.get('load_1min')} before the first measurement "
        f"(limit {q.get('max_load')}, waited {q.get('waited_s')} s"
        + (", **still over the limit**" if q.get("over_limit") else "") + "); per step below.",
        "",
        f"Method: {r['method']} Absolute milliseconds are recorded but are noisy on a shared CPU: read the ratios. "
        f"The retriever and build-index encode with the **{r['retriever_uses']}** standalone ViT "
        "(`MatViT.extract`, cached per spec by `retrieval.encoder.Encoder`); the nested rows time the "
        "MatViT itself given the spec (`model.embed(x, spec)`).",
        "",
    ]
    for model in r["models"]:
        t = model["timing"]
        if not t:
            continue
        cfg = t["config"]
        lines += [f"## {model['model']}", "",
                  f"Weights: {t['weights']} (fingerprint `{t['fingerprint']}`); {cfg['img_size']} px, patch "
                  f"{cfg['patch_size']} ({t['tokens']} tokens), width {cfg['embed_dim']}, depth {cfg['depth']}, FFN "
                  f"{cfg['mlp_hidden']}; the FFNs are {t['ffn_share_of_flops']:.0%} of XL's FLOPs. Load at start / end "
                  f"of the step: {t['load_1min_at_start']} / {t['load_1min_at_end']}; the step took "
                  f"{t['step_seconds']:.0f} s.", ""]
        for b in t["batches"].values():
            lines += [f"### Batch {b['batch']} ({b['repeats']} repeats)", "",
                      "| spec | GFLOPs | FLOP ratio | latency ratio extracted / nested | deviation extracted / nested "
                      "| throughput vs plain extracted / nested | ms extracted / nested / plain |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for row in b["rows"]:
                lr, dv, tp, ms = row["latency_ratio"], row["deviation"], row["throughput_vs_plain"], row["ms"]
                lines.append(f"| `{row['spec']}` | {row['gflops']:.3f} | {row['flop_ratio']:.3f} | "
                             f"{lr['extracted']:.3f} / {lr['nested']:.3f} | {dv['extracted']:+.1%} / "
                             f"{dv['nested']:+.1%} | {tp['extracted']:.3f} / {tp['nested']:.3f} | "
                             f"{ms['extracted']:.2f} / {ms['nested']:.2f} / {ms['plain']:.2f} |")
            f = b["fit_extracted"]
            lines += ["", f"Fit (extracted): ms = {f['fixed_ms']:.2f} + {f['ms_per_gflop']:.2f} x GFLOPs; the fixed "
                      f"part is {f['fixed_share_of_xl']:.0%} of XL's time.", ""]
        idx = model["index"]
        if idx:
            lines += [f"Indexing: `retrieval.build.build` over the first {idx['images']} images of {idx['dataset']} "
                      f"(test split, batch {idx['batch']}): {idx['build_images_per_s']:,.1f} images/s against "
                      f"{idx['forward_images_per_s']:,.1f} for the pure XL forward: **{idx['ratio']:.3f}x** "
                      f"(load {idx['load_1min_at_start']} / {idx['load_1min_at_end']}).", ""]
    if r["training"]:
        lines += ["## Training", "",
                  "| preset | dataset | images x batch | MatViT epoch s | S / M / L / XL baseline epoch s | "
                  "baselines together s | ratio |", "|---|---|---|---:|---:|---:|---:|"]
        for t in r["training"]:
            e = t["epoch_s"]
            lines.append(f"| {t['preset']} | {t['dataset']} | {t['images']} x {t['batch']} | {e['MatViT']:.2f} | "
                         + " / ".join(f"{e[g]:.2f}" for g in GRANULARITY_NAMES if g in e)
                         + f" | {t['baselines_sum_s']:.2f} | **{t['ratio']:.3f}** |")
        lines += ["", f"MatViT trains in `{r['training'][0]['mode']}` mode: every granularity's forward and backward "
                  "on each batch, one optimizer step; a baseline does one forward and backward at its own width. "
                  "Load at start / end: " + "; ".join(f"{t['preset']} {t['load_1min_at_start']} / "
                                                      f"{t['load_1min_at_end']}" for t in r["training"]) + ".", ""]
    if r["targets"]:
        lines += ["## Targets", "", "| section | model | batch | target | measured | result |",
                  "|---|---|---:|---|---|---|"]
        for t in r["targets"]:
            if t["section"] == 1:
                got = f"worst {t['worst']['which']} {t['worst']['ratio']:.3f}x"
            elif t["section"] == 2:
                got = f"worst `{t['worst']['spec']}` {t['worst']['deviation']:+.1%}"
            else:
                got = f"{t['ratio']:.3f}x"
            result = "met" if t["met"] else ("missed (reported)" if t.get("report_only") else "**missed**")
            lines.append(f"| {t['section']} | {t['model']} | {t.get('batch', '')} | {t['target']} | {got} | {result} |")
        lines.append("")
    if r["findings"]:
        lines += ["## Reading", "", *r["findings"], ""]
    if any(mm["timing"] for mm in r["models"]):
        lines += ["![latency ratio against FLOP ratio](speed.png)", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Latency ratio against FLOP ratio per model (extracted filled, nested hollow), batch 1 and batched, with the
    tolerance bands."""
    from matplotlib.figure import Figure

    timed = [m for m in r["models"] if m["timing"]]
    batches = sorted({b["batch"] for m in timed for b in m["timing"]["batches"].values()})
    fig = Figure(figsize=(5.5 * len(batches), 4.6), layout="tight")
    axes = np.atleast_1d(fig.subplots(1, len(batches)))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for ax, batch in zip(axes, batches, strict=True):
        line = np.linspace(0, 1, 50)
        tol = tolerance(batch)
        ax.plot(line, line, color="grey", lw=1)
        ax.fill_between(line, line * (1 - tol), line * (1 + tol), color="grey", alpha=0.15,
                        label=f"within {tol:.0%} of the FLOP ratio")
        for color, m in zip(colors * 4, timed, strict=False):
            b = next((b for b in m["timing"]["batches"].values() if b["batch"] == batch), None)
            if b is None:
                continue
            x = [row["flop_ratio"] for row in b["rows"]]
            ax.scatter(x, [row["latency_ratio"]["extracted"] for row in b["rows"]], color=color, s=30,
                       label=f"{m['model']} extracted")
            ax.scatter(x, [row["latency_ratio"]["nested"] for row in b["rows"]], facecolors="none", edgecolors=color,
                       s=30, label=f"{m['model']} nested")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, 1.3)
        ax.set_xlabel("GFLOPs(spec) / GFLOPs(XL)")
        ax.set_ylabel("latency(spec) / latency(XL)")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=120)


def run(opts: SpeedOptions) -> dict:
    return Bench(opts).run()


# --- command line ------------------------------------------------------------------------------------
def cmd_speed(args: argparse.Namespace) -> None:
    opts = SpeedOptions(
        out=args.out, presets=tuple(args.preset or ()), checkpoint=args.checkpoint, dataset=args.dataset,
        data_dir=args.data_dir, threads=args.threads, batch=args.batch, repeats=args.repeats,
        repeats_batched=args.repeats_batched, mixes=args.mixes, index_images=args.index_images,
        index_batch=args.index_batch, index_repeats=args.index_repeats,
        train_presets=tuple(args.train_preset) if args.train_preset else None, train_images=args.train_images,
        train_batch=args.train_batch, train_repeats=args.train_repeats, max_load=args.max_load,
        load_wait=args.load_wait, seed=args.seed)
    result = run(opts)
    for t in result["targets"]:
        flag = "met   " if t["met"] else ("REPORT" if t.get("report_only") else "MISSED")
        print(f"{flag} [{t['section']}] {t['model']}{' batch ' + str(t['batch']) if 'batch' in t else ''}: "
              f"{t['target']}")
    print(f"wrote {args.out / 'speed.json'}, speed.md, speed.png")


def add_parser(bench_subparsers) -> None:
    """Register `matvit bench speed` under the `bench` subcommand's subparsers."""
    q = bench_subparsers.add_parser(
        "speed", help="ratios timed side by side: nested vs plain ViT, latency vs FLOPs per submodel, build-index vs "
                      "forward, joint training vs baselines")
    q.add_argument("--preset", action="append", choices=list(PRESETS),
                   help="a preset timed with seeded random weights (repeat for several)")
    q.add_argument("--checkpoint", type=Path, help="a trained MatViT checkpoint directory to time as well")
    q.add_argument("--out", type=Path, required=True,
                   help="results directory (speed.json, speed.md, speed.png, steps/)")
    q.add_argument("--dataset",
                   help="images for indexing and training (default: the checkpoint's, else fashion-mnist)")
    q.add_argument("--data-dir", type=Path)
    q.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, fixed for the whole run")
    q.add_argument("--batch", type=int, default=32, help="the batched size timed besides batch 1")
    q.add_argument("--repeats", type=int, default=7, help="repeats at batch 1 (each the median of interleaved runs)")
    q.add_argument("--repeats-batched", type=int, default=3, help="repeats at the batched size")
    q.add_argument("--mixes", type=int, default=3, help="Mix'n'Match specs timed besides S, M, L and XL")
    q.add_argument("--index-images", type=int, default=0,
                   help=f"images indexed (default: about {INDEX_SECONDS:.0f} s of XL forward)")
    q.add_argument("--index-batch", type=int, default=256)
    q.add_argument("--index-repeats", type=int, default=3)
    q.add_argument("--train-preset", action="append", choices=list(PRESETS),
                   help="preset whose joint training is timed against its baselines (default: the checkpoint's, else "
                        "matvit-small-fmnist); its dataset is loaded whole at the preset's size")
    q.add_argument("--train-images", type=int, default=4096, help="training images per timed epoch")
    q.add_argument("--train-batch", type=int, default=128)
    q.add_argument("--train-repeats", type=int, default=3)
    q.add_argument("--max-load", type=float, default=2.5,
                   help="wait before measuring while the 1-minute load average is above this (a minute at a time)")
    q.add_argument("--load-wait", type=float, default=1200.0, help="seconds to wait at most for the load to drop")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_speed)
