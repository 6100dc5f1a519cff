"""Joint training: losses fall in both modes, every option takes effect, checkpoints round-trip, and resume
(after a crash anywhere, even while saving) equals an uninterrupted run."""

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from matvit import checkpoint
from matvit.errors import UserError
from matvit.images import to_input
from matvit.train import Trainer, TrainOptions, augment, relational_loss

QUIET = dict(log=lambda s: None)


def _options(out, **kwargs) -> TrainOptions:
    return TrainOptions(**{"preset": "matvit-tiny-digits", "dataset": "digits", "out": out, **kwargs})


def _batch(trainer: Trainer, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return to_input(trainer.train_set.images[:n]), trainer.train_set.labels[:n]


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in trainer.model.named_parameters()}


def _batch_losses(trainer: Trainer, images, labels) -> dict[str, float]:
    trainer.model.eval()
    with torch.no_grad():
        return {g: F.cross_entropy(trainer.model(to_input(images), g), labels).item() for g in trainer.granularities}


@pytest.mark.parametrize("preset, mode", [("matvit-tiny-digits", "sum"), ("matvit-tiny-digits", "sample"),
                                          ("matmamba-tiny-digits", "sample")])
def test_an_epoch_lowers_the_loss_of_every_granularity(tmp_path, preset, mode):
    trainer = Trainer(_options(tmp_path, preset=preset, mode=mode, epochs=3, seed=1))
    images, labels = trainer.train_set.images[:256], trainer.train_set.labels[:256]
    before = _batch_losses(trainer, images, labels)
    for _ in range(2):
        trainer.train_epoch()
        trainer.epoch += 1
    after = _batch_losses(trainer, images, labels)
    assert all(after[g] < before[g] for g in before), (before, after)


def test_relational_distillation_matches_the_students_similarities_to_the_teachers_batch(tmp_path, small_digits):
    teacher = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    assert relational_loss(3 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)  # scale-free: cosines
    assert relational_loss(teacher.flip(0), teacher).item() > 0.1
    trainer = Trainer(_options(tmp_path, distill="relational"))
    x, y = _batch(trainer)
    with torch.no_grad():
        teacher_feats, _ = trainer.model.features_and_logits(x, "XL")
    passes = trainer.passes(random.Random(0))
    for p, (loss, _) in zip(passes, trainer.accumulate(x, y, passes), strict=True):
        with torch.no_grad():
            feats, logits = trainer.model.features_and_logits(x, p.spec)
            want = F.cross_entropy(logits, y, label_smoothing=trainer.recipe.label_smoothing)
            if p.granularity != "XL":
                want = want + relational_loss(feats, teacher_feats)
        torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)


def _sliced_grad(block) -> torch.Tensor:
    """The gradient of a block's weight whose rows past a granularity's width only wider passes use: a ViT's
    first FFN layer, a MatMamba's output projection (one column per inner channel)."""
    return block.mlp.fc1.weight.grad if hasattr(block, "mlp") else block.mixer.out_proj.weight.grad.T


@pytest.mark.parametrize("preset", ["matvit-tiny-digits", "matmamba-tiny-digits"])
@pytest.mark.parametrize("mode", ["sum", "sample"])
def test_distillation_from_xl_enters_the_loss_of_every_smaller_pass(tmp_path, small_digits, mode, preset):
    trainer = Trainer(_options(tmp_path, preset=preset, mode=mode, distill="both", mixnmatch_prob=1.0))
    x, y = _batch(trainer)
    smoothing = trainer.recipe.label_smoothing
    with torch.no_grad():
        teacher_feats, teacher_logits = trainer.model.features_and_logits(x, "XL")
    rng, seen = random.Random(0), set()
    for _ in range(6):
        passes = trainer.passes(rng)
        results = trainer.accumulate(x, y, passes)
        assert len(results) == len(passes)
        for p, (loss, _) in zip(passes, results, strict=True):
            with torch.no_grad():
                feats, logits = trainer.model.features_and_logits(x, p.spec)
                want = F.cross_entropy(logits, y, label_smoothing=smoothing)
                if p.granularity != "XL":
                    want = want + F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1),
                                           log_target=True, reduction="batchmean")
                    want = want + (1 - F.cosine_similarity(feats, teacher_feats, dim=-1)).mean()
            torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)
            seen.add(p.granularity)
    assert None in seen and seen & {"S", "M", "L"}
    if mode == "sample":  # the teacher's forward leaves no gradient: an S pass trains only S's first neurons
        smallest = next(p for p in (trainer.passes(rng)[0] for _ in range(100)) if p.granularity == "S")
        trainer.accumulate(x, y, [smallest])
        k = smallest.spec.widths[0]
        assert all(not _sliced_grad(b)[k:].any() for b in trainer.model.blocks)
        assert all(_sliced_grad(b)[:k].any() for b in trainer.model.blocks)


@pytest.mark.parametrize("preset", ["matvit-tiny-digits", "matmamba-tiny-digits"])
def test_mixnmatch_adds_a_mixed_pass_that_trains(tmp_path, small_digits, preset):
    rng = random.Random(0)
    for prob, low, high in ((0.0, 0, 0), (0.5, 70, 130), (1.0, 200, 200)):
        trainer = Trainer(_options(tmp_path, preset=preset, mixnmatch_prob=prob, weights=[1, 2, 3, 4]))
        plans = [trainer.passes(rng) for _ in range(200)]
        mixed = [plan[-1] for plan in plans if plan[-1].granularity is None]
        assert low <= len(mixed) <= high, (prob, len(mixed))
        assert all(len(plan) == 4 + (plan[-1].granularity is None) for plan in plans)
        assert all(list(p.spec.widths) == sorted(p.spec.widths) and p.weight == 2.5 for p in mixed)
    x, y = _batch(trainer)
    plan = next(plan for plan in plans if not plan[-1].spec.uniform)
    trainer.accumulate(x, y, plan)
    with_mix = _grads(trainer)
    trainer.accumulate(x, y, plan[:-1])
    without = _grads(trainer)
    trainer.accumulate(x, y, plan[-1:])
    alone = _grads(trainer)
    for k in alone:
        torch.testing.assert_close(with_mix[k] - without[k], alone[k], rtol=1e-4, atol=1e-6)
    assert any(alone[k].abs().sum() > 0 for k in alone)


def test_weights_scale_the_losses_in_sum_mode_and_the_draws_in_sample_mode(tmp_path, small_digits):
    grads = {}
    for weights in ([2, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]):
        trainer = Trainer(_options(tmp_path, weights=weights))
        x, y = _batch(trainer)
        trainer.accumulate(x, y, trainer.passes(random.Random(0)))
        grads[tuple(weights)] = _grads(trainer)
    for k, small_only in grads[(1, 0, 0, 0)].items():
        torch.testing.assert_close(grads[(2, 1, 1, 1)][k] - grads[(1, 1, 1, 1)][k], small_only, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[(1, 0, 0, 0)].values())

    trainer = Trainer(_options(tmp_path, mode="sample", weights=[0, 0, 1, 3]))
    rng = random.Random(0)
    drawn = [trainer.passes(rng)[0] for _ in range(400)]
    assert {p.granularity for p in drawn} == {"L", "XL"} and all(p.weight == 1.0 for p in drawn)
    assert 250 < sum(p.granularity == "XL" for p in drawn) < 350


def test_baseline_is_a_plain_vit_of_one_width(tmp_path):
    trainer = Trainer(_options(tmp_path, epochs=1, baseline="M"))
    assert trainer.model.config.granularities == {"M": 32}
    assert trainer.model.blocks[0].mlp.fc1.out_features == 32
    result = trainer.run(**QUIET)
    assert set(result["top1"]) == {"M"}


def test_cosine_head_trains_and_round_trips_and_a_bad_head_is_refused(tmp_path):
    trainer = Trainer(_options(tmp_path, epochs=1, head="cosine", baseline="S"))
    assert trainer.model.config.head == "cosine"
    result = trainer.run(**QUIET)
    assert result["knn1"]["S"] > 0.3  # chance is 0.1
    loaded, _ = checkpoint.load(tmp_path)
    assert loaded.config.head == "cosine"
    with pytest.raises(UserError, match="unknown head 'arc'"):
        _options(tmp_path, head="arc")


def test_run_writes_outputs_and_checkpoint_round_trips(trainer, trained_dir):
    assert {p.name for p in trained_dir.iterdir()} >= {"model.safetensors", "config.json", "train_log.jsonl",
                                                      "eval.json", checkpoint.TRAINING_FILE}
    log = [json.loads(line) for line in (trained_dir / "train_log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in log] == list(range(1, 9))
    assert set(log[0]["loss"]) == set(log[0]["acc"]) == {"S", "M", "L", "XL"}
    result = json.loads((trained_dir / "eval.json").read_text())
    assert set(result["top1"]) == set(result["knn1"]) == {"S", "M", "L", "XL"}
    assert all(v > 0.3 for v in result["knn1"].values())  # well above the 0.1 of chance

    model = trainer.model.eval()
    loaded, meta = checkpoint.load(trained_dir)
    assert meta["fingerprint"] == checkpoint.fingerprint(model)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for spec in ("XL", "S", "S,M,L,XL"):
            torch.testing.assert_close(loaded(x, spec), model(x, spec), rtol=0, atol=0)
            torch.testing.assert_close(loaded.embed(x, spec), model.embed(x, spec), rtol=0, atol=0)
    state = torch.load(trained_dir / checkpoint.TRAINING_FILE, weights_only=True)
    published = load_file(trained_dir / "model.safetensors")
    assert state["model"].keys() == published.keys()
    assert all(torch.equal(state["model"][k], published[k]) for k in published)


def test_training_checkpoint_is_one_file_with_the_whole_state(tmp_path, small_digits):
    trainer = Trainer(_options(tmp_path, epochs=1, weights=[1, 1, 2, 2]))
    trainer.run(**QUIET)
    assert not (tmp_path / "train_state.pt").exists()
    state = torch.load(tmp_path / checkpoint.TRAINING_FILE, weights_only=True)
    assert state["epoch"] == 1 and state["seconds"] > 0 and state["options"] == trainer.opts.to_dict()
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3  # 96 images, batches of 32

    fresh = Trainer(_options(tmp_path, epochs=1, weights=[1, 1, 2, 2]))
    fresh.restore()
    assert (fresh.epoch, fresh.seconds, fresh.scheduler.last_epoch) == (1, state["seconds"], 3)
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    torch.testing.assert_close(fresh.model.state_dict(), trainer.model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(fresh.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"],
                               rtol=0, atol=0)


def _interrupted_then_resumed(tmp_path, opts) -> None:
    Trainer(_options(tmp_path / "straight", **opts)).run(**QUIET)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_options(tmp_path / "resumed", **opts)).run(**QUIET)


def _same_weights_and_log(tmp_path) -> None:
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    lines = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


@pytest.mark.parametrize("preset", ["matvit-tiny-digits", "matmamba-tiny-digits"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, small_digits, monkeypatch, preset):
    opts = dict(preset=preset, epochs=2, mixnmatch_prob=0.3, seed=3)
    original = Trainer.train_epoch

    def crash_in_second_epoch(self):
        if self.epoch == 1 and self.out.name == "resumed":
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", crash_in_second_epoch)
    _interrupted_then_resumed(tmp_path, opts)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    Trainer(_options(tmp_path / "resumed", **opts)).run(resume=True, **QUIET)
    _same_weights_and_log(tmp_path)


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_a_crash_while_saving_resumes_to_the_same_weights(tmp_path, small_digits, monkeypatch, crash_at):
    """The process dies at the `crash_at`-th file rename of the second epoch's save."""
    opts = dict(epochs=2, distill="logits", seed=4)
    original_save, original_replace = Trainer.save, checkpoint.os.replace
    renames = {"armed": False, "count": 0}

    def save(self):
        renames.update(armed=self.epoch == 2 and self.out.name == "resumed", count=0)
        original_save(self)

    def replace(src, dst):
        renames["count"] += 1
        if renames["armed"] and renames["count"] == crash_at:
            raise KeyboardInterrupt
        original_replace(src, dst)

    monkeypatch.setattr(Trainer, "save", save)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    _interrupted_then_resumed(tmp_path, opts)
    monkeypatch.setattr(checkpoint.os, "replace", original_replace)
    Trainer(_options(tmp_path / "resumed", **opts)).run(resume=True, **QUIET)
    _same_weights_and_log(tmp_path)


def test_resume_refuses_a_run_with_other_options(tmp_path, small_digits):
    _options_a = dict(epochs=1, lr=1e-3, mixnmatch_prob=0.2)
    Trainer(_options(tmp_path / "a", **_options_a)).run(**QUIET)
    with pytest.raises(UserError, match=r"lr .*mixnmatch_prob|mixnmatch_prob .*lr") as e:
        Trainer(_options(tmp_path / "a", epochs=1, lr=5e-4, mixnmatch_prob=0.0)).run(resume=True, **QUIET)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="epochs"):
        Trainer(_options(tmp_path / "a", **{**_options_a, "epochs": 2})).run(resume=True, **QUIET)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # another output directory is the same run
    Trainer(_options(tmp_path / "b", **_options_a)).run(resume=True, **QUIET)


def test_augment_keeps_shape_and_dtype():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    for kind in ("none", "crop", "crop-flip"):
        out = augment(images, kind)
        assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(augment(images, "crop-flip"), images)


def test_augment_overrides_the_presets_recipe(tmp_path):
    cifar = TrainOptions("matvit-small-cifar", "digits", tmp_path)
    assert cifar.recipe.augment == "none"
    flipped = TrainOptions("matvit-small-cifar", "digits", tmp_path, augment="crop-flip")
    assert flipped.recipe.augment == "crop-flip" and flipped.recipe.epochs == cifar.recipe.epochs
    with pytest.raises(UserError, match="unknown augmentation 'rotate'"):
        TrainOptions("matvit-small-cifar", "digits", tmp_path, augment="rotate")
