"""Checkpoints: `model.safetensors` plus `config.json` in a directory (the published model), the weights'
fingerprint, and the training checkpoint a run resumes from."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import registry
from .errors import UserError
from .nested import NestedModel

TRAINING_FILE = "training.pt"


class CheckpointError(UserError):
    """A checkpoint directory that cannot be loaded."""


def fingerprint(model: torch.nn.Module) -> str:
    """Short sha256 of the weights (names, shapes and values), stable across save and load."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save(model: NestedModel, directory: Path, **meta) -> None:
    """Write the weights and the config (its family, plus `meta`: classes, dataset, ...) atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "model.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, directory / "model.safetensors")
    config = {"family": model.family, "model": model.config.to_dict(), "fingerprint": fingerprint(model), **meta}
    (directory / "config.json.tmp").write_text(json.dumps(config, indent=2))
    os.replace(directory / "config.json.tmp", directory / "config.json")


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {directory}: {path} is missing (train one with `matvit train`)")
    try:
        config = json.loads(path.read_bytes())
    except ValueError as e:  # not JSON, or not text
        raise CheckpointError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); restore the checkpoint or "
                              "train it again") from e
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path} is not a matvit checkpoint config (no model settings); restore the "
                              "checkpoint or train it again")
    return config


def load(directory: Path) -> tuple[NestedModel, dict]:
    """The model of the checkpoint's family in eval mode, and the checkpoint's config dict."""
    meta = read_config(directory)
    weights = Path(directory) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"no weights in {directory}: {weights} is missing")
    try:
        model = registry.from_config(meta.get("family", registry.DEFAULT_FAMILY), meta["model"])
    except UserError as e:
        raise CheckpointError(f"{Path(directory) / 'config.json'}: {e}") from e
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise CheckpointError(f"{Path(directory) / 'config.json'} does not describe a model ({e}); restore the "
                              "checkpoint or train it again") from e
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is damaged: not a readable safetensors file ({str(e).splitlines()[0]}); "
                              "restore it or train the checkpoint again") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not match its config.json: {str(e).splitlines()[0]}") from e
    return model.eval(), meta


def save_training(directory: Path, state: dict) -> None:
    """Write the whole training state (weights, optimizer, ..., see `train.Trainer.save`) as one file, atomically."""
    tmp = Path(directory) / f"{TRAINING_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, Path(directory) / TRAINING_FILE)


def load_training(directory: Path) -> dict | None:
    """The training state saved in `directory`; None when there is none."""
    path = Path(directory) / TRAINING_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # a GPU run's state loads anywhere
    except Exception as e:  # torch raises several types for a damaged file
        raise CheckpointError(f"cannot read the training checkpoint {path}: {str(e).splitlines()[0]}") from e
