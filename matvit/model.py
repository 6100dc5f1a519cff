"""MatViT: timm's VisionTransformer with nested (Matryoshka) FFNs, the first family behind `matvit.nested`.

MatFormer: Nested Transformer for Elastic Inference (Devvrit et al., 2023),
https://arxiv.org/abs/2310.07707. Every block's FFN of hidden width h holds the narrower FFNs of the
smaller granularities as its first k neurons; a forward at width k computes with
`fc1.weight[:k]`, `fc1.bias[:k]`, `fc2.weight[:, :k]` and the full `fc2.bias`. The widths are an argument of
the forward: the model holds no per-call state, so threads may run different submodels at once.
This module holds the family's config, model and presets; `extract.py` its standalone export.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from . import extract
from .config import HEADS, Preset, TrainRecipe
from .nested import Embedding, NestedConfig, NestedModel
from .spec import Submodel


@dataclass
class MatViTConfig(NestedConfig):
    """Shape of a MatViT: a timm ViT whose FFNs nest the widths in `granularities`."""

    width_field: ClassVar[str] = "mlp_hidden"

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    drop_path_rate: float = 0.0
    granularities: dict[str, int] = field(default_factory=dict)
    head: str = "linear"  # one of HEADS
    embed_dims: list[int] | None = None  # Matryoshka prefix lengths the loss trains (see `NestedConfig`)

    def __post_init__(self) -> None:
        self.nest(HEADS)

    def timm_kwargs(self) -> dict:
        """Keyword arguments for timm's `VisionTransformer` (blocks get width `mlp_hidden`)."""
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_hidden / self.embed_dim,
            drop_path_rate=self.drop_path_rate,
            global_pool="token",
            class_token=True,
        )




class NestedMlp(Mlp):
    """timm `Mlp` that computes with only its first `width` hidden neurons (all of them when None)."""

    def forward(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        k = width or self.fc1.out_features
        x = F.linear(x, self.fc1.weight[:k], None if self.fc1.bias is None else self.fc1.bias[:k])
        x = self.drop1(self.act(x))
        x = F.linear(x, self.fc2.weight[:, :k], self.fc2.bias)
        return self.drop2(x)

    @classmethod
    def exact(cls, hidden: int, **kwargs) -> NestedMlp:
        """An FFN of exactly `hidden` neurons. timm's blocks pass `hidden_features=int(dim * mlp_ratio)`, which
        float rounding can leave one short (`int(44 * (120 / 44)) == 119`); this replaces it."""
        return cls(**{**kwargs, "hidden_features": hidden})


class NestedBlock(Block):
    """timm's pre-norm block whose FFN runs at the `width` given to the forward."""

    def forward(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x), width)))


class MatViT(VisionTransformer, NestedModel):
    """A timm ViT whose blocks run at the per-layer FFN widths of a `Submodel`.

    The state dict has exactly the keys and shapes of the plain timm ViT of the same shape.
    """

    family = "matvit"
    label = "MatViT"
    config_class = MatViTConfig

    def __init__(self, config: MatViTConfig) -> None:
        super().__init__(**config.timm_kwargs(), block_fn=NestedBlock,
                         mlp_layer=functools.partial(NestedMlp.exact, config.mlp_hidden))
        self.config = config

    @property
    def embedding_dim(self) -> int:
        return self.config.embed_dim

    def forward_features(self, x: torch.Tensor, spec: str | Submodel = "XL") -> torch.Tensor:
        """timm's `forward_features` with block i's FFN at `spec`'s width i."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for block, width in zip(self.blocks, self.spec(spec).widths, strict=True):
            x = block(x, width)
        return self.norm(x)

    def features_and_logits(self, images: torch.Tensor, spec: str | Submodel = "XL"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-logits CLS feature after the final norm, and the classifier logits (the config's `head`)."""
        feats = self.forward_head(self.forward_features(images, spec), pre_logits=True)
        return feats, self.classify(feats)

    def forward(self, images: torch.Tensor, spec: str | Submodel = "XL") -> torch.Tensor:
        return self.features_and_logits(images, spec)[1]

    def extract(self, spec: str | Submodel) -> Embedding:
        """A plain timm ViT of `spec`'s widths holding the sliced weights, as an embedding module."""
        widths = list(self.spec(spec).widths)
        return Embedding(extract.Features(extract.sliced(self.state_dict(), self.config.timm_kwargs(), widths)))

    def plain(self, spec: str | Submodel) -> Embedding:
        """An untrained plain timm ViT of `spec`'s widths."""
        vit = extract.build_standalone(self.config.timm_kwargs(), list(self.spec(spec).widths))
        return Embedding(extract.Features(vit)).eval()

    def export(self, spec: str | Submodel, out: Path, onnx: bool = False, **extra) -> Path:
        spec = self.spec(spec)
        return extract.write(self.extract(spec).features.vit, out, self.config.timm_kwargs(), list(spec.widths),
                             {"submodel": spec.text, "embed_dims": self.dims, **extra}, onnx)

    def num_params(self, spec: str | Submodel, head: bool = False) -> int:
        """Patch embedding to final norm, plus the classifier head when `head` (retrieval uses the embedding
        path only)."""
        c, spec = self.config, self.spec(spec)
        d = c.embed_dim
        tokens = (c.img_size // c.patch_size) ** 2 + 1
        embed = c.in_chans * c.patch_size**2 * d + d + d + tokens * d
        attn = 2 * d + 3 * d * d + 3 * d + d * d + d
        mlp = sum(2 * d + 2 * d * w + w + d for w in spec.widths)
        return embed + c.depth * attn + mlp + 2 * d + (d * c.num_classes + c.num_classes if head else 0)

    def forward_flops(self, spec: str | Submodel, head: bool = False) -> int:
        """Matmul FLOPs as torch's flop counter counts them (2 per multiply-add)."""
        c, spec = self.config, self.spec(spec)
        d = c.embed_dim
        patches = (c.img_size // c.patch_size) ** 2
        t = patches + 1
        embed = 2 * patches * d * c.in_chans * c.patch_size**2
        attn = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d
        mlp = sum(2 * 2 * t * d * w for w in spec.widths)
        return embed + c.depth * attn + mlp + (2 * d * c.num_classes if head else 0)


def _paper(dim: int, depth: int, heads: int) -> Preset:
    """The paper's ViT-*/16 shapes at 224 (constructible, trained on a GPU elsewhere)."""
    model = MatViTConfig(embed_dim=dim, depth=depth, num_heads=heads, mlp_hidden=4 * dim)
    return Preset(model, TrainRecipe(epochs=300, batch_size=256, warmup_epochs=10, augment="crop-flip"))


PRESETS: dict[str, Preset] = {  # this family's named shapes (see `matvit.registry`)
    "matvit-tiny-digits": Preset(
        MatViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4,
                     num_heads=2, mlp_hidden=128),
        TrainRecipe(epochs=15, batch_size=32, lr=2e-3, warmup_epochs=1, augment="none"),
    ),
    "matvit-small-fmnist": Preset(
        MatViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                     num_heads=4, mlp_hidden=512),
        # No augmentation: in 10 epochs random crops and flips cost more than they give (XL test top-1
        # 0.861 with crop-flip, 0.895 without). A 5-epoch dense warm-up, then 15 joint epochs, lifts the
        # XL-index / S-query cell over baseline S trained as long (docs/results/consistency-fmnist-warmup-15epochs);
        # `--dense-epochs 0 --epochs 10` is the earlier plain recipe.
        TrainRecipe(epochs=15, batch_size=128, lr=1e-3, warmup_epochs=1, augment="none", dense_epochs=5),
    ),
    # Patch 8 (16 tokens): a sum-mode step is 4x cheaper than at patch 4, so the consistency benchmark's
    # five trainings fit in about 90 minutes on 2 CPU cores (patch 4 would need ~15 min per MatViT epoch).
    "matvit-small-cifar": Preset(
        MatViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=128, depth=6,
                     num_heads=4, mlp_hidden=512),
        # The Fashion-MNIST recipe: without crops and flips every 1-NN cell gains 3 to 6 points in 10
        # epochs, and the warm-up with 15 joint epochs is the first recipe whose XL-index / S-query cell
        # passes baseline S trained as long (docs/results/consistency-cifar10-warmup-15epochs);
        # `--augment crop-flip --dense-epochs 0 --epochs 10` is the earlier recipe.
        TrainRecipe(epochs=15, batch_size=128, lr=1e-3, warmup_epochs=1, augment="none", dense_epochs=5),
    ),
    "matvit-ti16": _paper(192, 12, 3),
    "matvit-s16": _paper(384, 12, 6),
    "matvit-b16": _paper(768, 12, 12),
    "matvit-l16": _paper(1024, 24, 16),
}
