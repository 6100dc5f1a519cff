"""Backends for the query encoder: one submodel's embedding path run by eager PyTorch (`inference_mode`),
`torch.compile`, ONNX Runtime, or ONNX Runtime with dynamic int8 weights.

A backend serves only after matching eager on a fixed, seeded probe batch (cosine at least `MIN_COSINE`
for every row); `auto` takes, of those in `AUTO` that match, the fastest at batch 1 on this machine. ONNX
files are exported once per checkpoint fingerprint and spec into a cache directory; compiled modules live
as long as the process (inductor keeps its own on-disk cache).

`compile` is never chosen by `auto`: inductor's C++ kernels bring an OpenMP thread pool of their own that
competes with torch's, and on a small shared CPU eager ops in the same process slowed by 4x and more once
compiled kernels had run (docs/results/backends-compile-in-process.md); ask for it explicitly where cores
are free. ONNX Runtime's pool is told not to spin, for the same reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from matvit.errors import UserError
from matvit.images import to_input
from matvit.nested import Embedding, NestedModel
from matvit.spec import Submodel

log = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "onnx", "onnx-int8")
AUTO = ("eager", "onnx", "onnx-int8")  # what `auto` chooses from (see above for compile)
CHOICES = ("auto", *BACKENDS)
MIN_COSINE = 0.999
PROBE_SIZE = 8

Runner = Callable[[torch.Tensor], torch.Tensor]  # model input (float, in [-1, 1]) -> L2-normalised embeddings


class BackendError(UserError):
    """An unknown backend name, or one that cannot run here."""


def check_name(name: str) -> str:
    if name not in CHOICES:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(CHOICES)}")
    return name


def default_cache() -> Path:
    """Where exported ONNX files go: `$MATVIT_CACHE/backends`, else `~/.cache/matvit/backends`."""
    return Path(os.environ.get("MATVIT_CACHE") or Path.home() / ".cache" / "matvit") / "backends"


def probe(model: NestedModel, size: int = PROBE_SIZE, seed: int = 0) -> torch.Tensor:
    """The fixed probe batch every backend is checked on: seeded uint8 noise as model input."""
    generator = torch.Generator().manual_seed(seed)
    shape = (size, model.channels, model.image_size, model.image_size)
    return to_input(torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8))


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest row-wise cosine similarity of two embedding batches."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def median_latency_ms(fn: Runner, images: torch.Tensor, warmup: int = 3, repeats: int = 15) -> float:
    """Median wall time of `fn(images)` in milliseconds, after `warmup` calls."""
    for _ in range(warmup):
        fn(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


# --- the backends ----------------------------------------------------------------------------------
def eager(embedder: Embedding) -> Runner:
    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return embedder(images)
    return run


def compiled(embedder: Embedding) -> Runner:
    """`torch.compile` of the extracted submodel for single queries; other batch sizes run eager (dynamo
    specialises on the batch size, and a recompile takes seconds: never inside a request)."""
    import torch._dynamo
    import torch._inductor.config

    # every extracted submodel shares Embedding.forward, whose compiled graphs count against one limit
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._inductor.config.compile_threads = 1  # no pool of compile workers left competing for the cores
    module = torch.compile(embedder, dynamic=False)  # static shapes: each submodel its own graph

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(images.contiguous()) if len(images) == 1 else embedder(images)
    return run


def onnx_file(model: NestedModel, fingerprint: str, spec: Submodel, cache: Path, int8: bool = False) -> Path:
    """The cached ONNX file of `spec` (exported by `NestedModel.export`; `int8`: its dynamic int8
    quantization), written once per checkpoint fingerprint and spec, atomically."""
    directory = Path(cache) / fingerprint / spec.id
    path = directory / ("model-int8.onnx" if int8 else "model.onnx")
    if path.exists():
        return path
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{spec.id}."))
    try:
        source = directory / "model.onnx"
        if not source.exists():
            model.export(spec, work, onnx=True, fingerprint=fingerprint)
            source = work / "model.onnx"
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            root, level = logging.getLogger(), logging.getLogger().level
            root.setLevel(logging.ERROR)  # its advice to pre-process is for static quantization
            try:
                quantize_dynamic(str(source), str(work / path.name), weight_type=QuantType.QInt8)
            finally:
                root.setLevel(level)
        directory.mkdir(exist_ok=True)
        for name in ("model.onnx", "model-int8.onnx", "config.json"):
            if (work / name).exists() and not (directory / name).exists():
                os.replace(work / name, directory / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def onnx_runner(path: Path, threads: int | None = None) -> Runner:
    """An ONNX Runtime session on CPU with torch's thread count (no oversubscription beside torch)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # idle workers sleep instead of spinning: a spinning pool starves torch's threads in the same process
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return torch.from_numpy(session.run(["embeddings"], {"images": array})[0])
    return run


def build(name: str, model: NestedModel, fingerprint: str, spec: Submodel, embedder: Embedding, device: torch.device,
          cache: Path | None = None) -> Runner:
    """The runner of backend `name` for `spec` (unchecked: see `check`)."""
    if name == "eager":
        return eager(embedder)
    if name == "compile":
        return compiled(embedder)
    if name in ("onnx", "onnx-int8"):
        if device.type != "cpu":
            raise BackendError(f"the {name} backend runs on CPU only, not on {device}")
        return onnx_runner(onnx_file(model, fingerprint, spec, cache or default_cache(), int8=name == "onnx-int8"))
    raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")


# --- checking and choosing ---------------------------------------------------------------------------
@dataclass
class Trial:
    """One backend tried on one submodel: its worst probe cosine against eager, whether it passed, its
    batch-1 latency here (when measured), and why it failed to build (if it did)."""

    backend: str
    passed: bool
    cosine: float | None = None
    latency_ms_b1: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def check(name: str, make: Callable[[], Runner], reference: torch.Tensor, images: torch.Tensor
          ) -> tuple[Runner | None, Trial]:
    """Build backend `name` and compare it with eager's `reference` embeddings of the probe `images`."""
    try:
        runner = make()
        out = runner(images)
        single = torch.cat([runner(images[i:i + 1]) for i in range(len(images))])  # the query path, built now
    except Exception as e:  # a backend that cannot build or run here is refused, never fatal
        log.warning("backend %s refused: %s", name, e)
        return None, Trial(name, False, error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
    cosine = min(min_cosine(out, reference), min_cosine(single, reference))
    passed = cosine >= MIN_COSINE
    if not passed:
        log.warning("backend %s refused: probe cosine %.5f against eager is under %g", name, cosine, MIN_COSINE)
    return (runner if passed else None), Trial(name, passed, round(cosine, 6))
