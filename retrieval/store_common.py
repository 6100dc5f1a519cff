"""What every store shares: the metadata columns, the manifest and its checks, labels, item files, the
index kind `auto` picks by size, and the package versions a version records."""

from __future__ import annotations

import datetime as dt
import math
import stat
from importlib.metadata import version
from pathlib import Path

from .store_errors import IndexCorrupt, IndexStoreError, ItemImageRefused, ItemNotFound

FLAT_MAX, HNSW_MAX = 100_000, 10_000_000
COLUMNS = ("id", "source", "path", "root", "label", "width", "height", "added_at")  # of a metadata row


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


REBUILD = "build the index again with `matvit build-index`"
MANIFEST_FIELDS = {"fingerprint": str, "submodel": str, "dim": int, "metric": str, "count": int, "index_key": str,
                   "next_id": int, "roots": list}  # what every manifest holds, and its type
MANIFEST_OPTIONAL = {"classes": list, "on_disk": bool, "search_params": dict, "recall": dict}
_JSON_TYPES = {str: "a string", int: "an integer", bool: "a boolean", list: "a list", dict: "an object"}


def check_manifest(manifest, name: str) -> dict:
    """`manifest` when it has every field with its type (`IndexCorrupt` naming the first that is wrong)."""
    where = f"index {name} is corrupt: its manifest"
    if not isinstance(manifest, dict):
        raise IndexCorrupt(f"{where} is {_json_type(manifest)}, not an object; {REBUILD}")
    missing = sorted(set(MANIFEST_FIELDS) - set(manifest))
    if missing:
        raise IndexCorrupt(f"{where} lacks {', '.join(missing)}; {REBUILD}")
    for key, kind in {**MANIFEST_FIELDS, **MANIFEST_OPTIONAL}.items():
        value = manifest.get(key)
        if key in manifest and _json_type(value) != _JSON_TYPES[kind] and not (value is None and
                                                                              key in MANIFEST_OPTIONAL):
            raise IndexCorrupt(f"{where}'s {key} is {_json_type(value)}, not {_JSON_TYPES[kind]}; {REBUILD}")
    if manifest["dim"] < 1 or manifest["count"] < 0 or manifest["next_id"] < 0:
        raise IndexCorrupt(f"{where} says dim {manifest['dim']}, count {manifest['count']}, next_id "
                           f"{manifest['next_id']}; {REBUILD}")
    if not all(isinstance(root, dict) and isinstance(root.get("kind"), str) for root in manifest["roots"]):
        raise IndexCorrupt(f"{where}'s roots are not objects with a kind; {REBUILD}")
    if not all(isinstance(c, str) for c in manifest.get("classes") or []):
        raise IndexCorrupt(f"{where}'s classes are not all strings; {REBUILD}")
    return manifest


def _json_type(value) -> str:
    """What a JSON value is, in words (`an integer`, `a list`, `null`, ...)."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return "a fractional number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def check_model(manifest: dict, fingerprint: str, name: str) -> None:
    if fingerprint != manifest["fingerprint"]:
        raise IndexStoreError(
            f"model fingerprint {fingerprint} does not match the index's {manifest['fingerprint']} "
            f"({name} was built with another checkpoint); use that checkpoint or rebuild the index")


def label_name(manifest: dict, label: int | None) -> str | None:
    classes = manifest.get("classes") or []
    return classes[label] if label is not None and 0 <= label < len(classes) else None


def read_item_file(item: dict, root: dict, files: Path, max_bytes: int) -> bytes:
    """The bytes of a file item's image: only a regular file under its indexed root (`files/uploads` for
    images added through the API), at most `max_bytes`."""
    if not item.get("path") or root["kind"] not in ("uploads", "folder", "csv"):
        raise ItemNotFound(f"item {item['id']} has no image file the server can send")
    base = (Path(files) / "uploads" if root["kind"] == "uploads" else Path(root["path"])).resolve()
    try:
        path = (base / item["path"]).resolve(strict=True)
    except (FileNotFoundError, RuntimeError) as e:
        raise ItemNotFound(f"the image file of item {item['id']} is no longer at its recorded path") from e
    if not path.is_relative_to(base):
        raise ItemImageRefused(f"the image file of item {item['id']} lies outside the indexed folder")
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ItemImageRefused(f"the image of item {item['id']} is not a regular file")
    if info.st_size > max_bytes:
        raise ItemImageRefused(f"the image file of item {item['id']} has {info.st_size:,} bytes, over the "
                               f"limit of {max_bytes:,}")
    with open(path, "rb") as f:
        content = f.read(max_bytes + 1)
    if len(content) > max_bytes:
        raise ItemImageRefused(f"the image file of item {item['id']} is over the limit of {max_bytes:,} bytes")
    return content


def auto_index_key(count: int, dim: int, on_disk: bool = False) -> str:
    """The index kind for `count` vectors (an IVF kind whatever the size `on_disk`)."""
    if count < FLAT_MAX and not on_disk:
        return "Flat"
    if count < HNSW_MAX and not on_disk:
        return "HNSW32"
    return f"IVF{4 * int(math.sqrt(count))},SQ8"


def versions_of_packages() -> dict:
    return {p: version(p) for p in ("matvit", "torch", "timm", "faiss-cpu")}
