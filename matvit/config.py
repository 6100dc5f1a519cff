"""What every model family shares: the granularity names, the training recipe and a preset's shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GRANULARITY_NAMES = ("S", "M", "L", "XL")
# Self-distillation of the smaller granularities from XL (`matvit train --distill`); `both` is logits and embedding.
DISTILLATIONS = ("none", "logits", "embedding", "relational", "both")
AUGMENTATIONS = ("none", "crop", "crop-flip")  # training images: as they are, random crops, and flips
# The classifier on the embedding: `linear` (timm's head), or `cosine` (the scaled cosine of the embedding to each
# class's head weight, the similarity retrieval ranks by).
HEADS = ("linear", "cosine")


def default_granularities(width: int) -> dict[str, int]:
    """MatFormer's default nesting: S, M, L, XL use 1/8, 1/4, 1/2 and all of a nested layer's width."""
    return {name: width // 2 ** (3 - i) for i, name in enumerate(GRANULARITY_NAMES)}


@dataclass
class TrainRecipe:
    """The default training recipe of a preset; every field is a `matvit train` option."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    augment: str = "none"  # one of AUGMENTATIONS
    # A dense warm-up before the joint epochs (`matvit.warmup`): this many epochs of a plain ViT of the XL
    # width, whose FFN neurons are then ordered by weight. None: none.
    dense_epochs: int | None = None
    # Matryoshka embedding dimensions (`matvit train --embed-dims`): every granularity's loss is also computed on
    # each of these prefixes of the embedding, through the head's matching columns; the full length is always
    # included. None: the full embedding only.
    embed_dims: list[int] | None = None


@dataclass
class Preset:
    """A named model shape (a family's config dataclass) with its default training recipe."""

    model: Any
    recipe: TrainRecipe
