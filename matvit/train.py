"""Joint training of all granularities (MatFormer Sec. 3.2), baselines, resume, and the final evaluation.

`sum` mode: every granularity sees the same batch, each loss gets its own backward (gradients
accumulate, activation memory stays that of one forward) and one optimizer step follows.
`sample` mode: one granularity per step, drawn with the given probabilities.
Distillation: every pass but the largest granularity also learns from the largest's output on the batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint, data, metrics, provenance
from . import spec as specs
from .config import MatViTConfig, TrainRecipe, get_preset
from .errors import UserError
from .images import to_input
from .model import MatViT
from .spec import Submodel


@dataclass
class TrainOptions:
    """Everything `matvit train` takes; recipe fields left None come from the preset."""

    preset: str
    dataset: str
    out: Path
    data_dir: Path | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    mode: str = "sum"  # sum | sample
    weights: list[float] | None = None  # per granularity, smallest first
    distill: str = "none"  # none | logits | embedding | both
    mixnmatch_prob: float = 0.0
    baseline: str | None = None  # train a plain ViT with this granularity's FFN width
    seed: int = 0
    recipe: TrainRecipe = field(init=False)

    def __post_init__(self) -> None:
        preset = get_preset(self.preset)
        overrides = {k: v for k in ("epochs", "batch_size", "lr") if (v := getattr(self, k)) is not None}
        self.recipe = dataclasses.replace(preset.recipe, **overrides)
        if self.mode not in ("sum", "sample"):
            raise UserError(f"unknown mode {self.mode!r}; use sum or sample")
        if self.distill not in ("none", "logits", "embedding", "both"):
            raise UserError(f"unknown distillation {self.distill!r}; use none, logits, embedding or both")
        if not 0.0 <= self.mixnmatch_prob <= 1.0:
            raise UserError("--mixnmatch-prob must be between 0 and 1")

    def model_config(self, num_classes: int) -> MatViTConfig:
        cfg = get_preset(self.preset).model
        cfg.num_classes = num_classes
        if self.baseline is not None:
            if self.baseline not in cfg.granularities:
                raise UserError(f"unknown baseline {self.baseline!r}; use one of {', '.join(cfg.granularities)}")
            width = cfg.granularities[self.baseline]
            cfg = dataclasses.replace(cfg, mlp_hidden=width, granularities={self.baseline: width})
        return cfg

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["out"], d["data_dir"] = str(self.out), self.data_dir and str(self.data_dir)
        d["recipe"] = dataclasses.asdict(self.recipe)
        return d


def option_differences(saved: dict, given: dict) -> list[str]:
    """`name (saved X, given Y)` for every option (`TrainOptions.to_dict()`, `out` aside) that differs; a recipe
    field is named `recipe.<field>` unless the option of the same name already differs."""
    def flat(options: dict) -> dict:
        top = {k: v for k, v in options.items() if k not in ("out", "recipe")}
        return top | {f"recipe.{k}": v for k, v in options.get("recipe", {}).items()}

    a, b = flat(saved), flat(given)
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return [f"{k} (saved {a.get(k)!r}, given {b.get(k)!r})" for k in keys
            if not (k.startswith("recipe.") and k.removeprefix("recipe.") in keys)]


class Pass(NamedTuple):
    """One forward and backward of a training step: a granularity (None for a Mix'n'Match submodel), its spec,
    and the weight of its loss."""

    granularity: str | None
    spec: Submodel
    weight: float


def augment(images: torch.Tensor, kind: str) -> torch.Tensor:
    """Per image: `crop` pads by size/8 and crops back at a random offset; `crop-flip` also flips
    half of the images left-right; `none` leaves them as they are."""
    if kind == "none":
        return images
    n, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n)).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if kind.endswith("-flip"):
        flip = torch.rand(n) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


class Trainer:
    """One training run writing `model.safetensors`, `config.json`, `train_log.jsonl`, `eval.json`, and the
    training checkpoint it resumes from (`checkpoint.TRAINING_FILE`)."""

    def __init__(self, opts: TrainOptions) -> None:
        self.opts, self.recipe, self.out = opts, opts.recipe, Path(opts.out)
        size_cfg = get_preset(opts.preset).model
        load = lambda split: data.load(opts.dataset, split, size_cfg.img_size, size_cfg.in_chans, opts.data_dir)  # noqa: E731
        self.train_set, self.test_set = load("train"), load("test")
        self.train_set = self._labelled(self.train_set)
        self.test_set = self._labelled(self.test_set)
        torch.manual_seed(opts.seed)
        self.model = MatViT(opts.model_config(len(self.train_set.classes)))
        self.granularities = list(self.model.config.granularities)
        weights = opts.weights or [1.0] * len(self.granularities)
        if len(weights) != len(self.granularities):
            raise UserError(f"--weights needs {len(self.granularities)} values ({', '.join(self.granularities)})")
        self.weights = dict(zip(self.granularities, weights, strict=True))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.recipe.lr,
                                           weight_decay=self.recipe.weight_decay)
        steps_per_epoch = math.ceil(len(self.train_set) / self.recipe.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            steps_per_epoch * self.recipe.epochs, max(1, int(steps_per_epoch * self.recipe.warmup_epochs))))
        self.epoch = 0
        self.seconds = 0.0
        self.provenance = provenance.record()  # the code and command that start the run

    @staticmethod
    def _labelled(ds: data.ImageSet) -> data.ImageSet:
        keep = ds.labels >= 0
        if not keep.all():
            ds = data.ImageSet(ds.images[keep], ds.labels[keep], ds.classes,
                               [s for s, k in zip(ds.sources, keep.tolist(), strict=True) if k], ds.skipped)
        if len(ds) == 0:
            raise data.DatasetError("no labelled images: put each class's images in a sub-folder of its own")
        return ds

    # --- persistence -------------------------------------------------------------------------
    def save(self) -> None:
        """Write the training checkpoint (one atomic file with everything a resume needs), then the published
        checkpoint (`model.safetensors` + `config.json`). Only torch's global RNG needs saving: an epoch's
        Python draws come from a `random.Random` seeded by the seed and the epoch, and numpy draws nothing."""
        checkpoint.save_training(self.out, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": {"torch": torch.get_rng_state()},
            "epoch": self.epoch, "seconds": self.seconds, "options": self.opts.to_dict(),
        })
        checkpoint.save(self.model, self.out, classes=self.train_set.classes, dataset=self.opts.dataset,
                        preset=self.opts.preset, baseline=self.opts.baseline, train=self.opts.to_dict())

    def restore(self) -> bool:
        """Continue from the training checkpoint in `out` (False when there is none); a checkpoint saved with
        other options is refused."""
        state = checkpoint.load_training(self.out)
        if state is None:
            return False
        if differences := option_differences(state["options"], self.opts.to_dict()):
            raise UserError(f"cannot resume {self.out}: its run had other options: {'; '.join(differences)}")
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.epoch, self.seconds = state["epoch"], state["seconds"]
        log = self.out / "train_log.jsonl"
        lines = log.read_text().splitlines()[: self.epoch] if log.exists() else []
        log.write_text("".join(line + "\n" for line in lines))
        return True

    # --- training ----------------------------------------------------------------------------
    def _loss(self, x, y, spec, teacher):
        feats, logits = self.model.features_and_logits(x, spec)
        loss = F.cross_entropy(logits, y, label_smoothing=self.recipe.label_smoothing)
        if teacher is not None and self.opts.distill in ("logits", "both"):
            loss = loss + F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher[1], -1),
                                   log_target=True, reduction="batchmean")
        if teacher is not None and self.opts.distill in ("embedding", "both"):
            loss = loss + (1 - F.cosine_similarity(feats, teacher[0], dim=-1)).mean()
        return loss, feats, logits

    def passes(self, rng: random.Random) -> list[Pass]:
        """The passes of one optimizer step. `sum`: every granularity, largest first, each loss weighted by
        `--weights`; `sample`: one granularity drawn with the weights as probabilities. Then, with probability
        `--mixnmatch-prob`, a random monotone Mix'n'Match submodel weighted by the mean weight."""
        cfg = self.model.config
        if self.opts.mode == "sum":
            plan = [Pass(g, specs.uniform(g, cfg), self.weights[g]) for g in reversed(self.granularities)]
        else:
            g = rng.choices(self.granularities, weights=[self.weights[g] for g in self.granularities])[0]
            plan = [Pass(g, specs.uniform(g, cfg), 1.0)]
        if rng.random() < self.opts.mixnmatch_prob:
            plan.append(Pass(None, specs.random_monotone(cfg, rng), float(np.mean(list(self.weights.values())))))
        return plan

    def accumulate(self, x: torch.Tensor, labels: torch.Tensor,
                   plan: list[Pass]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zero the gradients, then forward and backward every pass of `plan`; returns each pass's loss and
        logits, detached. The distillation teacher is the largest granularity's pass when it ran first, else
        a forward of the largest granularity without gradients."""
        largest = self.granularities[-1]
        self.optimizer.zero_grad(set_to_none=True)
        teacher, results = None, []
        for p in plan:
            student = p.granularity != largest
            if student and teacher is None and self.opts.distill != "none":
                with torch.no_grad():
                    teacher = self.model.features_and_logits(x, specs.uniform(largest, self.model.config))
            loss, feats, logits = self._loss(x, labels, p.spec, teacher if student else None)
            (p.weight * loss).backward()
            if not student:
                teacher = (feats.detach(), logits.detach())
            results.append((loss.detach(), logits.detach()))
        return results

    def train_epoch(self) -> dict:
        rng_seed = self.opts.seed * 1000 + self.epoch
        torch.manual_seed(rng_seed)
        rng = random.Random(rng_seed)
        loader = DataLoader(self.train_set, batch_size=self.recipe.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(rng_seed))
        sums = {g: [0.0, 0, 0] for g in self.granularities}  # loss sum, correct, seen
        self.model.train()
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{self.recipe.epochs}", unit="batch", leave=False)
        for images, labels in bar:
            plan = self.passes(rng)
            results = self.accumulate(to_input(augment(images, self.recipe.augment)), labels, plan)
            for p, (loss, logits) in zip(plan, results, strict=True):
                if p.granularity is not None:
                    s = sums[p.granularity]
                    s[0] += loss.item() * len(labels)
                    s[1] += int((logits.argmax(1) == labels).sum())
                    s[2] += len(labels)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            bar.set_postfix(loss=f"{results[-1][0].item():.3f}")
        seen = {g: s for g, s in sums.items() if s[2]}
        return {"loss": {g: s[0] / s[2] for g, s in seen.items()}, "acc": {g: s[1] / s[2] for g, s in seen.items()}}

    def run(self, resume: bool = False, log=print) -> dict:
        """Train (from the last finished epoch when `resume`), then evaluate; returns eval.json's dict."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume and self.restore():
            log(f"resuming {self.out} after epoch {self.epoch}/{self.recipe.epochs}")
        else:
            if resume:
                log(f"no training checkpoint in {self.out}; starting from the first epoch")
            (self.out / "train_log.jsonl").unlink(missing_ok=True)
        first = self.epoch
        while self.epoch < self.recipe.epochs:
            start = time.perf_counter()
            stats = self.train_epoch()
            self.seconds += time.perf_counter() - start
            self.epoch += 1
            line = {"epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0], "seconds": round(self.seconds, 1),
                    **stats}
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            self.save()
            log(" ".join([f"epoch {self.epoch}/{self.recipe.epochs}"] + [
                f"{g}: loss {stats['loss'][g]:.3f} acc {stats['acc'][g]:.3f}" for g in stats["loss"]]))
        if self.epoch == first:  # nothing trained here (no epochs, or a finished run resumed): publish it as is
            self.save()
        result = evaluate_checkpoint(self.model, self.train_set, self.test_set)
        result["train_seconds"] = round(self.seconds, 1)
        result.update(self.provenance)
        (self.out / "eval.json").write_text(json.dumps(result, indent=2))
        return result


def evaluate_checkpoint(model: MatViT, train_set: data.ImageSet, test_set: data.ImageSet) -> dict:
    """Top-1 on the test split and 1-NN with the train split as gallery, per trained granularity."""
    model.eval()
    result: dict = {"top1": {}, "knn1": {}}
    for g in model.config.granularities:
        spec = specs.uniform(g, model.config)
        logits = metrics.run_batched(lambda x, s=spec: model(x, s), test_set.images, desc=f"top-1 {g}")
        result["top1"][g] = metrics.top1(logits, test_set.labels)
        emb = lambda x, s=spec: model.embed(x, s)  # noqa: E731
        gallery = metrics.run_batched(emb, train_set.images, desc=f"gallery {g}")
        queries = metrics.run_batched(emb, test_set.images, desc=f"queries {g}")
        result["knn1"][g] = metrics.knn1(gallery, train_set.labels, queries, test_set.labels)
    return result
