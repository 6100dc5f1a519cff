"""What the speed benchmark (`speed`) times: the models (presets with seeded weights, or a trained checkpoint), the
specs, the embedding path called on them, and the images indexed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from matvit import data
from matvit import spec as specs
from matvit.config import GRANULARITY_NAMES
from matvit.nested import Embedding, NestedModel
from matvit.registry import create, get_preset
from matvit.spec import Submodel

Call = Callable[[], object]


@dataclass
class Subject:
    """A model whose speed is measured: a preset with seeded random weights, or a trained checkpoint."""

    name: str
    model: NestedModel
    weights: str  # "random (seed N)" or the checkpoint path
    fingerprint: str
    dataset: str  # images for indexing
    preset: str | None  # the preset it was built from (a checkpoint's config says)

    @property
    def config(self):
        return self.model.config

    @property
    def slug(self) -> str:
        return self.name.replace(":", "-").replace("/", "_").strip("_.")


def subjects(presets: tuple[str, ...], checkpoint_dir: Path | None, dataset: str | None,
             seed: int) -> Iterator[Subject]:
    """Each preset with weights of `seed`, then the trained checkpoint; `dataset` (default: the checkpoint's, else
    fashion-mnist) gives the images for indexing."""
    from matvit import checkpoint

    for name in presets:
        torch.manual_seed(seed)
        model = create(get_preset(name).model).eval()
        yield Subject(name, model, f"random (seed {seed})", checkpoint.fingerprint(model),
                      dataset or "fashion-mnist", name)
    if checkpoint_dir is not None:
        model, meta = checkpoint.load(checkpoint_dir)
        yield Subject(f"checkpoint:{checkpoint_dir}", model, str(checkpoint_dir), checkpoint.fingerprint(model),
                      dataset or meta.get("dataset") or "fashion-mnist", meta.get("preset"))


def mixes(model: NestedModel, n: int) -> list[Submodel]:
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


def timed_specs(model: NestedModel, n_mixes: int) -> list[Submodel]:
    """S, M, L, the Mix'n'Match specs, XL: cheapest first."""
    named = [model.spec(g) for g in GRANULARITY_NAMES if g in model.granularities]
    return sorted(named[:-1] + mixes(model, n_mixes), key=model.forward_flops) + named[-1:]


def plain_call(embedding: Embedding, x: torch.Tensor) -> Call:
    return lambda: embedding(x)


def nested_call(model: NestedModel, spec: Submodel, x: torch.Tensor) -> Call:
    return lambda: model.embed(x, spec)


def tokens(config) -> int:
    return (config.img_size // config.patch_size) ** 2 + 1


def fit(points: list[tuple[float, float]]) -> dict:
    """Least squares ms = fixed + slope * GFLOPs."""
    x, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    slope, fixed = np.polyfit(x, y, 1) if len(points) > 1 else (y[0] / x[0], 0.0)
    return {"fixed_ms": round(float(fixed), 4), "ms_per_gflop": round(float(slope), 4)}


NATIVE = {"digits": (8, 1), "fashion-mnist": (28, 1)}


def first_images(dataset: str, split: str, n: int, config, data_dir: Path | None) -> data.ImageSet:
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
