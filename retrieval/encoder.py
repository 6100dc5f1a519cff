"""The encoder: images to L2-normalised embeddings with any submodel, each served by an extracted model.

Extracted models are physically smaller plain timm ViTs, cached per spec (bounded, least recently
used dropped first). No call changes shared state, so threads may encode with different specs at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from matvit import checkpoint, metrics
from matvit import spec as specs
from matvit.extract import Embedder, extract
from matvit.model import MatViT
from matvit.runtime import Runtime
from matvit.spec import Submodel


class Encoder:
    """A checkpoint's submodels as embedding functions, on the runtime's device and precision (CPU fp32 by
    default)."""

    def __init__(self, model: MatViT, meta: dict | None = None, cache_size: int = 8,
                 runtime: Runtime | None = None) -> None:
        self.runtime = runtime or Runtime(torch.device("cpu"))
        self.model = model.eval()
        self.meta = meta or {}
        self.config = model.config
        self.fingerprint = checkpoint.fingerprint(model)
        self.classes: list[str] = self.meta.get("classes") or []
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Embedder] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, directory: Path, cache_size: int = 8, runtime: Runtime | None = None) -> Encoder:
        model, meta = checkpoint.load(directory)
        return cls(model, meta, cache_size, runtime)

    def spec(self, text: str | Submodel) -> Submodel:
        return self.model.spec(text)

    def embedder(self, spec: str | Submodel) -> Embedder:
        """The extracted model for `spec` (built on first use, then cached)."""
        spec = self.spec(spec)
        with self._lock:
            if spec.id in self._cache:
                self._cache.move_to_end(spec.id)
                return self._cache[spec.id]
        embedder = Embedder(extract(self.model, spec)).eval().to(self.runtime.device)
        with self._lock:
            self._cache[spec.id] = embedder
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedder

    def encode(self, images: torch.Tensor, spec: str | Submodel = "XL", batch_size: int = 256,
               desc: str | None = None) -> np.ndarray:
        """uint8 N x C x H x W images to float32 N x dim embeddings."""
        with self.runtime.autocast():
            return metrics.run_batched(self.embedder(spec), images, batch_size, desc, self.runtime.device)

    def named(self) -> list[Submodel]:
        return specs.named(self.config)

    def gflops(self, spec: str | Submodel, head: bool = False) -> float:
        """Forward GFLOPs per image of the embedding path (with the classifier head when `head`)."""
        return specs.forward_flops(self.config, self.spec(spec), head) / 1e9

    def params(self, spec: str | Submodel, head: bool = False) -> int:
        """Parameters of the embedding path (with the classifier head when `head`)."""
        return specs.num_params(self.config, self.spec(spec), head)
