"""Studies of the MatViTs that a consistency result kept in its training cache (`mixnmatch_order`,
`layer_width`): for each seed whose MatViT is still there, a family of specs queries that MatViT's XL index of the
train split exactly as the consistency step queried its Mix'n'Match specs (same model, gallery, 1-NN and GFLOPs
count); one resumable file per seed under OUT/steps."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from app.bench import steps
from app.bench.consistency import matvit_run_name
from matvit import data, metrics, provenance
from matvit.errors import UserError
from matvit.spec import Nesting, Submodel
from retrieval.encoder import Encoder

Family = Callable[[Nesting], list[Submodel]]


def step_matvit(step: dict, cache: Path) -> Path:
    """Where a measured step's MatViT trained in the training cache `cache` (as `consistency.train_options`
    names it)."""
    matvit = step["settings"]["matvit"]
    return Path(cache) / f"seed-{step['seed']}" / matvit_run_name(matvit.get("mixnmatch_prob") or 0.0,
                                                                   matvit.get("weights"))


def query_xl_index(run: Path, step: dict, family: Family) -> list[dict]:
    """Each spec of `family(config)` querying the XL index of the train split of the MatViT at `run` (test split,
    1-NN, GFLOPs of the embedding path)."""
    encoder = Encoder.load(run)
    s = step["settings"]["matvit"]
    data_dir = s["data_dir"] and Path(s["data_dir"])
    gallery, queries = (data.load(s["dataset"], split, encoder.image_size, encoder.channels, data_dir)
                        for split in ("train", "test"))
    xl = encoder.encode(gallery.images, "XL", desc="gallery XL")
    rows = []
    for spec in family(encoder.model):
        emb = encoder.encode(queries.images, spec, desc=f"queries {spec.text}")
        rows.append({"spec": spec.text, "params": encoder.params(spec), "gflops": encoder.gflops(spec),
                     "knn1": metrics.knn1(xl, gallery.labels, emb, queries.labels)})
    return rows


def measure_seed(step_path: Path, cache: Path, out: Path, family: Family, key: str, copied: dict[str, str],
                 log=print) -> dict | None:
    """One seed: its row holds `family`'s specs under `key`, the trained granularities' 1-NN on the XL index
    (`trained`, from the step) and each step field of `copied` under its own name. Reused when measured before
    from the same step; None when the MatViT is not in the cache."""
    step = json.loads(step_path.read_text())
    run = step_matvit(step, cache)
    path = out / "steps" / f"seed-{step['seed']}.json"
    settings = {"step": str(step_path), "step_commit": step["commit"], "checkpoint": str(run)}
    row = steps.saved(path, settings, log)
    if row is not None:
        return row
    if not (run / "eval.json").is_file():
        log(f"[seed {step['seed']}] no trained MatViT in {run}: skipped")
        return None
    measured = query_xl_index(run, step, family)
    row = {"settings": settings, "seed": step["seed"], "dataset": step["settings"]["matvit"]["dataset"],
           **provenance.record(), "trained": {g: cell["knn1"] for g, cell in step["matvit"]["grid"]["XL"].items()},
           **{name: step[field] for name, field in copied.items()}, key: measured}
    path.parent.mkdir(parents=True, exist_ok=True)
    return steps.write(path, row)


def measure_result(result: Path, cache: Path, out: Path, family: Family, key: str,
                   copied: dict[str, str] | None = None, log=print) -> list[dict]:
    """`measure_seed` for every step of the consistency `result` whose MatViT is in `cache`."""
    paths = sorted((result / "steps").glob("seed-*.json"))
    if not paths:
        raise UserError(f"--result {result}: no consistency result there (no steps/seed-N.json)")
    rows = [r for p in paths if (r := measure_seed(p, cache, out, family, key, copied or {}, log))]
    if not rows:
        raise UserError(f"--cache {cache}: none of the MatViTs of {result}'s steps is there")
    return rows


def add_arguments(parser) -> None:
    """--result, --cache and --out, as every study of a consistency result's kept MatViTs takes them."""
    parser.add_argument("--result", type=Path, required=True, help="a consistency result directory (its steps/)")
    parser.add_argument("--cache", type=Path, required=True,
                        help="its training cache (`matvit bench consistency --cache`)")
    parser.add_argument("--out", type=Path, required=True, help="results directory")
