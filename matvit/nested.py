"""The model seam: everything the product uses from a nested model, whatever its backbone.

A nested model holds one encoder per submodel spec (`matvit.spec.Submodel`: a granularity per layer).
Retrieval, serving and the benchmarks use only this interface; a backbone is one module holding its config,
its `NestedModel` subclass and its presets, plus an entry in `matvit.registry`.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from . import spec as specs
from .config import default_granularities
from .spec import Submodel

COSINE_SCALE = 16.0  # a cosine head's logits are this times the cosine to each class weight


def normalise(features: torch.Tensor) -> torch.Tensor:
    """Retrieval embeddings: features L2-normalised (the index ranks by inner product, i.e. cosine)."""
    return F.normalize(features, dim=-1)


def classify(features: torch.Tensor, head: torch.nn.Linear, kind: str, dims: int | None = None) -> torch.Tensor:
    """Logits of the first `dims` dimensions of the embeddings (all when None) through the head's matching weight
    columns (Matryoshka's shared-weight head): `linear`, or `cosine`, the scaled cosine to each class weight."""
    weight = head.weight[:, :dims]
    features = features[..., :dims]
    if kind == "cosine":
        return COSINE_SCALE * F.linear(F.normalize(features, dim=-1), F.normalize(weight, dim=-1))
    return F.linear(features, weight, head.bias)


class NestedConfig:
    """What a family's config dataclass shares: the dict round trip of a checkpoint's `config.json`, the nested
    widths and embedding dimensions, and the config of an independently trained baseline of one granularity (its
    nested width, `width_field`, cut to it). Fields used here: `head`, `granularities`, `embed_dim` and
    `embed_dims` (the Matryoshka prefix lengths the loss trains, the full `embed_dim` last; None: only the full)."""

    width_field: ClassVar[str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**d)

    def nest(self, heads: tuple[str, ...]) -> None:
        """Check the head against `heads`; default the granularities to MatFormer's nesting of the nested width
        (`width_field`), sort them smallest first and check that none is wider."""
        if self.head not in heads:
            raise ValueError(f"unknown head {self.head!r}; use one of {', '.join(heads)}")
        width = getattr(self, self.width_field)
        self.granularities = dict(sorted((self.granularities or default_granularities(width)).items(),
                                         key=lambda kv: kv[1]))
        if max(self.granularities.values()) > width:
            raise ValueError(f"a granularity is wider than {self.width_field} ({width})")
        if self.embed_dims:
            self.embed_dims = sorted({*self.embed_dims, self.embed_dim})
            if self.embed_dims[0] < 1 or self.embed_dims[-1] > self.embed_dim:
                raise ValueError(f"embedding dims must lie between 1 and embed_dim ({self.embed_dim})")
        else:
            self.embed_dims = None

    def baseline(self, name: str):
        width = self.granularities[name]
        return dataclasses.replace(self, **{self.width_field: width}, granularities={name: width})


class Embedding(torch.nn.Module):
    """A standalone encoder's embedding path as a module: images in, L2-normalised embeddings out."""

    def __init__(self, features: torch.nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(self.features(images))


class NestedModel(torch.nn.Module, abc.ABC):
    """A model whose submodels (one granularity per layer) share its weights and its embedding space.

    The config (`config_class`) is a `NestedConfig` dataclass with at least `img_size`, `in_chans`, `num_classes`,
    `depth`, `granularities` (name -> width of a nested layer, smallest first), `embed_dim`, `embed_dims` and
    `head`; the classifier is a `torch.nn.Linear` named `head` from the embedding to the classes.
    """

    family: ClassVar[str]
    label: ClassVar[str]  # the family's name in reports ("MatViT")
    config_class: ClassVar[type]
    config: Any

    @classmethod
    def from_config(cls, config: dict) -> NestedModel:
        return cls(cls.config_class.from_dict(config))

    # --- shape ---------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def granularities(self) -> dict[str, int]:
        return self.config.granularities

    @property
    def image_size(self) -> int:
        return self.config.img_size

    @property
    def channels(self) -> int:
        return self.config.in_chans

    @property
    @abc.abstractmethod
    def embedding_dim(self) -> int:
        """Length of an embedding (the same for every submodel)."""

    @property
    def dims(self) -> list[int]:
        """The embedding prefix lengths the model was trained for (Matryoshka dims), shortest first, ending with
        the full length."""
        return list(self.config.embed_dims or [self.embedding_dim])

    def spec(self, text: str | Submodel = "XL") -> Submodel:
        """A spec of this model; a `Submodel` passes through unchanged, text is parsed once."""
        return text if isinstance(text, Submodel) else specs.parse(text, self)

    def named(self) -> list[Submodel]:
        """The trained granularities as uniform specs, smallest first."""
        return specs.named(self)

    # --- compute -------------------------------------------------------------------------------
    @abc.abstractmethod
    def features_and_logits(self, images: torch.Tensor, spec: str | Submodel = "XL"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding before normalisation and the classifier logits of float `images` at `spec`."""

    def classify(self, features: torch.Tensor, dims: int | None = None) -> torch.Tensor:
        """The classifier's logits of `features`' first `dims` dimensions (all when None)."""
        return classify(features, self.head, self.config.head, dims)

    def forward(self, images: torch.Tensor, spec: str | Submodel = "XL") -> torch.Tensor:
        """Logits at `spec`."""
        return self.features_and_logits(images, spec)[1]

    def embed(self, images: torch.Tensor, spec: str | Submodel = "XL") -> torch.Tensor:
        """L2-normalised retrieval embeddings of float `images` at `spec`."""
        return normalise(self.features_and_logits(images, spec)[0])

    @abc.abstractmethod
    def extract(self, spec: str | Submodel) -> Embedding:
        """A standalone, physically smaller copy of `spec`'s embedding path, in eval mode."""

    @abc.abstractmethod
    def plain(self, spec: str | Submodel) -> Embedding:
        """An untrained standalone model of `spec`'s widths built directly, without the nesting (what a user would
        build by hand): the reference `extract`'s model must run as fast as."""

    @abc.abstractmethod
    def export(self, spec: str | Submodel, out: Path, onnx: bool = False, **extra) -> Path:
        """Write `spec` as a standalone model (`model.safetensors` + `config.json`, plus `model.onnx` with
        embeddings out when `onnx`) that loads without this project; the config records `embed_dims` (`dims`), and
        `extra` goes into it."""

    # --- cost ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward_flops(self, spec: str | Submodel, head: bool = False) -> int:
        """Matmul FLOPs of one image's forward at `spec` (2 per multiply-add), with the classifier when `head`."""

    @abc.abstractmethod
    def num_params(self, spec: str | Submodel, head: bool = False) -> int:
        """Parameters of `spec`'s extracted model, with the classifier when `head`."""

    def nested_share(self) -> float:
        """The share of XL's FLOPs that the nested widths hold: the most a narrower submodel can save. Every
        family's FLOPs are linear in the nested width, so the rest is their extrapolation to width 0 from the
        smallest and largest granularities."""
        widths = self.granularities
        small, large = min(widths, key=widths.get), max(widths, key=widths.get)
        (w_small, f_small), (w_large, f_large) = ((widths[g], self.forward_flops(g)) for g in (small, large))
        fixed = f_small - (f_large - f_small) * w_small / (w_large - w_small)
        return 1 - fixed / f_large
