"""Committing a build or an add: the embedded chunks gathered in position order, the manifest grown with the
gallery's root and classes, the metadata rows, and the index kind `auto` chooses for a new index; then one
`Store.commit` makes them live together.
"""

from __future__ import annotations

import logging

import numpy as np

from matvit.sources import GallerySource

from . import backends, jobs, tuning
from .encoder import Encoder
from .store import Gallery, IndexStoreError, Store, crash_point
from .store_common import auto_index_key, now

log = logging.getLogger(__name__)


def gather(chunks: list[dict], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(positions, embeddings, original sizes) of every chunk in position order, and how many were unreadable."""
    positions = np.concatenate([c["positions"] for c in chunks]) if chunks else np.zeros(0, np.int64)
    parts = [c["embeddings"] for c in chunks if len(c["positions"])]
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    sizes = np.concatenate([c["sizes"] for c in chunks]) if chunks else np.zeros((0, 2), np.int64)
    skipped = sum(len(c["bad"]) for c in chunks)
    order = np.argsort(positions, kind="stable")
    return positions[order], embeddings[order], sizes[order], skipped


def grow_manifest(manifest: dict, root: dict, class_names: list[str], next_id: int) -> tuple[dict, int, list[int]]:
    """`manifest` with `root` and the new class names added: (manifest, root index, class index of each name)."""
    roots, classes = list(manifest.get("roots", [])), list(manifest.get("classes") or [])
    if root not in roots:
        roots.append(root)
    for name in class_names:
        if name not in classes:
            classes.append(name)
    grown = {**manifest, "roots": roots, "classes": classes, "next_id": next_id}
    return grown, roots.index(root), [classes.index(n) for n in class_names]


def item_rows(ids, sources: list[tuple[str, str | None]], root: int, labels: list[int | None], sizes) -> list[tuple]:
    added = now()
    return [(int(i), name, path, root, label, int(w), int(h), added)
            for i, (name, path), label, (w, h) in zip(ids, sources, labels, sizes, strict=True)]


def finish(store: Store, source: GallerySource, embedded: tuple[dict, list[dict], float], manifest: dict,
           base: Gallery | None, index_key: str | None, recall_target: float, on_disk: bool = False,
           smallest: tuple[str, float] | None = None) -> dict:
    """Commit every image of `source` from the chunks `embedded` (refused, nothing committed, unless the chunks
    hold each position once), as `base`'s items plus these (a new index when None), then clear `building/`;
    `smallest` (the smallest submodel's encode time) lets `auto` choose between exact search and HNSW."""
    record, chunks, seconds = embedded
    positions, embeddings, sizes, skipped = gather(chunks, manifest["dim"])
    covered = np.union1d(positions, np.concatenate([c["bad"] for c in chunks]) if chunks else [])
    if len(np.unique(positions)) != len(positions) or not np.array_equal(covered, np.arange(len(source))):
        raise IndexStoreError(f"the embedded chunks in {store.files / jobs.BUILDING} hold {len(covered)} of the "
                              f"{len(source)} images of {source.description}, or some twice; nothing was committed: "
                              "run it again without --resume")
    if len(positions) == 0:
        raise IndexStoreError(f"no readable images in {source.description}; nothing to index")
    why = None
    if smallest is not None:
        index_key, why = exact_or_hnsw(embeddings, on_disk, smallest)
        if why is not None:
            manifest = {**manifest, "auto": why}
    first_id = manifest.get("next_id", 0)
    ids = first_id + positions
    manifest, root, class_index = grow_manifest(manifest, source.root_entry, source.classes, first_id + len(source))
    labels = [class_index[source.labels[p]] if source.labels[p] >= 0 else None for p in positions]
    rows = item_rows(ids, [source.source(int(p)) for p in positions], root, labels, sizes)
    report = store.commit(base, ids, embeddings, rows, {**manifest, "job": record}, index_key, recall_target,
                          **({"on_disk": True} if on_disk else {}))
    crash_point("job.committed")
    if why is not None:
        report["auto"] = why
    jobs.clean(store.files)
    if skipped:
        log.warning("skipped %d unreadable image(s)", skipped)
    crash_point("job.done")
    return {"added": len(ids), "skipped": skipped, **report, "embed_seconds": round(seconds, 2),
            "images_per_s": round(len(ids) / seconds, 1) if seconds else None}


def finished(store: Store, live: dict) -> dict:
    """The report of a resumed job that had finished already."""
    return {"added": 0, "skipped": 0, "already_finished": True, "version": store.current_version(),
            "count": live["count"]}


def smallest_encode_ms(encoder: Encoder) -> tuple[str, float]:
    """The smallest named submodel and its batch-1 encode time here, in milliseconds (eager)."""
    smallest = min(encoder.named(), key=encoder.gflops)
    image = backends.probe(encoder.model)[:1].to(encoder.runtime.device)
    return smallest.text, round(backends.median_latency_ms(backends.eager(encoder.embedder(smallest)), image), 4)


EXACT_SHARE = 0.5  # `auto` keeps exact search while it costs at most this share of the smallest encode


def exact_or_hnsw(embeddings: np.ndarray, on_disk: bool, smallest: tuple[str, float]) -> tuple[str, dict | None]:
    """`auto`'s kind for a new index of `embeddings`: by size (`store_common.auto_index_key`), except that when the
    exact search of one query would cost more than EXACT_SHARE of encoding it with the smallest submodel, HNSW32
    (tuned to the recall target), so that search never dominates a query (the share keeps the choice clear of
    timing noise). Returns the key and the measurement behind it."""
    key = auto_index_key(len(embeddings), embeddings.shape[1], on_disk)
    if key != "Flat":
        return "auto", None
    exact_ms = round(tuning.exact_search_ms(embeddings), 4)
    key = "HNSW32" if exact_ms > EXACT_SHARE * smallest[1] else "Flat"
    return key, {"exact_search_ms": exact_ms, "smallest": smallest[0], "smallest_encode_ms": smallest[1],
                 "chose": key}
