"""The encoder: images to L2-normalised embeddings with any submodel, each served by an extracted model.

Extracted models are physically smaller standalone models (`NestedModel.extract`), cached per spec
(bounded, least recently used dropped first), each run by a backend (`retrieval.backends`): the encoder's
`backend`, or with `auto` the one `select` (or a stored profile, through `serve`) chose for that spec; eager until then.
Encoding changes no shared state, so threads may encode with different specs at once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from matvit import checkpoint, metrics
from matvit.nested import Embedding, NestedModel
from matvit.runtime import Runtime
from matvit.spec import Submodel

from . import backends
from .backends import Runner, Trial

log = logging.getLogger(__name__)


class Encoder:
    """A checkpoint's submodels as embedding functions, on the runtime's device and precision (CPU fp32 by
    default). `backend`: one of `retrieval.backends.CHOICES`; `backend_cache`: where ONNX files are kept."""

    def __init__(self, model: NestedModel, meta: dict | None = None, cache_size: int = 8,
                 runtime: Runtime | None = None, backend: str = "eager", backend_cache: Path | None = None) -> None:
        self.runtime = runtime or Runtime(torch.device("cpu"))
        self.model = model.eval()
        self.meta = meta or {}
        self.fingerprint = checkpoint.fingerprint(model)
        self.classes: list[str] = self.meta.get("classes") or []
        self.cache_size = cache_size
        self.backend = backends.check_name(backend)
        self.backend_cache = backend_cache
        self._cache: OrderedDict[str, Embedding] = OrderedDict()
        self._runners: OrderedDict[tuple[str, str], Runner] = OrderedDict()
        self._serving: dict[str, str] = {}  # spec id -> the backend that serves it, once checked
        self._planned: dict[str, str] = {}  # spec id -> the backend a stored profile chose, checked at first use
        self._lock = threading.Lock()
        self._building = threading.Lock()
        self._probe: torch.Tensor | None = None  # the backends' check batch, and eager's embeddings of it
        self._references: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, directory: Path, cache_size: int = 8, runtime: Runtime | None = None, backend: str = "eager",
             backend_cache: Path | None = None) -> Encoder:
        model, meta = checkpoint.load(directory)
        return cls(model, meta, cache_size, runtime, backend, backend_cache)

    def spec(self, text: str | Submodel) -> Submodel:
        return self.model.spec(text)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def channels(self) -> int:
        return self.model.channels

    @property
    def dim(self) -> int:
        """Length of every submodel's embedding."""
        return self.model.embedding_dim

    @property
    def depth(self) -> int:
        return self.model.depth

    def embedder(self, spec: str | Submodel) -> Embedding:
        """The extracted model for `spec` (built on first use, then cached)."""
        spec = self.spec(spec)
        with self._lock:
            if spec.id in self._cache:
                self._cache.move_to_end(spec.id)
                return self._cache[spec.id]
        embedder = self.model.extract(spec).eval().to(self.runtime.device)
        with self._lock:
            self._cache[spec.id] = embedder
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedder

    # --- backends ---------------------------------------------------------------------------
    def serving(self, spec: str | Submodel) -> str:
        """The backend that serves `spec`: the one chosen for it, else the planned one or the encoder's (checked
        now), else eager (`auto` before any choice)."""
        spec = self.spec(spec)
        if spec.id not in self._serving:
            planned = self._planned.get(spec.id, self.backend)
            if planned not in ("auto", "eager"):
                self.serve(spec, planned)
        return self._serving.get(spec.id, "eager")

    def plan(self, spec: str | Submodel, name: str) -> None:
        """Serve `spec` with backend `name` from its first use on (checked then, eager if it fails)."""
        spec = self.spec(spec)
        with self._lock:
            self._planned[spec.id] = backends.check_name(name)
            self._serving.pop(spec.id, None)

    def runner(self, spec: str | Submodel) -> Runner:
        """The embedding function of `spec` with the backend that serves it (built on first use, then cached)."""
        spec = self.spec(spec)
        name = self.serving(spec)
        with self._lock:
            runner = self._runners.get((spec.id, name))
            if runner is not None:
                self._runners.move_to_end((spec.id, name))
                return runner
        return self._checked(spec, name)[0] or self._fallback(spec, name)

    def serve(self, spec: str | Submodel, name: str) -> Trial:
        """Serve `spec` with backend `name` if it passes the probe check, else with eager; the check's trial."""
        spec = self.spec(spec)
        runner, trial = self._checked(spec, backends.check_name(name))
        if runner is None:
            self._fallback(spec, name)
        else:
            with self._lock:
                self._serving[spec.id] = name
        return trial

    def select(self, spec: str | Submodel, repeats: int = 15) -> list[Trial]:
        """Check every backend this encoder may use for `spec` against eager (`backends.AUTO` with `auto`),
        time at batch 1 those that pass, and serve `spec` with the fastest; returns every trial."""
        spec = self.spec(spec)
        names = backends.AUTO if self.backend == "auto" else list(dict.fromkeys([self.backend, "eager"]))
        one = self._probe_batch()[:1]
        trials: list[Trial] = []
        for name in names:
            if name == "eager" and self.backend not in ("auto", "eager") and trials[0].passed:
                break  # eager is timed only as the fallback of an asked-for backend that failed
            runner, trial = self._checked(spec, name)
            if runner is not None:
                trial.latency_ms_b1 = round(backends.median_latency_ms(runner, one, repeats=repeats), 4)
            trials.append(trial)
        best = min((t for t in trials if t.passed), key=lambda t: t.latency_ms_b1)
        with self._lock:
            self._serving[spec.id] = best.backend
        return trials

    def _probe_batch(self) -> torch.Tensor:
        if self._probe is None:
            self._probe = backends.probe(self.model).to(self.runtime.device)
        return self._probe

    def _reference(self, spec: Submodel) -> torch.Tensor:
        """Eager's embeddings of the probe batch with `spec`."""
        if spec.id not in self._references:
            self._references[spec.id] = backends.eager(self.embedder(spec))(self._probe_batch())
        return self._references[spec.id]

    def _checked(self, spec: Submodel, name: str) -> tuple[Runner | None, Trial]:
        """Build backend `name` for `spec` and check it against eager; a passing runner is cached."""
        if name == "eager":
            return self._keep(spec, name, backends.eager(self.embedder(spec))), Trial(name, True, 1.0)
        with self._building:
            def make() -> Runner:
                return backends.build(name, self.model, self.fingerprint, spec, self.embedder(spec),
                                      self.runtime.device, self.backend_cache)
            runner, trial = backends.check(name, make, self._reference(spec), self._probe_batch())
        if runner is not None:
            self._keep(spec, name, runner)
        return runner, trial

    def _fallback(self, spec: Submodel, name: str) -> Runner:
        log.warning("submodel %s: backend %s is refused here; serving it with eager", spec.text, name)
        runner = self._keep(spec, "eager", backends.eager(self.embedder(spec)))
        with self._lock:
            self._serving[spec.id] = "eager"
        return runner

    def _keep(self, spec: Submodel, name: str, runner: Runner) -> Runner:
        with self._lock:
            self._runners[(spec.id, name)] = runner
            while len(self._runners) > self.cache_size * len(backends.BACKENDS):
                self._runners.popitem(last=False)
        return runner

    def encode(self, images: torch.Tensor, spec: str | Submodel = "XL", batch_size: int = 256,
               desc: str | None = None) -> np.ndarray:
        """uint8 N x C x H x W images to float32 N x dim embeddings, with the backend that serves `spec`."""
        with self.runtime.autocast():
            return metrics.run_batched(self.runner(spec), images, batch_size, desc, self.runtime.device)

    def named(self) -> list[Submodel]:
        return self.model.named()

    def gflops(self, spec: str | Submodel, head: bool = False) -> float:
        """Forward GFLOPs per image of the embedding path (with the classifier head when `head`)."""
        return self.model.forward_flops(spec, head) / 1e9

    def params(self, spec: str | Submodel, head: bool = False) -> int:
        """Parameters of the embedding path (with the classifier head when `head`)."""
        return self.model.num_params(spec, head)
