"""The versions of an index directory: how one is written aside and switched to, checked when opened, and pruned.

    IDX/
      CURRENT             name of the live version; replaced atomically, so readers never see half a save
      LOCK                held (`store_writes.writer`) by the one writer at a time; holds its pid
      v000002/            index.faiss, vectors.npy, ids.npy, deleted.npy, metadata.sqlite, manifest.json
                          (+ index.ivfdata, trained.index when on disk)
      uploads/            images added through the API (an indexed root)
      building/           embedded chunks of an unfinished build or add (what --resume continues; see `jobs`)
      profile.json        measured cost of submodels on this machine (see `budget`)

Versions are numbered v000001, v000002, ... and ordered by number (v1000000 follows v999999). A version is
written aside (`vN.tmp`), renamed, and only then named in CURRENT, so a write killed at any step leaves the
previous version live and whole; what it left aside is removed by the next write. A version is never
changed after it is written. Readers hold a shared `flock` on the version's
manifest while they use it (`lease`); a writer removes an old version only when it can take that lock
exclusively, and always keeps the version it replaced (a reader may have just read CURRENT).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import sqlite3
from pathlib import Path

import faiss
import numpy as np

from . import ondisk
from .store_common import COLUMNS, REBUILD, now, versions_of_packages
from .store_errors import IndexCorrupt, IndexMissing
from .store_writes import crash_point, disk_space

log = logging.getLogger(__name__)
FORMAT = 2


SCHEMA = """CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, path TEXT, root INTEGER, label INTEGER, width INTEGER,
    height INTEGER, added_at TEXT NOT NULL)"""


def sqlite_uri(path: Path, read_only: bool) -> str:
    """A quoted `file:` URI (paths may hold `?`, `#` or `%`)."""
    return Path(path).resolve().as_uri() + ("?mode=ro&immutable=1" if read_only else "")


VERSION_NAME = re.compile(r"v[0-9]+")


def read_current(directory: Path) -> str:
    """The version CURRENT names (`IndexMissing` when there is no CURRENT, `IndexCorrupt` when it names none)."""
    try:
        raw = (Path(directory) / "CURRENT").read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise IndexMissing(f"no index at {directory}: build one with `matvit build-index`") from None
    except OSError as e:
        raise IndexCorrupt(f"index {directory} is corrupt: cannot read its CURRENT file ({e.strerror}); "
                           f"{REBUILD}") from e
    name = raw.decode("ascii", errors="replace").strip()
    if not VERSION_NAME.fullmatch(name):
        complete = [v for v in version_names(Path(directory)) if (Path(directory) / v / "manifest.json").is_file()]
        fix = REBUILD if not complete else (f"write the newest complete version's name into it (`echo {complete[-1]} "
                                            f"> {Path(directory) / 'CURRENT'}`) or {REBUILD}")
        raise IndexCorrupt(f"index {directory} is corrupt: its CURRENT file holds no version name ({len(raw)} bytes "
                           f"that are not `v` and digits); {fix}")
    return name


def lease(version_dir: Path) -> int | None:
    """A shared lock on the version's manifest: the mark of a reader using it (None when the version is gone)."""
    try:
        fd = os.open(version_dir / "manifest.json", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # a writer is removing it
        os.close(fd)
        return None
    return fd




def load_array(path: Path, corrupt: str, mmap_mode: str | None, shape: tuple, dtype) -> np.ndarray:
    """A saved array, `IndexCorrupt` unless it has `shape` (None: any length) and `dtype`."""
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # missing, truncated, or not an .npy file
        raise IndexCorrupt(f"{corrupt}: cannot read {path.parent.name}/{path.name} ({first_line(e)}); "
                           f"{REBUILD}") from e
    if array.dtype != dtype or len(array.shape) != len(shape) or any(
            want is not None and got != want for got, want in zip(array.shape, shape, strict=True)):
        raise IndexCorrupt(f"{corrupt}: {path.parent.name}/{path.name} holds {array.dtype} {array.shape}, the "
                           f"manifest says {np.dtype(dtype)} {tuple('n' if n is None else n for n in shape)}; "
                           f"{REBUILD}")
    return array


def check_metadata(path: Path, count: int, corrupt: str) -> None:
    """`IndexCorrupt` unless the metadata database opens and holds `count` items."""
    where = f"{path.parent.name}/{path.name}"
    if not path.is_file():
        raise IndexCorrupt(f"{corrupt}: {where} is missing; {REBUILD}")
    try:
        db = sqlite3.connect(sqlite_uri(path, read_only=True), uri=True)
        try:
            rows = db.execute("SELECT count(*) FROM items").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as e:
        raise IndexCorrupt(f"{corrupt}: cannot read {where} ({first_line(e)}); {REBUILD}") from e
    if rows != count:
        raise IndexCorrupt(f"{corrupt}: {where} holds {rows} items, the manifest says {count}; {REBUILD}")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__




def version_names(directory: Path) -> list[str]:
    """Version names in the order they were written (by number: v999999 before v1000000)."""
    names = [p.name for p in directory.glob("v[0-9]*") if p.is_dir() and p.name[1:].isdigit()]
    return sorted(names, key=lambda name: int(name[1:]))


def _prune(directory: Path, keep: set[str]) -> None:
    """Remove versions outside `keep` that no reader holds, and what killed writes left aside."""
    for name in version_names(directory):
        if name in keep:
            continue
        try:
            fd = os.open(directory / name / "manifest.json", os.O_RDONLY)
        except FileNotFoundError:
            shutil.rmtree(directory / name, ignore_errors=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(directory / name, ignore_errors=True)
        except BlockingIOError:
            pass  # a reader still uses it; a later write removes it
        finally:
            os.close(fd)
    for tmp in directory.glob("v[0-9]*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    for tmp in directory.glob("CURRENT.*.tmp"):
        tmp.unlink(missing_ok=True)


def _live_name(directory: Path) -> str | None:
    try:
        return (directory / "CURRENT").read_text().strip()
    except OSError:
        return None


def _count_of(version_dir: Path) -> int | None:
    try:
        return int(json.loads((version_dir / "manifest.json").read_text())["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_version(directory: Path, faiss_index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, manifest: dict,
                  base: Path | None = None, rows: list[tuple] = (), removed: list[int] = (),
                  deleted: np.ndarray | None = None, staged: Path | None = None) -> Path:
    """Save a new version (the metadata of the version directory `base` plus `rows`, less `removed`) and switch
    CURRENT to it atomically.

    The caller holds `writer(directory)`. `ids`/`vectors` are every live item's, in id order. With `staged` (an
    on-disk index's directory), its files become the version's index instead of `faiss_index` written whole.
    Killed at any step, the live version stays the previous one until CURRENT names the new one, whole; failed
    (a full disk), it leaves nothing behind. The version replaced is kept while a reader may hold it, and when
    a build replaces it with fewer items."""
    directory = Path(directory)
    existing = version_names(directory)
    name = f"v{int(existing[-1][1:]) + 1:06d}" if existing else "v000001"
    tmp, final = directory / f"{name}.tmp", directory / name
    replaced = _live_name(directory)
    try:
        with disk_space():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _fill_version(tmp, faiss_index, ids, vectors, manifest, base, rows, removed, deleted, staged)
            crash_point("version.staged")
            os.replace(tmp, final)
            crash_point("version.renamed")
            tmp_current = directory / f"CURRENT.{os.getpid()}.tmp"
            try:
                tmp_current.write_text(name)
                os.replace(tmp_current, directory / "CURRENT")
            except BaseException:
                tmp_current.unlink(missing_ok=True)
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        if _live_name(directory) != name:
            shutil.rmtree(final, ignore_errors=True)
        raise
    crash_point("version.switched")
    keep = {name} | ({base.name} if base is not None else set())
    if base is None and replaced and (_count_of(directory / replaced) or 0) > len(ids):
        log.warning("kept the replaced version %s of %s: it holds %d items, the new %s %d", replaced, directory,
                    _count_of(directory / replaced), name, len(ids))
        keep.add(replaced)
    _prune(directory, keep)
    crash_point("version.pruned")
    return final


def _fill_version(tmp: Path, faiss_index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, manifest: dict,
                  base: Path | None, rows: list[tuple], removed: list[int], deleted: np.ndarray | None,
                  staged: Path | None) -> None:
    """A version's files, in `tmp`."""
    if staged is None:
        faiss.write_index(faiss_index, str(tmp / "index.faiss"))
    else:
        for file in (ondisk.TRAINED, ondisk.MERGED, ondisk.LISTS):
            os.replace(staged / file, tmp / file)
        shutil.rmtree(staged)
    np.save(tmp / "ids.npy", np.asarray(ids, dtype=np.int64))
    np.save(tmp / "vectors.npy", np.asarray(vectors, dtype=np.float32))
    deleted = np.zeros(0, np.int64) if deleted is None else np.asarray(deleted, dtype=np.int64)
    np.save(tmp / "deleted.npy", deleted)
    if base is not None:
        shutil.copyfile(base / "metadata.sqlite", tmp / "metadata.sqlite")
    db = sqlite3.connect(sqlite_uri(tmp / "metadata.sqlite", read_only=False), uri=True)
    try:
        with db:
            db.execute(SCHEMA)
            db.executemany(f"INSERT INTO items VALUES ({','.join('?' * len(COLUMNS))})", rows)
            db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in removed])
    finally:
        db.close()
    manifest = {**manifest, "format": FORMAT, "count": len(ids), "updated_at": now(),
                "versions": versions_of_packages()}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
