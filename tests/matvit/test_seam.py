"""The model seam: a second backbone, one small module plus its registry entry, works end to end (train,
build-index, search with a submodel and a budget, serve) with no other change."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from app.api import Settings, create_app
from app.cli import main
from matvit import checkpoint, data, registry
from matvit.config import Preset, TrainRecipe
from matvit.errors import make_dir
from matvit.nested import Embedding, NestedConfig, NestedModel
from matvit.spec import Submodel


@dataclass
class ToyConfig(NestedConfig):
    """A residual MLP over the flattened image, its hidden layers nested like MatFormer's FFNs."""

    width_field: ClassVar[str] = "hidden"

    img_size: int = 8
    in_chans: int = 1
    num_classes: int = 10
    depth: int = 2
    embed_dim: int = 16
    hidden: int = 64
    granularities: dict[str, int] = field(default_factory=dict)
    head: str = "linear"
    embed_dims: list[int] | None = None

    def __post_init__(self) -> None:
        self.nest(("linear",))


class ToyFeatures(torch.nn.Module):
    """The embedding path of fixed widths: what extraction returns."""

    def __init__(self, config: ToyConfig, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = torch.nn.Linear(config.in_chans * config.img_size**2, config.embed_dim)
        self.up = torch.nn.ModuleList(torch.nn.Linear(config.embed_dim, w) for w in widths)
        self.down = torch.nn.ModuleList(torch.nn.Linear(w, config.embed_dim) for w in widths)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images.flatten(1))
        for up, down in zip(self.up, self.down, strict=True):
            x = x + down(F.gelu(up(x)))
        return x


class ToyNested(NestedModel):
    family = "toy-mlp"
    label = "ToyMLP"
    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.body = ToyFeatures(config, (config.hidden,) * config.depth)
        self.head = torch.nn.Linear(config.embed_dim, config.num_classes)

    @property
    def embedding_dim(self) -> int:
        return self.config.embed_dim

    def features_and_logits(self, images, spec="XL"):
        x = self.body.stem(images.flatten(1))
        for up, down, k in zip(self.body.up, self.body.down, self.spec(spec).widths, strict=True):
            x = x + F.linear(F.gelu(F.linear(x, up.weight[:k], up.bias[:k])), down.weight[:, :k], down.bias)
        return x, self.head(x)

    def extract(self, spec: str | Submodel) -> Embedding:
        spec = self.spec(spec)
        small = ToyFeatures(self.config, spec.widths)
        state = {}
        for key, value in self.body.state_dict().items():
            part, i, kind = (key.split(".") + [""])[:3]
            k = spec.widths[int(i)] if part in ("up", "down") else None
            if part == "up":
                value = value[:k]
            elif part == "down" and kind == "weight":
                value = value[:, :k]
            state[key] = value.clone()
        small.load_state_dict(state)
        return Embedding(small).eval()

    def plain(self, spec: str | Submodel) -> Embedding:
        return Embedding(ToyFeatures(self.config, self.spec(spec).widths)).eval()

    def export(self, spec, out: Path, onnx: bool = False, **extra) -> Path:
        spec, out = self.spec(spec), make_dir(out)
        save_file({k: v.contiguous() for k, v in self.extract(spec).state_dict().items()}, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps({"widths": list(spec.widths), **extra}))
        return out

    def forward_flops(self, spec, head: bool = False) -> int:
        c = self.config
        return 2 * (c.in_chans * c.img_size**2 * c.embed_dim + sum(2 * c.embed_dim * w for w in self.spec(spec).widths)
                    + (c.embed_dim * c.num_classes if head else 0))

    def num_params(self, spec, head: bool = False) -> int:
        return sum(p.numel() for p in self.extract(spec).parameters()) + (
            self.config.embed_dim * self.config.num_classes + self.config.num_classes if head else 0)


@pytest.fixture(scope="module")
def toy_family():
    """The toy family and its preset, known to every command while the module runs."""
    families, presets = dict(registry.FAMILIES), dict(registry.PRESETS)
    registry.register(ToyNested, {"toy-digits": Preset(ToyConfig(), TrainRecipe(epochs=3, batch_size=32, lr=3e-3))})
    yield
    registry.FAMILIES.clear(), registry.FAMILIES.update(families)
    registry.PRESETS.clear(), registry.PRESETS.update(presets)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_slicing_the_toy_equals_its_extracted_model(toy_family):
    torch.manual_seed(0)
    model = registry.create(registry.get_preset("toy-digits").model).eval()
    x = torch.randn(5, 1, 8, 8)
    for text in ("S", "M,XL", "XL"):
        with torch.no_grad():
            torch.testing.assert_close(model.extract(text)(x), model.embed(x, text), rtol=1e-5, atol=1e-5)


def test_a_second_backbone_trains_indexes_searches_and_serves_through_the_seam(toy_family, tmp_path, capsys):
    run, index = tmp_path / "run", tmp_path / "index"
    assert main(["train", "--preset", "toy-digits", "--dataset", "digits", "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["family"] == "toy-mlp"
    model, _ = checkpoint.load(run)  # the checkpoint's family picks the implementation
    assert isinstance(model, ToyNested)
    eval_json = json.loads((run / "eval.json").read_text())
    assert eval_json["knn1"]["XL"] > 0.6  # digits: a real embedding, well above chance (0.1)

    assert main(["build-index", "--checkpoint", str(run), "--dataset", "digits", "--out", str(index),
                 "--workers", "0"]) == 0
    query = tmp_path / "query.png"
    test = data.load("digits", "test", 8, 1)
    query.write_bytes(png(test.images[0][0].numpy()))
    capsys.readouterr()
    for how in (["--submodel", "S"], ["--submodel", "S,XL"], ["--budget-gflops", "0.0000035"]):
        assert main(["search", "--index", str(index), "--checkpoint", str(run), "--image", str(query), "-k", "3",
                     "--json", *how]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert len(printed["results"]) == 3
        assert printed["submodel"]["spec"] == ("S,XL" if how[1] == "S,XL" else "S")
    settings = Settings(index=index, checkpoint=run)
    with TestClient(create_app(settings, load_in_background=False)) as client:
        r = client.post("/v1/search", files={"file": ("q.png", query.read_bytes(), "image/png")},
                        data={"k": "5", "submodel": "M"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["submodel"]["spec"] == "M" and len(body["results"]) == 5
        assert {hit["label"] for hit in body["results"]} <= set(test.classes)
        submodels = client.get("/v1/submodels").json()
        assert [row["spec"] for row in submodels][:4] == ["S", "M", "L", "XL"]
