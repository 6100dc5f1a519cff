"""The training a preset's recipe runs: a dense warm-up when it has one, then the joint training.

The warm-up trains a plain ViT of the XL width (`dense_epochs` epochs), orders its FFN neurons by weight
(`matvit.induce`) and starts the joint training from there; without one, the joint training starts from scratch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import checkpoint
from .errors import UserError
from .induce import INDUCED_FILE, orders_of, reorder, weight_scores
from .model import MatViTConfig
from .registry import get_preset
from .runtime import Runtime
from .train import Trainer, TrainOptions, finished_run


def dense_options(opts: TrainOptions) -> TrainOptions:
    """The dense warm-up's training for a recipe with `dense_epochs`: a plain ViT of the XL width in OUT/dense."""
    return dataclasses.replace(opts, out=Path(opts.out) / "dense", epochs=opts.recipe.dense_epochs, dense_epochs=0,
                               baseline="XL", mode="sum", weights=None, distill="none", mixnmatch_prob=0.0)


def train(opts: TrainOptions, runtime: Runtime | None = None, workers: int = 2, in_memory: bool = False,
          resume: bool = False, log=print) -> dict | None:
    """`Trainer(opts).run`, after a dense warm-up when the recipe has one (`dense_epochs`): a plain ViT of the XL
    width trained for that many epochs in OUT/dense (reused when `resume` finds it finished), its FFN neurons
    ordered by `weight` into OUT/induced.safetensors, then the joint training from those weights. eval.json's
    `train_seconds` counts both trainings."""
    epochs = opts.recipe.dense_epochs
    if not epochs:
        return Trainer(opts, runtime, workers, in_memory).run(resume=resume, log=log)
    if not isinstance(get_preset(opts.preset).model, MatViTConfig):
        raise UserError(f"--dense-epochs: the dense warm-up orders a ViT's FFN neurons, and --preset {opts.preset} "
                        "is not a MatViT; pass --dense-epochs 0")
    rt = runtime or Runtime(torch.device("cpu"))
    out = Path(opts.out)
    dense = dense_options(opts)
    if resume and finished_run(dense.out, dense):
        log(f"reusing the finished dense warm-up in {dense.out}")
    else:
        log(f"dense warm-up: a plain ViT of the XL width for {epochs} epochs in {dense.out}")
        Trainer(dense, rt, workers, in_memory).run(resume=resume, log=log)
    init = out / INDUCED_FILE
    if rt.main:
        model, _ = checkpoint.load(dense.out)
        reorder(model, orders_of(weight_scores(model)))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, init)
    rt.barrier()
    result = Trainer(opts, rt, workers, in_memory, init=init).run(resume=resume, log=log)
    if result is not None:
        seconds = json.loads((dense.out / "eval.json").read_text())["train_seconds"]
        result["dense_warmup"] = {"run": str(dense.out), "epochs": epochs, "train_seconds": seconds}
        result["train_seconds"] = round(result["train_seconds"] + seconds, 1)
        (out / "eval.json").write_text(json.dumps(result, indent=2))
    return result
