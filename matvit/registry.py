"""The model families and their presets, by name: where a checkpoint's family and a preset's name become a model.

A new backbone is one module (its config, its `NestedModel` subclass, its `PRESETS`) plus its entry in
`FAMILIES` below.
"""

from __future__ import annotations

import dataclasses

from . import mamba, model
from .config import Preset
from .errors import UserError
from .nested import NestedModel

DEFAULT_FAMILY = "matvit"  # checkpoints written before families were recorded are MatViTs

FAMILIES: dict[str, type[NestedModel]] = {}
PRESETS: dict[str, Preset] = {}


def register(family: type[NestedModel], presets: dict[str, Preset] | None = None) -> None:
    """Make `family` (and its named presets) known to every command."""
    FAMILIES[family.family] = family
    for name, preset in (presets or {}).items():
        PRESETS[name] = preset


register(model.MatViT, model.PRESETS)
register(mamba.MatMamba, mamba.PRESETS)


def family_of(config) -> type[NestedModel]:
    """The family whose config class `config` is."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_class):
            return family
    raise UserError(f"no model family takes a {type(config).__name__}")


def get_preset(name: str) -> Preset:
    """A fresh copy of a named preset; unknown names raise with the list of known ones."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return Preset(type(p.model).from_dict(p.model.to_dict()), dataclasses.replace(p.recipe))


def create(config) -> NestedModel:
    """An untrained model of `config` (any registered family's config)."""
    return family_of(config)(config)


def from_config(family: str, config: dict) -> NestedModel:
    """An untrained model of a checkpoint's `family` and config dict."""
    if family not in FAMILIES:
        raise UserError(f"unknown model family {family!r}; this version knows: {', '.join(FAMILIES)}")
    return FAMILIES[family].from_config(config)
