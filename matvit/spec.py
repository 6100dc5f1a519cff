"""Submodel specs: one granularity per layer, with text form and Mix'n'Match enumeration.

A spec is what the whole product passes around: uniform `XL`/`L`/`M`/`S` are the trained
granularities; a per-layer list such as `S,S,M,M,L,XL` is a Mix'n'Match submodel (MatFormer,
Devvrit et al. 2023, Sec. 3.3).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Protocol

from .errors import UserError


class Nesting(Protocol):
    """What specs need of a model (or of its config): its depth and its granularities (name -> width)."""

    depth: int
    granularities: dict[str, int]


class SpecError(UserError):
    """A submodel spec that does not fit the model."""


@dataclass(frozen=True)
class Submodel:
    """Granularity name and nested width of every layer."""

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


def from_names(names: list[str] | tuple[str, ...], config: Nesting) -> Submodel:
    allowed = config.granularities
    for name in names:
        if name not in allowed:
            raise SpecError(f"unknown granularity {name!r} in submodel spec; allowed: {', '.join(allowed)}")
    return Submodel(tuple(names), tuple(allowed[n] for n in names))


def parse(text: str, config: Nesting) -> Submodel:
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


def uniform(name: str, config: Nesting) -> Submodel:
    return from_names([name] * config.depth, config)


def named(config: Nesting) -> list[Submodel]:
    """The trained granularities, smallest first."""
    return [uniform(n, config) for n in config.granularities]


def monotone(config: Nesting) -> list[Submodel]:
    """Mix'n'Match specs whose width never decreases with depth: C(depth+G-1, G-1) of them."""
    order = list(config.granularities)
    combos = itertools.combinations_with_replacement(range(len(order)), config.depth)
    return [from_names([order[i] for i in c], config) for c in combos]


def narrowing(config: Nesting) -> list[Submodel]:
    """The mirrors of `monotone`: width never increasing with depth (same parameters and GFLOPs as each mirror;
    on CIFAR-10 they lie closer to the granularities' segments, docs/results/mixnmatch-order-cifar10)."""
    return [from_names(list(reversed(s.names)), config) for s in monotone(config)]


def one_layer(config: Nesting) -> list[Submodel]:
    """Specs that change one layer only: the largest granularity at layer i and the smallest elsewhere, for each
    i, then the smallest at layer i and the largest elsewhere (what one layer's width is worth)."""
    order = list(config.granularities)
    small, large = order[0], order[-1]
    return [from_names([inner if j == i else outer for j in range(config.depth)], config)
            for inner, outer in ((large, small), (small, large)) for i in range(config.depth)]


def every(config: Nesting) -> list[Submodel]:
    """Every combination of granularities: G**depth specs."""
    order = list(config.granularities)
    return [from_names(list(c), config) for c in itertools.product(order, repeat=config.depth)]


def random_monotone(config: Nesting, rng: random.Random) -> Submodel:
    order = list(config.granularities)
    idx = sorted(rng.randrange(len(order)) for _ in range(config.depth))
    return from_names([order[i] for i in idx], config)
