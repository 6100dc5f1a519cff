"""Extraction: the standalone model is smaller, loads with timm alone, and embeds like the nested model."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import torch

from matvit import spec as specs
from matvit.extract import load_standalone


def test_extracted_model_is_physically_smaller(trained):
    small = trained.extract("S").features.vit
    assert small.blocks[0].mlp.fc1.weight.shape == (16, 32)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in trained.parameters())


def test_export_embeddings_equal_the_nested_model(trained, tmp_path):
    x = torch.randn(6, 1, 8, 8)
    for text in ("XL", "S", "S,M,L,XL", "M,S,XL,L"):
        spec = specs.parse(text, trained.config)
        out = trained.export(spec, tmp_path / spec.id)
        config = json.loads((out / "config.json").read_text())
        assert config["mlp_hidden_features"] == list(spec.widths)
        vit = load_standalone(out)
        with torch.no_grad():
            got = torch.nn.functional.normalize(vit.forward_head(vit.forward_features(x), pre_logits=True), dim=-1)
            want = trained.embed(x, spec)
        assert (got - want).abs().max() < 1e-5


LOADER = """
import json, sys
import numpy as np, torch
from safetensors.torch import load_file
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
d = sys.argv[1]
config = json.load(open(f"{d}/config.json"))
vit = VisionTransformer(**config["timm_kwargs"])
for block, width in zip(vit.blocks, config["mlp_hidden_features"]):
    block.mlp = Mlp(vit.embed_dim, width)
vit.load_state_dict(load_file(f"{d}/model.safetensors"), strict=True)
x = torch.from_numpy(np.load(f"{d}/x.npy"))
with torch.no_grad():
    np.save(f"{d}/logits.npy", vit.eval()(x).numpy())
"""


def test_export_loads_with_timm_and_safetensors_only(trained, tmp_path):
    """The loader docs/exporting.md shows, run in a fresh interpreter that never imports the project."""
    out = trained.export("S,S,M,XL", tmp_path / "mix")
    x = torch.randn(3, 1, 8, 8)
    np.save(out / "x.npy", x.numpy())
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    subprocess.run([sys.executable, "-I", str(script), str(out)], check=True, cwd=tmp_path)
    with torch.no_grad():
        want = trained(x, "S,S,M,XL").numpy()
    assert np.abs(np.load(out / "logits.npy") - want).max() < 1e-5


def test_onnx_export_matches_onnxruntime(trained, tmp_path):
    out = trained.export("M", tmp_path / "onnx", onnx=True)
    x = torch.randn(4, 1, 8, 8)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["embeddings"], {"images": x.numpy()})[0]
    with torch.no_grad():
        want = trained.embed(x, "M").numpy()
    assert np.abs(got - want).max() < 1e-5
