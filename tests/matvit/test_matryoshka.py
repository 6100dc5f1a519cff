"""Matryoshka embedding dimensions (`matvit train --embed-dims`): every pass's loss adds each prefix's loss through
the head's matching columns, turned off it is today's training, and the dims travel with checkpoints and exports."""

import json

import pytest
import torch
import torch.nn.functional as F

from matvit import checkpoint, metrics
from matvit.errors import UserError
from matvit.images import to_input
from matvit.train import Trainer, embed_source

from .test_train import _options

QUIET = dict(log=lambda s: None)


@pytest.mark.parametrize("preset", ["matvit-tiny-digits", "matmamba-tiny-digits"])
def test_every_pass_adds_the_loss_of_each_prefix_through_the_heads_columns(tmp_path, preset):
    trainer = Trainer(_options(tmp_path, preset=preset, embed_dims=[16, 8]))
    model = trainer.model
    assert model.dims == [8, 16, 32] and model.config.embed_dims == [8, 16, 32]
    x, y = to_input(trainer.train_set.images[:16]), trainer.train_set.labels[:16]
    smoothing = trainer.recipe.label_smoothing
    for g in ("S", "XL"):
        loss, feats, logits = trainer._loss(x, y, model.spec(g), None)
        head = model.head
        expected = sum(F.cross_entropy(feats[:, :d] @ head.weight[:, :d].T + head.bias, y, label_smoothing=smoothing)
                       for d in (8, 16, 32))
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits, model(x, g), rtol=1e-5, atol=1e-6)


def test_a_cosine_head_classifies_each_prefix_by_its_own_cosine(tmp_path):
    model = Trainer(_options(tmp_path, embed_dims=[8], head="cosine")).model
    feats = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    logits = model.classify(feats, 8)
    expected = 16.0 * F.normalize(feats[:, :8], dim=-1) @ F.normalize(model.head.weight[:, :8], dim=-1).T
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(model.classify(feats), model.classify(feats, 32))


@pytest.mark.parametrize("off", [[], [32]])
def test_turned_off_it_trains_todays_model(tmp_path, small_digits, off):
    runs = {}
    for name, dims in (("today", None), ("off", off)):
        Trainer(_options(tmp_path / name, epochs=1, embed_dims=dims)).run(**QUIET)
        runs[name] = checkpoint.load(tmp_path / name)
    (today, _), (model, meta) = runs["today"], runs["off"]
    assert model.config.embed_dims is None and meta["train"]["recipe"]["embed_dims"] is None
    assert model.dims == [32]
    for key, value in today.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)


def test_a_trained_prefix_classifies_better_than_todays_models_prefix(tmp_path):
    """After 4 epochs with the 4-d prefix's loss, the head's first 4 columns classify the test images' 4-d prefixes
    better than today's model's do."""
    accuracy = {}
    for name, dims in (("today", None), ("matryoshka", [4, 8])):
        trainer = Trainer(_options(tmp_path / name, epochs=4, embed_dims=dims))
        trainer.run(**QUIET)
        queries, _, labels = embed_source(trainer.model, trainer.test_set, trainer.model.spec("XL"))
        with torch.no_grad():
            logits = trainer.model.classify(torch.from_numpy(queries), 4)
        accuracy[name] = metrics.top1(logits.numpy(), labels)
    assert accuracy["matryoshka"] > accuracy["today"] + 0.04, accuracy


def test_the_dims_are_recorded_resumed_and_exported(tmp_path, small_digits):
    opts = _options(tmp_path / "run", epochs=1, embed_dims=[8])
    Trainer(opts).run(**QUIET)
    model, meta = checkpoint.load(tmp_path / "run")
    assert model.dims == [8, 32] and meta["train"]["recipe"]["embed_dims"] == [8, 32]
    with pytest.raises(UserError, match="recipe.embed_dims"):
        Trainer(_options(tmp_path / "run", epochs=1, embed_dims=[16])).run(resume=True, **QUIET)
    model.export("S", tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["embed_dims"] == [8, 32]
    baseline = Trainer(_options(tmp_path / "baseline", embed_dims=[8], baseline="S")).model
    assert baseline.dims == [8, 32]


@pytest.mark.parametrize("dims", [[0], [33], [-4, 8]])
def test_dims_outside_the_embedding_are_refused(tmp_path, dims):
    with pytest.raises(UserError, match="between 1 and the embedding's length \\(32\\)"):
        _options(tmp_path, embed_dims=dims)
