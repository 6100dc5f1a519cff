"""Submodel specs: one FFN granularity per layer, with text form, Mix'n'Match enumeration and costs.

A spec is what the whole product passes around: uniform `XL`/`L`/`M`/`S` are the trained
granularities; a per-layer list such as `S,S,M,M,L,XL` is a Mix'n'Match submodel (MatFormer,
Devvrit et al. 2023, Sec. 3.3).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from .config import MatViTConfig
from .errors import UserError


class SpecError(UserError):
    """A submodel spec that does not fit the model."""


@dataclass(frozen=True)
class Submodel:
    """Granularity name and FFN width of every block."""

    names: tuple[str, ...]
    widths: tuple[int, ...]

    @property
    def uniform(self) -> bool:
        return len(set(self.names)) == 1

    @property
    def text(self) -> str:
        """The form a person types: `XL` for a uniform spec, `S,S,M,M,L,XL` otherwise."""
        return self.names[0] if self.uniform else ",".join(self.names)

    @property
    def id(self) -> str:
        """Stable, URL- and file-name-safe id: `XL` or `S-S-M-M-L-XL`."""
        return self.text.replace(",", "-")

    def __str__(self) -> str:
        return self.text


def from_names(names: list[str] | tuple[str, ...], config: MatViTConfig) -> Submodel:
    allowed = config.granularities
    for name in names:
        if name not in allowed:
            raise SpecError(f"unknown granularity {name!r} in submodel spec; allowed: {', '.join(allowed)}")
    return Submodel(tuple(names), tuple(allowed[n] for n in names))


def parse(text: str, config: MatViTConfig) -> Submodel:
    """Parse `XL`, `S` or a comma list with one granularity per layer (`-` works as separator too)."""
    tokens = [t.strip().upper() for t in text.replace("-", ",").split(",")]
    if not text.strip() or any(not t for t in tokens):
        raise SpecError(f"empty token in submodel spec {text!r}; write e.g. 'XL' or 'S,M,L,XL'")
    names = tokens * config.depth if len(tokens) == 1 else tokens
    if len(names) != config.depth:
        raise SpecError(
            f"submodel spec {text!r} has {len(tokens)} layers but the model has depth {config.depth}; "
            f"give one granularity, or {config.depth} comma-separated ones"
        )
    return from_names(names, config)


def uniform(name: str, config: MatViTConfig) -> Submodel:
    return from_names([name] * config.depth, config)


def named(config: MatViTConfig) -> list[Submodel]:
    """The trained granularities, smallest first."""
    return [uniform(n, config) for n in config.granularities]


def monotone(config: MatViTConfig) -> list[Submodel]:
    """Mix'n'Match specs whose width never decreases with depth: C(depth+G-1, G-1) of them."""
    order = list(config.granularities)
    combos = itertools.combinations_with_replacement(range(len(order)), config.depth)
    return [from_names([order[i] for i in c], config) for c in combos]


def narrowing(config: MatViTConfig) -> list[Submodel]:
    """The mirrors of `monotone`: width never increasing with depth (same parameters and GFLOPs as each mirror;
    on CIFAR-10 they lie closer to the granularities' segments, docs/results/mixnmatch-order-cifar10)."""
    return [from_names(list(reversed(s.names)), config) for s in monotone(config)]


def one_layer(config: MatViTConfig) -> list[Submodel]:
    """Specs that change one layer only: the largest granularity at layer i and the smallest elsewhere, for each
    i, then the smallest at layer i and the largest elsewhere (what one layer's width is worth)."""
    order = list(config.granularities)
    small, large = order[0], order[-1]
    return [from_names([inner if j == i else outer for j in range(config.depth)], config)
            for inner, outer in ((large, small), (small, large)) for i in range(config.depth)]


def every(config: MatViTConfig) -> list[Submodel]:
    """Every combination of granularities: G**depth specs."""
    order = list(config.granularities)
    return [from_names(list(c), config) for c in itertools.product(order, repeat=config.depth)]


def random_monotone(config: MatViTConfig, rng: random.Random) -> Submodel:
    order = list(config.granularities)
    idx = sorted(rng.randrange(len(order)) for _ in range(config.depth))
    return from_names([order[i] for i in idx], config)


def num_params(config: MatViTConfig, spec: Submodel, head: bool = True) -> int:
    """Parameters of the extracted model at `spec`: patch embedding to final norm, plus the classifier
    head when `head` (retrieval uses the embedding path only)."""
    d, c = config.embed_dim, config.num_classes
    tokens = (config.img_size // config.patch_size) ** 2 + 1
    embed = config.in_chans * config.patch_size**2 * d + d + d + tokens * d
    attn = 2 * d + 3 * d * d + 3 * d + d * d + d
    mlp = sum(2 * d + 2 * d * w + w + d for w in spec.widths)
    return embed + config.depth * attn + mlp + 2 * d + (d * c + c if head else 0)


def forward_flops(config: MatViTConfig, spec: Submodel, head: bool = True) -> int:
    """Matmul FLOPs of one image's forward pass (2 per multiply-add, as torch's flop counter counts),
    with or without the classifier head."""
    d = config.embed_dim
    patches = (config.img_size // config.patch_size) ** 2
    t = patches + 1
    embed = 2 * patches * d * config.in_chans * config.patch_size**2
    attn = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d
    mlp = sum(2 * 2 * t * d * w for w in spec.widths)
    return embed + config.depth * attn + mlp + (2 * d * config.num_classes if head else 0)
