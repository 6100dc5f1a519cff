"""MatMamba-Vision: slicing equals a masked full-width oracle, extraction and export equal the nested model, the
cost formulas equal torch's counts, and every command runs on a MatMamba checkpoint."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from app.api import Settings, create_app
from app.cli import main
from matvit import checkpoint, data, registry, ssd
from matvit import spec as specs
from matvit.mamba import NORM_EPS, MambaVision, MatMamba, MatMambaConfig
from matvit.model import MatViT


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: a tiny model's many small ops gain nothing from a second one, and on a busy shared machine
    every op would wait for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**changes) -> MatMamba:
    cfg = registry.get_preset("matmamba-tiny-digits").model
    torch.manual_seed(0)
    return MatMamba(MatMambaConfig.from_dict({**cfg.to_dict(), **changes})).eval()


def masked_mixer(mixer, u: torch.Tensor, k: int) -> torch.Tensor:
    """The oracle of a mixer at inner width k: every weight at full width, the channels (and so the heads) past k
    zeroed, the gated norm's mean square taken over the k kept channels; torch's own depthwise convolution and the
    step-by-step scan."""
    di, n, p = mixer.d_inner, mixer.d_state, mixer.headdim
    keep = (torch.arange(di) < k).to(u.dtype)
    z, xbc, dt = mixer.in_proj(u).split([di, di + 2 * n, di // p], dim=-1)
    xbc = F.silu(mixer.conv1d(xbc.transpose(1, 2))[..., :u.size(1)].transpose(1, 2))
    x, b, c = xbc.split([di, n, n], dim=-1)
    x = (x * keep).unflatten(-1, (di // p, p))
    dt = F.softplus(dt + mixer.dt_bias)
    y = ssd.recurrence(x * dt[..., None], -torch.exp(mixer.A_log) * dt, b, c) + x * mixer.D[:, None]
    y = y.flatten(2) * F.silu(z) * keep
    y = y * torch.rsqrt(y.pow(2).sum(-1, keepdim=True) / k + NORM_EPS) * mixer.norm.weight
    return mixer.out_proj(y)


def masked_features(model: MatMamba, images: torch.Tensor, widths) -> torch.Tensor:
    x = model.tokens(images)
    for block, k in zip(model.blocks, widths, strict=True):
        x = x + masked_mixer(block.mixer, block.norm(x), k)
    return model.pool(x)


def test_slicing_equals_the_masked_full_width_oracle():
    model = tiny()
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for text in ("S", "M", "L", "XL", "S,XL,M,L", "XL,S,S,M"):
        spec = model.spec(text)
        with torch.no_grad():
            torch.testing.assert_close(model.features_and_logits(images, spec)[0],
                                       masked_features(model, images, spec.widths), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the oracle tells widths apart: S is not XL
        assert not torch.allclose(masked_features(model, images, model.spec("S").widths),
                                  masked_features(model, images, model.spec("XL").widths), atol=1e-3)


@pytest.mark.parametrize("head, summary", [("linear", "end"), ("cosine", "end"), ("linear", "middle"),
                                           ("linear", "mean")])
def test_the_extracted_model_equals_the_nested_one(head, summary):
    model = tiny(head=head, summary=summary)
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for text in ("S", "M", "L", "XL", "S,M,L,XL"):
        extracted = model.extract(text)
        vision = extracted.features.vision
        assert isinstance(vision, MambaVision) and not isinstance(vision, MatMamba)
        assert [b.mixer.d_inner for b in vision.blocks] == list(model.spec(text).widths)
        with torch.no_grad():
            feats, logits = model.features_and_logits(images, text)
            torch.testing.assert_close(extracted(images), model.embed(images, text), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(vision(images), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["matmamba-tiny-digits", "matmamba-small-fmnist", "matmamba-small-cifar"])
@pytest.mark.parametrize("text", ["S", "XL", "monotone-mix"])
def test_params_and_flops_match_the_extracted_module(preset, text):
    cfg = registry.get_preset(preset).model
    spec = specs.monotone(cfg)[2] if text == "monotone-mix" else specs.parse(text, cfg)
    model = MatMamba(cfg)
    vision = model.extract(spec).features.vision
    assert model.num_params(spec, head=True) == sum(p.numel() for p in vision.parameters())
    assert model.num_params(spec) == model.num_params(spec, head=True) - cfg.num_classes * (cfg.embed_dim + 1)
    images = torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    for module in (vision, lambda x: model(x, spec)):  # the nested forward computes as little as the extracted one
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(images)
        assert model.forward_flops(spec, head=True) == counter.get_total_flops()
    assert model.forward_flops("S") < model.forward_flops("XL") / 4


@pytest.mark.parametrize("preset", ["matmamba-small-fmnist", "matmamba-ti16"])
def test_the_nested_share_leaves_out_what_every_width_computes(preset):
    cfg = registry.get_preset(preset).model
    model = MatMamba(cfg)
    t, d, n = cfg.tokens, cfg.embed_dim, cfg.d_state
    q = min(cfg.chunk_size, t)
    fixed = 2 * (t - 1) * d * cfg.in_chans * cfg.patch_size**2 + cfg.depth * (  # patches; B and C, and C.B per chunk
        2 * t * d * 2 * n + 2 * -(-t // q) * q * q * n)
    assert model.nested_share() == pytest.approx(1 - fixed / model.forward_flops("XL"), rel=1e-9)
    vision = model.plain("S").features.vision
    assert type(vision) is MambaVision and vision.blocks[0].mixer.d_inner == cfg.d_inner // 8


def test_paper_presets_are_constructible_shapes():
    for preset, low, high in (("matmamba-ti16", 5.9e6, 6.0e6), ("matmamba-vision-35m", 35e6, 37e6),
                              ("matmamba-vision-135m", 133e6, 136e6)):
        cfg = registry.get_preset(preset).model
        assert cfg.granularities == {"S": cfg.d_inner // 8, "M": cfg.d_inner // 4, "L": cfg.d_inner // 2,
                                     "XL": cfg.d_inner}
        model = MatMamba(cfg)
        assert low < model.num_params("XL", head=True) == sum(p.numel() for p in model.parameters()) < high
    assert MatMambaConfig(embed_dim=512).baseline("M").d_inner == 256


def test_a_headdim_that_splits_a_granularity_is_refused():
    with pytest.raises(ValueError, match="granularity S's inner width 8 is not a positive multiple of headdim 12"):
        MatMambaConfig(embed_dim=32, headdim=12)
    with pytest.raises(ValueError, match="wider than d_inner"):
        MatMambaConfig(embed_dim=32, headdim=8, granularities={"S": 8, "XL": 128})


@pytest.mark.parametrize("summary, sees_last_patches", [("end", True), ("middle", False), ("mean", True)])
def test_the_causal_scan_hides_later_patches_from_a_class_token_amid_them(summary, sees_last_patches):
    model = tiny(summary=summary)
    images = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    changed = images.clone()
    changed[:, :, 6:] += 1.0  # the last row of 2x2 patches, after the middle of the sequence
    with torch.no_grad():
        moved = (model.embed(changed, "XL") - model.embed(images, "XL")).abs().max().item()
    assert (moved > 1e-3) == sees_last_patches
    assert model.cls_index == (8 if summary == "middle" else 16)


def test_an_unknown_summary_is_refused():
    with pytest.raises(ValueError, match="unknown summary 'first'; use one of end, middle, mean"):
        MatMambaConfig(embed_dim=32, headdim=8, summary="first")


def test_export_loads_with_the_standalone_class_and_as_onnx(tmp_path):
    import onnxruntime as ort

    model = tiny(summary="middle")
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    out = model.export("S,M,L,XL", tmp_path / "export", onnx=True, note="kept")
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "matmamba" and config["widths"] == [8, 16, 32, 64] and config["note"] == "kept"
    assert config["mamba_kwargs"]["summary"] == "middle"
    loaded = MambaVision.load(out)
    session = ort.InferenceSession(str(out / "model.onnx"))
    with torch.no_grad():
        want = model.embed(images, "S,M,L,XL")
        torch.testing.assert_close(F.normalize(loaded.forward_features(images), dim=-1), want)
    np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], want.numpy(), atol=1e-5)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mamba_run(mamba_trained_dir, tmp_path_factory):
    """A MatMamba of the tiny preset trained briefly on digits, and its index."""
    run, index = mamba_trained_dir, tmp_path_factory.mktemp("matmamba") / "index"
    assert main(["build-index", "--checkpoint", str(run), "--dataset", "digits", "--out", str(index),
                 "--workers", "0"]) == 0
    return run, index


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    path = tmp_path_factory.mktemp("query") / "query.png"
    path.write_bytes(png(data.load("digits", "test", 8, 1).images[0][0].numpy()))
    return path


def test_the_checkpoint_records_its_family_and_loads_back(mamba_run):
    run, _ = mamba_run
    saved = json.loads((run / "config.json").read_text())
    assert saved["family"] == "matmamba" and saved["model"]["headdim"] == 8
    model, _ = checkpoint.load(run)
    assert isinstance(model, MatMamba) and checkpoint.fingerprint(model) == saved["fingerprint"]
    assert json.loads((run / "eval.json").read_text())["knn1"]["XL"] > 0.6  # digits: well above chance (0.1)


def test_every_command_runs_on_a_matmamba_checkpoint(mamba_run, query, tmp_path, capsys):
    run, index = mamba_run
    assert main(["export", "--checkpoint", str(run), "--submodel", "S,M,L,XL", "--out", str(tmp_path / "x")]) == 0
    assert MambaVision.load(tmp_path / "x").blocks[0].mixer.d_inner == 8

    added = tmp_path / "more"
    added.mkdir()
    (added / "a.png").write_bytes(query.read_bytes())
    assert main(["index", "add", "--index", str(index), "--checkpoint", str(run), "--images", str(added),
                 "--workers", "0"]) == 0
    capsys.readouterr()
    for how in (["--submodel", "S"], ["--submodel", "S,M,L,XL"], ["--budget-gflops", "0.00025"],
                ["--submodel", "M", "--backend", "onnx"]):
        assert main(["search", "--index", str(index), "--checkpoint", str(run), "--image", str(query), "-k", "3",
                     "--json", *how]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert len(printed["results"]) == 3
        assert printed["submodel"]["spec"] == {"S,M,L,XL": "S,M,L,XL", "M": "M"}.get(how[1], "S")
    assert printed["results"][0]["label"] is not None

    with TestClient(create_app(Settings(index=index, checkpoint=run), load_in_background=False)) as client:
        r = client.post("/v1/search", files={"file": ("q.png", query.read_bytes(), "image/png")},
                        data={"k": "5", "submodel": "L"})
        assert r.status_code == 200, r.text
        assert r.json()["submodel"]["spec"] == "L" and len(r.json()["results"]) == 5
        rows = client.get("/v1/submodels").json()
        assert [row["spec"] for row in rows][:4] == ["S", "M", "L", "XL"]

    assert main(["profile", "--checkpoint", str(run), "--index", str(index), "--dataset", "digits",
                 "--submodels", "S;S,S,M,XL;XL"]) == 0
    profile = json.loads((index / "profile.json").read_text())
    assert [r["spec"] for r in profile["rows"]] == ["S", "S,S,M,XL", "XL"]
    assert all(r["knn1"] > 0.3 for r in profile["rows"])
    grid = tmp_path / "grid.json"
    assert main(["eval-grid", "--index-checkpoint", str(run), "--dataset", "digits", "--index-submodels", "XL",
                 "--query-submodels", "S;XL", "--out", str(grid)]) == 0
    assert list(json.loads(grid.read_text())["grid"]["XL"]) == ["S", "XL"]


def test_train_with_every_recipe_option_resumes_to_the_uninterrupted_run(tmp_path, small_digits, monkeypatch):
    """`matvit train --mode sample --mixnmatch-prob 0.5 --distill both --precision bf16`, stopped in its second
    epoch and finished by `--resume`, ends with the weights of the run that was never stopped."""
    from safetensors.torch import load_file

    from matvit.train import Trainer

    def argv(out):
        return ["train", "--preset", "matmamba-tiny-digits", "--dataset", "digits", "--out", str(tmp_path / out),
                "--epochs", "2", "--batch-size", "16", "--mode", "sample", "--mixnmatch-prob", "0.5",
                "--distill", "both", "--precision", "bf16", "--seed", "5"]

    assert main(argv("straight")) == 0
    original = Trainer.train_epoch

    def stop_in_second_epoch(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        main(argv("resumed"))
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert not (tmp_path / "resumed" / "eval.json").exists()
    assert main([*argv("resumed"), "--resume"]) == 0
    straight, resumed = (load_file(tmp_path / out / "model.safetensors") for out in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    saved = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert saved["family"] == "matmamba" and saved["train"]["mode"] == "sample"
    assert saved["train"]["distill"] == "both" and saved["train"]["mixnmatch_prob"] == 0.5
    result = json.loads((tmp_path / "resumed" / "eval.json").read_text())
    assert result["precision"] == "bf16" and set(result["knn1"]) == {"S", "M", "L", "XL"}


def test_the_cascade_and_live_index_updates_while_serving(mamba_run, query, capsys):
    """`matvit cascade` calibrates on a MatMamba's index, `search --cascade` and the API's mode=cascade follow it,
    and items added and deleted through the API while it serves are found and then gone."""
    run, index = mamba_run
    assert main(["cascade", "--index", str(index), "--checkpoint", str(run), "--dataset", "digits", "--queries",
                 "200", "--target", "0.99"]) == 0
    stages = json.loads((index / "cascade.json").read_text())["stages"]
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--checkpoint", str(run), "--image", str(query), "-k", "3",
                 "--json", "--cascade"]) == 0
    printed = json.loads(capsys.readouterr().out)
    ran = printed["cascade"]["ran"]
    assert ran == stages[:len(ran)] and printed["submodel"]["spec"] == ran[-1] and len(printed["results"]) == 3

    image = png(np.full((8, 8), 255, dtype=np.uint8))  # a blank square: nothing like a digit
    with TestClient(create_app(Settings(index=index, checkpoint=run), load_in_background=False)) as client:
        r = client.post("/v1/search", files={"file": ("q.png", query.read_bytes(), "image/png")},
                        data={"mode": "cascade", "k": "2"})
        assert r.status_code == 200, r.text
        assert r.json()["cascade"]["ran"] == stages[:len(r.json()["cascade"]["ran"])]
        count = client.get("/v1/index").json()["count"]
        r = client.post("/v1/items", files={"files": ("blank.png", image, "image/png")}, data={"labels": ["blank"]})
        assert r.status_code == 201, r.text
        added = r.json()["items"][0]["id"]
        assert client.get("/v1/index").json()["count"] == count + 1
        hits = client.post("/v1/search", files={"file": ("b.png", image, "image/png")}, data={"k": "1"}).json()
        assert hits["results"][0]["id"] == added and hits["results"][0]["label"] == "blank"
        assert client.delete(f"/v1/items/{added}").json() == {"deleted": [added]}
        hits = client.post("/v1/search", files={"file": ("b.png", image, "image/png")}, data={"k": "50"}).json()
        assert added not in [h["id"] for h in hits["results"]]
        assert client.get("/v1/index").json()["count"] == count


def test_a_matmamba_checkpoint_never_queries_a_matvit_index(mamba_run, query, tmp_path, capsys):
    run, _ = mamba_run
    torch.manual_seed(0)
    vit = MatViT(registry.get_preset("matvit-tiny-digits").model)  # the same embedding width as the MatMamba
    checkpoint.save(vit, tmp_path / "vit", classes=[str(i) for i in range(10)])
    assert main(["build-index", "--checkpoint", str(tmp_path / "vit"), "--dataset", "digits", "--out",
                 str(tmp_path / "vit-index"), "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "vit-index"), "--checkpoint", str(run), "--image",
                 str(query)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the index's" in err[0]


def test_an_onnx_exporter_that_cannot_take_the_scan_is_one_line(mamba_run, tmp_path, capsys, monkeypatch):
    run, _ = mamba_run

    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::cumsum' to ONNX opset version 20 is not supported")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot export the MatMamba scan" in err[0] and "aten::cumsum" in err[0]
    assert not (tmp_path / "x" / "model.onnx").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "matmamba-tiny-digits", "--dataset", "digits", "--dense-epochs", "1"],
     "the dense warm-up orders a ViT's FFN neurons, and --preset matmamba-tiny-digits is not a MatViT"),
    (["induce", "--preset", "matmamba-tiny-digits", "--from", "plain.safetensors", "--dataset", "digits"],
     "--preset matmamba-tiny-digits is not a MatViT: induce makes a MatViT of a plain ViT"),
])
def test_what_only_applies_to_a_vit_is_refused_in_one_line(argv, message, tmp_path, capsys):
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out" / "dense").exists()
