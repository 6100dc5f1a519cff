"""Joint training: losses fall in both modes, checkpoints round-trip, resume equals an uninterrupted run."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from matvit import checkpoint
from matvit.images import to_input
from matvit.train import Trainer, TrainOptions, augment


def _batch_losses(trainer: Trainer, images, labels) -> dict[str, float]:
    trainer.model.eval()
    with torch.no_grad():
        return {g: F.cross_entropy(trainer.model(to_input(images), g), labels).item() for g in trainer.granularities}


@pytest.mark.parametrize("mode", ["sum", "sample"])
def test_an_epoch_lowers_the_loss_of_every_granularity(tmp_path, mode):
    trainer = Trainer(TrainOptions(preset="matvit-tiny-digits", dataset="digits", out=tmp_path, mode=mode,
                                   epochs=3, seed=1))
    images, labels = trainer.train_set.images[:256], trainer.train_set.labels[:256]
    before = _batch_losses(trainer, images, labels)
    for _ in range(2):
        trainer.train_epoch()
        trainer.epoch += 1
    after = _batch_losses(trainer, images, labels)
    assert all(after[g] < before[g] for g in before), (before, after)


def test_distillation_mixnmatch_and_weights_train(tmp_path):
    trainer = Trainer(TrainOptions(preset="matvit-tiny-digits", dataset="digits", out=tmp_path, epochs=3,
                                   distill="both", mixnmatch_prob=0.5, weights=[2, 1, 1, 1]))
    images, labels = trainer.train_set.images[:256], trainer.train_set.labels[:256]
    before = _batch_losses(trainer, images, labels)
    for _ in range(2):
        stats = trainer.train_epoch()
        trainer.epoch += 1
    assert set(stats["loss"]) == {"S", "M", "L", "XL"}
    after = _batch_losses(trainer, images, labels)
    assert all(after[g] < before[g] for g in before), (before, after)


def test_baseline_is_a_plain_vit_of_one_width(tmp_path):
    trainer = Trainer(TrainOptions(preset="matvit-tiny-digits", dataset="digits", out=tmp_path, epochs=1,
                                   baseline="M"))
    assert trainer.model.config.granularities == {"M": 32}
    assert trainer.model.blocks[0].mlp.fc1.out_features == 32
    result = trainer.run(log=lambda s: None)
    assert set(result["top1"]) == {"M"}


def test_run_writes_outputs_and_checkpoint_round_trips(trained_dir, trained):
    assert {p.name for p in trained_dir.iterdir()} >= {"model.safetensors", "config.json", "train_log.jsonl",
                                                      "eval.json"}
    log = [json.loads(line) for line in (trained_dir / "train_log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in log] == list(range(1, 9))
    assert set(log[0]["loss"]) == set(log[0]["acc"]) == {"S", "M", "L", "XL"}
    result = json.loads((trained_dir / "eval.json").read_text())
    assert set(result["top1"]) == set(result["knn1"]) == {"S", "M", "L", "XL"}
    assert all(v > 0.3 for v in result["knn1"].values())  # well above the 0.1 of chance
    meta = json.loads((trained_dir / "config.json").read_text())
    assert meta["fingerprint"] == checkpoint.fingerprint(trained)
    torch.testing.assert_close(trained.state_dict(), load_file(trained_dir / "model.safetensors"))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    opts = dict(preset="matvit-tiny-digits", dataset="digits", epochs=2, mixnmatch_prob=0.3, seed=3)
    Trainer(TrainOptions(out=tmp_path / "straight", **opts)).run(log=lambda s: None)

    original = Trainer.train_epoch

    def crash_in_second_epoch(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(TrainOptions(out=tmp_path / "resumed", **opts)).run(log=lambda s: None)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    Trainer(TrainOptions(out=tmp_path / "resumed", **opts)).run(resume=True, log=lambda s: None)

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    lines = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_augment_keeps_shape_and_dtype():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    for kind in ("none", "crop", "crop-flip"):
        out = augment(images, kind)
        assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(augment(images, "crop-flip"), images)
