"""Speed as ratios measured side by side: nesting costs nothing, smaller is faster, indexing and training keep up.

    matvit bench speed --preset matvit-ti16 --preset matvit-s16 [--checkpoint DIR] --out docs/results/speed

Absolute times on a shared CPU are noise; a ratio of two models timed in the same run, interleaved repeat
by repeat, is not. Every figure here is such a ratio (the absolute milliseconds are recorded beside it).
For each model (a preset with seeded random weights, or a trained checkpoint):

Any model family behind `matvit.nested` (MatViT, MatMamba):

1. Nesting costs nothing: embedding throughput of the nested model at XL, and of each extracted submodel
   (`extract`), against a plain model built directly with the same widths (`plain`: timm's ViT, `MambaVision`);
   the nested model at the smaller specs is shown too. Target >= 0.97, batch 1 and batch B.
2. Smaller is really faster: latency(spec) / latency(XL) against GFLOPs(spec) / GFLOPs(XL) (the embedding
   path, `forward_flops`) for S, M, L and Mix'n'Match specs of the monotone family, for the
   extracted models (what the retriever encodes with) and the nested model (`model.embed(x, spec)`).
   Target: within 15% of the FLOP ratio at batch B, 25% at batch 1. A least-squares fit
   ms = fixed + slope x GFLOPs over the specs says how much of a forward does not shrink with the nested width.
3. Indexing: `retrieval.build.build` images/s on the first N images of a dataset against the pure XL
   forward (the extracted XL ViT on the same images, already converted to float, same batch size); >= 0.9.
4. Training: a `matvit.train.Trainer` epoch over the first N training images, the nested model (all granularities
   jointly, "joint") against the sum of the four per-width baselines' epochs; <= 1.0.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from matvit import data, provenance
from matvit.config import GRANULARITY_NAMES
from matvit.errors import UserError
from matvit.images import to_input
from matvit.registry import PRESETS, get_preset

from . import steps
from .speed_models import (
    Call,
    Subject,
    first_images,
    fit,
    nested_call,
    plain_call,
    subjects,
    timed_specs,
    tokens,
)
from .speed_report import findings, markdown, plot, targets

MIN_SAMPLE_SECONDS = 0.2  # a model is called as often in a row as takes about this long (each call timed)
MAX_CALLS = 50
INDEX_SECONDS = 8.0  # default indexing size: about this many seconds of XL forward
INDEX_LIMITS = (64, 8192)
JOINT = "joint"  # the training row of the nested model (all granularities at once), beside the baselines S .. XL
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
        start, row = time.perf_counter(), {"settings": settings, **self._begin()}
        extracted = {x.id: s.model.extract(x) for x in spec_list}
        torch.manual_seed(o.seed + 1)
        plain = {x.id: s.model.plain(x) for x in spec_list}
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
                    # throughput against the plain model of the same widths = its time over ours
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
        row.update({"model": s.name, "family": s.model.label, "weights": s.weights, "fingerprint": s.fingerprint,
                    "preset": s.preset, "config": cfg.to_dict(), "tokens": tokens(cfg),
                    "nested_width": {"field": cfg.width_field, "xl": max(s.model.granularities.values())},
                    "nested_share_of_flops": round(s.model.nested_share(), 4),
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
                name = JOINT if g is None else g
                t = Trainer(TrainOptions(preset=preset, dataset=dataset, out=scratch / name, data_dir=o.data_dir,
                                         epochs=1, batch_size=o.train_batch, dense_epochs=0, baseline=g, seed=o.seed))
                full = t.train_set.set
                t.train_set = InMemory(data.ImageSet(full.images[:o.train_images], full.labels[:o.train_images],
                                                     full.classes, full.sources[:o.train_images]))
                trainers[name] = t
            steps = len(trainers[JOINT].train_set) // o.train_batch
            for t in trainers.values():  # warm-up: two steps each
                t.steps_per_epoch = min(2, steps)
                t.train_epoch()
                t.steps_per_epoch = steps
            self.log(f"[train-{preset}] joint and four baselines, {steps} steps each x {o.train_repeats} repeats")
            samples = interleaved({k: t.train_epoch for k, t in trainers.items()}, o.train_repeats, warmup=0)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        epoch = {k: statistics.median(v) for k, v in samples.items()}
        together = sum(v for k, v in epoch.items() if k != JOINT)
        row.update({"preset": preset, "family": trainers[JOINT].model.label, "dataset": dataset,
                    "images": steps * o.train_batch, "batch": o.train_batch, "steps_per_epoch": steps,
                    "mode": trainers[JOINT].opts.mode,
                    "epoch_s": {k: round(v, 3) for k, v in epoch.items()},
                    "baselines_sum_s": round(together, 3), "ratio": round(epoch[JOINT] / together, 4),
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
        o = self.opts
        subject_list = list(subjects(o.presets, o.checkpoint, o.dataset, o.seed))
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
        "speed", help="ratios timed side by side: nested vs plain model, latency vs FLOPs per submodel, build-index vs "
                      "forward, joint training vs baselines")
    q.add_argument("--preset", action="append", choices=list(PRESETS),
                   help="a preset timed with seeded random weights (repeat for several)")
    q.add_argument("--checkpoint", type=Path, help="a trained checkpoint directory (any family) to time as well")
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
