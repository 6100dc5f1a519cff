"""Building and growing an index: the commands' doors (`build`, `add`, and `add_images` for the API).

The index is any `retrieval.store.Store` (an index directory, or Milvus). A build or an add goes through the
stages of its own modules: the gallery is read by a `gallery` reader (`FolderSource`, `DatasetSource`,
`open_gallery`: any `matvit.sources.GallerySource`), embedded into chunks by `embedding` (under torchrun, each
process its share, while the main process holds the writer lock for the group), and committed by `commit`
(which also picks the index kind `auto` means). A run killed at any moment leaves the live index untouched
until its new version is whole, and `resume=True` embeds only what no chunk holds yet, or does nothing when the
job had committed. A commit takes every image of the source (or refuses). Every write holds the index's
writer lock for its whole run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from matvit.sources import GallerySource

from . import tuning
from .commit import finish, finished, grow_manifest, item_rows, smallest_encode_ms
from .embedding import embed_gallery, group_writing
from .encoder import Encoder
from .gallery import DatasetSource, FolderSource, open_gallery  # noqa: F401  (the readers callers pass)
from .store import IndexStoreError, Store, crash_point, disk_space, open_store, settle_uploads
from .store_common import now


def build(encoder: Encoder, source: GallerySource, index: str | Path | Store, submodel: str = "XL",
          index_key: str = "auto", batch_size: int = 256, resume: bool = False,
          recall_target: float = tuning.RECALL_TARGET, wait: float = 0.0, on_disk: bool = False) -> dict:
    """Embed a whole source with `submodel` into a new index at `index` (a directory, `milvus:URI` or a
    store), replacing what it held, after waiting up to `wait` seconds for another writer to finish. With
    `on_disk`, an IVF index keeps its inverted lists on disk (built per chunk, merged, memory-mapped)."""
    store, spec = open_store(index), encoder.spec(submodel)
    job = {"kind": "build", "fingerprint": encoder.fingerprint, "submodel": spec.text, "source": source.description}
    with group_writing(store, wait, encoder.runtime):
        live = store.live_manifest() if encoder.runtime.main else None
        embedded = embed_gallery(encoder, source, store, job, live, spec, batch_size, resume)
        if not encoder.runtime.main:
            return {}
        if embedded is None:
            return finished(store, live)
        manifest = {"fingerprint": encoder.fingerprint, "submodel": spec.text, "dim": encoder.dim,
                    "metric": "inner_product", "source": source.description, "roots": [], "classes": [],
                    "next_id": 0, "created_at": now()}
        smallest = smallest_encode_ms(encoder) if index_key == "auto" else None
        return finish(store, source, embedded, manifest, None, index_key, recall_target, on_disk, smallest)


def add(encoder: Encoder, source: GallerySource, index: str | Path | Store, batch_size: int = 256, resume: bool = False,
        recall_target: float = tuning.RECALL_TARGET, wait: float = 0.0) -> dict:
    """Embed more images with the index's own submodel and add them under new ids."""
    store, rt = open_store(index), encoder.runtime
    with group_writing(store, wait, rt, opening=True) as base:
        checked = None
        if rt.main:
            try:
                base.check_model(encoder.fingerprint)
                checked = (base.manifest["submodel"], base.version)
            except IndexStoreError as e:
                checked = str(e)
        checked = rt.broadcast(checked)
        if isinstance(checked, str):
            raise IndexStoreError(checked)
        submodel, version = checked
        job = {"kind": "add", "fingerprint": encoder.fingerprint, "base": version, "source": source.description}
        embedded = embed_gallery(encoder, source, store, job, base.manifest if rt.main else None,
                                 encoder.spec(submodel), batch_size, resume)
        if not rt.main:
            return {}
        if embedded is None:
            return finished(store, base.manifest)
        manifest = {**base.manifest, "source": f"{base.manifest.get('source', '')}; {source.description}"}
        return finish(store, source, embedded, manifest, base, None, recall_target)


def add_images(encoder: Encoder, index: str | Path | Store, images: torch.Tensor, files: list[tuple[bytes, str]],
               sizes: list[tuple[int, int]], labels: list[str | None], names: list[str | None],
               wait: float = 0.0) -> list[int]:
    """Add decoded `images` (their file bytes and suffix kept in the store's `uploads/`); returns the new ids."""
    store = open_store(index)
    with store.writing(wait):
        base = store.open()
        base.check_model(encoder.fingerprint)
        embeddings = encoder.encode(images, base.manifest["submodel"])
        first_id = base.manifest["next_id"]
        ids = np.arange(first_id, first_id + len(images), dtype=np.int64)
        manifest, root, class_index = grow_manifest(base.manifest, {"kind": "uploads"},
                                                    [label for label in labels if label is not None],
                                                    first_id + len(images))
        index_of = dict(zip([label for label in labels if label is not None], class_index, strict=True))
        uploads = store.files / "uploads"
        settle_uploads(store, base)
        sources, fresh = [], not uploads.exists()
        try:  # files first, then the version that names them; a failure undoes both
            with disk_space():
                uploads.mkdir(exist_ok=True)
                for item_id, (content, suffix), name in zip(ids, files, names, strict=True):
                    path = f"{item_id}{suffix}"
                    sources.append((name or path, path))
                    (uploads / path).write_bytes(content)
                crash_point("uploads.written")
                rows = item_rows(ids, sources, root, [index_of.get(label) for label in labels], sizes)
                store.commit(base, ids, embeddings, rows, manifest)
        except BaseException:
            for _, path in sources:
                (uploads / path).unlink(missing_ok=True)
            if fresh and uploads.is_dir() and not any(uploads.iterdir()):
                uploads.rmdir()
            raise
    return ids.tolist()
