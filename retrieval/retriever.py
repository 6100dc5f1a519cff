"""Query path: decode, pick the submodel (a spec or a budget), encode with its extracted model, search."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from matvit import images as imageio

from . import budget as budgets
from .encoder import Encoder
from .index import GalleryIndex


@dataclass
class Choice:
    """The submodel a query ran with, and why."""

    id: str
    spec: str
    gflops: float
    params: int
    reason: str


@dataclass
class Result:
    """One query's neighbours (rank, id, score, label, metadata) and timings in milliseconds."""

    neighbours: list[dict]
    submodel: Choice
    timings_ms: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"results": self.neighbours, "submodel": vars(self.submodel), "timings_ms": self.timings_ms}


class Retriever:
    """An index opened with the checkpoint that built it; refuses any other checkpoint."""

    def __init__(self, index_dir: Path, checkpoint_dir: Path | None = None, encoder: Encoder | None = None,
                 max_pixels: int | None = None) -> None:
        """`max_pixels`: images whose header declares more are refused before decoding."""
        self.index = GalleryIndex.open(index_dir)
        self.encoder = encoder or Encoder.load(checkpoint_dir)
        self.index.check_model(self.encoder.fingerprint)
        self.profile_path = Path(index_dir) / budgets.PROFILE_FILE
        self.max_pixels = max_pixels

    def profile_rows(self) -> list[dict]:
        """The stored profile of this model, or a fresh one of the trained granularities (then stored)."""
        stored = budgets.load_profile(self.profile_path, self.encoder.fingerprint)
        if stored is None:
            stored = budgets.profile(self.encoder, budgets.candidates(self.encoder, "uniform"))
            budgets.save_profile(stored, self.profile_path)
        return stored["rows"]

    def choose(self, submodel: str | None = None, budget: budgets.Budget | None = None) -> Choice:
        if submodel is not None and budget is not None and budget.limit is not None:
            raise budgets.BudgetError("give either a submodel or a budget, not both")
        if budget is not None and budget.limit is not None:
            row, reason = budgets.choose(self.profile_rows(), budget)
            spec = self.encoder.spec(row["spec"])
        else:
            spec = self.encoder.spec(submodel or "XL")
            reason = "requested" if submodel else "default (XL)"
        return Choice(spec.id, spec.text, self.encoder.gflops(spec), self.encoder.params(spec), reason)

    def decode(self, sources: list) -> torch.Tensor:
        cfg = self.encoder.config
        return torch.stack([imageio.decode(s, cfg.img_size, cfg.in_chans, self.max_pixels)[0] for s in sources])

    def search_embeddings(self, embeddings: np.ndarray, k: int = 10) -> list[list[dict]]:
        """Neighbours of ready-made embeddings (rows of the index's dimension, L2-normalised here)."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        scores, ids = self.index.search(embeddings, k)
        meta = self.index.items(np.unique(ids))
        out = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = []
            for rank, (score, item_id) in enumerate(zip(row_scores, row_ids, strict=True), start=1):
                if item_id < 0:
                    continue
                item = meta.get(int(item_id), {})
                hits.append({"rank": rank, "id": int(item_id), "score": float(score), "label": item.get("label_name"),
                             "metadata": item})
            out.append(hits)
        return out

    def search(self, sources: list, k: int = 10, submodel: str | None = None,
               budget: budgets.Budget | None = None) -> list[Result]:
        """Search with images (paths, bytes or uint8 C x H x W tensors)."""
        choice = self.choose(submodel, budget)
        t0 = time.perf_counter()
        batch = sources if isinstance(sources, torch.Tensor) else self.decode(list(sources))
        t1 = time.perf_counter()
        embeddings = self.encoder.encode(batch, choice.spec)
        t2 = time.perf_counter()
        neighbours = self.search_embeddings(embeddings, k)
        t3 = time.perf_counter()
        timings = {"decode": (t1 - t0) * 1e3, "encode": (t2 - t1) * 1e3, "search": (t3 - t2) * 1e3,
                   "total": (t3 - t0) * 1e3}
        timings = {key: round(v / len(neighbours), 3) for key, v in timings.items()}
        return [Result(hits, choice, timings) for hits in neighbours]
