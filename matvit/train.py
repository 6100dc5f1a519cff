"""Joint training of all granularities (MatFormer Sec. 3.2), baselines, resume, and the final evaluation.

`sum` mode: every granularity sees the same batch, each loss gets its own backward (gradients
accumulate, activation memory stays that of one forward) and one optimizer step follows.
`sample` mode: one granularity per step, drawn with the given probabilities.
Distillation: every pass but the largest granularity also learns from the largest's output on the batch.

Runs on any device and precision, alone or as one of torchrun's processes (`runtime`): the batch size is the
global batch, split evenly across processes; only the main process logs, writes and evaluates.
"""

from __future__ import annotations

import dataclasses
import itertools
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
from safetensors.torch import load_file
from tqdm import tqdm

from . import checkpoint, metrics, provenance, sources
from . import spec as specs
from .config import AUGMENTATIONS, DISTILLATIONS, HEADS, TrainRecipe
from .errors import UserError, make_dir
from .images import to_input
from .nested import NestedModel, normalise
from .registry import create, get_preset
from .runtime import Runtime
from .spec import Submodel

RECIPE_OVERRIDES = ("epochs", "batch_size", "lr", "augment", "dense_epochs", "embed_dims")  # replace a preset's


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
    augment: str | None = None  # one of AUGMENTATIONS
    dense_epochs: int | None = None  # 0 turns a preset's dense warm-up off
    embed_dims: list[int] | None = None  # Matryoshka prefix lengths; [] turns a preset's off
    mode: str = "sum"  # sum | sample
    weights: list[float] | None = None  # per granularity, smallest first
    distill: str = "none"  # none | logits | embedding | relational | both (logits and embedding)
    mixnmatch_prob: float = 0.0
    baseline: str | None = None  # train a plain ViT with this granularity's FFN width
    head: str | None = None  # one of HEADS; None is the preset's (linear)
    init: str | None = None  # start from these weights (a MatViT safetensors file of the same shape)
    seed: int = 0
    recipe: TrainRecipe = field(init=False)

    def __post_init__(self) -> None:
        preset = get_preset(self.preset)
        overrides = {k: v for k in RECIPE_OVERRIDES if (v := getattr(self, k)) is not None}
        self.recipe = dataclasses.replace(preset.recipe, **overrides)
        if self.recipe.dense_epochs is not None and self.recipe.dense_epochs < 0:
            raise UserError("--dense-epochs must be 0 (no dense warm-up) or more")
        # A baseline is the plain ViT itself; given starting weights replace the preset's warm-up.
        if not self.recipe.dense_epochs or self.baseline is not None or (self.init and self.dense_epochs is None):
            self.recipe.dense_epochs = None
        elif self.init is not None:
            raise UserError("--init and a dense warm-up both set the starting weights: drop --init or pass "
                            "--dense-epochs 0")
        self.recipe.embed_dims = self._embed_dims(preset.model.embed_dim)
        if self.recipe.augment not in AUGMENTATIONS:
            raise UserError(f"unknown augmentation {self.recipe.augment!r}; use one of {', '.join(AUGMENTATIONS)}")
        if self.mode not in ("sum", "sample"):
            raise UserError(f"unknown mode {self.mode!r}; use sum or sample")
        if self.distill not in DISTILLATIONS:
            raise UserError(f"unknown distillation {self.distill!r}; use one of {', '.join(DISTILLATIONS)}")
        if self.head is not None and self.head not in HEADS:
            raise UserError(f"unknown head {self.head!r}; use one of {', '.join(HEADS)}")
        if not 0.0 <= self.mixnmatch_prob <= 1.0:
            raise UserError("--mixnmatch-prob must be between 0 and 1")
        names = list(preset.model.granularities)
        if self.weights is not None and len(self.weights) != len(names):
            raise UserError(f"--weights needs {len(names)} values ({', '.join(names)})")

    def _embed_dims(self, length: int) -> list[int] | None:
        """The recipe's Matryoshka dims, checked, sorted and ending with the full `length`; None for the full
        length only."""
        dims = self.recipe.embed_dims or []
        if any(not 1 <= d <= length for d in dims):
            raise UserError(f"--embed-dims must lie between 1 and the embedding's length ({length}), or be none")
        dims = sorted({*dims, length})
        return dims if len(dims) > 1 else None

    def model_config(self, num_classes: int):
        """The preset's model config for `num_classes` classes (the baseline's, for a baseline)."""
        cfg = get_preset(self.preset).model
        cfg.num_classes = num_classes
        cfg.head = self.head or cfg.head
        cfg.embed_dims = self.recipe.embed_dims
        if self.baseline is not None:
            if self.baseline not in cfg.granularities:
                raise UserError(f"unknown baseline {self.baseline!r}; use one of {', '.join(cfg.granularities)}")
            cfg = cfg.baseline(self.baseline)
        return cfg

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["out"], d["data_dir"] = str(self.out), self.data_dir and str(self.data_dir)
        d["recipe"] = dataclasses.asdict(self.recipe)
        d["dense_epochs"] = self.recipe.dense_epochs  # what ran: None for none, however it was turned off
        return d


def option_differences(saved: dict, given: dict) -> list[str]:
    """`name (saved X, given Y)` for every option (`TrainOptions.to_dict()`, `out` aside) that differs. The
    recipe is compared as it ran (`recipe.<field>`), not how it was asked for: `--epochs 10` matches a run that
    took 10 epochs from its preset."""
    def flat(options: dict) -> dict:
        top = {k: v for k, v in options.items() if k not in ("out", "recipe", *RECIPE_OVERRIDES)}
        recipe = {f"recipe.{k}": v for k, v in options.get("recipe", {}).items()}
        # runs recorded before 1ebded7 wrote 0 for no warm-up, and before that no recipe field at all
        warm_up = recipe["recipe.dense_epochs"] if "recipe.dense_epochs" in recipe else options.get("dense_epochs")
        recipe["recipe.dense_epochs"] = warm_up or None
        return top | recipe

    a, b = flat(saved), flat(given)
    return [f"{k} (saved {a.get(k)!r}, given {b.get(k)!r})" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def finished_run(run: Path, opts: TrainOptions) -> bool:
    """True when `run` is a finished training with exactly these options (every one but `out`)."""
    try:
        train = json.loads((Path(run) / "config.json").read_text())["train"]
        finished = (Path(run) / "eval.json").is_file()
        log_epochs = len((Path(run) / "train_log.jsonl").read_text().splitlines())
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return False
    same = not option_differences(train, json.loads(json.dumps(opts.to_dict())))  # as JSON gives it back
    return finished and same and log_epochs == opts.recipe.epochs


def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """How far the student's similarities to the teacher's embeddings of the batch are from the teacher's own:
    what a query of the student against an index of the teacher sees. Mean squared error over the batch's
    cosine-similarity matrix (summed over each row instead, it outweighs the classification loss and training
    collapses)."""
    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    return F.mse_loss(s @ t.T, t @ t.T)


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


class FeaturesAndLogits(torch.nn.Module):
    """`NestedModel.features_and_logits` as a module's forward, so that DDP and torch.compile see every pass, with
    the logits of each shorter Matryoshka prefix of the embedding (`NestedModel.dims`) after them."""

    def __init__(self, model: NestedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, spec: Submodel) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        feats, logits = self.model.features_and_logits(x, spec)
        return feats, logits, [self.model.classify(feats, d) for d in self.model.dims[:-1]]


class Trainer:
    """One training run writing `model.safetensors`, `config.json`, `train_log.jsonl`, `eval.json`, and the
    training checkpoint it resumes from (`checkpoint.TRAINING_FILE`). `workers` processes decode streamed data;
    `in_memory` decodes a `folder:` dataset whole instead; `init` (default: `opts.init`) holds the starting weights."""

    def __init__(self, opts: TrainOptions, runtime: Runtime | None = None, workers: int = 2,
                 in_memory: bool = False, init: Path | None = None) -> None:
        self.opts, self.recipe, self.out = opts, opts.recipe, Path(opts.out)
        self.runtime = runtime or Runtime(torch.device("cpu"))
        self.workers = workers
        size_cfg = get_preset(opts.preset).model
        load = lambda split: sources.open_source(opts.dataset, split, size_cfg.img_size, size_cfg.in_chans,  # noqa: E731
                                                 opts.data_dir, in_memory)
        self.train_set, self.test_set = load("train"), load("test")
        world = self.runtime.world
        if self.recipe.batch_size % world:
            raise UserError(f"the batch size {self.recipe.batch_size} does not split evenly across {world} processes")
        self.steps_per_epoch = len(self.train_set) // self.recipe.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{opts.dataset} has {len(self.train_set)} training images, fewer than one batch of "
                            f"{self.recipe.batch_size}: lower --batch-size")
        torch.manual_seed(opts.seed)
        self.model = create(opts.model_config(len(self.train_set.classes)))
        init = init or (opts.init and Path(opts.init))
        if init and self.runtime.main:  # DDP starts every process from the main process's weights
            self._load_init(init)
        self.granularities = list(self.model.config.granularities)
        self.weights = dict(zip(self.granularities, opts.weights or [1.0] * len(self.granularities), strict=True))
        self.step_module = self.runtime.wrap(FeaturesAndLogits(self.model))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.recipe.lr,
                                           weight_decay=self.recipe.weight_decay)
        self.scaler = self.runtime.grad_scaler()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            self.steps_per_epoch * self.recipe.epochs, max(1, int(self.steps_per_epoch * self.recipe.warmup_epochs))))
        self.epoch = 0
        self.seconds = 0.0
        self.provenance = provenance.record()  # the code and command that start the run

    def _load_init(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(f"no initial weights at {path}")
        try:
            self.model.load_state_dict(load_file(path), strict=True)
        except RuntimeError as e:
            raise UserError(f"{path} does not fit --preset {self.opts.preset}: {str(e).splitlines()[0]}") from e

    # --- persistence -------------------------------------------------------------------------
    def save(self) -> None:
        """Write the training checkpoint (one atomic file with everything a resume needs), then the published
        checkpoint (`model.safetensors` + `config.json`); the main process writes, the others wait. Only torch's
        global RNG needs saving: an epoch's Python draws come from a `random.Random` seeded by the seed and
        the epoch, and numpy draws nothing."""
        if self.runtime.main:
            checkpoint.save_training(self.out, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": {"torch": torch.get_rng_state()},
                "epoch": self.epoch, "seconds": self.seconds, "options": self.opts.to_dict(),
            })
            checkpoint.save(self.model, self.out, classes=self.train_set.classes, dataset=self.opts.dataset,
                            preset=self.opts.preset, baseline=self.opts.baseline, train=self.opts.to_dict())
        self.runtime.barrier()

    def restore(self) -> bool:
        """Continue from the training checkpoint in `out` (False when there is none); a checkpoint saved with
        other options is refused. The main process reads it and sends it to the others."""
        state = self.runtime.broadcast(checkpoint.load_training(self.out) if self.runtime.main else None)
        if state is None:
            return False
        if differences := option_differences(state["options"], self.opts.to_dict()):
            raise UserError(f"cannot resume {self.out}: its run had other options: {'; '.join(differences)}")
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.epoch, self.seconds = state["epoch"], state["seconds"]
        if self.runtime.main:
            log = self.out / "train_log.jsonl"
            lines = log.read_text().splitlines()[: self.epoch] if log.exists() else []
            log.write_text("".join(line + "\n" for line in lines))
        return True

    # --- training ----------------------------------------------------------------------------
    def _loss(self, x, y, spec, teacher):
        with self.runtime.autocast():
            feats, logits, prefixes = self.step_module(x, spec)
            # Matryoshka: the full embedding's loss plus each shorter prefix's, all weighted 1 (as MRL's default)
            loss = sum(F.cross_entropy(out, y, label_smoothing=self.recipe.label_smoothing)
                       for out in [logits, *prefixes])
            if teacher is not None and self.opts.distill in ("logits", "both"):
                loss = loss + F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher[1], -1),
                                       log_target=True, reduction="batchmean")
            if teacher is not None and self.opts.distill in ("embedding", "both"):
                loss = loss + (1 - F.cosine_similarity(feats, teacher[0], dim=-1)).mean()
            if teacher is not None and self.opts.distill == "relational":
                loss = loss + relational_loss(feats, teacher[0])
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
        logits, detached. Across processes, only the last backward all-reduces (the others run in `no_sync`),
        so a step costs one all-reduce whatever the number of passes. The distillation teacher is the largest
        granularity's pass when it ran first, else a forward of the largest granularity without gradients."""
        largest = self.granularities[-1]
        self.optimizer.zero_grad(set_to_none=True)
        teacher, results = None, []
        for i, p in enumerate(plan):
            student = p.granularity != largest
            if student and teacher is None and self.opts.distill != "none":
                with torch.no_grad(), self.runtime.autocast():
                    teacher = self.step_module(x, specs.uniform(largest, self.model.config))[:2]
            with self.runtime.no_sync(self.step_module, skip=i < len(plan) - 1):
                loss, feats, logits = self._loss(x, labels, p.spec, teacher if student else None)
                self.scaler.scale(p.weight * loss).backward()
            if not student:
                teacher = (feats.detach(), logits.detach())
            results.append((loss.detach().float(), logits.detach().float()))
        return results

    def train_epoch(self) -> dict:
        rt = self.runtime
        rng_seed = self.opts.seed * 1000 + self.epoch
        torch.manual_seed(rng_seed + 100_003 * rt.rank)  # augmentation differs across processes
        rng = random.Random(rng_seed)  # the passes do not: every process runs the same plan
        loader = self.train_set.loader(self.recipe.batch_size // rt.world, epoch=self.epoch, seed=self.opts.seed,
                                       shuffle=True, drop_last=True, rank=rt.rank, world=rt.world,
                                       workers=self.workers)
        sums = torch.zeros(len(self.granularities), 3, dtype=torch.float64)  # loss sum, correct, seen
        self.model.train()
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{self.recipe.epochs}", unit="batch", leave=False,
                   total=self.steps_per_epoch, disable=not rt.main or None)
        for images, labels in itertools.islice(bar, self.steps_per_epoch):
            if len(labels) == 0:  # every streamed image of the batch was unreadable
                continue
            plan = self.passes(rng)
            x = to_input(augment(images, self.recipe.augment)).to(rt.device, non_blocking=True)
            y = labels.to(rt.device, non_blocking=True)
            results = self.accumulate(x, y, plan)
            for p, (loss, logits) in zip(plan, results, strict=True):
                if p.granularity is not None:
                    row = sums[self.granularities.index(p.granularity)]
                    row += torch.tensor([loss.item() * len(y), int((logits.argmax(1) == y).sum()), len(y)])
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            bar.set_postfix(loss=f"{results[-1][0].item():.3f}")
        sums = rt.all_sum(sums)
        seen = {g: s.tolist() for g, s in zip(self.granularities, sums, strict=True) if s[2]}
        return {"loss": {g: s[0] / s[2] for g, s in seen.items()}, "acc": {g: s[1] / s[2] for g, s in seen.items()}}

    def run(self, resume: bool = False, log=print) -> dict | None:
        """Train (from the last finished epoch when `resume`), then evaluate; returns eval.json's dict on the
        main process and None on the others, which leave the group once training ends."""
        rt = self.runtime
        log = log if rt.main else (lambda s: None)
        if rt.main:
            make_dir(self.out)
        rt.barrier()
        if resume and self.restore():
            log(f"resuming {self.out} after epoch {self.epoch}/{self.recipe.epochs}")
        else:
            if resume:
                log(f"no training checkpoint in {self.out}; starting from the first epoch")
            if rt.main:
                (self.out / "train_log.jsonl").unlink(missing_ok=True)
        first = self.epoch
        while self.epoch < self.recipe.epochs:
            start = time.perf_counter()
            stats = self.train_epoch()
            self.seconds += time.perf_counter() - start
            self.epoch += 1
            if rt.main:
                line = {"epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0], "seconds": round(self.seconds, 1),
                        "processes": rt.world, **stats}
                with open(self.out / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")
            self.save()
            log(" ".join([f"epoch {self.epoch}/{self.recipe.epochs}"] + [
                f"{g}: loss {stats['loss'][g]:.3f} acc {stats['acc'][g]:.3f}" for g in stats["loss"]]))
        if self.epoch == first:  # nothing trained here (no epochs, or a finished run resumed): publish it as is
            self.save()
        if not rt.main:
            return None
        with rt.autocast():
            result = evaluate_checkpoint(self.model, self.train_set, self.test_set, rt.device, self.workers)
        result["train_seconds"] = round(self.seconds, 1)
        result.update(device=str(rt.device), precision=rt.precision, processes=rt.world, **self.provenance)
        (self.out / "eval.json").write_text(json.dumps(result, indent=2))
        return result


@torch.inference_mode()
def embed_source(model: NestedModel, source: sources.Source, spec: Submodel, device: torch.device | str = "cpu",
                 workers: int = 0, batch_size: int = 256,
                 desc: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings (L2-normalised), logits and labels of every image of `source`, in order, streamed."""
    emb, logits, labels = [], [], []
    for images, y in tqdm(source.loader(batch_size, workers=workers), desc=desc, unit="batch", leave=False,
                          disable=desc is None or None):
        if len(y):
            feats, out = model.features_and_logits(to_input(images).to(device), spec)
            emb.append(normalise(feats.float()).cpu().numpy())
            logits.append(out.float().cpu().numpy())
            labels.append(y.numpy())
    if not emb:
        raise UserError("no readable images to evaluate")
    return np.concatenate(emb), np.concatenate(logits), np.concatenate(labels)


def evaluate_checkpoint(model: NestedModel, train_set: sources.Source, test_set: sources.Source,
                        device: torch.device | str = "cpu", workers: int = 0) -> dict:
    """Top-1 on the test split and 1-NN with the train split as gallery, per trained granularity."""
    model.eval()
    result: dict = {"top1": {}, "knn1": {}}
    for g in model.granularities:
        spec = model.spec(g)
        gallery, _, gallery_labels = embed_source(model, train_set, spec, device, workers, desc=f"gallery {g}")
        queries, logits, query_labels = embed_source(model, test_set, spec, device, workers, desc=f"queries {g}")
        result["top1"][g] = metrics.top1(logits, query_labels)
        result["knn1"][g] = metrics.knn1(gallery, gallery_labels, queries, query_labels)
    return result
