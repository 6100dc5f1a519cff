"""MatViT: timm's VisionTransformer with nested (Matryoshka) FFNs.

MatFormer: Nested Transformer for Elastic Inference (Devvrit et al., 2023),
https://arxiv.org/abs/2310.07707. Every block's FFN of hidden width h holds the narrower FFNs of the
smaller granularities as its first k neurons; a forward at width k computes with
`fc1.weight[:k]`, `fc1.bias[:k]`, `fc2.weight[:, :k]` and the full `fc2.bias`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer

from . import spec as specs
from .config import MatViTConfig
from .spec import Submodel

COSINE_SCALE = 16.0  # a cosine head's logits are this times the cosine to each class weight


class NestedMlp(Mlp):
    """timm `Mlp` that computes with only its first `width` hidden neurons (all of them when None)."""

    width: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.width or self.fc1.out_features
        x = F.linear(x, self.fc1.weight[:k], None if self.fc1.bias is None else self.fc1.bias[:k])
        x = self.drop1(self.act(x))
        x = F.linear(x, self.fc2.weight[:, :k], self.fc2.bias)
        return self.drop2(x)

    @classmethod
    def exact(cls, hidden: int, **kwargs) -> NestedMlp:
        """An FFN of exactly `hidden` neurons. timm's blocks pass `hidden_features=int(dim * mlp_ratio)`, which
        float rounding can leave one short (`int(44 * (120 / 44)) == 119`); this replaces it."""
        return cls(**{**kwargs, "hidden_features": hidden})


class MatViT(VisionTransformer):
    """A timm ViT whose blocks run at the per-layer FFN widths of a `Submodel`.

    The state dict has exactly the keys and shapes of the plain timm ViT of the same shape.
    """

    def __init__(self, config: MatViTConfig) -> None:
        super().__init__(**config.timm_kwargs(), mlp_layer=functools.partial(NestedMlp.exact, config.mlp_hidden))
        self.config = config
        self._spec_lock = threading.RLock()

    def spec(self, text: str | Submodel = "XL") -> Submodel:
        return text if isinstance(text, Submodel) else specs.parse(text, self.config)

    @contextmanager
    def submodel(self, spec: str | Submodel | None) -> Iterator[None]:
        """Run the blocks at `spec`'s widths inside the `with`; None keeps the widths of an enclosing `with`
        (all neurons outside any). Leaving restores the widths found on entry. Other threads wait."""
        widths = None if spec is None else self.spec(spec).widths
        with self._spec_lock:
            outer = [block.mlp.width for block in self.blocks]
            try:
                for block, w in zip(self.blocks, widths or outer, strict=True):
                    block.mlp.width = w
                yield
            finally:
                for block, w in zip(self.blocks, outer, strict=True):
                    block.mlp.width = w

    def features_and_logits(
        self, x: torch.Tensor, spec: str | Submodel | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-logits CLS feature after the final norm, and the classifier logits (the config's `head`)."""
        with self.submodel(spec):
            feats = self.forward_head(self.forward_features(x), pre_logits=True)
        if self.config.head == "cosine":
            return feats, COSINE_SCALE * F.linear(F.normalize(feats, dim=-1), F.normalize(self.head.weight, dim=-1))
        return feats, self.head(feats)

    def forward(self, x: torch.Tensor, spec: str | Submodel | None = None) -> torch.Tensor:
        """Logits at `spec`; None runs the enclosing `submodel` context's widths, else XL."""
        return self.features_and_logits(x, spec)[1]

    def embed(self, images: torch.Tensor, spec: str | Submodel = "XL") -> torch.Tensor:
        """L2-normalised retrieval embeddings of `images` at `spec`."""
        return F.normalize(self.features_and_logits(images, spec)[0], dim=-1)
