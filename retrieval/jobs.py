"""The `building/` directory of a build or an add: its job, the chunks embedded so far, and whether it finished.

    building/job.json                 the job (kind, model, submodel or base version, source) and its token
    building/chunk-rRRR-NNNNNN.npz    the embeddings of some positions (process RRR), written aside, then renamed

Any step may be killed. The version a job commits carries the job, token included, in its manifest (`job`): it
becomes live in the same atomic switch as the version, and later writes keep it until the next job's. So a job
has finished exactly when the live manifest names its token, whenever it was killed; the `building/` of a
finished job is renamed aside, then removed, and counts for nothing. A resume continues the chunks of the same
unfinished job and numbers new chunks past the highest one there, so it never writes over a chunk it counted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from .store_writes import crash_point, disk_space

log = logging.getLogger(__name__)
BUILDING, JOB = "building", "job.json"
CHUNK_NAME = re.compile(r"chunk-r(\d+)-(\d+)\.npz")
RESUME = "free some space and run it again with --resume (the images embedded so far are kept)"


def read_job(files: Path) -> dict | None:
    """The job of `files/building/` (None when there is none, or it cannot be read)."""
    try:
        job = json.loads((Path(files) / BUILDING / JOB).read_text())
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) else None


def _same(a: dict, b: dict, ignore: tuple[str, ...] = ("token",)) -> bool:
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def committed(job: dict | None, manifest: dict | None) -> bool:
    """Whether the version of `manifest` holds what `job` (a record with its token) wrote."""
    done = (manifest or {}).get("job")
    return bool(job and job.get("token") and isinstance(done, dict) and done.get("token") == job["token"])


def unfinished(files: Path, manifest: dict | None) -> bool:
    """Whether `files` holds a build or an add that has not committed (what `--resume` continues)."""
    job = read_job(files)
    return job is not None and not committed(job, manifest)


def prepare(files: Path, job: dict, resume: bool, live: dict | None) -> tuple[dict, Path, list[dict]] | None:
    """(the job's record, its building directory, the chunks embedded so far) for `job`, given the live
    version's manifest (None: no index yet). With `resume`, the chunks of this same job when it has not
    committed, or None when it has (the live version holds it already); else an empty directory and a new job."""
    files, building = Path(files), Path(files) / BUILDING
    record = read_job(files)
    if record is not None and committed(record, live):
        clean(files)  # a finished job's directory, left by a kill before its clean-up ended
        record = None
    _sweep(files)
    if resume and record is not None and _same(record, job):
        for tmp in building.glob("chunk-*.tmp.npz"):
            tmp.unlink()
        chunks = load_chunks(building)
        log.warning("resuming: %d image(s) already embedded", sum(len(c["positions"]) + len(c["bad"]) for c in chunks))
        return record, building, chunks
    done = (live or {}).get("job")
    if resume and isinstance(done, dict) and _same(done, job, ("token", "base")):
        log.warning("nothing to resume: this %s has finished (the live version holds it)", job["kind"])
        return None
    if resume:
        log.warning("nothing to resume in %s for this job; starting afresh", files)
    clean(files)
    record = {**job, "token": uuid.uuid4().hex}
    with disk_space():
        try:
            building.mkdir(parents=True)
            tmp = building / f".{JOB}.tmp"
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, building / JOB)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    crash_point("job.prepared")
    return record, building, []


def clean(files: Path) -> None:
    """Remove `files/building/`: renamed aside first (one atomic step), then deleted."""
    building = Path(files) / BUILDING
    if building.is_dir():
        aside = Path(files) / f"{BUILDING}.{os.getpid()}.old"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(building, aside)
        crash_point("job.cleaning")
    _sweep(files)


def _sweep(files: Path) -> None:
    for old in Path(files).glob(f"{BUILDING}.*.old"):
        shutil.rmtree(old, ignore_errors=True)


def _number(path: Path) -> tuple[int, int] | None:
    m = CHUNK_NAME.fullmatch(path.name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def next_chunk(building: Path, rank: int) -> int:
    """The number of process `rank`'s next chunk: past its highest one, so that no chunk is ever written over."""
    return 1 + max((n[1] for p in building.glob("chunk-*.npz") if (n := _number(p)) and n[0] == rank), default=-1)


def save_chunk(building: Path, rank: int, number: int, positions: list[int], embeddings: list[np.ndarray],
               sizes: list[tuple[int, int]], errors: list[tuple[int, str]]) -> None:
    name = f"chunk-r{rank:03d}-{number:06d}"
    tmp, final = building / f"{name}.tmp.npz", building / f"{name}.npz"
    if final.exists():
        raise FileExistsError(f"{final} exists: a chunk is never written over")
    with disk_space(RESUME):
        try:
            np.savez(tmp, positions=np.asarray(positions, dtype=np.int64),
                     embeddings=np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32),
                     sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
                     bad=np.asarray([p for p, _ in errors], dtype=np.int64))
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    crash_point("job.chunk")


def load_chunks(building: Path) -> list[dict]:
    """Every chunk of every process (one that cannot be read is deleted: its images are embedded again)."""
    chunks = []
    for path in sorted(p for p in Path(building).glob("chunk-*.npz") if _number(p)):
        try:
            with np.load(path) as z:
                chunks.append({k: z[k] for k in ("positions", "embeddings", "sizes", "bad")})
        except (OSError, ValueError, KeyError, EOFError) as e:
            log.warning("dropped the unreadable chunk %s (%s); its images are embedded again", path.name, e)
            path.unlink(missing_ok=True)
    return chunks
