"""Extraction: a submodel as a standalone, physically smaller plain timm ViT.

The exported directory needs only timm and safetensors to load (see `load_standalone`, which is
the loader docs/exporting.md shows): `VisionTransformer(**timm_kwargs)`, each block `i` given a timm
`Mlp(embed_dim, mlp_hidden_features[i])`, then the state dict loaded strictly.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer

from .errors import make_dir
from .model import MatViT
from .spec import Submodel


def build_standalone(timm_kwargs: dict, mlp_hidden_features: list[int]) -> VisionTransformer:
    """An untrained plain timm ViT with per-block FFN widths."""
    vit = VisionTransformer(**timm_kwargs)
    for block, width in zip(vit.blocks, mlp_hidden_features, strict=True):
        block.mlp = Mlp(vit.embed_dim, width)
    return vit


@torch.no_grad()
def extract(model: MatViT, spec: str | Submodel) -> VisionTransformer:
    """Copy the sliced weights of `spec` into a new plain timm ViT, in eval mode."""
    spec = model.spec(spec)
    vit = build_standalone(model.config.timm_kwargs(), list(spec.widths))
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks" and parts[2] == "mlp":
            k = spec.widths[int(parts[1])]
            if parts[3] == "fc1":
                value = value[:k]
            elif parts[3] == "fc2" and parts[4] == "weight":
                value = value[:, :k]
        state[key] = value.clone()
    vit.load_state_dict(state, strict=True)
    return vit.eval()


class Embedder(torch.nn.Module):
    """Wraps a timm ViT so that forward returns L2-normalised pre-logits embeddings."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.vit.forward_head(self.vit.forward_features(images), pre_logits=True)
        return F.normalize(feats, dim=-1)


def export(model: MatViT, spec: str | Submodel, out: Path, onnx: bool = False, **extra) -> Path:
    """Write `model.safetensors` + `config.json` (and `model.onnx`, embeddings out) to `out`."""
    spec = model.spec(spec)
    vit = extract(model, spec)
    out = make_dir(out)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, out / "model.safetensors")
    config = {
        "timm_kwargs": model.config.timm_kwargs(),
        "mlp_hidden_features": list(spec.widths),
        "submodel": spec.text,
        **extra,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if onnx:
        c = model.config
        example = torch.zeros(1, c.in_chans, c.img_size, c.img_size)
        with warnings.catch_warnings():  # the tracer's notes on timm's shape asserts are not for users
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Embedder(vit).eval(), (example,), str(out / "model.onnx"),
                input_names=["images"], output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, dynamo=False,
            )
    return out


def load_standalone(directory: Path) -> VisionTransformer:
    """Load an exported submodel with timm and safetensors only."""
    config = json.loads((Path(directory) / "config.json").read_text())
    vit = build_standalone(config["timm_kwargs"], config["mlp_hidden_features"])
    vit.load_state_dict(load_file(Path(directory) / "model.safetensors"), strict=True)
    return vit.eval()
