"""Inducing a MatViT from a plain timm ViT: reordering keeps the XL function, importance finds the neuron made
important, checkpoints load from every format (or fail in one line), and joint training lifts the raw slices."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from app.cli import main
from matvit import checkpoint, sources
from matvit import induce as ind
from matvit.errors import UserError
from matvit.images import to_input
from matvit.induce import InduceError, InduceOptions
from matvit.model import MatViT
from matvit.registry import get_preset
from matvit.train import Trainer, TrainOptions, evaluate_checkpoint
from scripts.studies.induce import find_reference

PRESET = "matvit-tiny-digits"


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's operations are too small to share: one thread is as fast alone and far faster on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
QUIET = dict(log=lambda s: None)


def _config():
    return get_preset(PRESET).model


def _dense(seed: int = 0) -> MatViT:
    torch.manual_seed(seed)
    return MatViT(_config()).eval()


def _timm_vit(**kwargs) -> VisionTransformer:
    """A plain timm ViT of the tiny preset's shape, changed by `kwargs`."""
    cfg = {**_config().timm_kwargs(), **kwargs}
    torch.manual_seed(1)
    return VisionTransformer(**cfg).eval()


def _images(n: int = 16) -> torch.Tensor:
    return to_input(sources.open_source("digits", "test", 8, 1).images[:n])


def _options(tmp_path, source, **kwargs) -> InduceOptions:
    return InduceOptions(**{"source": str(source), "preset": PRESET, "dataset": "digits", "out": tmp_path / "out",
                            "importance_batches": 4, **kwargs})


def test_reordering_leaves_xl_unchanged_and_changes_the_slices():
    model = _dense()
    x = _images()
    with torch.no_grad():
        xl, s = model(x, "XL"), model(x, "S")
    gen = torch.Generator().manual_seed(3)
    ind.reorder(model, [torch.randperm(b.mlp.fc1.out_features, generator=gen) for b in model.blocks])
    with torch.no_grad():
        assert torch.allclose(model(x, "XL"), xl, atol=1e-5)
        assert not torch.allclose(model(x, "S"), s, atol=1e-3)


@pytest.mark.parametrize("importance", ["weight", "taylor"])
def test_the_neuron_made_important_comes_first(importance):
    model, neuron = _dense(), 77
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc1.weight[neuron] *= 10
            block.mlp.fc1.bias[neuron] = 1.0
            block.mlp.fc2.weight[:, neuron] *= 10
    row = [b.mlp.fc1.weight[neuron].clone() for b in model.blocks]
    source = sources.open_source("digits", "train", 8, 1)
    scores = (ind.weight_scores(model) if importance == "weight"
              else ind.taylor_scores(model, source, batch_size=32, batches=2, seed=0))
    orders = ind.orders_of(scores)
    assert [int(o[0]) for o in orders] == [neuron] * len(model.blocks)
    ind.reorder(model, orders)
    for block, r in zip(model.blocks, row, strict=True):
        assert torch.equal(block.mlp.fc1.weight[0], r)
    shares = ind.prefix_shares(scores[0][orders[0]], _config().granularities)
    assert shares["S"] > 0.125 and shares["S"] < shares["M"] < shares["L"] < 1


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "state_dict", "model", "module", "directory"])
def test_loads_safetensors_torch_files_and_checkpoint_dirs(tmp_path, fmt):
    dense = _dense(seed=5)
    state = dense.state_dict()
    path = tmp_path / {"safetensors": "vit.safetensors", "directory": "model.safetensors"}.get(fmt, "vit.pth")
    if fmt in ("safetensors", "directory"):
        save_file(state, path)
    else:
        wrapped = {"state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state},
                   "module": {f"module.{k}": v for k, v in state.items()}}.get(fmt, state)
        torch.save(wrapped, path)
    plain = ind.load_plain(str(tmp_path if fmt == "directory" else path))
    model, reinit = ind.fit(plain, _config(), PRESET, **QUIET)
    assert not reinit
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("change, message", [
    (dict(embed_dim=48), "the preset has embed dim 32, depth 4, FFN width 128; the checkpoint has embed dim 48, "
                         "depth 4, FFN width 192"),
    (dict(depth=3), "the checkpoint has embed dim 32, depth 3, FFN width 128"),
    (dict(mlp_ratio=2.0), "the checkpoint has embed dim 32, depth 4, FFN width 64"),
])
def test_wrong_shapes_are_one_line_errors(tmp_path, change, message):
    save_file(_timm_vit(**change).state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(InduceError, match="does not fit --preset matvit-tiny-digits") as e:
        ind.fit(ind.load_plain(str(tmp_path / "vit.safetensors")), _config(), PRESET, **QUIET)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_head_count_from_a_config_beside_the_file(tmp_path):
    save_file(_dense().state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit", "model_args": {"num_heads": 4}}))
    with pytest.raises(InduceError, match="the preset has .* heads 2; the checkpoint has .* heads 4"):
        ind.fit(ind.load_plain(str(tmp_path)), _config(), PRESET, **QUIET)


@pytest.mark.parametrize("content, message", [
    (None, "no checkpoint file at"),
    (b"not a checkpoint at all", "cannot read"),
    ({"weights": [1, 2]}, "holds no state dict of tensors"),
    ({"cls_token": torch.zeros(1, 1, 32)}, "is not a timm VisionTransformer state dict"),
])
def test_unreadable_checkpoints_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "vit.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(InduceError, match=message) as e:
        ind.fit(ind.load_plain(str(path)), _config(), PRESET, **QUIET)
    assert "\n" not in str(e.value)


def test_other_image_size_channels_and_classes_are_adapted_by_timm(tmp_path):
    vit = _timm_vit(img_size=16, in_chans=3, num_classes=5)
    torch.save({"state_dict": vit.state_dict()}, tmp_path / "vit.pth")
    notes = []
    model, reinit = ind.fit(ind.load_plain(str(tmp_path / "vit.pth")), _config(), PRESET, log=notes.append)
    assert reinit
    assert any("position embedding resampled from 65 to 17 tokens" in n for n in notes)
    assert any("from 3 to 1 input channels" in n for n in notes)
    assert any("head re-initialised: the checkpoint has 5 classes, the dataset 10" in n for n in notes)
    assert torch.equal(model.blocks[2].mlp.fc1.weight, vit.blocks[2].mlp.fc1.weight)
    with torch.no_grad():
        assert torch.isfinite(model(_images())).all()


def test_a_reinitialised_head_is_fitted_before_the_taylor_score(tmp_path):
    torch.save({"model": _timm_vit(num_classes=3).state_dict()}, tmp_path / "vit.pth")
    model, summary = ind.prepare(_options(tmp_path, tmp_path / "vit.pth", importance="taylor"), **QUIET)
    accuracy = summary["head_fit_accuracy"]
    assert summary["head_reinitialised"] and accuracy["after"] > max(0.2, accuracy["before"] + 0.1)
    assert any("head fitted alone" in n for n in summary["notes"])
    assert set(load_file(tmp_path / "out" / ind.INDUCED_FILE)) == set(model.state_dict())


def test_none_keeps_the_order_and_the_summary_says_so(tmp_path):
    dense = _dense(seed=2)
    save_file(dense.state_dict(), tmp_path / "vit.safetensors")
    _, summary = ind.prepare(_options(tmp_path, tmp_path / "vit.safetensors", importance="none"), **QUIET)
    induced = load_file(tmp_path / "out" / ind.INDUCED_FILE)
    assert all(torch.equal(induced[k], v) for k, v in dense.state_dict().items())
    on_disk = json.loads((tmp_path / "out" / ind.SUMMARY_FILE).read_text())
    assert on_disk["scored_with"] == "weight" and on_disk["blocks"][0]["before"] == on_disk["blocks"][0]["after"]
    assert summary["mean_after"]["S"] == pytest.approx(0.125, abs=0.06)


def test_timm_name_without_network_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(ind, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("must not try the hub"))
    with pytest.raises(InduceError, match="timm:vit_tiny_patch16_224 needs the Hugging Face hub, which cannot be "
                                          "reached from here"):
        ind.load_plain("timm:vit_tiny_patch16_224")
    assert main(["induce", "--from", "timm:vit_tiny_patch16_224", "--preset", PRESET, "--dataset", "digits",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("matvit: error: timm:vit_tiny_patch16_224 needs the Hugging Face hub")


def test_timm_name_errors_and_success(monkeypatch):
    with pytest.raises(InduceError, match="timm has no model named 'no_such_vit'"):
        ind.load_plain("timm:no_such_vit")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def offline(*args, **kwargs):
        raise OSError("We have no connection\nand a long explanation")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(InduceError, match="cannot load pretrained timm:vit_tiny_patch16_224: We have no "
                                          "connection; save the weights") as e:
        ind.load_plain("timm:vit_tiny_patch16_224")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained: _timm_vit(num_heads=4))
    plain = ind.load_plain("timm:vit_tiny_patch16_224")
    assert plain.origin == "timm:vit_tiny_patch16_224" and plain.num_heads == 4
    with pytest.raises(InduceError, match="heads 4"):
        ind.fit(plain, _config(), PRESET, **QUIET)


def test_cli_epochs_0_evaluates_the_raw_slices(tmp_path, small_digits, capsys):
    save_file(_dense().state_dict(), tmp_path / "vit.safetensors")
    out = tmp_path / "out"
    assert main(["induce", "--from", str(tmp_path / "vit.safetensors"), "--preset", PRESET, "--dataset", "digits",
                 "--out", str(out), "--epochs", "0", "--importance", "weight", "--importance-batches", "2"]) == 0
    text = capsys.readouterr().out
    assert "share" in text and text.count("\n") >= 5
    evaluated = json.loads((out / "eval.json").read_text())
    assert set(evaluated["knn1"]) == {"S", "M", "L", "XL"} and evaluated["train_seconds"] == 0
    assert json.loads((out / "config.json").read_text())["train"]["init"] == str(out / ind.INDUCED_FILE)


def _s_loss(model: MatViT, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model.eval()(to_input(images), "S"), labels).item()


def test_one_joint_epoch_lifts_the_raw_slices_of_a_trained_dense_vit(tmp_path):
    dense = tmp_path / "dense"
    Trainer(TrainOptions(preset=PRESET, dataset="digits", out=dense, epochs=3, lr=5e-3, baseline="XL")).run(**QUIET)
    test = sources.open_source("digits", "test", 8, 1)
    raw, _ = ind.prepare(_options(tmp_path, dense, out=tmp_path / "raw"), **QUIET)
    result = ind.induce(_options(tmp_path, dense, out=tmp_path / "joint", epochs=1), **QUIET)
    joint, _ = checkpoint.load(tmp_path / "joint")
    raw_eval = evaluate_checkpoint(raw, sources.open_source("digits", "train", 8, 1), test)
    assert _s_loss(joint, test.images, test.labels) < _s_loss(raw, test.images, test.labels) - 0.05
    assert result["eval"]["knn1"]["S"] > raw_eval["knn1"]["S"]
    assert result["induce"]["mean_after"]["S"] > 0.125


def test_bench_writes_each_step_and_skips_what_it_is_told(tmp_path):
    from scripts.studies.induce import Bench, InduceBenchOptions

    reference = tmp_path / "consistency.json"  # a reference whose baseline S every MatViT beats
    knn = lambda v: {i: {q: {"knn1": v} for q in "S M L XL".split()} for i in "S M L XL".split()}  # noqa: E731
    reference.write_text(json.dumps({"epochs": 2, "matvit": {"grid": knn(0.5)}, "baseline": {"grid": knn(0.0)},
                                     "train_seconds": {"matvit": 1.0, "baseline": {"S": 1.0}},
                                     "command": "c", "commit": "x"}))
    opts = InduceBenchOptions(dataset="digits", preset=PRESET, out=tmp_path / "out", epochs=1, dense_epochs=1,
                              importances=("weight",), scratch=False, cache=tmp_path / "runs", reference=reference,
                              full_run=tmp_path / "no-full-run", log=lambda s: None)
    result = Bench(opts).run()
    assert list(result["steps"]) == ["dense", "weight-0", "weight-1"]  # no scratch, no full-recipe run
    induced = result["steps"]["weight-1"]
    assert induced["epochs"] == {"dense": 1, "joint": 1}
    assert [t["met"] for t in induced["targets"][:2]] == [True, True]
    assert induced["targets"][1]["xl_s"] == induced["grid"]["XL"]["S"]["knn1"] > 0.15  # chance is 0.1
    for name in ("induce.json", "induce.md", "induce.png", "steps/weight-1.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert not (tmp_path / "runs" / "scratch-1").exists()
    assert "from scratch" not in (tmp_path / "out" / "induce.md").read_text()


def test_the_full_recipe_row_counts_its_dense_warm_up(tmp_path, small_digits, monkeypatch):
    from matvit import config, registry, warmup
    from scripts.studies.induce import Bench, InduceBenchOptions

    warm = config.Preset(_config(), config.TrainRecipe(epochs=1, batch_size=32, augment="none", dense_epochs=1))
    monkeypatch.setitem(registry.PRESETS, PRESET, warm)
    full = tmp_path / "full"
    warmup.train(TrainOptions(PRESET, "digits", full), **QUIET)
    opts = InduceBenchOptions(dataset="digits", preset=PRESET, out=tmp_path / "out", epochs=1, dense_epochs=1,
                              importances=("weight",), scratch=False, cache=tmp_path / "runs", full_run=full,
                              log=lambda s: None)
    row = Bench(opts).full()
    dense_seconds = json.loads((full / "dense/eval.json").read_text())["train_seconds"]
    assert row["epochs"] == {"dense": 1, "joint": 1} and row["settings"]["dense_epochs"] == 1
    joint_seconds = json.loads((full / "train_log.jsonl").read_text().splitlines()[-1])["seconds"]
    assert row["seconds"]["dense"] == dense_seconds and row["seconds"]["joint"] == pytest.approx(joint_seconds, abs=0.2)


def test_a_dense_warm_up_trains_orders_by_weight_then_starts_the_joint_training_there(tmp_path, small_digits, capsys):
    out = tmp_path / "warm"
    args = ["train", "--preset", PRESET, "--dataset", "digits", "--out", str(out), "--dense-epochs", "1",
            "--epochs", "0", "--resume"]
    assert main(args) == 0
    dense, _ = checkpoint.load(out / "dense")
    assert dense.config.granularities == {"XL": 128} and len((out / "dense/train_log.jsonl").read_text().split()) > 0
    ind.reorder(dense, ind.orders_of(ind.weight_scores(dense)))
    induced = load_file(out / ind.INDUCED_FILE)
    assert all(torch.allclose(v, induced[k]) for k, v in dense.state_dict().items())
    joint, meta = checkpoint.load(out)  # no joint epochs: the published model is the reordered dense one
    assert all(torch.allclose(v, induced[k]) for k, v in joint.state_dict().items())
    assert set(joint.config.granularities) == {"S", "M", "L", "XL"}
    assert meta["train"]["recipe"]["dense_epochs"] == 1 and meta["train"]["init"] is None
    evaluated = json.loads((out / "eval.json").read_text())
    dense_seconds = json.loads((out / "dense/eval.json").read_text())["train_seconds"]
    # No joint epochs: the training seconds are the warm-up's (rounded to 0.1 s, so 0.0 on a fast machine).
    assert evaluated["dense_warmup"]["train_seconds"] == dense_seconds == evaluated["train_seconds"] >= 0
    capsys.readouterr()
    assert main(args) == 0  # resumed: the finished warm-up is reused, not trained again
    assert "reusing the finished dense warm-up" in capsys.readouterr().out
    assert len((out / "dense/train_log.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("kwargs, dense_epochs", [({"dense_epochs": 0}, None), ({}, None),
                                                  ({"dense_epochs": 2, "baseline": "S"}, None),
                                                  ({"dense_epochs": 2}, 2)])
def test_dense_epochs_off_for_zero_and_baselines(tmp_path, kwargs, dense_epochs):
    assert TrainOptions(PRESET, "digits", tmp_path, **kwargs).recipe.dense_epochs == dense_epochs


@pytest.mark.parametrize("kwargs, dense_epochs", [({}, 5), ({"dense_epochs": 0}, None), ({"dense_epochs": 2}, 2),
                                                  ({"init": "w.safetensors"}, None), ({"baseline": "S"}, None)])
def test_a_presets_warm_up_gives_way_to_zero_to_a_baseline_and_to_starting_weights(tmp_path, kwargs, dense_epochs):
    opts = TrainOptions("matvit-small-fmnist", "fashion-mnist", tmp_path, **kwargs)
    assert opts.recipe.dense_epochs == opts.to_dict()["dense_epochs"] == dense_epochs


@pytest.mark.parametrize("kwargs, message", [({"dense_epochs": -1}, "must be 0 .no dense warm-up. or more"),
                                             ({"dense_epochs": 1, "init": "w.safetensors"}, "drop --init")])
def test_bad_dense_warm_ups_are_one_line_errors(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        TrainOptions(PRESET, "digits", tmp_path, **kwargs)


def test_the_reference_is_the_consistency_result_of_the_presets_own_recipe(tmp_path):
    recipe = get_preset("matvit-small-fmnist").recipe
    own = {"dataset": "fashion-mnist", "preset": "matvit-small-fmnist", "epochs": recipe.epochs,
           "dense_epochs": recipe.dense_epochs, "augment": recipe.augment, "mixnmatch_prob": 0.0, "seeds": [0]}
    results = {"a-plain": {**own, "dense_epochs": None, "epochs": 10, "seeds": [0, 1, 2]},  # first by name
               "b-mixnmatch": {**own, "mixnmatch_prob": 0.5, "seeds": [0, 1, 2]},
               "c-default": own, "d-default-seeds": {**own, "seeds": [0, 1, 2]},
               "e-other-dataset": {**own, "dataset": "digits", "seeds": [0, 1, 2, 3]}}
    for name, r in results.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "consistency.json").write_text(json.dumps(r))
    assert find_reference("fashion-mnist", "matvit-small-fmnist", tmp_path) == tmp_path / "d-default-seeds" / \
        "consistency.json"
    (tmp_path / "c-default" / "consistency.json").unlink()
    (tmp_path / "d-default-seeds" / "consistency.json").unlink()
    assert find_reference("fashion-mnist", "matvit-small-fmnist", tmp_path) == tmp_path / "a-plain" / \
        "consistency.json"  # no result of the own recipe: the most seeds
    assert find_reference("cifar", "matvit-small-fmnist", tmp_path) is None
