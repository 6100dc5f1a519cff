"""Inducing a MatViT from a plain (dense) timm ViT: order every FFN's neurons by importance, then train jointly.

A dense FFN's hidden neurons have no order, so its first h/8 neurons are an arbitrary eighth of it. Permuting the
neurons (fc1's rows and bias, fc2's columns) leaves the function unchanged; sorting them most important first makes
every prefix, the S, M and L granularities of MatFormer (Devvrit et al., 2023, https://arxiv.org/abs/2310.07707),
the best subset of its size by that score. Joint fine-tuning (`train.Trainer` started from the reordered weights)
then teaches the prefixes to work on their own.

Importance of hidden neuron j of a block's FFN:
- `weight`: ||fc1.weight[j, :]|| * ||fc2.weight[:, j]||, data-free.
- `taylor`: |sum over tokens of a_j * dL/da_j|, summed over the images of a few training batches, where a_j is the
  neuron's activation (after GELU) and L the XL cross-entropy: the first-order estimate of the change in loss when
  the neuron is removed (Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019). A
  classifier head re-initialised for the dataset's classes is fitted first (`fit_head`), so that the gradient is
  not that of a random head.
- `none`: keep the checkpoint's order (the ablation).

A dense warm-up (`matvit.warmup`, a recipe's `dense_epochs`) is the same with a plain ViT trained there first.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import provenance, sources
from .errors import UserError, make_dir
from .images import to_input
from .model import MatViT, MatViTConfig
from .registry import get_preset
from .runtime import Runtime
from .train import Trainer, TrainOptions, option_differences

IMPORTANCE = ("weight", "taylor", "none")
INDUCED_FILE = "induced.safetensors"
SUMMARY_FILE = "induce.json"
HEAD_STEPS = 200


class InduceError(UserError):
    """A checkpoint that cannot become a MatViT of the asked preset."""


@dataclass
class PlainViT:
    """A dense timm ViT's state dict, where it came from, and its head count when the origin says."""

    state: dict[str, torch.Tensor]
    origin: str
    num_heads: int | None = None


@dataclass
class InduceOptions:
    """Everything `matvit induce` takes; `epochs`, `batch_size` and `lr` left None come from the preset."""

    source: str  # a state-dict file, a checkpoint directory, or timm:NAME
    preset: str
    dataset: str
    out: Path
    data_dir: Path | None = None
    importance: str = "taylor"
    importance_batches: int = 16  # batches the taylor score (and a re-initialised head) sees
    epochs: int | None = 2
    batch_size: int | None = None
    lr: float | None = None
    embed_dims: list[int] | None = None  # Matryoshka prefix lengths of the joint fine-tuning; [] for none
    seed: int = 0

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE:
            raise UserError(f"unknown importance {self.importance!r}; use one of {', '.join(IMPORTANCE)}")
        if self.importance_batches < 1:
            raise UserError("--importance-batches must be at least 1")
        if self.epochs is not None and self.epochs < 0:
            raise UserError("--epochs must be 0 (reorder only) or more")
        if not isinstance(get_preset(self.preset).model, MatViTConfig):
            raise UserError(f"--preset {self.preset} is not a MatViT: induce makes a MatViT of a plain ViT")

    def train_options(self) -> TrainOptions:
        return TrainOptions(preset=self.preset, dataset=self.dataset, out=Path(self.out), data_dir=self.data_dir,
                            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, embed_dims=self.embed_dims,
                            init=str(Path(self.out) / INDUCED_FILE), seed=self.seed)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"], d["data_dir"] = str(self.out), self.data_dir and str(self.data_dir)
        return d


# --- reading a plain ViT -------------------------------------------------------------------------------
def read_state_dict(path: Path) -> PlainViT:
    """A state dict from a safetensors file, a torch file as timm writes them (possibly under `state_dict` or
    `model`), or a checkpoint directory holding `model.safetensors`."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise InduceError(f"no checkpoint file at {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip readers raise many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InduceError(f"cannot read {path} as safetensors or a torch state dict: {first}") from e
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise InduceError(f"{path} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return PlainViT(state, str(path), _heads_beside(path))


def _heads_beside(path: Path) -> int | None:
    """The head count from a `config.json` beside the weights: a matvit checkpoint's or a timm hub folder's."""
    try:
        config = json.loads((path.parent / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    heads = (config.get("model") or {}).get("num_heads") or (config.get("model_args") or {}).get("num_heads")
    return heads if isinstance(heads, int) else None


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_timm(name: str) -> PlainViT:
    """`timm.create_model(name, pretrained=True)`'s weights. They come from the Hugging Face hub, or from its local
    cache when HF_HUB_OFFLINE=1; with neither, a one-line error says what to do instead."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(name):
        raise InduceError(f"timm has no model named {name!r} (timm.list_models('vit_*') lists the ViTs)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    fallback = (f"save the weights where there is network (timm.create_model('{name}', pretrained=True), then "
                "safetensors.torch.save_file(model.state_dict(), 'vit.safetensors')) and pass --from vit.safetensors")
    if not offline and not _hub_reachable():
        raise InduceError(f"timm:{name} needs the Hugging Face hub, which cannot be reached from here "
                          f"(HF_HUB_OFFLINE=1 uses its local cache); {fallback}")
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would bury the one line that matters
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # network, cache and hub errors of several libraries
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InduceError(f"cannot load pretrained timm:{name}: {first[:200]}; {fallback}") from e
    finally:
        hub_log.setLevel(level)
    if not isinstance(model, VisionTransformer):
        raise InduceError(f"timm:{name} is a {type(model).__name__}, not a VisionTransformer")
    return PlainViT(model.state_dict(), f"timm:{name}", model.blocks[0].attn.num_heads)


def load_plain(source: str) -> PlainViT:
    """`timm:NAME` through timm's pretrained loading, anything else as a file or checkpoint directory."""
    if source.startswith("timm:"):
        return from_timm(source.removeprefix("timm:"))
    return read_state_dict(Path(source))


# --- fitting it to a preset ----------------------------------------------------------------------------
@dataclass
class Shape:
    embed_dim: int
    depth: int
    mlp_hidden: tuple[int, ...]
    in_chans: int | None  # None: an old linear patch embedding, reshaped by timm
    patch_size: int
    num_classes: int | None  # None: no classifier head


def shape_of(plain: PlainViT) -> Shape:
    s = plain.state
    for key in ("patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in s:
            raise InduceError(f"{plain.origin} is not a timm VisionTransformer state dict: it has no {key!r} "
                              f"(keys start {', '.join(list(s)[:4])})")
    depth = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"blocks\.(\d+)\.", k)))
    mlp = tuple(s[f"blocks.{i}.mlp.fc1.weight"].shape[0] if f"blocks.{i}.mlp.fc1.weight" in s else 0
                for i in range(depth))
    patch = s["patch_embed.proj.weight"]
    head = s.get("head.weight")
    return Shape(patch.shape[0], depth, mlp, patch.shape[1] if patch.ndim == 4 else None, patch.shape[-1],
                 None if head is None or head.ndim != 2 else head.shape[0])


def _describe(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def fit(plain: PlainViT, config: MatViTConfig, preset: str, log=print) -> tuple[MatViT, bool]:
    """A MatViT of `config` holding `plain`'s weights, and whether its classifier head was re-initialised (the class
    count differed or there was none). Another input channel count, image or patch size is adapted by timm's own
    pretrained-loading code (`adapt_input_conv`, the ViT `checkpoint_filter_fn`'s position-embedding and patch
    resampling); another embed dim, depth, head count or FFN width is refused."""
    from timm.models import adapt_input_conv
    from timm.models.vision_transformer import checkpoint_filter_fn

    shape = shape_of(plain)
    widths = set(shape.mlp_hidden)
    want = {"embed dim": config.embed_dim, "depth": config.depth, "FFN width": config.mlp_hidden}
    have = {"embed dim": shape.embed_dim, "depth": shape.depth,
            "FFN width": shape.mlp_hidden[0] if len(widths) == 1 else "/".join(map(str, shape.mlp_hidden))}
    if plain.num_heads is not None:
        want["heads"], have["heads"] = config.num_heads, plain.num_heads
    if want != have:
        raise InduceError(f"{plain.origin} does not fit --preset {preset}: the preset has {_describe(want)}; "
                          f"the checkpoint has {_describe(have)}")
    model = MatViT(config)
    state = dict(plain.state)
    if shape.in_chans not in (None, config.in_chans):
        state["patch_embed.proj.weight"] = adapt_input_conv(config.in_chans, state["patch_embed.proj.weight"])
        log(f"patch embedding adapted from {shape.in_chans} to {config.in_chans} input channels")
    reinit = shape.num_classes != config.num_classes
    if reinit:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
        log(f"classifier head re-initialised: the checkpoint has {shape.num_classes or 'no'} classes, "
            f"the dataset {config.num_classes}")
    tokens = state["pos_embed"].shape[1] if "pos_embed" in state else None
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as e:  # timm's converters assume well-formed checkpoints
        raise InduceError(f"timm cannot adapt {plain.origin} to --preset {preset}: {str(e).splitlines()[0]}") from e
    if shape.patch_size != config.patch_size:
        log(f"patch embedding resampled from {shape.patch_size}px to {config.patch_size}px patches")
    if tokens is not None and tokens != model.pos_embed.shape[1]:
        log(f"position embedding resampled from {tokens} to {model.pos_embed.shape[1]} tokens")
    expected = model.state_dict()
    unexpected, missing = sorted(state.keys() - expected.keys()), sorted(expected.keys() - state.keys())
    if unexpected or missing:
        what = "; ".join(f"{name} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                         for name, keys in (("unexpected keys", unexpected), ("missing keys", missing)) if keys)
        raise InduceError(f"{plain.origin} is not a plain class-token timm ViT like --preset {preset}: {what}")
    wrong = [f"{k} {tuple(state[k].shape)} (preset {tuple(v.shape)})" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise InduceError(f"{plain.origin} does not fit --preset {preset}: {', '.join(wrong[:3])}")
    model.load_state_dict(state, strict=True)
    return model, reinit


# --- importance and reordering -------------------------------------------------------------------------
def _batches(source: sources.Source, batch_size: int, batches: int, seed: int, workers: int):
    loader = source.loader(batch_size, epoch=0, seed=seed, shuffle=True, drop_last=False, workers=workers)
    return itertools.islice((b for b in loader if len(b[1])), batches)


def fit_head(model: MatViT, source: sources.Source, batch_size: int, batches: int, seed: int,
             device: torch.device | str = "cpu", workers: int = 0, steps: int = HEAD_STEPS) -> tuple[float, float]:
    """Fit the classifier head alone (a linear probe on the frozen XL features of `batches` training batches, full
    batch AdamW for `steps` steps); returns its accuracy on those images before and after."""
    model.eval()
    feats, labels = [], []
    with torch.no_grad():
        for images, y in _batches(source, batch_size, batches, seed, workers):
            feats.append(model.features_and_logits(to_input(images).to(device), "XL")[0])
            labels.append(y.to(device))
    x, y = torch.cat(feats), torch.cat(labels)
    accuracy = lambda: float((model.head(x).argmax(1) == y).float().mean())  # noqa: E731
    with torch.no_grad():
        before = accuracy()
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model.head(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        return before, accuracy()


def weight_scores(model: MatViT) -> list[torch.Tensor]:
    """Per block: ||fc1 row j|| * ||fc2 column j|| for every hidden neuron j."""
    with torch.no_grad():
        return [b.mlp.fc1.weight.norm(dim=1) * b.mlp.fc2.weight.norm(dim=0) for b in model.blocks]


def taylor_scores(model: MatViT, source: sources.Source, batch_size: int, batches: int, seed: int,
                  device: torch.device | str = "cpu", workers: int = 0) -> list[torch.Tensor]:
    """Per block: sum over images of |sum over tokens of activation * gradient of the XL cross-entropy|."""
    model.eval()
    acts: list[torch.Tensor] = []
    hooks = [b.mlp.act.register_forward_hook(lambda _m, _i, out: acts.append(out)) for b in model.blocks]
    scores = [torch.zeros(b.mlp.fc1.out_features, dtype=torch.float64, device=device) for b in model.blocks]
    try:
        for images, y in _batches(source, batch_size, batches, seed, workers):
            acts.clear()
            loss = F.cross_entropy(model(to_input(images).to(device), "XL"), y.to(device), reduction="sum")
            grads = torch.autograd.grad(loss, acts)
            with torch.no_grad():
                for s, a, g in zip(scores, acts, grads, strict=True):
                    s += (a * g).sum(1).abs().sum(0).double()
    finally:
        for h in hooks:
            h.remove()
    return [s.float().cpu() for s in scores]


def orders_of(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per block, the neuron indices most important first (ties keep their order)."""
    return [torch.argsort(s, descending=True, stable=True) for s in scores]


@torch.no_grad()
def reorder(model: MatViT, orders: list[torch.Tensor]) -> None:
    """Permute every block's hidden neurons in place: fc1 rows and bias, fc2 columns. The XL function is unchanged;
    the first k neurons become `order[:k]`."""
    for block, order in zip(model.blocks, orders, strict=True):
        mlp, order = block.mlp, order.to(block.mlp.fc1.weight.device)
        mlp.fc1.weight.copy_(mlp.fc1.weight[order])
        if mlp.fc1.bias is not None:
            mlp.fc1.bias.copy_(mlp.fc1.bias[order])
        mlp.fc2.weight.copy_(mlp.fc2.weight[:, order])


def prefix_shares(scores: torch.Tensor, granularities: dict[str, int]) -> dict[str, float]:
    """The share of a block's total importance held by each granularity's prefix (XL holds all of it)."""
    total = float(scores.sum()) or 1.0
    return {g: round(float(scores[:w].sum()) / total, 4) for g, w in granularities.items() if w < len(scores)}


# --- the whole step ------------------------------------------------------------------------------------
def prepare(opts: InduceOptions, device: torch.device | str = "cpu", workers: int = 0, in_memory: bool = False,
            log=print) -> tuple[MatViT, dict]:
    """Load, fit, score and reorder; write OUT/induced.safetensors and OUT/induce.json. Returns the reordered model
    (in eval mode) and induce.json's dict."""
    start = time.perf_counter()
    out = Path(opts.out)
    train_opts = opts.train_options()
    plain = load_plain(opts.source)  # before the dataset: a bad source fails at once
    size = get_preset(opts.preset).model
    source = sources.open_source(opts.dataset, "train", size.img_size, size.in_chans, opts.data_dir, in_memory)
    config = train_opts.model_config(len(source.classes))
    torch.manual_seed(opts.seed)
    notes: list[str] = []
    model, reinit = fit(plain, config, opts.preset, log=lambda s: (notes.append(s), log(s)))
    model.to(device)
    batch_size = train_opts.recipe.batch_size
    args = (source, batch_size, opts.importance_batches, opts.seed, device, workers)
    head_acc = None
    if reinit:
        head_acc = fit_head(model, *args)
        notes.append(f"head fitted alone on frozen XL features of {opts.importance_batches} batches "
                     f"(accuracy on them {head_acc[0]:.4f} before, {head_acc[1]:.4f} after)")
        log(notes[-1])
    scored_with = "weight" if opts.importance == "none" else opts.importance
    scores = weight_scores(model) if scored_with == "weight" else taylor_scores(model, *args)
    orders = orders_of(scores) if opts.importance != "none" else [torch.arange(len(s)) for s in scores]
    reorder(model, orders)
    granularities = config.granularities
    blocks = [{"before": prefix_shares(s, granularities), "after": prefix_shares(s[o], granularities)}
              for s, o in zip(scores, orders, strict=True)]
    make_dir(out)
    tmp = out / f"{INDUCED_FILE}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out / INDUCED_FILE)
    summary = {
        "options": opts.to_dict(), "source": plain.origin, "notes": notes, "head_reinitialised": reinit,
        "head_fit_accuracy": head_acc and {"before": head_acc[0], "after": head_acc[1]},
        "importance": opts.importance, "scored_with": scored_with,
        "uniform_shares": {g: round(w / config.mlp_hidden, 4) for g, w in granularities.items()
                           if w < config.mlp_hidden},
        "blocks": blocks,
        "mean_after": {g: round(sum(b["after"][g] for b in blocks) / len(blocks), 4) for g in blocks[0]["after"]},
        "seconds": round(time.perf_counter() - start, 1), **provenance.record(),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return model.eval(), summary


def prepared(opts: InduceOptions) -> dict | None:
    """induce.json's dict when OUT already holds the reordered weights of exactly these options."""
    try:
        summary = json.loads((Path(opts.out) / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = not option_differences(summary.get("options", {}), json.loads(json.dumps(opts.to_dict())))
    return summary if same and (Path(opts.out) / INDUCED_FILE).is_file() else None


def induce(opts: InduceOptions, runtime: Runtime | None = None, workers: int = 2, in_memory: bool = False,
           resume: bool = False, log=print) -> dict | None:
    """Reorder (or, when `resume`, reuse the reordering of the same options), then train jointly for `opts.epochs`
    (0: none) with `train.Trainer` from the reordered weights, and evaluate every granularity. Returns
    `{"induce": induce.json, "eval": eval.json}` on the main process, None on the others."""
    rt = runtime or Runtime(torch.device("cpu"))
    summary = None
    if rt.main:
        summary = prepared(opts) if resume else None
        if summary is not None:
            log(f"reusing the reordered weights in {Path(opts.out) / INDUCED_FILE}")
        else:
            summary = prepare(opts, rt.device, workers, in_memory, log)[1]
            log(f"{opts.importance} importance: mean share of the FFN importance in the first neurons "
                + ", ".join(f"{g} {v:.3f} (uniform {summary['uniform_shares'][g]:.3f})"
                            for g, v in summary["mean_after"].items()))
    rt.barrier()
    result = Trainer(opts.train_options(), rt, workers=workers, in_memory=in_memory).run(resume=resume, log=log)
    return None if result is None else {"induce": summary, "eval": result}
