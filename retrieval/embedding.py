"""Embedding a gallery into chunks: decode in workers, embed in batches, save a chunk every `CHUNK` images.

Embeddings go to `building/chunk-*.npz` in the store's local directory as they are made (see `jobs`), so a run
killed at any moment loses at most one chunk and `resume=True` embeds only what no chunk holds yet (or nothing,
when the job had committed). Under torchrun (`encoder.runtime`) every process embeds its share of the images
(every world-th batch) into chunks of its own, while the main process holds the index's writer lock for the
whole group (`group_writing`); the main process then merges the chunks (`commit`). Ids follow the images'
positions in the source, so the index does not depend on the number of processes. Several machines need the
store's local directory on a filesystem they share; only the main process opens the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from tqdm import tqdm

from matvit.runtime import Runtime
from matvit.sources import GallerySource

from . import jobs
from .encoder import Encoder
from .store import Gallery, IndexBusy, IndexStoreError, Store

log = logging.getLogger(__name__)
CHUNK = 4096  # images per chunk file


def embed_gallery(encoder: Encoder, source: GallerySource, store: Store, job: dict, live: dict | None, spec,
                  batch_size: int, resume: bool) -> tuple[dict, list[dict], float] | None:
    """Embed every position no earlier chunk of this job holds (this process: every world-th batch of them), given
    the live version's manifest; returns the job's record, all chunks of all processes and the seconds spent, or
    None when resuming a job that has finished already (see `jobs.prepare`)."""
    rt = encoder.runtime
    prepared = jobs.prepare(store.files, job, resume, live) if rt.main else None
    record = rt.broadcast(None if prepared is None else prepared[0])
    if record is None:
        return None
    building, chunks = (prepared[1], prepared[2]) if rt.main else (store.files / jobs.BUILDING, [])
    rt.barrier()
    if not rt.main:
        chunks = jobs.load_chunks(building)
    done = {int(p) for c in chunks for key in ("positions", "bad") for p in c[key]}
    todo = [p for p in range(len(source)) if p not in done]
    mine = [p for i in range(rt.rank * batch_size, len(todo), rt.world * batch_size) for p in todo[i:i + batch_size]]
    number = jobs.next_chunk(building, rt.rank)
    pending: dict = {"positions": [], "embeddings": [], "sizes": [], "errors": []}
    start = time.perf_counter()
    bar = tqdm(total=len(mine), desc=f"embedding with {spec.text}", unit="img", disable=not rt.main or None)
    for batch in source.batches(mine, batch_size):
        for _, err in batch.errors:
            log.warning("skipped: %s", err)
        if batch.images is not None:
            pending["embeddings"].append(encoder.encode(batch.images, spec, batch_size))
        pending["positions"] += batch.positions
        pending["sizes"] += batch.sizes
        pending["errors"] += batch.errors
        bar.update(len(batch.positions) + len(batch.errors))
        if len(pending["positions"]) + len(pending["errors"]) >= CHUNK:
            jobs.save_chunk(building, rt.rank, number, **pending)
            number += 1
            pending = {k: [] for k in pending}
    bar.close()
    if pending["positions"] or pending["errors"]:
        jobs.save_chunk(building, rt.rank, number, **pending)
    rt.barrier()
    return record, jobs.load_chunks(building), time.perf_counter() - start


@contextmanager
def group_writing(store: Store, wait: float, rt: Runtime, opening: bool = False) -> Iterator[Gallery | None]:
    """The index's writer lock, held by the main process for the whole group, and (with `opening`) the live
    index, opened by the main process (None elsewhere); when either fails, every process raises."""
    with ExitStack() as stack:
        refused, base = None, None
        if rt.main:
            try:
                stack.enter_context(store.writing(wait))
                base = store.open() if opening else None
            except IndexStoreError as e:
                refused = (isinstance(e, IndexBusy), str(e))
        if refused := rt.broadcast(refused):
            raise (IndexBusy if refused[0] else IndexStoreError)(refused[1])
        yield base
