"""Micro-batching of query encodes: concurrent requests for the same submodel are encoded as one batch, so the
per-layer overhead of a forward pass is paid once per batch rather than once per request.

The first request for a submodel with no batch gathering opens one and leads it. The leader waits, at most
`max_wait_ms` and only while other requests are still decoding their images, for them to join; then it waits
for one of the encode slots, closes the batch, encodes every image that joined and hands each request its rows.
Requests that arrive while a batch waits for a slot join it, so under load batches form with no added wait,
and a lone request is encoded at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from matvit.spec import Submodel


@dataclass
class Encoded:
    """One request's embeddings, and how they were made: seconds from joining a batch until its encode began
    (`queue_s`), the batch encode's wall time (`encode_s`) and the images in the batch (`batch_images`)."""

    images: torch.Tensor
    joined: float = field(default_factory=time.perf_counter)
    embeddings: np.ndarray | None = None
    queue_s: float = 0.0
    encode_s: float = 0.0
    batch_images: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """Coalesces `encode(images, spec)` calls from many threads; at most `slots` batches encode at a time."""

    def __init__(self, encode: Callable[[torch.Tensor, str], np.ndarray], slots: int = 1,
                 max_wait_ms: float = 2.0, max_batch: int = 32) -> None:
        self._encode = encode
        self.slots = threading.Semaphore(slots)
        self.max_wait_s = max_wait_ms / 1e3
        self.max_batch = max_batch
        self._gathering: dict[Submodel, list[Encoded]] = {}  # spec -> the batch still open for it
        self._decoding = 0  # requests between `encode`'s call and their joining a batch
        self._changed = threading.Condition()

    def encode(self, load: Callable[[], torch.Tensor], spec: Submodel) -> Encoded:
        """Embeddings of the images `load()` returns (uint8 N x C x H x W), encoded with `spec` together with
        those of concurrent requests for the same spec. `load` runs here, counted as decoding."""
        with self._changed:
            self._decoding += 1
        try:
            images = load()
        finally:
            with self._changed:
                self._decoding -= 1
                self._changed.notify_all()
        request = Encoded(images)
        with self._changed:
            batch = self._gathering.get(spec)
            leads = batch is None
            if leads:
                batch = self._gathering[spec] = []
            batch.append(request)
            self._changed.notify_all()
        if leads:
            self._lead(spec, batch)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request

    def _lead(self, spec: Submodel, batch: list[Encoded]) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._decoding == 0 or sum(len(r.images) for r in batch) >= self.max_batch,
                                   timeout=self.max_wait_s)
        with self.slots:
            with self._changed:
                del self._gathering[spec]  # later requests open the next batch
            start = time.perf_counter()
            try:
                embeddings = self._encode(torch.cat([r.images for r in batch]), spec)
            except BaseException as e:  # every request of the batch gets the error
                for r in batch:
                    r.error = e
                    r.done.set()
                return
            seconds = time.perf_counter() - start
        row = 0
        for r in batch:
            r.embeddings, r.queue_s, r.encode_s = embeddings[row:row + len(r.images)], start - r.joined, seconds
            r.batch_images = len(embeddings)
            row += len(r.images)
            r.done.set()
