"""MatMamba-Vision: Mamba2 blocks with nested (Matryoshka) inner widths, the second family behind `matvit.nested`.

MatMamba (Shukla et al., 2024, https://arxiv.org/abs/2410.06718; code: github.com/ScaledFoundations/MatMamba).
A ViT-like stack whose token mixers are Mamba2 blocks (no attention, no FFN): patch embedding, a class token
appended AFTER the last patch (the scan is causal, so only the last token has seen every patch), learned
positions, pre-norm residual blocks, final norm, head. The embedding is the class token after the final norm.
The config's `summary` can move the class token to the middle of the patches (it then sees the first half only)
or embed the mean of all tokens instead; `docs/results/class-token-fmnist` measures the three. A class token
first would see no patch at all: its embedding would not depend on the image.

Nesting, as the reference does it: at inner width k (a granularity's width; XL is `d_inner`), a mixer uses the
first k channels of the input projection's z and x parts, the first k / headdim heads (their dt rows, dt bias,
A and D), the depthwise-conv channels of those k x channels, the gated RMSNorm's first k weights and the output
projection's first k columns. B and C (d_state each, one group) and their conv channels are shared whole. The
gated norm takes its root-mean-square over the k kept channels (one group, as the reference's ngroups=1).
Sliced, not masked: a smaller width computes less. The widths are an argument of the forward (no model state).

The scan is `matvit.ssd.chunked` (plain PyTorch, any device); the optional `mamba_ssm` CUDA kernels are not used.

A spec exported by `MatMamba.export` is a plain `MambaVision` (fixed widths, no nesting) in `model.safetensors`
and `config.json`; `MambaVision.load(directory)` is all a user calls to run it: it needs torch, timm,
safetensors and this module with `matvit/ssd.py` (nothing of the nested model or of a training checkpoint).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import DropPath, PatchEmbed

from . import ssd
from .config import HEADS, Preset, TrainRecipe
from .errors import UserError, make_dir
from .nested import Embedding, NestedConfig, NestedModel, classify
from .spec import Submodel

SUMMARIES = ("end", "middle", "mean")  # the class token after the last patch or amid them; the mean of all tokens
NORM_EPS = 1e-5


@dataclass
class MatMambaConfig(NestedConfig):
    """Shape of a MatMamba-Vision: `depth` Mamba2 blocks of model width `embed_dim` whose inner widths nest the
    widths in `granularities` (default: d_inner / 8, / 4, / 2, / 1)."""

    width_field: ClassVar[str] = "d_inner"

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 512  # d_model
    depth: int = 20
    d_state: int = 128
    headdim: int = 16
    expand: float = 2.0
    d_inner: int | None = None  # the mixers' inner width; None: expand * embed_dim (a baseline sets its own)
    d_conv: int = 4
    chunk_size: int = 256
    drop_path_rate: float = 0.0
    granularities: dict[str, int] = field(default_factory=dict)
    head: str = "linear"  # one of HEADS
    summary: str = "end"  # one of SUMMARIES: what the embedding reads (see the module's docstring)
    embed_dims: list[int] | None = None  # Matryoshka prefix lengths the loss trains (see `NestedConfig`)

    def __post_init__(self) -> None:
        if self.summary not in SUMMARIES:
            raise ValueError(f"unknown summary {self.summary!r}; use one of {', '.join(SUMMARIES)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide img_size {self.img_size}")
        self.d_inner = self.d_inner or round(self.expand * self.embed_dim)
        self.nest(HEADS)
        for name, width in self.granularities.items():
            if width <= 0 or width % self.headdim:
                raise ValueError(f"granularity {name}'s inner width {width} is not a positive multiple of headdim "
                                 f"{self.headdim}: every width must be whole heads (choose a headdim dividing "
                                 f"{min(self.granularities.values())})")

    @property
    def tokens(self) -> int:
        """Sequence length: the patches and the class token."""
        return (self.img_size // self.patch_size) ** 2 + 1

    def standalone_kwargs(self) -> dict:
        """Keyword arguments of the plain `MambaVision` of this shape (its widths given apart)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    num_classes=self.num_classes, embed_dim=self.embed_dim, d_state=self.d_state,
                    headdim=self.headdim, d_conv=self.d_conv, chunk_size=self.chunk_size, head=self.head,
                    summary=self.summary)



def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The depthwise causal convolution of x (batch, length, channels) with a `Conv1d(groups=channels)`'s weight
    (channels, 1, width) and bias: output t sees inputs t - width + 1 .. t. As shifted products (cheaper on CPU than
    a depthwise convolution, backward included)."""
    width, length = weight.size(-1), x.size(1)
    padded = F.pad(x, (0, 0, width - 1, 0))
    out = torch.addcmul(bias, padded[:, :length], weight[:, 0, 0])
    for i in range(1, width):
        out = torch.addcmul(out, padded[:, i:i + length], weight[:, 0, i])
    return out


def mix(u: torch.Tensor, w_in: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor, dt_bias: torch.Tensor,
        a_log: torch.Tensor, d_skip: torch.Tensor, norm_w: torch.Tensor, w_out: torch.Tensor, d_state: int,
        headdim: int, chunk_size: int) -> torch.Tensor:
    """Mamba2's mixer on u (batch, length, d_model) with these weights; the inner width is `norm_w`'s length."""
    k = norm_w.numel()
    heads = k // headdim
    z, xbc, dt = F.linear(u, w_in).split([k, k + 2 * d_state, heads], dim=-1)
    x, b, c = F.silu(causal_conv(xbc, conv_w, conv_b)).split([k, d_state, d_state], dim=-1)
    x = x.unflatten(-1, (heads, headdim))
    dt = F.softplus(dt + dt_bias)  # (batch, length, heads)
    y = ssd.chunked(x * dt[..., None], -torch.exp(a_log.float()) * dt, b, c, chunk_size) + x * d_skip[:, None]
    y = y.flatten(2) * F.silu(z)  # gate, then RMS-normalise over the k channels
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + NORM_EPS) * norm_w
    return F.linear(y, w_out)


# `mix`'s weight arguments and the mixer's parameter names
MIXER_KEYS = dict(w_in="in_proj.weight", conv_w="conv1d.weight", conv_b="conv1d.bias", dt_bias="dt_bias",
                  a_log="A_log", d_skip="D", norm_w="norm.weight", w_out="out_proj.weight")


class Mamba2Mixer(torch.nn.Module):
    """Mamba2's token mixer of inner width `d_inner` (one group of B and C, no biases in the projections)."""

    def __init__(self, d_model: int, d_inner: int, d_state: int, headdim: int, d_conv: int, chunk_size: int,
                 depth: int = 1) -> None:
        super().__init__()
        self.d_inner, self.d_state, self.headdim, self.chunk_size = d_inner, d_state, headdim, chunk_size
        heads = d_inner // headdim
        self.in_proj = torch.nn.Linear(d_model, 2 * d_inner + 2 * d_state + heads, bias=False)  # [z, x, B, C, dt]
        channels = d_inner + 2 * d_state  # [x, B, C]
        self.conv1d = torch.nn.Conv1d(channels, channels, d_conv, groups=channels, padding=d_conv - 1)
        dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = torch.nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = torch.nn.Parameter(torch.log(torch.empty(heads).uniform_(1, 16)))
        self.D = torch.nn.Parameter(torch.ones(heads))
        self.norm = torch.nn.RMSNorm(d_inner, eps=NORM_EPS)  # holds the gated norm's weight (see `mix`)
        self.out_proj = torch.nn.Linear(d_inner, d_model, bias=False)
        with torch.no_grad():  # the reference's residual scaling of the output projection
            self.out_proj.weight.div_(math.sqrt(depth))

    def weights(self) -> dict[str, torch.Tensor]:
        """The parameters `mix` takes, by its argument names."""
        return {arg: self.get_parameter(key) for arg, key in MIXER_KEYS.items()}

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return mix(u, **self.weights(), d_state=self.d_state, headdim=self.headdim, chunk_size=self.chunk_size)


class NestedMamba2Mixer(Mamba2Mixer):
    """A Mamba2 mixer that runs at the inner width given to its forward (all of it when None)."""

    def weights(self, width: int | None = None) -> dict[str, torch.Tensor]:
        """`Mamba2Mixer.weights` of the first `width` inner channels and their heads (see the module's docstring)."""
        full = super().weights()
        k, di, n = width or self.d_inner, self.d_inner, self.d_state
        if k == di:
            return full
        h, w_in, conv_w, conv_b = k // self.headdim, full["w_in"], full["conv_w"], full["conv_b"]
        return dict(
            w_in=torch.cat([w_in[:k], w_in[di:di + k], w_in[2 * di:2 * di + 2 * n + h]]),
            conv_w=torch.cat([conv_w[:k], conv_w[di:]]), conv_b=torch.cat([conv_b[:k], conv_b[di:]]),
            dt_bias=full["dt_bias"][:h], a_log=full["a_log"][:h], d_skip=full["d_skip"][:h],
            norm_w=full["norm_w"][:k], w_out=full["w_out"][:, :k])

    def forward(self, u: torch.Tensor, width: int | None = None) -> torch.Tensor:
        return mix(u, **self.weights(width), d_state=self.d_state, headdim=self.headdim, chunk_size=self.chunk_size)


class MambaBlock(torch.nn.Module):
    """Pre-norm residual block: x + mixer(LayerNorm(x)); extra forward arguments go to the mixer."""

    def __init__(self, dim: int, mixer: torch.nn.Module, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim, eps=NORM_EPS)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else torch.nn.Identity()

    def forward(self, x: torch.Tensor, *width) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x), *width))


class MambaVision(torch.nn.Module):
    """A plain Mamba2 vision model whose block i has inner width `widths[i]`: what a MatMamba spec exports to.

    `forward_features` gives the embedding (after the final norm: the class token, appended after the last patch,
    or set among the patches, or the mean of all tokens, as `summary` says); `forward` the logits. `load` reads an
    exported directory.
    """

    mixer_class: type[Mamba2Mixer] = Mamba2Mixer

    def __init__(self, img_size: int, patch_size: int, in_chans: int, num_classes: int, embed_dim: int, d_state: int,
                 headdim: int, d_conv: int, chunk_size: int, widths: list[int], head: str = "linear",
                 drop_path_rate: float = 0.0, summary: str = "end") -> None:
        super().__init__()
        self.head_kind, self.summary = head, summary
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        patches = self.patch_embed.num_patches
        self.cls_index = patches // 2 if summary == "middle" else patches
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, patches + 1, embed_dim) * 0.02)
        rates = torch.linspace(0, drop_path_rate, len(widths)).tolist()
        self.blocks = torch.nn.ModuleList(
            MambaBlock(embed_dim, self.mixer_class(embed_dim, w, d_state, headdim, d_conv, chunk_size, len(widths)),
                       rate) for w, rate in zip(widths, rates, strict=True))
        self.norm = torch.nn.LayerNorm(embed_dim, eps=NORM_EPS)
        self.head = torch.nn.Linear(embed_dim, num_classes)
        torch.nn.init.zeros_(self.head.bias)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        x, i = self.patch_embed(images), self.cls_index
        return torch.cat([x[:, :i], self.cls_token.expand(x.size(0), -1, -1), x[:, i:]], dim=1) + self.pos_embed

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x.mean(1) if self.summary == "mean" else x[:, self.cls_index]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.pool(x)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier on embeddings: linear, or the scaled cosine to each class weight (`head` "cosine")."""
        return classify(features, self.head, self.head_kind)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.forward_features(images))

    @classmethod
    def load(cls, directory: Path) -> MambaVision:
        """The model `MatMamba.export` wrote to `directory` (`config.json` + `model.safetensors`), in eval mode."""
        config = json.loads((Path(directory) / "config.json").read_text())
        model = cls(**config["mamba_kwargs"], widths=config["widths"])
        model.load_state_dict(load_file(Path(directory) / "model.safetensors"), strict=True)
        return model.eval()


class Features(torch.nn.Module):
    """A `MambaVision`'s embedding path as a module's forward."""

    def __init__(self, vision: MambaVision) -> None:
        super().__init__()
        self.vision = vision

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision.forward_features(images)


class MatMamba(MambaVision, NestedModel):
    """A MatMamba-Vision whose blocks run at the per-layer inner widths of a `Submodel`.

    Its state dict has the keys and shapes of the plain `MambaVision` of the full width.
    """

    family = "matmamba"
    label = "MatMamba"
    config_class = MatMambaConfig
    mixer_class = NestedMamba2Mixer

    def __init__(self, config: MatMambaConfig) -> None:
        super().__init__(**config.standalone_kwargs(), widths=[config.d_inner] * config.depth,
                         drop_path_rate=config.drop_path_rate)
        self.config = config

    @property
    def embedding_dim(self) -> int:
        return self.config.embed_dim

    def features_and_logits(self, images: torch.Tensor, spec: str | Submodel = "XL"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The class token after the final norm, and the classifier logits, with block i at `spec`'s width i."""
        x = self.tokens(images)
        for block, width in zip(self.blocks, self.spec(spec).widths, strict=True):
            x = block(x, width)
        feats = self.pool(x)
        return feats, self.logits(feats)

    def forward(self, images: torch.Tensor, spec: str | Submodel = "XL") -> torch.Tensor:
        return self.features_and_logits(images, spec)[1]

    @torch.no_grad()
    def standalone(self, spec: str | Submodel) -> MambaVision:
        """The plain `MambaVision` of `spec`'s widths holding the sliced weights (head included), in eval mode."""
        widths = list(self.spec(spec).widths)
        small = MambaVision(**self.config.standalone_kwargs(), widths=widths)
        state = {k: v for k, v in self.state_dict().items() if ".mixer." not in k}
        for i, (block, width) in enumerate(zip(self.blocks, widths, strict=True)):
            for arg, value in block.mixer.weights(width).items():
                state[f"blocks.{i}.mixer.{MIXER_KEYS[arg]}"] = value
        small.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
        return small.eval()

    def extract(self, spec: str | Submodel) -> Embedding:
        """`spec`'s embedding path as a standalone, physically smaller `MambaVision`."""
        return Embedding(Features(self.standalone(spec))).eval()

    def plain(self, spec: str | Submodel) -> Embedding:
        """An untrained plain `MambaVision` of `spec`'s widths."""
        return Embedding(Features(MambaVision(**self.config.standalone_kwargs(), widths=list(self.spec(spec).widths))
                                  )).eval()

    def export(self, spec: str | Submodel, out: Path, onnx: bool = False, **extra) -> Path:
        """`model.safetensors` + `config.json` of `spec`'s `MambaVision` (see `MambaVision.load`), and `model.onnx`
        (images in, embeddings out) when `onnx`."""
        spec, out = self.spec(spec), make_dir(out)
        vision = self.standalone(spec)
        config = {"family": self.family, "mamba_kwargs": self.config.standalone_kwargs(),
                  "widths": list(spec.widths), "submodel": spec.text, "embed_dims": self.dims, **extra}
        if onnx:
            write_onnx(Embedding(Features(vision)).eval(), self.config, out / "model.onnx")
        save_file({k: v.contiguous() for k, v in vision.state_dict().items()}, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(config, indent=2))
        return out

    def num_params(self, spec: str | Submodel, head: bool = False) -> int:
        """Patch embedding to final norm, plus the classifier head when `head`."""
        c, spec = self.config, self.spec(spec)
        d, n = c.embed_dim, c.d_state
        embed = c.in_chans * c.patch_size**2 * d + d + d + c.tokens * d
        mixers = sum(d * (2 * k + 2 * n + k // c.headdim) + (k + 2 * n) * (c.d_conv + 1) + 3 * (k // c.headdim)
                     + k + k * d for k in spec.widths)
        return embed + c.depth * 2 * d + mixers + 2 * d + (d * c.num_classes + c.num_classes if head else 0)

    def forward_flops(self, spec: str | Submodel, head: bool = False) -> int:
        """Matmul FLOPs as torch's flop counter counts them (2 per multiply-add): the patch embedding, projections
        and the chunked scan's products (elementwise work, the depthwise convolution's included, is not counted)."""
        c, spec = self.config, self.spec(spec)
        d, n, t = c.embed_dim, c.d_state, c.tokens
        q = min(c.chunk_size, t)
        chunks = -(-t // q)
        embed = 2 * (t - 1) * d * c.in_chans * c.patch_size**2
        total = embed + (2 * d * c.num_classes if head else 0)
        for k in spec.widths:
            heads = k // c.headdim
            total += 2 * t * d * (2 * k + 2 * n + heads)  # the depthwise convolution: elementwise, not counted
            total += 2 * chunks * q * q * n + 2 * chunks * q * q * k  # inside each chunk: C.B, then its mixing
            if chunks > 1:  # states out of and into each chunk, and passed chunk to chunk
                total += 2 * 2 * chunks * q * n * k + 2 * chunks * chunks * k * n
            total += 2 * t * k * d
        return total


def write_onnx(embedder: Embedding, config: MatMambaConfig, path: Path) -> None:
    """Export `embedder` (images in, embeddings out, any batch) with torch's TorchScript exporter; a scan it cannot
    take is a `UserError` saying so."""
    with warnings.catch_warnings():  # the tracer's notes on shape arithmetic are not for users
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                embedder, (torch.zeros(1, config.in_chans, config.img_size, config.img_size),), str(path),
                input_names=["images"], output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, dynamo=False)
        except Exception as e:  # the exporter raises several types for an operator it lacks
            path.unlink(missing_ok=True)
            raise UserError(f"torch's ONNX exporter cannot export the MatMamba scan ({str(e).splitlines()[0]}); "
                            "export without --onnx, or serve with the eager backend") from e


def _paper(dim: int, headdim: int) -> Preset:
    """The paper's MatMamba-Vision ImageNet shapes (20 blocks, d_state 128, patch 16 at 224; constructible, train
    on a GPU): its recipe's learning rate, weight decay and drop path."""
    model = MatMambaConfig(embed_dim=dim, depth=20, d_state=128, headdim=headdim, drop_path_rate=0.1)
    return Preset(model, TrainRecipe(epochs=300, batch_size=1024, lr=5e-3, weight_decay=0.1, warmup_epochs=10,
                                     augment="crop-flip"))


PRESETS: dict[str, Preset] = {  # this family's named shapes (see `matvit.registry`); no dense warm-up applies
    "matmamba-tiny-digits": Preset(
        MatMambaConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4, d_state=8,
                       headdim=8, chunk_size=8),  # 17 tokens in chunks of 8: the scan's padded last chunk runs
        TrainRecipe(epochs=15, batch_size=32, lr=2e-3, warmup_epochs=1, augment="none"),
    ),
    # Sized for 2 CPU cores as the matching MatViT presets (same patches, width 128, depth 6): an inner width of
    # 1.5x (192; S is one head of 24) makes a joint (sum) step cost no more than theirs, the scan's elementwise
    # work being what a CPU pays for. No dense warm-up: it orders a ViT's FFN neurons and does not apply here.
    "matmamba-small-fmnist": Preset(
        MatMambaConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=6, d_state=16,
                       headdim=24, expand=1.5),
        TrainRecipe(epochs=15, batch_size=128, lr=1e-3, warmup_epochs=1, augment="none"),
    ),
    "matmamba-small-cifar": Preset(
        MatMambaConfig(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=128, depth=6, d_state=16,
                       headdim=24, expand=1.5),
        TrainRecipe(epochs=15, batch_size=128, lr=1e-3, warmup_epochs=1, augment="none"),
    ),
    "matmamba-ti16": _paper(192, 16),  # not in the paper: matvit-ti16's width and patch at its parameter count
    "matmamba-vision-35m": _paper(512, 16),
    "matmamba-vision-135m": _paper(1024, 32),
}
