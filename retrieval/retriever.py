"""Query path: decode, pick the submodel (a spec or a budget), encode with its extracted model (run by the
backend that serves it, named in the result; concurrent queries for one submodel are encoded as one batch,
see `retrieval.batching`), search.

A `Retriever` follows its index (any `retrieval.store.Store`): when another process (or its own
`add`/`remove`) commits a new version, the next request opens it and swaps it in atomically; a request
that took `retriever.index` once sees one version throughout.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from matvit import data
from matvit import images as imageio
from matvit.errors import UserError
from matvit.spec import Submodel

from . import budget as budgets
from . import build
from . import cascade as cascades
from .batching import Batcher
from .encoder import Encoder
from .prefix import Plan
from .store import Gallery, IndexStoreError, ItemNotFound, Store, open_store, remove

log = logging.getLogger(__name__)


class EmbeddingError(UserError):
    """A query embedding that has no direction: not finite as float32, or all zeros."""


@dataclass
class Choice:
    """The submodel a query ran with, why, and the backend that encodes with it."""

    submodel: Submodel
    gflops: float
    params: int
    reason: str
    backend: str = "eager"
    plan: Plan | None = None  # the way of searching a budget chose with it (None: not chosen)

    @property
    def id(self) -> str:
        return self.submodel.id

    @property
    def spec(self) -> str:
        return self.submodel.text

    def to_dict(self) -> dict:
        return {"id": self.id, "spec": self.spec, "gflops": self.gflops, "params": self.params,
                "reason": self.reason, "backend": self.backend}


@dataclass
class Result:
    """One query's neighbours (rank, id, score, label, metadata) and timings in milliseconds."""

    neighbours: list[dict]
    submodel: Choice
    search: Plan  # the dimensions searched
    timings_ms: dict = field(default_factory=dict)
    encode_batch: int = 1  # images encoded in one batch with this query's (micro-batching)
    cascade: dict | None = None  # with the cascade: the submodels that ran, their GFLOPs together, the confidence

    def to_dict(self) -> dict:
        out = {"results": self.neighbours, "submodel": self.submodel.to_dict(), "search": self.search.to_dict(),
               "timings_ms": self.timings_ms, "encode_batch": self.encode_batch}
        return out if self.cascade is None else {**out, "cascade": self.cascade}


class Retriever:
    """An index opened with the checkpoint that built it; refuses any other checkpoint."""

    def __init__(self, index: str | Path | Store, checkpoint_dir: Path | None = None, encoder: Encoder | None = None,
                 max_pixels: int | None = None, refresh_seconds: float = 0.1, backend: str = "eager",
                 encode_slots: int = 1, batch_wait_ms: float = 2.0, max_batch: int = 32,
                 max_decode_bytes: int | None = None, decode_slots: int | None = None) -> None:
        """`index`: a directory, `milvus:URI` or a store; `max_pixels`, `max_decode_bytes`: images whose header
        declares more pixels, or whose decode would hold more bytes (`matvit.images.decode_cost`), are refused
        before decoding; `decode_slots`: images decoding at once, on that many threads of their own (None: on
        the caller's thread, no bound), so that decoding holds at most `decode_slots * max_decode_bytes` (decodes
        spread over many threads would leave freed buffers in as many C allocator arenas); `refresh_seconds`:
        how often the store is asked for a new version; `backend`: the query encoder's backend
        (`retrieval.backends.CHOICES`) when the encoder is loaded here; `encode_slots`, `batch_wait_ms`,
        `max_batch`: micro-batching of concurrent queries (`Batcher`)."""
        self.store = open_store(index)
        self._index = self.store.open()
        self.encoder = encoder or Encoder.load(checkpoint_dir, backend=backend)
        self._index.check_model(self.encoder.fingerprint)
        self.batcher = Batcher(lambda images, spec: self.encoder.encode(images, spec), encode_slots, batch_wait_ms,
                               max_batch)
        self.profile_path = self.store.files / budgets.PROFILE_FILE
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        self._decoder = ThreadPoolExecutor(decode_slots, thread_name_prefix="decode") if decode_slots else None
        self.refresh_seconds = refresh_seconds
        self._checked = time.monotonic()
        self._reloading = threading.Lock()
        self._profile: dict | None = None
        self._cascade: cascades.Policy | None = None

    # --- the live index ---------------------------------------------------------------------
    @property
    def index(self) -> Gallery:
        """The newest committed version (looked up at most every `refresh_seconds`)."""
        if time.monotonic() - self._checked >= self.refresh_seconds:
            self.refresh()
        return self._index

    def refresh(self, wait: bool = False) -> None:
        """Swap in the version CURRENT names, if it is new (one thread loads it; the others go on with the
        version they have, unless they `wait`, as a writer does for its own version)."""
        if not self._reloading.acquire(blocking=wait):
            return
        try:
            self._checked = time.monotonic()
            name = self.store.current_version()
            if name is None or name == self._index.version:
                return
            try:
                fresh = self.store.open()
                fresh.check_model(self.encoder.fingerprint)
            except IndexStoreError as e:
                log.error("keeping index version %s: %s", self._index.version, e)
                return
            self._index = fresh
            log.info("now serving index version %s (%d items)", fresh.version, fresh.count)
        finally:
            self._reloading.release()

    # --- budgets ----------------------------------------------------------------------------
    def ensure_profile(self) -> dict:
        """The stored profile of this model on this machine, measured (and stored) when there is none; for a
        Matryoshka model it also holds the search time of each way of searching at the index's current size."""
        self.profile_path.parent.mkdir(parents=True, exist_ok=True)
        self._profile = budgets.ensure_profile(self.encoder, self.profile_path)
        plans, index = self.budget_plans(), self.index
        timed = self._profile.get("searches", [])
        if plans and ([t["key"] for t in timed] != [p.key for p in plans]
                      or any(t["gallery"] != index.count for t in timed)):
            self._profile["searches"] = budgets.time_searches(index, plans)
            budgets.save_profile(self._profile, self.profile_path)
        return self._profile

    def stored_profile(self) -> dict | None:
        """The stored profile of this model on this machine and backend setting, loaded once (never measured
        here: see `ensure_profile`); each row's backend serves its submodel from its first use."""
        if self._profile is None:
            found = budgets.load_profile(self.profile_path, self.encoder.fingerprint, backend=self.encoder.backend)
            if found is not None:
                for row in found["rows"]:
                    self.encoder.plan(row["spec"], row.get("backend", "eager"))
                self._profile = found
        return self._profile

    def profile_rows(self) -> list[dict]:
        """The profile's rows (never measured here: see `ensure_profile`)."""
        if self.stored_profile() is None:
            raise budgets.BudgetError(f"no profile of this model on this machine in {self.store.files}; measure one "
                                      f"with `matvit profile --index {self.store.name} --checkpoint ...`")
        return self._profile["rows"]

    def budget_plans(self, k: int = 10) -> list[Plan]:
        """The ways of searching a budget chooses among (`budget.searches`): none but the full vectors unless the
        model was trained for shorter prefixes and the store searches them."""
        length = self.index.manifest["dim"]
        if not self.index.searches_prefixes or not any(d < length for d in self.encoder.model.dims):
            return []
        return budgets.searches(length, self.encoder.model.dims, k)

    def budget_ways(self, k: int, latency: bool) -> list[dict]:
        """Each way of searching with its costs at the index's size: computed GFLOPs, and the profile's measured
        milliseconds (for a latency budget; none when the profile has not timed them all)."""
        index, length = self.index, self.index.manifest["dim"]
        timed = {t["key"]: t["search_ms_b1"] for t in (self._profile or {}).get("searches", [])}
        ways = [{"key": p.key, "dims": p.dims, "shortlist": p.shortlist,
                 "search_gflops": budgets.search_gflops(p, index.count, length),
                 **({"search_ms_b1": timed[p.key]} if p.key in timed else {})} for p in self.budget_plans(k)]
        return [] if latency and any("search_ms_b1" not in w for w in ways) else ways

    def choose(self, submodel: str | None = None, budget: budgets.Budget | None = None, k: int = 10,
               pick_search: bool = False) -> Choice:
        """The submodel to encode with: named, the default XL, or the best within `budget`; with `pick_search` (no
        dims asked for) a budget chooses the way of searching too, among the model's (`budget_plans`)."""
        if submodel is not None and budget is not None and budget.limit is not None:
            raise budgets.BudgetError("give either a submodel or a budget, not both")
        if self.encoder.backend == "auto":
            self.stored_profile()  # the backends it chose serve, even when no budget is given
        if budget is not None and budget.limit is not None:
            rows = self.profile_rows() if budget.ms is not None else self.cost_rows()
            ways = self.budget_ways(k, budget.ms is not None) if pick_search else []
            row, reason = budgets.choose(budgets.pairs(rows, ways) if ways else rows, budget)
            way = row.get("search")
            plan = way and (Plan(way["dims"]) if way["shortlist"] is None else
                            Plan.of(self.index.manifest["dim"], funnel=way["dims"], k=k))
            return self._choice(self.encoder.spec(row["spec"]), reason, plan)
        spec = self.encoder.spec("XL" if submodel is None else submodel)  # "" is a bad spec, not XL
        return self._choice(spec, "default (XL)" if submodel is None else "requested")

    def _choice(self, spec: Submodel, reason: str, plan: Plan | None = None) -> Choice:
        return Choice(spec, self.encoder.gflops(spec), self.encoder.params(spec), reason, self.encoder.serving(spec),
                      plan)

    def backends(self) -> dict[str, str]:
        """The backend serving each profiled (or named) submodel, by spec text."""
        texts = [r["spec"] for r in self._profile["rows"]] if self._profile else []
        texts += [s.text for s in self.encoder.named() if s.text not in texts]
        return {text: self.encoder.serving(text) for text in texts}

    def cost_rows(self, named: bool = False) -> list[dict]:
        """Profiled rows when there is a profile (with `named`, and the trained granularities it lacks), else the
        trained granularities' computed costs."""
        try:
            rows = self.profile_rows()
        except budgets.BudgetError:
            rows, named = [], True
        have = {r["spec"] for r in rows}
        return rows + [{"spec": s.text, "gflops": self.encoder.gflops(s), "params": self.encoder.params(s)}
                       for s in self.encoder.named() if named and s.text not in have]

    # --- search -----------------------------------------------------------------------------
    def search_plan(self, dims: int | None = None, funnel: int | None = None, k: int = 10,
                    shortlist: int | None = None) -> Plan | None:
        """How to search: exact search on a `dims`-prefix, or a `funnel`-prefix's shortlist re-ranked by the full
        vectors; only the prefix lengths the model was trained for (`dims`). None when neither is asked for: the
        full vectors, or what a budget chooses."""
        plan = Plan.of(self.index.manifest["dim"], dims, funnel, k, shortlist, allowed=self.encoder.model.dims)
        return None if dims is None and funnel is None else plan

    def full_plan(self) -> Plan:
        return Plan(self.index.manifest["dim"])

    def decode(self, sources: list) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Image files (paths or bytes) as the model's input and their original sizes, decoded within the limits,
        one decode slot per image."""
        size, channels = self.encoder.image_size, self.encoder.channels
        decoded = [self._decode(imageio.decode, source, size, channels, self.max_pixels,
                                self.max_decode_bytes) for source in sources]
        return torch.stack([image for image, _ in decoded]), [size for _, size in decoded]

    def preview(self, source: str | Path | bytes, size: int) -> np.ndarray:
        """An RGB picture of an image file for display (long side at most `size`), within the same limits and
        decode slots as a query."""
        return self._decode(imageio.preview, source, size, self.max_pixels, self.max_decode_bytes)

    def _decode(self, function, *args):
        """`function(*args)` in a decode slot (here, without slots)."""
        return function(*args) if self._decoder is None else self._decoder.submit(function, *args).result()

    def search_embeddings(self, embeddings: np.ndarray, k: int = 10, search_params: dict | None = None,
                          index: Gallery | None = None, plan: Plan | None = None) -> list[list[dict]]:
        """Neighbours of ready-made embeddings (rows of the index's dimension, L2-normalised here)."""
        index = index or self.index
        return self.hits(index, *self.nearest(embeddings, k, search_params, index, plan))

    @staticmethod
    def nearest(embeddings: np.ndarray, k: int, search_params: dict | None, index: Gallery,
                plan: Plan | None = None) -> tuple:
        """(scores, ids) of the k nearest gallery vectors of each embedding (L2-normalised here, in float64 so
        that large finite values do not overflow), by `plan` (default: full search); `EmbeddingError` for one
        that is not finite as float32 or has zero norm (it has no direction to search in)."""
        with np.errstate(over="ignore"):  # a value past float32's range becomes inf, refused below
            embeddings = np.asarray(embeddings, dtype=np.float32)
        if not np.isfinite(embeddings).all():
            raise EmbeddingError("the embedding has values that are not finite as float32 (over 3.4e38 in "
                                 "magnitude, inf or nan)")
        norms = np.linalg.norm(embeddings.astype(np.float64), axis=1, keepdims=True)
        if not (norms > 0).all():
            raise EmbeddingError("the embedding is all zeros: it has no direction to search in")
        unit = (embeddings / norms).astype(np.float32)
        if plan is None or plan == Plan(unit.shape[1]):
            return index.search(unit, k, search_params)
        return index.search_prefix(unit, k, plan)

    @staticmethod
    def hits(index: Gallery, scores: np.ndarray, ids: np.ndarray) -> list[list[dict]]:
        """Each query's neighbours with their metadata (ids no longer in the index are left out)."""
        meta = index.items(ids[ids >= 0])
        out = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = [{"rank": rank, "id": int(i), "score": float(s), "label": meta[int(i)]["label_name"],
                     "metadata": meta[int(i)]}
                    for rank, (s, i) in enumerate(((s, i) for s, i in zip(row_scores, row_ids, strict=True)
                                                   if i >= 0 and int(i) in meta), start=1)]
            out.append(hits)
        return out

    def search(self, sources: list, k: int = 10, submodel: str | None = None, budget: budgets.Budget | None = None,
               search_params: dict | None = None, plan: Plan | None = None) -> list[Result]:
        """Search with images (paths, bytes or uint8 C x H x W tensors), by `plan` (see `search_plan`; default: the
        budget's choice, else full search). Timings are the request's, per image: decode, queue (waiting for its
        batch to be encoded), encode (its batch), search (the index), metadata (the neighbours' items), total."""
        index = self.index
        choice = self.choose(submodel, budget, k, pick_search=plan is None)
        plan = plan or choice.plan or self.full_plan()
        t0 = time.perf_counter()
        decoded: list[float] = []

        def load() -> torch.Tensor:
            batch = sources if isinstance(sources, torch.Tensor) else self.decode(list(sources))[0]
            decoded.append(time.perf_counter())
            return batch

        encoded = self.batcher.encode(load, choice.submodel)
        t2 = time.perf_counter()
        scores, ids = self.nearest(encoded.embeddings, k, search_params, index, plan)
        t3 = time.perf_counter()
        neighbours = self.hits(index, scores, ids)
        t4 = time.perf_counter()
        timings = {"decode": decoded[0] - t0, "queue": encoded.queue_s, "encode": encoded.encode_s,
                   "search": t3 - t2, "metadata": t4 - t3, "total": t4 - t0}
        timings = {key: round(v * 1e3 / len(neighbours), 3) for key, v in timings.items()}
        return [Result(hits, choice, plan, timings, encoded.batch_images) for hits in neighbours]

    def cascade(self) -> cascades.Policy:
        """The cascade calibrated for this model beside the index (loaded once)."""
        if self._cascade is None:
            self._cascade = cascades.Policy.load(self.store.files / cascades.CASCADE_FILE, self.encoder.fingerprint)
        return self._cascade

    def search_cascade(self, sources: list, k: int = 10, search_params: dict | None = None,
                       policy: cascades.Policy | None = None, plan: Plan | None = None) -> list[Result]:
        """Search with the cascade (`retrieval.cascade`): every query is encoded with the first stage's submodel
        and again with the next one while its confidence stays under the stage's threshold, every stage searching
        by `plan` (default: the way the cascade was calibrated with). Each result names the submodel it stopped
        at; `cascade` lists those that ran. Timings are per image, all stages summed."""
        policy = policy or self.cascade()
        index = self.index
        plan = plan or policy.plan or self.full_plan()
        start = time.perf_counter()
        images = sources if isinstance(sources, torch.Tensor) else self.decode(list(sources))[0]
        spent = {"decode": time.perf_counter() - start, "queue": 0.0, "encode": 0.0, "search": 0.0, "metadata": 0.0}
        waiting, final, ran = np.arange(len(images)), {}, [[] for _ in range(len(images))]
        for i, spec in enumerate(self.encoder.spec(text) for text in policy.stages):
            encoded = self.batcher.encode(lambda rows=waiting: images[rows], spec)
            t0 = time.perf_counter()
            scores, ids = self.nearest(encoded.embeddings, max(k, cascades.VOTES), search_params, index, plan)
            t1 = time.perf_counter()
            neighbours = self.hits(index, scores, ids)
            spent["search"] += t1 - t0
            spent["metadata"] += time.perf_counter() - t1
            spent["queue"] += encoded.queue_s
            spent["encode"] += encoded.encode_s
            sure = cascades.confidence(policy.signal, scores, cascades.label_codes(neighbours, cascades.VOTES))
            stop = sure >= (policy.thresholds[i] if i < len(policy.thresholds) else -np.inf)
            for row, query in enumerate(waiting):
                ran[query].append(spec)
                if stop[row]:
                    final[query] = (neighbours[row][:k], float(sure[row]), spec, encoded.batch_images)
            waiting = waiting[~stop]
            if not len(waiting):
                break
        spent["total"] = time.perf_counter() - start
        timings = {key: round(v * 1e3 / len(images), 3) for key, v in spent.items()}
        results = []
        for query in range(len(images)):
            hits, sure, spec, batch = final[query]
            choice = self._choice(spec, f"cascade: confident enough at {spec.text}")
            results.append(Result(hits, choice, plan, timings, batch, {
                "ran": [s.text for s in ran[query]], "gflops": sum(self.encoder.gflops(s) for s in ran[query]),
                "confidence": round(sure, 4)}))
        return results

    # --- items ------------------------------------------------------------------------------
    def add(self, images: list[bytes], labels: list[str | None] | None = None, names: list[str | None] | None = None,
            wait: float = 30.0) -> list[dict]:
        """Add image files (all decoded first: one unreadable image adds none); returns the new items."""
        labels = list(labels) if labels else [None] * len(images)
        names = list(names) if names else [None] * len(images)
        if not (len(labels) == len(names) == len(images)):
            raise IndexStoreError(f"{len(images)} images need as many labels and names (or none), "
                                  f"got {len(labels)} labels and {len(names)} names")
        batch, sizes = self.decode(images)
        files = [(content, _suffix(content)) for content in images]
        ids = build.add_images(self.encoder, self.store, batch, files, sizes, labels, names, wait)
        self.refresh(wait=True)
        found = self._index.items(ids)
        return [found[i] for i in ids]

    def remove(self, ids: list[int], wait: float = 30.0) -> list[int]:
        removed = remove(self.store, ids, wait)
        self.refresh(wait=True)
        return removed

    def item(self, item_id: int) -> dict | None:
        return self.index.item(item_id)

    def item_image(self, item_id: int, max_bytes: int) -> tuple[bytes, str]:
        """The gallery image of an item: (bytes, media type)."""
        index = self.index
        item = index.item(item_id)
        if item is None:
            raise ItemNotFound(f"no item with id {item_id} in the index")
        root = index.root(item)
        if root["kind"] == "dataset":
            pixels = data.source_image(item["source"], root.get("data_dir"))
            if pixels is None:
                raise ItemNotFound(f"the dataset image of item {item_id} is not available on this server")
            return imageio.to_png(pixels), "image/png"
        content = index.image_file(item, max_bytes)
        return content, _media_type(content)


def _suffix(content: bytes) -> str:
    with Image.open(io.BytesIO(content)) as img:
        fmt = (img.format or "png").lower()
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}")


def _media_type(content: bytes) -> str:
    try:
        with Image.open(io.BytesIO(content)) as img:
            return Image.MIME.get(img.format or "", "application/octet-stream")
    except (OSError, ValueError):
        return "application/octet-stream"
