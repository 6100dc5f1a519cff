"""MatViT's standalone submodels: a spec's sliced weights in a physically smaller plain timm ViT.

The exported directory needs only timm and safetensors to load (see `load_standalone`, which is
the loader docs/exporting.md shows): `VisionTransformer(**timm_kwargs)`, each block `i` given a timm
`Mlp(embed_dim, mlp_hidden_features[i])`, then the state dict loaded strictly.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer

from .errors import make_dir
from .nested import Embedding


def build_standalone(timm_kwargs: dict, mlp_hidden_features: list[int]) -> VisionTransformer:
    """An untrained plain timm ViT with per-block FFN widths."""
    vit = VisionTransformer(**timm_kwargs)
    for block, width in zip(vit.blocks, mlp_hidden_features, strict=True):
        block.mlp = Mlp(vit.embed_dim, width)
    return vit


@torch.no_grad()
def sliced(state: dict[str, torch.Tensor], timm_kwargs: dict, widths: list[int]) -> VisionTransformer:
    """A plain timm ViT of per-block FFN `widths` holding the first neurons of a MatViT's `state`, in eval mode."""
    vit = build_standalone(timm_kwargs, widths)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "blocks" and parts[2] == "mlp":
            k = widths[int(parts[1])]
            if parts[3] == "fc1":
                value = value[:k]
            elif parts[3] == "fc2" and parts[4] == "weight":
                value = value[:, :k]
        out[key] = value.clone()
    vit.load_state_dict(out, strict=True)
    return vit.eval()


class Features(torch.nn.Module):
    """A timm ViT's embedding path: the pre-logits CLS feature after the final norm."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.forward_features(images), pre_logits=True)


def write(vit: VisionTransformer, out: Path, timm_kwargs: dict, widths: list[int], meta: dict,
          onnx: bool = False) -> Path:
    """Write `model.safetensors` + `config.json` (and `model.onnx`, embeddings out) to `out`."""
    out = make_dir(out)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, out / "model.safetensors")
    config = {"timm_kwargs": timm_kwargs, "mlp_hidden_features": widths, **meta}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if onnx:
        size, chans = timm_kwargs["img_size"], timm_kwargs["in_chans"]
        with warnings.catch_warnings():  # the tracer's notes on timm's shape asserts are not for users
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Embedding(Features(vit)).eval(), (torch.zeros(1, chans, size, size),), str(out / "model.onnx"),
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
