"""Across processes and precisions on CPU: two gloo processes under torchrun train to the weights of one process
with the same global batch, a sum-mode step all-reduces once, bf16 / fp16 autocast train and save fp32 weights,
and two processes build the same index as one."""

import json
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from matvit import runtime
from matvit.errors import UserError
from matvit.images import to_input
from matvit.train import Trainer, TrainOptions
from retrieval.encoder import Encoder
from retrieval.faiss_store import GalleryIndex
from tests.conftest import write_odd_images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out, processes: int, preset: str, epochs: int = 2, extra: tuple[str, ...] = ()) -> None:
    command = ["-m", "matvit", "train", "--preset", preset, "--dataset", "digits", "--epochs",
               str(epochs), "--device", "cpu", "--out", str(out), *extra]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
                   str(_free_port())] + command
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("preset, dims", [("matvit-tiny-digits", []), ("matmamba-tiny-digits", []),
                                          ("matvit-tiny-digits", [8, 16])])  # Matryoshka dims as well
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, preset, dims):
    extra = ("--embed-dims", ",".join(map(str, dims))) if dims else ()
    _train(tmp_path / "one", 1, preset, extra=extra)
    _train(tmp_path / "two", 2, preset, extra=extra)
    one, two = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        a, b = one[key], two[key]
        if key.endswith("attn.qkv.bias"):
            # The key bias's true gradient is zero (softmax ignores a shift shared by all keys): Adam turns the
            # round-off of differently summed gradients into lr-sized steps, so it is noise in both runs.
            a, b = a.view(3, -1)[[0, 2]], b.view(3, -1)[[0, 2]]
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=key)

    # The loss of every granularity fell from the shared initialisation.
    opts = TrainOptions(preset, "digits", tmp_path / "unused", embed_dims=dims)
    trainer = Trainer(opts)  # seeded: the initial weights both runs started from
    trained = type(trainer.model)(trainer.model.config)
    trained.load_state_dict(two)
    x, y = to_input(trainer.train_set.images[:512]), trainer.train_set.labels[:512]
    with torch.no_grad():
        for g in trainer.granularities:
            before = F.cross_entropy(trainer.model.eval()(x, g), y).item()
            after = F.cross_entropy(trained.eval()(x, g), y).item()
            assert after < before - 0.1, (g, before, after)
    logs = [(tmp_path / run / "train_log.jsonl").read_text() for run in ("one", "two")]
    assert '"processes": 2' in logs[1] and '"processes": 1' in logs[0]


def _count_all_reduces(rank: int, port: int, out: str, counts) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rt = runtime.start("cpu")
    try:
        calls = []

        def hook(state, bucket):
            calls.append(bucket.index())
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(
                lambda fut: fut.value()[0] / rt.world)

        per_step = {}
        for mode in ("sample", "sum"):
            trainer = Trainer(TrainOptions("matvit-tiny-digits", "digits", out, mode=mode), rt)
            trainer.step_module.register_comm_hook(None, hook)
            x, y = to_input(trainer.train_set.images[:16]), trainer.train_set.labels[:16]
            calls.clear()
            plan = trainer.passes(random.Random(0))
            trainer.accumulate(x, y, plan)
            per_step[mode] = (len(plan), len(calls))
        counts[rank] = per_step
    finally:
        rt.close()


def test_a_sum_mode_step_all_reduces_once_not_once_per_granularity(tmp_path):
    counts = mp.Manager().dict()
    mp.spawn(_count_all_reduces, args=(_free_port(), str(tmp_path), counts), nprocs=2, join=True)
    for rank in (0, 1):
        (sample_passes, sample_reduces), (sum_passes, sum_reduces) = counts[rank]["sample"], counts[rank]["sum"]
        assert sample_passes == 1 and sum_passes == 4
        assert sample_reduces >= 1
        assert sum_reduces == sample_reduces  # the same buckets, once: the first three backwards ran in no_sync


def _interrupted_then_resumed(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rt = runtime.start("cpu")
    try:
        opts = TrainOptions("matvit-tiny-digits", "digits", out, epochs=2)
        first = Trainer(opts, rt)  # stops after writing its first epoch's checkpoint
        os.makedirs(out, exist_ok=True)
        first.train_epoch()
        first.epoch += 1
        first.save()
        Trainer(opts, rt).run(resume=True, log=lambda s: None)
    finally:
        rt.close()


def test_a_distributed_run_resumes_where_it_stopped(tmp_path):
    mp.spawn(_interrupted_then_resumed, args=(_free_port(), str(tmp_path / "resumed")), nprocs=2, join=True)
    straight = Trainer(TrainOptions("matvit-tiny-digits", "digits", tmp_path / "straight", epochs=2))
    straight.run(log=lambda s: None)
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for key, value in straight.model.state_dict().items():
        a, b = value, resumed[key]
        if key.endswith("attn.qkv.bias"):  # see above
            a, b = a.view(3, -1)[[0, 2]], b.view(3, -1)[[0, 2]]
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=key)
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in logged] == [2]  # the resumed run trained only the second epoch


@pytest.mark.parametrize("preset, precision", [("matvit-tiny-digits", "bf16"), ("matvit-tiny-digits", "fp16"),
                                               ("matmamba-tiny-digits", "bf16")])
def test_mixed_precision_on_cpu_trains_and_saves_fp32_weights(tmp_path, preset, precision, small_digits):
    rt = runtime.Runtime(torch.device("cpu"), precision)
    trainer = Trainer(TrainOptions(preset, "digits", tmp_path, epochs=3, batch_size=16), rt)
    x = to_input(trainer.train_set.images[:8])
    with rt.autocast():
        feats, logits, _ = trainer.step_module(x, trainer.model.spec("S"))
    assert logits.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    result = trainer.run(log=lambda s: None)
    weights = load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    first, last = (json.loads(line) for line in
                   (tmp_path / "train_log.jsonl").read_text().splitlines()[::2])
    assert all(last["loss"][g] < first["loss"][g] for g in trainer.granularities)
    assert result["precision"] == precision and set(result["knn1"]) == set(trainer.granularities)
    assert trainer.scaler.is_enabled() == (precision == "fp16")


def test_devices_resolve_to_what_is_present():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert runtime.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="no CUDA device"):
            runtime.resolve_device("cuda")
    with pytest.raises(UserError, match="unknown device"):
        runtime.resolve_device("tpu")
    with pytest.raises(UserError, match="unknown precision"):
        runtime.Runtime(torch.device("cpu"), "fp8")


def test_a_global_batch_that_does_not_split_across_processes_is_refused(tmp_path):
    rt = runtime.Runtime(torch.device("cpu"), world=3)  # never joins a group: the check comes first
    with pytest.raises(UserError, match="does not split evenly across 3 processes"):
        Trainer(TrainOptions("matvit-tiny-digits", "digits", tmp_path, batch_size=32), rt)


def _build_index(checkpoint_dir, gallery, out, processes: int) -> None:
    """`matvit build-index` of a folder, then `index add` of the digits' test split, as one or more processes."""
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
                   str(_free_port())]
    common = ["--checkpoint", str(checkpoint_dir), "--device", "cpu", "--batch-size", "4", "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (["build-index", "--images", str(gallery), "--out", str(out)],
                    ["index", "add", "--index", str(out), "--images", str(gallery / "dog")]):
        done = subprocess.run([*launch, "-m", "matvit", *command, *common], capture_output=True, text=True,
                              env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("run", ["trained_dir", "mamba_trained_dir"])  # a MatViT's and a MatMamba's checkpoint
def test_two_processes_build_the_index_one_process_builds(run, tmp_path, request):
    trained_dir = request.getfixturevalue(run)
    gallery = tmp_path / "gallery"
    write_odd_images(gallery)
    for i in range(9):  # enough images for several batches per process
        Image.new("L", (8 + i, 8), color=20 * i).save(gallery / "cat" / f"plain-{i}.png")
    _build_index(trained_dir, gallery, tmp_path / "one", 1)
    _build_index(trained_dir, gallery, tmp_path / "two", 2)
    one, two = GalleryIndex.open(tmp_path / "one"), GalleryIndex.open(tmp_path / "two")
    (ids_one, vectors_one), (ids_two, vectors_two) = one.vectors(), two.vectors()
    assert np.array_equal(ids_one, ids_two) and len(ids_one) == one.count > 0
    np.testing.assert_allclose(vectors_two, vectors_one, atol=1e-5)  # other batches, other thread counts
    rows = [{i: {k: v for k, v in item.items() if k != "added_at"} for i, item in index.items(ids_one).items()}
            for index in (one, two)]
    assert rows[0] == rows[1]
    assert one.manifest["next_id"] == two.manifest["next_id"]
    assert not (tmp_path / "two" / "building").exists()


def test_an_encoder_runs_on_the_runtime_it_is_given(trained):
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    fp32 = Encoder(trained).encode(images, "S")
    bf16 = Encoder(trained, runtime=runtime.Runtime(torch.device("cpu"), "bf16")).encode(images, "S")
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)
    np.testing.assert_allclose(bf16, fp32, atol=0.05)
