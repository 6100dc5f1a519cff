"""Device budgets: measure what each submodel costs on this machine and pick the best one that fits.

A profile row holds a submodel's parameters, GFLOPs, the backend that serves it (`retrieval.backends`:
every backend tried, its probe cosine against eager and batch-1 latency), that backend's median latency
at batch 1 and 32, and, when measured against an index, its 1-NN accuracy. Selection takes the most
accurate row within the budget (by measured accuracy when every candidate has it, else by GFLOPs as the
proxy), so a latency budget is held against the backend that actually serves.

For a Matryoshka-trained model the search is a second knob (`searches`: full vectors, and exact search on and
the funnel of each shorter trained prefix). A profile then also records each way's batch-1 search time at the
index's size (and, measured against an index, each pair's 1-NN), and a budget chooses among (submodel, search)
pairs (`pairs`): a pair costs its encode plus its search.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from matvit import provenance
from matvit import spec as specs
from matvit.errors import UserError
from matvit.spec import Submodel

from .backends import median_latency_ms
from .encoder import Encoder
from .prefix import Plan

log = logging.getLogger(__name__)
PROFILE_FILE = "profile.json"


class BudgetError(UserError):
    """No submodel fits the budget, or the budget is malformed."""


@dataclass
class Budget:
    """At most one limit: latency at batch 1 (ms), forward GFLOPs, or parameters."""

    ms: float | None = None
    gflops: float | None = None
    params: float | None = None

    def __post_init__(self) -> None:
        given = [(k, v) for k, v in (("ms", self.ms), ("gflops", self.gflops), ("params", self.params))
                 if v is not None]
        if len(given) > 1:
            raise BudgetError("give at most one budget (milliseconds, GFLOPs or parameters)")
        if given and not given[0][1] > 0:
            raise BudgetError(f"a budget must be positive, got {given[0][1]}")

    @property
    def limit(self) -> tuple[str, float] | None:
        for key, field in (("ms", "latency_ms_b1"), ("gflops", "gflops"), ("params", "params")):
            value = getattr(self, key)
            if value is not None:
                return field, value
        return None


FAMILIES = {"uniform": specs.named, "monotone": specs.monotone, "narrowing": specs.narrowing,
            "one-layer": specs.one_layer, "all": specs.every}


def candidates(encoder: Encoder, which: str) -> list[Submodel]:
    """`;`-separated families (`FAMILIES`: `uniform`, `monotone`, `narrowing`, `one-layer`, `all`) and specs,
    each spec once, in order."""
    out: list[Submodel] = []
    for item in which.split(";"):
        out += FAMILIES[item](encoder.model) if item in FAMILIES else [encoder.spec(item)]
    return list(dict.fromkeys(out))


def measure(encoder: Encoder, spec: Submodel | str, repeats: int = 15) -> dict:
    """Parameters and GFLOPs (embedding path, and with the classifier head), the backend chosen to serve
    it (see `Encoder.select`), and that backend's median latency at batch 1 and 32 on this machine."""
    spec = encoder.spec(spec)
    trials = encoder.select(spec, repeats)
    backend = encoder.serving(spec)
    runner = encoder.runner(spec)
    one = torch.zeros(1, encoder.channels, encoder.image_size, encoder.image_size, device=encoder.runtime.device)
    return {"params": encoder.params(spec), "gflops": encoder.gflops(spec),
            "params_with_head": encoder.params(spec, head=True), "gflops_with_head": encoder.gflops(spec, head=True),
            "backend": backend,
            "latency_ms_b1": median_latency_ms(runner, one, repeats=repeats),
            "latency_ms_b32": median_latency_ms(runner, one.expand(32, -1, -1, -1), repeats=max(3, repeats // 3)),
            "backends": [t.to_dict() for t in trials]}


def profile(encoder: Encoder, submodels: list[Submodel], accuracy=None, repeats: int = 15,
            plans: list[Plan] = ()) -> dict:
    """Measure every submodel; `accuracy(spec, plan=None) -> float` adds its 1-NN accuracy (with the backend that
    serves it) when given, and with `plans` (`searches`) each pair's too (`knn1_by_search`)."""
    rows = []
    for spec in tqdm(submodels, desc="profiling", unit="submodel"):
        row = {"id": spec.id, "spec": spec.text, **measure(encoder, spec, repeats)}
        if accuracy is not None:
            row["knn1"] = accuracy(spec)
            if plans:
                row["knn1_by_search"] = {plan.key: accuracy(spec, plan) for plan in plans}
        rows.append(row)
    return {"fingerprint": encoder.fingerprint, "host": host(), "backend": encoder.backend, **provenance.record(),
            "rows": rows}


def searches(length: int, dims: list[int], k: int = 10) -> list[Plan]:
    """The ways a budget may search vectors of `length` for a model trained for prefixes `dims`: the full vectors,
    then exact search on and the funnel of each shorter prefix (the funnel's default shortlist for k)."""
    shorter = [d for d in dims if d < length]
    return [Plan(length), *(Plan(d) for d in shorter), *(Plan.of(length, funnel=d, k=k) for d in shorter)]


def search_gflops(plan: Plan, count: int, length: int) -> float:
    """A query's search GFLOPs by `plan` over `count` vectors: the (prefix) inner products, and the funnel's
    re-ranking."""
    rerank = 2 * min(plan.shortlist, count) * length if plan.shortlist else 0
    return (2 * count * plan.dims + rerank) / 1e9


def time_searches(index, plans: list[Plan], repeats: int = 15, seed: int = 0) -> list[dict]:
    """Each plan's median batch-1 search time (ms, k = 10) over `index` as it is now, with seeded random queries."""
    length = index.manifest["dim"]
    queries = np.random.default_rng(seed).standard_normal((repeats + 1, length)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    out = []
    for plan in plans:
        full = plan == Plan(length)
        times = []
        for query in queries:  # the first one warms up (a prefix's first search builds its index)
            start = time.perf_counter()
            index.search(query[None], 10) if full else index.search_prefix(query[None], 10, plan)
            times.append((time.perf_counter() - start) * 1e3)
        out.append({"key": plan.key, "dims": plan.dims, "shortlist": plan.shortlist,
                    "search_ms_b1": float(np.median(times[1:])), "gallery": index.count})
    return out


def pairs(rows: list[dict], ways: list[dict]) -> list[dict]:
    """Each profile row with each way of searching (`key`, `search_gflops`, and `search_ms_b1` where measured): its
    costs the encode's plus the search's (no latency where the search has none), its 1-NN the pair's where measured
    (`knn1_by_search`), and the way under `search`."""
    out = []
    for row in rows:
        for way in ways:
            pair = {k: v for k, v in row.items() if k not in ("knn1", "latency_ms_b1")}
            pair.update(search=way, gflops=row["gflops"] + way["search_gflops"])
            if "latency_ms_b1" in row and "search_ms_b1" in way:
                pair["latency_ms_b1"] = row["latency_ms_b1"] + way["search_ms_b1"]
            if way["key"] in row.get("knn1_by_search", {}):
                pair["knn1"] = row["knn1_by_search"][way["key"]]
            out.append(pair)
    return out


def host() -> dict:
    """What a latency profile depends on: the machine and the threads torch computes with."""
    return {"name": platform.node(), "cpu": provenance.machine()["cpu"], "torch_threads": torch.get_num_threads()}


def index_accuracy(index, encoder: Encoder, queries) -> callable:
    """`accuracy(spec, plan=None)`: 1-NN accuracy of the labelled `queries` (an ImageSet) against `index`, searched
    by `plan` (default: the full vectors); each submodel encodes the queries once."""
    index.check_model(encoder.fingerprint)
    gallery_label = index.labels()
    labels = queries.labels.tolist()

    embedded: dict[str, np.ndarray] = {}

    def accuracy(spec: Submodel, plan: Plan | None = None) -> float:
        if spec.text not in embedded:
            embedded[spec.text] = encoder.encode(queries.images, spec)
        emb = embedded[spec.text]
        full = plan is None or plan == Plan(emb.shape[1])
        _, ids = index.search(emb, 1) if full else index.search_prefix(emb, 1, plan)
        return float(np.mean([gallery_label.get(int(i)) == y for i, y in zip(ids[:, 0], labels, strict=True)]))
    return accuracy


def save_profile(result: dict, path: Path) -> None:
    """Write `result` atomically (a temporary file of its own, then a rename)."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(result, f, indent=2)
    os.replace(f.name, path)


def load_profile(path: Path, fingerprint: str, this_host: bool = True, backend: str | None = None) -> dict | None:
    """The stored profile at `path` when it was measured for this model (and, with `this_host`, on this
    machine with this many threads; with `backend`, choosing among the same backends), else None (with a
    warning when it is stale)."""
    try:
        result = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if result.get("fingerprint") != fingerprint:
        return None
    if this_host and result.get("host") != host():
        log.warning("the profile in %s was measured on %s, not on %s: its latencies are stale",
                    path, result.get("host"), host())
        return None
    if backend is not None and result.get("backend", "eager") != backend:
        log.warning("the profile in %s was measured with backend %s, not %s: it is stale",
                    path, result.get("backend", "eager"), backend)
        return None
    return result


def ensure_profile(encoder: Encoder, path: Path) -> dict:
    """The profile at `path` if it is this machine's and backend setting's (each row's backend then serves
    its submodel again, once it passes the probe check); else the same submodels (the trained granularities
    when there is none) measured here and stored, keeping the 1-NN accuracy already measured."""
    current = load_profile(path, encoder.fingerprint, backend=encoder.backend)
    if current is not None and adopt(encoder, current):
        return current
    stale = load_profile(path, encoder.fingerprint, this_host=False)
    rows = stale["rows"] if stale else []
    submodels = [encoder.spec(r["spec"]) for r in rows] or candidates(encoder, "uniform")
    known = {r["spec"]: r["knn1"] for r in rows if "knn1" in r}
    accuracy = (lambda spec: known[spec.text]) if rows and len(known) == len(rows) else None
    result = profile(encoder, submodels, accuracy)
    for row, old in zip(result["rows"], rows, strict=False):  # the pairs' accuracy, measured before, holds too
        if "knn1_by_search" in old:
            row["knn1_by_search"] = old["knn1_by_search"]
    save_profile(result, path)
    return result


def adopt(encoder: Encoder, result: dict) -> bool:
    """Serve each profiled submodel with the backend its row names (built now, not in a request); False
    when one of them no longer passes its probe check here (then that submodel is served with eager and
    the profile's latencies are stale)."""
    fine = True
    for row in result["rows"]:
        backend = row.get("backend", "eager")
        if encoder.serve(row["spec"], backend).passed:
            continue
        log.warning("the profile's backend %s for %s no longer passes its check: re-measuring", backend, row["spec"])
        fine = False
    return fine


def choose(rows: list[dict], budget: Budget) -> tuple[dict, str]:
    """The best row within the budget, and a sentence saying why."""
    field, limit = budget.limit
    feasible = [r for r in rows if r[field] <= limit]
    unit = {"latency_ms_b1": "ms", "gflops": "GFLOPs", "params": "parameters"}[field]
    what = "(submodel, search) pairs" if rows and "search" in rows[0] else "submodels"
    if not feasible:
        cheapest = min(rows, key=lambda r: r[field])
        way = cheapest.get("search")
        searched = f" searching {way['dims']} dims{' through the funnel' if way['shortlist'] else ''}" if way else ""
        raise BudgetError(f"no submodel fits {limit:g} {unit}; the cheapest is {cheapest['spec']}{searched} "
                          f"at {cheapest[field]:.4g} {unit}")
    if all("knn1" in r for r in feasible):
        best = max(feasible, key=lambda r: (r["knn1"], -r[field]))
        why = f"most accurate measured 1-NN ({best['knn1']:.4f}) among {len(feasible)} {what} " \
              f"within {limit:g} {unit}"
    else:
        best = max(feasible, key=lambda r: (r["gflops"], -r[field]))
        why = f"largest GFLOPs ({best['gflops']:.4g}, the accuracy proxy) among {len(feasible)} {what} " \
              f"within {limit:g} {unit}"
    return best, why
